//! The VMM's control plane: run state, migration settings, and outgoing and incoming
//! migrations on their own threads (the QMP commands that drive them are in `qmp`).
//!
//! QMP names follow QEMU so existing clients work unchanged. Local live update is QEMU's
//! CPR-transfer idea: `migrate-set-parameters {"mode": "cpr-transfer"}` (or the
//! `x-ignore-shared` capability) hands guest RAM over as a memfd instead of copying it.

use std::net::TcpListener;
use std::os::unix::net::UnixListener;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use baton_migration::{
    incoming, migrate, Capabilities, DestinationVm, Incoming, IncomingSettings, MigrationMode,
    MigrationMonitor, MigrationSettings, Parameters, SourceVm, Target,
};
use baton_qdev::{DeviceRegistry, Migratable};
use baton_qmp::schema::*;
use baton_qmp::{EventSender, QmpError};
use baton_virtio_net_tap::BackendMode;
use tracing::{error, info, warn};

use crate::devices::DevicePlan;
use crate::lazy::LazyDevice;
use crate::live::{KvmDirtyLog, MachineDevice, VcpuControl, VmRam, VmSlot};
use crate::memory::GuestRam;
use crate::qmp::engine_to_qmp;
use crate::vm::Vm;

pub use crate::qmp::commands;

/// Outcome the main loop waits for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Ending {
    Quit,
    /// Migrated away: the destination runs, this process ends.
    MigratedAway,
}

pub(crate) struct State {
    pub(crate) run: RunState,
    pub(crate) local: bool,
    pub(crate) caps: Capabilities,
    pub(crate) params: Parameters,
    pub(crate) monitor: Option<MigrationMonitor>,
    ending: Option<Ending>,
}

/// What a [`Vmm`] is built from.
pub struct VmmConfig {
    /// The machine type's full name (`microvm-1.1`).
    pub machine: String,
    pub memory: u64,
    pub cpus: usize,
    pub echo: bool,
    /// The device types known to this build.
    pub registry: Arc<DeviceRegistry>,
    /// The VM's devices (also what an incoming VM is built with).
    pub plan: DevicePlan,
}

/// The VMM: its VM, machine type, devices and control state.
pub struct Vmm {
    pub slot: VmSlot,
    pub machine: String,
    pub memory: u64,
    pub cpus: usize,
    pub echo: bool,
    pub devices: Arc<DeviceRegistry>,
    pub plan: DevicePlan,
    state: Mutex<State>,
    ended: Condvar,
    pub(crate) events: EventSender,
}

impl Vmm {
    /// A VMM around `vm` (`None`: an incoming VM, built when its migration arrives).
    pub fn new(vm: Option<Vm>, cfg: VmmConfig, events: EventSender) -> Arc<Self> {
        let run = if vm.is_some() {
            RunState::Running
        } else {
            RunState::Inmigrate
        };
        Arc::new(Vmm {
            slot: VmSlot::new(vm),
            machine: cfg.machine,
            memory: cfg.memory,
            cpus: cfg.cpus,
            echo: cfg.echo,
            devices: cfg.registry,
            plan: cfg.plan,
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

    pub(crate) fn lock(&self) -> MutexGuard<'_, State> {
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

    pub(crate) fn stop(&self) -> Result<(), QmpError> {
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

    pub(crate) fn cont(&self) -> Result<(), QmpError> {
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
        if let Some(vm) = self.slot.lock().as_ref() {
            devices.extend(vm.devices().iter().map(|d| d.migratable()));
        }
        let mut log = KvmDirtyLog(self.slot.clone());
        let mut control = VcpuControl::source(self.slot.clone());
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
            Err(e @ baton_migration::MigrationError::Unconfirmed(_)) => {
                // The destination may be running the guest: this copy must not.
                error!("migration to {target}: {e}");
                self.set_run(RunState::Postmigrate);
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
        let plan = self.plan.for_incoming(&settings.capabilities);
        // Remote and restore: RAM of our own, written page by page. Local: the VM is
        // built around the source's memfd when it arrives. Either way its devices are
        // attached with it, in incoming mode.
        let ram = if local {
            Ok(VmRam::incoming(
                &self.slot,
                self.memory,
                self.cpus,
                self.echo,
                plan.clone(),
            ))
        } else {
            GuestRam::new(self.memory)
                .and_then(|r| Vm::new_incoming(r, self.cpus, self.echo))
                .and_then(|mut vm| {
                    plan.attach(&mut vm, BackendMode::Incoming)?;
                    vm.start_paused()?;
                    Ok(vm)
                })
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
        devices.extend(plan.nets.iter().map(|n| {
            Box::new(LazyDevice::new(n.clone(), self.slot.clone())) as Box<dyn Migratable>
        }));
        let mut control = VcpuControl::destination(self.slot.clone());
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
                if o.mode == MigrationMode::Remote {
                    // The guest is on another host now: tell the network.
                    match self.slot.lock().as_ref() {
                        Some(vm) => vm.devices().iter().for_each(|d| d.announce()),
                        None => warn!("no VM to announce"),
                    }
                }
            }
            Err(e) => {
                error!("incoming migration failed: {e}");
                *self.slot.lock() = None;
                self.end(Ending::Quit);
            }
        }
    }
}
