//! Exit codes, so that scripts can tell outcomes apart: one enum, mapped from [`node::ErrorKind`].

use node::ErrorKind;

/// The documented exit codes (`blockrep --help`, README, docs/ARCHITECTURE.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitCode {
    /// 0: success.
    Ok = 0,
    /// 1: the operation failed.
    Failed = 1,
    /// 2: usage or configuration error.
    Usage = 2,
    /// 3: the peer could not be reached.
    PeerUnreachable = 3,
    /// 4: refused because it is unsafe (stale data, peer still active, virtual IP in use).
    Unsafe = 4,
    /// 5: refused by the peer (wrong key, protocol version, different `encryption`).
    RefusedByPeer = 5,
}

impl From<ErrorKind> for ExitCode {
    fn from(kind: ErrorKind) -> Self {
        match kind {
            ErrorKind::Usage => ExitCode::Usage,
            ErrorKind::PeerUnreachable => ExitCode::PeerUnreachable,
            ErrorKind::Unsafe => ExitCode::Unsafe,
            ErrorKind::RefusedByPeer => ExitCode::RefusedByPeer,
            ErrorKind::Failed => ExitCode::Failed,
        }
    }
}

impl ExitCode {
    /// The code for an error: the kind of the first node error in its chain; anything else failed.
    pub fn for_error(err: &anyhow::Error) -> ExitCode {
        err.chain().find_map(|c| c.downcast_ref::<node::Error>()).map_or(ExitCode::Failed, |e| e.kind().into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_errors_keep_their_code_through_context() {
        use anyhow::Context;
        let usage = node::config::ConfigError::Invalid { path: "c.toml".into(), message: "bad".into() };
        let e = Err::<(), _>(node::Error::from(usage)).context("outer").unwrap_err();
        assert_eq!(ExitCode::for_error(&e), ExitCode::Usage);
        assert_eq!(ExitCode::for_error(&anyhow::anyhow!("plain")), ExitCode::Failed);
    }
}
