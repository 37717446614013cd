//! The differ as `blockrep sync` runs it, on a page-cached 256 MiB file.
//!
//! * `differ_scan`: the scan of [`engine::differ::scan`] with the options `sync` builds ([`SyncOptions::new`]:
//!   1 MiB chunks, one hasher per core): `mmap` is what `--io-engine auto` does with a page-cached regular file
//!   (hash straight from the map); `Sync` and `Uring` are what `--io-engine sync|uring` do (copy through the read
//!   engine). Compare with `b3sum --num-threads 2 FILE` on the same file (docs/performance.md).
//! * `sync_unchanged`: one whole [`sync_volume`] of an unchanged source to a local target (incremental mode,
//!   nothing sent): the scan through the full-scan change source, the comparison with the manifest, writing the
//!   next manifest and the commit. This is the path an idle volume costs on every sync.
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use engine::differ::{scan, DiffError, ScannedChunk};
use engine::io::EngineKind;
use engine::sync::{sync_volume, SyncMode, SyncOptions};
use engine::target::{Target, TargetOptions};
use engine::volume::{Access, IoOptions, Volume};
use rand::{RngCore, SeedableRng};

const SIZE: usize = 256 << 20;

fn image(dir: &std::path::Path) -> std::path::PathBuf {
    let path = dir.join("vol");
    let mut data = vec![0u8; SIZE];
    rand::rngs::SmallRng::seed_from_u64(1).fill_bytes(&mut data);
    std::fs::write(&path, &data).unwrap();
    path
}

fn bench_scan(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let path = image(dir.path());
    let mut g = c.benchmark_group("differ_scan");
    g.sample_size(10);
    g.throughput(Throughput::Bytes(SIZE as u64));
    // (label, engine, mmap) as the CLI sets them: `opts.scan.mmap = engine == Auto`.
    for (label, engine, mmap) in
        [("mmap", EngineKind::Auto, true), ("Sync", EngineKind::Sync, false), ("Uring", EngineKind::Uring, false)]
    {
        if let Err(e) = engine.resolve() {
            eprintln!("skipping {label}: {e}");
            continue;
        }
        let vol = Volume::open(&path, Access::Read, &IoOptions { engine, direct: Some(false) }).unwrap();
        for bs in [4096u32, 16384, 65536, 262144] {
            let mut opts = SyncOptions::new(bs);
            opts.scan.mmap = mmap;
            g.bench_with_input(BenchmarkId::new(label, bs), &bs, |b, _| {
                b.iter(|| {
                    scan(&vol, &opts.scan, |c: ScannedChunk| -> Result<(), DiffError> {
                        std::hint::black_box(&c.hashes);
                        Ok(())
                    })
                    .unwrap()
                })
            });
        }
    }
    g.finish();
}

fn bench_sync_unchanged(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let path = image(dir.path());
    let shadow = dir.path().join("shadow");
    std::fs::copy(&path, &shadow).unwrap();
    let mut g = c.benchmark_group("sync_unchanged");
    g.sample_size(10);
    g.throughput(Throughput::Bytes(SIZE as u64));
    let source = Volume::open(&path, Access::Read, &IoOptions::default()).unwrap();
    for bs in [4096u32, 65536] {
        let state = dir.path().join(format!("standby-{bs}"));
        let manifest = dir.path().join(format!("primary-{bs}"));
        let mut target = Target::open(&shadow, &state, TargetOptions::new("bench", IoOptions::default())).unwrap();
        let opts = SyncOptions::new(bs);
        // The first sync compares with the target's hashes and writes the source's manifest.
        sync_volume("bench", &source, &manifest, &mut target, &opts, &mut |_, _| {}).unwrap();
        g.bench_with_input(BenchmarkId::new("mmap", bs), &bs, |b, _| {
            b.iter(|| {
                let r = sync_volume("bench", &source, &manifest, &mut target, &opts, &mut |_, _| {}).unwrap();
                assert_eq!((r.mode, r.bytes_changed), (SyncMode::Incremental, 0));
            })
        });
    }
    g.finish();
}

criterion_group!(benches, bench_scan, bench_sync_unchanged);
criterion_main!(benches);
