//! The change-source seam: which blocks of the source may have changed, with their hashes and data.
//!
//! The orchestration ([`super::sync_changes`]) asks a [`ChangeSource`] for the blocks that may have changed and
//! takes the hash of every other block from the previous generation's manifest. A change source says which blocks
//! it reports through [`ChangeSource::coverage`]:
//!
//! * [`Coverage::Every`]: every block is reported; nothing is taken from a previous manifest. [`FullScan`], the
//!   multi-threaded scan of [`crate::differ`], is this kind.
//! * [`Coverage::ChangedSince`]: only blocks that may differ from a named committed generation are reported (a
//!   tracked source: `thin_delta` between two thin snapshots, a snapshot's exception store). The orchestration
//!   refuses such a source unless the source's manifest of exactly that generation is valid and matches what the
//!   target holds.
//!
//! A new strategy is a new implementation of the trait; the orchestration does not change.

use crate::differ::{scan, ScanOptions, ScannedChunk};
use crate::volume::Volume;

use super::SyncError;

/// Which blocks a change source reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Coverage {
    /// Every block of the source is reported, in order, with no gap.
    Every,
    /// Only blocks that may have changed since committed generation `generation` are reported; every other block
    /// has the content it had in that generation, so its hash comes from that generation's manifest.
    ChangedSince {
        /// The generation unreported blocks are unchanged from.
        generation: u64,
    },
}

/// What a sync asks of its source: which blocks may have changed, with their hashes and content.
///
/// [`ChangeSource::report`] calls `sink` with [`ScannedChunk`]s in increasing offset order. Each chunk starts on
/// a block boundary (`offset == first_block * block_size`), holds whole blocks (the volume's last block may be
/// short), one hash and one zero flag per block, and does not overlap an earlier chunk. A chunk breaking these
/// rules fails the sync with [`SyncError::BadChange`]. An error from `sink` must be returned as is (it stops the
/// sync); the source stops reading when it gets one.
pub trait ChangeSource {
    /// Short name for logs and errors ("full scan", "thin_delta", ...).
    fn name(&self) -> &str;
    /// Size of the source in bytes.
    fn volume_size(&self) -> u64;
    /// Block size of the chunks reported.
    fn block_size(&self) -> u32;
    /// Which blocks are reported.
    fn coverage(&self) -> Coverage;
    /// Reports the blocks (see the trait docs for the order and shape of the chunks).
    fn report(&mut self, sink: &mut dyn FnMut(ScannedChunk) -> Result<(), SyncError>) -> Result<(), SyncError>;
}

/// The full scan: reads and hashes every block of a frozen source with [`crate::differ::scan`] (memory-mapped
/// for page-cached regular files, the read engine otherwise; one hasher per core by default).
#[derive(Debug)]
pub struct FullScan<'a> {
    volume: &'a Volume,
    opts: ScanOptions,
}

impl<'a> FullScan<'a> {
    /// A full scan of `volume` with `opts` (its block size is the sync's).
    pub fn new(volume: &'a Volume, opts: &ScanOptions) -> Self {
        FullScan { volume, opts: *opts }
    }
}

impl ChangeSource for FullScan<'_> {
    fn name(&self) -> &str {
        "full scan"
    }
    fn volume_size(&self) -> u64 {
        self.volume.size()
    }
    fn block_size(&self) -> u32 {
        self.opts.block_size
    }
    fn coverage(&self) -> Coverage {
        Coverage::Every
    }
    fn report(&mut self, sink: &mut dyn FnMut(ScannedChunk) -> Result<(), SyncError>) -> Result<(), SyncError> {
        scan(self.volume, &self.opts, sink).map(|_stats| ())
    }
}
