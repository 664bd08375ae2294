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
