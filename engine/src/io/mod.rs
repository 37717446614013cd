//! Read and write engines: io_uring and a plain synchronous twin behind the same traits.
//!
//! Both engines work on owned, aligned buffers ([`AlignedBuf`]) so that the same buffers serve buffered and
//! `O_DIRECT` I/O, and so that an io_uring request owns its buffer until the kernel reports completion.
//! Buffers are recycled through a [`BufPool`], which also bounds the memory a scan uses.
//!
//! The engines are chosen by [`EngineKind`]: `Auto` picks io_uring when the kernel allows it (a probe ring can
//! be created and reads work), and the synchronous engine otherwise.

mod buf;

pub use buf::{AlignedBuf, BufPool};

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
    /// Waits for one request to complete. Panics if nothing is in flight.
    fn wait(&mut self) -> Result<Completion, IoError>;
}

/// Positional writes with up to `depth()` requests in flight.
///
/// [`WriteEngine::write`] queues a write and may block until a slot frees up; buffers of completed writes come
/// back through the engine's [`BufPool`]. [`WriteEngine::flush`] waits for every queued write; [`WriteEngine::sync`]
/// also makes them durable (`fdatasync`).
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
