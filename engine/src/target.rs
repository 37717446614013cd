//! The standby side: crash-safe apply of a transfer to a shadow volume.
//!
//! A [`Target`] owns one shadow volume and its state directory, which holds:
//!
//! * `manifest`: the committed generation (generation number, geometry, root hash, block hashes). Renaming a new
//!   manifest over it is the act that records a new generation.
//! * `manifest.next`: the manifest of the transfer in progress, fsynced before the spool's commit record.
//! * `spool`: the redo log of the transfer in progress (see [`crate::spool`]).
//! * `state`: a small versioned file saying whether the shadow holds a complete generation (it does not while the
//!   first full sync, or an interrupted one, writes in place), and the last generation committed (so that losing
//!   a corrupt manifest does not make generation numbers go back). Its format is in `target/state.rs`.
//!
//! # Commit protocol
//!
//! Spool mode (the shadow holds a complete generation to protect): extents go to the spool only. `commit` then
//! (1) fsyncs `manifest.next`, (2) fsyncs the records, appends the commit record, fsyncs the spool and the state
//! directory (so both files' directory entries are durable), (3) applies the records to the
//! shadow and fsyncs it, (4) renames `manifest.next` over `manifest` and fsyncs the directory, (5) removes the
//! spool. A crash before (2) leaves the shadow untouched (the uncommitted spool is kept only for resume); a crash
//! after (2) is rolled forward by [`Target::open`], which applies the committed spool again (idempotent) and
//! finishes (4) and (5); (6) the state file records the generation. A committed spool that fails its checks is never applied: `open` refuses with
//! [`TargetError::Spool`].
//!
//! In-place mode (no complete generation yet): `begin` durably marks the state incomplete before the first write,
//! extents are written straight to the shadow, and `commit` fsyncs the shadow, installs the manifest and clears the
//! mark. Until then [`TargetInfo::complete`] is false and the shadow must not be promoted.
//!
//! The link operations (`begin`, `block_hashes`, `sub_hashes`, `extent`, `commit`) are the methods of
//! [`TargetLink`], implemented by `Target` (bring the trait into scope); errors come back as
//! [`LinkError::Local`] (holding a [`TargetError`]). [`Target::info`] (which cannot fail; the trait's `info`
//! delegates to it), [`Target::abort`] and [`Target::verify`] are inherent.
//!
//! Every durable step goes through the [`Durable`] handle of [`TargetOptions`], so tests can crash a sync at each
//! step and check recovery.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::durable::{Durable, Gate, Op, Writeback};
use crate::generations::{self, Evidence};
use crate::hash::{self, BlockHash, HashError, ZeroHashes, SUB_BLOCK_SIZE};
use crate::io::{AlignedBuf, BufPool, EngineKind};
use crate::manifest::{self, Manifest, ManifestError, ManifestWriter};
use crate::spool::{self, Record, RecordKind, Scan, SpoolError, SpoolHeader, SpoolWriter};
use crate::sync::{BeginAck, BeginPlan, CommitAck, Extent, ExtentData, LinkError, PendingInfo, TargetInfo, TargetLink};
use crate::volume::{Access, IoOptions, Volume, VolumeError};
use link::error_chain;
use link::PlanMode;

mod ahead;
mod state;
#[cfg(test)]
mod tests;

use ahead::AheadHasher;

use state::StateFile;
pub use state::{decode_state, Distrust};

/// Name of the committed manifest in the state directory.
pub const MANIFEST_FILE: &str = "manifest";
/// Name of the spool in the state directory.
pub const SPOOL_FILE: &str = "spool";
/// Name of the state file in the state directory.
pub const STATE_FILE: &str = "state";
/// Name of the lock file in the state directory (`flock`ed while a `Target` is open).
pub const LOCK_FILE: &str = "lock";

/// Largest chunk written or read at once while applying or hashing.
const IO_CHUNK: usize = 1 << 20;
/// Writes in flight while applying a spool to the shadow.
pub const APPLY_DEPTH: usize = 16;

/// Errors of the target side.
#[derive(Debug, thiserror::Error)]
pub enum TargetError {
    /// The state directory could not be created or read.
    #[error(
        "cannot use state directory {path}: check that it exists and is writable, or choose another one \
         (`state_dir` in the configuration; --state-dir for `sync --local`)"
    )]
    StateDir {
        /// The directory.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// Another process has the state directory open.
    #[error(
        "state directory {path} of volume {volume} is in use by another blockrep process (a sync, serve or verify \
         of this volume); wait for it to finish"
    )]
    Busy {
        /// Volume name.
        volume: String,
        /// The state directory.
        path: PathBuf,
    },
    /// The shadow volume failed.
    #[error("shadow of volume {volume} failed")]
    Shadow {
        /// Volume name.
        volume: String,
        /// The volume error.
        #[source]
        source: VolumeError,
    },
    /// A durable operation on a state file or the shadow failed.
    #[error("cannot {action} {path} (volume {volume})")]
    Io {
        /// Volume name.
        volume: String,
        /// What was being done.
        action: &'static str,
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The manifest failed.
    #[error("manifest of volume {volume} failed")]
    Manifest {
        /// Volume name.
        volume: String,
        /// The manifest error.
        #[source]
        source: ManifestError,
    },
    /// The spool failed.
    #[error("spool of volume {volume} failed")]
    Spool {
        /// Volume name.
        volume: String,
        /// The spool error.
        #[source]
        source: SpoolError,
    },
    /// The state file is corrupt.
    #[error("state file {path} is corrupt ({what}); the shadow is treated as incomplete until the next sync commits")]
    State {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        what: String,
    },
    /// A committed spool does not match the manifest prepared for it.
    #[error(
        "spool {path} is committed for generation {generation} but no matching manifest was prepared ({what}); it \
         was not applied: do not promote this shadow, move the spool away and run a full sync"
    )]
    CommittedWithoutManifest {
        /// The spool path.
        path: PathBuf,
        /// The committed generation.
        generation: u64,
        /// What is missing.
        what: String,
    },
    /// The shadow is smaller than the source.
    #[error(
        "shadow {shadow} is {shadow_size} bytes, smaller than the source's {source_size} bytes; grow the shadow to \
         at least {source_size} bytes (nothing was written)"
    )]
    TooSmall {
        /// Shadow path.
        shadow: PathBuf,
        /// Shadow size.
        shadow_size: u64,
        /// Source size.
        source_size: u64,
    },
    /// The plan's block size is invalid.
    #[error("transfer for volume {volume} has an invalid block size")]
    BlockSize {
        /// Volume name.
        volume: String,
        /// The hash error.
        #[source]
        source: HashError,
    },
    /// The plan is based on a generation the shadow does not hold.
    #[error(
        "transfer for volume {volume} is based on generation {base}, but the shadow's committed generation is \
         {committed}; compare every block instead (base generation 0)"
    )]
    BaseMismatch {
        /// Volume name.
        volume: String,
        /// Plan's base.
        base: u64,
        /// Committed generation.
        committed: u64,
    },
    /// The plan's generation is not the one after the committed one (generations advance by one).
    #[error(
        "transfer for volume {volume} would create generation {generation}, but generation {committed} is \
         committed and generations advance by one: the next one is {next} (nothing was written)"
    )]
    NotNext {
        /// Volume name.
        volume: String,
        /// Plan's generation.
        generation: u64,
        /// Committed generation.
        committed: u64,
        /// The only acceptable generation.
        next: u64,
    },
    /// The committed generation is the largest number there is, so no generation can follow it.
    #[error(
        "volume {volume} has committed generation {committed}, the largest there is: no later generation can be \
         numbered (nothing was written); start the shadow over (remove its state directory and run a full sync)"
    )]
    GenerationExhausted {
        /// Volume name.
        volume: String,
        /// Committed generation.
        committed: u64,
    },
    /// An operation needs a transfer in progress.
    #[error("no transfer in progress for volume {volume}: call begin before {op}")]
    NoTransfer {
        /// Volume name.
        volume: String,
        /// The operation.
        op: &'static str,
    },
    /// An extent lies outside the volume.
    #[error(
        "extent at offset {offset} of length {len} lies outside volume {volume} ({volume_size} bytes, shadow \
         {shadow_size} bytes); nothing was written"
    )]
    ExtentOutOfRange {
        /// Volume name.
        volume: String,
        /// Offset.
        offset: u64,
        /// Length.
        len: u64,
        /// Source volume size of the plan.
        volume_size: u64,
        /// Shadow size.
        shadow_size: u64,
    },
    /// An extent is out of order or malformed.
    #[error("extent at offset {offset} of length {len} for volume {volume} is invalid: {what}; nothing was written")]
    BadExtent {
        /// Volume name.
        volume: String,
        /// Offset.
        offset: u64,
        /// Length.
        len: u64,
        /// What is wrong.
        what: String,
    },
    /// A hash query names blocks outside the volume.
    #[error("blocks {first}..{end} of volume {volume} do not exist (it has {block_count} blocks)")]
    BlockRange {
        /// Volume name.
        volume: String,
        /// First block asked.
        first: u64,
        /// End of the range asked.
        end: u64,
        /// Block count.
        block_count: u64,
    },
    /// The transfer's content does not hash to the source's root.
    #[error(
        "root hash mismatch for volume {volume} generation {generation}: the shadow would hold {ours}, the source \
         has {theirs}; nothing was committed, run the sync again"
    )]
    RootMismatch {
        /// Volume name.
        volume: String,
        /// Generation.
        generation: u64,
        /// Target root (hex).
        ours: String,
        /// Source root (hex).
        theirs: String,
    },
    /// The generation a commit would overwrite could not be preserved (`keep_generations`).
    #[error("volume {volume}: not committing: the current generation {generation} could not be kept")]
    Retain {
        /// Volume name.
        volume: String,
        /// The generation that was to be kept.
        generation: u64,
        /// What failed and what to do.
        #[source]
        source: RetainFailure,
    },
    /// `verify` needs a manifest.
    #[error("volume {volume} has no valid manifest to verify against: run a sync first")]
    NoManifest {
        /// Volume name.
        volume: String,
    },
}

/// How to open a target.
#[derive(Debug, Clone, Default)]
pub struct TargetOptions {
    /// I/O options for the shadow.
    pub io: IoOptions,
    /// Volume name for messages and logs.
    pub volume: String,
    /// Handle every durable operation goes through (unarmed in production).
    pub durable: Durable,
    /// The node whose transfers this target commits (recorded in the history; empty: `local`).
    pub peer: String,
    /// What to keep of the generation a commit overwrites (`None`: nothing, one generation is kept).
    pub retention: Option<std::sync::Arc<dyn Retention>>,
    /// Record the next commit under this identity and mark instead of the transfer's own (a rollback to a
    /// retained generation: the record is that generation's, the mark [`Distrust::RolledBack`]).
    pub commit_as: Option<(link::GenRecord, Distrust)>,
}

impl TargetOptions {
    /// Options for volume `volume` with I/O options `io` and an unarmed durable handle.
    pub fn new(volume: &str, io: IoOptions) -> Self {
        TargetOptions {
            io,
            volume: volume.to_owned(),
            durable: Durable::new(),
            peer: String::new(),
            retention: None,
            commit_as: None,
        }
    }
}

/// The generation a commit is about to overwrite, as given to [`Retention::preserve`].
#[derive(Debug, Clone)]
pub struct Preserving {
    /// Volume name.
    pub volume: String,
    /// The shadow.
    pub shadow: PathBuf,
    /// The target's state directory.
    pub state_dir: PathBuf,
    /// The committed generation the shadow holds.
    pub generation: u64,
    /// The identity of the shadow's content (the current record; after a rollback, the generation rolled back
    /// to; after a promote, the promote's).
    pub record: Option<link::GenRecord>,
    /// Why the shadow is not trusted to hold exactly that generation (`None`: it is).
    pub distrust: Option<String>,
    /// The committed manifest describing it (valid at the time of the call; renamed over by the commit).
    pub manifest: Option<PathBuf>,
    /// Its root hash, when the manifest is valid.
    pub root: Option<BlockHash>,
    /// Bytes the commit writes to the shadow (the spooled records' lengths: sizes a copy-on-write store).
    pub bytes: u64,
    /// The durable handle of the target (so fault-injection tests crash the preserving too).
    pub durable: Durable,
}

/// Why [`Retention::preserve`] failed (its own error, boxed so that its chain of causes is kept).
pub type RetainFailure = Box<dyn std::error::Error + Send + Sync>;

/// Keeps earlier generations of a shadow (`keep_generations`, implemented by the node: LVM snapshots, reflink
/// copies). The target calls it under its lock:
///
/// * [`Retention::preserve`] in a spool-mode commit after the spool's records and `manifest.next` are durable and
///   before the spool's commit record, so a failure (no space for the copy) refuses the commit with the shadow
///   untouched, and a commit record on disk implies the copy was made: rolling a committed spool forward never
///   needs to preserve again. A crash in the middle leaves an incomplete copy that the next `preserve` removes.
/// * [`Retention::committed`] after the new generation's state is durable: drop the copies beyond the limit.
pub trait Retention: Send + Sync + std::fmt::Debug {
    /// Preserves the shadow's current content. The error says what failed and what to do; the commit fails with
    /// it and nothing is written to the shadow.
    fn preserve(&self, what: &Preserving) -> Result<(), RetainFailure>;
    /// The commit of `generation` is durable: drop the oldest copies beyond the limit (failures are the
    /// implementation's to report: the commit stands).
    fn committed(&self, volume: &str, generation: u64);

    /// A spool-mode transfer begins (on a thread of its own): nothing is written to the shadow before its
    /// commit, so an implementation may make the copy now, while the transfer runs (`what.bytes` is 0: the size
    /// is not known yet); [`Retention::preserve`] at the commit waits for this call and then only checks. Failures
    /// are the implementation's to log: `preserve` tries again. The default does nothing.
    fn prepare(&self, what: Preserving) {
        let _ = what;
    }
}

/// A set of block indexes.
#[derive(Debug, Clone)]
struct BitSet(Vec<u64>);

impl BitSet {
    fn new(n: u64, all: bool) -> Self {
        let mut v = vec![if all { u64::MAX } else { 0 }; n.div_ceil(64) as usize];
        if all && n % 64 != 0 {
            if let Some(last) = v.last_mut() {
                *last = (1u64 << (n % 64)) - 1;
            }
        }
        BitSet(v)
    }
    fn get(&self, i: u64) -> bool {
        self.0[(i / 64) as usize] & (1 << (i % 64)) != 0
    }
    fn set(&mut self, i: u64, on: bool) {
        let w = &mut self.0[(i / 64) as usize];
        if on {
            *w |= 1 << (i % 64);
        } else {
            *w &= !(1 << (i % 64));
        }
    }
    fn iter(&self) -> impl Iterator<Item = u64> + '_ {
        self.0.iter().enumerate().flat_map(|(wi, &w)| {
            let mut w = w;
            std::iter::from_fn(move || {
                if w == 0 {
                    return None;
                }
                let b = w.trailing_zeros() as u64;
                w &= w - 1;
                Some(wi as u64 * 64 + b)
            })
        })
    }
}

#[derive(Debug)]
enum Mode {
    Spool(Box<SpoolWriter>),
    InPlace,
}

#[derive(Debug)]
struct Session {
    plan: BeginPlan,
    mode: Mode,
    next: ManifestWriter,
    /// Blocks whose hash in `next` is not known yet (re-hashed from the effective content when needed).
    dirty: BitSet,
    /// End offset of the last extent received.
    end: u64,
    /// In place: what was written to the shadow and whose writeback is not started yet.
    writeback: Writeback,
    zeros: ZeroHashes,
    /// Blocks whose piece fingerprints ([`hash::piece_cv`]) of the effective content are known: read for a
    /// `sub_hashes` answer, then updated for every whole piece an extent writes. A block's new hash is merged
    /// from them ([`Session::settle`]) instead of reading and hashing the block again at commit.
    pieces: std::collections::BTreeMap<u64, Vec<BlockHash>>,
    /// The retention's [`Retention::prepare`] running since `begin`; joined before the commit preserves.
    prepared: Option<std::thread::JoinHandle<()>>,
    /// In a compare sync with nothing spooled before it: the shadow's block hashes, computed ahead on a thread
    /// of its own from `begin` on (see `target/ahead.rs`; used only for blocks at or after `end`).
    ahead: Option<AheadHasher>,
}

/// Most piece fingerprints a session keeps (32 MiB; with a pipelined source only the blocks between the newest
/// `sub_hashes` request and the oldest extent not yet received are kept); beyond it the oldest blocks are settled
/// early, which is always correct (see [`Session::settle`]).
const MAX_PIECE_FINGERPRINTS: usize = 1 << 20;

impl Session {
    /// Sets the hash of every block below `below` whose piece fingerprints are kept, from those fingerprints.
    /// Correct at any time: the fingerprints describe the block's effective content now, and an extent that later
    /// writes part of a block without its fingerprints makes it dirty again (re-read at commit).
    fn settle(&mut self, below: u64) {
        let (size, bs) = (self.plan.volume_size, self.plan.block_size);
        while let Some(entry) = self.pieces.first_entry() {
            let b = *entry.key();
            if b >= below {
                break;
            }
            let cvs = entry.remove();
            if let Some(h) = hash::block_hash_from_pieces(&cvs, hash::block_len(size, bs, b)) {
                self.next.set(b, &h);
                self.dirty.set(b, false);
            }
        }
    }
}

/// The standby side of one volume: its shadow and its state directory.
#[derive(Debug)]
pub struct Target {
    shadow_path: PathBuf,
    state_dir: PathBuf,
    opts: TargetOptions,
    /// Shared with a compare session's read-ahead hasher.
    shadow: Arc<Volume>,
    manifest: Option<Manifest>,
    manifest_problem: Option<String>,
    state: StateFile,
    pending: Option<Scan>,
    session: Option<Session>,
    /// The buffer hash queries read into, kept between queries (a fresh zeroed megabyte per read costs a page
    /// fault per 4 KiB: about as much as the hashing in a compare sync).
    scratch: Option<AlignedBuf>,
    _lock: nix::fcntl::Flock<File>,
}

impl Target {
    /// Opens the shadow and its state directory (created if missing), and recovers from an interrupted sync: a
    /// committed spool is rolled forward, an uncommitted one is kept for resume (see the module docs).
    pub fn open(shadow: &Path, state_dir: &Path, opts: TargetOptions) -> Result<Target, TargetError> {
        let dir_err = |source| TargetError::StateDir { path: state_dir.to_owned(), source };
        std::fs::create_dir_all(state_dir).map_err(dir_err)?;
        let lock_file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(state_dir.join(LOCK_FILE))
            .map_err(dir_err)?;
        let lock = match nix::fcntl::Flock::lock(lock_file, nix::fcntl::FlockArg::LockExclusiveNonblock) {
            Ok(l) => l,
            Err((_, nix::errno::Errno::EWOULDBLOCK)) => {
                return Err(TargetError::Busy { volume: opts.volume.clone(), path: state_dir.to_owned() })
            }
            Err((_, e)) => return Err(dir_err(e.into())),
        };
        let volume = Volume::open(shadow, Access::ReadWrite, &opts.io)
            .map_err(|source| TargetError::Shadow { volume: opts.volume.clone(), source })?;
        let mut t = Target {
            shadow_path: shadow.to_owned(),
            state_dir: state_dir.to_owned(),
            opts,
            shadow: Arc::new(volume),
            manifest: None,
            manifest_problem: None,
            state: StateFile::default(),
            pending: None,
            session: None,
            scratch: None,
            _lock: lock,
        };
        t.state = t.read_state()?;
        t.recover_spool()?;
        t.load_manifest();
        if t.state.incomplete {
            if let Some(m) = &t.manifest {
                if !t.state.corrupt && m.generation() >= t.state.generation {
                    // The in-place commit installed its manifest, then crashed before clearing the mark.
                    let generation = m.generation();
                    t.write_state(t.state_with(false, generation))?;
                }
            }
        }
        Ok(t)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.state_dir.join(name)
    }

    fn volume(&self) -> String {
        self.opts.volume.clone()
    }

    fn io_err(&self, action: &'static str, path: &Path, source: std::io::Error) -> TargetError {
        TargetError::Io { volume: self.volume(), action, path: path.to_owned(), source }
    }

    fn spool_err(&self, source: SpoolError) -> TargetError {
        TargetError::Spool { volume: self.volume(), source }
    }

    fn manifest_err(&self, source: ManifestError) -> TargetError {
        TargetError::Manifest { volume: self.volume(), source }
    }

    fn read_state(&self) -> Result<StateFile, TargetError> {
        let path = self.path(STATE_FILE);
        match std::fs::read(&path) {
            Ok(b) => match state::decode(&b) {
                Ok(s) => Ok(s),
                Err(what) => {
                    let e = TargetError::State { path, what };
                    tracing::warn!(volume = %self.opts.volume, error = %e, "corrupt state file");
                    Ok(StateFile { incomplete: true, corrupt: true, generation: u64::MAX, ..StateFile::new(true, 0) })
                }
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(StateFile::default()),
            Err(source) => Err(TargetError::StateDir { path, source }),
        }
    }

    fn write_state(&mut self, state: StateFile) -> Result<(), TargetError> {
        self.opts
            .durable
            .replace_file(Op::StateWrite, &self.state_dir, STATE_FILE, &state.encode())
            .map_err(|e| self.io_err("write state file", &self.path(STATE_FILE), e))?;
        self.state = state;
        Ok(())
    }

    fn load_manifest(&mut self) {
        self.manifest = None;
        self.manifest_problem = None;
        match Manifest::open(&self.path(MANIFEST_FILE)) {
            Ok(m) if m.volume_size() > self.shadow.size() => {
                let p = format!(
                    "manifest {} describes a {}-byte volume but the shadow is {} bytes; ignored",
                    m.path().display(),
                    m.volume_size(),
                    self.shadow.size()
                );
                tracing::warn!(volume = %self.opts.volume, "{p}");
                self.manifest_problem = Some(p);
            }
            Ok(m) => self.manifest = Some(m),
            Err(ManifestError::Missing { .. }) => {}
            Err(e) => {
                let p = error_chain(&e);
                tracing::warn!(volume = %self.opts.volume, error = %p, "ignoring the manifest; the next sync compares every block");
                self.manifest_problem = Some(p);
            }
        }
    }

    /// Why the manifest was ignored at open, if it was (corrupt, truncated, wrong geometry).
    pub fn manifest_problem(&self) -> Option<&str> {
        self.manifest_problem.as_deref()
    }

    /// The committed manifest, if valid.
    pub fn manifest(&self) -> Option<&Manifest> {
        self.manifest.as_ref()
    }

    /// The shadow's path.
    pub fn shadow_path(&self) -> &Path {
        &self.shadow_path
    }

    /// The state directory.
    pub fn state_dir(&self) -> &Path {
        &self.state_dir
    }

    fn recover_spool(&mut self) -> Result<(), TargetError> {
        let path = self.path(SPOOL_FILE);
        let file = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(self.io_err("open", &path, e)),
        };
        let scan = match spool::scan(&file, &path) {
            Ok(s) => s,
            Err(e @ SpoolError::CorruptCommitted { .. }) => return Err(self.spool_err(e)),
            Err(SpoolError::Io { action, path, source }) => return Err(self.io_err(action, &path, source)),
            Err(e) => {
                tracing::warn!(volume = %self.opts.volume, error = %e, "discarding an uncommitted spool with an invalid header");
                drop(file);
                return self.remove_spool();
            }
        };
        let Some(commit) = scan.commit else {
            if let Some(e) = &scan.tail_error {
                tracing::info!(volume = %self.opts.volume, error = %e, valid_bytes = scan.valid_len, "uncommitted spool has a torn tail; keeping its valid prefix for resume");
                drop(file);
                let d = &self.opts.durable;
                let f =
                    std::fs::OpenOptions::new().write(true).open(&path).map_err(|e| self.io_err("open", &path, e))?;
                d.set_len(Op::SpoolTruncate, &f, scan.valid_len).map_err(|e| self.io_err("truncate", &path, e))?;
                d.sync_all(Op::SpoolSync, &f).map_err(|e| self.io_err("fsync", &path, e))?;
            }
            self.pending = Some(scan);
            return Ok(());
        };
        // A committed spool: roll forward.
        let not_applied = |what: String| TargetError::CommittedWithoutManifest {
            path: path.clone(),
            generation: commit.generation,
            what,
        };
        let installed = match Manifest::open(&self.path(MANIFEST_FILE)) {
            Ok(m) => m.generation() == commit.generation && m.root() == commit.root,
            Err(_) => false,
        };
        if !installed {
            let next_path = manifest::next_path(&self.path(MANIFEST_FILE));
            match Manifest::open(&next_path) {
                Ok(m) if m.generation() == commit.generation && m.root() == commit.root => {}
                Ok(m) => {
                    return Err(not_applied(format!(
                        "{} is for generation {} with another root",
                        next_path.display(),
                        m.generation()
                    )))
                }
                Err(e) => return Err(not_applied(error_chain(&e))),
            }
        }
        if scan.header.volume_size > self.shadow.size() {
            return Err(TargetError::TooSmall {
                shadow: self.shadow_path.clone(),
                shadow_size: self.shadow.size(),
                source_size: scan.header.volume_size,
            });
        }
        tracing::info!(volume = %self.opts.volume, generation = commit.generation, records = scan.records.len(), "rolling forward a committed spool");
        self.apply_records(&file, &path, &scan.records)?;
        self.sync_shadow()?;
        if !installed {
            let dest = self.path(MANIFEST_FILE);
            manifest::install(&self.opts.durable, &manifest::next_path(&dest), &dest)
                .map_err(|e| self.manifest_err(e))?;
        }
        drop(file);
        self.remove_spool()?;
        // The shadow now holds the committed generation, whose identifier this side never recorded (the next sync
        // compares); record the evidence as of now so that later writes are still noticed.
        if self.state.exists && !self.state.corrupt {
            let mut s = self.state_with(false, commit.generation);
            s.evidence = Evidence::of(self.shadow.file());
            self.write_state(s)?;
        }
        Ok(())
    }

    fn remove_spool(&mut self) -> Result<(), TargetError> {
        let path = self.path(SPOOL_FILE);
        let d = &self.opts.durable;
        d.remove_file(Op::SpoolRemove, &path).map_err(|e| self.io_err("remove", &path, e))?;
        d.sync_dir(&self.state_dir).map_err(|e| self.io_err("fsync", &self.state_dir, e))?;
        self.pending = None;
        Ok(())
    }

    fn shadow_write(&self, offset: u64, data: &[u8]) -> Result<(), TargetError> {
        let d = &self.opts.durable;
        let gate = d.gate(Op::ShadowWrite).map_err(|e| self.io_err("write", &self.shadow_path, e))?;
        d.before_write(self.shadow.file(), offset, data.len())
            .map_err(|e| self.io_err("journal a write to", &self.shadow_path, e))?;
        let shadow_err = |source| TargetError::Shadow { volume: self.volume(), source };
        match gate {
            Gate::Proceed => self.shadow.write_at(offset, data).map_err(shadow_err),
            Gate::Torn(n) => {
                self.shadow.write_at(offset, &data[..data.len() / 2]).map_err(shadow_err)?;
                Err(self.io_err("write", &self.shadow_path, crate::durable::crash(n, Op::ShadowWrite)))
            }
        }
    }

    fn shadow_write_zero(&self, offset: u64, len: u64) -> Result<(), TargetError> {
        let zeros = vec![0u8; IO_CHUNK.min(len as usize)];
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(IO_CHUNK as u64) as usize;
            self.shadow_write(offset + done, &zeros[..n])?;
            done += n as u64;
        }
        Ok(())
    }

    fn sync_shadow(&self) -> Result<(), TargetError> {
        let d = &self.opts.durable;
        d.gate_whole(Op::ShadowSync).map_err(|e| self.io_err("fsync", &self.shadow_path, e))?;
        self.shadow.sync_data().map_err(|source| TargetError::Shadow { volume: self.volume(), source })?;
        d.after_sync(self.shadow.file()).map_err(|e| self.io_err("fsync", &self.shadow_path, e))
    }

    /// Applies spool records to the shadow in file order through the volume's write engine (io_uring when
    /// available: up to [`APPLY_DEPTH`] writes in flight). Records of one segment do not overlap, so their writes
    /// may complete in any order; the engine is flushed between segments so that later records win.
    fn apply_records(&self, file: &File, path: &Path, records: &[Record]) -> Result<(), TargetError> {
        if records.is_empty() {
            return Ok(());
        }
        let shadow_err = |source| TargetError::Shadow { volume: self.volume(), source };
        let engine_err = |source| shadow_err(VolumeError::Io { path: self.shadow_path.clone(), source });
        let chunk = records.iter().map(|r| r.len).max().unwrap_or(0).min(IO_CHUNK as u64) as usize;
        let pool = BufPool::new(APPLY_DEPTH + 2, chunk);
        let mut w = self.shadow.writer(APPLY_DEPTH, pool).map_err(shadow_err)?;
        let mut prev_end = 0u64;
        let mut writeback = Writeback::default();
        for r in records {
            if r.offset < prev_end {
                w.flush().map_err(engine_err)?; // a new segment: earlier writes must land first
            }
            prev_end = r.end();
            let mut done = 0u64;
            while done < r.len {
                let n = (r.len - done).min(chunk as u64) as usize;
                let mut buf = w.pool().get();
                buf.set_len(n);
                match r.kind {
                    RecordKind::Zero => buf.fill(0),
                    RecordKind::Data => {
                        spool::read_payload(file, path, r, done, &mut buf).map_err(|e| self.spool_err(e))?
                    }
                }
                let offset = r.offset + done;
                let d = &self.opts.durable;
                let gate = d.gate(Op::ShadowWrite).map_err(|e| self.io_err("write", &self.shadow_path, e))?;
                d.before_write(self.shadow.file(), offset, n)
                    .map_err(|e| self.io_err("journal a write to", &self.shadow_path, e))?;
                match gate {
                    Gate::Proceed => {
                        w.write(offset, buf).map_err(engine_err)?;
                        // Writes still in flight when it starts are left to the fdatasync after the apply.
                        writeback.wrote(self.shadow.file(), offset, n as u64);
                    }
                    Gate::Torn(i) => {
                        buf.set_len(n / 2);
                        w.write(offset, buf).map_err(engine_err)?;
                        w.flush().map_err(engine_err)?;
                        let crash = crate::durable::crash(i, Op::ShadowWrite);
                        return Err(self.io_err("write", &self.shadow_path, crash));
                    }
                }
                done += n as u64;
            }
        }
        w.flush().map_err(engine_err)
    }

    /// The current state with `incomplete` and `generation` replaced and no evidence (the shadow is about to be,
    /// or was, written without a commit recording it).
    fn state_with(&self, incomplete: bool, generation: u64) -> StateFile {
        StateFile {
            incomplete,
            generation,
            corrupt: false,
            exists: true,
            evidence: Evidence::None,
            ..self.state.clone()
        }
    }

    /// The state after committing `generation` with identifier `id`: trusted, the shadow's evidence as it is now
    /// (after its fsync), `id` current in the history.
    fn committed_state(&self, generation: u64, id: link::GenId) -> StateFile {
        let mut history = if self.state.corrupt { Default::default() } else { self.state.history.clone() };
        let node = if self.opts.peer.is_empty() { "local" } else { &self.opts.peer };
        let (record, distrust) = match &self.opts.commit_as {
            Some((r, d)) => (r.clone(), *d),
            None => (generations::record(generation, id, node), Distrust::None),
        };
        history.push(record);
        StateFile {
            exists: true,
            incomplete: false,
            corrupt: false,
            generation,
            distrust,
            evidence: Evidence::of(self.shadow.file()),
            history,
        }
    }

    /// The identifier of the shadow's content: the current record, when it describes the committed generation.
    fn generation_id(&self) -> Option<link::GenId> {
        let c = self.state.history.current.as_ref()?;
        let committed = self.committed_generation();
        (!self.state.corrupt && self.complete() && c.generation == committed && self.state.generation == committed)
            .then_some(c.id)
    }

    /// Evidence that the shadow may hold something other than its committed generation: it was promoted, a
    /// verify found a difference, or it was written since the commit that recorded the evidence (`None`: no such
    /// evidence; the identity of the generation may still be unknown, see [`Target::distrust`]). A shadow with
    /// such evidence must not be promoted without being forced.
    pub fn tampered(&self) -> Option<String> {
        if !self.complete() || self.state.corrupt {
            return None; // not promotable for other reasons, said elsewhere
        }
        match self.state.distrust {
            Distrust::Promoted => {
                let by = self
                    .state
                    .history
                    .current
                    .as_ref()
                    .map_or_else(String::new, |c| format!(" on node {} at unix {}", c.node, c.time));
                return Some(format!("it was promoted to production{by} and may have been written since"));
            }
            Distrust::VerifyFailed => {
                let committed = self.committed_generation();
                return Some(format!("a verify found it different from its committed generation {committed}"));
            }
            Distrust::RolledBack => {
                let to = self.state.history.current.as_ref().map_or_else(String::new, |c| {
                    format!(" {} ({}, made at unix {})", c.generation, generations::id_hex(&c.id), c.time)
                });
                return Some(format!(
                    "it was rolled back to the retained generation{to}, not the primary's latest (promote it with \
                     `promote --generation`)"
                ));
            }
            Distrust::None => {}
        }
        match self.state.evidence {
            Evidence::None => None,
            recorded => recorded.changed(&Evidence::of(self.shadow.file())),
        }
    }

    /// Why the shadow is not trusted to hold exactly its committed generation (`None`: it is): no complete
    /// generation, [`Target::tampered`], an unknown identity, or no evidence recorded.
    pub fn distrust(&self) -> Option<String> {
        if !self.complete() {
            return Some("it holds no complete generation".into());
        }
        if self.state.corrupt {
            return Some("its state file is corrupt".into());
        }
        if let Some(why) = self.tampered() {
            return Some(why);
        }
        if self.generation_id().is_none() {
            return Some(
                "the identity of its committed generation was not recorded (an interrupted commit, or state \
                 written by an older version)"
                    .into(),
            );
        }
        self.state.evidence.changed(&Evidence::of(self.shadow.file()))
    }

    /// The retained generation the shadow was rolled back to (`blockrep restore`), when that is its only mark and
    /// nothing wrote it since: it then holds exactly that generation.
    pub fn rolled_back_to(&self) -> Option<&link::GenRecord> {
        if self.state.distrust != Distrust::RolledBack || self.state.corrupt || !self.complete() {
            return None;
        }
        if self.state.evidence.changed(&Evidence::of(self.shadow.file())).is_some() {
            return None;
        }
        self.state.history.current.as_ref()
    }

    /// Marks the shadow untrusted (durably): the next sync compares its actual content with the source.
    pub fn mark_untrusted(&mut self, why: Distrust) -> Result<(), TargetError> {
        let mut s = self.state.clone();
        if !s.exists || s.corrupt {
            return Ok(()); // nothing to protect: an incomplete or unreadable state is never trusted
        }
        s.distrust = why;
        self.write_state(s)
    }

    /// Records (durably) that the shadow became production on `node`: its content gets a new identifier, so that
    /// a sync from the old primary sees that both sides wrote since their last common generation (split brain),
    /// and it is untrusted.
    pub fn mark_promoted(&mut self, node: &str) -> Result<(), TargetError> {
        let mut s = self.state.clone();
        if !s.exists || s.corrupt || s.incomplete {
            return Ok(());
        }
        s.history.push(generations::record(self.committed_generation(), generations::new_id(), node));
        s.distrust = Distrust::Promoted;
        self.write_state(s)
    }

    /// The committed generation's manifest and record, when the shadow is trusted to hold exactly that generation
    /// (`None` otherwise). A node promoting this shadow keeps them as its primary-side reference
    /// ([`generations::adopt_source`]): the old primary, demoted cleanly after a final sync, holds the same
    /// generation ([`Target::adopt`]), so the first sync back to it can be incremental. An interrupted transfer
    /// kept for resume (the primary died in the middle of a sync) does not matter: its spool has no commit record
    /// (a committed one is rolled forward at open), so it never touched the shadow.
    pub fn reference(&self) -> Option<(&Manifest, link::GenRecord)> {
        if self.distrust().is_some() || self.session.is_some() {
            return None;
        }
        let id = self.generation_id()?;
        let m = self.manifest.as_ref()?;
        let r = self.state.history.current.clone()?;
        (r.id == id && r.generation == m.generation()).then_some((m, r))
    }

    /// Records (durably) that the shadow holds exactly the generation described by the manifest at `manifest`
    /// (the old primary's own manifest of its volume, which is this shadow) with `record` (its identifier), with
    /// fresh evidence, so that a sync from the new primary that promoted this generation can be incremental.
    /// Used by a primary demoted after a switchover's final sync; the caller guarantees the volume was not
    /// written since that sync (the evidence recorded here catches any later write).
    ///
    /// Crash safety: the interrupted transfer (spool, `manifest.next`) and the state file are removed first, then
    /// the manifest is replaced, then the new state is written. Until the last step the state holds no identifier
    /// (or there is no complete generation), so the next sync compares (or is full); never incremental.
    pub fn adopt(&mut self, manifest: &Path, record: &link::GenRecord) -> Result<(), TargetError> {
        self.adopt_marked(manifest, record, Distrust::None)
    }

    /// Records (durably) that the shadow descends from the generation described by the manifest at `manifest`
    /// with `record`, but may have been written since: like [`Target::adopt`], in the same crash order, with the
    /// shadow marked promoted (untrusted) in the same state write. Used by a primary whose volume is its own
    /// shadow when it is demoted without a switchover's final sync (after an unplanned promote of the peer): the
    /// new primary knows `record` (it promoted that generation), so its sync back is a compare sync of the
    /// actual content rather than a split brain, and never incremental.
    pub fn adopt_written(&mut self, manifest: &Path, record: &link::GenRecord) -> Result<(), TargetError> {
        self.adopt_marked(manifest, record, Distrust::Promoted)
    }

    fn adopt_marked(
        &mut self,
        manifest: &Path,
        record: &link::GenRecord,
        distrust: Distrust,
    ) -> Result<(), TargetError> {
        let bad = |what: String| TargetError::State { path: manifest.to_owned(), what };
        if self.session.is_some() {
            return Err(bad("a transfer is in progress on this shadow".into()));
        }
        let m = Manifest::open(manifest).map_err(|e| self.manifest_err(e))?;
        if m.generation() != record.generation || m.volume_size() > self.shadow.size() {
            return Err(bad(format!(
                "it describes generation {} of {} bytes; expected generation {} of at most {} bytes",
                m.generation(),
                m.volume_size(),
                record.generation,
                self.shadow.size()
            )));
        }
        let bytes = std::fs::read(manifest).map_err(|e| self.io_err("read manifest", manifest, e))?;
        let mut history = if self.state.corrupt { Default::default() } else { self.state.history.clone() };
        let durable = self.opts.durable.clone();
        let dir = self.state_dir.clone();
        let next = manifest::next_path(&self.path(MANIFEST_FILE));
        for (op, path) in [
            (Op::StateWrite, self.path(STATE_FILE)),
            (Op::SpoolRemove, self.path(SPOOL_FILE)),
            (Op::ManifestWrite, next),
        ] {
            durable.remove_file(op, &path).map_err(|e| self.io_err("remove", &path, e))?;
        }
        durable.sync_dir(&dir).map_err(|e| self.io_err("sync directory", &dir, e))?;
        self.pending = None;
        self.state = StateFile::default();
        durable
            .replace_file(Op::ManifestWrite, &dir, MANIFEST_FILE, &bytes)
            .map_err(|e| self.io_err("write manifest", &self.path(MANIFEST_FILE), e))?;
        self.load_manifest();
        if self.manifest.as_ref().map(|m| m.generation()) != Some(record.generation) {
            return Err(bad("the adopted manifest cannot be read back".into()));
        }
        history.push(record.clone());
        let state = StateFile {
            exists: true,
            incomplete: false,
            corrupt: false,
            generation: record.generation,
            distrust,
            evidence: Evidence::of(self.shadow.file()),
            history,
        };
        self.write_state(state)?;
        tracing::info!(
            volume = %self.opts.volume,
            generation = record.generation,
            id = %generations::id_hex(&record.id),
            untrusted = distrust != Distrust::None,
            "the shadow holds the generation this node synced as primary"
        );
        Ok(())
    }

    /// The committed generation (0: none).
    fn committed_generation(&self) -> u64 {
        match &self.manifest {
            Some(m) => m.generation(),
            None if self.state.exists && !self.state.incomplete => self.state.generation,
            None => 0,
        }
    }

    /// Whether the shadow holds a complete generation.
    fn complete(&self) -> bool {
        !self.state.incomplete && (self.manifest.is_some() || self.state.exists)
    }

    /// State of the shadow: size, committed generation and root, whether it is complete, and an interrupted
    /// transfer kept for resume. Reading it cannot fail (the target read its state at [`Target::open`]).
    pub fn info(&self) -> TargetInfo {
        TargetInfo {
            volume_size: self.shadow.size(),
            generation: self.committed_generation(),
            block_size: self.manifest.as_ref().map_or(0, |m| m.block_size()),
            root: self.manifest.as_ref().map(|m| m.root()),
            complete: self.complete(),
            pending: self.pending.as_ref().map(|s| PendingInfo {
                generation: s.header.generation,
                base_generation: s.header.base_generation,
                bytes: s.bytes(),
                end_offset: s.end_offset(),
            }),
            generation_id: self.generation_id(),
            distrust: self.distrust().unwrap_or_default(),
            trusted: self.distrust().is_none(),
            history: if self.state.corrupt {
                Vec::new()
            } else {
                self.state.history.all().into_iter().take(link::MAX_HISTORY).collect()
            },
        }
    }

    /// Starts (or resumes) a transfer. Refuses, writing nothing, a source larger than the shadow, an invalid block
    /// size, a base generation the shadow does not hold, or a generation other than the committed one plus one
    /// (checked: after generation `u64::MAX` there is none).
    fn begin_impl(&mut self, plan: &BeginPlan) -> Result<BeginAck, TargetError> {
        hash::validate_block_size(plan.block_size as u64)
            .map_err(|source| TargetError::BlockSize { volume: self.volume(), source })?;
        if plan.volume_size > self.shadow.size() {
            return Err(TargetError::TooSmall {
                shadow: self.shadow_path.clone(),
                shadow_size: self.shadow.size(),
                source_size: plan.volume_size,
            });
        }
        let committed = self.committed_generation();
        if plan.base_generation != 0 && plan.base_generation != committed {
            return Err(TargetError::BaseMismatch { volume: self.volume(), base: plan.base_generation, committed });
        }
        let next = committed
            .checked_add(1)
            .ok_or_else(|| TargetError::GenerationExhausted { volume: self.volume(), committed })?;
        if plan.generation != next {
            return Err(TargetError::NotNext { volume: self.volume(), generation: plan.generation, committed, next });
        }
        // The plan is acceptable: end a transfer in progress (its spool is kept for resume) before this one.
        self.abort()?;
        let in_place =
            (self.state.incomplete && !self.state.corrupt) || (!self.state.exists && self.manifest.is_none());
        let dest = self.path(MANIFEST_FILE);
        let d = self.opts.durable.clone();
        let (next, clean) = match &self.manifest {
            // Only an incremental sync may take the unchanged blocks' hashes from the manifest: in a compare sync
            // the shadow is not trusted to hold what its manifest says, so every hash comes from its content.
            Some(m)
                if !in_place
                    && plan.mode == PlanMode::Incremental
                    && m.volume_size() == plan.volume_size
                    && m.block_size() == plan.block_size =>
            {
                (ManifestWriter::from_manifest(&dest, plan.generation, m, d), true)
            }
            _ => (ManifestWriter::create_with(&dest, plan.generation, plan.volume_size, plan.block_size, d), false),
        };
        let next = next.map_err(|e| self.manifest_err(e))?;
        let mut dirty = BitSet::new(next.block_count(), !clean);
        let spool_path = self.path(SPOOL_FILE);
        let header = SpoolHeader {
            generation: plan.generation,
            base_generation: plan.base_generation,
            volume_size: plan.volume_size,
            block_size: plan.block_size,
        };
        let pending = self.pending.take();
        let mut resumed = false;
        let mode = if in_place {
            if pending.is_some() {
                self.remove_spool()?;
            }
            self.write_state(self.state_with(true, plan.generation))?;
            Mode::InPlace
        } else {
            match pending {
                Some(scan) if plan.resume && scan.header == header => {
                    for r in &scan.records {
                        let first = r.offset / plan.block_size as u64;
                        let last = (r.end() - 1) / plan.block_size as u64;
                        for b in first..=last {
                            dirty.set(b, true);
                        }
                    }
                    resumed = true;
                    let w = SpoolWriter::resume(&spool_path, scan, &self.opts.volume, self.opts.durable.clone())
                        .map_err(|e| self.spool_err(e))?;
                    Mode::Spool(Box::new(w))
                }
                _ => Mode::Spool(Box::new(
                    SpoolWriter::create(&spool_path, header, &self.opts.volume, self.opts.durable.clone())
                        .map_err(|e| self.spool_err(e))?,
                )),
            }
        };
        // A compare sync asks for every block's hash in order: hash the shadow from now on, while the source
        // scans. Not after a resume: the spooled records would have to be overlaid.
        let ahead = (plan.mode == PlanMode::Compare && !resumed).then(|| {
            let mmap = self.opts.io.engine == EngineKind::Auto;
            AheadHasher::start(self.shadow.clone(), plan.volume_size, plan.block_size, mmap, &self.opts.volume)
        });
        // Extents of this session come in increasing order; a resumed session may start anywhere, as it may
        // overwrite what an earlier session spooled.
        self.session = Some(Session {
            plan: plan.clone(),
            mode,
            next,
            dirty,
            end: 0,
            writeback: Writeback::default(),
            zeros: ZeroHashes::new(plan.block_size),
            pieces: Default::default(),
            prepared: if in_place { None } else { self.prepare() },
            ahead,
        });
        tracing::debug!(volume = %self.opts.volume, generation = plan.generation, in_place, resumed, "transfer begun");
        Ok(BeginAck { resumed, in_place })
    }

    fn session(&self, op: &'static str) -> Result<&Session, TargetError> {
        self.session.as_ref().ok_or(TargetError::NoTransfer { volume: self.volume(), op })
    }

    /// Writes one extent: checks it lies inside the source volume and the shadow and comes after the previous one,
    /// then spools it (or writes it in place).
    fn extent_impl(&mut self, e: Extent) -> Result<(), TargetError> {
        let s = self.session("extent")?;
        let bad = |what: String| TargetError::BadExtent { volume: self.volume(), offset: e.offset, len: e.len, what };
        match e.offset.checked_add(e.len) {
            Some(end) if end <= s.plan.volume_size && end <= self.shadow.size() => {}
            _ => {
                return Err(TargetError::ExtentOutOfRange {
                    volume: self.volume(),
                    offset: e.offset,
                    len: e.len,
                    volume_size: s.plan.volume_size,
                    shadow_size: self.shadow.size(),
                })
            }
        }
        if e.len == 0 {
            return Err(bad("it is empty".into()));
        }
        if e.offset < s.end {
            return Err(bad(format!("it starts before the end of the previous extent ({})", s.end)));
        }
        if let ExtentData::Data(b) = &e.data {
            if b.len() as u64 != e.len {
                return Err(bad(format!("its payload is {} bytes", b.len())));
            }
        }
        let in_place = matches!(s.mode, Mode::InPlace);
        if in_place {
            match &e.data {
                ExtentData::Data(b) => self.shadow_write(e.offset, b)?,
                ExtentData::Zero => self.shadow_write_zero(e.offset, e.len)?,
            }
        }
        let mut s = self.session.take().expect("checked above");
        let r = match &mut s.mode {
            Mode::Spool(w) => match &e.data {
                ExtentData::Data(b) => w.append_data(e.offset, b),
                ExtentData::Zero => w.append_zero(e.offset, e.len),
            },
            Mode::InPlace => Ok(()),
        };
        if let Err(err) = r {
            self.session = Some(s);
            return Err(self.spool_err(err));
        }
        s.end = e.offset + e.len;
        if in_place {
            // The disk writes the shadow while the transfer goes on; the commit's fdatasync waits for the rest.
            s.writeback.wrote(self.shadow.file(), e.offset, e.len);
        }
        update_hashes(&mut s, &e);
        self.session = Some(s);
        Ok(())
    }

    /// Reads the effective content (shadow overlaid with the spooled records of the transfer) of `[offset,
    /// offset + len)` into the scratch buffer (give it back with [`Target::recycle`]).
    fn read_effective(&mut self, offset: u64, len: usize) -> Result<AlignedBuf, TargetError> {
        let mut out = match self.scratch.take() {
            Some(b) if b.capacity() >= len => b,
            _ => AlignedBuf::new(len.max(IO_CHUNK)),
        };
        out.set_len(len);
        let got = self
            .shadow
            .read_at(offset, &mut out)
            .map_err(|source| TargetError::Shadow { volume: self.volume(), source })?;
        out[got..].fill(0);
        let spool_err = |e| TargetError::Spool { volume: self.opts.volume.clone(), source: e };
        if let Some(Session { mode: Mode::Spool(w), .. }) = &mut self.session {
            let end = offset + len as u64;
            let records = w.records();
            let segments = w.segments();
            // Segments in file order (later ones overwrite earlier ones); each is sorted by offset.
            let mut overlapping: Vec<Record> = Vec::new();
            for (i, &first) in segments.iter().enumerate() {
                let seg = &records[first..segments.get(i + 1).copied().unwrap_or(records.len())];
                let start = seg.partition_point(|r| r.end() <= offset);
                overlapping.extend(seg[start..].iter().take_while(|r| r.offset < end).copied());
            }
            for r in overlapping {
                let lo = r.offset.max(offset);
                let hi = r.end().min(end);
                let dst = &mut out[(lo - offset) as usize..(hi - offset) as usize];
                match r.kind {
                    RecordKind::Zero => dst.fill(0),
                    RecordKind::Data => w.read_payload(&r, lo - r.offset, dst).map_err(spool_err)?,
                }
            }
        }
        Ok(out)
    }

    /// Keeps a buffer of [`Target::read_effective`] for the next read.
    fn recycle(&mut self, buf: AlignedBuf) {
        self.scratch = Some(buf);
    }

    fn block_content(&mut self, b: u64) -> Result<AlignedBuf, TargetError> {
        let s = self.session("hash")?;
        let (size, bs) = (s.plan.volume_size, s.plan.block_size);
        self.read_effective(b * bs as u64, hash::block_len(size, bs, b))
    }

    fn ensure_hash(&mut self, b: u64) -> Result<BlockHash, TargetError> {
        let s = self.session("hash")?;
        if !s.dirty.get(b) {
            return Ok(s.next.get(b));
        }
        let data = self.block_content(b)?;
        let h = hash::hash_block(&data);
        self.recycle(data);
        let s = self.session.as_mut().expect("checked above");
        s.next.set(b, &h);
        s.dirty.set(b, false);
        Ok(h)
    }

    fn check_blocks(&self, first: u64, count: u64) -> Result<(), TargetError> {
        let s = self.session("hash")?;
        let block_count = s.next.block_count();
        match first.checked_add(count) {
            Some(end) if end <= block_count => Ok(()),
            _ => Err(TargetError::BlockRange {
                volume: self.volume(),
                first,
                end: first.saturating_add(count),
                block_count,
            }),
        }
    }

    /// Hashes of blocks `first..first + count` of the effective content. Runs of blocks whose hash is not known
    /// (every block of a compare sync) are read [`IO_CHUNK`] bytes at a time, not block by block.
    fn block_hashes_impl(&mut self, first: u64, count: u32) -> Result<Vec<BlockHash>, TargetError> {
        self.check_blocks(first, count as u64)?;
        let s = self.session("hash")?;
        let (size, bs) = (s.plan.volume_size, s.plan.block_size);
        let per_read = (IO_CHUNK as u64 / bs as u64).max(1);
        let end = first + count as u64;
        let mut b = first;
        while b < end {
            let s = self.session.as_mut().expect("checked above");
            // A block no extent has reached yet: the read-ahead hasher's hash of the shadow is its hash.
            if s.dirty.get(b) && b * bs as u64 >= s.end {
                if let Some(h) = s.ahead.as_mut().and_then(|a| a.take(b)) {
                    s.next.set(b, &h);
                    s.dirty.set(b, false);
                    b += 1;
                    continue;
                }
            }
            let s = self.session.as_ref().expect("checked above");
            let mut run_end = b;
            while run_end < end && run_end - b < per_read && s.dirty.get(run_end) {
                run_end += 1;
            }
            if run_end - b < 2 {
                self.ensure_hash(b)?;
                b += 1;
                continue;
            }
            let offset = b * bs as u64;
            let len = ((run_end * bs as u64).min(size) - offset) as usize;
            let data = self.read_effective(offset, len)?;
            let s = self.session.as_mut().expect("checked above");
            for (i, chunk) in data.chunks(bs as usize).enumerate() {
                let blk = b + i as u64;
                debug_assert_eq!(chunk.len(), hash::block_len(size, bs, blk));
                s.next.set(blk, &hash::hash_block(chunk));
                s.dirty.set(blk, false);
            }
            self.recycle(data);
            b = run_end;
        }
        let s = self.session.as_ref().expect("checked above");
        Ok((first..end).map(|b| s.next.get(b)).collect())
    }

    /// Fingerprints ([`hash::piece_cv`]) of the [`SUB_BLOCK_SIZE`] pieces of each listed block of the effective
    /// content, back to back. They are kept for the block's new hash at commit, so the block is read only here.
    /// Consecutive listed blocks are read together, up to [`IO_CHUNK`] bytes at a time (a clustered change is one
    /// read, not one per block: each read costs a device round trip).
    fn sub_hashes_impl(&mut self, blocks: &[u64]) -> Result<Vec<BlockHash>, TargetError> {
        let s = self.session("hash")?;
        let (size, bs) = (s.plan.volume_size, s.plan.block_size);
        let per_read = (IO_CHUNK as u64 / bs as u64).max(1);
        let mut out = Vec::new();
        let mut i = 0;
        while i < blocks.len() {
            let first = blocks[i];
            let mut n = 1u64;
            while n < per_read && blocks.get(i + n as usize).is_some_and(|&b| first.checked_add(n) == Some(b)) {
                n += 1;
            }
            self.check_blocks(first, n)?;
            let offset = first * bs as u64;
            let len = ((first + n) * bs as u64).min(size) - offset;
            let data = self.read_effective(offset, len as usize)?;
            for (k, chunk) in data.chunks(bs as usize).enumerate() {
                debug_assert_eq!(chunk.len(), hash::block_len(size, bs, first + k as u64));
                let cvs: Vec<BlockHash> = hash::piece_cvs(chunk).collect();
                out.extend_from_slice(&cvs);
                let s = self.session.as_mut().expect("checked above");
                let per_block = cvs.len();
                s.pieces.insert(first + k as u64, cvs);
                if s.pieces.len() * per_block > MAX_PIECE_FINGERPRINTS {
                    let oldest = *s.pieces.keys().next().expect("not empty");
                    s.settle(oldest + 1);
                }
            }
            self.recycle(data);
            i += n as usize;
        }
        Ok(out)
    }

    /// Commits the transfer if its content hashes to `root` (see the module docs for the protocol).
    fn commit_impl(&mut self, root: BlockHash) -> Result<CommitAck, TargetError> {
        self.session("commit")?;
        // Every hash was asked for: stop the read-ahead hasher (if any) before the shadow is written.
        self.session.as_mut().expect("checked").ahead = None;
        self.session.as_mut().expect("checked").settle(u64::MAX);
        let dirty: Vec<u64> = self.session.as_ref().expect("checked").dirty.iter().collect();
        for b in dirty {
            self.ensure_hash(b)?;
        }
        let mut s = self.session.take().expect("checked above");
        let generation = s.plan.generation;
        let ours = s.next.root();
        if ours != root {
            let e = TargetError::RootMismatch {
                volume: self.volume(),
                generation,
                ours: hash::hex(&ours),
                theirs: hash::hex(&root),
            };
            self.session = Some(s);
            self.abort()?;
            return Err(e);
        }
        match s.mode {
            Mode::Spool(mut w) => {
                s.next.write().map_err(|e| self.manifest_err(e))?;
                if let Some(h) = s.prepared.take() {
                    let _ = h.join(); // a panic there is the retention's: preserve tries again
                }
                if let Err(e) = self.preserve(&w) {
                    s.mode = Mode::Spool(w);
                    self.session = Some(s);
                    if let Err(a) = self.abort() {
                        tracing::warn!(volume = %self.opts.volume, error = %error_chain(&a), "could not keep the spool for resume");
                    }
                    return Err(e);
                }
                w.commit(&root).map_err(|e| self.spool_err(e))?;
                // The spool and manifest.next were created during this transfer: make their directory entries
                // durable before the shadow changes, or a power loss could lose the redo log of a half-applied
                // transfer.
                self.opts.durable.sync_dir(&self.state_dir).map_err(|e| self.io_err("fsync", &self.state_dir, e))?;
                let spool_path = w.path().to_owned();
                let records = w.records().to_vec();
                let file = w.file().try_clone().map_err(|e| self.io_err("open", &spool_path, e))?;
                drop(w);
                self.apply_records(&file, &spool_path, &records)?;
                self.sync_shadow()?;
                s.next.install().map_err(|e| self.manifest_err(e))?;
                drop(file);
                self.remove_spool()?;
                self.write_state(self.committed_state(generation, s.plan.id))?;
            }
            Mode::InPlace => {
                self.sync_shadow()?;
                s.next.write().map_err(|e| self.manifest_err(e))?;
                s.next.install().map_err(|e| self.manifest_err(e))?;
                self.write_state(self.committed_state(generation, s.plan.id))?;
            }
        }
        self.load_manifest();
        tracing::info!(volume = %self.opts.volume, generation, root = %hash::hex(&root), "generation committed");
        if let Some(r) = &self.opts.retention {
            r.committed(&self.opts.volume, generation);
        }
        Ok(CommitAck { generation, root })
    }

    /// What the retention is given about the generation the shadow holds (`bytes` to be written by the commit).
    fn preserving(&self, bytes: u64) -> Preserving {
        let generation = self.committed_generation();
        Preserving {
            volume: self.volume(),
            shadow: self.shadow_path.clone(),
            state_dir: self.state_dir.clone(),
            generation,
            record: self.state.history.current.clone(),
            distrust: self.distrust(),
            manifest: self.manifest.as_ref().map(|m| m.path().to_owned()),
            root: self.manifest.as_ref().map(|m| m.root()),
            bytes,
            durable: self.opts.durable.clone(),
        }
    }

    /// Starts the retention's [`Retention::prepare`] for a spool-mode transfer, when there is a generation to keep.
    fn prepare(&self) -> Option<std::thread::JoinHandle<()>> {
        let r = self.opts.retention.clone()?;
        if !self.complete() || self.state.corrupt {
            return None;
        }
        let what = self.preserving(0);
        Some(std::thread::spawn(move || r.prepare(what)))
    }

    /// Asks the retention, if any, to keep the generation the spooled transfer `w` is about to overwrite (see
    /// [`Retention`]). Nothing to keep without a complete generation.
    fn preserve(&self, w: &SpoolWriter) -> Result<(), TargetError> {
        let Some(r) = &self.opts.retention else { return Ok(()) };
        if !self.complete() || self.state.corrupt {
            return Ok(());
        }
        let generation = self.committed_generation();
        let d = &self.opts.durable;
        let fail = |source: RetainFailure| TargetError::Retain { volume: self.volume(), generation, source };
        d.gate_whole(Op::Retain).map_err(|e| fail(Box::new(e)))?;
        r.preserve(&self.preserving(w.records().iter().map(|r| r.len).sum())).map_err(fail)
    }

    /// Ends a transfer without committing it: the spooled records are fsynced and kept for resume
    /// ([`TargetInfo::pending`]). Nothing happens without a transfer in progress.
    pub fn abort(&mut self) -> Result<(), TargetError> {
        let Some(s) = self.session.take() else { return Ok(()) };
        if let Mode::Spool(mut w) = s.mode {
            w.sync().map_err(|e| self.spool_err(e))?;
            self.pending = Some(w.into_scan());
        }
        Ok(())
    }

    /// Rehashes the shadow and compares it with the committed manifest: `Ok(true)` when every block matches.
    pub fn verify(&self) -> Result<bool, TargetError> {
        let m = self.manifest.as_ref().ok_or(TargetError::NoManifest { volume: self.volume() })?;
        let (size, bs) = (m.volume_size(), m.block_size());
        let mut buf = AlignedBuf::new(bs as usize);
        for b in 0..m.block_count() {
            let len = hash::block_len(size, bs, b);
            buf.set_len(len);
            self.shadow
                .read_at(b * bs as u64, &mut buf)
                .map_err(|source| TargetError::Shadow { volume: self.volume(), source })?;
            if hash::hash_block(&buf[..len]) != *m.hash(b) {
                tracing::warn!(volume = %self.opts.volume, block = b, "shadow block differs from the manifest");
                return Ok(false);
            }
        }
        Ok(true)
    }
}

/// Updates the next manifest for an extent just received: blocks it fully covers get the hash of their new
/// content, blocks it partly covers become dirty.
/// Blocks whose piece fingerprints are kept get the fingerprints of the whole pieces the extent writes (any
/// other partial write drops them). Blocks before the extent's first one are settled: extents come in increasing
/// order, so no extent of this session writes them again.
fn update_hashes(s: &mut Session, e: &Extent) {
    let bs = s.plan.block_size as u64;
    let size = s.plan.volume_size;
    let end = e.offset + e.len;
    let first = e.offset / bs;
    let last = (end - 1) / bs;
    s.settle(first);
    const PIECE: u64 = SUB_BLOCK_SIZE as u64;
    for b in first..=last {
        let start = b * bs;
        let blen = hash::block_len(size, s.plan.block_size, b) as u64;
        if start >= e.offset && start + blen <= end {
            let h = match &e.data {
                ExtentData::Zero => s.zeros.get(blen as usize),
                ExtentData::Data(d) => {
                    let at = (start - e.offset) as usize;
                    hash::hash_block(&d[at..at + blen as usize])
                }
            };
            s.next.set(b, &h);
            s.dirty.set(b, false);
            s.pieces.remove(&b);
            continue;
        }
        s.dirty.set(b, true);
        let Some(cvs) = s.pieces.get_mut(&b) else { continue };
        // The part of this block the extent writes, relative to the block.
        let lo = e.offset.max(start) - start;
        let hi = end.min(start + blen) - start;
        if lo % PIECE != 0 || (hi % PIECE != 0 && hi != blen) {
            s.pieces.remove(&b);
            continue;
        }
        let mut at = lo;
        while at < hi {
            let len = PIECE.min(blen - at);
            let src = start + at - e.offset;
            cvs[(at / PIECE) as usize] = match &e.data {
                ExtentData::Zero => hash::piece_cv(&ZERO_PIECE[..len as usize], at),
                ExtentData::Data(d) => hash::piece_cv(&d[src as usize..(src + len) as usize], at),
            };
            at += len;
        }
    }
}

/// One piece of zeros (for the fingerprints of zero extents).
static ZERO_PIECE: [u8; SUB_BLOCK_SIZE as usize] = [0; SUB_BLOCK_SIZE as usize];

impl Drop for Target {
    fn drop(&mut self) {
        if self.session.is_some() {
            if let Err(e) = self.abort() {
                tracing::warn!(volume = %self.opts.volume, error = %error_chain(&e), "could not keep the spool for resume");
            }
        }
    }
}

impl From<TargetError> for LinkError {
    fn from(e: TargetError) -> Self {
        LinkError::Local(Box::new(e))
    }
}

impl TargetLink for Target {
    fn info(&mut self) -> Result<TargetInfo, LinkError> {
        Ok(Target::info(self))
    }
    fn begin(&mut self, plan: &BeginPlan) -> Result<BeginAck, LinkError> {
        Ok(self.begin_impl(plan)?)
    }
    fn block_hashes(&mut self, first: u64, count: u32) -> Result<Vec<BlockHash>, LinkError> {
        Ok(self.block_hashes_impl(first, count)?)
    }
    fn sub_hashes(&mut self, blocks: &[u64]) -> Result<Vec<BlockHash>, LinkError> {
        Ok(self.sub_hashes_impl(blocks)?)
    }
    fn extent(&mut self, extent: Extent) -> Result<(), LinkError> {
        Ok(self.extent_impl(extent)?)
    }
    fn commit(&mut self, root: BlockHash) -> Result<CommitAck, LinkError> {
        Ok(self.commit_impl(root)?)
    }
}
