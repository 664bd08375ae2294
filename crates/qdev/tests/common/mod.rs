//! A small device that implements all three `Migratable` hooks, for tests that need no KVM.
//!
//! Its backend is a memfd (a real host resource) into which the running device writes its
//! counter; its early state is a ring size whose "preparation" the destination counts.

#![allow(dead_code)]

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::{AsFd, OwnedFd};

use baton_qdev::{
    BackendHandoff, BackendTransfer, DeviceMigrationError, EarlyOutcome, EarlySetup, HandoffFd,
    Hook, Migratable, ReceivedBackend,
};
use baton_vmstate::{VmState, VmStateDescription, VmStateError};

#[derive(VmState, Debug, Default, Clone, PartialEq)]
#[vmstate(name = "test-counter", version = 1, validate = check_state)]
pub struct CounterState {
    pub counter: u64,
    pub ring_size: u32,
}

fn check_ring_size(ring_size: u32) -> Result<(), VmStateError> {
    if !ring_size.is_power_of_two() || ring_size > 4096 {
        return Err(VmStateError::invalid(
            "ring_size",
            format!("{ring_size} is not a power of two up to 4096"),
        ));
    }
    Ok(())
}

fn check_state(s: &CounterState) -> Result<(), VmStateError> {
    check_ring_size(s.ring_size)
}

fn check_early(s: &CounterEarly) -> Result<(), VmStateError> {
    check_ring_size(s.ring_size)
}

#[derive(VmState, Debug, Default, Clone, PartialEq)]
#[vmstate(name = "test-counter/early", version = 1, early_setup, validate = check_early)]
pub struct CounterEarly {
    pub ring_size: u32,
}

#[derive(VmState, Debug, Default, Clone, PartialEq)]
#[vmstate(name = "test-counter/backend", version = 1)]
pub struct CounterBackendMeta {
    pub len: u64,
}

/// Where the device's memfd is.
#[derive(Debug)]
pub enum Backend {
    /// In use: `tick` writes into it.
    Active(File),
    /// Handed over: still open, never touched.
    Exported(File),
    /// Closed after the destination ran.
    Released,
    /// Destination side, waiting for an fd.
    Incoming,
}

#[derive(Debug)]
pub struct CounterDevice {
    pub id: String,
    pub counter: u64,
    pub ring_size: u32,
    pub backend: Backend,
    pub backend_transfer: bool,
    /// Destination: how many times the expensive preparation ran.
    pub preparations: u32,
    pub prepared_ring: Option<Vec<u64>>,
}

pub const MEMFD_LEN: u64 = 4096;

impl CounterDevice {
    pub fn new_source(id: &str, ring_size: u32) -> Self {
        let fd = memfd("test-counter");
        let f = File::from(fd);
        f.set_len(MEMFD_LEN).expect("memfd size");
        CounterDevice {
            id: id.into(),
            counter: 0,
            ring_size,
            backend: Backend::Active(f),
            backend_transfer: true,
            preparations: 0,
            prepared_ring: None,
        }
    }

    pub fn new_incoming(id: &str) -> Self {
        CounterDevice {
            id: id.into(),
            counter: 0,
            ring_size: 1,
            backend: Backend::Incoming,
            backend_transfer: true,
            preparations: 0,
            prepared_ring: None,
        }
    }

    /// The device's "work": count, and write the count into the backend.
    pub fn tick(&mut self) -> std::io::Result<()> {
        let Backend::Active(f) = &mut self.backend else {
            return Err(std::io::Error::other("backend not active"));
        };
        self.counter += 1;
        f.seek(SeekFrom::Start(0))?;
        f.write_all(&self.counter.to_le_bytes())
    }

    /// What the backend holds at offset 0.
    pub fn backend_value(&self) -> Option<u64> {
        let f = match &self.backend {
            Backend::Active(f) | Backend::Exported(f) => f,
            _ => return None,
        };
        Some(read_counter(f))
    }

    fn err(&self, hook: Hook, e: VmStateError) -> DeviceMigrationError {
        DeviceMigrationError::state(&self.id, hook, e)
    }

    fn prepare_ring(&mut self, ring_size: u32) {
        self.ring_size = ring_size;
        self.prepared_ring = Some(vec![0; ring_size as usize]);
        self.preparations += 1;
    }
}

pub fn memfd(name: &str) -> OwnedFd {
    nix::sys::memfd::memfd_create(name, nix::sys::memfd::MFdFlags::MFD_CLOEXEC)
        .expect("memfd_create")
}

pub fn read_counter(mut f: &File) -> u64 {
    let mut b = [0u8; 8];
    f.seek(SeekFrom::Start(0)).expect("seek");
    f.read_exact(&mut b).expect("read");
    u64::from_le_bytes(b)
}

impl Migratable for CounterDevice {
    fn id(&self) -> &str {
        &self.id
    }
    fn vmsd(&self) -> &'static VmStateDescription {
        CounterState::vmsd()
    }
    fn save(&mut self) -> Result<Vec<u8>, DeviceMigrationError> {
        Ok(CounterState {
            counter: self.counter,
            ring_size: self.ring_size,
        }
        .save())
    }
    fn load(&mut self, version_id: u32, state: &[u8]) -> Result<(), DeviceMigrationError> {
        let s = CounterState::load(state, version_id).map_err(|e| self.err(Hook::Load, e))?;
        if self.prepared_ring.is_some() && s.ring_size != self.ring_size {
            return Err(DeviceMigrationError::refused(
                &self.id,
                Hook::Load,
                format!(
                    "ring_size {} differs from the early state's {}",
                    s.ring_size, self.ring_size
                ),
            ));
        }
        self.counter = s.counter;
        self.ring_size = s.ring_size;
        Ok(())
    }
    fn early_setup(&mut self) -> Option<&mut dyn EarlySetup> {
        Some(self)
    }
    fn backend_transfer(&mut self) -> Option<&mut dyn BackendTransfer> {
        Some(self)
    }
}

impl EarlySetup for CounterDevice {
    fn early_vmsd(&self) -> &'static VmStateDescription {
        CounterEarly::vmsd()
    }
    fn save_early(&mut self) -> Result<Vec<u8>, DeviceMigrationError> {
        Ok(CounterEarly {
            ring_size: self.ring_size,
        }
        .save())
    }
    fn prepare(&mut self, version_id: u32, state: &[u8]) -> Result<(), DeviceMigrationError> {
        let e =
            CounterEarly::load(state, version_id).map_err(|e| self.err(Hook::EarlyPrepare, e))?;
        self.prepare_ring(e.ring_size);
        Ok(())
    }
    fn finish(&mut self, outcome: EarlyOutcome<'_>) -> Result<(), DeviceMigrationError> {
        match outcome {
            EarlyOutcome::Unchanged => Ok(()),
            EarlyOutcome::Changed { version_id, state } => {
                let e = CounterEarly::load(state, version_id)
                    .map_err(|e| self.err(Hook::EarlyFinish, e))?;
                self.prepare_ring(e.ring_size);
                Ok(())
            }
        }
    }
    fn discard(&mut self) {
        self.prepared_ring = None;
    }
}

impl BackendTransfer for CounterDevice {
    fn enabled(&self) -> bool {
        self.backend_transfer
    }
    fn metadata_vmsd(&self) -> &'static VmStateDescription {
        CounterBackendMeta::vmsd()
    }
    fn export(&mut self) -> Result<BackendHandoff<'_>, DeviceMigrationError> {
        let backend = std::mem::replace(&mut self.backend, Backend::Released);
        let f = match backend {
            Backend::Active(f) => f,
            other => {
                let state = format!("{other:?}");
                self.backend = other;
                return Err(DeviceMigrationError::refused(
                    &self.id,
                    Hook::BackendExport,
                    format!("backend is not active ({state})"),
                ));
            }
        };
        let len = f
            .metadata()
            .map_err(|e| DeviceMigrationError::io(&self.id, Hook::BackendExport, "fstat", e))?
            .len();
        self.backend = Backend::Exported(f);
        let Backend::Exported(f) = &self.backend else {
            unreachable!("just set")
        };
        Ok(BackendHandoff {
            fds: vec![HandoffFd {
                role: "counter-memfd".into(),
                fd: f.as_fd(),
            }],
            metadata: CounterBackendMeta { len }.save(),
        })
    }
    fn resume(&mut self) -> Result<(), DeviceMigrationError> {
        match std::mem::replace(&mut self.backend, Backend::Released) {
            Backend::Exported(f) | Backend::Active(f) => {
                self.backend = Backend::Active(f);
                Ok(())
            }
            other => {
                self.backend = other;
                Err(DeviceMigrationError::refused(
                    &self.id,
                    Hook::BackendResume,
                    "backend was already released",
                ))
            }
        }
    }
    fn release(&mut self) {
        self.backend = Backend::Released;
    }
    fn adopt(&mut self, mut received: ReceivedBackend) -> Result<(), DeviceMigrationError> {
        let (version, meta) = received.metadata();
        let meta =
            CounterBackendMeta::load(meta, version).map_err(|e| self.err(Hook::BackendAdopt, e))?;
        let fd = received.take("counter-memfd")?;
        received.finish()?;
        let f = File::from(fd);
        let st = f
            .metadata()
            .map_err(|e| DeviceMigrationError::io(&self.id, Hook::BackendAdopt, "fstat", e))?;
        if !st.file_type().is_file() || st.len() != meta.len {
            return Err(DeviceMigrationError::fd(
                &self.id,
                Hook::BackendAdopt,
                "counter-memfd",
                format!(
                    "expected a {}-byte memfd, got a {:?} of {} bytes",
                    meta.len,
                    st.file_type(),
                    st.len()
                ),
            ));
        }
        self.backend = Backend::Active(f);
        Ok(())
    }
}
