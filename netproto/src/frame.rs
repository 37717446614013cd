//! Frames: the fixed header, the payload checksum and the MAC trailer.
//!
//! ```text
//! offset  size  field (all integers little-endian)
//!      0     4  magic "BRP1"
//!      4     2  version       protocol version of this frame (1 for the frames of the version negotiation)
//!      6     1  type          FrameType
//!      7     1  flags         FLAG_MAC or FLAG_AEAD (not both); every other bit is an error
//!      8     4  payload_len   <= MAX_PAYLOAD
//!     12     8  seq           per-direction frame counter, starting at 0 with the first frame of the connection
//!     20     4  crc32         of the payload
//!     24     n  payload       (message encoding, see `message`)
//!   24+n    16  mac           only with FLAG_MAC: keyed BLAKE3 over payload || header, truncated to 16 bytes;
//!                             key = keyed_BLAKE3(session key, "dir" || 'S' (to server) or 'C' (to client))
//!   24+n    16  tag           only with FLAG_AEAD (`encryption = "aead"`): the payload is ChaCha20-Poly1305
//!                             ciphertext and this is its tag; additional data = header bytes 0..20 (all but the
//!                             crc, which is then the crc32 of the ciphertext); nonce = seq (u64 LE) || 4 zero bytes;
//!                             key = BLAKE3_derive_key("blockrep aead v4", session key || 'S' or 'C')
//! ```
//!
//! A nonce is never reused: each direction has its own key, derived from a session key that is new for every
//! connection (both random handshake nonces go into it), and within a direction the sequence number grows by one per
//! frame and is checked on receipt.
//!
//! Decoding is two-phase: [`check`] looks at the header of a buffer that may be incomplete, without allocating,
//! and says how long the frame is; [`parse`] then verifies checksum, sequence number and MAC of one complete frame.
//! A header that lies about its length is refused before any payload is read.

use std::io::IoSlice;

use bytes::{Bytes, BytesMut};

/// The four bytes every frame starts with.
pub const MAGIC: [u8; 4] = *b"BRP1";
/// Length of the fixed header.
pub const HEADER_LEN: usize = 24;
/// Length of the MAC trailer (when [`FLAG_MAC`] is set).
pub const MAC_LEN: usize = 16;
/// Largest payload a frame may carry: a data extent of [`crate::message::MAX_EXTENT_LEN`] plus room for its fields.
pub const MAX_PAYLOAD: usize = crate::message::MAX_EXTENT_LEN as usize + 64 * 1024;
/// Largest payload a frame may carry before the peer has proved the key: enough for the negotiation and
/// authentication messages and an error message ([`crate::message::MAX_ERROR_LEN`]), so that an unauthenticated
/// peer cannot make this node buffer more than a few KiB.
pub const MAX_HANDSHAKE_PAYLOAD: usize = crate::message::MAX_ERROR_LEN + 1024;
/// Largest complete frame.
pub const MAX_FRAME_LEN: usize = HEADER_LEN + MAX_PAYLOAD + MAC_LEN;
/// Flag: the frame ends with a [`MAC_LEN`]-byte MAC (required once the session key exists, refused before).
pub const FLAG_MAC: u8 = 0x01;
/// Flag: the payload is encrypted and the frame ends with a [`MAC_LEN`]-byte ChaCha20-Poly1305 tag (required in an
/// encrypted session, refused otherwise).
pub const FLAG_AEAD: u8 = 0x02;
/// All flag bits this version knows.
pub const SUPPORTED_FLAGS: u8 = FLAG_MAC | FLAG_AEAD;
/// The header bytes an encrypted frame authenticates as additional data: all but the crc.
pub const AAD_LEN: usize = 20;
/// Lowest protocol version this build can speak. Version 3: sub-block hashes are the pieces' BLAKE3 chaining
/// values in their block's tree (not the pieces' own hashes), so the standby reads a refined block once; and hash
/// requests may be pipelined (the client sends requests and extents without waiting for earlier answers, which the
/// standby sends in request order). Version 4: `Auth` carries the client's encryption setting and a proof per key
/// it holds (key rotation), and frames may be encrypted ([`FLAG_AEAD`]).
pub const MIN_VERSION: u16 = 4;
/// Highest protocol version this build can speak.
pub const MAX_VERSION: u16 = 4;
/// The header version of the negotiation frames (Hello, HelloAck and an Error answering them); frozen so that
/// nodes of any version can read each other's offer.
pub const NEGOTIATION_VERSION: u16 = 1;

/// Which side sent a frame; each direction has its own MAC key, so a frame cannot be reflected back to its
/// sender.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Client (primary) to server (standby).
    ToServer,
    /// Server (standby) to client (primary).
    ToClient,
}

impl Direction {
    fn byte(self) -> u8 {
        match self {
            Direction::ToServer => b'S',
            Direction::ToClient => b'C',
        }
    }
}

macro_rules! frame_types {
    ($($(#[$doc:meta])* $name:ident = $val:expr,)*) => {
        /// The type of a frame, one per message.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        #[repr(u8)]
        pub enum FrameType {
            $($(#[$doc])* $name = $val,)*
        }

        impl FrameType {
            /// All frame types.
            pub const ALL: &'static [FrameType] = &[$(FrameType::$name,)*];

            /// The type with wire code `code`, if it is known.
            pub fn from_code(code: u8) -> Option<FrameType> {
                match code {
                    $($val => Some(FrameType::$name),)*
                    _ => None,
                }
            }

            /// Name of the type, for messages.
            pub fn name(self) -> &'static str {
                match self {
                    $(FrameType::$name => stringify!($name),)*
                }
            }
        }
    };
}

frame_types! {
    /// Client's offer: version range, node name, nonce.
    Hello = 1,
    /// Server's answer: chosen version, its range, node name, nonce.
    HelloAck = 2,
    /// Client's proof of the key.
    Auth = 3,
    /// Server's proof of the key.
    AuthOk = 4,
    /// A refusal or failure with a code and a message.
    Error = 5,
    /// Client opens a volume by name.
    OpenVolume = 6,
    /// Server describes the shadow.
    VolumeInfo = 7,
    /// Client starts or resumes a transfer.
    Begin = 8,
    /// Server accepts the transfer.
    BeginAck = 9,
    /// Client asks for block hashes.
    BlockHashesReq = 10,
    /// Server answers with block hashes.
    BlockHashes = 11,
    /// Client asks for sub-block hashes.
    SubHashesReq = 12,
    /// Server answers with sub-block hashes.
    SubHashes = 13,
    /// An extent to write.
    Extent = 14,
    /// Client asks to commit the transfer.
    Commit = 15,
    /// Server confirms the commit.
    CommitAck = 16,
    /// Orderly end of the session.
    Bye = 17,
    /// Either side asks the other node's role (promote guard, switchover).
    RoleReq = 18,
    /// The answer: role and node name.
    RoleInfo = 19,
    /// Switchover: asks the other node to run its demote plan.
    DemoteReq = 20,
    /// The demote plan finished.
    DemoteDone = 21,
    /// Client: still here (sent while the source scans unchanged data and has nothing else to send, so the
    /// standby's idle timeout only ends sessions whose primary really vanished).
    Keepalive = 22,
    /// Switchover: the node asked to demote stopped its services and synced every volume; what it committed.
    FinalSynced = 23,
    /// Switchover: the asking node holds what the other committed; the demote may proceed.
    DemoteConfirm = 24,
    /// Automatic fallback: the standby acting for this node asks it to take its service back by a planned
    /// switchover (this node then asks the standby to demote, as `blockrep switchover` does).
    HandbackReq = 25,
    /// The switchover asked for by `HandbackReq` finished: this node is primary again.
    HandbackDone = 26,
}

impl std::fmt::Display for FrameType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.name(), *self as u8)
    }
}

/// Errors of frame decoding.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    /// The magic is wrong: the peer is not a blockrep node, or the stream lost its framing.
    #[error("frame does not start with magic \"BRP1\" (found {found:02x?}): the peer is not a blockrep node or the stream is corrupted")]
    BadMagic {
        /// The four bytes found.
        found: [u8; 4],
    },
    /// The header names a protocol version this build does not know.
    #[error("frame has protocol version {version}, this node speaks {MIN_VERSION}..{MAX_VERSION}; upgrade one side")]
    UnknownVersion {
        /// The version found.
        version: u16,
    },
    /// The header's version differs from the negotiated one.
    #[error("frame has protocol version {found}, but version {expected} was negotiated for this connection")]
    VersionChanged {
        /// The negotiated version.
        expected: u16,
        /// The version found.
        found: u16,
    },
    /// Unknown frame type.
    #[error("unknown frame type {code}: the peer speaks a newer or different protocol")]
    UnknownType {
        /// The type code found.
        code: u8,
    },
    /// Unknown flag bits.
    #[error("frame of type {ty} has unknown flag bits {bits:#04x}: the peer speaks a newer or different protocol")]
    UnknownFlags {
        /// The frame type.
        ty: FrameType,
        /// The unknown bits.
        bits: u8,
    },
    /// The length field exceeds [`MAX_PAYLOAD`].
    #[error("frame of type {ty} announces a payload of {len} bytes, more than the limit of {MAX_PAYLOAD}; refusing to read it")]
    TooLarge {
        /// The frame type.
        ty: FrameType,
        /// The announced length.
        len: u32,
    },
    /// A frame before authentication announces more than [`MAX_HANDSHAKE_PAYLOAD`].
    #[error("frame of type {ty} announces a payload of {len} bytes before authentication, more than the limit of {MAX_HANDSHAKE_PAYLOAD}; refusing to read it")]
    TooLargeBeforeAuth {
        /// The frame type.
        ty: FrameType,
        /// The announced length.
        len: u32,
    },
    /// The payload checksum does not match.
    #[error("frame {seq} of type {ty} has a bad payload checksum (crc32 {found:#010x}, header says {expected:#010x}): the data was corrupted in transit")]
    BadCrc {
        /// The frame type.
        ty: FrameType,
        /// The sequence number.
        seq: u64,
        /// The checksum in the header.
        expected: u32,
        /// The checksum of the payload received.
        found: u32,
    },
    /// The MAC does not verify.
    #[error(
        "frame {seq} of type {ty} fails authentication (bad MAC): it was forged or altered; dropping the connection"
    )]
    BadMac {
        /// The frame type.
        ty: FrameType,
        /// The sequence number.
        seq: u64,
    },
    /// A frame without MAC after the session key exists.
    #[error("frame {seq} of type {ty} carries no MAC although the session is authenticated; dropping the connection")]
    MissingMac {
        /// The frame type.
        ty: FrameType,
        /// The sequence number.
        seq: u64,
    },
    /// Both trailer flags at once.
    #[error("frame of type {ty} claims both a MAC and encryption (flags {flags:#04x}): the peer speaks a different protocol")]
    ConflictingFlags {
        /// The frame type.
        ty: FrameType,
        /// The flags found.
        flags: u8,
    },
    /// The ChaCha20-Poly1305 tag does not verify.
    #[error("frame {seq} of type {ty} fails decryption (bad ChaCha20-Poly1305 tag): it was forged or altered in transit; dropping the connection")]
    BadTag {
        /// The frame type.
        ty: FrameType,
        /// The sequence number.
        seq: u64,
    },
    /// A frame in clear (or only MAC'd) in an encrypted session.
    #[error("frame {seq} of type {ty} is not encrypted although this session is (encryption = \"aead\"); dropping the connection")]
    NotEncrypted {
        /// The frame type.
        ty: FrameType,
        /// The sequence number.
        seq: u64,
    },
    /// An encrypted frame in a session that is not encrypted.
    #[error("frame {seq} of type {ty} is encrypted although this session is not (encryption = \"none\"); dropping the connection")]
    UnexpectedEncryption {
        /// The frame type.
        ty: FrameType,
        /// The sequence number.
        seq: u64,
    },
    /// A frame with MAC before the session key exists.
    #[error("frame {seq} of type {ty} carries a MAC before the peers have authenticated")]
    UnexpectedMac {
        /// The frame type.
        ty: FrameType,
        /// The sequence number.
        seq: u64,
    },
    /// [`parse`] was given a buffer that is not exactly one frame (a caller bug: use [`check`] first).
    #[error("frame buffer holds {found} bytes but the header describes a frame of {described}; call check() first")]
    Length {
        /// Length the header describes.
        described: usize,
        /// Length of the buffer.
        found: usize,
    },
    /// The sequence number is not the next one.
    #[error(
        "frame of type {ty} has sequence number {found}, expected {expected}: replayed, dropped or reordered frame"
    )]
    BadSequence {
        /// The frame type.
        ty: FrameType,
        /// The expected sequence number.
        expected: u64,
        /// The sequence number found.
        found: u64,
    },
}

/// A decoded, validated frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Protocol version of the frame.
    pub version: u16,
    /// Frame type.
    pub ty: FrameType,
    /// Flag bits (only known ones).
    pub flags: u8,
    /// Payload length.
    pub payload_len: u32,
    /// Sequence number.
    pub seq: u64,
    /// crc32 of the payload.
    pub crc: u32,
}

impl Header {
    /// Length of the whole frame described by this header.
    pub fn frame_len(&self) -> usize {
        // Cannot overflow: payload_len <= MAX_PAYLOAD was checked.
        HEADER_LEN + self.payload_len as usize + if self.flags & (FLAG_MAC | FLAG_AEAD) != 0 { MAC_LEN } else { 0 }
    }

    /// Encodes the header.
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut h = [0u8; HEADER_LEN];
        h[0..4].copy_from_slice(&MAGIC);
        h[4..6].copy_from_slice(&self.version.to_le_bytes());
        h[6] = self.ty as u8;
        h[7] = self.flags;
        h[8..12].copy_from_slice(&self.payload_len.to_le_bytes());
        h[12..20].copy_from_slice(&self.seq.to_le_bytes());
        h[20..24].copy_from_slice(&self.crc.to_le_bytes());
        h
    }

    /// Decodes and validates a header from the first [`HEADER_LEN`] bytes of `buf`; `Ok(None)` if `buf` is
    /// shorter. Checks magic, version range, type, flags and the length limit.
    pub fn decode(buf: &[u8]) -> Result<Option<Header>, FrameError> {
        // Check the magic as soon as it is there, so garbage is refused without waiting for a whole header.
        let n = buf.len().min(4);
        if buf[..n] != MAGIC[..n] {
            let mut found = [0u8; 4];
            found[..n].copy_from_slice(&buf[..n]);
            return Err(FrameError::BadMagic { found });
        }
        let Some(h) = buf.get(..HEADER_LEN) else { return Ok(None) };
        let version = u16::from_le_bytes([h[4], h[5]]);
        if version != NEGOTIATION_VERSION && !(MIN_VERSION..=MAX_VERSION).contains(&version) {
            return Err(FrameError::UnknownVersion { version });
        }
        let ty = FrameType::from_code(h[6]).ok_or(FrameError::UnknownType { code: h[6] })?;
        let flags = h[7];
        if flags & !SUPPORTED_FLAGS != 0 {
            return Err(FrameError::UnknownFlags { ty, bits: flags & !SUPPORTED_FLAGS });
        }
        if flags & (FLAG_MAC | FLAG_AEAD) == FLAG_MAC | FLAG_AEAD {
            return Err(FrameError::ConflictingFlags { ty, flags });
        }
        let payload_len = u32::from_le_bytes([h[8], h[9], h[10], h[11]]);
        if payload_len as usize > MAX_PAYLOAD {
            return Err(FrameError::TooLarge { ty, len: payload_len });
        }
        let seq = u64::from_le_bytes(h[12..20].try_into().expect("8 bytes"));
        let crc = u32::from_le_bytes([h[20], h[21], h[22], h[23]]);
        Ok(Some(Header { version, ty, flags, payload_len, seq, crc }))
    }
}

/// Phase one: validates the header at the start of `buf` without allocating. `Ok(None)`: more bytes are needed;
/// `Ok(Some(len))`: the first `len` bytes of `buf` are one complete frame, ready for [`parse`].
pub fn check(buf: &[u8]) -> Result<Option<usize>, FrameError> {
    check_limited(buf, MAX_PAYLOAD)
}

/// [`check`] with a lower payload limit (`max_payload` below [`MAX_PAYLOAD`]), for frames before authentication:
/// a longer announcement is [`FrameError::TooLargeBeforeAuth`].
pub fn check_limited(buf: &[u8], max_payload: usize) -> Result<Option<usize>, FrameError> {
    match Header::decode(buf)? {
        Some(h) if h.payload_len as usize > max_payload => {
            Err(FrameError::TooLargeBeforeAuth { ty: h.ty, len: h.payload_len })
        }
        Some(h) if buf.len() >= h.frame_len() => Ok(Some(h.frame_len())),
        _ => Ok(None),
    }
}

/// A session key for MACs, bound to the direction of the frames it authenticates.
#[derive(Clone)]
pub struct MacKey {
    key: [u8; 32],
    dir: Direction,
}

impl std::fmt::Debug for MacKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MacKey").field("key", &"<redacted>").field("dir", &self.dir).finish()
    }
}

/// A session's encryption key for frames travelling in one direction (`encryption = "aead"`).
#[derive(Clone)]
pub struct AeadKey {
    cipher: chacha20poly1305::ChaCha20Poly1305,
    dir: Direction,
}

impl std::fmt::Debug for AeadKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AeadKey").field("key", &"<redacted>").field("dir", &self.dir).finish()
    }
}

impl AeadKey {
    /// The key for frames travelling in direction `dir`, derived from the session key and the direction.
    pub fn new(session: [u8; 32], dir: Direction) -> AeadKey {
        use chacha20poly1305::KeyInit;
        let mut input = [0u8; 33];
        input[..32].copy_from_slice(&session);
        input[32] = dir.byte();
        let key = blake3::derive_key("blockrep aead v4", &input);
        AeadKey { cipher: chacha20poly1305::ChaCha20Poly1305::new(&key.into()), dir }
    }

    /// The nonce of frame `seq`: the sequence number, little-endian, then 4 zero bytes.
    fn nonce(seq: u64) -> chacha20poly1305::Nonce {
        let mut n = [0u8; 12];
        n[..8].copy_from_slice(&seq.to_le_bytes());
        n.into()
    }
}

/// Pieces of the payload fed to crc32 and the MAC together, so each piece is read from memory once while it is
/// still in cache.
const DIGEST_PIECE: usize = 64 * 1024;

impl MacKey {
    /// A MAC key for frames travelling in direction `dir` (derived from the session key and the direction).
    pub fn new(session: [u8; 32], dir: Direction) -> MacKey {
        let key = *blake3::keyed_hash(&session, &[b'd', b'i', b'r', dir.byte()]).as_bytes();
        MacKey { key, dir }
    }

    /// The MAC of a frame made of `header` and the payload pieces `parts`.
    pub fn mac(&self, header: &[u8; HEADER_LEN], parts: &[&[u8]]) -> [u8; MAC_LEN] {
        let mut hasher = blake3::Hasher::new_keyed(&self.key);
        for p in parts {
            hasher.update(p);
        }
        finish_mac(hasher, header)
    }
}

fn finish_mac(mut hasher: blake3::Hasher, header: &[u8; HEADER_LEN]) -> [u8; MAC_LEN] {
    hasher.update(header);
    let mut out = [0u8; MAC_LEN];
    out.copy_from_slice(&hasher.finalize().as_bytes()[..MAC_LEN]);
    out
}

/// crc32 of the payload `parts` and, with a key, the MAC state after the payload (the header goes last, since
/// it holds the crc).
fn digest(parts: &[&[u8]], key: Option<&MacKey>) -> (u32, Option<blake3::Hasher>) {
    let mut crc = crc32fast::Hasher::new();
    let mut mac = key.map(|k| blake3::Hasher::new_keyed(&k.key));
    for p in parts {
        for piece in p.chunks(DIGEST_PIECE) {
            crc.update(piece);
            if let Some(m) = &mut mac {
                m.update(piece);
            }
        }
    }
    (crc.finalize(), mac)
}

/// Compares two MACs in constant time.
fn mac_eq(a: &[u8; MAC_LEN], b: &[u8]) -> bool {
    b.len() == MAC_LEN && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// A frame ready to be written: header, payload in two pieces (a small head and a body that is shared, not
/// copied), and the MAC. Write it with [`EncodedFrame::io_slices`].
#[derive(Debug, Clone)]
pub struct EncodedFrame {
    /// Encoded header.
    pub header: [u8; HEADER_LEN],
    /// First part of the payload (the message's fields).
    pub head: Vec<u8>,
    /// Rest of the payload (an extent's data), never copied.
    pub body: Bytes,
    /// The MAC, if the frame carries one.
    pub mac: Option<[u8; MAC_LEN]>,
}

impl EncodedFrame {
    /// Builds a frame around a payload made of `head` followed by `body`.
    ///
    /// # Panics
    /// If the payload exceeds [`MAX_PAYLOAD`]: message encoders check their limits first.
    pub fn new(version: u16, ty: FrameType, seq: u64, head: Vec<u8>, body: Bytes, key: Option<&MacKey>) -> Self {
        let len = head.len() + body.len();
        assert!(len <= MAX_PAYLOAD, "payload of {len} bytes for {ty} exceeds MAX_PAYLOAD");
        let (crc, mac) = digest(&[&head, &body], key);
        let header =
            Header { version, ty, flags: if key.is_some() { FLAG_MAC } else { 0 }, payload_len: len as u32, seq, crc }
                .encode();
        let mac = mac.map(|m| finish_mac(m, &header));
        EncodedFrame { header, head, body, mac }
    }

    /// Builds an encrypted frame ([`FLAG_AEAD`]) around a payload made of `head` followed by `body`: the payload
    /// is copied into one buffer (`head`'s, grown) and encrypted there; `body` of the result is empty.
    ///
    /// # Panics
    /// If the payload exceeds [`MAX_PAYLOAD`]: message encoders check their limits first.
    pub fn sealed(version: u16, ty: FrameType, seq: u64, head: Vec<u8>, body: Bytes, key: &AeadKey) -> Self {
        use chacha20poly1305::AeadInOut;
        let len = head.len() + body.len();
        assert!(len <= MAX_PAYLOAD, "payload of {len} bytes for {ty} exceeds MAX_PAYLOAD");
        let mut buf = head;
        buf.extend_from_slice(&body);
        let mut header = Header { version, ty, flags: FLAG_AEAD, payload_len: len as u32, seq, crc: 0 }.encode();
        let tag = key
            .cipher
            .encrypt_inout_detached(&AeadKey::nonce(seq), &header[..AAD_LEN], buf.as_mut_slice().into())
            .expect("ChaCha20-Poly1305 takes payloads of MAX_PAYLOAD");
        header[20..24].copy_from_slice(&crc32fast::hash(&buf).to_le_bytes());
        let mut mac = [0u8; MAC_LEN];
        mac.copy_from_slice(&tag);
        EncodedFrame { header, head: buf, body: Bytes::new(), mac: Some(mac) }
    }

    /// Total length on the wire.
    pub fn len(&self) -> usize {
        HEADER_LEN + self.head.len() + self.body.len() + self.mac.map_or(0, |m| m.len())
    }

    /// Whether the frame is empty (never: a frame has at least a header).
    pub fn is_empty(&self) -> bool {
        false
    }

    /// The frame as up to four slices for a vectored write.
    pub fn io_slices(&self) -> Vec<IoSlice<'_>> {
        let mut v = Vec::with_capacity(4);
        v.push(IoSlice::new(&self.header));
        for part in [&self.head[..], &self.body[..]] {
            if !part.is_empty() {
                v.push(IoSlice::new(part));
            }
        }
        if let Some(m) = &self.mac {
            v.push(IoSlice::new(m));
        }
        v
    }

    /// The frame as one contiguous buffer (tests, fuzz seeds).
    pub fn to_vec(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(self.len());
        v.extend_from_slice(&self.header);
        v.extend_from_slice(&self.head);
        v.extend_from_slice(&self.body);
        if let Some(m) = &self.mac {
            v.extend_from_slice(m);
        }
        v
    }
}

/// Phase two: verifies one complete frame (exactly the `len` bytes [`check`] reported): header, length, sequence
/// number, checksum and, with a session key, the MAC. Returns the header and the payload (a slice of `frame`, not a copy).
pub fn parse(frame: Bytes, expected_seq: u64, key: Option<&MacKey>) -> Result<(Header, Bytes), FrameError> {
    let h = Header::decode(&frame)?.ok_or(FrameError::Length { described: HEADER_LEN, found: frame.len() })?;
    if frame.len() != h.frame_len() {
        return Err(FrameError::Length { described: h.frame_len(), found: frame.len() });
    }
    if h.seq != expected_seq {
        return Err(FrameError::BadSequence { ty: h.ty, expected: expected_seq, found: h.seq });
    }
    let payload_end = HEADER_LEN + h.payload_len as usize;
    let payload = frame.slice(HEADER_LEN..payload_end);
    if h.flags & FLAG_AEAD != 0 {
        return Err(FrameError::UnexpectedEncryption { ty: h.ty, seq: h.seq });
    }
    let has_mac = h.flags & FLAG_MAC != 0;
    match (key, has_mac) {
        (Some(_), false) => return Err(FrameError::MissingMac { ty: h.ty, seq: h.seq }),
        (None, true) => return Err(FrameError::UnexpectedMac { ty: h.ty, seq: h.seq }),
        _ => {}
    }
    let (found, mac) = digest(&[&payload], key);
    if found != h.crc {
        return Err(FrameError::BadCrc { ty: h.ty, seq: h.seq, expected: h.crc, found });
    }
    if let Some(m) = mac {
        let header: &[u8; HEADER_LEN] = frame[..HEADER_LEN].try_into().expect("header length");
        if !mac_eq(&finish_mac(m, header), &frame[payload_end..]) {
            return Err(FrameError::BadMac { ty: h.ty, seq: h.seq });
        }
    }
    Ok((h, payload))
}

/// Phase two for an encrypted session: verifies one complete frame (exactly the `len` bytes [`check`] reported):
/// header, length, sequence number, checksum of the ciphertext, then decrypts the payload in place and checks its
/// tag. Returns the header and the plaintext payload (a slice of `frame`, not a copy).
pub fn open(mut frame: BytesMut, expected_seq: u64, key: &AeadKey) -> Result<(Header, Bytes), FrameError> {
    use chacha20poly1305::AeadInOut;
    let h = Header::decode(&frame)?.ok_or(FrameError::Length { described: HEADER_LEN, found: frame.len() })?;
    if frame.len() != h.frame_len() {
        return Err(FrameError::Length { described: h.frame_len(), found: frame.len() });
    }
    if h.seq != expected_seq {
        return Err(FrameError::BadSequence { ty: h.ty, expected: expected_seq, found: h.seq });
    }
    if h.flags & FLAG_AEAD == 0 {
        return Err(FrameError::NotEncrypted { ty: h.ty, seq: h.seq });
    }
    let payload_end = HEADER_LEN + h.payload_len as usize;
    let found = crc32fast::hash(&frame[HEADER_LEN..payload_end]);
    if found != h.crc {
        return Err(FrameError::BadCrc { ty: h.ty, seq: h.seq, expected: h.crc, found });
    }
    let mut aad = [0u8; AAD_LEN];
    aad.copy_from_slice(&frame[..AAD_LEN]);
    let mut tag = chacha20poly1305::Tag::default();
    tag.copy_from_slice(&frame[payload_end..]);
    key.cipher
        .decrypt_inout_detached(&AeadKey::nonce(h.seq), &aad, (&mut frame[HEADER_LEN..payload_end]).into(), &tag)
        .map_err(|_| FrameError::BadTag { ty: h.ty, seq: h.seq })?;
    Ok((h, frame.freeze().slice(HEADER_LEN..payload_end)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(dir: Direction) -> MacKey {
        MacKey::new([7u8; 32], dir)
    }

    fn sample(seq: u64, k: Option<&MacKey>) -> Vec<u8> {
        EncodedFrame::new(1, FrameType::Extent, seq, vec![1, 2, 3], Bytes::from_static(b"hello world"), k).to_vec()
    }

    #[test]
    fn round_trip_with_and_without_mac() {
        let k = key(Direction::ToServer);
        for kk in [None, Some(&k)] {
            let buf = sample(5, kk);
            assert_eq!(check(&buf).unwrap(), Some(buf.len()));
            let (h, p) = parse(Bytes::from(buf), 5, kk).unwrap();
            assert_eq!(h.ty, FrameType::Extent);
            assert_eq!(&p[..], b"\x01\x02\x03hello world");
        }
    }

    #[test]
    fn parse_refuses_a_buffer_that_is_not_one_frame() {
        let buf = sample(0, None);
        let short = Bytes::copy_from_slice(&buf[..buf.len() - 1]);
        assert!(matches!(parse(short, 0, None), Err(FrameError::Length { found, .. }) if found == buf.len() - 1));
        let mut long = buf.clone();
        long.push(0);
        assert!(matches!(parse(Bytes::from(long), 0, None), Err(FrameError::Length { .. })));
        assert!(matches!(parse(Bytes::from_static(b"BRP1"), 0, None), Err(FrameError::Length { .. })));
    }

    #[test]
    fn every_prefix_is_incomplete() {
        let buf = sample(0, Some(&key(Direction::ToServer)));
        for n in 0..buf.len() {
            assert_eq!(check(&buf[..n]).unwrap(), None, "prefix of {n} bytes");
        }
    }

    #[test]
    fn any_flipped_bit_is_rejected() {
        let k = key(Direction::ToClient);
        let buf = sample(3, Some(&k));
        for i in 0..buf.len() {
            for bit in 0..8 {
                let mut b = buf.clone();
                b[i] ^= 1 << bit;
                let r = match check(&b) {
                    Err(e) => Err(e),
                    Ok(None) => continue, // length grew: incomplete, later EOF → error in the connection
                    Ok(Some(n)) => parse(Bytes::from(b[..n].to_vec()), 3, Some(&k)).map(|_| ()),
                };
                assert!(r.is_err(), "flipping bit {bit} of byte {i} was accepted");
            }
        }
    }

    #[test]
    fn replay_and_reflection_are_rejected() {
        let k = key(Direction::ToServer);
        let buf = Bytes::from(sample(7, Some(&k)));
        assert!(matches!(parse(buf.clone(), 8, Some(&k)), Err(FrameError::BadSequence { expected: 8, found: 7, .. })));
        // The same frame reflected to its sender (other direction) does not verify.
        let other = key(Direction::ToClient);
        assert!(matches!(parse(buf, 7, Some(&other)), Err(FrameError::BadMac { .. })));
    }

    fn sealed(seq: u64, k: &AeadKey) -> Vec<u8> {
        EncodedFrame::sealed(4, FrameType::Extent, seq, vec![1, 2, 3], Bytes::from_static(b"hello world"), k).to_vec()
    }

    #[test]
    fn sealed_frames_round_trip_and_hide_the_payload() {
        let k = AeadKey::new([9; 32], Direction::ToServer);
        let buf = sealed(5, &k);
        assert_eq!(buf.len(), HEADER_LEN + 14 + MAC_LEN);
        assert!(!buf.windows(11).any(|w| w == b"hello world"), "the payload is on the wire in clear");
        for n in 0..buf.len() {
            assert_eq!(check(&buf[..n]).unwrap(), None, "prefix of {n} bytes");
        }
        assert_eq!(check(&buf).unwrap(), Some(buf.len()));
        let (h, p) = open(BytesMut::from(&buf[..]), 5, &k).unwrap();
        assert_eq!((h.ty, h.flags), (FrameType::Extent, FLAG_AEAD));
        assert_eq!(&p[..], b"\x01\x02\x03hello world");
        // Same payload, next sequence number: another nonce, another ciphertext.
        assert_ne!(sealed(6, &k)[HEADER_LEN..], buf[HEADER_LEN..]);
    }

    #[test]
    fn any_altered_sealed_byte_is_rejected_even_with_a_fixed_crc() {
        let k = AeadKey::new([9; 32], Direction::ToClient);
        let buf = sealed(3, &k);
        for i in 0..buf.len() {
            let mut b = buf.clone();
            b[i] ^= 0x01;
            if (HEADER_LEN..buf.len() - MAC_LEN).contains(&i) {
                // An attacker can recompute the crc: the tag still catches the change.
                let crc = crc32fast::hash(&b[HEADER_LEN..buf.len() - MAC_LEN]);
                b[20..24].copy_from_slice(&crc.to_le_bytes());
                let e = open(BytesMut::from(&b[..]), 3, &k).unwrap_err();
                assert_eq!(e, FrameError::BadTag { ty: FrameType::Extent, seq: 3 });
                assert!(e.to_string().contains("forged or altered"), "{e}");
                continue;
            }
            let r = match check(&b) {
                Err(e) => Err(e),
                Ok(None) => continue,
                Ok(Some(n)) => open(BytesMut::from(&b[..n]), 3, &k).map(|_| ()),
            };
            assert!(r.is_err(), "flipping byte {i} was accepted");
        }
    }

    #[test]
    fn encryption_must_match_the_session_and_keys_are_per_direction() {
        let k = AeadKey::new([9; 32], Direction::ToServer);
        let buf = sealed(0, &k);
        let other = AeadKey::new([9; 32], Direction::ToClient);
        assert!(matches!(open(BytesMut::from(&buf[..]), 0, &other), Err(FrameError::BadTag { .. })));
        assert!(matches!(open(BytesMut::from(&buf[..]), 1, &k), Err(FrameError::BadSequence { .. })));
        let mac = MacKey::new([9; 32], Direction::ToServer);
        assert!(matches!(parse(Bytes::from(buf.clone()), 0, Some(&mac)), Err(FrameError::UnexpectedEncryption { .. })));
        assert!(matches!(parse(Bytes::from(buf), 0, None), Err(FrameError::UnexpectedEncryption { .. })));
        let maced = sample(0, Some(&mac));
        assert!(matches!(open(BytesMut::from(&maced[..]), 0, &k), Err(FrameError::NotEncrypted { .. })));
        let mut both = maced;
        both[7] = FLAG_MAC | FLAG_AEAD;
        assert!(matches!(check(&both), Err(FrameError::ConflictingFlags { .. })));
    }

    #[test]
    fn mac_presence_must_match_session_state() {
        let k = key(Direction::ToServer);
        let plain = Bytes::from(sample(0, None));
        assert!(matches!(parse(plain, 0, Some(&k)), Err(FrameError::MissingMac { .. })));
        let maced = Bytes::from(sample(0, Some(&k)));
        assert!(matches!(parse(maced, 0, None), Err(FrameError::UnexpectedMac { .. })));
    }

    #[test]
    fn oversized_length_is_refused_from_the_header_alone() {
        let mut h = Header { version: 1, ty: FrameType::Extent, flags: 0, payload_len: 0, seq: 0, crc: 0 }.encode();
        h[8..12].copy_from_slice(&(MAX_PAYLOAD as u32 + 1).to_le_bytes());
        assert_eq!(check(&h), Err(FrameError::TooLarge { ty: FrameType::Extent, len: MAX_PAYLOAD as u32 + 1 }));
        h[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
        let e = check(&h).unwrap_err();
        assert!(e.to_string().contains("4294967295"), "{e}");
    }

    #[test]
    fn unknown_type_flag_version_and_magic_are_named() {
        let good = sample(0, None);
        let mut b = good.clone();
        b[6] = 200;
        assert_eq!(
            check(&b).unwrap_err().to_string(),
            "unknown frame type 200: the peer speaks a newer or different protocol"
        );
        let mut b = good.clone();
        b[7] = 0x80;
        let e = check(&b).unwrap_err();
        assert_eq!(e, FrameError::UnknownFlags { ty: FrameType::Extent, bits: 0x80 });
        assert!(e.to_string().contains("0x80") && e.to_string().contains("Extent (14)"), "{e}");
        let mut b = good.clone();
        b[4] = 9;
        assert!(check(&b).unwrap_err().to_string().contains("protocol version 9"));
        assert!(matches!(check(b"GET / HTTP/1.1"), Err(FrameError::BadMagic { .. })));
        assert!(matches!(check(b"BX"), Err(FrameError::BadMagic { .. })));
    }
}
