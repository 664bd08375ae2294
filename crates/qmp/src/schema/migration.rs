//! Migration commands, their types and events (QEMU `qapi/migration.json`).

use serde::{Deserialize, Serialize};

use super::{command, Command, Event, NoArgs};

command!(
    /// `migrate`: start an outgoing migration to `uri`.
    Migrate, "migrate", MigrateArgs, ()
);
command!(
    /// `migrate-incoming`: start listening for an incoming migration (VMM started
    /// with incoming deferred).
    MigrateIncoming, "migrate-incoming", MigrateIncomingArgs, ()
);
command!(
    /// `migrate_cancel`: cancel the outgoing migration; the source resumes intact.
    MigrateCancel, "migrate_cancel", NoArgs, ()
);
command!(
    /// `migrate-set-capabilities`.
    MigrateSetCapabilities, "migrate-set-capabilities", MigrateSetCapabilitiesArgs, ()
);
command!(
    /// `query-migrate-capabilities`.
    QueryMigrateCapabilities, "query-migrate-capabilities", NoArgs,
    Vec<MigrationCapabilityStatus>
);
command!(
    /// `migrate-set-parameters`: every member optional; only the given ones change.
    MigrateSetParameters, "migrate-set-parameters", MigrationParameters, ()
);
command!(
    /// `query-migrate-parameters`.
    QueryMigrateParameters, "query-migrate-parameters", NoArgs, MigrationParameters
);
command!(
    /// `query-migrate`: status and statistics of the current or last migration.
    QueryMigrate, "query-migrate", NoArgs, MigrationInfo
);

/// Arguments of `migrate`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigrateArgs {
    /// Destination, e.g. `unix:/run/dst.sock`, `tcp:127.0.0.1:4444`, `fd:name`.
    pub uri: String,
    /// Block migration (deprecated in QEMU; a VMM may refuse it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blk: Option<bool>,
    /// Incremental block migration (deprecated in QEMU).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inc: Option<bool>,
    /// Ignored, as in QEMU: `migrate` always returns at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detach: Option<bool>,
    /// Resume a paused postcopy migration.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resume: Option<bool>,
}

/// Arguments of `migrate-incoming`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct MigrateIncomingArgs {
    /// Where to listen, e.g. `unix:/run/dst.sock`.
    pub uri: String,
    /// Exit the VMM when the incoming migration fails (QEMU's default: true).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_on_error: Option<bool>,
}

/// QEMU's `MigrationCapability`, plus baton's own capabilities.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MigrationCapability {
    /// XBZRLE page delta compression.
    Xbzrle,
    /// RDMA: pin all memory.
    RdmaPinAll,
    /// Throttle vCPUs when the migration does not converge.
    AutoConverge,
    /// Skip zero blocks (block migration).
    ZeroBlocks,
    /// Multithreaded compression (old QEMU).
    Compress,
    /// Emit `MIGRATION` events.
    Events,
    /// Postcopy RAM.
    PostcopyRam,
    /// COLO.
    #[serde(rename = "x-colo")]
    XColo,
    /// Release source RAM as it is sent (postcopy).
    ReleaseRam,
    /// Block migration (old QEMU).
    Block,
    /// A return path from the destination.
    ReturnPath,
    /// Pause before switchover, waiting for `migrate-continue`.
    PauseBeforeSwitchover,
    /// Several channels for RAM.
    Multifd,
    /// Migrate dirty bitmaps.
    DirtyBitmaps,
    /// Measure postcopy blocktime.
    PostcopyBlocktime,
    /// Activate block devices late on the destination.
    LateBlockActivate,
    /// Do not migrate shared memory (the destination maps the same memory).
    #[serde(rename = "x-ignore-shared")]
    XIgnoreShared,
    /// Check the VM UUID on the destination.
    ValidateUuid,
    /// Background snapshot.
    BackgroundSnapshot,
    /// Zero-copy send for multifd.
    ZeroCopySend,
    /// Postcopy preemption channel.
    PostcopyPreempt,
    /// Wait for the destination's switchover acknowledgement.
    SwitchoverAck,
    /// Dirty-limit throttling.
    DirtyLimit,
    /// RAM at fixed offsets in a file.
    MappedRam,
    /// baton: hand open device backends (TAP, vhost-user, VFIO fds) to the destination
    /// over SCM_RIGHTS. Needs a channel that can carry fds.
    BackendTransfer,
    /// baton: send devices' early-setup state while the source still runs, so the
    /// destination prepares before switchover.
    EarlySetup,
}

/// One capability and its state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigrationCapabilityStatus {
    /// The capability.
    pub capability: MigrationCapability,
    /// On or off.
    pub state: bool,
}

/// Arguments of `migrate-set-capabilities`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigrateSetCapabilitiesArgs {
    /// The capabilities to set.
    pub capabilities: Vec<MigrationCapabilityStatus>,
}

/// QEMU's `MultiFDCompression`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MultiFdCompression {
    /// No compression.
    None,
    /// zlib.
    Zlib,
    /// zstd.
    Zstd,
    /// Intel QPL.
    Qpl,
    /// Huawei UADK.
    Uadk,
}

/// QEMU's `MigMode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MigMode {
    /// Ordinary migration.
    Normal,
    /// CPR across a host reboot.
    CprReboot,
    /// CPR to a new process on the same host (fd transfer): baton's local live update.
    CprTransfer,
}

/// QEMU's `ZeroPageDetection`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ZeroPageDetection {
    /// Send zero pages as normal pages.
    None,
    /// Detect in the migration thread.
    Legacy,
    /// Detect in the multifd threads.
    Multifd,
}

/// QEMU's `MigrateSetParameters` / `MigrationParameters`. Every member is optional:
/// `migrate-set-parameters` changes only those given; `query-migrate-parameters` should
/// fill in all the VMM supports.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct MigrationParameters {
    /// Initial delay (ms) before the first self-announce.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub announce_initial: Option<u64>,
    /// Maximum delay (ms) between self-announces.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub announce_max: Option<u64>,
    /// Number of self-announce rounds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub announce_rounds: Option<u64>,
    /// Increase (ms) of the delay between rounds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub announce_step: Option<u64>,
    /// Compression level (old QEMU).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compress_level: Option<u8>,
    /// Compression threads (old QEMU).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compress_threads: Option<u8>,
    /// Wait for a compression thread (old QEMU).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compress_wait_thread: Option<bool>,
    /// Decompression threads (old QEMU).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decompress_threads: Option<u8>,
    /// Dirty-rate percentage of bandwidth that triggers throttling.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub throttle_trigger_threshold: Option<u8>,
    /// Initial vCPU throttle percentage.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_throttle_initial: Option<u8>,
    /// Throttle increment percentage.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_throttle_increment: Option<u8>,
    /// Tail-stage throttling.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_throttle_tailslow: Option<bool>,
    /// TLS credentials object id (`""` or `null` turns TLS off).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_creds: Option<String>,
    /// Hostname to validate the destination's certificate against.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_hostname: Option<String>,
    /// Authorization object id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_authz: Option<String>,
    /// Bandwidth limit, bytes per second.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_bandwidth: Option<u64>,
    /// Bandwidth (bytes/s) available for switchover, for the downtime estimate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub avail_switchover_bandwidth: Option<u64>,
    /// Maximum downtime, milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub downtime_limit: Option<u64>,
    /// COLO checkpoint delay, ms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub x_checkpoint_delay: Option<u32>,
    /// Incremental block migration (old QEMU).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub block_incremental: Option<bool>,
    /// Number of multifd channels.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub multifd_channels: Option<u8>,
    /// XBZRLE cache size, bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub xbzrle_cache_size: Option<u64>,
    /// Postcopy bandwidth limit, bytes per second.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_postcopy_bandwidth: Option<u64>,
    /// Maximum vCPU throttle percentage.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_cpu_throttle: Option<u8>,
    /// multifd compression method.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub multifd_compression: Option<MultiFdCompression>,
    /// zlib level for multifd.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub multifd_zlib_level: Option<u8>,
    /// zstd level for multifd.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub multifd_zstd_level: Option<u8>,
    /// Dirty-limit period, ms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub x_vcpu_dirty_limit_period: Option<u64>,
    /// Dirty page rate limit per vCPU, MB/s.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vcpu_dirty_limit: Option<u64>,
    /// Migration mode.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<MigMode>,
    /// Zero-page detection.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zero_page_detection: Option<ZeroPageDetection>,
    /// O_DIRECT for file migration.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub direct_io: Option<bool>,
}

/// QEMU's `MigrationStatus`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MigrationStatus {
    /// No migration has run.
    None,
    /// Setting up (handshake, early setup).
    Setup,
    /// Cancel requested.
    Cancelling,
    /// Cancelled; the source runs.
    Cancelled,
    /// Copying.
    Active,
    /// Postcopy running.
    PostcopyActive,
    /// Postcopy paused (network failure).
    PostcopyPaused,
    /// Postcopy recovery setup.
    PostcopyRecoverSetup,
    /// Postcopy recovering.
    PostcopyRecover,
    /// Done.
    Completed,
    /// Failed; the source runs.
    Failed,
    /// COLO.
    Colo,
    /// Paused before switchover (`pause-before-switchover`).
    PreSwitchover,
    /// Migrating device state at switchover.
    Device,
    /// Waiting for a device unplug.
    WaitUnplug,
}

/// QEMU's `MigrationStats` (`query-migrate`'s `ram`). Byte counts unless noted.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct MigrationStats {
    /// Bytes sent so far.
    pub transferred: u64,
    /// Bytes still to send.
    pub remaining: u64,
    /// Guest RAM size.
    pub total: u64,
    /// Zero pages (sent as such).
    pub duplicate: u64,
    /// Skipped pages (always 0; deprecated in QEMU).
    pub skipped: u64,
    /// Full pages sent.
    pub normal: u64,
    /// Bytes of full pages sent.
    pub normal_bytes: u64,
    /// Pages dirtied per second.
    pub dirty_pages_rate: u64,
    /// Throughput, megabits per second.
    pub mbps: f64,
    /// Dirty bitmap syncs.
    pub dirty_sync_count: u64,
    /// Postcopy page requests.
    pub postcopy_requests: u64,
    /// Target page size.
    pub page_size: u64,
    /// Bytes sent on multifd channels.
    pub multifd_bytes: u64,
    /// Pages sent per second.
    pub pages_per_second: u64,
    /// Bytes sent during precopy.
    pub precopy_bytes: u64,
    /// Bytes sent during the downtime.
    pub downtime_bytes: u64,
    /// Bytes sent during postcopy.
    pub postcopy_bytes: u64,
    /// Zero-copy syncs that missed.
    pub dirty_sync_missed_zero_copy: u64,
}

/// QEMU's `MigrationInfo` (`query-migrate`'s return). Absent members are omitted, as
/// QEMU omits them for a migration that has not reached the stage that sets them.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct MigrationInfo {
    /// The status; absent before any migration.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<MigrationStatus>,
    /// RAM statistics.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ram: Option<MigrationStats>,
    /// Milliseconds since the migration started (or its total when done).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total_time: Option<u64>,
    /// Expected downtime, ms, while active.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expected_downtime: Option<u64>,
    /// Actual downtime, ms, once completed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub downtime: Option<u64>,
    /// Setup time, ms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub setup_time: Option<u64>,
    /// Current vCPU throttle percentage.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_throttle_percentage: Option<u64>,
    /// Why it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_desc: Option<String>,
    /// Why migration is blocked right now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blocked_reasons: Option<Vec<String>>,
}

/// Event `MIGRATION`: the status changed.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct MigrationEvent {
    /// The new status.
    pub status: MigrationStatus,
}
impl Event for MigrationEvent {
    const NAME: &'static str = "MIGRATION";
}

/// Event `MIGRATION_PASS`: a new RAM pass starts.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct MigrationPassEvent {
    /// The pass number.
    pub pass: u64,
}
impl Event for MigrationPassEvent {
    const NAME: &'static str = "MIGRATION_PASS";
}
