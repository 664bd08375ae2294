//! Switchover on the destination: gather every device section up to END, check that
//! everything announced came, apply in order (early finish, backends, state), then the
//! two-phase commit: READY, wait for GO, resume, RUNNING.
//!
//! Nothing is applied before END, so a stream cut anywhere in the device sections leaves
//! the devices as they were; and nothing runs before GO, so a source that is cancelled or
//! dies after its last byte still leaves a destination that never ran.

use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::time::Instant;

use baton_qdev::{EarlyOutcome, ReceivedBackend};
use baton_vmstate::VmState;
use tracing::warn;

use crate::error::{MigrationError, StreamError};
use crate::micros;
use crate::payload::{BackendBlob, DeviceBlob, EarlyFinal};
use crate::protocol::SectionType;
use crate::report::DestinationPhases;
use crate::transport::Channel;

use super::{check_version, DestRun, DestinationVm, IncomingOutcome, Session};

/// Per-device switchover material, gathered before anything is applied.
#[derive(Default)]
struct Pending {
    early: Option<EarlyFinal>,
    state: Option<DeviceBlob>,
    backend: Option<(BackendBlob, Vec<OwnedFd>)>,
}

fn gather(
    main: &mut Channel,
    session: &Session,
    vm: &mut DestinationVm<'_>,
    prepared: &[usize],
) -> Result<HashMap<usize, Pending>, MigrationError> {
    let mut pending: HashMap<usize, Pending> = HashMap::new();
    loop {
        let s = main.recv()?;
        match s.ty {
            SectionType::EarlyFinal => {
                main.expect(&s, &[SectionType::EarlyFinal])?;
                let f = EarlyFinal::load(&s.payload, 1).map_err(|e| main.bad_state(&s, e))?;
                let i = session.lookup(&f.device).ok_or_else(|| {
                    main.bad_payload(&s, format!("unknown device {:?}", f.device))
                })?;
                let p = pending.entry(i).or_default();
                if !prepared.contains(&i) || p.early.is_some() {
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
                let i = session.lookup(&b.device).ok_or_else(|| {
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
                let i = session.lookup(&b.device).ok_or_else(|| {
                    main.bad_payload(&s, format!("unknown device {:?}", b.device))
                })?;
                if session.offers[i].backend_transfer.is_none() {
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
            SectionType::End => {
                main.expect(&s, &[SectionType::End])?;
                return Ok(pending);
            }
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
}

/// Everything announced in the handshake must have come before END.
fn check_complete(
    main: &Channel,
    session: &Session,
    pending: &HashMap<usize, Pending>,
) -> Result<(), MigrationError> {
    for (i, o) in session.offers.iter().enumerate() {
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
                seq: main.last_recv_seq(),
                ty: "END".into(),
                reason: format!("device {}: no {what} before END", o.id),
            }
            .into());
        }
    }
    Ok(())
}

fn apply(
    vm: &mut DestinationVm<'_>,
    mut pending: HashMap<usize, Pending>,
    phases: &mut DestinationPhases,
) -> Result<(), MigrationError> {
    let t = Instant::now();
    for (i, p) in pending.iter_mut() {
        if let Some(f) = p.early.take() {
            let es = vm.devices[*i]
                .early_setup()
                .ok_or_else(|| MigrationError::Config("early-setup hook vanished".into()))?;
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
                .ok_or_else(|| MigrationError::Config("backend-transfer hook vanished".into()))?;
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
    Ok(())
}

impl DestRun<'_> {
    pub(super) fn switchover(
        &mut self,
        vm: &mut DestinationVm<'_>,
        session: &Session,
        t_switch: Instant,
    ) -> Result<IncomingOutcome, MigrationError> {
        let mut phases = DestinationPhases::default();
        let monitor = self.monitor;
        let main = self
            .main
            .as_mut()
            .ok_or_else(|| MigrationError::Config("no main channel".into()))?;
        let pending = gather(main, session, vm, &self.prepared)?;
        phases.receive_us = micros(t_switch.elapsed());
        check_complete(main, session, &pending)?;
        apply(vm, pending, &mut phases)?;
        // The trailer is for analyzers; it is checked after the resume, off the pause.
        let schema = main.recv_expect(SectionType::Schema)?;
        if !session.file {
            // Two-phase commit: run only when the source says so.
            main.send(SectionType::Ready, &[], &[])?;
            main.recv_expect(SectionType::Go)?;
        }
        if !monitor.commit() {
            return Err(MigrationError::Cancelled);
        }
        let t = Instant::now();
        vm.control.resume().map_err(MigrationError::Vm)?;
        phases.resumed_at_ns = crate::monotonic_ns();
        phases.resume_us = micros(t.elapsed());
        self.prepared.clear();
        if !session.file {
            let json =
                serde_json::to_vec(&phases).map_err(|e| MigrationError::Config(e.to_string()))?;
            if let Err(e) = main.send(SectionType::Running, &json, &[]) {
                // We run; the source learns it from the closed socket or its own timeout.
                warn!(error = %e, "could not report RUNNING to the source");
            }
        }
        if let Err(e) = serde_json::from_slice::<serde::de::IgnoredAny>(&schema.payload) {
            warn!(error = %e, "the stream's schema trailer is not valid JSON");
        }
        Ok(IncomingOutcome {
            mode: session.hello.mode,
            phases,
        })
    }
}
