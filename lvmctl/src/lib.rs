//! Typed wrapper over the lvm2 command-line tools.
#![deny(missing_docs)]
