//! The handshake: everything that could make a migration fail is compared before anything
//! is paused or moved, and every mismatch is reported at once, naming the device and both
//! settings.
//!
//! The source sends a [`Hello`] (JSON, bounded by the section size); the destination builds
//! its own view of the same facts and answers [`Reply`] with the list of problems found by
//! [`check`]. Both sides then report the same text.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

use crate::protocol::PROTOCOL_VERSION;
use crate::ram::RamLayout;

/// What kind of migration this is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MigrationMode {
    /// Same host: RAM memfds and (per device) backends handed over by fd.
    Local,
    /// RAM pre-copied with dirty tracking, then stop-and-copy.
    Remote,
    /// To or from a file.
    Snapshot,
}

/// Migration capabilities (QEMU's `migrate-set-capabilities`); both sides must agree.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", default)]
pub struct Capabilities {
    /// Hand device backends over by fd (UNIX socket only).
    pub backend_transfer: bool,
    /// Send early-setup state during the setup phase.
    pub early_setup: bool,
    /// RAM over `multifd_channels` extra channels.
    pub multifd: bool,
}

impl Capabilities {
    /// Set one by its QMP name; returns false for an unknown name.
    pub fn set(&mut self, name: &str, on: bool) -> bool {
        match name {
            "backend-transfer" => self.backend_transfer = on,
            "early-setup" => self.early_setup = on,
            "multifd" => self.multifd = on,
            _ => return false,
        }
        true
    }

    /// `(name, state)` of every capability, in QMP naming.
    pub fn list(&self) -> [(&'static str, bool); 3] {
        [
            ("backend-transfer", self.backend_transfer),
            ("early-setup", self.early_setup),
            ("multifd", self.multifd),
        ]
    }
}

/// Migration parameters (QEMU's `migrate-set-parameters`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", default)]
pub struct Parameters {
    /// Largest pause the pre-copy aims for, in milliseconds.
    pub downtime_limit: u64,
    /// Bytes per second cap for RAM; 0 is unlimited.
    pub max_bandwidth: u64,
    /// Extra RAM channels when `multifd` is on.
    pub multifd_channels: u16,
    /// Pre-copy passes before switching over regardless of the limit.
    pub max_iterations: u32,
}

impl Default for Parameters {
    fn default() -> Self {
        Parameters {
            downtime_limit: 300,
            max_bandwidth: 0,
            multifd_channels: 2,
            max_iterations: 30,
        }
    }
}

/// A schema name and the version range a side supports.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SchemaVersion {
    pub name: String,
    pub version_id: u32,
    pub minimum_version_id: u32,
}

impl SchemaVersion {
    pub fn of(d: &baton_vmstate::VmStateDescription) -> Self {
        SchemaVersion {
            name: d.name.to_string(),
            version_id: d.version_id,
            minimum_version_id: d.minimum_version_id,
        }
    }
}

/// One device as a side sees it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceOffer {
    pub id: String,
    pub vmsd: SchemaVersion,
    /// Early-setup schema when the device sends (source) or prepares (destination) early.
    pub early_setup: Option<SchemaVersion>,
    /// Backend metadata schema when the device hands over (source) or waits for
    /// (destination) its backend.
    pub backend_transfer: Option<SchemaVersion>,
}

/// The source's opening message.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    pub protocol_version: u32,
    pub mode: MigrationMode,
    pub machine_type: String,
    /// `"unix"`, `"tcp"` or `"file"`: what the source believes it is writing to.
    pub transport: String,
    pub capabilities: Capabilities,
    pub parameters: Parameters,
    pub ram: RamLayout,
    pub devices: Vec<DeviceOffer>,
    /// Extra RAM channels that will be opened after the reply.
    pub ram_channels: u16,
}

/// The destination's answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reply {
    pub accepted: bool,
    pub errors: Vec<String>,
}

/// The destination's own view, compared against the hello.
#[derive(Clone, Debug)]
pub struct LocalView<'a> {
    pub machine_type: &'a str,
    pub transport: &'a str,
    pub capabilities: &'a Capabilities,
    pub ram: &'a RamLayout,
    pub devices: &'a [DeviceOffer],
}

fn on_off(b: bool) -> &'static str {
    if b {
        "on"
    } else {
        "off"
    }
}

/// Checks a schema from the source against what the destination loads.
fn check_schema(errors: &mut Vec<String>, what: &str, src: &SchemaVersion, dst: &SchemaVersion) {
    if src.name != dst.name {
        errors.push(format!(
            "{what}: schema {:?} on the source, {:?} on the destination",
            src.name, dst.name
        ));
    } else if src.version_id > dst.version_id {
        errors.push(format!(
            "{what}: {} version {} is newer than the destination's newest {}",
            src.name, src.version_id, dst.version_id
        ));
    } else if src.version_id < dst.minimum_version_id {
        errors.push(format!(
            "{what}: {} version {} is older than the destination's oldest {}",
            src.name, src.version_id, dst.minimum_version_id
        ));
    }
}

/// Every reason the destination cannot accept `hello`; empty means accept.
pub fn check(hello: &Hello, local: &LocalView<'_>) -> Vec<String> {
    let mut errors = Vec::new();
    if hello.protocol_version != PROTOCOL_VERSION {
        errors.push(format!(
            "protocol version {} is not supported (destination speaks {PROTOCOL_VERSION})",
            hello.protocol_version
        ));
        return errors;
    }
    if hello.machine_type != local.machine_type {
        errors.push(format!(
            "machine type: source {}, destination {}",
            hello.machine_type, local.machine_type
        ));
    }
    if hello.transport != local.transport {
        errors.push(format!(
            "transport: source writes to {}, destination reads from {}",
            hello.transport, local.transport
        ));
    }
    for ((name, src), (_, dst)) in hello
        .capabilities
        .list()
        .into_iter()
        .zip(local.capabilities.list())
    {
        if src != dst {
            errors.push(format!(
                "capability {name}: source {}, destination {}",
                on_off(src),
                on_off(dst)
            ));
        }
    }
    if hello.capabilities.backend_transfer && local.transport != "unix" {
        errors.push(format!(
            "capability backend-transfer needs a UNIX socket, this channel is {}",
            local.transport
        ));
    }
    if hello.mode == MigrationMode::Local && local.transport != "unix" {
        errors.push(format!(
            "local mode hands guest RAM over by fd and needs a UNIX socket, this channel is {}",
            local.transport
        ));
    }
    if hello.ram_channels > 0 && local.transport == "file" {
        errors.push("RAM channels cannot be used with a file".into());
    }
    if hello.ram != *local.ram {
        errors.push(format!(
            "guest RAM layout: source {}, destination {}",
            hello.ram, local.ram
        ));
    }

    let src_ids: BTreeSet<&str> = hello.devices.iter().map(|d| d.id.as_str()).collect();
    let dst_ids: BTreeSet<&str> = local.devices.iter().map(|d| d.id.as_str()).collect();
    if src_ids.len() != hello.devices.len() {
        errors.push("source lists a device id twice".into());
    }
    for src in &hello.devices {
        let Some(dst) = local.devices.iter().find(|d| d.id == src.id) else {
            errors.push(format!("device {}: missing on the destination", src.id));
            continue;
        };
        let id = &src.id;
        check_schema(&mut errors, &format!("device {id}"), &src.vmsd, &dst.vmsd);
        match (&src.early_setup, &dst.early_setup) {
            (Some(s), Some(d)) => {
                check_schema(&mut errors, &format!("device {id}: early-setup"), s, d)
            }
            (None, None) => {}
            (s, d) => errors.push(format!(
                "device {id}: early-setup: source {}, destination {}",
                on_off(s.is_some()),
                on_off(d.is_some())
            )),
        }
        match (&src.backend_transfer, &dst.backend_transfer) {
            (Some(s), Some(d)) => check_schema(
                &mut errors,
                &format!("device {id}: backend-transfer metadata"),
                s,
                d,
            ),
            (None, None) => {}
            (s, d) => errors.push(format!(
                "device {id}: backend-transfer: source {}, destination {}",
                on_off(s.is_some()),
                on_off(d.is_some())
            )),
        }
    }
    for id in dst_ids.difference(&src_ids) {
        errors.push(format!("device {id}: missing on the source"));
    }
    errors
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ram::RamRegion;

    fn hello(caps: Capabilities, mode: MigrationMode, transport: &str) -> Hello {
        Hello {
            protocol_version: PROTOCOL_VERSION,
            mode,
            machine_type: "m".into(),
            transport: transport.into(),
            capabilities: caps,
            parameters: Parameters::default(),
            ram: RamLayout {
                regions: vec![RamRegion { gpa: 0, size: 4096 }],
            },
            devices: Vec::new(),
            ram_channels: 0,
        }
    }

    fn check_on(h: &Hello, transport: &str) -> Vec<String> {
        check(
            h,
            &LocalView {
                machine_type: "m",
                transport,
                capabilities: &h.capabilities,
                ram: &h.ram,
                devices: &[],
            },
        )
    }

    #[test]
    fn fds_over_tcp_are_refused_by_the_destination_too() {
        // A source that skipped its own check still meets the destination's.
        let caps = Capabilities {
            backend_transfer: true,
            ..Default::default()
        };
        assert_eq!(
            check_on(&hello(caps, MigrationMode::Remote, "tcp"), "tcp"),
            ["capability backend-transfer needs a UNIX socket, this channel is tcp"]
        );
        assert_eq!(
            check_on(&hello(Capabilities::default(), MigrationMode::Local, "tcp"), "tcp"),
            ["local mode hands guest RAM over by fd and needs a UNIX socket, this channel is tcp"]
        );
        let mut h = hello(Capabilities::default(), MigrationMode::Remote, "unix");
        assert_eq!(
            check_on(&h, "tcp"),
            ["transport: source writes to unix, destination reads from tcp"]
        );
        h.protocol_version = 0;
        assert_eq!(
            check_on(&h, "unix"),
            ["protocol version 0 is not supported (destination speaks 1)"]
        );
    }
}
