//! Round trips of every field kind, and the JSON views of schema and data.

use baton_vmstate::{decode_to_json, FieldKind, VmState, VmStateDescription, VmStateError};
use serde_json::json;

#[derive(VmState, Debug, Default, Clone, PartialEq)]
#[vmstate(name = "inner", version = 3, minimum_version = 1)]
struct Inner {
    a: u16,
    #[vmstate(since = 3)]
    b: i64,
}

#[derive(VmState, Debug, Default, Clone, PartialEq)]
#[vmstate(name = "extra", version = 1)]
struct Extra {
    #[vmstate(max = 16)]
    tag: String,
}

#[derive(VmState, Debug, Default, Clone, PartialEq)]
#[vmstate(name = "everything", version = 2, early_setup)]
struct Everything {
    flag: bool,
    u8_: u8,
    u16_: u16,
    u32_: u32,
    u64_: u64,
    i8_: i8,
    i16_: i16,
    i32_: i32,
    i64_: i64,
    mac: [u8; 6],
    matrix: [[u16; 2]; 3],
    nested: Inner,
    nested_array: [Inner; 2],
    #[vmstate(max = 8)]
    bytes: Vec<u8>,
    #[vmstate(max = 4)]
    inners: Vec<Inner>,
    #[vmstate(max = 4)]
    arrays: Vec<[u32; 2]>,
    #[vmstate(max = 32)]
    name: String,
    #[vmstate(unused = 3)]
    _was_pad: (),
    #[vmstate(since = 2, default = 77)]
    newer: u32,
    #[vmstate(subsection)]
    extra: Option<Extra>,
    #[vmstate(skip)]
    runtime_only: u64,
}

fn sample() -> Everything {
    Everything {
        flag: true,
        u8_: 0xfe,
        u16_: 0xbeef,
        u32_: 0xdead_beef,
        u64_: u64::MAX - 1,
        i8_: -3,
        i16_: -300,
        i32_: i32::MIN,
        i64_: -1,
        mac: [0x52, 0x54, 0, 0x12, 0x34, 0x56],
        matrix: [[1, 2], [3, 4], [5, 6]],
        nested: Inner { a: 9, b: -9 },
        nested_array: [Inner { a: 1, b: 2 }, Inner { a: 3, b: 4 }],
        bytes: vec![1, 2, 3],
        inners: vec![Inner { a: 5, b: 6 }],
        arrays: vec![[7, 8], [9, 10]],
        name: "net0 ✓".into(),
        _was_pad: (),
        newer: 5,
        extra: Some(Extra { tag: "rss".into() }),
        runtime_only: 0,
    }
}

#[test]
fn every_field_kind_round_trips() {
    let s = sample();
    let blob = s.save();
    assert_eq!(Everything::load(&blob, 2).unwrap(), s);

    let mut no_sub = s.clone();
    no_sub.extra = None;
    assert_eq!(Everything::load(&no_sub.save(), 2).unwrap(), no_sub);
}

#[test]
fn skipped_field_is_not_on_the_wire_and_takes_its_default() {
    let mut s = sample();
    s.runtime_only = 42;
    let blob = s.save();
    assert_eq!(blob, sample().save());
    assert_eq!(Everything::load(&blob, 2).unwrap().runtime_only, 0);
}

#[test]
fn unused_bytes_are_zero_and_skipped() {
    let s = sample();
    let blob = s.save();
    let json = decode_to_json(Everything::vmsd(), &blob, 2).unwrap();
    assert!(json.get("_was_pad").is_none());
    // Corrupting the unused bytes changes nothing: they are skipped.
    let name_end = blob
        .windows(s.name.len())
        .position(|w| w == s.name.as_bytes())
        .unwrap()
        + s.name.len();
    assert_eq!(&blob[name_end..name_end + 3], &[0, 0, 0]);
    let mut b2 = blob.clone();
    b2[name_end..name_end + 3].copy_from_slice(&[9, 9, 9]);
    assert_eq!(Everything::load(&b2, 2).unwrap(), s);
}

#[test]
fn description_is_complete_and_round_trips_through_json() {
    let d: &VmStateDescription = Everything::vmsd();
    assert_eq!(d.name, "everything");
    assert_eq!(
        (d.version_id, d.minimum_version_id, d.early_setup),
        (2, 1, true)
    );
    let names: Vec<_> = d.fields.iter().map(|f| f.name.as_ref()).collect();
    assert_eq!(
        names.len(),
        19,
        "skip and subsection fields are not plain fields"
    );
    assert!(!names.contains(&"runtime_only"));
    let newer = d.fields.iter().find(|f| f.name == "newer").unwrap();
    assert_eq!((newer.since, &newer.kind), (2, &FieldKind::U32));
    assert_eq!(d.subsections.len(), 1);
    assert_eq!(d.subsections[0].name, "extra");
    assert_eq!(d.subsections[0].vmsd.name, "extra");

    let text = d.to_json_pretty();
    let back = VmStateDescription::from_json(&text).unwrap();
    assert_eq!(&back, d);
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["fields"][10]["type"], "array");
    assert_eq!(v["fields"][10]["elem"]["len"], 2);
    assert_eq!(v["fields"][13]["type"], "vec");
    assert_eq!(v["fields"][13]["max_len"], 8);
    assert_eq!(v["fields"][11]["vmsd"]["name"], "inner");
}

#[test]
fn decode_to_json_uses_only_the_description() {
    let blob = sample().save();
    // The parsed copy owns everything: nothing of the Rust type is used.
    let d = VmStateDescription::from_json(&Everything::vmsd().to_json_pretty()).unwrap();
    let v = decode_to_json(&d, &blob, 2).unwrap();
    assert_eq!(v["flag"], true);
    assert_eq!(v["u64_"], json!(u64::MAX - 1));
    assert_eq!(v["i32_"], json!(i32::MIN));
    assert_eq!(v["mac"], json!([0x52, 0x54, 0, 0x12, 0x34, 0x56]));
    assert_eq!(v["matrix"], json!([[1, 2], [3, 4], [5, 6]]));
    assert_eq!(v["nested"], json!({"a": 9, "b": -9}));
    assert_eq!(v["inners"], json!([{"a": 5, "b": 6}]));
    assert_eq!(v["name"], "net0 ✓");
    assert_eq!(v["extra"], json!({"tag": "rss"}));

    // The same refusals as the typed codec, with the same text.
    let mut bad = blob.clone();
    bad[0] = 2;
    let typed = Everything::load(&bad, 2).unwrap_err();
    let untyped = decode_to_json(&d, &bad, 2).unwrap_err();
    assert_eq!(
        typed.to_string(),
        "flag: invalid bool byte 0x02 (at byte 0)"
    );
    assert_eq!(untyped.to_string(), typed.to_string());
}

#[test]
fn nested_struct_carries_its_own_version() {
    // A v1 Inner inside a stream: `b` is absent and defaults.
    #[derive(VmState, Debug, Default, PartialEq)]
    #[vmstate(name = "inner", version = 1)]
    struct InnerV1 {
        a: u16,
    }
    #[derive(VmState, Debug, Default, PartialEq)]
    #[vmstate(name = "holder", version = 1)]
    struct HolderV1 {
        x: InnerV1,
    }
    #[derive(VmState, Debug, Default, PartialEq)]
    #[vmstate(name = "holder", version = 1)]
    struct HolderV3 {
        x: Inner,
    }
    let old = HolderV1 {
        x: InnerV1 { a: 44 },
    }
    .save();
    let new = HolderV3::load(&old, 1).unwrap();
    assert_eq!(new.x, Inner { a: 44, b: 0 });
    // And the other way: the old reader refuses the newer nested version.
    let blob = HolderV3 {
        x: Inner { a: 1, b: 2 },
    }
    .save();
    let e = HolderV1::load(&blob, 1).unwrap_err();
    assert_eq!(
        e.to_string(),
        "x: version 3 is newer than the newest supported version 1 of \"inner\" (at byte 0)"
    );
}

#[test]
fn validate_errors_name_the_path() {
    #[derive(VmState, Debug, Default, PartialEq)]
    #[vmstate(name = "q", validate = check_q)]
    struct Q {
        size: u16,
        next_avail: u32,
    }
    fn check_q(q: &Q) -> Result<(), VmStateError> {
        if q.next_avail >= u32::from(q.size) {
            return Err(VmStateError::invalid(
                "next_avail",
                format!("{} exceeds size {}", q.next_avail, q.size),
            ));
        }
        Ok(())
    }
    #[derive(VmState, Debug, Default, PartialEq)]
    #[vmstate(name = "dev")]
    struct Dev {
        #[vmstate(max = 8)]
        queues: Vec<Q>,
    }
    let mut d = Dev {
        queues: (0..4)
            .map(|_| Q {
                size: 256,
                next_avail: 1,
            })
            .collect(),
    };
    d.queues[3].next_avail = 70000;
    let e = Dev::load(&d.save(), 1).unwrap_err();
    assert_eq!(
        e.to_string(),
        "queues[3].next_avail: 70000 exceeds size 256"
    );
}

#[test]
fn bounds_are_enforced_before_allocation() {
    #[derive(VmState, Debug, Default, PartialEq)]
    #[vmstate(name = "big")]
    struct Big {
        #[vmstate(max = 4)]
        v: Vec<u64>,
        #[vmstate(max = 3)]
        s: String,
    }
    // Length prefix u32::MAX with 4 bytes of input: refused, nothing allocated.
    let e = Big::load(&[0xff, 0xff, 0xff, 0xff], 1).unwrap_err();
    assert_eq!(
        e.to_string(),
        "v: length 4294967295 exceeds the maximum 4 (at byte 0)"
    );
    let blob = [1, 0, 0, 0, 7, 0, 0, 0, 0, 0, 0, 0, 4, 0, 0, 0, b'a'];
    let e = Big::load(&blob, 1).unwrap_err();
    assert_eq!(
        e.to_string(),
        "s: length 4 exceeds the maximum 3 (at byte 12)"
    );
    let blob = [
        1, 0, 0, 0, 7, 0, 0, 0, 0, 0, 0, 0, 2, 0, 0, 0, 0xc3, 0x28, 0,
    ];
    let e = Big::load(&blob, 1).unwrap_err();
    assert_eq!(e.to_string(), "s: invalid UTF-8 in string (at byte 16)");
    let blob = [2, 0, 0, 0, 7, 0, 0, 0];
    let e = Big::load(&blob, 1).unwrap_err();
    assert_eq!(
        e.to_string(),
        "v[0]: truncated: needs 8 more bytes, 4 left (at byte 4)"
    );
    let mut ok = Big {
        v: vec![1],
        s: "ab".into(),
    }
    .save();
    ok.push(0);
    let e = Big::load(&ok, 1).unwrap_err();
    assert_eq!(
        e.to_string(),
        "1 bytes left over after the state (at byte 19)"
    );
}
