//! The standby under abuse and bad days, with real processes on 127.0.0.1: a flood of unauthenticated
//! connections, trickling handshakes, a primary that vanishes mid-transfer without a reset, and a standby that is
//! stopped mid-transfer.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use super::network::Pair;
use super::*;

fn signal(pid: u32, sig: &str) {
    let st = std::process::Command::new("kill").args([sig, &pid.to_string()]).status().unwrap();
    assert!(st.success(), "kill {sig} {pid}");
}

/// Peak resident memory of a process, from /proc.
fn peak_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).expect("VmHWM in /proc/PID/status");
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// A frame header as a client would send it first (type Hello), announcing `len` payload bytes.
fn hello_header(len: u32) -> Vec<u8> {
    let mut h = b"BRP1".to_vec();
    h.extend_from_slice(&1u16.to_le_bytes());
    h.extend_from_slice(&[1, 0]);
    h.extend_from_slice(&len.to_le_bytes());
    h.extend_from_slice(&[0u8; 12]);
    h
}

/// A background `blockrep sync` of the pair, sending at most `bwlimit` bytes per second.
fn slow_sync(p: &Pair, bwlimit: &str) -> Child {
    let cfg = p.config("primary", &p.path("key"), &p.addr);
    blockrep()
        .args(["sync", "--json", "--bwlimit", bwlimit, "--config"])
        .arg(cfg)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Every fourth 4 KiB block of the first `mib` MiB, rewritten with incompressible bytes.
fn change_mib(p: &Pair, mib: u64, seed: u8) {
    let blocks: Vec<u64> = (0..mib * 256).filter(|b| b % 4 != 3).collect();
    scribble(&p.path("src.img"), &blocks, seed);
}

#[test]
fn an_unauthenticated_flood_keeps_serve_small_and_a_real_sync_still_succeeds() {
    let mut p = Pair::new(4 << 20);
    p.start_serve();
    p.sync_ok();
    let pid = p.serve.as_ref().unwrap().id();

    // Five connections that trickle a valid-looking handshake, one byte a second.
    let tricklers: Vec<TcpStream> = (0..5).map(|_| TcpStream::connect(&p.addr).unwrap()).collect();
    let dribble: Vec<TcpStream> = tricklers.iter().map(|s| s.try_clone().unwrap()).collect();
    std::thread::spawn(move || {
        for byte in hello_header(64) {
            for mut s in &dribble {
                let _ = s.write_all(&[byte]);
            }
            std::thread::sleep(Duration::from_secs(1));
        }
    });
    // 200 connections announcing the largest payload a frame may carry after authentication.
    let max = netproto::frame::MAX_PAYLOAD as u32;
    let mut flood = Vec::new();
    for _ in 0..200 {
        if let Ok(mut s) = TcpStream::connect_timeout(&p.addr.parse().unwrap(), Duration::from_secs(5)) {
            let _ = s.write_all(&hello_header(max));
            flood.push(s);
        }
    }
    assert!(flood.len() >= 150, "only {} flood connections were accepted by the kernel", flood.len());

    // A real sync goes through while the trickling connections still hold their handshake slots.
    scribble(&p.path("src.img"), &[3, 300, 900], 9);
    let r = p.sync_ok();
    assert_eq!(r["generation"], 2, "{r}");
    assert!(p.identical());
    let started = Instant::now();
    let rss = peak_rss_kib(pid);
    assert!(rss < 128 * 1024, "serve's peak RSS is {rss} KiB under the flood (limit 128 MiB)");

    // The trickling connections are cut at the handshake deadline, not kept open byte by byte.
    for mut s in tricklers {
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut buf = [0u8; 64];
        let cut = matches!(s.read(&mut buf), Ok(0) | Err(_));
        assert!(cut, "a trickling connection got an answer instead of being cut");
    }
    assert!(started.elapsed() < Duration::from_secs(25), "trickling connections were kept past the deadline");
    let (status, log) = p.stop_serve();
    assert!(status.success(), "serve: {log}");
    assert!(log.contains("no complete handshake within"), "{log}");
    assert!(log.contains("before authentication"), "{log}");
}

#[test]
fn a_vanished_primary_releases_its_volume_after_the_idle_timeout_and_the_next_sync_resumes() {
    let mut p = Pair::new(16 << 20);
    p.standby_extra = "idle_timeout_s = 2".into();
    p.start_serve();
    p.sync_ok();
    change_mib(&p, 12, 4);
    // A sync that will take several seconds, stopped mid-transfer: no reset, no FIN, just silence. It runs as
    // a vanished primary would: its own state directory (a copy at generation 1) and so its own sync lock, which
    // a stopped process on this node would otherwise keep holding.
    let copied = std::process::Command::new("cp")
        .arg("-a")
        .arg(p.path("state-primary"))
        .arg(p.path("state-stalled"))
        .status()
        .unwrap();
    assert!(copied.success());
    let mut stalled = blockrep()
        .args(["sync", "--json", "--bwlimit", "1M", "--config"])
        .arg(p.config("stalled", &p.path("key"), &p.addr))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(2500));
    signal(stalled.id(), "-STOP");

    // Within the idle timeout (plus scheduling slack) the volume is free again and the next sync resumes.
    let deadline = Instant::now() + Duration::from_secs(20);
    let report = loop {
        let o = p.sync();
        if o.status.success() {
            break serde_json::from_str::<serde_json::Value>(stdout(&o).trim()).unwrap();
        }
        let err = stderr(&o);
        assert!(err.contains("another sync of volume vol is running"), "unexpected failure: {err}");
        assert!(Instant::now() < deadline, "the stalled session still holds the volume: {err}");
        std::thread::sleep(Duration::from_millis(500));
    };
    signal(stalled.id(), "-KILL");
    let _ = stalled.wait();
    assert!(p.identical(), "the shadow differs from the source after the resumed sync");
    assert_eq!(report["generation"], 2, "{report}");
    assert!(report["resumed_bytes"].as_u64().unwrap() > 0, "the stalled transfer's spool was not kept: {report}");
    let (_, log) = p.stop_serve();
    assert!(log.contains("the primary vanished: nothing received for 2 s"), "{log}");
}

#[test]
fn stopping_serve_mid_transfer_tells_the_primary_and_keeps_the_shadow() {
    let mut p = Pair::new(8 << 20);
    p.start_serve();
    p.sync_ok();
    let before = std::fs::read(p.path("shadow.img")).unwrap();
    change_mib(&p, 6, 5);
    let sync = slow_sync(&p, "1M");
    std::thread::sleep(Duration::from_millis(2000));
    let (status, log) = p.stop_serve();
    assert!(status.success(), "serve did not stop cleanly: {log}");
    let o = sync.wait_with_output().unwrap();
    assert!(!o.status.success(), "the sync succeeded although the standby stopped");
    let err = stderr(&o);
    assert!(err.contains("is shutting down"), "the primary was not told why: {err}");
    assert!(!err.contains("Broken pipe"), "{err}");
    assert_eq!(std::fs::read(p.path("shadow.img")).unwrap(), before, "the shadow changed");
}

#[test]
fn a_shadow_aimed_at_the_state_directory_is_refused_at_load_by_every_command() {
    let d = tempfile::tempdir().unwrap();
    let state = d.path().join("state");
    let o = run(blockrep().arg("keygen").arg(d.path().join("key")));
    assert!(o.status.success(), "{}", stderr(&o));
    for target in ["standby/vol/manifest", "standby/vol/spool", "."] {
        let cfg = d.path().join("c.toml");
        let text = format!(
            "node = \"s\"\nkey_file = {:?}\nstate_dir = {state:?}\n[standby]\nlisten = \"127.0.0.1:0\"\n\
             [[volume]]\nname = \"vol\"\nshadow = {:?}\n",
            d.path().join("key"),
            state.join(target)
        );
        std::fs::write(&cfg, text).unwrap();
        for args in
            [&["serve"][..], &["status"], &["sync"], &["promote", "--dry-run"], &["shadow", "create", "--size", "1M"]]
        {
            let o = run(blockrep().args(args).arg("--config").arg(&cfg));
            assert_eq!(o.status.code(), Some(2), "{args:?} with shadow {target}: {}", stderr(&o));
            assert!(stderr(&o).contains("where blockrep keeps its own files"), "{args:?}: {}", stderr(&o));
            assert!(!state.exists(), "{args:?} wrote into the state directory");
        }
    }
}

/// Builds, with the engine's fault injection, a standby whose last sync crashed in the middle of applying a
/// committed spool: the shadow is neither the old nor the new generation. Returns (old, new) contents.
fn crash_mid_apply(p: &Pair) -> (Vec<u8>, Vec<u8>) {
    use engine::durable::{Durable, FaultPlan};
    use engine::sync::{sync_volume, SyncOptions};
    use engine::target::{Target, TargetOptions};
    use engine::volume::{Access, IoOptions, Volume};

    let (src, shadow) = (p.path("src.img"), p.path("shadow.img"));
    let standby_dir = p.path("state-standby/standby/vol");
    let manifest = p.path("state-primary/primary/vol/manifest");
    std::fs::create_dir_all(&standby_dir).unwrap();
    std::fs::create_dir_all(manifest.parent().unwrap()).unwrap();
    let old = std::fs::read(&src).unwrap();
    let mut new = old.clone();
    for b in new.chunks_mut(4096).step_by(3) {
        b.iter_mut().for_each(|x| *x = x.wrapping_add(1));
    }
    let io = IoOptions::default();
    let sync = |durable: &Durable| {
        let opts = TargetOptions { durable: durable.clone(), ..TargetOptions::new("vol", io) };
        let mut t = Target::open(&shadow, &standby_dir, opts).unwrap();
        let v = Volume::open(&src, Access::Read, &io).unwrap();
        sync_volume("vol", &v, &manifest, &mut t, &SyncOptions::new(65536), &mut |_, _| {}).map(|_| ())
    };
    for n in 0.. {
        // Start from the committed old generation each time.
        let _ = std::fs::remove_dir_all(p.path("state-standby"));
        let _ = std::fs::remove_dir_all(p.path("state-primary"));
        std::fs::create_dir_all(&standby_dir).unwrap();
        std::fs::create_dir_all(manifest.parent().unwrap()).unwrap();
        std::fs::write(&shadow, vec![0u8; old.len()]).unwrap();
        std::fs::write(&src, &old).unwrap();
        sync(&Durable::new()).unwrap();
        std::fs::write(&src, &new).unwrap();
        let d = Durable::with_plan(FaultPlan { crash_after: n, torn: false, lose_unsynced: false });
        assert!(sync(&d).is_err(), "no crash point left inside the apply");
        let now = std::fs::read(&shadow).unwrap();
        if now != old && now != new {
            return (old, new);
        }
    }
    unreachable!()
}

#[test]
fn serve_finishes_a_commit_interrupted_mid_apply_before_it_accepts_a_connection() {
    let mut p = Pair::new(1 << 20);
    let (old, new) = crash_mid_apply(&p);
    let half = std::fs::read(p.path("shadow.img")).unwrap();
    assert!(half != old && half != new);
    p.start_serve();
    // The daemon announced its address: no connection yet, and the shadow is already the new generation.
    assert_eq!(std::fs::read(p.path("shadow.img")).unwrap(), new, "serve accepted with a half-applied shadow");
    let r = p.sync_ok();
    assert_eq!(r["blocks_changed"], 0, "{r}");
}

/// A proxy to `target` that forwards everything, except that on the first connection it swallows the standby's
/// CommitAck frame and closes: the primary cannot know whether its commit happened. Later connections pass.
fn proxy_losing_the_commit_ack(target: String) -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        for (i, client) in l.incoming().enumerate() {
            let Ok(client) = client else { return };
            let server = TcpStream::connect(&target).unwrap();
            let (mut c_in, mut s_out) = (client.try_clone().unwrap(), server.try_clone().unwrap());
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut c_in, &mut s_out);
            });
            let (mut s_in, mut c_out) = (server, client);
            std::thread::spawn(move || loop {
                // One frame at a time: 24-byte header (type at 6, flags at 7, payload length at 8..12), payload,
                // and a 16-byte MAC when flag 1 is set.
                let mut h = [0u8; 24];
                if s_in.read_exact(&mut h).is_err() {
                    break;
                }
                let len =
                    u32::from_le_bytes(h[8..12].try_into().unwrap()) as usize + if h[7] & 1 != 0 { 16 } else { 0 };
                let mut rest = vec![0u8; len];
                if s_in.read_exact(&mut rest).is_err() {
                    break;
                }
                if i == 0 && h[6] == 16 {
                    let _ = c_out.shutdown(std::net::Shutdown::Both);
                    let _ = s_in.shutdown(std::net::Shutdown::Both);
                    break;
                }
                if c_out.write_all(&h).and_then(|()| c_out.write_all(&rest)).is_err() {
                    break;
                }
            });
        }
    });
    addr
}

#[test]
fn a_sync_that_loses_the_commit_acknowledgement_asks_the_standby_and_says_what_it_holds() {
    let mut p = Pair::new(2 << 20);
    p.start_serve();
    let via = proxy_losing_the_commit_ack(p.addr.clone());
    let o = p.sync_via(&via, &p.path("key"));
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let err = stderr(&o);
    assert!(err.contains("the standby had already committed generation 1"), "{err}");
    assert!(!err.contains("keeps its last complete generation"), "{err}");
    assert!(p.identical(), "the standby did commit");
    // The primary's manifest was not updated: the next sync compares both sides and ships nothing.
    let r = p.sync_ok();
    assert_eq!((r["mode"].as_str(), r["bytes_sent"].as_u64()), (Some("compare"), Some(0)), "{r}");
}

#[test]
fn messages_tell_the_truth_about_role_state_shadows_and_colour() {
    let mut p = Pair::new(1 << 20);
    std::fs::remove_file(p.path("shadow.img")).unwrap();
    p.start_serve();
    // A missing file shadow: the hint works for files too.
    let o = p.sync();
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("blockrep shadow create vol"), "{}", stderr(&o));
    let standby_cfg = p.config("standby", &p.path("key"), "127.0.0.1:1");
    let o = run(blockrep().args(["shadow", "create", "vol", "--config"]).arg(&standby_cfg));
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(std::fs::metadata(p.path("shadow.img")).unwrap().len(), 1 << 20);
    let o = run(blockrep()
        .args(["sync", "--json", "--config"])
        .arg(p.config("primary", &p.path("key"), &p.addr))
        .env("BLOCKREP_LOG", "info"));
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(p.identical());
    assert!(!stderr(&o).contains('\x1b'), "colour codes in a log that is not a terminal: {:?}", stderr(&o));

    // A damaged role state: the standby refuses, and says why, instead of claiming to be primary.
    let role_state = p.path("state-standby/role/role.state");
    std::fs::create_dir_all(role_state.parent().unwrap()).unwrap();
    std::fs::write(&role_state, b"\x00garbage").unwrap();
    let o = p.sync();
    assert_eq!(o.status.code(), Some(1));
    let err = stderr(&o);
    assert!(err.contains("cannot read its role state") && !err.contains("is primary"), "{err}");
    let (_, log) = p.stop_serve();
    assert!(!log.contains('\x1b'), "colour codes in serve's log: {log:?}");

    // [role] with an unknown key: status is a configuration error; a dry-run switchover with no peer fails
    // as the real one would.
    let role = |extra: &str| {
        let text = format!(
            "node = \"a\"\nkey_file = {:?}\nstate_dir = {:?}\n[standby]\nlisten = \"127.0.0.1:0\"\n\
             peer = \"127.0.0.1:1\"\n[role]\ninterface = \"lo\"\nvip = \"127.0.0.99/8\"\n{extra}",
            p.path("key"),
            p.path("state-role")
        );
        let c = p.path("role.toml");
        std::fs::write(&c, text).unwrap();
        c
    };
    let o = run(blockrep().args(["status", "--config"]).arg(role("colour = \"red\"\n")));
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("colour"), "{}", stderr(&o));
    let o = run(blockrep().args(["switchover", "--dry-run", "--config"]).arg(role("")));
    assert_ne!(o.status.code(), Some(0), "a dry run succeeded where the switchover would fail: {}", stdout(&o));
    assert!(stderr(&o).contains("cannot be asked"), "{}", stderr(&o));
}
