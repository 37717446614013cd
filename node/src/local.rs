//! `blockrep sync --local` and `blockrep verify --local`: source and target in one process, through the same
//! link ([`link::TargetLink`]) the network path uses, with the same state layout ([`crate::layout`]).

use std::path::{Path, PathBuf};

use engine::sync::{sync_volume, SyncReport};
use engine::target::{Target, TargetOptions};
use engine::volume::{Access, IoOptions, Volume};
use serde::Serialize;

use crate::layout::{Layout, Side};
use crate::{Error, ErrorKind};

/// Errors of local sync and verify.
#[derive(Debug, thiserror::Error)]
pub enum LocalError {
    /// Source and target are the same volume.
    #[error("source {} and target {} are the same volume: nothing to sync", source_path.display(), target.display())]
    SameVolume {
        /// The source.
        source_path: PathBuf,
        /// The target.
        target: PathBuf,
    },
    /// The source could not be opened.
    #[error("cannot open the source")]
    OpenSource(#[source] engine::volume::VolumeError),
    /// The target could not be opened.
    #[error("cannot open the target")]
    OpenTarget(#[source] engine::target::TargetError),
    /// The state directory could not be created.
    #[error("cannot create state directory {}", path.display())]
    StateDir {
        /// The directory.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The sync failed; the target was asked afterwards which generation it holds.
    #[error("sync of volume {volume} failed; {target}")]
    Sync {
        /// Volume name.
        volume: String,
        /// What the target holds now.
        target: crate::primary::StandbyAfterFailure,
        /// The engine's error.
        #[source]
        source: Box<engine::sync::SyncError>,
    },
    /// Nothing was ever synced under this name into this state directory.
    #[error(
        "volume {volume} has no state in {}: nothing was synced to it under this name; check --name and \
         --state-dir, or run a sync first",
        dir.display()
    )]
    NoState {
        /// Volume name.
        volume: String,
        /// The directory that does not exist.
        dir: PathBuf,
    },
    /// Verifying failed (not: found a difference).
    #[error("cannot verify the shadow")]
    Verify(#[source] engine::target::TargetError),
    /// The shadow differs from its committed generation (it is now marked untrusted).
    #[error(
        "volume {volume}: the shadow {} does not match its committed generation {generation}; it is marked \
         untrusted, so the next sync compares its actual content with the source and repairs it",
        target.display()
    )]
    Mismatch {
        /// Volume name.
        volume: String,
        /// The shadow.
        target: PathBuf,
        /// Its committed generation.
        generation: u64,
    },
}

impl LocalError {
    /// The kind of this error.
    pub fn kind(&self) -> ErrorKind {
        match self {
            LocalError::SameVolume { .. } => ErrorKind::Usage,
            LocalError::Sync { source, .. } if matches!(**source, engine::sync::SyncError::SplitBrain { .. }) => {
                ErrorKind::Unsafe
            }
            _ => ErrorKind::Failed,
        }
    }
}

/// Refuses a target that is the source itself (same path or same file).
fn refuse_same(source: &Path, target: &Path) -> Result<(), LocalError> {
    use std::os::unix::fs::MetadataExt;
    let same = match (std::fs::metadata(source), std::fs::metadata(target)) {
        (Ok(a), Ok(b)) => (a.dev(), a.ino()) == (b.dev(), b.ino()) || (a.rdev() != 0 && a.rdev() == b.rdev()),
        _ => source == target,
    };
    if same {
        return Err(LocalError::SameVolume { source_path: source.into(), target: target.into() });
    }
    Ok(())
}

/// One local sync: what to sync where.
#[derive(Debug, Clone)]
pub struct LocalSync {
    /// Volume name (a directory name: see [`crate::layout::volume_name`]).
    pub name: String,
    /// The source.
    pub source: PathBuf,
    /// The target (shadow).
    pub target: PathBuf,
    /// State directory (both sides live under it).
    pub state_dir: PathBuf,
    /// I/O options for both.
    pub io: IoOptions,
    /// Block size for hashing.
    pub block_size: crate::config::BlockSize,
    /// Do not narrow changed blocks down to changed 4 KiB pieces.
    pub no_refine: bool,
}

/// What the operator asked about the mode of a sync (`sync --verify`, `sync --discard-standby-changes`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ModeChoice {
    /// Compare with the shadow's actual content even if an incremental sync would be allowed.
    pub verify: bool,
    /// In a split brain, discard the standby's changes (a compare sync that overwrites them).
    pub discard_standby_changes: bool,
}

impl ModeChoice {
    /// Sets the engine's options accordingly.
    pub(crate) fn apply(self, opts: &mut engine::sync::SyncOptions) {
        opts.force_compare = self.verify;
        opts.discard_standby_changes = self.discard_standby_changes;
    }
}

impl LocalSync {
    /// Runs the sync; `progress` gets (bytes scanned, total).
    pub fn run(&self, progress: &mut dyn FnMut(u64, u64)) -> Result<SyncReport, Error> {
        self.run_with(ModeChoice::default(), progress)
    }

    /// [`LocalSync::run`] with the operator's choice of mode.
    pub fn run_with(&self, choice: ModeChoice, progress: &mut dyn FnMut(u64, u64)) -> Result<SyncReport, Error> {
        let name = &self.name;
        refuse_same(&self.source, &self.target)?;
        let src = Volume::open(&self.source, Access::Read, &self.io).map_err(LocalError::OpenSource)?;
        let layout = Layout::new(&self.state_dir, None);
        let manifest = layout.source_manifest(name);
        let block_size = self.block_size.resolve(src.size(), &manifest);
        let mut opts = crate::primary::engine_options(block_size, &self.io, self.no_refine);
        choice.apply(&mut opts);
        let dir = manifest.parent().expect("a manifest lives in a directory");
        std::fs::create_dir_all(dir).map_err(|source| LocalError::StateDir { path: dir.into(), source })?;
        let mut tgt =
            Target::open(&self.target, &layout.side_dir(Side::Standby, name), TargetOptions::new(name, self.io))
                .map_err(LocalError::OpenTarget)?;
        let before = tgt.info().generation;
        sync_volume(name, &src, &manifest, &mut tgt, &opts, progress).map_err(|source| {
            let now = tgt.info();
            let target = match now.generation {
                g if g == before => crate::primary::StandbyAfterFailure::Kept { generation: g },
                g => crate::primary::StandbyAfterFailure::Committed { generation: g },
            };
            LocalError::Sync { volume: name.clone(), target, source: Box::new(source) }.into()
        })
    }
}

/// The result of [`verify`].
#[derive(Debug, Clone, Serialize)]
pub struct Verification {
    /// Volume name.
    pub volume: String,
    /// The committed generation checked against.
    pub generation: u64,
    /// Whether that generation is complete.
    pub complete: bool,
    /// Whether the shadow matches it.
    pub ok: bool,
    /// The shadow.
    #[serde(skip)]
    pub target: PathBuf,
}

impl Verification {
    /// `Ok` when the shadow matches, else the error that says so and what to do.
    pub fn into_result(self) -> Result<(), Error> {
        if self.ok {
            return Ok(());
        }
        Err(LocalError::Mismatch { volume: self.volume, target: self.target, generation: self.generation }.into())
    }
}

/// `blockrep verify --local`: re-hashes the shadow `target` and compares it with its committed generation; a
/// mismatch marks the shadow untrusted (durably), so that the next sync compares its actual content and repairs
/// it. Creates nothing: a name never synced into `state_dir` is an error.
pub fn verify(target: &Path, state_dir: &Path, name: &str, io: IoOptions) -> Result<Verification, Error> {
    let dir = Layout::new(state_dir, None).side_dir(Side::Standby, name);
    if !dir.is_dir() {
        return Err(LocalError::NoState { volume: name.into(), dir }.into());
    }
    let mut tgt = Target::open(target, &dir, TargetOptions::new(name, io)).map_err(LocalError::OpenTarget)?;
    let info = tgt.info();
    let ok = tgt.verify().map_err(LocalError::Verify)?;
    if !ok {
        tgt.mark_untrusted(engine::target::Distrust::VerifyFailed).map_err(LocalError::Verify)?;
        tracing::warn!(volume = name, "the shadow differs from its committed generation: marked untrusted");
    }
    Ok(Verification {
        volume: name.into(),
        generation: info.generation,
        complete: info.complete,
        ok,
        target: target.into(),
    })
}
