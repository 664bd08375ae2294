//! `baton-vmm`: boot a PVH kernel (the harness guest) on KVM and run it until the
//! guest reports it is finished, a vCPU fails, the timeout passes, or SIGINT/SIGTERM.
//!
//! Exit status: 0 when the guest wrote EXIT = 0, 1 otherwise.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use baton_vmm::{parse_size, GuestExit, Vm, VmConfig};
use clap::Parser;

#[derive(Parser, Debug)]
#[command(
    name = "baton-vmm",
    version,
    about = "baton's reference VMM (KVM bring-up)"
)]
struct Args {
    /// ELF kernel with a PVH entry note (e.g. target/guest/baton-guest.elf).
    #[arg(long)]
    kernel: PathBuf,
    /// Guest RAM, e.g. 256M or 1G.
    #[arg(long, default_value = "256M", value_parser = parse_size)]
    memory: u64,
    /// Number of vCPUs (1-4).
    #[arg(long, default_value_t = 1)]
    cpus: usize,
    /// Kernel command line (baton-vmm puts `baton.console=mmio:ADDR` before it).
    #[arg(long, default_value = "")]
    cmdline: String,
    /// Stop the guest after this many seconds (0 = never).
    #[arg(long, default_value_t = 0)]
    timeout: u64,
    /// Log level: error, warn, info, debug, trace.
    #[arg(long, default_value = "info")]
    log_level: tracing::Level,
    /// Do not print the guest's status lines.
    #[arg(long)]
    quiet: bool,
}

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    STOP.store(true, Ordering::SeqCst);
}

fn main() -> ExitCode {
    let started = Instant::now();
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_max_level(args.log_level)
        .with_writer(std::io::stderr)
        .init();
    for sig in [libc::SIGINT, libc::SIGTERM] {
        if let Err(e) = vmm_sys_util::signal::register_signal_handler(sig, on_signal) {
            tracing::warn!("cannot handle signal {sig}: {e}");
        }
    }
    match run(&args, started) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            let mut msg = e.to_string();
            let mut src = std::error::Error::source(&e);
            while let Some(s) = src {
                msg.push_str(&format!(": {s}"));
                src = s.source();
            }
            tracing::error!("{msg}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: &Args, started: Instant) -> baton_vmm::Result<bool> {
    let cfg = VmConfig {
        memory: args.memory,
        cpus: args.cpus,
        kernel: args.kernel.clone(),
        cmdline: args.cmdline.clone(),
        echo: !args.quiet,
    };
    let mut vm = Vm::new(&cfg)?;
    tracing::info!(timings = ?vm.timings(), cmdline = vm.cmdline(), "VM built in {:?}", started.elapsed());
    vm.start()?;
    let status = vm.status().clone();
    let (_, hello) = status.wait_until(Duration::from_secs(10), |s| s.hello.is_some());
    if hello {
        tracing::info!("guest hello {:?} after process start", started.elapsed());
    }
    let (_, first) = status.wait_until(Duration::from_secs(10), |s| !s.last.is_empty());
    if first {
        tracing::info!(
            "first status line {:?} after process start",
            started.elapsed()
        );
    }
    let deadline = (args.timeout > 0).then(|| Instant::now() + Duration::from_secs(args.timeout));
    // Pass rate measured with the host clock from the first status line on.
    let total =
        |st: &baton_vmm::StatusState| (0..vm.cpus() as u64).map(|c| st.passes(c)).sum::<u64>();
    let rate_start = (Instant::now(), total(&status.snapshot()));
    let exit = loop {
        if let Some(exit) = vm.wait_exit(Duration::from_millis(100)) {
            break Some(exit);
        }
        if STOP.load(Ordering::SeqCst) {
            tracing::info!("stopping on signal");
            break None;
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            tracing::info!("stopping after --timeout {}s", args.timeout);
            break None;
        }
    };
    let st = status.snapshot();
    let secs = rate_start.0.elapsed().as_secs_f64();
    let passes = total(&st).saturating_sub(rate_start.1);
    if secs > 0.0 && passes > 0 {
        let pages =
            st.regions.values().map(|r| r.1 / 4096).sum::<u64>() / st.regions.len().max(1) as u64;
        tracing::info!(
            "pass rate: {:.0} passes/s over all vCPUs ({:.1} M pages/s, {pages} pages per region)",
            passes as f64 / secs,
            passes as f64 * pages as f64 / secs / 1e6
        );
    }
    let stop_started = Instant::now();
    vm.stop()?;
    tracing::info!("vCPU threads stopped in {:?}", stop_started.elapsed());
    for cpu in 0..vm.cpus() {
        tracing::info!(cpu, passes = st.passes(cpu as u64), "final pass count");
        match vm.vcpu_state(cpu) {
            Ok(state) => tracing::debug!(cpu, ?state, "final vCPU state"),
            Err(e) => tracing::warn!(cpu, "reading the final vCPU state: {e}"),
        }
    }
    if let Some(f) = &st.failure {
        tracing::error!("guest failure: {f}");
    }
    Ok(match exit {
        Some(GuestExit::Code(0)) => true,
        Some(other) => {
            tracing::error!(?other, "guest did not finish cleanly");
            false
        }
        // Stopped by the host: success if the guest was healthy.
        None => st.failure.is_none() && !st.last.is_empty(),
    })
}
