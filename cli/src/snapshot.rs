//! Snapshot drivers: how a source is frozen for the duration of a sync.

use std::path::Path;

use anyhow::Result;

use crate::config::{Config, SnapshotDriver, Volume};
use crate::exit::{coded, USAGE};

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
        SnapshotDriver::Lvm { .. } => Err(coded(USAGE, "snapshot = \"lvm\" is not available in this build yet")),
    }
}
