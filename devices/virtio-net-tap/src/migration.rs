//! Migration of a virtio-net-tap device: its state, early setup and TAP handover.
//!
//! - `vmsd` [`NetState`] (`virtio-net`): the transport's [`VirtioMmioState`] plus the
//!   net state (offered features, MAC, link status, configured and active queue pairs,
//!   frames read from the TAP but not yet delivered). Loading it is parsing hostile
//!   input: every index is checked against the state itself (`validate`) and then
//!   against this device's configuration, with errors naming the path.
//! - [`EarlySetup`] [`NetEarly`] (`virtio-net/early`): queue layout and features, sent
//!   while the source runs, so a destination validates its configuration and, when it
//!   will not receive the source's fds, opens its own TAP (and sets its offloads) before
//!   switchover. At switchover an unchanged early state costs nothing.
//! - [`BackendTransfer`]: every TAP queue fd as role `tap-queue-N` with [`TapMeta`]
//!   (ifname, vnet header size, TAP flags, offloads, non-blocking). The source stops
//!   reading at export and never touches the fds again until `resume` or `release`; the
//!   destination checks each fd (`TUNGETIFF`, `TUNGETVNETHDRSZ`, `F_GETFL`) against the
//!   metadata and adopts it without changing anything.
//!
//! Why held frames are state: a frame the source read from the TAP while the guest had
//! no buffer for it exists nowhere else; dropping it at switchover would lose a frame
//! the TAP already counted as delivered.

use baton_qdev::{
    BackendHandoff, BackendTransfer, DeviceMigrationError, EarlyOutcome, EarlySetup, HandoffFd,
    Hook, Migratable, ReceivedBackend,
};
use baton_virtio::VirtioMmioState;
use baton_vmstate::{VmState, VmStateDescription, VmStateError};
use std::os::fd::AsFd;
use vm_memory::GuestMemoryBackend;

use crate::backend::{offloads_for, Tap, TapExpect, MAX_FRAME_LEN, TAP_FLAGS, VNET_HDR_LEN};
use crate::device::{VirtioNet, S_ANNOUNCE, S_LINK_UP};
use crate::handle::VirtioNetTap;
use crate::props::MAX_QUEUE_PAIRS;

/// A frame read from TAP queue `tap_queue` and not yet delivered to the guest.
#[derive(VmState, Clone, Debug, Default, PartialEq, Eq)]
#[vmstate(name = "virtio-net-held-frame", version = 1)]
pub struct HeldFrame {
    pub tap_queue: u16,
    #[vmstate(max = 65562)]
    pub data: Vec<u8>,
}

/// The final state of a virtio-net-tap device.
#[derive(VmState, Clone, Debug, Default, PartialEq, Eq)]
#[vmstate(name = "virtio-net", version = 1, validate = NetState::check)]
pub struct NetState {
    pub virtio: VirtioMmioState,
    /// The virtio-net features the source device offered.
    pub features: u64,
    pub mac: [u8; 6],
    /// Configuration-space `status`: `VIRTIO_NET_S_LINK_UP`, `VIRTIO_NET_S_ANNOUNCE`.
    pub status: u16,
    /// Configured queue pairs (`max_virtqueue_pairs`).
    pub max_queue_pairs: u16,
    /// Pairs the driver enabled (`VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET`).
    pub active_pairs: u16,
    #[vmstate(max = 256)]
    pub held: Vec<HeldFrame>,
}

/// What the destination prepares before switchover.
#[derive(VmState, Clone, Debug, Default, PartialEq, Eq)]
#[vmstate(name = "virtio-net/early", version = 1, early_setup)]
pub struct NetEarly {
    pub max_queue_pairs: u16,
    pub queue_size: u16,
    pub device_features: u64,
    /// Negotiated features (0 before `FEATURES_OK`): decides the TAP offloads.
    pub driver_features: u64,
    #[vmstate(max = 16)]
    pub ifname: String,
}

/// What a destination needs to adopt the TAP fds.
#[derive(VmState, Clone, Debug, Default, PartialEq, Eq)]
#[vmstate(name = "virtio-net/tap", version = 1)]
pub struct TapMeta {
    #[vmstate(max = 16)]
    pub ifname: String,
    pub queues: u16,
    pub vnet_hdr_len: u32,
    /// `TUNGETIFF` framing flags.
    pub flags: u32,
    /// The last `TUNSETOFFLOAD` value.
    pub offloads: u32,
    pub nonblocking: bool,
}

fn invalid(path: &str, reason: String) -> Result<(), VmStateError> {
    Err(VmStateError::invalid(path, reason))
}

impl NetState {
    /// Checks that need only the state itself.
    pub fn check(&self) -> Result<(), VmStateError> {
        if self.status & !(S_LINK_UP | S_ANNOUNCE) != 0 {
            return invalid("status", format!("{:#x} has undefined bits", self.status));
        }
        if self.max_queue_pairs == 0 || i64::from(self.max_queue_pairs) > MAX_QUEUE_PAIRS {
            return invalid(
                "max_queue_pairs",
                format!("{} is not in 1..={MAX_QUEUE_PAIRS}", self.max_queue_pairs),
            );
        }
        if self.active_pairs == 0 || self.active_pairs > self.max_queue_pairs {
            return invalid(
                "active_pairs",
                format!(
                    "{} exceeds max_queue_pairs {} (or is 0)",
                    self.active_pairs, self.max_queue_pairs
                ),
            );
        }
        let nq = 2 * usize::from(self.max_queue_pairs) + 1;
        if self.virtio.queues.len() != nq {
            return invalid(
                "virtio.queues",
                format!(
                    "{} queues for {} queue pairs (expected {nq})",
                    self.virtio.queues.len(),
                    self.max_queue_pairs
                ),
            );
        }
        for (i, h) in self.held.iter().enumerate() {
            if h.tap_queue >= self.max_queue_pairs {
                return invalid(
                    &format!("held[{i}].tap_queue"),
                    format!(
                        "{} is beyond the {} TAP queues",
                        h.tap_queue, self.max_queue_pairs
                    ),
                );
            }
            if h.data.len() < VNET_HDR_LEN || h.data.len() > MAX_FRAME_LEN {
                return invalid(
                    &format!("held[{i}].data"),
                    format!("{} bytes is not a frame with its vnet header", h.data.len()),
                );
            }
            if self.held[..i].iter().any(|o| o.tap_queue == h.tap_queue) {
                return invalid(
                    &format!("held[{i}].tap_queue"),
                    format!("{}: a second held frame for the same queue", h.tap_queue),
                );
            }
        }
        Ok(())
    }

    /// Checks against this device's configuration.
    fn check_device<M: GuestMemoryBackend + Clone + Send>(
        &self,
        dev: &VirtioNet<M>,
    ) -> Result<(), VmStateError> {
        let pairs = dev.config.queue_pairs;
        if self.max_queue_pairs != pairs {
            return invalid(
                "max_queue_pairs",
                format!(
                    "{} in the state, this device has {pairs} queue pairs",
                    self.max_queue_pairs
                ),
            );
        }
        let mac = dev.config.mac.map(|m| m.0).unwrap_or_default();
        if self.mac != mac {
            return invalid(
                "mac",
                format!("{:02x?} in the state, this device has {mac:02x?}", self.mac),
            );
        }
        let negotiated = self.virtio.driver_features;
        let features_ok =
            u32::from(self.virtio.status) & baton_virtio::regs::status::FEATURES_OK != 0;
        if self.active_pairs > 1 && !(features_ok && negotiated & crate::device::feature::MQ != 0) {
            return invalid(
                "active_pairs",
                format!("{} without VIRTIO_NET_F_MQ negotiated", self.active_pairs),
            );
        }
        Ok(())
    }
}

fn state_err(id: &str, hook: Hook, e: VmStateError) -> DeviceMigrationError {
    DeviceMigrationError::state(id, hook, e)
}

impl<M: GuestMemoryBackend + Clone + Send + 'static> VirtioNetTap<M> {
    /// Opens this device's own TAP unless it has one (destination without backend
    /// transfer).
    fn ensure_tap(&self, hook: Hook) -> Result<(), DeviceMigrationError> {
        let id = &self.inner.id;
        {
            let mut t = self.lock();
            let dev = t.device_mut();
            if dev.tap.is_some() {
                return Ok(());
            }
            let tap = Tap::open(&dev.config.ifname, dev.config.queue_pairs)
                .map_err(|e| DeviceMigrationError::refused(id, hook, e.to_string()))?;
            dev.tap = Some(tap);
            dev.adopted = false;
        }
        self.wake();
        Ok(())
    }

    fn early_state(&self) -> NetEarly {
        let t = self.lock();
        let features_ok = t.status() & baton_virtio::regs::status::FEATURES_OK != 0;
        let c = &self.inner.config;
        NetEarly {
            max_queue_pairs: c.queue_pairs,
            queue_size: c.queue_size,
            device_features: t.offered_features(),
            driver_features: if features_ok { t.driver_features() } else { 0 },
            ifname: c.ifname.clone(),
        }
    }
}

impl<M: GuestMemoryBackend + Clone + Send + 'static> Migratable for VirtioNetTap<M> {
    fn id(&self) -> &str {
        &self.inner.id
    }

    fn vmsd(&self) -> &'static VmStateDescription {
        NetState::vmsd()
    }

    fn save(&mut self) -> Result<Vec<u8>, DeviceMigrationError> {
        let t = self.lock();
        let dev = t.device();
        let held = dev
            .held
            .iter()
            .enumerate()
            .filter_map(|(i, h)| {
                h.as_ref().map(|d| HeldFrame {
                    tap_queue: i as u16,
                    data: d.clone(),
                })
            })
            .collect();
        Ok(NetState {
            virtio: t.save_state(),
            features: VirtioNet::<M>::offered(&dev.config),
            mac: dev.config.mac.map(|m| m.0).unwrap_or_default(),
            status: dev.status,
            max_queue_pairs: dev.config.queue_pairs,
            active_pairs: dev.active_pairs,
            held,
        }
        .save())
    }

    fn load(&mut self, version_id: u32, state: &[u8]) -> Result<(), DeviceMigrationError> {
        let id = self.inner.id.clone();
        let s = NetState::load(state, version_id).map_err(|e| state_err(&id, Hook::Load, e))?;
        {
            let t = self.lock();
            s.check_device(t.device())
                .map_err(|e| state_err(&id, Hook::Load, e))?;
            t.check_state(&s.virtio)
                .map_err(|e| state_err(&id, Hook::Load, e.in_field("virtio")))?;
        }
        self.ensure_tap(Hook::Load)?;
        let mut t = self.lock();
        {
            let dev = t.device_mut();
            dev.status = s.status;
            dev.active_pairs = s.active_pairs;
            dev.held.iter_mut().for_each(|h| *h = None);
            for h in s.held {
                if let Some(slot) = dev.held.get_mut(usize::from(h.tap_queue)) {
                    *slot = Some(h.data);
                }
            }
        }
        t.restore_state(&s.virtio)
            .map_err(|e| e.into_migration_error(&id, "virtio"))?;
        tracing::info!(device = id, "virtio-net state loaded");
        Ok(())
    }

    fn early_setup(&mut self) -> Option<&mut dyn EarlySetup> {
        if self.inner.config.early_setup {
            Some(self)
        } else {
            None
        }
    }

    fn backend_transfer(&mut self) -> Option<&mut dyn BackendTransfer> {
        Some(self)
    }
}

impl<M: GuestMemoryBackend + Clone + Send + 'static> EarlySetup for VirtioNetTap<M> {
    fn early_vmsd(&self) -> &'static VmStateDescription {
        NetEarly::vmsd()
    }

    fn save_early(&mut self) -> Result<Vec<u8>, DeviceMigrationError> {
        Ok(self.early_state().save())
    }

    fn prepare(&mut self, version_id: u32, state: &[u8]) -> Result<(), DeviceMigrationError> {
        let id = self.inner.id.clone();
        let hook = Hook::EarlyPrepare;
        let e = NetEarly::load(state, version_id).map_err(|e| state_err(&id, hook, e))?;
        let mine = self.early_state();
        let mismatch = |field: &str, theirs: String, ours: String| {
            state_err(
                &id,
                hook,
                VmStateError::invalid(
                    field,
                    format!("{theirs} in the state, this device has {ours}"),
                ),
            )
        };
        if e.max_queue_pairs != mine.max_queue_pairs {
            return Err(mismatch(
                "max_queue_pairs",
                e.max_queue_pairs.to_string(),
                mine.max_queue_pairs.to_string(),
            ));
        }
        if e.queue_size != mine.queue_size {
            return Err(mismatch(
                "queue_size",
                e.queue_size.to_string(),
                mine.queue_size.to_string(),
            ));
        }
        if e.ifname != mine.ifname {
            return Err(mismatch(
                "ifname",
                format!("{:?}", e.ifname),
                format!("{:?}", mine.ifname),
            ));
        }
        let unoffered = e.driver_features & !mine.device_features;
        if unoffered != 0 {
            return Err(state_err(
                &id,
                hook,
                VmStateError::invalid(
                    "driver_features",
                    format!(
                        "{:#x} not offered by the device (offered {:#x})",
                        e.driver_features, mine.device_features
                    ),
                ),
            ));
        }
        if !self.inner.config.backend_transfer {
            self.ensure_tap(hook)?;
            let mut t = self.lock();
            if let Some(tap) = &mut t.device_mut().tap {
                tap.set_offloads(offloads_for(e.driver_features))
                    .map_err(|err| DeviceMigrationError::refused(&id, hook, err.to_string()))?;
            }
        }
        tracing::info!(device = id, "early setup prepared");
        Ok(())
    }

    fn finish(&mut self, outcome: EarlyOutcome<'_>) -> Result<(), DeviceMigrationError> {
        match outcome {
            EarlyOutcome::Unchanged => Ok(()),
            EarlyOutcome::Changed { version_id, state } => self.prepare(version_id, state),
        }
    }

    fn discard(&mut self) {
        let mut t = self.lock();
        let dev = t.device_mut();
        if !dev.adopted {
            dev.tap = None;
        }
        drop(t);
        self.wake();
    }
}

impl<M: GuestMemoryBackend + Clone + Send + 'static> BackendTransfer for VirtioNetTap<M> {
    fn enabled(&self) -> bool {
        self.inner.config.backend_transfer
    }

    fn metadata_vmsd(&self) -> &'static VmStateDescription {
        TapMeta::vmsd()
    }

    fn export(&mut self) -> Result<BackendHandoff<'_>, DeviceMigrationError> {
        let id = self.inner.id.clone();
        let (queues, meta) = {
            let mut t = self.lock();
            let dev = t.device_mut();
            let Some(tap) = &dev.tap else {
                return Err(DeviceMigrationError::refused(
                    &id,
                    Hook::BackendExport,
                    "no TAP to hand over",
                ));
            };
            let queues = tap.queues().to_vec();
            let x = tap.expect();
            let meta = TapMeta {
                ifname: x.ifname,
                queues: queues.len() as u16,
                vnet_hdr_len: x.vnet_hdr_len,
                flags: x.flags,
                offloads: tap.offloads(),
                nonblocking: x.nonblocking,
            };
            dev.handed_over = true;
            (queues, meta)
        };
        self.wake();
        tracing::info!(device = id, queues = queues.len(), "TAP exported");
        self.exported = queues;
        Ok(BackendHandoff {
            fds: self
                .exported
                .iter()
                .enumerate()
                .map(|(i, q)| HandoffFd {
                    role: format!("tap-queue-{i}"),
                    fd: q.as_fd(),
                })
                .collect(),
            metadata: meta.save(),
        })
    }

    fn resume(&mut self) -> Result<(), DeviceMigrationError> {
        self.exported.clear();
        {
            let mut t = self.lock();
            let dev = t.device_mut();
            dev.handed_over = false;
            dev.process_all();
        }
        self.wake();
        tracing::info!(device = self.inner.id, "TAP taken back");
        Ok(())
    }

    fn release(&mut self) {
        self.exported.clear();
        self.lock().device_mut().tap = None;
        self.wake();
        tracing::info!(device = self.inner.id, "TAP released");
    }

    fn adopt(&mut self, mut rx: ReceivedBackend) -> Result<(), DeviceMigrationError> {
        let id = self.inner.id.clone();
        let hook = Hook::BackendAdopt;
        let (v, bytes) = rx.metadata();
        let meta = TapMeta::load(bytes, v).map_err(|e| state_err(&id, hook, e))?;
        let c = &self.inner.config;
        let refuse = |why: String| DeviceMigrationError::refused(&id, hook, why);
        if meta.ifname != c.ifname {
            return Err(refuse(format!(
                "the TAP handed over is {:?}, this device's ifname is {:?}",
                meta.ifname, c.ifname
            )));
        }
        if meta.queues != c.queue_pairs {
            return Err(refuse(format!(
                "{} TAP queues handed over, this device has {} queue pairs",
                meta.queues, c.queue_pairs
            )));
        }
        if meta.vnet_hdr_len != VNET_HDR_LEN as u32 || meta.flags != TAP_FLAGS || !meta.nonblocking
        {
            return Err(refuse(format!(
                "TAP set up as vnet_hdr_len={} flags={:#x} nonblocking={}, this device needs \
                 {VNET_HDR_LEN}, {TAP_FLAGS:#x}, true",
                meta.vnet_hdr_len, meta.flags, meta.nonblocking
            )));
        }
        if self.lock().device().tap.is_some() {
            return Err(refuse(
                "a TAP is already open (device not created in incoming mode)".into(),
            ));
        }
        let mut fds = Vec::with_capacity(usize::from(meta.queues));
        for i in 0..meta.queues {
            let role = format!("tap-queue-{i}");
            let fd = rx.take(&role)?;
            fds.push((role, fd));
        }
        rx.finish()?;
        let expect = TapExpect {
            ifname: meta.ifname.clone(),
            flags: meta.flags,
            vnet_hdr_len: meta.vnet_hdr_len,
            nonblocking: meta.nonblocking,
        };
        let tap = Tap::adopt(fds, &expect, meta.offloads).map_err(|e| match e {
            crate::backend::BackendError::Refused { role, reason } => {
                DeviceMigrationError::fd(&id, hook, &role, reason)
            }
            other => refuse(other.to_string()),
        })?;
        {
            let mut t = self.lock();
            let dev = t.device_mut();
            dev.tap = Some(tap);
            dev.adopted = true;
        }
        self.wake();
        Ok(())
    }
}
