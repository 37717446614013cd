//! Differ scan throughput on a page-cached file, per block size and engine; and the compare step alone
//! (`differ_compare`).
//!
//! Compare with `b3sum --num-threads 2 FILE` on the same file (see docs/ARCHITECTURE.md for the figures).
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use engine::differ::{changed_blocks, scan, DiffError, ScanOptions, ScannedChunk};
use engine::io::EngineKind;
use engine::volume::{Access, IoOptions, Volume};
use rand::{RngCore, SeedableRng};

const SIZE: usize = 256 << 20;

fn bench_scan(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vol");
    let mut data = vec![0u8; SIZE];
    rand::rngs::SmallRng::seed_from_u64(1).fill_bytes(&mut data);
    std::fs::write(&path, &data).unwrap();
    drop(data);
    let mut g = c.benchmark_group("differ_scan");
    g.sample_size(10);
    g.throughput(Throughput::Bytes(SIZE as u64));
    for engine in [EngineKind::Sync, EngineKind::Uring] {
        let vol = Volume::open(&path, Access::Read, &IoOptions { engine, direct: Some(false) }).unwrap();
        for bs in [4096u32, 16384, 65536, 262144] {
            let id = BenchmarkId::new(format!("{engine:?}"), bs);
            g.bench_with_input(id, &bs, |b, &bs| {
                b.iter(|| {
                    scan(&vol, &ScanOptions::new(bs), |c: ScannedChunk| -> Result<(), DiffError> {
                        std::hint::black_box(changed_blocks(&c, None));
                        Ok(())
                    })
                    .unwrap()
                })
            });
        }
    }
    g.finish();
}

/// The compare step alone: `changed_blocks` over one 1 MiB chunk's hashes against a reference in which 1 % of
/// the blocks differ, per block size (what the differ does per chunk after hashing).
fn bench_compare(c: &mut Criterion) {
    let mut g = c.benchmark_group("differ_compare");
    for bs in [4096usize, 65536] {
        let n = (1 << 20) / bs;
        let hashes: Vec<[u8; 32]> = (0..n).map(|i| *blake3::hash(&i.to_le_bytes()).as_bytes()).collect();
        let mut reference = hashes.clone();
        for (i, h) in reference.iter_mut().enumerate() {
            if i % 100 == 0 {
                h[31] ^= 1;
            }
        }
        let chunk = ScannedChunk {
            offset: 0,
            first_block: 0,
            data: bytes::Bytes::from(vec![0u8; 1 << 20]),
            hashes,
            zero: vec![false; n],
        };
        g.throughput(Throughput::Elements(n as u64));
        g.bench_with_input(BenchmarkId::new("blocks_of", bs), &bs, |b, _| {
            b.iter(|| std::hint::black_box(changed_blocks(&chunk, Some(&reference))))
        });
    }
    g.finish();
}

criterion_group!(benches, bench_scan, bench_compare);
criterion_main!(benches);
