//! The tracked change source: reads and hashes only the byte ranges a tracker lists as changed since a committed
//! generation (`thin_delta` between two thin snapshots, a classic snapshot's exception store).
//!
//! The tracker is the caller's (node): it hands over the ranges in bytes of the source, and the generation whose
//! content every other byte still has. [`Tracked`] widens them to whole blocks, merges them, and reports those
//! blocks with [`Coverage::ChangedSince`], so [`super::sync_changes`] takes every other block's hash from that
//! generation's manifest (and refuses, before anything is sent, when the manifest or the standby is not at that
//! generation). Every block it reads is hashed and sent like a full scan's, and checked by the standby's root
//! hash at commit.

use bytes::Bytes;

use crate::differ::ScannedChunk;
use crate::hash::{block_count, hash_block_zero_aware, ZeroHashes};
use crate::io::AlignedBuf;
use crate::volume::Volume;

use super::change::{ChangeSource, Coverage};
use super::SyncError;

/// Bytes read at once (a multiple of the block size, at least one block).
const READ_CHUNK: u64 = 1 << 20;

/// A change source over the ranges a tracker reported (see the module docs).
#[derive(Debug)]
pub struct Tracked<'a> {
    volume: &'a Volume,
    block_size: u32,
    since: u64,
    name: String,
    /// Merged block ranges `[first, end)`, sorted.
    blocks: Vec<(u64, u64)>,
}

impl<'a> Tracked<'a> {
    /// The blocks of `volume` (in blocks of `block_size`) that overlap `ranges` (`(offset, length)` in bytes, any
    /// order, overlaps allowed; parts beyond the volume's end are dropped), reported as changed since committed
    /// generation `since`. `name` names the tracker in logs and errors.
    pub fn new(volume: &'a Volume, block_size: u32, since: u64, name: &str, ranges: &[(u64, u64)]) -> Self {
        let size = volume.size();
        let nblocks = block_count(size, block_size);
        let bs = u64::from(block_size);
        let mut blocks: Vec<(u64, u64)> = ranges
            .iter()
            .filter(|&&(off, len)| len > 0 && off < size)
            .map(|&(off, len)| (off / bs, off.saturating_add(len).min(size).div_ceil(bs).min(nblocks)))
            .collect();
        blocks.sort_unstable();
        let mut merged: Vec<(u64, u64)> = Vec::with_capacity(blocks.len());
        for (a, b) in blocks {
            match merged.last_mut() {
                Some(last) if a <= last.1 => last.1 = last.1.max(b),
                _ => merged.push((a, b)),
            }
        }
        Tracked { volume, block_size, since, name: name.to_owned(), blocks: merged }
    }

    /// Bytes the source will read (the listed blocks; the volume's last block may be short).
    pub fn bytes_to_read(&self) -> u64 {
        let (size, bs) = (self.volume.size(), u64::from(self.block_size));
        self.blocks.iter().map(|&(a, b)| (b * bs).min(size) - a * bs).sum()
    }
}

impl ChangeSource for Tracked<'_> {
    fn name(&self) -> &str {
        &self.name
    }
    fn volume_size(&self) -> u64 {
        self.volume.size()
    }
    fn block_size(&self) -> u32 {
        self.block_size
    }
    fn coverage(&self) -> Coverage {
        Coverage::ChangedSince { generation: self.since }
    }
    fn report(&mut self, sink: &mut dyn FnMut(ScannedChunk) -> Result<(), SyncError>) -> Result<(), SyncError> {
        let (size, bs) = (self.volume.size(), u64::from(self.block_size));
        let per_read = (READ_CHUNK / bs).max(1);
        let zeros = ZeroHashes::new(self.block_size);
        let mut buf = AlignedBuf::new((per_read * bs) as usize);
        for &(first, end) in &self.blocks {
            let mut block = first;
            while block < end {
                let n = per_read.min(end - block);
                let offset = block * bs;
                let want = ((block + n) * bs).min(size) - offset;
                buf.set_len(want as usize);
                let got = self.volume.read_at(offset, &mut buf).map_err(crate::differ::DiffError::from)?;
                let data = Bytes::copy_from_slice(&buf[..got]);
                let (hashes, zero) = data.chunks(bs as usize).map(|b| hash_block_zero_aware(b, &zeros)).unzip();
                sink(ScannedChunk { offset, first_block: block, data, hashes, zero })?;
                block += n;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::FileExt;

    use rand::{RngCore, SeedableRng};

    use super::*;
    use crate::source::{sync_changes, sync_volume, SyncMode, SyncOptions};
    use crate::target::{Target, TargetOptions};
    use crate::volume::{Access, IoOptions};

    const BS: u32 = 65536;
    const SIZE: u64 = 64 * BS as u64 + 12288;

    struct Setup {
        dir: tempfile::TempDir,
        target: Target,
    }

    impl Setup {
        fn new() -> Setup {
            let dir = tempfile::tempdir().unwrap();
            let mut image = vec![0u8; SIZE as usize];
            rand::rngs::StdRng::seed_from_u64(7).fill_bytes(&mut image[..SIZE as usize / 2]);
            std::fs::write(dir.path().join("source"), &image).unwrap();
            std::fs::write(dir.path().join("shadow"), vec![0x5a; SIZE as usize]).unwrap();
            let opts = TargetOptions::new("v", IoOptions::default());
            let target = Target::open(&dir.path().join("shadow"), &dir.path().join("standby"), opts).unwrap();
            Setup { dir, target }
        }
        fn source(&self) -> Volume {
            Volume::open(&self.dir.path().join("source"), Access::Read, &IoOptions::default()).unwrap()
        }
        fn write(&self, offset: u64, len: usize, byte: u8) {
            let f = std::fs::OpenOptions::new().write(true).open(self.dir.path().join("source")).unwrap();
            f.write_all_at(&vec![byte; len], offset).unwrap();
        }
        fn full(&mut self) -> crate::source::SyncReport {
            let (vol, m) = (self.source(), self.dir.path().join("manifest"));
            sync_volume("v", &vol, &m, &mut self.target, &SyncOptions::new(BS), &mut |_, _| {}).unwrap()
        }
        fn tracked(&mut self, since: u64, ranges: &[(u64, u64)]) -> Result<crate::source::SyncReport, SyncError> {
            let (vol, m) = (self.source(), self.dir.path().join("manifest"));
            let mut t = Tracked::new(&vol, BS, since, "test tracker", ranges);
            sync_changes("v", &mut t, &m, &mut self.target, &SyncOptions::new(BS), &mut |_, _| {})
        }
        fn same(&self) -> bool {
            let read = |n: &str| std::fs::read(self.dir.path().join(n)).unwrap()[..SIZE as usize].to_vec();
            read("source") == read("shadow")
        }
    }

    #[test]
    fn ranges_widen_to_blocks_merge_and_stop_at_the_end() {
        let s = Setup::new();
        let vol = s.source();
        let bs = u64::from(BS);
        let ranges = [(bs * 3 + 10, 5), (bs * 3 + 100, 1), (bs * 4, bs), (0, 1), (SIZE - 1, 1000), (SIZE + 5, 7)];
        let t = Tracked::new(&vol, BS, 1, "t", &ranges);
        assert_eq!(t.blocks, vec![(0, 1), (3, 5), (64, 65)]);
        assert_eq!(t.bytes_to_read(), 3 * bs + 12288);
        assert_eq!(t.coverage(), Coverage::ChangedSince { generation: 1 });
    }

    #[test]
    fn a_tracked_sync_reads_only_the_listed_ranges_and_gives_the_same_shadow_and_root_as_a_full_scan() {
        let mut s = Setup::new();
        let first = s.full();
        assert!(s.same());
        let bs = u64::from(BS);
        // Three changes: inside one block, across a block boundary, and in the volume's short last block.
        s.write(5 * bs + 100, 300, 1);
        s.write(20 * bs - 2048, 4096, 2);
        s.write(SIZE - 4096, 4096, 3);
        let ranges = [(5 * bs + 100, 300), (20 * bs - 2048, 4096), (SIZE - 4096, 4096)];
        let r = s.tracked(first.generation, &ranges).unwrap();
        assert_eq!(r.mode, SyncMode::Incremental, "{}", r.reason);
        assert!(s.same(), "the shadow equals the source after the tracked sync");
        assert_eq!(r.bytes_scanned, 3 * bs + 12288, "only the four touched blocks are read");
        assert_eq!(r.blocks_changed, 4);
        // The manifest the tracked sync wrote is the full scan's: a full scan now finds nothing to send, and
        // computes the same root.
        let again = s.full();
        assert_eq!((again.blocks_changed, again.bytes_sent), (0, 0));
        assert_eq!(again.root, r.root);
        assert_eq!(again.bytes_scanned, SIZE);
    }

    #[test]
    fn a_change_the_tracker_missed_is_found_by_the_next_full_scan() {
        let mut s = Setup::new();
        let first = s.full();
        let bs = u64::from(BS);
        s.write(7 * bs, 4096, 9);
        s.write(40 * bs, 4096, 9); // the tracker "forgets" this one
        let r = s.tracked(first.generation, &[(7 * bs, 4096)]).unwrap();
        assert_eq!(r.blocks_changed, 1);
        assert!(!s.same(), "the missed block is not on the standby yet");
        let full = s.full();
        assert_eq!(full.mode, SyncMode::Incremental);
        assert_eq!((full.blocks_changed, full.bytes_changed), (1, 4096), "the full scan ships the missed piece");
        assert!(s.same());
    }

    #[test]
    fn a_tracker_whose_base_is_not_the_standbys_generation_is_refused_before_anything_is_sent() {
        let mut s = Setup::new();
        let first = s.full();
        s.write(0, 4096, 4);
        let e = s.tracked(first.generation + 5, &[(0, 4096)]).unwrap_err();
        assert!(matches!(e, SyncError::NoBaseForChanges { .. }), "{e}");
        assert!(e.to_string().contains("sync with a full scan"), "{e}");
        let r = s.full();
        assert_eq!(r.generation, first.generation + 1, "the refused attempt committed nothing");
        assert!(s.same());
    }
}
