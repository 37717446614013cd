//! STUB: the standby side (crash-safe apply). Implementation pending.

/// Errors of the target side.
#[derive(Debug, thiserror::Error)]
pub enum TargetError {
    /// Placeholder.
    #[error("target not implemented yet")]
    NotImplemented,
}
