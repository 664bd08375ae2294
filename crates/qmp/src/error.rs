//! Errors: the QMP error replies a command produces ([`QmpError`]) and the failures of
//! the server itself ([`ServerError`]).

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// QEMU's error classes (`qapi/error.json`, `QapiErrorClass`). Nearly every error is
/// [`ErrorClass::GenericError`]; the others exist for compatibility with clients that
/// test for them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ErrorClass {
    /// Everything that is not one of the classes below.
    GenericError,
    /// The command does not exist (or not in the current mode).
    CommandNotFound,
    /// A device has no medium / is not active.
    DeviceNotActive,
    /// The named device does not exist.
    DeviceNotFound,
    /// The requested operation needs a KVM capability the host lacks.
    KVMMissingCap,
}

impl ErrorClass {
    /// The JSON name, e.g. `"GenericError"`.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorClass::GenericError => "GenericError",
            ErrorClass::CommandNotFound => "CommandNotFound",
            ErrorClass::DeviceNotActive => "DeviceNotActive",
            ErrorClass::DeviceNotFound => "DeviceNotFound",
            ErrorClass::KVMMissingCap => "KVMMissingCap",
        }
    }
}

impl fmt::Display for ErrorClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An error reply: `{"error": {"class": CLASS, "desc": DESC}}`.
///
/// Handlers return it; the server sends it with the request's `id`. `desc` is meant for
/// humans and should name what is wrong (`Parameter 'uri' is missing`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{class}: {desc}")]
pub struct QmpError {
    /// The error class.
    pub class: ErrorClass,
    /// The human-readable description.
    pub desc: String,
}

impl QmpError {
    /// An error of any class.
    pub fn new(class: ErrorClass, desc: impl Into<String>) -> Self {
        QmpError {
            class,
            desc: desc.into(),
        }
    }

    /// A `GenericError`, the class of nearly every QMP error.
    pub fn generic(desc: impl Into<String>) -> Self {
        QmpError::new(ErrorClass::GenericError, desc)
    }

    /// QEMU's reply to an unknown command: `The command NAME has not been found`.
    pub fn command_not_found(name: &str) -> Self {
        QmpError::new(
            ErrorClass::CommandNotFound,
            format!("The command {name} has not been found"),
        )
    }

    /// QEMU's `DeviceNotFound`: `Device 'ID' not found`.
    pub fn device_not_found(id: &str) -> Self {
        QmpError::new(
            ErrorClass::DeviceNotFound,
            format!("Device '{id}' not found"),
        )
    }

    /// A `DeviceNotActive` error.
    pub fn device_not_active(desc: impl Into<String>) -> Self {
        QmpError::new(ErrorClass::DeviceNotActive, desc)
    }

    /// A `KVMMissingCap` error.
    pub fn kvm_missing_cap(desc: impl Into<String>) -> Self {
        QmpError::new(ErrorClass::KVMMissingCap, desc)
    }
}

/// Why the server could not start or stopped working.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// Neither a UNIX socket path nor a TCP address was configured.
    #[error("QMP server has no listener: configure a UNIX socket path or a TCP address")]
    NoListener,
    /// Binding the UNIX socket failed.
    #[error("cannot bind QMP socket {path}: {source}")]
    BindUnix {
        /// The socket path.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// Another server answers on the UNIX socket path.
    #[error("QMP socket {path} is in use by another server")]
    SocketInUse {
        /// The socket path.
        path: PathBuf,
    },
    /// The UNIX socket path exists and is not a socket: it is never removed.
    #[error("cannot bind QMP socket {path}: the path exists and is not a socket")]
    NotASocket {
        /// The socket path.
        path: PathBuf,
    },
    /// Binding the TCP address failed.
    #[error("cannot bind QMP TCP address {addr}: {source}")]
    BindTcp {
        /// The address.
        addr: SocketAddr,
        /// The OS error.
        source: io::Error,
    },
    /// Another socket operation during setup failed.
    #[error("QMP server setup: {what}: {source}")]
    Setup {
        /// What was being done.
        what: &'static str,
        /// The OS error.
        source: io::Error,
    },
}
