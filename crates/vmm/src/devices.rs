//! The VM's devices: resolving `--device`/`--global` into a [`DevicePlan`], placing each
//! virtio-mmio device in the 32-bit MMIO hole with an IOAPIC GSI, and wiring a
//! `virtio-net-tap` into a [`Vm`] (MMIO window on the bus, KVM irqfd on its GSI, KVM
//! ioeventfds for its queue notifications, and the device's own event loop).
//!
//! Placement is by position: the n-th virtio device gets [`MmioSlot::nth`]`(n)`, and the
//! guest learns it from `virtio_mmio.device=512@BASE:GSI` on its command line (Linux's
//! syntax, which QEMU's microvm writes too). A migration destination must therefore be
//! given the same `--device` list in the same order; the handshake checks the ids.
//!
//! Why the device sees guest memory through [`TrackedMemory`]: in a remote migration
//! the pages a device writes (received frames, used rings) must be sent again like the
//! pages the guest writes, and KVM's dirty log only sees the guest's writes.

use std::sync::Arc;
use std::time::Duration;

use baton_machine_types::MachineType;
use baton_migration::Capabilities;
use baton_qdev::{DeviceRegistry, DeviceSpec, GlobalProperty, Migratable, PropertyResolver};
use baton_virtio::regs::MMIO_WINDOW_SIZE;
use baton_virtio_net_tap::{
    backend::VNET_HDR_LEN, BackendMode, NetWorker, VirtioNetTap, VirtioNetTapConfig,
};
use kvm_ioctls::IoEventAddress;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::error::{kvm_err, Error, Result};
use crate::memory::TrackedMemory;
use crate::mmio::MmioDevice;
use crate::vm::Vm;

/// First virtio-mmio window (in the hole between low RAM and the IOAPIC).
pub const VIRTIO_MMIO_BASE: u64 = 0xd000_0000;
/// Distance between two windows (each is `MMIO_WINDOW_SIZE` = 0x200 bytes).
pub const VIRTIO_MMIO_STRIDE: u64 = 0x1000;
/// First GSI: the IOAPIC pins above the legacy PIC's 16 (KVM's default routing).
pub const VIRTIO_FIRST_GSI: u32 = 16;
/// GSIs 16..=23: the in-kernel IOAPIC has 24 pins.
pub const MAX_VIRTIO_DEVICES: usize = 8;

/// A virtio-net-tap device as baton-vmm holds it.
pub type Net = VirtioNetTap<TrackedMemory>;

/// Where a virtio-mmio device lives: its window and its interrupt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MmioSlot {
    pub base: u64,
    pub gsi: u32,
}

impl MmioSlot {
    /// The slot of the `n`-th virtio device, if there is one.
    pub fn nth(n: usize) -> Option<MmioSlot> {
        (n < MAX_VIRTIO_DEVICES).then(|| MmioSlot {
            base: VIRTIO_MMIO_BASE + n as u64 * VIRTIO_MMIO_STRIDE,
            gsi: VIRTIO_FIRST_GSI + n as u32,
        })
    }

    /// The guest command-line word announcing this slot.
    pub fn cmdline(&self) -> String {
        format!(
            "virtio_mmio.device={MMIO_WINDOW_SIZE}@{:#x}:{}",
            self.base, self.gsi
        )
    }
}

/// One `--device virtio-net-tap`: its id, resolved configuration and slot.
#[derive(Clone, Debug)]
pub struct NetSpec {
    pub id: String,
    pub config: VirtioNetTapConfig,
    pub slot: MmioSlot,
}

/// The devices of a VM, resolved from the command line.
#[derive(Clone, Debug, Default)]
pub struct DevicePlan {
    pub nets: Vec<NetSpec>,
    /// The `--global`s, kept for QMP `device-list-properties`.
    pub globals: Vec<GlobalProperty>,
}

/// What `--device`/`--global` asked for.
pub enum CliDevices {
    /// Some `--device TYPE,help` was answered: nothing to run.
    Helped,
    Plan(DevicePlan),
}

impl DevicePlan {
    /// Resolves `--global`s and `--device`s with `machine`'s compat properties. Errors
    /// are qdev's text (`device 'net0' (virtio-net-tap): ...`).
    pub fn from_cli(
        devices: &[String],
        globals: &[String],
        machine: &MachineType,
        registry: &DeviceRegistry,
    ) -> std::result::Result<CliDevices, String> {
        let mut resolver = PropertyResolver::new(registry).with_compat(machine.compat_settings());
        let mut plan = DevicePlan::default();
        for g in globals {
            let g: GlobalProperty = g
                .parse()
                .map_err(|e: baton_qdev::PropertyError| e.to_string())?;
            resolver.add_global(g.clone()).map_err(|e| e.to_string())?;
            plan.globals.push(g);
        }
        let mut helped = false;
        for text in devices {
            let spec: DeviceSpec = text
                .parse()
                .map_err(|e: baton_qdev::PropertyError| e.to_string())?;
            if spec.help {
                let props = resolver.describe(&spec.driver).map_err(|e| e.to_string())?;
                println!("{}", props.render_help());
                helped = true;
                continue;
            }
            let props = resolver.resolve(&spec).map_err(|e| e.to_string())?;
            if spec.driver != baton_virtio_net_tap::VIRTIO_NET_TAP.name {
                return Err(format!(
                    "device type {:?} is not wired into baton-vmm yet",
                    spec.driver
                ));
            }
            let id = spec
                .id
                .clone()
                .ok_or_else(|| format!("device {text:?}: an id= is required"))?;
            if plan.nets.iter().any(|n| n.id == id) {
                return Err(format!("device id {id:?} is used twice"));
            }
            let config = VirtioNetTapConfig::from_resolved(&props).map_err(|e| e.to_string())?;
            let slot = MmioSlot::nth(plan.nets.len()).ok_or_else(|| {
                format!("device {id}: at most {MAX_VIRTIO_DEVICES} virtio devices")
            })?;
            plan.nets.push(NetSpec { id, config, slot });
        }
        Ok(if helped {
            CliDevices::Helped
        } else {
            CliDevices::Plan(plan)
        })
    }

    /// The guest command-line words announcing every virtio-mmio device.
    pub fn cmdline(&self) -> String {
        let words: Vec<String> = self.nets.iter().map(|n| n.slot.cmdline()).collect();
        words.join(" ")
    }

    /// The plan as a migration destination builds it: a device waits for its backend
    /// only when its property AND the migration capability `backend-transfer` say so
    /// (the design's two layers), so the handshake compares the effective setting.
    pub fn for_incoming(&self, caps: &Capabilities) -> DevicePlan {
        let mut plan = self.clone();
        for n in &mut plan.nets {
            n.config.backend_transfer &= caps.backend_transfer;
        }
        plan
    }

    /// Creates every device in `vm` (not started yet): `Open` opens the TAPs now,
    /// `Incoming` opens nothing (a migration destination).
    pub fn attach(&self, vm: &mut Vm, mode: BackendMode) -> Result<()> {
        for spec in &self.nets {
            attach_net(vm, spec, mode)?;
        }
        Ok(())
    }
}

/// What the VM does with a device beyond MMIO: run-state changes and migration.
pub trait VmDevice: Send {
    fn id(&self) -> &str;
    /// The vCPUs stopped: finish in-flight work and stop touching guest memory and the
    /// backend (before state is saved or the backend is handed over).
    fn quiesce(&self);
    /// Undo [`Self::quiesce`] (the vCPUs are about to run again).
    fn resume(&self);
    /// A migrated VM started: catch up with what the guest queued meanwhile.
    fn restored(&self);
    /// The VM moved to another host: make the network learn where the guest is now.
    fn announce(&self);
    /// A handle for the migration engine (all handles are the same device).
    fn migratable(&self) -> Box<dyn Migratable>;
}

struct NetMmio(Net);

impl MmioDevice for NetMmio {
    fn read(&self, offset: u64, data: &mut [u8]) {
        self.0.mmio_read(offset, data);
    }
    fn write(&self, offset: u64, data: &[u8]) {
        self.0.mmio_write(offset, data);
    }
}

/// A virtio-net-tap wired into a VM.
struct NetDevice {
    net: Net,
    /// Stopped and joined on drop (before the device's fds close).
    _worker: NetWorker,
    _irqfd: Arc<EventFd>,
}

fn attach_net(vm: &mut Vm, spec: &NetSpec, mode: BackendMode) -> Result<()> {
    let id = spec.id.as_str();
    let dev_err = |what: &str, e: &dyn std::fmt::Display| Error::Device {
        id: id.to_owned(),
        reason: format!("{what}: {e}"),
    };
    let mem = vm.tracked_memory()?;
    let irqfd = Arc::new(EventFd::new(EFD_NONBLOCK).map_err(|e| dev_err("irqfd", &e))?);
    vm.vm_fd()
        .register_irqfd(&irqfd, spec.slot.gsi)
        .map_err(kvm_err(format!("{id}: KVM_IRQFD on GSI {}", spec.slot.gsi)))?;
    let net = VirtioNetTap::new(id, spec.config.clone(), mem, irqfd.clone(), mode)
        .map_err(|e| dev_err("creating", &e))?;
    for (reg, fd) in net.ioeventfds(spec.slot.base) {
        if reg.len != 4 {
            return Err(dev_err(
                "ioeventfd",
                &format!("{}-byte notification at {:#x}", reg.len, reg.addr),
            ));
        }
        vm.vm_fd()
            .register_ioevent(fd, &IoEventAddress::Mmio(reg.addr), reg.datamatch)
            .map_err(kvm_err(format!(
                "{id}: KVM_IOEVENTFD for queue {} at {:#x}",
                reg.queue, reg.addr
            )))?;
    }
    vm.add_mmio(
        spec.slot.base,
        MMIO_WINDOW_SIZE,
        Arc::new(NetMmio(net.clone())),
    )?;
    let worker = NetWorker::spawn(&net).map_err(|e| dev_err("event loop", &e))?;
    tracing::info!(
        device = id,
        base = format_args!("{:#x}", spec.slot.base),
        gsi = spec.slot.gsi,
        ?mode,
        "virtio-net-tap attached"
    );
    vm.add_device(Box::new(NetDevice {
        net,
        _worker: worker,
        _irqfd: irqfd,
    }));
    Ok(())
}

impl VmDevice for NetDevice {
    fn id(&self) -> &str {
        self.net.id()
    }

    fn quiesce(&self) {
        self.net.quiesce();
    }

    fn resume(&self) {
        self.net.resume();
    }

    fn restored(&self) {
        self.net.notify_all_queues();
    }

    fn announce(&self) {
        match self.net.announce() {
            Ok(true) => {
                tracing::info!(device = self.net.id(), "guest asked to announce itself");
                return;
            }
            Ok(false) => {}
            Err(e) => tracing::warn!(device = self.net.id(), "announce: {e}"),
        }
        // The guest did not take VIRTIO_NET_F_GUEST_ANNOUNCE: announce for it, like
        // QEMU's qemu_announce_self, with RARP frames from its MAC.
        let Some(mac) = self.net.config().mac else {
            tracing::warn!(
                device = self.net.id(),
                "no announce: the guest declined GUEST_ANNOUNCE and no mac= is set"
            );
            return;
        };
        let net = self.net.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("announce-{}", net.id()))
            .spawn(move || {
                for (round, pause) in [0u64, 50, 100].into_iter().enumerate() {
                    std::thread::sleep(Duration::from_millis(pause));
                    let frame = rarp_frame(mac.0);
                    let sent = net
                        .tap_queues()
                        .first()
                        .map(|q| q.write_frame(&frame))
                        .unwrap_or_else(|| Err(std::io::ErrorKind::NotConnected.into()));
                    match sent {
                        Ok(()) => tracing::info!(device = net.id(), round, "RARP announce sent"),
                        Err(e) => tracing::warn!(device = net.id(), "RARP announce: {e}"),
                    }
                }
            });
        if let Err(e) = spawned {
            tracing::warn!(device = self.net.id(), "announce thread: {e}");
        }
    }

    fn migratable(&self) -> Box<dyn Migratable> {
        Box::new(self.net.clone())
    }
}

/// A RARP "reverse request" from `mac` (QEMU's announce frame), with a zero vnet header.
pub fn rarp_frame(mac: [u8; 6]) -> Vec<u8> {
    let mut f = vec![0u8; VNET_HDR_LEN + 60];
    let e = &mut f[VNET_HDR_LEN..];
    e[..6].fill(0xff);
    e[6..12].copy_from_slice(&mac);
    e[12..14].copy_from_slice(&0x8035u16.to_be_bytes()); // ETH_P_RARP
    e[14..16].copy_from_slice(&1u16.to_be_bytes()); // hardware: Ethernet
    e[16..18].copy_from_slice(&0x0800u16.to_be_bytes()); // protocol: IPv4
    e[18] = 6;
    e[19] = 4;
    e[20..22].copy_from_slice(&3u16.to_be_bytes()); // reverse request
    e[22..28].copy_from_slice(&mac);
    e[32..38].copy_from_slice(&mac);
    f
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_distinct_and_bounded() {
        let a = MmioSlot::nth(0).unwrap();
        let b = MmioSlot::nth(1).unwrap();
        assert_eq!(a.cmdline(), "virtio_mmio.device=512@0xd0000000:16");
        assert_eq!(b.cmdline(), "virtio_mmio.device=512@0xd0001000:17");
        assert!(MmioSlot::nth(MAX_VIRTIO_DEVICES).is_none());
        assert!(MmioSlot::nth(MAX_VIRTIO_DEVICES - 1).unwrap().gsi <= 23);
    }

    fn plan(
        machine: &str,
        devices: &[&str],
        globals: &[&str],
    ) -> std::result::Result<DevicePlan, String> {
        let machine = baton_machine_types::MachineRegistry::builtin()
            .lookup(machine)
            .map_err(|e| e.to_string())?;
        let registry = DeviceRegistry::with_types([
            baton_virtio_net_tap::device_type(),
            baton_vhost_user_blk::device_type(),
        ])
        .map_err(|e| e.to_string())?;
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        match DevicePlan::from_cli(&s(devices), &s(globals), &machine, &registry)? {
            CliDevices::Plan(p) => Ok(p),
            CliDevices::Helped => Err("help".into()),
        }
    }

    #[test]
    fn plans_from_the_command_line() {
        let p = plan(
            "microvm",
            &[
                "virtio-net-tap,id=net0,ifname=tap0,queues=2",
                "virtio-net-tap,id=net1,ifname=tap1,backend-transfer=off",
            ],
            &[],
        )
        .unwrap();
        assert_eq!(p.nets.len(), 2);
        assert_eq!(p.nets[0].config.queue_pairs, 2);
        assert!(p.nets[0].config.backend_transfer && !p.nets[1].config.backend_transfer);
        assert_eq!(
            p.cmdline(),
            "virtio_mmio.device=512@0xd0000000:16 virtio_mmio.device=512@0xd0001000:17"
        );
        // Incoming without the capability: nobody waits for a backend.
        let off = p.for_incoming(&Capabilities::default());
        assert!(off.nets.iter().all(|n| !n.config.backend_transfer));
        let caps = Capabilities {
            backend_transfer: true,
            ..Capabilities::default()
        };
        let on = p.for_incoming(&caps);
        assert!(on.nets[0].config.backend_transfer && !on.nets[1].config.backend_transfer);
    }

    #[test]
    fn machine_compat_and_globals_apply() {
        let dev = ["virtio-net-tap,id=net0,ifname=tap0"];
        let old = plan("microvm-1.0", &dev, &[]).unwrap();
        assert!(!old.nets[0].config.backend_transfer && !old.nets[0].config.early_setup);
        let new = plan("microvm", &dev, &[]).unwrap();
        assert!(new.nets[0].config.backend_transfer && new.nets[0].config.early_setup);
        let g = plan("microvm-1.0", &dev, &["virtio-net-tap.backend-transfer=on"]).unwrap();
        assert!(g.nets[0].config.backend_transfer);
        assert_eq!(g.globals.len(), 1);
    }

    #[test]
    fn bad_devices_fail_with_qdev_text() {
        let err = |d: &[&str]| plan("microvm", d, &[]).unwrap_err();
        assert_eq!(
            err(&["virtio-net-tap,id=net0,ifname=tap0,queues=0"]),
            "device 'net0' (virtio-net-tap): invalid value '0' for property 'queues' \
             (explicit): 0 is out of range 1..=256"
        );
        assert!(err(&["virtio-net-tap,id=net0"]).contains("ifname"));
        assert!(err(&["virtio-net-tap,ifname=t"]).contains("id= is required"));
        assert!(err(&[
            "virtio-net-tap,id=a,ifname=t",
            "virtio-net-tap,id=a,ifname=u"
        ])
        .contains("used twice"));
        assert!(err(&["vhost-user-blk,id=d0,socket=/s"]).contains("not wired"));
        let nine: Vec<String> = (0..9)
            .map(|i| format!("virtio-net-tap,id=n{i},ifname=t{i}"))
            .collect();
        let nine: Vec<&str> = nine.iter().map(String::as_str).collect();
        assert!(err(&nine).contains("at most 8"));
    }

    #[test]
    fn rarp_is_a_60_byte_reverse_request() {
        let f = rarp_frame([2, 0, 0, 0, 0, 1]);
        assert_eq!(f.len(), VNET_HDR_LEN + 60);
        let e = &f[VNET_HDR_LEN..];
        assert_eq!(&e[12..14], &[0x80, 0x35]);
        assert_eq!(&e[6..12], &[2, 0, 0, 0, 0, 1]);
        assert_eq!(&e[20..22], &[0, 3]);
    }
}
