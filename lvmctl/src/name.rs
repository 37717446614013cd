//! Validation of volume group names, logical volume names and tags against lvm2's own rules.
//!
//! lvmctl checks every name before it starts an `lvm` process, so a name LVM would reject never reaches the
//! tool and the error says exactly which rule the name breaks. The rules are those of lvm2 2.03
//! (`lib/misc/lvm-string.c`: `validate_name`, `apply_lvname_restrictions`, `validate_tag`); the reserved
//! strings were checked against the lvm2 2.03.16 binary in the User-Mode Linux guest, which rejects exactly these.

use thiserror::Error;

/// Longest VG or LV name lvm2 accepts (its `NAME_LEN` is 128 including the terminating NUL).
pub const MAX_NAME_LEN: usize = 127;

/// Longest tag lvmctl accepts. lvm2 allows longer tags; blockrep's tags are short, and a short limit keeps
/// error messages and metadata small.
pub const MAX_TAG_LEN: usize = 127;

/// LV names may not start with these (lvm2 uses them for its own volumes).
pub const RESERVED_LV_PREFIXES: &[&str] = &["snapshot", "pvmove"];

/// LV names may not contain these anywhere (lvm2 names its hidden sub-volumes with them).
pub const RESERVED_LV_SUBSTRINGS: &[&str] = &[
    "_cdata", "_cmeta", "_corig", "_cpool", "_cvol", "_imeta", "_iorig", "_mimage", "_mlog", "_pmspare", "_rimage",
    "_rmeta", "_tdata", "_tmeta", "_vdata", "_vorigin", "_wcorig",
];

/// What kind of name was checked; only used in error messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NameKind {
    /// A volume group name.
    VolumeGroup,
    /// A logical volume name.
    LogicalVolume,
    /// An LVM tag.
    Tag,
}

impl std::fmt::Display for NameKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            NameKind::VolumeGroup => "volume group name",
            NameKind::LogicalVolume => "logical volume name",
            NameKind::Tag => "LVM tag",
        })
    }
}

/// A name or tag that lvm2 would reject.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum NameError {
    /// The name is empty.
    #[error("the {kind} is empty; give a name made of letters, digits and + _ . -")]
    Empty {
        /// What was checked.
        kind: NameKind,
    },
    /// The name is longer than lvm2 allows.
    #[error("the {kind} {name:?} is {len} characters long, LVM allows at most {max}; choose a shorter name")]
    TooLong {
        /// What was checked.
        kind: NameKind,
        /// The rejected name.
        name: String,
        /// Its length in bytes.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The name contains a character LVM does not allow.
    #[error("the {kind} {name:?} contains {ch:?}, which LVM does not allow; use only {allowed}")]
    BadChar {
        /// What was checked.
        kind: NameKind,
        /// The rejected name.
        name: String,
        /// The first offending character.
        ch: char,
        /// The characters that are allowed, for the message.
        allowed: &'static str,
    },
    /// The name starts with '-' (LVM would read it as an option and uses '-' to join VG and LV names).
    #[error("the {kind} {name:?} starts with '-', which LVM does not allow; start it with a letter or digit")]
    LeadingHyphen {
        /// What was checked.
        kind: NameKind,
        /// The rejected name.
        name: String,
    },
    /// The name is `.` or `..`.
    #[error("the {kind} {name:?} is not allowed by LVM (it is a directory name); choose another name")]
    DotName {
        /// What was checked.
        kind: NameKind,
        /// The rejected name.
        name: String,
    },
    /// The LV name starts with a prefix lvm2 reserves for itself.
    #[error("the logical volume name {name:?} starts with {prefix:?}, which LVM reserves; choose another name")]
    ReservedPrefix {
        /// The rejected name.
        name: String,
        /// The reserved prefix it starts with.
        prefix: &'static str,
    },
    /// The LV name contains a string lvm2 reserves for its hidden sub-volumes.
    #[error("the logical volume name {name:?} contains {part:?}, which LVM reserves for its internal volumes; choose another name")]
    ReservedSubstring {
        /// The rejected name.
        name: String,
        /// The reserved string it contains.
        part: &'static str,
    },
}

const NAME_CHARS: &str = "letters, digits and + _ . -";
const TAG_CHARS: &str = "letters, digits and + _ . - / = ! : & #";

fn check_common(
    kind: NameKind,
    name: &str,
    max: usize,
    allowed: &'static str,
    ok: fn(char) -> bool,
) -> Result<(), NameError> {
    if name.is_empty() {
        return Err(NameError::Empty { kind });
    }
    if let Some(ch) = name.chars().find(|&c| !ok(c)) {
        return Err(NameError::BadChar { kind, name: name.to_owned(), ch, allowed });
    }
    if name.len() > max {
        return Err(NameError::TooLong { kind, name: name.to_owned(), len: name.len(), max });
    }
    if name.starts_with('-') {
        return Err(NameError::LeadingHyphen { kind, name: name.to_owned() });
    }
    Ok(())
}

fn name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '+' | '_' | '.' | '-')
}

fn tag_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '+' | '_' | '.' | '-' | '/' | '=' | '!' | ':' | '&' | '#')
}

/// Checks a volume group name against lvm2's rules: 1 to 127 characters from `[A-Za-z0-9+_.-]`, not starting
/// with `-`, not `.` or `..`.
pub fn validate_vg_name(name: &str) -> Result<(), NameError> {
    let kind = NameKind::VolumeGroup;
    check_common(kind, name, MAX_NAME_LEN, NAME_CHARS, name_char)?;
    if name == "." || name == ".." {
        return Err(NameError::DotName { kind, name: name.to_owned() });
    }
    Ok(())
}

/// Checks a logical volume name against lvm2's rules: those of [`validate_vg_name`], plus the reserved
/// prefixes [`RESERVED_LV_PREFIXES`] and the reserved strings [`RESERVED_LV_SUBSTRINGS`].
pub fn validate_lv_name(name: &str) -> Result<(), NameError> {
    let kind = NameKind::LogicalVolume;
    check_common(kind, name, MAX_NAME_LEN, NAME_CHARS, name_char)?;
    if name == "." || name == ".." {
        return Err(NameError::DotName { kind, name: name.to_owned() });
    }
    if let Some(prefix) = RESERVED_LV_PREFIXES.iter().find(|p| name.starts_with(**p)) {
        return Err(NameError::ReservedPrefix { name: name.to_owned(), prefix });
    }
    if let Some(part) = RESERVED_LV_SUBSTRINGS.iter().find(|s| name.contains(**s)) {
        return Err(NameError::ReservedSubstring { name: name.to_owned(), part });
    }
    Ok(())
}

/// Checks an LVM tag: 1 to [`MAX_TAG_LEN`] characters from `[A-Za-z0-9+_.-/=!:&#]`, not starting with `-`.
pub fn validate_tag(tag: &str) -> Result<(), NameError> {
    check_common(NameKind::Tag, tag, MAX_TAG_LEN, TAG_CHARS, tag_char)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_ordinary_names() {
        for n in ["data", "vg0", "a", "db_blockrep_snap", "x-y.z+1", "_x", "x_snapshot", "a_dump", "9"] {
            validate_lv_name(n).unwrap_or_else(|e| panic!("{n}: {e}"));
            validate_vg_name(n).unwrap_or_else(|e| panic!("{n}: {e}"));
        }
        validate_lv_name(&"a".repeat(MAX_NAME_LEN)).unwrap();
    }

    #[test]
    fn rejects_what_lvm_rejects() {
        assert!(matches!(validate_lv_name(""), Err(NameError::Empty { .. })));
        assert!(matches!(validate_lv_name("bad name"), Err(NameError::BadChar { ch: ' ', .. })));
        assert!(matches!(validate_lv_name("a/b"), Err(NameError::BadChar { ch: '/', .. })));
        assert!(matches!(validate_lv_name("ä"), Err(NameError::BadChar { ch: 'ä', .. })));
        assert!(matches!(validate_lv_name("-x"), Err(NameError::LeadingHyphen { .. })));
        assert!(matches!(validate_lv_name("."), Err(NameError::DotName { .. })));
        assert!(matches!(validate_vg_name(".."), Err(NameError::DotName { .. })));
        assert!(matches!(validate_lv_name(&"a".repeat(128)), Err(NameError::TooLong { len: 128, .. })));
        assert!(matches!(validate_lv_name("snapshotx"), Err(NameError::ReservedPrefix { prefix: "snapshot", .. })));
        assert!(matches!(validate_lv_name("pvmove0"), Err(NameError::ReservedPrefix { prefix: "pvmove", .. })));
        for s in RESERVED_LV_SUBSTRINGS {
            let n = format!("a{s}x");
            assert!(matches!(validate_lv_name(&n), Err(NameError::ReservedSubstring { .. })), "{n}");
        }
        // Reserved LV strings are fine in VG names.
        validate_vg_name("vg_tdata").unwrap();
    }

    #[test]
    fn messages_name_the_value_and_the_fix() {
        let msg = validate_lv_name("bad name").unwrap_err().to_string();
        assert!(msg.contains("\"bad name\"") && msg.contains("' '") && msg.contains("use only letters"), "{msg}");
        let msg = validate_lv_name("a_tdata").unwrap_err().to_string();
        assert!(msg.contains("\"_tdata\"") && msg.contains("choose another name"), "{msg}");
    }

    #[test]
    fn tags() {
        validate_tag("blockrep_shadow").unwrap();
        validate_tag("a/b=c:d&e#f!g").unwrap();
        assert!(matches!(validate_tag("bad tag"), Err(NameError::BadChar { ch: ' ', .. })));
        assert!(matches!(validate_tag("-t"), Err(NameError::LeadingHyphen { .. })));
        assert!(matches!(validate_tag(""), Err(NameError::Empty { kind: NameKind::Tag })));
    }
}
