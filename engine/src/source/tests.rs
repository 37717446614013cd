//! Tests of the change-source seam: a tracked source that reports only some blocks gives the same manifest, root
//! and shadow as a full scan; a source claiming "unchanged" without a manifest to take hashes from is refused.

use std::path::{Path, PathBuf};

use bytes::Bytes;
use rand::{Rng, SeedableRng};

use super::*;
use crate::hash::{hash_block_zero_aware, ZeroHashes};
use crate::target::{Target, TargetOptions};
use crate::volume::{Access, IoOptions};

const BS: u32 = 16384;
const SIZE: usize = 40 * BS as usize + 5000;

/// A change source over an image in memory that reports only the listed block ranges, each as one chunk.
struct Tracked {
    image: Bytes,
    ranges: Vec<(u64, u64)>,
    since: u64,
}

impl ChangeSource for Tracked {
    fn name(&self) -> &str {
        "test tracker"
    }
    fn volume_size(&self) -> u64 {
        self.image.len() as u64
    }
    fn block_size(&self) -> u32 {
        BS
    }
    fn coverage(&self) -> Coverage {
        Coverage::ChangedSince { generation: self.since }
    }
    fn report(&mut self, sink: &mut dyn FnMut(ScannedChunk) -> Result<(), SyncError>) -> Result<(), SyncError> {
        let zeros = ZeroHashes::new(BS);
        for &(first, end) in &self.ranges {
            let offset = first * BS as u64;
            let stop = (end * BS as u64).min(self.image.len() as u64);
            let data = self.image.slice(offset as usize..stop as usize);
            let (hashes, zero) = data.chunks(BS as usize).map(|b| hash_block_zero_aware(b, &zeros)).unzip();
            sink(ScannedChunk { offset, first_block: first, data, hashes, zero })?;
        }
        Ok(())
    }
}

struct Side {
    dir: tempfile::TempDir,
    target: Target,
}

impl Side {
    fn new() -> Side {
        let dir = tempfile::tempdir().unwrap();
        let shadow = dir.path().join("shadow");
        std::fs::write(&shadow, vec![0x5a; SIZE]).unwrap();
        let target =
            Target::open(&shadow, &dir.path().join("standby"), TargetOptions::new("v", IoOptions::default())).unwrap();
        Side { dir, target }
    }
    fn manifest(&self) -> PathBuf {
        self.dir.path().join("primary.manifest")
    }
    fn full(&mut self, image: &[u8]) -> Result<SyncReport, SyncError> {
        let src = self.dir.path().join("source");
        std::fs::write(&src, image).unwrap();
        let vol = Volume::open(&src, Access::Read, &IoOptions::default()).unwrap();
        let manifest = self.manifest();
        sync_volume("v", &vol, &manifest, &mut self.target, &SyncOptions::new(BS), &mut |_, _| {})
    }
    fn tracked(&mut self, source: &mut Tracked) -> Result<SyncReport, SyncError> {
        let manifest = self.manifest();
        sync_changes("v", source, &manifest, &mut self.target, &SyncOptions::new(BS), &mut |_, _| {})
    }
    fn shadow(&self) -> Vec<u8> {
        std::fs::read(self.dir.path().join("shadow")).unwrap()[..SIZE].to_vec()
    }
}

fn generation(t: &mut Target) -> u64 {
    Target::info(t).generation
}

fn read(p: &Path) -> Vec<u8> {
    std::fs::read(p).unwrap()
}

/// Overwrites a few pieces of `image`: inside blocks 3, 9-10 and the short last block, and zeroes block 20.
fn change(image: &[u8], rng: &mut rand::rngs::SmallRng) -> Vec<u8> {
    let mut v = image.to_vec();
    let bs = BS as usize;
    for at in [3 * bs + 100, 9 * bs + bs - 10, SIZE - 7] {
        let n = 20.min(SIZE - at);
        rng.fill(&mut v[at..at + n]);
    }
    v[20 * bs..21 * bs].fill(0);
    v
}

#[test]
fn a_source_reporting_only_changed_blocks_gives_the_full_scans_manifest_root_and_shadow() {
    let mut rng = rand::rngs::SmallRng::seed_from_u64(7);
    let mut v0 = vec![0u8; SIZE];
    rng.fill(&mut v0[..]);
    let v1 = change(&v0, &mut rng);
    let (mut scanned, mut tracked) = (Side::new(), Side::new());
    for side in [&mut scanned, &mut tracked] {
        assert_eq!(side.full(&v0).unwrap().generation, 1);
    }
    let full = scanned.full(&v1).unwrap();
    // Changed blocks, one unchanged block reported anyway (8), and gaps before, between and after.
    let nblocks = crate::hash::block_count(SIZE as u64, BS);
    let ranges = vec![(3, 4), (8, 11), (20, 21), (nblocks - 1, nblocks)];
    let mut source = Tracked { image: Bytes::from(v1.clone()), ranges, since: 1 };
    let part = tracked.tracked(&mut source).unwrap();
    assert_eq!((part.generation, part.mode), (2, SyncMode::Incremental));
    assert_eq!(part.root, full.root);
    assert_eq!(
        part.root,
        hex(&crate::hash::root_hash(
            SIZE as u64,
            BS,
            &v1.chunks(BS as usize).map(crate::hash::hash_block).collect::<Vec<_>>()
        ))
    );
    assert_eq!(
        (part.blocks_changed, part.bytes_changed, part.zero_bytes),
        (full.blocks_changed, full.bytes_changed, full.zero_bytes)
    );
    assert_eq!(part.bytes_scanned, 5 * BS as u64 + (SIZE % BS as usize) as u64);
    assert_eq!(read(&tracked.manifest()), read(&scanned.manifest()), "the same manifest file, byte for byte");
    assert_eq!(tracked.shadow(), v1);
    assert_eq!(scanned.shadow(), v1);
    assert!(tracked.target.verify().unwrap());
    // Nothing reported at all: nothing changed, the manifest is carried over, generation 3.
    let mut idle = Tracked { image: Bytes::from(v1.clone()), ranges: Vec::new(), since: 2 };
    let r = tracked.tracked(&mut idle).unwrap();
    assert_eq!((r.generation, r.blocks_changed, r.bytes_scanned, r.root), (3, 0, 0, full.root.clone()));
    assert_eq!(tracked.shadow(), v1);
}

#[test]
fn a_source_claiming_unchanged_blocks_without_a_valid_manifest_is_refused_before_anything_is_sent() {
    let mut rng = rand::rngs::SmallRng::seed_from_u64(8);
    let mut v0 = vec![0u8; SIZE];
    rng.fill(&mut v0[..]);
    let mut side = Side::new();
    let mut source = Tracked { image: Bytes::from(v0.clone()), ranges: vec![(0, 1)], since: 0 };
    // No manifest at all (first sync).
    let err = side.tracked(&mut source).unwrap_err();
    assert!(matches!(&err, SyncError::NoBaseForChanges { since: 0, .. }), "{err}");
    assert!(err.to_string().contains("no valid manifest"), "{err}");
    assert_eq!(generation(&mut side.target), 0);
    assert!(!side.manifest().exists() && !crate::manifest::next_path(&side.manifest()).exists());
    side.full(&v0).unwrap();
    // A manifest of another generation than the one claimed.
    source.since = 5;
    let err = side.tracked(&mut source).unwrap_err();
    assert!(err.to_string().contains("manifest is of generation 1"), "{err}");
    // A corrupt manifest.
    let mut m = read(&side.manifest());
    m[200] ^= 1;
    std::fs::write(side.manifest(), &m).unwrap();
    source.since = 1;
    let err = side.tracked(&mut source).unwrap_err();
    assert!(matches!(&err, SyncError::NoBaseForChanges { .. }), "{err}");
    assert_eq!(generation(&mut side.target), 1);
    assert_eq!(side.shadow(), v0);
}

#[test]
fn chunks_out_of_order_or_misshapen_fail_the_sync_and_keep_the_generation() {
    let mut rng = rand::rngs::SmallRng::seed_from_u64(9);
    let mut v0 = vec![0u8; SIZE];
    rng.fill(&mut v0[..]);
    let mut side = Side::new();
    side.full(&v0).unwrap();
    let v1 = change(&v0, &mut rng);
    for ranges in [vec![(5, 6), (2, 3)], vec![(1, 3), (2, 4)]] {
        let mut source = Tracked { image: Bytes::from(v1.clone()), ranges: ranges.clone(), since: 1 };
        let err = side.tracked(&mut source).unwrap_err();
        assert!(matches!(&err, SyncError::BadChange { .. }), "{ranges:?}: {err}");
        assert_eq!(generation(&mut side.target), 1);
        assert_eq!(side.shadow(), v0);
    }
}

/// A link that answers hash requests only when asked for the answer (as a network link does), counting the
/// requests outstanding.
struct Deferred<'a> {
    inner: &'a mut Target,
    blocks: std::collections::VecDeque<Vec<link::BlockHash>>,
    subs: std::collections::VecDeque<Vec<link::BlockHash>>,
    /// Blocks of each outstanding `sub_hashes` request.
    sub_blocks: std::collections::VecDeque<usize>,
    most_blocks: usize,
    most_subs: usize,
    /// Most blocks waiting for their fingerprints at once (the source holds a copy of each).
    most_refining: usize,
    requests: usize,
    /// Whether `sub_hashes_ready` says an outstanding answer is here (a network link whose answers have arrived).
    ready: bool,
}

impl TargetLink for Deferred<'_> {
    fn info(&mut self) -> Result<TargetInfo, LinkError> {
        self.inner.info()
    }
    fn begin(&mut self, plan: &BeginPlan) -> Result<link::BeginAck, LinkError> {
        self.inner.begin(plan)
    }
    fn block_hashes(&mut self, first: u64, count: u32) -> Result<Vec<link::BlockHash>, LinkError> {
        self.inner.block_hashes(first, count)
    }
    fn sub_hashes(&mut self, blocks: &[u64]) -> Result<Vec<link::BlockHash>, LinkError> {
        self.inner.sub_hashes(blocks)
    }
    fn block_hashes_request(&mut self, first: u64, count: u32) -> Result<Option<Vec<link::BlockHash>>, LinkError> {
        // The standby answers in request order, before any extent sent after the request.
        self.blocks.push_back(self.inner.block_hashes(first, count)?);
        self.most_blocks = self.most_blocks.max(self.blocks.len());
        self.requests += 1;
        Ok(None)
    }
    fn block_hashes_wait(&mut self) -> Result<Vec<link::BlockHash>, LinkError> {
        Ok(self.blocks.pop_front().expect("a block_hashes request is outstanding"))
    }
    fn sub_hashes_request(&mut self, blocks: &[u64]) -> Result<Option<Vec<link::BlockHash>>, LinkError> {
        self.subs.push_back(self.inner.sub_hashes(blocks)?);
        self.sub_blocks.push_back(blocks.len());
        self.most_subs = self.most_subs.max(self.subs.len());
        self.most_refining = self.most_refining.max(self.sub_blocks.iter().sum());
        self.requests += 1;
        Ok(None)
    }
    fn sub_hashes_wait(&mut self) -> Result<Vec<link::BlockHash>, LinkError> {
        self.sub_blocks.pop_front();
        Ok(self.subs.pop_front().expect("a sub_hashes request is outstanding"))
    }
    fn sub_hashes_ready(&mut self) -> Result<bool, LinkError> {
        Ok(self.ready && !self.subs.is_empty())
    }
    fn extent(&mut self, e: link::Extent) -> Result<(), LinkError> {
        self.inner.extent(e)
    }
    fn commit(&mut self, root: link::BlockHash) -> Result<link::CommitAck, LinkError> {
        assert!(self.blocks.is_empty() && self.subs.is_empty(), "every answer was collected before the commit");
        self.inner.commit(root)
    }
}

/// Pipelined refinement (issue 15: no lock-step per batch): with a link that answers only when the answer is
/// collected, incremental and compare syncs of many scattered changes still bring the shadow to the source with
/// only the changed pieces sent, and the requests in flight stay bounded (a network link refuses more than 64).
#[test]
fn pipelined_requests_stay_bounded_and_the_shadow_equals_the_source() {
    const PBS: u32 = 8192;
    let size = 3000 * PBS as usize + 3000;
    let mut rng = rand::rngs::SmallRng::seed_from_u64(31);
    let mut v0 = vec![0u8; size];
    rng.fill(&mut v0[..]);
    let dir = tempfile::tempdir().unwrap();
    let (shadow, src, manifest) = (dir.path().join("shadow"), dir.path().join("src"), dir.path().join("m"));
    std::fs::write(&shadow, vec![0u8; size]).unwrap();
    let mut target =
        Target::open(&shadow, &dir.path().join("standby"), TargetOptions::new("v", IoOptions::default())).unwrap();
    let sync = |image: &[u8], target: &mut Target, compare: bool, ready: bool| {
        std::fs::write(&src, image).unwrap();
        let vol = Volume::open(&src, Access::Read, &IoOptions::default()).unwrap();
        let mut opts = SyncOptions::new(PBS);
        opts.force_compare = compare;
        let mut link = Deferred {
            inner: target,
            blocks: Default::default(),
            subs: Default::default(),
            sub_blocks: Default::default(),
            most_blocks: 0,
            most_subs: 0,
            most_refining: 0,
            requests: 0,
            ready,
        };
        let r = sync_volume("v", &vol, &manifest, &mut link, &opts, &mut |_, _| {}).unwrap();
        (r, link.most_blocks, link.most_subs, link.most_refining * PBS as usize, link.requests)
    };
    sync(&v0, &mut target, false, false);
    // One 4 KiB piece changed in nine of every ten blocks: about 2700 refinable blocks, many batches.
    let mut v1 = v0.clone();
    let mut changed = 0u64;
    for b in (0..3000).filter(|b| b % 10 != 0) {
        let at = b * PBS as usize + (b % 2) * 4096;
        v1[at + 5] ^= 0xff;
        changed += 4096;
    }
    for compare in [false, true] {
        let (r, most_blocks, most_subs, most_held, requests) = sync(&v1, &mut target, compare, false);
        assert_eq!(r.mode, if compare { SyncMode::Compare } else { SyncMode::Incremental });
        // The compare sync after the incremental one finds nothing left to send.
        assert_eq!(r.bytes_sent, if compare { 0 } else { changed }, "only the changed pieces are sent");
        assert!(requests > if compare { 2 } else { 20 }, "{requests} requests: the test must fill the pipeline");
        assert!(most_subs <= sender::MAX_QUEUED + 1, "{most_subs} sub_hashes requests in flight");
        assert!(most_blocks <= sender::HASH_AHEAD, "{most_blocks} block_hashes requests in flight");
        // The copies the source holds while they wait stay bounded (the primary's memory, issue 15).
        assert!(
            most_held <= sender::MAX_HELD_BYTES + sender::BATCH_BYTES,
            "{most_held} bytes of changed blocks held while waiting for their fingerprints"
        );
        assert!(compare || most_held >= sender::MAX_HELD_BYTES / 2, "{most_held} bytes held: fill the pipeline");
        assert_eq!(std::fs::read(&shadow).unwrap(), v1);
    }
    // A compare sync after a change: only the changed pieces again.
    let mut v2 = v1.clone();
    v2[7 * PBS as usize + 100] ^= 1;
    let (r, ..) = sync(&v2, &mut target, true, false);
    assert_eq!((r.mode, r.bytes_sent), (SyncMode::Compare, 4096));
    assert_eq!(std::fs::read(&shadow).unwrap(), v2);
    // Answers that are already here are used before the pipeline is full: the source holds little more than
    // EARLY_SEND_HELD, and sends the same pieces.
    let mut v3 = v2.clone();
    for b in (0..3000).filter(|b| b % 10 != 3) {
        v3[b * PBS as usize + 4096 + 9] ^= 0x55;
    }
    let (r, _, _, most_held, requests) = sync(&v3, &mut target, false, true);
    assert_eq!(r.bytes_sent, 2700 * 4096, "only the changed pieces are sent");
    assert!(requests > 20, "{requests} requests");
    assert!(
        most_held <= sender::EARLY_SEND_HELD + sender::BATCH_BYTES,
        "{most_held} bytes held although the answers were here"
    );
    assert_eq!(std::fs::read(&shadow).unwrap(), v3);
}

#[test]
fn a_caller_chosen_generation_id_is_committed_and_replaces_an_interrupted_proposal() {
    let mut rng = rand::rngs::SmallRng::seed_from_u64(11);
    let mut v0 = vec![0u8; SIZE];
    rng.fill(&mut v0[..]);
    let mut side = Side::new();
    let src = side.dir.path().join("source");
    std::fs::write(&src, &v0).unwrap();
    let vol = Volume::open(&src, Access::Read, &IoOptions::default()).unwrap();
    let manifest = side.manifest();
    let gens_path = generations::source_path(&manifest);
    let current = || generations::read_source(&gens_path).history.current.map(|c| (c.generation, c.id));
    let sync = |side: &mut Side, id: Option<link::GenId>| {
        let opts = SyncOptions { generation_id: id, ..SyncOptions::new(BS) };
        sync_volume("v", &vol, &manifest, &mut side.target, &opts, &mut |_, _| {}).unwrap()
    };
    sync(&mut side, Some([7; 16]));
    assert_eq!(current(), Some((1, [7; 16])), "the caller's identifier names the generation");
    // A proposal of generation 2 that never reached the standby (the sync died before its commit).
    let interrupted = |generation, id| {
        let mut g = generations::read_source(&gens_path);
        g.proposed = Some(generations::record(generation, id, "local"));
        generations::write_source(&crate::durable::Durable::new(), &gens_path, &g).unwrap();
    };
    interrupted(2, [9; 16]);
    sync(&mut side, Some([8; 16]));
    assert_eq!(current(), Some((2, [8; 16])), "the caller's identifier, not the stale proposal");
    interrupted(3, [5; 16]);
    sync(&mut side, None);
    assert_eq!(current(), Some((3, [5; 16])), "without one, the interrupted proposal is committed as before");
    assert_eq!(side.shadow(), v0);
}
