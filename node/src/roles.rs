//! Roles: the `[role]` section as the role crate's configuration, the guards that need the engine (committed
//! shadows) and the protocol (the peer's role), LVM renames for the `lv-rename` boot target, the plans
//! (promote, demote, switchover) and the periodic re-announcement of the virtual IP.

use std::path::{Path, PathBuf};
use std::time::Duration;

use engine::target::TargetOptions;

pub use role::Report;

use crate::config::{Config, ConfigError};
use crate::layout::Side;
use crate::{Error, ErrorKind};

/// How long a switchover waits for each answer of the peer: its final sync of every volume, then its demote
/// plan (TCP keepalive finds a peer that vanished sooner).
const DEMOTE_TIMEOUT: Duration = Duration::from_secs(6 * 3600);
/// How long a switchover's final sync waits for a sync that is already running on this node to end.
const SYNC_LOCK_WAIT: Duration = Duration::from_secs(600);

/// Errors of role changes.
#[derive(Debug, thiserror::Error)]
pub enum RoleError {
    /// The `[role]` section does not deserialize.
    #[error("configuration {}: [role]", path.display())]
    Section {
        /// The configuration file.
        path: PathBuf,
        /// The TOML error.
        #[source]
        source: toml::de::Error,
    },
    /// The `[role]` section is inconsistent.
    #[error("configuration {}: [role]", path.display())]
    Invalid {
        /// The configuration file.
        path: PathBuf,
        /// What is wrong.
        #[source]
        source: role::config::ConfigError,
    },
    /// The role state directory is unusable (on a replicated volume, or unreadable).
    #[error(transparent)]
    StateDir(role::state::StateError),
    /// The lvm2 tool is needed for the `lv-rename` boot target and cannot be used.
    #[error(transparent)]
    Lvm(#[from] lvmctl::LvmError),
    /// A plan failed or was refused.
    #[error(transparent)]
    Plan(#[from] role::PlanError),
    /// A switchover stopped.
    #[error(transparent)]
    Switchover(#[from] role::SwitchoverError),
    /// The periodic re-announcement failed.
    #[error("cannot re-announce the virtual IP")]
    Announce(#[source] role::arp::ArpError),
    /// A shadow's interrupted commit could not be finished, so promoting it would serve a half-written volume.
    #[error(
        "volume {volume}: the shadow's last commit cannot be finished ({error}); not promoting a half-written \
         shadow: repair the state directory or the shadow (see the error), or sync it again from the peer"
    )]
    NotRolledForward {
        /// Volume name.
        volume: String,
        /// Why.
        error: String,
    },
    /// The automatic fallback's request to the primary failed (it stays with this standby; tried again later).
    #[error("automatic fallback to {primary}: {message}; this standby keeps acting for it and tries again later")]
    Fallback {
        /// The primary.
        primary: String,
        /// What failed.
        message: String,
    },
    /// The background re-announcement could not be started.
    #[error("cannot start the background re-announcement (blockrep announce)")]
    SpawnAnnouncer(#[source] std::io::Error),
    /// `reconcile` found a promote or demote that did not finish.
    #[error(
        "a {kind} plan was interrupted (role {role}): run `blockrep promote` or `blockrep demote` to finish it in the \
         role this node should have"
    )]
    Interrupted {
        /// Which plan.
        kind: String,
        /// The role recorded.
        role: role::Role,
    },
    /// `promote --generation` on a node that already is primary (it serves its own volumes, not a shadow).
    #[error(
        "this node already is primary: --generation picks the shadow generation a standby promotes; a promote here \
         only re-asserts the virtual IP (demote first to serve a retained generation)"
    )]
    GenerationWhilePrimary,
}

impl RoleError {
    /// The kind of this error: a guard's refusal is [`ErrorKind::Unsafe`].
    pub fn kind(&self) -> ErrorKind {
        match self {
            RoleError::Section { .. }
            | RoleError::Invalid { .. }
            | RoleError::StateDir(_)
            | RoleError::GenerationWhilePrimary => ErrorKind::Usage,
            RoleError::Plan(e) if e.refused_as_unsafe() => ErrorKind::Unsafe,
            RoleError::NotRolledForward { .. } => ErrorKind::Unsafe,
            RoleError::Switchover(e) if e.refused_as_unsafe() => ErrorKind::Unsafe,
            _ => ErrorKind::Failed,
        }
    }
}

/// Which role change to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Plan {
    /// Make this standby the primary.
    Promote,
    /// Make this primary a standby again.
    Demote,
    /// Demote the peer, then promote this node.
    Switchover,
}

/// What a plan takes from the operator.
#[derive(Debug, Clone, Default)]
pub struct PlanOptions {
    /// Skip the guards.
    pub force: bool,
    /// Report the plan only.
    pub dry_run: bool,
    /// Reason recorded and passed to hooks.
    pub reason: String,
    /// Demote: power off and keep primary services disabled.
    pub poweroff: bool,
    /// Promote: roll these volumes' shadows back to these retained generations first (`--generation`).
    pub generations: Vec<(String, u64)>,
}

/// Resolves `--generation` arguments (`N` when one volume has a shadow here, else `VOLUME=N`, repeatable).
pub fn parse_generations(cfg: &Config, args: &[String]) -> Result<Vec<(String, u64)>, String> {
    let shadows: Vec<&str> = cfg.volumes.iter().filter(|v| v.shadow.is_some()).map(|v| v.name.as_str()).collect();
    let mut out: Vec<(String, u64)> = Vec::new();
    for a in args {
        let (vol, n) = match a.split_once('=') {
            Some((v, n)) => (v.to_owned(), n),
            None if shadows.len() == 1 => (shadows[0].to_owned(), a.as_str()),
            None => {
                return Err(format!(
                    "--generation {a}: this node has {} volumes with shadows ({}): say which, as VOLUME=N",
                    shadows.len(),
                    shadows.join(", ")
                ))
            }
        };
        if !shadows.contains(&vol.as_str()) {
            return Err(format!("--generation {a}: volume {vol:?} has no shadow on node {}", cfg.node));
        }
        let n: u64 = n.parse().map_err(|_| format!("--generation {a}: {n:?} is not a generation number"))?;
        if out.iter().any(|(v, _)| *v == vol) {
            return Err(format!("--generation {a}: volume {vol} is given twice"));
        }
        out.push((vol, n));
    }
    Ok(out)
}

/// The `[role]` section as the role crate's configuration: `state_dir` defaults to `<state_dir>/role` and `node`
/// to the top-level node name.
pub fn role_config(cfg: &Config) -> Result<role::Config, Error> {
    let mut t = cfg.role.clone().ok_or_else(|| ConfigError::Missing {
        path: cfg.path.clone(),
        what: "[role] section (virtual IP, services, boot target): see docs/role.md",
    })?;
    let role_dir = cfg.layout().role_dir().to_string_lossy().into_owned();
    t.entry("state_dir").or_insert_with(|| toml::Value::String(role_dir));
    t.entry("node").or_insert_with(|| toml::Value::String(cfg.node.clone()));
    let rc: role::Config =
        toml::Value::Table(t).try_into().map_err(|source| RoleError::Section { path: cfg.path.clone(), source })?;
    rc.validate().map_err(|source| RoleError::Invalid { path: cfg.path.clone(), source })?;
    Ok(rc)
}

/// Why `serve` must refuse a sync now: this node is (becoming) primary, or its role state cannot be read (then
/// nobody can say it is a standby). `None`: it accepts syncs.
pub fn refuses_syncs(cfg: &Config) -> Option<String> {
    let layout = cfg.layout();
    let dir = layout.role_dir();
    match role::accepts_syncs(dir) {
        Ok(true) => None,
        Ok(false) => Some(match crate::protect::node_of(cfg) {
            Some(p) => format!(
                "standby {} acts for primary {p} (promoted for it): it does not accept {p}'s syncs; hand the service \
                 back first (`blockrep switchover` on {p} once it is this standby's standby again, or `blockrep demote \
                 --for {p}` here)",
                cfg.node
            ),
            None => format!("this node ({}) is primary: it does not accept syncs; demote it first", cfg.node),
        }),
        Err(e) => Some(format!(
            "this node ({}) cannot read its role state in {} ({e}); it does not accept syncs until that is \
             repaired (`blockrep status` on it shows the same error)",
            cfg.node,
            dir.display()
        )),
    }
}

/// Every path a configured volume replicates (sources and shadows): the state directory must be on none of them.
fn replicated(cfg: &Config) -> Vec<PathBuf> {
    cfg.volumes.iter().flat_map(|v| v.source.iter().chain(v.shadow.iter()).cloned()).collect()
}

/// The guards that need the engine (committed shadows) and the protocol (peer's role).
struct NodeGuards<'a> {
    cfg: &'a Config,
    io: engine::volume::IoOptions,
    /// A shadow rolled back to a retained generation may be promoted (`promote --generation` just did that).
    accept_rolled_back: bool,
}

impl role::Guards for NodeGuards<'_> {
    fn data_committed(&self) -> Result<Option<u64>, String> {
        let layout = self.cfg.layout();
        let mut oldest: Option<u64> = None;
        for v in self.cfg.volumes.iter().filter(|v| v.shadow.is_some()) {
            let shadow = v.shadow.as_ref().expect("filtered");
            let dir = layout.side_dir(Side::Standby, &v.name);
            // Opening the target rolls a committed spool forward; an uncommitted one never touched the shadow.
            let t = crate::verify::open_target(shadow, &dir, TargetOptions::new(&v.name, self.io))
                .map_err(|e| format!("volume {}: cannot open the shadow: {}", v.name, link::error_chain(&e)))?;
            let info = t.info();
            if !info.complete || info.generation == 0 {
                return Err(format!(
                    "volume {} has no complete generation on this node (the first full sync has not finished)",
                    v.name
                ));
            }
            let rolled_back = t.rolled_back_to().filter(|_| self.accept_rolled_back);
            if let Some(why) = t.tampered().filter(|_| rolled_back.is_none()) {
                return Err(format!(
                    "volume {} has an untrusted shadow: {why}; it may not hold generation {} (sync it again from \
                     the peer, or promote with --force to serve it as it is)",
                    v.name, info.generation
                ));
            }
            // The commit time of the current generation's record; the manifest's mtime where there is none.
            let record = info.history.first().filter(|r| r.generation == info.generation);
            let synced = record
                .filter(|r| Some(r.id) == info.generation_id)
                .map(|r| r.time)
                .or_else(|| crate::layout::mtime_secs(&layout.target_manifest(&v.name)));
            oldest = match (oldest, synced) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
        }
        Ok(oldest)
    }

    fn peer_not_primary(&self) -> Result<String, String> {
        match peer_role(self.cfg) {
            Ok(None) => Ok("no peer address configured ([standby] peer); not checked".into()),
            Ok(Some(role::Role::Standby)) => Ok("the peer says it is standby".into()),
            Ok(Some(r)) => Err(format!("the peer answers and says it is {r}; demote it first (or use switchover)")),
            Err(e) => Ok(format!("the peer does not answer ({e})")),
        }
    }
}

/// A connection to the other node's `blockrep serve` for role queries.
fn peer_conn(cfg: &Config, connect_timeout: Duration, timeout: Duration) -> Result<netproto::Connection, String> {
    let addr = cfg.standby_peer.as_deref().ok_or("no peer address configured ([standby] peer)")?;
    let keys = cfg.keys().map_err(|e| e.to_string())?;
    let conn = netproto::connect_with(addr, &keys, &cfg.handshake_options(), connect_timeout)
        .map_err(|e| link::error_chain(&e))?;
    conn.set_timeout(Some(timeout)).map_err(|e| e.to_string())?;
    Ok(conn)
}

/// The other node's role over blockrep's protocol (`None`: no address configured).
fn peer_role(cfg: &Config) -> Result<Option<role::Role>, String> {
    if cfg.standby_peer.is_none() {
        return Ok(None);
    }
    let t = Duration::from_secs(cfg.connect_timeout_s);
    let mut conn = peer_conn(cfg, t.min(Duration::from_secs(5)), t)?;
    conn.send(&netproto::Message::RoleReq).map_err(|e| e.to_string())?;
    match conn.recv_expect("the peer's role").map_err(|e| e.to_string())? {
        netproto::Message::RoleInfo(r) => Ok(Some(role_from_wire(r.role))),
        other => Err(format!("unexpected answer {}", other.frame_type())),
    }
}

/// Wire code of a role.
pub fn role_to_wire(r: role::Role) -> u8 {
    match r {
        role::Role::Standby => 0,
        role::Role::Promoting => 1,
        role::Role::Primary => 2,
        role::Role::Demoting => 3,
    }
}

/// A role's wire code (the inverse of [`role_to_wire`]).
pub(crate) fn role_from_wire(r: u8) -> role::Role {
    match r {
        0 => role::Role::Standby,
        1 => role::Role::Promoting,
        2 => role::Role::Primary,
        _ => role::Role::Demoting,
    }
}

/// The peer for `switchover`, over blockrep's protocol.
struct ProtoPeer<'a> {
    cfg: &'a Config,
    io: engine::volume::IoOptions,
}

impl role::Peer for ProtoPeer<'_> {
    fn role(&self) -> Result<role::Role, String> {
        peer_role(self.cfg)?.ok_or_else(|| "no peer address configured ([standby] peer)".to_string())
    }

    /// Asks the peer to demote. A primary peer first stops its services and syncs every volume to this node;
    /// this node confirms only when its shadows hold exactly what the peer committed (generation and identifier),
    /// and only then does the peer demote.
    fn demote(&self, reason: &str) -> Result<(), role::PeerError> {
        use netproto::message::code;
        let mut conn = peer_conn(self.cfg, Duration::from_secs(self.cfg.connect_timeout_s), DEMOTE_TIMEOUT)?;
        conn.set_tcp_keepalive(Duration::from_secs(60)).map_err(|e| link::error_chain(&e))?;
        conn.send(&netproto::Message::DemoteReq(reason.into())).map_err(|e| e.to_string())?;
        let mut synced = false;
        loop {
            match conn.recv_expect("the peer's final sync and demote") {
                Ok(netproto::Message::FinalSynced(list)) if !synced => {
                    synced = true;
                    if let Err(why) = check_final_sync(self.cfg, &list, self.io) {
                        conn.send_error(
                            code::REFUSED,
                            &format!("the switchover's final sync is not on {}: {why}", self.cfg.node),
                        );
                        return Err(format!(
                            "its final sync finished, but this node does not hold what it committed: {why}; the peer \
                             restarts its services and stays primary"
                        )
                        .into());
                    }
                    tracing::info!(
                        volumes = list.len(),
                        "final sync: this node holds every generation the peer committed"
                    );
                    keep_references(self.cfg, self.io);
                    conn.send(&netproto::Message::DemoteConfirm).map_err(|e| e.to_string())?;
                }
                Ok(netproto::Message::DemoteDone) => {
                    if !synced {
                        tracing::warn!("the peer was not primary: it demoted without a final sync; this node promotes the data of its last sync");
                    }
                    return Ok(());
                }
                Ok(other) => return Err(format!("unexpected answer {}", other.frame_type()).into()),
                Err(netproto::ConnError::Remote { code: c, message }) => {
                    return Err(role::PeerError { reason: message, refused_as_unsafe: c == code::REFUSED })
                }
                Err(e) => return Err(link::error_chain(&e).into()),
            }
        }
    }
}

/// Whether this node's shadows hold exactly the generations of a switchover's final sync: every volume with a
/// shadow here is in `list`, and its committed generation and identifier are the listed ones.
fn check_final_sync(
    cfg: &Config,
    list: &[netproto::message::Committed],
    io: engine::volume::IoOptions,
) -> Result<(), String> {
    let layout = cfg.layout();
    if let Some(c) = list.iter().find(|c| !cfg.volumes.iter().any(|v| v.name == c.volume && v.shadow.is_some())) {
        return Err(format!("volume {} was synced by the peer but has no shadow configured on this node", c.volume));
    }
    for v in cfg.volumes.iter().filter(|v| v.shadow.is_some()) {
        let shadow = v.shadow.as_ref().expect("filtered");
        let c = list.iter().find(|c| c.volume == v.name).ok_or_else(|| {
            format!("volume {} has a shadow on this node but was not in the peer's final sync", v.name)
        })?;
        let t = crate::verify::open_target(
            shadow,
            &layout.side_dir(Side::Standby, &v.name),
            TargetOptions::new(&v.name, io),
        )
        .map_err(|e| format!("volume {}: cannot open the shadow: {}", v.name, link::error_chain(&e)))?;
        let info = t.info();
        if !info.complete || info.generation != c.generation || info.generation_id != Some(c.id) {
            let here = info.generation_id.as_ref().map_or_else(|| "unknown".into(), engine::generations::id_hex);
            return Err(format!(
                "volume {}: the peer committed generation {} ({}), this node's shadow holds generation {} ({here}); \
                 is the peer's [primary] peer this node?",
                v.name,
                c.generation,
                engine::generations::id_hex(&c.id),
                info.generation
            ));
        }
    }
    Ok(())
}

/// Whether `a` and `b` are the same file or device (by path, or by device and inode / device number).
fn same_volume(a: &Path, b: &Path) -> bool {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let id = |p: &Path| {
        std::fs::metadata(p).ok().map(|m| {
            if m.file_type().is_block_device() {
                (u64::MAX, m.rdev())
            } else {
                (m.dev(), m.ino())
            }
        })
    };
    a == b || matches!((id(a), id(b)), (Some(x), Some(y)) if x == y)
}

/// Switchback, the promoting side: before this node's shadows become production, keeps each trusted shadow's
/// committed generation (manifest and record, [`Target::reference`](engine::target::Target::reference)) as this
/// node's primary-side reference, so that its first sync to the old primary, which holds the same generation
/// ([`adopt_final_sync`]), is incremental. A shadow that is not trusted keeps nothing (that sync compares); a
/// failure is logged (the same).
fn keep_references(cfg: &Config, io: engine::volume::IoOptions) {
    let layout = cfg.layout();
    for_each_shadow_target(cfg, io, |v, t| {
        let r = t.map_err(|e| link::error_chain(&e)).and_then(|t| match t.reference() {
            None => Ok(None),
            Some((m, record)) => {
                let dest = layout.source_manifest(&v.name);
                engine::generations::adopt_source(&engine::durable::Durable::new(), &dest, m.path(), &record)
                    .map(|()| Some(record))
                    .map_err(|e| e.to_string())
            }
        });
        match r {
            Ok(Some(record)) => {
                tracing::info!(
                    volume = %v.name,
                    "kept the promoted {} as this node's reference for syncing back to the old primary",
                    engine::generations::describe(&record)
                );
                record_adoption(cfg, &v.name, "primary", &record);
            }
            Ok(None) => tracing::info!(
                volume = %v.name,
                "the shadow is not trusted to hold its committed generation: the first sync back to the old primary compares"
            ),
            Err(e) => {
                tracing::warn!(volume = %v.name, "cannot keep the promoted generation as a reference ({e}); the first sync back compares")
            }
        }
    });
}

/// Opens the target of each shadow of this node whose shadow and standby state both exist (what a promote turns
/// into production) and hands it, or the error opening it, to `f` with its volume.
fn for_each_shadow_target(
    cfg: &Config,
    io: engine::volume::IoOptions,
    mut f: impl FnMut(&crate::config::Volume, Result<engine::target::Target, engine::target::TargetError>),
) {
    let layout = cfg.layout();
    for v in &cfg.volumes {
        let Some(shadow) = &v.shadow else { continue };
        let dir = layout.side_dir(Side::Standby, &v.name);
        if shadow.exists() && dir.exists() {
            f(v, crate::verify::open_target(shadow, &dir, TargetOptions::new(&v.name, io)));
        }
    }
}

/// Records an adoption in the history (`blockrep log`).
fn record_adoption(cfg: &Config, volume: &str, side: &str, record: &link::GenRecord) {
    let event = crate::history::Event::Adopted {
        volume: volume.into(),
        side: side.into(),
        generation: record.generation,
        id: engine::generations::id_hex(&record.id),
    };
    crate::history::append(cfg, event);
}

/// Switchback, the demoting side: after a switchover's final sync that the peer confirmed, each volume whose
/// shadow is its source here (the configuration of a pair that switches back) records in its standby state that
/// it holds the generation just committed (the primary manifest and record,
/// [`Target::adopt`](engine::target::Target::adopt), with fresh evidence of the volume): the peer's first sync
/// back is then incremental. A volume written later is caught by that evidence; a failure is logged (the sync
/// back compares).
fn adopt_final_sync(cfg: &Config, list: &[netproto::message::Committed], io: engine::volume::IoOptions) {
    let layout = cfg.layout();
    for v in &cfg.volumes {
        let (Some(source), Some(shadow)) = (&v.source, &v.shadow) else { continue };
        let Some(c) = list.iter().find(|c| c.volume == v.name) else { continue };
        if !same_volume(source, shadow) {
            continue;
        }
        let manifest = layout.source_manifest(&v.name);
        let gens = engine::generations::read_source(&engine::generations::source_path(&manifest));
        let Some(record) = gens.history.current.filter(|r| r.generation == c.generation && r.id == c.id) else {
            tracing::warn!(volume = %v.name, "the final sync's record is not current here; the sync back compares");
            continue;
        };
        let r = crate::verify::open_target(
            shadow,
            &layout.side_dir(Side::Standby, &v.name),
            TargetOptions::new(&v.name, io),
        )
        .and_then(|mut t| t.adopt(&manifest, &record));
        match r {
            Ok(()) => {
                tracing::info!(
                    volume = %v.name,
                    "as a standby this volume holds {}: the sync back from the peer can be incremental",
                    engine::generations::describe(&record)
                );
                record_adoption(cfg, &v.name, "standby", &record);
            }
            Err(e) => tracing::warn!(
                volume = %v.name,
                "cannot record the final sync's generation for the standby side ({}); the sync back compares",
                link::error_chain(&e)
            ),
        }
    }
}

/// Ignores a sync's progress (a switchover's final sync runs inside `serve`).
struct Quiet;

impl crate::primary::SyncObserver for Quiet {
    fn progress(&mut self, _: &str, _: u64, _: u64) {}
    fn finished(&mut self, _: &crate::primary::VolumeOutcome, _: usize) {}
}

/// How long the standby waits for the primary it hands a service back to (its whole switchover).
const HANDBACK_TIMEOUT: Duration = DEMOTE_TIMEOUT;

/// What one look at an automatic fallback found ([`fallback_if_due`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FallbackStep {
    /// Not now, and why (not acting, held too briefly, locked, the primary not back as a standby).
    NotYet(String),
    /// The primary took its service back.
    HandedBack,
}

/// Automatic fallback (`fallback = "automatic"` of a `[[primary]]` block), run by the standby's `serve`: when
/// this standby acts for the primary of `cfg` (primary, no plan in progress) for at least `min_hold`, no
/// maintenance lock involves it, and the primary answers at its `address` as a standby, the standby syncs its
/// volumes back to it (services running: reverse replication) and then asks it to take the service back
/// ([`netproto::Message::HandbackReq`]); the primary runs a planned switchover ([`run`] with
/// [`Plan::Switchover`]), which asks this standby to demote after a final sync
/// ([`demote_for_switchover`]).
pub fn fallback_if_due(cfg: &Config, io: engine::volume::IoOptions) -> Result<FallbackStep, Error> {
    let Some(p) = &cfg.protects else { return Ok(FallbackStep::NotYet("not a protected primary".into())) };
    let st = role::status(cfg.layout().role_dir()).map_err(RoleError::StateDir)?;
    if st.role != role::Role::Primary || st.plan.is_some() {
        return Ok(FallbackStep::NotYet(format!("this standby does not act for {}", p.node)));
    }
    let since = st.last_switchover.as_ref().map_or(0, |s| s.time);
    let held = crate::history::now().saturating_sub(since);
    if held < p.min_hold.as_secs() {
        return Ok(FallbackStep::NotYet(format!(
            "acting for {} for {held} s of the {} s min_hold",
            p.node,
            p.min_hold.as_secs()
        )));
    }
    match crate::maint_lock::locks(cfg) {
        Ok(l) => {
            if let Some(l) = l.iter().find(|l| l.node == p.node || l.node == cfg.node) {
                return Ok(FallbackStep::NotYet(format!("{} is locked for maintenance ({})", l.node, l.entry.reason)));
            }
        }
        Err(e) => return Ok(FallbackStep::NotYet(format!("the maintenance lock file cannot be read: {e}"))),
    }
    match peer_role(cfg) {
        Ok(Some(role::Role::Standby)) => {}
        Ok(Some(r)) => return Ok(FallbackStep::NotYet(format!("primary {} answers as {r}, not as a standby", p.node))),
        Ok(None) => return Ok(FallbackStep::NotYet(format!("no address configured for primary {}", p.node))),
        Err(e) => return Ok(FallbackStep::NotYet(format!("primary {} is not back: {e}", p.node))),
    }
    // Resynchronise first, services running, so that the final sync of the switchover is short.
    tracing::info!(primary = %p.node, "automatic fallback: {} is back as a standby; syncing its volumes back", p.node);
    let o = crate::primary::NetSyncOptions { io, ..Default::default() };
    crate::primary::sync_volumes_with(cfg, &[], &o, &mut Quiet, None)?.into_result()?;
    let reason =
        format!("automatic fallback: standby {} acted for {} for {held} s and resynchronised it", cfg.node, p.node);
    crate::history::append(cfg, crate::history::Event::Switchover { plan: "fallback".into(), reason: reason.clone() });
    tracing::info!(primary = %p.node, "{reason}; asking it to take its service back");
    let failed = |message: String| -> Error { RoleError::Fallback { primary: p.node.clone(), message }.into() };
    let t = Duration::from_secs(cfg.connect_timeout_s);
    let mut conn = peer_conn(cfg, t, HANDBACK_TIMEOUT).map_err(failed)?;
    conn.send(&netproto::Message::HandbackReq(reason)).map_err(|e| failed(e.to_string()))?;
    match conn.recv_expect("the primary's switchover").map_err(|e| failed(link::error_chain(&e)))? {
        netproto::Message::HandbackDone => Ok(FallbackStep::HandedBack),
        other => Err(failed(format!("unexpected answer {}", other.frame_type()))),
    }
}

/// The demoting side of a planned switchover, run by `serve` when the peer asks (`peer`: its node name). A
/// primary stops its primary-only services, syncs every volume to its `[primary] peer`, passes what it committed
/// to `confirm` (which waits for the peer to check its shadows), and only then runs its demote plan. If the
/// final sync or the peer's check fails, it restarts its services, stays primary and says so in the refusal
/// (code `REFUSED` where the sync was refused as unsafe). A node that is not primary only runs the demote plan.
pub fn demote_for_switchover(
    cfg: &Config,
    peer: &str,
    reason: &str,
    io: engine::volume::IoOptions,
    confirm: &mut dyn FnMut(Vec<netproto::message::Committed>) -> Result<(), netproto::Refusal>,
) -> Result<Report, netproto::Refusal> {
    use netproto::message::code;
    use netproto::Refusal;
    let failed = |e: &Error| {
        Refusal::new(if e.kind() == ErrorKind::Unsafe { code::REFUSED } else { code::FAILED }, link::error_chain(e))
    };
    let opts = PlanOptions { reason: format!("switchover requested by {peer}: {reason}"), ..Default::default() };
    // A maintenance lock on this node (for this node or for the peer) refuses before anything stops.
    crate::maint_lock::refuse_if_locked(cfg, &format!("demote for a switchover requested by {peer}"), None).map_err(
        |e| {
            tracing::warn!("switchover: {e}");
            failed(&e.into())
        },
    )?;
    let rc = role_config(cfg).map_err(|e| failed(&e))?;
    let primary = role::status(&rc.state_dir).is_ok_and(|s| s.role == role::Role::Primary && s.plan.is_none());
    if primary {
        let committed = final_sync(cfg, &rc, &opts.reason, io).and_then(|list| {
            crate::history::append(
                cfg,
                crate::history::Event::Switchover { plan: "final-sync".into(), reason: opts.reason.clone() },
            );
            confirm(list.clone())
                .map_err(|r| Refusal::new(r.code, format!("the peer did not confirm the final sync: {}", r.message)))
                .map(|()| list)
        });
        if let Err(r) = committed {
            let restarted = match role::start_primary_services(&rc) {
                Ok(_) => "restarted its primary-only services".to_string(),
                Err(e) => format!(
                    "could not restart its primary-only services ({}): start them by hand",
                    link::error_chain(&e)
                ),
            };
            let message = format!("{}; nothing was demoted: {} {restarted} and stays primary", r.message, cfg.node);
            tracing::error!("switchover: {message}");
            return Err(Refusal::new(r.code, message));
        }
        if let Ok(list) = &committed {
            adopt_final_sync(cfg, list, io);
        }
    }
    let report = run(cfg, Plan::Demote, &opts, io).map_err(|e| failed(&e))?;
    if let Err(e) = role::quiesce_done(&rc) {
        tracing::warn!("switchover: {e}; the next start of serve removes it");
    }
    crate::history::append(cfg, crate::history::Event::Switchover { plan: "demote".into(), reason: opts.reason });
    Ok(report)
}

/// At the start of `serve` and of `reconcile`: a switchover whose final sync stopped this primary's services and
/// that ended before the demote (the process was killed, or stopped during the final sync) left this node primary
/// with its services stopped; they are started again, with a warning and a history entry. Nothing to do without a
/// `[role]` section; failures are logged.
pub fn resume_interrupted_switchover(cfg: &Config) {
    let Ok(rc) = role_config(cfg) else { return };
    match role::resume_interrupted_quiesce(&rc) {
        Ok(None) => {}
        Ok(Some((reason, started))) => {
            tracing::warn!(
                ?started,
                "a switchover ({reason}) stopped before this node demoted: it is still primary, its primary-only \
                 services were started again"
            );
            crate::history::append(
                cfg,
                crate::history::Event::Switchover {
                    plan: "resume".into(),
                    reason: format!("{reason}: interrupted before the demote; primary-only services started again"),
                },
            );
        }
        Err(e) => tracing::error!(
            "a switchover stopped this primary's services and did not finish: {}; start them by hand \
             (this node is still primary)",
            link::error_chain(&e)
        ),
    }
}

/// A switchover's final sync: stops the primary-only services, waits for a running sync to end, syncs every
/// volume and returns each one's committed generation and identifier.
fn final_sync(
    cfg: &Config,
    rc: &role::Config,
    reason: &str,
    io: engine::volume::IoOptions,
) -> Result<Vec<netproto::message::Committed>, netproto::Refusal> {
    use netproto::message::code;
    use netproto::Refusal;
    let stopped = role::stop_primary_services(rc, reason).map_err(|e| {
        Refusal::new(
            code::FAILED,
            format!("cannot stop the primary-only services for the final sync: {}", link::error_chain(&e)),
        )
    })?;
    tracing::info!(?stopped, "switchover: primary-only services stopped, the volumes are quiescent; final sync");
    let t = std::time::Instant::now();
    while crate::lock::holder(cfg).is_some() && t.elapsed() < SYNC_LOCK_WAIT {
        std::thread::sleep(Duration::from_millis(200));
    }
    let o = crate::primary::NetSyncOptions { io, ..Default::default() };
    let cancel = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let fail = |e: Error| {
        let c = if e.kind() == ErrorKind::Unsafe { code::REFUSED } else { code::FAILED };
        Refusal::new(c, format!("the final sync before the switchover failed: {}", crate::error_chain(&e)))
    };
    let run = crate::primary::sync_volumes_with(cfg, &[], &o, &mut Quiet, Some(cancel)).map_err(fail)?;
    if run.total == 0 {
        return Err(Refusal::new(
            code::FAILED,
            "the final sync before the switchover did not run: replication is disabled on this node \
             (blockrep replication enable)",
        ));
    }
    run.into_result().map_err(fail)?;
    let layout = cfg.layout();
    let mut list = Vec::new();
    for v in cfg.select(&[]).map_err(|e| fail(e.into()))? {
        let g = engine::generations::read_source(&engine::generations::source_path(&layout.source_manifest(&v.name)));
        let cur = g.history.current.ok_or_else(|| {
            Refusal::new(code::FAILED, format!("volume {}: the final sync left no generation record", v.name))
        })?;
        list.push(netproto::message::Committed { volume: v.name.clone(), generation: cur.generation, id: cur.id });
    }
    Ok(list)
}

/// `lv-rename` boot target through lvmctl.
struct LvmRenamer(lvmctl::Lvm);

impl role::LvRenamer for LvmRenamer {
    fn exists(&self, vg: &str, lv: &str) -> Result<bool, role::boot::LvmError> {
        Ok(self.0.find_lv(vg, lv)?.is_some())
    }

    fn rename(&self, vg: &str, from: &str, to: &str) -> Result<(), role::boot::LvmError> {
        Ok(self.0.rename_lv(vg, from, to)?)
    }
}

/// Runs a plan and returns its report. With `io`, the guards open the shadows.
pub fn run(cfg: &Config, plan: Plan, a: &PlanOptions, io: engine::volume::IoOptions) -> Result<Report, Error> {
    let rc = role_config(cfg)?;
    role::check_state_dir(&rc.state_dir, &replicated(cfg)).map_err(RoleError::StateDir)?;
    // A promote of a node that already is primary, with no plan in progress, only re-asserts the virtual IP (a
    // reboot loses it): its shadows do not become production, so nothing below that prepares them applies.
    let reassert = plan == Plan::Promote
        && role::status(cfg.layout().role_dir()).is_ok_and(|s| s.role == role::Role::Primary && s.plan.is_none());
    if reassert && !a.generations.is_empty() {
        return Err(RoleError::GenerationWhilePrimary.into());
    }
    refuse_if_maintenance(cfg, plan, reassert)?;
    let lvm = match &rc.boot_target {
        role::config::BootTarget::LvRename { .. } => Some(LvmRenamer(lvmctl::Lvm::new().map_err(RoleError::from)?)),
        _ => None,
    };
    let opts = role::Options {
        force: a.force,
        dry_run: a.dry_run,
        reason: a.reason.clone(),
        lvm: lvm.as_ref().map(|l| l as &dyn role::LvRenamer),
        poweroff: a.poweroff,
        reassert_only: reassert,
        ..Default::default()
    };
    // Before anything touches the boot target: finish every interrupted commit (with or without --force, which
    // only skips the guards), and never promote a shadow that cannot be finished.
    if plan != Plan::Demote && !a.dry_run && !reassert {
        if let Some(f) = crate::shadow::roll_forward(cfg, io).into_iter().next() {
            return Err(RoleError::NotRolledForward { volume: f.volume, error: f.error }.into());
        }
    }
    if plan == Plan::Promote && !a.dry_run && !reassert {
        for (volume, generation) in &a.generations {
            let r = crate::retain::restore(cfg, volume, *generation, a.force, io)?;
            tracing::warn!(volume, generation, committed = r.committed, "promoting a retained generation");
        }
        keep_references(cfg, io);
    }
    let guards = NodeGuards { cfg, io, accept_rolled_back: plan == Plan::Promote && !a.generations.is_empty() };
    // Only a node that was (becoming) primary: a demote of a standby does nothing and must not touch its standby
    // state. Before the plan, which may end with a poweroff; harmless if the plan then fails (the mark only makes
    // a later sync to this node compare).
    let not_standby = role::status(cfg.layout().role_dir()).is_ok_and(|s| s.role != role::Role::Standby);
    if plan == Plan::Demote && !a.dry_run && not_standby {
        adopt_after_demote(cfg, io);
        match crate::freeze::remove_leftover_snapshots(cfg) {
            Ok(removed) if !removed.is_empty() => {
                tracing::info!(
                    ?removed,
                    "removed the snapshots an interrupted sync or a change tracker left on this node's volumes"
                )
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(
                "cannot remove a snapshot an interrupted sync left behind ({}); the next sync as primary removes it",
                crate::error_chain(&e)
            ),
        }
    }
    let result = match plan {
        Plan::Promote => role::promote(&rc, &guards, &opts).map_err(RoleError::from),
        Plan::Demote => role::demote(&rc, &opts).map_err(RoleError::from),
        Plan::Switchover => role::switchover(&rc, &guards, &ProtoPeer { cfg, io }, &opts).map_err(RoleError::from),
    };
    // Once this node's plan began (it succeeded, or failed with the role state no longer standby), the shadows
    // are (or may be) production: give their content a new identifier and mark them untrusted, so that a later
    // sync from the old primary is a split brain it refuses instead of silently discarding what this node wrote.
    let began = result.is_ok() || role::status(cfg.layout().role_dir()).is_ok_and(|s| s.role != role::Role::Standby);
    if plan != Plan::Demote && !a.dry_run && began && !reassert {
        mark_promoted(cfg, io);
    }
    Ok(result?)
}

/// What [`reconcile`] found and did.
#[derive(Debug)]
pub enum Reconciled {
    /// No `[role]` section: blockrep manages no address or service on this node.
    NoRole,
    /// This node is not primary: nothing to re-assert (the role found).
    NotPrimary(role::Role),
    /// This node is primary and nobody else serves: its virtual IP was re-asserted.
    Reasserted(Report),
    /// This node was primary, but another node serves (it holds the address or says it is primary, so it took
    /// over while this one was away): this node demoted.
    Demoted {
        /// The refusal that showed it.
        why: String,
        /// The demote.
        report: Report,
    },
}

/// After a reboot, or a cluster engine's restart (keepalived starts every instance in BACKUP): a primary that
/// nobody replaced re-asserts its virtual IP (a promote of a primary: peer guard, ARP probe / DAD, the address,
/// the announcements; services untouched); a primary another node replaced demotes (its services stop, so the
/// two do not both write); a standby does nothing. A promote or demote that did not finish is an error: which
/// way to finish it is the operator's (or the cluster engine's) decision.
pub fn reconcile(cfg: &Config, reason: &str, io: engine::volume::IoOptions) -> Result<Reconciled, Error> {
    if cfg.role.is_none() {
        return Ok(Reconciled::NoRole);
    }
    resume_interrupted_switchover(cfg);
    let st = role::status(cfg.layout().role_dir()).map_err(RoleError::StateDir)?;
    if let Some(p) = &st.plan {
        return Err(RoleError::Interrupted { kind: format!("{:?}", p.kind).to_lowercase(), role: st.role }.into());
    }
    if st.role != role::Role::Primary {
        return Ok(Reconciled::NotPrimary(st.role));
    }
    let opts = PlanOptions { reason: reason.to_owned(), ..Default::default() };
    let why = match run(cfg, Plan::Promote, &opts, io) {
        Ok(report) => return Ok(Reconciled::Reasserted(report)),
        Err(Error::Roles(e)) if matches!(&*e, RoleError::Plan(p) if p.refused_as_unsafe()) => link::error_chain(&*e),
        Err(e) => return Err(e),
    };
    tracing::warn!(%why, "this node was primary, but another node serves: demoting");
    let opts = PlanOptions { reason: format!("{reason}: another node serves ({why})"), ..Default::default() };
    let report = run(cfg, Plan::Demote, &opts, io)?;
    Ok(Reconciled::Demoted { why, report })
}

/// A maintenance lock ([`crate::maint_lock`]) refuses a promote or switchover of this node, `--force` and
/// `--dry-run` included, before anything is touched. Not refused: a demote (how maintenance of a primary starts),
/// and a promote of a node that already is primary with no plan in progress (it only re-asserts the virtual IP).
fn refuse_if_maintenance(cfg: &Config, plan: Plan, reassert: bool) -> Result<(), Error> {
    let action = match plan {
        Plan::Demote => return Ok(()),
        Plan::Promote => "promote",
        Plan::Switchover => "switch over",
    };
    if reassert {
        if crate::maint_lock::locks(cfg).is_ok_and(|l| !l.is_empty()) {
            tracing::info!("already primary: re-asserting the virtual IP under the maintenance lock (no role change)");
        }
        return Ok(());
    }
    // One peer today: every lock on this node involves the role change (`None`).
    crate::maint_lock::refuse_if_locked(cfg, action, None)?;
    Ok(())
}

/// Switchback after an unplanned promote of the peer, the demoted side: each volume whose shadow is its source
/// here records in its standby state that it descends from this node's last generation as primary (the primary
/// manifest and record, [`Target::adopt_written`](engine::target::Target::adopt_written)) and may have been
/// written since, so the new primary, which promoted that generation, compares the actual content on its first
/// sync back instead of refusing it as a split brain (the standby side's record was the one this node's own
/// earlier promote gave it, which the peer never saw). Skipped where the standby side already holds that record
/// (a switchover's final sync adopted it, [`adopt_final_sync`]). A failure is logged: the sync back is then
/// refused as a split brain, as before.
fn adopt_after_demote(cfg: &Config, io: engine::volume::IoOptions) {
    let layout = cfg.layout();
    for v in &cfg.volumes {
        let (Some(source), Some(shadow)) = (&v.source, &v.shadow) else { continue };
        if !same_volume(source, shadow) {
            continue;
        }
        let manifest = layout.source_manifest(&v.name);
        let gens = engine::generations::read_source(&engine::generations::source_path(&manifest));
        let Some(record) = gens.history.current else { continue };
        let dir = layout.side_dir(Side::Standby, &v.name);
        let r = crate::verify::open_target(shadow, &dir, TargetOptions::new(&v.name, io)).and_then(|mut t| {
            if t.info().history.first().is_some_and(|c| c.id == record.id) {
                return Ok(false);
            }
            t.adopt_written(&manifest, &record).map(|()| true)
        });
        match r {
            Ok(false) => {}
            Ok(true) => {
                tracing::info!(
                    volume = %v.name,
                    "as a standby this volume descends from {} and may have been written since: the peer's sync \
                     back compares",
                    engine::generations::describe(&record)
                );
                record_adoption(cfg, &v.name, "standby-written", &record);
            }
            Err(e) => tracing::warn!(
                volume = %v.name,
                "cannot record this node's last generation for the standby side ({}); the peer's sync back may be \
                 refused as a split brain",
                link::error_chain(&e)
            ),
        }
    }
}

/// Records on every shadow of this node that it became production
/// ([`Target::mark_promoted`](engine::target::Target::mark_promoted)); a failure is logged (the write counters of
/// block devices still show the writes).
fn mark_promoted(cfg: &Config, io: engine::volume::IoOptions) {
    for_each_shadow_target(cfg, io, |v, t| {
        if let Err(e) = t.and_then(|mut t| t.mark_promoted(&cfg.node)) {
            tracing::warn!(volume = %v.name, "cannot record that the shadow became production: {}", link::error_chain(&e));
        }
    });
}

/// `blockrep announce`: periodic gratuitous ARP while primary, so neighbours that missed the first announcement
/// learn the new MAC; SIGTERM/SIGINT stop it.
pub fn announce(cfg: &Config) -> Result<(), Error> {
    let rc = role_config(cfg)?;
    let stop = crate::signals::stop_flag("stop requested")?;
    role::arp::refresh(&rc, &stop).map_err(RoleError::Announce)?;
    Ok(())
}

/// Starts `exe --config CONFIG announce` in the background (own process group, no terminal), after a promote.
/// `exe` is the `blockrep` binary.
pub fn spawn_announcer(exe: &Path, config: &Path, for_primary: Option<&str>) -> Result<(), Error> {
    use std::os::unix::process::CommandExt;
    let mut cmd = std::process::Command::new(exe);
    cmd.arg("--config").arg(config).arg("announce");
    if let Some(p) = for_primary {
        cmd.arg("--for").arg(p);
    }
    cmd.stdin(std::process::Stdio::null()).stdout(std::process::Stdio::null()).stderr(std::process::Stdio::null());
    cmd.process_group(0);
    cmd.spawn().map_err(RoleError::SpawnAnnouncer)?;
    Ok(())
}
