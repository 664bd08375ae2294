//! The harness status device, and what the host learns from the guest's status lines.
//!
//! The guest (tests/guest) reports through one 4 KiB MMIO page at [`STATUS_BASE`]:
//!
//! | offset | access | meaning |
//! |--------|--------|---------|
//! | 0x00 | r u32 | MAGIC `0xba70_57a7` |
//! | 0x04 | r u32 | VERSION 1 |
//! | 0x08 | w u8  | one byte of a line, `\n` ends it |
//! | 0x10 | w u64 | a whole line: bits 0..48 guest-physical address, bits 48..64 length |
//! | 0x18 | w u32 | EXIT: the guest is finished, 0 = success |
//!
//! A line costs the guest one MMIO exit, which matters on `kvm_pvm` (~30 µs each).
//! The same sink also takes bytes written to I/O port 0x3f8 and an exit code written
//! to port 0xf4, so a guest configured for QEMU (COM1 + isa-debug-exit) still reports.
//!
//! Lines are `baton-guest: KIND key=value ...` (see tests/guest/README.md).
//! [`GuestStatus`] keeps the recent lines, the latest pass counter per vCPU, each
//! vCPU's region, and the exit, and lets callers wait for a condition on them.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::mmio::MmioDevice;

/// Guest-physical base of the status device (in the MMIO hole, clear of QEMU
/// microvm's virtio-mmio window at 0xfeb00000 and of the IOAPIC/LAPIC).
pub const STATUS_BASE: u64 = 0xfe00_0000;
pub const STATUS_SIZE: u64 = 0x1000;
pub const STATUS_MAGIC: u32 = 0xba70_57a7;
pub const STATUS_VERSION: u32 = 1;
pub const REG_MAGIC: u64 = 0x00;
pub const REG_VERSION: u64 = 0x04;
pub const REG_CHAR: u64 = 0x08;
pub const REG_LINE: u64 = 0x10;
pub const REG_EXIT: u64 = 0x18;
/// The legacy sinks: COM1's data port and QEMU's isa-debug-exit port.
pub const COM1_PORT: u16 = 0x3f8;
pub const DEBUG_EXIT_PORT: u16 = 0xf4;
/// Every status line starts with this.
pub const LINE_PREFIX: &str = "baton-guest: ";
const MAX_LINE: usize = 4096;
const KEEP_LINES: usize = 1024;

/// How the guest ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GuestExit {
    /// The guest wrote EXIT (0 = success).
    Code(u32),
    /// KVM reported a shutdown (triple fault) on a vCPU.
    Shutdown { vcpu: usize },
    /// A vCPU stopped on an error (failed entry, internal error, ioctl failure).
    Error { vcpu: usize, reason: String },
}

/// One parsed status line: `KIND key=value key="quoted value" ...`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StatusLine {
    pub kind: String,
    pub fields: BTreeMap<String, String>,
}

impl StatusLine {
    /// Parses a line with or without the `baton-guest: ` prefix.
    pub fn parse(line: &str) -> Option<StatusLine> {
        let body = line.strip_prefix(LINE_PREFIX).unwrap_or(line).trim();
        let (kind, mut rest) = body.split_once(' ').unwrap_or((body, ""));
        if kind.is_empty() {
            return None;
        }
        let mut fields = BTreeMap::new();
        loop {
            rest = rest.trim_start();
            let Some((key, after)) = rest.split_once('=') else {
                break;
            };
            let (value, next) = match after.strip_prefix('"') {
                Some(q) => q.split_once('"').unwrap_or((q, "")),
                None => after.split_once(' ').unwrap_or((after, "")),
            };
            fields.insert(key.to_string(), value.to_string());
            rest = next;
        }
        Some(StatusLine {
            kind: kind.to_string(),
            fields,
        })
    }

    /// A numeric field (decimal or 0x-hex).
    pub fn u64(&self, key: &str) -> Option<u64> {
        let v = self.fields.get(key)?;
        match v.strip_prefix("0x") {
            Some(hex) => u64::from_str_radix(hex, 16).ok(),
            None => v.parse().ok(),
        }
    }
}

/// What the host knows about the guest.
#[derive(Clone, Debug, Default)]
pub struct StatusState {
    /// The most recent lines (prefix removed), oldest first.
    pub lines: VecDeque<String>,
    /// Lines received in total.
    pub line_count: u64,
    pub hello: Option<StatusLine>,
    /// vCPU index → (region guest address, size) from `start` lines.
    pub regions: BTreeMap<u64, (u64, u64)>,
    /// vCPU index → last `status`/`done` line.
    pub last: BTreeMap<u64, StatusLine>,
    /// The first `fault`, `error` or `panic` line.
    pub failure: Option<String>,
    pub exit: Option<GuestExit>,
}

impl StatusState {
    /// The latest pass counter reported by vCPU `cpu`.
    pub fn passes(&self, cpu: u64) -> u64 {
        self.last.get(&cpu).and_then(|l| l.u64("pass")).unwrap_or(0)
    }
}

/// Shared, waitable view of the guest's status.
#[derive(Default)]
pub struct GuestStatus {
    state: Mutex<StatusState>,
    cv: Condvar,
    echo: bool,
}

impl GuestStatus {
    /// `echo` prints every guest line on stdout as it arrives.
    pub fn new(echo: bool) -> Self {
        GuestStatus {
            echo,
            ..Default::default()
        }
    }

    fn lock(&self) -> MutexGuard<'_, StatusState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A copy of the current state.
    pub fn snapshot(&self) -> StatusState {
        self.lock().clone()
    }

    /// Waits until `pred` holds or the guest exits or `timeout` passes; returns the state
    /// at that moment and whether `pred` held.
    pub fn wait_until(
        &self,
        timeout: Duration,
        mut pred: impl FnMut(&StatusState) -> bool,
    ) -> (StatusState, bool) {
        let deadline = Instant::now() + timeout;
        let mut st = self.lock();
        loop {
            if pred(&st) {
                return (st.clone(), true);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if st.exit.is_some() || left.is_zero() {
                return (st.clone(), false);
            }
            st = self
                .cv
                .wait_timeout(st, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// Records a complete line from the guest.
    pub fn push_line(&self, raw: &str) {
        let text = raw.trim_end_matches(['\n', '\r']);
        let Some(body) = text.strip_prefix(LINE_PREFIX) else {
            tracing::info!(target: "guest", "{text}");
            return;
        };
        if self.echo {
            println!("{text}");
        }
        let mut st = self.lock();
        st.line_count += 1;
        if st.lines.len() == KEEP_LINES {
            st.lines.pop_front();
        }
        st.lines.push_back(body.to_string());
        if let Some(line) = StatusLine::parse(body) {
            tracing::debug!(target: "guest", kind = %line.kind, "{body}");
            let cpu = line.u64("cpu");
            match (line.kind.as_str(), cpu) {
                ("hello", _) => st.hello = Some(line),
                ("start", Some(cpu)) => {
                    if let (Some(a), Some(s)) = (line.u64("region"), line.u64("size")) {
                        st.regions.insert(cpu, (a, s));
                    }
                }
                ("status" | "done", Some(cpu)) => {
                    st.last.insert(cpu, line);
                }
                ("fault" | "error" | "panic", _) => {
                    tracing::error!(target: "guest", "{body}");
                    st.failure.get_or_insert_with(|| body.to_string());
                }
                _ => {}
            }
        }
        drop(st);
        self.cv.notify_all();
    }

    /// Records how the guest ended (the first report wins).
    pub fn set_exit(&self, exit: GuestExit) {
        let mut st = self.lock();
        if st.exit.is_none() {
            tracing::info!(?exit, "guest exit");
            st.exit = Some(exit);
        }
        drop(st);
        self.cv.notify_all();
    }

    /// The exit, if any.
    pub fn exit(&self) -> Option<GuestExit> {
        self.lock().exit.clone()
    }
}

/// The MMIO status device; also the sink for COM1 bytes and isa-debug-exit codes.
pub struct StatusDevice {
    memory: GuestMemoryMmap,
    status: std::sync::Arc<GuestStatus>,
    partial: Mutex<Vec<u8>>,
}

impl StatusDevice {
    pub fn new(memory: GuestMemoryMmap, status: std::sync::Arc<GuestStatus>) -> Self {
        StatusDevice {
            memory,
            status,
            partial: Mutex::new(Vec::new()),
        }
    }

    /// One byte of a line (CHAR register or COM1).
    pub fn put_byte(&self, b: u8) {
        let mut p = self.partial.lock().unwrap_or_else(|e| e.into_inner());
        if b == b'\n' {
            let line = String::from_utf8_lossy(&p).into_owned();
            p.clear();
            drop(p);
            self.status.push_line(&line);
        } else if p.len() < MAX_LINE {
            p.push(b);
        }
    }

    /// An exit code (EXIT register or isa-debug-exit).
    pub fn exit(&self, code: u32) {
        self.status.set_exit(GuestExit::Code(code));
    }

    fn line_at(&self, word: u64) {
        let addr = word & ((1 << 48) - 1);
        let len = ((word >> 48) as usize).min(MAX_LINE);
        let mut buf = vec![0u8; len];
        match self.memory.read_slice(&mut buf, GuestAddress(addr)) {
            Ok(()) => self.status.push_line(&String::from_utf8_lossy(&buf)),
            Err(e) => tracing::warn!("status LINE at {addr:#x}+{len}: {e}"),
        }
    }
}

fn le_u64(data: &[u8]) -> u64 {
    let mut b = [0u8; 8];
    let n = data.len().min(8);
    b[..n].copy_from_slice(&data[..n]);
    u64::from_le_bytes(b)
}

impl MmioDevice for StatusDevice {
    fn read(&self, offset: u64, data: &mut [u8]) {
        let v: u64 = match offset {
            REG_MAGIC => STATUS_MAGIC.into(),
            REG_VERSION => STATUS_VERSION.into(),
            _ => 0,
        };
        let bytes = v.to_le_bytes();
        let n = data.len().min(8);
        data[..n].copy_from_slice(&bytes[..n]);
    }

    fn write(&self, offset: u64, data: &[u8]) {
        let v = le_u64(data);
        match offset {
            REG_CHAR => self.put_byte(v as u8),
            REG_LINE if data.len() == 8 => self.line_at(v),
            REG_EXIT => self.exit(v as u32),
            _ => tracing::warn!(
                "status device: write of {} bytes at unknown offset {offset:#x}",
                data.len()
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_status_lines() {
        let l = StatusLine::parse("baton-guest: status cpu=1 pass=42 ticks=0x10 tsc=7").unwrap();
        assert_eq!(l.kind, "status");
        assert_eq!(l.u64("cpu"), Some(1));
        assert_eq!(l.u64("pass"), Some(42));
        assert_eq!(l.u64("ticks"), Some(16));
        assert_eq!(l.u64("missing"), None);
        let e =
            StatusLine::parse("error reason=\"bad option\" option=\"baton.x=1 y\" code=2").unwrap();
        assert_eq!(e.fields["option"], "baton.x=1 y");
        assert_eq!(e.fields["reason"], "bad option");
        assert_eq!(e.u64("code"), Some(2));
        assert_eq!(StatusLine::parse("   "), None);
    }

    #[test]
    fn tracks_regions_passes_failures_and_first_exit() {
        let st = GuestStatus::new(false);
        st.push_line("baton-guest: start cpu=0 region=0x200000 size=0x1000000 pages=4096");
        st.push_line("baton-guest: status cpu=0 pass=5 ticks=1 tsc=1");
        st.push_line("not a status line");
        st.push_line("baton-guest: fault cpu=0 vector=13 error=0x0 rip=0x1 cr2=0x0 cpl=3");
        st.set_exit(GuestExit::Code(0x10d));
        st.set_exit(GuestExit::Code(0));
        let s = st.snapshot();
        assert_eq!(s.regions[&0], (0x20_0000, 0x100_0000));
        assert_eq!(s.passes(0), 5);
        assert_eq!(s.line_count, 3);
        assert!(s.failure.unwrap().starts_with("fault"));
        assert_eq!(s.exit, Some(GuestExit::Code(0x10d)));
    }
}
