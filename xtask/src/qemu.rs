//! QEMU 7.2 for comparison runs, unpacked from Debian's packages into
//! `<target>/qemu/root` without installing anything (installing qemu-system-x86
//! would replace the machine's newer qemu-utils).
//!
//! `apt-get download` fetches qemu-system-x86 (the binary), qemu-system-common (the
//! TCG accelerator is a loadable module there) and qemu-system-data (firmware: the
//! microvm machine's qboot `bios-microvm.bin`), then every `lib*` dependency not
//! installed on this machine, transitively. `dpkg -x` unpacks them; QEMU runs with
//! `LD_LIBRARY_PATH`, `QEMU_MODULE_DIR` and `-L` pointing into the folder.
//!
//! The guest is booted with `-M microvm,acpi=off`, which hands it the same PVH entry
//! and `virtio_mmio.device=` command-line entries as baton-vmm. Its status lines come
//! out of COM1 (the guest's default console, `pio:0x3f8`, written from its CPL0
//! service) and it stops QEMU through `isa-debug-exit` at port 0xf4, whose exit status
//! is `code << 1 | 1` (so 1 means success).

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::{err, Result};

/// The packages fetched first; their library dependencies follow.
const ROOT_PACKAGES: &[&str] = &["qemu-system-x86", "qemu-system-common", "qemu-system-data"];
/// Only the binary's own dependencies are followed (qemu-system-common's are for
/// modules the harness never loads: spice, audio, usb redirection...).
const FOLLOW_DEPS_OF: &[&str] = &["qemu-system-x86"];
const LIB_DIRS: &[&str] = &["usr/lib/x86_64-linux-gnu", "lib/x86_64-linux-gnu"];

/// An unpacked QEMU.
pub struct Qemu {
    pub root: PathBuf,
}

impl Qemu {
    pub fn binary(&self) -> PathBuf {
        self.root.join("usr/bin/qemu-system-x86_64")
    }

    /// A command for the unpacked QEMU with its libraries, modules and firmware.
    pub fn command(&self) -> Command {
        let mut cmd = Command::new(self.binary());
        cmd.env("LD_LIBRARY_PATH", self.lib_path())
            .env(
                "QEMU_MODULE_DIR",
                self.root.join("usr/lib/x86_64-linux-gnu/qemu"),
            )
            .arg("-L")
            .arg(self.root.join("usr/share/qemu"));
        cmd
    }

    fn lib_path(&self) -> String {
        let dirs: Vec<String> = LIB_DIRS
            .iter()
            .map(|d| self.root.join(d).display().to_string())
            .collect();
        dirs.join(":")
    }
}

fn installed(pkg: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", pkg])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("ok installed"))
        .unwrap_or(false)
}

fn apt_download(pkg: &str, dir: &Path) -> Result<PathBuf> {
    let attempt = || {
        crate::run(
            Command::new("apt-get")
                .args(["download", pkg])
                .current_dir(dir),
        )
    };
    if attempt().is_err() {
        // The package lists may be missing or stale on a fresh machine.
        crate::run(Command::new("apt-get").arg("update"))?;
        attempt()?;
    }
    let prefix = format!("{pkg}_");
    std::fs::read_dir(dir)
        .map_err(|e| err!("reading {}: {e}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| {
            let name = p
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            name.starts_with(&prefix) && name.ends_with(".deb")
        })
        .ok_or_else(|| err!("apt-get download {pkg} left no .deb in {}", dir.display()))
}

/// Package names from a .deb's Depends (first alternative, no versions).
fn depends(deb: &Path) -> Result<Vec<String>> {
    let out = crate::run(Command::new("dpkg-deb").arg("-f").arg(deb).arg("Depends"))?;
    Ok(parse_depends(&String::from_utf8_lossy(&out.stdout)))
}

/// `a (>= 1), b | c, d:any` → `[a, b, d]`.
fn parse_depends(field: &str) -> Vec<String> {
    field
        .split(',')
        .filter_map(|d| {
            let first = d.split('|').next()?.trim();
            let name = first.split([' ', '(', ':']).next()?.trim();
            (!name.is_empty()).then(|| name.to_string())
        })
        .collect()
}

/// Downloads and unpacks QEMU into `<target>/qemu` unless that was done before.
pub fn fetch(target_dir: &Path) -> Result<Qemu> {
    let dir = target_dir.join("qemu");
    let qemu = Qemu {
        root: dir.join("root"),
    };
    let stamp = dir.join(".complete");
    if stamp.exists() && qemu.binary().exists() {
        return Ok(qemu);
    }
    let debs = dir.join("debs");
    std::fs::create_dir_all(&debs).map_err(|e| err!("creating {}: {e}", debs.display()))?;
    let mut queue: Vec<String> = ROOT_PACKAGES.iter().map(|s| s.to_string()).collect();
    let mut seen: BTreeSet<String> = queue.iter().cloned().collect();
    while let Some(pkg) = queue.pop() {
        eprintln!("xtask: fetching {pkg}");
        let deb = apt_download(&pkg, &debs)?;
        crate::run(Command::new("dpkg").arg("-x").arg(&deb).arg(&qemu.root))?;
        let follow = FOLLOW_DEPS_OF.contains(&pkg.as_str()) || pkg.starts_with("lib");
        if !follow {
            continue;
        }
        for dep in depends(&deb)? {
            if dep.starts_with("lib") && !seen.contains(&dep) && !installed(&dep) {
                seen.insert(dep.clone());
                queue.push(dep);
            }
        }
    }
    let ldd = crate::run(
        Command::new("ldd")
            .arg(qemu.binary())
            .env("LD_LIBRARY_PATH", qemu.lib_path()),
    )?;
    let missing: Vec<String> = String::from_utf8_lossy(&ldd.stdout)
        .lines()
        .filter(|l| l.contains("not found"))
        .map(|l| l.trim().to_string())
        .collect();
    if !missing.is_empty() {
        return Err(err!(
            "QEMU still lacks shared libraries: {}",
            missing.join(", ")
        ));
    }
    std::fs::write(&stamp, b"").map_err(|e| err!("writing {}: {e}", stamp.display()))?;
    Ok(qemu)
}

/// How to boot the guest under QEMU.
#[derive(Clone, Debug)]
pub struct BootOptions {
    pub passes: u64,
    pub region: String,
    pub memory: String,
    /// `tcg` (default) or `kvm`.
    pub accel: String,
    pub timeout: Duration,
}

impl Default for BootOptions {
    fn default() -> Self {
        BootOptions {
            passes: 300,
            region: "16M".into(),
            memory: "256M".into(),
            accel: "tcg".into(),
            timeout: Duration::from_secs(120),
        }
    }
}

/// What the guest said under QEMU.
#[derive(Debug, Default)]
pub struct Report {
    /// Every `baton-guest: ` line, prefix removed.
    pub lines: Vec<String>,
    pub done: bool,
    pub elapsed: Duration,
}

impl Report {
    pub fn last_status(&self) -> Option<&str> {
        self.lines
            .iter()
            .rev()
            .find(|l| l.starts_with("status ") || l.starts_with("done "))
            .map(|s| s.as_str())
    }
}

/// Boots the guest under QEMU's microvm and collects its status lines until it is
/// done, fails or times out.
pub fn boot(qemu: &Qemu, elf: &Path, opts: &BootOptions) -> Result<Report> {
    let append = format!(
        "baton.console=pio:0x3f8 baton.exit=pio:0xf4 baton.passes={} baton.region={}",
        opts.passes, opts.region
    );
    let mut cmd = qemu.command();
    cmd.args([
        "-M",
        "microvm,acpi=off",
        "-accel",
        &opts.accel,
        "-m",
        &opts.memory,
        "-smp",
        "1",
    ])
    .args([
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-serial",
        "stdio",
    ])
    .args([
        "-device",
        "isa-debug-exit,iobase=0xf4,iosize=4",
        "-device",
        "virtio-rng-device",
    ])
    .arg("-kernel")
    .arg(elf)
    .arg("-append")
    .arg(&append)
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(Stdio::inherit());
    let start = Instant::now();
    let mut child = cmd
        .spawn()
        .map_err(|e| err!("starting {}: {e}", qemu.binary().display()))?;
    let stdout = child
        .stdout
        .take()
        .ok_or_else(|| err!("QEMU has no stdout pipe"))?;
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut report = Report::default();
    let mut failure = None;
    let deadline = start + opts.timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => {
                println!("{line}");
                let Some(msg) = line.strip_prefix("baton-guest: ") else {
                    continue;
                };
                if msg.starts_with("fault ")
                    || msg.starts_with("error ")
                    || msg.starts_with("panic")
                {
                    failure = Some(format!("guest reported: {msg}"));
                }
                if msg.starts_with("done cpu=0 ") {
                    report.done = true;
                }
                report.lines.push(msg.to_string());
                if failure.is_some() || report.done {
                    break;
                }
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                failure = Some(format!("no `done` line within {:?}", opts.timeout));
                break;
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
    }
    // After `done` the guest writes isa-debug-exit; give QEMU a moment, then kill it.
    let wait_until = Instant::now() + Duration::from_secs(5);
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break Some(status),
            Ok(None) if Instant::now() < wait_until => {
                std::thread::sleep(Duration::from_millis(20))
            }
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
        }
    };
    report.elapsed = start.elapsed();
    if let Some(f) = failure {
        return Err(err!("{f}"));
    }
    if !report.done {
        return Err(err!(
            "QEMU exited ({status:?}) before the guest reported `done`"
        ));
    }
    if let Some(code) = status.and_then(|s| s.code()) {
        if code != 1 {
            return Err(err!(
                "guest exit code {} through isa-debug-exit (QEMU status {code})",
                code >> 1
            ));
        }
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn depends_take_the_first_alternative_without_versions() {
        let d =
            parse_depends("libaio1 (>= 0.3.93), libc6 (>= 2.34), seabios | ipxe, python3:any, \n");
        assert_eq!(d, ["libaio1", "libc6", "seabios", "python3"]);
    }

    #[test]
    fn last_status_prefers_the_latest_status_or_done() {
        let r = Report {
            lines: vec![
                "start cpu=0".into(),
                "status cpu=0 pass=1".into(),
                "done cpu=0 pass=2".into(),
            ],
            ..Default::default()
        };
        assert_eq!(r.last_status(), Some("done cpu=0 pass=2"));
    }
}
