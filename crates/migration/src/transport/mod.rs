//! Channels: a byte transport (UNIX socket, TCP socket or snapshot file) that moves framed
//! sections, and on UNIX sockets fds with them.
//!
//! Reading never runs ahead of the section being parsed: on a UNIX socket every read is a
//! `recvmsg` for exactly the bytes still missing, so fds sent with a section (attached by
//! the kernel to that section's first byte) arrive with that section and no other. Fds that
//! arrive with a section that carries none are an error, and are closed.

mod sys;

use std::fs::File;
use std::io::{BufReader, BufWriter, ErrorKind, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;

use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use sys::{readv_exact, recv_exact_with_fds, recv_iov_with_fds, sendmsg_all};

use crate::error::StreamError;
use crate::protocol::{
    encode_section_header, footer, ChannelHeader, SectionType, FOOTER_MAGIC, MAX_SECTION_LEN,
    SECTION_HEADER_LEN,
};

/// The byte transport under a channel.
#[derive(Debug)]
pub enum Transport {
    Unix(UnixStream),
    Tcp(TcpStream),
    FileWriter(BufWriter<File>),
    FileReader(BufReader<File>),
}

impl Transport {
    /// Whether fds can travel on it.
    pub fn carries_fds(&self) -> bool {
        matches!(self, Transport::Unix(_))
    }

    /// `"unix"`, `"tcp"` or `"file"`, as named in the handshake.
    pub fn kind_name(&self) -> &'static str {
        match self {
            Transport::Unix(_) => "unix",
            Transport::Tcp(_) => "tcp",
            Transport::FileWriter(_) | Transport::FileReader(_) => "file",
        }
    }

    /// A handle that can interrupt blocked I/O from another thread (cancel).
    pub fn shutdown_handle(&self) -> Option<ShutdownHandle> {
        match self {
            Transport::Unix(s) => s.try_clone().ok().map(ShutdownHandle::Unix),
            Transport::Tcp(s) => s.try_clone().ok().map(ShutdownHandle::Tcp),
            _ => None,
        }
    }
}

/// Shuts a socket down from another thread, so blocked reads and writes return.
#[derive(Debug)]
pub enum ShutdownHandle {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl ShutdownHandle {
    /// Stop both directions: blocked reads and writes return.
    pub fn shutdown(&self) {
        self.shutdown_how(Shutdown::Both);
    }

    /// Stop reading only: a blocked read returns end-of-stream, while the side that
    /// stopped can still send the peer its reason (the destination's ERROR).
    pub fn shutdown_read(&self) {
        self.shutdown_how(Shutdown::Read);
    }

    fn shutdown_how(&self, how: Shutdown) {
        let _ = match self {
            ShutdownHandle::Unix(s) => s.shutdown(how),
            ShutdownHandle::Tcp(s) => s.shutdown(how),
        };
    }
}

/// A received section header, its payload still in the channel.
#[derive(Debug)]
pub(crate) struct SectionHead {
    pub ty: SectionType,
    pub seq: u32,
    pub len: u32,
    fds: Vec<OwnedFd>,
}

/// One received section.
#[derive(Debug)]
pub struct Section {
    pub ty: SectionType,
    pub seq: u32,
    pub payload: Vec<u8>,
    pub fds: Vec<OwnedFd>,
}

/// A channel: transport plus per-direction section counters.
#[derive(Debug)]
pub struct Channel {
    name: String,
    io: Transport,
    send_seq: u32,
    recv_seq: u32,
    /// Type of the last section received, named when the next one is cut.
    last_recv: Option<SectionType>,
    fds: Vec<OwnedFd>,
    bytes_sent: u64,
}

impl Channel {
    pub fn new(name: impl Into<String>, io: Transport) -> Self {
        if let Transport::Tcp(s) = &io {
            let _ = s.set_nodelay(true);
        }
        Channel {
            name: name.into(),
            io,
            send_seq: 0,
            recv_seq: 0,
            last_recv: None,
            fds: Vec::new(),
            bytes_sent: 0,
        }
    }

    /// The same channel under another name (once its header told what it is).
    pub fn renamed(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self
    }

    /// Sequence number of the last section received.
    pub fn last_recv_seq(&self) -> u32 {
        self.recv_seq.wrapping_sub(1)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether this channel is a snapshot file (no return path).
    pub fn is_file(&self) -> bool {
        matches!(self.io, Transport::FileReader(_) | Transport::FileWriter(_))
    }

    pub fn transport(&self) -> &Transport {
        &self.io
    }

    pub fn transport_mut(&mut self) -> &mut Transport {
        &mut self.io
    }

    pub fn bytes_sent(&self) -> u64 {
        self.bytes_sent
    }

    fn io_err(&self, context: &str, source: std::io::Error) -> StreamError {
        if matches!(
            source.kind(),
            ErrorKind::UnexpectedEof
                | ErrorKind::BrokenPipe
                | ErrorKind::ConnectionReset
                | ErrorKind::NotConnected
        ) {
            if matches!(self.io, Transport::FileReader(_)) {
                StreamError::Truncated {
                    channel: self.name.clone(),
                    context: context.to_owned(),
                }
            } else {
                StreamError::Closed {
                    channel: self.name.clone(),
                    context: context.to_owned(),
                }
            }
        } else {
            StreamError::Io {
                channel: self.name.clone(),
                context: context.to_owned(),
                source,
            }
        }
    }

    fn write_all(&mut self, buf: &[u8], context: &str) -> Result<(), StreamError> {
        let r = match &mut self.io {
            Transport::Unix(s) => s.write_all(buf),
            Transport::Tcp(s) => s.write_all(buf),
            Transport::FileWriter(f) => f.write_all(buf),
            Transport::FileReader(_) => Err(std::io::Error::other("channel is read-only")),
        };
        r.map_err(|e| self.io_err(context, e))?;
        self.bytes_sent += buf.len() as u64;
        Ok(())
    }

    /// Fill `buf` exactly, collecting fds that arrive on a UNIX socket.
    fn read_exact(&mut self, buf: &mut [u8], context: &str) -> Result<(), StreamError> {
        let r = match &mut self.io {
            Transport::Unix(s) => recv_exact_with_fds(s, buf, &mut self.fds),
            Transport::Tcp(s) => s.read_exact(buf),
            Transport::FileReader(f) => f.read_exact(buf),
            Transport::FileWriter(_) => Err(std::io::Error::other("channel is write-only")),
        };
        r.map_err(|e| self.io_err(context, e))
    }

    pub fn flush(&mut self) -> Result<(), StreamError> {
        if let Transport::FileWriter(f) = &mut self.io {
            let r = f.flush().and_then(|_| f.get_ref().sync_data());
            r.map_err(|e| self.io_err("flush", e))?;
        }
        Ok(())
    }

    pub fn write_header(&mut self, h: &ChannelHeader) -> Result<(), StreamError> {
        self.write_all(&h.encode(), "writing the channel header")
    }

    pub fn read_header(&mut self) -> Result<ChannelHeader, StreamError> {
        let mut b = [0u8; ChannelHeader::LEN];
        self.read_exact(&mut b, "reading the channel header")?;
        if !self.fds.is_empty() {
            let count = self.fds.len();
            self.fds.clear();
            return Err(StreamError::BadChannelHeader(format!(
                "{count} fds arrived with the channel header"
            )));
        }
        ChannelHeader::decode(&b)
    }

    /// Send one section; `fds` ride with its first byte (UNIX sockets only).
    pub fn send(
        &mut self,
        ty: SectionType,
        payload: &[u8],
        fds: &[RawFd],
    ) -> Result<(), StreamError> {
        let seq = self.send_seq;
        let len = u32::try_from(payload.len())
            .ok()
            .filter(|l| *l <= MAX_SECTION_LEN)
            .ok_or_else(|| StreamError::TooLong {
                channel: self.name.clone(),
                seq,
                ty: ty.to_string(),
                len: payload.len().min(u32::MAX as usize) as u32,
                max: MAX_SECTION_LEN,
            })?;
        let header = encode_section_header(ty, seq, len);
        let ctx = format!("sending section #{seq} {ty}");
        if fds.is_empty() {
            self.write_all(&header, &ctx)?;
        } else {
            let Transport::Unix(s) = &self.io else {
                return Err(StreamError::BadPayload {
                    channel: self.name.clone(),
                    seq,
                    ty: ty.to_string(),
                    reason: format!("cannot send fds over {}", self.io.kind_name()),
                });
            };
            let n = s
                .send_with_fds(&[&header[..]], fds)
                .map_err(|e| self.io_err(&ctx, std::io::Error::from_raw_os_error(e.errno())))?;
            self.bytes_sent += n as u64;
            let rest = header[n..].to_vec();
            self.write_all(&rest, &ctx)?;
        }
        self.write_all(payload, &ctx)?;
        self.write_all(&footer(seq), &ctx)?;
        self.send_seq = self.send_seq.wrapping_add(1);
        Ok(())
    }

    /// Receive the next section, checking type, order, length and footer.
    pub fn recv(&mut self) -> Result<Section, StreamError> {
        let head = self.recv_head()?;
        self.recv_rest(head)
    }

    /// The rest of the section `head` introduced, into a buffer of its own.
    pub(crate) fn recv_rest(&mut self, head: SectionHead) -> Result<Section, StreamError> {
        let mut payload = vec![0u8; head.len as usize];
        self.read_payload(&head, &mut payload)?;
        let (ty, seq) = (head.ty, head.seq);
        let fds = self.finish_recv(head)?;
        Ok(Section {
            ty,
            seq,
            payload,
            fds,
        })
    }

    /// The first half of [`Channel::recv`]: the section header, checked. The payload is
    /// then read (in pieces, wherever it belongs) and [`Channel::finish_recv`] checks
    /// the footer.
    pub(crate) fn recv_head(&mut self) -> Result<SectionHead, StreamError> {
        let seq_expected = self.recv_seq;
        let mut h = [0u8; SECTION_HEADER_LEN];
        let ctx = match self.last_recv {
            Some(ty) => format!(
                "reading section #{seq_expected} (after #{} {ty})",
                seq_expected.wrapping_sub(1)
            ),
            None => format!("reading section #{seq_expected} (the first)"),
        };
        self.read_exact(&mut h, &ctx)?;
        let fds = std::mem::take(&mut self.fds);
        let seq = u32::from_le_bytes([h[1], h[2], h[3], h[4]]);
        let len = u32::from_le_bytes([h[5], h[6], h[7], h[8]]);
        let ty = SectionType::from_u8(h[0]).ok_or_else(|| StreamError::UnknownSection {
            channel: self.name.clone(),
            seq,
            ty: h[0],
        })?;
        if seq != seq_expected {
            return Err(StreamError::OutOfOrder {
                channel: self.name.clone(),
                expected: seq_expected,
                got: seq,
            });
        }
        if len > MAX_SECTION_LEN {
            return Err(StreamError::TooLong {
                channel: self.name.clone(),
                seq,
                ty: ty.to_string(),
                len,
                max: MAX_SECTION_LEN,
            });
        }
        Ok(SectionHead { ty, seq, len, fds })
    }

    /// Read the next `buf.len()` bytes of the payload of `head`.
    pub(crate) fn read_payload(
        &mut self,
        head: &SectionHead,
        buf: &mut [u8],
    ) -> Result<(), StreamError> {
        self.read_exact(buf, &format!("reading section #{} {}", head.seq, head.ty))
    }

    /// Read payload bytes of `head` straight into `iov` (guest RAM), filling each in turn.
    ///
    /// # Safety
    /// Every iovec must be valid for writes of its length, and not be read or written
    /// by anyone else until this returns.
    pub(crate) unsafe fn read_payload_iov(
        &mut self,
        head: &SectionHead,
        iov: &mut [libc::iovec],
    ) -> Result<(), StreamError> {
        let r = match &mut self.io {
            // SAFETY: the caller vouches for the iovecs.
            Transport::Unix(s) => unsafe { recv_iov_with_fds(s, iov, &mut self.fds) },
            // SAFETY: as above.
            Transport::Tcp(s) => unsafe { readv_exact(s.as_raw_fd(), iov) },
            Transport::FileReader(f) => iov.iter().try_for_each(|v| {
                // SAFETY: as above; one iovec at a time through the buffered reader.
                let b = unsafe { std::slice::from_raw_parts_mut(v.iov_base.cast(), v.iov_len) };
                f.read_exact(b)
            }),
            Transport::FileWriter(_) => Err(std::io::Error::other("channel is write-only")),
        };
        let ctx = format!("reading section #{} {}", head.seq, head.ty);
        r.map_err(|e| self.io_err(&ctx, e))
    }

    /// The footer of `head`'s section; returns the fds that came with its first byte.
    pub(crate) fn finish_recv(&mut self, head: SectionHead) -> Result<Vec<OwnedFd>, StreamError> {
        let (ty, seq) = (head.ty, head.seq);
        let mut f = [0u8; 4];
        self.read_exact(&mut f, &format!("reading section #{seq} {ty}"))?;
        let got = u32::from_le_bytes(f);
        if got != FOOTER_MAGIC ^ seq {
            return Err(StreamError::BadFooter {
                channel: self.name.clone(),
                seq,
                ty: ty.to_string(),
                got,
                expected: FOOTER_MAGIC ^ seq,
            });
        }
        if !self.fds.is_empty() {
            let count = self.fds.len();
            self.fds.clear();
            return Err(StreamError::UnexpectedFds {
                channel: self.name.clone(),
                seq,
                ty: ty.to_string(),
                count,
            });
        }
        self.recv_seq = self.recv_seq.wrapping_add(1);
        self.last_recv = Some(ty);
        Ok(head.fds)
    }

    /// Send one section (no fds) whose payload is the concatenation of `iov`, in as few
    /// system calls as the socket takes: nothing is copied in user space.
    ///
    /// # Safety
    /// Every iovec must be valid for reads of its length until this returns.
    pub(crate) unsafe fn send_iov(
        &mut self,
        ty: SectionType,
        iov: &[libc::iovec],
    ) -> Result<(), StreamError> {
        let seq = self.send_seq;
        let total: usize = iov.iter().map(|v| v.iov_len).sum();
        let len = u32::try_from(total)
            .ok()
            .filter(|l| *l <= MAX_SECTION_LEN)
            .ok_or_else(|| StreamError::TooLong {
                channel: self.name.clone(),
                seq,
                ty: ty.to_string(),
                len: total.min(u32::MAX as usize) as u32,
                max: MAX_SECTION_LEN,
            })?;
        let header = encode_section_header(ty, seq, len);
        let foot = footer(seq);
        let mut all = Vec::with_capacity(iov.len() + 2);
        all.push(libc::iovec {
            iov_base: header.as_ptr() as *mut libc::c_void,
            iov_len: header.len(),
        });
        all.extend_from_slice(iov);
        all.push(libc::iovec {
            iov_base: foot.as_ptr() as *mut libc::c_void,
            iov_len: foot.len(),
        });
        let r = match &mut self.io {
            // SAFETY: header and footer live on this frame; the caller vouches for the rest.
            Transport::Unix(s) => unsafe { sendmsg_all(s.as_raw_fd(), &mut all) },
            // SAFETY: as above.
            Transport::Tcp(s) => unsafe { sendmsg_all(s.as_raw_fd(), &mut all) },
            Transport::FileWriter(f) => all.iter().try_for_each(|v| {
                // SAFETY: as above.
                f.write_all(unsafe { std::slice::from_raw_parts(v.iov_base.cast(), v.iov_len) })
            }),
            Transport::FileReader(_) => Err(std::io::Error::other("channel is read-only")),
        };
        r.map_err(|e| self.io_err(&format!("sending section #{seq} {ty}"), e))?;
        self.bytes_sent += (SECTION_HEADER_LEN + total + 4) as u64;
        self.send_seq = self.send_seq.wrapping_add(1);
        Ok(())
    }

    /// Receive a section that must be of type `want` and carry no fds.
    pub fn recv_expect(&mut self, want: SectionType) -> Result<Section, StreamError> {
        let s = self.recv()?;
        self.expect(&s, &[want])?;
        Ok(s)
    }

    /// Fail unless `s` is one of `want`, and refuse fds on sections that carry none.
    pub fn expect(&self, s: &Section, want: &[SectionType]) -> Result<(), StreamError> {
        if !want.contains(&s.ty) {
            let expected = want
                .iter()
                .map(|t| t.name())
                .collect::<Vec<_>>()
                .join(" or ");
            return Err(StreamError::Unexpected {
                channel: self.name.clone(),
                seq: s.seq,
                expected,
                got: s.ty.to_string(),
            });
        }
        if !s.fds.is_empty() && !matches!(s.ty, SectionType::Backend | SectionType::RamMemfds) {
            return Err(StreamError::UnexpectedFds {
                channel: self.name.clone(),
                seq: s.seq,
                ty: s.ty.to_string(),
                count: s.fds.len(),
            });
        }
        Ok(())
    }

    /// A payload error at section `s`.
    pub fn bad_payload(&self, s: &Section, reason: impl Into<String>) -> StreamError {
        StreamError::BadPayload {
            channel: self.name.clone(),
            seq: s.seq,
            ty: s.ty.to_string(),
            reason: reason.into(),
        }
    }

    /// A state decode error at section `s`.
    pub fn bad_state(&self, s: &Section, e: baton_vmstate::VmStateError) -> StreamError {
        StreamError::BadState {
            channel: self.name.clone(),
            seq: s.seq,
            ty: s.ty.to_string(),
            source: e,
        }
    }
}
