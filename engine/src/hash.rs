//! Block hashing: BLAKE3 per block, zero-block detection, block-size rules and the root hash of a volume.

pub use link::{BlockHash, SUB_BLOCK_SIZE};

/// Smallest block size.
pub const MIN_BLOCK_SIZE: u32 = 4096;
/// Largest block size.
pub const MAX_BLOCK_SIZE: u32 = 1 << 20;
/// Block size of a volume larger than [`AUTO_SMALL_VOLUME`] when none is configured (`block_size = "auto"`).
pub const LARGE_VOLUME_BLOCK_SIZE: u32 = 64 * 1024;
/// Block size of a volume of at most [`AUTO_SMALL_VOLUME`] bytes when none is configured: an incremental sync of
/// scattered small writes costs both nodes a fifth less CPU than with 64 KiB blocks (docs/performance.md, "Block
/// size and the 1 % incremental sync"), at a manifest of 1/1024 of the volume.
pub const SMALL_VOLUME_BLOCK_SIZE: u32 = 32 * 1024;
/// Largest volume that gets [`SMALL_VOLUME_BLOCK_SIZE`] by default (its manifest: 256 MiB on each node).
pub const AUTO_SMALL_VOLUME: u64 = 256 << 30;

/// The block size `block_size = "auto"` gives a volume of `volume_size` bytes that has no manifest yet. It
/// depends on nothing but the size, so both nodes of a pair choose the same.
pub fn auto_block_size(volume_size: u64) -> u32 {
    if volume_size <= AUTO_SMALL_VOLUME {
        SMALL_VOLUME_BLOCK_SIZE
    } else {
        LARGE_VOLUME_BLOCK_SIZE
    }
}

/// Block-size errors.
#[derive(Debug, thiserror::Error)]
pub enum HashError {
    /// The block size is not a power of two in range.
    #[error("block size {0} is invalid: it must be a power of two from 4 KiB to 1 MiB")]
    BadBlockSize(u64),
}

/// Checks that `bs` is a power of two in `MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE`.
pub fn validate_block_size(bs: u64) -> Result<u32, HashError> {
    if bs.is_power_of_two() && (MIN_BLOCK_SIZE as u64..=MAX_BLOCK_SIZE as u64).contains(&bs) {
        Ok(bs as u32)
    } else {
        Err(HashError::BadBlockSize(bs))
    }
}

/// Number of blocks of `block_size` covering `volume_size` bytes (the last one may be partial).
pub fn block_count(volume_size: u64, block_size: u32) -> u64 {
    volume_size.div_ceil(block_size as u64)
}

/// Length of block `index` (the last block may be shorter).
pub fn block_len(volume_size: u64, block_size: u32, index: u64) -> usize {
    let start = index * block_size as u64;
    (volume_size.saturating_sub(start)).min(block_size as u64) as usize
}

/// BLAKE3 of one block.
pub fn hash_block(data: &[u8]) -> BlockHash {
    *blake3::hash(data).as_bytes()
}

/// Whether every byte is zero. Word-at-a-time; memory-bound on real data because it stops at the first non-zero.
pub fn is_zero(data: &[u8]) -> bool {
    let (head, words, tail) = {
        // SAFETY: u64 has no invalid bit patterns and align_to only yields properly aligned words.
        unsafe { data.align_to::<u64>() }
    };
    head.iter().all(|&b| b == 0) && words.iter().all(|&w| w == 0) && tail.iter().all(|&b| b == 0)
}

/// A cache of the hash of an all-zero block of each length, so zero blocks are recognised without hashing them.
#[derive(Debug, Clone)]
pub struct ZeroHashes {
    full: BlockHash,
    block_size: usize,
}

impl ZeroHashes {
    /// For blocks of `block_size`.
    pub fn new(block_size: u32) -> Self {
        ZeroHashes { full: hash_block(&vec![0u8; block_size as usize]), block_size: block_size as usize }
    }
    /// Hash of `len` zero bytes.
    pub fn get(&self, len: usize) -> BlockHash {
        if len == self.block_size {
            self.full
        } else {
            hash_block(&vec![0u8; len])
        }
    }
}

/// Hashes a block, recognising all-zero content. Returns the hash and whether the block is all zero.
pub fn hash_block_zero_aware(data: &[u8], zeros: &ZeroHashes) -> (BlockHash, bool) {
    if is_zero(data) {
        (zeros.get(data.len()), true)
    } else {
        (hash_block(data), false)
    }
}

/// The fingerprint of one [`SUB_BLOCK_SIZE`] piece of a block, as refinement compares them: the BLAKE3 chaining
/// value of the piece as the subtree of its block's hash tree that starts `offset_in_block` bytes into the block
/// (a multiple of [`SUB_BLOCK_SIZE`]). Unlike the piece's own hash, these values combine into the block's hash
/// ([`block_hash_from_pieces`]), so the standby needs to read a refined block only once: the fingerprints it
/// answered with, updated for the pieces it then receives, give the block's new hash without reading it again.
/// Collision resistance is BLAKE3's (a chaining value is the same compression function's output).
pub fn piece_cv(piece: &[u8], offset_in_block: u64) -> BlockHash {
    use blake3::hazmat::HasherExt;
    debug_assert!(!piece.is_empty() && piece.len() <= SUB_BLOCK_SIZE as usize);
    debug_assert_eq!(offset_in_block % SUB_BLOCK_SIZE as u64, 0);
    let mut h = blake3::Hasher::new();
    h.set_input_offset(offset_in_block);
    h.update(piece);
    h.finalize_non_root()
}

/// The fingerprints ([`piece_cv`]) of every piece of a block, in order.
pub fn piece_cvs(block: &[u8]) -> impl Iterator<Item = BlockHash> + '_ {
    block.chunks(SUB_BLOCK_SIZE as usize).enumerate().map(|(i, p)| piece_cv(p, i as u64 * SUB_BLOCK_SIZE as u64))
}

/// The hash ([`hash_block`]) of a block of `len` bytes from the fingerprints of its pieces ([`piece_cv`], one per
/// [`SUB_BLOCK_SIZE`] piece, the last one possibly short), merged as BLAKE3's tree merges them. `None` for a
/// block of one piece (its fingerprint is not a root) or when the count does not match `len`.
pub fn block_hash_from_pieces(cvs: &[BlockHash], len: usize) -> Option<BlockHash> {
    use blake3::hazmat::{merge_subtrees_non_root, merge_subtrees_root, Mode};
    const PIECE: usize = SUB_BLOCK_SIZE as usize;
    // BLAKE3's left subtree: the largest power-of-two number of chunks that leaves at least one byte to the right
    // (a multiple of the piece size once the input is longer than one piece).
    fn left_len(len: usize) -> usize {
        let full_chunks = (len - 1) / blake3::CHUNK_LEN;
        (1usize << full_chunks.ilog2()) * blake3::CHUNK_LEN
    }
    fn merge(cvs: &[BlockHash], len: usize) -> BlockHash {
        if len <= PIECE {
            return cvs[0];
        }
        let l = left_len(len);
        merge_subtrees_non_root(&merge(&cvs[..l / PIECE], l), &merge(&cvs[l / PIECE..], len - l), Mode::Hash)
    }
    if len <= PIECE || cvs.len() != len.div_ceil(PIECE) {
        return None;
    }
    let l = left_len(len);
    let root = merge_subtrees_root(&merge(&cvs[..l / PIECE], l), &merge(&cvs[l / PIECE..], len - l), Mode::Hash);
    Some(*root.as_bytes())
}

/// Streaming computation of a volume's root hash: BLAKE3 (derive-key mode, context "blockrep root v1") over the
/// volume size, block size and every block hash in order. Two volumes with the same root hash have the same size,
/// block size and content.
#[derive(Debug, Clone)]
pub struct RootHasher(blake3::Hasher);

impl RootHasher {
    /// Starts a root hash for a volume of `volume_size` bytes in blocks of `block_size`.
    pub fn new(volume_size: u64, block_size: u32) -> Self {
        let mut h = blake3::Hasher::new_derive_key("blockrep root v1");
        h.update(&volume_size.to_le_bytes());
        h.update(&block_size.to_le_bytes());
        RootHasher(h)
    }
    /// Adds the next block hash.
    pub fn push(&mut self, h: &BlockHash) {
        self.0.update(h);
    }
    /// Adds many consecutive block hashes stored back to back.
    pub fn push_raw(&mut self, hashes: &[u8]) {
        self.0.update(hashes);
    }
    /// The root hash.
    pub fn finish(&self) -> BlockHash {
        *self.0.finalize().as_bytes()
    }
}

/// Root hash of a whole list of block hashes.
pub fn root_hash<'a>(volume_size: u64, block_size: u32, hashes: impl IntoIterator<Item = &'a BlockHash>) -> BlockHash {
    let mut r = RootHasher::new(volume_size, block_size);
    for h in hashes {
        r.push(h);
    }
    r.finish()
}

/// Hex form of a hash, for logs and JSON.
pub fn hex(h: &BlockHash) -> String {
    h.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_size_rules() {
        assert!(validate_block_size(4096).is_ok());
        assert!(validate_block_size(1 << 20).is_ok());
        assert!(validate_block_size(2048).is_err());
        assert!(validate_block_size(3 * 4096).is_err());
        assert!(validate_block_size(2 << 20).is_err());
        assert_eq!(block_count(10_000, 4096), 3);
        assert_eq!(block_len(10_000, 4096, 2), 10_000 - 8192);
        assert_eq!(block_len(8192, 4096, 1), 4096);
    }

    #[test]
    fn zero_detection_matches_hash() {
        let z = ZeroHashes::new(4096);
        let mut b = vec![0u8; 4096];
        assert_eq!(hash_block_zero_aware(&b, &z), (hash_block(&b), true));
        b[4095] = 1;
        assert_eq!(hash_block_zero_aware(&b, &z), (hash_block(&b), false));
        assert!(!is_zero(&b[1..]));
        assert!(is_zero(&b[1..4095]));
        assert_eq!(z.get(100), hash_block(&[0u8; 100]));
    }

    #[test]
    fn piece_fingerprints_merge_into_the_block_hash() {
        // Every block shape refinement meets: full power-of-two blocks and short last blocks of any length.
        let data: Vec<u8> = (0..(1u32 << 20) + 12345).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect();
        for len in [4097, 8192, 8193, 12288, 20000, 65536, 65535, 65537 - 1 + 4096, 1 << 20, (1 << 20) - 1] {
            let block = &data[..len];
            let cvs: Vec<BlockHash> = piece_cvs(block).collect();
            assert_eq!(block_hash_from_pieces(&cvs, len), Some(hash_block(block)), "len {len}");
        }
        // A changed piece changes its fingerprint and the merged hash follows the new content.
        let mut block = data[..65536].to_vec();
        let mut cvs: Vec<BlockHash> = piece_cvs(&block).collect();
        block[5 * 4096 + 7] ^= 1;
        let new = piece_cv(&block[5 * 4096..6 * 4096], 5 * 4096);
        assert_ne!(new, cvs[5]);
        cvs[5] = new;
        assert_eq!(block_hash_from_pieces(&cvs, 65536), Some(hash_block(&block)));
        // Fingerprints depend on the position: the same bytes elsewhere in a block differ.
        assert_ne!(piece_cv(&block[..4096], 0), piece_cv(&block[..4096], 4096));
        assert_eq!(block_hash_from_pieces(&cvs[..1], 4096), None);
        assert_eq!(block_hash_from_pieces(&cvs[..3], 65536), None);
    }

    #[test]
    fn root_hash_depends_on_geometry_and_content() {
        let a = [[1u8; 32], [2u8; 32]];
        let r = root_hash(8192, 4096, &a);
        assert_ne!(r, root_hash(8191, 4096, &a));
        assert_ne!(r, root_hash(8192, 8192, &a));
        assert_ne!(r, root_hash(8192, 4096, &[[1u8; 32], [3u8; 32]]));
        let mut s = RootHasher::new(8192, 4096);
        s.push_raw(&[[1u8; 32], [2u8; 32]].concat());
        assert_eq!(s.finish(), r);
    }
}
