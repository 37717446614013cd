//! Parsing of `vgs`/`lvs` JSON reports (`--reportformat json --units b --nosuffix`).
//!
//! These are pure functions over the report text, tested on output captured from the real lvm2 in the
//! User-Mode Linux guest (`lvmctl/tests/fixtures/`). lvm2 2.03 prints every value as a JSON string
//! (`"lv_size":"33554432"`, `"data_percent":""`); the `json_std` format of later versions prints numbers and
//! `null`, and both are accepted.
//!
//! The report looks like this (one object per `report` entry; lvmctl asks for one kind of row at a time):
//!
//! ```text
//! {"report": [ {"lv": [ {"vg_name":"vg0", "lv_name":"data", "lv_size":"33554432", ...}, ... ]} ]}
//! ```

use std::path::PathBuf;

use serde_json::{Map, Value};
use thiserror::Error;

/// Largest report lvmctl parses. A VG with thousands of LVs stays far below this.
pub const MAX_REPORT_BYTES: usize = 16 << 20;

/// The fields lvmctl asks `vgs` for, in `-o` syntax.
pub const VG_FIELDS: &str = "vg_name,vg_size,vg_free,vg_extent_size";

/// The fields lvmctl asks `lvs` for, in `-o` syntax.
pub const LV_FIELDS: &str = "vg_name,lv_name,lv_size,lv_attr,origin,data_percent,lv_tags,lv_path,lv_kernel_major,\
                             lv_kernel_minor,segtype,thin_id,pool_lv,vg_free,vg_extent_size";

/// A JSON report that is not what lvmctl asked lvm for.
#[derive(Debug, Error)]
pub enum ReportError {
    /// The report is larger than [`MAX_REPORT_BYTES`].
    #[error("the lvm report is {len} bytes long, more than the {max} bytes lvmctl accepts")]
    TooLarge {
        /// Its length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The text is not JSON.
    #[error("the lvm report is not valid JSON")]
    Json(#[source] serde_json::Error),
    /// The JSON does not have the `{"report": [{"<kind>": [...]}]}` shape.
    #[error("the lvm report has no {kind:?} rows under \"report\" (is the lvm2 version supported?)")]
    Shape {
        /// The row kind that was expected (`vg` or `lv`).
        kind: &'static str,
    },
    /// A row lacks a field lvmctl asked for.
    #[error("row {row} of the lvm report has no field {field:?}")]
    MissingField {
        /// Row index, from 0.
        row: usize,
        /// The missing field.
        field: &'static str,
    },
    /// A field has a value that does not parse.
    #[error("row {row} of the lvm report has {field} = {value:?}, which is not {expected}")]
    BadValue {
        /// Row index, from 0.
        row: usize,
        /// The field.
        field: &'static str,
        /// Its text.
        value: String,
        /// What it should have been.
        expected: &'static str,
    },
}

/// A volume group, from `vgs`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Vg {
    /// VG name.
    pub name: String,
    /// Total size in bytes.
    pub size: u64,
    /// Unallocated space in bytes.
    pub free: u64,
    /// Physical extent size in bytes; every LV size is a multiple of it.
    pub extent_size: u64,
}

/// A logical volume, from `lvs`.
#[derive(Debug, Clone, PartialEq)]
pub struct Lv {
    /// Name of the VG it belongs to.
    pub vg: String,
    /// LV name.
    pub name: String,
    /// Size in bytes (for a classic snapshot: the size of its copy-on-write store).
    pub size: u64,
    /// The 10-character `lv_attr` string (see `man lvs`): position 1 is the volume type (`o` origin, `s`
    /// snapshot, `-` plain, ...), position 5 the state (`a` active, `I` invalid snapshot, ...).
    pub attr: String,
    /// For a snapshot: the name of its origin LV.
    pub origin: Option<String>,
    /// `data_percent` (formerly `snap_percent`): for a snapshot, how full its copy-on-write store is; `None`
    /// when lvm reports nothing (a plain LV, or an inactive snapshot).
    pub data_percent: Option<f64>,
    /// LVM tags.
    pub tags: Vec<String>,
    /// Device path (`/dev/<vg>/<lv>`); `None` for hidden LVs.
    pub path: Option<PathBuf>,
    /// Kernel device number `(major, minor)` of the active LV; `None` when it is not active.
    pub kernel_device: Option<(u32, u32)>,
    /// The segment type of its first segment (`linear`, `thin`, `thin-pool`, ...).
    pub segtype: String,
    /// A thin LV's device id in its pool (`thin_id`); `None` for any other LV.
    pub thin_id: Option<u32>,
    /// A thin LV's pool (`pool_lv`); `None` for any other LV.
    pub pool: Option<String>,
    /// Its VG's unallocated space in bytes (`vg_free`) when it was listed: the listing answers what a `vgs`
    /// would, for a VG that has LVs.
    pub vg_free: u64,
    /// Its VG's physical extent size in bytes (`vg_extent_size`).
    pub vg_extent_size: u64,
}

/// Fill state of a classic (copy-on-write) snapshot.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SnapshotStatus {
    /// How full the copy-on-write store is, 0.0 to 100.0.
    pub fill_percent: f64,
    /// The store overflowed and the kernel invalidated the snapshot: its content is lost.
    pub invalid: bool,
}

impl Lv {
    /// `vg/name`, the form lvm commands take.
    pub fn full_name(&self) -> String {
        format!("{}/{}", self.vg, self.name)
    }

    fn attr_char(&self, i: usize) -> Option<char> {
        self.attr.chars().nth(i)
    }

    /// Whether this LV is a classic snapshot (volume type `s`, or `S` while merging).
    pub fn is_snapshot(&self) -> bool {
        matches!(self.attr_char(0), Some('s' | 'S'))
    }

    /// Whether this LV is the origin of one or more snapshots (volume type `o`, or `O` while merging).
    pub fn is_origin(&self) -> bool {
        matches!(self.attr_char(0), Some('o' | 'O'))
    }

    /// Whether the LV is active (its device exists).
    pub fn is_active(&self) -> bool {
        matches!(self.attr_char(4), Some('a' | 'I'))
    }

    /// Whether the LV carries `tag`.
    pub fn has_tag(&self, tag: &str) -> bool {
        self.tags.iter().any(|t| t == tag)
    }

    /// For a snapshot: its fill state. A snapshot is invalid when the state character (position 5 of
    /// `lv_attr`) is `I`, or when its store is 100% full (lvm2 2.03.16 reports both for an overflowed
    /// snapshot: `swi-I-s---` with `data_percent` 100.00). `None` when this is not a snapshot, or when lvm reports
    /// no fill level for a valid snapshot (it is inactive).
    pub fn snapshot_status(&self) -> Option<SnapshotStatus> {
        if !self.is_snapshot() {
            return None;
        }
        let invalid_attr = self.attr_char(4) == Some('I');
        match self.data_percent {
            Some(p) => Some(SnapshotStatus { fill_percent: p, invalid: invalid_attr || p >= 100.0 }),
            None if invalid_attr => Some(SnapshotStatus { fill_percent: 100.0, invalid: true }),
            None => None,
        }
    }
}

/// Checks the size and JSON syntax of a report and returns the rows of kind `kind` (`vg` or `lv`) of all its
/// `report` entries.
pub(crate) fn rows(text: &str, kind: &'static str) -> Result<Vec<Map<String, Value>>, ReportError> {
    if text.len() > MAX_REPORT_BYTES {
        return Err(ReportError::TooLarge { len: text.len(), max: MAX_REPORT_BYTES });
    }
    let doc: Value = serde_json::from_str(text).map_err(ReportError::Json)?;
    let reports = doc.get("report").and_then(Value::as_array).ok_or(ReportError::Shape { kind })?;
    let mut out = Vec::new();
    let mut seen = false;
    for r in reports {
        if let Some(list) = r.get(kind) {
            seen = true;
            let list = list.as_array().ok_or(ReportError::Shape { kind })?;
            for row in list {
                out.push(row.as_object().ok_or(ReportError::Shape { kind })?.clone());
            }
        }
    }
    if !seen {
        return Err(ReportError::Shape { kind });
    }
    Ok(out)
}

/// A field's text: JSON strings as they are, numbers as printed, `null` as empty.
fn text(row: &Map<String, Value>, i: usize, field: &'static str) -> Result<String, ReportError> {
    match row.get(field) {
        None => Err(ReportError::MissingField { row: i, field }),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(Value::Number(n)) => Ok(n.to_string()),
        Some(Value::Null) => Ok(String::new()),
        Some(v) => Err(ReportError::BadValue { row: i, field, value: v.to_string(), expected: "a string or number" }),
    }
}

fn bytes(row: &Map<String, Value>, i: usize, field: &'static str) -> Result<u64, ReportError> {
    let s = text(row, i, field)?;
    s.trim().parse::<u64>().map_err(|_| ReportError::BadValue {
        row: i,
        field,
        value: s,
        expected: "a whole number of bytes (lvmctl runs lvm with --units b --nosuffix)",
    })
}

fn percent(row: &Map<String, Value>, i: usize, field: &'static str) -> Result<Option<f64>, ReportError> {
    let s = text(row, i, field)?;
    let t = s.trim();
    if t.is_empty() {
        return Ok(None);
    }
    match t.parse::<f64>() {
        Ok(p) if (0.0..=100.0).contains(&p) => Ok(Some(p)),
        _ => Err(ReportError::BadValue { row: i, field, value: s, expected: "a percentage from 0 to 100" }),
    }
}

/// A kernel device number part: lvm prints -1 (or nothing) for an inactive LV.
fn device_part(row: &Map<String, Value>, i: usize, field: &'static str) -> Result<Option<u32>, ReportError> {
    optional_u32(row, i, field, &["-1"], "a device number or -1")
}

/// A whole number, `None` when the field is empty or one of `none` (lvm's ways of saying "not applicable").
fn optional_u32(
    row: &Map<String, Value>,
    i: usize,
    field: &'static str,
    none: &[&str],
    expected: &'static str,
) -> Result<Option<u32>, ReportError> {
    let s = text(row, i, field)?;
    let t = s.trim();
    if t.is_empty() || none.contains(&t) {
        return Ok(None);
    }
    t.parse::<u32>().map(Some).map_err(|_| ReportError::BadValue { row: i, field, value: s, expected })
}

fn non_empty(s: String) -> Option<String> {
    if s.is_empty() {
        None
    } else {
        Some(s)
    }
}

/// Parses the JSON output of `vgs --reportformat json --units b --nosuffix -o` [`VG_FIELDS`].
pub fn parse_vgs(json: &str) -> Result<Vec<Vg>, ReportError> {
    rows(json, "vg")?
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let vg = Vg {
                name: text(r, i, "vg_name")?,
                size: bytes(r, i, "vg_size")?,
                free: bytes(r, i, "vg_free")?,
                extent_size: bytes(r, i, "vg_extent_size")?,
            };
            if vg.extent_size == 0 {
                return Err(ReportError::BadValue {
                    row: i,
                    field: "vg_extent_size",
                    value: "0".into(),
                    expected: "a positive extent size",
                });
            }
            Ok(vg)
        })
        .collect()
}

/// Parses the JSON output of `lvs --reportformat json --units b --nosuffix -o` [`LV_FIELDS`].
pub fn parse_lvs(json: &str) -> Result<Vec<Lv>, ReportError> {
    rows(json, "lv")?
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let attr = text(r, i, "lv_attr")?;
            if attr.chars().count() < 5 {
                return Err(ReportError::BadValue {
                    row: i,
                    field: "lv_attr",
                    value: attr,
                    expected: "an lv_attr string of 10 characters",
                });
            }
            let tags = text(r, i, "lv_tags")?;
            Ok(Lv {
                vg: text(r, i, "vg_name")?,
                name: text(r, i, "lv_name")?,
                size: bytes(r, i, "lv_size")?,
                attr,
                origin: non_empty(text(r, i, "origin")?),
                data_percent: percent(r, i, "data_percent")?,
                tags: tags.split(',').filter(|t| !t.is_empty()).map(str::to_owned).collect(),
                path: non_empty(text(r, i, "lv_path")?).map(PathBuf::from),
                kernel_device: match (device_part(r, i, "lv_kernel_major")?, device_part(r, i, "lv_kernel_minor")?) {
                    (Some(major), Some(minor)) => Some((major, minor)),
                    _ => None,
                },
                segtype: text(r, i, "segtype")?,
                thin_id: optional_u32(r, i, "thin_id", &[], "a thin device id")?,
                pool: non_empty(text(r, i, "pool_lv")?),
                vg_free: bytes(r, i, "vg_free")?,
                vg_extent_size: bytes(r, i, "vg_extent_size")?,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const VGS: &str = include_str!("../tests/fixtures/vgs.json");
    const LVS_SNAPSHOT: &str = include_str!("../tests/fixtures/lvs_snapshot.json");
    const LVS_INVALID: &str = include_str!("../tests/fixtures/lvs_snapshot_invalid.json");
    const LVS_TAGGED: &str = include_str!("../tests/fixtures/lvs_tagged.json");
    const LVS_INACTIVE: &str = include_str!("../tests/fixtures/lvs_inactive.json");
    const LVS_THIN: &str = include_str!("../tests/fixtures/lvs_thin.json");

    #[test]
    fn vgs_from_real_output() {
        let vgs = parse_vgs(VGS).unwrap();
        assert_eq!(vgs.len(), 1);
        let vg = &vgs[0];
        assert_eq!(vg.name, "vg0");
        assert_eq!(vg.extent_size, 4 << 20);
        assert!(vg.free < vg.size && vg.size % vg.extent_size == 0 && vg.free % vg.extent_size == 0, "{vg:?}");
    }

    #[test]
    fn lvs_with_snapshot_from_real_output() {
        let lvs = parse_lvs(LVS_SNAPSHOT).unwrap();
        let origin = lvs.iter().find(|l| l.name == "data").unwrap();
        assert!(origin.is_origin() && !origin.is_snapshot() && origin.is_active());
        assert_eq!(origin.data_percent, None);
        assert_eq!(origin.origin, None);
        assert_eq!(origin.path.as_deref(), Some(std::path::Path::new("/dev/vg0/data")));
        assert_eq!(origin.snapshot_status(), None);
        let (major, _) = origin.kernel_device.unwrap();
        assert!(major > 0, "{origin:?}");
        let snap = lvs.iter().find(|l| l.is_snapshot()).unwrap();
        assert_eq!(snap.origin.as_deref(), Some("data"));
        assert_eq!(snap.tags, ["blockrep_snapshot"]);
        let st = snap.snapshot_status().unwrap();
        assert!(!st.invalid && st.fill_percent < 100.0, "{st:?}");
        // Every row carries its VG's free space and extent size: what `vgs` said of the same state (vgs.json).
        let vg = &parse_vgs(VGS).unwrap()[0];
        for l in [origin, snap] {
            assert_eq!((l.vg_free, l.vg_extent_size), (vg.free, vg.extent_size), "{l:?}");
        }
    }

    #[test]
    fn overflowed_snapshot_is_invalid_in_real_output() {
        let lvs = parse_lvs(LVS_INVALID).unwrap();
        let snap = lvs.iter().find(|l| l.is_snapshot()).unwrap();
        assert_eq!(snap.attr.chars().nth(4), Some('I'), "{snap:?}");
        assert_eq!(snap.snapshot_status(), Some(SnapshotStatus { fill_percent: 100.0, invalid: true }));
    }

    #[test]
    fn tags_from_real_output() {
        let lvs = parse_lvs(LVS_TAGGED).unwrap();
        let shadow = lvs.iter().find(|l| l.has_tag("blockrep_shadow")).unwrap();
        assert!(shadow.tags.len() >= 2, "{shadow:?}");
        assert!(lvs.iter().any(|l| l.tags.is_empty()));
    }

    #[test]
    fn thin_lvs_from_real_output() {
        let lvs = parse_lvs(LVS_THIN).unwrap();
        let get = |n: &str| lvs.iter().find(|l| l.name == n).unwrap();
        let (thin, snap, pool, linear) = (get("thin1"), get("thin1_snap"), get("tpool"), get("data"));
        assert_eq!((thin.segtype.as_str(), thin.thin_id, thin.pool.as_deref()), ("thin", Some(1), Some("tpool")));
        assert_eq!((snap.thin_id, snap.origin.as_deref()), (Some(2), Some("thin1")));
        assert!(!snap.is_snapshot(), "a thin snapshot is not a classic one");
        assert_eq!((pool.segtype.as_str(), pool.thin_id, pool.pool.as_deref()), ("thin-pool", None, None));
        assert_eq!((linear.segtype.as_str(), linear.thin_id), ("linear", None));
        let bad = LVS_THIN.replacen("\"thin_id\":\"1\"", "\"thin_id\":\"one\"", 1);
        assert!(matches!(parse_lvs(&bad), Err(ReportError::BadValue { field: "thin_id", .. })));
    }

    #[test]
    fn inactive_lv_from_real_output() {
        let lvs = parse_lvs(LVS_INACTIVE).unwrap();
        let (active, inactive): (Vec<&Lv>, Vec<&Lv>) = lvs.iter().partition(|l| l.is_active());
        assert_eq!((active.len(), inactive.len()), (1, 1), "{lvs:?}");
        assert!(active[0].kernel_device.is_some());
        assert_eq!(inactive[0].kernel_device, None);
        assert!(inactive[0].path.is_some(), "lvm still reports the path of an inactive LV");
    }

    #[test]
    fn json_std_numbers_and_nulls() {
        let j = r#"{"report":[{"lv":[{"vg_name":"v","lv_name":"s","lv_size":4194304,"lv_attr":"swi-a-s---",
            "origin":"o","data_percent":12.5,"lv_tags":"","lv_path":null,"lv_kernel_major":254,"lv_kernel_minor":3,
            "segtype":"snapshot","thin_id":null,"pool_lv":null,"vg_free":0,"vg_extent_size":4194304}]}]}"#;
        let lv = &parse_lvs(j).unwrap()[0];
        assert_eq!(lv.size, 4194304);
        assert_eq!(lv.path, None);
        assert_eq!(lv.kernel_device, Some((254, 3)));
        assert_eq!(lv.snapshot_status(), Some(SnapshotStatus { fill_percent: 12.5, invalid: false }));
    }

    #[test]
    fn inactive_snapshot_has_no_status() {
        let j = r#"{"report":[{"lv":[{"vg_name":"v","lv_name":"s","lv_size":"4194304","lv_attr":"swi---s---",
            "origin":"o","data_percent":"","lv_tags":"","lv_path":"/dev/v/s","lv_kernel_major":"-1","lv_kernel_minor":"-1",
            "segtype":"linear","thin_id":"","pool_lv":"","vg_free":"0","vg_extent_size":"4194304"}]}]}"#;
        let lv = &parse_lvs(j).unwrap()[0];
        assert_eq!(lv.snapshot_status(), None);
        assert_eq!(lv.kernel_device, None);
    }

    #[test]
    fn malformed_reports_are_errors_naming_the_problem() {
        assert!(matches!(parse_vgs("not json"), Err(ReportError::Json(_))));
        assert!(matches!(parse_vgs(r#"{"report":[{"lv":[]}]}"#), Err(ReportError::Shape { kind: "vg" })));
        assert!(matches!(parse_vgs(r#"{}"#), Err(ReportError::Shape { .. })));
        let e =
            parse_vgs(r#"{"report":[{"vg":[{"vg_name":"v","vg_size":"12.5m","vg_free":"0","vg_extent_size":"1"}]}]}"#)
                .unwrap_err();
        assert!(e.to_string().contains("vg_size = \"12.5m\""), "{e}");
        let e = parse_vgs(r#"{"report":[{"vg":[{"vg_name":"v","vg_size":"1","vg_free":"0"}]}]}"#).unwrap_err();
        assert!(matches!(e, ReportError::MissingField { row: 0, field: "vg_extent_size" }), "{e}");
        let e = parse_lvs(&LVS_SNAPSHOT.replace("\"0.00\"", "\"250.00\"")).unwrap_err();
        assert!(matches!(e, ReportError::BadValue { field: "data_percent", .. }), "{e}");
        let big = " ".repeat(MAX_REPORT_BYTES + 1);
        assert!(matches!(parse_lvs(&big), Err(ReportError::TooLarge { .. })));
    }

    #[test]
    fn empty_vg_lists_no_lvs() {
        assert!(parse_lvs(r#"{"report":[{"lv":[]}]}"#).unwrap().is_empty());
    }
}
