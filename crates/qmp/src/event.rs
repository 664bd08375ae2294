//! Events: the [`EventSender`] the VMM emits with, and the set of connected clients
//! ([`Hub`]) with each client's outgoing queue ([`Outbox`]).
//!
//! Every message to a client (greeting, replies, events) goes through its outbox, and
//! one writer thread per client drains it, so messages never interleave inside a line
//! and emitting an event never blocks on a slow client. A client whose queue overflows
//! with events is not reading them: it is disconnected rather than letting memory grow.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};

use serde_json::Value;

use crate::client::Conn;
use crate::protocol::{encode_event, Timestamp};
use crate::schema::Event;

/// Replies a client may have queued before its reader waits for the writer.
const REPLY_BACKLOG: usize = 64;
/// Queued messages beyond which a client is considered not to read its events.
const EVENT_BACKLOG: usize = 4096;

/// A cheap, clonable handle to broadcast events to every client in command mode.
/// Usable from any thread, before the server starts (events then reach nobody) and
/// after it stops (likewise).
#[derive(Clone, Debug)]
pub struct EventSender {
    hub: Arc<Hub>,
}

impl EventSender {
    pub(crate) fn new(hub: Arc<Hub>) -> Self {
        EventSender { hub }
    }

    /// Emits a typed event (see [`crate::schema`]). Returns how many clients it was
    /// queued for.
    pub fn emit<E: Event>(&self, event: &E) -> usize {
        match serde_json::to_value(event) {
            Ok(data) => self.emit_raw(E::NAME, Some(data)),
            Err(e) => {
                tracing::error!(event = E::NAME, "cannot serialise QMP event: {e}");
                0
            }
        }
    }

    /// Emits an event by name with optional `data`; `null` or `{}` data is omitted,
    /// as QEMU omits it for events without members.
    pub fn emit_raw(&self, name: &str, data: Option<Value>) -> usize {
        let data = data.filter(|d| match d {
            Value::Null => false,
            Value::Object(m) => !m.is_empty(),
            _ => true,
        });
        let line: Arc<[u8]> = encode_event(name, data.as_ref(), Timestamp::now()).into();
        let delivered = self.hub.broadcast(line);
        tracing::debug!(event = name, delivered, "QMP event");
        delivered
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding these locks cannot leave them inconsistent (plain pushes
    // and flag sets), so a poisoned lock is still usable.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The connected clients.
#[derive(Debug, Default)]
pub(crate) struct Hub {
    clients: Mutex<HashMap<u64, ClientEntry>>,
    closed: AtomicBool,
}

#[derive(Debug)]
struct ClientEntry {
    outbox: Arc<Outbox>,
    conn: Conn,
}

impl Hub {
    /// Registers a client; false once the server is stopping.
    pub(crate) fn add(&self, id: u64, outbox: Arc<Outbox>, conn: Conn) -> bool {
        let mut clients = lock(&self.clients);
        if self.closed.load(Ordering::SeqCst) {
            return false;
        }
        clients.insert(id, ClientEntry { outbox, conn });
        true
    }

    pub(crate) fn remove(&self, id: u64) {
        lock(&self.clients).remove(&id);
    }

    pub(crate) fn len(&self) -> usize {
        lock(&self.clients).len()
    }

    /// Queues an event line for every client in command mode.
    fn broadcast(&self, line: Arc<[u8]>) -> usize {
        let targets: Vec<(u64, Arc<Outbox>)> = lock(&self.clients)
            .iter()
            .map(|(id, c)| (*id, c.outbox.clone()))
            .collect();
        let mut delivered = 0;
        for (id, outbox) in targets {
            match outbox.push_event(line.clone()) {
                Ok(true) => delivered += 1,
                Ok(false) => {}
                Err(Overflow) => {
                    tracing::warn!(
                        client = id,
                        "QMP client does not read its events ({EVENT_BACKLOG} queued); disconnecting it"
                    );
                    outbox.abort();
                    if let Some(c) = lock(&self.clients).get(&id) {
                        c.conn.shutdown_both();
                    }
                }
            }
        }
        delivered
    }

    /// Stops accepting clients and makes every client's reader see end of input; their
    /// threads then deliver what is queued and end.
    pub(crate) fn close_all(&self) {
        let clients = lock(&self.clients);
        self.closed.store(true, Ordering::SeqCst);
        for entry in clients.values() {
            entry.conn.shutdown_read();
        }
    }
}

#[derive(Debug)]
pub(crate) struct Overflow;

/// One client's queue of outgoing lines.
#[derive(Debug, Default)]
pub(crate) struct Outbox {
    state: Mutex<OutboxState>,
    cond: Condvar,
}

#[derive(Debug, Default)]
struct OutboxState {
    queue: VecDeque<Arc<[u8]>>,
    /// Negotiation done: events are delivered.
    command_mode: bool,
    /// No more lines are accepted; the writer drains what is queued.
    closed: bool,
}

impl Outbox {
    /// Queues a reply, waiting while the client has too many unread. False when the
    /// connection is gone.
    pub(crate) fn push_reply(&self, line: Arc<[u8]>) -> bool {
        let mut st = lock(&self.state);
        while st.queue.len() >= REPLY_BACKLOG && !st.closed {
            st = self.cond.wait(st).unwrap_or_else(PoisonError::into_inner);
        }
        if st.closed {
            return false;
        }
        st.queue.push_back(line);
        self.cond.notify_all();
        true
    }

    /// Queues the `qmp_capabilities` reply and switches to command mode atomically, so
    /// every event emitted afterwards follows the reply.
    pub(crate) fn enter_command_mode(&self, reply: Arc<[u8]>) -> bool {
        let mut st = lock(&self.state);
        if st.closed {
            return false;
        }
        st.command_mode = true;
        st.queue.push_back(reply);
        self.cond.notify_all();
        true
    }

    /// Queues an event if the client is in command mode.
    fn push_event(&self, line: Arc<[u8]>) -> Result<bool, Overflow> {
        let mut st = lock(&self.state);
        if st.closed || !st.command_mode {
            return Ok(false);
        }
        if st.queue.len() >= EVENT_BACKLOG {
            return Err(Overflow);
        }
        st.queue.push_back(line);
        self.cond.notify_all();
        Ok(true)
    }

    /// The next line to write; `None` once closed and drained.
    pub(crate) fn pop(&self) -> Option<Arc<[u8]>> {
        let mut st = lock(&self.state);
        loop {
            if let Some(line) = st.queue.pop_front() {
                self.cond.notify_all();
                return Some(line);
            }
            if st.closed {
                return None;
            }
            st = self.cond.wait(st).unwrap_or_else(PoisonError::into_inner);
        }
    }

    /// No more lines; what is queued is still written.
    pub(crate) fn close(&self) {
        lock(&self.state).closed = true;
        self.cond.notify_all();
    }

    /// The connection failed: drop what is queued.
    pub(crate) fn abort(&self) {
        let mut st = lock(&self.state);
        st.closed = true;
        st.queue.clear();
        self.cond.notify_all();
    }
}
