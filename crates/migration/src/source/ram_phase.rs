//! The source's RAM phase: pre-copy passes with dirty tracking until the rest fits the
//! downtime limit (remote), one full pass while paused (snapshot), or nothing but the
//! pause (local: the RAM itself changes hands by fd).

use std::time::{Duration, Instant};

use crate::error::MigrationError;
use crate::handshake::MigrationMode;
use crate::micros;
use crate::protocol::{SectionType, PAGE_SIZE};
use crate::ram::{count_pages, empty_bitmaps, full_bitmaps, RamLayout};
use crate::ram_send::{send_pass, RateLimiter};
use crate::report::MigrationStatus;
use crate::transport::Channel;
use tracing::info;

use super::{SourceRun, SourceVm};

impl SourceRun<'_> {
    pub(super) fn ram_phase(
        &mut self,
        main: &mut Channel,
        ram_chans: &mut [Channel],
        vm: &mut SourceVm<'_>,
        layout: &RamLayout,
    ) -> Result<(), MigrationError> {
        let s = self.settings;
        // RAM.
        self.ram_stats.total = layout.total_bytes();
        let limiter = RateLimiter::new(s.parameters.max_bandwidth);
        let cancel = self.monitor.cancel_flag();
        match s.mode {
            MigrationMode::Remote => {
                self.monitor.set_status(MigrationStatus::Active);
                vm.dirty_log.start().map_err(MigrationError::Ram)?;
                let mut dirty = full_bitmaps(layout);
                let limit = Duration::from_millis(s.parameters.downtime_limit);
                loop {
                    let t = Instant::now();
                    let sent =
                        send_pass(main, ram_chans, vm.ram, layout, &dirty, &limiter, cancel)?;
                    self.account(&sent, t.elapsed());
                    dirty = empty_bitmaps(layout);
                    vm.dirty_log
                        .collect(&mut dirty)
                        .map_err(MigrationError::Ram)?;
                    self.ram_stats.dirty_sync_count += 1;
                    let remaining = count_pages(&dirty) * PAGE_SIZE;
                    let bw = self.bandwidth_bytes_per_sec();
                    self.ram_stats.remaining = remaining;
                    self.ram_stats.dirty_pages_rate =
                        (count_pages(&dirty) as f64 / t.elapsed().as_secs_f64().max(1e-6)) as u64;
                    self.monitor
                        .update(|i| i.ram = Some(self.ram_stats.clone()));
                    let fits = (remaining as f64) <= bw * limit.as_secs_f64();
                    if fits
                        || self.ram_stats.dirty_sync_count >= u64::from(s.parameters.max_iterations)
                    {
                        info!(
                            remaining,
                            iterations = self.ram_stats.dirty_sync_count,
                            fits,
                            "switching over"
                        );
                        break;
                    }
                    main.send(SectionType::RamIterationEnd, &[], &[])?;
                    self.check_cancel()?;
                }
                self.pause(vm)?;
                let t = Instant::now();
                vm.dirty_log
                    .collect(&mut dirty)
                    .map_err(MigrationError::Ram)?;
                vm.dirty_log.stop();
                let sent = send_pass(main, ram_chans, vm.ram, layout, &dirty, &limiter, cancel)?;
                self.account(&sent, t.elapsed());
                for ch in ram_chans.iter_mut() {
                    ch.send(SectionType::RamEos, &[], &[])?;
                }
                self.phases.final_ram_us = micros(t.elapsed());
            }
            MigrationMode::Snapshot => {
                self.pause(vm)?;
                let t = Instant::now();
                let sent = send_pass(
                    main,
                    &mut [],
                    vm.ram,
                    layout,
                    &full_bitmaps(layout),
                    &limiter,
                    cancel,
                )?;
                self.account(&sent, t.elapsed());
                self.phases.final_ram_us = micros(t.elapsed());
            }
            MigrationMode::Local => self.pause(vm)?,
        }
        Ok(())
    }
}
