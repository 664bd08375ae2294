//! Test fixtures: real guest memory, an echo device and a small spec-following driver.
//!
//! The driver writes split-ring descriptors, available-ring entries and register values
//! the way a guest driver does (virtio 1.2 §2.7, §3.1.1, §4.2.3), so the transport and
//! the device are exercised only through guest-visible means: MMIO accesses, guest memory
//! and the interrupt `EventFd`.

#![allow(dead_code)]

use std::io::{Read, Write};
use std::sync::Arc;

use baton_virtio::regs::{self, features, status};
use baton_virtio::{
    read_config_bytes, write_config_bytes, ActivateContext, DeviceError, FeatureRefusal,
    MmioTransport, VirtioDevice, VirtioInterrupt,
};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

pub type Mem = GuestMemoryMmap<()>;
pub type Transport = MmioTransport<Mem, EchoDevice>;

/// A device type number no real device uses.
pub const ECHO_TYPE: u32 = 0x42;
/// Echo device feature: answer in upper case.
pub const ECHO_F_UPPER: u64 = 1 << 0;
/// A device-specific feature the echo device does not offer.
pub const ECHO_F_UNOFFERED: u64 = 1 << 1;
pub const ECHO_QUEUE_MAX: [u16; 2] = [16, 8];
/// Largest request the echo device reads.
const MAX_REQUEST: u64 = 64 * 1024;

/// Guest RAM: 512 KiB at 0 and 512 KiB at 1 MiB, with a hole between.
pub fn guest_memory() -> Mem {
    GuestMemoryMmap::from_ranges(&[
        (GuestAddress(0), 0x8_0000),
        (GuestAddress(0x10_0000), 0x8_0000),
    ])
    .expect("guest memory")
}

/// A copy of `src` in fresh memory, as RAM migration would produce.
pub fn copy_memory(src: &Mem) -> Mem {
    let dst = guest_memory();
    for r in src.iter() {
        let mut buf = vec![0u8; r.len() as usize];
        src.read_slice(&mut buf, r.start_addr()).expect("read ram");
        dst.write_slice(&buf, r.start_addr()).expect("write ram");
    }
    dst
}

/// All of guest RAM, region after region.
pub fn memory_bytes(mem: &Mem) -> Vec<u8> {
    let mut out = Vec::new();
    for r in mem.iter() {
        let mut buf = vec![0u8; r.len() as usize];
        mem.read_slice(&mut buf, r.start_addr()).expect("read ram");
        out.extend_from_slice(&buf);
    }
    out
}

struct Active {
    mem: Mem,
    irq: VirtioInterrupt,
    upper: bool,
    event_idx: bool,
}

/// Echoes each request's readable bytes into its writable buffers. Config space:
/// `served` (u32, read-only) then `scratch` (u32, read-write).
pub struct EchoDevice {
    queues: Vec<Queue>,
    active: Option<Active>,
    pub served: u32,
    pub scratch: u32,
    pub activations: Vec<bool>,
    pub resets: u32,
}

impl EchoDevice {
    pub fn new() -> Self {
        EchoDevice {
            queues: ECHO_QUEUE_MAX
                .iter()
                .map(|&m| Queue::new(m).expect("queue"))
                .collect(),
            active: None,
            served: 0,
            scratch: 0,
            activations: Vec::new(),
            resets: 0,
        }
    }

    fn config(&self) -> [u8; 8] {
        let mut c = [0u8; 8];
        c[..4].copy_from_slice(&self.served.to_le_bytes());
        c[4..].copy_from_slice(&self.scratch.to_le_bytes());
        c
    }

    fn process(&mut self, qi: u16) -> Result<(), DeviceError> {
        let Some(act) = &self.active else {
            return Ok(());
        };
        let q = &mut self.queues[usize::from(qi)];
        let mem = &act.mem;
        let qerr = |source| DeviceError::Queue { queue: qi, source };
        let ioerr = |source| DeviceError::Io {
            context: format!("queue {qi}"),
            source,
        };
        let mut used = false;
        while let Some(chain) = q.pop_descriptor_chain(mem) {
            let head = chain.head_index();
            let mut data = Vec::new();
            chain
                .clone()
                .reader(mem)
                .map_err(qerr)?
                .take(MAX_REQUEST)
                .read_to_end(&mut data)
                .map_err(ioerr)?;
            if act.upper {
                data.make_ascii_uppercase();
            }
            let mut w = chain.writer(mem).map_err(qerr)?;
            let n = data.len().min(w.available_bytes());
            w.write_all(&data[..n]).map_err(ioerr)?;
            q.add_used(mem, head, n as u32).map_err(qerr)?;
            self.served = self.served.wrapping_add(1);
            used = true;
        }
        let notify = used && (!act.event_idx || q.needs_notification(mem).map_err(qerr)?);
        if notify {
            act.irq.signal_used_queue().map_err(|e| DeviceError::Io {
                context: "interrupt".into(),
                source: e,
            })?;
        }
        Ok(())
    }
}

impl VirtioDevice<Mem> for EchoDevice {
    fn device_type(&self) -> u32 {
        ECHO_TYPE
    }
    fn device_features(&self) -> u64 {
        features::VERSION_1 | features::RING_EVENT_IDX | ECHO_F_UPPER | features::RING_PACKED
    }
    fn ack_features(&mut self, f: u64) -> Result<(), FeatureRefusal> {
        // A feature dependency to refuse: upper case only with event index (arbitrary).
        if f & ECHO_F_UPPER != 0 && f & features::RING_EVENT_IDX == 0 {
            return Err(FeatureRefusal {
                features: f,
                reason: "UPPER needs EVENT_IDX".into(),
            });
        }
        Ok(())
    }
    fn queues(&self) -> &[Queue] {
        &self.queues
    }
    fn queues_mut(&mut self) -> &mut [Queue] {
        &mut self.queues
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config(), offset, data);
    }
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        if offset >= 4 {
            let mut c = self.config();
            if write_config_bytes(&mut c[4..], offset - 4, data) {
                self.scratch = u32::from_le_bytes([c[4], c[5], c[6], c[7]]);
            }
        }
    }
    fn activate(&mut self, ctx: ActivateContext<Mem>) -> Result<(), DeviceError> {
        self.activations.push(ctx.restored);
        let restored = ctx.restored;
        self.active = Some(Active {
            mem: ctx.mem,
            irq: ctx.interrupt,
            upper: ctx.acked_features & ECHO_F_UPPER != 0,
            event_idx: ctx.acked_features & features::RING_EVENT_IDX != 0,
        });
        // A restored device waits for the VMM's catch-up notification.
        for qi in 0..self.queues.len() as u16 {
            if !restored && self.queues[usize::from(qi)].ready() {
                self.process(qi)?;
            }
        }
        Ok(())
    }
    fn queue_notify(&mut self, queue: u16) -> Result<(), DeviceError> {
        self.process(queue)
    }
    fn reset(&mut self) {
        self.active = None;
        self.resets += 1;
    }
}

/// A transport over a fresh echo device, with its interrupt `EventFd`.
pub fn echo_transport(mem: &Mem) -> (Transport, Arc<EventFd>) {
    let irq = Arc::new(EventFd::new(EFD_NONBLOCK).expect("eventfd"));
    let t = MmioTransport::new(EchoDevice::new(), mem.clone(), irq.clone()).expect("transport");
    (t, irq)
}

pub fn rd(t: &mut Transport, off: u64) -> u32 {
    let mut b = [0u8; 4];
    t.read(off, &mut b);
    u32::from_le_bytes(b)
}

pub fn wr(t: &mut Transport, off: u64, v: u32) {
    t.write(off, &v.to_le_bytes());
}

/// Drain the interrupt `EventFd`: how many times it fired since the last call.
pub fn irq_count(fd: &EventFd) -> u64 {
    fd.read().unwrap_or(0)
}

const DESC_F_NEXT: u16 = 1;
const DESC_F_WRITE: u16 = 2;
const BUF_SIZE: u64 = 256;

/// The driver's view of one queue.
#[derive(Clone, Debug)]
pub struct DriverQueue {
    pub size: u16,
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
    pub bufs: u64,
    pub avail_idx: u16,
    pub last_used: u16,
    free_heads: Vec<u16>,
}

/// A guest driver for the echo device, following the virtio 1.2 initialisation sequence.
#[derive(Clone, Debug)]
pub struct Driver {
    pub mem: Mem,
    pub queues: Vec<Option<DriverQueue>>,
}

impl Driver {
    pub fn new(mem: &Mem) -> Self {
        Driver {
            mem: mem.clone(),
            queues: vec![None, None],
        }
    }

    /// Reset, ACKNOWLEDGE, DRIVER, negotiate `wanted` ∩ offered, FEATURES_OK. Returns the
    /// accepted features, or the status read back when FEATURES_OK did not stick.
    pub fn negotiate(&self, t: &mut Transport, wanted: u64) -> Result<u64, u32> {
        wr(t, regs::STATUS, 0);
        assert_eq!(rd(t, regs::STATUS), 0);
        wr(t, regs::STATUS, status::ACKNOWLEDGE);
        wr(t, regs::STATUS, status::ACKNOWLEDGE | status::DRIVER);
        let mut offered = 0u64;
        for sel in 0..2u32 {
            wr(t, regs::DEVICE_FEATURES_SEL, sel);
            offered |= u64::from(rd(t, regs::DEVICE_FEATURES)) << (32 * sel);
        }
        self.write_features(t, wanted & offered);
        wr(
            t,
            regs::STATUS,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
        );
        let s = rd(t, regs::STATUS);
        if s & status::FEATURES_OK == 0 {
            return Err(s);
        }
        Ok(wanted & offered)
    }

    /// Write both DriverFeatures words (no filtering against the offer).
    pub fn write_features(&self, t: &mut Transport, f: u64) {
        for sel in 0..2u32 {
            wr(t, regs::DRIVER_FEATURES_SEL, sel);
            wr(t, regs::DRIVER_FEATURES, (f >> (32 * sel)) as u32);
        }
    }

    /// Configure queue `qi` with `size` entries: rings at 0x1_0000 + qi * 0x4000, buffers
    /// in the upper region.
    pub fn setup_queue(&mut self, t: &mut Transport, qi: u16, size: u16) {
        let base = 0x1_0000 + u64::from(qi) * 0x4000;
        let q = DriverQueue {
            size,
            desc: base,
            avail: base + 0x1000,
            used: base + 0x2000,
            bufs: 0x10_0000 + u64::from(qi) * 0x2_0000,
            avail_idx: 0,
            last_used: 0,
            free_heads: (0..size / 2).rev().map(|k| k * 2).collect(),
        };
        // Rings start zeroed, as a driver allocating them would make sure of.
        for (addr, len) in [
            (q.desc, 16 * u64::from(size)),
            (q.avail, 6 + 2 * u64::from(size)),
            (q.used, 6 + 8 * u64::from(size)),
        ] {
            self.mem
                .write_slice(&vec![0u8; len as usize], GuestAddress(addr))
                .expect("zero ring");
        }
        wr(t, regs::QUEUE_SEL, qi.into());
        assert!(rd(t, regs::QUEUE_NUM_MAX) >= u32::from(size));
        assert_eq!(rd(t, regs::QUEUE_READY), 0);
        wr(t, regs::QUEUE_NUM, size.into());
        for (lo, addr) in [
            (regs::QUEUE_DESC_LOW, q.desc),
            (regs::QUEUE_DRIVER_LOW, q.avail),
            (regs::QUEUE_DEVICE_LOW, q.used),
        ] {
            wr(t, lo, addr as u32);
            wr(t, lo + 4, (addr >> 32) as u32);
        }
        wr(t, regs::QUEUE_READY, 1);
        assert_eq!(rd(t, regs::QUEUE_READY), 1);
        self.queues[usize::from(qi)] = Some(q);
    }

    pub fn driver_ok(&self, t: &mut Transport) {
        let s = rd(t, regs::STATUS);
        wr(t, regs::STATUS, s | status::DRIVER_OK);
    }

    /// The whole sequence: negotiate, set up both queues, DRIVER_OK.
    pub fn init(&mut self, t: &mut Transport, wanted: u64) -> u64 {
        let f = self.negotiate(t, wanted).expect("features accepted");
        self.setup_queue(t, 0, 16);
        self.setup_queue(t, 1, 8);
        self.driver_ok(t);
        assert_eq!(rd(t, regs::STATUS) & status::DRIVER_OK, status::DRIVER_OK);
        f
    }

    fn q(&mut self, qi: u16) -> &mut DriverQueue {
        self.queues[usize::from(qi)].as_mut().expect("queue set up")
    }

    /// Make a request available: a readable buffer with `out`, then a writable one of
    /// `in_len` bytes. Returns the head descriptor index.
    pub fn submit(&mut self, qi: u16, out: &[u8], in_len: u32) -> u16 {
        assert!(out.len() as u64 <= BUF_SIZE && u64::from(in_len) <= BUF_SIZE);
        let mem = self.mem.clone();
        let q = self.q(qi);
        let head = q.free_heads.pop().expect("a free descriptor pair");
        let (rd_buf, wr_buf) = (
            q.bufs + u64::from(head) * BUF_SIZE,
            q.bufs + u64::from(head + 1) * BUF_SIZE,
        );
        mem.write_slice(out, GuestAddress(rd_buf))
            .expect("out buffer");
        mem.write_slice(&vec![0u8; in_len as usize], GuestAddress(wr_buf))
            .expect("in buffer");
        write_desc(
            &mem,
            q.desc,
            head,
            rd_buf,
            out.len() as u32,
            DESC_F_NEXT,
            head + 1,
        );
        write_desc(&mem, q.desc, head + 1, wr_buf, in_len, DESC_F_WRITE, 0);
        let slot = q.avail + 4 + 2 * u64::from(q.avail_idx % q.size);
        mem.write_obj(head.to_le(), GuestAddress(slot))
            .expect("avail entry");
        q.avail_idx = q.avail_idx.wrapping_add(1);
        mem.write_obj(q.avail_idx.to_le(), GuestAddress(q.avail + 2))
            .expect("avail idx");
        head
    }

    pub fn notify(&self, t: &mut Transport, qi: u16) {
        wr(t, regs::QUEUE_NOTIFY, qi.into());
    }

    /// Collect new used entries as (head, len, echoed bytes), freeing their descriptors.
    pub fn take_used(&mut self, qi: u16) -> Vec<(u16, u32, Vec<u8>)> {
        let mem = self.mem.clone();
        let q = self.q(qi);
        let idx: u16 = mem.read_obj(GuestAddress(q.used + 2)).expect("used idx");
        let mut out = Vec::new();
        while q.last_used != idx {
            let e = q.used + 4 + 8 * u64::from(q.last_used % q.size);
            let id: u32 = mem.read_obj(GuestAddress(e)).expect("used id");
            let len: u32 = mem.read_obj(GuestAddress(e + 4)).expect("used len");
            let head = id as u16;
            let mut data = vec![0u8; len as usize];
            let wr_buf = q.bufs + u64::from(head + 1) * BUF_SIZE;
            mem.read_slice(&mut data, GuestAddress(wr_buf))
                .expect("in buffer");
            out.push((head, len, data));
            q.free_heads.push(head);
            q.last_used = q.last_used.wrapping_add(1);
        }
        // Like Linux's virtqueue_enable_cb: interrupt me for the next entry (event index).
        let at = q.avail + 4 + 2 * u64::from(q.size);
        mem.write_obj(q.last_used.to_le(), GuestAddress(at))
            .expect("used_event");
        out
    }

    /// Event index: ask for an interrupt after the next used entry (`used_event`).
    pub fn set_used_event(&mut self, qi: u16, v: u16) {
        let mem = self.mem.clone();
        let q = self.q(qi);
        let at = q.avail + 4 + 2 * u64::from(q.size);
        mem.write_obj(v.to_le(), GuestAddress(at))
            .expect("used_event");
    }
}

fn write_desc(mem: &Mem, table: u64, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
    let at = table + 16 * u64::from(i);
    let mut d = [0u8; 16];
    d[..8].copy_from_slice(&addr.to_le_bytes());
    d[8..12].copy_from_slice(&len.to_le_bytes());
    d[12..14].copy_from_slice(&flags.to_le_bytes());
    d[14..16].copy_from_slice(&next.to_le_bytes());
    mem.write_slice(&d, GuestAddress(at)).expect("descriptor");
}
