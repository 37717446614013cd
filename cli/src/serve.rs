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
use engine::sync::TargetLink;
use engine::target::Target;
use netproto::message::{self as m, code};
use netproto::{Connection, Key, Message};
use tracing::{info, warn};

use crate::config::Config;
use crate::exit::{coded, USAGE};
use crate::net::{begin_from_wire, extent_from_wire, info_to_wire};

/// Shared state of the daemon.
struct Shared {
    cfg: Config,
    key: Key,
    io: engine::volume::IoOptions,
    busy: Mutex<HashSet<String>>,
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
        busy: Mutex::new(HashSet::new()),
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
        .and_then(|conn| {
            info!(%peer, node = conn.peer_node(), "peer authenticated");
            session(&shared, conn)
        });
    if let Err(e) = result {
        warn!(%peer, "connection ended with an error: {e:#}");
    }
    shared.streams.lock().expect("lock").remove(&id);
}

/// Releases a volume's busy mark when the session ends.
struct BusyGuard<'a>(&'a Shared, String);

impl Drop for BusyGuard<'_> {
    fn drop(&mut self) {
        self.0.busy.lock().expect("lock").remove(&self.1);
    }
}

fn session(shared: &Shared, mut conn: Connection) -> Result<()> {
    let mut open: Option<(BusyGuard<'_>, Target)> = None;
    loop {
        let Some(msg) = conn.recv()? else {
            return Ok(());
        };
        let reply = match (msg, open.as_mut()) {
            (Message::OpenVolume(o), _) => {
                drop(open.take()); // release the previous volume before opening another
                match open_volume(shared, &o) {
                    Ok((guard, mut target)) => {
                        let info = target.info()?;
                        open = Some((guard, target));
                        Message::VolumeInfo(info_to_wire(&info))
                    }
                    Err((c, message)) => {
                        warn!(volume = %o.name, "{message}");
                        conn.send_error(c, &message);
                        return Ok(());
                    }
                }
            }
            (Message::Bye, _) => return Ok(()),
            (Message::RoleReq, _) => {
                let role = role::status(&crate::role_glue::role_dir(&shared.cfg)).map(|s| s.role);
                let role = role.map_err(|e| anyhow::anyhow!("cannot read the role state: {e}"));
                match role {
                    Ok(r) => Message::RoleInfo(m::RoleInfo {
                        role: crate::role_glue::role_to_wire(r),
                        node: shared.cfg.node.clone(),
                    }),
                    Err(e) => return refuse(&mut conn, code::FAILED, e),
                }
            }
            (Message::DemoteReq(reason), _) => {
                info!(%reason, peer = conn.peer_node(), "the peer asks this node to demote (switchover)");
                let args = crate::role_glue::PlanArgs {
                    force: false,
                    dry_run: false,
                    reason: format!("switchover requested by {}: {reason}", conn.peer_node()),
                    poweroff: false,
                    json: false,
                };
                match crate::role_glue::plan(&shared.cfg, "demote", &args, shared.io) {
                    Ok(report) => {
                        info!("demoted on the peer's request:\n{report}");
                        Message::DemoteDone
                    }
                    Err(e) => return refuse(&mut conn, code::FAILED, e),
                }
            }
            (Message::Begin(b), Some((_, t))) => match t.begin(&begin_from_wire(&b)) {
                Ok(a) => Message::BeginAck(m::BeginAck { resumed: a.resumed, in_place: a.in_place }),
                Err(e) => return refuse(&mut conn, code::REFUSED, e),
            },
            (Message::BlockHashesReq { first, count }, Some((_, t))) => match t.block_hashes(first, count) {
                Ok(h) => Message::BlockHashes(h),
                Err(e) => return refuse(&mut conn, code::FAILED, e),
            },
            (Message::SubHashesReq(blocks), Some((_, t))) => match t.sub_hashes(&blocks) {
                Ok(h) => Message::SubHashes(h),
                Err(e) => return refuse(&mut conn, code::FAILED, e),
            },
            (Message::Extent(e), Some((_, t))) => match t.extent(extent_from_wire(e)) {
                Ok(()) => continue,
                Err(e) => return refuse(&mut conn, code::REFUSED, e),
            },
            (Message::Commit(_), Some(_)) if crate::role_glue::is_primary(&shared.cfg) => {
                let message = format!("this node ({}) became primary during the sync; not committing", shared.cfg.node);
                conn.send_error(code::REFUSED, &message);
                anyhow::bail!(message);
            }
            (Message::Commit(root), Some((g, t))) => match t.commit(root) {
                Ok(a) => {
                    // The target logs "generation committed" with the root hash.
                    note_first_full_sync(&shared.cfg, shared.io, &g.1);
                    Message::CommitAck(m::CommitAck { generation: a.generation, root: a.root })
                }
                Err(e) => return refuse(&mut conn, code::FAILED, e),
            },
            (other, _) => {
                let message = format!("protocol violation: unexpected {} message", other.frame_type());
                conn.send_error(code::PROTOCOL, &message);
                anyhow::bail!(message);
            }
        };
        conn.send(&reply)?;
    }
}

fn refuse(conn: &mut Connection, c: u16, e: impl Into<anyhow::Error>) -> Result<()> {
    let e = e.into();
    let message = format!("{e:#}");
    conn.send_error(c, &message);
    Err(e)
}

fn open_volume<'a>(shared: &'a Shared, o: &m::OpenVolume) -> Result<(BusyGuard<'a>, Target), (u16, String)> {
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
    let guard = BusyGuard(shared, o.name.clone());
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
    Ok((guard, target))
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
