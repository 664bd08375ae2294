//! Errors of the migration engine. Each says where it happened: which channel and section,
//! which device and hook, which handshake check.

use baton_qdev::DeviceMigrationError;
use baton_vmstate::VmStateError;

/// The stream was malformed, cut, or its transport failed.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    #[error("{channel}: {context}: {source}")]
    Io {
        channel: String,
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{channel}: peer closed the channel {context}")]
    Closed { channel: String, context: String },
    #[error("{channel}: the file ends {context}")]
    Truncated { channel: String, context: String },
    #[error("channel header: {0}")]
    BadChannelHeader(String),
    #[error("{channel}: section #{seq}: unknown section type {ty}")]
    UnknownSection { channel: String, seq: u32, ty: u8 },
    #[error("{channel}: section #{got}: out of order (expected #{expected})")]
    OutOfOrder {
        channel: String,
        expected: u32,
        got: u32,
    },
    #[error("{channel}: section #{seq} {ty}: length {len} exceeds the maximum {max}")]
    TooLong {
        channel: String,
        seq: u32,
        ty: String,
        len: u32,
        max: u32,
    },
    #[error("{channel}: section #{seq} {ty}: bad footer {got:#010x} (expected {expected:#010x})")]
    BadFooter {
        channel: String,
        seq: u32,
        ty: String,
        got: u32,
        expected: u32,
    },
    #[error("{channel}: section #{seq}: expected {expected}, got {got}")]
    Unexpected {
        channel: String,
        seq: u32,
        expected: String,
        got: String,
    },
    #[error(
        "{channel}: section #{seq} {ty}: {count} fds arrived with a section that carries none"
    )]
    UnexpectedFds {
        channel: String,
        seq: u32,
        ty: String,
        count: usize,
    },
    #[error("{channel}: section #{seq} {ty}: {reason}")]
    BadPayload {
        channel: String,
        seq: u32,
        ty: String,
        reason: String,
    },
    #[error("{channel}: section #{seq} {ty}: {source}")]
    BadState {
        channel: String,
        seq: u32,
        ty: String,
        #[source]
        source: VmStateError,
    },
}

/// Why a migration, snapshot or restore did not complete.
#[derive(Debug, thiserror::Error)]
pub enum MigrationError {
    #[error("handshake rejected: {}", .0.join("; "))]
    Rejected(Vec<String>),
    #[error(transparent)]
    Stream(#[from] StreamError),
    #[error(transparent)]
    Device(#[from] DeviceMigrationError),
    #[error("destination failed: {0}")]
    DestinationFailed(String),
    #[error("migration cancelled")]
    Cancelled,
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error("VM control: {0}")]
    Vm(String),
    #[error("guest RAM: {0}")]
    Ram(String),
    /// The source sent GO but never heard RUNNING or ERROR back: the destination may run.
    /// The source stays paused with its backends exported; only whoever can tell that the
    /// destination does not run may resume it.
    #[error("the destination was told to run but did not confirm ({0}); the source stays paused")]
    Unconfirmed(String),
}

impl MigrationError {
    /// Name of the state a caller would report (as QEMU's `query-migrate`).
    pub fn is_cancel(&self) -> bool {
        matches!(self, MigrationError::Cancelled)
    }
}
