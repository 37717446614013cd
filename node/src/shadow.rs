//! Provisioning the standby's shadows (`blockrep shadow create`): LVs through lvmctl's
//! [`lvmctl::Lvm::ensure_shadow`] (tagged `blockrep_shadow`), files created sparse (never replacing one), with
//! --size, else the volume's `size` in the configuration, else the size the primary reported (recorded by the
//! standby daemon when a sync found the shadow missing).

use std::path::{Path, PathBuf};

use lvmctl::{Lvm, LvmError};

use engine::target::TargetOptions;

use crate::config::Config;
use crate::layout::Side;
use crate::{Error, ErrorKind};

/// A shadow that could not be brought to a complete generation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NotRolledForward {
    /// Volume name.
    pub volume: String,
    /// Why (the engine's error chain).
    pub error: String,
}

/// Rolls every shadow's committed transfer forward: opening a target finishes a commit that a crash interrupted
/// (the apply is idempotent), so that each shadow holds one complete generation before the daemon accepts a
/// connection or a promote touches the boot target. Shadows without state (never synced) are skipped; the ones
/// that cannot be opened are returned.
pub fn roll_forward(cfg: &Config, io: engine::volume::IoOptions) -> Vec<NotRolledForward> {
    let layout = cfg.layout();
    let mut failed = Vec::new();
    for v in &cfg.volumes {
        let Some(shadow) = &v.shadow else { continue };
        let dir = layout.side_dir(Side::Standby, &v.name);
        if !shadow.exists() || !dir.exists() {
            continue;
        }
        match crate::verify::open_target(shadow, &dir, TargetOptions::new(&v.name, io)) {
            Ok(t) => {
                let i = t.info();
                tracing::debug!(volume = %v.name, generation = i.generation, complete = i.complete, "shadow checked");
            }
            Err(e) => failed.push(NotRolledForward { volume: v.name.clone(), error: link::error_chain(&e) }),
        }
    }
    failed
}

/// Errors of shadow provisioning.
#[derive(Debug, thiserror::Error)]
pub enum ShadowError {
    /// The lvm2 tool cannot be used.
    #[error(transparent)]
    NoLvm(LvmError),
    /// The configured shadow is under /dev but not an LV path.
    #[error("volume {volume}: shadow {} is not of the form /dev/VG/LV (or a file outside /dev)", shadow.display())]
    NotAnLvPath {
        /// Volume name.
        volume: String,
        /// The configured shadow.
        shadow: PathBuf,
    },
    /// A file shadow could not be created, or exists with another size.
    #[error("volume {volume}: cannot provide the file shadow {}: {why}", shadow.display())]
    File {
        /// Volume name.
        volume: String,
        /// The configured shadow.
        shadow: PathBuf,
        /// What went wrong and what to do.
        why: String,
    },
    /// No size was given and the primary has not reported one.
    #[error(
        "volume {volume}: no size known: set `size` in its [[volume]] section, pass --size, or run `blockrep \
         sync {volume}` on the primary once (it is refused, and the size is recorded here)"
    )]
    UnknownSize {
        /// Volume name.
        volume: String,
    },
    /// lvm refused or failed (an LV of that name that is not a shadow, another size, no space).
    #[error("volume {volume}")]
    Ensure {
        /// Volume name.
        volume: String,
        /// lvmctl's error, which says what to do.
        #[source]
        error: LvmError,
    },
}

impl ShadowError {
    /// The kind of this error.
    pub fn kind(&self) -> ErrorKind {
        match self {
            ShadowError::Ensure { error: LvmError::NotOurs { .. } | LvmError::InvalidName(_), .. }
            | ShadowError::NoLvm(_)
            | ShadowError::NotAnLvPath { .. }
            | ShadowError::UnknownSize { .. } => ErrorKind::Usage,
            ShadowError::Ensure { .. } | ShadowError::File { .. } => ErrorKind::Failed,
        }
    }
}

/// A shadow that is now in place.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShadowReady {
    /// Volume name.
    pub volume: String,
    /// The shadow: `VG/LV`, or the file's path.
    pub shadow: String,
    /// Size in bytes.
    pub size: u64,
    /// Whether it was created now (else it was already there).
    pub created: bool,
}

/// `/dev/VG/LV` → (VG, LV).
pub(crate) fn vg_lv(path: &Path) -> Option<(String, String)> {
    let mut parts = path.strip_prefix("/dev").ok()?.components();
    let vg = parts.next()?.as_os_str().to_str()?.to_owned();
    let lv = parts.next()?.as_os_str().to_str()?.to_owned();
    parts.next().is_none().then_some((vg, lv))
}

/// Creates the shadows of the named (or all) volumes, with `size`, else the volume's configured `size`, else the
/// size the primary reported; `done` is called for each shadow in place. Stops at the first failure.
pub fn create(
    cfg: &Config,
    names: &[String],
    size: Option<u64>,
    done: &mut dyn FnMut(&ShadowReady),
) -> Result<(), Error> {
    let layout = cfg.layout();
    let mut lvm = None;
    for vol in cfg.select(names)? {
        let shadow = cfg.shadow_of(vol)?;
        let want = size
            .or(vol.size)
            .or_else(|| layout.recorded_source_size(&vol.name))
            .ok_or_else(|| ShadowError::UnknownSize { volume: vol.name.clone() })?;
        if !shadow.starts_with("/dev") {
            let created = ensure_file(&vol.name, shadow, want).map_err(|e| *e)?;
            let shadow = shadow.display().to_string();
            done(&ShadowReady { volume: vol.name.clone(), shadow, size: want, created });
            continue;
        }
        let (vg, lv) = vg_lv(shadow)
            .ok_or_else(|| ShadowError::NotAnLvPath { volume: vol.name.clone(), shadow: shadow.into() })?;
        let lvm = match &mut lvm {
            Some(l) => l,
            None => lvm.insert(Lvm::new().map_err(ShadowError::NoLvm)?),
        };
        let found = lvm
            .ensure_shadow(&vg, &lv, want)
            .map_err(|error| ShadowError::Ensure { volume: vol.name.clone(), error })?;
        let created = matches!(found, lvmctl::Shadow::Created(_));
        done(&ShadowReady { volume: vol.name.clone(), shadow: format!("{vg}/{lv}"), size: want, created });
    }
    Ok(())
}

/// A file shadow of exactly `size` bytes: created sparse if missing (never replacing a file), accepted if it
/// exists with that size. Returns whether it was created.
fn ensure_file(volume: &str, path: &Path, size: u64) -> Result<bool, Box<ShadowError>> {
    let err = |why: String| Box::new(ShadowError::File { volume: volume.into(), shadow: path.into(), why });
    match std::fs::metadata(path) {
        Ok(m) if m.is_file() && m.len() == size => Ok(false),
        Ok(m) if m.is_file() => Err(err(format!(
            "it exists with {} bytes but the source is {size} bytes; sizes must be equal: move it away (it is \
             not replaced), or pass --size",
            m.len()
        ))),
        Ok(_) => Err(err("it exists and is not a regular file".into())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(path)
                .map_err(|e| err(format!("{e} (does its directory exist?)")))?;
            f.set_len(size).and_then(|()| f.sync_all()).map_err(|e| err(e.to_string()))?;
            Ok(true)
        }
        Err(e) => Err(err(e.to_string())),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_file_shadow_is_created_sparse_and_never_replaced() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("shadow.img");
        assert!(super::ensure_file("v", &p, 1 << 20).unwrap());
        assert_eq!(std::fs::metadata(&p).unwrap().len(), 1 << 20);
        assert!(!super::ensure_file("v", &p, 1 << 20).unwrap(), "an existing shadow of the right size is kept");
        std::fs::write(&p, b"precious").unwrap();
        let e = super::ensure_file("v", &p, 1 << 20).unwrap_err().to_string();
        assert!(e.contains("exists with 8 bytes") && e.contains("not replaced"), "{e}");
        assert_eq!(std::fs::read(&p).unwrap(), b"precious");
    }

    #[test]
    fn shadow_paths_split_into_vg_and_lv() {
        assert_eq!(super::vg_lv("/dev/vg1/root_shadow".as_ref()), Some(("vg1".into(), "root_shadow".into())));
        assert_eq!(super::vg_lv("/srv/shadow.img".as_ref()), None);
        assert_eq!(super::vg_lv("/dev/mapper/x/y/z".as_ref()), None);
    }
}
