//! The net scenarios' common run: a guest exchanging numbered frames with the host
//! through `tap0`, live-updated while the frames flow.

use std::time::{Duration, Instant};

use super::net::*;
use super::{guest_elf, TempDir, Vmm};

/// The guest's command line for the net scenarios: its own sequence frames at 200/s
/// (`NET_COUNT` of them, ~15 s) and echoes of the host's.
pub const NET_COUNT: u64 = 3000;
pub fn guest_net_cmdline() -> String {
    format!("baton.net=seq baton.net_rate=2 baton.net_count={NET_COUNT} baton.report_ms=500")
}
/// One host frame every 5 ms (200/s).
pub const HOST_INTERVAL: Duration = Duration::from_millis(5);
/// Frames to see flowing before and after the update.
const FLOW: u64 = 200;
const T: Duration = Duration::from_secs(60);

/// The device option every scenario uses (plus its own settings).
pub fn net_device(extra: &str) -> String {
    let mac = GUEST_MAC.map(|b| format!("{b:02x}")).join(":");
    format!("virtio-net-tap,id=net0,ifname=tap0,mac={mac}{extra}")
}

/// A source VMM in `ns` booting the guest with `device` on `machine`.
pub fn spawn_net_source(dir: &TempDir, ns: &str, machine: &str, device: &str, caps: &str) -> Vmm {
    let elf = guest_elf().display().to_string();
    let cmdline = guest_net_cmdline();
    let mut args = vec![
        "--machine",
        machine,
        "--kernel",
        &elf,
        "--memory",
        "256M",
        "--cpus",
        "1",
        "--device",
        device,
        "--cmdline",
        &cmdline,
    ];
    if !caps.is_empty() {
        args.extend(["--migrate-capabilities", caps]);
    }
    let vm = Vmm::spawn("src", dir, Some(ns), &args);
    vm.wait_line("baton-guest: net up", T);
    vm
}

/// A destination VMM in `ns` waiting on `uri` with `device` on `machine`.
pub fn spawn_net_destination(
    name: &str,
    dir: &TempDir,
    ns: &str,
    machine: &str,
    device: &str,
    caps: &str,
    uri: &str,
) -> Vmm {
    let mut args = vec![
        "--machine",
        machine,
        "--incoming",
        uri,
        "--memory",
        "256M",
        "--cpus",
        "1",
        "--device",
        device,
    ];
    if !caps.is_empty() {
        args.extend(["--migrate-capabilities", caps]);
    }
    Vmm::spawn(name, dir, Some(ns), &args)
}

/// Waits until both directions moved `FLOW` more frames than in `from`.
pub fn wait_flowing(traffic: &Traffic, from: &TrafficStats, what: &str, vms: &[&Vmm]) {
    let ok = traffic.wait(T, |s| {
        s.guest_frames >= from.guest_frames + FLOW && s.echoes >= from.echoes + FLOW / 2
    });
    if !ok {
        let dumps: String = vms.iter().map(|v| v.dump()).collect();
        panic!(
            "traffic did not flow {what}: before {from:?}, now {:?}\n{dumps}",
            traffic.stats()
        );
    }
}

/// What a live update under traffic produced.
pub struct UpdateOutcome {
    pub traffic: TrafficStats,
    /// The guest's `net done` line.
    pub guest: std::collections::HashMap<String, u64>,
    /// The source's downtime breakdown.
    pub downtime: Vec<String>,
    /// `ip -s -s link show tap0` at the end (kernel drop counters), for diagnosis.
    pub tap_stats: String,
    /// When the host stopped sending.
    pub stopped_sending: std::time::Instant,
    pub src: Vmm,
    pub dst: Vmm,
}

/// A local live update of a guest exchanging frames with the host at a steady rate, in a
/// fresh namespace with a persistent multi-queue `tap0`: traffic flows, the update
/// happens, traffic flows again, the host stops sending and waits for its echoes, the
/// guest finishes its own sequence and exits.
pub fn live_update_under_traffic(
    tag: &str,
    machine: &str,
    src_device: &str,
    dst_device: &str,
    caps: &str,
) -> UpdateOutcome {
    let ns = Netns::new(tag).expect("namespace");
    ns.add_tap("tap0").expect("TAP");
    let dir = TempDir::new(tag);
    let uri = format!("unix:{}", dir.path("mig.sock").display());
    let traffic = Traffic::start(
        vec![PacketSocket::open(&ns.name, "tap0").expect("AF_PACKET socket")],
        HOST_INTERVAL,
    );
    let mut src = spawn_net_source(&dir, &ns.name, machine, src_device, caps);
    wait_carrier(&ns.name, "tap0", T).expect("carrier");
    traffic.set_sending(0, true);
    wait_flowing(
        &traffic,
        &TrafficStats::default(),
        "before the update",
        &[&src],
    );
    let mut dst = spawn_net_destination("dst", &dir, &ns.name, machine, dst_device, caps, &uri);
    src.qmp()
        .execute("migrate", serde_json::json!({ "uri": uri }))
        .expect("migrate");
    let (st, _) = src.wait_exit(T);
    assert!(st.success(), "source failed\n{}{}", src.dump(), dst.dump());
    dst.wait_line("incoming migration completed", T);
    let after = traffic.stats();
    assert!(
        after.guest_next.unwrap_or(0) as u64 + 2 * FLOW < NET_COUNT,
        "the update took so long that the guest is nearly done: {after:?}"
    );
    wait_flowing(&traffic, &after, "after the update", &[&src, &dst]);
    traffic.set_sending(0, false);
    let stopped_sending = Instant::now();
    // The guest still runs for a while (checked above): the host's last frames come
    // back as echoes before it exits.
    let (st, _) = dst.wait_exit(T);
    assert!(st.success(), "destination failed\n{}", dst.dump());
    let guest = dst
        .guest("net done")
        .pop()
        .map(|(_, kv)| kv)
        .unwrap_or_else(|| panic!("no `net done` line\n{}", dst.dump()));
    // Let the receiver see the guest's last frames.
    traffic.wait(Duration::from_secs(2), |s| {
        u64::from(s.guest_next.unwrap_or(0)) >= NET_COUNT
    });
    let downtime = downtime_report(&src.lines());
    let tap_stats = ns
        .ip(&["-s", "-s", "link", "show", "tap0"])
        .unwrap_or_else(|e| e);
    UpdateOutcome {
        traffic: traffic.stop(),
        guest,
        downtime,
        tap_stats,
        stopped_sending,
        src,
        dst,
    }
}
