//! Loading across versions of one state struct, as two builds would.

use baton_vmstate::{VmState, VmStateError};

mod v1 {
    use super::*;
    #[derive(VmState, Debug, Default, PartialEq)]
    #[vmstate(name = "dev", version = 1)]
    pub struct Dev {
        pub a: u32,
    }
}

mod v2 {
    use super::*;
    #[derive(VmState, Debug, Default, PartialEq)]
    #[vmstate(name = "dev", version = 2, minimum_version = 1)]
    pub struct Dev {
        pub a: u32,
        #[vmstate(since = 2, default = 7)]
        pub b: u16,
        #[vmstate(since = 2, max = 4)]
        pub c: Vec<u8>,
    }
}

mod v2_strict {
    use super::*;
    #[derive(VmState, Debug, Default, PartialEq)]
    #[vmstate(name = "dev", version = 2, minimum_version = 2)]
    pub struct Dev {
        pub a: u32,
        #[vmstate(since = 2)]
        pub b: u16,
    }
}

#[test]
fn v2_loads_a_v1_blob_with_defaults_for_new_fields() {
    let blob = v1::Dev { a: 11 }.save();
    let d = v2::Dev::load(&blob, 1).unwrap();
    assert_eq!(
        d,
        v2::Dev {
            a: 11,
            b: 7,
            c: vec![]
        }
    );
}

#[test]
fn reader_with_minimum_2_refuses_v1() {
    let blob = v1::Dev { a: 11 }.save();
    let e = v2_strict::Dev::load(&blob, 1).unwrap_err();
    assert_eq!(
        e.to_string(),
        "version 1 is older than the oldest supported version 2 of \"dev\""
    );
}

#[test]
fn v1_reader_refuses_v2() {
    let blob = v2::Dev {
        a: 1,
        b: 2,
        c: vec![3],
    }
    .save();
    let e = v1::Dev::load(&blob, 2).unwrap_err();
    assert_eq!(
        e.to_string(),
        "version 2 is newer than the newest supported version 1 of \"dev\""
    );
    // Lying about the version does not get it through either: the extra bytes are seen.
    let e = v1::Dev::load(&blob, 1).unwrap_err();
    assert_eq!(e.to_string(), "invalid subsection marker 0x02 (at byte 4)");
}

mod sub_old {
    use super::*;
    #[derive(VmState, Debug, Default, PartialEq)]
    #[vmstate(name = "nic", version = 1)]
    pub struct Nic {
        pub link: bool,
    }
}

mod sub_new {
    use super::*;
    #[derive(VmState, Debug, Default, Clone, PartialEq)]
    #[vmstate(name = "nic/rss", version = 1)]
    pub struct Rss {
        pub key: [u8; 4],
    }
    #[derive(VmState, Debug, Default, Clone, PartialEq)]
    #[vmstate(name = "nic/announce", version = 1)]
    pub struct Announce {
        pub rounds: u8,
    }
    #[derive(VmState, Debug, Default, Clone, PartialEq)]
    #[vmstate(name = "nic", version = 1)]
    pub struct Nic {
        pub link: bool,
        #[vmstate(subsection, needed = rss_in_use)]
        pub rss: Option<Rss>,
        #[vmstate(subsection = "announce")]
        pub announce: Option<Announce>,
    }
    fn rss_in_use(n: &Nic) -> bool {
        n.rss.as_ref().is_some_and(|r| r.key != [0; 4])
    }
}

#[test]
fn subsection_absent_loads_in_both_builds() {
    // Old writer, new reader: missing subsection leaves None.
    let blob = sub_old::Nic { link: true }.save();
    let n = sub_new::Nic::load(&blob, 1).unwrap();
    assert_eq!((n.link, n.rss, n.announce), (true, None, None));
    // New writer without subsections, old reader: loads.
    let blob = sub_new::Nic {
        link: true,
        rss: None,
        announce: None,
    }
    .save();
    assert_eq!(
        sub_old::Nic::load(&blob, 1).unwrap(),
        sub_old::Nic { link: true }
    );
}

#[test]
fn subsection_present_round_trips_and_needed_gates_it() {
    let n = sub_new::Nic {
        link: false,
        rss: Some(sub_new::Rss { key: [1, 2, 3, 4] }),
        announce: Some(sub_new::Announce { rounds: 3 }),
    };
    assert_eq!(sub_new::Nic::load(&n.save(), 1).unwrap(), n);
    // An all-zero key is "not in use": the subsection stays off the wire, so an old
    // reader can still load the stream.
    let quiet = sub_new::Nic {
        rss: Some(sub_new::Rss::default()),
        announce: None,
        ..n.clone()
    };
    let blob = quiet.save();
    assert_eq!(sub_new::Nic::load(&blob, 1).unwrap().rss, None);
    assert!(sub_old::Nic::load(&blob, 1).is_ok());
}

#[test]
fn unknown_subsection_is_refused_by_name() {
    let blob = sub_new::Nic {
        link: true,
        rss: None,
        announce: Some(sub_new::Announce { rounds: 1 }),
    }
    .save();
    let e = sub_old::Nic::load(&blob, 1).unwrap_err();
    assert_eq!(
        e.to_string(),
        "unknown subsection \"announce\" (at byte 19)"
    );
}

#[test]
fn subsection_errors_name_the_subsection() {
    let mut blob = sub_new::Nic {
        link: true,
        rss: Some(sub_new::Rss { key: [9; 4] }),
        announce: None,
    }
    .save();
    // marker(1) name_len(1) "rss"(3) version(4) body_len(4) after link(1).
    let version_at = 1 + 1 + 1 + 3;
    blob[version_at] = 5;
    let e = sub_new::Nic::load(&blob, 1).unwrap_err();
    assert_eq!(
        e.to_string(),
        "rss: version 5 is newer than the newest supported version 1 of \"nic/rss\""
    );
    blob[version_at] = 1;
    let dup = {
        let mut b = blob.clone();
        let end = b.len() - 1;
        let sub = b[1..end].to_vec();
        b.splice(end..end, sub);
        b
    };
    let e = sub_new::Nic::load(&dup, 1).unwrap_err();
    assert_eq!(
        e.to_string(),
        "subsection \"rss\" appears twice (at byte 32)"
    );
}

#[test]
fn validation_error_from_custom_check() {
    #[derive(VmState, Debug, Default, PartialEq)]
    #[vmstate(name = "pairs", validate = check)]
    struct Pairs {
        configured: u16,
        active: u16,
    }
    fn check(p: &Pairs) -> Result<(), VmStateError> {
        if p.active > p.configured {
            return Err(VmStateError::invalid(
                "active",
                format!("{} queue pairs but {} configured", p.active, p.configured),
            ));
        }
        Ok(())
    }
    let e = Pairs::load(
        &Pairs {
            configured: 2,
            active: 4,
        }
        .save(),
        1,
    )
    .unwrap_err();
    assert_eq!(e.to_string(), "active: 4 queue pairs but 2 configured");
}
