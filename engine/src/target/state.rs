//! The target's state file (`state` in the state directory): whether the shadow holds a complete generation, the
//! last generation committed, the identity and history of the shadow's content, whether it is trusted, and the
//! evidence recorded at the last commit that tells later whether anything else wrote the shadow.
//!
//! # Layout
//!
//! Version 2: 2231 bytes, all integers little-endian (see [`crate::layout`]; records as drawn in
//! [`crate::generations`]).
//!
//! ```text
//! offset size  field
//!      0    8  magic "BRSTATE1"
//!      8    4  version (2; version 1, the first 28 bytes of this layout without the fields after the
//!              generation, is still read: no identifier, no evidence, so the shadow is not trusted)
//!     12    4  flags: bit 0 incomplete (an in-place transfer is writing the shadow); bit 1 untrusted (something
//!              may have written the shadow outside blockrep); any other bit is an error
//!     16    8  generation: the one an in-place transfer is building (when incomplete), else the last committed
//!     24    1  why untrusted: 0 not marked, 1 promoted, 2 a verify found a difference, 3 rolled back to an
//!              earlier retained generation (the current record)
//!     25    1  evidence kind: 0 none, 1 block device, 2 regular file
//!     26   24  evidence: block device: sectors written (8), zero (16); file: size, mtime ns, inode (8 each)
//!     50   16  evidence: the boot id (block devices; else zero)
//!     66   65  current record: the identifier of the shadow's content (the committed generation's, or a promote's)
//!    131 2081  earlier records: count (1), 32 records, newest first
//!   2212    4  crc32 of bytes 0..2212
//!   2216   15  zero padding
//! ```
//!
//! The file is replaced whole (write a new file, fsync, rename, fsync the directory) by the target.

use link::GenRecord;

use crate::generations::{get_history, get_record, put_history, put_record, Evidence, History};
use crate::layout::{Get, PrefixError, Put};

/// File magic.
const MAGIC: &[u8; 8] = b"BRSTATE1";
/// Format version written.
const VERSION: u32 = 2;
/// Length of a version 1 file.
const LEN_V1: usize = 28;
/// Length of the file.
pub(super) const LEN: usize = 2231;
/// Flag: the shadow is being written in place and holds no complete generation.
const INCOMPLETE: u32 = 1;
/// Flag: the shadow may have been written outside blockrep.
const UNTRUSTED: u32 = 2;
/// Flag bits this version understands.
const SUPPORTED_FLAGS: u32 = INCOMPLETE | UNTRUSTED;

/// Why a shadow was marked untrusted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Distrust {
    /// Not marked (evidence may still say otherwise).
    #[default]
    None,
    /// It was promoted: it became production and was written by this node.
    Promoted,
    /// A verify found it different from its committed generation.
    VerifyFailed,
    /// An operator rolled it back to an earlier retained generation (`blockrep restore`, `promote --generation`):
    /// it holds exactly that generation (the current record), which is not the primary's latest.
    RolledBack,
}

/// The decoded state file.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
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
    /// Why the shadow is marked untrusted.
    pub(super) distrust: Distrust,
    /// Recorded at the last commit.
    pub(super) evidence: Evidence,
    /// Identity of the shadow's content and earlier identities.
    pub(super) history: History,
}

impl StateFile {
    /// The state of a file that holds `incomplete` and `generation` (no identity, no evidence).
    pub(super) fn new(incomplete: bool, generation: u64) -> Self {
        StateFile { exists: true, incomplete, generation, ..Default::default() }
    }

    /// The file's bytes.
    pub(super) fn encode(&self) -> [u8; LEN] {
        let mut b = [0u8; LEN];
        let mut flags = if self.incomplete { INCOMPLETE } else { 0 };
        if self.distrust != Distrust::None {
            flags |= UNTRUSTED;
        }
        let why = match self.distrust {
            Distrust::None => 0,
            Distrust::Promoted => 1,
            Distrust::VerifyFailed => 2,
            Distrust::RolledBack => 3,
        };
        let mut p = Put::header(&mut b, MAGIC, VERSION);
        p.u32(flags).u64(self.generation).u8(why);
        match self.evidence {
            Evidence::None => p.u8(0).zeros(40),
            Evidence::Block { boot_id, sectors_written } => p.u8(1).u64(sectors_written).zeros(16).bytes(&boot_id),
            Evidence::File { size, mtime_ns, ino } => p.u8(2).u64(size).u64(mtime_ns).u64(ino).zeros(16),
        };
        put_record(&mut p, self.history.current.as_ref());
        put_history(&mut p, &self.history.earlier);
        p.crc();
        b
    }
}

fn prefix_err(e: PrefixError) -> String {
    match e {
        PrefixError::TooShort { len } => format!("it is {len} bytes long, expected {LEN}"),
        PrefixError::BadMagic { .. } => "bad magic".into(),
        PrefixError::BadVersion { found } => format!("version {found} is not supported (expected 1 or {VERSION})"),
    }
}

/// Decodes a state file of either version; the error says what is wrong.
pub(super) fn decode(b: &[u8]) -> Result<StateFile, String> {
    let version = (b.len() >= 12).then(|| u32::from_le_bytes(b[8..12].try_into().expect("4 bytes")));
    let (len, version) = match (b.len(), version) {
        (LEN_V1, Some(1)) => (LEN_V1, 1),
        (LEN, _) => (LEN, VERSION),
        (n, _) => return Err(format!("it is {n} bytes long, expected {LEN}")),
    };
    let mut g = Get::header(b, len, MAGIC, version).map_err(prefix_err)?;
    let (flags, generation) = (g.u32(), g.u64());
    let mut s = StateFile::new(flags & INCOMPLETE != 0, generation);
    if version == VERSION {
        s.distrust = match g.u8() {
            0 => Distrust::None,
            1 => Distrust::Promoted,
            2 => Distrust::VerifyFailed,
            3 => Distrust::RolledBack,
            v => return Err(format!("unknown distrust code {v}")),
        };
        let (kind, a, b2, c, boot_id) = (g.u8(), g.u64(), g.u64(), g.u64(), g.array::<16>());
        s.evidence = match kind {
            0 => Evidence::None,
            1 => Evidence::Block { boot_id, sectors_written: a },
            2 => Evidence::File { size: a, mtime_ns: b2, ino: c },
            v => return Err(format!("unknown evidence kind {v}")),
        };
        let current: Option<GenRecord> = get_record(&mut g)?;
        s.history = History { current, earlier: get_history(&mut g)? };
        if flags & UNTRUSTED != 0 && s.distrust == Distrust::None {
            return Err("the untrusted flag without a reason".into());
        }
    }
    if g.crc().is_err() {
        return Err("crc32 mismatch".into());
    }
    if !g.rest_is_zero() {
        return Err("nonzero padding".into());
    }
    if flags & !SUPPORTED_FLAGS != 0 || (version == 1 && flags & UNTRUSTED != 0) {
        return Err(format!("unknown flag bits {:#x}", flags & !SUPPORTED_FLAGS));
    }
    Ok(s)
}

/// Decodes a state file into (incomplete, generation); the error says what is wrong. The fuzz targets call this.
pub fn decode_state(b: &[u8]) -> Result<(bool, u64), String> {
    decode(b).map(|s| (s.incomplete, s.generation))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A version 1 file as the previous release wrote it.
    fn v1(incomplete: bool, generation: u64) -> [u8; LEN_V1] {
        let mut b = [0u8; LEN_V1];
        Put::header(&mut b, MAGIC, 1).u32(incomplete as u32).u64(generation).crc();
        b
    }

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
        c[8] = 3;
        assert!(decode_state(&c).unwrap_err().contains("version 3"));
        let mut c = b;
        c[20] ^= 1;
        assert_eq!(decode_state(&c).unwrap_err(), "crc32 mismatch");
        let mut c = b;
        c[12] = 5;
        let crc = crc32fast::hash(&c[..2212]);
        c[2212..2216].copy_from_slice(&crc.to_le_bytes());
        assert!(decode_state(&c).unwrap_err().contains("0x4"));
    }

    #[test]
    fn version_2_keeps_identity_trust_and_evidence() {
        let mut s = StateFile::new(false, 9);
        s.distrust = Distrust::Promoted;
        s.evidence = Evidence::File { size: 1, mtime_ns: 2, ino: 3 };
        s.history.push(crate::generations::record(8, [8; 16], "a"));
        s.history.push(crate::generations::record(9, [9; 16], "b"));
        assert_eq!(decode(&s.encode()), Ok(s.clone()));
        s.evidence = Evidence::Block { boot_id: [4; 16], sectors_written: 5 };
        assert_eq!(decode(&s.encode()), Ok(s));
    }

    #[test]
    fn version_1_is_still_read_without_identity() {
        let s = decode(&v1(false, 4)).unwrap();
        assert_eq!((s.incomplete, s.generation, s.evidence, s.history.current), (false, 4, Evidence::None, None));
        assert_eq!(decode_state(&v1(true, 2)), Ok((true, 2)));
        let mut c = v1(false, 4);
        c[12] = 2;
        let crc = crc32fast::hash(&c[..24]);
        c[24..].copy_from_slice(&crc.to_le_bytes());
        assert!(decode(&c).is_err());
    }
}
