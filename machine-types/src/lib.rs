//! Machine types and their compat tables.
//!
//! Why: a migration stream produced by a newer baton must still load in an older one
//! for the same machine type, and a guest must see the same devices after an upgrade.
//! A machine version (`microvm-1.0`) therefore pins the property defaults that changed
//! after it was released, through compat entries ([`CompatEntry`]), in QEMU's
//! cumulative manner: a version applies its own array plus the arrays of every newer
//! version, in order from newest to its own, so the newest version has an empty array.
//! `microvm` is an alias of the newest version.
//!
//! Machine-level behaviour, including which stream features a version may use, is a
//! property of the family's machine schema (`microvm-machine`) and is pinned by compat
//! entries the same way.
//!
//! # Using it in a VMM
//!
//! ```
//! use baton_machine_types::MachineRegistry;
//! use baton_qdev::{DeviceRegistry, PropertyResolver};
//!
//! let machines = MachineRegistry::builtin();
//! let machine = machines.lookup("microvm-1.0")?;
//! if let Some(warning) = machine.deprecation_warning() {
//!     eprintln!("warning: {warning}");
//! }
//! let mut devices = DeviceRegistry::new();
//! devices.register(machine.properties_type())?;
//! // ... register every device crate's `device_type()` ...
//! let resolver = PropertyResolver::new(&devices).with_compat(machine.compat_settings());
//! let machine_props = machine.resolve_properties(&resolver, &[])?;
//! assert!(machine_props.properties.is_empty());
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! # Adding a machine version (for maintainers)
//!
//! Releasing `microvm-1.2` when `microvm-1.1` is the newest:
//!
//! 1. Add an empty array for the previous version if it has none, and an empty one for
//!    the new version: `MICROVM_1_2_COMPAT: &[CompatEntry] = &[]`.
//! 2. Append `MachineVersion { version: "1.2", deprecated: false, compat: MICROVM_1_2_COMPAT }`
//!    to `MICROVM.versions` (oldest first). The alias `microvm` now means 1.2.
//! 3. Whenever this release changes a default, add an entry restoring the old value to
//!    the array of the **previous** version (1.1). Through the cumulative rule, 1.0
//!    gets it too.
//! 4. `cargo test -p baton-machine-types` checks the table rules and every entry
//!    against every device schema.
//!
//! The same steps on a stand-alone family:
//!
//! ```
//! use baton_machine_types::*;
//! use baton_qdev::{DeviceType, TypeKind};
//!
//! static DEMO_MACHINE: DeviceType = DeviceType {
//!     name: "demo-machine", parent: None, kind: TypeKind::Machine,
//!     doc: "", properties: &[],
//! };
//! static DEMO_1_0: &[CompatEntry] = &[CompatEntry::new("virtio-net-tap", "early-setup", "off")];
//! // 1.2 turned backend transfer on by default: 1.1 (and so 1.0) keep it off.
//! static DEMO_1_1: &[CompatEntry] = &[CompatEntry::new("virtio-net-tap", "backend-transfer", "off")];
//! static DEMO_1_2: &[CompatEntry] = &[];
//! static DEMO: MachineFamily = MachineFamily {
//!     name: "demo",
//!     doc: "demo machine",
//!     properties: &DEMO_MACHINE,
//!     versions: &[
//!         MachineVersion { version: "1.0", deprecated: true, compat: DEMO_1_0 },
//!         MachineVersion { version: "1.1", deprecated: false, compat: DEMO_1_1 },
//!         MachineVersion { version: "1.2", deprecated: false, compat: DEMO_1_2 },
//!     ],
//! };
//!
//! let registry = MachineRegistry::new(&[&DEMO])?;
//! let applied: Vec<String> = registry
//!     .lookup("demo-1.0")?
//!     .compat_entries()
//!     .iter()
//!     .map(|a| format!("{}: {}", a.table, a.entry))
//!     .collect();
//! assert_eq!(applied, [
//!     "demo-1.1: virtio-net-tap.backend-transfer=off",
//!     "demo-1.0: virtio-net-tap.early-setup=off",
//! ]);
//! assert_eq!(registry.lookup("demo")?.name(), "demo-1.2");
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod check;
mod compat;
mod machine;
mod microvm;
mod registry;

pub use check::{check_compat_tables, check_family, CompatCheckError, CompatProblem};
pub use compat::CompatEntry;
pub use machine::{AppliedCompat, MachineFamily, MachineInfo, MachineType, MachineVersion};
pub use microvm::{MICROVM, MICROVM_1_0_COMPAT, MICROVM_1_1_COMPAT, MICROVM_MACHINE};
pub use registry::{MachineRegistry, MachineTableError, UnknownMachine};
