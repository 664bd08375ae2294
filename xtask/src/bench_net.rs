//! `cargo xtask bench net-update`: local live update of a guest exchanging network
//! frames at a steady rate, baton vs QEMU 7.2, in one run (issue 6's benchmark).
//!
//! Three rows, interleaved run by run (`--runs`, default 10 each):
//! * `baton-net`: baton-vmm with `--device virtio-net-tap,...,queues=2` (two queue
//!   pairs, the guest drives pair 0), capabilities
//!   `x-ignore-shared,backend-transfer,early-setup`: the TAP queue fds change process;
//! * `baton-nonet`: the same guest and VMM without the net device (the guest runs its
//!   memory workload instead of the net loop): the baseline;
//! * `qemu-net`: QEMU 7.2 TCG, `-M microvm`, RAM `memory-backend-file` on `/dev/shm`
//!   `share=on`, `x-ignore-shared`, `-netdev tap,ifname=tap0,queues=2` +
//!   `-device virtio-net-device,mq=on` with `-global virtio-mmio.force-legacy=false`
//!   (the guest drives virtio-mmio v2): QEMU's destination opens the TAP again, which a
//!   persistent multi-queue TAP allows while the source still holds its queues.
//!
//! Each run creates its own network namespace (`ip netns add`), a persistent
//! multi-queue `tap0` with vnet headers in it, and runs every VMM and the host side of
//! the traffic inside it (`ip netns exec`); the namespace (and the TAP with it) is
//! deleted when the run ends, failed or not. Nothing touches the host's namespace.
//!
//! Traffic: the guest runs `baton.net=seq baton.net_rate=2` (its own numbered frames,
//! 200/s, and echoes of the host's); the host side (a small Python AF_PACKET peer,
//! xtask has no dependencies) sends numbered frames every 5 ms and counts the guest's
//! frames and the echoes. Frames lost = host frames never echoed (after the host stops
//! and waits 1 s) + forward jumps in the guest's sequence seen by the host; the guest's
//! own `net ... lost=` (host frames it never saw) is kept too.
//!
//! Downtime, as in `bench live-update`: baton's `downtime X ms (pause to resume ...)`
//! line of the source log with its breakdown, `query-migrate` `downtime` for both, and
//! the guest line gap: the host arrival-time gap between vCPU 0's last line from the
//! source and its first from the destination (`net tx=` lines in net mode, `status
//! cpu=0` lines otherwise, every `baton.report_ms` = 10 ms), and that minus the usual
//! interval. One vCPU everywhere: under QEMU the guest starts no APs.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::bench::{
    cell, fmt_ratio, json_num, json_str, loadavg, migrate, ms, parse_breakdown, parse_size,
    qemu_local_capabilities, ratio, size_arg, size_label, wait_path, Json, Line, Proc, Qmp,
    RunLogs, Scratch, Summary, VMM_NICE,
};
use crate::{err, guest, qemu, Result};

const USAGE: &str = "usage: cargo xtask bench net-update [--runs N] [--memory SIZE] \
[--timeout SECS] [--no-qemu] [--out PATH] [--vmm PATH]";

const GUEST_MAC: &str = "52:54:00:12:34:56";
const CAPS: &str = "x-ignore-shared,backend-transfer,early-setup";
const REPORT_MS: u64 = 10;
/// Guest lines on the source before the update, and on the destination after it.
const LINES_BEFORE: usize = 30;
const LINES_AFTER: usize = 30;
/// Host frames: one every 5 ms (200/s), like the guest's own.
const HOST_INTERVAL_S: &str = "0.005";

/// The host side of the traffic, run as `python3 - IFNAME STOPFILE INTERVAL` in the
/// namespace: sends numbered frames to the guest until STOPFILE exists, then waits 1 s
/// for the last echoes and prints `final k=v ...`; prints `stats k=v ...` every 100 ms.
const PEER_PY: &str = r#"
import os, socket, struct, sys, threading, time
ifname, stop_file, interval = sys.argv[1], sys.argv[2], float(sys.argv[3])
GUEST = bytes.fromhex('525400123456'); HOST = bytes.fromhex('02ba70000001')
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3))
s.bind((ifname, 0))
s.settimeout(0.05)
lock = threading.Lock()
st = dict(host_sent=0, send_errors=0, echoes=0, echo_dups=0, guest_frames=0,
          guest_first=-1, guest_lost=0, guest_dup=0)
echoed = set(); nxt = [None]; stop = threading.Event()
def rx():
    while not stop.is_set():
        try:
            f, addr = s.recvfrom(70000)
        except socket.timeout:
            continue
        if addr[2] == 4 or len(f) < 18:
            continue
        et = struct.unpack('>H', f[12:14])[0]
        seq = struct.unpack('<I', f[14:18])[0]
        with lock:
            if et == 0x88b5 and f[6:12] == GUEST:
                st['guest_frames'] += 1
                if st['guest_first'] < 0:
                    st['guest_first'] = seq
                n = nxt[0]
                if n is not None and seq > n:
                    st['guest_lost'] += seq - n
                elif n is not None and seq < n:
                    st['guest_dup'] += 1
                if n is None or seq >= n:
                    nxt[0] = seq + 1
            elif et == 0x88b6 and f[0:6] == HOST:
                if seq in echoed:
                    st['echo_dups'] += 1
                else:
                    echoed.add(seq); st['echoes'] += 1
def show(kind):
    with lock:
        print(kind + ' ' + ' '.join('%s=%d' % kv for kv in st.items()), flush=True)
t = threading.Thread(target=rx); t.start()
seq = 0; nextt = time.monotonic(); last = 0.0
while not os.path.exists(stop_file):
    frame = GUEST + HOST + b'\x88\xb5' + struct.pack('<I', seq) + bytes((seq + i) & 255 for i in range(42))
    try:
        s.send(frame)
        with lock:
            st['host_sent'] += 1
        seq += 1
    except OSError:
        with lock:
            st['send_errors'] += 1
    now = time.monotonic()
    if now - last >= 0.1:
        last = now; show('stats')
    nextt += interval
    if nextt > now:
        time.sleep(nextt - now)
    else:
        nextt = now
time.sleep(1.0)
stop.set(); t.join()
show('final')
"#;

/// `cargo xtask bench net-update ARGS`.
pub fn main(args: &[String]) -> Result<()> {
    let opts = Options::parse(args)?;
    net_update(&opts)
}

#[derive(Clone, Debug)]
pub struct Options {
    pub runs: usize,
    pub memory: u64,
    pub timeout: Duration,
    pub qemu: bool,
    pub out: Option<PathBuf>,
    pub vmm: Option<PathBuf>,
}

impl Options {
    pub fn parse(args: &[String]) -> Result<Self> {
        let mut o = Options {
            runs: 10,
            memory: 256 << 20,
            timeout: Duration::from_secs(60),
            qemu: true,
            out: None,
            vmm: None,
        };
        let mut it = args.iter();
        while let Some(flag) = it.next() {
            let mut value = || {
                it.next()
                    .cloned()
                    .ok_or_else(|| err!("{flag} needs a value\n{USAGE}"))
            };
            match flag.as_str() {
                "--runs" => o.runs = value()?.parse().map_err(|e| err!("--runs: {e}"))?,
                "--memory" => o.memory = parse_size(&value()?)?,
                "--timeout" => {
                    let s: u64 = value()?.parse().map_err(|e| err!("--timeout: {e}"))?;
                    o.timeout = Duration::from_secs(s);
                }
                "--no-qemu" => o.qemu = false,
                "--out" => o.out = Some(PathBuf::from(value()?)),
                "--vmm" => o.vmm = Some(PathBuf::from(value()?)),
                other => return Err(err!("unknown option {other}\n{USAGE}")),
            }
        }
        if o.runs == 0 {
            return Err(err!("--runs must be at least 1"));
        }
        Ok(o)
    }
}

// ---------------------------------------------------------------------------------------
// Namespace and host-side traffic.

fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| err!("running ip: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(err!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// A network namespace with a persistent multi-queue `tap0`; both deleted on drop.
struct Netns {
    name: String,
}

impl Netns {
    fn new(tag: &str) -> Result<Netns> {
        let name = format!("bbench-{}-{tag}", std::process::id() % 100000);
        let _ = ip(&["netns", "del", &name]);
        ip(&["netns", "add", &name])?;
        let ns = Netns { name };
        let n = ns.name.clone();
        ip(&["-n", &n, "link", "set", "lo", "up"])?;
        ip(&[
            "-n",
            &n,
            "tuntap",
            "add",
            "dev",
            "tap0",
            "mode",
            "tap",
            "multi_queue",
            "vnet_hdr",
        ])?;
        ip(&["-n", &n, "link", "set", "tap0", "addrgenmode", "none"])?;
        ip(&["-n", &n, "link", "set", "tap0", "up"])?;
        Ok(ns)
    }

    /// `ip netns exec NS nice -n 10 PROGRAM` with `cmd`'s arguments and environment.
    fn command(&self, cmd: Command, nice: bool) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name]);
        if nice {
            c.args(["nice", "-n", VMM_NICE]);
        }
        c.arg(cmd.get_program()).args(cmd.get_args());
        for (k, v) in cmd.get_envs() {
            match v {
                Some(v) => c.env(k, v),
                None => c.env_remove(k),
            };
        }
        c
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = ip(&["-n", &self.name, "link", "del", "tap0"]);
        let _ = ip(&["netns", "del", &self.name]);
    }
}

/// The last `kind k=v ...` line of the peer, as numbers.
fn peer_stats(lines: &[Line], kind: &str) -> Option<Vec<(String, i64)>> {
    let l = lines
        .iter()
        .rev()
        .find(|l| !l.stderr && l.text.starts_with(&format!("{kind} ")))?;
    Some(
        l.text
            .split_whitespace()
            .skip(1)
            .filter_map(|kv| {
                let (k, v) = kv.split_once('=')?;
                Some((k.to_owned(), v.parse().ok()?))
            })
            .collect(),
    )
}

fn get(kv: &[(String, i64)], key: &str) -> i64 {
    kv.iter().find(|(k, _)| k == key).map_or(0, |(_, v)| *v)
}

/// `k=v` fields of the guest's last `baton-guest: net ...` line on stdout.
fn guest_net(lines: &[Line]) -> Option<Vec<(String, i64)>> {
    let l = lines
        .iter()
        .rev()
        .find(|l| !l.stderr && l.text.contains("baton-guest: net tx="))?;
    let rest = l.text.split_once("baton-guest: net ")?.1;
    Some(
        rest.split_whitespace()
            .filter_map(|kv| {
                let (k, v) = kv.split_once('=')?;
                Some((k.to_owned(), v.parse().ok()?))
            })
            .collect(),
    )
}

// ---------------------------------------------------------------------------------------
// The guest's vCPU 0 line stream.

/// `(arrival, counter)` of vCPU 0's periodic lines: `net tx=N` in net mode, `status
/// cpu=0 pass=N` otherwise.
fn cpu0_lines(lines: &[Line]) -> Vec<(Instant, u64)> {
    lines
        .iter()
        .filter(|l| !l.stderr)
        .filter_map(|l| {
            let rest = l.text.split_once("baton-guest: ")?.1;
            let (want, key) = if rest.starts_with("net tx=") {
                (true, "tx")
            } else if rest.starts_with("status cpu=0 ") {
                (true, "pass")
            } else {
                (false, "")
            };
            if !want {
                return None;
            }
            let v = rest
                .split_whitespace()
                .filter_map(|kv| kv.split_once('='))
                .find(|(k, _)| *k == key)?
                .1
                .parse()
                .ok()?;
            Some((l.at, v))
        })
        .collect()
}

#[derive(Clone, Debug, Default)]
struct Gap {
    gap_ms: f64,
    interval_ms: f64,
    excess_ms: f64,
}

fn guest_gap(src: &[Line], dst: &[Line]) -> Result<Gap> {
    let s = cpu0_lines(src);
    let d = cpu0_lines(dst);
    let Some(&(last_at, last_n)) = s.last() else {
        return Err(err!("no vCPU 0 lines from the source"));
    };
    let Some(&(first_at, first_n)) = d.first() else {
        return Err(err!("no vCPU 0 lines from the destination"));
    };
    if first_n < last_n {
        return Err(err!(
            "vCPU 0 went back: {last_n} on the source, then {first_n} on the destination"
        ));
    }
    let tail = &s[s.len().saturating_sub(51)..];
    let intervals: Vec<f64> = tail
        .windows(2)
        .map(|w| ms(w[1].0.saturating_duration_since(w[0].0)))
        .collect();
    let interval_ms = Summary::of(&intervals).map_or(0.0, |s| s.median);
    let gap_ms = ms(first_at.saturating_duration_since(last_at));
    Ok(Gap {
        gap_ms,
        interval_ms,
        excess_ms: gap_ms - interval_ms,
    })
}

// ---------------------------------------------------------------------------------------
// Runs.

#[derive(Clone, Copy, Debug, PartialEq)]
enum Kind {
    Baton,
    Baseline,
    Qemu,
}

impl Kind {
    fn key(self) -> &'static str {
        match self {
            Kind::Baton => "baton-net",
            Kind::Baseline => "baton-nonet",
            Kind::Qemu => "qemu-net",
        }
    }
    fn label(self) -> &'static str {
        match self {
            Kind::Baton => "baton virtio-net 2q",
            Kind::Baseline => "baton no net device",
            Kind::Qemu => "QEMU 7.2 TCG virtio-net",
        }
    }
    fn net(self) -> bool {
        self != Kind::Baseline
    }
    fn cmdline(self) -> String {
        if self.net() {
            format!("baton.net=seq baton.net_rate=2 baton.report_ms={REPORT_MS}")
        } else {
            format!("baton.passes=0 baton.report_ms={REPORT_MS} baton.region=1M")
        }
    }
}

#[derive(Clone, Debug, Default)]
struct RunResult {
    qmp_downtime_ms: Option<f64>,
    log_downtime_ms: Option<f64>,
    phases: Vec<(String, f64)>,
    gap: Gap,
    /// Host-side counts (net rows): host frames sent / never echoed / echoed twice,
    /// guest frames seen / lost (forward jumps) / duplicated.
    host_sent: i64,
    host_lost: i64,
    echo_dups: i64,
    guest_frames: i64,
    guest_lost: i64,
    guest_dup: i64,
    /// The guest's own `lost=` / `dup=` at the end (host frames it never saw).
    guest_saw_lost: Option<i64>,
    guest_saw_dup: Option<i64>,
}

impl RunResult {
    fn own(&self) -> Option<f64> {
        self.log_downtime_ms.or(self.qmp_downtime_ms)
    }
    fn frames_lost(&self) -> i64 {
        self.host_lost + self.guest_lost
    }
}

struct Ctx {
    vmm: PathBuf,
    elf: PathBuf,
    qemu: Option<qemu::Qemu>,
    opts: Options,
    logs: PathBuf,
    load_before: String,
    host_cpus: usize,
}

fn net_update(opts: &Options) -> Result<()> {
    let target = crate::target_dir();
    let vmm = match &opts.vmm {
        Some(v) => v.clone(),
        None => {
            eprintln!("xtask: building baton-vmm (release) and the guest");
            crate::bench::build_vmm(&target)?
        }
    };
    let elf = guest::build(&target)?;
    let qemu = if opts.qemu {
        Some(qemu::fetch(&target)?)
    } else {
        None
    };
    if Command::new("python3")
        .arg("--version")
        .output()
        .map_or(true, |o| !o.status.success())
    {
        return Err(err!(
            "python3 is needed for the host side of the traffic (AF_PACKET peer)"
        ));
    }
    let logs = target.join("bench").join("net-update-logs");
    let _ = std::fs::remove_dir_all(&logs);
    std::fs::create_dir_all(&logs).map_err(|e| err!("creating {}: {e}", logs.display()))?;
    let ctx = Ctx {
        vmm,
        elf,
        qemu,
        opts: opts.clone(),
        logs,
        load_before: loadavg(),
        host_cpus: std::thread::available_parallelism().map_or(0, |n| n.get()),
    };
    eprintln!(
        "xtask: {} host CPUs, load average {}",
        ctx.host_cpus, ctx.load_before
    );
    let mut kinds = vec![Kind::Baton, Kind::Baseline];
    if ctx.qemu.is_some() {
        kinds.push(Kind::Qemu);
    }
    let mut series: Vec<(Kind, Vec<RunResult>)> = kinds.iter().map(|k| (*k, Vec::new())).collect();
    let started = Instant::now();
    for run in 0..opts.runs {
        for (kind, runs) in series.iter_mut() {
            let tag = format!("{}-{run}", kind.key());
            let r = one_run(&ctx, *kind, &tag).map_err(|e| {
                err!(
                    "run {}/{} of {}: {e}\n(logs in {})",
                    run + 1,
                    opts.runs,
                    kind.label(),
                    ctx.logs.display()
                )
            })?;
            eprintln!(
                "xtask: run {:>2}/{} {:<24} downtime {:>8} ms (query-migrate {:>4} ms)  guest gap {:>7.2} ms (interval {:>5.2})  frames lost {} (host frames not echoed {}, guest frames lost {}; guest says lost={})",
                run + 1,
                opts.runs,
                kind.label(),
                r.own().map_or("-".into(), |v| format!("{v:.3}")),
                r.qmp_downtime_ms.map_or("-".into(), |v| format!("{v:.0}")),
                r.gap.gap_ms,
                r.gap.interval_ms,
                r.frames_lost(),
                r.host_lost,
                r.guest_lost,
                r.guest_saw_lost.map_or("-".into(), |v| v.to_string()),
            );
            runs.push(r);
        }
    }
    let (table, json) = render(&ctx, &series, started.elapsed());
    print!("{table}");
    let out = opts
        .out
        .clone()
        .unwrap_or_else(|| target.join("bench").join("net-update.json"));
    if let Some(dir) = out.parent() {
        std::fs::create_dir_all(dir).map_err(|e| err!("creating {}: {e}", dir.display()))?;
    }
    std::fs::write(&out, json).map_err(|e| err!("writing {}: {e}", out.display()))?;
    println!("xtask: numbers written to {}", out.display());
    Ok(())
}

fn wait_cpu0(p: &mut Proc, what: &str, n: usize, deadline: Instant) -> Result<()> {
    p.wait_for(what, deadline, |l| cpu0_lines(l).len() >= n)
}

/// Frames flow both ways before the destination starts (QEMU's destination opening the
/// TAP is part of what is measured).
fn flowing_before(peer: &mut Option<Proc>, deadline: Instant) -> Result<()> {
    if let Some(p) = peer.as_mut() {
        p.wait_for("frames flowing before the update", deadline, |l| {
            peer_stats(l, "stats")
                .is_some_and(|s| get(&s, "guest_frames") >= 100 && get(&s, "echoes") >= 100)
        })?;
    }
    Ok(())
}

fn one_run(ctx: &Ctx, kind: Kind, tag: &str) -> Result<RunResult> {
    let mut scratch = Scratch::new(tag)?;
    let (s_qmp, d_qmp, mig, stop) = (
        scratch.path("src.qmp"),
        scratch.path("dst.qmp"),
        scratch.path("mig.sock"),
        scratch.path("stop-traffic"),
    );
    let uri = format!("unix:{}", mig.display());
    let deadline = Instant::now() + ctx.opts.timeout;
    let ns = Netns::new(&tag.replace("baton-", "b").replace("qemu-", "q"))?;
    let mem = size_arg(ctx.opts.memory);
    let mut logs = RunLogs::new(&ctx.logs, tag);

    // Host-side traffic first: it sends into the TAP from the start.
    let mut peer = if kind.net() {
        let script = scratch.path("peer.py");
        std::fs::write(&script, PEER_PY).map_err(|e| err!("writing the peer script: {e}"))?;
        let mut c = Command::new("python3");
        c.arg(&script).arg("tap0").arg(&stop).arg(HOST_INTERVAL_S);
        let p = Proc::spawn("traffic peer", ns.command(c, false))?;
        logs.add("peer", &p);
        Some(p)
    } else {
        None
    };

    let (mut src, mut dst, mut qs, mut qd);
    match kind {
        Kind::Baton | Kind::Baseline => {
            let base = |c: &mut Command, qmp: &Path| {
                c.args(["--machine", "microvm", "--memory", &mem, "--cpus", "1"])
                    .arg("--qmp")
                    .arg(qmp)
                    .args(["--migrate-capabilities", CAPS]);
                if kind.net() {
                    c.arg("--device").arg(format!(
                        "virtio-net-tap,id=net0,ifname=tap0,mac={GUEST_MAC},queues=2"
                    ));
                }
            };
            let mut c = Command::new(&ctx.vmm);
            c.arg("--kernel").arg(&ctx.elf);
            base(&mut c, &s_qmp);
            c.arg("--cmdline").arg(kind.cmdline());
            src = Proc::spawn("baton-vmm source", ns.command(c, true))?;
            logs.add("src", &src);
            wait_cpu0(&mut src, "vCPU 0 lines", LINES_BEFORE, deadline)?;
            flowing_before(&mut peer, deadline)?;
            let mut c = Command::new(&ctx.vmm);
            c.arg("--incoming").arg(&uri);
            base(&mut c, &d_qmp);
            dst = Proc::spawn("baton-vmm destination", ns.command(c, true))?;
            logs.add("dst", &dst);
            wait_path(&d_qmp, "its QMP socket", deadline, &mut dst)?;
            wait_path(&mig, "its migration socket", deadline, &mut dst)?;
            qs = Qmp::connect("baton-vmm source", &s_qmp, deadline)?;
            qd = Qmp::connect("baton-vmm destination", &d_qmp, deadline)?;
        }
        Kind::Qemu => {
            let q = ctx
                .qemu
                .as_ref()
                .ok_or_else(|| err!("QEMU row without QEMU"))?;
            let shm = PathBuf::from(format!(
                "/dev/shm/baton-bench-net-{}-{tag}",
                std::process::id()
            ));
            let _ = std::fs::remove_file(&shm);
            scratch.shm = Some(shm.clone());
            let machine = |qmp: &Path| {
                let mut c = q.command();
                c.args(["-M", "microvm,acpi=off,memory-backend=mem", "-accel", "tcg"])
                    .arg("-object")
                    .arg(format!(
                        "memory-backend-file,id=mem,size={mem},mem-path={},share=on",
                        shm.display()
                    ))
                    .args(["-m", &mem, "-smp", "1"])
                    .args(["-nodefaults", "-no-user-config", "-display", "none"])
                    .args(["-global", "virtio-mmio.force-legacy=false"])
                    .args([
                        "-netdev",
                        "tap,id=n0,ifname=tap0,script=no,downscript=no,vhost=off,queues=2",
                        "-device",
                    ])
                    // Without `mq=on`: the guest declines MQ anyway, and with it QEMU 7.2
                    // stopped moving frames after a few dozen here.
                    .arg(format!("virtio-net-device,netdev=n0,mac={GUEST_MAC}"))
                    .args(["-serial", "stdio", "-qmp"])
                    .arg(format!("unix:{},server=on,wait=off", qmp.display()));
                c
            };
            let mut c = machine(&s_qmp);
            c.arg("-kernel")
                .arg(&ctx.elf)
                .arg("-append")
                .arg(format!("baton.console=pio:0x3f8 {}", kind.cmdline()));
            src = Proc::spawn("QEMU source", ns.command(c, true))?;
            logs.add("src", &src);
            wait_cpu0(&mut src, "vCPU 0 lines", LINES_BEFORE, deadline)?;
            flowing_before(&mut peer, deadline)?;
            let mut c = machine(&d_qmp);
            c.arg("-incoming").arg(&uri);
            dst = Proc::spawn("QEMU destination", ns.command(c, true))?;
            logs.add("dst", &dst);
            wait_path(&d_qmp, "its QMP socket", deadline, &mut dst)?;
            wait_path(&mig, "its migration socket", deadline, &mut dst)?;
            qs = Qmp::connect("QEMU source", &s_qmp, deadline)?;
            qd = Qmp::connect("QEMU destination", &d_qmp, deadline)?;
            let _ = std::fs::remove_file(&shm);
            qemu_local_capabilities(&mut qs, &mut qd, deadline)?;
        }
    }
    let ev = migrate(&mut qs, &uri, &src, &dst, deadline)?;
    let info = qs.execute("query-migrate", "{}", deadline).ok();
    if ev.str_at(&["data", "status"]) != Some("completed") {
        return Err(err!(
            "migration ended {:?}: {:?}\n{}\n{}",
            ev.str_at(&["data", "status"]),
            info.as_ref().and_then(|i| i.str_at(&["error-desc"])),
            src.tail(30),
            dst.tail(30)
        ));
    }
    let qmp_downtime_ms = info
        .as_ref()
        .and_then(|i| i.get("downtime").and_then(Json::as_f64));
    wait_cpu0(
        &mut dst,
        "vCPU 0 lines after the update",
        LINES_AFTER,
        deadline,
    )?;
    if let Some(p) = peer.as_mut() {
        let before = p.with_lines(|l| peer_stats(l, "stats")).unwrap_or_default();
        let (g0, e0) = (get(&before, "guest_frames"), get(&before, "echoes"));
        p.wait_for("frames flowing after the update", deadline, |l| {
            peer_stats(l, "stats").is_some_and(|s| {
                get(&s, "guest_frames") >= g0 + 100 && get(&s, "echoes") >= e0 + 100
            })
        })?;
        std::fs::write(&stop, b"").map_err(|e| err!("writing {}: {e}", stop.display()))?;
        p.wait_for("its final counts", deadline, |l| {
            peer_stats(l, "final").is_some()
        })?;
    }
    let status = qd.execute("query-status", "{}", deadline)?;
    if status.str_at(&["status"]) != Some("running") {
        return Err(err!(
            "destination is {:?} after the update",
            status.str_at(&["status"])
        ));
    }
    match kind {
        Kind::Qemu => {
            for (qmp, p) in [(&mut qs, &mut src), (&mut qd, &mut dst)] {
                let _ = qmp.execute("quit", "{}", deadline);
                p.wait_exit(deadline)?;
            }
        }
        _ => {
            drop(qs);
            let st = src.wait_exit(deadline)?;
            if !st.success() {
                return Err(err!(
                    "baton source exited with {st} after migrating\n{}",
                    src.tail(40)
                ));
            }
            let _ = qd.execute("quit", "{}", deadline);
            dst.wait_exit(deadline)?;
        }
    }
    let (_, phases) = parse_breakdown(&src.lines());
    let log_downtime_ms = log_downtime(&src.lines());
    let gap = guest_gap(&src.lines(), &dst.lines())?;
    let mut r = RunResult {
        qmp_downtime_ms,
        log_downtime_ms,
        phases,
        gap,
        ..Default::default()
    };
    if let Some(p) = peer.as_mut() {
        p.wait_exit(deadline)?;
        let f = peer_stats(&p.lines(), "final").unwrap_or_default();
        r.host_sent = get(&f, "host_sent");
        r.host_lost = (get(&f, "host_sent") - get(&f, "echoes")).max(0);
        r.echo_dups = get(&f, "echo_dups");
        r.guest_frames = get(&f, "guest_frames");
        r.guest_lost = get(&f, "guest_lost");
        r.guest_dup = get(&f, "guest_dup");
        if let Some(g) = guest_net(&dst.lines()) {
            r.guest_saw_lost = Some(get(&g, "lost"));
            r.guest_saw_dup = Some(get(&g, "dup"));
        }
    }
    drop(ns);
    Ok(r)
}

/// `downtime X ms (pause to resume; ...)` of baton's source log.
fn log_downtime(lines: &[Line]) -> Option<f64> {
    lines.iter().filter(|l| l.stderr).find_map(|l| {
        let rest = l.text.trim().strip_prefix("downtime ")?;
        let (v, unit) = rest.split_once(' ')?;
        unit.starts_with("ms").then(|| v.parse().ok()).flatten()
    })
}

// ---------------------------------------------------------------------------------------
// Report.

fn summary(runs: &[RunResult], f: impl Fn(&RunResult) -> Option<f64>) -> Option<Summary> {
    Summary::of(&runs.iter().filter_map(f).collect::<Vec<_>>())
}

fn phases(runs: &[RunResult]) -> Vec<(String, Summary)> {
    let mut names: Vec<String> = Vec::new();
    for r in runs {
        for (n, _) in &r.phases {
            if !names.contains(n) {
                names.push(n.clone());
            }
        }
    }
    names
        .into_iter()
        .filter_map(|n| {
            let s = summary(runs, |r| {
                r.phases.iter().find(|(p, _)| *p == n).map(|(_, v)| *v)
            })?;
            Some((n, s))
        })
        .collect()
}

type Measure = (&'static str, fn(&RunResult) -> Option<f64>, usize);

const MEASURES: [Measure; 6] = [
    ("query_migrate_ms", |r| r.qmp_downtime_ms, 0),
    ("own_ms", |r| r.own(), 3),
    ("guest_gap_ms", |r| Some(r.gap.gap_ms), 2),
    ("guest_gap_excess_ms", |r| Some(r.gap.excess_ms), 2),
    ("frames_lost", |r| Some(r.frames_lost() as f64), 0),
    (
        "guest_reported_lost",
        |r| r.guest_saw_lost.map(|v| v as f64),
        0,
    ),
];

fn render(ctx: &Ctx, series: &[(Kind, Vec<RunResult>)], took: Duration) -> (String, String) {
    let o = &ctx.opts;
    let find = |k: Kind| {
        series
            .iter()
            .find(|(s, _)| *s == k)
            .map(|(_, r)| r.as_slice())
    };
    let mut t = String::new();
    t.push_str(&format!(
        "\nlocal live update under traffic, {} runs per row (interleaved), 1 vCPU, {} RAM, in a fresh network namespace per run with a persistent multi-queue tap0\n",
        o.runs,
        size_label(o.memory)
    ));
    t.push_str(&format!(
        "guest net rows `{}` + host frames every 5 ms; baseline `{}`\n",
        Kind::Baton.cmdline(),
        Kind::Baseline.cmdline()
    ));
    t.push_str(&format!(
        "baton: --migrate-capabilities {CAPS}, net rows --device virtio-net-tap,id=net0,ifname=tap0,queues=2\nQEMU: -M microvm,acpi=off -accel tcg, memory-backend-file share=on on /dev/shm, x-ignore-shared, -netdev tap,ifname=tap0,queues=2,vhost=off -device virtio-net-device -global virtio-mmio.force-legacy=false\n"
    ));
    t.push_str(&format!(
        "host: {} CPUs, load average {} before, {} after\n",
        ctx.host_cpus,
        ctx.load_before,
        loadavg()
    ));
    t.push_str("each cell median / min / max (ms, frames)\n\n");
    t.push_str(&format!(
        "{:<26} {:^26}   {:^26}   {:^26}   {:^26}   {:^26}   {:^26}\n",
        "",
        "query-migrate downtime",
        "own downtime (baton: log)",
        "guest line gap",
        "gap - usual interval",
        "frames lost (host-side)",
        "guest lost= (host->guest)"
    ));
    for (k, runs) in series {
        t.push_str(&format!("{:<26}", k.label()));
        for (_, f, d) in MEASURES {
            t.push_str(&format!(" {}  ", cell(summary(runs, f), d)));
        }
        t.push('\n');
    }
    let m = |k: Kind, i: usize| find(k).and_then(|r| summary(r, MEASURES[i].1));
    let ratios = [
        (
            "net_over_nonet_own",
            ratio(m(Kind::Baton, 1), m(Kind::Baseline, 1)),
        ),
        (
            "net_over_nonet_guest_gap",
            ratio(m(Kind::Baton, 2), m(Kind::Baseline, 2)),
        ),
        (
            "baton_over_qemu_guest_gap",
            ratio(m(Kind::Baton, 2), m(Kind::Qemu, 2)),
        ),
        (
            "baton_over_qemu_query_migrate",
            ratio(m(Kind::Baton, 0), m(Kind::Qemu, 0)),
        ),
    ];
    t.push_str("\nratios of medians:\n");
    for (n, r) in &ratios {
        t.push_str(&format!("  {n:<32} {}\n", fmt_ratio(*r)));
    }
    t.push_str("  (QEMU's query-migrate downtime ends when its source sent the last byte, baton's when the destination runs; the guest line gap is the same measure for both)\n");
    for k in [Kind::Baton, Kind::Baseline] {
        let Some(runs) = find(k) else { continue };
        t.push_str(&format!(
            "\n{} downtime breakdown, source log (median / min / max ms):\n",
            k.label()
        ));
        for (name, p) in phases(runs) {
            t.push_str(&format!("  {name:<40} {}\n", cell(Some(p), 3)));
        }
    }
    if o.runs < 10 {
        t.push_str(&format!("\nnote: only {} runs per row.\n", o.runs));
    }
    t.push_str(&format!(
        "\ntook {:.1} s; every run's timestamped output is in {}\n",
        took.as_secs_f64(),
        ctx.logs.display()
    ));

    let mut j = String::from("{\n  \"benchmark\": \"net-update\",\n");
    j.push_str(&format!(
        "  \"host\": {{\"cpus\": {}, \"loadavg_before\": {}, \"loadavg_after\": {}}},\n",
        ctx.host_cpus,
        json_str(&ctx.load_before),
        json_str(&loadavg())
    ));
    j.push_str(&format!(
        "  \"config\": {{\"runs\": {}, \"cpus\": 1, \"memory\": {}, \"caps\": {}, \"guest_net_cmdline\": {}, \"guest_nonet_cmdline\": {}, \"host_interval_s\": {}, \"vmm\": {}}},\n",
        o.runs,
        o.memory,
        json_str(CAPS),
        json_str(&Kind::Baton.cmdline()),
        json_str(&Kind::Baseline.cmdline()),
        HOST_INTERVAL_S,
        json_str(&ctx.vmm.display().to_string())
    ));
    j.push_str("  \"series\": [\n");
    for (i, (k, runs)) in series.iter().enumerate() {
        let sums: Vec<String> = MEASURES
            .iter()
            .map(|(n, f, _)| format!("\"{n}\": {}", Summary::json(summary(runs, f))))
            .collect();
        let ph: Vec<String> = phases(runs)
            .into_iter()
            .map(|(n, p)| format!("{}: {}", json_str(&n), Summary::json(Some(p))))
            .collect();
        let rs: Vec<String> = runs
            .iter()
            .map(|r| {
                format!(
                    "{{\"query_migrate_ms\": {}, \"own_ms\": {}, \"guest_gap_ms\": {}, \"guest_interval_ms\": {}, \"host_sent\": {}, \"host_lost\": {}, \"echo_dups\": {}, \"guest_frames\": {}, \"guest_lost\": {}, \"guest_dup\": {}, \"guest_reported_lost\": {}, \"guest_reported_dup\": {}}}",
                    json_num(r.qmp_downtime_ms),
                    json_num(r.own()),
                    json_num(Some(r.gap.gap_ms)),
                    json_num(Some(r.gap.interval_ms)),
                    r.host_sent,
                    r.host_lost,
                    r.echo_dups,
                    r.guest_frames,
                    r.guest_lost,
                    r.guest_dup,
                    r.guest_saw_lost.map_or("null".into(), |v| v.to_string()),
                    r.guest_saw_dup.map_or("null".into(), |v| v.to_string()),
                )
            })
            .collect();
        j.push_str(&format!(
            "    {{\"key\": {}, \"label\": {}, {}, \"phases_ms\": {{{}}},\n     \"runs\": [\n       {}\n     ]}}{}\n",
            json_str(k.key()),
            json_str(k.label()),
            sums.join(", "),
            ph.join(", "),
            rs.join(",\n       "),
            if i + 1 < series.len() { "," } else { "" }
        ));
    }
    j.push_str("  ],\n  \"ratios\": {");
    j.push_str(
        &ratios
            .iter()
            .map(|(n, r)| format!("\"{n}\": {}", json_num(*r)))
            .collect::<Vec<_>>()
            .join(", "),
    );
    j.push_str(&format!(
        "}},\n  \"took_s\": {}\n}}\n",
        json_num(Some(took.as_secs_f64()))
    ));
    (t, j)
}
