//! Shared helpers for the integration tests.

/// Ends a test that needs network namespaces, saying so, unless it runs as root (CI does).
macro_rules! skip_unless_root {
    () => {
        if !super::role_cli::is_root() {
            eprintln!("skipping: network namespaces need root (CI runs as root)");
            return;
        }
    };
}

mod hardening;
mod install;
mod keepalived;
mod keys;
mod local_sync;
mod maint_lock;
mod network;
mod operations;
mod pacemaker;
mod protect;
mod retain;
mod role_cli;
mod round_trips;
mod trust;
mod uml_lifecycle;
mod uml_lvm;
mod uml_retain;
mod uml_tracked;

#[path = "../uml/harness.rs"]
mod uml;

use std::path::Path;
use std::process::{Command, Output};

/// The `blockrep` binary under test.
pub fn blockrep() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_blockrep"));
    c.env_remove("BLOCKREP_LOG");
    c
}

/// Spawns a `blockrep serve --announce ...` command (stdout is taken for its announcement) and waits until it
/// listens; returns the daemon and the address it announced.
pub fn spawn_serve(cmd: &mut Command) -> (std::process::Child, String) {
    use std::io::BufRead;
    let mut child = cmd.stdout(std::process::Stdio::piped()).spawn().expect("blockrep serve starts");
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().expect("piped")).read_line(&mut line).expect("reads the announcement");
    let addr = line.trim().strip_prefix("listening on ").unwrap_or_else(|| panic!("announce line: {line:?}"));
    (child, addr.to_owned())
}

/// Runs and returns output (never panics on non-zero exit).
pub fn run(cmd: &mut Command) -> Output {
    cmd.output().expect("blockrep runs")
}

/// stdout as text.
pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// stderr as text.
pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Writes `len` pseudo-random bytes (seeded) with some zero and repetitive regions.
pub fn write_volume(path: &Path, len: usize, seed: u64) {
    let mut x = seed | 1;
    let mut v = vec![0u8; len];
    for (i, chunk) in v.chunks_mut(65536).enumerate() {
        match i % 4 {
            0 => chunk.fill(0),
            1 => chunk.iter_mut().enumerate().for_each(|(j, b)| *b = (j % 251) as u8),
            _ => chunk.iter_mut().for_each(|b| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                *b = x as u8
            }),
        }
    }
    std::fs::write(path, v).unwrap();
}

/// Overwrites 4 KiB blocks `blocks` of the file with incompressible bytes derived from `seed` and the block.
pub fn scribble(path: &Path, blocks: &[u64], seed: u8) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    for &b in blocks {
        let mut x = (b << 8 | seed as u64).wrapping_mul(0x9e3779b97f4a7c15) | 1;
        let buf: Vec<u8> = (0..4096)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        f.write_all_at(&buf, b * 4096).unwrap();
    }
}
