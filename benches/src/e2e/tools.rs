//! The tools compared: each runs one transfer of the source image to the target and reports wall time, bytes on
//! the wire and the resource usage of its processes.

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use super::procs::{free_port, read_measured, terminate, wait_no_grandchildren, wait_usage, Link, Sides, Usage};

/// A tool under comparison.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Tool {
    /// `blockrep serve` + `blockrep sync --json`.
    Blockrep,
    /// `rsync --inplace --no-whole-file -I` against an rsync daemon.
    Rsync,
    /// The whole image through one TCP connection (this harness's own sender and receiver: sendfile/splice, then
    /// fsync of the received file).
    TcpCopy,
    /// The whole image through `socat` (no fsync).
    Socat,
    /// blockrep with `sync --verify`: a compare sync (the standby hashes its shadow's actual content).
    BlockrepCompare,
    /// blockrep through this harness's delaying TCP relay (`e2e delay-proxy`): [`RTT_DELAY_MS`] one way, so
    /// twice that round trip.
    BlockrepRtt,
    /// blockrep with `[primary] compression_level` set to this level (0: compression off); `blockrep-zN` on the
    /// command line. Not in [`Tool::ALL`]: asked for by name, to compare compression settings in one run.
    BlockrepLevel(i32),
    /// blockrep with `encryption = "aead"` on both nodes (ChaCha20-Poly1305 over the session); not in
    /// [`Tool::ALL`]: asked for by name (`blockrep-aead`), to compare with `blockrep` in one run.
    BlockrepAead,
    /// [`Tool::Blockrep`] with the binary of `--blockrep-base` (`blockrep@base`): a before/after comparison of two
    /// builds in one run, repetitions interleaved. Not in [`Tool::ALL`].
    BlockrepBase,
    /// [`Tool::BlockrepCompare`] with the binary of `--blockrep-base` (`blockrep-compare@base`).
    BlockrepCompareBase,
    /// [`Tool::BlockrepRtt`] with the binary of `--blockrep-base` (`blockrep-rtt20@base`).
    BlockrepRttBase,
    /// blockrep through the same relay without delay (`blockrep-rtt0`): the control of [`Tool::BlockrepRtt`],
    /// which separates the delay's cost from the relay's own effect (it buffers without limit, so the primary
    /// never waits for the standby's socket). Not in [`Tool::ALL`].
    BlockrepRtt0,
    /// [`Tool::BlockrepRtt0`] with the binary of `--blockrep-base` (`blockrep-rtt0@base`).
    BlockrepRtt0Base,
}

/// One-way delay of the relay of [`Tool::BlockrepRtt`], in milliseconds (20 ms round trip).
pub const RTT_DELAY_MS: u64 = 10;

impl Tool {
    /// All tools, in the order they run.
    pub const ALL: [Tool; 6] =
        [Tool::TcpCopy, Tool::Socat, Tool::Rsync, Tool::Blockrep, Tool::BlockrepCompare, Tool::BlockrepRtt];

    /// Name in tables and on the command line.
    pub fn name(self) -> String {
        match self {
            Tool::Blockrep => "blockrep".into(),
            Tool::Rsync => "rsync".into(),
            Tool::TcpCopy => "tcp-copy".into(),
            Tool::Socat => "socat".into(),
            Tool::BlockrepCompare => "blockrep-compare".into(),
            Tool::BlockrepRtt => "blockrep-rtt20".into(),
            Tool::BlockrepLevel(l) => format!("blockrep-z{l}"),
            Tool::BlockrepAead => "blockrep-aead".into(),
            Tool::BlockrepBase => "blockrep@base".into(),
            Tool::BlockrepCompareBase => "blockrep-compare@base".into(),
            Tool::BlockrepRttBase => "blockrep-rtt20@base".into(),
            Tool::BlockrepRtt0 => "blockrep-rtt0".into(),
            Tool::BlockrepRtt0Base => "blockrep-rtt0@base".into(),
        }
    }

    /// Parses a name.
    pub fn parse(s: &str) -> Result<Tool, String> {
        if let Some(l) = s.strip_prefix("blockrep-z").and_then(|l| l.parse::<i32>().ok()) {
            if (0..=19).contains(&l) {
                return Ok(Tool::BlockrepLevel(l));
            }
        }
        if s == "blockrep-aead" {
            return Ok(Tool::BlockrepAead);
        }
        Tool::ALL
            .into_iter()
            .chain([
                Tool::BlockrepBase,
                Tool::BlockrepCompareBase,
                Tool::BlockrepRttBase,
                Tool::BlockrepRtt0,
                Tool::BlockrepRtt0Base,
            ])
            .find(|t| t.name() == s)
            .ok_or_else(|| {
                format!(
                    "tool {s:?} is unknown: use blockrep, blockrep-compare, blockrep-rtt20, blockrep-zN (compression \
                     level N, 0 = off, up to 19), blockrep-aead (encrypted session), blockrep@base, \
                     blockrep-compare@base, blockrep-rtt20@base (the --blockrep-base binary), blockrep-rtt0 \
                     (the relay without delay), blockrep-rtt0@base, rsync, tcp-copy or socat"
                )
            })
    }

    /// Whether the tool transfers only differences (and so runs in the incremental cases).
    pub fn incremental(self) -> bool {
        matches!(self, Tool::Rsync) || self.is_blockrep()
    }

    /// Whether it runs the blockrep binary (and needs blockrep's state of the initial sync).
    pub fn is_blockrep(self) -> bool {
        matches!(
            self,
            Tool::Blockrep
                | Tool::BlockrepCompare
                | Tool::BlockrepRtt
                | Tool::BlockrepLevel(_)
                | Tool::BlockrepAead
                | Tool::BlockrepBase
                | Tool::BlockrepCompareBase
                | Tool::BlockrepRttBase
                | Tool::BlockrepRtt0
                | Tool::BlockrepRtt0Base
        )
    }

    /// Whether it runs in the initial full sync (the blockrep variants only differ in incremental syncs; the
    /// `--blockrep-base` binary may differ in both).
    pub fn full(self) -> bool {
        !matches!(
            self,
            Tool::BlockrepCompare
                | Tool::BlockrepRtt
                | Tool::BlockrepCompareBase
                | Tool::BlockrepRttBase
                | Tool::BlockrepRtt0
                | Tool::BlockrepRtt0Base
        )
    }

    /// The external program it needs, if any.
    pub fn program(self) -> Option<&'static str> {
        match self {
            Tool::Rsync => Some("rsync"),
            Tool::Socat => Some("socat"),
            _ => None,
        }
    }
}

/// One finished transfer.
#[derive(Debug, Clone, Default)]
pub struct Outcome {
    /// Wall-clock seconds of the transfer.
    pub wall_s: f64,
    /// Bytes on the wire (veth counters in `--link` mode, else what the tool reports; see README).
    pub wire_bytes: u64,
    /// CPU and peak RSS of the tool's processes (both sides).
    pub usage: Usage,
    /// The same of the sending side (blockrep: `sync`, the primary) and of the receiving side (`serve`, the
    /// standby).
    pub sides: (Usage, Usage),
}

/// Files and processes shared by all runs.
#[derive(Debug)]
pub struct Env {
    /// Work directory.
    pub work: PathBuf,
    /// The `blockrep` binary under test.
    pub blockrep: PathBuf,
    /// The binary of the `@base` rows (`--blockrep-base`), if given.
    pub blockrep_base: Option<PathBuf>,
    /// This harness (for its `tcp-send` / `tcp-recv` helpers).
    pub self_exe: PathBuf,
    /// Where each side runs.
    pub sides: Sides,
    /// The rate-limited link, in `--link` mode.
    pub link: Option<Link>,
    /// Volume block size for blockrep (None: its default).
    pub block_size: Option<String>,
}

impl Env {
    /// The source image.
    pub fn src(&self) -> PathBuf {
        self.work.join("src.img")
    }
    /// The pristine base image (the target's state before each incremental run).
    pub fn base(&self) -> PathBuf {
        self.work.join("base.img")
    }
    /// The target image (inside the rsync module directory).
    pub fn target(&self) -> PathBuf {
        self.work.join("target").join("target.img")
    }
    /// blockrep's state directory of a side (`p`rimary or `s`tandby); `base-` prefix for the saved copy.
    pub fn state(&self, prefix: &str, side: char) -> PathBuf {
        self.work.join(format!("{prefix}state-{side}"))
    }

    /// Writes the key and configuration files.
    pub fn setup(&self) -> Result<(), String> {
        std::fs::create_dir_all(self.work.join("target")).map_err(|e| format!("cannot create work dirs: {e}"))?;
        let key = self.work.join("key");
        if !key.exists() {
            let o = std::process::Command::new(&self.blockrep)
                .arg("keygen")
                .arg(&key)
                .output()
                .map_err(|e| format!("cannot run {}: {e}", self.blockrep.display()))?;
            if !o.status.success() {
                return Err(format!("blockrep keygen failed: {}", String::from_utf8_lossy(&o.stderr)));
            }
        }
        let conf = format!(
            "use chroot = no\nuid = root\ngid = root\nlog file = {}\n[vol]\npath = {}\nread only = no\n",
            self.work.join("rsyncd.log").display(),
            self.work.join("target").display()
        );
        std::fs::write(self.work.join("rsyncd.conf"), conf).map_err(|e| format!("cannot write rsyncd.conf: {e}"))
    }

    fn blockrep_config(&self, side: char, peer: &str, level: Option<i32>, aead: bool) -> Result<PathBuf, String> {
        let bs = self.block_size.as_ref().map(|b| format!("block_size = \"{b}\"\n")).unwrap_or_default();
        let z = level.map(|l| format!("compression_level = {l}\n")).unwrap_or_default();
        // Only when asked: a `--blockrep-base` binary older than the setting must read the same configuration.
        let enc = if aead { "encryption = \"aead\"\n" } else { "" };
        let text = format!(
            "node = \"bench-{side}\"\nkey_file = {:?}\n{enc}state_dir = {:?}\n\
             [standby]\nlisten = \"127.0.0.1:0\"\n\
             [primary]\npeer = \"{peer}\"\n{z}[[volume]]\nname = \"vol\"\nsource = {:?}\nshadow = {:?}\n{bs}",
            self.work.join("key"),
            self.state("", side),
            self.src(),
            self.target(),
        );
        let p = self.work.join(format!("blockrep-{side}.toml"));
        std::fs::write(&p, text).map_err(|e| format!("cannot write {}: {e}", p.display()))?;
        Ok(p)
    }

    /// Runs one transfer with `tool`.
    pub fn run(&self, tool: Tool) -> Result<Outcome, String> {
        let before = self.link.as_ref().map(|l| l.tx_bytes());
        let mut o = match tool {
            Tool::Blockrep => self.run_blockrep(&self.blockrep, false, None, None, false),
            Tool::BlockrepCompare => self.run_blockrep(&self.blockrep, true, None, None, false),
            Tool::BlockrepRtt => self.run_blockrep(&self.blockrep, false, Some(RTT_DELAY_MS), None, false),
            Tool::BlockrepRtt0 => self.run_blockrep(&self.blockrep, false, Some(0), None, false),
            Tool::BlockrepLevel(l) => self.run_blockrep(&self.blockrep, false, None, Some(l), false),
            Tool::BlockrepAead => self.run_blockrep(&self.blockrep, false, None, None, true),
            Tool::BlockrepBase | Tool::BlockrepCompareBase | Tool::BlockrepRttBase | Tool::BlockrepRtt0Base => {
                let base = self.blockrep_base.as_ref().ok_or("the @base rows need --blockrep-base PATH")?;
                let relay = match tool {
                    Tool::BlockrepRttBase => Some(RTT_DELAY_MS),
                    Tool::BlockrepRtt0Base => Some(0),
                    _ => None,
                };
                self.run_blockrep(base, tool == Tool::BlockrepCompareBase, relay, None, false)
            }
            Tool::Rsync => self.run_rsync(),
            Tool::TcpCopy => self.run_tcp_copy(),
            Tool::Socat => self.run_socat(),
        }?;
        if let (Some(l), Some(b)) = (&self.link, before) {
            o.wire_bytes = l.tx_bytes().saturating_sub(b);
        }
        Ok(o)
    }

    fn usage_file(&self, name: &str) -> PathBuf {
        self.work.join(format!("{name}.usage"))
    }

    /// Waits for a tool process started under the `measure` helper; returns its status and usage.
    fn finish(&self, child: &Child, name: &str) -> Result<(std::process::ExitStatus, Usage), String> {
        let (st, _helper) = wait_usage(child).map_err(|e| format!("wait4: {e}"))?;
        let u = read_measured(&self.usage_file(name)).map_err(|e| format!("usage of {name}: {e}"))?;
        let _ = std::fs::remove_file(self.usage_file(name));
        Ok((st, u))
    }

    fn log(&self, name: &str) -> Result<File, String> {
        File::create(self.work.join(name)).map_err(|e| format!("cannot create log {name}: {e}"))
    }

    fn read_log(&self, name: &str) -> String {
        std::fs::read_to_string(self.work.join(name)).unwrap_or_default()
    }

    /// `binary`: the blockrep to run (both sides); `compare`: `sync --verify`; `delay`: through the delaying
    /// relay, with this one-way delay in ms; `level`: `compression_level` (None: blockrep's default); `aead`:
    /// `encryption = "aead"` on both sides.
    fn run_blockrep(
        &self,
        binary: &Path,
        compare: bool,
        delay: Option<u64>,
        level: Option<i32>,
        aead: bool,
    ) -> Result<Outcome, String> {
        let scfg = self.blockrep_config('s', "127.0.0.1:1", None, aead)?;
        let mut serve = self
            .sides
            .recv(&binary.to_string_lossy(), &self.usage_file("serve"))
            .args(["serve", "--announce", "--listen", &format!("{}:0", self.sides.recv_ip), "--config"])
            .arg(&scfg)
            .stdout(Stdio::piped())
            .stderr(self.log("serve.log")?)
            .spawn()
            .map_err(|e| format!("cannot start blockrep serve: {e}"))?;
        let mut announce = BufReader::new(serve.stdout.take().expect("piped"));
        let guard = Reap(Some(&serve));
        let mut line = String::new();
        announce.read_line(&mut line).map_err(|e| format!("reading serve's announce line: {e}"))?;
        let addr = line
            .trim()
            .strip_prefix("listening on ")
            .ok_or_else(|| format!("blockrep serve did not announce its address: {}", self.read_log("serve.log")))?
            .to_owned();
        let mut relay = None;
        let addr = if let Some(delay_ms) = delay {
            let mut r = self
                .sides
                .send(&self.self_exe.to_string_lossy(), &self.usage_file("relay"))
                .args(["delay-proxy", "127.0.0.1:0", &addr, &delay_ms.to_string()])
                .stdout(Stdio::piped())
                .stderr(self.log("relay.err")?)
                .spawn()
                .map_err(|e| format!("cannot start the delaying relay: {e}"))?;
            let mut out = BufReader::new(r.stdout.take().expect("piped"));
            let mut line = String::new();
            out.read_line(&mut line).map_err(|e| format!("reading the relay's address: {e}"))?;
            relay = Some((r, out));
            line.trim().to_owned()
        } else {
            addr
        };
        let pcfg = self.blockrep_config('p', &addr, level, aead)?;
        let t = Instant::now();
        let mut args = vec!["sync", "--json"];
        if compare {
            args.push("--verify");
        }
        let sync = self
            .sides
            .send(&binary.to_string_lossy(), &self.usage_file("sync"))
            .args(args)
            .arg("--config")
            .arg(&pcfg)
            .stdout(self.log("sync.out")?)
            .stderr(self.log("sync.err")?)
            .spawn()
            .map_err(|e| format!("cannot start blockrep sync: {e}"))?;
        let (st, u_sync) = self.finish(&sync, "sync")?;
        let wall_s = t.elapsed().as_secs_f64();
        if let Some((r, out)) = relay {
            terminate(&r);
            let _ = self.finish(&r, "relay");
            drop(out);
        }
        std::mem::forget(guard);
        terminate(&serve);
        let (_, u_serve) = self.finish(&serve, "serve")?;
        drop(announce);
        if !st.success() {
            return Err(format!("blockrep sync failed ({st}): {}", self.read_log("sync.err").trim()));
        }
        let out = self.read_log("sync.out");
        let v: serde_json::Value = serde_json::from_str(out.lines().next().unwrap_or(""))
            .map_err(|e| format!("blockrep sync --json printed no JSON ({e}): {out}"))?;
        let wire_bytes = v["bytes_on_wire"].as_u64().ok_or_else(|| format!("no bytes_on_wire in {v}"))?;
        // An incremental case must measure the mode it names (a restored shadow looks written outside blockrep
        // unless its modification time is put back, and would make every sync a compare sync).
        let want = if compare { "compare" } else { "incremental" };
        match v["mode"].as_str() {
            Some("full") | None => {}
            Some(m) if m == want => {}
            Some(m) => return Err(format!("blockrep ran a {m} sync where this row measures {want}: {}", v["reason"])),
        }
        Ok(Outcome { wall_s, wire_bytes, usage: u_sync.plus(u_serve), sides: (u_sync, u_serve) })
    }

    fn run_rsync(&self) -> Result<Outcome, String> {
        let port = free_port().map_err(|e| format!("no free port: {e}"))?;
        let ip = &self.sides.recv_ip;
        let daemon = self
            .sides
            .recv("rsync", &self.usage_file("rsyncd"))
            .args(["--daemon", "--no-detach", "--address", ip, "--port", &port.to_string(), "--config"])
            .arg(self.work.join("rsyncd.conf"))
            .stdout(Stdio::null())
            .stderr(self.log("rsyncd.err")?)
            .spawn()
            .map_err(|e| format!("cannot start the rsync daemon: {e}"))?;
        let guard = Reap(Some(&daemon));
        self.sides.wait_listening(port, Duration::from_secs(10)).map_err(|e| format!("rsync daemon: {e}"))?;
        let t = Instant::now();
        let client = self
            .sides
            .send("rsync", &self.usage_file("rsync"))
            .args(["--inplace", "--no-whole-file", "-I", "--stats"])
            .arg(self.src())
            .arg(format!("rsync://{ip}:{port}/vol/target.img"))
            .stdout(self.log("rsync.out")?)
            .stderr(self.log("rsync.err")?)
            .spawn()
            .map_err(|e| format!("cannot start rsync: {e}"))?;
        let (st, u_client) = self.finish(&client, "rsync")?;
        let wall_s = t.elapsed().as_secs_f64();
        // The daemon's per-connection child may still be closing: let the daemon reap it, so its usage counts.
        wait_no_grandchildren(daemon.id(), Duration::from_secs(10));
        std::mem::forget(guard);
        terminate(&daemon);
        let (_, u_daemon) = self.finish(&daemon, "rsyncd")?;
        if !st.success() {
            return Err(format!("rsync failed ({st}): {}", self.read_log("rsync.err").trim()));
        }
        let out = self.read_log("rsync.out");
        let stat = |key: &str| -> Option<u64> {
            out.lines()
                .find_map(|l| l.strip_prefix(key))
                .map(|v| v.trim().replace(',', ""))
                .and_then(|v| v.split_whitespace().next().and_then(|n| n.parse().ok()))
        };
        let sent = stat("Total bytes sent:").ok_or_else(|| format!("no 'Total bytes sent' in rsync --stats: {out}"))?;
        let recv = stat("Total bytes received:").unwrap_or(0);
        Ok(Outcome { wall_s, wire_bytes: sent + recv, usage: u_client.plus(u_daemon), sides: (u_client, u_daemon) })
    }

    fn run_tcp_copy(&self) -> Result<Outcome, String> {
        let _ = std::fs::remove_file(self.target());
        let mut recv = self
            .sides
            .recv(&self.self_exe.to_string_lossy(), &self.usage_file("tcp-recv"))
            .arg("tcp-recv")
            .arg(format!("{}:0", self.sides.recv_ip))
            .arg(self.target())
            .stdout(Stdio::piped())
            .stderr(self.log("tcp-recv.err")?)
            .spawn()
            .map_err(|e| format!("cannot start tcp-recv: {e}"))?;
        let mut announce = BufReader::new(recv.stdout.take().expect("piped"));
        let guard = Reap(Some(&recv));
        let mut line = String::new();
        announce.read_line(&mut line).map_err(|e| format!("reading tcp-recv's port: {e}"))?;
        let addr = line.trim().to_owned();
        let t = Instant::now();
        let send = self
            .sides
            .send(&self.self_exe.to_string_lossy(), &self.usage_file("tcp-send"))
            .arg("tcp-send")
            .arg(self.src())
            .arg(&addr)
            .stderr(self.log("tcp-send.err")?)
            .spawn()
            .map_err(|e| format!("cannot start tcp-send: {e}"))?;
        let (st_s, u_s) = self.finish(&send, "tcp-send")?;
        std::mem::forget(guard);
        let (st_r, u_r) = self.finish(&recv, "tcp-recv")?;
        let wall_s = t.elapsed().as_secs_f64();
        if !st_s.success() || !st_r.success() {
            return Err(format!(
                "tcp copy failed: send {st_s} {} / recv {st_r} {}",
                self.read_log("tcp-send.err").trim(),
                self.read_log("tcp-recv.err").trim()
            ));
        }
        let wire_bytes = std::fs::metadata(self.src()).map(|m| m.len()).unwrap_or(0);
        Ok(Outcome { wall_s, wire_bytes, usage: u_s.plus(u_r), sides: (u_s, u_r) })
    }

    fn run_socat(&self) -> Result<Outcome, String> {
        let _ = std::fs::remove_file(self.target());
        let port = free_port().map_err(|e| format!("no free port: {e}"))?;
        let ip = &self.sides.recv_ip;
        let recv = self
            .sides
            .recv("socat", &self.usage_file("socat-recv"))
            .arg("-u")
            .arg(format!("TCP-LISTEN:{port},bind={ip},reuseaddr"))
            .arg(format!("OPEN:{},creat,trunc,wronly", self.target().display()))
            .stderr(self.log("socat-recv.err")?)
            .spawn()
            .map_err(|e| format!("cannot start socat: {e}"))?;
        let guard = Reap(Some(&recv));
        self.sides.wait_listening(port, Duration::from_secs(10)).map_err(|e| format!("socat: {e}"))?;
        let t = Instant::now();
        let send = self
            .sides
            .send("socat", &self.usage_file("socat-send"))
            .arg("-u")
            .arg(format!("OPEN:{},rdonly", self.src().display()))
            .arg(format!("TCP:{ip}:{port}"))
            .stderr(self.log("socat-send.err")?)
            .spawn()
            .map_err(|e| format!("cannot start socat: {e}"))?;
        let (st_s, u_s) = self.finish(&send, "socat-send")?;
        std::mem::forget(guard);
        let (st_r, u_r) = self.finish(&recv, "socat-recv")?;
        let wall_s = t.elapsed().as_secs_f64();
        if !st_s.success() || !st_r.success() {
            return Err(format!("socat failed: send {st_s} / recv {st_r} {}", self.read_log("socat-recv.err").trim()));
        }
        let wire_bytes = std::fs::metadata(self.src()).map(|m| m.len()).unwrap_or(0);
        Ok(Outcome { wall_s, wire_bytes, usage: u_s.plus(u_r), sides: (u_s, u_r) })
    }
}

/// Kills and reaps a server process when a run returns early with an error.
struct Reap<'a>(Option<&'a Child>);

impl Drop for Reap<'_> {
    fn drop(&mut self) {
        if let Some(c) = self.0.take() {
            terminate(c);
            let _ = wait_usage(c);
        }
    }
}

/// `e2e tcp-recv ADDR FILE`: listens on ADDR (port 0: any), prints the bound address, receives one connection
/// into FILE and fsyncs it.
pub fn tcp_recv(addr: &str, file: &Path) -> std::io::Result<()> {
    use std::io::Write;
    let l = std::net::TcpListener::bind(addr)?;
    println!("{}", l.local_addr()?);
    std::io::stdout().flush()?;
    let (mut s, _) = l.accept()?;
    let mut f = File::create(file)?;
    std::io::copy(&mut s, &mut f)?;
    f.sync_all()
}

/// `e2e tcp-send FILE ADDR`: sends FILE through one connection to ADDR.
pub fn tcp_send(file: &Path, addr: &str) -> std::io::Result<()> {
    let mut f = File::open(file)?;
    let mut s = std::net::TcpStream::connect(addr)?;
    std::io::copy(&mut f, &mut s)?;
    s.shutdown(std::net::Shutdown::Write)
}

/// `e2e delay-proxy LISTEN TARGET DELAY_MS`: a TCP relay adding a fixed one-way delay in each direction (this
/// host has no netem). Prints the bound address, then relays every accepted connection to TARGET: per direction
/// one thread reads and stamps each chunk, another writes it out once its delay has passed, so the delay does not
/// limit the bandwidth (the relay buffers what is in flight).
pub fn delay_proxy(listen: &str, target: &str, delay: Duration) -> std::io::Result<()> {
    use std::io::Write;
    let l = std::net::TcpListener::bind(listen)?;
    println!("{}", l.local_addr()?);
    std::io::stdout().flush()?;
    for client in l.incoming() {
        let client = client?;
        let server = std::net::TcpStream::connect(target)?;
        client.set_nodelay(true)?;
        server.set_nodelay(true)?;
        for (from, to) in [(client.try_clone()?, server.try_clone()?), (server, client)] {
            std::thread::spawn(move || relay_delayed(from, to, delay));
        }
    }
    Ok(())
}

fn relay_delayed(mut from: std::net::TcpStream, mut to: std::net::TcpStream, delay: Duration) {
    use std::io::{Read, Write};
    let (tx, rx) = std::sync::mpsc::channel::<(Instant, Vec<u8>)>();
    let writer = std::thread::spawn(move || {
        for (due, buf) in rx {
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
            if to.write_all(&buf).is_err() {
                break;
            }
        }
        let _ = to.shutdown(std::net::Shutdown::Write);
    });
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if tx.send((Instant::now() + delay, buf[..n].to_vec())).is_err() {
                    break;
                }
            }
        }
    }
    drop(tx);
    let _ = writer.join();
}
