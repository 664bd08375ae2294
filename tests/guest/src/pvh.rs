//! Reading the PVH start info (`struct hvm_start_info`, Xen's arch-x86/hvm/start_info.h)
//! that the VMM (baton-vmm, or QEMU's firmware) leaves at the address in EBX.
//! Only the fields the guest needs: the command line and the memory map (version 1).

/// `XEN_HVM_START_MAGIC_VALUE`.
pub const START_MAGIC: u32 = 0x336e_c578;
/// Memory map entry type for usable RAM (E820 numbering).
pub const MEMMAP_RAM: u32 = 1;

/// The PVH start info as laid out by the boot protocol.
#[repr(C)]
pub struct StartInfo {
    pub magic: u32,
    pub version: u32,
    pub flags: u32,
    pub nr_modules: u32,
    pub modlist_paddr: u64,
    pub cmdline_paddr: u64,
    pub rsdp_paddr: u64,
    pub memmap_paddr: u64,
    pub memmap_entries: u32,
    pub reserved: u32,
}

/// One entry of the PVH memory map.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct MemmapEntry {
    pub addr: u64,
    pub size: u64,
    pub kind: u32,
    pub reserved: u32,
}

/// What the guest takes from the start info.
pub struct BootInfo {
    pub cmdline: &'static [u8],
    pub memmap: &'static [MemmapEntry],
}

/// Highest command line length the guest reads.
const CMDLINE_MAX: usize = 4096;

/// Reads the start info at `paddr` (identity mapped). Errors are static strings because
/// the guest has no allocator.
pub fn read(paddr: u64) -> Result<BootInfo, &'static str> {
    if paddr == 0 || paddr >= 1 << 32 {
        return Err("no PVH start info");
    }
    // SAFETY: the low 4 GiB are identity mapped; the boot protocol puts the start info
    // there and leaves it untouched for us.
    let si = unsafe { &*(paddr as *const StartInfo) };
    if si.magic != START_MAGIC {
        return Err("bad PVH start info magic");
    }
    let cmdline = if si.cmdline_paddr == 0 || si.cmdline_paddr >= 1 << 32 {
        &[][..]
    } else {
        let base = si.cmdline_paddr as *const u8;
        let mut len = 0;
        // SAFETY: the command line is a NUL-terminated string in identity-mapped RAM.
        while len < CMDLINE_MAX && unsafe { base.add(len).read_volatile() } != 0 {
            len += 1;
        }
        // SAFETY: `len` bytes were just read from that range.
        unsafe { core::slice::from_raw_parts(base, len) }
    };
    let memmap = if si.version >= 1 && si.memmap_paddr != 0 && si.memmap_paddr < 1 << 32 {
        let n = (si.memmap_entries as usize).min(128);
        // SAFETY: the memory map is an array of `n` entries in identity-mapped RAM.
        unsafe { core::slice::from_raw_parts(si.memmap_paddr as *const MemmapEntry, n) }
    } else {
        &[][..]
    };
    Ok(BootInfo { cmdline, memmap })
}

/// Whether `[start, start+len)` lies inside one RAM entry of the map. An empty map
/// (old firmware) cannot tell, so it answers yes.
pub fn is_ram(memmap: &[MemmapEntry], start: u64, len: u64) -> bool {
    if memmap.is_empty() {
        return true;
    }
    let Some(end) = start.checked_add(len) else {
        return false;
    };
    memmap
        .iter()
        .any(|e| e.kind == MEMMAP_RAM && e.addr <= start && e.addr.saturating_add(e.size) >= end)
}
