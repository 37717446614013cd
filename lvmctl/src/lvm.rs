//! The [`Lvm`] handle: runs the lvm2 tool by absolute path with a timeout and turns its output into typed
//! values and errors.

use std::fmt::Write as _;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{mpsc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use thiserror::Error;

use crate::name::{validate_lv_name, validate_tag, validate_vg_name, NameError};
use crate::report::{parse_lvs, parse_vgs, Lv, ReportError, SnapshotStatus, Vg, LV_FIELDS, VG_FIELDS};

/// Where [`Lvm::new`] looks for the lvm2 tool, in this order.
pub const DEFAULT_TOOL_PATHS: &[&str] = &["/usr/sbin/lvm", "/sbin/lvm"];

/// How long one lvm command may run before it is killed. Generous on purpose: creating a snapshot suspends the
/// origin and flushes its dirty pages, which can take minutes on a busy server, and killing lvm at that moment
/// can leave the origin suspended (every write to it then blocks until `dmsetup resume`).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(300);

/// `--config` for hosts without udev (containers, the User-Mode Linux test guest): lvm2 must not wait for udev
/// to create device nodes, nor ask dmeventd to monitor snapshots.
pub const NO_UDEV_CONFIG: &str =
    "activation{udev_sync=0 udev_rules=0 monitoring=0} devices{obtain_device_list_from_udev=0}";

/// Tag that marks an LV as a blockrep shadow volume (created by `blockrep shadow create`).
pub const SHADOW_TAG: &str = "blockrep_shadow";

/// Tag [`Lvm::create_snapshot`] puts on every snapshot it creates, so a leftover snapshot from a crashed run can
/// be told apart from a snapshot someone else made ([`Lv::has_tag`]).
pub const SNAPSHOT_TAG: &str = "blockrep_snapshot";

/// Default snapshot size: this percentage of the origin's size.
pub const DEFAULT_SNAPSHOT_PERCENT: u8 = 20;

/// How long to wait for the output pipes to close after the lvm process exited (a daemon it started could keep
/// them open).
const PIPE_GRACE: Duration = Duration::from_secs(5);

/// What [`Lvm::ensure_shadow`] found.
#[derive(Debug, Clone, PartialEq)]
pub enum Shadow {
    /// The shadow did not exist and was created.
    Created(Lv),
    /// A blockrep shadow of the right size was already there.
    Existing(Lv),
}

impl Shadow {
    /// The shadow LV.
    pub fn lv(&self) -> &Lv {
        match self {
            Shadow::Created(lv) | Shadow::Existing(lv) => lv,
        }
    }
}

/// Size of a classic snapshot's copy-on-write store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SnapshotSize {
    /// This many bytes, rounded up to whole extents.
    Bytes(u64),
    /// This percentage (1 to 100) of the origin's size, rounded up to whole extents.
    Percent(u8),
}

impl Default for SnapshotSize {
    fn default() -> Self {
        SnapshotSize::Percent(DEFAULT_SNAPSHOT_PERCENT)
    }
}

impl SnapshotSize {
    /// The store size in bytes for an origin of `origin_size` bytes in a VG with `extent_size`-byte extents:
    /// rounded up to whole extents, at least one extent. `None` for `Percent(0)`, `Percent(>100)`, `Bytes(0)`
    /// or an overflow.
    pub fn bytes_for(self, origin_size: u64, extent_size: u64) -> Option<u64> {
        let raw = match self {
            SnapshotSize::Bytes(0) | SnapshotSize::Percent(0) => return None,
            SnapshotSize::Percent(p) if p > 100 => return None,
            SnapshotSize::Bytes(b) => b,
            SnapshotSize::Percent(p) => {
                let num = u128::from(origin_size) * u128::from(p);
                u64::try_from(num.div_ceil(100)).ok()?
            }
        };
        round_up(raw.max(1), extent_size)
    }
}

impl std::fmt::Display for SnapshotSize {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SnapshotSize::Bytes(b) => write!(f, "{b} bytes"),
            SnapshotSize::Percent(p) => write!(f, "{p}% of the origin"),
        }
    }
}

fn round_up(v: u64, unit: u64) -> Option<u64> {
    if unit == 0 {
        return None;
    }
    v.div_ceil(unit).checked_mul(unit)
}

/// A failed lvm operation. Every variant that ran the tool carries the command line and lvm's stderr.
#[derive(Debug, Error)]
pub enum LvmError {
    /// The lvm2 tool is not installed.
    #[error("the lvm2 tool was not found (looked for {}); install the Debian package lvm2 (apt-get install lvm2)", .tried.join(", "))]
    ToolMissing {
        /// The paths that were tried.
        tried: Vec<String>,
    },
    /// The tool path given is relative; lvmctl runs tools by absolute path only.
    #[error("the lvm tool path {path:?} is not absolute; give the full path, e.g. /usr/sbin/lvm")]
    ToolNotAbsolute {
        /// The path given.
        path: PathBuf,
    },
    /// A name or tag breaks lvm2's rules; nothing was run.
    #[error(transparent)]
    InvalidName(#[from] NameError),
    /// The process could not be started or its output not read.
    #[error("could not run `{command}`")]
    Spawn {
        /// The command line.
        command: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The command ran longer than the timeout and was killed.
    #[error("`{command}` did not finish within {timeout:?} and was killed (stderr so far: {}); check for hung devices and for a device it left suspended (`dmsetup info -c`, then `dmsetup resume NAME`), or raise the lvm timeout", show(.stderr))]
    Timeout {
        /// The command line.
        command: String,
        /// The timeout.
        timeout: Duration,
        /// What it wrote to stderr until then.
        stderr: String,
    },
    /// The command exited unsuccessfully.
    #[error("`{command}` failed ({status}): {}", show(.stderr))]
    Failed {
        /// The command line.
        command: String,
        /// How it exited.
        status: ExitStatus,
        /// Its stderr.
        stderr: String,
    },
    /// The command succeeded but its report could not be parsed.
    #[error("could not read the report of `{command}`")]
    Report {
        /// The command line.
        command: String,
        /// What is wrong with it.
        #[source]
        source: ReportError,
    },
    /// The volume group does not exist.
    #[error("volume group {vg} does not exist ({}); check the VG name, `vgs` lists the existing ones", show(.stderr))]
    VgNotFound {
        /// VG name.
        vg: String,
        /// The command line that found out.
        command: String,
        /// lvm's stderr.
        stderr: String,
    },
    /// The logical volume does not exist.
    #[error("logical volume {vg}/{name} does not exist ({}); check the volume name, `lvs {vg}` lists the existing ones", show(.stderr))]
    LvNotFound {
        /// VG name.
        vg: String,
        /// LV name.
        name: String,
        /// The command line that found out.
        command: String,
        /// lvm's stderr (empty when the LV was simply not listed).
        stderr: String,
    },
    /// An LV with the name to be created already exists.
    #[error("logical volume {vg}/{name} already exists; remove it or choose another name")]
    LvExists {
        /// VG name.
        vg: String,
        /// LV name.
        name: String,
    },
    /// The VG has too little free space for a new LV or snapshot.
    #[error(
        "VG {vg} has {free} bytes free, the {what} {vg}/{name} needs {needed}; free space in {vg} or lower {hint}"
    )]
    InsufficientSpace {
        /// VG name.
        vg: String,
        /// Name of the LV that was to be created.
        name: String,
        /// `snapshot` or `logical volume`.
        what: &'static str,
        /// Free bytes in the VG.
        free: u64,
        /// Bytes the new LV needs.
        needed: u64,
        /// What to lower, for the message.
        hint: &'static str,
    },
    /// The snapshot size is out of range.
    #[error("snapshot size {size} for {vg}/{name} is out of range; give 1 to 100 percent of the origin, or a positive number of bytes")]
    BadSnapshotSize {
        /// VG name.
        vg: String,
        /// Snapshot name.
        name: String,
        /// The size given.
        size: SnapshotSize,
    },
    /// An LV size that lvm would round up, so the LV would not have the size asked for.
    #[error("cannot create {vg}/{name} with exactly {size} bytes: VG {vg} allocates whole extents of {extent_size} bytes; use a multiple of {extent_size} (the source volume's size must be one too)")]
    SizeNotExtentMultiple {
        /// VG name.
        vg: String,
        /// LV name.
        name: String,
        /// The size asked for.
        size: u64,
        /// The VG's extent size.
        extent_size: u64,
    },
    /// The LV is not a classic snapshot.
    #[error("{vg}/{name} is not a snapshot (lv_attr {attr}); give the name of a snapshot LV")]
    NotASnapshot {
        /// VG name.
        vg: String,
        /// LV name.
        name: String,
        /// Its attributes.
        attr: String,
    },
    /// The snapshot is inactive, so lvm reports no fill level.
    #[error("snapshot {vg}/{name} is not active (lv_attr {attr}), so its fill level is unknown; activate it with `lvchange -ay {vg}/{name}`")]
    SnapshotInactive {
        /// VG name.
        vg: String,
        /// LV name.
        name: String,
        /// Its attributes.
        attr: String,
    },
    /// The path given as a volume could not be examined.
    #[error("cannot examine {path}; check the volume's path")]
    DeviceUnreadable {
        /// The path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The path is not an active LVM logical volume.
    #[error("{path} is not an active LVM logical volume ({reason}); give the path of an LV, such as /dev/VG/LV, and activate it (`lvchange -ay VG/LV`)")]
    NotAnLv {
        /// The path.
        path: PathBuf,
        /// Why not.
        reason: String,
    },
    /// An LV with the name blockrep wants exists but was not made by blockrep; it is left alone.
    #[error("refusing to touch {vg}/{name}: it exists but {reason}; rename or remove it, or choose another name")]
    NotOurs {
        /// VG name.
        vg: String,
        /// LV name.
        name: String,
        /// What makes it not ours.
        reason: String,
    },
    /// An existing shadow LV has a different size than the volume it should receive.
    #[error("shadow {vg}/{name} is {size} bytes but the source volume is {expected} bytes; resize the shadow (lvresize -L {expected}b {vg}/{name}) or remove it so it is created again")]
    ShadowSizeMismatch {
        /// VG name.
        vg: String,
        /// LV name.
        name: String,
        /// Its size.
        size: u64,
        /// The source's size.
        expected: u64,
    },
    /// Removing the LV would also remove snapshots lvmctl was not asked to remove.
    #[error("refusing to remove {vg}/{name}: it is the origin of the snapshot(s) {}; remove those first", .snapshots.join(", "))]
    HasSnapshots {
        /// VG name.
        vg: String,
        /// LV name.
        name: String,
        /// Its snapshots.
        snapshots: Vec<String>,
    },
}

impl LvmError {
    /// lvm's stderr, for the variants that ran a command that failed.
    pub fn stderr(&self) -> Option<&str> {
        match self {
            LvmError::Timeout { stderr, .. }
            | LvmError::Failed { stderr, .. }
            | LvmError::VgNotFound { stderr, .. }
            | LvmError::LvNotFound { stderr, .. } => Some(stderr),
            _ => None,
        }
    }

    /// The command line, for the variants that ran a command.
    pub fn command(&self) -> Option<&str> {
        match self {
            LvmError::Spawn { command, .. }
            | LvmError::Timeout { command, .. }
            | LvmError::Failed { command, .. }
            | LvmError::Report { command, .. }
            | LvmError::VgNotFound { command, .. }
            | LvmError::LvNotFound { command, .. } => Some(command),
            _ => None,
        }
    }
}

/// stderr for a one-line message: trimmed lines joined, lvm's "Run `x --help'" hint dropped.
fn show(stderr: &str) -> String {
    let lines: Vec<&str> = stderr.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with("Run `")).collect();
    if lines.is_empty() {
        "no message on stderr".to_owned()
    } else {
        format!("lvm said: {}", lines.join(" / "))
    }
}

fn quote(arg: &str) -> String {
    if !arg.is_empty() && arg.chars().all(|c| c.is_ascii_alphanumeric() || "/._-+=,:@%".contains(c)) {
        arg.to_owned()
    } else {
        format!("'{}'", arg.replace('\'', r"'\''"))
    }
}

/// Captured result of one lvm run that exited with status 0.
pub(crate) struct Output {
    /// The command line, for error messages.
    pub(crate) command: String,
    pub(crate) stdout: String,
}

/// Handle on the lvm2 command-line tool.
///
/// Every call runs `<tool> <command> ...` as a child process in its own process group (so a Ctrl-C aimed at the
/// caller does not interrupt lvm halfway through a metadata update), with stdin closed, stdout and stderr
/// captured, `LC_ALL=C` and `LVM_SUPPRESS_FD_WARNINGS=1`, and kills it when it runs longer than the timeout.
#[derive(Debug)]
pub struct Lvm {
    tool: PathBuf,
    timeout: Duration,
    config: Option<String>,
    /// LV reports kept while [`Lvm::cache_reports`] is on.
    reports: Mutex<Reports>,
}

impl Clone for Lvm {
    /// A handle on the same tool with the same settings; its report cache starts off and empty.
    fn clone(&self) -> Self {
        Lvm { tool: self.tool.clone(), timeout: self.timeout, config: self.config.clone(), reports: Mutex::default() }
    }
}

/// The report cache of [`Lvm::cache_reports`].
#[derive(Debug, Default)]
struct Reports {
    on: bool,
    /// Every VG's LVs (`lvs` without a VG).
    all: Option<Vec<Lv>>,
    /// One VG's LVs.
    vgs: std::collections::HashMap<String, Vec<Lv>>,
}

impl Lvm {
    /// Finds the lvm2 tool at [`DEFAULT_TOOL_PATHS`]; [`LvmError::ToolMissing`] (naming the Debian package)
    /// when it is not installed.
    pub fn new() -> Result<Self, LvmError> {
        DEFAULT_TOOL_PATHS
            .iter()
            .map(Path::new)
            .find(|p| p.is_file())
            .map(|p| Lvm { tool: p.to_owned(), timeout: DEFAULT_TIMEOUT, config: None, reports: Mutex::default() })
            .ok_or_else(|| LvmError::ToolMissing { tried: DEFAULT_TOOL_PATHS.iter().map(|s| s.to_string()).collect() })
    }

    /// Uses the lvm2 tool at `path`, which must be absolute and exist.
    pub fn with_tool(path: impl Into<PathBuf>) -> Result<Self, LvmError> {
        let tool = path.into();
        if !tool.is_absolute() {
            return Err(LvmError::ToolNotAbsolute { path: tool });
        }
        if !tool.is_file() {
            return Err(LvmError::ToolMissing { tried: vec![tool.display().to_string()] });
        }
        Ok(Lvm { tool, timeout: DEFAULT_TIMEOUT, config: None, reports: Mutex::default() })
    }

    /// Sets the per-command timeout (default [`DEFAULT_TIMEOUT`]).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Passes `--config <config>` to every command, e.g. [`NO_UDEV_CONFIG`].
    pub fn config(mut self, config: impl Into<String>) -> Self {
        self.config = Some(config.into());
        self
    }

    /// The tool's path.
    pub fn tool(&self) -> &Path {
        &self.tool
    }

    /// Turns the report cache on or off (off by default). While it is on, [`Lvm::lvs`], [`Lvm::find_lv`] and
    /// [`Lvm::lv`] answer from the last listing of the VG (or of every VG) instead of running `lvs` again, and a
    /// listing of one VG is taken for [`Lvm::lv`] so that the next questions about that VG need no command.
    /// Every command that is not a report (`lvcreate`, `lvremove`, `lvrename`, `lvchange`, ...) empties the cache,
    /// so what this handle changed itself is always seen; turning it off empties it too. For a short sequence of
    /// steps only (the preparation of a sync, its cleanup): while it is on, a change made by another process is not
    /// seen, so it must be off across anything long, such as the sync itself.
    pub fn cache_reports(&self, on: bool) {
        let mut r = self.reports();
        *r = Reports { on, ..Reports::default() };
    }

    fn reports(&self) -> MutexGuard<'_, Reports> {
        self.reports.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs `lvm <args> [--config ...]`; Ok only on exit status 0.
    pub(crate) fn run(&self, args: &[&str]) -> Result<Output, LvmError> {
        if !matches!(args.first(), Some(&("lvs" | "vgs"))) {
            let mut r = self.reports();
            r.all = None;
            r.vgs.clear();
        }
        let mut args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        if let Some(c) = &self.config {
            args.push("--config".into());
            args.push(c.clone());
        }
        run_tool(&self.tool, &args, self.timeout)
    }

    fn vgs_report(&self, vg: Option<&str>) -> Result<Output, LvmError> {
        let mut args = vec!["vgs", "--reportformat", "json", "--units", "b", "--nosuffix", "-o", VG_FIELDS];
        if let Some(vg) = vg {
            validate_vg_name(vg)?;
            args.push(vg);
        }
        self.run(&args).map_err(|e| classify(e, vg, None))
    }

    fn lvs_report(&self, vg: Option<&str>, lv: Option<&str>) -> Result<Output, LvmError> {
        let mut args: Vec<String> =
            ["lvs", "--reportformat", "json", "--units", "b", "--nosuffix", "-o", LV_FIELDS].map(String::from).into();
        match (vg, lv) {
            (Some(vg), Some(lv)) => {
                validate_vg_name(vg)?;
                validate_lv_name(lv)?;
                args.push(format!("{vg}/{lv}"));
            }
            (Some(vg), None) => {
                validate_vg_name(vg)?;
                args.push(vg.to_owned());
            }
            (None, _) => {}
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        self.run(&args).map_err(|e| classify(e, vg, lv))
    }

    /// The raw JSON report of `vgs` for all VGs (or only `vg`), as [`Lvm::vgs`] parses it.
    pub fn vgs_json(&self, vg: Option<&str>) -> Result<String, LvmError> {
        self.vgs_report(vg).map(|o| o.stdout)
    }

    /// The raw JSON report of `lvs` for all LVs, those of `vg`, or the one LV `vg/lv` (`lv` is only used
    /// together with `vg`), as [`Lvm::lvs`] parses it.
    pub fn lvs_json(&self, vg: Option<&str>, lv: Option<&str>) -> Result<String, LvmError> {
        self.lvs_report(vg, lv).map(|o| o.stdout)
    }

    /// All volume groups.
    pub fn vgs(&self) -> Result<Vec<Vg>, LvmError> {
        let out = self.vgs_report(None)?;
        parse_vgs(&out.stdout).map_err(|source| LvmError::Report { command: out.command, source })
    }

    /// One volume group; [`LvmError::VgNotFound`] (with lvm's stderr) when it does not exist.
    pub fn vg(&self, vg: &str) -> Result<Vg, LvmError> {
        let out = self.vgs_report(Some(vg))?;
        let vgs = parse_vgs(&out.stdout).map_err(|source| LvmError::Report { command: out.command.clone(), source })?;
        vgs.into_iter().find(|v| v.name == vg).ok_or_else(|| LvmError::VgNotFound {
            vg: vg.to_owned(),
            command: out.command,
            stderr: String::new(),
        })
    }

    /// All logical volumes (hidden ones excluded), or those of `vg`.
    pub fn lvs(&self, vg: Option<&str>) -> Result<Vec<Lv>, LvmError> {
        {
            let r = self.reports();
            if r.on {
                match (vg, &r.all) {
                    (None, Some(all)) => return Ok(all.clone()),
                    (Some(vg), Some(all)) => return Ok(all.iter().filter(|l| l.vg == vg).cloned().collect()),
                    (Some(vg), None) => {
                        if let Some(lvs) = r.vgs.get(vg) {
                            return Ok(lvs.clone());
                        }
                    }
                    (None, None) => {}
                }
            }
        }
        let out = self.lvs_report(vg, None)?;
        let lvs = parse_lvs(&out.stdout).map_err(|source| LvmError::Report { command: out.command, source })?;
        let mut r = self.reports();
        if r.on {
            match vg {
                None => r.all = Some(lvs.clone()),
                Some(vg) => {
                    r.vgs.insert(vg.to_owned(), lvs.clone());
                }
            }
        }
        Ok(lvs)
    }

    /// One logical volume; [`LvmError::LvNotFound`] (with lvm's stderr) when it does not exist.
    pub fn lv(&self, vg: &str, name: &str) -> Result<Lv, LvmError> {
        if self.reports().on {
            validate_lv_name(name)?;
            return self.lvs(Some(vg))?.into_iter().find(|l| l.name == name).ok_or_else(|| LvmError::LvNotFound {
                vg: vg.to_owned(),
                name: name.to_owned(),
                command: format!("lvm lvs {vg}"),
                stderr: String::new(),
            });
        }
        let out = self.lvs_report(Some(vg), Some(name))?;
        let lvs = parse_lvs(&out.stdout).map_err(|source| LvmError::Report { command: out.command.clone(), source })?;
        lvs.into_iter().find(|l| l.vg == vg && l.name == name).ok_or_else(|| LvmError::LvNotFound {
            vg: vg.to_owned(),
            name: name.to_owned(),
            command: out.command,
            stderr: String::new(),
        })
    }

    /// The active LV whose device `path` is (any path to the device node works: `/dev/VG/LV`,
    /// `/dev/mapper/VG-LV`, a symlink). [`LvmError::NotAnLv`] when `path` is not a block device or no active LV
    /// has its device number.
    pub fn lv_for_device(&self, path: &Path) -> Result<Lv, LvmError> {
        use std::os::unix::fs::{FileTypeExt, MetadataExt};
        let meta =
            std::fs::metadata(path).map_err(|source| LvmError::DeviceUnreadable { path: path.to_owned(), source })?;
        if !meta.file_type().is_block_device() {
            return Err(LvmError::NotAnLv { path: path.to_owned(), reason: "it is not a block device".into() });
        }
        let dev = split_dev(meta.rdev());
        self.lvs(None)?.into_iter().find(|l| l.kernel_device == Some(dev)).ok_or_else(|| LvmError::NotAnLv {
            path: path.to_owned(),
            reason: format!("no active LV has its device number {}:{}", dev.0, dev.1),
        })
    }

    /// The LV `vg/name` if it exists, `None` if the VG has no such LV. Lists the VG rather than asking for
    /// the LV, so "not there" is not an error.
    pub fn find_lv(&self, vg: &str, name: &str) -> Result<Option<Lv>, LvmError> {
        validate_lv_name(name)?;
        Ok(self.lvs(Some(vg))?.into_iter().find(|l| l.name == name))
    }

    /// Creates the classic snapshot `vg/snap_name` of `vg/origin` with a copy-on-write store of `size`, tagged
    /// [`SNAPSHOT_TAG`].
    ///
    /// Checks the names, that the origin exists and the snapshot does not, and that the VG has room, before
    /// running `lvcreate`; returns the new snapshot as lvm reports it.
    pub fn create_snapshot(&self, vg: &str, origin: &str, snap_name: &str, size: SnapshotSize) -> Result<Lv, LvmError> {
        self.create_snapshot_tagged(vg, origin, snap_name, size, SNAPSHOT_TAG)
    }

    /// [`Lvm::create_snapshot`] with another tag than [`SNAPSHOT_TAG`] (a retained generation on the standby is
    /// not a sync's snapshot: nothing that cleans up leftover sync snapshots may remove it).
    pub fn create_snapshot_tagged(
        &self,
        vg: &str,
        origin: &str,
        snap_name: &str,
        size: SnapshotSize,
        tag: &str,
    ) -> Result<Lv, LvmError> {
        self.create_snapshot_only(vg, origin, snap_name, size, &[tag])?;
        self.lv(vg, snap_name)
    }

    /// [`Lvm::create_snapshot`] with the tags `tags` (a sync's snapshot that is to become the volume's tracker is
    /// created with the tracker's tags, so that keeping it costs no `lvchange`) and without the report
    /// afterwards: returns the size in whole extents of the copy-on-write store lvcreate was asked for (lvm makes
    /// a store larger than the origin can use smaller). The VG's free space and extent size come from the origin's
    /// row of the LV listing (cached while [`Lvm::cache_reports`] is on), not from a `vgs`. The snapshot's device
    /// is `/dev/<vg>/<snap_name>`.
    pub fn create_snapshot_only(
        &self,
        vg: &str,
        origin: &str,
        snap_name: &str,
        size: SnapshotSize,
        tags: &[&str],
    ) -> Result<u64, LvmError> {
        for tag in tags {
            validate_tag(tag)?;
        }
        validate_vg_name(vg)?;
        validate_lv_name(origin)?;
        validate_lv_name(snap_name)?;
        let lvs = self.lvs(Some(vg))?;
        let Some(origin_lv) = lvs.iter().find(|l| l.name == origin) else {
            return Err(LvmError::LvNotFound {
                vg: vg.into(),
                name: origin.into(),
                command: format!("lvm lvs {vg}"),
                stderr: String::new(),
            });
        };
        if lvs.iter().any(|l| l.name == snap_name) {
            return Err(LvmError::LvExists { vg: vg.into(), name: snap_name.into() });
        }
        let (free, extent_size) = (origin_lv.vg_free, origin_lv.vg_extent_size);
        let needed = size.bytes_for(origin_lv.size, extent_size).ok_or_else(|| LvmError::BadSnapshotSize {
            vg: vg.into(),
            name: snap_name.into(),
            size,
        })?;
        if needed > free {
            return Err(LvmError::InsufficientSpace {
                vg: vg.into(),
                name: snap_name.into(),
                what: "snapshot",
                free,
                needed,
                hint: "snapshot_size",
            });
        }
        let size_arg = format!("{needed}b");
        let origin_arg = format!("{vg}/{origin}");
        tracing::info!(vg, origin, snapshot = snap_name, bytes = needed, "creating LVM snapshot");
        let mut args = vec!["lvcreate", "--yes", "--snapshot", "--size", &size_arg, "--name", snap_name];
        for tag in tags {
            args.extend(["--addtag", tag]);
        }
        args.push(&origin_arg);
        self.run(&args).map_err(|e| classify(e, Some(vg), Some(origin)))?;
        Ok(needed)
    }

    /// Grows the LV `vg/name` by `add` bytes (rounded up to whole extents by lvm), after checking that the VG has
    /// them free. For a classic snapshot this grows its copy-on-write store.
    pub fn extend_lv(&self, vg: &str, name: &str, add: u64) -> Result<(), LvmError> {
        validate_vg_name(vg)?;
        validate_lv_name(name)?;
        let vg_info = self.vg(vg)?;
        let needed = round_up(add.max(1), vg_info.extent_size).unwrap_or(u64::MAX);
        if needed > vg_info.free {
            return Err(LvmError::InsufficientSpace {
                vg: vg.into(),
                name: name.into(),
                what: "snapshot extension",
                free: vg_info.free,
                needed,
                hint: "keep_generations",
            });
        }
        let size_arg = format!("+{needed}b");
        let full = format!("{vg}/{name}");
        tracing::info!(vg, lv = name, bytes = needed, "extending LV");
        self.run(&["lvextend", "--yes", "--size", &size_arg, &full]).map_err(|e| classify(e, Some(vg), Some(name)))?;
        Ok(())
    }

    /// Fill level and validity of the snapshot `vg/snap`.
    pub fn snapshot_status(&self, vg: &str, snap: &str) -> Result<SnapshotStatus, LvmError> {
        let lv = self.lv(vg, snap)?;
        if !lv.is_snapshot() {
            return Err(LvmError::NotASnapshot { vg: vg.into(), name: snap.into(), attr: lv.attr });
        }
        lv.snapshot_status().ok_or(LvmError::SnapshotInactive { vg: vg.into(), name: snap.into(), attr: lv.attr })
    }

    /// Removes exactly the LV `vg/name` (`lvremove -y -f vg/name`). Refuses when the LV is the origin of
    /// snapshots, because lvremove would remove those too.
    pub fn remove_lv(&self, vg: &str, name: &str) -> Result<(), LvmError> {
        let lv = self.lv(vg, name)?;
        if lv.is_origin() {
            let snapshots: Vec<String> = self
                .lvs(Some(vg))?
                .into_iter()
                .filter(|l| l.origin.as_deref() == Some(name))
                .map(|l| l.full_name())
                .collect();
            if !snapshots.is_empty() {
                return Err(LvmError::HasSnapshots { vg: vg.into(), name: name.into(), snapshots });
            }
        }
        let full = format!("{vg}/{name}");
        tracing::info!(vg, lv = name, "removing LV");
        self.run(&["lvremove", "--yes", "--force", &full]).map_err(|e| classify(e, Some(vg), Some(name)))?;
        Ok(())
    }

    /// [`Lvm::remove_lv`] of an LV the caller listed a moment ago, as that report describes it: one lvm command, no
    /// report of its own. An origin of classic snapshots (which `lvremove` would remove with it) goes through
    /// [`Lvm::remove_lv`]'s check.
    pub fn remove_listed_lv(&self, lv: &Lv) -> Result<(), LvmError> {
        validate_vg_name(&lv.vg)?;
        validate_lv_name(&lv.name)?;
        if lv.is_origin() {
            return self.remove_lv(&lv.vg, &lv.name);
        }
        let full = lv.full_name();
        tracing::info!(vg = %lv.vg, lv = %lv.name, "removing LV");
        self.run(&["lvremove", "--yes", "--force", &full]).map_err(|e| classify(e, Some(&lv.vg), Some(&lv.name)))?;
        Ok(())
    }

    /// Creates the LV `vg/name` of exactly `size` bytes with `tags` (a blockrep shadow carries
    /// [`SHADOW_TAG`]). `size` must be a multiple of the VG's extent size, so the LV gets exactly that size.
    pub fn create_lv(&self, vg: &str, name: &str, size: u64, tags: &[&str]) -> Result<Lv, LvmError> {
        validate_vg_name(vg)?;
        validate_lv_name(name)?;
        for t in tags {
            validate_tag(t)?;
        }
        let vg_info = self.vg(vg)?;
        if size == 0 || size % vg_info.extent_size != 0 {
            return Err(LvmError::SizeNotExtentMultiple {
                vg: vg.into(),
                name: name.into(),
                size,
                extent_size: vg_info.extent_size,
            });
        }
        if self.find_lv(vg, name)?.is_some() {
            return Err(LvmError::LvExists { vg: vg.into(), name: name.into() });
        }
        if size > vg_info.free {
            return Err(LvmError::InsufficientSpace {
                vg: vg.into(),
                name: name.into(),
                what: "logical volume",
                free: vg_info.free,
                needed: size,
                hint: "the volume size",
            });
        }
        let size_arg = format!("{size}b");
        let mut args = vec!["lvcreate", "--yes", "--size", &size_arg, "--name", name];
        for t in tags {
            args.extend(["--addtag", *t]);
        }
        args.push(vg);
        tracing::info!(vg, lv = name, bytes = size, ?tags, "creating LV");
        self.run(&args).map_err(|e| classify(e, Some(vg), None))?;
        self.lv(vg, name)
    }

    /// Makes sure the shadow LV `vg/name` of exactly `size` bytes exists: creates it tagged [`SHADOW_TAG`] when
    /// missing, accepts it when it carries the tag and has that size. An LV of that name without the tag is
    /// [`LvmError::NotOurs`] (never touched), one with another size [`LvmError::ShadowSizeMismatch`].
    pub fn ensure_shadow(&self, vg: &str, name: &str, size: u64) -> Result<Shadow, LvmError> {
        match self.find_lv(vg, name)? {
            None => self.create_lv(vg, name, size, &[SHADOW_TAG]).map(Shadow::Created),
            Some(lv) if !lv.has_tag(SHADOW_TAG) => Err(LvmError::NotOurs {
                vg: vg.into(),
                name: name.into(),
                reason: format!("is not a blockrep shadow (no {SHADOW_TAG} tag)"),
            }),
            Some(lv) if lv.size != size => {
                Err(LvmError::ShadowSizeMismatch { vg: vg.into(), name: name.into(), size: lv.size, expected: size })
            }
            Some(lv) => Ok(Shadow::Existing(lv)),
        }
    }

    /// Removes a snapshot `vg/snap` of `vg/origin` left behind by an interrupted run, if there is one: `Ok(true)`
    /// when one was removed, `Ok(false)` when there was none. Ours means tagged [`SNAPSHOT_TAG`] and either a
    /// snapshot of `origin` or a plain LV: `lvcreate --snapshot` first creates the copy-on-write store as a plain
    /// LV (with its tags) and converts it afterwards, so a crash in between leaves a tagged plain LV. Anything else
    /// of that name is [`LvmError::NotOurs`] and stays.
    pub fn remove_leftover_snapshot(&self, vg: &str, origin: &str, snap: &str) -> Result<bool, LvmError> {
        let Some(lv) = self.find_lv(vg, snap)? else { return Ok(false) };
        let not_ours = |reason: String| LvmError::NotOurs { vg: vg.into(), name: snap.into(), reason };
        if !lv.has_tag(SNAPSHOT_TAG) {
            return Err(not_ours(format!("is not a blockrep snapshot (no {SNAPSHOT_TAG} tag)")));
        }
        if lv.is_snapshot() && lv.origin.as_deref() != Some(origin) {
            return Err(not_ours(format!("is a snapshot of another LV, not of {vg}/{origin}")));
        }
        if lv.is_origin() {
            return Err(not_ours(format!("has snapshots of its own (lv_attr {})", lv.attr)));
        }
        tracing::warn!(vg, origin, snapshot = snap, attr = %lv.attr, "removing a snapshot left behind by an interrupted run");
        self.remove_lv(vg, snap)?;
        Ok(true)
    }

    /// Renames `vg/old` to `vg/new`.
    pub fn rename_lv(&self, vg: &str, old: &str, new: &str) -> Result<(), LvmError> {
        validate_vg_name(vg)?;
        validate_lv_name(old)?;
        validate_lv_name(new)?;
        tracing::info!(vg, from = old, to = new, "renaming LV");
        self.run(&["lvrename", vg, old, new]).map_err(|e| classify(e, Some(vg), Some(old)))?;
        Ok(())
    }

    /// Adds `tag` to `vg/name`.
    pub fn add_tag(&self, vg: &str, name: &str, tag: &str) -> Result<(), LvmError> {
        validate_vg_name(vg)?;
        validate_lv_name(name)?;
        validate_tag(tag)?;
        let full = format!("{vg}/{name}");
        self.run(&["lvchange", "--addtag", tag, &full]).map_err(|e| classify(e, Some(vg), Some(name)))?;
        Ok(())
    }
}

/// Runs `tool <args>` in its own process group with stdin closed, stdout and stderr captured, `LC_ALL=C` and
/// `LVM_SUPPRESS_FD_WARNINGS=1`, and kills it after `timeout`; Ok only on exit status 0.
pub(crate) fn run_tool(tool: &Path, args: &[String], timeout: Duration) -> Result<Output, LvmError> {
    let mut s = quote(&tool.to_string_lossy());
    for a in args {
        let _ = write!(s, " {}", quote(a));
    }
    let command = s;
    tracing::debug!(command = %command, "running a tool");
    let mut cmd = Command::new(tool);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .env("LC_ALL", "C")
        .env("LVM_SUPPRESS_FD_WARNINGS", "1");
    std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
    let mut child = cmd.spawn().map_err(|source| LvmError::Spawn { command: command.clone(), source })?;
    let (out_rx, err_rx) = (reader(child.stdout.take()), reader(child.stderr.take()));
    let deadline = Instant::now() + timeout;
    let status = match wait_until(&mut child, deadline) {
        Ok(Some(status)) => status,
        Ok(None) => {
            kill_group(&mut child);
            let stderr = collect(&err_rx, Instant::now() + PIPE_GRACE).unwrap_or_default();
            tracing::warn!(command = %command, timeout = ?timeout, "command timed out, killed");
            return Err(LvmError::Timeout { command, timeout, stderr });
        }
        Err(source) => {
            kill_group(&mut child);
            return Err(LvmError::Spawn { command, source });
        }
    };
    let grace = Instant::now() + PIPE_GRACE;
    let stdout = collect(&out_rx, grace).map_err(|source| LvmError::Spawn { command: command.clone(), source })?;
    let stderr = collect(&err_rx, grace).map_err(|source| LvmError::Spawn { command: command.clone(), source })?;
    if !status.success() {
        tracing::debug!(command = %command, %status, stderr = %stderr.trim(), "command failed");
        return Err(LvmError::Failed { command, status, stderr });
    }
    if !stderr.trim().is_empty() {
        tracing::debug!(command = %command, stderr = %stderr.trim(), "the command wrote to stderr");
    }
    Ok(Output { command, stdout })
}

/// `(major, minor)` of a Linux `dev_t` (glibc's encoding: 12 bits of major and 20 bits of minor in the low
/// 32 bits, the rest above).
fn split_dev(rdev: u64) -> (u32, u32) {
    let major = ((rdev >> 8) & 0xfff) | ((rdev >> 32) & !0xfff);
    let minor = (rdev & 0xff) | ((rdev >> 12) & !0xff);
    (major as u32, minor as u32)
}

/// Turns a failed command whose stderr says the VG or LV does not exist into the specific error.
fn classify(e: LvmError, vg: Option<&str>, lv: Option<&str>) -> LvmError {
    let LvmError::Failed { command, stderr, status } = e else { return e };
    match (vg, lv) {
        (Some(vg), Some(lv))
            if stderr.contains("Failed to find logical volume")
                || (stderr.contains("Existing logical volume") && stderr.contains("not found")) =>
        {
            LvmError::LvNotFound { vg: vg.into(), name: lv.into(), command, stderr }
        }
        (Some(vg), _) if stderr.contains(&format!("Volume group \"{vg}\" not found")) => {
            LvmError::VgNotFound { vg: vg.into(), command, stderr }
        }
        _ => LvmError::Failed { command, status, stderr },
    }
}

type PipeResult = std::io::Result<String>;

/// Reads a pipe to its end on a thread; the result arrives on the returned channel.
fn reader<R: Read + Send + 'static>(pipe: Option<R>) -> mpsc::Receiver<PipeResult> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        let r = match pipe {
            Some(mut p) => p.read_to_end(&mut buf).map(|_| String::from_utf8_lossy(&buf).into_owned()),
            None => Ok(String::new()),
        };
        let _ = tx.send(r);
    });
    rx
}

fn collect(rx: &mpsc::Receiver<PipeResult>, deadline: Instant) -> PipeResult {
    match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
        Ok(r) => r,
        Err(_) => Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "an output pipe stayed open after lvm exited (a process it started still holds it)",
        )),
    }
}

/// Polls the child until it exits (`Some`) or the deadline passes (`None`).
fn wait_until(child: &mut Child, deadline: Instant) -> std::io::Result<Option<ExitStatus>> {
    let mut pause = Duration::from_millis(1);
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(Some(status));
        }
        let now = Instant::now();
        if now >= deadline {
            return Ok(None);
        }
        std::thread::sleep(pause.min(deadline - now));
        pause = (pause * 2).min(Duration::from_millis(20));
    }
}

/// Kills the child's whole process group (it leads it: spawned with `process_group(0)`) and reaps it.
fn kill_group(child: &mut Child) {
    if let Ok(pid) = libc::pid_t::try_from(child.id()) {
        // SAFETY: kill(2) has no memory-safety preconditions; the child has not been reaped yet (we reap it
        // below), so its pid, which is also its process group id, cannot have been reused.
        unsafe {
            libc::kill(-pid, libc::SIGKILL);
        }
    }
    let _ = child.kill();
    let _ = child.wait();
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn snapshot_size_rounds_up_to_extents() {
        let ext = 4 << 20;
        assert_eq!(SnapshotSize::Percent(20).bytes_for(32 << 20, ext), Some(8 << 20)); // 6.4 MiB -> 2 extents
        assert_eq!(SnapshotSize::Percent(100).bytes_for(32 << 20, ext), Some(32 << 20));
        assert_eq!(SnapshotSize::Bytes(1).bytes_for(32 << 20, ext), Some(ext));
        assert_eq!(SnapshotSize::Bytes(ext).bytes_for(0, ext), Some(ext));
        assert_eq!(SnapshotSize::Percent(1).bytes_for(1, ext), Some(ext));
        assert_eq!(SnapshotSize::Percent(0).bytes_for(32 << 20, ext), None);
        assert_eq!(SnapshotSize::Percent(101).bytes_for(32 << 20, ext), None);
        assert_eq!(SnapshotSize::Bytes(0).bytes_for(32 << 20, ext), None);
        assert_eq!(SnapshotSize::Bytes(u64::MAX).bytes_for(0, ext), None);
        assert_eq!(SnapshotSize::Percent(100).bytes_for(u64::MAX, 1), Some(u64::MAX));
        assert_eq!(SnapshotSize::default(), SnapshotSize::Percent(20));
    }

    #[test]
    fn device_numbers_split_like_the_kernel() {
        use std::os::unix::fs::MetadataExt;
        // /dev/null is 1:3 and /dev/zero 1:5 on every Linux system.
        assert_eq!(split_dev(std::fs::metadata("/dev/null").unwrap().rdev()), (1, 3));
        assert_eq!(split_dev(std::fs::metadata("/dev/zero").unwrap().rdev()), (1, 5));
        // Large numbers (glibc makedev(0x1234, 0x56789)).
        let dev = (0x1234u64 & 0xfff) << 8 | (0x1234u64 & !0xfff) << 32 | (0x56789 & 0xff) | (0x56789 & !0xff) << 12;
        assert_eq!(split_dev(dev), (0x1234, 0x56789));
    }

    #[test]
    fn non_block_devices_are_not_lvs() {
        let d = tempfile::tempdir().unwrap();
        let lvm = script(d.path(), "exit 1");
        let e = lvm.lv_for_device(Path::new("/dev/null")).unwrap_err();
        assert!(matches!(&e, LvmError::NotAnLv { .. }), "{e:?}");
        assert!(
            e.to_string().contains("/dev/null is not an active LVM logical volume (it is not a block device)"),
            "{e}"
        );
        let e = lvm.lv_for_device(&d.path().join("missing")).unwrap_err();
        assert!(matches!(&e, LvmError::DeviceUnreadable { .. }), "{e:?}");
    }

    #[test]
    fn missing_tool_names_the_package() {
        let e = Lvm::with_tool("/nonexistent/sbin/lvm").unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("/nonexistent/sbin/lvm") && msg.contains("Debian package lvm2"), "{msg}");
        let e = Lvm::with_tool("lvm").unwrap_err();
        assert!(matches!(e, LvmError::ToolNotAbsolute { .. }), "{e}");
        assert!(LvmError::ToolMissing { tried: vec!["/a".into(), "/b".into()] }.to_string().contains("/a, /b"));
    }

    /// A stand-in tool (a shell script) to test the process handling, not LVM: LVM's behaviour is tested
    /// for real in the User-Mode Linux guest (tests/uml.rs).
    fn script(dir: &Path, body: &str) -> Lvm {
        let p = dir.join("tool");
        std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        Lvm::with_tool(&p).unwrap()
    }

    /// The report cache saves commands (what it answers is checked against real LVM in tests/uml.rs): the
    /// stand-in logs each run and prints a report captured from lvm.
    #[test]
    fn an_lv_listed_before_is_removed_with_one_command_unless_it_is_an_origin() {
        let d = tempfile::tempdir().unwrap();
        let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/lvs_tagged.json");
        let log = d.path().join("log");
        let lvm = script(d.path(), &format!("echo \"$*\" >> {log:?}; [ \"$1\" = lvs ] && cat {fixture:?}; exit 0"));
        let runs = || std::fs::read_to_string(&log).unwrap_or_default().lines().map(str::to_owned).collect::<Vec<_>>();
        let data = lvm.find_lv("vg0", "data").unwrap().unwrap();
        lvm.remove_listed_lv(&data).unwrap();
        assert_eq!(runs().len(), 2);
        assert!(runs()[1].starts_with("lvremove --yes --force vg0/data"), "{:?}", runs());
        // Listed as an origin of classic snapshots: asked again, as remove_lv does, before lvremove.
        let origin = Lv { attr: "owi-a-----".into(), ..data };
        lvm.remove_listed_lv(&origin).unwrap();
        let after: Vec<String> = runs()[2..].iter().map(|r| r.split(' ').next().unwrap().to_owned()).collect();
        assert_eq!(after, ["lvs", "lvremove"]);
    }

    #[test]
    fn the_report_cache_answers_repeated_questions_until_a_change() {
        let d = tempfile::tempdir().unwrap();
        let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/lvs_tagged.json");
        let log = d.path().join("log");
        let lvm = script(d.path(), &format!("echo \"$1\" >> {log:?}; [ \"$1\" = lvs ] && cat {fixture:?}; exit 0"));
        let runs = || std::fs::read_to_string(&log).unwrap_or_default().lines().map(str::to_owned).collect::<Vec<_>>();
        // Off (the default): every question runs lvs.
        lvm.find_lv("vg0", "data").unwrap();
        lvm.find_lv("vg0", "data").unwrap();
        assert_eq!(runs(), ["lvs", "lvs"]);
        // On: one listing of the VG answers find_lv, lv and lvs, also about an LV that is not there.
        lvm.cache_reports(true);
        assert!(lvm.find_lv("vg0", "data").unwrap().is_some());
        assert_eq!(lvm.lv("vg0", "shadow_data").unwrap().tags, ["blockrep_shadow", "blockrep_vol=data"]);
        assert!(matches!(lvm.lv("vg0", "nope"), Err(LvmError::LvNotFound { .. })));
        assert_eq!(lvm.lvs(Some("vg0")).unwrap().len(), 2);
        assert_eq!(runs().len(), 3);
        // A change empties it: the next question runs lvs again.
        lvm.rename_lv("vg0", "data", "data2").unwrap();
        lvm.find_lv("vg0", "data").unwrap();
        assert_eq!(runs()[3..], ["lvrename", "lvs"]);
        // Every VG's listing answers questions about one VG.
        lvm.lvs(None).unwrap();
        lvm.find_lv("vg0", "shadow_data").unwrap();
        assert_eq!(runs().len(), 6);
        // Off again: nothing is answered from before.
        lvm.cache_reports(false);
        lvm.find_lv("vg0", "data").unwrap();
        assert_eq!(runs().len(), 7);
    }

    #[test]
    fn failure_carries_command_line_and_stderr() {
        let d = tempfile::tempdir().unwrap();
        let lvm =
            script(d.path(), "echo '  Some lvm complaint.' >&2; echo \"  Run \\`lvs --help' for more.\" >&2; exit 5");
        let e = lvm.lvs(Some("vg0")).unwrap_err();
        let msg = e.to_string();
        assert!(matches!(e, LvmError::Failed { .. }), "{e:?}");
        assert!(msg.contains("tool lvs --reportformat json") && msg.contains(" vg0`"), "{msg}");
        assert!(msg.contains("lvm said: Some lvm complaint.") && !msg.contains("--help"), "{msg}");
        assert!(msg.contains("exit status: 5"), "{msg}");
        assert_eq!(e.stderr().unwrap().trim_start().lines().next(), Some("Some lvm complaint."));
    }

    #[test]
    fn config_is_passed_and_shown_quoted() {
        let d = tempfile::tempdir().unwrap();
        let out = d.path().join("args");
        let lvm =
            script(d.path(), &format!("printf '%s\\n' \"$@\" > {}; exit 1", out.display())).config(NO_UDEV_CONFIG);
        let msg = lvm.vgs().unwrap_err().to_string();
        assert!(msg.contains(&format!("--config '{NO_UDEV_CONFIG}'")), "{msg}");
        let args = std::fs::read_to_string(&out).unwrap();
        assert!(args.ends_with(&format!("--config\n{NO_UDEV_CONFIG}\n")), "{args}");
    }

    #[test]
    fn hung_tool_is_killed_at_the_timeout() {
        let d = tempfile::tempdir().unwrap();
        // The grandchild (sleep) holds the pipes too: the whole process group must die.
        let lvm = script(d.path(), "echo started >&2; sleep 30; echo done").timeout(Duration::from_millis(300));
        let t = Instant::now();
        let e = lvm.vgs().unwrap_err();
        assert!(t.elapsed() < Duration::from_secs(5), "took {:?}", t.elapsed());
        match &e {
            LvmError::Timeout { stderr, timeout, .. } => {
                assert_eq!(stderr.trim(), "started");
                assert_eq!(*timeout, Duration::from_millis(300));
            }
            other => panic!("{other:?}"),
        }
        assert!(e.to_string().contains("was killed"), "{e}");
    }

    #[test]
    fn bad_names_are_refused_before_running_anything() {
        let d = tempfile::tempdir().unwrap();
        let marker = d.path().join("ran");
        let lvm = script(d.path(), &format!("touch {}; exit 1", marker.display()));
        let cases: Vec<(&str, LvmError)> = vec![
            ("bad name", lvm.create_snapshot("vg0", "data", "bad name", SnapshotSize::default()).unwrap_err()),
            ("reserved", lvm.create_lv("vg0", "x_tdata", 4 << 20, &[SHADOW_TAG]).unwrap_err()),
            ("bad tag", lvm.create_lv("vg0", "x", 4 << 20, &["bad tag"]).unwrap_err()),
            ("bad vg", lvm.lvs(Some("-vg")).unwrap_err()),
            ("rename", lvm.rename_lv("vg0", "data", "snapshot1").unwrap_err()),
            ("remove", lvm.remove_lv("vg0", "..").unwrap_err()),
            ("tag", lvm.add_tag("vg0", "data", "").unwrap_err()),
            ("status", lvm.snapshot_status("vg0", "a b").unwrap_err()),
        ];
        for (what, e) in cases {
            assert!(matches!(e, LvmError::InvalidName(_)), "{what}: {e:?}");
        }
        assert!(!marker.exists(), "the tool was run for an invalid name");
    }

    #[test]
    fn classify_uses_lvm_messages() {
        let failed = |stderr: &str| LvmError::Failed {
            command: "lvm x".into(),
            status: std::os::unix::process::ExitStatusExt::from_raw(5 << 8),
            stderr: stderr.into(),
        };
        let e =
            classify(failed(include_str!("../tests/fixtures/lvs_missing_lv.stderr")), Some("vg0"), Some("shadow_data"));
        assert!(matches!(&e, LvmError::LvNotFound { name, .. } if name == "shadow_data"), "{e:?}");
        assert!(e.to_string().contains("lvm said: Failed to find logical volume \"vg0/shadow_data\""), "{e}");
        let e =
            classify(failed(include_str!("../tests/fixtures/lvrename_missing_lv.stderr")), Some("vg0"), Some("nope"));
        assert!(matches!(&e, LvmError::LvNotFound { .. }), "{e:?}");
        let e = classify(failed(include_str!("../tests/fixtures/vgs_missing_vg.stderr")), Some("nosuch"), None);
        assert!(matches!(&e, LvmError::VgNotFound { vg, .. } if vg == "nosuch"), "{e:?}");
        let e = classify(failed(include_str!("../tests/fixtures/lvcreate_no_space.stderr")), Some("vg0"), None);
        assert!(matches!(&e, LvmError::Failed { .. }) && e.to_string().contains("insufficient free space"), "{e}");
        let e = classify(failed(include_str!("../tests/fixtures/lvcreate_bad_name.stderr")), Some("vg0"), None);
        assert!(e.to_string().contains("is invalid") && !e.to_string().contains("--help"), "{e}");
    }

    #[test]
    fn insufficient_space_message_has_the_numbers() {
        let e = LvmError::InsufficientSpace {
            vg: "vg0".into(),
            name: "data_blockrep_snap".into(),
            what: "snapshot",
            free: 4194304,
            needed: 8388608,
            hint: "snapshot_size",
        };
        assert_eq!(
            e.to_string(),
            "VG vg0 has 4194304 bytes free, the snapshot vg0/data_blockrep_snap needs 8388608; \
             free space in vg0 or lower snapshot_size"
        );
    }
}
