//! Saving and restoring a transport, and the helpers a device crate's `Migratable` uses.
//!
//! A device crate keeps its own state struct and embeds [`VirtioMmioState`] in it:
//!
//! ```text
//! #[derive(VmState)]
//! #[vmstate(name = "virtio-net", version = 1)]
//! struct NetState { virtio: VirtioMmioState, mac: [u8; 6] }
//!
//! fn save(&mut self) -> Result<Vec<u8>, DeviceMigrationError> {
//!     // quiesced: no request in flight in the backend, queues up to date
//!     Ok(NetState { virtio: self.transport.save_state(), mac: self.mac }.save())
//! }
//! fn load(&mut self, v: u32, bytes: &[u8]) -> Result<(), DeviceMigrationError> {
//!     let s = NetState::load(bytes, v)
//!         .map_err(|e| DeviceMigrationError::state(&self.id, Hook::Load, e))?;
//!     self.mac = s.mac;                       // the device's own state first,
//!     self.transport.restore_state(&s.virtio) // then the transport, which activates
//!         .map_err(|e| e.into_migration_error(&self.id, "virtio"))
//! }
//! ```
//!
//! Restoring re-creates each queue from its saved indices (no queue reset, nothing
//! re-read from the rings) and, when the saved device was running, activates the device
//! with [`crate::ActivateContext::restored`] set. It raises no interrupt: whatever was
//! pending is in the saved `InterruptStatus` and in the interrupt controller's own state.
//! It does not touch guest memory either (in a local live update the RAM is shared with a
//! source that resumes if the migration fails); when the restored VM starts, the VMM calls
//! [`MmioTransport::notify_all_queues`] to catch up with buffers made available since the
//! source last processed a notification.

use baton_qdev::{DeviceMigrationError, Hook};
use baton_vmstate::VmStateError;
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryBackend;

use crate::device::{ActivateContext, DeviceError, FeatureRefusal, VirtioDevice};
use crate::mmio::MmioTransport;
use crate::regs::status as st;
use crate::state::{reason, MemoryMap, VirtioMmioState, VirtqueueState};

/// Why a restore failed.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    /// The state is hostile or does not fit this device; the error names the path.
    #[error(transparent)]
    State(#[from] VmStateError),
    /// The device refused the saved negotiated features.
    #[error("restoring features: {0}")]
    Features(#[source] FeatureRefusal),
    /// The device could not be activated with the restored queues.
    #[error("re-activating the device: {0}")]
    Activate(#[source] DeviceError),
}

impl RestoreError {
    /// The error a `Migratable::load` returns, with state paths prefixed by `field` (the
    /// name of the `VirtioMmioState` field in the device's state struct).
    pub fn into_migration_error(self, device_id: &str, field: &str) -> DeviceMigrationError {
        match self {
            RestoreError::State(e) => {
                let e = if field.is_empty() {
                    e
                } else {
                    e.in_field(field)
                };
                DeviceMigrationError::state(device_id, Hook::Load, e)
            }
            other => DeviceMigrationError::refused(device_id, Hook::Load, other.to_string()),
        }
    }
}

impl<M, D> MmioTransport<M, D>
where
    M: GuestMemoryBackend + Clone + Send,
    D: VirtioDevice<M>,
{
    /// The transport's state for migration. Call with the device quiesced, its queues'
    /// indices up to date (a device whose rings a backend processes brings them up to
    /// date first).
    pub fn save_state(&self) -> VirtioMmioState {
        VirtioMmioState {
            device_type: self.device.device_type(),
            status: self.status() as u8,
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            device_features: self.offered,
            driver_features: self.driver_features,
            queue_sel: self.queue_sel,
            interrupt_status: self.interrupt.status() as u8,
            config_generation: self.interrupt.config_generation(),
            queues: self
                .device
                .queues()
                .iter()
                .map(|q| VirtqueueState::from(q.state()))
                .collect(),
        }
    }

    /// Check `state` (already checked on its own by the codec) against this transport:
    /// the device type, the number of queues and their maximum sizes, the features this
    /// device offers, and the rings of a running device against guest memory.
    pub fn check_state(&self, state: &VirtioMmioState) -> Result<(), VmStateError> {
        let device_type = self.device.device_type();
        if state.device_type != device_type {
            return Err(VmStateError::invalid(
                "device_type",
                format!(
                    "{} in the state, this device is {device_type}",
                    state.device_type
                ),
            ));
        }
        let queues = self.device.queues();
        if state.queues.len() != queues.len() {
            return Err(VmStateError::invalid(
                "queues",
                format!(
                    "{} queues in the state, this device has {}",
                    state.queues.len(),
                    queues.len()
                ),
            ));
        }
        let features_ok = u32::from(state.status) & st::FEATURES_OK != 0;
        let unoffered = state.driver_features & !self.offered;
        if features_ok && unoffered != 0 {
            return Err(VmStateError::invalid(
                "driver_features",
                format!(
                    "{:#x} not offered by the device (offered {:#x})",
                    state.driver_features, self.offered
                ),
            ));
        }
        let map = state.is_active().then(|| MemoryMap::of(&self.mem));
        for (i, (s, q)) in state.queues.iter().zip(queues).enumerate() {
            let at = |field: &str| format!("queues[{i}].{field}");
            if s.size > q.max_size() {
                return Err(VmStateError::invalid(
                    &at("size"),
                    format!("{} exceeds max {}", s.size, q.max_size()),
                ));
            }
            if let Some(map) = &map {
                s.check_rings(map)
                    .map_err(|e| VmStateError::invalid(&at(&e.path_string()), reason(&e)))?;
            }
        }
        Ok(())
    }

    /// Restore `state` into this transport (normally a fresh one on the destination):
    /// checks it ([`VirtioMmioState::check`], [`Self::check_state`]), re-creates the
    /// queues with their indices, puts registers and interrupt status back without
    /// signalling, tells the device the negotiated features, and re-activates a device
    /// that was running. On error the transport must be discarded or reset.
    pub fn restore_state(&mut self, state: &VirtioMmioState) -> Result<(), RestoreError> {
        state.check()?;
        self.check_state(state)?;
        let queues = state
            .queues
            .iter()
            .zip(self.device.queues())
            .enumerate()
            .map(|(i, (s, q))| {
                s.to_queue(q.max_size())
                    .map_err(|e| e.in_index(i).in_field("queues"))
            })
            .collect::<Result<Vec<Queue>, _>>()?;

        if self.active {
            self.active = false;
            self.device.reset();
        }
        for (dst, q) in self.device.queues_mut().iter_mut().zip(queues) {
            *dst = q;
        }
        let status = u32::from(state.status);
        self.status = status & !st::DEVICE_NEEDS_RESET;
        self.device_features_sel = state.device_features_sel;
        self.driver_features_sel = state.driver_features_sel;
        self.driver_features = state.driver_features;
        self.queue_sel = state.queue_sel;
        self.interrupt.restore(
            state.interrupt_status.into(),
            state.config_generation,
            status & st::DEVICE_NEEDS_RESET != 0,
        );
        if status & st::FEATURES_OK != 0 {
            self.device
                .ack_features(state.driver_features)
                .map_err(RestoreError::Features)?;
        }
        if state.is_active() {
            let ctx = ActivateContext {
                mem: self.mem.clone(),
                interrupt: self.interrupt.clone(),
                acked_features: state.driver_features,
                restored: true,
            };
            self.device.activate(ctx).map_err(RestoreError::Activate)?;
            self.active = true;
        }
        if state.device_features != self.offered {
            tracing::info!(
                "virtio-mmio: restored device offers {:#x}, the source offered {:#x}",
                self.offered,
                state.device_features
            );
        }
        Ok(())
    }
}
