//! The shared 256-bit key: loading and generating key files.
//!
//! A key file holds either the 32 raw bytes or 64 hexadecimal characters (surrounding whitespace allowed). It must
//! not be readable by group or others.

use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// The shared key both nodes hold.
#[derive(Clone, PartialEq, Eq)]
pub struct Key(pub [u8; 32]);

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Key(<redacted>)")
    }
}

impl Key {
    /// The raw key bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

/// Errors of key files.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// The key file could not be read.
    #[error("cannot read key file {}; check key_file in the configuration (create one with `blockrep keygen`)", path.display())]
    Read {
        /// The key file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The key file is readable by group or others.
    #[error("key file {} is readable by group or others (mode {mode:o}); run `chmod 600 {}`", path.display(), path.display())]
    Permissions {
        /// The key file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// The content is neither 32 raw bytes nor 64 hex characters.
    #[error("key file {} holds {len} bytes that are neither 32 raw bytes nor 64 hex characters; create a new key with `blockrep keygen` and copy it to both nodes", path.display())]
    Format {
        /// The key file.
        path: PathBuf,
        /// Its length.
        len: usize,
    },
    /// The key file exists and overwriting was not asked for.
    #[error("key file {} already exists; refusing to overwrite it (use --force to replace it, then copy it to the other node)", path.display())]
    Exists {
        /// The key file.
        path: PathBuf,
    },
    /// Writing the key file failed.
    #[error("cannot write key file {}", path.display())]
    Write {
        /// The key file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The system random source failed.
    #[error("cannot get random bytes from the operating system for a new key")]
    Random(#[source] std::io::Error),
}

/// Loads the key from `path` (32 raw bytes or 64 hex characters); refuses a file readable by group or others.
pub fn load_key(path: &Path) -> Result<Key, KeyError> {
    let read = |source| KeyError::Read { path: path.to_owned(), source };
    let meta = std::fs::metadata(path).map_err(read)?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(KeyError::Permissions { path: path.to_owned(), mode });
    }
    let bytes = std::fs::read(path).map_err(read)?;
    parse_key(&bytes).ok_or(KeyError::Format { path: path.to_owned(), len: bytes.len() })
}

/// Parses key file content: exactly 32 raw bytes, or 64 hex characters with optional surrounding whitespace.
pub fn parse_key(bytes: &[u8]) -> Option<Key> {
    if let Ok(raw) = <[u8; 32]>::try_from(bytes) {
        // 32 bytes that happen to be hex digits are still raw: hex needs 64.
        return Some(Key(raw));
    }
    let text = std::str::from_utf8(bytes).ok()?.trim();
    if text.len() != 64 {
        return None;
    }
    let mut key = [0u8; 32];
    for (i, k) in key.iter_mut().enumerate() {
        *k = u8::from_str_radix(text.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(Key(key))
}

/// Writes a new random key to `path` as 64 hex characters and a newline, mode 0600; refuses to replace an existing
/// file unless `force`.
pub fn generate_key(path: &Path, force: bool) -> Result<Key, KeyError> {
    let mut key = [0u8; 32];
    getrandom::getrandom(&mut key).map_err(|e| KeyError::Random(std::io::Error::other(e.to_string())))?;
    let write = |source| KeyError::Write { path: path.to_owned(), source };
    let mut opts = OpenOptions::new();
    opts.write(true).mode(0o600);
    if force {
        opts.create(true).truncate(true);
    } else {
        opts.create_new(true);
    }
    let mut f = opts.open(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::AlreadyExists => KeyError::Exists { path: path.to_owned() },
        _ => write(e),
    })?;
    // An existing file keeps its mode on open: tighten it before the key is in it.
    f.set_permissions(std::fs::Permissions::from_mode(0o600)).map_err(write)?;
    let hex: String = key.iter().map(|b| format!("{b:02x}")).collect();
    f.write_all(format!("{hex}\n").as_bytes()).map_err(write)?;
    f.sync_all().map_err(write)?;
    Ok(Key(key))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmpdir() -> PathBuf {
        let mut r = [0u8; 8];
        getrandom::getrandom(&mut r).unwrap();
        let d = std::env::temp_dir().join(format!("netproto-key-{}", u64::from_le_bytes(r)));
        std::fs::create_dir(&d).unwrap();
        d
    }

    #[test]
    fn generate_then_load_and_refuse_overwrite() {
        let d = tmpdir();
        let p = d.join("key");
        let k = generate_key(&p, false).unwrap();
        assert_eq!(std::fs::metadata(&p).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(load_key(&p).unwrap(), k);
        let e = generate_key(&p, false).unwrap_err();
        assert!(e.to_string().contains("--force"), "{e}");
        assert_eq!(load_key(&p).unwrap(), k, "refused overwrite must keep the key");
        let k2 = generate_key(&p, true).unwrap();
        assert_ne!(k, k2);
        assert_eq!(load_key(&p).unwrap(), k2);
        std::fs::remove_dir_all(d).unwrap();
    }

    #[test]
    fn raw_and_hex_formats_and_bad_content() {
        let d = tmpdir();
        let p = d.join("key");
        std::fs::write(&p, [0xabu8; 32]).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(load_key(&p).unwrap(), Key([0xab; 32]));
        std::fs::write(&p, format!("  {}\n", "0f".repeat(32))).unwrap();
        assert_eq!(load_key(&p).unwrap(), Key([0x0f; 32]));
        std::fs::write(&p, "xyz").unwrap();
        let e = load_key(&p).unwrap_err();
        assert!(e.to_string().contains("neither 32 raw bytes nor 64 hex"), "{e}");
        std::fs::write(&p, "zz".repeat(32)).unwrap();
        assert!(matches!(load_key(&p), Err(KeyError::Format { .. })));
        std::fs::remove_dir_all(d).unwrap();
    }

    #[test]
    fn readable_key_file_is_refused_with_chmod_advice() {
        let d = tmpdir();
        let p = d.join("key");
        generate_key(&p, false).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = load_key(&p).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!(
                "key file {} is readable by group or others (mode 644); run `chmod 600 {}`",
                p.display(),
                p.display()
            )
        );
        let e = load_key(&d.join("missing")).unwrap_err();
        assert!(matches!(e, KeyError::Read { .. }));
        std::fs::remove_dir_all(d).unwrap();
    }
}
