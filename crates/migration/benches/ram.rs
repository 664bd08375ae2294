//! RAM throughput of a remote migration: 256 MiB of non-zero guest pages over UNIX and TCP
//! loopback, on the main channel alone and on 2 RAM channels (multifd), against a plain
//! single-core memcpy of the same size in the same run.
//!
//! Each iteration is a whole migration (handshake, one pre-copy pass over every page, the
//! empty final pass, switchover) between two threads of this process; the destination's
//! RAM is reused, so page faults of fresh memory are in neither side of the ratio.
//!
//! TCP runs inside a private network namespace (loopback only), which needs root; without
//! it the TCP rows are skipped with the reason printed.
//!
//! `cargo bench -p baton-migration --bench ram` (criterion's own report, then a table:
//! GB/s and the ratio to memcpy, medians).

use std::net::TcpListener;
use std::os::unix::net::UnixListener;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use baton_migration::{
    incoming, migrate, Capabilities, DestinationVm, GuestRam, Incoming, IncomingSettings, MemfdRam,
    MigrationMode, MigrationMonitor, MigrationSettings, Parameters, RamLayout, RamRegion, SourceVm,
    Target, VmControl,
};
use criterion::{black_box, Criterion, Throughput};

const RAM: u64 = 256 << 20;

struct NoVcpus;

impl VmControl for NoVcpus {
    fn pause(&mut self) -> Result<(), String> {
        Ok(())
    }
    fn resume(&mut self) -> Result<(), String> {
        Ok(())
    }
}

fn layout() -> RamLayout {
    RamLayout {
        regions: vec![
            RamRegion {
                gpa: 0,
                size: RAM / 2,
            },
            RamRegion {
                gpa: 1 << 32,
                size: RAM / 2,
            },
        ],
    }
}

/// Guest RAM where every page holds data (no zero-page shortcut).
fn filled_ram() -> MemfdRam {
    let ram = MemfdRam::new(&layout()).expect("RAM");
    let mut page = vec![0u8; 4096];
    for (r, reg) in layout().regions.iter().enumerate() {
        for p in 0..reg.pages() {
            for (i, b) in page.iter_mut().enumerate() {
                *b = (p as u8).wrapping_mul(31) ^ (i as u8) | 1;
            }
            ram.write(r, p * 4096, &page).expect("fill");
        }
    }
    ram
}

#[derive(Clone, Copy)]
enum Via {
    Unix,
    Tcp,
}

fn one_migration(via: Via, channels: u16, src: &MemfdRam, dst: &mut MemfdRam) -> Duration {
    let dir = std::env::temp_dir().join(format!("baton-bench-{}", std::process::id()));
    let _ = std::fs::create_dir_all(&dir);
    let (listener, target) = match via {
        Via::Unix => {
            let p = dir.join("ram.sock");
            let _ = std::fs::remove_file(&p);
            (
                Incoming::Unix(UnixListener::bind(&p).expect("bind")),
                Target::Unix(p),
            )
        }
        Via::Tcp => {
            let l = TcpListener::bind("127.0.0.1:0").expect("bind");
            let a = l.local_addr().expect("addr");
            (Incoming::Tcp(l), Target::Tcp(a.to_string()))
        }
    };
    let caps = Capabilities {
        multifd: channels > 1,
        ..Default::default()
    };
    let settings = MigrationSettings {
        mode: MigrationMode::Remote,
        machine_type: "bench".into(),
        capabilities: caps.clone(),
        parameters: Parameters {
            multifd_channels: channels,
            ..Parameters::default()
        },
    };
    let t = Instant::now();
    std::thread::scope(|s| {
        let d = s.spawn(|| {
            incoming(
                listener,
                &IncomingSettings {
                    machine_type: "bench".into(),
                    capabilities: caps.clone(),
                },
                DestinationVm {
                    devices: &mut [],
                    ram: dst,
                    control: &mut NoVcpus,
                },
                &MigrationMonitor::new(),
            )
            .expect("incoming")
        });
        let mut log = src.write_log();
        let out = migrate(
            &target,
            &settings,
            SourceVm {
                devices: &mut [],
                ram: src,
                dirty_log: &mut log,
                control: &mut NoVcpus,
            },
            &MigrationMonitor::new(),
        )
        .expect("migration");
        assert!(out.ram.normal * 4096 >= RAM, "every page went with data");
        d.join().expect("destination thread");
    });
    t.elapsed()
}

/// Per row: every measured (wall, CPU) duration, for the summary.
type Times = Vec<(String, Vec<Duration>, Vec<Duration>)>;
static TIMES: Mutex<Times> = Mutex::new(Vec::new());

fn record(name: &str, d: Duration, cpu: Duration) {
    let mut t = TIMES.lock().unwrap();
    match t.iter_mut().find(|(n, _, _)| n == name) {
        Some((_, v, c)) => {
            v.push(d);
            c.push(cpu);
        }
        None => t.push((name.to_owned(), vec![d], vec![cpu])),
    }
}

/// CPU time of the whole process (every thread, user and system): unlike wall time it
/// does not grow when other work shares the machine's cores.
fn cpu_time() -> Duration {
    // SAFETY: getrusage fills the struct it is given.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(u.ru_utime) + tv(u.ru_stime)
}

fn median(v: &[Duration]) -> Duration {
    let mut v = v.to_vec();
    v.sort();
    v[v.len() / 2]
}

fn main() {
    // Before any thread exists: TCP stays inside a namespace of our own.
    let netns = private_netns();
    let mut c = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(5))
        .configure_from_args();
    let src = filled_ram();
    let mut dst = MemfdRam::new(&layout()).expect("RAM");
    // Fault the destination in once; every migration after writes over the same pages.
    one_migration(Via::Unix, 1, &src, &mut dst);

    let mut g = c.benchmark_group("ram");
    g.throughput(Throughput::Bytes(RAM));
    let from = src.snapshot(0).expect("region");
    let mut to = vec![0u8; from.len() * 2];
    g.bench_function("memcpy", |b| {
        b.iter_custom(|n| {
            let mut total = Duration::ZERO;
            for _ in 0..n {
                let (t, c) = (Instant::now(), cpu_time());
                // The same bytes as the migration: two halves of 128 MiB.
                to[..from.len()].copy_from_slice(black_box(&from));
                to[from.len()..].copy_from_slice(black_box(&from));
                let d = t.elapsed();
                black_box(&to);
                record("memcpy", d, cpu_time() - c);
                total += d;
            }
            total
        })
    });
    let mut rows = vec![
        (Via::Unix, 1u16, "unix, 1 channel"),
        (Via::Unix, 2, "unix, 2 RAM channels"),
    ];
    match &netns {
        Ok(()) => {
            rows.push((Via::Tcp, 1, "tcp, 1 channel"));
            rows.push((Via::Tcp, 2, "tcp, 2 RAM channels"));
        }
        Err(why) => {
            if std::env::var("BATON_CI").as_deref() == Ok("1") {
                panic!("TCP benchmark needs a private network namespace: {why}");
            }
            eprintln!("SKIPPED tcp rows: {why}");
        }
    }
    for (via, channels, name) in rows.iter().copied() {
        g.bench_function(name, |b| {
            b.iter_custom(|n| {
                let mut total = Duration::ZERO;
                for _ in 0..n {
                    let c = cpu_time();
                    let d = one_migration(via, channels, &src, &mut dst);
                    record(name, d, cpu_time() - c);
                    total += d;
                }
                total
            })
        });
    }
    g.finish();
    assert_eq!(
        src.snapshot(1),
        dst.snapshot(1),
        "the destination holds the RAM"
    );

    let times = TIMES.lock().unwrap();
    let (memcpy, memcpy_cpu) = times
        .iter()
        .find(|(n, _, _)| n == "memcpy")
        .map(|(_, v, c)| (median(v), median(c)))
        .expect("memcpy measured");
    println!("\nRAM throughput, {} MiB, medians:", RAM >> 20);
    println!(
        "{:<24} {:>9} {:>8} {:>9} {:>8} {:>10}",
        "", "wall ms", "GB/s", "x memcpy", "CPU ms", "CPU x mc"
    );
    for (name, v, c) in times.iter() {
        let (m, cpu) = (median(v), median(c));
        println!(
            "{:<24} {:>9.1} {:>8.2} {:>9.2} {:>8.1} {:>10.2}",
            name,
            m.as_secs_f64() * 1e3,
            RAM as f64 / m.as_secs_f64() / 1e9,
            memcpy.as_secs_f64() / m.as_secs_f64(),
            cpu.as_secs_f64() * 1e3,
            cpu.as_secs_f64() / memcpy_cpu.as_secs_f64()
        );
    }
    println!(
        "(x memcpy: memcpy's wall time over the row's, higher is better; CPU x mc: the \
         row's CPU time over memcpy's, lower is better; load average {})",
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .trim()
    );
}

fn private_netns() -> Result<(), String> {
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)
        .map_err(|e| format!("unshare(CLONE_NEWNET): {e} (needs root)"))?;
    let st = std::process::Command::new("ip")
        .args(["link", "set", "lo", "up"])
        .status()
        .map_err(|e| format!("running ip: {e}"))?;
    if !st.success() {
        return Err("ip link set lo up failed".into());
    }
    Ok(())
}
