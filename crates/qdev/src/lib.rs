//! Device types and their typed properties, resolved in layers with provenance.
//!
//! Why this crate exists: a device's configuration decides what its migration stream
//! looks like, so it must be typed, introspectable and reproducible. A value that
//! differs between the source and destination VMM must be explainable by where it came
//! from. baton therefore resolves every property through fixed layers (later wins):
//!
//! 1. the type default, from the device's declarative schema ([`PropertySpec`]);
//! 2. the machine type's compat entries ([`CompatSetting`], produced by
//!    `baton-machine-types`), which pin old behaviour for old machine versions;
//! 3. `--global DRIVER.PROP=VALUE` ([`GlobalProperty`]);
//! 4. explicit `--device TYPE,id=ID,PROP=VALUE` options ([`DeviceSpec`]).
//!
//! and records the layer that set each value ([`Provenance`]). Compat entries and
//! globals may name an abstract parent (`virtio-device`) and then reach every subtype
//! that has the property.
//!
//! # For a VMM builder
//!
//! ```
//! use baton_qdev::*;
//!
//! // Normally each device crate exposes `device_type()`; here a small one inline.
//! static NIC: DeviceType = DeviceType {
//!     name: "test-nic",
//!     parent: Some(&VIRTIO_DEVICE),
//!     kind: TypeKind::Device,
//!     doc: "A test NIC",
//!     properties: &[
//!         PropertySpec::new("queues", PropertyKind::int(1, 16), "Queue pairs.").default_int(1),
//!         PropertySpec::new("backend-transfer", PropertyKind::Bool, "Hand fds over.")
//!             .default_bool(true),
//!     ],
//! };
//!
//! let registry = DeviceRegistry::with_types([&NIC])?;
//! // Compat settings come from baton-machine-types (`MachineType::compat_settings`).
//! let compat = [CompatSetting {
//!     machine: "microvm-1.0".into(),
//!     table: "microvm-1.0".into(),
//!     driver: "test-nic".into(),
//!     property: "backend-transfer".into(),
//!     value: "off".into(),
//!     optional: false,
//! }];
//! let mut resolver = PropertyResolver::new(&registry).with_compat(compat);
//! resolver.add_global("test-nic.queues=2".parse()?)?;
//!
//! let net0 = resolver.resolve(&"test-nic,id=net0,queues=4".parse()?)?;
//! assert_eq!(net0.require::<u16>("queues")?, 4);
//! assert_eq!(net0.provenance("queues").unwrap().to_string(), "explicit");
//! assert_eq!(net0.provenance("backend-transfer").unwrap().to_string(), "compat microvm-1.0");
//!
//! // `--device test-nic,help` and QMP device-list-properties:
//! let help = resolver.describe("test-nic")?;
//! assert!(help.render_help().contains("(compat microvm-1.0)"));
//! let _json = serde_json::to_string(&help)?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! The `Migratable` trait also belongs to this crate's concern (a device's identity);
//! it is kept in its own module.

mod access;
mod cli;
mod device_type;
mod error;
mod help;
mod migratable;
mod registry;
mod resolve;
mod spec;
mod value;

pub use access::{FromPropertyValue, PropertyAccessError};
pub use cli::{DeviceSpec, GlobalProperty};
pub use device_type::{DeviceType, SchemaError, TypeKind, VIRTIO_DEVICE};
pub use error::{DeviceLabel, InvalidValue, PropertyError, UnknownProperty};
pub use migratable::{
    BackendHandoff, BackendTransfer, DeviceMigrationError, EarlyOutcome, EarlySetup, HandoffFd,
    Hook, Migratable, ReceivedBackend,
};
pub use registry::DeviceRegistry;
pub use resolve::{
    CompatSetting, PropertyResolver, Provenance, ResolvedProperties, ResolvedProperty,
};
pub use spec::{PropertyDefault, PropertyKind, PropertySpec};
pub use value::{parse_bool, parse_int, parse_size, MacAddress, ParseValueError, PropertyValue};
