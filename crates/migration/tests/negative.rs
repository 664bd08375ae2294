//! Migrations that must fail: handshake mismatches, broken channel headers, corrupted and
//! cut live streams, a destination that refuses or dies, a source that dies. Each test
//! asserts the exact error text on both sides where both report, that the source runs on
//! with nothing lost, and that the destination never ran.

// Results are passed around whole to assert on their text; size is no concern here.
#![allow(clippy::result_large_err)]

mod support;

use std::sync::{Arc, Mutex};

use baton_migration::protocol::{ChannelKind, SectionType, FOOTER_MAGIC, MAGIC};
use baton_migration::{Capabilities, MigrationMode};
use support::pair::Spec;
use support::relay::{Action, Chan, HeaderAction};
use support::wrapped::{dev, wrapped_counters, Wrapped};
use support::*;

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

fn multifd() -> Capabilities {
    Capabilities {
        multifd: true,
        ..Default::default()
    }
}

/// A handshake rejection: both sides report the same list, nothing was paused.
fn assert_rejected(spec: Spec, errors: &[&str]) {
    let mut r = spec.run();
    let text = format!("handshake rejected: {}", errors.join("; "));
    assert_eq!(r.src_err(), text);
    assert_eq!(r.dst_err(), text);
    assert_eq!(
        r.src_gate.pauses.load(std::sync::atomic::Ordering::SeqCst),
        0
    );
    r.assert_rolled_back();
}

#[test]
fn machine_type_mismatch() {
    let mut s = Spec::new(MigrationMode::Remote, early());
    s.dst_machine = "microvm-2.0".into();
    assert_rejected(
        s,
        &["machine type: source microvm-1.1, destination microvm-2.0"],
    );
}

#[test]
fn device_missing_on_the_destination() {
    let mut s = Spec::new(MigrationMode::Remote, early());
    s.dst_devs.pop();
    assert_rejected(s, &["device ctr1: missing on the destination"]);
}

#[test]
fn device_missing_on_the_source() {
    let mut s = Spec::new(MigrationMode::Remote, early());
    s.src_devs.pop();
    assert_rejected(s, &["device ctr1: missing on the source"]);
}

fn versioned(side: Side, version: u32, minimum: u32) -> Vec<Box<dyn baton_qdev::Migratable>> {
    let mut devs = wrapped_counters(2, side);
    let w = std::mem::replace(
        dev(&mut devs[1]),
        Wrapped::new(CounterDevice::new_incoming("x")),
    );
    devs[1] = Box::new(w.with_version(version, minimum));
    devs
}

#[test]
fn device_version_too_new_for_the_destination() {
    let mut s = Spec::new(MigrationMode::Remote, early());
    s.src_devs = versioned(Side::Source, 2, 1);
    assert_rejected(
        s,
        &["device ctr1: test-counter version 2 is newer than the destination's newest 1"],
    );
}

#[test]
fn device_version_too_old_for_the_destination() {
    let mut s = Spec::new(MigrationMode::Remote, early());
    s.dst_devs = versioned(Side::Destination { adopt: false }, 3, 2);
    assert_rejected(
        s,
        &["device ctr1: test-counter version 1 is older than the destination's oldest 2"],
    );
}

#[test]
fn capability_mismatch() {
    let mut s = Spec::new(MigrationMode::Remote, early());
    s.dst_caps.early_setup = false;
    assert_rejected(
        s,
        &[
            "capability early-setup: source on, destination off",
            "device ctr0: early-setup: source on, destination off",
            "device ctr1: early-setup: source on, destination off",
        ],
    );
}

#[test]
fn backend_transfer_on_the_source_only() {
    let mut s = Spec::new(MigrationMode::Local, local_caps());
    s.dst_caps.backend_transfer = false;
    s.dst_devs = wrapped_counters(2, Side::Destination { adopt: false });
    assert_rejected(
        s,
        &[
            "capability backend-transfer: source on, destination off",
            "device ctr0: backend-transfer: source on, destination off",
            "device ctr1: backend-transfer: source on, destination off",
        ],
    );
}

#[test]
fn backend_transfer_on_the_destination_only() {
    let mut s = Spec::new(MigrationMode::Local, local_caps());
    s.src_caps.backend_transfer = false;
    assert_rejected(
        s,
        &[
            "capability backend-transfer: source off, destination on",
            "device ctr0: backend-transfer: source off, destination on",
            "device ctr1: backend-transfer: source off, destination on",
        ],
    );
}

#[test]
fn one_device_waits_for_a_backend_the_source_keeps() {
    let mut s = Spec::new(MigrationMode::Local, local_caps());
    dev(&mut s.src_devs[0]).inner.backend_transfer = false;
    assert_rejected(
        s,
        &["device ctr0: backend-transfer: source off, destination on"],
    );
}

#[test]
fn backend_transfer_asked_over_tcp() {
    if !require(private_netns()) {
        return;
    }
    // The source refuses before it connects; the destination waits until cancelled.
    let mut s = Spec::new(MigrationMode::Remote, local_caps());
    s.via = Via::Tcp;
    let mut r = s.run();
    let e = r.src_err();
    assert!(
        e.starts_with(
            "invalid configuration: capability backend-transfer needs a UNIX socket, \
             the target is tcp:127.0.0.1:"
        ),
        "{e}"
    );
    assert!(r.dst_stuck, "no connection ever reached the destination");
    assert_eq!(r.dst_err(), "migration cancelled");
    r.assert_rolled_back();
}

#[test]
fn backend_transfer_capability_mismatch_over_tcp() {
    if !require(private_netns()) {
        return;
    }
    // The destination asks for backends over TCP: both sides report every consequence.
    let mut s = Spec::new(MigrationMode::Remote, early());
    s.via = Via::Tcp;
    s.dst_caps.backend_transfer = true;
    s.dst_devs = wrapped_counters(2, Side::Destination { adopt: true });
    assert_rejected(
        s,
        &[
            "capability backend-transfer: source off, destination on",
            "device ctr0: backend-transfer: source off, destination on",
            "device ctr1: backend-transfer: source off, destination on",
        ],
    );
}

/// A relay that corrupts the channel header of `which`; both sides report `want`.
fn header_test(caps: Capabilities, which: Chan, f: fn(&mut Vec<u8>), want: &str) {
    let s = Spec::new(MigrationMode::Remote, caps).relay_headers(move |c, h| {
        if c != which {
            return HeaderAction::Forward;
        }
        let mut b = h.encode().to_vec();
        f(&mut b);
        HeaderAction::Raw(b)
    });
    let mut r = s.run();
    assert_eq!(r.dst_err(), want);
    assert_eq!(r.src_err(), format!("destination failed: {want}"));
    r.assert_rolled_back();
}

#[test]
fn channel_header_with_bad_magic() {
    let bad = *b"BATONMIX";
    header_test(
        early(),
        Chan::Main,
        |b| b[..8].copy_from_slice(b"BATONMIX"),
        &format!(
            "channel header: bad magic {:02x?} (expected {:02x?} \"BATONMIG\")",
            &bad[..],
            MAGIC
        ),
    );
}

#[test]
fn channel_header_of_a_newer_protocol() {
    header_test(
        early(),
        Chan::Main,
        |b| b[8..12].copy_from_slice(&2u32.to_le_bytes()),
        "channel header: protocol version 2 is not supported (this build speaks 1)",
    );
    header_test(
        early(),
        Chan::Main,
        |b| b[8..12].copy_from_slice(&0u32.to_le_bytes()),
        "channel header: protocol version 0 is not supported (this build speaks 1)",
    );
}

#[test]
fn channel_header_of_the_wrong_kind() {
    header_test(
        early(),
        Chan::Main,
        |b| b[28] = ChannelKind::Ram as u8,
        "channel header: first channel must be main/0, got Ram/0",
    );
    header_test(
        early(),
        Chan::Main,
        |b| b[28] = 7,
        "channel header: unknown channel kind 7",
    );
}

#[test]
fn ram_channel_from_another_session() {
    header_test(
        multifd(),
        Chan::Ram(1),
        |b| b[12] ^= 0xff,
        "channel header: RAM channel from another session",
    );
}

#[test]
fn ram_channel_that_claims_to_be_main() {
    header_test(
        multifd(),
        Chan::Ram(0),
        |b| b[28] = ChannelKind::Main as u8,
        "channel header: expected a RAM channel below 2, got Main/0",
    );
}

/// Where the relay acted: the section's sequence number.
#[derive(Clone, Default)]
struct Mark(Arc<Mutex<Option<u32>>>);

impl Mark {
    fn first(&self, seq: u32) -> bool {
        let mut g = self.0.lock().unwrap();
        if g.is_none() {
            *g = Some(seq);
            true
        } else {
            false
        }
    }
    fn get(&self) -> u32 {
        self.0.lock().unwrap().expect("the relay acted")
    }
}

#[test]
fn corrupted_footer_on_a_live_stream() {
    let mark = Mark::default();
    let m = mark.clone();
    let s = Spec::new(MigrationMode::Local, local_caps()).relay(move |e| {
        if e.ty == SectionType::DeviceState && m.first(e.seq) {
            Action::CorruptFooter
        } else {
            Action::Forward
        }
    });
    let mut r = s.run();
    let seq = mark.get();
    let want = format!(
        "main: section #{seq} DEVICE_STATE: bad footer {:#010x} (expected {:#010x})",
        FOOTER_MAGIC ^ seq ^ 0x5a,
        FOOTER_MAGIC ^ seq
    );
    assert_eq!(r.dst_err(), want);
    assert_eq!(r.src_err(), format!("destination failed: {want}"));
    assert!(r.src_gate.pauses.load(std::sync::atomic::Ordering::SeqCst) > 0);
    r.assert_rolled_back();
}

/// RAM_PAGES whose first page has an unknown kind.
fn bad_pages(payload: &[u8]) -> Vec<u8> {
    let mut p = payload.to_vec();
    p[6 + 8] = 7;
    p
}

#[test]
fn destination_refuses_a_page_mid_precopy() {
    let mark = Mark::default();
    let m = mark.clone();
    let s = Spec::new(MigrationMode::Remote, early()).relay(move |e| {
        if e.ty == SectionType::RamPages && e.seq >= 10 && m.first(e.seq) {
            Action::Replace(bad_pages(e.payload))
        } else {
            Action::Forward
        }
    });
    let mut r = s.run();
    let want = format!(
        "main: section #{} RAM_PAGES: page 0: unknown page kind 7",
        mark.get()
    );
    assert_eq!(r.dst_err(), want);
    assert_eq!(r.src_err(), format!("destination failed: {want}"));
    r.assert_rolled_back();
}

#[test]
fn destination_refuses_a_page_on_a_ram_channel_before_the_source_pauses() {
    let mark = Mark::default();
    let m = mark.clone();
    let mut s = Spec::new(MigrationMode::Remote, multifd()).relay(move |e| {
        if e.chan == Chan::Ram(1) && e.ty == SectionType::RamPages && e.seq >= 3 && m.first(e.seq) {
            Action::Replace(bad_pages(e.payload))
        } else {
            Action::Forward
        }
    });
    s.ram_mib = 32;
    let mut r = s.run();
    let want = format!(
        "ram1: section #{} RAM_PAGES: page 0: unknown page kind 7",
        mark.get()
    );
    assert_eq!(r.dst_err(), want);
    assert_eq!(r.src_err(), format!("destination failed: {want}"));
    // Reported while pre-copy still ran: the guest was never paused.
    assert_eq!(
        r.src_gate.pauses.load(std::sync::atomic::Ordering::SeqCst),
        0
    );
    r.assert_rolled_back();
}

#[test]
fn destination_device_refuses_its_state_at_switchover() {
    let mut s = Spec::new(MigrationMode::Local, local_caps());
    dev(&mut s.dst_devs[1]).fail_load = Some("ring does not fit".into());
    let mut r = s.run();
    assert_eq!(r.dst_err(), "ctr1: load: ring does not fit");
    assert_eq!(
        r.src_err(),
        "destination failed: ctr1: load: ring does not fit"
    );
    r.assert_rolled_back();
}

fn matches_seq(text: &str, prefix: &str, suffixes: &[&str]) -> bool {
    text.strip_prefix(prefix).is_some_and(|rest| {
        let digits = rest.chars().take_while(char::is_ascii_digit).count();
        digits > 0 && suffixes.contains(&&rest[digits..])
    })
}

#[test]
fn destination_dies_mid_precopy() {
    let mark = Mark::default();
    let m = mark.clone();
    let s = Spec::new(MigrationMode::Remote, early()).relay(move |e| {
        if e.ty == SectionType::RamPages && e.seq >= 8 && m.first(e.seq) {
            Action::CutBefore
        } else {
            Action::Forward
        }
    });
    let mut r = s.run();
    let seq = mark.get();
    assert_eq!(
        r.dst_err(),
        format!(
            "main: peer closed the channel reading section #{seq} (after #{} RAM_PAGES)",
            seq - 1
        )
    );
    let e = r.src_err();
    assert!(
        matches_seq(
            &e,
            "main: peer closed the channel sending section #",
            &[" RAM_PAGES", " RAM_ITERATION_END"]
        ),
        "{e}"
    );
    r.assert_rolled_back();
}

#[test]
fn destination_dies_mid_switchover() {
    let mark = Mark::default();
    let m = mark.clone();
    let s = Spec::new(MigrationMode::Local, local_caps()).relay(move |e| {
        if e.ty == SectionType::DeviceState && m.first(e.seq) {
            Action::CutInside
        } else {
            Action::Forward
        }
    });
    let mut r = s.run();
    let seq = mark.get();
    assert_eq!(
        r.dst_err(),
        format!("main: peer closed the channel reading section #{seq} DEVICE_STATE")
    );
    // The source learns it sending the rest or waiting for READY.
    let e = r.src_err();
    assert!(
        matches_seq(
            &e,
            "main: peer closed the channel sending section #",
            &[" DEVICE_STATE", " BACKEND", " END", " SCHEMA"]
        ) || matches_seq(
            &e,
            "main: peer closed the channel reading section #",
            &[" (after #2 SWITCHOVER_ACK)"]
        ),
        "{e}"
    );
    r.assert_rolled_back();
}

#[test]
fn source_dies_before_go_destination_never_runs() {
    // Everything arrived but GO: the destination must not run, and the source, which sent
    // GO and never heard back, must not run either (it cannot know).
    let s = Spec::new(MigrationMode::Local, local_caps()).relay(|e| {
        if e.ty == SectionType::Go {
            Action::CutBefore
        } else {
            Action::Forward
        }
    });
    let mut r = s.run();
    // HANDSHAKE, RAM_MEMFDS, 2 EARLY_STATE, SWITCHOVER, 2 EARLY_FINAL, 2 DEVICE_STATE,
    // 2 BACKEND, END, SCHEMA: GO would have been #13.
    assert_eq!(
        r.dst_err(),
        "main: peer closed the channel reading section #13 (after #12 SCHEMA)"
    );
    assert_eq!(
        r.src_err(),
        "the destination was told to run but did not confirm (main: peer closed the channel \
         reading section #4 (after #3 READY)); the source stays paused"
    );
    assert!(r.src_gate.is_paused(), "an unconfirmed source stays paused");
    r.assert_destination_discarded();
    r.workload.take().unwrap().stop();
}

#[test]
fn source_dies_before_opening_its_ram_channels() {
    // A source that announced 2 RAM channels and died after the handshake: the destination
    // notices the main channel closing instead of waiting for the channels forever.
    use baton_migration::handshake::{DeviceOffer, Hello, Reply, SchemaVersion};
    use baton_migration::protocol::{ChannelHeader, PROTOCOL_VERSION};
    use baton_migration::transport::{Channel, Transport};
    use baton_migration::VmControl;
    use baton_vmstate::VmState;

    let dir = TempDir::new("dies-before-ram");
    let (listener, target) = listen(&Via::Unix, &dir);
    let caps = multifd();
    let c2 = caps.clone();
    let dst = std::thread::spawn(move || {
        let mut ram = baton_migration::MemfdRam::new(&layout(8)).unwrap();
        let mut devs = wrapped_counters(2, Side::Destination { adopt: false });
        let mut gate = Gate::default();
        gate.pause().unwrap();
        let r = baton_migration::incoming(
            listener,
            &baton_migration::IncomingSettings {
                machine_type: "microvm-1.1".into(),
                capabilities: c2,
            },
            baton_migration::DestinationVm {
                devices: &mut devs,
                ram: &mut ram,
                control: &mut gate,
            },
            &baton_migration::MigrationMonitor::new(),
        );
        (r.map(|_| ()), gate)
    });
    let baton_migration::Target::Unix(path) = target else {
        unreachable!()
    };
    let mut main = Channel::new(
        "src",
        Transport::Unix(std::os::unix::net::UnixStream::connect(path).unwrap()),
    );
    main.write_header(&ChannelHeader {
        version: PROTOCOL_VERSION,
        session: [7; 16],
        kind: ChannelKind::Main,
        index: 0,
    })
    .unwrap();
    let hello = Hello {
        protocol_version: PROTOCOL_VERSION,
        mode: MigrationMode::Remote,
        machine_type: "microvm-1.1".into(),
        transport: "unix".into(),
        capabilities: caps,
        parameters: baton_migration::Parameters::default(),
        ram: layout(8),
        devices: (0..2)
            .map(|i| DeviceOffer {
                id: format!("ctr{i}"),
                vmsd: SchemaVersion::of(testdev::CounterState::vmsd()),
                early_setup: None,
                backend_transfer: None,
            })
            .collect(),
        ram_channels: 2,
    };
    let json = serde_json::to_vec(&hello).unwrap();
    main.send(SectionType::Handshake, &json, &[]).unwrap();
    let reply = main.recv().unwrap();
    let reply: Reply = serde_json::from_slice(&reply.payload).unwrap();
    assert!(reply.accepted, "{:?}", reply.errors);
    let t = std::time::Instant::now();
    drop(main);
    let (r, gate) = dst.join().unwrap();
    assert!(
        t.elapsed() < std::time::Duration::from_secs(2),
        "noticed promptly"
    );
    assert_eq!(
        r.unwrap_err().to_string(),
        "main: peer closed the channel while the destination waited for RAM channel 1 of 2"
    );
    assert!(gate.is_paused());
}
