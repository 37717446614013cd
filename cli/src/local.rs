//! `blockrep sync --local` and `blockrep verify --local`: source and target in one process, through the same
//! engine API (`TargetLink`) the network path uses.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use engine::sync::{sync_volume, SyncOptions, SyncReport};
use engine::target::{Target, TargetOptions};
use engine::volume::{Access, IoOptions, Volume};

use crate::args::{SyncArgs, VerifyArgs};
use crate::exit::{coded, USAGE};
use crate::report;

/// Target options for volume `name` (production: no fault injection).
pub fn target_options(name: &str, io: IoOptions) -> TargetOptions {
    TargetOptions { io, volume: name.to_owned(), durable: engine::durable::Durable::new() }
}

/// Where one volume's state lives for one side (`primary` or `standby`).
pub fn side_dir(state_dir: &Path, side: &str, volume: &str) -> PathBuf {
    state_dir.join(side).join(volume)
}

/// A volume name from an explicit name or a path's file name; names become directory names, so they are
/// restricted to `[A-Za-z0-9._+-]`.
pub fn volume_name(explicit: Option<&str>, path: &Path) -> Result<String> {
    let name = match explicit {
        Some(n) => n.to_owned(),
        None => path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(),
    };
    let ok = !name.is_empty()
        && name != "."
        && name != ".."
        && name.chars().all(|c| c.is_ascii_alphanumeric() || "._+-".contains(c));
    if !ok {
        return Err(coded(
            USAGE,
            format!("volume name {name:?} is not usable: use letters, digits and . _ + - (--name)"),
        ));
    }
    Ok(name)
}

/// Refuses a target that is the source itself (same path or same file).
fn refuse_same(source: &Path, target: &Path) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    let same = match (std::fs::metadata(source), std::fs::metadata(target)) {
        (Ok(a), Ok(b)) => (a.dev(), a.ino()) == (b.dev(), b.ino()) || (a.rdev() != 0 && a.rdev() == b.rdev()),
        _ => source == target,
    };
    if same {
        return Err(coded(
            USAGE,
            format!("source {} and target {} are the same volume: nothing to sync", source.display(), target.display()),
        ));
    }
    Ok(())
}

/// Runs one local sync.
pub fn run_local(
    name: &str,
    source: &Path,
    target: &Path,
    state_dir: &Path,
    io: &IoOptions,
    opts: &SyncOptions,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<SyncReport> {
    refuse_same(source, target)?;
    let src = Volume::open(source, Access::Read, io).context("cannot open the source")?;
    let primary_dir = side_dir(state_dir, "primary", name);
    std::fs::create_dir_all(&primary_dir)
        .with_context(|| format!("cannot create state directory {}", primary_dir.display()))?;
    let mut tgt = Target::open(target, &side_dir(state_dir, "standby", name), crate::local::target_options(name, *io))
        .context("cannot open the target")?;
    let report = sync_volume(name, &src, &primary_dir.join("manifest"), &mut tgt, opts, progress)
        .with_context(|| format!("sync of volume {name} failed; the shadow keeps its last complete generation"))?;
    Ok(report)
}

/// `blockrep sync`.
pub fn sync(a: &SyncArgs) -> Result<()> {
    let [source, target] = a.local.as_slice() else {
        return Err(coded(USAGE, "sync needs --local SOURCE TARGET (network sync is configured in blockrep.toml)"));
    };
    let name = volume_name(a.name.as_deref(), source)?;
    let bs = engine::hash::validate_block_size(a.block_size).map_err(|e| coded(USAGE, e.to_string()))?;
    let mut opts = SyncOptions::new(bs);
    opts.scan.mmap = a.io.io_engine == crate::args::IoEngineArg::Auto;
    opts.refine = !a.no_refine;
    let mut bar = report::Progress::new(&name);
    let r = run_local(&name, source, target, &a.state_dir, &a.io.options(), &opts, &mut |d, t| bar.update(d, t))?;
    bar.finish();
    report::print_sync(&r, a.json)
}

/// `blockrep verify --local`.
pub fn verify(a: &VerifyArgs) -> Result<()> {
    let name = volume_name(a.name.as_deref(), &a.local)?;
    let mut tgt =
        Target::open(&a.local, &side_dir(&a.state_dir, "standby", &name), target_options(&name, a.io.options()))
            .context("cannot open the target")?;
    let info = engine::sync::TargetLink::info(&mut tgt).context("cannot read the target's state")?;
    let ok = tgt.verify().context("cannot verify the shadow")?;
    if a.json {
        println!(
            "{}",
            serde_json::json!({"volume": name, "generation": info.generation, "complete": info.complete, "ok": ok})
        );
    } else if ok {
        println!("volume {name}: shadow matches generation {} (complete: {})", info.generation, info.complete);
    }
    if !ok {
        return Err(anyhow::anyhow!(
            "volume {name}: the shadow {} does not match its committed generation {}; run a sync to repair it",
            a.local.display(),
            info.generation
        ));
    }
    Ok(())
}
