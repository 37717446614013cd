//! blockrep's framed, authenticated TCP protocol.
//!
//! The primary (`blockrep sync`) and the standby (`blockrep serve`) talk over one TCP connection per session.
//! This crate owns both ends of the network link and nothing else: it carries the session types of the `link`
//! crate (shared with the engine) without converting them, and it does not depend on the engine.
//!
//! * [`frame`]: fixed header (magic, version, type, flags, length, sequence number, crc32), payload, MAC; two-phase
//!   decoding ([`frame::check`], then [`frame::parse`]) with named `MAX_*` limits.
//! * [`message`]: the payload of each frame type; extents with per-extent zstd compression when it pays.
//! * [`handshake`]: version negotiation and mutual challenge-response authentication with the shared key (either
//!   key of a rotation in progress), which yields the session key for the MACs or, with `encryption = "aead"`, for
//!   ChaCha20-Poly1305.
//! * [`conn`]: a blocking [`Connection`] over a `TcpStream` (or any byte stream): vectored, copy-free sends,
//!   buffered two-phase receives, send-rate cap, byte counters; [`connect`] and [`accept_handshake`].
//! * [`client`]: [`RemoteTarget`], the primary's `TargetLink` over a connection; `Begin` and hash requests are
//!   pipelined (a second thread receives the answers while the source sends), and [`connect_then`] sends the
//!   volume's `OpenVolume` behind the handshake's `Auth`: an incremental sync waits for four round trips (Hello,
//!   Auth with OpenVolume, the last refinement answers, the commit), whatever the volume's size.
//! * [`server`]: [`serve_session`], the standby's per-connection dispatch loop over any `TargetLink`.
//! * [`key`]: loading and generating the shared key file; [`KeySet`] (current and next key) and key rotation.
//! * `fuzzing` (cargo feature `fuzzing`, on for `fuzz/` and this crate's tests): the entry points of the fuzz
//!   targets in `fuzz/`.
//!
//! ```no_run
//! use netproto::{connect, message::{Message, OpenVolume}};
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let keys = netproto::KeySet::load("/etc/blockrep/key".as_ref())?;
//! let mut conn = connect("standby:7420", &keys, "primary", std::time::Duration::from_secs(10))?;
//! conn.send(&Message::OpenVolume(OpenVolume { name: "data".into(), source_size: 1 << 30, block_size: 65536 }))?;
//! let info = conn.recv_expect("VolumeInfo")?;
//! # let _ = info; Ok(()) }
//! ```
#![deny(missing_docs)]

pub mod client;
pub mod conn;
pub mod frame;
#[cfg(feature = "fuzzing")]
pub mod fuzzing;
pub mod handshake;
pub mod key;
pub mod message;
pub mod server;

/// The shared byte buffer extents carry (re-exported so users need not depend on `bytes` themselves).
pub use bytes::Bytes;
pub use client::{Duplex, RemoteTarget};
pub use conn::{
    accept_handshake, accept_handshake_with, client_handshake, client_handshake_then, connect, connect_then,
    connect_with, server_handshake, ConnError, Connection, FrameSender, Stats,
};
pub use handshake::{HandshakeError, HandshakeOptions};
pub use key::{
    generate_key, generate_next_key, key_id, load_key, next_key_path, Key, KeyError, KeyFile, KeySet, KeySlot, KeyStore,
};
pub use message::{Encryption, Message};
pub use server::{serve_session, Refusal, SessionError, Standby};

/// The zstd level used for extents unless configured otherwise (`[primary] compression_level`): chosen from the
/// end-to-end runs in `docs/performance.md` ("Compression"): as few bytes on the wire as level 3, less CPU.
pub const DEFAULT_ZSTD_LEVEL: i32 = 1;
