//! The path rules every command checks once, when the configuration is loaded ([`check`]):
//!
//! - a shadow is never the state directory (or the role state directory), never inside either, and never a file
//!   blockrep manages (the key file, the configuration file);
//! - two volumes never share a shadow, and a shadow is never another volume's source (the same volume's source
//!   and shadow may be one path: nodes with identical device names share one configuration file);
//! - the state directories are not on a replicated or shadow volume (a sync or promote would overwrite them).
//!
//! Paths are compared after resolving symbolic links as far as they exist (`/dev/vg/lv` and `/dev/mapper/vg-lv`
//! are the same device), and existing files and devices also by identity (device and inode, or device number).

use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use crate::config::{Config, ConfigError};

/// The path with symbolic links resolved for its longest existing prefix, made absolute.
pub fn resolve(p: &Path) -> PathBuf {
    let abs = if p.is_absolute() {
        p.to_owned()
    } else {
        std::env::current_dir().map(|d| d.join(p)).unwrap_or_else(|_| p.to_owned())
    };
    let mut existing = abs.clone();
    let mut rest = Vec::new();
    loop {
        if let Ok(c) = std::fs::canonicalize(&existing) {
            return rest.iter().rev().fold(c, |acc: PathBuf, part| acc.join(part));
        }
        match (existing.file_name().map(|n| n.to_owned()), existing.parent().map(Path::to_owned)) {
            (Some(name), Some(parent)) => {
                rest.push(name);
                existing = parent;
            }
            _ => return abs,
        }
    }
}

/// What identifies an existing file or device: its device number for block devices, else device and inode.
fn identity(p: &Path) -> Option<(u64, u64)> {
    let m = std::fs::metadata(p).ok()?;
    Some(if m.file_type().is_block_device() { (u64::MAX, m.rdev()) } else { (m.dev(), m.ino()) })
}

fn same(a: &Path, b: &Path) -> bool {
    resolve(a) == resolve(b) || matches!((identity(a), identity(b)), (Some(x), Some(y)) if x == y)
}

/// On a standby protecting several primaries (`[[primary]]`): no two primaries' volumes share a shadow, and no
/// shadow is another primary's key file.
pub fn check_across_primaries(cfg: &Config) -> Result<(), ConfigError> {
    let bad = |message: String| ConfigError::Invalid { path: cfg.path.clone(), message };
    let name = |c: &Config| crate::protect::node_of(c).unwrap_or_default().to_owned();
    for (i, a) in cfg.primaries.iter().enumerate() {
        for b in cfg.primaries.iter().skip(i + 1) {
            for va in &a.volumes {
                let Some(sa) = &va.shadow else { continue };
                if let Some(vb) = b.volumes.iter().find(|vb| vb.shadow.as_deref().is_some_and(|sb| same(sa, sb))) {
                    return Err(bad(format!(
                        "primary {} volume {} and primary {} volume {} have the same shadow {}; each volume needs \
                         a shadow of its own",
                        name(a),
                        va.name,
                        name(b),
                        vb.name,
                        sa.display()
                    )));
                }
            }
        }
        for b in cfg.primaries.iter().filter(|b| name(b) != name(a)) {
            if let Some(v) = a.volumes.iter().find(|v| v.shadow.as_deref().is_some_and(|s| same(s, &b.key_file))) {
                return Err(bad(format!(
                    "primary {} volume {}: the shadow is primary {}'s key file; put the shadow elsewhere",
                    name(a),
                    v.name,
                    name(b)
                )));
            }
        }
    }
    Ok(())
}

/// Checks the path rules of the module docs.
pub fn check(cfg: &Config) -> Result<(), ConfigError> {
    let bad = |message: String| ConfigError::Invalid { path: cfg.path.clone(), message };
    let layout = cfg.layout();
    let dirs = [("state directory", cfg.state_dir.as_path()), ("role state directory", layout.role_dir())];
    let files = [("key file", cfg.key_file.as_path()), ("configuration file", cfg.path.as_path())];
    for (i, v) in cfg.volumes.iter().enumerate() {
        let Some(shadow) = &v.shadow else { continue };
        let resolved = resolve(shadow);
        for (what, dir) in dirs {
            if resolved.starts_with(resolve(dir)) {
                return Err(bad(format!(
                    "volume {}: the shadow {} is the {what} {} or inside it, where blockrep keeps its own files; \
                     a sync would overwrite them: put the shadow elsewhere",
                    v.name,
                    shadow.display(),
                    dir.display()
                )));
            }
        }
        for (what, file) in files {
            if same(shadow, file) {
                return Err(bad(format!(
                    "volume {}: the shadow {} is the {what}; a sync would overwrite it: put the shadow elsewhere",
                    v.name,
                    shadow.display()
                )));
            }
        }
        for other in cfg.volumes.iter().skip(i + 1) {
            if other.shadow.as_deref().is_some_and(|s| same(shadow, s)) {
                return Err(bad(format!(
                    "volumes {} and {} have the same shadow {}; each volume needs a shadow of its own",
                    v.name,
                    other.name,
                    shadow.display()
                )));
            }
        }
        for other in cfg.volumes.iter().filter(|o| o.name != v.name) {
            if other.source.as_deref().is_some_and(|s| same(shadow, s)) {
                return Err(bad(format!(
                    "volume {}: the shadow {} is the source of volume {}; a sync would overwrite that volume's data",
                    v.name,
                    shadow.display(),
                    other.name
                )));
            }
        }
    }
    let replicated: Vec<PathBuf> =
        cfg.volumes.iter().flat_map(|v| v.source.iter().chain(v.shadow.iter()).cloned()).collect();
    for (what, dir) in dirs {
        if let Some(v) = replicated.iter().find(|v| resolve(dir).starts_with(resolve(v))) {
            return Err(bad(format!(
                "the {what} {} is inside the replicated volume {}: put it on a filesystem that is not replicated",
                dir.display(),
                v.display()
            )));
        }
        // Also by device: the filesystem holding the directory must not live on a replicated volume.
        role::check_state_dir(dir, &replicated).map_err(|e| bad(format!("{what}: {e}")))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(dir: &Path, volumes: &str) -> Result<Config, ConfigError> {
        let text =
            format!("node = \"n\"\nkey_file = {:?}\nstate_dir = {:?}\n{volumes}", dir.join("key"), dir.join("state"));
        let path = dir.join("blockrep.toml");
        std::fs::write(&path, text).unwrap();
        Config::load(&path)
    }

    fn refused(dir: &Path, volumes: &str, needle: &str) {
        let e = link::error_chain(&config(dir, volumes).unwrap_err());
        assert!(e.contains(needle), "{e}");
        assert!(!dir.join("state").exists(), "a refused configuration created the state directory");
    }

    #[test]
    fn shadows_aimed_at_blockreps_own_files_are_refused_at_load() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path();
        let vol = |shadow: &Path| format!("[[volume]]\nname = \"v\"\nshadow = {shadow:?}\n");
        refused(p, &vol(&p.join("state/standby/v/manifest")), "inside it");
        refused(p, &vol(&p.join("state/standby/v/spool")), "inside it");
        refused(p, &vol(&p.join("state")), "inside it");
        refused(p, &vol(&p.join("./state/../state/role/role.state")), "inside it");
        refused(p, &vol(&p.join("key")), "is the key file");
        refused(p, &vol(&p.join("blockrep.toml")), "is the configuration file");
        config(p, &vol(&p.join("shadow.img"))).unwrap();
    }

    #[test]
    fn volumes_never_share_a_shadow_or_overwrite_each_others_source() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path();
        std::fs::write(p.join("a.img"), b"x").unwrap();
        std::os::unix::fs::symlink(p.join("a.img"), p.join("alias.img")).unwrap();
        let two = |s1: &str, s2: &str| {
            format!(
                "[[volume]]\nname = \"v1\"\nshadow = {:?}\n[[volume]]\nname = \"v2\"\nshadow = {:?}\n",
                p.join(s1),
                p.join(s2)
            )
        };
        refused(p, &two("a.img", "a.img"), "have the same shadow");
        refused(p, &two("a.img", "alias.img"), "have the same shadow");
        let cross = format!(
            "[[volume]]\nname = \"v1\"\nsource = {:?}\n[[volume]]\nname = \"v2\"\nshadow = {:?}\n",
            p.join("a.img"),
            p.join("a.img")
        );
        refused(p, &cross, "is the source of volume v1");
        // One volume's own source and shadow may be one path (symmetric nodes, one configuration file).
        let symmetric = format!("[[volume]]\nname = \"v\"\nsource = {0:?}\nshadow = {0:?}\n", p.join("a.img"));
        config(p, &symmetric).unwrap();
    }

    #[test]
    fn a_state_directory_inside_a_replicated_volume_is_refused() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path();
        // A file-backed volume that is a directory tree containing the state directory (a path prefix).
        let text = format!(
            "node = \"n\"\nkey_file = {:?}\nstate_dir = {:?}\n[[volume]]\nname = \"v\"\nsource = {:?}\n",
            p.join("key"),
            p.join("data/state"),
            p.join("data")
        );
        std::fs::write(p.join("c.toml"), text).unwrap();
        let e = link::error_chain(&Config::load(&p.join("c.toml")).unwrap_err());
        assert!(e.contains("state directory"), "{e}");
    }
}
