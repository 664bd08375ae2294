//! vhost-user-blk frontend.
//!
//! The frontend (vhost-user connection, virtio-blk config space, migration with backend
//! transfer) lands in `device.rs`, `backend.rs` and `migration.rs`; its property schema
//! is here first so machine-type compat tables can be written and validated against it.
//!
//! ```
//! use baton_qdev::{DeviceRegistry, DeviceSpec, PropertyResolver};
//! use baton_vhost_user_blk::{device_type, VhostUserBlkConfig};
//!
//! let registry = DeviceRegistry::with_types([device_type()])?;
//! let spec = DeviceSpec::parse("vhost-user-blk,id=disk0,socket=/run/blk.sock,num-queues=2")?;
//! let props = PropertyResolver::new(&registry).resolve(&spec)?;
//! assert_eq!(VhostUserBlkConfig::from_resolved(&props)?.num_queues, 2);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

pub mod props;

pub use props::{device_type, ConfigError, VhostUserBlkConfig, VHOST_USER_BLK};
