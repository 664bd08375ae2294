//! `cargo xtask bench live-update`: local live-update downtime of baton-vmm and of
//! QEMU 7.2, measured in one run on the same guest image and the same machine.
//!
//! What one invocation does:
//! * builds `baton-vmm` (release) and the harness guest, and fetches QEMU 7.2 (see
//!   [`crate::qemu`]);
//! * runs, interleaved so that both see the same machine conditions, `--runs` times
//!   each: baton at `--memory` (1 GiB), QEMU at `--memory`, baton at `--small`
//!   (256 MiB), baton at `--large` (4 GiB);
//! * prints a table and writes every number to `<target>/bench/live-update.json`.
//!
//! One run is a whole local live update between two fresh processes:
//! * baton: source `baton-vmm --kernel ELF --migrate-capabilities x-ignore-shared`,
//!   destination `baton-vmm --incoming unix:M --migrate-capabilities x-ignore-shared`,
//!   QMP `migrate` on the source (guest RAM is a memfd handed over by fd);
//! * QEMU: `-M microvm,acpi=off,memory-backend=mem` with TCG, RAM a
//!   `memory-backend-file` on `/dev/shm` with `share=on` mapped by both processes,
//!   capability `x-ignore-shared` on both sides (and `events` on the source),
//!   destination `-incoming unix:M`, QMP `migrate` on the source — QEMU's standard local
//!   migration with shared memory. (QEMU's `-accel kvm` cannot boot here: its firmware
//!   runs in real mode, which `kvm_pvm` emulates ~3000x slower.)
//!
//! Two measures of the pause, for both VMMs:
//! * `query-migrate` `downtime` (ms) on the source after the MIGRATION `completed`
//!   event. They are not the same quantity: QEMU's ends when the source has sent the
//!   last byte (the destination's load and start are not in it); baton's ends when the
//!   destination reports that its vCPUs run. baton's source log also prints its value
//!   with µs precision and a per-phase breakdown, which are kept too.
//! * the guest's own view from outside, the same for both: the guest prints
//!   `status cpu=C ...` every `baton.report_ms` (10 ms, one LAPIC tick). For each vCPU,
//!   the gap in host arrival time between its last line from the source and its first
//!   line from the destination bounds the pause from above; minus the vCPU's usual
//!   interval between lines (measured on the source just before) it estimates the pause.
//!   Guest time stops while the VM is paused on both VMMs, so the next line comes one
//!   interval after the resume.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::{err, guest, qemu, Result};

const USAGE: &str = "usage: cargo xtask bench live-update [--runs N] [--memory SIZE] \
[--small SIZE] [--large SIZE] [--cpus N] [--report-ms N] [--timeout SECS] [--no-qemu] [--out PATH] [--vmm PATH]";

/// Status lines each vCPU prints on the source before the update starts (to know its
/// usual interval) and on the destination after it (to know it continued).
const LINES_BEFORE: usize = 30;
const LINES_AFTER: usize = 10;

/// `cargo xtask bench ARGS`.
pub fn main(args: &[String]) -> Result<()> {
    match args.first().map(String::as_str) {
        Some("live-update") => {
            let opts = LiveUpdateOptions::parse(&args[1..])?;
            live_update(&opts).map(|_| ())
        }
        _ => Err(err!("{USAGE}")),
    }
}

/// Options of `bench live-update`.
#[derive(Clone, Debug)]
pub struct LiveUpdateOptions {
    pub runs: usize,
    /// Guest RAM of the baton-vs-QEMU comparison.
    pub memory: u64,
    /// The two baton sizes whose downtimes must match.
    pub small: u64,
    pub large: u64,
    pub cpus: usize,
    pub report_ms: u64,
    /// `baton.region`: bytes each vCPU dirties. Small, so that one pass of the workload
    /// under TCG is shorter than a report interval (the guest reports between passes).
    pub region: String,
    /// Limit for every step of a run (start, migrate, stop).
    pub timeout: Duration,
    pub qemu: bool,
    /// Where the JSON goes (default `<target>/bench/live-update.json`).
    pub out: Option<PathBuf>,
    /// A prebuilt `baton-vmm` to measure instead of building this tree's.
    pub vmm: Option<PathBuf>,
}

impl Default for LiveUpdateOptions {
    fn default() -> Self {
        LiveUpdateOptions {
            runs: 10,
            memory: 1 << 30,
            small: 256 << 20,
            large: 4 << 30,
            cpus: 2,
            report_ms: 10,
            region: "1M".into(),
            timeout: Duration::from_secs(60),
            qemu: true,
            out: None,
            vmm: None,
        }
    }
}

impl LiveUpdateOptions {
    pub fn parse(args: &[String]) -> Result<Self> {
        let mut o = LiveUpdateOptions::default();
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
                "--small" => o.small = parse_size(&value()?)?,
                "--large" => o.large = parse_size(&value()?)?,
                "--report-ms" => {
                    o.report_ms = value()?.parse().map_err(|e| err!("--report-ms: {e}"))?
                }
                "--timeout" => {
                    let s: u64 = value()?.parse().map_err(|e| err!("--timeout: {e}"))?;
                    o.timeout = Duration::from_secs(s);
                }
                "--cpus" => o.cpus = value()?.parse().map_err(|e| err!("--cpus: {e}"))?,
                "--no-qemu" => o.qemu = false,
                "--out" => o.out = Some(PathBuf::from(value()?)),
                "--vmm" => o.vmm = Some(PathBuf::from(value()?)),
                other => return Err(err!("unknown option {other}\n{USAGE}")),
            }
        }
        if o.runs == 0 {
            return Err(err!("--runs must be at least 1"));
        }
        if o.report_ms < 10 {
            return Err(err!("--report-ms below 10 is one 10 ms guest tick anyway"));
        }
        Ok(o)
    }
}

/// `256M`, `1G`, `4096M`, or bytes.
pub fn parse_size(s: &str) -> Result<u64> {
    let (num, shift) = match s.as_bytes().last() {
        Some(b'K' | b'k') => (&s[..s.len() - 1], 10),
        Some(b'M' | b'm') => (&s[..s.len() - 1], 20),
        Some(b'G' | b'g') => (&s[..s.len() - 1], 30),
        _ => (s, 0),
    };
    let n: u64 = num.parse().map_err(|e| err!("size {s:?}: {e}"))?;
    n.checked_shl(shift)
        .filter(|v| *v >> shift == n && *v % (1 << 20) == 0 && *v > 0)
        .ok_or_else(|| err!("size {s:?}: must be a non-zero multiple of 1 MiB"))
}

/// A size as both VMMs take it (`256M`).
pub(crate) fn size_arg(bytes: u64) -> String {
    format!("{}M", bytes >> 20)
}

pub(crate) fn size_label(bytes: u64) -> String {
    if bytes % (1 << 30) == 0 {
        format!("{} GiB", bytes >> 30)
    } else {
        format!("{} MiB", bytes >> 20)
    }
}

// ---------------------------------------------------------------------------------------
// A small JSON reader (xtask has no dependencies, see its Cargo.toml).

/// A parsed JSON value.
#[derive(Clone, Debug, PartialEq)]
pub enum Json {
    Null,
    Bool(bool),
    Num(f64),
    Str(String),
    Arr(Vec<Json>),
    Obj(Vec<(String, Json)>),
}

impl Json {
    pub fn parse(text: &str) -> Result<Json> {
        let mut p = JsonParser {
            b: text.as_bytes(),
            i: 0,
        };
        let v = p.value(0)?;
        p.ws();
        if p.i != p.b.len() {
            return Err(err!("JSON: trailing bytes at {} in {text:?}", p.i));
        }
        Ok(v)
    }

    pub fn get(&self, key: &str) -> Option<&Json> {
        match self {
            Json::Obj(m) => m.iter().find(|(k, _)| k == key).map(|(_, v)| v),
            _ => None,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Json::Str(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_f64(&self) -> Option<f64> {
        match self {
            Json::Num(n) => Some(*n),
            _ => None,
        }
    }

    /// `self[a][b]...` as text.
    pub fn str_at(&self, path: &[&str]) -> Option<&str> {
        path.iter()
            .try_fold(self, |v, k| v.get(k))
            .and_then(Json::as_str)
    }
}

struct JsonParser<'a> {
    b: &'a [u8],
    i: usize,
}

impl JsonParser<'_> {
    fn ws(&mut self) {
        while self.i < self.b.len() && matches!(self.b[self.i], b' ' | b'\t' | b'\r' | b'\n') {
            self.i += 1;
        }
    }

    fn fail<T>(&self, what: &str) -> Result<T> {
        Err(err!("JSON: {what} at byte {}", self.i))
    }

    fn eat(&mut self, lit: &str) -> bool {
        if self.b[self.i..].starts_with(lit.as_bytes()) {
            self.i += lit.len();
            true
        } else {
            false
        }
    }

    fn value(&mut self, depth: usize) -> Result<Json> {
        if depth > 64 {
            return self.fail("nesting too deep");
        }
        self.ws();
        match self.b.get(self.i) {
            None => self.fail("unexpected end"),
            Some(b'{') => {
                self.i += 1;
                let mut m = Vec::new();
                self.ws();
                if self.eat("}") {
                    return Ok(Json::Obj(m));
                }
                loop {
                    self.ws();
                    let k = self.string()?;
                    self.ws();
                    if !self.eat(":") {
                        return self.fail("expected ':'");
                    }
                    let v = self.value(depth + 1)?;
                    m.push((k, v));
                    self.ws();
                    if self.eat("}") {
                        return Ok(Json::Obj(m));
                    }
                    if !self.eat(",") {
                        return self.fail("expected ',' or '}'");
                    }
                }
            }
            Some(b'[') => {
                self.i += 1;
                let mut a = Vec::new();
                self.ws();
                if self.eat("]") {
                    return Ok(Json::Arr(a));
                }
                loop {
                    a.push(self.value(depth + 1)?);
                    self.ws();
                    if self.eat("]") {
                        return Ok(Json::Arr(a));
                    }
                    if !self.eat(",") {
                        return self.fail("expected ',' or ']'");
                    }
                }
            }
            Some(b'"') => self.string().map(Json::Str),
            Some(b't') if self.eat("true") => Ok(Json::Bool(true)),
            Some(b'f') if self.eat("false") => Ok(Json::Bool(false)),
            Some(b'n') if self.eat("null") => Ok(Json::Null),
            Some(c) if *c == b'-' || c.is_ascii_digit() => {
                let start = self.i;
                while self.i < self.b.len()
                    && matches!(
                        self.b[self.i],
                        b'-' | b'+' | b'.' | b'e' | b'E' | b'0'..=b'9'
                    )
                {
                    self.i += 1;
                }
                let s = std::str::from_utf8(&self.b[start..self.i]).unwrap_or("");
                s.parse()
                    .map(Json::Num)
                    .or_else(|_| self.fail("bad number"))
            }
            Some(_) => self.fail("unexpected character"),
        }
    }

    fn hex4(&mut self) -> Result<u32> {
        let h = self.b.get(self.i..self.i + 4).unwrap_or(b"");
        let v = std::str::from_utf8(h)
            .ok()
            .filter(|s| s.len() == 4)
            .and_then(|s| u32::from_str_radix(s, 16).ok());
        match v {
            Some(v) => {
                self.i += 4;
                Ok(v)
            }
            None => self.fail("bad \\u escape"),
        }
    }

    fn string(&mut self) -> Result<String> {
        if !self.eat("\"") {
            return self.fail("expected a string");
        }
        let mut out: Vec<u8> = Vec::new();
        loop {
            let Some(&c) = self.b.get(self.i) else {
                return self.fail("unterminated string");
            };
            self.i += 1;
            match c {
                b'"' => break,
                b'\\' => {
                    let Some(&e) = self.b.get(self.i) else {
                        return self.fail("unterminated escape");
                    };
                    self.i += 1;
                    let ch = match e {
                        b'"' => '"',
                        b'\\' => '\\',
                        b'/' => '/',
                        b'b' => '\u{8}',
                        b'f' => '\u{c}',
                        b'n' => '\n',
                        b'r' => '\r',
                        b't' => '\t',
                        b'u' => {
                            let hi = self.hex4()?;
                            let cp = if (0xd800..0xdc00).contains(&hi) && self.eat("\\u") {
                                let lo = self.hex4()?;
                                0x10000 + ((hi - 0xd800) << 10) + (lo.wrapping_sub(0xdc00) & 0x3ff)
                            } else {
                                hi
                            };
                            char::from_u32(cp).unwrap_or('\u{fffd}')
                        }
                        _ => return self.fail("bad escape"),
                    };
                    let mut buf = [0u8; 4];
                    out.extend_from_slice(ch.encode_utf8(&mut buf).as_bytes());
                }
                _ => out.push(c),
            }
        }
        String::from_utf8(out).or_else(|_| self.fail("invalid UTF-8"))
    }
}

/// `s` as a JSON string literal.
pub fn json_str(s: &str) -> String {
    let mut o = String::with_capacity(s.len() + 2);
    o.push('"');
    for c in s.chars() {
        match c {
            '"' => o.push_str("\\\""),
            '\\' => o.push_str("\\\\"),
            '\n' => o.push_str("\\n"),
            '\r' => o.push_str("\\r"),
            '\t' => o.push_str("\\t"),
            c if (c as u32) < 0x20 => o.push_str(&format!("\\u{:04x}", c as u32)),
            c => o.push(c),
        }
    }
    o.push('"');
    o
}

pub(crate) fn json_num(v: Option<f64>) -> String {
    match v {
        Some(v) if v.is_finite() => format!("{:.3}", v),
        _ => "null".into(),
    }
}

// ---------------------------------------------------------------------------------------
// Processes with captured, timestamped output.

/// A line of a child's output and when it arrived.
#[derive(Clone, Debug)]
pub(crate) struct Line {
    pub(crate) at: Instant,
    pub(crate) stderr: bool,
    pub(crate) text: String,
}

/// A child process, killed on drop, whose stdout and stderr are kept line by line.
pub(crate) struct Proc {
    name: String,
    child: Child,
    out: Arc<Mutex<Vec<Line>>>,
    status: Option<ExitStatus>,
}

impl Proc {
    pub(crate) fn spawn(name: &str, mut cmd: Command) -> Result<Proc> {
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .map_err(|e| err!("starting {name} ({:?}): {e}", cmd.get_program()))?;
        let out = Arc::new(Mutex::new(Vec::new()));
        let pipes: [(bool, Option<Box<dyn Read + Send>>); 2] = [
            (
                false,
                child
                    .stdout
                    .take()
                    .map(|s| Box::new(s) as Box<dyn Read + Send>),
            ),
            (
                true,
                child
                    .stderr
                    .take()
                    .map(|s| Box::new(s) as Box<dyn Read + Send>),
            ),
        ];
        for (stderr, pipe) in pipes {
            let Some(pipe) = pipe else { continue };
            let out = out.clone();
            std::thread::spawn(move || {
                let mut r = BufReader::new(pipe);
                let mut buf = Vec::new();
                loop {
                    buf.clear();
                    match r.read_until(b'\n', &mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(_) => {
                            let at = Instant::now();
                            let text = strip_ansi(String::from_utf8_lossy(&buf).trim_end());
                            out.lock().unwrap_or_else(|e| e.into_inner()).push(Line {
                                at,
                                stderr,
                                text,
                            });
                        }
                    }
                }
            });
        }
        Ok(Proc {
            name: name.to_owned(),
            child,
            out,
            status: None,
        })
    }

    pub(crate) fn lines(&self) -> Vec<Line> {
        self.out.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// `f` on the output so far, without copying it (the vCPUs need the host's CPUs more
    /// than the benchmark does).
    pub(crate) fn with_lines<T>(&self, f: impl FnOnce(&[Line]) -> T) -> T {
        f(&self.out.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Adds a line of the benchmark's own to this process's log (a time mark).
    pub(crate) fn mark(&self, text: &str) {
        self.out
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(Line {
                at: Instant::now(),
                stderr: true,
                text: format!("[bench] {text}"),
            });
    }

    /// The last `n` lines, for error messages.
    pub(crate) fn tail(&self, n: usize) -> String {
        let lines = self.lines();
        let skip = lines.len().saturating_sub(n);
        let mut s = format!("--- last output of {} ---\n", self.name);
        for l in &lines[skip..] {
            s.push_str(&l.text);
            s.push('\n');
        }
        s
    }

    pub(crate) fn exited(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = self.child.try_wait().ok().flatten();
        }
        self.status
    }

    /// Waits until `pred` holds on the output so far; fails when the process exits first
    /// or the deadline passes.
    pub(crate) fn wait_for(
        &mut self,
        what: &str,
        deadline: Instant,
        mut pred: impl FnMut(&[Line]) -> bool,
    ) -> Result<()> {
        loop {
            if self.with_lines(&mut pred) {
                return Ok(());
            }
            if let Some(st) = self.exited() {
                std::thread::sleep(Duration::from_millis(50)); // let the readers drain
                if self.with_lines(&mut pred) {
                    return Ok(());
                }
                return Err(err!(
                    "{} exited ({st}) before {what}\n{}",
                    self.name,
                    self.tail(40)
                ));
            }
            if Instant::now() >= deadline {
                return Err(err!(
                    "timed out waiting for {what} from {}\n{}",
                    self.name,
                    self.tail(40)
                ));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub(crate) fn wait_exit(&mut self, deadline: Instant) -> Result<ExitStatus> {
        loop {
            if let Some(st) = self.exited() {
                std::thread::sleep(Duration::from_millis(30)); // let the readers drain
                return Ok(st);
            }
            if Instant::now() >= deadline {
                return Err(err!(
                    "timed out waiting for {} to exit\n{}",
                    self.name,
                    self.tail(40)
                ));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.exited().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Writes every process's output of one run, with arrival times in ms after the run
/// started, to `<dir>/<tag>-<name>.log` when dropped (so failed runs keep theirs too).
pub(crate) struct RunLogs {
    dir: PathBuf,
    tag: String,
    t0: Instant,
    procs: Vec<(String, Arc<Mutex<Vec<Line>>>)>,
}

impl RunLogs {
    pub(crate) fn new(dir: &Path, tag: &str) -> RunLogs {
        RunLogs {
            dir: dir.to_owned(),
            tag: tag.to_owned(),
            t0: Instant::now(),
            procs: Vec::new(),
        }
    }

    pub(crate) fn add(&mut self, short: &str, p: &Proc) {
        self.procs.push((short.to_owned(), p.out.clone()));
    }
}

impl Drop for RunLogs {
    fn drop(&mut self) {
        for (name, out) in &self.procs {
            let mut s = String::new();
            for l in out.lock().unwrap_or_else(|e| e.into_inner()).iter() {
                let t = l.at.checked_duration_since(self.t0).map_or(-1.0, ms);
                let fd = if l.stderr { "err" } else { "out" };
                s.push_str(&format!("{t:10.3} {fd} {}\n", l.text));
            }
            let _ = std::fs::write(self.dir.join(format!("{}-{name}.log", self.tag)), s);
        }
    }
}

/// Removes terminal colour sequences (tracing colours its output even into a pipe).
fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' && chars.peek() == Some(&'[') {
            chars.next();
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Scratch files of one run: a folder for sockets, and QEMU's shared RAM file.
pub(crate) struct Scratch {
    dir: PathBuf,
    pub(crate) shm: Option<PathBuf>,
}

impl Scratch {
    pub(crate) fn new(tag: &str) -> Result<Scratch> {
        let dir = std::env::temp_dir().join(format!("baton-bench-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).map_err(|e| err!("creating {}: {e}", dir.display()))?;
        Ok(Scratch { dir, shm: None })
    }

    pub(crate) fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
        if let Some(f) = &self.shm {
            let _ = std::fs::remove_file(f);
        }
    }
}

pub(crate) fn wait_path(
    path: &Path,
    what: &str,
    deadline: Instant,
    owner: &mut Proc,
) -> Result<()> {
    owner.wait_for(what, deadline, |_| path.exists())
}

// ---------------------------------------------------------------------------------------
// QMP.

pub(crate) struct Qmp {
    name: String,
    r: BufReader<UnixStream>,
    w: UnixStream,
    events: Vec<Json>,
}

impl Qmp {
    /// Connects, reads the greeting and negotiates capabilities.
    pub(crate) fn connect(name: &str, path: &Path, deadline: Instant) -> Result<Qmp> {
        let s = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) if Instant::now() >= deadline => {
                    return Err(err!("QMP of {name} at {}: {e}", path.display()))
                }
                Err(_) => std::thread::sleep(Duration::from_millis(5)),
            }
        };
        let w = s
            .try_clone()
            .map_err(|e| err!("QMP of {name}: cloning the socket: {e}"))?;
        let mut q = Qmp {
            name: name.to_owned(),
            r: BufReader::new(s),
            w,
            events: Vec::new(),
        };
        let greeting = q.read(deadline)?;
        if greeting.get("QMP").is_none() {
            return Err(err!("QMP of {name}: unexpected greeting {greeting:?}"));
        }
        q.execute("qmp_capabilities", "{}", deadline)?;
        Ok(q)
    }

    fn read(&mut self, deadline: Instant) -> Result<Json> {
        let left = deadline.saturating_duration_since(Instant::now());
        self.r
            .get_ref()
            .set_read_timeout(Some(left.max(Duration::from_millis(1))))
            .map_err(|e| err!("QMP of {}: {e}", self.name))?;
        let mut line = String::new();
        match self.r.read_line(&mut line) {
            Ok(0) => Err(err!("QMP of {}: connection closed", self.name)),
            Ok(_) => Json::parse(line.trim()),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                Err(err!(
                    "QMP of {}: timed out waiting for an answer",
                    self.name
                ))
            }
            Err(e) => Err(err!("QMP of {}: {e}", self.name)),
        }
    }

    /// Runs `cmd` with `args` (a JSON object); the `return` value, or the error's text.
    pub(crate) fn execute(&mut self, cmd: &str, args: &str, deadline: Instant) -> Result<Json> {
        let msg = format!("{{\"execute\":{},\"arguments\":{args}}}\n", json_str(cmd));
        self.w
            .write_all(msg.as_bytes())
            .map_err(|e| err!("QMP of {}: sending {cmd}: {e}", self.name))?;
        loop {
            let m = self.read(deadline)?;
            if m.get("event").is_some() {
                self.events.push(m);
                continue;
            }
            if let Some(r) = m.get("return") {
                return Ok(r.clone());
            }
            let desc = m.str_at(&["error", "desc"]).unwrap_or("(no description)");
            return Err(err!("QMP of {}: {cmd}: {desc}", self.name));
        }
    }

    /// Waits for an event that satisfies `pred` (already received ones count).
    fn wait_event(&mut self, deadline: Instant, pred: impl Fn(&Json) -> bool) -> Result<Json> {
        if let Some(i) = self.events.iter().position(&pred) {
            return Ok(self.events.remove(i));
        }
        loop {
            let m = self.read(deadline)?;
            if m.get("event").is_some() {
                if pred(&m) {
                    return Ok(m);
                }
                self.events.push(m);
            }
        }
    }
}

/// QMP `migrate` to `uri`, then the MIGRATION event that ends it (time marks go into
/// the source's log).
pub(crate) fn migrate(
    qs: &mut Qmp,
    uri: &str,
    src: &Proc,
    dst: &Proc,
    deadline: Instant,
) -> Result<Json> {
    src.mark("migrate sent");
    qs.execute(
        "migrate",
        &format!("{{\"uri\":{}}}", json_str(uri)),
        deadline,
    )?;
    src.mark("migrate answered");
    let ev = qs
        .wait_event(deadline, migration_finished)
        .map_err(|e| err!("{e}\n{}\n{}", src.tail(30), dst.tail(30)))?;
    src.mark(&format!(
        "MIGRATION event {:?}",
        ev.str_at(&["data", "status"]).unwrap_or("?")
    ));
    Ok(ev)
}

fn migration_finished(e: &Json) -> bool {
    e.str_at(&["event"]) == Some("MIGRATION")
        && matches!(
            e.str_at(&["data", "status"]),
            Some("completed" | "failed" | "cancelled")
        )
}

// ---------------------------------------------------------------------------------------
// The guest's status lines.

/// `(arrival, cpu, pass)` of every `baton-guest: status` line on stdout.
fn status_lines(lines: &[Line]) -> Vec<(Instant, u64, u64)> {
    lines
        .iter()
        .filter(|l| !l.stderr)
        .filter_map(|l| {
            let rest = l.text.split_once("baton-guest: status ")?.1;
            let mut cpu = None;
            let mut pass = None;
            for kv in rest.split_whitespace() {
                match kv.split_once('=') {
                    Some(("cpu", v)) => cpu = v.parse().ok(),
                    Some(("pass", v)) => pass = v.parse().ok(),
                    _ => {}
                }
            }
            Some((l.at, cpu?, pass?))
        })
        .collect()
}

fn count_per_cpu(lines: &[Line], cpus: u64) -> usize {
    let st = status_lines(lines);
    (0..cpus)
        .map(|c| st.iter().filter(|(_, cpu, _)| *cpu == c).count())
        .min()
        .unwrap_or(0)
}

/// The guest's pause as seen from outside.
#[derive(Clone, Debug, Default)]
struct Gap {
    /// Largest per-vCPU gap between its last line from the source and its first line
    /// from the destination.
    gap_ms: f64,
    /// That vCPU's usual interval between lines, just before the update.
    interval_ms: f64,
    /// `gap - interval`: the pause estimated from outside.
    excess_ms: f64,
}

pub(crate) fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn guest_gap(src: &[Line], dst: &[Line]) -> Result<Gap> {
    let s = status_lines(src);
    let d = status_lines(dst);
    let cpus: std::collections::BTreeSet<u64> = s.iter().map(|(_, c, _)| *c).collect();
    let mut worst: Option<Gap> = None;
    for cpu in cpus {
        let before: Vec<_> = s.iter().filter(|(_, c, _)| *c == cpu).collect();
        let Some(&&(last_at, _, last_pass)) = before.last() else {
            continue;
        };
        let Some(&(first_at, _, first_pass)) = d.iter().find(|(_, c, _)| *c == cpu) else {
            return Err(err!(
                "vCPU {cpu} reported on the source but not on the destination"
            ));
        };
        if first_pass < last_pass {
            return Err(err!(
                "vCPU {cpu} went back: pass {last_pass} on the source, then {first_pass} on the destination"
            ));
        }
        let tail = &before[before.len().saturating_sub(51)..];
        let intervals: Vec<f64> = tail
            .windows(2)
            .map(|w| ms(w[1].0.saturating_duration_since(w[0].0)))
            .collect();
        let interval_ms = Summary::of(&intervals).map(|s| s.median).unwrap_or(0.0);
        let gap_ms = ms(first_at.saturating_duration_since(last_at));
        let g = Gap {
            gap_ms,
            interval_ms,
            excess_ms: gap_ms - interval_ms,
        };
        if worst.as_ref().is_none_or(|w| g.gap_ms > w.gap_ms) {
            worst = Some(g);
        }
    }
    worst.ok_or_else(|| err!("no status lines from the source"))
}

// ---------------------------------------------------------------------------------------
// Statistics.

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Summary {
    pub n: usize,
    pub median: f64,
    pub min: f64,
    pub max: f64,
}

impl Summary {
    pub fn of(v: &[f64]) -> Option<Summary> {
        let mut v: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
        if v.is_empty() {
            return None;
        }
        v.sort_by(|a, b| a.total_cmp(b));
        let n = v.len();
        let median = if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        };
        Some(Summary {
            n,
            median,
            min: v[0],
            max: v[n - 1],
        })
    }

    pub(crate) fn json(s: Option<Summary>) -> String {
        match s {
            Some(s) => format!(
                "{{\"n\": {}, \"median\": {}, \"min\": {}, \"max\": {}}}",
                s.n,
                json_num(Some(s.median)),
                json_num(Some(s.min)),
                json_num(Some(s.max))
            ),
            None => "null".into(),
        }
    }
}

pub(crate) fn ratio(a: Option<Summary>, b: Option<Summary>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) if b.median > 0.0 => Some(a.median / b.median),
        _ => None,
    }
}

// ---------------------------------------------------------------------------------------
// Runs.

/// One live update.
#[derive(Clone, Debug, Default)]
struct RunResult {
    /// `query-migrate` `downtime` on the source, ms.
    qmp_downtime_ms: Option<f64>,
    /// baton: the downtime line of the source log (µs precision), ms.
    log_downtime_ms: Option<f64>,
    /// baton: the source log's breakdown, `(phase, ms)`.
    phases: Vec<(String, f64)>,
    gap: Gap,
}

impl RunResult {
    /// The VMM's own downtime at its best precision.
    fn downtime_ms(&self) -> Option<f64> {
        self.log_downtime_ms.or(self.qmp_downtime_ms)
    }
}

struct Series {
    key: &'static str,
    label: String,
    memory: u64,
    cpus: usize,
    runs: Vec<RunResult>,
}

impl Series {
    fn summary(&self, f: impl Fn(&RunResult) -> Option<f64>) -> Option<Summary> {
        Summary::of(&self.runs.iter().filter_map(f).collect::<Vec<_>>())
    }
    fn qmp(&self) -> Option<Summary> {
        self.summary(|r| r.qmp_downtime_ms)
    }
    fn own(&self) -> Option<Summary> {
        self.summary(RunResult::downtime_ms)
    }
    fn gap(&self) -> Option<Summary> {
        self.summary(|r| Some(r.gap.gap_ms))
    }
    fn excess(&self) -> Option<Summary> {
        self.summary(|r| Some(r.gap.excess_ms))
    }
    fn phases(&self) -> Vec<(String, Summary)> {
        let mut names: Vec<String> = Vec::new();
        for r in &self.runs {
            for (n, _) in &r.phases {
                if !names.contains(n) {
                    names.push(n.clone());
                }
            }
        }
        names
            .into_iter()
            .filter_map(|n| {
                let s =
                    self.summary(|r| r.phases.iter().find(|(p, _)| *p == n).map(|(_, v)| *v))?;
                Some((n, s))
            })
            .collect()
    }
}

struct Ctx {
    /// `/proc/loadavg` and the CPU count when the runs started: other work on the
    /// machine shows up in every number, so it is recorded next to them.
    load_before: String,
    host_cpus: usize,
    vmm: PathBuf,
    elf: PathBuf,
    qemu: Option<qemu::Qemu>,
    opts: LiveUpdateOptions,
    /// Every run's process output, timestamped (`<target>/bench/live-update-logs`).
    logs: PathBuf,
}

impl Ctx {
    fn guest_cmdline(&self) -> String {
        format!(
            "baton.passes=0 baton.report_ms={} baton.region={}",
            self.opts.report_ms, self.opts.region
        )
    }
}

/// `downtime X ms` and `  source: PHASE   X ms` lines of baton's source log.
pub(crate) fn parse_breakdown(lines: &[Line]) -> (Option<f64>, Vec<(String, f64)>) {
    let mut downtime = None;
    let mut phases = Vec::new();
    for l in lines.iter().filter(|l| l.stderr) {
        let t = l.text.trim();
        let Some(num) = t.strip_suffix(" ms") else {
            continue;
        };
        let Some((name, value)) = num.rsplit_once(char::is_whitespace) else {
            continue;
        };
        let Ok(v) = value.parse::<f64>() else {
            continue;
        };
        let name = name.trim();
        if name == "downtime" {
            downtime = Some(v);
        } else if name.starts_with("source: ") || name.starts_with("destination: ") {
            phases.push((name.to_owned(), v));
        }
    }
    (downtime, phases)
}

fn baton_run(ctx: &Ctx, memory: u64, ncpus: usize, tag: &str) -> Result<RunResult> {
    let scratch = Scratch::new(tag)?;
    let (s_qmp, d_qmp, mig) = (
        scratch.path("src.qmp"),
        scratch.path("dst.qmp"),
        scratch.path("mig.sock"),
    );
    let mem = size_arg(memory);
    let cpus = ncpus.to_string();
    let deadline = Instant::now() + ctx.opts.timeout;
    let mut cmd = niced(&ctx.vmm);
    cmd.arg("--kernel")
        .arg(&ctx.elf)
        .args(["--memory", &mem, "--cpus", &cpus, "--qmp"])
        .arg(&s_qmp)
        .args(["--migrate-capabilities", "x-ignore-shared", "--cmdline"])
        .arg(ctx.guest_cmdline());
    let mut logs = RunLogs::new(&ctx.logs, tag);
    let mut src = Proc::spawn("baton-vmm source", cmd)?;
    logs.add("src", &src);
    let ncpu = ncpus as u64;
    src.wait_for("status lines of every vCPU", deadline, |l| {
        count_per_cpu(l, ncpu) >= LINES_BEFORE
    })?;
    let mut cmd = niced(&ctx.vmm);
    cmd.arg("--incoming")
        .arg(format!("unix:{}", mig.display()))
        .args(["--memory", &mem, "--cpus", &cpus, "--qmp"])
        .arg(&d_qmp)
        .args(["--migrate-capabilities", "x-ignore-shared"]);
    let mut dst = Proc::spawn("baton-vmm destination", cmd)?;
    logs.add("dst", &dst);
    wait_path(&d_qmp, "its QMP socket", deadline, &mut dst)?;
    wait_path(&mig, "its migration socket", deadline, &mut dst)?;
    let mut qs = Qmp::connect("baton-vmm source", &s_qmp, deadline)?;
    let mut qd = Qmp::connect("baton-vmm destination", &d_qmp, deadline)?;
    let uri = format!("unix:{}", mig.display());
    let ev = migrate(&mut qs, &uri, &src, &dst, deadline)?;
    if ev.str_at(&["data", "status"]) != Some("completed") {
        return Err(err!(
            "baton migration ended {:?}\n{}\n{}",
            ev.str_at(&["data", "status"]),
            src.tail(30),
            dst.tail(30)
        ));
    }
    // The source exits shortly after `completed`; its log has the value as well.
    let qmp_downtime_ms = qs
        .execute("query-migrate", "{}", deadline)
        .ok()
        .and_then(|i| i.get("downtime").and_then(Json::as_f64));
    drop(qs);
    dst.wait_for("status lines after the update", deadline, |l| {
        count_per_cpu(l, ncpu) >= LINES_AFTER
    })?;
    let status = qd.execute("query-status", "{}", deadline)?;
    if status.str_at(&["status"]) != Some("running") {
        return Err(err!(
            "baton destination is {:?} after the update",
            status.str_at(&["status"])
        ));
    }
    let st = src.wait_exit(deadline)?;
    if !st.success() {
        return Err(err!(
            "baton source exited with {st} after migrating\n{}",
            src.tail(40)
        ));
    }
    qd.execute("quit", "{}", deadline)?;
    dst.wait_exit(deadline)?;
    let (log_downtime_ms, phases) = parse_breakdown(&src.lines());
    if log_downtime_ms.is_none() && qmp_downtime_ms.is_none() {
        return Err(err!("baton source reported no downtime\n{}", src.tail(40)));
    }
    let gap = guest_gap(&src.lines(), &dst.lines())?;
    Ok(RunResult {
        qmp_downtime_ms,
        log_downtime_ms,
        phases,
        gap,
    })
}

fn qemu_run(ctx: &Ctx, q: &qemu::Qemu, memory: u64, ncpus: usize, tag: &str) -> Result<RunResult> {
    let mut scratch = Scratch::new(tag)?;
    let (s_qmp, d_qmp, mig) = (
        scratch.path("src.qmp"),
        scratch.path("dst.qmp"),
        scratch.path("mig.sock"),
    );
    let shm = PathBuf::from(format!("/dev/shm/baton-bench-{}-{tag}", std::process::id()));
    let _ = std::fs::remove_file(&shm);
    scratch.shm = Some(shm.clone());
    let mem = size_arg(memory);
    let deadline = Instant::now() + ctx.opts.timeout;
    let machine = |qmp: &Path| {
        let mut c = niced_command(q.command());
        c.args(["-M", "microvm,acpi=off,memory-backend=mem", "-accel", "tcg"])
            .arg("-object")
            .arg(format!(
                "memory-backend-file,id=mem,size={mem},mem-path={},share=on",
                shm.display()
            ))
            .args(["-m", &mem, "-smp", &ncpus.to_string()])
            .args(["-nodefaults", "-no-user-config", "-display", "none"])
            .args(["-serial", "stdio", "-qmp"])
            .arg(format!("unix:{},server=on,wait=off", qmp.display()));
        c
    };
    let mut cmd = machine(&s_qmp);
    cmd.arg("-kernel")
        .arg(&ctx.elf)
        .arg("-append")
        .arg(format!("baton.console=pio:0x3f8 {}", ctx.guest_cmdline()));
    let mut logs = RunLogs::new(&ctx.logs, tag);
    let mut src = Proc::spawn("QEMU source", cmd)?;
    logs.add("src", &src);
    // The guest sends no INIT/SIPI, so under QEMU only vCPU 0 runs the workload.
    src.wait_for("status lines of vCPU 0", deadline, |l| {
        count_per_cpu(l, 1) >= LINES_BEFORE
    })?;
    let mut cmd = machine(&d_qmp);
    cmd.arg("-incoming").arg(format!("unix:{}", mig.display()));
    let mut dst = Proc::spawn("QEMU destination", cmd)?;
    logs.add("dst", &dst);
    wait_path(&d_qmp, "its QMP socket", deadline, &mut dst)?;
    wait_path(&mig, "its migration socket", deadline, &mut dst)?;
    let mut qs = Qmp::connect("QEMU source", &s_qmp, deadline)?;
    let mut qd = Qmp::connect("QEMU destination", &d_qmp, deadline)?;
    // Both processes have the RAM file open and mapped: its name is no longer needed.
    let _ = std::fs::remove_file(&shm);
    qemu_local_capabilities(&mut qs, &mut qd, deadline)?;
    let uri = format!("unix:{}", mig.display());
    let ev = migrate(&mut qs, &uri, &src, &dst, deadline)?;
    let info = qs.execute("query-migrate", "{}", deadline)?;
    if ev.str_at(&["data", "status"]) != Some("completed") {
        return Err(err!(
            "QEMU migration ended {:?}: {:?}\n{}\n{}",
            ev.str_at(&["data", "status"]),
            info.str_at(&["error-desc"]),
            src.tail(30),
            dst.tail(30)
        ));
    }
    let qmp_downtime_ms = info.get("downtime").and_then(Json::as_f64);
    dst.wait_for("status lines after the update", deadline, |l| {
        count_per_cpu(l, 1) >= LINES_AFTER
    })?;
    let status = qd.execute("query-status", "{}", deadline)?;
    if status.str_at(&["status"]) != Some("running") {
        return Err(err!(
            "QEMU destination is {:?} after the update",
            status.str_at(&["status"])
        ));
    }
    for (qmp, p) in [(&mut qs, &mut src), (&mut qd, &mut dst)] {
        // `quit` may close the socket before its answer arrives.
        let _ = qmp.execute("quit", "{}", deadline);
        p.wait_exit(deadline)?;
    }
    let gap = guest_gap(&src.lines(), &dst.lines())?;
    Ok(RunResult {
        qmp_downtime_ms,
        gap,
        ..Default::default()
    })
}

/// The VMMs run at nice 10 and the benchmark at the default 0: the vCPU threads spin,
/// and a reader thread that waits behind them for a CPU would timestamp the guest's
/// lines late. Both VMMs get the same treatment.
pub(crate) const VMM_NICE: &str = "10";

fn niced(program: &Path) -> Command {
    let mut c = Command::new("nice");
    c.args(["-n", VMM_NICE]).arg(program);
    c
}

/// `cmd` (program, arguments and environment) run through `nice`.
pub(crate) fn niced_command(cmd: Command) -> Command {
    let mut c = niced(Path::new(cmd.get_program()));
    c.args(cmd.get_args());
    for (k, v) in cmd.get_envs() {
        match v {
            Some(v) => c.env(k, v),
            None => c.env_remove(k),
        };
    }
    c
}

/// The first three fields of `/proc/loadavg`.
pub(crate) fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".into())
}

/// Builds `baton-vmm` (release) and returns its path.
pub(crate) fn build_vmm(target: &Path) -> Result<PathBuf> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(crate::repo_root())
        .args(["build", "--release", "--package", "baton-vmm", "--bin"])
        .arg("baton-vmm")
        .stdout(Stdio::inherit())
        .stderr(Stdio::inherit());
    let st = cmd.status().map_err(|e| err!("running {cmd:?}: {e}"))?;
    if !st.success() {
        return Err(err!("building baton-vmm failed ({st})"));
    }
    let bin = target.join("release").join("baton-vmm");
    if !bin.exists() {
        return Err(err!("{} is missing after the build", bin.display()));
    }
    Ok(bin)
}

/// Everything one `bench live-update` measured.
pub struct LiveUpdateReport {
    pub json: String,
    pub table: String,
}

/// Runs the benchmark, prints the table and writes the JSON file.
pub fn live_update(opts: &LiveUpdateOptions) -> Result<LiveUpdateReport> {
    let target = crate::target_dir();
    let vmm = match &opts.vmm {
        Some(v) => {
            eprintln!("xtask: measuring {} (not built here)", v.display());
            v.clone()
        }
        None => {
            eprintln!("xtask: building baton-vmm (release) and the guest");
            build_vmm(&target)?
        }
    };
    let elf = guest::build(&target)?;
    let qemu = if opts.qemu {
        let q = qemu::fetch(&target)?;
        Some(q)
    } else {
        None
    };
    let logs = target.join("bench").join("live-update-logs");
    let _ = std::fs::remove_dir_all(&logs);
    std::fs::create_dir_all(&logs).map_err(|e| err!("creating {}: {e}", logs.display()))?;
    let load_before = loadavg();
    let host_cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    eprintln!("xtask: {host_cpus} host CPUs, load average {load_before}");
    if load_before
        .split_whitespace()
        .next()
        .and_then(|l| l.parse::<f64>().ok())
        .is_some_and(|l| l > 0.5 * host_cpus as f64)
    {
        eprintln!("xtask: warning: the machine is busy; the numbers will be noisy");
    }
    let ctx = Ctx {
        load_before,
        host_cpus,
        vmm,
        elf,
        qemu,
        opts: opts.clone(),
        logs,
    };
    let series_of = |key, label: String, memory, cpus| Series {
        key,
        label: format!("{label} {}", size_label(memory)),
        memory,
        cpus,
        runs: Vec::new(),
    };
    let mut series = vec![series_of("baton", "baton".into(), opts.memory, opts.cpus)];
    if ctx.qemu.is_some() {
        series.push(series_of(
            "qemu",
            "QEMU 7.2 TCG".into(),
            opts.memory,
            opts.cpus,
        ));
        if opts.cpus > 1 {
            // Under QEMU only vCPU 0 runs the workload (the guest starts no APs), which
            // leaves the host a free CPU; baton with one vCPU is the like-for-like case.
            series.push(series_of(
                "baton-1cpu",
                "baton 1 vCPU".into(),
                opts.memory,
                1,
            ));
        }
    }
    series.push(series_of(
        "baton-small",
        "baton".into(),
        opts.small,
        opts.cpus,
    ));
    series.push(series_of(
        "baton-large",
        "baton".into(),
        opts.large,
        opts.cpus,
    ));
    let started = Instant::now();
    for run in 0..opts.runs {
        for s in series.iter_mut() {
            let tag = format!("{}-{run}", s.key);
            let r = match (s.key, &ctx.qemu) {
                ("qemu", Some(q)) => qemu_run(&ctx, q, s.memory, s.cpus, &tag),
                _ => baton_run(&ctx, s.memory, s.cpus, &tag),
            }
            .map_err(|e| err!("run {}/{} of {}: {e}", run + 1, opts.runs, s.label))?;
            eprintln!(
                "xtask: run {:>2}/{} {:<20} downtime {:>8} ms (query-migrate {:>4} ms)  guest gap {:>7.2} ms (interval {:>5.2} ms)",
                run + 1,
                opts.runs,
                s.label,
                r.downtime_ms().map_or("-".into(), |v| format!("{v:.3}")),
                r.qmp_downtime_ms.map_or("-".into(), |v| format!("{v:.0}")),
                r.gap.gap_ms,
                r.gap.interval_ms
            );
            s.runs.push(r);
        }
    }
    let report = render(&ctx, &series, started.elapsed());
    print!("{}", report.table);
    let out = opts
        .out
        .clone()
        .unwrap_or_else(|| target.join("bench").join("live-update.json"));
    if let Some(dir) = out.parent() {
        std::fs::create_dir_all(dir).map_err(|e| err!("creating {}: {e}", dir.display()))?;
    }
    std::fs::write(&out, &report.json).map_err(|e| err!("writing {}: {e}", out.display()))?;
    println!("xtask: numbers written to {}", out.display());
    Ok(report)
}

pub(crate) fn cell(s: Option<Summary>, digits: usize) -> String {
    match s {
        Some(s) => format!(
            "{:>8.d$} {:>8.d$} {:>8.d$}",
            s.median,
            s.min,
            s.max,
            d = digits
        ),
        None => format!("{:>8} {:>8} {:>8}", "-", "-", "-"),
    }
}

pub(crate) fn fmt_ratio(r: Option<f64>) -> String {
    r.map_or("-".into(), |r| format!("{r:.2}"))
}

fn render(ctx: &Ctx, series: &[Series], took: Duration) -> LiveUpdateReport {
    let o = &ctx.opts;
    let find = |k: &str| series.iter().find(|s| s.key == k);
    let mut t = String::new();
    t.push_str(&format!(
        "\nlocal live update, {} runs per row; guest `{}`; QEMU: -M microvm,acpi=off -accel tcg -smp {}, RAM memory-backend-file on /dev/shm share=on, x-ignore-shared\n",
        o.runs,
        ctx.guest_cmdline(),
        o.cpus
    ));
    t.push_str(&format!(
        "host: {} CPUs, load average {} before the runs, {} after\n",
        ctx.host_cpus,
        ctx.load_before,
        loadavg()
    ));
    t.push_str("ms, each cell median / min / max\n\n");
    t.push_str(&format!(
        "{:<24} {:^26}   {:^26}   {:^26}   {:^26}\n",
        "",
        "query-migrate downtime",
        "own downtime (baton: log)",
        "guest status-line gap",
        "gap - usual line interval"
    ));
    for s in series {
        let label = format!("{} ({}v)", s.label, s.cpus);
        t.push_str(&format!(
            "{:<24} {}   {}   {}   {}\n",
            label,
            cell(s.qmp(), 0),
            cell(s.own(), 3),
            cell(s.gap(), 2),
            cell(s.excess(), 2)
        ));
    }
    let baton = find("baton");
    let baton1 = find("baton-1cpu");
    let qemu = find("qemu");
    let (small, large) = (find("baton-small"), find("baton-large"));
    let r_gap = ratio(baton.and_then(Series::gap), qemu.and_then(Series::gap));
    let r_gap1 = ratio(baton1.and_then(Series::gap), qemu.and_then(Series::gap));
    let r_qmp = ratio(baton.and_then(Series::qmp), qemu.and_then(Series::qmp));
    let r_size_own = ratio(large.and_then(Series::own), small.and_then(Series::own));
    let r_size_gap = ratio(large.and_then(Series::gap), small.and_then(Series::gap));
    t.push('\n');
    if qemu.is_some() {
        t.push_str(&format!(
            "baton/QEMU, {} (ratio of medians of the guest status-line gap, the same measure for both):\n  baton {} vCPUs / QEMU: {}",
            size_label(o.memory),
            o.cpus,
            fmt_ratio(r_gap),
        ));
        if baton1.is_some() {
            t.push_str(&format!(
                "   baton 1 vCPU / QEMU (one busy vCPU each): {}",
                fmt_ratio(r_gap1)
            ));
        }
        t.push_str(&format!(
            "\n  (query-migrate downtime ratio {}: QEMU's stops when its source sent the last byte, baton's when the destination runs)\n",
            fmt_ratio(r_qmp)
        ));
    }
    t.push_str(&format!(
        "baton {} / {} (ratio of medians): own downtime {} (target 0.80..1.20), guest gap {}\n",
        size_label(o.large),
        size_label(o.small),
        fmt_ratio(r_size_own),
        fmt_ratio(r_size_gap)
    ));
    if let Some(own) = baton.and_then(Series::own) {
        t.push_str(&format!(
            "baton {} median downtime {:.3} ms; target 5 ms: {}\n",
            size_label(o.memory),
            own.median,
            if own.median <= 5.0 { "met" } else { "NOT met" }
        ));
    }
    for s in [baton, baton1, small, large].into_iter().flatten() {
        let phases = s.phases();
        if phases.is_empty() {
            continue;
        }
        t.push_str(&format!(
            "\n{} ({} vCPUs) downtime breakdown, source log (median / min / max ms):\n",
            s.label, s.cpus
        ));
        for (name, p) in phases {
            t.push_str(&format!("  {name:<34} {}\n", cell(Some(p), 3)));
        }
    }
    if o.runs < 10 {
        t.push_str(&format!(
            "\nnote: {} runs per row; the targets are judged on at least 10.\n",
            o.runs
        ));
    }
    t.push_str(&format!(
        "\ntook {:.1} s; every run's timestamped output is in {}\n",
        took.as_secs_f64(),
        ctx.logs.display()
    ));

    // JSON.
    let mut j = String::from("{\n");
    j.push_str("  \"benchmark\": \"live-update\",\n");
    j.push_str(&format!(
        "  \"unix_time\": {},\n",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0)
    ));
    j.push_str(&format!(
        "  \"host\": {{\"cpus\": {}, \"loadavg_before\": {}, \"loadavg_after\": {}}},\n",
        ctx.host_cpus,
        json_str(&ctx.load_before),
        json_str(&loadavg())
    ));
    j.push_str(&format!(
        "  \"config\": {{\"runs\": {}, \"cpus\": {}, \"memory\": {}, \"small\": {}, \"large\": {}, \"guest_cmdline\": {}, \"vmm\": {}, \"vmm_nice\": {}, \"qemu\": \"-M microvm,acpi=off -accel tcg, memory-backend-file share=on on /dev/shm, x-ignore-shared\"}},\n",
        o.runs,
        o.cpus,
        o.memory,
        o.small,
        o.large,
        json_str(&ctx.guest_cmdline()),
        json_str(&ctx.vmm.display().to_string()),
        VMM_NICE
    ));
    j.push_str("  \"measures\": {\"query_migrate_ms\": \"QMP query-migrate downtime on the source after the MIGRATION completed event (integer ms; QEMU: until its source sent the last byte; baton: until the destination reported its vCPUs run)\", \"own_ms\": \"baton: the downtime line of the source log (us precision), else query-migrate\", \"guest_gap_ms\": \"largest per-vCPU gap in host arrival time between the guest's last status line from the source and its first from the destination\", \"guest_gap_excess_ms\": \"guest_gap_ms minus that vCPU's median interval between lines just before the update\"},\n");
    j.push_str("  \"series\": [\n");
    for (i, s) in series.iter().enumerate() {
        let runs: Vec<String> = s
            .runs
            .iter()
            .map(|r| {
                let phases: Vec<String> = r
                    .phases
                    .iter()
                    .map(|(n, v)| format!("{}: {}", json_str(n), json_num(Some(*v))))
                    .collect();
                format!(
                    "{{\"query_migrate_ms\": {}, \"own_ms\": {}, \"guest_gap_ms\": {}, \"guest_interval_ms\": {}, \"guest_gap_excess_ms\": {}, \"phases_ms\": {{{}}}}}",
                    json_num(r.qmp_downtime_ms),
                    json_num(r.downtime_ms()),
                    json_num(Some(r.gap.gap_ms)),
                    json_num(Some(r.gap.interval_ms)),
                    json_num(Some(r.gap.excess_ms)),
                    phases.join(", ")
                )
            })
            .collect();
        let phases: Vec<String> = s
            .phases()
            .into_iter()
            .map(|(n, p)| format!("{}: {}", json_str(&n), Summary::json(Some(p))))
            .collect();
        j.push_str(&format!(
            "    {{\"key\": {}, \"label\": {}, \"memory\": {}, \"cpus\": {}, \"query_migrate_ms\": {}, \"own_ms\": {}, \"guest_gap_ms\": {}, \"guest_gap_excess_ms\": {}, \"phases_ms\": {{{}}},\n     \"runs\": [\n       {}\n     ]}}{}\n",
            json_str(s.key),
            json_str(&s.label),
            s.memory,
            s.cpus,
            Summary::json(s.qmp()),
            Summary::json(s.own()),
            Summary::json(s.gap()),
            Summary::json(s.excess()),
            phases.join(", "),
            runs.join(",\n       "),
            if i + 1 < series.len() { "," } else { "" }
        ));
    }
    j.push_str("  ],\n");
    j.push_str(&format!(
        "  \"ratios\": {{\"baton_over_qemu_guest_gap\": {}, \"baton_1cpu_over_qemu_guest_gap\": {}, \"baton_over_qemu_query_migrate\": {}, \"large_over_small_own\": {}, \"large_over_small_guest_gap\": {}}},\n",
        json_num(r_gap),
        json_num(r_gap1),
        json_num(r_qmp),
        json_num(r_size_own),
        json_num(r_size_gap)
    ));
    j.push_str(&format!(
        "  \"headline\": {{\"baton_over_qemu\": \"guest_gap_ms\", \"large_over_small\": \"own_ms\"}},\n  \"took_s\": {}\n}}\n",
        json_num(Some(took.as_secs_f64()))
    ));
    LiveUpdateReport { json: j, table: t }
}

/// QEMU's local migration with shared memory: `x-ignore-shared` on both sides, and
/// MIGRATION events on the source.
pub(crate) fn qemu_local_capabilities(qs: &mut Qmp, qd: &mut Qmp, deadline: Instant) -> Result<()> {
    let caps = |extra: &str| {
        format!(
            "{{\"capabilities\":[{{\"capability\":\"x-ignore-shared\",\"state\":true}}{extra}]}}"
        )
    };
    qd.execute("migrate-set-capabilities", &caps(""), deadline)?;
    qs.execute(
        "migrate-set-capabilities",
        &caps(",{\"capability\":\"events\",\"state\":true}"),
        deadline,
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_reads_qmp_messages() {
        let v = Json::parse(
            r#"{"return": {"status": "completed", "downtime": 2, "ram": {"mbps": 4.3e1}}, "x": [true, false, null, "a\"\u00e9\ud83d\ude00"]}"#,
        )
        .unwrap();
        assert_eq!(v.str_at(&["return", "status"]), Some("completed"));
        assert_eq!(
            v.get("return").and_then(|r| r.get("downtime")),
            Some(&Json::Num(2.0))
        );
        assert_eq!(
            v.get("x"),
            Some(&Json::Arr(vec![
                Json::Bool(true),
                Json::Bool(false),
                Json::Null,
                Json::Str("a\"é😀".into())
            ]))
        );
        for bad in ["{", "{\"a\" 1}", "[1,]", "\"x", "1 2", "{\"a\":tru}"] {
            assert!(Json::parse(bad).is_err(), "{bad}");
        }
        let s = "q\"\\\n\u{1}";
        assert_eq!(Json::parse(&json_str(s)).unwrap(), Json::Str(s.into()));
    }

    #[test]
    fn sizes_and_summaries() {
        assert_eq!(parse_size("256M").unwrap(), 256 << 20);
        assert_eq!(parse_size("4G").unwrap(), 4 << 30);
        assert!(parse_size("1K").is_err());
        assert!(parse_size("0M").is_err());
        assert_eq!(size_arg(4 << 30), "4096M");
        let s = Summary::of(&[3.0, 1.0, 4.0, 2.0]).unwrap();
        assert_eq!((s.median, s.min, s.max, s.n), (2.5, 1.0, 4.0, 4));
        assert!(Summary::of(&[]).is_none());
    }

    fn line(at: Instant, ms: u64, text: &str) -> Line {
        Line {
            at: at + Duration::from_millis(ms),
            stderr: false,
            text: text.into(),
        }
    }

    #[test]
    fn guest_gap_takes_the_worst_vcpu_and_its_usual_interval() {
        let t = Instant::now();
        let src: Vec<Line> = (0..10)
            .flat_map(|i| {
                [
                    line(
                        t,
                        i * 10,
                        &format!("baton-guest: status cpu=0 pass={i} ticks={i} tsc=1"),
                    ),
                    line(
                        t,
                        i * 10 + 5,
                        &format!("baton-guest: status cpu=1 pass={i} ticks={i} tsc=1"),
                    ),
                ]
            })
            .collect();
        let dst = vec![
            line(t, 100, "baton-guest: status cpu=1 pass=10 ticks=10 tsc=1"),
            line(t, 123, "baton-guest: status cpu=0 pass=10 ticks=10 tsc=1"),
        ];
        let g = guest_gap(&src, &dst).unwrap();
        assert!((g.gap_ms - 33.0).abs() < 0.5, "{g:?}");
        assert!((g.interval_ms - 10.0).abs() < 0.5, "{g:?}");
        assert!((g.excess_ms - 23.0).abs() < 0.5, "{g:?}");
        let back = vec![line(
            t,
            100,
            "baton-guest: status cpu=0 pass=2 ticks=1 tsc=1",
        )];
        assert!(guest_gap(&src, &back).is_err());
    }

    #[test]
    fn breakdown_of_the_source_log() {
        let t = Instant::now();
        let mk = |s: &str| Line {
            at: t,
            stderr: true,
            text: strip_ansi(s),
        };
        let lines = vec![
            mk("\u{1b}[2m2026\u{1b}[0m INFO migration to unix:/x completed"),
            mk("downtime 23.721 ms"),
            mk("  source: pause vCPUs                    0.382 ms"),
            mk("  destination: resume vCPUs              0.097 ms"),
        ];
        let (d, p) = parse_breakdown(&lines);
        assert_eq!(d, Some(23.721));
        assert_eq!(
            p,
            vec![
                ("source: pause vCPUs".to_string(), 0.382),
                ("destination: resume vCPUs".to_string(), 0.097)
            ]
        );
    }
}
