//! The configuration file (`/etc/blockrep/blockrep.toml`, `--config PATH`), documented in docs/config.md.
//!
//! Raw TOML is deserialized with unknown keys refused (the TOML error names the key and its line), then checked
//! once into a [`Config`] the commands use.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::Result;
use serde::Deserialize;

use crate::args::parse_size;
use crate::exit::{coded, USAGE};

/// Default configuration path.
pub const DEFAULT_PATH: &str = "/etc/blockrep/blockrep.toml";

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    node: String,
    key_file: PathBuf,
    #[serde(default = "default_state_dir")]
    state_dir: PathBuf,
    #[serde(default)]
    standby: Option<RawStandby>,
    #[serde(default)]
    primary: Option<RawPrimary>,
    #[serde(default, rename = "volume")]
    volumes: Vec<RawVolume>,
    #[serde(default)]
    role: Option<toml::Table>,
}

fn default_state_dir() -> PathBuf {
    PathBuf::from("/var/lib/blockrep")
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStandby {
    listen: String,
    #[serde(default)]
    peer: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPrimary {
    peer: String,
    #[serde(default)]
    bwlimit: Option<String>,
    #[serde(default)]
    compression_level: Option<i32>,
    #[serde(default)]
    connect_timeout_s: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawVolume {
    name: String,
    #[serde(default)]
    source: Option<PathBuf>,
    #[serde(default)]
    shadow: Option<PathBuf>,
    #[serde(default = "default_snapshot")]
    snapshot: String,
    #[serde(default)]
    snapshot_size: Option<String>,
    #[serde(default)]
    snapshot_name: Option<String>,
    #[serde(default)]
    block_size: Option<String>,
}

fn default_snapshot() -> String {
    "none".into()
}

/// How a volume is frozen during a sync.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SnapshotDriver {
    /// The caller guarantees the source is quiescent.
    None,
    /// A classic LVM snapshot of the source LV.
    Lvm {
        /// Size: bytes or percent of the origin.
        size: SnapshotSize,
        /// Name of the snapshot LV (default `<lv>_blockrep_snap`).
        name: Option<String>,
    },
}

/// Snapshot size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SnapshotSize {
    /// Bytes.
    Bytes(u64),
    /// Percent of the origin LV.
    Percent(u8),
}

/// One replicated volume.
#[derive(Debug, Clone)]
pub struct Volume {
    /// Name (both sides use it).
    pub name: String,
    /// Source on the primary.
    pub source: Option<PathBuf>,
    /// Shadow on the standby.
    pub shadow: Option<PathBuf>,
    /// Snapshot driver.
    pub snapshot: SnapshotDriver,
    /// Block size.
    pub block_size: u32,
}

/// The checked configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where it was read from.
    pub path: PathBuf,
    /// This node's name.
    pub node: String,
    /// Shared key file.
    pub key_file: PathBuf,
    /// State directory (not on a replicated volume).
    pub state_dir: PathBuf,
    /// Standby listen address.
    pub listen: Option<SocketAddr>,
    /// The standby as seen from the primary (`host:port`).
    pub peer: Option<String>,
    /// The other node's `blockrep serve` as seen from the standby (`host:port`), for role checks.
    pub standby_peer: Option<String>,
    /// Send-rate cap in bytes per second.
    pub bwlimit: Option<u64>,
    /// zstd level.
    pub compression_level: i32,
    /// Connect timeout in seconds.
    pub connect_timeout_s: u64,
    /// Volumes.
    pub volumes: Vec<Volume>,
    /// The `[role]` section, for the role manager.
    pub role: Option<toml::Table>,
}

impl Config {
    /// Reads and checks the file at `path`.
    pub fn load(path: &Path) -> Result<Config> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            coded(
                USAGE,
                format!("cannot read configuration {}: {e} (create it, or pass --config PATH)", path.display()),
            )
        })?;
        Self::parse(&text, path)
    }

    /// Parses and checks configuration text.
    pub fn parse(text: &str, path: &Path) -> Result<Config> {
        let raw: Raw = toml::from_str(text)
            .map_err(|e| coded(USAGE, format!("configuration {} is invalid: {e}", path.display())))?;
        let bad = |msg: String| coded(USAGE, format!("configuration {}: {msg}", path.display()));
        let listen = match &raw.standby {
            Some(s) => Some(
                s.listen
                    .parse::<SocketAddr>()
                    .map_err(|_| bad(format!("standby.listen {:?} is not an address like 0.0.0.0:7788", s.listen)))?,
            ),
            None => None,
        };
        let bwlimit = match raw.primary.as_ref().and_then(|p| p.bwlimit.as_deref()) {
            Some(s) => Some(parse_size(s).map_err(|e| bad(format!("primary.bwlimit: {e}")))?),
            None => None,
        };
        let mut volumes = Vec::new();
        for v in raw.volumes {
            crate::local::volume_name(Some(&v.name), Path::new(""))
                .map_err(|_| bad(format!("volume name {:?}: use letters, digits and . _ + -", v.name)))?;
            if volumes.iter().any(|o: &Volume| o.name == v.name) {
                return Err(bad(format!("volume {:?} is configured twice", v.name)));
            }
            let bs = match &v.block_size {
                Some(s) => parse_size(s).map_err(|e| bad(format!("volume {}: block_size: {e}", v.name)))?,
                None => engine::hash::DEFAULT_BLOCK_SIZE as u64,
            };
            let block_size = engine::hash::validate_block_size(bs)
                .map_err(|e| bad(format!("volume {}: block_size: {e}", v.name)))?;
            let snapshot = match v.snapshot.as_str() {
                "none" => SnapshotDriver::None,
                "lvm" => SnapshotDriver::Lvm {
                    size: parse_snapshot_size(v.snapshot_size.as_deref().unwrap_or("20%"))
                        .map_err(|e| bad(format!("volume {}: snapshot_size: {e}", v.name)))?,
                    name: v.snapshot_name.clone(),
                },
                other => {
                    return Err(bad(format!(
                        "volume {}: snapshot {other:?} is unknown: use \"none\" or \"lvm\"",
                        v.name
                    )))
                }
            };
            if v.source.is_none() && v.shadow.is_none() {
                return Err(bad(format!(
                    "volume {}: give `source` (primary side) and/or `shadow` (standby side)",
                    v.name
                )));
            }
            volumes.push(Volume { name: v.name, source: v.source, shadow: v.shadow, snapshot, block_size });
        }
        let primary = raw.primary.as_ref();
        Ok(Config {
            path: path.to_owned(),
            node: raw.node,
            key_file: raw.key_file,
            state_dir: raw.state_dir,
            listen,
            peer: primary.map(|p| p.peer.clone()),
            standby_peer: raw.standby.as_ref().and_then(|s| s.peer.clone()),
            bwlimit,
            compression_level: primary.and_then(|p| p.compression_level).unwrap_or(3),
            connect_timeout_s: primary.and_then(|p| p.connect_timeout_s).unwrap_or(10),
            volumes,
            role: raw.role,
        })
    }

    /// The named volumes, or all of them; an unknown name is an error naming it.
    pub fn select(&self, names: &[String]) -> Result<Vec<&Volume>> {
        if names.is_empty() {
            return Ok(self.volumes.iter().collect());
        }
        names
            .iter()
            .map(|n| {
                self.volumes
                    .iter()
                    .find(|v| &v.name == n)
                    .ok_or_else(|| coded(USAGE, format!("volume {n:?} is not in {}", self.path.display())))
            })
            .collect()
    }

    /// The state directory of one side of one volume.
    pub fn side_dir(&self, side: &str, volume: &str) -> PathBuf {
        crate::local::side_dir(&self.state_dir, side, volume)
    }
}

/// `20%` or a size like `2G`.
pub fn parse_snapshot_size(s: &str) -> Result<SnapshotSize, String> {
    if let Some(p) = s.trim().strip_suffix('%') {
        let n: u8 = p.trim().parse().map_err(|_| format!("{s:?} is not a percentage"))?;
        if n == 0 || n > 100 {
            return Err(format!("{s:?}: the percentage must be 1..100"));
        }
        Ok(SnapshotSize::Percent(n))
    } else {
        parse_size(s).map(SnapshotSize::Bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = include_str!("../../docs/blockrep.example.toml");

    #[test]
    fn the_documented_example_parses() {
        let c = Config::parse(EXAMPLE, Path::new("example.toml")).unwrap();
        assert_eq!(c.node, "pbx-a");
        assert_eq!(c.volumes.len(), 2);
        assert_eq!(c.volumes[0].snapshot, SnapshotDriver::Lvm { size: SnapshotSize::Percent(20), name: None });
        assert_eq!(c.listen, Some("0.0.0.0:7788".parse().unwrap()));
    }

    #[test]
    fn unknown_and_missing_keys_name_the_key_and_line() {
        let text = "node = \"a\"\nkey_file = \"/k\"\ncolour = \"red\"\n";
        let e = format!("{:#}", Config::parse(text, Path::new("c.toml")).unwrap_err());
        assert!(e.contains("colour") && e.contains("line 3"), "{e}");
        let e = format!("{:#}", Config::parse("node = \"a\"\n", Path::new("c.toml")).unwrap_err());
        assert!(e.contains("key_file"), "{e}");
        let text = "node = \"a\"\nkey_file = \"/k\"\n[[volume]]\nname = \"v\"\nsource = \"/x\"\nsnapshot = \"zfs\"\n";
        let e = format!("{:#}", Config::parse(text, Path::new("c.toml")).unwrap_err());
        assert!(e.contains("zfs"), "{e}");
    }
}
