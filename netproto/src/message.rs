//! Messages: the payload encoding of each frame type.
//!
//! All integers are little-endian; strings are a `u16` length and UTF-8 bytes; hashes are 32 raw bytes; an
//! option is a tag byte (0 none, 1 some) and the value; a bool is one byte, 0 or 1. Every count and length is
//! checked against a named `MAX_*` limit before anything is allocated, and a payload with bytes left over after
//! its last field is an error. Encoders check the same limits, so whatever encodes also decodes.
//!
//! An extent is `offset u64 | len u64 | flags u8 | payload`: with [`EXTENT_ZERO`] the payload is empty, with
//! [`EXTENT_ZSTD`] it is one zstd frame of exactly `len` bytes when decompressed, otherwise it is the `len` raw
//! bytes (sent as a shared [`Bytes`] without copying).

use bytes::Bytes;

use crate::frame::FrameType;

/// A 32-byte BLAKE3 hash.
pub use link::BlockHash as Hash;
/// The session types this protocol carries are the link crate's own, not copies.
pub use link::{
    BeginAck, BeginPlan, CommitAck, Extent, ExtentData, GenRecord, PendingInfo, PlanMode, TargetInfo, MAX_EXTENT_LEN,
    MAX_HISTORY, MAX_ZERO_EXTENT_LEN,
};

/// Longest node or volume name, in bytes.
pub const MAX_NAME_LEN: usize = 255;
/// Longest error message, in bytes.
pub const MAX_ERROR_LEN: usize = 4096;
/// Most hashes in one `BlockHashes` or `SubHashes` answer (and blocks in one `BlockHashesReq`).
pub const MAX_HASH_BATCH: u32 = 256 * 1024;
/// Most blocks in one `SubHashesReq` (their sub-hashes must still fit in [`MAX_HASH_BATCH`]).
pub const MAX_SUB_BLOCKS: u32 = 1024;
/// Extent flag: the payload is zstd-compressed.
pub const EXTENT_ZSTD: u8 = 0x01;
/// Extent flag: the extent is `len` zero bytes, without payload.
pub const EXTENT_ZERO: u8 = 0x02;
/// All extent flag bits this version knows.
pub const EXTENT_SUPPORTED_FLAGS: u8 = EXTENT_ZSTD | EXTENT_ZERO;
/// Length of an extent's fields before its payload.
pub const EXTENT_HEAD_LEN: usize = 17;
/// Compression is used for an extent only if it shrinks it below this many percent of the raw size.
pub const COMPRESS_MAX_PERCENT: u64 = 97;

/// Error codes carried by [`Message::Error`].
pub mod code {
    /// The peer violated the protocol.
    pub const PROTOCOL: u16 = 1;
    /// No common protocol version.
    pub const VERSION: u16 = 2;
    /// Authentication failed.
    pub const AUTH: u16 = 3;
    /// The volume is not configured on the standby.
    pub const UNKNOWN_VOLUME: u16 = 4;
    /// Another sync of the volume is running.
    pub const BUSY: u16 = 5;
    /// The request was refused (e.g. extent outside the shadow, size mismatch).
    pub const REFUSED: u16 = 6;
    /// The standby failed (I/O error, disk full).
    pub const FAILED: u16 = 7;
    /// The standby is shutting down.
    pub const SHUTDOWN: u16 = 8;
    /// The nodes' `encryption` settings differ.
    pub const ENCRYPTION: u16 = 9;
}

/// Client's opening offer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    /// Lowest protocol version the client speaks.
    pub min_version: u16,
    /// Highest protocol version the client speaks.
    pub max_version: u16,
    /// The client's node name.
    pub node: String,
    /// The client's random nonce.
    pub nonce: [u8; 32],
}

/// Server's answer to [`Hello`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HelloAck {
    /// The chosen version, or 0 if the ranges do not overlap.
    pub version: u16,
    /// Lowest protocol version the server speaks.
    pub min_version: u16,
    /// Highest protocol version the server speaks.
    pub max_version: u16,
    /// The server's node name.
    pub node: String,
    /// The server's random nonce.
    pub nonce: [u8; 32],
}

/// Most key proofs in one [`Auth`]: the current key and the next one during a key rotation.
pub const MAX_AUTH_PROOFS: u8 = 2;

/// Whether the session after the handshake is encrypted (`encryption` in the configuration).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Encryption {
    /// MAC only: the stream is authenticated but readable (zero-copy sends).
    #[default]
    None,
    /// ChaCha20-Poly1305 over every payload.
    Aead,
}

impl Encryption {
    /// The configuration word: `none` or `aead`.
    pub fn as_str(self) -> &'static str {
        match self {
            Encryption::None => "none",
            Encryption::Aead => "aead",
        }
    }

    /// The wire byte.
    pub fn code(self) -> u8 {
        match self {
            Encryption::None => 0,
            Encryption::Aead => 1,
        }
    }

    /// The setting with wire byte `code`, if known.
    pub fn from_code(code: u8) -> Option<Encryption> {
        match code {
            0 => Some(Encryption::None),
            1 => Some(Encryption::Aead),
            _ => None,
        }
    }
}

impl std::fmt::Display for Encryption {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Client's proof of its key (or keys, during a rotation) and its encryption setting.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Auth {
    /// The client's `encryption` setting (bound into every proof).
    pub encryption: Encryption,
    /// One proof per key the client holds (1..=[`MAX_AUTH_PROOFS`]): the current key's, then the next key's.
    pub proofs: Vec<Hash>,
}

/// A refusal or failure.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErrorMsg {
    /// One of [`code`] (unknown codes are kept as they are).
    pub code: u16,
    /// Human-readable cause, naming what failed and what to do.
    pub message: String,
}

/// Client opens a volume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenVolume {
    /// Volume name as configured on both nodes.
    pub name: String,
    /// Size of the source volume in bytes.
    pub source_size: u64,
    /// Block size of the source's manifest.
    pub block_size: u32,
}

/// One protocol message; each is carried by the frame type of the same name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// See [`Hello`].
    Hello(Hello),
    /// See [`HelloAck`].
    HelloAck(HelloAck),
    /// See [`Auth`].
    Auth(Auth),
    /// Server's proof of the key.
    AuthOk([u8; 32]),
    /// See [`ErrorMsg`].
    Error(ErrorMsg),
    /// See [`OpenVolume`].
    OpenVolume(OpenVolume),
    /// The shadow's state, answering [`OpenVolume`].
    VolumeInfo(TargetInfo),
    /// Starts a transfer.
    Begin(BeginPlan),
    /// Accepts a transfer.
    BeginAck(BeginAck),
    /// Hashes of blocks `first..first + count` of the shadow, in the plan's block size.
    BlockHashesReq {
        /// First block.
        first: u64,
        /// Number of blocks (at most [`MAX_HASH_BATCH`]).
        count: u32,
    },
    /// Answer to `BlockHashesReq`.
    BlockHashes(Vec<Hash>),
    /// Sub-block hashes of the listed blocks (at most [`MAX_SUB_BLOCKS`]).
    SubHashesReq(Vec<u64>),
    /// Answer to `SubHashesReq`, back to back.
    SubHashes(Vec<Hash>),
    /// A run of bytes to write.
    Extent(Extent),
    /// Commit the transfer; the source's root hash.
    Commit(Hash),
    /// Confirms a commit.
    CommitAck(CommitAck),
    /// Orderly end of the session.
    Bye,
    /// Asks the node's role.
    RoleReq,
    /// See [`RoleInfo`].
    RoleInfo(RoleInfo),
    /// Asks the node to demote itself; the reason.
    DemoteReq(String),
    /// The demote plan finished.
    DemoteDone,
    /// The client is still there (no answer).
    Keepalive,
    /// Switchover, from the node asked to demote: its services are stopped and this is what the final sync of
    /// each volume committed (at most [`MAX_FINAL_VOLUMES`]); it demotes only after [`Message::DemoteConfirm`].
    FinalSynced(Vec<Committed>),
    /// Switchover, from the asking node: its shadows hold every generation of [`Message::FinalSynced`].
    DemoteConfirm,
    /// Automatic fallback: asks the node to take its service back by a planned switchover; the reason.
    HandbackReq(String),
    /// The switchover asked for finished.
    HandbackDone,
}

/// One volume's generation committed by a switchover's final sync.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Committed {
    /// Volume name.
    pub volume: String,
    /// The generation number.
    pub generation: u64,
    /// Its identifier.
    pub id: link::GenId,
}

/// Most volumes in one [`Message::FinalSynced`].
pub const MAX_FINAL_VOLUMES: u32 = 1024;

/// A node's role, as `blockrep status` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoleInfo {
    /// 0 standby, 1 promoting, 2 primary, 3 demoting (anything above [`MAX_ROLE`] is refused).
    pub role: u8,
    /// The node's name.
    pub node: String,
}

/// Highest role code.
pub const MAX_ROLE: u8 = 3;

/// Errors of message encoding and decoding.
#[derive(Debug, thiserror::Error)]
pub enum MessageError {
    /// The payload ended inside a field.
    #[error("{ty} message is truncated: it ends inside field `{field}`")]
    Truncated {
        /// Frame type.
        ty: FrameType,
        /// The field being read.
        field: &'static str,
    },
    /// Bytes are left after the last field.
    #[error("{ty} message has {extra} unexpected bytes after its last field")]
    TrailingBytes {
        /// Frame type.
        ty: FrameType,
        /// Number of extra bytes.
        extra: usize,
    },
    /// A count or length exceeds its limit.
    #[error("{ty} message field `{field}` is {value}, more than the limit of {max}")]
    TooLarge {
        /// Frame type.
        ty: FrameType,
        /// The field.
        field: &'static str,
        /// Its value.
        value: u64,
        /// The limit.
        max: u64,
    },
    /// A list that must hold at least one item is empty.
    #[error("{ty} message field `{field}` is empty; it needs at least one item")]
    Empty {
        /// Frame type.
        ty: FrameType,
        /// The field.
        field: &'static str,
    },
    /// A string is not UTF-8.
    #[error("{ty} message field `{field}` is not valid UTF-8")]
    BadUtf8 {
        /// Frame type.
        ty: FrameType,
        /// The field.
        field: &'static str,
    },
    /// A bool or option tag is neither 0 nor 1.
    #[error("{ty} message field `{field}` has value {value}, expected 0 or 1")]
    BadTag {
        /// Frame type.
        ty: FrameType,
        /// The field.
        field: &'static str,
        /// The byte found.
        value: u8,
    },
    /// An extent has unknown or contradictory flag bits.
    #[error("extent at offset {offset} has invalid flags {flags:#04x} (known: ZSTD 0x01, ZERO 0x02, not both)")]
    ExtentFlags {
        /// Extent offset.
        offset: u64,
        /// The flags found.
        flags: u8,
    },
    /// An extent has length 0 or its end overflows.
    #[error("extent at offset {offset} with length {len} is empty or ends past 2^64")]
    ExtentRange {
        /// Extent offset.
        offset: u64,
        /// Extent length.
        len: u64,
    },
    /// The payload of an extent does not have the announced length.
    #[error("extent at offset {offset} announces {len} bytes but its payload holds {found}")]
    ExtentLength {
        /// Extent offset.
        offset: u64,
        /// Announced length.
        len: u64,
        /// Length found (after decompression).
        found: u64,
    },
    /// A compressed payload does not decompress within the announced length.
    #[error("extent at offset {offset} (length {len}) does not decompress: {source}")]
    Decompress {
        /// Extent offset.
        offset: u64,
        /// Announced length.
        len: u64,
        /// The zstd error.
        #[source]
        source: std::io::Error,
    },
    /// Compression failed on the sending side.
    #[error("compressing the extent at offset {offset} failed")]
    Compress {
        /// Extent offset.
        offset: u64,
        /// The zstd error.
        #[source]
        source: std::io::Error,
    },
    /// A zero-length data extent or a data extent of the wrong length was given to the encoder.
    #[error("extent at offset {offset} announces {len} bytes but carries {found}")]
    BadExtent {
        /// Extent offset.
        offset: u64,
        /// Announced length.
        len: u64,
        /// Data length.
        found: u64,
    },
}

/// An extent is compressed only when a sample of it compresses (a probe): an eighth of the extent, at least
/// [`PROBE_MIN`] and at most [`PROBE_MAX`] bytes, taken as [`PROBE_MIN`]-byte pieces spread evenly over the
/// extent (an extent may join a compressible block and an incompressible one). Incompressible data then costs
/// zstd's work on the sample, not on the whole extent, and every extent is judged on its own content (a run of
/// incompressible extents does not stop the compression of the text next to them).
pub const PROBE_MAX: usize = 4096;
/// See [`PROBE_MAX`]; extents shorter than twice this are compressed without a probe.
pub const PROBE_MIN: usize = 512;

/// A zstd compressor for extents, reused across frames. Extents are probed first ([`PROBE_MAX`]).
pub struct ExtentCompressor {
    level: i32,
    ctx: zstd::bulk::Compressor<'static>,
    /// The probe's sample (reused).
    sample: Vec<u8>,
}

impl std::fmt::Debug for ExtentCompressor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExtentCompressor").field("level", &self.level).finish()
    }
}

/// Whether `out` bytes are a saving worth sending for `raw` bytes ([`COMPRESS_MAX_PERCENT`]).
fn pays(out: usize, raw: usize) -> bool {
    (out as u64) * 100 < (raw as u64) * COMPRESS_MAX_PERCENT
}

impl ExtentCompressor {
    /// A compressor at zstd `level` (1..=22; negative levels are zstd's fast modes).
    pub fn new(level: i32) -> Result<Self, MessageError> {
        let ctx = zstd::bulk::Compressor::new(level).map_err(|source| MessageError::Compress { offset: 0, source })?;
        Ok(ExtentCompressor { level, ctx, sample: Vec::with_capacity(PROBE_MAX) })
    }

    /// The zstd level.
    pub fn level(&self) -> i32 {
        self.level
    }

    /// Compresses `data`; `None` when compression does not pay (result at least [`COMPRESS_MAX_PERCENT`] % of
    /// the input), or when the probe of a sample spread over it ([`PROBE_MAX`]) does not.
    pub fn compress(&mut self, offset: u64, data: &[u8]) -> Result<Option<Vec<u8>>, MessageError> {
        let n = (data.len() / 8).clamp(PROBE_MIN, PROBE_MAX);
        if data.len() >= 2 * n {
            let pieces = n / PROBE_MIN;
            self.sample.clear();
            for i in 0..pieces {
                // Piece i is centred in the i-th of `pieces` equal parts of the extent.
                let at = (2 * i + 1) * data.len() / (2 * pieces) - PROBE_MIN / 2;
                self.sample.extend_from_slice(&data[at..at + PROBE_MIN]);
            }
            let probe = self.ctx.compress(&self.sample).map_err(|source| MessageError::Compress { offset, source })?;
            if !pays(probe.len(), self.sample.len()) {
                return Ok(None);
            }
        }
        let out = self.ctx.compress(data).map_err(|source| MessageError::Compress { offset, source })?;
        Ok(pays(out.len(), data.len()).then_some(out))
    }
}

struct Writer(Vec<u8>);

impl Writer {
    fn u8(&mut self, v: u8) {
        self.0.push(v);
    }
    fn u16(&mut self, v: u16) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn bool(&mut self, v: bool) {
        self.u8(v as u8);
    }
    fn hash(&mut self, h: &Hash) {
        self.0.extend_from_slice(h);
    }
    fn str(&mut self, ty: FrameType, field: &'static str, s: &str, max: usize) -> Result<(), MessageError> {
        limit(ty, field, s.len() as u64, max as u64)?;
        self.u16(s.len() as u16);
        self.0.extend_from_slice(s.as_bytes());
        Ok(())
    }
    fn hashes(&mut self, ty: FrameType, hs: &[Hash]) -> Result<(), MessageError> {
        limit(ty, "count", hs.len() as u64, MAX_HASH_BATCH as u64)?;
        self.u32(hs.len() as u32);
        self.0.reserve(hs.len() * 32);
        for h in hs {
            self.hash(h);
        }
        Ok(())
    }
}

fn limit(ty: FrameType, field: &'static str, value: u64, max: u64) -> Result<(), MessageError> {
    if value > max {
        return Err(MessageError::TooLarge { ty, field, value, max });
    }
    Ok(())
}

struct Reader<'a> {
    ty: FrameType,
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, field: &'static str) -> Result<&'a [u8], MessageError> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.buf.len());
        let end = end.ok_or(MessageError::Truncated { ty: self.ty, field })?;
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn array<const N: usize>(&mut self, field: &'static str) -> Result<[u8; N], MessageError> {
        Ok(self.take(N, field)?.try_into().expect("length checked"))
    }
    fn u8(&mut self, field: &'static str) -> Result<u8, MessageError> {
        Ok(self.take(1, field)?[0])
    }
    fn u16(&mut self, field: &'static str) -> Result<u16, MessageError> {
        Ok(u16::from_le_bytes(self.array(field)?))
    }
    fn u32(&mut self, field: &'static str) -> Result<u32, MessageError> {
        Ok(u32::from_le_bytes(self.array(field)?))
    }
    fn u64(&mut self, field: &'static str) -> Result<u64, MessageError> {
        Ok(u64::from_le_bytes(self.array(field)?))
    }
    fn bool(&mut self, field: &'static str) -> Result<bool, MessageError> {
        match self.u8(field)? {
            0 => Ok(false),
            1 => Ok(true),
            value => Err(MessageError::BadTag { ty: self.ty, field, value }),
        }
    }
    fn hash(&mut self, field: &'static str) -> Result<Hash, MessageError> {
        self.array(field)
    }
    fn str(&mut self, field: &'static str, max: usize) -> Result<String, MessageError> {
        let len = self.u16(field)?;
        limit(self.ty, field, len as u64, max as u64)?;
        let b = self.take(len as usize, field)?;
        let s = std::str::from_utf8(b).map_err(|_| MessageError::BadUtf8 { ty: self.ty, field })?;
        Ok(s.to_owned())
    }
    fn count(&mut self, field: &'static str, max: u32, item_len: usize) -> Result<usize, MessageError> {
        let n = self.u32(field)?;
        limit(self.ty, field, n as u64, max as u64)?;
        // Refuse a count the remaining bytes cannot hold before allocating for it.
        let need = (n as usize).checked_mul(item_len).ok_or(MessageError::Truncated { ty: self.ty, field })?;
        if need > self.buf.len() - self.pos {
            return Err(MessageError::Truncated { ty: self.ty, field });
        }
        Ok(n as usize)
    }
    fn hashes(&mut self) -> Result<Vec<Hash>, MessageError> {
        let n = self.count("count", MAX_HASH_BATCH, 32)?;
        (0..n).map(|_| self.hash("hashes")).collect()
    }
    fn finish(self) -> Result<(), MessageError> {
        let extra = self.buf.len() - self.pos;
        if extra != 0 {
            return Err(MessageError::TrailingBytes { ty: self.ty, extra });
        }
        Ok(())
    }
}

impl Message {
    /// The frame type that carries this message.
    pub fn frame_type(&self) -> FrameType {
        match self {
            Message::Hello(_) => FrameType::Hello,
            Message::HelloAck(_) => FrameType::HelloAck,
            Message::Auth(_) => FrameType::Auth,
            Message::AuthOk(_) => FrameType::AuthOk,
            Message::Error(_) => FrameType::Error,
            Message::OpenVolume(_) => FrameType::OpenVolume,
            Message::VolumeInfo(_) => FrameType::VolumeInfo,
            Message::Begin(_) => FrameType::Begin,
            Message::BeginAck(_) => FrameType::BeginAck,
            Message::BlockHashesReq { .. } => FrameType::BlockHashesReq,
            Message::BlockHashes(_) => FrameType::BlockHashes,
            Message::SubHashesReq(_) => FrameType::SubHashesReq,
            Message::SubHashes(_) => FrameType::SubHashes,
            Message::Extent(_) => FrameType::Extent,
            Message::Commit(_) => FrameType::Commit,
            Message::CommitAck(_) => FrameType::CommitAck,
            Message::Bye => FrameType::Bye,
            Message::RoleReq => FrameType::RoleReq,
            Message::RoleInfo(_) => FrameType::RoleInfo,
            Message::DemoteReq(_) => FrameType::DemoteReq,
            Message::DemoteDone => FrameType::DemoteDone,
            Message::FinalSynced(_) => FrameType::FinalSynced,
            Message::DemoteConfirm => FrameType::DemoteConfirm,
            Message::HandbackReq(_) => FrameType::HandbackReq,
            Message::HandbackDone => FrameType::HandbackDone,
            Message::Keepalive => FrameType::Keepalive,
        }
    }

    /// Encodes the payload as a head (the fields) and a body (an extent's data, shared, not copied). With a
    /// compressor, data extents are zstd-compressed when that pays.
    pub fn encode(&self, zstd: Option<&mut ExtentCompressor>) -> Result<(Vec<u8>, Bytes), MessageError> {
        let ty = self.frame_type();
        let mut w = Writer(Vec::with_capacity(64));
        let mut body = Bytes::new();
        match self {
            Message::Hello(h) => {
                w.u16(h.min_version);
                w.u16(h.max_version);
                w.str(ty, "node", &h.node, MAX_NAME_LEN)?;
                w.hash(&h.nonce);
            }
            Message::HelloAck(h) => {
                w.u16(h.version);
                w.u16(h.min_version);
                w.u16(h.max_version);
                w.str(ty, "node", &h.node, MAX_NAME_LEN)?;
                w.hash(&h.nonce);
            }
            Message::Auth(a) => {
                w.u8(a.encryption.code());
                if a.proofs.is_empty() {
                    return Err(MessageError::Empty { ty, field: "proofs" });
                }
                limit(ty, "proofs", a.proofs.len() as u64, MAX_AUTH_PROOFS as u64)?;
                w.u8(a.proofs.len() as u8);
                for p in &a.proofs {
                    w.hash(p);
                }
            }
            Message::AuthOk(p) | Message::Commit(p) => w.hash(p),
            Message::Error(e) => {
                w.u16(e.code);
                w.str(ty, "message", &e.message, MAX_ERROR_LEN)?;
            }
            Message::OpenVolume(o) => {
                w.str(ty, "name", &o.name, MAX_NAME_LEN)?;
                w.u64(o.source_size);
                w.u32(o.block_size);
            }
            Message::VolumeInfo(v) => {
                w.u64(v.volume_size);
                w.u64(v.generation);
                w.u32(v.block_size);
                w.bool(v.root.is_some());
                if let Some(r) = &v.root {
                    w.hash(r);
                }
                w.bool(v.complete);
                w.bool(v.pending.is_some());
                if let Some(p) = &v.pending {
                    w.u64(p.generation);
                    w.u64(p.base_generation);
                    w.u64(p.bytes);
                    w.u64(p.end_offset);
                }
                w.bool(v.generation_id.is_some());
                if let Some(id) = &v.generation_id {
                    w.0.extend_from_slice(id);
                }
                w.bool(v.trusted);
                w.str(ty, "distrust", &v.distrust, MAX_ERROR_LEN)?;
                limit(ty, "history", v.history.len() as u64, MAX_HISTORY as u64)?;
                w.u8(v.history.len() as u8);
                for h in &v.history {
                    w.u64(h.generation);
                    w.0.extend_from_slice(&h.id);
                    w.u64(h.time);
                    w.str(ty, "history.node", &h.node, MAX_NAME_LEN)?;
                }
            }
            Message::Begin(b) => {
                w.u64(b.generation);
                w.u64(b.base_generation);
                w.u64(b.volume_size);
                w.u32(b.block_size);
                w.bool(b.resume);
                w.u8(match b.mode {
                    PlanMode::Incremental => 0,
                    PlanMode::Compare => 1,
                    PlanMode::Full => 2,
                });
                w.0.extend_from_slice(&b.id);
            }
            Message::BeginAck(a) => {
                w.bool(a.resumed);
                w.bool(a.in_place);
            }
            Message::BlockHashesReq { first, count } => {
                limit(ty, "count", *count as u64, MAX_HASH_BATCH as u64)?;
                w.u64(*first);
                w.u32(*count);
            }
            Message::BlockHashes(hs) | Message::SubHashes(hs) => w.hashes(ty, hs)?,
            Message::SubHashesReq(blocks) => {
                limit(ty, "count", blocks.len() as u64, MAX_SUB_BLOCKS as u64)?;
                w.u32(blocks.len() as u32);
                for b in blocks {
                    w.u64(*b);
                }
            }
            Message::Extent(e) => {
                let (offset, len) = (e.offset, e.len);
                if len == 0 || offset.checked_add(len).is_none() {
                    return Err(MessageError::ExtentRange { offset, len });
                }
                w.u64(offset);
                w.u64(len);
                match &e.data {
                    ExtentData::Zero => {
                        limit(ty, "len", len, MAX_ZERO_EXTENT_LEN)?;
                        w.u8(EXTENT_ZERO)
                    }
                    ExtentData::Data(d) => {
                        if d.len() as u64 != len {
                            return Err(MessageError::BadExtent { offset, len, found: d.len() as u64 });
                        }
                        limit(ty, "len", len, MAX_EXTENT_LEN)?;
                        match zstd.map(|z| z.compress(offset, d)).transpose()?.flatten() {
                            Some(c) => {
                                w.u8(EXTENT_ZSTD);
                                body = Bytes::from(c);
                            }
                            None => {
                                w.u8(0);
                                body = d.clone();
                            }
                        }
                    }
                }
            }
            Message::CommitAck(c) => {
                w.u64(c.generation);
                w.hash(&c.root);
            }
            Message::Bye
            | Message::RoleReq
            | Message::DemoteDone
            | Message::Keepalive
            | Message::DemoteConfirm
            | Message::HandbackDone => {}
            Message::RoleInfo(r) => {
                w.u8(r.role);
                w.str(ty, "node", &r.node, MAX_NAME_LEN)?;
            }
            Message::DemoteReq(reason) | Message::HandbackReq(reason) => w.str(ty, "reason", reason, MAX_ERROR_LEN)?,
            Message::FinalSynced(list) => {
                limit(ty, "count", list.len() as u64, MAX_FINAL_VOLUMES as u64)?;
                w.u32(list.len() as u32);
                for c in list {
                    w.str(ty, "volume", &c.volume, MAX_NAME_LEN)?;
                    w.u64(c.generation);
                    w.0.extend_from_slice(&c.id);
                }
            }
        }
        Ok((w.0, body))
    }

    /// Decodes the payload of a frame of type `ty`. An extent's raw data is a slice of `payload`, not a copy.
    pub fn decode(ty: FrameType, payload: Bytes) -> Result<Message, MessageError> {
        let mut r = Reader { ty, buf: &payload, pos: 0 };
        let msg = match ty {
            FrameType::Hello => Message::Hello(Hello {
                min_version: r.u16("min_version")?,
                max_version: r.u16("max_version")?,
                node: r.str("node", MAX_NAME_LEN)?,
                nonce: r.hash("nonce")?,
            }),
            FrameType::HelloAck => Message::HelloAck(HelloAck {
                version: r.u16("version")?,
                min_version: r.u16("min_version")?,
                max_version: r.u16("max_version")?,
                node: r.str("node", MAX_NAME_LEN)?,
                nonce: r.hash("nonce")?,
            }),
            FrameType::Auth => {
                let code = r.u8("encryption")?;
                let encryption =
                    Encryption::from_code(code).ok_or(MessageError::BadTag { ty, field: "encryption", value: code })?;
                let n = r.u8("proofs")?;
                limit(ty, "proofs", n as u64, MAX_AUTH_PROOFS as u64)?;
                if n == 0 {
                    return Err(MessageError::Empty { ty, field: "proofs" });
                }
                let proofs = (0..n).map(|_| r.hash("proof")).collect::<Result<_, _>>()?;
                Message::Auth(Auth { encryption, proofs })
            }
            FrameType::AuthOk => Message::AuthOk(r.hash("proof")?),
            FrameType::Error => {
                Message::Error(ErrorMsg { code: r.u16("code")?, message: r.str("message", MAX_ERROR_LEN)? })
            }
            FrameType::OpenVolume => Message::OpenVolume(OpenVolume {
                name: r.str("name", MAX_NAME_LEN)?,
                source_size: r.u64("source_size")?,
                block_size: r.u32("block_size")?,
            }),
            FrameType::VolumeInfo => {
                let volume_size = r.u64("shadow_size")?;
                let generation = r.u64("generation")?;
                let block_size = r.u32("block_size")?;
                let root = if r.bool("root")? { Some(r.hash("root")?) } else { None };
                let complete = r.bool("complete")?;
                let pending = if r.bool("pending")? {
                    Some(PendingInfo {
                        generation: r.u64("pending.generation")?,
                        base_generation: r.u64("pending.base_generation")?,
                        bytes: r.u64("pending.bytes")?,
                        end_offset: r.u64("pending.end_offset")?,
                    })
                } else {
                    None
                };
                let generation_id = if r.bool("generation_id")? { Some(r.array("generation_id")?) } else { None };
                let trusted = r.bool("trusted")?;
                let distrust = r.str("distrust", MAX_ERROR_LEN)?;
                let n = r.u8("history")?;
                limit(ty, "history", n as u64, MAX_HISTORY as u64)?;
                let mut history = Vec::with_capacity(n as usize);
                for _ in 0..n {
                    history.push(GenRecord {
                        generation: r.u64("history.generation")?,
                        id: r.array("history.id")?,
                        time: r.u64("history.time")?,
                        node: r.str("history.node", MAX_NAME_LEN)?,
                    });
                }
                Message::VolumeInfo(TargetInfo {
                    volume_size,
                    generation,
                    block_size,
                    root,
                    complete,
                    pending,
                    generation_id,
                    trusted,
                    distrust,
                    history,
                })
            }
            FrameType::Begin => Message::Begin(BeginPlan {
                generation: r.u64("generation")?,
                base_generation: r.u64("base_generation")?,
                volume_size: r.u64("volume_size")?,
                block_size: r.u32("block_size")?,
                resume: r.bool("resume")?,
                mode: match r.u8("mode")? {
                    0 => PlanMode::Incremental,
                    1 => PlanMode::Compare,
                    2 => PlanMode::Full,
                    value => return Err(MessageError::BadTag { ty, field: "mode", value }),
                },
                id: r.array("id")?,
            }),
            FrameType::BeginAck => {
                Message::BeginAck(BeginAck { resumed: r.bool("resumed")?, in_place: r.bool("in_place")? })
            }
            FrameType::BlockHashesReq => {
                let first = r.u64("first")?;
                let count = r.u32("count")?;
                limit(ty, "count", count as u64, MAX_HASH_BATCH as u64)?;
                Message::BlockHashesReq { first, count }
            }
            FrameType::BlockHashes => Message::BlockHashes(r.hashes()?),
            FrameType::SubHashes => Message::SubHashes(r.hashes()?),
            FrameType::SubHashesReq => {
                let n = r.count("count", MAX_SUB_BLOCKS, 8)?;
                Message::SubHashesReq((0..n).map(|_| r.u64("blocks")).collect::<Result<_, _>>()?)
            }
            FrameType::Extent => {
                let offset = r.u64("offset")?;
                let len = r.u64("len")?;
                let flags = r.u8("flags")?;
                if len == 0 || offset.checked_add(len).is_none() {
                    return Err(MessageError::ExtentRange { offset, len });
                }
                if flags & !EXTENT_SUPPORTED_FLAGS != 0 || flags == EXTENT_ZSTD | EXTENT_ZERO {
                    return Err(MessageError::ExtentFlags { offset, flags });
                }
                let rest = payload.len() - r.pos;
                r.pos = payload.len();
                let data = if flags & EXTENT_ZERO != 0 {
                    if rest != 0 {
                        return Err(MessageError::ExtentLength { offset, len, found: rest as u64 });
                    }
                    limit(ty, "len", len, MAX_ZERO_EXTENT_LEN)?;
                    ExtentData::Zero
                } else {
                    limit(ty, "len", len, MAX_EXTENT_LEN)?;
                    let raw = payload.slice(EXTENT_HEAD_LEN..);
                    let data = if flags & EXTENT_ZSTD != 0 {
                        // The capacity caps the output: a payload that expands past `len` is an error, never
                        // a larger allocation.
                        let out = zstd::bulk::decompress(&raw, len as usize)
                            .map_err(|source| MessageError::Decompress { offset, len, source })?;
                        Bytes::from(out)
                    } else {
                        raw
                    };
                    if data.len() as u64 != len {
                        return Err(MessageError::ExtentLength { offset, len, found: data.len() as u64 });
                    }
                    ExtentData::Data(data)
                };
                Message::Extent(Extent { offset, len, data })
            }
            FrameType::Commit => Message::Commit(r.hash("root")?),
            FrameType::CommitAck => {
                Message::CommitAck(CommitAck { generation: r.u64("generation")?, root: r.hash("root")? })
            }
            FrameType::Bye => Message::Bye,
            FrameType::RoleReq => Message::RoleReq,
            FrameType::RoleInfo => {
                let role = r.u8("role")?;
                if role > MAX_ROLE {
                    return Err(MessageError::TooLarge { ty, field: "role", value: role as u64, max: MAX_ROLE as u64 });
                }
                Message::RoleInfo(RoleInfo { role, node: r.str("node", MAX_NAME_LEN)? })
            }
            FrameType::DemoteReq => Message::DemoteReq(r.str("reason", MAX_ERROR_LEN)?),
            FrameType::DemoteDone => Message::DemoteDone,
            FrameType::Keepalive => Message::Keepalive,
            FrameType::FinalSynced => {
                // Each entry is at least a 2-byte name length, a generation and an identifier.
                let n = r.count("count", MAX_FINAL_VOLUMES, 2 + 8 + 16)?;
                let mut list = Vec::with_capacity(n);
                for _ in 0..n {
                    let volume = r.str("volume", MAX_NAME_LEN)?;
                    list.push(Committed { volume, generation: r.u64("generation")?, id: r.array("id")? });
                }
                Message::FinalSynced(list)
            }
            FrameType::DemoteConfirm => Message::DemoteConfirm,
            FrameType::HandbackReq => Message::HandbackReq(r.str("reason", MAX_ERROR_LEN)?),
            FrameType::HandbackDone => Message::HandbackDone,
        };
        r.finish()?;
        Ok(msg)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use proptest::prelude::*;

    fn hash() -> impl Strategy<Value = Hash> {
        any::<[u8; 32]>()
    }

    fn name(max: usize) -> impl Strategy<Value = String> {
        proptest::string::string_regex(&format!(".{{0,{}}}", max / 4)).unwrap()
    }

    fn extent() -> impl Strategy<Value = Extent> {
        let data = prop_oneof![
            Just(None),
            proptest::collection::vec(any::<u8>(), 1..3000).prop_map(Some),
            // Compressible data.
            (1usize..20_000, any::<u8>()).prop_map(|(n, b)| Some((0..n).map(|i| b ^ (i / 97) as u8).collect())),
        ];
        (0u64..1 << 40, data, 1u64..1 << 30).prop_map(|(offset, data, zlen)| match data {
            None => Extent { offset, len: zlen, data: ExtentData::Zero },
            Some(d) => Extent { offset, len: d.len() as u64, data: ExtentData::Data(Bytes::from(d)) },
        })
    }

    /// Any valid message.
    pub(crate) fn message() -> impl Strategy<Value = Message> {
        prop_oneof![
            (any::<u16>(), any::<u16>(), name(MAX_NAME_LEN), hash())
                .prop_map(|(a, b, node, nonce)| Message::Hello(Hello { min_version: a, max_version: b, node, nonce })),
            (any::<u16>(), any::<u16>(), any::<u16>(), name(MAX_NAME_LEN), hash()).prop_map(
                |(version, a, b, node, nonce)| Message::HelloAck(HelloAck {
                    version,
                    min_version: a,
                    max_version: b,
                    node,
                    nonce
                })
            ),
            (any::<bool>(), proptest::collection::vec(hash(), 1..=MAX_AUTH_PROOFS as usize)).prop_map(|(e, proofs)| {
                Message::Auth(Auth { encryption: if e { Encryption::Aead } else { Encryption::None }, proofs })
            }),
            hash().prop_map(Message::AuthOk),
            (any::<u16>(), name(MAX_ERROR_LEN)).prop_map(|(code, message)| Message::Error(ErrorMsg { code, message })),
            (name(MAX_NAME_LEN), any::<u64>(), any::<u32>()).prop_map(|(name, source_size, block_size)| {
                Message::OpenVolume(OpenVolume { name, source_size, block_size })
            }),
            (
                any::<(u64, u64, u32, bool)>(),
                proptest::option::of(hash()),
                proptest::option::of(any::<(u64, u64, u64, u64)>()),
                (proptest::option::of(any::<[u8; 16]>()), any::<bool>(), name(MAX_ERROR_LEN)),
                proptest::collection::vec(
                    (any::<u64>(), any::<[u8; 16]>(), any::<u64>(), name(MAX_NAME_LEN))
                        .prop_map(|(generation, id, time, node)| GenRecord { generation, id, time, node }),
                    0..=MAX_HISTORY
                ),
            )
                .prop_map(
                    |((volume_size, generation, block_size, complete), root, p, (gid, trusted, distrust), history)| {
                        Message::VolumeInfo(TargetInfo {
                            volume_size,
                            generation,
                            block_size,
                            root,
                            complete,
                            pending: p.map(|(generation, base_generation, bytes, end_offset)| PendingInfo {
                                generation,
                                base_generation,
                                bytes,
                                end_offset,
                            }),
                            generation_id: gid,
                            trusted,
                            distrust,
                            history,
                        })
                    }
                ),
            (any::<(u64, u64, u64, u32, bool)>(), 0..3u8, any::<[u8; 16]>()).prop_map(
                |((generation, base_generation, volume_size, block_size, resume), mode, id)| Message::Begin(
                    BeginPlan {
                        generation,
                        base_generation,
                        volume_size,
                        block_size,
                        resume,
                        mode: [PlanMode::Incremental, PlanMode::Compare, PlanMode::Full][mode as usize],
                        id,
                    }
                )
            ),
            any::<(bool, bool)>().prop_map(|(resumed, in_place)| Message::BeginAck(BeginAck { resumed, in_place })),
            (any::<u64>(), 0..=MAX_HASH_BATCH).prop_map(|(first, count)| Message::BlockHashesReq { first, count }),
            proptest::collection::vec(hash(), 0..100).prop_map(Message::BlockHashes),
            proptest::collection::vec(any::<u64>(), 0..=MAX_SUB_BLOCKS as usize).prop_map(Message::SubHashesReq),
            proptest::collection::vec(hash(), 0..100).prop_map(Message::SubHashes),
            extent().prop_map(Message::Extent),
            hash().prop_map(Message::Commit),
            (any::<u64>(), hash()).prop_map(|(generation, root)| Message::CommitAck(CommitAck { generation, root })),
            Just(Message::Bye),
            Just(Message::RoleReq),
            Just(Message::DemoteDone),
            Just(Message::Keepalive),
            Just(Message::DemoteConfirm),
            Just(Message::HandbackDone),
            "[ -~]{0,40}".prop_map(Message::HandbackReq),
            proptest::collection::vec(
                ("[a-z]{1,12}", any::<u64>(), any::<[u8; 16]>()).prop_map(|(volume, generation, id)| Committed {
                    volume,
                    generation,
                    id
                }),
                0..5
            )
            .prop_map(Message::FinalSynced),
            (0..=MAX_ROLE, "[a-z]{1,12}").prop_map(|(role, node)| Message::RoleInfo(RoleInfo { role, node })),
            "[ -~]{0,40}".prop_map(Message::DemoteReq),
        ]
    }

    fn encode_joined(m: &Message, z: Option<&mut ExtentCompressor>) -> Vec<u8> {
        let (mut head, body) = m.encode(z).unwrap();
        head.extend_from_slice(&body);
        head
    }

    proptest! {
        #[test]
        fn every_message_round_trips(m in message(), level in prop_oneof![Just(None), Just(Some(1)), Just(Some(3))]) {
            let mut z = level.map(|l| ExtentCompressor::new(l).unwrap());
            let payload = encode_joined(&m, z.as_mut());
            let back = Message::decode(m.frame_type(), Bytes::from(payload.clone())).unwrap();
            prop_assert_eq!(&back, &m);
            // Every strict prefix is refused (never panics, never accepted as a message).
            let ty = m.frame_type();
            for cut in [0, payload.len() / 2, payload.len().saturating_sub(1)] {
                if cut < payload.len() {
                    let short = Message::decode(ty, Bytes::from(payload[..cut].to_vec()));
                    prop_assert!(short.is_err(), "prefix of {} bytes decoded as {:?}", cut, short);
                }
            }
        }
    }

    #[test]
    fn compression_is_used_only_when_it_pays() {
        let mut z = ExtentCompressor::new(3).unwrap();
        let zeros_ish = Bytes::from(vec![5u8; 1 << 20]);
        let m = Message::Extent(Extent { offset: 0, len: 1 << 20, data: ExtentData::Data(zeros_ish) });
        let (head, body) = m.encode(Some(&mut z)).unwrap();
        assert_eq!(head[16], EXTENT_ZSTD);
        assert!(body.len() < 1000);
        let random = Bytes::from(noise(1 << 20));
        let m = Message::Extent(Extent { offset: 0, len: 1 << 20, data: ExtentData::Data(random.clone()) });
        let (head, body) = m.encode(Some(&mut z)).unwrap();
        assert_eq!(head[16], 0, "incompressible data is sent raw");
        // Sent raw: the body is the caller's buffer itself, not a copy, and so is the slice handed to writev.
        assert_eq!(body.as_ptr(), random.as_ptr());
        assert_eq!(body.len(), 1 << 20);
        let f = crate::frame::EncodedFrame::new(1, FrameType::Extent, 0, head, body, None);
        let slices = f.io_slices();
        assert_eq!(slices.len(), 3, "header, extent fields, data");
        assert_eq!(slices[2].as_ptr(), random.as_ptr());
    }

    /// Incompressible bytes (xorshift64).
    fn noise(n: usize) -> Vec<u8> {
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    #[test]
    fn each_extent_is_judged_on_its_own_content() {
        let mut z = ExtentCompressor::new(1).unwrap();
        let noise = noise(1 << 20);
        let text: Vec<u8> = (0..1u32 << 20).map(|i| b"INSERT INTO calls VALUES (42);\n"[i as usize % 31]).collect();
        // A long run of incompressible extents, large and small, does not stop the compression of the next
        // compressible one.
        for _ in 0..32 {
            assert!(z.compress(0, &noise).unwrap().is_none());
            assert!(z.compress(0, &noise[..4096]).unwrap().is_none());
        }
        let c = z.compress(0, &text).unwrap().expect("text after noise is compressed");
        assert_eq!(zstd::bulk::decompress(&c, text.len()).unwrap(), text);
        assert!(z.compress(0, &text[..4096]).unwrap().is_some());
        // An extent joining a compressible block and incompressible ones is compressed (the probe samples all
        // of it); one of noise alone is not.
        let mut joined = noise[..192 << 10].to_vec();
        joined[..64 << 10].copy_from_slice(&text[..64 << 10]);
        let c = z.compress(0, &joined).unwrap().expect("a third of text pays");
        assert!(c.len() < joined.len() * 3 / 4);
        assert!(z.compress(0, &noise[..192 << 10]).unwrap().is_none());
    }

    #[test]
    fn raw_extent_decodes_without_copy() {
        let data = Bytes::from(vec![9u8; 4096]);
        let m = Message::Extent(Extent { offset: 4096, len: 4096, data: ExtentData::Data(data) });
        let payload = Bytes::from(encode_joined(&m, None));
        let Message::Extent(e) = Message::decode(FrameType::Extent, payload.clone()).unwrap() else { panic!() };
        let ExtentData::Data(d) = e.data else { panic!() };
        assert_eq!(d.as_ptr(), payload[EXTENT_HEAD_LEN..].as_ptr());
    }

    #[test]
    fn zstd_bomb_is_capped_at_the_extent_length() {
        let big = zstd::bulk::compress(&vec![0u8; 8 << 20], 3).unwrap();
        let mut p = Vec::new();
        p.extend_from_slice(&0u64.to_le_bytes());
        p.extend_from_slice(&4096u64.to_le_bytes());
        p.push(EXTENT_ZSTD);
        p.extend_from_slice(&big);
        let e = Message::decode(FrameType::Extent, Bytes::from(p)).unwrap_err();
        assert!(matches!(e, MessageError::Decompress { offset: 0, len: 4096, .. }), "{e}");
        // Decompresses to fewer bytes than announced.
        let small = zstd::bulk::compress(&[1u8; 100], 3).unwrap();
        let mut p = Vec::new();
        p.extend_from_slice(&0u64.to_le_bytes());
        p.extend_from_slice(&4096u64.to_le_bytes());
        p.push(EXTENT_ZSTD);
        p.extend_from_slice(&small);
        let e = Message::decode(FrameType::Extent, Bytes::from(p)).unwrap_err();
        assert!(matches!(e, MessageError::ExtentLength { found: 100, .. }), "{e}");
    }

    #[test]
    fn bad_fields_are_named() {
        // Hash count larger than the payload: refused before allocating.
        let mut p = Vec::new();
        p.extend_from_slice(&(MAX_HASH_BATCH).to_le_bytes());
        let e = Message::decode(FrameType::BlockHashes, Bytes::from(p)).unwrap_err();
        assert_eq!(e.to_string(), "BlockHashes (11) message is truncated: it ends inside field `count`");
        let mut p = Vec::new();
        p.extend_from_slice(&(MAX_HASH_BATCH + 1).to_le_bytes());
        let e = Message::decode(FrameType::BlockHashes, Bytes::from(p)).unwrap_err();
        assert!(e.to_string().contains("more than the limit of 262144"), "{e}");
        let e = Message::decode(FrameType::BeginAck, Bytes::from_static(&[1, 2])).unwrap_err();
        assert_eq!(e.to_string(), "BeginAck (9) message field `in_place` has value 2, expected 0 or 1");
        let e = Message::decode(FrameType::Bye, Bytes::from_static(&[0])).unwrap_err();
        assert!(matches!(e, MessageError::TrailingBytes { extra: 1, .. }));
        let mut p = vec![0u8; 16];
        p[8] = 1;
        p.push(0x04);
        let e = Message::decode(FrameType::Extent, Bytes::from(p)).unwrap_err();
        assert!(e.to_string().contains("invalid flags 0x04"), "{e}");
    }
}
