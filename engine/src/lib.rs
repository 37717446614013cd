//! blockrep's data path: everything that touches a volume's bytes, on both sides of a sync.
//!
//! The engine turns a frozen source image into a stream of changed extents and applies that stream to a shadow
//! volume so that the shadow always equals one complete generation. It talks to the other side only through the
//! session vocabulary of the `link` crate ([`sync::TargetLink`] and its types), so the same code runs in one
//! process and over the network; it has no network code and no node policy (configuration, roles, snapshots).
//!
//! * [`volume`] and [`io`]: block devices and regular files, read and written through an io_uring engine or a
//!   plain `pread`/`pwrite` twin behind the same traits.
//! * [`hash`]: BLAKE3 per block, zero-block detection, root hash.
//! * [`manifest`]: the versioned on-disk list of block hashes of the last synced generation.
//! * [`differ`]: one sequential, multi-threaded scan that hashes every block (from a memory map for page-cached
//!   files, through the read engine otherwise).
//! * [`source`]: the source side of one sync. A [`source::ChangeSource`] says which blocks may have changed and
//!   what they hold ([`source::FullScan`], the differ's scan, is the one implementation today; a tracked source
//!   reports only changed ranges and the other blocks' hashes come from the previous manifest);
//!   [`source::sync_changes`] builds the new manifest and root hash and sends refined, coalesced extents.
//! * [`spool`], [`target`]: the standby side: redo log, commit record, in-place apply, generation record,
//!   recovery; [`target::Target`] implements [`sync::TargetLink`] for a local shadow.
//! * [`sync`]: the link vocabulary (re-exported from `link`) and the historical paths of the orchestration
//!   (`engine::sync::{sync_volume, SyncOptions, SyncReport, SyncMode, SyncError}`).
//! * [`durable`]: the handle every durable operation goes through, so tests can crash a sync at each one.
//!
//! The manifest, spool and state file share one helper for their fixed headers (magic, version, little-endian
//! fields, crc32); each format draws its layout in its module docs.
//!
//! ```no_run
//! use engine::sync::{sync_volume, SyncOptions};
//! use engine::target::{Target, TargetOptions};
//! use engine::volume::{Access, IoOptions, Volume};
//!
//! // Sync a frozen image to a shadow file in the same process (what `blockrep sync --local` does).
//! let source = Volume::open("/srv/snap.img".as_ref(), Access::Read, &IoOptions::default())?;
//! let options = TargetOptions::new("v1", IoOptions::default());
//! let mut target = Target::open("/srv/shadow.img".as_ref(), "/var/lib/blockrep/standby/v1".as_ref(), options)?;
//! let manifest = std::path::Path::new("/var/lib/blockrep/primary/v1/manifest");
//! let report = sync_volume("v1", &source, manifest, &mut target, &SyncOptions::new(65536), &mut |_, _| {})?;
//! println!("generation {} ({} bytes sent)", report.generation, report.bytes_sent);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
#![deny(missing_docs)]

pub mod differ;
pub mod durable;
pub mod generations;
pub mod hash;
pub mod io;
mod layout;
pub mod manifest;
pub mod source;
pub mod spool;
pub mod sync;
pub mod target;
pub mod volume;
