//! The virtio-mmio version 2 register block (virtio 1.2 §4.2.2), as a driver sees it.
//!
//! The window is identity mapped and user-accessible like all low memory, so the CPL3
//! guest reaches it with plain volatile loads and stores (one exit each).

use core::sync::atomic::{fence, Ordering};

pub const MAGIC: u64 = 0x000;
pub const VERSION: u64 = 0x004;
pub const DEVICE_ID: u64 = 0x008;
pub const DEVICE_FEATURES: u64 = 0x010;
pub const DEVICE_FEATURES_SEL: u64 = 0x014;
pub const DRIVER_FEATURES: u64 = 0x020;
pub const DRIVER_FEATURES_SEL: u64 = 0x024;
pub const QUEUE_SEL: u64 = 0x030;
pub const QUEUE_NUM_MAX: u64 = 0x034;
pub const QUEUE_NUM: u64 = 0x038;
pub const QUEUE_READY: u64 = 0x044;
pub const QUEUE_NOTIFY: u64 = 0x050;
pub const STATUS: u64 = 0x070;
pub const QUEUE_DESC_LOW: u64 = 0x080;
pub const QUEUE_DRIVER_LOW: u64 = 0x090;
pub const QUEUE_DEVICE_LOW: u64 = 0x0a0;
pub const CONFIG: u64 = 0x100;

pub const MAGIC_VALUE: u32 = 0x7472_6976;
pub const S_ACKNOWLEDGE: u32 = 1;
pub const S_DRIVER: u32 = 2;
pub const S_DRIVER_OK: u32 = 4;
pub const S_FEATURES_OK: u32 = 8;

/// One virtio-mmio window.
#[derive(Clone, Copy)]
pub struct Transport {
    pub base: u64,
}

impl Transport {
    /// The transport at `base` if it is virtio-mmio version 2 (modern) with a device.
    pub fn probe(base: u64) -> Option<Transport> {
        if base == 0 || base >= 1 << 32 {
            return None;
        }
        let t = Transport { base };
        (t.read(MAGIC) == MAGIC_VALUE && t.read(VERSION) == 2 && t.device_id() != 0).then_some(t)
    }

    pub fn read(&self, off: u64) -> u32 {
        // SAFETY: a register of the device's window (identity mapped MMIO).
        unsafe { ((self.base + off) as *const u32).read_volatile() }
    }

    pub fn write(&self, off: u64, v: u32) {
        // SAFETY: as `read`.
        unsafe { ((self.base + off) as *mut u32).write_volatile(v) }
    }

    pub fn device_id(&self) -> u32 {
        self.read(DEVICE_ID)
    }

    pub fn config_u8(&self, off: u64) -> u8 {
        // SAFETY: a byte of the device's configuration space.
        unsafe { ((self.base + CONFIG + off) as *const u8).read_volatile() }
    }

    pub fn config_u16(&self, off: u64) -> u16 {
        // SAFETY: an aligned 16-bit field of the configuration space.
        unsafe { ((self.base + CONFIG + off) as *const u16).read_volatile() }
    }

    /// Reset, ACKNOWLEDGE, DRIVER, then accept `required` (all must be offered) plus
    /// whatever of `optional` is offered, and FEATURES_OK. Returns the features and
    /// whether the device kept FEATURES_OK.
    pub fn negotiate(&self, required: u64, optional: u64) -> (u64, bool) {
        self.write(STATUS, 0);
        while self.read(STATUS) != 0 {
            core::hint::spin_loop();
        }
        self.write(STATUS, S_ACKNOWLEDGE);
        self.write(STATUS, S_ACKNOWLEDGE | S_DRIVER);
        let mut offered = 0u64;
        for sel in 0..2u32 {
            self.write(DEVICE_FEATURES_SEL, sel);
            offered |= u64::from(self.read(DEVICE_FEATURES)) << (32 * sel);
        }
        if offered & required != required {
            return (offered, false);
        }
        let f = required | (optional & offered);
        for sel in 0..2u32 {
            self.write(DRIVER_FEATURES_SEL, sel);
            self.write(DRIVER_FEATURES, (f >> (32 * sel)) as u32);
        }
        self.write(STATUS, S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK);
        (f, self.read(STATUS) & S_FEATURES_OK != 0)
    }

    /// Sets up queue `q` with at most `want` entries, its rings at `rings` (descriptor
    /// table), `rings + driver_off` and `rings + device_off`; returns the size, or 0 when
    /// the queue does not exist or is already in use.
    pub fn setup_queue(
        &self,
        q: u32,
        want: u16,
        rings: u64,
        driver_off: u64,
        device_off: u64,
    ) -> u16 {
        self.write(QUEUE_SEL, q);
        if self.read(QUEUE_READY) != 0 {
            return 0;
        }
        let max = self.read(QUEUE_NUM_MAX);
        if max == 0 {
            return 0;
        }
        // A power of two no larger than either.
        let mut size = want;
        while u32::from(size) > max {
            size /= 2;
        }
        self.write(QUEUE_NUM, u32::from(size));
        for (reg, addr) in [
            (QUEUE_DESC_LOW, rings),
            (QUEUE_DRIVER_LOW, rings + driver_off),
            (QUEUE_DEVICE_LOW, rings + device_off),
        ] {
            self.write(reg, addr as u32);
            self.write(reg + 4, (addr >> 32) as u32);
        }
        self.write(QUEUE_READY, 1);
        size
    }

    pub fn driver_ok(&self) {
        fence(Ordering::SeqCst);
        self.write(
            STATUS,
            S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK,
        );
    }

    pub fn notify(&self, q: u32) {
        fence(Ordering::SeqCst);
        self.write(QUEUE_NOTIFY, q);
    }
}
