//! Hostile input never panics and never disturbs other clients: pseudo-random
//! JSON-like garbage through the framer, the request parser and the typed argument
//! parser, then over real connections while another client keeps working.

mod common;

use std::time::Duration;

use baton_qmp::framing::{Frame, Framer};
use baton_qmp::protocol::parse_request;
use baton_qmp::schema::{
    MigrateArgs, MigrateSetCapabilitiesArgs, MigrationParameters, QmpCapabilitiesArgs,
};
use baton_qmp::{from_arguments, ArgError};
use common::{demo, Client};
use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

/// xorshift64*: deterministic, no dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

const PIECES: &[&str] = &[
    "{",
    "}",
    "[",
    "]",
    ":",
    ",",
    "\"",
    "\\",
    "\"execute\"",
    "\"arguments\"",
    "\"id\"",
    "\"migrate\"",
    "\"uri\"",
    "\"capabilities\"",
    "\"capability\"",
    "\"state\"",
    "\"multifd-channels\"",
    "\"downtime-limit\"",
    "\"enable\"",
    "\"oob\"",
    "true",
    "null",
    "-1",
    "300",
    "1e400",
    "18446744073709551616",
    "0.5",
    " ",
    "\n",
    "\u{e9}",
    "\u{0}",
    "\\u0000",
    "\\ud800",
    "\"qmp_capabilities\"",
    "\"exec-oob\"",
];

fn garbage(rng: &mut Rng) -> Vec<u8> {
    let mut out = Vec::new();
    for _ in 0..rng.below(40) {
        if rng.below(20) == 0 {
            out.push(rng.next() as u8);
        } else {
            out.extend_from_slice(PIECES[rng.below(PIECES.len())].as_bytes());
        }
    }
    out
}

/// A request that is usually well-formed JSON, with random members and values.
fn structured(rng: &mut Rng) -> Vec<u8> {
    const CMDS: &[&str] = &[
        "migrate",
        "migrate-set-parameters",
        "migrate-set-capabilities",
        "x",
    ];
    const KEYS: &[&str] = &[
        "uri",
        "capabilities",
        "multifd-channels",
        "downtime-limit",
        "x",
    ];
    const VALUES: &[&str] = &[
        "null",
        "true",
        "-1",
        "300",
        "1.5",
        "\"unix:/x\"",
        "[]",
        "{}",
        "18446744073709551616",
        "[{\"capability\": \"multifd\", \"state\": true}]",
        "[{\"capability\": 3}]",
        "[{\"state\": false, \"capability\": \"events\", \"z\": 1}]",
        "\"\\ud800\"",
    ];
    let members: Vec<String> = (0..rng.below(4))
        .map(|_| {
            format!(
                "\"{}\": {}",
                KEYS[rng.below(KEYS.len())],
                VALUES[rng.below(VALUES.len())]
            )
        })
        .collect();
    format!(
        "{{\"execute\": \"{}\", \"arguments\": {{{}}}, \"id\": {}}}",
        CMDS[rng.below(CMDS.len())],
        members.join(", "),
        VALUES[rng.below(VALUES.len())]
    )
    .into_bytes()
}

fn typed<T: DeserializeOwned>(args: &Map<String, Value>) -> Result<T, ArgError> {
    from_arguments(args.clone())
}

#[test]
fn random_input_never_panics_the_parsers() {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut garbage_framer = Framer::new(4096, 16);
    let mut frames = Vec::new();
    let mut parsed = 0;
    for i in 0..20_000 {
        if i % 2 == 0 {
            garbage_framer.feed(&garbage(&mut rng), &mut frames);
        } else {
            Framer::new(4096, 16).feed(&structured(&mut rng), &mut frames);
        }
        for frame in frames.drain(..) {
            let Frame::Message(bytes) = frame else {
                continue;
            };
            let Ok(req) = parse_request(&bytes) else {
                continue;
            };
            parsed += 1;
            let _ = typed::<MigrateArgs>(&req.arguments);
            let _ = typed::<MigrationParameters>(&req.arguments);
            let _ = typed::<MigrateSetCapabilitiesArgs>(&req.arguments);
            let _ = typed::<QmpCapabilitiesArgs>(&req.arguments);
            let _ = typed::<()>(&req.arguments);
        }
    }
    // The generator does produce well-formed requests sometimes.
    assert!(parsed > 0);
    // Well-formed JSON objects with random members, straight to the typed parsers.
    for _ in 0..5_000 {
        let mut obj = Map::new();
        for _ in 0..rng.below(4) {
            let key = ["uri", "capabilities", "multifd-channels", "x", "enable"][rng.below(5)];
            let value: Value = match rng.below(6) {
                0 => Value::Null,
                1 => Value::Bool(true),
                2 => Value::from(rng.next() as i64),
                3 => Value::from("s"),
                4 => serde_json::json!([{"capability": "multifd", "state": rng.below(2) == 0}]),
                _ => serde_json::json!({"capability": 1}),
            };
            obj.insert(key.into(), value);
        }
        let _ = typed::<MigrateArgs>(&obj);
        let _ = typed::<MigrationParameters>(&obj);
        let _ = typed::<MigrateSetCapabilitiesArgs>(&obj);
    }
}

#[test]
fn random_input_over_sockets_never_disturbs_the_server() {
    let d = demo("fuzz");
    let mut keep = Client::negotiated(&d.path);
    let mut rng = Rng(42);
    for i in 0..150 {
        let mut c = Client::connect(&d.path);
        if i % 2 == 0 {
            assert!(c.execute("qmp_capabilities", None).get("return").is_some());
        }
        for _ in 0..5 {
            c.send(&garbage(&mut rng));
            c.send(&structured(&mut rng));
        }
        // Whatever came back is well-formed JSON lines.
        while let Some(line) = c.try_recv_line(Duration::from_millis(5)) {
            let v: Value = serde_json::from_str(&line).expect("server sent invalid JSON");
            assert!(v.is_object());
        }
    }
    // (A random but valid `migrate` may have moved the demo VM to postmigrate.)
    assert!(keep.execute("query-status", None)["return"]["status"].is_string());
    assert!(common::eventually(|| d.server.client_count() == 1));
}
