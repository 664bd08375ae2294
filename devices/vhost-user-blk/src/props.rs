//! The properties of `vhost-user-blk`.
//!
//! Declared ahead of the device so that machine-type compat tables can be written and
//! checked against them. Every property here is one the frontend honours; the doc line
//! says how.

use baton_qdev::{
    DeviceLabel, DeviceType, PropertyAccessError, PropertyKind, PropertySpec, ResolvedProperties,
    TypeKind, VIRTIO_DEVICE,
};
use thiserror::Error;

/// The most request queues a device can have.
pub const MAX_QUEUES: i64 = 256;

/// The `vhost-user-blk` device type.
pub static VHOST_USER_BLK: DeviceType = DeviceType {
    name: "vhost-user-blk",
    parent: Some(&VIRTIO_DEVICE),
    kind: TypeKind::Device,
    doc: "virtio-blk device whose data path runs in a vhost-user backend",
    properties: PROPERTIES,
};

static PROPERTIES: &[PropertySpec] = &[
    PropertySpec::new(
        "socket",
        PropertyKind::Str,
        "Path of the backend's vhost-user Unix socket (e.g. qemu-storage-daemon \
         --export type=vhost-user-blk,addr.type=unix,addr.path=PATH).",
    )
    .required(),
    PropertySpec::new(
        "num-queues",
        PropertyKind::int(1, MAX_QUEUES),
        "Request queues; more than one offers VIRTIO_BLK_F_MQ and must not exceed what \
         the backend reports (VHOST_USER_GET_QUEUE_NUM).",
    )
    .default_int(1),
    PropertySpec::new(
        "queue-size",
        PropertyKind::int(64, 1024).power_of_two(),
        "Descriptors per virtqueue (the maximum the device advertises).",
    )
    .default_int(128),
    PropertySpec::new(
        "config-wce",
        PropertyKind::Bool,
        "Offer VIRTIO_BLK_F_CONFIG_WCE so the guest can switch the write cache between \
         writeback and writethrough (when the backend offers it).",
    )
    .default_bool(true),
    PropertySpec::new(
        "backend-transfer",
        PropertyKind::Bool,
        "On local live update, hand the connected vhost-user socket to the new VMM so the \
         backend keeps running without a reconnect (also needs the migration capability \
         backend-transfer).",
    )
    .default_bool(true),
];

/// The `vhost-user-blk` type, for registering in the VMM's `DeviceRegistry`.
pub fn device_type() -> &'static DeviceType {
    &VHOST_USER_BLK
}

/// A `vhost-user-blk` device's configuration, read once from its resolved properties.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VhostUserBlkConfig {
    /// Backend socket path.
    pub socket: String,
    /// Request queues.
    pub num_queues: u16,
    /// Descriptors per virtqueue.
    pub queue_size: u16,
    /// Offer VIRTIO_BLK_F_CONFIG_WCE.
    pub config_wce: bool,
    /// Hand the backend connection over on local live update.
    pub backend_transfer: bool,
}

/// Resolved properties that cannot be honoured.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ConfigError {
    /// A property could not be read (a bug in this crate's schema or reader).
    #[error(transparent)]
    Access(#[from] PropertyAccessError),
    /// A setting the frontend cannot use.
    #[error("{device}: {reason}")]
    Invalid {
        /// The device.
        device: DeviceLabel,
        /// What is wrong.
        reason: &'static str,
    },
}

impl VhostUserBlkConfig {
    /// Reads and checks the configuration.
    pub fn from_resolved(props: &ResolvedProperties) -> Result<Self, ConfigError> {
        let config = VhostUserBlkConfig {
            socket: props.require("socket")?,
            num_queues: props.require("num-queues")?,
            queue_size: props.require("queue-size")?,
            config_wce: props.require("config-wce")?,
            backend_transfer: props.require("backend-transfer")?,
        };
        if config.socket.is_empty() {
            return Err(ConfigError::Invalid {
                device: props.label(),
                reason: "socket must be a path",
            });
        }
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use baton_qdev::{DeviceRegistry, DeviceSpec, PropertyResolver};

    fn resolve(text: &str) -> ResolvedProperties {
        let registry = DeviceRegistry::with_types([device_type()]).unwrap();
        PropertyResolver::new(&registry)
            .resolve(&DeviceSpec::parse(text).unwrap())
            .unwrap()
    }

    #[test]
    fn schema_is_valid() {
        assert_eq!(VHOST_USER_BLK.validate(), Ok(()));
        assert!(VHOST_USER_BLK.is_a("virtio-device"));
    }

    #[test]
    fn defaults() {
        let props = resolve("vhost-user-blk,id=disk0,socket=/run/vhost-blk.sock");
        let config = VhostUserBlkConfig::from_resolved(&props).unwrap();
        assert_eq!(
            config,
            VhostUserBlkConfig {
                socket: "/run/vhost-blk.sock".into(),
                num_queues: 1,
                queue_size: 128,
                config_wce: true,
                backend_transfer: true,
            }
        );
    }

    #[test]
    fn empty_socket_is_rejected() {
        let props = resolve("vhost-user-blk,id=disk0,socket=");
        assert_eq!(
            VhostUserBlkConfig::from_resolved(&props)
                .unwrap_err()
                .to_string(),
            "device 'disk0' (vhost-user-blk): socket must be a path"
        );
    }
}
