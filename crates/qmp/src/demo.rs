//! A toy VM implementing the schema's commands, for the examples, the tests and for
//! trying clients against (`cargo run -p baton-qmp --example qmp-demo -- SOCKET`).
//! It also shows how a VMM wires a [`CommandRegistry`] and an [`EventSender`].

use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use serde_json::json;

use crate::error::QmpError;
use crate::event::EventSender;
use crate::handler::CommandRegistry;
use crate::schema::*;

/// The toy VM's state.
#[derive(Debug)]
struct State {
    run: RunState,
    migration: MigrationInfo,
    capabilities: Vec<MigrationCapabilityStatus>,
    parameters: MigrationParameters,
    quit: bool,
}

/// A toy VM: run state, migration state, and a `quit` flag the host program waits on.
#[derive(Debug)]
pub struct DemoVm {
    state: Mutex<State>,
    quit_cond: Condvar,
    events: EventSender,
}

impl DemoVm {
    /// A running VM that emits its events through `events`.
    pub fn new(events: EventSender) -> Arc<Self> {
        Arc::new(DemoVm {
            state: Mutex::new(State {
                run: RunState::Running,
                migration: MigrationInfo::default(),
                capabilities: Vec::new(),
                parameters: MigrationParameters {
                    downtime_limit: Some(300),
                    max_bandwidth: Some(134_217_728),
                    multifd_channels: Some(2),
                    ..MigrationParameters::default()
                },
                quit: false,
            }),
            quit_cond: Condvar::new(),
            events,
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The current run state.
    pub fn run_state(&self) -> RunState {
        self.lock().run
    }

    /// Waits until `quit` was executed; false on timeout.
    pub fn wait_quit(&self, timeout: Option<Duration>) -> bool {
        let st = self.lock();
        match timeout {
            None => {
                let st = self
                    .quit_cond
                    .wait_while(st, |s| !s.quit)
                    .unwrap_or_else(PoisonError::into_inner);
                st.quit
            }
            Some(t) => {
                let (st, _) = self
                    .quit_cond
                    .wait_timeout_while(st, t, |s| !s.quit)
                    .unwrap_or_else(PoisonError::into_inner);
                st.quit
            }
        }
    }

    fn stop(&self) {
        let was_running = {
            let mut st = self.lock();
            let was = st.run == RunState::Running;
            st.run = RunState::Paused;
            was
        };
        if was_running {
            self.events.emit(&StopEvent);
        }
    }

    fn cont(&self) -> Result<(), QmpError> {
        let mut st = self.lock();
        match st.run {
            RunState::Inmigrate => Err(QmpError::generic("Migration is not finalized yet")),
            RunState::Running => Ok(()),
            _ => {
                st.run = RunState::Running;
                drop(st);
                self.events.emit(&ResumeEvent);
                Ok(())
            }
        }
    }

    /// Pretends to migrate at once: setup, active, completed, and the source stops.
    fn migrate(&self, args: MigrateArgs) -> Result<(), QmpError> {
        let scheme = args.uri.split(':').next().unwrap_or("");
        if !matches!(scheme, "unix" | "tcp" | "fd" | "exec" | "file") {
            return Err(QmpError::generic(
                "Parameter 'uri' expects a valid migration protocol",
            ));
        }
        if args.blk == Some(true) || args.inc == Some(true) {
            return Err(QmpError::generic(
                "Block migration is not supported by baton",
            ));
        }
        {
            let mut st = self.lock();
            if matches!(
                st.migration.status,
                Some(MigrationStatus::Active | MigrationStatus::Setup)
            ) {
                return Err(QmpError::generic("There's a migration process in progress"));
            }
            st.migration = MigrationInfo {
                status: Some(MigrationStatus::Setup),
                ..MigrationInfo::default()
            };
        }
        for status in [MigrationStatus::Setup, MigrationStatus::Active] {
            self.events.emit(&MigrationEvent { status });
        }
        self.stop();
        {
            let mut st = self.lock();
            st.run = RunState::Postmigrate;
            st.migration = MigrationInfo {
                status: Some(MigrationStatus::Completed),
                ram: Some(MigrationStats {
                    transferred: 4096,
                    total: 1 << 30,
                    normal: 1,
                    normal_bytes: 4096,
                    duplicate: 262_143,
                    mbps: 1000.0,
                    dirty_sync_count: 2,
                    page_size: 4096,
                    ..MigrationStats::default()
                }),
                total_time: Some(12),
                downtime: Some(3),
                setup_time: Some(1),
                ..MigrationInfo::default()
            };
        }
        self.events.emit(&MigrationEvent {
            status: MigrationStatus::Completed,
        });
        Ok(())
    }

    fn set_capabilities(&self, caps: Vec<MigrationCapabilityStatus>) {
        let mut st = self.lock();
        for cap in caps {
            st.capabilities.retain(|c| c.capability != cap.capability);
            st.capabilities.push(cap);
        }
    }

    fn set_parameters(&self, p: MigrationParameters) -> Result<(), QmpError> {
        if p.multifd_channels == Some(0) {
            return Err(QmpError::generic(
                "Parameter 'multifd-channels' expects a value between 1 and 255",
            ));
        }
        let mut st = self.lock();
        let cur = &mut st.parameters;
        cur.downtime_limit = p.downtime_limit.or(cur.downtime_limit);
        cur.max_bandwidth = p.max_bandwidth.or(cur.max_bandwidth);
        cur.multifd_channels = p.multifd_channels.or(cur.multifd_channels);
        Ok(())
    }
}

fn machines() -> Vec<MachineInfo> {
    let machine = |name: &str, alias: Option<&str>| MachineInfo {
        name: name.into(),
        alias: alias.map(Into::into),
        is_default: alias.map(|_| true),
        cpu_max: 2,
        hotpluggable_cpus: false,
        numa_mem_supported: false,
        deprecated: false,
        default_cpu_type: None,
        default_ram_id: None,
        acpi: false,
        compat_props: None,
    };
    vec![
        machine("microvm-1.1", Some("microvm")),
        machine("microvm-1.0", None),
    ]
}

fn demo_properties(typename: &str) -> Result<Vec<ObjectPropertyInfo>, QmpError> {
    if typename != "demo-net" {
        return Err(QmpError::device_not_found(typename));
    }
    Ok(vec![ObjectPropertyInfo {
        name: "backend-transfer".into(),
        type_name: "bool".into(),
        description: Some("Hand the open TAP fds to the destination".into()),
        default_value: Some(json!(true)),
        value: Some(json!(false)),
        provenance: Some(PropertyProvenance::Compat {
            machine: "microvm-1.0".into(),
            table: "microvm-1.0".into(),
        }),
    }])
}

/// The registry serving `vm`: every command of [`crate::schema`].
pub fn registry(vm: Arc<DemoVm>) -> CommandRegistry {
    let mut r = CommandRegistry::new();
    let v = vm.clone();
    r.register::<QueryStatus>(move |_, _| Ok(StatusInfo::new(v.run_state())));
    let v = vm.clone();
    r.register::<Stop>(move |_, _| {
        v.stop();
        Ok(())
    });
    let v = vm.clone();
    r.register::<Cont>(move |_, _| v.cont());
    let v = vm.clone();
    r.register::<Quit>(move |_, _| {
        v.lock().quit = true;
        v.quit_cond.notify_all();
        Ok(())
    });
    let v = vm.clone();
    r.register::<Migrate>(move |_, args| v.migrate(args));
    let v = vm.clone();
    r.register::<MigrateIncoming>(move |_, _args| {
        v.lock().run = RunState::Inmigrate;
        Ok(())
    });
    let v = vm.clone();
    r.register::<MigrateCancel>(move |_, _| {
        let mut st = v.lock();
        if st.migration.status == Some(MigrationStatus::Active) {
            st.migration.status = Some(MigrationStatus::Cancelled);
        }
        Ok(())
    });
    let v = vm.clone();
    r.register::<MigrateSetCapabilities>(move |_, a| {
        v.set_capabilities(a.capabilities);
        Ok(())
    });
    let v = vm.clone();
    r.register::<QueryMigrateCapabilities>(move |_, _| Ok(v.lock().capabilities.clone()));
    let v = vm.clone();
    r.register::<MigrateSetParameters>(move |_, p| v.set_parameters(p));
    let v = vm.clone();
    r.register::<QueryMigrateParameters>(move |_, _| Ok(v.lock().parameters.clone()));
    let v = vm;
    r.register::<QueryMigrate>(move |_, _| Ok(v.lock().migration.clone()));
    r.register::<QueryMachines>(|_, _| Ok(machines()));
    r.register::<DeviceListProperties>(|_, a| demo_properties(&a.typename));
    r
}
