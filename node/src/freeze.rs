//! Freezing a source for the duration of a sync (the snapshot lifecycle).
//!
//! `snapshot = "lvm"`: a classic LVM snapshot `<lv>_blockrep_snap` (tagged `blockrep_snapshot`) is created before
//! the sync and removed after it, whatever the outcome; a snapshot left by a crashed run is recognised by its tag
//! and origin, and removed with a log line (by the next sync, or by a demote: [`remove_leftover_snapshots`],
//! which removes the volume's tracker too). A snapshot that overflowed during the sync fails the sync with a
//! message suggesting a larger `snapshot_size`.
//!
//! Tracked changes (`track`, docs/config.md): the snapshot a sync read is kept afterwards as the volume's tracker,
//! tagged `blockrep_tracker`, `blockrep_gen_<id>` (the generation it holds, committed on the standby) and
//! `blockrep_since_full_<n>` (tracked syncs since the last full scan). The next sync asks it what changed since:
//! `thin_delta` between it and the new thin snapshot ([`lvmctl::thin`]; the tracker's thin id from the listing
//! made before the sync, the new snapshot's from `dmsetup table`), or the classic snapshot's exception store
//! ([`lvmctl::exception_store`]), and reads only that ([`TrackPlan::Changes`]). When the tracker is missing, not
//! ours, invalidated, unreadable, of another generation than this node's current one, or a periodic full scan is
//! due, the plan is a full scan with the reason ([`TrackPlan::FullScan`]).
//!
//! A tracked volume's snapshots alternate between two names, the snapshot name and `<lv>_blockrep_base`: the
//! tracker keeps the name it was created with and the new snapshot takes the other. The new snapshot is created
//! with the tracker's tags already, naming the generation its sync is to commit (the identifier is chosen here and
//! handed to the engine), so that after a successful sync keeping it costs one lvm command, the old tracker's
//! removal (it cost four: a listing, lvremove, lvrename, lvchange). The tag is evidence only once this node's
//! current generation has that identifier: a sync that dies before its commit leaves a snapshot whose tag names no
//! committed generation, and the next sync removes it as left over; one that dies after its commit and before the
//! old tracker's removal leaves two, and the next sync takes the one of the current generation.

use std::path::{Path, PathBuf};

use engine::generations;
use link::{GenId, GenRecord};
use lvmctl::{Lv, Lvm, LvmError, SnapshotSize as LvmSize, SNAPSHOT_TAG};
use tracing::{info, warn};

use crate::config::{Config, SnapshotDriver, SnapshotSize, Track, Volume};
use crate::{Error, ErrorKind};

/// How the fallback reason of a periodic full scan (`full_scan_every`) starts.
pub const PERIODIC_FULL_SCAN: &str = "periodic full scan";
/// How the fallback reason of a sync that compares every block on request (`--verify`, `blockrep verify`,
/// `--discard-standby-changes`) starts.
pub const COMPARES_EVERY_BLOCK: &str = "this sync compares every block";

/// Tag of a volume's tracker (the previous sync's snapshot, kept).
pub const TRACKER_TAG: &str = "blockrep_tracker";
/// Prefix of the tracker's tag naming the generation it holds (32 hex digits follow).
pub const GEN_TAG_PREFIX: &str = "blockrep_gen_";
/// Prefix of the tracker's tag counting tracked syncs since the last full scan.
pub const SINCE_FULL_TAG_PREFIX: &str = "blockrep_since_full_";

/// What the sync of a frozen source may use besides a full scan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TrackPlan {
    /// The volume is not tracked: a full scan.
    Off,
    /// A tracked volume synced with a full scan, and why (no usable tracker, or a periodic full scan).
    FullScan {
        /// Why.
        reason: String,
    },
    /// The tracker's list of what changed since generation `base_generation` (its number in this node's history).
    Changes {
        /// The tracker's name in reports ("thin_delta", "exception store").
        tracker: &'static str,
        /// The generation every unlisted byte still has.
        base_generation: u64,
        /// Changed byte ranges `(offset, length)` of the source.
        ranges: Vec<(u64, u64)>,
    },
}

/// Errors of freezing a source.
#[derive(Debug, thiserror::Error)]
pub enum FreezeError {
    /// The lvm2 tool cannot be used.
    #[error("volume {volume}")]
    NoLvm {
        /// Volume name.
        volume: String,
        /// Why.
        #[source]
        source: LvmError,
    },
    /// The source is not an active LV.
    #[error(
        "volume {volume}: snapshot = \"lvm\" needs the source {} to be an active LVM logical volume",
        source_path.display()
    )]
    NotAnLv {
        /// Volume name.
        volume: String,
        /// The configured source.
        source_path: std::path::PathBuf,
        /// lvm's answer.
        #[source]
        source: LvmError,
    },
    /// An LV with the snapshot's name exists and is not a snapshot blockrep left behind.
    #[error("volume {volume}: {refusal}; rename it or set snapshot_name")]
    NotOurs {
        /// Volume name.
        volume: String,
        /// lvmctl's refusal (in the message, which ends with what to do).
        refusal: Box<LvmError>,
    },
    /// Checking for a leftover snapshot failed.
    #[error("volume {volume}: cannot check for a leftover snapshot")]
    Leftover {
        /// Volume name.
        volume: String,
        /// lvm's error.
        #[source]
        source: LvmError,
    },
    /// The snapshot could not be created.
    #[error("volume {volume}: cannot create the snapshot {vg}/{snapshot}")]
    Create {
        /// Volume name.
        volume: String,
        /// VG.
        vg: String,
        /// Snapshot name.
        snapshot: String,
        /// lvm's error.
        #[source]
        source: LvmError,
    },
    /// `track = "thin"` on an LV that is not a thin LV.
    #[error(
        "volume {volume}: track = \"thin\" needs a thin LV, and {lv} is not one; use track = \"snapshot\" or \"none\""
    )]
    NotThin {
        /// Volume name.
        volume: String,
        /// The source LV (vg/lv).
        lv: String,
    },
    /// Finding out whether the source is a thin LV failed.
    #[error("volume {volume}: cannot tell whether {lv} is a thin LV")]
    ThinQuery {
        /// Volume name.
        volume: String,
        /// The source LV (vg/lv).
        lv: String,
        /// Why.
        #[source]
        source: Box<lvmctl::thin::ThinError>,
    },
    /// The snapshot filled up during the sync, which therefore failed.
    #[error(
        "volume {volume}: the snapshot {vg}/{snapshot} ({size} bytes) filled up and was invalidated during the \
         sync; set a larger snapshot_size (the shadow keeps its previous generation)"
    )]
    Overflowed {
        /// Volume name.
        volume: String,
        /// VG.
        vg: String,
        /// Snapshot name.
        snapshot: String,
        /// Its size in bytes.
        size: u64,
        /// How the sync failed.
        #[source]
        source: Box<Error>,
    },
}

impl FreezeError {
    /// The kind of this error.
    pub fn kind(&self) -> ErrorKind {
        match self {
            FreezeError::NoLvm { .. } | FreezeError::NotOurs { .. } | FreezeError::NotThin { .. } => ErrorKind::Usage,
            _ => ErrorKind::Failed,
        }
    }
}

/// Runs `f` with the path of a frozen image of the volume's source, what a tracker found and the identifier the
/// sync's new generation is to have (`None`: the engine picks one), and cleans up afterwards. `f` returns its
/// value and whether it used the tracker's changes (`false`: it scanned in full). `fill` gets a classic
/// snapshot's fill level (percent) as it was when `f` returned: it only fills up, so that is its peak (`None`: no
/// snapshot, a thin one, or it could not be read).
pub fn with_frozen_source<T>(
    cfg: &Config,
    vol: &Volume,
    fill: &mut Option<f64>,
    f: impl FnOnce(&Path, TrackPlan, Option<GenId>) -> Result<(T, bool), Error>,
) -> Result<T, Error> {
    *fill = None;
    let source = cfg.source_of(vol)?;
    match &vol.snapshot {
        SnapshotDriver::None => f(source, TrackPlan::Off, None).map(|(t, _)| t),
        SnapshotDriver::Lvm { size, name } => {
            let lvm = Lvm::new().map_err(|source| FreezeError::NoLvm { volume: vol.name.clone(), source })?;
            let size = match *size {
                SnapshotSize::Bytes(b) => LvmSize::Bytes(b),
                SnapshotSize::Percent(p) => LvmSize::Percent(p),
            };
            with_lvm_snapshot(cfg, &lvm, vol, source, (name.as_deref(), size), fill, f)
        }
    }
}

/// Removes the snapshots of this node's `snapshot = "lvm"` sources that an interrupted sync left behind (the node
/// died during a sync as primary) and their trackers (`track`), and returns their names (`vg/name`). Used when the
/// node is demoted: a standby's volume must not keep a snapshot of itself, which would copy every write the new
/// primary's syncs make to it until it fills up. Nothing is removed while a sync holds the sync lock (its snapshot
/// is in use); a volume whose source is missing or not an LV is skipped.
pub fn remove_leftover_snapshots(cfg: &Config) -> Result<Vec<String>, Error> {
    let lvm_volumes: Vec<(&Volume, &Path, Option<&str>)> = cfg
        .volumes
        .iter()
        .filter_map(|v| match (&v.snapshot, v.source.as_deref()) {
            (SnapshotDriver::Lvm { name, .. }, Some(source)) => Some((v, source, name.as_deref())),
            _ => None,
        })
        .collect();
    if lvm_volumes.is_empty() {
        return Ok(Vec::new());
    }
    let Ok(_lock) = crate::lock::SyncLock::acquire(cfg) else { return Ok(Vec::new()) };
    let mut removed = Vec::new();
    for (vol, source, name) in lvm_volumes {
        let lvm = Lvm::new().map_err(|source| FreezeError::NoLvm { volume: vol.name.clone(), source })?;
        let Ok(lv) = lvm.lv_for_device(source) else { continue };
        let snap = snapshot_name(&lv, name);
        // The volume's trackers first (a tracker in the snapshot's slot is not a leftover of an interrupted sync):
        // as a standby's volume it would keep (classic: copy) every block the new primary's syncs write, and its
        // generation will not be this node's current one when it syncs again.
        for r in remove_trackers(&lvm, &lv, &snap) {
            match r {
                TrackerRemoval::Removed(name) => removed.push(name),
                TrackerRemoval::NotOurs(_) => {}
                TrackerRemoval::Failed(_, why) => warn!(volume = %vol.name, "{why}"),
            }
        }
        let gone = lvm.remove_leftover_snapshot(&lv.vg, &lv.name, &snap).map_err(|e| match e {
            e @ LvmError::NotOurs { .. } => FreezeError::NotOurs { volume: vol.name.clone(), refusal: Box::new(e) },
            e => FreezeError::Leftover { volume: vol.name.clone(), source: e },
        })?;
        if gone {
            removed.push(format!("{}/{snap}", lv.vg));
        }
    }
    Ok(removed)
}

/// The name of the sync snapshot of the origin LV `lv`: `name` (`snapshot_name`) or `<lv>_blockrep_snap`.
pub(crate) fn snapshot_name(lv: &Lv, name: Option<&str>) -> String {
    name.map(str::to_owned).unwrap_or_else(|| format!("{}_blockrep_snap", lv.name))
}

/// The second name a tracked volume's snapshots take, `<lv>_blockrep_base`: the tracker keeps the name it was
/// created with, and the next sync's snapshot takes the other one (no rename, no lvm command more).
pub(crate) fn tracker_name(lv: &str) -> String {
    format!("{lv}_blockrep_base")
}

/// What [`remove_trackers`] did with one LV.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum TrackerRemoval {
    /// Removed (`vg/name`).
    Removed(String),
    /// An LV named `<lv>_blockrep_base` that is not blockrep's (`vg/name`): left alone.
    NotOurs(String),
    /// Could not be removed (`vg/name`, and what to do).
    Failed(String, String),
}

/// Removes the trackers of `origin` (blockrep's snapshots tagged `blockrep_tracker`, in either of the two names,
/// and anything of blockrep's named `<lv>_blockrep_base`) when tracking ends for good: a demote (the volume
/// becomes a standby's, whose writes a tracker would pin or copy) or a deconfigure (nothing would ever remove it,
/// and it costs pool space, or with a classic snapshot a copy of every write to the origin, until it fills up).
/// `snap` is the volume's snapshot name; a snapshot there that is not a tracker is left to
/// [`Lvm::remove_leftover_snapshot`].
pub(crate) fn remove_trackers(lvm: &Lvm, origin: &Lv, snap: &str) -> Vec<TrackerRemoval> {
    let mut done = Vec::new();
    for name in [tracker_name(&origin.name), snap.to_owned()] {
        let full = format!("{}/{name}", origin.vg);
        match lvm.find_lv(&origin.vg, &name) {
            Ok(None) => {}
            Ok(Some(l)) if name == snap && !l.has_tag(TRACKER_TAG) => {}
            Ok(Some(l)) if !is_ours(&l) => done.push(TrackerRemoval::NotOurs(full)),
            Ok(Some(_)) => done.push(match lvm.remove_lv(&origin.vg, &name) {
                Ok(()) => TrackerRemoval::Removed(full),
                Err(e) => {
                    let why = format!("cannot remove the tracker {full}: {e}; remove it with `lvremove {full}`");
                    TrackerRemoval::Failed(full, why)
                }
            }),
            Err(e) => {
                done.push(TrackerRemoval::Failed(full.clone(), format!("cannot look for the tracker {full}: {e}")))
            }
        }
    }
    done
}

/// Removes the snapshot when dropped (also on error and after an interrupt), unless it became the tracker.
struct SnapGuard<'a> {
    lvm: &'a Lvm,
    vg: String,
    name: String,
    kept: bool,
}

impl Drop for SnapGuard<'_> {
    fn drop(&mut self) {
        if self.kept {
            return;
        }
        match self.lvm.remove_lv(&self.vg, &self.name) {
            Ok(()) => info!(vg = %self.vg, snapshot = %self.name, "snapshot removed"),
            Err(e) => warn!(
                "cannot remove snapshot {}/{}: {e}; remove it with `lvremove {}/{}`",
                self.vg, self.name, self.vg, self.name
            ),
        }
    }
}

/// Which tracker a volume uses.
#[derive(Debug)]
enum Kind {
    None,
    Thin(lvmctl::thin::ThinLv),
    Classic,
}

/// The tracker LV as found before the sync.
#[derive(Debug)]
struct Base {
    lv: Lv,
    /// Tracked syncs since the last full scan.
    since_full: u64,
}

fn kind_of(lvm: &Lvm, vol: &Volume, lv: &Lv) -> Result<Kind, Error> {
    let thin = || -> Result<_, Error> {
        lvm.thin_lv(&lv.vg, &lv.name).map_err(|e| {
            FreezeError::ThinQuery { volume: vol.name.clone(), lv: lv.full_name(), source: Box::new(e) }.into()
        })
    };
    Ok(match vol.track {
        Track::None => Kind::None,
        Track::Snapshot => Kind::Classic,
        Track::Auto => thin()?.map_or(Kind::None, Kind::Thin),
        Track::Thin => {
            Kind::Thin(thin()?.ok_or_else(|| FreezeError::NotThin { volume: vol.name.clone(), lv: lv.full_name() })?)
        }
    })
}

fn is_ours(lv: &Lv) -> bool {
    lv.has_tag(TRACKER_TAG) || lv.has_tag(SNAPSHOT_TAG)
}

fn with_lvm_snapshot<T>(
    cfg: &Config,
    lvm: &Lvm,
    vol: &Volume,
    source: &Path,
    (name, size): (Option<&str>, LvmSize),
    fill: &mut Option<f64>,
    f: impl FnOnce(&Path, TrackPlan, Option<GenId>) -> Result<(T, bool), Error>,
) -> Result<T, Error> {
    let volume = vol.name.as_str();
    // The steps before and after the sync ask about the same few LVs: one listing answers them (each lvm command
    // costs 0.1-0.5 s), and every change this node makes empties it. Off during the sync itself, which is long.
    lvm.cache_reports(true);
    let lv = lvm.lv_for_device(source).map_err(|e| FreezeError::NotAnLv {
        volume: volume.into(),
        source_path: source.into(),
        source: e,
    })?;
    let leftover = |e: LvmError| -> Error {
        match e {
            e @ LvmError::NotOurs { .. } => FreezeError::NotOurs { volume: volume.into(), refusal: Box::new(e) },
            e => FreezeError::Leftover { volume: volume.into(), source: e },
        }
        .into()
    };
    let kind = kind_of(lvm, vol, &lv)?;
    let tracked = !matches!(kind, Kind::None);
    // A volume's snapshots take one of two names: the snapshot name and the tracker name. The tracker keeps the
    // name it was created with; the new snapshot takes the other one.
    let snap_slot = snapshot_name(&lv, name);
    let base_slot = tracker_name(&lv.name);
    let at_snap = lvm.find_lv(&lv.vg, &snap_slot).map_err(leftover)?;
    let at_base = lvm.find_lv(&lv.vg, &base_slot).map_err(leftover)?;
    let current = generations::read_source(&generations_path(cfg, vol)).history.current;
    let current_id = current.as_ref().map(|c| generations::id_hex(&c.id));
    // Something else named like a tracker blocks tracking: it is left alone, and no tracker is kept.
    let foreign = at_base.as_ref().filter(|b| !is_ours(b)).map(Lv::full_name).filter(|_| tracked);
    // Whether this sync's snapshot is to become the tracker.
    let keep = tracked && foreign.is_none();
    // The tracker: blockrep's snapshot tagged as one in either name; the one holding this node's current
    // generation when both are (a sync that committed and died before removing the old one).
    let tracker = match keep {
        true => {
            let mut found: Vec<&Lv> =
                [at_base.as_ref(), at_snap.as_ref()].into_iter().flatten().filter(|l| l.has_tag(TRACKER_TAG)).collect();
            found.sort_by_key(|l| gen_tag(l) != current_id.as_deref());
            found.first().map(|l| (*l).clone())
        }
        false => None,
    };
    let new_slot = match &tracker {
        Some(t) if t.name == snap_slot => base_slot.clone(),
        _ => snap_slot.clone(),
    };
    // Anything else of blockrep's under the two names is left over: a tracker (or a snapshot tagged as one) of an
    // earlier sync that this sync does not use, one that tracking no longer uses, or a plain snapshot of an
    // interrupted sync (removed with lvmctl's checks and log line; an LV of that name that is not ours is refused).
    let why =
        if tracked { "left over from an earlier sync (not the tracker this sync uses)" } else { "tracking is off" };
    for l in [at_snap.as_ref(), at_base.as_ref()].into_iter().flatten() {
        if tracker.as_ref().is_some_and(|t| t.name == l.name) {
            continue;
        }
        if l.name == snap_slot && !l.has_tag(TRACKER_TAG) {
            lvm.remove_leftover_snapshot(&lv.vg, &lv.name, &snap_slot).map_err(leftover)?;
            continue;
        }
        if !is_ours(l) {
            continue; // under the tracker's name: `foreign` says why nothing is tracked
        }
        match lvm.remove_lv(&l.vg, &l.name) {
            Ok(()) => info!(volume, snapshot = %l.full_name(), "{why}: removed"),
            // The new snapshot is to take its name: the sync cannot go on.
            Err(e) if new_slot == l.name => {
                return Err(FreezeError::Leftover { volume: volume.into(), source: e }.into())
            }
            Err(e) => warn!(volume, "cannot remove {} ({why}): {e}", l.full_name()),
        }
    }
    // A metadata snapshot left reserved by a crash (during thin_delta) is released first, whatever the plan.
    let released = match &kind {
        Kind::Thin(thin) => {
            match lvmctl::thin::ThinTools::new().and_then(|t| t.release_leftover(&thin.pool_dm_name())) {
                Ok(_) => true,
                Err(e) => {
                    warn!(volume, "{}", crate::error_chain(&e));
                    false
                }
            }
        }
        _ => false,
    };
    // What the tracker allows, as far as it can be known before the new snapshot exists (thin_delta needs it).
    let base = tracker.map(|lv| Base { since_full: tag_value(&lv, SINCE_FULL_TAG_PREFIX).unwrap_or(0), lv });
    let checked = match (&kind, &foreign) {
        (Kind::None, _) => None,
        (_, Some(name)) => Some(Err(format!(
            "{name} is not blockrep's (no {TRACKER_TAG} tag): it is left alone; rename it to let blockrep track"
        ))),
        _ => Some(check_base(vol, &lv, base.as_ref(), current.as_ref())),
    };
    // The new snapshot is tagged as the tracker it becomes after a successful sync, with the generation that sync
    // is to commit (its identifier chosen here) and the count it will have: keeping it then costs no lvm command
    // but the old tracker's removal. Until that commit no node's current generation has its identifier, so a
    // crash before leaves a snapshot no sync takes for a tracker.
    let id = keep.then(generations::new_id);
    let since_full = match &checked {
        Some(Ok((_, b))) => b.since_full + 1,
        _ => 0,
    };
    let tags: Vec<String> = match id {
        Some(id) => vec![
            SNAPSHOT_TAG.into(),
            TRACKER_TAG.into(),
            format!("{GEN_TAG_PREFIX}{}", generations::id_hex(&id)),
            format!("{SINCE_FULL_TAG_PREFIX}{since_full}"),
        ],
        None => vec![SNAPSHOT_TAG.into()],
    };
    let tag_refs: Vec<&str> = tags.iter().map(String::as_str).collect();
    // A thin LV gets a thin snapshot (no size, no copy-on-write into the VG's free space, which a VG given whole to
    // its pool does not have), also with tracking off (the LV report says so); only the classic tracker needs a
    // classic snapshot.
    let thin_snapshot = match &kind {
        Kind::Thin(_) => true,
        Kind::Classic => false,
        Kind::None => lv.segtype == "thin",
    };
    // The snapshot is not listed after lvcreate: its device is /dev/VG/NAME, a classic one's store has the size
    // asked for, and a thin one's thin id (for thin_delta) comes from the kernel's table (`thin_changes`), a tenth
    // of an lvs's time.
    let cow_size = if thin_snapshot {
        lvm.create_thin_snapshot_only(&lv.vg, &lv.name, &new_slot, &tag_refs).map(|()| 0)
    } else {
        lvm.create_snapshot_only(&lv.vg, &lv.name, &new_slot, size, &tag_refs)
    }
    .map_err(|e| FreezeError::Create {
        volume: volume.into(),
        vg: lv.vg.clone(),
        snapshot: new_slot.clone(),
        source: e,
    })?;
    let mut guard = SnapGuard { lvm, vg: lv.vg.clone(), name: new_slot.clone(), kept: false };
    let path = Path::new("/dev").join(&lv.vg).join(&new_slot);
    info!(volume, snapshot = %format!("{}/{new_slot}", lv.vg), thin = thin_snapshot, "snapshot created");
    let plan = match checked {
        None => TrackPlan::Off,
        Some(Err(reason)) => TrackPlan::FullScan { reason },
        Some(Ok((base_generation, b))) => {
            let ranges = match &kind {
                Kind::Thin(thin) => thin_changes(thin, &b.lv, (&lv.name, &new_slot), released),
                Kind::Classic => classic_changes(&lv, &b.lv),
                Kind::None => Err("tracking is off".into()),
            };
            match ranges {
                Ok((tracker, ranges)) => TrackPlan::Changes { tracker, base_generation, ranges },
                Err(reason) => TrackPlan::FullScan { reason },
            }
        }
    };
    match &plan {
        TrackPlan::Changes { tracker, base_generation, ranges } => info!(
            volume,
            tracker,
            base_generation,
            ranges = ranges.len(),
            bytes = ranges.iter().map(|r| r.1).sum::<u64>(),
            "tracked changes"
        ),
        TrackPlan::FullScan { reason } => info!(volume, %reason, "tracked volume: full scan"),
        TrackPlan::Off => {}
    }
    lvm.cache_reports(false);
    let result = f(&path, plan, id);
    lvm.cache_reports(true);
    // A thin snapshot has no fill level of its own (the pool's is the pool's).
    let overflowed = !thin_snapshot
        && match lvm.snapshot_status(&lv.vg, &new_slot) {
            Ok(s) => {
                *fill = Some(s.fill_percent);
                s.invalid
            }
            Err(e) => {
                warn!("cannot read the fill state of {}/{new_slot}: {e}", lv.vg);
                false
            }
        };
    if let (Ok((_, used)), Some(id), false) = (&result, id, overflowed) {
        let since = if *used { base.as_ref().map_or(0, |b| b.since_full) + 1 } else { 0 };
        let new = Tagged { name: &new_slot, id, since_full };
        guard.kept = keep_as_tracker(cfg, lvm, vol, &lv.vg, new, base.as_ref().map(|b| &b.lv), since);
    }
    drop(guard);
    match result {
        Err(e) if overflowed => Err(FreezeError::Overflowed {
            volume: volume.into(),
            vg: lv.vg,
            snapshot: new_slot,
            size: cow_size,
            source: Box::new(e),
        }
        .into()),
        r => r.map(|(t, _)| t),
    }
}

/// The manifest path of the volume on this node (primary side), whose generations file names the current
/// generation.
fn generations_path(cfg: &Config, vol: &Volume) -> PathBuf {
    generations::source_path(&cfg.layout().source_manifest(&vol.name))
}

/// The generation a tracker's tag names (32 hex digits).
fn gen_tag(lv: &Lv) -> Option<&str> {
    lv.tags.iter().find_map(|t| t.strip_prefix(GEN_TAG_PREFIX))
}

/// The number a tag with `prefix` carries.
fn tag_value(lv: &Lv, prefix: &str) -> Option<u64> {
    lv.tags.iter().find_map(|t| t.strip_prefix(prefix)).and_then(|n| n.parse().ok())
}

/// Whether the tracker may give this sync its changes: the generation every unlisted byte still has (its number
/// in this node's history) and the tracker, or why the sync scans in full.
fn check_base<'a>(
    vol: &Volume,
    lv: &Lv,
    base: Option<&'a Base>,
    current: Option<&GenRecord>,
) -> Result<(u64, &'a Base), String> {
    let Some(found) = base else {
        return Err(format!(
            "no tracker: no snapshot of {} is tagged {TRACKER_TAG} (the first tracked sync, or it was removed)",
            lv.full_name()
        ));
    };
    let current_id = current.map(|c| generations::id_hex(&c.id));
    let (Some(base_id), Some(current)) = (gen_tag(&found.lv), current) else {
        return Err(if gen_tag(&found.lv).is_none() {
            format!("the tracker {} records no generation (its tags were changed)", found.lv.full_name())
        } else {
            "this node has no current generation record".to_owned()
        });
    };
    if Some(base_id) != current_id.as_deref() {
        return Err(format!(
            "base generation mismatch: the tracker {} holds generation {base_id}, this node's current generation {} \
             is {}",
            found.lv.full_name(),
            current.generation,
            current_id.unwrap_or_default()
        ));
    }
    let since_full = found.since_full;
    if vol.full_scan_every > 0 && since_full + 1 >= u64::from(vol.full_scan_every) {
        return Err(format!(
            "{PERIODIC_FULL_SCAN} (full_scan_every = {}, {since_full} tracked syncs since the last one)",
            vol.full_scan_every
        ));
    }
    Ok((current.generation, found))
}

/// A tracker's name and the changed byte ranges it listed.
type Changes = (&'static str, Vec<(u64, u64)>);

/// The changes between the tracker `base` (as listed before the sync) and the new thin snapshot `snap` of thin
/// LV `origin` (`thin`): the tracker's thin id from the listing, the snapshot's from the kernel's table, which
/// must also put it in the origin's pool. `released`: the pool holds no leftover metadata snapshot (checked and
/// released by this sync already).
fn thin_changes(
    thin: &lvmctl::thin::ThinLv,
    base: &Lv,
    (origin, snap): (&str, &str),
    released: bool,
) -> Result<Changes, String> {
    let base_id = match (base.segtype.as_str(), base.thin_id, &base.pool) {
        ("thin", Some(id), Some(pool)) if *pool == thin.pool => id,
        _ => return Err(format!("tracker invalid: {} is not a thin volume of pool {}", base.full_name(), thin.pool)),
    };
    let tools = lvmctl::thin::ThinTools::new().map_err(|e| crate::error_chain(&e))?;
    let names = [lvmctl::thin::dm_name(&thin.vg, origin), lvmctl::thin::dm_name(&thin.vg, snap)];
    let tables = tools
        .thin_tables(&[&names[0], &names[1]])
        .map_err(|e| format!("cannot read the thin ids from the kernel's tables: {}", crate::error_chain(&e)))?;
    if tables[1].pool_dev != tables[0].pool_dev {
        return Err(format!(
            "tracker invalid: the kernel maps {}/{snap} to pool device {}, its origin to {}",
            thin.vg, tables[1].pool_dev, tables[0].pool_dev
        ));
    }
    let new_id = tables[1].thin_id;
    let delta = if released {
        tools.changed_between_released(thin, base_id, new_id)
    } else {
        tools.changed_between(thin, base_id, new_id)
    }
    .map_err(|e| format!("thin_delta failed: {}", crate::error_chain(&e)))?;
    let ranges = delta.byte_ranges().ok_or("thin_delta listed a range beyond 2^64 bytes")?;
    Ok(("thin_delta", ranges))
}

fn classic_changes(origin: &Lv, base: &Lv) -> Result<Changes, String> {
    if !base.is_snapshot() || base.origin.as_deref() != Some(origin.name.as_str()) {
        return Err(format!("tracker invalid: {} is not a snapshot of {}", base.full_name(), origin.full_name()));
    }
    if base.snapshot_status().is_some_and(|s| s.invalid) {
        return Err(format!(
            "tracker full: the snapshot {} overflowed and was invalidated; give it a larger snapshot_size",
            base.full_name()
        ));
    }
    let cow = Path::new("/dev/mapper").join(format!("{}-cow", lvmctl::thin::dm_name(&base.vg, &base.name)));
    let mut store = lvmctl::exception_store::DeviceStore::open(&cow)
        .map_err(|e| format!("tracker invalid: cannot open its exception store {}: {e}", cow.display()))?;
    let exceptions = lvmctl::exception_store::decode(&mut store, origin.size).map_err(|e| {
        let full = matches!(e, lvmctl::exception_store::StoreError::Invalidated);
        format!("tracker {}: {}", if full { "full" } else { "invalid" }, crate::error_chain(&e))
    })?;
    let ranges = exceptions.byte_ranges().ok_or("the exception store lists a chunk beyond 2^64 bytes")?;
    Ok(("exception store", ranges))
}

/// The new snapshot and the tracker tags it was created with.
struct Tagged<'a> {
    name: &'a str,
    id: GenId,
    since_full: u64,
}

/// After a successful sync: the snapshot it read becomes the tracker, and the old one is removed. The snapshot was
/// tagged before the sync with the generation it was to commit; the generation now current on this node is the
/// evidence, and a tag that does not match it (or the count of tracked syncs) is corrected first. Returns whether
/// the snapshot was kept. Failures are logged (the next sync then scans in full).
fn keep_as_tracker(cfg: &Config, lvm: &Lvm, vol: &Volume, vg: &str, new: Tagged, old: Option<&Lv>, since: u64) -> bool {
    let volume = vol.name.as_str();
    let gens = generations::read_source(&generations_path(cfg, vol));
    let Some(current) = gens.history.current else {
        warn!(volume, "no generation was recorded: the snapshot is not kept as the tracker");
        return false;
    };
    let hex = |id: &GenId| format!("{GEN_TAG_PREFIX}{}", generations::id_hex(id));
    let count = |n: u64| format!("{SINCE_FULL_TAG_PREFIX}{n}");
    let pairs = [(hex(&new.id), hex(&current.id)), (count(new.since_full), count(since))];
    let (del, add): (Vec<&str>, Vec<&str>) =
        pairs.iter().filter(|(had, want)| had != want).map(|(had, want)| (had.as_str(), want.as_str())).unzip();
    if !add.is_empty() {
        if let Err(e) = lvm.change_tags(vg, new.name, &add, &del) {
            warn!(volume, "cannot tag the tracker {vg}/{}: {e}; the next sync scans in full", new.name);
            return false;
        }
    }
    if let Some(old) = old {
        // As listed before the sync: a snapshot (no classic snapshots of its own), whose report need not be asked again.
        if let Err(e) = lvm.remove_listed_lv(old) {
            warn!(volume, "cannot remove the previous tracker {}: {e}; the next sync removes it", old.full_name());
        }
    }
    info!(volume, tracker = %format!("{vg}/{}", new.name), generation = current.generation, "tracker kept");
    true
}
