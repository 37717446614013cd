//! GRUB environment block files (`/boot/grub/grubenv`), read and written natively.
//!
//! Layout (as `grub-editenv` and GRUB's `save_env` use it):
//!
//! ```text
//! +------------------------------+---------------------------+-------------------------+
//! | "# GRUB Environment Block\n" | "key=value\n" lines       | '#' padding to 1024     |
//! +------------------------------+---------------------------+-------------------------+
//! ```
//!
//! Values escape `\` and newline with a backslash. The file is always exactly [`GRUBENV_SIZE`] bytes. Writes go
//! to a temporary file that is fsynced and renamed over the original, then the directory is fsynced.

use std::path::{Path, PathBuf};

/// Size of an environment block file.
pub const GRUBENV_SIZE: usize = 1024;
/// First line of every environment block.
pub const GRUBENV_HEADER: &str = "# GRUB Environment Block\n";

/// Errors of reading or writing a GRUB environment block.
#[derive(Debug, thiserror::Error)]
pub enum GrubEnvError {
    /// Reading or writing the file failed.
    #[error(
        "could not {action} GRUB environment block {path}; check boot_target.path and that /boot is mounted writable"
    )]
    Io {
        /// What was being done.
        action: &'static str,
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The file is not a valid environment block.
    #[error("{path} is not a GRUB environment block ({problem}); recreate it with `grub-editenv {path} create`")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What check failed.
        problem: String,
    },
    /// The variables do not fit into 1024 bytes or a name is not allowed.
    #[error("cannot store variable `{key}` in the GRUB environment block: {problem}")]
    Variable {
        /// The variable.
        key: String,
        /// What is wrong.
        problem: &'static str,
    },
}

/// The variables of an environment block, in file order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GrubEnv {
    vars: Vec<(String, String)>,
}

impl GrubEnv {
    /// Parses a block; `Err` describes the first failed check.
    pub fn parse(bytes: &[u8]) -> Result<GrubEnv, String> {
        if bytes.len() != GRUBENV_SIZE {
            return Err(format!("size is {} bytes, must be {GRUBENV_SIZE}", bytes.len()));
        }
        if !bytes.starts_with(GRUBENV_HEADER.as_bytes()) {
            return Err("missing header line".into());
        }
        let mut vars = Vec::new();
        let rest = &bytes[GRUBENV_HEADER.len()..];
        // Lines end at an unescaped newline (a value escapes `\` and newline with a backslash), as in GRUB.
        let mut lines = Vec::new();
        let (mut start, mut i) = (0, 0);
        while i < rest.len() {
            match rest[i] {
                b'\\' => i += 2,
                b'\n' => {
                    lines.push(&rest[start..i]);
                    i += 1;
                    start = i;
                }
                _ => i += 1,
            }
        }
        if start < rest.len() {
            lines.push(&rest[start..]);
        }
        for line in lines {
            if line.first() == Some(&b'#') || line.is_empty() {
                continue;
            }
            let eq = line.iter().position(|&b| b == b'=').ok_or("a line has no '='")?;
            let key = std::str::from_utf8(&line[..eq]).map_err(|_| "a name is not UTF-8")?;
            let mut value = Vec::with_capacity(line.len() - eq);
            let mut it = line[eq + 1..].iter();
            while let Some(&c) = it.next() {
                value.push(if c == b'\\' { *it.next().unwrap_or(&b'\\') } else { c });
            }
            let value = String::from_utf8(value).map_err(|_| "a value is not UTF-8")?;
            vars.push((key.to_string(), value));
        }
        Ok(GrubEnv { vars })
    }

    /// Encodes to exactly [`GRUBENV_SIZE`] bytes.
    pub fn encode(&self) -> Result<Vec<u8>, GrubEnvError> {
        let mut out = GRUBENV_HEADER.as_bytes().to_vec();
        for (k, v) in &self.vars {
            out.extend_from_slice(k.as_bytes());
            out.push(b'=');
            for &c in v.as_bytes() {
                if c == b'\\' || c == b'\n' {
                    out.push(b'\\');
                }
                out.push(c);
            }
            out.push(b'\n');
            if out.len() > GRUBENV_SIZE {
                return Err(GrubEnvError::Variable { key: k.clone(), problem: "the block would exceed 1024 bytes" });
            }
        }
        out.resize(GRUBENV_SIZE, b'#');
        Ok(out)
    }

    /// The value of `key`.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.vars.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }

    /// Sets `key` (keeping its position if present).
    pub fn set(&mut self, key: &str, value: &str) -> Result<(), GrubEnvError> {
        if key.is_empty() || key.contains(['=', '\n', '\\']) || key.starts_with('#') {
            return Err(GrubEnvError::Variable {
                key: key.into(),
                problem: "names must be non-empty without '=', '\\', newline or leading '#'",
            });
        }
        match self.vars.iter_mut().find(|(k, _)| k == key) {
            Some((_, v)) => *v = value.to_string(),
            None => self.vars.push((key.to_string(), value.to_string())),
        }
        Ok(())
    }

    /// Removes `key`; returns whether it was present.
    pub fn unset(&mut self, key: &str) -> bool {
        let n = self.vars.len();
        self.vars.retain(|(k, _)| k != key);
        n != self.vars.len()
    }

    /// All variables in file order.
    pub fn vars(&self) -> &[(String, String)] {
        &self.vars
    }

    /// Reads and parses `path`.
    pub fn read(path: &Path) -> Result<GrubEnv, GrubEnvError> {
        let bytes =
            std::fs::read(path).map_err(|source| GrubEnvError::Io { action: "read", path: path.into(), source })?;
        GrubEnv::parse(&bytes).map_err(|problem| GrubEnvError::Invalid { path: path.into(), problem })
    }

    /// Writes to `path` crash-safely (temporary file, fsync, rename, fsync of the directory).
    pub fn write(&self, path: &Path) -> Result<(), GrubEnvError> {
        let bytes = self.encode()?;
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "grubenv".into());
        let tmp = path.with_file_name(format!(".{name}.blockrep.tmp"));
        crate::state::atomic_write(&tmp, path, &bytes).map_err(|source| GrubEnvError::Io {
            action: "write",
            path: path.into(),
            source,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::process::Command;

    const EDITENV: &str = "/usr/bin/grub-editenv";

    fn editenv(args: &[&str]) -> String {
        let out = Command::new(EDITENV).args(args).output().expect("run grub-editenv");
        assert!(out.status.success(), "grub-editenv {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    }

    #[test]
    fn reads_what_grub_editenv_wrote_and_grub_editenv_lists_what_we_wrote() {
        if !Path::new(EDITENV).exists() {
            eprintln!(
                "SKIP grub-env round trip: {EDITENV} is missing (Debian package grub-common, see scripts/deps.sh)"
            );
            return;
        }
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("grubenv");
        let fs = f.to_str().unwrap();
        editenv(&[fs, "create"]);
        editenv(&[fs, "set", "saved_entry=Debian GNU/Linux", "weird=a\\b"]);
        let env = GrubEnv::read(&f).unwrap();
        assert_eq!(env.get("saved_entry"), Some("Debian GNU/Linux"));
        assert_eq!(env.get("weird"), Some("a\\b"));

        let mut env = env;
        env.set("saved_entry", "blockrep-primary").unwrap();
        env.set("next_entry", "once").unwrap();
        env.write(&f).unwrap();
        assert_eq!(std::fs::metadata(&f).unwrap().len(), GRUBENV_SIZE as u64);
        let listed = editenv(&[fs, "list"]);
        assert_eq!(listed, "saved_entry=blockrep-primary\nweird=a\\b\nnext_entry=once\n");

        env.unset("next_entry");
        env.write(&f).unwrap();
        editenv(&[fs, "set", "extra=1"]);
        let back = GrubEnv::read(&f).unwrap();
        assert_eq!(back.get("next_entry"), None);
        assert_eq!(back.get("extra"), Some("1"));
        assert_eq!(back.get("saved_entry"), Some("blockrep-primary"));
    }

    #[test]
    fn damaged_blocks_are_refused_and_overflow_is_reported() {
        assert!(GrubEnv::parse(&[b'#'; 1024]).is_err());
        assert!(GrubEnv::parse(GRUBENV_HEADER.as_bytes()).is_err());
        let mut e = GrubEnv::default();
        e.set("big", &"x".repeat(1000)).unwrap();
        assert!(matches!(e.encode(), Err(GrubEnvError::Variable { .. })));
        assert!(e.set("a=b", "c").is_err());
    }

    proptest! {
        #[test]
        fn encode_parse_round_trip(vars in proptest::collection::vec(("[a-z_]{1,12}", "[ -~\n\\\\]{0,40}"), 0..8)) {
            let mut e = GrubEnv::default();
            for (k, v) in &vars { e.set(k, v).unwrap(); }
            if let Ok(bytes) = e.encode() {
                prop_assert_eq!(bytes.len(), GRUBENV_SIZE);
                prop_assert_eq!(GrubEnv::parse(&bytes).unwrap(), e);
            }
        }

        #[test]
        fn parse_never_panics(body in proptest::collection::vec(any::<u8>(), 0..1000)) {
            let mut b = GRUBENV_HEADER.as_bytes().to_vec();
            b.extend_from_slice(&body);
            b.resize(GRUBENV_SIZE, b'#');
            let _ = GrubEnv::parse(&b);
        }
    }
}
