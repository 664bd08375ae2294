//! Machine types and virtio-net-tap: `microvm-1.0` predates backend transfer and early
//! setup, so its compat table turns both off for virtio-net-tap. The same command line
//! therefore gets different device defaults per machine type, visible with their
//! provenance in `--device virtio-net-tap,help` and QMP `device-list-properties`; a
//! `microvm-1.0` guest live-updates into a `microvm-1.0` destination of this (newest)
//! build with the TAP reopened instead of handed over; and the handshake refuses a
//! destination of another machine type before anything moves.

mod harness;

use std::process::Command;
use std::time::Duration;

use harness::net::*;
use harness::netrun::*;
use harness::*;
use serde_json::{json, Value};

const CAPS: &str = "x-ignore-shared,backend-transfer,early-setup";
const T: Duration = Duration::from_secs(60);

fn property(list: &Value, name: &str) -> Value {
    list.as_array()
        .and_then(|a| a.iter().find(|p| p["name"] == name))
        .cloned()
        .unwrap_or_else(|| panic!("no property {name} in {list}"))
}

#[test]
fn compat_turns_backend_transfer_off_on_microvm_1_0_with_provenance() {
    // `help` needs neither KVM nor a TAP.
    let help = |machine: &str| {
        let out = Command::new(vmm_bin())
            .args(["--machine", machine, "--device", "virtio-net-tap,help"])
            .output()
            .expect("baton-vmm");
        assert!(out.status.success(), "{out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let line = |text: &str, prop: &str| -> String {
        text.lines()
            .find(|l| l.trim_start().starts_with(&format!("{prop}=")))
            .unwrap_or_else(|| panic!("no {prop} in\n{text}"))
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ")
    };
    let old = help("microvm-1.0");
    assert_eq!(
        line(&old, "backend-transfer"),
        "backend-transfer=<bool> = off (compat microvm-1.0)"
    );
    assert_eq!(
        line(&old, "early-setup"),
        "early-setup=<bool> = off (compat microvm-1.0)"
    );
    let new = help("microvm");
    assert_eq!(
        line(&new, "backend-transfer"),
        "backend-transfer=<bool> = on (default)"
    );

    // QMP, with the full command line of a VMM (devices included), on both machines.
    let dir = TempDir::new("mt-qmp");
    let dev = net_device("");
    for (machine, value, layer) in [
        ("microvm-1.0", false, "compat"),
        ("microvm", true, "default"),
    ] {
        let mut vmm = Vmm::spawn(
            machine,
            &dir,
            None,
            &[
                "--machine",
                machine,
                "--incoming",
                "defer",
                "--device",
                &dev,
                "--migrate-capabilities",
                CAPS,
            ],
        );
        let mut q = vmm.qmp();
        let list = q
            .execute(
                "device-list-properties",
                json!({ "typename": "virtio-net-tap" }),
            )
            .expect("device-list-properties");
        for prop in ["backend-transfer", "early-setup"] {
            let p = property(&list, prop);
            assert_eq!(p["value"], value, "{machine}: {p}");
            assert_eq!(p["provenance"]["layer"], layer, "{machine}: {p}");
            if layer == "compat" {
                assert_eq!(p["provenance"]["machine"], "microvm-1.0", "{p}");
            }
        }
        // A --global is the next layer up, and shows as such.
        q.execute("quit", json!({})).unwrap();
        vmm.wait_exit(T);
    }
    let mut vmm = Vmm::spawn(
        "global",
        &dir,
        None,
        &[
            "--machine",
            "microvm-1.0",
            "--incoming",
            "defer",
            "--global",
            "virtio-net-tap.backend-transfer=on",
        ],
    );
    let mut q = vmm.qmp();
    let list = q
        .execute(
            "device-list-properties",
            json!({ "typename": "virtio-net-tap" }),
        )
        .expect("device-list-properties");
    let p = property(&list, "backend-transfer");
    assert_eq!(
        (&p["value"], &p["provenance"]["layer"]),
        (&json!(true), &json!("global"))
    );
    q.execute("quit", json!({})).unwrap();
    vmm.wait_exit(T);
}

#[test]
fn a_bad_device_property_fails_with_the_qdev_text() {
    let out = Command::new(vmm_bin())
        .args([
            "--device",
            "virtio-net-tap,id=net0,ifname=tap0,queues=0",
            "--incoming",
            "defer",
        ])
        .output()
        .expect("baton-vmm");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(
            "device 'net0' (virtio-net-tap): invalid value '0' for property 'queues' \
             (explicit): 0 is out of range 1..=256"
        ),
        "{err}"
    );
    let out = Command::new(vmm_bin())
        .args([
            "--device",
            "virtio-net-tap,id=net0,ifname=tap0,queues=2,mq=off",
            "--incoming",
            "defer",
        ])
        .output()
        .expect("baton-vmm");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("device 'net0' (virtio-net-tap): queues>1 requires mq=on"),
        "{err}"
    );
}

#[test]
fn microvm_1_0_guest_live_updates_into_the_newest_build_on_microvm_1_0() {
    if !kvm_or_skip("net_microvm_1_0") || !root_or_skip("net_microvm_1_0") {
        return;
    }
    let _one = serial();
    // No backend-transfer/early-setup on the command line: the machine type decides.
    let dev = net_device("");
    let o = live_update_under_traffic("mv10", "microvm-1.0", &dev, &dev, CAPS);
    let t = &o.traffic;
    eprintln!(
        "microvm-1.0: host sent {}, echoed {} ({} lost); guest frames {} ({} lost, {} dup); \
         guest: {:?}",
        t.host_sent,
        t.echoes,
        t.host_lost(),
        t.guest_frames,
        t.guest_lost,
        t.guest_dup,
        o.guest
    );
    for l in &o.downtime {
        eprintln!("microvm-1.0: {l}");
    }
    // The stream loaded; the TAP was reopened by the destination (compat: no backend
    // transfer, no early setup), nothing handed over.
    o.dst.wait_line("TAP opened", T);
    assert!(!o
        .src
        .lines()
        .iter()
        .any(|l| l.text.contains("TAP exported")));
    assert!(!o
        .dst
        .lines()
        .iter()
        .any(|l| l.text.contains("early setup prepared")));
    assert_eq!(o.guest.get("dup"), Some(&0), "{}", o.dst.dump());
    assert_eq!((t.echo_dups, t.guest_dup), (0, 0), "{t:?}");
    assert_eq!(u64::from(t.guest_next.unwrap_or(0)), NET_COUNT, "{t:?}");
}

#[test]
fn a_destination_of_another_machine_type_is_refused_in_the_handshake() {
    if !kvm_or_skip("net_machine_mismatch") || !root_or_skip("net_machine_mismatch") {
        return;
    }
    let _one = serial();
    let ns = Netns::new("mvmis").expect("namespace");
    ns.add_tap("tap0").expect("TAP");
    let dir = TempDir::new("mvmis");
    let uri = format!("unix:{}", dir.path("mig.sock").display());
    let dev = net_device("");
    let src = spawn_net_source(&dir, &ns.name, "microvm-1.0", &dev, CAPS);
    let mut dst = spawn_net_destination("dst", &dir, &ns.name, "microvm", &dev, CAPS, &uri);
    let mut q = src.qmp();
    q.execute("migrate", json!({ "uri": uri }))
        .expect("migrate");
    let info = q.wait_migration(&["failed", "completed"], T);
    assert_eq!(info["status"], "failed", "{info}");
    let desc = info["error-desc"].as_str().unwrap_or_default();
    assert!(
        desc.contains("machine type: source microvm-1.0, destination microvm-1."),
        "{desc}"
    );
    // The compat defaults differ too, and the handshake says so for the device.
    assert!(
        desc.contains("device net0: backend-transfer: source off, destination on"),
        "{desc}"
    );
    eprintln!("machine mismatch: error-desc: {desc}");
    assert_eq!(
        q.execute("query-status", json!({})).unwrap()["status"],
        "running"
    );
    let (st, _) = dst.wait_exit(T);
    assert!(!st.success());
    q.execute("quit", json!({})).unwrap();
}
