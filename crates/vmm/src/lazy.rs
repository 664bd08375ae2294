//! [`LazyDevice`]: a destination device the migration engine can list before the VM
//! exists.
//!
//! On a local live update the destination VM is built around the source's RAM memfd,
//! which arrives after the handshake (see `live`), but the handshake already needs every
//! device's id, schemas and early-setup/backend-transfer wishes. Those depend only on the
//! device's type and resolved configuration, so a `LazyDevice` answers them from its
//! [`NetSpec`]; every hook that needs the device itself resolves it in the VM on first
//! use. The engine processes RAM_MEMFDS before any EARLY_STATE, BACKEND or DEVICE_STATE
//! section, so by then the VM, and its devices (attached when it was built), exist. Using
//! the same wrapper for remote and restore keeps one path for every destination.

use baton_qdev::{
    BackendHandoff, BackendTransfer, DeviceMigrationError, EarlyOutcome, EarlySetup, Hook,
    Migratable, ReceivedBackend,
};
use baton_virtio_net_tap::{NetEarly, NetState, TapMeta};
use baton_vmstate::{VmState as _, VmStateDescription};

use crate::devices::NetSpec;
use crate::live::VmSlot;

/// A destination virtio-net-tap, resolved in the VM of `slot` on first use.
pub struct LazyDevice {
    spec: NetSpec,
    slot: VmSlot,
    /// The engine's handle once resolved; kept, because a backend-transfer handle holds
    /// what it exported until `release`.
    device: Option<Box<dyn Migratable>>,
}

impl LazyDevice {
    /// `spec` must carry the destination's effective settings
    /// ([`crate::devices::DevicePlan::for_incoming`]).
    pub fn new(spec: NetSpec, slot: VmSlot) -> Self {
        LazyDevice {
            spec,
            slot,
            device: None,
        }
    }

    fn device(&mut self, hook: Hook) -> Result<&mut Box<dyn Migratable>, DeviceMigrationError> {
        if self.device.is_none() {
            let g = self.slot.lock();
            let vm = g.as_ref().ok_or_else(|| {
                DeviceMigrationError::refused(&self.spec.id, hook, "the VM does not exist yet")
            })?;
            let dev = vm
                .devices()
                .iter()
                .find(|d| d.id() == self.spec.id)
                .ok_or_else(|| {
                    DeviceMigrationError::refused(&self.spec.id, hook, "not attached to the VM")
                })?
                .migratable();
            self.device = Some(dev);
        }
        self.device.as_mut().ok_or_else(|| {
            DeviceMigrationError::refused(&self.spec.id, hook, "device not resolved")
        })
    }

    fn early(&mut self, hook: Hook) -> Result<&mut dyn EarlySetup, DeviceMigrationError> {
        let id = self.spec.id.clone();
        self.device(hook)?
            .early_setup()
            .ok_or_else(|| DeviceMigrationError::refused(&id, hook, "early setup is off"))
    }

    fn backend(&mut self, hook: Hook) -> Result<&mut dyn BackendTransfer, DeviceMigrationError> {
        let id = self.spec.id.clone();
        self.device(hook)?
            .backend_transfer()
            .ok_or_else(|| DeviceMigrationError::refused(&id, hook, "no backend transfer"))
    }
}

impl Migratable for LazyDevice {
    fn id(&self) -> &str {
        &self.spec.id
    }

    fn vmsd(&self) -> &'static VmStateDescription {
        NetState::vmsd()
    }

    fn save(&mut self) -> Result<Vec<u8>, DeviceMigrationError> {
        self.device(Hook::Save)?.save()
    }

    fn load(&mut self, version_id: u32, state: &[u8]) -> Result<(), DeviceMigrationError> {
        self.device(Hook::Load)?.load(version_id, state)
    }

    fn early_setup(&mut self) -> Option<&mut dyn EarlySetup> {
        if self.spec.config.early_setup {
            Some(self)
        } else {
            None
        }
    }

    fn backend_transfer(&mut self) -> Option<&mut dyn BackendTransfer> {
        Some(self)
    }
}

impl EarlySetup for LazyDevice {
    fn early_vmsd(&self) -> &'static VmStateDescription {
        NetEarly::vmsd()
    }

    fn save_early(&mut self) -> Result<Vec<u8>, DeviceMigrationError> {
        self.early(Hook::EarlySave)?.save_early()
    }

    fn prepare(&mut self, version_id: u32, state: &[u8]) -> Result<(), DeviceMigrationError> {
        self.early(Hook::EarlyPrepare)?.prepare(version_id, state)
    }

    fn finish(&mut self, outcome: EarlyOutcome<'_>) -> Result<(), DeviceMigrationError> {
        self.early(Hook::EarlyFinish)?.finish(outcome)
    }

    fn discard(&mut self) {
        // Nothing was prepared if the device was never resolved.
        if self.device.is_some() {
            if let Ok(e) = self.early(Hook::EarlyPrepare) {
                e.discard();
            }
        }
    }
}

impl BackendTransfer for LazyDevice {
    fn enabled(&self) -> bool {
        self.spec.config.backend_transfer
    }

    fn metadata_vmsd(&self) -> &'static VmStateDescription {
        TapMeta::vmsd()
    }

    fn export(&mut self) -> Result<BackendHandoff<'_>, DeviceMigrationError> {
        self.backend(Hook::BackendExport)?.export()
    }

    fn resume(&mut self) -> Result<(), DeviceMigrationError> {
        self.backend(Hook::BackendResume)?.resume()
    }

    fn release(&mut self) {
        if let Ok(b) = self.backend(Hook::BackendResume) {
            b.release();
        }
    }

    fn adopt(&mut self, received: ReceivedBackend) -> Result<(), DeviceMigrationError> {
        self.backend(Hook::BackendAdopt)?.adopt(received)
    }
}
