//! The differ's scan: one sequential pass over a frozen source image, hashing as it reads.
//!
//! ```text
//!  reader thread ──(offset, chunk buffer)──► hasher threads (one per core) ──► caller: reorder, compare, emit
//!   ReadEngine, `depth` reads in flight        BLAKE3 per block, zero check       in offset order
//! ```
//!
//! Buffers come from a bounded [`BufPool`], so memory stays at `pool_buffers × chunk` bytes whatever the volume
//! size, and a slow consumer (a network link) throttles the reader. Each chunk is handed to the caller as one
//! [`bytes::Bytes`] whose owner returns the buffer to the pool when the last slice of it is dropped, so extents
//! cut from a chunk are zero-copy.
//!
//! A sync reaches this scan through [`crate::source::FullScan`], its change source; the comparison with a reference
//! (the manifest of the last generation, or the target's own hashes) and the extents are in [`crate::source`].
//! [`changed_blocks`] is a stand-alone comparison for tools (the benchmark harness).

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Condvar, Mutex};
use std::thread;

use bytes::Bytes;

use crate::hash::{block_count, hash_block_zero_aware, BlockHash, ZeroHashes};
use crate::io::{AlignedBuf, BufPool, IoError};
use crate::volume::{Volume, VolumeError};

/// How a scan reads and hashes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScanOptions {
    /// Block size (validated power of two, 4 KiB..1 MiB).
    pub block_size: u32,
    /// Bytes per read request; a multiple of the block size.
    pub chunk_size: usize,
    /// Reads in flight.
    pub depth: usize,
    /// Hashing threads (0: one per available core).
    pub threads: usize,
    /// Buffers in the pool, and chunks mapped at once in a mapped scan (bounds memory; must exceed `depth` plus
    /// the chunks a consumer holds; raised to what the threads need to keep busy).
    pub pool_buffers: usize,
    /// For a regular file read through the page cache (not `O_DIRECT`), hash straight from a read-only memory
    /// map instead of copying through the read engine: on a page-cached image the copy costs a third of the
    /// scan's CPU (see docs/ARCHITECTURE.md). Block devices and `O_DIRECT` always use the read engine.
    pub mmap: bool,
}

impl ScanOptions {
    /// Defaults for `block_size`: 1 MiB reads (or one block if larger), 8 in flight, a thread per core.
    pub fn new(block_size: u32) -> Self {
        ScanOptions {
            block_size,
            chunk_size: (1usize << 20).max(block_size as usize),
            depth: 8,
            threads: 0,
            pool_buffers: 16,
            mmap: true,
        }
    }
}

/// Errors of a scan.
#[derive(Debug, thiserror::Error)]
pub enum DiffError {
    /// Reading the source failed.
    #[error("cannot read the source volume {path}")]
    Read {
        /// The source path.
        path: std::path::PathBuf,
        /// The I/O error.
        #[source]
        source: IoError,
    },
    /// Opening a read engine failed.
    #[error(transparent)]
    Volume(#[from] VolumeError),
    /// A worker thread panicked (a bug).
    #[error("a scan thread panicked")]
    ThreadPanicked,
}

impl ScanOptions {
    /// Number of hashing threads: `threads`, or one per available core.
    fn hashers(&self) -> usize {
        if self.threads == 0 {
            thread::available_parallelism().map(|n| n.get()).unwrap_or(2)
        } else {
            self.threads
        }
    }
}

/// BLAKE3 and the all-zero flag of each `bs`-sized block of `data` (the last may be shorter).
fn hash_blocks(data: &[u8], bs: usize, zeros: &ZeroHashes) -> (Vec<BlockHash>, Vec<bool>) {
    data.chunks(bs).map(|block| hash_block_zero_aware(block, zeros)).unzip()
}

/// Hands the chunks arriving on `rx` (in any order) to `consume` in offset order, counting them in `stats`, until
/// the senders are gone or `consume` fails. Takes `rx` by value: returning drops it, which unblocks senders.
fn consume_in_order<E>(
    rx: crossbeam_channel::Receiver<ScannedChunk>,
    stats: &mut ScanStats,
    consume: &mut impl FnMut(ScannedChunk) -> Result<(), E>,
) -> Result<(), E> {
    let mut next = 0u64;
    let mut early: BTreeMap<u64, ScannedChunk> = BTreeMap::new();
    for chunk in rx.iter() {
        early.insert(chunk.offset, chunk);
        while let Some(chunk) = early.remove(&next) {
            next += chunk.data.len() as u64;
            stats.bytes_scanned += chunk.data.len() as u64;
            stats.blocks += chunk.hashes.len() as u64;
            stats.zero_blocks += chunk.zero.iter().filter(|&&z| z).count() as u64;
            consume(chunk)?;
        }
    }
    Ok(())
}

/// One chunk of the source, hashed.
#[derive(Debug)]
pub struct ScannedChunk {
    /// Byte offset of the chunk in the volume.
    pub offset: u64,
    /// Index of the first block of the chunk.
    pub first_block: u64,
    /// The chunk's bytes (the last chunk may be short); slices of it are zero-copy.
    pub data: Bytes,
    /// Hash of each block of the chunk.
    pub hashes: Vec<BlockHash>,
    /// Whether each block is all zero.
    pub zero: Vec<bool>,
}

impl ScannedChunk {
    /// The bytes of the chunk's `i`-th block.
    pub fn block(&self, i: usize, block_size: u32) -> Bytes {
        let start = i * block_size as usize;
        let end = (start + block_size as usize).min(self.data.len());
        self.data.slice(start..end)
    }
}

/// Owner of a pooled buffer inside a [`Bytes`]: gives the buffer back to the pool when the last slice drops.
struct Pooled {
    buf: Option<AlignedBuf>,
    pool: BufPool,
}

impl AsRef<[u8]> for Pooled {
    fn as_ref(&self) -> &[u8] {
        self.buf.as_deref().unwrap_or(&[])
    }
}

impl Drop for Pooled {
    fn drop(&mut self) {
        if let Some(b) = self.buf.take() {
            self.pool.put(b);
        }
    }
}

/// Why the reader stopped early.
enum ReadStop {
    Io(IoError),
    Cancelled,
}

impl From<IoError> for ReadStop {
    fn from(e: IoError) -> Self {
        ReadStop::Io(e)
    }
}

/// Summary of a finished scan.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ScanStats {
    /// Bytes read and hashed.
    pub bytes_scanned: u64,
    /// Blocks hashed.
    pub blocks: u64,
    /// Blocks found all zero.
    pub zero_blocks: u64,
}

/// Scans `volume` from start to end, calling `consume` with every chunk in offset order.
///
/// Reading, hashing and consuming overlap: one reader thread keeps `depth` reads in flight, `threads` hashers
/// hash whole chunks, and the calling thread consumes. An error from `consume` stops the scan and is returned.
pub fn scan<E>(
    volume: &Volume,
    opts: &ScanOptions,
    mut consume: impl FnMut(ScannedChunk) -> Result<(), E>,
) -> Result<ScanStats, E>
where
    E: From<DiffError> + Send,
{
    let bs = opts.block_size as usize;
    assert!(opts.chunk_size % bs == 0, "chunk size must be a multiple of the block size");
    if opts.mmap && !volume.direct() && !volume.is_block_device() && volume.size() > 0 {
        // SAFETY: see `map_chunk`: the source is frozen for the sync (snapshot, or quiescent by contract).
        match unsafe { map_chunk(volume, 0, volume.size().min(opts.chunk_size as u64) as usize) } {
            Ok(_) => return scan_mapped(volume, opts, consume),
            Err(e) => tracing::debug!(error = %e, "cannot map the source; reading it through the engine"),
        }
    }
    let size = volume.size();
    let threads = opts.hashers();
    let pool = BufPool::new(opts.pool_buffers.max(opts.depth + 2 * threads + 2), opts.chunk_size);
    let zeros = ZeroHashes::new(opts.block_size);
    let (raw_tx, raw_rx) = crossbeam_channel::bounded::<(u64, AlignedBuf)>(threads * 2);
    let (done_tx, done_rx) = crossbeam_channel::bounded::<ScannedChunk>(threads * 2 + 2);
    let mut stats = ScanStats::default();

    let result: Result<(), E> = thread::scope(|s| {
        let reader = {
            let pool = pool.clone();
            s.spawn(move || -> Result<(), DiffError> {
                let r = crate::io::read_sequential(volume, 0, size, opts.chunk_size, opts.depth, &pool, |off, buf| {
                    // A closed channel means the consumer stopped (error or done): stop reading quietly.
                    raw_tx.send((off, buf)).map_err(|_| ReadStop::Cancelled)
                });
                match r {
                    Ok(()) | Err(ReadStop::Cancelled) => Ok(()),
                    Err(ReadStop::Io(e)) => Err(DiffError::Read { path: volume.path().to_owned(), source: e }),
                }
            })
        };
        for _ in 0..threads {
            let (raw_rx, done_tx, pool, zeros) = (raw_rx.clone(), done_tx.clone(), pool.clone(), zeros.clone());
            s.spawn(move || {
                for (offset, buf) in raw_rx.iter() {
                    let (hashes, zero) = hash_blocks(&buf, bs, &zeros);
                    let data = Bytes::from_owner(Pooled { buf: Some(buf), pool: pool.clone() });
                    let chunk = ScannedChunk { offset, first_block: offset / bs as u64, data, hashes, zero };
                    if done_tx.send(chunk).is_err() {
                        return;
                    }
                }
            });
        }
        drop((raw_rx, done_tx));

        // Consume in offset order; dropping the receiver on return unblocks hashers and, through them, the reader.
        let outcome = consume_in_order(done_rx, &mut stats, &mut consume);
        let read_result = reader.join().map_err(|_| E::from(DiffError::ThreadPanicked))?;
        outcome?;
        read_result.map_err(E::from)?;
        debug_assert_eq!(stats.blocks, block_count(size, opts.block_size));
        Ok(())
    });
    result.map(|()| stats)
}

/// Maps `len` bytes of the source at `offset` (a multiple of the page size) read-only. Each chunk has its own
/// small mapping, so the scan's resident memory stays bounded by the chunks in flight, as with the read engine.
///
/// # Safety
///
/// The file must not be truncated or modified while the map lives: a sync reads a frozen image (an LVM snapshot,
/// or a file the caller guarantees quiescent, `snapshot = "none"`). Truncation would raise SIGBUS; modification
/// would only make the scan read a mix, exactly as reads through the engine would.
unsafe fn map_chunk(volume: &Volume, offset: u64, len: usize) -> std::io::Result<memmap2::Mmap> {
    // SAFETY: forwarded to the caller (see above).
    unsafe { memmap2::MmapOptions::new().offset(offset).len(len).map(volume.file()) }
}

/// Bounds the chunks of a mapped scan that are alive at once (being hashed, queued, waiting for their turn, held
/// by the consumer), as the buffer pool bounds the read engine's: a hasher takes a slot before it takes the next
/// offset, and the chunk gives the slot back when its last slice is dropped. Without it, while the consumer waits
/// for a chunk whose hasher the scheduler left behind, the other hashers map chunk after chunk, each a MiB of
/// resident pages (measured: 40-60 MiB of mapped source in a 2 GiB sync on a loaded 2-core host).
struct Slots {
    /// Free slots, and whether the scan stopped (a waiting hasher then gives up).
    state: Mutex<(usize, bool)>,
    freed: Condvar,
}

impl Slots {
    fn new(n: usize) -> Arc<Slots> {
        Arc::new(Slots { state: Mutex::new((n, false)), freed: Condvar::new() })
    }

    /// Waits for a free slot and takes it; `false` once the scan stopped.
    fn take(&self) -> bool {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            match *st {
                (_, true) => return false,
                (0, false) => st = self.freed.wait(st).unwrap_or_else(|p| p.into_inner()),
                (ref mut free, false) => {
                    *free -= 1;
                    return true;
                }
            }
        }
    }

    fn give(&self) {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).0 += 1;
        self.freed.notify_one();
    }

    /// Stops the scan: every waiting and later `take` returns `false`.
    fn close(&self) {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).1 = true;
        self.freed.notify_all();
    }
}

/// A mapped chunk of the source, owned by the `Bytes` handed to the consumer; gives its slot back when dropped.
struct MapChunk(memmap2::Mmap, Arc<Slots>);

impl AsRef<[u8]> for MapChunk {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

impl Drop for MapChunk {
    fn drop(&mut self) {
        self.1.give();
    }
}

/// [`scan`] over a memory map: hasher threads take chunk offsets in turn and hash straight from the map.
fn scan_mapped<E>(
    volume: &Volume,
    opts: &ScanOptions,
    mut consume: impl FnMut(ScannedChunk) -> Result<(), E>,
) -> Result<ScanStats, E>
where
    E: From<DiffError> + Send,
{
    let bs = opts.block_size as usize;
    let size = volume.size();
    let threads = opts.hashers();
    let zeros = ZeroHashes::new(opts.block_size);
    let next_offset = std::sync::atomic::AtomicU64::new(0);
    let stop = std::sync::atomic::AtomicBool::new(false);
    let (done_tx, done_rx) = crossbeam_channel::bounded::<ScannedChunk>(threads * 2 + 2);
    // Mapped chunks alive at once (each holds its resident pages): enough for every hasher, the channel and one
    // held by the consumer.
    let slots = Slots::new(opts.pool_buffers.max(threads * 3 + 3));
    let mut stats = ScanStats::default();
    let hash_chunk = |offset: u64| -> Result<ScannedChunk, DiffError> {
        let len = ((offset + opts.chunk_size as u64).min(size) - offset) as usize;
        // SAFETY: see `map_chunk`; chunk offsets are multiples of the chunk size, so page-aligned.
        let map = unsafe { map_chunk(volume, offset, len) }.map_err(|e| DiffError::Read {
            path: volume.path().to_owned(),
            source: IoError::Read { offset, len, source: e },
        })?;
        #[cfg(test)]
        mmap_tests::stall_if_asked(volume.path(), offset);
        let (hashes, zero) = hash_blocks(&map, bs, &zeros);
        let data = Bytes::from_owner(MapChunk(map, slots.clone()));
        Ok(ScannedChunk { offset, first_block: offset / bs as u64, data, hashes, zero })
    };
    let result: Result<(), E> = thread::scope(|s| {
        let mut hashers = Vec::new();
        for _ in 0..threads {
            let (done_tx, next_offset, stop, hash_chunk, slots) =
                (done_tx.clone(), &next_offset, &stop, &hash_chunk, &slots);
            hashers.push(s.spawn(move || -> Result<(), DiffError> {
                // The slot before the offset: offsets go out in order, each to a hasher holding a slot, so the
                // chunk the consumer waits for always has one.
                while slots.take() {
                    let offset = next_offset.fetch_add(opts.chunk_size as u64, std::sync::atomic::Ordering::Relaxed);
                    if offset >= size || stop.load(std::sync::atomic::Ordering::Relaxed) {
                        slots.give();
                        return Ok(());
                    }
                    let chunk = hash_chunk(offset).inspect_err(|_| {
                        // The consumer will never get this chunk: stop every hasher, so the channel closes.
                        stop.store(true, Ordering::Relaxed);
                        slots.close();
                    })?;
                    if done_tx.send(chunk).is_err() {
                        return Ok(());
                    }
                }
                Ok(())
            }));
        }
        drop(done_tx);
        // Returning drops the receiver, which unblocks hashers waiting to send before the join; closing the slots
        // unblocks those waiting for a slot (the consumer may keep chunks it was handed, or stopped early).
        let consumed = consume_in_order(done_rx, &mut stats, &mut consume);
        slots.close();
        consumed.inspect_err(|_| stop.store(true, Ordering::Relaxed))?;
        for h in hashers {
            h.join().map_err(|_| E::from(DiffError::ThreadPanicked))?.map_err(E::from)?;
        }
        Ok(())
    });
    result.map(|()| stats)
}

/// Indices (within the chunk) of the blocks whose hash differs from `reference` (`None`: no reference, every
/// block changed).
pub fn changed_blocks(chunk: &ScannedChunk, reference: Option<&[BlockHash]>) -> Vec<usize> {
    match reference {
        None => (0..chunk.hashes.len()).collect(),
        Some(r) => chunk.hashes.iter().zip(r).enumerate().filter(|(_, (a, b))| a != b).map(|(i, _)| i).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hash::hash_block;
    use crate::io::EngineKind;
    use crate::volume::{Access, IoOptions};

    fn scan_file(data: &[u8], block_size: u32, engine: EngineKind) -> (Vec<BlockHash>, Vec<bool>, ScanStats) {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("v");
        std::fs::write(&p, data).unwrap();
        let vol = Volume::open(&p, Access::Read, &IoOptions { engine, direct: None }).unwrap();
        let mut opts = ScanOptions::new(block_size);
        opts.chunk_size = block_size as usize * 4;
        let (mut hashes, mut zeros, mut next) = (Vec::new(), Vec::new(), 0u64);
        let stats = scan(&vol, &opts, |c: ScannedChunk| -> Result<(), DiffError> {
            assert_eq!(c.offset, next, "chunks arrive in order");
            assert_eq!(&c.data[..], &data[c.offset as usize..c.offset as usize + c.data.len()]);
            next += c.data.len() as u64;
            hashes.extend(c.hashes);
            zeros.extend(c.zero);
            Ok(())
        })
        .unwrap();
        (hashes, zeros, stats)
    }

    #[test]
    fn scan_hashes_every_block_in_order_on_both_engines() {
        let mut data: Vec<u8> = (0..(3 << 20) + 5000).map(|i: u32| (i.wrapping_mul(2654435761) >> 7) as u8).collect();
        data[8192..16384].fill(0);
        for engine in [EngineKind::Sync, EngineKind::Auto] {
            let (hashes, zeros, stats) = scan_file(&data, 4096, engine);
            let expected: Vec<BlockHash> = data.chunks(4096).map(hash_block).collect();
            assert_eq!(hashes, expected);
            assert_eq!(zeros.iter().filter(|&&z| z).count(), 2);
            assert!(zeros[2] && zeros[3]);
            assert_eq!(stats.bytes_scanned, data.len() as u64);
            assert_eq!(stats.blocks, expected.len() as u64);
        }
    }

    #[test]
    fn consumer_error_stops_the_scan() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("v");
        std::fs::write(&p, vec![1u8; 8 << 20]).unwrap();
        let vol = Volume::open(&p, Access::Read, &IoOptions::default()).unwrap();
        let mut seen = 0;
        let r = scan(&vol, &ScanOptions::new(65536), |_c| -> Result<(), DiffError> {
            seen += 1;
            if seen == 2 {
                Err(DiffError::ThreadPanicked)
            } else {
                Ok(())
            }
        });
        assert!(r.is_err());
        assert_eq!(seen, 2);
    }

    #[test]
    fn changed_blocks_compares_with_reference() {
        let data = Bytes::from(vec![0u8; 8192]);
        let chunk =
            ScannedChunk { offset: 0, first_block: 0, data, hashes: vec![[1; 32], [2; 32]], zero: vec![false, false] };
        assert_eq!(changed_blocks(&chunk, None), vec![0, 1]);
        assert_eq!(changed_blocks(&chunk, Some(&[[1; 32], [3; 32]])), vec![1]);
    }
}

#[cfg(test)]
mod mmap_tests {
    use super::*;
    use crate::hash::hash_block;
    use crate::volume::{Access, IoOptions};
    use std::path::{Path, PathBuf};
    use std::time::Duration;

    /// A file whose mapped scan stalls on its first chunk (as a hasher the scheduler leaves behind), and for how
    /// long. Keyed by path: other tests scan in parallel.
    static STALL: Mutex<Option<(PathBuf, Duration)>> = Mutex::new(None);

    pub(super) fn stall_if_asked(path: &Path, offset: u64) {
        let stall = STALL.lock().unwrap().clone();
        if let Some((p, d)) = stall {
            if offset == 0 && p == path {
                std::thread::sleep(d);
            }
        }
    }

    /// Resident KiB of this process's mappings of `path` (from /proc/self/smaps).
    fn resident_kib_of(path: &Path) -> u64 {
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let name = path.to_str().unwrap();
        let mut ours = false;
        let mut kib = 0;
        for line in smaps.lines() {
            if let Some(rss) = line.strip_prefix("Rss:") {
                if ours {
                    kib += rss.trim().trim_end_matches("kB").trim().parse::<u64>().unwrap();
                }
            } else if line.split_whitespace().next().is_some_and(|a| a.contains('-') && !a.ends_with(':')) {
                ours = line.ends_with(name);
            }
        }
        kib
    }

    /// The memory target of issue 15 (at most 64 MiB per side): the mapped scan keeps at most `pool_buffers` chunks
    /// mapped, also while the consumer waits for a chunk whose hasher is late and the other hashers go on (before,
    /// they mapped and hashed chunk after chunk, each a MiB of resident pages, until the late one came).
    #[test]
    fn a_late_hasher_does_not_let_the_others_map_the_whole_source() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("v").canonicalize().unwrap_or_else(|_| d.path().canonicalize().unwrap().join("v"));
        let data: Vec<u8> = (0..64u32 << 20).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect();
        std::fs::write(&p, &data).unwrap();
        let vol = Volume::open(&p, Access::Read, &IoOptions::default()).unwrap();
        let mut opts = ScanOptions::new(65536);
        (opts.threads, opts.pool_buffers) = (2, 4);
        let window = opts.pool_buffers.max(opts.threads * 3 + 3) as u64;
        *STALL.lock().unwrap() = Some((p.clone(), Duration::from_millis(400)));
        let (mut most, mut next, mut hashes) = (0, 0u64, Vec::new());
        let stats = scan(&vol, &opts, |c: ScannedChunk| -> Result<(), DiffError> {
            assert_eq!(c.offset, next);
            next += c.data.len() as u64;
            most = most.max(resident_kib_of(&p));
            hashes.extend(c.hashes);
            Ok(())
        })
        .unwrap();
        *STALL.lock().unwrap() = None;
        assert_eq!(stats.bytes_scanned, data.len() as u64);
        assert_eq!(hashes, data.chunks(65536).map(hash_block).collect::<Vec<_>>());
        assert!(most > 0, "the scan maps the file (else this test measures nothing)");
        assert!(most <= window * 1024, "{most} KiB of the source mapped at once, the window is {window} MiB");
    }

    #[test]
    fn mapped_and_engine_scans_agree_and_stop_on_consumer_error() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("v");
        let data: Vec<u8> = (0..(5 << 20) + 777).map(|i: u32| (i.wrapping_mul(2246822519) >> 11) as u8).collect();
        std::fs::write(&p, &data).unwrap();
        let vol = Volume::open(&p, Access::Read, &IoOptions::default()).unwrap();
        let expected: Vec<BlockHash> = data.chunks(65536).map(hash_block).collect();
        for mmap in [true, false] {
            let mut opts = ScanOptions::new(65536);
            opts.mmap = mmap;
            let mut got = Vec::new();
            let mut bytes = Vec::new();
            scan(&vol, &opts, |c: ScannedChunk| -> Result<(), DiffError> {
                got.extend(c.hashes);
                bytes.extend_from_slice(&c.data);
                Ok(())
            })
            .unwrap();
            assert_eq!(got, expected, "mmap = {mmap}");
            assert_eq!(bytes, data, "mmap = {mmap}");
            let mut seen = 0;
            let r = scan(&vol, &opts, |_c| -> Result<(), DiffError> {
                seen += 1;
                if seen == 2 {
                    Err(DiffError::ThreadPanicked)
                } else {
                    Ok(())
                }
            });
            assert!(r.is_err() && seen == 2, "mmap = {mmap}");
        }
    }
}
