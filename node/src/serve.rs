//! The standby daemon (`blockrep serve`).
//!
//! Connections are accepted and timed on a small tokio runtime; each one's handshake and session run on a blocking
//! thread (the data path, hashing, spool and apply, stays synchronous), through [`netproto::serve_session`], which
//! drives the volume's [`Target`] with the requests it receives (the same calls a local sync makes).
//!
//! Limits, so that nobody without the key can make the daemon hold memory or threads:
//! - at most [`MAX_HANDSHAKES`] connections in the handshake (further ones wait in the kernel's listen backlog
//!   until a slot frees) and [`MAX_CONNECTIONS`] in total (further ones are closed at once, with one log line per
//!   burst);
//! - frames before authentication are capped by netproto at a few KiB;
//! - the whole handshake must finish within [`HANDSHAKE_DEADLINE`] (one deadline, not one per read).
//!
//! After authentication a session that receives nothing for the configured idle timeout (`[standby]
//! idle_timeout_s`, default [`DEFAULT_IDLE_TIMEOUT`]) ends: its volume is released and its spool kept for resume.
//! TCP keepalive finds peers that vanished without a reset sooner. A primary that is scanning sends keepalive frames.
//!
//! Before accepting anything, [`run`] holds every shadow exclusively while the node is a standby (`O_EXCL` on
//! block devices, so they cannot be mounted; an exclusive `flock` on files, so a second `serve` refuses), and
//! releases them within a quarter second of the node becoming primary; within a quarter second of it being a
//! standby again (a demote) it holds them again, and a shadow created while it runs (`blockrep shadow create`)
//! is held from then on (at the latest when a sync opens it). Before that, [`run`] rolls every
//! committed spool forward ([`crate::shadow::roll_forward`]), so a shadow is never left
//! half-applied after a crash until some sync happens to open it. Two concurrent syncs of one volume are refused.
//! With `[standby] verify_every`, a thread at the lowest CPU and I/O priority re-hashes each held shadow against
//! its committed generation at that interval ([`crate::verify::verify_shadow`]); it marks its volume busy like a
//! sync, and a sync that arrives for that volume stops it (it runs again later).
//! [`Stopper::stop`] (SIGTERM/SIGINT) stops accepting, cuts the read side of every connection (a transfer stops
//! between two frames, with its spool durable for resume, while a commit in progress finishes), tells each peer
//! that the standby is shutting down, and [`Server::run`] returns once every connection has ended.

use std::collections::{HashMap, HashSet};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use engine::target::{Target, TargetOptions};
use link::{BeginAck, BeginPlan, BlockHash, CommitAck, Extent, LinkError, TargetInfo, TargetLink};
use netproto::message::{self as m, code};
use netproto::{ConnError, Refusal, SessionError};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tracing::{debug, info, warn};

use crate::config::{Config, ConfigError};
use crate::layout::Side;
use crate::roles;
use crate::{Error, ErrorKind};

/// Most connections in the handshake at once.
pub const MAX_HANDSHAKES: usize = 16;
/// Most connections at once (handshake and sessions).
pub const MAX_CONNECTIONS: usize = 64;
/// Time a connection has to complete the whole handshake.
pub const HANDSHAKE_DEADLINE: Duration = Duration::from_secs(10);
/// Idle timeout of an authenticated session unless configured.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// How often `serve` checks whether the node became primary (then it releases the shadows it holds).
const HOLD_CHECK: Duration = Duration::from_millis(250);
/// How long a sync waits for a periodic verify of its volume to stop.
const PREEMPT_WAIT: Duration = Duration::from_secs(10);
/// Refused connections are summed up in one log line per this interval.
const REFUSAL_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// Errors of the standby daemon.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The listen address could not be bound.
    #[error("cannot listen on {addr}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The listening socket failed.
    #[error("the listening socket failed")]
    Listener(#[source] std::io::Error),
    /// The async runtime could not be started.
    #[error("cannot start the daemon's runtime")]
    Runtime(#[source] std::io::Error),
    /// A shadow is in use by another process (mounted, opened exclusively, or held by another `serve`).
    #[error(
        "volume {volume}: the shadow {} is in use by another process ({why}); `serve` holds every shadow \
         exclusively so that nothing else can write it: unmount it, or stop the other `blockrep serve`",
        shadow.display()
    )]
    ShadowInUse {
        /// Volume name.
        volume: String,
        /// The shadow.
        shadow: std::path::PathBuf,
        /// What the kernel said.
        why: String,
    },
}

impl ServeError {
    /// The kind of this error.
    pub fn kind(&self) -> ErrorKind {
        match self {
            ServeError::ShadowInUse { .. } => ErrorKind::Unsafe,
            _ => ErrorKind::Failed,
        }
    }
}

/// One shadow held for the daemon's lifetime so that nothing else writes it unnoticed: a block device open with
/// `O_EXCL` (the kernel then refuses to mount it or open it exclusively elsewhere), a regular file under an
/// exclusive `flock` (another `serve` refuses; a writer that ignores the lock still changes the evidence the
/// target recorded at its last commit, so the next sync compares).
#[derive(Debug)]
enum Hold {
    /// A block device open with `O_EXCL`.
    Device(std::fs::File),
    /// A regular file under an exclusive flock.
    File(nix::fcntl::Flock<std::fs::File>),
}

impl Hold {
    /// Whether the held file is still the one at `path` (a file shadow deleted and created again is another
    /// file, to be held anew).
    fn is(&self, path: &std::path::Path) -> bool {
        use std::os::unix::fs::MetadataExt;
        let file: &std::fs::File = match self {
            Hold::Device(f) => f,
            Hold::File(l) => l,
        };
        match (file.metadata(), std::fs::metadata(path)) {
            (Ok(a), Ok(b)) => (a.dev(), a.ino(), a.rdev()) == (b.dev(), b.ino(), b.rdev()),
            _ => false,
        }
    }
}

/// Opens one shadow exclusively (see [`Hold`]); `Ok(None)`: it does not exist (yet) or is neither a block device
/// nor a regular file.
fn hold_shadow(volume: &str, shadow: &std::path::Path) -> Result<Option<Hold>, ServeError> {
    use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
    let in_use = |why: String| ServeError::ShadowInUse { volume: volume.into(), shadow: shadow.into(), why };
    let Ok(meta) = std::fs::metadata(shadow) else { return Ok(None) }; // created later by `shadow create`
    if meta.file_type().is_block_device() {
        let f = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_EXCL)
            .open(shadow)
            .map_err(|e| in_use(e.to_string()))?;
        return Ok(Some(Hold::Device(f)));
    }
    if meta.is_file() {
        let f = std::fs::File::open(shadow).map_err(|e| in_use(e.to_string()))?;
        return match nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusiveNonblock) {
            Ok(l) => Ok(Some(Hold::File(l))),
            Err((_, e)) => Err(in_use(format!("locked: {e}"))),
        };
    }
    Ok(None)
}

/// Opens every configured, existing shadow of `unit` exclusively (see [`Hold`]) into `holds`, by [`vol_key`].
fn hold_shadows(unit: &Config, holds: &mut HashMap<String, Hold>) -> Result<(), Error> {
    for v in &unit.volumes {
        let Some(shadow) = &v.shadow else { continue };
        if let Some(h) = hold_shadow(&v.name, shadow)? {
            holds.insert(vol_key(unit, &v.name), h);
        }
    }
    Ok(())
}

/// What `serve` serves: the node's own configuration, or with `[[primary]]` blocks one configuration per
/// protected primary ([`Config::for_primary`]).
fn units(cfg: &Config) -> Vec<Config> {
    if cfg.primaries.is_empty() {
        vec![cfg.clone()]
    } else {
        cfg.primaries.clone()
    }
}

/// A unit's name in logs and maps ("" for a two-node pair's configuration).
fn unit_name(unit: &Config) -> &str {
    crate::protect::node_of(unit).unwrap_or("")
}

/// The key of one volume of one unit in the daemon's maps (two primaries may use the same volume name).
fn vol_key(unit: &Config, volume: &str) -> String {
    match crate::protect::node_of(unit) {
        Some(p) => format!("{p}/{volume}"),
        None => volume.to_owned(),
    }
}

/// The keys `serve` accepts: the node's key file, or with `[[primary]]` blocks each primary's own key file for
/// that primary only (a primary authenticates with its key, so it can open only its own volumes). Read again at
/// every handshake, so a next key copied in while `serve` runs is used at once.
#[derive(Debug)]
enum ServeKeys {
    /// A two-node pair: one key file.
    One(netproto::KeyFile),
    /// One key file per protected primary.
    ByPrimary {
        /// This standby.
        standby: String,
        /// (primary node, its key file).
        files: Vec<(String, std::path::PathBuf)>,
    },
}

impl netproto::KeyStore for ServeKeys {
    fn keys_for(&self, peer_node: &str) -> Result<netproto::KeySet, netproto::KeyError> {
        match self {
            ServeKeys::One(k) => k.keys_for(peer_node),
            ServeKeys::ByPrimary { standby, files } => match files.iter().find(|(n, _)| n == peer_node) {
                Some((_, path)) => netproto::KeySet::load(path),
                None => Err(netproto::KeyError::UnknownPeer {
                    peer: peer_node.to_owned(),
                    standby: standby.clone(),
                    known: files.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>().join(", "),
                }),
            },
        }
    }
}

/// Shared state of the daemon.
#[derive(Debug)]
struct Shared {
    cfg: Config,
    /// What it serves ([`units`]): the node's configuration, or one per protected primary.
    units: Vec<Config>,
    /// The key files, read again at each handshake ([`ServeKeys`]).
    keys: ServeKeys,
    io: engine::volume::IoOptions,
    busy: Arc<Mutex<HashSet<String>>>,
    /// A clone of every open connection's socket, so that a stop can cut its read side.
    streams: Mutex<HashMap<u64, TcpStream>>,
    stopping: AtomicBool,
    stop: Notify,
    /// The shadows held exclusively while this node is a standby ([`hold_shadows`]), by [`vol_key`]; released
    /// when it becomes primary (for that primary), so that a promote can mount them, and taken again when it is a
    /// standby again or a shadow appears ([`Shared::hold_missing`]).
    holds: Mutex<HashMap<String, Hold>>,
    /// The volumes whose shadow could not be held, so that this is logged once until it changes.
    hold_failed: Mutex<HashSet<String>>,
    /// The units ([`unit_name`]) that accepted syncs at the last hold check (the periodic verify runs only then).
    standby: Mutex<HashSet<String>>,
    /// The primaries this standby acted for at the last hold check (`None`: not looked yet).
    acting: Mutex<Option<Vec<String>>>,
    /// The volume whose periodic verify runs now, and the flag that stops it (a sync of it preempts it).
    verifying: Mutex<Option<(String, Arc<AtomicBool>)>>,
    next_id: AtomicU64,
    handshakes: Arc<Semaphore>,
    connections: Arc<Semaphore>,
}

impl Shared {
    /// Holds the shadow of `volume` if it exists and is not held yet. A shadow in use by another process is
    /// logged (once until that changes) and tried again at the next check: the evidence recorded at each commit
    /// still shows writes made meanwhile.
    fn hold(&self, unit: &Config, volume: &str, shadow: &std::path::Path) {
        let key = vol_key(unit, volume);
        if self.holds.lock().expect("lock").get(&key).is_some_and(|h| h.is(shadow)) {
            return;
        }
        self.holds.lock().expect("lock").remove(&key); // gone or replaced: release the old file
        match hold_shadow(volume, shadow) {
            Ok(Some(h)) => {
                info!(volume = %key, shadow = %shadow.display(), "holding the shadow exclusively");
                self.holds.lock().expect("lock").insert(key.clone(), h);
                self.hold_failed.lock().expect("lock").remove(&key);
            }
            Ok(None) => {}
            Err(e) => {
                if self.hold_failed.lock().expect("lock").insert(key) {
                    warn!("{e}; trying again every {} ms", HOLD_CHECK.as_millis());
                }
            }
        }
    }

    /// Holds every configured shadow that exists and is not held yet (after a demote, or a shadow created after
    /// the start).
    fn hold_missing(&self, unit: &Config) {
        for v in &unit.volumes {
            if let Some(shadow) = &v.shadow {
                self.hold(unit, &v.name, shadow);
            }
        }
    }

    /// The periodic hold check, per unit: a standby holds every shadow, a primary (or a standby acting for that
    /// primary) none of that unit's (and stops a verify of them).
    fn check_holds(&self) {
        for unit in &self.units {
            let name = unit_name(unit);
            let keys: Vec<String> = unit.volumes.iter().map(|v| vol_key(unit, &v.name)).collect();
            if roles::refuses_syncs(unit).is_some() {
                self.standby.lock().expect("lock").remove(name);
                if let Some((v, stop)) = &*self.verifying.lock().expect("lock") {
                    if keys.contains(v) {
                        stop.store(true, Ordering::SeqCst);
                    }
                }
                let mut h = self.holds.lock().expect("lock");
                if keys.iter().any(|k| h.contains_key(k)) {
                    match crate::protect::node_of(unit) {
                        Some(p) => info!("this standby acts for primary {p}: releasing the shadows it held for it"),
                        None => info!("this node is no longer a standby: releasing the shadows it held"),
                    }
                    for k in &keys {
                        h.remove(k);
                    }
                }
                let mut failed = self.hold_failed.lock().expect("lock");
                for k in &keys {
                    failed.remove(k);
                }
            } else {
                self.standby.lock().expect("lock").insert(name.to_owned());
                self.hold_missing(unit);
            }
        }
        if !self.cfg.primaries.is_empty() {
            // The unprotected alarms follow which primaries this standby acts for: judged when that changes.
            let acting = crate::protect::acting(&self.cfg);
            let mut last = self.acting.lock().expect("lock");
            if last.as_ref() != Some(&acting) {
                crate::alarms::update(&self.cfg, &crate::protect::judge_unprotected(&self.cfg));
                *last = Some(acting);
            }
        }
    }

    /// Whether `unit` accepted syncs at the last hold check.
    fn is_standby(&self, unit: &Config) -> bool {
        self.standby.lock().expect("lock").contains(unit_name(unit))
    }

    /// Marks `volume` (a [`vol_key`]) busy for a sync. A periodic verify of it is stopped first (it has the lowest
    /// priority); `false`: another sync holds it.
    fn mark_busy(&self, volume: &str) -> bool {
        if self.busy.lock().expect("lock").insert(volume.to_owned()) {
            return true;
        }
        let verifying = self.verifying.lock().expect("lock").clone();
        let Some((_, stop)) = verifying.filter(|(v, _)| v == volume) else { return false };
        stop.store(true, Ordering::SeqCst);
        let t = Instant::now();
        while t.elapsed() < PREEMPT_WAIT {
            std::thread::sleep(Duration::from_millis(10));
            if self.busy.lock().expect("lock").insert(volume.to_owned()) {
                info!(volume, "a sync arrived: the periodic verify of this volume stopped and runs again later");
                return true;
            }
        }
        false
    }
}

/// The periodic verify (`[standby] verify_every`): on its own thread, at the lowest priority while it reads,
/// every held shadow whose interval has passed is re-hashed against its committed generation
/// ([`crate::verify::verify_shadow`]), never while a sync of it runs; a sync that arrives stops it.
fn scrub(shared: &Shared, every: Duration) {
    info!(every = %crate::schedule::format_duration(every), "periodic verify of the held shadows enabled");
    while !shared.stopping.load(Ordering::SeqCst) {
        std::thread::sleep(HOLD_CHECK);
        for (unit, v) in shared.units.iter().flat_map(|u| u.volumes.iter().map(move |v| (u, v))) {
            if shared.stopping.load(Ordering::SeqCst) {
                break;
            }
            if !shared.is_standby(unit) {
                continue;
            }
            let key = vol_key(unit, &v.name);
            if !shared.holds.lock().expect("lock").contains_key(&key)
                || !unit.layout().side_dir(Side::Standby, &v.name).is_dir()
            {
                continue;
            }
            if !crate::verify::due(unit, &v.name, every) {
                continue;
            }
            // The busy mark and the registration of the verify are taken together, and released in the other
            // order, so that a sync arriving in between always finds the verify to stop ([`Shared::mark_busy`]).
            let stop = Arc::new(AtomicBool::new(false));
            let guard = {
                let mut verifying = shared.verifying.lock().expect("lock");
                if !shared.busy.lock().expect("lock").insert(key.clone()) {
                    continue; // a sync runs: later
                }
                *verifying = Some((key.clone(), stop.clone()));
                BusyGuard { busy: shared.busy.clone(), name: key.clone(), volume: v.name.clone() }
            };
            let stopped =
                || stop.load(Ordering::SeqCst) || shared.stopping.load(Ordering::SeqCst) || !shared.is_standby(unit);
            match crate::verify::verify_shadow(unit, v, shared.io, &stopped, true) {
                Ok(Some(_)) => {}
                Ok(None) => debug!(volume = %key, "periodic verify stopped; it runs again later"),
                Err(e) => {
                    if !matches!(e, crate::verify::VerifyError::Incomplete { .. }) {
                        warn!(volume = %key, "periodic verify failed: {}; trying again after the interval", link::error_chain(&e));
                    }
                    crate::verify::postpone(unit, &v.name);
                }
            }
            drop(guard);
            *shared.verifying.lock().expect("lock") = None;
        }
    }
}

/// How often the automatic fallback looks at each primary this standby acts for; after a failed attempt it
/// waits [`FALLBACK_RETRY`].
const FALLBACK_CHECK: Duration = Duration::from_secs(5);
/// Pause after a failed automatic fallback before the next attempt.
const FALLBACK_RETRY: Duration = Duration::from_secs(60);

/// Automatic fallback (`fallback = "automatic"`), on its own thread: for each such primary this standby acts for,
/// [`roles::fallback_if_due`] every [`FALLBACK_CHECK`]; the reason it is not due is logged when it changes.
fn fallback(shared: &Shared) {
    let mut next: HashMap<String, Instant> = HashMap::new();
    let mut said: HashMap<String, String> = HashMap::new();
    while !shared.stopping.load(Ordering::SeqCst) {
        std::thread::sleep(HOLD_CHECK);
        for unit in &shared.units {
            let Some(p) = unit.protects.as_ref().filter(|p| p.fallback == crate::config::Fallback::Automatic) else {
                continue;
            };
            if next.get(&p.node).is_some_and(|t| Instant::now() < *t) || shared.stopping.load(Ordering::SeqCst) {
                continue;
            }
            next.insert(p.node.clone(), Instant::now() + FALLBACK_CHECK);
            match roles::fallback_if_due(unit, shared.io) {
                Ok(roles::FallbackStep::NotYet(why)) => {
                    if said.get(&p.node) != Some(&why) {
                        debug!(primary = %p.node, "automatic fallback not due: {why}");
                        said.insert(p.node.clone(), why);
                    }
                }
                Ok(roles::FallbackStep::HandedBack) => {
                    info!(primary = %p.node, "automatic fallback: {} took its service back", p.node);
                    said.remove(&p.node);
                }
                Err(e) => {
                    warn!(primary = %p.node, "{}", link::error_chain(&e));
                    next.insert(p.node.clone(), Instant::now() + FALLBACK_RETRY);
                }
            }
        }
    }
}

/// A bound standby daemon, not yet accepting.
#[derive(Debug)]
pub struct Server {
    listener: TcpListener,
    shared: Arc<Shared>,
}

/// Stops a [`Server`] at a consistent point; cheap to clone, usable from any thread.
#[derive(Debug, Clone)]
pub struct Stopper(Arc<Shared>);

impl Stopper {
    /// Stops accepting and cuts the read side of every connection; [`Server::run`] then returns.
    pub fn stop(&self) {
        let shared = &self.0;
        shared.stopping.store(true, Ordering::SeqCst);
        shared.stop.notify_one();
        for s in shared.streams.lock().expect("lock").values() {
            let _ = s.shutdown(std::net::Shutdown::Read);
        }
    }
}

impl Server {
    /// Loads the key and binds `listen` (or the configured `[standby] listen`).
    pub fn bind(cfg: Config, listen: Option<SocketAddr>, io: engine::volume::IoOptions) -> Result<Server, Error> {
        let units = units(&cfg);
        for u in &units {
            u.keys()?; // refuse to start with a missing or unsafe key file
            crate::retain::check_config(u)?;
        }
        let keys = if cfg.primaries.is_empty() {
            ServeKeys::One(netproto::KeyFile(cfg.key_file.clone()))
        } else {
            ServeKeys::ByPrimary {
                standby: cfg.node.clone(),
                files: units.iter().map(|u| (unit_name(u).to_owned(), u.key_file.clone())).collect(),
            }
        };
        let addr = listen.or(cfg.listen).ok_or_else(|| ConfigError::Missing {
            path: cfg.path.clone(),
            what: "[standby] listen address (or pass --listen)",
        })?;
        let listener = TcpListener::bind(addr).map_err(|source| ServeError::Bind { addr, source })?;
        listener.set_nonblocking(true).map_err(ServeError::Listener)?;
        let shared = Arc::new(Shared {
            cfg,
            units,
            keys,
            io,
            busy: Arc::new(Mutex::new(HashSet::new())),
            streams: Mutex::new(HashMap::new()),
            stopping: AtomicBool::new(false),
            stop: Notify::new(),
            holds: Mutex::new(HashMap::new()),
            hold_failed: Mutex::new(HashSet::new()),
            standby: Mutex::new(HashSet::new()),
            acting: Mutex::new(None),
            verifying: Mutex::new(None),
            next_id: AtomicU64::new(0),
            handshakes: Arc::new(Semaphore::new(MAX_HANDSHAKES)),
            connections: Arc::new(Semaphore::new(MAX_CONNECTIONS)),
        });
        Ok(Server { listener, shared })
    }

    /// The address it listens on (port 0 in the configuration picks a free one).
    pub fn local_addr(&self) -> Result<SocketAddr, Error> {
        Ok(self.listener.local_addr().map_err(ServeError::Listener)?)
    }

    /// A handle that stops it.
    pub fn stopper(&self) -> Stopper {
        Stopper(self.shared.clone())
    }

    /// Accepts connections until stopped, then waits for every connection to end.
    pub fn run(self) -> Result<(), Error> {
        self.run_with(false)
    }

    /// [`Server::run`], also stopping on SIGTERM or SIGINT.
    fn run_with(self, signals: bool) -> Result<(), Error> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .max_blocking_threads(MAX_CONNECTIONS + 4)
            .thread_name("serve")
            .enable_all()
            .build()
            .map_err(ServeError::Runtime)?;
        rt.block_on(async move {
            if signals {
                let stopper = self.stopper();
                let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                    .map_err(ServeError::Runtime)?;
                tokio::spawn(async move {
                    tokio::select! {
                        _ = term.recv() => info!("SIGTERM: stopping"),
                        _ = tokio::signal::ctrl_c() => info!("SIGINT: stopping"),
                    }
                    stopper.stop();
                });
            }
            let shared = self.shared.clone();
            tokio::spawn(async move {
                while !shared.stopping.load(Ordering::SeqCst) {
                    tokio::time::sleep(HOLD_CHECK).await;
                    let s = shared.clone();
                    let _ = tokio::task::spawn_blocking(move || s.check_holds()).await;
                }
            });
            let scrubber = self.shared.cfg.verify_every.map(|every| {
                let shared = self.shared.clone();
                std::thread::Builder::new().name("verify".into()).spawn(move || scrub(&shared, every))
            });
            let scrubber = match scrubber.transpose() {
                Ok(s) => s,
                Err(e) => return Err(ServeError::Runtime(e).into()),
            };
            let automatic = self
                .shared
                .units
                .iter()
                .any(|u| u.protects.as_ref().is_some_and(|p| p.fallback == crate::config::Fallback::Automatic));
            let fallbacker = automatic.then(|| {
                let shared = self.shared.clone();
                std::thread::Builder::new().name("fallback".into()).spawn(move || fallback(&shared))
            });
            let fallbacker = match fallbacker.transpose() {
                Ok(s) => s,
                Err(e) => return Err(ServeError::Runtime(e).into()),
            };
            let r = self.accept_loop().await;
            for t in [scrubber, fallbacker].into_iter().flatten() {
                let _ = tokio::task::spawn_blocking(move || t.join()).await;
            }
            r
        })
    }

    async fn accept_loop(self) -> Result<(), Error> {
        let shared = self.shared;
        let listener = tokio::net::TcpListener::from_std(self.listener).map_err(ServeError::Listener)?;
        let local = listener.local_addr().map_err(ServeError::Listener)?;
        let volumes: usize = shared.units.iter().map(|u| u.volumes.len()).sum();
        match shared.cfg.primary_names() {
            p if p.is_empty() => info!(%local, node = %shared.cfg.node, volumes, "serving"),
            p => info!(%local, node = %shared.cfg.node, volumes, primaries = %p.join(","), "serving several primaries"),
        }
        let metrics = crate::metrics::spawn_periodic(&shared.cfg);
        let mut tasks = tokio::task::JoinSet::new();
        let mut refusals = RefusalLog::default();
        while !shared.stopping.load(Ordering::SeqCst) {
            // A handshake slot first: while all are taken, new connections wait in the kernel's listen backlog
            // (a legitimate primary's connect succeeds once a slot frees; a flood cannot queue in this process).
            let hs_permit = tokio::select! {
                _ = shared.stop.notified() => break,
                p = shared.handshakes.clone().acquire_owned() => p.expect("the semaphore is never closed"),
            };
            let accepted = tokio::select! {
                _ = shared.stop.notified() => break,
                r = listener.accept() => r,
            };
            while tasks.try_join_next().is_some() {}
            let (stream, peer) = match accepted {
                Ok(a) => a,
                Err(e) => {
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            match shared.connections.clone().try_acquire_owned() {
                Ok(conn_permit) => {
                    refusals.flush();
                    tasks.spawn(connection(shared.clone(), stream, peer, conn_permit, hs_permit));
                }
                Err(_) => refusals.note(peer),
            }
        }
        refusals.flush();
        info!("shutting down: waiting for connections to reach a consistent point");
        if let Some(m) = metrics {
            m.abort();
        }
        while tasks.join_next().await.is_some() {}
        info!("stopped");
        Ok(())
    }
}

/// One log line per burst of refused connections.
#[derive(Debug, Default)]
struct RefusalLog {
    count: u64,
    since: Option<Instant>,
}

impl RefusalLog {
    fn note(&mut self, peer: SocketAddr) {
        match self.since {
            None => {
                warn!(%peer, "refusing connections: {MAX_CONNECTIONS} already open (logged once per burst)");
                self.since = Some(Instant::now());
            }
            Some(t) if t.elapsed() >= REFUSAL_LOG_INTERVAL => {
                self.count += 1;
                self.flush();
                self.since = Some(Instant::now());
            }
            Some(_) => self.count += 1,
        }
    }

    fn flush(&mut self) {
        if self.count > 0 {
            warn!(
                "refused {} more connections (limits: {MAX_HANDSHAKES} in handshake, {MAX_CONNECTIONS} in total)",
                self.count
            );
        }
        self.count = 0;
        self.since = None;
    }
}

/// `blockrep serve`: rolls committed spools forward, binds, calls `bound` with the address (to announce it), and
/// runs until SIGTERM/SIGINT.
pub fn run(
    cfg: Config,
    listen: Option<SocketAddr>,
    io: engine::volume::IoOptions,
    bound: impl FnOnce(SocketAddr),
) -> Result<(), Error> {
    let mut holds = HashMap::new();
    let mut standby = HashSet::new();
    for unit in units(&cfg) {
        roles::resume_interrupted_switchover(&unit);
        for f in crate::shadow::roll_forward(&unit, io) {
            warn!(volume = %vol_key(&unit, &f.volume), "cannot bring the shadow to a complete generation: {}; syncs of it will fail", f.error);
        }
        // Hold every shadow before accepting anything, for as long as this node is a standby (for that primary:
        // a primary's shadows are its production volumes, never held).
        if roles::refuses_syncs(&unit).is_none() {
            hold_shadows(&unit, &mut holds)?;
            standby.insert(unit_name(&unit).to_owned());
        }
    }
    let server = Server::bind(cfg, listen, io)?;
    *server.shared.holds.lock().expect("lock") = holds;
    *server.shared.standby.lock().expect("lock") = standby;
    bound(server.local_addr()?);
    server.run_with(true)
}

/// Serves one accepted connection: the handshake and session on a blocking thread, under one deadline for the
/// handshake.
async fn connection(
    shared: Arc<Shared>,
    stream: tokio::net::TcpStream,
    peer: SocketAddr,
    conn_permit: OwnedSemaphorePermit,
    hs_permit: OwnedSemaphorePermit,
) {
    let std = match stream.into_std().and_then(|s| s.set_nonblocking(false).map(|()| s)) {
        Ok(s) => s,
        Err(e) => return warn!(%peer, error = %e, "cannot use the accepted connection"),
    };
    let Ok(cut) = std.try_clone() else { return warn!(%peer, "cannot register the connection") };
    let id = shared.next_id.fetch_add(1, Ordering::SeqCst);
    if let Ok(c) = cut.try_clone() {
        shared.streams.lock().expect("lock").insert(id, c);
    }
    if shared.stopping.load(Ordering::SeqCst) {
        let _ = cut.shutdown(std::net::Shutdown::Read);
    }
    let (done_tx, done_rx) = tokio::sync::oneshot::channel::<()>();
    let s = shared.clone();
    let work = tokio::task::spawn_blocking(move || session(&s, std, peer, hs_permit, done_tx));
    if tokio::time::timeout(HANDSHAKE_DEADLINE, done_rx).await.is_err() {
        warn!(%peer, "no complete handshake within {} s: closing the connection", HANDSHAKE_DEADLINE.as_secs());
        let _ = cut.shutdown(std::net::Shutdown::Both);
    }
    let _ = work.await;
    shared.streams.lock().expect("lock").remove(&id);
    drop(conn_permit);
}

/// The blocking part of a connection: handshake (then `handshake_done`), session, and the goodbye on shutdown.
fn session(
    shared: &Shared,
    stream: TcpStream,
    peer: SocketAddr,
    hs_permit: OwnedSemaphorePermit,
    handshake_done: tokio::sync::oneshot::Sender<()>,
) {
    let conn = netproto::accept_handshake_with(stream, &shared.keys, &shared.cfg.handshake_options());
    drop(hs_permit);
    let _ = handshake_done.send(());
    let mut conn = match conn {
        Ok(c) => c,
        Err(e) => return warn!(%peer, "handshake failed: {}", link::error_chain(&e)),
    };
    let node = conn.peer_node().to_owned();
    info!(%peer, %node, "peer authenticated");
    // With [[primary]] blocks the key that authenticated the peer was its own: it gets its own unit only.
    let unit = match shared.units.iter().find(|u| shared.cfg.primaries.is_empty() || unit_name(u) == node) {
        Some(u) => u,
        None => return warn!(%peer, %node, "no configuration for this primary"),
    };
    let idle = shared.cfg.idle_timeout;
    if let Err(e) = conn.set_timeout(Some(idle)).and_then(|()| conn.set_tcp_keepalive(idle)) {
        warn!(%peer, "cannot set the session's timeouts: {}", link::error_chain(&e));
    }
    match netproto::serve_session(&mut conn, &ForUnit { shared, unit }) {
        Ok(()) => debug!(%peer, %node, "session ended"),
        Err(SessionError::Conn(ConnError::Timeout { .. })) => warn!(
            %peer, %node,
            "the primary vanished: nothing received for {} s; its volume is released and its spool kept for resume",
            idle.as_secs()
        ),
        Err(e) => warn!(%peer, %node, "session ended with an error: {}", link::error_chain(&e)),
    }
    if shared.stopping.load(Ordering::SeqCst) {
        conn.send_error(
            code::SHUTDOWN,
            &format!(
                "standby {} is shutting down; the shadow keeps its last complete generation and the next sync resumes",
                shared.cfg.node
            ),
        );
    }
}

/// Releases a volume's busy mark when the session ends.
#[derive(Debug)]
struct BusyGuard {
    busy: Arc<Mutex<HashSet<String>>>,
    /// The busy mark ([`vol_key`]).
    name: String,
    /// The volume's name.
    volume: String,
}

impl Drop for BusyGuard {
    fn drop(&mut self) {
        self.busy.lock().expect("lock").remove(&self.name);
    }
}

/// One open volume of a session: the engine's target, the volume's busy mark, and the standby's checks around
/// the commit.
#[derive(Debug)]
pub struct OpenShadow {
    target: Target,
    guard: BusyGuard,
    cfg: Config,
    io: engine::volume::IoOptions,
}

impl TargetLink for OpenShadow {
    fn info(&mut self) -> Result<TargetInfo, LinkError> {
        Ok(self.target.info())
    }
    fn begin(&mut self, plan: &BeginPlan) -> Result<BeginAck, LinkError> {
        self.target.begin(plan)
    }
    fn block_hashes(&mut self, first: u64, count: u32) -> Result<Vec<BlockHash>, LinkError> {
        self.target.block_hashes(first, count)
    }
    fn sub_hashes(&mut self, blocks: &[u64]) -> Result<Vec<BlockHash>, LinkError> {
        self.target.sub_hashes(blocks)
    }
    fn extent(&mut self, extent: Extent) -> Result<(), LinkError> {
        self.target.extent(extent)
    }
    fn commit(&mut self, root: BlockHash) -> Result<CommitAck, LinkError> {
        if let Some(why) = roles::refuses_syncs(&self.cfg) {
            return Err(LinkError::Refused(format!("not committing: {why}")));
        }
        let ack = self.target.commit(root)?;
        // The target logs "generation committed" with the root hash.
        note_first_full_sync(&self.cfg, self.io, &self.guard.volume);
        Ok(ack)
    }
}

/// One session's view of the daemon: the unit of the authenticated peer.
struct ForUnit<'a> {
    shared: &'a Shared,
    unit: &'a Config,
}

impl netproto::Standby for ForUnit<'_> {
    type Target = OpenShadow;

    fn open_volume(&self, peer: &str, o: &m::OpenVolume) -> Result<OpenShadow, Refusal> {
        open_volume(self.shared, self.unit, peer, o).map_err(|(c, message)| {
            warn!(volume = %vol_key(self.unit, &o.name), "{message}");
            Refusal::new(c, message)
        })
    }

    fn role(&self) -> Result<m::RoleInfo, Refusal> {
        let role = role::status(self.unit.layout().role_dir()).map(|s| s.role);
        match role {
            Ok(r) => Ok(m::RoleInfo { role: roles::role_to_wire(r), node: self.unit.node.clone() }),
            Err(e) => Err(Refusal::new(code::FAILED, format!("cannot read the role state: {e}"))),
        }
    }

    fn demote(
        &self,
        peer: &str,
        reason: &str,
        confirm: &mut dyn FnMut(Vec<m::Committed>) -> Result<(), Refusal>,
    ) -> Result<(), Refusal> {
        info!(%reason, peer, "the peer asks this node to demote (switchover)");
        let report = roles::demote_for_switchover(self.unit, peer, reason, self.shared.io, confirm)?;
        info!("demoted on the peer's request:\n{report}");
        Ok(())
    }

    fn handback(&self, peer: &str, reason: &str) -> Result<(), Refusal> {
        let cfg = self.unit;
        if !self.shared.cfg.primaries.is_empty() {
            return Err(Refusal::new(
                code::REFUSED,
                format!("{} is a standby protecting several primaries: it takes no service back", cfg.node),
            ));
        }
        info!(peer, %reason, "the standby acting for this node asks it to take its service back (automatic fallback)");
        let opts = roles::PlanOptions {
            reason: format!("automatic fallback requested by {peer}: {reason}"),
            ..Default::default()
        };
        match roles::run(cfg, roles::Plan::Switchover, &opts, self.shared.io) {
            Ok(report) => {
                crate::history::append(
                    cfg,
                    crate::history::Event::Switchover { plan: "switchover".into(), reason: opts.reason },
                );
                info!("took the service back from {peer}:\n{report}");
                if let Err(e) = std::env::current_exe()
                    .map_err(|e| e.to_string())
                    .and_then(|exe| roles::spawn_announcer(&exe, &cfg.path, None).map_err(|e| e.to_string()))
                {
                    warn!("cannot start the background re-announcement of the virtual IP: {e}");
                }
                Ok(())
            }
            Err(e) => {
                let c = if e.kind() == ErrorKind::Unsafe { code::REFUSED } else { code::FAILED };
                let message = format!("{} did not take its service back: {}", cfg.node, link::error_chain(&e));
                warn!("{message}");
                Err(Refusal::new(c, message))
            }
        }
    }
}

fn open_volume(shared: &Shared, cfg: &Config, peer: &str, o: &m::OpenVolume) -> Result<OpenShadow, (u16, String)> {
    let vol = cfg.volumes.iter().find(|v| v.name == o.name).ok_or_else(|| match crate::protect::node_of(cfg) {
        Some(p) => (
            code::UNKNOWN_VOLUME,
            format!(
                "volume {:?} is not configured for primary {p} on standby {} ({}: its [[primary]] block for {p} \
                 names {}); a primary opens only its own volumes",
                o.name,
                cfg.node,
                cfg.path.display(),
                cfg.volumes.iter().map(|v| v.name.as_str()).collect::<Vec<_>>().join(", ")
            ),
        ),
        None => (
            code::UNKNOWN_VOLUME,
            format!("volume {:?} is not configured on standby {} ({})", o.name, cfg.node, cfg.path.display()),
        ),
    })?;
    let shadow = vol
        .shadow
        .as_ref()
        .ok_or_else(|| (code::UNKNOWN_VOLUME, format!("volume {} has no `shadow` on standby {}", o.name, cfg.node)))?;
    if let Some(why) = roles::refuses_syncs(cfg) {
        return Err((code::REFUSED, why));
    }
    if let Some(why) = crate::protect::refuses_while_acting(&shared.cfg, cfg) {
        return Err((code::REFUSED, why));
    }
    let key = vol_key(cfg, &o.name);
    if !shared.mark_busy(&key) {
        return Err((
            code::BUSY,
            format!("another sync of volume {} is running on standby {}; try again later", o.name, cfg.node),
        ));
    }
    let guard = BusyGuard { busy: shared.busy.clone(), name: key, volume: o.name.clone() };
    if !shadow.exists() {
        cfg.layout().record_source_size(&o.name, o.source_size);
        return Err((
            code::REFUSED,
            format!(
                "volume {}: the shadow {} does not exist on standby {}; create it there with `blockrep shadow create {}` \
                 (the source is {} bytes)",
                o.name,
                shadow.display(),
                cfg.node,
                o.name,
                o.source_size
            ),
        ));
    }
    shared.hold(cfg, &o.name, shadow); // a shadow created since the last hold check
    let dir = cfg.layout().side_dir(Side::Standby, &o.name);
    let opts = crate::retain::target_options(cfg, vol, shared.io, true)
        .map_err(|e| (code::REFUSED, format!("cannot keep generations: {}", link::error_chain(&e))))?;
    let opts = TargetOptions { peer: peer.to_owned(), ..opts };
    let target = crate::verify::open_target(shadow, &dir, opts).map_err(|e| {
        (code::FAILED, format!("cannot open the shadow of volume {}: {}", o.name, link::error_chain(&e)))
    })?;
    let size = target.info().volume_size;
    if size != o.source_size {
        return Err((
            code::REFUSED,
            format!(
                "volume {}: the shadow {} is {size} bytes but the source is {} bytes; sizes must be equal \
                 (create the shadow with `blockrep shadow create`)",
                o.name,
                shadow.display(),
                o.source_size
            ),
        ));
    }
    Ok(OpenShadow { target, guard, cfg: cfg.clone(), io: shared.io })
}

/// Records in the role state that every shadow holds a complete generation (automatic promotion by keepalived or
/// Pacemaker stays off until then).
fn note_first_full_sync(cfg: &Config, io: engine::volume::IoOptions, just_committed: &str) {
    let layout = cfg.layout();
    let dir = layout.role_dir();
    if role::status(dir).is_ok_and(|s| s.first_full_sync_done) {
        return;
    }
    let all_complete = cfg.volumes.iter().filter(|v| v.shadow.is_some() && v.name != just_committed).all(|v| {
        let shadow = v.shadow.as_ref().expect("filtered");
        crate::verify::open_target(shadow, &layout.side_dir(Side::Standby, &v.name), TargetOptions::new(&v.name, io))
            .ok()
            .map(|t| t.info())
            .is_some_and(|i| i.complete && i.generation > 0)
    });
    if all_complete {
        match role::mark_first_full_sync(dir) {
            Ok(_) => info!("every shadow holds a complete generation: automatic promotion may now be enabled"),
            Err(e) => warn!("cannot record the first full sync in {}: {e}", dir.display()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sync_stops_the_periodic_verify_of_its_volume_and_takes_the_volume() {
        let d = tempfile::tempdir().unwrap();
        let key = d.path().join("key");
        netproto::generate_key(&key, false).unwrap();
        let text = format!(
            "node = \"s\"\nkey_file = {key:?}\nstate_dir = {:?}\n[standby]\nlisten = \"127.0.0.1:0\"\n",
            d.path().join("state")
        );
        let cfg = Config::parse(&text, std::path::Path::new("c.toml")).unwrap();
        let shared = Server::bind(cfg, None, Default::default()).unwrap().shared;
        // A periodic verify of "v" runs: it holds the busy mark until told to stop.
        shared.busy.lock().unwrap().insert("v".into());
        let stop = Arc::new(AtomicBool::new(false));
        *shared.verifying.lock().unwrap() = Some(("v".into(), stop.clone()));
        let verify = {
            let (shared, stop) = (shared.clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    std::thread::sleep(Duration::from_millis(5));
                }
                *shared.verifying.lock().unwrap() = None;
                shared.busy.lock().unwrap().remove("v");
            })
        };
        assert!(shared.mark_busy("v"), "the sync gets the volume");
        assert!(stop.load(Ordering::SeqCst), "the verify was told to stop");
        verify.join().unwrap();
        // A volume busy with a sync (no verify to stop) is refused at once, as before.
        let t = Instant::now();
        assert!(!shared.mark_busy("v"));
        assert!(t.elapsed() < Duration::from_secs(1));
        assert!(shared.mark_busy("w"));
    }
}
