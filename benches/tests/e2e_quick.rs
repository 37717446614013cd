//! Smoke test of the end-to-end harness: `e2e --quick` runs every tool once on a tiny image, every target is
//! byte-identical afterwards, and the CSV has a verified row for blockrep at every changed fraction.

use std::path::PathBuf;
use std::process::Command;

/// The `blockrep` binary of the same build (cargo builds it for the cli package's tests in a workspace run).
fn blockrep() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let profile = exe.parent()?.parent()?;
    [profile.join("blockrep"), profile.parent()?.join("release").join("blockrep")].into_iter().find(|p| p.is_file())
}

#[test]
fn quick_run_syncs_with_every_tool_and_every_target_is_identical() {
    let bin = match blockrep() {
        Some(b) => b,
        None => {
            // Not a skip: the harness cannot be tested without the binary it measures.
            let st = Command::new(env!("CARGO")).args(["build", "-p", "blockrep"]).status().expect("run cargo");
            assert!(st.success(), "cargo build -p blockrep failed");
            blockrep().expect("blockrep binary after cargo build -p blockrep")
        }
    };
    let out = tempfile::tempdir().unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_e2e"))
        .args(["--quick", "--size", "8M", "--no-plot", "--out"])
        .arg(out.path())
        .arg("--blockrep")
        .arg(&bin)
        .output()
        .unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    println!("{stdout}");
    assert!(o.status.success(), "e2e --quick failed: {}\n{stdout}\n{stderr}", o.status);
    for line in stderr.lines().filter(|l| l.contains("skipped")) {
        println!("peer tool skipped: {line}");
    }
    let samples = std::fs::read_to_string(out.path().join("samples.csv")).unwrap();
    let header: Vec<&str> = samples.lines().next().unwrap().split(',').collect();
    let col = |name: &str| header.iter().position(|&h| h == name).unwrap_or_else(|| panic!("no {name} column"));
    let blockrep_rows: Vec<Vec<&str>> =
        samples.lines().map(|l| l.split(',').collect::<Vec<_>>()).filter(|f| f[2] == "blockrep").collect();
    // full + 5 fractions, one repetition each.
    assert_eq!(blockrep_rows.len(), 6, "{samples}");
    assert!(blockrep_rows.iter().all(|f| f[col("verified")] == "true"), "{samples}");
    // Each side's memory is reported apart from its mapped files (the issue 15 target is per side).
    for name in ["send_anon_kb", "send_file_kb", "recv_anon_kb", "recv_file_kb"] {
        assert!(blockrep_rows.iter().all(|f| f[col(name)].parse::<u64>().unwrap() > 0), "{name}: {samples}");
    }
    let summary = std::fs::read_to_string(out.path().join("summary.csv")).unwrap();
    assert!(summary.lines().skip(1).all(|l| l.ends_with(",ok")), "{summary}");
    assert!(stdout.contains("| ratio |"), "{stdout}");
}
