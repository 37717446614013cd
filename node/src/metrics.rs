//! Prometheus metrics as a text file for node_exporter's textfile collector (`[monitoring] metrics_file`, for
//! example `/var/lib/prometheus/node-exporter/blockrep.prom`), written atomically (temporary file in the same
//! directory, then rename) after each sync run and every `metrics_interval` by `serve`.
//!
//! Metrics (labels `node`, `volume`, `alarm`; on a standby protecting several primaries also `primary`, since two
//! primaries may both have a volume called `data`):
//! `blockrep_sync_duration_seconds`, `blockrep_sync_bytes_scanned`, `blockrep_sync_bytes_changed`,
//! `blockrep_sync_bytes_sent` (of the last successful sync), `blockrep_generation`,
//! `blockrep_last_success_timestamp_seconds`, `blockrep_data_age_seconds`, `blockrep_last_sync_failed`,
//! `blockrep_replication_enabled`, `blockrep_sync_running`, `blockrep_alarm` (1 raised, 0 not, per kind).

use std::fmt::Write;

use crate::alarms::AlarmKind;
use crate::config::Config;
use crate::status::{NodeStatus, Outcome};

/// Escapes a label value.
fn label(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

/// Renders a status as Prometheus text exposition format.
pub fn render(s: &NodeStatus) -> String {
    let mut out = String::new();
    let node = label(&s.node);
    let mut family = |name: &str, kind: &str, help: &str, samples: Vec<(String, f64)>| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for (labels, v) in samples {
            let _ = writeln!(out, "{name}{{node=\"{node}\"{labels}}} {v}");
        }
    };
    // Every volume with the labels that name it: a standby protecting several primaries has no volumes of its
    // own, each primary's are labelled with it.
    let primary = |p: Option<&str>| p.map(|p| format!(",primary=\"{}\"", label(p))).unwrap_or_default();
    let volumes: Vec<(String, &crate::status::VolumeStatus)> = s
        .volumes
        .iter()
        .map(|v| (String::new(), v))
        .chain(s.primaries.iter().flat_map(|p| p.status.volumes.iter().map(move |v| (primary(Some(&p.node)), v))))
        .map(|(p, v)| (format!("{p},volume=\"{}\"", label(&v.name)), v))
        .collect();
    let per_volume = |f: &dyn Fn(&crate::status::VolumeStatus) -> Option<f64>| -> Vec<(String, f64)> {
        volumes.iter().filter_map(|(labels, v)| f(v).map(|x| (labels.clone(), x))).collect()
    };
    let last = |f: fn(&crate::status::LastSuccess) -> f64| {
        per_volume(&|v: &crate::status::VolumeStatus| v.record.last_success.as_ref().map(f))
    };
    family(
        "blockrep_replication_enabled",
        "gauge",
        "1 if replication is enabled.",
        vec![(String::new(), f64::from(u8::from(s.replication_enabled)))],
    );
    family(
        "blockrep_sync_running",
        "gauge",
        "1 while a sync runs.",
        vec![(String::new(), f64::from(u8::from(s.running.is_some())))],
    );
    family("blockrep_sync_duration_seconds", "gauge", "Duration of the last successful sync.", last(|l| l.duration_s));
    family(
        "blockrep_sync_bytes_scanned",
        "gauge",
        "Bytes read by the last successful sync.",
        last(|l| l.bytes_scanned as f64),
    );
    family(
        "blockrep_sync_bytes_changed",
        "gauge",
        "Bytes changed in the last successful sync.",
        last(|l| l.bytes_changed as f64),
    );
    family(
        "blockrep_sync_bytes_sent",
        "gauge",
        "Data bytes sent by the last successful sync.",
        last(|l| l.bytes_sent as f64),
    );
    family(
        "blockrep_last_success_timestamp_seconds",
        "gauge",
        "Unix time of the last successful sync.",
        last(|l| l.time as f64),
    );
    family("blockrep_generation", "gauge", "Last committed generation.", per_volume(&|v| Some(v.generation as f64)));
    family(
        "blockrep_data_age_seconds",
        "gauge",
        "Age of the standby's data.",
        per_volume(&|v| v.data_age_s.map(|a| a as f64)),
    );
    family(
        "blockrep_last_sync_failed",
        "gauge",
        "1 if the last sync failed, 0 otherwise.",
        per_volume(&|v| v.record.last_outcome.map(|o| f64::from(u8::from(o == Outcome::Failed)))),
    );
    let mut alarms = Vec::new();
    for kind in AlarmKind::ALL {
        let raised: Vec<_> = s.alarms.iter().filter(|a| a.kind == kind).collect();
        if raised.is_empty() {
            alarms.push((format!(",alarm=\"{}\"", kind.as_str()), 0.0));
        }
        for a in raised {
            let vol = a.volume.as_deref().map(|v| format!(",volume=\"{}\"", label(v))).unwrap_or_default();
            alarms.push((format!(",alarm=\"{}\"{}{vol}", kind.as_str(), primary(a.primary.as_deref())), 1.0));
        }
    }
    family("blockrep_alarm", "gauge", "1 while an alarm is raised.", alarms);
    out
}

/// Writes the metrics file if one is configured (best effort: a warning when it cannot be written).
pub fn write(cfg: &Config, s: &NodeStatus) {
    let Some(path) = &cfg.monitoring.metrics_file else { return };
    if let Err(e) = crate::status::write_atomic(path, render(s).as_bytes()) {
        tracing::warn!(path = %path.display(), error = %e, "cannot write the metrics file");
    }
}

/// Reads the local status (no peer, no services) and writes the metrics file, if one is configured.
pub fn refresh(cfg: &Config) {
    if cfg.monitoring.metrics_file.is_none() {
        return;
    }
    let o = crate::status::StatusOptions::default();
    match crate::status::status_with(cfg, o) {
        Ok(s) => write(cfg, &s),
        Err(e) => tracing::warn!(error = %crate::error_chain(&e), "cannot read the status for the metrics"),
    }
}

/// `serve`'s periodic refresh (every `metrics_interval`), when a metrics file is configured; call from the
/// runtime. The shadows are not opened (sessions may hold them): the generation comes from the manifests.
pub fn spawn_periodic(cfg: &Config) -> Option<tokio::task::JoinHandle<()>> {
    cfg.monitoring.metrics_file.as_ref()?;
    let cfg = cfg.clone();
    Some(tokio::spawn(async move {
        loop {
            let c = cfg.clone();
            let _ = tokio::task::spawn_blocking(move || refresh(&c)).await;
            tokio::time::sleep(cfg.monitoring.metrics_interval).await;
        }
    }))
}

/// Checks that `text` is Prometheus text exposition format (for tests): every sample line is
/// `name{label="value",...} number`, every family has `# HELP` and `# TYPE` before its samples, and no series
/// (name and labels) appears twice (a scraper refuses the whole file then).
pub fn check_text_format(text: &str) -> Result<usize, String> {
    let mut typed = std::collections::HashSet::new();
    let mut series = std::collections::HashSet::new();
    let mut samples = 0;
    let is_name = |n: &str| {
        !n.is_empty()
            && n.chars().next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
            && n.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
    };
    for (i, line) in text.lines().enumerate() {
        let err = |m: &str| Err(format!("line {}: {m}: {line:?}", i + 1));
        if line.is_empty() {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# ") {
            let mut w = rest.splitn(3, ' ');
            match (w.next(), w.next(), w.next()) {
                (Some("HELP"), Some(n), _) if is_name(n) => {}
                (Some("TYPE"), Some(n), Some("gauge" | "counter" | "untyped" | "summary" | "histogram"))
                    if is_name(n) =>
                {
                    if !typed.insert(n.to_owned()) {
                        return err("a second TYPE for one family");
                    }
                }
                _ => return err("bad comment"),
            }
            continue;
        }
        let (name, rest) = match line.find(['{', ' ']) {
            Some(p) => line.split_at(p),
            None => return err("no value"),
        };
        if !is_name(name) || !typed.contains(name) {
            return err("unknown or untyped metric name");
        }
        let value = if let Some(labels) = rest.strip_prefix('{') {
            let Some(end) = labels.rfind('}') else { return err("unclosed labels") };
            for pair in split_labels(&labels[..end]) {
                let Some((k, v)) = pair.split_once('=') else { return err("label without =") };
                if !(is_name(k) && v.len() >= 2 && v.starts_with('"') && v.ends_with('"')) {
                    return err("bad label");
                }
            }
            &labels[end + 1..]
        } else {
            rest
        };
        if !series.insert(&line[..line.len() - value.len()]) {
            return err("a series that appeared before");
        }
        let v = value.trim();
        if v.parse::<f64>().is_err() && !["NaN", "+Inf", "-Inf"].contains(&v) {
            return err("value is not a number");
        }
        samples += 1;
    }
    Ok(samples)
}

/// Splits `a="x",b="y,z"` at the commas outside quotes.
fn split_labels(s: &str) -> Vec<&str> {
    let (mut out, mut start, mut quoted, mut escaped) = (Vec::new(), 0, false, false);
    for (i, c) in s.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' => escaped = true,
            '"' => quoted = !quoted,
            ',' if !quoted => {
                out.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    if start < s.len() {
        out.push(&s[start..]);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_checker_accepts_good_text_and_refuses_bad() {
        let good = "# HELP m x\n# TYPE m gauge\nm{a=\"1,2\",b=\"q\\\"\"} 3\nm 4.5\n";
        assert_eq!(check_text_format(good), Ok(2));
        assert!(check_text_format("m 1\n").is_err());
        assert!(check_text_format("# TYPE m gauge\nm{a=1} 1\n").is_err());
        assert!(check_text_format("# TYPE m gauge\nm{a=\"1\"} x\n").is_err());
        assert!(check_text_format("# TYPE m gauge\nm{a=\"1\"} 1\nm{a=\"2\"} 1\nm{a=\"1\"} 2\n").is_err());
    }
}
