//! Binding of the role manager (crate `role`) to the CLI: the `[role]` section, the guards that need the engine
//! and the protocol, LVM renames for the `lv-rename` boot target, and `status`, `promote`, `demote`,
//! `switchover`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use engine::sync::TargetLink;
use engine::target::Target;
use serde::Serialize;

use crate::config::Config;
use crate::exit::{coded, UNSAFE, USAGE};

/// How long a switchover waits for the peer's demote plan.
const DEMOTE_TIMEOUT: Duration = Duration::from_secs(600);

/// The role state directory when `[role]` does not name one.
pub fn default_role_dir(state_dir: &Path) -> PathBuf {
    state_dir.join("role")
}

/// The `[role]` section as the role crate's configuration: `state_dir` defaults to `<state_dir>/role` and `node`
/// to the top-level node name.
pub fn role_config(cfg: &Config) -> Result<role::Config> {
    let mut t = cfg.role.clone().ok_or_else(|| {
        coded(
            USAGE,
            format!(
                "{} has no [role] section (virtual IP, services, boot target): see docs/role.md",
                cfg.path.display()
            ),
        )
    })?;
    t.entry("state_dir")
        .or_insert_with(|| toml::Value::String(default_role_dir(&cfg.state_dir).to_string_lossy().into_owned()));
    t.entry("node").or_insert_with(|| toml::Value::String(cfg.node.clone()));
    let rc: role::Config = toml::Value::Table(t)
        .try_into()
        .map_err(|e| coded(USAGE, format!("configuration {}: [role]: {e}", cfg.path.display())))?;
    rc.validate().map_err(|e| coded(USAGE, format!("configuration {}: [role]: {e}", cfg.path.display())))?;
    Ok(rc)
}

/// The role state directory in use (configured or default).
pub fn role_dir(cfg: &Config) -> PathBuf {
    cfg.role
        .as_ref()
        .and_then(|t| t.get("state_dir"))
        .and_then(|v| v.as_str())
        .map(PathBuf::from)
        .unwrap_or_else(|| default_role_dir(&cfg.state_dir))
}

/// Whether this node is (becoming) primary, so `serve` must refuse syncs.
pub fn is_primary(cfg: &Config) -> bool {
    !role::accepts_syncs(&role_dir(cfg)).unwrap_or(false)
}

/// Every path a configured volume replicates (sources and shadows): the state directory must be on none of them.
fn replicated(cfg: &Config) -> Vec<PathBuf> {
    cfg.volumes.iter().flat_map(|v| v.source.iter().chain(v.shadow.iter()).cloned()).collect()
}

/// The guards that need the engine (committed shadows) and the protocol (peer's role).
struct CliGuards<'a> {
    cfg: &'a Config,
    io: engine::volume::IoOptions,
}

impl role::Guards for CliGuards<'_> {
    fn data_committed(&self) -> Result<Option<u64>, String> {
        let mut oldest: Option<u64> = None;
        for v in self.cfg.volumes.iter().filter(|v| v.shadow.is_some()) {
            let shadow = v.shadow.as_ref().expect("filtered");
            let dir = self.cfg.side_dir("standby", &v.name);
            // Opening the target rolls a committed spool forward; an uncommitted one never touched the shadow.
            let mut t = Target::open(shadow, &dir, crate::local::target_options(&v.name, self.io))
                .map_err(|e| format!("volume {}: cannot open the shadow: {:#}", v.name, anyhow::Error::from(e)))?;
            let info = t.info().map_err(|e| format!("volume {}: {e}", v.name))?;
            if !info.complete || info.generation == 0 {
                return Err(format!(
                    "volume {} has no complete generation on this node (the first full sync has not finished)",
                    v.name
                ));
            }
            let synced = std::fs::metadata(dir.join("manifest"))
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map(|d| d.as_secs());
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

/// The other node's role over blockrep's protocol (`None`: no address configured).
fn peer_role(cfg: &Config) -> Result<Option<role::Role>, String> {
    let Some(addr) = cfg.standby_peer.as_deref() else { return Ok(None) };
    let key = netproto::load_key(&cfg.key_file).map_err(|e| e.to_string())?;
    let mut conn = netproto::connect(addr, &key, &cfg.node, Duration::from_secs(cfg.connect_timeout_s.min(5)))
        .map_err(|e| format!("{:#}", anyhow::Error::from(e)))?;
    conn.set_timeout(Some(Duration::from_secs(cfg.connect_timeout_s))).map_err(|e| e.to_string())?;
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

fn role_from_wire(r: u8) -> role::Role {
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
        let cfg = self.0;
        let addr = cfg.standby_peer.as_deref().ok_or("no peer address configured ([standby] peer)")?;
        let key = netproto::load_key(&cfg.key_file).map_err(|e| e.to_string())?;
        let mut conn = netproto::connect(addr, &key, &cfg.node, Duration::from_secs(cfg.connect_timeout_s))
            .map_err(|e| format!("{:#}", anyhow::Error::from(e)))?;
        // The peer's demote runs its stop hooks (each with its own timeout); do not wait forever.
        conn.set_timeout(Some(DEMOTE_TIMEOUT)).map_err(|e| e.to_string())?;
        conn.send(&netproto::Message::DemoteReq(reason.into())).map_err(|e| e.to_string())?;
        match conn.recv_expect("the peer's demote result").map_err(|e| format!("{:#}", anyhow::Error::from(e)))? {
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

/// What `promote`, `demote` and `switchover` take from the command line.
#[derive(Debug, Clone)]
pub struct PlanArgs {
    /// Skip the guards.
    pub force: bool,
    /// Print the plan only.
    pub dry_run: bool,
    /// Reason recorded and passed to hooks.
    pub reason: String,
    /// Demote: power off and keep primary services disabled.
    pub poweroff: bool,
    /// JSON output.
    pub json: bool,
}

fn plan_error(e: role::PlanError) -> anyhow::Error {
    if e.refused_as_unsafe() {
        coded(UNSAFE, e.to_string())
    } else {
        anyhow::Error::from(e)
    }
}

fn print_report(r: &role::Report, json: bool) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string(r)?);
    } else {
        println!("{r}");
    }
    Ok(())
}

/// Runs `promote`, `demote` or `switchover` and prints the report.
pub fn run_plan(cfg: &Config, which: &str, a: &PlanArgs, io: engine::volume::IoOptions) -> Result<()> {
    let report = plan(cfg, which, a, io)?;
    print_report(&report, a.json)
}

/// Runs `promote`, `demote` or `switchover` and returns the report.
pub fn plan(cfg: &Config, which: &str, a: &PlanArgs, io: engine::volume::IoOptions) -> Result<role::Report> {
    let rc = role_config(cfg)?;
    role::check_state_dir(&rc.state_dir, &replicated(cfg)).map_err(|e| coded(USAGE, e.to_string()))?;
    let lvm = match &rc.boot_target {
        role::config::BootTarget::LvRename { .. } => Some(LvmRenamer(lvmctl::Lvm::new()?)),
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
    let guards = CliGuards { cfg, io };
    let report = match which {
        "promote" => role::promote(&rc, &guards, &opts).map_err(plan_error)?,
        "demote" => role::demote(&rc, &opts).map_err(plan_error)?,
        _ => role::switchover(&rc, &guards, &ProtoPeer(cfg), &opts).map_err(anyhow::Error::from)?,
    };
    Ok(report)
}

/// One volume in `status`.
#[derive(Debug, Serialize)]
struct VolumeStatus {
    name: String,
    /// `standby` (shadow here) or `primary` (source here).
    side: &'static str,
    generation: u64,
    complete: Option<bool>,
    /// Unix seconds of the last completed sync.
    last_sync: Option<u64>,
    /// Bytes kept from an interrupted transfer.
    pending_bytes: Option<u64>,
}

/// `blockrep status`.
#[derive(Debug, Serialize)]
struct StatusOut {
    node: String,
    #[serde(flatten)]
    role: role::Status,
    volumes: Vec<VolumeStatus>,
}

fn mtime_secs(p: &Path) -> Option<u64> {
    let m = std::fs::metadata(p).and_then(|m| m.modified()).ok()?;
    m.duration_since(std::time::UNIX_EPOCH).ok().map(|d| d.as_secs())
}

/// `blockrep status [--json]`: role, last switchover, and the generation of every volume on this node.
pub fn status(cfg: &Config, json: bool, io: engine::volume::IoOptions) -> Result<()> {
    let st = role::status(&role_dir(cfg)).context("cannot read the role state")?;
    let mut volumes = Vec::new();
    for v in &cfg.volumes {
        if let Some(shadow) = &v.shadow {
            let dir = cfg.side_dir("standby", &v.name);
            if shadow.exists() && dir.exists() {
                let mut t = Target::open(shadow, &dir, crate::local::target_options(&v.name, io))
                    .with_context(|| format!("volume {}: cannot open the shadow", v.name))?;
                let info = t.info()?;
                volumes.push(VolumeStatus {
                    name: v.name.clone(),
                    side: "standby",
                    generation: info.generation,
                    complete: Some(info.complete),
                    last_sync: mtime_secs(&dir.join("manifest")),
                    pending_bytes: info.pending.map(|p| p.bytes),
                });
                continue;
            }
        }
        if v.source.is_some() {
            let m = cfg.side_dir("primary", &v.name).join("manifest");
            let generation = engine::manifest::Manifest::open(&m).map(|m| m.generation()).unwrap_or(0);
            volumes.push(VolumeStatus {
                name: v.name.clone(),
                side: "primary",
                generation,
                complete: None,
                last_sync: mtime_secs(&m),
                pending_bytes: None,
            });
        }
    }
    let out = StatusOut { node: cfg.node.clone(), role: st, volumes };
    if json {
        println!("{}", serde_json::to_string(&out)?);
        return Ok(());
    }
    println!("node {}: {}{}", out.node, out.role.role, if out.role.accepts_syncs { " (accepts syncs)" } else { "" });
    match &out.role.last_switchover {
        Some(s) => println!("last switchover: {}", serde_json::to_string(s)?),
        None => println!("last switchover: none"),
    }
    if let Some(p) = &out.role.plan {
        println!("plan in progress: {}", serde_json::to_string(p)?);
    }
    for v in &out.volumes {
        println!(
            "volume {} ({}): generation {}{}{}",
            v.name,
            v.side,
            v.generation,
            match v.complete {
                Some(false) => ", INCOMPLETE (not promotable)",
                _ => "",
            },
            v.last_sync.map(|t| format!(", last sync at {t} (unix)")).unwrap_or_default()
        );
    }
    Ok(())
}

/// `blockrep announce`: periodic gratuitous ARP while primary, so neighbours that missed the first announcement
/// learn the new MAC.
pub fn announce(cfg: &Config) -> Result<()> {
    let rc = role_config(cfg)?;
    let stop = crate::snapshot::cancel_on_signals()?;
    role::arp::refresh(&rc, &stop).context("cannot re-announce the virtual IP")?;
    Ok(())
}

/// Starts `blockrep announce` in the background (own session, no terminal), after a promote.
pub fn spawn_announcer(config: &Path) -> Result<()> {
    use std::os::unix::process::CommandExt;
    let exe = std::env::current_exe().context("cannot find the blockrep executable")?;
    let mut cmd = std::process::Command::new(exe);
    cmd.arg("--config").arg(config).arg("announce");
    cmd.stdin(std::process::Stdio::null()).stdout(std::process::Stdio::null()).stderr(std::process::Stdio::null());
    cmd.process_group(0);
    cmd.spawn().context("cannot start the background re-announcement (blockrep announce)")?;
    Ok(())
}
