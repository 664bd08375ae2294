//! One client connection: a reader thread that frames, parses and dispatches its
//! requests (see [`crate::protocol`] for the sequence), and a writer thread that drains
//! its [`Outbox`].

use std::cell::Cell;
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::unix::net::UnixStream;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Map, Value};

use crate::args::from_arguments;
use crate::error::{ErrorClass, QmpError};
use crate::event::{Hub, Outbox};
use crate::framing::{Frame, Framer};
use crate::handler::{CommandContext, QmpHandler};
use crate::protocol::{encode_error, encode_return, parse_request, Request};
use crate::schema::{CommandInfo, NoArgs, QmpCapabilitiesArgs, QmpCapability, VersionInfo};

/// A connected stream of either kind.
#[derive(Debug)]
pub(crate) enum Conn {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl Conn {
    pub(crate) fn try_clone(&self) -> io::Result<Conn> {
        Ok(match self {
            Conn::Unix(s) => Conn::Unix(s.try_clone()?),
            Conn::Tcp(s) => Conn::Tcp(s.try_clone()?),
        })
    }

    fn shutdown(&self, how: Shutdown) {
        // Fails only when already disconnected, which is the goal anyway.
        let _ = match self {
            Conn::Unix(s) => s.shutdown(how),
            Conn::Tcp(s) => s.shutdown(how),
        };
    }

    pub(crate) fn shutdown_read(&self) {
        self.shutdown(Shutdown::Read);
    }

    pub(crate) fn shutdown_both(&self) {
        self.shutdown(Shutdown::Both);
    }

    pub(crate) fn prepare(&self, write_timeout: Duration) -> io::Result<()> {
        match self {
            Conn::Unix(s) => {
                s.set_nonblocking(false)?;
                s.set_write_timeout(Some(write_timeout))
            }
            Conn::Tcp(s) => {
                s.set_nonblocking(false)?;
                s.set_nodelay(true)?;
                s.set_write_timeout(Some(write_timeout))
            }
        }
    }
}

impl Read for Conn {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Conn::Unix(s) => s.read(buf),
            Conn::Tcp(s) => s.read(buf),
        }
    }
}

impl Write for Conn {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Conn::Unix(s) => s.write(buf),
            Conn::Tcp(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match self {
            Conn::Unix(s) => s.flush(),
            Conn::Tcp(s) => s.flush(),
        }
    }
}

/// What a connection needs from the server.
pub(crate) struct ClientEnv {
    pub(crate) hub: Arc<Hub>,
    pub(crate) handler: Arc<dyn QmpHandler>,
    pub(crate) version: VersionInfo,
    pub(crate) max_message_size: usize,
    pub(crate) max_nesting: usize,
}

thread_local! {
    /// Set on client reader threads, where a handler runs: `QmpServer::shutdown` must
    /// not wait for the thread it is called from.
    static ON_CLIENT_THREAD: Cell<bool> = const { Cell::new(false) };
}

pub(crate) fn on_client_thread() -> bool {
    ON_CLIENT_THREAD.with(Cell::get)
}

/// Writer thread: writes queued lines until the outbox is closed and drained.
pub(crate) fn run_writer(id: u64, mut conn: Conn, outbox: Arc<Outbox>) {
    while let Some(line) = outbox.pop() {
        if let Err(e) = conn.write_all(&line) {
            tracing::debug!(client = id, "QMP client write failed: {e}");
            outbox.abort();
            break;
        }
    }
    conn.shutdown_both();
}

/// Reader thread: serves requests until end of input, an error, or the outbox closes.
pub(crate) fn run_reader(
    env: Arc<ClientEnv>,
    ctx: CommandContext,
    mut conn: Conn,
    outbox: Arc<Outbox>,
) {
    ON_CLIENT_THREAD.with(|c| c.set(true));
    let id = ctx.client_id;
    let mut session = Session {
        env: &env,
        ctx: &ctx,
        outbox: &outbox,
        negotiated: false,
    };
    let mut framer = Framer::new(env.max_message_size, env.max_nesting);
    let mut buf = vec![0u8; 64 * 1024];
    let mut frames = Vec::new();
    'conn: loop {
        let n = match conn.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                tracing::debug!(client = id, "QMP client read failed: {e}");
                break;
            }
        };
        framer.feed(&buf[..n], &mut frames);
        for frame in frames.drain(..) {
            if !session.frame(frame) {
                break 'conn;
            }
        }
    }
    if framer.is_partial() {
        tracing::info!(client = id, "QMP client left in the middle of a message");
    }
    env.hub.remove(id);
    outbox.close();
    tracing::info!(client = id, peer = %ctx.peer, "QMP client disconnected");
}

struct Session<'a> {
    env: &'a ClientEnv,
    ctx: &'a CommandContext,
    outbox: &'a Outbox,
    negotiated: bool,
}

impl Session<'_> {
    /// Handles one frame; false when the connection is gone.
    fn frame(&mut self, frame: Frame) -> bool {
        let bytes = match frame {
            Frame::Message(bytes) => bytes,
            Frame::Error(e) => {
                tracing::debug!(client = self.ctx.client_id, "QMP input rejected: {e}");
                return self.reply(Err(QmpError::generic(e.to_string())), None);
            }
        };
        let req = match parse_request(&bytes) {
            Ok(req) => req,
            Err(bad) => {
                tracing::debug!(
                    client = self.ctx.client_id,
                    "QMP bad request: {}",
                    bad.error.desc
                );
                return self.reply(Err(bad.error), bad.id.as_ref());
            }
        };
        tracing::debug!(client = self.ctx.client_id, command = %req.command, "QMP command");
        if !self.negotiated {
            return self.negotiation_mode(req);
        }
        let result = self.command_mode(&req.command, req.arguments);
        if let Err(e) = &result {
            tracing::debug!(client = self.ctx.client_id, command = %req.command, "QMP error reply: {e}");
        }
        self.reply(result, req.id.as_ref())
    }

    fn reply(&self, result: Result<Value, QmpError>, id: Option<&Value>) -> bool {
        let line = match &result {
            Ok(v) => encode_return(v, id),
            Err(e) => encode_error(e, id),
        };
        self.outbox.push_reply(line.into())
    }

    fn negotiation_mode(&mut self, req: Request) -> bool {
        if req.command != "qmp_capabilities" {
            let err = QmpError::new(
                ErrorClass::CommandNotFound,
                "Expecting capabilities negotiation with 'qmp_capabilities'",
            );
            return self.reply(Err(err), req.id.as_ref());
        }
        let args: QmpCapabilitiesArgs = match from_arguments(req.arguments) {
            Ok(a) => a,
            Err(e) => return self.reply(Err(e.into()), req.id.as_ref()),
        };
        if args
            .enable
            .iter()
            .flatten()
            .any(|c| *c == QmpCapability::Oob)
        {
            let err = QmpError::generic("Capability 'oob' not available");
            return self.reply(Err(err), req.id.as_ref());
        }
        self.negotiated = true;
        let line = encode_return(&Value::Object(Map::new()), req.id.as_ref());
        self.outbox.enter_command_mode(line.into())
    }

    fn command_mode(&self, name: &str, args: Map<String, Value>) -> Result<Value, QmpError> {
        match name {
            "qmp_capabilities" => Err(QmpError::new(
                ErrorClass::CommandNotFound,
                "Capabilities negotiation is already complete, command ignored",
            )),
            "query-version" => {
                let NoArgs {} = from_arguments(args)?;
                Ok(serde_json::to_value(&self.env.version).unwrap_or(Value::Null))
            }
            "query-commands" => {
                let NoArgs {} = from_arguments(args)?;
                let mut names = self.env.handler.commands();
                names.extend(
                    ["qmp_capabilities", "query-version", "query-commands"].map(String::from),
                );
                names.sort();
                names.dedup();
                let list: Vec<CommandInfo> =
                    names.into_iter().map(|name| CommandInfo { name }).collect();
                Ok(serde_json::to_value(list).unwrap_or(Value::Null))
            }
            _ => {
                let handler = &self.env.handler;
                catch_unwind(AssertUnwindSafe(|| handler.execute(self.ctx, name, args)))
                    .unwrap_or_else(|_| {
                        tracing::error!(
                            client = self.ctx.client_id,
                            command = name,
                            "QMP command handler panicked"
                        );
                        Err(QmpError::generic(format!(
                            "internal error: command {name} failed unexpectedly"
                        )))
                    })
            }
        }
    }
}
