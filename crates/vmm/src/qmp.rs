//! The QMP commands of baton-vmm and the answers built from the VMM's state.
//!
//! Names and shapes follow QEMU's schema so existing clients work unchanged;
//! `device-list-properties` adds each property's provenance (`default`,
//! `compat microvm-1.0`, `global`, `explicit`).

use std::sync::Arc;

use baton_machine_types::MachineRegistry;
use baton_migration::MigrationStatus as EngineStatus;
use baton_qdev::PropertyResolver;
use baton_qmp::schema::*;
use baton_qmp::{CommandRegistry, QmpError};
use serde_json::{json, Value};

use crate::control::{Ending, Vmm};

pub(crate) fn engine_to_qmp(s: EngineStatus) -> MigrationStatus {
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
        let mut resolver =
            PropertyResolver::new(&self.devices).with_compat(machine.compat_settings());
        for g in &self.plan.globals {
            resolver
                .add_global(g.clone())
                .map_err(|e| QmpError::generic(e.to_string()))?;
        }
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
