//! A polling virtio-net driver over virtio-mmio version 2, for traffic tests.
//!
//! Why polling and one queue pair: the guest runs at CPL3 with interrupts reserved for
//! the LAPIC timer, and a test needs counted, reproducible traffic rather than speed.
//! It follows the virtio 1.2 initialisation sequence (§3.1.1) so that it works against
//! baton's `virtio-net-tap` and QEMU's `virtio-net-device` alike: reset, ACKNOWLEDGE,
//! DRIVER, features (VERSION_1 required; MAC, STATUS and MRG_RXBUF taken when offered,
//! MQ and the rest declined), FEATURES_OK checked, queues 0 (rx) and 1 (tx) set up,
//! DRIVER_OK.
//!
//! Modes (`baton.net=`):
//! * `echo`: every received test frame (ethertype 0x88b5) is sent back with ethertype
//!   0x88b6 and the MAC addresses swapped;
//! * `seq`: the same, plus the guest's own frames (ethertype 0x88b5, broadcast, a
//!   little-endian u32 sequence number then bytes `seq + i`, 60 bytes) at
//!   `baton.net_rate` frames per 10 ms tick; with `baton.net_count=N` it stops after N,
//!   waits 20 ticks for stragglers, prints `net done ...` and exits with code 0.
//!
//! Received test frames carry the host's sequence numbers: a jump forward counts
//! `lost`, a step back `dup`. Every `baton.report_ms` it prints
//! `net tx=N rx=M echoed=E lost=K dup=D` (tx counts every frame sent, rx every frame
//! received).

use core::ptr::{addr_of, addr_of_mut};
use core::sync::atomic::{fence, Ordering};

use crate::boot;
use crate::cmdline::{Config, NetMode};
use crate::console;
use crate::say;
use crate::virtio_mmio::{self as mmio, Transport};

/// Exit code when no usable virtio-net device is found or it refuses us.
pub const EXIT_NET: u32 = 5;

const QSIZE: u16 = 32;
const BUF: usize = 2048;
const HDR: usize = 12;
const ETH_SEQ: u16 = 0x88b5;
const ETH_ECHO: u16 = 0x88b6;
const FRAME_LEN: usize = 60;
const DEFAULT_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0xba, 0x70, 0x01];

const F_MAC: u64 = 1 << 5;
const F_MRG_RXBUF: u64 = 1 << 15;
const F_STATUS: u64 = 1 << 16;
const F_VERSION_1: u64 = 1 << 32;

const DESC_F_WRITE: u16 = 2;

#[repr(C)]
#[derive(Clone, Copy)]
struct Desc {
    addr: u64,
    len: u32,
    flags: u16,
    next: u16,
}

/// One split virtqueue's rings, page aligned (descriptor table, then driver area at
/// +0x400, device area at +0x800).
#[repr(C, align(4096))]
struct Rings {
    desc: [Desc; QSIZE as usize],
    _pad0: [u8; 0x400 - 16 * QSIZE as usize],
    avail_flags: u16,
    avail_idx: u16,
    avail_ring: [u16; QSIZE as usize],
    used_event: u16,
    _pad1: [u8; 0x400 - 6 - 2 * QSIZE as usize],
    used_flags: u16,
    used_idx: u16,
    used_ring: [(u32, u32); QSIZE as usize],
    avail_event: u16,
}

#[repr(C, align(4096))]
struct Buffers([[u8; BUF]; QSIZE as usize]);

const EMPTY_RINGS: Rings = Rings {
    desc: [Desc {
        addr: 0,
        len: 0,
        flags: 0,
        next: 0,
    }; QSIZE as usize],
    _pad0: [0; 0x400 - 16 * QSIZE as usize],
    avail_flags: 0,
    avail_idx: 0,
    avail_ring: [0; QSIZE as usize],
    used_event: 0,
    _pad1: [0; 0x400 - 6 - 2 * QSIZE as usize],
    used_flags: 0,
    used_idx: 0,
    used_ring: [(0, 0); QSIZE as usize],
    avail_event: 0,
};

// Only vCPU 0 runs the driver; the rings are shared with the device (guest-physical =
// virtual: the guest is identity mapped).
static mut RX: Rings = EMPTY_RINGS;
static mut TX: Rings = EMPTY_RINGS;
static mut RX_BUF: Buffers = Buffers([[0; BUF]; QSIZE as usize]);
static mut TX_BUF: Buffers = Buffers([[0; BUF]; QSIZE as usize]);

/// The driver's side of one queue.
struct Queue {
    rings: *mut Rings,
    bufs: *mut Buffers,
    size: u16,
    last_used: u16,
    avail: u16,
    free: [u16; QSIZE as usize],
    nfree: usize,
}

impl Queue {
    fn new(rings: *mut Rings, bufs: *mut Buffers, size: u16) -> Self {
        let mut free = [0u16; QSIZE as usize];
        for (i, f) in free.iter_mut().enumerate() {
            *f = i as u16;
        }
        Queue {
            rings,
            bufs,
            size,
            last_used: 0,
            avail: 0,
            free,
            nfree: size as usize,
        }
    }

    fn buf(&self, i: u16) -> *mut u8 {
        // SAFETY: `i < size <= QSIZE`; the buffers are static.
        unsafe { addr_of_mut!((*self.bufs).0[i as usize]).cast() }
    }

    /// Makes descriptor `i` (`len` bytes of its buffer) available.
    fn publish(&mut self, i: u16, len: u32, flags: u16) {
        // SAFETY: the rings are static and only this vCPU writes the driver's fields.
        unsafe {
            let r = self.rings;
            addr_of_mut!((*r).desc[i as usize]).write_volatile(Desc {
                addr: self.buf(i) as u64,
                len,
                flags,
                next: 0,
            });
            addr_of_mut!((*r).avail_ring[(self.avail % self.size) as usize]).write_volatile(i);
            self.avail = self.avail.wrapping_add(1);
            fence(Ordering::SeqCst);
            addr_of_mut!((*r).avail_idx).write_volatile(self.avail);
            fence(Ordering::SeqCst);
        }
    }

    /// The next used entry (descriptor id, length), if any.
    fn pop_used(&mut self) -> Option<(u16, u32)> {
        // SAFETY: the device writes these; volatile reads of static memory.
        unsafe {
            let r = self.rings;
            let idx = addr_of!((*r).used_idx).read_volatile();
            if idx == self.last_used {
                return None;
            }
            fence(Ordering::SeqCst);
            let (id, len) =
                addr_of!((*r).used_ring[(self.last_used % self.size) as usize]).read_volatile();
            self.last_used = self.last_used.wrapping_add(1);
            if id >= u32::from(self.size) {
                return None;
            }
            Some((id as u16, len))
        }
    }
}

struct Net {
    t: Transport,
    rx: Queue,
    tx: Queue,
    mac: [u8; 6],
    tx_count: u64,
    rx_count: u64,
    echoed: u64,
    lost: u64,
    dup: u64,
    expect: Option<u32>,
}

fn fail(why: &str, addr: u64) -> ! {
    say!("error reason=\"net: {}\" addr=0x{:x}", why, addr);
    console::exit(EXIT_NET)
}

impl Net {
    fn init(t: Transport) -> Net {
        let (features, ok) = t.negotiate(F_VERSION_1, F_MAC | F_STATUS | F_MRG_RXBUF);
        if !ok {
            fail("FEATURES_OK refused", t.base);
        }
        // SAFETY: only vCPU 0 runs this, once; the statics are not used elsewhere.
        let (rx_r, tx_r, rx_b, tx_b) = unsafe {
            (
                addr_of_mut!(RX),
                addr_of_mut!(TX),
                addr_of_mut!(RX_BUF),
                addr_of_mut!(TX_BUF),
            )
        };
        let mut sizes = [0u16; 2];
        for (q, rings) in [(0u32, rx_r), (1, tx_r)] {
            let max = t.read(mmio::QUEUE_NUM_MAX);
            let _ = max;
            let size = t.setup_queue(q, QSIZE, rings as u64, 0x400, 0x800);
            if size == 0 {
                fail("queue unavailable", t.base);
            }
            sizes[q as usize] = size;
        }
        let mut mac = DEFAULT_MAC;
        if features & F_MAC != 0 {
            for (i, b) in mac.iter_mut().enumerate() {
                *b = t.config_u8(i as u64);
            }
        }
        t.driver_ok();
        let mut net = Net {
            rx: Queue::new(rx_r, rx_b, sizes[0]),
            tx: Queue::new(tx_r, tx_b, sizes[1]),
            t,
            mac,
            tx_count: 0,
            rx_count: 0,
            echoed: 0,
            lost: 0,
            dup: 0,
            expect: None,
        };
        for i in 0..net.rx.size {
            net.rx.publish(i, BUF as u32, DESC_F_WRITE);
        }
        net.rx.nfree = 0;
        net.t.notify(0);
        let m = net.mac;
        say!(
            "net up addr=0x{:x} features=0x{:x} queue_size={} mac={:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x} status=0x{:x}",
            net.t.base,
            features,
            net.rx.size,
            m[0],
            m[1],
            m[2],
            m[3],
            m[4],
            m[5],
            if features & F_STATUS != 0 { u32::from(net.t.config_u16(6)) } else { 1 }
        );
        net
    }

    fn reap_tx(&mut self) {
        while let Some((id, _)) = self.tx.pop_used() {
            if self.tx.nfree < self.tx.free.len() {
                self.tx.free[self.tx.nfree] = id;
                self.tx.nfree += 1;
            }
        }
    }

    /// Queues one frame (header added) and kicks; false when the ring is full.
    fn send(&mut self, frame: &[u8]) -> bool {
        self.reap_tx();
        if self.tx.nfree == 0 || frame.len() + HDR > BUF {
            return false;
        }
        self.tx.nfree -= 1;
        let i = self.tx.free[self.tx.nfree];
        let b = self.tx.buf(i);
        // SAFETY: the buffer is BUF bytes and not in the device's hands (it was free).
        unsafe {
            core::ptr::write_bytes(b, 0, HDR);
            core::ptr::copy_nonoverlapping(frame.as_ptr(), b.add(HDR), frame.len());
        }
        self.tx.publish(i, (HDR + frame.len()) as u32, 0);
        self.t.notify(1);
        self.tx_count += 1;
        true
    }

    fn seq_frame(&self, seq: u32, out: &mut [u8; FRAME_LEN]) {
        out[..6].copy_from_slice(&[0xff; 6]);
        out[6..12].copy_from_slice(&self.mac);
        out[12..14].copy_from_slice(&ETH_SEQ.to_be_bytes());
        out[14..18].copy_from_slice(&seq.to_le_bytes());
        for (i, b) in out[18..].iter_mut().enumerate() {
            *b = (seq as usize + i) as u8;
        }
    }

    /// Handles every received frame; returns how many.
    fn poll_rx(&mut self) -> usize {
        let mut n = 0;
        let mut frame = [0u8; BUF];
        while let Some((id, len)) = self.rx.pop_used() {
            n += 1;
            self.rx_count += 1;
            let len = (len as usize).min(BUF);
            if len >= HDR + 18 {
                let flen = len - HDR;
                // SAFETY: the device is done with this buffer (it is in the used ring).
                unsafe {
                    core::ptr::copy_nonoverlapping(
                        self.rx.buf(id).add(HDR),
                        frame.as_mut_ptr(),
                        flen,
                    )
                };
                self.on_frame(&mut frame[..flen]);
            }
            self.rx.publish(id, BUF as u32, DESC_F_WRITE);
        }
        if n > 0 {
            self.t.notify(0);
        }
        n
    }

    fn on_frame(&mut self, f: &mut [u8]) {
        if u16::from_be_bytes([f[12], f[13]]) != ETH_SEQ || f[6..12] == self.mac {
            return;
        }
        let seq = u32::from_le_bytes([f[14], f[15], f[16], f[17]]);
        match self.expect {
            Some(e) if seq > e => self.lost += u64::from(seq - e),
            Some(e) if seq < e => self.dup += 1,
            _ => {}
        }
        if self.expect.is_none_or(|e| seq >= e) {
            self.expect = Some(seq.wrapping_add(1));
        }
        let mut src = [0u8; 6];
        src.copy_from_slice(&f[6..12]);
        f[..6].copy_from_slice(&src);
        f[6..12].copy_from_slice(&self.mac);
        f[12..14].copy_from_slice(&ETH_ECHO.to_be_bytes());
        // A full tx ring drops the echo (counted by tx not moving).
        if self.send(f) {
            self.echoed += 1;
        }
    }

    fn report(&self, kind: &str) {
        say!(
            "net{} tx={} rx={} echoed={} lost={} dup={}",
            kind,
            self.tx_count,
            self.rx_count,
            self.echoed,
            self.lost,
            self.dup
        );
    }
}

/// Runs the driver on this vCPU; never returns.
pub fn run(cfg: &Config) -> ! {
    let Some(t) = cfg
        .virtio()
        .iter()
        .find_map(|v| Transport::probe(v.addr).filter(|t| t.device_id() == 1))
    else {
        fail(
            "no virtio-net device (virtio-mmio version 2, device id 1)",
            0,
        )
    };
    let mut net = Net::init(t);
    let report_ticks = (cfg.report_ms / 10).max(1);
    let mut last_report = boot::ticks();
    let mut last_tick = boot::ticks();
    let mut seq: u32 = 0;
    let mut done_at: Option<u64> = None;
    let mut frame = [0u8; FRAME_LEN];
    loop {
        net.poll_rx();
        net.reap_tx();
        let now = boot::ticks();
        if cfg.net == NetMode::Seq && done_at.is_none() && now != last_tick {
            // A steady rate: `net_rate` frames for every tick that passed.
            let ticks = now.wrapping_sub(last_tick).min(10);
            last_tick = now;
            for _ in 0..ticks * cfg.net_rate {
                net.seq_frame(seq, &mut frame);
                if !net.send(&frame) {
                    break;
                }
                seq = seq.wrapping_add(1);
                if cfg.net_count != 0 && u64::from(seq) >= cfg.net_count {
                    done_at = Some(now);
                    break;
                }
            }
        }
        if now.wrapping_sub(last_report) >= report_ticks {
            last_report = now;
            net.report("");
        }
        if let Some(t) = done_at {
            if now.wrapping_sub(t) >= 20 {
                net.report(" done");
                console::exit(console::EXIT_OK);
            }
        }
        core::hint::spin_loop();
    }
}
