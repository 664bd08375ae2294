//! Layered resolution: precedence, provenance, parent matching, errors, help and JSON.

use baton_qdev::*;

static NIC: DeviceType = DeviceType {
    name: "test-nic",
    parent: Some(&VIRTIO_DEVICE),
    kind: TypeKind::Device,
    doc: "Test NIC",
    properties: &[
        PropertySpec::new("queues", PropertyKind::int(1, 16), "Queue pairs.").default_int(1),
        PropertySpec::new("backend-transfer", PropertyKind::Bool, "Hand fds over.")
            .default_bool(true),
        PropertySpec::new("mac", PropertyKind::Mac, "Guest MAC."),
        PropertySpec::new("ifname", PropertyKind::Str, "Host interface.").required(),
    ],
};

static BLK: DeviceType = DeviceType {
    name: "test-blk",
    parent: Some(&VIRTIO_DEVICE),
    kind: TypeKind::Device,
    doc: "Test block device",
    properties: &[
        PropertySpec::new("backend-transfer", PropertyKind::Bool, "Hand fds over.")
            .default_bool(true),
        PropertySpec::new("buffer", PropertyKind::size(4096, 1 << 30), "Buffer size.")
            .default_size(1 << 20),
    ],
};

/// Not a virtio device, but has a property with the same name.
static SERIAL: DeviceType = DeviceType {
    name: "test-serial",
    parent: None,
    kind: TypeKind::Device,
    doc: "",
    properties: &[PropertySpec::new("backend-transfer", PropertyKind::Bool, "").default_bool(true)],
};

fn registry() -> DeviceRegistry {
    DeviceRegistry::with_types([&NIC, &BLK, &SERIAL]).expect("test schemas are valid")
}

fn compat(driver: &str, property: &str, value: &str) -> CompatSetting {
    CompatSetting {
        machine: "testvm-1.0".into(),
        table: "testvm-1.1".into(),
        driver: driver.into(),
        property: property.into(),
        value: value.into(),
        optional: false,
    }
}

fn net0(resolver: &PropertyResolver, extra: &str) -> ResolvedProperties {
    let spec = DeviceSpec::parse(&format!("test-nic,id=net0,ifname=tap0{extra}")).unwrap();
    resolver.resolve(&spec).unwrap()
}

fn compat_provenance() -> Provenance {
    Provenance::Compat {
        machine: "testvm-1.0".into(),
        table: "testvm-1.1".into(),
    }
}

#[test]
fn each_layer_beats_the_one_below() {
    let registry = registry();

    let plain = PropertyResolver::new(&registry);
    let props = net0(&plain, "");
    assert_eq!(props.value("queues"), Some(&PropertyValue::Int(1)));
    assert_eq!(props.provenance("queues"), Some(&Provenance::Default));

    let with_compat =
        PropertyResolver::new(&registry).with_compat([compat("test-nic", "queues", "2")]);
    let props = net0(&with_compat, "");
    assert_eq!(props.value("queues"), Some(&PropertyValue::Int(2)));
    assert_eq!(props.provenance("queues"), Some(&compat_provenance()));
    assert_eq!(
        props.provenance("queues").unwrap().to_string(),
        "compat testvm-1.0"
    );

    let mut with_global = with_compat.clone();
    with_global
        .add_global(GlobalProperty::parse("test-nic.queues=3").unwrap())
        .unwrap();
    let props = net0(&with_global, "");
    assert_eq!(props.value("queues"), Some(&PropertyValue::Int(3)));
    assert_eq!(props.provenance("queues").unwrap().to_string(), "global");

    let props = net0(&with_global, ",queues=4");
    assert_eq!(props.value("queues"), Some(&PropertyValue::Int(4)));
    assert_eq!(props.provenance("queues"), Some(&Provenance::Explicit));

    // Untouched properties keep their default and its provenance.
    assert_eq!(
        props.value("backend-transfer"),
        Some(&PropertyValue::Bool(true))
    );
    assert_eq!(
        props.provenance("backend-transfer"),
        Some(&Provenance::Default)
    );
    assert_eq!(props.value("mac"), None);
}

#[test]
fn later_entries_win_within_a_layer() {
    let registry = registry();
    let mut resolver = PropertyResolver::new(&registry).with_compat([
        compat("virtio-device", "backend-transfer", "off"),
        compat("test-nic", "backend-transfer", "on"),
    ]);
    let props = net0(&resolver, "");
    assert_eq!(
        props.value("backend-transfer"),
        Some(&PropertyValue::Bool(true))
    );
    resolver
        .add_global(GlobalProperty::new("test-nic", "queues", "5"))
        .unwrap();
    resolver
        .add_global(GlobalProperty::new("virtio-device", "queues", "6"))
        .unwrap();
    assert_eq!(
        net0(&resolver, "").value("queues"),
        Some(&PropertyValue::Int(6))
    );
}

#[test]
fn parent_entries_reach_every_subtype_that_has_the_property() {
    let registry = registry();
    let mut resolver = PropertyResolver::new(&registry).with_compat([compat(
        "virtio-device",
        "backend-transfer",
        "off",
    )]);
    // `queues` exists on test-nic only: test-blk silently lacks it.
    resolver
        .add_global(GlobalProperty::parse("virtio-device.queues=8").unwrap())
        .unwrap();

    let nic = net0(&resolver, "");
    assert_eq!(
        nic.value("backend-transfer"),
        Some(&PropertyValue::Bool(false))
    );
    assert_eq!(
        nic.provenance("backend-transfer"),
        Some(&compat_provenance())
    );
    assert_eq!(nic.value("queues"), Some(&PropertyValue::Int(8)));
    assert_eq!(
        nic.provenance("queues"),
        Some(&Provenance::Global {
            driver: "virtio-device".into()
        })
    );

    let blk = resolver
        .resolve(&DeviceSpec::parse("test-blk,id=disk0").unwrap())
        .unwrap();
    assert_eq!(
        blk.value("backend-transfer"),
        Some(&PropertyValue::Bool(false))
    );
    assert!(blk.get("queues").is_none());

    let serial = resolver
        .resolve(&DeviceSpec::parse("test-serial,id=ser0").unwrap())
        .unwrap();
    assert_eq!(
        serial.value("backend-transfer"),
        Some(&PropertyValue::Bool(true))
    );
    assert_eq!(
        serial.provenance("backend-transfer"),
        Some(&Provenance::Default)
    );
}

#[test]
fn optional_compat_entries_skip_missing_properties() {
    let registry = registry();
    let mut entry = compat("test-nic", "no-such-thing", "on");
    entry.optional = true;
    let resolver = PropertyResolver::new(&registry).with_compat([entry.clone()]);
    assert_eq!(
        net0(&resolver, "").value("queues"),
        Some(&PropertyValue::Int(1))
    );

    entry.optional = false;
    let resolver = PropertyResolver::new(&registry).with_compat([entry]);
    let err = resolver
        .resolve(&DeviceSpec::parse("test-nic,id=net0,ifname=t").unwrap())
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "device 'net0' (test-nic): unknown property 'no-such-thing=on' (compat testvm-1.0); \
         known properties: backend-transfer, ifname, mac, queues"
    );
}

#[test]
fn error_texts() {
    let registry = registry();
    let resolver = PropertyResolver::new(&registry);
    let err = |text: &str| {
        resolver
            .resolve(&DeviceSpec::parse(text).unwrap())
            .unwrap_err()
            .to_string()
    };

    assert_eq!(
        err("test-nix,id=net0"),
        "unknown device type 'test-nix'; known types: test-blk, test-nic, test-serial, \
         virtio-device (abstract)"
    );
    assert_eq!(
        err("virtio-device,id=v"),
        "device type 'virtio-device' cannot be created with --device: it is an abstract type"
    );
    assert_eq!(
        err("test-nic,id=net0,ifname=t,queus=4"),
        "device 'net0' (test-nic): unknown property 'queus=4' (explicit); \
         known properties: backend-transfer, ifname, mac, queues"
    );
    assert_eq!(
        err("test-nic,id=net0,ifname=t,queues=lots"),
        "device 'net0' (test-nic): invalid value 'lots' for property 'queues' (explicit): \
         expected an integer"
    );
    assert_eq!(
        err("test-nic,id=net0,ifname=t,queues=17"),
        "device 'net0' (test-nic): invalid value '17' for property 'queues' (explicit): \
         17 is out of range 1..=16"
    );
    assert_eq!(
        err("test-nic,id=net0,ifname=t,backend-transfer=maybe"),
        "device 'net0' (test-nic): invalid value 'maybe' for property 'backend-transfer' \
         (explicit): expected on/off, true/false or yes/no"
    );
    assert_eq!(
        err("test-nic,id=net0,ifname=t,mac=52:54:00"),
        "device 'net0' (test-nic): invalid value '52:54:00' for property 'mac' (explicit): \
         expected a MAC address such as 52:54:00:12:34:56"
    );
    assert_eq!(
        err("test-nic,id=net0"),
        "device 'net0' (test-nic): property 'ifname' is required"
    );
    assert_eq!(
        err("test-nic,id=net0,ifname=a,ifname=b"),
        "device 'net0' (test-nic): property 'ifname' is given twice"
    );

    let err = resolver
        .resolve(&DeviceSpec::parse("test-nic,ifname=a,queues=0").unwrap())
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "test-nic: invalid value '0' for property 'queues' (explicit): 0 is out of range 1..=16"
    );
    let PropertyError::InvalidValue(detail) = err else {
        panic!("expected InvalidValue, got {err:?}");
    };
    assert_eq!(detail.property, "queues");
    assert_eq!(detail.value, "0");
}

#[test]
fn global_errors_are_found_when_added() {
    let registry = registry();
    let mut resolver = PropertyResolver::new(&registry);
    let mut add = |text: &str| {
        resolver
            .add_global(GlobalProperty::parse(text).unwrap())
            .unwrap_err()
            .to_string()
    };
    assert_eq!(
        add("test-nik.queues=2"),
        "unknown device type 'test-nik'; known types: test-blk, test-nic, test-serial, \
         virtio-device (abstract)"
    );
    assert_eq!(
        add("test-blk.queues=2"),
        "test-blk: unknown property 'queues=2' (global); known properties: backend-transfer, buffer"
    );
    assert_eq!(
        add("virtio-device.bogus=1"),
        "virtio-device: unknown property 'bogus=1' (global); \
         known properties: backend-transfer, buffer, ifname, mac, queues"
    );
    assert_eq!(
        add("virtio-device.buffer=1M5"),
        "virtio-device: invalid value '1M5' for property 'buffer' (global): \
         expected a size in bytes, optionally with a suffix k, M, G or T (e.g. 4k, 2M, 1G)"
    );
    assert_eq!(
        add("test-blk.buffer=2G"),
        "test-blk: invalid value '2G' for property 'buffer' (global): size 2G is out of range 4K..=1G"
    );
}

#[test]
fn sizes_resolve_from_suffixes() {
    let registry = registry();
    let resolver = PropertyResolver::new(&registry);
    let blk = resolver
        .resolve(&DeviceSpec::parse("test-blk,id=d,buffer=64k").unwrap())
        .unwrap();
    assert_eq!(blk.require::<u64>("buffer").unwrap(), 65536);
    assert_eq!(blk.value("buffer").unwrap().to_string(), "64K");
}

#[test]
fn typed_access() {
    let registry = registry();
    let resolver = PropertyResolver::new(&registry);
    let props = net0(&resolver, ",mac=52:54:00:00:00:07,queues=3");
    assert_eq!(props.require::<u16>("queues").unwrap(), 3);
    assert!(props.require::<bool>("backend-transfer").unwrap());
    assert_eq!(props.require::<String>("ifname").unwrap(), "tap0");
    assert_eq!(
        props.optional::<MacAddress>("mac").unwrap(),
        Some(MacAddress([0x52, 0x54, 0, 0, 0, 7]))
    );
    assert_eq!(
        props.require::<bool>("queues").unwrap_err().to_string(),
        "device 'net0' (test-nic): property 'queues' is '3', not a bool"
    );
    assert_eq!(
        props.require::<u16>("nope").unwrap_err().to_string(),
        "device 'net0' (test-nic): property 'nope' does not exist"
    );
    let bare = ResolvedProperties::defaults(&NIC, Some("net1"));
    assert_eq!(
        bare.require::<String>("ifname").unwrap_err().to_string(),
        "device 'net1' (test-nic): property 'ifname' is unset"
    );
}

#[test]
fn help_lists_values_and_provenance() {
    let registry = registry();
    let mut resolver = PropertyResolver::new(&registry).with_compat([compat(
        "test-nic",
        "backend-transfer",
        "off",
    )]);
    resolver
        .add_global(GlobalProperty::parse("test-nic.queues=2").unwrap())
        .unwrap();
    let help = resolver.describe("test-nic").unwrap().render_help();
    let expected = "\
test-nic: Test NIC (a virtio-device)
  queues=<int 1..=16>      = 2           (global)
      Queue pairs.
  backend-transfer=<bool>  = off         (compat testvm-1.0)
      Hand fds over.
  mac=<mac>                = <unset>     (default)
      Guest MAC.
  ifname=<string>          = <required>  (default)
      Host interface.
";
    assert_eq!(help, expected);
    let abstract_help = resolver.describe("virtio-device").unwrap().render_help();
    assert_eq!(
        abstract_help,
        "virtio-device: Abstract parent of all virtio devices (abstract)\n  (no properties)\n"
    );
}

#[test]
fn resolved_set_serializes_to_json() {
    let registry = registry();
    let resolver = PropertyResolver::new(&registry).with_compat([compat(
        "test-nic",
        "backend-transfer",
        "off",
    )]);
    let props = net0(&resolver, ",queues=2");
    let json = serde_json::to_value(&props).unwrap();
    let expected = serde_json::json!({
        "driver": "test-nic",
        "id": "net0",
        "properties": [
            {"name": "queues", "type": "int", "min": 1, "max": 16, "default": 1,
             "doc": "Queue pairs.", "value": 2, "provenance": {"layer": "explicit"}},
            {"name": "backend-transfer", "type": "bool", "default": true,
             "doc": "Hand fds over.", "value": false,
             "provenance": {"layer": "compat", "machine": "testvm-1.0", "table": "testvm-1.1"}},
            {"name": "mac", "type": "mac", "doc": "Guest MAC.", "value": null,
             "provenance": {"layer": "default"}},
            {"name": "ifname", "type": "string", "required": true, "doc": "Host interface.",
             "value": "tap0", "provenance": {"layer": "explicit"}},
        ]
    });
    assert_eq!(json, expected);
}

#[test]
fn registry_rejects_a_second_type_with_a_taken_name() {
    static IMPOSTOR: DeviceType = DeviceType {
        name: "test-nic",
        parent: None,
        kind: TypeKind::Device,
        doc: "",
        properties: &[],
    };
    let mut registry = registry();
    registry
        .register(&NIC)
        .expect("re-registering the same type is a no-op");
    assert_eq!(
        registry.register(&IMPOSTOR).unwrap_err().to_string(),
        "device type 'test-nic' is registered twice by different definitions"
    );
}
