//! The node's status (`blockrep status`): role, last switchover, the generation of every volume on this node,
//! and alarms.

use engine::target::{Target, TargetOptions};
use serde::Serialize;

use crate::config::Config;
use crate::layout::{mtime_secs, Side};
use crate::Error;

/// Errors of reading the status.
#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    /// The role state could not be read.
    #[error("cannot read the role state")]
    Role(#[source] role::state::StateError),
    /// A shadow could not be opened.
    #[error("volume {volume}: cannot open the shadow")]
    Shadow {
        /// Volume name.
        volume: String,
        /// The engine's error.
        #[source]
        source: engine::target::TargetError,
    },
}

/// Which side of a volume this node holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum VolumeSide {
    /// The shadow is here.
    Standby,
    /// The source is here.
    Primary,
}

impl VolumeSide {
    /// `standby` or `primary`.
    pub fn as_str(self) -> &'static str {
        match self {
            VolumeSide::Standby => "standby",
            VolumeSide::Primary => "primary",
        }
    }
}

/// One volume in the status.
#[derive(Debug, Clone, Serialize)]
pub struct VolumeStatus {
    /// Volume name.
    pub name: String,
    /// `standby` (shadow here) or `primary` (source here).
    pub side: VolumeSide,
    /// Last committed generation (primary: of the source's manifest).
    pub generation: u64,
    /// Whether the shadow holds a complete generation (standby side only).
    pub complete: Option<bool>,
    /// Unix seconds of the last completed sync.
    pub last_sync: Option<u64>,
    /// Bytes kept from an interrupted transfer.
    pub pending_bytes: Option<u64>,
}

/// Something an operator should look at. None are raised yet; monitoring reads the list from `status --json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Alarm {
    /// The volume concerned, if it is about one.
    pub volume: Option<String>,
    /// What is wrong and what to do.
    pub message: String,
}

/// The node's status.
#[derive(Debug, Clone, Serialize)]
pub struct NodeStatus {
    /// This node's name.
    pub node: String,
    /// Role, last switchover, plan in progress, first full sync.
    #[serde(flatten)]
    pub role: role::Status,
    /// Every configured volume present on this node.
    pub volumes: Vec<VolumeStatus>,
    /// Alarms (empty for now).
    pub alarms: Vec<Alarm>,
}

/// Reads this node's status.
pub fn status(cfg: &Config, io: engine::volume::IoOptions) -> Result<NodeStatus, Error> {
    if cfg.role.is_some() {
        crate::roles::role_config(cfg)?; // an invalid [role] section is a configuration error here too
    }
    let layout = cfg.layout();
    let st = role::status(layout.role_dir()).map_err(StatusError::Role)?;
    let mut volumes = Vec::new();
    for v in &cfg.volumes {
        if let Some(shadow) = &v.shadow {
            let dir = layout.side_dir(Side::Standby, &v.name);
            if shadow.exists() && dir.exists() {
                let t = Target::open(shadow, &dir, TargetOptions::new(&v.name, io))
                    .map_err(|source| StatusError::Shadow { volume: v.name.clone(), source })?;
                let info = t.info();
                volumes.push(VolumeStatus {
                    name: v.name.clone(),
                    side: VolumeSide::Standby,
                    generation: info.generation,
                    complete: Some(info.complete),
                    last_sync: mtime_secs(&layout.target_manifest(&v.name)),
                    pending_bytes: info.pending.map(|p| p.bytes),
                });
                continue;
            }
        }
        if v.source.is_some() {
            let m = layout.source_manifest(&v.name);
            let generation = engine::manifest::Manifest::open(&m).map(|m| m.generation()).unwrap_or(0);
            volumes.push(VolumeStatus {
                name: v.name.clone(),
                side: VolumeSide::Primary,
                generation,
                complete: None,
                last_sync: mtime_secs(&m),
                pending_bytes: None,
            });
        }
    }
    Ok(NodeStatus { node: cfg.node.clone(), role: st, volumes, alarms: Vec::new() })
}
