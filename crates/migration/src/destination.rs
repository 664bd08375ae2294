//! The destination side: accept, check the handshake, prepare early, receive RAM, and at
//! switchover finish early setup, adopt backends, load devices and resume.
//!
//! The stream is hostile input. Each section is accepted only in the phase where it
//! belongs, for a device that exists and expects it, exactly once; any error stops the
//! load, is sent back on the return path, and leaves the VM unstarted for the caller to
//! discard.

use std::collections::HashMap;
use std::net::TcpListener;
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::time::Instant;

use baton_qdev::{EarlyOutcome, Migratable, ReceivedBackend};
use baton_vmstate::VmState;
use tracing::warn;

use crate::error::{MigrationError, StreamError};
use crate::handshake::{
    check, Capabilities, DeviceOffer, Hello, LocalView, MigrationMode, Reply, SchemaVersion,
};
use crate::payload::{BackendBlob, DeviceBlob, EarlyFinal, RamMemfds};
use crate::protocol::{ChannelKind, SectionType};
use crate::ram::{apply_pages, IncomingRam};
use crate::report::{DestinationPhases, MigrationMonitor, MigrationStatus};
use crate::transport::{Channel, Section, Transport};
use crate::{micros, VmControl};

/// Where the incoming stream comes from.
pub enum Incoming {
    Unix(UnixListener),
    Tcp(TcpListener),
    File(PathBuf),
}

/// What the destination checks the source against.
#[derive(Clone, Debug)]
pub struct IncomingSettings {
    pub machine_type: String,
    pub capabilities: Capabilities,
}

/// The destination VM: devices created in incoming mode, RAM, vCPU control.
pub struct DestinationVm<'a> {
    pub devices: &'a mut [Box<dyn Migratable>],
    pub ram: &'a mut dyn IncomingRam,
    pub control: &'a mut dyn VmControl,
}

/// A completed incoming migration or restore.
#[derive(Clone, Debug)]
pub struct IncomingOutcome {
    pub mode: MigrationMode,
    pub phases: DestinationPhases,
}

/// Receive a migration (or restore a snapshot) into `vm`, then resume it.
pub fn incoming(
    source: Incoming,
    settings: &IncomingSettings,
    vm: DestinationVm<'_>,
    monitor: &MigrationMonitor,
) -> Result<IncomingOutcome, MigrationError> {
    monitor.set_status(MigrationStatus::Setup);
    let mut vm = vm;
    let mut run = DestRun {
        settings,
        monitor,
        source,
        main: None,
        prepared: Vec::new(),
    };
    let r = run.run(&mut vm);
    match r {
        Ok(o) => {
            monitor.set_status(MigrationStatus::Completed);
            Ok(o)
        }
        Err(e) => {
            let e = if monitor.is_cancelled() {
                MigrationError::Cancelled
            } else {
                e
            };
            if let Some(main) = run.main.as_mut() {
                if !matches!(e, MigrationError::Rejected(_)) {
                    let _ = main.send(SectionType::Error, e.to_string().as_bytes(), &[]);
                }
            }
            for i in run.prepared {
                if let Some(es) = vm.devices[i].early_setup() {
                    es.discard();
                }
            }
            warn!(error = %e, "incoming migration failed");
            monitor.fail(&e);
            Err(e)
        }
    }
}

struct DestRun<'s> {
    settings: &'s IncomingSettings,
    monitor: &'s MigrationMonitor,
    source: Incoming,
    main: Option<Channel>,
    prepared: Vec<usize>,
}

fn accept(source: &Incoming, name: &str) -> Result<Channel, MigrationError> {
    let io = match source {
        Incoming::Unix(l) => l.accept().map(|(s, _)| Transport::Unix(s)),
        Incoming::Tcp(l) => l.accept().map(|(s, _)| Transport::Tcp(s)),
        Incoming::File(p) => std::fs::File::open(p)
            .map(|f| Transport::FileReader(std::io::BufReader::with_capacity(1 << 20, f))),
    };
    let io = io.map_err(|e| MigrationError::Config(format!("{name}: accepting: {e}")))?;
    Ok(Channel::new(name, io))
}

/// Per-device switchover material, gathered before anything is applied.
#[derive(Default)]
struct Pending {
    early: Option<EarlyFinal>,
    state: Option<DeviceBlob>,
    backend: Option<(BackendBlob, Vec<OwnedFd>)>,
}

impl DestRun<'_> {
    fn run(&mut self, vm: &mut DestinationVm<'_>) -> Result<IncomingOutcome, MigrationError> {
        let mut main = accept(&self.source, "main")?;
        self.monitor
            .add_shutdown(main.transport().shutdown_handle());
        let header = main.read_header()?;
        if header.kind != ChannelKind::Main || header.index != 0 {
            return Err(StreamError::BadChannelHeader(format!(
                "first channel must be main/0, got {:?}/{}",
                header.kind, header.index
            ))
            .into());
        }
        let file = matches!(self.source, Incoming::File(_));
        let transport = main.transport().kind_name();
        self.main = Some(main);
        let main = self.main.as_mut().ok_or(MigrationError::Cancelled)?;

        let hs = main.recv_expect(SectionType::Handshake)?;
        let hello: Hello = serde_json::from_slice(&hs.payload)
            .map_err(|e| main.bad_payload(&hs, format!("invalid JSON: {e}")))?;
        let offers = local_offers(vm, &self.settings.capabilities);
        let layout = vm.ram.layout();
        let errors = check(
            &hello,
            &LocalView {
                machine_type: &self.settings.machine_type,
                transport,
                capabilities: &self.settings.capabilities,
                ram: &layout,
                devices: &offers,
            },
        );
        if !file {
            let reply = Reply {
                accepted: errors.is_empty(),
                errors: errors.clone(),
            };
            let json =
                serde_json::to_vec(&reply).map_err(|e| MigrationError::Config(e.to_string()))?;
            main.send(SectionType::HandshakeReply, &json, &[])?;
        }
        if !errors.is_empty() {
            return Err(MigrationError::Rejected(errors));
        }
        let index: HashMap<String, usize> = vm
            .devices
            .iter()
            .enumerate()
            .map(|(i, d)| (d.id().to_owned(), i))
            .collect();

        // RAM channels.
        let mut ram_chans = Vec::new();
        for _ in 0..hello.ram_channels {
            let mut ch = accept(&self.source, "ram")?;
            self.monitor.add_shutdown(ch.transport().shutdown_handle());
            let h = ch.read_header()?;
            if h.session != header.session {
                return Err(StreamError::BadChannelHeader(
                    "RAM channel from another session".into(),
                )
                .into());
            }
            if h.kind != ChannelKind::Ram || h.index >= hello.ram_channels {
                return Err(StreamError::BadChannelHeader(format!(
                    "expected a RAM channel below {}, got {:?}/{}",
                    hello.ram_channels, h.kind, h.index
                ))
                .into());
            }
            if ram_chans
                .iter()
                .any(|(i, _): &(u16, Channel)| *i == h.index)
            {
                return Err(StreamError::BadChannelHeader(format!(
                    "RAM channel {} opened twice",
                    h.index
                ))
                .into());
            }
            let ch = ch.renamed(format!("ram{}", h.index));
            ram_chans.push((h.index, ch));
        }
        if hello.mode == MigrationMode::Remote {
            self.monitor.set_status(MigrationStatus::Active);
        }

        if hello.mode == MigrationMode::Local {
            let s = main.recv_expect(SectionType::RamMemfds)?;
            let m = RamMemfds::load(&s.payload, 1).map_err(|e| main.bad_state(&s, e))?;
            if m.regions as usize != s.fds.len() {
                return Err(main
                    .bad_payload(
                        &s,
                        format!(
                            "{} regions announced, {} fds received",
                            m.regions,
                            s.fds.len()
                        ),
                    )
                    .into());
            }
            vm.ram
                .adopt_memfds(s.fds)
                .map_err(|e| MigrationError::Ram(format!("adopting the source's memfds: {e}")))?;
        }

        let early_expected = offers.iter().filter(|o| o.early_setup.is_some()).count();
        let mut pending: HashMap<usize, Pending> = HashMap::new();
        let mut t_switch = None;
        let mut phases = DestinationPhases::default();
        let ram: &dyn IncomingRam = &*vm.ram;
        let devices = &mut *vm.devices;
        let prepared = &mut self.prepared;
        let monitor = self.monitor;
        // Setup and pre-copy, with the RAM channels drained in parallel.
        std::thread::scope(|sc| -> Result<(), MigrationError> {
            let workers: Vec<_> = ram_chans
                .drain(..)
                .map(|(_, ch)| {
                    let layout = &layout;
                    sc.spawn(move || drain_ram_channel(ch, ram, layout))
                })
                .collect();
            loop {
                let s = main.recv()?;
                match s.ty {
                    SectionType::EarlyState => {
                        main.expect(&s, &[SectionType::EarlyState])?;
                        let b =
                            DeviceBlob::load(&s.payload, 1).map_err(|e| main.bad_state(&s, e))?;
                        let i = lookup(&index, &b.device).ok_or_else(|| {
                            main.bad_payload(&s, format!("unknown device {:?}", b.device))
                        })?;
                        if offers[i].early_setup.is_none() || prepared.contains(&i) {
                            return Err(main
                                .bad_payload(
                                    &s,
                                    format!("device {}: early state not expected", b.device),
                                )
                                .into());
                        }
                        let es = devices[i]
                            .early_setup()
                            .ok_or_else(|| main.bad_payload(&s, "no early-setup hook"))?;
                        check_version(es.early_vmsd(), b.version_id).map_err(|e| {
                            main.bad_payload(&s, format!("device {}: early-setup: {e}", b.device))
                        })?;
                        es.prepare(b.version_id, &b.data)?;
                        prepared.push(i);
                        if prepared.len() == early_expected && !file {
                            main.send(SectionType::SwitchoverAck, &[], &[])?;
                        }
                    }
                    SectionType::RamPages if hello.mode != MigrationMode::Local => {
                        main.expect(&s, &[SectionType::RamPages])?;
                        apply_pages(ram, &layout, &s.payload)
                            .map_err(|e| main.bad_payload(&s, e))?;
                    }
                    SectionType::RamIterationEnd if hello.mode == MigrationMode::Remote => {}
                    SectionType::Switchover => {
                        main.expect(&s, &[SectionType::Switchover])?;
                        if prepared.len() != early_expected {
                            return Err(main
                                .bad_payload(
                                    &s,
                                    format!(
                                        "switchover after {} of {} early states",
                                        prepared.len(),
                                        early_expected
                                    ),
                                )
                                .into());
                        }
                        break;
                    }
                    _ => {
                        return Err(StreamError::Unexpected {
                            channel: main.name().to_owned(),
                            seq: s.seq,
                            expected: "a setup or RAM section".into(),
                            got: s.ty.to_string(),
                        }
                        .into())
                    }
                }
            }
            t_switch = Some(Instant::now());
            monitor.set_status(MigrationStatus::Device);
            for w in workers {
                w.join()
                    .unwrap_or_else(|_| Err(MigrationError::Ram("RAM receiver panicked".into())))?;
            }
            Ok(())
        })?;

        // Switchover: gather everything, then apply in order.
        loop {
            let s = main.recv()?;
            match s.ty {
                SectionType::EarlyFinal => {
                    main.expect(&s, &[SectionType::EarlyFinal])?;
                    let f = EarlyFinal::load(&s.payload, 1).map_err(|e| main.bad_state(&s, e))?;
                    let i = lookup(&index, &f.device).ok_or_else(|| {
                        main.bad_payload(&s, format!("unknown device {:?}", f.device))
                    })?;
                    let p = pending.entry(i).or_default();
                    if !self.prepared.contains(&i) || p.early.is_some() {
                        return Err(main
                            .bad_payload(
                                &s,
                                format!("device {}: early final state not expected", f.device),
                            )
                            .into());
                    }
                    p.early = Some(f);
                }
                SectionType::DeviceState => {
                    main.expect(&s, &[SectionType::DeviceState])?;
                    let b = DeviceBlob::load(&s.payload, 1).map_err(|e| main.bad_state(&s, e))?;
                    let i = lookup(&index, &b.device).ok_or_else(|| {
                        main.bad_payload(&s, format!("unknown device {:?}", b.device))
                    })?;
                    check_version(vm.devices[i].vmsd(), b.version_id)
                        .map_err(|e| main.bad_payload(&s, format!("device {}: {e}", b.device)))?;
                    let p = pending.entry(i).or_default();
                    if p.state.is_some() {
                        return Err(main
                            .bad_payload(&s, format!("device {}: state sent twice", b.device))
                            .into());
                    }
                    p.state = Some(b);
                }
                SectionType::Backend => {
                    main.expect(&s, &[SectionType::Backend])?;
                    let b = BackendBlob::load(&s.payload, 1).map_err(|e| main.bad_state(&s, e))?;
                    let i = lookup(&index, &b.device).ok_or_else(|| {
                        main.bad_payload(&s, format!("unknown device {:?}", b.device))
                    })?;
                    if offers[i].backend_transfer.is_none() {
                        return Err(main
                            .bad_payload(&s, format!("device {}: backend not expected", b.device))
                            .into());
                    }
                    if b.roles.len() != s.fds.len() {
                        return Err(main
                            .bad_payload(
                                &s,
                                format!(
                                    "device {}: {} roles but {} fds",
                                    b.device,
                                    b.roles.len(),
                                    s.fds.len()
                                ),
                            )
                            .into());
                    }
                    let p = pending.entry(i).or_default();
                    if p.backend.is_some() {
                        return Err(main
                            .bad_payload(&s, format!("device {}: backend sent twice", b.device))
                            .into());
                    }
                    p.backend = Some((b, s.fds));
                }
                SectionType::End => break,
                _ => {
                    return Err(StreamError::Unexpected {
                        channel: main.name().to_owned(),
                        seq: s.seq,
                        expected: "a device section or END".into(),
                        got: s.ty.to_string(),
                    }
                    .into())
                }
            }
        }
        let end_seq = main.last_recv_seq();
        phases.receive_us = t_switch.map(|t| micros(t.elapsed())).unwrap_or(0);
        // Everything announced must have come.
        for (i, o) in offers.iter().enumerate() {
            let p = pending.get(&i);
            let missing = if p.and_then(|p| p.state.as_ref()).is_none() {
                Some("state")
            } else if o.early_setup.is_some() && p.and_then(|p| p.early.as_ref()).is_none() {
                Some("early final state")
            } else if o.backend_transfer.is_some() && p.and_then(|p| p.backend.as_ref()).is_none() {
                Some("backend")
            } else {
                None
            };
            if let Some(what) = missing {
                return Err(StreamError::BadPayload {
                    channel: main.name().to_owned(),
                    seq: end_seq,
                    ty: "END".into(),
                    reason: format!("device {}: no {what} before END", o.id),
                }
                .into());
            }
        }
        let t = Instant::now();
        for (i, p) in pending.iter_mut() {
            if let Some(f) = p.early.take() {
                let es = vm.devices[*i]
                    .early_setup()
                    .ok_or(MigrationError::Cancelled)?;
                let outcome = if f.unchanged {
                    EarlyOutcome::Unchanged
                } else {
                    EarlyOutcome::Changed {
                        version_id: f.version_id,
                        state: &f.data,
                    }
                };
                es.finish(outcome)?;
            }
        }
        phases.early_finish_us = micros(t.elapsed());
        let t = Instant::now();
        for (i, p) in pending.iter_mut() {
            if let Some((b, fds)) = p.backend.take() {
                let id = vm.devices[*i].id().to_owned();
                let received = ReceivedBackend::new(
                    &id,
                    b.roles.into_iter().map(|r| r.role).zip(fds).collect(),
                    b.metadata,
                    b.metadata_version,
                );
                let bt = vm.devices[*i]
                    .backend_transfer()
                    .ok_or(MigrationError::Cancelled)?;
                bt.adopt(received)?;
            }
        }
        phases.fd_adopt_us = micros(t.elapsed());
        let t = Instant::now();
        for (i, p) in pending.iter_mut() {
            if let Some(b) = p.state.take() {
                vm.devices[*i].load(b.version_id, &b.data)?;
            }
        }
        phases.device_load_us = micros(t.elapsed());
        let schema = main.recv_expect(SectionType::Schema)?;
        serde_json::from_slice::<serde_json::Value>(&schema.payload)
            .map_err(|e| main.bad_payload(&schema, format!("invalid JSON: {e}")))?;
        if self.monitor.is_cancelled() {
            return Err(MigrationError::Cancelled);
        }
        let t = Instant::now();
        vm.control.resume().map_err(MigrationError::Vm)?;
        phases.resume_us = micros(t.elapsed());
        self.prepared.clear();
        if !file {
            let json =
                serde_json::to_vec(&phases).map_err(|e| MigrationError::Config(e.to_string()))?;
            if let Err(e) = main.send(SectionType::Running, &json, &[]) {
                // We run; the source learns it from the closed socket or its own timeout.
                warn!(error = %e, "could not report RUNNING to the source");
            }
        }
        Ok(IncomingOutcome {
            mode: hello.mode,
            phases,
        })
    }
}

fn lookup(index: &HashMap<String, usize>, id: &str) -> Option<usize> {
    index.get(id).copied()
}

fn check_version(vmsd: &baton_vmstate::VmStateDescription, v: u32) -> Result<(), String> {
    baton_vmstate::check_version(vmsd, v).map_err(|e| e.to_string())
}

fn local_offers(vm: &mut DestinationVm<'_>, caps: &Capabilities) -> Vec<DeviceOffer> {
    vm.devices
        .iter_mut()
        .map(|d| DeviceOffer {
            id: d.id().to_owned(),
            vmsd: SchemaVersion::of(d.vmsd()),
            early_setup: if caps.early_setup {
                d.early_setup().map(|e| SchemaVersion::of(e.early_vmsd()))
            } else {
                None
            },
            backend_transfer: d
                .backend_transfer()
                .filter(|b| b.enabled())
                .map(|b| SchemaVersion::of(b.metadata_vmsd())),
        })
        .collect()
}

fn drain_ram_channel(
    mut ch: Channel,
    ram: &dyn IncomingRam,
    layout: &crate::ram::RamLayout,
) -> Result<(), MigrationError> {
    loop {
        let s: Section = ch.recv()?;
        ch.expect(&s, &[SectionType::RamPages, SectionType::RamEos])?;
        if s.ty == SectionType::RamEos {
            return Ok(());
        }
        apply_pages(ram, layout, &s.payload).map_err(|e| ch.bad_payload(&s, e))?;
    }
}
