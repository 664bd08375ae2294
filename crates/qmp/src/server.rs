//! [`QmpServer`]: listening sockets, the accept loop, client threads and shutdown.

use std::fs;
use std::io::{self, Write};
use std::net::{SocketAddr, TcpListener};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use crate::client::{on_client_thread, run_reader, run_writer, ClientEnv, Conn};
use crate::error::{QmpError, ServerError};
use crate::event::{EventSender, Hub, Outbox};
use crate::handler::{CommandContext, QmpHandler};
use crate::protocol::{encode_error, encode_greeting};
use crate::schema::VersionInfo;

/// The QEMU version whose QMP behaviour baton implements by default (the greeting's and
/// `query-version`'s `qemu` member). Clients gate features on it.
pub const DEFAULT_QEMU_VERSION: (u32, u32, u32) = (7, 2, 0);
/// Default bound on one message, bytes.
pub const DEFAULT_MAX_MESSAGE_SIZE: usize = 1024 * 1024;
/// Default bound on array/object nesting of one message.
pub const DEFAULT_MAX_NESTING: usize = 64;
/// Default bound on connected clients.
pub const DEFAULT_MAX_CLIENTS: usize = 32;
/// Default time a write to a client may block before the client is dropped.
pub const DEFAULT_WRITE_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug)]
enum UnixSource {
    Path(PathBuf),
    Listener(UnixListener),
}

/// Configures and starts a [`QmpServer`].
#[derive(Debug)]
pub struct QmpServerBuilder {
    unix: Option<UnixSource>,
    tcp: Option<SocketAddr>,
    version: VersionInfo,
    max_message_size: usize,
    max_nesting: usize,
    max_clients: usize,
    write_timeout: Duration,
    hub: Arc<Hub>,
}

impl Default for QmpServerBuilder {
    fn default() -> Self {
        let (major, minor, micro) = DEFAULT_QEMU_VERSION;
        QmpServerBuilder {
            unix: None,
            tcp: None,
            version: VersionInfo::new(
                major,
                minor,
                micro,
                format!("baton {}", env!("CARGO_PKG_VERSION")),
            ),
            max_message_size: DEFAULT_MAX_MESSAGE_SIZE,
            max_nesting: DEFAULT_MAX_NESTING,
            max_clients: DEFAULT_MAX_CLIENTS,
            write_timeout: DEFAULT_WRITE_TIMEOUT,
            hub: Arc::default(),
        }
    }
}

impl QmpServerBuilder {
    /// Listens on a UNIX socket at `path`. A stale socket there is replaced; a live one
    /// or any other file is an error.
    pub fn unix(mut self, path: impl Into<PathBuf>) -> Self {
        self.unix = Some(UnixSource::Path(path.into()));
        self
    }

    /// Serves on an already-listening UNIX socket instead, e.g. one inherited from the
    /// VMM process this one replaces in a live update (see
    /// [`QmpServer::shutdown_keep_listener`]), or one created by a management stack.
    /// Its socket file is never removed by this server.
    pub fn unix_listener(mut self, listener: UnixListener) -> Self {
        self.unix = Some(UnixSource::Listener(listener));
        self
    }

    /// Also (or only) listens on TCP. Port 0 picks a free port ([`QmpServer::tcp_addr`]).
    /// QMP has no authentication: bind to loopback.
    pub fn tcp(mut self, addr: SocketAddr) -> Self {
        self.tcp = Some(addr);
        self
    }

    /// The QEMU version announced (default [`DEFAULT_QEMU_VERSION`]).
    pub fn qemu_version(mut self, major: u32, minor: u32, micro: u32) -> Self {
        let package = std::mem::take(&mut self.version.package);
        self.version = VersionInfo::new(major, minor, micro, package);
        self
    }

    /// The `package` string announced (default `baton VERSION`).
    pub fn package(mut self, package: impl Into<String>) -> Self {
        self.version.package = package.into();
        self
    }

    /// Bound on one message (default 1 MiB).
    pub fn max_message_size(mut self, bytes: usize) -> Self {
        self.max_message_size = bytes;
        self
    }

    /// Bound on nesting (default 64, at most 120).
    pub fn max_nesting(mut self, depth: usize) -> Self {
        // serde_json refuses more than 128 levels itself.
        self.max_nesting = depth.min(120);
        self
    }

    /// Bound on connected clients (default 32); more are refused with an error line.
    pub fn max_clients(mut self, n: usize) -> Self {
        self.max_clients = n.max(1);
        self
    }

    /// How long a write to a client may block before it is dropped (default 5 s).
    pub fn write_timeout(mut self, timeout: Duration) -> Self {
        self.write_timeout = timeout.max(Duration::from_millis(1));
        self
    }

    /// The event handle of the server being built, so handlers can hold it.
    pub fn event_sender(&self) -> EventSender {
        EventSender::new(self.hub.clone())
    }

    /// Binds the sockets and starts accepting clients.
    pub fn start(self, handler: impl QmpHandler) -> Result<QmpServer, ServerError> {
        QmpServer::start(self, Arc::new(handler))
    }
}

/// A running QMP server. Dropping it shuts it down.
#[derive(Debug)]
pub struct QmpServer {
    hub: Arc<Hub>,
    unix_path: Option<PathBuf>,
    /// The socket file this server created (path, device, inode), removed at shutdown.
    owned_socket: Option<(PathBuf, u64, u64)>,
    tcp_addr: Option<SocketAddr>,
    wake: Option<UnixStream>,
    acceptor: Option<JoinHandle<Option<UnixListener>>>,
    threads: Arc<Mutex<Vec<JoinHandle<()>>>>,
}

struct Acceptor {
    env: Arc<ClientEnv>,
    unix: Option<(UnixListener, PathBuf)>,
    tcp: Option<TcpListener>,
    wake: UnixStream,
    max_clients: usize,
    write_timeout: Duration,
    next_id: AtomicU64,
    threads: Arc<Mutex<Vec<JoinHandle<()>>>>,
}

/// Removes a socket file this server created if starting fails after binding it.
struct SocketFile(Option<(PathBuf, u64, u64)>);

impl SocketFile {
    fn keep(mut self) -> (PathBuf, u64, u64) {
        // Always Some until kept.
        self.0.take().unwrap_or_default()
    }
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        if let Some((path, ..)) = &self.0 {
            let _ = fs::remove_file(path);
        }
    }
}

fn setup(what: &'static str) -> impl FnOnce(io::Error) -> ServerError {
    move |source| ServerError::Setup { what, source }
}

fn bind_unix(path: &Path) -> Result<UnixListener, ServerError> {
    match fs::symlink_metadata(path) {
        Ok(md) if md.file_type().is_socket() => {
            if UnixStream::connect(path).is_ok() {
                return Err(ServerError::SocketInUse { path: path.into() });
            }
            tracing::info!(path = %path.display(), "replacing stale QMP socket");
            fs::remove_file(path).map_err(|source| ServerError::BindUnix {
                path: path.into(),
                source,
            })?;
        }
        Ok(_) => return Err(ServerError::NotASocket { path: path.into() }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(source) => {
            return Err(ServerError::BindUnix {
                path: path.into(),
                source,
            })
        }
    }
    UnixListener::bind(path).map_err(|source| ServerError::BindUnix {
        path: path.into(),
        source,
    })
}

impl QmpServer {
    /// A builder with the defaults.
    pub fn builder() -> QmpServerBuilder {
        QmpServerBuilder::default()
    }

    fn start(b: QmpServerBuilder, handler: Arc<dyn QmpHandler>) -> Result<QmpServer, ServerError> {
        if b.unix.is_none() && b.tcp.is_none() {
            return Err(ServerError::NoListener);
        }
        let mut owned_socket = None;
        let unix = match b.unix {
            Some(UnixSource::Path(path)) => {
                let listener = bind_unix(&path)?;
                let md = fs::metadata(&path).map_err(setup("stat the QMP socket"))?;
                owned_socket = Some(SocketFile(Some((path.clone(), md.dev(), md.ino()))));
                Some((listener, path))
            }
            Some(UnixSource::Listener(listener)) => {
                let addr = listener
                    .local_addr()
                    .map_err(setup("read the UNIX socket address"))?;
                let path = addr
                    .as_pathname()
                    .map(Path::to_path_buf)
                    .unwrap_or_default();
                Some((listener, path))
            }
            None => None,
        };
        let tcp = match b.tcp {
            Some(addr) => Some(
                TcpListener::bind(addr).map_err(|source| ServerError::BindTcp { addr, source })?,
            ),
            None => None,
        };
        let tcp_addr = match &tcp {
            Some(l) => Some(l.local_addr().map_err(setup("read the TCP address"))?),
            None => None,
        };
        if let Some((l, ..)) = &unix {
            l.set_nonblocking(true)
                .map_err(setup("make the listener non-blocking"))?;
        }
        if let Some(l) = &tcp {
            l.set_nonblocking(true)
                .map_err(setup("make the listener non-blocking"))?;
        }
        let (wake_tx, wake_rx) = UnixStream::pair().map_err(setup("create the wake-up pair"))?;
        let threads = Arc::new(Mutex::new(Vec::new()));
        let unix_path = unix.as_ref().map(|(_, p)| p.clone());
        let acceptor = Acceptor {
            env: Arc::new(ClientEnv {
                hub: b.hub.clone(),
                handler,
                version: b.version,
                max_message_size: b.max_message_size,
                max_nesting: b.max_nesting,
            }),
            unix,
            tcp,
            wake: wake_rx,
            max_clients: b.max_clients,
            write_timeout: b.write_timeout,
            next_id: AtomicU64::new(1),
            threads: threads.clone(),
        };
        let handle = thread::Builder::new()
            .name("qmp-accept".into())
            .spawn(move || acceptor.run())
            .map_err(setup("spawn the accept thread"))?;
        if let Some(p) = &unix_path {
            tracing::info!(path = %p.display(), "QMP server listening");
        }
        if let Some(a) = tcp_addr {
            tracing::info!(addr = %a, "QMP server listening on TCP");
        }
        Ok(QmpServer {
            hub: b.hub,
            unix_path,
            owned_socket: owned_socket.map(SocketFile::keep),
            tcp_addr,
            wake: Some(wake_tx),
            acceptor: Some(handle),
            threads,
        })
    }

    /// A handle to emit events.
    pub fn events(&self) -> EventSender {
        EventSender::new(self.hub.clone())
    }

    /// The UNIX socket path, if listening on one.
    pub fn unix_path(&self) -> Option<&Path> {
        self.unix_path.as_deref()
    }

    /// The bound TCP address (with the real port), if listening on TCP.
    pub fn tcp_addr(&self) -> Option<SocketAddr> {
        self.tcp_addr
    }

    /// The number of connected clients.
    pub fn client_count(&self) -> usize {
        self.hub.len()
    }

    /// Stops accepting, disconnects every client after delivering what is queued for
    /// it (a `quit` reply reaches its client), waits for the connection threads and
    /// removes the socket file. A command still running delays it until it returns.
    ///
    /// Called from within a command handler, it does not wait for the connection
    /// threads (it runs on one of them).
    pub fn shutdown(mut self) {
        self.stop(false);
    }

    /// Like [`QmpServer::shutdown`], but keeps the UNIX listening socket open and its
    /// file in place, and returns it (in blocking mode): a live update hands it to the
    /// new VMM process, which serves it with [`QmpServerBuilder::unix_listener`], so the
    /// socket path never disappears. Clients are disconnected and reconnect.
    pub fn shutdown_keep_listener(mut self) -> Option<UnixListener> {
        self.stop(true)
    }

    fn stop(&mut self, keep_listener: bool) -> Option<UnixListener> {
        let mut wake = self.wake.take()?;
        if let Err(e) = wake.write_all(&[1]) {
            tracing::warn!("cannot wake the QMP accept thread: {e}");
        }
        let mut listener = None;
        if let Some(handle) = self.acceptor.take() {
            match handle.join() {
                Ok(l) => listener = l,
                Err(_) => tracing::error!("the QMP accept thread panicked"),
            }
        }
        self.hub.close_all();
        let handles =
            std::mem::take(&mut *self.threads.lock().unwrap_or_else(PoisonError::into_inner));
        if on_client_thread() {
            tracing::warn!(
                "QMP server shut down from a command handler; not waiting for its connections"
            );
        } else {
            for handle in handles {
                let _ = handle.join();
            }
        }
        if keep_listener {
            let listener = listener.filter(|l| match l.set_nonblocking(false) {
                Ok(()) => true,
                Err(e) => {
                    tracing::warn!("cannot restore the QMP listener to blocking mode: {e}");
                    false
                }
            });
            tracing::info!("QMP server stopped; listener kept");
            return listener;
        }
        drop(listener);
        if let Some((path, dev, ino)) = &self.owned_socket {
            // Remove the socket only if it is still ours.
            if fs::symlink_metadata(path).is_ok_and(|md| md.dev() == *dev && md.ino() == *ino) {
                if let Err(e) = fs::remove_file(path) {
                    tracing::warn!(path = %path.display(), "cannot remove the QMP socket: {e}");
                }
            }
        }
        tracing::info!("QMP server stopped");
        None
    }
}

impl Drop for QmpServer {
    fn drop(&mut self) {
        self.stop(false);
    }
}

fn poll_fd(fd: RawFd) -> libc::pollfd {
    libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    }
}

impl Acceptor {
    /// Accepts until woken; gives back the UNIX listener.
    fn run(self) -> Option<UnixListener> {
        let mut fds = vec![poll_fd(self.wake.as_raw_fd())];
        if let Some((l, _)) = &self.unix {
            fds.push(poll_fd(l.as_raw_fd()));
        }
        if let Some(l) = &self.tcp {
            fds.push(poll_fd(l.as_raw_fd()));
        }
        loop {
            for f in fds.iter_mut() {
                f.revents = 0;
            }
            // SAFETY: `fds` is a valid array of `fds.len()` pollfd structs that lives
            // across the call; the fds stay open for as long as `self` lives.
            let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                tracing::error!("QMP accept loop: poll failed: {e}");
                break;
            }
            if fds[0].revents != 0 {
                break;
            }
            self.accept_ready();
        }
        self.unix.map(|(l, _)| l)
    }

    fn accept_ready(&self) {
        if let Some((l, path)) = &self.unix {
            loop {
                match l.accept() {
                    Ok((s, _)) => self.client(Conn::Unix(s), path.display().to_string()),
                    Err(e) => {
                        self.accept_error(e);
                        break;
                    }
                }
            }
        }
        if let Some(l) = &self.tcp {
            loop {
                match l.accept() {
                    Ok((s, addr)) => self.client(Conn::Tcp(s), addr.to_string()),
                    Err(e) => {
                        self.accept_error(e);
                        break;
                    }
                }
            }
        }
    }

    fn accept_error(&self, e: io::Error) {
        match e.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted => {}
            _ => {
                // EMFILE and the like: do not spin.
                tracing::warn!("QMP accept failed: {e}");
                thread::sleep(Duration::from_millis(50));
            }
        }
    }

    fn client(&self, conn: Conn, peer: String) {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        if let Err(e) = conn.prepare(self.write_timeout) {
            tracing::warn!(client = id, "QMP client setup failed: {e}");
            return;
        }
        if self.env.hub.len() >= self.max_clients {
            tracing::warn!(
                client = id,
                peer,
                "QMP client refused: {} clients connected",
                self.max_clients
            );
            let err = QmpError::generic(format!(
                "Too many QMP clients (at most {})",
                self.max_clients
            ));
            let mut conn = conn;
            let _ = conn.write_all(&encode_error(&err, None));
            return;
        }
        if let Err(e) = self.spawn_client(id, conn, peer) {
            tracing::warn!(client = id, "QMP client setup failed: {e}");
        }
    }

    fn spawn_client(&self, id: u64, conn: Conn, peer: String) -> io::Result<()> {
        let outbox = Arc::new(Outbox::default());
        outbox.push_reply(encode_greeting(&self.env.version).into());
        if !self.env.hub.add(id, outbox.clone(), conn.try_clone()?) {
            return Ok(());
        }
        tracing::info!(client = id, peer, "QMP client connected");
        let writer_conn = conn.try_clone();
        let writer_outbox = outbox.clone();
        let writer = writer_conn.and_then(|wc| {
            thread::Builder::new()
                .name(format!("qmp-write-{id}"))
                .spawn(move || run_writer(id, wc, writer_outbox))
        });
        let writer = match writer {
            Ok(w) => w,
            Err(e) => {
                self.env.hub.remove(id);
                return Err(e);
            }
        };
        let env = self.env.clone();
        let ctx = CommandContext {
            client_id: id,
            peer,
        };
        let reader_outbox = outbox.clone();
        let reader = thread::Builder::new()
            .name(format!("qmp-client-{id}"))
            .spawn(move || run_reader(env, ctx, conn, reader_outbox));
        let mut threads = self.threads.lock().unwrap_or_else(PoisonError::into_inner);
        threads.retain(|h| !h.is_finished());
        threads.push(writer);
        match reader {
            Ok(r) => threads.push(r),
            Err(e) => {
                self.env.hub.remove(id);
                outbox.close();
                return Err(e);
            }
        }
        Ok(())
    }
}
