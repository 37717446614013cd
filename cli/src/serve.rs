//! `blockrep serve`: the standby daemon.
//!
//! One thread per connection; each connection authenticates, opens one volume at a time and drives that volume's
//! [`Target`] with the requests it receives (the same calls a local sync makes). Two concurrent syncs of one
//! volume are refused. SIGTERM/SIGINT stop accepting, cut the read side of every connection (so a transfer stops
//! between two frames, with its spool durable for resume, while a commit in progress finishes), wait for the
//! connection threads, and exit 0.

use std::collections::{HashMap, HashSet};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use engine::target::Target;
use link::{BeginAck, BeginPlan, BlockHash, CommitAck, Extent, LinkError, TargetInfo, TargetLink};
use netproto::message::{self as m, code};
use netproto::{Key, Refusal};
use tracing::{info, warn};

use crate::config::Config;
use crate::exit::{coded, USAGE};

/// Shared state of the daemon.
struct Shared {
    cfg: Config,
    key: Key,
    io: engine::volume::IoOptions,
    busy: Arc<Mutex<HashSet<String>>>,
    streams: Mutex<HashMap<u64, TcpStream>>,
    stopping: AtomicBool,
    next_id: AtomicU64,
}

/// Runs the daemon until SIGTERM/SIGINT. With `announce`, prints `listening on ADDR` on stdout once bound.
pub fn run(cfg: Config, listen: Option<SocketAddr>, announce: bool, io: engine::volume::IoOptions) -> Result<()> {
    let key = netproto::load_key(&cfg.key_file).map_err(|e| coded(USAGE, format!("{e:#}")))?;
    let addr = listen.or(cfg.listen).ok_or_else(|| {
        coded(USAGE, format!("{} has no [standby] listen address (or pass --listen)", cfg.path.display()))
    })?;
    let listener = TcpListener::bind(addr).with_context(|| format!("cannot listen on {addr}"))?;
    let local = listener.local_addr()?;
    info!(%local, node = %cfg.node, volumes = cfg.volumes.len(), "serving");
    if announce {
        println!("listening on {local}");
        use std::io::Write;
        std::io::stdout().flush()?;
    }
    let shared = Arc::new(Shared {
        cfg,
        key,
        io,
        busy: Arc::new(Mutex::new(HashSet::new())),
        streams: Mutex::new(HashMap::new()),
        stopping: AtomicBool::new(false),
        next_id: AtomicU64::new(0),
    });
    spawn_signal_thread(shared.clone(), listener.as_raw_fd())?;

    let mut workers = Vec::new();
    for stream in listener.incoming() {
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
    info!("shutting down: waiting for connections to reach a consistent point");
    for w in workers {
        let _ = w.join();
    }
    info!("stopped");
    Ok(())
}

/// Blocks SIGTERM/SIGINT in every thread and turns them into an orderly stop from a dedicated thread.
fn spawn_signal_thread(shared: Arc<Shared>, listener_fd: i32) -> Result<()> {
    use nix::sys::signal::{SigSet, Signal};
    let mut set = SigSet::empty();
    set.add(Signal::SIGTERM);
    set.add(Signal::SIGINT);
    set.thread_block().context("cannot block signals")?;
    std::thread::spawn(move || {
        let sig = set.wait();
        info!(signal = ?sig, "stop requested");
        shared.stopping.store(true, Ordering::SeqCst);
        // SAFETY: shutdown on the listener's descriptor, which lives until `run` returns (after this wakes it);
        // it only makes the blocked accept() return.
        unsafe { libc::shutdown(listener_fd, libc::SHUT_RDWR) };
        for s in shared.streams.lock().expect("lock").values() {
            let _ = s.shutdown(std::net::Shutdown::Read);
        }
    });
    Ok(())
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
    let result = netproto::accept_handshake(stream, &shared.key, &shared.cfg.node)
        .map_err(anyhow::Error::from)
        .and_then(|mut conn| {
            info!(%peer, node = conn.peer_node(), "peer authenticated");
            netproto::serve_session(&mut conn, &*shared).map_err(anyhow::Error::from)
        });
    if let Err(e) = result {
        warn!(%peer, "connection ended with an error: {e:#}");
    }
    shared.streams.lock().expect("lock").remove(&id);
}

/// Releases a volume's busy mark when the session ends.
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
struct OpenShadow {
    target: Target,
    guard: BusyGuard,
    cfg: Config,
    io: engine::volume::IoOptions,
}

impl TargetLink for OpenShadow {
    fn info(&mut self) -> Result<TargetInfo, LinkError> {
        self.target.info()
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
        if crate::role_glue::is_primary(&self.cfg) {
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
        let role = role::status(&crate::role_glue::role_dir(&self.cfg)).map(|s| s.role);
        match role {
            Ok(r) => Ok(m::RoleInfo { role: crate::role_glue::role_to_wire(r), node: self.cfg.node.clone() }),
            Err(e) => Err(Refusal::new(code::FAILED, format!("cannot read the role state: {e}"))),
        }
    }

    fn demote(&self, peer: &str, reason: &str) -> Result<(), Refusal> {
        info!(%reason, peer, "the peer asks this node to demote (switchover)");
        let args = crate::role_glue::PlanArgs {
            force: false,
            dry_run: false,
            reason: format!("switchover requested by {peer}: {reason}"),
            poweroff: false,
            json: false,
        };
        match crate::role_glue::plan(&self.cfg, "demote", &args, self.io) {
            Ok(report) => {
                info!("demoted on the peer's request:\n{report}");
                Ok(())
            }
            Err(e) => Err(Refusal::new(code::FAILED, format!("{e:#}"))),
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
    if crate::role_glue::is_primary(cfg) {
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
        crate::shadow::record_source_size(&cfg.side_dir("standby", &o.name), o.source_size);
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
    let mut target =
        Target::open(shadow, &cfg.side_dir("standby", &o.name), crate::local::target_options(&o.name, shared.io))
            .map_err(|e| {
                (code::FAILED, format!("cannot open the shadow of volume {}: {:#}", o.name, anyhow::Error::from(e)))
            })?;
    let size = target.info().map_err(|e| (code::FAILED, format!("{:#}", anyhow::Error::from(e))))?.volume_size;
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
    let dir = crate::role_glue::role_dir(cfg);
    if role::status(&dir).is_ok_and(|s| s.first_full_sync_done) {
        return;
    }
    let all_complete = cfg.volumes.iter().filter(|v| v.shadow.is_some() && v.name != just_committed).all(|v| {
        let shadow = v.shadow.as_ref().expect("filtered");
        Target::open(shadow, &cfg.side_dir("standby", &v.name), crate::local::target_options(&v.name, io))
            .ok()
            .and_then(|mut t| t.info().ok())
            .is_some_and(|i| i.complete && i.generation > 0)
    });
    if all_complete {
        match role::mark_first_full_sync(&dir) {
            Ok(_) => info!("every shadow holds a complete generation: automatic promotion may now be enabled"),
            Err(e) => warn!("cannot record the first full sync in {}: {e}", dir.display()),
        }
    }
}
