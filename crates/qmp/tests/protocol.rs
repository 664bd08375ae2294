//! The QMP protocol over a real UNIX socket: greeting, negotiation mode, error classes
//! and texts, typed-argument errors.

mod common;

use common::{demo, error_of, Client};
use serde_json::{json, Value};

#[test]
fn greeting_has_qemu_shape_and_crlf() {
    let d = demo("greet");
    let mut c = Client::connect_raw(&d.path);
    let line = c.recv_line();
    let v: Value = serde_json::from_str(&line).unwrap();
    let qmp = &v["QMP"];
    assert_eq!(v.as_object().unwrap().len(), 1, "{v}");
    let ver = &qmp["version"]["qemu"];
    for k in ["major", "minor", "micro"] {
        assert!(ver[k].is_u64(), "{k} in {v}");
    }
    assert_eq!(ver["major"], 7);
    assert!(qmp["version"]["package"]
        .as_str()
        .unwrap()
        .starts_with("baton "));
    assert_eq!(qmp["capabilities"], json!([]));
    // Same version through query-version.
    let r = c.execute("qmp_capabilities", None);
    assert_eq!(r, json!({"return": {}}));
    let r = c.execute("query-version", None);
    assert_eq!(r["return"], qmp["version"]);
}

#[test]
fn version_and_package_are_configurable() {
    let d = common::demo_with("ver", |b| b.qemu_version(9, 2, 1).package("baton-vmm 3"));
    let mut c = Client::connect_raw(&d.path);
    let v = c.recv();
    assert_eq!(
        v["QMP"]["version"],
        json!({"qemu": {"micro": 1, "minor": 2, "major": 9}, "package": "baton-vmm 3"})
    );
}

#[test]
fn negotiation_mode() {
    let d = demo("nego");
    let mut c = Client::connect(&d.path);
    c.send_json(&json!({"execute": "query-status", "id": "q1"}));
    let r = c.recv();
    assert_eq!(r["id"], "q1");
    assert_eq!(
        error_of(&r),
        (
            "CommandNotFound".into(),
            "Expecting capabilities negotiation with 'qmp_capabilities'".into()
        )
    );
    // Malformed input keeps its own errors in negotiation mode.
    c.send(b"{\"id\": 1}");
    assert_eq!(error_of(&c.recv()).1, "QMP input lacks member 'execute'");
    // Capability checks.
    let r = c.execute("qmp_capabilities", Some(json!({"enable": ["oob"]})));
    assert_eq!(
        error_of(&r),
        (
            "GenericError".into(),
            "Capability 'oob' not available".into()
        )
    );
    let r = c.execute("qmp_capabilities", Some(json!({"enable": ["foo"]})));
    assert_eq!(
        error_of(&r).1,
        "Parameter 'enable[0]' does not accept value 'foo'"
    );
    let r = c.execute("qmp_capabilities", Some(json!({"bogus": true})));
    assert_eq!(error_of(&r).1, "Parameter 'bogus' is unexpected");
    // No events before negotiation.
    d.server.events().emit(&baton_qmp::schema::StopEvent);
    c.expect_silence();
    c.send_json(&json!({"execute": "qmp_capabilities", "arguments": {"enable": []}, "id": 5}));
    assert_eq!(c.recv(), json!({"return": {}, "id": 5}));
    let r = c.execute("qmp_capabilities", None);
    assert_eq!(
        error_of(&r),
        (
            "CommandNotFound".into(),
            "Capabilities negotiation is already complete, command ignored".into()
        )
    );
    let r = c.execute("query-status", None);
    assert_eq!(
        r,
        json!({"return": {"running": true, "singlestep": false, "status": "running"}})
    );
}

/// Sends raw input, returns the error `(class, desc)` and the echoed id.
/// (A top-level number or keyword ends only at a delimiter, so a newline follows.)
fn raw_error(c: &mut Client, input: &str) -> (String, String, Option<Value>) {
    c.send(format!("{input}\n").as_bytes());
    let r = c.recv();
    let (class, desc) = error_of(&r);
    (class, desc, r.get("id").cloned())
}

#[test]
fn malformed_input_gets_precise_errors_and_the_connection_stays_usable() {
    let d = demo("malformed");
    let mut c = Client::negotiated(&d.path);
    let (class, desc, id) = raw_error(&mut c, "{\"execute\": query-status}");
    assert_eq!(class, "GenericError");
    assert!(desc.starts_with("JSON parse error, "), "{desc}");
    assert!(desc.contains("line 1 column"), "{desc}");
    assert_eq!(id, None);
    let cases: &[(&str, &str, Option<Value>)] = &[
        ("[1, 2]", "QMP input must be a JSON object", None),
        ("42", "QMP input must be a JSON object", None),
        ("\"stop\"", "QMP input must be a JSON object", None),
        (
            "{\"arguments\": {}, \"id\": 7}",
            "QMP input lacks member 'execute'",
            Some(json!(7)),
        ),
        (
            "{\"execute\": 3, \"id\": [1]}",
            "QMP input member 'execute' must be a string",
            Some(json!([1])),
        ),
        (
            "{\"execute\": \"stop\", \"arguments\": [1]}",
            "QMP input member 'arguments' must be an object",
            None,
        ),
        (
            "{\"exec-oob\": \"stop\", \"id\": \"o\"}",
            "QMP input member 'exec-oob' is unexpected",
            Some(json!("o")),
        ),
        (
            "{\"execute\": \"stop\", \"argument\": {}}",
            "QMP input member 'argument' is unexpected",
            None,
        ),
        ("}", "JSON parse error, stray '}'", None),
    ];
    for (input, want, want_id) in cases {
        let (class, desc, id) = raw_error(&mut c, input);
        assert_eq!(
            (class.as_str(), desc.as_str()),
            ("GenericError", *want),
            "input {input}"
        );
        assert_eq!(&id, want_id, "input {input}");
    }
    // Invalid UTF-8 inside a string.
    let (_, desc, _) = raw_error(&mut c, "{\"execute\": \"\u{0}\"}");
    assert!(desc.starts_with("JSON parse error"), "{desc}");
    let mut bad = b"{\"execute\": \"st".to_vec();
    bad.extend_from_slice(&[0xff, 0xfe]);
    bad.extend_from_slice(b"op\"}");
    c.send(&bad);
    assert!(error_of(&c.recv()).1.starts_with("JSON parse error"));
    // Still usable.
    assert_eq!(
        c.execute("query-status", None)["return"]["status"],
        "running"
    );
}

#[test]
fn unknown_command_and_ids_of_any_type() {
    let d = demo("unknown");
    let mut c = Client::negotiated(&d.path);
    for id in [
        json!("x"),
        json!(12),
        json!({"a": [1]}),
        json!(null),
        json!(1.5),
    ] {
        c.send_json(&json!({"execute": "no-such-command", "id": id}));
        let r = c.recv();
        assert_eq!(r["id"], id);
        assert_eq!(
            error_of(&r),
            (
                "CommandNotFound".into(),
                "The command no-such-command has not been found".into()
            )
        );
    }
    c.send_json(&json!({"execute": "query-status", "id": {"seq": 9}}));
    assert_eq!(c.recv()["id"], json!({"seq": 9}));
}

#[test]
fn typed_argument_errors_have_qemu_texts() {
    let d = demo("args");
    let mut c = Client::negotiated(&d.path);
    let cases: &[(&str, Value, &str)] = &[
        ("migrate", json!({}), "Parameter 'uri' is missing"),
        (
            "migrate",
            json!({"uri": "unix:/x", "foo": 1}),
            "Parameter 'foo' is unexpected",
        ),
        (
            "migrate",
            json!({"uri": 1}),
            "Invalid parameter type for 'uri', expected: string",
        ),
        (
            "migrate",
            json!({"uri": "unix:/x", "detach": "yes"}),
            "Invalid parameter type for 'detach', expected: boolean",
        ),
        (
            "migrate",
            json!({"uri": "bogus:1"}),
            "Parameter 'uri' expects a valid migration protocol",
        ),
        (
            "migrate-incoming",
            json!({"uri": ["a"]}),
            "Invalid parameter type for 'uri', expected: string",
        ),
        (
            "migrate-set-parameters",
            json!({"multifd-channels": 300}),
            "Parameter 'multifd-channels' expects uint8_t",
        ),
        (
            "migrate-set-parameters",
            json!({"downtime-limit": -1}),
            "Parameter 'downtime-limit' expects uint64",
        ),
        (
            "migrate-set-parameters",
            json!({"downtime-limit": 1.5}),
            "Invalid parameter type for 'downtime-limit', expected: integer",
        ),
        (
            "migrate-set-parameters",
            json!({"multifd-compression": "lz4"}),
            "Parameter 'multifd-compression' does not accept value 'lz4'",
        ),
        (
            "migrate-set-parameters",
            json!({"downtime_limit": 5}),
            "Parameter 'downtime_limit' is unexpected",
        ),
        (
            "migrate-set-capabilities",
            json!({}),
            "Parameter 'capabilities' is missing",
        ),
        (
            "migrate-set-capabilities",
            json!({"capabilities": {}}),
            "Invalid parameter type for 'capabilities', expected: array",
        ),
        (
            "migrate-set-capabilities",
            json!({"capabilities": [{"capability": "nope", "state": true}]}),
            "Parameter 'capabilities[0].capability' does not accept value 'nope'",
        ),
        (
            "migrate-set-capabilities",
            json!({"capabilities": [{"capability": "events", "state": true}, {"capability": "multifd"}]}),
            "Parameter 'capabilities[1].state' is missing",
        ),
        (
            "stop",
            json!({"now": true}),
            "Parameter 'now' is unexpected",
        ),
        (
            "query-status",
            json!({"x": 1}),
            "Parameter 'x' is unexpected",
        ),
        (
            "query-version",
            json!({"x": 1}),
            "Parameter 'x' is unexpected",
        ),
        (
            "device-list-properties",
            json!({}),
            "Parameter 'typename' is missing",
        ),
    ];
    for (cmd, args, want) in cases {
        let r = c.execute(cmd, Some(args.clone()));
        assert_eq!(
            error_of(&r),
            ("GenericError".to_string(), want.to_string()),
            "{cmd} {args}"
        );
    }
    let r = c.execute("device-list-properties", Some(json!({"typename": "nope"})));
    assert_eq!(
        error_of(&r),
        ("DeviceNotFound".into(), "Device 'nope' not found".into())
    );
}

#[test]
fn command_set_shapes() {
    let d = demo("shapes");
    let mut c = Client::negotiated(&d.path);
    let names: Vec<String> = c.execute("query-commands", None)["return"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["name"].as_str().unwrap().to_owned())
        .collect();
    for want in [
        "qmp_capabilities",
        "query-status",
        "stop",
        "cont",
        "quit",
        "migrate",
        "migrate-incoming",
        "migrate-set-capabilities",
        "migrate-set-parameters",
        "query-migrate",
        "migrate_cancel",
        "query-machines",
        "device-list-properties",
        "query-commands",
        "query-version",
    ] {
        assert!(
            names.iter().any(|n| n == want),
            "{want} missing from {names:?}"
        );
    }
    assert_eq!(c.execute("query-migrate", None), json!({"return": {}}));
    let r = c.execute(
        "migrate-set-capabilities",
        Some(
            json!({"capabilities": [{"capability": "backend-transfer", "state": true},
            {"capability": "x-ignore-shared", "state": true}]}),
        ),
    );
    assert_eq!(r, json!({"return": {}}));
    let r = c.execute("query-migrate-capabilities", None);
    assert_eq!(
        r["return"],
        json!([{"capability": "backend-transfer", "state": true},
            {"capability": "x-ignore-shared", "state": true}])
    );
    let r = c.execute(
        "migrate-set-parameters",
        Some(
            json!({"downtime-limit": 50, "max-bandwidth": 1000, "multifd-channels": 4,
            "tls-creds": null, "mode": "cpr-transfer"}),
        ),
    );
    assert_eq!(r, json!({"return": {}}));
    let p = &c.execute("query-migrate-parameters", None)["return"];
    assert_eq!(
        (p["downtime-limit"].clone(), p["multifd-channels"].clone()),
        (json!(50), json!(4))
    );
    assert_eq!(
        c.execute("migrate", Some(json!({"uri": "unix:/tmp/x"}))),
        json!({"return": {}})
    );
    let info = &c.execute("query-migrate", None)["return"];
    assert_eq!(info["status"], "completed");
    for k in ["total-time", "downtime", "setup-time"] {
        assert!(info[k].is_u64(), "{k} in {info}");
    }
    for k in [
        "transferred",
        "remaining",
        "total",
        "duplicate",
        "normal",
        "normal-bytes",
        "dirty-pages-rate",
        "dirty-sync-count",
        "page-size",
    ] {
        assert!(info["ram"][k].is_u64(), "ram.{k} in {info}");
    }
    assert!(info["ram"]["mbps"].is_number());
    assert_eq!(
        c.execute("query-status", None)["return"]["status"],
        "postmigrate"
    );
    let m = &c.execute("query-machines", None)["return"];
    assert_eq!(m[0]["name"], "microvm-1.1");
    assert_eq!(m[0]["alias"], "microvm");
    assert_eq!(m[0]["cpu-max"], 2);
    let p = &c.execute(
        "device-list-properties",
        Some(json!({"typename": "demo-net"})),
    )["return"];
    assert_eq!(
        p[0],
        json!({"name": "backend-transfer", "type": "bool",
            "description": "Hand the open TAP fds to the destination",
            "default-value": true, "value": false,
            "provenance": {"layer": "compat", "machine": "microvm-1.0", "table": "microvm-1.0"}})
    );
}
