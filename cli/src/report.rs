//! Rendering of what the node library returns: one line of text or one JSON object per result, and the progress
//! bar.

use std::io::{IsTerminal, Write};

use engine::sync::SyncReport;
use node::primary::{NetReport, SyncObserver, VolumeOutcome};
use node::text::bytes;
use serde::Serialize;

/// One JSON object on one line.
fn json(v: &impl Serialize) -> String {
    // The rendered types are plain structs of strings and numbers, which always serialize.
    serde_json::to_string(v).expect("report types serialize")
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
    match &r.fallback_reason {
        Some(why) => println!("  changes found by a {}, not the tracker, because {why}", r.tracker),
        None if r.tracker != "full scan" => println!("  changes found by the tracker ({})", r.tracker),
        None => {}
    }
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

/// Prints what `blockrep verify` did for one volume (with a configuration).
pub fn print_verify_outcome(o: &node::verify::Outcome, as_json: bool) {
    if as_json {
        println!("{}", json(o));
    } else {
        println!("{o}");
    }
}

/// Prints `blockrep generations`: a table per volume, or one JSON object per volume.
pub fn print_generations(g: &[node::retain::VolumeGenerations], as_json: bool) {
    for v in g {
        if as_json {
            println!("{}", json(v));
        } else {
            print!("{}", node::text::generations(v));
        }
    }
}

/// Prints what `blockrep restore` did.
pub fn print_restored(r: &node::retain::Restored, as_json: bool) {
    if as_json {
        println!("{}", json(r));
    } else {
        println!(
            "volume {}: the shadow holds retained generation {} ({}) again, committed as generation {} ({} bytes \
             written); the primary's next sync compares and overwrites it (`blockrep replication disable` on the \
             primary to keep it)",
            r.volume, r.generation, r.id, r.committed, r.bytes_changed
        );
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

/// Prints what `blockrep reconcile` found and did (for one primary of a standby protecting several: prefixed with
/// it, and `"primary"` in JSON).
pub fn print_reconciled(primary: Option<&str>, r: &node::roles::Reconciled, as_json: bool) {
    use node::roles::Reconciled;
    if as_json {
        let mut v = match r {
            Reconciled::NoRole => serde_json::json!({ "action": "none", "role": null }),
            Reconciled::NotPrimary(role) => serde_json::json!({ "action": "none", "role": role }),
            Reconciled::Reasserted(p) => serde_json::json!({ "action": "reasserted", "role": p.role, "plan": p }),
            Reconciled::Demoted { why, report } => {
                serde_json::json!({ "action": "demoted", "role": report.role, "why": why, "plan": report })
            }
        };
        if let Some(p) = primary {
            v["primary"] = p.into();
        }
        println!("{}", json(&v));
        return;
    }
    let prefix = primary.map(|p| format!("[for {p}] ")).unwrap_or_default();
    match r {
        Reconciled::NoRole => println!("{prefix}no [role] section: blockrep manages no address here, nothing to do"),
        Reconciled::NotPrimary(role) => println!("{prefix}this node is {role}: nothing to re-assert"),
        Reconciled::Reasserted(p) => println!("{prefix}primary, and nobody else serves: virtual IP re-asserted\n{p}"),
        Reconciled::Demoted { why, report } => {
            println!("{prefix}this node was primary, but another node serves ({why}): demoted\n{report}")
        }
    }
}

/// Prints what `blockrep lock` did (a warning, if any, on stderr).
pub fn print_locked(l: &node::maint_lock::Locked, as_json: bool) {
    if as_json {
        println!("{}", json(l));
    } else {
        let e = &l.lock.entry;
        let state = if l.already { "was already locked (unchanged)" } else { "locked" };
        println!(
            "{} {state} for maintenance on {}, set by {} {}, reason: {}; promote and switchover involving it are \
             refused here, --force included, until `blockrep unlock {}`",
            l.lock.node,
            l.here,
            e.by,
            node::text::ago(e.since),
            e.reason,
            l.lock.node
        );
    }
    if let Some(w) = &l.warning {
        eprintln!("blockrep: warning: {w}");
    }
}

/// Prints what `blockrep unlock` did.
pub fn print_unlocked(u: &node::maint_lock::Unlocked, as_json: bool) {
    if as_json {
        println!("{}", json(u));
    } else {
        match &u.removed {
            Some(e) => println!(
                "{} unlocked on {} (the lock was set by {} {}, reason: {}); promote and switchover allowed again",
                u.node,
                u.here,
                e.by,
                node::text::ago(e.since),
                e.reason
            ),
            None => println!("{} was not locked on {}: nothing to do", u.node, u.here),
        }
    }
}

/// Prints the node's status: one screen, or one JSON object.
pub fn print_status(s: &node::status::NodeStatus, as_json: bool) {
    if as_json {
        println!("{}", json(s));
    } else {
        print!("{s}");
    }
}

/// Prints `blockrep log`: one line per event, or one JSON object per line.
pub fn print_log(entries: &[node::history::Entry], as_json: bool) {
    for e in entries {
        if as_json {
            println!("{}", json(e));
        } else {
            match &e.primary {
                Some(p) => println!("{} [for {p}] {}", e.time, e.event),
                None => println!("{} {}", e.time, e.event),
            }
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
