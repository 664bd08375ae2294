//! The `Migratable` trait: what every baton device does for migration and live update.
//!
//! A device takes part in a migration through three hooks, and the migration engine holds
//! the devices of a VM as `Box<dyn Migratable>`:
//!
//! | hook | source side | destination side |
//! |---|---|---|
//! | `vmsd` + `save`/`load` | final state, device quiesced | load it before resume |
//! | [`EarlySetup`] | early state while the guest runs, again at switchover | prepare early; skip the redo when unchanged |
//! | [`BackendTransfer`] | hand over open host fds, keep them until released | adopt them without re-initialising |
//!
//! The order on each side (steps in brackets only when the hook is present and enabled):
//!
//! ```text
//! source                                     destination
//!                                            device created with the same properties,
//!                                            backend in "incoming" mode (opens nothing)
//! handshake: id, vmsd, early, backend  --->  compare, answer accept / errors
//! [early_setup.save_early()]           --->  [early_setup.prepare()]
//! ... guest keeps running, RAM iterates ...
//! pause vCPUs, quiesce devices
//! save()
//! [early_setup.save_early() again:
//!  equal bytes -> Unchanged]           --->  [early_setup.finish(Unchanged | Changed)]
//! [backend_transfer.export()]          --->  [backend_transfer.adopt()], load()
//!                                      <---  "running"
//! [backend_transfer.release()]
//! on failure or cancel before "running":
//! [backend_transfer.resume()], resume vCPUs  [early_setup.discard()], drop the device
//! ```
//!
//! Everything a destination receives is untrusted: state blobs are decoded by the checked
//! `baton-vmstate` codec, and received fds must be checked for their kind before use.
//!
//! # Implementing it
//!
//! A device whose backend is one host fd (here a pipe it writes events to), with a queue
//! size worth preparing early:
//!
//! ```
//! use std::io::PipeWriter;
//! use std::os::fd::AsFd;
//! use baton_qdev::*;
//! use baton_vmstate::{VmState, VmStateDescription, VmStateError};
//!
//! // Wire structs: plain data, validated on the way in.
//! #[derive(VmState, Default)]
//! #[vmstate(name = "event-dev", version = 1, validate = check)]
//! struct EventState { queue_size: u16, next: u16 }
//! fn check(s: &EventState) -> Result<(), VmStateError> {
//!     if s.next >= s.queue_size {
//!         return Err(VmStateError::invalid("next",
//!             format!("{} exceeds queue size {}", s.next, s.queue_size)));
//!     }
//!     Ok(())
//! }
//! #[derive(VmState, Default)]
//! #[vmstate(name = "event-dev/early", version = 1, early_setup)]
//! struct EventEarly { queue_size: u16 }
//! #[derive(VmState, Default)]
//! #[vmstate(name = "event-dev/backend", version = 1)]
//! struct EventBackendMeta { nonblocking: bool }
//!
//! struct EventDev {
//!     id: String,
//!     queue_size: u16,
//!     next: u16,
//!     out: Option<PipeWriter>,  // the host resource
//!     handed_over: bool,        // source: exported, must not be used
//!     backend_transfer: bool,   // the resolved `backend-transfer` property
//! }
//!
//! impl Migratable for EventDev {
//!     fn id(&self) -> &str { &self.id }
//!     fn vmsd(&self) -> &'static VmStateDescription { EventState::vmsd() }
//!     fn save(&mut self) -> Result<Vec<u8>, DeviceMigrationError> {
//!         Ok(EventState { queue_size: self.queue_size, next: self.next }.save())
//!     }
//!     fn load(&mut self, version_id: u32, state: &[u8]) -> Result<(), DeviceMigrationError> {
//!         let s = EventState::load(state, version_id)
//!             .map_err(|e| DeviceMigrationError::state(&self.id, Hook::Load, e))?;
//!         (self.queue_size, self.next) = (s.queue_size, s.next);
//!         Ok(())
//!     }
//!     fn early_setup(&mut self) -> Option<&mut dyn EarlySetup> { Some(self) }
//!     fn backend_transfer(&mut self) -> Option<&mut dyn BackendTransfer> { Some(self) }
//! }
//!
//! impl EarlySetup for EventDev {
//!     fn early_vmsd(&self) -> &'static VmStateDescription { EventEarly::vmsd() }
//!     fn save_early(&mut self) -> Result<Vec<u8>, DeviceMigrationError> {
//!         Ok(EventEarly { queue_size: self.queue_size }.save())
//!     }
//!     fn prepare(&mut self, v: u32, state: &[u8]) -> Result<(), DeviceMigrationError> {
//!         let e = EventEarly::load(state, v)
//!             .map_err(|e| DeviceMigrationError::state(&self.id, Hook::EarlyPrepare, e))?;
//!         self.queue_size = e.queue_size; // allocate rings of that size here
//!         Ok(())
//!     }
//!     fn finish(&mut self, outcome: EarlyOutcome<'_>) -> Result<(), DeviceMigrationError> {
//!         match outcome {
//!             EarlyOutcome::Unchanged => Ok(()), // nothing to redo
//!             EarlyOutcome::Changed { version_id, state } => self.prepare(version_id, state),
//!         }
//!     }
//! }
//!
//! impl BackendTransfer for EventDev {
//!     fn enabled(&self) -> bool { self.backend_transfer }
//!     fn metadata_vmsd(&self) -> &'static VmStateDescription { EventBackendMeta::vmsd() }
//!     fn export(&mut self) -> Result<BackendHandoff<'_>, DeviceMigrationError> {
//!         let out = self.out.as_ref().ok_or_else(|| DeviceMigrationError::refused(
//!             &self.id, Hook::BackendExport, "no backend"))?;
//!         self.handed_over = true; // stop using it, keep it open
//!         Ok(BackendHandoff {
//!             fds: vec![HandoffFd { role: "events".into(), fd: out.as_fd() }],
//!             metadata: EventBackendMeta { nonblocking: false }.save(),
//!         })
//!     }
//!     fn resume(&mut self) -> Result<(), DeviceMigrationError> {
//!         self.handed_over = false;
//!         Ok(())
//!     }
//!     fn release(&mut self) { self.out = None; }
//!     fn adopt(&mut self, mut rx: ReceivedBackend) -> Result<(), DeviceMigrationError> {
//!         let (v, meta) = rx.metadata();
//!         EventBackendMeta::load(meta, v)
//!             .map_err(|e| DeviceMigrationError::state(&self.id, Hook::BackendAdopt, e))?;
//!         let fd = rx.take("events")?;
//!         rx.finish()?; // refuse fds nobody asked for
//!         // Check the kind before use (here: a FIFO), and adopt as is: no re-initialising.
//!         let st = std::fs::File::from(fd.try_clone().map_err(|e|
//!             DeviceMigrationError::io(&self.id, Hook::BackendAdopt, "dup", e))?)
//!             .metadata().map_err(|e|
//!             DeviceMigrationError::io(&self.id, Hook::BackendAdopt, "fstat", e))?;
//!         use std::os::unix::fs::FileTypeExt;
//!         if !st.file_type().is_fifo() {
//!             return Err(DeviceMigrationError::fd(&self.id, Hook::BackendAdopt, "events",
//!                 "not a pipe"));
//!         }
//!         self.out = Some(PipeWriter::from(fd));
//!         Ok(())
//!     }
//! }
//!
//! // The engine holds devices as trait objects.
//! let (_r, w) = std::io::pipe()?;
//! let devices: Vec<Box<dyn Migratable>> = vec![Box::new(EventDev {
//!     id: "ev0".into(), queue_size: 64, next: 3, out: Some(w),
//!     handed_over: false, backend_transfer: true,
//! })];
//! assert_eq!(devices[0].vmsd().name, "event-dev");
//! # Ok::<(), std::io::Error>(())
//! ```

use std::fmt;
use std::os::fd::{BorrowedFd, OwnedFd};

use baton_vmstate::{VmStateDescription, VmStateError};

/// Which hook failed, for error messages and logs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hook {
    Save,
    Load,
    EarlySave,
    EarlyPrepare,
    EarlyFinish,
    BackendExport,
    BackendAdopt,
    BackendResume,
}

impl fmt::Display for Hook {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Hook::Save => "save",
            Hook::Load => "load",
            Hook::EarlySave => "early-setup save",
            Hook::EarlyPrepare => "early-setup prepare",
            Hook::EarlyFinish => "early-setup finish",
            Hook::BackendExport => "backend export",
            Hook::BackendAdopt => "backend adopt",
            Hook::BackendResume => "backend resume",
        })
    }
}

/// A hook's failure, naming the device and the hook.
#[derive(Debug, thiserror::Error)]
pub enum DeviceMigrationError {
    /// The state (or backend metadata) did not decode or validate.
    #[error("{device}: {hook}: {source}")]
    State {
        device: String,
        hook: Hook,
        #[source]
        source: VmStateError,
    },
    /// A received fd is missing, extra, or not what its role requires.
    #[error("{device}: {hook}: fd {role:?}: {reason}")]
    BackendFd {
        device: String,
        hook: Hook,
        role: String,
        reason: String,
    },
    /// A host operation failed.
    #[error("{device}: {hook}: {context}: {source}")]
    Io {
        device: String,
        hook: Hook,
        context: String,
        #[source]
        source: std::io::Error,
    },
    /// Anything else the device refuses, in its own words.
    #[error("{device}: {hook}: {reason}")]
    Refused {
        device: String,
        hook: Hook,
        reason: String,
    },
}

impl DeviceMigrationError {
    pub fn state(device: &str, hook: Hook, source: VmStateError) -> Self {
        Self::State {
            device: device.to_owned(),
            hook,
            source,
        }
    }
    pub fn fd(device: &str, hook: Hook, role: &str, reason: impl Into<String>) -> Self {
        Self::BackendFd {
            device: device.to_owned(),
            hook,
            role: role.to_owned(),
            reason: reason.into(),
        }
    }
    pub fn io(device: &str, hook: Hook, context: impl Into<String>, e: std::io::Error) -> Self {
        Self::Io {
            device: device.to_owned(),
            hook,
            context: context.into(),
            source: e,
        }
    }
    pub fn refused(device: &str, hook: Hook, reason: impl Into<String>) -> Self {
        Self::Refused {
            device: device.to_owned(),
            hook,
            reason: reason.into(),
        }
    }
}

/// A device that can be migrated, snapshotted and live-updated.
///
/// Object-safe: the engine holds `Box<dyn Migratable>`. Implement `vmsd`, `save` and `load`
/// with a `#[derive(VmState)]` state struct kept apart from the device's runtime structures
/// (convert on save, validate and convert on load), so refactoring the device never changes
/// the wire. Return [`EarlySetup`] and [`BackendTransfer`] implementations when the device
/// has them.
///
/// No hook may panic on input, and no hook may leave the *source* unable to resume: until
/// the destination reports that it runs, every source-side effect must be undoable.
pub trait Migratable: Send {
    /// The device id (`net0`), unique in its VM; the engine matches devices by it.
    fn id(&self) -> &str;

    /// The schema of the final state: what `save` writes (at `vmsd().version_id`) and the
    /// version range `load` accepts. Must not depend on the device's current state.
    fn vmsd(&self) -> &'static VmStateDescription;

    /// Source, at switchover: vCPUs are paused and the device is quiesced (no request in
    /// flight, backend not being read). Returns the final state encoded with `vmsd()`.
    /// May be called again if a failed migration is retried; must not change the device,
    /// which may resume afterwards.
    fn save(&mut self) -> Result<Vec<u8>, DeviceMigrationError>;

    /// Destination, before the VM first runs: `state` was written at `version_id`, which
    /// the engine has already checked against `vmsd()`'s range. The bytes are hostile:
    /// decode with the checked codec and validate every index against the device's own
    /// configuration. On error the engine discards the destination VM; the device need not
    /// be usable afterwards but must not panic, leak, or touch a backend it was handed.
    fn load(&mut self, version_id: u32, state: &[u8]) -> Result<(), DeviceMigrationError>;

    /// The early-setup hook, if this device has state worth preparing before switchover
    /// and its `early-setup` property is on. Return `None` when off: the engine then
    /// sends no early state for it, and the handshake compares both sides' answers.
    fn early_setup(&mut self) -> Option<&mut dyn EarlySetup> {
        None
    }

    /// The backend-transfer hook, if this device owns host resources that can be handed to
    /// a process on the same host (TAP fds, a vhost-user socket, VFIO fds). Return it even
    /// when the `backend-transfer` property is off: [`BackendTransfer::enabled`] tells.
    fn backend_transfer(&mut self) -> Option<&mut dyn BackendTransfer> {
        None
    }
}

/// State a destination can use before switchover for expensive preparation.
pub trait EarlySetup {
    /// The schema of the early state (its `early_setup` flag set).
    fn early_vmsd(&self) -> &'static VmStateDescription;

    /// Source, guest running (during the setup phase), and again at switchover with the
    /// device quiesced. Must not disturb the running device. The engine compares the two
    /// results byte for byte to decide [`EarlyOutcome::Unchanged`], so the encoding must be
    /// deterministic.
    fn save_early(&mut self) -> Result<Vec<u8>, DeviceMigrationError>;

    /// Destination, before switchover, while the source still runs: validate the state and
    /// do the expensive work (size queues, configure the backend). Must not make anything
    /// guest-visible and must be undoable by [`EarlySetup::discard`].
    fn prepare(&mut self, version_id: u32, state: &[u8]) -> Result<(), DeviceMigrationError>;

    /// Destination, at switchover, before `load`: `Unchanged` means the prepared state
    /// stands and nothing must be redone; `Changed` carries the new early state to apply.
    fn finish(&mut self, outcome: EarlyOutcome<'_>) -> Result<(), DeviceMigrationError>;

    /// Destination, when the migration is cancelled or fails: drop the preparation.
    fn discard(&mut self) {}
}

/// What the source says of the early state at switchover.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EarlyOutcome<'a> {
    /// Byte-identical to what was sent during setup: keep the preparation.
    Unchanged,
    /// Differs: apply this state (written at `version_id`) instead.
    Changed { version_id: u32, state: &'a [u8] },
}

/// An fd a source device hands over, still owned by the device.
#[derive(Debug)]
pub struct HandoffFd<'a> {
    /// What the fd is (`tap-queue-0`, `vhost-user-socket`, `ram`): the destination looks
    /// fds up by role, never by position.
    pub role: String,
    pub fd: BorrowedFd<'a>,
}

/// What a source device hands over: fds with roles, and the metadata needed to adopt them
/// (vnet-header length, offload flags, negotiated features...), encoded with
/// [`BackendTransfer::metadata_vmsd`].
#[derive(Debug)]
pub struct BackendHandoff<'a> {
    pub fds: Vec<HandoffFd<'a>>,
    pub metadata: Vec<u8>,
}

/// What a destination device receives: the fds, now its own, and the metadata.
#[derive(Debug)]
pub struct ReceivedBackend {
    device: String,
    fds: Vec<(String, OwnedFd)>,
    metadata: Vec<u8>,
    metadata_version: u32,
}

impl ReceivedBackend {
    /// Built by the engine from what arrived on the channel.
    pub fn new(
        device: &str,
        fds: Vec<(String, OwnedFd)>,
        metadata: Vec<u8>,
        metadata_version: u32,
    ) -> Self {
        ReceivedBackend {
            device: device.to_owned(),
            fds,
            metadata,
            metadata_version,
        }
    }

    /// The metadata bytes and the version they were written at.
    pub fn metadata(&self) -> (u32, &[u8]) {
        (self.metadata_version, &self.metadata)
    }

    /// Roles received, in arrival order.
    pub fn roles(&self) -> impl Iterator<Item = &str> {
        self.fds.iter().map(|(r, _)| r.as_str())
    }

    /// Take the fd with `role`; an error names the role when it is missing.
    pub fn take(&mut self, role: &str) -> Result<OwnedFd, DeviceMigrationError> {
        let i = self
            .fds
            .iter()
            .position(|(r, _)| r == role)
            .ok_or_else(|| {
                DeviceMigrationError::fd(&self.device, Hook::BackendAdopt, role, "not received")
            })?;
        Ok(self.fds.remove(i).1)
    }

    /// Fails, naming the first one, when fds the device did not take are left over (they
    /// are closed when `self` drops).
    pub fn finish(self) -> Result<(), DeviceMigrationError> {
        match self.fds.first() {
            None => Ok(()),
            Some((role, _)) => Err(DeviceMigrationError::fd(
                &self.device,
                Hook::BackendAdopt,
                role,
                "unexpected fd",
            )),
        }
    }
}

/// Host resources handed to a new VMM process on the same host.
pub trait BackendTransfer {
    /// Whether this device hands its backend over (its resolved `backend-transfer`
    /// property). On the destination, `true` means the device was created in incoming
    /// mode and waits for fds; the handshake refuses a disagreement with the source.
    fn enabled(&self) -> bool;

    /// The schema of [`BackendHandoff::metadata`].
    fn metadata_vmsd(&self) -> &'static VmStateDescription;

    /// Source, at switchover, after `save`: stop using the backend (stop reading the TAP,
    /// stop the vhost-user rings...) and return borrowed fds with roles plus metadata. The
    /// device keeps every fd open and must not touch them again until `resume` or
    /// `release`. The engine sends them with SCM_RIGHTS in order with the stream.
    fn export(&mut self) -> Result<BackendHandoff<'_>, DeviceMigrationError>;

    /// Source, when the migration fails or is cancelled before the destination runs: take
    /// the backend back into use exactly as before `export`. Nothing may have been lost.
    fn resume(&mut self) -> Result<(), DeviceMigrationError>;

    /// Source, after the destination reported running: close the fds and forget them.
    fn release(&mut self);

    /// Destination, device created in incoming mode, before `load`: adopt the fds as they
    /// are, with no re-initialisation (no TUNSETIFF, no vnet-header reset, no fd flag
    /// change, no vhost-user reset). Check each fd is of the kind its role says before
    /// using it; refuse missing or extra fds (see [`ReceivedBackend::take`] and
    /// [`ReceivedBackend::finish`]).
    fn adopt(&mut self, received: ReceivedBackend) -> Result<(), DeviceMigrationError>;
}
