//! The persisted role state: role, "accepts syncs" flag, last switchover and the journal of the running plan.
//!
//! File `role.state` in the state directory:
//!
//! ```text
//! +--------------------------------------------------------------+
//! | "BLOCKREP-ROLE 1 <len, decimal> <crc32 of body, 8 hex>\n"    |  header line
//! | body: <len> bytes of JSON (RoleState)                        |
//! +--------------------------------------------------------------+
//! ```
//!
//! Written atomically: temporary file, fsync, rename, fsync of the directory. Read in two phases: the header is
//! checked (magic, version, length against [`MAX_STATE_LEN`], checksum) before the body is parsed.

use std::fs::{self, File, OpenOptions};
use std::io::{ErrorKind, Write};
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// File name of the state file inside the state directory.
pub const STATE_FILE: &str = "role.state";
/// Magic word of the header line.
pub const STATE_MAGIC: &str = "BLOCKREP-ROLE";
/// Current format version.
pub const STATE_VERSION: u32 = 1;
/// Largest body accepted.
pub const MAX_STATE_LEN: usize = 64 * 1024;
/// Longest header line accepted.
const MAX_HEADER_LEN: usize = 64;

/// Errors of reading, writing or placing the role state.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// I/O on the state file or directory failed.
    #[error("could not {action} {path}; check that the state directory exists and is writable by blockrep")]
    Io {
        /// What was being done.
        action: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The state file is not in a format this version understands or is damaged.
    #[error("role state file {path} is damaged or not a blockrep role state ({problem}); inspect it, then remove it to start as standby")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What check failed.
        problem: String,
    },
    /// The state directory lives on a volume that is replicated.
    #[error("state directory {state_dir} is on replicated volume {volume}; move state_dir to a local filesystem that blockrep does not replicate")]
    OnReplicatedVolume {
        /// The state directory.
        state_dir: PathBuf,
        /// The configured volume it is on.
        volume: PathBuf,
    },
}

/// A node's role.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Receives syncs.
    Standby,
    /// A promote plan is running or was interrupted.
    Promoting,
    /// Runs the productive services.
    Primary,
    /// A demote plan is running or was interrupted.
    Demoting,
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Role::Standby => "standby",
            Role::Promoting => "promoting",
            Role::Primary => "primary",
            Role::Demoting => "demoting",
        })
    }
}

/// Which plan.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PlanKind {
    /// Standby to primary.
    Promote,
    /// Primary to standby.
    Demote,
}

impl std::fmt::Display for PlanKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            PlanKind::Promote => "promote",
            PlanKind::Demote => "demote",
        })
    }
}

/// The last completed switchover.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Switchover {
    /// Completion time, Unix seconds.
    pub time: u64,
    /// Reason given by the operator or cluster manager.
    pub reason: String,
    /// Role before.
    pub from: Role,
    /// Role after.
    pub to: Role,
}

/// A step that failed, as recorded for `status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FailedStep {
    /// Journal key of the step, e.g. `start-primary-services/pg.service`.
    pub step: String,
    /// The error message.
    pub error: String,
    /// When, Unix seconds.
    pub time: u64,
}

/// Journal of the plan in progress.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlanProgress {
    /// Which plan.
    pub kind: PlanKind,
    /// Reason it was started with.
    pub reason: String,
    /// Start time, Unix seconds.
    pub started: u64,
    /// Journal keys of the completed steps, in order.
    pub done: Vec<String>,
    /// The last failure, if the last run stopped on one.
    pub failed: Option<FailedStep>,
}

/// Everything persisted about this node's role.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoleState {
    /// Current role.
    pub role: Role,
    /// Whether `serve` may apply syncs (false from the "stop accepting syncs" step of promote until demote ends).
    pub accept_syncs: bool,
    /// Last completed switchover.
    pub last_switchover: Option<Switchover>,
    /// The plan in progress (or interrupted).
    pub plan: Option<PlanProgress>,
    /// When this node completed its first full sync as standby (Unix seconds); automatic promotion (keepalived,
    /// Pacemaker) stays off until then.
    #[serde(default)]
    pub first_full_sync: Option<u64>,
}

impl Default for RoleState {
    fn default() -> Self {
        RoleState { role: Role::Standby, accept_syncs: true, last_switchover: None, plan: None, first_full_sync: None }
    }
}

impl RoleState {
    /// Encodes to the file format.
    pub fn encode(&self) -> Vec<u8> {
        let body = serde_json::to_vec_pretty(self).expect("RoleState always serializes");
        let mut out =
            format!("{STATE_MAGIC} {STATE_VERSION} {} {:08x}\n", body.len(), crc32fast::hash(&body)).into_bytes();
        out.extend_from_slice(&body);
        out
    }

    /// Decodes the file format; `Err` is a description of the first failed check.
    pub fn decode(bytes: &[u8]) -> Result<RoleState, String> {
        // Phase 1: check the header, length and checksum without interpreting the body.
        let nl = bytes.iter().take(MAX_HEADER_LEN).position(|&b| b == b'\n').ok_or("no header line")?;
        let header = std::str::from_utf8(&bytes[..nl]).map_err(|_| "header is not text")?;
        let mut f = header.split(' ');
        if f.next() != Some(STATE_MAGIC) {
            return Err("bad magic".into());
        }
        let version: u32 = f.next().and_then(|v| v.parse().ok()).ok_or("bad version field")?;
        if version != STATE_VERSION {
            return Err(format!("unsupported version {version}, this build reads version {STATE_VERSION}"));
        }
        let len: usize = f.next().and_then(|v| v.parse().ok()).ok_or("bad length field")?;
        if len > MAX_STATE_LEN {
            return Err(format!("body length {len} exceeds {MAX_STATE_LEN}"));
        }
        let crc = f.next().and_then(|v| u32::from_str_radix(v, 16).ok()).ok_or("bad checksum field")?;
        if f.next().is_some() {
            return Err("extra header fields".into());
        }
        let start = nl.checked_add(1).ok_or("length overflow")?;
        let end = start.checked_add(len).ok_or("length overflow")?;
        if bytes.len() != end {
            return Err(format!("file is {} bytes, header says {end}", bytes.len()));
        }
        let body = &bytes[start..end];
        if crc32fast::hash(body) != crc {
            return Err("checksum mismatch".into());
        }
        // Phase 2: parse.
        serde_json::from_slice(body).map_err(|e| format!("body: {e}"))
    }
}

/// Path of the state file in `state_dir`.
pub fn state_path(state_dir: &Path) -> PathBuf {
    state_dir.join(STATE_FILE)
}

/// Loads the state; a missing file means a fresh standby.
pub fn load(state_dir: &Path) -> Result<RoleState, StateError> {
    let path = state_path(state_dir);
    let bytes = match fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(RoleState::default()),
        Err(source) => return Err(StateError::Io { action: "read", path, source }),
    };
    if bytes.len() > MAX_STATE_LEN + MAX_HEADER_LEN {
        return Err(StateError::Corrupt { path, problem: format!("{} bytes is too large", bytes.len()) });
    }
    RoleState::decode(&bytes).map_err(|problem| StateError::Corrupt { path, problem })
}

/// Stores the state atomically (temp file, fsync, rename, fsync directory). Creates `state_dir` if needed.
pub fn store(state_dir: &Path, state: &RoleState) -> Result<(), StateError> {
    fs::create_dir_all(state_dir).map_err(|source| StateError::Io {
        action: "create",
        path: state_dir.into(),
        source,
    })?;
    let path = state_path(state_dir);
    let tmp = state_dir.join(format!(".{STATE_FILE}.tmp"));
    atomic_write(&tmp, &path, &state.encode()).map_err(|source| StateError::Io { action: "write", path, source })
}

/// Writes `bytes` to `path` via `tmp`: write, fsync, rename, fsync of the parent directory.
pub(crate) fn atomic_write(tmp: &Path, path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut f = OpenOptions::new().write(true).create(true).truncate(true).mode(0o644).open(tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    drop(f);
    fs::rename(tmp, path)?;
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    File::open(dir)?.sync_all()
}

/// File name of the lock that serializes promote, demote and other state updates.
pub const LOCK_FILE: &str = "role.lock";

/// An exclusive lock on the state directory, held while a plan runs (released on drop).
#[derive(Debug)]
pub struct StateLock {
    _lock: nix::fcntl::Flock<File>,
}

/// Takes the state directory's lock, waiting while another promote/demote holds it.
pub fn lock(state_dir: &Path) -> Result<StateLock, StateError> {
    fs::create_dir_all(state_dir).map_err(|source| StateError::Io {
        action: "create",
        path: state_dir.into(),
        source,
    })?;
    let path = state_dir.join(LOCK_FILE);
    let f = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(&path)
        .map_err(|source| StateError::Io { action: "open", path: path.clone(), source })?;
    let lock = nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusive).map_err(|(_, e)| StateError::Io {
        action: "lock",
        path,
        source: e.into(),
    })?;
    Ok(StateLock { _lock: lock })
}

/// Whether `serve` may apply a sync now. The lead's `serve` calls this before accepting a sync and again before
/// committing it; `false` means "this node is primary" (or is becoming or leaving primary).
pub fn accepts_syncs(state_dir: &Path) -> Result<bool, StateError> {
    let s = load(state_dir)?;
    Ok(s.accept_syncs && s.role == Role::Standby)
}

/// Records that this standby completed its first full sync (the lead's `serve` calls this after committing the
/// first complete generation of every volume). Idempotent; keeps the first time.
pub fn mark_first_full_sync(state_dir: &Path) -> Result<(), StateError> {
    let _lock = lock(state_dir)?;
    let mut s = load(state_dir)?;
    if s.first_full_sync.is_none() {
        s.first_full_sync =
            Some(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs()));
        store(state_dir, &s)?;
    }
    Ok(())
}

/// `status` data, serializable as one JSON object.
#[derive(Debug, Clone, Serialize)]
pub struct Status {
    /// Current role.
    pub role: Role,
    /// Whether `serve` accepts syncs.
    pub accepts_syncs: bool,
    /// Last completed switchover.
    pub last_switchover: Option<Switchover>,
    /// Plan in progress or interrupted; `plan.failed` says where it stopped.
    pub plan: Option<PlanProgress>,
    /// Whether the first full sync completed (contrib/keepalived and contrib/pacemaker check this field).
    pub first_full_sync_done: bool,
    /// When it completed, Unix seconds.
    pub first_full_sync: Option<u64>,
}

/// Reads the status of this node.
pub fn status(state_dir: &Path) -> Result<Status, StateError> {
    let s = load(state_dir)?;
    Ok(Status {
        role: s.role,
        accepts_syncs: s.accept_syncs && s.role == Role::Standby,
        last_switchover: s.last_switchover,
        plan: s.plan,
        first_full_sync_done: s.first_full_sync.is_some(),
        first_full_sync: s.first_full_sync,
    })
}

/// Refuses a state directory that lives on a replicated volume.
///
/// `replicated_sources` are the configured volumes (block devices or, for file-backed volumes, regular files).
/// A block device matches when the state directory's filesystem is on it or on one of its partitions; a
/// regular file matches when the state directory is inside it (path prefix) or on a loop device backed by it.
/// A state directory that does not exist yet is judged by its nearest existing ancestor.
pub fn check_state_dir(state_dir: &Path, replicated_sources: &[PathBuf]) -> Result<(), StateError> {
    let mut probe = state_dir.to_path_buf();
    let meta = loop {
        match fs::metadata(&probe) {
            Ok(m) => break m,
            Err(e) if e.kind() == ErrorKind::NotFound && probe.pop() => continue,
            Err(source) => return Err(StateError::Io { action: "inspect", path: probe, source }),
        }
    };
    let dir_canon = fs::canonicalize(&probe).unwrap_or(probe);
    let dev = meta.dev();
    let dev_sys = sysfs_block_path(dev);
    let refuse = |v: &Path| StateError::OnReplicatedVolume { state_dir: state_dir.into(), volume: v.into() };
    for src in replicated_sources {
        let canon = fs::canonicalize(src).unwrap_or_else(|_| src.clone());
        if dir_canon.starts_with(&canon) {
            return Err(refuse(src));
        }
        let Ok(m) = fs::metadata(&canon) else { continue };
        if m.file_type().is_block_device() {
            if m.rdev() == dev {
                return Err(refuse(src));
            }
            // A partition of the replicated disk: its sysfs directory is below the disk's.
            if let (Some(d), Some(s)) = (&dev_sys, sysfs_block_path(m.rdev())) {
                if d.starts_with(&s) {
                    return Err(refuse(src));
                }
            }
        } else if m.file_type().is_file() && loop_devices_backed_by(&canon).contains(&dev) {
            return Err(refuse(src));
        }
    }
    Ok(())
}

fn sysfs_block_path(dev: u64) -> Option<PathBuf> {
    let (maj, min) = (libc::major(dev), libc::minor(dev));
    fs::canonicalize(format!("/sys/dev/block/{maj}:{min}")).ok()
}

/// Device numbers of loop devices whose backing file is `file`.
fn loop_devices_backed_by(file: &Path) -> Vec<u64> {
    let mut out = Vec::new();
    let Ok(rd) = fs::read_dir("/sys/block") else { return out };
    for e in rd.flatten() {
        let base = e.path();
        let Ok(backing) = fs::read_to_string(base.join("loop/backing_file")) else { continue };
        if Path::new(backing.trim_end()) != file {
            continue;
        }
        if let Ok(d) = fs::read_to_string(base.join("dev")) {
            if let Some((a, b)) = d.trim().split_once(':') {
                if let (Ok(a), Ok(b)) = (a.parse(), b.parse()) {
                    out.push(libc::makedev(a, b));
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample() -> RoleState {
        RoleState {
            role: Role::Promoting,
            accept_syncs: false,
            last_switchover: Some(Switchover {
                time: 5,
                reason: "test".into(),
                from: Role::Primary,
                to: Role::Standby,
            }),
            plan: Some(PlanProgress {
                kind: PlanKind::Promote,
                reason: "r".into(),
                started: 7,
                done: vec!["guards".into(), "role-promoting".into()],
                failed: Some(FailedStep { step: "vip".into(), error: "e".into(), time: 8 }),
            }),
            first_full_sync: Some(3),
        }
    }

    #[test]
    fn state_round_trips_through_the_file() {
        let d = tempfile::tempdir().unwrap();
        assert_eq!(load(d.path()).unwrap(), RoleState::default());
        assert!(accepts_syncs(d.path()).unwrap());
        store(d.path(), &sample()).unwrap();
        assert_eq!(load(d.path()).unwrap(), sample());
        assert!(!accepts_syncs(d.path()).unwrap());
        assert!(!d.path().join(".role.state.tmp").exists());
        let st = serde_json::to_value(status(d.path()).unwrap()).unwrap();
        assert_eq!(st["role"], "promoting");
        assert_eq!(st["plan"]["failed"]["step"], "vip");
        assert_eq!(st["first_full_sync_done"], true);
    }

    #[test]
    fn the_lock_serializes_state_updates() {
        let d = tempfile::tempdir().unwrap();
        let held = lock(d.path()).unwrap();
        let dir = d.path().to_path_buf();
        let (tx, rx) = std::sync::mpsc::channel();
        let t = std::thread::spawn(move || {
            mark_first_full_sync(&dir).unwrap();
            tx.send(()).unwrap();
        });
        assert!(rx.recv_timeout(std::time::Duration::from_millis(300)).is_err(), "update ran while locked");
        assert!(load(d.path()).unwrap().first_full_sync.is_none());
        drop(held);
        rx.recv_timeout(std::time::Duration::from_secs(5)).expect("update after unlock");
        t.join().unwrap();
        assert!(load(d.path()).unwrap().first_full_sync.is_some());
    }

    #[test]
    fn damaged_state_is_refused_with_the_path() {
        let d = tempfile::tempdir().unwrap();
        let mut bytes = sample().encode();
        let last = bytes.len() - 2;
        bytes[last] ^= 1;
        fs::write(state_path(d.path()), &bytes).unwrap();
        let e = load(d.path()).unwrap_err();
        assert!(e.to_string().contains("role.state"), "{e}");
        assert!(matches!(e, StateError::Corrupt { ref problem, .. } if problem.contains("checksum")), "{e:?}");
        bytes.truncate(10);
        fs::write(state_path(d.path()), &bytes).unwrap();
        assert!(load(d.path()).is_err());
    }

    proptest! {
        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = RoleState::decode(&bytes);
        }

        #[test]
        fn single_bit_flips_are_detected(pos in 0usize..200, bit in 0u8..8) {
            let mut b = sample().encode();
            let pos = pos % b.len();
            b[pos] ^= 1 << bit;
            // Either rejected, or (a flip inside a header digit that still parses) never silently different.
            if let Ok(s) = RoleState::decode(&b) { prop_assert_eq!(s, sample()); }
        }
    }

    #[test]
    fn state_dir_inside_a_file_volume_path_is_refused() {
        let d = tempfile::tempdir().unwrap();
        let vol = d.path().join("vol");
        fs::create_dir(&vol).unwrap();
        let e = check_state_dir(&vol.join("state/deeper"), std::slice::from_ref(&vol)).unwrap_err();
        assert!(matches!(e, StateError::OnReplicatedVolume { .. }), "{e:?}");
        check_state_dir(&d.path().join("elsewhere"), &[vol]).unwrap();
    }

    #[test]
    fn state_dir_on_the_replicated_block_device_is_refused() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("SKIP state_dir_on_the_replicated_block_device_is_refused: mknod of a block device needs root");
            return;
        }
        let d = tempfile::tempdir().unwrap();
        let dev = fs::metadata(d.path()).unwrap().dev();
        // A device node for the very device the state directory's filesystem is on, and one for another device.
        let same = d.path().join("same");
        let other = d.path().join("other");
        let mk = |p: &Path, dev: u64| {
            nix::sys::stat::mknod(
                p,
                nix::sys::stat::SFlag::S_IFBLK,
                nix::sys::stat::Mode::from_bits_truncate(0o600),
                dev,
            )
        };
        if let Err(e) = mk(&same, dev) {
            eprintln!("SKIP state_dir_on_the_replicated_block_device_is_refused: mknod failed here ({e})");
            return;
        }
        mk(&other, libc::makedev(7, 250)).unwrap();
        let state = d.path().join("state");
        let e = check_state_dir(&state, &[other.clone(), same.clone()]).unwrap_err();
        assert!(e.to_string().contains("same"), "{e}");
        check_state_dir(&state, &[other]).unwrap();
    }
}
