//! `blockrep deconfigure`: returns a node to standalone.
//!
//! In order: replication is stopped for this node (see [`Step::Replication`]), blockrep's leftover snapshots of
//! every `snapshot = "lvm"` volume are removed (only LVs tagged `blockrep_snapshot`, through
//! [`lvmctl::Lvm::remove_leftover_snapshot`]), the state is removed (`<state_dir>/primary`, `<state_dir>/standby`,
//! the role state directory; `state_dir` itself when nothing else is left in it), and with `delete_shadows` the
//! shadows: a file shadow is deleted, an LV shadow removed only when it carries the `blockrep_shadow` tag.
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
                | Step::State { outcome: Outcome::Failed(_), .. }
                | Step::Shadow { outcome: Outcome::Failed(_), .. }
        )
    }
}

/// Runs `deconfigure`; `report` is called for every step as it is done.
pub fn run(cfg: &Config, opts: DeconfigureOptions, report: &mut dyn FnMut(&Step)) -> Result<(), Error> {
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
    let mut failed = 0;
    let mut emit = |s: Step| {
        failed += usize::from(s.failed());
        report(&s);
    };
    // The schedule's `replication disable` switch lives in the state directory, which is removed below; what
    // starts syncs and the daemon is systemd, which the node library does not drive.
    emit(Step::Replication(
        "the state directory (and any replication switch in it) is removed below; stop the units with \
         `systemctl disable --now blockrep-sync.timer blockrep-serve.service` (scripts/install.sh --uninstall \
         does it)"
            .into(),
    ));
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
        let snap = name.clone().unwrap_or_else(|| format!("{}_blockrep_snap", lv.name));
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
    let state_dirs = [cfg.state_dir.join("primary"), cfg.state_dir.join("standby"), layout.role_dir().to_owned()];
    for dir in state_dirs {
        let outcome = remove_dir(&dir);
        emit(Step::State { path: dir, outcome });
    }
    let outcome = match std::fs::remove_dir(&cfg.state_dir) {
        Ok(()) => Outcome::Removed,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Outcome::Absent,
        Err(_) => Outcome::Kept(format!("not empty: {}", leftovers(&cfg.state_dir))),
    };
    emit(Step::State { path: cfg.state_dir.clone(), outcome });
    match failed {
        0 => Ok(()),
        failed => Err(DeconfigureError::Incomplete { failed }.into()),
    }
}

/// The list of files `scripts/install.sh` installed, kept in the default state directory.
const INSTALL_MANIFEST: &str = "install.manifest";

fn remove_dir(dir: &Path) -> Outcome {
    match std::fs::remove_dir_all(dir) {
        Ok(()) => Outcome::Removed,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Outcome::Absent,
        Err(e) => Outcome::Failed(e.to_string()),
    }
}

/// The names left in a directory, for the report.
fn leftovers(dir: &Path) -> String {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|r| r.filter_map(|e| e.ok()).map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default();
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
    why.join("; ")
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
        run(&cfg, DeconfigureOptions::default(), &mut |s| steps.push(s.clone())).unwrap();
        assert!(!d.path().join("state").exists(), "{steps:?}");
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
