//! The KVM test harness: `baton-vmm` processes with their output captured line by line
//! (with the time each line arrived), a QMP client, the harness guest image, and network
//! namespaces so TCP traffic never touches the host's interfaces.
//!
//! Missing resources (KVM, root for namespaces) skip with a printed reason, and fail
//! under `BATON_CI=1`.

#![allow(dead_code)]

pub mod net;
pub mod netrun;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// Skip (printing why, straight to the stderr fd so capture cannot hide it) or, under
/// `BATON_CI=1`, fail.
pub fn skip_or_fail(reason: &str) -> bool {
    if std::env::var("BATON_CI").as_deref() == Ok("1") {
        panic!("{reason}; BATON_CI=1 requires it");
    }
    let _ = writeln!(
        std::io::stderr(),
        "SKIPPED {reason}; set BATON_CI=1 to make this a failure"
    );
    false
}

/// Whether KVM is usable here.
pub fn kvm_or_skip(test: &str) -> bool {
    // Opening is not enough (a bind-mounted /dev/null opens fine): ask KVM.
    let err = match kvm_ioctls::Kvm::new().map(|k| k.get_api_version()) {
        Ok(12) => return true,
        Ok(v) => format!("KVM API version {v}, expected 12"),
        Err(e) => e.to_string(),
    };
    skip_or_fail(&format!("{test}: /dev/kvm is not usable ({err})"))
}

/// The guest ELF, built once per test binary through xtask's library.
pub fn guest_elf() -> PathBuf {
    static ELF: OnceLock<PathBuf> = OnceLock::new();
    ELF.get_or_init(|| {
        let tmp = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
        let target = tmp
            .parent()
            .expect("CARGO_TARGET_TMPDIR has a parent")
            .to_path_buf();
        xtask::guest::build(&target).unwrap_or_else(|e| panic!("building the harness guest: {e}"))
    })
    .clone()
}

pub fn vmm_bin() -> &'static str {
    env!("CARGO_BIN_EXE_baton-vmm")
}

/// A temp dir removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        let p = std::env::temp_dir().join(format!(
            "baton-h-{tag}-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0)
        ));
        std::fs::create_dir_all(&p).expect("temp dir");
        TempDir(p)
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A line of output and when the harness saw it.
#[derive(Clone, Debug)]
pub struct Line {
    pub at: Instant,
    pub text: String,
}

/// A running `baton-vmm`.
pub struct Vmm {
    pub name: String,
    child: Child,
    pub qmp_path: PathBuf,
    lines: Arc<Mutex<Vec<Line>>>,
    exited: Option<(ExitStatus, Instant)>,
}

impl Vmm {
    /// Start `baton-vmm ARGS --qmp DIR/NAME.qmp`, optionally inside network namespace `ns`.
    pub fn spawn(name: &str, dir: &TempDir, ns: Option<&str>, args: &[&str]) -> Vmm {
        let qmp_path = dir.path(&format!("{name}.qmp"));
        let mut cmd = match ns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, vmm_bin()]);
                c
            }
            None => Command::new(vmm_bin()),
        };
        cmd.args(args)
            .arg("--qmp")
            .arg(&qmp_path)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("spawning {name}: {e}"));
        let lines = Arc::new(Mutex::new(Vec::new()));
        for out in [
            child
                .stdout
                .take()
                .map(|o| Box::new(o) as Box<dyn std::io::Read + Send>),
            child
                .stderr
                .take()
                .map(|o| Box::new(o) as Box<dyn std::io::Read + Send>),
        ]
        .into_iter()
        .flatten()
        {
            let lines = lines.clone();
            let tag = name.to_owned();
            std::thread::spawn(move || {
                for l in BufReader::new(out).lines().map_while(Result::ok) {
                    if std::env::var("BATON_HARNESS_ECHO").is_ok() {
                        eprintln!("[{tag}] {l}");
                    }
                    lines.lock().unwrap().push(Line {
                        at: Instant::now(),
                        text: l,
                    });
                }
            });
        }
        let vmm = Vmm {
            name: name.into(),
            child,
            qmp_path,
            lines,
            exited: None,
        };
        vmm.wait_for(
            Duration::from_secs(20),
            |_| vmm.qmp_path.exists(),
            "its QMP socket",
        );
        vmm
    }

    pub fn lines(&self) -> Vec<Line> {
        self.lines.lock().unwrap().clone()
    }

    pub fn dump(&self) -> String {
        self.lines()
            .iter()
            .map(|l| format!("[{}] {}\n", self.name, l.text))
            .collect()
    }

    /// Wait until `pred` holds for the captured lines; panics with the output on timeout.
    pub fn wait_for(&self, timeout: Duration, mut pred: impl FnMut(&[Line]) -> bool, what: &str) {
        let end = Instant::now() + timeout;
        loop {
            if pred(&self.lines()) {
                return;
            }
            if Instant::now() > end {
                panic!(
                    "{}: timed out waiting for {what}\n{}",
                    self.name,
                    self.dump()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The first line containing `needle`, waiting for it.
    pub fn wait_line(&self, needle: &str, timeout: Duration) -> Line {
        self.wait_for(
            timeout,
            |ls| ls.iter().any(|l| l.text.contains(needle)),
            needle,
        );
        self.lines()
            .into_iter()
            .find(|l| l.text.contains(needle))
            .expect("just seen")
    }

    pub fn try_wait(&mut self) -> Option<(ExitStatus, Instant)> {
        if self.exited.is_none() {
            if let Ok(Some(st)) = self.child.try_wait() {
                self.exited = Some((st, Instant::now()));
            }
        }
        self.exited
    }

    /// Wait for the process to exit; returns its status and when the exit was seen.
    pub fn wait_exit(&mut self, timeout: Duration) -> (ExitStatus, Instant) {
        let end = Instant::now() + timeout;
        loop {
            if let Some(e) = self.try_wait() {
                std::thread::sleep(Duration::from_millis(50)); // let the readers drain
                return e;
            }
            if Instant::now() > end {
                let _ = self.child.kill();
                panic!(
                    "{}: did not exit in {timeout:?}\n{}",
                    self.name,
                    self.dump()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn qmp(&self) -> Qmp {
        let mut q = Qmp::connect(&self.qmp_path);
        q.owner = Some((self.name.clone(), self.lines.clone()));
        q
    }

    /// Guest status lines (`baton-guest: KIND k=v ...`) of `kind`, parsed.
    pub fn guest(&self, kind: &str) -> Vec<(Instant, std::collections::HashMap<String, u64>)> {
        let prefix = format!("baton-guest: {kind} ");
        self.lines()
            .into_iter()
            .filter_map(|l| {
                let rest = l.text.split_once(&prefix)?.1.to_owned();
                let kv = rest
                    .split_whitespace()
                    .filter_map(|p| p.split_once('='))
                    .filter_map(|(k, v)| Some((k.to_owned(), v.parse().ok()?)))
                    .collect();
                Some((l.at, kv))
            })
            .collect()
    }
}

impl Drop for Vmm {
    fn drop(&mut self) {
        if self.try_wait().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A minimal QMP client (the Python `qemu.qmp` library is exercised separately).
pub struct Qmp {
    r: BufReader<UnixStream>,
    w: UnixStream,
    pub events: Vec<Value>,
    /// The VMM behind the socket, whose output a failure shows.
    owner: Option<(String, Arc<Mutex<Vec<Line>>>)>,
}

impl Qmp {
    pub fn connect(path: &Path) -> Qmp {
        let s = UnixStream::connect(path).unwrap_or_else(|e| panic!("QMP {}: {e}", path.display()));
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut q = Qmp {
            r: BufReader::new(s.try_clone().unwrap()),
            w: s,
            events: Vec::new(),
            owner: None,
        };
        let greeting = q.read();
        assert!(greeting.get("QMP").is_some(), "greeting: {greeting}");
        q.execute("qmp_capabilities", json!({}))
            .expect("qmp_capabilities");
        q
    }

    /// Fail showing what the VMM printed: a dropped QMP connection is its story.
    fn fail(&self, what: &str) -> ! {
        let out = match &self.owner {
            Some((name, lines)) => lines
                .lock()
                .map(|v| {
                    v.iter()
                        .map(|l| format!("[{name}] {}\n", l.text))
                        .collect::<String>()
                })
                .unwrap_or_default(),
            None => String::new(),
        };
        panic!("{what}\n{out}")
    }

    fn read(&mut self) -> Value {
        let mut l = String::new();
        if let Err(e) = self.r.read_line(&mut l) {
            self.fail(&format!("QMP read: {e}"));
        }
        serde_json::from_str(&l).unwrap_or_else(|e| panic!("QMP message {l:?}: {e}"))
    }

    /// Run a command: `Ok(return)` or `Err(error object)`.
    pub fn execute(&mut self, cmd: &str, args: Value) -> Result<Value, Value> {
        let msg = json!({"execute": cmd, "arguments": args});
        // One write: the server acts on a complete JSON object, and after `quit` a second
        // write (the newline) would meet a closed socket.
        if let Err(e) = self.w.write_all(format!("{msg}\n").as_bytes()) {
            self.fail(&format!("QMP write of {cmd}: {e}"));
        }
        loop {
            let m = self.read();
            if m.get("event").is_some() {
                self.events.push(m);
                continue;
            }
            if let Some(r) = m.get("return") {
                return Ok(r.clone());
            }
            return Err(m.get("error").cloned().unwrap_or(m));
        }
    }

    /// Poll `query-migrate` until its status is one of `want`.
    pub fn wait_migration(&mut self, want: &[&str], timeout: Duration) -> Value {
        let end = Instant::now() + timeout;
        loop {
            let info = self
                .execute("query-migrate", json!({}))
                .expect("query-migrate");
            if want.iter().any(|w| info["status"] == *w) {
                return info;
            }
            assert!(
                Instant::now() < end,
                "migration status {info} never reached {want:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Two network namespaces joined by a veth pair: `src` at 10.77.0.1, `dst` at 10.77.0.2.
pub struct NetnsPair {
    pub src: String,
    pub dst: String,
}

impl NetnsPair {
    pub fn new(tag: &str) -> Result<NetnsPair, String> {
        let id = std::process::id() % 100000;
        let pair = NetnsPair {
            src: format!("bsrc-{tag}-{id}"),
            dst: format!("bdst-{tag}-{id}"),
        };
        let ip = |args: &[&str]| -> Result<(), String> {
            let out = Command::new("ip")
                .args(args)
                .output()
                .map_err(|e| format!("ip: {e}"))?;
            if out.status.success() {
                Ok(())
            } else {
                Err(format!(
                    "ip {}: {}",
                    args.join(" "),
                    String::from_utf8_lossy(&out.stderr).trim()
                ))
            }
        };
        let (a, b) = (format!("vs{id}"), format!("vd{id}"));
        ip(&["netns", "add", &pair.src])?;
        ip(&["netns", "add", &pair.dst])?;
        ip(&[
            "link", "add", &a, "netns", &pair.src, "type", "veth", "peer", "name", &b, "netns",
            &pair.dst,
        ])?;
        for (ns, dev, addr) in [
            (&pair.src, &a, "10.77.0.1/24"),
            (&pair.dst, &b, "10.77.0.2/24"),
        ] {
            ip(&["-n", ns, "addr", "add", addr, "dev", dev])?;
            ip(&["-n", ns, "link", "set", dev, "up"])?;
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
        }
        Ok(pair)
    }
}

impl Drop for NetnsPair {
    fn drop(&mut self) {
        for ns in [&self.src, &self.dst] {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}
