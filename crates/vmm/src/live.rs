//! What the migration engine needs from this VMM: the machine's own state as a device
//! (vCPUs, irqchip, clock), guest RAM as engine RAM (readable, writable, handed over by
//! memfd), KVM's dirty log, and vCPU pause/resume.
//!
//! Every piece reaches the KVM VM through one shared [`VmSlot`], because on an incoming
//! local update the VM does not exist yet: it is built around the source's memfd when that
//! arrives, during the setup phase, so KVM and vCPU creation stay off the downtime path.

use std::fs::File;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::{Arc, Mutex, MutexGuard};

use baton_migration::{
    DirtyLog, GuestRam as EngineRam, IncomingRam, RamLayout, RamRegion, VmControl,
};
use baton_qdev::{DeviceMigrationError, Hook, Migratable};
use baton_vmstate::{VmState as _, VmStateDescription, VmStateError};
use kvm_bindings::{
    kvm_clock_data, kvm_fpu, kvm_irqchip, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_regs,
    kvm_sregs, kvm_vcpu_events, kvm_xcrs,
};
use vm_memory::{Bytes, GuestAddress};

use crate::devices::DevicePlan;
use crate::memory::{self, GuestRam};
use crate::state::{VcpuState, VmState};
use crate::vm::Vm;

/// The VM, shared by the engine's pieces; `None` until an incoming VM is built.
#[derive(Clone, Default)]
pub struct VmSlot(Arc<Mutex<Option<Vm>>>);

impl VmSlot {
    pub fn new(vm: Option<Vm>) -> Self {
        VmSlot(Arc::new(Mutex::new(vm)))
    }

    pub fn lock(&self) -> MutexGuard<'_, Option<Vm>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn with<T>(&self, f: impl FnOnce(&Vm) -> Result<T, String>) -> Result<T, String> {
        match self.lock().as_ref() {
            Some(vm) => f(vm),
            None => Err("the VM does not exist yet".into()),
        }
    }
}

fn pod_bytes<T: Copy>(t: &T) -> Vec<u8> {
    // SAFETY: T is a plain C struct from kvm-bindings; reading its bytes is defined.
    unsafe { std::slice::from_raw_parts((t as *const T).cast::<u8>(), std::mem::size_of::<T>()) }
        .to_vec()
}

fn pod_from<T: Copy + Default>(b: &[u8], field: &str) -> Result<T, VmStateError> {
    if b.len() != std::mem::size_of::<T>() {
        return Err(VmStateError::invalid(
            field,
            format!("{} bytes, expected {}", b.len(), std::mem::size_of::<T>()),
        ));
    }
    let mut t = T::default();
    // SAFETY: lengths match; kvm-bindings structs are integers and unions of integers, for
    // which every bit pattern is a value (KVM itself checks the semantics on restore).
    unsafe { std::ptr::copy_nonoverlapping(b.as_ptr(), (&mut t as *mut T).cast::<u8>(), b.len()) };
    Ok(t)
}

#[derive(baton_vmstate::VmState, Debug, Default, Clone, PartialEq)]
#[vmstate(name = "baton-vmm/msr", version = 1)]
pub struct MsrWire {
    pub index: u32,
    pub data: u64,
}

/// One vCPU's KVM state; each blob is a kvm-bindings struct, length-checked on load.
#[derive(baton_vmstate::VmState, Debug, Default, Clone, PartialEq)]
#[vmstate(name = "baton-vmm/vcpu", version = 1)]
pub struct VcpuWire {
    #[vmstate(max = 1024)]
    pub regs: Vec<u8>,
    #[vmstate(max = 1024)]
    pub sregs: Vec<u8>,
    #[vmstate(max = 1024)]
    pub fpu: Vec<u8>,
    #[vmstate(max = 4096)]
    pub xsave: Vec<u8>,
    #[vmstate(max = 1024)]
    pub xcrs: Vec<u8>,
    #[vmstate(max = 2048)]
    pub lapic: Vec<u8>,
    #[vmstate(max = 1024)]
    pub msrs: Vec<MsrWire>,
    #[vmstate(max = 256)]
    pub events: Vec<u8>,
    pub mp_state: u32,
}

/// The machine: every vCPU, the in-kernel irqchip and the clock.
#[derive(baton_vmstate::VmState, Debug, Default, Clone, PartialEq)]
#[vmstate(name = "baton-vmm/machine", version = 1)]
pub struct MachineWire {
    #[vmstate(max = 4)]
    pub vcpus: Vec<VcpuWire>,
    #[vmstate(max = 1024)]
    pub pic_master: Vec<u8>,
    #[vmstate(max = 1024)]
    pub pic_slave: Vec<u8>,
    #[vmstate(max = 1024)]
    pub ioapic: Vec<u8>,
    #[vmstate(max = 256)]
    pub clock: Vec<u8>,
}

impl VcpuWire {
    fn of(s: &VcpuState) -> Self {
        VcpuWire {
            regs: pod_bytes(&s.regs),
            sregs: pod_bytes(&s.sregs),
            fpu: pod_bytes(&s.fpu),
            xsave: pod_bytes(&*s.xsave),
            xcrs: pod_bytes(&s.xcrs),
            lapic: pod_bytes(&s.lapic),
            msrs: s
                .msrs
                .iter()
                .map(|m| MsrWire {
                    index: m.index,
                    data: m.data,
                })
                .collect(),
            events: pod_bytes(&s.events),
            mp_state: s.mp_state.mp_state,
        }
    }

    fn to_state(&self) -> Result<VcpuState, VmStateError> {
        let xsave: [u32; 1024] = {
            if self.xsave.len() != 4096 {
                return Err(VmStateError::invalid(
                    "xsave",
                    format!("{} bytes, expected 4096", self.xsave.len()),
                ));
            }
            let mut a = [0u32; 1024];
            for (w, c) in a.iter_mut().zip(self.xsave.chunks_exact(4)) {
                *w = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            }
            a
        };
        Ok(VcpuState {
            regs: pod_from::<kvm_regs>(&self.regs, "regs")?,
            sregs: pod_from::<kvm_sregs>(&self.sregs, "sregs")?,
            fpu: pod_from::<kvm_fpu>(&self.fpu, "fpu")?,
            xsave: Box::new(xsave),
            xcrs: pod_from::<kvm_xcrs>(&self.xcrs, "xcrs")?,
            lapic: pod_from::<kvm_lapic_state>(&self.lapic, "lapic")?,
            msrs: self
                .msrs
                .iter()
                .map(|m| kvm_msr_entry {
                    index: m.index,
                    data: m.data,
                    ..Default::default()
                })
                .collect(),
            events: pod_from::<kvm_vcpu_events>(&self.events, "events")?,
            mp_state: kvm_mp_state {
                mp_state: self.mp_state,
            },
        })
    }
}

/// The machine's own state as a device (id `machine`).
pub struct MachineDevice {
    vm: VmSlot,
    cpus: usize,
}

impl MachineDevice {
    pub fn new(vm: VmSlot, cpus: usize) -> Self {
        MachineDevice { vm, cpus }
    }

    fn refuse(&self, hook: Hook, e: impl std::fmt::Display) -> DeviceMigrationError {
        DeviceMigrationError::refused("machine", hook, e.to_string())
    }
}

impl Migratable for MachineDevice {
    fn id(&self) -> &str {
        "machine"
    }

    fn vmsd(&self) -> &'static VmStateDescription {
        MachineWire::vmsd()
    }

    fn save(&mut self) -> Result<Vec<u8>, DeviceMigrationError> {
        let w = self
            .vm
            .with(|vm| {
                let vcpus = (0..vm.cpus())
                    .map(|i| vm.vcpu_state(i).map(|s| VcpuWire::of(&s)))
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| e.to_string())?;
                let st = vm.vm_state().map_err(|e| e.to_string())?;
                Ok(MachineWire {
                    vcpus,
                    pic_master: pod_bytes(&st.irqchips[0]),
                    pic_slave: pod_bytes(&st.irqchips[1]),
                    ioapic: pod_bytes(&st.irqchips[2]),
                    clock: pod_bytes(&st.clock),
                })
            })
            .map_err(|e| self.refuse(Hook::Save, e))?;
        Ok(w.save())
    }

    fn load(&mut self, version_id: u32, state: &[u8]) -> Result<(), DeviceMigrationError> {
        let w = MachineWire::load(state, version_id)
            .map_err(|e| DeviceMigrationError::state("machine", Hook::Load, e))?;
        if w.vcpus.len() != self.cpus {
            return Err(DeviceMigrationError::state(
                "machine",
                Hook::Load,
                VmStateError::invalid(
                    "vcpus",
                    format!("{} vCPUs, this VM has {}", w.vcpus.len(), self.cpus),
                ),
            ));
        }
        let st = |e: VmStateError| DeviceMigrationError::state("machine", Hook::Load, e);
        let vcpus = w
            .vcpus
            .iter()
            .enumerate()
            .map(|(i, v)| v.to_state().map_err(|e| e.in_index(i).in_field("vcpus")))
            .collect::<Result<Vec<_>, _>>()
            .map_err(st)?;
        let vm_state = VmState {
            irqchips: [
                pod_from::<kvm_irqchip>(&w.pic_master, "pic_master").map_err(st)?,
                pod_from::<kvm_irqchip>(&w.pic_slave, "pic_slave").map_err(st)?,
                pod_from::<kvm_irqchip>(&w.ioapic, "ioapic").map_err(st)?,
            ],
            clock: pod_from::<kvm_clock_data>(&w.clock, "clock").map_err(st)?,
        };
        self.vm
            .with(|vm| {
                vm.set_vm_state(&vm_state).map_err(|e| e.to_string())?;
                for (i, s) in vcpus.iter().enumerate() {
                    vm.set_vcpu_state(i, s)
                        .map_err(|e| format!("vCPU {i}: {e}"))?;
                }
                Ok(())
            })
            .map_err(|e| self.refuse(Hook::Load, e))
    }
}

/// vCPU control for the engine: pause (vCPUs, then devices quiesced) and resume. On a
/// destination the first resume runs the restored VM (its threads were started parked
/// when it was built) and lets its devices catch up with what the guest queued.
pub struct VcpuControl {
    slot: VmSlot,
    incoming: bool,
}

impl VcpuControl {
    /// For a migration source (resume = roll back to running).
    pub fn source(slot: VmSlot) -> Self {
        VcpuControl {
            slot,
            incoming: false,
        }
    }

    /// For a destination (resume = run the restored VM).
    pub fn destination(slot: VmSlot) -> Self {
        VcpuControl {
            slot,
            incoming: true,
        }
    }
}

impl VmControl for VcpuControl {
    fn pause(&mut self) -> Result<(), String> {
        self.slot.with(|vm| vm.pause().map_err(|e| e.to_string()))
    }

    fn resume(&mut self) -> Result<(), String> {
        let mut g = self.slot.lock();
        let vm = g.as_mut().ok_or("the VM does not exist")?;
        // Devices first: their catch-up runs before the vCPUs take a CPU.
        if std::mem::take(&mut self.incoming) {
            for d in vm.devices() {
                d.restored();
            }
        }
        if vm.is_started() {
            vm.resume().map_err(|e| e.to_string())
        } else {
            vm.start().map_err(|e| e.to_string())
        }
    }
}

/// KVM's dirty log as an engine dirty-page source.
pub struct KvmDirtyLog(pub VmSlot);

impl DirtyLog for KvmDirtyLog {
    fn start(&mut self) -> Result<(), String> {
        self.0.with(|vm| {
            vm.set_dirty_logging(true).map_err(|e| e.to_string())?;
            // Start from a clean log.
            for slot in 0..vm.ram().regions().len() {
                vm.dirty_bitmap(slot).map_err(|e| e.to_string())?;
            }
            Ok(())
        })
    }

    fn collect(&mut self, bitmaps: &mut [Vec<u64>]) -> Result<(), String> {
        self.0.with(|vm| {
            for (slot, out) in bitmaps.iter_mut().enumerate() {
                for (o, w) in out
                    .iter_mut()
                    .zip(vm.dirty_bitmap(slot).map_err(|e| e.to_string())?)
                {
                    *o |= w;
                }
            }
            Ok(())
        })
    }

    fn stop(&mut self) {
        let _ = self
            .0
            .with(|vm| vm.set_dirty_logging(false).map_err(|e| e.to_string()));
    }
}

/// Guest RAM as engine RAM. On an incoming local update it starts empty and builds the
/// VM, with its devices in incoming mode, around the received memfd.
pub struct VmRam {
    slot: VmSlot,
    size: u64,
    cpus: usize,
    echo: bool,
    devices: DevicePlan,
    memory: Option<vm_memory::GuestMemoryMmap>,
    memfd: Option<File>,
    regions: Vec<memory::RamRegion>,
}

impl VmRam {
    /// RAM of an existing VM (the source, or an incoming VM with its own fresh RAM).
    pub fn of(slot: &VmSlot) -> Result<Self, String> {
        let g = slot.lock();
        let vm = g.as_ref().ok_or("the VM does not exist")?;
        let ram: &GuestRam = vm.ram();
        Ok(VmRam {
            slot: slot.clone(),
            size: ram.size(),
            cpus: vm.cpus(),
            echo: false,
            devices: DevicePlan::default(),
            memory: Some(ram.memory().clone()),
            memfd: Some(
                ram.memfd()
                    .try_clone()
                    .map_err(|e| format!("dup of the RAM memfd: {e}"))?,
            ),
            regions: ram.regions().to_vec(),
        })
    }

    /// RAM that arrives by fd; `adopt_memfds` builds the VM into `slot` and attaches
    /// `devices` to it (in incoming mode: they open nothing).
    pub fn incoming(
        slot: &VmSlot,
        size: u64,
        cpus: usize,
        echo: bool,
        devices: DevicePlan,
    ) -> Self {
        VmRam {
            slot: slot.clone(),
            size,
            cpus,
            echo,
            devices,
            memory: None,
            memfd: None,
            regions: memory::layout(size),
        }
    }

    fn locate(&self, region: usize, offset: u64, len: usize) -> Result<GuestAddress, String> {
        let r = self
            .regions
            .get(region)
            .ok_or_else(|| format!("no RAM region {region}"))?;
        match offset.checked_add(len as u64) {
            Some(end) if end <= r.size => Ok(GuestAddress(r.guest_addr + offset)),
            _ => Err(format!(
                "region {region}: {len} bytes at {offset:#x} exceed its {} bytes",
                r.size
            )),
        }
    }
}

impl EngineRam for VmRam {
    fn layout(&self) -> RamLayout {
        RamLayout {
            regions: self
                .regions
                .iter()
                .map(|r| RamRegion {
                    gpa: r.guest_addr,
                    size: r.size,
                })
                .collect(),
        }
    }

    fn read(&self, region: usize, offset: u64, out: &mut [u8]) -> Result<(), String> {
        let a = self.locate(region, offset, out.len())?;
        let m = self.memory.as_ref().ok_or("guest RAM is not mapped yet")?;
        m.read_slice(out, a).map_err(|e| e.to_string())
    }

    fn write(&self, region: usize, offset: u64, data: &[u8]) -> Result<(), String> {
        let a = self.locate(region, offset, data.len())?;
        let m = self.memory.as_ref().ok_or("guest RAM is not mapped yet")?;
        m.write_slice(data, a).map_err(|e| e.to_string())
    }

    fn memfd(&self, _region: usize) -> Option<BorrowedFd<'_>> {
        // One memfd holds every region, at the offsets of `memory::layout`.
        self.memfd.as_ref().map(|f| f.as_fd())
    }
}

impl IncomingRam for VmRam {
    fn adopt_memfds(&mut self, fds: Vec<OwnedFd>) -> Result<(), String> {
        let mut files = fds.into_iter().map(File::from);
        let first = files.next().ok_or("no memfd received")?;
        let id = |f: &File| -> Result<(u64, u64), String> {
            use std::os::unix::fs::MetadataExt;
            let m = f.metadata().map_err(|e| format!("fstat: {e}"))?;
            if !m.file_type().is_file() {
                return Err("a received RAM fd is not a memfd or file".into());
            }
            Ok((m.dev(), m.ino()))
        };
        let first_id = id(&first)?;
        for f in files {
            if id(&f)? != first_id {
                return Err("the RAM fds are not all the same memfd".into());
            }
        }
        let ram = GuestRam::from_memfd(first, self.size).map_err(|e| e.to_string())?;
        self.memory = Some(ram.memory().clone());
        self.memfd = Some(ram.memfd().try_clone().map_err(|e| e.to_string())?);
        let mut vm = Vm::new_incoming(ram, self.cpus, self.echo).map_err(|e| e.to_string())?;
        self.devices
            .attach(&mut vm, baton_virtio_net_tap::BackendMode::Incoming)
            .map_err(|e| e.to_string())?;
        vm.start_paused().map_err(|e| e.to_string())?;
        *self.slot.lock() = Some(vm);
        Ok(())
    }
}
