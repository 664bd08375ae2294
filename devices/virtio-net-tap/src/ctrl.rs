//! The control queue: `VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET` and
//! `VIRTIO_NET_CTRL_ANNOUNCE_ACK`; every other command is answered `VIRTIO_NET_ERR`
//! (the device offers no other control feature). Commands are guest input: at most
//! `CTRL_MAX` bytes are read, and a chain without a writable ack byte is completed with
//! length 0.

use baton_virtio::DeviceError;
use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestMemoryBackend};

use crate::device::*;

/// Largest control command read (header + data).
const CTRL_MAX: usize = 4096;

impl<M: GuestMemoryBackend + Clone + Send> VirtioNet<M> {
    pub(crate) fn ctrl(&mut self, q: u16) -> Result<(), DeviceError> {
        let Some(a) = &self.active else { return Ok(()) };
        if !self.running() {
            return Ok(());
        }
        let mem = a.mem.clone();
        let features = a.features;
        let mut used = false;
        loop {
            let queue = &mut self.queues[usize::from(q)];
            let Some(chain) = queue.pop_descriptor_chain(&mem) else {
                break;
            };
            let head = chain.head_index();
            let mut cmd = Vec::new();
            let mut ack_at = None;
            for d in chain {
                if d.is_write_only() {
                    ack_at.get_or_insert(d.addr());
                    continue;
                }
                let n = (d.len() as usize).min(CTRL_MAX.saturating_sub(cmd.len()));
                let start = cmd.len();
                cmd.resize(start + n, 0);
                if mem.read_slice(&mut cmd[start..], d.addr()).is_err() {
                    return Err(DeviceError::Other(format!(
                        "queue {q}: control descriptor {:#x} outside guest memory",
                        d.addr().0
                    )));
                }
            }
            let ack = self.control_command(features, &cmd);
            let len = match ack_at {
                Some(addr) => {
                    mem.write_obj(ack, addr)
                        .map_err(|source| DeviceError::GuestMemory { queue: q, source })?;
                    1
                }
                None => 0,
            };
            self.queues[usize::from(q)]
                .add_used(&mem, head, len)
                .map_err(|source| DeviceError::Queue { queue: q, source })?;
            used = true;
        }
        self.signal(q, used)
    }

    fn control_command(&mut self, features: u64, cmd: &[u8]) -> u8 {
        match cmd {
            [CTRL_MQ, CTRL_MQ_VQ_PAIRS_SET, lo, hi, ..] if features & feature::MQ != 0 => {
                let pairs = u16::from_le_bytes([*lo, *hi]);
                if pairs == 0 || pairs > self.config.queue_pairs {
                    tracing::debug!(device = self.id, pairs, "VQ_PAIRS_SET out of range");
                    return CTRL_ERR;
                }
                tracing::debug!(device = self.id, pairs, "queue pairs set");
                self.active_pairs = pairs;
                // Frames held for a queue that is no longer the target stay held and go
                // to the new target on the next read of their TAP queue.
                CTRL_OK
            }
            [CTRL_ANNOUNCE, CTRL_ANNOUNCE_ACK, ..] if features & feature::GUEST_ANNOUNCE != 0 => {
                self.status &= !S_ANNOUNCE;
                CTRL_OK
            }
            _ => {
                tracing::debug!(
                    device = self.id,
                    "unsupported control command {:?}",
                    cmd.get(..2)
                );
                CTRL_ERR
            }
        }
    }
}
