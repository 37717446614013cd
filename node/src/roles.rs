//! Roles: the `[role]` section as the role crate's configuration, the guards that need the engine (committed
//! shadows) and the protocol (the peer's role), LVM renames for the `lv-rename` boot target, the plans
//! (promote, demote, switchover) and the periodic re-announcement of the virtual IP.

use std::path::{Path, PathBuf};
use std::time::Duration;

use engine::target::{Target, TargetOptions};

pub use role::Report;

use crate::config::{Config, ConfigError};
use crate::layout::Side;
use crate::{Error, ErrorKind};

/// How long a switchover waits for the peer's demote plan.
const DEMOTE_TIMEOUT: Duration = Duration::from_secs(600);

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
    /// The background re-announcement could not be started.
    #[error("cannot start the background re-announcement (blockrep announce)")]
    SpawnAnnouncer(#[source] std::io::Error),
}

impl RoleError {
    /// The kind of this error: a guard's refusal is [`ErrorKind::Unsafe`].
    pub fn kind(&self) -> ErrorKind {
        match self {
            RoleError::Section { .. } | RoleError::Invalid { .. } | RoleError::StateDir(_) => ErrorKind::Usage,
            RoleError::Plan(e) if e.refused_as_unsafe() => ErrorKind::Unsafe,
            RoleError::NotRolledForward { .. } => ErrorKind::Unsafe,
            RoleError::Switchover(role::SwitchoverError::LocalPromote(e)) if e.refused_as_unsafe() => ErrorKind::Unsafe,
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
        Ok(false) => Some(format!("this node ({}) is primary: it does not accept syncs; demote it first", cfg.node)),
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
}

impl role::Guards for NodeGuards<'_> {
    fn data_committed(&self) -> Result<Option<u64>, String> {
        let layout = self.cfg.layout();
        let mut oldest: Option<u64> = None;
        for v in self.cfg.volumes.iter().filter(|v| v.shadow.is_some()) {
            let shadow = v.shadow.as_ref().expect("filtered");
            let dir = layout.side_dir(Side::Standby, &v.name);
            // Opening the target rolls a committed spool forward; an uncommitted one never touched the shadow.
            let t = Target::open(shadow, &dir, TargetOptions::new(&v.name, self.io))
                .map_err(|e| format!("volume {}: cannot open the shadow: {}", v.name, link::error_chain(&e)))?;
            let info = t.info();
            if !info.complete || info.generation == 0 {
                return Err(format!(
                    "volume {} has no complete generation on this node (the first full sync has not finished)",
                    v.name
                ));
            }
            if let Some(why) = t.tampered() {
                return Err(format!(
                    "volume {} has an untrusted shadow: {why}; it may not hold generation {} (sync it again from \
                     the peer, or promote with --force to serve it as it is)",
                    v.name, info.generation
                ));
            }
            let synced = crate::layout::mtime_secs(&layout.target_manifest(&v.name));
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
    let key = netproto::load_key(&cfg.key_file).map_err(|e| e.to_string())?;
    let conn = netproto::connect(addr, &key, &cfg.node, connect_timeout).map_err(|e| link::error_chain(&e))?;
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
struct ProtoPeer<'a>(&'a Config);

impl role::Peer for ProtoPeer<'_> {
    fn role(&self) -> Result<role::Role, String> {
        peer_role(self.0)?.ok_or_else(|| "no peer address configured ([standby] peer)".to_string())
    }

    fn demote(&self, reason: &str) -> Result<(), String> {
        // The peer's demote runs its stop hooks (each with its own timeout); do not wait forever.
        let mut conn = peer_conn(self.0, Duration::from_secs(self.0.connect_timeout_s), DEMOTE_TIMEOUT)?;
        conn.send(&netproto::Message::DemoteReq(reason.into())).map_err(|e| e.to_string())?;
        match conn.recv_expect("the peer's demote result").map_err(|e| link::error_chain(&e))? {
            netproto::Message::DemoteDone => Ok(()),
            other => Err(format!("unexpected answer {}", other.frame_type())),
        }
    }
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
        ..Default::default()
    };
    // Before anything touches the boot target: finish every interrupted commit (with or without --force, which
    // only skips the guards), and never promote a shadow that cannot be finished.
    if plan != Plan::Demote && !a.dry_run {
        if let Some(f) = crate::shadow::roll_forward(cfg, io).into_iter().next() {
            return Err(RoleError::NotRolledForward { volume: f.volume, error: f.error }.into());
        }
    }
    let guards = NodeGuards { cfg, io };
    let result = match plan {
        Plan::Promote => role::promote(&rc, &guards, &opts).map_err(RoleError::from),
        Plan::Demote => role::demote(&rc, &opts).map_err(RoleError::from),
        Plan::Switchover => role::switchover(&rc, &guards, &ProtoPeer(cfg), &opts).map_err(RoleError::from),
    };
    // Once this node's plan began (it succeeded, or failed with the role state no longer standby), the shadows
    // are (or may be) production: give their content a new identifier and mark them untrusted, so that a later
    // sync from the old primary is a split brain it refuses instead of silently discarding what this node wrote.
    let began = result.is_ok() || role::status(cfg.layout().role_dir()).is_ok_and(|s| s.role != role::Role::Standby);
    if plan != Plan::Demote && !a.dry_run && began {
        mark_promoted(cfg, io);
    }
    Ok(result?)
}

/// Records on every shadow of this node that it became production ([`Target::mark_promoted`]); a failure is
/// logged (the write counters of block devices still show the writes).
fn mark_promoted(cfg: &Config, io: engine::volume::IoOptions) {
    let layout = cfg.layout();
    for v in cfg.volumes.iter().filter(|v| v.shadow.is_some()) {
        let shadow = v.shadow.as_ref().expect("filtered");
        let dir = layout.side_dir(Side::Standby, &v.name);
        if !shadow.exists() || !dir.exists() {
            continue;
        }
        let r =
            Target::open(shadow, &dir, TargetOptions::new(&v.name, io)).and_then(|mut t| t.mark_promoted(&cfg.node));
        if let Err(e) = r {
            tracing::warn!(volume = %v.name, "cannot record that the shadow became production: {}", link::error_chain(&e));
        }
    }
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
pub fn spawn_announcer(exe: &Path, config: &Path) -> Result<(), Error> {
    use std::os::unix::process::CommandExt;
    let mut cmd = std::process::Command::new(exe);
    cmd.arg("--config").arg(config).arg("announce");
    cmd.stdin(std::process::Stdio::null()).stdout(std::process::Stdio::null()).stderr(std::process::Stdio::null());
    cmd.process_group(0);
    cmd.spawn().map_err(RoleError::SpawnAnnouncer)?;
    Ok(())
}
