//! virtio-net-tap under remote migration between two network namespaces (two "hosts"
//! joined by a veth, migration over TCP), each with its own persistent `tap0` and its
//! own host-side peer.
//!
//! The guest exchanges numbered frames with the host of namespace A; after the
//! migration the host of namespace B takes over the conversation. The destination VMM
//! announces the guest in namespace B: this guest driver declines
//! `VIRTIO_NET_F_GUEST_ANNOUNCE`, so baton-vmm sends RARP frames from the guest's MAC
//! itself (QEMU's qemu_announce_self), which the host of B observes. RAM pages the
//! device wrote during pre-copy (received frames, used rings) reach the destination
//! through the device's write-tracking memory, so the guest's rings stay consistent:
//! nothing is duplicated. With early setup the destination opens B's TAP before
//! switchover. Frames sent to namespace A while the guest moves are lost (that TAP has
//! nobody reading it any more); the count is reported.

mod harness;

use std::time::Duration;

use harness::net::*;
use harness::netrun::*;
use harness::*;
use serde_json::json;

const T: Duration = Duration::from_secs(60);

#[test]
fn remote_migration_resumes_traffic_and_announces_the_guest() {
    if !kvm_or_skip("net_remote") || !root_or_skip("net_remote") {
        return;
    }
    let _one = serial();
    let pair = match NetnsPair::new("nrm") {
        Ok(p) => p,
        Err(e) => {
            skip_or_fail(&format!("net_remote: network namespaces: {e}"));
            return;
        }
    };
    add_tap(&pair.src, "tap0").expect("TAP in A");
    add_tap(&pair.dst, "tap0").expect("TAP in B");
    let traffic = Traffic::start(
        vec![
            PacketSocket::open(&pair.src, "tap0").expect("socket in A"),
            PacketSocket::open(&pair.dst, "tap0").expect("socket in B"),
        ],
        HOST_INTERVAL,
    );
    let dir = TempDir::new("net-remote");
    let dev = net_device("");
    // Early setup lets the destination open its TAP queues while the source still runs
    // (as a real destination host would), so B's link is up when the guest arrives.
    let caps = "early-setup";
    let mut src = spawn_net_source(&dir, &pair.src, "microvm", &dev, caps);
    wait_carrier(&pair.src, "tap0", T).expect("carrier in A");
    traffic.set_sending(0, true);
    wait_flowing(&traffic, &TrafficStats::default(), "in A", &[&src]);

    let uri = "tcp:10.77.0.2:4446";
    let mut dst = spawn_net_destination("dst", &dir, &pair.dst, "microvm", &dev, caps, uri);
    src.qmp()
        .execute("migrate", json!({ "uri": uri }))
        .expect("migrate");
    // Switch hosts as soon as the destination runs (frames sent to A after the source
    // paused are lost: nobody reads that TAP any more).
    dst.wait_line("incoming migration completed", T);
    traffic.set_sending(0, false);
    wait_carrier(&pair.dst, "tap0", T).expect("carrier in B");
    traffic.set_sending(1, true);
    let moved = traffic.stats();
    let (st, _) = src.wait_exit(T);
    assert!(st.success(), "source failed\n{}{}", src.dump(), dst.dump());
    assert!(
        u64::from(moved.guest_next.unwrap_or(0)) + 400 < NET_COUNT,
        "the migration took so long that the guest is nearly done: {moved:?}"
    );

    // The announce: RARP from the guest's MAC on B's TAP (and never on A's).
    assert!(
        traffic.wait(T, |s| s.rarp > 0),
        "no announce seen in B\n{}",
        dst.dump()
    );
    dst.wait_line("RARP announce sent", T);
    wait_flowing(&traffic, &moved, "in B after the migration", &[&dst]);
    traffic.set_sending(1, false);
    let (st, _) = dst.wait_exit(T);
    assert!(st.success(), "destination failed\n{}", dst.dump());
    let guest = dst
        .guest("net done")
        .pop()
        .map(|(_, kv)| kv)
        .unwrap_or_else(|| panic!("no `net done` line\n{}", dst.dump()));
    traffic.wait(Duration::from_secs(2), |s| {
        u64::from(s.guest_next.unwrap_or(0)) >= NET_COUNT
    });
    let t = traffic.stop();
    eprintln!(
        "remote: host sent {} frames ({} from A, then from B), {} echoed back ({} lost, {} \
         duplicated); guest frames seen by the hosts: {} from #{:?} to #{:?} ({} lost, {} \
         duplicated); RARP frames: {} (peers {:#b}); guest: {guest:?}",
        t.host_sent,
        moved.host_sent,
        t.echoes,
        t.host_lost(),
        t.echo_dups,
        t.guest_frames,
        t.guest_first,
        t.guest_next.map(|n| n.wrapping_sub(1)),
        t.guest_lost,
        t.guest_dup,
        t.rarp,
        t.rarp_peers
    );
    for l in downtime_report(&src.lines()) {
        eprintln!("remote: {l}");
    }
    assert_eq!(t.rarp_peers, 0b10, "the announce must come out in B only");
    // Nothing duplicated either way; the guest's own sequence is complete and in order
    // (frames it queued while paused leave from B).
    assert_eq!(guest.get("dup"), Some(&0), "{}", dst.dump());
    assert_eq!((t.echo_dups, t.guest_dup), (0, 0), "{t:?}");
    assert_eq!(t.guest_first, Some(0), "{t:?}");
    assert_eq!(u64::from(t.guest_next.unwrap_or(0)), NET_COUNT, "{t:?}");
    eprintln!(
        "remote: REPORTED loss: {} host->guest frames (guest lost={:?}), {} guest->host",
        t.host_lost(),
        guest.get("lost"),
        t.guest_lost
    );
}
