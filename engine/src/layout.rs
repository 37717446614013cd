//! The one helper behind blockrep's fixed on-disk headers (manifest, spool, state file, spool records).
//!
//! Every such header starts with an 8-byte magic and a little-endian `u32` version, continues with little-endian
//! fields, and ends with the crc32 of everything before it, then zero padding up to its fixed length. A format
//! writes its fields through [`Put`] and reads them through [`Get`] in the order drawn in its module docs, so the
//! layout lives in one place per format (the order of the calls), not in a table of byte offsets kept in step by
//! hand in an encoder and a decoder.
//!
//! [`Get`] never reads past the slice it was given: the caller checks the length first ([`Get::header`] does it
//! for headers), and an out-of-range read is a bug (it panics).

/// Why a header's prefix was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PrefixError {
    /// The input is shorter than the header.
    TooShort {
        /// Input length.
        len: usize,
    },
    /// The first 8 bytes are not the format's magic.
    BadMagic {
        /// The first 8 bytes.
        found: [u8; 8],
    },
    /// The version is not the one this build reads.
    BadVersion {
        /// Version in the input.
        found: u32,
    },
}

/// Writes little-endian fields one after the other into a fixed buffer (zero-initialised: skipped and padding
/// bytes stay zero).
#[derive(Debug)]
pub(crate) struct Put<'a> {
    buf: &'a mut [u8],
    at: usize,
}

impl<'a> Put<'a> {
    /// Writes from the start of `buf`.
    pub(crate) fn new(buf: &'a mut [u8]) -> Self {
        Put { buf, at: 0 }
    }
    /// Writes `magic` and `version`, then continues after them.
    pub(crate) fn header(buf: &'a mut [u8], magic: &[u8; 8], version: u32) -> Self {
        let mut p = Put::new(buf);
        p.bytes(magic).u32(version);
        p
    }
    /// Writes raw bytes.
    pub(crate) fn bytes(&mut self, b: &[u8]) -> &mut Self {
        self.buf[self.at..self.at + b.len()].copy_from_slice(b);
        self.at += b.len();
        self
    }
    /// Writes a byte.
    pub(crate) fn u8(&mut self, v: u8) -> &mut Self {
        self.bytes(&[v])
    }
    /// Writes a little-endian `u32`.
    pub(crate) fn u32(&mut self, v: u32) -> &mut Self {
        self.bytes(&v.to_le_bytes())
    }
    /// Writes a little-endian `u64`.
    pub(crate) fn u64(&mut self, v: u64) -> &mut Self {
        self.bytes(&v.to_le_bytes())
    }
    /// Leaves `n` reserved bytes (zero).
    pub(crate) fn zeros(&mut self, n: usize) -> &mut Self {
        self.buf[self.at..self.at + n].fill(0);
        self.at += n;
        self
    }
    /// Writes the crc32 of every byte written so far (the rest of the buffer stays zero padding).
    pub(crate) fn crc(&mut self) -> &mut Self {
        let crc = crc32fast::hash(&self.buf[..self.at]);
        self.u32(crc)
    }
}

/// Reads little-endian fields one after the other from a slice.
#[derive(Debug)]
pub(crate) struct Get<'a> {
    buf: &'a [u8],
    at: usize,
}

impl<'a> Get<'a> {
    /// Reads from the start of `buf`.
    pub(crate) fn new(buf: &'a [u8]) -> Self {
        Get { buf, at: 0 }
    }
    /// Checks that `buf` holds at least a `len`-byte header starting with `magic` and `version` (in this order of
    /// checks), then reads the header's fields after them (reads are limited to the first `len` bytes).
    pub(crate) fn header(buf: &'a [u8], len: usize, magic: &[u8; 8], version: u32) -> Result<Self, PrefixError> {
        if buf.len() < len {
            return Err(PrefixError::TooShort { len: buf.len() });
        }
        let mut g = Get::new(&buf[..len]);
        let found: [u8; 8] = g.array();
        if &found != magic {
            return Err(PrefixError::BadMagic { found });
        }
        match g.u32() {
            v if v == version => Ok(g),
            found => Err(PrefixError::BadVersion { found }),
        }
    }
    /// Reads `N` raw bytes.
    pub(crate) fn array<const N: usize>(&mut self) -> [u8; N] {
        let b = self.buf[self.at..self.at + N].try_into().expect("N bytes");
        self.at += N;
        b
    }
    /// Reads a byte.
    pub(crate) fn u8(&mut self) -> u8 {
        self.array::<1>()[0]
    }
    /// Reads a little-endian `u32`.
    pub(crate) fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.array())
    }
    /// Reads a little-endian `u64`.
    pub(crate) fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.array())
    }
    /// Reads the stored crc32 that follows the fields read so far and compares it with theirs: `Err((stored,
    /// computed))` when they differ.
    pub(crate) fn crc(&mut self) -> Result<(), (u32, u32)> {
        let computed = crc32fast::hash(&self.buf[..self.at]);
        match self.u32() {
            stored if stored == computed => Ok(()),
            stored => Err((stored, computed)),
        }
    }
    /// Whether every byte after the ones read so far is zero (the padding).
    pub(crate) fn rest_is_zero(&self) -> bool {
        self.buf[self.at..].iter().all(|&b| b == 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn put_and_get_agree_and_checks_come_in_order() {
        let mut b = [0u8; 40];
        Put::header(&mut b, b"TESTMAG1", 3).u8(7).zeros(3).u32(0xdead_beef).u64(u64::MAX - 1).crc();
        assert_eq!(&b[..8], b"TESTMAG1");
        assert_eq!(b[8..12], 3u32.to_le_bytes());
        assert_eq!(b[12], 7);
        assert_eq!(b[28..32], crc32fast::hash(&b[..28]).to_le_bytes());
        let mut g = Get::header(&b, 40, b"TESTMAG1", 3).unwrap();
        assert_eq!((g.u8(), g.array::<3>(), g.u32(), g.u64()), (7, [0; 3], 0xdead_beef, u64::MAX - 1));
        assert_eq!(g.crc(), Ok(()));
        assert!(g.rest_is_zero());

        assert_eq!(Get::header(&b[..39], 40, b"TESTMAG1", 3).unwrap_err(), PrefixError::TooShort { len: 39 });
        assert_eq!(Get::header(&b, 40, b"OTHERMAG", 3).unwrap_err(), PrefixError::BadMagic { found: *b"TESTMAG1" });
        assert_eq!(Get::header(&b, 40, b"TESTMAG1", 4).unwrap_err(), PrefixError::BadVersion { found: 3 });
        let mut c = b;
        c[20] ^= 1;
        let mut g = Get::header(&c, 40, b"TESTMAG1", 3).unwrap();
        let _fields = (g.u8(), g.array::<3>(), g.u32(), g.u64());
        assert!(g.crc().is_err());
        c[39] = 1;
        assert!(!Get::header(&c, 40, b"TESTMAG1", 3).unwrap().rest_is_zero());
    }
}
