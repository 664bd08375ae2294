//! `cargo xtask demo`: build everything, boot the harness guest under `baton-vmm` on KVM,
//! live-update it into a new `baton-vmm` process (guest RAM handed over as a memfd), and
//! print the downtime breakdown and the guest's reports from both sides.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::{err, guest, repo_root, run, target_dir, Result};

struct Proc {
    name: &'static str,
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
}

impl Proc {
    fn spawn(name: &'static str, bin: &Path, args: &[String]) -> Result<Proc> {
        let mut child = Command::new(bin)
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| err!("starting {name}: {e}"))?;
        let lines = Arc::new(Mutex::new(Vec::new()));
        let outs: Vec<Box<dyn std::io::Read + Send>> = vec![
            Box::new(
                child
                    .stdout
                    .take()
                    .ok_or_else(|| err!("{name}: no stdout"))?,
            ),
            Box::new(
                child
                    .stderr
                    .take()
                    .ok_or_else(|| err!("{name}: no stderr"))?,
            ),
        ];
        for out in outs {
            let lines = lines.clone();
            std::thread::spawn(move || {
                for l in BufReader::new(out).lines().map_while(|l| l.ok()) {
                    if let Ok(mut v) = lines.lock() {
                        v.push(l);
                    }
                }
            });
        }
        Ok(Proc { name, child, lines })
    }

    fn lines(&self) -> Vec<String> {
        self.lines.lock().map(|v| v.clone()).unwrap_or_default()
    }

    fn wait_line(&self, needle: &str, timeout: Duration) -> Result<String> {
        let end = Instant::now() + timeout;
        loop {
            if let Some(l) = self.lines().into_iter().find(|l| l.contains(needle)) {
                return Ok(l);
            }
            if Instant::now() > end {
                return Err(err!(
                    "{}: no {needle:?} within {timeout:?}; output:\n{}",
                    self.name,
                    self.lines().join("\n")
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One QMP command on a fresh connection; returns the reply line.
fn qmp(path: &Path, command: &str) -> Result<String> {
    let end = Instant::now() + Duration::from_secs(10);
    let s = loop {
        match UnixStream::connect(path) {
            Ok(s) => break s,
            Err(e) if Instant::now() > end => return Err(err!("QMP {}: {e}", path.display())),
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    };
    let mut w = s.try_clone().map_err(|e| err!("QMP: {e}"))?;
    let mut r = BufReader::new(s);
    let mut line = String::new();
    r.read_line(&mut line)
        .map_err(|e| err!("QMP greeting: {e}"))?;
    for cmd in ["{\"execute\":\"qmp_capabilities\"}", command] {
        // One write: after `quit` a separate newline would meet a closed socket.
        w.write_all(format!("{cmd}\n").as_bytes())
            .map_err(|e| err!("QMP write: {e}"))?;
        loop {
            line.clear();
            r.read_line(&mut line).map_err(|e| err!("QMP read: {e}"))?;
            if line.contains("\"error\"") {
                return Err(err!("QMP {cmd}: {}", line.trim()));
            }
            if line.contains("\"return\"") {
                break;
            }
        }
    }
    Ok(line.trim().to_owned())
}

fn last_status(p: &Proc) -> String {
    p.lines()
        .into_iter()
        .rfind(|l| l.contains("baton-guest: status"))
        .unwrap_or_default()
}

/// Runs the demo; `memory` is the guest RAM size (`1G`).
pub fn demo(memory: &str) -> Result<()> {
    let root = repo_root();
    let target = target_dir();
    eprintln!("demo: building baton-vmm (release) and the harness guest");
    run(Command::new(env!("CARGO")).current_dir(&root).args([
        "build",
        "--release",
        "-p",
        "baton-vmm",
    ]))?;
    let vmm = target.join("release/baton-vmm");
    let elf = guest::build(&target)?;
    let dir = target.join(format!("demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| err!("{}: {e}", dir.display()))?;
    let path = |n: &str| -> PathBuf { dir.join(n) };
    let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();

    let src = Proc::spawn(
        "source",
        &vmm,
        &[
            s(&["--kernel"]),
            vec![elf.display().to_string()],
            s(&[
                "--memory",
                memory,
                "--cpus",
                "2",
                "--cmdline",
                "baton.report_ms=100",
            ]),
            s(&["--migrate-capabilities", "x-ignore-shared", "--qmp"]),
            vec![path("src.qmp").display().to_string()],
        ]
        .concat(),
    )?;
    src.wait_line("baton-guest: status cpu=1", Duration::from_secs(60))?;
    std::thread::sleep(Duration::from_millis(500));
    println!("source      : {}", last_status(&src));

    let sock = format!("unix:{}", path("migrate.sock").display());
    let dst = Proc::spawn(
        "destination",
        &vmm,
        &[
            s(&["--incoming", &sock, "--memory", memory, "--cpus", "2"]),
            s(&["--migrate-capabilities", "x-ignore-shared", "--qmp"]),
            vec![path("dst.qmp").display().to_string()],
        ]
        .concat(),
    )?;
    qmp(&path("dst.qmp"), "{\"execute\":\"query-status\"}")?;
    println!("live update : migrate {{\"uri\": \"{sock}\"}} (guest RAM handed over as a memfd)");
    qmp(
        &path("src.qmp"),
        &format!("{{\"execute\":\"migrate\",\"arguments\":{{\"uri\":\"{sock}\"}}}}"),
    )?;
    dst.wait_line("incoming migration completed", Duration::from_secs(60))?;
    src.wait_line("migrated: the destination runs", Duration::from_secs(60))?;
    let lines = src.lines();
    let at = lines
        .iter()
        .position(|l| l.starts_with("downtime "))
        .ok_or_else(|| err!("source printed no downtime report"))?;
    println!();
    for l in lines[at..].iter().take_while(|l| !l.trim().is_empty()) {
        println!("{l}");
    }
    println!();
    let before = dst
        .lines()
        .iter()
        .filter(|l| l.contains("baton-guest: status"))
        .count();
    let end = Instant::now() + Duration::from_secs(10);
    while dst
        .lines()
        .iter()
        .filter(|l| l.contains("baton-guest: status"))
        .count()
        < before + 4
    {
        if Instant::now() > end {
            return Err(err!("the guest does not report on the destination"));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    println!("destination : {}", last_status(&dst));
    println!("demo: the guest runs on in the new process; the old one has exited");
    let _ = qmp(&path("dst.qmp"), "{\"execute\":\"quit\"}");
    drop(dst);
    drop(src);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
