//! Machine types and device properties (QEMU `qapi/machine.json`, `qapi/qom.json`),
//! with baton's property provenance.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{command, Command};

command!(
    /// `query-machines`: the machine types this VMM offers.
    QueryMachines, "query-machines", QueryMachinesArgs, Vec<MachineInfo>
);
command!(
    /// `device-list-properties`: the properties of a device type.
    DeviceListProperties, "device-list-properties", DeviceListPropertiesArgs,
    Vec<ObjectPropertyInfo>
);

/// Arguments of `query-machines`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct QueryMachinesArgs {
    /// Also list each machine's compat properties.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compat_props: Option<bool>,
}

/// One compat entry of a machine type (QEMU's `CompatProperty`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct CompatProperty {
    /// The driver (type name, possibly abstract, e.g. `virtio-device`).
    pub qom_type: String,
    /// The property.
    pub property: String,
    /// The value, as text.
    pub value: String,
}

/// One machine type (QEMU's `MachineInfo`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct MachineInfo {
    /// Versioned name, e.g. `microvm-1.1`.
    pub name: String,
    /// Unversioned alias, e.g. `microvm` for the latest version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alias: Option<String>,
    /// Whether it is the default machine.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub is_default: Option<bool>,
    /// Maximum vCPUs.
    pub cpu_max: u32,
    /// Whether vCPUs can be hot-plugged.
    pub hotpluggable_cpus: bool,
    /// Whether NUMA memory options are supported.
    pub numa_mem_supported: bool,
    /// Whether the machine type is deprecated.
    pub deprecated: bool,
    /// Default CPU model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_cpu_type: Option<String>,
    /// Default RAM backend id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_ram_id: Option<String>,
    /// Whether the machine supports ACPI.
    pub acpi: bool,
    /// The compat entries the machine applies (cumulative), when asked for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compat_props: Option<Vec<CompatProperty>>,
}

/// Arguments of `device-list-properties`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceListPropertiesArgs {
    /// The device type name, e.g. `virtio-net-tap`.
    pub typename: String,
}

/// The layer that set a property's value (the same JSON shape as baton-qdev's
/// `Provenance`): `{"layer": "default"}`,
/// `{"layer": "compat", "machine": "microvm-1.0", "table": "microvm-1.1"}`,
/// `{"layer": "global", "driver": "virtio-device"}`, `{"layer": "explicit"}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "layer", rename_all = "kebab-case")]
pub enum PropertyProvenance {
    /// The type's schema default.
    Default,
    /// A machine-type compat entry.
    Compat {
        /// The machine type in use.
        machine: String,
        /// The machine version whose compat array holds the entry.
        table: String,
    },
    /// A `--global DRIVER.PROP=VALUE`.
    Global {
        /// The driver the global named.
        driver: String,
    },
    /// An explicit `--device` option.
    Explicit,
}

/// One property (QEMU's `ObjectPropertyInfo`) plus baton's provenance members, which
/// QEMU clients ignore.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct ObjectPropertyInfo {
    /// Property name.
    pub name: String,
    /// Type name (`bool`, `uint32`, `str`, ...).
    #[serde(rename = "type")]
    pub type_name: String,
    /// Human-readable description.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// The type's default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_value: Option<Value>,
    /// baton: the value in effect for this VMM's machine type and `--global`s, which
    /// differs from `default-value` when a compat entry or a global applies.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<Value>,
    /// baton: which layer set `value`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provenance: Option<PropertyProvenance>,
}
