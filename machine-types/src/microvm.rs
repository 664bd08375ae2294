//! The `microvm` family: baton's virtio-mmio machine (PVH boot, no PCI, no ACPI).
//!
//! Each array says how that version differs from the next one; see the crate docs for
//! how to add a version.

use baton_qdev::{DeviceType, TypeKind};

use crate::compat::CompatEntry;
use crate::machine::{MachineFamily, MachineVersion};

/// Machine-level properties of `microvm`. None yet; stream features that change the
/// wire get a property here, with a compat entry turning them off for the versions
/// that predate them.
pub static MICROVM_MACHINE: DeviceType = DeviceType {
    name: "microvm-machine",
    parent: None,
    kind: TypeKind::Machine,
    doc: "Machine-level properties of the microvm machine",
    properties: &[],
};

/// microvm-1.0 predates backend transfer and early setup: devices reopen their
/// backends on the destination and send all state at switchover.
pub static MICROVM_1_0_COMPAT: &[CompatEntry] = &[
    CompatEntry::new("virtio-net-tap", "backend-transfer", "off"),
    CompatEntry::new("virtio-net-tap", "early-setup", "off"),
    CompatEntry::new("vhost-user-blk", "backend-transfer", "off"),
];

/// microvm-1.1 is the newest version: no entries.
pub static MICROVM_1_1_COMPAT: &[CompatEntry] = &[];

/// The `microvm` family. `microvm` is an alias of its newest version.
pub static MICROVM: MachineFamily = MachineFamily {
    name: "microvm",
    doc: "virtio-mmio machine with PVH boot, no PCI and no ACPI",
    properties: &MICROVM_MACHINE,
    versions: &[
        MachineVersion {
            version: "1.0",
            deprecated: false,
            compat: MICROVM_1_0_COMPAT,
        },
        MachineVersion {
            version: "1.1",
            deprecated: false,
            compat: MICROVM_1_1_COMPAT,
        },
    ],
};
