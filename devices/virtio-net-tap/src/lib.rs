//! virtio-net with a TAP backend, born migratable.
//!
//! - `backend`: the multi-queue TAP (open by name, or adopt handed-over fds as they are).
//! - `device`: the virtio-net model (`VirtioNet`, a `baton_virtio::VirtioDevice`).
//! - `handle`: [`VirtioNetTap`], the device as a VMM holds it (MMIO, ioeventfds, TAP
//!   readiness, quiesce/resume), and `worker`: [`NetWorker`], an optional event loop.
//! - `migration`: the `Migratable` impl (state, early setup, TAP backend transfer).
//! - `props`: the property schema.
//!
//! # Wiring it into a VMM
//!
//! ```no_run
//! use std::sync::Arc;
//! use baton_qdev::Migratable;
//! use baton_virtio_net_tap::{BackendMode, NetWorker, VirtioNetTap, VirtioNetTapConfig};
//! use vm_memory::{GuestAddress, GuestMemoryMmap};
//! use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
//! # fn config() -> Result<VirtioNetTapConfig, Box<dyn std::error::Error>> {
//! #     let registry = baton_qdev::DeviceRegistry::with_types([baton_virtio_net_tap::device_type()])?;
//! #     let spec = baton_qdev::DeviceSpec::parse("virtio-net-tap,id=net0,ifname=tap0")?;
//! #     let props = baton_qdev::PropertyResolver::new(&registry).resolve(&spec)?;
//! #     Ok(VirtioNetTapConfig::from_resolved(&props)?)
//! # }
//! let mem: GuestMemoryMmap = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 30)])?;
//! let base = 0xd000_0000u64; // the MMIO window, baton_virtio::regs::MMIO_WINDOW_SIZE bytes
//! // 1. The interrupt: an EventFd the VMM registers with KVM_IRQFD for the window's GSI.
//! let irqfd = Arc::new(EventFd::new(EFD_NONBLOCK)?);
//! // 2. The device; BackendMode::Incoming on a migration destination (opens nothing).
//! let net = VirtioNetTap::new("net0", config()?, mem.clone(), irqfd.clone(), BackendMode::Open)?;
//! // 3. MMIO: forward [base, base + 0x200) to net.mmio_read / net.mmio_write (offsets).
//! let mut word = [0u8; 4];
//! net.mmio_read(0x0, &mut word);
//! // 4. Optional fast path: KVM_IOEVENTFD for every queue (4-byte write, datamatch).
//! for (reg, fd) in net.ioeventfds(base) {
//!     let _ = (reg.addr, reg.datamatch, fd); // vm_fd.register_ioevent(fd, &IoEventAddress::Mmio(reg.addr), reg.datamatch)
//! }
//! // 5. Events: the device's own loop (or poll ioeventfds, TAP queues and wake_fd yourself).
//! let worker = NetWorker::spawn(&net)?;
//! // 6. Migration: the engine holds a clone as Box<dyn Migratable>; the VMM calls
//! //    net.quiesce() before save/export and net.resume() if the migration fails; a
//! //    destination calls net.notify_all_queues() when the restored VM starts.
//! let for_engine: Box<dyn Migratable> = Box::new(net.clone());
//! # drop((for_engine, worker));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! A VMM registers the type and reads a device's configuration from its resolved
//! properties:
//!
//! ```
//! use baton_qdev::{DeviceRegistry, DeviceSpec, PropertyResolver};
//! use baton_virtio_net_tap::{device_type, VirtioNetTapConfig};
//!
//! let registry = DeviceRegistry::with_types([device_type()])?;
//! let spec = DeviceSpec::parse("virtio-net-tap,id=net0,ifname=tap0,queues=2")?;
//! let props = PropertyResolver::new(&registry).resolve(&spec)?;
//! let config = VirtioNetTapConfig::from_resolved(&props)?;
//! assert_eq!(config.queue_pairs, 2);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

pub mod backend;
mod ctrl;
pub mod device;
mod handle;
pub mod migration;
pub mod props;
mod worker;

pub use backend::{BackendError, Tap, TapQueue};
pub use device::{NetStats, VirtioNet};
pub use handle::{BackendMode, NetError, NetTransport, VirtioNetTap};
pub use migration::{HeldFrame, NetEarly, NetState, TapMeta};
pub use props::{device_type, ConfigError, VirtioNetTapConfig, VIRTIO_NET_TAP};
pub use worker::NetWorker;
