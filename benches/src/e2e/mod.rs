//! The end-to-end comparison harness (issue 6): blockrep beside rsync and plain TCP copies, on the same seeded
//! image, in one run. See `benches/README.md` and `docs/performance.md`.

pub mod image;
pub mod procs;
pub mod report;
pub mod tools;

use std::path::{Path, PathBuf};
use std::time::Instant;

use engine::differ::{changed_blocks, scan, DiffError, ScanOptions, ScannedChunk};
use engine::volume::{Access, IoOptions, Volume};

use image::{Content, Pattern};
use tools::{Env, Tool};

/// Command-line options of `e2e`.
#[derive(Debug, Clone)]
pub struct Options {
    /// Image size in bytes.
    pub size: u64,
    /// Image content.
    pub content: Content,
    /// Change patterns.
    pub patterns: Vec<Pattern>,
    /// Changed fractions (0..=1).
    pub fractions: Vec<f64>,
    /// Repetitions per case and tool.
    pub reps: usize,
    /// Output directory (CSV, PNG, report).
    pub out: PathBuf,
    /// Work directory for images (default: a new directory under /var/tmp).
    pub work: Option<PathBuf>,
    /// Tools to run.
    pub tools: Vec<Tool>,
    /// The blockrep binary.
    pub blockrep: PathBuf,
    /// The binary of the `@base` rows.
    pub blockrep_base: Option<PathBuf>,
    /// `--link RATE`: run across two namespaces joined by a tbf-limited veth.
    pub link: Option<String>,
    /// Seed of the image and the changes.
    pub seed: u64,
    /// blockrep volume block size (default: blockrep's).
    pub block_size: Option<String>,
    /// Skip the differ-vs-b3sum measurement.
    pub no_differ: bool,
    /// Skip the plot.
    pub no_plot: bool,
    /// Keep the work directory.
    pub keep: bool,
    /// `--pin-sides`: sender on CPU 0, receiver on CPU 1 (see [`procs::Sides::pin`]).
    pub pin_sides: bool,
}

/// One repetition of one tool in one case.
#[derive(Debug, Clone)]
pub struct Sample {
    /// `full` (initial sync to an empty target) or the pattern name.
    pub case: String,
    /// Changed fraction (1.0 for `full`).
    pub fraction: f64,
    /// Tool.
    pub tool: Tool,
    /// Repetition number.
    pub rep: usize,
    /// Bytes that differ between source and target before the run.
    pub changed_bytes: u64,
    /// The run's figures, or why it failed.
    pub result: Result<tools::Outcome, String>,
    /// Whether the target was byte-identical to the source afterwards.
    pub verified: bool,
}

/// Differ scan and `b3sum` on the same page-cached image.
#[derive(Debug, Clone, Default)]
pub struct DifferFigures {
    /// Bytes scanned.
    pub bytes: u64,
    /// Block size of the scan.
    pub block_size: u32,
    /// Seconds per scan (with compare against a reference).
    pub scan_s: Vec<f64>,
    /// Seconds per `b3sum --num-threads 2`.
    pub b3sum_s: Vec<f64>,
    /// With `--pin-sides`: seconds per `b3sum --num-threads 1` on CPU 0 only, the sending side's core (its
    /// share of two machines: the primary hashes its volume with the cores it has, the standby works elsewhere).
    pub b3sum_one_core_s: Vec<f64>,
}

/// What the machine is.
#[derive(Debug, Clone)]
pub struct Machine {
    /// CPU model name.
    pub cpu: String,
    /// Logical cores.
    pub cores: usize,
    /// Load averages at start.
    pub load_start: String,
    /// Load averages at the end.
    pub load_end: String,
    /// Kernel release.
    pub kernel: String,
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

impl Machine {
    fn probe() -> Machine {
        let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu = info
            .lines()
            .find(|l| l.starts_with("model name"))
            .and_then(|l| l.split(':').nth(1))
            .unwrap_or("unknown")
            .trim()
            .to_owned();
        let cores = info.lines().filter(|l| l.starts_with("processor")).count();
        let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim().to_owned();
        Machine { cpu, cores, load_start: loadavg(), load_end: String::new(), kernel }
    }
}

/// Everything a run measured.
#[derive(Debug, Clone)]
pub struct Results {
    /// The options used.
    pub opts: Options,
    /// The machine.
    pub machine: Machine,
    /// Every repetition.
    pub samples: Vec<Sample>,
    /// Differ vs b3sum, unless skipped.
    pub differ: Option<DifferFigures>,
    /// Tools skipped and why.
    pub skipped: Vec<String>,
}

/// Times the differ alone and `b3sum --num-threads 2` on `path` (page-cached); with `pin`, also `b3sum
/// --num-threads 1` on CPU 0 (`taskset`, as `--pin-sides` runs the sending side).
pub fn differ_vs_b3sum(
    path: &Path,
    reps: usize,
    pin: bool,
    skipped: &mut Vec<String>,
) -> Result<DifferFigures, String> {
    image::warm(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let vol = Volume::open(path, Access::Read, &IoOptions { direct: Some(false), ..Default::default() })
        .map_err(|e| format!("cannot open {}: {e}", path.display()))?;
    let bs = engine::hash::auto_block_size(vol.size()); // what a sync of it uses by default
    let opts = ScanOptions::new(bs);
    // A reference that differs in every 100th block, so the compare step does real work.
    let mut reference = Vec::new();
    scan(&vol, &opts, |c: ScannedChunk| -> Result<(), DiffError> {
        reference.extend(c.hashes.iter().copied());
        Ok(())
    })
    .map_err(|e| format!("differ scan failed: {e}"))?;
    for (i, h) in reference.iter_mut().enumerate() {
        if i % 100 == 0 {
            *h = Default::default();
        }
    }
    let mut f = DifferFigures { bytes: vol.size(), block_size: bs, ..Default::default() };
    for _ in 0..reps {
        let t = Instant::now();
        let mut changed = 0usize;
        scan(&vol, &opts, |c: ScannedChunk| -> Result<(), DiffError> {
            let first = c.first_block as usize;
            changed += changed_blocks(&c, Some(&reference[first..first + c.hashes.len()])).len();
            Ok(())
        })
        .map_err(|e| format!("differ scan failed: {e}"))?;
        f.scan_s.push(t.elapsed().as_secs_f64());
        std::hint::black_box(changed);
    }
    if procs::installed("b3sum") {
        let b3sum = |args: &[&str]| -> Result<f64, String> {
            let t = Instant::now();
            let st = std::process::Command::new(args[0])
                .args(&args[1..])
                .arg(path)
                .stdout(std::process::Stdio::null())
                .status()
                .map_err(|e| format!("cannot run {}: {e}", args.join(" ")))?;
            if !st.success() {
                return Err(format!("{} failed: {st}", args.join(" ")));
            }
            Ok(t.elapsed().as_secs_f64())
        };
        for _ in 0..reps {
            f.b3sum_s.push(b3sum(&["b3sum", "--num-threads", "2"])?);
            if pin {
                f.b3sum_one_core_s.push(b3sum(&["taskset", "-c", "0", "b3sum", "--num-threads", "1"])?);
            }
        }
    } else {
        skipped.push("b3sum: not installed (Debian package b3sum); differ figure has no reference".into());
    }
    Ok(f)
}

fn copy_dir(from: &Path, to: &Path) -> std::io::Result<()> {
    let _ = std::fs::remove_dir_all(to);
    std::fs::create_dir_all(to)?;
    for e in std::fs::read_dir(from)? {
        let e = e?;
        let dst = to.join(e.file_name());
        if e.file_type()?.is_dir() {
            copy_dir(&e.path(), &dst)?;
        } else {
            std::fs::copy(e.path(), dst)?;
        }
    }
    Ok(())
}

fn flush_dirty() {
    // SAFETY: sync(2) takes no arguments and only flushes dirty pages.
    unsafe { libc::sync() };
}

fn say(msg: &str) {
    eprintln!("[e2e {}] {msg}", chrono_now());
}

fn chrono_now() -> String {
    let s = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    format!("{:02}:{:02}:{:02}", s / 3600 % 24, s / 60 % 60, s % 60)
}

/// Runs the whole comparison.
pub fn run(opts: Options) -> Result<Results, String> {
    let mut machine = Machine::probe();
    let mut skipped = Vec::new();
    let mut tools = Vec::new();
    for &t in &opts.tools {
        match t.program() {
            Some(p) if !procs::installed(p) => {
                let msg = format!("{}: `{p}` is not installed (Debian package {p}): skipped", t.name());
                say(&msg);
                skipped.push(msg);
            }
            _ => tools.push(t),
        }
    }
    if !opts.blockrep.is_file() {
        return Err(format!(
            "the blockrep binary {} does not exist: build it (cargo build --release -p blockrep) or pass --blockrep",
            opts.blockrep.display()
        ));
    }
    let (work, _tmp) = match &opts.work {
        Some(w) => {
            std::fs::create_dir_all(w).map_err(|e| format!("cannot create {}: {e}", w.display()))?;
            (w.clone(), None)
        }
        None => {
            let t = tempfile::Builder::new()
                .prefix("blockrep-e2e-")
                .tempdir_in("/var/tmp")
                .map_err(|e| format!("cannot create a work directory in /var/tmp: {e}"))?;
            (t.path().to_owned(), if opts.keep { None } else { Some(t) })
        }
    };
    let self_exe = std::env::current_exe().map_err(|e| format!("current_exe: {e}"))?;
    let link = match &opts.link {
        Some(rate) => {
            say(&format!("creating two namespaces joined by a veth limited to {rate}"));
            Some(
                procs::Link::create(rate, self_exe.clone())
                    .map_err(|e| format!("--link {rate}: {e} (needs root, iproute2, tc)"))?,
            )
        }
        None => None,
    };
    let env = Env {
        work: work.clone(),
        blockrep: opts.blockrep.clone(),
        blockrep_base: opts.blockrep_base.clone(),
        sides: procs::Sides {
            pin: opts.pin_sides,
            ..link.as_ref().map(|l| l.sides.clone()).unwrap_or_else(|| procs::Sides::loopback(self_exe.clone()))
        },
        self_exe,
        link,
        block_size: opts.block_size.clone(),
    };
    env.setup()?;

    say(&format!("generating a {} byte {} image in {}", opts.size, opts.content.name(), work.display()));
    let base_hash = image::generate(&env.base(), opts.size, opts.content, opts.seed)
        .map_err(|e| format!("cannot write the image: {e}"))?;
    image::copy_file(&env.base(), &env.src()).map_err(|e| format!("cannot copy the image: {e}"))?;

    let differ = if opts.no_differ {
        None
    } else {
        say("differ scan vs b3sum --num-threads 2 on the page-cached image");
        Some(differ_vs_b3sum(&env.base(), opts.reps.max(3), opts.pin_sides, &mut skipped)?)
    };

    let mut samples = Vec::new();
    // Initial full sync: an empty target (sparse file of the right size for blockrep, none for the others).
    // Repetitions are interleaved (rep 0 of every tool, then rep 1, ...), so a change in the shared host's load
    // hits all tools alike.
    for rep in 0..opts.reps {
        for &tool in tools.iter().filter(|t| t.full()) {
            let _ = std::fs::remove_file(env.target());
            let _ = std::fs::remove_dir_all(env.state("", 'p'));
            let _ = std::fs::remove_dir_all(env.state("", 's'));
            if tool.is_blockrep() {
                let f = std::fs::File::create(env.target()).map_err(|e| format!("cannot create target: {e}"))?;
                f.set_len(opts.size).map_err(|e| format!("cannot size target: {e}"))?;
            }
            flush_dirty();
            let result = env.run(tool);
            let verified = check(&env.target(), base_hash);
            report_one("full", 1.0, tool, rep, &result, verified);
            samples.push(Sample {
                case: "full".into(),
                fraction: 1.0,
                tool,
                rep,
                changed_bytes: opts.size,
                result,
                verified,
            });
            // The base of the incremental cases: the state after a verified blockrep full sync (every
            // blockrep variant leaves the same state; the compression level changes only the wire).
            if tool.is_blockrep() && verified {
                copy_dir(&env.state("", 'p'), &env.state("base-", 'p')).map_err(|e| format!("saving state: {e}"))?;
                copy_dir(&env.state("", 's'), &env.state("base-", 's')).map_err(|e| format!("saving state: {e}"))?;
            }
        }
    }
    let have_blockrep_state = env.state("base-", 's').exists();
    // The standby recorded the shadow's modification time at its commit (evidence of outside writes, issue 11):
    // restoring the target changes it, which would turn every later sync into a compare sync. Put it back
    // before each blockrep run, so that `blockrep` measures an incremental sync (and `blockrep-compare` a
    // compare sync because it asks for one).
    let committed_mtime = std::fs::metadata(env.target()).and_then(|m| m.modified()).ok();
    if !check(&env.target(), base_hash) {
        image::copy_file(&env.base(), &env.target()).map_err(|e| format!("cannot restore target: {e}"))?;
    }

    // Incremental cases: source = base + change; target (and blockrep's state) = base before every run.
    let mut src_ranges: Vec<(u64, u64)> = Vec::new();
    for &pattern in &opts.patterns {
        for (fi, &fraction) in opts.fractions.iter().enumerate() {
            image::copy_ranges(&env.base(), &env.src(), &src_ranges).map_err(|e| format!("restoring source: {e}"))?;
            let ranges = image::change_ranges(opts.size, pattern, fraction, opts.seed + 1 + fi as u64);
            image::apply_changes(&env.src(), &ranges, opts.content, opts.seed + 1000 + fi as u64)
                .map_err(|e| format!("changing source: {e}"))?;
            src_ranges = ranges.clone();
            let changed: u64 = ranges.iter().map(|r| r.1).sum();
            let src_hash = image::hash_file(&env.src()).map_err(|e| format!("hashing source: {e}"))?.expect("exists");
            say(&format!("{} {:.3}%: {} bytes changed", pattern.name(), fraction * 100.0, changed));
            for rep in 0..opts.reps {
                for &tool in tools.iter().filter(|t| t.incremental()) {
                    if tool.is_blockrep() && !have_blockrep_state {
                        continue;
                    }
                    if tool.is_blockrep() {
                        copy_dir(&env.state("base-", 'p'), &env.state("", 'p'))
                            .map_err(|e| format!("restoring state: {e}"))?;
                        copy_dir(&env.state("base-", 's'), &env.state("", 's'))
                            .map_err(|e| format!("restoring state: {e}"))?;
                        if let Some(t) = committed_mtime {
                            std::fs::File::options()
                                .write(true)
                                .open(env.target())
                                .and_then(|f| f.set_modified(t))
                                .map_err(|e| format!("restoring the target's modification time: {e}"))?;
                        }
                    }
                    flush_dirty();
                    let result = env.run(tool);
                    let verified = check(&env.target(), src_hash);
                    report_one(pattern.name(), fraction, tool, rep, &result, verified);
                    samples.push(Sample {
                        case: pattern.name().into(),
                        fraction,
                        tool,
                        rep,
                        changed_bytes: changed,
                        result,
                        verified,
                    });
                    // Back to the base state: undo the changed ranges when the tool produced exactly the source
                    // (so everything else is base already), else copy the whole base image.
                    if verified {
                        image::copy_ranges(&env.base(), &env.target(), &ranges)
                    } else {
                        image::copy_file(&env.base(), &env.target())
                    }
                    .map_err(|e| format!("restoring target: {e}"))?;
                }
            }
        }
    }
    machine.load_end = loadavg();
    drop(env);
    Ok(Results { opts, machine, samples, differ, skipped })
}

fn check(target: &Path, want: blake3::Hash) -> bool {
    matches!(image::hash_file(target), Ok(Some(h)) if h == want)
}

fn report_one(case: &str, fraction: f64, tool: Tool, rep: usize, r: &Result<tools::Outcome, String>, ok: bool) {
    let what = format!("{case} {:>7.3}% {:<9} rep {rep}", fraction * 100.0, tool.name());
    match r {
        Ok(o) if ok => say(&format!(
            "{what}: {:.3} s, {} bytes on the wire, {:.2} CPU s (sender {:.2} + receiver {:.2}), peak RSS {} MiB; \
             anonymous / mapped files MiB: sender {:.1} / {:.1}, receiver {:.1} / {:.1}",
            o.wall_s,
            o.wire_bytes,
            o.usage.cpu_s,
            o.sides.0.cpu_s,
            o.sides.1.cpu_s,
            o.usage.max_rss_kb / 1024,
            o.sides.0.peak_anon_kb as f64 / 1024.0,
            o.sides.0.peak_file_kb as f64 / 1024.0,
            o.sides.1.peak_anon_kb as f64 / 1024.0,
            o.sides.1.peak_file_kb as f64 / 1024.0,
        )),
        Ok(o) => say(&format!("{what}: {:.3} s but TARGET MISMATCH: the target differs from the source!", o.wall_s)),
        Err(e) => say(&format!("{what}: FAILED: {e}")),
    }
}
