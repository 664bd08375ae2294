//! A section-aware relay between a source and a destination, to cut, hold or corrupt a
//! live stream exactly where a test wants it.
//!
//! Each connection the source opens (main, RAM channels) is read section by section with
//! the engine's own framing (so the relay knows the channel and section it is at, and
//! forwards fds), and written on to the destination raw, so it can also send what no
//! correct engine would. The return path (destination to source) is copied as it comes.

use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

pub use baton_migration::protocol::ChannelHeader;
use baton_migration::protocol::{encode_section_header, footer, ChannelKind, SectionType};
use baton_migration::transport::{Channel, Transport};
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

/// Which connection: main, or RAM channel `i`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Chan {
    Main,
    Ram(u16),
}

/// A section on its way to the destination.
#[derive(Debug)]
pub struct Event<'a> {
    pub chan: Chan,
    pub seq: u32,
    pub ty: SectionType,
    pub payload: &'a [u8],
}

pub enum Action {
    Forward,
    /// Forward with another payload (framing made correct again).
    Replace(Vec<u8>),
    /// Forward with a wrong footer.
    CorruptFooter,
    /// Wait until the latch opens, then forward.
    Hold(Latch),
    /// Close both connections before this section: the peer "dies".
    CutBefore,
    /// Send the section header and half the payload, then close both connections.
    CutInside,
}

pub enum HeaderAction {
    Forward,
    /// Send these bytes instead of the channel header.
    Raw(Vec<u8>),
}

type Plan = dyn Fn(&Event<'_>) -> Action + Send + Sync;
type HeaderPlan = dyn Fn(Chan, &ChannelHeader) -> HeaderAction + Send + Sync;

/// A one-shot gate a held section waits on; `reached` tells the test it is held.
#[derive(Clone, Default)]
pub struct Latch(Arc<(Mutex<(bool, bool)>, Condvar)>);

impl Latch {
    pub fn open(&self) {
        self.0 .0.lock().unwrap().1 = true;
        self.0 .1.notify_all();
    }
    /// Block until the test opens the latch (and tell it we are here).
    pub fn hold(&self) {
        let mut g = self.0 .0.lock().unwrap();
        g.0 = true;
        self.0 .1.notify_all();
        drop(self.0 .1.wait_while(g, |(_, open)| !*open).unwrap());
    }
    /// Block until a section is held here.
    pub fn wait_reached(&self) {
        let g = self.0 .0.lock().unwrap();
        drop(self.0 .1.wait_while(g, |(reached, _)| !*reached).unwrap());
    }
}

/// What went to the destination on the main channel, byte for byte.
#[derive(Clone, Default)]
pub struct Recording(pub Arc<Mutex<Vec<u8>>>);

pub struct Relay {
    pub path: PathBuf,
    pub recording: Recording,
    accept: Option<JoinHandle<()>>,
}

impl Relay {
    /// Listen at `path` for `connections` connections from the source, each relayed to the
    /// destination listening at `dest`.
    pub fn start(
        path: &Path,
        dest: &Path,
        connections: usize,
        plan: impl Fn(&Event<'_>) -> Action + Send + Sync + 'static,
        header_plan: impl Fn(Chan, &ChannelHeader) -> HeaderAction + Send + Sync + 'static,
    ) -> Relay {
        let l = UnixListener::bind(path).unwrap();
        let dest = dest.to_path_buf();
        let plan: Arc<Plan> = Arc::new(plan);
        let header_plan: Arc<HeaderPlan> = Arc::new(header_plan);
        let recording = Recording::default();
        let rec = recording.clone();
        let accept = std::thread::spawn(move || {
            let mut conns = Vec::new();
            for _ in 0..connections {
                let Ok((src, _)) = l.accept() else { break };
                let (dest, plan, hp, rec) =
                    (dest.clone(), plan.clone(), header_plan.clone(), rec.clone());
                conns.push(std::thread::spawn(move || {
                    relay_one(src, &dest, &*plan, &*hp, &rec)
                }));
            }
            for c in conns {
                let _ = c.join();
            }
        });
        Relay {
            path: path.to_path_buf(),
            recording,
            accept: Some(accept),
        }
    }

    /// Forward everything unchanged.
    pub fn transparent(path: &Path, dest: &Path, connections: usize) -> Relay {
        Relay::start(
            path,
            dest,
            connections,
            |_| Action::Forward,
            |_, _| HeaderAction::Forward,
        )
    }

    pub fn join(mut self) -> Vec<u8> {
        if let Some(h) = self.accept.take() {
            let _ = h.join();
        }
        self.recording.0.lock().unwrap().clone()
    }
}

fn raw(dst: &mut UnixStream, bytes: &[u8]) -> bool {
    dst.write_all(bytes).is_ok()
}

fn relay_one(src: UnixStream, dest: &Path, plan: &Plan, hp: &HeaderPlan, rec: &Recording) {
    let Ok(mut dst) = UnixStream::connect(dest) else {
        return;
    };
    // The return path, copied raw until the destination closes.
    let (mut back_from, mut back_to) = (dst.try_clone().unwrap(), src.try_clone().unwrap());
    let back = std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        loop {
            match back_from.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if back_to.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            }
        }
        let _ = back_to.shutdown(Shutdown::Write);
    });
    let src_handle = src.try_clone().unwrap();
    let mut ch = Channel::new("relay", Transport::Unix(src));
    let cut = |dst: &UnixStream| {
        let _ = dst.shutdown(Shutdown::Both);
        let _ = src_handle.shutdown(Shutdown::Both);
    };
    let Ok(h) = ch.read_header() else {
        let _ = dst.shutdown(Shutdown::Write);
        let _ = back.join();
        return;
    };
    let chan = match h.kind {
        ChannelKind::Main => Chan::Main,
        ChannelKind::Ram => Chan::Ram(h.index),
    };
    let is_main = chan == Chan::Main;
    let record = |b: &[u8]| {
        if is_main {
            rec.0.lock().unwrap().extend_from_slice(b);
        }
    };
    let header = match hp(chan, &h) {
        HeaderAction::Forward => h.encode().to_vec(),
        HeaderAction::Raw(b) => b,
    };
    record(&header);
    let mut ok = raw(&mut dst, &header);
    let mut was_cut = false;
    while ok {
        let Ok(s) = ch.recv() else { break };
        let ev = Event {
            chan,
            seq: s.seq,
            ty: s.ty,
            payload: &s.payload,
        };
        let mut payload = s.payload.clone();
        let mut foot = footer(s.seq);
        match plan(&ev) {
            Action::Forward => {}
            Action::Replace(p) => payload = p,
            Action::CorruptFooter => foot[0] ^= 0x5a,
            Action::Hold(l) => l.hold(),
            Action::CutBefore => {
                cut(&dst);
                was_cut = true;
                break;
            }
            Action::CutInside => {
                let hdr = encode_section_header(s.ty, s.seq, payload.len() as u32);
                let _ = raw(&mut dst, &hdr);
                let _ = raw(&mut dst, &payload[..payload.len() / 2]);
                record(&hdr);
                record(&payload[..payload.len() / 2]);
                cut(&dst);
                was_cut = true;
                break;
            }
        }
        let mut bytes = encode_section_header(s.ty, s.seq, payload.len() as u32).to_vec();
        bytes.extend_from_slice(&payload);
        bytes.extend_from_slice(&foot);
        record(&bytes);
        ok = if s.fds.is_empty() {
            raw(&mut dst, &bytes)
        } else {
            let fds: Vec<RawFd> = s.fds.iter().map(|f| f.as_raw_fd()).collect();
            match dst.send_with_fds(&[&bytes[..1]], &fds) {
                Ok(1) => raw(&mut dst, &bytes[1..]),
                _ => false,
            }
        };
    }
    if was_cut {
        let _ = back.join();
        return;
    }
    // Source finished (or the destination stopped taking bytes): let the destination
    // finish talking, then close the source's side.
    let _ = dst.shutdown(Shutdown::Write);
    let _ = back.join();
    let _ = src_handle.shutdown(Shutdown::Both);
}
