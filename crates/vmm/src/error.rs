//! One error type for the VMM. Every variant says what was being done, so a failure
//! deep in a KVM ioctl reads as "setting vCPU 1 sregs: Invalid argument".

use std::path::PathBuf;

/// Errors of baton-vmm.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("opening /dev/kvm: {0}")]
    OpenKvm(#[source] kvm_ioctls::Error),
    #[error("KVM: {what}: {source}")]
    Kvm {
        what: String,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("vCPU {index}: {what}: {source}")]
    Vcpu {
        index: usize,
        what: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("guest memory: {0}")]
    Memory(String),
    #[error("reading kernel {path}: {source}")]
    KernelFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("loading kernel {path}: {reason}")]
    KernelLoad { path: PathBuf, reason: String },
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error("vCPU {0} does not exist")]
    NoSuchVcpu(usize),
    #[error("vCPUs must be paused for {0}")]
    NotPaused(&'static str),
    #[error("vCPU {index} thread: {reason}")]
    VcpuThread { index: usize, reason: String },
    #[error("device {id}: {reason}")]
    Device { id: String, reason: String },
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
}

/// Result with [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

/// Adds a description to a KVM ioctl error.
pub(crate) fn kvm_err(what: impl Into<String>) -> impl FnOnce(kvm_ioctls::Error) -> Error {
    let what = what.into();
    move |source| Error::Kvm { what, source }
}
