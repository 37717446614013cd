//! Running services (systemd units, hook commands), notify hooks and the reboot/poweroff command, each with a
//! timeout. Tools are run by absolute path; a failure carries the command's captured stderr.

use std::io::Read;
use std::os::unix::process::CommandExt;
use std::process::{Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::config::Service;

/// systemctl, run by absolute path.
pub const SYSTEMCTL: &str = "/usr/bin/systemctl";
/// The shell used for hooks.
pub const SH: &str = "/bin/sh";
/// Most stderr bytes kept for an error message.
const MAX_STDERR: usize = 4096;

/// Errors of running an external command.
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    /// The command could not be started.
    #[error("could not start {what}; check that the program exists and is executable")]
    Spawn {
        /// The command.
        what: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The command exited unsuccessfully.
    #[error("{what} failed ({status}): {stderr}")]
    Failed {
        /// The command.
        what: String,
        /// Its exit status.
        status: ExitStatus,
        /// Its standard error (last 4 KiB).
        stderr: String,
    },
    /// The command did not finish in time and was killed.
    #[error("{what} did not finish within {timeout_s} s and was killed; raise its timeout_s or fix the service")]
    Timeout {
        /// The command.
        what: String,
        /// The timeout.
        timeout_s: u64,
    },
}

/// Start or stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Start the service.
    Start,
    /// Stop the service.
    Stop,
}

impl Action {
    fn as_str(self) -> &'static str {
        match self {
            Action::Start => "start",
            Action::Stop => "stop",
        }
    }
}

/// Starts or stops one service: `systemctl start|stop UNIT`, or `sh -c HOOK` with BLOCKREP_ACTION=start|stop.
pub fn service(s: &Service, action: Action, env: &[(&str, &str)]) -> Result<(), ExecError> {
    let timeout = Duration::from_secs(s.timeout_s());
    let (mut cmd, what) = match s {
        Service::Unit(unit) | Service::UnitWithTimeout(crate::config::UnitSpec { unit, .. }) => {
            let mut c = Command::new(SYSTEMCTL);
            c.arg(action.as_str()).arg("--").arg(unit);
            (c, format!("`systemctl {} {unit}`", action.as_str()))
        }
        Service::Hook(h) => {
            let mut c = Command::new(SH);
            c.arg("-c").arg(&h.hook).env("BLOCKREP_ACTION", action.as_str());
            (c, format!("hook `{}` ({})", h.hook, action.as_str()))
        }
    };
    cmd.envs(env.iter().copied());
    run(cmd, what, timeout)
}

/// Runs a shell command (notify hooks) with `env` and a timeout.
pub fn shell(command: &str, env: &[(&str, &str)], timeout: Duration) -> Result<(), ExecError> {
    let mut c = Command::new(SH);
    c.arg("-c").arg(command).envs(env.iter().copied());
    run(c, format!("command `{command}`"), timeout)
}

/// Runs an argv command with a timeout.
pub fn argv(argv: &[String], timeout: Duration) -> Result<(), ExecError> {
    let what = format!("`{}`", argv.join(" "));
    let Some((prog, args)) = argv.split_first() else {
        return Err(ExecError::Spawn { what, source: std::io::Error::other("empty command") });
    };
    let mut c = Command::new(prog);
    c.args(args);
    run(c, what, timeout)
}

fn run(mut cmd: Command, what: String, timeout: Duration) -> Result<(), ExecError> {
    cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped()).process_group(0);
    let mut child = cmd.spawn().map_err(|source| ExecError::Spawn { what: what.clone(), source })?;
    // Collect stderr in a thread; a daemon that keeps the pipe open must not block us, so the buffer is shared.
    let buf = Arc::new(Mutex::new(Vec::new()));
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    if let Some(mut err) = child.stderr.take() {
        let (buf, done) = (buf.clone(), done.clone());
        std::thread::spawn(move || {
            let mut chunk = [0u8; 1024];
            while let Ok(n) = err.read(&mut chunk) {
                if n == 0 {
                    break;
                }
                let mut b = buf.lock().unwrap_or_else(|p| p.into_inner());
                b.extend_from_slice(&chunk[..n]);
                if b.len() > MAX_STDERR {
                    let cut = b.len() - MAX_STDERR;
                    b.drain(..cut);
                }
            }
            done.store(true, std::sync::atomic::Ordering::Release);
        });
    }
    let deadline = Instant::now() + timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(st)) => break st,
            Ok(None) if Instant::now() >= deadline => {
                // Kill the whole process group the command started.
                let _ = nix::sys::signal::killpg(
                    nix::unistd::Pid::from_raw(child.id() as i32),
                    nix::sys::signal::Signal::SIGKILL,
                );
                let _ = child.wait();
                return Err(ExecError::Timeout { what, timeout_s: timeout.as_secs() });
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(5)),
            Err(source) => return Err(ExecError::Spawn { what, source }),
        }
    };
    if status.success() {
        return Ok(());
    }
    let grace = Instant::now() + Duration::from_millis(200);
    while !done.load(std::sync::atomic::Ordering::Acquire) && Instant::now() < grace {
        std::thread::sleep(Duration::from_millis(5));
    }
    let stderr = String::from_utf8_lossy(&buf.lock().unwrap_or_else(|p| p.into_inner())).trim().to_string();
    Err(ExecError::Failed { what, status, stderr })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::HookSpec;

    fn hook(cmd: &str, t: u64) -> Service {
        Service::Hook(HookSpec { hook: cmd.into(), timeout_s: Some(t) })
    }

    #[test]
    fn hook_gets_action_and_env_and_failure_carries_stderr() {
        let d = tempfile::tempdir().unwrap();
        let out = d.path().join("out");
        let cmd = format!("echo \"$BLOCKREP_ACTION $X\" >> {}", out.display());
        service(&hook(&cmd, 5), Action::Start, &[("X", "1")]).unwrap();
        service(&hook(&cmd, 5), Action::Stop, &[("X", "2")]).unwrap();
        assert_eq!(std::fs::read_to_string(&out).unwrap(), "start 1\nstop 2\n");
        let e = service(&hook("echo broken >&2; exit 3", 5), Action::Start, &[]).unwrap_err();
        assert!(e.to_string().contains("broken") && e.to_string().contains("exit status: 3"), "{e}");
    }

    #[test]
    fn timeout_kills_the_whole_group() {
        let d = tempfile::tempdir().unwrap();
        let marker = d.path().join("late");
        let t = Instant::now();
        let cmd = format!("(sleep 2; touch {}) & sleep 30", marker.display());
        let e = service(&hook(&cmd, 1), Action::Start, &[]).unwrap_err();
        assert!(matches!(e, ExecError::Timeout { .. }), "{e}");
        assert!(t.elapsed() < Duration::from_secs(5));
        std::thread::sleep(Duration::from_millis(2500));
        assert!(!marker.exists(), "a child of the timed-out hook survived");
    }
}
