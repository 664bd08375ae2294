//! Sending RAM: one pass over a dirty bitmap, split across channels.
//!
//! Each bitmap word (64 pages) belongs to one lane, `word % lanes`, and a lane is one
//! channel written by one thread. A page therefore always travels on the same channel, so
//! the order of its versions across passes is the channel's own FIFO order and the
//! destination needs no cross-channel synchronisation until the end.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::error::MigrationError;
use crate::protocol::{SectionType, PAGE_SIZE};
use crate::ram::{is_zero, GuestRam, RamLayout, PAGES_PER_SECTION, PAGE_DATA, PAGE_ZERO};
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
    let page = PAGE_SIZE as usize;
    let mut buf = vec![0u8; page];
    let mut payload: Vec<u8> = Vec::with_capacity(6 + PAGES_PER_SECTION * (9 + page));
    for (region, (map, r)) in dirty.iter().zip(&layout.regions).enumerate() {
        let mut count = 0u16;
        let mut flush = |payload: &mut Vec<u8>, count: &mut u16, stats: &mut PassStats| {
            if *count == 0 {
                return Ok(());
            }
            payload[4..6].copy_from_slice(&count.to_le_bytes());
            ch.send(SectionType::RamPages, payload, &[])?;
            stats.bytes += payload.len() as u64;
            limiter.account(payload.len() as u64);
            *count = 0;
            if cancel.load(Ordering::Relaxed) {
                return Err(MigrationError::Cancelled);
            }
            Ok::<(), MigrationError>(())
        };
        for (w, word) in map.iter().enumerate().skip(lane).step_by(lanes) {
            let mut bits = *word;
            while bits != 0 {
                let bit = bits.trailing_zeros() as u64;
                bits &= bits - 1;
                let pfn = w as u64 * 64 + bit;
                if pfn >= r.pages() {
                    break;
                }
                if count == 0 {
                    payload.clear();
                    payload.extend_from_slice(&(region as u32).to_le_bytes());
                    payload.extend_from_slice(&0u16.to_le_bytes());
                }
                ram.read(region, pfn * PAGE_SIZE, &mut buf)
                    .map_err(MigrationError::Ram)?;
                payload.extend_from_slice(&pfn.to_le_bytes());
                if is_zero(&buf) {
                    payload.push(PAGE_ZERO);
                    stats.zero_pages += 1;
                } else {
                    payload.push(PAGE_DATA);
                    payload.extend_from_slice(&buf);
                    stats.data_pages += 1;
                }
                count += 1;
                if count as usize == PAGES_PER_SECTION {
                    flush(&mut payload, &mut count, &mut stats)?;
                }
            }
        }
        flush(&mut payload, &mut count, &mut stats)?;
    }
    Ok(stats)
}
