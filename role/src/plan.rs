//! The promote and demote plans: ordered, journaled, idempotent steps.
//!
//! Promote: guards → `role-promoting` → `stop-syncs` → `boot-target` → `vip` (addresses, gateways, routes) →
//! `garp` (gratuitous ARP / unsolicited neighbour advertisements) → `stop-standby-services` → `start-primary-services` → `notify` → `role-primary` → optional `reboot`.
//!
//! Demote: `role-demoting` → `stop-primary-services` → `vip-remove` → `boot-target` → `start-standby-services`
//! → `notify` → (`disable-primary-services` with poweroff) → `role-standby` → optional `poweroff`.
//!
//! Each step (and each service and LV rename inside a step) is recorded in the state file when it completes.
//! Running the same plan again skips what the journal says is done and repeats the rest; every step is
//! idempotent, so a crash at any point is finished by running the command again. Guards run on every attempt.

use std::fmt;
use std::net::IpAddr;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use link::error_chain;
use serde::Serialize;

use crate::arp::{self, ArpError, MacAddr};
use crate::boot::{self, BootError, LvRenamer};
use crate::config::{BootTarget, Config, Service};
use crate::exec::{self, Action, ExecError};
use crate::ndp::{self, NdpError};
use crate::netlink::{self, NetlinkError};
use crate::state::{self, FailedStep, PlanKind, PlanProgress, Role, RoleState, StateError, Switchover};

/// Checks that need the engine and the network protocol; the CLI implements them.
pub trait Guards {
    /// Refuse (`Err(reason)`) unless every shadow is at a committed generation (roll a committed spool forward
    /// first). `Ok` carries the time of the last completed sync (Unix seconds), if known, to print the data age.
    fn data_committed(&self) -> Result<Option<u64>, String>;
    /// Refuse (`Err(reason)`) if the peer answers on blockrep's protocol and says it is primary. `Ok` carries a
    /// note for the report ("peer is standby", "peer unreachable").
    fn peer_not_primary(&self) -> Result<String, String>;
}

/// Guards that always pass (for tests, and for nodes without engine state).
#[derive(Debug, Clone, Copy, Default)]
pub struct NoGuards;

impl Guards for NoGuards {
    fn data_committed(&self) -> Result<Option<u64>, String> {
        Ok(None)
    }
    fn peer_not_primary(&self) -> Result<String, String> {
        Ok("no peer check configured".into())
    }
}

/// Options of one promote or demote run.
#[derive(Default)]
pub struct Options<'a> {
    /// Skip the guards.
    pub force: bool,
    /// Print the plan, change nothing.
    pub dry_run: bool,
    /// Reason recorded in the state and passed to notify hooks.
    pub reason: String,
    /// LVM binding for `boot_target.kind = "lv-rename"`.
    pub lvm: Option<&'a dyn LvRenamer>,
    /// Demote only: disable the primary-only units and power off at the end.
    pub poweroff: bool,
    /// Called with the journal key after each step is recorded (fault injection in tests).
    pub after_step: Option<&'a dyn Fn(&str)>,
    /// Promote only: the caller found this node primary and prepared nothing for its shadows; refuse, instead of
    /// running the whole plan, when the role changed before the state lock was taken.
    pub reassert_only: bool,
}

impl fmt::Debug for Options<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Options")
            .field("force", &self.force)
            .field("dry_run", &self.dry_run)
            .field("reason", &self.reason)
            .field("poweroff", &self.poweroff)
            .field("reassert_only", &self.reassert_only)
            .finish_non_exhaustive()
    }
}

/// Errors of a promote or demote run.
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    /// A guard refused (refused as unsafe).
    #[error("refusing to promote: {reason} (guard: {guard}); fix the cause, or use --force if you are sure")]
    Refused {
        /// Which guard.
        guard: &'static str,
        /// Why.
        reason: String,
    },
    /// Another host answered an ARP probe (IPv4) or duplicate address detection (IPv6) for a virtual IP (refused
    /// as unsafe).
    #[error("refusing to promote: virtual IP {vip} is in use by {mac} on {interface} (it answered {probe}); demote the other node or remove the address there first, or use --force if you are sure")]
    VipInUse {
        /// The virtual IP.
        vip: IpAddr,
        /// The MAC that answered.
        mac: MacAddr,
        /// Our interface.
        interface: String,
        /// Which probe it answered: "an ARP probe" or "duplicate address detection".
        probe: &'static str,
    },
    /// The role state could not be read or written.
    #[error("could not read or write the role state")]
    State(#[from] StateError),
    /// A promote that was to re-assert the address of a primary found the node no longer primary (another plan
    /// changed the role meanwhile).
    #[error("this node is no longer primary (role {0}): another promote or demote ran meanwhile; run promote again")]
    RoleChanged(Role),
    /// The ARP probe of an IPv4 virtual IP could not run.
    #[error("could not probe the virtual IP with ARP")]
    Probe(#[source] ArpError),
    /// Duplicate address detection for an IPv6 virtual IP could not run.
    #[error("could not probe the virtual IP with IPv6 duplicate address detection")]
    DadProbe(#[source] NdpError),
    /// A step failed.
    #[error("{kind} stopped at step `{step}`; fix the cause and run {kind} again to continue from there")]
    Step {
        /// The plan.
        kind: PlanKind,
        /// Journal key of the failed step.
        step: String,
        /// The cause.
        #[source]
        source: Box<StepError>,
    },
}

impl PlanError {
    /// Whether this is a refusal for safety (the CLI maps it to the "refused as unsafe" exit code).
    pub fn refused_as_unsafe(&self) -> bool {
        matches!(self, PlanError::Refused { .. } | PlanError::VipInUse { .. })
    }
}

/// The cause of a failed step.
#[derive(Debug, thiserror::Error)]
pub enum StepError {
    /// Address or route change.
    #[error(transparent)]
    Netlink(#[from] NetlinkError),
    /// Gratuitous ARP or unsolicited neighbour advertisement.
    #[error(transparent)]
    Arp(#[from] ArpError),
    /// Boot target.
    #[error(transparent)]
    Boot(#[from] BootError),
    /// Service, reboot or poweroff command.
    #[error(transparent)]
    Exec(#[from] ExecError),
}

/// What happened to a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Outcome {
    /// Ran now.
    Done,
    /// The journal says an earlier run did it.
    AlreadyDone,
    /// Dry run: would run.
    Planned,
    /// Not applicable or skipped (e.g. guards with --force).
    Skipped,
}

/// One line of a [`Report`].
#[derive(Debug, Clone, Serialize)]
pub struct StepReport {
    /// Journal key.
    pub step: String,
    /// What happened.
    pub outcome: Outcome,
    /// Details ("added 10.77.0.50/24 to eth0").
    pub detail: String,
    /// Time taken.
    pub millis: u64,
}

/// The result of a promote or demote run.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Which plan.
    pub kind: PlanKind,
    /// Dry run.
    pub dry_run: bool,
    /// Steps in order.
    pub steps: Vec<StepReport>,
    /// Time of the last completed sync of the promoted data (from the guards), Unix seconds.
    pub last_sync: Option<u64>,
    /// How old the promoted data was when the plan ran: seconds since `last_sync` (the commit of the oldest
    /// shadow's current generation). After an unplanned promote this is what the peer wrote since is lost.
    pub data_age_s: Option<u64>,
    /// Problems that did not stop the plan (a failing notify hook).
    pub warnings: Vec<String>,
    /// Role at the end.
    pub role: Role,
    /// Wall-clock time of the whole run.
    pub millis: u64,
}

impl Report {
    /// Whether this was a promote of a node that already was primary (it only re-asserted the virtual IP).
    pub fn reasserted(&self) -> bool {
        self.kind == PlanKind::Promote
            && self.steps.first().is_some_and(|s| s.step == "role-primary" && s.outcome == Outcome::AlreadyDone)
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let verb = if self.dry_run { "plan for" } else { "ran" };
        writeln!(f, "{verb} {}:", self.kind)?;
        for s in &self.steps {
            let o = match s.outcome {
                Outcome::Done => "done",
                Outcome::AlreadyDone => "already done",
                Outcome::Planned => "would run",
                Outcome::Skipped => "skipped",
            };
            writeln!(f, "  {:<28} {:<12} {:>5} ms  {}", s.step, o, s.millis, s.detail)?;
        }
        if let (Some(t), Some(age)) = (self.last_sync, self.data_age_s) {
            writeln!(f, "promoted data is from the sync completed {age} s before the promote (at {t})")?;
        }
        for w in &self.warnings {
            writeln!(f, "warning: {w}")?;
        }
        write!(f, "role: {} ({} ms)", self.role, self.millis)
    }
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

struct Run<'a> {
    _lock: Option<state::StateLock>,
    cfg: &'a Config,
    opts: &'a Options<'a>,
    kind: PlanKind,
    state: RoleState,
    report: Report,
}

impl<'a> Run<'a> {
    fn start(cfg: &'a Config, opts: &'a Options<'a>, kind: PlanKind) -> Result<Run<'a>, PlanError> {
        // One plan at a time (keepalived may fire BACKUP and MASTER in quick succession); a dry run only reads.
        let lock = if opts.dry_run { None } else { Some(state::lock(&cfg.state_dir)?) };
        let mut state = state::load(&cfg.state_dir)?;
        let resume = state.plan.as_ref().is_some_and(|p| p.kind == kind);
        if !resume {
            state.plan = Some(PlanProgress {
                kind,
                reason: opts.reason.clone(),
                started: unix_now(),
                done: Vec::new(),
                failed: None,
            });
        } else if let Some(p) = state.plan.as_mut() {
            p.failed = None;
        }
        let report = Report {
            kind,
            dry_run: opts.dry_run,
            steps: Vec::new(),
            last_sync: None,
            data_age_s: None,
            warnings: Vec::new(),
            role: state.role,
            millis: 0,
        };
        Ok(Run { _lock: lock, cfg, opts, kind, state, report })
    }

    fn is_done(&self, key: &str) -> bool {
        self.state.plan.as_ref().is_some_and(|p| p.done.iter().any(|k| k == key))
    }

    /// Records `key` as done and persists the state.
    fn mark(&mut self, key: &str) -> Result<(), PlanError> {
        if let Some(p) = self.state.plan.as_mut() {
            p.done.push(key.to_string());
        }
        state::store(&self.cfg.state_dir, &self.state)?;
        if let Some(hook) = self.opts.after_step {
            hook(key);
        }
        Ok(())
    }

    fn push(&mut self, step: &str, outcome: Outcome, detail: String, t: Instant) {
        let millis = t.elapsed().as_millis() as u64;
        tracing::info!(plan = %self.kind, step, ?outcome, millis, "{detail}");
        self.report.steps.push(StepReport { step: step.into(), outcome, detail, millis });
    }

    /// Runs one journaled step.
    fn step(
        &mut self,
        key: &str,
        plan: String,
        f: impl FnOnce(&mut Self) -> Result<String, StepError>,
    ) -> Result<(), PlanError> {
        let t = Instant::now();
        if self.is_done(key) {
            self.push(key, Outcome::AlreadyDone, plan, t);
            return Ok(());
        }
        if self.opts.dry_run {
            self.push(key, Outcome::Planned, plan, t);
            return Ok(());
        }
        match f(self) {
            Ok(detail) => {
                self.mark(key)?;
                self.push(key, Outcome::Done, detail, t);
                Ok(())
            }
            Err(source) => Err(self.fail(key, source)),
        }
    }

    /// Records the failure in the state (best effort) and builds the error.
    fn fail(&mut self, key: &str, source: StepError) -> PlanError {
        if let Some(p) = self.state.plan.as_mut() {
            p.failed = Some(FailedStep { step: key.to_string(), error: error_chain(&source), time: unix_now() });
        }
        if let Err(e) = state::store(&self.cfg.state_dir, &self.state) {
            tracing::error!(error = %e, "could not record the failed step in the role state");
        }
        self.notify_failure(key, &source);
        PlanError::Step { kind: self.kind, step: key.to_string(), source: Box::new(source) }
    }

    fn notify_env(&self, event: &str) -> Vec<(String, String)> {
        vec![
            ("BLOCKREP_EVENT".into(), event.into()),
            ("BLOCKREP_NODE".into(), self.cfg.node_name()),
            ("BLOCKREP_REASON".into(), self.opts.reason.clone()),
        ]
    }

    fn run_notify(&self, event: &str) -> Vec<String> {
        let env = self.notify_env(event);
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let timeout = Duration::from_secs(self.cfg.notify_timeout_s);
        let mut warnings = Vec::new();
        for cmd in &self.cfg.notify {
            if let Err(e) = exec::shell(cmd, &env, timeout) {
                tracing::warn!(error = %e, "notify hook failed");
                warnings.push(e.to_string());
            }
        }
        warnings
    }

    fn notify_failure(&self, key: &str, source: &StepError) {
        let event = format!("{}-failed", self.kind);
        let env = self.notify_env(&event);
        let mut env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let err = error_chain(source);
        env.push(("BLOCKREP_FAILED_STEP", key));
        env.push(("BLOCKREP_ERROR", &err));
        for cmd in &self.cfg.notify {
            let _ = exec::shell(cmd, &env, Duration::from_secs(self.cfg.notify_timeout_s));
        }
    }

    /// Runs `services` (each journaled as `key/label`) with `action`.
    fn services(&mut self, key: &str, services: &[Service], action: Action) -> Result<(), PlanError> {
        let t = Instant::now();
        if services.is_empty() {
            self.push(key, Outcome::Skipped, "no services configured".into(), t);
            return Ok(());
        }
        let ordered: Vec<&Service> =
            if action == Action::Stop { services.iter().rev().collect() } else { services.iter().collect() };
        let verb = if action == Action::Stop { "stop" } else { "start" };
        for s in ordered {
            let sub = format!("{key}/{}", s.label());
            let past = if action == Action::Stop { "stopped" } else { "started" };
            self.step(&sub, format!("{verb} {}", s.label()), |_| {
                exec::service(s, action, &[])?;
                Ok(format!("{past} {}", s.label()))
            })?;
        }
        Ok(())
    }

    /// The boot target step for role `to`.
    fn boot_target(&mut self, to: Role) -> Result<(), PlanError> {
        let key = "boot-target";
        let t = Instant::now();
        match &self.cfg.boot_target {
            BootTarget::None => {
                self.push(key, Outcome::Skipped, "boot_target kind = none".into(), t);
                Ok(())
            }
            BootTarget::GrubEnv { path, primary_entry, standby_entry, one_shot } => {
                let entry = if to == Role::Primary { primary_entry } else { standby_entry };
                let var = if *one_shot { "next_entry" } else { "saved_entry" };
                let plan = format!("set {var}={entry} in {}", path.display());
                self.step(key, plan.clone(), |_| {
                    let changed = boot::grub_select(path, entry, *one_shot)?;
                    Ok(if changed { plan } else { format!("{var} was already {entry}") })
                })
            }
            BootTarget::LvRename { vg, pairs, temp_suffix } => {
                let renames = boot::lv_swap_plan(vg, pairs, temp_suffix);
                for (i, r) in renames.iter().enumerate() {
                    let sub = format!("{key}/rename-{i}");
                    let plan = format!("lvrename {vg}/{} {vg}/{}", r.from, r.to);
                    let lvm = self.opts.lvm;
                    self.step(&sub, plan.clone(), |_| {
                        let lvm = lvm.ok_or(BootError::NoLvm)?;
                        let did = boot::apply_rename(r, lvm)?;
                        Ok(if did { plan } else { format!("{plan}: already renamed") })
                    })?;
                }
                Ok(())
            }
        }
    }

    fn finish(mut self, t: Instant) -> Report {
        self.report.role = self.state.role;
        self.report.millis = t.elapsed().as_millis() as u64;
        self.report
    }
}

fn vip_list(cfg: &Config) -> String {
    cfg.vip.iter().map(|v| v.to_string()).collect::<Vec<_>>().join(" and ")
}

fn vip_plan(cfg: &Config) -> String {
    let mut s = format!("add {} to {}", vip_list(cfg), cfg.interface);
    for gw in &cfg.gateway {
        s.push_str(&format!(", default via {gw}"));
    }
    for r in &cfg.routes {
        s.push_str(&format!(", route {} via {}", r.to, r.via));
    }
    s
}

/// Which data the guards judge.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Data {
    /// The shadows this promote is about to serve: they must hold a committed generation.
    Shadows,
    /// None: the node already is primary and serves its own volumes; its shadows (empty on a node that was never
    /// a standby, untrusted after a reboot) say nothing about them.
    AlreadyPrimary,
}

/// Runs the guards: the caller's data check (unless `data` says there is nothing to judge) and peer check, then
/// for each VIP an ARP probe (IPv4) or duplicate address detection (IPv6).
fn guards(run: &mut Run<'_>, g: &dyn Guards, data: Data) -> Result<(), PlanError> {
    let t = Instant::now();
    if run.opts.force {
        run.push("guards", Outcome::Skipped, "--force given: guards not checked".into(), t);
        return Ok(());
    }
    if run.opts.dry_run {
        run.push(
            "guards",
            Outcome::Planned,
            format!(
                "check {}peer not primary, ARP probe / IPv6 duplicate address detection for each VIP",
                if data == Data::Shadows { "data committed, " } else { "" }
            ),
            t,
        );
        return Ok(());
    }
    if data == Data::Shadows {
        let last_sync = g.data_committed().map_err(|reason| PlanError::Refused { guard: "data", reason })?;
        run.report.last_sync = last_sync;
        run.report.data_age_s = last_sync.map(|t| unix_now().saturating_sub(t));
        if let Some(age) = run.report.data_age_s {
            tracing::info!(data_age_s = age, "promoting data from the sync completed {age} s ago");
        }
    }
    let peer = g.peer_not_primary().map_err(|reason| PlanError::Refused { guard: "peer", reason })?;
    let c = run.cfg;
    let (count, interval, wait) =
        (c.probe.count, Duration::from_millis(c.probe.interval_ms), Duration::from_millis(c.probe.wait_ms));
    // All VIPs are probed at the same time (one thread and socket each), so a dual-stack promote waits for one
    // probe round, not one per address; results are checked in configuration order.
    let probe_one = |addr: IpAddr| -> Result<(Option<MacAddr>, &'static str), PlanError> {
        Ok(match addr {
            IpAddr::V4(a) => {
                (arp::probe(&c.interface, a, count, interval, wait).map_err(PlanError::Probe)?, "an ARP probe")
            }
            IpAddr::V6(a) => (
                ndp::probe(&c.interface, a, count, interval, wait).map_err(PlanError::DadProbe)?,
                "duplicate address detection",
            ),
        })
    };
    let answers: Vec<_> = std::thread::scope(|s| {
        let handles: Vec<_> = c.vip.iter().map(|v| s.spawn(move || probe_one(v.addr))).collect();
        handles.into_iter().map(|h| h.join().expect("a probe thread panicked")).collect()
    });
    let mut nobody = Vec::new();
    for (v, answer) in c.vip.iter().zip(answers) {
        let (answer, probe) = answer?;
        if let Some(mac) = answer {
            return Err(PlanError::VipInUse { vip: v.addr, mac, interface: c.interface.clone(), probe });
        }
        nobody.push(format!("nobody answers {} for {}", if v.is_ipv6() { "DAD" } else { "ARP" }, v.addr));
    }
    run.push("guards", Outcome::Done, format!("data committed; {peer}; {}", nobody.join(", ")), t);
    Ok(())
}

/// The `vip` step: addresses, gateways, routes (each idempotent).
fn vip_up(run: &mut Run<'_>) -> Result<(), PlanError> {
    let cfg = run.cfg;
    run.step("vip", vip_plan(cfg), |_| {
        let mut d = Vec::new();
        for v in &cfg.vip {
            let added = netlink::add_address(&cfg.interface, *v)?;
            d.push(if added {
                format!("added {v} to {}", cfg.interface)
            } else {
                format!("{v} already on {}", cfg.interface)
            });
        }
        for gw in &cfg.gateway {
            netlink::add_route(&cfg.interface, None, *gw)?;
            d.push(format!("default via {gw}"));
        }
        for r in &cfg.routes {
            netlink::add_route(&cfg.interface, Some(r.to), r.via)?;
            d.push(format!("route {} via {}", r.to, r.via));
        }
        Ok(d.join(", "))
    })?;
    Ok(())
}

/// The virtual IPs of `cfg` that are not on its interface (a primary's after a reboot, or removed by hand).
pub fn missing_vips(cfg: &Config) -> Result<Vec<crate::config::IpNet>, NetlinkError> {
    let present = netlink::addresses(&cfg.interface)?;
    Ok(cfg.vip.iter().filter(|v| !present.contains(&v.addr)).copied().collect())
}

/// The `garp` step: gratuitous ARP for IPv4 VIPs, unsolicited neighbour advertisements for IPv6 VIPs.
fn garp(run: &mut Run<'_>) -> Result<(), PlanError> {
    let cfg = run.cfg;
    let g = &cfg.garp;
    let kinds = match (cfg.vip.iter().any(|v| !v.is_ipv6()), cfg.vip.iter().any(|v| v.is_ipv6())) {
        (true, true) => "gratuitous ARP / unsolicited neighbour advertisements",
        (false, true) => "unsolicited neighbour advertisements",
        _ => "gratuitous ARP",
    };
    let plan = format!("{} {kinds} for {} on {}, {} ms apart", g.count, vip_list(cfg), cfg.interface, g.interval_ms);
    run.step("garp", plan.clone(), |_| {
        arp::announce_all(cfg, g.count)?;
        Ok(format!("sent {plan}"))
    })?;
    Ok(())
}

/// Promotes this node to primary. See the module docs for the steps.
pub fn promote(cfg: &Config, g: &dyn Guards, opts: &Options<'_>) -> Result<Report, PlanError> {
    let t = Instant::now();
    let mut run = Run::start(cfg, opts, PlanKind::Promote)?;
    let fresh = run.state.plan.as_ref().is_some_and(|p| p.done.is_empty());
    if run.state.role == Role::Primary && fresh {
        // Already primary (for example after a reboot, which loses the address): re-assert the virtual IP and
        // announce it, after the guards, without journaling or touching services.
        run.push("role-primary", Outcome::AlreadyDone, "already primary; re-asserting the virtual IP".into(), t);
        run.state.plan = None;
        guards(&mut run, g, Data::AlreadyPrimary)?;
        vip_up(&mut run)?;
        garp(&mut run)?;
        return Ok(run.finish(t));
    }
    if opts.reassert_only {
        return Err(PlanError::RoleChanged(run.state.role));
    }
    guards(&mut run, g, Data::Shadows)?;
    let from = run.state.role;
    run.step("role-promoting", "record role promoting".into(), |r| {
        r.state.role = Role::Promoting;
        Ok(format!("role {from} -> promoting"))
    })?;
    run.step("stop-syncs", "stop accepting syncs (serve refuses: this node is primary)".into(), |r| {
        r.state.accept_syncs = false;
        Ok("serve no longer accepts syncs".into())
    })?;
    run.boot_target(Role::Primary)?;
    vip_up(&mut run)?;
    garp(&mut run)?;
    run.services("stop-standby-services", &cfg.services.standby_only, Action::Stop)?;
    run.services("start-primary-services", &cfg.services.primary_only, Action::Start)?;
    run.step("notify", format!("run {} notify hook(s), event promote", cfg.notify.len()), |r| {
        let w = r.run_notify("promote");
        let n = w.len();
        r.report.warnings.extend(w);
        Ok(format!("{} notify hook(s) ran, {n} failed", r.cfg.notify.len()))
    })?;
    run.step("role-primary", "record role primary".into(), |r| {
        r.state.role = Role::Primary;
        r.state.accept_syncs = false;
        r.state.last_switchover = Some(Switchover {
            time: unix_now(),
            reason: r.opts.reason.clone(),
            from: Role::Standby,
            to: Role::Primary,
        });
        r.state.plan = None;
        Ok("role primary".into())
    })?;
    if cfg.reboot {
        let cmd = cfg.reboot_command.join(" ");
        let t2 = Instant::now();
        if opts.dry_run {
            run.push("reboot", Outcome::Planned, format!("run `{cmd}`"), t2);
        } else {
            tracing::info!(command = %cmd, "promote complete; rebooting as configured");
            exec::argv(&cfg.reboot_command, Duration::from_secs(60)).map_err(|e| PlanError::Step {
                kind: PlanKind::Promote,
                step: "reboot".into(),
                source: Box::new(StepError::Exec(e)),
            })?;
            run.push("reboot", Outcome::Done, format!("ran `{cmd}`"), t2);
        }
    }
    Ok(run.finish(t))
}

/// Demotes this node to standby. See the module docs for the steps.
pub fn demote(cfg: &Config, opts: &Options<'_>) -> Result<Report, PlanError> {
    let t = Instant::now();
    let mut run = Run::start(cfg, opts, PlanKind::Demote)?;
    let fresh = run.state.plan.as_ref().is_some_and(|p| p.done.is_empty());
    if run.state.role == Role::Standby && fresh && !opts.poweroff {
        run.push("role-standby", Outcome::AlreadyDone, "already standby; nothing to do".into(), t);
        return Ok(run.finish(t));
    }
    let from = run.state.role;
    run.step("role-demoting", "record role demoting".into(), |r| {
        r.state.role = Role::Demoting;
        Ok(format!("role {from} -> demoting"))
    })?;
    run.services("stop-primary-services", &cfg.services.primary_only, Action::Stop)?;
    run.step("vip-remove", vip_plan(cfg).replacen("add", "remove", 1), |_| {
        let mut d = Vec::new();
        for r in &cfg.routes {
            netlink::del_route(&cfg.interface, Some(r.to), r.via)?;
            d.push(format!("route {} via {}", r.to, r.via));
        }
        for gw in &cfg.gateway {
            netlink::del_route(&cfg.interface, None, *gw)?;
            d.push(format!("default via {gw}"));
        }
        for v in &cfg.vip {
            let removed = netlink::del_address(&cfg.interface, *v)?;
            d.push(if removed {
                format!("removed {v} from {}", cfg.interface)
            } else {
                format!("{v} was not on {}", cfg.interface)
            });
        }
        Ok(d.join(", "))
    })?;
    run.boot_target(Role::Standby)?;
    run.services("start-standby-services", &cfg.services.standby_only, Action::Start)?;
    run.step("notify", format!("run {} notify hook(s), event demote", cfg.notify.len()), |r| {
        let w = r.run_notify("demote");
        let n = w.len();
        r.report.warnings.extend(w);
        Ok(format!("{} notify hook(s) ran, {n} failed", r.cfg.notify.len()))
    })?;
    if opts.poweroff {
        for s in &cfg.services.primary_only {
            let unit = match s {
                Service::Unit(u) | Service::UnitWithTimeout(crate::config::UnitSpec { unit: u, .. }) => u,
                Service::Hook(_) => continue,
            };
            let argv = vec![exec::SYSTEMCTL.to_string(), "disable".into(), "--".into(), unit.clone()];
            run.step(&format!("disable-primary-services/{unit}"), format!("systemctl disable {unit}"), |_| {
                exec::argv(&argv, Duration::from_secs(s.timeout_s()))?;
                Ok(format!("disabled {unit} so it does not start at boot"))
            })?;
        }
    }
    run.step("role-standby", "record role standby; serve accepts syncs again".into(), |r| {
        r.state.role = Role::Standby;
        r.state.accept_syncs = true;
        r.state.last_switchover = Some(Switchover {
            time: unix_now(),
            reason: r.opts.reason.clone(),
            from: Role::Primary,
            to: Role::Standby,
        });
        r.state.plan = None;
        Ok("role standby, accepting syncs".into())
    })?;
    if opts.poweroff {
        let cmd = cfg.poweroff_command.join(" ");
        let t2 = Instant::now();
        if opts.dry_run {
            run.push("poweroff", Outcome::Planned, format!("run `{cmd}`"), t2);
        } else {
            exec::argv(&cfg.poweroff_command, Duration::from_secs(60)).map_err(|e| PlanError::Step {
                kind: PlanKind::Demote,
                step: "poweroff".into(),
                source: Box::new(StepError::Exec(e)),
            })?;
            run.push("poweroff", Outcome::Done, format!("ran `{cmd}`"), t2);
        }
    }
    Ok(run.finish(t))
}
