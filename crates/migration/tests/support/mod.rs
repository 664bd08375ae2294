//! A VM without KVM for engine tests: memfd RAM written by a "vCPU" thread that runs QEMU's
//! migration-test pattern (increment one byte in every page, pass after pass), counter
//! devices with memfd backends, and real sockets between a source and a destination
//! thread.

#![allow(dead_code)]

#[path = "../../../qdev/tests/common/mod.rs"]
pub mod testdev;

pub mod pair;
pub mod relay;
pub mod wrapped;

use std::net::TcpListener;
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

use baton_migration::{
    Capabilities, GuestRam, Incoming, MemfdRam, MigrationMode, MigrationSettings, Parameters,
    RamLayout, RamRegion, Target, VmControl,
};
use baton_qdev::Migratable;

pub use testdev::CounterDevice;

pub const MIB: u64 = 1 << 20;

pub fn layout(mib: u64) -> RamLayout {
    RamLayout {
        regions: vec![
            RamRegion {
                gpa: 0,
                size: mib * MIB / 2,
            },
            RamRegion {
                gpa: 1 << 32,
                size: mib * MIB / 2,
            },
        ],
    }
}

/// The vCPU gate: the writer holds the lock while it writes, `pause` takes it away.
#[derive(Clone, Default)]
pub struct Gate {
    inner: Arc<(Mutex<bool>, Condvar)>,
    /// Set while `pause` waits for the lock, so the writer steps aside (std's mutex is
    /// not fair, and the writer re-locks in a tight loop).
    requested: Arc<AtomicBool>,
    pub pauses: Arc<AtomicU64>,
    pub resumes: Arc<AtomicU64>,
    /// `resume` waits for this latch first (to hold a destination between GO and RUNNING).
    pub hold_resume: Arc<Mutex<Option<relay::Latch>>>,
}

impl VmControl for Gate {
    fn pause(&mut self) -> Result<(), String> {
        self.requested.store(true, Ordering::SeqCst);
        *self.inner.0.lock().map_err(|e| e.to_string())? = true;
        self.requested.store(false, Ordering::SeqCst);
        self.pauses.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
    fn resume(&mut self) -> Result<(), String> {
        let hold = self.hold_resume.lock().unwrap().clone();
        if let Some(l) = hold {
            l.hold();
        }
        *self.inner.0.lock().map_err(|e| e.to_string())? = false;
        self.inner.1.notify_all();
        self.resumes.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

impl Gate {
    pub fn is_paused(&self) -> bool {
        *self.inner.0.lock().unwrap()
    }
}

/// A guest workload on shared RAM, paused and resumed through its [`Gate`].
pub struct Workload {
    stop: Arc<AtomicBool>,
    pub writes: Arc<AtomicU64>,
    handle: Option<JoinHandle<Vec<u64>>>,
    gate: Gate,
}

impl Workload {
    /// Increment byte `pass % 4096`-ish of every page of region 0's first `pages` pages.
    pub fn start(ram: Arc<MemfdRam>, gate: Gate, pages: u64) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let writes = Arc::new(AtomicU64::new(0));
        let (s, w, g2) = (stop.clone(), writes.clone(), gate.clone());
        let handle = std::thread::spawn(move || {
            // What the guest wrote, kept outside guest RAM: the value every word must hold.
            let mut counts = vec![0u64; pages as usize * 8];
            let mut pass = 0u64;
            while !s.load(Ordering::Relaxed) {
                for p in 0..pages {
                    while gate.requested.load(Ordering::SeqCst) {
                        std::thread::yield_now();
                    }
                    let g = gate.inner.0.lock().unwrap();
                    // Held across the write: `pause` returns only between writes.
                    let _held = gate
                        .inner
                        .1
                        .wait_while(g, |paused| *paused && !s.load(Ordering::Relaxed))
                        .unwrap();
                    if s.load(Ordering::Relaxed) {
                        break;
                    }
                    let slot = p * 8 + pass % 8;
                    let off = p * 4096 + (pass % 8) * 8;
                    let mut b = [0u8; 8];
                    ram.read(0, off, &mut b).unwrap();
                    let v = u64::from_le_bytes(b).wrapping_add(1);
                    ram.write(0, off, &v.to_le_bytes()).unwrap();
                    counts[slot as usize] += 1;
                    w.fetch_add(1, Ordering::Relaxed);
                }
                pass += 1;
            }
            counts
        });
        Workload {
            stop,
            writes,
            handle: Some(handle),
            gate: g2,
        }
    }

    /// Stop the guest; returns how often it incremented each word of region 0 (page
    /// `i / 8`, word `i % 8`), which is what those words must hold.
    pub fn stop(mut self) -> Vec<u64> {
        self.stop.store(true, Ordering::SeqCst);
        drop(self.gate.inner.0.lock());
        self.gate.inner.1.notify_all();
        self.handle
            .take()
            .map(|h| h.join().expect("workload thread"))
            .unwrap_or_default()
    }
}

/// A fresh temp dir removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        let p = std::env::temp_dir().join(format!(
            "baton-mig-{tag}-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        ));
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Move this thread (and threads it spawns) into a new network namespace with only `lo`
/// up, so TCP tests never touch the host's interfaces. Needs root; without it, the reason.
pub fn private_netns() -> Result<(), String> {
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)
        .map_err(|e| format!("unshare(CLONE_NEWNET): {e} (needs root)"))?;
    let st = std::process::Command::new("ip")
        .args(["link", "set", "lo", "up"])
        .status()
        .map_err(|e| format!("running ip: {e}"))?;
    if !st.success() {
        return Err("ip link set lo up failed".into());
    }
    Ok(())
}

/// Skip (printing why) outside CI, fail in CI.
pub fn require(r: Result<(), String>) -> bool {
    match r {
        Ok(()) => true,
        Err(why) if std::env::var("BATON_CI").as_deref() == Ok("1") => {
            panic!("required resource missing in CI: {why}")
        }
        Err(why) => {
            eprintln!("SKIPPED: {why}");
            false
        }
    }
}

pub enum Via {
    Unix,
    Tcp,
}

/// A listener and the target the source connects to.
pub fn listen(via: &Via, dir: &TempDir) -> (Incoming, Target) {
    match via {
        Via::Unix => {
            let p = dir.0.join("mig.sock");
            let l = UnixListener::bind(&p).unwrap();
            (Incoming::Unix(l), Target::Unix(p))
        }
        Via::Tcp => {
            let l = TcpListener::bind("127.0.0.1:0").unwrap();
            let a = l.local_addr().unwrap();
            (Incoming::Tcp(l), Target::Tcp(a.to_string()))
        }
    }
}

pub fn settings(mode: MigrationMode, caps: Capabilities) -> MigrationSettings {
    MigrationSettings {
        mode,
        machine_type: "microvm-1.1".into(),
        capabilities: caps,
        parameters: Parameters {
            downtime_limit: 50,
            ..Parameters::default()
        },
    }
}

/// `n` counter devices: a running source, or a destination that either waits for its
/// backend (`adopt`) or opens its own.
pub fn counters(n: usize, side: Side) -> Vec<Box<dyn Migratable>> {
    counter_devices(n, side)
        .into_iter()
        .map(|d| Box::new(d) as Box<dyn Migratable>)
        .collect()
}

/// The devices of [`counters`], unboxed.
pub fn counter_devices(n: usize, side: Side) -> Vec<CounterDevice> {
    (0..n)
        .map(|i| {
            let id = format!("ctr{i}");
            match side {
                Side::Source => {
                    let mut d = CounterDevice::new_source(&id, 64 << i);
                    for _ in 0..(10 + i) {
                        d.tick().unwrap();
                    }
                    d
                }
                Side::Destination { adopt: true } => CounterDevice::new_incoming(&id),
                Side::Destination { adopt: false } => {
                    let mut d = CounterDevice::new_source(&id, 1);
                    d.backend_transfer = false;
                    d
                }
            }
        })
        .collect()
}

#[derive(Clone, Copy)]
pub enum Side {
    Source,
    Destination { adopt: bool },
}

/// Downcast helper: the engine holds `dyn Migratable`; tests look inside.
pub fn counter(d: &mut Box<dyn Migratable>) -> &mut CounterDevice {
    let p: *mut dyn Migratable = &mut **d;
    // SAFETY: every device these tests build is a CounterDevice.
    unsafe { &mut *(p as *mut CounterDevice) }
}
