//! What a virtio device model implements: [`VirtioDevice`].
//!
//! The transport (here virtio-mmio) owns everything the specification makes common to all
//! devices: status, feature negotiation, queue configuration registers, interrupt status,
//! configuration generation, and their migration. A device model owns what is its own:
//! its type, the features it offers, its configuration space, its queues' contents and its
//! backend. The queues themselves (`virtio_queue::Queue`) live in the device, so the
//! device can process them from its own event sources (a TAP fd becoming readable) without
//! going through the transport; the transport configures them through
//! [`VirtioDevice::queues_mut`] before activation and reads them back to save state.
//!
//! The trait is generic over the guest memory type `M` (for example
//! `GuestMemoryMmap<()>`, or `GuestMemoryMmap<AtomicBitmap>` when the VMM tracks device
//! writes for dirty logging), so a device model is written once for both.

use std::io;

use virtio_queue::Queue;

use crate::interrupt::VirtioInterrupt;

/// Why a device could not activate or process a queue. The transport answers any of these
/// by setting `DEVICE_NEEDS_RESET`.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// A queue could not be used: a bad descriptor chain, an unreadable ring.
    #[error("queue {queue}: {source}")]
    Queue {
        queue: u16,
        #[source]
        source: virtio_queue::Error,
    },
    /// Guest memory named by a descriptor could not be accessed.
    #[error("queue {queue}: guest memory: {source}")]
    GuestMemory {
        queue: u16,
        #[source]
        source: vm_memory::GuestMemoryError,
    },
    /// A host operation failed (backend I/O, signalling the interrupt).
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
    /// Anything else, in the device's words.
    #[error("{0}")]
    Other(String),
}

/// A device's refusal of the feature set the driver chose (for example a feature that
/// requires another one the driver left out). The driver then sees `FEATURES_OK` cleared.
#[derive(Debug, thiserror::Error)]
#[error("features {features:#x} refused: {reason}")]
pub struct FeatureRefusal {
    pub features: u64,
    pub reason: String,
}

/// What a device receives when the driver sets `DRIVER_OK` (or when a saved running
/// device is restored).
#[derive(Debug)]
pub struct ActivateContext<M> {
    /// Guest memory, for `Queue::pop_descriptor_chain` and the buffers.
    pub mem: M,
    /// Raise used-buffer / configuration-change interrupts, or report a fatal error.
    pub interrupt: VirtioInterrupt,
    /// The features the driver accepted (also given to [`VirtioDevice::ack_features`]).
    pub acked_features: u64,
    /// `true` when the activation restores a migrated device: the queues carry their
    /// saved indices and the guest has already seen every interrupt. The device must not
    /// re-initialise a backend it adopted, and must neither touch guest memory nor signal
    /// until its first [`VirtioDevice::queue_notify`]: the VM is not running yet and, in a
    /// local live update, its RAM is still shared with a source that may resume. The VMM
    /// calls [`crate::MmioTransport::notify_all_queues`] when the restored VM starts, to
    /// catch up with buffers made available since the source's last notification.
    pub restored: bool,
}

/// A virtio device model behind a transport.
///
/// Calls happen from the VMM's MMIO dispatch (one at a time: the transport is `&mut`).
/// Nothing here may panic on guest-controlled data; return [`DeviceError`] instead and the
/// transport sets `DEVICE_NEEDS_RESET`.
pub trait VirtioDevice<M>: Send {
    /// The virtio device ID (1 = network, 2 = block, 4 = entropy, ...).
    fn device_type(&self) -> u32;

    /// The value of `VendorID`.
    fn vendor_id(&self) -> u32 {
        crate::regs::VENDOR_ID
    }

    /// The feature bits this device offers; constant for the device's lifetime. The
    /// transport adds `VIRTIO_F_VERSION_1` and removes transport features it cannot honour
    /// ([`crate::regs::features::UNSUPPORTED`]).
    fn device_features(&self) -> u64;

    /// The driver set `FEATURES_OK` with `features`, all of them offered. Refuse
    /// combinations the device cannot work with. Also called on restore when the saved
    /// status has `FEATURES_OK`.
    fn ack_features(&mut self, features: u64) -> Result<(), FeatureRefusal> {
        let _ = features;
        Ok(())
    }

    /// The device's queues, created with their maximum sizes (`Queue::new(max)`); their
    /// number is fixed for the device's lifetime.
    fn queues(&self) -> &[Queue];

    /// Mutable access for the transport: configuration before activation, reset, restore.
    fn queues_mut(&mut self) -> &mut [Queue];

    /// Read `data.len()` bytes of configuration space at `offset` (see
    /// [`read_config_bytes`]); bytes outside the space read as zero.
    fn read_config(&self, offset: u64, data: &mut [u8]);

    /// A driver write to configuration space at `offset`; ignore what is read-only or out
    /// of range (see [`write_config_bytes`]).
    fn write_config(&mut self, offset: u64, data: &[u8]);

    /// Start operating: the driver set `DRIVER_OK`, the queues marked ready have rings
    /// inside guest memory, and [`ActivateContext::acked_features`] is final. Unless
    /// [`ActivateContext::restored`], process any buffers already available (a driver may
    /// add them before `DRIVER_OK`).
    fn activate(&mut self, ctx: ActivateContext<M>) -> Result<(), DeviceError>;

    /// The driver notified `queue` (an index below `queues().len()`), through a
    /// `QueueNotify` write or the VMM's ioeventfd. Only called while active.
    fn queue_notify(&mut self, queue: u16) -> Result<(), DeviceError>;

    /// Stop operating and forget the activation (the driver wrote 0 to `Status`, or the
    /// device needs a reset): stop the backend's use of the queues and drop the memory and
    /// interrupt handles. The transport resets the queues afterwards.
    fn reset(&mut self);
}

/// Copy configuration bytes at `offset` into `data`; bytes past the end read as zero.
pub fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0);
    let Ok(start) = usize::try_from(offset) else {
        return;
    };
    if let Some(src) = config.get(start..) {
        let n = src.len().min(data.len());
        data[..n].copy_from_slice(&src[..n]);
    }
}

/// Copy `data` into configuration bytes at `offset` when it fits entirely; returns whether
/// it was written (a partly out-of-range write is ignored as a whole).
pub fn write_config_bytes(config: &mut [u8], offset: u64, data: &[u8]) -> bool {
    let Ok(start) = usize::try_from(offset) else {
        return false;
    };
    let Some(end) = start.checked_add(data.len()) else {
        return false;
    };
    match config.get_mut(start..end) {
        Some(dst) => {
            dst.copy_from_slice(data);
            true
        }
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_bytes_bounds() {
        let mut cfg = [1u8, 2, 3, 4];
        let mut d = [0xffu8; 4];
        read_config_bytes(&cfg, 2, &mut d);
        assert_eq!(d, [3, 4, 0, 0]);
        read_config_bytes(&cfg, u64::MAX, &mut d);
        assert_eq!(d, [0; 4]);
        assert!(!write_config_bytes(&mut cfg, 3, &[9, 9]));
        assert!(!write_config_bytes(&mut cfg, u64::MAX, &[9]));
        assert!(write_config_bytes(&mut cfg, 2, &[9, 9]));
        assert_eq!(cfg, [1, 2, 9, 9]);
    }
}
