//! Boot target backends: what to change so that the next boot comes up in the new role.
//!
//! - `grub-env`: set `saved_entry` (or `next_entry` with `one_shot`) in a GRUB environment block.
//! - `lv-rename`: swap the production and shadow LV names (three renames per pair through a temporary name),
//!   through the [`LvRenamer`] trait that the CLI binds to lvmctl. Each rename is idempotent (a rename whose
//!   source is gone and whose target exists counts as done) and the plan journals each one, so a crash between
//!   renames is finished by running the plan again.
//! - `none`.

use std::path::Path;

use crate::grubenv::{GrubEnv, GrubEnvError};

/// The error type of an [`LvRenamer`] binding.
pub type LvmError = Box<dyn std::error::Error + Send + Sync>;

/// LVM operations the `lv-rename` backend needs. The CLI implements it with lvmctl.
pub trait LvRenamer {
    /// Whether `vg/lv` exists.
    fn exists(&self, vg: &str, lv: &str) -> Result<bool, LvmError>;
    /// Renames `vg/from` to `vg/to`.
    fn rename(&self, vg: &str, from: &str, to: &str) -> Result<(), LvmError>;
}

/// Errors of changing the boot target.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// The GRUB environment block could not be updated.
    #[error("could not set the GRUB boot entry")]
    Grub(#[from] GrubEnvError),
    /// An LV rename failed.
    #[error("could not rename LV {vg}/{from} to {vg}/{to}; check the LVs with `lvs {vg}` and run the command again")]
    Rename {
        /// Volume group.
        vg: String,
        /// Source name.
        from: String,
        /// Target name.
        to: String,
        /// The lvmctl error.
        #[source]
        source: LvmError,
    },
    /// Neither or both of the names of a rename exist, so the swap cannot continue safely.
    #[error("cannot rename LV {vg}/{from} to {vg}/{to}: {problem}; fix the LV names by hand (`lvs {vg}`), then run the command again")]
    Inconsistent {
        /// Volume group.
        vg: String,
        /// Source name.
        from: String,
        /// Target name.
        to: String,
        /// What was found.
        problem: &'static str,
    },
    /// `lv-rename` is configured but the caller gave no LVM binding.
    #[error("boot_target kind lv-rename needs LVM access, but none was provided; this is a bug in the caller")]
    NoLvm,
}

/// One rename of an LV swap.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rename {
    /// Volume group.
    pub vg: String,
    /// Source name.
    pub from: String,
    /// Target name.
    pub to: String,
}

/// The renames that swap each pair's names: production → temp, shadow → production, temp → shadow.
pub fn lv_swap_plan(vg: &str, pairs: &[crate::config::LvPair], temp_suffix: &str) -> Vec<Rename> {
    let mut out = Vec::with_capacity(pairs.len() * 3);
    for p in pairs {
        let tmp = format!("{}{}", p.production, temp_suffix);
        let r = |from: &str, to: &str| Rename { vg: vg.into(), from: from.into(), to: to.into() };
        out.push(r(&p.production, &tmp));
        out.push(r(&p.shadow, &p.production));
        out.push(r(&tmp, &p.shadow));
    }
    out
}

/// Performs one rename idempotently; `Ok(false)` if it had already happened.
pub fn apply_rename(r: &Rename, lvm: &dyn LvRenamer) -> Result<bool, BootError> {
    let err = |source| BootError::Rename { vg: r.vg.clone(), from: r.from.clone(), to: r.to.clone(), source };
    let from = lvm.exists(&r.vg, &r.from).map_err(err)?;
    let to = lvm.exists(&r.vg, &r.to).map_err(err)?;
    let inconsistent =
        |problem| BootError::Inconsistent { vg: r.vg.clone(), from: r.from.clone(), to: r.to.clone(), problem };
    match (from, to) {
        (true, false) => lvm.rename(&r.vg, &r.from, &r.to).map(|()| true).map_err(err),
        (false, true) => Ok(false),
        (true, true) => Err(inconsistent("both names exist")),
        (false, false) => Err(inconsistent("neither name exists")),
    }
}

/// Points GRUB at `entry`: `saved_entry` (clearing a pending `next_entry`), or `next_entry` if `one_shot`.
/// Returns whether the file changed.
pub fn grub_select(path: &Path, entry: &str, one_shot: bool) -> Result<bool, BootError> {
    let mut env = GrubEnv::read(path)?;
    let before = env.clone();
    if one_shot {
        env.set("next_entry", entry)?;
    } else {
        env.set("saved_entry", entry)?;
        env.unset("next_entry");
    }
    if env == before {
        return Ok(false);
    }
    env.write(path)?;
    Ok(true)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::cell::RefCell;
    use std::collections::BTreeSet;

    /// An in-memory VG that records every rename.
    #[derive(Debug, Default)]
    pub(crate) struct FakeVg {
        pub lvs: RefCell<BTreeSet<String>>,
        pub calls: RefCell<Vec<String>>,
        pub fail_on: Option<String>,
    }

    impl LvRenamer for FakeVg {
        fn exists(&self, _vg: &str, lv: &str) -> Result<bool, LvmError> {
            Ok(self.lvs.borrow().contains(lv))
        }
        fn rename(&self, vg: &str, from: &str, to: &str) -> Result<(), LvmError> {
            if self.fail_on.as_deref() == Some(from) {
                return Err(format!("injected failure renaming {from}").into());
            }
            let mut lvs = self.lvs.borrow_mut();
            assert!(lvs.remove(from), "rename of missing {from}");
            assert!(lvs.insert(to.to_string()), "rename onto existing {to}");
            self.calls.borrow_mut().push(format!("{vg}/{from}->{to}"));
            Ok(())
        }
    }

    #[test]
    fn swap_plan_swaps_names_and_reruns_are_harmless() {
        let pairs = vec![crate::config::LvPair { production: "root".into(), shadow: "root_shadow".into() }];
        let plan = lv_swap_plan("vg0", &pairs, "_tmp");
        let vg = FakeVg::default();
        vg.lvs.borrow_mut().extend(["root".to_string(), "root_shadow".to_string()]);
        // Crash after each rename: re-applying the already done rename is a no-op.
        for r in &plan {
            assert!(apply_rename(r, &vg).unwrap());
            assert!(!apply_rename(r, &vg).unwrap());
        }
        assert_eq!(*vg.calls.borrow(), ["vg0/root->root_tmp", "vg0/root_shadow->root", "vg0/root_tmp->root_shadow"]);
        assert_eq!(vg.lvs.borrow().iter().cloned().collect::<Vec<_>>(), ["root", "root_shadow"]);
        vg.lvs.borrow_mut().insert("root_tmp".into());
        assert!(matches!(apply_rename(&plan[0], &vg), Err(BootError::Inconsistent { .. })));
    }
}
