//! `switchover`: demote the peer, then promote this node, so both are never primary at once.
//!
//! The peer is reached through the [`Peer`] trait, which the CLI implements over blockrep's authenticated
//! protocol. A primary asked to demote first quiesces ([`stop_primary_services`]), syncs every volume to this
//! node and waits until this node confirms that it committed them; if that fails it restarts its services
//! ([`start_primary_services`]) and stays primary. If anything fails half-way, the error says which state each
//! node is in.

use crate::config::Service;
use crate::exec::{self, Action, ExecError};
use crate::plan::{self, Guards, Options, PlanError, Report};
use crate::state::{Role, StateError};
use crate::Config;

/// Remote control of the peer node, implemented by the CLI over blockrep's protocol.
pub trait Peer {
    /// The peer's current role.
    fn role(&self) -> Result<Role, String>;
    /// Asks the peer to run its demote plan with `reason` (after its final sync to this node); returns when it
    /// finished.
    fn demote(&self, reason: &str) -> Result<(), PeerError>;
}

/// Why the peer did not demote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerError {
    /// What went wrong.
    pub reason: String,
    /// Refused for safety (the final sync was refused as unsafe, for example a split brain).
    pub refused_as_unsafe: bool,
}

impl From<String> for PeerError {
    fn from(reason: String) -> Self {
        PeerError { reason, refused_as_unsafe: false }
    }
}

impl From<&str> for PeerError {
    fn from(reason: &str) -> Self {
        reason.to_string().into()
    }
}

/// Marker file in the role state directory while the primary-only services are stopped for a switchover's final
/// sync: [`stop_primary_services`] writes it (durably) before stopping them, [`start_primary_services`] and
/// [`quiesce_done`] remove it. A process that dies in between (killed, or stopped during the final sync) leaves
/// it, and [`resume_interrupted_quiesce`] finds it.
pub const QUIESCED_FILE: &str = "switchover-quiesced";

/// Errors of quiescing for a switchover, and of resuming after an interrupted one.
#[derive(Debug, thiserror::Error)]
pub enum QuiesceError {
    /// The marker could not be written, read or removed.
    #[error("cannot {action} {}", path.display())]
    Marker {
        /// What was attempted.
        action: &'static str,
        /// The marker.
        path: std::path::PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A service did not stop or start.
    #[error(transparent)]
    Services(#[from] ExecError),
    /// The role state cannot be read.
    #[error(transparent)]
    State(#[from] StateError),
}

fn marker(cfg: &Config) -> std::path::PathBuf {
    cfg.state_dir.join(QUIESCED_FILE)
}

/// Stops the primary-only services in reverse order (the demote plan's order), so that the volumes are quiescent
/// for a switchover's final sync; returns their labels. The marker ([`QUIESCED_FILE`]) is written first. Hook
/// services must be idempotent: the demote plan that follows stops them again.
pub fn stop_primary_services(cfg: &Config, reason: &str) -> Result<Vec<String>, QuiesceError> {
    let path = marker(cfg);
    std::fs::create_dir_all(&cfg.state_dir)
        .and_then(|()| {
            let tmp = cfg.state_dir.join(format!(".{QUIESCED_FILE}.tmp"));
            crate::state::atomic_write(&tmp, &path, format!("{reason}\n").as_bytes())
        })
        .map_err(|source| QuiesceError::Marker { action: "write", path, source })?;
    Ok(run_services(cfg.services.primary_only.iter().rev(), Action::Stop)?)
}

/// Starts the primary-only services in order (after a switchover's final sync failed: this node stays primary),
/// then removes the marker.
pub fn start_primary_services(cfg: &Config) -> Result<Vec<String>, QuiesceError> {
    let started = run_services(cfg.services.primary_only.iter(), Action::Start)?;
    quiesce_done(cfg)?;
    Ok(started)
}

/// Removes the marker after the demote that followed the final sync.
pub fn quiesce_done(cfg: &Config) -> Result<(), QuiesceError> {
    let path = marker(cfg);
    match std::fs::remove_file(&path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(QuiesceError::Marker { action: "remove", path, source }),
    }
}

/// After a restart: when a switchover's final sync stopped the primary-only services and the process died before
/// the demote, and this node still is primary with no plan in progress, starts them again and returns them with
/// the reason the marker recorded (`None`: nothing was interrupted). A node no longer primary only loses the
/// marker (its services are its demote's business).
pub fn resume_interrupted_quiesce(cfg: &Config) -> Result<Option<(String, Vec<String>)>, QuiesceError> {
    let path = marker(cfg);
    let reason = match std::fs::read_to_string(&path) {
        Ok(r) => r.trim().to_owned(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(QuiesceError::Marker { action: "read", path, source }),
    };
    let st = crate::state::status(&cfg.state_dir)?;
    if st.role != Role::Primary || st.plan.is_some() {
        quiesce_done(cfg)?;
        return Ok(None);
    }
    Ok(Some((reason, start_primary_services(cfg)?)))
}

fn run_services<'a>(services: impl Iterator<Item = &'a Service>, action: Action) -> Result<Vec<String>, ExecError> {
    let mut done = Vec::new();
    for s in services {
        exec::service(s, action, &[])?;
        tracing::info!(service = %s.label(), ?action, "switchover: primary-only service");
        done.push(s.label());
    }
    Ok(done)
}

/// Errors of a switchover.
#[derive(Debug, thiserror::Error)]
pub enum SwitchoverError {
    /// The peer could not be asked or did not finish its demote.
    #[error("switchover stopped: the peer did not demote ({reason}); peer role: {peer}, this node: {local} (unchanged); check the peer, then run switchover again")]
    PeerDemote {
        /// Why.
        reason: String,
        /// The peer refused for safety.
        refused_as_unsafe: bool,
        /// Last known role of the peer ("unknown" if unreachable).
        peer: String,
        /// This node's role.
        local: Role,
    },
    /// The peer demoted, but promoting this node failed.
    #[error("switchover stopped: the peer is now standby, but promoting this node failed; run `blockrep promote` here to finish, or `blockrep promote` on the peer to go back")]
    LocalPromote(#[source] Box<PlanError>),
}

impl SwitchoverError {
    /// Whether this is a refusal for safety (the CLI maps it to the "refused as unsafe" exit code).
    pub fn refused_as_unsafe(&self) -> bool {
        match self {
            SwitchoverError::PeerDemote { refused_as_unsafe, .. } => *refused_as_unsafe,
            SwitchoverError::LocalPromote(e) => e.refused_as_unsafe(),
        }
    }
}

/// Demotes the peer, then promotes this node with `guards` (which now see the peer as standby).
pub fn switchover(
    cfg: &Config,
    guards: &dyn Guards,
    peer: &dyn Peer,
    opts: &Options<'_>,
) -> Result<Report, SwitchoverError> {
    let local = crate::state::load(&cfg.state_dir).map(|s| s.role).unwrap_or(Role::Standby);
    let describe = |r: Result<Role, String>| r.map_or_else(|e| format!("unknown ({e})"), |r| r.to_string());
    if opts.dry_run {
        // A dry run fails where the real one would: the peer must answer.
        if let Err(e) = peer.role() {
            let reason = format!("it cannot be asked ({e})");
            return Err(SwitchoverError::PeerDemote {
                reason,
                refused_as_unsafe: false,
                peer: "unknown".into(),
                local,
            });
        }
    } else {
        if let Err(PeerError { reason, refused_as_unsafe }) = peer.demote(&opts.reason) {
            return Err(SwitchoverError::PeerDemote { reason, refused_as_unsafe, peer: describe(peer.role()), local });
        }
        match peer.role() {
            Ok(Role::Standby) => {}
            other => {
                let reason = "the peer reported success but is not standby".to_string();
                let peer = describe(other);
                return Err(SwitchoverError::PeerDemote { reason, refused_as_unsafe: false, peer, local });
            }
        }
    }
    plan::promote(cfg, guards, opts).map_err(|e| SwitchoverError::LocalPromote(Box::new(e)))
}
