//! The server over real sockets: message framing across writes, limits, several
//! clients, events, clients vanishing, and the server's lifecycle.

mod common;

use std::io::Write;
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::thread;
use std::time::{Duration, Instant};

use baton_qmp::schema::{MigrationEvent, MigrationStatus, ResumeEvent};
use baton_qmp::{CommandRegistry, QmpError, QmpServer, ServerError};
use common::{demo, demo_with, error_of, eventually, socket_path, Client};
use serde_json::{json, Value};

#[test]
fn several_messages_in_one_write() {
    let d = demo("multi");
    let mut c = Client::negotiated(&d.path);
    c.send(
        b"{\"execute\": \"query-status\", \"id\": 1}{\"execute\":\"stop\",\"id\":2}\n\
          {\"execute\": \"query-status\", \"id\": 3} {\"execute\": \"nope\", \"id\": 4}",
    );
    assert_eq!(c.recv_reply()["id"], 1);
    // STOP precedes stop's reply, as in QEMU.
    let ev = c.recv();
    assert_eq!(ev["event"], "STOP");
    assert_eq!(c.recv(), json!({"return": {}, "id": 2}));
    let r = c.recv();
    assert_eq!(
        (r["id"].clone(), r["return"]["status"].clone()),
        (json!(3), json!("paused"))
    );
    assert_eq!(error_of(&c.recv()).0, "CommandNotFound");
}

#[test]
fn one_message_split_across_writes_and_lines() {
    let d = demo("split");
    let mut c = Client::negotiated(&d.path);
    let msg =
        b"{\n  \"execute\":\n  \"query-status\",\n  \"arguments\": {},\n  \"id\": \"a}b\"\n}\n";
    for chunk in msg.chunks(3) {
        c.send(chunk);
        thread::sleep(Duration::from_millis(2));
    }
    let r = c.recv();
    assert_eq!(r["id"], "a}b");
    assert_eq!(r["return"]["status"], "running");
}

#[test]
fn oversized_and_too_deep_messages_are_refused_and_the_connection_survives() {
    let d = demo_with("big", |b| b.max_message_size(64 * 1024));
    let mut c = Client::negotiated(&d.path);
    let big = format!(
        "{{\"execute\": \"migrate\", \"arguments\": {{\"uri\": \"{}\"}}, \"id\": 1}}",
        "x".repeat(200 * 1024)
    );
    c.send(big.as_bytes());
    let r = c.recv();
    assert_eq!(
        error_of(&r),
        (
            "GenericError".into(),
            "JSON message size limit exceeded (65536 bytes)".into()
        )
    );
    assert!(r.get("id").is_none());
    assert_eq!(
        c.execute("query-status", None)["return"]["status"],
        "running"
    );

    let deep = format!("{}1{}", "[".repeat(100), "]".repeat(100));
    c.send(deep.as_bytes());
    assert_eq!(
        error_of(&c.recv()).1,
        "JSON nesting depth limit exceeded (64 levels)"
    );
    assert_eq!(
        c.execute("query-status", None)["return"]["status"],
        "running"
    );
}

#[test]
fn default_limit_is_one_mib() {
    let d = demo("mib");
    let mut c = Client::negotiated(&d.path);
    let just_under = format!(
        "{{\"execute\": \"device-list-properties\", \"arguments\": {{\"typename\": \"{}\"}}}}",
        "y".repeat(1024 * 1024 - 100)
    );
    c.send(just_under.as_bytes());
    assert_eq!(error_of(&c.recv()).0, "DeviceNotFound");
    let over = format!(
        "{{\"execute\": \"stop\", \"pad\": \"{}\"}}",
        "z".repeat(1024 * 1024)
    );
    c.send(over.as_bytes());
    assert_eq!(
        error_of(&c.recv()).1,
        "JSON message size limit exceeded (1048576 bytes)"
    );
    assert_eq!(
        c.execute("query-status", None)["return"]["status"],
        "running"
    );
}

#[test]
fn two_clients_at_once_and_events_reach_both() {
    let d = demo("two");
    let mut a = Client::negotiated(&d.path);
    let mut b = Client::negotiated(&d.path);
    let mut pending = Client::connect(&d.path); // still negotiating: gets no events
    assert!(eventually(|| d.server.client_count() == 3));

    a.send(b"{\"execute\": \"stop\", \"id\": 1}");
    let mut stop_events = Vec::new();
    stop_events.push(a.recv());
    assert_eq!(a.recv(), json!({"return": {}, "id": 1}));
    stop_events.push(b.recv());
    for ev in stop_events {
        assert_eq!(ev["event"], "STOP", "{ev}");
        assert!(ev.get("data").is_none(), "{ev}");
        let ts = &ev["timestamp"];
        assert!(ts["seconds"].as_u64().unwrap() > 1_600_000_000);
        assert!(ts["microseconds"].as_u64().unwrap() < 1_000_000);
    }
    b.expect_silence();
    pending.expect_silence();
    // B sees A's change, and B's commands run while A is connected.
    assert_eq!(
        b.execute("query-status", None)["return"]["status"],
        "paused"
    );

    // Events from another thread, with data.
    let events = d.server.events();
    let t = thread::spawn(move || {
        events.emit(&MigrationEvent {
            status: MigrationStatus::Active,
        })
    });
    assert_eq!(t.join().unwrap(), 2);
    for c in [&mut a, &mut b] {
        let ev = c.recv();
        assert_eq!(ev["event"], "MIGRATION");
        assert_eq!(ev["data"], json!({"status": "active"}));
    }
    pending.expect_silence();
    assert_eq!(
        pending.execute("qmp_capabilities", None),
        json!({"return": {}})
    );
    assert_eq!(d.server.events().emit(&ResumeEvent), 3);
    for c in [&mut a, &mut b, &mut pending] {
        assert_eq!(c.recv()["event"], "RESUME");
    }
    assert_eq!(
        d.server
            .events()
            .emit_raw("X_CUSTOM", Some(json!({"n": 1}))),
        3
    );
    assert_eq!(a.recv()["data"], json!({"n": 1}));
}

#[test]
fn clients_vanishing_never_disturb_others() {
    let d = demo("vanish");
    let mut keep = Client::negotiated(&d.path);
    for i in 0..20 {
        let mut c = Client::connect_raw(&d.path);
        match i % 4 {
            // Mid-message, before the greeting is read.
            0 => c.send(b"{\"execute\": \"query-st"),
            // Mid-message after negotiation.
            1 => {
                c.recv_line();
                c.send(b"{\"execute\": \"qmp_capabilities\"}{\"execute\": \"stop\", \"argu");
            }
            // A command whose reply it never reads.
            2 => c.send(b"{\"execute\": \"qmp_capabilities\"}{\"execute\": \"query-machines\"}"),
            // Half-close: the server sees end of input with a partial message.
            _ => {
                c.send(b"{\"execute\": [");
                c.stream.shutdown(std::net::Shutdown::Write).unwrap();
                c.recv_line();
                assert!(c.sees_eof(Duration::from_secs(5)));
            }
        }
        drop(c);
    }
    assert_eq!(
        keep.execute("query-status", None)["return"]["running"],
        true
    );
    assert!(
        eventually(|| d.server.client_count() == 1),
        "clients left: {}",
        d.server.client_count()
    );
    assert_eq!(d.server.events().emit(&ResumeEvent), 1);
    assert_eq!(keep.recv()["event"], "RESUME");
}

#[test]
fn a_client_that_does_not_read_events_is_dropped_without_blocking() {
    let d = demo("slow");
    let mut slow = Client::negotiated(&d.path);
    let mut fast = Client::negotiated(&d.path);
    let events = d.server.events();
    let start = Instant::now();
    let reader = thread::spawn(move || {
        let mut n = 0;
        while let Some(line) = fast.try_recv_line(Duration::from_secs(5)) {
            assert!(line.contains("RESUME"), "{line}");
            n += 1;
            if n == 20_000 {
                break;
            }
        }
        (n, fast)
    });
    // Bursts the reading client keeps up with; the other one never reads.
    for _ in 0..40 {
        for _ in 0..500 {
            events.emit(&ResumeEvent);
        }
        thread::sleep(Duration::from_millis(20));
    }
    assert!(
        start.elapsed() < Duration::from_secs(10),
        "emitting blocked"
    );
    let (n, mut fast) = reader.join().unwrap();
    assert_eq!(n, 20_000);
    assert!(eventually(|| d.server.client_count() == 1));
    assert!(slow.sees_eof(Duration::from_secs(5)));
    // The reading client is still served.
    assert_eq!(
        fast.execute("query-status", None)["return"]["status"],
        "running"
    );
}

#[test]
fn shutdown_delivers_quit_reply_closes_clients_and_removes_the_socket() {
    let d = demo("quit");
    let mut a = Client::negotiated(&d.path);
    let mut b = Client::negotiated(&d.path);
    assert_eq!(a.execute("quit", None), json!({"return": {}}));
    assert!(d.vm.wait_quit(Some(Duration::from_secs(1))));
    let path = d.path.clone();
    d.server.shutdown();
    assert!(!path.exists());
    assert!(a.sees_eof(Duration::from_secs(5)));
    assert!(b.sees_eof(Duration::from_secs(5)));
    assert!(UnixStream::connect(&path).is_err());
}

#[test]
fn tcp_listener_serves_the_same_protocol() {
    let path = socket_path("tcp");
    let server = QmpServer::builder()
        .unix(&path)
        .tcp("127.0.0.1:0".parse().unwrap())
        .start(CommandRegistry::new())
        .unwrap();
    let addr = server.tcp_addr().unwrap();
    assert_ne!(addr.port(), 0);
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(b"{\"execute\":\"qmp_capabilities\"}\n{\"execute\":\"query-status\",\"id\":1}\n")
        .unwrap();
    let mut r = std::io::BufReader::new(s);
    let mut lines = Vec::new();
    for _ in 0..3 {
        let mut l = String::new();
        std::io::BufRead::read_line(&mut r, &mut l).unwrap();
        assert!(l.ends_with("\r\n"), "{l:?}");
        lines.push(serde_json::from_str::<Value>(&l).unwrap());
    }
    assert!(lines[0].get("QMP").is_some());
    assert_eq!(lines[1], json!({"return": {}}));
    assert_eq!(error_of(&lines[2]).0, "CommandNotFound");
    server.shutdown();
}

#[test]
fn socket_path_handling() {
    // A stale socket is replaced.
    let path = socket_path("stale");
    drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
    let server = QmpServer::builder()
        .unix(&path)
        .start(CommandRegistry::new())
        .unwrap();
    Client::connect(&path);
    // A live one is refused, and left alone.
    let err = QmpServer::builder()
        .unix(&path)
        .start(CommandRegistry::new())
        .unwrap_err();
    assert!(matches!(err, ServerError::SocketInUse { .. }), "{err}");
    Client::connect(&path);
    server.shutdown();
    // A regular file is never removed.
    std::fs::write(&path, b"data").unwrap();
    let err = QmpServer::builder()
        .unix(&path)
        .start(CommandRegistry::new())
        .unwrap_err();
    assert!(matches!(err, ServerError::NotASocket { .. }), "{err}");
    assert!(err.to_string().contains(&path.display().to_string()));
    assert_eq!(std::fs::read(&path).unwrap(), b"data");
    std::fs::remove_file(&path).unwrap();
    let err = QmpServer::builder()
        .start(CommandRegistry::new())
        .unwrap_err();
    assert!(matches!(err, ServerError::NoListener));
}

#[test]
fn too_many_clients_are_refused_with_an_error() {
    let d = demo_with("max", |b| b.max_clients(1));
    let mut a = Client::negotiated(&d.path);
    let mut b = Client::connect_raw(&d.path);
    let r = b.recv();
    assert_eq!(error_of(&r).1, "Too many QMP clients (at most 1)");
    assert!(b.sees_eof(Duration::from_secs(5)));
    assert_eq!(
        a.execute("query-status", None)["return"]["status"],
        "running"
    );
}

#[test]
fn a_panicking_handler_is_an_error_reply_not_a_dead_server() {
    let path = socket_path("panic");
    let mut reg = CommandRegistry::new();
    reg.register_raw("boom", |_, _| panic!("handler bug"));
    reg.register_fn("echo", |ctx, args: serde_json::Map<String, Value>| {
        Ok::<_, QmpError>(json!({"client": ctx.client_id, "args": args}))
    });
    let server = QmpServer::builder().unix(&path).start(reg).unwrap();
    let mut c = Client::negotiated(&path);
    let r = c.execute("boom", None);
    assert_eq!(
        error_of(&r),
        (
            "GenericError".into(),
            "internal error: command boom failed unexpectedly".into()
        )
    );
    let r = c.execute("echo", Some(json!({"k": [1, {"z": null}]})));
    assert_eq!(r["return"]["args"], json!({"k": [1, {"z": null}]}));
    server.shutdown();
}

#[test]
fn listener_handover_keeps_the_socket_path_alive() {
    let d = demo("handover");
    let mut old_client = Client::negotiated(&d.path);
    let path = d.path.clone();
    let listener = d.server.shutdown_keep_listener().expect("listener kept");
    assert!(old_client.sees_eof(Duration::from_secs(5)));
    assert!(path.exists(), "socket file removed during a handover");
    // A client connecting in the gap is queued, not refused.
    let mut gap_client = Client::connect_raw(&path);
    let builder = QmpServer::builder().unix_listener(listener);
    let vm = baton_qmp::demo::DemoVm::new(builder.event_sender());
    let server = builder.start(baton_qmp::demo::registry(vm)).unwrap();
    assert_eq!(server.unix_path(), Some(path.as_path()));
    assert!(gap_client.recv().get("QMP").is_some());
    let mut c = Client::negotiated(&path);
    assert_eq!(
        c.execute("query-status", None)["return"]["status"],
        "running"
    );
    server.shutdown();
    // Not created by the second server: left for its owner to remove.
    assert!(path.exists());
    std::fs::remove_file(&path).unwrap();
}

#[test]
fn a_failed_start_leaves_no_socket_file() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let path = socket_path("failed");
    let err = QmpServer::builder()
        .unix(&path)
        .tcp(taken.local_addr().unwrap())
        .start(CommandRegistry::new())
        .unwrap_err();
    assert!(matches!(err, ServerError::BindTcp { .. }), "{err}");
    assert!(!path.exists());
}
