//! The baton harness guest.
//!
//! A bare-metal PVH ELF that boots the same way on baton-vmm and on QEMU's `microvm`
//! machine and runs QEMU's migration-test workload: each vCPU increments one byte in
//! every page of its own RAM region, pass after pass, and reports its pass counter to
//! the host. A migration test can then stop the guest anywhere and check that every
//! page is consistent (see `workload`).
//!
//! Why bare metal and CPL3: `kvm_pvm` (this project's KVM) runs only 64-bit CPL3 code
//! at native speed, so `boot` does the minimum at CPL0 and drops to CPL3, where all of
//! this Rust code runs. The protocol (command line and status lines) is described in
//! `tests/guest/README.md`.

#![no_std]
#![no_main]

mod boot;
mod cmdline;
mod console;
mod mem;
mod pvh;
mod virtio_mmio;
mod virtio_net;
mod workload;

use core::sync::atomic::{AtomicBool, Ordering};

use cmdline::{Config, Console};
use console::{Bytes, Sink};

/// Protocol version printed in the hello line.
pub const PROTOCOL_VERSION: u32 = 1;

static READY: AtomicBool = AtomicBool::new(false);
static mut CONFIG: Config = Config::new();
static mut MEMMAP: &[pvh::MemmapEntry] = &[];

/// CPL3 entry from `boot` (RDI = PVH start info address, RSI = vCPU index).
#[no_mangle]
pub extern "C" fn guest_main(start_info: u64, cpu: u64) -> ! {
    if cpu == 0 {
        boot_cpu(start_info);
    }
    while !READY.load(Ordering::Acquire) {
        core::hint::spin_loop();
    }
    // SAFETY: written once by vCPU 0 before READY was set (Release), read-only after.
    let (cfg, memmap) = unsafe { (CONFIG, MEMMAP) };
    if cpu == 0 && cfg.net != cmdline::NetMode::Off {
        virtio_net::run(&cfg)
    }
    workload::run(cpu as usize, &cfg, memmap)
}

fn boot_cpu(start_info: u64) {
    let info = match pvh::read(start_info) {
        Ok(info) => info,
        Err(e) => {
            say!("error reason=\"{}\" start_info=0x{:x}", e, start_info);
            console::exit(console::EXIT_BAD_BOOT);
        }
    };
    let cfg = cmdline::parse(info.cmdline);
    console::init(Sink {
        console: cfg.console,
        exit_port: cfg.exit_port,
    });
    // SAFETY: the other vCPUs wait for READY before reading these.
    unsafe {
        CONFIG = cfg;
        MEMMAP = info.memmap;
    }
    if let Some(bad) = cfg.bad_option {
        say!("error reason=\"bad option\" option=\"{}\"", Bytes(bad));
        console::exit(console::EXIT_BAD_OPTION);
    }
    let console = match cfg.console {
        Console::Mmio(a) => ("mmio", a),
        Console::Pio(p) => ("pio", p as u64),
    };
    say!(
        "hello version={} console={}:0x{:x} region_size=0x{:x} report_ms={} passes={} \
         virtio={} memmap={} image_end=0x{:x}",
        PROTOCOL_VERSION,
        console.0,
        console.1,
        cfg.region_size,
        cfg.report_ms,
        cfg.passes,
        cfg.n_virtio,
        info.memmap.len(),
        boot::image_end()
    );
    for (i, v) in cfg.virtio().iter().enumerate() {
        say!(
            "virtio-mmio index={} addr=0x{:x} size=0x{:x} irq={}",
            i,
            v.addr,
            v.size,
            v.irq
        );
    }
    if cfg.virtio_dropped > 0 {
        say!("warning virtio-mmio dropped={}", cfg.virtio_dropped);
    }
    workload::start_timer();
    READY.store(true, Ordering::Release);
}

/// CPL3 landing point of every CPU exception (see `boot`): report and stop.
#[no_mangle]
pub extern "C" fn guest_fault(vector: u64, error: u64, rip: u64, cr2: u64, cs: u64, cpu: u64) -> ! {
    static FAULTED: AtomicBool = AtomicBool::new(false);
    if FAULTED.swap(true, Ordering::AcqRel) {
        boot::halt_forever();
    }
    console::force_unlock();
    say!(
        "fault cpu={} vector={} error=0x{:x} rip=0x{:x} cr2=0x{:x} cpl={}",
        cpu,
        vector,
        error,
        rip,
        cr2,
        cs & 3
    );
    console::exit(console::EXIT_FAULT + vector as u32)
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    match info.location() {
        Some(l) => say!("panic file={} line={}", l.file(), l.line()),
        None => say!("panic"),
    }
    console::exit(console::EXIT_PANIC)
}
