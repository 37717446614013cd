//! The compare sync's read-ahead hasher: from `begin` on, a thread of its own reads the shadow from start to end
//! and hashes every block, so that the standby hashes its shadow while the source scans (instead of reading and
//! hashing each window only when the source asks for it, on the session thread that also receives extents and
//! answers refinement requests).
//!
//! Buffered regular files are hashed straight from a read-only memory map, one [`CHUNK`] at a time (as the
//! source's scan does with the `auto` engine: no copy out of the page cache); block devices, `O_DIRECT` and an
//! explicit `io_engine` go through the read engine ([`crate::io::read_sequential`], [`DEPTH`] reads in flight,
//! so with io_uring the next reads run while a chunk is hashed).
//!
//! The hashes are of the shadow as it is on disk. The session takes one only for a block no extent of the
//! session has reached (`Session::end`, below which every extent lies: extents come in increasing offset order),
//! and the hasher is started only in a session with nothing spooled before it: for such a block the shadow's
//! content is the effective content, and nothing writes it while the hasher reads. Any other block, or one the
//! hasher has not got (it stopped, or the source asked out of order), is read and hashed by the session itself.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};

use crate::hash::{hash_block_zero_aware, BlockHash, ZeroHashes};
use crate::io::{BufPool, IoError};
use crate::volume::Volume;

/// Bytes read and hashed at a time (a multiple of every block size; page-aligned offsets for the map).
pub(super) const CHUNK: usize = 1 << 20;
/// Reads in flight on the read-engine path.
const DEPTH: usize = 4;
/// Hashed chunks kept ahead of the session (only their hashes: 32 bytes per block).
const AHEAD_CHUNKS: usize = 256;

/// The hashes of the blocks of one chunk.
struct Hashed {
    first: u64,
    hashes: Vec<BlockHash>,
}

/// Time the hasher spent, for the debug log at the end of the session.
#[derive(Debug, Default, Clone, Copy)]
struct Times {
    read: Duration,
    hash: Duration,
}

/// A running read-ahead hasher (see the module docs). Dropping it stops the thread and waits for it.
pub(super) struct AheadHasher {
    rx: Option<Receiver<Hashed>>,
    current: Option<Hashed>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Times>>,
    volume: String,
    started: Instant,
    /// Time the session waited for the hasher.
    waited: Duration,
    taken: u64,
}

impl std::fmt::Debug for AheadHasher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AheadHasher").field("taken", &self.taken).field("waited", &self.waited).finish()
    }
}

/// Why the hasher stopped early.
enum Stop {
    Io(IoError),
    Cancelled,
}

impl From<IoError> for Stop {
    fn from(e: IoError) -> Self {
        Stop::Io(e)
    }
}

impl AheadHasher {
    /// Starts hashing blocks of `block_size` of the first `size` bytes of `shadow`; `mmap`: hash a buffered
    /// regular file from a memory map (the `auto` engine). `volume` names it in the log.
    pub(super) fn start(shadow: Arc<Volume>, size: u64, block_size: u32, mmap: bool, volume: &str) -> AheadHasher {
        let (tx, rx) = crossbeam_channel::bounded(AHEAD_CHUNKS);
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let stop = stop.clone();
            let name = volume.to_owned();
            std::thread::Builder::new()
                .name("shadow-hash".into())
                .spawn(move || run(&shadow, size, block_size, mmap, &tx, &stop, &name))
                .map_err(
                    |e| tracing::warn!(volume, error = %e, "cannot start the read-ahead hasher; hashing on request"),
                )
                .ok()
        };
        AheadHasher {
            rx: thread.as_ref().map(|_| rx),
            current: None,
            stop,
            thread,
            volume: volume.to_owned(),
            started: Instant::now(),
            waited: Duration::ZERO,
            taken: 0,
        }
    }

    /// The hash of block `b` of the shadow as it was read, waiting for the hasher to reach it; `None` when the
    /// hasher is past `b` (asked out of order) or stopped (the caller reads the block itself).
    pub(super) fn take(&mut self, b: u64) -> Option<BlockHash> {
        loop {
            if let Some(c) = &self.current {
                if b < c.first {
                    return None;
                }
                if let Some(h) = c.hashes.get((b - c.first) as usize) {
                    self.taken += 1;
                    return Some(*h);
                }
            }
            let rx = self.rx.as_ref()?;
            let t = Instant::now();
            let next = rx.recv();
            self.waited += t.elapsed();
            match next {
                Ok(c) => self.current = Some(c),
                Err(_) => {
                    self.rx = None;
                    self.current = None;
                    return None;
                }
            }
        }
    }
}

impl Drop for AheadHasher {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Dropping the receiver unblocks a hasher waiting to send.
        self.rx = None;
        if let Some(t) = self.thread.take() {
            match t.join() {
                Ok(times) => tracing::debug!(
                    volume = %self.volume,
                    blocks = self.taken,
                    session_waited_s = self.waited.as_secs_f64(),
                    read_s = times.read.as_secs_f64(),
                    hash_s = times.hash.as_secs_f64(),
                    since_begin_s = self.started.elapsed().as_secs_f64(),
                    "read-ahead hasher done"
                ),
                Err(_) => tracing::warn!(volume = %self.volume, "the read-ahead hasher panicked"),
            }
        }
    }
}

/// The hasher thread: hashes chunk after chunk until the end, `stop`, or the receiver is gone.
fn run(shadow: &Volume, size: u64, bs: u32, mmap: bool, tx: &Sender<Hashed>, stop: &AtomicBool, volume: &str) -> Times {
    let zeros = ZeroHashes::new(bs);
    let mut times = Times::default();
    let hash = |offset: u64, data: &[u8], times: &mut Times| -> Result<(), Stop> {
        let t = Instant::now();
        let hashes = data.chunks(bs as usize).map(|block| hash_block_zero_aware(block, &zeros).0).collect();
        times.hash += t.elapsed();
        if stop.load(Ordering::Relaxed) {
            return Err(Stop::Cancelled);
        }
        tx.send(Hashed { first: offset / bs as u64, hashes }).map_err(|_| Stop::Cancelled)
    };
    let mut from = 0;
    if mmap && !shadow.direct() && !shadow.is_block_device() {
        while from < size {
            let len = (size - from).min(CHUNK as u64) as usize;
            let t = Instant::now();
            // SAFETY: the map is only read. Writes to the mapped range by this process (an in-place session's
            // extents) or by others change at worst the hash of a block, and the session takes no hash of a block
            // it wrote (module docs); an outside write is what a compare sync exists to find, and is found by the
            // source's comparison either way. Truncating the shadow file while it is mapped would raise SIGBUS and
            // end this process: the shadow is the standby's own (`serve` holds it, the state directory is
            // locked), as the source's frozen image is the scan's, which `differ::scan` maps the same way. Block
            // devices, which others can reach more easily, are never mapped.
            let map = unsafe { memmap2::MmapOptions::new().offset(from).len(len).populate().map(shadow.file()) };
            let map = match map {
                Ok(m) => m,
                Err(e) => {
                    tracing::debug!(volume, error = %e, "cannot map the shadow; reading it through the engine");
                    break;
                }
            };
            times.read += t.elapsed();
            if hash(from, &map, &mut times).is_err() {
                return times;
            }
            from += len as u64;
        }
    }
    if from >= size {
        return times;
    }
    let pool = BufPool::new(DEPTH + 2, CHUNK);
    let mut last = Instant::now();
    let r = crate::io::read_sequential(shadow, from, size, CHUNK, DEPTH, &pool, |offset, buf| {
        times.read += last.elapsed();
        let r = hash(offset, &buf, &mut times);
        pool.put(buf);
        last = Instant::now();
        r
    });
    if let Err(Stop::Io(e)) = r {
        // The session reads the blocks itself and reports the error where it belongs.
        tracing::debug!(volume, error = %e, "the read-ahead hasher stopped; hashing on request");
    }
    times
}
