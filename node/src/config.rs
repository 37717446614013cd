//! The configuration file (`/etc/blockrep/blockrep.toml`, `--config PATH`), documented in docs/config.md.
//!
//! Raw TOML is deserialized with unknown keys refused (the TOML error names the key and its line), then checked
//! once into a [`Config`] the commands use. Every error here is a usage error ([`crate::ErrorKind::Usage`]).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use toml::Spanned;

use crate::layout;

/// A configuration that cannot be used; the message names the file, the key and what to write instead.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read configuration {}: {error} (create it, or pass --config PATH)", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The OS error (in the message, which ends with what to do).
        error: std::io::Error,
    },
    /// The file is not valid TOML or has unknown or missing keys.
    #[error("configuration {} is invalid: {error}", path.display())]
    Syntax {
        /// The file.
        path: PathBuf,
        /// The TOML error, naming the key and its line.
        error: toml::de::Error,
    },
    /// A value is wrong.
    #[error("configuration {}: {message}", path.display())]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong and what to write instead.
        message: String,
    },
    /// A volume named on the command line is not configured.
    #[error("volume {name:?} is not in {}", path.display())]
    UnknownVolume {
        /// The name given.
        name: String,
        /// The file.
        path: PathBuf,
    },
    /// A volume lacks the path this side needs.
    #[error("volume {volume} has no `{key}` in {}{hint}", path.display())]
    MissingPath {
        /// Volume name.
        volume: String,
        /// `source` or `shadow`.
        key: &'static str,
        /// The file.
        path: PathBuf,
        /// Which side needs it.
        hint: &'static str,
    },
    /// A section this command needs is missing.
    #[error("{} has no {what}", path.display())]
    Missing {
        /// The file.
        path: PathBuf,
        /// What is missing, and where to read about it.
        what: &'static str,
    },
}

/// Default configuration path.
pub const DEFAULT_PATH: &str = "/etc/blockrep/blockrep.toml";

/// The file as written. `P` is the shape of `primary`: the `[primary]` table of a node that replicates its own
/// volumes ([`RawPrimary`]), or the `[[primary]]` blocks of a standby protecting several primaries
/// ([`RawProtected`]); [`Config::parse`] looks at the file's shape first and reads it as one or the other, so that
/// every key keeps its line in the error messages.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, bound(deserialize = "P: Deserialize<'de>"))]
struct Raw<P> {
    #[serde(default)]
    version: Option<toml::Spanned<i64>>,
    node: String,
    #[serde(default)]
    key_file: Option<PathBuf>,
    #[serde(default)]
    encryption: Option<Spanned<String>>,
    #[serde(default = "default_state_dir")]
    state_dir: PathBuf,
    #[serde(default)]
    standby: Option<RawStandby>,
    #[serde(default)]
    primary: Option<P>,
    #[serde(default, rename = "volume")]
    volumes: Vec<RawVolume>,
    #[serde(default)]
    role: Option<toml::Table>,
    #[serde(default)]
    schedule: Option<RawSchedule>,
    #[serde(default)]
    monitoring: Option<RawMonitoring>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSchedule {
    #[serde(default)]
    on_calendar: Option<Spanned<String>>,
    #[serde(default)]
    retry_count: Option<u32>,
    #[serde(default)]
    retry_interval: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMonitoring {
    #[serde(default)]
    max_data_age: Option<Spanned<String>>,
    #[serde(default)]
    metrics_file: Option<PathBuf>,
    #[serde(default)]
    metrics_interval: Option<Spanned<String>>,
    #[serde(default)]
    standby_node: Option<String>,
}

fn default_state_dir() -> PathBuf {
    PathBuf::from("/var/lib/blockrep")
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStandby {
    listen: toml::Spanned<String>,
    #[serde(default)]
    peer: Option<Spanned<String>>,
    #[serde(default)]
    idle_timeout_s: Option<Spanned<u64>>,
    #[serde(default)]
    verify_every: Option<Spanned<String>>,
    #[serde(default)]
    keep_protecting: Option<bool>,
    #[serde(default)]
    takeover_settle: Option<Spanned<String>>,
}

/// One `[[primary]]` block of a standby that protects several primaries (issue 14).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawProtected {
    node: Spanned<String>,
    key_file: PathBuf,
    #[serde(default)]
    address: Option<Spanned<String>>,
    #[serde(default)]
    priority: Option<u32>,
    #[serde(default)]
    fallback: Option<Spanned<String>>,
    #[serde(default)]
    min_hold: Option<Spanned<String>>,
    #[serde(default, rename = "volume")]
    volumes: Vec<RawVolume>,
    #[serde(default)]
    role: Option<toml::Table>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPrimary {
    peer: Spanned<String>,
    #[serde(default)]
    bwlimit: Option<toml::Spanned<String>>,
    #[serde(default)]
    compression_level: Option<i32>,
    #[serde(default)]
    connect_timeout_s: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawVolume {
    name: Spanned<String>,
    #[serde(default)]
    source: Option<PathBuf>,
    #[serde(default)]
    shadow: Option<PathBuf>,
    #[serde(default)]
    snapshot: Option<Spanned<String>>,
    #[serde(default)]
    snapshot_size: Option<toml::Spanned<String>>,
    #[serde(default)]
    snapshot_name: Option<String>,
    #[serde(default)]
    block_size: Option<toml::Spanned<String>>,
    #[serde(default)]
    size: Option<toml::Spanned<String>>,
    #[serde(default)]
    track: Option<Spanned<String>>,
    #[serde(default)]
    full_scan_every: Option<u32>,
    #[serde(default)]
    keep_generations: Option<Spanned<u32>>,
}

/// How a volume is frozen during a sync.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SnapshotDriver {
    /// The caller guarantees the source is quiescent.
    None,
    /// A classic LVM snapshot of the source LV.
    Lvm {
        /// Size: bytes or percent of the origin.
        size: SnapshotSize,
        /// Name of the snapshot LV (default `<lv>_blockrep_snap`).
        name: Option<String>,
    },
}

/// How a volume's changes since the last sync are found (`track`, docs/config.md); see [`crate::freeze`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Track {
    /// `thin` for a thin LV with `snapshot = "lvm"`, else `none`.
    Auto,
    /// `thin_delta` between the previous sync's thin snapshot and the new one.
    Thin,
    /// The previous sync's classic snapshot kept as the tracker; its exception store lists the changed chunks.
    Snapshot,
    /// A full scan every time.
    None,
}

/// Default of `full_scan_every`: every 7th sync of a tracked volume is a full scan.
pub const DEFAULT_FULL_SCAN_EVERY: u32 = 7;

/// Snapshot size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SnapshotSize {
    /// Bytes.
    Bytes(u64),
    /// Percent of the origin LV.
    Percent(u8),
}

/// One replicated volume.
#[derive(Debug, Clone)]
pub struct Volume {
    /// Name (both sides use it).
    pub name: String,
    /// Source on the primary.
    pub source: Option<PathBuf>,
    /// Shadow on the standby.
    pub shadow: Option<PathBuf>,
    /// Snapshot driver.
    pub snapshot: SnapshotDriver,
    /// Block size (`block_size`).
    pub block_size: BlockSize,
    /// The source's size (`size`), for `blockrep shadow create` when the primary has not reported it.
    pub size: Option<u64>,
    /// How changes are found (`track`).
    pub track: Track,
    /// Every this many syncs of a tracked volume, one full scan (`full_scan_every`; 1: always, 0: never).
    pub full_scan_every: u32,
    /// Generations the standby keeps of this volume, the shadow's current one included (`keep_generations`,
    /// 1 to [`crate::retain::MAX_KEEP_GENERATIONS`]; 1: only the current one).
    pub keep_generations: u32,
}

/// The checked configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where it was read from.
    pub path: PathBuf,
    /// This node's name.
    pub node: String,
    /// Shared key file (its next key, during a rotation, is `KEYFILE.next`).
    pub key_file: PathBuf,
    /// Whether sessions are encrypted (`encryption`; both nodes must agree).
    pub encryption: netproto::Encryption,
    /// State directory (not on a replicated volume).
    pub state_dir: PathBuf,
    /// Standby listen address.
    pub listen: Option<SocketAddr>,
    /// The standby as seen from the primary (`host:port`).
    pub peer: Option<String>,
    /// The other node's `blockrep serve` as seen from the standby (`host:port`), for role checks.
    pub standby_peer: Option<String>,
    /// Send-rate cap in bytes per second.
    pub bwlimit: Option<u64>,
    /// zstd level for extents; 0: compression off (`[primary] compression_level`).
    pub compression_level: i32,
    /// Connect timeout in seconds.
    pub connect_timeout_s: u64,
    /// The standby ends an authenticated session that sends nothing for this long (`[standby] idle_timeout_s`).
    pub idle_timeout: std::time::Duration,
    /// `serve` re-hashes each shadow it holds this often (`[standby] verify_every`; `None`: never).
    pub verify_every: Option<std::time::Duration>,
    /// Volumes.
    pub volumes: Vec<Volume>,
    /// The `[role]` section, for the role manager.
    pub role: Option<toml::Table>,
    /// The `[schedule]` section.
    pub schedule: crate::schedule::Schedule,
    /// The `[monitoring]` section.
    pub monitoring: Monitoring,
    /// The primaries this standby protects (`[[primary]]` blocks), each as the configuration of its own
    /// (see [`Config::for_primary`]); empty on a node of a two-node pair.
    pub primaries: Vec<Config>,
    /// Set on the configuration of one protected primary: which, and its takeover settings.
    pub protects: Option<Protects>,
    /// While acting for one primary, keep accepting the others' syncs (`[standby] keep_protecting`).
    pub keep_protecting: bool,
    /// How long a takeover waits for the takeovers of other primaries that failed at the same time, so that the
    /// one with the highest priority wins (`[standby] takeover_settle`).
    pub takeover_settle: std::time::Duration,
}

/// Directory below `state_dir` holding one state directory per protected primary.
pub const PRIMARIES_DIR: &str = "primaries";

/// What a protected primary's configuration protects (a `[[primary]]` block).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Protects {
    /// The primary's node name (as it calls itself in the handshake).
    pub node: String,
    /// Higher wins when several primaries fail at once (`priority`).
    pub priority: u32,
    /// Whether the service goes back by itself once the primary is repaired and resynchronised (`fallback`).
    pub fallback: Fallback,
    /// The least time the standby acts for the primary before an automatic fallback (`min_hold`).
    pub min_hold: std::time::Duration,
    /// The standby's own `state_dir` (maintenance locks, the history).
    pub node_state_dir: PathBuf,
}

/// `fallback` of a `[[primary]]` block.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Fallback {
    /// The operator switches back (`blockrep switchover` on the repaired primary).
    Manual,
    /// The standby hands the service back by a planned switchover once the primary is resynchronised.
    Automatic,
}

/// The `[monitoring]` section: alarm thresholds and the metrics file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Monitoring {
    /// Standby data older than this raises an alarm.
    pub max_data_age: Option<std::time::Duration>,
    /// Prometheus text file (node_exporter textfile collector), written after each sync and by `serve`.
    pub metrics_file: Option<PathBuf>,
    /// How often `serve` rewrites the metrics file.
    pub metrics_interval: std::time::Duration,
    /// The node configured as standby: an alarm when it runs as primary.
    pub standby_node: Option<String>,
}

impl Default for Monitoring {
    fn default() -> Self {
        Monitoring {
            max_data_age: None,
            metrics_file: None,
            metrics_interval: std::time::Duration::from_secs(60),
            standby_node: None,
        }
    }
}

impl Config {
    /// Reads and checks the file at `path`, including the path rules of [`crate::paths`].
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|error| ConfigError::Read { path: path.into(), error })?;
        let cfg = Self::parse(&text, path)?;
        crate::paths::check(&cfg)?;
        for c in &cfg.primaries {
            crate::paths::check(c)?;
        }
        crate::paths::check_across_primaries(&cfg)?;
        Ok(cfg)
    }

    /// Parses and checks configuration text.
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let syntax = |error| ConfigError::Syntax { path: path.into(), error };
        // `primary` is a table on a node replicating its own volumes and an array of blocks on a standby
        // protecting several primaries: look at the shape, then read the file as the one it is.
        let shape: toml::Table = toml::from_str(text).map_err(syntax)?;
        if !matches!(shape.get("primary"), Some(toml::Value::Array(_))) {
            let raw: Raw<RawPrimary> = toml::from_str(text).map_err(syntax)?;
            return Self::build(raw, Vec::new(), text, path);
        }
        let raw: Raw<Vec<RawProtected>> = toml::from_str(text).map_err(syntax)?;
        let Raw {
            version,
            node,
            key_file,
            encryption,
            state_dir,
            standby,
            primary,
            volumes,
            role,
            schedule,
            monitoring,
        } = raw;
        let raw = Raw {
            version,
            node,
            key_file,
            encryption,
            state_dir,
            standby,
            primary: None,
            volumes,
            role,
            schedule,
            monitoring,
        };
        Self::build(raw, primary.unwrap_or_default(), text, path)
    }

    fn build(raw: Raw<RawPrimary>, blocks: Vec<RawProtected>, text: &str, path: &Path) -> Result<Config, ConfigError> {
        let bad = |message: String| ConfigError::Invalid { path: path.into(), message };
        // A semantic error names the key and its line, as the TOML parser does for syntax errors.
        let key_at = |key: &str, span: std::ops::Range<usize>| format!("{key} (line {})", line_of(text, span));
        if let Some(v) = &raw.version {
            if *v.get_ref() != i64::from(CONFIG_VERSION) {
                return Err(bad(format!(
                    "{}: configuration version {} is not supported: this blockrep reads version {CONFIG_VERSION}",
                    key_at("version", v.span()),
                    v.get_ref()
                )));
            }
        }
        let listen = match &raw.standby {
            Some(s) => Some(s.listen.get_ref().parse::<SocketAddr>().map_err(|_| {
                bad(format!(
                    "{}: {:?} is not an address like 0.0.0.0:7788",
                    key_at("standby.listen", s.listen.span()),
                    s.listen.get_ref()
                ))
            })?),
            None => None,
        };
        // A peer is `host:port` (a name or an address; IPv6 in brackets); resolving it is left to the connect.
        let peers = [
            raw.primary.as_ref().map(|p| ("primary.peer", &p.peer)),
            raw.standby.as_ref().and_then(|s| s.peer.as_ref()).map(|p| ("standby.peer", p)),
        ];
        for (key, p) in peers.into_iter().flatten() {
            let ok = p
                .get_ref()
                .rsplit_once(':')
                .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok_and(|n| n > 0));
            if !ok {
                let key = key_at(key, p.span());
                return Err(bad(format!("{key}: {:?} is not host:port, like standby.example:7788", p.get_ref())));
            }
        }
        let idle_timeout = match raw.standby.as_ref().and_then(|s| s.idle_timeout_s.as_ref()) {
            Some(s) if *s.get_ref() == 0 => {
                let key = key_at("standby.idle_timeout_s", s.span());
                return Err(bad(format!("{key}: must be at least 1 (seconds)")));
            }
            Some(s) => std::time::Duration::from_secs(*s.get_ref()),
            None => crate::serve::DEFAULT_IDLE_TIMEOUT,
        };
        let bwlimit = match raw.primary.as_ref().and_then(|p| p.bwlimit.as_ref()) {
            Some(s) => Some(
                parse_size(s.get_ref()).map_err(|e| bad(format!("{}: {e}", key_at("primary.bwlimit", s.span()))))?,
            ),
            None => None,
        };
        let volumes = parse_volumes(raw.volumes, text, path)?;
        let at = |key: &str, v: &Spanned<String>, e: String| {
            let line = text[..v.span().start.min(text.len())].matches('\n').count() + 1;
            bad(format!("{key} (line {line}): {e}"))
        };
        let mut schedule = crate::schedule::Schedule::default();
        if let Some(s) = &raw.schedule {
            if let Some(c) = &s.on_calendar {
                let cal = crate::schedule::normalize_calendar(c.get_ref());
                schedule.on_calendar = Some(cal.map_err(|e| at("schedule.on_calendar", c, e))?);
            }
            schedule.retry_count = s.retry_count.unwrap_or(0);
            if let Some(i) = &s.retry_interval {
                schedule.retry_interval =
                    crate::schedule::parse_duration(i.get_ref()).map_err(|e| at("schedule.retry_interval", i, e))?;
            }
        }
        let mut monitoring = Monitoring::default();
        if let Some(m) = raw.monitoring {
            if let Some(a) = &m.max_data_age {
                let d =
                    crate::schedule::parse_duration(a.get_ref()).map_err(|e| at("monitoring.max_data_age", a, e))?;
                monitoring.max_data_age = Some(d);
            }
            if let Some(i) = &m.metrics_interval {
                let d = crate::schedule::parse_duration(i.get_ref())
                    .and_then(|d| if d.is_zero() { Err("must be at least 1s".into()) } else { Ok(d) })
                    .map_err(|e| at("monitoring.metrics_interval", i, e))?;
                monitoring.metrics_interval = d;
            }
            monitoring.metrics_file = m.metrics_file;
            monitoring.standby_node = m.standby_node;
        }
        let compression_level =
            raw.primary.as_ref().and_then(|p| p.compression_level).unwrap_or(netproto::DEFAULT_ZSTD_LEVEL);
        if !(0..=19).contains(&compression_level) {
            return Err(bad(format!(
                "primary.compression_level = {compression_level} is out of range: use 0 (off) to 19 (zstd levels)"
            )));
        }
        let verify_every = match raw.standby.as_ref().and_then(|s| s.verify_every.as_ref()) {
            Some(v) => Some(
                crate::schedule::parse_duration(v.get_ref())
                    .and_then(|d| if d.is_zero() { Err("must be at least 1s".into()) } else { Ok(d) })
                    .map_err(|e| at("standby.verify_every", v, e))?,
            ),
            None => None,
        };
        let encryption = match &raw.encryption {
            None => netproto::Encryption::None,
            Some(e) => match e.get_ref().as_str() {
                "none" => netproto::Encryption::None,
                "aead" => netproto::Encryption::Aead,
                other => {
                    let key = key_at("encryption", e.span());
                    return Err(bad(format!("{key}: encryption {other:?} is unknown: use \"none\" or \"aead\"")));
                }
            },
        };
        let primary = raw.primary.as_ref();
        let key_file =
            match raw.key_file {
                Some(k) => k,
                None if !blocks.is_empty() => PathBuf::new(), // each [[primary]] block names its own key
                None => return Err(bad(
                    "missing key `key_file`: the shared key's path, like key_file = \"/etc/blockrep/blockrep.key\" \
                     (create it with `blockrep keygen`)"
                        .into(),
                )),
            };
        let standby = raw.standby.as_ref();
        let keep_protecting = standby.and_then(|s| s.keep_protecting).unwrap_or(false);
        let takeover_settle = match standby.and_then(|s| s.takeover_settle.as_ref()) {
            Some(v) => crate::schedule::parse_duration(v.get_ref()).map_err(|e| at("standby.takeover_settle", v, e))?,
            None => crate::protect::DEFAULT_TAKEOVER_SETTLE,
        };
        let has_schedule = raw.schedule.is_some();
        let mut cfg = Config {
            path: path.to_owned(),
            node: raw.node,
            key_file,
            encryption,
            state_dir: raw.state_dir,
            listen,
            peer: primary.map(|p| p.peer.get_ref().clone()),
            standby_peer: raw.standby.as_ref().and_then(|s| s.peer.as_ref()).map(|p| p.get_ref().clone()),
            bwlimit,
            compression_level,
            connect_timeout_s: primary.and_then(|p| p.connect_timeout_s).unwrap_or(10),
            idle_timeout,
            verify_every,
            volumes,
            role: raw.role,
            schedule,
            monitoring,
            primaries: Vec::new(),
            protects: None,
            keep_protecting,
            takeover_settle,
        };
        if !blocks.is_empty() {
            let refuse = |what: &str| {
                bad(format!(
                    "{what} cannot be used with [[primary]] blocks: on a standby protecting several primaries, \
                     each [[primary]] block has its own volumes ([[primary.volume]]) and role ([primary.role])"
                ))
            };
            if !cfg.volumes.is_empty() {
                return Err(refuse("top-level [[volume]] blocks"));
            }
            if cfg.role.is_some() {
                return Err(refuse("a top-level [role] section"));
            }
            if has_schedule {
                return Err(refuse("[schedule] (syncs start on the primaries)"));
            }
            if cfg.listen.is_none() {
                return Err(
                    bad("[[primary]] blocks are for a standby: add [standby] listen = \"0.0.0.0:7788\"".into()),
                );
            }
            for b in blocks {
                let child = cfg.protected(b, text, path)?;
                let node = &child.protects.as_ref().expect("set by protected").node;
                if cfg.primaries.iter().any(|p: &Config| p.protects.as_ref().is_some_and(|q| &q.node == node)) {
                    return Err(bad(format!("[[primary]] node {node:?} is configured twice")));
                }
                if node == &cfg.node {
                    return Err(bad(format!(
                        "[[primary]] node {node:?} is this node's own name: name the primaries this standby protects"
                    )));
                }
                cfg.primaries.push(child);
            }
        }
        Ok(cfg)
    }

    /// The configuration of one protected primary (a `[[primary]]` block): this standby's settings with the
    /// block's key, volumes and role, and its own state under `<state_dir>/primaries/<node>`.
    fn protected(&self, b: RawProtected, text: &str, path: &Path) -> Result<Config, ConfigError> {
        let bad = |message: String| ConfigError::Invalid { path: path.into(), message };
        let at =
            |key: &str, v: &Spanned<String>, e: String| bad(format!("{key} (line {}): {e}", line_of(text, v.span())));
        let node = b.node.get_ref().clone();
        layout::volume_name(Some(&node), Path::new(""))
            .map_err(|_| at("primary.node", &b.node, format!("node name {node:?}: use letters, digits and . _ + -")))?;
        if let Some(a) = &b.address {
            let ok = a
                .get_ref()
                .rsplit_once(':')
                .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok_and(|n| n > 0));
            if !ok {
                return Err(at("primary.address", a, "not host:port, like pbx-a.example:7788".into()));
            }
        }
        let fallback = match b.fallback.as_ref().map(|f| (f, f.get_ref().as_str())) {
            None | Some((_, "manual")) => Fallback::Manual,
            Some((_, "automatic")) => Fallback::Automatic,
            Some((f, other)) => {
                return Err(at("primary.fallback", f, format!("{other:?} is unknown: use \"manual\" or \"automatic\"")))
            }
        };
        let min_hold = match &b.min_hold {
            Some(v) => crate::schedule::parse_duration(v.get_ref()).map_err(|e| at("primary.min_hold", v, e))?,
            None => crate::protect::DEFAULT_MIN_HOLD,
        };
        if b.volumes.is_empty() {
            return Err(at(
                "primary.node",
                &b.node,
                format!("primary {node} has no volumes: add [[primary.volume]] blocks with name and shadow"),
            ));
        }
        let mut volumes = parse_volumes(b.volumes, text, path)?;
        for v in &mut volumes {
            if v.source.is_some() {
                return Err(bad(format!(
                    "primary {node}, volume {}: a protected primary's volume has only a `shadow` here (while this \
                     standby acts for {node}, the shadow is the production volume, and it is the source when \
                     syncing back)",
                    v.name
                )));
            }
            if v.shadow.is_none() {
                return Err(bad(format!("primary {node}, volume {}: give its `shadow` on this standby", v.name)));
            }
            v.source = v.shadow.clone();
        }
        if fallback == Fallback::Automatic && b.address.is_none() {
            return Err(at(
                "primary.fallback",
                b.fallback.as_ref().expect("automatic was written"),
                format!("fallback = \"automatic\" needs the primary's `address` (its blockrep serve, host:port) to hand the service back to {node}"),
            ));
        }
        let address = b.address.map(|a| a.into_inner());
        Ok(Config {
            path: self.path.clone(),
            node: self.node.clone(),
            key_file: b.key_file,
            encryption: self.encryption,
            state_dir: self.state_dir.join(PRIMARIES_DIR).join(&node),
            listen: self.listen,
            peer: address.clone(),
            standby_peer: address,
            bwlimit: self.bwlimit,
            compression_level: self.compression_level,
            connect_timeout_s: self.connect_timeout_s,
            idle_timeout: self.idle_timeout,
            verify_every: self.verify_every,
            volumes,
            role: b.role,
            schedule: crate::schedule::Schedule::default(),
            monitoring: Monitoring {
                max_data_age: self.monitoring.max_data_age,
                metrics_file: None,
                metrics_interval: self.monitoring.metrics_interval,
                standby_node: None,
            },
            primaries: Vec::new(),
            protects: Some(Protects {
                node,
                priority: b.priority.unwrap_or(crate::protect::DEFAULT_PRIORITY),
                fallback,
                min_hold,
                node_state_dir: self.state_dir.clone(),
            }),
            keep_protecting: self.keep_protecting,
            takeover_settle: self.takeover_settle,
        })
    }

    /// The state directory of this node as a whole (maintenance locks, the history): `state_dir`, also for a
    /// protected primary's configuration, whose own state is below it.
    pub fn node_state_dir(&self) -> &Path {
        self.protects.as_ref().map_or(&self.state_dir, |p| &p.node_state_dir)
    }

    /// The primaries this standby protects by name (`[[primary]]` blocks; empty on a two-node pair).
    pub fn primary_names(&self) -> Vec<&str> {
        self.primaries.iter().filter_map(|p| p.protects.as_ref()).map(|p| p.node.as_str()).collect()
    }

    /// The configuration a command acts on: this one, or with `[[primary]]` blocks the one of the primary named
    /// by `--for NODE`.
    pub fn for_primary(&self, node: Option<&str>) -> Result<Config, ConfigError> {
        let bad = |message: String| ConfigError::Invalid { path: self.path.clone(), message };
        match (node, self.primaries.is_empty()) {
            (None, true) => Ok(self.clone()),
            (Some(n), true) => Err(bad(format!(
                "--for {n}: this node protects no list of primaries ([[primary]] blocks); leave --for out"
            ))),
            (Some(n), false) => {
                self.primaries.iter().find(|p| p.protects.as_ref().is_some_and(|q| q.node == n)).cloned().ok_or_else(
                    || {
                        bad(format!(
                            "--for {n}: {n} is not a primary of this standby; its primaries are {}",
                            self.primary_names().join(", ")
                        ))
                    },
                )
            }
            (None, false) => Err(bad(format!(
                "this standby protects several primaries ({}): say which with --for NODE",
                self.primary_names().join(", ")
            ))),
        }
    }

    /// The named volumes, or all of them; an unknown name is an error naming it.
    pub fn select(&self, names: &[String]) -> Result<Vec<&Volume>, ConfigError> {
        if names.is_empty() {
            return Ok(self.volumes.iter().collect());
        }
        names
            .iter()
            .map(|n| {
                self.volumes
                    .iter()
                    .find(|v| &v.name == n)
                    .ok_or_else(|| ConfigError::UnknownVolume { name: n.clone(), path: self.path.clone() })
            })
            .collect()
    }

    /// What this node says in a handshake: its name and its `encryption`.
    pub fn handshake_options(&self) -> netproto::HandshakeOptions {
        netproto::HandshakeOptions::new(&self.node).encryption(self.encryption)
    }

    /// This node's keys: `key_file` and, during a rotation, `KEYFILE.next`.
    pub fn keys(&self) -> Result<netproto::KeySet, netproto::KeyError> {
        netproto::KeySet::load(&self.key_file)
    }

    /// This node's state layout.
    pub fn layout(&self) -> layout::Layout {
        layout::Layout::new(&self.state_dir, self.role.as_ref())
    }

    /// A volume's source (primary side), or an error naming the missing key.
    pub fn source_of<'a>(&self, vol: &'a Volume) -> Result<&'a Path, ConfigError> {
        vol.source.as_deref().ok_or_else(|| self.missing_path(vol, "source", " (this is the primary side)"))
    }

    /// A volume's shadow (standby side), or an error naming the missing key.
    pub fn shadow_of<'a>(&self, vol: &'a Volume) -> Result<&'a Path, ConfigError> {
        vol.shadow.as_deref().ok_or_else(|| self.missing_path(vol, "shadow", ""))
    }

    fn missing_path(&self, vol: &Volume, key: &'static str, hint: &'static str) -> ConfigError {
        ConfigError::MissingPath { volume: vol.name.clone(), key, path: self.path.clone(), hint }
    }
}

/// The `[[volume]]` blocks (or a `[[primary]]` block's `[[primary.volume]]` blocks), checked.
fn parse_volumes(raws: Vec<RawVolume>, text: &str, path: &Path) -> Result<Vec<Volume>, ConfigError> {
    let bad = |message: String| ConfigError::Invalid { path: path.into(), message };
    let key_at = |key: &str, span: std::ops::Range<usize>| format!("{key} (line {})", line_of(text, span));
    let mut volumes = Vec::new();
    for v in raws {
        let name_key = key_at("name", v.name.span());
        let name = v.name.get_ref().clone();
        layout::volume_name(Some(&name), Path::new(""))
            .map_err(|_| bad(format!("{name_key}: volume name {name:?}: use letters, digits and . _ + -")))?;
        if volumes.iter().any(|o: &Volume| o.name == name) {
            return Err(bad(format!("{name_key}: volume {name:?} is configured twice")));
        }
        let block_key = match &v.block_size {
            Some(s) => key_at("block_size", s.span()),
            None => "block_size".into(),
        };
        let block_size = match &v.block_size {
            Some(s) => parse_block_size(s.get_ref()).map_err(|e| bad(format!("volume {}: {block_key}: {e}", name)))?,
            None => BlockSize::Auto,
        };
        let size = match &v.size {
            Some(s) => Some(
                parse_size(s.get_ref())
                    .and_then(|n| if n == 0 { Err("the size must not be 0".into()) } else { Ok(n) })
                    .map_err(|e| bad(format!("volume {}: {}: {e}", name, key_at("size", s.span()))))?,
            ),
            None => None,
        };
        let snapshot = match v.snapshot.as_ref().map_or("none", |s| s.get_ref().as_str()) {
            "none" => SnapshotDriver::None,
            "lvm" => SnapshotDriver::Lvm {
                size: match &v.snapshot_size {
                    Some(s) => {
                        let key = key_at("snapshot_size", s.span());
                        let size = parse_snapshot_size(s.get_ref())
                            .map_err(|e| bad(format!("volume {}: {key}: {e}", name)))?;
                        warn_small_snapshot(&name, &key, size);
                        size
                    }
                    None => SnapshotSize::Percent(lvmctl::DEFAULT_SNAPSHOT_PERCENT),
                },
                name: match &v.snapshot_name {
                    // A tracked volume's snapshots alternate between this name and `<lv>_blockrep_base`.
                    Some(n) if n.ends_with("_blockrep_base") => {
                        return Err(bad(format!(
                            "volume {name}: snapshot_name {n:?} ends in _blockrep_base, the name a tracked \
                             volume's snapshots alternate with: choose another name"
                        )))
                    }
                    n => n.clone(),
                },
            },
            other => {
                let key = v.snapshot.as_ref().map(|s| key_at("snapshot", s.span())).unwrap_or_default();
                return Err(bad(format!(
                    "volume {name}: {key}: snapshot {other:?} is unknown: use \"none\" or \"lvm\""
                )));
            }
        };
        if v.source.is_none() && v.shadow.is_none() {
            return Err(bad(format!(
                "volume {name} ({name_key}): give `source` (primary side) and/or `shadow` (standby side)"
            )));
        }
        let track = match v.track.as_ref().map_or("auto", |t| t.get_ref().as_str()) {
            "auto" => Track::Auto,
            t @ ("thin" | "snapshot") if snapshot == SnapshotDriver::None => {
                let key = v.track.as_ref().map(|s| key_at("track", s.span())).unwrap_or_default();
                return Err(bad(format!(
                    "volume {name}: {key}: track = {t:?} needs snapshot = \"lvm\" (the tracker is an LVM snapshot)"
                )));
            }
            "thin" => Track::Thin,
            "snapshot" => Track::Snapshot,
            "none" => Track::None,
            other => {
                let key = v.track.as_ref().map(|s| key_at("track", s.span())).unwrap_or_default();
                return Err(bad(format!(
                    "volume {name}: {key}: track {other:?} is unknown: use \"auto\", \"thin\", \"snapshot\" or \"none\""
                )));
            }
        };
        let full_scan_every = v.full_scan_every.unwrap_or(DEFAULT_FULL_SCAN_EVERY);
        let keep_generations = match &v.keep_generations {
            None => 1,
            Some(k) if (1..=crate::retain::MAX_KEEP_GENERATIONS).contains(k.get_ref()) => *k.get_ref(),
            Some(k) => {
                return Err(bad(format!(
                    "volume {name}: {}: keep_generations = {} is out of range: use 1 (only the current \
                     generation) to {}",
                    key_at("keep_generations", k.span()),
                    k.get_ref(),
                    crate::retain::MAX_KEEP_GENERATIONS
                )))
            }
        };
        volumes.push(Volume {
            name,
            source: v.source,
            shadow: v.shadow,
            snapshot,
            block_size,
            size,
            track,
            full_scan_every,
            keep_generations,
        });
    }
    Ok(volumes)
}

/// The configuration format this blockrep reads (`version = 1` at the top; optional, 1 when absent).
pub const CONFIG_VERSION: u8 = 1;

/// Below this percentage of the origin, a snapshot is likely to overflow during a sync of a busy volume.
pub const SNAPSHOT_WARN_PERCENT: u8 = 20;

/// The 1-based line of a byte offset in `text`.
fn line_of(text: &str, span: std::ops::Range<usize>) -> usize {
    text.as_bytes()[..span.start.min(text.len())].iter().filter(|&&b| b == b'\n').count() + 1
}

/// A warning at load for a snapshot under [`SNAPSHOT_WARN_PERCENT`] of its origin. Only the percent form is
/// checked: the byte form would need the origin's size from lvm on every load of the configuration (also on the
/// standby, where the source does not exist), so it is left to the sync, which fails with a hint when the
/// snapshot overflows.
fn warn_small_snapshot(volume: &str, key: &str, size: SnapshotSize) {
    if let SnapshotSize::Percent(p) = size {
        if p < SNAPSHOT_WARN_PERCENT {
            tracing::warn!(
                volume,
                "{key}: a snapshot of {p}% of the origin is under {SNAPSHOT_WARN_PERCENT}%: a busy volume can \
                 overflow it during a sync, which then fails"
            );
        }
    }
}

/// A volume's hashing block size (`[[volume]] block_size`, `sync --local --block-size`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BlockSize {
    /// `"auto"` (the default): chosen by [`BlockSize::resolve`].
    #[default]
    Auto,
    /// A power of two from 4 KiB to 1 MiB.
    Fixed(u32),
}

impl BlockSize {
    /// The block size of a sync of a source of `volume_size` bytes whose manifest is `manifest`. A fixed size is
    /// used as configured. `auto` keeps the block size of the manifest while it describes a volume of this size
    /// (another block size would make the next sync compare every block), and otherwise takes
    /// [`engine::hash::auto_block_size`], which depends on the size alone: both nodes of a pair choose the same,
    /// and so does the other node when it becomes the primary (its manifest, made from the standby's, keeps it).
    pub fn resolve(self, volume_size: u64, manifest: &Path) -> u32 {
        match self {
            BlockSize::Fixed(bs) => bs,
            BlockSize::Auto => match engine::manifest::Manifest::open(manifest) {
                Ok(m) if m.volume_size() == volume_size => m.block_size(),
                _ => engine::hash::auto_block_size(volume_size),
            },
        }
    }
}

/// Parses a block size: `auto`, or a power of two from 4 KiB to 1 MiB (`32K`, `65536`).
pub fn parse_block_size(s: &str) -> Result<BlockSize, String> {
    if s.trim().eq_ignore_ascii_case("auto") {
        return Ok(BlockSize::Auto);
    }
    let or_auto = |e: String| format!("{e}; or \"auto\" (the default)");
    let bs = parse_size(s).map_err(or_auto)?;
    engine::hash::validate_block_size(bs).map(BlockSize::Fixed).map_err(|e| or_auto(e.to_string()))
}

/// Parses sizes like `4096`, `64K`, `256M`, `2G` (binary units).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().find(|(_, c)| c.is_ascii_alphabetic()) {
        Some((i, _)) => {
            let unit = s[i..].to_ascii_uppercase();
            let mult: u64 = match unit.trim_end_matches("IB").trim_end_matches('B') {
                "" => 1,
                "K" => 1 << 10,
                "M" => 1 << 20,
                "G" => 1 << 30,
                "T" => 1 << 40,
                _ => return Err(format!("unknown size unit in {s:?}: use K, M, G or T")),
            };
            (&s[..i], mult)
        }
        None => (s, 1),
    };
    let n: u64 = num.trim().parse().map_err(|_| format!("{s:?} is not a size (examples: 4096, 64K, 256M, 2G)"))?;
    n.checked_mul(mult).ok_or_else(|| format!("size {s:?} is too large"))
}

/// `20%` or a size like `2G`.
pub fn parse_snapshot_size(s: &str) -> Result<SnapshotSize, String> {
    if let Some(p) = s.trim().strip_suffix('%') {
        let n: u8 = p.trim().parse().map_err(|_| format!("{s:?} is not a percentage"))?;
        if n == 0 || n > 100 {
            return Err(format!("{s:?}: the percentage must be 1..100"));
        }
        Ok(SnapshotSize::Percent(n))
    } else {
        parse_size(s).map(SnapshotSize::Bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = include_str!("../../docs/blockrep.example.toml");

    #[test]
    fn sizes_parse_with_binary_units() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("64K"), Ok(65536));
        assert_eq!(parse_size("256M"), Ok(256 << 20));
        assert_eq!(parse_size("2GiB"), Ok(2 << 30));
        assert!(parse_size("12Q").is_err());
        assert!(parse_size("x").is_err());
    }

    #[test]
    fn track_keys_default_to_auto_and_need_an_lvm_snapshot() {
        let vol = "node = \"a\"\nkey_file = \"/k\"\n[[volume]]\nname = \"v\"\nsource = \"/x\"\n";
        let parse = |extra: &str| Config::parse(&format!("{vol}{extra}"), Path::new("c.toml"));
        let c = parse("").unwrap();
        assert_eq!((c.volumes[0].track, c.volumes[0].full_scan_every), (Track::Auto, DEFAULT_FULL_SCAN_EVERY));
        let c = parse("snapshot = \"lvm\"\ntrack = \"snapshot\"\nfull_scan_every = 3\n").unwrap();
        assert_eq!((c.volumes[0].track, c.volumes[0].full_scan_every), (Track::Snapshot, 3));
        assert_eq!(parse("snapshot = \"lvm\"\ntrack = \"thin\"\n").unwrap().volumes[0].track, Track::Thin);
        assert_eq!(parse("track = \"none\"\n").unwrap().volumes[0].track, Track::None);
        let e = link::error_chain(&parse("track = \"thin\"\n").unwrap_err());
        assert!(e.contains("track (line 6)") && e.contains("needs snapshot = \"lvm\""), "{e}");
        let e = link::error_chain(&parse("snapshot = \"lvm\"\ntrack = \"zfs\"\n").unwrap_err());
        assert!(e.contains("track (line 7)") && e.contains("\"auto\", \"thin\""), "{e}");
        let e = link::error_chain(&parse("snapshot = \"lvm\"\nsnapshot_name = \"x_blockrep_base\"\n").unwrap_err());
        assert!(e.contains("snapshot_name \"x_blockrep_base\" ends in _blockrep_base"), "{e}");
        assert!(parse("snapshot = \"lvm\"\nsnapshot_name = \"x_blockrep_snap2\"\n").is_ok());
    }

    #[test]
    fn block_size_is_auto_by_default_and_auto_depends_on_the_size_alone_without_a_manifest() {
        let vol = "node = \"a\"\nkey_file = \"/k\"\n[primary]\npeer = \"b:7788\"\n[[volume]]\nname = \"v\"\nsource = \"/s\"\n";
        let parse = |extra: &str| Config::parse(&format!("{vol}{extra}"), Path::new("c.toml"));
        assert_eq!(parse("").unwrap().volumes[0].block_size, BlockSize::Auto);
        assert_eq!(parse("block_size = \"Auto\"\n").unwrap().volumes[0].block_size, BlockSize::Auto);
        assert_eq!(parse("block_size = \"128K\"\n").unwrap().volumes[0].block_size, BlockSize::Fixed(128 << 10));
        let e = link::error_chain(&parse("block_size = \"automatic\"\n").unwrap_err());
        assert!(e.contains("block_size (line 8)") && e.contains("\"auto\""), "{e}");
        let none = Path::new("/nonexistent/manifest");
        assert_eq!(BlockSize::Auto.resolve(20 << 30, none), 32 << 10);
        assert_eq!(BlockSize::Auto.resolve(256 << 30, none), 32 << 10);
        assert_eq!(BlockSize::Auto.resolve((256 << 30) + 4096, none), 64 << 10);
        assert_eq!(BlockSize::Fixed(16 << 10).resolve(1 << 40, none), 16 << 10);
    }

    #[test]
    fn compression_level_defaults_to_the_documented_level_and_zero_turns_it_off() {
        let base = "node = \"a\"\nkey_file = \"/k\"\n[primary]\npeer = \"b:7788\"\n";
        let parse = |extra: &str| Config::parse(&format!("{base}{extra}"), Path::new("c.toml"));
        assert_eq!(parse("").unwrap().compression_level, netproto::DEFAULT_ZSTD_LEVEL);
        assert_eq!(netproto::DEFAULT_ZSTD_LEVEL, 1, "docs/config.md and docs/performance.md say 1");
        // The example spells the default out.
        let example = Config::parse(EXAMPLE, Path::new("example.toml")).unwrap();
        assert_eq!(example.compression_level, netproto::DEFAULT_ZSTD_LEVEL);
        assert_eq!(parse("compression_level = 0\n").unwrap().compression_level, 0);
        let e = link::error_chain(&parse("compression_level = 20\n").unwrap_err());
        assert!(e.contains("compression_level = 20") && e.contains("0 (off) to 19"), "{e}");
        assert!(parse("compression_level = -1\n").is_err());
    }

    #[test]
    fn the_documented_example_parses() {
        let c = Config::parse(EXAMPLE, Path::new("example.toml")).unwrap();
        assert_eq!(c.node, "pbx-a");
        assert_eq!(c.volumes.len(), 2);
        assert_eq!(c.volumes[0].snapshot, SnapshotDriver::Lvm { size: SnapshotSize::Percent(20), name: None });
        assert_eq!(c.listen, Some("0.0.0.0:7788".parse().unwrap()));
    }

    #[test]
    fn version_and_semantic_errors_name_the_key_and_line() {
        let ok = Config::parse("version = 1\nnode = \"a\"\nkey_file = \"/k\"\n", Path::new("c.toml"));
        assert!(ok.is_ok(), "{ok:?}");
        let e = link::error_chain(
            &Config::parse("version = 2\nnode = \"a\"\nkey_file = \"/k\"\n", Path::new("c.toml")).unwrap_err(),
        );
        assert!(e.contains("version 2") && e.contains("line 1") && e.contains("version 1"), "{e}");
        let text = "node = \"a\"\nkey_file = \"/k\"\n[standby]\n\nlisten = \"0.0.0.0\"\n";
        let e = link::error_chain(&Config::parse(text, Path::new("c.toml")).unwrap_err());
        assert!(e.contains("standby.listen") && e.contains("line 5") && e.contains("0.0.0.0"), "{e}");
        let vol = "node = \"a\"\nkey_file = \"/k\"\n[[volume]]\nname = \"v\"\nshadow = \"/s\"\n";
        let e = link::error_chain(&Config::parse(&format!("{vol}size = \"12Q\"\n"), Path::new("c.toml")).unwrap_err());
        assert!(e.contains("size (line 6)") && e.contains("12Q"), "{e}");
        let e =
            link::error_chain(&Config::parse(&format!("{vol}block_size = \"3K\"\n"), Path::new("c.toml")).unwrap_err());
        assert!(e.contains("block_size (line 6)"), "{e}");
        let text = format!("{vol}source = \"/x\"\nsnapshot = \"lvm\"\nsnapshot_size = \"120%\"\n");
        let e = link::error_chain(&Config::parse(&text, Path::new("c.toml")).unwrap_err());
        assert!(e.contains("snapshot_size (line 8)"), "{e}");
        let c = Config::parse(&format!("{vol}size = \"1G\"\n"), Path::new("c.toml")).unwrap();
        assert_eq!(c.volumes[0].size, Some(1 << 30));
    }

    #[test]
    fn semantic_errors_name_the_key_and_line() {
        let base = "node = \"a\"\nkey_file = \"/k\"\n";
        for (text, needle) in [
            ("[[volume]]\nname = \"a b\"\nsource = \"/x\"\n", "name (line 4)"),
            ("[[volume]]\nname = \"v\"\nsource = \"/x\"\n[[volume]]\nname = \"v\"\nsource = \"/y\"\n", "name (line 7)"),
            ("[[volume]]\nname = \"v\"\nsource = \"/x\"\nsnapshot = \"zfs\"\n", "snapshot (line 6)"),
            ("[[volume]]\nname = \"v\"\n", "name (line 4)"),
            ("[standby]\nlisten = \"0.0.0.0:1\"\nidle_timeout_s = 0\n", "standby.idle_timeout_s (line 5)"),
            ("[standby]\nlisten = \"0.0.0.0:1\"\nverify_every = \"0s\"\n", "standby.verify_every (line 5)"),
            ("[primary]\npeer = \"standby\"\n", "primary.peer (line 4)"),
            ("[standby]\nlisten = \"0.0.0.0:1\"\npeer = \"a:b\"\n", "standby.peer (line 5)"),
        ] {
            let e = link::error_chain(&Config::parse(&format!("{base}{text}"), Path::new("c.toml")).unwrap_err());
            assert!(e.contains(needle), "{needle}: {e}");
        }
    }

    #[test]
    fn primary_blocks_give_each_primary_its_own_configuration() {
        let base = "node = \"s\"\nstate_dir = \"/var/lib/b\"\n[standby]\nlisten = \"0.0.0.0:7788\"\n";
        let block = |n: &str, extra: &str| {
            format!(
                "[[primary]]\nnode = \"{n}\"\nkey_file = \"/k/{n}\"\n{extra}[[primary.volume]]\nname = \"data\"\n\
                 shadow = \"/dev/vg/{n}_data\"\n"
            )
        };
        let parse = |t: &str| Config::parse(t, Path::new("c.toml"));
        let c = parse(&format!(
            "{base}{}{}",
            block("a", "priority = 7\nfallback = \"automatic\"\naddress = \"a:7788\"\n"),
            block("b", "")
        ))
        .unwrap();
        assert_eq!(c.primary_names(), ["a", "b"]);
        let a = c.for_primary(Some("a")).unwrap();
        let p = a.protects.as_ref().unwrap();
        assert_eq!((p.priority, p.fallback), (7, Fallback::Automatic));
        assert_eq!(a.key_file, Path::new("/k/a"));
        assert_eq!(a.state_dir, Path::new("/var/lib/b/primaries/a"));
        assert_eq!(a.node_state_dir(), Path::new("/var/lib/b"));
        // Same volume name under two primaries; while acting, the shadow is the source for syncing back.
        let b = c.for_primary(Some("b")).unwrap();
        assert_eq!(b.volumes[0].name, "data");
        assert_eq!(b.volumes[0].source.as_deref(), Some(Path::new("/dev/vg/b_data")));
        assert_eq!(b.protects.as_ref().unwrap().fallback, Fallback::Manual);
        let e = c.for_primary(None).unwrap_err().to_string();
        assert!(e.contains("several primaries (a, b)") && e.contains("--for NODE"), "{e}");
        let e = c.for_primary(Some("z")).unwrap_err().to_string();
        assert!(e.contains("z is not a primary of this standby") && e.contains("a, b"), "{e}");
        for (text, needle) in [
            (format!("{base}{}{}", block("a", ""), block("a", "")), "node \"a\" is configured twice"),
            (format!("{base}{}", block("s", "")), "this node's own name"),
            (format!("{base}{}", block("a", "fallback = \"sometimes\"\n")), "primary.fallback (line 8)"),
            (format!("{base}{}[[volume]]\nname = \"v\"\nshadow = \"/x\"\n", block("a", "")), "top-level [[volume]]"),
            (format!("{base}{}source = \"/dev/vg/x\"\n", block("a", "")), "has only a `shadow` here"),
            (format!("node = \"s\"\n{}", block("a", "")), "[standby] listen"),
            (format!("{base}{}", block("a", "colour = 1\n")), "colour"),
            (format!("{base}{}", block("a", "fallback = \"automatic\"\n")), "needs the primary's `address`"),
        ] {
            let e = link::error_chain(&parse(&text).unwrap_err());
            assert!(e.contains(needle), "{needle}: {e}");
        }
        // A two-node pair's configuration has no --for, and still needs its key_file.
        let pair = parse("node = \"a\"\nkey_file = \"/k\"\n").unwrap();
        assert!(pair.for_primary(Some("x")).is_err() && pair.for_primary(None).is_ok());
        let e = link::error_chain(&parse("node = \"a\"\n").unwrap_err());
        assert!(e.contains("key_file"), "{e}");
    }

    #[test]
    fn encryption_is_none_or_aead() {
        let text = "node = \"a\"\nkey_file = \"/k\"\nencryption = \"aes\"\n";
        let e = Config::parse(text, Path::new("c.toml")).unwrap_err().to_string();
        assert!(e.contains("encryption (line 3)") && e.contains("\"none\" or \"aead\""), "{e}");
        let c = Config::parse("node = \"a\"\nkey_file = \"/k\"\nencryption = \"aead\"\n", Path::new("c.toml")).unwrap();
        assert_eq!(c.encryption, netproto::Encryption::Aead);
        let c = Config::parse("node = \"a\"\nkey_file = \"/k\"\n", Path::new("c.toml")).unwrap();
        assert_eq!(c.encryption, netproto::Encryption::None, "the default stays the MAC'd stream");
    }

    #[test]
    fn unknown_and_missing_keys_name_the_key_and_line() {
        let text = "node = \"a\"\nkey_file = \"/k\"\ncolour = \"red\"\n";
        let e = link::error_chain(&Config::parse(text, Path::new("c.toml")).unwrap_err());
        assert!(e.contains("colour") && e.contains("line 3"), "{e}");
        let e = link::error_chain(&Config::parse("node = \"a\"\n", Path::new("c.toml")).unwrap_err());
        assert!(e.contains("key_file"), "{e}");
        let text = "node = \"a\"\nkey_file = \"/k\"\n[[volume]]\nname = \"v\"\nsource = \"/x\"\nsnapshot = \"zfs\"\n";
        let e = link::error_chain(&Config::parse(text, Path::new("c.toml")).unwrap_err());
        assert!(e.contains("zfs"), "{e}");
    }

    #[test]
    fn schedule_and_monitoring() {
        let text = "node = \"a\"\nkey_file = \"/k\"\n[schedule]\non_calendar = \"daily 22:00\"\nretry_count = 3\n\
                    retry_interval = \"5m\"\n[monitoring]\nmax_data_age = \"26h\"\n";
        let c = Config::parse(text, Path::new("c.toml")).unwrap();
        assert_eq!(c.schedule.on_calendar.as_deref(), Some("*-*-* 22:00:00"));
        assert_eq!(c.schedule.retry_count, 3);
        assert_eq!(c.schedule.retry_interval, std::time::Duration::from_secs(300));
        assert_eq!(c.monitoring.max_data_age, Some(std::time::Duration::from_secs(26 * 3600)));
        let text = "node = \"a\"\nkey_file = \"/k\"\n[schedule]\nretry_interval = \"5 parsecs\"\n";
        let e = link::error_chain(&Config::parse(text, Path::new("c.toml")).unwrap_err());
        assert!(e.contains("schedule.retry_interval") && e.contains("line 4"), "{e}");
        let text = "node = \"a\"\nkey_file = \"/k\"\n[schedule]\nretries = 3\n";
        let e = link::error_chain(&Config::parse(text, Path::new("c.toml")).unwrap_err());
        assert!(e.contains("retries") && e.contains("line 4"), "{e}");
    }
}
