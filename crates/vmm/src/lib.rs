//! baton-vmm: the reference VMM of baton.
//!
//! It boots a PVH ELF (the harness guest in `tests/guest`, or any PVH kernel) on
//! KVM with guest RAM in a memfd, an in-kernel irqchip, 1-4 vCPUs each on its own
//! thread, the harness status device and `virtio-net-tap` devices ([`devices`]:
//! virtio-mmio slots, irqfd, ioeventfds, the device's event loop), and migrates or
//! live-updates it through baton's engine ([`control`], [`live`]). The pieces a
//! migration engine drives are public here:
//!
//! * [`Vm::ram`] → [`GuestRam::memfd`] / [`GuestRam::regions`]: the RAM memfd and its
//!   layout, to hand RAM to another process ([`GuestRam::from_memfd`] maps it there).
//! * [`Vm::pause`] / [`Vm::resume`]: all vCPUs out of / back into the guest.
//! * [`Vm::vcpu_state`] / [`Vm::set_vcpu_state`], [`Vm::vm_state`] /
//!   [`Vm::set_vm_state`]: the architectural state.
//! * [`Vm::new_incoming`]: a VM around RAM that already holds a running guest (a
//!   received memfd); restore the state into it and [`Vm::start`] it. The test
//!   `incoming_vm_continues_from_memfd_and_state` does a whole handover in-process.
//! * [`Vm::status`]: what the harness guest reports (passes, regions, exit).
//!
//! Why these choices: see DESIGN.md, "The KVM harness and this machine" (`kvm_pvm`:
//! only CPL3 code is fast, port I/O at CPL3 faults, `set_cpuid2` once, APs start
//! parked, VM teardown is slow).

pub mod boot;
pub mod control;
pub mod devices;
pub mod error;
mod lazy;
pub mod live;
pub mod memory;
pub mod mmio;
mod qmp;
pub mod state;
pub mod status;
mod vcpu;
pub mod vm;

pub use error::{Error, Result};
pub use memory::{GuestRam, RamRegion};
pub use state::{VcpuState, VmState};
pub use status::{GuestExit, GuestStatus, StatusLine, StatusState};
pub use vcpu::RunState;
pub use vm::{BootTimings, Vm, VmConfig};

/// Parses a size like `256M`, `1G`, `4096`, `0x1000` (K/M/G/T are binary multiples).
pub fn parse_size(s: &str) -> std::result::Result<u64, String> {
    let s = s.trim();
    let (num, shift) = match s.char_indices().last() {
        Some((i, 'k' | 'K')) => (&s[..i], 10),
        Some((i, 'm' | 'M')) => (&s[..i], 20),
        Some((i, 'g' | 'G')) => (&s[..i], 30),
        Some((i, 't' | 'T')) => (&s[..i], 40),
        _ => (s, 0),
    };
    let v = match num.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => num.parse(),
    }
    .map_err(|e| format!("bad size {s:?}: {e}"))?;
    v.checked_mul(1 << shift)
        .ok_or_else(|| format!("size {s:?} overflows"))
}

#[cfg(test)]
mod tests {
    #[test]
    fn sizes() {
        assert_eq!(super::parse_size("256M"), Ok(256 << 20));
        assert_eq!(super::parse_size("1g"), Ok(1 << 30));
        assert_eq!(super::parse_size("0x1000"), Ok(4096));
        assert_eq!(super::parse_size("12"), Ok(12));
        assert!(super::parse_size("M").is_err());
        assert!(super::parse_size("99999999999T").is_err());
    }
}
