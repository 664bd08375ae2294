//! Property tests: encode/decode is the identity, and damaged input only ever yields errors.
//!
//! The damage tests also hold the typed codec and the schema-only JSON decoder to the same
//! verdict on every input, with the same error text.

use baton_vmstate::{decode_to_json, VmState};
use proptest::prelude::*;

#[derive(VmState, Debug, Default, Clone, PartialEq)]
#[vmstate(name = "queue", version = 2)]
struct Queue {
    ready: bool,
    size: u16,
    desc: u64,
    avail: u64,
    used: u64,
    next_avail: u16,
    next_used: u16,
    #[vmstate(since = 2)]
    vector: i16,
}

#[derive(VmState, Debug, Default, Clone, PartialEq)]
#[vmstate(name = "opt", version = 1)]
struct Opt {
    #[vmstate(max = 8)]
    words: Vec<u32>,
}

#[derive(VmState, Debug, Default, Clone, PartialEq)]
#[vmstate(name = "dev", version = 3, minimum_version = 1)]
struct Dev {
    features: u64,
    mac: [u8; 6],
    small: i8,
    big: i64,
    wide: [i32; 2],
    #[vmstate(max = 6)]
    queues: Vec<Queue>,
    #[vmstate(max = 12)]
    name: String,
    #[vmstate(unused = 2)]
    gap: (),
    #[vmstate(since = 2, max = 5)]
    tail: Vec<[u16; 2]>,
    #[vmstate(since = 3)]
    u32_: u32,
    #[vmstate(subsection)]
    opt: Option<Opt>,
}

fn queue() -> impl Strategy<Value = Queue> {
    (
        any::<bool>(),
        any::<u16>(),
        any::<[u64; 3]>(),
        any::<u16>(),
        any::<u16>(),
        any::<i16>(),
    )
        .prop_map(
            |(ready, size, [desc, avail, used], next_avail, next_used, vector)| Queue {
                ready,
                size,
                desc,
                avail,
                used,
                next_avail,
                next_used,
                vector,
            },
        )
}

fn dev() -> impl Strategy<Value = Dev> {
    (
        (
            any::<u64>(),
            any::<[u8; 6]>(),
            any::<i8>(),
            any::<i64>(),
            any::<[i32; 2]>(),
        ),
        prop::collection::vec(queue(), 0..=6),
        "\\PC{0,3}",
        prop::collection::vec(any::<[u16; 2]>(), 0..=5),
        any::<u32>(),
        prop::option::of(prop::collection::vec(any::<u32>(), 0..=8)),
    )
        .prop_map(
            |((features, mac, small, big, wide), queues, name, tail, u32_, opt)| Dev {
                features,
                mac,
                small,
                big,
                wide,
                queues,
                name,
                gap: (),
                tail,
                u32_,
                opt: opt.map(|words| Opt { words }),
            },
        )
}

#[derive(Debug, Clone)]
enum Damage {
    Truncate(usize),
    Flip(usize, u8),
    Insert(usize, u8),
    Remove(usize),
}

fn damage() -> impl Strategy<Value = Damage> {
    prop_oneof![
        any::<usize>().prop_map(Damage::Truncate),
        (any::<usize>(), 1..=255u8).prop_map(|(i, x)| Damage::Flip(i, x)),
        (any::<usize>(), any::<u8>()).prop_map(|(i, x)| Damage::Insert(i, x)),
        any::<usize>().prop_map(Damage::Remove),
    ]
}

fn apply(blob: &mut Vec<u8>, d: &Damage) {
    let n = blob.len();
    match *d {
        Damage::Truncate(i) => blob.truncate(i % n.max(1)),
        Damage::Flip(i, x) if n > 0 => blob[i % n] ^= x,
        Damage::Insert(i, x) => blob.insert(i % (n + 1), x),
        Damage::Remove(i) if n > 0 => {
            blob.remove(i % n);
        }
        _ => {}
    }
}

/// The typed and the schema-only decoders agree on success and on the error text.
fn both_decoders(bytes: &[u8], version: u32) -> Result<(), TestCaseError> {
    let typed = Dev::load(bytes, version);
    let untyped = decode_to_json(Dev::vmsd(), bytes, version);
    match (&typed, &untyped) {
        (Ok(_), Ok(_)) => {}
        (Err(a), Err(b)) => prop_assert_eq!(a.to_string(), b.to_string()),
        _ => prop_assert!(
            false,
            "decoders disagree: typed {:?}, json {:?}",
            typed.map(|_| ()),
            untyped.map(|_| ())
        ),
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(20_000))]

    #[test]
    fn encode_then_decode_is_identity(d in dev()) {
        let blob = d.save();
        prop_assert_eq!(Dev::load(&blob, 3).unwrap(), d.clone());
        let json = decode_to_json(Dev::vmsd(), &blob, 3).unwrap();
        prop_assert_eq!(json["features"].as_u64(), Some(d.features));
        prop_assert_eq!(json["queues"].as_array().map(Vec::len), Some(d.queues.len()));
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(100_000))]

    #[test]
    fn damaged_encodings_give_errors_never_panics(
        d in dev(),
        damages in prop::collection::vec(damage(), 1..4),
        version in 0u32..5,
    ) {
        let mut blob = d.save();
        for dmg in &damages {
            apply(&mut blob, dmg);
        }
        both_decoders(&blob, version)?;
        // Whatever still loads is a well-formed state: it re-encodes and loads back equal.
        if let Ok(loaded) = Dev::load(&blob, 3) {
            prop_assert_eq!(Dev::load(&loaded.save(), 3).unwrap(), loaded);
        }
    }

    #[test]
    fn arbitrary_bytes_give_errors_never_panics(
        bytes in prop::collection::vec(any::<u8>(), 0..300),
        version in 0u32..5,
    ) {
        both_decoders(&bytes, version)?;
    }
}

#[test]
fn every_truncation_of_a_full_blob_is_refused() {
    let d = Dev {
        queues: vec![Queue::default(); 3],
        name: "abc".into(),
        tail: vec![[1, 2]],
        opt: Some(Opt { words: vec![1, 2] }),
        ..Dev::default()
    };
    let blob = d.save();
    for cut in 0..blob.len() {
        let e = Dev::load(&blob[..cut], 3).expect_err("truncated blob loaded");
        assert!(
            e.to_string().contains("truncated") || e.to_string().contains("exceeds"),
            "cut at {cut}: {e}"
        );
    }
}
