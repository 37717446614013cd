//! blockrep's data path.
//!
//! The engine turns a frozen source image into a stream of changed extents and applies that stream to a shadow
//! volume so that the shadow always equals one complete generation:
//!
//! * [`volume`] and [`io`]: block devices and regular files, read and written through an io_uring engine or a
//!   plain `pread`/`pwrite` twin behind the same traits.
//! * [`hash`]: BLAKE3 per block, zero-block detection, root hash.
//! * [`manifest`]: the versioned on-disk list of block hashes of the last synced generation.
//! * [`differ`]: one sequential, multi-threaded scan that hashes, compares with the manifest and emits extents.
//! * [`spool`], [`target`]: the standby side: redo log, commit record, in-place apply, generation record, recovery.
//! * [`sync`]: the link between a source and a target ([`sync::TargetLink`]), the local link, and the
//!   orchestration of one sync. The network path implements the same link in another crate; the engine has no
//!   network code.
#![deny(missing_docs)]

pub mod differ;
pub mod durable;
pub mod hash;
pub mod io;
mod layout;
pub mod manifest;
pub mod source;
pub mod spool;
pub mod sync;
pub mod target;
pub mod volume;
