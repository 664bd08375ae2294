//! Status, statistics, downtime breakdown and cancellation, shared between the thread that
//! runs a migration and the threads that watch it (QMP `query-migrate`, `migrate_cancel`).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::transport::ShutdownHandle;

/// Where a migration is, with QEMU's names.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MigrationStatus {
    #[default]
    None,
    Setup,
    Active,
    Device,
    Completed,
    Failed,
    Cancelling,
    Cancelled,
}

impl MigrationStatus {
    pub fn name(self) -> &'static str {
        match self {
            MigrationStatus::None => "none",
            MigrationStatus::Setup => "setup",
            MigrationStatus::Active => "active",
            MigrationStatus::Device => "device",
            MigrationStatus::Completed => "completed",
            MigrationStatus::Failed => "failed",
            MigrationStatus::Cancelling => "cancelling",
            MigrationStatus::Cancelled => "cancelled",
        }
    }

    pub fn is_finished(self) -> bool {
        matches!(
            self,
            MigrationStatus::Completed | MigrationStatus::Failed | MigrationStatus::Cancelled
        )
    }
}

/// RAM counters, as QEMU's `query-migrate` reports them.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct RamStats {
    pub total: u64,
    pub transferred: u64,
    pub remaining: u64,
    /// Zero pages (sent as markers).
    pub duplicate: u64,
    /// Pages sent with data.
    pub normal: u64,
    pub normal_bytes: u64,
    pub mbps: f64,
    pub dirty_sync_count: u64,
    pub dirty_pages_rate: u64,
}

/// The source's side of the pause.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct SourcePhases {
    /// Stopping the vCPUs.
    pub pause_us: u64,
    /// Last dirty pages (remote) — zero in local mode.
    pub final_ram_us: u64,
    /// Device `save` and early-state comparison.
    pub device_save_us: u64,
    /// Backend `export` and sending the fds.
    pub fd_transfer_us: u64,
    /// From END sent to RUNNING received.
    pub wait_for_destination_us: u64,
}

/// The destination's side, sent back with RUNNING.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct DestinationPhases {
    /// From SWITCHOVER received to END received.
    pub receive_us: u64,
    pub early_finish_us: u64,
    pub fd_adopt_us: u64,
    pub device_load_us: u64,
    /// Resuming the vCPUs.
    pub resume_us: u64,
    /// `CLOCK_MONOTONIC` (ns) when the vCPUs were resumed: on the same host the source
    /// reads the same clock, so pause-to-resume is measured exactly.
    #[serde(default)]
    pub resumed_at_ns: u64,
}

/// Where the pause went, both sides.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct DowntimeReport {
    /// What the guest saw: from the source starting to pause its vCPUs to the
    /// destination's vCPUs resumed (same host: one monotonic clock; otherwise the same as
    /// `until_running_us`, an upper bound).
    pub downtime_us: u64,
    /// From the source starting to pause to RUNNING received. Larger than the pause by
    /// the return trip, which on a busy host includes scheduling the reply behind the
    /// guest's now running vCPUs.
    #[serde(default)]
    pub until_running_us: u64,
    pub source: SourcePhases,
    pub destination: Option<DestinationPhases>,
}

impl DowntimeReport {
    /// A human-readable breakdown.
    pub fn render(&self) -> String {
        let mut s = format!(
            "downtime {:.3} ms (pause to resume; RUNNING seen by the source after {:.3} ms)\n",
            self.downtime_us as f64 / 1000.0,
            self.until_running_us as f64 / 1000.0
        );
        let src = &self.source;
        for (name, us) in [
            ("source: pause vCPUs", src.pause_us),
            ("source: final RAM", src.final_ram_us),
            ("source: device save", src.device_save_us),
            ("source: fd transfer", src.fd_transfer_us),
            ("source: wait for destination", src.wait_for_destination_us),
        ] {
            s.push_str(&format!("  {name:<34} {:>9.3} ms\n", us as f64 / 1000.0));
        }
        if let Some(d) = &self.destination {
            for (name, us) in [
                ("destination: receive", d.receive_us),
                ("destination: early-setup finish", d.early_finish_us),
                ("destination: fd adopt", d.fd_adopt_us),
                ("destination: device load", d.device_load_us),
                ("destination: resume vCPUs", d.resume_us),
            ] {
                s.push_str(&format!("  {name:<34} {:>9.3} ms\n", us as f64 / 1000.0));
            }
        }
        s
    }
}

/// A `query-migrate` answer.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct MigrationInfo {
    pub status: MigrationStatus,
    pub total_time: Option<u64>,
    pub setup_time: Option<u64>,
    pub downtime: Option<u64>,
    pub ram: Option<RamStats>,
    pub error_desc: Option<String>,
    pub downtime_report: Option<DowntimeReport>,
}

type StatusListener = Box<dyn Fn(MigrationStatus) + Send + Sync>;

struct Shared {
    info: MigrationInfo,
    /// Sockets to stop on cancel; `true` stops reading only (the destination, which
    /// still tells the source why).
    shutdown: Vec<(ShutdownHandle, bool)>,
    /// Past the point of no return (the source sent GO, the destination resumed):
    /// cancel does nothing any more.
    committed: bool,
    started: Option<Instant>,
    listener: Option<StatusListener>,
}

/// A handle on one migration (source or destination): status, stats, cancel.
#[derive(Clone)]
pub struct MigrationMonitor {
    shared: Arc<Mutex<Shared>>,
    cancelled: Arc<AtomicBool>,
}

impl Default for MigrationMonitor {
    fn default() -> Self {
        MigrationMonitor {
            shared: Arc::new(Mutex::new(Shared {
                info: MigrationInfo::default(),
                shutdown: Vec::new(),
                committed: false,
                started: None,
                listener: None,
            })),
            cancelled: Arc::new(AtomicBool::new(false)),
        }
    }
}

impl MigrationMonitor {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, Shared> {
        // A panic elsewhere must not stop status queries: take the data as it is.
        self.shared.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Called on every status change (QMP MIGRATION events).
    pub fn on_status(&self, f: impl Fn(MigrationStatus) + Send + Sync + 'static) {
        self.lock().listener = Some(Box::new(f));
    }

    /// The current `query-migrate` view.
    pub fn info(&self) -> MigrationInfo {
        let s = self.lock();
        let mut info = s.info.clone();
        if let (Some(t0), false) = (s.started, info.status.is_finished()) {
            info.total_time = Some(t0.elapsed().as_millis() as u64);
        }
        info
    }

    pub fn status(&self) -> MigrationStatus {
        self.lock().info.status
    }

    /// Ask the migration to stop: the source resumes, the destination discards. Has no
    /// effect once the migration is committed (the source told the destination to run,
    /// or the destination resumed) or finished.
    pub fn cancel(&self) {
        let s = self.lock();
        if s.committed || s.info.status.is_finished() {
            return;
        }
        self.cancelled.store(true, Ordering::SeqCst);
        for (h, read_only) in &s.shutdown {
            if *read_only {
                h.shutdown_read();
            } else {
                h.shutdown();
            }
        }
    }

    /// Pass the point of no return unless cancelled first; false when cancelled.
    pub(crate) fn commit(&self) -> bool {
        let mut s = self.lock();
        if self.is_cancelled() {
            return false;
        }
        s.committed = true;
        true
    }

    pub fn is_cancelled(&self) -> bool {
        self.cancelled.load(Ordering::SeqCst)
    }

    pub(crate) fn cancel_flag(&self) -> &AtomicBool {
        &self.cancelled
    }

    pub(crate) fn set_status(&self, status: MigrationStatus) {
        let mut s = self.lock();
        if s.info.status == status {
            return;
        }
        if status == MigrationStatus::Setup {
            s.started = Some(Instant::now());
        }
        if status.is_finished() {
            s.info.total_time = s.started.map(|t| t.elapsed().as_millis() as u64);
            s.shutdown.clear();
        }
        s.info.status = status;
        if let Some(l) = &s.listener {
            l(status);
        }
    }

    pub(crate) fn add_shutdown(&self, h: Option<ShutdownHandle>) {
        self.add_shutdown_how(h, false);
    }

    /// Cancel stops reading from this socket but leaves it open for a last message.
    pub(crate) fn add_shutdown_read(&self, h: Option<ShutdownHandle>) {
        self.add_shutdown_how(h, true);
    }

    fn add_shutdown_how(&self, h: Option<ShutdownHandle>, read_only: bool) {
        if let Some(h) = h {
            let mut s = self.lock();
            if self.is_cancelled() {
                if read_only {
                    h.shutdown_read();
                } else {
                    h.shutdown();
                }
            }
            s.shutdown.push((h, read_only));
        }
    }

    pub(crate) fn update(&self, f: impl FnOnce(&mut MigrationInfo)) {
        f(&mut self.lock().info);
    }

    pub(crate) fn fail(&self, e: &crate::MigrationError) {
        self.update(|i| i.error_desc = Some(e.to_string()));
        self.set_status(if e.is_cancel() {
            MigrationStatus::Cancelled
        } else {
            MigrationStatus::Failed
        });
    }
}
