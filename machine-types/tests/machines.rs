//! The machine registry: cumulative compat, aliases, deprecation, listing, table rules,
//! and machine-level properties.

use baton_machine_types::*;
use baton_qdev::{
    DeviceRegistry, GlobalProperty, PropertyKind, PropertyResolver, PropertySpec, PropertyValue,
    Provenance, TypeKind,
};

static TOY_MACHINE: baton_qdev::DeviceType = baton_qdev::DeviceType {
    name: "toy-machine",
    parent: None,
    kind: TypeKind::Machine,
    doc: "",
    properties: &[PropertySpec::new(
        "stream-footer",
        PropertyKind::Bool,
        "End the stream with the JSON schema of every device.",
    )
    .default_bool(true)],
};

static TOY_1_0: &[CompatEntry] = &[
    CompatEntry::new("virtio-net-tap", "queues", "1"),
    CompatEntry::new("toy-machine", "stream-footer", "off"),
];
static TOY_1_1: &[CompatEntry] = &[
    CompatEntry::new("virtio-net-tap", "queues", "2"),
    CompatEntry::new("virtio-device", "backend-transfer", "off"),
];
static TOY_2_0: &[CompatEntry] = &[];

static TOY: MachineFamily = MachineFamily {
    name: "toy",
    doc: "toy machine",
    properties: &TOY_MACHINE,
    versions: &[
        MachineVersion {
            version: "1.0",
            deprecated: true,
            compat: TOY_1_0,
        },
        MachineVersion {
            version: "1.1",
            deprecated: false,
            compat: TOY_1_1,
        },
        MachineVersion {
            version: "2.0",
            deprecated: false,
            compat: TOY_2_0,
        },
    ],
};

fn applied(machine: &MachineType) -> Vec<String> {
    machine
        .compat_entries()
        .iter()
        .map(|a| format!("{}: {}", a.table, a.entry))
        .collect()
}

#[test]
fn shipped_microvm_versions_apply_their_cumulative_sets() {
    let machines = MachineRegistry::builtin();
    let v1_0 = machines.lookup("microvm-1.0").unwrap();
    assert_eq!(
        applied(&v1_0),
        [
            "microvm-1.0: virtio-net-tap.backend-transfer=off",
            "microvm-1.0: virtio-net-tap.early-setup=off",
            "microvm-1.0: vhost-user-blk.backend-transfer=off",
        ]
    );
    let v1_1 = machines.lookup("microvm-1.1").unwrap();
    assert!(v1_1.compat_entries().is_empty());
    assert!(v1_1.compat_settings().is_empty());
}

#[test]
fn a_version_applies_its_own_array_and_every_newer_one_newest_first() {
    let machines = MachineRegistry::new(&[&TOY]).unwrap();
    assert_eq!(
        applied(&machines.lookup("toy-1.0").unwrap()),
        [
            "toy-1.1: virtio-net-tap.queues=2",
            "toy-1.1: virtio-device.backend-transfer=off",
            "toy-1.0: virtio-net-tap.queues=1",
            "toy-1.0: toy-machine.stream-footer=off",
        ]
    );
    assert_eq!(
        applied(&machines.lookup("toy-1.1").unwrap()),
        [
            "toy-1.1: virtio-net-tap.queues=2",
            "toy-1.1: virtio-device.backend-transfer=off",
        ]
    );
    assert!(applied(&machines.lookup("toy-2.0").unwrap()).is_empty());

    let settings = machines.lookup("toy-1.0").unwrap().compat_settings();
    assert_eq!(settings[0].machine, "toy-1.0");
    assert_eq!(settings[0].table, "toy-1.1");
    assert_eq!(settings[2].table, "toy-1.0");
}

#[test]
fn alias_resolves_to_the_newest_version() {
    let machines = MachineRegistry::builtin();
    assert_eq!(machines.lookup("microvm").unwrap().name(), "microvm-1.1");
    assert!(machines.lookup("microvm").unwrap().is_latest());
    assert_eq!(machines.default_machine().name(), "microvm-1.1");
    let toy = MachineRegistry::new(&[&TOY]).unwrap();
    assert_eq!(toy.lookup("toy").unwrap().name(), "toy-2.0");
}

#[test]
fn deprecation_flag() {
    let machines = MachineRegistry::new(&[&TOY]).unwrap();
    let old = machines.lookup("toy-1.0").unwrap();
    assert!(old.is_deprecated());
    assert_eq!(
        old.deprecation_warning().unwrap(),
        "machine type 'toy-1.0' is deprecated; use 'toy' (currently toy-2.0)"
    );
    assert!(!machines.lookup("toy-1.1").unwrap().is_deprecated());
    assert_eq!(
        machines.lookup("toy-1.1").unwrap().deprecation_warning(),
        None
    );
    for machine in MachineRegistry::builtin().machines() {
        assert!(!machine.is_deprecated(), "{}", machine.name());
    }
}

#[test]
fn unknown_machine_error_lists_known_names() {
    let err = MachineRegistry::builtin()
        .lookup("microvm-2.0")
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "unknown machine type 'microvm-2.0'; known machine types: \
         microvm (alias of microvm-1.1), microvm-1.0, microvm-1.1"
    );
}

#[test]
fn listing() {
    let machines = MachineRegistry::new(&[&MICROVM, &TOY]).unwrap();
    let list = machines.list();
    let names: Vec<_> = list.iter().map(|m| m.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "microvm-1.1",
            "microvm-1.0",
            "toy-2.0",
            "toy-1.1",
            "toy-1.0"
        ]
    );
    assert_eq!(list[0].alias.as_deref(), Some("microvm"));
    assert!(list[0].is_default);
    assert!(list[1].alias.is_none() && !list[1].is_default);
    assert!(list[4].deprecated);
    assert_eq!(
        machines.render_list(),
        "Machine types:
  microvm-1.1  virtio-mmio machine with PVH boot, no PCI and no ACPI (alias microvm, default)
  microvm-1.0  virtio-mmio machine with PVH boot, no PCI and no ACPI
  toy-2.0      toy machine (alias toy)
  toy-1.1      toy machine
  toy-1.0      toy machine (deprecated)
"
    );
    let json = serde_json::to_value(&list[0]).unwrap();
    assert_eq!(
        json,
        serde_json::json!({
            "name": "microvm-1.1", "alias": "microvm", "is-default": true,
            "deprecated": false, "doc": MICROVM.doc
        })
    );
}

#[test]
fn table_rules() {
    static NEWEST_WITH_ENTRIES: MachineFamily = MachineFamily {
        name: "bad",
        doc: "",
        properties: &TOY_MACHINE,
        versions: &[MachineVersion {
            version: "1.0",
            deprecated: false,
            compat: TOY_1_0,
        }],
    };
    assert_eq!(
        MachineRegistry::new(&[&NEWEST_WITH_ENTRIES])
            .unwrap_err()
            .to_string(),
        "bad-1.0 is the newest version, so its compat array must be empty; an entry that \
         restores old behaviour goes in the array of the last version that had it"
    );

    static OUT_OF_ORDER: MachineFamily = MachineFamily {
        name: "bad",
        doc: "",
        properties: &TOY_MACHINE,
        versions: &[
            MachineVersion {
                version: "1.10",
                deprecated: false,
                compat: &[],
            },
            MachineVersion {
                version: "1.9",
                deprecated: false,
                compat: &[],
            },
        ],
    };
    assert_eq!(
        MachineRegistry::new(&[&OUT_OF_ORDER])
            .unwrap_err()
            .to_string(),
        "machine family 'bad': versions must be listed oldest first, but 1.10 comes before 1.9"
    );

    static NO_VERSIONS: MachineFamily = MachineFamily {
        name: "bad",
        doc: "",
        properties: &TOY_MACHINE,
        versions: &[],
    };
    assert_eq!(
        MachineRegistry::new(&[&NO_VERSIONS]).unwrap_err(),
        MachineTableError::NoVersions { family: "bad" }
    );
    assert_eq!(
        MachineRegistry::new(&[&TOY, &TOY]).unwrap_err().to_string(),
        "machine type name 'toy' is defined twice"
    );
    assert_eq!(
        MachineRegistry::new(&[]).unwrap_err(),
        MachineTableError::NoFamilies
    );
}

#[test]
fn machine_properties_are_pinned_by_compat_like_device_properties() {
    let machines = MachineRegistry::new(&[&TOY]).unwrap();
    let resolve = |name: &str, globals: &[&str], explicit: &[(String, String)]| {
        let machine = machines.lookup(name).unwrap();
        let mut devices = DeviceRegistry::new();
        devices.register(machine.properties_type()).unwrap();
        devices
            .register(baton_virtio_net_tap::device_type())
            .unwrap();
        let mut resolver = PropertyResolver::new(&devices).with_compat(machine.compat_settings());
        for global in globals {
            resolver
                .add_global(GlobalProperty::parse(global).unwrap())
                .unwrap();
        }
        machine.resolve_properties(&resolver, explicit).unwrap()
    };

    let new = resolve("toy", &[], &[]);
    assert_eq!(new.value("stream-footer"), Some(&PropertyValue::Bool(true)));
    assert_eq!(new.provenance("stream-footer"), Some(&Provenance::Default));

    let old = resolve("toy-1.0", &[], &[]);
    assert_eq!(
        old.value("stream-footer"),
        Some(&PropertyValue::Bool(false))
    );
    assert_eq!(
        old.provenance("stream-footer").unwrap().to_string(),
        "compat toy-1.0"
    );

    let forced = resolve("toy-1.0", &["toy-machine.stream-footer=on"], &[]);
    assert_eq!(
        forced.value("stream-footer"),
        Some(&PropertyValue::Bool(true))
    );
    let explicit = resolve(
        "toy-1.0",
        &["toy-machine.stream-footer=on"],
        &[("stream-footer".into(), "off".into())],
    );
    assert_eq!(
        explicit.provenance("stream-footer"),
        Some(&Provenance::Explicit)
    );
}
