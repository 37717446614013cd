//! `switchover`: demote the peer, then promote this node, so both are never primary at once.
//!
//! The peer is reached through the [`Peer`] trait, which the CLI implements over blockrep's authenticated
//! protocol. If anything fails half-way, the error says which state each node is in.

use crate::plan::{self, Guards, Options, PlanError, Report};
use crate::state::Role;
use crate::Config;

/// Remote control of the peer node, implemented by the CLI over blockrep's protocol.
pub trait Peer {
    /// The peer's current role.
    fn role(&self) -> Result<Role, String>;
    /// Asks the peer to run its demote plan with `reason`; returns when it finished.
    fn demote(&self, reason: &str) -> Result<(), String>;
}

/// Errors of a switchover.
#[derive(Debug, thiserror::Error)]
pub enum SwitchoverError {
    /// The peer could not be asked or did not finish its demote.
    #[error("switchover stopped: the peer did not demote ({reason}); peer role: {peer}, this node: {local} (unchanged); check the peer, then run switchover again")]
    PeerDemote {
        /// Why.
        reason: String,
        /// Last known role of the peer ("unknown" if unreachable).
        peer: String,
        /// This node's role.
        local: Role,
    },
    /// The peer demoted, but promoting this node failed.
    #[error("switchover stopped: the peer is now standby, but promoting this node failed; run `blockrep promote` here to finish, or `blockrep promote` on the peer to go back")]
    LocalPromote(#[source] Box<PlanError>),
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
            return Err(SwitchoverError::PeerDemote { reason, peer: "unknown".into(), local });
        }
    } else {
        if let Err(reason) = peer.demote(&opts.reason) {
            return Err(SwitchoverError::PeerDemote { reason, peer: describe(peer.role()), local });
        }
        match peer.role() {
            Ok(Role::Standby) => {}
            other => {
                let reason = "the peer reported success but is not standby".to_string();
                return Err(SwitchoverError::PeerDemote { reason, peer: describe(other), local });
            }
        }
    }
    plan::promote(cfg, guards, opts).map_err(|e| SwitchoverError::LocalPromote(Box::new(e)))
}
