//! Payloads of the device sections, described with `baton-vmstate` like any device state:
//! bounded, checked on the way in, and decodable by the analyzer from their schema.

use baton_vmstate::VmState;
use serde::{Deserialize, Serialize};

/// Largest device id.
pub const MAX_ID: u32 = 128;
/// Largest state blob of one device.
pub const MAX_BLOB: u32 = 32 << 20;

/// EARLY_STATE and DEVICE_STATE: one device's state at a version.
#[derive(VmState, Debug, Default, Clone, PartialEq)]
#[vmstate(name = "baton-migration/device-blob", version = 1)]
pub struct DeviceBlob {
    #[vmstate(max = 128)]
    pub device: String,
    pub version_id: u32,
    #[vmstate(max = 33554432)]
    pub data: Vec<u8>,
}

/// EARLY_FINAL: the early state at switchover, or "unchanged".
#[derive(VmState, Debug, Default, Clone, PartialEq)]
#[vmstate(name = "baton-migration/early-final", version = 1)]
pub struct EarlyFinal {
    #[vmstate(max = 128)]
    pub device: String,
    pub unchanged: bool,
    pub version_id: u32,
    #[vmstate(max = 33554432)]
    pub data: Vec<u8>,
}

#[derive(VmState, Debug, Default, Clone, PartialEq)]
#[vmstate(name = "baton-migration/fd-role", version = 1)]
pub struct FdRole {
    #[vmstate(max = 128)]
    pub role: String,
}

/// BACKEND: metadata and the roles of the fds that ride with the section, in order.
#[derive(VmState, Debug, Default, Clone, PartialEq)]
#[vmstate(name = "baton-migration/backend", version = 1)]
pub struct BackendBlob {
    #[vmstate(max = 128)]
    pub device: String,
    pub metadata_version: u32,
    #[vmstate(max = 1048576)]
    pub metadata: Vec<u8>,
    #[vmstate(max = 64)]
    pub roles: Vec<FdRole>,
}

/// RAM_MEMFDS: one fd per region rides with the section.
#[derive(VmState, Debug, Default, Clone, PartialEq)]
#[vmstate(name = "baton-migration/ram-memfds", version = 1)]
pub struct RamMemfds {
    pub regions: u32,
}

/// One device's schemas, as carried in the SCHEMA trailer.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DeviceSchema {
    pub id: String,
    pub vmsd: baton_vmstate::VmStateDescription,
    pub early_setup: Option<baton_vmstate::VmStateDescription>,
    pub backend_metadata: Option<baton_vmstate::VmStateDescription>,
}

/// The SCHEMA trailer: enough to decode every section of the stream without the code.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SchemaTrailer {
    pub devices: Vec<DeviceSchema>,
    pub sections: Vec<baton_vmstate::VmStateDescription>,
}

impl SchemaTrailer {
    pub fn section_schemas() -> Vec<baton_vmstate::VmStateDescription> {
        vec![
            DeviceBlob::vmsd().clone(),
            EarlyFinal::vmsd().clone(),
            BackendBlob::vmsd().clone(),
            RamMemfds::vmsd().clone(),
        ]
    }
}
