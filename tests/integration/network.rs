//! `blockrep serve` and `blockrep sync` as two real processes on 127.0.0.1, including every bad input the
//! network issue lists: wrong key, unreachable peer, size mismatch, cut connection (resume), corrupted frames,
//! concurrent syncs of one volume, SIGTERM.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use super::*;

/// Two nodes' files in one temp dir: key, configs, source and shadow volumes.
pub(super) struct Pair {
    dir: tempfile::TempDir,
    pub(super) serve: Option<Child>,
    pub(super) addr: String,
    /// Extra lines for the `[standby]` section.
    pub(super) standby_extra: String,
    /// Extra lines for the `[primary]` section.
    pub(super) primary_extra: String,
    /// Extra sections at the end of both configurations (`[schedule]`, `[monitoring]`, `[role]`).
    pub(super) extra: String,
}

impl Pair {
    pub(super) fn new(size: usize) -> Pair {
        let dir = tempfile::tempdir().unwrap();
        let o = run(blockrep().arg("keygen").arg(dir.path().join("key")));
        assert!(o.status.success(), "keygen: {}", stderr(&o));
        write_volume(&dir.path().join("src.img"), size, 5);
        std::fs::write(dir.path().join("shadow.img"), vec![0u8; size]).unwrap();
        Pair {
            dir,
            serve: None,
            addr: String::new(),
            standby_extra: String::new(),
            primary_extra: String::new(),
            extra: String::new(),
        }
    }

    pub(super) fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub(super) fn config(&self, side: &str, key: &Path, peer: &str) -> PathBuf {
        let state = self.path(&format!("state-{side}"));
        let text = format!(
            "node = \"{side}\"\nkey_file = {key:?}\nstate_dir = {state:?}\n[standby]\nlisten = \"127.0.0.1:0\"\n{}\n\
             [primary]\npeer = \"{peer}\"\n{}\n[[volume]]\nname = \"vol\"\nsource = {:?}\nshadow = {:?}\n{}\n",
            self.standby_extra,
            self.primary_extra,
            self.path("src.img"),
            self.path("shadow.img"),
            self.extra,
        );
        let p = self.path(&format!("{side}-{}.toml", peer.replace([':', '.'], "_")));
        std::fs::write(&p, text).unwrap();
        p
    }

    /// Starts the standby daemon and waits until it listens.
    pub(super) fn start_serve(&mut self) {
        self.start_serve_on("127.0.0.1:0")
    }

    /// Starts the standby daemon on `listen` and waits until it listens.
    pub(super) fn start_serve_on(&mut self, listen: &str) {
        let cfg = self.config("standby", &self.path("key"), "127.0.0.1:1");
        let (child, addr) = spawn_serve(
            blockrep()
                .args(["serve", "--announce", "--listen", listen, "--config"])
                .arg(cfg)
                .env("BLOCKREP_LOG", "info")
                .stderr(Stdio::piped()),
        );
        self.addr = addr;
        self.serve = Some(child);
    }

    pub(super) fn sync_via(&self, peer: &str, key: &Path) -> std::process::Output {
        let cfg = self.config("primary", key, peer);
        run(blockrep().args(["sync", "--json", "--config"]).arg(cfg))
    }

    pub(super) fn sync(&self) -> std::process::Output {
        self.sync_via(&self.addr, &self.path("key"))
    }

    pub(super) fn sync_ok(&self) -> serde_json::Value {
        let o = self.sync();
        assert!(o.status.success(), "sync failed: {}", stderr(&o));
        serde_json::from_str(stdout(&o).trim()).unwrap()
    }

    pub(super) fn identical(&self) -> bool {
        std::fs::read(self.path("src.img")).unwrap() == std::fs::read(self.path("shadow.img")).unwrap()
    }

    /// SIGTERM the daemon; returns its exit status and stderr.
    pub(super) fn stop_serve(&mut self) -> (std::process::ExitStatus, String) {
        let mut child = self.serve.take().unwrap();
        unsafe_free_kill(child.id());
        let mut err = String::new();
        child.stderr.take().unwrap().read_to_string(&mut err).unwrap();
        (child.wait().unwrap(), err)
    }
}

impl Drop for Pair {
    fn drop(&mut self) {
        if let Some(mut c) = self.serve.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn unsafe_free_kill(pid: u32) {
    let st = std::process::Command::new("kill").args(["-TERM", &pid.to_string()]).status().unwrap();
    assert!(st.success());
}

/// A TCP proxy on 127.0.0.1 for one connection at a time: forwards both ways, and in the client→server direction
/// either cuts the connection after `cut_after` bytes or flips one byte at offset `flip_at`.
///
/// A cut closes the primary's side at once but only half-closes the standby's: the standby reads everything
/// forwarded before the cut, its answers are drained, and it sees the end of the stream, not a reset that could
/// discard what it had not read yet. The returned counters: connections accepted, and connections whose standby
/// side has ended (the standby closed it: its session is over).
fn proxy(target: String, cut_after: Option<u64>, flip_at: Option<u64>) -> (String, Arc<[AtomicU64; 2]>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let counts = Arc::new([AtomicU64::new(0), AtomicU64::new(0)]);
    let done = counts.clone();
    std::thread::spawn(move || {
        for client in l.incoming() {
            let Ok(client) = client else { return };
            done[0].fetch_add(1, Ordering::SeqCst);
            let server = TcpStream::connect(&target).unwrap();
            let (mut c2, mut s2) = (client.try_clone().unwrap(), server.try_clone().unwrap());
            let done = done.clone();
            std::thread::spawn(move || {
                // Keep reading the standby's answers after the primary's side is gone, until the standby closes.
                let mut buf = vec![0u8; 16384];
                let mut to_client = true;
                while let Ok(n @ 1..) = s2.read(&mut buf) {
                    to_client = to_client && c2.write_all(&buf[..n]).is_ok();
                }
                let _ = c2.shutdown(std::net::Shutdown::Both);
                done[1].fetch_add(1, Ordering::SeqCst);
            });
            let (mut client, mut server) = (client, server);
            let mut buf = vec![0u8; 16384];
            let mut total = 0u64;
            loop {
                let n = match client.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                let mut n = n;
                if let Some(cut) = cut_after {
                    if total + n as u64 >= cut {
                        n = (cut - total) as usize;
                        let _ = server.write_all(&buf[..n]);
                        let _ = client.shutdown(std::net::Shutdown::Both);
                        break;
                    }
                }
                if let Some(f) = flip_at {
                    if (total..total + n as u64).contains(&f) {
                        buf[(f - total) as usize] ^= 0x40;
                    }
                }
                if server.write_all(&buf[..n]).is_err() {
                    break;
                }
                total += n as u64;
            }
            let _ = server.shutdown(std::net::Shutdown::Write);
        }
    });
    (addr, counts)
}

#[test]
fn full_and_incremental_sync_over_tcp_give_identical_shadow_and_few_bytes_on_the_wire() {
    let mut p = Pair::new(16 << 20);
    p.start_serve();
    let first = p.sync_ok();
    assert!(p.identical());
    assert_eq!(first["generation"], 1);
    for k in ["bytes_on_wire", "compression_ratio", "resumed_bytes", "bytes_sent", "volume"] {
        assert!(first.get(k).is_some(), "missing {k}: {first}");
    }
    // A quarter of the test volume is zero and a quarter repetitive: compression and zero extents pay.
    assert!(first["bytes_on_wire"].as_u64().unwrap() < (16 << 20) * 3 / 5, "{first}");

    let blocks: Vec<u64> = (0..40).map(|i| i * 101 + 7).collect();
    scribble(&p.path("src.img"), &blocks, 77);
    let second = p.sync_ok();
    assert!(p.identical());
    assert_eq!(second["generation"], 2);
    let changed = 40 * 4096u64;
    let wire = second["bytes_on_wire"].as_u64().unwrap();
    assert!(second["bytes_sent"].as_u64().unwrap() <= changed + 4096, "{second}");
    assert!(wire <= changed * 11 / 10 + 8192, "bytes on the wire {wire} for {changed} changed bytes");

    let (st, log) = p.stop_serve();
    assert!(st.success(), "serve exit on SIGTERM: {st}\n{log}");
    assert!(log.contains("generation committed"), "{log}");
}

#[test]
fn compression_level_zero_sends_extents_raw() {
    // The same compressible volume, synced with the default level and with compression off.
    let mut wire = Vec::new();
    for extra in ["", "compression_level = 0"] {
        let mut p = Pair::new(8 << 20);
        p.primary_extra = extra.into();
        p.start_serve();
        let r = p.sync_ok();
        assert!(p.identical());
        wire.push((r["bytes_on_wire"].as_u64().unwrap(), r["compression_ratio"].as_f64().unwrap()));
    }
    let ((on_bytes, on_ratio), (off_bytes, off_ratio)) = (wire[0], wire[1]);
    assert!(on_ratio > 1.3, "default level compresses the repetitive quarter: {wire:?}");
    assert_eq!(off_ratio, 1.0, "level 0 sends every data extent raw: {wire:?}");
    assert!(off_bytes > on_bytes + (1 << 20), "{wire:?}");
}

#[test]
fn wrong_key_is_refused_on_both_sides_and_nothing_is_written() {
    let mut p = Pair::new(1 << 20);
    p.start_serve();
    let other = p.path("other.key");
    assert!(run(blockrep().arg("keygen").arg(&other)).status.success());
    let before = std::fs::read(p.path("shadow.img")).unwrap();
    let o = p.sync_via(&p.addr.clone(), &other);
    assert_eq!(o.status.code(), Some(5), "{}", stderr(&o));
    assert!(stderr(&o).contains("authentication failed"), "{}", stderr(&o));
    assert_eq!(std::fs::read(p.path("shadow.img")).unwrap(), before);
    let (_, log) = p.stop_serve();
    assert!(log.contains("authentication failed"), "standby log: {log}");
}

#[test]
fn unreachable_peer_has_its_own_exit_code_and_names_the_address() {
    let p = Pair::new(1 << 20);
    let free = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().to_string(); // now closed
    let o = p.sync_via(&free, &p.path("key"));
    assert_eq!(o.status.code(), Some(3), "{}", stderr(&o));
    assert!(stderr(&o).contains(&free), "{}", stderr(&o));
}

#[test]
fn shadow_size_mismatch_is_refused_naming_both_sizes() {
    let mut p = Pair::new(2 << 20);
    std::fs::write(p.path("shadow.img"), vec![7u8; 3 << 20]).unwrap();
    p.start_serve();
    let o = p.sync();
    assert_eq!(o.status.code(), Some(1));
    let e = stderr(&o);
    assert!(e.contains(&(2u64 << 20).to_string()) && e.contains(&(3u64 << 20).to_string()), "{e}");
    assert_eq!(std::fs::read(p.path("shadow.img")).unwrap(), vec![7u8; 3 << 20]);
}

#[test]
fn cut_connection_leaves_shadow_at_last_generation_and_next_sync_resumes() {
    let mut p = Pair::new(24 << 20);
    p.start_serve();
    p.sync_ok();
    let gen1 = std::fs::read(p.path("shadow.img")).unwrap();
    // Change a lot (every 4th 4 KiB block) so the transfer is long, then cut it in the middle.
    let blocks: Vec<u64> = (0..(24 << 20) / 4096).step_by(4).collect();
    scribble(&p.path("src.img"), &blocks, 31);
    let (via, ended) = proxy(p.addr.clone(), Some(3 << 20), None);
    let o = p.sync_via(&via, &p.path("key"));
    assert_ne!(o.status.code(), Some(0), "the cut sync must fail");
    // The standby keeps what it spooled before the cut once its session is over; wait for every connection
    // through the proxy to end (the failed sync also asks the standby what it holds).
    let t = std::time::Instant::now();
    while ended[1].load(Ordering::SeqCst) < ended[0].load(Ordering::SeqCst)
        && t.elapsed() < std::time::Duration::from_secs(30)
    {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert!(stderr(&o).contains("the standby keeps its last complete generation 1"), "{}", stderr(&o));
    assert_eq!(std::fs::read(p.path("shadow.img")).unwrap(), gen1, "shadow must still be generation 1");
    let r = p.sync_ok();
    assert!(p.identical());
    assert_eq!(r["generation"], 2);
    assert!(r["resumed_bytes"].as_u64().unwrap() > 0, "the second attempt resumes: {r}");
}

#[test]
fn corrupted_frame_drops_the_connection_and_leaves_the_shadow_intact() {
    let mut p = Pair::new(8 << 20);
    p.start_serve();
    p.sync_ok();
    let gen1 = std::fs::read(p.path("shadow.img")).unwrap();
    scribble(&p.path("src.img"), &(0..512).step_by(3).collect::<Vec<u64>>(), 9);
    // Flip a byte well after the handshake, inside the extent stream.
    let (via, _) = proxy(p.addr.clone(), None, Some(200_000));
    let o = p.sync_via(&via, &p.path("key"));
    assert_ne!(o.status.code(), Some(0));
    assert_eq!(std::fs::read(p.path("shadow.img")).unwrap(), gen1);
    let (_, log) = p.stop_serve();
    assert!(log.contains("crc") || log.contains("MAC") || log.contains("authenticat"), "standby log: {log}");
}

#[test]
fn a_second_concurrent_sync_of_the_same_volume_is_refused() {
    let mut p = Pair::new(1 << 20);
    p.start_serve();
    let key = netproto::load_key(&p.path("key")).unwrap();
    let mut first = netproto::connect(&p.addr, &key, "holder", std::time::Duration::from_secs(5)).unwrap();
    first
        .send(&netproto::Message::OpenVolume(netproto::message::OpenVolume {
            name: "vol".into(),
            source_size: 1 << 20,
            block_size: 65536,
        }))
        .unwrap();
    assert!(matches!(first.recv_expect("info").unwrap(), netproto::Message::VolumeInfo(_)));
    let o = p.sync();
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("another sync of volume vol"), "{}", stderr(&o));
    drop(first);
}

#[test]
fn standby_disk_full_while_spooling_fails_cleanly_and_keeps_the_previous_generation() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipping: mounting a small tmpfs for the standby's state needs root (CI runs as root)");
        return;
    }
    let mut p = Pair::new(8 << 20);
    let state = p.path("state-standby");
    std::fs::create_dir_all(&state).unwrap();
    let st = std::process::Command::new("mount").args(["-t", "tmpfs", "-o", "size=2m", "tmpfs"]).arg(&state).status();
    assert!(st.unwrap().success(), "mount tmpfs");
    struct Umount(PathBuf);
    impl Drop for Umount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg(&self.0).status();
        }
    }
    let _guard = Umount(state.clone());
    p.start_serve();
    p.sync_ok(); // the first full sync writes in place: only the small manifest goes to the state dir
    let gen1 = std::fs::read(p.path("shadow.img")).unwrap();
    // 4 MiB of incompressible changes cannot be spooled in 2 MiB.
    scribble(&p.path("src.img"), &(0..1024).collect::<Vec<u64>>(), 13);
    let o = p.sync();
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let e = stderr(&o);
    assert!(e.contains("free") && e.contains("needs"), "message gives needed and free space: {e}");
    assert_eq!(std::fs::read(p.path("shadow.img")).unwrap(), gen1, "shadow keeps generation 1");
    let (_, log) = p.stop_serve();
    assert!(log.contains("full"), "standby log: {log}");
}
