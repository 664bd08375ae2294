//! The destination side: accept, check the handshake, prepare early, receive RAM, and at
//! switchover finish early setup, adopt backends, load devices and resume.
//!
//! The stream is hostile input. Each section is accepted only in the phase where it
//! belongs, for a device that exists and expects it, exactly once; any error stops the
//! load, is sent back on the return path, and leaves the VM unstarted for the caller to
//! discard. The VM is resumed only on the source's GO (see [`crate::protocol`]), so a
//! source that dies or is cancelled at any point before it leaves a destination that
//! never ran.
//!
//! Split by phase: this file accepts the channels and runs the handshake, `precopy`
//! receives setup and RAM sections (RAM channels drained in parallel), `switchover`
//! gathers and applies the device sections and commits.

mod precopy;
mod switchover;

use std::collections::HashMap;
use std::net::TcpListener;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixListener;
use std::path::PathBuf;

use baton_qdev::Migratable;
use baton_vmstate::VmState;
use tracing::warn;

use crate::error::{MigrationError, StreamError};
use crate::handshake::{
    check, Capabilities, DeviceOffer, Hello, LocalView, MigrationMode, Reply, SchemaVersion,
};
use crate::payload::RamMemfds;
use crate::protocol::{ChannelHeader, ChannelKind, SectionType};
use crate::ram::{IncomingRam, RamLayout};
use crate::report::{DestinationPhases, MigrationMonitor, MigrationStatus};
use crate::transport::{Channel, Transport};
use crate::VmControl;

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
                if !matches!(e, MigrationError::Rejected(_)) && !main.is_file() {
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
    /// Devices whose early state was prepared (discarded on failure).
    prepared: Vec<usize>,
}

/// What the handshake established, for the later phases.
struct Session {
    hello: Hello,
    offers: Vec<DeviceOffer>,
    layout: RamLayout,
    index: HashMap<String, usize>,
    file: bool,
}

impl Session {
    fn lookup(&self, id: &str) -> Option<usize> {
        self.index.get(id).copied()
    }
}

/// While accepting RAM channels: the main channel, whose closing means the source is gone.
struct Watch<'a> {
    main: &'a Channel,
    what: String,
}

/// Wait for a connection, waking up to honour a cancel (a blocked `accept` would not), and
/// failing when the watched main channel closes (a source that died would otherwise be
/// waited for until someone cancels).
fn wait_readable(
    fd: RawFd,
    monitor: &MigrationMonitor,
    name: &str,
    watch: Option<&Watch<'_>>,
) -> Result<(), MigrationError> {
    let main_fd = watch.and_then(|w| match w.main.transport() {
        Transport::Unix(s) => Some(s.as_raw_fd()),
        Transport::Tcp(s) => Some(s.as_raw_fd()),
        _ => None,
    });
    loop {
        if monitor.is_cancelled() {
            return Err(MigrationError::Cancelled);
        }
        let mut p = [
            libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: main_fd.unwrap_or(-1),
                events: libc::POLLRDHUP,
                revents: 0,
            },
        ];
        // SAFETY: two valid pollfds for the duration of the call (a negative fd is ignored).
        let r = unsafe { libc::poll(p.as_mut_ptr(), 2, 50) };
        if r < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                return Err(MigrationError::Config(format!("{name}: waiting: {e}")));
            }
            continue;
        }
        if p[1].revents & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR) != 0 {
            if let Some(w) = watch {
                return Err(StreamError::Closed {
                    channel: w.main.name().to_owned(),
                    context: w.what.clone(),
                }
                .into());
            }
        }
        if p[0].revents != 0 {
            return Ok(());
        }
    }
}

fn accept(
    source: &Incoming,
    name: &str,
    monitor: &MigrationMonitor,
    watch: Option<&Watch<'_>>,
) -> Result<Channel, MigrationError> {
    let io = match source {
        Incoming::Unix(l) => {
            wait_readable(l.as_raw_fd(), monitor, name, watch)?;
            l.accept().map(|(s, _)| Transport::Unix(s))
        }
        Incoming::Tcp(l) => {
            wait_readable(l.as_raw_fd(), monitor, name, watch)?;
            l.accept().map(|(s, _)| Transport::Tcp(s))
        }
        Incoming::File(p) => std::fs::File::open(p)
            .map(|f| Transport::FileReader(std::io::BufReader::with_capacity(1 << 20, f))),
    };
    let io = io.map_err(|e| MigrationError::Config(format!("{name}: accepting: {e}")))?;
    let ch = Channel::new(name, io);
    // Cancel stops reading only, so the destination can still say why it stopped.
    monitor.add_shutdown_read(ch.transport().shutdown_handle());
    Ok(ch)
}

impl DestRun<'_> {
    fn run(&mut self, vm: &mut DestinationVm<'_>) -> Result<IncomingOutcome, MigrationError> {
        // Kept from the start: whatever goes wrong, even the header, is reported back.
        let main = self
            .main
            .insert(accept(&self.source, "main", self.monitor, None)?);
        let header = main.read_header()?;
        if header.kind != ChannelKind::Main || header.index != 0 {
            return Err(StreamError::BadChannelHeader(format!(
                "first channel must be main/0, got {:?}/{}",
                header.kind, header.index
            ))
            .into());
        }
        let session = self.handshake(vm)?;
        let ram_chans = self.ram_channels(&header, &session)?;
        if session.hello.mode == MigrationMode::Local {
            self.adopt_memfds(vm)?;
        }
        let t_switch = self.precopy(vm, &session, ram_chans)?;
        self.switchover(vm, &session, t_switch)
    }

    fn main(&mut self) -> Result<&mut Channel, MigrationError> {
        // Set in `run` before anything else; an error rather than a panic all the same.
        self.main
            .as_mut()
            .ok_or_else(|| MigrationError::Config("no main channel".into()))
    }

    fn handshake(&mut self, vm: &mut DestinationVm<'_>) -> Result<Session, MigrationError> {
        let file = matches!(self.source, Incoming::File(_));
        let offers = local_offers(vm, &self.settings.capabilities);
        let layout = vm.ram.layout();
        let settings = self.settings;
        let main = self.main()?;
        let transport = main.transport().kind_name();
        let hs = main.recv_expect(SectionType::Handshake)?;
        let hello: Hello = serde_json::from_slice(&hs.payload)
            .map_err(|e| main.bad_payload(&hs, format!("invalid JSON: {e}")))?;
        let errors = check(
            &hello,
            &LocalView {
                machine_type: &settings.machine_type,
                transport,
                capabilities: &settings.capabilities,
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
        let index = vm
            .devices
            .iter()
            .enumerate()
            .map(|(i, d)| (d.id().to_owned(), i))
            .collect();
        Ok(Session {
            hello,
            offers,
            layout,
            index,
            file,
        })
    }

    /// Accept the announced RAM channels, each checked against the main channel's session.
    fn ram_channels(
        &mut self,
        main_header: &ChannelHeader,
        session: &Session,
    ) -> Result<Vec<Channel>, MigrationError> {
        let n = session.hello.ram_channels;
        let mut chans: Vec<(u16, Channel)> = Vec::new();
        for i in 0..n {
            let main = self
                .main
                .as_ref()
                .ok_or_else(|| MigrationError::Config("no main channel".into()))?;
            let watch = Watch {
                main,
                what: format!(
                    "while the destination waited for RAM channel {} of {n}",
                    i + 1
                ),
            };
            let mut ch = accept(&self.source, "ram", self.monitor, Some(&watch))?;
            let h = ch.read_header()?;
            if h.session != main_header.session {
                return Err(StreamError::BadChannelHeader(
                    "RAM channel from another session".into(),
                )
                .into());
            }
            if h.kind != ChannelKind::Ram || h.index >= n {
                return Err(StreamError::BadChannelHeader(format!(
                    "expected a RAM channel below {n}, got {:?}/{}",
                    h.kind, h.index
                ))
                .into());
            }
            if chans.iter().any(|(i, _)| *i == h.index) {
                return Err(StreamError::BadChannelHeader(format!(
                    "RAM channel {} opened twice",
                    h.index
                ))
                .into());
            }
            chans.push((h.index, ch.renamed(format!("ram{}", h.index))));
        }
        chans.sort_by_key(|(i, _)| *i);
        Ok(chans.into_iter().map(|(_, c)| c).collect())
    }

    fn adopt_memfds(&mut self, vm: &mut DestinationVm<'_>) -> Result<(), MigrationError> {
        let main = self.main()?;
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
        // The source pauses only after this: mapping and VM creation stay off the pause.
        main.send(SectionType::RamMapped, &[], &[])?;
        Ok(())
    }
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
