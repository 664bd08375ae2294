//! baton-qmp: a QMP (QEMU Machine Protocol) control-socket server for baton VMMs.
//!
//! Existing QMP clients (QEMU's `qemu.qmp` Python library, `socat`, libvirt-style
//! clients) talk to it unchanged: the greeting, capabilities negotiation, the
//! `execute`/`return`/`error` exchange and asynchronous events follow QEMU's
//! `docs/interop/qmp-spec.rst` (the sequence is in [`protocol`]), error texts follow
//! QEMU's, and the command set in [`schema`] uses QEMU's JSON names.
//!
//! The VMM supplies behaviour through a [`QmpHandler`], usually a [`CommandRegistry`]
//! of typed closures, and emits events from any thread with an [`EventSender`]:
//!
//! ```no_run
//! use baton_qmp::schema::{QueryStatus, RunState, StatusInfo, Stop, StopEvent};
//! use baton_qmp::{CommandRegistry, QmpServer};
//!
//! let builder = QmpServer::builder().unix("/run/baton/vm0.qmp");
//! let events = builder.event_sender();
//! let mut registry = CommandRegistry::new();
//! registry.register::<QueryStatus>(|_ctx, _args| Ok(StatusInfo::new(RunState::Running)));
//! registry.register::<Stop>(move |_ctx, _args| {
//!     // ... pause the vCPUs ...
//!     events.emit(&StopEvent);
//!     Ok(())
//! });
//! let server = builder.start(registry)?;
//! // ...
//! server.shutdown();
//! # Ok::<(), baton_qmp::ServerError>(())
//! ```
//!
//! Each connection is served by its own pair of threads (reader and writer); input is
//! bounded in size and nesting, malformed input gets a precise error and the connection
//! stays usable, and nothing a client sends can panic the server.

pub mod args;
mod client;
pub mod demo;
mod error;
mod event;
pub mod framing;
mod handler;
pub mod protocol;
pub mod schema;
mod server;

pub use args::{from_arguments, ArgError};
pub use error::{ErrorClass, QmpError, ServerError};
pub use event::EventSender;
pub use handler::{CommandContext, CommandRegistry, QmpHandler};
pub use server::{
    QmpServer, QmpServerBuilder, DEFAULT_MAX_CLIENTS, DEFAULT_MAX_MESSAGE_SIZE,
    DEFAULT_MAX_NESTING, DEFAULT_QEMU_VERSION, DEFAULT_WRITE_TIMEOUT,
};
