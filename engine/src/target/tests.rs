//! Acceptance tests of the crash-safe apply: crash at every durable operation, corrupt state, bad input, resume,
//! full filesystem, and a property test over several generations.

use std::collections::BTreeSet;
use std::path::PathBuf;

use bytes::Bytes;
use proptest::prelude::*;
use rand::{Rng, SeedableRng};

use super::*;
use crate::durable::{FaultPlan, InjectedCrash};
use crate::hash::RootHasher;

struct Env {
    _dir: tempfile::TempDir,
    shadow: PathBuf,
    state: PathBuf,
}

/// A temporary directory with a shadow file of `size` bytes (filled with a pattern) and a state directory.
fn env(size: usize) -> Env {
    let dir = tempfile::tempdir().unwrap();
    let shadow = dir.path().join("shadow");
    let pattern: Vec<u8> = (0..size).map(|i| (i * 7 % 251) as u8).collect();
    std::fs::write(&shadow, pattern).unwrap();
    let state = dir.path().join("state");
    Env { shadow, state, _dir: dir }
}

fn open(e: &Env, durable: Durable) -> Result<Target, TargetError> {
    Target::open(&e.shadow, &e.state, TargetOptions { volume: "vol".into(), durable, ..Default::default() })
}

fn source_root(src: &[u8], bs: u32) -> BlockHash {
    let mut r = RootHasher::new(src.len() as u64, bs);
    for c in src.chunks(bs as usize) {
        r.push(&hash::hash_block(c));
    }
    r.finish()
}

/// How the local driver behaves.
#[derive(Clone, Copy)]
struct Drive {
    bs: u32,
    resume: bool,
    /// Stop (without committing) after this many extents.
    stop_after: Option<usize>,
}

impl Drive {
    fn bs(bs: u32) -> Self {
        Drive { bs, resume: false, stop_after: None }
    }
}

/// A tiny local sync: compares block hashes (then 4 KiB sub-block hashes) of the target with `src`, sends the
/// changed pieces (zero pieces as zero extents, adjacent pieces coalesced) and commits. Returns the commit (None
/// when stopped early) and the bytes sent.
fn drive(t: &mut Target, src: &[u8], d: Drive) -> Result<(Option<CommitAck>, u64), TargetError> {
    let info = Target::info(t);
    let base = if info.root.is_some() { info.generation } else { 0 };
    let plan = BeginPlan {
        generation: info.generation + 1,
        base_generation: base,
        volume_size: src.len() as u64,
        block_size: d.bs,
        resume: d.resume,
        ..Default::default()
    };
    t.begin_impl(&plan)?;
    let bs = d.bs as usize;
    let n = hash::block_count(src.len() as u64, d.bs);
    let theirs = t.block_hashes_impl(0, n as u32)?;
    // Changed 4 KiB pieces as (offset, len).
    let mut pieces: Vec<(usize, usize)> = Vec::new();
    for b in 0..n as usize {
        let block = &src[b * bs..((b + 1) * bs).min(src.len())];
        if hash::hash_block(block) == theirs[b] {
            continue;
        }
        let subs = t.sub_hashes_impl(&[b as u64])?;
        for (i, piece) in block.chunks(SUB_BLOCK_SIZE as usize).enumerate() {
            if hash::piece_cv(piece, (i * SUB_BLOCK_SIZE as usize) as u64) != subs[i] {
                pieces.push((b * bs + i * SUB_BLOCK_SIZE as usize, piece.len()));
            }
        }
    }
    // Coalesce adjacent pieces of the same kind (zero or data).
    let mut extents: Vec<(usize, usize, bool)> = Vec::new();
    for (off, len) in pieces {
        let zero = hash::is_zero(&src[off..off + len]);
        match extents.last_mut() {
            Some((o, l, z)) if *o + *l == off && *z == zero => *l += len,
            _ => extents.push((off, len, zero)),
        }
    }
    let mut sent = 0u64;
    for (i, (off, len, zero)) in extents.into_iter().enumerate() {
        if d.stop_after == Some(i) {
            return Ok((None, sent));
        }
        let data = if zero { ExtentData::Zero } else { ExtentData::Data(Bytes::copy_from_slice(&src[off..off + len])) };
        t.extent_impl(Extent { offset: off as u64, len: len as u64, data })?;
        sent += len as u64;
    }
    if d.stop_after.is_some() {
        return Ok((None, sent));
    }
    Ok((Some(t.commit_impl(source_root(src, d.bs))?), sent))
}

fn sync(t: &mut Target, src: &[u8], bs: u32) -> CommitAck {
    drive(t, src, Drive::bs(bs)).unwrap().0.unwrap()
}

/// A random image of `size` bytes with some zero runs.
fn image(rng: &mut rand::rngs::SmallRng, size: usize) -> Vec<u8> {
    let mut v = vec![0u8; size];
    rng.fill(&mut v[..]);
    let z = rng.gen_range(0..size / 4);
    v[z..z + size / 8].fill(0);
    v
}

/// `prev` with scattered changes: rewritten pieces, zeroed pieces, a few bytes in the last partial block.
fn mutate(rng: &mut rand::rngs::SmallRng, prev: &[u8]) -> Vec<u8> {
    let mut v = prev.to_vec();
    for _ in 0..4 {
        let at = rng.gen_range(0..v.len());
        let len = rng.gen_range(1..6000).min(v.len() - at);
        if rng.gen_bool(0.3) {
            v[at..at + len].fill(0);
        } else {
            rng.fill(&mut v[at..at + len]);
        }
    }
    let last = v.len() - 1;
    v[last] ^= 0x5a;
    v
}

fn shadow_bytes(e: &Env, len: usize) -> Vec<u8> {
    std::fs::read(&e.shadow).unwrap()[..len].to_vec()
}

fn crash_op(e: &TargetError) -> Option<crate::durable::Op> {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(c) = cur {
        if let Some(io) = c.downcast_ref::<std::io::Error>() {
            if let Some(ic) = io.get_ref().and_then(|i| i.downcast_ref::<InjectedCrash>()) {
                return Some(ic.op);
            }
        }
        cur = c.source();
    }
    None
}

const SIZE: usize = 64 * 1024 + 1000; // last block partial

/// Crash flavours: (torn write, lose writes not yet fsynced).
const MODES: [(bool, bool); 3] = [(false, false), (true, false), (false, true)];

#[test]
fn crash_at_every_durable_operation_of_an_incremental_sync_leaves_one_generation() {
    let mut rng = rand::rngs::SmallRng::seed_from_u64(7);
    let v0 = image(&mut rng, SIZE);
    let v1 = mutate(&mut rng, &v0);
    let v2 = mutate(&mut rng, &v1);
    let v3 = mutate(&mut rng, &v2);
    for bs in [4096u32, 16384] {
        for (torn, lose_unsynced) in MODES {
            let mut crashed_at = BTreeSet::new();
            let mut n = 0u64;
            loop {
                let e = env(SIZE + 5000);
                let d = Durable::new();
                let mut t = open(&e, d.clone()).unwrap();
                sync(&mut t, &v0, bs);
                sync(&mut t, &v1, bs);
                d.arm(FaultPlan { crash_after: n, torn, lose_unsynced });
                let r = drive(&mut t, &v2, Drive::bs(bs));
                drop(t);
                d.power_loss().unwrap();
                let done = match &r {
                    Ok(_) => true,
                    Err(err) => {
                        let op = crash_op(err).unwrap_or_else(|| panic!("not a simulated crash: {err:?}"));
                        crashed_at.insert(format!("{op:?}"));
                        false
                    }
                };
                let mut t = open(&e, Durable::new()).unwrap();
                let info = t.info();
                let shadow = shadow_bytes(&e, SIZE);
                assert!(info.complete, "bs {bs} torn {torn} n {n}");
                assert!(info.pending.is_none() || info.generation == 2, "pending only for an uncommitted transfer");
                if shadow == v1 {
                    assert!(!done, "a finished sync must leave the new generation");
                    assert_eq!((info.generation, info.root), (2, Some(source_root(&v1, bs))), "n {n}");
                } else {
                    assert!(shadow == v2, "bs {bs} torn {torn} n {n}: the shadow is neither generation");
                    assert_eq!((info.generation, info.root), (3, Some(source_root(&v2, bs))), "n {n}");
                }
                assert!(t.verify().unwrap());
                assert!(!e.state.join(SPOOL_FILE).exists() || info.generation == 2);
                // A fresh sync completes.
                let ack = sync(&mut t, &v3, bs);
                assert_eq!(ack.generation, info.generation + 1);
                assert_eq!(shadow_bytes(&e, SIZE), v3);
                if done {
                    break;
                }
                n += 1;
            }
            for op in [
                "SpoolAppend",
                "SpoolSync",
                "ManifestWrite",
                "ManifestSync",
                "ShadowWrite",
                "ShadowSync",
                "Rename",
                "SpoolRemove",
                "DirSync",
            ] {
                assert!(crashed_at.contains(op), "bs {bs}: no crash at {op}; crashed at {crashed_at:?}");
            }
            assert!(n >= 10, "only {n} durable operations in a sync");
        }
    }
}

#[test]
fn crash_during_the_first_full_sync_leaves_the_shadow_incomplete_until_a_sync_commits() {
    let mut rng = rand::rngs::SmallRng::seed_from_u64(8);
    let v0 = image(&mut rng, SIZE);
    for (torn, lose_unsynced) in MODES {
        let mut n = 0u64;
        let mut crashed_at = BTreeSet::new();
        loop {
            let e = env(SIZE);
            let d = Durable::with_plan(FaultPlan { crash_after: n, torn, lose_unsynced });
            let mut t = open(&e, d.clone()).unwrap();
            let r = drive(&mut t, &v0, Drive::bs(4096));
            drop(t);
            d.power_loss().unwrap();
            if let Err(err) = &r {
                crashed_at.insert(format!("{:?}", crash_op(err).unwrap_or_else(|| panic!("{err:?}"))));
            }
            let mut t = open(&e, Durable::new()).unwrap();
            let info = t.info();
            if info.complete {
                assert_eq!(shadow_bytes(&e, SIZE), v0, "n {n}: complete but not the new generation");
                assert_eq!(info.generation, 1);
            } else {
                assert!(r.is_err());
                assert_eq!(info.generation, 0);
                // A later sync (also in place) completes it.
                let again = drive(&mut t, &v0, Drive::bs(4096)).unwrap().0.unwrap();
                assert_eq!(again.generation, 1);
                assert!(t.info().complete);
                assert_eq!(shadow_bytes(&e, SIZE), v0);
            }
            if r.is_ok() {
                break;
            }
            n += 1;
        }
        for op in ["StateWrite", "ShadowWrite", "ShadowSync", "ManifestWrite", "Rename", "DirSync"] {
            assert!(crashed_at.contains(op), "no crash at {op}; crashed at {crashed_at:?}");
        }
    }
}

#[test]
fn corrupt_manifest_is_reported_and_treated_as_absent() {
    let mut rng = rand::rngs::SmallRng::seed_from_u64(9);
    let v0 = image(&mut rng, SIZE);
    let v1 = mutate(&mut rng, &v0);
    type Corruption = (&'static str, fn(&mut Vec<u8>));
    let corruptions: [Corruption; 4] = [
        ("bad magic", |b| b[0] ^= 1),
        ("header crc", |b| b[17] ^= 1),
        ("truncated", |b| b.truncate(b.len() - 5)),
        ("block hash", |b| b[200] ^= 1),
    ];
    for (what, corrupt) in corruptions {
        let e = env(SIZE);
        let mut t = open(&e, Durable::new()).unwrap();
        sync(&mut t, &v0, 4096);
        drop(t);
        let path = e.state.join(MANIFEST_FILE);
        let mut b = std::fs::read(&path).unwrap();
        corrupt(&mut b);
        std::fs::write(&path, &b).unwrap();
        let mut t = open(&e, Durable::new()).unwrap();
        assert!(t.manifest_problem().is_some_and(|p| p.contains("corrupt")), "{what}: {:?}", t.manifest_problem());
        let info = t.info();
        assert_eq!(info.root, None, "{what}");
        assert_eq!(info.generation, 1, "{what}: the generation number survives the manifest");
        assert!(info.complete, "{what}: the shadow still holds its generation");
        // The next sync compares every block (the target hashes the shadow), does not write in place, and
        // produces the right content and a valid manifest.
        let (ack, sent) = drive(&mut t, &v1, Drive::bs(4096)).unwrap();
        assert_eq!(ack.unwrap().generation, 2, "{what}");
        assert_eq!(sent, differing_pieces(&v0, &v1), "{what}: full comparison sends only what differs");
        assert_eq!(shadow_bytes(&e, SIZE), v1);
        drop(t);
        let t = open(&e, Durable::new()).unwrap();
        assert!(t.manifest_problem().is_none());
        assert!(t.verify().unwrap());
    }
}

/// Bytes of the 4 KiB pieces that differ between two images.
fn differing_pieces(a: &[u8], b: &[u8]) -> u64 {
    a.chunks(4096).zip(b.chunks(4096)).filter(|(x, y)| x != y).map(|(x, _)| x.len() as u64).sum()
}

/// Syncs `v0`, then runs an incremental sync to `v1` that crashes right after its commit record is durable (at the
/// first shadow write). Returns the environment in that state.
fn crash_after_spool_commit(v0: &[u8], v1: &[u8]) -> Env {
    for n in 0.. {
        let e = env(SIZE);
        let d = Durable::new();
        let mut t = open(&e, d.clone()).unwrap();
        sync(&mut t, v0, 4096);
        d.arm(FaultPlan { crash_after: n, torn: false, lose_unsynced: true });
        let err = drive(&mut t, v1, Drive::bs(4096)).unwrap_err();
        drop(t);
        d.power_loss().unwrap();
        if crash_op(&err) == Some(crate::durable::Op::ShadowWrite) {
            assert_eq!(shadow_bytes(&e, SIZE), v0, "nothing applied before the first shadow write");
            return e;
        }
    }
    unreachable!()
}

#[test]
fn corrupt_committed_spool_is_refused_and_the_shadow_left_alone() {
    let mut rng = rand::rngs::SmallRng::seed_from_u64(10);
    let v0 = image(&mut rng, SIZE);
    let v1 = mutate(&mut rng, &v0);
    let e = crash_after_spool_commit(&v0, &v1);
    let spool_path = e.state.join(SPOOL_FILE);
    let mut b = std::fs::read(&spool_path).unwrap();
    b[spool::HEADER_LEN + spool::RECORD_HEADER_LEN + 3] ^= 0xff; // first record's payload
    std::fs::write(&spool_path, &b).unwrap();
    let err = open(&e, Durable::new()).unwrap_err();
    let msg = error_chain(&err);
    assert!(matches!(&err, TargetError::Spool { source: SpoolError::CorruptCommitted { .. }, .. }), "{msg}");
    assert!(msg.contains("not applied") && msg.contains("crc32"), "{msg}");
    assert_eq!(shadow_bytes(&e, SIZE), v0, "a corrupt committed spool must not touch the shadow");
}

#[test]
fn committed_spool_is_rolled_forward_on_open() {
    let mut rng = rand::rngs::SmallRng::seed_from_u64(11);
    let v0 = image(&mut rng, SIZE);
    let v1 = mutate(&mut rng, &v0);
    let e = crash_after_spool_commit(&v0, &v1);
    let t = open(&e, Durable::new()).unwrap();
    assert_eq!(shadow_bytes(&e, SIZE), v1);
    assert_eq!(t.info().generation, 2);
    assert!(!e.state.join(SPOOL_FILE).exists());
}

#[test]
fn uncommitted_spool_with_garbage_tail_keeps_its_valid_prefix() {
    let mut rng = rand::rngs::SmallRng::seed_from_u64(12);
    let v0 = image(&mut rng, SIZE);
    let v1 = mutate(&mut rng, &v0);
    let e = env(SIZE);
    let mut t = open(&e, Durable::new()).unwrap();
    sync(&mut t, &v0, 4096);
    let (_, sent) = drive(&mut t, &v1, Drive { stop_after: Some(2), ..Drive::bs(4096) }).unwrap();
    drop(t); // keeps the spool, fsynced
    let spool_path = e.state.join(SPOOL_FILE);
    let mut b = std::fs::read(&spool_path).unwrap();
    b.extend_from_slice(&[0x42; 100]);
    std::fs::write(&spool_path, &b).unwrap();
    let mut t = open(&e, Durable::new()).unwrap();
    let p = t.info().pending.expect("the valid prefix is pending");
    assert_eq!(std::fs::metadata(&spool_path).unwrap().len() as usize, b.len() - 100, "the torn tail is cut at open");
    assert_eq!((p.generation, p.base_generation, p.bytes), (2, 1, sent));
    assert_eq!(shadow_bytes(&e, SIZE), v0, "an uncommitted spool never touches the shadow");
    // Not resumed: discarded, and a full transfer still yields the right content.
    let (ack, _) = drive(&mut t, &v1, Drive::bs(4096)).unwrap();
    assert_eq!(ack.unwrap().generation, 2);
    assert_eq!(shadow_bytes(&e, SIZE), v1);
    assert!(t.info().pending.is_none());
}

#[test]
fn resume_continues_a_durably_spooled_transfer() {
    let mut rng = rand::rngs::SmallRng::seed_from_u64(13);
    let v0 = image(&mut rng, SIZE);
    let mut v1 = v0.clone();
    rng.fill(&mut v1[1000..40_000]);
    v1[50_000..50_100].fill(9);
    let e = env(SIZE);
    let mut t = open(&e, Durable::new()).unwrap();
    sync(&mut t, &v0, 16384);
    // The source sends 2 extents then the connection drops.
    let (_, first) = drive(&mut t, &v1, Drive { stop_after: Some(1), ..Drive::bs(16384) }).unwrap();
    assert!(first > 0);
    drop(t);
    let mut t = open(&e, Durable::new()).unwrap();
    let p = t.info().pending.expect("pending transfer");
    assert_eq!((p.generation, p.bytes), (2, first));
    assert!(p.end_offset > 0);
    let (ack, rest) = drive(&mut t, &v1, Drive { resume: true, ..Drive::bs(16384) }).unwrap();
    assert_eq!(ack.unwrap().generation, 2);
    let full = {
        let e2 = env(SIZE);
        let mut t2 = open(&e2, Durable::new()).unwrap();
        sync(&mut t2, &v0, 16384);
        drive(&mut t2, &v1, Drive::bs(16384)).unwrap().1
    };
    assert_eq!(first + rest, full, "the resumed sync sends only what was not spooled");
    assert_eq!(shadow_bytes(&e, SIZE), v1);
    assert!(t.verify().unwrap());
}

#[test]
fn target_smaller_than_source_is_refused_and_nothing_written() {
    let mut rng = rand::rngs::SmallRng::seed_from_u64(14);
    let v0 = image(&mut rng, SIZE);
    for synced_before in [false, true] {
        let e = env(SIZE - 4096);
        let mut t = open(&e, Durable::new()).unwrap();
        if synced_before {
            sync(&mut t, &v0[..SIZE - 4096], 4096);
        }
        let before = std::fs::read(&e.shadow).unwrap();
        let err = drive(&mut t, &v0, Drive::bs(4096)).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, TargetError::TooSmall { .. }));
        assert!(msg.contains(&(SIZE - 4096).to_string()) && msg.contains(&SIZE.to_string()), "{msg}");
        assert_eq!(std::fs::read(&e.shadow).unwrap(), before);
        assert!(!e.state.join(SPOOL_FILE).exists());
        assert_eq!(t.info().complete, synced_before);
    }
}

#[test]
fn extent_past_the_end_is_refused_and_nothing_written() {
    let mut rng = rand::rngs::SmallRng::seed_from_u64(15);
    let v0 = image(&mut rng, SIZE);
    for in_place in [true, false] {
        let e = env(SIZE + 8192); // shadow larger than the source
        let mut t = open(&e, Durable::new()).unwrap();
        if !in_place {
            sync(&mut t, &v0, 4096);
        }
        let before = std::fs::read(&e.shadow).unwrap();
        let g = t.info().generation;
        let plan = BeginPlan {
            generation: g + 1,
            base_generation: g,
            volume_size: SIZE as u64,
            block_size: 4096,
            resume: false,
            ..Default::default()
        };
        assert_eq!(t.begin_impl(&plan).unwrap().in_place, in_place);
        let bad = [
            (SIZE as u64 - 10, 20u64), // past the source volume, inside the shadow
            (SIZE as u64 + 4096, 10),  // past the source volume
            (u64::MAX - 5, 10),        // overflow
        ];
        for (offset, len) in bad {
            let err = t
                .extent_impl(Extent { offset, len, data: ExtentData::Data(Bytes::from(vec![1u8; len as usize])) })
                .unwrap_err();
            assert!(matches!(err, TargetError::ExtentOutOfRange { .. }), "{err}");
            assert!(err.to_string().contains("nothing was written"));
        }
        let err = t.extent_impl(Extent { offset: 0, len: 10, data: ExtentData::Data(Bytes::from_static(b"short")) });
        assert!(matches!(err, Err(TargetError::BadExtent { .. })));
        t.abort().unwrap();
        assert_eq!(std::fs::read(&e.shadow).unwrap(), before, "in place {in_place}");
        assert_eq!(t.info().pending.map_or(0, |p| p.bytes), 0);
    }
}

#[test]
fn plans_with_a_wrong_base_or_old_generation_are_refused() {
    let mut rng = rand::rngs::SmallRng::seed_from_u64(16);
    let v0 = image(&mut rng, SIZE);
    let e = env(SIZE);
    let mut t = open(&e, Durable::new()).unwrap();
    sync(&mut t, &v0, 4096);
    let plan = |generation, base_generation| BeginPlan {
        generation,
        base_generation,
        volume_size: SIZE as u64,
        block_size: 4096,
        resume: false,
        ..Default::default()
    };
    assert!(matches!(t.begin_impl(&plan(2, 7)), Err(TargetError::BaseMismatch { committed: 1, .. })));
    assert!(matches!(t.begin_impl(&plan(1, 0)), Err(TargetError::NotNext { next: 2, .. })));
    assert!(matches!(t.begin_impl(&plan(3, 1)), Err(TargetError::NotNext { generation: 3, next: 2, .. })));
    assert!(matches!(t.begin_impl(&BeginPlan { block_size: 3000, ..plan(2, 1) }), Err(TargetError::BlockSize { .. })));
    assert!(matches!(t.block_hashes_impl(0, 1), Err(TargetError::NoTransfer { .. })));
    t.begin_impl(&plan(2, 1)).unwrap();
    assert!(matches!(t.block_hashes_impl(16, 2), Err(TargetError::BlockRange { .. })));
    // Wrong root: nothing committed.
    let err = t.commit_impl([0u8; 32]).unwrap_err();
    assert!(matches!(err, TargetError::RootMismatch { .. }), "{err}");
    assert_eq!(t.info().generation, 1);
    assert_eq!(shadow_bytes(&e, SIZE), v0);
}

/// Every file of the state directory with its content, and the shadow.
fn snapshot(e: &Env) -> Vec<(PathBuf, Vec<u8>)> {
    let mut files: Vec<_> = std::fs::read_dir(&e.state)
        .unwrap()
        .map(|f| f.unwrap().path())
        .chain([e.shadow.clone()])
        .map(|p| {
            let b = std::fs::read(&p).unwrap();
            (p, b)
        })
        .collect();
    files.sort();
    files
}

#[test]
fn after_generation_u64_max_every_plan_is_refused_and_nothing_written() {
    let mut rng = rand::rngs::SmallRng::seed_from_u64(21);
    let (v0, v1) = (image(&mut rng, SIZE), image(&mut rng, SIZE));
    let e = env(SIZE);
    // A shadow whose state file says generation 2^64 - 2 is committed (its manifest lost), then one sync.
    std::fs::create_dir_all(&e.state).unwrap();
    std::fs::write(e.state.join(STATE_FILE), StateFile::new(false, u64::MAX - 1).encode()).unwrap();
    let mut t = open(&e, Durable::new()).unwrap();
    assert_eq!(sync(&mut t, &v0, 4096).generation, u64::MAX);
    assert_eq!(t.info().generation, u64::MAX);
    let before = snapshot(&e);
    for generation in [u64::MAX, 0, 1] {
        let plan = BeginPlan {
            generation,
            base_generation: u64::MAX,
            volume_size: SIZE as u64,
            block_size: 4096,
            resume: false,
            ..Default::default()
        };
        let err = t.begin_impl(&plan).unwrap_err();
        assert!(matches!(err, TargetError::GenerationExhausted { committed: u64::MAX, .. }), "{err}");
        assert!(err.to_string().contains("nothing was written"), "{err}");
    }
    // The real source refuses before it asks the target anything but its state.
    let src = e.state.parent().unwrap().join("source");
    std::fs::write(&src, &v1).unwrap();
    let vol = Volume::open(&src, Access::Read, &IoOptions::default()).unwrap();
    let manifest = e.state.parent().unwrap().join("primary.manifest");
    let err =
        crate::sync::sync_volume("vol", &vol, &manifest, &mut t, &crate::sync::SyncOptions::new(4096), &mut |_, _| {})
            .unwrap_err();
    assert!(matches!(err, crate::sync::SyncError::GenerationExhausted { generation: u64::MAX, .. }), "{err}");
    assert!(!manifest.exists() && !crate::manifest::next_path(&manifest).exists());
    drop(t);
    assert_eq!(snapshot(&e), before, "the state directory and the shadow are unchanged");
    let t = open(&e, Durable::new()).unwrap();
    assert_eq!((t.info().generation, t.info().complete), (u64::MAX, true));
    assert_eq!(shadow_bytes(&e, SIZE), v0);
}

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

#[test]
fn full_state_filesystem_fails_cleanly_with_needed_and_free_bytes() {
    if !is_root() {
        eprintln!(
            "skipping full_state_filesystem_fails_cleanly_with_needed_and_free_bytes: mounting a tmpfs needs root"
        );
        return;
    }
    let mut rng = rand::rngs::SmallRng::seed_from_u64(17);
    let size = 4 << 20;
    let v0 = image(&mut rng, size);
    let mut v1 = v0.clone();
    rng.fill(&mut v1[..3 << 20]);
    let dir = tempfile::tempdir().unwrap();
    let mnt = dir.path().join("small");
    std::fs::create_dir(&mnt).unwrap();
    let status = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=1m", "blockrep-test", mnt.to_str().unwrap()])
        .status()
        .unwrap();
    if !status.success() {
        eprintln!("skipping full_state_filesystem_fails_cleanly_with_needed_and_free_bytes: mount -t tmpfs failed");
        return;
    }
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg(&self.0).status();
        }
    }
    let _guard = Unmount(mnt.clone());
    let shadow = dir.path().join("shadow");
    std::fs::write(&shadow, vec![0u8; size]).unwrap();
    let state = mnt.join("vol");
    let e = Env { shadow, state, _dir: tempfile::tempdir().unwrap() };
    let mut t = open(&e, Durable::new()).unwrap();
    sync(&mut t, &v0, 65536); // in place: the spool is not used
    let err = drive(&mut t, &v1, Drive::bs(65536)).unwrap_err();
    let msg = error_chain(&err);
    assert!(matches!(&err, TargetError::Spool { source: SpoolError::Full { .. }, .. }), "{msg}");
    let TargetError::Spool { source: SpoolError::Full { needed, free, .. }, .. } = &err else { unreachable!() };
    assert!(*needed > *free && *needed > 0, "{msg}");
    assert!(
        msg.contains(&format!("needs at least {needed} bytes")) && msg.contains(&format!("{free} bytes free")),
        "{msg}"
    );
    drop(t);
    assert_eq!(shadow_bytes(&e, size), v0, "the shadow keeps its previous generation");
    let t = open(&e, Durable::new()).unwrap();
    assert_eq!(t.info().generation, 1);
    assert!(t.verify().unwrap());
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn shadow_equals_source_after_every_sync(
        seed in any::<u64>(),
        size in 1usize..40_000,
        bs_shift in 0u32..3,
        writes in proptest::collection::vec(proptest::collection::vec((any::<u16>(), 1u16..9000, any::<bool>()), 0..5), 1..4),
    ) {
        let bs = 4096u32 << bs_shift;
        let mut rng = rand::rngs::SmallRng::seed_from_u64(seed);
        let mut src = vec![0u8; size];
        rng.fill(&mut src[..]);
        let e = env(size + 100);
        let mut t = open(&e, Durable::new()).unwrap();
        sync(&mut t, &src, bs);
        prop_assert_eq!(shadow_bytes(&e, size), src.clone());
        for (g, gen_writes) in writes.iter().enumerate() {
            for &(at, len, zero) in gen_writes {
                let at = at as usize % size;
                let len = (len as usize).min(size - at);
                if zero { src[at..at + len].fill(0) } else { rng.fill(&mut src[at..at + len]) }
            }
            let ack = sync(&mut t, &src, bs);
            prop_assert_eq!(ack.generation, g as u64 + 2);
            prop_assert_eq!(shadow_bytes(&e, size), src.clone());
        }
        prop_assert!(t.verify().unwrap());
    }
}

/// Refinement fingerprints of listed blocks, runs of consecutive ones read together: the same values, in the same
/// order, as block by block, over the effective content (the shadow, or what this session already received), the
/// partial last block included.
#[test]
fn sub_hashes_of_runs_of_blocks_match_block_by_block() {
    let bs = 8192u32;
    let e = env(SIZE);
    let shadow = shadow_bytes(&e, SIZE);
    let mut t = open(&e, Durable::new()).unwrap();
    let link: &mut dyn TargetLink = &mut t;
    let plan = BeginPlan { generation: 1, volume_size: SIZE as u64, block_size: bs, ..Default::default() };
    link.begin(&plan).unwrap();
    let expect = |content: &[u8], blocks: &[u64]| -> Vec<BlockHash> {
        let block = |b: u64| &content[(b * bs as u64) as usize..(((b + 1) * bs as u64) as usize).min(SIZE)];
        blocks.iter().flat_map(|&b| hash::piece_cvs(block(b)).collect::<Vec<_>>()).collect()
    };
    let blocks = [0, 1, 2, 5, 7, 8];
    assert_eq!(link.sub_hashes(&blocks).unwrap(), expect(&shadow, &blocks));
    let mut rng = rand::rngs::SmallRng::seed_from_u64(41);
    let mut now = shadow.clone();
    rng.fill(&mut now[3 * bs as usize..5 * bs as usize]);
    let data = Bytes::copy_from_slice(&now[3 * bs as usize..5 * bs as usize]);
    link.extent(Extent { offset: 3 * bs as u64, len: 2 * bs as u64, data: ExtentData::Data(data) }).unwrap();
    assert_eq!(link.sub_hashes(&[2, 3, 4, 5, 6]).unwrap(), expect(&now, &[2, 3, 4, 5, 6]));
    assert!(link.sub_hashes(&[8, 9]).is_err(), "a block past the end is refused");
}

#[test]
fn target_link_trait_drives_a_sync_and_reports_target_errors() {
    let mut rng = rand::rngs::SmallRng::seed_from_u64(18);
    let v0 = image(&mut rng, SIZE);
    let e = env(SIZE);
    let mut t = open(&e, Durable::new()).unwrap();
    let link: &mut dyn TargetLink = &mut t;
    let info = link.info().unwrap();
    assert_eq!((info.volume_size, info.generation, info.complete), (SIZE as u64, 0, false));
    let plan = BeginPlan {
        generation: 1,
        base_generation: 0,
        volume_size: SIZE as u64,
        block_size: 4096,
        resume: false,
        ..Default::default()
    };
    assert!(link.begin(&plan).unwrap().in_place);
    link.extent(Extent { offset: 0, len: SIZE as u64, data: ExtentData::Data(Bytes::from(v0.clone())) }).unwrap();
    assert_eq!(link.block_hashes(0, 1).unwrap(), vec![hash::hash_block(&v0[..4096])]);
    assert_eq!(link.sub_hashes(&[16]).unwrap(), vec![hash::piece_cv(&v0[65536..], 0)]);
    let ack = link.commit(source_root(&v0, 4096)).unwrap();
    assert_eq!(ack.generation, 1);
    let big = BeginPlan { volume_size: SIZE as u64 + 1, generation: 2, ..plan };
    let err = link.begin(&big).unwrap_err();
    assert!(
        matches!(&err, LinkError::Local(e) if matches!(e.downcast_ref::<TargetError>(), Some(TargetError::TooSmall { .. }))),
        "{err}"
    );
    assert!(link.info().unwrap().complete);
    assert_eq!(shadow_bytes(&e, SIZE), v0);
    // A second target on the same state directory is refused while the first is open.
    let err = open(&e, Durable::new()).unwrap_err();
    assert!(matches!(err, TargetError::Busy { .. }), "{err}");
    drop(t);
    open(&e, Durable::new()).unwrap();
}

/// A refined block is read once: the commit's root check takes the block's new hash from the piece fingerprints
/// `sub_hashes` read, updated for the pieces received, without reading the block again. Shown by changing the
/// shadow behind the target's back between the two (which `serve`'s exclusive hold prevents in production): the
/// commit still accepts the source's root, so it did not read the block again.
#[test]
fn a_refined_block_is_read_once_and_its_hash_merged_from_piece_fingerprints() {
    const BS: u32 = 65536;
    let size = 4 * BS as usize + 5000; // a short last block of two pieces, the second one short
    let mut rng = rand::rngs::SmallRng::seed_from_u64(23);
    let v0 = image(&mut rng, size);
    let e = env(size);
    let mut t = open(&e, Durable::new()).unwrap();
    sync(&mut t, &v0, BS);
    // Pieces 3 and 4 of block 1 rewritten, piece 9 of block 1 zeroed; the short last piece of block 4 rewritten.
    let mut v1 = v0.clone();
    rng.fill(&mut v1[BS as usize + 3 * 4096..BS as usize + 5 * 4096]);
    v1[BS as usize + 9 * 4096..BS as usize + 10 * 4096].fill(0);
    rng.fill(&mut v1[4 * BS as usize + 4096..]);
    let info = t.info();
    let plan = BeginPlan {
        generation: 2,
        base_generation: 1,
        volume_size: size as u64,
        block_size: BS,
        mode: link::PlanMode::Incremental,
        id: [7; 16],
        ..Default::default()
    };
    assert_eq!(info.generation, 1);
    assert!(!t.begin_impl(&plan).unwrap().in_place);
    let subs = t.sub_hashes_impl(&[1, 4]).unwrap();
    let ours: Vec<BlockHash> = [1usize, 4]
        .iter()
        .flat_map(|&b| hash::piece_cvs(&v1[b * BS as usize..((b + 1) * BS as usize).min(size)]).collect::<Vec<_>>())
        .collect();
    let differ: Vec<usize> = (0..subs.len()).filter(|&i| subs[i] != ours[i]).collect();
    assert_eq!(differ, vec![3, 4, 9, 17], "the changed pieces, found by their fingerprints");
    // Behind the target's back: an unchanged piece of block 1 changes on the shadow.
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(&e.shadow).unwrap();
        f.write_all_at(&[0xee; 4096], BS as u64 + 12 * 4096).unwrap();
    }
    let data = |lo: usize, hi: usize| ExtentData::Data(Bytes::copy_from_slice(&v1[lo..hi]));
    let b1 = BS as usize;
    t.extent_impl(Extent { offset: (b1 + 3 * 4096) as u64, len: 8192, data: data(b1 + 3 * 4096, b1 + 5 * 4096) })
        .unwrap();
    t.extent_impl(Extent { offset: (b1 + 9 * 4096) as u64, len: 4096, data: ExtentData::Zero }).unwrap();
    let last = 4 * BS as usize + 4096;
    t.extent_impl(Extent { offset: last as u64, len: (size - last) as u64, data: data(last, size) }).unwrap();
    let ack = t.commit_impl(source_root(&v1, BS)).unwrap();
    assert_eq!(ack.generation, 2);
    // Everything the source sent is on the shadow; the outside write was not read again (and `verify`, which
    // reads the whole shadow, finds it).
    let mut expected = v1.clone();
    expected[b1 + 12 * 4096..b1 + 13 * 4096].fill(0xee);
    assert_eq!(shadow_bytes(&e, size), expected);
    assert!(!t.verify().unwrap());
}

/// End to end with the real differ and sync orchestration (`crate::sync::sync_volume`) as the source: a crash at
/// every durable operation of an incremental sync leaves the shadow at exactly one generation, and the next real
/// sync (whatever mode it picks after the crash) brings it to the source.
#[test]
fn real_sync_survives_a_crash_at_every_durable_operation() {
    use crate::sync::{sync_volume, SyncOptions};
    let mut rng = rand::rngs::SmallRng::seed_from_u64(19);
    let size = 256 * 1024 + 3000;
    let v0 = image(&mut rng, size);
    let v1 = mutate(&mut rng, &v0);
    let v2 = mutate(&mut rng, &v1);
    let bs = 16384;
    let run = |e: &Env, src: &[u8], t: &mut Target, d: &Durable| {
        let opts = SyncOptions { durable: d.clone(), ..SyncOptions::new(bs) };
        let src_path = e.state.parent().unwrap().join("source");
        std::fs::write(&src_path, src).unwrap();
        let vol = Volume::open(&src_path, Access::Read, &IoOptions::default()).unwrap();
        let manifest = e.state.parent().unwrap().join("primary.manifest");
        sync_volume("vol", &vol, &manifest, t, &opts, &mut |_, _| {})
    };
    let mut n = 0;
    loop {
        let e = env(size);
        let d = Durable::new();
        let mut t = open(&e, d.clone()).unwrap();
        run(&e, &v0, &mut t, &d).unwrap();
        assert_eq!(shadow_bytes(&e, size), v0);
        let (torn, lose_unsynced) = MODES[n as usize % MODES.len()];
        d.arm(FaultPlan { crash_after: n, torn, lose_unsynced });
        let r = run(&e, &v1, &mut t, &d);
        drop(t);
        d.power_loss().unwrap();
        let mut t = open(&e, Durable::new()).unwrap();
        let info = t.info();
        let shadow = shadow_bytes(&e, size);
        if shadow == v0 {
            assert!(r.is_err());
            assert_eq!((info.generation, info.root), (1, Some(source_root(&v0, bs))), "n {n}");
        } else {
            assert!(shadow == v1, "n {n}: the shadow is neither generation");
            assert_eq!((info.generation, info.root), (2, Some(source_root(&v1, bs))), "n {n}");
        }
        assert!(info.complete);
        // The primary's manifest, and the identifier it records, describe what the next sync may assume; an
        // incremental sync is right only if the shadow holds exactly that.
        let manifest = crate::manifest::Manifest::open(&e.state.parent().unwrap().join("primary.manifest")).unwrap();
        let described = if manifest.generation() == 1 { &v0 } else { &v1 };
        let report = run(&e, &v2, &mut t, &Durable::new()).unwrap();
        if report.mode == crate::sync::SyncMode::Incremental {
            assert!(&shadow == described, "n {n}: an incremental sync onto a shadow its manifest does not describe");
        }
        assert_eq!(report.generation, info.generation + 1);
        assert_eq!(shadow_bytes(&e, size), v2, "n {n}");
        if r.is_ok() {
            assert!(n > 8, "only {n} durable operations");
            break;
        }
        n += 1;
    }
}

#[test]
fn target_can_move_to_another_thread() {
    fn send<T: Send>() {}
    send::<Target>();
    let e = env(8192);
    let t = open(&e, Durable::new()).unwrap();
    std::thread::spawn(move || assert_eq!(t.info().volume_size, 8192)).join().unwrap();
}

#[test]
fn corrupt_state_file_is_not_promotable_and_the_next_sync_still_protects_the_shadow() {
    let mut rng = rand::rngs::SmallRng::seed_from_u64(20);
    let v0 = image(&mut rng, SIZE);
    let v1 = mutate(&mut rng, &v0);
    let e = env(SIZE);
    let mut t = open(&e, Durable::new()).unwrap();
    sync(&mut t, &v0, 4096);
    drop(t);
    std::fs::write(e.state.join(STATE_FILE), b"garbage").unwrap();
    let mut t = open(&e, Durable::new()).unwrap();
    assert!(!t.info().complete, "an unreadable state file must not claim a complete shadow");
    let info = t.info();
    let plan = BeginPlan {
        generation: info.generation + 1,
        base_generation: 0,
        volume_size: SIZE as u64,
        block_size: 4096,
        resume: false,
        ..Default::default()
    };
    assert!(!t.begin_impl(&plan).unwrap().in_place, "the shadow is not overwritten in place");
    t.abort().unwrap();
    let ack = sync(&mut t, &v1, 4096);
    assert_eq!(ack.generation, 2);
    assert!(t.info().complete);
    assert_eq!(shadow_bytes(&e, SIZE), v1);
    drop(t);
    assert!(open(&e, Durable::new()).unwrap().info().complete, "the state file was rewritten");
}

/// Files of a local sync for the trust tests: a source image, its manifest, and the target.
struct Trust {
    e: Env,
    size: usize,
    bs: u32,
}

impl Trust {
    fn new() -> Trust {
        Trust { e: env(200 * 1024 + 100), size: 200 * 1024 + 100, bs: 16384 }
    }
    fn sync(
        &self,
        src: &[u8],
        opts: crate::sync::SyncOptions,
    ) -> Result<crate::sync::SyncReport, crate::sync::SyncError> {
        let dir = self.e.state.parent().unwrap();
        std::fs::write(dir.join("source"), src).unwrap();
        let vol = Volume::open(&dir.join("source"), Access::Read, &IoOptions::default()).unwrap();
        let mut t = open(&self.e, Durable::new()).unwrap();
        crate::sync::sync_volume("vol", &vol, &dir.join("primary.manifest"), &mut t, &opts, &mut |_, _| {})
    }
    fn opts(&self) -> crate::sync::SyncOptions {
        crate::sync::SyncOptions::new(self.bs)
    }
    fn write_shadow(&self, offset: u64, data: &[u8]) {
        use std::os::unix::fs::FileExt;
        std::thread::sleep(std::time::Duration::from_millis(5)); // a distinct mtime even on coarse clocks
        let f = std::fs::OpenOptions::new().write(true).open(&self.e.shadow).unwrap();
        f.write_all_at(data, offset).unwrap();
    }
}

/// The divergence case: full sync, 15 bytes written to the shadow outside blockrep, 8 bytes changed on the
/// source. The next sync compares the shadow's actual content (its manifest cannot be trusted) and repairs it;
/// after that commit the shadow is trusted again and syncs are incremental.
#[test]
fn a_shadow_written_outside_blockrep_is_repaired_by_the_next_sync() {
    use crate::sync::SyncMode;
    let t = Trust::new();
    let mut rng = rand::rngs::SmallRng::seed_from_u64(3);
    let v0 = image(&mut rng, t.size);
    assert_eq!(t.sync(&v0, t.opts()).unwrap().mode, SyncMode::Full);
    assert_eq!(t.sync(&v0, t.opts()).unwrap().mode, SyncMode::Incremental);
    assert_eq!(open(&t.e, Durable::new()).unwrap().tampered(), None);
    t.write_shadow(100_000, b"outside write!!");
    assert!(open(&t.e, Durable::new()).unwrap().tampered().unwrap().contains("modified"));
    let mut v1 = v0.clone();
    v1[5000..5008].copy_from_slice(b"changed!");
    let r = t.sync(&v1, t.opts()).unwrap();
    assert_eq!(r.mode, SyncMode::Compare, "{}", r.reason);
    assert!(r.reason.contains("not trusted") && r.reason.contains("modified"), "{}", r.reason);
    assert_eq!(shadow_bytes(&t.e, t.size), v1);
    assert_eq!(r.bytes_changed, 2 * 4096, "the outside write and the source's change, one 4 KiB piece each");
    let r = t.sync(&v1, t.opts()).unwrap();
    assert_eq!((r.mode, r.bytes_changed), (SyncMode::Incremental, 0), "{}", r.reason);
    let r = t.sync(&v1, crate::sync::SyncOptions { force_compare: true, ..t.opts() }).unwrap();
    assert_eq!((r.mode, r.bytes_changed), (SyncMode::Compare, 0), "{}", r.reason);
}

/// A verify that found a difference, and a state file of the previous version (no identifier, no evidence),
/// both make the next sync a compare sync that repairs the shadow.
#[test]
fn untrusted_marks_and_old_state_files_force_a_compare_sync() {
    use crate::sync::SyncMode;
    let t = Trust::new();
    let mut rng = rand::rngs::SmallRng::seed_from_u64(4);
    let v0 = image(&mut rng, t.size);
    t.sync(&v0, t.opts()).unwrap();
    // Garbage with the file's modification time put back: only a verify can find it.
    let mtime = std::fs::metadata(&t.e.shadow).unwrap().modified().unwrap();
    t.write_shadow(7, b"silent corruption");
    std::fs::File::options().write(true).open(&t.e.shadow).unwrap().set_modified(mtime).unwrap();
    {
        let mut tg = open(&t.e, Durable::new()).unwrap();
        assert!(tg.info().trusted, "no evidence of the write");
        assert!(!tg.verify().unwrap());
        tg.mark_untrusted(Distrust::VerifyFailed).unwrap();
    }
    let info = open(&t.e, Durable::new()).unwrap().info();
    assert!(!info.trusted && info.distrust.contains("verify"), "{}", info.distrust);
    let r = t.sync(&v0, t.opts()).unwrap();
    assert_eq!(r.mode, SyncMode::Compare, "{}", r.reason);
    assert_eq!(shadow_bytes(&t.e, t.size), v0);
    assert!(open(&t.e, Durable::new()).unwrap().verify().unwrap());
    assert!(open(&t.e, Durable::new()).unwrap().info().trusted);
    // A version 1 state file (the previous release) is read, but proves nothing.
    let mut b = [0u8; 28];
    crate::layout::Put::header(&mut b, b"BRSTATE1", 1).u32(0).u64(2).crc();
    std::fs::write(t.e.state.join(STATE_FILE), b).unwrap();
    let info = open(&t.e, Durable::new()).unwrap().info();
    assert_eq!((info.generation, info.complete, info.trusted, info.generation_id), (2, true, false, None));
    assert_eq!(t.sync(&v0, t.opts()).unwrap().mode, SyncMode::Compare);
}

/// A promoted shadow gets a new identifier: a sync from the old primary refuses (split brain) with both
/// histories, writing nothing, until asked to discard the standby's changes; then it reports what it overwrote.
#[test]
fn split_brain_is_refused_until_the_standby_changes_are_discarded() {
    use crate::sync::{SyncError, SyncMode};
    let t = Trust::new();
    let mut rng = rand::rngs::SmallRng::seed_from_u64(5);
    let v0 = image(&mut rng, t.size);
    t.sync(&v0, t.opts()).unwrap();
    open(&t.e, Durable::new()).unwrap().mark_promoted("standby-b").unwrap();
    assert!(open(&t.e, Durable::new())
        .unwrap()
        .tampered()
        .unwrap()
        .contains("promoted to production on node standby-b"));
    t.write_shadow(65536, &[0xee; 10000]);
    let before = shadow_bytes(&t.e, t.size);
    let mut v1 = v0.clone();
    v1[0] ^= 1;
    match t.sync(&v1, t.opts()) {
        Err(e @ SyncError::SplitBrain { .. }) => {
            let msg = e.to_string();
            assert!(msg.contains("by standby-b") && msg.contains("by local"), "{msg}");
            assert!(msg.contains("--discard-standby-changes"), "{msg}");
        }
        other => panic!("expected a split brain, got {other:?}"),
    }
    assert_eq!(shadow_bytes(&t.e, t.size), before, "nothing written");
    let r = t.sync(&v1, crate::sync::SyncOptions { discard_standby_changes: true, ..t.opts() }).unwrap();
    assert_eq!(r.mode, SyncMode::Compare);
    assert_eq!(r.standby_bytes_overwritten, Some(r.bytes_changed));
    assert_eq!(r.bytes_changed, 4 * 4096, "one piece at 0, and 10000 bytes at 64 KiB over 3 pieces");
    assert_eq!(shadow_bytes(&t.e, t.size), v1);
    assert_eq!(t.sync(&v1, t.opts()).unwrap().mode, SyncMode::Incremental);
}

/// Switchback: a demoted primary adopts its own manifest of the generation it last synced for the standby side
/// of its volume. A crash at every durable operation of the adoption leaves either the old state (the shadow,
/// written since, is then not trusted) or the adopted generation, trusted; a stale interrupted transfer is dropped;
/// a write after the adoption makes the shadow untrusted again.
#[test]
fn adopting_a_generation_is_crash_safe_and_trusted_only_when_complete() {
    let mut rng = rand::rngs::SmallRng::seed_from_u64(11);
    let e_ref = env(SIZE);
    let content = shadow_bytes(&e_ref, SIZE);
    let mut r = open(&e_ref, Durable::new()).unwrap();
    let root = sync(&mut r, &content, 4096).root;
    let reference = r.manifest().unwrap().path().to_owned();
    let record = generations::record(r.info().generation, [7; 16], "a");
    let other = image(&mut rng, SIZE);
    for torn in [false, true] {
        let mut n = 0u64;
        loop {
            let e = env(SIZE);
            let d = Durable::new();
            let mut t = open(&e, d.clone()).unwrap();
            sync(&mut t, &other, 4096);
            sync(&mut t, &mutate(&mut rng, &other), 4096);
            drive(&mut t, &other, Drive { stop_after: Some(1), ..Drive::bs(4096) }).unwrap();
            t.abort().unwrap();
            assert!(t.info().pending.is_some());
            std::fs::write(&e.shadow, &content).unwrap(); // the primary's volume holds the synced generation
            d.arm(FaultPlan { crash_after: n, torn, lose_unsynced: false });
            let res = t.adopt(&reference, &record);
            drop(t);
            let t = open(&e, Durable::new()).unwrap();
            let info = t.info();
            if info.trusted || info.generation_id == Some(record.id) {
                assert_eq!(info.generation_id, Some(record.id), "crash at {n}: {info:?}");
                assert_eq!((info.generation, info.root), (record.generation, Some(root)), "crash at {n}");
                assert!(info.pending.is_none(), "crash at {n}");
            }
            match res {
                Ok(()) => {
                    assert!(info.trusted, "{info:?}");
                    assert_eq!(t.reference().map(|(_, r)| r.id), Some(record.id));
                    assert!(!e.state.join(SPOOL_FILE).exists());
                    drop(t);
                    std::thread::sleep(std::time::Duration::from_millis(10));
                    std::fs::write(&e.shadow, &other).unwrap();
                    let t = open(&e, Durable::new()).unwrap();
                    assert!(!t.info().trusted && t.reference().is_none());
                    break;
                }
                Err(err) => assert!(crate::durable::is_injected_crash(&err), "crash at {n}: {err}"),
            }
            n += 1;
            assert!(n < 100, "the adoption never finished");
        }
    }
}

/// Switchback after an unplanned promote: a demoted primary adopts its last generation for the standby side but
/// marked promoted (it may have been written since). No crash point of the adoption leaves a trusted shadow; when
/// it completes, the shadow reports that generation's identifier (which the new primary knows: no split brain)
/// and is untrusted (its sync is a compare sync).
#[test]
fn adopting_a_written_generation_never_leaves_a_trusted_shadow() {
    let mut rng = rand::rngs::SmallRng::seed_from_u64(12);
    let e_ref = env(SIZE);
    let content = shadow_bytes(&e_ref, SIZE);
    let mut r = open(&e_ref, Durable::new()).unwrap();
    sync(&mut r, &content, 4096);
    let reference = r.manifest().unwrap().path().to_owned();
    let record = generations::record(r.info().generation, [9; 16], "a");
    let other = image(&mut rng, SIZE);
    for torn in [false, true] {
        let mut n = 0u64;
        loop {
            let e = env(SIZE);
            let d = Durable::new();
            let mut t = open(&e, d.clone()).unwrap();
            sync(&mut t, &other, 4096);
            std::fs::write(&e.shadow, mutate(&mut rng, &content)).unwrap(); // written after the last sync
            d.arm(FaultPlan { crash_after: n, torn, lose_unsynced: false });
            let res = t.adopt_written(&reference, &record);
            drop(t);
            let t = open(&e, Durable::new()).unwrap();
            let info = t.info();
            assert!(!info.trusted && t.reference().is_none(), "crash at {n}: {info:?}");
            match res {
                Ok(()) => {
                    assert_eq!(info.generation_id, Some(record.id), "{info:?}");
                    assert_eq!(info.history.first().map(|c| c.id), Some(record.id));
                    assert!(info.distrust.contains("promoted"), "{info:?}");
                    break;
                }
                Err(err) => assert!(crate::durable::is_injected_crash(&err), "crash at {n}: {err}"),
            }
            n += 1;
            assert!(n < 100, "the adoption never finished");
        }
    }
}

/// A promoting node keeps its shadow's committed generation as its reference even when the primary died in the
/// middle of the next sync (an uncommitted spool kept for resume never touched the shadow), but not once the
/// shadow is written outside blockrep.
#[test]
fn the_reference_survives_an_interrupted_transfer_but_not_an_outside_write() {
    let mut rng = rand::rngs::SmallRng::seed_from_u64(13);
    let e = env(SIZE);
    let v1 = image(&mut rng, SIZE);
    let mut t = open(&e, Durable::new()).unwrap();
    sync(&mut t, &v1, 4096);
    let v2 = mutate(&mut rng, &v1);
    sync(&mut t, &v2, 4096);
    let committed = t.reference().map(|(m, r)| (m.generation(), r.id)).expect("a trusted generation");
    drive(&mut t, &mutate(&mut rng, &v2), Drive { stop_after: Some(1), ..Drive::bs(4096) }).unwrap();
    t.abort().unwrap();
    drop(t);
    let t = open(&e, Durable::new()).unwrap();
    assert!(t.info().pending.is_some());
    assert_eq!(shadow_bytes(&e, SIZE), v2, "an uncommitted transfer never touches the shadow");
    assert_eq!(t.reference().map(|(m, r)| (m.generation(), r.id)), Some(committed));
    drop(t);
    std::thread::sleep(std::time::Duration::from_millis(10));
    std::fs::write(&e.shadow, &v1).unwrap();
    let t = open(&e, Durable::new()).unwrap();
    assert!(t.reference().is_none());
}

/// A retention that copies the shadow file into `dir` (`<generation>.img`, then `<generation>.root` as the mark
/// of a complete copy) and keeps the newest `keep` copies; `fail` makes `preserve` refuse.
#[derive(Debug)]
struct CopyRetention {
    dir: PathBuf,
    keep: usize,
    fail: std::sync::atomic::AtomicBool,
    durable: Durable,
}

impl CopyRetention {
    fn copies(&self) -> Vec<(u64, Vec<u8>, Option<Vec<u8>>)> {
        let mut v = Vec::new();
        for e in std::fs::read_dir(&self.dir).unwrap() {
            let p = e.unwrap().path();
            if p.extension().is_some_and(|x| x == "root") {
                let g: u64 = p.file_stem().unwrap().to_str().unwrap().parse().unwrap();
                let img = std::fs::read(self.dir.join(format!("{g}.img"))).ok();
                v.push((g, std::fs::read(&p).unwrap(), img));
            }
        }
        v.sort();
        v
    }
}

impl Retention for CopyRetention {
    fn preserve(&self, w: &Preserving) -> Result<(), RetainFailure> {
        if self.fail.load(std::sync::atomic::Ordering::SeqCst) {
            return Err("no space for the copy".into());
        }
        let data = std::fs::read(&w.shadow)?;
        let d = &w.durable;
        d.replace_file(Op::Retain, &self.dir, &format!("{}.img", w.generation), &data)?;
        let root = w.root.expect("a complete generation has a root");
        Ok(d.replace_file(Op::Retain, &self.dir, &format!("{}.root", w.generation), &root)?)
    }
    fn committed(&self, _volume: &str, _generation: u64) {
        let copies = self.copies();
        for (g, _, _) in copies.iter().take(copies.len().saturating_sub(self.keep)) {
            let _ = self.durable.remove_file(Op::Retain, &self.dir.join(format!("{g}.root")));
            let _ = self.durable.remove_file(Op::Retain, &self.dir.join(format!("{g}.img")));
        }
    }
}

fn open_retaining(e: &Env, durable: Durable, r: &std::sync::Arc<CopyRetention>) -> Result<Target, TargetError> {
    let retention: std::sync::Arc<dyn Retention> = r.clone();
    let opts = TargetOptions { volume: "vol".into(), durable, retention: Some(retention), ..Default::default() };
    Target::open(&e.shadow, &e.state, opts)
}

#[test]
fn a_commit_keeps_the_generation_it_overwrites_and_refuses_when_it_cannot() {
    let mut rng = rand::rngs::SmallRng::seed_from_u64(11);
    let gens: Vec<Vec<u8>> =
        std::iter::successors(Some(image(&mut rng, SIZE)), |p| Some(mutate(&mut rng, p))).take(5).collect();
    let e = env(SIZE);
    let dir = e.state.parent().unwrap().join("kept");
    std::fs::create_dir_all(&dir).unwrap();
    let r = std::sync::Arc::new(CopyRetention { dir, keep: 2, fail: false.into(), durable: Durable::new() });
    let mut t = open_retaining(&e, Durable::new(), &r).unwrap();
    for g in &gens[..4] {
        sync(&mut t, g, 4096);
    }
    // Generations 1..=4 committed; copies of 2 and 3 kept (1 dropped), each exactly what that generation held.
    let copies = r.copies();
    assert_eq!(copies.iter().map(|c| c.0).collect::<Vec<_>>(), [2, 3]);
    for (g, root, img) in &copies {
        let want = &gens[*g as usize - 1];
        assert_eq!(&img.as_ref().unwrap()[..SIZE], &want[..], "copy of generation {g}");
        assert_eq!(root[..], source_root(want, 4096)[..]);
    }
    // No room for the copy: the commit is refused, the shadow still holds generation 4, the transfer is kept.
    r.fail.store(true, std::sync::atomic::Ordering::SeqCst);
    let err = drive(&mut t, &gens[4], Drive::bs(4096)).unwrap_err();
    let chain = error_chain(&err);
    assert!(chain.contains("generation 4 could not be kept: no space for the copy"), "{chain}");
    assert_eq!(shadow_bytes(&e, SIZE), gens[3]);
    assert_eq!(t.info().generation, 4);
    assert!(t.info().pending.is_some(), "the spooled transfer is kept for resume");
    assert!(t.verify().unwrap());
    r.fail.store(false, std::sync::atomic::Ordering::SeqCst);
    sync(&mut t, &gens[4], 4096);
    assert_eq!(shadow_bytes(&e, SIZE), gens[4]);
    assert_eq!(r.copies().iter().map(|c| c.0).collect::<Vec<_>>(), [3, 4]);
}

#[test]
fn a_crash_while_keeping_a_generation_leaves_complete_copies_and_one_generation() {
    let mut rng = rand::rngs::SmallRng::seed_from_u64(12);
    let v0 = image(&mut rng, SIZE);
    let v1 = mutate(&mut rng, &v0);
    let v2 = mutate(&mut rng, &v1);
    let mut crashed_at = BTreeSet::new();
    let mut n = 0u64;
    loop {
        let e = env(SIZE);
        let dir = e.state.parent().unwrap().join("kept");
        std::fs::create_dir_all(&dir).unwrap();
        let d = Durable::new();
        let r = std::sync::Arc::new(CopyRetention { dir, keep: 1, fail: false.into(), durable: d.clone() });
        let mut t = open_retaining(&e, d.clone(), &r).unwrap();
        sync(&mut t, &v0, 4096);
        sync(&mut t, &v1, 4096); // keeps generation 1
        d.arm(FaultPlan { crash_after: n, torn: false, lose_unsynced: true });
        let res = drive(&mut t, &v2, Drive::bs(4096));
        drop(t);
        d.power_loss().unwrap();
        let done = match &res {
            Ok(_) => true,
            Err(err) => {
                crashed_at.insert(format!("{:?}", crash_op(err).unwrap_or_else(|| panic!("{err:?}"))));
                false
            }
        };
        let t = open_retaining(&e, Durable::new(), &r).unwrap();
        let shadow = shadow_bytes(&e, SIZE);
        assert!(shadow == v1 || shadow == v2, "n {n}: the shadow is neither generation");
        assert!(t.verify().unwrap());
        // Every copy marked complete holds exactly the generation it names.
        for (g, root, img) in r.copies() {
            let want = [&v0, &v1][g as usize - 1];
            assert_eq!(&img.expect("a complete copy has its image")[..SIZE], &want[..], "n {n}: copy {g}");
            assert_eq!(root[..], source_root(want, 4096)[..]);
        }
        if shadow == v2 {
            assert!(r.copies().iter().any(|c| c.0 == 2), "n {n}: generation 3 committed without keeping 2");
        }
        if done {
            break;
        }
        n += 1;
    }
    assert!(crashed_at.contains("Retain"), "crashed at {crashed_at:?}");
}

/// The compare sync's read-ahead hasher (`target/ahead.rs`) with each way of reading the shadow (`auto`: from a
/// memory map; `sync` and `uring`: the read engines): a shadow written outside blockrep across a block boundary,
/// inside the last (partial) block and in its last short piece, over several of the hasher's chunks, is repaired
/// byte-identically by a compare sync that sends only the differing pieces.
#[test]
fn compare_sync_repairs_outside_writes_at_block_edges_with_every_engine() {
    use crate::io::EngineKind;
    use crate::sync::{sync_volume, SyncMode, SyncOptions};
    let bs = 16384u32;
    // Three hasher chunks and a bit: the last block is 8292 bytes, its last piece 100 bytes.
    let size = 3 * ahead::CHUNK + 12 * bs as usize + 8292;
    let mut engines = vec![EngineKind::Auto, EngineKind::Sync];
    if EngineKind::Uring.resolve().is_ok() {
        engines.push(EngineKind::Uring);
    }
    for engine in engines {
        let e = env(size);
        let mut rng = rand::rngs::SmallRng::seed_from_u64(11);
        let v0 = image(&mut rng, size);
        let dir = e.state.parent().unwrap().to_owned();
        let src = dir.join("source");
        let topts = TargetOptions::new("vol", IoOptions { engine, direct: None });
        let sync = |image: &[u8], force_compare: bool| {
            std::fs::write(&src, image).unwrap();
            let vol = Volume::open(&src, Access::Read, &IoOptions::default()).unwrap();
            let mut t = Target::open(&e.shadow, &e.state, topts.clone()).unwrap();
            let opts = SyncOptions { force_compare, ..SyncOptions::new(bs) };
            sync_volume("vol", &vol, &dir.join("primary.manifest"), &mut t, &opts, &mut |_, _| {}).unwrap()
        };
        assert_eq!(sync(&v0, false).mode, SyncMode::Full);
        // Outside writes, modification time put back: only the compare sync can find them.
        let mtime = std::fs::metadata(&e.shadow).unwrap().modified().unwrap();
        {
            use std::os::unix::fs::FileExt;
            let f = std::fs::OpenOptions::new().write(true).open(&e.shadow).unwrap();
            let boundary = ahead::CHUNK as u64 + 5 * bs as u64;
            f.write_all_at(b"across the edge", boundary - 7).unwrap();
            f.write_all_at(b"inside the last block", size as u64 - 5000).unwrap();
            f.write_all_at(b"tail", size as u64 - 4).unwrap();
            f.set_modified(mtime).unwrap();
        }
        let mut v1 = v0.clone();
        v1[2 * ahead::CHUNK + 77..2 * ahead::CHUNK + 85].copy_from_slice(b"changed!");
        let r = sync(&v1, true);
        assert_eq!(r.mode, SyncMode::Compare, "{engine:?}");
        assert_eq!(shadow_bytes(&e, size), v1, "{engine:?}: the shadow is the source again");
        // Two pieces across the block edge, one inside the last block, its 100-byte last piece, the source's one.
        assert_eq!(r.bytes_changed, 4 * 4096 + 100, "{engine:?}: only the differing pieces");
        assert!(Target::open(&e.shadow, &e.state, topts.clone()).unwrap().verify().unwrap(), "{engine:?}");
        assert_eq!(sync(&v1, true).bytes_changed, 0, "{engine:?}: nothing left to repair");
    }
}

/// In a compare session the read-ahead hasher's hashes are of the shadow before the session's extents: a block
/// an extent has reached is hashed from its effective content instead, also when the source asks for its hash
/// only after sending the extent.
#[test]
fn compare_hashes_of_blocks_written_in_the_session_are_of_the_new_content() {
    let bs = 16384u32;
    let size = 2 * ahead::CHUNK + 3000;
    let e = env(size);
    let v0 = shadow_bytes(&e, size);
    let mut t = open(&e, Durable::new()).unwrap();
    let plan = BeginPlan {
        generation: 1,
        base_generation: 0,
        volume_size: size as u64,
        block_size: bs,
        mode: PlanMode::Compare,
        ..Default::default()
    };
    t.begin_impl(&plan).unwrap();
    let n = hash::block_count(size as u64, bs);
    // Blocks 0..4 asked first (from the hasher), then an extent over the end of block 70 and the start of 71.
    let first = t.block_hashes_impl(0, 4).unwrap();
    let at = 71 * bs as u64 - 10;
    t.extent_impl(Extent { offset: at, len: 20, data: ExtentData::Data(Bytes::from_static(&[9u8; 20])) }).unwrap();
    let rest = t.block_hashes_impl(4, n as u32 - 4).unwrap();
    let mut v1 = v0.clone();
    v1[at as usize..at as usize + 20].fill(9);
    let want: Vec<BlockHash> = v1.chunks(bs as usize).map(hash::hash_block).collect();
    assert_eq!(first, want[..4]);
    assert_eq!(rest, want[4..], "blocks 70 and 71 hold the extent, the others the shadow");
    assert_ne!(want[70], hash::hash_block(&v0[70 * bs as usize..71 * bs as usize]));
    let ack = t.commit_impl(source_root(&v1, bs)).unwrap();
    assert_eq!(ack.generation, 1);
    assert_eq!(shadow_bytes(&e, size), v1);
}
