//! The MMIO bus: which device answers a guest-physical address outside RAM.
//!
//! Kept minimal (a sorted list of ranges) because the harness machine has few devices;
//! virtio-mmio transports register here in later work.

use std::sync::Arc;

/// A device reachable by MMIO. Offsets are relative to the device's base address.
pub trait MmioDevice: Send + Sync {
    fn read(&self, offset: u64, data: &mut [u8]);
    fn write(&self, offset: u64, data: &[u8]);
}

/// Address ranges to devices.
#[derive(Default, Clone)]
pub struct MmioBus {
    ranges: Vec<(u64, u64, Arc<dyn MmioDevice>)>,
}

impl MmioBus {
    /// Adds a device at `[base, base + size)`; fails on overlap.
    pub fn insert(&mut self, base: u64, size: u64, dev: Arc<dyn MmioDevice>) -> Result<(), String> {
        let end = base
            .checked_add(size)
            .ok_or_else(|| format!("MMIO range {base:#x}+{size:#x} overflows"))?;
        if let Some((b, s, _)) = self
            .ranges
            .iter()
            .find(|(b, s, _)| base < b + s && *b < end)
        {
            return Err(format!(
                "MMIO range {base:#x}+{size:#x} overlaps {b:#x}+{s:#x}"
            ));
        }
        self.ranges.push((base, size, dev));
        self.ranges.sort_by_key(|r| r.0);
        Ok(())
    }

    fn find(&self, addr: u64) -> Option<(&Arc<dyn MmioDevice>, u64)> {
        self.ranges
            .iter()
            .find(|(b, s, _)| addr >= *b && addr - b < *s)
            .map(|(b, _, d)| (d, addr - b))
    }

    /// Dispatches a read; unclaimed addresses read as all ones (like a PC bus).
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr) {
            Some((dev, off)) => {
                dev.read(off, data);
                true
            }
            None => {
                data.fill(0xff);
                false
            }
        }
    }

    /// Dispatches a write; unclaimed addresses ignore it.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.find(addr) {
            Some((dev, off)) => {
                dev.write(off, data);
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[derive(Default)]
    struct Recorder(Mutex<Vec<(u64, Vec<u8>)>>);

    impl MmioDevice for Recorder {
        fn read(&self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&self, offset: u64, data: &[u8]) {
            self.0.lock().unwrap().push((offset, data.to_vec()));
        }
    }

    #[test]
    fn dispatches_by_range_and_rejects_overlaps() {
        let dev = Arc::new(Recorder::default());
        let mut bus = MmioBus::default();
        bus.insert(0x1000, 0x100, dev.clone()).unwrap();
        assert!(bus.insert(0x10ff, 0x10, dev.clone()).is_err());
        assert!(bus.insert(0x1100, 0x10, dev.clone()).is_ok());
        let mut buf = [0u8; 2];
        assert!(bus.read(0x1010, &mut buf));
        assert_eq!(buf, [0x10, 0x10]);
        assert!(!bus.read(0x2000, &mut buf));
        assert_eq!(buf, [0xff, 0xff]);
        assert!(bus.write(0x1004, &[1, 2]));
        assert_eq!(dev.0.lock().unwrap()[0], (4, vec![1, 2]));
    }
}
