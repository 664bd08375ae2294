//! The virtio-net device model (virtio device ID 1) over a TAP backend.
//!
//! Queues: `receiveq0, transmitq0, ..., receiveqN-1, transmitqN-1, controlq` with
//! `N = queues` (the `queues` property). The control queue always exists
//! (`VIRTIO_NET_F_CTRL_VQ` is always offered, so `VIRTIO_NET_F_GUEST_ANNOUNCE` can be
//! too); per the specification it is queue `2N` when the driver accepted
//! `VIRTIO_NET_F_MQ` and queue 2 otherwise.
//!
//! Frames move with their vnet header untouched: the TAP is set to the same 12-byte
//! `virtio_net_hdr_v1` the guest uses (virtio 1.0), so TX is "gather the chain, one
//! `write`" and RX is "one `read`, scatter into rx buffers", with only `num_buffers`
//! filled in by the device (the kernel leaves those two bytes alone).
//!
//! # Mergeable rx buffers
//!
//! `VIRTIO_NET_F_MRG_RXBUF` is offered (property `mrg-rxbuf`, default on) because
//! without it a guest that accepts TSO must post 64 KiB buffers for every rx slot
//! (16 MiB for a 256-entry queue) or give up on receive offloads; with it the guest
//! posts page-sized buffers and a large frame spans several. The device reads each frame
//! from the TAP into one host buffer first (one copy) because a TAP `read` must take the
//! whole frame at once and its size is unknown beforehand; the copy then lets it check
//! that the guest has room for the *whole* frame before consuming any rx buffer. When it
//! has not, the frame is held (one per TAP queue) and delivered first once the guest
//! adds buffers; a held frame is part of the migration state, so nothing read from the
//! TAP is ever lost, not even across a live update.
//!
//! # Processing model
//!
//! Everything runs under the caller's `&mut`: the transport calls
//! [`VirtioDevice::queue_notify`] for guest kicks, and the VMM's event loop (or
//! [`crate::NetWorker`]) calls [`VirtioNet::process_tap`] when a TAP fd is readable.
//! Work is done to completion in each call, so holding the lock is quiescence;
//! [`VirtioNet::set_quiesced`] additionally makes every entry point return without
//! reading the TAP or the rings until it is cleared. TAP fds are polled edge-triggered:
//! every call reads until the TAP is empty or the guest is out of buffers, and a guest
//! kick on an rx queue resumes reading.
//!
//! Inactive queue pairs (the driver set fewer pairs than the TAP has queues) still have
//! their TAP queue read, into rx queue `q mod active_pairs`: the kernel's queue
//! attachment (`TUNSETQUEUE`) is not readable back from an fd, so detaching queues would
//! make a handed-over TAP unverifiable; folding costs nothing and keeps per-flow order.

use std::io;

use baton_virtio::{
    read_config_bytes, ActivateContext, DeviceError, FeatureRefusal, VirtioDevice, VirtioInterrupt,
};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend};

use crate::backend::{offloads_for, Tap, MAX_FRAME_LEN, VNET_HDR_LEN};
use crate::props::VirtioNetTapConfig;

/// virtio-net feature bits (virtio 1.2 §5.1.3) as masks.
pub mod feature {
    pub const CSUM: u64 = 1 << 0;
    pub const GUEST_CSUM: u64 = 1 << 1;
    pub const MAC: u64 = 1 << 5;
    pub const GUEST_TSO4: u64 = 1 << 7;
    pub const GUEST_TSO6: u64 = 1 << 8;
    pub const GUEST_ECN: u64 = 1 << 9;
    pub const HOST_TSO4: u64 = 1 << 11;
    pub const HOST_TSO6: u64 = 1 << 12;
    pub const HOST_ECN: u64 = 1 << 13;
    pub const MRG_RXBUF: u64 = 1 << 15;
    pub const STATUS: u64 = 1 << 16;
    pub const CTRL_VQ: u64 = 1 << 17;
    pub const GUEST_ANNOUNCE: u64 = 1 << 21;
    pub const MQ: u64 = 1 << 22;
}

/// `status` bits of the configuration space.
pub const S_LINK_UP: u16 = 1;
pub const S_ANNOUNCE: u16 = 2;

/// Control queue classes, commands and acks.
pub const CTRL_ANNOUNCE: u8 = 3;
pub const CTRL_ANNOUNCE_ACK: u8 = 0;
pub const CTRL_MQ: u8 = 4;
pub const CTRL_MQ_VQ_PAIRS_SET: u8 = 0;
pub const CTRL_OK: u8 = 0;
pub const CTRL_ERR: u8 = 1;

/// The writable (address, length) pieces of one descriptor chain.
type Pieces = Vec<(GuestAddress, usize)>;

/// Counters, for tests and the VMM's statistics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetStats {
    pub tx_frames: u64,
    pub tx_dropped: u64,
    pub rx_frames: u64,
    pub rx_dropped: u64,
    /// Frames per TAP queue read (index = TAP queue, up to 8 counted).
    pub rx_by_tap_queue: [u64; 8],
}

pub(crate) struct Active<M> {
    pub(crate) mem: M,
    pub(crate) irq: VirtioInterrupt,
    pub(crate) features: u64,
    /// Restored and waiting for the VMM's first kick before touching guest memory.
    waiting_first_kick: bool,
}

/// The virtio-net device model behind a `baton_virtio::MmioTransport`.
pub struct VirtioNet<M> {
    pub(crate) id: String,
    pub(crate) config: VirtioNetTapConfig,
    pub(crate) queues: Vec<Queue>,
    pub(crate) tap: Option<Tap>,
    /// The TAP was adopted from a previous process (its offloads must not be reset).
    pub(crate) adopted: bool,
    pub(crate) active: Option<Active<M>>,
    pub(crate) status: u16,
    pub(crate) active_pairs: u16,
    /// A frame read from TAP queue `i` that did not fit the guest's buffers yet.
    pub(crate) held: Vec<Option<Vec<u8>>>,
    pub(crate) quiesced: bool,
    /// Source side of a backend transfer: the TAP belongs to the destination now.
    pub(crate) handed_over: bool,
    scratch: Vec<u8>,
    pub(crate) stats: NetStats,
}

impl<M> std::fmt::Debug for VirtioNet<M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VirtioNet")
            .field("id", &self.id)
            .field("active", &self.active.is_some())
            .field("active_pairs", &self.active_pairs)
            .field("status", &self.status)
            .field("quiesced", &self.quiesced)
            .finish_non_exhaustive()
    }
}

impl<M: GuestMemoryBackend + Clone + Send> VirtioNet<M> {
    /// A device with `config`'s queues; `tap` is `None` for a destination in incoming
    /// mode (adopted or opened before the device runs).
    pub fn new(
        id: &str,
        config: VirtioNetTapConfig,
        tap: Option<Tap>,
    ) -> Result<Self, virtio_queue::Error> {
        let n = 2 * usize::from(config.queue_pairs) + 1;
        let queues = (0..n)
            .map(|_| Queue::new(config.queue_size))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(VirtioNet {
            id: id.to_owned(),
            held: vec![None; usize::from(config.queue_pairs)],
            config,
            queues,
            tap,
            adopted: false,
            active: None,
            status: S_LINK_UP,
            active_pairs: 1,
            quiesced: false,
            handed_over: false,
            scratch: vec![0; MAX_FRAME_LEN],
            stats: NetStats::default(),
        })
    }

    /// The features this device offers (constant for its lifetime).
    pub fn offered(config: &VirtioNetTapConfig) -> u64 {
        use feature::*;
        let mut f = STATUS | CTRL_VQ | GUEST_ANNOUNCE;
        let on = |b: bool, bits: u64| if b { bits } else { 0 };
        f |= on(config.mq, MQ);
        f |= on(config.mac.is_some(), MAC);
        f |= on(config.mrg_rxbuf, MRG_RXBUF);
        f |= on(config.csum, CSUM);
        f |= on(
            config.csum && config.host_tso,
            HOST_TSO4 | HOST_TSO6 | HOST_ECN,
        );
        f |= on(config.guest_csum, GUEST_CSUM);
        f |= on(
            config.guest_csum && config.guest_tso,
            GUEST_TSO4 | GUEST_TSO6 | GUEST_ECN,
        );
        f
    }

    pub fn stats(&self) -> NetStats {
        self.stats
    }

    pub fn active_pairs(&self) -> u16 {
        self.active_pairs
    }

    /// The configuration-space `status` (link up, announce pending).
    pub fn link_status(&self) -> u16 {
        self.status
    }

    pub fn tap(&self) -> Option<&Tap> {
        self.tap.as_ref()
    }

    /// Negotiated features while active.
    pub fn features(&self) -> Option<u64> {
        self.active.as_ref().map(|a| a.features)
    }

    /// The control queue's index for negotiated `features`.
    pub fn ctrl_queue(&self, features: u64) -> u16 {
        if features & feature::MQ != 0 {
            2 * self.config.queue_pairs
        } else {
            2
        }
    }

    /// Stop (or restart) all processing: while quiesced nothing reads the TAP or the rings.
    pub fn set_quiesced(&mut self, q: bool) {
        self.quiesced = q;
    }

    pub(crate) fn running(&self) -> bool {
        !self.quiesced && !self.handed_over
    }

    /// Ask the guest to announce itself (gratuitous ARP after a move), when it accepted
    /// `VIRTIO_NET_F_GUEST_ANNOUNCE`. Returns whether it was asked.
    pub fn announce(&mut self) -> io::Result<bool> {
        let Some(a) = &self.active else {
            return Ok(false);
        };
        if a.features & feature::GUEST_ANNOUNCE == 0 {
            return Ok(false);
        }
        self.status |= S_ANNOUNCE;
        a.irq.signal_config_change()?;
        Ok(true)
    }

    /// The device cannot go on: `DEVICE_NEEDS_RESET`, and stop.
    fn fail(&mut self, why: &str) {
        tracing::warn!(device = self.id, "virtio-net: needs reset: {why}");
        if let Some(a) = self.active.take() {
            a.irq.set_needs_reset();
            if let Err(e) = a.irq.signal_config_change() {
                tracing::warn!(device = self.id, "virtio-net: cannot signal: {e}");
            }
        }
    }

    /// TAP queue `tap_queue` is readable: move frames into the guest until the TAP is
    /// empty or the guest is out of rx buffers. Errors set `DEVICE_NEEDS_RESET`.
    pub fn process_tap(&mut self, tap_queue: u16) {
        if let Err(e) = self.rx(tap_queue) {
            self.fail(&e.to_string());
        }
    }

    /// Everything that may be pending: every TAP queue and every ready transmit queue
    /// (after a resume, or on the VMM's first kick of a restored device).
    pub fn process_all(&mut self) {
        for q in 0..self.config.queue_pairs {
            self.process_tap(q);
            if let Err(e) = self.tx(2 * q + 1) {
                self.fail(&e.to_string());
            }
        }
    }

    fn rx_queue_for(&self, tap_queue: u16) -> u16 {
        2 * (tap_queue % self.active_pairs.max(1))
    }

    fn rx(&mut self, tq: u16) -> Result<(), DeviceError> {
        let ready = self.active.as_ref().is_some_and(|a| !a.waiting_first_kick);
        if !ready || !self.running() {
            return Ok(());
        }
        let rxq = self.rx_queue_for(tq);
        if !self.queues[usize::from(rxq)].ready() {
            return Ok(());
        }
        let mut delivered = false;
        let slot = usize::from(tq);
        if let Some(frame) = self.held.get_mut(slot).and_then(Option::take) {
            match self.deliver(rxq, &frame)? {
                true => delivered = true,
                false => {
                    self.held[slot] = Some(frame);
                    return self.signal(rxq, delivered);
                }
            }
        }
        let Some(tap) = &self.tap else {
            return self.signal(rxq, delivered);
        };
        let Some(queue) = tap.queue(tq).cloned() else {
            return self.signal(rxq, delivered);
        };
        let mut buf = std::mem::take(&mut self.scratch);
        let result = loop {
            let n = match queue.read_frame(&mut buf) {
                Ok(Some(n)) => n,
                Ok(None) => break Ok(()),
                Err(e) => {
                    // EIO while the interface is down, EBADFD for a detached queue:
                    // nothing to read now, and nothing the guest did wrong.
                    tracing::debug!(device = self.id, tq, "TAP read: {e}");
                    break Ok(());
                }
            };
            if let Some(c) = self.stats.rx_by_tap_queue.get_mut(slot) {
                *c += 1;
            }
            if n < VNET_HDR_LEN {
                self.stats.rx_dropped += 1;
                continue;
            }
            match self.deliver(rxq, &buf[..n]) {
                Ok(true) => delivered = true,
                Ok(false) => {
                    self.held[slot] = Some(buf[..n].to_vec());
                    break Ok(());
                }
                Err(e) => break Err(e),
            }
        };
        self.scratch = buf;
        result?;
        self.signal(rxq, delivered)
    }

    pub(crate) fn signal(&mut self, q: u16, used: bool) -> Result<(), DeviceError> {
        let Some(a) = &self.active else { return Ok(()) };
        if !used {
            return Ok(());
        }
        let queue = &mut self.queues[usize::from(q)];
        let needed = queue
            .needs_notification(&a.mem)
            .map_err(|source| DeviceError::Queue { queue: q, source })?;
        if needed {
            a.irq
                .signal_used_queue()
                .map_err(|source| DeviceError::Io {
                    context: format!("{}: queue {q}: interrupt", self.id),
                    source,
                })?;
        }
        Ok(())
    }

    /// Writable (address, length) pieces of one chain, checked against guest memory.
    fn writable(
        mem: &M,
        chain: virtio_queue::DescriptorChain<&M>,
        q: u16,
    ) -> Result<Vec<(GuestAddress, usize)>, DeviceError> {
        let mut out = Vec::new();
        for d in chain {
            if !d.is_write_only() {
                continue;
            }
            let len = d.len() as usize;
            if !GuestMemoryBackend::check_range(mem, d.addr(), len) {
                return Err(DeviceError::Other(format!(
                    "queue {q}: rx descriptor {:#x}+{len:#x} outside guest memory",
                    d.addr().0
                )));
            }
            out.push((d.addr(), len));
        }
        Ok(out)
    }

    /// Put one frame (vnet header included) into rx queue `q`. `Ok(false)`: the guest has
    /// not enough buffers yet; nothing was consumed.
    fn deliver(&mut self, q: u16, frame: &[u8]) -> Result<bool, DeviceError> {
        let Some(a) = &self.active else {
            return Ok(false);
        };
        let mrg = a.features & feature::MRG_RXBUF != 0;
        let mem = a.mem.clone();
        let queue = &mut self.queues[usize::from(q)];
        let start = queue.next_avail();
        let mut chains: Vec<(u16, Pieces)> = Vec::new();
        // Chains with no usable room: completed empty, but only once the frame is placed
        // (a rollback must leave the ring exactly as it was).
        let mut skipped: Vec<u16> = Vec::new();
        let mut room = 0usize;
        while room < frame.len() {
            let Some(chain) = queue.pop_descriptor_chain(&mem) else {
                queue.set_next_avail(start);
                return Ok(false);
            };
            let head = chain.head_index();
            let pieces = Self::writable(&mem, chain, q)?;
            let cap: usize = pieces.iter().map(|p| p.1).sum();
            if !mrg && cap < frame.len() {
                // The driver broke the rule that buffers hold a whole frame: drop the
                // frame, hand the buffer back empty.
                queue
                    .add_used(&mem, head, 0)
                    .map_err(|source| DeviceError::Queue { queue: q, source })?;
                self.stats.rx_dropped += 1;
                tracing::debug!(
                    device = self.id,
                    q,
                    cap,
                    len = frame.len(),
                    "rx buffer too small"
                );
                return Ok(true);
            }
            if cap == 0 || (mrg && chains.is_empty() && cap < VNET_HDR_LEN) {
                skipped.push(head);
                continue;
            }
            room += cap;
            chains.push((head, pieces));
        }
        let mut hdr = [0u8; VNET_HDR_LEN];
        hdr.copy_from_slice(&frame[..VNET_HDR_LEN]);
        let nbuf = if mrg { chains.len() as u16 } else { 1 };
        hdr[10..12].copy_from_slice(&nbuf.to_le_bytes());
        for head in skipped {
            queue
                .add_used(&mem, head, 0)
                .map_err(|source| DeviceError::Queue { queue: q, source })?;
        }
        let mut off = 0usize;
        let merr = |source| DeviceError::GuestMemory { queue: q, source };
        for (head, pieces) in &chains {
            let mut written = 0usize;
            for &(addr, len) in pieces {
                if off >= frame.len() {
                    break;
                }
                let n = len.min(frame.len() - off);
                let mut a = addr;
                let mut from = off;
                // The header comes from `hdr` (with num_buffers), the rest from the frame.
                if from < VNET_HDR_LEN {
                    let h = (VNET_HDR_LEN - from).min(n);
                    mem.write_slice(&hdr[from..from + h], a).map_err(merr)?;
                    a = a.unchecked_add(h as u64);
                    from += h;
                }
                let end = off + n;
                if from < end {
                    mem.write_slice(&frame[from..end], a).map_err(merr)?;
                }
                off = end;
                written += n;
            }
            queue
                .add_used(&mem, *head, written as u32)
                .map_err(|source| DeviceError::Queue { queue: q, source })?;
        }
        self.stats.rx_frames += 1;
        Ok(true)
    }

    fn tx(&mut self, q: u16) -> Result<(), DeviceError> {
        let Some(a) = &self.active else { return Ok(()) };
        if !self.running() || a.waiting_first_kick {
            return Ok(());
        }
        let mem = a.mem.clone();
        let Some(tapq) = self.tap.as_ref().and_then(|t| t.queue(q / 2)).cloned() else {
            return Ok(());
        };
        let queue = &mut self.queues[usize::from(q)];
        if !queue.ready() {
            return Ok(());
        }
        let mut used = false;
        while let Some(chain) = queue.pop_descriptor_chain(&mem) {
            let head = chain.head_index();
            let mut len = 0usize;
            let mut ok = true;
            for d in chain {
                if d.is_write_only() {
                    continue;
                }
                let n = d.len() as usize;
                let Some(dst) = self.scratch.get_mut(len..len + n) else {
                    ok = false;
                    break;
                };
                if mem.read_slice(dst, d.addr()).is_err() {
                    return Err(DeviceError::Other(format!(
                        "queue {q}: tx descriptor {:#x}+{n:#x} outside guest memory",
                        d.addr().0
                    )));
                }
                len += n;
            }
            if ok && len >= VNET_HDR_LEN {
                match tapq.write_frame(&self.scratch[..len]) {
                    Ok(()) => self.stats.tx_frames += 1,
                    Err(e) => {
                        tracing::debug!(device = self.id, q, "TAP write: {e}");
                        self.stats.tx_dropped += 1;
                    }
                }
            } else {
                tracing::debug!(device = self.id, q, len, "tx frame of bad length dropped");
                self.stats.tx_dropped += 1;
            }
            queue
                .add_used(&mem, head, 0)
                .map_err(|source| DeviceError::Queue { queue: q, source })?;
            used = true;
        }
        self.signal(q, used)
    }

    fn config_bytes(&self) -> [u8; 10] {
        let mut c = [0u8; 10];
        if let Some(mac) = &self.config.mac {
            c[..6].copy_from_slice(&mac.0);
        }
        c[6..8].copy_from_slice(&self.status.to_le_bytes());
        c[8..10].copy_from_slice(&self.config.queue_pairs.to_le_bytes());
        c
    }
}

impl<M: GuestMemoryBackend + Clone + Send> VirtioDevice<M> for VirtioNet<M> {
    fn device_type(&self) -> u32 {
        1
    }

    fn device_features(&self) -> u64 {
        Self::offered(&self.config)
    }

    fn ack_features(&mut self, f: u64) -> Result<(), FeatureRefusal> {
        use feature::*;
        let needs = [
            (MQ, CTRL_VQ, "MQ needs CTRL_VQ"),
            (GUEST_ANNOUNCE, CTRL_VQ, "GUEST_ANNOUNCE needs CTRL_VQ"),
            (
                GUEST_TSO4 | GUEST_TSO6,
                GUEST_CSUM,
                "GUEST_TSO needs GUEST_CSUM",
            ),
            (HOST_TSO4 | HOST_TSO6, CSUM, "HOST_TSO needs CSUM"),
        ];
        for (has, need, reason) in needs {
            if f & has != 0 && f & need == 0 {
                return Err(FeatureRefusal {
                    features: f,
                    reason: reason.into(),
                });
            }
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
        read_config_bytes(&self.config_bytes(), offset, data);
    }

    fn write_config(&mut self, offset: u64, _data: &[u8]) {
        tracing::debug!(
            device = self.id,
            offset,
            "write to read-only config ignored"
        );
    }

    fn activate(&mut self, ctx: ActivateContext<M>) -> Result<(), DeviceError> {
        let want = offloads_for(ctx.acked_features);
        let Some(tap) = &mut self.tap else {
            return Err(DeviceError::Other(format!("{}: no TAP backend", self.id)));
        };
        if ctx.restored && self.adopted && tap.offloads() != want {
            return Err(DeviceError::Other(format!(
                "{}: handed-over TAP has offloads {:#x}, negotiated features need {want:#x}",
                self.id,
                tap.offloads()
            )));
        }
        tap.set_offloads(want)
            .map_err(|e| DeviceError::Other(e.to_string()))?;
        if ctx.acked_features & feature::MQ == 0 {
            self.active_pairs = 1;
        }
        self.active = Some(Active {
            mem: ctx.mem,
            irq: ctx.interrupt,
            features: ctx.acked_features,
            waiting_first_kick: ctx.restored,
        });
        tracing::info!(
            device = self.id,
            features = ctx.acked_features,
            restored = ctx.restored,
            "virtio-net active"
        );
        if !ctx.restored {
            self.process_all();
        }
        Ok(())
    }

    fn queue_notify(&mut self, q: u16) -> Result<(), DeviceError> {
        let Some(a) = &mut self.active else {
            return Ok(());
        };
        if !(!self.quiesced && !self.handed_over) {
            return Ok(());
        }
        let features = a.features;
        if std::mem::take(&mut a.waiting_first_kick) {
            // First kick of a restored device: catch up with everything.
            self.process_all();
        }
        if q == self.ctrl_queue(features) {
            return self.ctrl(q);
        }
        if q >= 2 * self.config.queue_pairs {
            return Ok(());
        }
        if q % 2 == 1 {
            return self.tx(q);
        }
        // New rx buffers: every TAP queue that feeds this rx queue may go on.
        for tq in 0..self.config.queue_pairs {
            if self.rx_queue_for(tq) == q {
                self.rx(tq)?;
            }
        }
        Ok(())
    }

    fn reset(&mut self) {
        self.active = None;
        self.active_pairs = 1;
        self.status = S_LINK_UP;
        self.held.iter_mut().for_each(|h| *h = None);
        if let Some(tap) = &mut self.tap {
            if !self.handed_over {
                if let Err(e) = tap.set_offloads(0) {
                    tracing::warn!(device = self.id, "{e}");
                }
            }
        }
        self.adopted = false;
    }
}
