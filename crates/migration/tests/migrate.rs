//! End-to-end migrations over real sockets: a source thread and a destination thread, guest
//! RAM written concurrently during pre-copy, devices with real fd backends.

// Results are passed around whole to assert on their text; size is no concern here.
#![allow(clippy::result_large_err)]

mod support;

use std::sync::Arc;
use std::thread;

use baton_migration::{
    incoming, migrate, Capabilities, DestinationVm, GuestRam, IncomingSettings, MemfdRam,
    MigrationMode, MigrationMonitor, MigrationStatus, SourceVm, VmControl,
};
use support::*;

struct Outcome {
    src_ram: Arc<MemfdRam>,
    dst_ram: MemfdRam,
    src_devs: Vec<Box<dyn baton_qdev::Migratable>>,
    dst_devs: Vec<Box<dyn baton_qdev::Migratable>>,
    report: baton_migration::DowntimeReport,
    writes_during: u64,
    src_gate: Gate,
    dst_gate: Gate,
}

fn run(mode: MigrationMode, via: Via, caps: Capabilities, ram_mib: u64) -> Outcome {
    let dir = TempDir::new("ok");
    let (listener, target) = listen(&via, &dir);
    let lay = layout(ram_mib);
    let src_ram = Arc::new(MemfdRam::new(&lay).unwrap());
    // Some content everywhere, zero pages too.
    for p in (0..lay.regions[1].pages()).step_by(3) {
        src_ram.write(1, p * 4096, &p.to_le_bytes()).unwrap();
    }
    let src_gate = Gate::default();
    let mut dst_gate = Gate::default();
    dst_gate.pause().unwrap();
    let workload = Workload::start(src_ram.clone(), src_gate.clone(), lay.regions[0].pages());
    let mut dst_ram = MemfdRam::new(&lay).unwrap();
    let mut dst_devs = counters(
        2,
        Side::Destination {
            adopt: caps.backend_transfer,
        },
    );
    let in_settings = IncomingSettings {
        machine_type: "microvm-1.1".into(),
        capabilities: caps.clone(),
    };
    let dst_gate2 = dst_gate.clone();
    let dst = thread::spawn(move || {
        let mut gate = dst_gate2;
        let r = incoming(
            listener,
            &in_settings,
            DestinationVm {
                devices: &mut dst_devs,
                ram: &mut dst_ram,
                control: &mut gate,
            },
            &MigrationMonitor::new(),
        );
        (r.map(|_| ()), dst_ram, dst_devs)
    });
    let mut src_devs = counters(2, Side::Source);
    let mut log = src_ram.write_log();
    let mut gate = src_gate.clone();
    let monitor = MigrationMonitor::new();
    let w0 = workload.writes.load(std::sync::atomic::Ordering::SeqCst);
    let out = migrate(
        &target,
        &settings(mode, caps),
        SourceVm {
            devices: &mut src_devs,
            ram: &*src_ram,
            dirty_log: &mut log,
            control: &mut gate,
        },
        &monitor,
    )
    .expect("migration");
    let writes_during = workload.writes.load(std::sync::atomic::Ordering::SeqCst) - w0;
    assert_eq!(monitor.status(), MigrationStatus::Completed);
    let (dst_r, dst_ram, dst_devs) = dst.join().unwrap();
    dst_r.expect("incoming");
    workload.stop();
    Outcome {
        src_ram,
        dst_ram,
        src_devs,
        dst_devs,
        report: out.report,
        writes_during,
        src_gate,
        dst_gate,
    }
}

fn assert_same(o: &mut Outcome) {
    assert!(o.src_gate.is_paused(), "a migrated source stays paused");
    assert!(!o.dst_gate.is_paused(), "the destination runs");
    for r in 0..2 {
        let (a, b) = (
            o.src_ram.snapshot(r).unwrap(),
            o.dst_ram.snapshot(r).unwrap(),
        );
        let diff = a.iter().zip(&b).position(|(x, y)| x != y);
        assert!(diff.is_none(), "region {r} differs at byte {diff:?}");
    }
    for (s, d) in o.src_devs.iter_mut().zip(o.dst_devs.iter_mut()) {
        let (s, d) = (counter(s), counter(d));
        assert_eq!((s.counter, s.ring_size), (d.counter, d.ring_size));
    }
}

#[test]
fn remote_over_unix_with_concurrent_writes() {
    let mut o = run(
        MigrationMode::Remote,
        Via::Unix,
        Capabilities::default(),
        32,
    );
    assert!(o.writes_during > 0, "the workload ran during pre-copy");
    assert_same(&mut o);
}

#[test]
fn remote_over_tcp_with_two_ram_channels() {
    if !require(private_netns()) {
        return;
    }
    let caps = Capabilities {
        multifd: true,
        early_setup: true,
        ..Default::default()
    };
    let mut o = run(MigrationMode::Remote, Via::Tcp, caps, 32);
    assert!(o.writes_during > 0);
    assert_same(&mut o);
    for d in &mut o.dst_devs {
        assert_eq!(
            counter(d).preparations,
            1,
            "early state prepared once, unchanged at switchover"
        );
    }
}

#[test]
fn local_hands_over_ram_and_backends() {
    let caps = Capabilities {
        backend_transfer: true,
        early_setup: true,
        multifd: false,
    };
    let mut o = run(MigrationMode::Local, Via::Unix, caps, 64);
    assert_same(&mut o);
    // Same memfd: a write on one side is seen by the other.
    o.dst_ram.write(0, 4096 * 7, &[0xab; 8]).unwrap();
    let mut b = [0u8; 8];
    o.src_ram.read(0, 4096 * 7, &mut b).unwrap();
    assert_eq!(b, [0xab; 8]);
    // Backends: the destination's devices work on the handed-over memfds, and the source
    // released its copies.
    for (s, d) in o.src_devs.iter_mut().zip(o.dst_devs.iter_mut()) {
        let (s, d) = (counter(s), counter(d));
        d.tick().unwrap();
        assert_eq!(d.backend_value(), Some(s.counter + 1));
        assert!(matches!(s.backend, testdev::Backend::Released));
    }
    let r = &o.report;
    assert!(r.destination.is_some());
    println!("{}", r.render());
}

#[test]
fn snapshot_and_restore() {
    let dir = TempDir::new("snap");
    let file = dir.0.join("vm.snap");
    let lay = layout(16);
    let src_ram = MemfdRam::new(&lay).unwrap();
    for p in (0..lay.regions[0].pages()).step_by(5) {
        src_ram.write(0, p * 4096 + 100, b"snapshot").unwrap();
    }
    let mut src_devs = counters(2, Side::Source);
    let mut gate = Gate::default();
    let mut log = src_ram.write_log();
    let caps = Capabilities {
        early_setup: true,
        ..Default::default()
    };
    migrate(
        &baton_migration::Target::File(file.clone()),
        &settings(MigrationMode::Snapshot, caps.clone()),
        SourceVm {
            devices: &mut src_devs,
            ram: &src_ram,
            dirty_log: &mut log,
            control: &mut gate,
        },
        &MigrationMonitor::new(),
    )
    .expect("snapshot");
    assert!(!gate.is_paused(), "the VM runs again after a snapshot");

    let mut dst_ram = MemfdRam::new(&lay).unwrap();
    let mut dst_devs = counters(2, Side::Destination { adopt: false });
    let mut dgate = Gate::default();
    dgate.pause().unwrap();
    incoming(
        baton_migration::Incoming::File(file.clone()),
        &IncomingSettings {
            machine_type: "microvm-1.1".into(),
            capabilities: caps,
        },
        DestinationVm {
            devices: &mut dst_devs,
            ram: &mut dst_ram,
            control: &mut dgate,
        },
        &MigrationMonitor::new(),
    )
    .expect("restore");
    assert_eq!(src_ram.snapshot(0), dst_ram.snapshot(0));
    assert_eq!(src_ram.snapshot(1), dst_ram.snapshot(1));
    assert_eq!(counter(&mut dst_devs[1]).counter, 11);

    // The analyzer decodes it from its own schema.
    let v = baton_migration::stream::analyze_file(&file).expect("analyze");
    let secs = v["sections"].as_array().unwrap();
    let states: Vec<_> = secs
        .iter()
        .filter(|s| s["type"] == "DEVICE_STATE")
        .collect();
    assert_eq!(states.len(), 2);
    assert_eq!(states[1]["content"]["state"]["counter"], 11);
    assert_eq!(states[1]["content"]["state"]["ring_size"], 128);
    assert!(v["ram"]["pages"].as_u64().unwrap() >= lay.total_bytes() / 4096);
}

/// RAM that offers no mapping: the engine falls back to `read`/`write` (a VMM whose RAM
/// lives elsewhere).
struct Unmapped(MemfdRam);

impl GuestRam for Unmapped {
    fn layout(&self) -> baton_migration::RamLayout {
        self.0.layout()
    }
    fn read(&self, region: usize, offset: u64, out: &mut [u8]) -> Result<(), String> {
        self.0.read(region, offset, out)
    }
    fn write(&self, region: usize, offset: u64, data: &[u8]) -> Result<(), String> {
        self.0.write(region, offset, data)
    }
    fn memfd(&self, region: usize) -> Option<std::os::fd::BorrowedFd<'_>> {
        self.0.memfd(region)
    }
}

impl baton_migration::IncomingRam for Unmapped {
    fn adopt_memfds(&mut self, fds: Vec<std::os::fd::OwnedFd>) -> Result<(), String> {
        self.0.adopt_memfds(fds)
    }
}

#[test]
fn remote_with_ram_that_is_not_mapped_here() {
    let dir = TempDir::new("unmapped");
    let (listener, target) = listen(&Via::Unix, &dir);
    let lay = layout(8);
    let src = Unmapped(MemfdRam::new(&lay).unwrap());
    for p in (0..lay.regions[0].pages()).step_by(2) {
        src.write(0, p * 4096 + 9, &p.to_le_bytes()).unwrap();
    }
    let caps = Capabilities {
        multifd: true,
        ..Default::default()
    };
    let in_settings = IncomingSettings {
        machine_type: "microvm-1.1".into(),
        capabilities: caps.clone(),
    };
    let dst = thread::spawn(move || {
        let mut ram = Unmapped(MemfdRam::new(&layout(8)).unwrap());
        let mut devs = counters(2, Side::Destination { adopt: false });
        let mut gate = Gate::default();
        incoming(
            listener,
            &in_settings,
            DestinationVm {
                devices: &mut devs,
                ram: &mut ram,
                control: &mut gate,
            },
            &MigrationMonitor::new(),
        )
        .expect("incoming");
        ram
    });
    let mut devs = counters(2, Side::Source);
    let mut log = src.0.write_log();
    migrate(
        &target,
        &settings(MigrationMode::Remote, caps),
        SourceVm {
            devices: &mut devs,
            ram: &src,
            dirty_log: &mut log,
            control: &mut Gate::default(),
        },
        &MigrationMonitor::new(),
    )
    .expect("migration");
    let dst = dst.join().unwrap();
    assert!(dst.mapped().is_none() && src.mapped().is_none());
    for r in 0..2 {
        assert_eq!(src.0.snapshot(r), dst.0.snapshot(r), "region {r}");
    }
}
