//! A source and a destination VM migrating on two threads, optionally through a [`Relay`],
//! and the checks every failure test makes afterwards: the source runs on with nothing
//! lost, the destination never ran.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use baton_migration::VmControl;
use baton_migration::{
    incoming, migrate, Capabilities, DestinationVm, GuestRam, IncomingOutcome, IncomingSettings,
    MemfdRam, MigrationError, MigrationMode, MigrationMonitor, MigrationOutcome, MigrationSettings,
    MigrationStatus, Parameters, SourceVm, Target,
};
use baton_qdev::Migratable;

use super::relay::{Action, Chan, ChannelHeader, Event, HeaderAction, Relay};
use super::wrapped::{dev, wrapped_counters};
use super::{layout, listen, Gate, TempDir, Via, Workload};

type SrcResult = (
    Result<MigrationOutcome, MigrationError>,
    Vec<Box<dyn Migratable>>,
);
type DstResult = (
    Result<IncomingOutcome, MigrationError>,
    MemfdRam,
    Vec<Box<dyn Migratable>>,
);
type PlanFn = Box<dyn Fn(&Event<'_>) -> Action + Send + Sync>;
type HeaderFn = Box<dyn Fn(Chan, &ChannelHeader) -> HeaderAction + Send + Sync>;

/// What to migrate and how; [`Spec::new`] gives two matching sides.
pub struct Spec {
    pub mode: MigrationMode,
    pub via: Via,
    pub src_caps: Capabilities,
    pub dst_caps: Capabilities,
    pub src_machine: String,
    pub dst_machine: String,
    pub src_devs: Vec<Box<dyn Migratable>>,
    pub dst_devs: Vec<Box<dyn Migratable>>,
    pub params: Parameters,
    pub ram_mib: u64,
    /// Relay plan (UNIX only): how to treat each section and channel header.
    pub plan: Option<(PlanFn, HeaderFn)>,
    /// The destination's vCPU resume waits for this latch.
    pub dst_hold_resume: Option<super::relay::Latch>,
}

impl Spec {
    pub fn new(mode: MigrationMode, caps: Capabilities) -> Spec {
        let adopt = caps.backend_transfer;
        Spec {
            mode,
            via: Via::Unix,
            src_caps: caps.clone(),
            dst_caps: caps,
            src_machine: "microvm-1.1".into(),
            dst_machine: "microvm-1.1".into(),
            src_devs: wrapped_counters(2, super::Side::Source),
            dst_devs: wrapped_counters(2, super::Side::Destination { adopt }),
            params: Parameters {
                downtime_limit: 50,
                ..Parameters::default()
            },
            ram_mib: 8,
            plan: None,
            dst_hold_resume: None,
        }
    }

    pub fn relay(mut self, plan: impl Fn(&Event<'_>) -> Action + Send + Sync + 'static) -> Spec {
        self.plan = Some((Box::new(plan), Box::new(|_, _| HeaderAction::Forward)));
        self
    }

    pub fn relay_headers(
        mut self,
        header: impl Fn(Chan, &ChannelHeader) -> HeaderAction + Send + Sync + 'static,
    ) -> Spec {
        self.plan = Some((Box::new(|_| Action::Forward), Box::new(header)));
        self
    }

    /// Start both sides; the source's guest runs a workload throughout.
    pub fn start(self) -> Running {
        let dir = TempDir::new("pair");
        let (listener, dst_target) = listen(&self.via, &dir);
        let ram_channels = if self.src_caps.multifd && self.mode == MigrationMode::Remote {
            usize::from(self.params.multifd_channels)
        } else {
            0
        };
        let (target, relay) = match (self.plan, &dst_target) {
            (Some((plan, header)), Target::Unix(dst_path)) => {
                let p = dir.0.join("relay.sock");
                let r = Relay::start(&p, dst_path, 1 + ram_channels, plan, header);
                (Target::Unix(p), Some(r))
            }
            (Some(_), _) => panic!("the relay speaks UNIX sockets only"),
            (None, t) => (t.clone(), None),
        };
        let lay = layout(self.ram_mib);
        let src_ram = Arc::new(MemfdRam::new(&lay).unwrap());
        for p in (0..lay.regions[1].pages()).step_by(3) {
            src_ram.write(1, p * 4096, &(p + 1).to_le_bytes()).unwrap();
        }
        let src_gate = Gate::default();
        let mut dst_gate = Gate::default();
        dst_gate.pause().unwrap();
        *dst_gate.hold_resume.lock().unwrap() = self.dst_hold_resume.clone();
        let workload = Workload::start(src_ram.clone(), src_gate.clone(), lay.regions[0].pages());
        let (src_monitor, dst_monitor) = (MigrationMonitor::new(), MigrationMonitor::new());

        let in_settings = IncomingSettings {
            machine_type: self.dst_machine,
            capabilities: self.dst_caps,
        };
        let (mut dst_devs, g, m) = (self.dst_devs, dst_gate.clone(), dst_monitor.clone());
        let dst = std::thread::spawn(move || {
            let mut gate = g;
            let mut ram = MemfdRam::new(&layout(self.ram_mib)).unwrap();
            let r = incoming(
                listener,
                &in_settings,
                DestinationVm {
                    devices: &mut dst_devs,
                    ram: &mut ram,
                    control: &mut gate,
                },
                &m,
            );
            (r, ram, dst_devs)
        });
        let settings = MigrationSettings {
            mode: self.mode,
            machine_type: self.src_machine,
            capabilities: self.src_caps,
            parameters: self.params,
        };
        let (mut src_devs, g, m, r) = (
            self.src_devs,
            src_gate.clone(),
            src_monitor.clone(),
            src_ram.clone(),
        );
        let src = std::thread::spawn(move || {
            let mut gate = g;
            let mut log = r.write_log();
            let res = migrate(
                &target,
                &settings,
                SourceVm {
                    devices: &mut src_devs,
                    ram: &*r,
                    dirty_log: &mut log,
                    control: &mut gate,
                },
                &m,
            );
            (res, src_devs)
        });
        Running {
            dir,
            src: Some(src),
            dst: Some(dst),
            src_monitor,
            dst_monitor,
            relay,
            src_ram,
            src_gate,
            dst_gate,
            workload: Some(workload),
        }
    }

    pub fn run(self) -> Ran {
        self.start().finish()
    }
}

/// Both sides under way.
pub struct Running {
    dir: TempDir,
    src: Option<JoinHandle<SrcResult>>,
    dst: Option<JoinHandle<DstResult>>,
    pub src_monitor: MigrationMonitor,
    pub dst_monitor: MigrationMonitor,
    relay: Option<Relay>,
    src_ram: Arc<MemfdRam>,
    pub src_gate: Gate,
    pub dst_gate: Gate,
    workload: Option<Workload>,
}

/// Wait (at most 20 s) until `f` holds.
pub fn wait_until(what: &str, f: impl Fn() -> bool) {
    let t = Instant::now();
    while !f() {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
}

impl Running {
    pub fn finish(mut self) -> Ran {
        let (src, src_devs) = self.src.take().unwrap().join().unwrap();
        // A destination left waiting for a connection that will never come is cancelled.
        let dst_handle = self.dst.take().unwrap();
        let t = Instant::now();
        while !dst_handle.is_finished() && t.elapsed() < Duration::from_secs(3) {
            std::thread::sleep(Duration::from_millis(5));
        }
        let stuck = !dst_handle.is_finished();
        if stuck {
            self.dst_monitor.cancel();
        }
        let (dst, dst_ram, dst_devs) = dst_handle.join().unwrap();
        let recording = self.relay.take().map(|r| r.join()).unwrap_or_default();
        Ran {
            _dir: self.dir,
            src,
            dst,
            dst_stuck: stuck,
            src_ram: self.src_ram.clone(),
            dst_ram,
            src_devs,
            dst_devs,
            src_gate: self.src_gate.clone(),
            dst_gate: self.dst_gate.clone(),
            workload: self.workload.take(),
            recording,
            src_monitor: self.src_monitor.clone(),
            dst_monitor: self.dst_monitor.clone(),
        }
    }
}

/// Both sides done.
pub struct Ran {
    _dir: TempDir,
    pub src: Result<MigrationOutcome, MigrationError>,
    pub dst: Result<IncomingOutcome, MigrationError>,
    /// The destination waited for a connection until the harness cancelled it.
    pub dst_stuck: bool,
    pub src_ram: Arc<MemfdRam>,
    pub dst_ram: MemfdRam,
    pub src_devs: Vec<Box<dyn Migratable>>,
    pub dst_devs: Vec<Box<dyn Migratable>>,
    pub src_gate: Gate,
    pub dst_gate: Gate,
    pub workload: Option<Workload>,
    /// The main channel as the destination received it (relay only).
    pub recording: Vec<u8>,
    pub src_monitor: MigrationMonitor,
    pub dst_monitor: MigrationMonitor,
}

impl Ran {
    pub fn src_err(&self) -> String {
        match &self.src {
            Ok(_) => panic!("the source succeeded"),
            Err(e) => e.to_string(),
        }
    }

    pub fn dst_err(&self) -> String {
        match &self.dst {
            Ok(_) => panic!("the destination succeeded"),
            Err(e) => e.to_string(),
        }
    }

    /// The source's guest and devices run on as if nothing had happened.
    pub fn assert_source_runs(&mut self) {
        let g = &self.src_gate;
        assert!(!g.is_paused(), "the source's vCPUs run");
        assert_eq!(
            g.pauses.load(Ordering::SeqCst),
            g.resumes.load(Ordering::SeqCst),
            "every pause was undone"
        );
        let status = self.src_monitor.status();
        assert!(
            matches!(status, MigrationStatus::Failed | MigrationStatus::Cancelled),
            "source status {status:?}"
        );
        let w = self.workload.take().expect("workload");
        let before = w.writes.load(Ordering::SeqCst);
        wait_until("the source's workload to write", || {
            w.writes.load(Ordering::SeqCst) > before + 100
        });
        let counts = w.stop();
        for (i, d) in self.src_devs.iter_mut().enumerate() {
            let c = &mut dev(d).inner;
            assert!(
                matches!(c.backend, super::testdev::Backend::Active(_)),
                "device {i}: backend in use again, not {:?}",
                c.backend
            );
            let before = c.counter;
            c.tick().expect("the device works on its own backend");
            assert_eq!(c.backend_value(), Some(before + 1));
            assert_eq!(before, 10 + i as u64, "device {i}: state untouched");
        }
        // Memory holds exactly what the workload wrote.
        let mut b = [0u8; 8];
        for (slot, want) in counts.iter().enumerate() {
            let (page, word) = (slot as u64 / 8, slot as u64 % 8);
            self.src_ram
                .read(0, page * 4096 + word * 8, &mut b)
                .unwrap();
            assert_eq!(
                u64::from_le_bytes(b),
                *want,
                "page {page} word {word}: the workload's writes were lost"
            );
        }
    }

    /// The destination never ran and dropped what it had prepared.
    pub fn assert_destination_discarded(&mut self) {
        assert!(self.dst.is_err(), "the destination failed");
        let g = &self.dst_gate;
        assert!(g.is_paused(), "the destination's vCPUs never ran");
        assert_eq!(g.resumes.load(Ordering::SeqCst), 0, "never resumed");
        let status = self.dst_monitor.status();
        assert!(
            matches!(status, MigrationStatus::Failed | MigrationStatus::Cancelled),
            "destination status {status:?}"
        );
        for d in &mut self.dst_devs {
            assert!(
                dev(d).inner.prepared_ring.is_none(),
                "early-setup preparation discarded"
            );
        }
    }

    /// Both ends: the source runs, the destination discarded.
    pub fn assert_rolled_back(&mut self) {
        self.assert_source_runs();
        self.assert_destination_discarded();
    }
}
