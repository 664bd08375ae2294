//! Register offsets, status bits and feature bits of virtio-mmio version 2.
//!
//! The numbers come from `virtio-bindings` (generated from the Linux UAPI headers) so they
//! cannot drift from what guest drivers use; this module only gives them the types and
//! names the transport works with (`u64` offsets on the MMIO bus, `u32` status, `u64`
//! feature masks) and adds the few values the bindings do not carry.

use virtio_bindings::virtio_config as cfg;
use virtio_bindings::virtio_mmio as mmio;
use virtio_bindings::virtio_ring as ring;

/// "virt" in little endian: the value of `MagicValue`.
pub const MAGIC_VALUE: u32 = 0x7472_6976;
/// The modern (virtio 1.x) register layout.
pub const MMIO_VERSION: u32 = 2;
/// `VendorID` reported by baton devices unless a device says otherwise ("BATN").
pub const VENDOR_ID: u32 = 0x4e54_4142;
/// Size of the register window a VMM maps per device (what Linux's
/// `virtio_mmio.device=512@ADDR:IRQ` expects): registers plus 256 bytes of config space.
pub const MMIO_WINDOW_SIZE: u64 = 0x200;

macro_rules! offsets {
    ($($(#[$doc:meta])* $name:ident = $val:expr;)*) => {
        $($(#[$doc])* pub const $name: u64 = $val as u64;)*
    };
}

offsets! {
    MAGIC = mmio::VIRTIO_MMIO_MAGIC_VALUE;
    VERSION = mmio::VIRTIO_MMIO_VERSION;
    DEVICE_ID = mmio::VIRTIO_MMIO_DEVICE_ID;
    VENDOR = mmio::VIRTIO_MMIO_VENDOR_ID;
    DEVICE_FEATURES = mmio::VIRTIO_MMIO_DEVICE_FEATURES;
    DEVICE_FEATURES_SEL = mmio::VIRTIO_MMIO_DEVICE_FEATURES_SEL;
    DRIVER_FEATURES = mmio::VIRTIO_MMIO_DRIVER_FEATURES;
    DRIVER_FEATURES_SEL = mmio::VIRTIO_MMIO_DRIVER_FEATURES_SEL;
    QUEUE_SEL = mmio::VIRTIO_MMIO_QUEUE_SEL;
    QUEUE_NUM_MAX = mmio::VIRTIO_MMIO_QUEUE_NUM_MAX;
    QUEUE_NUM = mmio::VIRTIO_MMIO_QUEUE_NUM;
    QUEUE_READY = mmio::VIRTIO_MMIO_QUEUE_READY;
    /// `QueueNotify`: where a VMM registers its ioeventfds (see
    /// [`crate::NotifyRegistration`]).
    QUEUE_NOTIFY = mmio::VIRTIO_MMIO_QUEUE_NOTIFY;
    INTERRUPT_STATUS = mmio::VIRTIO_MMIO_INTERRUPT_STATUS;
    INTERRUPT_ACK = mmio::VIRTIO_MMIO_INTERRUPT_ACK;
    STATUS = mmio::VIRTIO_MMIO_STATUS;
    QUEUE_DESC_LOW = mmio::VIRTIO_MMIO_QUEUE_DESC_LOW;
    QUEUE_DESC_HIGH = mmio::VIRTIO_MMIO_QUEUE_DESC_HIGH;
    QUEUE_DRIVER_LOW = mmio::VIRTIO_MMIO_QUEUE_AVAIL_LOW;
    QUEUE_DRIVER_HIGH = mmio::VIRTIO_MMIO_QUEUE_AVAIL_HIGH;
    QUEUE_DEVICE_LOW = mmio::VIRTIO_MMIO_QUEUE_USED_LOW;
    QUEUE_DEVICE_HIGH = mmio::VIRTIO_MMIO_QUEUE_USED_HIGH;
    SHM_SEL = mmio::VIRTIO_MMIO_SHM_SEL;
    SHM_LEN_LOW = mmio::VIRTIO_MMIO_SHM_LEN_LOW;
    SHM_LEN_HIGH = mmio::VIRTIO_MMIO_SHM_LEN_HIGH;
    SHM_BASE_LOW = mmio::VIRTIO_MMIO_SHM_BASE_LOW;
    SHM_BASE_HIGH = mmio::VIRTIO_MMIO_SHM_BASE_HIGH;
    /// `QueueReset` (virtio 1.2, only with `VIRTIO_F_RING_RESET`, which baton does not offer).
    QUEUE_RESET = 0xc0;
    CONFIG_GENERATION = mmio::VIRTIO_MMIO_CONFIG_GENERATION;
    /// Start of the device-specific configuration space.
    CONFIG = mmio::VIRTIO_MMIO_CONFIG;
}

/// Device status bits (virtio 1.2 §2.1).
pub mod status {
    use super::cfg;
    pub const ACKNOWLEDGE: u32 = cfg::VIRTIO_CONFIG_S_ACKNOWLEDGE;
    pub const DRIVER: u32 = cfg::VIRTIO_CONFIG_S_DRIVER;
    pub const DRIVER_OK: u32 = cfg::VIRTIO_CONFIG_S_DRIVER_OK;
    pub const FEATURES_OK: u32 = cfg::VIRTIO_CONFIG_S_FEATURES_OK;
    pub const DEVICE_NEEDS_RESET: u32 = cfg::VIRTIO_CONFIG_S_NEEDS_RESET;
    pub const FAILED: u32 = cfg::VIRTIO_CONFIG_S_FAILED;
    /// Every bit the specification defines.
    pub const ALL: u32 =
        ACKNOWLEDGE | DRIVER | DRIVER_OK | FEATURES_OK | DEVICE_NEEDS_RESET | FAILED;
}

/// `InterruptStatus` bits.
pub mod interrupt {
    use super::mmio;
    /// A used buffer notification (some queue has new used entries).
    pub const USED_RING: u32 = mmio::VIRTIO_MMIO_INT_VRING;
    /// A configuration change notification.
    pub const CONFIG_CHANGE: u32 = mmio::VIRTIO_MMIO_INT_CONFIG;
    pub const ALL: u32 = USED_RING | CONFIG_CHANGE;
}

/// Feature bits as `u64` masks.
pub mod features {
    use super::{cfg, ring};
    const fn bit(b: u32) -> u64 {
        1u64 << b
    }
    pub const VERSION_1: u64 = bit(cfg::VIRTIO_F_VERSION_1);
    pub const ACCESS_PLATFORM: u64 = bit(cfg::VIRTIO_F_ACCESS_PLATFORM);
    pub const RING_INDIRECT_DESC: u64 = bit(ring::VIRTIO_RING_F_INDIRECT_DESC);
    pub const RING_EVENT_IDX: u64 = bit(ring::VIRTIO_RING_F_EVENT_IDX);
    pub const RING_PACKED: u64 = bit(cfg::VIRTIO_F_RING_PACKED);
    pub const IN_ORDER: u64 = bit(cfg::VIRTIO_F_IN_ORDER);
    pub const NOTIFICATION_DATA: u64 = bit(cfg::VIRTIO_F_NOTIFICATION_DATA);
    pub const RING_RESET: u64 = bit(cfg::VIRTIO_F_RING_RESET);
    /// Transport features this transport cannot honour, removed from what a device offers:
    /// packed rings (`virtio_queue::Queue` is a split ring), notification data, per-queue
    /// reset, SR-IOV, config-data notifications and admin queues.
    pub const UNSUPPORTED: u64 = RING_PACKED
        | NOTIFICATION_DATA
        | RING_RESET
        | bit(cfg::VIRTIO_F_SR_IOV)
        | bit(cfg::VIRTIO_F_NOTIF_CONFIG_DATA)
        | bit(cfg::VIRTIO_F_ADMIN_VQ);
}

/// The largest split-ring size the specification allows.
pub const MAX_QUEUE_SIZE: u16 = 32768;
/// The most queues one device may have (QEMU's `VIRTIO_QUEUE_MAX`; enough for 512
/// virtio-net queue pairs).
pub const MAX_QUEUES: usize = 1024;

/// Split-ring sizes in bytes for a queue of `size` entries (virtio 1.2 §2.7), as `u64`:
/// descriptor table, driver (available) area, device (used) area. The areas include the
/// event-index words, which the specification always reserves.
pub const fn ring_sizes(size: u16) -> (u64, u64, u64) {
    let n = size as u64;
    (16 * n, 6 + 2 * n, 6 + 8 * n)
}

/// Required alignments of the descriptor table, driver area and device area.
pub const RING_ALIGN: (u64, u64, u64) = (16, 2, 4);
