//! Turns changed blocks into coalesced extents, refining them to 4 KiB pieces in batches.

use bytes::Bytes;

use super::{SyncError, SyncReport};
use crate::differ::ScannedChunk;
use crate::hash::{block_len, piece_cv, SUB_BLOCK_SIZE};
use crate::manifest::Manifest;
use link::{BlockHash, Extent, ExtentData, TargetLink, MAX_EXTENT_LEN, MAX_ZERO_EXTENT_LEN};

/// Blocks asked for in one `block_hashes` call.
const HASH_BATCH: u32 = 4096;
/// Changed blocks collected before one `sub_hashes` call.
const REFINE_BATCH: usize = 256;
/// Chunks held back while a refinement batch fills (bounded by the scan's buffer pool).
const MAX_HELD_CHUNKS: usize = 16;

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
pub(super) struct Sender<'a> {
    volume: &'a str,
    pub(super) link: &'a mut dyn TargetLink,
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
    pub(super) report: SyncReport,
}

impl<'a> Sender<'a> {
    /// A sender for a volume of `size` bytes in blocks of `bs`, comparing blocks below `query_end` with the
    /// target's hashes.
    pub(super) fn new(
        volume: &'a str,
        link: &'a mut dyn TargetLink,
        bs: u32,
        size: u64,
        refine: bool,
        query_end: u64,
        report: SyncReport,
    ) -> Self {
        Sender {
            volume,
            link,
            bs,
            size,
            refine,
            held: Vec::new(),
            to_refine: Vec::new(),
            remote: RemoteHashes { first: 0, hashes: Vec::new() },
            query_end,
            cur: None,
            refine_seen: 0,
            refine_changed: 0,
            report,
        }
    }

    /// The reference hashes for a chunk's blocks: target hashes below `query_end`, the manifest above it.
    /// `None` entries mean "no reference" (always changed).
    pub(super) fn reference(
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
    pub(super) fn take(&mut self, chunk: ScannedChunk, reference: Vec<Option<BlockHash>>) -> Result<(), SyncError> {
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
    pub(super) fn flush(&mut self) -> Result<(), SyncError> {
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
                        let at = j as u64 * SUB_BLOCK_SIZE as u64;
                        if piece_cv(piece, at) != *remote {
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
    pub(super) fn emit_pending(&mut self) -> Result<(), SyncError> {
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
