//! virtio-net with a TAP backend.
//!
//! The device (emulation, TAP backend, migration) lands in `device.rs`, `backend.rs`
//! and `migration.rs`; its property schema is here first so machine-type compat tables
//! can be written and validated against it.
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

pub mod props;

pub use props::{device_type, ConfigError, VirtioNetTapConfig, VIRTIO_NET_TAP};
