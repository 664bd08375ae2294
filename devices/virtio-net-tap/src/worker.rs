//! [`NetWorker`]: a ready-made event loop for one device, for VMMs without their own.
//!
//! One thread, one epoll set: the device's queue ioeventfds (level-triggered: read, then
//! notify the queue), its TAP queue fds (edge-triggered: every call reads until empty or
//! out of guest buffers, and an rx kick resumes), its wake fd (the TAP set changed:
//! re-register, then process everything) and a stop fd. Registered TAP queues are kept
//! alive by the worker until it has removed them from the epoll set, so a released or
//! handed-over fd never lingers in it.
//!
//! A VMM with its own event loop does the same with [`crate::VirtioNetTap::ioeventfds`],
//! [`crate::VirtioNetTap::tap_queues`] and [`crate::VirtioNetTap::wake_fd`].

use std::io;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::thread::JoinHandle;

use vm_memory::GuestMemoryBackend;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::backend::TapQueue;
use crate::handle::VirtioNetTap;

const STOP: u64 = u64::MAX;
const WAKE: u64 = u64::MAX - 1;
const TAP: u64 = 1 << 32;

/// The device's event loop thread; stopped (and joined) on [`NetWorker::stop`] or drop.
pub struct NetWorker {
    stop: Arc<EventFd>,
    thread: Option<JoinHandle<()>>,
}

impl NetWorker {
    /// Starts the loop for `dev`.
    pub fn spawn<M: GuestMemoryBackend + Clone + Send + 'static>(
        dev: &VirtioNetTap<M>,
    ) -> io::Result<NetWorker> {
        let stop = Arc::new(EventFd::new(EFD_NONBLOCK)?);
        let epoll = Epoll::new()?;
        let add = |fd: i32, token: u64, ev: EventSet| {
            epoll.ctl(ControlOperation::Add, fd, EpollEvent::new(ev, token))
        };
        add(stop.as_raw_fd(), STOP, EventSet::IN)?;
        add(dev.wake_fd().as_raw_fd(), WAKE, EventSet::IN)?;
        let nq = 2 * usize::from(dev.config().queue_pairs) + 1;
        for q in 0..nq as u16 {
            if let Some(fd) = dev.ioevent(q) {
                add(fd.as_raw_fd(), u64::from(q), EventSet::IN)?;
            }
        }
        let dev = dev.clone();
        let thread = std::thread::Builder::new()
            .name(format!("net-{}", dev.id()))
            .spawn(move || run(dev, epoll))?;
        Ok(NetWorker {
            stop,
            thread: Some(thread),
        })
    }

    /// Stops the loop and waits for it.
    pub fn stop(mut self) {
        self.halt();
    }

    fn halt(&mut self) {
        if let Some(t) = self.thread.take() {
            if let Err(e) = self.stop.write(1) {
                tracing::error!("net worker: cannot signal stop: {e}");
                return;
            }
            if t.join().is_err() {
                tracing::error!("net worker: thread panicked");
            }
        }
    }
}

impl Drop for NetWorker {
    fn drop(&mut self) {
        self.halt();
    }
}

fn resync<M: GuestMemoryBackend + Clone + Send + 'static>(
    dev: &VirtioNetTap<M>,
    epoll: &Epoll,
    taps: &mut Vec<Arc<TapQueue>>,
) {
    for q in taps.drain(..) {
        let _ = epoll.ctl(
            ControlOperation::Delete,
            q.as_raw_fd(),
            EpollEvent::default(),
        );
    }
    for (i, q) in dev.tap_queues().into_iter().enumerate() {
        let ev = EpollEvent::new(EventSet::IN | EventSet::EDGE_TRIGGERED, TAP | i as u64);
        match epoll.ctl(ControlOperation::Add, q.as_raw_fd(), ev) {
            Ok(()) => taps.push(q),
            Err(e) => tracing::error!(device = dev.id(), "net worker: TAP queue {i}: {e}"),
        }
    }
}

fn run<M: GuestMemoryBackend + Clone + Send + 'static>(dev: VirtioNetTap<M>, epoll: Epoll) {
    let mut taps = Vec::new();
    resync(&dev, &epoll, &mut taps);
    let mut events = vec![EpollEvent::default(); 64];
    loop {
        let n = match epoll.wait(-1, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                tracing::error!(device = dev.id(), "net worker: epoll: {e}");
                return;
            }
        };
        for ev in &events[..n] {
            match ev.data() {
                STOP => return,
                WAKE => {
                    let _ = dev.wake_fd().read();
                    resync(&dev, &epoll, &mut taps);
                    dev.process_all();
                }
                t if t & TAP != 0 => dev.tap_readable((t & 0xffff) as u16),
                q => {
                    if let Some(fd) = dev.ioevent(q as u16) {
                        let _ = fd.read();
                    }
                    dev.notify_queue(q as u16);
                }
            }
        }
    }
}
