//! Network pieces of the net scenarios: a network namespace holding a TAP, AF_PACKET
//! sockets opened inside a namespace (the "host side" of the TAP), and a traffic peer
//! speaking the harness guest's test protocol (`tests/guest/README.md`, `baton.net=seq`).
//!
//! Everything happens inside namespaces the test creates: the TAP is created there, the
//! VMMs run there (`ip netns exec`), and the test's sockets are opened from a thread that
//! entered the namespace (`setns`), so no frame touches the host's own network.

use std::collections::HashSet;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::skip_or_fail;

/// The guest's MAC (given to the device with `mac=`).
pub const GUEST_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
/// The MAC the test's frames come from.
pub const HOST_MAC: [u8; 6] = [0x02, 0xba, 0x70, 0x00, 0x00, 0x01];
/// Sequence frames (host's and guest's own), echoes, RARP announces.
pub const ETH_SEQ: u16 = 0x88b5;
pub const ETH_ECHO: u16 = 0x88b6;
pub const ETH_RARP: u16 = 0x8035;
const PACKET_OUTGOING: u8 = 4;

/// Whether the test may create namespaces and TAPs (root); skips or fails otherwise.
pub fn root_or_skip(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    skip_or_fail(&format!(
        "{test}: needs root for network namespaces and TAP devices"
    ))
}

/// The net scenarios each run one or two spinning guests; one at a time keeps their
/// rates steady on a small machine.
pub fn serial() -> MutexGuard<'static, ()> {
    static LOCK: OnceLock<Mutex<()>> = OnceLock::new();
    LOCK.get_or_init(|| Mutex::new(()))
        .lock()
        .unwrap_or_else(|p| p.into_inner())
}

fn run(cmd: &str, args: &[&str]) -> Result<String, String> {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .map_err(|e| format!("{cmd}: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "{cmd} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// A network namespace, deleted on drop.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(tag: &str) -> Result<Netns, String> {
        let name = format!("bnet-{tag}-{}", std::process::id() % 100000);
        let _ = run("ip", &["netns", "del", &name]);
        run("ip", &["netns", "add", &name])?;
        let ns = Netns { name };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// `ip -n NS ARGS`.
    pub fn ip(&self, args: &[&str]) -> Result<String, String> {
        ip_in(&self.name, args)
    }

    /// A persistent multi-queue TAP with vnet headers, up (see [`add_tap`]).
    pub fn add_tap(&self, name: &str) -> Result<(), String> {
        add_tap(&self.name, name)
    }
}

/// `ip -n NS ARGS`.
pub fn ip_in(ns: &str, args: &[&str]) -> Result<String, String> {
    let mut v = vec!["-n", ns];
    v.extend_from_slice(args);
    run("ip", &v)
}

/// A persistent multi-queue TAP with vnet headers in namespace `ns`, up, without IPv6
/// chatter.
pub fn add_tap(ns: &str, name: &str) -> Result<(), String> {
    ip_in(
        ns,
        &[
            "tuntap",
            "add",
            "dev",
            name,
            "mode",
            "tap",
            "multi_queue",
            "vnet_hdr",
        ],
    )?;
    ip_in(ns, &["link", "set", name, "addrgenmode", "none"])?;
    ip_in(ns, &["link", "set", name, "up"])?;
    Ok(())
}

/// Waits until the kernel's link watcher has activated `ifname` in `ns` (carrier seen,
/// qdisc attached). A TAP gets its carrier when a VMM attaches its first queue, but
/// until the link watcher runs (up to a second later) the interface's qdisc is `noop`,
/// which drops what is sent: frames sent then never reach any TAP queue.
pub fn wait_carrier(ns: &str, ifname: &str, timeout: Duration) -> Result<(), String> {
    let end = Instant::now() + timeout;
    loop {
        let l = ip_in(ns, &["-o", "link", "show", ifname])?;
        if l.contains("state UP") && !l.contains("qdisc noop") {
            return Ok(());
        }
        if Instant::now() > end {
            return Err(format!("{ifname} in {ns} not up after {timeout:?}: {l}"));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Runs `f` on a thread that entered namespace `ns` (sockets it opens stay in it).
pub fn enter<T: Send + 'static>(
    ns: &str,
    f: impl FnOnce() -> Result<T, String> + Send + 'static,
) -> Result<T, String> {
    let path = format!("/var/run/netns/{ns}");
    std::thread::spawn(move || {
        let file = std::fs::File::open(&path).map_err(|e| format!("{path}: {e}"))?;
        // SAFETY: setns on a namespace fd; it changes only this thread's namespace.
        if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(format!("setns {path}: {}", io::Error::last_os_error()));
        }
        f()
    })
    .join()
    .map_err(|_| "namespace thread panicked".to_string())?
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = run("ip", &["netns", "del", &self.name]);
    }
}

/// An AF_PACKET socket bound to an interface: the host's side of a TAP.
pub struct PacketSocket {
    fd: OwnedFd,
}

impl PacketSocket {
    /// Opens one on `ifname` inside namespace `ns`.
    pub fn open(ns: &str, ifname: &str) -> Result<PacketSocket, String> {
        let ifname = ifname.to_owned();
        enter(ns, move || PacketSocket::open_here(&ifname))
    }

    fn open_here(ifname: &str) -> Result<PacketSocket, String> {
        let proto = (libc::ETH_P_ALL as u16).to_be();
        // SAFETY: plain socket creation; the result is checked.
        let fd = unsafe {
            libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                i32::from(proto),
            )
        };
        if fd < 0 {
            return Err(format!("AF_PACKET socket: {}", io::Error::last_os_error()));
        }
        // SAFETY: fd was just created and is owned by nothing else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let name = std::ffi::CString::new(ifname).map_err(|e| e.to_string())?;
        // SAFETY: a valid NUL-terminated name.
        let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
        if ifindex == 0 {
            return Err(format!("no interface {ifname}"));
        }
        // SAFETY: sockaddr_ll is plain data; all-zero is valid.
        let mut sa: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sa.sll_family = libc::AF_PACKET as u16;
        sa.sll_protocol = proto;
        sa.sll_ifindex = ifindex as i32;
        // SAFETY: `sa` is a valid sockaddr_ll of the given length.
        let r = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&sa as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        if r != 0 {
            return Err(format!("bind to {ifname}: {}", io::Error::last_os_error()));
        }
        Ok(PacketSocket { fd })
    }

    pub fn send(&self, frame: &[u8]) -> io::Result<()> {
        // SAFETY: `frame` is valid for reads of its length.
        let n = unsafe { libc::send(self.fd.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
        if n == frame.len() as isize {
            Ok(())
        } else if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Err(io::Error::new(io::ErrorKind::WriteZero, "short send"))
        }
    }

    /// One incoming frame (frames this host sends are skipped), waiting up to `wait`.
    pub fn recv(&self, wait: Duration, buf: &mut [u8]) -> io::Result<Option<usize>> {
        let mut p = libc::pollfd {
            fd: self.fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        let r = unsafe { libc::poll(&mut p, 1, wait.as_millis() as i32) };
        if r <= 0 {
            return Ok(None);
        }
        // SAFETY: sockaddr_ll is plain data.
        let mut sa: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        let mut len = std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t;
        // SAFETY: `buf` and `sa` are valid for writes of their lengths.
        let n = unsafe {
            libc::recvfrom(
                self.fd.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                libc::MSG_DONTWAIT,
                (&mut sa as *mut libc::sockaddr_ll).cast(),
                &mut len,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            return match e.kind() {
                io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted => Ok(None),
                _ => Err(e),
            };
        }
        Ok((sa.sll_pkttype != PACKET_OUTGOING).then_some(n as usize))
    }
}

/// What the host side saw and did.
#[derive(Clone, Debug, Default)]
pub struct TrafficStats {
    /// Host sequence frames sent (numbers `0..host_sent`).
    pub host_sent: u32,
    pub send_errors: u64,
    /// Distinct host sequence numbers echoed back by the guest, and repeated echoes.
    pub echoes: u64,
    pub echo_dups: u64,
    /// The guest's own sequence frames: how many, the first and the next expected
    /// number, forward jumps (`lost`) and steps back (`dup`).
    pub guest_frames: u64,
    pub guest_first: Option<u32>,
    pub guest_next: Option<u32>,
    pub guest_lost: u64,
    pub guest_dup: u64,
    /// RARP frames from the guest's MAC (a VMM announcing it), which peers saw them
    /// (bit `i` = peer `i`), and when the first came.
    pub rarp: u64,
    pub rarp_peers: u32,
    pub rarp_at: Option<Instant>,
    pub last_guest_frame_at: Option<Instant>,
}

impl TrafficStats {
    /// Host frames the guest never echoed.
    pub fn host_lost(&self) -> u64 {
        u64::from(self.host_sent).saturating_sub(self.echoes)
    }
}

#[derive(Default)]
struct Shared {
    stats: Mutex<(TrafficStats, HashSet<u32>)>,
    stop: AtomicBool,
    sending: Vec<AtomicBool>,
}

/// Host-side traffic on one or more TAPs (e.g. one per namespace): senders of sequence
/// frames at a steady rate, sharing one sequence, and receivers checking what comes back.
pub struct Traffic {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
}

/// The 60-byte frame carrying host sequence number `seq`.
pub fn host_frame(seq: u32) -> Vec<u8> {
    let mut f = vec![0u8; 60];
    f[..6].copy_from_slice(&GUEST_MAC);
    f[6..12].copy_from_slice(&HOST_MAC);
    f[12..14].copy_from_slice(&ETH_SEQ.to_be_bytes());
    f[14..18].copy_from_slice(&seq.to_le_bytes());
    for (i, b) in f[18..].iter_mut().enumerate() {
        *b = (seq as usize + i) as u8;
    }
    f
}

fn observe(stats: &mut (TrafficStats, HashSet<u32>), peer: usize, f: &[u8]) {
    if f.len() < 18 {
        return;
    }
    let (s, echoed) = stats;
    let seq = u32::from_le_bytes([f[14], f[15], f[16], f[17]]);
    match u16::from_be_bytes([f[12], f[13]]) {
        ETH_SEQ if f[6..12] == GUEST_MAC => {
            s.guest_frames += 1;
            s.last_guest_frame_at = Some(Instant::now());
            s.guest_first.get_or_insert(seq);
            match s.guest_next {
                Some(n) if seq > n => s.guest_lost += u64::from(seq - n),
                Some(n) if seq < n => s.guest_dup += 1,
                _ => {}
            }
            if s.guest_next.is_none_or(|n| seq >= n) {
                s.guest_next = Some(seq.wrapping_add(1));
            }
        }
        ETH_ECHO if f[..6] == HOST_MAC => {
            if echoed.insert(seq) {
                s.echoes += 1;
            } else {
                s.echo_dups += 1;
            }
        }
        ETH_RARP if f[6..12] == GUEST_MAC => {
            s.rarp += 1;
            s.rarp_peers |= 1 << peer;
            s.rarp_at.get_or_insert_with(Instant::now);
        }
        _ => {}
    }
}

impl Traffic {
    /// Traffic over `peers` (one socket each); sender `i` sends one frame every
    /// `interval` while [`Self::set_sending`]`(i, true)`.
    pub fn start(peers: Vec<PacketSocket>, interval: Duration) -> Traffic {
        let shared = Arc::new(Shared {
            sending: peers.iter().map(|_| AtomicBool::new(false)).collect(),
            ..Shared::default()
        });
        let mut threads = Vec::new();
        for (i, sock) in peers.into_iter().enumerate() {
            let sock = Arc::new(sock);
            let (sh, rx) = (shared.clone(), sock.clone());
            threads.push(std::thread::spawn(move || {
                let mut buf = vec![0u8; 70000];
                while !sh.stop.load(Ordering::SeqCst) {
                    match rx.recv(Duration::from_millis(20), &mut buf) {
                        Ok(Some(n)) => {
                            let mut st = sh.stats.lock().unwrap();
                            observe(&mut st, i, &buf[..n]);
                        }
                        Ok(None) => {}
                        Err(e) => panic!("AF_PACKET receive: {e}"),
                    }
                }
            }));
            let sh = shared.clone();
            threads.push(std::thread::spawn(move || {
                let mut next = Instant::now();
                while !sh.stop.load(Ordering::SeqCst) {
                    next += interval;
                    if sh.sending[i].load(Ordering::SeqCst) {
                        let mut st = sh.stats.lock().unwrap();
                        let seq = st.0.host_sent;
                        match sock.send(&host_frame(seq)) {
                            Ok(()) => st.0.host_sent += 1,
                            Err(_) => st.0.send_errors += 1,
                        }
                    }
                    let now = Instant::now();
                    if next > now {
                        std::thread::sleep(next - now);
                    } else {
                        next = now;
                    }
                }
            }));
        }
        Traffic { shared, threads }
    }

    pub fn set_sending(&self, peer: usize, on: bool) {
        self.shared.sending[peer].store(on, Ordering::SeqCst);
    }

    pub fn stats(&self) -> TrafficStats {
        self.shared.stats.lock().unwrap().0.clone()
    }

    /// Waits until `pred` holds (true) or `timeout` passes (false).
    pub fn wait(&self, timeout: Duration, pred: impl Fn(&TrafficStats) -> bool) -> bool {
        let end = Instant::now() + timeout;
        loop {
            if pred(&self.stats()) {
                return true;
            }
            if Instant::now() >= end {
                return false;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Stops every thread; the final statistics.
    pub fn stop(self) -> TrafficStats {
        self.shared.stop.store(true, Ordering::SeqCst);
        for t in self.threads {
            if let Err(e) = t.join() {
                std::panic::resume_unwind(e);
            }
        }
        self.shared.stats.lock().unwrap().0.clone()
    }
}

/// `text` without ANSI escape sequences (tracing colours its fields).
pub fn plain(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // CSI: ESC [ parameters final-byte
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// The downtime report lines of a source's "migration ... completed" log.
pub fn downtime_report(lines: &[super::Line]) -> Vec<String> {
    let Some(start) = lines.iter().position(|l| l.text.starts_with("downtime ")) else {
        return Vec::new();
    };
    lines[start..]
        .iter()
        .take_while(|l| l.text.starts_with("downtime ") || l.text.starts_with("  "))
        .map(|l| l.text.clone())
        .collect()
}
