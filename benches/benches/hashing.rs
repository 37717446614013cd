//! Block hashing throughput per block size.
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};

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
}

criterion_group!(benches, bench_hash);
criterion_main!(benches);
