//! Snapshot drivers: how a source is frozen for the duration of a sync.
//!
//! `snapshot = "lvm"`: a classic LVM snapshot `<lv>_blockrep_snap` (tagged `blockrep_snapshot`) is created before
//! the sync and removed after it, whatever the outcome; a snapshot left by a crashed run is recognised by its tag
//! and origin, and removed with a log line. A snapshot that overflowed during the sync fails the sync with a
//! message suggesting a larger `snapshot_size`.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::{Context, Result};
use lvmctl::{Lvm, SnapshotSize as LvmSize};
use tracing::{info, warn};

use crate::config::{Config, SnapshotDriver, SnapshotSize, Volume};
use crate::exit::{coded, USAGE};

/// Set when SIGINT or SIGTERM arrives during a sync.
pub fn cancel_on_signals() -> Result<Arc<AtomicBool>> {
    use nix::sys::signal::{SigSet, Signal};
    let flag = Arc::new(AtomicBool::new(false));
    let mut set = SigSet::empty();
    set.add(Signal::SIGTERM);
    set.add(Signal::SIGINT);
    set.thread_block().context("cannot block signals")?;
    let f = flag.clone();
    std::thread::spawn(move || {
        if let Ok(sig) = set.wait() {
            warn!(signal = ?sig, "interrupted: stopping the sync and cleaning up");
            f.store(true, Ordering::SeqCst);
        }
    });
    Ok(flag)
}

/// Runs `f` with the path of a frozen image of the volume's source, and cleans up afterwards.
pub fn with_frozen_source<T>(cfg: &Config, vol: &Volume, f: impl FnOnce(&Path) -> Result<T>) -> Result<T> {
    let source = vol.source.as_ref().ok_or_else(|| {
        coded(
            USAGE,
            format!("volume {} has no `source` in {} (this is the primary side)", vol.name, cfg.path.display()),
        )
    })?;
    match &vol.snapshot {
        SnapshotDriver::None => f(source),
        SnapshotDriver::Lvm { size, name } => {
            let lvm = Lvm::new().map_err(|e| coded(USAGE, format!("volume {}: {e}", vol.name)))?;
            let size = match *size {
                SnapshotSize::Bytes(b) => LvmSize::Bytes(b),
                SnapshotSize::Percent(p) => LvmSize::Percent(p),
            };
            with_lvm_snapshot(&lvm, &vol.name, source, name.as_deref(), size, f)
        }
    }
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
    f: impl FnOnce(&Path) -> Result<T>,
) -> Result<T> {
    let lv = lvm.lv_for_device(source).with_context(|| {
        format!(
            "volume {volume}: snapshot = \"lvm\" needs the source {} to be an active LVM logical volume",
            source.display()
        )
    })?;
    let snap = name.map(str::to_owned).unwrap_or_else(|| format!("{}_blockrep_snap", lv.name));
    lvm.remove_leftover_snapshot(&lv.vg, &lv.name, &snap).map_err(|e| match e {
        e @ lvmctl::LvmError::NotOurs { .. } => {
            coded(USAGE, format!("volume {volume}: {e}; rename it or set snapshot_name"))
        }
        e => anyhow::Error::from(e).context(format!("volume {volume}: cannot check for a leftover snapshot")),
    })?;
    let created = lvm
        .create_snapshot(&lv.vg, &lv.name, &snap, size)
        .with_context(|| format!("volume {volume}: cannot create the snapshot {}/{snap}", lv.vg))?;
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
        Err(e) if overflowed => Err(e.context(format!(
            "volume {volume}: the snapshot {}/{snap} ({} bytes) filled up and was invalidated during the sync; \
             set a larger snapshot_size (the shadow keeps its previous generation)",
            lv.vg, created.size
        ))),
        r => r,
    }
}
