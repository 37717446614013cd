//! Key rotation and session encryption with `blockrep serve` and `blockrep sync` as real processes on 127.0.0.1:
//! syncs before, during and after a rotation, the old key refused afterwards; with `encryption = "aead"` a recording
//! proxy sees none of a known plaintext pattern of the volume (and does see it without), and a ciphertext byte
//! altered on the way fails the sync and leaves the shadow at its last generation.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::{Arc, Mutex};

use netproto::Key;

use super::*;

const SIZE: usize = 4 << 20;

/// 64 bytes that appear many times in the test volume.
fn pattern() -> [u8; 64] {
    let mut p = [0u8; 64];
    p.copy_from_slice(b"<<blockrep known plaintext: must never cross the wire in clear>>");
    p
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// A primary and a standby with their own key files in one temp dir.
struct Nodes {
    dir: tempfile::TempDir,
    serve: Option<Child>,
    addr: String,
}

impl Nodes {
    /// Fresh nodes sharing one new key; the source holds [`pattern`] at every 4 KiB.
    fn new() -> Nodes {
        let dir = tempfile::tempdir().unwrap();
        let n = Nodes { dir, serve: None, addr: String::new() };
        let o = run(blockrep().arg("keygen").arg(n.path("primary.key")));
        assert!(o.status.success(), "keygen: {}", stderr(&o));
        copy_key(&n.path("primary.key"), &n.path("standby.key"));
        write_volume(&n.path("src.img"), SIZE, 11);
        let mut v = std::fs::read(n.path("src.img")).unwrap();
        for chunk in v.chunks_mut(4096) {
            chunk[..64].copy_from_slice(&pattern());
        }
        std::fs::write(n.path("src.img"), v).unwrap();
        std::fs::write(n.path("shadow.img"), vec![0u8; SIZE]).unwrap();
        n
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// A configuration for `side` with key file `key`, `encryption` and the standby at `peer`; zstd is off so that
    /// the volume's bytes would be on the wire as they are.
    fn config(&self, side: &str, key: &Path, encryption: &str, peer: &str) -> PathBuf {
        let text = format!(
            "node = \"{side}\"\nkey_file = {key:?}\nencryption = \"{encryption}\"\nstate_dir = {:?}\n\
             [standby]\nlisten = \"127.0.0.1:0\"\n[primary]\npeer = \"{peer}\"\ncompression_level = 0\n\
             [[volume]]\nname = \"vol\"\nsource = {:?}\nshadow = {:?}\n",
            self.path(&format!("state-{side}")),
            self.path("src.img"),
            self.path("shadow.img"),
        );
        let p = self.path(&format!("{side}.toml"));
        std::fs::write(&p, text).unwrap();
        p
    }

    fn start_serve(&mut self, encryption: &str) {
        let cfg = self.config("standby", &self.path("standby.key"), encryption, "127.0.0.1:1");
        let (child, addr) = spawn_serve(
            blockrep()
                .args(["serve", "--announce", "--config"])
                .arg(cfg)
                .env("BLOCKREP_LOG", "info")
                .stderr(Stdio::piped()),
        );
        self.addr = addr;
        self.serve = Some(child);
    }

    /// SIGTERM the daemon; returns its log.
    fn stop_serve(&mut self) -> String {
        let mut child = self.serve.take().unwrap();
        let st = std::process::Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
        assert!(st.success());
        let mut err = String::new();
        child.stderr.take().unwrap().read_to_string(&mut err).unwrap();
        child.wait().unwrap();
        err
    }

    fn sync_with(&self, peer: &str, key: &Path, encryption: &str) -> std::process::Output {
        let cfg = self.config("primary", key, encryption, peer);
        run(blockrep().args(["sync", "--json", "--config"]).arg(cfg))
    }

    fn sync_ok(&self, encryption: &str) -> serde_json::Value {
        let o = self.sync_with(&self.addr, &self.path("primary.key"), encryption);
        assert!(o.status.success(), "sync failed: {}", stderr(&o));
        serde_json::from_str(stdout(&o).trim()).unwrap()
    }

    fn status(&self) -> serde_json::Value {
        let cfg = self.config("primary", &self.path("primary.key"), "none", &self.addr);
        let o = run(blockrep().args(["status", "--json", "--config"]).arg(cfg));
        serde_json::from_str(stdout(&o).trim()).unwrap_or_else(|e| panic!("status: {e}: {}", stderr(&o)))
    }

    fn identical(&self) -> bool {
        std::fs::read(self.path("src.img")).unwrap() == std::fs::read(self.path("shadow.img")).unwrap()
    }

    fn key(&self, name: &str) -> Key {
        netproto::load_key(&self.path(name)).unwrap()
    }
}

impl Drop for Nodes {
    fn drop(&mut self) {
        if let Some(mut c) = self.serve.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Copies a key file as an operator would (`scp`, then `chmod 600`).
fn copy_key(from: &Path, to: &Path) {
    std::fs::copy(from, to).unwrap();
    std::fs::set_permissions(to, std::fs::Permissions::from_mode(0o600)).unwrap();
}

#[test]
fn key_rotation_keeps_syncs_working_before_during_and_after_and_then_refuses_the_old_key() {
    let mut n = Nodes::new();
    n.start_serve("none");
    let k0 = n.key("primary.key");
    // Before.
    assert_eq!(n.sync_ok("none")["generation"], 1);
    assert!(n.identical());
    let st = n.status();
    assert_eq!(st["key"]["rotation"], "none", "{st}");
    assert_eq!(st["key"]["id"], netproto::key_id(&k0).as_str());

    // Only the primary has the next key.
    let o = run(blockrep().args(["keygen", "--rotate"]).arg(n.path("primary.key")));
    assert!(o.status.success(), "keygen --rotate: {}", stderr(&o));
    let next = n.path("primary.key.next");
    assert_eq!(std::fs::metadata(&next).unwrap().permissions().mode() & 0o777, 0o600);
    let k1 = n.key("primary.key.next");
    assert!(stdout(&o).contains(&netproto::key_id(&k1)), "{}", stdout(&o));
    let o = run(blockrep().args(["keygen", "--rotate"]).arg(n.path("primary.key")));
    assert_eq!(o.status.code(), Some(2), "a second --rotate must not replace the next key");
    assert!(stderr(&o).contains("--force"), "{}", stderr(&o));
    assert_eq!(n.key("primary.key.next"), k1);
    scribble(&n.path("src.img"), &[3, 50, 700], 1);
    assert_eq!(n.sync_ok("none")["generation"], 2);
    assert!(n.identical());
    assert_eq!((n.key("primary.key"), next.exists()), (k0.clone(), true), "the standby has not proved the new key");
    let st = n.status();
    assert_eq!(st["key"]["rotation"], "pending", "{st}");
    assert_eq!(st["key"]["next_id"], netproto::key_id(&k1).as_str());

    // Both have it (copied while serve runs): the sync runs under it and finishes the rotation on both nodes.
    copy_key(&next, &n.path("standby.key.next"));
    scribble(&n.path("src.img"), &[4, 51, 701], 2);
    assert_eq!(n.sync_ok("none")["generation"], 3);
    assert!(n.identical());
    for side in ["primary", "standby"] {
        assert_eq!(n.key(&format!("{side}.key")), k1, "{side} holds the new key");
        assert!(!n.path(&format!("{side}.key.next")).exists(), "{side} finished its rotation");
    }
    let st = n.status();
    assert_eq!((&st["key"]["rotation"], &st["key"]["id"]), (&"none".into(), &netproto::key_id(&k1).into()));

    // A crash between the two nodes' finishing steps: the standby finished (only the new key), the primary still
    // holds both. Syncs go on, and the primary finishes at the next one.
    let o = run(blockrep().args(["keygen", "--rotate"]).arg(n.path("standby.key")));
    assert!(o.status.success(), "{}", stderr(&o));
    let k2 = n.key("standby.key.next");
    copy_key(&n.path("standby.key.next"), &n.path("primary.key.next"));
    std::fs::rename(n.path("standby.key.next"), n.path("standby.key")).unwrap();
    scribble(&n.path("src.img"), &[5, 52, 702], 3);
    assert_eq!(n.sync_ok("none")["generation"], 4);
    assert!(n.identical());
    assert_eq!((n.key("primary.key"), n.path("primary.key.next").exists()), (k2.clone(), false));

    // Status shows the confirmation when its own probe is the first session under the next key.
    let o = run(blockrep().args(["keygen", "--rotate"]).arg(n.path("primary.key")));
    assert!(o.status.success(), "{}", stderr(&o));
    let k3 = n.key("primary.key.next");
    copy_key(&n.path("primary.key.next"), &n.path("standby.key.next"));
    let st = n.status();
    assert_eq!(st["key"]["rotation"], "confirmed", "{st}");
    assert_eq!(st["key"]["id"], netproto::key_id(&k3).as_str(), "{st}");
    assert_eq!((n.key("primary.key"), n.key("standby.key")), (k3.clone(), k3));

    // After.
    scribble(&n.path("src.img"), &[6, 53, 703], 4);
    assert_eq!(n.sync_ok("none")["generation"], 5);
    assert!(n.identical());
    // Every old key is refused with the usual message and exit code.
    for (i, old) in [k0, k1, k2].iter().enumerate() {
        let p = n.path(&format!("old{i}.key"));
        std::fs::write(&p, old.0).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        let o = n.sync_with(&n.addr, &p, "none");
        assert_eq!(o.status.code(), Some(5), "old key {i}: {}", stderr(&o));
        assert!(stderr(&o).contains("the peers do not share the same key"), "{}", stderr(&o));
    }
    assert!(n.identical(), "a refused sync writes nothing");
}

/// A TCP proxy on 127.0.0.1 that forwards whole frames both ways and records what the client sends; with
/// `tamper`, it flips one byte in the payload of the first large Extent frame and recomputes the frame's crc, as
/// an attacker on the path would.
fn recording_proxy(target: String, tamper: bool) -> (String, Arc<Mutex<Vec<u8>>>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let log = Arc::new(Mutex::new(Vec::new()));
    let rec = log.clone();
    std::thread::spawn(move || {
        let mut tampered = false;
        for client in l.incoming() {
            let Ok(mut client) = client else { return };
            let mut server = TcpStream::connect(&target).unwrap();
            let (mut c2, mut s2) = (client.try_clone().unwrap(), server.try_clone().unwrap());
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut s2, &mut c2);
                let _ = c2.shutdown(std::net::Shutdown::Both);
            });
            let mut pending = Vec::new();
            let mut buf = vec![0u8; 65536];
            loop {
                let n = match client.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                rec.lock().unwrap().extend_from_slice(&buf[..n]);
                pending.extend_from_slice(&buf[..n]);
                while let Ok(Some(len)) = netproto::frame::check(&pending) {
                    let mut f: Vec<u8> = pending.drain(..len).collect();
                    let extent = f[6] == netproto::frame::FrameType::Extent as u8;
                    if tamper && !tampered && extent && len > 24 + 16 + 4096 {
                        f[24 + 2000] ^= 0x01;
                        let crc = crc32(&f[24..len - 16]);
                        f[20..24].copy_from_slice(&crc.to_le_bytes());
                        tampered = true;
                    }
                    if server.write_all(&f).is_err() {
                        break;
                    }
                }
            }
            let _ = server.shutdown(std::net::Shutdown::Both);
        }
    });
    (addr, log)
}

/// CRC-32 (IEEE), as in the frame header.
fn crc32(data: &[u8]) -> u32 {
    let mut c = !0u32;
    for &b in data {
        c ^= b as u32;
        for _ in 0..8 {
            c = if c & 1 != 0 { (c >> 1) ^ 0xedb8_8320 } else { c >> 1 };
        }
    }
    !c
}

#[test]
fn encryption_hides_the_volume_on_the_wire_and_an_altered_byte_fails_the_sync() {
    // Without encryption the pattern is on the wire (so this test can fail).
    let mut plain = Nodes::new();
    plain.start_serve("none");
    let (via, wire) = recording_proxy(plain.addr.clone(), false);
    let o = plain.sync_with(&via, &plain.path("primary.key"), "none");
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(plain.identical());
    assert!(contains(&wire.lock().unwrap(), &pattern()), "the MAC'd stream carries the volume in clear");
    drop(plain);

    let mut n = Nodes::new();
    n.start_serve("aead");
    // A mismatch is refused in the handshake, naming both settings.
    let o = n.sync_with(&n.addr, &n.path("primary.key"), "none");
    assert_eq!(o.status.code(), Some(5), "{}", stderr(&o));
    let e = stderr(&o);
    assert!(e.contains("has encryption = \"none\"") && e.contains("has encryption = \"aead\""), "{e}");

    let (via, wire) = recording_proxy(n.addr.clone(), false);
    let o = n.sync_with(&via, &n.path("primary.key"), "aead");
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(n.identical());
    let wire = wire.lock().unwrap().clone();
    assert!(wire.len() > SIZE / 2, "the data went through the proxy ({} bytes)", wire.len());
    assert!(!contains(&wire, &pattern()), "a 64-byte plaintext pattern of the volume crossed the wire in clear");

    // One ciphertext byte altered (with a fixed-up crc): the sync fails and the shadow keeps generation 1.
    let gen1 = std::fs::read(n.path("shadow.img")).unwrap();
    scribble(&n.path("src.img"), &(0..1024).step_by(5).collect::<Vec<u64>>(), 7);
    let (via, _) = recording_proxy(n.addr.clone(), true);
    let o = n.sync_with(&via, &n.path("primary.key"), "aead");
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let e = stderr(&o);
    assert!(
        e.contains("the standby keeps its last complete generation 1") && e.contains("bad ChaCha20-Poly1305 tag"),
        "{e}"
    );
    assert_eq!(std::fs::read(n.path("shadow.img")).unwrap(), gen1, "the shadow left its last generation");
    // The next sync, untouched, commits generation 2.
    assert_eq!(n.sync_ok("aead")["generation"], 2);
    assert!(n.identical());
    let log = n.stop_serve();
    assert!(
        log.contains("fails decryption (bad ChaCha20-Poly1305 tag): it was forged or altered"),
        "standby log: {log}"
    );
}
