//! Alarms: conditions an operator must look at. Each is raised and cleared as an edge: the raised set is kept in
//! `<state_dir>/alarms.json` (written atomically, under `alarms.lock`), and only a change logs a line, runs the
//! `[role] notify` hooks (BLOCKREP_EVENT=alarm-raised|alarm-cleared, BLOCKREP_ALARM, BLOCKREP_VOLUME,
//! BLOCKREP_REASON, BLOCKREP_NODE) and is recorded in the history.
//!
//! Who judges what: the end of a sync run judges [`AlarmKind::SyncFailed`], [`AlarmKind::StandbyUnreachable`],
//! [`AlarmKind::SnapshotFull`] and [`AlarmKind::TrackingLost`]; `status` and `serve` (periodically) judge the rest
//! ([`judge_standing`]), and `status` also probes the peer. A condition nobody judged keeps its state.

use std::path::PathBuf;
use std::time::Duration;

use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};

use crate::config::Config;
use crate::history::{self, Event};

/// What an alarm is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AlarmKind {
    /// A volume's sync failed after its retries.
    SyncFailed,
    /// The standby could not be reached.
    StandbyUnreachable,
    /// This node runs as primary although the configuration names it the standby (`[monitoring] standby_node`).
    PrimaryOnStandby,
    /// The standby's data of a volume is older than `[monitoring] max_data_age`.
    DataTooOld,
    /// The snapshot filled up during a sync (lvm reports the fill level only as invalidated, so this is raised
    /// when the sync failed for it).
    SnapshotFull,
    /// The shadow is not trusted to be untouched since its last commit (the target's state, issue 11).
    ShadowUntrusted,
    /// A retained generation's classic snapshot overflowed and was removed (`keep_generations`).
    RetainedDropped,
    /// A standby protecting several primaries acts for one and refuses the others' syncs (`keep_protecting`);
    /// the alarm's "volume" is the unprotected primary's node name.
    Unprotected,
    /// This node is primary, but a virtual IP of its `[role]` is not on its interface (after a reboot nothing
    /// else brings it back than `blockrep reconcile` or a promote).
    VipMissing,
    /// A tracked volume's last syncs all scanned in full although nobody asked for it (the tracker keeps being
    /// missing, invalid or full): every sync reads the whole volume.
    TrackingLost,
}

impl AlarmKind {
    /// The name used in keys, metrics and hooks.
    pub fn as_str(self) -> &'static str {
        match self {
            AlarmKind::SyncFailed => "sync_failed",
            AlarmKind::StandbyUnreachable => "standby_unreachable",
            AlarmKind::PrimaryOnStandby => "primary_on_standby",
            AlarmKind::DataTooOld => "data_too_old",
            AlarmKind::SnapshotFull => "snapshot_full",
            AlarmKind::ShadowUntrusted => "shadow_untrusted",
            AlarmKind::RetainedDropped => "retained_dropped",
            AlarmKind::Unprotected => "unprotected",
            AlarmKind::VipMissing => "vip_missing",
            AlarmKind::TrackingLost => "tracking_lost",
        }
    }

    /// Every kind, for metrics.
    pub const ALL: [AlarmKind; 10] = [
        AlarmKind::SyncFailed,
        AlarmKind::StandbyUnreachable,
        AlarmKind::PrimaryOnStandby,
        AlarmKind::DataTooOld,
        AlarmKind::SnapshotFull,
        AlarmKind::ShadowUntrusted,
        AlarmKind::RetainedDropped,
        AlarmKind::Unprotected,
        AlarmKind::VipMissing,
        AlarmKind::TrackingLost,
    ];
}

/// A raised alarm.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Alarm {
    /// What it is about.
    pub kind: AlarmKind,
    /// The volume concerned, if it is about one.
    pub volume: Option<String>,
    /// What is wrong and what to do.
    pub message: String,
    /// Unix seconds it was raised.
    pub since: u64,
    /// On a standby protecting several primaries: the primary it is about (set by `status`, not recorded).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub primary: Option<String>,
}

impl Alarm {
    /// `kind` or `kind/volume`.
    pub fn key(&self) -> String {
        key(self.kind, self.volume.as_deref())
    }
}

fn key(kind: AlarmKind, volume: Option<&str>) -> String {
    match volume {
        Some(v) => format!("{}/{v}", kind.as_str()),
        None => kind.as_str().to_owned(),
    }
}

/// One condition judged: raised with a message, or not.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Judgement {
    /// What.
    pub kind: AlarmKind,
    /// Which volume.
    pub volume: Option<String>,
    /// `Some(message)`: the condition holds.
    pub raised: Option<String>,
}

impl Judgement {
    /// A condition that holds.
    pub fn raise(kind: AlarmKind, volume: Option<&str>, message: String) -> Self {
        Judgement { kind, volume: volume.map(str::to_owned), raised: Some(message) }
    }

    /// A condition that does not hold.
    pub fn clear(kind: AlarmKind, volume: Option<&str>) -> Self {
        Judgement { kind, volume: volume.map(str::to_owned), raised: None }
    }
}

fn file(cfg: &Config) -> PathBuf {
    cfg.state_dir.join("alarms.json")
}

/// The alarms raised now (as recorded).
pub fn current(cfg: &Config) -> Vec<Alarm> {
    std::fs::read(file(cfg)).ok().and_then(|b| serde_json::from_slice(&b).ok()).unwrap_or_default()
}

/// Applies judgements: raises and clears alarms (log line, notify hooks, history on each change) and returns the
/// alarms raised afterwards. Failing to record them is a warning: monitoring must not fail a sync.
pub fn update(cfg: &Config, judged: &[Judgement]) -> Vec<Alarm> {
    if !cfg.state_dir.exists() && judged.iter().all(|j| j.raised.is_none()) {
        return Vec::new(); // nothing raised, nothing to clear: do not create the state directory for that
    }
    let _guard = std::fs::create_dir_all(&cfg.state_dir)
        .and_then(|()| {
            std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(cfg.state_dir.join("alarms.lock"))
        })
        .ok()
        .and_then(|f| Flock::lock(f, FlockArg::LockExclusive).ok());
    let mut alarms = current(cfg);
    let mut changed = Vec::new();
    for j in judged {
        let k = key(j.kind, j.volume.as_deref());
        let pos = alarms.iter().position(|a| a.key() == k);
        match (&j.raised, pos) {
            (Some(message), None) => {
                let a = Alarm {
                    kind: j.kind,
                    volume: j.volume.clone(),
                    message: message.clone(),
                    since: history::now(),
                    primary: None,
                };
                match j.kind {
                    // Raised by a failed sync, whose error the command prints once: not repeated here.
                    AlarmKind::SyncFailed | AlarmKind::StandbyUnreachable | AlarmKind::SnapshotFull => {
                        tracing::error!(alarm = %k, "alarm raised (the cause: the sync's error, blockrep status)")
                    }
                    _ => tracing::error!(alarm = %k, "alarm raised: {message}"),
                }
                history::append(cfg, Event::AlarmRaised { alarm: k, message: message.clone() });
                changed.push(("alarm-raised", a.clone()));
                alarms.push(a);
            }
            (Some(message), Some(i)) => alarms[i].message = message.clone(),
            (None, Some(i)) => {
                let a = alarms.remove(i);
                tracing::warn!(alarm = %k, "alarm cleared");
                history::append(cfg, Event::AlarmCleared { alarm: k });
                changed.push(("alarm-cleared", a));
            }
            (None, None) => {}
        }
    }
    if !changed.is_empty() {
        let path = file(cfg);
        let json = serde_json::to_vec_pretty(&alarms).unwrap_or_default();
        if let Err(e) = crate::status::write_atomic(&path, &json) {
            tracing::warn!(path = %path.display(), error = %e, "cannot record the alarms");
        }
    }
    drop(_guard);
    for (event, a) in changed {
        notify(cfg, event, &a);
    }
    alarms
}

/// Runs the `[role] notify` hooks for an alarm edge (each with `notify_timeout_s`, default 30 s).
fn notify(cfg: &Config, event: &str, a: &Alarm) {
    let Some(role) = &cfg.role else { return };
    let hooks: Vec<&str> = role
        .get("notify")
        .and_then(|v| v.as_array())
        .map(|a| a.iter().filter_map(|v| v.as_str()).collect())
        .unwrap_or_default();
    let timeout = role.get("notify_timeout_s").and_then(|v| v.as_integer()).unwrap_or(30).max(1) as u64;
    let key = a.key();
    let env = [
        ("BLOCKREP_EVENT", event),
        ("BLOCKREP_NODE", cfg.node.as_str()),
        ("BLOCKREP_ALARM", key.as_str()),
        ("BLOCKREP_VOLUME", a.volume.as_deref().unwrap_or("")),
        ("BLOCKREP_REASON", a.message.as_str()),
    ];
    for h in hooks {
        if let Err(e) = role::exec::shell(h, &env, Duration::from_secs(timeout)) {
            tracing::warn!(error = %link::error_chain(&e), "notify hook failed");
        }
    }
}

/// The standing conditions judged from this node's state: primary on the standby node, a primary without its
/// virtual IP, data too old, shadow untrusted.
pub fn judge_standing(
    cfg: &Config,
    role: Option<role::Role>,
    volumes: &[crate::status::VolumeStatus],
) -> Vec<Judgement> {
    let mut j = Vec::new();
    if let (Some(standby), Some(r)) = (&cfg.monitoring.standby_node, role) {
        j.push(if standby == &cfg.node && r == role::Role::Primary {
            let m = format!(
                "node {} runs as primary although the configuration names it the standby; switch back when the \
                 other node is repaired (blockrep switchover)",
                cfg.node
            );
            Judgement::raise(AlarmKind::PrimaryOnStandby, None, m)
        } else {
            Judgement::clear(AlarmKind::PrimaryOnStandby, None)
        });
    }
    // Only with a [role] section (it names the addresses), and only for a settled role: a plan in progress is
    // moving them.
    if let (Ok(rc), Some(r @ (role::Role::Primary | role::Role::Standby))) = (crate::roles::role_config(cfg), role) {
        j.push(match (r, role::missing_vips(&rc)) {
            (role::Role::Primary, Ok(missing)) if !missing.is_empty() => {
                let list = missing.iter().map(|v| v.to_string()).collect::<Vec<_>>().join(" and ");
                let m = format!(
                    "node {} is primary, but {list} is not on {}: clients cannot reach the service; run `blockrep \
                     reconcile` (it re-asserts the address when no other node serves) and enable \
                     blockrep-reconcile.service so that a reboot does it",
                    cfg.node, rc.interface
                );
                Judgement::raise(AlarmKind::VipMissing, None, m)
            }
            (role::Role::Primary, Err(e)) => Judgement::raise(
                AlarmKind::VipMissing,
                None,
                format!(
                    "node {} is primary, but its virtual IP cannot be checked: {}",
                    cfg.node,
                    link::error_chain(&e)
                ),
            ),
            _ => Judgement::clear(AlarmKind::VipMissing, None),
        });
    }
    for v in volumes {
        if let Some(max) = cfg.monitoring.max_data_age {
            j.push(match v.data_age_s {
                Some(age) if age > max.as_secs() => Judgement::raise(
                    AlarmKind::DataTooOld,
                    Some(&v.name),
                    format!(
                        "the standby's data of volume {} is {} old, more than max_data_age {}; check the sync \
                         (blockrep log, blockrep status)",
                        v.name,
                        crate::schedule::format_duration(Duration::from_secs(age)),
                        crate::schedule::format_duration(max)
                    ),
                ),
                _ => Judgement::clear(AlarmKind::DataTooOld, Some(&v.name)),
            });
        }
        // Trust is judged only where the shadow was opened (`complete` is known); elsewhere it keeps its state.
        // A promoted node writes its former shadow in production: only a standby's shadow must stay untouched.
        if v.side == crate::status::VolumeSide::Standby && v.complete.is_some() && role == Some(role::Role::Standby) {
            j.push(match &v.untrusted {
                Some(why) => Judgement::raise(
                    AlarmKind::ShadowUntrusted,
                    Some(&v.name),
                    format!(
                        "the shadow of volume {} is not trusted ({why}); the next sync compares its whole content, \
                         and promote refuses it without --force",
                        v.name
                    ),
                ),
                None => Judgement::clear(AlarmKind::ShadowUntrusted, Some(&v.name)),
            });
        }
    }
    j
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn edges_run_the_hook_once_per_change() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("hook.out");
        let text = format!(
            "node = \"a\"\nkey_file = \"/k\"\nstate_dir = {:?}\n[role]\nnotify = [\"echo $BLOCKREP_EVENT $BLOCKREP_ALARM >> {}\"]\n",
            dir.path(),
            out.display()
        );
        let cfg = Config::parse(&text, std::path::Path::new("c.toml")).unwrap();
        let raise = Judgement::raise(AlarmKind::SyncFailed, Some("v"), "failed".into());
        assert_eq!(update(&cfg, std::slice::from_ref(&raise)).len(), 1);
        assert_eq!(update(&cfg, &[raise]).len(), 1);
        assert!(update(&cfg, &[Judgement::clear(AlarmKind::SyncFailed, Some("v"))]).is_empty());
        let log = std::fs::read_to_string(&out).unwrap();
        assert_eq!(log, "alarm-raised sync_failed/v\nalarm-cleared sync_failed/v\n");
    }

    #[test]
    fn primary_on_the_standby_node() {
        let text = "node = \"b\"\nkey_file = \"/k\"\n[monitoring]\nstandby_node = \"b\"\n";
        let cfg = Config::parse(text, std::path::Path::new("c.toml")).unwrap();
        let j = judge_standing(&cfg, Some(role::Role::Primary), &[]);
        assert!(j[0].raised.is_some());
        let j = judge_standing(&cfg, Some(role::Role::Standby), &[]);
        assert!(j[0].raised.is_none());
    }
}
