//! The handshake: version negotiation, then mutual challenge-response authentication with the shared key.
//!
//! ```text
//! client                                              server
//!   Hello{min, max, node, nonce_c}          -->
//!                                           <--   HelloAck{chosen (0: none), min, max, node, nonce_s}
//!   Auth{encryption_c, proofs_c[1..=2]}     -->   finds a proof under one of its keys (the next key first);
//!                                                 none: Error{AUTH} and close; encryption_c differs from its own:
//!                                                 Error{ENCRYPTION} naming both settings, and close
//!                                           <--   AuthOk{proof_s} under the key it found
//!   finds the key proof_s verifies under
//! ```
//!
//! A client that holds one key knows the session key as soon as `HelloAck` is in, so it sends its first request
//! (a sync's `OpenVolume`) right behind `Auth`, under the session key, without waiting for `AuthOk`
//! ([`crate::conn::connect_then`]); the server reads it only after it verified `Auth`, and the client trusts its
//! answer only after `AuthOk`. A sync so waits two round trips for the volume's state, not three. During a key
//! rotation the client does not know which key the server will choose and waits for `AuthOk` first.
//!
//! `transcript = BLAKE3(payload(Hello) || payload(HelloAck))` binds the proofs to the negotiation (a man in the
//! middle cannot downgrade the version or swap names);
//! `proof = keyed_BLAKE3(key, "client" || nonce_c || nonce_s || transcript || encryption_c)` for each key the client
//! holds (its current key, then during a rotation its next key), `proof_s` likewise with `"server"` under the key the
//! server chose; `session = BLAKE3_derive_key("blockrep session v4", key || nonce_c || nonce_s || transcript ||
//! encryption)`. The encryption setting is in every proof, so it cannot be changed on the way either. The server
//! sends nothing derived from a key before it has verified the client's proof. Every later frame carries a MAC
//! under the session key, or with `encryption = "aead"` is encrypted under it (see [`crate::frame`]).
//!
//! Key rotation ([`crate::key`]): the server tries its next key before its current one, so a session runs under
//! the next key as soon as both nodes hold it; each side that sees its peer prove its next key (the server in
//! `Auth`, the client in `AuthOk`) then finishes its rotation ([`KeySet::finish_rotation`]).
//!
//! The negotiation frames (Hello, HelloAck) use header version [`crate::frame::NEGOTIATION_VERSION`]; from
//! `Auth` on, frames carry the chosen version.

use std::io::{Read, Write};

use crate::conn::{ConnError, Connection};
use crate::frame::{MAX_VERSION, MIN_VERSION};
use crate::key::{Key, KeyError, KeySet, KeySlot, KeyStore};
use crate::message::{code, Auth, Encryption, Hello, HelloAck, Message};

/// The message both sides give when the keys differ.
pub const AUTH_FAILED_MESSAGE: &str =
    "authentication failed: the peers do not share the same key (check key_file on both nodes)";

/// Errors of the handshake.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    /// The version ranges do not overlap.
    #[error(
        "peer speaks protocol versions {peer_min}..{peer_max}, this node {ours_min}..{ours_max}; upgrade one side"
    )]
    VersionMismatch {
        /// Peer's lowest version.
        peer_min: u16,
        /// Peer's highest version.
        peer_max: u16,
        /// This node's lowest version.
        ours_min: u16,
        /// This node's highest version.
        ours_max: u16,
    },
    /// The server chose a version that is not the highest common one.
    #[error("the server chose protocol version {chosen}, which is not the highest version both sides speak ({ours_min}..{ours_max} here, {peer_min}..{peer_max} there)")]
    BadChoice {
        /// The server's choice.
        chosen: u16,
        /// Peer's lowest version.
        peer_min: u16,
        /// Peer's highest version.
        peer_max: u16,
        /// This node's lowest version.
        ours_min: u16,
        /// This node's highest version.
        ours_max: u16,
    },
    /// The keys differ (or the peer is an impostor).
    #[error("{AUTH_FAILED_MESSAGE}")]
    AuthFailed,
    /// The nodes' `encryption` settings differ (the message names both).
    #[error("{message}")]
    EncryptionMismatch {
        /// What differs, naming both nodes and settings.
        message: String,
    },
    /// The server could not read its keys.
    #[error("cannot load the key for the handshake with {peer}")]
    Keys {
        /// The peer's node name.
        peer: String,
        /// The key file error.
        #[source]
        source: KeyError,
    },
    /// No random nonce could be had.
    #[error("cannot get random bytes from the operating system for the handshake nonce")]
    Random(#[source] std::io::Error),
}

/// What this node says about itself in the handshake.
#[derive(Debug, Clone)]
pub struct HandshakeOptions {
    node: String,
    min_version: u16,
    max_version: u16,
    encryption: Encryption,
    fixed_nonce: Option<[u8; 32]>,
}

impl HandshakeOptions {
    /// Options for node `node`, speaking every version this build knows.
    pub fn new(node: &str) -> Self {
        HandshakeOptions {
            node: node.to_owned(),
            min_version: MIN_VERSION,
            max_version: MAX_VERSION,
            encryption: Encryption::None,
            fixed_nonce: None,
        }
    }

    /// Encrypts the session (`encryption = "aead"`) or not; both nodes must agree.
    pub fn encryption(mut self, e: Encryption) -> Self {
        self.encryption = e;
        self
    }

    /// Claims to speak versions `min..=max` instead (tests of the negotiation).
    pub fn versions(mut self, min: u16, max: u16) -> Self {
        self.min_version = min;
        self.max_version = max;
        self
    }

    /// Uses a fixed nonce (fuzzing and seed generation only: a repeated nonce lets a recorded session replay).
    #[cfg(feature = "fuzzing")]
    pub(crate) fn fixed_nonce(mut self, nonce: [u8; 32]) -> Self {
        self.fixed_nonce = Some(nonce);
        self
    }

    fn nonce(&self) -> Result<[u8; 32], HandshakeError> {
        if let Some(n) = self.fixed_nonce {
            return Ok(n);
        }
        let mut n = [0u8; 32];
        getrandom::getrandom(&mut n).map_err(|e| HandshakeError::Random(std::io::Error::other(e.to_string())))?;
        Ok(n)
    }
}

/// The highest version in both ranges, if any.
pub fn negotiate(ours: (u16, u16), theirs: (u16, u16)) -> Option<u16> {
    let lo = ours.0.max(theirs.0);
    let hi = ours.1.min(theirs.1);
    (lo <= hi).then_some(hi)
}

fn transcript(hello: &Hello, ack: &HelloAck) -> Result<[u8; 32], ConnError> {
    let mut h = blake3::Hasher::new();
    for m in [Message::Hello(hello.clone()), Message::HelloAck(ack.clone())] {
        let (head, body) = m.encode(None)?;
        h.update(&head);
        h.update(&body);
    }
    Ok(*h.finalize().as_bytes())
}

fn proof(key: &Key, label: &[u8], nc: &[u8; 32], ns: &[u8; 32], transcript: &[u8; 32], e: Encryption) -> blake3::Hash {
    let mut h = blake3::Hasher::new_keyed(key.as_bytes());
    h.update(label);
    h.update(nc);
    h.update(ns);
    h.update(transcript);
    h.update(&[e.code()]);
    h.finalize()
}

fn session_key(key: &Key, nc: &[u8; 32], ns: &[u8; 32], transcript: &[u8; 32], e: Encryption) -> [u8; 32] {
    let mut h = blake3::Hasher::new_derive_key("blockrep session v4");
    h.update(key.as_bytes());
    h.update(nc);
    h.update(ns);
    h.update(transcript);
    h.update(&[e.code()]);
    *h.finalize().as_bytes()
}

/// The message both sides give when the encryption settings differ.
fn encryption_mismatch(client: &str, c: Encryption, server: &str, s: Encryption) -> String {
    format!(
        "encryption differs: node {client} (connecting) has encryption = \"{c}\", node {server} has encryption = \"{s}\"; \
         set the same `encryption` in the configuration of both nodes"
    )
}

/// After the peer proved this node's next key: finishes the rotation on disk, logged either way (a failure does not
/// end the session, which runs under the new key; the next session tries again).
fn finish_rotation(keys: &KeySet, peer: &str) -> Option<Result<bool, String>> {
    let r = keys.finish_rotation();
    let file = keys.file().map(|p| p.display().to_string()).unwrap_or_default();
    let id = crate::key::key_id(keys.get(KeySlot::Next));
    match &r {
        Ok(true) => {
            tracing::info!(%peer, key_file = %file, key_id = %id, "key rotation finished: the peer proved the next key, which is now the current key")
        }
        Ok(false) => {}
        Err(e) => tracing::warn!(%peer, key_file = %file, "{}", link::error_chain(e)),
    }
    Some(r.map_err(|e| link::error_chain(&e)))
}

/// The client's side; with `first`, also sends the session's first request: right behind `Auth` when this node
/// holds one key (the session key is then known before the standby's proof arrives), else after `AuthOk`.
pub(crate) fn run_client_then<S: Read + Write>(
    conn: &mut Connection<S>,
    keys: &KeySet,
    opts: &HandshakeOptions,
    first: Option<&Message>,
) -> Result<(), ConnError> {
    let ours = (opts.min_version, opts.max_version);
    let hello = Hello { min_version: ours.0, max_version: ours.1, node: opts.node.clone(), nonce: opts.nonce()? };
    conn.send(&Message::Hello(hello.clone()))?;
    let ack = match conn.recv_expect("the standby's answer to Hello")? {
        Message::HelloAck(a) => a,
        m => return Err(ConnError::Unexpected { expected: "HelloAck", got: m.frame_type() }),
    };
    let theirs = (ack.min_version, ack.max_version);
    let mismatch =
        HandshakeError::VersionMismatch { peer_min: theirs.0, peer_max: theirs.1, ours_min: ours.0, ours_max: ours.1 };
    match negotiate(ours, theirs) {
        None => return Err(mismatch.into()),
        Some(v) if v == ack.version => {}
        Some(_) => {
            return Err(HandshakeError::BadChoice {
                chosen: ack.version,
                peer_min: theirs.0,
                peer_max: theirs.1,
                ours_min: ours.0,
                ours_max: ours.1,
            }
            .into())
        }
    }
    conn.set_version(ack.version);
    let t = transcript(&hello, &ack)?;
    let enc = opts.encryption;
    let proofs =
        keys.slots().map(|(_, k)| *proof(k, b"client", &hello.nonce, &ack.nonce, &t, enc).as_bytes()).collect();
    conn.send(&Message::Auth(Auth { encryption: enc, proofs }))?;
    // One key: the session key is known now, so the first request goes behind Auth (the standby reads it only
    // after verifying Auth). A failed write is kept: the standby may have refused Auth and closed, and its
    // refusal, read next, says more.
    let mut pipelined = None;
    if let (Some(m), 1) = (first, keys.slots().count()) {
        let key = keys.get(KeySlot::Current);
        conn.establish_send(ack.version, session_key(key, &hello.nonce, &ack.nonce, &t, enc), enc);
        pipelined = Some(conn.send_unchecked(m));
    }
    let slot = match conn.recv() {
        Ok(Some(Message::AuthOk(p))) => {
            // blake3::Hash compares in constant time.
            let p = blake3::Hash::from(p);
            let found = keys.slots().find(|(_, k)| proof(k, b"server", &hello.nonce, &ack.nonce, &t, enc) == p);
            match found {
                Some((slot, _)) => slot,
                None => return Err(HandshakeError::AuthFailed.into()),
            }
        }
        Ok(Some(Message::Error(e))) if e.code == code::AUTH && e.message == AUTH_FAILED_MESSAGE => {
            return Err(HandshakeError::AuthFailed.into())
        }
        Ok(Some(Message::Error(e))) if e.code == code::ENCRYPTION => {
            return Err(HandshakeError::EncryptionMismatch { message: e.message }.into())
        }
        Ok(Some(Message::Error(e))) => return Err(ConnError::Remote { code: e.code, message: e.message }),
        Ok(Some(m)) => return Err(ConnError::Unexpected { expected: "AuthOk", got: m.frame_type() }),
        Ok(None) => return Err(ConnError::Closed { waiting_for: "the standby's answer to Auth" }),
        Err(e) => return Err(e),
    };
    let key = keys.get(slot);
    conn.establish(ack.version, session_key(key, &hello.nonce, &ack.nonce, &t, enc), ack.node.clone(), enc, slot);
    if slot == KeySlot::Next {
        conn.rotation = finish_rotation(keys, &ack.node);
    }
    match (pipelined, first) {
        (Some(sent), _) => sent,
        (None, Some(m)) => conn.send(m),
        (None, None) => Ok(()),
    }
}

pub(crate) fn run_server<S: Read + Write>(
    conn: &mut Connection<S>,
    store: &dyn KeyStore,
    opts: &HandshakeOptions,
) -> Result<(), ConnError> {
    let hello = match conn.recv_expect("the client's Hello")? {
        Message::Hello(h) => h,
        m => {
            conn.send_error(code::PROTOCOL, &format!("expected Hello, got {}", m.frame_type()));
            return Err(ConnError::Unexpected { expected: "Hello", got: m.frame_type() });
        }
    };
    let ours = (opts.min_version, opts.max_version);
    let theirs = (hello.min_version, hello.max_version);
    let chosen = negotiate(ours, theirs);
    let ack = HelloAck {
        version: chosen.unwrap_or(0),
        min_version: ours.0,
        max_version: ours.1,
        node: opts.node.clone(),
        nonce: opts.nonce()?,
    };
    conn.send(&Message::HelloAck(ack.clone()))?;
    let Some(version) = chosen else {
        return Err(HandshakeError::VersionMismatch {
            peer_min: theirs.0,
            peer_max: theirs.1,
            ours_min: ours.0,
            ours_max: ours.1,
        }
        .into());
    };
    conn.set_version(version);
    let t = transcript(&hello, &ack)?;
    let auth = match conn.recv_expect("the client's Auth")? {
        Message::Auth(a) => a,
        m => {
            conn.send_error(code::PROTOCOL, &format!("expected Auth, got {}", m.frame_type()));
            return Err(ConnError::Unexpected { expected: "Auth", got: m.frame_type() });
        }
    };
    // Read the keys now (not at start): a next key copied in while the daemon runs is used at once.
    let keys = match store.keys_for(&hello.node) {
        Ok(k) => k,
        Err(source @ KeyError::UnknownPeer { .. }) => {
            // Names are not secret; the peer learns that this standby does not protect it, and nothing else.
            conn.send_error(code::AUTH, &source.to_string());
            return Err(HandshakeError::Keys { peer: hello.node, source }.into());
        }
        Err(source) => {
            conn.send_error(code::FAILED, &format!("standby {} cannot load its key; see its log", opts.node));
            return Err(HandshakeError::Keys { peer: hello.node, source }.into());
        }
    };
    let (nc, ns, enc) = (&hello.nonce, &ack.nonce, auth.encryption);
    // The next key first: the first session in which both nodes hold it runs under it.
    let found = keys.slots().rev().find(|(_, k)| {
        let expected = proof(k, b"client", nc, ns, &t, enc);
        // blake3::Hash compares in constant time.
        auth.proofs.iter().fold(false, |any, p| any | (expected == blake3::Hash::from(*p)))
    });
    let Some((slot, key)) = found else {
        conn.send_error(code::AUTH, AUTH_FAILED_MESSAGE);
        return Err(HandshakeError::AuthFailed.into());
    };
    if enc != opts.encryption {
        let message = encryption_mismatch(&hello.node, enc, &opts.node, opts.encryption);
        conn.send_error(code::ENCRYPTION, &message);
        return Err(HandshakeError::EncryptionMismatch { message }.into());
    }
    let proof_s = proof(key, b"server", nc, ns, &t, enc);
    conn.send(&Message::AuthOk(*proof_s.as_bytes()))?;
    conn.establish(version, session_key(key, nc, ns, &t, enc), hello.node.clone(), enc, slot);
    if slot == KeySlot::Next {
        conn.rotation = finish_rotation(&keys, &hello.node);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn negotiation_picks_the_highest_common_version() {
        assert_eq!(negotiate((1, 3), (2, 5)), Some(3));
        assert_eq!(negotiate((1, 1), (1, 1)), Some(1));
        assert_eq!(negotiate((1, 1), (2, 2)), None);
        assert_eq!(negotiate((3, 1), (1, 3)), None, "an empty range matches nothing");
    }

    #[test]
    fn proofs_differ_by_role_key_and_transcript() {
        let k = Key([1; 32]);
        let (nc, ns, t, e) = ([2; 32], [3; 32], [4; 32], Encryption::None);
        let c = proof(&k, b"client", &nc, &ns, &t, e);
        assert_ne!(c, proof(&k, b"server", &nc, &ns, &t, e));
        assert_ne!(c, proof(&Key([9; 32]), b"client", &nc, &ns, &t, e));
        assert_ne!(c, proof(&k, b"client", &nc, &ns, &[5; 32], e));
        assert_ne!(c, proof(&k, b"client", &nc, &ns, &t, Encryption::Aead));
        assert_ne!(session_key(&k, &nc, &ns, &t, e), session_key(&k, &ns, &nc, &t, e));
        assert_ne!(session_key(&k, &nc, &ns, &t, e), session_key(&k, &nc, &ns, &t, Encryption::Aead));
    }
}
