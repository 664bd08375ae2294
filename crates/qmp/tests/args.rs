//! Typed argument parsing (`baton_qmp::args`) on its own: QEMU's error texts, paths
//! into nested lists and structs, and pass-through of untyped values.

use std::collections::BTreeMap;

use baton_qmp::from_arguments;
use serde::Deserialize;
use serde_json::{json, Map, Value};

#[derive(Debug, Deserialize, PartialEq)]
#[serde(rename_all = "kebab-case")]
struct Args {
    uri: String,
    #[serde(default)]
    detach: Option<bool>,
    channels: Option<u8>,
    #[serde(default)]
    caps: Vec<Cap>,
}

#[derive(Debug, Deserialize, PartialEq)]
struct Cap {
    capability: Kind2,
    state: bool,
}

#[derive(Debug, Deserialize, PartialEq)]
#[serde(rename_all = "kebab-case")]
enum Kind2 {
    Multifd,
    AutoConverge,
}

fn parse(v: Value) -> Result<Args, String> {
    let Value::Object(map) = v else { panic!() };
    from_arguments::<Args>(map).map_err(|e| e.to_string())
}

#[test]
fn good_arguments() {
    let a = parse(json!({"uri": "tcp:x", "detach": null, "channels": 4,
        "caps": [{"capability": "auto-converge", "state": true}]}))
    .unwrap();
    assert_eq!(a.uri, "tcp:x");
    assert_eq!(a.detach, None);
    assert_eq!(a.channels, Some(4));
    assert_eq!(a.caps[0].capability, Kind2::AutoConverge);
}

#[test]
fn qemu_error_texts() {
    assert_eq!(parse(json!({})).unwrap_err(), "Parameter 'uri' is missing");
    assert_eq!(
        parse(json!({"uri": "x", "foo": 1})).unwrap_err(),
        "Parameter 'foo' is unexpected"
    );
    assert_eq!(
        parse(json!({"uri": 1})).unwrap_err(),
        "Invalid parameter type for 'uri', expected: string"
    );
    assert_eq!(
        parse(json!({"uri": "x", "channels": 300})).unwrap_err(),
        "Parameter 'channels' expects uint8_t"
    );
    assert_eq!(
        parse(json!({"uri": "x", "channels": 1.5})).unwrap_err(),
        "Invalid parameter type for 'channels', expected: integer"
    );
    assert_eq!(
        parse(json!({"uri": "x", "caps": {}})).unwrap_err(),
        "Invalid parameter type for 'caps', expected: array"
    );
    assert_eq!(
        parse(
            json!({"uri": "x", "caps": [{"capability": "multifd", "state": true},
            {"capability": "bogus", "state": true}]})
        )
        .unwrap_err(),
        "Parameter 'caps[1].capability' does not accept value 'bogus'"
    );
    assert_eq!(
        parse(json!({"uri": "x", "caps": [{"capability": "multifd"}]})).unwrap_err(),
        "Parameter 'caps[0].state' is missing"
    );
    assert_eq!(
        parse(json!({"uri": "x", "caps": [{"capability": "multifd", "state": 1, "x": 2}]}))
            .unwrap_err(),
        "Invalid parameter type for 'caps[0].state', expected: boolean"
    );
    assert_eq!(
        parse(json!({"uri": "x", "caps": [{"capability": "multifd", "state": true, "x": 2}]}))
            .unwrap_err(),
        "Parameter 'caps[0].x' is unexpected"
    );
}

#[test]
fn unit_arguments_refuse_members() {
    let empty: Result<(), _> = from_arguments(Map::new());
    assert!(empty.is_ok());
    let mut map = Map::new();
    map.insert("a".into(), json!(1));
    let err = from_arguments::<()>(map).unwrap_err();
    assert_eq!(err.to_string(), "Parameter 'a' is unexpected");
}

#[test]
fn any_value_passes_through() {
    let mut map = Map::new();
    map.insert("x".into(), json!({"deep": [1, -2, 2.5, null, "s"]}));
    let v: Map<String, Value> = from_arguments(map.clone()).unwrap();
    assert_eq!(v, map);
}

fn map(v: Value) -> Map<String, Value> {
    match v {
        Value::Object(m) => m,
        other => panic!("not an object: {other}"),
    }
}

#[derive(Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
struct Numbers {
    small: i8,
    signed: i64,
    ratio: f64,
    #[serde(default)]
    pair: Option<(u16, String)>,
    #[serde(default)]
    tags: BTreeMap<String, u32>,
}

#[test]
fn numbers_tuples_and_maps() {
    let n: Numbers = from_arguments(map(json!({"small": -128, "signed": -5, "ratio": 2,
        "pair": [7, "x"], "tags": {"a": 1}})))
    .unwrap();
    assert_eq!((n.small, n.signed, n.ratio), (-128, -5, 2.0));
    assert_eq!(n.pair, Some((7, "x".into())));
    assert_eq!(n.tags.get("a"), Some(&1));
    let err = |v: Value| from_arguments::<Numbers>(map(v)).unwrap_err().to_string();
    let base = json!({"small": 1, "signed": 1, "ratio": 1.5});
    let with = |k: &str, v: Value| {
        let mut b = base.clone();
        b[k] = v;
        b
    };
    assert_eq!(
        err(with("small", json!(128))),
        "Parameter 'small' expects int8_t"
    );
    assert_eq!(
        err(with("signed", json!(u64::MAX))),
        "Parameter 'signed' expects int64"
    );
    assert_eq!(
        err(with("ratio", json!("1"))),
        "Invalid parameter type for 'ratio', expected: number"
    );
    assert_eq!(
        err(with("tags", json!({"a": -1}))),
        "Parameter 'tags.a' expects uint32_t"
    );
    assert_eq!(
        err(with("pair", json!([1]))),
        "Parameter 'pair' expects a tuple of size 2 (got 1 elements)"
    );
    assert_eq!(
        err(with("pair", json!([1, "a", 3]))),
        "Parameter 'pair' expects at most 2 elements (got 3)"
    );
    // deny_unknown_fields gives the same text as the built-in check.
    assert_eq!(err(with("zz", json!(0))), "Parameter 'zz' is unexpected");
}

#[test]
fn error_path_is_exposed() {
    let e = from_arguments::<Args>(map(json!({"uri": "u", "caps": [{"capability": "multifd",
        "state": "on"}]})))
    .unwrap_err();
    assert_eq!(e.path(), "caps[0].state");
    let q: baton_qmp::QmpError = e.into();
    assert_eq!(q.class, baton_qmp::ErrorClass::GenericError);
}
