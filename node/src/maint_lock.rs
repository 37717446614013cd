//! The maintenance lock (`blockrep lock NODE` / `blockrep unlock NODE`): while a lock is set on a node, every
//! promote and switchover that involves the locked node is refused there (exit 4), `--force` included. Not to be
//! confused with [`crate::lock`], the sync lock that keeps two syncs from running at once.
//!
//! The locks live in `<state_dir>/maintenance_lock.json`, one entry per locked node name:
//!
//! ```text
//! {"version":1,"locks":{"pbx-a":{"since":1764570000,"by":"alice (sudo, as root)","reason":"kernel update"}}}
//! ```
//!
//! The file is replaced atomically (a temporary file in the state directory, fsynced, renamed over it, then the
//! directory fsynced), under an exclusive `flock` of the state directory so that two `lock` commands do not lose
//! each other's entry. A missing file means no lock; a file that cannot be read or parsed (or of a newer version)
//! means a lock may be set, so role changes are refused and `lock`/`unlock` leave it alone until an operator
//! repairs or removes it: a corrupt file never silently unlocks.
//!
//! Which role changes a lock refuses. A role change on this node involves this node and the primary it takes
//! over; today a node has exactly one peer, so every lock a node holds (its own name or its peer's) involves each
//! of its role changes: `promote` (also when keepalived or Pacemaker run it), `switchover` started here, and the
//! demote a peer's switchover asks of this node ([`crate::roles::demote_for_switchover`]). With several primaries
//! per standby (`[[primary]]` blocks, issue 14) the same file keys locks by primary name: `promote --for P` will
//! be refused by a lock on `P` or on the standby itself, not by a lock on another primary
//! ([`refuse_if_locked`] with `Some(P)`), without a format change.
//!
//! Not refused: the operator's own `demote` (it is how maintenance of a primary starts: the service stops here
//! and nothing is taken over, since the standby's promote is what the lock refuses), and a `promote` of a node
//! that already is primary with no plan in progress (it only re-asserts the virtual IP, for example after a
//! reboot of the primary under maintenance: no role changes).
//!
//! A lock is local to the node where it is set: it is not sent to the peer, which may be the node that goes down
//! for maintenance. To keep the service where it is, lock the standby (the node that would take over); a lock on
//! the primary only refuses the switchovers it is asked for.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};

use crate::config::Config;
use crate::history::{self, Event};
use crate::{Error, ErrorKind};

/// The lock file's name in the state directory.
pub const FILE: &str = "maintenance_lock.json";
/// The file format version this build reads and writes.
pub const VERSION: u32 = 1;
/// The longest reason accepted (bytes).
pub const MAX_REASON: usize = 1024;
/// The longest file read (a lock file is a few hundred bytes per lock).
const MAX_FILE: u64 = 1 << 20;
/// How long `lock` waits for the peer when it asks its name.
const PEER_TIMEOUT: Duration = Duration::from_secs(2);

/// Errors of the maintenance lock.
#[derive(Debug, thiserror::Error)]
pub enum MaintLockError {
    /// A lock involving the role change is set (refused as unsafe).
    #[error(
        "refusing to {action}: node {node} is locked for maintenance on {here}, set by {} {}, reason: {}; \
         --force does not override a maintenance lock: when the maintenance is over, run `blockrep unlock {node}` \
         on {here}",
        entry.by, crate::text::ago(entry.since), entry.reason
    )]
    Locked {
        /// The role change refused ("promote", "switch over", ...).
        action: String,
        /// The locked node.
        node: String,
        /// Its lock.
        entry: Box<LockEntry>,
        /// The node holding the lock (this node).
        here: String,
    },
    /// The lock file cannot be read or parsed: a lock may be set (refused as unsafe).
    #[error(
        "the maintenance lock file {} cannot be read ({why}): a lock may be set, so promote and switchover are \
         refused and lock/unlock leave the file alone; look at it, then repair it or, if no node should be locked, \
         remove it",
        path.display()
    )]
    Unreadable {
        /// The lock file.
        path: PathBuf,
        /// What is wrong with it.
        why: String,
    },
    /// The node named is neither this node nor its peer (a usage error).
    #[error("node {node:?} is not known on {here}: lock this node or its peer by name ({})", known.join(", "))]
    UnknownNode {
        /// The name given.
        node: String,
        /// This node's name.
        here: String,
        /// The names this node knows.
        known: Vec<String>,
    },
    /// The reason is too long (a usage error).
    #[error("--reason is {len} bytes long; at most {MAX_REASON} are kept")]
    ReasonTooLong {
        /// Its length.
        len: usize,
    },
    /// The lock file could not be written.
    #[error("cannot write the maintenance lock file {}", path.display())]
    Io {
        /// The file (or its directory).
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

impl MaintLockError {
    /// The kind of this error: a lock, or a lock file that cannot be read, refuses as unsafe.
    pub fn kind(&self) -> ErrorKind {
        match self {
            MaintLockError::Locked { .. } | MaintLockError::Unreadable { .. } => ErrorKind::Unsafe,
            MaintLockError::UnknownNode { .. } | MaintLockError::ReasonTooLong { .. } => ErrorKind::Usage,
            MaintLockError::Io { .. } => ErrorKind::Failed,
        }
    }
}

/// One lock: who set it, when and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LockEntry {
    /// Unix seconds it was set.
    pub since: u64,
    /// Who set it (user name; with sudo, the invoking user).
    pub by: String,
    /// The reason given (`--reason`).
    pub reason: String,
}

/// A lock with its node, as `status` and `lock` report it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MaintLock {
    /// The locked node (today this node or its peer; with several primaries, a primary's name).
    pub node: String,
    /// Who, when, why.
    #[serde(flatten)]
    pub entry: LockEntry,
}

/// The file's content.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct LockFile {
    version: u32,
    locks: BTreeMap<String, LockEntry>,
}

/// The lock file of this node.
pub fn path(cfg: &Config) -> PathBuf {
    cfg.node_state_dir().join(FILE)
}

/// Reads the locks in `path` (none when the file does not exist).
pub fn read_at(path: &Path) -> Result<BTreeMap<String, LockEntry>, MaintLockError> {
    let bad = |why: String| MaintLockError::Unreadable { path: path.to_owned(), why };
    let f = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(BTreeMap::new()),
        Err(e) => return Err(bad(e.to_string())),
    };
    let mut bytes = Vec::new();
    std::io::Read::read_to_end(&mut std::io::Read::take(f, MAX_FILE + 1), &mut bytes)
        .map_err(|e| bad(e.to_string()))?;
    if bytes.len() as u64 > MAX_FILE {
        return Err(bad(format!("larger than {MAX_FILE} bytes")));
    }
    // Only the version first, so that a newer file is named as such rather than as malformed.
    #[derive(Deserialize)]
    struct Version {
        version: u32,
    }
    let v: Version = serde_json::from_slice(&bytes).map_err(|e| bad(format!("not a lock file: {e}")))?;
    if v.version != VERSION {
        return Err(bad(format!("version {} (this blockrep reads version {VERSION})", v.version)));
    }
    let file: LockFile = serde_json::from_slice(&bytes).map_err(|e| bad(format!("not a lock file: {e}")))?;
    Ok(file.locks)
}

/// Replaces the file at `path` with `locks`, atomically (see the module docs); no lock removes the file.
fn write_at(path: &Path, locks: &BTreeMap<String, LockEntry>) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    if locks.is_empty() {
        match std::fs::remove_file(path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
    } else {
        let file = LockFile { version: VERSION, locks: locks.clone() };
        let mut text = serde_json::to_vec_pretty(&file).map_err(std::io::Error::other)?;
        text.push(b'\n');
        let tmp = dir.join(format!(".{FILE}.tmp.{}", std::process::id()));
        let r = (|| {
            let mut f = File::create(&tmp)?;
            f.write_all(&text)?;
            f.sync_all()?;
            std::fs::rename(&tmp, path)
        })();
        if r.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        r?;
    }
    File::open(dir)?.sync_all()
}

/// Runs `f` on the locks under an exclusive `flock` of the state directory and writes what it returns (`Some`).
fn update<T>(
    cfg: &Config,
    f: impl FnOnce(&mut BTreeMap<String, LockEntry>) -> Result<(T, bool), MaintLockError>,
) -> Result<T, MaintLockError> {
    let path = path(cfg);
    let state_dir = cfg.node_state_dir();
    let io = |source| MaintLockError::Io { path: state_dir.to_owned(), source };
    std::fs::create_dir_all(state_dir).map_err(io)?;
    let dir = File::open(state_dir).map_err(io)?;
    let _held = Flock::lock(dir, FlockArg::LockExclusive).map_err(|(_, e)| io(e.into()))?;
    let mut locks = read_at(&path)?;
    let (out, changed) = f(&mut locks)?;
    if changed {
        write_at(&path, &locks).map_err(|source| MaintLockError::Io { path: path.clone(), source })?;
    }
    Ok(out)
}

/// The locks set on this node, by node name.
pub fn locks(cfg: &Config) -> Result<Vec<MaintLock>, MaintLockError> {
    Ok(read_at(&path(cfg))?.into_iter().map(|(node, entry)| MaintLock { node, entry }).collect())
}

/// Refuses (`Err`) a role change of this node, `action` ("promote", ...), while a lock involving it is set, or
/// while the lock file cannot be read. The change involves this node and `primary`, the primary it takes over;
/// `None`: every primary this node protects, which today is its one peer, so that every lock refuses. A refusal
/// is recorded in the history (the caller reports the error).
pub fn refuse_if_locked(cfg: &Config, action: &str, primary: Option<&str>) -> Result<(), MaintLockError> {
    // A protected primary's configuration: the role change involves that primary only.
    let primary = primary.or(crate::protect::node_of(cfg));
    let refusal = match read_at(&path(cfg)) {
        Ok(locks) => {
            let hit = locks.into_iter().find(|(n, _)| *n == cfg.node || primary.is_none_or(|p| n == p));
            match hit {
                None => return Ok(()),
                Some((node, entry)) => MaintLockError::Locked {
                    action: action.to_owned(),
                    node,
                    entry: Box::new(entry),
                    here: cfg.node.clone(),
                },
            }
        }
        Err(e) => e,
    };
    let node = match &refusal {
        MaintLockError::Locked { node, .. } => node.clone(),
        _ => String::new(),
    };
    history::append(cfg, Event::LockRefused { node, action: action.to_owned() });
    Err(refusal)
}

/// What `blockrep lock` did.
#[derive(Debug, Clone, Serialize)]
pub struct Locked {
    /// The lock (the existing one when `already`).
    #[serde(flatten)]
    pub lock: MaintLock,
    /// The node holding it (this node).
    pub here: String,
    /// The node was locked already: its lock is unchanged.
    pub already: bool,
    /// A warning for the operator (the lock is set on a primary, whose standby can still promote).
    pub warning: Option<String>,
}

/// What `blockrep unlock` did.
#[derive(Debug, Clone, Serialize)]
pub struct Unlocked {
    /// The node named.
    pub node: String,
    /// The node holding the lock (this node).
    pub here: String,
    /// The lock removed (`None`: the node was not locked).
    pub removed: Option<LockEntry>,
}

/// `blockrep lock NODE`: sets a maintenance lock on this node for `node` (this node's name or its peer's). A
/// node locked already keeps its lock (who, when and why) unchanged.
pub fn lock(cfg: &Config, node: &str, reason: &str) -> Result<Locked, Error> {
    if reason.len() > MAX_REASON {
        return Err(MaintLockError::ReasonTooLong { len: reason.len() }.into());
    }
    check_known(cfg, node, &[])?;
    let by = who();
    let (entry, already) = update(cfg, |locks| {
        if let Some(e) = locks.get(node) {
            return Ok(((e.clone(), true), false));
        }
        let e = LockEntry { since: history::now(), by: by.clone(), reason: reason.to_owned() };
        locks.insert(node.to_owned(), e.clone());
        Ok(((e, false), true))
    })?;
    if !already {
        tracing::info!(node, by = %entry.by, reason = %entry.reason, "maintenance lock set: promote and switchover refused");
        history::append(cfg, Event::Lock { node: node.to_owned(), by: entry.by.clone(), reason: entry.reason.clone() });
    }
    let primary = role::status(cfg.layout().role_dir()).is_ok_and(|s| s.role == role::Role::Primary);
    let warning = primary.then(|| {
        format!(
            "{} is primary: this lock refuses the switchovers it is asked for, but a lock is not sent to the peer, \
             so the standby can still promote (for example when this node reboots for its maintenance); lock it on \
             the standby too (`blockrep lock {node}` there)",
            cfg.node
        )
    });
    Ok(Locked { lock: MaintLock { node: node.to_owned(), entry }, here: cfg.node.clone(), already, warning })
}

/// `blockrep unlock NODE`: removes this node's lock for `node`; a known node that is not locked is no error.
pub fn unlock(cfg: &Config, node: &str) -> Result<Unlocked, Error> {
    let locked: Vec<String> = read_at(&path(cfg))?.into_keys().collect();
    if !locked.iter().any(|n| n == node) {
        check_known(cfg, node, &locked)?;
    }
    let removed = update(cfg, |locks| {
        let r = locks.remove(node);
        let changed = r.is_some();
        Ok((r, changed))
    })?;
    if let Some(e) = &removed {
        tracing::info!(node, since = e.since, "maintenance lock removed: promote and switchover allowed again");
        history::append(cfg, Event::Unlock { node: node.to_owned(), by: who(), reason: e.reason.clone() });
    }
    Ok(Unlocked { node: node.to_owned(), here: cfg.node.clone(), removed })
}

/// A usage error unless `node` is this node or its peer (see [`known_nodes`]); `also`: more names to list.
fn check_known(cfg: &Config, node: &str, also: &[String]) -> Result<(), MaintLockError> {
    let mut known = known_nodes(cfg);
    if known.iter().any(|n| n == node) {
        return Ok(());
    }
    // Only then the network: the peer's name as it reports it.
    let peer = peer_names(cfg);
    if peer.iter().any(|n| n == node) {
        return Ok(());
    }
    for n in peer.iter().chain(also) {
        if !known.contains(n) {
            known.push(n.clone());
        }
    }
    Err(MaintLockError::UnknownNode { node: node.to_owned(), here: cfg.node.clone(), known })
}

/// The node names this node knows, without asking the network: its own, `[monitoring] standby_node`, and the
/// nodes named in its generation records (the primary that synced each shadow, the nodes recorded on the
/// primary side). `lock` also accepts the name the peer reports over the protocol.
pub fn known_nodes(cfg: &Config) -> Vec<String> {
    let mut names = vec![cfg.node.clone()];
    let mut add = |n: &str| {
        if !n.is_empty() && !names.iter().any(|m| m == n) {
            names.push(n.to_owned());
        }
    };
    cfg.primary_names().into_iter().for_each(&mut add);
    if let Some(n) = &cfg.monitoring.standby_node {
        add(n);
    }
    let layout = cfg.layout();
    for v in &cfg.volumes {
        if v.source.is_some() {
            let g =
                engine::generations::read_source(&engine::generations::source_path(&layout.source_manifest(&v.name)));
            g.history.all().iter().for_each(|r| add(&r.node));
        }
        let Some(shadow) = &v.shadow else { continue };
        let dir = layout.side_dir(crate::layout::Side::Standby, &v.name);
        if !(shadow.exists() && dir.exists()) {
            continue;
        }
        let opts = engine::target::TargetOptions::new(&v.name, Default::default());
        if let Ok(t) = crate::verify::open_target(shadow, &dir, opts) {
            t.info().history.iter().for_each(|r| add(&r.node));
        }
    }
    names
}

/// The name the peer reports over the protocol, from each configured peer address that answers in time.
fn peer_names(cfg: &Config) -> Vec<String> {
    let Ok(key) = netproto::load_key(&cfg.key_file) else { return Vec::new() };
    let mut addrs: Vec<&str> = cfg.peer.iter().chain(cfg.standby_peer.iter()).map(String::as_str).collect();
    addrs.dedup();
    let ask = |addr: &str| -> Option<String> {
        let mut conn = netproto::connect(addr, &key, &cfg.node, PEER_TIMEOUT).ok()?;
        conn.set_timeout(Some(PEER_TIMEOUT)).ok()?;
        conn.send(&netproto::Message::RoleReq).ok()?;
        match conn.recv_expect("the peer's role").ok()? {
            netproto::Message::RoleInfo(r) => Some(r.node),
            _ => None,
        }
    };
    addrs.into_iter().filter_map(ask).collect()
}

/// Who runs this command: the user name, and with sudo the user who ran sudo.
fn who() -> String {
    let uid = nix::unistd::getuid();
    let name = nix::unistd::User::from_uid(uid).ok().flatten().map_or_else(|| format!("uid {uid}"), |u| u.name);
    match std::env::var("SUDO_USER") {
        Ok(s) if !s.is_empty() && s != name => format!("{s} (sudo, as {name})"),
        _ => name,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(dir: &Path) -> Config {
        let text = format!(
            "node = \"b\"\nkey_file = \"/nonexistent/k\"\nstate_dir = {:?}\n[monitoring]\nstandby_node = \"b\"\n\
             [[volume]]\nname = \"v\"\nshadow = {:?}\n",
            dir.join("state"),
            dir.join("shadow.img")
        );
        Config::parse(&text, Path::new("c.toml")).unwrap()
    }

    #[test]
    fn locks_round_trip_through_the_file_and_the_history() {
        let d = tempfile::tempdir().unwrap();
        let cfg = config(d.path());
        assert!(locks(&cfg).unwrap().is_empty());
        refuse_if_locked(&cfg, "promote", None).unwrap();

        let l = lock(&cfg, "b", "kernel update").unwrap();
        assert!(!l.already);
        assert_eq!(l.lock.entry.reason, "kernel update");
        assert!(l.lock.entry.since > 0 && !l.lock.entry.by.is_empty());
        // Read back from the file, as a restarted process would.
        let got = read_at(&path(&cfg)).unwrap();
        assert_eq!(got.get("b"), Some(&l.lock.entry));
        assert_eq!(locks(&cfg).unwrap(), vec![l.lock.clone()]);

        // Locking again keeps the first lock's who, when and why.
        let again = lock(&cfg, "b", "another reason").unwrap();
        assert!(again.already);
        assert_eq!(again.lock.entry, l.lock.entry);

        let e = refuse_if_locked(&cfg, "promote", None).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Unsafe);
        let msg = e.to_string();
        assert!(msg.contains("refusing to promote") && msg.contains("kernel update"), "{msg}");
        assert!(msg.contains("--force does not override") && msg.contains("blockrep unlock b"), "{msg}");

        let u = unlock(&cfg, "b").unwrap();
        assert_eq!(u.removed, Some(l.lock.entry));
        assert!(!path(&cfg).exists(), "no lock left: the file is removed");
        refuse_if_locked(&cfg, "promote", None).unwrap();
        assert_eq!(unlock(&cfg, "b").unwrap().removed, None, "unlocking an unlocked node is no error");

        let events: Vec<_> = history::read(&cfg, 0).into_iter().map(|e| e.event).collect();
        assert!(matches!(&events[0], Event::Lock { node, reason, .. } if node == "b" && reason == "kernel update"));
        assert!(matches!(&events[1], Event::LockRefused { node, action } if node == "b" && action == "promote"));
        assert!(matches!(&events[2], Event::Unlock { node, .. } if node == "b"));
        assert_eq!(events.len(), 3, "{events:?}");
    }

    #[test]
    fn a_lock_is_keyed_by_node_so_a_primary_named_later_is_told_apart() {
        let d = tempfile::tempdir().unwrap();
        let cfg = config(d.path());
        let mut locks = BTreeMap::new();
        let e = LockEntry { since: 1, by: "root".into(), reason: "r".into() };
        locks.insert("p1".to_string(), e.clone());
        std::fs::create_dir_all(&cfg.state_dir).unwrap();
        write_at(&path(&cfg), &locks).unwrap();
        // Today (None: every primary of this node) any lock refuses; keyed by primary, only its own does.
        assert!(refuse_if_locked(&cfg, "promote", None).is_err());
        assert!(refuse_if_locked(&cfg, "promote", Some("p1")).is_err());
        refuse_if_locked(&cfg, "promote", Some("p2")).unwrap();
        // A lock on the standby itself involves every primary.
        locks.insert("b".to_string(), e);
        write_at(&path(&cfg), &locks).unwrap();
        assert!(refuse_if_locked(&cfg, "promote", Some("p2")).is_err());
    }

    #[test]
    fn a_corrupt_lock_file_refuses_and_is_left_alone() {
        let d = tempfile::tempdir().unwrap();
        let cfg = config(d.path());
        std::fs::create_dir_all(&cfg.state_dir).unwrap();
        let good =
            format!("{{\"version\":{VERSION},\"locks\":{{\"b\":{{\"since\":5,\"by\":\"x\",\"reason\":\"y\"}}}}}}");
        let cases: [(&[u8], &str); 6] = [
            (b"", "not a lock file"),
            (b"garbage", "not a lock file"),
            (&good.as_bytes()[..good.len() - 9], "not a lock file"),
            (b"{\"version\":2,\"locks\":{}}", "version 2"),
            (b"{\"version\":1,\"locks\":{\"b\":{\"since\":\"soon\"}}}", "not a lock file"),
            (b"{\"version\":1}", "not a lock file"),
        ];
        for (bytes, why) in cases {
            std::fs::write(path(&cfg), bytes).unwrap();
            let e = refuse_if_locked(&cfg, "promote", None).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::Unsafe, "{e}");
            assert!(e.to_string().contains(why), "{why}: {e}");
            assert!(e.to_string().contains("a lock may be set"), "{e}");
            // Neither lock nor unlock rewrites it (unlocking would silently drop a lock it cannot read).
            let le = lock(&cfg, "b", "r").unwrap_err();
            assert_eq!(le.kind(), ErrorKind::Unsafe, "{le}");
            assert_eq!(unlock(&cfg, "b").unwrap_err().kind(), ErrorKind::Unsafe);
            assert_eq!(std::fs::read(path(&cfg)).unwrap(), bytes, "the file is untouched");
            assert!(locks(&cfg).is_err());
        }
        std::fs::write(path(&cfg), &good).unwrap();
        assert_eq!(locks(&cfg).unwrap()[0].entry.since, 5);
    }

    #[test]
    fn the_file_is_replaced_by_rename_never_rewritten_in_place() {
        let d = tempfile::tempdir().unwrap();
        let cfg = config(d.path());
        lock(&cfg, "b", "first").unwrap();
        let old = std::fs::read(path(&cfg)).unwrap();
        // A reader that opened the file before the update keeps reading the complete old content.
        let mut reader = File::open(path(&cfg)).unwrap();
        // A writer that crashed before its rename left a temporary file: it changes nothing.
        let leftover = cfg.state_dir.join(format!(".{FILE}.tmp.1"));
        std::fs::write(&leftover, b"{\"version\":1,\"locks\":{}}").unwrap();
        assert_eq!(locks(&cfg).unwrap().len(), 1);

        unlock(&cfg, "b").unwrap();
        lock(&cfg, "b", "second, a longer reason than the first one").unwrap();
        let mut seen = Vec::new();
        std::io::Read::read_to_end(&mut reader, &mut seen).unwrap();
        assert_eq!(seen, old, "the old file was not truncated or rewritten");
        assert_eq!(locks(&cfg).unwrap()[0].entry.reason, "second, a longer reason than the first one");
        // No temporary file of ours is left behind.
        let ours = format!(".{FILE}.tmp.{}", std::process::id());
        assert!(!cfg.state_dir.join(ours).exists());
    }

    #[test]
    fn unknown_names_are_usage_errors_listing_the_known_ones() {
        let d = tempfile::tempdir().unwrap();
        let cfg = config(d.path());
        let e = lock(&cfg, "nobody", "r").unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Usage);
        assert!(e.to_string().contains("\"nobody\"") && e.to_string().contains("(b)"), "{e}");
        assert!(!path(&cfg).exists());
        assert_eq!(unlock(&cfg, "nobody").unwrap_err().kind(), ErrorKind::Usage);
        let e = lock(&cfg, "b", &"x".repeat(MAX_REASON + 1)).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Usage);
        // A name that is locked can always be unlocked, known or not (a renamed peer).
        let mut locks = BTreeMap::new();
        locks.insert("old-name".to_string(), LockEntry { since: 1, by: "root".into(), reason: "r".into() });
        std::fs::create_dir_all(&cfg.state_dir).unwrap();
        write_at(&path(&cfg), &locks).unwrap();
        assert!(unlock(&cfg, "old-name").unwrap().removed.is_some());
    }
}
