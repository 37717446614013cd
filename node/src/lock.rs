//! The sync lock: one `blockrep sync` per node at a time. `<state_dir>/sync.lock` is held with `flock` for the
//! whole run (retries included) and holds the holder's pid and start time, so a second run can say who holds it,
//! and `blockrep cancel` knows whom to send SIGTERM. The kernel drops the lock when the holder dies, so a crash
//! leaves no stale lock.

use std::fs::File;
use std::io::{Read, Seek, Write};
use std::path::PathBuf;

use nix::fcntl::{Flock, FlockArg};

use crate::config::Config;
use crate::{Error, ErrorKind};

/// The lock file's name in the state directory.
const LOCK_FILE: &str = "sync.lock";

/// Errors of the sync lock and of `cancel`.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// Another sync holds the lock.
    #[error("another sync is running: process {pid} holds {} since {since} (unix time); wait for it, or stop it with `blockrep cancel`", path.display())]
    Held {
        /// The lock file.
        path: PathBuf,
        /// The holder's pid (0: unknown).
        pid: u32,
        /// Unix seconds it took the lock.
        since: u64,
    },
    /// The lock file could not be opened or locked.
    #[error("cannot use the lock file {}", path.display())]
    Io {
        /// The lock file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// `cancel` found no running sync.
    #[error("no sync is running on this node (nothing holds {})", path.display())]
    NotRunning {
        /// The lock file.
        path: PathBuf,
    },
    /// The stop request could not be sent.
    #[error("cannot send SIGTERM to the sync (process {pid})")]
    Signal {
        /// The holder's pid.
        pid: u32,
        /// The OS error.
        #[source]
        source: nix::Error,
    },
}

impl LockError {
    /// The kind of this error (all: the operation failed).
    pub fn kind(&self) -> ErrorKind {
        ErrorKind::Failed
    }
}

/// Who holds the lock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Holder {
    /// Process id.
    pub pid: u32,
    /// Unix seconds it took the lock.
    pub since: u64,
}

/// The held lock; dropping it releases it.
#[derive(Debug)]
pub struct SyncLock {
    _lock: Flock<File>,
}

fn lock_path(cfg: &Config) -> PathBuf {
    cfg.state_dir.join(LOCK_FILE)
}

fn open(path: &PathBuf) -> Result<File, LockError> {
    let io = |source| LockError::Io { path: path.clone(), source };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io)?;
    }
    std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(false).open(path).map_err(io)
}

fn read_holder(f: &mut File) -> Holder {
    let mut s = String::new();
    let _ = f.rewind().and_then(|()| f.read_to_string(&mut s));
    let mut it = s.split_whitespace().map(|w| w.parse::<u64>().unwrap_or(0));
    Holder { pid: it.next().unwrap_or(0) as u32, since: it.next().unwrap_or(0) }
}

/// Tries the lock: `Ok(Err(holder))` when another process holds it.
fn try_lock(path: &PathBuf) -> Result<Result<Flock<File>, Holder>, LockError> {
    let f = open(path)?;
    match Flock::lock(f, FlockArg::LockExclusiveNonblock) {
        Ok(l) => Ok(Ok(l)),
        Err((mut f, nix::errno::Errno::EWOULDBLOCK)) => Ok(Err(read_holder(&mut f))),
        Err((_, e)) => Err(LockError::Io { path: path.clone(), source: e.into() }),
    }
}

impl SyncLock {
    /// Takes the lock for this process, or says who holds it.
    pub fn acquire(cfg: &Config) -> Result<SyncLock, Error> {
        let path = lock_path(cfg);
        match try_lock(&path)? {
            Ok(mut l) => {
                let text = format!("{} {}\n", std::process::id(), crate::history::now());
                l.set_len(0)
                    .and_then(|()| l.rewind())
                    .and_then(|()| l.write_all(text.as_bytes()))
                    .map_err(|source| LockError::Io { path, source })?;
                Ok(SyncLock { _lock: l })
            }
            Err(h) => Err(LockError::Held { path, pid: h.pid, since: h.since }.into()),
        }
    }
}

/// The running sync, if any.
pub fn holder(cfg: &Config) -> Option<Holder> {
    let path = lock_path(cfg);
    if !path.exists() {
        return None;
    }
    match try_lock(&path) {
        Ok(Err(h)) => Some(h),
        _ => None,
    }
}

/// `blockrep cancel`: sends SIGTERM to the running sync, which stops at the next consistent point (the same
/// path as a SIGTERM from systemd). Returns the holder it signalled.
pub fn cancel(cfg: &Config) -> Result<Holder, Error> {
    let path = lock_path(cfg);
    let h = holder(cfg).filter(|h| h.pid != 0).ok_or(LockError::NotRunning { path })?;
    let pid = nix::unistd::Pid::from_raw(h.pid as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM)
        .map_err(|source| LockError::Signal { pid: h.pid, source })?;
    tracing::warn!(pid = h.pid, "cancel: sent SIGTERM to the running sync");
    Ok(h)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_lock_names_the_holder_and_the_first_release_frees_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(LOCK_FILE);
        let mut f = open(&path).unwrap();
        let l = Flock::lock(open(&path).unwrap(), FlockArg::LockExclusiveNonblock).unwrap();
        f.write_all(b"4242 17\n").unwrap();
        assert_eq!(try_lock(&path).unwrap().unwrap_err(), Holder { pid: 4242, since: 17 });
        drop(l);
        assert!(try_lock(&path).unwrap().is_ok());
    }
}
