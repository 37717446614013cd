//! The synchronous engines: plain `pread`/`pwrite`, the twin of the io_uring engines and the fallback where the
//! kernel refuses io_uring.

use std::collections::VecDeque;
use std::os::unix::fs::FileExt;

use super::{AlignedBuf, BufPool, Completion, EngineKind, IoError, ReadEngine, Target, WriteEngine};

/// Reads `want` bytes at `offset` into `buf` (up to its capacity), retrying short reads and interruptions.
///
/// Sets `buf.len()` to `want`. Fewer bytes than `want` (the volume ends early) is [`IoError::ShortRead`].
pub(crate) fn pread_exact(target: &Target, offset: u64, want: usize, buf: &mut AlignedBuf) -> Result<(), IoError> {
    let cap = buf.capacity();
    let ptr = buf.as_ptr() as usize;
    let full = buf.as_full_mut();
    let mut done = 0;
    while done < want {
        let (file, n) = target.plan_read(offset, ptr, done, want, cap);
        match file.read_at(&mut full[done..done + n], offset + done as u64) {
            Ok(0) => return Err(IoError::ShortRead { offset, wanted: want, got: done }),
            Ok(k) => done += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(source) => return Err(IoError::Read { offset, len: want, source }),
        }
    }
    buf.set_len(want);
    Ok(())
}

/// Writes all of `data` at `offset`, retrying short writes and interruptions.
pub(crate) fn pwrite_all(target: &Target, offset: u64, data: &[u8]) -> Result<(), IoError> {
    let ptr = data.as_ptr() as usize;
    let mut done = 0;
    while done < data.len() {
        let (file, n) = target.plan_write(offset, ptr, done, data.len());
        match file.write_at(&data[done..done + n], offset + done as u64) {
            Ok(0) => {
                let source = std::io::Error::from(std::io::ErrorKind::WriteZero);
                return Err(IoError::Write { offset, len: data.len(), source });
            }
            Ok(k) => done += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(source) => return Err(IoError::Write { offset, len: data.len(), source }),
        }
    }
    Ok(())
}

/// Synchronous read engine: `submit` queues, `wait` performs the oldest queued read with `pread`.
#[derive(Debug)]
pub(crate) struct SyncReader {
    target: Target,
    depth: usize,
    queue: VecDeque<(u64, usize, AlignedBuf)>,
}

impl SyncReader {
    pub(crate) fn new(target: Target, depth: usize) -> Self {
        SyncReader { target, depth, queue: VecDeque::with_capacity(depth) }
    }
}

impl ReadEngine for SyncReader {
    fn kind(&self) -> EngineKind {
        EngineKind::Sync
    }

    fn depth(&self) -> usize {
        self.depth
    }

    fn in_flight(&self) -> usize {
        self.queue.len()
    }

    fn submit(&mut self, offset: u64, len: usize, buf: AlignedBuf) -> Result<(), (IoError, AlignedBuf)> {
        if let Err(e) = check_submit(offset, len, &buf, self.queue.len(), self.depth) {
            return Err((e, buf));
        }
        self.queue.push_back((offset, len, buf));
        Ok(())
    }

    fn wait(&mut self) -> Result<Completion, IoError> {
        let (offset, len, mut buf) = self.queue.pop_front().expect("ReadEngine::wait called with nothing in flight");
        let want = self.target.expected(offset, len);
        pread_exact(&self.target, offset, want, &mut buf)?;
        Ok(Completion { offset, buf })
    }
}

/// Checks a read request against the engine's contract: `len` fits the buffer and a slot is free.
pub(crate) fn check_submit(
    offset: u64,
    len: usize,
    buf: &AlignedBuf,
    in_flight: usize,
    depth: usize,
) -> Result<(), IoError> {
    if len > buf.capacity() {
        let msg = format!("read of {len} bytes does not fit a buffer of {} bytes", buf.capacity());
        return Err(IoError::Read { offset, len, source: std::io::Error::new(std::io::ErrorKind::InvalidInput, msg) });
    }
    if in_flight >= depth {
        let msg = format!("{in_flight} reads already in flight, the engine's depth is {depth}; call wait first");
        return Err(IoError::Read { offset, len, source: std::io::Error::new(std::io::ErrorKind::InvalidInput, msg) });
    }
    Ok(())
}

/// Synchronous write engine: `write` performs the write with `pwrite` and returns the buffer to the pool.
#[derive(Debug)]
pub(crate) struct SyncWriter {
    target: Target,
    pool: BufPool,
}

impl SyncWriter {
    pub(crate) fn new(target: Target, pool: BufPool) -> Self {
        SyncWriter { target, pool }
    }
}

impl WriteEngine for SyncWriter {
    fn kind(&self) -> EngineKind {
        EngineKind::Sync
    }

    fn write(&mut self, offset: u64, buf: AlignedBuf) -> Result<(), IoError> {
        let r = pwrite_all(&self.target, offset, &buf);
        self.pool.put(buf);
        r
    }

    fn flush(&mut self) -> Result<(), IoError> {
        Ok(())
    }

    fn sync(&mut self) -> Result<(), IoError> {
        self.target.sync_data()
    }

    fn pool(&self) -> &BufPool {
        &self.pool
    }
}
