//! What the VMM implements: a [`QmpHandler`], usually a [`CommandRegistry`] of typed
//! command handlers.

use std::collections::BTreeMap;
use std::fmt;

use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::{Map, Value};

use crate::args::from_arguments;
use crate::error::QmpError;
use crate::schema::Command;

/// Who sent a command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandContext {
    /// The connection's id, unique for the server's lifetime (also in the logs).
    pub client_id: u64,
    /// The peer: the socket path for UNIX clients, `ip:port` for TCP ones.
    pub peer: String,
}

/// The VMM's side of the protocol: runs commands in command mode.
///
/// Called from the connection's thread; commands of one client run one at a time in
/// the order sent, commands of different clients may run concurrently. A command that
/// takes long blocks only its own client.
pub trait QmpHandler: Send + Sync + 'static {
    /// Every command name `execute` accepts (for `query-commands`).
    fn commands(&self) -> Vec<String>;

    /// Runs `name` with its `arguments` object (empty when absent). Returns the
    /// `return` value, or the error reply; an unknown name must give
    /// [`QmpError::command_not_found`].
    fn execute(
        &self,
        ctx: &CommandContext,
        name: &str,
        args: Map<String, Value>,
    ) -> Result<Value, QmpError>;
}

type RawFn = dyn Fn(&CommandContext, Map<String, Value>) -> Result<Value, QmpError> + Send + Sync;

/// A [`QmpHandler`] built from one closure per command, with typed arguments parsed by
/// [`crate::args`] (QEMU's error texts) and typed returns serialised by serde.
///
/// ```
/// use baton_qmp::schema::{QueryStatus, RunState, StatusInfo, Stop};
/// use baton_qmp::CommandRegistry;
///
/// let mut registry = CommandRegistry::new();
/// registry
///     .register::<QueryStatus>(|_ctx, _args| Ok(StatusInfo::new(RunState::Running)))
///     .register::<Stop>(|_ctx, _args| Ok(()));
/// assert_eq!(registry.names(), ["query-status", "stop"]);
/// ```
#[derive(Default)]
pub struct CommandRegistry {
    commands: BTreeMap<String, Box<RawFn>>,
}

impl fmt::Debug for CommandRegistry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CommandRegistry")
            .field("commands", &self.names())
            .finish()
    }
}

impl CommandRegistry {
    /// An empty registry.
    pub fn new() -> Self {
        CommandRegistry::default()
    }

    /// Registers a schema command (see [`crate::schema`]). Registering a name twice
    /// replaces the first handler.
    pub fn register<C: Command>(
        &mut self,
        handler: impl Fn(&CommandContext, C::Args) -> Result<C::Returns, QmpError>
            + Send
            + Sync
            + 'static,
    ) -> &mut Self {
        self.register_fn(C::NAME, handler)
    }

    /// Registers a command by name with any argument and return types.
    pub fn register_fn<A, R>(
        &mut self,
        name: &str,
        handler: impl Fn(&CommandContext, A) -> Result<R, QmpError> + Send + Sync + 'static,
    ) -> &mut Self
    where
        A: DeserializeOwned,
        R: Serialize,
    {
        let name_owned = name.to_owned();
        self.register_raw(name, move |ctx, args| {
            let args: A = from_arguments(args)?;
            let ret = handler(ctx, args)?;
            to_return_value(&name_owned, &ret)
        })
    }

    /// Registers a command that takes the raw `arguments` object and returns raw JSON.
    pub fn register_raw(
        &mut self,
        name: &str,
        handler: impl Fn(&CommandContext, Map<String, Value>) -> Result<Value, QmpError>
            + Send
            + Sync
            + 'static,
    ) -> &mut Self {
        if self
            .commands
            .insert(name.to_owned(), Box::new(handler))
            .is_some()
        {
            tracing::warn!(
                command = name,
                "QMP command registered twice; the last wins"
            );
        }
        self
    }

    /// The registered names, sorted.
    pub fn names(&self) -> Vec<&str> {
        self.commands.keys().map(String::as_str).collect()
    }
}

/// Serialises a command's return; `()` (JSON `null`) becomes `{}` as in QEMU.
fn to_return_value<R: Serialize>(name: &str, ret: &R) -> Result<Value, QmpError> {
    match serde_json::to_value(ret) {
        Ok(Value::Null) => Ok(Value::Object(Map::new())),
        Ok(v) => Ok(v),
        Err(e) => {
            tracing::error!(command = name, "cannot serialise the return value: {e}");
            Err(QmpError::generic(format!(
                "internal error: the return value of {name} cannot be serialised: {e}"
            )))
        }
    }
}

impl QmpHandler for CommandRegistry {
    fn commands(&self) -> Vec<String> {
        self.commands.keys().cloned().collect()
    }

    fn execute(
        &self,
        ctx: &CommandContext,
        name: &str,
        args: Map<String, Value>,
    ) -> Result<Value, QmpError> {
        match self.commands.get(name) {
            Some(f) => f(ctx, args),
            None => Err(QmpError::command_not_found(name)),
        }
    }
}

/// A shared handler (the VMM may keep its own reference).
impl<T: QmpHandler + ?Sized> QmpHandler for std::sync::Arc<T> {
    fn commands(&self) -> Vec<String> {
        (**self).commands()
    }

    fn execute(
        &self,
        ctx: &CommandContext,
        name: &str,
        args: Map<String, Value>,
    ) -> Result<Value, QmpError> {
        (**self).execute(ctx, name, args)
    }
}
