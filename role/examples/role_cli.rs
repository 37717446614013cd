//! A small driver of the role manager for the namespace tests and for trying it by hand (the real CLI is
//! `blockrep`). Run as root, inside the network namespace to act on:
//!
//! ```text
//! role_cli --config FILE promote [--force] [--dry-run] [--reason R] [--crash-after STEP] [--json]
//! role_cli --config FILE demote  [--dry-run] [--poweroff] [--reason R] [--crash-after STEP] [--json]
//! role_cli --config FILE status  [--json]
//! role_cli --config FILE mark-synced           # what serve does after the first full sync
//! role_cli --config FILE announce [COUNT]      # gratuitous ARP / unsolicited NA for every VIP only
//! role_cli --config FILE probe                 # ARP probe / IPv6 DAD only: prints `VIP MAC` per VIP held elsewhere
//! role_cli --config FILE refresh               # periodic re-announcement while primary (garp.refresh_s)
//! ```
//!
//! The config file holds a `[role]` table. `--crash-after STEP` aborts the process right after the journal
//! records STEP (fault injection).
//!
//! Exit codes are the `blockrep` binary's (`cli/src/exit.rs`), of which this driver can produce: 0 ok, 1 failed,
//! 2 usage or configuration error, 4 refused as unsafe. It has no peer, so never 3 (peer unreachable) or 5
//! (refused by the peer).

use std::process::ExitCode;
use std::time::{Duration, Instant};

use link::error_chain;

/// The operation failed (the binary's `FAILED`).
const FAILED: u8 = 1;
/// Usage or configuration error (the binary's `USAGE`).
const USAGE: u8 = 2;
/// Refused because it is unsafe (the binary's `UNSAFE`).
const UNSAFE: u8 = 4;

fn usage(msg: &str) -> ExitCode {
    eprintln!(
        "role_cli: {msg}\nusage: role_cli --config FILE promote|demote|status|mark-synced|announce|probe [options]"
    );
    ExitCode::from(USAGE)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (mut config, mut cmd, mut reason, mut crash_after) = (None, None, String::from("manual"), None);
    let (mut force, mut dry_run, mut json, mut poweroff, mut rest) = (false, false, false, false, Vec::new());
    let mut it = args.into_iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--config" => config = it.next(),
            "--reason" => reason = it.next().unwrap_or_default(),
            "--crash-after" => crash_after = it.next(),
            "--force" => force = true,
            "--dry-run" => dry_run = true,
            "--json" => json = true,
            "--poweroff" => poweroff = true,
            _ if cmd.is_none() => cmd = Some(a),
            _ => rest.push(a),
        }
    }
    let Some(config) = config else { return usage("--config FILE is required") };
    let Some(cmd) = cmd else { return usage("a command is required") };
    let text = match std::fs::read_to_string(&config) {
        Ok(t) => t,
        Err(e) => return usage(&format!("cannot read {config}: {e}")),
    };
    let cfg = match role::Config::from_toml(&text) {
        Ok(c) => c,
        Err(e) => return usage(&error_chain(&e)),
    };
    let crash = move |step: &str| {
        if crash_after.as_deref() == Some(step) {
            eprintln!("role_cli: injected crash after step {step}");
            std::process::abort();
        }
    };
    let opts = role::Options { force, dry_run, reason, poweroff, after_step: Some(&crash), ..Default::default() };
    let t = Instant::now();
    let result = match cmd.as_str() {
        "promote" => role::promote(&cfg, &role::NoGuards, &opts),
        "demote" => role::demote(&cfg, &opts),
        "status" => {
            return match role::status(&cfg.state_dir) {
                Ok(s) if json => {
                    println!("{}", serde_json::to_string(&s).expect("status serializes"));
                    ExitCode::SUCCESS
                }
                Ok(s) => {
                    println!("role: {}\naccepts syncs: {}", s.role, s.accepts_syncs);
                    if let Some(p) = &s.plan {
                        println!("{} in progress, done: {}", p.kind, p.done.join(", "));
                        if let Some(f) = &p.failed {
                            println!("stopped at {}: {}", f.step, f.error);
                        }
                    }
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("role_cli: {}", error_chain(&e));
                    ExitCode::from(FAILED)
                }
            };
        }
        "mark-synced" => {
            return match role::mark_first_full_sync(&cfg.state_dir) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("role_cli: {}", error_chain(&e));
                    ExitCode::from(FAILED)
                }
            };
        }
        "announce" => {
            let n = rest.first().and_then(|n| n.parse().ok()).unwrap_or(cfg.garp.count);
            let r = role::arp::announce_all(&cfg, n);
            return match r {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("role_cli: {}", error_chain(&e));
                    ExitCode::from(FAILED)
                }
            };
        }
        "refresh" => {
            let stop = std::sync::atomic::AtomicBool::new(false);
            return match role::arp::refresh(&cfg, &stop) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("role_cli: {}", error_chain(&e));
                    ExitCode::from(FAILED)
                }
            };
        }
        "probe" => {
            let p = &cfg.probe;
            let (interval, wait) = (Duration::from_millis(p.interval_ms), Duration::from_millis(p.wait_ms));
            for v in &cfg.vip {
                let r = match v.addr {
                    std::net::IpAddr::V4(a) => {
                        role::arp::probe(&cfg.interface, a, p.count, interval, wait).map_err(|e| error_chain(&e))
                    }
                    std::net::IpAddr::V6(a) => {
                        role::ndp::probe(&cfg.interface, a, p.count, interval, wait).map_err(|e| error_chain(&e))
                    }
                };
                match r {
                    Ok(Some(mac)) => println!("{} {mac}", v.addr),
                    Ok(None) => {}
                    Err(e) => {
                        eprintln!("role_cli: {e}");
                        return ExitCode::from(FAILED);
                    }
                }
            }
            return ExitCode::SUCCESS;
        }
        other => return usage(&format!("unknown command `{other}`")),
    };
    match result {
        Ok(report) => {
            if json {
                println!("{}", serde_json::to_string(&report).expect("report serializes"));
            } else {
                println!("{report}");
            }
            eprintln!("role_cli: {cmd} took {:.1} ms", t.elapsed().as_secs_f64() * 1000.0);
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("role_cli: {}", error_chain(&e));
            ExitCode::from(if e.refused_as_unsafe() { UNSAFE } else { FAILED })
        }
    }
}
