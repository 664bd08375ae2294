//! Sending RAM: one pass over a dirty bitmap, split across channels.
//!
//! Each bitmap word (64 pages) belongs to one lane, `word % lanes`, and a lane is one
//! channel written by one thread. A page therefore always travels on the same channel, so
//! the order of its versions across passes is the channel's own FIFO order and the
//! destination needs no cross-channel synchronisation until the end.
//!
//! Pages of mapped RAM go from guest memory to the socket in one `sendmsg` per section:
//! the kernel's copy is the only one (see `ram_wire` for the format).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::error::MigrationError;
use crate::protocol::{SectionType, PAGE_SIZE};
use crate::ram::{is_zero, GuestRam, RamLayout, PAGES_PER_SECTION, PAGE_DATA, PAGE_ZERO};
use crate::ram_wire::{INDEX_ENTRY, PAGES_HEADER};
use crate::transport::Channel;

/// What one pass sent.
#[derive(Clone, Debug, Default)]
pub struct PassStats {
    pub bytes: u64,
    pub zero_pages: u64,
    pub data_pages: u64,
}

impl PassStats {
    fn add(&mut self, o: &PassStats) {
        self.bytes += o.bytes;
        self.zero_pages += o.zero_pages;
        self.data_pages += o.data_pages;
    }
}

/// Holds the RAM rate under `max-bandwidth` bytes per second (0: unlimited).
pub struct RateLimiter {
    max: u64,
    state: Mutex<(Instant, u64)>,
}

impl RateLimiter {
    pub fn new(max: u64) -> Self {
        RateLimiter {
            max,
            state: Mutex::new((Instant::now(), 0)),
        }
    }

    fn account(&self, bytes: u64) {
        if self.max == 0 {
            return;
        }
        let wait = {
            let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
            s.1 += bytes;
            let due = Duration::from_secs_f64(s.1 as f64 / self.max as f64);
            due.checked_sub(s.0.elapsed())
        };
        if let Some(w) = wait {
            std::thread::sleep(w);
        }
    }
}

/// Send every page set in `dirty`: on `main` when there are no RAM channels, else on the
/// RAM channels in parallel.
pub fn send_pass(
    main: &mut Channel,
    ram_chans: &mut [Channel],
    ram: &dyn GuestRam,
    layout: &RamLayout,
    dirty: &[Vec<u64>],
    limiter: &RateLimiter,
    cancel: &AtomicBool,
) -> Result<PassStats, MigrationError> {
    if ram_chans.is_empty() {
        return send_lane(main, ram, layout, dirty, 0, 1, limiter, cancel);
    }
    let lanes = ram_chans.len();
    let results: Vec<Result<PassStats, MigrationError>> = std::thread::scope(|sc| {
        let handles: Vec<_> = ram_chans
            .iter_mut()
            .enumerate()
            .map(|(lane, ch)| {
                sc.spawn(move || send_lane(ch, ram, layout, dirty, lane, lanes, limiter, cancel))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join().unwrap_or_else(|_| {
                    Err(MigrationError::Ram("RAM sender thread panicked".into()))
                })
            })
            .collect()
    });
    let mut total = PassStats::default();
    for r in results {
        total.add(&r?);
    }
    Ok(total)
}

/// One RAM_PAGES section being built: the index, and where each data page is.
struct Batch {
    region: usize,
    index: Vec<u8>,
    /// Mapped RAM: the data pages in guest memory. Otherwise: offsets into `copied`.
    data: Vec<libc::iovec>,
    /// Pages read through `GuestRam::read` when the RAM is not mapped here.
    copied: Vec<u8>,
}

impl Batch {
    fn new() -> Batch {
        Batch {
            region: 0,
            index: Vec::with_capacity(PAGES_HEADER + PAGES_PER_SECTION * INDEX_ENTRY),
            data: Vec::with_capacity(PAGES_PER_SECTION + 1),
            copied: Vec::new(),
        }
    }

    fn count(&self) -> usize {
        (self.index.len().saturating_sub(PAGES_HEADER)) / INDEX_ENTRY
    }

    fn start(&mut self, region: usize) {
        self.region = region;
        self.index.clear();
        self.index.extend_from_slice(&(region as u32).to_le_bytes());
        self.index.extend_from_slice(&0u16.to_le_bytes());
        self.data.clear();
        self.copied.clear();
    }

    /// Add page `pfn`; reads it to tell a zero page, and keeps where its data is.
    fn add(
        &mut self,
        ram: &dyn GuestRam,
        pfn: u64,
        stats: &mut PassStats,
    ) -> Result<(), MigrationError> {
        let page = PAGE_SIZE as usize;
        let offset = pfn * PAGE_SIZE;
        let zero = match ram.mapped() {
            Some(m) => {
                let p = m.host_range(self.region, offset, page).ok_or_else(|| {
                    MigrationError::Ram(format!("region {}: page {pfn} is not mapped", self.region))
                })?;
                // SAFETY: one page of mapped guest RAM (MappedRam's contract, `ram`
                // borrowed for the whole pass). The guest may write it meanwhile, as it
                // may during any copy; the dirty log catches such writes.
                let bytes = unsafe { std::slice::from_raw_parts(p.as_ptr(), page) };
                let zero = is_zero(bytes);
                if !zero {
                    self.data.push(libc::iovec {
                        iov_base: p.as_ptr().cast(),
                        iov_len: page,
                    });
                }
                zero
            }
            None => {
                let at = self.copied.len();
                self.copied.resize(at + page, 0);
                ram.read(self.region, offset, &mut self.copied[at..])
                    .map_err(MigrationError::Ram)?;
                let zero = is_zero(&self.copied[at..]);
                if zero {
                    self.copied.truncate(at);
                }
                zero
            }
        };
        self.index.extend_from_slice(&pfn.to_le_bytes());
        if zero {
            self.index.push(PAGE_ZERO);
            stats.zero_pages += 1;
        } else {
            self.index.push(PAGE_DATA);
            stats.data_pages += 1;
        }
        Ok(())
    }

    /// Send the section: index, then the data pages where they are.
    fn send(&mut self, ch: &mut Channel) -> Result<u64, MigrationError> {
        let count = self.count() as u16;
        self.index[4..6].copy_from_slice(&count.to_le_bytes());
        let mut iov = Vec::with_capacity(self.data.len() + 2);
        iov.push(libc::iovec {
            iov_base: self.index.as_mut_ptr().cast(),
            iov_len: self.index.len(),
        });
        if self.copied.is_empty() {
            iov.extend_from_slice(&self.data);
        } else {
            iov.push(libc::iovec {
                iov_base: self.copied.as_mut_ptr().cast(),
                iov_len: self.copied.len(),
            });
        }
        let bytes = iov.iter().map(|v| v.iov_len as u64).sum();
        // SAFETY: the index and copies are ours; guest pages stay mapped while `ram` is
        // borrowed (see `add`).
        unsafe { ch.send_iov(SectionType::RamPages, &iov) }?;
        Ok(bytes)
    }
}

#[allow(clippy::too_many_arguments)]
fn send_lane(
    ch: &mut Channel,
    ram: &dyn GuestRam,
    layout: &RamLayout,
    dirty: &[Vec<u64>],
    lane: usize,
    lanes: usize,
    limiter: &RateLimiter,
    cancel: &AtomicBool,
) -> Result<PassStats, MigrationError> {
    let mut stats = PassStats::default();
    let mut batch = Batch::new();
    let mut flush = |batch: &mut Batch, stats: &mut PassStats| {
        if batch.count() == 0 {
            return Ok(());
        }
        let bytes = batch.send(ch)?;
        stats.bytes += bytes;
        limiter.account(bytes);
        batch.start(batch.region);
        if cancel.load(Ordering::Relaxed) {
            return Err(MigrationError::Cancelled);
        }
        Ok::<(), MigrationError>(())
    };
    for (region, (map, r)) in dirty.iter().zip(&layout.regions).enumerate() {
        batch.start(region);
        for (w, word) in map.iter().enumerate().skip(lane).step_by(lanes) {
            let mut bits = *word;
            while bits != 0 {
                let bit = bits.trailing_zeros() as u64;
                bits &= bits - 1;
                let pfn = w as u64 * 64 + bit;
                if pfn >= r.pages() {
                    break;
                }
                batch.add(ram, pfn, &mut stats)?;
                if batch.count() == PAGES_PER_SECTION {
                    flush(&mut batch, &mut stats)?;
                }
            }
        }
        flush(&mut batch, &mut stats)?;
    }
    Ok(stats)
}
