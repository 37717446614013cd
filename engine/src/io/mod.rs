//! Read and write engines: io_uring and a plain synchronous twin behind the same traits.
//!
//! Both engines work on owned, aligned buffers ([`AlignedBuf`]) so that the same buffers serve buffered and
//! `O_DIRECT` I/O, and so that an io_uring request owns its buffer until the kernel reports completion.
//! Buffers are recycled through a [`BufPool`], which also bounds the memory a scan uses.
//!
//! The engines are chosen by [`EngineKind`]: `Auto` picks io_uring when the kernel allows it (a probe ring can
//! be created and reads work), and the synchronous engine otherwise.

mod buf;
pub(crate) mod sync;
#[cfg(test)]
mod tests;
mod uring;

use std::fs::File;
use std::sync::Arc;

pub use buf::{AlignedBuf, BufPool};
use sync::{SyncReader, SyncWriter};
use uring::{UringReader, UringWriter};

use crate::volume::Volume;

/// Alignment of every buffer handed to an engine; satisfies `O_DIRECT` on 512-byte and 4 KiB sector devices.
pub const DIRECT_ALIGN: usize = 4096;

/// Which I/O engine to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum EngineKind {
    /// io_uring if the kernel allows it, else synchronous.
    #[default]
    Auto,
    /// io_uring; an error if the kernel refuses it.
    Uring,
    /// Plain `pread`/`pwrite`.
    Sync,
}

/// Errors of the I/O engines.
#[derive(Debug, thiserror::Error)]
pub enum IoError {
    /// A read failed.
    #[error("cannot read {len} bytes at offset {offset}")]
    Read {
        /// Byte offset of the read.
        offset: u64,
        /// Requested length.
        len: usize,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A write failed.
    #[error("cannot write {len} bytes at offset {offset}")]
    Write {
        /// Byte offset of the write.
        offset: u64,
        /// Requested length.
        len: usize,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A flush to stable storage failed.
    #[error("cannot flush writes to stable storage")]
    Sync(#[source] std::io::Error),
    /// io_uring could not be set up.
    #[error("cannot set up io_uring (use the synchronous engine with --io-engine sync)")]
    UringSetup(#[source] std::io::Error),
    /// The io_uring ring itself failed (not one request): the engine cannot continue.
    #[error("io_uring failed while submitting or reaping requests (retry with --io-engine sync)")]
    Uring(#[source] std::io::Error),
    /// A read returned fewer bytes than the volume size promises.
    #[error("short read at offset {offset}: wanted {wanted} bytes, got {got} (the volume shrank?)")]
    ShortRead {
        /// Byte offset of the read.
        offset: u64,
        /// Bytes requested.
        wanted: usize,
        /// Bytes returned.
        got: usize,
    },
}

/// A completed read: the buffer holds `buf.len()` valid bytes read at `offset`.
#[derive(Debug)]
pub struct Completion {
    /// Byte offset the read started at.
    pub offset: u64,
    /// The filled buffer (`len()` = bytes read).
    pub buf: AlignedBuf,
}

/// Positional reads with up to `depth()` requests in flight.
///
/// Requests are queued with [`ReadEngine::submit`] and collected with [`ReadEngine::wait`]; completions may come
/// back in any order. The synchronous engine performs the read inside `wait`.
pub trait ReadEngine: Send {
    /// The engine actually in use (never `Auto`).
    fn kind(&self) -> EngineKind;
    /// Maximum number of requests in flight.
    fn depth(&self) -> usize;
    /// Requests submitted and not yet returned by `wait`.
    fn in_flight(&self) -> usize;
    /// Queues a read of `len` bytes at `offset` into `buf` (`len <= buf.capacity()`). On failure the buffer is
    /// handed back.
    fn submit(&mut self, offset: u64, len: usize, buf: AlignedBuf) -> Result<(), (IoError, AlignedBuf)>;
    /// Waits for one request to complete. Panics if nothing is in flight. A request that fails is reported
    /// once, as an error, and its buffer is dropped (it no longer counts as in flight). [`IoError::Uring`] is
    /// different: the ring itself failed, nothing more will complete, and the engine should be dropped.
    fn wait(&mut self) -> Result<Completion, IoError>;
}

/// Positional writes with up to `depth()` requests in flight.
///
/// [`WriteEngine::write`] queues a write and may block until a slot frees up; buffers of completed writes come
/// back through the engine's [`BufPool`]. [`WriteEngine::flush`] waits for every queued write; [`WriteEngine::sync`]
/// also makes them durable (`fdatasync`).
///
/// Queued writes may complete in any order (io_uring runs them concurrently): writes that overlap must be
/// separated by a `flush`. Any offset and length is accepted; under `O_DIRECT` the pieces that cannot be
/// aligned are written through a buffered descriptor, which `sync` covers too. Dropping an engine waits for
/// its queued writes but does not report their errors: call `flush` or `sync` to learn them.
pub trait WriteEngine: Send {
    /// The engine actually in use (never `Auto`).
    fn kind(&self) -> EngineKind;
    /// Queues a write of `buf[..buf.len()]` at `offset`.
    fn write(&mut self, offset: u64, buf: AlignedBuf) -> Result<(), IoError>;
    /// Waits until every queued write has completed; reports the first failure.
    fn flush(&mut self) -> Result<(), IoError>;
    /// `flush`, then makes the data durable.
    fn sync(&mut self) -> Result<(), IoError>;
    /// The pool completed buffers are returned to.
    fn pool(&self) -> &BufPool;
}

impl EngineKind {
    /// The engine `self` stands for on this machine: `Auto` becomes `Uring` or `Sync`; `Uring` fails with
    /// [`IoError::UringSetup`] when the kernel refuses io_uring.
    pub fn resolve(self) -> Result<EngineKind, IoError> {
        match self {
            EngineKind::Sync => Ok(EngineKind::Sync),
            EngineKind::Auto => Ok(if uring::probe().is_ok() { EngineKind::Uring } else { EngineKind::Sync }),
            EngineKind::Uring => uring::probe().map(|()| EngineKind::Uring).map_err(IoError::UringSetup),
        }
    }
}

/// The open file an engine works on, shared with the [`Volume`] that created it.
///
/// Under `O_DIRECT`, `file` is the direct descriptor and `buffered` a second, buffered descriptor on the same
/// file, used for pieces that cannot be aligned (a volume's unaligned tail, an unaligned offset). Without
/// `O_DIRECT` both are the same descriptor.
#[derive(Debug, Clone)]
pub(crate) struct Target {
    pub(crate) file: Arc<File>,
    pub(crate) buffered: Arc<File>,
    pub(crate) size: u64,
    pub(crate) direct: bool,
    /// Largest single kernel request, [`MAX_IO`]; tests lower it to make every read and write come back short.
    pub(crate) max_io: usize,
}

/// Largest single read or write handed to the kernel (Linux caps one call at this many bytes anyway).
pub(crate) const MAX_IO: usize = 0x7fff_f000;

impl Target {
    /// Bytes a read of `len` at `offset` must return: `len`, trimmed at the end of the volume.
    pub(crate) fn expected(&self, offset: u64, len: usize) -> usize {
        let left = self.size.saturating_sub(offset);
        len.min(usize::try_from(left).unwrap_or(usize::MAX))
    }

    /// Which descriptor and how many bytes to read next, when `done` of `want` bytes have arrived in a buffer of
    /// `cap` bytes at `ptr`, for a read that started at `offset`.
    ///
    /// Under `O_DIRECT` an aligned position reads whole [`DIRECT_ALIGN`] units (the kernel trims at the end of the
    /// volume, and the caller trims the buffer to `want`); an unaligned position, left by a short read, goes
    /// through the buffered descriptor.
    pub(crate) fn plan_read(&self, offset: u64, ptr: usize, done: usize, want: usize, cap: usize) -> (&File, usize) {
        let rest = want - done;
        if self.direct {
            if is_aligned(offset + done as u64, ptr + done) {
                let n = rest.div_ceil(DIRECT_ALIGN) * DIRECT_ALIGN;
                debug_assert!(done + n <= cap, "capacity is a multiple of the alignment");
                return (&self.file, n.min(cap - done).min(self.max_direct()));
            }
            return (&self.buffered, rest.min(self.max_io));
        }
        (&self.file, rest.min(self.max_io))
    }

    /// Which descriptor and how many bytes to write next, when `done` of `len` bytes at `ptr` are written, for a
    /// write that started at `offset`. Under `O_DIRECT` the aligned head goes direct and an unaligned tail (or an
    /// unaligned start) through the buffered descriptor.
    pub(crate) fn plan_write(&self, offset: u64, ptr: usize, done: usize, len: usize) -> (&File, usize) {
        let rest = len - done;
        if self.direct {
            let whole = rest / DIRECT_ALIGN * DIRECT_ALIGN;
            if whole > 0 && is_aligned(offset + done as u64, ptr + done) {
                return (&self.file, whole.min(self.max_direct()));
            }
            return (&self.buffered, rest.min(self.max_io));
        }
        (&self.file, rest.min(self.max_io))
    }

    /// Largest direct request: `max_io` rounded down to the alignment (at least one unit).
    fn max_direct(&self) -> usize {
        (self.max_io / DIRECT_ALIGN * DIRECT_ALIGN).max(DIRECT_ALIGN)
    }

    /// Makes written data durable. `fdatasync` works on the file, so it also covers the buffered descriptor.
    pub(crate) fn sync_data(&self) -> Result<(), IoError> {
        self.file.sync_data().map_err(IoError::Sync)
    }
}

fn is_aligned(offset: u64, ptr: usize) -> bool {
    offset % DIRECT_ALIGN as u64 == 0 && ptr % DIRECT_ALIGN == 0
}

/// A read engine of kind `kind` on `target`. With `Auto`, a ring that cannot be set up (for example a locked-memory
/// limit on a deep ring, although the small probe ring worked) falls back to the synchronous engine.
pub(crate) fn new_reader(kind: EngineKind, target: Target, depth: usize) -> Result<Box<dyn ReadEngine>, IoError> {
    let depth = depth.clamp(1, uring::MAX_DEPTH);
    match kind.resolve()? {
        EngineKind::Uring | EngineKind::Auto => match UringReader::new(target.clone(), depth) {
            Ok(r) => Ok(Box::new(r)),
            Err(e) if kind == EngineKind::Auto => {
                tracing::info!(error = %e, depth, "cannot set up an io_uring reader; using the synchronous engine");
                Ok(Box::new(SyncReader::new(target, depth)))
            }
            Err(e) => Err(e),
        },
        EngineKind::Sync => Ok(Box::new(SyncReader::new(target, depth))),
    }
}

/// A write engine of kind `kind` on `target`, falling back like [`new_reader`].
pub(crate) fn new_writer(
    kind: EngineKind,
    target: Target,
    depth: usize,
    pool: BufPool,
) -> Result<Box<dyn WriteEngine>, IoError> {
    match kind.resolve()? {
        EngineKind::Uring | EngineKind::Auto => match UringWriter::new(target.clone(), depth, pool.clone()) {
            Ok(w) => Ok(Box::new(w)),
            Err(e) if kind == EngineKind::Auto => {
                tracing::info!(error = %e, depth, "cannot set up an io_uring writer; using the synchronous engine");
                Ok(Box::new(SyncWriter::new(target, pool)))
            }
            Err(e) => Err(e),
        },
        EngineKind::Sync => Ok(Box::new(SyncWriter::new(target, pool))),
    }
}

/// Reads `vol` from `start` to `end` (trimmed to the volume size) in chunks of `chunk` bytes with up to `depth`
/// reads in flight, and hands every filled buffer to `sink` strictly in offset order.
///
/// Buffers come from `pool` (whose buffers must hold `chunk` bytes); `sink` owns them and returns them to the
/// pool or drops them. The pool must hold more than `depth` buffers, and a dropped buffer is gone from the pool
/// for good: a sink that keeps or drops buffers must leave enough for `depth` reads, or the scan waits forever.
/// Every chunk is `chunk` bytes long except the last, which ends at `end`. The first error,
/// from the engine or from `sink`, stops the scan: reads still in flight are waited for and their buffers go back
/// to the pool.
///
/// This is the differ's hot path: on page-cached data it runs at memory-copy speed with either engine.
pub fn read_sequential<E: From<IoError>>(
    vol: &Volume,
    start: u64,
    end: u64,
    chunk: usize,
    depth: usize,
    pool: &BufPool,
    mut sink: impl FnMut(u64, AlignedBuf) -> Result<(), E>,
) -> Result<(), E> {
    assert!(chunk > 0, "chunk size must be positive");
    assert!(chunk <= pool.buf_size(), "chunk size {chunk} exceeds the pool's buffers of {} bytes", pool.buf_size());
    let end = end.min(vol.size());
    if start >= end {
        return Ok(());
    }
    let depth = depth.max(1);
    let mut engine = vol.engine_reader(depth)?;
    let mut next_submit = start;
    let mut next_emit = start;
    // Completions that arrived before their predecessors; at most `depth` buffers are out at any time.
    let mut early: std::collections::BTreeMap<u64, AlignedBuf> = std::collections::BTreeMap::new();
    let result = (|| -> Result<(), E> {
        while next_emit < end {
            while next_submit < end && engine.in_flight() + early.len() < depth {
                let len = usize::try_from(end - next_submit).map_or(chunk, |left| left.min(chunk));
                engine.submit(next_submit, len, pool.get()).map_err(|(e, buf)| {
                    pool.put(buf);
                    e
                })?;
                next_submit += len as u64;
            }
            let done = engine.wait()?;
            early.insert(done.offset, done.buf);
            while let Some(buf) = early.remove(&next_emit) {
                next_emit += buf.len() as u64;
                sink(next_emit - buf.len() as u64, buf)?;
            }
        }
        Ok(())
    })();
    // Collect whatever is still in flight after an error so that its buffers return to the pool.
    while engine.in_flight() > 0 {
        match engine.wait() {
            Ok(c) => pool.put(c.buf),
            // The ring itself failed: nothing more will complete (dropping the engine deals with the rest).
            Err(IoError::Uring(_)) => break,
            Err(_) => {}
        }
    }
    for (_, buf) in early {
        pool.put(buf);
    }
    result
}
