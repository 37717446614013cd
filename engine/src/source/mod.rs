//! The source side of one sync: what a sync asks of the source, and how it turns the answers into extents.
//!
//! [`sync_volume`] syncs a frozen source image to a target behind a [`TargetLink`]; a private sender refines
//! changed blocks to 4 KiB pieces and coalesces them into extents.

use std::path::Path;
use std::time::Instant;

use crate::differ::{DiffError, ScanOptions, ScannedChunk};
use crate::generations::{self, SourceGenerations};
use crate::hash::{block_count, hex, RootHasher};
use crate::manifest::{Manifest, ManifestError, ManifestWriter};
use crate::volume::Volume;
use link::{BeginPlan, GenRecord, LinkError, PlanMode, TargetInfo, TargetLink};

mod change;
mod sender;
#[cfg(test)]
mod tests;
mod tracked;

pub use change::{ChangeSource, Coverage, FullScan};
use sender::Sender;
pub use tracked::Tracked;

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
    /// This node's name, recorded with the generations it makes (empty: `local`).
    pub node: String,
    /// Compare with the shadow's actual content even when an incremental sync would be allowed (`sync --verify`).
    pub force_compare: bool,
    /// Sync even when the standby holds changes this side does not know (split brain), discarding them: a compare
    /// sync that overwrites whatever differs on the standby.
    pub discard_standby_changes: bool,
    /// Handle the writes of this side's generation records go through (unarmed in production; tests crash them).
    pub durable: crate::durable::Durable,
    /// The identifier of the generation this sync proposes, chosen by the caller beforehand (who names something
    /// after it, e.g. the snapshot the sync reads); `None`: a random one, or the one an interrupted sync of the
    /// same generation proposed. The generations file beside the manifest records the one committed.
    pub generation_id: Option<link::GenId>,
}

impl SyncOptions {
    /// Defaults for a block size.
    pub fn new(block_size: u32) -> Self {
        SyncOptions {
            scan: ScanOptions::new(block_size),
            refine: true,
            cancel: None,
            node: String::new(),
            force_compare: false,
            discard_standby_changes: false,
            durable: crate::durable::Durable::new(),
            generation_id: None,
        }
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
    /// Why this mode.
    pub reason: String,
    /// With `discard_standby_changes`: bytes of the standby's own changes that this sync overwrote.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub standby_bytes_overwritten: Option<u64>,
    /// The change source that found the changes: "full scan", or a tracker ("thin_delta", "exception store").
    pub tracker: String,
    /// Why a tracked volume was synced with a full scan (set by the caller that chose the source), or null.
    pub fallback_reason: Option<String>,
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

/// Both sides' generation records in a split brain, for the message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SplitBrainHistories {
    /// The standby's current identifier (hex).
    pub standby_id: String,
    /// This node's records, one per line, newest first.
    pub primary: String,
    /// The standby's records, one per line, newest first.
    pub standby: String,
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
    /// The change source claims blocks are unchanged since a generation whose manifest the source does not hold.
    #[error(
        "volume {volume}: the change source ({change_source}) reports only blocks changed since generation \
         {since}, but {why}; the hashes of the other blocks are unknown, so sync with a full scan"
    )]
    NoBaseForChanges {
        /// Volume name.
        volume: String,
        /// Name of the change source.
        change_source: String,
        /// The generation it claims unreported blocks are unchanged from.
        since: u64,
        /// Why that generation's hashes are not available.
        why: String,
    },
    /// The change source reported a chunk of the wrong shape (out of order, misaligned, outside the volume).
    #[error("volume {volume}: the change source ({change_source}) reported {what}")]
    BadChange {
        /// Volume name.
        volume: String,
        /// Name of the change source.
        change_source: String,
        /// What is wrong.
        what: String,
    },
    /// Both sides wrote since their last common generation: syncing would discard the standby's changes.
    #[error(
        "volume {volume}: split brain: the standby holds {} that this node never made, so both sides were written \
         since their last common generation; nothing was synced. This node's history:\n{}\nThe standby's \
         history:\n{}\nTo keep this node's data and discard the standby's changes, run `blockrep sync \
         --discard-standby-changes {volume}` (it reports how many bytes on the standby it overwrote); to keep the \
         standby's, make it the primary instead (docs/role.md)",
        .histories.standby_id, .histories.primary, .histories.standby
    )]
    SplitBrain {
        /// Volume name.
        volume: String,
        /// Both sides' records.
        histories: Box<SplitBrainHistories>,
    },
    /// The source's generation records could not be written.
    #[error("cannot record generation identifiers in {path}")]
    Generations {
        /// The file.
        path: std::path::PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The target's committed generation is the last number there is.
    #[error("volume {volume}: the target's committed generation is {generation}, there is no next generation")]
    GenerationExhausted {
        /// Volume name.
        volume: String,
        /// The committed generation.
        generation: u64,
    },
}

/// Syncs `source` to the target behind `link` with a full scan ([`FullScan`]). The source's manifest lives at
/// `manifest_path`; it is replaced only after the target acknowledged the commit. `progress` is called with
/// (bytes of the source covered so far, total).
pub fn sync_volume(
    volume: &str,
    source: &Volume,
    manifest_path: &Path,
    link: &mut dyn TargetLink,
    opts: &SyncOptions,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<SyncReport, SyncError> {
    sync_changes(volume, &mut FullScan::new(source, &opts.scan), manifest_path, link, opts, progress)
}

/// Syncs the source behind `changes` to the target behind `link`: asks the change source which blocks may have
/// changed (with their hashes and data), takes every other block's hash from the source's manifest of the
/// generation the change source names, builds the new manifest and root hash, and sends the blocks that differ
/// from the target. The block size is the change source's (`opts.scan` is not used).
///
/// A change source with [`Coverage::ChangedSince`] is refused ([`SyncError::NoBaseForChanges`], before anything is
/// sent) unless the manifest at `manifest_path` is valid, of that generation, and matches the target's committed
/// generation. Such a sync never resumes an interrupted transfer (the target starts a new spool): the blocks an
/// earlier attempt spooled may hold content the change source does not report.
pub fn sync_changes(
    volume: &str,
    changes: &mut dyn ChangeSource,
    manifest_path: &Path,
    link: &mut dyn TargetLink,
    opts: &SyncOptions,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<SyncReport, SyncError> {
    let started = Instant::now();
    let bs = changes.block_size();
    let size = changes.volume_size();
    let nblocks = block_count(size, bs);
    let coverage = changes.coverage();
    let info = link.info()?;
    if info.volume_size < size {
        return Err(SyncError::ShadowTooSmall {
            volume: volume.into(),
            source_size: size,
            shadow_size: info.volume_size,
        });
    }
    let manifest = match Manifest::open(manifest_path) {
        Ok(m) => Ok(m),
        Err(e @ ManifestError::Missing { .. }) => Err(e),
        Err(e) => {
            tracing::warn!(volume, error = %e, "ignoring the source manifest; comparing with the target instead");
            Err(e)
        }
    };
    let usable = |m: &Manifest| -> Result<(), String> {
        if !info.complete {
            Err("the target holds no complete generation".into())
        } else if m.generation() != info.generation || Some(m.root()) != info.root {
            Err(format!(
                "the source's manifest is of generation {}, the target's committed generation is {}{}",
                m.generation(),
                info.generation,
                if m.generation() == info.generation { " with another root" } else { "" }
            ))
        } else if m.block_size() != bs || m.volume_size() != size {
            Err(format!(
                "the source's manifest is for {} bytes in blocks of {}, the source is {size} bytes in blocks of {bs}",
                m.volume_size(),
                m.block_size()
            ))
        } else {
            Ok(())
        }
    };
    let manifest = match manifest {
        Ok(m) => usable(&m).map(|()| m),
        Err(e) => Err(format!("the source has no valid manifest ({e})")),
    };
    if let Coverage::ChangedSince { generation } = coverage {
        let why = match &manifest {
            Ok(m) if m.generation() == generation => None,
            Ok(m) => Some(format!("the source's manifest is of generation {}", m.generation())),
            Err(why) => Some(why.clone()),
        };
        if let Some(why) = why {
            return Err(SyncError::NoBaseForChanges {
                volume: volume.into(),
                change_source: changes.name().into(),
                since: generation,
                why,
            });
        }
    }
    let gens_path = generations::source_path(manifest_path);
    let mut gens = generations::read_source(&gens_path);
    let split = split_brain(&info, &gens);
    if let Some(standby_id) = &split {
        if !opts.discard_standby_changes {
            return Err(SyncError::SplitBrain {
                volume: volume.into(),
                histories: Box::new(SplitBrainHistories {
                    standby_id: standby_id.clone(),
                    primary: lines(&gens.history.all()),
                    standby: lines(&info.history),
                }),
            });
        }
        tracing::warn!(volume, standby = %standby_id, "split brain: discarding the standby's changes as asked");
    }
    let (mode, reason) = choose_mode(&info, manifest.as_ref(), &gens, opts, split.is_some());
    if let Coverage::ChangedSince { generation } = coverage {
        if mode != SyncMode::Incremental {
            return Err(SyncError::NoBaseForChanges {
                volume: volume.into(),
                change_source: changes.name().into(),
                since: generation,
                why: reason,
            });
        }
    }
    let manifest = manifest.ok().filter(|_| mode == SyncMode::Incremental);
    let generation = info
        .generation
        .checked_add(1)
        .ok_or(SyncError::GenerationExhausted { volume: volume.into(), generation: info.generation })?;
    let base_generation = if info.complete { info.generation } else { 0 };
    // Propose the new generation's identifier durably before the target can commit it, so that a commit this
    // side fails to record is still known here (never mistaken for the standby's own changes).
    let node = if opts.node.is_empty() { "local" } else { opts.node.as_str() };
    // An earlier proposal the standby never committed means nothing there: a caller's identifier replaces it.
    let proposed = match (&gens.proposed, opts.generation_id) {
        (_, Some(id)) => generations::record(generation, id, node),
        (Some(p), None) if p.generation == generation && !info.history.iter().any(|r| r.id == p.id) => p.clone(),
        _ => generations::record(generation, generations::new_id(), node),
    };
    gens.proposed = Some(proposed.clone());
    let durable = &opts.durable;
    generations::write_source(durable, &gens_path, &gens)
        .map_err(|source| SyncError::Generations { path: gens_path.clone(), source })?;
    let plan = BeginPlan {
        generation,
        base_generation,
        volume_size: size,
        block_size: bs,
        resume: coverage == Coverage::Every
            && info
                .pending
                .as_ref()
                .is_some_and(|p| p.generation == generation && p.base_generation == base_generation),
        mode: match mode {
            SyncMode::Incremental => PlanMode::Incremental,
            SyncMode::Compare => PlanMode::Compare,
            SyncMode::Full => PlanMode::Full,
        },
        id: proposed.id,
    };
    // Without a resume there is nothing to learn from the answer: a network link does not wait for it.
    let resumed = match link.begin_request(&plan)? {
        Some(ack) => ack.resumed,
        None => false,
    };
    let resumed_end = match (&info.pending, resumed) {
        (Some(p), true) => p.end_offset,
        _ => 0,
    };
    tracing::info!(
        volume,
        ?mode,
        %reason,
        generation = plan.generation,
        resumed,
        source = changes.name(),
        "sync started"
    );

    // Blocks below `query_end` are compared with hashes the target computes; the rest with the manifest (or
    // treated as changed in a full sync).
    let query_end = if mode == SyncMode::Compare { nblocks } else { resumed_end.div_ceil(bs as u64).min(nblocks) };
    let report = SyncReport {
        volume: volume.into(),
        generation: plan.generation,
        mode,
        reason,
        standby_bytes_overwritten: None,
        tracker: changes.name().into(),
        fallback_reason: None,
        bytes_scanned: 0,
        blocks_changed: 0,
        bytes_changed: 0,
        bytes_sent: 0,
        zero_bytes: 0,
        resumed_bytes: info.pending.as_ref().filter(|_| resumed).map_or(0, |p| p.bytes),
        root: String::new(),
        duration_s: 0.0,
    };
    let mut st = Sender::new(volume, link, bs, size, opts.refine, query_end, report);
    let mut writer = ManifestWriter::create(manifest_path, plan.generation, size, bs)
        .map_err(|source| SyncError::Manifest { path: manifest_path.into(), source })?;
    let mut root = RootHasher::new(size, bs);
    // Blocks below `next` have their hash in `writer` and `root`.
    let mut next = 0u64;
    // Takes the hashes of blocks `from..to`, which the change source did not report, from the manifest.
    let unchanged = |writer: &mut ManifestWriter, root: &mut RootHasher, from: u64, to: u64| {
        let m = manifest.as_ref().expect("a partial change source is refused without a manifest");
        writer.copy_from(m, from, to);
        root.push_raw(m.hashes_raw_range(from, to));
    };
    let name = changes.name().to_owned();
    changes.report(&mut |chunk: ScannedChunk| -> Result<(), SyncError> {
        if opts.cancel.as_ref().is_some_and(|c| c.load(std::sync::atomic::Ordering::Relaxed)) {
            return Err(SyncError::Cancelled { volume: volume.into() });
        }
        check_chunk(&chunk, next, coverage, size, bs).map_err(|what| SyncError::BadChange {
            volume: volume.into(),
            change_source: name.clone(),
            what,
        })?;
        if chunk.first_block > next {
            unchanged(&mut writer, &mut root, next, chunk.first_block);
        }
        for (i, h) in chunk.hashes.iter().enumerate() {
            writer.set(chunk.first_block + i as u64, h);
            root.push(h);
        }
        next = chunk.first_block + chunk.hashes.len() as u64;
        st.report.bytes_scanned += chunk.data.len() as u64;
        let covered = chunk.offset + chunk.data.len() as u64;
        let reference = st.reference(&chunk, manifest.as_ref())?;
        st.take(chunk, reference)?;
        // Between chunks, also when nothing was sent: tells a link with an idle timeout that the source is there.
        st.link.keepalive()?;
        progress(covered, size);
        Ok(())
    })?;
    if next < nblocks {
        if coverage == Coverage::Every {
            return Err(SyncError::BadChange {
                volume: volume.into(),
                change_source: name,
                what: format!("blocks up to {next} of {nblocks} and then stopped"),
            });
        }
        unchanged(&mut writer, &mut root, next, nblocks);
        progress(size, size);
    }
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
    // The manifest describes the new generation: record its identifier (a crash before this leaves the proposed
    // record, and the next sync compares).
    gens.history.push(GenRecord { generation: commit.generation, ..proposed });
    gens.proposed = None;
    generations::write_source(durable, &gens_path, &gens)
        .map_err(|source| SyncError::Generations { path: gens_path.clone(), source })?;
    let mut report = st.report;
    if split.is_some() {
        report.standby_bytes_overwritten = Some(report.bytes_changed);
    }
    report.generation = commit.generation;
    report.root = hex(&root);
    report.duration_s = started.elapsed().as_secs_f64();
    tracing::info!(volume, generation = report.generation, bytes_sent = report.bytes_sent, "sync committed");
    Ok(report)
}

/// The standby's current identifier (hex) when it holds content this side never made: its identifier is none of
/// this side's records, and this side has records (or the standby says it was promoted). `None`: no split brain.
fn split_brain(info: &TargetInfo, gens: &SourceGenerations) -> Option<String> {
    let current = info.history.first()?;
    if !info.complete || gens.knows(&current.id) {
        return None;
    }
    let promoted = info.distrust.contains("promoted");
    let ours = gens.history.current.is_some() || !gens.history.earlier.is_empty();
    (ours || promoted).then(|| generations::id_hex(&current.id))
}

/// Which mode, and why: incremental only when the target's identifier is the one the manifest describes and the
/// target trusts its shadow.
fn choose_mode(
    info: &TargetInfo,
    manifest: Result<&Manifest, &String>,
    gens: &SourceGenerations,
    opts: &SyncOptions,
    split: bool,
) -> (SyncMode, String) {
    if !info.complete {
        return (SyncMode::Full, "the standby holds no complete generation".into());
    }
    let compare = |why: String| (SyncMode::Compare, why);
    if split {
        return compare("discarding the standby's changes (split brain, --discard-standby-changes)".into());
    }
    if opts.force_compare {
        return compare("asked to verify the standby's content (sync --verify)".into());
    }
    // The standby's own reason first: it says what happened to the shadow (written, promoted, rolled back).
    if !info.trusted {
        return compare(format!("the standby's shadow is not trusted: {}", info.distrust));
    }
    let m = match manifest {
        Ok(m) => m,
        Err(why) => return compare(why.clone()),
    };
    let Some(theirs) = info.generation_id else {
        return compare("the standby does not know the identifier of its generation".into());
    };
    match gens.history.current.as_ref().filter(|c| c.generation == m.generation()) {
        None => compare(format!("this node has no identifier for its manifest's generation {}", m.generation())),
        Some(c) if c.id != theirs => compare(format!(
            "the standby's generation {} is {}, this node's manifest describes {}",
            info.generation,
            generations::id_hex(&theirs),
            generations::id_hex(&c.id)
        )),
        Some(c) => (
            SyncMode::Incremental,
            format!(
                "the standby holds generation {} ({}) as recorded here, and its shadow is untouched",
                c.generation,
                generations::id_hex(&c.id)
            ),
        ),
    }
}

/// Records one per line, indented.
fn lines(records: &[GenRecord]) -> String {
    if records.is_empty() {
        return "  (none)".into();
    }
    records.iter().map(|r| format!("  {}", generations::describe(r))).collect::<Vec<_>>().join("\n")
}

/// Checks the shape of a reported chunk: whole blocks from a block boundary at or after block `next` (exactly
/// `next` for [`Coverage::Every`]), inside a volume of `size` bytes, one hash and zero flag per block. O(1).
fn check_chunk(chunk: &ScannedChunk, next: u64, coverage: Coverage, size: u64, bs: u32) -> Result<(), String> {
    let n = chunk.hashes.len() as u64;
    let start = chunk.first_block.checked_mul(bs as u64);
    let end_block = chunk.first_block.checked_add(n).filter(|&e| e <= block_count(size, bs));
    let expected_len = end_block.map(|e| e.saturating_mul(bs as u64).min(size)).zip(start).map(|(e, s)| e - s);
    if n == 0 || chunk.zero.len() as u64 != n {
        Err(format!("a chunk at offset {} with {n} hashes and {} zero flags", chunk.offset, chunk.zero.len()))
    } else if start != Some(chunk.offset) {
        Err(format!("a chunk at offset {} as block {}", chunk.offset, chunk.first_block))
    } else if chunk.first_block < next || (coverage == Coverage::Every && chunk.first_block != next) {
        Err(format!("block {} when block {next} was next", chunk.first_block))
    } else if expected_len != Some(chunk.data.len() as u64) {
        Err(format!(
            "a chunk of {n} blocks in {} bytes at offset {} (the volume is {size} bytes in blocks of {bs})",
            chunk.data.len(),
            chunk.offset
        ))
    } else {
        Ok(())
    }
}
