//! Thin provisioning: which thin device an LV is, its pool's device-mapper names, the pool's metadata snapshot,
//! and `thin_delta` (Debian thin-provisioning-tools) between two thin devices of one pool.
//!
//! A tracked sync of a thin LV keeps the previous sync's thin snapshot (the base) and asks `thin_delta` which
//! mappings differ between the base and the new snapshot ([`ThinTools::changed_between`]). `thin_delta` reads
//! the pool's metadata device while the pool is live, so it reads a *metadata snapshot*: the pool is asked to
//! reserve one (`dmsetup message POOL 0 reserve_metadata_snap`), `thin_delta -m` reads it, and it is released
//! (`release_metadata_snap`) whatever happened. A reservation left by a crash in between is found in the pool's
//! status (its held metadata root) and released first on the next run.
//!
//! `thin_delta`'s output is XML of this shape (captured from thin-provisioning-tools 0.9.0 in
//! `tests/fixtures/thin_delta.xml`); begin and length count pool blocks of `data_block_size` sectors:
//!
//! ```text
//! <superblock uuid="" time="1" transaction="2" data_block_size="128" nr_data_blocks="1000">
//!   <diff left="1" right="2">
//!     <same begin="0" length="2"/>
//!     <different begin="2" length="1"/>
//!     <left_only begin="20" length="1"/>
//!     <right_only begin="30" length="1"/>
//!   </diff>
//! </superblock>
//! ```
//!
//! Ranges mapped in neither device are not listed (both read as zeros). [`parse_thin_delta`] is a decoder of
//! untrusted text: it checks the whole document first (size, structure, numbers, order, [`MAX_DELTA_RANGES`]),
//! then builds the result with checked arithmetic.

use std::path::{Path, PathBuf};
use std::time::Duration;

use thiserror::Error;

use crate::lvm::{run_tool, Lvm, LvmError, DEFAULT_TIMEOUT};
use crate::name::{validate_lv_name, validate_tag, validate_vg_name};
use crate::report::{Lv, ReportError};

/// Where [`ThinTools::new`] looks for `dmsetup` (Debian package dmsetup, installed with lvm2).
pub const DMSETUP_PATHS: &[&str] = &["/usr/sbin/dmsetup", "/sbin/dmsetup"];

/// Where [`ThinTools::new`] looks for `thin_delta` (Debian package thin-provisioning-tools).
pub const THIN_DELTA_PATHS: &[&str] = &["/usr/sbin/thin_delta", "/sbin/thin_delta", "/usr/bin/thin_delta"];

/// Largest `thin_delta` output parsed: about 4 Mi ranges of 60 bytes.
pub const MAX_DELTA_BYTES: usize = 256 << 20;

/// Most changed ranges one delta may list (16 bytes each in memory: 64 MiB). More than that and the sync falls
/// back to a full scan.
pub const MAX_DELTA_RANGES: usize = 4 << 20;

/// Largest pool block accepted, in 512-byte sectors (the kernel's limit is 1 GiB).
pub const MAX_DATA_BLOCK_SECTORS: u64 = 2 << 20;

/// Smallest pool block accepted, in sectors (the kernel's limit, 64 KiB).
pub const MIN_DATA_BLOCK_SECTORS: u64 = 128;

/// Longest attribute list of one element parsed.
const MAX_TAG_BYTES: usize = 4096;

/// `thin_delta` output that cannot be used.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum DeltaError {
    /// The output is longer than [`MAX_DELTA_BYTES`].
    #[error("the thin_delta output is {len} bytes long, more than the {max} bytes accepted")]
    TooLarge {
        /// Its length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The output lists more than [`MAX_DELTA_RANGES`] changed ranges.
    #[error("the thin_delta output lists more than {max} changed ranges")]
    TooManyRanges {
        /// The limit.
        max: usize,
    },
    /// The text is not the XML `thin_delta` prints without `--verbose`.
    #[error("the thin_delta output is malformed at byte {at}: {what}")]
    Malformed {
        /// Byte offset.
        at: usize,
        /// What is wrong.
        what: String,
    },
    /// The delta is between other devices than asked.
    #[error("thin_delta compared devices {left} and {right}, not {want_left} and {want_right}")]
    WrongDevices {
        /// Device id on the left.
        left: u64,
        /// Device id on the right.
        right: u64,
        /// The base asked for.
        want_left: u32,
        /// The new snapshot asked for.
        want_right: u32,
    },
}

/// A run of pool blocks (of [`ThinDelta::data_block_sectors`] sectors each) of the thin device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockRange {
    /// First block.
    pub begin: u64,
    /// Number of blocks (at least 1).
    pub length: u64,
}

/// What changed between two thin devices of one pool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ThinDelta {
    /// The pool's block size in 512-byte sectors (its chunk size).
    pub data_block_sectors: u64,
    /// Device id of the base (`left`).
    pub left: u64,
    /// Device id of the new snapshot (`right`).
    pub right: u64,
    /// Block ranges mapped differently, mapped in only one of the two devices; sorted, not overlapping, adjacent
    /// ranges merged.
    pub changed: Vec<BlockRange>,
}

impl ThinDelta {
    /// The pool block size in bytes.
    pub fn block_bytes(&self) -> u64 {
        self.data_block_sectors * 512
    }

    /// The changed ranges as `(offset, length)` in bytes of the thin device; `None` on an overflow.
    pub fn byte_ranges(&self) -> Option<Vec<(u64, u64)>> {
        let bb = self.block_bytes();
        self.changed.iter().map(|r| Some((r.begin.checked_mul(bb)?, r.length.checked_mul(bb)?))).collect()
    }

    /// Bytes of the changed ranges (saturating).
    pub fn changed_bytes(&self) -> u64 {
        self.changed.iter().fold(0u64, |a, r| a.saturating_add(r.length.saturating_mul(self.block_bytes())))
    }
}

/// One XML element of the output.
#[derive(Debug)]
struct Element<'a> {
    at: usize,
    name: &'a str,
    closing: bool,
    empty: bool,
    attrs: Vec<(&'a str, &'a str)>,
}

impl Element<'_> {
    fn attr(&self, key: &str) -> Option<&str> {
        self.attrs.iter().find(|(k, _)| *k == key).map(|(_, v)| *v)
    }

    fn number(&self, key: &str) -> Result<u64, DeltaError> {
        let v = self.attr(key).ok_or_else(|| malformed(self.at, format!("<{}> has no {key}", self.name)))?;
        if v.is_empty() || v.len() > 20 || !v.bytes().all(|b| b.is_ascii_digit()) {
            return Err(malformed(self.at, format!("{key}={v:?} is not a whole number")));
        }
        v.parse().map_err(|_| malformed(self.at, format!("{key}={v:?} is out of range")))
    }
}

fn malformed(at: usize, what: impl Into<String>) -> DeltaError {
    DeltaError::Malformed { at, what: what.into() }
}

/// Splits the text into elements; anything but whitespace between them is an error.
fn elements(text: &str) -> impl Iterator<Item = Result<Element<'_>, DeltaError>> {
    let mut pos = 0usize;
    std::iter::from_fn(move || {
        let rest = &text[pos..];
        let skip = rest.len() - rest.trim_start().len();
        pos += skip;
        if pos >= text.len() {
            return None;
        }
        let at = pos;
        if !text[pos..].starts_with('<') {
            pos = text.len();
            return Some(Err(malformed(at, "text outside an element")));
        }
        let Some(end) = text[pos..].find('>') else {
            pos = text.len();
            return Some(Err(malformed(at, "an element without its closing '>'")));
        };
        let inner = &text[pos + 1..pos + end];
        pos += end + 1;
        Some(element(at, inner))
    })
}

fn element(at: usize, inner: &str) -> Result<Element<'_>, DeltaError> {
    if inner.len() > MAX_TAG_BYTES {
        return Err(malformed(at, "an element longer than 4096 bytes"));
    }
    let (closing, inner) = match inner.strip_prefix('/') {
        Some(i) => (true, i),
        None => (false, inner),
    };
    let (empty, inner) = match inner.strip_suffix('/') {
        Some(i) => (true, i),
        None => (false, inner),
    };
    let mut parts = inner.trim_end().splitn(2, char::is_whitespace);
    let name = parts.next().unwrap_or("");
    if name.is_empty() || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
        return Err(malformed(at, format!("an element named {name:?}")));
    }
    let mut attrs = Vec::new();
    let mut rest = parts.next().unwrap_or("").trim();
    while !rest.is_empty() {
        let Some((key, after)) = rest.split_once("=\"") else {
            return Err(malformed(at, format!("an attribute without a quoted value in <{name}>")));
        };
        let Some((value, after)) = after.split_once('"') else {
            return Err(malformed(at, format!("an unterminated attribute value in <{name}>")));
        };
        let key = key.trim();
        if key.is_empty() || !key.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
            return Err(malformed(at, format!("an attribute named {key:?} in <{name}>")));
        }
        attrs.push((key, value));
        rest = after.trim_start();
    }
    if closing && (empty || !attrs.is_empty()) {
        return Err(malformed(at, format!("a closing </{name}> with attributes")));
    }
    Ok(Element { at, name, closing, empty, attrs })
}

/// Where the parser is in the document.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Start,
    InSuperblock,
    InDiff,
    AfterDiff,
    End,
}

/// Walks the document, checking it, and calls `changed` with each changed range in order. Returns the block
/// size and the device ids.
fn walk(text: &str, mut changed: impl FnMut(BlockRange)) -> Result<(u64, u64, u64), DeltaError> {
    if text.len() > MAX_DELTA_BYTES {
        return Err(DeltaError::TooLarge { len: text.len(), max: MAX_DELTA_BYTES });
    }
    let mut state = State::Start;
    let (mut block, mut left, mut right) = (0u64, 0u64, 0u64);
    let mut next = 0u64; // first block a range may start at
    let mut count = 0usize;
    for e in elements(text) {
        let e = e?;
        state = match (state, e.name, e.closing, e.empty) {
            (State::Start, "superblock", false, false) => {
                block = e.number("data_block_size")?;
                if !(MIN_DATA_BLOCK_SECTORS..=MAX_DATA_BLOCK_SECTORS).contains(&block) {
                    return Err(malformed(e.at, format!("data_block_size {block} is outside 128..=2097152 sectors")));
                }
                State::InSuperblock
            }
            (State::InSuperblock, "diff", false, false) => {
                left = e.number("left")?;
                right = e.number("right")?;
                State::InDiff
            }
            (State::InDiff, kind @ ("same" | "different" | "left_only" | "right_only"), false, true) => {
                let begin = e.number("begin")?;
                let length = e.number("length")?;
                let end = begin.checked_add(length).ok_or_else(|| malformed(e.at, "begin + length overflows"))?;
                if length == 0 {
                    return Err(malformed(e.at, "a range of length 0"));
                }
                if begin < next {
                    return Err(malformed(e.at, format!("a range at block {begin} before block {next}")));
                }
                next = end;
                if kind != "same" {
                    count += 1;
                    if count > MAX_DELTA_RANGES {
                        return Err(DeltaError::TooManyRanges { max: MAX_DELTA_RANGES });
                    }
                    changed(BlockRange { begin, length });
                }
                State::InDiff
            }
            (State::InDiff, "diff", true, false) => State::AfterDiff,
            (State::AfterDiff, "superblock", true, false) => State::End,
            (s, name, closing, _) => {
                return Err(malformed(
                    e.at,
                    format!("unexpected <{}{name}> in state {s:?} (is this thin_delta's --verbose output?)", {
                        if closing {
                            "/"
                        } else {
                            ""
                        }
                    }),
                ))
            }
        };
    }
    if state != State::End {
        return Err(malformed(text.len(), format!("the document ends in state {state:?}")));
    }
    Ok((block, left, right))
}

/// Parses `thin_delta`'s output (without `--verbose`): first checks the whole text, then collects the changed
/// ranges (different, left only, right only), merging adjacent ones.
pub fn parse_thin_delta(text: &str) -> Result<ThinDelta, DeltaError> {
    let mut count = 0usize;
    walk(text, |_| count += 1)?;
    let mut changed: Vec<BlockRange> = Vec::with_capacity(count);
    let (data_block_sectors, left, right) = walk(text, |r| match changed.last_mut() {
        // `walk` checked that begin + length does not overflow and that ranges do not overlap.
        Some(last) if last.begin + last.length == r.begin => last.length += r.length,
        _ => changed.push(r),
    })?;
    Ok(ThinDelta { data_block_sectors, left, right, changed })
}

/// A thin pool's state from `dmsetup status` (the kernel's thin-provisioning documentation).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolStatus {
    /// The block of the reserved metadata snapshot, when one is held.
    pub held_metadata_root: Option<u64>,
    /// `rw`, `ro` or `out_of_data_space`.
    pub mode: String,
    /// Data blocks used and in total.
    pub data_blocks: (u64, u64),
}

/// Parses one `dmsetup status` line of a thin pool: `<start> <len> thin-pool <transaction id>
/// <used metadata>/<total metadata> <used data>/<total data> <held metadata root> ro|rw|out_of_data_space ...`.
pub fn parse_pool_status(line: &str) -> Result<PoolStatus, String> {
    let f: Vec<&str> = line.split_whitespace().collect();
    if f.get(2) != Some(&"thin-pool") {
        return Err(format!("not a thin-pool status line: {line:?}"));
    }
    if f.len() < 8 {
        return Err(format!("the pool reports {:?} (failed, or an unknown format)", f[3..].join(" ")));
    }
    let pair = |s: &str| -> Option<(u64, u64)> {
        let (a, b) = s.split_once('/')?;
        Some((a.parse().ok()?, b.parse().ok()?))
    };
    let data_blocks = pair(f[5]).ok_or_else(|| format!("data usage {:?} is not USED/TOTAL", f[5]))?;
    let held_metadata_root = match f[6] {
        "-" => None,
        n => Some(n.parse().map_err(|_| format!("held metadata root {n:?} is not a number or -"))?),
    };
    Ok(PoolStatus { held_metadata_root, mode: f[7].to_owned(), data_blocks })
}

/// A thin device's table line (the kernel's thin-provisioning documentation: `<start> <length> thin <pool dev>
/// <dev id> [<external origin dev>]`): which pool and which device in it the kernel maps the LV to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ThinTable {
    /// Length in 512-byte sectors.
    pub sectors: u64,
    /// The pool's device as `dmsetup` prints it (`major:minor`).
    pub pool_dev: String,
    /// The device id in the pool (lvm's `thin_id`).
    pub thin_id: u32,
}

/// Parses the table line of a thin device (without `dmsetup table`'s `NAME: ` prefix).
pub fn parse_thin_table(line: &str) -> Result<ThinTable, String> {
    let f: Vec<&str> = line.split_whitespace().collect();
    if f.get(2) != Some(&"thin") || !(5..=6).contains(&f.len()) {
        return Err(format!("{line:?} is not the table of a thin device"));
    }
    let sectors = f[1].parse().map_err(|_| format!("length {:?} is not a number of sectors", f[1]))?;
    let thin_id = f[4].parse().map_err(|_| format!("device id {:?} is not a number", f[4]))?;
    Ok(ThinTable { sectors, pool_dev: f[3].to_owned(), thin_id })
}

/// The thin table of device-mapper device `name` in the output of `dmsetup table` (every active device, one
/// `NAME: TABLE` line per segment; a thin device has one segment).
pub fn thin_table_of(all: &str, name: &str) -> Result<ThinTable, String> {
    let prefix = format!("{name}: ");
    let lines: Vec<&str> = all.lines().filter_map(|l| l.strip_prefix(&prefix)).collect();
    match lines.as_slice() {
        [] => Err("no such active device (dmsetup table does not list it)".into()),
        [line] => parse_thin_table(line),
        more => Err(format!("it has {} table lines; a thin device has one", more.len())),
    }
}

/// The device-mapper name of `vg/lv` (each `-` in either name doubled, joined by `-`).
pub fn dm_name(vg: &str, lv: &str) -> String {
    format!("{}-{}", vg.replace('-', "--"), lv.replace('-', "--"))
}

/// A failed thin operation.
#[derive(Debug, Error)]
pub enum ThinError {
    /// A tool is not installed.
    #[error("{tool} was not found (looked for {}); install the Debian package {package}", .tried.join(", "))]
    ToolMissing {
        /// The tool.
        tool: &'static str,
        /// The paths tried.
        tried: Vec<String>,
        /// The package that has it.
        package: &'static str,
    },
    /// lvm, dmsetup or thin_delta failed.
    #[error(transparent)]
    Run(Box<LvmError>),
    /// The LV is not a thin volume.
    #[error("{vg}/{lv} is not a thin LV (segment type {segtype:?}); tracking with thin_delta needs a thin LV")]
    NotThin {
        /// VG.
        vg: String,
        /// LV.
        lv: String,
        /// Its segment type.
        segtype: String,
    },
    /// An lvs report could not be read.
    #[error("could not read the report of `{command}`")]
    Report {
        /// The command.
        command: String,
        /// Why.
        #[source]
        source: ReportError,
    },
    /// A device's table could not be read as a thin device's.
    #[error("device-mapper device {device}: {why}")]
    Table {
        /// The device-mapper name.
        device: String,
        /// What is wrong.
        why: String,
    },
    /// The pool's status line could not be read.
    #[error("thin pool {pool}: {why}")]
    PoolStatus {
        /// The pool's device-mapper name.
        pool: String,
        /// What is wrong.
        why: String,
    },
    /// thin_delta's output could not be used.
    #[error("cannot use the output of `{command}`")]
    Delta {
        /// The command.
        command: String,
        /// Why.
        #[source]
        source: DeltaError,
    },
    /// The metadata snapshot could not be released after use.
    #[error(
        "thin pool {pool}: the metadata snapshot could not be released; release it with `dmsetup message {pool} 0 \
         release_metadata_snap` (the next tracked sync also tries)"
    )]
    Release {
        /// The pool's device-mapper name.
        pool: String,
        /// dmsetup's error.
        #[source]
        source: Box<LvmError>,
    },
}

impl From<LvmError> for ThinError {
    fn from(e: LvmError) -> Self {
        ThinError::Run(Box::new(e))
    }
}

/// A thin LV: its device id in its pool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ThinLv {
    /// VG.
    pub vg: String,
    /// LV name.
    pub name: String,
    /// Device id in the pool (`thin_id`).
    pub thin_id: u32,
    /// The pool LV's name.
    pub pool: String,
}

impl ThinLv {
    /// The device-mapper name of the pool while it has active thin volumes (`<vg>-<pool>-tpool`).
    pub fn pool_dm_name(&self) -> String {
        format!("{}-tpool", dm_name(&self.vg, &self.pool))
    }

    /// The pool's metadata device (`/dev/mapper/<vg>-<pool>_tmeta`).
    pub fn metadata_device(&self) -> PathBuf {
        Path::new("/dev/mapper").join(dm_name(&self.vg, &format!("{}_tmeta", self.pool)))
    }
}

impl Lvm {
    /// Whether `vg/name` is a thin LV, with its device id and pool (`Ok(None)` for any other LV).
    pub fn thin_lv(&self, vg: &str, name: &str) -> Result<Option<ThinLv>, ThinError> {
        let lv = self.lv(vg, name)?;
        if lv.segtype != "thin" {
            return Ok(None);
        }
        match (lv.thin_id, lv.pool) {
            (Some(thin_id), Some(pool)) => Ok(Some(ThinLv { vg: lv.vg, name: lv.name, thin_id, pool })),
            (id, pool) => Err(ThinError::Report {
                command: format!("lvm lvs {vg}/{name}"),
                source: ReportError::BadValue {
                    row: 0,
                    field: "thin_id",
                    value: format!("{id:?} in pool {pool:?}"),
                    expected: "a thin LV's device id and pool",
                },
            }),
        }
    }

    /// Creates the thin snapshot `vg/snap` of the thin LV `vg/origin` with `tags`, active (no activation skip
    /// flag), and returns it as lvm reports it.
    pub fn create_thin_snapshot(&self, vg: &str, origin: &str, snap: &str, tags: &[&str]) -> Result<Lv, LvmError> {
        validate_vg_name(vg)?;
        validate_lv_name(snap)?;
        if self.find_lv(vg, snap)?.is_some() {
            return Err(LvmError::LvExists { vg: vg.into(), name: snap.into() });
        }
        self.create_thin_snapshot_only(vg, origin, snap, tags)?;
        self.lv(vg, snap)
    }

    /// [`Lvm::create_thin_snapshot`] in one lvm command: no check that `snap` is free beforehand (lvcreate
    /// refuses an existing name) and no report afterwards. For a caller that listed the VG already.
    pub fn create_thin_snapshot_only(&self, vg: &str, origin: &str, snap: &str, tags: &[&str]) -> Result<(), LvmError> {
        validate_vg_name(vg)?;
        validate_lv_name(origin)?;
        validate_lv_name(snap)?;
        let origin_arg = format!("{vg}/{origin}");
        let mut args = vec!["lvcreate", "--yes", "--snapshot", "--setactivationskip", "n", "--name", snap];
        for t in tags {
            validate_tag(t)?;
            args.extend(["--addtag", t]);
        }
        args.push(&origin_arg);
        tracing::info!(vg, origin, snapshot = snap, "creating thin snapshot");
        self.run(&args)?;
        Ok(())
    }

    /// Adds `add` and removes `del` tags of `vg/name` in one `lvchange`.
    pub fn change_tags(&self, vg: &str, name: &str, add: &[&str], del: &[&str]) -> Result<(), LvmError> {
        validate_vg_name(vg)?;
        validate_lv_name(name)?;
        let full = format!("{vg}/{name}");
        let mut args = vec!["lvchange"];
        for t in add {
            validate_tag(t)?;
            args.extend(["--addtag", t]);
        }
        for t in del {
            validate_tag(t)?;
            args.extend(["--deltag", t]);
        }
        args.push(&full);
        self.run(&args)?;
        Ok(())
    }
}

/// `dmsetup` and `thin_delta`, run by absolute path with a timeout.
#[derive(Debug, Clone)]
pub struct ThinTools {
    dmsetup: PathBuf,
    thin_delta: PathBuf,
    timeout: Duration,
}

fn find(tool: &'static str, paths: &[&str], package: &'static str) -> Result<PathBuf, ThinError> {
    paths.iter().map(Path::new).find(|p| p.is_file()).map(Path::to_owned).ok_or_else(|| ThinError::ToolMissing {
        tool,
        tried: paths.iter().map(|s| s.to_string()).collect(),
        package,
    })
}

impl ThinTools {
    /// Finds `dmsetup` and `thin_delta` at their usual paths.
    pub fn new() -> Result<Self, ThinError> {
        Ok(ThinTools {
            dmsetup: find("dmsetup", DMSETUP_PATHS, "dmsetup")?,
            thin_delta: find("thin_delta", THIN_DELTA_PATHS, "thin-provisioning-tools")?,
            timeout: DEFAULT_TIMEOUT,
        })
    }

    /// The status of the pool whose device-mapper name is `pool`.
    pub fn pool_status(&self, pool: &str) -> Result<PoolStatus, ThinError> {
        let out = run_tool(&self.dmsetup, &["status".into(), pool.into()], self.timeout)?;
        parse_pool_status(out.stdout.trim()).map_err(|why| ThinError::PoolStatus { pool: pool.into(), why })
    }

    /// The thin tables of the device-mapper devices `names`, in that order, from one `dmsetup table`: the kernel's
    /// own word on which pool and thin device each is (no lvm command, which costs ten times as long).
    pub fn thin_tables(&self, names: &[&str]) -> Result<Vec<ThinTable>, ThinError> {
        let out = run_tool(&self.dmsetup, &["table".into()], self.timeout)?;
        names
            .iter()
            .map(|&n| thin_table_of(&out.stdout, n).map_err(|why| ThinError::Table { device: n.into(), why }))
            .collect()
    }

    fn message(&self, pool: &str, msg: &str) -> Result<(), LvmError> {
        run_tool(&self.dmsetup, &["message".into(), pool.into(), "0".into(), msg.into()], self.timeout).map(|_| ())
    }

    /// Releases a metadata snapshot the pool holds (left by an interrupted run); `Ok(true)` when there was one.
    pub fn release_leftover(&self, pool: &str) -> Result<bool, ThinError> {
        let status = self.pool_status(pool)?;
        let Some(root) = status.held_metadata_root else { return Ok(false) };
        tracing::warn!(pool, root, "releasing a metadata snapshot left reserved (by an interrupted run?)");
        self.message(pool, "release_metadata_snap")
            .map_err(|e| ThinError::Release { pool: pool.into(), source: Box::new(e) })?;
        Ok(true)
    }

    /// The blocks that differ between thin devices `base` and `new` of `lv`'s pool: releases a leftover metadata
    /// snapshot, reserves one, runs `thin_delta -m`, and releases it again whatever happened.
    pub fn changed_between(&self, lv: &ThinLv, base: u32, new: u32) -> Result<ThinDelta, ThinError> {
        self.release_leftover(&lv.pool_dm_name())?;
        self.changed_between_released(lv, base, new)
    }

    /// [`ThinTools::changed_between`] for a caller that has just released a leftover metadata snapshot itself
    /// ([`ThinTools::release_leftover`]): one `dmsetup status` less.
    pub fn changed_between_released(&self, lv: &ThinLv, base: u32, new: u32) -> Result<ThinDelta, ThinError> {
        let pool = lv.pool_dm_name();
        self.message(&pool, "reserve_metadata_snap")?;
        let args: Vec<String> = vec![
            "-m".into(),
            "--snap1".into(),
            base.to_string(),
            "--snap2".into(),
            new.to_string(),
            lv.metadata_device().display().to_string(),
        ];
        let out = run_tool(&self.thin_delta, &args, self.timeout);
        let released = self.message(&pool, "release_metadata_snap");
        let out = match (out, released) {
            (Ok(out), Ok(())) => out,
            (Ok(_), Err(e)) => return Err(ThinError::Release { pool, source: Box::new(e) }),
            (Err(e), Err(r)) => {
                tracing::warn!(pool, "cannot release the metadata snapshot after thin_delta failed: {r}");
                return Err(e.into());
            }
            (Err(e), Ok(())) => return Err(e.into()),
        };
        let delta = parse_thin_delta(&out.stdout)
            .map_err(|source| ThinError::Delta { command: out.command.clone(), source })?;
        if (delta.left, delta.right) != (u64::from(base), u64::from(new)) {
            return Err(ThinError::Delta {
                command: out.command,
                source: DeltaError::WrongDevices {
                    left: delta.left,
                    right: delta.right,
                    want_left: base,
                    want_right: new,
                },
            });
        }
        Ok(delta)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Real output of thin_delta 0.9.0 (`thin_delta --snap1 1 --snap2 2`) on metadata that thin_restore built from
    /// `tests/fixtures/thin_delta_metadata.xml`.
    const REAL: &str = include_str!("../tests/fixtures/thin_delta.xml");

    #[test]
    fn real_output_lists_the_changed_blocks() {
        let d = parse_thin_delta(REAL).unwrap();
        assert_eq!((d.data_block_sectors, d.left, d.right), (128, 1, 2));
        // Device 2 remapped block 2 (different), dropped block 20 (left only), mapped block 30 (right only).
        let r = |begin, length| BlockRange { begin, length };
        assert_eq!(d.changed, vec![r(2, 1), r(20, 1), r(30, 1)]);
        assert_eq!(d.byte_ranges().unwrap(), vec![(2 << 16, 1 << 16), (20 << 16, 1 << 16), (30 << 16, 1 << 16)]);
        assert_eq!(d.changed_bytes(), 3 << 16);
    }

    #[test]
    fn adjacent_changes_merge_and_same_ranges_are_skipped() {
        let t = r#"<superblock data_block_size="256"><diff left="4" right="7">
<different begin="0" length="2"/><right_only begin="2" length="3"/><same begin="5" length="1"/>
<left_only begin="6" length="1"/></diff></superblock>"#;
        let d = parse_thin_delta(t).unwrap();
        assert_eq!(d.changed, vec![BlockRange { begin: 0, length: 5 }, BlockRange { begin: 6, length: 1 }]);
        assert_eq!(d.block_bytes(), 128 << 10);
    }

    #[test]
    fn bad_documents_are_refused() {
        let head = "<superblock data_block_size=\"128\"><diff left=\"1\" right=\"2\">";
        let tail = "</diff></superblock>";
        let cases = [
            ("", "ends in state Start"),
            ("garbage", "text outside an element"),
            (head, "ends in state InDiff"),
            (&format!("{head}<different begin=\"5\" length=\"0\"/>{tail}"), "length 0"),
            (&format!("{head}<different begin=\"5\" length=\"2\"/><same begin=\"6\" length=\"1\"/>{tail}"), "before"),
            (&format!("{head}<different begin=\"18446744073709551615\" length=\"2\"/>{tail}"), "overflows"),
            (&format!("{head}<different begin=\"-1\" length=\"2\"/>{tail}"), "not a whole number"),
            (&format!("{head}<different begin=\"99999999999999999999\" length=\"2\"/>{tail}"), "out of range"),
            (&format!("{head}<different>\n<range begin=\"1\" length=\"1\"/></different>{tail}"), "--verbose"),
            (&format!("{head}<bogus begin=\"1\" length=\"1\"/>{tail}"), "unexpected <bogus>"),
            (&format!("{head}<different begin=1 length=\"1\"/>{tail}"), "attribute named"),
            (&format!("{head}{tail}<superblock>"), "unexpected <superblock>"),
            ("<superblock data_block_size=\"8\"><diff left=\"1\" right=\"2\"></diff></superblock>", "outside 128"),
            ("<superblock data_block_size=\"128\"><diff left=\"1\" right=\"2\"></diff></superblock", "closing '>'"),
        ];
        for (text, want) in cases {
            let e = parse_thin_delta(text).unwrap_err().to_string();
            assert!(e.contains(want), "{text:?}: {e}");
        }
        let big = " ".repeat(MAX_DELTA_BYTES + 1);
        assert!(matches!(parse_thin_delta(&big), Err(DeltaError::TooLarge { .. })));
    }

    #[test]
    fn an_empty_delta_means_nothing_changed() {
        let d = parse_thin_delta(
            "<superblock data_block_size=\"128\">\n<diff left=\"1\" right=\"2\">\n</diff>\n</superblock>\n",
        )
        .unwrap();
        assert!(d.changed.is_empty());
    }

    #[test]
    fn pool_status_lines() {
        // The format of the kernel's Documentation/admin-guide/device-mapper/thin-provisioning.rst.
        let s = parse_pool_status("0 81920 thin-pool 1 10/1024 20/640 - rw discard_passdown queue_if_no_space - 1024")
            .unwrap();
        assert_eq!(s, PoolStatus { held_metadata_root: None, mode: "rw".into(), data_blocks: (20, 640) });
        let s = parse_pool_status("0 81920 thin-pool 1 12/1024 20/640 37 rw discard_passdown").unwrap();
        assert_eq!(s.held_metadata_root, Some(37));
        assert!(parse_pool_status("0 81920 thin-pool Fail").unwrap_err().contains("Fail"));
        assert!(parse_pool_status("0 81920 linear").is_err());
    }

    /// `dmsetup table` as it printed in the UML guest (lvm2 2.03, kernel 6.1): a thin pool `vg-a/my-pool`, thin
    /// LV `th-1` and its thin snapshot, a classic LV with a classic snapshot.
    const DMSETUP_TABLE: &str = "\
vg--a-my--pool: 0 131072 linear 254:2 0
vg--a-my--pool-tpool: 0 131072 thin-pool 254:0 254:1 128 0 0 
vg--a-my--pool_tdata: 0 131072 linear 98:0 10240
vg--a-my--pool_tmeta: 0 8192 linear 98:0 141312
vg--a-plain: 0 16384 snapshot-origin 254:7
vg--a-plain-real: 0 16384 linear 98:0 149504
vg--a-plain_snap: 0 16384 snapshot 254:7 254:8 P 8
vg--a-plain_snap-cow: 0 8192 linear 98:0 165888
vg--a-th--1: 0 65536 thin 254:2 1
vg--a-th--1_snap: 0 65536 thin 254:2 2
";

    #[test]
    fn thin_tables_from_real_dmsetup_output() {
        let t = thin_table_of(DMSETUP_TABLE, &dm_name("vg-a", "th-1_snap")).unwrap();
        assert_eq!(t, ThinTable { sectors: 65536, pool_dev: "254:2".into(), thin_id: 2 });
        assert_eq!(thin_table_of(DMSETUP_TABLE, "vg--a-th--1").unwrap().thin_id, 1);
        // `dmsetup table NAME` prints the line alone.
        assert_eq!(parse_thin_table("0 65536 thin 254:2 2").unwrap().thin_id, 2);
        // Not thin, not there, or not one line: each says so.
        assert!(thin_table_of(DMSETUP_TABLE, "vg--a-plain_snap").unwrap_err().contains("not the table of a thin"));
        assert!(thin_table_of(DMSETUP_TABLE, "vg--a-gone").unwrap_err().contains("no such active device"));
        assert!(thin_table_of("No devices found\n", "vg--a-th--1").unwrap_err().contains("no such active device"));
        let twice = format!("{DMSETUP_TABLE}vg--a-th--1: 65536 8 thin 254:2 1\n");
        assert!(thin_table_of(&twice, "vg--a-th--1").unwrap_err().contains("2 table lines"));
        // A name that is a prefix of another does not match it.
        assert!(thin_table_of(DMSETUP_TABLE, "vg--a-th").is_err());
        assert!(parse_thin_table("0 65536 thin 254:2 x").unwrap_err().contains("device id"));
        assert!(parse_thin_table("0 x thin 254:2 2").unwrap_err().contains("sectors"));
    }

    #[test]
    fn device_mapper_names_double_dashes() {
        let lv = ThinLv { vg: "vg-a".into(), name: "d".into(), thin_id: 1, pool: "my-pool".into() };
        assert_eq!(lv.pool_dm_name(), "vg--a-my--pool-tpool");
        assert_eq!(lv.metadata_device(), Path::new("/dev/mapper/vg--a-my--pool_tmeta"));
    }
}
