//! Encode and decode of a virtio-net-shaped state with 1024 queues (target: load < 0.5 ms).
//! A memcpy of the same byte count runs in the same process as the baseline.

use baton_vmstate::{VmState, VmStateError};
use criterion::{black_box, criterion_group, criterion_main, Criterion};

#[derive(VmState, Clone, Default)]
#[vmstate(name = "virtio-queue", version = 1)]
struct QueueState {
    max_size: u16,
    size: u16,
    ready: bool,
    desc_table: u64,
    avail_ring: u64,
    used_ring: u64,
    next_avail: u16,
    next_used: u16,
    event_idx_enabled: bool,
    vector: u16,
}

#[derive(VmState, Clone, Default)]
#[vmstate(name = "virtio-net", version = 1, validate = check)]
struct NetState {
    device_features: u64,
    driver_features: u64,
    status: u8,
    config_generation: u8,
    mac: [u8; 6],
    link_up: bool,
    max_queue_pairs: u16,
    curr_queue_pairs: u16,
    #[vmstate(max = 2049)]
    queues: Vec<QueueState>,
}

fn check(s: &NetState) -> Result<(), VmStateError> {
    for (i, q) in s.queues.iter().enumerate() {
        if q.size > q.max_size {
            return Err(VmStateError::invalid(
                &format!("queues[{i}].size"),
                format!("{} exceeds max {}", q.size, q.max_size),
            ));
        }
    }
    Ok(())
}

fn state() -> NetState {
    NetState {
        device_features: 0x1_3000_ffff,
        driver_features: 0x1_0000_0021,
        status: 0xf,
        mac: [0x52, 0x54, 0, 1, 2, 3],
        link_up: true,
        max_queue_pairs: 512,
        curr_queue_pairs: 512,
        queues: (0..1024u64)
            .map(|i| QueueState {
                max_size: 256,
                size: 256,
                ready: true,
                desc_table: 0x10_0000 + i * 0x4000,
                avail_ring: 0x10_1000 + i * 0x4000,
                used_ring: 0x10_2000 + i * 0x4000,
                next_avail: (i * 7) as u16 % 256,
                next_used: (i * 5) as u16 % 256,
                event_idx_enabled: true,
                vector: i as u16,
            })
            .collect(),
        ..NetState::default()
    }
}

fn bench(c: &mut Criterion) {
    let s = state();
    let blob = s.save();
    eprintln!("virtio-net state with 1024 queues: {} bytes", blob.len());
    let mut g = c.benchmark_group("virtio-net-1024-queues");
    g.bench_function("memcpy-baseline", |b| {
        let mut dst = vec![0u8; blob.len()];
        b.iter(|| dst.copy_from_slice(black_box(&blob)))
    });
    g.bench_function("encode", |b| b.iter(|| black_box(&s).save()));
    g.bench_function("decode", |b| {
        b.iter(|| NetState::load(black_box(&blob), 1).map(|s| s.queues.len()))
    });
    g.bench_function("decode-to-json", |b| {
        b.iter(|| baton_vmstate::decode_to_json(NetState::vmsd(), black_box(&blob), 1))
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
