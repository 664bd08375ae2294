//! Interrupts from a virtio-mmio device to the guest.
//!
//! virtio-mmio has one interrupt line per device plus the `InterruptStatus` register that
//! says why it fired. The *line* belongs to the VMM (a KVM irqfd, or `KVM_IRQ_LINE` for a
//! level-triggered pin, or an `EventFd` in tests), so it is a small trait,
//! [`InterruptLine`]. The *status* belongs to the transport, but a device raises it from
//! wherever it completes requests (its own event loop, a backend thread), so both live in
//! [`VirtioInterrupt`], a cheap clonable handle shared by the transport and the device,
//! together with the configuration generation and the device's "needs reset" flag, which
//! are set from the same places.

use std::fmt;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;

use vmm_sys_util::eventfd::EventFd;

use crate::regs::interrupt::{ALL, CONFIG_CHANGE, USED_RING};

/// The VMM's side of a device's interrupt.
///
/// `trigger` is called every time an event is added to `InterruptStatus`, even when bits
/// were already set (an edge-triggered irqfd needs each one); `deassert` when the driver's
/// acknowledgement brings `InterruptStatus` back to zero, for level-triggered lines.
pub trait InterruptLine: Send + Sync {
    /// Raise the interrupt (inject an edge, or assert a level).
    fn trigger(&self) -> io::Result<()>;

    /// `InterruptStatus` became zero: lower a level-triggered line. The default does
    /// nothing, which is right for irqfds.
    fn deassert(&self) -> io::Result<()> {
        Ok(())
    }
}

/// An irqfd: the VMM registers the `EventFd` with `KVM_IRQFD`, tests read it.
impl InterruptLine for EventFd {
    fn trigger(&self) -> io::Result<()> {
        self.write(1)
    }
}

impl<T: InterruptLine + ?Sized> InterruptLine for Arc<T> {
    fn trigger(&self) -> io::Result<()> {
        (**self).trigger()
    }
    fn deassert(&self) -> io::Result<()> {
        (**self).deassert()
    }
}

struct Shared {
    status: AtomicU32,
    config_generation: AtomicU32,
    needs_reset: AtomicBool,
    line: Box<dyn InterruptLine>,
}

/// A handle that raises a device's interrupts and device-side status.
///
/// Cloned into the device at activation; every clone shares the same state.
#[derive(Clone)]
pub struct VirtioInterrupt {
    shared: Arc<Shared>,
}

impl fmt::Debug for VirtioInterrupt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VirtioInterrupt")
            .field("status", &self.status())
            .field("config_generation", &self.config_generation())
            .field("needs_reset", &self.needs_reset())
            .finish_non_exhaustive()
    }
}

impl VirtioInterrupt {
    /// A handle driving `line`, with no event pending.
    pub fn new(line: impl InterruptLine + 'static) -> Self {
        VirtioInterrupt {
            shared: Arc::new(Shared {
                status: AtomicU32::new(0),
                config_generation: AtomicU32::new(0),
                needs_reset: AtomicBool::new(false),
                line: Box::new(line),
            }),
        }
    }

    /// Tell the driver that some queue has new used buffers. A device with
    /// `VIRTIO_F_RING_EVENT_IDX` asks `Queue::needs_notification` first.
    pub fn signal_used_queue(&self) -> io::Result<()> {
        self.raise(USED_RING)
    }

    /// Tell the driver the configuration space changed; the configuration generation moves
    /// first so a driver reading the space sees the change.
    pub fn signal_config_change(&self) -> io::Result<()> {
        self.shared.config_generation.fetch_add(1, Ordering::AcqRel);
        self.raise(CONFIG_CHANGE)
    }

    /// The device hit an error it cannot recover from (virtio 1.2 §2.1.2): sets
    /// `DEVICE_NEEDS_RESET` in `Status`. The caller must stop using its queues. The
    /// transport sends the configuration change notification the specification requires
    /// when `DRIVER_OK` is set.
    pub fn set_needs_reset(&self) {
        self.shared.needs_reset.store(true, Ordering::Release);
    }

    /// Whether `DEVICE_NEEDS_RESET` is set.
    pub fn needs_reset(&self) -> bool {
        self.shared.needs_reset.load(Ordering::Acquire)
    }

    /// The current `InterruptStatus`.
    pub fn status(&self) -> u32 {
        self.shared.status.load(Ordering::Acquire)
    }

    /// The current `ConfigGeneration`.
    pub fn config_generation(&self) -> u32 {
        self.shared.config_generation.load(Ordering::Acquire)
    }

    fn raise(&self, bit: u32) -> io::Result<()> {
        self.shared.status.fetch_or(bit, Ordering::AcqRel);
        self.shared.line.trigger()
    }

    /// `InterruptACK`: clear the acknowledged bits; lower the line when none is left.
    pub(crate) fn acknowledge(&self, bits: u32) {
        let old = self
            .shared
            .status
            .fetch_and(!(bits & ALL), Ordering::AcqRel);
        if old != 0 && old & !bits == 0 {
            if let Err(e) = self.shared.line.deassert() {
                tracing::warn!("virtio-mmio: cannot lower the interrupt line: {e}");
            }
        }
    }

    /// Device reset: no event pending, no reset needed. The generation is kept, so a
    /// driver never sees an old generation come back.
    pub(crate) fn reset(&self) {
        let old = self.shared.status.swap(0, Ordering::AcqRel);
        self.shared.needs_reset.store(false, Ordering::Release);
        if old != 0 {
            if let Err(e) = self.shared.line.deassert() {
                tracing::warn!("virtio-mmio: cannot lower the interrupt line: {e}");
            }
        }
    }

    /// Restore: put saved values back without touching the line (the interrupt
    /// controller's own state, migrated separately, already holds what was pending).
    pub(crate) fn restore(&self, status: u32, config_generation: u32, needs_reset: bool) {
        self.shared.status.store(status & ALL, Ordering::Release);
        self.shared
            .config_generation
            .store(config_generation, Ordering::Release);
        self.shared
            .needs_reset
            .store(needs_reset, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    #[test]
    fn raise_ack_and_generation() {
        let fd = Arc::new(EventFd::new(EFD_NONBLOCK).unwrap());
        let irq = VirtioInterrupt::new(fd.clone());
        irq.signal_used_queue().unwrap();
        irq.signal_config_change().unwrap();
        assert_eq!(irq.status(), USED_RING | CONFIG_CHANGE);
        assert_eq!(irq.config_generation(), 1);
        assert_eq!(fd.read().unwrap(), 2);
        irq.acknowledge(USED_RING);
        assert_eq!(irq.status(), CONFIG_CHANGE);
        irq.acknowledge(0xffff_ffff);
        assert_eq!(irq.status(), 0);
        irq.restore(0xff, 7, true);
        assert_eq!((irq.status(), irq.config_generation()), (ALL, 7));
        assert!(fd.read().is_err(), "restore must not signal");
        irq.reset();
        assert_eq!((irq.status(), irq.needs_reset()), (0, false));
        assert_eq!(irq.config_generation(), 7);
    }
}
