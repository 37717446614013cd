//! The `blockrep` binary: parses the command line, runs one command, maps its outcome to an exit code.
//!
//! Exit codes (also in `blockrep --help` and docs/ARCHITECTURE.md):
//! 0 success; 1 the operation failed; 2 usage or configuration error; 3 the peer is unreachable;
//! 4 refused because it is unsafe (stale data, peer still active); 5 refused by the peer (wrong key, version).

mod args;
mod config;
mod demo;
mod exit;
mod local;
mod netsync;
mod report;
mod role_glue;
mod serve;
mod shadow;
mod snapshot;

use clap::Parser;

fn main() {
    let cli = args::Cli::parse();
    init_logging(cli.verbose);
    let outcome = match cli.command {
        args::Command::Demo(a) => demo::run(&a),
        args::Command::Sync(a) if !a.local.is_empty() => local::sync(&a),
        args::Command::Sync(a) => sync(&cli.config, &a),
        args::Command::Verify(a) => local::verify(&a),
        args::Command::Serve(a) => {
            config::Config::load(&cli.config).and_then(|c| serve::run(c, a.listen, a.announce, a.io.options()))
        }
        args::Command::Keygen(a) => keygen(&a),
        args::Command::Status(a) => {
            config::Config::load(&cli.config).and_then(|c| role_glue::status(&c, a.json, Default::default()))
        }
        args::Command::Promote(a) => plan(&cli.config, "promote", &a),
        args::Command::Demote(a) => plan(&cli.config, "demote", &a),
        args::Command::Switchover(a) => plan(&cli.config, "switchover", &a),
        args::Command::Announce => config::Config::load(&cli.config).and_then(|c| role_glue::announce(&c)),
        args::Command::Shadow(args::ShadowCommand::Create { volumes, size }) => {
            config::Config::load(&cli.config).and_then(|c| shadow::create(&c, &volumes, size))
        }
    };
    if let Err(err) = outcome {
        eprintln!("blockrep: error: {err:#}");
        std::process::exit(exit::code_for(&err));
    }
}

fn init_logging(verbose: u8) {
    let default = match verbose {
        0 => "warn",
        1 => "info",
        2 => "debug",
        _ => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("BLOCKREP_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_target(false).init();
}

fn keygen(a: &args::KeygenArgs) -> anyhow::Result<()> {
    netproto::generate_key(&a.path, a.force)
        .map_err(|e| exit::coded(exit::USAGE, format!("{:#}", anyhow::Error::from(e))))?;
    println!("wrote a new key to {} (mode 0600); copy it to the other node's key_file", a.path.display());
    Ok(())
}

/// `blockrep sync [VOLUME...]` over the network; every selected volume is tried, the first failure decides the
/// exit code.
fn sync(config: &std::path::Path, a: &args::SyncArgs) -> anyhow::Result<()> {
    let cfg = config::Config::load(config)?;
    let vols = cfg.select(&a.volumes)?;
    let cancel = snapshot::cancel_on_signals()?;
    let opts = netsync::NetSyncOptions {
        io: a.io.options(),
        bwlimit: a.bwlimit,
        refine: !a.no_refine,
        cancel: Some(cancel.clone()),
    };
    let total = vols.len();
    let mut failed: Vec<(String, anyhow::Error)> = Vec::new();
    for vol in vols {
        let r = snapshot::with_frozen_source(&cfg, vol, |source| netsync::sync_one(&cfg, vol, source, &opts));
        match r {
            Ok(r) => netsync::print(&r, a.json)?,
            // With several volumes, say each failure as it happens; the last line sums up.
            Err(e) if total > 1 => {
                eprintln!("blockrep: volume {}: {e:#}", vol.name);
                failed.push((vol.name.clone(), e));
            }
            Err(e) => failed.push((vol.name.clone(), e)),
        }
        if cancel.load(std::sync::atomic::Ordering::SeqCst) {
            break;
        }
    }
    match failed.len() {
        0 => Ok(()),
        1 if total == 1 => Err(failed.pop().expect("one").1),
        n => {
            let names = failed.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>().join(", ");
            let first = failed.remove(0).1;
            Err(first.context(format!("{n} of {total} volumes failed to sync ({names})")))
        }
    }
}

fn plan(config: &std::path::Path, which: &str, a: &args::PlanArgs) -> anyhow::Result<()> {
    let cfg = config::Config::load(config)?;
    let p = role_glue::PlanArgs {
        force: a.force,
        dry_run: a.dry_run,
        reason: a.reason.clone(),
        poweroff: a.poweroff,
        json: a.json,
    };
    role_glue::run_plan(&cfg, which, &p, Default::default())?;
    if which != "demote" && !a.dry_run {
        role_glue::spawn_announcer(config)?;
    }
    Ok(())
}
