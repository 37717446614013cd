//! Child processes with their own resource usage (wait4), free ports, and the optional rate-limited link
//! between two network namespaces.

use std::io;
use std::net::TcpListener;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Child, Command, ExitStatus};
use std::time::{Duration, Instant};

/// CPU and memory of one finished process (and the children it waited for).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Usage {
    /// User + system CPU seconds.
    pub cpu_s: f64,
    /// Peak resident set size in KiB (`ru_maxrss`: anonymous memory and mapped file pages together).
    pub max_rss_kb: u64,
    /// Peak anonymous resident memory in KiB (`RssAnon` of `/proc/PID/status`, sampled every
    /// [`SAMPLE_INTERVAL`]): heap, stacks, buffers; what the process itself allocated.
    pub peak_anon_kb: u64,
    /// Peak resident pages of mapped files in KiB (`RssFile + RssShmem`, sampled; a file on tmpfs counts as
    /// shmem): the binary and libraries, the mapped manifests, the scan's mapped chunks of a page-cached source.
    /// These are page-cache pages the kernel can drop, shared with every other reader of the file.
    pub peak_file_kb: u64,
}

impl Usage {
    /// Sum of CPU, max of each memory figure.
    pub fn plus(self, o: Usage) -> Usage {
        Usage {
            cpu_s: self.cpu_s + o.cpu_s,
            max_rss_kb: self.max_rss_kb.max(o.max_rss_kb),
            peak_anon_kb: self.peak_anon_kb.max(o.peak_anon_kb),
            peak_file_kb: self.peak_file_kb.max(o.peak_file_kb),
        }
    }
}

/// How often `measure` samples its child's `/proc/PID/status` for [`Usage::peak_anon_kb`] and
/// [`Usage::peak_file_kb`] (the kernel keeps a high-water mark of the total only, `VmHWM` = `ru_maxrss`).
pub const SAMPLE_INTERVAL: Duration = Duration::from_millis(2);

/// `RssAnon` and `RssFile + RssShmem` in KiB from the text of `/proc/PID/status` (`None`: no memory lines, e.g.
/// a zombie).
pub fn parse_status_rss(status: &str) -> Option<(u64, u64)> {
    let field = |name: &str| -> Option<u64> {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
    };
    let anon = field("RssAnon:")?;
    Some((anon, field("RssFile:")? + field("RssShmem:").unwrap_or(0)))
}

/// Samples `/proc/PID/status` of `pid` until `stop` is set; returns the peaks (anonymous, file) in KiB.
fn sample_rss(pid: u32, stop: &std::sync::atomic::AtomicBool) -> (u64, u64) {
    let path = format!("/proc/{pid}/status");
    let (mut anon, mut file) = (0, 0);
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        if let Some((a, f)) = std::fs::read_to_string(&path).ok().as_deref().and_then(parse_status_rss) {
            anon = anon.max(a);
            file = file.max(f);
        }
        std::thread::sleep(SAMPLE_INTERVAL);
    }
    (anon, file)
}

/// Waits for `child` with `wait4`, returning its status and resource usage. The child must not have been waited
/// for already.
pub fn wait_usage(child: &Child) -> io::Result<(ExitStatus, Usage)> {
    let pid = child.id() as libc::pid_t;
    let mut status: libc::c_int = 0;
    // SAFETY: rusage is a plain C struct of integers, for which all-zero bytes are a valid value.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    loop {
        // SAFETY: `status` and `ru` are valid, writable and live for the call; `pid` is our own child.
        let r = unsafe { libc::wait4(pid, &mut status, 0, &mut ru) };
        if r == pid {
            break;
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    let usage =
        Usage { cpu_s: secs(ru.ru_utime) + secs(ru.ru_stime), max_rss_kb: ru.ru_maxrss as u64, ..Usage::default() };
    Ok((ExitStatus::from_raw(status), usage))
}

/// The pid the `measure` helper forwards SIGTERM to.
static MEASURED: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(0);

extern "C" fn forward_term(_: libc::c_int) {
    let pid = MEASURED.load(std::sync::atomic::Ordering::SeqCst);
    if pid > 0 {
        // SAFETY: kill(2) is async-signal-safe and has no memory effects.
        unsafe {
            libc::kill(pid, libc::SIGTERM);
        }
    }
}

/// `e2e measure FILE PROG ARGS...`: runs PROG (same stdio), forwards SIGTERM to it, samples its anonymous and
/// file-backed resident memory, and writes its `cpu_s max_rss_kb peak_anon_kb peak_file_kb` to FILE; exits with
/// its exit code.
///
/// Why a helper: `ru_maxrss` of a child forked from this harness starts at the harness's own high-water mark (the
/// forked address space counts until exec), so a tool forked from the big harness would report the harness's RSS.
/// The helper is a fresh small process, like `/usr/bin/time`.
pub fn measure_main(file: &Path, prog: &str, args: &[String]) -> i32 {
    let child = match Command::new(prog).args(args).spawn() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("measure: cannot run {prog}: {e}");
            return 127;
        }
    };
    MEASURED.store(child.id() as i32, std::sync::atomic::Ordering::SeqCst);
    // SAFETY: the handler only loads an atomic and calls kill(2), both async-signal-safe.
    unsafe {
        libc::signal(libc::SIGTERM, forward_term as *const () as libc::sighandler_t);
    }
    let stop = std::sync::atomic::AtomicBool::new(false);
    let (waited, (anon, file_kb)) = std::thread::scope(|s| {
        let sampler = s.spawn(|| sample_rss(child.id(), &stop));
        let w = wait_usage(&child);
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        (w, sampler.join().unwrap_or_default())
    });
    let (st, mut u) = match waited {
        Ok(x) => x,
        Err(e) => {
            eprintln!("measure: wait4: {e}");
            return 125;
        }
    };
    (u.peak_anon_kb, u.peak_file_kb) = (anon, file_kb);
    if let Err(e) =
        std::fs::write(file, format!("{} {} {} {}\n", u.cpu_s, u.max_rss_kb, u.peak_anon_kb, u.peak_file_kb))
    {
        eprintln!("measure: cannot write {}: {e}", file.display());
        return 125;
    }
    st.code().unwrap_or_else(|| 128 + st.signal().unwrap_or(0))
}

/// Reads what `measure` wrote.
pub fn read_measured(file: &Path) -> io::Result<Usage> {
    let s = std::fs::read_to_string(file)?;
    let mut it = s.split_whitespace();
    let bad = || io::Error::other(format!("{} is not `cpu_s max_rss_kb peak_anon_kb peak_file_kb`", file.display()));
    let cpu_s = it.next().and_then(|v| v.parse().ok()).ok_or_else(bad)?;
    let mut kb = || it.next().and_then(|v| v.parse::<u64>().ok()).ok_or_else(bad);
    Ok(Usage { cpu_s, max_rss_kb: kb()?, peak_anon_kb: kb()?, peak_file_kb: kb()? })
}

/// Sends SIGTERM to `child`.
pub fn terminate(child: &Child) {
    // SAFETY: kill(2) with a pid of our own un-reaped child and a valid signal number has no memory effects.
    unsafe {
        libc::kill(child.id() as libc::pid_t, libc::SIGTERM);
    }
}

fn children(pid: u32) -> Vec<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

/// Waits (up to `limit`) until the process that the `measure` helper `pid` runs has no child processes left
/// (a daemon's per-connection children have exited and been reaped).
pub fn wait_no_grandchildren(pid: u32, limit: Duration) {
    let t = Instant::now();
    while t.elapsed() < limit {
        if children(pid).into_iter().all(|c| children(c).is_empty()) {
            return;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// A TCP port that was free on 127.0.0.1 a moment ago (also used as a likely-free port in a fresh namespace).
pub fn free_port() -> io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Whether `prog` is on PATH.
pub fn installed(prog: &str) -> bool {
    std::env::var_os("PATH").map(|p| std::env::split_paths(&p).any(|d| d.join(prog).is_file())).unwrap_or(false)
}

/// Where processes of each side run: the host's loopback, or one of two namespaces of a [`Link`].
#[derive(Debug, Clone)]
pub struct Sides {
    /// Namespace of the sending side (primary), if any.
    pub send_ns: Option<String>,
    /// Namespace of the receiving side (standby), if any.
    pub recv_ns: Option<String>,
    /// Address the receiver listens on and the sender connects to.
    pub recv_ip: String,
    /// This harness (its `measure` helper wraps every tool process).
    pub measure_exe: std::path::PathBuf,
    /// `--pin-sides`: the sending side runs on CPU 0 only and the receiving side on CPU 1 only (`taskset`), so
    /// that on one host each side has a core of its own, as on two machines.
    pub pin: bool,
}

impl Sides {
    /// Both sides on 127.0.0.1.
    pub fn loopback(measure_exe: std::path::PathBuf) -> Sides {
        Sides { send_ns: None, recv_ns: None, recv_ip: "127.0.0.1".into(), measure_exe, pin: false }
    }

    fn cmd(&self, ns: &Option<String>, cpu: &str, prog: &str, usage: &Path) -> Command {
        let mut c = match ns {
            None => Command::new(if self.pin { Path::new("taskset") } else { &self.measure_exe }),
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]);
                if self.pin {
                    c.arg("taskset");
                } else {
                    c.arg(&self.measure_exe);
                }
                c
            }
        };
        if self.pin {
            c.args(["-c", cpu]).arg(&self.measure_exe);
        }
        c.arg("measure").arg(usage).arg(prog);
        c
    }

    /// A command on the sending side, run under the `measure` helper that writes its usage to `usage`
    /// (`ip netns exec` and `taskset` exec in place, so the pid is the helper's).
    pub fn send(&self, prog: &str, usage: &Path) -> Command {
        self.cmd(&self.send_ns, "0", prog, usage)
    }

    /// A command on the receiving side (see [`Sides::send`]).
    pub fn recv(&self, prog: &str, usage: &Path) -> Command {
        self.cmd(&self.recv_ns, "1", prog, usage)
    }

    /// Waits until something listens on `port` on the receiving side.
    pub fn wait_listening(&self, port: u16, limit: Duration) -> io::Result<()> {
        let t = Instant::now();
        let needle = format!(":{port:04X}");
        loop {
            let mut c = match &self.recv_ns {
                None => Command::new("cat"),
                Some(ns) => {
                    let mut c = Command::new("ip");
                    c.args(["netns", "exec", ns, "cat"]);
                    c
                }
            };
            let out = c.arg("/proc/net/tcp").output()?;
            let text = String::from_utf8_lossy(&out.stdout);
            // Columns: sl local_address rem_address st ...; LISTEN is st 0A.
            if text.lines().any(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                f.len() > 3 && f[1].ends_with(&needle) && f[3] == "0A"
            }) {
                return Ok(());
            }
            if t.elapsed() > limit {
                return Err(io::Error::other(format!("nothing listens on port {port} after {limit:?}")));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// Two network namespaces joined by a veth pair, both ends shaped with `tc tbf`; deleted on drop.
#[derive(Debug)]
pub struct Link {
    /// The sides living in the namespaces.
    pub sides: Sides,
    /// Namespaces and their veth ends (for the byte counters).
    pub ends: [(String, String); 2],
}

fn ip(args: &[&str]) -> io::Result<()> {
    let st = Command::new("ip").args(args).status()?;
    if st.success() {
        Ok(())
    } else {
        Err(io::Error::other(format!("`ip {}` failed: {st}", args.join(" "))))
    }
}

impl Link {
    /// Creates `h6a-PID` and `h6b-PID` joined by a veth pair limited to `rate` (tc syntax, e.g. `1gbit`).
    pub fn create(rate: &str, measure_exe: std::path::PathBuf) -> io::Result<Link> {
        let pid = std::process::id();
        let (na, nb) = (format!("h6a-{pid}"), format!("h6b-{pid}"));
        let (va, vb) = (format!("h6va{}", pid % 100_000), format!("h6vb{}", pid % 100_000));
        let net = format!("10.213.{}", pid % 250);
        let link = Link {
            sides: Sides {
                send_ns: Some(na.clone()),
                recv_ns: Some(nb.clone()),
                recv_ip: format!("{net}.2"),
                measure_exe,
                pin: false,
            },
            ends: [(na.clone(), va.clone()), (nb.clone(), vb.clone())],
        };
        ip(&["netns", "add", &na])?;
        ip(&["netns", "add", &nb])?;
        ip(&["link", "add", &va, "type", "veth", "peer", "name", &vb])?;
        ip(&["link", "set", &va, "netns", &na])?;
        ip(&["link", "set", &vb, "netns", &nb])?;
        for ((ns, dev), host) in link.ends.iter().zip([1, 2]) {
            ip(&["-n", ns, "addr", "add", &format!("{net}.{host}/24"), "dev", dev])?;
            ip(&["-n", ns, "link", "set", dev, "up"])?;
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
            let st = Command::new("tc")
                .args(["-n", ns, "qdisc", "add", "dev", dev, "root", "tbf", "rate", rate])
                .args(["burst", "256k", "latency", "50ms"])
                .status()?;
            if !st.success() {
                return Err(io::Error::other(format!("tc tbf rate {rate} on {dev} failed: {st}")));
            }
        }
        Ok(link)
    }

    /// Bytes sent by both veth ends so far.
    pub fn tx_bytes(&self) -> u64 {
        self.ends
            .iter()
            .map(|(ns, dev)| {
                Command::new("ip")
                    .args(["netns", "exec", ns, "cat", &format!("/sys/class/net/{dev}/statistics/tx_bytes")])
                    .output()
                    .ok()
                    .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse::<u64>().ok())
                    .unwrap_or(0)
            })
            .sum()
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        for (ns, _) in &self.ends {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_lines_give_anonymous_and_file_resident_memory() {
        let status = "Name:\tblockrep\nVmHWM:\t   60000 kB\nVmRSS:\t   50000 kB\nRssAnon:\t   30000 kB\n\
                      RssFile:\t   15000 kB\nRssShmem:\t    5000 kB\nThreads:\t5\n";
        assert_eq!(parse_status_rss(status), Some((30000, 20000)), "shmem (a file on tmpfs) counts as file");
        assert_eq!(parse_status_rss("Name:\tzombie\nState:\tZ (zombie)\n"), None);
    }

    /// The `measure` helper reports the peak of a child's anonymous memory apart from its mapped files.
    #[test]
    fn measure_reports_the_peak_anonymous_memory_of_its_child() {
        if !installed("python3") {
            eprintln!("python3 is not installed: skipped");
            return;
        }
        let d = tempfile::tempdir().unwrap();
        let file = d.path().join("usage");
        // 48 MiB allocated and written, kept for 300 ms, then freed; the process lives on for 100 ms more.
        let script = "import time\nb = bytearray(48 << 20)\nb[::4096] = b'x' * len(b[::4096])\ntime.sleep(0.3)\n\
                      del b\ntime.sleep(0.1)\n";
        let code = measure_main(&file, "python3", &["-c".to_string(), script.to_string()]);
        assert_eq!(code, 0);
        let u = read_measured(&file).unwrap();
        assert!(u.peak_anon_kb >= 48 << 10, "peak anonymous {} KiB, 48 MiB were written", u.peak_anon_kb);
        assert!(u.peak_anon_kb < 200 << 10, "peak anonymous {} KiB", u.peak_anon_kb);
        assert!(u.peak_file_kb > 0, "the interpreter's own mapped files");
        assert!(u.max_rss_kb >= u.peak_anon_kb, "ru_maxrss {} counts anonymous memory too", u.max_rss_kb);
    }
}
