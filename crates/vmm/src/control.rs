//! The VMM's control plane: run state, migration settings, outgoing and incoming
//! migrations on their own threads, and the QMP commands that drive them.
//!
//! QMP names follow QEMU so existing clients work unchanged. Local live update is QEMU's
//! CPR-transfer idea: `migrate-set-parameters {"mode": "cpr-transfer"}` (or the
//! `x-ignore-shared` capability) hands guest RAM over as a memfd instead of copying it.

use std::net::TcpListener;
use std::os::unix::net::UnixListener;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use baton_machine_types::MachineRegistry;
use baton_migration::{
    incoming, migrate, Capabilities, DestinationVm, Incoming, IncomingSettings, MigrationMode,
    MigrationMonitor, MigrationSettings, MigrationStatus as EngineStatus, Parameters, SourceVm,
    Target,
};
use baton_qdev::{DeviceRegistry, Migratable, PropertyResolver};
use baton_qmp::schema::*;
use baton_qmp::{CommandRegistry, EventSender, QmpError};
use serde_json::{json, Value};
use tracing::{error, info};

use crate::live::{KvmDirtyLog, MachineDevice, VcpuControl, VmRam, VmSlot};
use crate::memory::GuestRam;
use crate::vm::Vm;

/// Outcome the main loop waits for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Ending {
    Quit,
    /// Migrated away: the destination runs, this process ends.
    MigratedAway,
}

struct State {
    run: RunState,
    local: bool,
    caps: Capabilities,
    params: Parameters,
    monitor: Option<MigrationMonitor>,
    ending: Option<Ending>,
}

/// The VMM: its VM, machine type, devices and control state.
pub struct Vmm {
    pub slot: VmSlot,
    pub machine: String,
    pub memory: u64,
    pub cpus: usize,
    pub echo: bool,
    pub devices: Arc<DeviceRegistry>,
    state: Mutex<State>,
    ended: Condvar,
    events: EventSender,
}

fn engine_to_qmp(s: EngineStatus) -> MigrationStatus {
    match s {
        EngineStatus::None => MigrationStatus::None,
        EngineStatus::Setup => MigrationStatus::Setup,
        EngineStatus::Active => MigrationStatus::Active,
        EngineStatus::Device => MigrationStatus::Device,
        EngineStatus::Completed => MigrationStatus::Completed,
        EngineStatus::Failed => MigrationStatus::Failed,
        EngineStatus::Cancelling => MigrationStatus::Cancelling,
        EngineStatus::Cancelled => MigrationStatus::Cancelled,
    }
}

impl Vmm {
    pub fn new(
        vm: Option<Vm>,
        machine: String,
        memory: u64,
        cpus: usize,
        echo: bool,
        devices: Arc<DeviceRegistry>,
        events: EventSender,
    ) -> Arc<Self> {
        let run = if vm.is_some() {
            RunState::Running
        } else {
            RunState::Inmigrate
        };
        Arc::new(Vmm {
            slot: VmSlot::new(vm),
            machine,
            memory,
            cpus,
            echo,
            devices,
            state: Mutex::new(State {
                run,
                local: false,
                caps: Capabilities::default(),
                params: Parameters::default(),
                monitor: None,
                ending: None,
            }),
            ended: Condvar::new(),
            events,
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn set_run(&self, run: RunState) {
        self.lock().run = run;
    }

    /// Blocks until the VMM should end (or `timeout` passes).
    pub fn wait_end(&self, timeout: Duration) -> Option<Ending> {
        let g = self.lock();
        let (g, _) = self
            .ended
            .wait_timeout_while(g, timeout, |s| s.ending.is_none())
            .unwrap_or_else(|e| e.into_inner());
        g.ending.clone()
    }

    pub fn end(&self, how: Ending) {
        self.lock().ending = Some(how);
        self.ended.notify_all();
    }

    /// Set capabilities from names (`--migrate-capabilities`); unknown names are errors.
    pub fn set_capability(&self, name: &str, on: bool) -> Result<(), String> {
        let mut st = self.lock();
        match name {
            "x-ignore-shared" | "local" => st.local = on,
            n if st.caps.set(n, on) => {}
            n => return Err(format!("unknown migration capability {n:?}")),
        }
        Ok(())
    }

    fn settings(&self) -> MigrationSettings {
        let st = self.lock();
        MigrationSettings {
            mode: if st.local {
                MigrationMode::Local
            } else {
                MigrationMode::Remote
            },
            machine_type: self.machine.clone(),
            capabilities: st.caps.clone(),
            parameters: st.params.clone(),
        }
    }

    fn new_monitor(self: &Arc<Self>) -> Result<MigrationMonitor, QmpError> {
        let mut st = self.lock();
        if st
            .monitor
            .as_ref()
            .is_some_and(|m| !m.status().is_finished())
        {
            return Err(QmpError::generic("There's a migration process in progress"));
        }
        let m = MigrationMonitor::new();
        let events = self.events.clone();
        m.on_status(move |s| {
            events.emit(&MigrationEvent {
                status: engine_to_qmp(s),
            });
        });
        st.monitor = Some(m.clone());
        Ok(m)
    }

    fn stop(&self) -> Result<(), QmpError> {
        let g = self.slot.lock();
        let vm = g
            .as_ref()
            .ok_or_else(|| QmpError::generic("The VM is not created yet"))?;
        if !vm.is_paused() {
            vm.pause().map_err(|e| QmpError::generic(e.to_string()))?;
            drop(g);
            self.set_run(RunState::Paused);
            self.events.emit(&StopEvent);
        }
        Ok(())
    }

    fn cont(&self) -> Result<(), QmpError> {
        if self.lock().run == RunState::Inmigrate {
            return Err(QmpError::generic("Migration is not finalized yet"));
        }
        let g = self.slot.lock();
        let vm = g
            .as_ref()
            .ok_or_else(|| QmpError::generic("The VM is not created yet"))?;
        if vm.is_paused() {
            vm.resume().map_err(|e| QmpError::generic(e.to_string()))?;
            drop(g);
            self.set_run(RunState::Running);
            self.events.emit(&ResumeEvent);
        }
        Ok(())
    }

    /// Start an outgoing migration (or a snapshot to `file:`) on its own thread.
    pub fn start_migrate(self: &Arc<Self>, uri: &str) -> Result<(), QmpError> {
        let target: Target = uri.parse().map_err(QmpError::generic)?;
        let mut settings = self.settings();
        if matches!(target, Target::File(_)) {
            settings.mode = MigrationMode::Snapshot;
        }
        let monitor = self.new_monitor()?;
        let me = self.clone();
        std::thread::Builder::new()
            .name("migrate-out".into())
            .spawn(move || me.run_migrate(target, settings, monitor))
            .map_err(|e| QmpError::generic(format!("spawning the migration thread: {e}")))?;
        Ok(())
    }

    fn run_migrate(
        self: Arc<Self>,
        target: Target,
        settings: MigrationSettings,
        monitor: MigrationMonitor,
    ) {
        let ram = match VmRam::of(&self.slot) {
            Ok(r) => r,
            Err(e) => {
                error!("migration: {e}");
                return;
            }
        };
        let mut devices: Vec<Box<dyn Migratable>> =
            vec![Box::new(MachineDevice::new(self.slot.clone(), self.cpus))];
        let mut log = KvmDirtyLog(self.slot.clone());
        let mut control = VcpuControl(self.slot.clone());
        let snapshot = settings.mode == MigrationMode::Snapshot;
        let r = migrate(
            &target,
            &settings,
            SourceVm {
                devices: &mut devices,
                ram: &ram,
                dirty_log: &mut log,
                control: &mut control,
            },
            &monitor,
        );
        match r {
            Ok(out) => {
                info!("migration to {target} completed\n{}", out.report.render());
                if !snapshot {
                    self.set_run(RunState::Postmigrate);
                    self.events.emit(&StopEvent);
                    self.end(Ending::MigratedAway);
                }
            }
            Err(e) => error!("migration to {target} failed: {e}; the VM runs on"),
        }
    }

    /// Listen on `uri` and receive a migration into this VMM on its own thread.
    pub fn start_incoming(self: &Arc<Self>, uri: &str) -> Result<(), QmpError> {
        let target: Target = uri.parse().map_err(QmpError::generic)?;
        let source = match &target {
            Target::Unix(p) => {
                let _ = std::fs::remove_file(p);
                Incoming::Unix(
                    UnixListener::bind(p)
                        .map_err(|e| QmpError::generic(format!("listening on {uri}: {e}")))?,
                )
            }
            Target::Tcp(a) => Incoming::Tcp(
                TcpListener::bind(a.as_str())
                    .map_err(|e| QmpError::generic(format!("listening on {uri}: {e}")))?,
            ),
            Target::File(p) => Incoming::File(p.clone()),
        };
        let monitor = self.new_monitor()?;
        let me = self.clone();
        std::thread::Builder::new()
            .name("migrate-in".into())
            .spawn(move || me.run_incoming(source, monitor))
            .map_err(|e| QmpError::generic(format!("spawning the migration thread: {e}")))?;
        Ok(())
    }

    fn run_incoming(self: Arc<Self>, source: Incoming, monitor: MigrationMonitor) {
        let settings = self.settings();
        let file = matches!(source, Incoming::File(_));
        let local = settings.mode == MigrationMode::Local && !file;
        // Remote and restore: RAM of our own, written page by page. Local: the VM is
        // built around the source's memfd when it arrives.
        let ram = if local {
            Ok(VmRam::incoming(
                &self.slot,
                self.memory,
                self.cpus,
                self.echo,
            ))
        } else {
            GuestRam::new(self.memory)
                .and_then(|r| Vm::new_incoming(r, self.cpus, self.echo))
                .map_err(|e| e.to_string())
                .and_then(|vm| {
                    *self.slot.lock() = Some(vm);
                    VmRam::of(&self.slot)
                })
        };
        let mut ram = match ram {
            Ok(r) => r,
            Err(e) => {
                error!("incoming migration: {e}");
                return;
            }
        };
        let mut devices: Vec<Box<dyn Migratable>> =
            vec![Box::new(MachineDevice::new(self.slot.clone(), self.cpus))];
        let mut control = VcpuControl(self.slot.clone());
        let r = incoming(
            source,
            &IncomingSettings {
                machine_type: self.machine.clone(),
                capabilities: settings.capabilities.clone(),
            },
            DestinationVm {
                devices: &mut devices,
                ram: &mut ram,
                control: &mut control,
            },
            &monitor,
        );
        match r {
            Ok(o) => {
                info!(phases = ?o.phases, "incoming migration completed; the VM runs");
                self.set_run(RunState::Running);
                self.events.emit(&ResumeEvent);
            }
            Err(e) => {
                error!("incoming migration failed: {e}");
                *self.slot.lock() = None;
                self.end(Ending::Quit);
            }
        }
    }

    fn query_migrate(&self) -> MigrationInfo {
        let Some(m) = self.lock().monitor.clone() else {
            return MigrationInfo::default();
        };
        let i = m.info();
        MigrationInfo {
            status: Some(engine_to_qmp(i.status)),
            total_time: i.total_time,
            setup_time: i.setup_time,
            downtime: i.downtime,
            error_desc: i.error_desc,
            ram: i.ram.map(|r| MigrationStats {
                transferred: r.transferred,
                remaining: r.remaining,
                total: r.total,
                duplicate: r.duplicate,
                normal: r.normal,
                normal_bytes: r.normal_bytes,
                mbps: r.mbps,
                dirty_sync_count: r.dirty_sync_count,
                dirty_pages_rate: r.dirty_pages_rate,
                page_size: 4096,
                ..MigrationStats::default()
            }),
            ..MigrationInfo::default()
        }
    }

    fn capabilities(&self) -> Vec<MigrationCapabilityStatus> {
        let st = self.lock();
        vec![
            MigrationCapabilityStatus {
                capability: MigrationCapability::XIgnoreShared,
                state: st.local,
            },
            MigrationCapabilityStatus {
                capability: MigrationCapability::BackendTransfer,
                state: st.caps.backend_transfer,
            },
            MigrationCapabilityStatus {
                capability: MigrationCapability::EarlySetup,
                state: st.caps.early_setup,
            },
            MigrationCapabilityStatus {
                capability: MigrationCapability::Multifd,
                state: st.caps.multifd,
            },
        ]
    }

    fn set_capabilities(&self, caps: Vec<MigrationCapabilityStatus>) -> Result<(), QmpError> {
        for c in caps {
            let name = serde_json::to_value(c.capability)
                .ok()
                .and_then(|v| v.as_str().map(str::to_owned))
                .unwrap_or_default();
            self.set_capability(&name, c.state).map_err(|_| {
                QmpError::generic(format!(
                    "Migration capability '{name}' is not supported by baton"
                ))
            })?;
        }
        Ok(())
    }

    fn set_parameters(&self, p: MigrationParameters) -> Result<(), QmpError> {
        let mut st = self.lock();
        if let Some(v) = p.downtime_limit {
            st.params.downtime_limit = v;
        }
        if let Some(v) = p.max_bandwidth {
            st.params.max_bandwidth = v;
        }
        if let Some(v) = p.multifd_channels {
            if v == 0 {
                return Err(QmpError::generic(
                    "Parameter 'multifd-channels' expects a value between 1 and 255",
                ));
            }
            st.params.multifd_channels = u16::from(v);
        }
        if let Some(m) = p.mode {
            st.local = m == MigMode::CprTransfer;
        }
        Ok(())
    }

    fn parameters(&self) -> MigrationParameters {
        let st = self.lock();
        MigrationParameters {
            downtime_limit: Some(st.params.downtime_limit),
            max_bandwidth: Some(st.params.max_bandwidth),
            multifd_channels: u8::try_from(st.params.multifd_channels).ok(),
            mode: Some(if st.local {
                MigMode::CprTransfer
            } else {
                MigMode::Normal
            }),
            ..MigrationParameters::default()
        }
    }

    fn device_properties(&self, typename: &str) -> Result<Value, QmpError> {
        let machine = MachineRegistry::builtin()
            .lookup(&self.machine)
            .map_err(|e| QmpError::generic(e.to_string()))?;
        let resolver = PropertyResolver::new(&self.devices).with_compat(machine.compat_settings());
        let props = resolver
            .describe(typename)
            .map_err(|_| QmpError::device_not_found(typename))?;
        let v = serde_json::to_value(&props).map_err(|e| QmpError::generic(e.to_string()))?;
        let list = v["properties"].as_array().cloned().unwrap_or_default();
        Ok(Value::Array(
            list.into_iter()
                .map(|p| {
                    json!({
                        "name": p["name"],
                        "type": p["type"],
                        "description": p["doc"],
                        "default-value": p.get("default").cloned().unwrap_or(Value::Null),
                        "value": p["value"],
                        "provenance": p["provenance"],
                    })
                })
                .collect(),
        ))
    }
}

fn machines() -> Vec<MachineInfo> {
    MachineRegistry::builtin()
        .list()
        .into_iter()
        .map(|m| MachineInfo {
            name: m.name,
            alias: m.alias,
            is_default: m.is_default.then_some(true),
            cpu_max: crate::vm::MAX_CPUS as u32,
            hotpluggable_cpus: false,
            numa_mem_supported: false,
            deprecated: m.deprecated,
            default_cpu_type: None,
            default_ram_id: None,
            acpi: false,
            compat_props: None,
        })
        .collect()
}

/// The QMP commands of baton-vmm.
pub fn commands(vmm: &Arc<Vmm>) -> CommandRegistry {
    let mut r = CommandRegistry::new();
    let v = vmm.clone();
    r.register::<QueryStatus>(move |_, _| Ok(StatusInfo::new(v.lock().run)));
    let v = vmm.clone();
    r.register::<Stop>(move |_, _| v.stop());
    let v = vmm.clone();
    r.register::<Cont>(move |_, _| v.cont());
    let v = vmm.clone();
    r.register::<Quit>(move |_, _| {
        v.end(Ending::Quit);
        Ok(())
    });
    let v = vmm.clone();
    r.register::<Migrate>(move |_, a| v.start_migrate(&a.uri));
    let v = vmm.clone();
    r.register::<MigrateIncoming>(move |_, a| v.start_incoming(&a.uri));
    let v = vmm.clone();
    r.register::<MigrateCancel>(move |_, _| {
        if let Some(m) = v.lock().monitor.clone() {
            m.cancel();
        }
        Ok(())
    });
    let v = vmm.clone();
    r.register::<MigrateSetCapabilities>(move |_, a| v.set_capabilities(a.capabilities));
    let v = vmm.clone();
    r.register::<QueryMigrateCapabilities>(move |_, _| Ok(v.capabilities()));
    let v = vmm.clone();
    r.register::<MigrateSetParameters>(move |_, p| v.set_parameters(p));
    let v = vmm.clone();
    r.register::<QueryMigrateParameters>(move |_, _| Ok(v.parameters()));
    let v = vmm.clone();
    r.register::<QueryMigrate>(move |_, _| Ok(v.query_migrate()));
    r.register::<QueryMachines>(|_, _| Ok(machines()));
    let v = vmm.clone();
    r.register_raw("device-list-properties", move |_, a| {
        let name = a
            .get("typename")
            .and_then(Value::as_str)
            .ok_or_else(|| QmpError::generic("Parameter 'typename' is missing"))?;
        v.device_properties(name)
    });
    r
}
