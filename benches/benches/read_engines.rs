//! `read_sequential` throughput on a page-cached 256 MiB file: synchronous engine against io_uring, 1 MiB chunks,
//! 1, 4 and 8 reads in flight, next to a plain memory copy of the same bytes (the ceiling for page-cached reads).
use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use engine::io::{read_sequential, BufPool, EngineKind, IoError};
use engine::volume::{Access, IoOptions, Volume};

const SIZE: usize = 256 << 20;
const CHUNK: usize = 1 << 20;

fn bench_read_engines(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("image");
    let data: Vec<u8> = (0..SIZE as u32).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect();
    std::fs::write(&path, &data).expect("write the 256 MiB image");

    let mut g = c.benchmark_group("read_sequential_256MiB_cached");
    g.throughput(Throughput::Bytes(SIZE as u64));
    g.sample_size(10);

    // Ceiling: copy the same bytes from memory into 1 MiB buffers.
    let mut dst = vec![0u8; CHUNK];
    g.bench_function("memcpy", |b| {
        b.iter(|| {
            for chunk in data.chunks(CHUNK) {
                dst[..chunk.len()].copy_from_slice(chunk);
                black_box(&dst);
            }
        })
    });
    drop(data);

    for engine in [EngineKind::Sync, EngineKind::Uring] {
        if let Err(e) = engine.resolve() {
            eprintln!("skipping {engine:?}: {e}");
            continue;
        }
        let vol = Volume::open(&path, Access::Read, &IoOptions { engine, direct: Some(false) }).expect("open image");
        for depth in [1usize, 4, 8] {
            let pool = BufPool::new(depth + 1, CHUNK);
            g.bench_with_input(BenchmarkId::new(format!("{engine:?}"), depth), &depth, |b, &depth| {
                b.iter(|| {
                    let mut total = 0u64;
                    read_sequential::<IoError>(&vol, 0, u64::MAX, CHUNK, depth, &pool, |_, buf| {
                        total += buf.len() as u64;
                        pool.put(buf);
                        Ok(())
                    })
                    .expect("read the image");
                    assert_eq!(total, SIZE as u64);
                })
            });
        }
    }
    g.finish();
}

criterion_group!(benches, bench_read_engines);
criterion_main!(benches);
