//! Interop with QEMU's own Python client library, `qemu.qmp` (from PyPI): runs
//! `tests/qmp_client.py` against the demo VM served on a real UNIX socket.
//!
//! Needs `python3` (or `$BATON_PYTHON`) with `qemu.qmp` installed:
//! `python3 -m pip install qemu.qmp==0.0.6`. When either is missing the test is
//! skipped with the reason printed, unless `BATON_CI=1`, where it fails.
//!
//! A plain `main` (harness = false) so that the skip reason is always shown.

use std::io::Read;
use std::path::Path;
use std::process::{Command, ExitCode, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use baton_qmp::demo::{self, DemoVm};
use baton_qmp::QmpServer;

const PIP_INSTALL: &str = "python3 -m pip install qemu.qmp==0.0.6";
const SCRIPT_TIMEOUT: Duration = Duration::from_secs(60);

fn main() -> ExitCode {
    match run() {
        Ok(()) => {
            println!("python_qmp: 1 passed, 0 failed");
            ExitCode::SUCCESS
        }
        Err(Outcome::Missing(reason)) => {
            if std::env::var("BATON_CI").as_deref() == Ok("1") {
                eprintln!("python_qmp: FAILED: {reason} (BATON_CI=1 makes this fatal; install with `{PIP_INSTALL}`)");
                println!("python_qmp: 0 passed, 1 failed");
                ExitCode::FAILURE
            } else {
                println!("python_qmp: SKIPPED: {reason} (install with `{PIP_INSTALL}`; BATON_CI=1 makes this fatal)");
                println!("python_qmp: 0 passed, 0 failed, 1 skipped");
                ExitCode::SUCCESS
            }
        }
        Err(Outcome::Failed(reason)) => {
            eprintln!("python_qmp: FAILED: {reason}");
            println!("python_qmp: 0 passed, 1 failed");
            ExitCode::FAILURE
        }
    }
}

enum Outcome {
    /// A prerequisite is missing.
    Missing(String),
    /// The test ran and failed.
    Failed(String),
}

fn run() -> Result<(), Outcome> {
    let python = std::env::var("BATON_PYTHON").unwrap_or_else(|_| "python3".into());
    let probe = Command::new(&python)
        .args(["-c", "import qemu.qmp"])
        .output()
        .map_err(|e| Outcome::Missing(format!("cannot run `{python}`: {e}")))?;
    if !probe.status.success() {
        let stderr = String::from_utf8_lossy(&probe.stderr);
        let last = stderr.lines().last().unwrap_or("").trim().to_owned();
        return Err(Outcome::Missing(format!(
            "`{python}` cannot import qemu.qmp ({last})"
        )));
    }

    let path = std::env::temp_dir().join(format!("bqmp-py-{}.sock", std::process::id()));
    let builder = QmpServer::builder().unix(&path);
    let vm = DemoVm::new(builder.event_sender());
    let server = builder
        .start(demo::registry(vm.clone()))
        .map_err(|e| Outcome::Failed(format!("server: {e}")))?;
    let result = run_script(&python, &path, &vm);
    server.shutdown();
    result
}

fn run_script(python: &str, socket: &Path, vm: &DemoVm) -> Result<(), Outcome> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/qmp_client.py");
    let mut child = Command::new(python)
        .arg(&script)
        .arg(socket)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| Outcome::Failed(format!("cannot run {}: {e}", script.display())))?;
    // Drain the pipes while waiting, so a chatty failure cannot block the child.
    let drain = |pipe: Option<Box<dyn Read + Send>>| {
        thread::spawn(move || {
            let mut out = Vec::new();
            if let Some(mut p) = pipe {
                let _ = p.read_to_end(&mut out);
            }
            String::from_utf8_lossy(&out).into_owned()
        })
    };
    let stdout = drain(
        child
            .stdout
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let stderr = drain(
        child
            .stderr
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let deadline = Instant::now() + SCRIPT_TIMEOUT;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() < deadline => thread::sleep(Duration::from_millis(20)),
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                eprint!("{}", stderr.join().unwrap_or_default());
                return Err(Outcome::Failed(format!(
                    "{} did not finish within {SCRIPT_TIMEOUT:?}",
                    script.display()
                )));
            }
            Err(e) => return Err(Outcome::Failed(format!("waiting for python: {e}"))),
        }
    };
    print!("{}", stdout.join().unwrap_or_default());
    eprint!("{}", stderr.join().unwrap_or_default());
    if !status.success() {
        return Err(Outcome::Failed(format!(
            "{} exited with {status}",
            script.display()
        )));
    }
    if !vm.wait_quit(Some(Duration::from_secs(1))) {
        return Err(Outcome::Failed(
            "the script's `quit` did not reach the VM".into(),
        ));
    }
    Ok(())
}
