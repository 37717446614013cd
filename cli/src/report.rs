//! Rendering of what the node library returns: one line of text or one JSON object per result, and the progress
//! bar.

use std::io::{IsTerminal, Write};
use std::time::Duration;

use engine::sync::SyncReport;
use node::primary::{NetReport, SyncObserver, VolumeOutcome};
use serde::Serialize;

/// One JSON object on one line.
fn json(v: &impl Serialize) -> String {
    // The rendered types are plain structs of strings and numbers, which always serialize.
    serde_json::to_string(v).expect("report types serialize")
}

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

/// Prints a sync report as one line of text or one JSON object.
pub fn print_sync(r: &SyncReport, as_json: bool) {
    if as_json {
        println!("{}", json(r));
        return;
    }
    let rate = r.bytes_scanned as f64 / r.duration_s.max(1e-9);
    println!(
        "volume {}: generation {} committed ({:?}); scanned {}, {} blocks changed, {} changed, {} sent \
         ({} as zero extents), {:.2} s, {}/s",
        r.volume,
        r.generation,
        r.mode,
        bytes(r.bytes_scanned),
        r.blocks_changed,
        bytes(r.bytes_changed),
        bytes(r.bytes_sent),
        bytes(r.zero_bytes),
        r.duration_s,
        bytes(rate as u64)
    );
    println!("  {:?} because {}", r.mode, r.reason);
    if let Some(n) = r.standby_bytes_overwritten {
        println!("  split brain resolved: {} of the standby's own changes overwritten ({n} bytes)", bytes(n));
    }
}

/// Prints one volume's network sync.
fn print_net(r: &NetReport, as_json: bool) {
    if as_json {
        println!("{}", json(r));
        return;
    }
    print_sync(&r.sync, false);
    println!(
        "  {} on the wire, compression ratio {:.2}, {} resumed",
        bytes(r.bytes_on_wire),
        r.compression_ratio,
        bytes(r.sync.resumed_bytes)
    );
}

/// What `blockrep sync` shows while the node syncs: a progress bar per volume, each result as it comes, and
/// with several volumes each failure as it happens (the final error sums up).
pub struct SyncOutput {
    /// One JSON object per volume instead of text.
    pub as_json: bool,
    /// The bar of the volume being synced.
    pub bar: Option<(String, indicatif::ProgressBar)>,
}

impl SyncObserver for SyncOutput {
    fn progress(&mut self, volume: &str, done: u64, total: u64) {
        if self.bar.as_ref().is_none_or(|(v, _)| v != volume) {
            self.bar = Some((volume.to_owned(), progress_bar(volume)));
        }
        if let Some((_, bar)) = &self.bar {
            update(bar, done, total);
        }
    }

    fn finished(&mut self, o: &VolumeOutcome, total: usize) {
        if let Some((_, bar)) = self.bar.take() {
            bar.finish_and_clear();
        }
        match &o.result {
            Ok(r) => print_net(r, self.as_json),
            Err(e) if total > 1 => eprintln!("blockrep: volume {}: {}", o.volume, node::error_chain(e)),
            Err(_) => {}
        }
    }
}

/// Prints `listening on ADDR` once the standby daemon is bound (for scripts and tests).
pub fn announce(addr: std::net::SocketAddr) {
    println!("listening on {addr}");
    let _ = std::io::stdout().flush();
}

/// Prints the result of `verify --local`.
pub fn print_verify(v: &node::local::Verification, as_json: bool) {
    if as_json {
        println!("{}", json(v));
    } else if v.ok {
        println!("volume {}: shadow matches generation {} (complete: {})", v.volume, v.generation, v.complete);
    }
}

/// Prints a role plan's report.
pub fn print_plan(r: &node::roles::Report, as_json: bool) {
    if as_json {
        println!("{}", json(r));
    } else {
        println!("{r}");
    }
}

/// Prints one step of `blockrep deconfigure`.
pub fn print_deconfigure(step: &node::deconfigure::Step) {
    use node::deconfigure::{Outcome, Step};
    let outcome = |o: &Outcome| match o {
        Outcome::Removed => "removed".to_owned(),
        Outcome::Absent => "not there".to_owned(),
        Outcome::Kept(why) => format!("kept: {why}"),
        Outcome::Failed(why) => format!("NOT removed: {why}"),
    };
    match step {
        Step::Replication(note) => println!("replication: {note}"),
        Step::RunningSync { pid, outcome: Outcome::Removed } => println!("running sync (process {pid}): stopped"),
        Step::RunningSync { pid, outcome: o } => println!("running sync (process {pid}): {}", outcome(o)),
        Step::Snapshot { volume, snapshot, outcome: o } if snapshot.is_empty() => {
            println!("volume {volume}: snapshot {}", outcome(o))
        }
        Step::Snapshot { volume, snapshot, outcome: o } => {
            println!("volume {volume}: snapshot {snapshot} {}", outcome(o))
        }
        Step::State { path, outcome: o } => println!("state {}: {}", path.display(), outcome(o)),
        Step::Shadow { volume, shadow, outcome: o } => println!("volume {volume}: shadow {shadow} {}", outcome(o)),
    }
}

/// Prints a shadow now in place.
pub fn print_shadow(s: &node::shadow::ShadowReady) {
    let (v, shadow, n) = (&s.volume, &s.shadow, s.size);
    if s.created {
        println!("volume {v}: created shadow {shadow} ({n} bytes)");
    } else {
        println!("volume {v}: shadow {shadow} already exists ({n} bytes)");
    }
}

/// Prints the node's status: one screen, or one JSON object.
pub fn print_status(s: &node::status::NodeStatus, as_json: bool) {
    if as_json {
        println!("{}", json(s));
        return;
    }
    let accepts = if s.role.accepts_syncs { " (accepts syncs)" } else { "" };
    println!("node {}: {}{accepts}", s.node, s.role.role);
    let enabled = if s.replication_enabled { "enabled" } else { "DISABLED (blockrep replication enable)" };
    println!("replication: {enabled}; state: {}", s.state.as_str());
    if let Some(r) = &s.running {
        println!("sync running: process {} since {}", r.pid, ago(r.since));
    }
    match &s.role.last_switchover {
        Some(sw) => println!("last switchover: {} -> {} {} ({})", sw.from, sw.to, ago(sw.time), sw.reason),
        None => println!("last switchover: none"),
    }
    if let Some(p) = &s.role.plan {
        println!("plan in progress: {}", json(p));
    }
    if let Some(p) = &s.peer {
        match (&p.role, &p.error) {
            (Some(r), _) => println!("peer {}: reachable, {r}", p.address),
            (None, Some(e)) => {
                println!("peer {}: {} ({e})", p.address, if p.reachable { "answers" } else { "UNREACHABLE" })
            }
            (None, None) => println!("peer {}: unknown", p.address),
        }
    }
    for sv in &s.services {
        println!("service {} ({}): {}", sv.name, sv.runs_on, sv.state);
    }
    for v in &s.volumes {
        let incomplete = if v.complete == Some(false) { ", INCOMPLETE (not promotable)" } else { "" };
        let age =
            v.data_age_s.map(|a| format!(", data age {}", node::schedule::format_duration(Duration::from_secs(a))));
        println!(
            "volume {} ({}): generation {}{incomplete}{}",
            v.name,
            v.side.as_str(),
            v.generation,
            age.unwrap_or_default()
        );
        if let Some(why) = &v.untrusted {
            println!("  UNTRUSTED shadow (the next sync compares its content; not promotable without --force): {why}");
        }
        if let Some(l) = &v.record.last_success {
            println!(
                "  last success {}: generation {}, {:.1} s, {} changed, {} sent",
                ago(l.time),
                l.generation,
                l.duration_s,
                bytes(l.bytes_changed),
                bytes(l.bytes_sent)
            );
        }
        if let Some(f) =
            v.record.last_failure.as_ref().filter(|_| v.record.last_outcome != Some(node::status::Outcome::Ok))
        {
            println!("  last {} {}: {}", f.outcome.as_str(), ago(f.time), f.cause);
        }
    }
    for a in &s.alarms {
        println!("ALARM {} since {}: {}", a.key(), ago(a.since), a.message);
    }
}

/// `12 s ago`-style times from Unix seconds.
fn ago(t: u64) -> String {
    let d = node::history::now().saturating_sub(t);
    format!("{} ago (unix {t})", node::schedule::format_duration(Duration::from_secs(d)))
}

/// Prints `blockrep log`: one line per event, or one JSON object per line.
pub fn print_log(entries: &[node::history::Entry], as_json: bool) {
    for e in entries {
        if as_json {
            println!("{}", json(e));
        } else {
            println!("{} {}", e.time, e.event);
        }
    }
}

/// A progress bar for one volume on stderr when it is a terminal (hidden otherwise).
pub fn progress_bar(volume: &str) -> indicatif::ProgressBar {
    if !std::io::stderr().is_terminal() {
        return indicatif::ProgressBar::hidden();
    }
    let style = indicatif::ProgressStyle::with_template(
        "{prefix} [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} ETA {eta}",
    )
    .expect("static template");
    indicatif::ProgressBar::new(0).with_style(style.progress_chars("=> ")).with_prefix(volume.to_owned())
}

/// Shows bytes done of total on a bar.
pub fn update(bar: &indicatif::ProgressBar, done: u64, total: u64) {
    bar.set_length(total);
    bar.set_position(done);
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
