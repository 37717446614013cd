//! Retained generations on the standby (`keep_generations = K`, issue 12): before a sync overwrites a shadow, the
//! generation it holds is kept as a copy, and after the new generation commits the oldest copies beyond K - 1 are
//! removed, so the standby holds its current generation and up to K - 1 earlier ones.
//!
//! A copy is made by the backend the shadow allows ([`Backend`]): a thin snapshot for a shadow on a thin LV, a
//! classic snapshot (sized from the transfer plus a margin, the VG's free space checked first, earlier classic
//! copies grown so that the transfer's copy-on-write fits in them too) for a classic LV, a reflink copy for a file
//! on a filesystem that shares extents (XFS, Btrfs). Anything else is refused when the configuration is checked.
//!
//! Each copy has a record in the volume's standby state directory, `retained/<generation>.json`, and a hard link
//! of the manifest describing it, `retained/<generation>.manifest` (the target replaces its manifest by rename, so
//! the link keeps the old one). The record is written last and removed first: a copy without a record is
//! incomplete (a crash while making or removing it) and is removed by the next [`Retainer`] call, so every copy
//! listed is complete. The engine calls [`Retainer::preserve`] before the spool's commit record
//! ([`engine::target::Retention`]), so a refused copy (no space) refuses the commit with the shadow untouched.
//!
//! Using a copy: [`restore`] rolls the shadow back to a retained generation with a crash-safe local compare sync
//! from the copy (after checking the copy still holds what was retained), recording the generation's identity and
//! the mark "rolled back" in the same commit, so the primary's next sync is a compare sync, never a wrong
//! incremental. The generation the rollback overwrites is kept like any other.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use engine::durable::{Durable, Op};
use engine::generations;
use engine::manifest::Manifest;
use engine::target::{Distrust, Preserving, RetainFailure, Retention, TargetOptions};
use engine::volume::{Access, IoOptions, Volume};
use serde::{Deserialize, Serialize};

use crate::alarms::{self, AlarmKind, Judgement};
use crate::config::{Config, Volume as VolumeCfg};
use crate::layout::Side;

/// Most generations `keep_generations` may keep (the primary remembers 32 generation identifiers: a restored
/// generation must still be one it knows).
pub const MAX_KEEP_GENERATIONS: u32 = 16;
/// Tag of every retained copy blockrep makes on LVM.
pub const RETAINED_TAG: &str = "blockrep_retained";
/// Directory of the records, in the volume's standby state directory.
pub const DIR: &str = "retained";
/// Format version of a record.
const RECORD_VERSION: u32 = 1;
/// Margin over the transfer's bytes for a copy-on-write store or free space: 1/8 plus 4 MiB (exception-store
/// metadata, chunk rounding).
fn margin(bytes: u64) -> u64 {
    bytes.saturating_add(bytes / 8).saturating_add(4 << 20)
}

/// Errors of retained generations.
#[derive(Debug, thiserror::Error)]
pub enum RetainError {
    /// The shadow cannot hold copies.
    #[error(
        "volume {volume}: keep_generations = {keep} needs the shadow on an LVM logical volume (thin or classic) or \
         a file on a filesystem with reflinks (XFS, Btrfs), but {shadow} {why}; set keep_generations = 1 or move \
         the shadow"
    )]
    Unsupported {
        /// Volume name.
        volume: String,
        /// The configured K.
        keep: u32,
        /// The shadow.
        shadow: PathBuf,
        /// Why not.
        why: String,
    },
    /// An lvm command failed.
    #[error("volume {volume}: cannot {action}")]
    Lvm {
        /// Volume name.
        volume: String,
        /// What was being done.
        action: String,
        /// lvm's error.
        #[source]
        source: Box<lvmctl::LvmError>,
    },
    /// A file operation failed.
    #[error("volume {volume}: cannot {action} {path}")]
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
    /// Not enough space for a copy.
    #[error(
        "volume {volume}: no room to keep generation {generation}: {what}; nothing was written to the shadow. Free \
         space, or lower keep_generations"
    )]
    NoSpace {
        /// Volume name.
        volume: String,
        /// The generation to keep.
        generation: u64,
        /// Where space is missing.
        what: String,
    },
    /// No such retained generation.
    #[error("volume {volume}: generation {generation} is not retained on this node (`blockrep generations {volume}` lists what is)")]
    NotRetained {
        /// Volume name.
        volume: String,
        /// The generation asked for.
        generation: u64,
    },
    /// The copy is not usable.
    #[error("volume {volume}: the retained copy of generation {generation} cannot be used: {why}")]
    Unusable {
        /// Volume name.
        volume: String,
        /// The generation.
        generation: u64,
        /// Why.
        why: String,
    },
    /// The volume is not configured with a shadow here.
    #[error("volume {volume} has no shadow configured on node {node}")]
    NoShadow {
        /// Volume name.
        volume: String,
        /// This node.
        node: String,
    },
    /// The rollback's sync failed.
    #[error("volume {volume}: rolling the shadow back to generation {generation} failed; the shadow holds its last complete generation")]
    Rollback {
        /// Volume name.
        volume: String,
        /// The generation.
        generation: u64,
        /// The engine's error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

impl RetainError {
    /// What kind of failure this is.
    pub fn kind(&self) -> crate::ErrorKind {
        match self {
            RetainError::Unsupported { .. } | RetainError::NotRetained { .. } | RetainError::NoShadow { .. } => {
                crate::ErrorKind::Usage
            }
            RetainError::Unusable { .. } => crate::ErrorKind::Unsafe,
            _ => crate::ErrorKind::Failed,
        }
    }
}

/// How copies of one shadow are made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Backend {
    /// Thin snapshots of the thin LV `vg/lv`.
    Thin {
        /// VG.
        vg: String,
        /// The shadow LV.
        lv: String,
        /// Its thin pool (in the same VG).
        pool: String,
    },
    /// Classic snapshots of the LV `vg/lv`.
    Classic {
        /// VG.
        vg: String,
        /// The shadow LV.
        lv: String,
    },
    /// Reflink copies of a file, beside it.
    Reflink,
}

impl Backend {
    /// `thin`, `classic` or `reflink`.
    pub fn kind(&self) -> &'static str {
        match self {
            Backend::Thin { .. } => "thin",
            Backend::Classic { .. } => "classic",
            Backend::Reflink => "reflink",
        }
    }
}

/// Backends found, by shadow path and device (a long-running `serve` asks lvm once per shadow, not per sync).
static BACKENDS: std::sync::Mutex<Vec<(PathBuf, u64, Backend)>> = std::sync::Mutex::new(Vec::new());

/// Finds how copies of `shadow` can be made, or says why they cannot (remembered per shadow and device).
pub fn backend(volume: &str, shadow: &Path, keep: u32) -> Result<Backend, RetainError> {
    let dev = std::fs::metadata(shadow).map(|m| if m.is_file() { m.dev() } else { m.rdev() }).unwrap_or(0);
    let cached =
        BACKENDS.lock().expect("not poisoned").iter().find(|c| c.0 == shadow && c.1 == dev).map(|c| c.2.clone());
    if let Some(b) = cached {
        return Ok(b);
    }
    let b = detect_backend(volume, shadow, keep)?;
    BACKENDS.lock().expect("not poisoned").push((shadow.to_owned(), dev, b.clone()));
    Ok(b)
}

fn detect_backend(volume: &str, shadow: &Path, keep: u32) -> Result<Backend, RetainError> {
    let unsupported =
        |why: String| RetainError::Unsupported { volume: volume.into(), keep, shadow: shadow.into(), why };
    let meta = std::fs::metadata(shadow).map_err(|e| unsupported(format!("cannot be read ({e})")))?;
    if meta.is_file() {
        return probe_reflink(shadow).map(|()| Backend::Reflink).map_err(|e| {
            unsupported(format!("is on a filesystem without reflinks (a test copy in its directory failed: {e})"))
        });
    }
    let lvm =
        lvmctl::Lvm::new().map_err(|e| unsupported(format!("needs lvm, which failed: {}", link::error_chain(&e))))?;
    let lv = lvm.lv_for_device(shadow).map_err(|e| unsupported(link::error_chain(&e)))?;
    if lv.is_snapshot() {
        return Err(unsupported(format!("is the classic snapshot {}", lv.full_name())));
    }
    match lvm.thin_lv(&lv.vg, &lv.name) {
        Ok(Some(t)) => Ok(Backend::Thin { vg: lv.vg, lv: lv.name, pool: t.pool }),
        Ok(None) => Ok(Backend::Classic { vg: lv.vg, lv: lv.name }),
        Err(e) => Err(unsupported(format!(
            "is the LV {} whose type lvm did not report: {}",
            lv.full_name(),
            link::error_chain(&e)
        ))),
    }
}

/// Reflinks a small test file in `shadow`'s directory.
fn probe_reflink(shadow: &Path) -> std::io::Result<()> {
    let dir = shadow.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let a = dir.join(format!(".blockrep-reflink-probe-{}", std::process::id()));
    let b = dir.join(format!(".blockrep-reflink-probe-{}.copy", std::process::id()));
    let r = (|| {
        std::fs::write(&a, [0x5a; 4096])?;
        reflink(&a, &b)
    })();
    let _ = std::fs::remove_file(&a);
    let _ = std::fs::remove_file(&b);
    r
}

/// Creates `to` (which must not exist) sharing all of `from`'s extents (`FICLONE`), and fsyncs it.
fn reflink(from: &Path, to: &Path) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let src = std::fs::File::open(from)?;
    let dst = std::fs::OpenOptions::new().write(true).create_new(true).open(to)?;
    // SAFETY: FICLONE takes the source file descriptor as its argument; both descriptors are open files owned by
    // this function for the duration of the call, and the kernel reads nothing else from user memory.
    let r = unsafe { libc::ioctl(dst.as_raw_fd(), libc::FICLONE, src.as_raw_fd()) };
    if r != 0 {
        let e = std::io::Error::last_os_error();
        drop(dst);
        let _ = std::fs::remove_file(to);
        return Err(e);
    }
    dst.sync_all()
}

/// What is recorded of one retained copy (`retained/<generation>.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Retained {
    /// Format version (1).
    pub version: u32,
    /// Volume name.
    pub volume: String,
    /// The standby's generation number the copy holds.
    pub generation: u64,
    /// Identifier (hex) of the content, when recorded.
    pub id: Option<String>,
    /// When that generation was made (unix seconds), when recorded.
    pub made_at: Option<u64>,
    /// The node that made it.
    pub source_node: Option<String>,
    /// When the copy was made (unix seconds).
    pub retained_at: u64,
    /// `thin`, `classic` or `reflink`.
    pub kind: String,
    /// The copy: `vg/lv` or a file path.
    pub copy: String,
    /// The volume's size in bytes.
    pub volume_size: u64,
    /// The root hash (hex) of the manifest describing the content.
    pub root: Option<String>,
    /// Why the shadow was not trusted to hold exactly that generation when the copy was made (`None`: it was).
    pub untrusted: Option<String>,
}

/// A retained copy as listed: the record and the copy's state now.
#[derive(Debug, Clone, Serialize)]
pub struct Listed {
    /// The record.
    #[serde(flatten)]
    pub record: Retained,
    /// Whether the copy is there and valid (a classic snapshot that overflowed is not).
    pub complete: bool,
    /// Whether it can be promoted or restored without forcing: complete and made from a trusted shadow.
    pub promotable: bool,
    /// Bytes the copy takes on disk, when known (thin: mapped data; classic: the used copy-on-write store;
    /// reflink: allocated blocks, shared ones included).
    pub size_on_disk: Option<u64>,
    /// Fill level of a classic snapshot's copy-on-write store (percent).
    pub fill_percent: Option<f64>,
    /// What is wrong, when not complete.
    pub problem: Option<String>,
}

/// The copies of one volume's shadow, and how to make and remove them. It is the engine's
/// [`engine::target::Retention`] for that shadow.
#[derive(Debug, Clone)]
pub struct Retainer {
    volume: String,
    shadow: PathBuf,
    dir: PathBuf,
    keep: u32,
    backend: Backend,
    cfg: Option<Config>,
    /// Drop the oldest copies on a thread of their own after a commit (`serve`: the sync's answer does not wait
    /// for lvremove); the next preserve, listing or restore waits for it (the lock file).
    background_prune: bool,
    /// What [`Retention::prepare`] made for this transfer: the generation kept and the thin pool's free bytes
    /// then (the commit checks against them instead of asking lvm again).
    prepared: Arc<std::sync::Mutex<Option<Prepared>>>,
}

/// What a prepare kept: the generation, and the thin pool's free bytes then.
type Prepared = (u64, Option<u64>);

impl Retainer {
    /// The retainer of volume `v` (its shadow configured) on this node, `None` when it keeps one generation.
    pub fn for_volume(cfg: &Config, v: &VolumeCfg) -> Result<Option<Retainer>, RetainError> {
        if v.keep_generations <= 1 {
            return Ok(None);
        }
        let shadow =
            v.shadow.clone().ok_or_else(|| RetainError::NoShadow { volume: v.name.clone(), node: cfg.node.clone() })?;
        let backend = backend(&v.name, &shadow, v.keep_generations)?;
        let dir = cfg.layout().side_dir(Side::Standby, &v.name).join(DIR);
        Ok(Some(Retainer {
            background_prune: false,
            prepared: Default::default(),
            volume: v.name.clone(),
            shadow,
            dir,
            keep: v.keep_generations,
            backend,
            cfg: Some(cfg.clone()),
        }))
    }

    /// A retainer for `shadow` with state directory `state_dir` (tests, and tools without a configuration).
    pub fn new(volume: &str, shadow: &Path, state_dir: &Path, keep: u32, backend: Backend) -> Retainer {
        Retainer {
            volume: volume.into(),
            shadow: shadow.into(),
            dir: state_dir.join(DIR),
            keep,
            backend,
            cfg: None,
            background_prune: false,
            prepared: Default::default(),
        }
    }

    /// How copies are made.
    pub fn backend(&self) -> &Backend {
        &self.backend
    }

    fn io_err(&self, action: &'static str, path: &Path, source: std::io::Error) -> RetainError {
        RetainError::Io { volume: self.volume.clone(), action, path: path.into(), source }
    }

    fn lvm_err(&self, action: String, source: lvmctl::LvmError) -> RetainError {
        RetainError::Lvm { volume: self.volume.clone(), action, source: Box::new(source) }
    }

    fn lvm(&self) -> Result<lvmctl::Lvm, RetainError> {
        lvmctl::Lvm::new().map_err(|e| self.lvm_err("run lvm".into(), e))
    }

    fn record_path(&self, generation: u64) -> PathBuf {
        self.dir.join(format!("{generation}.json"))
    }

    /// The manifest describing retained `generation`.
    pub fn manifest_path(&self, generation: u64) -> PathBuf {
        self.dir.join(format!("{generation}.manifest"))
    }

    /// The name of the copy of `generation`: `<lv>_gen<N>` in the shadow's VG, or `<shadow>.gen<N>` beside it.
    pub fn copy_name(&self, generation: u64) -> String {
        match &self.backend {
            Backend::Thin { vg, lv, .. } | Backend::Classic { vg, lv } => format!("{vg}/{lv}_gen{generation}"),
            Backend::Reflink => format!("{}.gen{generation}", self.shadow.display()),
        }
    }

    /// The device or file to read the copy of `generation` from.
    pub fn copy_path(&self, generation: u64) -> PathBuf {
        match &self.backend {
            Backend::Thin { .. } | Backend::Classic { .. } => {
                PathBuf::from(format!("/dev/{}", self.copy_name(generation)))
            }
            Backend::Reflink => PathBuf::from(self.copy_name(generation)),
        }
    }

    /// The records, oldest first; unreadable ones are skipped with a warning (their copies count as
    /// incomplete and are removed by [`Retainer::tidy`]).
    pub fn records(&self) -> Vec<Retained> {
        let mut v = Vec::new();
        let Ok(rd) = std::fs::read_dir(&self.dir) else { return v };
        for e in rd.flatten() {
            let p = e.path();
            if p.extension().is_none_or(|x| x != "json") {
                continue;
            }
            match std::fs::read(&p)
                .map_err(|e| e.to_string())
                .and_then(|b| serde_json::from_slice::<Retained>(&b).map_err(|e| e.to_string()))
            {
                Ok(r)
                    if r.version == RECORD_VERSION
                        && Some(r.generation.to_string().as_str()) == p.file_stem().and_then(|s| s.to_str()) =>
                {
                    v.push(r)
                }
                Ok(_) => {
                    tracing::warn!(path = %p.display(), "a retained-generation record of another version or name; ignored")
                }
                Err(e) => {
                    tracing::warn!(path = %p.display(), error = %e, "an unreadable retained-generation record; ignored")
                }
            }
        }
        v.sort_by_key(|r| r.generation);
        v
    }

    /// Generations of copies that exist (complete or not), from the storage itself, and (LVM) the VG's LVs as
    /// listed by the same `lvs`.
    fn copies(&self) -> Result<(Vec<u64>, Vec<lvmctl::Lv>), RetainError> {
        let parse = |name: &str, prefix: &str| name.strip_prefix(prefix).and_then(|n| n.parse::<u64>().ok());
        match &self.backend {
            Backend::Thin { vg, lv, .. } | Backend::Classic { vg, lv } => {
                let lvm = self.lvm()?;
                let lvs = lvm.lvs(Some(vg)).map_err(|e| self.lvm_err(format!("list the LVs of VG {vg}"), e))?;
                let prefix = format!("{lv}_gen");
                let gens =
                    lvs.iter().filter(|l| l.has_tag(RETAINED_TAG)).filter_map(|l| parse(&l.name, &prefix)).collect();
                Ok((gens, lvs))
            }
            Backend::Reflink => {
                let dir = self.shadow.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
                let prefix = format!("{}.gen", self.shadow.file_name().and_then(|n| n.to_str()).unwrap_or_default());
                let rd = std::fs::read_dir(dir).map_err(|e| self.io_err("list", dir, e))?;
                Ok((
                    rd.flatten().filter_map(|e| e.file_name().to_str().and_then(|n| parse(n, &prefix))).collect(),
                    Vec::new(),
                ))
            }
        }
    }

    /// Holds the retained copies of this shadow against other processes and threads (a background prune, a
    /// restore, a listing) until dropped.
    fn lock(&self) -> Result<nix::fcntl::Flock<std::fs::File>, RetainError> {
        std::fs::create_dir_all(&self.dir).map_err(|e| self.io_err("create", &self.dir, e))?;
        let path = self.dir.join(".lock");
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| self.io_err("open", &path, e))?;
        nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusive)
            .map_err(|(_, e)| self.io_err("lock", &path, e.into()))
    }

    /// Removes the copy of `generation` (record first, then the manifest link, then the copy, if it `exists`).
    fn remove(&self, generation: u64, exists: bool, durable: &Durable) -> Result<(), RetainError> {
        for p in [self.record_path(generation), self.manifest_path(generation)] {
            durable.remove_file(Op::Retain, &p).map_err(|e| self.io_err("remove", &p, e))?;
        }
        durable.sync_dir(&self.dir).map_err(|e| self.io_err("fsync", &self.dir, e))?;
        durable.gate_whole(Op::Retain).map_err(|e| self.io_err("remove the copy of", &self.shadow, e))?;
        match &self.backend {
            Backend::Thin { vg, lv, .. } | Backend::Classic { vg, lv } => {
                let name = format!("{lv}_gen{generation}");
                if exists {
                    self.lvm()?
                        .remove_lv(vg, &name)
                        .map_err(|e| self.lvm_err(format!("remove the retained copy {vg}/{name}"), e))?;
                }
            }
            Backend::Reflink => {
                let p = self.copy_path(generation);
                durable.remove_file(Op::Retain, &p).map_err(|e| self.io_err("remove", &p, e))?;
            }
        }
        tracing::info!(volume = %self.volume, generation, "removed a retained generation");
        Ok(())
    }

    /// Removes incomplete copies (a copy without a record, a record without its copy or manifest): what a crash
    /// while making or removing a copy leaves. Returns the complete records, oldest first, and the VG's LVs.
    pub fn tidy(&self, durable: &Durable) -> Result<(Vec<Retained>, Vec<lvmctl::Lv>), RetainError> {
        let records = self.records();
        let (copies, lvs) = self.copies()?;
        let mut complete = Vec::new();
        for r in records {
            let has_copy = copies.contains(&r.generation);
            if has_copy && self.manifest_path(r.generation).exists() {
                complete.push(r);
            } else {
                tracing::warn!(volume = %self.volume, generation = r.generation, "a retained generation lost its copy or manifest; removing its record");
                self.remove(r.generation, has_copy, durable)?;
            }
        }
        for &g in &copies {
            if !complete.iter().any(|r| r.generation == g) {
                tracing::warn!(volume = %self.volume, generation = g, copy = %self.copy_name(g), "removing an incomplete retained copy (interrupted while it was made or removed)");
                self.remove(g, true, durable)?;
            }
        }
        Ok((complete, lvs))
    }

    /// Drops classic copies whose copy-on-write store overflowed (never the shadow), with an alarm (cleared by
    /// the prune that finds K - 1 copies again). Returns the remaining records.
    fn drop_invalid(
        &self,
        records: Vec<Retained>,
        lvs: &[lvmctl::Lv],
        durable: &Durable,
    ) -> Result<Vec<Retained>, RetainError> {
        let Backend::Classic { lv, .. } = &self.backend else { return Ok(records) };
        let mut kept = Vec::new();
        let mut dropped = Vec::new();
        for r in records {
            let name = format!("{lv}_gen{}", r.generation);
            let st = lvs.iter().find(|l| l.name == name);
            if st.and_then(|l| l.snapshot_status()).is_some_and(|s| s.invalid) {
                self.remove(r.generation, true, durable)?;
                dropped.push(r.generation);
            } else {
                kept.push(r);
            }
        }
        if let (Some(cfg), false) = (&self.cfg, dropped.is_empty()) {
            let j = Judgement::raise(
                AlarmKind::RetainedDropped,
                Some(&self.volume),
                format!(
                    "volume {}: the retained classic snapshot(s) of generation(s) {dropped:?} overflowed and were \
                     removed (the shadow is intact); they can no longer be promoted or restored",
                    self.volume
                ),
            );
            alarms::update(cfg, &[j]);
        }
        Ok(kept)
    }

    fn write_record(&self, r: &Retained, durable: &Durable) -> Result<(), RetainError> {
        let json = serde_json::to_vec_pretty(r).expect("a record serialises");
        let name = format!("{}.json", r.generation);
        durable
            .replace_file(Op::Retain, &self.dir, &name, &json)
            .map_err(|e| self.io_err("write", &self.dir.join(name), e))
    }

    /// Refuses a transfer that may allocate more than the thin pool's `free` bytes once a snapshot shares the
    /// shadow's blocks.
    fn check_pool(&self, vg: &str, pool: &str, free: u64, p: &Preserving) -> Result<(), RetainError> {
        let need = margin(p.bytes);
        if free >= need {
            return Ok(());
        }
        Err(RetainError::NoSpace {
            volume: self.volume.clone(),
            generation: p.generation,
            what: format!(
                "thin pool {vg}/{pool} has {free} bytes free; with a snapshot kept, this transfer ({} bytes written) \
                 may allocate {need}",
                p.bytes
            ),
        })
    }

    /// Keeps the shadow's generation; returns the thin pool's free bytes it found (thin shadows).
    fn preserve_impl(&self, p: &Preserving) -> Result<Option<u64>, RetainError> {
        let d = &p.durable;
        let prepared = self.prepared.lock().expect("not poisoned").take();
        if let (Some((g, free)), Backend::Thin { vg, pool, .. }) = (prepared, &self.backend) {
            // Made by prepare during this transfer, under the same lock holder's rules: only the size check is left.
            if g == p.generation && self.record_path(g).exists() && self.manifest_path(g).exists() {
                if let Some(free) = free {
                    self.check_pool(vg, pool, free, p)?;
                }
                return Ok(free);
            }
        }
        let Some(manifest) = &p.manifest else {
            // Nothing could prove later what a copy holds: keep none rather than refuse the sync that repairs it.
            tracing::warn!(volume = %self.volume, generation = p.generation, "the shadow's generation has no valid manifest: not kept (the sync compares and commits as usual)");
            return Ok(None);
        };
        let _lock = self.lock()?;
        let (records, lvs) = self.tidy(d)?;
        let records = self.drop_invalid(records, &lvs, d)?;
        let generation = p.generation;
        let have = records.iter().any(|r| r.generation == generation);
        let need = margin(p.bytes);
        let no_space = |what: String| RetainError::NoSpace { volume: self.volume.clone(), generation, what };
        let mut pool_free = None;
        match &self.backend {
            Backend::Classic { vg, lv } => {
                let lvm = self.lvm()?;
                let vg_info = lvm.vg(vg).map_err(|e| self.lvm_err(format!("read VG {vg}"), e))?;
                // Every existing copy receives the transfer's copy-on-write too: each must have `need` free.
                let mut grow = Vec::new();
                for r in &records {
                    let name = format!("{lv}_gen{}", r.generation);
                    if let Some(l) = lvs.iter().find(|l| l.name == name) {
                        let used = l.data_percent.map_or(l.size, |pc| (l.size as f64 * pc / 100.0).ceil() as u64);
                        let free = l.size.saturating_sub(used);
                        if free < need {
                            grow.push((name, round_up(need - free, vg_info.extent_size)));
                        }
                    }
                }
                let new = if have { 0 } else { round_up(need, vg_info.extent_size) };
                let total = new + grow.iter().map(|g| g.1).sum::<u64>();
                if total > vg_info.free {
                    return Err(no_space(format!(
                        "VG {vg} has {} bytes free; the copy-on-write stores of this transfer ({} bytes written) need {total}",
                        vg_info.free, p.bytes
                    )));
                }
                for (name, add) in grow {
                    lvm.extend_lv(vg, &name, add)
                        .map_err(|e| self.lvm_err(format!("grow the retained copy {vg}/{name}"), e))?;
                }
                if !have {
                    let name = format!("{lv}_gen{generation}");
                    lvm.create_snapshot_tagged(vg, lv, &name, lvmctl::SnapshotSize::Bytes(need), RETAINED_TAG)
                        .map_err(|e| self.lvm_err(format!("create the retained copy {vg}/{name}"), e))?;
                }
            }
            Backend::Thin { vg, lv, pool } => {
                let lvm = self.lvm()?;
                if let Some(pl) = lvs.iter().find(|l| &l.name == pool) {
                    let used = pl.data_percent.map_or(0, |pc| (pl.size as f64 * pc / 100.0).ceil() as u64);
                    let free = pl.size.saturating_sub(used);
                    pool_free = Some(free);
                    self.check_pool(vg, pool, free, p)?;
                }
                if !have {
                    let name = format!("{lv}_gen{generation}");
                    lvm.create_thin_snapshot_only(vg, lv, &name, &[RETAINED_TAG])
                        .map_err(|e| self.lvm_err(format!("create the retained copy {vg}/{name}"), e))?;
                }
            }
            Backend::Reflink => {
                let st = nix::sys::statvfs::statvfs(&self.shadow)
                    .map_err(|e| self.io_err("check the free space of", &self.shadow, e.into()))?;
                let free = st.blocks_available() as u64 * st.fragment_size() as u64;
                if free < need {
                    return Err(no_space(format!(
                        "the filesystem of {} has {free} bytes free; with a copy kept, this transfer ({} bytes written) needs {need}",
                        self.shadow.display(),
                        p.bytes
                    )));
                }
                if !have {
                    let to = self.copy_path(generation);
                    d.gate_whole(Op::Retain).map_err(|e| self.io_err("reflink", &to, e))?;
                    reflink(&self.shadow, &to).map_err(|e| self.io_err("make the reflink copy", &to, e))?;
                    let parent = to.parent().unwrap_or(Path::new("."));
                    d.sync_dir(parent).map_err(|e| self.io_err("fsync", parent, e))?;
                }
            }
        }
        if have {
            return Ok(pool_free);
        }
        // The manifest describing the content, kept by a hard link (the commit renames a new one over it).
        let link_to = self.manifest_path(generation);
        let _ = std::fs::remove_file(&link_to);
        std::fs::hard_link(manifest, &link_to).map_err(|e| self.io_err("link the manifest to", &link_to, e))?;
        let rec = p.record.as_ref();
        let r = Retained {
            version: RECORD_VERSION,
            volume: self.volume.clone(),
            generation,
            id: rec.map(|r| generations::id_hex(&r.id)),
            made_at: rec.map(|r| r.time),
            source_node: rec.map(|r| r.node.clone()),
            retained_at: generations::now_secs(),
            kind: self.backend.kind().into(),
            copy: self.copy_name(generation),
            volume_size: Manifest::open(&link_to).map_or(0, |m| m.volume_size()),
            root: p.root.map(|r| engine::hash::hex(&r)),
            untrusted: p.distrust.clone(),
        };
        self.write_record(&r, d)?;
        tracing::info!(volume = %self.volume, generation, copy = %r.copy, "kept the generation a sync is about to overwrite");
        Ok(pool_free)
    }

    /// Removes the oldest copies beyond `keep - 1`.
    fn prune(&self, durable: &Durable) -> Result<(), RetainError> {
        let _lock = self.lock()?;
        let (records, lvs) = self.tidy(durable)?;
        let records = self.drop_invalid(records, &lvs, durable)?;
        let want = self.keep.saturating_sub(1) as usize;
        let extra = records.len().saturating_sub(want);
        for r in &records[..extra] {
            self.remove(r.generation, true, durable)?;
        }
        // The alarm about dropped copies stands until the standby holds its K - 1 earlier generations again.
        if let (Some(cfg), true) = (&self.cfg, records.len() >= want) {
            alarms::update(cfg, &[Judgement::clear(AlarmKind::RetainedDropped, Some(&self.volume))]);
        }
        Ok(())
    }

    /// The copies with their state now, oldest first.
    pub fn list(&self) -> Result<Vec<Listed>, RetainError> {
        let _lock = self.lock()?; // a prune in progress finishes first
        let records = self.records();
        let (copies, lvs) = self.copies()?;
        Ok(records
            .into_iter()
            .map(|r| {
                let mut problem = None;
                let (mut size_on_disk, mut fill_percent) = (None, None);
                if !copies.contains(&r.generation) {
                    problem = Some(format!("its copy {} is missing", r.copy));
                } else if !self.manifest_path(r.generation).exists() {
                    problem = Some("its manifest is missing".into());
                }
                match &self.backend {
                    Backend::Thin { lv, .. } | Backend::Classic { lv, .. } => {
                        let name = format!("{lv}_gen{}", r.generation);
                        if let Some(l) = lvs.iter().find(|l| l.name == name) {
                            size_on_disk = l.data_percent.map(|pc| (l.size as f64 * pc / 100.0) as u64);
                            if let Some(s) = l.snapshot_status() {
                                fill_percent = Some(s.fill_percent);
                                if s.invalid {
                                    problem = Some("its copy-on-write store overflowed: the copy is lost".into());
                                }
                            }
                        }
                    }
                    Backend::Reflink => {
                        size_on_disk = std::fs::metadata(self.copy_path(r.generation)).ok().map(|m| m.blocks() * 512);
                    }
                }
                let complete = problem.is_none();
                Listed {
                    promotable: complete && r.untrusted.is_none() && r.id.is_some(),
                    complete,
                    size_on_disk,
                    fill_percent,
                    problem,
                    record: r,
                }
            })
            .collect())
    }
}

fn round_up(v: u64, unit: u64) -> u64 {
    if unit == 0 {
        return v;
    }
    v.div_ceil(unit).saturating_mul(unit)
}

impl Retention for Retainer {
    fn preserve(&self, what: &Preserving) -> Result<(), RetainFailure> {
        self.preserve_impl(what).map(|_| ()).map_err(|e| Box::new(e) as RetainFailure)
    }

    /// Thin snapshots and reflink copies need no size: made while the transfer runs, so that the commit only
    /// checks (a classic snapshot is sized from the transfer and waits for the commit).
    fn prepare(&self, what: Preserving) {
        if matches!(self.backend, Backend::Classic { .. }) {
            return;
        }
        match self.preserve_impl(&what) {
            Ok(free) => *self.prepared.lock().expect("not poisoned") = Some((what.generation, free)),
            Err(e) => {
                tracing::info!(volume = %self.volume, error = %link::error_chain(&e), "could not keep the current generation early; the commit tries again")
            }
        }
    }

    fn committed(&self, volume: &str, generation: u64) {
        let me = self.clone();
        let volume = volume.to_owned();
        let prune = move || {
            if let Err(e) = me.prune(&Durable::new()) {
                tracing::warn!(volume, generation, error = %link::error_chain(&e), "could not remove the oldest retained generation; the next sync tries again");
            }
        };
        if self.background_prune {
            std::thread::spawn(prune);
        } else {
            prune();
        }
    }
}

/// Target options for volume `v`'s shadow with its retention (if `keep_generations` > 1); `background`: prune
/// after a commit on a thread of its own (a long-running `serve`, never a command that exits right after).
pub fn target_options(
    cfg: &Config,
    v: &VolumeCfg,
    io: IoOptions,
    background: bool,
) -> Result<TargetOptions, RetainError> {
    let mut opts = TargetOptions::new(&v.name, io);
    if let Some(mut r) = Retainer::for_volume(cfg, v)? {
        r.background_prune = background;
        opts.retention = Some(Arc::new(r));
    }
    Ok(opts)
}

/// Checks every volume's `keep_generations` against its shadow (serve refuses to start otherwise).
pub fn check_config(cfg: &Config) -> Result<(), RetainError> {
    for v in cfg.volumes.iter().filter(|v| v.keep_generations > 1) {
        if let Some(shadow) = &v.shadow {
            if shadow.exists() {
                backend(&v.name, shadow, v.keep_generations)?;
            }
        }
    }
    Ok(())
}

/// Re-hashes the copy of a retained generation and compares it with the manifest kept with it.
fn check_copy(r: &Retainer, rec: &Retained, io: &IoOptions) -> Result<Manifest, RetainError> {
    let unusable = |why: String| RetainError::Unusable { volume: r.volume.clone(), generation: rec.generation, why };
    let m = Manifest::open(&r.manifest_path(rec.generation))
        .map_err(|e| unusable(format!("its manifest: {}", link::error_chain(&e))))?;
    let path = r.copy_path(rec.generation);
    let vol = Volume::open(&path, Access::Read, io)
        .map_err(|e| unusable(format!("cannot open {}: {}", path.display(), link::error_chain(&e))))?;
    let (size, bs) = (m.volume_size(), m.block_size());
    let per = (1u64 << 20).max(bs as u64) / bs as u64;
    let mut buf = engine::io::AlignedBuf::new((per * bs as u64) as usize);
    let mut b = 0u64;
    while b < m.block_count() {
        let n = per.min(m.block_count() - b);
        let off = b * bs as u64;
        let len = ((off + n * bs as u64).min(size) - off) as usize;
        buf.set_len(len);
        vol.read_at(off, &mut buf)
            .map_err(|e| unusable(format!("cannot read {}: {}", path.display(), link::error_chain(&e))))?;
        for (i, chunk) in buf.chunks(bs as usize).enumerate() {
            if engine::hash::hash_block(chunk) != *m.hash(b + i as u64) {
                return Err(unusable(format!(
                    "the copy {} differs from what was retained at block {} (was it mounted or written?)",
                    rec.copy,
                    b + i as u64
                )));
            }
        }
        b += n;
    }
    Ok(m)
}

/// What [`restore`] did.
#[derive(Debug, Clone, Serialize)]
pub struct Restored {
    /// Volume name.
    pub volume: String,
    /// The generation rolled back to.
    pub generation: u64,
    /// Its identifier (hex).
    pub id: String,
    /// The standby generation number the rollback committed.
    pub committed: u64,
    /// Bytes written to the shadow.
    pub bytes_changed: u64,
}

/// Rolls the shadow of volume `name` back to its retained `generation`: checks the copy still holds what was
/// retained, then a local compare sync from the copy into the shadow (crash-safe; the generation it overwrites is
/// kept), committed under the retained generation's identity and marked rolled back, so the primary's next sync
/// compares. `force` accepts a copy made from an untrusted shadow.
pub fn restore(cfg: &Config, name: &str, generation: u64, force: bool, io: IoOptions) -> Result<Restored, RetainError> {
    let v = cfg
        .volumes
        .iter()
        .find(|v| v.name == name && v.shadow.is_some())
        .ok_or_else(|| RetainError::NoShadow { volume: name.into(), node: cfg.node.clone() })?;
    let r =
        Retainer::for_volume(cfg, v)?.ok_or_else(|| RetainError::NotRetained { volume: name.into(), generation })?;
    let rec = r
        .list()?
        .into_iter()
        .find(|l| l.record.generation == generation)
        .ok_or_else(|| RetainError::NotRetained { volume: name.into(), generation })?;
    let unusable = |why: String| RetainError::Unusable { volume: name.into(), generation, why };
    if let Some(p) = &rec.problem {
        return Err(unusable(p.clone()));
    }
    if let (Some(why), false) = (&rec.record.untrusted, force) {
        return Err(unusable(format!(
            "the shadow was not trusted when it was kept ({why}); use --force to roll back to it anyway"
        )));
    }
    let id_hex = rec.record.id.clone().ok_or_else(|| unusable("its identifier was not recorded".into()))?;
    let id = parse_id(&id_hex).ok_or_else(|| unusable(format!("its identifier {id_hex:?} is malformed")))?;
    let m = check_copy(&r, &rec.record, &io)?;
    let record = link::GenRecord {
        generation,
        id,
        time: rec.record.made_at.unwrap_or(0),
        node: rec.record.source_node.clone().unwrap_or_default(),
    };
    let shadow = v.shadow.as_ref().expect("filtered");
    let dir = cfg.layout().side_dir(Side::Standby, name);
    let mut opts = target_options(cfg, v, io, false)?;
    opts.commit_as = Some((record, Distrust::RolledBack));
    opts.peer = "restore".into();
    let rollback = |source: Box<dyn std::error::Error + Send + Sync>| RetainError::Rollback {
        volume: name.into(),
        generation,
        source,
    };
    let mut tgt = crate::verify::open_target(shadow, &dir, opts).map_err(|e| rollback(Box::new(e)))?;
    let src = Volume::open(&r.copy_path(generation), Access::Read, &io).map_err(|e| rollback(Box::new(e)))?;
    // The copy's side of the local sync keeps no state: a scratch directory, removed afterwards.
    let scratch = r.dir.join("restore");
    let _ = std::fs::remove_dir_all(&scratch);
    std::fs::create_dir_all(&scratch).map_err(|e| r.io_err("create", &scratch, e))?;
    let mut sopts = crate::primary::engine_options(m.block_size(), &io, false);
    sopts.force_compare = true;
    sopts.discard_standby_changes = true;
    let report = engine::source::sync_volume(name, &src, &scratch.join("manifest"), &mut tgt, &sopts, &mut |_, _| {})
        .map_err(|e| rollback(Box::new(e)));
    let _ = std::fs::remove_dir_all(&scratch);
    let report = report?;
    let info = tgt.info();
    if info.root != Some(m.root()) {
        return Err(unusable(format!(
            "after the rollback the shadow's root is {} but generation {generation}'s is {}",
            info.root.map(|r| engine::hash::hex(&r)).unwrap_or_default(),
            engine::hash::hex(&m.root())
        )));
    }
    crate::history::append(
        cfg,
        crate::history::Event::Rollback {
            volume: name.into(),
            generation,
            id: id_hex.clone(),
            committed: report.generation,
        },
    );
    tracing::warn!(
        volume = name,
        generation,
        committed = report.generation,
        "the shadow was rolled back to a retained generation; the primary's next sync compares and overwrites it"
    );
    Ok(Restored {
        volume: name.into(),
        generation,
        id: id_hex,
        committed: report.generation,
        bytes_changed: report.bytes_changed,
    })
}

fn parse_id(hex: &str) -> Option<link::GenId> {
    if hex.len() != 32 {
        return None;
    }
    let mut id = [0u8; 16];
    for (i, b) in id.iter_mut().enumerate() {
        *b = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(id)
}

/// One volume's generations for `blockrep generations`: the shadow's current one and the retained ones.
#[derive(Debug, Clone, Serialize)]
pub struct VolumeGenerations {
    /// Volume name.
    pub volume: String,
    /// `keep_generations`.
    pub keep_generations: u32,
    /// How copies are made (`thin`, `classic`, `reflink`), when K > 1.
    pub backend: Option<String>,
    /// The shadow's committed generation.
    pub current: Option<Current>,
    /// Retained copies, newest first.
    pub retained: Vec<Listed>,
    /// Why the list is incomplete, if it is.
    pub problem: Option<String>,
}

/// The shadow's current generation.
#[derive(Debug, Clone, Serialize)]
pub struct Current {
    /// Generation number.
    pub generation: u64,
    /// Identifier (hex) of its content, when known.
    pub id: Option<String>,
    /// When it was made (unix seconds).
    pub made_at: Option<u64>,
    /// The node that made it.
    pub source_node: Option<String>,
    /// Whether it is complete.
    pub complete: bool,
    /// Whether it is trusted (else why not).
    pub untrusted: Option<String>,
}

/// The generations of the configured shadows (all, or `only`).
pub fn generations(cfg: &Config, only: Option<&str>, io: IoOptions) -> Result<Vec<VolumeGenerations>, RetainError> {
    let mut out = Vec::new();
    let vols: Vec<&VolumeCfg> =
        cfg.volumes.iter().filter(|v| v.shadow.is_some() && only.is_none_or(|o| o == v.name)).collect();
    if let (Some(o), true) = (only, vols.is_empty()) {
        return Err(RetainError::NoShadow { volume: o.into(), node: cfg.node.clone() });
    }
    for v in vols {
        let shadow = v.shadow.as_ref().expect("filtered");
        let dir = cfg.layout().side_dir(Side::Standby, &v.name);
        let current = dir
            .is_dir()
            .then(|| crate::verify::open_target(shadow, &dir, TargetOptions::new(&v.name, io)).ok())
            .flatten()
            .map(|t| {
                let i = t.info();
                let c = i.history.first();
                Current {
                    generation: i.generation,
                    id: c.map(|c| generations::id_hex(&c.id)),
                    made_at: c.map(|c| c.time),
                    source_node: c.map(|c| c.node.clone()),
                    complete: i.complete,
                    untrusted: (!i.trusted).then_some(i.distrust),
                }
            });
        let (backend, retained, problem) = match Retainer::for_volume(cfg, v) {
            Ok(Some(r)) => match r.list() {
                Ok(mut l) => {
                    l.reverse();
                    (Some(r.backend.kind().to_string()), l, None)
                }
                Err(e) => (Some(r.backend.kind().to_string()), Vec::new(), Some(link::error_chain(&e))),
            },
            Ok(None) => (None, Vec::new(), None),
            Err(e) => (None, Vec::new(), Some(link::error_chain(&e))),
        };
        out.push(VolumeGenerations {
            volume: v.name.clone(),
            keep_generations: v.keep_generations,
            backend,
            current,
            retained,
            problem,
        });
    }
    Ok(out)
}
