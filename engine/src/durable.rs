//! The durable layer: every operation of the target side that changes what survives a crash goes through a
//! [`Durable`] handle.
//!
//! That covers spool appends and fsyncs, shadow writes and fsyncs, manifest writes, fsyncs and renames, directory
//! fsyncs, state-file writes and spool removal. The handle counts these operations. In production it is unarmed and
//! costs one atomic increment per operation. In tests it can be armed with a [`FaultPlan`]: operation number
//! `crash_after` (counting from 0) and every later one fail with a simulated crash, and with `torn` the crashing
//! write first applies half of its bytes. A test can then run a sync, "crash" it after each of its first N
//! operations, reopen the target with an unarmed handle and check that recovery yields exactly one generation.
//!
//! With `lose_unsynced`, the handle also keeps an undo journal of every write not yet followed by an fsync of the
//! same file; [`Durable::power_loss`] then restores the old bytes, as if the page cache had been lost with the
//! machine. This checks that every fsync the protocol relies on is actually there. (Directory operations are
//! treated as durable at once; the manifest written through a memory map is not journaled.)
//!
//! A simulated crash is an [`std::io::Error`] wrapping [`InjectedCrash`]; [`is_injected_crash`] recognises it
//! anywhere in an error's source chain.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

/// The kinds of durable operation, for error messages and test diagnostics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// Appending to the spool.
    SpoolAppend,
    /// Fsync of the spool.
    SpoolSync,
    /// Truncating the spool (dropping a torn tail or a discarded transfer).
    SpoolTruncate,
    /// Removing the spool after a commit.
    SpoolRemove,
    /// Writing to the shadow volume.
    ShadowWrite,
    /// Fsync of the shadow volume.
    ShadowSync,
    /// Writing a manifest file.
    ManifestWrite,
    /// Fsync of a manifest file.
    ManifestSync,
    /// Writing the state file.
    StateWrite,
    /// Fsync of a file about to be renamed into place.
    FileSync,
    /// Renaming a file into place.
    Rename,
    /// Fsync of a directory after a rename or removal.
    DirSync,
    /// Preserving the shadow's current generation before a commit overwrites it (a retained copy: snapshot or
    /// reflink, made by the target's [`crate::target::Retention`]).
    Retain,
}

/// When to simulate a crash.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FaultPlan {
    /// Operation number (counting from 0 since the handle was created or re-armed) at which the crash happens.
    pub crash_after: u64,
    /// Whether a crashing write first applies half of its bytes.
    pub torn: bool,
    /// Whether writes not yet fsynced can be undone with [`Durable::power_loss`].
    pub lose_unsynced: bool,
}

/// The error of a simulated crash.
#[derive(Debug, Clone, thiserror::Error)]
#[error("simulated crash at durable operation {index} ({op:?}); this only happens in fault-injection tests")]
pub struct InjectedCrash {
    /// The operation number.
    pub index: u64,
    /// The kind of operation.
    pub op: Op,
}

/// Whether `err` or any error in its source chain is a simulated crash.
pub fn is_injected_crash(err: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = cur {
        if e.is::<InjectedCrash>() {
            return true;
        }
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            if io.get_ref().is_some_and(|inner| inner.is::<InjectedCrash>()) {
                return true;
            }
        }
        cur = e.source();
    }
    false
}

/// Bytes a [`Writeback`] lets accumulate before it starts their writeback.
const WRITEBACK_EVERY: u64 = 8 << 20;

/// The range of a file written since its writeback was last started. Every `WRITEBACK_EVERY` bytes written,
/// [`Writeback::wrote`] starts writing that range to the disk without waiting for it (`start_writeback`), so
/// that the `fdatasync` which later makes it durable finds most of it written and the disk works while the
/// transfer goes on. Used by the spool writer and both of the shadow's writers.
#[derive(Debug, Default)]
pub struct Writeback {
    lo: u64,
    hi: u64,
    bytes: u64,
}

impl Writeback {
    /// Records a write of `len` bytes at `offset` of `file`.
    pub fn wrote(&mut self, file: &File, offset: u64, len: u64) {
        if self.bytes == 0 {
            (self.lo, self.hi) = (offset, offset);
        }
        (self.lo, self.hi, self.bytes) = (self.lo.min(offset), self.hi.max(offset + len), self.bytes + len);
        if self.bytes >= WRITEBACK_EVERY {
            start_writeback(file, self.lo, self.hi - self.lo);
            self.synced();
        }
    }

    /// Forgets the range (an fsync made it durable, or its writeback was started).
    pub fn synced(&mut self) {
        self.bytes = 0;
    }
}

/// Starts writing `len` bytes of `file` at `offset` to the disk (`sync_file_range(SYNC_FILE_RANGE_WRITE)`, as
/// RocksDB's `bytes_per_sync` does). Only a hint: durability still comes from the `fdatasync` alone (the crash
/// journal of a test handle keeps these writes as unsynced), and an error (a file system or device that does not
/// support it) is ignored. A no-op for a file opened with `O_DIRECT`, which has no dirty pages.
fn start_writeback(file: &File, offset: u64, len: u64) {
    use std::os::fd::AsRawFd;
    let (Ok(offset), Ok(len)) = (i64::try_from(offset), i64::try_from(len)) else { return };
    // SAFETY: the descriptor is valid for the duration of the call (borrowed from `file`); the call reads no
    // memory of ours and changes nothing but when the kernel writes the file's dirty pages.
    let r = unsafe { libc::sync_file_range(file.as_raw_fd(), offset, len, libc::SYNC_FILE_RANGE_WRITE) };
    if r != 0 {
        tracing::trace!(error = %std::io::Error::last_os_error(), "sync_file_range: ignored (only a hint)");
    }
}

/// What a gated operation may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gate {
    /// Perform the operation normally.
    Proceed,
    /// Perform half of the write, then fail with the contained crash.
    Torn(u64),
}

/// One journaled write: the bytes it replaced.
#[derive(Debug)]
struct Undo {
    key: (u64, u64),
    file: File,
    offset: u64,
    old: Vec<u8>,
    old_len: u64,
}

#[derive(Debug)]
struct Inner {
    ops: AtomicU64,
    armed: AtomicBool,
    crash_after: AtomicU64,
    torn: AtomicBool,
    journal_on: AtomicBool,
    journal: std::sync::Mutex<Vec<Undo>>,
}

fn file_key(file: &File) -> std::io::Result<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    let m = file.metadata()?;
    Ok((m.dev(), m.ino()))
}

/// A counting, optionally fault-injecting handle for durable operations. Clones share the counter and the plan.
#[derive(Debug, Clone)]
pub struct Durable {
    inner: Arc<Inner>,
}

impl Default for Durable {
    fn default() -> Self {
        Self::new()
    }
}

impl Durable {
    /// An unarmed handle (production).
    pub fn new() -> Self {
        Durable {
            inner: Arc::new(Inner {
                ops: AtomicU64::new(0),
                armed: AtomicBool::new(false),
                crash_after: AtomicU64::new(u64::MAX),
                torn: AtomicBool::new(false),
                journal_on: AtomicBool::new(false),
                journal: std::sync::Mutex::new(Vec::new()),
            }),
        }
    }

    /// A handle armed with `plan` (tests).
    pub fn with_plan(plan: FaultPlan) -> Self {
        let d = Self::new();
        d.arm(plan);
        d
    }

    /// Arms the handle and resets the operation counter to 0.
    pub fn arm(&self, plan: FaultPlan) {
        self.inner.crash_after.store(plan.crash_after, Ordering::SeqCst);
        self.inner.torn.store(plan.torn, Ordering::SeqCst);
        self.inner.journal_on.store(plan.lose_unsynced, Ordering::SeqCst);
        self.inner.journal.lock().expect("journal lock").clear();
        self.inner.ops.store(0, Ordering::SeqCst);
        self.inner.armed.store(true, Ordering::SeqCst);
    }

    /// Disarms the handle (the counter keeps counting).
    pub fn disarm(&self) {
        self.inner.armed.store(false, Ordering::SeqCst);
    }

    /// Number of operations gated so far.
    pub fn ops(&self) -> u64 {
        self.inner.ops.load(Ordering::SeqCst)
    }

    /// Counts one operation and decides whether it may run. Every durable operation calls this first.
    pub fn gate(&self, op: Op) -> std::io::Result<Gate> {
        let n = self.inner.ops.fetch_add(1, Ordering::Relaxed);
        if !self.inner.armed.load(Ordering::Relaxed) {
            return Ok(Gate::Proceed);
        }
        let at = self.inner.crash_after.load(Ordering::SeqCst);
        if n < at {
            Ok(Gate::Proceed)
        } else if n == at && self.inner.torn.load(Ordering::SeqCst) {
            Ok(Gate::Torn(n))
        } else {
            Err(crash(n, op))
        }
    }

    /// Gates an operation that cannot be torn (fsync, rename, removal): a torn plan crashes it outright.
    pub fn gate_whole(&self, op: Op) -> std::io::Result<()> {
        match self.gate(op)? {
            Gate::Proceed => Ok(()),
            Gate::Torn(n) => Err(crash(n, op)),
        }
    }

    /// Before a write of `len` bytes at `offset` to `file` that bypasses [`Durable::write_all_at`] (the shadow's
    /// engine): journals the bytes it will replace when the plan loses unsynced writes. A no-op otherwise.
    pub fn before_write(&self, file: &File, offset: u64, len: usize) -> std::io::Result<()> {
        if !self.inner.journal_on.load(Ordering::Relaxed) {
            return Ok(());
        }
        let old_len = file.metadata()?.len();
        let keep = old_len.saturating_sub(offset).min(len as u64) as usize;
        let mut old = vec![0u8; keep];
        file.read_exact_at(&mut old, offset)?;
        let undo = Undo { key: file_key(file)?, file: file.try_clone()?, offset, old, old_len };
        self.inner.journal.lock().expect("journal lock").push(undo);
        Ok(())
    }

    /// After a successful fsync of `file` that bypasses [`Durable::sync_data`] (the shadow's engine): its
    /// journaled writes are durable now.
    pub fn after_sync(&self, file: &File) -> std::io::Result<()> {
        if !self.inner.journal_on.load(Ordering::Relaxed) {
            return Ok(());
        }
        let key = file_key(file)?;
        self.inner.journal.lock().expect("journal lock").retain(|u| u.key != key);
        Ok(())
    }

    /// Simulates losing the machine: undoes, newest first, every journaled write not followed by an fsync of its
    /// file, and disarms the handle. Only meaningful with a plan that has `lose_unsynced`.
    pub fn power_loss(&self) -> std::io::Result<()> {
        self.disarm();
        self.inner.journal_on.store(false, Ordering::SeqCst);
        let journal = std::mem::take(&mut *self.inner.journal.lock().expect("journal lock"));
        for u in journal.into_iter().rev() {
            u.file.write_all_at(&u.old, u.offset)?;
            if u.file.metadata()?.len() > u.old_len {
                u.file.set_len(u.old_len)?;
            }
        }
        Ok(())
    }

    /// `pwrite` of all of `data` at `offset`.
    pub fn write_all_at(&self, op: Op, file: &File, data: &[u8], offset: u64) -> std::io::Result<()> {
        self.before_write(file, offset, data.len())?;
        match self.gate(op)? {
            Gate::Proceed => file.write_all_at(data, offset),
            Gate::Torn(n) => {
                file.write_all_at(&data[..data.len() / 2], offset)?;
                Err(crash(n, op))
            }
        }
    }

    /// `fdatasync` of a file.
    pub fn sync_data(&self, op: Op, file: &File) -> std::io::Result<()> {
        self.gate_whole(op)?;
        file.sync_data()?;
        self.after_sync(file)
    }

    /// `fsync` of a file (data and metadata such as its length).
    pub fn sync_all(&self, op: Op, file: &File) -> std::io::Result<()> {
        self.gate_whole(op)?;
        file.sync_all()?;
        self.after_sync(file)
    }

    /// Truncates or extends a file.
    pub fn set_len(&self, op: Op, file: &File, len: u64) -> std::io::Result<()> {
        self.gate_whole(op)?;
        file.set_len(len)
    }

    /// Renames `from` to `to` (atomic within one filesystem).
    pub fn rename(&self, from: &Path, to: &Path) -> std::io::Result<()> {
        self.gate_whole(Op::Rename)?;
        std::fs::rename(from, to)
    }

    /// Removes a file; a missing file is not an error.
    pub fn remove_file(&self, op: Op, path: &Path) -> std::io::Result<()> {
        self.gate_whole(op)?;
        match std::fs::remove_file(path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            r => r,
        }
    }

    /// Fsync of a directory, so that renames and removals in it are durable.
    pub fn sync_dir(&self, dir: &Path) -> std::io::Result<()> {
        self.gate_whole(Op::DirSync)?;
        File::open(dir)?.sync_all()
    }

    /// Replaces `dir/name` atomically with `data`: writes `dir/name.tmp`, fsyncs it, renames it over `dir/name` and
    /// fsyncs `dir`. After a crash the file holds either the old or the new content.
    pub fn replace_file(&self, op: Op, dir: &Path, name: &str, data: &[u8]) -> std::io::Result<()> {
        let tmp = dir.join(format!("{name}.tmp"));
        let f = File::create(&tmp)?;
        self.write_all_at(op, &f, data, 0)?;
        self.sync_all(Op::FileSync, &f)?;
        drop(f);
        self.rename(&tmp, &dir.join(name))?;
        self.sync_dir(dir)
    }
}

/// The I/O error of a simulated crash at operation `index`.
pub fn crash(index: u64, op: Op) -> std::io::Error {
    std::io::Error::other(InjectedCrash { index, op })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unarmed_handle_counts_and_never_fails() {
        let d = Durable::new();
        for _ in 0..10 {
            assert_eq!(d.gate(Op::ShadowWrite).unwrap(), Gate::Proceed);
        }
        assert_eq!(d.ops(), 10);
    }

    #[test]
    fn armed_handle_crashes_at_and_after_the_planned_operation() {
        let dir = tempfile::tempdir().unwrap();
        let f = File::create(dir.path().join("f")).unwrap();
        let d = Durable::with_plan(FaultPlan { crash_after: 1, torn: true, lose_unsynced: false });
        d.write_all_at(Op::SpoolAppend, &f, b"abcd", 0).unwrap();
        let e = d.write_all_at(Op::SpoolAppend, &f, b"efgh", 4).unwrap_err();
        assert!(is_injected_crash(&e), "{e}");
        // Torn: half of the crashing write landed.
        assert_eq!(std::fs::read(dir.path().join("f")).unwrap(), b"abcdef");
        let e = d.sync_all(Op::SpoolSync, &f).unwrap_err();
        assert!(is_injected_crash(&e));
        let e = d.write_all_at(Op::SpoolAppend, &f, b"ijkl", 6).unwrap_err();
        assert!(is_injected_crash(&e));
        assert_eq!(std::fs::read(dir.path().join("f")).unwrap(), b"abcdef");
        // An ordinary error is not mistaken for a crash.
        assert!(!is_injected_crash(&std::io::Error::other("disk on fire")));
    }

    #[test]
    fn replace_file_is_all_or_nothing() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("s"), b"old").unwrap();
        for n in 0..4 {
            let d = Durable::with_plan(FaultPlan { crash_after: n, torn: true, lose_unsynced: false });
            assert!(d.replace_file(Op::StateWrite, dir.path(), "s", b"new").is_err());
            let now = std::fs::read(dir.path().join("s")).unwrap();
            assert!(now == b"old" || now == b"new", "{now:?}");
        }
        Durable::new().replace_file(Op::StateWrite, dir.path(), "s", b"new").unwrap();
        assert_eq!(std::fs::read(dir.path().join("s")).unwrap(), b"new");
    }

    #[test]
    fn power_loss_undoes_writes_not_followed_by_an_fsync() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let f = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&path).unwrap();
        let d = Durable::with_plan(FaultPlan { crash_after: 100, torn: false, lose_unsynced: true });
        d.write_all_at(Op::SpoolAppend, &f, b"durable", 0).unwrap();
        d.sync_data(Op::SpoolSync, &f).unwrap();
        d.write_all_at(Op::SpoolAppend, &f, b"LOST", 2).unwrap();
        d.write_all_at(Op::SpoolAppend, &f, b" and more", 7).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"duLOSTe and more");
        d.power_loss().unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"durable");
    }
}
