//! The handshake: version negotiation, then mutual challenge-response authentication with the shared key.
//!
//! ```text
//! client                                              server
//!   Hello{min, max, node, nonce_c}          -->
//!                                           <--   HelloAck{chosen (0: none), min, max, node, nonce_s}
//!   Auth{proof_c}                           -->   checks proof_c; on mismatch: Error{AUTH} and close
//!                                           <--   AuthOk{proof_s}
//!   checks proof_s
//! ```
//!
//! `transcript = BLAKE3(payload(Hello) || payload(HelloAck))` binds the proofs to the negotiation (a man in the
//! middle cannot downgrade the version or swap names);
//! `proof_c = keyed_BLAKE3(key, "client" || nonce_c || nonce_s || transcript)`, `proof_s` likewise with
//! `"server"`; `session = BLAKE3_derive_key("blockrep session v1", key || nonce_c || nonce_s || transcript)`.
//! The server sends nothing derived from the key before it has verified the client's proof. Every later frame
//! carries a MAC under the session key (see [`crate::frame`]).
//!
//! The negotiation frames (Hello, HelloAck) use header version [`crate::frame::NEGOTIATION_VERSION`]; from
//! `Auth` on, frames carry the chosen version.

use std::io::{Read, Write};

use crate::conn::{ConnError, Connection};
use crate::frame::{MAX_VERSION, MIN_VERSION};
use crate::key::Key;
use crate::message::{code, Hello, HelloAck, Message};

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
    fixed_nonce: Option<[u8; 32]>,
}

impl HandshakeOptions {
    /// Options for node `node`, speaking every version this build knows.
    pub fn new(node: &str) -> Self {
        HandshakeOptions {
            node: node.to_owned(),
            min_version: MIN_VERSION,
            max_version: MAX_VERSION,
            fixed_nonce: None,
        }
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

fn proof(key: &Key, label: &[u8], nc: &[u8; 32], ns: &[u8; 32], transcript: &[u8; 32]) -> blake3::Hash {
    let mut h = blake3::Hasher::new_keyed(key.as_bytes());
    h.update(label);
    h.update(nc);
    h.update(ns);
    h.update(transcript);
    h.finalize()
}

fn session_key(key: &Key, nc: &[u8; 32], ns: &[u8; 32], transcript: &[u8; 32]) -> [u8; 32] {
    let mut h = blake3::Hasher::new_derive_key("blockrep session v1");
    h.update(key.as_bytes());
    h.update(nc);
    h.update(ns);
    h.update(transcript);
    *h.finalize().as_bytes()
}

pub(crate) fn run_client<S: Read + Write>(
    conn: &mut Connection<S>,
    key: &Key,
    opts: &HandshakeOptions,
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
    let proof_c = proof(key, b"client", &hello.nonce, &ack.nonce, &t);
    conn.send(&Message::Auth(*proof_c.as_bytes()))?;
    match conn.recv() {
        Ok(Some(Message::AuthOk(p))) => {
            // blake3::Hash compares in constant time.
            if proof(key, b"server", &hello.nonce, &ack.nonce, &t) != blake3::Hash::from(p) {
                return Err(HandshakeError::AuthFailed.into());
            }
        }
        Ok(Some(Message::Error(e))) if e.code == code::AUTH => return Err(HandshakeError::AuthFailed.into()),
        Ok(Some(Message::Error(e))) => return Err(ConnError::Remote { code: e.code, message: e.message }),
        Ok(Some(m)) => return Err(ConnError::Unexpected { expected: "AuthOk", got: m.frame_type() }),
        Ok(None) => return Err(ConnError::Closed { waiting_for: "the standby's answer to Auth" }),
        Err(e) => return Err(e),
    }
    conn.establish(ack.version, session_key(key, &hello.nonce, &ack.nonce, &t), ack.node);
    Ok(())
}

pub(crate) fn run_server<S: Read + Write>(
    conn: &mut Connection<S>,
    key: &Key,
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
    let p = match conn.recv_expect("the client's Auth")? {
        Message::Auth(p) => p,
        m => {
            conn.send_error(code::PROTOCOL, &format!("expected Auth, got {}", m.frame_type()));
            return Err(ConnError::Unexpected { expected: "Auth", got: m.frame_type() });
        }
    };
    if proof(key, b"client", &hello.nonce, &ack.nonce, &t) != blake3::Hash::from(p) {
        conn.send_error(code::AUTH, AUTH_FAILED_MESSAGE);
        return Err(HandshakeError::AuthFailed.into());
    }
    let proof_s = proof(key, b"server", &hello.nonce, &ack.nonce, &t);
    conn.send(&Message::AuthOk(*proof_s.as_bytes()))?;
    conn.establish(version, session_key(key, &hello.nonce, &ack.nonce, &t), hello.node);
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
        let (nc, ns, t) = ([2; 32], [3; 32], [4; 32]);
        let c = proof(&k, b"client", &nc, &ns, &t);
        assert_ne!(c, proof(&k, b"server", &nc, &ns, &t));
        assert_ne!(c, proof(&Key([9; 32]), b"client", &nc, &ns, &t));
        assert_ne!(c, proof(&k, b"client", &nc, &ns, &[5; 32]));
        assert_ne!(session_key(&k, &nc, &ns, &t), session_key(&k, &ns, &nc, &t));
    }
}
