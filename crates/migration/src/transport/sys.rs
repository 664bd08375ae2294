//! The system calls under a channel: `recvmsg` that collects fds and fills a list of
//! buffers (guest pages among them), `readv`, and `sendmsg` without SIGPIPE; each loops
//! until every byte moved, through short transfers and EINTR.

use std::io::ErrorKind;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;

use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use crate::protocol::MAX_SECTION_FDS;

pub(super) fn recv_exact_with_fds(
    s: &UnixStream,
    buf: &mut [u8],
    out: &mut Vec<OwnedFd>,
) -> std::io::Result<()> {
    let mut iov = [libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    }];
    // SAFETY: the iovec points into `buf`, exclusively borrowed for the call.
    unsafe { recv_iov_with_fds(s, &mut iov, out) }
}

/// Drop the first `n` bytes of `iov`; returns the index of the first iovec left.
fn advance(iov: &mut [libc::iovec], start: usize, mut n: usize) -> usize {
    let mut i = start;
    while n > 0 && i < iov.len() {
        let take = n.min(iov[i].iov_len);
        // SAFETY: stays within the iovec's own buffer.
        iov[i].iov_base = unsafe { iov[i].iov_base.cast::<u8>().add(take) }.cast();
        iov[i].iov_len -= take;
        n -= take;
        if iov[i].iov_len == 0 {
            i += 1;
        }
    }
    while i < iov.len() && iov[i].iov_len == 0 {
        i += 1;
    }
    i
}

/// Fill every iovec, collecting fds that arrive on the way.
///
/// # Safety
/// Every iovec must be valid for writes of its length.
pub(super) unsafe fn recv_iov_with_fds(
    s: &UnixStream,
    iov: &mut [libc::iovec],
    out: &mut Vec<OwnedFd>,
) -> std::io::Result<()> {
    let mut at = advance(iov, 0, 0);
    while at < iov.len() {
        let mut fds: [RawFd; MAX_SECTION_FDS] = [-1; MAX_SECTION_FDS];
        let n_iov = (iov.len() - at).min(1024);
        // SAFETY: the caller vouches for the iovecs; fds is a plain array.
        let r = unsafe { s.recv_with_fds(&mut iov[at..at + n_iov], &mut fds) };
        let (n, nfds) = match r {
            Ok(x) => x,
            Err(e) if e.errno() == libc::EINTR => continue,
            Err(e) => return Err(std::io::Error::from_raw_os_error(e.errno())),
        };
        for &fd in &fds[..nfds] {
            // SAFETY: the kernel just installed this fd for us; nobody else owns it.
            let owned = unsafe { OwnedFd::from_raw_fd(fd) };
            // SAFETY: F_SETFD on an fd we own; FD_CLOEXEC is per fd, not per file.
            unsafe { libc::fcntl(owned.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC) };
            out.push(owned);
        }
        if n == 0 {
            return Err(ErrorKind::UnexpectedEof.into());
        }
        at = advance(iov, at, n);
    }
    Ok(())
}

/// `readv` until every iovec is full.
///
/// # Safety
/// Every iovec must be valid for writes of its length.
pub(super) unsafe fn readv_exact(fd: RawFd, iov: &mut [libc::iovec]) -> std::io::Result<()> {
    let mut at = advance(iov, 0, 0);
    while at < iov.len() {
        let n_iov = (iov.len() - at).min(1024) as libc::c_int;
        // SAFETY: the caller vouches for the iovecs.
        let n = unsafe { libc::readv(fd, iov[at..].as_ptr(), n_iov) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            return Err(ErrorKind::UnexpectedEof.into());
        }
        at = advance(iov, at, n as usize);
    }
    Ok(())
}

/// `sendmsg` until every iovec went, without SIGPIPE on a closed peer.
///
/// # Safety
/// Every iovec must be valid for reads of its length.
pub(super) unsafe fn sendmsg_all(fd: RawFd, iov: &mut [libc::iovec]) -> std::io::Result<()> {
    let mut at = advance(iov, 0, 0);
    while at < iov.len() {
        // SAFETY: a zeroed msghdr is a valid "no name, no control" header.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = iov[at..].as_mut_ptr();
        msg.msg_iovlen = (iov.len() - at).min(1024) as _;
        // SAFETY: msg points at live iovecs the caller vouches for.
        let n = unsafe { libc::sendmsg(fd, &msg, libc::MSG_NOSIGNAL) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        at = advance(iov, at, n as usize);
    }
    Ok(())
}
