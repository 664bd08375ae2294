//! The command set a baton VMM implements: names, argument and return types, events.
//!
//! Member names follow QEMU's QAPI schema exactly (`qapi/*.json`), so existing clients
//! work unchanged. Each command is a zero-sized type implementing [`Command`]; register
//! behaviour for it with [`crate::CommandRegistry::register`]. Return types that QEMU
//! declares as "no return value" are `()`, sent as `{}`.
//!
//! `qmp_capabilities`, `query-version` and `query-commands` are answered by the server
//! itself; their types are here for clients and documentation.

mod machine;
mod migration;

pub use machine::*;
pub use migration::*;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// A QMP command: its wire name and its argument and return types.
pub trait Command {
    /// The name clients `execute`, e.g. `"query-status"`.
    const NAME: &'static str;
    /// The `arguments` object ([`NoArgs`] when it takes none).
    type Args: DeserializeOwned;
    /// The `return` value (`()` is sent as `{}`).
    type Returns: Serialize;
}

/// A QMP event: its name and its `data` member (a unit-like struct has no `data`).
pub trait Event: Serialize {
    /// The event name, e.g. `"STOP"`.
    const NAME: &'static str;
}

/// The arguments of a command that takes none: any member is `unexpected`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NoArgs {}

macro_rules! command {
    ($(#[$doc:meta])* $ty:ident, $name:expr, $args:ty, $ret:ty) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy)]
        pub struct $ty;
        impl Command for $ty {
            const NAME: &'static str = $name;
            type Args = $args;
            type Returns = $ret;
        }
    };
}
pub(crate) use command;

command!(
    /// `qmp_capabilities`: leave negotiation mode (handled by the server).
    QmpCapabilities, "qmp_capabilities", QmpCapabilitiesArgs, ()
);
command!(
    /// `query-status`: the run state.
    QueryStatus, "query-status", NoArgs, StatusInfo
);
command!(
    /// `stop`: pause all vCPUs; emits `STOP`.
    Stop, "stop", NoArgs, ()
);
command!(
    /// `cont`: resume; emits `RESUME`.
    Cont, "cont", NoArgs, ()
);
command!(
    /// `quit`: the VMM exits after replying.
    Quit, "quit", NoArgs, ()
);
command!(
    /// `query-commands`: every command available (handled by the server).
    QueryCommands, "query-commands", NoArgs, Vec<CommandInfo>
);
command!(
    /// `query-version` (handled by the server).
    QueryVersion, "query-version", NoArgs, VersionInfo
);

/// Arguments of `qmp_capabilities`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QmpCapabilitiesArgs {
    /// Capabilities to enable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enable: Option<Vec<QmpCapability>>,
}

/// QMP protocol capabilities (`QMPCapability`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum QmpCapability {
    /// Out-of-band execution (not offered by baton).
    Oob,
}

/// `query-version`'s `qemu` member; field order as QEMU prints it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionTriple {
    /// Micro version.
    pub micro: u32,
    /// Minor version.
    pub minor: u32,
    /// Major version.
    pub major: u32,
}

/// `query-version` and the greeting's `version`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionInfo {
    /// The QEMU version whose QMP behaviour is implemented.
    pub qemu: VersionTriple,
    /// Free text naming the actual program, e.g. `baton 0.1.0`.
    pub package: String,
}

impl VersionInfo {
    /// A version `major.minor.micro` with a package string.
    pub fn new(major: u32, minor: u32, micro: u32, package: impl Into<String>) -> Self {
        VersionInfo {
            qemu: VersionTriple {
                micro,
                minor,
                major,
            },
            package: package.into(),
        }
    }
}

/// One entry of `query-commands`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommandInfo {
    /// The command name.
    pub name: String,
}

/// QEMU's `RunState`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RunState {
    /// Stopped by a debugger.
    Debug,
    /// Waiting for an incoming migration.
    Inmigrate,
    /// An internal error stopped the guest.
    InternalError,
    /// An I/O error stopped the guest.
    IoError,
    /// Paused by `stop`.
    Paused,
    /// Stopped after an outgoing migration completed.
    Postmigrate,
    /// Not started yet.
    Prelaunch,
    /// Stopped to finish a migration (stop-and-copy).
    FinishMigrate,
    /// Restoring a snapshot.
    RestoreVm,
    /// Running.
    Running,
    /// Saving a snapshot.
    SaveVm,
    /// Shut down.
    Shutdown,
    /// Suspended (ACPI S3).
    Suspended,
    /// Stopped by the watchdog.
    Watchdog,
    /// The guest panicked.
    GuestPanicked,
    /// COLO fault tolerance.
    Colo,
}

/// `query-status`'s return.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusInfo {
    /// Whether the vCPUs run.
    pub running: bool,
    /// Deprecated in QEMU, always `false`.
    pub singlestep: bool,
    /// The run state.
    pub status: RunState,
}

impl StatusInfo {
    /// The status for a run state (`running` derived from it).
    pub fn new(status: RunState) -> Self {
        StatusInfo {
            running: status == RunState::Running,
            singlestep: false,
            status,
        }
    }
}

/// Event `STOP`: the guest was paused. No data.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct StopEvent;
impl Event for StopEvent {
    const NAME: &'static str = "STOP";
}

/// Event `RESUME`: the guest runs again. No data.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct ResumeEvent;
impl Event for ResumeEvent {
    const NAME: &'static str = "RESUME";
}

/// QEMU's `ShutdownCause`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ShutdownCause {
    /// No shutdown.
    None,
    /// An error on the host.
    HostError,
    /// `quit` or the VMM's own decision.
    HostQmpQuit,
    /// `system_reset` over QMP.
    HostQmpSystemReset,
    /// A signal to the VMM.
    HostSignal,
    /// The VMM's UI.
    HostUi,
    /// The guest shut down.
    GuestShutdown,
    /// The guest reset.
    GuestReset,
    /// The guest panicked.
    GuestPanic,
    /// A subsystem asked for a reset.
    SubsystemReset,
    /// Snapshot load.
    SnapshotLoad,
}

/// Event `SHUTDOWN`.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct ShutdownEvent {
    /// Whether the guest asked for it.
    pub guest: bool,
    /// Why.
    pub reason: ShutdownCause,
}
impl Event for ShutdownEvent {
    const NAME: &'static str = "SHUTDOWN";
}

/// Event `RESET`.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct ResetEvent {
    /// Whether the guest asked for it.
    pub guest: bool,
    /// Why.
    pub reason: ShutdownCause,
}
impl Event for ResetEvent {
    const NAME: &'static str = "RESET";
}
