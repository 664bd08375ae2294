//! Save and restore of the transport mid-traffic, through the wire codec and through a
//! device crate's `Migratable` impl, and refusal of hostile state with its path.

mod common;

use baton_qdev::{DeviceMigrationError, Hook, Migratable};
use baton_virtio::regs::{self, features, interrupt, status};
use baton_virtio::{VirtioMmioState, VirtqueueState};
use baton_vmstate::{VmState, VmStateDescription, VmStateError};
use common::*;
use virtio_queue::{Queue, QueueState, QueueT};

const ALL_OK: u32 = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK;
const V: u32 = 1;

/// Through the wire: save, encode, decode (with the codec's checks), restore.
fn migrate(src: &Transport, dst: &mut Transport) -> Result<(), String> {
    let blob = src.save_state().save();
    let s = VirtioMmioState::load(&blob, VirtioMmioState::VMSD.version_id)
        .map_err(|e| e.to_string())?;
    dst.restore_state(&s).map_err(|e| e.to_string())
}

#[test]
fn save_load_mid_traffic_continues_exactly() {
    let mem = guest_memory();
    let (mut src, _irq) = echo_transport(&mem);
    let mut d = Driver::new(&mem);
    d.init(
        &mut src,
        features::VERSION_1 | features::RING_EVENT_IDX | ECHO_F_UPPER,
    );
    // Three consumed round trips, two answered but not yet consumed by the driver, and
    // three made available after the last notification (the device has not seen them).
    for i in 0..3u8 {
        d.submit(0, &[b'a' + i], 1);
    }
    d.notify(&mut src, 0);
    assert_eq!(d.take_used(0).len(), 3);
    let answered: Vec<u16> = (0..2u8).map(|i| d.submit(0, &[b'd' + i], 1)).collect();
    d.notify(&mut src, 0);
    let pending: Vec<u16> = (0..3u8).map(|i| d.submit(0, &[b'f' + i], 1)).collect();

    let saved = src.save_state();
    assert_eq!(
        (saved.queues[0].next_avail, saved.queues[0].next_used),
        (5, 5)
    );
    assert!(saved.queues[0].event_idx);

    // The destination: a copy of RAM, a fresh transport; the source is never used again.
    let mem2 = copy_memory(&mem);
    let ram_before = memory_bytes(&mem2);
    let (mut dst, irq2) = echo_transport(&mem2);
    migrate(&src, &mut dst).unwrap();
    drop(src);
    assert_eq!(rd(&mut dst, regs::STATUS), ALL_OK);
    assert!(dst.is_active());
    assert_eq!(dst.device().activations, vec![true]);
    assert_eq!(dst.driver_features(), saved.driver_features);
    assert!(
        memory_bytes(&mem2) == ram_before,
        "restore must not touch guest RAM"
    );

    // The VM starts: the VMM's catch-up notification makes the device see the buffers
    // made available meanwhile, and the driver finds every request exactly once, in order.
    dst.notify_all_queues();
    let mut d2 = d.clone();
    d2.mem = mem2.clone();
    let used = d2.take_used(0);
    let heads: Vec<u16> = used.iter().map(|u| u.0).collect();
    let expect: Vec<u16> = answered.iter().chain(&pending).copied().collect();
    assert_eq!(heads, expect);
    let data: Vec<u8> = used.iter().flat_map(|u| u.2.clone()).collect();
    assert_eq!(data, b"DEFGH");
    // The driver's used_event (3) was already passed on the source: event index
    // suppresses the catch-up interrupt, and the restore itself raised none.
    assert_eq!(irq_count(&irq2), 0);

    // Traffic continues on both queues, with indices carried on from the source.
    let h = d2.submit(0, b"after", 5);
    d2.notify(&mut dst, 0);
    assert_eq!(d2.take_used(0), vec![(h, 5, b"AFTER".to_vec())]);
    assert_eq!(irq_count(&irq2), 1, "take_used moved used_event on");
    let h = d2.submit(1, b"q1", 2);
    d2.notify(&mut dst, 1);
    assert_eq!(d2.take_used(1), vec![(h, 2, b"Q1".to_vec())]);
    let s = dst.save_state();
    assert_eq!((s.queues[0].next_avail, s.queues[0].next_used), (9, 9));
}

#[test]
fn restore_does_not_signal_and_keeps_registers() {
    let mem = guest_memory();
    let (mut src, _irq) = echo_transport(&mem);
    let mut d = Driver::new(&mem);
    d.init(&mut src, features::VERSION_1);
    d.submit(0, b"x", 1);
    d.notify(&mut src, 0);
    src.interrupt().signal_config_change().unwrap();
    wr(&mut src, regs::QUEUE_SEL, 1);
    wr(&mut src, regs::DEVICE_FEATURES_SEL, 1);
    wr(&mut src, regs::CONFIG + 4, 0x1234);

    let mem2 = copy_memory(&mem);
    let (mut dst, irq2) = echo_transport(&mem2);
    migrate(&src, &mut dst).unwrap();
    assert_eq!(irq_count(&irq2), 0);
    assert_eq!(rd(&mut dst, regs::INTERRUPT_STATUS), interrupt::ALL);
    assert_eq!(rd(&mut dst, regs::CONFIG_GENERATION), 1);
    assert_eq!(
        rd(&mut dst, regs::QUEUE_NUM_MAX),
        8,
        "queue 1 still selected"
    );
    assert_eq!(
        rd(&mut dst, regs::DEVICE_FEATURES),
        (src.offered_features() >> 32) as u32
    );
    // The device's own config is the device crate's state, not the transport's.
    assert_eq!(rd(&mut dst, regs::CONFIG + 4), 0);
    assert_eq!(src.save_state(), dst.save_state());
}

#[test]
fn restore_mid_initialisation_then_finish_it() {
    let mem = guest_memory();
    let (mut src, _irq) = echo_transport(&mem);
    let mut d = Driver::new(&mem);
    d.negotiate(&mut src, features::VERSION_1 | features::RING_EVENT_IDX)
        .unwrap();
    d.setup_queue(&mut src, 0, 16);

    let mem2 = copy_memory(&mem);
    let (mut dst, _irq2) = echo_transport(&mem2);
    migrate(&src, &mut dst).unwrap();
    assert!(!dst.is_active());
    assert!(dst.device().activations.is_empty());

    let mut d2 = d.clone();
    d2.mem = mem2.clone();
    d2.setup_queue(&mut dst, 1, 8);
    d2.driver_ok(&mut dst);
    assert_eq!(rd(&mut dst, regs::STATUS), ALL_OK);
    let h = d2.submit(0, b"late", 4);
    d2.notify(&mut dst, 0);
    assert_eq!(d2.take_used(0), vec![(h, 4, b"late".to_vec())]);
    assert_eq!(dst.device().activations, vec![false]);
}

#[test]
fn restore_of_a_device_needing_reset_does_not_activate() {
    let mem = guest_memory();
    let (mut src, _irq) = echo_transport(&mem);
    let mut d = Driver::new(&mem);
    d.init(&mut src, features::VERSION_1);
    src.interrupt().set_needs_reset();
    let (mut dst, _irq2) = echo_transport(&mem);
    migrate(&src, &mut dst).unwrap();
    assert!(!dst.is_active());
    assert_eq!(
        rd(&mut dst, regs::STATUS),
        ALL_OK | status::DEVICE_NEEDS_RESET
    );
    wr(&mut dst, regs::STATUS, 0);
    assert_eq!(rd(&mut dst, regs::STATUS), 0);
}

/// A running source's state, to be corrupted by the hostile-state tests.
fn running_state() -> VirtioMmioState {
    let mem = guest_memory();
    let (mut src, _irq) = echo_transport(&mem);
    let mut d = Driver::new(&mem);
    d.init(&mut src, features::VERSION_1);
    d.submit(1, b"x", 1);
    d.notify(&mut src, 1);
    src.save_state()
}

/// The error restoring `s` gives: through the codec (intrinsic checks) first, then
/// against a fresh echo transport.
fn refusal(s: &VirtioMmioState) -> String {
    let blob = s.save();
    let loaded = match VirtioMmioState::load(&blob, V) {
        Ok(l) => l,
        Err(e) => return e.to_string(),
    };
    let mem = guest_memory();
    let (mut dst, _irq) = echo_transport(&mem);
    match dst.restore_state(&loaded) {
        Ok(()) => panic!("accepted hostile state {s:?}"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn hostile_queue_state_is_refused_with_its_path() {
    let mut s = running_state();
    s.queues[1].size = 512;
    s.queues[1].max_size = 512;
    assert_eq!(refusal(&s), "queues[1].size: 512 exceeds max 8");

    let mut s = running_state();
    s.queues.push(s.queues[0]);
    s.queues.push(VirtqueueState {
        max_size: 256,
        size: 512,
        ..s.queues[0]
    });
    assert_eq!(refusal(&s), "queues[3].size: 512 exceeds max 256");

    let mut s = running_state();
    s.queues[0].size = 12;
    assert_eq!(refusal(&s), "queues[0].size: 12 is not a power of two");

    let mut s = running_state();
    (s.queues[1].next_avail, s.queues[1].next_used) = (300, 10);
    assert_eq!(
        refusal(&s),
        "queues[1].next_avail: 300 is 290 entries ahead of next_used 10, more than the queue size 8"
    );

    let mut s = running_state();
    s.queues[0].desc_table = 0xffff_ffff_ffff_ff00;
    assert_eq!(
        refusal(&s),
        "queues[0].desc_table: 0xffffffffffffff00: 256 bytes of ring overflow the address space"
    );

    let mut s = running_state();
    s.queues[1].used_ring = 0x9_0000; // the hole between the RAM regions
    assert_eq!(
        refusal(&s),
        "queues[1].used_ring: 0x90000..0x90046 is outside guest memory"
    );

    let mut s = running_state();
    s.queues[0].avail_ring += 1;
    assert_eq!(
        refusal(&s),
        "queues[0].avail_ring: 0x11001 is not aligned to 2 bytes"
    );

    let mut s = running_state();
    s.queues[0].event_idx = true;
    assert!(
        refusal(&s).starts_with("queues[0].event_idx: true but"),
        "{}",
        refusal(&s)
    );
}

#[test]
fn hostile_device_state_is_refused_with_its_path() {
    let mut s = running_state();
    s.driver_features |= 1 << 20;
    let offered = s.device_features;
    assert_eq!(
        refusal(&s),
        format!(
            "driver_features: {:#x} not offered by the device (offered {offered:#x})",
            s.driver_features
        )
    );

    // Offered by a (different) source device, not by this one.
    let mut s = running_state();
    s.device_features |= 1 << 20;
    s.driver_features |= 1 << 20;
    assert!(
        refusal(&s).starts_with("driver_features: "),
        "{}",
        refusal(&s)
    );
    assert!(refusal(&s).contains("not offered by the device"));

    let mut s = running_state();
    s.status = (status::ACKNOWLEDGE | status::DRIVER | status::DRIVER_OK) as u8;
    assert_eq!(
        refusal(&s),
        "status: 0x7: DRIVER_OK without its predecessors"
    );

    let mut s = running_state();
    s.status |= 0x10;
    assert_eq!(refusal(&s), "status: 0x1f has undefined bits");

    let mut s = running_state();
    s.interrupt_status = 0x80;
    assert_eq!(refusal(&s), "interrupt_status: 0x80 has undefined bits");

    let mut s = running_state();
    s.device_type = 1;
    assert_eq!(
        refusal(&s),
        "device_type: 1 in the state, this device is 66"
    );

    let mut s = running_state();
    s.queues.push(s.queues[1]);
    assert_eq!(
        refusal(&s),
        "queues: 3 queues in the state, this device has 2"
    );

    let mut s = running_state();
    s.queues = vec![s.queues[1]; 1025];
    assert!(refusal(&s).starts_with("queues: length 1025 exceeds the maximum 1024"));
}

#[test]
fn truncated_and_garbage_blobs_are_errors() {
    let blob = running_state().save();
    for n in 0..blob.len() {
        assert!(VirtioMmioState::load(&blob[..n], V).is_err());
    }
    let mut long = blob.clone();
    long.push(0);
    assert!(VirtioMmioState::load(&long, V).is_err());
    assert!(
        VirtioMmioState::load(&blob, 2).is_err(),
        "version from the future"
    );
}

#[test]
fn queue_state_conversions() {
    let mut q = Queue::new(64).unwrap();
    q.set_size(32);
    q.set_ready(true);
    q.set_next_avail(7);
    q.set_next_used(5);
    q.try_set_desc_table_address(vm_memory::GuestAddress(0x1000))
        .unwrap();
    let s = VirtqueueState::from(q.state());
    assert_eq!(
        (s.max_size, s.size, s.next_avail, s.next_used),
        (64, 32, 7, 5)
    );
    assert_eq!(QueueState::from(&s), q.state());
    let back = Queue::try_from(&s).unwrap();
    assert_eq!(back.state(), q.state());

    let bad = VirtqueueState { size: 128, ..s };
    let e = Queue::try_from(&bad).unwrap_err();
    assert_eq!(e.to_string(), "size: 128 exceeds max 64");
    let bad = VirtqueueState {
        used_ring: 0x1002,
        ..s
    };
    assert_eq!(
        Queue::try_from(&bad).unwrap_err().path_string(),
        "used_ring"
    );
}

// --- A device crate's view: embed the state in its own `Migratable` impl. ---

#[derive(VmState, Debug, Default)]
#[vmstate(name = "echo", version = 1)]
struct EchoState {
    virtio: VirtioMmioState,
    served: u32,
    scratch: u32,
}

struct EchoMmio {
    id: String,
    transport: Transport,
}

impl Migratable for EchoMmio {
    fn id(&self) -> &str {
        &self.id
    }
    fn vmsd(&self) -> &'static VmStateDescription {
        EchoState::vmsd()
    }
    fn save(&mut self) -> Result<Vec<u8>, DeviceMigrationError> {
        let dev = self.transport.device();
        let (served, scratch) = (dev.served, dev.scratch);
        Ok(EchoState {
            virtio: self.transport.save_state(),
            served,
            scratch,
        }
        .save())
    }
    fn load(&mut self, version_id: u32, state: &[u8]) -> Result<(), DeviceMigrationError> {
        let s = EchoState::load(state, version_id)
            .map_err(|e| DeviceMigrationError::state(&self.id, Hook::Load, e))?;
        let dev = self.transport.device_mut();
        (dev.served, dev.scratch) = (s.served, s.scratch);
        self.transport
            .restore_state(&s.virtio)
            .map_err(|e| e.into_migration_error(&self.id, "virtio"))
    }
}

#[test]
fn embedded_in_a_device_migratable() {
    let mem = guest_memory();
    let (t, _irq) = echo_transport(&mem);
    let mut src = EchoMmio {
        id: "echo0".into(),
        transport: t,
    };
    let mut d = Driver::new(&mem);
    d.init(&mut src.transport, features::VERSION_1);
    wr(&mut src.transport, regs::CONFIG + 4, 0xabcd);
    d.submit(0, b"1", 1);
    d.notify(&mut src.transport, 0);
    d.submit(0, b"2", 1);

    let mut devices: Vec<Box<dyn Migratable>> = vec![Box::new(src)];
    let blob = devices[0].save().unwrap();
    let version = devices[0].vmsd().version_id;
    assert!(devices[0]
        .vmsd()
        .to_json_pretty()
        .contains("\"virtio-mmio\""));

    let mem2 = copy_memory(&mem);
    let (t2, _irq2) = echo_transport(&mem2);
    let mut dst = EchoMmio {
        id: "echo0".into(),
        transport: t2,
    };
    dst.load(version, &blob).unwrap();
    dst.transport.notify_all_queues();
    assert_eq!(rd(&mut dst.transport, regs::CONFIG + 4), 0xabcd);
    let mut d2 = d.clone();
    d2.mem = mem2;
    assert_eq!(d2.take_used(0).len(), 2);
    assert_eq!(rd(&mut dst.transport, regs::CONFIG), 2, "served");

    // Hostile: the error names the device, the hook and the full path.
    let mut s = EchoState::load(&blob, version).unwrap();
    s.virtio.queues[0].size = 64;
    let (t3, _irq3) = echo_transport(&guest_memory());
    let mut dst = EchoMmio {
        id: "echo0".into(),
        transport: t3,
    };
    let e = dst.load(version, &s.save()).unwrap_err();
    assert_eq!(
        e.to_string(),
        "echo0: load: virtio.queues[0].size: 64 exceeds max 16"
    );
    let VmStateErrorCheck(path) = VmStateErrorCheck::of(&e);
    assert_eq!(path, "virtio.queues[0].size");
}

struct VmStateErrorCheck(String);
impl VmStateErrorCheck {
    fn of(e: &DeviceMigrationError) -> Self {
        match e {
            DeviceMigrationError::State { source, .. } => {
                VmStateErrorCheck(VmStateError::path_string(source))
            }
            other => panic!("not a state error: {other}"),
        }
    }
}
