//! Guest RAM as the engine sees it: regions it can read, write and hand over by fd, and
//! dirty-page sources it ORs together.
//!
//! The engine never touches KVM. A VMM gives it a [`GuestRam`] (usually [`MemfdRam`], the
//! memfd-backed RAM baton-vmm maps into the guest) and a [`DirtyLog`] that ORs the KVM dirty
//! log with the VMM's own write bitmap ([`OrDirtyLogs`]). Tests use the same `MemfdRam`
//! with a writer thread, so the engine is exercised on real shared memory without KVM.
//!
//! RAM mapped in this process also offers [`MappedRam`], so pages go from guest memory to
//! the socket and from the socket into guest memory with the kernel's copy as the only one.
//! The RAM_PAGES wire format is in `ram_wire`.

use std::fmt;
use std::fs::File;
use std::num::NonZeroUsize;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, Ordering};

use serde::{Deserialize, Serialize};
use vm_memory::bitmap::AtomicBitmap;

use crate::protocol::PAGE_SIZE;

/// One guest RAM region: guest-physical base and size (page-aligned).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RamRegion {
    pub gpa: u64,
    pub size: u64,
}

impl RamRegion {
    pub fn pages(&self) -> u64 {
        self.size / PAGE_SIZE
    }
}

/// The guest RAM map; both sides must have the same.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RamLayout {
    pub regions: Vec<RamRegion>,
}

impl RamLayout {
    pub fn total_bytes(&self) -> u64 {
        self.regions.iter().map(|r| r.size).sum()
    }

    /// Checks alignment and overlap; errors name the region.
    pub fn validate(&self) -> Result<(), String> {
        let mut sorted: Vec<_> = self.regions.iter().enumerate().collect();
        sorted.sort_by_key(|(_, r)| r.gpa);
        for (i, r) in &sorted {
            if r.gpa % PAGE_SIZE != 0 || r.size % PAGE_SIZE != 0 || r.size == 0 {
                return Err(format!("region {i} ({r:?}) is empty or not page-aligned"));
            }
            r.gpa
                .checked_add(r.size)
                .ok_or_else(|| format!("region {i} ({r:?}) overflows"))?;
        }
        for w in sorted.windows(2) {
            if w[0].1.gpa + w[0].1.size > w[1].1.gpa {
                return Err(format!("regions {} and {} overlap", w[0].0, w[1].0));
            }
        }
        Ok(())
    }
}

impl fmt::Display for RamLayout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<String> = self
            .regions
            .iter()
            .map(|r| format!("{:#x}+{}MiB", r.gpa, r.size >> 20))
            .collect();
        write!(f, "[{}]", parts.join(", "))
    }
}

/// Guest RAM the source reads and the destination writes.
pub trait GuestRam: Send + Sync {
    fn layout(&self) -> RamLayout;
    /// Copy bytes out of `region` at `offset` (the guest may be writing concurrently).
    fn read(&self, region: usize, offset: u64, out: &mut [u8]) -> Result<(), String>;
    /// Copy bytes into `region` at `offset`.
    fn write(&self, region: usize, offset: u64, data: &[u8]) -> Result<(), String>;
    /// The memfd behind `region`, when it can be handed to another process.
    fn memfd(&self, region: usize) -> Option<BorrowedFd<'_>>;
    /// Direct access, when the RAM is mapped in this process (it then moves without a
    /// copy in user space); `read`/`write` otherwise.
    fn mapped(&self) -> Option<&dyn MappedRam> {
        None
    }
}

/// Guest RAM mapped in this process.
///
/// # Safety
/// `host_range` must return an address valid for reads and writes of `len` bytes for as
/// long as `self` is borrowed, or `None` when the range is not inside one region.
pub unsafe trait MappedRam: Sync {
    /// Host address of `len` bytes of `region` at `offset`.
    fn host_range(&self, region: usize, offset: u64, len: usize) -> Option<NonNull<u8>>;
}

/// Destination RAM: written page by page (remote, snapshot) or adopted whole (local).
pub trait IncomingRam: GuestRam {
    /// Replace the backing of every region by the received memfds, in region order.
    /// The fds are hostile until checked: kind and size must match the layout.
    fn adopt_memfds(&mut self, fds: Vec<OwnedFd>) -> Result<(), String>;
}

/// A source of dirty pages (KVM's log, the VMM's write bitmap...).
pub trait DirtyLog: Send {
    fn start(&mut self) -> Result<(), String>;
    /// OR the pages dirtied since the previous call (or `start`) into `bitmaps`, one
    /// bitmap per region, bit `n` of word `w` = page `64 w + n`.
    fn collect(&mut self, bitmaps: &mut [Vec<u64>]) -> Result<(), String>;
    fn stop(&mut self);
}

/// Several dirty logs ORed together.
pub struct OrDirtyLogs<'a>(pub Vec<&'a mut dyn DirtyLog>);

impl DirtyLog for OrDirtyLogs<'_> {
    fn start(&mut self) -> Result<(), String> {
        self.0.iter_mut().try_for_each(|l| l.start())
    }
    fn collect(&mut self, bitmaps: &mut [Vec<u64>]) -> Result<(), String> {
        self.0.iter_mut().try_for_each(|l| l.collect(bitmaps))
    }
    fn stop(&mut self) {
        self.0.iter_mut().for_each(|l| l.stop())
    }
}

/// An empty bitmap per region.
pub fn empty_bitmaps(layout: &RamLayout) -> Vec<Vec<u64>> {
    layout
        .regions
        .iter()
        .map(|r| vec![0u64; r.pages().div_ceil(64) as usize])
        .collect()
}

/// A bitmap per region with every page set.
pub fn full_bitmaps(layout: &RamLayout) -> Vec<Vec<u64>> {
    let mut maps = empty_bitmaps(layout);
    for (map, r) in maps.iter_mut().zip(&layout.regions) {
        for p in 0..r.pages() {
            map[(p / 64) as usize] |= 1 << (p % 64);
        }
    }
    maps
}

pub fn count_pages(bitmaps: &[Vec<u64>]) -> u64 {
    bitmaps
        .iter()
        .flat_map(|m| m.iter())
        .map(|w| u64::from(w.count_ones()))
        .sum()
}

struct Mapping {
    region: RamRegion,
    fd: OwnedFd,
    ptr: NonNull<u8>,
    written: AtomicBitmap,
}

/// Guest RAM in memfds mapped shared: what baton-vmm gives KVM, and what local migration
/// hands to the next process. Writes made through [`GuestRam::write`] (device emulation)
/// are recorded in a per-region bitmap while tracking is on.
pub struct MemfdRam {
    maps: Vec<Mapping>,
    tracking: AtomicBool,
}

// SAFETY: the mappings are shared memory owned by this struct for its lifetime; concurrent
// access is plain byte copying, the same as the guest's own concurrent access.
unsafe impl Send for MemfdRam {}
// SAFETY: as above; no interior state other than atomics.
unsafe impl Sync for MemfdRam {}

impl MemfdRam {
    /// New zeroed RAM with one memfd per region.
    pub fn new(layout: &RamLayout) -> Result<Self, String> {
        layout.validate()?;
        let mut fds = Vec::new();
        for (i, r) in layout.regions.iter().enumerate() {
            let fd = nix::sys::memfd::memfd_create(
                format!("baton-ram{i}").as_str(),
                nix::sys::memfd::MFdFlags::MFD_CLOEXEC,
            )
            .map_err(|e| format!("memfd_create for region {i}: {e}"))?;
            File::from(fd.try_clone().map_err(|e| e.to_string())?)
                .set_len(r.size)
                .map_err(|e| format!("sizing region {i} to {} bytes: {e}", r.size))?;
            fds.push(fd);
        }
        Self::from_memfds(layout, fds)
    }

    /// RAM mapped from existing memfds (one per region, in order), checked first.
    pub fn from_memfds(layout: &RamLayout, fds: Vec<OwnedFd>) -> Result<Self, String> {
        layout.validate()?;
        if fds.len() != layout.regions.len() {
            return Err(format!(
                "{} memfds for {} regions",
                fds.len(),
                layout.regions.len()
            ));
        }
        let mut maps = Vec::new();
        for (i, (fd, r)) in fds.into_iter().zip(&layout.regions).enumerate() {
            let st =
                nix::sys::stat::fstat(fd.as_fd()).map_err(|e| format!("region {i}: fstat: {e}"))?;
            if st.st_mode & libc::S_IFMT != libc::S_IFREG {
                return Err(format!("region {i}: fd is not a memfd or regular file"));
            }
            if (st.st_size as u64) < r.size {
                return Err(format!(
                    "region {i}: memfd holds {} bytes, the layout needs {}",
                    st.st_size, r.size
                ));
            }
            let len = NonZeroUsize::new(r.size as usize).ok_or("empty region")?;
            // SAFETY: a fresh shared mapping of a file we hold; unmapped in Drop.
            let ptr = unsafe {
                nix::sys::mman::mmap(
                    None,
                    len,
                    nix::sys::mman::ProtFlags::PROT_READ | nix::sys::mman::ProtFlags::PROT_WRITE,
                    nix::sys::mman::MapFlags::MAP_SHARED,
                    fd.as_fd(),
                    0,
                )
            }
            .map_err(|e| format!("region {i}: mmap of {} bytes: {e}", r.size))?;
            maps.push(Mapping {
                region: *r,
                fd,
                ptr: ptr.cast(),
                written: AtomicBitmap::new(
                    r.size as usize,
                    NonZeroUsize::MIN.saturating_add(PAGE_SIZE as usize - 1),
                ),
            });
        }
        Ok(MemfdRam {
            maps,
            tracking: AtomicBool::new(false),
        })
    }

    /// Host address of `region` (for KVM memory slots).
    pub fn host_address(&self, region: usize) -> Option<*mut u8> {
        self.maps.get(region).map(|m| m.ptr.as_ptr())
    }

    /// The region's bytes. The guest may change them at any time; for tests and checks.
    pub fn snapshot(&self, region: usize) -> Option<Vec<u8>> {
        let m = self.maps.get(region)?;
        let mut v = vec![0u8; m.region.size as usize];
        self.read(region, 0, &mut v).ok()?;
        Some(v)
    }

    fn range(&self, region: usize, offset: u64, len: usize) -> Result<&Mapping, String> {
        let m = self
            .maps
            .get(region)
            .ok_or_else(|| format!("no RAM region {region}"))?;
        match offset.checked_add(len as u64) {
            Some(end) if end <= m.region.size => Ok(m),
            _ => Err(format!(
                "region {region}: {len} bytes at offset {offset:#x} exceed its {} bytes",
                m.region.size
            )),
        }
    }

    /// A dirty log over this RAM's own write bitmap.
    pub fn write_log(&self) -> MemfdWriteLog<'_> {
        MemfdWriteLog { ram: self }
    }
}

impl GuestRam for MemfdRam {
    fn layout(&self) -> RamLayout {
        RamLayout {
            regions: self.maps.iter().map(|m| m.region).collect(),
        }
    }

    fn read(&self, region: usize, offset: u64, out: &mut [u8]) -> Result<(), String> {
        let m = self.range(region, offset, out.len())?;
        // SAFETY: bounds checked above; the mapping lives as long as self.
        unsafe {
            std::ptr::copy_nonoverlapping(
                m.ptr.as_ptr().add(offset as usize),
                out.as_mut_ptr(),
                out.len(),
            )
        };
        Ok(())
    }

    fn write(&self, region: usize, offset: u64, data: &[u8]) -> Result<(), String> {
        let m = self.range(region, offset, data.len())?;
        // SAFETY: bounds checked above; the mapping lives as long as self.
        unsafe {
            std::ptr::copy_nonoverlapping(
                data.as_ptr(),
                m.ptr.as_ptr().add(offset as usize),
                data.len(),
            )
        };
        if self.tracking.load(Ordering::Acquire) {
            m.written.set_addr_range(offset as usize, data.len());
        }
        Ok(())
    }

    fn memfd(&self, region: usize) -> Option<BorrowedFd<'_>> {
        self.maps.get(region).map(|m| m.fd.as_fd())
    }

    fn mapped(&self) -> Option<&dyn MappedRam> {
        Some(self)
    }
}

// SAFETY: `range` checks the bounds; the mapping lives until `self` drops, and `self` is
// only replaced (adopt_memfds) through `&mut self`, so never while borrowed.
unsafe impl MappedRam for MemfdRam {
    fn host_range(&self, region: usize, offset: u64, len: usize) -> Option<NonNull<u8>> {
        let m = self.range(region, offset, len).ok()?;
        // SAFETY: offset + len is within the mapping (checked by `range`).
        Some(unsafe { m.ptr.add(offset as usize) })
    }
}

impl IncomingRam for MemfdRam {
    fn adopt_memfds(&mut self, fds: Vec<OwnedFd>) -> Result<(), String> {
        let adopted = MemfdRam::from_memfds(&self.layout(), fds)?;
        *self = adopted;
        Ok(())
    }
}

impl Drop for MemfdRam {
    fn drop(&mut self) {
        for m in &self.maps {
            // SAFETY: unmapping exactly what from_memfds mapped.
            let _ = unsafe { nix::sys::mman::munmap(m.ptr.cast(), m.region.size as usize) };
        }
    }
}

/// The write bitmap of a [`MemfdRam`] as a [`DirtyLog`].
pub struct MemfdWriteLog<'a> {
    ram: &'a MemfdRam,
}

impl DirtyLog for MemfdWriteLog<'_> {
    fn start(&mut self) -> Result<(), String> {
        for m in &self.ram.maps {
            m.written.reset();
        }
        self.ram.tracking.store(true, Ordering::Release);
        Ok(())
    }

    fn collect(&mut self, bitmaps: &mut [Vec<u64>]) -> Result<(), String> {
        for (m, out) in self.ram.maps.iter().zip(bitmaps.iter_mut()) {
            for (o, w) in out.iter_mut().zip(m.written.get_and_reset()) {
                *o |= w;
            }
        }
        Ok(())
    }

    fn stop(&mut self) {
        self.ram.tracking.store(false, Ordering::Release);
    }
}

pub use crate::ram_wire::{apply_pages, is_zero, PAGES_PER_SECTION, PAGE_DATA, PAGE_ZERO};
