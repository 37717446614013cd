//! Command-line arguments (clap derive; the doc comments are the help text).

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};
use node::config::parse_size;

/// blockrep: block-level replication of LVM volumes to a standby server.
///
/// Exit codes: 0 success, 1 failed, 2 usage or configuration error, 3 peer unreachable, 4 refused as unsafe,
/// 5 refused by the peer (key or protocol version).
#[derive(Debug, Parser)]
#[command(version, about, long_about)]
pub struct Cli {
    /// Configuration file (before or after the command).
    #[arg(long, global = true, default_value = node::config::DEFAULT_PATH)]
    pub config: PathBuf,
    /// More log output on stderr (-v info, -vv debug); BLOCKREP_LOG overrides.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,
    /// Log format on stderr: text, or one JSON object per line (for log collectors).
    #[arg(long, value_enum, default_value_t, global = true)]
    pub log_format: LogFormat,
    /// On a standby protecting several primaries (`[[primary]]` blocks): the primary the command acts on
    /// (`promote --for pbx-a` takes over pbx-a only). `status`, `log`, `lock` and `serve` cover every primary
    /// without it.
    #[arg(long = "for", value_name = "NODE", global = true)]
    pub for_primary: Option<String>,
    /// The command.
    #[command(subcommand)]
    pub command: Command,
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Default)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per event.
    Json,
}

/// Commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Replicate a file-backed volume to a shadow in a temporary directory and verify it: the first thing to run.
    Demo(DemoArgs),
    /// Sync volumes to their shadows (`--local SOURCE TARGET` in one process).
    Sync(SyncArgs),
    /// Standby: check that each shadow equals its last committed generation (re-hashes it). Primary: make the
    /// next sync a compare sync.
    Verify(VerifyArgs),
    /// Standby: list each shadow's generations: the current one and those kept by `keep_generations`.
    Generations(GenerationsArgs),
    /// Standby: roll a shadow back to a retained generation without promoting it (the generation it holds now is
    /// kept; the primary's next sync compares and overwrites the rollback unless replication is disabled).
    Restore(RestoreArgs),
    /// Run the standby daemon: receive syncs into the configured shadow volumes.
    Serve(ServeArgs),
    /// Write a new random 256-bit key file (mode 0600) to share between the two nodes.
    Keygen(KeygenArgs),
    /// Show this node's role, last switchover and the generation of every volume.
    Status(StatusArgs),
    /// Make this standby the primary: guards, virtual IP, gratuitous ARP, services, boot target.
    Promote(PlanArgs),
    /// Make this primary a standby again (reverse plan); --poweroff also powers it off.
    Demote(PlanArgs),
    /// With both nodes reachable: demote the peer, then promote this node.
    Switchover(PlanArgs),
    /// After a reboot (contrib/systemd/blockrep-reconcile.service) or a cluster engine's restart: a primary that
    /// nobody replaced re-asserts its virtual IP; a primary another node replaced (it holds the address or says
    /// it is primary) demotes; a standby does nothing.
    Reconcile(ReconcileArgs),
    /// Set a maintenance lock for NODE (this node or its peer) on this node: every promote and switchover
    /// involving it is refused here (exit 4; --force does not override it) until `blockrep unlock NODE`. Set it
    /// on the standby (the node that would take over): a lock is not sent to the peer.
    Lock(LockArgs),
    /// Remove the maintenance lock for NODE on this node.
    Unlock(UnlockArgs),
    /// Re-announce the virtual IP (gratuitous ARP) every `garp.refresh_interval_s` for `garp.refresh_s` while
    /// this node is primary; `promote` starts it in the background.
    Announce,
    /// Manage the standby's shadow volumes.
    #[command(subcommand)]
    Shadow(ShadowCommand),
    /// Print the systemd units rendered from `[schedule]` (for the install step).
    Schedule(ScheduleArgs),
    /// Turn replication on or off on this node (recorded in the state directory; `sync` does nothing while off).
    Replication {
        /// enable or disable.
        #[arg(value_enum)]
        switch: ReplicationSwitch,
    },
    /// Stop the running sync at the next consistent point (SIGTERM to the process holding the sync lock); the
    /// standby keeps its previous generation.
    Cancel,
    /// List what happened on this node: syncs, verifies, switchovers, alarms.
    Log(LogArgs),
    /// Return this node to standalone: stop replication, remove blockrep's leftover snapshots and its state
    /// (shadows are kept unless --delete-shadows).
    Deconfigure(DeconfigureArgs),
    /// Write man pages or shell completions generated from these definitions (used by scripts/install.sh).
    #[command(subcommand, hide = true)]
    Generate(GenerateCommand),
}

/// `blockrep deconfigure`.
#[derive(Debug, Args)]
pub struct DeconfigureArgs {
    /// Also delete the shadows: file shadows are deleted, LV shadows removed only when tagged blockrep_shadow.
    #[arg(long)]
    pub delete_shadows: bool,
}

/// `blockrep generate ...`.
#[derive(Debug, Subcommand)]
pub enum GenerateCommand {
    /// Man pages (blockrep.1 and one per subcommand) into DIR.
    Man {
        /// Output directory (created if missing).
        dir: PathBuf,
    },
    /// The completion script for SHELL into DIR.
    Completions {
        /// bash, zsh, fish, elvish or powershell.
        shell: clap_complete::Shell,
        /// Output directory (created if missing).
        dir: PathBuf,
    },
}

/// `blockrep replication enable|disable`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ReplicationSwitch {
    /// Syncs run.
    Enable,
    /// Syncs do nothing (exit 0, logged) until enabled again.
    Disable,
}

/// `blockrep schedule`.
#[derive(Debug, Args)]
pub struct ScheduleArgs {
    /// The timer unit (blockrep-sync.timer), OnCalendar from `[schedule] on_calendar`.
    #[arg(long, required_unless_present = "print_service")]
    pub print_timer: bool,
    /// The service unit (blockrep-sync.service) the timer starts.
    #[arg(long, conflicts_with = "print_timer")]
    pub print_service: bool,
    /// With --print-service: the blockrep binary the unit runs (default: this one).
    #[arg(long)]
    pub exe: Option<PathBuf>,
}

/// `blockrep log`.
#[derive(Debug, Args)]
pub struct LogArgs {
    /// One JSON object per line.
    #[arg(long)]
    pub json: bool,
    /// Only events since then: Unix seconds, or an age like 2h or 7d.
    #[arg(long, value_parser = node::history::parse_since)]
    pub since: Option<u64>,
}

/// `blockrep shadow ...`.
#[derive(Debug, Subcommand)]
pub enum ShadowCommand {
    /// Create the shadows of the named or all volumes (LVs tagged blockrep_shadow, or sparse files), with
    /// --size, else the volume's `size` in the configuration, else the size the primary reported.
    Create {
        /// Volumes (default: all).
        volumes: Vec<String>,
        /// Size in bytes (K, M, G suffixes) instead of the configured or reported size.
        #[arg(long, value_parser = parse_size)]
        size: Option<u64>,
    },
}

/// `blockrep serve`.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Listen here instead of the configured `[standby] listen` (port 0 picks a free port).
    #[arg(long)]
    pub listen: Option<std::net::SocketAddr>,
    /// Print `listening on ADDR` on stdout once bound (for scripts and tests).
    #[arg(long)]
    pub announce: bool,
    /// I/O options for the shadows.
    #[command(flatten)]
    pub io: IoArgs,
}

/// `blockrep status`.
#[derive(Debug, Args)]
pub struct StatusArgs {
    /// One JSON object.
    #[arg(long)]
    pub json: bool,
    /// Print only this node's role (standby, promoting, primary, demoting) from its state directory, asking
    /// nothing else (cheap enough for a cluster engine's check every few seconds).
    #[arg(long, conflicts_with = "json")]
    pub role: bool,
}

/// `blockrep promote`, `demote`, `switchover`.
#[derive(Debug, Args)]
pub struct PlanArgs {
    /// Skip the safety guards (stale data, peer still active, virtual IP answered).
    #[arg(long)]
    pub force: bool,
    /// Print the plan and change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Reason, recorded in the state and passed to notify hooks.
    #[arg(long, default_value = "operator request")]
    pub reason: String,
    /// (demote) Power the machine off and keep the primary-only services disabled.
    #[arg(long)]
    pub poweroff: bool,
    /// (promote) Promote a retained generation: the shadow is rolled back to it first (`N` when one volume has
    /// a shadow here, else `VOLUME=N`; repeatable). `blockrep generations` lists them.
    #[arg(long = "generation", value_name = "[VOLUME=]N")]
    pub generations: Vec<String>,
    /// One JSON object.
    #[arg(long)]
    pub json: bool,
}

/// `blockrep reconcile`.
#[derive(Debug, Args)]
pub struct ReconcileArgs {
    /// Reason, recorded in the history and passed to notify hooks.
    #[arg(long, default_value = "reconcile")]
    pub reason: String,
    /// One JSON object.
    #[arg(long)]
    pub json: bool,
}

/// `blockrep lock`.
#[derive(Debug, Args)]
pub struct LockArgs {
    /// The node to lock: this node's name or its peer's.
    pub node: String,
    /// Why, shown in status and in every refusal.
    #[arg(long, default_value = "maintenance")]
    pub reason: String,
    /// One JSON object.
    #[arg(long)]
    pub json: bool,
}

/// `blockrep unlock`.
#[derive(Debug, Args)]
pub struct UnlockArgs {
    /// The node to unlock.
    pub node: String,
    /// One JSON object.
    #[arg(long)]
    pub json: bool,
}

/// `blockrep generations`.
#[derive(Debug, Args)]
pub struct GenerationsArgs {
    /// Only this volume.
    pub volume: Option<String>,
    /// One JSON object per volume.
    #[arg(long)]
    pub json: bool,
    /// I/O options.
    #[command(flatten)]
    pub io: IoArgs,
}

/// `blockrep restore`.
#[derive(Debug, Args)]
pub struct RestoreArgs {
    /// The retained generation to roll back to (`blockrep generations` lists them).
    #[arg(long)]
    pub generation: u64,
    /// The volume.
    pub volume: String,
    /// Accept a copy kept while the shadow was not trusted.
    #[arg(long)]
    pub force: bool,
    /// One JSON object.
    #[arg(long)]
    pub json: bool,
    /// I/O options.
    #[command(flatten)]
    pub io: IoArgs,
}

/// `blockrep keygen`.
#[derive(Debug, Args)]
pub struct KeygenArgs {
    /// Where to write the key (the node's key_file; with --rotate, the existing key file the next key goes beside).
    pub path: PathBuf,
    /// Overwrite an existing key file (with --rotate: an existing next key).
    #[arg(long)]
    pub force: bool,
    /// Start a key rotation: write a new key to PATH.next (mode 0600) beside the current key; copy it to the other
    /// node's PATH.next. Both keys are accepted until each node has seen its peer prove the new one, which then
    /// replaces PATH (docs/config.md, "Key rotation").
    #[arg(long)]
    pub rotate: bool,
}

/// I/O engine choice.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Default)]
pub enum IoEngineArg {
    /// io_uring when the kernel allows it, else synchronous reads.
    #[default]
    Auto,
    /// io_uring (fails if unavailable).
    Uring,
    /// Plain pread/pwrite.
    Sync,
}

/// Options shared by commands that read or write volumes.
#[derive(Debug, Clone, Args)]
pub struct IoArgs {
    /// I/O engine. `auto` also hashes page-cached regular files straight from a memory map; an explicit engine
    /// reads everything through that engine.
    #[arg(long, value_enum, default_value_t)]
    pub io_engine: IoEngineArg,
    /// Force O_DIRECT (default: on for block devices, off for files).
    #[arg(long, conflicts_with = "buffered")]
    pub direct: bool,
    /// Force buffered I/O (default: off for block devices, on for files).
    #[arg(long)]
    pub buffered: bool,
}

impl IoArgs {
    /// The engine's I/O options.
    pub fn options(&self) -> engine::volume::IoOptions {
        use engine::io::EngineKind;
        let engine = match self.io_engine {
            IoEngineArg::Auto => EngineKind::Auto,
            IoEngineArg::Uring => EngineKind::Uring,
            IoEngineArg::Sync => EngineKind::Sync,
        };
        engine::volume::IoOptions { engine, direct: (self.direct || self.buffered).then_some(self.direct) }
    }
}

/// `blockrep demo`.
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Size of the demo volume (e.g. 256M, 1G).
    #[arg(long, default_value = "256M", value_parser = parse_size)]
    pub size: u64,
    /// Percent of 4 KiB blocks changed between the two syncs.
    #[arg(long, default_value_t = 2.0)]
    pub change_percent: f64,
    /// Keep the demo directory instead of deleting it.
    #[arg(long)]
    pub keep: bool,
    /// Directory to create the demo in (default: a new temporary directory).
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Print one JSON object per sync instead of the table.
    #[arg(long)]
    pub json: bool,
    /// Sync in this process instead of through a `blockrep serve` standby on 127.0.0.1.
    #[arg(long)]
    pub local: bool,
    /// I/O options.
    #[command(flatten)]
    pub io: IoArgs,
}

/// `blockrep sync`.
#[derive(Debug, Args)]
pub struct SyncArgs {
    /// Volumes to sync (default: every configured volume).
    pub volumes: Vec<String>,
    /// Sync SOURCE to TARGET in this process (no network, no configuration file).
    #[arg(long, num_args = 2, value_names = ["SOURCE", "TARGET"])]
    pub local: Vec<PathBuf>,
    /// With --local: where manifests, spools and generation records live (one subdirectory per side and volume).
    #[arg(long, default_value = "/var/lib/blockrep")]
    pub state_dir: PathBuf,
    /// Cap the send rate (bytes per second, e.g. 50M).
    #[arg(long, value_parser = parse_size)]
    pub bwlimit: Option<u64>,
    /// Volume name (default: the source's file name).
    #[arg(long)]
    pub name: Option<String>,
    /// With --local: block size for hashing (power of two, 4K..1M), or auto: the block size of the volume's
    /// manifest, else 32K up to 256 GiB and 64K above.
    #[arg(long, default_value = "auto", value_parser = node::config::parse_block_size)]
    pub block_size: node::config::BlockSize,
    /// Do not narrow changed blocks down to changed 4 KiB pieces.
    #[arg(long)]
    pub no_refine: bool,
    /// Compare every block with the shadow's actual content, even where an incremental sync would do.
    #[arg(long)]
    pub verify: bool,
    /// After a split brain (exit 4): keep this node's data and discard the standby's changes, with a compare sync
    /// that reports how many bytes on the standby it overwrote. Nothing is discarded without it.
    #[arg(long)]
    pub discard_standby_changes: bool,
    /// Print one JSON object per volume.
    #[arg(long)]
    pub json: bool,
    /// I/O options.
    #[command(flatten)]
    pub io: IoArgs,
}

/// `blockrep verify`.
#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// Volumes (default: every configured volume). On a standby, each shadow is re-hashed against its committed
    /// generation (a mismatch marks it untrusted, so the next sync repairs it); on the primary, the next sync of
    /// each volume compares every block with the standby's actual content.
    #[arg(conflicts_with = "local")]
    pub volumes: Vec<String>,
    /// Check a local shadow instead: TARGET and its state directory (as used with `sync --local`).
    #[arg(long, value_name = "TARGET")]
    pub local: Option<PathBuf>,
    /// With --local: the state directory [default: /var/lib/blockrep].
    #[arg(long, requires = "local", conflicts_with = "volumes")]
    pub state_dir: Option<PathBuf>,
    /// With --local: volume name (default: the target's file name).
    #[arg(long, requires = "local")]
    pub name: Option<String>,
    /// Print one JSON object per volume.
    #[arg(long)]
    pub json: bool,
    /// I/O options.
    #[command(flatten)]
    pub io: IoArgs,
}
