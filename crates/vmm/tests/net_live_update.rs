//! virtio-net-tap under local live update, with real KVM guests, a real multi-queue TAP
//! in a private network namespace, and frames flowing both ways at a steady rate:
//!
//! * with backend transfer the TAP fds change process with the guest: no frame lost
//!   or duplicated in either direction;
//! * without it (`backend-transfer=off` on both sides) the destination opens its own TAP
//!   queues during early setup and the update still works; what is lost is reported;
//! * with it on one side only, the handshake refuses before anything moves, naming the
//!   device and both settings, and the source runs on.
//!
//! The guest (`baton.net=seq`) sends numbered frames and echoes the host's numbered
//! frames, and counts gaps and steps back in what it receives (`net done ... lost= dup=`);
//! the host side (an AF_PACKET socket on the TAP) does the same with the guest's frames
//! and with the echoes of its own.

mod harness;

use std::time::Duration;

use harness::net::*;
use harness::netrun::*;
use harness::*;
use serde_json::json;

const CAPS: &str = "x-ignore-shared,backend-transfer,early-setup";
const T: Duration = Duration::from_secs(60);

fn print_outcome(name: &str, o: &UpdateOutcome) {
    let t = &o.traffic;
    eprintln!(
        "{name}: host sent {} frames, {} echoed back ({} lost, {} duplicated); guest sent \
         {} frames seen by the host from #{:?} to #{:?} ({} lost, {} duplicated); guest: {:?}",
        t.host_sent,
        t.echoes,
        t.host_lost(),
        t.echo_dups,
        t.guest_frames,
        t.guest_first,
        t.guest_next.map(|n| n.wrapping_sub(1)),
        t.guest_lost,
        t.guest_dup,
        o.guest
    );
    for l in &o.downtime {
        eprintln!("{name}: {l}");
    }
}

#[test]
fn local_update_with_backend_transfer_loses_no_frame() {
    if !kvm_or_skip("net_local_backend_transfer") || !root_or_skip("net_local_backend_transfer") {
        return;
    }
    let _one = serial();
    // Two queue pairs: two TAP queue fds change hands (the guest drives pair 0).
    let dev = net_device(",queues=2");
    let o = live_update_under_traffic("bt", "microvm", &dev, &dev, CAPS);
    print_outcome("backend-transfer", &o);
    let t = &o.traffic;
    // The guest saw every host frame once, in order ...
    assert_eq!(o.guest.get("lost"), Some(&0), "{}", o.dst.dump());
    assert_eq!(o.guest.get("dup"), Some(&0), "{}", o.dst.dump());
    // ... and echoed each one: the host got all of them back, once.
    assert!(t.host_sent > 0 && t.send_errors == 0, "{t:?}");
    assert_eq!(
        t.host_lost(),
        0,
        "host frames never echoed: {t:?}\nstopped sending {:?} before the guest's last \
         frame\n{}\n{}{}",
        t.last_guest_frame_at
            .map(|g| g.saturating_duration_since(o.stopped_sending)),
        o.tap_stats,
        o.src.dump(),
        o.dst.dump()
    );
    assert_eq!(t.echo_dups, 0, "{t:?}");
    // The host saw every guest frame, #0 to the last, once, in order.
    assert_eq!(t.guest_first, Some(0), "{t:?}");
    assert_eq!(u64::from(t.guest_next.unwrap_or(0)), NET_COUNT, "{t:?}");
    assert_eq!((t.guest_lost, t.guest_dup), (0, 0), "{t:?}");
    assert_eq!(t.guest_frames, NET_COUNT, "{t:?}");
    // The TAP fds were handed over, not reopened.
    let exported = o.src.wait_line("TAP exported", T);
    assert!(
        plain(&exported.text).contains("queues=2"),
        "{}",
        exported.text
    );
    o.src.wait_line("TAP released", T);
    assert!(
        !o.dst.lines().iter().any(|l| l.text.contains("TAP opened")),
        "the destination opened the TAP itself\n{}",
        o.dst.dump()
    );
    assert!(
        !o.downtime.is_empty(),
        "no downtime report\n{}",
        o.src.dump()
    );
}

#[test]
fn local_update_without_backend_transfer_reopens_the_tap_and_reports_loss() {
    if !kvm_or_skip("net_local_no_backend_transfer")
        || !root_or_skip("net_local_no_backend_transfer")
    {
        return;
    }
    let _one = serial();
    let dev = net_device(",backend-transfer=off");
    let o = live_update_under_traffic("nobt", "microvm", &dev, &dev, CAPS);
    print_outcome("no backend-transfer", &o);
    let t = &o.traffic;
    // The destination attached its own queues to the (multi-queue, persistent) TAP.
    o.dst.wait_line("TAP opened", T);
    assert!(!o
        .src
        .lines()
        .iter()
        .any(|l| l.text.contains("TAP exported")));
    // Loss is possible (frames queued on the source's TAP queues when it closes them);
    // nothing is duplicated and the guest's own sequence is complete.
    assert_eq!(o.guest.get("dup"), Some(&0), "{}", o.dst.dump());
    assert_eq!(t.echo_dups, 0, "{t:?}");
    assert_eq!(t.guest_dup, 0, "{t:?}");
    eprintln!(
        "no backend-transfer: REPORTED loss: {} host->guest frames (guest lost={:?}), {} \
         guest->host frames",
        t.host_lost(),
        o.guest.get("lost"),
        t.guest_lost
    );
}

#[test]
fn backend_transfer_on_one_side_only_is_refused_in_the_handshake() {
    if !kvm_or_skip("net_backend_transfer_mismatch")
        || !root_or_skip("net_backend_transfer_mismatch")
    {
        return;
    }
    let _one = serial();
    let ns = Netns::new("btmis").expect("namespace");
    ns.add_tap("tap0").expect("TAP");
    let dir = TempDir::new("btmis");
    let uri = format!("unix:{}", dir.path("mig.sock").display());
    let traffic = Traffic::start(
        vec![PacketSocket::open(&ns.name, "tap0").expect("AF_PACKET socket")],
        HOST_INTERVAL,
    );
    let src = spawn_net_source(&dir, &ns.name, "microvm", &net_device(""), CAPS);
    wait_carrier(&ns.name, "tap0", T).expect("carrier");
    traffic.set_sending(0, true);
    wait_flowing(&traffic, &TrafficStats::default(), "before", &[&src]);
    let mut dst = spawn_net_destination(
        "dst",
        &dir,
        &ns.name,
        "microvm",
        &net_device(",backend-transfer=off"),
        CAPS,
        &uri,
    );
    let mut q = src.qmp();
    q.execute("migrate", json!({ "uri": uri }))
        .expect("migrate");
    let info = q.wait_migration(&["failed", "completed"], T);
    assert_eq!(info["status"], "failed", "{info}");
    let desc = info["error-desc"].as_str().unwrap_or_default().to_owned();
    assert!(
        desc.contains("device net0: backend-transfer: source on, destination off"),
        "error-desc: {desc}"
    );
    eprintln!("backend-transfer mismatch: error-desc: {desc}");
    // The source runs on, its TAP untouched: frames keep flowing both ways.
    assert_eq!(
        q.execute("query-status", json!({})).unwrap()["status"],
        "running"
    );
    let (st, _) = dst.wait_exit(T);
    assert!(
        !st.success(),
        "the destination should give up\n{}",
        dst.dump()
    );
    assert!(!dst.lines().iter().any(|l| l.text.contains("TAP opened")));
    let now = traffic.stats();
    wait_flowing(&traffic, &now, "after the refusal", &[&src]);
    traffic.set_sending(0, false);
    q.execute("quit", json!({})).unwrap();
    let t = traffic.stop();
    assert_eq!((t.guest_lost, t.guest_dup, t.echo_dups), (0, 0, 0), "{t:?}");
}
