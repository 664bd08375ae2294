//! The properties of `virtio-net-tap`.
//!
//! Declared ahead of the device so that machine-type compat tables can be written and
//! checked against them. Every property here is one the device honours; the doc line
//! says how. Feature properties map to virtio-net feature bits the device offers (and
//! to the TAP offloads that back them).

use baton_qdev::{
    DeviceLabel, DeviceType, MacAddress, PropertyAccessError, PropertyKind, PropertySpec,
    ResolvedProperties, TypeKind, VIRTIO_DEVICE,
};
use thiserror::Error;

/// The most queue pairs a device can have: the kernel's limit of queues per
/// multi-queue TAP interface (`MAX_TAP_QUEUES`).
pub const MAX_QUEUE_PAIRS: i64 = 256;

/// The `virtio-net-tap` device type.
pub static VIRTIO_NET_TAP: DeviceType = DeviceType {
    name: "virtio-net-tap",
    parent: Some(&VIRTIO_DEVICE),
    kind: TypeKind::Device,
    doc: "virtio-net device backed by a host TAP interface",
    properties: PROPERTIES,
};

static PROPERTIES: &[PropertySpec] = &[
    PropertySpec::new(
        "ifname",
        PropertyKind::Str,
        "Host TAP interface to attach to (opened with IFF_TAP|IFF_NO_PI|IFF_VNET_HDR|\
         IFF_MULTI_QUEUE, created if missing).",
    )
    .required(),
    PropertySpec::new(
        "queues",
        PropertyKind::int(1, MAX_QUEUE_PAIRS),
        "Queue pairs (rx+tx): one TAP queue fd per pair (the TAP is always opened with \
         IFF_MULTI_QUEUE, so a second VMM can attach during a live update).",
    )
    .default_int(1),
    PropertySpec::new(
        "mq",
        PropertyKind::Bool,
        "Offer VIRTIO_NET_F_MQ and the control queue so the guest can use more than one \
         queue pair; queues>1 requires it.",
    )
    .default_bool(true),
    PropertySpec::new(
        "mac",
        PropertyKind::Mac,
        "Guest MAC address, offered with VIRTIO_NET_F_MAC; unset: the guest picks its own.",
    ),
    PropertySpec::new(
        "queue-size",
        PropertyKind::int(64, 1024).power_of_two(),
        "Descriptors per virtqueue (the maximum the device advertises).",
    )
    .default_int(256),
    PropertySpec::new(
        "mrg-rxbuf",
        PropertyKind::Bool,
        "Offer VIRTIO_NET_F_MRG_RXBUF: a received frame may span several rx buffers.",
    )
    .default_bool(true),
    PropertySpec::new(
        "csum",
        PropertyKind::Bool,
        "Offer VIRTIO_NET_F_CSUM: the guest may send frames with a partial checksum, \
         completed by the host (TAP offload TUN_F_CSUM).",
    )
    .default_bool(true),
    PropertySpec::new(
        "guest-csum",
        PropertyKind::Bool,
        "Offer VIRTIO_NET_F_GUEST_CSUM: frames from the host may carry a partial checksum.",
    )
    .default_bool(true),
    PropertySpec::new(
        "host-tso",
        PropertyKind::Bool,
        "Offer VIRTIO_NET_F_HOST_TSO4/6: the guest may send TCP segments up to 64 KiB \
         (TAP offloads TUN_F_TSO4/6); requires csum=on.",
    )
    .default_bool(true),
    PropertySpec::new(
        "guest-tso",
        PropertyKind::Bool,
        "Offer VIRTIO_NET_F_GUEST_TSO4/6: the host may pass coalesced TCP segments to the \
         guest; requires guest-csum=on.",
    )
    .default_bool(true),
    PropertySpec::new(
        "backend-transfer",
        PropertyKind::Bool,
        "On local live update, hand the open TAP fds to the new VMM instead of reopening \
         the interface (also needs the migration capability backend-transfer).",
    )
    .default_bool(true),
    PropertySpec::new(
        "early-setup",
        PropertyKind::Bool,
        "Send the queue layout during the migration setup phase so the destination \
         prepares queues and TAP before switchover.",
    )
    .default_bool(true),
];

/// The `virtio-net-tap` type, for registering in the VMM's `DeviceRegistry`.
pub fn device_type() -> &'static DeviceType {
    &VIRTIO_NET_TAP
}

/// A `virtio-net-tap` device's configuration, read once from its resolved properties.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VirtioNetTapConfig {
    /// Host TAP interface name.
    pub ifname: String,
    /// Queue pairs.
    pub queue_pairs: u16,
    /// Offer VIRTIO_NET_F_MQ and the control queue.
    pub mq: bool,
    /// Guest MAC, if fixed by the host.
    pub mac: Option<MacAddress>,
    /// Descriptors per virtqueue.
    pub queue_size: u16,
    /// Offer VIRTIO_NET_F_MRG_RXBUF.
    pub mrg_rxbuf: bool,
    /// Offer VIRTIO_NET_F_CSUM.
    pub csum: bool,
    /// Offer VIRTIO_NET_F_GUEST_CSUM.
    pub guest_csum: bool,
    /// Offer VIRTIO_NET_F_HOST_TSO4/6.
    pub host_tso: bool,
    /// Offer VIRTIO_NET_F_GUEST_TSO4/6.
    pub guest_tso: bool,
    /// Hand the TAP fds over on local live update.
    pub backend_transfer: bool,
    /// Send the queue layout in the setup phase.
    pub early_setup: bool,
}

/// Resolved properties that cannot be honoured together.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ConfigError {
    /// A property could not be read (a bug in this crate's schema or reader).
    #[error(transparent)]
    Access(#[from] PropertyAccessError),
    /// Two settings contradict each other.
    #[error("{device}: {reason}")]
    Conflict {
        /// The device.
        device: DeviceLabel,
        /// What contradicts what.
        reason: &'static str,
    },
}

impl VirtioNetTapConfig {
    /// Reads and cross-checks the configuration.
    pub fn from_resolved(props: &ResolvedProperties) -> Result<Self, ConfigError> {
        let config = VirtioNetTapConfig {
            ifname: props.require("ifname")?,
            queue_pairs: props.require("queues")?,
            mq: props.require("mq")?,
            mac: props.optional("mac")?,
            queue_size: props.require("queue-size")?,
            mrg_rxbuf: props.require("mrg-rxbuf")?,
            csum: props.require("csum")?,
            guest_csum: props.require("guest-csum")?,
            host_tso: props.require("host-tso")?,
            guest_tso: props.require("guest-tso")?,
            backend_transfer: props.require("backend-transfer")?,
            early_setup: props.require("early-setup")?,
        };
        let conflict = if config.queue_pairs > 1 && !config.mq {
            Some("queues>1 requires mq=on")
        } else if config.host_tso && !config.csum {
            Some("host-tso=on requires csum=on")
        } else if config.guest_tso && !config.guest_csum {
            Some("guest-tso=on requires guest-csum=on")
        } else if config.mac.is_some_and(|mac| mac.is_multicast()) {
            Some("mac must be a unicast address")
        } else {
            None
        };
        match conflict {
            Some(reason) => Err(ConfigError::Conflict {
                device: props.label(),
                reason,
            }),
            None => Ok(config),
        }
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
        assert_eq!(VIRTIO_NET_TAP.validate(), Ok(()));
        assert!(VIRTIO_NET_TAP.is_a("virtio-device"));
    }

    #[test]
    fn defaults() {
        let config =
            VirtioNetTapConfig::from_resolved(&resolve("virtio-net-tap,id=net0,ifname=tap0"))
                .unwrap();
        assert_eq!(config.ifname, "tap0");
        assert_eq!(config.queue_pairs, 1);
        assert_eq!(config.queue_size, 256);
        assert_eq!(config.mac, None);
        assert!(config.mq && config.csum && config.host_tso && config.mrg_rxbuf);
        assert!(config.backend_transfer && config.early_setup);
    }

    #[test]
    fn conflicts() {
        let err = |text: &str| {
            VirtioNetTapConfig::from_resolved(&resolve(text))
                .unwrap_err()
                .to_string()
        };
        assert_eq!(
            err("virtio-net-tap,id=net0,ifname=t,queues=2,mq=off"),
            "device 'net0' (virtio-net-tap): queues>1 requires mq=on"
        );
        assert_eq!(
            err("virtio-net-tap,id=net0,ifname=t,csum=off"),
            "device 'net0' (virtio-net-tap): host-tso=on requires csum=on"
        );
        assert_eq!(
            err("virtio-net-tap,id=net0,ifname=t,guest-csum=off"),
            "device 'net0' (virtio-net-tap): guest-tso=on requires guest-csum=on"
        );
        assert_eq!(
            err("virtio-net-tap,id=net0,ifname=t,mac=01:00:5e:00:00:01"),
            "device 'net0' (virtio-net-tap): mac must be a unicast address"
        );
        let ok = resolve("virtio-net-tap,id=net0,ifname=t,csum=off,host-tso=off,queues=16");
        assert_eq!(
            VirtioNetTapConfig::from_resolved(&ok).unwrap().queue_pairs,
            16
        );
    }
}
