//! The guest's command line: its own `baton.*` options and the
//! `virtio_mmio.device=SIZE@ADDR:IRQ[:ID]` entries a VMM (baton-vmm, or QEMU's
//! `microvm` machine) writes for each virtio-mmio transport. Anything else is ignored,
//! so the same image boots with whatever else a VMM appends.
//!
//! Options (numbers are decimal or 0x-hex, sizes take a K/M/G suffix like Linux's
//! memparse):
//! * `baton.console=mmio:ADDR` — the baton status device at ADDR (baton-vmm adds this).
//! * `baton.console=pio:PORT` — bytes to an I/O port via the CPL0 service (default
//!   `pio:0x3f8`, COM1's THR, which QEMU's microvm has).
//! * `baton.exit=pio:PORT` — on finish, write the exit code to PORT (QEMU's
//!   isa-debug-exit). With an MMIO console, the device's EXIT register is used instead.
//! * `baton.region=SIZE` — bytes of RAM each vCPU dirties (default 16M).
//! * `baton.report_ms=N` — status line period in ms (default 100, rounded to 10 ms ticks).
//! * `baton.passes=N` — stop after N passes (default 0: run until the host stops us).
//! * `baton.net=off|echo|seq` — vCPU 0 drives the first virtio-net device instead of
//!   the memory workload (see `virtio_net`); `baton.net_rate=N` frames per 10 ms tick
//!   (default 10), `baton.net_count=N` frames then exit (default 0: forever).

/// Where status lines go.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Console {
    Mmio(u64),
    Pio(u16),
}

/// One `virtio_mmio.device=` entry.
#[derive(Clone, Copy, Default)]
pub struct VirtioMmio {
    pub size: u64,
    pub addr: u64,
    pub irq: u32,
}

/// What vCPU 0 does with a virtio-net device.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum NetMode {
    Off,
    Echo,
    Seq,
}

/// Highest number of virtio-mmio entries remembered.
pub const MAX_VIRTIO: usize = 32;

/// The parsed command line.
#[derive(Clone, Copy)]
pub struct Config {
    pub console: Console,
    pub exit_port: Option<u16>,
    pub region_size: u64,
    pub report_ms: u64,
    pub passes: u64,
    pub net: NetMode,
    pub net_rate: u64,
    pub net_count: u64,
    pub virtio: [VirtioMmio; MAX_VIRTIO],
    pub n_virtio: usize,
    /// Entries beyond MAX_VIRTIO that were dropped.
    pub virtio_dropped: usize,
    /// The first option that did not parse (reported by the guest, which then stops).
    pub bad_option: Option<&'static [u8]>,
}

impl Config {
    pub const fn new() -> Self {
        Config {
            console: Console::Pio(0x3f8),
            exit_port: None,
            region_size: 16 << 20,
            report_ms: 100,
            passes: 0,
            net: NetMode::Off,
            net_rate: 10,
            net_count: 0,
            virtio: [VirtioMmio {
                size: 0,
                addr: 0,
                irq: 0,
            }; MAX_VIRTIO],
            n_virtio: 0,
            virtio_dropped: 0,
            bad_option: None,
        }
    }

    pub fn virtio(&self) -> &[VirtioMmio] {
        &self.virtio[..self.n_virtio]
    }
}

/// Parses a command line. Never fails: the first bad `baton.*` or `virtio_mmio.device`
/// option is kept in `bad_option`.
pub fn parse(line: &'static [u8]) -> Config {
    let mut cfg = Config::new();
    for word in line.split(|&b| b == b' ' || b == b'\t' || b == b'\n') {
        if word.is_empty() {
            continue;
        }
        let (key, val) = match word.iter().position(|&b| b == b'=') {
            Some(i) => (&word[..i], &word[i + 1..]),
            None => (word, &word[word.len()..]),
        };
        let ok = match key {
            b"baton.console" => parse_console(val).map(|c| cfg.console = c),
            b"baton.exit" => match parse_console(val) {
                Some(Console::Pio(p)) => {
                    cfg.exit_port = Some(p);
                    Some(())
                }
                _ => None,
            },
            b"baton.region" => memparse(val)
                .filter(|&s| s >= 4096)
                .map(|s| cfg.region_size = s),
            b"baton.report_ms" => number(val).filter(|&n| n > 0).map(|n| cfg.report_ms = n),
            b"baton.passes" => number(val).map(|n| cfg.passes = n),
            b"baton.net" => match val {
                b"off" => Some(NetMode::Off),
                b"echo" => Some(NetMode::Echo),
                b"seq" => Some(NetMode::Seq),
                _ => None,
            }
            .map(|m| cfg.net = m),
            b"baton.net_rate" => number(val)
                .filter(|&n| (1..=1000).contains(&n))
                .map(|n| cfg.net_rate = n),
            b"baton.net_count" => number(val).map(|n| cfg.net_count = n),
            b"virtio_mmio.device" => parse_virtio(val).map(|v| {
                if cfg.n_virtio < MAX_VIRTIO {
                    cfg.virtio[cfg.n_virtio] = v;
                    cfg.n_virtio += 1;
                } else {
                    cfg.virtio_dropped += 1;
                }
            }),
            k if k.starts_with(b"baton.") => None,
            _ => Some(()),
        };
        if ok.is_none() && cfg.bad_option.is_none() {
            cfg.bad_option = Some(word);
        }
    }
    cfg
}

fn parse_console(val: &[u8]) -> Option<Console> {
    if let Some(addr) = val.strip_prefix(b"mmio:") {
        number(addr).map(Console::Mmio)
    } else if let Some(port) = val.strip_prefix(b"pio:") {
        number(port)
            .and_then(|p| u16::try_from(p).ok())
            .map(Console::Pio)
    } else {
        None
    }
}

/// `SIZE@ADDR:IRQ[:ID]` as Linux's virtio_mmio driver reads it.
fn parse_virtio(val: &[u8]) -> Option<VirtioMmio> {
    let at = val.iter().position(|&b| b == b'@')?;
    let size = memparse(&val[..at])?;
    let rest = &val[at + 1..];
    let colon = rest.iter().position(|&b| b == b':')?;
    let addr = memparse(&rest[..colon])?;
    let irq_part = &rest[colon + 1..];
    let irq_end = irq_part
        .iter()
        .position(|&b| b == b':')
        .unwrap_or(irq_part.len());
    let irq = u32::try_from(number(&irq_part[..irq_end])?).ok()?;
    if size == 0 {
        return None;
    }
    Some(VirtioMmio { size, addr, irq })
}

/// A decimal or 0x-hex number.
pub fn number(s: &[u8]) -> Option<u64> {
    let (digits, radix) = match s {
        [b'0', b'x' | b'X', rest @ ..] => (rest, 16),
        _ => (s, 10),
    };
    if digits.is_empty() {
        return None;
    }
    let mut v: u64 = 0;
    for &c in digits {
        let d = (c as char).to_digit(radix)? as u64;
        v = v.checked_mul(radix as u64)?.checked_add(d)?;
    }
    Some(v)
}

/// A number with an optional K/M/G suffix (binary multiples).
pub fn memparse(s: &[u8]) -> Option<u64> {
    let (num, shift) = match s.last()? {
        b'k' | b'K' => (&s[..s.len() - 1], 10),
        b'm' | b'M' => (&s[..s.len() - 1], 20),
        b'g' | b'G' => (&s[..s.len() - 1], 30),
        _ => (s, 0),
    };
    let v = number(num)?;
    v.checked_mul(1 << shift)
}
