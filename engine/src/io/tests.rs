//! Contract tests: written once against [`ReadEngine`]/[`WriteEngine`] through [`Volume`], run for every engine.
//!
//! The io_uring variants skip (with a printed reason) only when a probe proves the kernel refuses io_uring.

use std::path::Path;

use rand::rngs::SmallRng;
use rand::{Rng, RngCore, SeedableRng};

use super::*;
use crate::volume::{Access, IoOptions, VolumeError};
use link::error_chain;

/// 3 MiB + 12345 bytes: neither a multiple of 4096 nor of any chunk size the tests use.
const ODD_SIZE: usize = 3 * 1024 * 1024 + 12_345;

fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut v = vec![0u8; len];
    SmallRng::seed_from_u64(seed).fill_bytes(&mut v);
    v
}

fn image(dir: &Path, name: &str, data: &[u8]) -> std::path::PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, data).unwrap();
    p
}

fn open(path: &Path, access: Access, engine: EngineKind, direct: Option<bool>) -> Volume {
    Volume::open(path, access, &IoOptions { engine, direct }).unwrap()
}

/// Random positional reads through the engine, several in flight, equal the file's bytes; so do concurrent
/// `Volume::read_at` calls from several threads.
fn random_reads_match(engine: EngineKind, direct: Option<bool>) {
    let dir = tempfile::tempdir().unwrap();
    let data = random_bytes(ODD_SIZE, 1);
    let vol = open(&image(dir.path(), "img", &data), Access::Read, engine, direct);
    assert_eq!(vol.size(), ODD_SIZE as u64);
    assert_eq!(vol.engine(), engine);
    let mut rd = vol.reader(4).unwrap();
    assert_eq!(rd.kind(), engine);
    let mut rng = SmallRng::seed_from_u64(2);
    let mut expected = std::collections::HashMap::new();
    for i in 0..200 {
        // Mix aligned and unaligned offsets, and reads that run past the end of the volume.
        let offset = if i % 3 == 0 { rng.gen_range(0..ODD_SIZE / 4096) * 4096 } else { rng.gen_range(0..ODD_SIZE) };
        let len = rng.gen_range(1..=300_000usize);
        while rd.in_flight() >= rd.depth() {
            check_completion(rd.wait().unwrap(), &data, &mut expected);
        }
        rd.submit(offset as u64, len, AlignedBuf::new(len)).unwrap();
        expected.insert(offset as u64, len);
    }
    while rd.in_flight() > 0 {
        check_completion(rd.wait().unwrap(), &data, &mut expected);
    }
    assert!(expected.is_empty(), "every submitted read completed");

    std::thread::scope(|s| {
        for t in 0..3u64 {
            let (vol, data) = (&vol, &data);
            s.spawn(move || {
                let mut rng = SmallRng::seed_from_u64(10 + t);
                for _ in 0..100 {
                    let offset = rng.gen_range(0..ODD_SIZE + 10);
                    let len = rng.gen_range(1..=100_000usize);
                    let mut buf = AlignedBuf::new(len);
                    buf.set_len(len);
                    let n = vol.read_at(offset as u64, &mut buf).unwrap();
                    let end = (offset + len).min(ODD_SIZE);
                    assert_eq!(n, end.saturating_sub(offset), "short only at the end of the volume");
                    assert_eq!(&buf[..], &data[offset.min(ODD_SIZE)..end.max(offset.min(ODD_SIZE))]);
                }
            });
        }
    });
}

fn check_completion(c: Completion, data: &[u8], expected: &mut std::collections::HashMap<u64, usize>) {
    let len = expected.remove(&c.offset).expect("completion for a submitted offset");
    let off = c.offset as usize;
    let end = (off + len).min(data.len());
    assert_eq!(c.buf.len(), end - off, "read at {off} of {len} bytes is trimmed only at the end of the volume");
    assert!(c.buf[..] == data[off..end], "bytes read at {off} differ from the file");
}

/// `read_sequential` hands every chunk over once, in offset order, with the last one trimmed at the end.
fn sequential_in_order(engine: EngineKind, direct: Option<bool>) {
    let dir = tempfile::tempdir().unwrap();
    let data = random_bytes(ODD_SIZE, 3);
    let vol = open(&image(dir.path(), "img", &data), Access::Read, engine, direct);
    for (chunk, depth) in [(256 * 1024, 1), (256 * 1024, 8), (1 << 20, 4), (4096, 3)] {
        let pool = BufPool::new(depth + 2, chunk);
        let mut got = Vec::with_capacity(ODD_SIZE);
        let mut chunks = 0;
        read_sequential::<IoError>(&vol, 0, u64::MAX, chunk, depth, &pool, |off, buf| {
            assert_eq!(off, got.len() as u64, "chunks arrive in offset order");
            assert!(buf.len() == chunk || off + buf.len() as u64 == ODD_SIZE as u64, "only the last chunk is short");
            got.extend_from_slice(&buf);
            chunks += 1;
            pool.put(buf);
            Ok(())
        })
        .unwrap();
        assert_eq!(chunks, ODD_SIZE.div_ceil(chunk), "chunk {chunk} depth {depth}");
        assert!(got == data, "stream equals the file (chunk {chunk}, depth {depth})");
    }
    // A sub-range, starting at an unaligned offset.
    let pool = BufPool::new(6, 65_536);
    let mut got = Vec::new();
    read_sequential::<IoError>(&vol, 1000, 2_000_000, 65_536, 4, &pool, |off, buf| {
        assert_eq!(off, 1000 + got.len() as u64);
        got.extend_from_slice(&buf);
        pool.put(buf);
        Ok(())
    })
    .unwrap();
    assert!(got[..] == data[1000..2_000_000]);
}

/// An error from the sink stops the scan, is returned, and the pool gets its buffers back.
fn sequential_stops_on_sink_error(engine: EngineKind, direct: Option<bool>) {
    let dir = tempfile::tempdir().unwrap();
    let data = random_bytes(ODD_SIZE, 4);
    let vol = open(&image(dir.path(), "img", &data), Access::Read, engine, direct);
    let pool = BufPool::new(4, 65_536);
    #[derive(Debug)]
    enum Stop {
        Io,
        Enough,
    }
    impl From<IoError> for Stop {
        fn from(_: IoError) -> Self {
            Stop::Io
        }
    }
    let mut seen = 0;
    let r = read_sequential(&vol, 0, u64::MAX, 65_536, 4, &pool, |_, buf| {
        pool.put(buf);
        seen += 1;
        if seen == 5 {
            Err(Stop::Enough)
        } else {
            Ok(())
        }
    });
    assert!(matches!(r, Err(Stop::Enough)), "{r:?}");
    let all: Vec<_> = (0..4).map(|_| pool.try_get().expect("every buffer is back in the pool")).collect();
    assert_eq!(all.len(), 4);
}

/// Writes through the engine, including an unaligned tail at the end of the volume, read back equal.
fn writes_read_back(engine: EngineKind, direct: Option<bool>) {
    let dir = tempfile::tempdir().unwrap();
    let mut data = random_bytes(ODD_SIZE, 5);
    let path = image(dir.path(), "img", &data);
    let vol = open(&path, Access::ReadWrite, engine, direct);
    let pool = BufPool::new(6, 256 * 1024);
    let mut wr = vol.writer(4, pool.clone()).unwrap();
    assert_eq!(wr.kind(), engine);
    let mut rng = SmallRng::seed_from_u64(6);
    // Non-overlapping extents: aligned ones, an unaligned one, and the volume's unaligned last piece.
    let tail = ODD_SIZE / 4096 * 4096 - 8192;
    let mut extents = vec![(0usize, 256 * 1024), (1 << 20, 40_000), (1_500_000, 3000), (tail, ODD_SIZE - tail)];
    for i in 0..20 {
        extents.push((2_000_000 + i * 40_960, 4096 * rng.gen_range(1..=10)));
    }
    for &(off, len) in &extents {
        let mut buf = pool.get();
        buf.set_len(len);
        rng.fill_bytes(&mut buf);
        data[off..off + len].copy_from_slice(&buf);
        wr.write(off as u64, buf).unwrap();
    }
    wr.sync().unwrap();
    drop(wr);
    assert!(std::fs::read(&path).unwrap() == data, "file equals what was written");
    let mut buf = AlignedBuf::new(ODD_SIZE);
    assert_eq!(vol.read_at(0, &mut buf).unwrap(), ODD_SIZE);
    assert!(buf[..] == data[..], "reads through the volume see the writes");
    assert_eq!(pool.try_get().map(|b| b.capacity()), Some(256 * 1024), "written buffers return to the pool");
}

/// `depth` requests can be in flight at once; one more is refused and handed back.
fn depth_requests_in_flight(engine: EngineKind, direct: Option<bool>) {
    let dir = tempfile::tempdir().unwrap();
    let data = random_bytes(ODD_SIZE, 7);
    let vol = open(&image(dir.path(), "img", &data), Access::Read, engine, direct);
    let mut rd = vol.reader(8).unwrap();
    assert_eq!(rd.depth(), 8);
    for i in 0..8u64 {
        rd.submit(i * 65_536, 65_536, AlignedBuf::new(65_536)).unwrap();
    }
    assert_eq!(rd.in_flight(), 8);
    let (_, back) = rd.submit(0, 4096, AlignedBuf::new(4096)).expect_err("a ninth request exceeds the depth");
    assert_eq!(back.capacity(), 4096, "the refused buffer is handed back");
    let (_, back) = rd.submit(0, 8192, AlignedBuf::new(4096)).expect_err("len beyond the buffer is refused");
    assert_eq!(back.capacity(), 4096);
    let mut offsets: Vec<u64> = (0..8).map(|_| rd.wait().unwrap().offset).collect();
    offsets.sort_unstable();
    assert_eq!(offsets, (0..8).map(|i| i * 65_536).collect::<Vec<_>>());
    assert_eq!(rd.in_flight(), 0);
}

/// Dropping engines with requests in flight waits for them (no use-after-free, no hang).
fn drop_with_requests_in_flight(engine: EngineKind, direct: Option<bool>) {
    let dir = tempfile::tempdir().unwrap();
    let data = random_bytes(ODD_SIZE, 8);
    let path = image(dir.path(), "img", &data);
    let vol = open(&path, Access::ReadWrite, engine, direct);
    let mut rd = vol.reader(4).unwrap();
    for i in 0..4u64 {
        rd.submit(i << 20, 1 << 20, AlignedBuf::new(1 << 20)).unwrap();
    }
    drop(rd);
    let pool = BufPool::new(4, 1 << 20);
    let mut wr = vol.writer(4, pool.clone()).unwrap();
    for i in 0..3u64 {
        let mut b = pool.get();
        b.fill(0xa5);
        wr.write(i << 20, b).unwrap();
    }
    drop(wr);
    let after = std::fs::read(&path).unwrap();
    assert!(after[..3 << 20].iter().all(|&b| b == 0xa5), "writes queued before drop are completed");
}

/// A volume that shrank after opening gives a short-read error naming the offset, not short data.
fn shrunk_volume_is_a_short_read(engine: EngineKind, direct: Option<bool>) {
    let dir = tempfile::tempdir().unwrap();
    let data = random_bytes(ODD_SIZE, 11);
    let path = image(dir.path(), "img", &data);
    let vol = open(&path, Access::Read, engine, direct);
    std::fs::OpenOptions::new().write(true).open(&path).unwrap().set_len(1 << 20).unwrap();
    let pool = BufPool::new(6, 256 * 1024);
    let mut seen = 0u64;
    let e = read_sequential::<IoError>(&vol, 0, u64::MAX, 256 * 1024, 4, &pool, |off, buf| {
        assert_eq!(off, seen);
        seen += buf.len() as u64;
        pool.put(buf);
        Ok(())
    })
    .unwrap_err();
    assert!(matches!(e, IoError::ShortRead { got: 0, .. }), "{e:?}");
    assert!(e.to_string().contains("shrank"), "{e}");
    // With several reads in flight the failure may arrive before earlier chunks: those are not delivered.
    assert!(seen <= 1 << 20, "nothing past the new end was delivered ({seen})");
    let mut buf = AlignedBuf::new(8192);
    let e = vol.read_at((1 << 20) - 4096, &mut buf).unwrap_err();
    assert!(matches!(e, VolumeError::Io { source: IoError::ShortRead { got: 4096, .. }, .. }), "{e:?}");
}

/// `Volume::write_at` takes any offset and length, also under O_DIRECT, and `sync_data` succeeds.
fn volume_write_at_any_offset(engine: EngineKind, direct: Option<bool>) {
    let dir = tempfile::tempdir().unwrap();
    let mut data = random_bytes(ODD_SIZE, 12);
    let path = image(dir.path(), "img", &data);
    let vol = open(&path, Access::ReadWrite, engine, direct);
    for (off, len) in [(1usize, 10_000usize), (8192, 4096), (ODD_SIZE - 7000, 7000), (100_000, 1)] {
        let patch = random_bytes(len, off as u64);
        vol.write_at(off as u64, &patch).unwrap();
        data[off..off + len].copy_from_slice(&patch);
    }
    vol.sync_data().unwrap();
    assert!(std::fs::read(&path).unwrap() == data);
}

/// Property: any sequence of writes (any offset and length, overlapping ones separated by a flush), flushes and
/// reads leaves the volume equal to a byte-array model, for reads through the engine and through `read_at`.
fn random_ops_match_a_model(engine: EngineKind, direct: Option<bool>) {
    use proptest::prelude::*;
    use proptest::test_runner::{Config, TestRunner};

    const SIZE: usize = 256 * 1024 + 777;
    #[derive(Debug, Clone)]
    enum Op {
        Write { off: usize, len: usize, seed: u64 },
        Read { off: usize, len: usize },
    }
    let op = prop_oneof![
        3 => (0..SIZE, 1..70_000usize, any::<u64>()).prop_map(|(off, len, seed)| Op::Write {
            off,
            len: len.min(SIZE - off),
            seed
        }),
        1 => (0..SIZE, 1..100_000usize).prop_map(|(off, len)| Op::Read { off, len }),
    ];
    let mut runner = TestRunner::new(Config { cases: 24, failure_persistence: None, ..Config::default() });
    runner
        .run(&proptest::collection::vec(op, 1..40), |ops| {
            let dir = tempfile::tempdir().unwrap();
            let mut model = random_bytes(SIZE, 13);
            let path = image(dir.path(), "img", &model);
            let vol = open(&path, Access::ReadWrite, engine, direct);
            let pool = BufPool::new(5, 70_000);
            let mut wr = vol.writer(3, pool.clone()).unwrap();
            let mut queued: Vec<(usize, usize)> = Vec::new();
            for op in ops {
                match op {
                    Op::Write { off, len, seed } => {
                        if queued.iter().any(|&(o, l)| off < o + l && o < off + len) {
                            wr.flush().unwrap();
                            queued.clear();
                        }
                        let mut buf = pool.get();
                        buf.set_len(len);
                        SmallRng::seed_from_u64(seed).fill_bytes(&mut buf);
                        model[off..off + len].copy_from_slice(&buf);
                        wr.write(off as u64, buf).unwrap();
                        queued.push((off, len));
                    }
                    Op::Read { off, len } => {
                        wr.flush().unwrap();
                        queued.clear();
                        let end = (off + len).min(SIZE);
                        let mut buf = AlignedBuf::new(len);
                        buf.set_len(len);
                        prop_assert_eq!(vol.read_at(off as u64, &mut buf).unwrap(), end - off);
                        prop_assert!(buf[..] == model[off..end], "read_at({}, {}) differs from the model", off, len);
                        let mut rd = vol.reader(2).unwrap();
                        rd.submit(off as u64, len, AlignedBuf::new(len)).map_err(|(e, _)| e).unwrap();
                        let c = rd.wait().unwrap();
                        prop_assert!(c.buf[..] == model[off..end], "engine read at {} differs from the model", off);
                    }
                }
            }
            wr.sync().unwrap();
            drop(wr);
            prop_assert!(std::fs::read(&path).unwrap() == model, "file differs from the model");
            Ok(())
        })
        .unwrap();
}

/// Reads and writes that the kernel completes in several short pieces (every request capped at 5000 bytes, or
/// one 4 KiB unit under O_DIRECT) are resubmitted until whole.
fn short_requests_are_resubmitted(engine: EngineKind, direct: Option<bool>) {
    let dir = tempfile::tempdir().unwrap();
    let mut data = random_bytes(ODD_SIZE, 14);
    let path = image(dir.path(), "img", &data);
    let mut vol = open(&path, Access::ReadWrite, engine, direct);
    vol.cap_requests(5000);
    let pool = BufPool::new(6, 100_000);
    let mut got = Vec::new();
    read_sequential::<IoError>(&vol, 0, u64::MAX, 100_000, 4, &pool, |off, buf| {
        assert_eq!(off, got.len() as u64);
        got.extend_from_slice(&buf);
        pool.put(buf);
        Ok(())
    })
    .unwrap();
    assert!(got == data, "stream of short reads equals the file");
    let mut wr = vol.writer(4, pool.clone()).unwrap();
    for (off, len) in [(0usize, 100_000usize), (200_000, 65_536), (ODD_SIZE - 30_000, 30_000)] {
        let mut buf = pool.get();
        buf.set_len(len);
        buf.fill(0x5a);
        data[off..off + len].fill(0x5a);
        wr.write(off as u64, buf).unwrap();
    }
    wr.sync().unwrap();
    drop(wr);
    assert!(std::fs::read(&path).unwrap() == data, "short writes were completed");
}

macro_rules! contract_tests {
    ($($name:ident),* $(,)?) => {
        mod sync_engine {
            $(
                #[test]
                fn $name() {
                    super::$name(super::EngineKind::Sync, None);
                }
            )*
        }
        mod uring_engine {
            $(
                #[test]
                fn $name() {
                    if let Some(kind) = super::uring_or_skip() {
                        super::$name(kind, None);
                    }
                }
            )*
        }
        mod sync_engine_direct {
            $(
                #[test]
                fn $name() {
                    if super::direct_or_skip() {
                        super::$name(super::EngineKind::Sync, Some(true));
                    }
                }
            )*
        }
        mod uring_engine_direct {
            $(
                #[test]
                fn $name() {
                    if let (Some(kind), true) = (super::uring_or_skip(), super::direct_or_skip()) {
                        super::$name(kind, Some(true));
                    }
                }
            )*
        }
    };
}

contract_tests!(
    random_reads_match,
    sequential_in_order,
    sequential_stops_on_sink_error,
    writes_read_back,
    depth_requests_in_flight,
    drop_with_requests_in_flight,
    shrunk_volume_is_a_short_read,
    volume_write_at_any_offset,
    random_ops_match_a_model,
    short_requests_are_resubmitted,
);

/// `Some(Uring)`, or `None` with a printed reason when a probe proves the kernel refuses io_uring.
fn uring_or_skip() -> Option<EngineKind> {
    match EngineKind::Uring.resolve() {
        Ok(k) => Some(k),
        Err(e) => {
            eprintln!("skipping io_uring variant: {}", error_chain(&e));
            None
        }
    }
}

/// Whether the temp directory's filesystem takes `O_DIRECT`; prints why not when it refuses (EINVAL).
fn direct_or_skip() -> bool {
    let dir = tempfile::tempdir().unwrap();
    let p = image(dir.path(), "probe", &[0u8; 4096]);
    match Volume::open(&p, Access::Read, &IoOptions { engine: EngineKind::Sync, direct: Some(true) }) {
        Ok(v) => {
            assert!(v.direct());
            true
        }
        Err(e @ VolumeError::DirectUnsupported { .. }) => {
            eprintln!("skipping O_DIRECT variant: {}", error_chain(&e));
            false
        }
        Err(e) => panic!("unexpected error probing O_DIRECT: {}", error_chain(&e)),
    }
}

#[test]
fn files_default_to_buffered_and_direct_is_an_option() {
    let dir = tempfile::tempdir().unwrap();
    let p = image(dir.path(), "img", &[1u8; 10_000]);
    let v = Volume::open(&p, Access::Read, &IoOptions::default()).unwrap();
    assert!(!v.direct() && !v.is_block_device());
    assert_ne!(v.engine(), EngineKind::Auto, "Auto is resolved at open");
    assert_eq!(v.size(), 10_000);
    if direct_or_skip() {
        let v = Volume::open(&p, Access::Read, &IoOptions { direct: Some(true), ..Default::default() }).unwrap();
        assert!(v.direct());
        let mut buf = AlignedBuf::new(10_000);
        assert_eq!(v.read_at(0, &mut buf).unwrap(), 10_000);
        assert!(buf.iter().all(|&b| b == 1));
    }
}

#[test]
fn missing_path_and_directory_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-such-volume");
    let e = Volume::open(&missing, Access::Read, &IoOptions::default()).unwrap_err();
    assert!(matches!(&e, VolumeError::Open { source, .. } if source.kind() == std::io::ErrorKind::NotFound));
    let msg = error_chain(&e);
    assert!(msg.contains(&*missing.to_string_lossy()) && msg.contains("No such file"), "{msg}");

    let e = Volume::open(dir.path(), Access::ReadWrite, &IoOptions::default()).unwrap_err();
    assert!(matches!(e, VolumeError::NotAVolume { .. }), "{e:?}");
    assert!(e.to_string().contains(&*dir.path().to_string_lossy()), "{e}");
}

#[test]
fn writing_a_read_only_volume_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let p = image(dir.path(), "img", &[0u8; 8192]);
    let v = Volume::open(&p, Access::Read, &IoOptions::default()).unwrap();
    let e = v.writer(1, BufPool::new(1, 4096)).map(|_| ()).unwrap_err();
    assert!(matches!(e, VolumeError::ReadOnly { .. }), "{e:?}");
    assert!(e.to_string().contains("Access::ReadWrite"), "{e}");
}

/// A loop device attached by `losetup` for the test, detached on drop.
struct LoopDevice(std::path::PathBuf);

impl LoopDevice {
    /// Attaches `image`; `None` with a printed reason when this process cannot (not root, no losetup).
    fn attach(image: &Path) -> Option<LoopDevice> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipping loop-device test: needs root to run losetup");
            return None;
        }
        let out = match std::process::Command::new("losetup").arg("-f").arg("--show").arg(image).output() {
            Ok(o) => o,
            Err(e) => {
                eprintln!("skipping loop-device test: cannot run losetup: {e}");
                return None;
            }
        };
        assert!(out.status.success(), "losetup -f --show failed: {}", String::from_utf8_lossy(&out.stderr));
        Some(LoopDevice(String::from_utf8(out.stdout).unwrap().trim().into()))
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let _ = std::process::Command::new("losetup").arg("-d").arg(&self.0).status();
    }
}

/// On a real block device: size from BLKGETSIZE64, O_DIRECT by default, and reads and writes (including the
/// last partial 4 KiB block of a device whose size is a multiple of 512 only) through every engine.
#[test]
fn loop_device_size_direct_default_and_io() {
    const SIZE: usize = 8 * 1024 * 1024 + 1536;
    let dir = tempfile::tempdir().unwrap();
    let mut data = random_bytes(SIZE, 9);
    let img = image(dir.path(), "loop.img", &data);
    let Some(dev) = LoopDevice::attach(&img) else { return };
    let mut engines = vec![EngineKind::Sync];
    engines.extend(uring_or_skip());
    for engine in engines {
        let vol = open(&dev.0, Access::ReadWrite, engine, None);
        assert!(vol.is_block_device());
        assert!(vol.direct(), "block devices default to O_DIRECT");
        assert_eq!(vol.size(), SIZE as u64, "BLKGETSIZE64");
        let pool = BufPool::new(6, 1 << 20);
        let mut got = Vec::new();
        read_sequential::<IoError>(&vol, 0, u64::MAX, 1 << 20, 4, &pool, |off, buf| {
            assert_eq!(off, got.len() as u64);
            got.extend_from_slice(&buf);
            pool.put(buf);
            Ok(())
        })
        .unwrap();
        assert!(got == data, "{engine:?}: device reads equal the image");

        let mut wr = vol.writer(4, pool.clone()).unwrap();
        for (off, len) in [(0usize, 1 << 20), (SIZE - 5000, 5000), (3 << 20, 12_288)] {
            let mut b = pool.get();
            b.set_len(len);
            b.fill(engine as u8 + 0x11);
            data[off..off + len].copy_from_slice(&b);
            wr.write(off as u64, b).unwrap();
        }
        wr.sync().unwrap();
        drop(wr);
        let mut buf = AlignedBuf::new(SIZE);
        assert_eq!(vol.read_at(0, &mut buf).unwrap(), SIZE);
        assert!(buf[..] == data[..], "{engine:?}: device reads back what was written");
    }
    drop(dev);
    assert!(std::fs::read(&img).unwrap() == data, "the image behind the device holds the writes");
}

#[test]
fn volume_is_send_and_sync_and_auto_is_resolved() {
    fn shareable<T: Send + Sync>() {}
    shareable::<Volume>();
    let auto = EngineKind::Auto.resolve().unwrap();
    match EngineKind::Uring.resolve() {
        Ok(_) => assert_eq!(auto, EngineKind::Uring, "Auto picks io_uring when the probe passes"),
        Err(e) => {
            assert_eq!(auto, EngineKind::Sync, "Auto falls back to the synchronous engine");
            assert!(e.to_string().contains("--io-engine sync"), "{e}");
        }
    }
}
