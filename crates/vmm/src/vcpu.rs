//! vCPU threads: one per vCPU, running `KVM_RUN` and dispatching exits, plus the
//! pause/resume/stop protocol the rest of the VMM (and later the migration engine)
//! uses to get every vCPU out of the guest.
//!
//! Pausing: the controller sets the wanted state, then signals every thread
//! (SIGRTMIN, empty handler) until all of them report parked. The signal makes a
//! running `KVM_RUN` return EINTR; one sent just before a thread enters `KVM_RUN` is
//! lost, so the kick repeats every 200 µs until the thread parks. A parked thread has
//! released its `VcpuFd` lock, so state can be read and written from any thread.
//!
//! A vCPU that stops on its own (triple fault, failed entry, ioctl error) records a
//! [`GuestExit`] and stays parked until the VM is stopped.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_ioctls::{VcpuExit, VcpuFd};
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

use crate::error::{Error, Result};
use crate::mmio::MmioBus;
use crate::status::{GuestExit, GuestStatus, StatusDevice, COM1_PORT, DEBUG_EXIT_PORT};

const KICK_INTERVAL: Duration = Duration::from_micros(200);
/// COM1's line status register: report "transmitter empty" so polling drivers write.
const COM1_LSR: u16 = COM1_PORT + 5;

/// What the controller wants the vCPU threads to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RunState {
    Running,
    Paused,
    Stopping,
}

struct CtlState {
    want: RunState,
    /// Threads currently parked (paused, or stopped on their own).
    parked: usize,
    /// Threads that have not returned.
    alive: usize,
}

/// Shared between the controller and the vCPU threads.
pub(crate) struct Control {
    state: Mutex<CtlState>,
    cv: Condvar,
}

impl Control {
    pub(crate) fn new(want: RunState) -> Arc<Self> {
        Arc::new(Control {
            state: Mutex::new(CtlState {
                want,
                parked: 0,
                alive: 0,
            }),
            cv: Condvar::new(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, CtlState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn want(&self) -> RunState {
        self.lock().want
    }

    /// Sets the wanted state without waiting (for threads not started yet).
    pub(crate) fn set_want(&self, want: RunState) {
        self.lock().want = want;
        self.cv.notify_all();
    }
}

/// Everything a vCPU thread needs to handle exits.
#[derive(Clone)]
pub(crate) struct ExitHandlers {
    pub bus: Arc<MmioBus>,
    pub status_dev: Arc<StatusDevice>,
    pub status: Arc<GuestStatus>,
}

/// A running vCPU thread.
pub(crate) struct VcpuThread {
    pub handle: JoinHandle<()>,
}

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

fn kick_signal() -> libc::c_int {
    SIGRTMIN()
}

static HANDLER_SET: AtomicBool = AtomicBool::new(false);

fn install_kick_handler() -> Result<()> {
    if !HANDLER_SET.swap(true, Ordering::AcqRel) {
        register_signal_handler(kick_signal(), kick_handler).map_err(|e| Error::Io {
            what: "installing the vCPU kick signal handler".into(),
            source: std::io::Error::from_raw_os_error(e.errno()),
        })?;
    }
    Ok(())
}

/// Starts the thread of vCPU `index`.
pub(crate) fn spawn(
    index: usize,
    fd: Arc<Mutex<VcpuFd>>,
    ctl: Arc<Control>,
    handlers: ExitHandlers,
) -> Result<VcpuThread> {
    install_kick_handler()?;
    ctl.lock().alive += 1;
    let ctl2 = ctl.clone();
    let handle = std::thread::Builder::new()
        .name(format!("vcpu{index}"))
        .spawn(move || {
            run_loop(index, &fd, &ctl2, &handlers);
            let mut st = ctl2.lock();
            st.alive -= 1;
            drop(st);
            ctl2.cv.notify_all();
        })
        .map_err(|e| {
            ctl.lock().alive -= 1;
            Error::VcpuThread {
                index,
                reason: e.to_string(),
            }
        })?;
    Ok(VcpuThread { handle })
}

/// Parks while paused (or after a fatal exit); returns false when the thread must end.
fn checkpoint(ctl: &Control, stuck: bool) -> bool {
    let mut st = ctl.lock();
    if st.want == RunState::Running && !stuck {
        return true;
    }
    st.parked += 1;
    ctl.cv.notify_all();
    while st.want == RunState::Paused || (stuck && st.want == RunState::Running) {
        st = ctl.cv.wait(st).unwrap_or_else(|p| p.into_inner());
    }
    st.parked -= 1;
    st.want != RunState::Stopping
}

fn run_loop(index: usize, fd: &Mutex<VcpuFd>, ctl: &Control, h: &ExitHandlers) {
    let mut stuck = false;
    loop {
        if !checkpoint(ctl, stuck) {
            return;
        }
        if stuck {
            continue;
        }
        let mut vcpu = fd.lock().unwrap_or_else(|p| p.into_inner());
        let fatal = match vcpu.run() {
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                if !h.bus.write(addr, data) {
                    tracing::warn!(
                        vcpu = index,
                        "MMIO write to unclaimed {addr:#x} ({} bytes)",
                        data.len()
                    );
                }
                None
            }
            Ok(VcpuExit::MmioRead(addr, data)) => {
                if !h.bus.read(addr, data) {
                    tracing::warn!(
                        vcpu = index,
                        "MMIO read from unclaimed {addr:#x} ({} bytes)",
                        data.len()
                    );
                }
                None
            }
            Ok(VcpuExit::IoOut(port, data)) => {
                match port {
                    COM1_PORT => data.iter().for_each(|&b| h.status_dev.put_byte(b)),
                    DEBUG_EXIT_PORT => {
                        let mut b = [0u8; 4];
                        let n = data.len().min(4);
                        b[..n].copy_from_slice(&data[..n]);
                        h.status_dev.exit(u32::from_le_bytes(b));
                    }
                    _ => tracing::trace!(vcpu = index, "port {port:#x} write ignored"),
                }
                None
            }
            Ok(VcpuExit::IoIn(port, data)) => {
                data.fill(if port == COM1_LSR { 0x60 } else { 0xff });
                None
            }
            Ok(VcpuExit::Intr) | Ok(VcpuExit::Hlt) | Ok(VcpuExit::IrqWindowOpen) => None,
            Ok(VcpuExit::Shutdown) => Some(GuestExit::Shutdown { vcpu: index }),
            Ok(VcpuExit::FailEntry(reason, cpu)) => Some(GuestExit::Error {
                vcpu: index,
                reason: format!("KVM entry failed: hardware reason {reason:#x} on host CPU {cpu}"),
            }),
            Ok(VcpuExit::InternalError) => Some(GuestExit::Error {
                vcpu: index,
                reason: "KVM internal error".into(),
            }),
            Ok(other) => Some(GuestExit::Error {
                vcpu: index,
                reason: format!("unhandled exit {other:?}"),
            }),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => None,
            Err(e) => Some(GuestExit::Error {
                vcpu: index,
                reason: format!("KVM_RUN: {e}"),
            }),
        };
        drop(vcpu);
        if let Some(exit) = fatal {
            if let GuestExit::Error { reason, .. } = &exit {
                tracing::error!(vcpu = index, "{reason}");
            }
            h.status.set_exit(exit);
            stuck = true;
        }
    }
}

/// Sets the wanted state and, unless running, kicks the threads until all are parked.
pub(crate) fn transition(
    ctl: &Control,
    threads: &[VcpuThread],
    want: RunState,
    timeout: Duration,
) -> Result<()> {
    {
        let mut st = ctl.lock();
        if st.want == RunState::Stopping && want != RunState::Stopping {
            return Err(Error::Config("the VM is stopping".into()));
        }
        st.want = want;
    }
    ctl.cv.notify_all();
    if want == RunState::Running {
        return Ok(());
    }
    let deadline = Instant::now() + timeout;
    let mut st = ctl.lock();
    loop {
        let done = match want {
            RunState::Paused => st.parked == st.alive,
            _ => st.alive == 0,
        };
        if done {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(Error::VcpuThread {
                index: 0,
                reason: format!(
                    "{} of {} vCPU threads did not stop within {timeout:?}",
                    st.alive - st.parked,
                    st.alive
                ),
            });
        }
        drop(st);
        for t in threads {
            if !t.handle.is_finished() {
                // A thread that already parked ignores the signal.
                let _ = t.handle.kill(kick_signal());
            }
        }
        st = ctl.lock();
        st = ctl
            .cv
            .wait_timeout(st, KICK_INTERVAL)
            .unwrap_or_else(|p| p.into_inner())
            .0;
    }
}
