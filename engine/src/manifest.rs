//! The manifest: the versioned on-disk list of block hashes of one committed generation of a volume.
//!
//! # Layout
//!
//! All integers little-endian.
//!
//! ```text
//! offset size  field
//!      0    8  magic "BRMANIF1"
//!      8    4  version (1)
//!     12    4  flags (no flag is defined; any set bit is an error naming it)
//!     16    8  generation
//!     24    8  volume_size (bytes)
//!     32    4  block_size (power of two, 4 KiB..1 MiB)
//!     36    4  reserved (0)
//!     40    8  block_count (= ceil(volume_size / block_size))
//!     48   32  root hash (see crate::hash::RootHasher)
//!     80    4  crc32 of bytes 0..80
//!     84   44  zero padding
//!    128  32n  block_count BLAKE3 block hashes, in block order
//! ```
//!
//! Decoding is two-phase: [`check`] validates the header, its crc, the geometry (with checked arithmetic and the
//! [`MAX_BLOCK_COUNT`] limit) and the exact file length without looking at the hashes; only then are the hashes
//! used. [`Manifest::open`] also recomputes the root hash from the hashes and compares it with the header, so a
//! flipped bit anywhere in the file is detected (BLAKE3 over 512 MiB takes about 0.1 s).
//!
//! # Cost
//!
//! 32 bytes per block plus 128 bytes. A 1 TiB volume in 64 KiB blocks has 16 Mi blocks: a 512 MiB manifest file.
//! It is memory-mapped, not loaded: resident memory is what the page cache keeps of it. While a sync builds the next
//! generation, [`ManifestWriter`] maps a second file of the same size (`manifest.next`), so the standby needs twice
//! the manifest size in its state directory.
//!
//! # Writing
//!
//! A manifest is never modified in place. [`ManifestWriter`] fills a new file, [`ManifestWriter::write`] fsyncs it,
//! and [`install`] renames it over the old one and fsyncs the directory, so after a crash the old or the new
//! manifest is in place, never a mix. A corrupt or truncated manifest is reported as [`ManifestError::Corrupt`];
//! callers treat it as absent (every block is then compared).

use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};

use memmap2::{Mmap, MmapMut};

use crate::durable::{Durable, Op};
use crate::hash::{self, BlockHash, RootHasher};
use crate::layout::{Get, PrefixError, Put};

/// File magic.
pub const MAGIC: &[u8; 8] = b"BRMANIF1";
/// Format version written and accepted.
pub const VERSION: u32 = 1;
/// Header length; block hashes start here.
pub const HEADER_LEN: usize = 128;
/// Bytes per block hash.
pub const HASH_LEN: usize = 32;
/// Largest accepted block count (16 TiB in 4 KiB blocks; a 128 GiB manifest).
pub const MAX_BLOCK_COUNT: u64 = 1 << 32;
/// Flag bits this version understands (none).
pub const SUPPORTED_FLAGS: u32 = 0;

/// Errors reading or writing a manifest.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    /// No manifest file.
    #[error("manifest {path} does not exist")]
    Missing {
        /// The path.
        path: PathBuf,
    },
    /// The file exists but is not a valid manifest.
    #[error("manifest {path} is corrupt and will be ignored (the next sync compares every block)")]
    Corrupt {
        /// The path.
        path: PathBuf,
        /// What is wrong with it.
        #[source]
        source: Box<ManifestError>,
    },
    /// Reading, writing or mapping failed.
    #[error("cannot {action} manifest {path}")]
    Io {
        /// What was being done ("read", "create", "fsync", "rename", ...).
        action: &'static str,
        /// The path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// Shorter than a header.
    #[error("the file is {len} bytes long, shorter than the {HEADER_LEN}-byte header (truncated?)")]
    TooShort {
        /// File length.
        len: u64,
    },
    /// Wrong magic.
    #[error("bad magic {found:02x?}: this is not a blockrep manifest")]
    BadMagic {
        /// The first 8 bytes.
        found: [u8; 8],
    },
    /// Unsupported version.
    #[error("manifest version {found} is not supported (this blockrep reads version {VERSION})")]
    BadVersion {
        /// Version in the file.
        found: u32,
    },
    /// Unknown flag bits.
    #[error("unknown manifest flag bits {bits:#x}")]
    UnknownFlags {
        /// The unknown bits.
        bits: u32,
    },
    /// Header checksum mismatch.
    #[error("header crc32 mismatch: stored {stored:#010x}, computed {computed:#010x}")]
    HeaderCrc {
        /// Stored crc.
        stored: u32,
        /// Computed crc.
        computed: u32,
    },
    /// Non-zero bytes in the header padding.
    #[error("header padding (bytes 84..128) is not zero")]
    Padding,
    /// Invalid geometry.
    #[error("invalid geometry: volume size {volume_size}, block size {block_size}, block count {block_count}")]
    Geometry {
        /// Volume size.
        volume_size: u64,
        /// Block size.
        block_size: u32,
        /// Block count in the header.
        block_count: u64,
    },
    /// Too many blocks.
    #[error("block count {block_count} exceeds the limit of {MAX_BLOCK_COUNT}")]
    TooManyBlocks {
        /// Block count in the header.
        block_count: u64,
    },
    /// File length does not match the block count.
    #[error("the file is {actual} bytes long but its header promises {expected} bytes (truncated?)")]
    Length {
        /// Expected length.
        expected: u64,
        /// Actual length.
        actual: u64,
    },
    /// The root hash in the header does not match the block hashes.
    #[error("root hash in the header does not match the block hashes (generation {generation})")]
    RootMismatch {
        /// Generation in the header.
        generation: u64,
    },
}

/// The decoded header of a manifest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ManifestHeader {
    /// Generation this manifest describes.
    pub generation: u64,
    /// Volume size in bytes.
    pub volume_size: u64,
    /// Block size in bytes.
    pub block_size: u32,
    /// Number of blocks.
    pub block_count: u64,
    /// Root hash.
    pub root: BlockHash,
}

impl ManifestHeader {
    /// Total file length for this header.
    pub fn file_len(&self) -> u64 {
        HEADER_LEN as u64 + self.block_count * HASH_LEN as u64
    }

    /// Encodes the header (with crc and padding).
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        Put::header(&mut b, MAGIC, VERSION)
            .u32(0) // flags
            .u64(self.generation)
            .u64(self.volume_size)
            .u32(self.block_size)
            .zeros(4)
            .u64(self.block_count)
            .bytes(&self.root)
            .crc();
        b
    }
}

/// Phase one: validates header, crc, geometry and total length of a whole manifest file, without reading hashes.
pub fn check(bytes: &[u8]) -> Result<ManifestHeader, ManifestError> {
    let mut h = Get::header(bytes, HEADER_LEN, MAGIC, VERSION).map_err(|e| match e {
        PrefixError::TooShort { len } => ManifestError::TooShort { len: len as u64 },
        PrefixError::BadMagic { found } => ManifestError::BadMagic { found },
        PrefixError::BadVersion { found } => ManifestError::BadVersion { found },
    })?;
    let flags = h.u32();
    let (generation, volume_size, block_size) = (h.u64(), h.u64(), h.u32());
    let reserved = h.u32();
    let header = ManifestHeader { generation, volume_size, block_size, block_count: h.u64(), root: h.array() };
    h.crc().map_err(|(stored, computed)| ManifestError::HeaderCrc { stored, computed })?;
    if !h.rest_is_zero() {
        return Err(ManifestError::Padding);
    }
    if flags & !SUPPORTED_FLAGS != 0 {
        return Err(ManifestError::UnknownFlags { bits: flags & !SUPPORTED_FLAGS });
    }
    let geometry = || ManifestError::Geometry {
        volume_size: header.volume_size,
        block_size: header.block_size,
        block_count: header.block_count,
    };
    if hash::validate_block_size(header.block_size as u64).is_err() || reserved != 0 {
        return Err(geometry());
    }
    if header.block_count > MAX_BLOCK_COUNT {
        return Err(ManifestError::TooManyBlocks { block_count: header.block_count });
    }
    if header.block_count != hash::block_count(header.volume_size, header.block_size) {
        return Err(geometry());
    }
    let expected = header
        .block_count
        .checked_mul(HASH_LEN as u64)
        .and_then(|n| n.checked_add(HEADER_LEN as u64))
        .ok_or_else(geometry)?;
    if bytes.len() as u64 != expected {
        return Err(ManifestError::Length { expected, actual: bytes.len() as u64 });
    }
    Ok(header)
}

/// Full decode of a manifest file held in memory: [`check`], then verification of the root hash. The fuzz target
/// calls this.
pub fn decode(bytes: &[u8]) -> Result<ManifestHeader, ManifestError> {
    let header = check(bytes)?;
    let mut r = RootHasher::new(header.volume_size, header.block_size);
    r.push_raw(&bytes[HEADER_LEN..]);
    if r.finish() != header.root {
        return Err(ManifestError::RootMismatch { generation: header.generation });
    }
    Ok(header)
}

/// A committed manifest, memory-mapped read-only.
#[derive(Debug)]
pub struct Manifest {
    header: ManifestHeader,
    map: Mmap,
    path: PathBuf,
}

impl Manifest {
    /// Opens, checks and verifies the manifest at `path`. A missing file is [`ManifestError::Missing`]; an invalid
    /// one is [`ManifestError::Corrupt`] with the reason as its source.
    pub fn open(path: &Path) -> Result<Manifest, ManifestError> {
        let io = |action, source| ManifestError::Io { action, path: path.to_owned(), source };
        let file = match File::open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(ManifestError::Missing { path: path.to_owned() })
            }
            Err(e) => return Err(io("open", e)),
        };
        let len = file.metadata().map_err(|e| io("stat", e))?.len();
        if len < HEADER_LEN as u64 {
            return Err(ManifestError::Corrupt {
                path: path.to_owned(),
                source: Box::new(ManifestError::TooShort { len }),
            });
        }
        // SAFETY: the manifest lives in blockrep's private state directory and is only ever replaced by renaming a
        // new file over it, never modified in place, so the mapped bytes do not change while the map lives.
        let map = unsafe { Mmap::map(&file) }.map_err(|e| io("map", e))?;
        let header = decode(&map).map_err(|e| ManifestError::Corrupt { path: path.to_owned(), source: Box::new(e) })?;
        Ok(Manifest { header, map, path: path.to_owned() })
    }

    /// The header.
    pub fn header(&self) -> &ManifestHeader {
        &self.header
    }
    /// Generation.
    pub fn generation(&self) -> u64 {
        self.header.generation
    }
    /// Volume size.
    pub fn volume_size(&self) -> u64 {
        self.header.volume_size
    }
    /// Block size.
    pub fn block_size(&self) -> u32 {
        self.header.block_size
    }
    /// Number of blocks.
    pub fn block_count(&self) -> u64 {
        self.header.block_count
    }
    /// Root hash.
    pub fn root(&self) -> BlockHash {
        self.header.root
    }
    /// The path it was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }
    /// Hash of block `i` (panics if out of range).
    pub fn hash(&self, i: u64) -> &BlockHash {
        let at = HEADER_LEN + i as usize * HASH_LEN;
        self.map[at..at + HASH_LEN].try_into().expect("32 bytes")
    }
    /// All block hashes back to back.
    pub fn hashes_raw(&self) -> &[u8] {
        &self.map[HEADER_LEN..]
    }
    /// The hashes of blocks `first..end` back to back (panics if out of range).
    pub fn hashes_raw_range(&self, first: u64, end: u64) -> &[u8] {
        assert!(first <= end && end <= self.block_count(), "blocks {first}..{end} out of range");
        &self.map[HEADER_LEN + first as usize * HASH_LEN..HEADER_LEN + end as usize * HASH_LEN]
    }
}

/// Builds the next manifest in a new file next to its destination (`<dest>.next`, memory-mapped read-write),
/// then makes it durable and renames it over the destination.
#[derive(Debug)]
pub struct ManifestWriter {
    file: File,
    map: MmapMut,
    path: PathBuf,
    dest: PathBuf,
    generation: u64,
    volume_size: u64,
    block_size: u32,
    block_count: u64,
    durable: Durable,
}

/// The file a [`ManifestWriter`] for `dest` fills before renaming it over `dest`.
pub fn next_path(dest: &Path) -> PathBuf {
    let mut name = dest.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    name.push(".next");
    dest.with_file_name(name)
}

impl ManifestWriter {
    /// [`ManifestWriter::create_with`] with an unarmed durable handle.
    pub fn create(dest: &Path, generation: u64, volume_size: u64, block_size: u32) -> Result<Self, ManifestError> {
        Self::create_with(dest, generation, volume_size, block_size, Durable::new())
    }

    /// Creates (or truncates) `<dest>.next` for a volume of `volume_size` bytes in blocks of `block_size`; every
    /// hash starts as all-zero bytes (the caller sets each one). Space is allocated up front, so a full filesystem
    /// fails here and not later through the map.
    pub fn create_with(
        dest: &Path,
        generation: u64,
        volume_size: u64,
        block_size: u32,
        durable: Durable,
    ) -> Result<Self, ManifestError> {
        let path = next_path(dest);
        let io = |action, source| ManifestError::Io { action, path: path.clone(), source };
        let block_count = hash::block_count(volume_size, block_size);
        let geometry = ManifestError::Geometry { volume_size, block_size, block_count };
        if hash::validate_block_size(block_size as u64).is_err() {
            return Err(geometry);
        }
        if block_count > MAX_BLOCK_COUNT {
            return Err(ManifestError::TooManyBlocks { block_count });
        }
        let len = HEADER_LEN as u64 + block_count * HASH_LEN as u64;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .map_err(|e| io("create", e))?;
        file.set_len(len).map_err(|e| io("size", e))?;
        match nix::fcntl::posix_fallocate(&file, 0, len as i64) {
            Ok(()) | Err(nix::errno::Errno::EOPNOTSUPP) | Err(nix::errno::Errno::EINVAL) => {}
            Err(e) => return Err(io("allocate space for", std::io::Error::from(e))),
        }
        // SAFETY: the file was just created by us next to the destination manifest, which only blockrep writes;
        // nothing else maps, writes or truncates it while this writer lives, and its space is allocated so stores
        // through the map cannot fault for lack of space.
        let map = unsafe { MmapMut::map_mut(&file) }.map_err(|e| io("map", e))?;
        Ok(ManifestWriter {
            file,
            map,
            path,
            dest: dest.to_owned(),
            generation,
            volume_size,
            block_size,
            block_count,
            durable,
        })
    }

    /// Creates `<dest>.next` as a copy of the hashes of `base` (same geometry).
    pub fn from_manifest(
        dest: &Path,
        generation: u64,
        base: &Manifest,
        durable: Durable,
    ) -> Result<Self, ManifestError> {
        let mut w = Self::create_with(dest, generation, base.volume_size(), base.block_size(), durable)?;
        w.map[HEADER_LEN..].copy_from_slice(base.hashes_raw());
        Ok(w)
    }

    /// Number of blocks.
    pub fn block_count(&self) -> u64 {
        self.block_count
    }
    /// Block size.
    pub fn block_size(&self) -> u32 {
        self.block_size
    }
    /// Volume size.
    pub fn volume_size(&self) -> u64 {
        self.volume_size
    }
    /// The generation the header will carry.
    pub fn generation(&self) -> u64 {
        self.generation
    }
    /// Changes the generation the header will carry.
    pub fn set_generation(&mut self, generation: u64) {
        self.generation = generation;
    }
    /// The file being written (`<dest>.next`).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Sets the hash of block `i` (panics if out of range).
    pub fn set(&mut self, i: u64, h: &BlockHash) {
        assert!(i < self.block_count, "block {i} out of range ({} blocks)", self.block_count);
        let at = HEADER_LEN + i as usize * HASH_LEN;
        self.map[at..at + HASH_LEN].copy_from_slice(h);
    }

    /// Copies the hashes of blocks `first..end` from `base` (same block size; panics if out of range of either).
    pub fn copy_from(&mut self, base: &Manifest, first: u64, end: u64) {
        assert!(end <= self.block_count, "block {end} out of range ({} blocks)", self.block_count);
        assert_eq!(base.block_size(), self.block_size, "copying hashes between block sizes");
        let range = HEADER_LEN + first as usize * HASH_LEN..HEADER_LEN + end as usize * HASH_LEN;
        self.map[range].copy_from_slice(base.hashes_raw_range(first, end));
    }

    /// Hash of block `i` (panics if out of range).
    pub fn get(&self, i: u64) -> BlockHash {
        assert!(i < self.block_count, "block {i} out of range ({} blocks)", self.block_count);
        let at = HEADER_LEN + i as usize * HASH_LEN;
        self.map[at..at + HASH_LEN].try_into().expect("32 bytes")
    }

    /// Root hash over the current hashes.
    pub fn root(&self) -> BlockHash {
        let mut r = RootHasher::new(self.volume_size, self.block_size);
        r.push_raw(&self.map[HEADER_LEN..]);
        r.finish()
    }

    /// Writes the header and makes the whole `<dest>.next` file durable (not yet installed). Returns the root
    /// hash.
    pub fn write(&mut self) -> Result<BlockHash, ManifestError> {
        let root = self.root();
        let header = ManifestHeader {
            generation: self.generation,
            volume_size: self.volume_size,
            block_size: self.block_size,
            block_count: self.block_count,
            root,
        };
        self.map[..HEADER_LEN].copy_from_slice(&header.encode());
        let io = |action, source| ManifestError::Io { action, path: self.path.clone(), source };
        self.durable.gate_whole(Op::ManifestWrite).map_err(|e| io("write", e))?;
        self.map.flush().map_err(|e| io("write", e))?;
        self.durable.sync_all(Op::ManifestSync, &self.file).map_err(|e| io("fsync", e))?;
        Ok(root)
    }

    /// Renames the written `<dest>.next` over `dest` (call [`ManifestWriter::write`] first).
    pub fn install(self) -> Result<(), ManifestError> {
        let ManifestWriter { durable, path, dest, .. } = self;
        install(&durable, &path, &dest)
    }

    /// [`ManifestWriter::write`], then [`ManifestWriter::install`]. Returns the root hash.
    pub fn finish(mut self) -> Result<BlockHash, ManifestError> {
        let root = self.write()?;
        self.install()?;
        Ok(root)
    }
}

/// Atomically replaces `dest` with the fsynced manifest at `from` (same directory): rename, then fsync of the
/// directory.
pub fn install(durable: &Durable, from: &Path, dest: &Path) -> Result<(), ManifestError> {
    durable.rename(from, dest).map_err(|source| ManifestError::Io {
        action: "rename into place",
        path: dest.to_owned(),
        source,
    })?;
    let dir = dest.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    durable.sync_dir(dir).map_err(|source| ManifestError::Io {
        action: "fsync the directory of",
        path: dest.to_owned(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::durable::FaultPlan;

    fn sample(dir: &Path, generation: u64) -> (PathBuf, BlockHash) {
        let path = dir.join("manifest");
        let mut w = ManifestWriter::create(&path, generation, 10_000, 4096).unwrap();
        for i in 0..w.block_count() {
            w.set(i, &hash::hash_block(&[i as u8 + generation as u8; 7]));
        }
        let root = w.finish().unwrap();
        (path, root)
    }

    #[test]
    fn round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let (path, root) = sample(dir.path(), 3);
        let m = Manifest::open(&path).unwrap();
        assert_eq!(m.generation(), 3);
        assert_eq!((m.volume_size(), m.block_size(), m.block_count()), (10_000, 4096, 3));
        assert_eq!(m.root(), root);
        assert_eq!(*m.hash(2), hash::hash_block(&[5u8; 7]));
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 128 + 3 * 32);
        assert!(!dir.path().join("manifest.next").exists());
        let copy = ManifestWriter::from_manifest(&dir.path().join("c"), 4, &m, Durable::new()).unwrap();
        assert_eq!(copy.path(), dir.path().join("c.next"));
        assert_eq!(copy.get(1), *m.hash(1));
        assert_eq!(copy.root(), root);
    }

    #[test]
    fn missing_is_not_corrupt() {
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(Manifest::open(&dir.path().join("nope")), Err(ManifestError::Missing { .. })));
    }

    fn corrupt_reason(path: &Path) -> ManifestError {
        match Manifest::open(path) {
            Err(ManifestError::Corrupt { source, .. }) => *source,
            other => panic!("expected a corrupt manifest, got {other:?}"),
        }
    }

    #[test]
    fn corruption_is_detected_and_named() {
        let dir = tempfile::tempdir().unwrap();
        let (path, _) = sample(dir.path(), 1);
        let good = std::fs::read(&path).unwrap();

        let mut b = good.clone();
        b[0] = b'X';
        std::fs::write(&path, &b).unwrap();
        assert!(matches!(corrupt_reason(&path), ManifestError::BadMagic { .. }));

        let mut b = good.clone();
        b[20] ^= 1; // generation byte: header crc catches it
        std::fs::write(&path, &b).unwrap();
        assert!(matches!(corrupt_reason(&path), ManifestError::HeaderCrc { .. }));

        std::fs::write(&path, &good[..good.len() - 1]).unwrap();
        assert!(matches!(corrupt_reason(&path), ManifestError::Length { .. }));

        std::fs::write(&path, &good[..50]).unwrap();
        assert!(matches!(corrupt_reason(&path), ManifestError::TooShort { len: 50 }));

        let mut b = good.clone();
        b[HEADER_LEN + 40] ^= 0x80; // a block hash: the root check catches it
        std::fs::write(&path, &b).unwrap();
        assert!(matches!(corrupt_reason(&path), ManifestError::RootMismatch { generation: 1 }));

        let mut b = good.clone();
        b[8] = 2;
        std::fs::write(&path, &b).unwrap();
        let e = corrupt_reason(&path);
        assert!(e.to_string().contains("version 2"), "{e}");

        // Valid crc but a block count that does not match the volume size.
        let mut h = check(&good).unwrap();
        h.block_count = 4;
        let mut b = h.encode().to_vec();
        b.extend_from_slice(&good[HEADER_LEN..]);
        b.extend_from_slice(&[0u8; 32]);
        std::fs::write(&path, &b).unwrap();
        assert!(matches!(corrupt_reason(&path), ManifestError::Geometry { .. }));

        // Huge block count with valid crc: refused by the limit, no allocation.
        h.volume_size = u64::MAX;
        h.block_count = hash::block_count(u64::MAX, 4096);
        std::fs::write(&path, h.encode()).unwrap();
        assert!(matches!(corrupt_reason(&path), ManifestError::TooManyBlocks { .. }));
    }

    #[test]
    fn crash_during_write_leaves_old_manifest() {
        let dir = tempfile::tempdir().unwrap();
        let (path, root1) = sample(dir.path(), 1);
        for n in 0..4 {
            let d = Durable::with_plan(FaultPlan { crash_after: n, torn: n % 2 == 0, lose_unsynced: false });
            let mut w = ManifestWriter::create_with(&path, 2, 10_000, 4096, d).unwrap();
            w.set(0, &[9u8; 32]);
            let r = w.finish();
            let m = Manifest::open(&path).unwrap();
            if r.is_err() {
                assert!(m.generation() == 1 || m.generation() == 2);
                if m.generation() == 1 {
                    assert_eq!(m.root(), root1);
                }
            } else {
                assert_eq!(m.generation(), 2);
            }
        }
    }

    /// The fuzz target's invariants over every truncation and many random corruptions of a valid manifest.
    #[test]
    fn decoder_survives_truncation_and_corruption() {
        use rand::{Rng, SeedableRng};
        let dir = tempfile::tempdir().unwrap();
        let (path, _) = sample(dir.path(), 2);
        let good = std::fs::read(&path).unwrap();
        for len in 0..good.len() {
            assert!(decode(&good[..len]).is_err());
        }
        let mut rng = rand::rngs::SmallRng::seed_from_u64(1);
        for _ in 0..3000 {
            let mut b = good.clone();
            let at = rng.gen_range(0..b.len());
            let v: u8 = rng.gen();
            let changed = b[at] != v;
            b[at] = v;
            match decode(&b) {
                Ok(h) => {
                    assert!(!changed, "byte {at} changed unnoticed");
                    assert_eq!(h.file_len(), b.len() as u64);
                }
                Err(_) => assert!(changed),
            }
        }
    }
}
