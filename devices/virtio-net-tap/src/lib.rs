//! virtio-net with a TAP backend, born migratable.
//!
//! - `backend`: the multi-queue TAP (open by name, or adopt handed-over fds as they are).
//! - `device`: the virtio-net model (`VirtioNet`, a `baton_virtio::VirtioDevice`).
//! - `handle`: [`VirtioNetTap`], the device as a VMM holds it (MMIO, ioeventfds, TAP
//!   readiness, quiesce/resume), and `worker`: [`NetWorker`], an optional event loop.
//! - `migration`: the `Migratable` impl (state, early setup, TAP backend transfer).
//! - `props`: the property schema.
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
