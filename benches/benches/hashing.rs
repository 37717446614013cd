//! Block hashing throughput per block size, and the refinement's piece fingerprints.
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use engine::hash;

fn bench_hash(c: &mut Criterion) {
    let data: Vec<u8> = (0..(8u32 << 20)).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect();
    let mut g = c.benchmark_group("blake3_per_block");
    g.throughput(Throughput::Bytes(data.len() as u64));
    for bs in [4096usize, 16384, 65536, 262144, 1 << 20] {
        g.bench_with_input(BenchmarkId::from_parameter(bs), &bs, |b, &bs| {
            b.iter(|| data.chunks(bs).map(|c| blake3::hash(c).as_bytes()[0]).fold(0u8, |a, x| a ^ x))
        });
    }
    g.finish();
    // What refinement costs per byte beside the scan's hash of the same 64 KiB blocks.
    let mut g = c.benchmark_group("refine_64k");
    g.throughput(Throughput::Bytes(data.len() as u64));
    g.bench_function("piece_cvs", |b| {
        b.iter(|| data.chunks(65536).flat_map(hash::piece_cvs).map(|cv| cv[0]).fold(0u8, |a, x| a ^ x))
    });
    g.bench_function("block_hash", |b| {
        b.iter(|| data.chunks(65536).map(|c| hash::hash_block(c)[0]).fold(0u8, |a, x| a ^ x))
    });
    g.finish();
}

criterion_group!(benches, bench_hash);
criterion_main!(benches);
