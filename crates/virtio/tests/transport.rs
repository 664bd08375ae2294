//! The transport driven by a spec-following test driver over real guest memory.

mod common;

use baton_virtio::regs::{self, features, interrupt, status};
use baton_virtio::NotifyRegistration;
use common::*;
use vm_memory::{Bytes, GuestAddress};

const ALL_OK: u32 = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK;

#[test]
fn identity_registers() {
    let mem = guest_memory();
    let (mut t, _irq) = echo_transport(&mem);
    assert_eq!(rd(&mut t, regs::MAGIC), 0x7472_6976);
    assert_eq!(rd(&mut t, regs::VERSION), 2);
    assert_eq!(rd(&mut t, regs::DEVICE_ID), ECHO_TYPE);
    assert_eq!(rd(&mut t, regs::VENDOR), regs::VENDOR_ID);
    let offered = t.offered_features();
    assert_ne!(offered & features::VERSION_1, 0);
    assert_ne!(offered & ECHO_F_UPPER, 0);
    assert_eq!(
        offered & features::RING_PACKED,
        0,
        "packed rings are not supported"
    );
    wr(&mut t, regs::DEVICE_FEATURES_SEL, 1);
    assert_eq!(rd(&mut t, regs::DEVICE_FEATURES), (offered >> 32) as u32);
    wr(&mut t, regs::DEVICE_FEATURES_SEL, 7);
    assert_eq!(rd(&mut t, regs::DEVICE_FEATURES), 0);
    // No shared memory regions: length -1.
    assert_eq!(rd(&mut t, regs::SHM_LEN_LOW), u32::MAX);
}

#[test]
fn init_sequence_activates_once() {
    let mem = guest_memory();
    let (mut t, irq) = echo_transport(&mem);
    let mut d = Driver::new(&mem);
    let f = d.init(&mut t, features::VERSION_1 | features::RING_EVENT_IDX);
    assert_eq!(f, features::VERSION_1 | features::RING_EVENT_IDX);
    assert_eq!(rd(&mut t, regs::STATUS), ALL_OK);
    assert!(t.is_active());
    assert_eq!(t.device().activations, vec![false]);
    assert_eq!(t.driver_features(), f);
    assert_eq!(
        irq_count(&irq),
        0,
        "activation with empty rings signals nothing"
    );
}

#[test]
fn features_must_be_offered_and_acceptable() {
    let mem = guest_memory();
    let (mut t, _irq) = echo_transport(&mem);
    let d = Driver::new(&mem);
    let base = status::ACKNOWLEDGE | status::DRIVER;

    // A feature the device did not offer: FEATURES_OK does not stick.
    d.negotiate(&mut t, features::VERSION_1).unwrap();
    wr(&mut t, regs::STATUS, 0);
    wr(&mut t, regs::STATUS, status::ACKNOWLEDGE);
    wr(&mut t, regs::STATUS, base);
    d.write_features(&mut t, features::VERSION_1 | ECHO_F_UNOFFERED);
    wr(&mut t, regs::STATUS, base | status::FEATURES_OK);
    assert_eq!(rd(&mut t, regs::STATUS), base);

    // Packed rings were offered by the device model but stripped by the transport.
    d.write_features(&mut t, features::VERSION_1 | features::RING_PACKED);
    wr(&mut t, regs::STATUS, base | status::FEATURES_OK);
    assert_eq!(rd(&mut t, regs::STATUS), base);

    // VERSION_1 is required.
    d.write_features(&mut t, features::RING_EVENT_IDX);
    wr(&mut t, regs::STATUS, base | status::FEATURES_OK);
    assert_eq!(rd(&mut t, regs::STATUS), base);

    // The device refuses a combination it cannot work with.
    assert_eq!(
        d.negotiate(&mut t, features::VERSION_1 | ECHO_F_UPPER),
        Err(base)
    );

    // A good set is accepted, and then frozen.
    let good = features::VERSION_1 | features::RING_EVENT_IDX | ECHO_F_UPPER;
    assert_eq!(d.negotiate(&mut t, good), Ok(good));
    d.write_features(&mut t, features::VERSION_1);
    assert_eq!(t.driver_features(), good);
}

#[test]
fn request_round_trip_with_interrupt() {
    let mem = guest_memory();
    let (mut t, irq) = echo_transport(&mem);
    let mut d = Driver::new(&mem);
    d.init(&mut t, features::VERSION_1);
    let h1 = d.submit(0, b"hello", 16);
    let h2 = d.submit(0, b"virtio world", 8);
    d.notify(&mut t, 0);
    let used = d.take_used(0);
    assert_eq!(
        used,
        vec![(h1, 5, b"hello".to_vec()), (h2, 8, b"virtio w".to_vec())]
    );
    assert_eq!(irq_count(&irq), 1);
    assert_eq!(rd(&mut t, regs::INTERRUPT_STATUS), interrupt::USED_RING);
    wr(&mut t, regs::INTERRUPT_ACK, interrupt::USED_RING);
    assert_eq!(rd(&mut t, regs::INTERRUPT_STATUS), 0);

    // The second queue works independently; the VMM's ioeventfd path does the same.
    let h = d.submit(1, b"q1", 2);
    t.notify_queue(1);
    assert_eq!(d.take_used(1), vec![(h, 2, b"q1".to_vec())]);
    assert_eq!(irq_count(&irq), 1);
    assert_eq!(t.device().served, 3);
}

#[test]
fn negotiated_device_feature_changes_behaviour() {
    let mem = guest_memory();
    let (mut t, _irq) = echo_transport(&mem);
    let mut d = Driver::new(&mem);
    d.init(
        &mut t,
        features::VERSION_1 | features::RING_EVENT_IDX | ECHO_F_UPPER,
    );
    let h = d.submit(0, b"shout", 5);
    d.notify(&mut t, 0);
    assert_eq!(d.take_used(0), vec![(h, 5, b"SHOUT".to_vec())]);
}

#[test]
fn event_idx_suppresses_interrupts() {
    let mem = guest_memory();
    let (mut t, irq) = echo_transport(&mem);
    let mut d = Driver::new(&mem);
    d.init(&mut t, features::VERSION_1 | features::RING_EVENT_IDX);
    d.submit(0, b"a", 1);
    d.notify(&mut t, 0);
    assert_eq!(d.take_used(0).len(), 1);
    assert_eq!(irq_count(&irq), 1);
    // take_used asked for an interrupt at the next entry: it comes.
    d.submit(0, b"b", 1);
    d.notify(&mut t, 0);
    assert_eq!(irq_count(&irq), 1);
    assert_eq!(d.take_used(0).len(), 1);
    // Asking for one far ahead: none.
    d.set_used_event(0, 100);
    d.submit(0, b"c", 1);
    d.notify(&mut t, 0);
    assert_eq!(irq_count(&irq), 0);
    assert_eq!(d.take_used(0).len(), 1);
}

#[test]
fn reset_returns_to_power_on_state() {
    let mem = guest_memory();
    let (mut t, irq) = echo_transport(&mem);
    let mut d = Driver::new(&mem);
    d.init(&mut t, features::VERSION_1);
    d.submit(0, b"x", 1);
    d.notify(&mut t, 0);
    assert_eq!(rd(&mut t, regs::INTERRUPT_STATUS), interrupt::USED_RING);
    wr(&mut t, regs::QUEUE_SEL, 1);

    wr(&mut t, regs::STATUS, 0);
    assert_eq!(rd(&mut t, regs::STATUS), 0);
    assert_eq!(rd(&mut t, regs::INTERRUPT_STATUS), 0);
    assert!(!t.is_active());
    assert_eq!(t.device().resets, 1);
    assert_eq!(t.driver_features(), 0);
    for qi in 0..2 {
        wr(&mut t, regs::QUEUE_SEL, qi);
        assert_eq!(rd(&mut t, regs::QUEUE_READY), 0);
        assert_eq!(
            rd(&mut t, regs::QUEUE_NUM_MAX),
            u32::from(ECHO_QUEUE_MAX[qi as usize])
        );
    }
    let s = t.save_state();
    assert!(s
        .queues
        .iter()
        .all(|q| q.next_avail == 0 && q.next_used == 0 && !q.ready));

    // Notifications after reset are dropped.
    irq_count(&irq);
    d.notify(&mut t, 0);
    assert_eq!(irq_count(&irq), 0);

    // A fresh initialisation starts the rings from index 0 again.
    let mut d = Driver::new(&mem);
    d.init(&mut t, features::VERSION_1);
    let h = d.submit(0, b"again", 5);
    d.notify(&mut t, 0);
    assert_eq!(d.take_used(0), vec![(h, 5, b"again".to_vec())]);
    assert_eq!(t.device().activations, vec![false, false]);
}

#[test]
fn config_space_and_generation() {
    let mem = guest_memory();
    let (mut t, irq) = echo_transport(&mem);
    let mut d = Driver::new(&mem);
    d.init(&mut t, features::VERSION_1);
    d.submit(0, b"1", 1);
    d.submit(0, b"2", 1);
    d.notify(&mut t, 0);
    irq_count(&irq);
    wr(&mut t, regs::INTERRUPT_ACK, interrupt::USED_RING);

    assert_eq!(rd(&mut t, regs::CONFIG), 2, "served");
    let mut b = [0u8; 1];
    t.read(regs::CONFIG, &mut b);
    assert_eq!(b, [2]);
    let mut w = [0u8; 8];
    t.read(regs::CONFIG, &mut w);
    assert_eq!(w, [2, 0, 0, 0, 0, 0, 0, 0]);

    wr(&mut t, regs::CONFIG + 4, 0xdead_beef);
    assert_eq!(rd(&mut t, regs::CONFIG + 4), 0xdead_beef);
    t.write(regs::CONFIG + 4, &[0x11, 0x22]);
    assert_eq!(rd(&mut t, regs::CONFIG + 4), 0xdead_2211);
    wr(&mut t, regs::CONFIG, 77); // read-only field
    assert_eq!(rd(&mut t, regs::CONFIG), 2);
    assert_eq!(
        rd(&mut t, regs::CONFIG + 0x80),
        0,
        "past the space reads zero"
    );
    let mut odd = [0xffu8; 3];
    t.read(regs::CONFIG, &mut odd);
    assert_eq!(odd, [0; 3], "3-byte access ignored");

    let g = rd(&mut t, regs::CONFIG_GENERATION);
    assert_eq!(rd(&mut t, regs::CONFIG_GENERATION), g);
    t.interrupt().signal_config_change().unwrap();
    assert_eq!(rd(&mut t, regs::CONFIG_GENERATION), g + 1);
    assert_eq!(rd(&mut t, regs::INTERRUPT_STATUS), interrupt::CONFIG_CHANGE);
    assert_eq!(irq_count(&irq), 1);
}

#[test]
fn interrupt_status_and_ack() {
    let mem = guest_memory();
    let (mut t, irq) = echo_transport(&mem);
    let mut d = Driver::new(&mem);
    d.init(&mut t, features::VERSION_1);
    d.submit(0, b"x", 1);
    d.notify(&mut t, 0);
    t.interrupt().signal_config_change().unwrap();
    assert_eq!(irq_count(&irq), 2);
    assert_eq!(rd(&mut t, regs::INTERRUPT_STATUS), interrupt::ALL);
    wr(&mut t, regs::INTERRUPT_ACK, interrupt::CONFIG_CHANGE);
    assert_eq!(rd(&mut t, regs::INTERRUPT_STATUS), interrupt::USED_RING);
    wr(&mut t, regs::INTERRUPT_STATUS, 0); // read-only
    assert_eq!(rd(&mut t, regs::INTERRUPT_STATUS), interrupt::USED_RING);
    wr(&mut t, regs::INTERRUPT_ACK, 0xffff_ffff);
    assert_eq!(rd(&mut t, regs::INTERRUPT_STATUS), 0);
}

#[test]
fn misbehaving_driver_is_ignored() {
    let mem = guest_memory();
    let (mut t, _irq) = echo_transport(&mem);
    // Write-only registers read as zero; read-only ones ignore writes.
    assert_eq!(rd(&mut t, regs::QUEUE_NOTIFY), 0);
    wr(&mut t, regs::MAGIC, 0);
    assert_eq!(rd(&mut t, regs::MAGIC), 0x7472_6976);
    // Wrong widths and alignment.
    let mut two = [0xffu8; 2];
    t.read(regs::MAGIC, &mut two);
    assert_eq!(two, [0, 0]);
    t.write(regs::STATUS, &[1]);
    t.write(regs::STATUS + 1, &[1, 0, 0, 0]);
    assert_eq!(rd(&mut t, regs::STATUS), 0);
    // Status bits out of order.
    wr(&mut t, regs::STATUS, status::DRIVER_OK);
    assert_eq!(rd(&mut t, regs::STATUS), 0);
    wr(
        &mut t,
        regs::STATUS,
        status::ACKNOWLEDGE | status::FEATURES_OK,
    );
    assert_eq!(rd(&mut t, regs::STATUS), status::ACKNOWLEDGE);
    // Queue configuration before FEATURES_OK is ignored.
    wr(&mut t, regs::QUEUE_SEL, 0);
    wr(&mut t, regs::QUEUE_NUM, 4);
    wr(&mut t, regs::QUEUE_READY, 1);
    assert_eq!(rd(&mut t, regs::QUEUE_READY), 0);
    // A missing queue reads as absent and takes no writes.
    let d = Driver::new(&mem);
    d.negotiate(&mut t, features::VERSION_1).unwrap();
    wr(&mut t, regs::QUEUE_SEL, 9);
    assert_eq!(rd(&mut t, regs::QUEUE_NUM_MAX), 0);
    wr(&mut t, regs::QUEUE_READY, 1);
    assert_eq!(rd(&mut t, regs::QUEUE_READY), 0);
    d.notify(&mut t, 9);
    wr(&mut t, regs::QUEUE_NOTIFY, 0x1_0000);
    assert_eq!(rd(&mut t, regs::STATUS) & status::DEVICE_NEEDS_RESET, 0);
}

#[test]
fn invalid_queue_size_needs_reset() {
    let mem = guest_memory();
    let (mut t, _irq) = echo_transport(&mem);
    let d = Driver::new(&mem);
    d.negotiate(&mut t, features::VERSION_1).unwrap();
    wr(&mut t, regs::QUEUE_SEL, 0);
    wr(&mut t, regs::QUEUE_NUM, 12); // not a power of two
    assert_ne!(rd(&mut t, regs::STATUS) & status::DEVICE_NEEDS_RESET, 0);
    // DRIVER_OK then does not activate, and the driver is told.
    let s = rd(&mut t, regs::STATUS);
    wr(&mut t, regs::STATUS, s | status::DRIVER_OK);
    assert!(!t.is_active());
    assert_eq!(rd(&mut t, regs::INTERRUPT_STATUS), interrupt::CONFIG_CHANGE);
    wr(&mut t, regs::STATUS, 0);
    assert_eq!(rd(&mut t, regs::STATUS), 0);
}

#[test]
fn rings_outside_memory_refuse_activation() {
    let mem = guest_memory();
    let (mut t, irq) = echo_transport(&mem);
    let mut d = Driver::new(&mem);
    d.negotiate(&mut t, features::VERSION_1).unwrap();
    d.setup_queue(&mut t, 0, 16);
    // Queue 1's used ring in the hole between the two RAM regions.
    wr(&mut t, regs::QUEUE_SEL, 1);
    wr(&mut t, regs::QUEUE_DEVICE_LOW, 0x9_0000);
    wr(&mut t, regs::QUEUE_READY, 1);
    d.driver_ok(&mut t);
    assert!(!t.is_active());
    assert_eq!(t.device().activations.len(), 0);
    assert_ne!(rd(&mut t, regs::STATUS) & status::DEVICE_NEEDS_RESET, 0);
    assert_eq!(irq_count(&irq), 1, "configuration change notification");
}

#[test]
fn device_error_needs_reset_and_recovers() {
    let mem = guest_memory();
    let (mut t, irq) = echo_transport(&mem);
    let mut d = Driver::new(&mem);
    d.init(&mut t, features::VERSION_1);
    // A head index beyond the ring: the device cannot return it, so it must give up.
    let q = d.queues[0].clone().unwrap();
    mem.write_obj(200u16, GuestAddress(q.avail + 4)).unwrap();
    mem.write_obj(1u16, GuestAddress(q.avail + 2)).unwrap();
    d.notify(&mut t, 0);
    assert_eq!(
        rd(&mut t, regs::STATUS),
        ALL_OK | status::DEVICE_NEEDS_RESET
    );
    assert_eq!(rd(&mut t, regs::INTERRUPT_STATUS), interrupt::CONFIG_CHANGE);
    assert_eq!(irq_count(&irq), 1);
    assert!(!t.is_active());
    assert_eq!(t.device().resets, 1);
    // Reset and start over.
    let mut d = Driver::new(&mem);
    d.init(&mut t, features::VERSION_1);
    let h = d.submit(0, b"ok", 2);
    d.notify(&mut t, 0);
    assert_eq!(d.take_used(0), vec![(h, 2, b"ok".to_vec())]);
}

#[test]
fn device_side_needs_reset_stops_notifications() {
    let mem = guest_memory();
    let (mut t, _irq) = echo_transport(&mem);
    let mut d = Driver::new(&mem);
    d.init(&mut t, features::VERSION_1);
    t.interrupt().set_needs_reset();
    d.submit(0, b"x", 1);
    d.notify(&mut t, 0);
    assert!(d.take_used(0).is_empty());
    assert_ne!(rd(&mut t, regs::STATUS) & status::DEVICE_NEEDS_RESET, 0);
    assert_eq!(t.device().resets, 1);
}

#[test]
fn ioeventfd_registrations() {
    let mem = guest_memory();
    let (t, _irq) = echo_transport(&mem);
    let base = 0xd000_0000;
    assert_eq!(
        t.notify_registrations(base),
        vec![
            NotifyRegistration {
                queue: 0,
                addr: base + 0x50,
                len: 4,
                datamatch: 0
            },
            NotifyRegistration {
                queue: 1,
                addr: base + 0x50,
                len: 4,
                datamatch: 1
            },
        ]
    );
}
