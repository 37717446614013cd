//! The spool: a per-volume redo log of the extents of one transfer, closed by a commit record.
//!
//! The target appends every incoming extent to the spool before touching the shadow. Once the whole transfer is
//! spooled, the commit record is appended and the spool fsynced; only then are the records applied to the shadow.
//! After a crash, a spool with a valid commit record is rolled forward (applied again, which is idempotent), and a
//! spool without one is not applied at all, so the shadow never holds part of a transfer.
//!
//! # Layout
//!
//! All integers little-endian.
//!
//! ```text
//! header (64 bytes)
//!      0    8  magic "BRSPOOL1"
//!      8    4  version (1)
//!     12    4  flags (none defined; any set bit is an error naming it)
//!     16    8  generation being built
//!     24    8  base generation
//!     32    8  volume_size
//!     40    4  block_size
//!     44    4  reserved (0)
//!     48    4  crc32 of bytes 0..48
//!     52   12  zero padding
//! records, each:
//!      0    1  kind: 1 data, 2 zero extent, 3 commit
//!      1    3  zero
//!      4    4  crc32 of the payload
//!      8    8  offset in the volume (commit: 0)
//!     16    8  length in the volume (commit: payload length, 56)
//!     24    4  reserved (0)
//!     28    4  crc32 of record bytes 0..28
//!     32    .  payload: `length` bytes for data, none for a zero extent, for commit:
//!              generation u64, root [32], record count u64 (records before the commit), data bytes u64
//! ```
//!
//! Records lie inside the volume. Within one session they come in increasing, non-overlapping offset order; a
//! resumed session may go back and overwrite what an earlier session spooled (the source's content changed in
//! between), which starts a new *segment*: a record starting before the previous record's end. Records are
//! applied in file order, so later records win. Data records carry at most
//! [`MAX_RECORD_PAYLOAD`] bytes (longer extents are split). Parsing is two-phase per record: the fixed header is
//! checked (crc, kind, limits, checked arithmetic) before its payload is read.
//!
//! Appends are buffered; the buffer is written when it reaches [`WRITE_BUFFER`] bytes and the spool is fsynced
//! every [`SYNC_INTERVAL`] bytes, so an interrupted transfer leaves a durable prefix that a later session resumes
//! from. A torn tail (an incomplete or corrupt last record) marks the end of that prefix.
//!
//! A spool whose last record is a valid commit record but whose body fails a check is refused
//! ([`SpoolError::CorruptCommitted`]): it is never applied, and never silently discarded either.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::durable::{Durable, Op, Writeback};
use crate::hash::BlockHash;
use crate::layout::{Get, PrefixError, Put};

/// File magic.
pub const MAGIC: &[u8; 8] = b"BRSPOOL1";
/// Format version written and accepted.
pub const VERSION: u32 = 1;
/// Header length.
pub const HEADER_LEN: usize = 64;
/// Fixed length of a record header.
pub const RECORD_HEADER_LEN: usize = 32;
/// Largest payload of one data record.
pub const MAX_RECORD_PAYLOAD: u64 = 16 << 20;
/// Payload length of the commit record.
pub const COMMIT_PAYLOAD_LEN: usize = 56;
/// Flag bits this version understands (none).
pub const SUPPORTED_FLAGS: u32 = 0;
/// Appends are written to the file once this many bytes are buffered.
pub const WRITE_BUFFER: usize = 1 << 20;
/// The spool is fsynced after every this many appended bytes, so resume has a durable prefix.
pub const SYNC_INTERVAL: u64 = 64 << 20;

const KIND_DATA: u8 = 1;
const KIND_ZERO: u8 = 2;
const KIND_COMMIT: u8 = 3;
const READ_CHUNK: usize = 1 << 20;

/// Errors of the spool.
#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    /// An I/O operation failed.
    #[error("cannot {action} spool {path}")]
    Io {
        /// What was being done.
        action: &'static str,
        /// The spool path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The filesystem of the state directory is full.
    #[error(
        "spool for volume {volume} is full: needs at least {needed} bytes so far, {free} bytes free on {}; \
         free space there, or move the state directory (`state_dir` in the configuration; --state-dir for \
         `sync --local`)",
        dir.display()
    )]
    Full {
        /// Volume name.
        volume: String,
        /// Bytes of spool written or being written so far.
        needed: u64,
        /// Bytes available to unprivileged users on the filesystem.
        free: u64,
        /// The state directory.
        dir: PathBuf,
    },
    /// Shorter than a header.
    #[error("the spool is {len} bytes long, shorter than its {HEADER_LEN}-byte header")]
    TooShort {
        /// Length.
        len: u64,
    },
    /// Wrong magic.
    #[error("bad magic {found:02x?}: this is not a blockrep spool")]
    BadMagic {
        /// The first 8 bytes.
        found: [u8; 8],
    },
    /// Unsupported version.
    #[error("spool version {found} is not supported (this blockrep reads version {VERSION})")]
    BadVersion {
        /// Version found.
        found: u32,
    },
    /// Unknown flags.
    #[error("unknown spool flag bits {bits:#x}")]
    UnknownFlags {
        /// The unknown bits.
        bits: u32,
    },
    /// Header crc mismatch (or non-zero padding).
    #[error("spool header fails its crc32 (or its padding is not zero)")]
    HeaderCrc,
    /// Invalid geometry in the header.
    #[error("spool header has an invalid block size {block_size}")]
    Geometry {
        /// Block size.
        block_size: u32,
    },
    /// A record is cut off by the end of the file.
    #[error("record at byte {pos} is cut off by the end of the spool (torn write)")]
    Torn {
        /// File position of the record.
        pos: u64,
    },
    /// A record header fails its crc.
    #[error("record header at byte {pos} fails its crc32")]
    RecordCrc {
        /// File position.
        pos: u64,
    },
    /// A record payload fails its crc.
    #[error("payload of the record at byte {pos} (volume offset {offset}) fails its crc32")]
    PayloadCrc {
        /// File position.
        pos: u64,
        /// Volume offset of the record.
        offset: u64,
    },
    /// Unknown record kind.
    #[error("record at byte {pos} has unknown kind {kind}")]
    BadKind {
        /// File position.
        pos: u64,
        /// The kind byte.
        kind: u8,
    },
    /// A record is malformed (length, range, order, reserved bytes, or placement of the commit record).
    #[error("record at byte {pos} is malformed: {what}")]
    Malformed {
        /// File position.
        pos: u64,
        /// What is wrong.
        what: String,
    },
    /// A committed spool fails a check: it must not be applied.
    #[error(
        "spool {path} holds a committed transfer but fails its checks, so it was not applied; the shadow may not be \
         a complete generation: do not promote it, move the spool away and run a full sync from the primary"
    )]
    CorruptCommitted {
        /// The spool path.
        path: PathBuf,
        /// The failed check.
        #[source]
        source: Box<SpoolError>,
    },
}

/// The spool header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpoolHeader {
    /// Generation being built.
    pub generation: u64,
    /// Generation the transfer is based on.
    pub base_generation: u64,
    /// Volume size.
    pub volume_size: u64,
    /// Block size.
    pub block_size: u32,
}

impl SpoolHeader {
    /// Encodes the header.
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        Put::header(&mut b, MAGIC, VERSION)
            .u32(0) // flags
            .u64(self.generation)
            .u64(self.base_generation)
            .u64(self.volume_size)
            .u32(self.block_size)
            .zeros(4)
            .crc();
        b
    }

    /// Checks and decodes a header.
    pub fn decode(b: &[u8]) -> Result<SpoolHeader, SpoolError> {
        let mut g = Get::header(b, HEADER_LEN, MAGIC, VERSION).map_err(|e| match e {
            PrefixError::TooShort { len } => SpoolError::TooShort { len: len as u64 },
            PrefixError::BadMagic { found } => SpoolError::BadMagic { found },
            PrefixError::BadVersion { found } => SpoolError::BadVersion { found },
        })?;
        let flags = g.u32();
        let h =
            SpoolHeader { generation: g.u64(), base_generation: g.u64(), volume_size: g.u64(), block_size: g.u32() };
        let reserved = g.u32();
        if g.crc().is_err() || !g.rest_is_zero() {
            return Err(SpoolError::HeaderCrc);
        }
        if flags & !SUPPORTED_FLAGS != 0 {
            return Err(SpoolError::UnknownFlags { bits: flags & !SUPPORTED_FLAGS });
        }
        if crate::hash::validate_block_size(h.block_size as u64).is_err() || reserved != 0 {
            return Err(SpoolError::Geometry { block_size: h.block_size });
        }
        Ok(h)
    }
}

/// What a record writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecordKind {
    /// Payload bytes, stored at `payload_pos` in the spool file.
    Data,
    /// Zeros, no payload.
    Zero,
}

/// One spooled extent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Record {
    /// Kind.
    pub kind: RecordKind,
    /// Volume offset.
    pub offset: u64,
    /// Length in the volume.
    pub len: u64,
    /// File position of the payload (data records; for zero records, where a payload would start).
    pub payload_pos: u64,
}

impl Record {
    /// End offset in the volume.
    pub fn end(&self) -> u64 {
        self.offset + self.len
    }
}

/// The content of a commit record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CommitInfo {
    /// The generation committed.
    pub generation: u64,
    /// Its root hash.
    pub root: BlockHash,
    /// Number of extent records before the commit record.
    pub record_count: u64,
    /// Sum of the extent lengths.
    pub data_bytes: u64,
}

/// The result of scanning a spool.
#[derive(Debug)]
pub struct Scan {
    /// Header.
    pub header: SpoolHeader,
    /// Valid extent records, in file order.
    pub records: Vec<Record>,
    /// Index of the first record of each segment (a run of records in increasing offset order); starts with 0
    /// when there are records.
    pub segments: Vec<usize>,
    /// Length of the valid prefix (header, records and commit record).
    pub valid_len: u64,
    /// The commit record, if the spool is committed.
    pub commit: Option<CommitInfo>,
    /// Why the scan stopped before the end of the file (a torn or corrupt tail), if it did.
    pub tail_error: Option<SpoolError>,
}

impl Scan {
    /// Sum of the extent lengths of the valid records.
    pub fn bytes(&self) -> u64 {
        self.records.iter().map(|r| r.len).sum()
    }
    /// Largest end offset of the valid records (0 if none): everything the source sent up to there is spooled.
    pub fn end_offset(&self) -> u64 {
        self.records.iter().map(|r| r.end()).max().unwrap_or(0)
    }
}

/// Positional reads from a spool image: a file, or bytes in memory (fuzzing, tests).
pub trait ReadAt {
    /// Length of the image.
    fn size(&self) -> std::io::Result<u64>;
    /// Fills `buf` from position `pos`.
    fn read_exact_at(&self, buf: &mut [u8], pos: u64) -> std::io::Result<()>;
}

impl ReadAt for File {
    fn size(&self) -> std::io::Result<u64> {
        Ok(self.metadata()?.len())
    }
    fn read_exact_at(&self, buf: &mut [u8], pos: u64) -> std::io::Result<()> {
        FileExt::read_exact_at(self, buf, pos)
    }
}

impl ReadAt for [u8] {
    fn size(&self) -> std::io::Result<u64> {
        Ok(self.len() as u64)
    }
    fn read_exact_at(&self, buf: &mut [u8], pos: u64) -> std::io::Result<()> {
        let start = usize::try_from(pos).ok().filter(|&p| p <= self.len());
        match start.and_then(|s| s.checked_add(buf.len()).filter(|&e| e <= self.len()).map(|e| (s, e))) {
            Some((s, e)) => {
                buf.copy_from_slice(&self[s..e]);
                Ok(())
            }
            None => Err(std::io::ErrorKind::UnexpectedEof.into()),
        }
    }
}

/// A checked record header.
struct RawRecord {
    kind: u8,
    payload_crc: u32,
    offset: u64,
    len: u64,
    payload_len: u64,
}

/// Encodes a record header: kind, 3 zero bytes, payload crc, offset, length, 4 reserved bytes, crc.
fn record_header(kind: u8, payload_crc: u32, offset: u64, len: u64) -> [u8; RECORD_HEADER_LEN] {
    let mut h = [0u8; RECORD_HEADER_LEN];
    Put::new(&mut h).u8(kind).zeros(3).u32(payload_crc).u64(offset).u64(len).zeros(4).crc();
    h
}

/// Phase one for a record: checks the fixed header (crc, kind, limits, range) without reading the payload.
fn check_record_header(b: &[u8; RECORD_HEADER_LEN], pos: u64, volume_size: u64) -> Result<RawRecord, SpoolError> {
    let mut g = Get::new(b);
    let (kind, pad, payload_crc, offset, len, reserved) = (g.u8(), g.array::<3>(), g.u32(), g.u64(), g.u64(), g.u32());
    if g.crc().is_err() {
        return Err(SpoolError::RecordCrc { pos });
    }
    let malformed = |what: String| SpoolError::Malformed { pos, what };
    if pad != [0, 0, 0] || reserved != 0 {
        return Err(malformed("reserved bytes are not zero".into()));
    }
    let r = RawRecord { kind, payload_crc, offset, len, payload_len: 0 };
    let payload_len = match r.kind {
        KIND_DATA => {
            if r.len == 0 || r.len > MAX_RECORD_PAYLOAD {
                return Err(malformed(format!("data length {} is outside 1..={MAX_RECORD_PAYLOAD}", r.len)));
            }
            r.len
        }
        KIND_ZERO => {
            if r.len == 0 {
                return Err(malformed("zero extent of length 0".into()));
            }
            0
        }
        KIND_COMMIT => {
            if r.offset != 0 || r.len != COMMIT_PAYLOAD_LEN as u64 {
                return Err(malformed("commit record with offset or length set".into()));
            }
            COMMIT_PAYLOAD_LEN as u64
        }
        kind => return Err(SpoolError::BadKind { pos, kind }),
    };
    if r.kind != KIND_COMMIT {
        match r.offset.checked_add(r.len) {
            Some(end) if end <= volume_size => {}
            _ => {
                return Err(malformed(format!(
                    "extent at offset {} of length {} lies outside the {volume_size}-byte volume",
                    r.offset, r.len
                )))
            }
        }
    }
    Ok(RawRecord { payload_len, ..r })
}

fn payload_crc<R: ReadAt + ?Sized>(r: &R, pos: u64, len: u64) -> std::io::Result<u32> {
    let mut h = crc32fast::Hasher::new();
    let mut buf = vec![0u8; READ_CHUNK.min(len as usize)];
    let mut done = 0u64;
    while done < len {
        let n = (len - done).min(buf.len() as u64) as usize;
        r.read_exact_at(&mut buf[..n], pos + done)?;
        h.update(&buf[..n]);
        done += n as u64;
    }
    Ok(h.finalize())
}

fn decode_commit(p: &[u8]) -> CommitInfo {
    let mut g = Get::new(p);
    CommitInfo { generation: g.u64(), root: g.array(), record_count: g.u64(), data_bytes: g.u64() }
}

/// Whether the image ends with a valid commit record (checked independently of the records before it).
fn tail_commit<R: ReadAt + ?Sized>(r: &R, len: u64) -> Option<CommitInfo> {
    let total = (RECORD_HEADER_LEN + COMMIT_PAYLOAD_LEN) as u64;
    let pos = len.checked_sub(total)?;
    let mut b = [0u8; RECORD_HEADER_LEN + COMMIT_PAYLOAD_LEN];
    r.read_exact_at(&mut b, pos).ok()?;
    let head: [u8; RECORD_HEADER_LEN] = b[..RECORD_HEADER_LEN].try_into().expect("32 bytes");
    let raw = check_record_header(&head, pos, u64::MAX).ok()?;
    let payload = &b[RECORD_HEADER_LEN..];
    (raw.kind == KIND_COMMIT && crc32fast::hash(payload) == raw.payload_crc).then(|| decode_commit(payload))
}

/// Scans a spool image: header, then records up to the first invalid one.
///
/// * `Err(CorruptCommitted)`: the image ends with a valid commit record but something before it fails a check.
/// * other `Err`: the header is invalid and the spool is not committed (the caller discards it).
/// * `Ok(scan)` with `commit: Some`: a complete committed transfer.
/// * `Ok(scan)` with `commit: None`: an uncommitted transfer; `valid_len` ends its valid prefix and `tail_error`
///   says why the rest (if any) was rejected.
pub fn scan<R: ReadAt + ?Sized>(r: &R, path: &Path) -> Result<Scan, SpoolError> {
    let io = |source| SpoolError::Io { action: "read", path: path.to_owned(), source };
    let len = r.size().map_err(io)?;
    let committed_corrupt = |e: SpoolError| -> SpoolError {
        if tail_commit(r, len).is_some() {
            SpoolError::CorruptCommitted { path: path.to_owned(), source: Box::new(e) }
        } else {
            e
        }
    };
    let mut hb = [0u8; HEADER_LEN];
    if len < HEADER_LEN as u64 {
        return Err(SpoolError::TooShort { len });
    }
    r.read_exact_at(&mut hb, 0).map_err(io)?;
    let header = SpoolHeader::decode(&hb).map_err(committed_corrupt)?;
    let mut scan = Scan {
        header,
        records: Vec::new(),
        segments: Vec::new(),
        valid_len: HEADER_LEN as u64,
        commit: None,
        tail_error: None,
    };
    let mut pos = HEADER_LEN as u64;
    let mut prev_end = 0u64;
    let mut data_bytes = 0u64;
    let stop = loop {
        if pos == len {
            break None;
        }
        let body_start = match pos.checked_add(RECORD_HEADER_LEN as u64) {
            Some(e) if e <= len => e,
            _ => break Some(SpoolError::Torn { pos }),
        };
        let mut rb = [0u8; RECORD_HEADER_LEN];
        r.read_exact_at(&mut rb, pos).map_err(io)?;
        let raw = match check_record_header(&rb, pos, header.volume_size) {
            Ok(raw) => raw,
            Err(e) => break Some(e),
        };
        let next = match body_start.checked_add(raw.payload_len) {
            Some(e) if e <= len => e,
            _ => break Some(SpoolError::Torn { pos }),
        };
        if payload_crc(r, body_start, raw.payload_len).map_err(io)? != raw.payload_crc {
            break Some(SpoolError::PayloadCrc { pos, offset: raw.offset });
        }
        if raw.kind == KIND_COMMIT {
            let mut p = [0u8; COMMIT_PAYLOAD_LEN];
            r.read_exact_at(&mut p, body_start).map_err(io)?;
            let c = decode_commit(&p);
            let malformed = |what: String| SpoolError::Malformed { pos, what };
            if next != len {
                break Some(malformed(format!("{} bytes follow the commit record", len - next)));
            }
            if c.record_count != scan.records.len() as u64 || c.data_bytes != data_bytes {
                break Some(malformed(format!(
                    "commit record counts {} records and {} bytes, the spool holds {} records and {} bytes",
                    c.record_count,
                    c.data_bytes,
                    scan.records.len(),
                    data_bytes
                )));
            }
            if c.generation != header.generation {
                break Some(malformed(format!(
                    "commit record is for generation {}, the header for {}",
                    c.generation, header.generation
                )));
            }
            scan.commit = Some(c);
            scan.valid_len = next;
            break None;
        }
        if raw.offset < prev_end || scan.records.is_empty() {
            scan.segments.push(scan.records.len());
        }
        prev_end = raw.offset + raw.len;
        data_bytes += raw.len;
        let kind = if raw.kind == KIND_DATA { RecordKind::Data } else { RecordKind::Zero };
        scan.records.push(Record { kind, offset: raw.offset, len: raw.len, payload_pos: body_start });
        pos = next;
        scan.valid_len = next;
    };
    if let Some(e) = stop {
        let e = committed_corrupt(e);
        if matches!(e, SpoolError::CorruptCommitted { .. }) {
            return Err(e);
        }
        scan.tail_error = Some(e);
    }
    Ok(scan)
}

/// Decodes a spool held in memory. The fuzz target calls this.
pub fn decode(bytes: &[u8]) -> Result<Scan, SpoolError> {
    scan(bytes, Path::new("<memory>"))
}

/// Bytes available to unprivileged users on the filesystem holding `dir` (0 if unknown).
pub fn free_space(dir: &Path) -> u64 {
    nix::sys::statvfs::statvfs(dir).map_or(0, |s| s.blocks_available() * s.fragment_size())
}

/// Appends records to a spool file.
#[derive(Debug)]
pub struct SpoolWriter {
    file: File,
    path: PathBuf,
    volume: String,
    header: SpoolHeader,
    durable: Durable,
    buf: Vec<u8>,
    /// File position of `buf[0]`.
    buf_pos: u64,
    unsynced: u64,
    /// What was written since the last fsync and whose writeback is not started yet.
    writeback: Writeback,
    records: Vec<Record>,
    segments: Vec<usize>,
    /// End of the last record appended in this session (extents of a session come in increasing order).
    session_end: u64,
    data_bytes: u64,
}

impl SpoolWriter {
    /// Creates (or truncates) the spool at `path` for a new transfer. The header is buffered like a record.
    pub fn create(path: &Path, header: SpoolHeader, volume: &str, durable: Durable) -> Result<Self, SpoolError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)
            .map_err(|source| SpoolError::Io { action: "create", path: path.to_owned(), source })?;
        let mut w = SpoolWriter {
            file,
            path: path.to_owned(),
            volume: volume.to_owned(),
            header,
            durable,
            buf: Vec::with_capacity(WRITE_BUFFER),
            buf_pos: 0,
            unsynced: 0,
            writeback: Writeback::default(),
            records: Vec::new(),
            segments: Vec::new(),
            session_end: 0,
            data_bytes: 0,
        };
        w.buf.extend_from_slice(&header.encode());
        Ok(w)
    }

    /// Continues the uncommitted spool described by `scan`: drops its invalid tail (durably) and appends after its
    /// valid prefix. The new session's first extent may lie anywhere (it may overwrite spooled records).
    pub fn resume(path: &Path, scan: Scan, volume: &str, durable: Durable) -> Result<Self, SpoolError> {
        let io = |action, source| SpoolError::Io { action, path: path.to_owned(), source };
        let file = OpenOptions::new().read(true).write(true).open(path).map_err(|e| io("open", e))?;
        let len = file.metadata().map_err(|e| io("stat", e))?.len();
        if len != scan.valid_len {
            durable.set_len(Op::SpoolTruncate, &file, scan.valid_len).map_err(|e| io("truncate", e))?;
            durable.sync_all(Op::SpoolSync, &file).map_err(|e| io("fsync", e))?;
        }
        let data_bytes = scan.bytes();
        Ok(SpoolWriter {
            file,
            path: path.to_owned(),
            volume: volume.to_owned(),
            header: scan.header,
            durable,
            buf: Vec::with_capacity(WRITE_BUFFER),
            buf_pos: scan.valid_len,
            unsynced: 0,
            writeback: Writeback::default(),
            records: scan.records,
            segments: scan.segments,
            session_end: 0,
            data_bytes,
        })
    }

    /// The header.
    pub fn header(&self) -> &SpoolHeader {
        &self.header
    }
    /// The records appended so far (including resumed ones).
    pub fn records(&self) -> &[Record] {
        &self.records
    }
    /// Sum of the extent lengths so far.
    pub fn data_bytes(&self) -> u64 {
        self.data_bytes
    }
    /// Largest end offset of the records (0 if none).
    pub fn end_offset(&self) -> u64 {
        self.records.iter().map(|r| r.end()).max().unwrap_or(0)
    }
    /// Index of the first record of each segment (runs of records in increasing offset order; later segments
    /// overwrite earlier ones).
    pub fn segments(&self) -> &[usize] {
        &self.segments
    }

    fn add(&mut self, rec: Record) {
        if self.records.last().is_none_or(|last| rec.offset < last.end()) {
            self.segments.push(self.records.len());
        }
        self.session_end = rec.end();
        self.data_bytes += rec.len;
        self.records.push(rec);
    }
    /// The spool path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Encodes a record into the buffer (nothing is written yet); returns the file position of its payload.
    fn encode_record(&mut self, kind: u8, offset: u64, len: u64, payload: &[u8]) -> u64 {
        self.buf.extend_from_slice(&record_header(kind, crc32fast::hash(payload), offset, len));
        let payload_pos = self.buf_pos + self.buf.len() as u64;
        self.buf.extend_from_slice(payload);
        payload_pos
    }

    /// Writes the buffer when it is full, fsyncs every [`SYNC_INTERVAL`] bytes.
    fn maybe_flush(&mut self) -> Result<(), SpoolError> {
        if self.buf.len() >= WRITE_BUFFER {
            self.flush()?;
        }
        if self.unsynced >= SYNC_INTERVAL {
            self.sync()?;
        }
        Ok(())
    }

    fn check_extent(&self, offset: u64, len: u64) -> Result<(), SpoolError> {
        let pos = self.buf_pos + self.buf.len() as u64;
        let malformed = |what: String| SpoolError::Malformed { pos, what };
        match offset.checked_add(len) {
            Some(end) if end <= self.header.volume_size && len > 0 => {}
            _ => {
                return Err(malformed(format!(
                    "extent at offset {offset} of length {len} lies outside the {}-byte volume",
                    self.header.volume_size
                )))
            }
        }
        if offset < self.session_end {
            return Err(malformed(format!(
                "extent at offset {offset} starts before the previous one ends ({})",
                self.session_end
            )));
        }
        Ok(())
    }

    /// Appends data at volume `offset` (split into records of at most [`MAX_RECORD_PAYLOAD`] bytes).
    pub fn append_data(&mut self, offset: u64, data: &[u8]) -> Result<(), SpoolError> {
        self.check_extent(offset, data.len() as u64)?;
        for (i, chunk) in data.chunks(MAX_RECORD_PAYLOAD as usize).enumerate() {
            let off = offset + i as u64 * MAX_RECORD_PAYLOAD;
            let payload_pos = self.encode_record(KIND_DATA, off, chunk.len() as u64, chunk);
            self.add(Record { kind: RecordKind::Data, offset: off, len: chunk.len() as u64, payload_pos });
            self.maybe_flush()?;
        }
        Ok(())
    }

    /// Appends a zero extent.
    pub fn append_zero(&mut self, offset: u64, len: u64) -> Result<(), SpoolError> {
        self.check_extent(offset, len)?;
        let payload_pos = self.encode_record(KIND_ZERO, offset, len, &[]);
        self.add(Record { kind: RecordKind::Zero, offset, len, payload_pos });
        self.maybe_flush()
    }

    /// Writes buffered appends to the file (not fsynced).
    pub fn flush(&mut self) -> Result<(), SpoolError> {
        if self.buf.is_empty() {
            return Ok(());
        }
        match self.durable.write_all_at(Op::SpoolAppend, &self.file, &self.buf, self.buf_pos) {
            Ok(()) => {
                let len = self.buf.len() as u64;
                // The disk writes the spool while the transfer goes on: the fsyncs wait for the last few writes.
                self.writeback.wrote(&self.file, self.buf_pos, len);
                self.buf_pos += len;
                self.unsynced += len;
                self.buf.clear();
                Ok(())
            }
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => {
                let dir = self.path.parent().unwrap_or(Path::new(".")).to_owned();
                Err(SpoolError::Full {
                    volume: self.volume.clone(),
                    needed: self.buf_pos + self.buf.len() as u64,
                    free: free_space(&dir),
                    dir,
                })
            }
            Err(source) => Err(SpoolError::Io { action: "append to", path: self.path.clone(), source }),
        }
    }

    /// Flushes and fsyncs, so every record so far survives a crash.
    pub fn sync(&mut self) -> Result<(), SpoolError> {
        self.flush()?;
        self.durable.sync_data(Op::SpoolSync, &self.file).map_err(|source| SpoolError::Io {
            action: "fsync",
            path: self.path.clone(),
            source,
        })?;
        self.unsynced = 0;
        self.writeback.synced();
        Ok(())
    }

    /// Fsyncs the records, then appends the commit record for `root` and fsyncs again. After this returns, the
    /// transfer is committed.
    pub fn commit(&mut self, root: &BlockHash) -> Result<CommitInfo, SpoolError> {
        // Records first, durably: the commit record must never reach the disk before the records it commits.
        self.sync()?;
        let c = CommitInfo {
            generation: self.header.generation,
            root: *root,
            record_count: self.records.len() as u64,
            data_bytes: self.data_bytes,
        };
        let mut p = [0u8; COMMIT_PAYLOAD_LEN];
        Put::new(&mut p).u64(c.generation).bytes(&c.root).u64(c.record_count).u64(c.data_bytes);
        self.encode_record(KIND_COMMIT, 0, COMMIT_PAYLOAD_LEN as u64, &p);
        self.sync()?;
        Ok(c)
    }

    /// The uncommitted spool as [`scan`] would find it, without reading it back. Call after a successful
    /// [`SpoolWriter::sync`] (everything appended is then in the file).
    pub fn into_scan(self) -> Scan {
        debug_assert!(self.buf.is_empty(), "into_scan after sync");
        Scan {
            header: self.header,
            records: self.records,
            segments: self.segments,
            valid_len: self.buf_pos,
            commit: None,
            tail_error: None,
        }
    }

    /// Reads `buf.len()` payload bytes of a data record, starting `skip` bytes into it.
    pub fn read_payload(&mut self, rec: &Record, skip: u64, buf: &mut [u8]) -> Result<(), SpoolError> {
        self.flush()?;
        read_payload(&self.file, &self.path, rec, skip, buf)
    }

    /// The underlying file (for reading payloads after a flush).
    pub fn file(&self) -> &File {
        &self.file
    }
}

/// Reads `buf.len()` payload bytes of data record `rec`, starting `skip` bytes into it, from a spool file.
pub fn read_payload(file: &File, path: &Path, rec: &Record, skip: u64, buf: &mut [u8]) -> Result<(), SpoolError> {
    debug_assert!(rec.kind == RecordKind::Data && skip + buf.len() as u64 <= rec.len);
    FileExt::read_exact_at(file, buf, rec.payload_pos + skip).map_err(|source| SpoolError::Io {
        action: "read",
        path: path.to_owned(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header() -> SpoolHeader {
        SpoolHeader { generation: 5, base_generation: 4, volume_size: 1 << 20, block_size: 4096 }
    }

    fn write_sample(path: &Path, commit: bool) -> Vec<u8> {
        let mut w = SpoolWriter::create(path, header(), "vol", Durable::new()).unwrap();
        w.append_data(4096, &[7u8; 5000]).unwrap();
        w.append_zero(16384, 8192).unwrap();
        w.append_data(65536, b"hello").unwrap();
        if commit {
            w.commit(&[3u8; 32]).unwrap();
            std::fs::read(path).unwrap()
        } else {
            w.sync().unwrap();
            let mine = w.into_scan();
            let bytes = std::fs::read(path).unwrap();
            let read_back = decode(&bytes).unwrap();
            assert_eq!(
                (mine.header, &mine.records, &mine.segments, mine.valid_len),
                (read_back.header, &read_back.records, &read_back.segments, read_back.valid_len),
                "into_scan matches what a scan reads back"
            );
            bytes
        }
    }

    #[test]
    fn round_trip_committed() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("spool");
        let bytes = write_sample(&p, true);
        let s = decode(&bytes).unwrap();
        assert_eq!(s.header, header());
        assert_eq!(s.records.len(), 3);
        assert_eq!(s.valid_len, bytes.len() as u64);
        let c = s.commit.unwrap();
        assert_eq!((c.generation, c.root, c.record_count, c.data_bytes), (5, [3u8; 32], 3, 5000 + 8192 + 5));
        let f = File::open(&p).unwrap();
        let mut buf = [0u8; 5];
        read_payload(&f, &p, &s.records[2], 0, &mut buf).unwrap();
        assert_eq!(&buf, b"hello");
        assert_eq!(s.records[1].kind, RecordKind::Zero);
    }

    #[test]
    fn torn_tail_of_uncommitted_spool_is_cut_and_resumable() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("spool");
        let mut bytes = write_sample(&p, false);
        let good_len = bytes.len() as u64;
        bytes.extend_from_slice(&[0xAB; 40]); // garbage tail
        std::fs::write(&p, &bytes).unwrap();
        let s = scan(&File::open(&p).unwrap(), &p).unwrap();
        assert!(s.commit.is_none());
        assert_eq!(s.valid_len, good_len);
        assert!(s.tail_error.is_some());
        assert_eq!((s.bytes(), s.end_offset()), (5000 + 8192 + 5, 65541));
        let mut w = SpoolWriter::resume(&p, s, "vol", Durable::new()).unwrap();
        // A resumed session may overwrite spooled records (a new segment), in increasing order within itself.
        w.append_data(4100, b"x").unwrap();
        assert!(w.append_data(4099, b"y").is_err(), "going backwards within a session is refused");
        w.append_data(100_000, b"more").unwrap();
        assert_eq!(w.segments(), &[0, 3]);
        w.commit(&[1u8; 32]).unwrap();
        let s = decode(&std::fs::read(&p).unwrap()).unwrap();
        assert_eq!(s.records.len(), 5);
        assert_eq!(s.segments, vec![0, 3]);
        assert_eq!(s.end_offset(), 100_004);
        assert!(s.commit.is_some() && s.tail_error.is_none());

        // A record cut in half is a torn tail, not an error.
        let full = std::fs::read(&p).unwrap();
        let s = decode(&full[..full.len() - 60]).unwrap();
        assert!(matches!(s.tail_error, Some(SpoolError::Torn { .. })), "{:?}", s.tail_error);
        assert!(s.commit.is_none());
    }

    #[test]
    fn corrupt_committed_spool_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("spool");
        let good = write_sample(&p, true);
        // Flip a payload byte of the first record.
        let mut b = good.clone();
        b[HEADER_LEN + RECORD_HEADER_LEN + 10] ^= 1;
        let e = decode(&b).unwrap_err();
        assert!(
            matches!(&e, SpoolError::CorruptCommitted { source, .. } if matches!(**source, SpoolError::PayloadCrc { .. })),
            "{e:?}"
        );
        assert!(e.to_string().contains("not applied"), "{e}");
        // Corrupt header of a committed spool.
        let mut b = good.clone();
        b[20] ^= 1;
        assert!(matches!(decode(&b), Err(SpoolError::CorruptCommitted { .. })));
        // Corrupt header of an uncommitted spool: a plain header error (the caller discards it).
        let mut b = good[..good.len() - 88].to_vec();
        b[0] = 0;
        assert!(matches!(decode(&b), Err(SpoolError::BadMagic { .. })));
    }

    #[test]
    fn limits_and_ranges_are_enforced() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("spool");
        let mut w = SpoolWriter::create(&p, header(), "vol", Durable::new()).unwrap();
        assert!(w.append_data((1 << 20) - 2, b"abc").is_err(), "past the end of the volume");
        assert!(w.append_zero(u64::MAX, 2).is_err(), "overflowing offset");
        w.append_data(0, &[1u8; 4096]).unwrap();
        assert!(w.append_data(0, b"again").is_err(), "offsets must increase");
        let big = SpoolHeader { volume_size: 64 << 20, ..header() };
        let mut w = SpoolWriter::create(&dir.path().join("big"), big, "vol", Durable::new()).unwrap();
        w.append_data(10, &vec![1u8; (MAX_RECORD_PAYLOAD + 10) as usize]).unwrap();
        assert_eq!(w.records().len(), 2, "a long extent is split into records");
        w.commit(&[0u8; 32]).unwrap();
        let s = decode(&std::fs::read(dir.path().join("big")).unwrap()).unwrap();
        assert_eq!((s.records[1].offset, s.records[1].len), (10 + MAX_RECORD_PAYLOAD, 10));
        // A hand-made record with a length beyond the limit is rejected before its payload is read.
        let mut h = [0u8; RECORD_HEADER_LEN];
        h[0] = KIND_DATA;
        h[16..24].copy_from_slice(&(MAX_RECORD_PAYLOAD + 1).to_le_bytes());
        let crc = crc32fast::hash(&h[..28]);
        h[28..32].copy_from_slice(&crc.to_le_bytes());
        let mut img = header().encode().to_vec();
        img.extend_from_slice(&h);
        let s = decode(&img).unwrap();
        assert!(matches!(s.tail_error, Some(SpoolError::Malformed { .. })));
        assert!(s.records.is_empty());
    }

    /// The fuzz target's invariants, checked over every truncation and many random corruptions of a valid spool.
    #[test]
    fn decoder_survives_truncation_and_corruption() {
        use rand::{Rng, SeedableRng};
        let dir = tempfile::tempdir().unwrap();
        let good = write_sample(&dir.path().join("spool"), true);
        let check = |img: &[u8]| {
            if let Ok(s) = decode(img) {
                assert!(s.valid_len <= img.len() as u64);
                for r in &s.records {
                    assert!(r.len > 0 && r.end() <= s.header.volume_size);
                }
                if s.commit.is_some() {
                    assert_eq!(s.valid_len, img.len() as u64);
                }
            }
        };
        for len in 0..good.len() {
            check(&good[..len]);
            if len >= HEADER_LEN {
                let s = decode(&good[..len]).expect("a truncated uncommitted spool keeps its prefix");
                assert!(s.commit.is_none());
            }
        }
        let mut rng = rand::rngs::SmallRng::seed_from_u64(1);
        for _ in 0..3000 {
            let mut b = good.clone();
            for _ in 0..rng.gen_range(1..4) {
                let at = rng.gen_range(0..b.len());
                b[at] = rng.gen();
            }
            check(&b);
        }
    }
}
