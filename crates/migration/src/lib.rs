//! baton's migration engine.
//!
//! One stream format serves three uses: **local** live update (same host: guest RAM memfds
//! and device backends change process by fd over a UNIX socket, so the pause does not
//! grow with RAM), **remote** migration (RAM pre-copied with dirty tracking over TCP or
//! UNIX, optionally on several channels, then stop-and-copy within the downtime limit),
//! and **snapshot**/restore to and from a file.
//!
//! The engine knows devices only through [`baton_qdev::Migratable`], RAM through
//! [`GuestRam`]/[`IncomingRam`] and [`DirtyLog`], and vCPUs through [`VmControl`], so it
//! runs the same under baton-vmm on KVM and in tests on plain shared memory.
//!
//! The wire protocol and its message sequence are in [`protocol`]. Nothing moves before the
//! [`handshake`] has compared both sides. Until the source commits (sends GO, after the
//! destination loaded everything and said READY), a failure or [`MigrationMonitor::cancel`]
//! resumes the source with nothing lost and the destination discards; after it, cancel has
//! no effect, and only a connection lost before RUNNING leaves the source paused
//! ([`MigrationError::Unconfirmed`]), since the destination may run.

// MigrationError carries its context (channel, section, device, both settings) by value:
// it is built once, on the failure path, and its public shape is what callers match on,
// so it is not boxed to please a size heuristic.
#![allow(clippy::result_large_err)]

pub mod destination;
pub mod error;
pub mod handshake;
pub mod payload;
pub mod protocol;
pub mod ram;
mod ram_send;
mod ram_wire;
pub mod report;
pub mod source;
pub mod stream;
pub mod transport;

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

pub use destination::{incoming, DestinationVm, Incoming, IncomingOutcome, IncomingSettings};
pub use error::{MigrationError, StreamError};
pub use handshake::{Capabilities, MigrationMode, Parameters};
pub use ram::{
    DirtyLog, GuestRam, IncomingRam, MappedRam, MemfdRam, OrDirtyLogs, RamLayout, RamRegion,
};
pub use report::{DowntimeReport, MigrationInfo, MigrationMonitor, MigrationStatus, RamStats};
pub use source::{migrate, MigrationOutcome, SourceVm};

/// Stops and starts the guest's vCPUs; the VMM implements it.
pub trait VmControl: Send {
    /// Stop every vCPU and wait until none runs guest code.
    fn pause(&mut self) -> Result<(), String>;
    /// Let the vCPUs run again.
    fn resume(&mut self) -> Result<(), String>;
}

/// What the source is asked to do.
#[derive(Clone, Debug)]
pub struct MigrationSettings {
    pub mode: MigrationMode,
    pub machine_type: String,
    pub capabilities: Capabilities,
    pub parameters: Parameters,
}

/// Where a stream goes: `unix:PATH`, `tcp:HOST:PORT` or `file:PATH` (QEMU's URI forms).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    Unix(PathBuf),
    Tcp(String),
    File(PathBuf),
}

impl FromStr for Target {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || {
            format!("invalid migration URI {s:?}: expected unix:PATH, tcp:HOST:PORT or file:PATH")
        };
        let (scheme, rest) = s.split_once(':').ok_or_else(bad)?;
        if rest.is_empty() {
            return Err(bad());
        }
        match scheme {
            "unix" => Ok(Target::Unix(rest.into())),
            "tcp"
                if rest
                    .rsplit_once(':')
                    .is_some_and(|(_, p)| p.parse::<u16>().is_ok()) =>
            {
                Ok(Target::Tcp(rest.to_owned()))
            }
            "file" => Ok(Target::File(rest.into())),
            _ => Err(bad()),
        }
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Unix(p) => write!(f, "unix:{}", p.display()),
            Target::Tcp(a) => write!(f, "tcp:{a}"),
            Target::File(p) => write!(f, "file:{}", p.display()),
        }
    }
}

/// `CLOCK_MONOTONIC` in nanoseconds: one clock for every process on the host.
pub(crate) fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we pass.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64)
        .saturating_mul(1_000_000_000)
        .saturating_add(ts.tv_nsec as u64)
}

pub(crate) fn micros(d: Duration) -> u64 {
    d.as_micros().min(u128::from(u64::MAX)) as u64
}

/// 16 bytes that tell this session's channels apart from any other's.
pub(crate) fn new_session_id() -> [u8; 16] {
    use std::io::Read;
    let mut id = [0u8; 16];
    if std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut id))
        .is_err()
    {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        id.copy_from_slice(&(t ^ u128::from(std::process::id())).to_le_bytes());
    }
    id
}
