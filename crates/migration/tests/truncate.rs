//! Captured streams replayed into a destination, cut or corrupted: a snapshot file, and
//! the main channel of a live migration recorded by a relay. Every prefix must fail with an
//! error naming the section, and the destination must never resume.

// Results are passed around whole to assert on their text; size is no concern here.
#![allow(clippy::result_large_err)]

mod support;

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::Ordering;

use baton_migration::protocol::{ChannelHeader, SectionType, FOOTER_MAGIC};
use baton_migration::{
    incoming, migrate, Capabilities, DestinationVm, GuestRam, Incoming, IncomingSettings, MemfdRam,
    MigrationError, MigrationMode, MigrationMonitor, MigrationStatus, SourceVm, Target, VmControl,
};
use support::pair::Spec;
use support::wrapped::{dev, wrapped_counters};
use support::*;

fn early() -> Capabilities {
    Capabilities {
        early_setup: true,
        ..Default::default()
    }
}

const RAM_MIB: u64 = 4;

/// A section's place in a captured stream.
struct Framed {
    start: usize,
    len: usize,
    ty: SectionType,
}

impl Framed {
    fn end(&self) -> usize {
        self.start + 9 + self.len + 4
    }
}

/// Split a captured channel into its sections (the stream is the engine's own).
fn sections(stream: &[u8]) -> Vec<Framed> {
    let mut at = ChannelHeader::LEN;
    let mut out = Vec::new();
    while at < stream.len() {
        let h = &stream[at..at + 9];
        let len = u32::from_le_bytes(h[5..9].try_into().unwrap()) as usize;
        let ty = SectionType::from_u8(h[0]).unwrap();
        out.push(Framed { start: at, len, ty });
        at += 9 + len + 4;
    }
    assert_eq!(at, stream.len(), "the capture ends on a section boundary");
    out
}

/// Run a fresh destination on `source`; returns its result, after checking that it
/// resumed exactly when it succeeded and discarded its early-setup work otherwise.
fn destination(source: Incoming) -> Result<(), MigrationError> {
    let mut ram = MemfdRam::new(&layout(RAM_MIB)).unwrap();
    let mut devs = wrapped_counters(2, Side::Destination { adopt: false });
    let mut gate = Gate::default();
    gate.pause().unwrap();
    let monitor = MigrationMonitor::new();
    let r = incoming(
        source,
        &IncomingSettings {
            machine_type: "microvm-1.1".into(),
            capabilities: early(),
        },
        DestinationVm {
            devices: &mut devs,
            ram: &mut ram,
            control: &mut gate,
        },
        &monitor,
    );
    let resumed = gate.resumes.load(Ordering::SeqCst);
    match &r {
        Ok(_) => {
            assert_eq!(resumed, 1);
            assert_eq!(monitor.status(), MigrationStatus::Completed);
        }
        Err(_) => {
            assert_eq!(resumed, 0, "a failed destination never resumes");
            assert!(gate.is_paused());
            assert_eq!(monitor.status(), MigrationStatus::Failed);
            for d in &mut devs {
                assert!(
                    dev(d).inner.prepared_ring.is_none(),
                    "early setup discarded"
                );
            }
        }
    }
    r.map(|_| ())
}

fn restore_file(dir: &TempDir, bytes: &[u8]) -> Result<(), MigrationError> {
    let p = dir.0.join("cut.snap");
    std::fs::write(&p, bytes).unwrap();
    destination(Incoming::File(p))
}

/// Replay `bytes` as the main channel of a UNIX-socket migration, draining the replies.
fn replay_unix(dir: &TempDir, bytes: &[u8]) -> Result<(), MigrationError> {
    let p = dir.0.join("replay.sock");
    let _ = std::fs::remove_file(&p);
    let l = UnixListener::bind(&p).unwrap();
    let bytes = bytes.to_vec();
    let client = std::thread::spawn(move || {
        let mut s = UnixStream::connect(&p).unwrap();
        let _ = s.write_all(&bytes);
        let _ = s.shutdown(std::net::Shutdown::Write);
        let mut sink = Vec::new();
        let _ = s.read_to_end(&mut sink);
    });
    let r = destination(Incoming::Unix(l));
    client.join().unwrap();
    r
}

fn err_text(r: Result<(), MigrationError>, what: &str) -> String {
    match r {
        Ok(()) => panic!("{what}: the destination accepted a cut stream"),
        Err(e) => e.to_string(),
    }
}

/// Cut `stream` at every section boundary and inside every section; `ends` is how the
/// channel reports its end ("the file ends" or "peer closed the channel").
fn cut_everywhere(stream: &[u8], ends: &str, feed: &dyn Fn(&[u8]) -> Result<(), MigrationError>) {
    let secs = sections(stream);
    let mut cuts = 0;
    // Inside and right after the channel header.
    for at in [0, 10, ChannelHeader::LEN] {
        let e = err_text(feed(&stream[..at]), &format!("cut at {at}"));
        let want = if at < ChannelHeader::LEN {
            format!("main: {ends} reading the channel header")
        } else {
            format!("main: {ends} reading section #0 (the first)")
        };
        assert_eq!(e, want, "cut at byte {at}");
        cuts += 1;
    }
    for (n, s) in secs.iter().enumerate() {
        let next = n + 1;
        // At the boundary after section n, and inside the next section's header.
        let boundary = format!("main: {ends} reading section #{next} (after #{n} {})", s.ty);
        if s.end() < stream.len() {
            for at in [s.end(), s.end() + 4] {
                let e = err_text(feed(&stream[..at]), &format!("cut at {at}"));
                assert_eq!(e, boundary, "cut at byte {at}");
                cuts += 1;
            }
        }
        // Inside section n: its payload (when it has one) and its footer.
        let mut inside = vec![s.start + 9 + s.len + 2];
        if s.len > 0 {
            inside.push(s.start + 9 + s.len / 2);
        }
        for at in inside {
            let e = err_text(feed(&stream[..at]), &format!("cut at {at}"));
            assert_eq!(e, format!("main: {ends} reading section #{n} {}", s.ty));
            cuts += 1;
        }
    }
    assert!(
        cuts > 3 * secs.len(),
        "{cuts} cuts for {} sections",
        secs.len()
    );
}

fn snapshot(dir: &TempDir) -> Vec<u8> {
    let file = dir.0.join("vm.snap");
    let ram = MemfdRam::new(&layout(RAM_MIB)).unwrap();
    for p in (0..layout(RAM_MIB).regions[0].pages()).step_by(3) {
        ram.write(0, p * 4096 + 16, &p.to_le_bytes()).unwrap();
    }
    let mut devs = wrapped_counters(2, Side::Source);
    let mut gate = Gate::default();
    let mut log = ram.write_log();
    migrate(
        &Target::File(file.clone()),
        &settings(MigrationMode::Snapshot, early()),
        SourceVm {
            devices: &mut devs,
            ram: &ram,
            dirty_log: &mut log,
            control: &mut gate,
        },
        &MigrationMonitor::new(),
    )
    .expect("snapshot");
    assert!(!gate.is_paused(), "the source runs on after the snapshot");
    std::fs::read(file).unwrap()
}

#[test]
fn snapshot_cut_anywhere_fails_naming_the_section() {
    let dir = TempDir::new("cut-snap");
    let snap = snapshot(&dir);
    restore_file(&dir, &snap).expect("the whole snapshot restores");
    cut_everywhere(&snap, "the file ends", &|b| restore_file(&dir, b));
}

#[test]
fn snapshot_with_a_corrupted_footer_fails_at_that_section() {
    let dir = TempDir::new("footer-snap");
    let snap = snapshot(&dir);
    for (n, s) in sections(&snap).iter().enumerate() {
        let mut bad = snap.clone();
        bad[s.end() - 1] ^= 0x80;
        let e = err_text(restore_file(&dir, &bad), &format!("footer of #{n}"));
        let want = FOOTER_MAGIC ^ n as u32;
        assert_eq!(
            e,
            format!(
                "main: section #{n} {}: bad footer {:#010x} (expected {want:#010x})",
                s.ty,
                want ^ 0x8000_0000
            )
        );
    }
}

#[test]
fn live_main_channel_cut_anywhere_fails_naming_the_section() {
    // Record a real remote migration's main channel through a relay...
    let mut spec =
        Spec::new(MigrationMode::Remote, early()).relay(|_| support::relay::Action::Forward);
    spec.ram_mib = RAM_MIB;
    // Three passes whatever the workload dirties: the capture has every section type.
    spec.params.downtime_limit = 0;
    spec.params.max_iterations = 3;
    let mut r = spec.run();
    r.src.as_ref().expect("the recorded migration");
    r.dst.as_ref().expect("the recorded migration");
    r.workload.take().unwrap().stop();
    let stream = std::mem::take(&mut r.recording);
    let secs = sections(&stream);
    assert_eq!(secs.last().unwrap().ty, SectionType::Go);
    assert!(secs.iter().any(|s| s.ty == SectionType::RamIterationEnd));
    // The analyzer decodes it from its own schema, GO after the trailer included.
    let dir = TempDir::new("cut-live");
    let file = dir.0.join("main.bin");
    std::fs::write(&file, &stream).unwrap();
    let v = baton_migration::stream::analyze_file(&file).expect("analyze");
    assert_eq!(v["warnings"], serde_json::json!([]));
    let states = v["sections"].as_array().unwrap().iter();
    assert_eq!(states.filter(|s| s["type"] == "DEVICE_STATE").count(), 2);
    std::fs::write(&file, [&stream[..], &[0u8][..]].concat()).unwrap();
    let v = baton_migration::stream::analyze_file(&file).expect("analyze");
    assert_eq!(
        v["warnings"],
        serde_json::json!(["bytes after the SCHEMA trailer"])
    );
    // ...replay all of it (a faithful recording migrates again), then every prefix.
    replay_unix(&dir, &stream).expect("the whole recording migrates");
    cut_everywhere(&stream, "peer closed the channel", &|b| {
        replay_unix(&dir, b)
    });
}
