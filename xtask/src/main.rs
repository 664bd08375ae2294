//! `cargo xtask` — baton's developer tasks (see the library docs for what they do).
//!
//! ```text
//! cargo xtask demo [--memory SIZE]  live-update a running guest into a new baton-vmm
//! cargo xtask guest                 build target/guest/baton-guest.elf
//! cargo xtask qemu [options]        fetch QEMU 7.2 (Debian, unpacked) and boot the guest
//!     --passes N      stop after N passes (default 300)
//!     --region SIZE   bytes dirtied by the guest (default 16M)
//!     --memory SIZE   guest RAM (default 256M)
//!     --accel A       tcg (default) or kvm
//!     --timeout SECS  give up after SECS (default 120)
//!     --fetch-only    only download and unpack QEMU
//! cargo xtask bench live-update     local live-update downtime, baton vs QEMU (see bench.rs)
//! ```

use std::process::ExitCode;
use std::time::Duration;

use xtask::{err, guest, qemu, target_dir, Result};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: &[String]) -> Result<()> {
    match args.first().map(String::as_str) {
        Some("guest") => {
            let elf = guest::build(&target_dir())?;
            println!("{}", elf.display());
            Ok(())
        }
        Some("qemu") => qemu_cmd(&args[1..]),
        Some("bench") if args.get(1).map(String::as_str) == Some("net-update") => {
            xtask::bench_net::main(&args[2..])
        }
        Some("bench") => xtask::bench::main(&args[1..]),
        Some("demo") => match &args[1..] {
            [] => xtask::demo::demo("1G"),
            [flag, size] if flag == "--memory" => xtask::demo::demo(size),
            _ => Err(err!("usage: cargo xtask demo [--memory SIZE]")),
        },
        _ => Err(err!("usage: cargo xtask demo [--memory SIZE] | cargo xtask guest | cargo xtask qemu [--passes N] [--region SIZE] [--memory SIZE] [--accel tcg|kvm] [--timeout SECS] [--fetch-only] | cargo xtask bench live-update [--runs N]")),
    }
}

fn qemu_cmd(args: &[String]) -> Result<()> {
    let mut opts = qemu::BootOptions::default();
    let mut fetch_only = false;
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        let mut value = || {
            it.next()
                .cloned()
                .ok_or_else(|| err!("{flag} needs a value"))
        };
        match flag.as_str() {
            "--passes" => opts.passes = value()?.parse().map_err(|e| err!("--passes: {e}"))?,
            "--region" => opts.region = value()?,
            "--memory" => opts.memory = value()?,
            "--accel" => opts.accel = value()?,
            "--timeout" => {
                let secs: u64 = value()?.parse().map_err(|e| err!("--timeout: {e}"))?;
                opts.timeout = Duration::from_secs(secs);
            }
            "--fetch-only" => fetch_only = true,
            other => return Err(err!("unknown option {other}")),
        }
    }
    if opts.passes == 0 {
        return Err(err!(
            "--passes must be at least 1 (the run ends on the guest's `done`)"
        ));
    }
    let target = target_dir();
    let qemu = qemu::fetch(&target)?;
    let version = xtask::run(qemu.command().arg("--version"))?;
    let version = String::from_utf8_lossy(&version.stdout);
    eprintln!(
        "xtask: {}",
        version.lines().next().unwrap_or("QEMU (unknown version)")
    );
    if fetch_only {
        println!("{}", qemu.binary().display());
        return Ok(());
    }
    let elf = guest::build(&target)?;
    let report = qemu::boot(&qemu, &elf, &opts)?;
    let last = report.last_status().unwrap_or("(none)");
    println!(
        "xtask: guest under QEMU {} ({}): {last} in {:.2?}",
        opts.accel,
        elf.display(),
        report.elapsed
    );
    Ok(())
}
