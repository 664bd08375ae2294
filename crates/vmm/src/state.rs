//! Getting and setting a vCPU's and the VM's architectural state.
//!
//! This is what a migration engine moves: for each vCPU the general and segment
//! registers, FPU/xsave and XCRs, the LAPIC, the MSRs KVM lets us read, pending events
//! and the MP state; for the VM the in-kernel irqchip (PIC x2, IOAPIC) and kvmclock.
//! The restore order follows Cloud Hypervisor's (MP state and registers first, MSRs
//! after the LAPIC, events last), which `kvm_pvm` was measured to continue from
//! exactly. CPUID is not part of the state: it is set once when the vCPU is created
//! (`kvm_pvm` accepts `set_cpuid2` only before the first `KVM_RUN`), so the
//! destination must be created with the same CPUID.

use kvm_bindings::{
    kvm_clock_data, kvm_fpu, kvm_irqchip, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_regs,
    kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, Msrs, KVM_IRQCHIP_IOAPIC,
    KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};

use crate::error::{Error, Result};

/// The architectural state of one vCPU.
#[derive(Clone)]
pub struct VcpuState {
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    pub fpu: kvm_fpu,
    /// The 4 KiB legacy `kvm_xsave` region (KVM_GET_XSAVE).
    pub xsave: Box<[u32; 1024]>,
    pub xcrs: kvm_xcrs,
    pub lapic: kvm_lapic_state,
    pub msrs: Vec<kvm_msr_entry>,
    pub events: kvm_vcpu_events,
    pub mp_state: kvm_mp_state,
}

impl std::fmt::Debug for VcpuState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VcpuState")
            .field("rip", &format_args!("{:#x}", self.regs.rip))
            .field("rsp", &format_args!("{:#x}", self.regs.rsp))
            .field("cr3", &format_args!("{:#x}", self.sregs.cr3))
            .field("msrs", &self.msrs.len())
            .field("mp_state", &self.mp_state.mp_state)
            .finish_non_exhaustive()
    }
}

/// The VM-wide state KVM holds in the kernel.
#[derive(Clone)]
pub struct VmState {
    /// PIC master, PIC slave, IOAPIC.
    pub irqchips: [kvm_irqchip; 3],
    pub clock: kvm_clock_data,
}

const IRQCHIP_IDS: [u32; 3] = [
    KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE,
    KVM_IRQCHIP_IOAPIC,
];
/// KVM's limit on MSRs per KVM_GET/SET_MSRS call.
const MSR_CHUNK: usize = 256;

fn vcpu_err(index: usize, what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> Error {
    move |source| Error::Vcpu {
        index,
        what,
        source,
    }
}

fn msrs_of(indices: &[u32]) -> Result<Msrs> {
    let entries: Vec<kvm_msr_entry> = indices
        .iter()
        .map(|&index| kvm_msr_entry {
            index,
            ..Default::default()
        })
        .collect();
    Msrs::from_entries(&entries).map_err(|e| Error::Config(format!("building an MSR list: {e:?}")))
}

/// The MSRs of KVM's index list that this vCPU can actually read (probed once).
pub fn readable_msrs(kvm: &Kvm, vcpu: &VcpuFd) -> Result<Vec<u32>> {
    let list = kvm
        .get_msr_index_list()
        .map_err(crate::error::kvm_err("KVM_GET_MSR_INDEX_LIST"))?;
    let mut pending: Vec<u32> = list.as_slice().to_vec();
    let mut ok = Vec::with_capacity(pending.len());
    while !pending.is_empty() {
        let take = pending.len().min(MSR_CHUNK);
        let mut msrs = msrs_of(&pending[..take])?;
        let n = vcpu
            .get_msrs(&mut msrs)
            .map_err(vcpu_err(0, "probing MSRs"))?;
        ok.extend_from_slice(&pending[..n]);
        // KVM stops at the first MSR it cannot read: skip it and go on.
        let skip = if n < take { n + 1 } else { n };
        if n < take {
            tracing::debug!(
                msr = format_args!("{:#x}", pending[n]),
                "MSR not readable, not migrated"
            );
        }
        pending.drain(..skip);
    }
    Ok(ok)
}

/// Reads the state of a (stopped) vCPU.
pub fn get_vcpu_state(index: usize, vcpu: &VcpuFd, msr_indices: &[u32]) -> Result<VcpuState> {
    let e = |what| vcpu_err(index, what);
    let mut msrs = Vec::with_capacity(msr_indices.len());
    for chunk in msr_indices.chunks(MSR_CHUNK) {
        let mut m = msrs_of(chunk)?;
        let n = vcpu.get_msrs(&mut m).map_err(e("get MSRs"))?;
        if n != chunk.len() {
            return Err(Error::Config(format!(
                "vCPU {index}: read {n} of {} MSRs",
                chunk.len()
            )));
        }
        msrs.extend_from_slice(m.as_slice());
    }
    Ok(VcpuState {
        mp_state: vcpu.get_mp_state().map_err(e("get MP state"))?,
        regs: vcpu.get_regs().map_err(e("get regs"))?,
        sregs: vcpu.get_sregs().map_err(e("get sregs"))?,
        fpu: vcpu.get_fpu().map_err(e("get FPU"))?,
        xsave: Box::new(vcpu.get_xsave().map_err(e("get xsave"))?.region),
        xcrs: vcpu.get_xcrs().map_err(e("get XCRs"))?,
        lapic: vcpu.get_lapic().map_err(e("get LAPIC"))?,
        msrs,
        events: vcpu.get_vcpu_events().map_err(e("get vCPU events"))?,
    })
}

/// Writes the state of a (stopped) vCPU.
pub fn set_vcpu_state(index: usize, vcpu: &VcpuFd, s: &VcpuState) -> Result<()> {
    let e = |what| vcpu_err(index, what);
    vcpu.set_mp_state(s.mp_state).map_err(e("set MP state"))?;
    vcpu.set_regs(&s.regs).map_err(e("set regs"))?;
    vcpu.set_sregs(&s.sregs).map_err(e("set sregs"))?;
    vcpu.set_fpu(&s.fpu).map_err(e("set FPU"))?;
    // SAFETY: `kvm_xsave` is the fixed 4 KiB legacy layout that KVM_GET_XSAVE fills;
    // KVM_SET_XSAVE reads exactly that much.
    let xsave = kvm_xsave {
        region: *s.xsave,
        ..Default::default()
    };
    // SAFETY: as above; `extra` is empty.
    unsafe { vcpu.set_xsave(&xsave) }.map_err(e("set xsave"))?;
    vcpu.set_xcrs(&s.xcrs).map_err(e("set XCRs"))?;
    vcpu.set_lapic(&s.lapic).map_err(e("set LAPIC"))?;
    for chunk in s.msrs.chunks(MSR_CHUNK) {
        let m =
            Msrs::from_entries(chunk).map_err(|err| Error::Config(format!("MSR list: {err:?}")))?;
        let n = vcpu.set_msrs(&m).map_err(e("set MSRs"))?;
        if n != chunk.len() {
            let bad = chunk.get(n).map(|m| m.index).unwrap_or(0);
            return Err(Error::Config(format!(
                "vCPU {index}: KVM refused MSR {bad:#x} ({n} of {} set)",
                chunk.len()
            )));
        }
    }
    vcpu.set_vcpu_events(&s.events)
        .map_err(e("set vCPU events"))?;
    Ok(())
}

/// Reads the VM-wide state.
pub fn get_vm_state(vm: &VmFd) -> Result<VmState> {
    let mut irqchips = IRQCHIP_IDS.map(|chip_id| kvm_irqchip {
        chip_id,
        ..Default::default()
    });
    for chip in &mut irqchips {
        vm.get_irqchip(chip).map_err(crate::error::kvm_err(format!(
            "KVM_GET_IRQCHIP {}",
            chip.chip_id
        )))?;
    }
    let clock = vm
        .get_clock()
        .map_err(crate::error::kvm_err("KVM_GET_CLOCK"))?;
    Ok(VmState { irqchips, clock })
}

/// Writes the VM-wide state.
pub fn set_vm_state(vm: &VmFd, s: &VmState) -> Result<()> {
    for chip in &s.irqchips {
        vm.set_irqchip(chip).map_err(crate::error::kvm_err(format!(
            "KVM_SET_IRQCHIP {}",
            chip.chip_id
        )))?;
    }
    // Only the clock value is restored; the flags/TSC fields describe the source host.
    let clock = kvm_clock_data {
        clock: s.clock.clock,
        ..Default::default()
    };
    vm.set_clock(&clock)
        .map_err(crate::error::kvm_err("KVM_SET_CLOCK"))?;
    Ok(())
}
