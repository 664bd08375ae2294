//! Hostile guests and hostile streams: random register traffic, random ring contents and
//! random state must never panic, and the transport's own invariants must hold throughout
//! (in particular, whatever a guest does, the state it leaves can be saved and restored).

mod common;

use baton_virtio::regs::{self, features, interrupt, status};
use baton_virtio::{VirtioMmioState, VirtqueueState};
use baton_vmstate::VmState;
use common::*;
use proptest::prelude::*;
use vm_memory::{Bytes, GuestAddress};

const REGS: &[u64] = &[
    regs::MAGIC,
    regs::VERSION,
    regs::DEVICE_ID,
    regs::VENDOR,
    regs::DEVICE_FEATURES,
    regs::DEVICE_FEATURES_SEL,
    regs::DRIVER_FEATURES,
    regs::DRIVER_FEATURES_SEL,
    regs::QUEUE_SEL,
    regs::QUEUE_NUM_MAX,
    regs::QUEUE_NUM,
    regs::QUEUE_READY,
    regs::QUEUE_NOTIFY,
    regs::INTERRUPT_STATUS,
    regs::INTERRUPT_ACK,
    regs::STATUS,
    regs::QUEUE_DESC_LOW,
    regs::QUEUE_DESC_HIGH,
    regs::QUEUE_DRIVER_LOW,
    regs::QUEUE_DRIVER_HIGH,
    regs::QUEUE_DEVICE_LOW,
    regs::QUEUE_DEVICE_HIGH,
    regs::SHM_SEL,
    regs::SHM_LEN_LOW,
    regs::QUEUE_RESET,
    regs::CONFIG_GENERATION,
    regs::CONFIG,
    regs::CONFIG + 4,
];

/// Values a driver would plausibly write: status steps, sizes, ring addresses.
const VALUES: &[u32] = &[
    0,
    1,
    2,
    3,
    4,
    7,
    8,
    11,
    12,
    15,
    16,
    0x40,
    0x80,
    0x8f,
    256,
    0x8000,
    0x1_0000,
    0x1_1000,
    0x1_2000,
    0x1_4000,
    0x1_5000,
    0x1_6000,
    0x7_fff0,
    0x9_0000,
    0x10_0000,
    0xffff_fff0,
    u32::MAX,
];

#[derive(Clone, Debug)]
enum Op {
    Read {
        off: u64,
        len: usize,
    },
    Write {
        off: u64,
        data: Vec<u8>,
    },
    /// The ioeventfd path.
    Notify(u16),
    /// The guest scribbles on RAM where the rings and buffers are.
    Poke {
        addr: u64,
        val: u64,
    },
    /// The guest publishes `delta` more available entries on queue `q` (of the test
    /// driver's layout), whatever they hold.
    Publish {
        q: u16,
        delta: u16,
    },
    /// The guest writes an available-ring entry.
    AvailEntry {
        q: u16,
        slot: u16,
        head: u16,
    },
    /// The guest writes a descriptor.
    Desc {
        q: u16,
        i: u16,
        addr: u64,
        len: u32,
        flags: u16,
        next: u16,
    },
    /// Live-migrate the device in the middle of it all.
    Migrate,
    /// The restored VM starts.
    NotifyAll,
}

fn offset() -> impl Strategy<Value = u64> {
    prop_oneof![
        8 => proptest::sample::select(REGS),
        2 => 0u64..0x210,
        1 => any::<u64>(),
    ]
}

fn word() -> impl Strategy<Value = u32> {
    prop_oneof![3 => proptest::sample::select(VALUES), 1 => any::<u32>()]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (offset(), prop_oneof![6 => Just(4usize), 1 => 0usize..10])
            .prop_map(|(off, len)| Op::Read { off, len }),
        8 => (offset(), word()).prop_map(|(off, v)| Op::Write { off, data: v.to_le_bytes().to_vec() }),
        1 => (offset(), proptest::collection::vec(any::<u8>(), 0..10))
            .prop_map(|(off, data)| Op::Write { off, data }),
        1 => proptest::sample::select(vec![0u32, 1, 3, 0xb, 0xf, 0x80])
            .prop_map(|v| Op::Write { off: regs::STATUS, data: v.to_le_bytes().to_vec() }),
        1 => (0u16..4).prop_map(Op::Notify),
        2 => (0x1_0000u64..0x1_8000, any::<u64>()).prop_map(|(a, val)| Op::Poke { addr: a & !7, val }),
        1 => (0x10_0000u64..0x14_0000, any::<u64>()).prop_map(|(a, val)| Op::Poke { addr: a & !7, val }),
        2 => (0u16..2, 0u16..20).prop_map(|(q, delta)| Op::Publish { q, delta }),
        2 => (0u16..2, 0u16..20, prop_oneof![0u16..20, any::<u16>()])
            .prop_map(|(q, slot, head)| Op::AvailEntry { q, slot, head }),
        3 => (0u16..2, 0u16..16, desc_addr(), desc_len(), 0u16..8, prop_oneof![0u16..20, any::<u16>()])
            .prop_map(|(q, i, addr, len, flags, next)| Op::Desc { q, i, addr, len, flags, next }),
        1 => Just(Op::Migrate),
        1 => Just(Op::NotifyAll),
    ]
}

fn desc_addr() -> impl Strategy<Value = u64> {
    prop_oneof![
        4 => 0x10_0000u64..0x18_0000,
        1 => 0x7_ff00u64..0x8_0100,
        1 => 0x1_0000u64..0x1_8000,
        1 => any::<u64>(),
    ]
}

fn desc_len() -> impl Strategy<Value = u32> {
    prop_oneof![
        4 => 0u32..300,
        1 => proptest::sample::select(vec![0x1000u32, 0x10_0000, 0x8000_0000, u32::MAX]),
        1 => any::<u32>(),
    ]
}

/// Rings of queue `q` in the test driver's layout: (descriptors, available ring).
fn ring_base(q: u16) -> (u64, u64) {
    let base = 0x1_0000 + u64::from(q) * 0x4000;
    (base, base + 0x1000)
}

/// Fill the ring area with pseudo-random bytes (xorshift from `seed`).
fn scribble(mem: &Mem, seed: u64) {
    let mut x = seed | 1;
    let mut buf = vec![0u8; 0x8000];
    for chunk in buf.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes());
    }
    mem.write_slice(&buf, GuestAddress(0x1_0000))
        .expect("scribble");
}

fn check_invariants(t: &Transport) -> Result<(), TestCaseError> {
    let s = t.status();
    prop_assert_eq!(s & !status::ALL, 0, "status {:#x}", s);
    prop_assert_eq!(t.interrupt().status() & !interrupt::ALL, 0);
    if t.is_active() {
        prop_assert_eq!(
            s & (status::DRIVER_OK | status::FAILED | status::DEVICE_NEEDS_RESET),
            status::DRIVER_OK
        );
    }
    // Whatever the guest did, its state saves, decodes and fits this device.
    let state = t.save_state();
    let back = VirtioMmioState::load(&state.save(), 1);
    prop_assert!(back.is_ok(), "own state refused: {:?}\n{:?}", back, state);
    prop_assert!(t.check_state(&state).is_ok(), "{:?}", t.check_state(&state));
    Ok(())
}

fn run(mem: &Mem, mut t: Transport, ops: &[Op]) -> Result<(), TestCaseError> {
    for op in ops {
        match op {
            Op::Read { off, len } => {
                let mut buf = vec![0u8; *len];
                t.read(*off, &mut buf);
            }
            Op::Write { off, data } => t.write(*off, data),
            Op::Notify(q) => t.notify_queue(*q),
            Op::Poke { addr, val } => mem.write_obj(*val, GuestAddress(*addr)).expect("poke"),
            Op::Publish { q, delta } => {
                let at = GuestAddress(ring_base(*q).1 + 2);
                let idx: u16 = mem.read_obj(at).expect("avail idx");
                mem.write_obj(idx.wrapping_add(*delta), at)
                    .expect("avail idx");
            }
            Op::AvailEntry { q, slot, head } => {
                let at = GuestAddress(ring_base(*q).1 + 4 + 2 * u64::from(*slot));
                mem.write_obj(*head, at).expect("avail entry");
            }
            Op::Desc {
                q,
                i,
                addr,
                len,
                flags,
                next,
            } => {
                let at = ring_base(*q).0 + 16 * u64::from(*i);
                mem.write_obj(*addr, GuestAddress(at)).expect("desc");
                mem.write_obj(*len, GuestAddress(at + 8)).expect("desc");
                mem.write_obj(*flags, GuestAddress(at + 12)).expect("desc");
                mem.write_obj(*next, GuestAddress(at + 14)).expect("desc");
            }
            Op::Migrate => {
                let blob = t.save_state().save();
                let state = VirtioMmioState::load(&blob, 1).expect("own state loads");
                let (mut dst, _irq) = echo_transport(mem);
                let r = dst.restore_state(&state);
                prop_assert!(r.is_ok(), "own state not restorable: {:?}", r);
                prop_assert_eq!(dst.save_state(), state);
                t = dst;
            }
            Op::NotifyAll => t.notify_all_queues(),
        }
        check_invariants(&t)?;
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 10_000, ..ProptestConfig::default() })]

    /// Random MMIO traffic, from power-on or from a running device, over zeroed or
    /// scribbled rings.
    #[test]
    fn random_mmio_never_panics(
        start in 0u8..3,
        seed in proptest::option::of(any::<u64>()),
        ops in proptest::collection::vec(op(), 1..48),
    ) {
        let mem = guest_memory();
        let (mut t, _irq) = echo_transport(&mem);
        let mut d = Driver::new(&mem);
        let wanted = features::VERSION_1 | features::RING_EVENT_IDX | ECHO_F_UPPER;
        match start {
            // Running, with a request served.
            2 => {
                d.init(&mut t, wanted);
                d.submit(0, b"warm", 4);
                d.notify(&mut t, 0);
            }
            // Features negotiated, queue 0 configured, queue 1 not yet.
            1 => {
                d.negotiate(&mut t, wanted).expect("features");
                d.setup_queue(&mut t, 0, 16);
            }
            _ => {}
        }
        if let Some(seed) = seed {
            scribble(&mem, seed);
        }
        run(&mem, t, &ops)?;
    }
}

fn queue_state() -> impl Strategy<Value = VirtqueueState> {
    let size = prop_oneof![
        proptest::sample::select(vec![0u16, 1, 2, 8, 12, 16, 256, 32768]),
        any::<u16>()
    ];
    let addr = prop_oneof![
        proptest::sample::select(vec![
            0u64,
            0x1_0000,
            0x1_1000,
            0x1_2000,
            0x7_fff0,
            0x9_0000,
            u64::MAX - 15
        ]),
        any::<u64>(),
    ];
    (
        size.clone(),
        size,
        any::<bool>(),
        addr.clone(),
        addr.clone(),
        addr,
        any::<u16>(),
        any::<u16>(),
        any::<bool>(),
    )
        .prop_map(
            |(
                max_size,
                size,
                ready,
                desc_table,
                avail_ring,
                used_ring,
                next_avail,
                next_used,
                event_idx,
            )| {
                VirtqueueState {
                    max_size,
                    size,
                    ready,
                    desc_table,
                    avail_ring,
                    used_ring,
                    next_avail,
                    next_used,
                    event_idx,
                }
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 3_000, ..ProptestConfig::default() })]

    /// Random state: refused with a path, or restored into a device that then survives
    /// random traffic with its invariants intact.
    #[test]
    fn random_state_is_refused_or_safe(
        status in prop_oneof![proptest::sample::select(vec![0u8, 1, 3, 11, 15, 0x4f, 0x8f]), any::<u8>()],
        driver_features in prop_oneof![Just(features::VERSION_1), Just(features::VERSION_1 | features::RING_EVENT_IDX), any::<u64>()],
        interrupt_status in 0u8..4,
        queues in proptest::collection::vec(queue_state(), 0..4),
        ops in proptest::collection::vec(op(), 0..16),
    ) {
        let mem = guest_memory();
        let (mut t, _irq) = echo_transport(&mem);
        let s = VirtioMmioState {
            device_type: ECHO_TYPE,
            status,
            device_features: t.offered_features(),
            driver_features,
            interrupt_status,
            queues,
            ..Default::default()
        };
        let decoded = VirtioMmioState::load(&s.save(), 1);
        match t.restore_state(&s) {
            Err(e) => {
                prop_assert!(!e.to_string().is_empty());
                // The codec path refuses what restore's own check refuses, or restore
                // refused it against the device.
                if let Err(d) = decoded {
                    prop_assert!(!d.path_string().is_empty() || !d.to_string().is_empty());
                }
            }
            Ok(()) => {
                prop_assert!(decoded.is_ok());
                check_invariants(&t)?;
                run(&mem, t, &ops)?;
            }
        }
    }

    /// Corrupted blobs of a real running state never panic the decoder or the restore.
    #[test]
    fn corrupted_blob_never_panics(
        flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..6),
        cut in proptest::option::of(any::<prop::sample::Index>()),
    ) {
        let mem = guest_memory();
        let (mut src, _irq) = echo_transport(&mem);
        let mut d = Driver::new(&mem);
        d.init(&mut src, features::VERSION_1 | features::RING_EVENT_IDX);
        d.submit(0, b"x", 1);
        d.notify(&mut src, 0);
        let mut blob = src.save_state().save();
        for (i, b) in flips {
            let i = i.index(blob.len());
            blob[i] = b;
        }
        if let Some(c) = cut {
            blob.truncate(c.index(blob.len()));
        }
        if let Ok(s) = VirtioMmioState::load(&blob, 1) {
            let (mut dst, _irq) = echo_transport(&mem);
            if dst.restore_state(&s).is_ok() {
                check_invariants(&dst)?;
                dst.notify_all_queues();
                check_invariants(&dst)?;
            }
        }
    }
}
