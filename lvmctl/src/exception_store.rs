//! Decoder of a classic LVM snapshot's persistent exception store: which chunks of the origin were written since
//! the snapshot was created.
//!
//! Layout (the kernel's `drivers/md/dm-snap-persistent.c` and
//! `Documentation/admin-guide/device-mapper/snapshot.rst`), all integers little-endian, in chunks of
//! `chunk_size` 512-byte sectors on the snapshot's copy-on-write device (`/dev/mapper/<vg>-<snap>-cow`):
//!
//! ```text
//! chunk 0:                 header: magic u32 = 0x70416e53 ("SnAp"), valid u32 (0: invalidated), version u32 = 1,
//!                          chunk_size u32 (sectors); the rest of the chunk is unused
//! chunk 1 + a * (E + 1):   metadata area a (a = 0, 1, ...): E = chunk bytes / 16 exceptions of
//!                          (old_chunk u64: chunk of the origin, new_chunk u64: where its old content was copied);
//!                          the E chunks after it hold copied data
//! ```
//!
//! The list ends at the first exception whose `new_chunk` is 0 (chunk 0 is the header, so no copy lives there);
//! an area with all E exceptions in use continues in the next area (the kernel zeroes the next area before it
//! fills one). The kernel commits an exception before it lets the origin write that caused it complete, so every
//! completed write to the origin since the snapshot was created is listed.
//!
//! The store is read while the kernel may append to it, and its content is untrusted input: decoding is two
//! passes over [`ChunkReader`], a check ([`check`]: header, every area, every exception, bounded by the named
//! `MAX_*` limits, checked arithmetic) that counts the exceptions, then a parse that collects exactly that many
//! (exceptions appended in between are left for the next sync; they are also in the new snapshot's content).

use std::io;

use thiserror::Error;

/// `"SnAp"` read as a little-endian u32.
pub const SNAP_MAGIC: u32 = 0x7041_6e53;

/// The only on-disk version there is.
pub const SNAPSHOT_DISK_VERSION: u32 = 1;

/// Largest chunk accepted, in sectors (1 MiB; lvm2 allows up to 512 KiB).
pub const MAX_CHUNK_SECTORS: u32 = 2048;

/// Smallest chunk accepted, in sectors (one 4 KiB page; lvm2's minimum).
pub const MIN_CHUNK_SECTORS: u32 = 8;

/// Most exceptions decoded (8 bytes each in the result: 32 MiB). A store with more fails with
/// [`StoreError::TooMany`], and the sync falls back to a full scan.
pub const MAX_EXCEPTIONS: u64 = 4 << 20;

/// Most metadata areas walked (each area is followed by its E data chunks, so this bounds the store's size too).
pub const MAX_AREAS: u64 = 1 << 22;

/// A store that cannot be used.
#[derive(Debug, Error)]
pub enum StoreError {
    /// Reading the store failed.
    #[error("cannot read chunk {chunk} of the exception store")]
    Read {
        /// The chunk.
        chunk: u64,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
    /// The header's magic is not "SnAp".
    #[error("the exception store's header has magic {found:#010x}, not {SNAP_MAGIC:#010x} (\"SnAp\"): not a persistent snapshot store")]
    Magic {
        /// The magic found.
        found: u32,
    },
    /// The kernel invalidated the snapshot (its store filled up, or an I/O error).
    #[error("the snapshot was invalidated (its exception store filled up or failed): it no longer tracks changes")]
    Invalidated,
    /// An unknown on-disk version.
    #[error("the exception store has on-disk version {0}, only version 1 is known")]
    Version(u32),
    /// A chunk size outside the accepted range or not a power of two.
    #[error("the exception store's chunk size is {0} sectors, not a power of two from 8 to 2048")]
    ChunkSize(u32),
    /// An exception that cannot be right.
    #[error("exception {index} of metadata area {area} is ({old_chunk}, {new_chunk}): {why}")]
    BadException {
        /// Area.
        area: u64,
        /// Index in the area.
        index: u64,
        /// Origin chunk.
        old_chunk: u64,
        /// Store chunk.
        new_chunk: u64,
        /// What is wrong.
        why: &'static str,
    },
    /// More exceptions than [`MAX_EXCEPTIONS`].
    #[error("the exception store lists more than {MAX_EXCEPTIONS} exceptions")]
    TooMany,
    /// More areas than [`MAX_AREAS`], or a store that ends inside its metadata.
    #[error("the exception store's metadata does not end within {0} chunks of the store")]
    NoEnd(u64),
    /// The second pass found fewer exceptions than the first (the store shrank: it was replaced underneath).
    #[error("the exception store changed between its check and its parse ({checked} exceptions, then {parsed})")]
    Changed {
        /// Count of the check.
        checked: u64,
        /// Count of the parse.
        parsed: u64,
    },
}

/// Reads whole chunks of the store.
pub trait ChunkReader {
    /// Size of the store in bytes.
    fn len(&self) -> u64;
    /// Whether the store is empty.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Fills `buf` with the bytes at `offset` (never past [`ChunkReader::len`]).
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<()>;
}

impl ChunkReader for &[u8] {
    fn len(&self) -> u64 {
        <[u8]>::len(self) as u64
    }
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let start = usize::try_from(offset).map_err(|_| io::ErrorKind::UnexpectedEof)?;
        let end = start.checked_add(buf.len()).ok_or(io::ErrorKind::UnexpectedEof)?;
        buf.copy_from_slice(self.get(start..end).ok_or(io::ErrorKind::UnexpectedEof)?);
        Ok(())
    }
}

/// The header of a store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Chunk size in sectors.
    pub chunk_sectors: u32,
}

impl Header {
    /// Chunk size in bytes.
    pub fn chunk_bytes(&self) -> u64 {
        u64::from(self.chunk_sectors) * 512
    }
    /// Exceptions per metadata area.
    pub fn per_area(&self) -> u64 {
        self.chunk_bytes() / 16
    }
}

/// What a store says: the chunk size and the origin chunks written since the snapshot was created.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exceptions {
    /// The store's header.
    pub header: Header,
    /// Origin chunks with an exception, sorted, without duplicates.
    pub old_chunks: Vec<u64>,
}

impl Exceptions {
    /// The changed parts of the origin as `(offset, length)` in bytes, consecutive chunks merged; `None` on an
    /// overflow (the check bounds old chunks by the origin's size, so this does not happen for a checked store).
    pub fn byte_ranges(&self) -> Option<Vec<(u64, u64)>> {
        let cb = self.header.chunk_bytes();
        let mut out: Vec<(u64, u64)> = Vec::new();
        for &c in &self.old_chunks {
            let off = c.checked_mul(cb)?;
            match out.last_mut() {
                Some((o, l)) if o.checked_add(*l)? == off => *l = l.checked_add(cb)?,
                _ => out.push((off, cb)),
            }
        }
        Some(out)
    }
}

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn le64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

fn read_chunk(r: &mut dyn ChunkReader, h: Option<Header>, chunk: u64, buf: &mut [u8]) -> Result<(), StoreError> {
    let cb = h.map_or(buf.len() as u64, |h| h.chunk_bytes());
    let offset = chunk.checked_mul(cb).ok_or(StoreError::NoEnd(chunk))?;
    if offset.checked_add(buf.len() as u64).is_none_or(|end| end > r.len()) {
        return Err(StoreError::NoEnd(chunk));
    }
    r.read_at(offset, buf).map_err(|source| StoreError::Read { chunk, source })
}

/// Reads and checks the header (chunk 0).
pub fn read_header(r: &mut dyn ChunkReader) -> Result<Header, StoreError> {
    let mut b = [0u8; 16];
    read_chunk(r, None, 0, &mut b)?;
    let magic = le32(&b, 0);
    if magic != SNAP_MAGIC {
        return Err(StoreError::Magic { found: magic });
    }
    if le32(&b, 4) == 0 {
        return Err(StoreError::Invalidated);
    }
    let version = le32(&b, 8);
    if version != SNAPSHOT_DISK_VERSION {
        return Err(StoreError::Version(version));
    }
    let cs = le32(&b, 12);
    if !cs.is_power_of_two() || !(MIN_CHUNK_SECTORS..=MAX_CHUNK_SECTORS).contains(&cs) {
        return Err(StoreError::ChunkSize(cs));
    }
    Ok(Header { chunk_sectors: cs })
}

/// Walks the areas, checking every exception, calling `each(old_chunk)` for at most `limit` of them; returns how
/// many it saw. `origin_chunks`: the origin's size in chunks (old chunks must be below it).
fn walk(
    r: &mut dyn ChunkReader,
    h: Header,
    origin_chunks: u64,
    limit: u64,
    mut each: impl FnMut(u64),
) -> Result<u64, StoreError> {
    let per_area = h.per_area();
    let stride = per_area + 1;
    let store_chunks = r.len() / h.chunk_bytes();
    let mut area_buf = vec![0u8; h.chunk_bytes() as usize];
    let mut count = 0u64;
    for area in 0..MAX_AREAS {
        let location = area.checked_mul(stride).and_then(|c| c.checked_add(1)).ok_or(StoreError::NoEnd(area))?;
        read_chunk(r, Some(h), location, &mut area_buf)?;
        for index in 0..per_area {
            if count == limit {
                return Ok(count);
            }
            let at = (index * 16) as usize;
            let (old_chunk, new_chunk) = (le64(&area_buf, at), le64(&area_buf, at + 8));
            if new_chunk == 0 {
                return Ok(count);
            }
            let bad = |why| StoreError::BadException { area, index, old_chunk, new_chunk, why };
            if new_chunk >= store_chunks {
                return Err(bad("its copy lies beyond the end of the store"));
            }
            // Data chunks of area `a` are location(a) + 1 ..= location(a) + per_area.
            if (new_chunk - 1) % stride == 0 {
                return Err(bad("its copy lies on a metadata area"));
            }
            if old_chunk >= origin_chunks {
                return Err(bad("the origin chunk lies beyond the end of the origin"));
            }
            count += 1;
            if count > MAX_EXCEPTIONS {
                return Err(StoreError::TooMany);
            }
            each(old_chunk);
        }
    }
    Err(StoreError::NoEnd(MAX_AREAS))
}

/// First pass: checks the header and every exception of the store of a snapshot whose origin is `origin_size`
/// bytes, and counts the exceptions.
pub fn check(r: &mut dyn ChunkReader, origin_size: u64) -> Result<(Header, u64), StoreError> {
    let h = read_header(r)?;
    let origin_chunks = origin_size.div_ceil(h.chunk_bytes());
    let n = walk(r, h, origin_chunks, u64::MAX, |_| {})?;
    Ok((h, n))
}

/// Decodes the store in two passes ([`check`], then a parse of exactly the exceptions the check counted).
pub fn decode(r: &mut dyn ChunkReader, origin_size: u64) -> Result<Exceptions, StoreError> {
    let (header, checked) = check(r, origin_size)?;
    let again = read_header(r)?;
    if again != header {
        return Err(StoreError::Changed { checked, parsed: 0 });
    }
    let origin_chunks = origin_size.div_ceil(header.chunk_bytes());
    let capacity = usize::try_from(checked).map_err(|_| StoreError::TooMany)?;
    let mut old_chunks = Vec::with_capacity(capacity);
    let parsed = walk(r, header, origin_chunks, checked, |c| old_chunks.push(c))?;
    if parsed != checked {
        return Err(StoreError::Changed { checked, parsed });
    }
    old_chunks.sort_unstable();
    old_chunks.dedup();
    Ok(Exceptions { header, old_chunks })
}

/// A store on a block device, read with `O_DIRECT` (the kernel writes the store underneath the page cache, so a
/// cached read could return stale metadata).
#[derive(Debug)]
pub struct DeviceStore {
    file: std::fs::File,
    len: u64,
    buf: Vec<u8>,
}

/// Alignment of `O_DIRECT` transfers.
const DIRECT_ALIGN: usize = 4096;

impl DeviceStore {
    /// Opens the copy-on-write device at `path` for reading with `O_DIRECT`.
    pub fn open(path: &std::path::Path) -> io::Result<DeviceStore> {
        use std::io::{Seek, SeekFrom};
        use std::os::unix::fs::OpenOptionsExt;
        let mut file = std::fs::OpenOptions::new().read(true).custom_flags(libc::O_DIRECT).open(path)?;
        let len = file.seek(SeekFrom::End(0))?;
        Ok(DeviceStore { file, len, buf: Vec::new() })
    }
}

impl ChunkReader for DeviceStore {
    fn len(&self) -> u64 {
        self.len
    }
    fn read_at(&mut self, offset: u64, out: &mut [u8]) -> io::Result<()> {
        use std::os::unix::fs::FileExt;
        // Read the aligned span covering the request into an aligned buffer, then copy out.
        let start = offset / DIRECT_ALIGN as u64 * DIRECT_ALIGN as u64;
        let end = (offset + out.len() as u64).div_ceil(DIRECT_ALIGN as u64) * DIRECT_ALIGN as u64;
        let span = usize::try_from(end - start).map_err(|_| io::ErrorKind::InvalidInput)?;
        if self.buf.len() < span + DIRECT_ALIGN {
            self.buf.resize(span + DIRECT_ALIGN, 0);
        }
        let skew = self.buf.as_ptr().align_offset(DIRECT_ALIGN);
        let aligned = &mut self.buf[skew..skew + span];
        self.file.read_exact_at(aligned, start)?;
        let from = (offset - start) as usize;
        out.copy_from_slice(&aligned[from..from + out.len()]);
        Ok(())
    }
}

/// Builds a store image as the kernel lays it out (for tests and the fuzz target's seeds): header with `valid`,
/// then `exceptions` in areas, with `spare_chunks` free chunks after the last copy.
#[doc(hidden)]
pub fn build_image(chunk_sectors: u32, valid: bool, exceptions: &[u64], spare_chunks: u64) -> Vec<u8> {
    let cb = chunk_sectors as usize * 512;
    let per_area = cb / 16;
    let areas = exceptions.len() / per_area + 1;
    let chunks = 1 + areas * (per_area + 1) + spare_chunks as usize;
    let mut img = vec![0u8; chunks * cb];
    img[0..4].copy_from_slice(&SNAP_MAGIC.to_le_bytes());
    img[4..8].copy_from_slice(&u32::from(valid).to_le_bytes());
    img[8..12].copy_from_slice(&SNAPSHOT_DISK_VERSION.to_le_bytes());
    img[12..16].copy_from_slice(&chunk_sectors.to_le_bytes());
    for (i, &old) in exceptions.iter().enumerate() {
        let (area, index) = (i / per_area, i % per_area);
        let location = 1 + area * (per_area + 1);
        let new_chunk = (location + 1 + index) as u64;
        let at = location * cb + index * 16;
        img[at..at + 8].copy_from_slice(&old.to_le_bytes());
        img[at + 8..at + 16].copy_from_slice(&new_chunk.to_le_bytes());
    }
    img
}

#[cfg(test)]
mod tests {
    use super::*;

    const ORIGIN: u64 = 64 << 20;

    fn decode_slice(img: &[u8], origin: u64) -> Result<Exceptions, StoreError> {
        let mut r: &[u8] = img;
        decode(&mut r, origin)
    }

    /// The first 10 chunks of a real store, captured in the User-Mode Linux guest (tests/integration/uml_tracked.rs):
    /// the classic tracker of a 24 MiB LV (lvm2 2.03.16, kernel 6.1, 4 KiB chunks) after 8 writes of 4 KiB at
    /// blocks k * 256 + 3 (k = 0..8). Chunk 0 is the header, chunk 1 the first metadata area, chunks 2..=9 the
    /// copies.
    const REAL_STORE: &[u8] = include_bytes!("../tests/fixtures/exception_store.bin");

    #[test]
    fn a_real_store_lists_the_written_chunks() {
        let e = decode_slice(REAL_STORE, 24 << 20).unwrap();
        assert_eq!(e.header, Header { chunk_sectors: 8 });
        assert_eq!(e.old_chunks, (0..8).map(|k| k * 256 + 3).collect::<Vec<u64>>());
        assert_eq!(e.byte_ranges().unwrap()[1], ((256 + 3) * 4096, 4096));
        // Cut before the last copy, the store is refused (a copy beyond its end), as is an origin too small.
        assert!(decode_slice(&REAL_STORE[..9 * 4096], 24 << 20).is_err());
        assert!(decode_slice(REAL_STORE, 7 * 256 * 4096).is_err());
    }

    #[test]
    fn a_store_lists_its_origin_chunks_sorted_and_merged() {
        let img = build_image(8, true, &[100, 3, 4, 5, 9000], 4);
        let e = decode_slice(&img, ORIGIN).unwrap();
        assert_eq!(e.header.chunk_sectors, 8);
        assert_eq!(e.old_chunks, vec![3, 4, 5, 100, 9000]);
        assert_eq!(e.byte_ranges().unwrap(), vec![(3 * 4096, 3 * 4096), (100 * 4096, 4096), (9000 * 4096, 4096)]);
    }

    #[test]
    fn exceptions_continue_across_full_areas() {
        // 4 KiB chunks hold 256 exceptions per area: 600 exceptions fill two areas and part of a third.
        let chunks: Vec<u64> = (0..600).map(|i| i * 3).collect();
        let img = build_image(8, true, &chunks, 0);
        let e = decode_slice(&img, ORIGIN).unwrap();
        assert_eq!(e.old_chunks, chunks);
        // An exactly full area is followed by a zeroed one: the list ends there.
        let chunks: Vec<u64> = (0..256).collect();
        let e = decode_slice(&build_image(8, true, &chunks, 0), ORIGIN).unwrap();
        assert_eq!(e.byte_ranges().unwrap(), vec![(0, 256 * 4096)]);
    }

    #[test]
    fn an_empty_store_means_nothing_changed() {
        let e = decode_slice(&build_image(16, true, &[], 10), ORIGIN).unwrap();
        assert!(e.old_chunks.is_empty());
        assert_eq!(e.header.chunk_bytes(), 8192);
    }

    #[test]
    fn broken_stores_are_refused_with_the_reason() {
        let good = build_image(8, true, &[1, 2, 3], 2);
        let patch = |at: usize, bytes: &[u8]| {
            let mut b = good.clone();
            b[at..at + bytes.len()].copy_from_slice(bytes);
            b
        };
        let area = 4096; // area 0 is chunk 1
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (patch(0, b"XXXX"), "not a persistent snapshot store"),
            (build_image(8, false, &[1], 0), "invalidated"),
            (patch(8, &2u32.to_le_bytes()), "version 2"),
            (patch(12, &24u32.to_le_bytes()), "chunk size is 24"),
            (patch(12, &4096u32.to_le_bytes()), "chunk size is 4096"),
            (patch(area + 8, &999u64.to_le_bytes()), "beyond the end of the store"),
            (patch(area + 8, &1u64.to_le_bytes()), "on a metadata area"),
            (patch(area, &u64::MAX.to_le_bytes()), "beyond the end of the origin"),
            (good[..4096 + 100].to_vec(), "does not end"),
            (good[..10].to_vec(), "does not end"),
        ];
        for (img, want) in cases {
            let e = decode_slice(&img, ORIGIN).unwrap_err().to_string();
            assert!(e.contains(want), "want {want:?}: {e}");
        }
        // A full area whose successor is missing (a store cut short) has no end.
        let chunks: Vec<u64> = (0..256).collect();
        let img = build_image(8, true, &chunks, 0);
        let cut = &img[..(1 + 257) * 4096];
        assert!(matches!(decode_slice(cut, ORIGIN), Err(StoreError::NoEnd(_))));
    }

    #[test]
    fn the_origin_size_bounds_the_old_chunks() {
        let img = build_image(8, true, &[15], 0);
        assert!(decode_slice(&img, 16 * 4096).is_ok());
        assert!(decode_slice(&img, 15 * 4096).is_err());
        assert!(decode_slice(&img, 15 * 4096 + 1).is_ok(), "a partial last chunk counts");
    }

    /// A reader that appends an exception between the two passes, as the kernel may.
    struct Growing {
        img: Vec<u8>,
        reads: usize,
    }

    impl ChunkReader for Growing {
        fn len(&self) -> u64 {
            self.img.len() as u64
        }
        fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
            self.reads += 1;
            if self.reads == 3 {
                // Second pass's header read done: the kernel commits exception #2 (old chunk 77).
                let at = 4096 + 2 * 16;
                self.img[at..at + 8].copy_from_slice(&77u64.to_le_bytes());
                self.img[at + 8..at + 16].copy_from_slice(&4u64.to_le_bytes());
            }
            let s = offset as usize;
            buf.copy_from_slice(&self.img[s..s + buf.len()]);
            Ok(())
        }
    }

    #[test]
    fn exceptions_appended_between_the_passes_are_left_for_the_next_sync() {
        let mut r = Growing { img: build_image(8, true, &[5, 6], 3), reads: 0 };
        let e = decode(&mut r, ORIGIN).unwrap();
        assert_eq!(e.old_chunks, vec![5, 6]);
    }
}
