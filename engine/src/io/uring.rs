//! The io_uring engines: several reads or writes in flight on one ring, each owning its buffer until the kernel
//! reports completion.
//!
//! Every request lives in a slot of [`Ring`]; the slot index is the request's `user_data`. A slot is occupied
//! from the moment its entry is pushed to the submission queue until its completion is reaped, and each
//! occupied slot has exactly one operation with the kernel. The buffer in the slot is what the kernel reads
//! into or writes from, so it must not be freed or moved in between: slots are only emptied when their
//! completion arrives, and dropping a ring first waits for every occupied slot (or, if the ring itself fails,
//! leaks the buffers rather than freeing memory the kernel may still touch).

use std::collections::VecDeque;
use std::os::unix::io::AsRawFd;
use std::sync::OnceLock;

use io_uring::{opcode, squeue, types, IoUring};

use super::sync::{check_submit, pwrite_all};
use super::{AlignedBuf, BufPool, Completion, EngineKind, IoError, ReadEngine, Target, WriteEngine};

/// Largest ring this engine sets up; deeper requests are capped.
pub(crate) const MAX_DEPTH: usize = 4096;

/// Whether this kernel lets this process use io_uring with read and write opcodes; probed once per process.
pub(crate) fn probe() -> Result<(), std::io::Error> {
    static PROBE: OnceLock<Result<(), (Option<i32>, String)>> = OnceLock::new();
    let cached = PROBE.get_or_init(|| {
        let r = probe_once();
        if let Err((_, reason)) = &r {
            tracing::info!(%reason, "io_uring is unavailable; the automatic engine choice is the synchronous engine");
        }
        r
    });
    cached.clone().map_err(|(code, msg)| match code {
        Some(c) => std::io::Error::from_raw_os_error(c),
        None => std::io::Error::new(std::io::ErrorKind::Unsupported, msg),
    })
}

/// Sets up a small ring, checks that it supports reads and writes, and reads one byte through it from a pipe.
fn probe_once() -> Result<(), (Option<i32>, String)> {
    let fail = |what: &str, e: std::io::Error| (e.raw_os_error(), format!("{what}: {e}"));
    let mut ring = IoUring::new(2).map_err(|e| fail("io_uring_setup", e))?;
    let mut p = io_uring::Probe::new();
    ring.submitter().register_probe(&mut p).map_err(|e| fail("registering an io_uring probe", e))?;
    for (code, name) in [(opcode::Read::CODE, "IORING_OP_READ"), (opcode::Write::CODE, "IORING_OP_WRITE")] {
        if !p.is_supported(code) {
            return Err((None, format!("the kernel's io_uring lacks {name}")));
        }
    }
    let (rx, tx) = nix::unistd::pipe().map_err(|e| fail("creating a pipe for the io_uring probe", e.into()))?;
    nix::unistd::write(&tx, b"x").map_err(|e| fail("writing the io_uring probe pipe", e.into()))?;
    let buf: &'static mut [u8; 1] = Box::leak(Box::new([0u8; 1]));
    let sqe = opcode::Read::new(types::Fd(rx.as_raw_fd()), buf.as_mut_ptr(), 1).offset(u64::MAX).build();
    // SAFETY: the buffer is leaked (never freed), so it outlives the operation whatever happens to the ring.
    unsafe { ring.submission().push(&sqe) }.map_err(|_| (None, "the probe ring's queue is full".to_owned()))?;
    ring.submit_and_wait(1).map_err(|e| fail("io_uring_enter", e))?;
    let res = ring.completion().next().map(|c| c.result());
    match res {
        Some(1) if buf[0] == b'x' => {
            // SAFETY: the read completed, so the kernel no longer uses the buffer; it came from Box::leak.
            drop(unsafe { Box::from_raw(buf as *mut [u8; 1]) });
            Ok(())
        }
        Some(r) if r < 0 => Err(fail("an io_uring read", std::io::Error::from_raw_os_error(-r))),
        other => Err((None, format!("an io_uring read of a pipe returned {other:?} instead of one byte"))),
    }
}

/// A ring with a slab of requests keyed by `user_data`.
struct Ring<R> {
    ring: IoUring,
    slots: Vec<Option<R>>,
    free: Vec<usize>,
    /// Completions reaped by the last [`Ring::reap`]: (slot, result).
    cqes: Vec<(usize, i32)>,
}

impl<R> Ring<R> {
    fn new(depth: usize) -> Result<Self, IoError> {
        let depth = depth.clamp(1, MAX_DEPTH);
        probe().map_err(IoError::UringSetup)?;
        let entries = u32::try_from(depth.next_power_of_two()).expect("MAX_DEPTH fits u32");
        let ring = IoUring::new(entries).map_err(IoError::UringSetup)?;
        Ok(Ring { ring, slots: (0..depth).map(|_| None).collect(), free: (0..depth).rev().collect(), cqes: Vec::new() })
    }

    fn depth(&self) -> usize {
        self.slots.len()
    }

    /// Requests with the kernel (occupied slots).
    fn pending(&self) -> usize {
        self.slots.len() - self.free.len()
    }

    /// Puts `req` in a free slot; the caller has checked that one is free.
    fn insert(&mut self, req: R) -> usize {
        let slot = self.free.pop().expect("caller checked for a free slot");
        self.slots[slot] = Some(req);
        slot
    }

    fn remove(&mut self, slot: usize) -> R {
        let req = self.slots[slot].take().expect("completion for an occupied slot");
        self.free.push(slot);
        req
    }

    fn get_mut(&mut self, slot: usize) -> &mut R {
        self.slots[slot].as_mut().expect("completion for an occupied slot")
    }

    /// Pushes `sqe` (whose `user_data` is `slot`) and tells the kernel. On error nothing was queued and the
    /// caller must empty the slot.
    ///
    /// # Safety
    /// The memory `sqe` points to must be the buffer of the request in `slot`, valid for the operation's length,
    /// and stay there until the slot's completion is reaped (which the slot discipline above guarantees).
    unsafe fn push(&mut self, sqe: &squeue::Entry) -> Result<(), std::io::Error> {
        // SAFETY: the caller guarantees the entry's buffer outlives the operation.
        if unsafe { self.ring.submission().push(sqe) }.is_err() {
            // The submission queue is full of entries not yet handed to the kernel: hand them over, retry.
            self.ring.submit()?;
            // SAFETY: as above.
            unsafe { self.ring.submission().push(sqe) }
                .map_err(|_| std::io::Error::other("the io_uring submission queue stays full"))?;
        }
        // The entry is queued now; if telling the kernel fails here, the next `reap` submits it.
        let _ = self.ring.submit();
        Ok(())
    }

    /// Submits what is queued and collects completions into `self.cqes`, waiting for at least one if `wait`.
    /// Interruptions are not errors (the caller loops).
    fn reap(&mut self, wait: bool) -> Result<(), std::io::Error> {
        self.cqes.clear();
        let want = usize::from(wait && self.ring.completion().is_empty());
        match self.ring.submit_and_wait(want) {
            Ok(_) => {}
            Err(e) if matches!(e.raw_os_error(), Some(libc::EINTR | libc::EBUSY | libc::EAGAIN)) => {}
            Err(e) => return Err(e),
        }
        for cqe in self.ring.completion() {
            self.cqes.push((cqe.user_data() as usize, cqe.result()));
        }
        Ok(())
    }
}

impl<R> Drop for Ring<R> {
    fn drop(&mut self) {
        // The kernel may still read into or write from the buffers of occupied slots: wait for each.
        while self.pending() > 0 {
            if let Err(e) = self.reap(true) {
                tracing::error!(error = %e, pending = self.pending(), "io_uring failed while draining; leaking buffers");
                for slot in self.slots.drain(..) {
                    std::mem::forget(slot);
                }
                return;
            }
            for i in 0..self.cqes.len() {
                let slot = self.cqes[i].0;
                self.remove(slot);
            }
        }
    }
}

fn retryable(res: i32) -> bool {
    res == -libc::EINTR || res == -libc::EAGAIN
}

/// A read in flight: `done` of `want` bytes have arrived in `buf`.
struct ReadReq {
    offset: u64,
    want: usize,
    done: usize,
    buf: AlignedBuf,
}

/// io_uring read engine.
pub(crate) struct UringReader {
    ring: Ring<ReadReq>,
    target: Target,
    /// Finished requests not yet returned by `wait`.
    ready: VecDeque<Result<Completion, IoError>>,
}

impl std::fmt::Debug for UringReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UringReader").field("depth", &self.ring.depth()).field("in_flight", &self.in_flight()).finish()
    }
}

impl UringReader {
    pub(crate) fn new(target: Target, depth: usize) -> Result<Self, IoError> {
        Ok(UringReader { ring: Ring::new(depth)?, target, ready: VecDeque::new() })
    }

    /// Queues the (rest of the) read in `slot`. On error the slot is still occupied and nothing was queued.
    fn push(&mut self, slot: usize) -> Result<(), std::io::Error> {
        let req = self.ring.slots[slot].as_mut().expect("pushing an occupied slot");
        let cap = req.buf.capacity();
        let (file, n) = self.target.plan_read(req.offset, req.buf.as_ptr() as usize, req.done, req.want, cap);
        let ptr = req.buf.as_full_mut()[req.done..].as_mut_ptr();
        let len = u32::try_from(n).expect("plan_read caps lengths below u32::MAX");
        let sqe = opcode::Read::new(types::Fd(file.as_raw_fd()), ptr, len)
            .offset(req.offset + req.done as u64)
            .build()
            .user_data(slot as u64);
        // SAFETY: `ptr` points `done` bytes into the request's own buffer, which has `cap - done >= n` bytes
        // there; the buffer lives in the slot, which stays occupied (and the heap memory unmoved) until this
        // operation's completion is reaped. The descriptor lives in `target` as long as the engine.
        unsafe { self.ring.push(&sqe) }
    }

    /// Handles the completions of the last reap: finished reads go to `ready`, short ones are resubmitted.
    fn complete(&mut self) {
        let cqes = std::mem::take(&mut self.ring.cqes);
        for &(slot, res) in &cqes {
            if retryable(res) {
                if let Err(e) = self.push(slot) {
                    let req = self.ring.remove(slot);
                    self.ready.push_back(Err(IoError::Read { offset: req.offset, len: req.want, source: e }));
                }
                continue;
            }
            if res < 0 {
                let req = self.ring.remove(slot);
                let source = std::io::Error::from_raw_os_error(-res);
                self.ready.push_back(Err(IoError::Read { offset: req.offset, len: req.want, source }));
                continue;
            }
            if res == 0 {
                let req = self.ring.remove(slot);
                self.ready.push_back(Err(IoError::ShortRead { offset: req.offset, wanted: req.want, got: req.done }));
                continue;
            }
            let req = self.ring.get_mut(slot);
            req.done += res as usize;
            if req.done >= req.want {
                let mut req = self.ring.remove(slot);
                req.buf.set_len(req.want);
                self.ready.push_back(Ok(Completion { offset: req.offset, buf: req.buf }));
            } else if let Err(e) = self.push(slot) {
                // A short read (not at the end of the volume, which `want` accounts for): read the rest.
                let req = self.ring.remove(slot);
                self.ready.push_back(Err(IoError::Read { offset: req.offset, len: req.want, source: e }));
            }
        }
        self.ring.cqes = cqes;
    }
}

impl ReadEngine for UringReader {
    fn kind(&self) -> EngineKind {
        EngineKind::Uring
    }

    fn depth(&self) -> usize {
        self.ring.depth()
    }

    fn in_flight(&self) -> usize {
        self.ring.pending() + self.ready.len()
    }

    fn submit(&mut self, offset: u64, len: usize, mut buf: AlignedBuf) -> Result<(), (IoError, AlignedBuf)> {
        if let Err(e) = check_submit(offset, len, &buf, self.in_flight(), self.depth()) {
            return Err((e, buf));
        }
        let want = self.target.expected(offset, len);
        if want == 0 {
            buf.set_len(0);
            self.ready.push_back(Ok(Completion { offset, buf }));
            return Ok(());
        }
        let slot = self.ring.insert(ReadReq { offset, want, done: 0, buf });
        if let Err(source) = self.push(slot) {
            let req = self.ring.remove(slot);
            return Err((IoError::Read { offset, len, source }, req.buf));
        }
        Ok(())
    }

    fn wait(&mut self) -> Result<Completion, IoError> {
        assert!(self.in_flight() > 0, "ReadEngine::wait called with nothing in flight");
        loop {
            if let Some(done) = self.ready.pop_front() {
                return done;
            }
            self.ring.reap(true).map_err(IoError::Uring)?;
            self.complete();
        }
    }
}

/// A write in flight: `done` of `len` bytes of `buf` are written.
struct WriteReq {
    offset: u64,
    len: usize,
    done: usize,
    buf: AlignedBuf,
}

/// io_uring write engine.
pub(crate) struct UringWriter {
    ring: Ring<WriteReq>,
    target: Target,
    pool: BufPool,
    /// The first failure since the last `flush`, reported by the next `write`, `flush` or `sync`.
    error: Option<IoError>,
}

impl std::fmt::Debug for UringWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UringWriter").field("depth", &self.ring.depth()).field("pending", &self.ring.pending()).finish()
    }
}

impl UringWriter {
    pub(crate) fn new(target: Target, depth: usize, pool: BufPool) -> Result<Self, IoError> {
        Ok(UringWriter { ring: Ring::new(depth)?, target, pool, error: None })
    }

    fn push(&mut self, slot: usize) -> Result<(), std::io::Error> {
        let req = self.ring.slots[slot].as_ref().expect("pushing an occupied slot");
        let (file, n) = self.target.plan_write(req.offset, req.buf.as_ptr() as usize, req.done, req.len);
        let ptr = req.buf[req.done..].as_ptr();
        let len = u32::try_from(n).expect("plan_write caps lengths below u32::MAX");
        let sqe = opcode::Write::new(types::Fd(file.as_raw_fd()), ptr, len)
            .offset(req.offset + req.done as u64)
            .build()
            .user_data(slot as u64);
        // SAFETY: `ptr..ptr + n` lies within the first `len` bytes of the request's own buffer, which stays in
        // its slot (heap memory unmoved, not written by us) until this operation's completion is reaped.
        unsafe { self.ring.push(&sqe) }
    }

    fn fail(&mut self, e: IoError) {
        self.error.get_or_insert(e);
    }

    /// Reaps completions (waiting for one if `wait`): finished buffers go back to the pool, short writes are
    /// resubmitted, failures are kept for the caller.
    fn reap(&mut self, wait: bool) {
        if let Err(e) = self.ring.reap(wait) {
            self.fail(IoError::Uring(e));
            return;
        }
        let cqes = std::mem::take(&mut self.ring.cqes);
        for &(slot, res) in &cqes {
            let error = if retryable(res) {
                None
            } else if res < 0 {
                Some(std::io::Error::from_raw_os_error(-res))
            } else if res == 0 {
                Some(std::io::Error::from(std::io::ErrorKind::WriteZero))
            } else {
                let req = self.ring.get_mut(slot);
                req.done += res as usize;
                if req.done >= req.len {
                    let req = self.ring.remove(slot);
                    self.pool.put(req.buf);
                    continue;
                }
                None
            };
            let error = match error {
                Some(e) => Some(e),
                None => self.push(slot).err(),
            };
            if let Some(source) = error {
                let req = self.ring.remove(slot);
                self.fail(IoError::Write { offset: req.offset, len: req.len, source });
                self.pool.put(req.buf);
            }
        }
        self.ring.cqes = cqes;
    }
}

impl WriteEngine for UringWriter {
    fn kind(&self) -> EngineKind {
        EngineKind::Uring
    }

    fn write(&mut self, offset: u64, buf: AlignedBuf) -> Result<(), IoError> {
        if let Some(e) = self.error.take() {
            self.pool.put(buf);
            return Err(e);
        }
        let mut len = buf.len();
        if self.target.direct {
            // Only whole aligned units go direct; an unaligned start or tail is written right here through the
            // buffered descriptor (at most once per volume in a sequential apply: its last partial block).
            let (file, n) = self.target.plan_write(offset, buf.as_ptr() as usize, 0, len);
            let head = if std::ptr::eq(file, &*self.target.file) { n } else { 0 };
            if head < len {
                if let Err(e) = pwrite_all(&self.target, offset + head as u64, &buf[head..]) {
                    self.pool.put(buf);
                    return Err(e);
                }
            }
            len = head;
        }
        if len == 0 {
            self.pool.put(buf);
            return Ok(());
        }
        while self.ring.pending() >= self.ring.depth() && !matches!(self.error, Some(IoError::Uring(_))) {
            self.reap(true);
        }
        if let Some(e) = self.error.take() {
            self.pool.put(buf);
            return Err(e);
        }
        let slot = self.ring.insert(WriteReq { offset, len, done: 0, buf });
        if let Err(source) = self.push(slot) {
            let req = self.ring.remove(slot);
            self.pool.put(req.buf);
            return Err(IoError::Write { offset, len, source });
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<(), IoError> {
        while self.ring.pending() > 0 {
            self.reap(true);
            if matches!(self.error, Some(IoError::Uring(_))) {
                break;
            }
        }
        self.error.take().map_or(Ok(()), Err)
    }

    fn sync(&mut self) -> Result<(), IoError> {
        self.flush()?;
        self.target.sync_data()
    }

    fn pool(&self) -> &BufPool {
        &self.pool
    }
}
