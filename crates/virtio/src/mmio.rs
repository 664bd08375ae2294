//! The virtio-mmio (version 2) transport: the register block a guest driver programs.
//!
//! [`MmioTransport`] sits on the VMM's MMIO bus at one window per device and turns
//! register accesses into the common virtio state machine (virtio 1.2 §3.1 and §4.2):
//! status, feature negotiation, queue configuration, interrupt status, configuration
//! generation. Everything it reads is guest input: a bad offset, width, queue index,
//! feature or address is logged and ignored, or answered with `DEVICE_NEEDS_RESET` where
//! the device cannot carry on; nothing panics.
//!
//! Notifications arrive as `QueueNotify` writes, or, faster, through ioeventfds the VMM
//! registers at the addresses [`MmioTransport::notify_registrations`] gives, after which
//! the VMM's event loop calls [`MmioTransport::notify_queue`].

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryBackend;

use crate::device::{ActivateContext, VirtioDevice};
use crate::interrupt::{InterruptLine, VirtioInterrupt};
use crate::regs::{self, features, status as st, MAX_QUEUES, MAX_QUEUE_SIZE};
use crate::state::MemoryMap;

/// Why a device cannot be put behind a transport (a VMM configuration error, not guest
/// input).
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("virtio device type {device_type}: it has no queues")]
    NoQueues { device_type: u32 },
    #[error("virtio device type {device_type}: {count} queues exceed the maximum {max}")]
    TooManyQueues {
        device_type: u32,
        count: usize,
        max: usize,
    },
    #[error("virtio device type {device_type}: queue {index}: maximum size {max_size} is not a power of two in 1..=32768")]
    InvalidQueueMax {
        device_type: u32,
        index: usize,
        max_size: u16,
    },
}

/// Where a VMM registers an ioeventfd for one queue: a 4-byte write of `datamatch` (the
/// queue index) at `addr`, after which it calls [`MmioTransport::notify_queue`]`(queue)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NotifyRegistration {
    pub queue: u16,
    pub addr: u64,
    pub len: u32,
    pub datamatch: u32,
}

/// One virtio device behind a virtio-mmio register window.
#[derive(Debug)]
pub struct MmioTransport<M, D> {
    pub(crate) device: D,
    pub(crate) mem: M,
    pub(crate) interrupt: VirtioInterrupt,
    /// Features offered to the driver: the device's, plus VERSION_1, minus unsupported.
    pub(crate) offered: u64,
    /// Driver-written status bits; `DEVICE_NEEDS_RESET` lives in `interrupt`.
    pub(crate) status: u32,
    /// The device was activated and not reset since.
    pub(crate) active: bool,
    pub(crate) device_features_sel: u32,
    pub(crate) driver_features_sel: u32,
    pub(crate) driver_features: u64,
    pub(crate) queue_sel: u32,
}

/// Which ring address register pair a write goes to.
#[derive(Clone, Copy, Debug)]
enum Ring {
    Desc,
    Driver,
    Device,
}

impl<M, D> MmioTransport<M, D>
where
    M: GuestMemoryBackend + Clone + Send,
    D: VirtioDevice<M>,
{
    /// Put `device` behind a register window; `mem` is the guest memory its rings live in
    /// and `line` the VMM's interrupt line for this window.
    pub fn new(
        device: D,
        mem: M,
        line: impl InterruptLine + 'static,
    ) -> Result<Self, TransportError> {
        let device_type = device.device_type();
        let queues = device.queues();
        if queues.is_empty() {
            return Err(TransportError::NoQueues { device_type });
        }
        if queues.len() > MAX_QUEUES {
            return Err(TransportError::TooManyQueues {
                device_type,
                count: queues.len(),
                max: MAX_QUEUES,
            });
        }
        if let Some((index, q)) = queues
            .iter()
            .enumerate()
            .find(|(_, q)| !valid_queue_size(q.max_size(), MAX_QUEUE_SIZE))
        {
            return Err(TransportError::InvalidQueueMax {
                device_type,
                index,
                max_size: q.max_size(),
            });
        }
        let offered = (device.device_features() | features::VERSION_1) & !features::UNSUPPORTED;
        Ok(MmioTransport {
            device,
            mem,
            interrupt: VirtioInterrupt::new(line),
            offered,
            status: 0,
            active: false,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            queue_sel: 0,
        })
    }

    /// The device model.
    pub fn device(&self) -> &D {
        &self.device
    }

    /// The device, for its own event sources (backend readiness) and configuration. Do not
    /// reconfigure its queues behind the transport's back.
    pub fn device_mut(&mut self) -> &mut D {
        &mut self.device
    }

    /// The interrupt handle (the device gets a clone at activation).
    pub fn interrupt(&self) -> &VirtioInterrupt {
        &self.interrupt
    }

    /// The `Status` register as the driver reads it.
    pub fn status(&self) -> u32 {
        let needs_reset = if self.interrupt.needs_reset() {
            st::DEVICE_NEEDS_RESET
        } else {
            0
        };
        self.status | needs_reset
    }

    /// Whether the device is operating (activated, not failed, not needing a reset).
    pub fn is_active(&self) -> bool {
        self.active
    }

    /// The features offered to the driver.
    pub fn offered_features(&self) -> u64 {
        self.offered
    }

    /// The features the driver wrote (final once `FEATURES_OK` is set).
    pub fn driver_features(&self) -> u64 {
        self.driver_features
    }

    /// ioeventfd registrations for every queue, for a window mapped at `mmio_base`.
    pub fn notify_registrations(&self, mmio_base: u64) -> Vec<NotifyRegistration> {
        (0..self.device.queues().len())
            .map(|q| NotifyRegistration {
                queue: q as u16,
                addr: mmio_base.wrapping_add(regs::QUEUE_NOTIFY),
                len: 4,
                datamatch: q as u32,
            })
            .collect()
    }

    /// A driver notification for `queue` (from a `QueueNotify` write or an ioeventfd).
    /// Ignored unless the device is active and the queue exists and is ready; a device
    /// error sets `DEVICE_NEEDS_RESET`.
    pub fn notify_queue(&mut self, queue: u16) {
        self.sync_needs_reset();
        if !self.active {
            tracing::debug!("virtio-mmio: notify of queue {queue} while inactive, ignored");
            return;
        }
        match self.device.queues().get(usize::from(queue)) {
            Some(q) if q.ready() => {}
            Some(_) => {
                tracing::debug!("virtio-mmio: notify of queue {queue}: not ready, ignored");
                return;
            }
            None => {
                tracing::debug!("virtio-mmio: notify of queue {queue}: no such queue, ignored");
                return;
            }
        }
        if let Err(e) = self.device.queue_notify(queue) {
            self.device_error(&format!("queue notify: {e}"));
        }
    }

    /// Notify every ready queue, as if the driver had: the VMM calls this when a restored
    /// VM starts running, so buffers the driver made available after the source's last
    /// processed notification (or whose notification was lost in flight) are seen.
    pub fn notify_all_queues(&mut self) {
        let ready: Vec<u16> = (self.device.queues().iter().enumerate())
            .filter(|(_, q)| q.ready())
            .map(|(i, _)| i as u16)
            .collect();
        for q in ready {
            self.notify_queue(q);
        }
    }

    /// A guest read of `data.len()` bytes at `offset` in the window.
    pub fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= regs::CONFIG {
            data.fill(0);
            if matches!(data.len(), 1 | 2 | 4 | 8) {
                self.device.read_config(offset - regs::CONFIG, data);
            } else {
                tracing::debug!("virtio-mmio: config read of {} bytes ignored", data.len());
            }
            return;
        }
        let Ok(out) = <&mut [u8; 4]>::try_from(&mut *data) else {
            tracing::debug!(
                "virtio-mmio: {}-byte read at {offset:#x} ignored",
                data.len()
            );
            data.fill(0);
            return;
        };
        let v = self.read_register(offset);
        *out = v.to_le_bytes();
    }

    fn read_register(&mut self, offset: u64) -> u32 {
        match offset {
            regs::MAGIC => regs::MAGIC_VALUE,
            regs::VERSION => regs::MMIO_VERSION,
            regs::DEVICE_ID => self.device.device_type(),
            regs::VENDOR => self.device.vendor_id(),
            regs::DEVICE_FEATURES => match self.device_features_sel {
                0 => self.offered as u32,
                1 => (self.offered >> 32) as u32,
                _ => 0,
            },
            regs::QUEUE_NUM_MAX => self.selected_queue().map_or(0, |q| q.max_size().into()),
            regs::QUEUE_READY => self.selected_queue().map_or(0, |q| q.ready().into()),
            regs::INTERRUPT_STATUS => self.interrupt.status(),
            regs::STATUS => {
                self.sync_needs_reset();
                self.status()
            }
            // No shared memory regions: a length of -1 says so.
            regs::SHM_LEN_LOW | regs::SHM_LEN_HIGH => u32::MAX,
            regs::CONFIG_GENERATION => self.interrupt.config_generation(),
            _ => {
                tracing::debug!("virtio-mmio: read of write-only or unknown register {offset:#x}");
                0
            }
        }
    }

    /// A guest write of `data` at `offset` in the window.
    pub fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= regs::CONFIG {
            if matches!(data.len(), 1 | 2 | 4 | 8) {
                self.device.write_config(offset - regs::CONFIG, data);
            } else {
                tracing::debug!("virtio-mmio: config write of {} bytes ignored", data.len());
            }
            return;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            tracing::debug!(
                "virtio-mmio: {}-byte write at {offset:#x} ignored",
                data.len()
            );
            return;
        };
        if offset % 4 != 0 {
            tracing::debug!("virtio-mmio: unaligned write at {offset:#x} ignored");
            return;
        }
        let v = u32::from_le_bytes(bytes);
        match offset {
            regs::DEVICE_FEATURES_SEL => self.device_features_sel = v,
            regs::DRIVER_FEATURES_SEL => self.driver_features_sel = v,
            regs::DRIVER_FEATURES => self.write_driver_features(v),
            regs::QUEUE_SEL => self.queue_sel = v,
            regs::QUEUE_NUM => self.write_queue_num(v),
            regs::QUEUE_READY => self.write_queue_ready(v),
            regs::QUEUE_NOTIFY => match u16::try_from(v) {
                Ok(q) => self.notify_queue(q),
                Err(_) => tracing::debug!("virtio-mmio: notify of queue {v}: no such queue"),
            },
            regs::INTERRUPT_ACK => self.interrupt.acknowledge(v),
            regs::STATUS => self.write_status(v),
            regs::QUEUE_DESC_LOW => self.write_ring(Ring::Desc, false, v),
            regs::QUEUE_DESC_HIGH => self.write_ring(Ring::Desc, true, v),
            regs::QUEUE_DRIVER_LOW => self.write_ring(Ring::Driver, false, v),
            regs::QUEUE_DRIVER_HIGH => self.write_ring(Ring::Driver, true, v),
            regs::QUEUE_DEVICE_LOW => self.write_ring(Ring::Device, false, v),
            regs::QUEUE_DEVICE_HIGH => self.write_ring(Ring::Device, true, v),
            // No shared memory regions to select.
            regs::SHM_SEL => {}
            _ => tracing::debug!("virtio-mmio: write to read-only or unknown register {offset:#x}"),
        }
    }

    fn selected_queue(&self) -> Option<&Queue> {
        let i = usize::try_from(self.queue_sel).ok()?;
        self.device.queues().get(i)
    }

    /// A device-side `DEVICE_NEEDS_RESET` (set through the interrupt handle) also ends the
    /// activation, so the transport stops forwarding notifications.
    fn sync_needs_reset(&mut self) {
        if self.active && self.interrupt.needs_reset() {
            self.active = false;
            self.device.reset();
        }
    }

    /// The device cannot go on: set `DEVICE_NEEDS_RESET`, stop the device, and tell a
    /// driver that already set `DRIVER_OK` (virtio 1.2 §2.1.2).
    pub(crate) fn device_error(&mut self, why: &str) {
        tracing::warn!(
            "virtio-mmio: device type {} needs reset: {why}",
            self.device.device_type()
        );
        self.interrupt.set_needs_reset();
        if self.active {
            self.active = false;
            self.device.reset();
        }
        if self.status & st::DRIVER_OK != 0 {
            if let Err(e) = self.interrupt.signal_config_change() {
                tracing::warn!("virtio-mmio: cannot signal the driver: {e}");
            }
        }
    }

    fn write_driver_features(&mut self, v: u32) {
        let s = self.status();
        if s & st::DRIVER == 0 || s & (st::FEATURES_OK | st::FAILED) != 0 {
            tracing::debug!("virtio-mmio: DriverFeatures write with status {s:#x} ignored");
            return;
        }
        match self.driver_features_sel {
            0 => self.driver_features = (self.driver_features & !0xffff_ffff) | u64::from(v),
            1 => self.driver_features = (self.driver_features & 0xffff_ffff) | (u64::from(v) << 32),
            sel => tracing::debug!("virtio-mmio: DriverFeatures word {sel} ({v:#x}) ignored"),
        }
    }

    /// The selected queue (and its index) if its configuration may be written now:
    /// after `FEATURES_OK`, before `DRIVER_OK`, and (except `QueueReady`) while not ready.
    fn configurable_queue(&mut self, reg: &str) -> Option<(usize, &mut Queue)> {
        let s = self.status();
        if s & st::FEATURES_OK == 0 || s & (st::DRIVER_OK | st::FAILED) != 0 {
            tracing::debug!("virtio-mmio: {reg} write with status {s:#x} ignored");
            return None;
        }
        let sel = self.queue_sel;
        let found = usize::try_from(sel)
            .ok()
            .and_then(|i| Some((i, self.device.queues_mut().get_mut(i)?)));
        let Some((i, q)) = found else {
            tracing::debug!("virtio-mmio: {reg} write for missing queue {sel}");
            return None;
        };
        if reg != "QueueReady" && q.ready() {
            tracing::debug!("virtio-mmio: {reg} write to ready queue {sel} ignored");
            return None;
        }
        Some((i, q))
    }

    fn write_queue_num(&mut self, v: u32) {
        let Some((i, q)) = self.configurable_queue("QueueNum") else {
            return;
        };
        let max = q.max_size();
        match u16::try_from(v).ok().filter(|&n| valid_queue_size(n, max)) {
            Some(n) => q.set_size(n),
            None => self.device_error(&format!("queue {i}: QueueNum {v} invalid (max {max})")),
        }
    }

    fn write_queue_ready(&mut self, v: u32) {
        let Some((_, q)) = self.configurable_queue("QueueReady") else {
            return;
        };
        match v {
            0 | 1 => q.set_ready(v == 1),
            _ => tracing::debug!("virtio-mmio: QueueReady {v:#x} ignored"),
        }
    }

    fn write_ring(&mut self, ring: Ring, high: bool, v: u32) {
        let Some((i, q)) = self.configurable_queue("queue address") else {
            return;
        };
        let old = match ring {
            Ring::Desc => q.desc_table(),
            Ring::Driver => q.avail_ring(),
            Ring::Device => q.used_ring(),
        };
        let addr = if high {
            (old & 0xffff_ffff) | (u64::from(v) << 32)
        } else {
            (old & !0xffff_ffff) | u64::from(v)
        };
        let res = match ring {
            Ring::Desc => q.try_set_desc_table_address(vm_memory::GuestAddress(addr)),
            Ring::Driver => q.try_set_avail_ring_address(vm_memory::GuestAddress(addr)),
            Ring::Device => q.try_set_used_ring_address(vm_memory::GuestAddress(addr)),
        };
        if let Err(e) = res {
            self.device_error(&format!("queue {i}: {ring:?} area {addr:#x}: {e}"));
        }
    }

    fn write_status(&mut self, v: u32) {
        if v == 0 {
            self.reset();
            return;
        }
        self.sync_needs_reset();
        // DEVICE_NEEDS_RESET is the device's to set; drivers write back what they read.
        let v = v & !st::DEVICE_NEEDS_RESET;
        let old = self.status;
        if old & !v != 0 {
            tracing::debug!("virtio-mmio: status {v:#x} clears bits of {old:#x}, ignored");
            return;
        }
        if v & !st::ALL != 0 {
            tracing::debug!("virtio-mmio: status {v:#x} has undefined bits, ignored");
            return;
        }
        if v & st::FAILED != 0 && old & st::FAILED == 0 {
            tracing::info!("virtio-mmio: the driver set FAILED");
            self.status |= st::FAILED;
            if self.active {
                self.active = false;
                self.device.reset();
            }
            return;
        }
        // Each new bit in the order of the initialisation sequence (virtio 1.2 §3.1.1).
        for (bit, before) in [
            (st::ACKNOWLEDGE, 0),
            (st::DRIVER, st::ACKNOWLEDGE),
            (st::FEATURES_OK, st::ACKNOWLEDGE | st::DRIVER),
            (
                st::DRIVER_OK,
                st::ACKNOWLEDGE | st::DRIVER | st::FEATURES_OK,
            ),
        ] {
            if v & bit == 0 || self.status & bit != 0 {
                continue;
            }
            if self.status != before {
                tracing::debug!(
                    "virtio-mmio: status bit {bit:#x} out of order (status {:#x}), ignored",
                    self.status
                );
                return;
            }
            match bit {
                st::FEATURES_OK if !self.accept_features() => return,
                st::DRIVER_OK => {
                    self.status |= st::DRIVER_OK;
                    self.activate();
                    return;
                }
                _ => {}
            }
            self.status |= bit;
        }
    }

    /// `FEATURES_OK`: the driver's features must be offered, include VERSION_1, and suit
    /// the device; otherwise the bit stays clear and the driver sees the refusal.
    fn accept_features(&mut self) -> bool {
        let f = self.driver_features;
        if f & !self.offered != 0 {
            tracing::warn!(
                "virtio-mmio: driver features {f:#x} include unoffered {:#x}; FEATURES_OK refused",
                f & !self.offered
            );
            return false;
        }
        if f & features::VERSION_1 == 0 {
            tracing::warn!(
                "virtio-mmio: driver features {f:#x} lack VERSION_1; FEATURES_OK refused"
            );
            return false;
        }
        if let Err(e) = self.device.ack_features(f) {
            tracing::warn!("virtio-mmio: {e}; FEATURES_OK refused");
            return false;
        }
        let event_idx = f & features::RING_EVENT_IDX != 0;
        for q in self.device.queues_mut() {
            q.set_event_idx(event_idx);
        }
        true
    }

    /// `DRIVER_OK`: check the ready queues' rings against guest memory, then start the
    /// device.
    fn activate(&mut self) {
        if self.interrupt.needs_reset() {
            self.device_error("DRIVER_OK while the device needs a reset");
            return;
        }
        let map = MemoryMap::of(&self.mem);
        let bad = self.device.queues().iter().enumerate().find_map(|(i, q)| {
            let s = crate::state::VirtqueueState::from(q.state());
            s.check_rings(&map).err().map(|e| format!("queue {i}: {e}"))
        });
        if let Some(why) = bad {
            self.device_error(&why);
            return;
        }
        let ctx = ActivateContext {
            mem: self.mem.clone(),
            interrupt: self.interrupt.clone(),
            acked_features: self.driver_features,
            restored: false,
        };
        match self.device.activate(ctx) {
            Ok(()) => self.active = true,
            Err(e) => self.device_error(&format!("activation failed: {e}")),
        }
    }

    /// Device reset (a 0 written to `Status`): back to the state after power-on, except
    /// the configuration generation.
    pub fn reset(&mut self) {
        if self.active {
            self.active = false;
            self.device.reset();
        }
        for q in self.device.queues_mut() {
            q.reset();
        }
        self.status = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.driver_features = 0;
        self.queue_sel = 0;
        self.interrupt.reset();
    }
}

/// A split-ring size: a power of two, at most `max`.
pub(crate) fn valid_queue_size(n: u16, max: u16) -> bool {
    n != 0 && n <= max && n.is_power_of_two()
}
