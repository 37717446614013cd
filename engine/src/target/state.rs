//! The target's state file (`state` in the state directory): whether the shadow holds a complete generation, and
//! the last generation committed.
//!
//! # Layout
//!
//! 28 bytes, all integers little-endian (see [`crate::layout`]).
//!
//! ```text
//! offset size  field
//!      0    8  magic "BRSTATE1"
//!      8    4  version (1)
//!     12    4  flags: bit 0 incomplete (an in-place transfer is writing the shadow); any other bit is an error
//!     16    8  generation: the one an in-place transfer is building (when incomplete), else the last committed
//!     24    4  crc32 of bytes 0..24
//! ```
//!
//! The file is replaced whole (write a new file, fsync, rename, fsync the directory) by the target.

use crate::layout::{Get, PrefixError, Put};

/// File magic.
const MAGIC: &[u8; 8] = b"BRSTATE1";
/// Format version written and accepted.
const VERSION: u32 = 1;
/// Length of the file.
pub(super) const LEN: usize = 28;
/// Flag: the shadow is being written in place and holds no complete generation.
const INCOMPLETE: u32 = 1;
/// Flag bits this version understands.
const SUPPORTED_FLAGS: u32 = INCOMPLETE;

/// The decoded state file.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct StateFile {
    pub(super) exists: bool,
    pub(super) incomplete: bool,
    /// The file exists but could not be decoded: the shadow is treated as incomplete, but is not overwritten in
    /// place either.
    pub(super) corrupt: bool,
    /// The generation an in-place transfer is building (when incomplete), else the last generation committed (it
    /// lags by one after a crash between installing a manifest and rewriting this file). Used for
    /// [`link::TargetInfo::generation`] when the manifest is lost, so generation numbers never go back.
    pub(super) generation: u64,
}

impl StateFile {
    /// The state of a file that holds `incomplete` and `generation`.
    pub(super) fn new(incomplete: bool, generation: u64) -> Self {
        StateFile { exists: true, incomplete, corrupt: false, generation }
    }

    /// The file's bytes.
    pub(super) fn encode(&self) -> [u8; LEN] {
        let mut b = [0u8; LEN];
        let flags = if self.incomplete { INCOMPLETE } else { 0 };
        Put::header(&mut b, MAGIC, VERSION).u32(flags).u64(self.generation).crc();
        b
    }
}

/// Decodes a state file into (incomplete, generation); the error says what is wrong. The fuzz targets call this.
pub fn decode_state(b: &[u8]) -> Result<(bool, u64), String> {
    if b.len() != LEN {
        return Err(format!("it is {} bytes long, expected {LEN}", b.len()));
    }
    let mut g = Get::header(b, LEN, MAGIC, VERSION).map_err(|e| match e {
        PrefixError::TooShort { len } => format!("it is {len} bytes long, expected {LEN}"),
        PrefixError::BadMagic { .. } => "bad magic".into(),
        PrefixError::BadVersion { found } => format!("version {found} is not supported (expected {VERSION})"),
    })?;
    let (flags, generation) = (g.u32(), g.u64());
    if g.crc().is_err() {
        return Err("crc32 mismatch".into());
    }
    if flags & !SUPPORTED_FLAGS != 0 {
        return Err(format!("unknown flag bits {:#x}", flags & !SUPPORTED_FLAGS));
    }
    Ok((flags & INCOMPLETE != 0, generation))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_every_check() {
        let s = StateFile::new(true, 7);
        let b = s.encode();
        assert_eq!(&b[..8], MAGIC);
        assert_eq!(b[16..24], 7u64.to_le_bytes());
        assert_eq!(decode_state(&b), Ok((true, 7)));
        assert_eq!(decode_state(&StateFile::new(false, u64::MAX).encode()), Ok((false, u64::MAX)));
        assert!(decode_state(&b[..27]).unwrap_err().contains("27 bytes"));
        let mut c = b;
        c[0] = b'X';
        assert_eq!(decode_state(&c).unwrap_err(), "bad magic");
        let mut c = b;
        c[8] = 2;
        assert!(decode_state(&c).unwrap_err().contains("version 2"));
        let mut c = b;
        c[20] ^= 1;
        assert_eq!(decode_state(&c).unwrap_err(), "crc32 mismatch");
        let mut c = b;
        c[12] = 3;
        let crc = crc32fast::hash(&c[..24]);
        c[24..].copy_from_slice(&crc.to_le_bytes());
        assert!(decode_state(&c).unwrap_err().contains("0x2"));
    }
}
