//! QEMU's migration-test workload: increment one byte in every page of a region, pass
//! after pass.
//!
//! vCPU `c` owns the region `base + c * size` where `base` is the first 2 MiB boundary
//! after the guest image and `size` is `baton.region`. Within one pass the pages are
//! visited in address order and each page's first byte goes up by one (mod 256), so at
//! any instant a region looks like `[v+1, .., v+1, v, .., v]`: stopping the guest at any
//! point (or migrating it) must leave at most one place where the byte drops by one,
//! scanning up from the first page; anything else is lost or stale memory.
//!
//! Every `report_ms` (measured in 10 ms LAPIC timer ticks) a vCPU sends
//! `status cpu=C pass=N ticks=T tsc=X`; with `baton.passes=N` it sends `done ...` after
//! N passes, and when every started vCPU is done vCPU 0 tells the host (EXIT = 0).

use core::sync::atomic::{AtomicU32, Ordering};

use crate::boot;
use crate::cmdline::Config;
use crate::console;
use crate::pvh::{self, MemmapEntry};
use crate::say;

const PAGE: u64 = 4096;
const REGION_ALIGN: u64 = 2 << 20;
/// One LAPIC timer tick.
pub const TICK_MS: u64 = 10;

const LAPIC: u64 = 0xfee0_0000;
const LAPIC_SVR: u64 = 0xf0;
const LAPIC_LVT_TIMER: u64 = 0x320;
const LAPIC_LVT0: u64 = 0x350;
const LAPIC_TIMER_INIT: u64 = 0x380;
const LAPIC_TIMER_DIV: u64 = 0x3e0;
const TIMER_VECTOR: u32 = 0x20;
const SPURIOUS_VECTOR: u32 = 0xff;
/// KVM's and QEMU's LAPIC count at 1 GHz; divide by 16, 10 ms = 625000 counts.
const TIMER_COUNT_10MS: u32 = 625_000;

static DONE: AtomicU32 = AtomicU32::new(0);

fn lapic_write(reg: u64, val: u32) {
    // SAFETY: the LAPIC page is identity mapped and user-accessible; these are
    // architectural xAPIC registers.
    unsafe { ((LAPIC + reg) as *mut u32).write_volatile(val) };
}

/// Starts the periodic LAPIC timer on this vCPU (vector 0x20 counts `boot::ticks`).
pub fn start_timer() {
    lapic_write(LAPIC_SVR, 0x100 | SPURIOUS_VECTOR);
    lapic_write(LAPIC_LVT0, 1 << 16);
    lapic_write(LAPIC_TIMER_DIV, 0x3);
    lapic_write(LAPIC_LVT_TIMER, (1 << 17) | TIMER_VECTOR);
    lapic_write(LAPIC_TIMER_INIT, TIMER_COUNT_10MS);
}

fn rdtsc() -> u64 {
    // SAFETY: RDTSC is allowed at CPL3 (CR4.TSD is clear).
    unsafe { core::arch::x86_64::_rdtsc() }
}

/// The region of vCPU `cpu`, or None when it would leave RAM or the identity map.
pub fn region(cpu: usize, cfg: &Config, memmap: &[MemmapEntry]) -> Option<(u64, u64)> {
    let base = boot::image_end().checked_add(REGION_ALIGN - 1)? & !(REGION_ALIGN - 1);
    let size = cfg.region_size & !(PAGE - 1);
    let start = base.checked_add(size.checked_mul(cpu as u64)?)?;
    let end = start.checked_add(size)?;
    (end <= 1 << 32 && pvh::is_ram(memmap, start, size)).then_some((start, size))
}

/// Runs the workload on this vCPU; never returns.
pub fn run(cpu: usize, cfg: &Config, memmap: &[MemmapEntry]) -> ! {
    let Some((start, size)) = region(cpu, cfg, memmap) else {
        say!(
            "error reason=\"region not in RAM\" cpu={} region_size=0x{:x}",
            cpu,
            cfg.region_size
        );
        console::exit(console::EXIT_BAD_REGION);
    };
    let pages = size / PAGE;
    say!(
        "start cpu={} region=0x{:x} size=0x{:x} pages={}",
        cpu,
        start,
        size,
        pages
    );
    let report_ticks = (cfg.report_ms / TICK_MS).max(1);
    let mut last_report = boot::ticks();
    let mut pass: u64 = 0;
    loop {
        let mut p = start as *mut u8;
        for _ in 0..pages {
            // SAFETY: the region was checked to be RAM inside the identity map, and
            // only this vCPU touches it.
            unsafe {
                p.write_volatile(p.read_volatile().wrapping_add(1));
                p = p.add(PAGE as usize);
            }
        }
        pass += 1;
        let now = boot::ticks();
        if now.wrapping_sub(last_report) >= report_ticks {
            last_report = now;
            say!(
                "status cpu={} pass={} ticks={} tsc={}",
                cpu,
                pass,
                now,
                rdtsc()
            );
        }
        if cfg.passes != 0 && pass >= cfg.passes {
            break;
        }
    }
    // Every page was incremented exactly `pass` times from zero: a page lost or rolled
    // back by a migration shows up here.
    let want = pass as u8;
    let mut bad: u64 = 0;
    let mut p = start as *const u8;
    for _ in 0..pages {
        // SAFETY: as above.
        unsafe {
            if p.read_volatile() != want {
                bad += 1;
            }
            p = p.add(PAGE as usize);
        }
    }
    say!(
        "done cpu={} pass={} ticks={} tsc={} bad={}",
        cpu,
        pass,
        boot::ticks(),
        rdtsc(),
        bad
    );
    if bad != 0 {
        console::exit(console::EXIT_PAGE_LOST);
    }
    DONE.fetch_add(1, Ordering::AcqRel);
    if cpu != 0 {
        boot::halt_forever();
    }
    while DONE.load(Ordering::Acquire) < boot::cpus_started() {
        core::hint::spin_loop();
    }
    console::exit(console::EXIT_OK)
}
