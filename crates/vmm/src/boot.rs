//! PVH boot: load an ELF kernel with linux-loader, write the PVH start info (command
//! line, memory map) and give every vCPU the PVH entry state.
//!
//! The PVH protocol (Xen's docs/misc/pvh.pandoc, the same one Linux and QEMU use):
//! enter at the ELF note `XEN_ELFNOTE_PHYS32_ENTRY` in 32-bit protected mode, paging
//! off, flat 4 GiB segments, EBX = guest-physical address of `hvm_start_info`.
//! baton-vmm starts *every* vCPU that way (an AP is made RUNNABLE instead of waiting
//! for INIT/SIPI, because real mode is emulated very slowly on `kvm_pvm`); the
//! harness guest tells its vCPUs apart by an atomic counter.

use std::fs::File;
use std::path::Path;

use kvm_bindings::{kvm_regs, kvm_segment, kvm_sregs};
use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::elf::start_info::{hvm_memmap_table_entry, hvm_start_info};
use linux_loader::loader::elf::{Elf, PvhBootCapability};
use linux_loader::loader::{load_cmdline, Cmdline, KernelLoader};
use vm_memory::GuestAddress;

use crate::error::{Error, Result};
use crate::memory::GuestRam;

/// Where the start info, the memory map and the command line go (below 1 MiB, out of
/// the kernel's way; the same places Firecracker and Cloud Hypervisor use).
pub const START_INFO_ADDR: u64 = 0x6000;
pub const MEMMAP_ADDR: u64 = 0x7000;
pub const CMDLINE_ADDR: u64 = 0x2_0000;
/// Longest command line accepted (it must fit below the EBDA).
pub const CMDLINE_MAX: usize = 0x1_0000;
/// Lowest address an ELF may load at (the PVH convention: 1 MiB).
pub const KERNEL_MIN_ADDR: u64 = 0x10_0000;
const EBDA_START: u64 = 0x9_fc00;
const XEN_HVM_START_MAGIC: u32 = 0x336e_c578;
const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;

/// Where a loaded kernel starts.
#[derive(Clone, Copy, Debug)]
pub struct BootEntry {
    pub entry: u64,
    pub start_info: u64,
    pub kernel_end: u64,
}

/// Loads `kernel` (an ELF with a PVH note) and writes the PVH boot structures.
pub fn load_pvh(ram: &GuestRam, kernel: &Path, cmdline: &str) -> Result<BootEntry> {
    let load_err = |reason: String| Error::KernelLoad {
        path: kernel.to_path_buf(),
        reason,
    };
    let mut file = File::open(kernel).map_err(|source| Error::KernelFile {
        path: kernel.to_path_buf(),
        source,
    })?;
    let loaded = Elf::load(
        ram.memory(),
        None,
        &mut file,
        Some(GuestAddress(KERNEL_MIN_ADDR)),
    )
    .map_err(|e| load_err(e.to_string()))?;
    let entry = match loaded.pvh_boot_cap {
        PvhBootCapability::PvhEntryPresent(addr) => addr.0,
        other => return Err(load_err(format!("not a PVH kernel ({other})"))),
    };

    let mut cl = Cmdline::new(CMDLINE_MAX).map_err(|e| load_err(format!("command line: {e}")))?;
    cl.insert_str(cmdline)
        .map_err(|e| load_err(format!("command line {cmdline:?}: {e}")))?;
    load_cmdline(ram.memory(), GuestAddress(CMDLINE_ADDR), &cl)
        .map_err(|e| load_err(format!("writing the command line: {e}")))?;

    let memmap = memory_map(ram);
    let start_info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC,
        version: 1,
        cmdline_paddr: CMDLINE_ADDR,
        memmap_paddr: MEMMAP_ADDR,
        memmap_entries: memmap.len() as u32,
        ..Default::default()
    };
    let mut params = BootParams::new::<hvm_start_info>(&start_info, GuestAddress(START_INFO_ADDR));
    params.set_sections::<hvm_memmap_table_entry>(&memmap, GuestAddress(MEMMAP_ADDR));
    PvhBootConfigurator::write_bootparams(&params, ram.memory())
        .map_err(|e| load_err(format!("writing the PVH start info: {e}")))?;
    Ok(BootEntry {
        entry,
        start_info: START_INFO_ADDR,
        kernel_end: loaded.kernel_end,
    })
}

/// The PVH memory map: low RAM below the EBDA, RAM from 1 MiB, RAM above 4 GiB.
fn memory_map(ram: &GuestRam) -> Vec<hvm_memmap_table_entry> {
    let e = |addr, size, type_| hvm_memmap_table_entry {
        addr,
        size,
        type_,
        reserved: 0,
    };
    let mut map = vec![
        e(0, EBDA_START, E820_RAM),
        e(EBDA_START, KERNEL_MIN_ADDR - EBDA_START, E820_RESERVED),
    ];
    for r in ram.regions() {
        let start = r.guest_addr.max(KERNEL_MIN_ADDR);
        let end = r.guest_addr + r.size;
        if end > start {
            map.push(e(start, end - start, E820_RAM));
        }
    }
    map
}

/// General registers at the PVH entry.
pub fn entry_regs(boot: &BootEntry) -> kvm_regs {
    kvm_regs {
        rip: boot.entry,
        rbx: boot.start_info,
        rflags: 0x2,
        ..Default::default()
    }
}

/// Segment and control registers at the PVH entry: 32-bit protected mode, flat
/// segments, paging off. `sregs` should come from the vCPU (to keep KVM's APIC base
/// and the other fields it owns).
pub fn entry_sregs(mut sregs: kvm_sregs) -> kvm_sregs {
    let seg = |selector: u16, type_: u8| kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_,
        present: 1,
        dpl: 0,
        db: 1,
        s: 1,
        l: 0,
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    };
    sregs.cs = seg(0x08, 0xb);
    let data = seg(0x10, 0x3);
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = kvm_segment {
        limit: 0x67,
        type_: 0xb,
        present: 1,
        s: 0,
        g: 0,
        db: 0,
        ..seg(0x18, 0xb)
    };
    sregs.cr0 = 0x11; // PE | ET
    sregs.cr3 = 0;
    sregs.cr4 = 0;
    sregs.efer = 0;
    sregs
}
