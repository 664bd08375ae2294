//! [`VirtioNetTap`]: the device as a VMM holds it.
//!
//! One clonable handle shared by the VMM's MMIO dispatch (vCPU threads), its event loop
//! (or the device's own [`crate::NetWorker`]) and the migration engine (as a
//! `Box<dyn Migratable>`). Behind it, the transport and the device model sit in one
//! mutex: every entry point runs to completion under it, which is what makes
//! [`VirtioNetTap::quiesce`] immediate and exact (when it returns, nothing is half done
//! and nothing will read the TAP or the rings until [`VirtioNetTap::resume`]).
//!
//! The device owns one `EventFd` per queue for the VMM to register as KVM ioeventfds
//! ([`VirtioNetTap::ioeventfds`]), and a wake `EventFd` it signals whenever its set of
//! TAP fds changes (open, adopt, release) or processing resumes, so an event loop knows
//! to re-read [`VirtioNetTap::tap_queues`].

use std::io;
use std::sync::{Arc, Mutex, MutexGuard};

use baton_virtio::{InterruptLine, MmioTransport, NotifyRegistration, TransportError};
use vm_memory::GuestMemoryBackend;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::backend::{BackendError, Tap, TapQueue};
use crate::device::{NetStats, VirtioNet};
use crate::props::VirtioNetTapConfig;

/// The transport type behind a [`VirtioNetTap`].
pub type NetTransport<M> = MmioTransport<M, VirtioNet<M>>;

/// How a device gets its TAP.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackendMode {
    /// Open the interface now (a VMM booting a guest, or a migration source).
    Open,
    /// Open nothing: a migration destination. The TAP is adopted from the source
    /// (backend transfer), or opened by early-setup `prepare` or by `load`.
    Incoming,
}

/// Why a device could not be created.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("{device}: {source}")]
    Backend {
        device: String,
        #[source]
        source: BackendError,
    },
    #[error("{device}: queues: {source}")]
    Queue {
        device: String,
        #[source]
        source: virtio_queue::Error,
    },
    #[error("{device}: {source}")]
    Transport {
        device: String,
        #[source]
        source: TransportError,
    },
    #[error("{device}: {context}: {source}")]
    Io {
        device: String,
        context: &'static str,
        #[source]
        source: io::Error,
    },
}

pub(crate) struct Inner<M> {
    pub(crate) id: String,
    pub(crate) config: VirtioNetTapConfig,
    pub(crate) transport: Mutex<NetTransport<M>>,
    ioevents: Vec<EventFd>,
    wake: EventFd,
}

/// A virtio-net-tap device: clone it freely; all clones are the same device.
pub struct VirtioNetTap<M> {
    pub(crate) inner: Arc<Inner<M>>,
    /// TAP queues lent to the engine by the last backend export (keeps the borrowed fds
    /// alive for the engine while this handle is borrowed).
    pub(crate) exported: Vec<Arc<TapQueue>>,
}

impl<M> Clone for VirtioNetTap<M> {
    fn clone(&self) -> Self {
        VirtioNetTap {
            inner: self.inner.clone(),
            exported: Vec::new(),
        }
    }
}

impl<M: GuestMemoryBackend + Clone + Send + 'static> VirtioNetTap<M> {
    /// A device `id` with `config`, over guest memory `mem`, raising `irq` (a KVM irqfd
    /// `EventFd`, or any [`InterruptLine`]). With [`BackendMode::Open`] the TAP
    /// interface `config.ifname` is opened now.
    pub fn new(
        id: &str,
        config: VirtioNetTapConfig,
        mem: M,
        irq: impl InterruptLine + 'static,
        mode: BackendMode,
    ) -> Result<Self, NetError> {
        let device = id.to_owned();
        let tap = match mode {
            BackendMode::Open => Some(Tap::open(&config.ifname, config.queue_pairs).map_err(
                |source| NetError::Backend {
                    device: device.clone(),
                    source,
                },
            )?),
            BackendMode::Incoming => None,
        };
        let net = VirtioNet::new(id, config.clone(), tap).map_err(|source| NetError::Queue {
            device: device.clone(),
            source,
        })?;
        let transport =
            MmioTransport::new(net, mem, irq).map_err(|source| NetError::Transport {
                device: device.clone(),
                source,
            })?;
        let eventfd = || {
            EventFd::new(EFD_NONBLOCK).map_err(|source| NetError::Io {
                device: device.clone(),
                context: "eventfd",
                source,
            })
        };
        let nq = 2 * usize::from(config.queue_pairs) + 1;
        let ioevents = (0..nq).map(|_| eventfd()).collect::<Result<Vec<_>, _>>()?;
        let wake = eventfd()?;
        tracing::info!(
            device = id,
            ?mode,
            pairs = config.queue_pairs,
            "virtio-net-tap created"
        );
        Ok(VirtioNetTap {
            inner: Arc::new(Inner {
                id: device,
                config,
                transport: Mutex::new(transport),
                ioevents,
                wake,
            }),
            exported: Vec::new(),
        })
    }

    pub fn id(&self) -> &str {
        &self.inner.id
    }

    pub fn config(&self) -> &VirtioNetTapConfig {
        &self.inner.config
    }

    /// The transport and device, locked (a poisoned lock is taken over: every entry point
    /// leaves the device consistent between steps).
    pub fn lock(&self) -> MutexGuard<'_, NetTransport<M>> {
        self.inner
            .transport
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// A guest read in the device's MMIO window (`offset` from its base; the window is
    /// `baton_virtio::regs::MMIO_WINDOW_SIZE` bytes).
    pub fn mmio_read(&self, offset: u64, data: &mut [u8]) {
        self.lock().read(offset, data);
    }

    /// A guest write in the device's MMIO window.
    pub fn mmio_write(&self, offset: u64, data: &[u8]) {
        self.lock().write(offset, data);
    }

    /// The ioeventfds to register with KVM (`KVM_IOEVENTFD`, MMIO, 4 bytes, datamatch) for
    /// a window at `mmio_base`; when one fires, read it and call
    /// [`Self::notify_queue`]`(reg.queue)` (the worker does both).
    pub fn ioeventfds(&self, mmio_base: u64) -> Vec<(NotifyRegistration, &EventFd)> {
        let regs = self.lock().notify_registrations(mmio_base);
        regs.into_iter().zip(self.inner.ioevents.iter()).collect()
    }

    /// The device's own ioeventfd of `queue`.
    pub fn ioevent(&self, queue: u16) -> Option<&EventFd> {
        self.inner.ioevents.get(usize::from(queue))
    }

    /// Signalled when the TAP fds change or processing resumes: re-read
    /// [`Self::tap_queues`] and call [`Self::process_all`].
    pub fn wake_fd(&self) -> &EventFd {
        &self.inner.wake
    }

    pub(crate) fn wake(&self) {
        if let Err(e) = self.inner.wake.write(1) {
            tracing::warn!(device = self.inner.id, "wake eventfd: {e}");
        }
    }

    /// The TAP queues to poll for readability (edge-triggered is enough); empty while the
    /// device has no TAP, or after it handed it over.
    pub fn tap_queues(&self) -> Vec<Arc<TapQueue>> {
        let t = self.lock();
        let dev = t.device();
        if dev.handed_over {
            return Vec::new();
        }
        dev.tap().map(|t| t.queues().to_vec()).unwrap_or_default()
    }

    /// A queue notification (its ioeventfd fired).
    pub fn notify_queue(&self, queue: u16) {
        self.lock().notify_queue(queue);
    }

    /// TAP queue `tap_queue` became readable.
    pub fn tap_readable(&self, tap_queue: u16) {
        self.lock().device_mut().process_tap(tap_queue);
    }

    /// Process whatever is pending on every TAP and transmit queue.
    pub fn process_all(&self) {
        self.lock().device_mut().process_all();
    }

    /// The VMM calls this when a restored (migrated) VM starts running: the device then
    /// catches up with buffers made available since the source's last notification.
    pub fn notify_all_queues(&self) {
        self.lock().notify_all_queues();
    }

    /// Stop reading the TAP and the rings; in-flight work is finished when this returns.
    /// Call before `save`/backend export (vCPUs paused).
    pub fn quiesce(&self) {
        self.lock().device_mut().set_quiesced(true);
        tracing::debug!(device = self.inner.id, "quiesced");
    }

    /// Undo [`Self::quiesce`] (a cancelled or failed migration) and catch up.
    pub fn resume(&self) {
        {
            let mut t = self.lock();
            let d = t.device_mut();
            d.set_quiesced(false);
            d.process_all();
        }
        self.wake();
        tracing::debug!(device = self.inner.id, "resumed");
    }

    /// Ask the guest to announce itself (`VIRTIO_NET_S_ANNOUNCE` + config interrupt) if
    /// it accepted `VIRTIO_NET_F_GUEST_ANNOUNCE`; e.g. after a remote migration.
    pub fn announce(&self) -> io::Result<bool> {
        self.lock().device_mut().announce()
    }

    pub fn stats(&self) -> NetStats {
        self.lock().device().stats()
    }
}
