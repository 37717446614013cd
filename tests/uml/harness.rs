//! User-Mode Linux guests for tests: a small Rust front end to `tests/uml/run-guest.sh`.
//!
//! Include it from a test crate whose package lives one directory below the repository root (`lvmctl/`,
//! `cli/`), e.g. `#[path = "../../tests/uml/harness.rs"] mod uml;` from `lvmctl/tests/uml.rs` or
//! `#[path = "uml/harness.rs"] mod uml;` from `tests/tests.rs`. It uses only `std` and `libc`.
//!
//! ```ignore
//! if let Some(reason) = uml::unavailable() { eprintln!("skipping: {reason}"); return; }
//! let r = uml::run_guest(&[("disk0", 64 << 20)], "pvcreate /dev/ubda && vgcreate vg0 /dev/ubda", timeout);
//! r.assert_success();            // panics with the console tail unless SCENARIO_RC=0
//! assert!(r.console.contains("..."));
//! ```
//!
//! For reboots on the same disks (crash tests), make a [`Uml`] work directory and [`Uml::run`] or
//! [`Uml::start`] several [`Boot`]s in it; [`Guest::kill`] cuts the power. The guest's root is the host's `/`
//! (hostfs): a scenario can run host-built binaries by their host paths and leave files in `$UML_DIR`, the work
//! directory. Every guest gets its own work directory and `umid`.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// The UML kernel of the Debian package `user-mode-linux`.
pub const LINUX_UML: &str = "/usr/bin/linux.uml";

/// The newer UML kernel that `scripts/uml-kernel.sh` installs when the packaged one cannot boot on this CPU
/// (AVX-512 / AMX hosts); `run-guest.sh` prefers it when present.
pub const LINUX_UML_NEWER: &str = "/opt/blockrep-uml/linux.uml";

/// Time on top of the guest timeout that the host waits for run-guest.sh itself.
const SCRIPT_GRACE: Duration = Duration::from_secs(30);

/// Path of `tests/uml/run-guest.sh`, from the including package's directory.
pub fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/uml/run-guest.sh")
}

/// Why guests cannot run on this machine, or `None` when they can. Only a missing `linux.uml` is a reason to
/// skip (CI installs it with scripts/deps.sh); anything else that fails later is a test failure.
pub fn unavailable() -> Option<String> {
    if !Path::new(LINUX_UML).exists() && !Path::new(LINUX_UML_NEWER).exists() {
        return Some(format!(
            "{LINUX_UML} is not installed (Debian package user-mode-linux; scripts/deps.sh installs it)"
        ));
    }
    None
}

/// What one boot runs: disks, scenario, limits.
#[derive(Debug, Clone)]
pub struct Boot {
    /// Disk images `(name, size in bytes)`: the first is `/dev/ubda`, the second `/dev/ubdb`, ... Created
    /// sparse when missing, reused as they are when present.
    pub disks: Vec<(String, u64)>,
    /// `/bin/sh` script text run by the guest's init (see run-guest.sh for what is set up before).
    pub scenario: String,
    /// Kill the guest after this long.
    pub timeout: Duration,
    /// Environment for the scenario.
    pub env: Vec<(String, String)>,
    /// Extra kernel command-line arguments (network devices, ...).
    pub append: Vec<String>,
    /// Guest memory, e.g. `256M`.
    pub mem: String,
    /// Network namespace to start the guest in (`ip netns exec`), for tap devices the test created there.
    pub netns: Option<String>,
}

impl Boot {
    /// A boot of `scenario` with no disks, a 120 s timeout and 256 MiB of memory.
    pub fn new(scenario: impl Into<String>) -> Self {
        Boot {
            disks: Vec::new(),
            scenario: scenario.into(),
            timeout: Duration::from_secs(120),
            env: Vec::new(),
            append: Vec::new(),
            mem: "256M".into(),
            netns: None,
        }
    }

    /// Adds a disk image.
    pub fn disk(mut self, name: &str, size: u64) -> Self {
        self.disks.push((name.into(), size));
        self
    }

    /// Sets the timeout.
    pub fn timeout(mut self, t: Duration) -> Self {
        self.timeout = t;
        self
    }

    /// Adds an environment variable for the scenario.
    pub fn env(mut self, k: &str, v: impl Into<String>) -> Self {
        self.env.push((k.into(), v.into()));
        self
    }

    /// Adds a kernel command-line argument.
    pub fn append(mut self, arg: impl Into<String>) -> Self {
        self.append.push(arg.into());
        self
    }

    /// Starts the guest inside network namespace `ns`.
    pub fn netns(mut self, ns: &str) -> Self {
        self.netns = Some(ns.into());
        self
    }
}

/// A work directory for one guest (its disks survive reboots); removed on drop unless `BLOCKREP_UML_KEEP` is
/// set in the environment.
#[derive(Debug)]
pub struct Uml {
    dir: PathBuf,
    boots: AtomicU32,
}

impl Uml {
    /// A fresh work directory under the system temporary directory, named after `tag`.
    pub fn new(tag: &str) -> Self {
        static SEQ: AtomicU32 = AtomicU32::new(0);
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
        let dir = std::env::temp_dir().join(format!(
            "blockrep-uml-{tag}-{}-{}-{nanos}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.display()));
        Uml { dir, boots: AtomicU32::new(0) }
    }

    /// The work directory (`$UML_DIR` inside the guest).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Host path of the disk image `name`.
    pub fn disk_path(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.img"))
    }

    /// Boots the guest in the background.
    pub fn start(&self, boot: &Boot) -> Guest {
        let n = self.boots.fetch_add(1, Ordering::Relaxed);
        let scenario = self.dir.join(format!("scenario-{n}.sh"));
        std::fs::write(&scenario, &boot.scenario).expect("write scenario");
        let mut cmd = Command::new("/bin/bash");
        cmd.arg(script())
            .arg("--dir")
            .arg(&self.dir)
            .arg("--scenario")
            .arg(&scenario)
            .arg("--timeout")
            .arg(boot.timeout.as_secs().max(1).to_string())
            .arg("--mem")
            .arg(&boot.mem);
        for (name, size) in &boot.disks {
            cmd.arg("--disk").arg(format!("{name}:{size}"));
        }
        for (k, v) in &boot.env {
            cmd.arg("--env").arg(format!("{k}={v}"));
        }
        for a in &boot.append {
            cmd.arg("--append").arg(a);
        }
        if let Some(ns) = &boot.netns {
            cmd.arg("--netns").arg(ns);
        }
        // The script prints only to stderr (read after it ends: a few lines, far below a pipe's capacity).
        cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped());
        let child = cmd.spawn().unwrap_or_else(|e| panic!("cannot run {}: {e}", script().display()));
        Guest { dir: self.dir.clone(), child: Some(child), started: Instant::now(), timeout: boot.timeout }
    }

    /// Boots the guest and waits until it ends.
    pub fn run(&self, boot: &Boot) -> GuestResult {
        self.start(boot).wait()
    }
}

impl Drop for Uml {
    fn drop(&mut self) {
        if std::env::var_os("BLOCKREP_UML_KEEP").is_none() {
            let _ = std::fs::remove_dir_all(&self.dir);
        } else {
            eprintln!("keeping UML work directory {}", self.dir.display());
        }
    }
}

/// A running guest.
#[derive(Debug)]
pub struct Guest {
    dir: PathBuf,
    child: Option<Child>,
    started: Instant,
    timeout: Duration,
}

impl Guest {
    /// The console log so far.
    pub fn console(&self) -> String {
        std::fs::read(self.dir.join("console.log"))
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// Waits until the console log contains `needle` (true), or `timeout` passes or the guest ends (false).
    pub fn wait_for_console(&mut self, needle: &str, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if self.console().contains(needle) {
                return true;
            }
            let ended = self.child.as_mut().is_none_or(|c| matches!(c.try_wait(), Ok(Some(_))));
            if ended {
                return self.console().contains(needle);
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Kills the guest with SIGKILL, like a power cut: the disk images keep what the guest had written to them.
    pub fn kill(&mut self) {
        if let Some(pid) = self.pid().filter(|&p| p > 1) {
            // SAFETY: kill(2) has no memory-safety preconditions. run-guest.sh started linux.uml with setsid,
            // so -pid is the guest's own process group; the script waits for the guest and is still running (we
            // have not reaped it), so the group id has not been reused.
            unsafe {
                libc::kill(-pid, libc::SIGKILL);
            }
        }
    }

    /// The pid of linux.uml, which is also its process group id (once the guest has started).
    pub fn pid(&self) -> Option<i32> {
        std::fs::read_to_string(self.dir.join("guest.pid")).ok().and_then(|s| s.trim().parse().ok())
    }

    /// Waits until the guest ends (the script enforces the timeout) and collects the result.
    pub fn wait(mut self) -> GuestResult {
        let mut child = self.child.take().expect("guest already waited for");
        let deadline = self.started + self.timeout + SCRIPT_GRACE;
        let status = loop {
            if let Some(st) = child.try_wait().expect("wait for run-guest.sh") {
                break st;
            }
            if Instant::now() >= deadline {
                self.kill();
                let _ = child.kill();
                break child.wait().expect("wait for run-guest.sh");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let mut stderr = String::new();
        if let Some(mut e) = child.stderr.take() {
            let _ = std::io::Read::read_to_string(&mut e, &mut stderr);
        }
        let console = self.console();
        let scenario_rc = console
            .lines()
            .filter_map(|l| l.trim_end_matches('\r').strip_prefix("SCENARIO_RC="))
            .filter_map(|v| v.parse().ok())
            .next_back();
        let results = std::fs::read_to_string(self.dir.join("results"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.split_once('=').map(|(k, v)| (k.to_owned(), v.to_owned())))
            .collect();
        GuestResult {
            status: status.code().unwrap_or(-1),
            scenario_rc,
            results,
            console,
            script_stderr: stderr,
            elapsed: self.started.elapsed(),
        }
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            self.kill();
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// How a guest ended.
#[derive(Debug, Clone)]
pub struct GuestResult {
    /// Exit status of run-guest.sh: the scenario's status, 124 timeout, 125 no SCENARIO_RC (crashed or killed),
    /// 126 UML missing, 2 usage.
    pub status: i32,
    /// The `SCENARIO_RC=` the guest printed, if it got that far.
    pub scenario_rc: Option<i32>,
    /// `KEY=VALUE` pairs the scenario recorded with `result KEY VALUE` (tests/uml/lib.sh), in order.
    pub results: Vec<(String, String)>,
    /// The whole console log: kernel messages and the scenario's stdout and stderr.
    pub console: String,
    /// What run-guest.sh itself printed on stderr.
    pub script_stderr: String,
    /// Wall-clock time of the boot.
    pub elapsed: Duration,
}

impl GuestResult {
    /// Whether the guest was killed at its timeout.
    pub fn timed_out(&self) -> bool {
        self.status == 124
    }

    /// The last value the scenario recorded for `key` with `result`.
    pub fn result(&self, key: &str) -> Option<&str> {
        self.results.iter().rev().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }

    /// The last `n` lines of the console.
    pub fn console_tail(&self, n: usize) -> String {
        let lines: Vec<&str> = self.console.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// The lines the scenario's `fail` helper printed.
    pub fn failures(&self) -> Vec<&str> {
        self.console.lines().filter_map(|l| l.strip_prefix("SCENARIO_FAIL: ")).collect()
    }

    /// Panics, showing the console tail, unless the scenario ran and exited 0.
    pub fn assert_success(&self) {
        assert!(
            self.status == 0 && self.scenario_rc == Some(0),
            "guest scenario failed: run-guest.sh status {}, SCENARIO_RC {:?}, failures {:?}, after {:?}\n{}--- console (tail) ---\n{}",
            self.status,
            self.scenario_rc,
            self.failures(),
            self.elapsed,
            self.script_stderr,
            self.console_tail(80)
        );
    }
}

/// Boots a guest with fresh `disks` (`(name, bytes)`), runs `scenario` and returns the result. The work
/// directory (disk images included) is removed afterwards; use [`Uml`] to keep disks across boots.
pub fn run_guest(disks: &[(&str, u64)], scenario: &str, timeout: Duration) -> GuestResult {
    let uml = Uml::new("guest");
    let mut boot = Boot::new(scenario).timeout(timeout);
    for (name, size) in disks {
        boot = boot.disk(name, *size);
    }
    uml.run(&boot)
}

/// Pids of the processes in process group `pgid` that are still running (zombies, already dead and waiting to
/// be reaped by whoever inherited them, do not count). A killed guest must leave none.
pub fn live_processes_in_group(pgid: i32) -> Vec<i32> {
    let mut live = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else { return live };
    for e in entries.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else { continue };
        let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else { continue };
        // "pid (comm) state ppid pgrp ...": comm may contain anything, so split after its last ')'.
        let Some(rest) = stat.rfind(')').map(|i| &stat[i + 1..]) else { continue };
        let f: Vec<&str> = rest.split_whitespace().collect();
        if f.len() > 2 && f[2].parse() == Ok(pgid) && f[0] != "Z" && f[0] != "X" {
            live.push(pid);
        }
    }
    live
}

/// Whether this process runs as root (network namespaces need it).
pub fn is_root() -> bool {
    // SAFETY: geteuid(2) has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// A private LAN for guests: a network namespace holding a bridge `br0`, with one tap device per guest. Start a
/// guest on it with `Boot::new(..).netns(lan.name()).append(lan.tap("tapA"))`; inside, the interface is `vec0`
/// (tests/uml/lib.sh: `net_up vec0 10.77.0.1/24`). Use only addresses on this LAN. Deleted on drop. Needs root.
#[derive(Debug)]
pub struct Lan {
    name: String,
}

impl Lan {
    /// Creates the namespace (named after `tag` and this process) and its bridge.
    pub fn new(tag: &str) -> Lan {
        let name = format!("br-{tag}-{}", std::process::id());
        ip(&["netns", "add", &name]);
        let lan = Lan { name };
        ip(&["-n", &lan.name, "link", "add", "br0", "type", "bridge"]);
        ip(&["-n", &lan.name, "link", "set", "br0", "up"]);
        ip(&["-n", &lan.name, "link", "set", "lo", "up"]);
        lan
    }

    /// The namespace's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Creates tap device `tap` on the bridge and returns the kernel argument that gives a guest its `vec0`.
    pub fn tap(&self, tap: &str) -> String {
        ip(&["-n", &self.name, "tuntap", "add", tap, "mode", "tap"]);
        ip(&["-n", &self.name, "link", "set", tap, "master", "br0", "up"]);
        format!("vec0:transport=tap,ifname={tap},gro=1")
    }
}

impl Drop for Lan {
    fn drop(&mut self) {
        let _ = Command::new(IP).args(["netns", "del", &self.name]).status();
    }
}

const IP: &str = "/usr/sbin/ip";

fn ip(args: &[&str]) {
    let out = Command::new(IP).args(args).output().unwrap_or_else(|e| panic!("cannot run {IP}: {e}"));
    assert!(out.status.success(), "`ip {}` failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
}
