//! Generation identities, histories and the evidence that a shadow is untouched.
//!
//! Every committed generation gets a random 128-bit identifier ([`link::GenId`]) chosen by the source. Each side
//! keeps, per volume, its current record and a bounded history of earlier ones ([`History`]):
//!
//! * the standby in its target state file (`target/state.rs`), with the evidence recorded at the last commit;
//! * the primary in `generations` beside its manifest ([`source_path`]), in the format drawn below, with the
//!   record of a transfer it proposed and that may have committed on the standby without this side knowing.
//!
//! # Layout of one record (65 bytes)
//!
//! ```text
//! offset size  field
//!      0    1  present (0: no record, then the rest is zero; 1: a record)
//!      1    8  generation
//!      9   16  identifier
//!     25    8  unix seconds
//!     33    1  length of the node name (at most 31)
//!     34   31  node name (UTF-8), zero padded
//! ```
//!
//! # Layout of the primary's `generations` file (2227 bytes, little-endian, see `crate::layout`)
//!
//! ```text
//! offset size  field
//!      0    8  magic "BRGENS01"
//!      8    4  version (1)
//!     12   65  current: the generation the manifest beside it describes (when the numbers agree)
//!     77   65  proposed: the generation a transfer in progress will commit
//!    142    1  number of earlier records (at most 32)
//!    143 2080  32 earlier records, newest first (unused ones zero)
//!   2223    4  crc32 of bytes 0..2223
//! ```

use std::fs::File;
use std::path::{Path, PathBuf};

use link::{GenId, GenRecord, MAX_HISTORY, MAX_RECORD_NODE};

use crate::durable::{Durable, Op};
use crate::layout::{Get, PrefixError, Put};

/// Length of one encoded record.
pub(crate) const RECORD_LEN: usize = 65;
/// Length of an encoded history (count and the records).
pub(crate) const HISTORY_LEN: usize = 1 + MAX_HISTORY * RECORD_LEN;
/// Name of the primary's file beside its manifest.
pub const SOURCE_FILE: &str = "generations";
const MAGIC: &[u8; 8] = b"BRGENS01";
const VERSION: u32 = 1;
/// Length of the primary's file.
pub const SOURCE_LEN: usize = 12 + 2 * RECORD_LEN + HISTORY_LEN + 4;

/// A new random generation identifier.
pub fn new_id() -> GenId {
    let mut id = [0u8; 16];
    getrandom::getrandom(&mut id).expect("the kernel's random source is available");
    id
}

/// An identifier as 32 hex digits.
pub fn id_hex(id: &GenId) -> String {
    id.iter().map(|b| format!("{b:02x}")).collect()
}

/// Unix seconds now.
pub fn now_secs() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// A record for `generation` with identifier `id`, made now by `node` (the name cut to [`MAX_RECORD_NODE`] bytes).
pub fn record(generation: u64, id: GenId, node: &str) -> GenRecord {
    let mut n = node.len().min(MAX_RECORD_NODE);
    while !node.is_char_boundary(n) {
        n -= 1;
    }
    GenRecord { generation, id, time: now_secs(), node: node[..n].to_owned() }
}

/// One line per record, for messages: `generation 7 id 0123... at 1700000000 by node a`.
pub fn describe(r: &GenRecord) -> String {
    format!("generation {} id {} at unix {} by {}", r.generation, id_hex(&r.id), r.time, r.node)
}

/// A side's current record and its earlier ones (newest first, at most [`MAX_HISTORY`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct History {
    /// The record of the current content.
    pub current: Option<GenRecord>,
    /// Earlier records, newest first.
    pub earlier: Vec<GenRecord>,
}

impl History {
    /// Makes `r` current; the previous current record becomes the newest earlier one (the oldest drop out).
    pub fn push(&mut self, r: GenRecord) {
        if let Some(c) = self.current.take() {
            if c.id != r.id {
                self.earlier.insert(0, c);
                self.earlier.truncate(MAX_HISTORY);
            }
        }
        self.current = Some(r);
    }

    /// Whether `id` is the current or an earlier identifier.
    pub fn contains(&self, id: &GenId) -> bool {
        self.current.iter().chain(&self.earlier).any(|r| &r.id == id)
    }

    /// Every record, newest first.
    pub fn all(&self) -> Vec<GenRecord> {
        self.current.iter().chain(&self.earlier).cloned().collect()
    }
}

pub(crate) fn put_record(p: &mut Put<'_>, r: Option<&GenRecord>) {
    match r {
        None => {
            p.zeros(RECORD_LEN);
        }
        Some(r) => {
            let node = &r.node.as_bytes()[..r.node.len().min(MAX_RECORD_NODE)];
            p.u8(1).u64(r.generation).bytes(&r.id).u64(r.time).u8(node.len() as u8).bytes(node);
            p.zeros(MAX_RECORD_NODE - node.len());
        }
    }
}

pub(crate) fn get_record(g: &mut Get<'_>) -> Result<Option<GenRecord>, String> {
    let present = g.u8();
    let (generation, id, time, len, node) = (g.u64(), g.array::<16>(), g.u64(), g.u8(), g.array::<31>());
    match present {
        0 => Ok(None),
        1 if (len as usize) <= MAX_RECORD_NODE => {
            let node = std::str::from_utf8(&node[..len as usize]).map_err(|_| "a node name is not UTF-8")?;
            Ok(Some(GenRecord { generation, id, time, node: node.to_owned() }))
        }
        1 => Err(format!("a node name of {len} bytes")),
        v => Err(format!("a record marked {v}")),
    }
}

pub(crate) fn put_history(p: &mut Put<'_>, h: &[GenRecord]) {
    let n = h.len().min(MAX_HISTORY);
    p.u8(n as u8);
    for i in 0..MAX_HISTORY {
        put_record(p, h.get(i).filter(|_| i < n));
    }
}

pub(crate) fn get_history(g: &mut Get<'_>) -> Result<Vec<GenRecord>, String> {
    let n = g.u8() as usize;
    if n > MAX_HISTORY {
        return Err(format!("{n} history records (at most {MAX_HISTORY})"));
    }
    let mut out = Vec::with_capacity(n);
    for i in 0..MAX_HISTORY {
        let r = get_record(g)?;
        if i < n {
            out.push(r.ok_or("a missing history record")?);
        }
    }
    Ok(out)
}

/// The primary's records of one volume.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SourceGenerations {
    /// Current and earlier records.
    pub history: History,
    /// The record a transfer in progress will commit (written before `begin`, so that a standby that committed
    /// it while this side failed to record it is not mistaken for a split brain).
    pub proposed: Option<GenRecord>,
}

impl SourceGenerations {
    /// Whether `id` is any record of this side (current, proposed or earlier).
    pub fn knows(&self, id: &GenId) -> bool {
        self.history.contains(id) || self.proposed.as_ref().is_some_and(|p| &p.id == id)
    }

    /// The file's bytes.
    pub fn encode(&self) -> Vec<u8> {
        let mut b = vec![0u8; SOURCE_LEN];
        let mut p = Put::header(&mut b, MAGIC, VERSION);
        put_record(&mut p, self.history.current.as_ref());
        put_record(&mut p, self.proposed.as_ref());
        put_history(&mut p, &self.history.earlier);
        p.crc();
        b
    }

    /// Decodes the file; the error says what is wrong.
    pub fn decode(b: &[u8]) -> Result<SourceGenerations, String> {
        if b.len() != SOURCE_LEN {
            return Err(format!("it is {} bytes long, expected {SOURCE_LEN}", b.len()));
        }
        let mut g = Get::header(b, SOURCE_LEN, MAGIC, VERSION).map_err(|e| match e {
            PrefixError::TooShort { len } => format!("it is {len} bytes long"),
            PrefixError::BadMagic { .. } => "bad magic".into(),
            PrefixError::BadVersion { found } => format!("version {found} is not supported (expected {VERSION})"),
        })?;
        let current = get_record(&mut g)?;
        let proposed = get_record(&mut g)?;
        let earlier = get_history(&mut g)?;
        g.crc().map_err(|_| "crc32 mismatch")?;
        Ok(SourceGenerations { history: History { current, earlier }, proposed })
    }
}

/// Where the primary keeps its records of the volume whose manifest is at `manifest`.
pub fn source_path(manifest: &Path) -> PathBuf {
    manifest.with_file_name(SOURCE_FILE)
}

/// Reads the primary's records; a missing file is empty, a corrupt one is logged and treated as empty (which
/// only ever makes the next sync compare).
pub fn read_source(path: &Path) -> SourceGenerations {
    match std::fs::read(path) {
        Ok(b) => SourceGenerations::decode(&b).unwrap_or_else(|what| {
            tracing::warn!(path = %path.display(), %what, "ignoring a corrupt generations file; the next sync compares");
            SourceGenerations::default()
        }),
        Err(_) => SourceGenerations::default(),
    }
}

/// Replaces the primary's records durably (temporary file, fsync, rename, fsync of the directory).
pub fn write_source(durable: &Durable, path: &Path, g: &SourceGenerations) -> std::io::Result<()> {
    let dir = path.parent().ok_or_else(|| std::io::Error::other("a generations file lives in a directory"))?;
    let name = path.file_name().and_then(|n| n.to_str()).ok_or_else(|| std::io::Error::other("bad file name"))?;
    durable.replace_file(Op::StateWrite, dir, name, &g.encode())
}

/// Makes a standby's committed generation (its manifest at `from`, with `record`) this node's primary-side
/// reference for the volume whose primary manifest is `manifest`: after a promote, the old primary that holds the
/// same generation ([`crate::target::Target::adopt`]) can then be synced incrementally. Earlier records are kept.
///
/// Crash safety: first the `generations` file is rewritten without a current record (the next sync compares),
/// then the manifest is replaced, then `record` becomes current.
pub fn adopt_source(durable: &Durable, manifest: &Path, from: &Path, record: &GenRecord) -> std::io::Result<()> {
    let dir = manifest.parent().ok_or_else(|| std::io::Error::other("a manifest lives in a directory"))?;
    let name = manifest.file_name().and_then(|n| n.to_str()).ok_or_else(|| std::io::Error::other("bad file name"))?;
    std::fs::create_dir_all(dir)?;
    let bytes = std::fs::read(from)?;
    let path = source_path(manifest);
    let mut g = read_source(&path);
    if let Some(c) = g.history.current.take() {
        g.history.earlier.insert(0, c);
        g.history.earlier.truncate(MAX_HISTORY);
    }
    g.proposed = None;
    write_source(durable, &path, &g)?;
    durable.replace_file(Op::ManifestWrite, dir, name, &bytes)?;
    g.history.push(record.clone());
    write_source(durable, &path, &g)
}

/// What was recorded about a shadow at its last commit, to tell later whether anything wrote it since.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Evidence {
    /// Nothing usable (the shadow could not be examined).
    #[default]
    None,
    /// A block device: the kernel's count of sectors written to it (`/sys/dev/block/MAJ:MIN/stat`), valid for
    /// one boot.
    Block {
        /// `/proc/sys/kernel/random/boot_id` as 16 bytes.
        boot_id: [u8; 16],
        /// Sectors written since boot.
        sectors_written: u64,
    },
    /// A regular file: any write changes its modification time (and a replaced file has another inode).
    File {
        /// Size in bytes.
        size: u64,
        /// Modification time in nanoseconds since the epoch.
        mtime_ns: u64,
        /// Inode number.
        ino: u64,
    },
}

impl Evidence {
    /// Examines the shadow open as `file`.
    pub fn of(file: &File) -> Evidence {
        use std::os::unix::fs::{FileTypeExt, MetadataExt};
        let Ok(m) = file.metadata() else { return Evidence::None };
        if m.file_type().is_block_device() {
            let rdev = m.rdev();
            let (major, minor) = (libc::major(rdev), libc::minor(rdev));
            match (boot_id(), sectors_written(major, minor)) {
                (Some(boot_id), Some(sectors_written)) => Evidence::Block { boot_id, sectors_written },
                _ => Evidence::None,
            }
        } else {
            let mtime_ns = (m.mtime() as i128 * 1_000_000_000 + m.mtime_nsec() as i128).max(0) as u64;
            Evidence::File { size: m.size(), mtime_ns, ino: m.ino() }
        }
    }

    /// Why `now` does not show the shadow untouched since `self` was recorded (`None`: it does).
    pub fn changed(&self, now: &Evidence) -> Option<String> {
        match (self, now) {
            (Evidence::None, _) => Some("no evidence was recorded at its last commit".into()),
            (_, Evidence::None) => Some("it cannot be examined now".into()),
            (Evidence::Block { boot_id: a, .. }, Evidence::Block { boot_id: b, .. }) if a != b => {
                Some("the machine rebooted since its last commit, so its write counter is unknown".into())
            }
            (Evidence::Block { sectors_written: a, .. }, Evidence::Block { sectors_written: b, .. }) if a != b => {
                Some(format!("the kernel counted {} sectors written to it since its last commit", b.wrapping_sub(*a)))
            }
            (
                Evidence::File { size: s1, mtime_ns: m1, ino: i1 },
                Evidence::File { size: s2, mtime_ns: m2, ino: i2 },
            ) if (s1, m1, i1) != (s2, m2, i2) => {
                Some("the file was modified (size, modification time or inode changed) since its last commit".into())
            }
            (Evidence::Block { .. }, Evidence::Block { .. }) | (Evidence::File { .. }, Evidence::File { .. }) => None,
            _ => Some("it changed kind since its last commit".into()),
        }
    }
}

fn boot_id() -> Option<[u8; 16]> {
    let s = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").ok()?;
    parse_uuid(s.trim())
}

fn parse_uuid(s: &str) -> Option<[u8; 16]> {
    let hex: Vec<u8> = s.bytes().filter(|&c| c != b'-').collect();
    if hex.len() != 32 {
        return None;
    }
    let mut out = [0u8; 16];
    for (i, pair) in hex.chunks(2).enumerate() {
        out[i] = u8::from_str_radix(std::str::from_utf8(pair).ok()?, 16).ok()?;
    }
    Some(out)
}

fn sectors_written(major: u32, minor: u32) -> Option<u64> {
    parse_stat(&std::fs::read_to_string(format!("/sys/dev/block/{major}:{minor}/stat")).ok()?)
}

/// Field 7 of a block device's `stat` (sectors written).
fn parse_stat(s: &str) -> Option<u64> {
    s.split_whitespace().nth(6)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn source_file_round_trip_and_checks() {
        let mut g = SourceGenerations::default();
        for i in 1..=40 {
            g.history.push(record(i, [i as u8; 16], "node-with-a-rather-long-name-é-beyond-31-bytes"));
        }
        g.proposed = Some(record(41, [41; 16], "a"));
        assert_eq!(g.history.earlier.len(), MAX_HISTORY);
        assert_eq!(g.history.current.as_ref().unwrap().node.len(), 31);
        let b = g.encode();
        assert_eq!(SourceGenerations::decode(&b), Ok(g.clone()));
        assert!(g.knows(&[41; 16]) && g.knows(&[8; 16]) && !g.knows(&[7; 16]));
        let mut c = b.clone();
        c[20] ^= 1;
        assert_eq!(SourceGenerations::decode(&c).unwrap_err(), "crc32 mismatch");
        assert!(SourceGenerations::decode(&b[..100]).is_err());
    }

    #[test]
    fn evidence_of_files_and_stat_parsing() {
        let f = tempfile::NamedTempFile::new().unwrap();
        let a = Evidence::of(f.as_file());
        assert!(matches!(a, Evidence::File { .. }));
        assert_eq!(a.changed(&Evidence::of(f.as_file())), None);
        std::thread::sleep(std::time::Duration::from_millis(10));
        std::fs::write(f.path(), b"x").unwrap();
        assert!(a.changed(&Evidence::of(f.as_file())).is_some());
        assert!(Evidence::None.changed(&a).is_some());
        assert_eq!(parse_stat("  1 2 3 4 5 6 777 8 9 10 11"), Some(777));
        assert_eq!(parse_uuid("0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0").unwrap()[0], 0x0f);
        let b1 = Evidence::Block { boot_id: [1; 16], sectors_written: 5 };
        assert!(b1.changed(&Evidence::Block { boot_id: [2; 16], sectors_written: 5 }).unwrap().contains("rebooted"));
        assert!(b1.changed(&Evidence::Block { boot_id: [1; 16], sectors_written: 9 }).unwrap().contains("4 sectors"));
        assert_eq!(b1.changed(&b1), None);
    }

    /// A promoting node keeps its standby's generation as its primary-side reference: a crash at every durable
    /// operation leaves either no current record (the next sync compares) or the new record beside the new manifest.
    #[test]
    fn adopt_source_is_crash_safe() {
        use crate::durable::FaultPlan;
        let mut n = 0u64;
        loop {
            let d = tempfile::tempdir().unwrap();
            let (manifest, from) = (d.path().join("primary/manifest"), d.path().join("standby-manifest"));
            std::fs::create_dir_all(manifest.parent().unwrap()).unwrap();
            std::fs::write(&manifest, b"old manifest").unwrap();
            std::fs::write(&from, b"new manifest").unwrap();
            let mut old = SourceGenerations::default();
            old.history.push(record(3, [3; 16], "b"));
            old.proposed = Some(record(4, [4; 16], "b"));
            write_source(&Durable::new(), &source_path(&manifest), &old).unwrap();
            let r = record(9, [9; 16], "a");
            let durable = Durable::with_plan(FaultPlan { crash_after: n, torn: true, lose_unsynced: false });
            let res = adopt_source(&durable, &manifest, &from, &r);
            let g = read_source(&source_path(&manifest));
            let m = std::fs::read(&manifest).unwrap();
            match &g.history.current {
                Some(c) if c.id == r.id => assert_eq!(m, b"new manifest", "crash at {n}"),
                Some(c) => assert!(c.id == [3; 16] && m == b"old manifest", "crash at {n}"),
                None => {}
            }
            if res.is_ok() {
                assert_eq!(g.history.current, Some(r));
                assert!(g.knows(&[3; 16]) && g.proposed.is_none());
                break;
            }
            n += 1;
            assert!(n < 50);
        }
    }
}
