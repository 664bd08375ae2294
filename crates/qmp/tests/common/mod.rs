//! Helpers for the integration tests: a demo server on a fresh socket path and a
//! minimal line-reading QMP client over a real UNIX socket.

#![allow(dead_code)]

use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use baton_qmp::demo::{self, DemoVm};
use baton_qmp::{QmpServer, QmpServerBuilder};
use serde_json::{json, Value};

/// A fresh socket path under the temp dir (short enough for sun_path).
pub fn socket_path(tag: &str) -> PathBuf {
    static N: AtomicU32 = AtomicU32::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    std::env::temp_dir().join(format!("bqmp-{}-{tag}-{n}.sock", std::process::id()))
}

pub struct Demo {
    pub server: QmpServer,
    pub vm: Arc<DemoVm>,
    pub path: PathBuf,
}

/// The demo VM behind a server configured by `configure`.
pub fn demo_with(tag: &str, configure: impl FnOnce(QmpServerBuilder) -> QmpServerBuilder) -> Demo {
    let path = socket_path(tag);
    let builder = configure(QmpServer::builder().unix(&path));
    let vm = DemoVm::new(builder.event_sender());
    let server = builder
        .start(demo::registry(vm.clone()))
        .expect("start server");
    Demo { server, vm, path }
}

pub fn demo(tag: &str) -> Demo {
    demo_with(tag, |b| b)
}

pub struct Client {
    pub stream: UnixStream,
    buf: Vec<u8>,
}

impl Client {
    /// Connects without reading anything.
    pub fn connect_raw(path: &Path) -> Client {
        let stream = UnixStream::connect(path).expect("connect");
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        Client {
            stream,
            buf: Vec::new(),
        }
    }

    /// Connects and checks that a greeting arrives.
    pub fn connect(path: &Path) -> Client {
        let mut c = Client::connect_raw(path);
        let greeting = c.recv();
        assert!(greeting.get("QMP").is_some(), "greeting: {greeting}");
        c
    }

    /// Connects and negotiates capabilities.
    pub fn negotiated(path: &Path) -> Client {
        let mut c = Client::connect(path);
        let r = c.execute("qmp_capabilities", None);
        assert_eq!(r, json!({"return": {}}));
        c
    }

    pub fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).expect("send");
    }

    pub fn send_json(&mut self, v: &Value) {
        let mut bytes = serde_json::to_vec(v).unwrap();
        bytes.push(b'\n');
        self.send(&bytes);
    }

    /// One raw line (without CRLF); panics on timeout or EOF.
    pub fn recv_line(&mut self) -> String {
        self.try_recv_line(Duration::from_secs(10))
            .unwrap_or_else(|| {
                panic!(
                    "no line from the server; buffered: {:?}",
                    String::from_utf8_lossy(&self.buf)
                )
            })
    }

    /// One line within `timeout`, or `None` (timeout or EOF).
    pub fn try_recv_line(&mut self, timeout: Duration) -> Option<String> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(pos) = self.buf.windows(2).position(|w| w == b"\r\n") {
                let line: Vec<u8> = self.buf.drain(..pos + 2).collect();
                return Some(String::from_utf8(line[..pos].to_vec()).expect("utf-8 line"));
            }
            let left = deadline.checked_duration_since(Instant::now())?;
            self.stream
                .set_read_timeout(Some(left.max(Duration::from_millis(1))))
                .unwrap();
            let mut chunk = [0u8; 65536];
            match self.stream.read(&mut chunk) {
                Ok(0) => return None,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    return None
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => return None,
            }
        }
    }

    pub fn recv(&mut self) -> Value {
        let line = self.recv_line();
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("bad JSON line {line:?}: {e}"))
    }

    /// Next message that is not an event.
    pub fn recv_reply(&mut self) -> Value {
        loop {
            let v = self.recv();
            if v.get("event").is_none() {
                return v;
            }
        }
    }

    pub fn execute(&mut self, cmd: &str, args: Option<Value>) -> Value {
        let mut msg = json!({"execute": cmd});
        if let Some(a) = args {
            msg["arguments"] = a;
        }
        self.send_json(&msg);
        self.recv_reply()
    }

    /// Asserts that nothing arrives for a short while.
    pub fn expect_silence(&mut self) {
        if let Some(line) = self.try_recv_line(Duration::from_millis(200)) {
            panic!("unexpected message: {line}");
        }
    }

    /// Whether the server closed the connection within the timeout.
    pub fn sees_eof(&mut self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            let mut chunk = [0u8; 4096];
            self.stream
                .set_read_timeout(Some(Duration::from_millis(50)))
                .unwrap();
            match self.stream.read(&mut chunk) {
                Ok(0) => return true,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                Err(_) => return true,
            }
        }
        false
    }
}

/// `(class, desc)` of an error reply; panics on anything else.
pub fn error_of(reply: &Value) -> (String, String) {
    let err = reply
        .get("error")
        .unwrap_or_else(|| panic!("expected an error reply, got {reply}"));
    (
        err["class"].as_str().unwrap().to_owned(),
        err["desc"].as_str().unwrap().to_owned(),
    )
}

/// Polls `cond` for up to 5 s.
pub fn eventually(mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    cond()
}
