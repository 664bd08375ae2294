//! virtio-net over real TAP devices in a private network namespace: frames both ways,
//! vnet headers and offloads, mergeable buffers, multi-queue and the control queue.

mod common;

use std::time::Duration;

use baton_virtio::regs::{self, interrupt};
use baton_virtio_net_tap::device::{feature as f, *};
use baton_virtio_net_tap::{BackendMode, NetWorker};
use common::*;

const T: Duration = Duration::from_secs(5);
const V1: u64 = 1 << 32;

#[test]
fn frames_both_ways_with_headers() {
    in_netns("frames_both_ways_with_headers", || {
        make_tap("tap0");
        let mem = guest_memory();
        let (dev, irq) = device(
            "virtio-net-tap,id=net0,ifname=tap0,mac=52:54:00:12:34:56",
            &mem,
            BackendMode::Open,
        );
        let _worker = NetWorker::spawn(&dev).unwrap();
        let pkt = Packet::bind("tap0");
        let mut d = Driver::new(&mem, &dev);
        assert_eq!(d.rd(regs::DEVICE_ID), 1);
        let feats = d.init(V1 | f::MAC | f::STATUS | f::MRG_RXBUF, &[0, 1], 2048);
        assert_eq!(feats, V1 | f::MAC | f::STATUS | f::MRG_RXBUF);
        let mut mac = [0u8; 6];
        for (i, b) in mac.iter_mut().enumerate() {
            let mut x = [0u8];
            dev.mmio_read(regs::CONFIG + i as u64, &mut x);
            *b = x[0];
        }
        assert_eq!(mac, GUEST_MAC);
        assert_eq!(d.config_u16(6), S_LINK_UP);
        assert_eq!(d.config_u16(8), 1, "max_virtqueue_pairs");
        d.fill_rx(0);
        d.notify(0);

        // Guest -> host: the header is consumed by the TAP, the frame arrives as sent.
        for seq in 0..20 {
            d.send(1, &seq_frame(GUEST_MAC, seq, 60 + seq as usize * 50));
        }
        let got = pkt.recv_frames(ETH_SEQ, 20, T);
        let seqs: Vec<u32> = got.iter().map(|f| frame_seq(f)).collect();
        assert_eq!(seqs, (0..20).collect::<Vec<_>>());
        assert_eq!(got[3].len(), 60 + 150);
        assert!(wait_until(T, || d.reap_tx(1) > 0 || d.q_free(1) == Q_SIZE as usize));

        // Host -> guest: a zero header with num_buffers = 1 and the frame as injected.
        for seq in 0..20 {
            pkt.send(&seq_frame(
                [2, 0, 0, 0, 0, 1],
                100 + seq,
                60 + seq as usize * 50,
            ));
        }
        let mut rx = Vec::new();
        assert!(wait_until(T, || {
            rx.extend(d.recv(0));
            rx.len() >= 20
        }));
        for (i, (hdr, frame)) in rx.iter().enumerate() {
            assert_eq!(hdr, &[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0], "frame {i}");
            assert_eq!(frame_seq(frame), 100 + i as u32);
            assert_eq!(frame.len(), 60 + i * 50);
        }
        assert!(irq.read().unwrap() > 0, "used-buffer interrupts");
        let s = dev.stats();
        assert_eq!((s.tx_frames, s.tx_dropped), (20, 0));
        assert_eq!((s.rx_frames, s.rx_dropped), (20, 0));
    });
}

#[test]
fn mergeable_buffers_span_frames_and_frames_wait_for_buffers() {
    in_netns("mergeable_buffers", || {
        make_tap("tap0");
        let mem = guest_memory();
        let (dev, _irq) = device(
            "virtio-net-tap,id=net0,ifname=tap0",
            &mem,
            BackendMode::Open,
        );
        let pkt = Packet::bind("tap0");
        let mut d = Driver::new(&mem, &dev);
        d.init(V1 | f::MRG_RXBUF, &[0, 1], 256);
        // No rx buffers yet: the device reads one frame and holds it, the rest waits in
        // the TAP.
        for seq in 0..3 {
            pkt.send(&seq_frame([2, 0, 0, 0, 0, 1], seq, 1000));
        }
        std::thread::sleep(Duration::from_millis(20));
        dev.tap_readable(0);
        assert_eq!(dev.stats().rx_frames, 0);
        d.fill_rx(0);
        d.notify(0); // the kick delivers the held frame and reads on
        let rx = d.recv(0);
        assert_eq!(rx.len(), 3);
        for (i, (hdr, frame)) in rx.iter().enumerate() {
            // 12 + 1000 bytes in 256-byte buffers: 4 of them.
            assert_eq!(u16::from_le_bytes([hdr[10], hdr[11]]), 4);
            assert_eq!(frame_seq(frame), i as u32);
            assert_eq!(frame.len(), 1000);
        }
        // Only 64 buffers of 256 bytes = 16 frames of 1000 bytes fit; the rest waits.
        for seq in 3..40 {
            pkt.send(&seq_frame([2, 0, 0, 0, 0, 1], seq, 1000));
        }
        std::thread::sleep(Duration::from_millis(20));
        dev.tap_readable(0);
        let mut all = Vec::new();
        for _ in 0..10 {
            all.extend(d.recv(0)); // re-posts and kicks, which delivers more
        }
        let seqs: Vec<u32> = all.iter().map(|(_, f)| frame_seq(f)).collect();
        assert_eq!(seqs, (3..40).collect::<Vec<_>>());
        assert_eq!(dev.stats().rx_dropped, 0);
    });
}

#[test]
fn without_mergeable_buffers_a_too_small_buffer_drops_the_frame() {
    in_netns("no_mrg", || {
        make_tap("tap0");
        let mem = guest_memory();
        let (dev, _irq) = device(
            "virtio-net-tap,id=net0,ifname=tap0,mrg-rxbuf=off",
            &mem,
            BackendMode::Open,
        );
        let pkt = Packet::bind("tap0");
        let mut d = Driver::new(&mem, &dev);
        assert_eq!(d.init(V1 | f::MRG_RXBUF, &[0, 1], 512), V1);
        d.fill_rx(0);
        d.notify(0);
        pkt.send(&seq_frame([2, 0, 0, 0, 0, 1], 1, 1000));
        pkt.send(&seq_frame([2, 0, 0, 0, 0, 1], 2, 400));
        std::thread::sleep(Duration::from_millis(20));
        dev.tap_readable(0);
        let mut used = Vec::new();
        // The dropped frame's buffer comes back empty (len 0 is not a frame: skip it).
        let entries = d.recv_raw(0);
        for (len, data) in entries {
            if len > 0 {
                used.push(data);
            }
        }
        assert_eq!(used.len(), 1);
        assert_eq!(frame_seq(&used[0][HDR..]), 2);
        assert_eq!(u16::from_le_bytes([used[0][10], used[0][11]]), 1);
        assert_eq!(dev.stats().rx_dropped, 1);
    });
}

/// Partial checksums both ways through the kernel's UDP stack: the guest's
/// `NEEDS_CSUM` header is honoured by the TAP, and with `GUEST_CSUM` (TUNSETOFFLOAD
/// TUN_F_CSUM) the host hands over frames with a partial checksum and says so.
#[test]
fn checksum_offload_headers_pass_through() {
    in_netns("checksum_offload", || {
        make_tap("tap0");
        sh("ip addr add 10.0.0.1/24 dev tap0");
        sh("ip neigh add 10.0.0.2 lladdr 52:54:00:12:34:56 dev tap0");
        let mem = guest_memory();
        let (dev, _irq) = device(
            "virtio-net-tap,id=net0,ifname=tap0,mac=52:54:00:12:34:56",
            &mem,
            BackendMode::Open,
        );
        let _worker = NetWorker::spawn(&dev).unwrap();
        let mut d = Driver::new(&mem, &dev);
        let feats = d.init(V1 | f::CSUM | f::GUEST_CSUM | f::MRG_RXBUF, &[0, 1], 2048);
        assert_eq!(feats & (f::CSUM | f::GUEST_CSUM), f::CSUM | f::GUEST_CSUM);
        assert_eq!(
            dev.lock().device().tap().unwrap().offloads(),
            libc::TUN_F_CSUM
        );
        d.fill_rx(0);
        d.notify(0);

        // Host -> guest: a locally generated UDP datagram leaves with a partial checksum.
        let host = std::net::UdpSocket::bind("10.0.0.1:5000").unwrap();
        host.send_to(b"hello guest", "10.0.0.2:6000").unwrap();
        let mut rx = Vec::new();
        let ok = wait_until(T, || {
            rx.extend(d.recv(0));
            rx.iter().any(|(_, f)| f.len() > 14 && f[12..14] == [8, 0])
        });
        assert!(
            ok,
            "{rx:x?} {:?} {}",
            dev.stats(),
            sh("ip -s link show tap0; ip neigh; ip route")
        );
        rx.retain(|(_, f)| f.len() > 14 && f[12..14] == [8, 0]);
        let (hdr, frame) = &rx[0];
        assert_eq!(hdr[0] & 1, 1, "VIRTIO_NET_HDR_F_NEEDS_CSUM");
        assert_eq!(u16::from_le_bytes([hdr[6], hdr[7]]), 14 + 20, "csum_start");
        assert_eq!(u16::from_le_bytes([hdr[8], hdr[9]]), 6, "csum_offset");
        assert_eq!(&frame[42..], b"hello guest");

        // Guest -> host: a datagram whose UDP checksum only holds the pseudo-header sum,
        // with NEEDS_CSUM: the kernel accepts it (a wrong full checksum would be dropped).
        let payload = b"hello host";
        let mut frame = udp_frame([0xff; 6], 6000, 5000, payload);
        frame[6..12].copy_from_slice(&GUEST_MAC);
        frame[26..30].copy_from_slice(&[10, 0, 0, 2]);
        frame[30..34].copy_from_slice(&[10, 0, 0, 1]);
        // IPv4 header checksum again after the address swap.
        frame[24..26].copy_from_slice(&[0, 0]);
        let mut sum = 0u32;
        for c in frame[14..34].chunks(2) {
            sum += u32::from(u16::from_be_bytes([c[0], c[1]]));
        }
        while sum > 0xffff {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        frame[24..26].copy_from_slice(&(!(sum as u16)).to_be_bytes());
        let ulen = (8 + payload.len()) as u32;
        let mut ps = 0x0a00 + 0x0002 + 0x0a00 + 0x0001 + 17 + ulen;
        while ps > 0xffff {
            ps = (ps & 0xffff) + (ps >> 16);
        }
        frame[40..42].copy_from_slice(&(ps as u16).to_be_bytes());
        let mut hdr = [0u8; HDR];
        hdr[0] = 1; // NEEDS_CSUM
        hdr[6..8].copy_from_slice(&34u16.to_le_bytes());
        hdr[8..10].copy_from_slice(&6u16.to_le_bytes());
        assert!(d.queue_tx(1, hdr, &frame));
        d.notify(1);
        host.set_read_timeout(Some(T)).unwrap();
        let mut buf = [0u8; 64];
        let (n, from) = host.recv_from(&mut buf).unwrap();
        assert_eq!(&buf[..n], payload);
        assert_eq!(from.to_string(), "10.0.0.2:6000");
    });
}

#[test]
fn two_queue_pairs_and_the_control_queue() {
    in_netns("multi_queue", || {
        make_tap("tap0");
        let mem = guest_memory();
        let (dev, irq) = device(
            "virtio-net-tap,id=net0,ifname=tap0,queues=2",
            &mem,
            BackendMode::Open,
        );
        let _worker = NetWorker::spawn(&dev).unwrap();
        let pkt = Packet::bind("tap0");
        let mut d = Driver::new(&mem, &dev);
        let feats = d.init(
            V1 | f::MQ | f::CTRL_VQ | f::GUEST_ANNOUNCE | f::STATUS | f::MRG_RXBUF,
            &[0, 1, 2, 3, 4],
            2048,
        );
        assert_eq!(feats & (f::MQ | f::CTRL_VQ), f::MQ | f::CTRL_VQ);
        assert_eq!(d.config_u16(8), 2, "max_virtqueue_pairs");
        assert_eq!(dev.lock().device().ctrl_queue(feats), 4);
        d.fill_rx(0);
        d.fill_rx(2);
        d.notify(0);
        d.notify(2);
        assert_eq!(
            d.ctrl(4, CTRL_MQ, CTRL_MQ_VQ_PAIRS_SET, &3u16.to_le_bytes()),
            CTRL_ERR
        );
        assert_eq!(
            d.ctrl(4, CTRL_MQ, CTRL_MQ_VQ_PAIRS_SET, &0u16.to_le_bytes()),
            CTRL_ERR
        );
        assert_eq!(
            d.ctrl(4, CTRL_MQ, CTRL_MQ_VQ_PAIRS_SET, &2u16.to_le_bytes()),
            CTRL_OK
        );
        assert_eq!(dev.lock().device().active_pairs(), 2);
        assert_eq!(d.ctrl(4, 99, 0, &[]), CTRL_ERR, "unknown class");

        // UDP flows with many ports spread over both TAP queues; each lands on its pair.
        let n = 200u16;
        for i in 0..n {
            pkt.send(&udp_frame(
                [0xff; 6],
                1000 + i,
                2000 + i * 7,
                &i.to_le_bytes(),
            ));
        }
        let (mut rx0, mut rx1) = (Vec::new(), Vec::new());
        let udp = |v: Vec<([u8; 12], Vec<u8>)>| {
            v.into_iter()
                .filter(|(_, f)| f.len() >= 44 && f[12..14] == [8, 0])
                .map(|(_, f)| u16::from_le_bytes([f[42], f[43]]))
                .collect::<Vec<_>>()
        };
        assert!(wait_until(T, || {
            rx0.extend(udp(d.recv(0)));
            rx1.extend(udp(d.recv(2)));
            rx0.len() + rx1.len() >= usize::from(n)
        }));
        let s = dev.stats();
        assert!(
            s.rx_by_tap_queue[0] > 0 && s.rx_by_tap_queue[1] > 0,
            "{s:?}"
        );
        assert!(!rx0.is_empty() && !rx1.is_empty());
        let mut all: Vec<u16> = rx0.iter().chain(&rx1).copied().collect();
        all.sort();
        assert_eq!(all, (0..n).collect::<Vec<_>>());

        // Both transmit queues reach the TAP.
        d.send(1, &seq_frame(GUEST_MAC, 1, 100));
        d.send(3, &seq_frame(GUEST_MAC, 2, 100));
        let got: Vec<u32> = pkt
            .recv_frames(ETH_SEQ, 2, T)
            .iter()
            .map(|f| frame_seq(f))
            .collect();
        assert_eq!(got.len(), 2);

        // Back to one pair: TAP queue 1 now feeds rx queue 0.
        assert_eq!(
            d.ctrl(4, CTRL_MQ, CTRL_MQ_VQ_PAIRS_SET, &1u16.to_le_bytes()),
            CTRL_OK
        );
        for i in 0..n {
            pkt.send(&udp_frame(
                [0xff; 6],
                1000 + i,
                2000 + i * 7,
                &i.to_le_bytes(),
            ));
        }
        let mut again = Vec::new();
        assert!(wait_until(T, || {
            again.extend(udp(d.recv(0)));
            again.len() >= usize::from(n)
        }));
        assert!(udp(d.recv(2)).is_empty());

        // Announce: status bit + configuration interrupt, cleared by the driver's ack.
        let _ = irq.read();
        assert!(dev.announce().unwrap());
        assert_eq!(d.config_u16(6), S_LINK_UP | S_ANNOUNCE);
        assert_ne!(d.rd(regs::INTERRUPT_STATUS) & interrupt::CONFIG_CHANGE, 0);
        assert_eq!(d.ctrl(4, CTRL_ANNOUNCE, CTRL_ANNOUNCE_ACK, &[]), CTRL_OK);
        assert_eq!(d.config_u16(6), S_LINK_UP);
    });
}

#[test]
fn without_mq_the_control_queue_is_queue_2() {
    in_netns("ctrl_without_mq", || {
        make_tap("tap0");
        let mem = guest_memory();
        let (dev, _irq) = device(
            "virtio-net-tap,id=net0,ifname=tap0,queues=2",
            &mem,
            BackendMode::Open,
        );
        let mut d = Driver::new(&mem, &dev);
        let feats = d.init(V1 | f::CTRL_VQ | f::GUEST_ANNOUNCE, &[0, 1, 2], 2048);
        assert_eq!(dev.lock().device().ctrl_queue(feats), 2);
        // VQ_PAIRS_SET without MQ negotiated is refused.
        assert_eq!(
            d.ctrl(2, CTRL_MQ, CTRL_MQ_VQ_PAIRS_SET, &2u16.to_le_bytes()),
            CTRL_ERR
        );
        assert_eq!(d.ctrl(2, CTRL_ANNOUNCE, CTRL_ANNOUNCE_ACK, &[]), CTRL_OK);
    });
}

#[test]
fn dependent_features_are_refused() {
    in_netns("feature_deps", || {
        make_tap("tap0");
        let mem = guest_memory();
        let (dev, _irq) = device(
            "virtio-net-tap,id=net0,ifname=tap0",
            &mem,
            BackendMode::Open,
        );
        let d = Driver::new(&mem, &dev);
        use baton_virtio::regs::status as st;
        d.wr(regs::STATUS, st::ACKNOWLEDGE);
        d.wr(regs::STATUS, st::ACKNOWLEDGE | st::DRIVER);
        d.wr(regs::DRIVER_FEATURES_SEL, 0);
        d.wr(regs::DRIVER_FEATURES, (f::GUEST_TSO4) as u32);
        d.wr(regs::DRIVER_FEATURES_SEL, 1);
        d.wr(regs::DRIVER_FEATURES, 1);
        d.wr(regs::STATUS, st::ACKNOWLEDGE | st::DRIVER | st::FEATURES_OK);
        assert_eq!(d.rd(regs::STATUS) & st::FEATURES_OK, 0);
    });
}

#[test]
fn hostile_descriptors_need_a_reset_and_never_panic() {
    in_netns("hostile_descriptors", || {
        make_tap("tap0");
        let mem = guest_memory();
        let (dev, _irq) = device(
            "virtio-net-tap,id=net0,ifname=tap0",
            &mem,
            BackendMode::Open,
        );
        let pkt = Packet::bind("tap0");
        let mut d = Driver::new(&mem, &dev);
        d.init(V1 | f::MRG_RXBUF, &[0, 1], 2048);
        // A tx descriptor pointing outside guest memory.
        d.poke_desc(1, 0, 0xffff_0000_0000, 100, 0);
        d.notify(1);
        assert_ne!(
            d.rd(regs::STATUS) & baton_virtio::regs::status::DEVICE_NEEDS_RESET,
            0
        );
        // Reset and start again: the device works.
        d.init(V1 | f::MRG_RXBUF, &[0, 1], 2048);
        // A huge tx chain (longer than any frame) is dropped, not read past its end.
        d.poke_desc(1, 0, 0x10_0000, 0x10_0000, 0);
        d.notify(1);
        assert_eq!(dev.stats().tx_dropped, 1);
        // An rx buffer outside guest memory.
        d.poke_desc(0, 0, 0xffff_0000_0000, 2048, 2);
        d.notify(0);
        pkt.send(&seq_frame([2, 0, 0, 0, 0, 1], 1, 100));
        std::thread::sleep(Duration::from_millis(20));
        dev.tap_readable(0);
        assert_ne!(
            d.rd(regs::STATUS) & baton_virtio::regs::status::DEVICE_NEEDS_RESET,
            0
        );
    });
}

/// An rx chain with no writable room is completed empty exactly once, after the frame
/// found room: a frame that has to wait leaves the ring untouched.
#[test]
fn rx_chains_without_room_are_completed_once() {
    in_netns("rx_no_room", || {
        make_tap("tap0");
        let mem = guest_memory();
        let (dev, _irq) = device(
            "virtio-net-tap,id=net0,ifname=tap0",
            &mem,
            BackendMode::Open,
        );
        let pkt = Packet::bind("tap0");
        let mut d = Driver::new(&mem, &dev);
        d.init(V1 | f::MRG_RXBUF, &[0, 1], 2048);
        d.poke_desc(0, 63, 0x10_0000, 2048, 0); // device-readable only: no room
        d.notify(0);
        pkt.send(&seq_frame([2, 0, 0, 0, 0, 1], 5, 100));
        std::thread::sleep(Duration::from_millis(20));
        dev.tap_readable(0);
        dev.tap_readable(0);
        assert!(
            d.recv_raw(0).is_empty(),
            "nothing completed while the frame waits"
        );
        d.fill_rx(0);
        d.notify(0);
        let used = d.recv_raw(0);
        assert_eq!(used.len(), 2);
        assert_eq!(used[0].0, 0, "the roomless chain, once, empty");
        assert_eq!(frame_seq(&used[1].1[HDR..]), 5);
    });
}
