//! Freezing a source for the duration of a sync (the snapshot lifecycle).
//!
//! `snapshot = "lvm"`: a classic LVM snapshot `<lv>_blockrep_snap` (tagged `blockrep_snapshot`) is created before
//! the sync and removed after it, whatever the outcome; a snapshot left by a crashed run is recognised by its tag
//! and origin, and removed with a log line (by the next sync, or by a demote: [`remove_leftover_snapshots`]). A snapshot that overflowed during the sync fails the sync with a
//! message suggesting a larger `snapshot_size`.

use std::path::Path;

use lvmctl::{Lvm, LvmError, SnapshotSize as LvmSize};
use tracing::{info, warn};

use crate::config::{Config, SnapshotDriver, SnapshotSize, Volume};
use crate::{Error, ErrorKind};

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
            FreezeError::NoLvm { .. } | FreezeError::NotOurs { .. } => ErrorKind::Usage,
            _ => ErrorKind::Failed,
        }
    }
}

/// Runs `f` with the path of a frozen image of the volume's source, and cleans up afterwards.
pub fn with_frozen_source<T>(
    cfg: &Config,
    vol: &Volume,
    f: impl FnOnce(&Path) -> Result<T, Error>,
) -> Result<T, Error> {
    let source = cfg.source_of(vol)?;
    match &vol.snapshot {
        SnapshotDriver::None => f(source),
        SnapshotDriver::Lvm { size, name } => {
            let lvm = Lvm::new().map_err(|source| FreezeError::NoLvm { volume: vol.name.clone(), source })?;
            let size = match *size {
                SnapshotSize::Bytes(b) => LvmSize::Bytes(b),
                SnapshotSize::Percent(p) => LvmSize::Percent(p),
            };
            with_lvm_snapshot(&lvm, &vol.name, source, name.as_deref(), size, f)
        }
    }
}

/// Removes the snapshots of this node's `snapshot = "lvm"` sources that an interrupted sync left behind (the node
/// died during a sync as primary), and returns their names (`vg/name`). Used when the node is demoted: a
/// standby's volume must not keep a snapshot of itself, which would copy every write the new primary's syncs make
/// to it until it fills up. Nothing is removed while a sync holds the sync lock (its snapshot is in use); a
/// volume whose source is missing or not an LV is skipped.
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
        let snap = name.map(str::to_owned).unwrap_or_else(|| format!("{}_blockrep_snap", lv.name));
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

/// Removes the snapshot when dropped (also on error and after an interrupt).
struct SnapGuard<'a> {
    lvm: &'a Lvm,
    vg: String,
    name: String,
}

impl Drop for SnapGuard<'_> {
    fn drop(&mut self) {
        match self.lvm.remove_lv(&self.vg, &self.name) {
            Ok(()) => info!(vg = %self.vg, snapshot = %self.name, "snapshot removed"),
            Err(e) => warn!(
                "cannot remove snapshot {}/{}: {e}; remove it with `lvremove {}/{}`",
                self.vg, self.name, self.vg, self.name
            ),
        }
    }
}

fn with_lvm_snapshot<T>(
    lvm: &Lvm,
    volume: &str,
    source: &Path,
    name: Option<&str>,
    size: LvmSize,
    f: impl FnOnce(&Path) -> Result<T, Error>,
) -> Result<T, Error> {
    let lv = lvm.lv_for_device(source).map_err(|e| FreezeError::NotAnLv {
        volume: volume.into(),
        source_path: source.into(),
        source: e,
    })?;
    let snap = name.map(str::to_owned).unwrap_or_else(|| format!("{}_blockrep_snap", lv.name));
    lvm.remove_leftover_snapshot(&lv.vg, &lv.name, &snap).map_err(|e| match e {
        e @ LvmError::NotOurs { .. } => FreezeError::NotOurs { volume: volume.into(), refusal: Box::new(e) },
        e => FreezeError::Leftover { volume: volume.into(), source: e },
    })?;
    let created = lvm.create_snapshot(&lv.vg, &lv.name, &snap, size).map_err(|e| FreezeError::Create {
        volume: volume.into(),
        vg: lv.vg.clone(),
        snapshot: snap.clone(),
        source: e,
    })?;
    let guard = SnapGuard { lvm, vg: lv.vg.clone(), name: snap.clone() };
    info!(volume, snapshot = %created.full_name(), bytes = created.size, "snapshot created");
    let path = created.path.clone().unwrap_or_else(|| Path::new("/dev").join(&lv.vg).join(&snap));
    let result = f(&path);
    let overflowed = match lvm.snapshot_status(&lv.vg, &snap) {
        Ok(s) => s.invalid,
        Err(e) => {
            warn!("cannot read the fill state of {}/{snap}: {e}", lv.vg);
            false
        }
    };
    drop(guard);
    match result {
        Err(e) if overflowed => Err(FreezeError::Overflowed {
            volume: volume.into(),
            vg: lv.vg,
            snapshot: snap,
            size: created.size,
            source: Box::new(e),
        }
        .into()),
        r => r,
    }
}
