//! Where a node keeps its state. One module knows the layout:
//!
//! ```text
//! <state_dir>/primary/<volume>/manifest      the source's manifest of the last committed generation
//! <state_dir>/primary/<volume>/generations   the primary's generation records (engine::generations)
//! <state_dir>/standby/<volume>/              the target's state (with its generation records and trust),
//!                                            spool and manifest (engine::target)
//! <state_dir>/standby/<volume>/source_size   the source size the primary last reported (for `shadow create`)
//! <state_dir>/role/                          the role state, unless `[role] state_dir` names another place
//! ```
//!
//! Volume names become directory names, so [`volume_name`] restricts them to `[A-Za-z0-9._+-]`.

use std::path::{Path, PathBuf};

/// File in a volume's standby directory holding the source size the primary last reported.
const SOURCE_SIZE_FILE: &str = "source_size";

/// A volume name that cannot be a directory name.
#[derive(Debug, thiserror::Error)]
#[error("volume name {name:?} is not usable: use letters, digits and . _ + - (--name)")]
pub struct LayoutError {
    /// The name given.
    pub name: String,
}

/// Which side of a volume a directory belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The source's side (manifest).
    Primary,
    /// The shadow's side (target state, spool).
    Standby,
}

impl Side {
    fn dir_name(self) -> &'static str {
        match self {
            Side::Primary => "primary",
            Side::Standby => "standby",
        }
    }
}

/// A node's state directories.
#[derive(Debug, Clone)]
pub struct Layout {
    state_dir: PathBuf,
    role_dir: PathBuf,
}

impl Layout {
    /// The layout under `state_dir`; `role` is the configuration's `[role]` section, which may name the role
    /// state directory.
    pub fn new(state_dir: &Path, role: Option<&toml::Table>) -> Layout {
        let role_dir = role
            .and_then(|t| t.get("state_dir"))
            .and_then(|v| v.as_str())
            .map(PathBuf::from)
            .unwrap_or_else(|| state_dir.join("role"));
        Layout { state_dir: state_dir.to_owned(), role_dir }
    }

    /// The state directory of one side of one volume.
    pub fn side_dir(&self, side: Side, volume: &str) -> PathBuf {
        self.state_dir.join(side.dir_name()).join(volume)
    }

    /// The source's manifest of a volume (primary side).
    pub fn source_manifest(&self, volume: &str) -> PathBuf {
        self.side_dir(Side::Primary, volume).join("manifest")
    }

    /// The target's manifest of a volume (standby side); its modification time is the last completed sync.
    pub fn target_manifest(&self, volume: &str) -> PathBuf {
        self.side_dir(Side::Standby, volume).join("manifest")
    }

    /// The role state directory in use (configured or `<state_dir>/role`).
    pub fn role_dir(&self) -> &Path {
        &self.role_dir
    }

    /// Records the source size the primary reported for a volume (best effort: only `shadow create` uses it).
    pub fn record_source_size(&self, volume: &str, size: u64) {
        let dir = self.side_dir(Side::Standby, volume);
        let _ = std::fs::create_dir_all(&dir);
        let _ = std::fs::write(dir.join(SOURCE_SIZE_FILE), size.to_string());
    }

    /// The source size the primary last reported for a volume, if any.
    pub fn recorded_source_size(&self, volume: &str) -> Option<u64> {
        let text = std::fs::read_to_string(self.side_dir(Side::Standby, volume).join(SOURCE_SIZE_FILE)).ok()?;
        text.trim().parse().ok()
    }
}

/// A volume name from an explicit name or a path's file name; names become directory names, so they are
/// restricted to `[A-Za-z0-9._+-]`.
pub fn volume_name(explicit: Option<&str>, path: &Path) -> Result<String, LayoutError> {
    let name = match explicit {
        Some(n) => n.to_owned(),
        None => path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(),
    };
    let ok = !name.is_empty()
        && name != "."
        && name != ".."
        && name.chars().all(|c| c.is_ascii_alphanumeric() || "._+-".contains(c));
    if !ok {
        return Err(LayoutError { name });
    }
    Ok(name)
}

/// Unix seconds of a file's last modification.
pub(crate) fn mtime_secs(p: &Path) -> Option<u64> {
    let m = std::fs::metadata(p).and_then(|m| m.modified()).ok()?;
    m.duration_since(std::time::UNIX_EPOCH).ok().map(|d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_directories() {
        assert_eq!(volume_name(None, Path::new("/dev/vg0/data")).unwrap(), "data");
        assert!(volume_name(Some("../x"), Path::new("")).is_err());
        assert!(volume_name(Some(".."), Path::new("")).is_err());
        let l = Layout::new(Path::new("/var/lib/blockrep"), None);
        assert_eq!(l.side_dir(Side::Standby, "v"), Path::new("/var/lib/blockrep/standby/v"));
        assert_eq!(l.role_dir(), Path::new("/var/lib/blockrep/role"));
        let mut role = toml::Table::new();
        role.insert("state_dir".into(), "/srv/role".into());
        assert_eq!(Layout::new(Path::new("/s"), Some(&role)).role_dir(), Path::new("/srv/role"));
    }
}
