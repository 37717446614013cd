//! The link between a source and a target, and the orchestration of one sync.
//!
//! A sync talks to its target only through [`TargetLink`]. In one process (`blockrep sync --local`, the demo,
//! tests) the link is [`crate::target::Target`] itself; over the network the netproto client implements the
//! same trait and the standby's `serve` loop drives a `Target` with the requests it receives.
//!
//! Order of calls in one session: [`TargetLink::info`], [`TargetLink::begin`], then any mix of
//! [`TargetLink::block_hashes`] / [`TargetLink::sub_hashes`] (for blocks not yet sent in this session) and
//! [`TargetLink::extent`] (in increasing offset order), then [`TargetLink::commit`].

use bytes::Bytes;

pub use link::{
    BeginAck, BeginPlan, BlockHash, CommitAck, Extent, ExtentData, LinkError, PendingInfo, TargetInfo, TargetLink,
    MAX_EXTENT_LEN, MAX_ZERO_EXTENT_LEN,
};

// ---------------------------------------------------------------------------------------------------------------
// Orchestration of one sync (source side).
// ---------------------------------------------------------------------------------------------------------------

use std::path::Path;
use std::time::Instant;

use crate::differ::{scan, DiffError, ScanOptions, ScannedChunk};
use crate::hash::{block_count, block_len, hash_block, hex, RootHasher, SUB_BLOCK_SIZE};
use crate::manifest::{Manifest, ManifestError, ManifestWriter};
use crate::volume::Volume;

/// Blocks asked for in one `block_hashes` call.
const HASH_BATCH: u32 = 4096;
/// Changed blocks collected before one `sub_hashes` call.
const REFINE_BATCH: usize = 256;
/// Chunks held back while a refinement batch fills (bounded by the scan's buffer pool).
const MAX_HELD_CHUNKS: usize = 16;

/// How a sync compares the source with the shadow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SyncMode {
    /// Against the source's manifest of the shadow's committed generation.
    Incremental,
    /// Against block hashes the target computes (the source's manifest is missing or does not match).
    Compare,
    /// Every block is sent (the shadow holds no complete generation).
    Full,
}

/// Options of one sync.
#[derive(Debug, Clone)]
pub struct SyncOptions {
    /// Scan options (block size, reads in flight, threads).
    pub scan: ScanOptions,
    /// Narrow changed blocks down to the 4 KiB pieces that changed (asks the target for sub-block hashes).
    pub refine: bool,
    /// Set (e.g. by a signal handler) to stop the sync between two chunks; it then fails with
    /// [`SyncError::Cancelled`] and the target keeps its last complete generation.
    pub cancel: Option<std::sync::Arc<std::sync::atomic::AtomicBool>>,
}

impl SyncOptions {
    /// Defaults for a block size.
    pub fn new(block_size: u32) -> Self {
        SyncOptions { scan: ScanOptions::new(block_size), refine: true, cancel: None }
    }
}

/// What one sync did; the fields of `blockrep sync --json`.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct SyncReport {
    /// Volume name.
    pub volume: String,
    /// The generation now committed on the target.
    pub generation: u64,
    /// How source and shadow were compared.
    pub mode: SyncMode,
    /// Bytes read and hashed on the source.
    pub bytes_scanned: u64,
    /// Blocks whose hash differed from the reference.
    pub blocks_changed: u64,
    /// Bytes in the extents sent (data and zero), after narrowing to changed 4 KiB pieces.
    pub bytes_changed: u64,
    /// Payload bytes of data extents handed to the link (before compression).
    pub bytes_sent: u64,
    /// Bytes sent as zero extents (no payload).
    pub zero_bytes: u64,
    /// Bytes the target already held from an interrupted attempt and were not sent again.
    pub resumed_bytes: u64,
    /// Root hash of the new generation (hex).
    pub root: String,
    /// Wall time in seconds.
    pub duration_s: f64,
}

/// Errors of a sync.
#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    /// The link (local target or network) failed.
    #[error(transparent)]
    Link(#[from] LinkError),
    /// Reading the source failed.
    #[error(transparent)]
    Diff(#[from] DiffError),
    /// The source's manifest could not be written.
    #[error("cannot record the new manifest at {path}")]
    Manifest {
        /// Manifest path.
        path: std::path::PathBuf,
        /// Cause.
        #[source]
        source: ManifestError,
    },
    /// The shadow is smaller than the source.
    #[error(
        "volume {volume}: the source is {source_size} bytes but the shadow is only {shadow_size} bytes; \
         grow the shadow to at least the source's size"
    )]
    ShadowTooSmall {
        /// Volume name.
        volume: String,
        /// Source size.
        source_size: u64,
        /// Shadow size.
        shadow_size: u64,
    },
    /// The target committed a different root hash than the source computed.
    #[error("volume {volume}: the target committed root {theirs}, the source computed {ours}; run `blockrep verify`")]
    RootMismatch {
        /// Volume name.
        volume: String,
        /// Source root (hex).
        ours: String,
        /// Target root (hex).
        theirs: String,
    },
    /// The sync was cancelled (signal).
    #[error("volume {volume}: the sync was interrupted; the shadow keeps its last complete generation")]
    Cancelled {
        /// Volume name.
        volume: String,
    },
    /// The target returned an answer of the wrong shape.
    #[error("volume {volume}: the target answered {what} with {got} entries, expected {expected}")]
    BadAnswer {
        /// Volume name.
        volume: String,
        /// Which call.
        what: &'static str,
        /// Entries received.
        got: usize,
        /// Entries expected.
        expected: usize,
    },
}

/// Syncs `source` to the target behind `link`. The source's manifest lives at `manifest_path`; it is replaced
/// only after the target acknowledged the commit. `progress` is called with (bytes scanned, total).
pub fn sync_volume(
    volume: &str,
    source: &Volume,
    manifest_path: &Path,
    link: &mut dyn TargetLink,
    opts: &SyncOptions,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<SyncReport, SyncError> {
    let started = Instant::now();
    let bs = opts.scan.block_size;
    let size = source.size();
    let nblocks = block_count(size, bs);
    let info = link.info()?;
    if info.volume_size < size {
        return Err(SyncError::ShadowTooSmall {
            volume: volume.into(),
            source_size: size,
            shadow_size: info.volume_size,
        });
    }
    let manifest = match Manifest::open(manifest_path) {
        Ok(m) => Some(m),
        Err(ManifestError::Missing { .. }) => None,
        Err(e) => {
            tracing::warn!(volume, error = %e, "ignoring the source manifest; comparing with the target instead");
            None
        }
    };
    let manifest = manifest.filter(|m| {
        info.complete
            && m.generation() == info.generation
            && Some(m.root()) == info.root
            && m.block_size() == bs
            && m.volume_size() == size
    });
    let mode = match (&manifest, info.complete) {
        (Some(_), _) => SyncMode::Incremental,
        (None, true) => SyncMode::Compare,
        (None, false) => SyncMode::Full,
    };
    let base_generation = if info.complete { info.generation } else { 0 };
    let plan = BeginPlan {
        generation: info.generation + 1,
        base_generation,
        volume_size: size,
        block_size: bs,
        resume: info
            .pending
            .as_ref()
            .is_some_and(|p| p.generation == info.generation + 1 && p.base_generation == base_generation),
    };
    let ack = link.begin(&plan)?;
    let resumed_end = match (&info.pending, ack.resumed) {
        (Some(p), true) => p.end_offset,
        _ => 0,
    };
    tracing::info!(volume, ?mode, generation = plan.generation, resumed = ack.resumed, "sync started");

    // Blocks below `query_end` are compared with hashes the target computes; the rest with the manifest (or
    // treated as changed in a full sync).
    let query_end = if mode == SyncMode::Compare { nblocks } else { resumed_end.div_ceil(bs as u64).min(nblocks) };
    let mut st = Sender {
        volume,
        link,
        bs,
        size,
        refine: opts.refine,
        held: Vec::new(),
        to_refine: Vec::new(),
        remote: RemoteHashes { first: 0, hashes: Vec::new() },
        query_end,
        cur: None,
        refine_seen: 0,
        refine_changed: 0,
        report: SyncReport {
            volume: volume.into(),
            generation: plan.generation,
            mode,
            bytes_scanned: 0,
            blocks_changed: 0,
            bytes_changed: 0,
            bytes_sent: 0,
            zero_bytes: 0,
            resumed_bytes: info.pending.as_ref().filter(|_| ack.resumed).map_or(0, |p| p.bytes),
            root: String::new(),
            duration_s: 0.0,
        },
    };
    let mut writer = ManifestWriter::create(manifest_path, plan.generation, size, bs)
        .map_err(|source| SyncError::Manifest { path: manifest_path.into(), source })?;
    let mut root = RootHasher::new(size, bs);
    scan(source, &opts.scan, |chunk: ScannedChunk| -> Result<(), SyncError> {
        if opts.cancel.as_ref().is_some_and(|c| c.load(std::sync::atomic::Ordering::Relaxed)) {
            return Err(SyncError::Cancelled { volume: volume.into() });
        }
        for (i, h) in chunk.hashes.iter().enumerate() {
            writer.set(chunk.first_block + i as u64, h);
            root.push(h);
        }
        st.report.bytes_scanned += chunk.data.len() as u64;
        let reference = st.reference(&chunk, manifest.as_ref())?;
        st.take(chunk, reference)?;
        progress(st.report.bytes_scanned, size);
        Ok(())
    })?;
    st.flush()?;
    st.emit_pending()?;
    if opts.cancel.as_ref().is_some_and(|c| c.load(std::sync::atomic::Ordering::Relaxed)) {
        return Err(SyncError::Cancelled { volume: volume.into() });
    }
    let root = root.finish();
    let commit = st.link.commit(root)?;
    if commit.root != root {
        return Err(SyncError::RootMismatch { volume: volume.into(), ours: hex(&root), theirs: hex(&commit.root) });
    }
    writer.set_generation(commit.generation);
    writer.finish().map_err(|source| SyncError::Manifest { path: manifest_path.into(), source })?;
    let mut report = st.report;
    report.generation = commit.generation;
    report.root = hex(&root);
    report.duration_s = started.elapsed().as_secs_f64();
    tracing::info!(volume, generation = report.generation, bytes_sent = report.bytes_sent, "sync committed");
    Ok(report)
}

/// A window of block hashes fetched from the target.
struct RemoteHashes {
    first: u64,
    hashes: Vec<BlockHash>,
}

/// A changed block waiting to be turned into extents.
struct Changed {
    /// Index within its held chunk.
    index: usize,
    /// Whether a reference existed (so the target has earlier content to refine against).
    refinable: bool,
}

/// The extent being built (coalescing adjacent pieces).
struct Current {
    offset: u64,
    len: u64,
    /// Data: the chunk bytes and the start of this extent within them. None: zero extent.
    data: Option<(Bytes, usize)>,
}

/// Turns changed blocks into coalesced extents, refining them to 4 KiB pieces in batches.
struct Sender<'a> {
    volume: &'a str,
    link: &'a mut dyn TargetLink,
    bs: u32,
    size: u64,
    refine: bool,
    held: Vec<(ScannedChunk, Vec<Changed>)>,
    to_refine: Vec<u64>,
    remote: RemoteHashes,
    query_end: u64,
    cur: Option<Current>,
    refine_seen: u64,
    refine_changed: u64,
    report: SyncReport,
}

impl Sender<'_> {
    /// The reference hashes for a chunk's blocks: target hashes below `query_end`, the manifest above it.
    /// `None` entries mean "no reference" (always changed).
    fn reference(
        &mut self,
        chunk: &ScannedChunk,
        manifest: Option<&Manifest>,
    ) -> Result<Vec<Option<BlockHash>>, SyncError> {
        let n = chunk.hashes.len() as u64;
        let mut out = Vec::with_capacity(n as usize);
        for b in chunk.first_block..chunk.first_block + n {
            if b < self.query_end {
                let end = self.remote.first + self.remote.hashes.len() as u64;
                if b < self.remote.first || b >= end {
                    let count = (self.query_end - b).min(HASH_BATCH as u64) as u32;
                    let hashes = self.link.block_hashes(b, count)?;
                    if hashes.len() != count as usize {
                        return Err(SyncError::BadAnswer {
                            volume: self.volume.into(),
                            what: "block_hashes",
                            got: hashes.len(),
                            expected: count as usize,
                        });
                    }
                    self.remote = RemoteHashes { first: b, hashes };
                }
                out.push(Some(self.remote.hashes[(b - self.remote.first) as usize]));
            } else {
                out.push(manifest.map(|m| *m.hash(b)));
            }
        }
        Ok(out)
    }

    /// Takes a scanned chunk: records its changed blocks, holding the chunk until its refinement batch is sent.
    fn take(&mut self, chunk: ScannedChunk, reference: Vec<Option<BlockHash>>) -> Result<(), SyncError> {
        let mut changed = Vec::new();
        for (i, (h, r)) in chunk.hashes.iter().zip(&reference).enumerate() {
            if Some(h) == r.as_ref() {
                continue;
            }
            self.report.blocks_changed += 1;
            let refinable = self.refine && r.is_some() && !chunk.zero[i] && self.bs > SUB_BLOCK_SIZE;
            if refinable {
                self.to_refine.push(chunk.first_block + i as u64);
            }
            changed.push(Changed { index: i, refinable });
        }
        if changed.is_empty() && self.held.is_empty() {
            return self.end_chunk();
        }
        self.held.push((chunk, changed));
        if self.to_refine.len() >= REFINE_BATCH || self.held.len() >= MAX_HELD_CHUNKS {
            self.flush()?;
        }
        Ok(())
    }

    /// Sends every held chunk's changed blocks, after one `sub_hashes` call for the refinable ones.
    fn flush(&mut self) -> Result<(), SyncError> {
        let mut theirs: Vec<BlockHash> = Vec::new();
        if !self.to_refine.is_empty() {
            theirs = self.link.sub_hashes(&self.to_refine)?;
            let expected: usize = self
                .to_refine
                .iter()
                .map(|&b| block_len(self.size, self.bs, b).div_ceil(SUB_BLOCK_SIZE as usize))
                .sum();
            if theirs.len() != expected {
                return Err(SyncError::BadAnswer {
                    volume: self.volume.into(),
                    what: "sub_hashes",
                    got: theirs.len(),
                    expected,
                });
            }
        }
        let mut sub = theirs.iter();
        for (chunk, changed) in std::mem::take(&mut self.held) {
            for c in changed {
                let offset = chunk.offset + c.index as u64 * self.bs as u64;
                let block = chunk.block(c.index, self.bs);
                let base = c.index * self.bs as usize;
                if chunk.zero[c.index] {
                    self.push(offset, block.len() as u64, None)?;
                } else if c.refinable {
                    for (j, piece) in block.chunks(SUB_BLOCK_SIZE as usize).enumerate() {
                        let remote = sub.next().expect("length checked above");
                        self.refine_seen += 1;
                        if hash_block(piece) != *remote {
                            self.refine_changed += 1;
                            let start = j * SUB_BLOCK_SIZE as usize;
                            self.push(offset + start as u64, piece.len() as u64, Some((&chunk.data, base + start)))?;
                        }
                    }
                } else {
                    self.push(offset, block.len() as u64, Some((&chunk.data, base)))?;
                }
            }
            self.end_chunk()?;
        }
        self.to_refine.clear();
        // Refining pays only when few pieces of a changed block changed; stop asking when most do.
        if self.refine_seen >= 1024 && self.refine_changed * 4 > self.refine_seen * 3 {
            tracing::debug!(volume = self.volume, "most 4 KiB pieces of changed blocks differ: no longer refining");
            self.refine = false;
        }
        Ok(())
    }

    /// A data extent cannot continue into the next chunk (another buffer).
    fn end_chunk(&mut self) -> Result<(), SyncError> {
        if self.cur.as_ref().is_some_and(|c| c.data.is_some()) {
            self.emit_pending()?;
        }
        Ok(())
    }

    /// Adds a piece to the current extent, or starts a new one.
    fn push(&mut self, offset: u64, len: u64, data: Option<(&Bytes, usize)>) -> Result<(), SyncError> {
        if let Some(cur) = &mut self.cur {
            let contiguous = cur.offset + cur.len == offset;
            let mergeable = match (&cur.data, data) {
                (None, None) => cur.len + len <= MAX_ZERO_EXTENT_LEN,
                (Some((b, start)), Some((nb, nstart))) => {
                    b.as_ptr() == nb.as_ptr() && start + cur.len as usize == nstart && cur.len + len <= MAX_EXTENT_LEN
                }
                _ => false,
            };
            if contiguous && mergeable {
                cur.len += len;
                return Ok(());
            }
        }
        self.emit_pending()?;
        self.cur = Some(Current { offset, len, data: data.map(|(b, s)| (b.clone(), s)) });
        Ok(())
    }

    /// Hands the current extent to the link.
    fn emit_pending(&mut self) -> Result<(), SyncError> {
        let Some(cur) = self.cur.take() else { return Ok(()) };
        self.report.bytes_changed += cur.len;
        let data = match cur.data {
            None => {
                self.report.zero_bytes += cur.len;
                ExtentData::Zero
            }
            Some((bytes, start)) => {
                self.report.bytes_sent += cur.len;
                ExtentData::Data(bytes.slice(start..start + cur.len as usize))
            }
        };
        self.link.extent(Extent { offset: cur.offset, len: cur.len, data })?;
        Ok(())
    }
}
