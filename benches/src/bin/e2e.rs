//! `e2e`: the end-to-end comparison harness. Run it through `scripts/bench.sh`; `e2e --help` lists the options.

use std::path::PathBuf;
use std::process::ExitCode;

use blockrep_benches::e2e::image::{Content, Pattern};
use blockrep_benches::e2e::tools::{tcp_recv, tcp_send, Tool};
use blockrep_benches::e2e::{report, run, Options};

const HELP: &str = "\
e2e: blockrep beside rsync and plain TCP copies on the same seeded image (issue 6).

USAGE: e2e [OPTIONS]
  --size SIZE          image size (K, M, G suffixes) [default 2G; --quick: 16M]
  --content KIND       random | mixed | zero [default random]
  --pattern LIST       scattered4k,clustered1m (comma list) [default scattered4k]
  --fractions LIST     changed percentages [default 0,0.1,1,10,100]
  --reps N             repetitions per case and tool [default 3; --quick: 1]
  --tools LIST         blockrep,blockrep-compare,blockrep-rtt20,rsync,tcp-copy,socat [default all];
                       also blockrep-zN: blockrep with compression_level = N (0 = off), e.g. blockrep-z0,blockrep-z1;
                       blockrep-rtt0: through the same relay without delay (the control of blockrep-rtt20);
                       blockrep@base, blockrep-compare@base, blockrep-rtt20@base, blockrep-rtt0@base: those rows with the
                       --blockrep-base binary
  --out DIR            CSV, report.md and incremental.png go here [default target/bench]
  --work DIR           where the images live [default a new directory in /var/tmp, deleted at the end]
  --keep               keep the work directory
  --blockrep PATH      the blockrep binary [default: blockrep next to this binary's target dir, release first]
  --blockrep-base PATH another blockrep binary for the @base rows (before/after in one interleaved run)
  --block-size SIZE    blockrep volume block size [default blockrep's]
  --seed N             seed of image and changes [default 1]
  --link RATE          run across two network namespaces joined by a veth limited to RATE (tc tbf, e.g. 1gbit;
                       root only)
  --pin-sides          the primary side on CPU 0 only, the standby side on CPU 1 only (taskset): each side has a
                       core of its own, as on two machines (both sides otherwise share every core of this host)
  --no-differ          skip the differ-vs-b3sum measurement
  --no-plot            skip the PNG
  --quick              tiny sizes, 1 repetition (smoke test)
Exit status: 0 all runs succeeded and every target was byte-identical, 1 a run failed or a target differed,
2 bad usage.";

fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, mult) = match s.find(|c: char| c.is_ascii_alphabetic()) {
        Some(i) => {
            let m = match s[i..].to_ascii_uppercase().trim_end_matches("IB").trim_end_matches('B') {
                "" => 1,
                "K" => 1 << 10,
                "M" => 1 << 20,
                "G" => 1 << 30,
                u => return Err(format!("unknown size unit {u:?} in {s:?}: use K, M or G")),
            };
            (&s[..i], m)
        }
        None => (s, 1u64),
    };
    num.parse::<u64>().map(|n| n * mult).map_err(|_| format!("{s:?} is not a size (examples: 16M, 2G)"))
}

fn default_blockrep() -> PathBuf {
    // target/<profile>/e2e → target/release/blockrep, else target/<profile>/blockrep.
    let exe = std::env::current_exe().unwrap_or_default();
    let profile_dir = exe.parent().map(|p| if p.ends_with("deps") { p.parent().unwrap_or(p) } else { p });
    let Some(dir) = profile_dir else { return PathBuf::from("blockrep") };
    let release = dir.parent().map(|t| t.join("release").join("blockrep"));
    match release {
        Some(r) if r.is_file() => r,
        _ => dir.join("blockrep"),
    }
}

fn parse(args: Vec<String>) -> Result<Options, String> {
    let quick = args.iter().any(|a| a == "--quick");
    let mut o = Options {
        size: if quick { 16 << 20 } else { 2 << 30 },
        content: Content::Random,
        patterns: vec![Pattern::Scattered4k],
        fractions: vec![0.0, 0.001, 0.01, 0.1, 1.0],
        reps: if quick { 1 } else { 3 },
        out: PathBuf::from("target/bench"),
        work: None,
        tools: Tool::ALL.to_vec(),
        blockrep: default_blockrep(),
        blockrep_base: None,
        link: None,
        pin_sides: false,
        seed: 1,
        block_size: None,
        no_differ: false,
        no_plot: false,
        keep: false,
    };
    let mut it = args.into_iter();
    while let Some(a) = it.next() {
        let mut val = || it.next().ok_or_else(|| format!("{a} needs a value"));
        match a.as_str() {
            "--quick" => {}
            "--size" => o.size = parse_size(&val()?)?,
            "--content" => o.content = Content::parse(&val()?)?,
            "--pattern" => o.patterns = val()?.split(',').map(Pattern::parse).collect::<Result<_, _>>()?,
            "--fractions" => {
                o.fractions = val()?
                    .split(',')
                    .map(|f| match f.trim().trim_end_matches('%').parse::<f64>() {
                        Ok(p) if (0.0..=100.0).contains(&p) => Ok(p / 100.0),
                        _ => Err(format!("--fractions: {f:?} is not a percentage between 0 and 100")),
                    })
                    .collect::<Result<_, _>>()?
            }
            "--reps" => {
                o.reps = val()?.parse().ok().filter(|&n: &usize| n > 0).ok_or("--reps needs a positive integer")?
            }
            "--tools" => o.tools = val()?.split(',').map(Tool::parse).collect::<Result<_, _>>()?,
            "--out" => o.out = PathBuf::from(val()?),
            "--work" => o.work = Some(PathBuf::from(val()?)),
            "--keep" => o.keep = true,
            "--blockrep" => o.blockrep = PathBuf::from(val()?),
            "--blockrep-base" => o.blockrep_base = Some(PathBuf::from(val()?)),
            "--block-size" => o.block_size = Some(val()?),
            "--seed" => o.seed = val()?.parse().map_err(|_| "--seed needs an integer")?,
            "--link" => o.link = Some(val()?),
            "--pin-sides" => o.pin_sides = true,
            "--no-differ" => o.no_differ = true,
            "--no-plot" => o.no_plot = true,
            "-h" | "--help" => return Err(String::new()),
            _ => return Err(format!("unknown argument {a:?}")),
        }
    }
    if o.size < 1 << 20 || o.size % 4096 != 0 {
        return Err("--size must be at least 1M and a multiple of 4K".into());
    }
    // Run in a fixed order whatever the order given: blockrep last in the full case, so its state is the base.
    o.tools.sort_by_key(|t| (Tool::ALL.iter().position(|x| x == t).unwrap_or(Tool::ALL.len()), *t));
    o.tools.dedup();
    Ok(o)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    // Internal helpers: the plain TCP copy's two ends.
    match args.first().map(String::as_str) {
        Some("tcp-recv") if args.len() == 3 => {
            return match tcp_recv(&args[1], args[2].as_ref()) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("tcp-recv: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Some("measure") if args.len() >= 3 => {
            let code = blockrep_benches::e2e::procs::measure_main(args[1].as_ref(), &args[2], &args[3..]);
            return ExitCode::from(code.clamp(0, 255) as u8);
        }
        Some("delay-proxy") if args.len() == 4 => {
            let delay = match args[3].parse::<u64>() {
                Ok(ms) => std::time::Duration::from_millis(ms),
                Err(_) => {
                    eprintln!("e2e delay-proxy: the delay {:?} is not a number of milliseconds", args[3]);
                    return ExitCode::from(2);
                }
            };
            return match blockrep_benches::e2e::tools::delay_proxy(&args[1], &args[2], delay) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("e2e delay-proxy: {e}");
                    ExitCode::FAILURE
                }
            };
        }
        Some("tcp-send") if args.len() == 3 => {
            return match tcp_send(args[1].as_ref(), &args[2]) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("tcp-send: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        _ => {}
    }
    let opts = match parse(args) {
        Ok(o) => o,
        Err(e) if e.is_empty() => {
            println!("{HELP}");
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("e2e: {e}\n\n{HELP}");
            return ExitCode::from(2);
        }
    };
    let out = opts.out.clone();
    let no_plot = opts.no_plot;
    let results = match run(opts) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("e2e: {e}");
            return ExitCode::FAILURE;
        }
    };
    let text = report::markdown(&results);
    println!("{text}");
    if let Err(e) = std::fs::create_dir_all(&out)
        .and_then(|()| std::fs::write(out.join("report.md"), &text))
        .and_then(|()| report::write_csv(&results, &out))
    {
        eprintln!("e2e: cannot write the results to {}: {e}", out.display());
        return ExitCode::FAILURE;
    }
    println!("Wrote {0}/report.md, {0}/samples.csv, {0}/summary.csv", out.display());
    if !no_plot {
        match report::plot(&results, &out) {
            Ok(()) => println!("Wrote {}/incremental.png", out.display()),
            Err(e) => println!("No plot: {e}"),
        }
    }
    let bad = results.samples.iter().filter(|s| s.result.is_err() || !s.verified).count();
    if bad > 0 {
        eprintln!("e2e: {bad} run(s) failed or left a target that differs from the source (see the check column)");
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}
