//! `blockrep deconfigure`: returns a node to standalone.
//!
//! In order: replication is switched off (`blockrep replication disable`: the switch stays after the state is
//! gone, so a timer that still fires does nothing) and a running sync is cancelled (SIGTERM to the holder of the
//! sync lock, as `blockrep cancel`) and waited for; blockrep's leftover snapshots of every `snapshot = "lvm"` volume
//! are removed (only LVs tagged `blockrep_snapshot`, through [`lvmctl::Lvm::remove_leftover_snapshot`]), and their
//! trackers (`track`; only blockrep's, by their tags); the state
//! is removed (`<state_dir>/primary` and `standby`, the role state directory, the lock, history and alarm files,
//! the metrics file); with `delete_shadows` the shadows: a file shadow is deleted, an LV shadow removed only when
//! it carries the `blockrep_shadow` tag. Anything else found in `state_dir` is named and left alone.
//!
//! Shadows are deleted only on a node whose role state says standby: on a primary (or a node whose role state
//! cannot be read) a shadow path may name production data (shared configuration, or LV names swapped by a
//! promote), so that is refused before anything is touched.
//!
//! Every step is attempted; the ones that could not be done are reported and make the whole run fail at the end
//! ([`DeconfigureError::Incomplete`]), so that running it again finishes the job.

use std::path::{Path, PathBuf};

use lvmctl::{Lvm, SHADOW_TAG};

use crate::config::{Config, SnapshotDriver};
use crate::{Error, ErrorKind};

/// Errors of `deconfigure`.
#[derive(Debug, thiserror::Error)]
pub enum DeconfigureError {
    /// Shadows were to be deleted on a node that is not a standby.
    #[error(
        "refusing --delete-shadows: {why}; a shadow path may name production data there (demote the node first, \
         or run deconfigure without --delete-shadows)"
    )]
    NotStandby {
        /// The role, or why it cannot be read.
        why: String,
    },
    /// Some steps could not be done (each was reported).
    #[error("{failed} step(s) of deconfigure could not be done (see above); fix them and run it again")]
    Incomplete {
        /// How many.
        failed: usize,
    },
}

impl DeconfigureError {
    /// The kind of this error.
    pub fn kind(&self) -> ErrorKind {
        match self {
            DeconfigureError::NotStandby { .. } => ErrorKind::Unsafe,
            DeconfigureError::Incomplete { .. } => ErrorKind::Failed,
        }
    }
}

/// Options of `deconfigure`.
#[derive(Debug, Clone, Copy, Default)]
pub struct DeconfigureOptions {
    /// Also delete the shadows.
    pub delete_shadows: bool,
}

/// What happened to one thing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Removed now.
    Removed,
    /// Was not there.
    Absent,
    /// Left in place on purpose, with the reason.
    Kept(String),
    /// Could not be removed, with the reason (the run fails at the end).
    Failed(String),
}

/// One step of `deconfigure`, reported as it is done.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Replication for this node: what was done and what the operator still has to do.
    Replication(String),
    /// A sync that was running (holder of the sync lock): cancelled and waited for.
    RunningSync {
        /// Its process id.
        pid: u32,
        /// `Removed`: it stopped; `Failed`: it did not (nothing further was done).
        outcome: Outcome,
    },
    /// A volume's leftover snapshot (`VG/LV`, or why it was not looked for).
    Snapshot {
        /// Volume name.
        volume: String,
        /// The snapshot LV, `VG/LV`.
        snapshot: String,
        /// What happened.
        outcome: Outcome,
    },
    /// A state directory.
    State {
        /// The directory.
        path: PathBuf,
        /// What happened.
        outcome: Outcome,
    },
    /// A volume's shadow.
    Shadow {
        /// Volume name.
        volume: String,
        /// The shadow (file path or `VG/LV`).
        shadow: String,
        /// What happened.
        outcome: Outcome,
    },
}

impl Step {
    fn failed(&self) -> bool {
        matches!(
            self,
            Step::Snapshot { outcome: Outcome::Failed(_), .. }
                | Step::RunningSync { outcome: Outcome::Failed(_), .. }
                | Step::State { outcome: Outcome::Failed(_), .. }
                | Step::Shadow { outcome: Outcome::Failed(_), .. }
        )
    }
}

/// Runs `deconfigure`; `report` is called for every step as it is done.
pub fn run(cfg: &Config, opts: DeconfigureOptions, report: &mut dyn FnMut(&Step)) -> Result<(), Error> {
    // A standby protecting several primaries: each primary's part first (its shadows, its state), then the
    // node's own state and the directory that held theirs.
    if opts.delete_shadows {
        if let Some(p) = cfg.primaries.iter().find(|c| crate::protect::is_acting(c)) {
            let why = format!("this standby acts for primary {}", crate::protect::node_of(p).unwrap_or_default());
            return Err(DeconfigureError::NotStandby { why }.into());
        }
    }
    for c in &cfg.primaries {
        run(c, opts, report)?;
    }
    let layout = cfg.layout();
    if opts.delete_shadows {
        match role::accepts_syncs(layout.role_dir()) {
            Ok(true) => {}
            Ok(false) => return Err(DeconfigureError::NotStandby { why: "this node is primary".into() }.into()),
            Err(e) => {
                return Err(DeconfigureError::NotStandby { why: format!("its role state cannot be read ({e})") }.into())
            }
        }
    }
    let failed = std::cell::Cell::new(0);
    let mut emit = |s: Step| {
        failed.set(failed.get() + usize::from(s.failed()));
        report(&s);
    };
    // What starts syncs and the daemon is systemd, which the node library does not drive: the switch makes a
    // timer that still fires do nothing, and the note says how to stop the units.
    match crate::schedule::set_replication(cfg, false) {
        Ok(()) => emit(Step::Replication(
            "disabled (`blockrep replication enable` turns it back on); stop the units with `systemctl disable \
             --now blockrep-sync.timer blockrep-serve.service` (scripts/install.sh --uninstall does it)"
                .into(),
        )),
        Err(e) => {
            emit(Step::Replication(format!("cannot be disabled: {}", link::error_chain(&e))));
            failed.set(failed.get() + 1);
        }
    }
    if let Some(h) = crate::lock::holder(cfg) {
        let outcome = match crate::lock::cancel(cfg) {
            Ok(_) => wait_for_sync(cfg),
            Err(e) => Outcome::Failed(link::error_chain(&e)),
        };
        let stopped = outcome == Outcome::Removed;
        emit(Step::RunningSync { pid: h.pid, outcome });
        if !stopped {
            // Never remove the state from under a running sync.
            return Err(DeconfigureError::Incomplete { failed: failed.get().max(1) }.into());
        }
    }
    let mut lvm: Option<Result<Lvm, String>> = None;
    for vol in &cfg.volumes {
        let SnapshotDriver::Lvm { name, .. } = &vol.snapshot else { continue };
        let Some(source) = &vol.source else { continue };
        let lvm = lvm.get_or_insert_with(|| Lvm::new().map_err(|e| e.to_string()));
        let step = |snapshot: String, outcome| Step::Snapshot { volume: vol.name.clone(), snapshot, outcome };
        let lvm = match lvm {
            Ok(l) => l,
            Err(e) => {
                emit(step(String::new(), Outcome::Kept(format!("lvm cannot be used ({e}); nothing to look for"))));
                continue;
            }
        };
        if !source.exists() {
            emit(step(String::new(), Outcome::Kept(format!("source {} is not on this node", source.display()))));
            continue;
        }
        let lv = match lvm.lv_for_device(source) {
            Ok(lv) => lv,
            Err(e) => {
                emit(step(String::new(), Outcome::Kept(format!("source {} is not an LV: {e}", source.display()))));
                continue;
            }
        };
        let snap = crate::freeze::snapshot_name(&lv, name.as_deref());
        // The volume's trackers (`track`) first: one may carry the snapshot's name. Nothing would remove them
        // after this, and they pin pool space (thin) or copy every write to the origin (classic) until full.
        for r in crate::freeze::remove_trackers(lvm, &lv, &snap) {
            use crate::freeze::TrackerRemoval;
            emit(match r {
                TrackerRemoval::Removed(name) => step(name, Outcome::Removed),
                TrackerRemoval::NotOurs(name) => step(
                    name,
                    Outcome::Kept(format!("is not blockrep's tracker (no {} tag)", crate::freeze::TRACKER_TAG)),
                ),
                TrackerRemoval::Failed(name, why) => step(name, Outcome::Failed(why)),
            });
        }
        let outcome = match lvm.remove_leftover_snapshot(&lv.vg, &lv.name, &snap) {
            Ok(true) => Outcome::Removed,
            Ok(false) => Outcome::Absent,
            Err(e @ lvmctl::LvmError::NotOurs { .. }) => Outcome::Kept(e.to_string()),
            Err(e) => Outcome::Failed(link::error_chain(&e)),
        };
        emit(step(format!("{}/{snap}", lv.vg), outcome));
    }
    if opts.delete_shadows {
        for vol in &cfg.volumes {
            let Some(shadow) = &vol.shadow else { continue };
            let (shadow, outcome) = delete_shadow(shadow, &mut lvm);
            emit(Step::Shadow { volume: vol.name.clone(), shadow, outcome });
        }
    }
    let mut state = vec![cfg.state_dir.join("primary"), cfg.state_dir.join("standby"), layout.role_dir().to_owned()];
    state.extend(STATE_FILES.iter().map(|f| cfg.state_dir.join(f)));
    state.extend(cfg.monitoring.metrics_file.clone());
    if !cfg.primaries.is_empty() {
        state.extend([cfg.state_dir.join(crate::config::PRIMARIES_DIR), cfg.state_dir.join("takeover")]);
    }
    for path in state {
        let outcome = remove(&path);
        if outcome != Outcome::Absent {
            emit(Step::State { path, outcome });
        }
    }
    if let Some(names) = leftovers(&cfg.state_dir) {
        emit(Step::State { path: cfg.state_dir.clone(), outcome: Outcome::Kept(names) });
    }
    match failed.get() {
        0 => Ok(()),
        failed => Err(DeconfigureError::Incomplete { failed }.into()),
    }
}

/// The list of files `scripts/install.sh` installed, kept in the default state directory.
const INSTALL_MANIFEST: &str = "install.manifest";

/// Files of the state directory besides the per-volume and role directories: the sync lock (crate::lock), the
/// history and its rotated part (crate::history), the alarms and their lock (crate::alarms). The replication
/// switch (crate::schedule) stays: it keeps the node from syncing again.
const STATE_FILES: &[&str] =
    &["sync.lock", "history.jsonl", "history.jsonl.1", "alarms.json", "alarms.lock", "maintenance_lock.json"];

/// The replication switch's file name in the state directory (crate::schedule).
const SWITCH_FILE: &str = "replication-disabled";

/// How long a cancelled sync may take to stop (the systemd unit's TimeoutStopSec).
const STOP_WAIT: std::time::Duration = std::time::Duration::from_secs(120);

/// Waits until the cancelled sync released its lock.
fn wait_for_sync(cfg: &Config) -> Outcome {
    let deadline = std::time::Instant::now() + STOP_WAIT;
    while crate::lock::holder(cfg).is_some() {
        if std::time::Instant::now() > deadline {
            return Outcome::Failed(format!("still running after {} s; stop it and run again", STOP_WAIT.as_secs()));
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    Outcome::Removed
}

fn remove(path: &Path) -> Outcome {
    let r = match std::fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => std::fs::remove_dir_all(path),
        Ok(_) => std::fs::remove_file(path),
        Err(e) => Err(e),
    };
    match r {
        Ok(()) => Outcome::Removed,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Outcome::Absent,
        Err(e) => Outcome::Failed(e.to_string()),
    }
}

/// What is left in the state directory besides the replication switch, for the report.
fn leftovers(dir: &Path) -> Option<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|r| r.filter_map(|e| e.ok()).map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default();
    names.retain(|n| n != SWITCH_FILE);
    if names.is_empty() {
        return None;
    }
    names.sort();
    // scripts/install.sh keeps its list of installed files there; `install.sh --uninstall --purge` removes it.
    let (install, other): (Vec<String>, Vec<String>) = names.into_iter().partition(|n| n == INSTALL_MANIFEST);
    let mut why = Vec::new();
    if !other.is_empty() {
        why.push(format!("{} (not blockrep's known layout: remove by hand)", other.join(", ")));
    }
    if !install.is_empty() {
        why.push(format!("{INSTALL_MANIFEST} (scripts/install.sh --uninstall --purge removes it)"));
    }
    Some(why.join("; "))
}

/// Deletes one shadow: a file outright, an LV only when tagged [`SHADOW_TAG`].
fn delete_shadow(shadow: &Path, lvm: &mut Option<Result<Lvm, String>>) -> (String, Outcome) {
    if !shadow.starts_with("/dev") {
        let outcome = match std::fs::symlink_metadata(shadow) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Outcome::Absent,
            Ok(m) if !m.is_file() => Outcome::Kept("not a regular file".into()),
            _ => match std::fs::remove_file(shadow) {
                Ok(()) => Outcome::Removed,
                Err(e) => Outcome::Failed(e.to_string()),
            },
        };
        return (shadow.display().to_string(), outcome);
    }
    let Some((vg, lv)) = crate::shadow::vg_lv(shadow) else {
        return (shadow.display().to_string(), Outcome::Kept("not of the form /dev/VG/LV".into()));
    };
    let name = format!("{vg}/{lv}");
    let lvm = match lvm.get_or_insert_with(|| Lvm::new().map_err(|e| e.to_string())) {
        Ok(l) => l,
        Err(e) => return (name, Outcome::Failed(format!("lvm cannot be used: {e}"))),
    };
    let outcome = match lvm.find_lv(&vg, &lv) {
        Ok(None) => Outcome::Absent,
        Ok(Some(found)) if !found.has_tag(SHADOW_TAG) => {
            Outcome::Kept(format!("not tagged {SHADOW_TAG}: not a shadow blockrep created"))
        }
        Ok(Some(_)) => match lvm.remove_lv(&vg, &lv) {
            Ok(()) => Outcome::Removed,
            Err(e) => Outcome::Failed(link::error_chain(&e)),
        },
        Err(e) => Outcome::Failed(link::error_chain(&e)),
    };
    (name, outcome)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(dir: &Path) -> Config {
        let text = format!(
            "node = \"n\"\nkey_file = \"{d}/key\"\nstate_dir = \"{d}/state\"\n[[volume]]\nname = \"v\"\n\
             shadow = \"{d}/v.img\"\n",
            d = dir.display()
        );
        Config::parse(&text, &dir.join("c.toml")).unwrap()
    }

    #[test]
    fn state_goes_shadows_stay_unless_asked() {
        let d = tempfile::tempdir().unwrap();
        let cfg = config(d.path());
        std::fs::create_dir_all(d.path().join("state/standby/v")).unwrap();
        std::fs::write(d.path().join("state/standby/v/manifest"), b"m").unwrap();
        std::fs::write(d.path().join("v.img"), b"shadow").unwrap();
        let mut steps = Vec::new();
        std::fs::write(d.path().join("state/history.jsonl"), b"{}").unwrap();
        run(&cfg, DeconfigureOptions::default(), &mut |s| steps.push(s.clone())).unwrap();
        assert!(!d.path().join("state/standby").exists(), "{steps:?}");
        assert!(!d.path().join("state/history.jsonl").exists(), "{steps:?}");
        assert!(!crate::schedule::replication_enabled(&cfg), "replication stays off");
        assert_eq!(std::fs::read(d.path().join("v.img")).unwrap(), b"shadow");
        let mut steps = Vec::new();
        run(&cfg, DeconfigureOptions { delete_shadows: true }, &mut |s| steps.push(s.clone())).unwrap();
        assert!(!d.path().join("v.img").exists());
        assert!(steps.iter().any(|s| matches!(s, Step::Shadow { outcome: Outcome::Removed, .. })), "{steps:?}");
    }

    #[test]
    fn unknown_files_in_the_state_directory_are_kept_and_named() {
        let d = tempfile::tempdir().unwrap();
        let cfg = config(d.path());
        std::fs::create_dir_all(d.path().join("state/primary/v")).unwrap();
        std::fs::write(d.path().join("state/notes.txt"), b"mine").unwrap();
        let mut steps = Vec::new();
        run(&cfg, DeconfigureOptions::default(), &mut |s| steps.push(s.clone())).unwrap();
        assert!(!d.path().join("state/primary").exists());
        assert!(d.path().join("state/notes.txt").exists());
        let kept =
            steps.iter().any(|s| matches!(s, Step::State { outcome: Outcome::Kept(w), .. } if w.contains("notes.txt")));
        assert!(kept, "{steps:?}");
    }
}
