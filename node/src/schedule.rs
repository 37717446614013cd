//! When and how persistently the primary syncs: the `[schedule]` section (systemd `OnCalendar`, retry count and
//! interval), the systemd units rendered from it (`blockrep schedule --print-timer | --print-service`), which
//! failures are worth retrying, and the switch that turns replication off (`blockrep replication
//! disable|enable`, a file in the state directory).
//!
//! Accepted `on_calendar` forms (docs/config.md):
//!
//! * `daily HH:MM[:SS]` → `*-*-* HH:MM:SS`;
//! * `WEEKDAYS HH:MM[:SS]` with `WEEKDAYS` like `Mon..Fri` or `Sat,Sun` → `Mon..Fri *-*-* HH:MM:SS`;
//! * `HH:MM[:SS]` alone → every day at that time;
//! * anything else is passed to systemd verbatim (`hourly`, `*-*-* 00/4:00:00`, ...); `--print-timer` checks it
//!   with `systemd-analyze calendar` when that tool exists.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::config::Config;
use crate::{Error, ErrorKind};

/// The file whose presence means replication is disabled (`<state_dir>/replication-disabled`).
const DISABLED_FILE: &str = "replication-disabled";

/// The `[schedule]` section, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Schedule {
    /// The systemd `OnCalendar` expression the timer uses (normalised, see the module docs).
    pub on_calendar: Option<String>,
    /// How many times a failed sync worth retrying is tried again.
    pub retry_count: u32,
    /// The pause before each retry.
    pub retry_interval: Duration,
}

impl Default for Schedule {
    fn default() -> Self {
        Schedule { on_calendar: None, retry_count: 0, retry_interval: Duration::from_secs(300) }
    }
}

/// Errors of the schedule commands and of the replication switch.
#[derive(Debug, thiserror::Error)]
pub enum ScheduleError {
    /// No `on_calendar` in the configuration.
    #[error("configuration {} has no [schedule] on_calendar (for example on_calendar = \"daily 22:00\")", path.display())]
    NoCalendar {
        /// The configuration file.
        path: PathBuf,
    },
    /// systemd does not accept the calendar expression.
    #[error("[schedule] on_calendar {expr:?} is not accepted by systemd-analyze calendar: {stderr}")]
    BadCalendar {
        /// The expression.
        expr: String,
        /// What systemd-analyze said.
        stderr: String,
    },
    /// The switch file could not be written or removed.
    #[error("cannot record the replication switch in {}", path.display())]
    Switch {
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

impl ScheduleError {
    /// The kind of this error.
    pub fn kind(&self) -> ErrorKind {
        match self {
            ScheduleError::NoCalendar { .. } | ScheduleError::BadCalendar { .. } => ErrorKind::Usage,
            ScheduleError::Switch { .. } => ErrorKind::Failed,
        }
    }
}

/// Parses durations like `30s`, `5m`, `2h`, `1d`, `1h30m` or plain seconds (`90`).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    let bad = || format!("{s:?} is not a duration (examples: 30s, 5m, 2h, 1d, 1h30m)");
    if t.is_empty() {
        return Err(bad());
    }
    if let Ok(n) = t.parse::<u64>() {
        return Ok(Duration::from_secs(n));
    }
    let (mut total, mut num) = (0u64, String::new());
    for c in t.chars() {
        if c.is_ascii_digit() {
            num.push(c);
            continue;
        }
        let mult = match c {
            's' => 1,
            'm' => 60,
            'h' => 3600,
            'd' => 86400,
            _ => return Err(bad()),
        };
        let n: u64 = num.parse().map_err(|_| bad())?;
        total = n.checked_mul(mult).and_then(|v| total.checked_add(v)).ok_or_else(bad)?;
        num.clear();
    }
    if !num.is_empty() {
        return Err(bad());
    }
    Ok(Duration::from_secs(total))
}

/// `5m`-style rendering of a duration (for logs and units).
pub fn format_duration(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0 => "0s".into(),
        s if s % 86400 == 0 => format!("{}d", s / 86400),
        s if s % 3600 == 0 => format!("{}h", s / 3600),
        s if s % 60 == 0 => format!("{}m", s / 60),
        s => format!("{s}s"),
    }
}

fn is_time(t: &str) -> Option<String> {
    let parts: Vec<&str> = t.split(':').collect();
    let ok = (2..=3).contains(&parts.len())
        && parts.iter().all(|p| (1..=2).contains(&p.len()) && p.chars().all(|c| c.is_ascii_digit()));
    if !ok {
        return None;
    }
    let n: Vec<u32> = parts.iter().map(|p| p.parse().unwrap_or(99)).collect();
    if n[0] > 23 || n[1] > 59 || n.get(2).is_some_and(|&s| s > 59) {
        return None;
    }
    Some(format!("{:02}:{:02}:{:02}", n[0], n[1], n.get(2).copied().unwrap_or(0)))
}

fn is_weekdays(t: &str) -> bool {
    const DAYS: [&str; 7] = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"];
    t.split(',').all(|r| {
        r.split("..").all(|d| {
            let d = d.to_ascii_lowercase();
            DAYS.iter().any(|day| d.len() >= 3 && day.starts_with(&d[..3]) && d.len() <= 9)
        })
    })
}

/// Normalises an `on_calendar` value (see the module docs); an empty value or one with a line break is refused.
pub fn normalize_calendar(s: &str) -> Result<String, String> {
    let t = s.trim();
    if t.is_empty() || t.contains(['\n', '\r']) {
        return Err(format!("{s:?} is not a calendar expression (examples: \"daily 22:00\", \"Mon..Fri 23:15\")"));
    }
    let words: Vec<&str> = t.split_whitespace().collect();
    Ok(match words.as_slice() {
        [time] => match is_time(time) {
            Some(hms) => format!("*-*-* {hms}"),
            None => t.to_owned(),
        },
        [day, time] if day.eq_ignore_ascii_case("daily") && is_time(time).is_some() => {
            format!("*-*-* {}", is_time(time).unwrap_or_default())
        }
        [days, time] if is_weekdays(days) && is_time(time).is_some() => {
            format!("{days} *-*-* {}", is_time(time).unwrap_or_default())
        }
        _ => words.join(" "),
    })
}

/// The systemd timer unit for the configured schedule (`blockrep-sync.timer`); the calendar expression is
/// checked with `systemd-analyze calendar` when that tool exists.
pub fn render_timer(cfg: &Config) -> Result<String, Error> {
    let cal = cfg.schedule.on_calendar.clone().ok_or(ScheduleError::NoCalendar { path: cfg.path.clone() })?;
    if let Some(tool) = ["/usr/bin/systemd-analyze", "/bin/systemd-analyze"].iter().find(|p| Path::new(p).exists()) {
        if let Ok(o) = std::process::Command::new(tool).args(["calendar", &cal]).output() {
            if !o.status.success() {
                let stderr = String::from_utf8_lossy(&o.stderr).trim().to_owned();
                return Err(ScheduleError::BadCalendar { expr: cal, stderr }.into());
            }
        }
    }
    Ok(format!(
        "# Rendered by `blockrep schedule --print-timer` from [schedule] in {}\n\
         [Unit]\nDescription=Run blockrep sync on the configured schedule ({cal})\n\n\
         [Timer]\nOnCalendar={cal}\nPersistent=true\n\n\
         [Install]\nWantedBy=timers.target\n",
        cfg.path.display()
    ))
}

/// The systemd service unit the timer starts (`blockrep-sync.service`), running `exe`.
pub fn render_service(cfg: &Config, exe: &Path) -> String {
    let s = &cfg.schedule;
    format!(
        "# Rendered by `blockrep schedule --print-service` from {}\n\
         [Unit]\nDescription=blockrep sync of all configured volumes to the standby\n\
         After=network-online.target\nWants=network-online.target\n\n\
         [Service]\nType=oneshot\nExecStart={} --config {} sync\n\
         # The sync retries by itself ({} time(s), every {}); SIGTERM (also `blockrep cancel`) stops it at the\n\
         # next consistent point, removes the snapshot, and the standby keeps its generation.\n\
         TimeoutStopSec=120\n",
        cfg.path.display(),
        exe.display(),
        cfg.path.display(),
        s.retry_count,
        format_duration(s.retry_interval),
    )
}

/// Whether a failed sync is worth trying again: the peer unreachable, or a transport failure (connection lost,
/// timeout); not a usage error, a refusal or an unsafe state.
pub fn worth_retrying(e: &Error) -> bool {
    use crate::primary::PrimaryError;
    fn conn_transient(c: &netproto::ConnError) -> bool {
        use netproto::ConnError as C;
        matches!(
            c,
            C::Unreachable { .. }
                | C::Io { .. }
                | C::Socket(_)
                | C::Timeout { .. }
                | C::ClosedMidFrame { .. }
                | C::Closed { .. }
        )
    }
    fn link_transient(l: &link::LinkError) -> bool {
        match l {
            link::LinkError::Transport(t) => t.downcast_ref::<netproto::ConnError>().is_none_or(conn_transient),
            link::LinkError::Remote { kind: link::RemoteKind::Busy, .. } => true,
            _ => false,
        }
    }
    match e {
        Error::Primary(p) => match &**p {
            PrimaryError::Connect(c) => conn_transient(c),
            PrimaryError::OpenRemote { source, .. } => link_transient(source),
            PrimaryError::Sync { source: engine::sync::SyncError::Link(l), .. } => link_transient(l),
            _ => false,
        },
        _ => e.kind() == ErrorKind::PeerUnreachable,
    }
}

/// Sleeps `d` unless `cancel` is set meanwhile; true when the whole pause passed.
pub fn pause(d: Duration, cancel: &std::sync::atomic::AtomicBool) -> bool {
    let end = std::time::Instant::now() + d;
    while std::time::Instant::now() < end {
        if cancel.load(std::sync::atomic::Ordering::SeqCst) {
            return false;
        }
        std::thread::sleep((end - std::time::Instant::now()).min(Duration::from_millis(100)));
    }
    !cancel.load(std::sync::atomic::Ordering::SeqCst)
}

/// After one volume's sync (its last attempt): the per-volume record for status and metrics (returned), and the
/// history.
pub fn after_volume(
    cfg: &Config,
    volume: &str,
    result: &Result<crate::primary::NetReport, Error>,
    cancelled: bool,
    attempt: u32,
) -> crate::status::SyncRecord {
    let record = crate::status::record_outcome(cfg, volume, result, cancelled);
    let event = match result {
        Ok(r) => crate::history::Event::Sync {
            volume: volume.to_owned(),
            outcome: "ok".into(),
            generation: Some(r.sync.generation),
            duration_s: r.sync.duration_s,
            bytes_sent: r.sync.bytes_sent,
            attempt,
            error: None,
        },
        Err(e) => crate::history::Event::Sync {
            volume: volume.to_owned(),
            outcome: if cancelled { "cancelled" } else { "failed" }.into(),
            generation: None,
            duration_s: 0.0,
            bytes_sent: 0,
            attempt,
            error: Some(crate::error_chain(e)),
        },
    };
    crate::history::append(cfg, event);
    record
}

/// After a sync run: the alarms it judges (sync failed, standby unreachable, snapshot full), then the metrics.
pub fn after_run(cfg: &Config, outcomes: &[crate::primary::VolumeOutcome], cancelled: bool) {
    use crate::alarms::{AlarmKind, Judgement};
    let mut j = Vec::new();
    let (mut unreachable, mut reached) = (None, false);
    for o in outcomes {
        let v = Some(o.volume.as_str());
        match &o.result {
            Ok(_) => {
                reached = true;
                j.push(Judgement::clear(AlarmKind::SyncFailed, v));
            }
            Err(_) if cancelled => {}
            Err(e) => {
                let msg = crate::error_chain(e);
                if e.kind() == ErrorKind::PeerUnreachable {
                    unreachable = Some(msg.clone());
                } else if !matches!(e.kind(), ErrorKind::Usage) {
                    reached = true;
                }
                j.push(Judgement::raise(
                    AlarmKind::SyncFailed,
                    v,
                    format!("sync of volume {} failed: {msg}", o.volume),
                ));
            }
        }
    }
    match unreachable {
        Some(msg) => j.push(Judgement::raise(AlarmKind::StandbyUnreachable, None, msg)),
        None if reached => j.push(Judgement::clear(AlarmKind::StandbyUnreachable, None)),
        None => {}
    }
    crate::alarms::update(cfg, &j);
    crate::metrics::refresh(cfg);
}

/// A snapshot filled to this percent during a sync raises [`crate::alarms::AlarmKind::SnapshotFull`].
pub const SNAPSHOT_ALARM_PERCENT: f64 = 80.0;

/// Successful syncs in a row of a tracked volume that scanned in full unasked before `tracking_lost` is raised:
/// one is normal (the first tracked sync, the first after a demote or a failed sync), three are a tracker that
/// keeps failing.
pub const TRACKING_ALARM_SYNCS: u32 = 3;

/// Whether a tracked volume's full scan was asked for (`full_scan_every`, or a sync that compares every block on
/// request), rather than forced by a tracker that could not be used.
pub fn fallback_was_asked_for(reason: &str) -> bool {
    reason.starts_with(crate::freeze::PERIODIC_FULL_SCAN) || reason.starts_with(crate::freeze::COMPARES_EVERY_BLOCK)
}

/// After a successful sync of a volume, with the record [`after_volume`] wrote: `tracking_lost` raised when it is
/// the [`TRACKING_ALARM_SYNCS`]th or later in a row to scan a tracked volume in full unasked, cleared when the
/// tracker's changes were used (or the volume is not tracked). A failed sync, and a full scan that was asked for
/// (which proves nothing about the tracker, and is not why it failed), judge nothing.
pub fn tracking_judgement(
    volume: &str,
    result: &Result<crate::primary::NetReport, Error>,
    record: &crate::status::SyncRecord,
) -> Vec<crate::alarms::Judgement> {
    use crate::alarms::{AlarmKind, Judgement};
    let Ok(r) = result else { return Vec::new() };
    let n = record.tracker_fallbacks;
    let v = Some(volume);
    match &r.sync.fallback_reason {
        Some(why) if n >= TRACKING_ALARM_SYNCS && !fallback_was_asked_for(why) => vec![Judgement::raise(
            AlarmKind::TrackingLost,
            v,
            format!(
                "volume {volume} is tracked, but its last {n} syncs read the whole volume: the tracker could not be \
                 used ({why}); see docs/config.md, \"Tracked changes\""
            ),
        )],
        Some(_) => Vec::new(),
        None => vec![Judgement::clear(AlarmKind::TrackingLost, v)],
    }
}

/// The snapshot alarm of one volume's sync: raised when the snapshot overflowed (the sync failed for it) or was
/// at least [`SNAPSHOT_ALARM_PERCENT`] full at its end; cleared by a sync whose snapshot stayed below; nothing
/// judged otherwise (no snapshot, or another failure).
pub fn snapshot_judgement(
    volume: &str,
    result: &Result<crate::primary::NetReport, Error>,
    fill: Option<f64>,
) -> Vec<crate::alarms::Judgement> {
    use crate::alarms::{AlarmKind, Judgement};
    let v = Some(volume);
    match (result, fill) {
        (Err(e @ Error::Freeze(f)), _) if matches!(**f, crate::freeze::FreezeError::Overflowed { .. }) => {
            vec![Judgement::raise(AlarmKind::SnapshotFull, v, crate::error_chain(e))]
        }
        (_, Some(p)) if p >= SNAPSHOT_ALARM_PERCENT => vec![Judgement::raise(
            AlarmKind::SnapshotFull,
            v,
            format!(
                "the snapshot of volume {volume} was {p:.0} % full at the end of the sync; set a larger \
                 snapshot_size before it overflows (the sync would then fail)"
            ),
        )],
        (Ok(_), Some(_)) => vec![Judgement::clear(AlarmKind::SnapshotFull, v)],
        _ => Vec::new(),
    }
}

/// The switch file of a configuration.
fn switch_file(cfg: &Config) -> PathBuf {
    cfg.state_dir.join(DISABLED_FILE)
}

/// Whether replication is enabled (the default); when disabled, `sync` does nothing.
pub fn replication_enabled(cfg: &Config) -> bool {
    !switch_file(cfg).exists()
}

/// `blockrep replication enable|disable`: records the switch in the state directory and in the history.
pub fn set_replication(cfg: &Config, enabled: bool) -> Result<(), Error> {
    let path = switch_file(cfg);
    let r = if enabled {
        match std::fs::remove_file(&path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            r => r,
        }
    } else {
        std::fs::create_dir_all(&cfg.state_dir).and_then(|()| std::fs::write(&path, crate::history::now().to_string()))
    };
    r.map_err(|source| ScheduleError::Switch { path, source })?;
    let what = if enabled { "enabled" } else { "disabled" };
    tracing::info!("replication {what}");
    crate::history::append(cfg, crate::history::Event::Replication { enabled });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("90"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("1h30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration("1d"), Ok(Duration::from_secs(86400)));
        assert!(parse_duration("5x").is_err());
        assert!(parse_duration("m").is_err());
        assert!(parse_duration("").is_err());
        assert_eq!(format_duration(Duration::from_secs(300)), "5m");
    }

    #[test]
    fn tracking_lost_names_the_tracker_failure_not_a_requested_full_scan() {
        let synced = |fallback: Option<&str>| -> Result<crate::primary::NetReport, Error> {
            Ok(crate::primary::NetReport {
                sync: engine::sync::SyncReport {
                    volume: "v".into(),
                    generation: 4,
                    mode: engine::sync::SyncMode::Incremental,
                    reason: String::new(),
                    standby_bytes_overwritten: None,
                    tracker: "full scan".into(),
                    fallback_reason: fallback.map(str::to_owned),
                    bytes_scanned: 0,
                    blocks_changed: 0,
                    bytes_changed: 0,
                    bytes_sent: 0,
                    zero_bytes: 0,
                    resumed_bytes: 0,
                    root: String::new(),
                    duration_s: 0.0,
                },
                bytes_on_wire: 0,
                compression_ratio: 1.0,
            })
        };
        let record = |n| crate::status::SyncRecord { tracker_fallbacks: n, ..Default::default() };
        let lost = "no tracker: vg0/v_blockrep_base is missing";
        assert!(tracking_judgement("v", &synced(Some(lost)), &record(2)).is_empty(), "two are not yet an alarm");
        let j = tracking_judgement("v", &synced(Some(lost)), &record(3));
        assert!(j[0].raised.as_deref().unwrap().contains(lost), "{j:?}");
        // A periodic full scan after three failures keeps the count and says nothing: the alarm keeps its reason.
        let periodic =
            format!("{} (full_scan_every = 7, 6 tracked syncs since the last one)", crate::freeze::PERIODIC_FULL_SCAN);
        assert!(tracking_judgement("v", &synced(Some(&periodic)), &record(3)).is_empty());
        let j = tracking_judgement("v", &synced(None), &record(0));
        assert_eq!((j[0].kind, j[0].raised.as_deref()), (crate::alarms::AlarmKind::TrackingLost, None));
    }

    #[test]
    fn snapshot_alarm_from_the_fill_level() {
        let failed: Result<crate::primary::NetReport, Error> =
            Err(crate::config::ConfigError::Invalid { path: "c".into(), message: "x".into() }.into());
        assert!(snapshot_judgement("v", &failed, None).is_empty());
        let j = snapshot_judgement("v", &failed, Some(91.0));
        assert!(j[0].raised.as_deref().unwrap().contains("91 % full"), "{j:?}");
        assert!(snapshot_judgement("v", &failed, Some(10.0)).is_empty(), "only a success clears it");
    }

    #[test]
    fn calendars() {
        assert_eq!(normalize_calendar("daily 22:00").unwrap(), "*-*-* 22:00:00");
        assert_eq!(normalize_calendar("Mon..Fri 23:15").unwrap(), "Mon..Fri *-*-* 23:15:00");
        assert_eq!(normalize_calendar("Sat,Sun 7:05").unwrap(), "Sat,Sun *-*-* 07:05:00");
        assert_eq!(normalize_calendar("22:00").unwrap(), "*-*-* 22:00:00");
        assert_eq!(normalize_calendar("hourly").unwrap(), "hourly");
        assert_eq!(normalize_calendar("*-*-* 00/4:00:00").unwrap(), "*-*-* 00/4:00:00");
        assert!(normalize_calendar("").is_err());
        assert!(normalize_calendar("daily\nExecStart=x").is_err());
    }
}
