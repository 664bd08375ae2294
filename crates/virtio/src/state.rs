//! The migration state of a virtio-mmio device's common part, and its checks.
//!
//! [`VirtioMmioState`] is the wire form (a `#[derive(VmState)]` struct) of everything the
//! transport owns: status, feature selectors and features, queue select, interrupt status,
//! configuration generation and one [`VirtqueueState`] per queue. A device crate embeds it
//! as a field of its own state struct, so a virtio-net stream reads
//! `net0/virtio-net/virtio.queues[3].next_avail`.
//!
//! Loading is parsing hostile input. The checks come in two layers:
//! - *intrinsic*, run by the codec after every load ([`VirtioMmioState::check`]): values
//!   the transport could never have produced (undefined status bits, a status out of the
//!   initialisation order, negotiated features the device never offered, a queue size above its
//!   maximum or not a power of two, misaligned or overflowing rings of a running queue,
//!   more requests in flight than the ring holds);
//! - *against the destination* ([`crate::MmioTransport::check_state`]): the device type,
//!   queue count and maximum sizes, the features this build's device offers, and the rings
//!   of running queues against the guest memory map.
//!
//! Every error names its path (`queues[3].size: 512 exceeds max 256`).

use std::ops::Range;

use baton_vmstate::{VmState, VmStateError};
use virtio_queue::{Queue, QueueState};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use crate::mmio::valid_queue_size;
use crate::regs::{features, interrupt, ring_sizes, status as st, MAX_QUEUE_SIZE, RING_ALIGN};

/// The saved state of one split virtqueue: its configuration and the device's indices.
#[derive(VmState, Clone, Copy, Debug, Default, PartialEq, Eq)]
#[vmstate(name = "virtqueue", version = 1, validate = VirtqueueState::check)]
pub struct VirtqueueState {
    /// `QueueNumMax` of the source device.
    pub max_size: u16,
    /// `QueueNum`: the size the driver chose.
    pub size: u16,
    /// `QueueReady`.
    pub ready: bool,
    /// Guest-physical address of the descriptor table.
    pub desc_table: u64,
    /// Guest-physical address of the driver (available) area.
    pub avail_ring: u64,
    /// Guest-physical address of the device (used) area.
    pub used_ring: u64,
    /// The next available-ring index the device will read (free-running).
    pub next_avail: u16,
    /// The next used-ring index the device will write (free-running).
    pub next_used: u16,
    /// `VIRTIO_RING_F_EVENT_IDX` is in use on this queue.
    pub event_idx: bool,
}

/// The saved common state of a virtio-mmio device.
#[derive(VmState, Clone, Debug, Default, PartialEq, Eq)]
#[vmstate(name = "virtio-mmio", version = 1, validate = VirtioMmioState::check)]
pub struct VirtioMmioState {
    /// The virtio device ID the source device had.
    pub device_type: u32,
    /// `Status`, including `DEVICE_NEEDS_RESET`.
    pub status: u8,
    pub device_features_sel: u32,
    pub driver_features_sel: u32,
    /// The features the source device offered.
    pub device_features: u64,
    /// The features the driver wrote (negotiated once `FEATURES_OK` is set).
    pub driver_features: u64,
    pub queue_sel: u32,
    /// `InterruptStatus`.
    pub interrupt_status: u8,
    pub config_generation: u32,
    #[vmstate(max = 1024)]
    pub queues: Vec<VirtqueueState>,
}

/// Guest-physical memory as address ranges, to check that rings lie inside it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MemoryMap {
    /// Sorted, non-overlapping, adjacent ranges merged.
    ranges: Vec<Range<u64>>,
}

impl MemoryMap {
    /// The map of `ranges` (start, length); overlapping and adjacent ranges merge.
    pub fn new(ranges: impl IntoIterator<Item = (u64, u64)>) -> Self {
        let mut v: Vec<Range<u64>> = ranges
            .into_iter()
            .filter(|&(_, len)| len > 0)
            .map(|(start, len)| start..start.saturating_add(len))
            .collect();
        v.sort_by_key(|r| r.start);
        let mut merged: Vec<Range<u64>> = Vec::with_capacity(v.len());
        for r in v {
            match merged.last_mut() {
                Some(last) if r.start <= last.end => last.end = last.end.max(r.end),
                _ => merged.push(r),
            }
        }
        MemoryMap { ranges: merged }
    }

    /// The map of a vm-memory guest memory's regions.
    pub fn of<M: GuestMemoryBackend>(mem: &M) -> Self {
        Self::new(mem.iter().map(|r| (r.start_addr().0, r.len())))
    }

    /// Whether `[addr, addr + len)` is entirely guest memory.
    pub fn contains(&self, addr: u64, len: u64) -> bool {
        let Some(end) = addr.checked_add(len) else {
            return false;
        };
        self.ranges.iter().any(|r| r.start <= addr && end <= r.end)
    }
}

impl VirtqueueState {
    /// The checks that need nothing but the queue itself (run after every load).
    pub fn check(&self) -> Result<(), VmStateError> {
        if !valid_queue_size(self.max_size, MAX_QUEUE_SIZE) {
            return Err(VmStateError::invalid(
                "max_size",
                format!("{} is not a power of two in 1..=32768", self.max_size),
            ));
        }
        if self.size > self.max_size {
            return Err(VmStateError::invalid(
                "size",
                format!("{} exceeds max {}", self.size, self.max_size),
            ));
        }
        if !valid_queue_size(self.size, self.max_size) {
            return Err(VmStateError::invalid(
                "size",
                format!("{} is not a power of two", self.size),
            ));
        }
        for (field, addr, align) in self.rings().map(|(f, a, _, al)| (f, a, al)) {
            if addr % align != 0 {
                return Err(VmStateError::invalid(
                    field,
                    format!("{addr:#x} is not aligned to {align} bytes"),
                ));
            }
        }
        Ok(())
    }

    /// (field, address, length, alignment) of the descriptor table and the two areas.
    fn rings(&self) -> [(&'static str, u64, u64, u64); 3] {
        let (d, a, u) = ring_sizes(self.size);
        [
            ("desc_table", self.desc_table, d, RING_ALIGN.0),
            ("avail_ring", self.avail_ring, a, RING_ALIGN.1),
            ("used_ring", self.used_ring, u, RING_ALIGN.2),
        ]
    }

    /// A ready queue's rings must not wrap around the address space.
    fn check_ring_overflow(&self) -> Result<(), VmStateError> {
        for (field, addr, len, _) in self.rings() {
            if addr.checked_add(len).is_none() {
                return Err(VmStateError::invalid(
                    field,
                    format!("{addr:#x}: {len} bytes of ring overflow the address space"),
                ));
            }
        }
        Ok(())
    }

    /// A ready queue's rings must lie inside guest memory (not-ready queues pass).
    pub fn check_rings(&self, map: &MemoryMap) -> Result<(), VmStateError> {
        if !self.ready {
            return Ok(());
        }
        self.check_ring_overflow()?;
        for (field, addr, len, _) in self.rings() {
            if !map.contains(addr, len) {
                return Err(VmStateError::invalid(
                    field,
                    format!("{addr:#x}..{:#x} is outside guest memory", addr + len),
                ));
            }
        }
        Ok(())
    }

    /// The validated `virtio_queue::Queue` with the destination's maximum size `max_size`.
    pub fn to_queue(&self, max_size: u16) -> Result<Queue, VmStateError> {
        let mut s = QueueState::from(self);
        s.max_size = max_size;
        Queue::try_from(s).map_err(queue_error)
    }
}

/// Name the field a `virtio_queue` refusal is about.
fn queue_error(e: virtio_queue::Error) -> VmStateError {
    use virtio_queue::Error as E;
    let field = match e {
        E::InvalidMaxSize => "max_size",
        E::InvalidSize => "size",
        E::InvalidDescTableAlign => "desc_table",
        E::InvalidAvailRingAlign => "avail_ring",
        E::InvalidUsedRingAlign => "used_ring",
        _ => "",
    };
    VmStateError::invalid(field, format!("refused by virtio-queue: {e}"))
}

impl From<QueueState> for VirtqueueState {
    fn from(s: QueueState) -> Self {
        VirtqueueState {
            max_size: s.max_size,
            size: s.size,
            ready: s.ready,
            desc_table: s.desc_table,
            avail_ring: s.avail_ring,
            used_ring: s.used_ring,
            next_avail: s.next_avail,
            next_used: s.next_used,
            event_idx: s.event_idx_enabled,
        }
    }
}

/// Unchecked, like `QueueState` itself; turn it into a `Queue` with `Queue::try_from`.
impl From<&VirtqueueState> for QueueState {
    fn from(s: &VirtqueueState) -> Self {
        QueueState {
            max_size: s.max_size,
            next_avail: s.next_avail,
            next_used: s.next_used,
            event_idx_enabled: s.event_idx,
            size: s.size,
            ready: s.ready,
            desc_table: s.desc_table,
            avail_ring: s.avail_ring,
            used_ring: s.used_ring,
        }
    }
}

/// Intrinsic checks, then `virtio_queue`'s own, with the queue's maximum size.
impl TryFrom<&VirtqueueState> for Queue {
    type Error = VmStateError;
    fn try_from(s: &VirtqueueState) -> Result<Self, VmStateError> {
        s.check()?;
        s.to_queue(s.max_size)
    }
}

fn hex_err(path: &str, reason: String) -> Result<(), VmStateError> {
    Err(VmStateError::invalid(path, reason))
}

impl VirtioMmioState {
    /// Whether this state describes a running device: `DRIVER_OK`, and neither `FAILED`
    /// nor `DEVICE_NEEDS_RESET`. Restoring it activates the device.
    pub fn is_active(&self) -> bool {
        let s = u32::from(self.status);
        s & st::DRIVER_OK != 0 && s & (st::FAILED | st::DEVICE_NEEDS_RESET) == 0
    }

    /// The checks that need nothing but the state itself (run after every load).
    pub fn check(&self) -> Result<(), VmStateError> {
        let s = u32::from(self.status);
        if s & !st::ALL != 0 {
            return hex_err("status", format!("{s:#x} has undefined bits"));
        }
        for (bit, needs, name) in [
            (st::DRIVER, st::ACKNOWLEDGE, "DRIVER"),
            (st::FEATURES_OK, st::ACKNOWLEDGE | st::DRIVER, "FEATURES_OK"),
            (
                st::DRIVER_OK,
                st::ACKNOWLEDGE | st::DRIVER | st::FEATURES_OK,
                "DRIVER_OK",
            ),
        ] {
            if s & bit != 0 && s & needs != needs {
                return hex_err("status", format!("{s:#x}: {name} without its predecessors"));
            }
        }
        if u32::from(self.interrupt_status) & !interrupt::ALL != 0 {
            return hex_err(
                "interrupt_status",
                format!("{:#x} has undefined bits", self.interrupt_status),
            );
        }
        if self.device_features & features::VERSION_1 == 0 {
            return hex_err(
                "device_features",
                format!("{:#x} lacks VIRTIO_F_VERSION_1", self.device_features),
            );
        }
        // Before FEATURES_OK the driver may have written anything; it is checked when it
        // sets FEATURES_OK (after the restore, if that comes later).
        let features_ok = s & st::FEATURES_OK != 0;
        let unoffered = self.driver_features & !self.device_features;
        if features_ok && unoffered != 0 {
            return hex_err(
                "driver_features",
                format!(
                    "{:#x} not offered by the device (offered {:#x})",
                    self.driver_features, self.device_features
                ),
            );
        }
        if features_ok && self.driver_features & features::VERSION_1 == 0 {
            return hex_err(
                "driver_features",
                format!("{:#x} lacks VIRTIO_F_VERSION_1", self.driver_features),
            );
        }
        let event_idx = features_ok && self.driver_features & features::RING_EVENT_IDX != 0;
        let active = self.is_active();
        for (i, q) in self.queues.iter().enumerate() {
            let at = |field: &str| format!("queues[{i}].{field}");
            // Already run by the codec on each queue; again here for states built in code.
            q.check().map_err(|e| e.in_index(i).in_field("queues"))?;
            if q.event_idx != event_idx {
                return hex_err(
                    &at("event_idx"),
                    format!(
                        "{} but VIRTIO_RING_F_EVENT_IDX is negotiated: {event_idx}",
                        q.event_idx
                    ),
                );
            }
            if !(active && q.ready) {
                continue;
            }
            q.check_ring_overflow()
                .map_err(|e| VmStateError::invalid(&at(&e.path_string()), reason(&e)))?;
            let in_flight = q.next_avail.wrapping_sub(q.next_used);
            if in_flight > q.size {
                return hex_err(
                    &at("next_avail"),
                    format!(
                        "{} is {in_flight} entries ahead of next_used {}, more than the queue size {}",
                        q.next_avail, q.next_used, q.size
                    ),
                );
            }
        }
        Ok(())
    }
}

/// The reason of an `Invalid` error, without its path.
pub(crate) fn reason(e: &VmStateError) -> String {
    match e.kind() {
        baton_vmstate::ErrorKind::Invalid(r) => r.clone(),
        k => k.to_string(),
    }
}
