//! The source side: handshake, setup, RAM pre-copy, switchover, and the way back.
//!
//! Until the destination reports RUNNING, everything the source did can be undone: a
//! failure or cancel at any point resumes exported backends and then the vCPUs, and the
//! guest carries on as if nothing had happened.

mod ram_phase;

use std::net::TcpStream;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use baton_qdev::Migratable;
use baton_vmstate::VmState;
use tracing::warn;

use crate::error::MigrationError;
use crate::handshake::{DeviceOffer, Hello, MigrationMode, Reply, SchemaVersion};
use crate::payload::{
    BackendBlob, DeviceBlob, DeviceSchema, EarlyFinal, FdRole, RamMemfds, SchemaTrailer,
};
use crate::protocol::{ChannelHeader, ChannelKind, SectionType, PAGE_SIZE, PROTOCOL_VERSION};
use crate::ram::{DirtyLog, GuestRam};
use crate::report::{DowntimeReport, MigrationMonitor, MigrationStatus, RamStats, SourcePhases};
use crate::transport::{Channel, Transport};
use crate::{micros, new_session_id, MigrationSettings, Target, VmControl};

/// The VM as the source engine needs it.
pub struct SourceVm<'a> {
    pub devices: &'a mut [Box<dyn Migratable>],
    pub ram: &'a dyn GuestRam,
    pub dirty_log: &'a mut dyn DirtyLog,
    pub control: &'a mut dyn VmControl,
}

/// What a completed migration reports.
#[derive(Clone, Debug)]
pub struct MigrationOutcome {
    pub report: DowntimeReport,
    pub ram: RamStats,
}

/// Migrate (or snapshot) `vm` to `target`. On error the VM runs as before, except after
/// [`MigrationError::Unconfirmed`] (the destination may run): then it stays paused.
pub fn migrate(
    target: &Target,
    settings: &MigrationSettings,
    vm: SourceVm<'_>,
    monitor: &MigrationMonitor,
) -> Result<MigrationOutcome, MigrationError> {
    monitor.set_status(MigrationStatus::Setup);
    let mut run = SourceRun {
        settings,
        monitor,
        exported: Vec::new(),
        paused: false,
        paused_at: None,
        paused_at_ns: 0,
        phases: SourcePhases::default(),
        ram_stats: RamStats::default(),
    };
    let mut vm = vm;
    let result = run.run(target, &mut vm);
    match result {
        Ok(outcome) => {
            monitor.update(|i| {
                i.downtime = Some(outcome.report.downtime_us / 1000);
                i.ram = Some(outcome.ram.clone());
                i.downtime_report = Some(outcome.report.clone());
            });
            monitor.set_status(MigrationStatus::Completed);
            Ok(outcome)
        }
        Err(e) => {
            let e = if monitor.is_cancelled() {
                MigrationError::Cancelled
            } else {
                e
            };
            if monitor.is_cancelled() {
                monitor.set_status(MigrationStatus::Cancelling);
            }
            if matches!(e, MigrationError::Unconfirmed(_)) {
                // The destination may run: resuming here could run the guest twice.
                vm.dirty_log.stop();
                warn!(error = %e, "migration unconfirmed; source stays paused");
            } else {
                run.roll_back(&mut vm);
                warn!(error = %e, "migration failed; source resumed");
            }
            monitor.fail(&e);
            Err(e)
        }
    }
}

struct SourceRun<'s> {
    settings: &'s MigrationSettings,
    monitor: &'s MigrationMonitor,
    /// Devices whose backend was exported, by index.
    exported: Vec<usize>,
    paused: bool,
    paused_at: Option<Instant>,
    paused_at_ns: u64,
    phases: SourcePhases,
    ram_stats: RamStats,
}

fn connect(target: &Target, what: &str) -> Result<Transport, MigrationError> {
    let io = match target {
        Target::Unix(p) => UnixStream::connect(p).map(Transport::Unix),
        Target::Tcp(a) => TcpStream::connect(a.as_str()).map(Transport::Tcp),
        Target::File(p) => std::fs::File::create(p)
            .map(|f| Transport::FileWriter(std::io::BufWriter::with_capacity(1 << 20, f))),
    };
    io.map_err(|e| MigrationError::Config(format!("{what}: connecting to {target}: {e}")))
}

impl SourceRun<'_> {
    fn check_cancel(&self) -> Result<(), MigrationError> {
        if self.monitor.is_cancelled() {
            Err(MigrationError::Cancelled)
        } else {
            Ok(())
        }
    }

    fn validate(&self, target: &Target, vm: &SourceVm<'_>) -> Result<(), MigrationError> {
        let s = self.settings;
        let unix = matches!(target, Target::Unix(_));
        let file = matches!(target, Target::File(_));
        let bad = |m: String| Err(MigrationError::Config(m));
        match s.mode {
            MigrationMode::Local if !unix => {
                return bad(format!(
                    "local mode hands guest RAM over by fd and needs a unix: target, not {target}"
                ))
            }
            MigrationMode::Local => {
                let layout = vm.ram.layout();
                if let Some(i) = (0..layout.regions.len()).find(|i| vm.ram.memfd(*i).is_none()) {
                    return bad(format!(
                        "local mode: RAM region {i} has no memfd to hand over"
                    ));
                }
            }
            MigrationMode::Snapshot if !file => {
                return bad(format!("snapshot mode writes a file: target, not {target}"))
            }
            MigrationMode::Remote if file => {
                return bad("remote mode needs a socket, not a file".into())
            }
            _ => {}
        }
        if s.capabilities.backend_transfer && !unix {
            return bad(format!(
                "capability backend-transfer needs a UNIX socket, the target is {target}"
            ));
        }
        Ok(())
    }

    fn offers(&self, vm: &mut SourceVm<'_>) -> Vec<DeviceOffer> {
        let caps = &self.settings.capabilities;
        vm.devices
            .iter_mut()
            .map(|d| {
                let vmsd = SchemaVersion::of(d.vmsd());
                let early_setup = if caps.early_setup {
                    d.early_setup().map(|e| SchemaVersion::of(e.early_vmsd()))
                } else {
                    None
                };
                let backend_transfer = if caps.backend_transfer {
                    d.backend_transfer()
                        .filter(|b| b.enabled())
                        .map(|b| SchemaVersion::of(b.metadata_vmsd()))
                } else {
                    None
                };
                DeviceOffer {
                    id: d.id().to_owned(),
                    vmsd,
                    early_setup,
                    backend_transfer,
                }
            })
            .collect()
    }

    fn trailer(&self, vm: &mut SourceVm<'_>, offers: &[DeviceOffer]) -> Vec<u8> {
        let devices = vm
            .devices
            .iter_mut()
            .zip(offers)
            .map(|(d, o)| DeviceSchema {
                id: d.id().to_owned(),
                vmsd: d.vmsd().clone(),
                early_setup: o
                    .early_setup
                    .as_ref()
                    .and_then(|_| d.early_setup().map(|e| e.early_vmsd().clone())),
                backend_metadata: o
                    .backend_transfer
                    .as_ref()
                    .and_then(|_| d.backend_transfer().map(|b| b.metadata_vmsd().clone())),
            })
            .collect();
        serde_json::to_vec(&SchemaTrailer {
            devices,
            sections: SchemaTrailer::section_schemas(),
        })
        .unwrap_or_default()
    }

    fn run(
        &mut self,
        target: &Target,
        vm: &mut SourceVm<'_>,
    ) -> Result<MigrationOutcome, MigrationError> {
        let t_start = Instant::now();
        self.validate(target, vm)?;
        let s = self.settings;
        let snapshot = s.mode == MigrationMode::Snapshot;
        let session = new_session_id();
        let mut main = Channel::new("main", connect(target, "main channel")?);
        self.monitor
            .add_shutdown(main.transport().shutdown_handle());
        match self.run_on(&mut main, target, vm, t_start, session, snapshot) {
            Err(MigrationError::Stream(e)) if !snapshot && !self.monitor.is_cancelled() => {
                // The destination may have said why before it went away.
                Err(peer_error(&mut main)
                    .map_or(MigrationError::Stream(e), MigrationError::DestinationFailed))
            }
            r => r,
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn run_on(
        &mut self,
        main: &mut Channel,
        target: &Target,
        vm: &mut SourceVm<'_>,
        t_start: Instant,
        session: [u8; 16],
        snapshot: bool,
    ) -> Result<MigrationOutcome, MigrationError> {
        let s = self.settings;
        main.write_header(&ChannelHeader {
            version: PROTOCOL_VERSION,
            session,
            kind: ChannelKind::Main,
            index: 0,
        })?;

        let layout = vm.ram.layout();
        let offers = self.offers(vm);
        let ram_channels = if s.mode == MigrationMode::Remote && s.capabilities.multifd {
            s.parameters.multifd_channels
        } else {
            0
        };
        let hello = Hello {
            protocol_version: PROTOCOL_VERSION,
            mode: s.mode,
            machine_type: s.machine_type.clone(),
            transport: main.transport().kind_name().to_owned(),
            capabilities: s.capabilities.clone(),
            parameters: s.parameters.clone(),
            ram: layout.clone(),
            devices: offers.clone(),
            ram_channels,
        };
        let hello_json =
            serde_json::to_vec(&hello).map_err(|e| MigrationError::Config(e.to_string()))?;
        main.send(SectionType::Handshake, &hello_json, &[])?;
        if !snapshot {
            let reply = self.recv_return(main, SectionType::HandshakeReply)?;
            let reply: Reply = serde_json::from_slice(&reply.payload)
                .map_err(|e| main.bad_payload(&reply, format!("invalid JSON: {e}")))?;
            if !reply.accepted {
                return Err(MigrationError::Rejected(reply.errors));
            }
        }
        let mut ram_chans = Vec::new();
        for i in 0..ram_channels {
            let mut ch = Channel::new(format!("ram{i}"), connect(target, "RAM channel")?);
            self.monitor.add_shutdown(ch.transport().shutdown_handle());
            ch.write_header(&ChannelHeader {
                version: PROTOCOL_VERSION,
                session,
                kind: ChannelKind::Ram,
                index: i,
            })?;
            ram_chans.push(ch);
        }

        if s.mode == MigrationMode::Local {
            let fds: Vec<RawFd> = (0..layout.regions.len())
                .filter_map(|i| vm.ram.memfd(i).map(|f| f.as_raw_fd()))
                .collect();
            let p = RamMemfds {
                regions: fds.len() as u32,
            }
            .save();
            main.send(SectionType::RamMemfds, &p, &fds)?;
            self.recv_return(main, SectionType::RamMapped)?;
        }

        // Early setup: send now, keep the bytes to compare at switchover.
        let mut early_sent: Vec<(usize, Vec<u8>)> = Vec::new();
        for (i, (d, o)) in vm.devices.iter_mut().zip(&offers).enumerate() {
            if o.early_setup.is_none() {
                continue;
            }
            let Some(e) = d.early_setup() else { continue };
            let version_id = e.early_vmsd().version_id;
            let data = e.save_early()?;
            let blob = DeviceBlob {
                device: o.id.clone(),
                version_id,
                data: data.clone(),
            };
            main.send(SectionType::EarlyState, &blob.save(), &[])?;
            early_sent.push((i, data));
        }
        if !early_sent.is_empty() && !snapshot {
            self.recv_return(main, SectionType::SwitchoverAck)?;
        }
        let trailer = self.trailer(vm, &offers);
        let setup_ms = t_start.elapsed().as_millis() as u64;
        self.monitor.update(|i| i.setup_time = Some(setup_ms));
        self.check_cancel()?;

        self.ram_phase(main, &mut ram_chans, vm, &layout)?;
        self.monitor.set_status(MigrationStatus::Device);
        main.send(SectionType::Switchover, &[], &[])?;

        // Device state.
        let t = Instant::now();
        for (i, sent) in &early_sent {
            let d = &mut vm.devices[*i];
            let id = d.id().to_owned();
            let Some(e) = d.early_setup() else { continue };
            let now = e.save_early()?;
            let version_id = e.early_vmsd().version_id;
            let unchanged = *sent == now;
            let data = if unchanged { Vec::new() } else { now };
            let fin = EarlyFinal {
                device: id,
                unchanged,
                version_id,
                data,
            };
            main.send(SectionType::EarlyFinal, &fin.save(), &[])?;
        }
        for d in vm.devices.iter_mut() {
            let blob = DeviceBlob {
                device: d.id().to_owned(),
                version_id: d.vmsd().version_id,
                data: d.save()?,
            };
            main.send(SectionType::DeviceState, &blob.save(), &[])?;
        }
        self.phases.device_save_us = micros(t.elapsed());

        let t = Instant::now();
        for (i, o) in offers.iter().enumerate() {
            if o.backend_transfer.is_none() {
                continue;
            }
            let Some(bt) = vm.devices[i].backend_transfer() else {
                continue;
            };
            let metadata_version = bt.metadata_vmsd().version_id;
            self.exported.push(i);
            let handoff = bt.export()?;
            let blob = BackendBlob {
                device: o.id.clone(),
                metadata_version,
                metadata: handoff.metadata.clone(),
                roles: handoff
                    .fds
                    .iter()
                    .map(|f| FdRole {
                        role: f.role.clone(),
                    })
                    .collect(),
            };
            let fds: Vec<RawFd> = handoff.fds.iter().map(|f| f.fd.as_raw_fd()).collect();
            main.send(SectionType::Backend, &blob.save(), &fds)?;
        }
        self.phases.fd_transfer_us = micros(t.elapsed());
        main.send(SectionType::End, &[], &[])?;
        main.send(SectionType::Schema, &trailer, &[])?;
        main.flush()?;

        let destination = if snapshot {
            vm.control.resume().map_err(MigrationError::Vm)?;
            self.paused = false;
            None
        } else {
            let t = Instant::now();
            self.recv_return(main, SectionType::Ready)?;
            // The point of no return: from here a cancel is ignored.
            if !self.monitor.commit() {
                return Err(MigrationError::Cancelled);
            }
            main.send(SectionType::Go, &[], &[])?;
            let d = self.await_running(main)?;
            self.phases.wait_for_destination_us = micros(t.elapsed());
            d
        };
        let until_running_us = self.paused_at.map(|t| micros(t.elapsed())).unwrap_or(0);
        // Same host (local mode): both sides read one monotonic clock.
        let downtime_us = match &destination {
            Some(d)
                if self.settings.mode == MigrationMode::Local
                    && d.resumed_at_ns > self.paused_at_ns =>
            {
                (d.resumed_at_ns - self.paused_at_ns) / 1000
            }
            _ => until_running_us,
        };
        // The destination runs: the backends are its own now.
        for i in std::mem::take(&mut self.exported) {
            if let Some(bt) = vm.devices[i].backend_transfer() {
                bt.release();
            }
        }
        Ok(MigrationOutcome {
            report: DowntimeReport {
                downtime_us,
                until_running_us,
                source: self.phases.clone(),
                destination,
            },
            ram: self.ram_stats.clone(),
        })
    }

    fn pause(&mut self, vm: &mut SourceVm<'_>) -> Result<(), MigrationError> {
        self.check_cancel()?;
        let t = Instant::now();
        self.paused_at = Some(t);
        self.paused_at_ns = crate::monotonic_ns();
        self.paused = true;
        vm.control.pause().map_err(MigrationError::Vm)?;
        self.phases.pause_us = micros(t.elapsed());
        Ok(())
    }

    fn account(&mut self, sent: &crate::ram_send::PassStats, took: Duration) {
        let r = &mut self.ram_stats;
        r.transferred += sent.bytes;
        r.duplicate += sent.zero_pages;
        r.normal += sent.data_pages;
        r.normal_bytes += sent.data_pages * PAGE_SIZE;
        if sent.bytes > 0 {
            r.mbps = sent.bytes as f64 * 8.0 / 1e6 / took.as_secs_f64().max(1e-6);
        }
    }

    fn bandwidth_bytes_per_sec(&self) -> f64 {
        self.ram_stats.mbps * 1e6 / 8.0
    }

    /// Read the destination's next answer; an ERROR becomes `DestinationFailed`.
    fn recv_return(
        &self,
        main: &mut Channel,
        want: SectionType,
    ) -> Result<crate::transport::Section, MigrationError> {
        let s = main.recv()?;
        if s.ty == SectionType::Error {
            return Err(MigrationError::DestinationFailed(
                String::from_utf8_lossy(&s.payload).into_owned(),
            ));
        }
        main.expect(&s, &[want])?;
        Ok(s)
    }

    /// After GO: RUNNING (with the destination's timings), or ERROR, which the destination
    /// sends only while it has not resumed. Anything else leaves the outcome unknown.
    fn await_running(
        &self,
        main: &mut Channel,
    ) -> Result<Option<crate::report::DestinationPhases>, MigrationError> {
        let s = main
            .recv()
            .map_err(|e| MigrationError::Unconfirmed(e.to_string()))?;
        match s.ty {
            SectionType::Running => match serde_json::from_slice(&s.payload) {
                Ok(d) => Ok(Some(d)),
                Err(e) => {
                    warn!(error = %e, "RUNNING without readable timings");
                    Ok(None)
                }
            },
            SectionType::Error => Err(MigrationError::DestinationFailed(
                String::from_utf8_lossy(&s.payload).into_owned(),
            )),
            other => Err(MigrationError::Unconfirmed(format!(
                "{}: section #{}: expected RUNNING or ERROR, got {other}",
                main.name(),
                s.seq
            ))),
        }
    }

    /// Undo everything: backends back into use, then the vCPUs.
    fn roll_back(&mut self, vm: &mut SourceVm<'_>) {
        vm.dirty_log.stop();
        for i in std::mem::take(&mut self.exported).into_iter().rev() {
            if let Some(bt) = vm.devices[i].backend_transfer() {
                if let Err(e) = bt.resume() {
                    warn!(error = %e, "backend resume failed");
                }
            }
        }
        if self.paused {
            if let Err(e) = vm.control.resume() {
                warn!(error = %e, "resuming the vCPUs failed");
            }
            self.paused = false;
        }
    }
}

/// After a send failed: an ERROR the destination sent before closing, if any.
fn peer_error(main: &mut Channel) -> Option<String> {
    let timeout = Some(Duration::from_secs(2));
    match main.transport() {
        Transport::Unix(s) => s.set_read_timeout(timeout).ok()?,
        Transport::Tcp(s) => s.set_read_timeout(timeout).ok()?,
        _ => return None,
    }
    for _ in 0..16 {
        match main.recv() {
            Ok(s) if s.ty == SectionType::Error => {
                return Some(String::from_utf8_lossy(&s.payload).into_owned())
            }
            Ok(_) => continue,
            Err(_) => return None,
        }
    }
    None
}
