//! The shared 256-bit key: loading and generating key files, and key rotation.
//!
//! A key file holds either the 32 raw bytes or 64 hexadecimal characters (surrounding whitespace allowed). It must
//! not be readable by group or others.
//!
//! Rotation: `blockrep keygen --rotate KEYFILE` writes the next key to `KEYFILE.next` ([`next_key_path`]); the
//! operator copies it to the other node. A node holding a next key proves both keys in the handshake and, as the
//! standby, prefers the next key; so the first session in which both nodes hold it runs under it. A node that has
//! seen its peer prove the next key finishes the rotation: `KEYFILE.next` is fsynced and renamed over `KEYFILE`,
//! then the directory is fsynced ([`KeySet::finish_rotation`]). Every state in between authenticates with the
//! peer: until this node finishes, it still holds both keys; after, it holds the key its peer proved, which the
//! peer keeps (as current or next) until it finishes too.

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

/// The file a node's next key lives in during a rotation: `KEYFILE.next` beside `KEYFILE`.
pub fn next_key_path(path: &Path) -> PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push(".next");
    PathBuf::from(p)
}

/// A short public fingerprint of a key (16 hex characters of a BLAKE3 key derivation; it reveals nothing of the
/// key), shown by `status` and `keygen` so an operator can compare the keys of both nodes.
pub fn key_id(key: &Key) -> String {
    let d = blake3::derive_key("blockrep key id v1", key.as_bytes());
    d[..8].iter().map(|b| format!("{b:02x}")).collect()
}

/// Which of a node's keys a session runs under.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeySlot {
    /// The key in `key_file`.
    Current,
    /// The next key of a rotation in progress (`KEYFILE.next`).
    Next,
}

/// The keys a node authenticates with: its current key and, during a rotation, the next one. Loaded from a key file
/// ([`KeySet::load`]) or built in memory ([`KeySet::single`]; such a set never finishes a rotation on disk).
#[derive(Clone, PartialEq, Eq)]
pub struct KeySet {
    current: Key,
    next: Option<Key>,
    file: Option<PathBuf>,
}

impl std::fmt::Debug for KeySet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeySet")
            .field("current", &key_id(&self.current))
            .field("next", &self.next.as_ref().map(key_id))
            .field("file", &self.file)
            .finish()
    }
}

impl From<Key> for KeySet {
    fn from(k: Key) -> Self {
        KeySet::single(k)
    }
}

impl From<&Key> for KeySet {
    fn from(k: &Key) -> Self {
        KeySet::single(k.clone())
    }
}

impl From<&KeySet> for KeySet {
    fn from(k: &KeySet) -> Self {
        k.clone()
    }
}

impl KeySet {
    /// One key, no rotation, no file.
    pub fn single(key: Key) -> KeySet {
        KeySet { current: key, next: None, file: None }
    }

    /// A current and a next key in memory (tests).
    pub fn with_next(current: Key, next: Key) -> KeySet {
        KeySet { current, next: Some(next), file: None }
    }

    /// Loads `path` and, if it exists, `path.next` (both must be valid key files of mode 0600). The next key is
    /// read first: a rotation finished by another process between the two reads (a rename of `path.next` over
    /// `path`) then still yields a set holding the new key.
    pub fn load(path: &Path) -> Result<KeySet, KeyError> {
        let next_path = next_key_path(path);
        let next = match load_key(&next_path) {
            Ok(k) => Some(k),
            Err(KeyError::Read { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(e),
        };
        let current = load_key(path)?;
        let next = next.filter(|n| *n != current);
        Ok(KeySet { current, next, file: Some(path.to_owned()) })
    }

    /// The current key.
    pub fn current(&self) -> &Key {
        &self.current
    }

    /// The next key, during a rotation.
    pub fn next(&self) -> Option<&Key> {
        self.next.as_ref()
    }

    /// The key file it was loaded from.
    pub fn file(&self) -> Option<&Path> {
        self.file.as_deref()
    }

    /// The key in `slot` (the current key when there is no next key).
    pub fn get(&self, slot: KeySlot) -> &Key {
        match slot {
            KeySlot::Next => self.next.as_ref().unwrap_or(&self.current),
            KeySlot::Current => &self.current,
        }
    }

    /// The keys with their slots, current first.
    pub fn slots(&self) -> impl DoubleEndedIterator<Item = (KeySlot, &Key)> {
        std::iter::once((KeySlot::Current, &self.current)).chain(self.next.iter().map(|k| (KeySlot::Next, k)))
    }

    /// Finishes a rotation after the peer proved the next key: `KEYFILE.next` (still holding that key) is fsynced
    /// and renamed over `KEYFILE`, then the directory is fsynced. `Ok(false)` when there is nothing to do: no next
    /// key, no file, or `KEYFILE.next` is gone (another process finished) or now holds another key (a new
    /// rotation started meanwhile).
    pub fn finish_rotation(&self) -> Result<bool, KeyError> {
        let (Some(next), Some(path)) = (&self.next, &self.file) else { return Ok(false) };
        let next_path = next_key_path(path);
        match load_key(&next_path) {
            Ok(k) if k == *next => {}
            Ok(_) => return Ok(false),
            Err(KeyError::Read { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(e),
        }
        let fail = |source| KeyError::Rotate { path: path.clone(), source };
        // A copied key file may not be on disk yet: make it durable before it replaces the current key.
        std::fs::File::open(&next_path).and_then(|f| f.sync_all()).map_err(fail)?;
        std::fs::rename(&next_path, path).map_err(fail)?;
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(fail)?;
        Ok(true)
    }
}

/// Where the server side of the handshake gets its keys, by the client's node name. Today a node has one key file
/// for its peer ([`KeyFile`]); a standby serving several primaries can look their keys up per primary.
pub trait KeyStore: Send + Sync {
    /// The keys for a session with the peer named `peer_node` (as it calls itself in its Hello).
    fn keys_for(&self, peer_node: &str) -> Result<KeySet, KeyError>;
}

impl KeyStore for Key {
    fn keys_for(&self, _peer_node: &str) -> Result<KeySet, KeyError> {
        Ok(KeySet::single(self.clone()))
    }
}

impl KeyStore for KeySet {
    fn keys_for(&self, _peer_node: &str) -> Result<KeySet, KeyError> {
        Ok(self.clone())
    }
}

/// A key file read again for every handshake, so a next key copied in while `serve` runs is used at once.
#[derive(Debug, Clone)]
pub struct KeyFile(pub PathBuf);

impl KeyStore for KeyFile {
    fn keys_for(&self, _peer_node: &str) -> Result<KeySet, KeyError> {
        KeySet::load(&self.0)
    }
}

/// Errors of key files.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// A standby protecting several primaries has no key for the node that connected.
    #[error(
        "node {peer} is not a primary of standby {standby} (its [[primary]] blocks name {known}); add a [[primary]] \
         block for {peer} with its own key_file on the standby, or check `node` in {peer}'s configuration"
    )]
    UnknownPeer {
        /// The name the peer gave.
        peer: String,
        /// The standby.
        standby: String,
        /// The primaries it protects, comma-separated.
        known: String,
    },
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
    /// `keygen --rotate` without a current key.
    #[error("there is no current key at {} to rotate from; create one with `blockrep keygen {}`", path.display(), path.display())]
    NoCurrent {
        /// The key file.
        path: PathBuf,
        /// Why it cannot be read.
        #[source]
        source: Box<KeyError>,
    },
    /// Finishing a rotation (fsync and rename of the next key file) failed.
    #[error("cannot make the next key {}.next the current key {} after the peer proved it; the session goes on under the new key and the next session tries again (check that the directory is writable)", path.display(), path.display())]
    Rotate {
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

/// `keygen --rotate`: checks that `path` holds a valid current key, then writes a new random key to
/// `path.next` ([`generate_key`]: mode 0600, an existing next key is replaced only with `force`). Returns the current
/// and the next key.
pub fn generate_next_key(path: &Path, force: bool) -> Result<(Key, Key), KeyError> {
    let current = load_key(path).map_err(|e| KeyError::NoCurrent { path: path.to_owned(), source: Box::new(e) })?;
    let next = generate_key(&next_key_path(path), force)?;
    Ok((current, next))
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
    fn rotation_files_load_and_finish() {
        let d = tmpdir();
        let p = d.join("key");
        let e = generate_next_key(&p, false).unwrap_err();
        assert!(e.to_string().contains("no current key") && e.to_string().contains("blockrep keygen"), "{e}");
        let k0 = generate_key(&p, false).unwrap();
        let set = KeySet::load(&p).unwrap();
        assert_eq!((set.current(), set.next()), (&k0, None));
        assert!(!set.finish_rotation().unwrap(), "nothing to finish without a next key");
        let (c, k1) = generate_next_key(&p, false).unwrap();
        assert_eq!(c, k0);
        let next = d.join("key.next");
        assert_eq!(std::fs::metadata(&next).unwrap().permissions().mode() & 0o777, 0o600);
        let e = generate_next_key(&p, false).unwrap_err();
        assert!(matches!(e, KeyError::Exists { .. }), "{e}");
        assert_eq!(load_key(&next).unwrap(), k1, "a refused overwrite keeps the next key");
        let set = KeySet::load(&p).unwrap();
        assert_eq!((set.current(), set.next()), (&k0, Some(&k1)));
        assert_eq!(set.get(KeySlot::Next), &k1);
        assert!(set.finish_rotation().unwrap());
        assert!(!next.exists());
        assert_eq!(load_key(&p).unwrap(), k1);
        assert!(!set.finish_rotation().unwrap(), "a second finish (another process) is a no-op");
        assert_eq!(load_key(&p).unwrap(), k1);
        // A next key replaced by a newer rotation is not promoted by a stale set.
        let (_, k2) = generate_next_key(&p, false).unwrap();
        let stale = KeySet { current: k1.clone(), next: Some(k0.clone()), file: Some(p.clone()) };
        assert!(!stale.finish_rotation().unwrap());
        assert_eq!((load_key(&p).unwrap(), load_key(&next).unwrap()), (k1, k2));
        // A readable next key is refused like a readable key file.
        std::fs::set_permissions(&next, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(KeySet::load(&p), Err(KeyError::Permissions { .. })));
        assert_eq!(key_id(&k0).len(), 16);
        assert_ne!(key_id(&k0), key_id(&Key([0; 32])));
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
