//! What a blockrep node does, as a library: the `blockrep` binary parses arguments, calls into this crate and
//! renders what it returns.
//!
//! * [`config`]: the configuration file, checked once into a [`config::Config`]; size parsing.
//! * [`paths`]: the path rules checked at load (a shadow never aimed at blockrep's own files or another
//!   volume's, the state directory never on a replicated volume).
//! * [`layout`]: where a node keeps its state (`<state_dir>/{primary,standby}/<volume>`, the role directory).
//! * [`signals`]: SIGTERM/SIGINT, turned into a stop request in one place.
//! * [`freeze`]: freezing a source for the duration of a sync (snapshot lifecycle).
//! * [`primary`]: the primary's network sync, one volume or all of them.
//! * [`serve`]: the standby daemon.
//! * [`roles`]: role guards and plans (promote, demote, switchover), the periodic re-announcement.
//! * [`status`]: the node's status as a typed struct.
//! * [`text`]: plain-text forms of the node's results (the status screen and others), for the binary to print.
//! * [`shadow`]: provisioning the standby's shadow LVs.
//! * [`local`]: sync and verify in one process, without network or configuration file.
//! * [`schedule`]: `[schedule]`, the systemd units rendered from it, retries, the replication switch.
//! * [`lock`]: one sync per node (`sync.lock`), `cancel`.
//! * [`protect`]: one standby for several primaries (`[[primary]]`): takeover priority, `keep_protecting`.
//! * [`maint_lock`]: the maintenance lock (`blockrep lock NODE`): promote and switchover refused while set.
//! * [`alarms`], [`metrics`], [`history`]: alarms with notify hooks, the Prometheus text file, `blockrep log`.
//! * [`verify`]: verifying shadows (`blockrep verify`, `[standby] verify_every`), compare requests on the primary.
//! * [`retain`]: retained generations on the standby (`keep_generations`, `blockrep generations`, `restore`).
//! * [`deconfigure`]: returning a node to standalone (snapshots, state, optionally shadows).
//!
//! Every module has its own error enum; [`Error`] gathers them, and [`Error::kind`] says which of the outcomes a
//! script must tell apart ([`ErrorKind`]) an error is.
//!
//! ```no_run
//! let cfg = node::config::Config::load("/etc/blockrep/blockrep.toml".as_ref())?;
//! let status = node::status::status(&cfg, Default::default())?;
//! println!("node {} is {}", status.node, status.role.role);
//! # Ok::<(), node::Error>(())
//! ```
#![deny(missing_docs)]

pub mod alarms;
pub mod config;
pub mod deconfigure;
pub mod freeze;
pub mod history;
pub mod layout;
pub mod local;
pub mod lock;
pub mod maint_lock;
pub mod metrics;
pub mod paths;
pub mod primary;
pub mod protect;
pub mod retain;
pub mod roles;
pub mod schedule;
pub mod serve;
pub mod shadow;
pub mod signals;
pub mod status;
pub mod text;
pub mod verify;

pub use link::error_chain;

/// What kind of failure an error is: the outcomes a script must be able to tell apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// Bad arguments or configuration: fix the command line or the configuration file.
    Usage,
    /// The peer could not be reached.
    PeerUnreachable,
    /// Refused because it is unsafe (stale data, peer still active, virtual IP in use).
    Unsafe,
    /// The peer refused (wrong key, no common protocol version).
    RefusedByPeer,
    /// The operation failed.
    Failed,
}

/// Any error of this crate.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Configuration.
    #[error(transparent)]
    Config(Box<config::ConfigError>),
    /// State layout (volume names).
    #[error(transparent)]
    Layout(Box<layout::LayoutError>),
    /// Key file.
    #[error(transparent)]
    Key(Box<netproto::KeyError>),
    /// Signal handling.
    #[error(transparent)]
    Signals(Box<signals::SignalError>),
    /// Freezing a source.
    #[error(transparent)]
    Freeze(Box<freeze::FreezeError>),
    /// The primary's sync.
    #[error(transparent)]
    Primary(Box<primary::PrimaryError>),
    /// The standby daemon.
    #[error(transparent)]
    Serve(Box<serve::ServeError>),
    /// Roles.
    #[error(transparent)]
    Roles(Box<roles::RoleError>),
    /// Status.
    #[error(transparent)]
    Status(Box<status::StatusError>),
    /// Shadow provisioning.
    #[error(transparent)]
    Shadow(Box<shadow::ShadowError>),
    /// Local sync and verify.
    #[error(transparent)]
    Local(Box<local::LocalError>),
    /// Returning a node to standalone.
    #[error(transparent)]
    Deconfigure(Box<deconfigure::DeconfigureError>),
    /// The sync lock and cancel.
    #[error(transparent)]
    Lock(Box<lock::LockError>),
    /// The schedule and the replication switch.
    #[error(transparent)]
    Schedule(Box<schedule::ScheduleError>),
    /// Verifying shadows, compare requests.
    #[error(transparent)]
    Verify(Box<verify::VerifyError>),
    /// Retained generations.
    #[error(transparent)]
    Retain(Box<retain::RetainError>),
    /// The maintenance lock.
    #[error(transparent)]
    MaintLock(Box<maint_lock::MaintLockError>),
    /// The rules between protected primaries.
    #[error(transparent)]
    Protect(Box<protect::ProtectError>),
}

impl From<protect::ProtectError> for Error {
    fn from(e: protect::ProtectError) -> Self {
        Error::Protect(Box::new(e))
    }
}

// Boxed, so that a `Result<_, Error>` stays small.
impl From<config::ConfigError> for Error {
    fn from(e: config::ConfigError) -> Self {
        Error::Config(Box::new(e))
    }
}

impl From<layout::LayoutError> for Error {
    fn from(e: layout::LayoutError) -> Self {
        Error::Layout(Box::new(e))
    }
}

impl From<netproto::KeyError> for Error {
    fn from(e: netproto::KeyError) -> Self {
        Error::Key(Box::new(e))
    }
}

impl From<signals::SignalError> for Error {
    fn from(e: signals::SignalError) -> Self {
        Error::Signals(Box::new(e))
    }
}

impl From<freeze::FreezeError> for Error {
    fn from(e: freeze::FreezeError) -> Self {
        Error::Freeze(Box::new(e))
    }
}

impl From<primary::PrimaryError> for Error {
    fn from(e: primary::PrimaryError) -> Self {
        Error::Primary(Box::new(e))
    }
}

impl From<serve::ServeError> for Error {
    fn from(e: serve::ServeError) -> Self {
        Error::Serve(Box::new(e))
    }
}

impl From<roles::RoleError> for Error {
    fn from(e: roles::RoleError) -> Self {
        Error::Roles(Box::new(e))
    }
}

impl From<status::StatusError> for Error {
    fn from(e: status::StatusError) -> Self {
        Error::Status(Box::new(e))
    }
}

impl From<shadow::ShadowError> for Error {
    fn from(e: shadow::ShadowError) -> Self {
        Error::Shadow(Box::new(e))
    }
}

impl From<local::LocalError> for Error {
    fn from(e: local::LocalError) -> Self {
        Error::Local(Box::new(e))
    }
}

impl From<deconfigure::DeconfigureError> for Error {
    fn from(e: deconfigure::DeconfigureError) -> Self {
        Error::Deconfigure(Box::new(e))
    }
}

impl From<lock::LockError> for Error {
    fn from(e: lock::LockError) -> Self {
        Error::Lock(Box::new(e))
    }
}

impl From<schedule::ScheduleError> for Error {
    fn from(e: schedule::ScheduleError) -> Self {
        Error::Schedule(Box::new(e))
    }
}

impl From<verify::VerifyError> for Error {
    fn from(e: verify::VerifyError) -> Self {
        Error::Verify(Box::new(e))
    }
}

impl From<retain::RetainError> for Error {
    fn from(e: retain::RetainError) -> Self {
        Error::Retain(Box::new(e))
    }
}

impl From<maint_lock::MaintLockError> for Error {
    fn from(e: maint_lock::MaintLockError) -> Self {
        Error::MaintLock(Box::new(e))
    }
}

impl Error {
    /// The kind of this error.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::Config(_) | Error::Layout(_) | Error::Key(_) => ErrorKind::Usage,
            Error::Signals(_) | Error::Status(_) => ErrorKind::Failed,
            Error::Freeze(e) => e.kind(),
            Error::Primary(e) => e.kind(),
            Error::Serve(e) => e.kind(),
            Error::Roles(e) => e.kind(),
            Error::Shadow(e) => e.kind(),
            Error::Local(e) => e.kind(),
            Error::Deconfigure(e) => e.kind(),
            Error::Lock(e) => e.kind(),
            Error::Schedule(e) => e.kind(),
            Error::Verify(e) => e.kind(),
            Error::Retain(e) => e.kind(),
            Error::MaintLock(e) => e.kind(),
            Error::Protect(e) => e.kind(),
        }
    }
}

/// The kind of a link error: the standby's refusal for a wrong key or protocol version is the peer's refusal.
pub fn link_error_kind(e: &link::LinkError) -> ErrorKind {
    use link::{LinkError, RemoteKind};
    match e {
        LinkError::Remote { kind: RemoteKind::Auth | RemoteKind::Version, .. } => ErrorKind::RefusedByPeer,
        LinkError::Transport(t) => match t.downcast_ref::<netproto::ConnError>() {
            Some(c) => conn_error_kind(c),
            None => ErrorKind::Failed,
        },
        _ => ErrorKind::Failed,
    }
}

/// The kind of a connection error: unreachable and refused-by-peer are told apart for scripts.
pub fn conn_error_kind(e: &netproto::ConnError) -> ErrorKind {
    match e {
        netproto::ConnError::Unreachable { .. } => ErrorKind::PeerUnreachable,
        netproto::ConnError::Handshake(_) => ErrorKind::RefusedByPeer,
        netproto::ConnError::Remote { code, .. } => match netproto::client::remote_kind(*code) {
            link::RemoteKind::Auth | link::RemoteKind::Version => ErrorKind::RefusedByPeer,
            _ => ErrorKind::Failed,
        },
        _ => ErrorKind::Failed,
    }
}

/// Writes a new random key file (mode 0600) at `path`; an existing file is replaced only with `force`.
pub fn generate_key(path: &std::path::Path, force: bool) -> Result<(), Error> {
    netproto::generate_key(path, force)?;
    Ok(())
}

/// Starts a key rotation (`keygen --rotate`): writes a new random key to `path.next` (mode 0600) beside the current
/// key file `path`, which must exist; an existing next key is replaced only with `force`. Returns the fingerprints
/// of the current and the next key.
pub fn generate_next_key(path: &std::path::Path, force: bool) -> Result<(String, String), Error> {
    let (current, next) = netproto::generate_next_key(path, force)?;
    Ok((netproto::key_id(&current), netproto::key_id(&next)))
}

pub use netproto::next_key_path;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_follow_the_cause() {
        let refused = link::LinkError::Remote { kind: link::RemoteKind::Auth, message: "no".into() };
        assert_eq!(link_error_kind(&refused), ErrorKind::RefusedByPeer);
        let busy = link::LinkError::Remote { kind: link::RemoteKind::Busy, message: "busy".into() };
        assert_eq!(link_error_kind(&busy), ErrorKind::Failed);
        let e: Error = config::ConfigError::Invalid { path: "c.toml".into(), message: "x".into() }.into();
        assert_eq!(e.kind(), ErrorKind::Usage);
    }
}
