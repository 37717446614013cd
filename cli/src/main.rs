//! The `blockrep` binary: parses the command line, runs one command through the node library (crate `node`),
//! renders its result and maps its outcome to an exit code ([`exit::ExitCode`]).
//!
//! Exit codes (also in `blockrep --help` and docs/ARCHITECTURE.md):
//! 0 success; 1 the operation failed; 2 usage or configuration error; 3 the peer is unreachable;
//! 4 refused because it is unsafe (stale data, peer still active); 5 refused by the peer (wrong key, version).

mod args;
mod demo;
mod exit;
mod generate;
mod report;

use std::path::Path;

use anyhow::Result;
use clap::Parser;
use exit::ExitCode;
use node::config::Config;
use node::roles::{Plan, PlanOptions, Reconciled};

fn main() -> std::process::ExitCode {
    let cli = args::Cli::parse();
    init_logging(cli.verbose, cli.log_format);
    let code = match run(&cli) {
        Ok(()) => ExitCode::Ok,
        Err(err) => {
            eprintln!("blockrep: error: {err:#}");
            ExitCode::for_error(&err)
        }
    };
    std::process::ExitCode::from(code as u8)
}

fn run(cli: &args::Cli) -> Result<()> {
    let load = || Config::load(&cli.config).map_err(node::Error::from);
    // The configuration a command acts on: with [[primary]] blocks, the one of the primary named by --for.
    let load_for = || load().and_then(|c| c.for_primary(cli.for_primary.as_deref()).map_err(node::Error::from));
    match &cli.command {
        args::Command::Demo(a) => demo::run(a),
        args::Command::Sync(a) if !a.local.is_empty() => sync_local(a),
        args::Command::Sync(a) => sync(&load_for()?, a),
        args::Command::Verify(a) if a.local.is_some() => verify_local(a),
        args::Command::Verify(a) => Ok(node::verify::run(&load_for()?, &a.volumes, a.io.options(), &mut |o| {
            report::print_verify_outcome(o, a.json)
        })?),
        args::Command::Generations(a) => {
            let g = node::retain::generations(&load_for()?, a.volume.as_deref(), a.io.options())
                .map_err(node::Error::from)?;
            report::print_generations(&g, a.json);
            Ok(())
        }
        args::Command::Restore(a) => {
            let cfg = load_for()?;
            if let Some(why) = node::roles::refuses_syncs(&cfg) {
                return Err(node::Error::from(node::config::ConfigError::Invalid {
                    path: cfg.path.clone(),
                    message: format!("restore rolls back a shadow on the standby, but {why}"),
                })
                .into());
            }
            let r = node::retain::restore(&cfg, &a.volume, a.generation, a.force, a.io.options())
                .map_err(node::Error::from)?;
            report::print_restored(&r, a.json);
            Ok(())
        }
        args::Command::Serve(_) if cli.for_primary.is_some() => {
            Err(anyhow::Error::from(node::Error::from(node::config::ConfigError::Invalid {
                path: cli.config.clone(),
                message: "serve serves every primary of this standby: leave --for out".into(),
            })))
        }
        args::Command::Serve(a) => Ok(node::serve::run(load()?, a.listen, a.io.options(), |addr| {
            if a.announce {
                report::announce(addr)
            }
        })?),
        args::Command::Keygen(a) if a.rotate => {
            let (current, next) = node::generate_next_key(&a.path, a.force)?;
            let next_path = node::next_key_path(&a.path);
            println!(
                "wrote the next key {} to {} (mode 0600) beside the current key {} in {}; copy it to {} on the other \
                 node (mode 0600). Both keys are accepted meanwhile; the first session in which the peer proves the \
                 new key makes it the current key on each node (`blockrep status` shows the rotation)",
                next,
                next_path.display(),
                current,
                a.path.display(),
                next_path.display()
            );
            Ok(())
        }
        args::Command::Keygen(a) => {
            node::generate_key(&a.path, a.force)?;
            println!("wrote a new key to {} (mode 0600); copy it to the other node's key_file", a.path.display());
            Ok(())
        }
        args::Command::Status(a) => status(&cli.config, cli.for_primary.as_deref(), a),
        args::Command::Promote(a) => plan(cli, Plan::Promote, a),
        args::Command::Demote(a) => plan(cli, Plan::Demote, a),
        args::Command::Switchover(a) => plan(cli, Plan::Switchover, a),
        args::Command::Reconcile(a) => reconcile(cli, a),
        args::Command::Lock(a) => {
            report::print_locked(&node::maint_lock::lock(&load()?, &a.node, &a.reason)?, a.json);
            Ok(())
        }
        args::Command::Unlock(a) => {
            report::print_unlocked(&node::maint_lock::unlock(&load()?, &a.node)?, a.json);
            Ok(())
        }
        args::Command::Announce => Ok(node::roles::announce(&load_for()?)?),
        args::Command::Shadow(args::ShadowCommand::Create { volumes, size }) => {
            Ok(node::shadow::create(&load_for()?, volumes, *size, &mut |s| println!("{s}"))?)
        }
        args::Command::Deconfigure(a) => {
            let opts = node::deconfigure::DeconfigureOptions { delete_shadows: a.delete_shadows };
            Ok(node::deconfigure::run(&load()?, opts, &mut |s| println!("{s}"))?)
        }
        args::Command::Generate(g) => generate::run(g),
        args::Command::Schedule(a) if a.print_service => {
            let exe = match &a.exe {
                Some(p) => p.clone(),
                None => std::env::current_exe()?,
            };
            print!("{}", node::schedule::render_service(&load()?, &exe));
            Ok(())
        }
        args::Command::Schedule(_) => {
            print!("{}", node::schedule::render_timer(&load()?)?);
            Ok(())
        }
        args::Command::Replication { switch } => {
            let on = *switch == args::ReplicationSwitch::Enable;
            node::schedule::set_replication(&load()?, on)?;
            println!("replication {}", if on { "enabled" } else { "disabled: syncs do nothing until enabled" });
            Ok(())
        }
        args::Command::Cancel => {
            let h = node::lock::cancel(&load_for()?)?;
            println!("sent SIGTERM to the sync (process {}, running since {} unix)", h.pid, h.since);
            Ok(())
        }
        args::Command::Log(a) => {
            let cfg = if cli.for_primary.is_some() { load_for()? } else { load()? };
            report::print_log(&node::history::read(&cfg, a.since.unwrap_or(0)), a.json);
            Ok(())
        }
    }
}

fn init_logging(verbose: u8, format: args::LogFormat) {
    let default = ["warn", "info", "debug", "trace"][usize::from(verbose.min(3))];
    let filter = tracing_subscriber::EnvFilter::try_from_env("BLOCKREP_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    use std::io::IsTerminal;
    let ansi = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    let fmt = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi);
    match format {
        args::LogFormat::Text => fmt.with_target(false).init(),
        args::LogFormat::Json => fmt.json().with_current_span(false).init(),
    }
}

/// `blockrep status`: exit 0 without alarm, 1 with an alarm raised, 2 when the configuration cannot be used
/// (with --json, still one object saying so).
fn status(config: &Path, for_primary: Option<&str>, a: &args::StatusArgs) -> Result<()> {
    let as_json = a.json;
    let cfg = Config::load(config).and_then(|c| match for_primary {
        Some(_) => c.for_primary(for_primary),
        None => Ok(c),
    });
    if a.role {
        println!("{}", node::status::role_only(&cfg.map_err(node::Error::from)?)?);
        return Ok(());
    }
    let s = cfg.map_err(node::Error::from).and_then(|c| node::status::status(&c, Default::default()));
    let s = match s {
        Ok(s) => s,
        Err(e) if as_json && e.kind() == node::ErrorKind::Usage => {
            let state = node::status::ReplicationState::ConfigurationFailed;
            println!("{}", serde_json::json!({ "state": state, "error": node::error_chain(&e) }));
            return Err(e.into());
        }
        Err(e) => return Err(e.into()),
    };
    report::print_status(&s, as_json);
    match s.alarms.len() {
        0 => Ok(()),
        n => Err(anyhow::anyhow!("{n} alarm(s) raised")),
    }
}

/// `blockrep sync [VOLUME...]` over the network; every selected volume is tried, the first failure decides the
/// exit code.
fn sync(cfg: &Config, a: &args::SyncArgs) -> Result<()> {
    let opts = node::primary::NetSyncOptions {
        io: a.io.options(),
        bwlimit: a.bwlimit,
        no_refine: a.no_refine,
        cancel: None,
        choice: mode_choice(a),
    };
    let mut out = report::SyncOutput { as_json: a.json, bar: None };
    node::primary::sync_volumes(cfg, &a.volumes, &opts, &mut out)?.into_result()?;
    Ok(())
}

/// `sync --verify` and `--discard-standby-changes`.
fn mode_choice(a: &args::SyncArgs) -> node::local::ModeChoice {
    node::local::ModeChoice { verify: a.verify, discard_standby_changes: a.discard_standby_changes }
}

/// `blockrep sync --local SOURCE TARGET`.
fn sync_local(a: &args::SyncArgs) -> Result<()> {
    let [source, target] = a.local.as_slice() else { unreachable!("clap takes two values for --local") };
    let s = node::local::LocalSync {
        name: node::layout::volume_name(a.name.as_deref(), source).map_err(node::Error::from)?,
        source: source.clone(),
        target: target.clone(),
        state_dir: a.state_dir.clone(),
        io: a.io.options(),
        block_size: a.block_size,
        no_refine: a.no_refine,
    };
    let bar = report::progress_bar(&s.name);
    let r = s.run_with(mode_choice(a), &mut |d, t| report::update(&bar, d, t));
    bar.finish_and_clear();
    report::print_sync(&r?, a.json);
    Ok(())
}

/// `blockrep verify --local TARGET`.
fn verify_local(a: &args::VerifyArgs) -> Result<()> {
    let local = a.local.as_deref().expect("called with --local");
    let name = node::layout::volume_name(a.name.as_deref(), local).map_err(node::Error::from)?;
    let state_dir = a.state_dir.as_deref().unwrap_or(Path::new("/var/lib/blockrep"));
    let v = node::local::verify(local, state_dir, &name, a.io.options())?;
    node::history::append_at(state_dir, node::history::Event::Verify { volume: name, ok: v.ok });
    report::print_verify(&v, a.json);
    Ok(v.into_result()?)
}

/// `blockrep reconcile`: re-assert a primary nobody replaced, demote one that was replaced. On a standby of several
/// primaries without `--for`: each of them (the boot unit runs it so).
fn reconcile(cli: &args::Cli, a: &args::ReconcileArgs) -> Result<()> {
    let top = Config::load(&cli.config).map_err(node::Error::from)?;
    let units: Vec<Option<String>> = match (&cli.for_primary, top.primaries.is_empty()) {
        (None, false) => top.primary_names().into_iter().map(|n| Some(n.to_owned())).collect(),
        (p, _) => vec![p.clone()],
    };
    let mut first_error = None;
    for p in units {
        let cfg = top.for_primary(p.as_deref()).map_err(node::Error::from)?;
        let r = match node::roles::reconcile(&cfg, &a.reason, Default::default()) {
            Ok(r) => r,
            Err(e) if p.is_some() && cli.for_primary.is_none() => {
                eprintln!("blockrep: [for {}] {}", p.as_deref().unwrap_or_default(), node::error_chain(&e));
                first_error.get_or_insert(e);
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        let (plan, reason) = match &r {
            Reconciled::NoRole | Reconciled::NotPrimary(_) => (None, String::new()),
            Reconciled::Reasserted(_) => (Some("re-assert"), a.reason.clone()),
            Reconciled::Demoted { why, .. } => (Some("demote"), format!("{}: another node serves ({why})", a.reason)),
        };
        if let Some(plan) = plan {
            node::history::append(&cfg, node::history::Event::Switchover { plan: plan.into(), reason });
        }
        report::print_reconciled(p.as_deref(), &r, a.json);
        if matches!(r, Reconciled::Reasserted(_)) {
            announce_in_background(&cli.config, p.as_deref())?;
        }
    }
    match first_error {
        Some(e) => Err(e.into()),
        None => Ok(()),
    }
}

/// `blockrep promote | demote | switchover`; after a promote, re-announce the virtual IP in the background.
fn plan(cli: &args::Cli, plan: Plan, a: &args::PlanArgs) -> Result<()> {
    let config = cli.config.as_path();
    let top = Config::load(config).map_err(node::Error::from)?;
    let cfg = top.for_primary(cli.for_primary.as_deref()).map_err(node::Error::from)?;
    // Several primaries: one takeover at a time, by priority when several start together.
    let _claim = match plan {
        Plan::Promote | Plan::Switchover => node::protect::claim_takeover(&top, &cfg, a.force, a.dry_run)
            .map_err(node::Error::from)
            .inspect_err(|e| {
                let reason = node::error_chain(e);
                node::history::append(&cfg, node::history::Event::TakeoverRefused { reason });
            })?,
        Plan::Demote => node::protect::Claim::none(),
    };
    let usage =
        |message: String| node::Error::from(node::config::ConfigError::Invalid { path: cfg.path.clone(), message });
    if plan != Plan::Promote && !a.generations.is_empty() {
        return Err(usage(
            "--generation is for promote (on the standby); `blockrep restore` rolls a shadow back without promoting"
                .into(),
        )
        .into());
    }
    let generations = node::roles::parse_generations(&cfg, &a.generations).map_err(usage)?;
    let opts =
        PlanOptions { force: a.force, dry_run: a.dry_run, reason: a.reason.clone(), poweroff: a.poweroff, generations };
    let report = node::roles::run(&cfg, plan, &opts, Default::default());
    if !top.primaries.is_empty() && !a.dry_run {
        // Acting for one primary may leave the others unprotected (keep_protecting): raise or clear at once.
        node::alarms::update(&top, &node::protect::judge_unprotected(&top));
    }
    let report = report?;
    if !a.dry_run {
        // A promote of a node that already is primary changed no role: the history says what it did.
        let plan = if report.reasserted() { "re-assert".to_owned() } else { format!("{plan:?}").to_lowercase() };
        node::history::append(&cfg, node::history::Event::Switchover { plan, reason: a.reason.clone() });
    }
    report::print_plan(&report, a.json);
    if plan != Plan::Demote && !a.dry_run {
        announce_in_background(config, cli.for_primary.as_deref())?;
    }
    Ok(())
}

/// Starts `blockrep announce` (the periodic re-announcement of the virtual IP) in the background, after a promote.
fn announce_in_background(config: &Path, for_primary: Option<&str>) -> Result<()> {
    let exe = std::env::current_exe().map_err(|e| anyhow::anyhow!("cannot find the blockrep executable: {e}"))?;
    Ok(node::roles::spawn_announcer(&exe, config, for_primary)?)
}
