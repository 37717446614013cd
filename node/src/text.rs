//! Plain-text forms of what the node reports, for people (`blockrep` prints them; with `--json` it prints the
//! same structs serialized instead): the status screen, deconfigure and shadow lines, sizes and ages.

use std::fmt;
use std::time::Duration;

use crate::deconfigure::{Outcome, Step};
use crate::shadow::ShadowReady;
use crate::status::NodeStatus;

/// `1.5 MiB`-style sizes.
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// `12 s ago`-style times from Unix seconds.
pub fn ago(t: u64) -> String {
    let d = crate::history::now().saturating_sub(t);
    format!("{} ago (unix {t})", crate::schedule::format_duration(Duration::from_secs(d)))
}

/// The status screen of `blockrep status`.
impl fmt::Display for NodeStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = self;
        if !s.primaries.is_empty() {
            return protected(s, f);
        }
        let accepts = if s.role.accepts_syncs { " (accepts syncs)" } else { "" };
        writeln!(f, "node {}: {}{accepts}", s.node, s.role.role)?;
        let enabled = if s.replication_enabled { "enabled" } else { "DISABLED (blockrep replication enable)" };
        writeln!(f, "replication: {enabled}; state: {}", s.state.as_str())?;
        if let Some(r) = &s.running {
            writeln!(f, "sync running: process {} since {}", r.pid, ago(r.since))?;
        }
        match &s.role.last_switchover {
            Some(sw) => writeln!(f, "last switchover: {} -> {} {} ({})", sw.from, sw.to, ago(sw.time), sw.reason)?,
            None => writeln!(f, "last switchover: none")?,
        }
        if let Some(p) = &s.role.plan {
            writeln!(f, "plan in progress: {}", serde_json::to_string(p).map_err(|_| fmt::Error)?)?;
        }
        maintenance(s, f)?;
        if let Some(p) = &s.peer {
            match (&p.role, &p.error) {
                (Some(r), _) => writeln!(f, "peer {}: reachable, {r}", p.address)?,
                (None, Some(e)) => {
                    writeln!(f, "peer {}: {} ({e})", p.address, if p.reachable { "answers" } else { "UNREACHABLE" })?
                }
                (None, None) => writeln!(f, "peer {}: unknown", p.address)?,
            }
        }
        let k = &s.key;
        let rotation = match k.rotation {
            crate::status::Rotation::None => "none".to_owned(),
            r => format!("{} ({})", r.as_str(), k.detail),
        };
        match &k.id {
            Some(id) => writeln!(f, "key {}: id {id}; rotation: {rotation}", k.file.display())?,
            None => writeln!(f, "key {}: UNREADABLE ({})", k.file.display(), k.detail)?,
        }
        for sv in &s.services {
            writeln!(f, "service {} ({}): {}", sv.name, sv.runs_on, sv.state)?;
        }
        for v in &s.volumes {
            let incomplete = if v.complete == Some(false) { ", INCOMPLETE (not promotable)" } else { "" };
            let age = v
                .data_age_s
                .map(|a| format!(", data age {}", crate::schedule::format_duration(Duration::from_secs(a))));
            writeln!(
                f,
                "volume {} ({}): generation {}{incomplete}{}",
                v.name,
                v.side.as_str(),
                v.generation,
                age.unwrap_or_default()
            )?;
            if let Some(why) = &v.untrusted {
                writeln!(
                    f,
                    "  UNTRUSTED shadow (the next sync compares its content; not promotable without --force): {why}"
                )?;
            }
            if let Some(l) = &v.last_verify {
                let result = if l.ok {
                    "ok".to_owned()
                } else {
                    format!("MISMATCH at block {}", l.mismatch_block.unwrap_or_default())
                };
                writeln!(f, "  last verify {}: generation {}, {result}", ago(l.time), l.generation)?;
            }
            for r in &v.retained {
                let fill = r.fill_percent.map_or_else(String::new, |p| format!(", {p:.1} % full"));
                let state = r.problem.as_deref().map_or("complete".to_string(), |p| format!("INCOMPLETE: {p}"));
                writeln!(f, "  retained generation {} in {}{fill}: {state}", r.generation, r.copy)?;
            }
            if let Some(l) = &v.record.last_success {
                writeln!(
                    f,
                    "  last success {}: generation {}, {:.1} s, {} changed, {} sent",
                    ago(l.time),
                    l.generation,
                    l.duration_s,
                    bytes(l.bytes_changed),
                    bytes(l.bytes_sent)
                )?;
                // A tracked volume: where its changes came from, or why tracking did not help this time.
                match (&l.tracker, &l.fallback_reason) {
                    (_, Some(why)) => writeln!(f, "  tracking not used (full scan): {why}")?,
                    (Some(t), None) if t != "full scan" => writeln!(f, "  changes listed by the tracker ({t})")?,
                    _ => {}
                }
            }
            if let Some(fail) =
                v.record.last_failure.as_ref().filter(|_| v.record.last_outcome != Some(crate::status::Outcome::Ok))
            {
                writeln!(f, "  last {} {}: {}", fail.outcome.as_str(), ago(fail.time), fail.cause)?;
            }
        }
        for a in &s.alarms {
            writeln!(f, "ALARM {} since {}: {}", a.key(), ago(a.since), a.message)?;
        }
        Ok(())
    }
}

/// The maintenance-lock lines of the status screen.
fn maintenance(s: &NodeStatus, f: &mut fmt::Formatter<'_>) -> fmt::Result {
    for l in &s.maintenance_locks {
        writeln!(
            f,
            "LOCKED for maintenance: {}, set by {} {}, reason: {}; promote and switchover refused until `blockrep \
             unlock {}`",
            l.node,
            l.entry.by,
            ago(l.entry.since),
            l.entry.reason,
            l.node
        )?;
    }
    if let Some(e) = &s.maintenance_lock_error {
        writeln!(f, "MAINTENANCE LOCK UNREADABLE: {e}")?;
    }
    Ok(())
}

/// The status screen of a standby protecting several primaries: a line per primary, then its own status
/// indented.
fn protected(s: &NodeStatus, f: &mut fmt::Formatter<'_>) -> fmt::Result {
    let acting: Vec<&str> = s.primaries.iter().filter(|p| p.acting).map(|p| p.node.as_str()).collect();
    let names: Vec<&str> = s.primaries.iter().map(|p| p.node.as_str()).collect();
    match acting.is_empty() {
        true => writeln!(f, "node {}: standby protecting {} primaries ({})", s.node, names.len(), names.join(", "))?,
        false => writeln!(
            f,
            "node {}: standby protecting {} primaries ({}); ACTING for {}",
            s.node,
            names.len(),
            names.join(", "),
            acting.join(", ")
        )?,
    }
    let enabled = if s.replication_enabled { "enabled" } else { "DISABLED (blockrep replication enable)" };
    writeln!(f, "replication: {enabled}; state: {}", s.state.as_str())?;
    maintenance(s, f)?;
    for p in &s.primaries {
        let state = match (&p.refused, p.acting) {
            (_, true) => "ACTING for it (its shadows are production here)".to_owned(),
            (None, false) => "protected (accepts its syncs)".to_owned(),
            (Some(why), false) => format!("UNPROTECTED: {why}"),
        };
        let fallback = match p.fallback {
            crate::config::Fallback::Manual => "manual",
            crate::config::Fallback::Automatic => "automatic",
        };
        writeln!(f, "primary {} (priority {}, fallback {fallback}): {state}", p.node, p.priority)?;
        // The primary's own screen without its alarms (listed once below) and without its first line.
        let mut inner = (*p.status).clone();
        inner.alarms.clear();
        inner.maintenance_locks.clear();
        for line in inner.to_string().lines().skip(1) {
            writeln!(f, "  {line}")?;
        }
    }
    for a in &s.alarms {
        writeln!(f, "ALARM {} since {}: {}", a.key(), ago(a.since), a.message)?;
    }
    Ok(())
}

/// One line of `blockrep deconfigure`.
impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let step = self;
        let outcome = |o: &Outcome| match o {
            Outcome::Removed => "removed".to_owned(),
            Outcome::Absent => "not there".to_owned(),
            Outcome::Kept(why) => format!("kept: {why}"),
            Outcome::Failed(why) => format!("NOT removed: {why}"),
        };
        match step {
            Step::Replication(note) => write!(f, "replication: {note}")?,
            Step::RunningSync { pid, outcome: Outcome::Removed } => write!(f, "running sync (process {pid}): stopped")?,
            Step::RunningSync { pid, outcome: o } => write!(f, "running sync (process {pid}): {}", outcome(o))?,
            Step::Snapshot { volume, snapshot, outcome: o } if snapshot.is_empty() => {
                write!(f, "volume {volume}: snapshot {}", outcome(o))?
            }
            Step::Snapshot { volume, snapshot, outcome: o } => {
                write!(f, "volume {volume}: snapshot {snapshot} {}", outcome(o))?
            }
            Step::State { path, outcome: o } => write!(f, "state {}: {}", path.display(), outcome(o))?,
            Step::Shadow { volume, shadow, outcome: o } => {
                write!(f, "volume {volume}: shadow {shadow} {}", outcome(o))?
            }
        }
        Ok(())
    }
}

/// One line of `blockrep shadow create`.
impl fmt::Display for ShadowReady {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = self;
        let (v, shadow, n) = (&s.volume, &s.shadow, s.size);
        if s.created {
            write!(f, "volume {v}: created shadow {shadow} ({n} bytes)")?;
        } else {
            write!(f, "volume {v}: shadow {shadow} already exists ({n} bytes)")?;
        }
        Ok(())
    }
}

/// The lines of `blockrep generations` for one volume.
pub fn generations(v: &crate::retain::VolumeGenerations) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let how = v.backend.as_deref().map_or_else(String::new, |b| format!(", {b} copies"));
    let _ = writeln!(s, "volume {} (keep_generations = {}{how}):", v.volume, v.keep_generations);
    let short = |id: &Option<String>| id.as_deref().map_or("-".to_string(), |i| i[..i.len().min(12)].to_string());
    let when = |t: Option<u64>| t.map_or("-".to_string(), ago);
    match &v.current {
        Some(c) => {
            let state = match (&c.untrusted, c.complete) {
                (_, false) => "incomplete".to_string(),
                (Some(why), true) => format!("untrusted: {why}"),
                (None, true) => "complete".to_string(),
            };
            let _ = writeln!(
                s,
                "  current  generation {:>5}  id {}  made {} by {}  {state}",
                c.generation,
                short(&c.id),
                when(c.made_at),
                c.source_node.as_deref().unwrap_or("-")
            );
        }
        None => {
            let _ = writeln!(s, "  current  (no sync received yet)");
        }
    }
    for r in &v.retained {
        let rec = &r.record;
        let state = match (&r.problem, &rec.untrusted, r.promotable) {
            (Some(p), _, _) => format!("INCOMPLETE: {p}"),
            (None, Some(why), _) => format!("complete, kept from an untrusted shadow ({why}): restore needs --force"),
            (None, None, true) => "complete, promotable".to_string(),
            (None, None, false) => "complete (identifier unknown: not promotable)".to_string(),
        };
        let size = r.size_on_disk.map_or("-".to_string(), bytes);
        let fill = r.fill_percent.map_or_else(String::new, |p| format!(", {p:.1} % full"));
        let _ = writeln!(
            s,
            "  retained generation {:>5}  id {}  made {} by {}  {} ({size} on disk{fill})  {state}",
            rec.generation,
            short(&rec.id),
            when(rec.made_at),
            rec.source_node.as_deref().unwrap_or("-"),
            rec.copy
        );
    }
    if let Some(p) = &v.problem {
        let _ = writeln!(s, "  problem: {p}");
    }
    s
}

#[cfg(test)]
mod tests {
    #[test]
    fn sizes_are_human_readable() {
        assert_eq!(super::bytes(512), "512 B");
        assert_eq!(super::bytes(1536), "1.5 KiB");
        assert_eq!(super::bytes(256 << 20), "256.0 MiB");
    }
}
