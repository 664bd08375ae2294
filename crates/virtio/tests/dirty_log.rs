//! The transport and a device over guest memory with a dirty bitmap: what the device
//! writes (used ring, buffers) is marked dirty, which remote migration's pre-copy relies
//! on. Also shows a device written for any bitmap type.

use std::sync::Arc;

use baton_virtio::regs::{self, features, status};
use baton_virtio::{ActivateContext, DeviceError, MmioTransport, VirtioDevice};
use virtio_queue::{Queue, QueueT};
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

type DirtyMem = GuestMemoryMmap<AtomicBitmap>;

/// Completes every request with length 0: only the used ring is written.
struct Null {
    queues: Vec<Queue>,
    mem: Option<DirtyMem>,
}

impl VirtioDevice<DirtyMem> for Null {
    fn device_type(&self) -> u32 {
        0x43
    }
    fn device_features(&self) -> u64 {
        features::VERSION_1
    }
    fn queues(&self) -> &[Queue] {
        &self.queues
    }
    fn queues_mut(&mut self) -> &mut [Queue] {
        &mut self.queues
    }
    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
    fn activate(&mut self, ctx: ActivateContext<DirtyMem>) -> Result<(), DeviceError> {
        self.mem = Some(ctx.mem);
        Ok(())
    }
    fn queue_notify(&mut self, queue: u16) -> Result<(), DeviceError> {
        let Some(mem) = &self.mem else { return Ok(()) };
        let q = &mut self.queues[usize::from(queue)];
        while let Some(chain) = q.pop_descriptor_chain(mem) {
            q.add_used(mem, chain.head_index(), 0)
                .map_err(|source| DeviceError::Queue { queue, source })?;
        }
        Ok(())
    }
    fn reset(&mut self) {
        self.mem = None;
    }
}

fn wr(t: &mut MmioTransport<DirtyMem, Null>, off: u64, v: u32) {
    t.write(off, &v.to_le_bytes());
}

#[test]
fn device_writes_are_dirty_logged() {
    let mem: DirtyMem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x4_0000)]).unwrap();
    let dev = Null {
        queues: vec![Queue::new(4).unwrap()],
        mem: None,
    };
    let irq = Arc::new(EventFd::new(EFD_NONBLOCK).unwrap());
    let mut t = MmioTransport::new(dev, mem.clone(), irq).unwrap();

    let (desc, avail, used) = (0x1_0000u64, 0x2_0000u64, 0x3_0000u64);
    wr(&mut t, regs::STATUS, status::ACKNOWLEDGE);
    wr(&mut t, regs::STATUS, status::ACKNOWLEDGE | status::DRIVER);
    wr(&mut t, regs::DRIVER_FEATURES_SEL, 1);
    wr(&mut t, regs::DRIVER_FEATURES, 1); // VERSION_1 is bit 32
    let s = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK;
    wr(&mut t, regs::STATUS, s);
    wr(&mut t, regs::QUEUE_NUM, 4);
    wr(&mut t, regs::QUEUE_DESC_LOW, desc as u32);
    wr(&mut t, regs::QUEUE_DRIVER_LOW, avail as u32);
    wr(&mut t, regs::QUEUE_DEVICE_LOW, used as u32);
    wr(&mut t, regs::QUEUE_READY, 1);
    wr(&mut t, regs::STATUS, s | status::DRIVER_OK);
    assert!(t.is_active());

    // One single-descriptor request.
    mem.write_obj(0x3_8000u64, GuestAddress(desc)).unwrap();
    mem.write_obj(16u32, GuestAddress(desc + 8)).unwrap();
    mem.write_obj(0u16, GuestAddress(avail + 4)).unwrap();
    mem.write_obj(1u16, GuestAddress(avail + 2)).unwrap();

    let region = mem.iter().next().unwrap();
    region.bitmap().reset();
    wr(&mut t, regs::QUEUE_NOTIFY, 0);
    let used_idx: u16 = mem.read_obj(GuestAddress(used + 2)).unwrap();
    assert_eq!(used_idx, 1);
    assert!(
        region.bitmap().is_addr_set(used as usize),
        "used ring page dirty"
    );
    assert!(
        !region.bitmap().is_addr_set(desc as usize),
        "descriptor page only read"
    );
    assert!(
        !region.bitmap().is_addr_set(avail as usize),
        "available ring only read"
    );
}
