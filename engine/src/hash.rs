//! Block hashing: BLAKE3 per block, zero-block detection, block-size rules and the root hash of a volume.

pub use link::{BlockHash, SUB_BLOCK_SIZE};

/// Smallest block size.
pub const MIN_BLOCK_SIZE: u32 = 4096;
/// Largest block size.
pub const MAX_BLOCK_SIZE: u32 = 1 << 20;
/// Default block size, chosen by measurement (see `docs/ARCHITECTURE.md`, "Block size").
pub const DEFAULT_BLOCK_SIZE: u32 = 64 * 1024;

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
