//! Shared harness of the fuzz targets: a destination VM (memfd RAM, counter devices with
//! the qdev test backends, a gate that records resumes), ways to feed it bytes as its main
//! channel (a file, or a UNIX socket with a return path), and valid streams made by the
//! real source engine for the structure-aware target to mutate.
//!
//! The oracle besides "no panic, no hang": the destination resumes only when `incoming`
//! returns Ok, and never after an error.

use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixListener, UnixStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use baton_migration::{
    incoming, migrate, Capabilities, DestinationVm, GuestRam, Incoming, IncomingSettings,
    MemfdRam, MigrationMode, MigrationMonitor, MigrationSettings, Parameters, RamLayout,
    RamRegion, SourceVm, Target, VmControl,
};
use baton_qdev::{
    BackendTransfer, DeviceMigrationError, EarlyOutcome, EarlySetup, Hook, Migratable,
};
use baton_vmstate::{VmState, VmStateDescription};

#[path = "../../../qdev/tests/common/mod.rs"]
#[allow(dead_code)]
pub mod testdev;

pub const MACHINE: &str = "microvm-1.1";

pub fn layout() -> RamLayout {
    RamLayout {
        regions: vec![
            RamRegion {
                gpa: 0,
                size: 64 << 10,
            },
            RamRegion {
                gpa: 1 << 32,
                size: 32 << 10,
            },
        ],
    }
}

pub fn caps() -> Capabilities {
    Capabilities {
        early_setup: true,
        ..Default::default()
    }
}

/// vCPU control that only counts.
#[derive(Clone, Default)]
pub struct Gate {
    pub resumed: Arc<AtomicBool>,
}

impl VmControl for Gate {
    fn pause(&mut self) -> Result<(), String> {
        Ok(())
    }
    fn resume(&mut self) -> Result<(), String> {
        self.resumed.store(true, Ordering::SeqCst);
        Ok(())
    }
}

/// The qdev test counter with its early state checked before use.
///
/// The first fuzz runs found that `CounterDevice::prepare` allocates a ring of whatever
/// size the stream says (6 GiB: out of memory). The engine hands early state to the
/// device as untrusted bytes, as documented; checking them is the device's job, so the
/// harness checks what the test device does not, the way a real device must.
pub struct CheckedCounter(pub testdev::CounterDevice);

fn check_early(id: &str, version_id: u32, state: &[u8]) -> Result<(), DeviceMigrationError> {
    let e = testdev::CounterEarly::load(state, version_id)
        .map_err(|e| DeviceMigrationError::state(id, Hook::EarlyPrepare, e))?;
    if !e.ring_size.is_power_of_two() || e.ring_size > 4096 {
        return Err(DeviceMigrationError::refused(
            id,
            Hook::EarlyPrepare,
            format!("ring_size {} is not a power of two up to 4096", e.ring_size),
        ));
    }
    Ok(())
}

impl Migratable for CheckedCounter {
    fn id(&self) -> &str {
        self.0.id()
    }
    fn vmsd(&self) -> &'static VmStateDescription {
        self.0.vmsd()
    }
    fn save(&mut self) -> Result<Vec<u8>, DeviceMigrationError> {
        self.0.save()
    }
    fn load(&mut self, version_id: u32, state: &[u8]) -> Result<(), DeviceMigrationError> {
        self.0.load(version_id, state)
    }
    fn early_setup(&mut self) -> Option<&mut dyn EarlySetup> {
        Some(self)
    }
    fn backend_transfer(&mut self) -> Option<&mut dyn BackendTransfer> {
        Some(&mut self.0)
    }
}

impl EarlySetup for CheckedCounter {
    fn early_vmsd(&self) -> &'static VmStateDescription {
        self.0.early_vmsd()
    }
    fn save_early(&mut self) -> Result<Vec<u8>, DeviceMigrationError> {
        self.0.save_early()
    }
    fn prepare(&mut self, version_id: u32, state: &[u8]) -> Result<(), DeviceMigrationError> {
        check_early(&self.0.id, version_id, state)?;
        self.0.prepare(version_id, state)
    }
    fn finish(&mut self, outcome: EarlyOutcome<'_>) -> Result<(), DeviceMigrationError> {
        if let EarlyOutcome::Changed { version_id, state } = outcome {
            check_early(&self.0.id, version_id, state)?;
        }
        self.0.finish(outcome)
    }
    fn discard(&mut self) {
        self.0.discard()
    }
}

fn dest_devices() -> Vec<Box<dyn Migratable>> {
    (0..2)
        .map(|i| {
            let mut d = testdev::CounterDevice::new_source(&format!("ctr{i}"), 1);
            d.backend_transfer = false;
            Box::new(CheckedCounter(d)) as Box<dyn Migratable>
        })
        .collect()
}

fn src_devices() -> Vec<Box<dyn Migratable>> {
    (0..2)
        .map(|i| {
            let mut d = testdev::CounterDevice::new_source(&format!("ctr{i}"), 64 << i);
            d.backend_transfer = false;
            for _ in 0..(3 + i) {
                let _ = d.tick();
            }
            Box::new(d) as Box<dyn Migratable>
        })
        .collect()
}

/// Run a destination on `source`; panics if it resumed yet failed, or failed yet resumed.
pub fn run_destination(source: Incoming, monitor: &MigrationMonitor) {
    let mut ram = MemfdRam::new(&layout()).expect("RAM");
    let mut devices = dest_devices();
    let mut gate = Gate::default();
    let r = incoming(
        source,
        &IncomingSettings {
            machine_type: MACHINE.into(),
            capabilities: caps(),
        },
        DestinationVm {
            devices: &mut devices,
            ram: &mut ram,
            control: &mut gate,
        },
        monitor,
    );
    let resumed = gate.resumed.load(Ordering::SeqCst);
    match r {
        Ok(_) => assert!(resumed, "incoming returned Ok without resuming"),
        Err(e) => {
            assert!(!resumed, "resumed although incoming failed: {e}");
            // Every error renders, and says something.
            assert!(!e.to_string().is_empty());
        }
    }
}

/// Feed `data` as a snapshot file (a memfd, reopened through /proc).
pub fn run_file(data: &[u8]) {
    let fd = testdev::memfd("fuzz-stream");
    let mut f = std::fs::File::from(fd);
    f.write_all(data).expect("memfd write");
    let path = format!("/proc/self/fd/{}", f.as_raw_fd());
    run_destination(Incoming::File(path.into()), &MigrationMonitor::new());
}

static NEXT: AtomicU64 = AtomicU64::new(0);

fn abstract_listener() -> (UnixListener, SocketAddr) {
    let name = format!(
        "baton-fuzz-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    );
    let addr = SocketAddr::from_abstract_name(name.as_bytes()).expect("abstract name");
    let l = UnixListener::bind_addr(&addr).expect("bind");
    (l, addr)
}

/// Feed `data` as the main channel of a UNIX-socket migration, draining the return path.
/// A destination still waiting (for a RAM channel that never comes) is cancelled.
pub fn run_unix(data: &[u8]) {
    let (l, addr) = abstract_listener();
    let monitor = MigrationMonitor::new();
    let done = Arc::new(AtomicBool::new(false));
    let data = data.to_vec();
    let (m2, d2) = (monitor.clone(), done.clone());
    let writer = std::thread::spawn(move || {
        // Write, then drain the return path; a destination that still holds the socket
        // 200 ms after the last byte waits for something that will never come (a RAM
        // channel): cancel it.
        let mut s = UnixStream::connect_addr(&addr).ok();
        if let Some(s) = &mut s {
            let _ = s.set_read_timeout(Some(Duration::from_millis(20)));
            let _ = s.write_all(&data);
            let _ = s.shutdown(std::net::Shutdown::Write);
        }
        let mut sink = [0u8; 4096];
        for _ in 0..10 {
            if d2.load(Ordering::SeqCst) {
                return;
            }
            match s.as_mut().map(|s| s.read(&mut sink)) {
                Some(Ok(n)) if n > 0 => continue,
                Some(Err(_)) => {}
                _ => std::thread::sleep(Duration::from_millis(20)),
            }
        }
        m2.cancel();
    });
    run_destination(Incoming::Unix(l), &monitor);
    done.store(true, Ordering::SeqCst);
    let _ = writer.join();
}

/// A source VM with some RAM content.
fn source_ram() -> MemfdRam {
    let ram = MemfdRam::new(&layout()).expect("RAM");
    for p in (0..16u64).step_by(3) {
        let _ = ram.write(0, p * 4096 + 8, &p.to_le_bytes());
    }
    let _ = ram.write(1, 4096, b"region one");
    ram
}

fn settings(mode: MigrationMode) -> MigrationSettings {
    MigrationSettings {
        mode,
        machine_type: MACHINE.into(),
        capabilities: caps(),
        parameters: Parameters::default(),
    }
}

/// A snapshot stream written by the real source engine.
pub fn snapshot_stream() -> Vec<u8> {
    let fd = testdev::memfd("fuzz-snap");
    let f = std::fs::File::from(fd);
    let path = std::path::PathBuf::from(format!("/proc/self/fd/{}", f.as_raw_fd()));
    let ram = source_ram();
    let mut devices = src_devices();
    let mut log = ram.write_log();
    migrate(
        &Target::File(path.clone()),
        &settings(MigrationMode::Snapshot),
        SourceVm {
            devices: &mut devices,
            ram: &ram,
            dirty_log: &mut log,
            control: &mut Gate::default(),
        },
        &MigrationMonitor::new(),
    )
    .expect("snapshot");
    std::fs::read(&path).expect("reading the snapshot back")
}

/// The source→destination bytes of a real remote migration over a UNIX socket, recorded
/// by a relay between the source and a destination.
pub fn remote_stream() -> Vec<u8> {
    let (dst_l, dst_addr) = abstract_listener();
    let path = std::env::temp_dir().join(format!(
        "baton-fuzz-seed-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_file(&path);
    let relay_l = UnixListener::bind(&path).expect("bind the relay");
    let recorder = std::thread::spawn(move || {
        let (mut from_src, _) = relay_l.accept().expect("accept");
        let mut to_dst = UnixStream::connect_addr(&dst_addr).expect("connect");
        let (mut back_from, mut back_to) = (
            to_dst.try_clone().expect("clone"),
            from_src.try_clone().expect("clone"),
        );
        let back = std::thread::spawn(move || {
            let _ = std::io::copy(&mut back_from, &mut back_to);
            let _ = back_to.shutdown(std::net::Shutdown::Both);
        });
        let mut rec = Vec::new();
        let mut buf = [0u8; 65536];
        loop {
            match from_src.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    rec.extend_from_slice(&buf[..n]);
                    if to_dst.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            }
        }
        let _ = to_dst.shutdown(std::net::Shutdown::Write);
        let _ = back.join();
        rec
    });
    let dst = std::thread::spawn(move || {
        run_destination(Incoming::Unix(dst_l), &MigrationMonitor::new());
    });
    let ram = source_ram();
    let mut devices = src_devices();
    let mut log = ram.write_log();
    migrate(
        &Target::Unix(path.clone()),
        &settings(MigrationMode::Remote),
        SourceVm {
            devices: &mut devices,
            ram: &ram,
            dirty_log: &mut log,
            control: &mut Gate::default(),
        },
        &MigrationMonitor::new(),
    )
    .expect("remote migration for the seed");
    drop(devices);
    let _ = dst.join();
    let _ = std::fs::remove_file(&path);
    recorder.join().expect("recorder")
}

/// Both valid streams, made once per process.
pub fn valid_streams() -> &'static (Vec<u8>, Vec<u8>) {
    static S: OnceLock<(Vec<u8>, Vec<u8>)> = OnceLock::new();
    S.get_or_init(|| (snapshot_stream(), remote_stream()))
}

/// A stream cut into its channel header and framed sections `(type, payload)`.
pub fn split_sections(stream: &[u8]) -> Option<(Vec<u8>, Vec<(u8, Vec<u8>)>)> {
    const HDR: usize = 31;
    let header = stream.get(..HDR)?.to_vec();
    let mut at = HDR;
    let mut out = Vec::new();
    while at < stream.len() {
        let h = stream.get(at..at + 9)?;
        let len = u32::from_le_bytes([h[5], h[6], h[7], h[8]]) as usize;
        let payload = stream.get(at + 9..at + 9 + len)?.to_vec();
        out.push((h[0], payload));
        at += 9 + len + 4;
    }
    Some((header, out))
}

/// Frame `sections` again with correct sequence numbers, lengths and footers.
pub fn join_sections(header: &[u8], sections: &[(u8, Vec<u8>)]) -> Vec<u8> {
    let mut out = header.to_vec();
    for (seq, (ty, p)) in sections.iter().enumerate() {
        let seq = seq as u32;
        out.push(*ty);
        out.extend_from_slice(&seq.to_le_bytes());
        out.extend_from_slice(&(p.len() as u32).to_le_bytes());
        out.extend_from_slice(p);
        out.extend_from_slice(&(baton_migration::protocol::FOOTER_MAGIC ^ seq).to_le_bytes());
    }
    out
}
