//! One standby for several primaries (N+1, `[[primary]]` blocks, docs/role.md "One standby for several
//! primaries").
//!
//! Each `[[primary]]` block is the configuration of its own ([`Config::for_primary`]): its key, its volumes and
//! shadows, its role section (virtual IP, services, boot target) and its state under
//! `<state_dir>/primaries/<node>` (generation histories, role state, alarms), so two primaries may use the same
//! volume names. `serve` authenticates a primary with that primary's key and opens only its volumes.
//!
//! This module holds the rules between the primaries:
//! - **one takeover at a time**: the standby acts for at most one primary ([`acting`]); `promote --for NODE`
//!   refuses while it acts for another (exit 4) unless `--force`;
//! - **priority**: takeovers that start within `[standby] takeover_settle` of each other (several primaries
//!   failed at once; keepalived or Pacemaker run one `promote --for` per failed primary) are decided by
//!   `priority`, highest first, then by node name; the others are refused (exit 4) naming the winner
//!   ([`claim_takeover`]);
//! - **keep_protecting**: while acting for one primary the standby refuses the others' syncs unless
//!   `[standby] keep_protecting = true` ([`refuses_while_acting`]), and raises the alarm `unprotected/<node>`
//!   for each of them ([`judge_unprotected`]).

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::alarms::{AlarmKind, Judgement};
use crate::config::Config;
use crate::ErrorKind;

/// Default `[standby] takeover_settle`.
pub const DEFAULT_TAKEOVER_SETTLE: Duration = Duration::from_secs(5);
/// Default `min_hold` of a `[[primary]]` block.
pub const DEFAULT_MIN_HOLD: Duration = Duration::from_secs(30 * 60);
/// Default `priority` of a `[[primary]]` block.
pub const DEFAULT_PRIORITY: u32 = 100;
/// Directory below the standby's `state_dir` holding the takeover claims.
const CLAIMS_DIR: &str = "takeover";

/// Errors of the rules between protected primaries.
#[derive(Debug, thiserror::Error)]
pub enum ProtectError {
    /// The standby already acts for another primary.
    #[error(
        "standby {here} already acts for primary {acting}; it takes over one primary at a time: hand {acting} back \
         first (`blockrep switchover` on {acting} once it is repaired, or `blockrep demote --for {acting}`), or pass \
         --force if this standby can carry both"
    )]
    AlreadyActing {
        /// This standby.
        here: String,
        /// The primary it acts for.
        acting: String,
    },
    /// A takeover of a primary with a higher priority started at the same time.
    #[error(
        "primary {winner} (priority {winner_priority}) is being taken over at the same time and outranks {node} \
         (priority {priority}); standby {here} takes over one primary at a time, so {node} is not taken over: \
         its service stays down until {winner} is handed back (or run `blockrep promote --for {node} --force` if \
         this standby can carry both)"
    )]
    Outranked {
        /// This standby.
        here: String,
        /// The primary refused.
        node: String,
        /// Its priority.
        priority: u32,
        /// The primary that wins.
        winner: String,
        /// Its priority.
        winner_priority: u32,
    },
    /// A claim could not be written.
    #[error("cannot record the takeover of {node} in {}", path.display())]
    Io {
        /// The primary.
        node: String,
        /// The claims directory.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

impl ProtectError {
    /// The kind of this error.
    pub fn kind(&self) -> ErrorKind {
        match self {
            ProtectError::AlreadyActing { .. } | ProtectError::Outranked { .. } => ErrorKind::Unsafe,
            ProtectError::Io { .. } => ErrorKind::Failed,
        }
    }
}

/// The name of the primary `cfg` protects (`None`: a two-node pair's configuration).
pub fn node_of(cfg: &Config) -> Option<&str> {
    cfg.protects.as_ref().map(|p| p.node.as_str())
}

/// Whether this standby acts for the primary of `child` (its role for it is not standby: promoted, or a plan
/// started). A role state that cannot be read counts as acting (nothing is assumed safe without evidence).
pub fn is_acting(child: &Config) -> bool {
    role::status(child.layout().role_dir()).map_or(true, |s| s.role != role::Role::Standby)
}

/// The primaries this standby acts for now.
pub fn acting(top: &Config) -> Vec<String> {
    top.primaries.iter().filter(|c| is_acting(c)).filter_map(|c| node_of(c).map(str::to_owned)).collect()
}

/// Why the syncs of `child`'s primary are refused because this standby acts for another primary and
/// `keep_protecting` is off; `None`: accepted.
pub fn refuses_while_acting(top: &Config, child: &Config) -> Option<String> {
    if top.keep_protecting {
        return None;
    }
    let me = node_of(child)?;
    let others: Vec<String> = acting(top).into_iter().filter(|n| n != me).collect();
    if others.is_empty() {
        return None;
    }
    Some(format!(
        "standby {} acts for primary {} and does not accept syncs of other primaries meanwhile ([standby] \
         keep_protecting = false): primary {me} is unprotected until {} is handed back; set keep_protecting = true \
         if this standby can carry both",
        top.node,
        others.join(", "),
        others.join(", ")
    ))
}

/// The `unprotected/<node>` alarms of a standby protecting several primaries: raised for each primary whose
/// syncs it refuses because it acts for another, cleared otherwise.
pub fn judge_unprotected(top: &Config) -> Vec<Judgement> {
    top.primaries
        .iter()
        .filter_map(|c| {
            let node = node_of(c)?;
            Some(match refuses_while_acting(top, c) {
                Some(why) => Judgement::raise(AlarmKind::Unprotected, Some(node), why),
                None => Judgement::clear(AlarmKind::Unprotected, Some(node)),
            })
        })
        .collect()
}

/// A takeover claim on disk (`<state_dir>/takeover/<node>.json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct ClaimFile {
    priority: u32,
    since_ms: u128,
    pid: u32,
}

/// A takeover that won: its claim is removed when dropped (after the promote plan).
#[derive(Debug)]
pub struct Claim {
    path: Option<PathBuf>,
}

impl Claim {
    /// No claim (a demote, or a two-node pair).
    pub fn none() -> Claim {
        Claim { path: None }
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        if let Some(p) = &self.path {
            let _ = std::fs::remove_file(p);
        }
    }
}

fn now_ms() -> u128 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis())
}

/// The takeover rule for `promote --for NODE` (see the module docs): refuses while the standby acts for another
/// primary; otherwise records a claim, waits `takeover_settle` for the claims of other primaries failing at the
/// same time, and refuses if one of them outranks this one. `force` skips both (the operator decided);
/// `dry_run` checks without claiming or waiting.
pub fn claim_takeover(top: &Config, child: &Config, force: bool, dry_run: bool) -> Result<Claim, ProtectError> {
    let Some(p) = &child.protects else { return Ok(Claim { path: None }) };
    if force {
        return Ok(Claim { path: None });
    }
    let other_acting = || acting(top).into_iter().find(|n| n != &p.node);
    if let Some(acting) = other_acting() {
        return Err(ProtectError::AlreadyActing { here: top.node.clone(), acting });
    }
    if dry_run || is_acting(child) {
        return Ok(Claim { path: None }); // a re-run of an interrupted or done promote: no contest
    }
    let dir = top.state_dir.join(CLAIMS_DIR);
    let io = |source| ProtectError::Io { node: p.node.clone(), path: dir.clone(), source };
    std::fs::create_dir_all(&dir).map_err(io)?;
    let path = dir.join(format!("{}.json", p.node));
    let claim = ClaimFile { priority: p.priority, since_ms: now_ms(), pid: std::process::id() };
    let tmp = dir.join(format!(".{}.json.tmp", p.node));
    std::fs::write(&tmp, serde_json::to_vec(&claim).expect("serializes")).map_err(io)?;
    std::fs::rename(&tmp, &path).map_err(io)?;
    let claim_guard = Claim { path: Some(path) };
    tracing::info!(
        primary = %p.node,
        priority = p.priority,
        "taking over: waiting {} for takeovers of other primaries failing at the same time",
        crate::schedule::format_duration(top.takeover_settle)
    );
    std::thread::sleep(top.takeover_settle);
    // Claims of the same moment: younger than two settle times (an older one belongs to a takeover that has
    // either won, and is acting, or died: its process is gone).
    let window = top.takeover_settle.as_millis().saturating_mul(2).max(1000);
    let rank = |prio: u32, node: &str| (prio, std::cmp::Reverse(node.to_owned()));
    let mine = rank(p.priority, &p.node);
    let entries = std::fs::read_dir(&dir).map_err(io)?;
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(node) = name.strip_suffix(".json") else { continue };
        if node == p.node || node.starts_with('.') {
            continue;
        }
        let Some(c) = std::fs::read(e.path()).ok().and_then(|b| serde_json::from_slice::<ClaimFile>(&b).ok()) else {
            continue;
        };
        let alive = nix::sys::signal::kill(nix::unistd::Pid::from_raw(c.pid as i32), None).is_ok();
        if !alive || now_ms().saturating_sub(c.since_ms) > window {
            continue;
        }
        if rank(c.priority, node) > mine {
            return Err(ProtectError::Outranked {
                here: top.node.clone(),
                node: p.node.clone(),
                priority: p.priority,
                winner: node.to_owned(),
                winner_priority: c.priority,
            });
        }
    }
    if let Some(acting) = other_acting() {
        return Err(ProtectError::AlreadyActing { here: top.node.clone(), acting });
    }
    Ok(claim_guard)
}
