//! Throughput over 127.0.0.1: raw 1 MiB extents through a `Connection` against the same bytes through a plain
//! TCP socket, in the same run. `cargo run --release -p netproto --example loopback [MiB]`.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

use netproto::message::{Extent, ExtentData};
use netproto::{Bytes, Key, Message};

const MIB: usize = 1 << 20;

fn main() {
    let total: usize = std::env::args().nth(1).map_or(512, |a| a.parse().expect("MiB to send"));
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let data: Vec<u8> = (0..MIB)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    let data = Bytes::from(data);
    for round in 1..=3 {
        let proto = protocol(&data, total);
        let plain = plain(&data, total);
        println!(
            "round {round}: netproto {:.0} MiB/s, plain TCP {:.0} MiB/s, ratio {:.2}",
            total as f64 / proto.as_secs_f64(),
            total as f64 / plain.as_secs_f64(),
            plain.as_secs_f64() / proto.as_secs_f64()
        );
    }
}

fn protocol(data: &Bytes, total: usize) -> Duration {
    let key = Key([3; 32]);
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let k2 = key.clone();
    let server = std::thread::spawn(move || {
        let (s, _) = l.accept().unwrap();
        let mut conn = netproto::accept_handshake(s, &k2, "standby").unwrap();
        while let Some(m) = conn.recv().unwrap() {
            if let Message::Bye = m {
                break;
            }
        }
        conn.send(&Message::Bye).unwrap();
    });
    let mut conn = netproto::connect(&addr, &key, "primary", Duration::from_secs(10)).unwrap();
    let t = Instant::now();
    for i in 0..total {
        let e = Extent { offset: (i * MIB) as u64, len: MIB as u64, data: ExtentData::Data(data.clone()) };
        conn.send(&Message::Extent(e)).unwrap();
    }
    conn.send(&Message::Bye).unwrap();
    conn.recv_expect("Bye").unwrap();
    let d = t.elapsed();
    server.join().unwrap();
    d
}

fn plain(data: &[u8], total: usize) -> Duration {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let sink = std::thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        let mut buf = vec![0u8; MIB];
        while s.read(&mut buf).unwrap() > 0 {}
        s.write_all(b"k").unwrap();
    });
    let mut s = TcpStream::connect(addr).unwrap();
    let t = Instant::now();
    for _ in 0..total {
        s.write_all(data).unwrap();
    }
    s.shutdown(std::net::Shutdown::Write).unwrap();
    let mut ack = [0u8; 1];
    s.read_exact(&mut ack).unwrap();
    let d = t.elapsed();
    sink.join().unwrap();
    d
}
