//! Backend transfer of a real memfd over a real UNIX socket into another process.
//!
//! The test binary is its own destination: when `BATON_QDEV_DEST` names a socket it runs
//! as the destination VMM (a fresh process with an incoming device), otherwise it runs the
//! scenarios below as the source. A custom harness keeps that dispatch explicit instead
//! of hiding a pseudo-test among the real ones.

mod common;

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::process::{Child, Command, ExitCode};
use std::time::Duration;

use baton_qdev::{Migratable, ReceivedBackend};
use common::{Backend, CounterDevice};
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

const DEST_ENV: &str = "BATON_QDEV_DEST";
const MODE_ENV: &str = "BATON_QDEV_DEST_MODE";

/// One message, source to destination: lengths, state, metadata, role; the fd rides along.
fn encode_msg(state: &[u8], meta: &[u8], role: &str) -> Vec<u8> {
    let mut m = Vec::new();
    for part in [state, meta, role.as_bytes()] {
        m.extend_from_slice(&(part.len() as u32).to_le_bytes());
        m.extend_from_slice(part);
    }
    m
}

fn decode_msg(m: &[u8]) -> Result<(Vec<u8>, Vec<u8>, String), String> {
    let mut parts = Vec::new();
    let mut at = 0usize;
    for _ in 0..3 {
        let len = m
            .get(at..at + 4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
            .ok_or("short message")?;
        at += 4;
        parts.push(m.get(at..at + len).ok_or("short message")?.to_vec());
        at += len;
    }
    let role = String::from_utf8(parts.pop().ok_or("no role")?).map_err(|e| e.to_string())?;
    let meta = parts.pop().ok_or("no metadata")?;
    let state = parts.pop().ok_or("no state")?;
    Ok((state, meta, role))
}

/// The destination process: receive, adopt, load, run one tick, report.
fn destination(path: &str) -> ExitCode {
    let mode = std::env::var(MODE_ENV).unwrap_or_default();
    let mut sock = match UnixStream::connect(path) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("destination: connect {path}: {e}");
            return ExitCode::from(2);
        }
    };
    let mut buf = vec![0u8; 4096];
    let (n, file) = match sock.recv_with_fd(&mut buf) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("destination: recvmsg: {e}");
            return ExitCode::from(2);
        }
    };
    if mode == "die" {
        // Crash after receiving, before adopting: the source must resume on its own.
        std::process::exit(3);
    }
    let result = (|| -> Result<u64, String> {
        let (state, meta, role) = decode_msg(&buf[..n])?;
        let fd: OwnedFd = file.ok_or("no fd received")?.into();
        let mut dev = CounterDevice::new_incoming("ctr0");
        let received = ReceivedBackend::new("ctr0", vec![(role, fd)], meta, 1);
        dev.backend_transfer()
            .ok_or("no backend hook")?
            .adopt(received)
            .map_err(|e| e.to_string())?;
        dev.load(1, &state).map_err(|e| e.to_string())?;
        dev.tick().map_err(|e| e.to_string())?;
        Ok(dev.counter)
    })();
    let reply = match result {
        Ok(counter) => format!("running {counter}"),
        Err(e) => format!("error {e}"),
    };
    if sock.write_all(reply.as_bytes()).is_err() {
        return ExitCode::from(2);
    }
    ExitCode::SUCCESS
}

struct Peer {
    child: Child,
    conn: UnixStream,
}

fn spawn_destination(mode: &str) -> (Peer, tempdir::Guard) {
    let dir = tempdir::Guard::new();
    let path = dir.path.join("migrate.sock");
    let listener = UnixListener::bind(&path).expect("bind");
    let child = Command::new(std::env::current_exe().expect("current_exe"))
        .env(DEST_ENV, &path)
        .env(MODE_ENV, mode)
        .spawn()
        .expect("spawn destination");
    let (conn, _) = listener.accept().expect("accept");
    conn.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    (Peer { child, conn }, dir)
}

/// Source side of one transfer: save, export, send. Returns the destination's answer
/// (`None` when it closed without one).
fn transfer(src: &mut CounterDevice, peer: &mut Peer, corrupt_meta: bool) -> Option<String> {
    let state = src.save().expect("save");
    let bt = src.backend_transfer().expect("backend hook");
    let handoff = bt.export().expect("export");
    let mut meta = handoff.metadata.clone();
    if corrupt_meta {
        meta.pop(); // hostile metadata: the destination must refuse, not adopt
    }
    let msg = encode_msg(&state, &meta, &handoff.fds[0].role);
    peer.conn
        .send_with_fd(&msg[..], handoff.fds[0].fd.as_raw_fd())
        .expect("sendmsg");
    let mut answer = String::new();
    match peer.conn.read_to_string(&mut answer) {
        Ok(_) if !answer.is_empty() => Some(answer),
        _ => None,
    }
}

fn transfer_works_in_another_process() {
    let mut src = CounterDevice::new_source("ctr0", 64);
    for _ in 0..41 {
        src.tick().unwrap();
    }
    let (mut peer, _dir) = spawn_destination("ok");
    let answer = transfer(&mut src, &mut peer, false);
    assert_eq!(answer.as_deref(), Some("running 42"));
    assert!(peer.child.wait().unwrap().success());

    // The destination wrote 42 through its copy: the source's still-open fd sees it.
    assert!(matches!(src.backend, Backend::Exported(_)));
    assert_eq!(src.backend_value(), Some(42));
    // The source never uses a handed-over backend.
    assert_eq!(src.tick().unwrap_err().to_string(), "backend not active");
    src.backend_transfer().unwrap().release();
    assert!(matches!(src.backend, Backend::Released));
}

fn failed_transfer_resumes_the_source(mode: &str, corrupt: bool, expect: Option<&str>) {
    let mut src = CounterDevice::new_source("ctr0", 64);
    for _ in 0..10 {
        src.tick().unwrap();
    }
    let (mut peer, _dir) = spawn_destination(mode);
    let answer = transfer(&mut src, &mut peer, corrupt);
    assert_eq!(answer.as_deref(), expect);
    let _ = peer.child.wait();
    // No "running": the source takes its backend back and carries on where it was.
    src.backend_transfer().unwrap().resume().unwrap();
    src.tick().unwrap();
    assert_eq!(src.counter, 11);
    assert_eq!(src.backend_value(), Some(11));
}

mod tempdir {
    use std::path::PathBuf;
    pub struct Guard {
        pub path: PathBuf,
    }
    impl Guard {
        pub fn new() -> Self {
            let path = std::env::temp_dir().join(format!(
                "baton-qdev-{}-{}",
                std::process::id(),
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_nanos())
                    .unwrap_or(0)
            ));
            std::fs::create_dir_all(&path).expect("temp dir");
            Guard { path }
        }
    }
    impl Drop for Guard {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

fn main() -> ExitCode {
    if let Ok(path) = std::env::var(DEST_ENV) {
        return destination(&path);
    }
    let filter: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let tests: [(&str, fn()); 3] = [
        (
            "transfer_works_in_another_process",
            transfer_works_in_another_process,
        ),
        (
            "failed_transfer_resumes_the_source_when_the_destination_dies",
            || failed_transfer_resumes_the_source("die", false, None),
        ),
        (
            "failed_transfer_resumes_the_source_when_adopt_refuses",
            || {
                failed_transfer_resumes_the_source(
                "ok",
                true,
                Some("error ctr0: backend adopt: truncated: needs 1 more bytes, 0 left (at byte 8)"),
            )
            },
        ),
    ];
    let mut ran = 0;
    for (name, f) in tests {
        if !filter.is_empty() && !filter.iter().any(|p| name.contains(p.as_str())) {
            continue;
        }
        print!("test {name} ... ");
        let _ = std::io::stdout().flush();
        f();
        println!("ok");
        ran += 1;
    }
    println!("\ntest result: ok. {ran} passed; 0 failed");
    ExitCode::SUCCESS
}
