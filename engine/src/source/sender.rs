//! Turns changed blocks into coalesced extents, refining them to 4 KiB pieces in pipelined batches.
//!
//! The target's answers (block hashes in a compare sync, piece fingerprints for refinement) are asked for ahead
//! and collected later ([`TargetLink::block_hashes_request`], [`TargetLink::sub_hashes_request`]), so the scan does
//! not wait a round trip per batch: a changed block waiting for its fingerprints is copied out of its chunk (so
//! the scan's buffer goes back at once), and the blocks in flight are bounded by [`MAX_HELD_BYTES`]. Once more
//! than [`EARLY_SEND_HELD`] are held, batches whose answers have already arrived are sent between chunks, so the
//! hold grows to its bound only while the answers are late (a long round trip, a busy standby).

use std::collections::VecDeque;

use bytes::Bytes;

use super::{SyncError, SyncReport};
use crate::differ::ScannedChunk;
use crate::hash::{block_len, piece_cv, SUB_BLOCK_SIZE};
use crate::manifest::Manifest;
use link::{BlockHash, Extent, ExtentData, TargetLink, MAX_EXTENT_LEN, MAX_ZERO_EXTENT_LEN};

/// Blocks asked for in one `block_hashes` request (16 MiB of 64 KiB blocks: the scan's first comparison waits
/// for the target to hash this much).
const HASH_BATCH: u32 = 256;
/// `block_hashes` requests kept ahead of the scan: 128 MiB of 64 KiB blocks, about 40 ms of scan, to cover a
/// round trip (the target hashes its shadow from `begin` on, whether asked or not). Not more: the target answers
/// in order, so a `sub_hashes` request waits behind the `block_hashes` requests sent before it, and with them
/// for the target's hashing to get that far ahead of the scan.
pub(super) const HASH_AHEAD: usize = 8;
/// Refinable blocks in one `sub_hashes` request.
const REFINE_BATCH: usize = 128;
/// Bytes of changed blocks in one batch (a batch is closed, and its request sent, at this size).
pub(super) const BATCH_BYTES: usize = 2 << 20;
/// Bytes of changed blocks held while their batches wait for the target's answers: the pipeline's depth, and
/// most of the primary's memory (issue 15: at most 64 MiB per side). At 1 % scattered 4 KiB changes 15 % of the
/// 64 KiB blocks are refined, so 32 MiB covers about 200 MiB of scan, 50 ms at 4 GB/s: a 20 ms round trip plus
/// the standby's time to read and hash the blocks asked for. 16 MiB (25 ms of scan) left no margin for the
/// latter: the 20 ms round trip cost 1.20x instead of 1.05x (2 GiB, 1 %, one interleaved run:
/// docs/performance.md, "Round trips per sync"); the primary's anonymous peak is 34 MiB instead of 18 MiB.
pub(super) const MAX_HELD_BYTES: usize = 32 << 20;
/// Bytes held above which batches whose answers have arrived ([`TargetLink::sub_hashes_ready`]) are sent before
/// the pipeline is full. Below it the batches wait, so the standby gets its extents in runs rather than one batch
/// at a time: sending every answered batch at once cost 8 % more time on the 2 GiB, 1 % scattered case (0.90 s
/// against 0.83 s, two runs of 7 and 11 repetitions, both sides sharing two cores), while with 8 MiB the time is
/// the same as without early sending and the primary's allocated peak is 9.5 MiB instead of 33.8 MiB.
pub(super) const EARLY_SEND_HELD: usize = 8 << 20;
/// Batches waiting for their answers (fewer than a network link's `MAX_OUTSTANDING` requests).
pub(super) const MAX_QUEUED: usize = 16;

/// A window of block hashes asked from the target.
struct HashWindow {
    first: u64,
    count: u32,
    /// `None` until collected.
    hashes: Option<Vec<BlockHash>>,
}

/// A changed block waiting for its batch's answer.
struct Held {
    /// Offset of the block in the volume.
    offset: u64,
    /// Its bytes (a copy, or a slice of a chunk; `len` zero bytes for a zero block).
    data: Option<Bytes>,
    len: u64,
    /// Whether its pieces are compared with the target's fingerprints.
    refinable: bool,
}

/// Changed blocks in scan order and, once answered, the fingerprints of the refinable ones.
#[derive(Default)]
struct Batch {
    blocks: Vec<Held>,
    refine: Vec<u64>,
    bytes: usize,
    /// Requested and waiting for `sub_hashes_wait`.
    waiting: bool,
    answer: Vec<BlockHash>,
}

/// The extent being built (coalescing adjacent pieces).
struct Current {
    offset: u64,
    len: u64,
    /// Data: the buffer and the start of this extent within it. None: zero extent.
    data: Option<(Bytes, usize)>,
}

/// Turns changed blocks into coalesced extents, refining them to 4 KiB pieces in pipelined batches.
pub(super) struct Sender<'a> {
    volume: &'a str,
    pub(super) link: &'a mut dyn TargetLink,
    bs: u32,
    size: u64,
    refine: bool,
    /// The batch being filled (not yet requested).
    open: Batch,
    /// Closed batches, oldest first, waiting for their answers.
    queue: VecDeque<Batch>,
    held_bytes: usize,
    windows: VecDeque<HashWindow>,
    /// First block not yet asked for with `block_hashes`.
    asked_end: u64,
    query_end: u64,
    cur: Option<Current>,
    refine_seen: u64,
    refine_changed: u64,
    pub(super) report: SyncReport,
    /// Time spent waiting for the target's block hashes and piece fingerprints (debug log at the end).
    waited: (std::time::Duration, std::time::Duration),
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
            open: Batch::default(),
            queue: VecDeque::new(),
            held_bytes: 0,
            windows: VecDeque::new(),
            asked_end: 0,
            query_end,
            cur: None,
            refine_seen: 0,
            refine_changed: 0,
            report,
            waited: Default::default(),
        }
    }

    fn bad_answer(&self, what: &'static str, got: usize, expected: usize) -> SyncError {
        SyncError::BadAnswer { volume: self.volume.into(), what, got, expected }
    }

    /// Asks for block-hash windows ahead, up to [`HASH_AHEAD`] outstanding, from block `from` on.
    fn ask_ahead(&mut self, from: u64) -> Result<(), SyncError> {
        self.asked_end = self.asked_end.max(from);
        while self.windows.len() < HASH_AHEAD && self.asked_end < self.query_end {
            let first = self.asked_end;
            let count = (self.query_end - first).min(HASH_BATCH as u64) as u32;
            let hashes = self.link.block_hashes_request(first, count)?;
            self.windows.push_back(HashWindow { first, count, hashes });
            self.asked_end += count as u64;
        }
        Ok(())
    }

    /// Drops the oldest window, collecting its answer first if it is still outstanding (answers come in order).
    fn drop_window(&mut self) -> Result<(), SyncError> {
        if let Some(w) = self.windows.pop_front() {
            if w.hashes.is_none() {
                let t = std::time::Instant::now();
                self.link.block_hashes_wait()?;
                self.waited.0 += t.elapsed();
            }
        }
        Ok(())
    }

    /// The target's hash of block `b` (below `query_end`), from the windows asked ahead.
    fn target_hash(&mut self, b: u64) -> Result<BlockHash, SyncError> {
        while self.windows.front().is_some_and(|w| b >= w.first + w.count as u64) {
            self.drop_window()?;
        }
        if self.windows.front().is_some_and(|w| b < w.first) {
            // Before the windows asked (a change source that went back: never with the full scan): start over.
            while !self.windows.is_empty() {
                self.drop_window()?;
            }
        }
        if self.windows.is_empty() {
            self.asked_end = b;
        }
        self.ask_ahead(b)?;
        let w = self.windows.front().expect("asked above");
        debug_assert!(b >= w.first && b < w.first + w.count as u64);
        if w.hashes.is_none() {
            let count = w.count as usize;
            let t = std::time::Instant::now();
            let got = self.link.block_hashes_wait()?;
            self.waited.0 += t.elapsed();
            if got.len() != count {
                return Err(self.bad_answer("block_hashes", got.len(), count));
            }
            self.windows.front_mut().expect("present").hashes = Some(got);
        }
        let w = self.windows.front().expect("present");
        Ok(w.hashes.as_ref().expect("collected")[(b - w.first) as usize])
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
                out.push(Some(self.target_hash(b)?));
            } else {
                out.push(manifest.map(|m| *m.hash(b)));
            }
        }
        // Keep the target hashing ahead while this chunk is handled.
        let next = chunk.first_block + n;
        if next < self.query_end {
            self.ask_ahead(next)?;
        }
        Ok(out)
    }

    /// Takes a scanned chunk: sends its changed blocks at once when nothing waits before them and none needs
    /// refining, else adds them to the open batch (copied, so the chunk's buffer is released now).
    pub(super) fn take(&mut self, chunk: ScannedChunk, reference: Vec<Option<BlockHash>>) -> Result<(), SyncError> {
        let bs = self.bs as usize;
        for (i, (h, r)) in chunk.hashes.iter().zip(&reference).enumerate() {
            if Some(h) == r.as_ref() {
                continue;
            }
            self.report.blocks_changed += 1;
            let zero = chunk.zero[i];
            let refinable = self.refine && r.is_some() && !zero && self.bs > SUB_BLOCK_SIZE;
            let offset = chunk.offset + (i * bs) as u64;
            let len = (chunk.data.len() - i * bs).min(bs);
            if !refinable && self.queue.is_empty() && self.open.blocks.is_empty() {
                let data = (!zero).then_some((&chunk.data, i * bs));
                self.push(offset, len as u64, data)?;
                continue;
            }
            let data = (!zero).then(|| Bytes::copy_from_slice(&chunk.data[i * bs..i * bs + len]));
            let held = if zero { 0 } else { len };
            self.open.bytes += held;
            self.held_bytes += held;
            if refinable {
                self.open.refine.push(offset / self.bs as u64);
            }
            self.open.blocks.push(Held { offset, data, len: len as u64, refinable });
            if self.open.refine.len() >= REFINE_BATCH || self.open.bytes >= BATCH_BYTES {
                self.close_batch()?;
            }
        }
        // A data extent cannot continue into the next chunk (another buffer).
        self.end_chunk()?;
        self.drain(false)
    }

    /// Sends the open batch's request (if it has refinable blocks) and queues it.
    fn close_batch(&mut self) -> Result<(), SyncError> {
        let mut batch = std::mem::take(&mut self.open);
        if batch.blocks.is_empty() {
            return Ok(());
        }
        if !batch.refine.is_empty() {
            match self.link.sub_hashes_request(&batch.refine)? {
                Some(answer) => batch.answer = answer,
                None => batch.waiting = true,
            }
            if !batch.waiting {
                self.check_answer(&batch)?;
            }
        }
        self.queue.push_back(batch);
        Ok(())
    }

    fn check_answer(&self, batch: &Batch) -> Result<(), SyncError> {
        let expected: usize =
            batch.refine.iter().map(|&b| block_len(self.size, self.bs, b).div_ceil(SUB_BLOCK_SIZE as usize)).sum();
        if batch.answer.len() != expected {
            return Err(self.bad_answer("sub_hashes", batch.answer.len(), expected));
        }
        Ok(())
    }

    /// Sends the queued batches whose answers are here; with `all`, or while more than [`MAX_HELD_BYTES`] are
    /// held, waits for the oldest answers.
    fn drain(&mut self, all: bool) -> Result<(), SyncError> {
        if all {
            self.close_batch()?;
        }
        let queued = self.queue.len();
        while let Some(front) = self.queue.front_mut() {
            if front.waiting {
                let room = !all && self.held_bytes <= MAX_HELD_BYTES && queued <= MAX_QUEUED;
                if room && (self.held_bytes <= EARLY_SEND_HELD || !self.link.sub_hashes_ready()?) {
                    // Still room in the pipeline: let the answer come while the scan goes on.
                    return Ok(());
                }
                let t = std::time::Instant::now();
                front.answer = self.link.sub_hashes_wait()?;
                self.waited.1 += t.elapsed();
                front.waiting = false;
                let front = self.queue.front().expect("present");
                self.check_answer(front)?;
            }
            let batch = self.queue.pop_front().expect("present");
            self.send_batch(batch)?;
        }
        if !all && self.held_bytes > MAX_HELD_BYTES {
            // Everything queued is sent and the open batch alone is too large: close it and wait for it.
            self.close_batch()?;
            return self.drain(false);
        }
        Ok(())
    }

    /// Turns one answered batch into extents.
    fn send_batch(&mut self, batch: Batch) -> Result<(), SyncError> {
        let mut theirs = batch.answer.iter();
        for h in batch.blocks {
            self.held_bytes -= h.data.as_ref().map_or(0, |d| d.len());
            match &h.data {
                None => self.push(h.offset, h.len, None)?,
                Some(data) if h.refinable => {
                    for (j, piece) in data.chunks(SUB_BLOCK_SIZE as usize).enumerate() {
                        let remote = theirs.next().expect("length checked");
                        let at = j * SUB_BLOCK_SIZE as usize;
                        self.refine_seen += 1;
                        if piece_cv(piece, at as u64) != *remote {
                            self.refine_changed += 1;
                            self.push(h.offset + at as u64, piece.len() as u64, Some((data, at)))?;
                        }
                    }
                }
                Some(data) => self.push(h.offset, h.len, Some((data, 0)))?,
            }
            self.end_chunk()?;
        }
        // Refining pays only when few pieces of a changed block changed; stop asking when most do.
        if self.refine && self.refine_seen >= 1024 && self.refine_changed * 4 > self.refine_seen * 3 {
            tracing::debug!(volume = self.volume, "most 4 KiB pieces of changed blocks differ: no longer refining");
            self.refine = false;
        }
        Ok(())
    }

    /// Sends everything still held (waiting for every outstanding answer).
    pub(super) fn flush(&mut self) -> Result<(), SyncError> {
        self.drain(true)?;
        tracing::debug!(
            volume = self.volume,
            block_hashes_s = self.waited.0.as_secs_f64(),
            sub_hashes_s = self.waited.1.as_secs_f64(),
            "waited for the target's answers"
        );
        Ok(())
    }

    /// A data extent cannot continue into the next buffer.
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
