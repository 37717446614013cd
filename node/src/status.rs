//! The node's status (`blockrep status`): role, whether replication is enabled, the replication state, per volume
//! the last successful sync and the last failure, the age of the standby's data, the peer, this node's services,
//! the last switchover, and the alarms raised.
//!
//! Each finished sync is recorded per volume in `<state_dir>/primary/<volume>/last_sync.json` (written
//! atomically, [`record_outcome`]), which is where the status and the metrics read it.

use std::path::Path;
use std::time::Duration;

use engine::target::TargetOptions;
use serde::{Deserialize, Serialize};

use crate::alarms::{self, Alarm};
use crate::config::Config;
use crate::layout::{mtime_secs, Side};
use crate::Error;

/// Errors of reading the status.
#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    /// The role state could not be read.
    #[error("cannot read the role state")]
    Role(#[source] role::state::StateError),
    /// A shadow could not be opened.
    #[error("volume {volume}: cannot open the shadow")]
    Shadow {
        /// Volume name.
        volume: String,
        /// The engine's error.
        #[source]
        source: engine::target::TargetError,
    },
}

/// How long status waits for the peer.
const PEER_TIMEOUT: Duration = Duration::from_secs(2);
/// The per-volume record of the last syncs.
const RECORD_FILE: &str = "last_sync.json";

/// Which side of a volume this node holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum VolumeSide {
    /// The shadow is here.
    Standby,
    /// The source is here.
    Primary,
}

impl VolumeSide {
    /// `standby` or `primary`.
    pub fn as_str(self) -> &'static str {
        match self {
            VolumeSide::Standby => "standby",
            VolumeSide::Primary => "primary",
        }
    }
}

/// How a sync ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    /// Committed.
    Ok,
    /// Failed (after its retries).
    Failed,
    /// Stopped by SIGTERM/SIGINT or `blockrep cancel`; the standby kept its generation.
    Cancelled,
}

impl Outcome {
    /// `ok`, `failed` or `cancelled`.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Failed => "failed",
            Outcome::Cancelled => "cancelled",
        }
    }
}

/// The last successful sync of a volume.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LastSuccess {
    /// Unix seconds it finished.
    pub time: u64,
    /// Seconds it took.
    pub duration_s: f64,
    /// Bytes read from the source.
    pub bytes_scanned: u64,
    /// Bytes that differed.
    pub bytes_changed: u64,
    /// Data bytes sent.
    pub bytes_sent: u64,
    /// The generation committed.
    pub generation: u64,
    /// What found the changes: "full scan", or the tracker ("thin_delta", "exception store"); null in a record
    /// written before this was kept.
    #[serde(default)]
    pub tracker: Option<String>,
    /// Why a tracked volume was scanned in full (as `sync --json` says), or null.
    #[serde(default)]
    pub fallback_reason: Option<String>,
}

/// The last failed (or cancelled) sync of a volume.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LastFailure {
    /// Unix seconds it ended.
    pub time: u64,
    /// Failed or cancelled.
    pub outcome: Outcome,
    /// The error, with its causes.
    pub cause: String,
}

/// What a node records about a volume's syncs.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SyncRecord {
    /// How the last sync ended.
    pub last_outcome: Option<Outcome>,
    /// The last success.
    pub last_success: Option<LastSuccess>,
    /// The last failure or cancel.
    pub last_failure: Option<LastFailure>,
    /// Successful syncs in a row of a tracked volume that scanned in full without being asked to (not a periodic
    /// full scan, not a sync that compares on request): the tracker keeps failing (alarm `tracking_lost`).
    #[serde(default)]
    pub tracker_fallbacks: u32,
}

/// One volume in the status.
#[derive(Debug, Clone, Serialize)]
pub struct VolumeStatus {
    /// Volume name.
    pub name: String,
    /// `standby` (shadow here) or `primary` (source here).
    pub side: VolumeSide,
    /// Last committed generation (primary: of the source's manifest).
    pub generation: u64,
    /// Whether the shadow holds a complete generation (standby side only).
    pub complete: Option<bool>,
    /// Unix seconds of the last completed sync.
    pub last_sync: Option<u64>,
    /// Bytes kept from an interrupted transfer.
    pub pending_bytes: Option<u64>,
    /// Seconds since the standby's data was taken (the last successful sync), if there is any.
    pub data_age_s: Option<u64>,
    /// The record of the last syncs (primary side).
    #[serde(flatten)]
    pub record: SyncRecord,
    /// Why the shadow is not trusted to be untouched since its last commit (standby side, when the shadow was
    /// opened): the next sync compares its actual content, and `promote` refuses it without --force.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub untrusted: Option<String>,
    /// The last verify of the shadow (`blockrep verify`, or `serve`'s periodic verify), standby side.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_verify: Option<crate::verify::LastVerify>,
    /// Generations kept besides the current one (`keep_generations`), oldest first, standby side.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub retained: Vec<RetainedStatus>,
}

/// One retained generation in the status.
#[derive(Debug, Clone, Serialize)]
pub struct RetainedStatus {
    /// Generation number.
    pub generation: u64,
    /// The copy (`vg/lv` or a file).
    pub copy: String,
    /// Whether the copy is complete.
    pub complete: bool,
    /// Fill level of a classic snapshot's copy-on-write store (percent).
    pub fill_percent: Option<f64>,
    /// What is wrong with it, if anything.
    pub problem: Option<String>,
}

/// The retained generations of `v`'s shadow (empty when it keeps one; a listing error is logged).
fn retained(cfg: &Config, v: &crate::config::Volume) -> Vec<RetainedStatus> {
    let list = match crate::retain::Retainer::for_volume(cfg, v) {
        Ok(Some(r)) => r.list(),
        Ok(None) => return Vec::new(),
        Err(e) => Err(e),
    };
    match list {
        Ok(l) => l
            .into_iter()
            .map(|l| RetainedStatus {
                generation: l.record.generation,
                copy: l.record.copy,
                complete: l.complete,
                fill_percent: l.fill_percent,
                problem: l.problem,
            })
            .collect(),
        Err(e) => {
            tracing::warn!(volume = %v.name, error = %link::error_chain(&e), "cannot list the retained generations");
            Vec::new()
        }
    }
}

/// The replication state of the node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ReplicationState {
    /// Every volume's last sync succeeded (or none ran yet).
    Ok,
    /// A sync is running now.
    ReplicationRunning,
    /// A volume's last sync failed.
    ReplicationFailed,
    /// The last sync was cancelled.
    Cancelled,
    /// The configuration cannot be used (only the binary reports this: the node cannot read its own status).
    ConfigurationFailed,
}

impl ReplicationState {
    /// The words shown on the status screen.
    pub fn as_str(self) -> &'static str {
        match self {
            ReplicationState::Ok => "ok",
            ReplicationState::ReplicationRunning => "replication running",
            ReplicationState::ReplicationFailed => "replication failed",
            ReplicationState::Cancelled => "cancelled",
            ReplicationState::ConfigurationFailed => "configuration failed",
        }
    }
}

/// The running sync.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Running {
    /// Its pid.
    pub pid: u32,
    /// Unix seconds it started.
    pub since: u64,
}

/// The peer as seen from here.
#[derive(Debug, Clone, Serialize)]
pub struct PeerStatus {
    /// Its address.
    pub address: String,
    /// Whether it answered within the status timeout.
    pub reachable: bool,
    /// Its role, when it answered.
    pub role: Option<role::Role>,
    /// Why it did not answer.
    pub error: Option<String>,
}

/// The state of a key rotation on this node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Rotation {
    /// No next key (`KEYFILE.next` absent).
    None,
    /// A next key is present, not yet confirmed by the peer (the peer has not proved it in a handshake).
    Pending,
    /// The peer proved the next key (in this status's probe of the peer); that handshake finished the rotation on
    /// this node unless `detail` says otherwise.
    Confirmed,
}

impl Rotation {
    /// `none`, `pending` or `confirmed`.
    pub fn as_str(self) -> &'static str {
        match self {
            Rotation::None => "none",
            Rotation::Pending => "pending",
            Rotation::Confirmed => "confirmed",
        }
    }
}

/// This node's key (`key_file`) and its rotation.
#[derive(Debug, Clone, Serialize)]
pub struct KeyStatus {
    /// The key file.
    pub file: std::path::PathBuf,
    /// Fingerprint of the current key (compare with the other node's), `None` if it cannot be read.
    pub id: Option<String>,
    /// Fingerprint of the next key during a rotation.
    pub next_id: Option<String>,
    /// The rotation state.
    pub rotation: Rotation,
    /// What the rotation state means here, or why the key file cannot be read.
    pub detail: String,
}

/// One service of this node.
#[derive(Debug, Clone, Serialize)]
pub struct ServiceStatus {
    /// Unit name or hook label.
    pub name: String,
    /// `primary_only` or `standby_only`.
    pub runs_on: &'static str,
    /// `up`, `down` or `unknown` (a hook, or no systemctl).
    pub state: &'static str,
}

/// The node's status.
#[derive(Debug, Clone, Serialize)]
pub struct NodeStatus {
    /// This node's name.
    pub node: String,
    /// Role, last switchover, plan in progress, first full sync.
    #[serde(flatten)]
    pub role: role::Status,
    /// Whether replication is enabled (`blockrep replication enable|disable`).
    pub replication_enabled: bool,
    /// The replication state.
    pub state: ReplicationState,
    /// The sync running now.
    pub running: Option<Running>,
    /// Every configured volume present on this node.
    pub volumes: Vec<VolumeStatus>,
    /// The peer (not asked for the metrics).
    pub peer: Option<PeerStatus>,
    /// The key and the state of a key rotation.
    pub key: KeyStatus,
    /// The `[role]` services of this node.
    pub services: Vec<ServiceStatus>,
    /// The alarms raised.
    pub alarms: Vec<Alarm>,
    /// The maintenance locks set on this node (`blockrep lock`): promote and switchover are refused while any is.
    pub maintenance_locks: Vec<crate::maint_lock::MaintLock>,
    /// Why the maintenance lock file cannot be read: promote and switchover are refused until it is repaired.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub maintenance_lock_error: Option<String>,
    /// On a standby protecting several primaries (`[[primary]]`): each primary's status.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub primaries: Vec<ProtectedStatus>,
}

/// One primary a standby protects (`[[primary]]` block), as `status` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct ProtectedStatus {
    /// The primary's node name.
    pub node: String,
    /// Its takeover priority (higher wins).
    pub priority: u32,
    /// Its fallback policy.
    pub fallback: crate::config::Fallback,
    /// Whether this standby acts for it now (promoted for it, or a plan in progress).
    pub acting: bool,
    /// Why its syncs are refused now (`None`: accepted).
    pub refused: Option<String>,
    /// The status of its volumes, role and key on this standby.
    pub status: Box<NodeStatus>,
}

/// What to do besides reading local state.
#[derive(Debug, Clone, Copy, Default)]
pub struct StatusOptions {
    /// I/O options for opening shadows.
    pub io: engine::volume::IoOptions,
    /// Ask the peer its role (a short timeout).
    pub probe_peer: bool,
    /// Ask systemd about the services.
    pub services: bool,
    /// Open the shadows (completeness, pending bytes); otherwise read only their manifests.
    pub open_shadows: bool,
}

/// Reads this node's status, asking the peer and systemd, and judges the standing alarms.
pub fn status(cfg: &Config, io: engine::volume::IoOptions) -> Result<NodeStatus, Error> {
    status_with(cfg, StatusOptions { io, probe_peer: true, services: true, open_shadows: true })
}

/// Reads this node's status with options; the standing alarms are judged and recorded (edges notify).
pub fn status_with(cfg: &Config, o: StatusOptions) -> Result<NodeStatus, Error> {
    if !cfg.primaries.is_empty() {
        return protected_status(cfg, o);
    }
    let rc = match cfg.role {
        Some(_) => Some(crate::roles::role_config(cfg)?), // an invalid [role] section is a configuration error here too
        None => None,
    };
    let layout = cfg.layout();
    let st = role::status(layout.role_dir()).map_err(StatusError::Role)?;
    let now = crate::history::now();
    let mut volumes = Vec::new();
    for v in &cfg.volumes {
        if let Some(shadow) = &v.shadow {
            let dir = layout.side_dir(Side::Standby, &v.name);
            // A sync or verify holding the state directory: its manifest still tells the generation.
            let target = match (shadow.exists() && dir.exists() && o.open_shadows)
                .then(|| crate::verify::open_target(shadow, &dir, TargetOptions::new(&v.name, o.io)))
            {
                Some(Err(engine::target::TargetError::Busy { .. })) => None,
                Some(Ok(t)) => Some(Ok(t)),
                Some(Err(source)) => Some(Err(StatusError::Shadow { volume: v.name.clone(), source })),
                None => None,
            };
            if shadow.exists() && dir.exists() && target.is_none() {
                let m = layout.target_manifest(&v.name);
                let generation = engine::manifest::Manifest::open(&m).map(|m| m.generation()).unwrap_or(0);
                let last_sync = mtime_secs(&m);
                volumes.push(VolumeStatus {
                    name: v.name.clone(),
                    side: VolumeSide::Standby,
                    generation,
                    complete: None,
                    last_sync,
                    pending_bytes: None,
                    data_age_s: last_sync.filter(|_| generation > 0).map(|t| now.saturating_sub(t)),
                    record: SyncRecord::default(),
                    untrusted: None,
                    last_verify: crate::verify::last_verify(cfg, &v.name),
                    retained: retained(cfg, v),
                });
                continue;
            }
            if let Some(t) = target {
                let t = t?;
                let info = t.info();
                let last_sync = mtime_secs(&layout.target_manifest(&v.name));
                volumes.push(VolumeStatus {
                    name: v.name.clone(),
                    side: VolumeSide::Standby,
                    generation: info.generation,
                    complete: Some(info.complete),
                    last_sync,
                    pending_bytes: info.pending.map(|p| p.bytes),
                    data_age_s: last_sync.filter(|_| info.generation > 0).map(|t| now.saturating_sub(t)),
                    record: SyncRecord::default(),
                    untrusted: Some(info.distrust).filter(|_| info.complete && !info.trusted),
                    last_verify: crate::verify::last_verify(cfg, &v.name),
                    retained: retained(cfg, v),
                });
                continue;
            }
        }
        if v.source.is_some() {
            let m = layout.source_manifest(&v.name);
            let generation = engine::manifest::Manifest::open(&m).map(|m| m.generation()).unwrap_or(0);
            let record = read_record(cfg, &v.name);
            let last_sync = record.last_success.as_ref().map(|s| s.time).or_else(|| mtime_secs(&m));
            volumes.push(VolumeStatus {
                name: v.name.clone(),
                side: VolumeSide::Primary,
                generation,
                complete: None,
                last_sync,
                pending_bytes: None,
                data_age_s: last_sync.filter(|_| generation > 0).map(|t| now.saturating_sub(t)),
                record,
                untrusted: None,
                last_verify: None,
                retained: Vec::new(),
            });
        }
    }
    let running = crate::lock::holder(cfg).map(|h| Running { pid: h.pid, since: h.since });
    let outcomes: Vec<_> = volumes.iter().filter_map(|v| v.record.last_outcome).collect();
    let state = if running.is_some() {
        ReplicationState::ReplicationRunning
    } else if outcomes.contains(&Outcome::Failed) {
        ReplicationState::ReplicationFailed
    } else if outcomes.contains(&Outcome::Cancelled) {
        ReplicationState::Cancelled
    } else {
        ReplicationState::Ok
    };
    // The keys before the probe: the probe's handshake may finish a rotation.
    let keys_before = cfg.keys();
    let (peer, slot) = match o.probe_peer.then(|| probe_peer(cfg)).flatten() {
        Some((p, s)) => (Some(p), s),
        None => (None, None),
    };
    let key = key_status(cfg, keys_before, slot);
    let mut judged = alarms::judge_standing(cfg, Some(st.role), &volumes);
    if let Some(p) = &peer {
        // Only the primary needs its standby.
        if st.role == role::Role::Primary && cfg.volumes.iter().any(|v| v.source.is_some()) {
            judged.push(match &p.error {
                Some(e) => alarms::Judgement::raise(
                    alarms::AlarmKind::StandbyUnreachable,
                    None,
                    format!("the standby {} does not answer: {e}", p.address),
                ),
                None => alarms::Judgement::clear(alarms::AlarmKind::StandbyUnreachable, None),
            });
        }
    }
    let services = match (&rc, o.services) {
        (Some(rc), true) => services(rc),
        _ => Vec::new(),
    };
    let alarms = alarms::update(cfg, &judged);
    let (maintenance_locks, maintenance_lock_error) = maintenance_locks(cfg);
    Ok(NodeStatus {
        node: cfg.node.clone(),
        role: st,
        replication_enabled: crate::schedule::replication_enabled(cfg),
        state,
        running,
        volumes,
        peer,
        key,
        services,
        alarms,
        maintenance_locks,
        maintenance_lock_error,
        primaries: Vec::new(),
    })
}

/// This node's role alone (for `--for NODE`, its role for that primary), read from the role state: no peer,
/// services or shadows are asked, so a cluster engine can check it every few seconds (`status --role`).
pub fn role_only(cfg: &Config) -> Result<role::Role, Error> {
    Ok(role::status(cfg.layout().role_dir()).map_err(StatusError::Role)?.role)
}

/// The maintenance locks set on this node, or why the lock file cannot be read.
fn maintenance_locks(cfg: &Config) -> (Vec<crate::maint_lock::MaintLock>, Option<String>) {
    match crate::maint_lock::locks(cfg) {
        Ok(l) => (l, None),
        Err(e) => (Vec::new(), Some(e.to_string())),
    }
}

/// The status of a standby protecting several primaries: each primary's own status (its volumes, role and key
/// on this standby), whether it is protected now, and the alarms of all of them (prefixed with the primary).
fn protected_status(cfg: &Config, o: StatusOptions) -> Result<NodeStatus, Error> {
    let st = role::status(cfg.layout().role_dir()).map_err(StatusError::Role)?;
    let mut primaries = Vec::new();
    let mut alarms = alarms::update(cfg, &crate::protect::judge_unprotected(cfg));
    let mut state = ReplicationState::Ok;
    for c in &cfg.primaries {
        let Some(p) = &c.protects else { continue };
        let s = status_with(c, o)?;
        alarms.extend(s.alarms.iter().cloned().map(|mut a| {
            a.message = format!("primary {}: {}", p.node, a.message);
            a.primary = Some(p.node.clone());
            a
        }));
        if s.state != ReplicationState::Ok && state == ReplicationState::Ok {
            state = s.state;
        }
        let refused = crate::roles::refuses_syncs(c).or_else(|| crate::protect::refuses_while_acting(cfg, c));
        primaries.push(ProtectedStatus {
            node: p.node.clone(),
            priority: p.priority,
            fallback: p.fallback,
            acting: crate::protect::is_acting(c),
            refused,
            status: Box::new(s),
        });
    }
    let (maintenance_locks, maintenance_lock_error) = maintenance_locks(cfg);
    Ok(NodeStatus {
        node: cfg.node.clone(),
        role: st,
        replication_enabled: crate::schedule::replication_enabled(cfg),
        state,
        running: None,
        volumes: Vec::new(),
        peer: None,
        key: KeyStatus {
            file: std::path::PathBuf::new(),
            id: None,
            next_id: None,
            rotation: Rotation::None,
            detail: "each primary has its own key (see primaries)".into(),
        },
        services: Vec::new(),
        alarms,
        maintenance_locks,
        maintenance_lock_error,
        primaries,
    })
}

/// The key status from the keys read before the peer probe and the key slot of the probe's session.
fn key_status(
    cfg: &Config,
    before: Result<netproto::KeySet, netproto::KeyError>,
    probe: Option<(netproto::KeySlot, Option<Result<bool, String>>)>,
) -> KeyStatus {
    let file = cfg.key_file.clone();
    let before = match before {
        Ok(k) => k,
        Err(e) => {
            let detail = link::error_chain(&e);
            return KeyStatus { file, id: None, next_id: None, rotation: Rotation::None, detail };
        }
    };
    let now = cfg.keys().unwrap_or_else(|_| before.clone());
    let (id, next_id) = (Some(netproto::key_id(now.current())), now.next().map(netproto::key_id));
    let Some(next) = before.next() else {
        let detail = "no key rotation in progress".to_owned();
        return KeyStatus { file, id, next_id, rotation: Rotation::None, detail };
    };
    let next = netproto::key_id(next);
    let next_path = netproto::next_key_path(&cfg.key_file);
    let (rotation, detail) = match probe {
        Some((netproto::KeySlot::Next, finished)) => (
            Rotation::Confirmed,
            match finished {
                Some(Err(e)) => format!("the peer proved the next key {next}, but it could not be made current: {e}"),
                _ => format!("the peer proved the next key {next}; it is now the current key of this node"),
            },
        ),
        Some(_) => (
            Rotation::Pending,
            format!(
                "next key {next} present ({}), not yet confirmed by the peer: copy it to the other node's key_file \
                 with the suffix .next",
                next_path.display()
            ),
        ),
        None => (
            Rotation::Pending,
            format!("next key {next} present ({}), not confirmed by the peer (not asked)", next_path.display()),
        ),
    };
    KeyStatus { file, id, next_id, rotation, detail }
}

/// The other node's address: the standby from a primary (volumes with a source), else `[standby] peer`.
fn peer_address(cfg: &Config) -> Option<&str> {
    let primary_side = cfg.volumes.iter().any(|v| v.source.is_some());
    match primary_side {
        true => cfg.peer.as_deref().or(cfg.standby_peer.as_deref()),
        false => cfg.standby_peer.as_deref(),
    }
}

/// The peer's status, and the key slot of the probe's session (with what finishing a rotation did).
type ProbeKeys = Option<(netproto::KeySlot, Option<Result<bool, String>>)>;

fn probe_peer(cfg: &Config) -> Option<(PeerStatus, ProbeKeys)> {
    let address = peer_address(cfg)?.to_owned();
    let mut slot = None;
    // The error, and whether the peer answered at all (a refusal or a timeout after connecting means it is up).
    let mut ask = || -> Result<role::Role, (bool, String)> {
        let keys = cfg.keys().map_err(|e| (false, e.to_string()))?;
        let mut conn =
            netproto::connect_with(&address, &keys, &cfg.handshake_options(), PEER_TIMEOUT).map_err(|e| {
                let unreachable =
                    matches!(e, netproto::ConnError::Unreachable { .. } | netproto::ConnError::Timeout { .. });
                (!unreachable, link::error_chain(&e))
            })?;
        slot = Some((conn.key_slot(), conn.rotation().cloned()));
        let up = |e: netproto::ConnError| (true, link::error_chain(&e));
        conn.set_timeout(Some(PEER_TIMEOUT)).map_err(up)?;
        conn.send(&netproto::Message::RoleReq).map_err(up)?;
        match conn.recv_expect("the peer's role").map_err(up)? {
            netproto::Message::RoleInfo(r) => Ok(crate::roles::role_from_wire(r.role)),
            other => Err((true, format!("unexpected answer {}", other.frame_type()))),
        }
    };
    let peer = match ask() {
        Ok(r) => PeerStatus { address, reachable: true, role: Some(r), error: None },
        Err((reachable, e)) => PeerStatus { address, reachable, role: None, error: Some(e) },
    };
    Some((peer, slot))
}

/// The `[role]` services: `systemctl is-active` for units, `unknown` for hooks or without systemctl.
fn services(rc: &role::Config) -> Vec<ServiceStatus> {
    use role::config::{Service, UnitSpec};
    let systemctl = Path::new(role::exec::SYSTEMCTL).exists();
    let one = |s: &Service, runs_on| {
        let state = match s {
            Service::Unit(u) | Service::UnitWithTimeout(UnitSpec { unit: u, .. }) if systemctl => {
                match std::process::Command::new(role::exec::SYSTEMCTL).args(["is-active", "--quiet", "--", u]).status()
                {
                    Ok(st) if st.success() => "up",
                    Ok(_) => "down",
                    Err(_) => "unknown",
                }
            }
            _ => "unknown",
        };
        ServiceStatus { name: s.label(), runs_on, state }
    };
    let p = rc.services.primary_only.iter().map(|s| one(s, "primary_only"));
    p.chain(rc.services.standby_only.iter().map(|s| one(s, "standby_only"))).collect()
}

/// The record of a volume's syncs (empty when none was recorded or it cannot be read).
pub fn read_record(cfg: &Config, volume: &str) -> SyncRecord {
    let p = cfg.layout().side_dir(Side::Primary, volume).join(RECORD_FILE);
    std::fs::read(p).ok().and_then(|b| serde_json::from_slice(&b).ok()).unwrap_or_default()
}

/// Records how a volume's sync ended (best effort: a warning when it cannot be written), and returns the record.
pub fn record_outcome(
    cfg: &Config,
    volume: &str,
    result: &Result<crate::primary::NetReport, Error>,
    cancelled: bool,
) -> SyncRecord {
    let mut rec = read_record(cfg, volume);
    let now = crate::history::now();
    match result {
        Ok(r) => {
            rec.last_outcome = Some(Outcome::Ok);
            rec.last_success = Some(LastSuccess {
                time: now,
                duration_s: r.sync.duration_s,
                bytes_scanned: r.sync.bytes_scanned,
                bytes_changed: r.sync.bytes_changed,
                bytes_sent: r.sync.bytes_sent,
                generation: r.sync.generation,
                tracker: Some(r.sync.tracker.clone()),
                fallback_reason: r.sync.fallback_reason.clone(),
            });
            rec.tracker_fallbacks = match &r.sync.fallback_reason {
                Some(why) if crate::schedule::fallback_was_asked_for(why) => rec.tracker_fallbacks,
                Some(_) => rec.tracker_fallbacks.saturating_add(1),
                None => 0, // the tracker's changes were used, or the volume is not tracked
            };
        }
        Err(e) => {
            let outcome = if cancelled { Outcome::Cancelled } else { Outcome::Failed };
            rec.last_outcome = Some(outcome);
            rec.last_failure = Some(LastFailure { time: now, outcome, cause: crate::error_chain(e) });
        }
    }
    let path = cfg.layout().side_dir(Side::Primary, volume).join(RECORD_FILE);
    let json = serde_json::to_vec_pretty(&rec).unwrap_or_default();
    if let Err(e) =
        std::fs::create_dir_all(cfg.layout().side_dir(Side::Primary, volume)).and_then(|()| write_atomic(&path, &json))
    {
        tracing::warn!(path = %path.display(), error = %e, "cannot record the sync's outcome");
    }
    rec
}

/// Writes a file atomically: a temporary file in the same directory, fsynced, then renamed over `path`.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.tmp.{}", std::process::id()));
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sync_record_written_before_the_tracker_fields_still_reads() {
        // (tracker, fallback_reason and tracker_fallbacks came in session 10)
        let l = LastSuccess {
            time: 1,
            duration_s: 0.5,
            bytes_scanned: 2,
            bytes_changed: 3,
            bytes_sent: 4,
            generation: 5,
            tracker: Some("thin_delta".into()),
            fallback_reason: None,
        };
        let rec = SyncRecord {
            last_outcome: Some(Outcome::Ok),
            last_success: Some(l),
            last_failure: None,
            tracker_fallbacks: 2,
        };
        let mut v = serde_json::to_value(&rec).unwrap();
        assert_eq!(v["last_success"]["tracker"], "thin_delta");
        for k in ["tracker", "fallback_reason"] {
            v["last_success"].as_object_mut().unwrap().remove(k);
        }
        v.as_object_mut().unwrap().remove("tracker_fallbacks");
        let old: SyncRecord = serde_json::from_value(v).unwrap();
        assert_eq!(old.tracker_fallbacks, 0);
        let l = old.last_success.unwrap();
        assert_eq!((l.generation, l.tracker, l.fallback_reason), (5, None, None));
    }
}
