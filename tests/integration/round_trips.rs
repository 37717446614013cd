//! How many round trips a sync waits for, counted by a delaying relay on 127.0.0.1 between `blockrep sync` and
//! `blockrep serve` (issue 15 item 4: no lock-step exchanges per block or per batch, and few fixed ones).
//!
//! The relay holds every chunk [`DELAY`] in each direction and stamps it with a round-trip depth: a chunk from
//! the primary gets the depth of the latest answer the primary has been handed, a chunk from the standby one
//! more than the deepest request the standby has been handed. The deepest answer is the number of times the
//! primary had to wait for the standby on the critical path. Work that does not wait for an answer is sent at
//! once, well within the delay, so it is never counted as a turn; the delay only separates cause from
//! coincidence, and the test asserts a count of exchanges, not a time.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::network::Pair;
use super::*;

/// One-way delay of the relay: far longer than the local work of a sync of a few MiB (the primary's scan of
/// 4 MiB after `Begin` must end within a round trip, 0.5 s, also on a loaded host), so that everything sent
/// without waiting leaves before any answer arrives.
const DELAY: Duration = Duration::from_millis(250);

/// The round trips the primary waited for, per connection, in the order the connections ended.
type Counts = Arc<Mutex<Vec<u64>>>;

/// Depths delivered so far on one connection.
#[derive(Default)]
struct Turns {
    /// Deepest chunk handed to the standby.
    to_server: u64,
    /// Deepest chunk handed to the primary.
    to_client: u64,
}

/// Starts the counting relay in front of `target`; returns its address and the counts of finished connections.
fn counting_relay(target: String) -> (String, Counts) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let counts = Counts::default();
    let out = counts.clone();
    std::thread::spawn(move || {
        for client in l.incoming() {
            let Ok(client) = client else { return };
            let server = TcpStream::connect(&target).unwrap();
            let counts = counts.clone();
            std::thread::spawn(move || {
                let turns = Arc::new(Mutex::new(Turns::default()));
                let up = relay(client.try_clone().unwrap(), server.try_clone().unwrap(), turns.clone(), true);
                let down = relay(server, client, turns.clone(), false);
                up.join().unwrap();
                down.join().unwrap();
                let n = turns.lock().unwrap().to_client;
                counts.lock().unwrap().push(n);
            });
        }
    });
    (addr, out)
}

/// One direction: a thread reads and stamps each chunk, another writes it out once [`DELAY`] has passed.
fn relay(
    mut from: TcpStream,
    mut to: TcpStream,
    turns: Arc<Mutex<Turns>>,
    upstream: bool,
) -> std::thread::JoinHandle<()> {
    from.set_nodelay(true).unwrap();
    to.set_nodelay(true).unwrap();
    let (tx, rx) = mpsc::channel::<(Instant, u64, Vec<u8>)>();
    let t = turns.clone();
    let writer = std::thread::spawn(move || {
        for (due, depth, buf) in rx {
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
            {
                // Recorded before the write: nothing the receiver sends in reply can be read before it.
                let mut t = t.lock().unwrap();
                if upstream {
                    t.to_server = t.to_server.max(depth);
                } else {
                    t.to_client = t.to_client.max(depth);
                }
            }
            if to.write_all(&buf).is_err() {
                break;
            }
        }
        let _ = to.shutdown(std::net::Shutdown::Write);
    });
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 256 * 1024];
        loop {
            match from.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    let depth = {
                        let t = turns.lock().unwrap();
                        if upstream {
                            t.to_client
                        } else {
                            t.to_server + 1
                        }
                    };
                    if tx.send((Instant::now() + DELAY, depth, buf[..n].to_vec())).is_err() {
                        break;
                    }
                }
            }
        }
        drop(tx);
        writer.join().unwrap();
    })
}

#[test]
fn an_incremental_sync_of_one_volume_waits_for_at_most_four_round_trips() {
    let mut p = Pair::new(4 << 20);
    p.start_serve();
    let first = p.sync_ok();
    assert_eq!(first["mode"], "full", "{first}");
    // 1 % of the 4 KiB pieces, scattered: several changed 64 KiB blocks to refine, and unchanged ones between.
    let blocks: Vec<u64> = (0..10).map(|i| i * 97 + 5).collect();
    scribble(&p.path("src.img"), &blocks, 3);
    let (relay, counts) = counting_relay(p.addr.clone());
    let o = p.sync_via(&relay, &p.path("key"));
    assert!(o.status.success(), "sync through the relay failed: {}", stderr(&o));
    let r: serde_json::Value = serde_json::from_str(stdout(&o).trim()).unwrap();
    assert_eq!(r["mode"], "incremental", "{r}");
    assert!(p.identical(), "the shadow differs from the source after the sync");
    assert!(r["bytes_sent"].as_u64().unwrap() >= 10 * 4096, "the changes were sent: {r}");
    // The relay records a connection when both directions closed, just after the sync exits.
    let deadline = Instant::now() + Duration::from_secs(10);
    let counts = loop {
        let c = counts.lock().unwrap().clone();
        if !c.is_empty() || Instant::now() > deadline {
            break c;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    // Hello, Auth with the volume's opening behind it, the last refinement answers, the commit. Begin and every
    // refinement batch before the last travel without waiting.
    assert_eq!(counts.len(), 1, "one connection for one volume: {counts:?}");
    eprintln!("an incremental sync of one volume waited for {} round trips", counts[0]);
    assert!(counts[0] <= 4, "the sync waited for {} round trips, at most 4 expected", counts[0]);
    // Hello, Auth and the commit cannot be avoided: fewer means the relay did not count.
    assert!(counts[0] >= 3, "the relay counted {} round trips, fewer than the handshake and commit need", counts[0]);
}
