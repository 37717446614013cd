//! The primary's network sync: for each configured volume, freeze it ([`crate::freeze`]), connect to the
//! standby, and run the engine's sync through a [`RemoteTarget`]. Every selected volume is tried; the caller gets
//! one typed result per volume as it finishes.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use engine::source::{sync_changes, Tracked};
use engine::sync::{sync_volume, SyncError, SyncOptions, SyncReport};
use engine::volume::{Access, IoOptions, Volume};
use link::LinkError;
use netproto::RemoteTarget;
use serde::Serialize;

use crate::config::{self, Config, ConfigError};
use crate::freeze::{with_frozen_source, TrackPlan};
use crate::{Error, ErrorKind};

/// Errors of the primary's sync.
#[derive(Debug, thiserror::Error)]
pub enum PrimaryError {
    /// Connecting to the standby failed.
    #[error(transparent)]
    Connect(#[from] netproto::ConnError),
    /// The source could not be opened.
    #[error("cannot open the source")]
    OpenSource(#[source] engine::volume::VolumeError),
    /// The standby did not open the volume.
    #[error("cannot open volume {volume} on the standby")]
    OpenRemote {
        /// Volume name.
        volume: String,
        /// The link's error (the standby's refusal).
        #[source]
        source: LinkError,
    },
    /// The primary's state directory could not be created.
    #[error("cannot create state directory {}", path.display())]
    StateDir {
        /// The directory.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The sync itself failed; the standby was asked afterwards which generation it holds.
    #[error("sync of volume {volume} failed; {standby}")]
    Sync {
        /// Volume name.
        volume: String,
        /// What the standby holds now, as far as this node can tell.
        standby: StandbyAfterFailure,
        /// The engine's error.
        #[source]
        source: engine::sync::SyncError,
    },
    /// Some of several volumes failed; the first failure is the source.
    #[error("{failed} of {total} volumes failed to sync ({names})")]
    SomeVolumes {
        /// How many failed.
        failed: usize,
        /// How many were tried.
        total: usize,
        /// Their names.
        names: String,
        /// The first failure.
        #[source]
        first: Box<Error>,
    },
}

impl PrimaryError {
    /// The kind of this error.
    pub fn kind(&self) -> ErrorKind {
        match self {
            PrimaryError::Connect(e) => crate::conn_error_kind(e),
            PrimaryError::OpenRemote { source, .. } => crate::link_error_kind(source),
            PrimaryError::Sync { source: engine::sync::SyncError::Link(l), .. } => crate::link_error_kind(l),
            PrimaryError::Sync { source: engine::sync::SyncError::SplitBrain { .. }, .. } => ErrorKind::Unsafe,
            PrimaryError::SomeVolumes { first, .. } => first.kind(),
            _ => ErrorKind::Failed,
        }
    }
}

/// What the standby holds after a failed sync: asked over a new connection, because a failure at commit time
/// leaves the primary unable to know whether the commit happened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StandbyAfterFailure {
    /// The standby still holds the generation it had when the sync started.
    Kept {
        /// That generation.
        generation: u64,
    },
    /// The standby committed the new generation; the primary's manifest was not updated.
    Committed {
        /// The new generation.
        generation: u64,
    },
    /// The standby could not be asked.
    Unknown {
        /// The generation it had when the sync started.
        before: u64,
        /// Why it could not be asked.
        why: String,
    },
}

impl std::fmt::Display for StandbyAfterFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StandbyAfterFailure::Kept { generation: 0 } => {
                write!(f, "the standby holds no complete generation yet (the first full sync did not finish)")
            }
            StandbyAfterFailure::Kept { generation } => {
                write!(f, "the standby keeps its last complete generation {generation}")
            }
            StandbyAfterFailure::Committed { generation } => write!(
                f,
                "the standby had already committed generation {generation}; this node's manifest was not updated, \
                 so the next sync compares both sides"
            ),
            StandbyAfterFailure::Unknown { before, why } => write!(
                f,
                "this node cannot tell whether the standby committed generation {} or kept generation {before} \
                 (asking it failed: {why}); either way it holds one complete generation, and the next sync \
                 compares both sides",
                before + 1
            ),
        }
    }
}

/// Asks the standby which generation volume `vol` holds now (a few tries: the failed session may still hold the
/// volume for a moment).
fn ask_standby(cfg: &Config, vol: &config::Volume, size: u64, before: u64) -> StandbyAfterFailure {
    let mut why = String::new();
    for attempt in 0..5 {
        if attempt > 0 {
            std::thread::sleep(Duration::from_millis(200));
        }
        let remote = connect(cfg).and_then(|conn| {
            RemoteTarget::open(
                conn,
                &vol.name,
                size,
                vol.block_size.resolve(size, &cfg.layout().source_manifest(&vol.name)),
            )
            .map_err(|source| PrimaryError::OpenRemote { volume: vol.name.clone(), source }.into())
        });
        match remote {
            Ok(r) => {
                let now = r.info_now();
                drop(r.close());
                return match now.generation {
                    g if g == before => StandbyAfterFailure::Kept { generation: g },
                    g if now.complete && Some(g) == before.checked_add(1) => {
                        StandbyAfterFailure::Committed { generation: g }
                    }
                    g => StandbyAfterFailure::Unknown {
                        before,
                        why: format!("it reports generation {g}, which this sync did not make"),
                    },
                };
            }
            Err(e) => why = crate::error_chain(&e),
        }
    }
    StandbyAfterFailure::Unknown { before, why }
}

/// One volume's result: the local sync's fields plus the wire's (the fields of `blockrep sync --json`).
#[derive(Debug, Clone, Serialize)]
pub struct NetReport {
    /// The engine's report.
    #[serde(flatten)]
    pub sync: SyncReport,
    /// All frame bytes this node sent (handshake included).
    pub bytes_on_wire: u64,
    /// Data bytes of extents / their bytes on the wire (1.0: nothing compressed).
    pub compression_ratio: f64,
}

/// Options of a network sync.
#[derive(Debug, Clone, Default)]
pub struct NetSyncOptions {
    /// I/O options for the source.
    pub io: IoOptions,
    /// Send-rate cap override (bytes per second).
    pub bwlimit: Option<u64>,
    /// Do not narrow changed blocks to 4 KiB pieces.
    pub no_refine: bool,
    /// Set to stop between two chunks (SIGINT/SIGTERM in [`sync_volumes`]).
    pub cancel: Option<Arc<AtomicBool>>,
    /// `--verify` (always compare) and `--discard-standby-changes` (resolve a split brain).
    pub choice: crate::local::ModeChoice,
}

/// The engine's options for one volume: block size, the mapped scan with the automatic I/O engine, refinement,
/// cancellation.
pub(crate) fn engine_options(block_size: u32, io: &IoOptions, no_refine: bool) -> SyncOptions {
    let mut opts = SyncOptions::new(block_size);
    opts.scan.mmap = io.engine == engine::io::EngineKind::Auto;
    opts.refine = !no_refine;
    opts
}

/// Connects to the configured standby.
pub fn connect(cfg: &Config) -> Result<netproto::Connection, Error> {
    connect_sending(cfg, None)
}

/// Connects to the configured standby; with `first`, sends that request behind the handshake
/// ([`netproto::connect_then`]: a round trip earlier), whose answer the caller receives.
fn connect_sending(cfg: &Config, first: Option<&netproto::Message>) -> Result<netproto::Connection, Error> {
    let peer = cfg.peer.as_deref().ok_or_else(|| ConfigError::Missing {
        path: cfg.path.clone(),
        what: "[primary] peer address of the standby",
    })?;
    let keys = cfg.keys()?;
    let (opts, timeout) = (cfg.handshake_options(), Duration::from_secs(cfg.connect_timeout_s));
    let conn = match first {
        Some(m) => netproto::connect_then(peer, &keys, &opts, timeout, m),
        None => netproto::connect_with(peer, &keys, &opts, timeout),
    };
    Ok(conn.map_err(PrimaryError::from)?)
}

/// Syncs one volume whose source is already frozen at `source` with a full scan; `progress` gets (bytes scanned,
/// total).
pub fn sync_one(
    cfg: &Config,
    vol: &config::Volume,
    source: &Path,
    o: &NetSyncOptions,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<NetReport, Error> {
    sync_one_planned(cfg, vol, source, (TrackPlan::Off, None), o, progress).map(|(r, _)| r)
}

/// [`sync_one`] with what the volume's tracker found ([`crate::freeze`]): reads only the tracked changes when
/// the standby is at the tracker's base generation and the sync is incremental, else scans in full and reports
/// why (`fallback_reason`); the new generation gets the identifier given with the plan (the snapshot is tagged
/// with it). Also returns whether the tracker's changes were used.
pub fn sync_one_planned(
    cfg: &Config,
    vol: &config::Volume,
    source: &Path,
    (plan, generation_id): (TrackPlan, Option<link::GenId>),
    o: &NetSyncOptions,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<(NetReport, bool), Error> {
    let src = Volume::open(source, Access::Read, &o.io).map_err(PrimaryError::OpenSource)?;
    let layout = cfg.layout();
    let manifest = layout.source_manifest(&vol.name);
    let block_size = vol.block_size.resolve(src.size(), &manifest);
    // The volume is opened in the handshake's last flight: its state arrives right behind the standby's proof.
    let open = netproto::client::open_request(&vol.name, src.size(), block_size);
    let mut conn = connect_sending(cfg, Some(&open))?;
    conn.set_compression((cfg.compression_level > 0).then_some(cfg.compression_level)).map_err(PrimaryError::from)?;
    conn.set_bwlimit(o.bwlimit.or(cfg.bwlimit));
    let mut remote =
        RemoteTarget::opened(conn).map_err(|source| PrimaryError::OpenRemote { volume: vol.name.clone(), source })?;
    let dir = manifest.parent().expect("a manifest lives in a directory");
    std::fs::create_dir_all(dir).map_err(|source| PrimaryError::StateDir { path: dir.into(), source })?;
    let mut opts = engine_options(block_size, &o.io, o.no_refine);
    opts.cancel = o.cancel.clone();
    opts.node = cfg.node.clone();
    opts.generation_id = generation_id;
    o.choice.apply(&mut opts);
    let request = crate::verify::requested(cfg, &vol.name); // `blockrep verify` on this node
    opts.force_compare |= request.is_some();
    let before = remote.info_now().generation;
    let mut fallback = None;
    let tracked = match plan {
        TrackPlan::Changes { .. } if opts.force_compare || o.choice.discard_standby_changes => {
            let by = match o.choice.verify || o.choice.discard_standby_changes {
                true => "--verify or --discard-standby-changes",
                false => "requested with blockrep verify",
            };
            fallback = Some(format!("{} ({by})", crate::freeze::COMPARES_EVERY_BLOCK));
            None
        }
        TrackPlan::Changes { tracker, base_generation, ranges } => {
            let mut t = Tracked::new(&src, block_size, base_generation, tracker, &ranges);
            match sync_changes(&vol.name, &mut t, &manifest, &mut remote, &opts, progress) {
                // Refused before anything was sent: the standby or this node's manifest is not at the base.
                Err(SyncError::NoBaseForChanges { why, .. }) => {
                    fallback = Some(format!("base generation mismatch: {why}"));
                    None
                }
                r => Some(r),
            }
        }
        TrackPlan::FullScan { reason } => {
            fallback = Some(reason);
            None
        }
        TrackPlan::Off => None,
    };
    if let Some(reason) = &fallback {
        if reason.starts_with(crate::freeze::PERIODIC_FULL_SCAN) {
            tracing::info!(volume = %vol.name, %reason, "tracked volume: full scan");
        } else {
            tracing::warn!(volume = %vol.name, %reason, "tracked volume: falling back to a full scan");
        }
    }
    let used_tracker = tracked.is_some();
    let result = match tracked {
        Some(r) => r,
        None => sync_volume(&vol.name, &src, &manifest, &mut remote, &opts, progress),
    };
    let r = match result {
        Ok(mut r) => {
            r.fallback_reason = fallback;
            if let Some(q) = &request {
                let explicit = o.choice.verify || o.choice.discard_standby_changes;
                crate::verify::consume(cfg, &vol.name, q, &mut r, explicit);
            }
            r
        }
        Err(source) => {
            drop(remote); // end this session so that the standby releases the volume
            let standby = ask_standby(cfg, vol, src.size(), before);
            return Err(PrimaryError::Sync { volume: vol.name.clone(), standby, source }.into());
        }
    };
    let s = remote.close().stats();
    let report = NetReport {
        sync: r,
        bytes_on_wire: s.bytes_sent,
        compression_ratio: if s.extent_wire_bytes_sent == 0 {
            1.0
        } else {
            s.extent_bytes_sent as f64 / s.extent_wire_bytes_sent as f64
        },
    };
    Ok((report, used_tracker))
}

/// One volume's outcome in [`sync_volumes`].
#[derive(Debug)]
pub struct VolumeOutcome {
    /// Volume name.
    pub volume: String,
    /// Its report, or why it failed.
    pub result: Result<NetReport, Error>,
}

/// What the caller of [`sync_volumes`] sees while it runs.
pub trait SyncObserver {
    /// Bytes scanned of the volume being synced, and its size.
    fn progress(&mut self, volume: &str, done: u64, total: u64);
    /// A volume finished (`total`: how many volumes this run syncs).
    fn finished(&mut self, outcome: &VolumeOutcome, total: usize);
}

/// Every volume's outcome of one [`sync_volumes`] run.
#[derive(Debug)]
pub struct SyncRun {
    /// How many volumes were selected.
    pub total: usize,
    /// The outcomes, in order (fewer than `total` after an interrupt).
    pub outcomes: Vec<VolumeOutcome>,
}

impl SyncRun {
    /// The run as one result: the reports, or the single failure, or a summary naming the failed volumes with
    /// the first failure as its cause (and its kind).
    pub fn into_result(self) -> Result<Vec<NetReport>, Error> {
        let (mut ok, mut failed) = (Vec::new(), Vec::new());
        for o in self.outcomes {
            match o.result {
                Ok(r) => ok.push(r),
                Err(e) => failed.push((o.volume, e)),
            }
        }
        match failed.len() {
            0 => Ok(ok),
            1 if self.total == 1 => Err(failed.pop().expect("one").1),
            n => {
                let names = failed.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>().join(", ");
                let first = Box::new(failed.remove(0).1);
                Err(PrimaryError::SomeVolumes { failed: n, total: self.total, names, first }.into())
            }
        }
    }
}

/// `blockrep sync [VOLUME...]` over the network: syncs the named (or all) volumes one after the other, each
/// from a frozen source. SIGINT/SIGTERM stop the running sync between two chunks and skip the rest.
pub fn sync_volumes(
    cfg: &Config,
    names: &[String],
    o: &NetSyncOptions,
    observer: &mut dyn SyncObserver,
) -> Result<SyncRun, Error> {
    sync_volumes_with(cfg, names, o, observer, None)
}

/// [`sync_volumes`]; with `cancel`, that flag stops it instead of SIGINT/SIGTERM (inside `serve`, whose own
/// signal handling must not be taken over: a switchover's final sync).
pub fn sync_volumes_with(
    cfg: &Config,
    names: &[String],
    o: &NetSyncOptions,
    observer: &mut dyn SyncObserver,
    cancel: Option<Arc<AtomicBool>>,
) -> Result<SyncRun, Error> {
    let vols = cfg.select(names)?;
    if !crate::schedule::replication_enabled(cfg) {
        tracing::warn!("replication is disabled on this node (blockrep replication enable): nothing synced");
        crate::history::append(cfg, crate::history::Event::SyncSkipped);
        return Ok(SyncRun { total: 0, outcomes: Vec::new() });
    }
    let _lock = crate::lock::SyncLock::acquire(cfg)?; // held for the whole run, retries included
    let cancel = match cancel {
        Some(c) => c,
        None => crate::signals::stop_flag("interrupted: stopping the sync and cleaning up")?,
    };
    let o = NetSyncOptions { cancel: Some(cancel.clone()), ..o.clone() };
    let mut run = SyncRun { total: vols.len(), outcomes: Vec::new() };
    for vol in vols {
        let (retries, pause) = (cfg.schedule.retry_count, cfg.schedule.retry_interval);
        let (mut attempt, mut fill) = (0, None);
        let result = loop {
            attempt += 1;
            let result = with_frozen_source(cfg, vol, &mut fill, |source, plan, id| {
                sync_one_planned(cfg, vol, source, (plan, id), &o, &mut |d, t| observer.progress(&vol.name, d, t))
            });
            match &result {
                Err(e)
                    if attempt <= retries && crate::schedule::worth_retrying(e) && !cancel.load(Ordering::SeqCst) =>
                {
                    let error = crate::error_chain(e);
                    tracing::warn!(volume = %vol.name, attempt, retries, "sync failed, retrying in {}: {error}",
                        crate::schedule::format_duration(pause));
                    if crate::schedule::pause(pause, &cancel) {
                        continue;
                    }
                    break result;
                }
                _ => break result,
            }
        };
        let cancelled = cancel.load(Ordering::SeqCst);
        let record = crate::schedule::after_volume(cfg, &vol.name, &result, cancelled, attempt);
        let mut judged = crate::schedule::snapshot_judgement(&vol.name, &result, fill);
        judged.extend(crate::schedule::tracking_judgement(&vol.name, &result, &record));
        crate::alarms::update(cfg, &judged);
        let outcome = VolumeOutcome { volume: vol.name.clone(), result };
        observer.finished(&outcome, run.total);
        run.outcomes.push(outcome);
        if cancelled {
            break;
        }
    }
    crate::schedule::after_run(cfg, &run.outcomes, cancel.load(Ordering::SeqCst));
    Ok(run)
}
