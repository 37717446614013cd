//! Exit codes, so that scripts can tell outcomes apart.

/// Success.
#[allow(dead_code)]
pub const OK: i32 = 0;
/// The operation failed.
pub const FAILED: i32 = 1;
/// Usage or configuration error.
pub const USAGE: i32 = 2;
/// The peer could not be reached.
pub const PEER_UNREACHABLE: i32 = 3;
/// Refused because it is unsafe (stale data, peer still active, split brain).
pub const UNSAFE: i32 = 4;
/// Refused by the peer (authentication, protocol version).
pub const REFUSED_BY_PEER: i32 = 5;

/// A failure that carries its exit code; anything else exits with [`FAILED`].
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct Coded {
    /// The exit code.
    pub code: i32,
    /// The message.
    pub message: String,
}

/// An error that exits with `code`.
pub fn coded(code: i32, message: impl Into<String>) -> anyhow::Error {
    Coded { code, message: message.into() }.into()
}

/// The exit code for an error chain.
pub fn code_for(err: &anyhow::Error) -> i32 {
    for cause in err.chain() {
        if let Some(c) = cause.downcast_ref::<Coded>() {
            return c.code;
        }
    }
    FAILED
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn coded_errors_keep_their_code_through_context() {
        use anyhow::Context;
        let e: anyhow::Error = Err::<(), _>(coded(USAGE, "bad")).context("outer").unwrap_err();
        assert_eq!(code_for(&e), USAGE);
        assert_eq!(code_for(&anyhow::anyhow!("plain")), FAILED);
    }
}
