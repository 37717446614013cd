//! What happened on this node (`blockrep log`): syncs, verifies, switchovers, alarms and the replication switch,
//! one JSON object per line in `<state_dir>/history.jsonl`. The file is bounded: past [`MAX_BYTES`] it is
//! renamed to `history.jsonl.1` (replacing the older one), so at most twice that is kept.
//!
//! Writing is best effort: a full disk must not fail a sync, so a failed append is a warning in the log.

use std::io::Write;

use serde::{Deserialize, Serialize};

use crate::config::Config;

/// Size past which the history file is rotated.
pub const MAX_BYTES: u64 = 1 << 20;
const FILE: &str = "history.jsonl";
const OLD_FILE: &str = "history.jsonl.1";

/// Unix seconds now.
pub fn now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// One thing that happened.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    /// A volume's sync finished (`outcome`: ok, failed or cancelled).
    Sync {
        /// Volume name.
        volume: String,
        /// ok, failed or cancelled.
        outcome: String,
        /// The generation committed (ok) or kept.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        generation: Option<u64>,
        /// Seconds.
        #[serde(default)]
        duration_s: f64,
        /// Bytes sent (ok).
        #[serde(default)]
        bytes_sent: u64,
        /// The attempt (1 = first).
        #[serde(default)]
        attempt: u32,
        /// Why it failed.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        error: Option<String>,
    },
    /// A sync was skipped because replication is disabled.
    SyncSkipped,
    /// A verify ran.
    Verify {
        /// Volume name.
        volume: String,
        /// Whether the shadow matched.
        ok: bool,
    },
    /// A role change (promote, demote, switchover).
    Switchover {
        /// Which plan.
        plan: String,
        /// The reason given.
        reason: String,
    },
    /// An alarm was raised.
    AlarmRaised {
        /// The alarm's key.
        alarm: String,
        /// Its message.
        message: String,
    },
    /// An alarm cleared.
    AlarmCleared {
        /// The alarm's key.
        alarm: String,
    },
    /// Switching back: a volume's generation was taken over as this node's reference for the other side (after
    /// a switchover's final sync, or a promote).
    Adopted {
        /// Volume name.
        volume: String,
        /// `primary`: the promoted shadow's generation became this node's reference for syncing back to the old
        /// primary; `standby`: this node's own volume became the standby side of that generation;
        /// `standby-written`: the same after an unplanned promote of the peer, where this node's volume may have
        /// been written since (the sync back compares).
        side: String,
        /// The generation.
        generation: u64,
        /// Its identifier (hex).
        id: String,
    },
    /// A shadow was rolled back to a retained generation (`blockrep restore`, `promote --generation`).
    Rollback {
        /// Volume name.
        volume: String,
        /// The generation rolled back to.
        generation: u64,
        /// Its identifier (hex).
        id: String,
        /// The standby generation number the rollback committed.
        committed: u64,
    },
    /// Replication was enabled or disabled.
    Replication {
        /// The new setting.
        enabled: bool,
    },
    /// A maintenance lock was set (`blockrep lock`, [`crate::maint_lock`]).
    Lock {
        /// The locked node.
        node: String,
        /// Who set it.
        by: String,
        /// Why.
        reason: String,
    },
    /// A maintenance lock was removed (`blockrep unlock`).
    Unlock {
        /// The node unlocked.
        node: String,
        /// Who removed it.
        by: String,
        /// The reason the lock had been set for.
        reason: String,
    },
    /// A promote or switchover was refused by a maintenance lock, or because the lock file cannot be read.
    LockRefused {
        /// The locked node (empty: the lock file cannot be read).
        node: String,
        /// The role change refused.
        action: String,
    },
    /// A standby protecting several primaries refused to take one over (it acts for another, or another with a
    /// higher priority failed at the same time).
    TakeoverRefused {
        /// Why.
        reason: String,
    },
}

/// An event with its time.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Entry {
    /// Unix seconds.
    pub time: u64,
    /// On a standby protecting several primaries: the primary the event concerns.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub primary: Option<String>,
    /// What happened.
    #[serde(flatten)]
    pub event: Event,
}

/// Appends an event (best effort, see the module docs).
pub fn append(cfg: &Config, event: Event) {
    // One history per node: a protected primary's events go to the standby's, tagged with the primary.
    write_entry(
        cfg.node_state_dir(),
        Entry { time: now(), primary: crate::protect::node_of(cfg).map(str::to_owned), event },
    )
}

/// Appends an event to the history of the state directory `state_dir` (`verify --local` has no configuration).
pub fn append_at(state_dir: &std::path::Path, event: Event) {
    write_entry(state_dir, Entry { time: now(), primary: None, event })
}

fn write_entry(state_dir: &std::path::Path, entry: Entry) {
    let path = state_dir.join(FILE);
    let r = (|| -> std::io::Result<()> {
        std::fs::create_dir_all(state_dir)?;
        if std::fs::metadata(&path).is_ok_and(|m| m.len() >= MAX_BYTES) {
            std::fs::rename(&path, state_dir.join(OLD_FILE))?;
        }
        let mut line = serde_json::to_string(&entry).map_err(std::io::Error::other)?;
        line.push('\n');
        let mut f = std::fs::OpenOptions::new().create(true).append(true).open(&path)?;
        f.write_all(line.as_bytes())
    })();
    if let Err(e) = r {
        tracing::warn!(path = %path.display(), error = %e, "cannot append to the history");
    }
}

/// The recorded events at or after `since` (Unix seconds), oldest first; unreadable lines are skipped.
///
/// On a standby protecting several primaries, the configuration of one of them reads only that primary's
/// events; the standby's own configuration reads all.
pub fn read(cfg: &Config, since: u64) -> Vec<Entry> {
    let mut out = Vec::new();
    let only = crate::protect::node_of(cfg);
    for name in [OLD_FILE, FILE] {
        let Ok(text) = std::fs::read_to_string(cfg.node_state_dir().join(name)) else { continue };
        out.extend(
            text.lines()
                .filter_map(|l| serde_json::from_str::<Entry>(l).ok())
                .filter(|e| e.time >= since && only.is_none_or(|p| e.primary.as_deref() == Some(p))),
        );
    }
    out
}

/// `--since` values: Unix seconds, or an age like `2h`, `7d` (that long ago).
pub fn parse_since(s: &str) -> Result<u64, String> {
    if let Ok(n) = s.trim().parse::<u64>() {
        return Ok(n);
    }
    let d = crate::schedule::parse_duration(s).map_err(|e| format!("{e}, or Unix seconds"))?;
    Ok(now().saturating_sub(d.as_secs()))
}

impl std::fmt::Display for Event {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Event::Sync { volume, outcome, generation, duration_s, bytes_sent, attempt, error } => {
                write!(f, "sync {volume}: {outcome}")?;
                if let Some(g) = generation {
                    write!(f, ", generation {g}")?;
                }
                write!(f, ", {duration_s:.1} s, {bytes_sent} bytes sent, attempt {attempt}")?;
                if let Some(e) = error {
                    write!(f, ": {e}")?;
                }
                Ok(())
            }
            Event::SyncSkipped => write!(f, "sync skipped: replication is disabled"),
            Event::Verify { volume, ok } => write!(f, "verify {volume}: {}", if *ok { "ok" } else { "MISMATCH" }),
            Event::Switchover { plan, reason } => write!(f, "{plan}: {reason}"),
            Event::AlarmRaised { alarm, message } => write!(f, "alarm raised {alarm}: {message}"),
            Event::AlarmCleared { alarm } => write!(f, "alarm cleared {alarm}"),
            Event::Adopted { volume, side, generation, id } if side == "primary" => write!(
                f,
                "adopt {volume}: the promoted generation {generation} ({id}) is this node's reference for syncing \
                 back to the old primary"
            ),
            Event::Adopted { volume, side, generation, id } if side == "standby-written" => write!(
                f,
                "adopt {volume}: this node's volume descends from generation {generation} ({id}) and may have been \
                 written since: the sync back from the new primary compares"
            ),
            Event::Adopted { volume, side: _, generation, id } => write!(
                f,
                "adopt {volume}: this node's volume holds generation {generation} ({id}) as the standby side, for \
                 the sync back from the new primary"
            ),
            Event::Rollback { volume, generation, id, committed } => write!(
                f,
                "rollback {volume}: the shadow was rolled back to retained generation {generation} ({id}), committed \
                 as generation {committed}; the primary's next sync compares"
            ),
            Event::Replication { enabled } => {
                write!(f, "replication {}", if *enabled { "enabled" } else { "disabled" })
            }
            Event::Lock { node, by, reason } => {
                write!(f, "lock {node}: maintenance lock set by {by} ({reason}); promote and switchover refused")
            }
            Event::Unlock { node, by, reason } => {
                write!(f, "unlock {node}: maintenance lock ({reason}) removed by {by}")
            }
            Event::LockRefused { node, action } if node.is_empty() => {
                write!(f, "{action} refused: the maintenance lock file cannot be read")
            }
            Event::LockRefused { node, action } => write!(f, "{action} refused: node {node} is locked for maintenance"),
            Event::TakeoverRefused { reason } => write!(f, "takeover refused: {reason}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_round_trip_and_rotate() {
        let dir = tempfile::tempdir().unwrap();
        let text = format!("node = \"a\"\nkey_file = \"/k\"\nstate_dir = {:?}\n", dir.path());
        let cfg = Config::parse(&text, std::path::Path::new("c.toml")).unwrap();
        append(&cfg, Event::Replication { enabled: false });
        append(&cfg, Event::AlarmCleared { alarm: "sync_failed/v".into() });
        let got = read(&cfg, 0);
        assert_eq!(got.len(), 2);
        assert_eq!(got[0].event, Event::Replication { enabled: false });
        assert!(read(&cfg, now() + 10).is_empty());
        // Past the bound the file is rotated; both generations are read.
        std::fs::write(dir.path().join(FILE), vec![b'\n'; MAX_BYTES as usize]).unwrap();
        append(&cfg, Event::SyncSkipped);
        assert!(dir.path().join(OLD_FILE).exists());
        assert_eq!(read(&cfg, 0).last().unwrap().event, Event::SyncSkipped);
    }
}
