//! Setup and pre-copy on the destination: early states on the main channel, RAM on the
//! main channel or drained from the RAM channels by one thread each, until SWITCHOVER.
//!
//! The first error wins and stops every other reader: a bad page on a RAM channel must
//! not wait for the source to finish its pre-copy (and pause the guest) before it is
//! reported, and an error on the main channel must not wait for the RAM channels' EOS.

use std::sync::Mutex;
use std::time::Instant;

use baton_vmstate::VmState;

use crate::error::{MigrationError, StreamError};
use crate::handshake::MigrationMode;
use crate::payload::DeviceBlob;
use crate::protocol::SectionType;
use crate::ram::{IncomingRam, RamLayout};
use crate::ram_wire::{recv_pages, RecvBuffers};
use crate::report::{MigrationMonitor, MigrationStatus};
use crate::transport::{Channel, ShutdownHandle};

use super::{check_version, DestRun, DestinationVm, Session};

/// The first failure among the readers; later ones are its consequences.
struct FirstError(Mutex<Option<MigrationError>>);

impl FirstError {
    fn record(&self, e: MigrationError) {
        let mut g = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if g.is_none() {
            *g = Some(e);
        }
    }
    fn take(self) -> Option<MigrationError> {
        self.0.into_inner().unwrap_or_else(|p| p.into_inner())
    }
}

fn stop_all(handles: &[ShutdownHandle]) {
    for h in handles {
        h.shutdown_read();
    }
}

impl DestRun<'_> {
    /// Returns when SWITCHOVER arrived and every RAM channel ended.
    pub(super) fn precopy(
        &mut self,
        vm: &mut DestinationVm<'_>,
        session: &Session,
        ram_chans: Vec<Channel>,
    ) -> Result<Instant, MigrationError> {
        let monitor = self.monitor;
        let main = self
            .main
            .as_mut()
            .ok_or_else(|| MigrationError::Config("no main channel".into()))?;
        // Every reader can stop every other one.
        let mut stop: Vec<ShutdownHandle> =
            main.transport().shutdown_handle().into_iter().collect();
        stop.extend(
            ram_chans
                .iter()
                .filter_map(|c| c.transport().shutdown_handle()),
        );
        let first = FirstError(Mutex::new(None));
        let ram: &dyn IncomingRam = &*vm.ram;
        let devices = &mut *vm.devices;
        let prepared = &mut self.prepared;
        let layout = &session.layout;
        let (first_ref, stop_ref) = (&first, &stop);
        let mut t_switch = None;
        std::thread::scope(|sc| {
            let workers: Vec<_> = ram_chans
                .into_iter()
                .map(|ch| {
                    sc.spawn(move || {
                        if let Err(e) = drain_ram_channel(ch, ram, layout) {
                            first_ref.record(e);
                            stop_all(stop_ref);
                        }
                    })
                })
                .collect();
            match main_loop(main, session, devices, prepared, ram, monitor) {
                Ok(()) => {
                    t_switch = Some(Instant::now());
                    monitor.set_status(MigrationStatus::Device);
                }
                Err(e) => {
                    first_ref.record(e);
                    stop_all(stop_ref);
                }
            }
            for w in workers {
                if w.join().is_err() {
                    first_ref.record(MigrationError::Ram("RAM receiver panicked".into()));
                }
            }
        });
        match (first.take(), t_switch) {
            (Some(e), _) => Err(e),
            (None, Some(t)) => Ok(t),
            (None, None) => Err(MigrationError::Config(
                "pre-copy ended without a result".into(),
            )),
        }
    }
}

fn main_loop(
    main: &mut Channel,
    session: &Session,
    devices: &mut [Box<dyn baton_qdev::Migratable>],
    prepared: &mut Vec<usize>,
    ram: &dyn IncomingRam,
    monitor: &MigrationMonitor,
) -> Result<(), MigrationError> {
    let hello = &session.hello;
    let early_expected = session
        .offers
        .iter()
        .filter(|o| o.early_setup.is_some())
        .count();
    // As on the source: setup until every early state is prepared, then RAM flows.
    let active = || {
        if hello.mode == MigrationMode::Remote {
            monitor.set_status(MigrationStatus::Active);
        }
    };
    if early_expected == 0 {
        active();
    }
    let mut bufs = RecvBuffers::default();
    loop {
        let head = main.recv_head()?;
        if head.ty == SectionType::RamPages && hello.mode != MigrationMode::Local {
            recv_pages(main, head, ram, &session.layout, &mut bufs)?;
            continue;
        }
        let s = main.recv_rest(head)?;
        match s.ty {
            SectionType::EarlyState => {
                main.expect(&s, &[SectionType::EarlyState])?;
                let b = DeviceBlob::load(&s.payload, 1).map_err(|e| main.bad_state(&s, e))?;
                let i = session.lookup(&b.device).ok_or_else(|| {
                    main.bad_payload(&s, format!("unknown device {:?}", b.device))
                })?;
                if session.offers[i].early_setup.is_none() || prepared.contains(&i) {
                    return Err(main
                        .bad_payload(&s, format!("device {}: early state not expected", b.device))
                        .into());
                }
                let es = devices[i]
                    .early_setup()
                    .ok_or_else(|| main.bad_payload(&s, "no early-setup hook"))?;
                check_version(es.early_vmsd(), b.version_id).map_err(|e| {
                    main.bad_payload(&s, format!("device {}: early-setup: {e}", b.device))
                })?;
                // Counted before the hook runs: a failed prepare is discarded too.
                prepared.push(i);
                es.prepare(b.version_id, &b.data)?;
                if prepared.len() == early_expected {
                    if !session.file {
                        main.send(SectionType::SwitchoverAck, &[], &[])?;
                    }
                    active();
                }
            }
            SectionType::RamIterationEnd if hello.mode == MigrationMode::Remote => {
                main.expect(&s, &[SectionType::RamIterationEnd])?;
            }
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
                return Ok(());
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
}

fn drain_ram_channel(
    mut ch: Channel,
    ram: &dyn IncomingRam,
    layout: &RamLayout,
) -> Result<(), MigrationError> {
    let mut bufs = RecvBuffers::default();
    loop {
        let head = ch.recv_head()?;
        if head.ty == SectionType::RamPages {
            recv_pages(&mut ch, head, ram, layout, &mut bufs)?;
            continue;
        }
        let s = ch.recv_rest(head)?;
        ch.expect(&s, &[SectionType::RamPages, SectionType::RamEos])?;
        return Ok(());
    }
}
