//! The RAM_PAGES payload, and receiving it straight into guest RAM.
//!
//! `region u32 | count u16 | count x (page u64 | kind u8) | PAGE_SIZE bytes per data page`
//!
//! Kind 0 is a zero page (no data), kind 1 a page with data. The index comes first and the
//! page data after it, in index order, so that the sender can hand the kernel the guest's
//! pages themselves (one `sendmsg`, no copy in user space) and the receiver can check the
//! whole index, then read every data page into its place in guest RAM with one `recvmsg`.
//! A section's length must be exactly what its index announces.

use std::ptr::NonNull;

use crate::error::{MigrationError, StreamError};
use crate::protocol::PAGE_SIZE;
use crate::ram::{GuestRam, RamLayout};
use crate::transport::{Channel, SectionHead};

pub const PAGE_ZERO: u8 = 0;
pub const PAGE_DATA: u8 = 1;
/// Pages per RAM_PAGES section.
pub const PAGES_PER_SECTION: usize = 64;
/// Bytes before the index entries.
pub(crate) const PAGES_HEADER: usize = 6;
/// Bytes per index entry.
pub(crate) const INDEX_ENTRY: usize = 9;

const PAGE: usize = PAGE_SIZE as usize;

/// Whether a page is all zeros: 256-byte blocks, each OR-folded (which vectorises), with an
/// exit at the first block that is not (a data page rarely starts with 256 zero bytes).
pub fn is_zero(page: &[u8]) -> bool {
    page.chunks(256).all(|block| {
        block.chunks_exact(16).fold(0u128, |acc, c| {
            acc | u128::from_ne_bytes(c.try_into().unwrap_or([1; 16]))
        }) == 0
            && block.chunks_exact(16).remainder().iter().all(|b| *b == 0)
    })
}

/// A checked index: where each page goes.
pub(crate) struct Index {
    /// Page frame and whether data follows, in payload order.
    pub pages: Vec<(u64, bool)>,
    pub data_pages: usize,
}

impl Index {
    /// Payload bytes this index announces.
    pub fn payload_len(&self) -> usize {
        PAGES_HEADER + self.pages.len() * INDEX_ENTRY + self.data_pages * PAGE
    }
}

/// `region u32 | count u16` of a payload.
fn parse_header(b: &[u8]) -> Result<(usize, usize), String> {
    match b {
        [r0, r1, r2, r3, c0, c1, ..] => Ok((
            u32::from_le_bytes([*r0, *r1, *r2, *r3]) as usize,
            usize::from(u16::from_le_bytes([*c0, *c1])),
        )),
        _ => Err(format!(
            "truncated at byte 0 (needs {PAGES_HEADER} more of {})",
            b.len()
        )),
    }
}

/// Check the index entries of `count` pages in `region`.
fn parse_index(layout: &RamLayout, region: usize, entries: &[u8]) -> Result<Index, String> {
    let r = layout.regions.get(region).ok_or_else(|| {
        format!(
            "region {region} does not exist ({} regions)",
            layout.regions.len()
        )
    })?;
    let mut pages = Vec::with_capacity(entries.len() / INDEX_ENTRY);
    let mut data_pages = 0;
    for (i, e) in entries.chunks_exact(INDEX_ENTRY).enumerate() {
        let mut pfn = [0u8; 8];
        pfn.copy_from_slice(&e[..8]);
        let page = u64::from_le_bytes(pfn);
        if page >= r.pages() {
            return Err(format!(
                "page {i}: index {page} beyond region {region}'s {} pages",
                r.pages()
            ));
        }
        let data = match e[8] {
            PAGE_ZERO => false,
            PAGE_DATA => true,
            k => return Err(format!("page {i}: unknown page kind {k}")),
        };
        data_pages += usize::from(data);
        pages.push((page, data));
    }
    Ok(Index { pages, data_pages })
}

fn check_len(index: &Index, len: usize) -> Result<(), String> {
    let want = index.payload_len();
    if want != len {
        return Err(format!(
            "{len} bytes for {} pages ({} with data): expected {want}",
            index.pages.len(),
            index.data_pages
        ));
    }
    Ok(())
}

/// Apply one RAM_PAGES payload held in memory (a snapshot being analysed, a test);
/// returns (zero pages, data pages). Errors say what is wrong, never panic.
pub fn apply_pages(
    ram: &dyn GuestRam,
    layout: &RamLayout,
    payload: &[u8],
) -> Result<(u64, u64), String> {
    let (region, count) = parse_header(payload)?;
    let index_end = PAGES_HEADER + count * INDEX_ENTRY;
    let entries = payload.get(PAGES_HEADER..index_end).ok_or_else(|| {
        format!(
            "index of {count} pages needs {index_end} bytes, the payload has {}",
            payload.len()
        )
    })?;
    let index = parse_index(layout, region, entries)?;
    check_len(&index, payload.len())?;
    let zeros = [0u8; PAGE];
    let mut data = payload[index_end..].chunks_exact(PAGE);
    for (page, has_data) in &index.pages {
        let bytes = if *has_data {
            data.next().ok_or("data ran out")?
        } else {
            &zeros[..]
        };
        ram.write(region, page * PAGE_SIZE, bytes)?;
    }
    let data_pages = index.data_pages as u64;
    Ok((index.pages.len() as u64 - data_pages, data_pages))
}

/// Buffers a receiver keeps between sections.
#[derive(Default)]
pub(crate) struct RecvBuffers {
    index: Vec<u8>,
    data: Vec<u8>,
    iov: Vec<libc::iovec>,
}

// SAFETY: the iovecs are scratch space, rebuilt before every use; they point nowhere
// between uses.
unsafe impl Send for RecvBuffers {}

/// Receive the payload and footer of the RAM_PAGES section `head` into guest RAM.
pub(crate) fn recv_pages(
    ch: &mut Channel,
    head: SectionHead,
    ram: &dyn GuestRam,
    layout: &RamLayout,
    bufs: &mut RecvBuffers,
) -> Result<(), MigrationError> {
    let len = head.len as usize;
    let bad = |ch: &Channel, reason: String| -> MigrationError {
        StreamError::BadPayload {
            channel: ch.name().to_owned(),
            seq: head.seq,
            ty: head.ty.to_string(),
            reason,
        }
        .into()
    };
    let mut h = [0u8; PAGES_HEADER];
    let h = h.get_mut(..len.min(PAGES_HEADER)).unwrap_or(&mut []);
    ch.read_payload(&head, h)?;
    let (region, count) = parse_header(h).map_err(|e| bad(ch, e))?;
    let index_len = count * INDEX_ENTRY;
    if PAGES_HEADER + index_len > len {
        return Err(bad(
            ch,
            format!(
                "index of {count} pages needs {} bytes, the section has {len}",
                PAGES_HEADER + index_len
            ),
        ));
    }
    bufs.index.resize(index_len, 0);
    ch.read_payload(&head, &mut bufs.index)?;
    let index = parse_index(layout, region, &bufs.index).map_err(|e| bad(ch, e))?;
    check_len(&index, len).map_err(|e| bad(ch, e))?;
    let zeros = [0u8; PAGE];
    for (page, _) in index.pages.iter().filter(|(_, d)| !*d) {
        ram.write(region, page * PAGE_SIZE, &zeros)
            .map_err(|e| bad(ch, e))?;
    }
    match ram.mapped() {
        Some(m) => {
            bufs.iov.clear();
            for (page, _) in index.pages.iter().filter(|(_, d)| *d) {
                let p: NonNull<u8> = m
                    .host_range(region, page * PAGE_SIZE, PAGE)
                    .ok_or_else(|| bad(ch, format!("page {page} is not mapped")))?;
                bufs.iov.push(libc::iovec {
                    iov_base: p.as_ptr().cast(),
                    iov_len: PAGE,
                });
            }
            // SAFETY: each iovec is one page of guest RAM (MappedRam's contract, `ram`
            // borrowed throughout); the destination's guest does not run yet.
            unsafe { ch.read_payload_iov(&head, &mut bufs.iov) }?;
            bufs.iov.clear();
        }
        None => {
            bufs.data.resize(index.data_pages * PAGE, 0);
            ch.read_payload(&head, &mut bufs.data)?;
            let pages = index.pages.iter().filter(|(_, d)| *d);
            for ((page, _), bytes) in pages.zip(bufs.data.chunks_exact(PAGE)) {
                ram.write(region, page * PAGE_SIZE, bytes)
                    .map_err(|e| bad(ch, e))?;
            }
        }
    }
    let (seq, ty) = (head.seq, head.ty);
    let fds = ch.finish_recv(head)?;
    if !fds.is_empty() {
        return Err(StreamError::UnexpectedFds {
            channel: ch.name().to_owned(),
            seq,
            ty: ty.to_string(),
            count: fds.len(),
        }
        .into());
    }
    Ok(())
}
