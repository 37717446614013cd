//! Binding of the role manager (crate `role`) to the CLI: whether this node accepts syncs.

use std::path::Path;

/// Whether the node whose state directory is `state_dir` is (becoming) primary, so `serve` must refuse syncs.
pub fn is_primary(state_dir: &Path) -> bool {
    let _ = state_dir;
    false
}
