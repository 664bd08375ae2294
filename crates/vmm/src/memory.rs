//! Guest RAM: one memfd, mapped shared, split around the 32-bit MMIO hole.
//!
//! Why a memfd: local live update hands guest RAM to the next VMM process as a file
//! descriptor (SCM_RIGHTS), so RAM must be a file both processes can map, not
//! anonymous memory. [`GuestRam::memfd`] gives the fd and [`GuestRam::regions`] the
//! layout (guest address, size, offset in the memfd) the receiver needs to map it the
//! same way with [`GuestRam::from_memfd`].
//!
//! Layout (like QEMU's microvm/pc): RAM from 0 up to 3 GiB, the rest from 4 GiB; the
//! hole [3 GiB, 4 GiB) holds MMIO devices, the IOAPIC and the LAPIC.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};

use vm_memory::bitmap::{AtomicBitmap, NewBitmap};
use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap, GuestRegionMmap, MmapRegion};

use crate::error::{Error, Result};

/// Start of the 32-bit MMIO hole (end of low RAM).
pub const MMIO_HOLE_START: u64 = 0xc000_0000;
/// First address above 4 GiB, where the rest of RAM goes.
pub const HIGH_RAM_START: u64 = 1 << 32;

/// Guest RAM as devices see it: another mapping of the same memfd whose writes are
/// recorded per page (vm-memory's `AtomicBitmap`, bit `n` of word `w` = page `64 w + n` of
/// a region), so what a device writes into guest memory (received frames, used rings)
/// reaches the dirty log of a remote migration like the guest's own writes do.
pub type TrackedMemory = GuestMemoryMmap<AtomicBitmap>;

/// One contiguous piece of guest RAM and where it lives in the memfd.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RamRegion {
    pub guest_addr: u64,
    pub size: u64,
    pub file_offset: u64,
}

/// Guest RAM backed by a memfd.
pub struct GuestRam {
    memfd: File,
    regions: Vec<RamRegion>,
    memory: GuestMemoryMmap,
}

/// The layout for `size` bytes of RAM.
pub fn layout(size: u64) -> Vec<RamRegion> {
    let low = size.min(MMIO_HOLE_START);
    let mut regions = vec![RamRegion {
        guest_addr: 0,
        size: low,
        file_offset: 0,
    }];
    if size > low {
        regions.push(RamRegion {
            guest_addr: HIGH_RAM_START,
            size: size - low,
            file_offset: low,
        });
    }
    regions
}

impl GuestRam {
    /// Creates a zeroed memfd of `size` bytes and maps it.
    pub fn new(size: u64) -> Result<Self> {
        if size == 0 || size % 4096 != 0 {
            return Err(Error::Config(format!(
                "memory size {size:#x} must be a non-zero multiple of 4 KiB"
            )));
        }
        // SAFETY: memfd_create with a valid NUL-terminated name; the result is checked.
        let fd = unsafe { libc::memfd_create(c"baton-guest-ram".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(Error::Io {
                what: "memfd_create".into(),
                source: std::io::Error::last_os_error(),
            });
        }
        // SAFETY: `fd` was just returned by memfd_create and is owned by nobody else.
        let memfd = unsafe { File::from_raw_fd(fd) };
        memfd.set_len(size).map_err(|source| Error::Io {
            what: format!("sizing the RAM memfd to {size:#x}"),
            source,
        })?;
        Self::from_memfd(memfd, size)
    }

    /// Maps an existing RAM memfd (e.g. one received from another VMM process) with the
    /// layout for `size` bytes. Nothing is written to it.
    pub fn from_memfd(memfd: File, size: u64) -> Result<Self> {
        let file_len = memfd
            .metadata()
            .map_err(|source| Error::Io {
                what: "inspecting the RAM memfd".into(),
                source,
            })?
            .len();
        if file_len < size {
            return Err(Error::Memory(format!(
                "memfd holds {file_len:#x} bytes, layout needs {size:#x}"
            )));
        }
        let regions = layout(size);
        let memory = map_regions(&memfd, &regions)?;
        Ok(GuestRam {
            memfd,
            regions,
            memory,
        })
    }

    /// A second mapping of this RAM that records every write made through it (for
    /// devices; see [`TrackedMemory`]).
    pub fn tracked(&self) -> Result<TrackedMemory> {
        map_regions(&self.memfd, &self.regions)
    }

    /// The memfd holding all of guest RAM (hand it to another process to share RAM).
    pub fn memfd(&self) -> &File {
        &self.memfd
    }

    /// The raw fd of [`Self::memfd`].
    pub fn memfd_raw(&self) -> i32 {
        self.memfd.as_raw_fd()
    }

    /// Guest RAM regions, in guest address order.
    pub fn regions(&self) -> &[RamRegion] {
        &self.regions
    }

    /// Total RAM size.
    pub fn size(&self) -> u64 {
        self.regions.iter().map(|r| r.size).sum()
    }

    /// The mapped RAM, for loaders and devices (vm-memory's accessors).
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.memory
    }

    /// Host address of a guest RAM region's mapping (for KVM memory slots).
    pub(crate) fn host_addr(&self, index: usize) -> Option<u64> {
        use vm_memory::GuestMemoryBackend;
        let r = self.regions.get(index)?;
        self.memory
            .get_host_address(GuestAddress(r.guest_addr))
            .ok()
            .map(|p| p as u64)
    }
}

/// Maps every region of `regions` from `memfd` (shared), with bitmap type `B`.
fn map_regions<B: NewBitmap>(memfd: &File, regions: &[RamRegion]) -> Result<GuestMemoryMmap<B>> {
    let mut mapped = Vec::with_capacity(regions.len());
    for r in regions {
        let dup = memfd.try_clone().map_err(|source| Error::Io {
            what: "duplicating the RAM memfd".into(),
            source,
        })?;
        let len = usize::try_from(r.size)
            .map_err(|_| Error::Memory(format!("region {r:?} too large")))?;
        let mmap = MmapRegion::<B>::from_file(FileOffset::new(dup, r.file_offset), len)
            .map_err(|e| Error::Memory(format!("mapping {r:?}: {e}")))?;
        let region = GuestRegionMmap::new(mmap, GuestAddress(r.guest_addr))
            .ok_or_else(|| Error::Memory(format!("region {r:?} overflows the address space")))?;
        mapped.push(region);
    }
    GuestMemoryMmap::from_regions(mapped).map_err(|e| Error::Memory(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

    #[test]
    fn layout_splits_around_the_hole() {
        assert_eq!(
            layout(1 << 30),
            vec![RamRegion {
                guest_addr: 0,
                size: 1 << 30,
                file_offset: 0
            }]
        );
        let r = layout(4 << 30);
        assert_eq!(
            r[0],
            RamRegion {
                guest_addr: 0,
                size: MMIO_HOLE_START,
                file_offset: 0
            }
        );
        assert_eq!(
            r[1],
            RamRegion {
                guest_addr: HIGH_RAM_START,
                size: (4 << 30) - MMIO_HOLE_START,
                file_offset: MMIO_HOLE_START
            }
        );
    }

    #[test]
    fn writes_through_the_tracked_mapping_are_recorded_and_shared() {
        use vm_memory::GuestMemoryBackend;
        let ram = GuestRam::new(8 << 20).unwrap();
        let tracked = ram.tracked().unwrap();
        tracked
            .write_obj(0x5a5a_u16, GuestAddress(0x3_2000))
            .unwrap();
        assert_eq!(
            ram.memory()
                .read_obj::<u16>(GuestAddress(0x3_2000))
                .unwrap(),
            0x5a5a
        );
        let region = tracked.iter().next().unwrap();
        let mapping: &MmapRegion<AtomicBitmap> = region;
        let bits = mapping.bitmap().get_and_reset();
        assert_eq!(bits[0], 1 << 0x32, "page 0x32 and only it");
        assert!(bits[1..].iter().all(|w| *w == 0));
        // Writes through the untracked mapping (the guest's view) are not recorded.
        ram.memory().write_obj(1u8, GuestAddress(0x1000)).unwrap();
        assert!(mapping.bitmap().get_and_reset().iter().all(|w| *w == 0));
    }

    #[test]
    fn a_second_mapping_of_the_memfd_sees_the_same_ram() {
        let ram = GuestRam::new(8 << 20).unwrap();
        ram.memory()
            .write_obj(0xabcd_u32, GuestAddress(0x1000))
            .unwrap();
        let other = GuestRam::from_memfd(ram.memfd().try_clone().unwrap(), ram.size()).unwrap();
        assert_eq!(
            other
                .memory()
                .read_obj::<u32>(GuestAddress(0x1000))
                .unwrap(),
            0xabcd
        );
        assert!(GuestRam::new(4095).is_err());
        assert!(GuestRam::from_memfd(ram.memfd().try_clone().unwrap(), 16 << 20).is_err());
    }
}
