//! Cold-disk benchmark (issue 15 item 2): the incremental scan of a real block device with an empty page cache,
//! against `dd iflag=direct` of the same device, in the same run.
//!
//! A loop device over an image file on disk is the block device; blockrep reads it with O_DIRECT (`--direct`).
//! Before each measured command the page cache is dropped (`echo 3 > /proc/sys/vm/drop_caches`), so both read
//! from the disk. Each repetition first writes new scattered 4 KiB changes to the device (not timed), then times
//! `dd if=DEV of=/dev/null bs=1M iflag=direct` and `blockrep sync --local DEV shadow --direct --json`, alternating
//! which goes first; first with no change (the scan alone), then with `--fraction` changed (the scan plus the
//! shadow's cold reads of the changed blocks and the commit). Needs root (losetup, drop_caches). Prints one row
//! per repetition and the median ratio of blockrep's throughput (bytes scanned / wall time of the whole command)
//! to dd's; target: at least 0.9.
//!
//! Usage: cold [--size 1G] [--reps 3] [--fraction 0.01] [--dir DIR] [--blockrep PATH]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use blockrep_benches::e2e::image::{self, Content, Pattern};

struct Opts {
    size: u64,
    reps: usize,
    fraction: f64,
    dir: PathBuf,
    blockrep: PathBuf,
}

fn parse_size(s: &str) -> Result<u64, String> {
    let (num, mult) = match s.chars().last() {
        Some('K' | 'k') => (&s[..s.len() - 1], 1u64 << 10),
        Some('M' | 'm') => (&s[..s.len() - 1], 1 << 20),
        Some('G' | 'g') => (&s[..s.len() - 1], 1 << 30),
        _ => (s, 1),
    };
    num.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .ok_or_else(|| format!("'{s}' is not a size (e.g. 512M, 1G)"))
}

fn opts() -> Result<Opts, String> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut o = Opts {
        size: 1 << 30,
        reps: 3,
        fraction: 0.01,
        dir: root.join("target/bench/cold"),
        blockrep: root.join("target/release/blockrep"),
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut val = || args.next().ok_or_else(|| format!("{a} needs a value"));
        match a.as_str() {
            "--size" => o.size = parse_size(&val()?)?,
            "--reps" => o.reps = val()?.parse().map_err(|e| format!("--reps: {e}"))?,
            "--fraction" => o.fraction = val()?.parse().map_err(|e| format!("--fraction: {e}"))?,
            "--dir" => o.dir = PathBuf::from(val()?),
            "--blockrep" => o.blockrep = PathBuf::from(val()?),
            "-h" | "--help" => {
                println!("usage: cold [--size 1G] [--reps 3] [--fraction 0.01] [--dir DIR] [--blockrep PATH]");
                std::process::exit(0);
            }
            _ => return Err(format!("unknown argument '{a}' (see --help)")),
        }
    }
    if o.reps == 0 || !(0.0..=1.0).contains(&o.fraction) || o.size < 64 << 20 || o.size % (1 << 20) != 0 {
        return Err("need --reps >= 1, --fraction in 0..1 and --size a multiple of 1M, at least 64M".into());
    }
    Ok(o)
}

fn sh(cmd: &mut Command) -> Result<String, String> {
    let o = cmd.stderr(Stdio::piped()).output().map_err(|e| format!("{cmd:?}: {e}"))?;
    if !o.status.success() {
        return Err(format!("{cmd:?}: {}: {}", o.status, String::from_utf8_lossy(&o.stderr).trim()));
    }
    Ok(String::from_utf8_lossy(&o.stdout).into_owned())
}

fn drop_caches() -> Result<(), String> {
    // SAFETY: sync(2) has no preconditions.
    unsafe { libc::sync() };
    std::fs::write("/proc/sys/vm/drop_caches", "3").map_err(|e| format!("dropping the page cache: {e}"))
}

/// The loop device, detached when dropped.
struct Loop(String);

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").args(["-d", &self.0]).status();
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    if let Err(e) = run() {
        eprintln!("cold: {e}");
        std::process::exit(1);
    }
}

fn run() -> Result<(), String> {
    let o = opts()?;
    // SAFETY: geteuid(2) has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err("needs root (losetup, /proc/sys/vm/drop_caches)".into());
    }
    if !o.blockrep.exists() {
        return Err(format!("{} not found: cargo build --release -p blockrep first", o.blockrep.display()));
    }
    std::fs::create_dir_all(&o.dir).map_err(|e| format!("{}: {e}", o.dir.display()))?;
    let (img, shadow, state) = (o.dir.join("source.img"), o.dir.join("shadow.img"), o.dir.join("state"));
    let _ = std::fs::remove_dir_all(&state);
    eprintln!("cold: writing a {} MiB random image on disk at {}", o.size >> 20, img.display());
    image::generate(&img, o.size, Content::Random, 1).map_err(|e| format!("{}: {e}", img.display()))?;
    image::copy_file(&img, &shadow).map_err(|e| format!("{}: {e}", shadow.display()))?;
    let dev = Loop(sh(Command::new("losetup").args(["--find", "--show"]).arg(&img))?.trim().to_string());
    let sync = || -> Result<(f64, serde_json::Value), String> {
        let t = Instant::now();
        let out = sh(Command::new(&o.blockrep)
            .args(["sync", "--json", "--direct", "--name", "cold", "--local", &dev.0])
            .arg(&shadow)
            .arg("--state-dir")
            .arg(&state))?;
        let wall = t.elapsed().as_secs_f64();
        let v = serde_json::from_str(out.lines().last().unwrap_or("")).map_err(|e| format!("sync output: {e}"))?;
        Ok((wall, v))
    };
    let dd = || -> Result<f64, String> {
        let t = Instant::now();
        sh(Command::new("dd").args([&format!("if={}", dev.0), "of=/dev/null", "bs=1M", "iflag=direct"]))?;
        Ok(t.elapsed().as_secs_f64())
    };
    eprintln!("cold: first (full) sync of {} to the shadow", dev.0);
    sync()?;
    println!("| rep | changed | dd iflag=direct MB/s | blockrep scan MB/s | blockrep / dd | mode |");
    println!("|---|---|---|---|---|---|");
    let mut medians = Vec::new();
    for fraction in [0.0, o.fraction] {
        let mut ratios = Vec::new();
        for rep in 0..o.reps {
            let seed = 100 + rep as u64;
            let ranges = image::change_ranges(o.size, Pattern::Scattered4k, fraction, seed);
            image::apply_changes(Path::new(&dev.0), &ranges, image::Content::Random, seed)
                .map_err(|e| format!("{}: {e}", dev.0))?;
            let mut t_dd = 0.0;
            let mut r = None;
            for first_dd in [rep % 2 == 0, rep % 2 != 0] {
                drop_caches()?;
                if first_dd {
                    t_dd = dd()?;
                } else {
                    r = Some(sync()?);
                }
            }
            let (t_br, v) = r.expect("the sync ran");
            let scanned = v["bytes_scanned"].as_u64().unwrap_or(0) as f64;
            let (dd_mbs, br_mbs) = (o.size as f64 / t_dd / 1e6, scanned / t_br / 1e6);
            ratios.push(br_mbs / dd_mbs);
            println!(
                "| {rep} | {} x 4 KiB | {dd_mbs:.0} | {br_mbs:.0} | {:.2} | {} |",
                ranges.len(),
                br_mbs / dd_mbs,
                v["mode"].as_str().unwrap_or("?")
            );
        }
        medians.push((fraction, median(ratios)));
    }
    drop(dev);
    let same =
        image::hash_file(&img).map_err(|e| e.to_string())? == image::hash_file(&shadow).map_err(|e| e.to_string())?;
    println!();
    for (fraction, m) in medians {
        println!("median blockrep / dd throughput, {:.1} % changed: {m:.2} (target >= 0.9)", fraction * 100.0);
    }
    println!("shadow identical to the source: {same}");
    if !same {
        return Err("the shadow differs from the source after the last sync".into());
    }
    Ok(())
}
