//! Test support: a network namespace per test, TAP interfaces and an AF_PACKET socket in
//! it, and a guest-side virtio-net driver over real guest memory.

#![allow(dead_code)]

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use baton_qdev::{DeviceRegistry, DeviceSpec, PropertyResolver};
use baton_virtio::regs::{self, status};
use baton_virtio_net_tap::{BackendMode, VirtioNetTap, VirtioNetTapConfig};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

pub type Mem = GuestMemoryMmap<()>;
pub type Dev = VirtioNetTap<Mem>;

pub const ETH_SEQ: u16 = 0x88b5;
pub const HDR: usize = 12;
pub const GUEST_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];

/// Runs `f` in a fresh network namespace (its own thread), or skips when not root.
pub fn in_netns<F: FnOnce() + Send + 'static>(name: &str, f: F) {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        let msg = format!("{name}: skipped: needs root for a network namespace and TAP devices");
        if std::env::var("BATON_CI").as_deref() == Ok("1") {
            panic!("{msg} (BATON_CI=1)");
        }
        eprintln!("{msg}");
        return;
    }
    let t = std::thread::spawn(move || {
        // SAFETY: unshare only changes this thread's network namespace.
        let r = unsafe { libc::unshare(libc::CLONE_NEWNET) };
        assert_eq!(
            r,
            0,
            "unshare(CLONE_NEWNET): {}",
            std::io::Error::last_os_error()
        );
        sh("ip link set lo up");
        f()
    });
    if let Err(e) = t.join() {
        std::panic::resume_unwind(e);
    }
}

/// Runs a command (in this thread's namespace) and asserts it succeeded.
pub fn sh(cmd: &str) -> String {
    let out = Command::new("sh").arg("-c").arg(cmd).output().expect("sh");
    assert!(
        out.status.success(),
        "{cmd}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A persistent multi-queue TAP, up, without IPv6 chatter.
pub fn make_tap(name: &str) {
    sh(&format!(
        "ip tuntap add dev {name} mode tap multi_queue vnet_hdr"
    ));
    sh(&format!("ip link set {name} addrgenmode none"));
    sh(&format!("ip link set {name} up"));
}

pub fn config(spec: &str) -> VirtioNetTapConfig {
    let registry = DeviceRegistry::with_types([baton_virtio_net_tap::device_type()]).unwrap();
    let props = PropertyResolver::new(&registry)
        .resolve(&DeviceSpec::parse(spec).unwrap())
        .unwrap();
    VirtioNetTapConfig::from_resolved(&props).unwrap()
}

pub fn guest_memory() -> Mem {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 8 << 20)]).unwrap()
}

pub fn device(spec: &str, mem: &Mem, mode: BackendMode) -> (Dev, Arc<EventFd>) {
    let irq = Arc::new(EventFd::new(EFD_NONBLOCK).unwrap());
    let id = spec
        .split(',')
        .find_map(|p| p.strip_prefix("id="))
        .unwrap_or("net0");
    let dev = VirtioNetTap::new(id, config(spec), mem.clone(), irq.clone(), mode).unwrap();
    if mode == BackendMode::Open {
        wait_carrier(&dev.config().ifname);
    }
    (dev, irq)
}

/// Waits until the kernel's link watcher has seen the TAP's carrier (its first queue
/// attached): until then the interface's qdisc is a no-op that drops what is sent.
pub fn wait_carrier(ifname: &str) {
    let up = wait_until(Duration::from_secs(3), || {
        sh(&format!("ip -o link show {ifname}")).contains("state UP")
    });
    assert!(up, "{ifname} has no carrier");
}

/// An AF_PACKET socket on an interface: what "the host's network" sees of the TAP.
pub struct Packet {
    fd: OwnedFd,
}

impl Packet {
    pub fn bind(ifname: &str) -> Packet {
        let proto = (libc::ETH_P_ALL as u16).to_be();
        // SAFETY: plain socket creation.
        let fd = unsafe {
            libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                i32::from(proto),
            )
        };
        assert!(
            fd >= 0,
            "AF_PACKET socket: {}",
            std::io::Error::last_os_error()
        );
        // SAFETY: fd was just created and is owned here.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let name = std::ffi::CString::new(ifname).unwrap();
        // SAFETY: valid NUL-terminated name.
        let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
        assert!(ifindex > 0, "no interface {ifname}");
        // SAFETY: sockaddr_ll is plain data.
        let mut sa: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sa.sll_family = libc::AF_PACKET as u16;
        sa.sll_protocol = proto;
        sa.sll_ifindex = ifindex as i32;
        // SAFETY: sa is a valid sockaddr_ll of the given length.
        let r = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&sa as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        assert_eq!(r, 0, "bind: {}", std::io::Error::last_os_error());
        Packet { fd }
    }

    pub fn send(&self, frame: &[u8]) {
        loop {
            // SAFETY: frame is valid for reads.
            let n =
                unsafe { libc::send(self.fd.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
            if n == frame.len() as isize {
                return;
            }
            let e = std::io::Error::last_os_error();
            assert_eq!(e.kind(), std::io::ErrorKind::WouldBlock, "send: {e}");
            std::thread::sleep(Duration::from_micros(50));
        }
    }

    /// One frame, if one is waiting.
    pub fn try_recv(&self) -> Option<Vec<u8>> {
        let mut buf = vec![0u8; 70000];
        // SAFETY: buf is valid for writes.
        let n = unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        (n >= 0).then(|| buf[..n as usize].to_vec())
    }

    /// Frames of ethertype `ethertype` received until `want` arrived or `timeout` passed.
    pub fn recv_frames(&self, ethertype: u16, want: usize, timeout: Duration) -> Vec<Vec<u8>> {
        let deadline = Instant::now() + timeout;
        let mut out = Vec::new();
        let mut buf = vec![0u8; 70000];
        while out.len() < want && Instant::now() < deadline {
            // SAFETY: buf is valid for writes.
            let n =
                unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n < 0 {
                std::thread::sleep(Duration::from_micros(200));
                continue;
            }
            let f = &buf[..n as usize];
            if f.len() >= 14 && u16::from_be_bytes([f[12], f[13]]) == ethertype {
                out.push(f.to_vec());
            }
        }
        out
    }
}

/// An Ethernet frame of our test ethertype carrying `seq`, `len` bytes long.
pub fn seq_frame(src: [u8; 6], seq: u32, len: usize) -> Vec<u8> {
    let mut f = vec![0u8; len.max(18)];
    f[..6].copy_from_slice(&[0xff; 6]);
    f[6..12].copy_from_slice(&src);
    f[12..14].copy_from_slice(&ETH_SEQ.to_be_bytes());
    f[14..18].copy_from_slice(&seq.to_le_bytes());
    for (i, b) in f[18..].iter_mut().enumerate() {
        *b = (seq as usize + i) as u8;
    }
    f
}

/// The sequence number of a frame made by `seq_frame`, checking its body.
pub fn frame_seq(f: &[u8]) -> u32 {
    assert!(
        f.len() >= 18 && u16::from_be_bytes([f[12], f[13]]) == ETH_SEQ,
        "not a seq frame"
    );
    let seq = u32::from_le_bytes([f[14], f[15], f[16], f[17]]);
    for (i, b) in f[18..].iter().enumerate() {
        assert_eq!(
            *b,
            (seq as usize + i) as u8,
            "frame {seq} body corrupted at {i}"
        );
    }
    seq
}

/// An IPv4/UDP frame from 10.0.0.1:`sport` to 10.0.0.2:`dport` (checksum 0: none).
pub fn udp_frame(dst_mac: [u8; 6], sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(&dst_mac);
    f.extend_from_slice(&[0x02, 0, 0, 0, 0, 1]);
    f.extend_from_slice(&0x0800u16.to_be_bytes());
    let total = 20 + 8 + payload.len();
    let mut ip = [0u8; 20];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&(total as u16).to_be_bytes());
    ip[8] = 64;
    ip[9] = 17;
    ip[12..16].copy_from_slice(&[10, 0, 0, 1]);
    ip[16..20].copy_from_slice(&[10, 0, 0, 2]);
    let mut sum = 0u32;
    for c in ip.chunks(2) {
        sum += u32::from(u16::from_be_bytes([c[0], c[1]]));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    ip[10..12].copy_from_slice(&(!(sum as u16)).to_be_bytes());
    f.extend_from_slice(&ip);
    f.extend_from_slice(&sport.to_be_bytes());
    f.extend_from_slice(&dport.to_be_bytes());
    f.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    f.extend_from_slice(&[0, 0]);
    f.extend_from_slice(payload);
    f
}

const DESC_F_NEXT: u16 = 1;
const DESC_F_WRITE: u16 = 2;

/// The driver's view of one virtqueue.
#[derive(Clone, Debug)]
pub struct DQ {
    pub size: u16,
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
    pub bufs: u64,
    pub buf_size: u32,
    pub avail_idx: u16,
    pub last_used: u16,
    pub free: Vec<u16>,
}

/// A spec-following virtio-net driver working on guest memory and MMIO registers.
pub struct Driver {
    pub mem: Mem,
    pub dev: Dev,
    pub queues: Vec<Option<DQ>>,
    pub features: u64,
}

pub const Q_SIZE: u16 = 64;

impl Driver {
    pub fn new(mem: &Mem, dev: &Dev) -> Self {
        let nq = 2 * usize::from(dev.config().queue_pairs) + 1;
        Driver {
            mem: mem.clone(),
            dev: dev.clone(),
            queues: vec![None; nq],
            features: 0,
        }
    }

    pub fn rd(&self, off: u64) -> u32 {
        let mut b = [0u8; 4];
        self.dev.mmio_read(off, &mut b);
        u32::from_le_bytes(b)
    }

    pub fn wr(&self, off: u64, v: u32) {
        self.dev.mmio_write(off, &v.to_le_bytes());
    }

    pub fn config_u16(&self, off: u64) -> u16 {
        let mut b = [0u8; 2];
        self.dev.mmio_read(regs::CONFIG + off, &mut b);
        u16::from_le_bytes(b)
    }

    pub fn offered(&self) -> u64 {
        let mut f = 0u64;
        for sel in 0..2u32 {
            self.wr(regs::DEVICE_FEATURES_SEL, sel);
            f |= u64::from(self.rd(regs::DEVICE_FEATURES)) << (32 * sel);
        }
        f
    }

    /// Reset, negotiate `wanted` ∩ offered, set up `queues` (indices) with rx buffers of
    /// `rx_buf` bytes, DRIVER_OK.
    pub fn init(&mut self, wanted: u64, queues: &[u16], rx_buf: u32) -> u64 {
        self.wr(regs::STATUS, 0);
        self.wr(regs::STATUS, status::ACKNOWLEDGE);
        self.wr(regs::STATUS, status::ACKNOWLEDGE | status::DRIVER);
        let f = wanted & self.offered();
        for sel in 0..2u32 {
            self.wr(regs::DRIVER_FEATURES_SEL, sel);
            self.wr(regs::DRIVER_FEATURES, (f >> (32 * sel)) as u32);
        }
        self.wr(
            regs::STATUS,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
        );
        assert_ne!(
            self.rd(regs::STATUS) & status::FEATURES_OK,
            0,
            "features refused"
        );
        self.features = f;
        for &q in queues {
            self.setup_queue(q, if q % 2 == 0 { rx_buf } else { 2048 });
        }
        self.wr(
            regs::STATUS,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK,
        );
        assert_eq!(self.rd(regs::STATUS) & status::DEVICE_NEEDS_RESET, 0);
        f
    }

    fn setup_queue(&mut self, qi: u16, buf_size: u32) {
        let base = 0x1_0000 + u64::from(qi) * 0x4000;
        let q = DQ {
            size: Q_SIZE,
            desc: base,
            avail: base + 0x1000,
            used: base + 0x2000,
            bufs: 0x10_0000 + u64::from(qi) * 0x10_0000,
            buf_size,
            avail_idx: 0,
            last_used: 0,
            free: (0..Q_SIZE).rev().collect(),
        };
        assert!(u64::from(buf_size) * u64::from(Q_SIZE) <= 0x10_0000);
        self.mem
            .write_slice(&[0u8; 0x3000], GuestAddress(base))
            .unwrap();
        self.wr(regs::QUEUE_SEL, qi.into());
        self.wr(regs::QUEUE_NUM, Q_SIZE.into());
        for (lo, addr) in [
            (regs::QUEUE_DESC_LOW, q.desc),
            (regs::QUEUE_DRIVER_LOW, q.avail),
            (regs::QUEUE_DEVICE_LOW, q.used),
        ] {
            self.wr(lo, addr as u32);
            self.wr(lo + 4, (addr >> 32) as u32);
        }
        self.wr(regs::QUEUE_READY, 1);
        self.queues[usize::from(qi)] = Some(q);
    }

    fn q(&mut self, qi: u16) -> &mut DQ {
        self.queues[usize::from(qi)].as_mut().expect("queue set up")
    }

    fn write_desc(&self, table: u64, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let mut d = [0u8; 16];
        d[..8].copy_from_slice(&addr.to_le_bytes());
        d[8..12].copy_from_slice(&len.to_le_bytes());
        d[12..14].copy_from_slice(&flags.to_le_bytes());
        d[14..16].copy_from_slice(&next.to_le_bytes());
        self.mem
            .write_slice(&d, GuestAddress(table + 16 * u64::from(i)))
            .unwrap();
    }

    fn publish(&mut self, qi: u16, head: u16) {
        let mem = self.mem.clone();
        let q = self.q(qi);
        let slot = q.avail + 4 + 2 * u64::from(q.avail_idx % q.size);
        mem.write_obj(head.to_le(), GuestAddress(slot)).unwrap();
        q.avail_idx = q.avail_idx.wrapping_add(1);
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        mem.write_obj(q.avail_idx.to_le(), GuestAddress(q.avail + 2))
            .unwrap();
    }

    pub fn notify(&self, qi: u16) {
        self.wr(regs::QUEUE_NOTIFY, qi.into());
    }

    /// Make every free descriptor of rx queue `qi` an rx buffer; returns how many.
    pub fn fill_rx(&mut self, qi: u16) -> usize {
        let mut n = 0;
        while let Some(head) = self.q(qi).free.pop() {
            let (bufs, size, desc) = {
                let q = self.q(qi);
                (q.bufs, q.buf_size, q.desc)
            };
            self.write_desc(
                desc,
                head,
                bufs + u64::from(head) * u64::from(size),
                size,
                DESC_F_WRITE,
                0,
            );
            self.publish(qi, head);
            n += 1;
        }
        n
    }

    /// Queue `frame` (vnet header + Ethernet frame) on tx queue `qi` (not notified);
    /// false when the ring is full (reap completions first).
    pub fn queue_tx(&mut self, qi: u16, hdr: [u8; HDR], frame: &[u8]) -> bool {
        self.reap_tx(qi);
        let Some(head) = self.q(qi).free.pop() else {
            return false;
        };
        let (bufs, size, desc) = {
            let q = self.q(qi);
            (q.bufs, q.buf_size, q.desc)
        };
        assert!(HDR + frame.len() <= size as usize);
        let at = bufs + u64::from(head) * u64::from(size);
        self.mem.write_slice(&hdr, GuestAddress(at)).unwrap();
        self.mem
            .write_slice(frame, GuestAddress(at + HDR as u64))
            .unwrap();
        self.write_desc(desc, head, at, (HDR + frame.len()) as u32, 0, 0);
        self.publish(qi, head);
        true
    }

    pub fn send(&mut self, qi: u16, frame: &[u8]) {
        while !self.queue_tx(qi, [0; HDR], frame) {
            std::thread::sleep(Duration::from_micros(100));
        }
        self.notify(qi);
    }

    fn used_entries(&mut self, qi: u16) -> Vec<(u16, u32)> {
        let mem = self.mem.clone();
        let q = self.q(qi);
        let idx: u16 = mem.read_obj(GuestAddress(q.used + 2)).unwrap();
        let mut out = Vec::new();
        while q.last_used != idx {
            let e = q.used + 4 + 8 * u64::from(q.last_used % q.size);
            let id: u32 = mem.read_obj(GuestAddress(e)).unwrap();
            let len: u32 = mem.read_obj(GuestAddress(e + 4)).unwrap();
            out.push((id as u16, len));
            q.last_used = q.last_used.wrapping_add(1);
        }
        out
    }

    /// Completed tx descriptors back to the free list; returns how many.
    pub fn reap_tx(&mut self, qi: u16) -> usize {
        let used = self.used_entries(qi);
        let q = self.q(qi);
        for (id, _) in &used {
            q.free.push(*id);
        }
        used.len()
    }

    /// Received frames as (vnet header, frame), merging buffers by `num_buffers`; the
    /// buffers are re-posted and the queue notified when any were used.
    pub fn recv(&mut self, qi: u16) -> Vec<([u8; HDR], Vec<u8>)> {
        let used = self.used_entries(qi);
        let mut out = Vec::new();
        let mut data = Vec::new();
        let mut left = 0u16;
        let (bufs, size) = {
            let q = self.q(qi);
            (q.bufs, q.buf_size)
        };
        for &(id, len) in &used {
            let mut b = vec![0u8; len as usize];
            self.mem
                .read_slice(&mut b, GuestAddress(bufs + u64::from(id) * u64::from(size)))
                .unwrap();
            if left == 0 {
                assert!(b.len() >= HDR, "rx buffer shorter than the header");
                left = u16::from_le_bytes([b[10], b[11]]);
                assert!(left >= 1, "num_buffers 0");
            }
            data.extend_from_slice(&b);
            left -= 1;
            if left == 0 {
                let mut hdr = [0u8; HDR];
                hdr.copy_from_slice(&data[..HDR]);
                out.push((hdr, data[HDR..].to_vec()));
                data.clear();
            }
            self.q(qi).free.push(id);
        }
        assert_eq!(left, 0, "a frame's buffers were not all used");
        if !used.is_empty() {
            self.fill_rx(qi);
            self.notify(qi);
        }
        out
    }

    pub fn q_free(&mut self, qi: u16) -> usize {
        self.q(qi).free.len()
    }

    /// Used rx entries as (len, bytes) without merging (buffers are not re-posted).
    pub fn recv_raw(&mut self, qi: u16) -> Vec<(u32, Vec<u8>)> {
        let used = self.used_entries(qi);
        let (bufs, size) = {
            let q = self.q(qi);
            (q.bufs, q.buf_size)
        };
        used.into_iter()
            .map(|(id, len)| {
                let mut b = vec![0u8; len as usize];
                self.mem
                    .read_slice(&mut b, GuestAddress(bufs + u64::from(id) * u64::from(size)))
                    .unwrap();
                (len, b)
            })
            .collect()
    }

    /// Writes descriptor `head` raw (anything a hostile driver likes) and publishes it.
    pub fn poke_desc(&mut self, qi: u16, head: u16, addr: u64, len: u32, flags: u16) {
        let desc = self.q(qi).desc;
        self.q(qi).free.retain(|&h| h != head);
        self.write_desc(desc, head, addr, len, flags, 0);
        self.publish(qi, head);
    }

    /// Sends a control command; returns the ack byte (the device answers synchronously
    /// on the notify).
    pub fn ctrl(&mut self, qi: u16, class: u8, cmd: u8, data: &[u8]) -> u8 {
        let head = self.q(qi).free.pop().unwrap();
        let (bufs, size, desc) = {
            let q = self.q(qi);
            (q.bufs, q.buf_size, q.desc)
        };
        let at = bufs + u64::from(head) * u64::from(size);
        let mut c = vec![class, cmd];
        c.extend_from_slice(data);
        self.mem.write_slice(&c, GuestAddress(at)).unwrap();
        self.mem.write_obj(0xffu8, GuestAddress(at + 1024)).unwrap();
        let second = self.q(qi).free.pop().unwrap();
        self.write_desc(desc, head, at, c.len() as u32, DESC_F_NEXT, second);
        self.write_desc(desc, second, at + 1024, 1, DESC_F_WRITE, 0);
        self.publish(qi, head);
        self.notify(qi);
        let used = self.used_entries(qi);
        assert_eq!(used, vec![(head, 1)], "control command answered");
        self.q(qi).free.extend([head, second]);
        self.mem.read_obj(GuestAddress(at + 1024)).unwrap()
    }
}

/// Polls `f` until it returns true or `timeout` passes.
pub fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_micros(200));
    }
    f()
}
