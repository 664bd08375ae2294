//! Migration of virtio-net-tap with real TAP devices: save/load mid-traffic, TAP fds
//! handed over with SCM_RIGHTS while frames flow (nothing lost, nothing twice), early
//! setup, a destination opening its own TAP, and refusal of hostile state and fds.

mod common;

use std::collections::BTreeMap;
use std::io::IoSliceMut;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixDatagram;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use baton_qdev::{EarlyOutcome, Migratable, ReceivedBackend};
use baton_virtio_net_tap::device::{feature as f, *};
use baton_virtio_net_tap::{BackendMode, NetState, NetWorker, TapMeta};
use baton_vmstate::VmState;
use common::*;
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

const T: Duration = Duration::from_secs(10);
const V1: u64 = 1 << 32;
const MQ_FEATURES: u64 = V1 | f::MQ | f::CTRL_VQ | f::STATUS | f::MRG_RXBUF | f::GUEST_CSUM;

/// Sends the source's handoff over a real socketpair with SCM_RIGHTS and builds what the
/// destination engine would: a `ReceivedBackend`.
fn hand_over(src: &mut Dev) -> ReceivedBackend {
    let (a, b) = UnixDatagram::pair().unwrap();
    let bt = src.backend_transfer().unwrap();
    let version = bt.metadata_vmsd().version_id;
    let handoff = bt.export().unwrap();
    let roles: Vec<String> = handoff.fds.iter().map(|h| h.role.clone()).collect();
    let raw: Vec<i32> = handoff.fds.iter().map(|h| h.fd.as_raw_fd()).collect();
    let mut msg = roles.join(",").into_bytes();
    msg.push(0);
    msg.extend_from_slice(&handoff.metadata);
    a.send_with_fds(&[&msg[..]], &raw).unwrap();
    let mut buf = vec![0u8; 4096];
    let mut fds = vec![-1; 16];
    let mut iov = [IoSliceMut::new(&mut buf)];
    // SAFETY: the iovec points at `buf`, which outlives the call.
    let (n, nfds) = unsafe {
        b.recv_with_fds(
            std::slice::from_raw_parts_mut(iov.as_mut_ptr().cast(), 1),
            &mut fds,
        )
    }
    .unwrap();
    let _ = &mut iov;
    let msg = &buf[..n];
    let nul = msg.iter().position(|&c| c == 0).unwrap();
    let names: Vec<String> = std::str::from_utf8(&msg[..nul])
        .unwrap()
        .split(',')
        .map(str::to_owned)
        .collect();
    assert_eq!(names.len(), nfds);
    let owned = names
        .into_iter()
        .zip(&fds[..nfds])
        // SAFETY: each received fd is new in this process and owned by nobody else.
        .map(|(r, &fd)| (r, unsafe { OwnedFd::from_raw_fd(fd) }))
        .collect();
    ReceivedBackend::new("net0", owned, msg[nul + 1..].to_vec(), version)
}

/// Host side of the traffic: injects UDP frames carrying sequence numbers over 8 flows
/// and collects the guest's sequence frames.
fn injector(stop: Arc<AtomicBool>, n: u32) -> std::thread::JoinHandle<()> {
    let pkt = Packet::bind("tap0");
    std::thread::spawn(move || {
        for seq in 0..n {
            if stop.load(Ordering::Relaxed) {
                return;
            }
            let flow = (seq % 8) as u16;
            pkt.send(&udp_frame(GUEST_MAC, 1000 + flow, 2000, &seq.to_le_bytes()));
            std::thread::sleep(Duration::from_micros(30));
        }
    })
}

fn collector(want: usize) -> std::thread::JoinHandle<Vec<u32>> {
    let pkt = Packet::bind("tap0");
    std::thread::spawn(move || {
        pkt.recv_frames(ETH_SEQ, want, Duration::from_secs(20))
            .iter()
            .filter(|f| f[6..12] == GUEST_MAC)
            .map(|f| frame_seq(f))
            .collect()
    })
}

fn udp_seq(frame: &[u8]) -> Option<(u16, u32)> {
    if frame.len() < 46 || frame[12..14] != [8, 0] {
        return None;
    }
    let sport = u16::from_be_bytes([frame[34], frame[35]]);
    Some((
        sport,
        u32::from_le_bytes([frame[42], frame[43], frame[44], frame[45]]),
    ))
}

/// Live update in one process: TAP fds over SCM_RIGHTS to a fresh device while frames
/// flow both ways on two queue pairs. Every host frame reaches the guest exactly once
/// and in order per flow; every guest frame reaches the host exactly once, in order.
#[test]
fn backend_transfer_while_traffic_flows_loses_nothing() {
    in_netns("backend_transfer", || {
        make_tap("tap0");
        let mem = guest_memory();
        let spec = "virtio-net-tap,id=net0,ifname=tap0,queues=2";
        let (mut src, _irq) = device(spec, &mem, BackendMode::Open);
        let src_worker = NetWorker::spawn(&src).unwrap();
        let mut d = Driver::new(&mem, &src);
        d.init(MQ_FEATURES, &[0, 1, 2, 3, 4], 2048);
        assert_eq!(
            d.ctrl(4, CTRL_MQ, CTRL_MQ_VQ_PAIRS_SET, &2u16.to_le_bytes()),
            CTRL_OK
        );
        for q in [0, 2] {
            d.fill_rx(q);
            d.notify(q);
        }
        let (n_in, n_out) = (3000u32, 1500u32);
        let collect = collector(n_out as usize);
        let stop = Arc::new(AtomicBool::new(false));
        let inject = injector(stop.clone(), n_in);

        let mut got: Vec<(u16, u32)> = Vec::new();
        let mut sent = 0u32;
        let mut switched: Option<(NetWorker, Duration)> = None;
        let mut src_worker = Some(src_worker);
        let deadline = Instant::now() + Duration::from_secs(30);
        while (got.len() < n_in as usize || sent < n_out) && Instant::now() < deadline {
            for q in [0, 2] {
                got.extend(d.recv(q).iter().filter_map(|(_, f)| udp_seq(f)));
            }
            let txq = 1 + 2 * (sent % 2) as u16;
            if sent < n_out && d.queue_tx(txq, [0; HDR], &seq_frame(GUEST_MAC, sent, 64)) {
                d.notify(txq);
                sent += 1;
            }
            if switched.is_none() && got.len() > n_in as usize / 3 {
                // Switchover: pause, save, hand the TAP over, load, run the destination.
                let t0 = Instant::now();
                src.quiesce();
                let blob = src.save().unwrap();
                let received = hand_over(&mut src);
                let (mut dst, _irq2) = device(spec, &mem, BackendMode::Incoming);
                dst.backend_transfer().unwrap().adopt(received).unwrap();
                dst.load(1, &blob).unwrap();
                let w = NetWorker::spawn(&dst).unwrap();
                dst.notify_all_queues();
                let downtime = t0.elapsed();
                src.backend_transfer().unwrap().release();
                drop(src_worker.take());
                d.dev = dst.clone();
                switched = Some((w, downtime));
            }
            std::thread::sleep(Duration::from_micros(50));
        }
        stop.store(true, Ordering::Relaxed);
        inject.join().unwrap();
        let (_w, downtime) = switched.expect("switched over");
        eprintln!("switchover (quiesce..destination running) took {downtime:?}");
        let out = collect.join().unwrap();

        // Host -> guest: all, once, in order per flow, spread over both TAP queues.
        let mut seqs: Vec<u32> = got.iter().map(|g| g.1).collect();
        seqs.sort();
        let dups = seqs.windows(2).filter(|w| w[0] == w[1]).count();
        assert_eq!(dups, 0, "duplicates");
        assert_eq!(seqs, (0..n_in).collect::<Vec<_>>(), "lost frames");
        let mut per_flow: BTreeMap<u16, Vec<u32>> = BTreeMap::new();
        for (flow, seq) in &got {
            per_flow.entry(*flow).or_default().push(*seq);
        }
        for (flow, s) in &per_flow {
            assert!(
                s.windows(2).all(|w| w[0] < w[1]),
                "flow {flow} out of order"
            );
        }
        // Guest -> host: all, once, in order per tx queue.
        assert_eq!(out.len(), n_out as usize, "guest frames lost");
        let mut sorted = out.clone();
        sorted.sort();
        assert_eq!(sorted, (0..n_out).collect::<Vec<_>>());
        for parity in 0..2 {
            let q: Vec<u32> = out.iter().copied().filter(|s| s % 2 == parity).collect();
            assert!(
                q.windows(2).all(|w| w[0] < w[1]),
                "tx queue {parity} out of order"
            );
        }
        let s = d.dev.stats();
        assert_eq!((s.rx_dropped, s.tx_dropped), (0, 0));
        assert!(sh("ip -s link show tap0").contains("TX:"));
    });
}

/// Save and load through the wire mid-traffic, without backend transfer: a frame the
/// source held (read from the TAP, no guest buffer yet) and frames the guest queued but
/// did not kick survive in the state; the destination opens its own TAP.
#[test]
fn save_load_mid_traffic_keeps_held_and_queued_frames() {
    in_netns("save_load", || {
        make_tap("tap0");
        let mem = guest_memory();
        let spec = "virtio-net-tap,id=net0,ifname=tap0,backend-transfer=off";
        let (mut src, _irq) = device(spec, &mem, BackendMode::Open);
        let pkt = Packet::bind("tap0");
        let mut d = Driver::new(&mem, &src);
        d.init(V1 | f::MRG_RXBUF, &[0, 1], 2048);
        pkt.send(&seq_frame([2, 0, 0, 0, 0, 1], 7, 300));
        std::thread::sleep(Duration::from_millis(20));
        src.tap_readable(0); // no rx buffers: the frame is held
        for seq in 0..3 {
            assert!(d.queue_tx(1, [0; HDR], &seq_frame(GUEST_MAC, seq, 80)));
        }
        src.quiesce();
        let blob = src.save().unwrap();
        let state = NetState::load(&blob, 1).unwrap();
        assert_eq!(state.held.len(), 1);
        assert_eq!(state.held[0].tap_queue, 0);
        assert_eq!(state.virtio.queues[1].next_avail, 0, "tx not consumed");
        assert!(!src.backend_transfer().unwrap().enabled());
        drop(src);

        let (mut dst, _irq2) = device(spec, &mem, BackendMode::Incoming);
        assert!(dst.lock().device().tap().is_none());
        dst.load(1, &blob).unwrap();
        assert!(dst.lock().device().tap().is_some(), "opened its own TAP");
        wait_carrier("tap0");
        let collect = collector(3);
        std::thread::sleep(Duration::from_millis(20));
        dst.notify_all_queues();
        d.dev = dst.clone();
        d.fill_rx(0);
        d.notify(0);
        let rx = d.recv(0);
        assert_eq!(rx.len(), 1);
        assert_eq!(frame_seq(&rx[0].1), 7);
        assert_eq!(collect.join().unwrap(), vec![0, 1, 2]);
        // And it goes on.
        pkt.send(&seq_frame([2, 0, 0, 0, 0, 1], 8, 300));
        let mut more = Vec::new();
        assert!(wait_until(T, || {
            dst.tap_readable(0);
            more.extend(d.recv(0));
            !more.is_empty()
        }));
        assert_eq!(frame_seq(&more[0].1), 8);
    });
}

/// Early setup: deterministic, a destination without backend transfer opens and
/// configures its TAP in `prepare`; a changed early state is applied; mismatches are
/// refused with the field; discard closes what prepare opened.
#[test]
fn early_setup_prepares_the_destination() {
    in_netns("early_setup", || {
        make_tap("tap0");
        let mem = guest_memory();
        let spec = "virtio-net-tap,id=net0,ifname=tap0,backend-transfer=off";
        let (mut src, _irq) = device(spec, &mem, BackendMode::Open);
        let mut d = Driver::new(&mem, &src);
        d.init(V1 | f::MRG_RXBUF, &[0, 1], 2048);
        let early = src.early_setup().unwrap().save_early().unwrap();
        assert_eq!(early, src.early_setup().unwrap().save_early().unwrap());

        let (mut dst, _irq2) = device(spec, &mem, BackendMode::Incoming);
        let es = dst.early_setup().unwrap();
        es.prepare(1, &early).unwrap();
        assert!(dst.lock().device().tap().is_some());
        assert_eq!(dst.lock().device().tap().unwrap().offloads(), 0);

        // The guest renegotiates with GUEST_CSUM: the early state changes.
        d.init(V1 | f::MRG_RXBUF | f::GUEST_CSUM, &[0, 1], 2048);
        let early2 = src.early_setup().unwrap().save_early().unwrap();
        assert_ne!(early, early2);
        dst.early_setup()
            .unwrap()
            .finish(EarlyOutcome::Changed {
                version_id: 1,
                state: &early2,
            })
            .unwrap();
        assert_eq!(
            dst.lock().device().tap().unwrap().offloads(),
            libc::TUN_F_CSUM
        );
        dst.early_setup()
            .unwrap()
            .finish(EarlyOutcome::Unchanged)
            .unwrap();
        dst.early_setup().unwrap().discard();
        assert!(dst.lock().device().tap().is_none());

        let (mut other, _irq3) = device(
            "virtio-net-tap,id=net0,ifname=tap0,queues=2,backend-transfer=off",
            &mem,
            BackendMode::Incoming,
        );
        let e = other.early_setup().unwrap().prepare(1, &early).unwrap_err();
        assert_eq!(
            e.to_string(),
            "net0: early-setup prepare: max_queue_pairs: 1 in the state, this device has 2"
        );
        let (mut off, _irq4) = device(
            "virtio-net-tap,id=net0,ifname=tap0,early-setup=off",
            &mem,
            BackendMode::Incoming,
        );
        assert!(off.early_setup().is_none());
    });
}

/// Opens tap `name` by hand: `vnet_hdr` decides TUNSETVNETHDRSZ 12 (else the kernel's
/// default, 10), `nonblock` the fd mode.
fn raw_tap(name: &str, vnet_hdr: bool, nonblock: bool) -> OwnedFd {
    let flags = libc::O_RDWR | libc::O_CLOEXEC | if nonblock { libc::O_NONBLOCK } else { 0 };
    // SAFETY: plain open of a constant path.
    let fd = unsafe { libc::open(c"/dev/net/tun".as_ptr(), flags) };
    assert!(fd >= 0);
    // SAFETY: fd was just opened.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: ifreq is plain data.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in req.ifr_name.iter_mut().zip(name.bytes()) {
        *d = s as libc::c_char;
    }
    req.ifr_ifru.ifru_flags =
        (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR | libc::IFF_MULTI_QUEUE) as i16;
    // SAFETY: TUNSETIFF with a valid ifreq.
    assert_eq!(
        unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNSETIFF, &mut req) },
        0
    );
    if vnet_hdr {
        let n: libc::c_int = 12;
        // SAFETY: TUNSETVNETHDRSZ reads one int.
        assert_eq!(
            unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNSETVNETHDRSZ, &n) },
            0
        );
    }
    fd
}

fn meta(queues: u16) -> Vec<u8> {
    TapMeta {
        ifname: "tap0".into(),
        queues,
        vnet_hdr_len: 12,
        flags: baton_virtio_net_tap::backend::TAP_FLAGS,
        offloads: 0,
        nonblocking: true,
    }
    .save()
}

#[test]
fn adopt_refuses_fds_that_are_not_the_tap_they_claim() {
    in_netns("adopt_refusals", || {
        make_tap("tap0");
        make_tap("tap1");
        let mem = guest_memory();
        let adopt = |fds: Vec<(&str, OwnedFd)>, meta: Vec<u8>| {
            let (mut dst, _irq) = device(
                "virtio-net-tap,id=net0,ifname=tap0",
                &mem,
                BackendMode::Incoming,
            );
            let fds = fds.into_iter().map(|(r, f)| (r.to_owned(), f)).collect();
            let rx = ReceivedBackend::new("net0", fds, meta, 1);
            dst.backend_transfer()
                .unwrap()
                .adopt(rx)
                .map(|_| ())
                .map_err(|e| e.to_string())
        };
        let (r, _w) = std::io::pipe().unwrap();
        let e = adopt(vec![("tap-queue-0", OwnedFd::from(r))], meta(1)).unwrap_err();
        assert!(
            e.starts_with("net0: backend adopt: fd \"tap-queue-0\": not a TAP queue (TUNGETIFF"),
            "{e}"
        );
        let e = adopt(vec![("tap-queue-0", raw_tap("tap1", true, true))], meta(1)).unwrap_err();
        assert_eq!(
            e,
            "net0: backend adopt: fd \"tap-queue-0\": TAP interface \"tap1\", expected \"tap0\""
        );
        let e = adopt(vec![("tap-queue-0", raw_tap("tap0", false, true))], meta(1)).unwrap_err();
        assert_eq!(
            e,
            "net0: backend adopt: fd \"tap-queue-0\": vnet header size 10, expected 12"
        );
        let e = adopt(vec![("tap-queue-0", raw_tap("tap0", true, false))], meta(1)).unwrap_err();
        assert_eq!(
            e,
            "net0: backend adopt: fd \"tap-queue-0\": O_NONBLOCK is false, expected true"
        );
        let e = adopt(
            vec![
                ("tap-queue-0", raw_tap("tap0", true, true)),
                ("bogus", raw_tap("tap0", true, true)),
            ],
            meta(1),
        )
        .unwrap_err();
        assert_eq!(e, "net0: backend adopt: fd \"bogus\": unexpected fd");
        let mut m = TapMeta::load(&meta(1), 1).unwrap();
        m.ifname = "tap1".into();
        let e = adopt(vec![("tap-queue-0", raw_tap("tap1", true, true))], m.save()).unwrap_err();
        assert_eq!(
            e,
            "net0: backend adopt: the TAP handed over is \"tap1\", this device's ifname is \"tap0\""
        );
        let e = adopt(vec![], meta(1)).unwrap_err();
        assert_eq!(e, "net0: backend adopt: fd \"tap-queue-0\": not received");
        let e = adopt(vec![], meta(2)).unwrap_err();
        assert!(
            e.contains("2 TAP queues handed over, this device has 1 queue pairs"),
            "{e}"
        );
        // A good fd is adopted as is.
        adopt(vec![("tap-queue-0", raw_tap("tap0", true, true))], meta(1)).unwrap();
    });
}

/// A running two-pair device's saved state, corrupted in various ways, is refused with
/// the path of the offending field.
#[test]
fn hostile_state_is_refused_with_its_path() {
    in_netns("hostile_state", || {
        make_tap("tap0");
        let mem = guest_memory();
        let spec = "virtio-net-tap,id=net0,ifname=tap0,queues=2";
        let (mut src, _irq) = device(spec, &mem, BackendMode::Open);
        let mut d = Driver::new(&mem, &src);
        d.init(MQ_FEATURES, &[0, 1, 2, 3, 4], 2048);
        assert_eq!(
            d.ctrl(4, CTRL_MQ, CTRL_MQ_VQ_PAIRS_SET, &2u16.to_le_bytes()),
            CTRL_OK
        );
        src.quiesce();
        let good = NetState::load(&src.save().unwrap(), 1).unwrap();
        let refusal = |s: &NetState| {
            let (mut dst, _irq) = device(spec, &mem, BackendMode::Incoming);
            match dst.load(1, &s.save()) {
                Ok(()) => panic!("accepted {s:?}"),
                Err(e) => e.to_string(),
            }
        };
        let mut s = good.clone();
        s.virtio.queues[0].next_avail = s.virtio.queues[0].next_used.wrapping_add(300);
        assert_eq!(
            refusal(&s),
            format!(
                "net0: load: virtio.queues[0].next_avail: {} is 300 entries ahead of next_used {}, \
                 more than the queue size 64",
                s.virtio.queues[0].next_avail, s.virtio.queues[0].next_used
            )
        );
        let mut s = good.clone();
        s.active_pairs = 3;
        assert_eq!(
            refusal(&s),
            "net0: load: active_pairs: 3 exceeds max_queue_pairs 2 (or is 0)"
        );
        let mut s = good.clone();
        s.max_queue_pairs = 4;
        s.virtio.queues.extend([s.virtio.queues[0]; 4]);
        assert_eq!(
            refusal(&s),
            "net0: load: max_queue_pairs: 4 in the state, this device has 2 queue pairs"
        );
        let mut s = good.clone();
        s.virtio.driver_features |= 1 << 10; // GUEST_UFO, never offered
        assert_eq!(
            refusal(&s),
            format!(
                "net0: load: virtio.driver_features: {:#x} not offered by the device (offered {:#x})",
                s.virtio.driver_features, s.virtio.device_features
            )
        );
        let mut s = good.clone();
        s.virtio.device_features |= 1 << 10; // claimed offered by the source
        s.virtio.driver_features |= 1 << 10;
        assert_eq!(
            refusal(&s),
            format!(
                "net0: load: virtio.driver_features: {:#x} not offered by the device (offered {:#x})",
                s.virtio.driver_features, good.virtio.device_features
            )
        );
        let mut s = good.clone();
        s.held.push(baton_virtio_net_tap::HeldFrame {
            tap_queue: 5,
            data: vec![0; 60],
        });
        assert_eq!(
            refusal(&s),
            "net0: load: held[0].tap_queue: 5 is beyond the 2 TAP queues"
        );
        let mut s = good.clone();
        s.status = 0x80;
        assert_eq!(refusal(&s), "net0: load: status: 0x80 has undefined bits");
        let mut s = good.clone();
        s.mac = [2, 0, 0, 0, 0, 9];
        assert!(refusal(&s).starts_with("net0: load: mac: "));
        // Truncated blobs are errors, never panics.
        let blob = good.save();
        for n in (0..blob.len()).step_by(7) {
            let (mut dst, _irq) = device(spec, &mem, BackendMode::Incoming);
            assert!(dst.load(1, &blob[..n]).is_err());
        }
        // And the good one loads.
        let (mut dst, _irq) = device(spec, &mem, BackendMode::Incoming);
        dst.load(1, &blob).unwrap();
        assert_eq!(dst.lock().device().active_pairs(), 2);
    });
}
