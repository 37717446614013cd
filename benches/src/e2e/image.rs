//! Seeded volume images and change patterns.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;

use rand::rngs::SmallRng;
use rand::{Rng, RngCore, SeedableRng};

/// What the image holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Content {
    /// Incompressible random bytes.
    Random,
    /// Per 1 MiB region: a quarter zero, a quarter text-like (compressible), half random.
    Mixed,
    /// 95 % zero, 5 % random regions.
    Zero,
}

impl Content {
    /// Parses `random|mixed|zero`.
    pub fn parse(s: &str) -> Result<Content, String> {
        match s {
            "random" => Ok(Content::Random),
            "mixed" => Ok(Content::Mixed),
            "zero" => Ok(Content::Zero),
            _ => Err(format!("--content {s:?} is unknown: use random, mixed or zero")),
        }
    }

    /// Name as on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Content::Random => "random",
            Content::Mixed => "mixed",
            Content::Zero => "zero",
        }
    }
}

/// How changes are laid out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pattern {
    /// Distinct random 4 KiB blocks.
    Scattered4k,
    /// Distinct random 1 MiB-aligned 1 MiB runs.
    Clustered1m,
}

impl Pattern {
    /// Parses `scattered4k|clustered1m`.
    pub fn parse(s: &str) -> Result<Pattern, String> {
        match s {
            "scattered4k" => Ok(Pattern::Scattered4k),
            "clustered1m" => Ok(Pattern::Clustered1m),
            _ => Err(format!("--pattern {s:?} is unknown: use scattered4k or clustered1m")),
        }
    }

    /// Name as on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Pattern::Scattered4k => "scattered4k",
            Pattern::Clustered1m => "clustered1m",
        }
    }

    /// Bytes per changed unit.
    pub fn unit(self) -> u64 {
        match self {
            Pattern::Scattered4k => 4096,
            Pattern::Clustered1m => 1 << 20,
        }
    }
}

const REGION: usize = 1 << 20;

const WORDS: &[&str] = &[
    "INSERT INTO calls VALUES (",
    "2026-11-25 ",
    "SIP/2.0 200 OK\r\n",
    "From: <sip:",
    "@pbx.example>;tag=",
    "\n",
    "Call-ID: ",
    "Content-Length: 0\r\n",
    "ext-",
    "voicemail ",
    "queue=support ",
    "duration=",
    "    ",
];

/// Fills one region (up to 1 MiB) of an image of `content`.
fn fill_region(content: Content, rng: &mut SmallRng, buf: &mut [u8]) {
    let kind = rng.gen_range(0..100u32);
    let random = match content {
        Content::Random => true,
        Content::Mixed => kind >= 50,
        Content::Zero => kind >= 95,
    };
    if random {
        rng.fill_bytes(buf);
        return;
    }
    if content == Content::Mixed && kind >= 25 {
        fill_text(rng, buf);
        return;
    }
    buf.fill(0);
}

/// Text-like bytes: words with numbers, compresses roughly 3-5x.
fn fill_text(rng: &mut SmallRng, buf: &mut [u8]) {
    let mut i = 0;
    while i < buf.len() {
        let w: &[u8] = if rng.gen_bool(0.3) {
            let n = rng.gen_range(0..1_000_000u32);
            let s = format!("{n}");
            let take = s.len().min(buf.len() - i);
            buf[i..i + take].copy_from_slice(&s.as_bytes()[..take]);
            i += take;
            continue;
        } else {
            WORDS[rng.gen_range(0..WORDS.len())].as_bytes()
        };
        let take = w.len().min(buf.len() - i);
        buf[i..i + take].copy_from_slice(&w[..take]);
        i += take;
    }
}

/// Writes a seeded image of `size` bytes at `path` and returns its BLAKE3.
pub fn generate(path: &Path, size: u64, content: Content, seed: u64) -> io::Result<blake3::Hash> {
    let mut rng = SmallRng::seed_from_u64(seed);
    let mut f = File::create(path)?;
    let mut hasher = blake3::Hasher::new();
    let mut buf = vec![0u8; REGION];
    let mut left = size;
    while left > 0 {
        let n = left.min(REGION as u64) as usize;
        fill_region(content, &mut rng, &mut buf[..n]);
        f.write_all(&buf[..n])?;
        hasher.update(&buf[..n]);
        left -= n as u64;
    }
    f.sync_all()?;
    Ok(hasher.finalize())
}

/// The changed ranges `(offset, len)` for `fraction` of the image under `pattern`, sorted by offset.
pub fn change_ranges(size: u64, pattern: Pattern, fraction: f64, seed: u64) -> Vec<(u64, u64)> {
    let unit = pattern.unit();
    let units = size / unit;
    let k = ((units as f64) * fraction).round() as u64;
    let k = k.min(units) as usize;
    let mut rng = SmallRng::seed_from_u64(seed);
    let mut idx: Vec<u64> = if k as u64 == units {
        (0..units).collect()
    } else {
        rand::seq::index::sample(&mut rng, units as usize, k).into_iter().map(|i| i as u64).collect()
    };
    idx.sort_unstable();
    idx.into_iter().map(|i| (i * unit, unit)).collect()
}

/// Overwrites `ranges` of `path` with new content: random bytes, except for a `mixed` image, where each range is
/// random or text-like (half and half, like the image's non-zero regions; never zeros, so every range changes).
pub fn apply_changes(path: &Path, ranges: &[(u64, u64)], content: Content, seed: u64) -> io::Result<()> {
    let f = File::options().write(true).open(path)?;
    let mut rng = SmallRng::seed_from_u64(seed ^ 0x5eed_c4a9);
    let mut buf = vec![0u8; REGION];
    for &(off, len) in ranges {
        let b = &mut buf[..len as usize];
        if content == Content::Mixed && rng.gen_bool(0.5) {
            fill_text(&mut rng, b);
        } else {
            rng.fill_bytes(b);
        }
        f.write_all_at(b, off)?;
    }
    Ok(())
}

/// Copies `ranges` from `from` into `to` at the same offsets (undoing a change), then fsyncs `to`.
pub fn copy_ranges(from: &Path, to: &Path, ranges: &[(u64, u64)]) -> io::Result<()> {
    let src = File::open(from)?;
    let dst = File::options().write(true).open(to)?;
    let mut buf = vec![0u8; REGION];
    for &(off, len) in ranges {
        let b = &mut buf[..len as usize];
        src.read_exact_at(b, off)?;
        dst.write_all_at(b, off)?;
    }
    dst.sync_all()
}

/// Full copy of `from` to `to` (in-kernel copy where possible), fsynced.
pub fn copy_file(from: &Path, to: &Path) -> io::Result<()> {
    let _ = std::fs::remove_file(to);
    std::fs::copy(from, to)?;
    File::options().write(true).open(to)?.sync_all()
}

/// BLAKE3 of a whole file, or `None` when it does not exist.
pub fn hash_file(path: &Path) -> io::Result<Option<blake3::Hash>> {
    let mut f = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let mut hasher = blake3::Hasher::new();
    let mut buf = vec![0u8; REGION];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(Some(hasher.finalize()))
}

/// Reads the whole file once so it is in the page cache.
pub fn warm(path: &Path) -> io::Result<()> {
    hash_file(path).map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn change_ranges_are_distinct_sorted_and_of_the_requested_fraction() {
        let r = change_ranges(64 << 20, Pattern::Scattered4k, 0.01, 7);
        assert_eq!(r.len(), ((64u64 << 20) / 4096) as usize / 100 + 1);
        assert!(r.windows(2).all(|w| w[0].0 + w[0].1 <= w[1].0));
        assert_eq!(change_ranges(8 << 20, Pattern::Clustered1m, 1.0, 1).len(), 8);
        assert!(change_ranges(8 << 20, Pattern::Scattered4k, 0.0, 1).is_empty());
    }
}
