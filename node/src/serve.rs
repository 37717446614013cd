//! The standby daemon (`blockrep serve`).
//!
//! One thread per connection; each connection authenticates, opens one volume at a time and drives that volume's
//! [`Target`] with the requests it receives (the same calls a local sync makes), through
//! [`netproto::serve_session`]. Two concurrent syncs of one volume are refused. [`Stopper::stop`] (wired to
//! SIGTERM/SIGINT by [`run`]) stops accepting, cuts the read side of every connection (so a transfer stops
//! between two frames, with its spool durable for resume, while a commit in progress finishes), and [`Server::run`]
//! returns once the connection threads have ended.

use std::collections::{HashMap, HashSet};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use engine::target::{Target, TargetOptions};
use link::{BeginAck, BeginPlan, BlockHash, CommitAck, Extent, LinkError, TargetInfo, TargetLink};
use netproto::message::{self as m, code};
use netproto::{Key, Refusal};
use tracing::{info, warn};

use crate::config::{Config, ConfigError};
use crate::layout::Side;
use crate::roles::{self, Plan, PlanOptions};
use crate::{Error, ErrorKind};

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
}

impl ServeError {
    /// The kind of this error.
    pub fn kind(&self) -> ErrorKind {
        ErrorKind::Failed
    }
}

/// Shared state of the daemon.
#[derive(Debug)]
struct Shared {
    cfg: Config,
    key: Key,
    io: engine::volume::IoOptions,
    busy: Arc<Mutex<HashSet<String>>>,
    streams: Mutex<HashMap<u64, TcpStream>>,
    /// A clone of the listening socket, so that a stop can wake the blocked accept.
    listener: Mutex<Option<TcpListener>>,
    stopping: AtomicBool,
    next_id: AtomicU64,
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
        if let Some(l) = shared.listener.lock().expect("lock").as_ref() {
            // SAFETY: the descriptor belongs to the listener clone held (and kept open) under the lock; shutdown
            // only makes the blocked accept() on the same socket return.
            unsafe { libc::shutdown(l.as_raw_fd(), libc::SHUT_RDWR) };
        }
        for s in shared.streams.lock().expect("lock").values() {
            let _ = s.shutdown(std::net::Shutdown::Read);
        }
    }
}

impl Server {
    /// Loads the key and binds `listen` (or the configured `[standby] listen`).
    pub fn bind(cfg: Config, listen: Option<SocketAddr>, io: engine::volume::IoOptions) -> Result<Server, Error> {
        let key = netproto::load_key(&cfg.key_file)?;
        let addr = listen.or(cfg.listen).ok_or_else(|| ConfigError::Missing {
            path: cfg.path.clone(),
            what: "[standby] listen address (or pass --listen)",
        })?;
        let listener = TcpListener::bind(addr).map_err(|source| ServeError::Bind { addr, source })?;
        let clone = listener.try_clone().map_err(ServeError::Listener)?;
        let shared = Arc::new(Shared {
            cfg,
            key,
            io,
            busy: Arc::new(Mutex::new(HashSet::new())),
            streams: Mutex::new(HashMap::new()),
            listener: Mutex::new(Some(clone)),
            stopping: AtomicBool::new(false),
            next_id: AtomicU64::new(0),
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

    /// Accepts connections until stopped, then waits for the connection threads.
    pub fn run(self) -> Result<(), Error> {
        let shared = self.shared;
        let local = self.listener.local_addr().map_err(ServeError::Listener)?;
        info!(%local, node = %shared.cfg.node, volumes = shared.cfg.volumes.len(), "serving");
        let mut workers = Vec::new();
        for stream in self.listener.incoming() {
            if shared.stopping.load(Ordering::SeqCst) {
                break;
            }
            let stream = match stream {
                Ok(s) => s,
                Err(e) => {
                    warn!(error = %e, "accept failed");
                    std::thread::sleep(Duration::from_millis(50));
                    continue;
                }
            };
            let shared = shared.clone();
            workers.retain(|w: &std::thread::JoinHandle<()>| !w.is_finished());
            workers.push(std::thread::spawn(move || connection(shared, stream)));
        }
        shared.listener.lock().expect("lock").take();
        info!("shutting down: waiting for connections to reach a consistent point");
        for w in workers {
            let _ = w.join();
        }
        info!("stopped");
        Ok(())
    }
}

/// `blockrep serve`: binds, calls `bound` with the address (to announce it), and runs until SIGTERM/SIGINT.
pub fn run(
    cfg: Config,
    listen: Option<SocketAddr>,
    io: engine::volume::IoOptions,
    bound: impl FnOnce(SocketAddr),
) -> Result<(), Error> {
    let server = Server::bind(cfg, listen, io)?;
    bound(server.local_addr()?);
    let stopper = server.stopper();
    crate::signals::on_stop(move |signal| {
        info!(?signal, "stop requested");
        stopper.stop();
    })?;
    server.run()
}

fn connection(shared: Arc<Shared>, stream: TcpStream) {
    let peer = stream.peer_addr().map(|a| a.to_string()).unwrap_or_else(|_| "?".into());
    let id = shared.next_id.fetch_add(1, Ordering::SeqCst);
    if let Ok(clone) = stream.try_clone() {
        shared.streams.lock().expect("lock").insert(id, clone);
    }
    if shared.stopping.load(Ordering::SeqCst) {
        let _ = stream.shutdown(std::net::Shutdown::Read);
    }
    let result = netproto::accept_handshake(stream, &shared.key, &shared.cfg.node).map_err(|e| link::error_chain(&e));
    let result = result.and_then(|mut conn| {
        info!(%peer, node = conn.peer_node(), "peer authenticated");
        netproto::serve_session(&mut conn, &*shared).map_err(|e| link::error_chain(&e))
    });
    if let Err(e) = result {
        warn!(%peer, "connection ended with an error: {e}");
    }
    shared.streams.lock().expect("lock").remove(&id);
}

/// Releases a volume's busy mark when the session ends.
#[derive(Debug)]
struct BusyGuard {
    busy: Arc<Mutex<HashSet<String>>>,
    name: String,
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
        if roles::is_primary(&self.cfg) {
            return Err(LinkError::Refused(format!(
                "this node ({}) became primary during the sync; not committing",
                self.cfg.node
            )));
        }
        let ack = self.target.commit(root)?;
        // The target logs "generation committed" with the root hash.
        note_first_full_sync(&self.cfg, self.io, &self.guard.name);
        Ok(ack)
    }
}

impl netproto::Standby for Shared {
    type Target = OpenShadow;

    fn open_volume(&self, _peer: &str, o: &m::OpenVolume) -> Result<OpenShadow, Refusal> {
        open_volume(self, o).map_err(|(c, message)| {
            warn!(volume = %o.name, "{message}");
            Refusal::new(c, message)
        })
    }

    fn role(&self) -> Result<m::RoleInfo, Refusal> {
        let role = role::status(self.cfg.layout().role_dir()).map(|s| s.role);
        match role {
            Ok(r) => Ok(m::RoleInfo { role: roles::role_to_wire(r), node: self.cfg.node.clone() }),
            Err(e) => Err(Refusal::new(code::FAILED, format!("cannot read the role state: {e}"))),
        }
    }

    fn demote(&self, peer: &str, reason: &str) -> Result<(), Refusal> {
        info!(%reason, peer, "the peer asks this node to demote (switchover)");
        let opts = PlanOptions { reason: format!("switchover requested by {peer}: {reason}"), ..Default::default() };
        match roles::run(&self.cfg, Plan::Demote, &opts, self.io) {
            Ok(report) => {
                info!("demoted on the peer's request:\n{report}");
                Ok(())
            }
            Err(e) => Err(Refusal::new(code::FAILED, link::error_chain(&e))),
        }
    }
}

fn open_volume(shared: &Shared, o: &m::OpenVolume) -> Result<OpenShadow, (u16, String)> {
    let cfg = &shared.cfg;
    let vol = cfg.volumes.iter().find(|v| v.name == o.name).ok_or_else(|| {
        (
            code::UNKNOWN_VOLUME,
            format!("volume {:?} is not configured on standby {} ({})", o.name, cfg.node, cfg.path.display()),
        )
    })?;
    let shadow = vol
        .shadow
        .as_ref()
        .ok_or_else(|| (code::UNKNOWN_VOLUME, format!("volume {} has no `shadow` on standby {}", o.name, cfg.node)))?;
    if roles::is_primary(cfg) {
        return Err((
            code::REFUSED,
            format!("this node ({}) is primary: it does not accept syncs; demote it first", cfg.node),
        ));
    }
    if !shared.busy.lock().expect("lock").insert(o.name.clone()) {
        return Err((
            code::BUSY,
            format!("another sync of volume {} is running on standby {}; try again later", o.name, cfg.node),
        ));
    }
    let guard = BusyGuard { busy: shared.busy.clone(), name: o.name.clone() };
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
    let dir = cfg.layout().side_dir(Side::Standby, &o.name);
    let target = Target::open(shadow, &dir, TargetOptions::new(&o.name, shared.io)).map_err(|e| {
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
        Target::open(shadow, &layout.side_dir(Side::Standby, &v.name), TargetOptions::new(&v.name, io))
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
