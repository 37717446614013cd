//! netproto frame throughput: encode/decode of 1 MiB extent frames (raw, zstd 1, zstd 3), zstd per level on mixed
//! data (ratio printed), and a Connection over 127.0.0.1 sending raw 1 MiB extents.
use std::hint::black_box;
use std::net::TcpListener;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use netproto::frame::{self, Direction, EncodedFrame, MacKey};
use netproto::message::{Extent, ExtentCompressor, ExtentData};
use netproto::{Bytes, HandshakeOptions, Key, Message};

const MIB: usize = 1 << 20;

fn random(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut v = Vec::with_capacity(n + 8);
    while v.len() < n {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(n);
    v
}

/// 1 MiB of mixed content in 64 KiB pieces: incompressible, text-like, sparse (mostly zero), and
/// structured-binary (small integers), like a filesystem image with data, logs, metadata and free space.
fn mixed(seed: u64) -> Vec<u8> {
    let mut v = Vec::with_capacity(MIB);
    let mut i = 0u64;
    while v.len() < MIB {
        let piece = match (i + seed) % 4 {
            0 => random(65536, seed * 31 + i),
            1 => format!("{i:08} INFO blockrep: synced volume data generation {} in {} ms\n", i * 7, i % 97)
                .bytes()
                .cycle()
                .take(65536)
                .collect(),
            2 => {
                let mut p = vec![0u8; 65536];
                for (j, b) in random(512, i + 99).into_iter().enumerate() {
                    p[j * 128] = b;
                }
                p
            }
            _ => (0..16384u32).flat_map(|j| (j * 4 + (i as u32) * 65536).to_le_bytes()).collect(),
        };
        v.extend_from_slice(&piece);
        i += 1;
    }
    v
}

fn extent(data: &Bytes) -> Message {
    Message::Extent(Extent { offset: 0, len: data.len() as u64, data: ExtentData::Data(data.clone()) })
}

fn encode(m: &Message, z: Option<&mut ExtentCompressor>, key: &MacKey) -> EncodedFrame {
    let (head, body) = m.encode(z).unwrap();
    EncodedFrame::new(1, m.frame_type(), 0, head, body, Some(key))
}

fn bench_frames(c: &mut Criterion) {
    let tx = MacKey::new([7; 32], Direction::ToServer);
    let random = Bytes::from(random(MIB, 1));
    let mixed = Bytes::from(mixed(1));
    let cases: [(&str, Option<i32>, &Bytes); 3] =
        [("raw", None, &random), ("zstd1_mixed", Some(1), &mixed), ("zstd3_mixed", Some(3), &mixed)];
    let mut g = c.benchmark_group("extent_frame_1MiB");
    g.throughput(Throughput::Bytes(MIB as u64));
    for (name, level, data) in cases {
        let m = extent(data);
        let mut z = level.map(|l| ExtentCompressor::new(l).unwrap());
        g.bench_function(BenchmarkId::new("encode", name), |b| b.iter(|| black_box(encode(&m, z.as_mut(), &tx).len())));
        let wire = Bytes::from(encode(&m, z.as_mut(), &tx).to_vec());
        g.bench_function(BenchmarkId::new("decode", name), |b| {
            b.iter(|| {
                let n = frame::check(&wire).unwrap().unwrap();
                let (h, payload) = frame::parse(wire.slice(..n), 0, Some(&tx)).unwrap();
                black_box(Message::decode(h.ty, payload).unwrap())
            })
        });
    }
    g.finish();
}

fn bench_zstd_levels(c: &mut Criterion) {
    let data: Vec<u8> = (0..4).flat_map(mixed).collect();
    let mut g = c.benchmark_group("zstd_level_mixed_4MiB");
    g.throughput(Throughput::Bytes(data.len() as u64));
    for level in [-1, 1, 2, 3, 5, 7] {
        let mut z = ExtentCompressor::new(level).unwrap();
        let wire: usize = data.chunks(MIB).map(|c| z.compress(0, c).unwrap().map_or(c.len(), |v| v.len())).sum();
        eprintln!("zstd level {level}: mixed data ratio {:.3} (wire/raw)", wire as f64 / data.len() as f64);
        g.bench_with_input(BenchmarkId::from_parameter(level), &level, |b, _| {
            b.iter(|| data.chunks(MIB).map(|c| z.compress(0, c).unwrap().map_or(0, |v| v.len())).sum::<usize>())
        });
    }
    g.finish();
}

fn bench_incompressible(c: &mut Criterion) {
    let data = random(4 * MIB, 9);
    let mut g = c.benchmark_group("zstd_level_random_4MiB");
    g.throughput(Throughput::Bytes(data.len() as u64));
    for level in [-1, 1, 3] {
        g.bench_with_input(BenchmarkId::from_parameter(level), &level, |b, &level| {
            // A fresh compressor per iteration: this measures the cost of trying, without the pause after
            // incompressible runs.
            b.iter(|| {
                let mut z = ExtentCompressor::new(level).unwrap();
                data.chunks(MIB).map(|c| z.compress(0, c).unwrap().map_or(0, |v| v.len())).sum::<usize>()
            })
        });
    }
    g.finish();
    let mut g = c.benchmark_group("frame_parts_1MiB");
    g.throughput(Throughput::Bytes(MIB as u64));
    let chunk = &data[..MIB];
    g.bench_function("blake3_keyed", |b| b.iter(|| blake3::keyed_hash(&[1; 32], black_box(chunk))));
    g.finish();
}

fn bench_loopback(c: &mut Criterion) {
    const N: usize = 64;
    let key = Key([3; 32]);
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let k2 = key.clone();
    let server = std::thread::spawn(move || {
        let (s, _) = l.accept().unwrap();
        let mut conn = netproto::accept_handshake(s, &k2, "standby").unwrap();
        let mut n = 0u64;
        while let Some(m) = conn.recv().unwrap() {
            if let Message::Bye = m {
                break;
            }
            n += 1;
        }
        n
    });
    let mut conn =
        netproto::connect_with(&addr, &key, &HandshakeOptions::new("primary"), std::time::Duration::from_secs(10))
            .unwrap();
    let data = Bytes::from(random(MIB, 5));
    let m = extent(&data);
    let mut g = c.benchmark_group("connection_loopback");
    g.sample_size(10);
    g.throughput(Throughput::Bytes((N * MIB) as u64));
    g.bench_function("raw_extents_64MiB", |b| {
        b.iter(|| {
            for _ in 0..N {
                conn.send(&m).unwrap();
            }
        })
    });
    // Baseline in the same run: the same bytes through a plain TCP socket, 1 MiB writes, reads discarded.
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let plain_addr = l.local_addr().unwrap();
    let sink = std::thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        let mut buf = vec![0u8; MIB];
        while std::io::Read::read(&mut s, &mut buf).unwrap() > 0 {}
    });
    let mut plain = std::net::TcpStream::connect(plain_addr).unwrap();
    g.bench_function("plain_tcp_64MiB", |b| {
        b.iter(|| {
            for _ in 0..N {
                std::io::Write::write_all(&mut plain, &data).unwrap();
            }
        })
    });
    g.finish();
    drop(plain);
    sink.join().unwrap();
    conn.send(&Message::Bye).unwrap();
    server.join().unwrap();
}

criterion_group!(benches, bench_frames, bench_zstd_levels, bench_incompressible, bench_loopback);
criterion_main!(benches);
