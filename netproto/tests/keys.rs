//! Key rotation and encryption in the handshake, over real TCP sockets on 127.0.0.1.

use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::thread::{self, JoinHandle};
use std::time::Duration;

use bytes::Bytes;
use netproto::message::{Extent, ExtentData};
use netproto::{
    ConnError, Connection, Encryption, HandshakeError, HandshakeOptions, Key, KeyFile, KeySet, KeySlot, KeyStore,
    Message,
};

const K0: Key = Key([0x10; 32]);
const K1: Key = Key([0x11; 32]);
const TIMEOUT: Duration = Duration::from_secs(20);

/// Runs one handshake between a server holding `server` and a client holding `client`; returns both outcomes
/// (the server's connection is kept for `body`, which must not wait for the client).
fn handshake<T: Send + 'static>(
    server: impl KeyStore + 'static,
    server_enc: Encryption,
    client: KeySet,
    client_enc: Encryption,
    body: impl FnOnce(Connection) -> T + Send + 'static,
) -> (Result<Connection, ConnError>, Result<T, ConnError>) {
    let (c, h) = spawn_handshake(server, server_enc, client, client_enc, body);
    (c, h.join().unwrap())
}

/// [`handshake`] with the server still running `body`.
fn spawn_handshake<T: Send + 'static>(
    server: impl KeyStore + 'static,
    server_enc: Encryption,
    client: KeySet,
    client_enc: Encryption,
    body: impl FnOnce(Connection) -> T + Send + 'static,
) -> (Result<Connection, ConnError>, JoinHandle<Result<T, ConnError>>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let h: JoinHandle<Result<T, ConnError>> = thread::spawn(move || {
        let (s, _) = l.accept().unwrap();
        let opts = HandshakeOptions::new("standby").encryption(server_enc);
        Ok(body(netproto::accept_handshake_with(s, &server, &opts)?))
    });
    let opts = HandshakeOptions::new("primary").encryption(client_enc);
    (netproto::connect_with(&addr, &client, &opts, TIMEOUT), h)
}

fn slot(c: Connection) -> KeySlot {
    c.key_slot()
}

#[test]
fn either_key_authenticates_during_a_rotation_and_the_next_key_wins() {
    let none = Encryption::None;
    // Only the server holds the next key: the current key is used.
    let (c, s) = handshake(KeySet::with_next(K0, K1), none, KeySet::single(K0), none, slot);
    assert_eq!((c.unwrap().key_slot(), s.unwrap()), (KeySlot::Current, KeySlot::Current));
    // Only the client holds it.
    let (c, s) = handshake(KeySet::single(K0), none, KeySet::with_next(K0, K1), none, slot);
    assert_eq!((c.unwrap().key_slot(), s.unwrap()), (KeySlot::Current, KeySlot::Current));
    // Both: the session runs under the next key on both sides.
    let (c, s) = handshake(KeySet::with_next(K0, K1), none, KeySet::with_next(K0, K1), none, slot);
    assert_eq!((c.unwrap().key_slot(), s.unwrap()), (KeySlot::Next, KeySlot::Next));
    // One side finished (holds only the new key), the other not yet.
    let (c, s) = handshake(KeySet::single(K1), none, KeySet::with_next(K0, K1), none, slot);
    assert_eq!((c.unwrap().key_slot(), s.unwrap()), (KeySlot::Next, KeySlot::Current));
    let (c, s) = handshake(KeySet::with_next(K0, K1), none, KeySet::single(K1), none, slot);
    assert_eq!((c.unwrap().key_slot(), s.unwrap()), (KeySlot::Current, KeySlot::Next));
    // Both finished: the old key is refused with the usual message on both sides.
    let (c, s) = handshake(KeySet::single(K1), none, KeySet::single(K0), none, slot);
    let (c, s) = (c.unwrap_err(), s.unwrap_err());
    assert!(matches!(c, ConnError::Handshake(HandshakeError::AuthFailed)), "{c:?}");
    assert!(matches!(s, ConnError::Handshake(HandshakeError::AuthFailed)), "{s:?}");
    assert_eq!(c.to_string(), netproto::handshake::AUTH_FAILED_MESSAGE);
}

fn tmpdir() -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("netproto-keys-{}-{:?}", std::process::id(), thread::current().id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir(&d).unwrap();
    d
}

fn write_key(path: &std::path::Path, k: &Key) {
    std::fs::write(path, k.0).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
}

#[test]
fn a_handshake_under_the_next_key_finishes_the_rotation_on_both_nodes() {
    let d = tmpdir();
    let (sk, ck) = (d.join("standby.key"), d.join("primary.key"));
    for p in [&sk, &ck] {
        write_key(p, &K0);
    }
    // Only the primary has the next key: nothing changes on disk.
    write_key(&netproto::next_key_path(&ck), &K1);
    let none = Encryption::None;
    let (c, s) = handshake(KeyFile(sk.clone()), none, KeySet::load(&ck).unwrap(), none, slot);
    assert_eq!((c.unwrap().key_slot(), s.unwrap()), (KeySlot::Current, KeySlot::Current));
    assert!(netproto::next_key_path(&ck).exists());
    // The standby gets it too (copied while it runs: the key file is read per handshake).
    write_key(&netproto::next_key_path(&sk), &K1);
    let (c, s) = handshake(KeyFile(sk.clone()), none, KeySet::load(&ck).unwrap(), none, |c| c.rotation().cloned());
    let c = c.unwrap();
    assert_eq!(c.key_slot(), KeySlot::Next);
    assert_eq!(c.rotation(), Some(&Ok(true)));
    assert_eq!(s.unwrap(), Some(Ok(true)));
    for p in [&sk, &ck] {
        assert_eq!(netproto::load_key(p).unwrap(), K1, "{} holds the new key", p.display());
        assert!(!netproto::next_key_path(p).exists());
    }
    // Afterwards the new key is current on both sides.
    let (c, s) = handshake(KeyFile(sk.clone()), none, KeySet::load(&ck).unwrap(), none, slot);
    assert_eq!((c.unwrap().key_slot(), s.unwrap()), (KeySlot::Current, KeySlot::Current));
    std::fs::remove_dir_all(d).unwrap();
}

#[test]
fn encryption_mismatch_is_refused_naming_both_settings() {
    let (c, s) = handshake(KeySet::single(K0), Encryption::None, KeySet::single(K0), Encryption::Aead, slot);
    let want = "encryption differs: node primary (connecting) has encryption = \"aead\", node standby has \
                encryption = \"none\"; set the same `encryption` in the configuration of both nodes";
    let (c, s) = (c.unwrap_err(), s.unwrap_err());
    assert!(matches!(c, ConnError::Handshake(HandshakeError::EncryptionMismatch { .. })), "{c:?}");
    assert_eq!((c.to_string(), s.to_string()), (want.to_owned(), want.to_owned()));
    // A wrong key is still reported as a wrong key, whatever the encryption.
    let (c, _) = handshake(KeySet::single(K1), Encryption::None, KeySet::single(K0), Encryption::Aead, slot);
    assert!(matches!(c.unwrap_err(), ConnError::Handshake(HandshakeError::AuthFailed)));
}

#[test]
fn an_encrypted_session_carries_messages_both_ways() {
    let aead = Encryption::Aead;
    let data = Bytes::from(b"sixty-four bytes of plaintext that must not be seen on the wire!".repeat(64));
    let (c, s) = spawn_handshake(KeySet::single(K0), aead, KeySet::single(K0), aead, |mut conn| {
        let mut got = Vec::new();
        while let Ok(Some(m)) = conn.recv() {
            got.push(m);
            conn.send(&Message::Keepalive).unwrap();
        }
        (conn.encryption(), got)
    });
    let mut c = c.unwrap();
    assert_eq!(c.encryption(), aead);
    let extent = Message::Extent(Extent { offset: 0, len: data.len() as u64, data: ExtentData::Data(data) });
    for _ in 0..3 {
        c.send(&extent).unwrap();
        assert_eq!(c.recv().unwrap(), Some(Message::Keepalive));
    }
    c.get_ref().shutdown(std::net::Shutdown::Write).unwrap();
    let (enc, got) = s.join().unwrap().unwrap();
    assert_eq!(enc, aead);
    assert_eq!(got, vec![extent.clone(), extent.clone(), extent]);
}
