//! `blockrep demo`: the embedded default. Builds a file-backed primary volume with realistic content, syncs it to
//! a shadow, changes a few percent of scattered 4 KiB blocks, syncs again, and proves the shadow byte-identical.

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use node::config::Config;
use node::primary::{sync_one, NetReport, NetSyncOptions};
use rand::{Rng, RngCore, SeedableRng};

use crate::args::DemoArgs;
use node::text::bytes;

/// Seed of the demo's content, so every run shows the same volume.
const SEED: u64 = 0x0b10c4e9;

/// `blockrep demo`.
pub fn run(a: &DemoArgs) -> Result<()> {
    if a.size < 1 << 20 {
        bail!("--size must be at least 1M");
    }
    let mut tmp = None;
    let dir: PathBuf = match &a.dir {
        Some(d) => {
            std::fs::create_dir_all(d).with_context(|| format!("cannot create {}", d.display()))?;
            d.clone()
        }
        None => {
            let t = tempfile::Builder::new().prefix("blockrep-demo-").tempdir().context("cannot create a temp dir")?;
            let p = t.path().to_owned();
            tmp = Some(t);
            p
        }
    };
    let primary = dir.join("primary.img");
    let shadow = dir.join("shadow.img");
    let state = dir.join("state");
    if !a.json {
        println!("blockrep demo in {}: {} primary volume, file-backed shadow", dir.display(), bytes(a.size));
    }
    let mut rng = rand::rngs::SmallRng::seed_from_u64(SEED);
    write_realistic(&primary, a.size, &mut rng)?;
    File::create(&shadow)
        .and_then(|f| f.set_len(a.size))
        .with_context(|| format!("cannot create {}", shadow.display()))?;

    let io = a.io.options();
    let local = node::local::LocalSync {
        name: "demo".into(),
        source: primary.clone(),
        target: shadow.clone(),
        state_dir: state.clone(),
        io,
        block_size: node::config::BlockSize::Auto,
        no_refine: false,
    };
    // Without --local, the standby daemon runs in this process, on a thread, and the sync goes through TCP.
    let mut standby = None;
    if !a.local {
        let key = dir.join("key");
        node::generate_key(&key, true)?;
        let mut cfg = Config::parse(&config_text(&key, &state, &primary, &shadow), &dir.join("demo.toml"))?;
        let server = node::serve::Server::bind(cfg.clone(), None, io)?;
        let addr = server.local_addr()?.to_string();
        if !a.json {
            println!("standby: `blockrep serve` in this process, listening on {addr}");
        }
        cfg.peer = Some(addr); // the primary's view: the same node, with the standby's address
        standby = Some((cfg, server.stopper(), std::thread::spawn(move || server.run())));
    }
    let sync = || -> Result<NetReport> {
        Ok(match &standby {
            Some((cfg, ..)) => {
                sync_one(cfg, &cfg.volumes[0], &primary, &NetSyncOptions { io, ..Default::default() }, &mut |_, _| {})?
            }
            None => NetReport { sync: local.run(&mut |_, _| {})?, bytes_on_wire: 0, compression_ratio: 1.0 },
        })
    };
    let result = (|| -> Result<_> {
        let first = sync()?;
        let changed = change_scattered(&primary, a.size, a.change_percent, &mut rng)?;
        Ok((changed, [("initial full sync", first), ("incremental sync", sync()?)]))
    })();
    if let Some((_, stopper, serving)) = standby {
        stopper.stop();
        serving.join().map_err(|_| anyhow::anyhow!("the demo standby failed"))??;
    }
    let (changed, rows) = result?;

    let (hp, hs) = (file_hash(&primary)?, file_hash(&shadow)?);
    let identical = hp == hs;
    if a.json {
        for (what, r) in &rows {
            let mut v = serde_json::to_value(r)?;
            v["step"] = (*what).into();
            println!("{v}");
        }
        println!("{}", serde_json::json!({"verified": identical, "blake3_primary": hp, "blake3_shadow": hs}));
    } else {
        print_table(&rows, changed);
        println!(
            "verify: BLAKE3(primary) = {}…  BLAKE3(shadow) = {}…  {}",
            &hp[..16],
            &hs[..16],
            if identical { "identical" } else { "DIFFERENT" }
        );
    }
    if let (true, Some(t)) = (a.keep, tmp) {
        let kept = t.keep();
        if !a.json {
            println!("kept {}", kept.display());
        }
    }
    if !identical {
        bail!("the shadow differs from the primary after the demo's sync: this is a bug, please report it");
    }
    Ok(())
}

fn print_table(rows: &[(&str, NetReport)], changed_4k: u64) {
    println!("changed {changed_4k} scattered 4 KiB blocks between the syncs ({})", bytes(changed_4k * 4096));
    println!(
        "{:<18} {:>12} {:>12} {:>12} {:>12} {:>9} {:>12}",
        "sync", "scanned", "changed", "sent", "on the wire", "time", "throughput"
    );
    for (what, n) in rows {
        let r = &n.sync;
        println!(
            "{:<18} {:>12} {:>12} {:>12} {:>12} {:>8.2}s {:>10}/s",
            what,
            bytes(r.bytes_scanned),
            bytes(r.bytes_changed),
            bytes(r.bytes_sent),
            if n.bytes_on_wire == 0 { "-".to_string() } else { bytes(n.bytes_on_wire) },
            r.duration_s,
            bytes((r.bytes_scanned as f64 / r.duration_s.max(1e-9)) as u64)
        );
    }
}

/// Content like a small server's disk: incompressible regions (compressed files, media), text-like compressible
/// regions (logs, databases) and never-written zero regions, in 1 MiB runs.
fn write_realistic(path: &Path, size: u64, rng: &mut impl RngCore) -> Result<()> {
    let mut f = File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
    let words: [&[u8]; 8] =
        [b"INVITE sip:", b"200 OK ", b"call-id=", b"2026-11-25T10:00:00Z ", b"user ", b"REGISTER ", b"BYE ", b"\n"];
    let mut buf = vec![0u8; 1 << 20];
    let mut left = size;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        let kind = rng.next_u32() % 20;
        if kind < 8 {
            rng.fill_bytes(&mut buf[..n]);
        } else if kind < 15 {
            let mut i = 0;
            while i < n {
                let w = words[(rng.next_u32() % 8) as usize];
                let k = w.len().min(n - i);
                buf[i..i + k].copy_from_slice(&w[..k]);
                i += k;
            }
        } else {
            buf[..n].fill(0);
        }
        f.write_all(&buf[..n])?;
        left -= n as u64;
    }
    f.sync_all()?;
    Ok(())
}

/// Overwrites `percent` % of the volume's 4 KiB blocks, at random places, with random bytes. Returns how many.
fn change_scattered(path: &Path, size: u64, percent: f64, rng: &mut rand::rngs::SmallRng) -> Result<u64> {
    let f = std::fs::OpenOptions::new().write(true).open(path)?;
    let blocks = size / 4096;
    let n = ((blocks as f64) * percent / 100.0).round() as u64;
    let mut buf = [0u8; 4096];
    for _ in 0..n {
        rng.fill_bytes(&mut buf);
        let b = rng.gen_range(0..blocks);
        f.write_all_at(&buf, b * 4096)?;
    }
    f.sync_all()?;
    Ok(n)
}

/// BLAKE3 of a whole file (hex).
pub fn file_hash(path: &Path) -> Result<String> {
    let f = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    Ok(blake3::Hasher::new().update_reader(f)?.finalize().to_hex().to_string())
}

/// The demo's configuration: one volume, both sides on this node, the standby on a free port of 127.0.0.1.
fn config_text(key: &Path, state: &Path, source: &Path, shadow: &Path) -> String {
    format!(
        "node = \"demo\"\nkey_file = {key:?}\nstate_dir = {state:?}\n[standby]\nlisten = \"127.0.0.1:0\"\n\
         [[volume]]\nname = \"demo\"\nsource = {source:?}\nshadow = {shadow:?}\n"
    )
}
