//! The VM: KVM objects, memfd RAM, the boot, the devices and the vCPU threads, with
//! the controls a migration engine needs (pause/resume, vCPU and VM state, the RAM
//! memfd).
//!
//! Built in [`Vm::new`] (nothing runs yet: the image is loaded and every vCPU holds
//! its PVH entry state), started with [`Vm::start`], ended with [`Vm::stop`] or by
//! dropping it. Dropping KVM's VM takes ~15-25 ms on `kvm_pvm`, so keep it off any
//! downtime path (stop the threads first; drop later).

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kvm_bindings::{
    kvm_userspace_memory_region, CpuId, KVM_MAX_CPUID_ENTRIES, KVM_MP_STATE_RUNNABLE,
};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};

use crate::boot::{self, BootEntry};
use crate::devices::VmDevice;
use crate::error::{kvm_err, Error, Result};
use crate::memory::{GuestRam, TrackedMemory};
use crate::mmio::{MmioBus, MmioDevice};
use crate::state::{self, VcpuState, VmState};
use crate::status::{GuestExit, GuestStatus, StatusDevice, STATUS_BASE, STATUS_SIZE};
use crate::vcpu::{self, Control, ExitHandlers, RunState, VcpuThread};

/// Highest vCPU count (the harness guest has static per-CPU stacks for 4).
pub const MAX_CPUS: usize = 4;
/// How long pause/stop wait for the vCPU threads.
pub const PAUSE_TIMEOUT: Duration = Duration::from_secs(5);
const TSS_ADDR: u64 = 0xfffb_d000;

/// What to build.
#[derive(Clone, Debug)]
pub struct VmConfig {
    /// Guest RAM in bytes.
    pub memory: u64,
    pub cpus: usize,
    /// An ELF with a PVH entry note.
    pub kernel: PathBuf,
    /// Appended after baton-vmm's own `baton.console=mmio:...`, so it can override it.
    pub cmdline: String,
    /// Print guest status lines on stdout.
    pub echo: bool,
}

/// Durations of the bring-up steps.
#[derive(Clone, Copy, Debug, Default)]
pub struct BootTimings {
    pub create_vm: Duration,
    pub memory: Duration,
    pub load_kernel: Duration,
    pub vcpus: Duration,
}

/// A KVM virtual machine running a PVH guest.
pub struct Vm {
    /// First, so they are dropped (event loops joined) before the VM goes.
    devices: Vec<Box<dyn VmDevice>>,
    /// The devices' write-tracking view of `ram`, made with the first device.
    tracked: Option<TrackedMemory>,
    kvm: Kvm,
    vm: VmFd,
    ram: GuestRam,
    vcpus: Vec<Arc<Mutex<VcpuFd>>>,
    threads: Vec<VcpuThread>,
    ctl: Arc<Control>,
    handlers: ExitHandlers,
    msr_indices: Vec<u32>,
    boot: Option<BootEntry>,
    cmdline: String,
    timings: BootTimings,
}

impl Vm {
    /// Creates the VM, its RAM and vCPUs, and loads the kernel. Nothing runs yet.
    pub fn new(cfg: &VmConfig) -> Result<Vm> {
        let t = Instant::now();
        let ram = GuestRam::new(cfg.memory)?;
        let memory = t.elapsed();
        let cmdline = format!("baton.console=mmio:{STATUS_BASE:#x} {}", cfg.cmdline)
            .trim()
            .to_string();
        let mut vm = Self::build(ram, cfg.cpus, cfg.echo, Some((&cfg.kernel, cmdline)))?;
        vm.timings.memory += memory;
        Ok(vm)
    }

    /// Creates a VM around RAM that already holds a guest (e.g. a memfd received from
    /// the previous VMM process, mapped with [`GuestRam::from_memfd`]). Nothing is
    /// loaded and the vCPUs hold no meaningful state: restore it with
    /// [`Self::set_vm_state`] and [`Self::set_vcpu_state`] before [`Self::start`].
    pub fn new_incoming(ram: GuestRam, cpus: usize, echo: bool) -> Result<Vm> {
        Self::build(ram, cpus, echo, None)
    }

    fn build(
        ram: GuestRam,
        cpus: usize,
        echo: bool,
        kernel: Option<(&std::path::Path, String)>,
    ) -> Result<Vm> {
        if cpus == 0 || cpus > MAX_CPUS {
            return Err(Error::Config(format!(
                "--cpus must be 1..={MAX_CPUS}, not {cpus}"
            )));
        }
        let t = Instant::now();
        let kvm = Kvm::new().map_err(Error::OpenKvm)?;
        let vm = kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?;
        vm.set_tss_address(TSS_ADDR as usize)
            .map_err(kvm_err("KVM_SET_TSS_ADDR"))?;
        vm.create_irq_chip()
            .map_err(kvm_err("KVM_CREATE_IRQCHIP"))?;
        let mut timings = BootTimings {
            create_vm: t.elapsed(),
            ..Default::default()
        };

        let t = Instant::now();
        for (slot, r) in ram.regions().iter().enumerate() {
            let host = ram
                .host_addr(slot)
                .ok_or_else(|| Error::Memory(format!("region {r:?} is not mapped")))?;
            let region = kvm_userspace_memory_region {
                slot: slot as u32,
                flags: 0,
                guest_phys_addr: r.guest_addr,
                memory_size: r.size,
                userspace_addr: host,
            };
            // SAFETY: the mapping behind `host` lives in `ram`, which the Vm owns and
            // drops after `vm` (field order), so KVM never sees a dangling mapping.
            unsafe { vm.set_user_memory_region(region) }
                .map_err(kvm_err(format!("memory slot {slot} {r:?}")))?;
        }
        timings.memory = t.elapsed();

        let t = Instant::now();
        let (boot, cmdline) = match kernel {
            Some((path, cmdline)) => {
                let boot = boot::load_pvh(&ram, path, &cmdline)?;
                tracing::debug!(?boot, %cmdline, "kernel loaded");
                (Some(boot), cmdline)
            }
            None => (None, String::new()),
        };
        timings.load_kernel = t.elapsed();

        let t = Instant::now();
        let cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))?;
        let mut vcpus = Vec::with_capacity(cpus);
        for index in 0..cpus {
            let fd = vm.create_vcpu(index as u64).map_err(|source| Error::Vcpu {
                index,
                what: "create",
                source,
            })?;
            setup_vcpu(index, &fd, &cpuid, boot.as_ref())?;
            vcpus.push(fd);
        }
        let msr_indices = state::readable_msrs(&kvm, &vcpus[0])?;
        timings.vcpus = t.elapsed();

        let status = Arc::new(GuestStatus::new(echo));
        let status_dev = Arc::new(StatusDevice::new(ram.memory().clone(), status.clone()));
        let mut bus = MmioBus::default();
        bus.insert(STATUS_BASE, STATUS_SIZE, status_dev.clone())
            .map_err(Error::Config)?;
        let handlers = ExitHandlers {
            bus: Arc::new(bus),
            status_dev,
            status,
        };
        Ok(Vm {
            devices: Vec::new(),
            tracked: None,
            kvm,
            vm,
            ram,
            vcpus: vcpus.into_iter().map(|v| Arc::new(Mutex::new(v))).collect(),
            threads: Vec::new(),
            ctl: Control::new(RunState::Running),
            handlers,
            msr_indices,
            boot,
            cmdline,
            timings,
        })
    }

    /// Starts one thread per vCPU (in the running state unless paused before).
    pub fn start(&mut self) -> Result<()> {
        if !self.threads.is_empty() {
            return Err(Error::Config("the VM is already started".into()));
        }
        for (index, fd) in self.vcpus.iter().enumerate() {
            let t = vcpu::spawn(index, fd.clone(), self.ctl.clone(), self.handlers.clone())?;
            self.threads.push(t);
        }
        Ok(())
    }

    /// Starts the vCPU threads parked, for an incoming VM: its state is restored while
    /// they wait and [`Self::resume`] lets them run, so creating threads stays off a
    /// migration's downtime path.
    pub fn start_paused(&mut self) -> Result<()> {
        if self.is_started() {
            return Err(Error::Config("the VM is already started".into()));
        }
        self.ctl.set_want(RunState::Paused);
        self.start()?;
        vcpu::transition(&self.ctl, &self.threads, RunState::Paused, PAUSE_TIMEOUT)
    }

    /// Takes every vCPU out of the guest, then quiesces every device; returns once all
    /// vCPUs are parked and no device touches guest memory or its backend.
    pub fn pause(&self) -> Result<()> {
        vcpu::transition(&self.ctl, &self.threads, RunState::Paused, PAUSE_TIMEOUT)?;
        for d in &self.devices {
            d.quiesce();
        }
        Ok(())
    }

    /// Lets the devices and then the vCPUs run again.
    pub fn resume(&self) -> Result<()> {
        for d in &self.devices {
            d.resume();
        }
        vcpu::transition(&self.ctl, &self.threads, RunState::Running, PAUSE_TIMEOUT)
    }

    /// Guest memory for devices: a mapping of the RAM memfd that records the pages
    /// written through it, which [`Self::dirty_bitmap`] reports with KVM's log.
    pub fn tracked_memory(&mut self) -> Result<TrackedMemory> {
        if let Some(m) = &self.tracked {
            return Ok(m.clone());
        }
        let m = self.ram.tracked()?;
        self.tracked = Some(m.clone());
        Ok(m)
    }

    /// Puts `dev` at guest-physical `[base, base + size)`; only before [`Self::start`]
    /// (the vCPU threads share the bus from then on).
    pub fn add_mmio(&mut self, base: u64, size: u64, dev: Arc<dyn MmioDevice>) -> Result<()> {
        if self.is_started() {
            return Err(Error::Config(format!(
                "MMIO device at {base:#x}: devices must be added before the VM starts"
            )));
        }
        Arc::get_mut(&mut self.handlers.bus)
            .ok_or_else(|| Error::Config("the MMIO bus is shared already".into()))?
            .insert(base, size, dev)
            .map_err(Error::Config)
    }

    /// Adds a device to the ones paused, resumed and migrated with the VM.
    pub fn add_device(&mut self, dev: Box<dyn VmDevice>) {
        self.devices.push(dev);
    }

    /// The VM's devices, in the order they were added.
    pub fn devices(&self) -> &[Box<dyn VmDevice>] {
        &self.devices
    }

    /// Whether the vCPUs are (asked to be) paused.
    pub fn is_paused(&self) -> bool {
        self.ctl.want() == RunState::Paused
    }

    /// Ends the vCPU threads (the VM can no longer run). Idempotent.
    pub fn stop(&mut self) -> Result<()> {
        let r = vcpu::transition(&self.ctl, &self.threads, RunState::Stopping, PAUSE_TIMEOUT);
        for t in self.threads.drain(..) {
            if t.handle.is_finished() {
                let _ = t.handle.join();
            }
        }
        r
    }

    fn paused_vcpu(
        &self,
        index: usize,
        what: &'static str,
    ) -> Result<std::sync::MutexGuard<'_, VcpuFd>> {
        if !self.threads.is_empty() && self.ctl.want() == RunState::Running {
            return Err(Error::NotPaused(what));
        }
        let fd = self.vcpus.get(index).ok_or(Error::NoSuchVcpu(index))?;
        Ok(fd.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// The state of vCPU `index` (the VM must be paused, stopped or not started).
    pub fn vcpu_state(&self, index: usize) -> Result<VcpuState> {
        let fd = self.paused_vcpu(index, "reading vCPU state")?;
        state::get_vcpu_state(index, &fd, &self.msr_indices)
    }

    /// Replaces the state of vCPU `index` (same conditions as [`Self::vcpu_state`]).
    pub fn set_vcpu_state(&self, index: usize, s: &VcpuState) -> Result<()> {
        let fd = self.paused_vcpu(index, "writing vCPU state")?;
        state::set_vcpu_state(index, &fd, s)
    }

    /// The in-kernel irqchip and clock state.
    pub fn vm_state(&self) -> Result<VmState> {
        state::get_vm_state(&self.vm)
    }

    /// Restores the in-kernel irqchip and clock state.
    pub fn set_vm_state(&self, s: &VmState) -> Result<()> {
        state::set_vm_state(&self.vm, s)
    }

    /// Whether [`Self::start`] ran (the vCPU threads exist).
    pub fn is_started(&self) -> bool {
        !self.threads.is_empty()
    }

    /// Turns KVM dirty-page logging on or off for every RAM slot.
    pub fn set_dirty_logging(&self, on: bool) -> Result<()> {
        for (slot, r) in self.ram.regions().iter().enumerate() {
            let host = self
                .ram
                .host_addr(slot)
                .ok_or_else(|| Error::Memory(format!("region {r:?} is not mapped")))?;
            let region = kvm_userspace_memory_region {
                slot: slot as u32,
                flags: if on {
                    kvm_bindings::KVM_MEM_LOG_DIRTY_PAGES
                } else {
                    0
                },
                guest_phys_addr: r.guest_addr,
                memory_size: r.size,
                userspace_addr: host,
            };
            // SAFETY: the same mapping as registered at build time, still owned by `ram`.
            unsafe { self.vm.set_user_memory_region(region) }
                .map_err(kvm_err(format!("dirty logging on slot {slot}")))?;
        }
        if on {
            for bitmap in self.tracked_bitmaps() {
                bitmap.reset();
            }
        }
        Ok(())
    }

    fn tracked_bitmaps(&self) -> Vec<&vm_memory::bitmap::AtomicBitmap> {
        use vm_memory::GuestMemoryBackend;
        let Some(m) = &self.tracked else {
            return Vec::new();
        };
        m.iter()
            .map(|r| {
                let mapping: &vm_memory::MmapRegion<_> = r;
                mapping.bitmap()
            })
            .collect()
    }

    /// The pages of RAM slot `slot` written by the guest or a device since the last call
    /// (both logs are cleared as they are read); bit `n` of word `w` is page `64 w + n`
    /// of the slot.
    pub fn dirty_bitmap(&self, slot: usize) -> Result<Vec<u64>> {
        let r = self
            .ram
            .regions()
            .get(slot)
            .ok_or_else(|| Error::Memory(format!("no RAM slot {slot}")))?;
        let mut map = self
            .vm
            .get_dirty_log(slot as u32, r.size as usize)
            .map_err(kvm_err(format!("KVM_GET_DIRTY_LOG slot {slot}")))?;
        if let Some(bitmap) = self.tracked_bitmaps().get(slot) {
            for (w, d) in map.iter_mut().zip(bitmap.get_and_reset()) {
                *w |= d;
            }
        }
        Ok(map)
    }

    /// Guest RAM (its memfd and layout).
    pub fn ram(&self) -> &GuestRam {
        &self.ram
    }

    /// What the guest reported.
    pub fn status(&self) -> &Arc<GuestStatus> {
        &self.handlers.status
    }

    /// Waits for the guest to end (EXIT or a fatal vCPU exit).
    pub fn wait_exit(&self, timeout: Duration) -> Option<GuestExit> {
        self.status()
            .wait_until(timeout, |s| s.exit.is_some())
            .0
            .exit
    }

    pub fn cpus(&self) -> usize {
        self.vcpus.len()
    }

    /// The VM file descriptor (memory slots, dirty log, irqfd...).
    pub fn vm_fd(&self) -> &VmFd {
        &self.vm
    }

    pub fn kvm(&self) -> &Kvm {
        &self.kvm
    }

    /// Where the kernel was entered (None for an incoming VM).
    pub fn boot_entry(&self) -> Option<BootEntry> {
        self.boot
    }

    /// The command line the guest got.
    pub fn cmdline(&self) -> &str {
        &self.cmdline
    }

    pub fn timings(&self) -> BootTimings {
        self.timings
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        if let Err(e) = self.stop() {
            tracing::warn!("stopping vCPUs: {e}");
        }
    }
}

/// CPUID (once: `kvm_pvm` ignores later calls), then the PVH entry state.
fn setup_vcpu(
    index: usize,
    fd: &VcpuFd,
    supported: &CpuId,
    boot: Option<&BootEntry>,
) -> Result<()> {
    let e = |what| {
        move |source| Error::Vcpu {
            index,
            what,
            source,
        }
    };
    let mut cpuid = supported.clone();
    for entry in cpuid.as_mut_slice() {
        match entry.function {
            // Initial APIC ID in EBX[31:24].
            1 => entry.ebx = (entry.ebx & 0x00ff_ffff) | ((index as u32) << 24),
            // x2APIC ID of the topology leaves.
            0xb | 0x1f => entry.edx = index as u32,
            _ => {}
        }
    }
    fd.set_cpuid2(&cpuid).map_err(e("set CPUID"))?;
    let Some(boot) = boot else {
        return Ok(());
    };
    let sregs = fd.get_sregs().map_err(e("get sregs"))?;
    fd.set_sregs(&boot::entry_sregs(sregs))
        .map_err(e("set sregs"))?;
    fd.set_regs(&boot::entry_regs(boot))
        .map_err(e("set regs"))?;
    let fpu = kvm_bindings::kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    fd.set_fpu(&fpu).map_err(e("set FPU"))?;
    if index > 0 {
        // An AP would wait for INIT/SIPI; baton starts it at the PVH entry directly.
        let mp = kvm_bindings::kvm_mp_state {
            mp_state: KVM_MP_STATE_RUNNABLE,
        };
        fd.set_mp_state(mp).map_err(e("set MP state"))?;
    }
    Ok(())
}
