//! The three hooks driven in one process: save/load, early setup unchanged and changed,
//! hostile state, and the checks a destination makes on received fds.

mod common;

use baton_qdev::{EarlyOutcome, Migratable, ReceivedBackend};
use baton_vmstate::VmState;
use common::{memfd, CounterBackendMeta, CounterDevice, CounterState};

/// Early state during setup, then again at switchover: the engine's comparison.
fn early_outcome<'a>(sent: &[u8], now: &'a [u8], version_id: u32) -> EarlyOutcome<'a> {
    if sent == now {
        EarlyOutcome::Unchanged
    } else {
        EarlyOutcome::Changed {
            version_id,
            state: now,
        }
    }
}

#[test]
fn save_then_load_moves_the_state() {
    let mut src = CounterDevice::new_source("ctr0", 64);
    for _ in 0..5 {
        src.tick().unwrap();
    }
    let blob = src.save().unwrap();
    let mut dst = CounterDevice::new_incoming("ctr0");
    dst.load(src.vmsd().version_id, &blob).unwrap();
    assert_eq!((dst.counter, dst.ring_size), (5, 64));
    // save does not change the source, which may resume.
    assert_eq!(src.save().unwrap(), blob);
    src.tick().unwrap();
    assert_eq!(src.counter, 6);
}

#[test]
fn early_setup_unchanged_skips_the_redo() {
    let mut src = CounterDevice::new_source("ctr0", 256);
    let mut dst = CounterDevice::new_incoming("ctr0");
    let v = src.early_setup().unwrap().early_vmsd().version_id;
    let sent = src.early_setup().unwrap().save_early().unwrap();
    dst.early_setup().unwrap().prepare(v, &sent).unwrap();
    assert_eq!(dst.preparations, 1);

    src.tick().unwrap(); // the guest runs on; the early part does not change
    let now = src.early_setup().unwrap().save_early().unwrap();
    let outcome = early_outcome(&sent, &now, v);
    assert_eq!(outcome, EarlyOutcome::Unchanged);
    dst.early_setup().unwrap().finish(outcome).unwrap();
    dst.load(1, &src.save().unwrap()).unwrap();
    assert_eq!(
        dst.preparations, 1,
        "unchanged early state must not be prepared again"
    );
    assert_eq!(dst.prepared_ring.as_ref().map(Vec::len), Some(256));
}

#[test]
fn early_setup_changed_redoes_with_the_new_state() {
    let mut src = CounterDevice::new_source("ctr0", 256);
    let mut dst = CounterDevice::new_incoming("ctr0");
    let sent = src.early_setup().unwrap().save_early().unwrap();
    dst.early_setup().unwrap().prepare(1, &sent).unwrap();

    src.ring_size = 1024; // the guest reconfigured the device meanwhile
    let now = src.early_setup().unwrap().save_early().unwrap();
    let outcome = early_outcome(&sent, &now, 1);
    assert!(matches!(outcome, EarlyOutcome::Changed { .. }));
    dst.early_setup().unwrap().finish(outcome).unwrap();
    dst.load(1, &src.save().unwrap()).unwrap();
    assert_eq!(dst.preparations, 2);
    assert_eq!(dst.prepared_ring.as_ref().map(Vec::len), Some(1024));
}

#[test]
fn load_refuses_state_that_contradicts_the_early_state() {
    let mut src = CounterDevice::new_source("ctr0", 256);
    let mut dst = CounterDevice::new_incoming("ctr0");
    let sent = src.early_setup().unwrap().save_early().unwrap();
    dst.early_setup().unwrap().prepare(1, &sent).unwrap();
    src.ring_size = 512;
    // A source that wrongly claims "unchanged": the load catches the contradiction.
    dst.early_setup()
        .unwrap()
        .finish(EarlyOutcome::Unchanged)
        .unwrap();
    let e = dst.load(1, &src.save().unwrap()).unwrap_err();
    assert_eq!(
        e.to_string(),
        "ctr0: load: ring_size 512 differs from the early state's 256"
    );
}

#[test]
fn hostile_state_is_refused_with_device_hook_and_field() {
    let mut dst = CounterDevice::new_incoming("ctr0");
    let bad = CounterState {
        counter: 1,
        ring_size: 100,
    }
    .save();
    let e = dst.load(1, &bad).unwrap_err();
    assert_eq!(
        e.to_string(),
        "ctr0: load: ring_size: 100 is not a power of two up to 4096"
    );
    let e = dst.load(1, &bad[..5]).unwrap_err();
    assert_eq!(
        e.to_string(),
        "ctr0: load: counter: truncated: needs 8 more bytes, 5 left (at byte 0)"
    );
    let e = dst.early_setup().unwrap().prepare(1, &[1, 2]).unwrap_err();
    assert_eq!(
        e.to_string(),
        "ctr0: early-setup prepare: ring_size: truncated: needs 4 more bytes, 2 left (at byte 0)"
    );
}

#[test]
fn adopt_checks_roles_and_fd_kinds() {
    let meta = CounterBackendMeta {
        len: common::MEMFD_LEN,
    }
    .save();
    // Missing role.
    let mut dst = CounterDevice::new_incoming("ctr0");
    let r = ReceivedBackend::new("ctr0", vec![], meta.clone(), 1);
    let e = dst.backend_transfer().unwrap().adopt(r).unwrap_err();
    assert_eq!(
        e.to_string(),
        "ctr0: backend adopt: fd \"counter-memfd\": not received"
    );

    // An extra fd nobody asked for.
    let good = std::fs::File::from(memfd("x"));
    good.set_len(common::MEMFD_LEN).unwrap();
    let r = ReceivedBackend::new(
        "ctr0",
        vec![
            ("counter-memfd".into(), good.into()),
            ("stray".into(), memfd("y")),
        ],
        meta.clone(),
        1,
    );
    let e = dst.backend_transfer().unwrap().adopt(r).unwrap_err();
    assert_eq!(
        e.to_string(),
        "ctr0: backend adopt: fd \"stray\": unexpected fd"
    );

    // The wrong kind of fd under the right role: a pipe is not a memfd.
    let (pipe_r, _pipe_w) = std::io::pipe().unwrap();
    let r = ReceivedBackend::new(
        "ctr0",
        vec![("counter-memfd".into(), pipe_r.into())],
        meta,
        1,
    );
    let e = dst.backend_transfer().unwrap().adopt(r).unwrap_err();
    assert!(
        e.to_string().starts_with(
            "ctr0: backend adopt: fd \"counter-memfd\": expected a 4096-byte memfd, got a FileType"
        ),
        "{e}"
    );
}
