//! The TAP backend: one non-blocking fd per queue pair on a multi-queue TAP interface.
//!
//! Two ways to get one:
//! - [`Tap::open`] opens `/dev/net/tun` once per queue pair with
//!   `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR | IFF_MULTI_QUEUE` (`TUNSETIFF` creates the
//!   interface if it does not exist, or attaches new queues to an existing one), sets the
//!   vnet header size to 12 bytes (`struct virtio_net_hdr_v1`, the virtio 1.0 header, so
//!   guest buffers and TAP frames carry the very same header and the device copies it
//!   through untouched) and makes each fd non-blocking.
//! - [`Tap::adopt`] takes fds handed over by a previous VMM process as they are. It never
//!   calls `TUNSETIFF`, `TUNSETVNETHDRSZ`, `TUNSETOFFLOAD` nor `fcntl(F_SETFL)`: each fd is
//!   only *inspected* (it must be a TAP queue of the expected interface, `TUNGETIFF`, with
//!   the flags, vnet header size and non-blocking mode the metadata says), and refused
//!   with an error naming its role otherwise.
//!
//! Why `IFF_MULTI_QUEUE` even for one queue pair: a multi-queue interface accepts new
//! queues while another process holds its fds, so a destination VMM that does not take
//! the fds over (backend transfer off) can still attach to the same interface next to
//! the source; a single-queue TAP would answer `EBUSY`.
//!
//! Offloads (`TUNSETOFFLOAD`) say what the kernel may hand *us* (partial checksums, TSO
//! segments), so they follow the guest's negotiated `GUEST_*` features
//! ([`offloads_for`]). The kernel has no call to read them back: they travel in the
//! backend-transfer metadata instead.

use std::ffi::CStr;
use std::fs::OpenOptions;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::sync::Arc;

use vmm_sys_util::ioctl::{ioctl_with_mut_ref, ioctl_with_ref};

/// Bytes of vnet header in front of every frame: `struct virtio_net_hdr_v1`.
pub const VNET_HDR_LEN: usize = 12;
/// Largest frame (header included) the device moves: the virtio-net "big packet" bound
/// (64 KiB of TSO payload plus Ethernet and vnet headers).
pub const MAX_FRAME_LEN: usize = 65562;
/// The `TUNGETIFF` flags a baton TAP queue must have.
pub const TAP_FLAGS: u32 =
    (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR | libc::IFF_MULTI_QUEUE) as u32;

const TUN_PATH: &str = "/dev/net/tun";
/// Flags `TUNGETIFF` reports that describe the queue's framing (others, like
/// `IFF_PERSIST` or `IFF_ONE_QUEUE`, do not matter to the device).
const FRAMING_FLAGS: u32 =
    (libc::IFF_TUN | libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR | libc::IFF_MULTI_QUEUE)
        as u32;

/// Why the TAP backend could not be opened, adopted or used.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// The interface name cannot be a Linux interface name.
    #[error("TAP {ifname:?}: invalid interface name ({reason})")]
    BadName {
        ifname: String,
        reason: &'static str,
    },
    /// Opening `/dev/net/tun` failed.
    #[error("TAP {ifname:?}: queue {queue}: opening /dev/net/tun: {source}")]
    Open {
        ifname: String,
        queue: u16,
        #[source]
        source: io::Error,
    },
    /// A TAP ioctl or fcntl failed.
    #[error("TAP {ifname:?}: queue {queue}: {op}: {source}")]
    Ioctl {
        ifname: String,
        queue: u16,
        op: &'static str,
        #[source]
        source: io::Error,
    },
    /// A handed-over fd is not what its role says.
    #[error("fd {role:?}: {reason}")]
    Refused { role: String, reason: String },
}

/// What an fd says about itself: read with `TUNGETIFF`, `TUNGETVNETHDRSZ` and `F_GETFL`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TapInfo {
    pub ifname: String,
    /// The framing flags (`IFF_TAP`, `IFF_NO_PI`, `IFF_VNET_HDR`, `IFF_MULTI_QUEUE`).
    pub flags: u32,
    pub vnet_hdr_len: u32,
    pub nonblocking: bool,
}

/// What an adopting device expects of every fd (from the backend-transfer metadata and
/// its own configuration).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TapExpect {
    pub ifname: String,
    pub flags: u32,
    pub vnet_hdr_len: u32,
    pub nonblocking: bool,
}

/// One queue of the TAP interface: one fd, read and written whole frames at a time.
#[derive(Debug)]
pub struct TapQueue {
    fd: OwnedFd,
}

impl TapQueue {
    /// Reads one frame (vnet header included) into `buf`; `Ok(None)` when no frame is
    /// waiting.
    pub fn read_frame(&self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        loop {
            // SAFETY: `buf` is valid for writes of `buf.len()` bytes; the fd is ours.
            let n = unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            if n >= 0 {
                return Ok(Some(n as usize));
            }
            let e = io::Error::last_os_error();
            match e.kind() {
                io::ErrorKind::Interrupted => continue,
                io::ErrorKind::WouldBlock => return Ok(None),
                _ => return Err(e),
            }
        }
    }

    /// Writes one frame (vnet header included). A full TAP queue (`EAGAIN`) is an error
    /// the caller counts as a drop, like a full NIC ring.
    pub fn write_frame(&self, frame: &[u8]) -> io::Result<()> {
        loop {
            // SAFETY: `frame` is valid for reads of its length; the fd is ours.
            let n = unsafe { libc::write(self.fd.as_raw_fd(), frame.as_ptr().cast(), frame.len()) };
            if n >= 0 {
                return if n as usize == frame.len() {
                    Ok(())
                } else {
                    Err(io::Error::new(
                        io::ErrorKind::WriteZero,
                        "short write to TAP",
                    ))
                };
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }
}

impl AsRawFd for TapQueue {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.fd.as_raw_fd()
    }
}

impl AsFd for TapQueue {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// An open multi-queue TAP interface: one [`TapQueue`] per queue pair.
#[derive(Debug)]
pub struct Tap {
    ifname: String,
    queues: Vec<Arc<TapQueue>>,
    /// The last `TUNSETOFFLOAD` value (the kernel cannot be asked).
    offloads: u32,
}

/// `TUN_F_*` offloads for negotiated virtio-net features: what the guest accepts from
/// the host (partial checksums, TSO segments) is what the TAP may pass to us.
pub fn offloads_for(features: u64) -> u32 {
    use crate::device::feature as f;
    let mut o = 0;
    if features & f::GUEST_CSUM != 0 {
        o |= libc::TUN_F_CSUM;
        if features & f::GUEST_TSO4 != 0 {
            o |= libc::TUN_F_TSO4;
        }
        if features & f::GUEST_TSO6 != 0 {
            o |= libc::TUN_F_TSO6;
        }
        if features & f::GUEST_ECN != 0 && o & (libc::TUN_F_TSO4 | libc::TUN_F_TSO6) != 0 {
            o |= libc::TUN_F_TSO_ECN;
        }
    }
    o
}

fn ifreq_for(ifname: &str) -> Result<libc::ifreq, BackendError> {
    let bad = |reason| BackendError::BadName {
        ifname: ifname.to_owned(),
        reason,
    };
    if ifname.is_empty() {
        return Err(bad("empty"));
    }
    if ifname.len() >= libc::IFNAMSIZ {
        return Err(bad("longer than 15 bytes"));
    }
    if ifname
        .bytes()
        .any(|b| b == 0 || b == b'/' || b.is_ascii_whitespace())
    {
        return Err(bad("contains NUL, '/' or white space"));
    }
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in req.ifr_name.iter_mut().zip(ifname.bytes()) {
        *d = s as libc::c_char;
    }
    Ok(req)
}

fn last_err(r: libc::c_int) -> io::Result<()> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Reads what a TAP fd says about itself, without changing anything.
pub fn inspect(fd: BorrowedFd<'_>) -> io::Result<TapInfo> {
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    // SAFETY: TUNGETIFF writes one ifreq into `req`, which outlives the call.
    last_err(unsafe { ioctl_with_mut_ref(&fd, libc::TUNGETIFF as _, &mut req) })?;
    let name_bytes: Vec<u8> = req.ifr_name.iter().map(|&c| c as u8).collect();
    let ifname = CStr::from_bytes_until_nul(&name_bytes)
        .map(|c| c.to_string_lossy().into_owned())
        .unwrap_or_default();
    // SAFETY: TUNGETIFF filled the flags member of the union.
    let flags = u32::from(unsafe { req.ifr_ifru.ifru_flags } as u16) & FRAMING_FLAGS;
    let mut hdr: libc::c_int = 0;
    // SAFETY: TUNGETVNETHDRSZ writes one int into `hdr`.
    last_err(unsafe { ioctl_with_mut_ref(&fd, libc::TUNGETVNETHDRSZ as _, &mut hdr) })?;
    // SAFETY: F_GETFL only reads the file status flags.
    let fl = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) };
    last_err(fl)?;
    Ok(TapInfo {
        ifname,
        flags,
        vnet_hdr_len: hdr as u32,
        nonblocking: fl & libc::O_NONBLOCK != 0,
    })
}

impl Tap {
    /// Opens (or creates) TAP interface `ifname` with `pairs` queues, 12-byte vnet
    /// headers, no offloads yet (set at activation), every fd non-blocking.
    pub fn open(ifname: &str, pairs: u16) -> Result<Tap, BackendError> {
        let mut queues = Vec::with_capacity(usize::from(pairs));
        for queue in 0..pairs {
            let ioerr = |op, source| BackendError::Ioctl {
                ifname: ifname.to_owned(),
                queue,
                op,
                source,
            };
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
                .open(TUN_PATH)
                .map_err(|source| BackendError::Open {
                    ifname: ifname.to_owned(),
                    queue,
                    source,
                })?;
            let fd = OwnedFd::from(file);
            let mut req = ifreq_for(ifname)?;
            req.ifr_ifru.ifru_flags = TAP_FLAGS as libc::c_short;
            // SAFETY: TUNSETIFF reads (and may write back) one ifreq that outlives it.
            last_err(unsafe { ioctl_with_mut_ref(&fd, libc::TUNSETIFF as _, &mut req) })
                .map_err(|e| ioerr("TUNSETIFF", e))?;
            let hdr = VNET_HDR_LEN as libc::c_int;
            // SAFETY: TUNSETVNETHDRSZ reads one int.
            last_err(unsafe { ioctl_with_ref(&fd, libc::TUNSETVNETHDRSZ as _, &hdr) })
                .map_err(|e| ioerr("TUNSETVNETHDRSZ", e))?;
            queues.push(Arc::new(TapQueue { fd }));
        }
        let mut tap = Tap {
            ifname: ifname.to_owned(),
            queues,
            offloads: u32::MAX,
        };
        tap.set_offloads(0)?;
        tracing::info!(ifname, pairs, "TAP opened");
        Ok(tap)
    }

    /// Adopts handed-over fds `(role, fd)` in queue order, as they are: each must be a
    /// TAP queue matching `expect`; nothing about them is changed. `offloads` is what the
    /// source last set (the kernel cannot be asked).
    pub fn adopt(
        fds: Vec<(String, OwnedFd)>,
        expect: &TapExpect,
        offloads: u32,
    ) -> Result<Tap, BackendError> {
        let mut queues = Vec::with_capacity(fds.len());
        for (role, fd) in fds {
            let refuse = |reason: String| BackendError::Refused {
                role: role.clone(),
                reason,
            };
            let info = inspect(fd.as_fd()).map_err(|e| {
                refuse(format!("not a TAP queue (TUNGETIFF, TUNGETVNETHDRSZ): {e}"))
            })?;
            if info.flags & libc::IFF_TAP as u32 == 0 {
                return Err(refuse(format!(
                    "interface {:?} is a TUN, not a TAP (flags {:#x})",
                    info.ifname, info.flags
                )));
            }
            if info.ifname != expect.ifname {
                return Err(refuse(format!(
                    "TAP interface {:?}, expected {:?}",
                    info.ifname, expect.ifname
                )));
            }
            if info.flags != expect.flags {
                return Err(refuse(format!(
                    "TAP flags {:#x}, expected {:#x}",
                    info.flags, expect.flags
                )));
            }
            if info.vnet_hdr_len != expect.vnet_hdr_len {
                return Err(refuse(format!(
                    "vnet header size {}, expected {}",
                    info.vnet_hdr_len, expect.vnet_hdr_len
                )));
            }
            if info.nonblocking != expect.nonblocking {
                return Err(refuse(format!(
                    "O_NONBLOCK is {}, expected {}",
                    info.nonblocking, expect.nonblocking
                )));
            }
            queues.push(Arc::new(TapQueue { fd }));
        }
        tracing::info!(ifname = expect.ifname, pairs = queues.len(), "TAP adopted");
        Ok(Tap {
            ifname: expect.ifname.clone(),
            queues,
            offloads,
        })
    }

    /// `TUNSETOFFLOAD` on every queue, unless already set to `offloads`.
    pub fn set_offloads(&mut self, offloads: u32) -> Result<(), BackendError> {
        if offloads == self.offloads {
            return Ok(());
        }
        for (i, q) in self.queues.iter().enumerate() {
            // SAFETY: TUNSETOFFLOAD takes the flags by value.
            let r = unsafe {
                vmm_sys_util::ioctl::ioctl_with_val(
                    &q.fd,
                    libc::TUNSETOFFLOAD as _,
                    libc::c_ulong::from(offloads),
                )
            };
            last_err(r).map_err(|source| BackendError::Ioctl {
                ifname: self.ifname.clone(),
                queue: i as u16,
                op: "TUNSETOFFLOAD",
                source,
            })?;
        }
        tracing::debug!(ifname = self.ifname, offloads, "TAP offloads set");
        self.offloads = offloads;
        Ok(())
    }

    pub fn ifname(&self) -> &str {
        &self.ifname
    }

    /// The offloads last set.
    pub fn offloads(&self) -> u32 {
        self.offloads
    }

    pub fn queues(&self) -> &[Arc<TapQueue>] {
        &self.queues
    }

    pub fn queue(&self, i: u16) -> Option<&Arc<TapQueue>> {
        self.queues.get(usize::from(i))
    }

    /// The expectations an adopting destination checks, as this backend is now.
    pub fn expect(&self) -> TapExpect {
        TapExpect {
            ifname: self.ifname.clone(),
            flags: TAP_FLAGS,
            vnet_hdr_len: VNET_HDR_LEN as u32,
            nonblocking: true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::feature as f;

    #[test]
    fn offloads_follow_guest_features() {
        assert_eq!(offloads_for(0), 0);
        assert_eq!(offloads_for(f::GUEST_TSO4), 0, "TSO needs GUEST_CSUM");
        assert_eq!(offloads_for(f::GUEST_CSUM), libc::TUN_F_CSUM);
        assert_eq!(
            offloads_for(f::GUEST_CSUM | f::GUEST_TSO4 | f::GUEST_TSO6 | f::GUEST_ECN),
            libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6 | libc::TUN_F_TSO_ECN
        );
    }

    #[test]
    fn interface_names_are_checked() {
        assert!(ifreq_for("tap0").is_ok());
        for bad in ["", "0123456789abcdef", "a/b", "a b"] {
            let e = ifreq_for(bad).unwrap_err().to_string();
            assert!(e.contains("invalid interface name"), "{e}");
        }
    }

    #[test]
    fn a_pipe_is_not_a_tap() {
        let (r, _w) = std::io::pipe().unwrap();
        let fd = OwnedFd::from(r);
        let expect = TapExpect {
            ifname: "tap0".into(),
            flags: TAP_FLAGS,
            vnet_hdr_len: 12,
            nonblocking: true,
        };
        let e = Tap::adopt(vec![("tap-queue-0".into(), fd)], &expect, 0).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("fd \"tap-queue-0\": not a TAP queue (TUNGETIFF"),
            "{e}"
        );
    }
}
