//! Operations with real processes on 127.0.0.1: retries against a standby that comes up late, the sync lock,
//! replication disabled, cancel mid-sync, status JSON after success / failure / cancel, alarms raised and cleared
//! with the notify hook, the metrics file, `blockrep log`, and the timer rendered from `[schedule]`.

use std::io::{BufRead, BufReader};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use super::network::Pair;
use super::*;

/// The primary's configuration (peer: the running standby, or `peer`).
fn primary_cfg(p: &Pair, peer: &str) -> std::path::PathBuf {
    p.config("primary", &p.path("key"), peer)
}

fn status_json(cfg: &std::path::Path) -> (i32, serde_json::Value) {
    let o = run(blockrep().args(["status", "--json", "--config"]).arg(cfg));
    let v = serde_json::from_str(stdout(&o).trim()).unwrap_or_else(|e| panic!("{e}: {} {}", stdout(&o), stderr(&o)));
    (o.status.code().unwrap(), v)
}

fn alarm_keys(v: &serde_json::Value) -> Vec<String> {
    v["alarms"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| match a["volume"].as_str() {
            Some(vol) => format!("{}/{vol}", a["kind"].as_str().unwrap()),
            None => a["kind"].as_str().unwrap().to_owned(),
        })
        .collect()
}

fn free_port() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().to_string()
}

fn spawn_sync(cfg: &std::path::Path, extra: &[&str]) -> Child {
    blockrep()
        .args(["sync", "--json"])
        .args(extra)
        .arg("--config")
        .arg(cfg)
        .env("BLOCKREP_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let end = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < end, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn retries_reach_a_standby_that_comes_up_late() {
    let mut p = Pair::new(1 << 20);
    p.extra = "[schedule]\non_calendar = \"daily 22:00\"\nretry_count = 3\nretry_interval = \"1s\"\n".into();
    let addr = free_port();
    let mut sync = spawn_sync(&primary_cfg(&p, &addr), &[]);
    // Wait for the first failed attempt, then start the standby on the address the primary keeps trying.
    let mut err = BufReader::new(sync.stderr.take().unwrap());
    let mut seen = String::new();
    loop {
        let mut line = String::new();
        assert!(err.read_line(&mut line).unwrap() > 0, "sync ended before retrying: {seen}");
        seen.push_str(&line);
        if line.contains("retrying") {
            break;
        }
    }
    p.start_serve_on(&addr);
    let o = sync.wait_with_output().unwrap();
    assert!(o.status.success(), "sync after retry failed: {seen}");
    assert!(p.identical());
    let log = stdout(&run(blockrep().args(["log", "--json", "--config"]).arg(primary_cfg(&p, &addr))));
    let sync_ok =
        log.lines().map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()).find(|e| e["event"] == "sync");
    let e = sync_ok.expect("a sync event");
    assert_eq!(e["outcome"], "ok");
    assert!(e["attempt"].as_u64().unwrap() >= 2, "{e}");
}

#[test]
fn replication_disabled_syncs_nothing_and_says_so() {
    let mut p = Pair::new(1 << 20);
    p.start_serve();
    let cfg = primary_cfg(&p, &p.addr);
    assert!(run(blockrep().args(["replication", "disable", "--config"]).arg(&cfg)).status.success());
    let o = p.sync();
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).trim().is_empty(), "{}", stdout(&o));
    assert!(stderr(&o).contains("replication is disabled"), "{}", stderr(&o));
    assert!(std::fs::read(p.path("shadow.img")).unwrap().iter().all(|&b| b == 0), "nothing may be sent");
    let (_, st) = status_json(&cfg);
    assert_eq!(st["replication_enabled"], false);
    assert!(run(blockrep().args(["replication", "enable", "--config"]).arg(&cfg)).status.success());
    p.sync_ok();
    assert!(p.identical());
    let log = stdout(&run(blockrep().args(["log", "--config"]).arg(&cfg)));
    for what in ["replication disabled", "sync skipped", "replication enabled", "sync vol: ok"] {
        assert!(log.contains(what), "{what} missing from the log:\n{log}");
    }
}

#[test]
fn the_lock_names_its_holder_and_cancel_keeps_the_previous_generation() {
    let mut p = Pair::new(4 << 20);
    p.start_serve();
    let cfg = primary_cfg(&p, &p.addr);
    p.sync_ok();
    let before = std::fs::read(p.path("src.img")).unwrap();
    scribble(&p.path("src.img"), &(0..1024).collect::<Vec<_>>(), 9);
    let slow = spawn_sync(&cfg, &["--bwlimit", "512K"]);
    let pid = slow.id();
    wait_for("the lock", Duration::from_secs(10), || status_json(&cfg).1["running"]["pid"] == pid);
    let (_, st) = status_json(&cfg);
    assert_eq!(st["state"], "replication_running");

    let second = p.sync();
    assert_eq!(second.status.code(), Some(1), "{}", stderr(&second));
    assert!(stderr(&second).contains(&format!("process {pid} holds")), "{}", stderr(&second));

    let c = run(blockrep().args(["cancel", "--config"]).arg(&cfg));
    assert!(c.status.success(), "{}", stderr(&c));
    let o = slow.wait_with_output().unwrap();
    assert!(!o.status.success(), "a cancelled sync must not report success");
    assert_eq!(std::fs::read(p.path("shadow.img")).unwrap(), before, "the standby keeps generation 1");
    let (_, st) = status_json(&cfg);
    assert_eq!(st["state"], "cancelled", "{st}");
    assert_eq!(st["volumes"][0]["last_outcome"], "cancelled");
    assert_eq!(st["volumes"][0]["last_success"]["generation"], 1);
    let again = run(blockrep().args(["cancel", "--config"]).arg(&cfg));
    assert_eq!(again.status.code(), Some(1), "nothing to cancel");
}

#[test]
fn status_alarms_notify_metrics_and_log() {
    let mut p = Pair::new(1 << 20);
    let hook = p.path("notify.log");
    let metrics = p.path("blockrep.prom");
    p.extra = format!(
        "[monitoring]\nmax_data_age = \"1h\"\nmetrics_file = {metrics:?}\n\
         [role]\ninterface = \"lo\"\nvip = \"10.77.8.50/24\"\n\
         notify = [\"echo $BLOCKREP_EVENT $BLOCKREP_ALARM >> {}\"]\n\
         [role.services]\nprimary_only = [{{ hook = \"true\" }}]\n",
        hook.display()
    );
    p.start_serve();
    let cfg = primary_cfg(&p, &p.addr);
    // Success: state ok, no alarm, exit 0; the metrics file parses.
    p.sync_ok();
    let (code, st) = status_json(&cfg);
    assert_eq!(code, 0, "{st}");
    assert_eq!(st["state"], "ok");
    assert_eq!(st["replication_enabled"], true);
    assert_eq!(st["volumes"][0]["last_success"]["generation"], 1);
    assert_eq!(st["peer"]["reachable"], true, "{st}");
    assert_eq!(st["peer"]["role"], "standby");
    assert_eq!(st["services"][0]["runs_on"], "primary_only");
    assert_eq!(st["services"][0]["state"], "unknown", "a hook cannot be asked: {st}");
    let text = std::fs::read_to_string(&metrics).unwrap();
    let n = node::metrics::check_text_format(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
    assert!(n >= 10, "{text}");
    assert!(text.contains("blockrep_generation{node=\"primary\",volume=\"vol\"} 1"), "{text}");

    // Failure: the standby is down. Sync failed + standby unreachable raised, hook called, exit 1.
    p.stop_serve();
    let o = run(blockrep().args(["sync", "--config"]).arg(&cfg));
    assert_eq!(o.status.code(), Some(3), "{}", stderr(&o));
    let (code, st) = status_json(&cfg);
    assert_eq!(code, 1, "{st}");
    assert_eq!(st["state"], "replication_failed");
    assert!(st["volumes"][0]["last_failure"]["cause"].as_str().unwrap().contains("127.0.0.1"), "{st}");
    assert_eq!(st["peer"]["reachable"], false);
    let mut keys = alarm_keys(&st);
    keys.sort();
    assert_eq!(keys, ["standby_unreachable", "sync_failed/vol"]);
    let m = std::fs::read_to_string(&metrics).unwrap();
    node::metrics::check_text_format(&m).unwrap();
    assert!(m.contains("blockrep_alarm{node=\"primary\",alarm=\"sync_failed\",volume=\"vol\"} 1"), "{m}");

    // Data too old: the last success is made two hours old.
    let rec = p.path("state-primary/primary/vol/last_sync.json");
    let mut r: serde_json::Value = serde_json::from_slice(&std::fs::read(&rec).unwrap()).unwrap();
    r["last_success"]["time"] = (node::history::now() - 7200).into();
    std::fs::write(&rec, serde_json::to_vec(&r).unwrap()).unwrap();
    let (_, st) = status_json(&cfg);
    assert!(alarm_keys(&st).contains(&"data_too_old/vol".to_owned()), "{st}");

    // The standby is back: one sync clears all three.
    p.start_serve();
    let cfg = primary_cfg(&p, &p.addr);
    p.sync_ok();
    let (code, st) = status_json(&cfg);
    assert_eq!(code, 0, "{st}");
    assert!(alarm_keys(&st).is_empty(), "{st}");
    let calls = std::fs::read_to_string(&hook).unwrap();
    for line in [
        "alarm-raised sync_failed/vol",
        "alarm-raised standby_unreachable",
        "alarm-raised data_too_old/vol",
        "alarm-cleared sync_failed/vol",
        "alarm-cleared standby_unreachable",
        "alarm-cleared data_too_old/vol",
    ] {
        assert_eq!(calls.lines().filter(|l| *l == line).count(), 1, "{line} once in:\n{calls}");
    }
    let log = stdout(&run(blockrep().args(["log", "--config"]).arg(&cfg)));
    for what in
        ["sync vol: ok", "sync vol: failed", "alarm raised sync_failed/vol", "alarm cleared standby_unreachable"]
    {
        assert!(log.contains(what), "{what} missing from the log:\n{log}");
    }
    let later = (node::history::now() + 3600).to_string();
    let since = run(blockrep().args(["log", "--json", "--since", &later, "--config"]).arg(&cfg));
    assert!(since.status.success() && stdout(&since).is_empty(), "--since filters: {}", stdout(&since));
    let hour = stdout(&run(blockrep().args(["log", "--json", "--since", "1h", "--config"]).arg(&cfg)));
    assert_eq!(hour.lines().count(), log.lines().count());
}

#[test]
fn the_timer_is_rendered_from_the_schedule() {
    let mut p = Pair::new(4096);
    p.extra = "[schedule]\non_calendar = \"Mon..Fri 23:15\"\nretry_count = 2\nretry_interval = \"5m\"\n".into();
    let cfg = primary_cfg(&p, "127.0.0.1:1");
    let o = run(blockrep().args(["schedule", "--print-timer", "--config"]).arg(&cfg));
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("OnCalendar=Mon..Fri *-*-* 23:15:00\n"), "{}", stdout(&o));
    let o = run(blockrep().args(["schedule", "--print-service", "--exe", "/opt/bin/blockrep", "--config"]).arg(&cfg));
    assert!(stdout(&o).contains("ExecStart=/opt/bin/blockrep --config "), "{}", stdout(&o));
    p.extra = "[schedule]\nretry_count = 2\nretry_interval = \"soon\"\n".into();
    let cfg = primary_cfg(&p, "127.0.0.1:1");
    let o = run(blockrep().args(["schedule", "--print-timer", "--config"]).arg(&cfg));
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("schedule.retry_interval (line"), "{}", stderr(&o));
}

#[test]
fn serve_rewrites_the_metrics_file_periodically() {
    let p = Pair::new(1 << 20);
    let metrics = p.path("standby.prom");
    // Only the standby's configuration names this file: the primary's run writes none.
    let standby_cfg = p.config("standby", &p.path("key"), "127.0.0.1:1");
    let text = std::fs::read_to_string(&standby_cfg).unwrap()
        + &format!("[monitoring]\nmetrics_file = {metrics:?}\nmetrics_interval = \"1s\"\n");
    std::fs::write(&standby_cfg, text).unwrap();
    let mut child = blockrep()
        .args(["serve", "--announce", "--listen", "127.0.0.1:0", "--config"])
        .arg(&standby_cfg)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let addr = line.trim().strip_prefix("listening on ").unwrap().to_owned();
    let o = run(blockrep().args(["sync", "--config"]).arg(primary_cfg(&p, &addr)));
    assert!(o.status.success(), "{}", stderr(&o));
    let want = "blockrep_generation{node=\"standby\",volume=\"vol\"} 1";
    wait_for("the standby's metrics", Duration::from_secs(5), || {
        std::fs::read_to_string(&metrics).is_ok_and(|t| t.contains(want))
    });
    node::metrics::check_text_format(&std::fs::read_to_string(&metrics).unwrap()).unwrap();
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn log_format_json_prints_one_object_per_event() {
    let p = Pair::new(4096);
    let o = run(blockrep().args(["--log-format", "json", "sync", "--config"]).arg(primary_cfg(&p, "127.0.0.1:1")));
    assert_eq!(o.status.code(), Some(3));
    let events: Vec<serde_json::Value> = stderr(&o)
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    assert!(events.iter().any(|e| e["level"] == "ERROR" && e["fields"]["alarm"] == "sync_failed/vol"), "{events:?}");
}

#[test]
fn an_untrusted_shadow_raises_an_alarm_until_a_sync_compares_it() {
    let mut p = Pair::new(1 << 20);
    let hook = p.path("notify.log");
    p.extra = format!(
        "[role]\ninterface = \"lo\"\nvip = \"10.77.8.50/24\"\nnotify = [\"echo $BLOCKREP_EVENT $BLOCKREP_ALARM >> {}\"]\n",
        hook.display()
    );
    p.start_serve();
    p.sync_ok();
    let standby = p.config("standby", &p.path("key"), "127.0.0.1:1");
    assert_eq!(status_json(&standby).0, 0);
    // Someone writes to the shadow behind blockrep's back.
    scribble(&p.path("shadow.img"), &[3], 1);
    let (code, st) = status_json(&standby);
    assert_eq!(code, 1, "{st}");
    assert_eq!(alarm_keys(&st), ["shadow_untrusted/vol"]);
    p.sync_ok();
    assert!(p.identical());
    let (code, st) = status_json(&standby);
    assert_eq!(code, 0, "{st}");
    let calls = std::fs::read_to_string(&hook).unwrap();
    assert_eq!(calls, "alarm-raised shadow_untrusted/vol\nalarm-cleared shadow_untrusted/vol\n");
}
