//! The harness guest's virtio-net driver against a virtio-net device nobody here wrote:
//! QEMU 7.2's `virtio-net-device` on its `microvm` machine, backed by a TAP in a private
//! network namespace. The guest sends sequence frames at a steady rate and echoes what
//! the host injects; the host checks every frame, in order, and the guest's own counts.
//!
//! Needs the guest image (`cargo xtask guest`) and QEMU unpacked (`cargo xtask qemu
//! --fetch-only`) under the cargo target directory (or `BATON_QEMU_ROOT`); without them
//! the test says so and skips.

mod common;

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::*;

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target"))
}

#[test]
fn guest_driver_against_qemu_virtio_net_device() {
    let elf = target_dir().join("guest/baton-guest.elf");
    let root = std::env::var_os("BATON_QEMU_ROOT")
        .map(PathBuf::from)
        .unwrap_or_else(|| target_dir().join("qemu/root"));
    let qemu = root.join("usr/bin/qemu-system-x86_64");
    if !elf.exists() || !qemu.exists() {
        let why = format!(
            "guest_driver_against_qemu_virtio_net_device: needs {} (cargo xtask guest) \
             and {} (cargo xtask qemu --fetch-only)",
            elf.display(),
            qemu.display()
        );
        if std::env::var("BATON_CI").as_deref() == Ok("1") {
            panic!("{why}; BATON_CI=1 requires it");
        }
        eprintln!("SKIPPED {why}");
        return;
    }
    in_netns("guest_driver_against_qemu", move || {
        // QEMU opens a single-queue TAP with a vnet header.
        sh("ip tuntap add dev qtap0 mode tap vnet_hdr");
        sh("ip link set qtap0 addrgenmode none");
        sh("ip link set qtap0 up");
        // Bound before QEMU starts, so not one of the guest's frames is missed.
        let pkt = Packet::bind("qtap0");
        let libs = ["usr/lib/x86_64-linux-gnu", "lib/x86_64-linux-gnu"]
            .map(|d| root.join(d).display().to_string())
            .join(":");
        let count = 1500;
        let mut child = Command::new(&qemu)
            .env("LD_LIBRARY_PATH", libs)
            .env(
                "QEMU_MODULE_DIR",
                root.join("usr/lib/x86_64-linux-gnu/qemu"),
            )
            .arg("-L")
            .arg(root.join("usr/share/qemu"))
            .args([
                "-M",
                "microvm,acpi=off",
                "-accel",
                "tcg",
                "-m",
                "256M",
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
            .args(["-global", "virtio-mmio.force-legacy=false"])
            .args(["-device", "isa-debug-exit,iobase=0xf4,iosize=4"])
            .args([
                "-netdev",
                "tap,id=n0,ifname=qtap0,script=no,downscript=no,vhost=off",
            ])
            .args([
                "-device",
                "virtio-net-device,netdev=n0,mac=52:54:00:12:34:56",
            ])
            .arg("-kernel")
            .arg(&elf)
            .arg("-append")
            .arg(format!(
                "baton.console=pio:0x3f8 baton.exit=pio:0xf4 baton.net=seq baton.net_rate=5 \
                 baton.net_count={count} baton.report_ms=500"
            ))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .expect("QEMU starts");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut lines = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(90);
        // Wait for the driver to come up before injecting.
        while Instant::now() < deadline {
            if let Ok(l) = rx.recv_timeout(Duration::from_millis(100)) {
                let up = l.contains("baton-guest: net up");
                lines.push(l);
                if up {
                    break;
                }
            }
        }
        assert!(lines.iter().any(|l| l.contains("net up")), "{lines:#?}");
        let up = lines.iter().find(|l| l.contains("net up")).unwrap();
        assert!(up.contains("mac=52:54:00:12:34:56"), "{up}");
        let (mut guest_seq, mut echoes, mut sent) = (Vec::new(), Vec::new(), 0u32);
        let mut next_send = Instant::now();
        let mut done = None;
        while Instant::now() < deadline && done.is_none() {
            if sent < 100 && Instant::now() >= next_send {
                pkt.send(&seq_frame([2, 0, 0, 0, 0, 1], sent, 60));
                sent += 1;
                next_send = Instant::now() + Duration::from_millis(10);
            }
            while let Some(f) = pkt.try_recv() {
                if f.len() < 18 || f[6..12] != GUEST_MAC {
                    continue;
                }
                match u16::from_be_bytes([f[12], f[13]]) {
                    ETH_SEQ => guest_seq.push(frame_seq(&f)),
                    0x88b6 => {
                        let mut f = f.clone();
                        f[12..14].copy_from_slice(&ETH_SEQ.to_be_bytes());
                        echoes.push(frame_seq(&f));
                    }
                    _ => {}
                }
            }
            while let Ok(l) = rx.try_recv() {
                if l.contains("net done") {
                    done = Some(l.clone());
                }
                assert!(!l.contains("error") && !l.contains("fault"), "{l}");
                lines.push(l);
            }
            std::thread::sleep(Duration::from_micros(500));
        }
        let _ = child.kill();
        let _ = child.wait();
        let done = done.unwrap_or_else(|| panic!("no `net done`: {lines:#?}"));
        eprintln!("{done}");
        assert_eq!(
            guest_seq,
            (0..count).collect::<Vec<_>>(),
            "guest frames at the host"
        );
        assert_eq!(
            echoes,
            (0..sent).collect::<Vec<_>>(),
            "echoes of the host's frames"
        );
        assert!(
            done.contains(&format!("rx={sent} echoed={sent} lost=0 dup=0")),
            "{done}"
        );
    });
}
