//! Typed wrapper over the lvm2 command-line tools, as blockrep uses them.
//!
//! blockrep freezes each LVM volume on the primary with a classic copy-on-write snapshot for the duration of a
//! sync, and writes each replicated volume on the standby to a shadow LV of the same size. This crate is the
//! only place that runs lvm2: it lists VGs and LVs, creates and removes snapshots and shadow LVs, reports how
//! full a snapshot is and whether the kernel invalidated it, renames and tags LVs.
//!
//! - The tool runs by absolute path ([`Lvm::new`] finds `/usr/sbin/lvm` or `/sbin/lvm`), with a timeout on
//!   every call, and every error carries the command line and lvm's stderr.
//! - Names and tags are checked against lvm2's rules ([`name`]) before anything runs.
//! - Reports are read as JSON (`--reportformat json --units b --nosuffix`) by pure functions ([`report`]),
//!   tested on output captured from the real lvm2 (`tests/fixtures/`); every operation is also tested against
//!   the real lvm2 inside a User-Mode Linux guest (`tests/uml.rs`).
//! - Space is checked before creating: a snapshot or LV that does not fit in the VG is refused with the numbers,
//!   and nothing is created.
//! - lvmctl only removes what it is told to, and tells its own LVs from others by tag: snapshots carry
//!   [`SNAPSHOT_TAG`] ([`Lvm::remove_leftover_snapshot`] removes nothing else), shadows [`SHADOW_TAG`]
//!   ([`Lvm::ensure_shadow`] never touches an untagged LV).
//!
//! ```no_run
//! use lvmctl::{Lvm, SnapshotSize};
//! # fn main() -> Result<(), lvmctl::LvmError> {
//! let lvm = Lvm::new()?;
//! let snap = lvm.create_snapshot("vg0", "data", "data_blockrep_snap", SnapshotSize::Percent(20))?;
//! // ... read snap.path while the origin keeps changing ...
//! let status = lvm.snapshot_status("vg0", &snap.name)?;
//! assert!(!status.invalid, "the snapshot overflowed: give it a larger snapshot_size");
//! lvm.remove_lv("vg0", &snap.name)?;
//! # Ok(()) }
//! ```
#![deny(missing_docs)]

pub mod exception_store;
mod lvm;
pub mod name;
pub mod report;
pub mod thin;

pub use lvm::{
    Lvm, LvmError, Shadow, SnapshotSize, DEFAULT_SNAPSHOT_PERCENT, DEFAULT_TIMEOUT, DEFAULT_TOOL_PATHS, NO_UDEV_CONFIG,
    SHADOW_TAG, SNAPSHOT_TAG,
};
pub use name::NameError;
pub use report::{Lv, ReportError, SnapshotStatus, Vg};
