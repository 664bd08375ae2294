//! KVM harness scenarios with real `baton-vmm` processes: local live update, remote
//! migration over TCP between two network namespaces, snapshot and restore, and cancel
//! during pre-copy.
//!
//! The guest runs QEMU's migration-test pattern for exactly `PASSES` passes and then checks
//! every page of its regions holds `PASSES mod 256`; a page lost or rolled back by a
//! migration makes it exit with a failure, so a clean `done ... bad=0` on the destination
//! is the "no page lost" proof.

mod harness;

use std::time::Duration;

use harness::*;
use serde_json::json;

/// Long enough that the guest is still running when a slow pre-copy (dirty logging on a
/// loaded host) ends; a clean finish is only checked after the migration.
const PASSES: u64 = 120000;
const T: Duration = Duration::from_secs(60);

fn guest_args(elf: &str, extra: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = [
        "--kernel",
        elf,
        "--memory",
        "256M",
        "--cpus",
        "2",
        "--cmdline",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    v.push(format!("baton.passes={PASSES} baton.report_ms=50"));
    v.extend(extra.iter().map(|s| s.to_string()));
    v
}

/// Wait until every vCPU of the guest reported at least once.
fn wait_both_cpus(vm: &Vmm) {
    vm.wait_for(
        T,
        |_| {
            (0..2u64).all(|c| {
                vm.guest("status")
                    .iter()
                    .any(|(_, kv)| kv.get("cpu") == Some(&c))
            })
        },
        "status lines of both vCPUs",
    );
}

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

/// The destination finished the pattern on both vCPUs with no bad page, and its first
/// reports continue the source's last ones (pass counts and guest ticks never go back).
fn assert_continued(src: &Vmm, dst: &Vmm) {
    for cpu in 0..2u64 {
        let done = dst.guest("done");
        let d = done
            .iter()
            .find(|(_, kv)| kv.get("cpu") == Some(&cpu))
            .unwrap_or_else(|| panic!("no done line for cpu {cpu}\n{}", dst.dump()));
        assert_eq!(
            d.1.get("bad"),
            Some(&0),
            "cpu {cpu}: pages lost\n{}",
            dst.dump()
        );
        assert_eq!(d.1.get("pass"), Some(&PASSES));
        let last_src = src
            .guest("status")
            .into_iter()
            .rfind(|(_, kv)| kv.get("cpu") == Some(&cpu))
            .expect("source status");
        let first_dst = dst
            .guest("status")
            .into_iter()
            .find(|(_, kv)| kv.get("cpu") == Some(&cpu))
            .expect("destination status");
        for key in ["pass", "ticks", "tsc"] {
            assert!(
                first_dst.1[key] >= last_src.1[key],
                "cpu {cpu}: {key} went back: source {} then destination {}",
                last_src.1[key],
                first_dst.1[key]
            );
        }
        // Guest time is continuous: the LAPIC tick count (10 ms) jumps by at most a few
        // report intervals plus the update, not by seconds.
        let gap = first_dst.1["ticks"] - last_src.1["ticks"];
        assert!(gap < 100, "cpu {cpu}: guest ticks jumped by {gap}");
    }
}

#[test]
fn local_live_update_hands_over_ram_and_continues() {
    if !kvm_or_skip("local_live_update") {
        return;
    }
    let elf = guest_elf().display().to_string();
    let dir = TempDir::new("local");
    let sock = format!("unix:{}", dir.path("mig.sock").display());
    let local = ["--migrate-capabilities", "x-ignore-shared"];
    let mut src = Vmm::spawn("src", &dir, None, &strs(&guest_args(&elf, &local)));
    wait_both_cpus(&src);
    let mut dst = Vmm::spawn(
        "dst",
        &dir,
        None,
        &[
            "--incoming",
            &sock,
            "--memory",
            "256M",
            "--cpus",
            "2",
            "--migrate-capabilities",
            "x-ignore-shared",
        ],
    );
    let mut q = src.qmp();
    q.execute("migrate", json!({ "uri": sock }))
        .expect("migrate");
    let (st, src_gone) = src.wait_exit(T);
    assert!(st.success(), "source failed\n{}", src.dump());
    let running = dst.wait_line("incoming migration completed", T);
    assert!(
        running.at <= src_gone,
        "the source exited before the destination ran"
    );
    src.wait_line("downtime ", T);
    let (st, _) = dst.wait_exit(T);
    assert!(st.success(), "destination failed\n{}", dst.dump());
    assert_continued(&src, &dst);
}

#[test]
fn remote_migration_over_tcp_between_namespaces() {
    if !kvm_or_skip("remote_migration") {
        return;
    }
    let ns = match NetnsPair::new("rm") {
        Ok(n) => n,
        Err(e) => {
            skip_or_fail(&format!("remote_migration: network namespaces: {e}"));
            return;
        }
    };
    let elf = guest_elf().display().to_string();
    let dir = TempDir::new("remote");
    let mut src = Vmm::spawn("src", &dir, Some(&ns.src), &strs(&guest_args(&elf, &[])));
    wait_both_cpus(&src);
    let mut dst = Vmm::spawn(
        "dst",
        &dir,
        Some(&ns.dst),
        &[
            "--incoming",
            "tcp:10.77.0.2:4444",
            "--memory",
            "256M",
            "--cpus",
            "2",
        ],
    );
    let mut q = src.qmp();
    q.execute("migrate", json!({ "uri": "tcp:10.77.0.2:4444" }))
        .expect("migrate");
    let (st, src_gone) = src.wait_exit(T);
    assert!(st.success(), "source failed\n{}", src.dump());
    let running = dst.wait_line("incoming migration completed", T);
    assert!(running.at <= src_gone);
    let (st, _) = dst.wait_exit(T);
    assert!(st.success(), "destination failed\n{}", dst.dump());
    assert_continued(&src, &dst);
}

#[test]
fn snapshot_then_restore_in_a_new_process() {
    if !kvm_or_skip("snapshot") {
        return;
    }
    let elf = guest_elf().display().to_string();
    let dir = TempDir::new("snap");
    let file = format!("file:{}", dir.path("vm.snap").display());
    let mut src = Vmm::spawn("src", &dir, None, &strs(&guest_args(&elf, &[])));
    wait_both_cpus(&src);
    let mut q = src.qmp();
    q.execute("migrate", json!({ "uri": file }))
        .expect("snapshot");
    let info = q.wait_migration(&["completed", "failed"], T);
    assert_eq!(info["status"], "completed", "{info}");
    // The snapshotted VM runs on.
    assert_eq!(
        q.execute("query-status", json!({})).unwrap()["status"],
        "running"
    );
    q.execute("quit", json!({})).unwrap();
    src.wait_exit(T);
    let mut dst = Vmm::spawn(
        "dst",
        &dir,
        None,
        &["--incoming", &file, "--memory", "256M", "--cpus", "2"],
    );
    let (st, _) = dst.wait_exit(T);
    assert!(st.success(), "restored VM failed\n{}", dst.dump());
    for cpu in 0..2 {
        let done = dst.guest("done");
        let d = done
            .iter()
            .find(|(_, kv)| kv.get("cpu") == Some(&cpu))
            .expect("done");
        assert_eq!(d.1.get("bad"), Some(&0), "{}", dst.dump());
    }
}

#[test]
fn cancel_during_precopy_resumes_the_source() {
    if !kvm_or_skip("cancel") {
        return;
    }
    let elf = guest_elf().display().to_string();
    let dir = TempDir::new("cancel");
    let sock = format!("unix:{}", dir.path("mig.sock").display());
    let mut src = Vmm::spawn("src", &dir, None, &strs(&guest_args(&elf, &[])));
    wait_both_cpus(&src);
    let mut dst = Vmm::spawn(
        "dst",
        &dir,
        None,
        &["--incoming", &sock, "--memory", "256M", "--cpus", "2"],
    );
    let mut q = src.qmp();
    // 4 MB/s: the 32 MiB the guest writes cannot finish its first pass quickly.
    q.execute(
        "migrate-set-parameters",
        json!({ "max-bandwidth": 4_000_000 }),
    )
    .unwrap();
    q.execute("migrate", json!({ "uri": sock }))
        .expect("migrate");
    q.wait_migration(&["active"], T);
    std::thread::sleep(Duration::from_millis(300));
    q.execute("migrate_cancel", json!({})).unwrap();
    let info = q.wait_migration(&["cancelled", "failed", "completed"], T);
    assert_eq!(info["status"], "cancelled", "{info}");
    assert_eq!(
        q.execute("query-status", json!({})).unwrap()["status"],
        "running"
    );
    // The destination discarded and ended without ever running the guest.
    let (st, _) = dst.wait_exit(T);
    assert!(!st.success());
    assert!(!dst
        .lines()
        .iter()
        .any(|l| l.text.contains("incoming migration completed")));
    // The source finishes the pattern with every page intact.
    let (st, _) = src.wait_exit(T);
    assert!(st.success(), "{}", src.dump());
    for cpu in 0..2 {
        let done = src.guest("done");
        let d = done
            .iter()
            .find(|(_, kv)| kv.get("cpu") == Some(&cpu))
            .expect("done");
        assert_eq!(d.1.get("bad"), Some(&0));
    }
    let statuses: Vec<_> = q
        .events
        .iter()
        .filter(|e| e["event"] == "MIGRATION")
        .map(|e| e["data"]["status"].clone())
        .collect();
    assert!(
        statuses.contains(&json!("cancelled")) || statuses.is_empty(),
        "{statuses:?}"
    );
}
