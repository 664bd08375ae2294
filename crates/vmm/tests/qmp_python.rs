//! A local live update of two real `baton-vmm` processes driven entirely through QEMU's
//! Python QMP library, `qemu.qmp` (PyPI): `tests/live_update_qmp.py` sets the
//! capabilities on both sides, migrates, follows the MIGRATION events and checks the
//! destination runs; this side checks the processes and the guest's own output (the
//! source exits cleanly, the guest keeps reporting on the destination and its pass
//! counters continue from the source's).
//!
//! Needs KVM, and `python3` (or `$BATON_PYTHON`) with `qemu.qmp`
//! (`python3 -m pip install qemu.qmp==0.0.6`, as CI does). When one is missing the test
//! is skipped with the reason printed, and fails under `BATON_CI=1`.

mod harness;

use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use harness::*;
use serde_json::json;

const PIP_INSTALL: &str = "python3 -m pip install qemu.qmp==0.0.6";
const T: Duration = Duration::from_secs(60);
/// Status lines each vCPU prints on the destination after the update.
const LINES_AFTER: usize = 5;

fn python() -> String {
    std::env::var("BATON_PYTHON").unwrap_or_else(|_| "python3".into())
}

/// Whether `python3` can import qemu.qmp; otherwise skip (or fail under BATON_CI=1).
fn qemu_qmp_or_skip(test: &str) -> bool {
    let py = python();
    let reason = match Command::new(&py)
        .args([
            "-c",
            "import qemu.qmp, qemu.qmp.legacy; from qemu.qmp import QMPClient",
        ])
        .output()
    {
        Ok(o) if o.status.success() => return true,
        Ok(o) => {
            let err = String::from_utf8_lossy(&o.stderr);
            format!(
                "`{py}` cannot import qemu.qmp ({})",
                err.lines().last().unwrap_or("").trim()
            )
        }
        Err(e) => format!("cannot run `{py}`: {e}"),
    };
    skip_or_fail(&format!(
        "{test}: {reason}; install it with `{PIP_INSTALL}`"
    ))
}

fn status_count(vm: &Vmm, cpu: u64) -> usize {
    vm.guest("status")
        .iter()
        .filter(|(_, kv)| kv.get("cpu") == Some(&cpu))
        .count()
}

/// Runs the script to completion (killed after `T`); its exit status and output.
fn run_script(args: &[&Path], uri: &str, extra: &[&str]) -> (bool, String) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/live_update_qmp.py");
    let mut child = Command::new(python())
        .arg(&script)
        .args(args)
        .arg(uri)
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("running {}: {e}", script.display()));
    let drain = |p: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut s = String::new();
            if let Some(mut p) = p {
                let _ = p.read_to_string(&mut s);
            }
            s
        })
    };
    let out = drain(child.stdout.take().map(|p| Box::new(p) as _));
    let err = drain(child.stderr.take().map(|p| Box::new(p) as _));
    let deadline = Instant::now() + T;
    let status = loop {
        if let Some(st) = child.try_wait().expect("waiting for python") {
            break Some(st);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let text = format!(
        "{}{}",
        out.join().unwrap_or_default(),
        err.join().unwrap_or_default()
    );
    match status {
        Some(st) => (st.success(), text),
        None => (false, format!("{text}\n(killed after {T:?})")),
    }
}

#[test]
fn local_live_update_through_python_qemu_qmp() {
    if !kvm_or_skip("qmp_python") || !qemu_qmp_or_skip("qmp_python") {
        return;
    }
    let elf = guest_elf().display().to_string();
    let dir = TempDir::new("pyqmp");
    let uri = format!("unix:{}", dir.path("mig.sock").display());
    let mem = ["--memory", "256M", "--cpus", "2"];
    let mut src_args = vec!["--kernel", &elf];
    src_args.extend(mem);
    src_args.extend(["--cmdline", "baton.passes=0 baton.report_ms=20"]);
    // No capabilities on the command line: the script sets them over QMP.
    let mut src = Vmm::spawn("src", &dir, None, &src_args);
    src.wait_for(
        T,
        |_| (0..2).all(|c| status_count(&src, c) >= 3),
        "status lines of both vCPUs",
    );
    // `--incoming defer`: the script sets the capabilities, then `migrate-incoming`.
    let mut dst_args = vec!["--incoming", "defer"];
    dst_args.extend(mem);
    let mut dst = Vmm::spawn("dst", &dir, None, &dst_args);

    let (ok, output) = run_script(&[&src.qmp_path, &dst.qmp_path], &uri, &["--defer"]);
    print!("{output}");
    assert!(
        ok,
        "live_update_qmp.py failed:\n{output}\n{}{}",
        src.dump(),
        dst.dump()
    );
    assert!(
        output.contains("live_update_qmp: async API ok ")
            && output.contains("live_update_qmp: legacy API ok"),
        "{output}"
    );

    // The source hands over and exits on its own, successfully, with its breakdown.
    let (st, _) = src.wait_exit(T);
    assert!(st.success(), "source failed\n{}", src.dump());
    src.wait_line("downtime ", T);
    dst.wait_line("incoming migration completed", T);

    // The guest keeps running on the destination and continues where it was.
    dst.wait_for(
        T,
        |_| (0..2).all(|c| status_count(&dst, c) >= LINES_AFTER),
        "the guest's status lines after the update",
    );
    for cpu in 0..2u64 {
        let last_src = src
            .guest("status")
            .into_iter()
            .rev()
            .find(|(_, kv)| kv.get("cpu") == Some(&cpu))
            .expect("source status line");
        let dst_lines: Vec<_> = dst
            .guest("status")
            .into_iter()
            .filter(|(_, kv)| kv.get("cpu") == Some(&cpu))
            .collect();
        let passes: Vec<u64> = dst_lines.iter().map(|(_, kv)| kv["pass"]).collect();
        assert!(
            passes[0] >= last_src.1["pass"],
            "cpu {cpu}: the destination starts at pass {} but the source reached {}",
            passes[0],
            last_src.1["pass"]
        );
        assert!(
            passes.windows(2).all(|w| w[1] >= w[0]) && passes.last() > passes.first(),
            "cpu {cpu}: the guest does not make progress on the destination: {passes:?}"
        );
    }
    assert!(
        dst.guest("fault").is_empty() && dst.guest("error").is_empty(),
        "{}",
        dst.dump()
    );

    let mut q = dst.qmp();
    assert_eq!(
        q.execute("query-status", json!({})).unwrap()["status"],
        "running"
    );
    q.execute("quit", json!({})).unwrap();
    let (st, _) = dst.wait_exit(T);
    assert!(st.success(), "destination failed\n{}", dst.dump());
}
