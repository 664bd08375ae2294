//! The virtio-mmio transport and the common, migratable state of virtio devices.
//!
//! Why this crate: every baton virtio device (virtio-net over TAP, vhost-user-blk, test
//! devices) shares the same transport logic and the same migration-critical state — device
//! status, negotiated features, queue configuration and ring indices. Getting those right
//! once, with hostile-input checks on both the register path and the migration path, is
//! what lets each device crate stay small and lets a live update move a running device
//! without losing or repeating a request.
//!
//! - A device model implements [`VirtioDevice`] (type, offered features, configuration
//!   space, its `virtio_queue::Queue`s, activate / notify / reset).
//! - The VMM wraps it in [`MmioTransport`], maps the window on its MMIO bus
//!   ([`regs::MMIO_WINDOW_SIZE`] bytes) and forwards `read`/`write`; it backs the
//!   interrupt with an [`InterruptLine`] (a KVM irqfd `EventFd` works as is) and may
//!   register ioeventfds at [`MmioTransport::notify_registrations`].
//! - For migration, a device crate embeds [`VirtioMmioState`] in its own `VmState`
//!   struct, and calls [`MmioTransport::save_state`] / [`MmioTransport::restore_state`]
//!   from its `Migratable` impl (see the `migration` module docs).
//!
//! Guest memory is a type parameter `M` (any `vm_memory::GuestMemoryBackend`, e.g.
//! `GuestMemoryMmap` with or without a dirty bitmap).
//!
//! # Example: a device, its transport, and a migration
//!
//! ```
//! use std::io::Write;
//! use std::sync::Arc;
//! use baton_virtio::*;
//! use baton_vmstate::VmState;
//! use virtio_queue::{Queue, QueueT};
//! use vm_memory::{GuestAddress, GuestMemoryMmap};
//! use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
//!
//! type Mem = GuestMemoryMmap;
//!
//! /// An entropy device (virtio type 4) of dubious quality: every byte is 0x5a.
//! struct Rng { queues: Vec<Queue>, active: Option<ActivateContext<Mem>> }
//!
//! impl VirtioDevice<Mem> for Rng {
//!     fn device_type(&self) -> u32 { 4 }
//!     fn device_features(&self) -> u64 { regs::features::VERSION_1 }
//!     fn queues(&self) -> &[Queue] { &self.queues }
//!     fn queues_mut(&mut self) -> &mut [Queue] { &mut self.queues }
//!     fn read_config(&self, offset: u64, data: &mut [u8]) { read_config_bytes(&[], offset, data) }
//!     fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
//!     fn activate(&mut self, ctx: ActivateContext<Mem>) -> Result<(), DeviceError> {
//!         self.active = Some(ctx);
//!         Ok(())
//!     }
//!     fn queue_notify(&mut self, queue: u16) -> Result<(), DeviceError> {
//!         let Some(ctx) = &self.active else { return Ok(()) };
//!         let q = &mut self.queues[usize::from(queue)];
//!         let qerr = |source| DeviceError::Queue { queue, source };
//!         while let Some(chain) = q.pop_descriptor_chain(&ctx.mem) {
//!             let head = chain.head_index();
//!             let mut w = chain.writer(&ctx.mem).map_err(qerr)?;
//!             let n = w.available_bytes().min(4096);
//!             w.write_all(&vec![0x5a; n])
//!                 .map_err(|source| DeviceError::Io { context: "buffer".into(), source })?;
//!             q.add_used(&ctx.mem, head, n as u32).map_err(qerr)?;
//!         }
//!         ctx.interrupt.signal_used_queue()
//!             .map_err(|source| DeviceError::Io { context: "irq".into(), source })
//!     }
//!     fn reset(&mut self) { self.active = None; }
//! }
//!
//! let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)])?;
//! let new_rng = || -> Result<Rng, virtio_queue::Error> {
//!     Ok(Rng { queues: vec![Queue::new(256)?], active: None })
//! };
//! // In a VMM the EventFd is registered with KVM_IRQFD for this window's interrupt.
//! let irqfd = Arc::new(EventFd::new(EFD_NONBLOCK)?);
//! let mut rng = MmioTransport::new(new_rng()?, mem.clone(), irqfd.clone())?;
//!
//! // The VMM's MMIO bus forwards accesses in [base, base + regs::MMIO_WINDOW_SIZE).
//! let mut word = [0u8; 4];
//! rng.read(regs::MAGIC, &mut word);
//! assert_eq!(u32::from_le_bytes(word), regs::MAGIC_VALUE);
//! // Optional fast path: one ioeventfd per queue, then `rng.notify_queue(r.queue)`.
//! let regs = rng.notify_registrations(0xd000_0000);
//! assert_eq!((regs[0].addr, regs[0].datamatch), (0xd000_0050, 0));
//!
//! // Migration: the transport's state goes inside the device's own state struct.
//! let blob = rng.save_state().save();
//! let mut dst = MmioTransport::new(new_rng()?, mem, Arc::new(EventFd::new(EFD_NONBLOCK)?))?;
//! let state = VirtioMmioState::load(&blob, VirtioMmioState::VMSD.version_id)?;
//! dst.restore_state(&state)?;
//! dst.notify_all_queues(); // when the restored VM starts
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod device;
mod interrupt;
mod migration;
mod mmio;
pub mod regs;
mod state;

pub use device::{
    read_config_bytes, write_config_bytes, ActivateContext, DeviceError, FeatureRefusal,
    VirtioDevice,
};
pub use interrupt::{InterruptLine, VirtioInterrupt};
pub use migration::RestoreError;
pub use mmio::{MmioTransport, NotifyRegistration, TransportError};
pub use state::{MemoryMap, VirtioMmioState, VirtqueueState};
