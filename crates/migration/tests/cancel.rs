//! Cancel in every state the source and destination pass through, on either side: the
//! source resumes with nothing lost, the destination discards and never runs. Each test
//! holds the migration in its state (a relay holding a section, or a device hook that
//! blocks), checks both statuses, cancels, then lets go.

// Results are passed around whole to assert on their text; size is no concern here.
#![allow(clippy::result_large_err)]

mod support;

use std::sync::atomic::Ordering;
use std::time::Duration;

use baton_migration::protocol::SectionType;
use baton_migration::{Capabilities, MigrationMode, MigrationStatus, Parameters};
use support::pair::{wait_until, Running, Spec};
use support::relay::{Action, Latch};
use support::wrapped::dev;

fn early() -> Capabilities {
    Capabilities {
        early_setup: true,
        ..Default::default()
    }
}

fn local_caps() -> Capabilities {
    Capabilities {
        backend_transfer: true,
        early_setup: true,
        multifd: false,
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Who {
    Source,
    Destination,
}

fn cancel(run: &Running, who: Who) {
    match who {
        Who::Source => run.src_monitor.cancel(),
        Who::Destination => run.dst_monitor.cancel(),
    }
}

fn assert_statuses(run: &Running, src: MigrationStatus, dst: MigrationStatus) {
    // A side's thread may not have reached its first status yet.
    wait_until("both statuses", || {
        run.src_monitor.status() != MigrationStatus::None
            && run.dst_monitor.status() != MigrationStatus::None
    });
    assert_eq!(run.src_monitor.status(), src, "source status");
    assert_eq!(run.dst_monitor.status(), dst, "destination status");
}

fn one_of(text: &str, options: &[String]) {
    assert!(
        options.iter().any(|o| o == text),
        "{text:?} is none of {options:#?}"
    );
}

/// Hold the HANDSHAKE in the relay: the source waits for the reply, the destination for
/// the handshake.
fn in_handshake(who: Who) {
    let latch = Latch::default();
    let l = latch.clone();
    let run = Spec::new(MigrationMode::Remote, early())
        .relay(move |e| {
            if e.ty == SectionType::Handshake {
                Action::Hold(l.clone())
            } else {
                Action::Forward
            }
        })
        .start();
    latch.wait_reached();
    assert_statuses(&run, MigrationStatus::Setup, MigrationStatus::Setup);
    cancel(&run, who);
    latch.open();
    let mut r = run.finish();
    if who == Who::Source {
        assert_eq!(r.src_err(), "migration cancelled");
        assert_eq!(r.src_monitor.status(), MigrationStatus::Cancelled);
        assert_eq!(
            r.dst_err(),
            "main: peer closed the channel reading section #1 (after #0 HANDSHAKE)"
        );
    } else {
        assert_eq!(r.dst_err(), "migration cancelled");
        assert_eq!(r.dst_monitor.status(), MigrationStatus::Cancelled);
        assert_eq!(r.src_err(), "destination failed: migration cancelled");
    }
    r.assert_rolled_back();
}

#[test]
fn cancel_source_in_handshake() {
    in_handshake(Who::Source);
}

#[test]
fn cancel_destination_in_handshake() {
    in_handshake(Who::Destination);
}

#[test]
fn cancel_destination_waiting_for_a_connection() {
    let dir = support::TempDir::new("cancel-accept");
    let (listener, _target) = support::listen(&support::Via::Unix, &dir);
    let monitor = baton_migration::MigrationMonitor::new();
    let m = monitor.clone();
    let t = std::thread::spawn(move || {
        let mut ram = baton_migration::MemfdRam::new(&support::layout(1)).unwrap();
        let mut devs = support::counters(1, support::Side::Destination { adopt: false });
        let mut gate = support::Gate::default();
        baton_migration::incoming(
            listener,
            &baton_migration::IncomingSettings {
                machine_type: "microvm-1.1".into(),
                capabilities: Capabilities::default(),
            },
            baton_migration::DestinationVm {
                devices: &mut devs,
                ram: &mut ram,
                control: &mut gate,
            },
            &m,
        )
        .map(|_| ())
    });
    wait_until("setup", || monitor.status() == MigrationStatus::Setup);
    std::thread::sleep(Duration::from_millis(20));
    monitor.cancel();
    let e = t.join().unwrap().unwrap_err();
    assert_eq!(e.to_string(), "migration cancelled");
    assert_eq!(monitor.status(), MigrationStatus::Cancelled);
}

/// Block the destination's first early-setup `prepare`: the source waits for
/// SWITCHOVER_ACK.
fn waiting_for_switchover_ack(who: Who) {
    let latch = Latch::default();
    let mut s = Spec::new(MigrationMode::Remote, early());
    dev(&mut s.dst_devs[0]).block_prepare = Some(latch.clone());
    let run = s.start();
    latch.wait_reached();
    assert_statuses(&run, MigrationStatus::Setup, MigrationStatus::Setup);
    cancel(&run, who);
    latch.open();
    let mut r = run.finish();
    if who == Who::Source {
        assert_eq!(r.src_err(), "migration cancelled");
        assert_eq!(r.src_monitor.status(), MigrationStatus::Cancelled);
        // The destination notices sending its ack or reading on (the cancel may beat
        // the source's second early state).
        one_of(
            &r.dst_err(),
            &[
                "main: peer closed the channel reading section #2 (after #1 EARLY_STATE)".into(),
                "main: peer closed the channel reading section #3 (after #2 EARLY_STATE)".into(),
                "main: peer closed the channel sending section #1 SWITCHOVER_ACK".into(),
            ],
        );
    } else {
        assert_eq!(r.dst_err(), "migration cancelled");
        assert_eq!(r.dst_monitor.status(), MigrationStatus::Cancelled);
        assert_eq!(r.src_err(), "destination failed: migration cancelled");
    }
    r.assert_rolled_back();
}

#[test]
fn cancel_source_waiting_for_switchover_ack() {
    waiting_for_switchover_ack(Who::Source);
}

#[test]
fn cancel_destination_preparing_early_state() {
    waiting_for_switchover_ack(Who::Destination);
}

/// Pre-copy slowed down by the bandwidth limit, cancelled while RAM flows.
fn in_precopy(who: Who, caps: Capabilities) {
    let mut s = Spec::new(MigrationMode::Remote, caps);
    s.params = Parameters {
        max_bandwidth: 4 << 20,
        downtime_limit: 1,
        ..Parameters::default()
    };
    s.ram_mib = 16;
    let run = s.start();
    wait_until("pre-copy", || {
        run.src_monitor.status() == MigrationStatus::Active
            && run.dst_monitor.status() == MigrationStatus::Active
    });
    std::thread::sleep(Duration::from_millis(300));
    assert_statuses(&run, MigrationStatus::Active, MigrationStatus::Active);
    cancel(&run, who);
    let mut r = run.finish();
    assert_eq!(r.src_gate.pauses.load(Ordering::SeqCst), 0, "never paused");
    if who == Who::Source {
        assert_eq!(r.src_err(), "migration cancelled");
        assert_eq!(r.src_monitor.status(), MigrationStatus::Cancelled);
        // Whichever channel sees the end first reports it: RAM channels mid-pass, the main
        // channel after the handshake (RAM on RAM channels) or after RAM.
        let d = r.dst_err();
        let (chan, rest) = d.split_once(": ").unwrap();
        assert!(["main", "ram0", "ram1"].contains(&chan), "{d}");
        let rest = rest
            .strip_prefix("peer closed the channel reading section #")
            .unwrap_or_else(|| panic!("{d}"));
        let after = rest.trim_start_matches(|c: char| c.is_ascii_digit());
        let ok = after == " RAM_PAGES"
            || [" RAM_PAGES)", " RAM_ITERATION_END)", " HANDSHAKE)"]
                .iter()
                .any(|s| after.starts_with(" (after #") && after.ends_with(s));
        assert!(ok, "{d}");
    } else {
        assert_eq!(r.dst_err(), "migration cancelled");
        assert_eq!(r.dst_monitor.status(), MigrationStatus::Cancelled);
        assert_eq!(r.src_err(), "destination failed: migration cancelled");
    }
    r.assert_rolled_back();
}

#[test]
fn cancel_source_in_precopy() {
    in_precopy(Who::Source, early());
}

#[test]
fn cancel_destination_in_precopy() {
    in_precopy(Who::Destination, early());
}

#[test]
fn cancel_source_in_multifd_precopy() {
    let caps = Capabilities {
        multifd: true,
        ..Default::default()
    };
    in_precopy(Who::Source, caps.clone());
}

#[test]
fn cancel_destination_in_multifd_precopy() {
    let caps = Capabilities {
        multifd: true,
        ..Default::default()
    };
    in_precopy(Who::Destination, caps);
}

/// Block the destination's `load` of ctr1: the source is paused, backends exported, in
/// the device state, waiting for READY.
fn in_device_state(who: Who) {
    let latch = Latch::default();
    let mut s = Spec::new(MigrationMode::Local, local_caps());
    dev(&mut s.dst_devs[1]).block_load = Some(latch.clone());
    let run = s.start();
    latch.wait_reached();
    assert_statuses(&run, MigrationStatus::Device, MigrationStatus::Device);
    assert!(
        run.src_gate.is_paused(),
        "the source is paused at switchover"
    );
    cancel(&run, who);
    latch.open();
    let mut r = run.finish();
    if who == Who::Source {
        assert_eq!(r.src_err(), "migration cancelled");
        assert_eq!(r.src_monitor.status(), MigrationStatus::Cancelled);
        // END had arrived (the cancel may beat SCHEMA); the destination never got GO.
        one_of(
            &r.dst_err(),
            &[
                "main: peer closed the channel reading section #12 (after #11 END)".into(),
                "main: peer closed the channel reading section #13 (after #12 SCHEMA)".into(),
                "main: peer closed the channel sending section #3 READY".into(),
            ],
        );
    } else {
        assert_eq!(r.dst_err(), "migration cancelled");
        assert_eq!(r.dst_monitor.status(), MigrationStatus::Cancelled);
        assert_eq!(r.src_err(), "destination failed: migration cancelled");
    }
    r.assert_rolled_back();
}

#[test]
fn cancel_source_in_device_state() {
    in_device_state(Who::Source);
}

#[test]
fn cancel_destination_in_device_state() {
    in_device_state(Who::Destination);
}

#[test]
fn cancel_after_running_undoes_nothing() {
    let mut r = Spec::new(MigrationMode::Local, local_caps()).run();
    r.src.as_ref().expect("migration");
    r.dst.as_ref().expect("incoming");
    r.src_monitor.cancel();
    r.dst_monitor.cancel();
    assert!(!r.src_monitor.is_cancelled() && !r.dst_monitor.is_cancelled());
    assert_eq!(r.src_monitor.status(), MigrationStatus::Completed);
    assert_eq!(r.dst_monitor.status(), MigrationStatus::Completed);
    assert!(r.src_gate.is_paused(), "the source stays stopped");
    assert!(!r.dst_gate.is_paused(), "the destination runs on");
    for (s, d) in r.src_devs.iter_mut().zip(r.dst_devs.iter_mut()) {
        let (s, d) = (&mut dev(s).inner, &mut dev(d).inner);
        assert!(matches!(s.backend, support::testdev::Backend::Released));
        d.tick().expect("the destination's device works");
        assert_eq!(d.backend_value(), Some(s.counter + 1));
    }
    r.workload.take().unwrap().stop();
}

#[test]
fn cancel_after_go_undoes_nothing() {
    // The destination holds in its vCPU resume, after GO: the source is committed.
    let latch = Latch::default();
    let mut s = Spec::new(MigrationMode::Local, local_caps());
    s.dst_hold_resume = Some(latch.clone());
    let run = s.start();
    latch.wait_reached();
    assert_statuses(&run, MigrationStatus::Device, MigrationStatus::Device);
    run.src_monitor.cancel();
    run.dst_monitor.cancel();
    latch.open();
    let mut r = run.finish();
    r.src
        .as_ref()
        .expect("a cancel after GO does not stop the migration");
    r.dst
        .as_ref()
        .expect("a cancel after the destination committed does nothing");
    assert!(!r.src_monitor.is_cancelled() && !r.dst_monitor.is_cancelled());
    assert_eq!(r.src_monitor.status(), MigrationStatus::Completed);
    assert!(r.src_gate.is_paused(), "the source stays stopped");
    assert!(!r.dst_gate.is_paused(), "the destination runs");
    for d in &mut r.src_devs {
        assert!(matches!(
            dev(d).inner.backend,
            support::testdev::Backend::Released
        ));
    }
    r.workload.take().unwrap().stop();
}
