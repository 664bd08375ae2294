//! `baton-vmm`: boot a PVH kernel (the harness guest) on KVM and run it until the
//! guest reports it is finished, a vCPU fails, the timeout passes, or SIGINT/SIGTERM.
//!
//! Exit status: 0 when the guest wrote EXIT = 0, 1 otherwise.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use std::sync::Arc;

use baton_vmm::control::{commands, Ending, Vmm, VmmConfig};
use baton_vmm::devices::{CliDevices, DevicePlan};
use baton_vmm::{parse_size, GuestExit, Vm, VmConfig};
use clap::Parser;

#[derive(Parser, Debug)]
#[command(
    name = "baton-vmm",
    version,
    about = "baton's reference VMM (KVM bring-up)"
)]
struct Args {
    /// ELF kernel with a PVH entry note (e.g. target/guest/baton-guest.elf); required
    /// unless --incoming (or a `help` query).
    #[arg(long)]
    kernel: Option<PathBuf>,
    /// Machine type (`microvm` = newest; `help` lists them).
    #[arg(long, default_value = "microvm")]
    machine: String,
    /// A device, `TYPE,id=ID,prop=value,...`; `TYPE,help` lists its properties.
    #[arg(long)]
    device: Vec<String>,
    /// A default for every device of a type: `DRIVER.PROP=VALUE`.
    #[arg(long)]
    global: Vec<String>,
    /// QMP control socket path.
    #[arg(long)]
    qmp: Option<PathBuf>,
    /// Wait for a migration: `unix:PATH`, `tcp:HOST:PORT`, `file:PATH`, or `defer`
    /// (then QMP `migrate-incoming`).
    #[arg(long)]
    incoming: Option<String>,
    /// Migration capabilities to turn on, comma-separated (`x-ignore-shared` = local
    /// live update with RAM handed over by memfd, `backend-transfer`, `early-setup`,
    /// `multifd`); QMP `migrate-set-capabilities` does the same.
    #[arg(long, value_delimiter = ',')]
    migrate_capabilities: Vec<String>,
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

fn device_registry() -> Result<baton_qdev::DeviceRegistry, String> {
    baton_qdev::DeviceRegistry::with_types([
        baton_virtio_net_tap::device_type(),
        baton_vhost_user_blk::device_type(),
    ])
    .map_err(|e| e.to_string())
}

fn run(args: &Args, started: Instant) -> baton_vmm::Result<bool> {
    let cfg_err = baton_vmm::Error::Config;
    if args.machine == "help" {
        print!(
            "{}",
            baton_machine_types::MachineRegistry::builtin().render_list()
        );
        return Ok(true);
    }
    let machine = baton_machine_types::MachineRegistry::builtin()
        .lookup(&args.machine)
        .map_err(|e| cfg_err(e.to_string()))?;
    if let Some(w) = machine.deprecation_warning() {
        tracing::warn!("{w}");
    }
    let registry = device_registry().map_err(cfg_err)?;
    let plan = match DevicePlan::from_cli(&args.device, &args.global, &machine, &registry)
        .map_err(cfg_err)?
    {
        CliDevices::Helped => return Ok(true),
        CliDevices::Plan(p) => p,
    };
    let vm = match (&args.incoming, &args.kernel) {
        (Some(_), _) => None,
        (None, Some(kernel)) => {
            let cfg = VmConfig {
                memory: args.memory,
                cpus: args.cpus,
                kernel: kernel.clone(),
                // The devices first, so the user's words come last and win.
                cmdline: format!("{} {}", plan.cmdline(), args.cmdline)
                    .trim()
                    .to_string(),
                echo: !args.quiet,
            };
            let mut vm = Vm::new(&cfg)?;
            plan.attach(&mut vm, baton_virtio_net_tap::BackendMode::Open)?;
            tracing::info!(timings = ?vm.timings(), cmdline = vm.cmdline(), "VM built in {:?}", started.elapsed());
            vm.start()?;
            Some(vm)
        }
        (None, None) => return Err(cfg_err("--kernel or --incoming is required".into())),
    };
    let mut qmp = baton_qmp::QmpServer::builder();
    if let Some(p) = &args.qmp {
        qmp = qmp.unix(p);
    }
    let vmm = Vmm::new(
        vm,
        VmmConfig {
            machine: machine.name(),
            memory: args.memory,
            cpus: args.cpus,
            echo: !args.quiet,
            registry: Arc::new(registry),
            plan,
        },
        qmp.event_sender(),
    );
    for c in &args.migrate_capabilities {
        vmm.set_capability(c, true).map_err(cfg_err)?;
    }
    let _server = match &args.qmp {
        Some(_) => Some(
            qmp.start(commands(&vmm))
                .map_err(|e| cfg_err(format!("QMP: {e}")))?,
        ),
        None => None,
    };
    if let Some(uri) = args.incoming.as_deref().filter(|u| *u != "defer") {
        vmm.start_incoming(uri)
            .map_err(|e| cfg_err(format!("--incoming {uri}: {}", e.desc)))?;
    }
    // Wait until there is a running VM (an incoming one appears when its migration ends).
    let status = loop {
        // (An incoming VM's threads start parked; it runs once its migration ends.)
        if let Some(vm) = vmm
            .slot
            .lock()
            .as_ref()
            .filter(|vm| vm.is_started() && !vm.is_paused())
        {
            break vm.status().clone();
        }
        if let Some(end) = vmm.wait_end(Duration::from_millis(20)) {
            tracing::info!(?end, "ending before the VM ran");
            return Ok(end == Ending::Quit && args.incoming.is_none());
        }
        if STOP.load(Ordering::SeqCst) {
            return Ok(false);
        }
    };
    let (_, hello) = status.wait_until(Duration::from_secs(10), |s| {
        s.hello.is_some() || !s.last.is_empty()
    });
    if hello {
        tracing::info!(
            "guest reporting {:?} after process start",
            started.elapsed()
        );
    }
    let deadline = (args.timeout > 0).then(|| Instant::now() + Duration::from_secs(args.timeout));
    let cpus = args.cpus as u64;
    let total = |st: &baton_vmm::StatusState| (0..cpus).map(|c| st.passes(c)).sum::<u64>();
    let rate_start = (Instant::now(), total(&status.snapshot()));
    let exit = loop {
        if let Some(exit) = status
            .wait_until(Duration::from_millis(50), |s| s.exit.is_some())
            .0
            .exit
        {
            break Some(exit);
        }
        match vmm.wait_end(Duration::from_millis(1)) {
            Some(Ending::MigratedAway) => {
                tracing::info!("migrated: the destination runs; exiting");
                return Ok(true);
            }
            Some(Ending::Quit) => {
                tracing::info!("quit");
                break None;
            }
            None => {}
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
        tracing::info!(
            "pass rate: {:.0} passes/s over all vCPUs",
            passes as f64 / secs
        );
    }
    if let Some(vm) = vmm.slot.lock().as_mut() {
        let stop_started = Instant::now();
        vm.stop()?;
        tracing::info!("vCPU threads stopped in {:?}", stop_started.elapsed());
    }
    for cpu in 0..cpus {
        tracing::info!(cpu, passes = st.passes(cpu), "final pass count");
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
