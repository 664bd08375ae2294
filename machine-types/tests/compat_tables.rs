//! Every compat entry of every machine version, checked against the property schemas of
//! all baton devices; plus the resolution of real devices on real machine versions.

use baton_machine_types::*;
use baton_qdev::{
    DeviceRegistry, DeviceSpec, DeviceType, GlobalProperty, PropertyResolver, PropertyValue,
    Provenance, TypeKind,
};

/// Every baton device type. A new device crate goes here (and into this crate's
/// dev-dependencies) so its schema takes part in the compat-table check.
fn all_baton_devices() -> DeviceRegistry {
    let types: [&'static DeviceType; 2] = [
        baton_virtio_net_tap::device_type(),
        baton_vhost_user_blk::device_type(),
    ];
    match DeviceRegistry::with_types(types) {
        Ok(registry) => registry,
        Err(error) => panic!("a baton device schema is invalid: {error}"),
    }
}

#[test]
fn every_shipped_compat_entry_matches_the_device_schemas() {
    if let Err(error) = check_compat_tables(MachineRegistry::builtin(), &all_baton_devices()) {
        panic!("{error}");
    }
}

static EMPTY_MACHINE: DeviceType = DeviceType {
    name: "broken-machine",
    parent: None,
    kind: TypeKind::Machine,
    doc: "",
    properties: &[],
};

static BROKEN_1_0: &[CompatEntry] = &[
    CompatEntry::new("virtio-net-tap", "backend-transfer", "off"),
    CompatEntry::new("virtio-net-tab", "backend-transfer", "off"),
    CompatEntry::new("vfio-user-pci", "backend-transfer", "off").optional(),
    CompatEntry::new("virtio-net-tap", "backend-transfer", "on"),
];
static BROKEN_1_1: &[CompatEntry] = &[
    CompatEntry::new("vhost-user-blk", "num-queus", "1"),
    CompatEntry::new("virtio-net-tap", "queues", "0"),
    CompatEntry::new("virtio-device", "backend-transfer", "maybe"),
    CompatEntry::new("virtio-device", "early-setup", "off"),
    CompatEntry::new("virtio-device", "frobnicate", "on"),
    CompatEntry::new("vhost-user-blk", "queue-size", "100").optional(),
    CompatEntry::new("broken-machine", "stream-footer", "off"),
];
static BROKEN: MachineFamily = MachineFamily {
    name: "broken",
    doc: "",
    properties: &EMPTY_MACHINE,
    versions: &[
        MachineVersion {
            version: "1.0",
            deprecated: false,
            compat: BROKEN_1_0,
        },
        MachineVersion {
            version: "1.1",
            deprecated: false,
            compat: BROKEN_1_1,
        },
        MachineVersion {
            version: "1.2",
            deprecated: false,
            compat: &[],
        },
    ],
};

#[test]
fn the_checker_fails_on_a_bad_table_naming_machine_entry_and_reason() {
    let machines = MachineRegistry::new(&[&MICROVM, &BROKEN]).unwrap();
    let error = check_compat_tables(&machines, &all_baton_devices()).unwrap_err();
    let expected = "\
8 compat entries do not match the device schemas:
  broken-1.0: compat entry virtio-net-tab.backend-transfer=off: no device type 'virtio-net-tab' is registered (known: broken-machine (machine), vhost-user-blk, virtio-device (abstract), virtio-net-tap); mark the entry optional if a VMM may not link that device
  broken-1.0: compat entry virtio-net-tap.backend-transfer=on: the array sets this property twice; keep one entry
  broken-1.1: compat entry vhost-user-blk.num-queus=1: 'vhost-user-blk' has no property 'num-queus' (known: backend-transfer, config-wce, num-queues, queue-size, socket)
  broken-1.1: compat entry virtio-net-tap.queues=0: value '0' is invalid for 'virtio-net-tap.queues': 0 is out of range 1..=256
  broken-1.1: compat entry virtio-device.backend-transfer=maybe: value 'maybe' is invalid for 'virtio-device.backend-transfer': expected on/off, true/false or yes/no
  broken-1.1: compat entry virtio-device.frobnicate=on: 'virtio-device' has no property 'frobnicate' (known: backend-transfer, config-wce, csum, early-setup, guest-csum, guest-tso, host-tso, ifname, mac, mq, mrg-rxbuf, num-queues, queue-size, queues, socket)
  broken-1.1: compat entry vhost-user-blk.queue-size=100 (optional): value '100' is invalid for 'vhost-user-blk.queue-size': 100 is not a power of two
  broken-1.1: compat entry broken-machine.stream-footer=off: 'broken-machine' has no property 'stream-footer' (known: none)
";
    // The valid entries and the optional entry for an absent device pass.
    assert_eq!(format!("{error}\n"), expected);
    assert_eq!(error.problems.len(), 8);
}

#[test]
fn real_devices_on_microvm_1_0_get_compat_values_with_provenance() {
    let machines = MachineRegistry::builtin();
    let devices = all_baton_devices();
    let machine = machines.lookup("microvm-1.0").unwrap();
    let mut resolver = PropertyResolver::new(&devices).with_compat(machine.compat_settings());

    let net0 = resolver
        .resolve(&DeviceSpec::parse("virtio-net-tap,id=net0,ifname=tap0").unwrap())
        .unwrap();
    for property in ["backend-transfer", "early-setup"] {
        assert_eq!(net0.value(property), Some(&PropertyValue::Bool(false)));
        assert_eq!(
            net0.provenance(property).unwrap().to_string(),
            "compat microvm-1.0"
        );
    }
    let disk0 = resolver
        .resolve(&DeviceSpec::parse("vhost-user-blk,id=disk0,socket=/run/b.sock").unwrap())
        .unwrap();
    assert_eq!(
        disk0.provenance("backend-transfer").unwrap().to_string(),
        "compat microvm-1.0"
    );

    // A global on the abstract parent beats compat; an explicit option beats both.
    resolver
        .add_global(GlobalProperty::parse("virtio-device.backend-transfer=on").unwrap())
        .unwrap();
    let net0 = resolver
        .resolve(&DeviceSpec::parse("virtio-net-tap,id=net0,ifname=tap0,early-setup=on").unwrap())
        .unwrap();
    assert_eq!(
        net0.value("backend-transfer"),
        Some(&PropertyValue::Bool(true))
    );
    assert_eq!(
        net0.provenance("backend-transfer"),
        Some(&Provenance::Global {
            driver: "virtio-device".into()
        })
    );
    assert_eq!(net0.provenance("early-setup"), Some(&Provenance::Explicit));

    // microvm (= 1.1) applies nothing: defaults are on.
    let latest = machines.lookup("microvm").unwrap();
    let resolver = PropertyResolver::new(&devices).with_compat(latest.compat_settings());
    let help = resolver.describe("virtio-net-tap").unwrap();
    assert_eq!(
        help.value("backend-transfer"),
        Some(&PropertyValue::Bool(true))
    );
    assert_eq!(
        help.provenance("backend-transfer"),
        Some(&Provenance::Default)
    );
}
