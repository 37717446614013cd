//! `blockrep sync [VOLUME...]` over the network: for each configured volume, freeze it (snapshot driver), connect
//! to the standby, and run the engine's sync through a [`RemoteTarget`].

use std::time::Duration;

use anyhow::{Context, Result};
use engine::sync::{sync_volume, SyncOptions, SyncReport};
use engine::volume::{Access, IoOptions, Volume};
use serde::Serialize;

use crate::config::{self, Config};
use crate::exit::{coded, PEER_UNREACHABLE, REFUSED_BY_PEER, USAGE};
use crate::report;
use netproto::RemoteTarget;

/// One volume's result: the local sync's fields plus the wire's.
#[derive(Debug, Serialize)]
pub struct NetReport {
    /// The engine's report.
    #[serde(flatten)]
    pub sync: SyncReport,
    /// All frame bytes this node sent (handshake included).
    pub bytes_on_wire: u64,
    /// Data bytes of extents / their bytes on the wire (1.0: nothing compressed).
    pub compression_ratio: f64,
}

/// Options of a network sync.
#[derive(Debug, Clone)]
pub struct NetSyncOptions {
    /// I/O options for the source.
    pub io: IoOptions,
    /// Send-rate cap override.
    pub bwlimit: Option<u64>,
    /// Narrow changed blocks to 4 KiB pieces.
    pub refine: bool,
    /// Set by SIGINT/SIGTERM: stop between two chunks.
    pub cancel: Option<std::sync::Arc<std::sync::atomic::AtomicBool>>,
}

/// Maps a connection error to an exit code: unreachable and refused-by-peer are told apart for scripts.
pub fn conn_error(e: netproto::ConnError) -> anyhow::Error {
    use netproto::ConnError as C;
    let code = match &e {
        C::Unreachable { .. } => Some(PEER_UNREACHABLE),
        C::Handshake(_) => Some(REFUSED_BY_PEER),
        _ => None,
    };
    let msg = format!("{:#}", anyhow::Error::from(e));
    match code {
        Some(c) => coded(c, msg),
        None => anyhow::anyhow!(msg),
    }
}

/// Connects to the configured standby.
pub fn connect(cfg: &Config) -> Result<netproto::Connection> {
    let peer = cfg
        .peer
        .as_deref()
        .ok_or_else(|| coded(USAGE, format!("{} has no [primary] peer address of the standby", cfg.path.display())))?;
    let key = netproto::load_key(&cfg.key_file).map_err(|e| coded(USAGE, format!("{e:#}")))?;
    netproto::connect(peer, &key, &cfg.node, Duration::from_secs(cfg.connect_timeout_s)).map_err(conn_error)
}

/// Syncs one volume whose source is already frozen at `source`.
pub fn sync_one(cfg: &Config, vol: &config::Volume, source: &std::path::Path, o: &NetSyncOptions) -> Result<NetReport> {
    let src = Volume::open(source, Access::Read, &o.io).context("cannot open the source")?;
    let mut conn = connect(cfg)?;
    conn.set_compression(Some(cfg.compression_level)).map_err(conn_error)?;
    conn.set_bwlimit(o.bwlimit.or(cfg.bwlimit));
    let mut remote = RemoteTarget::open(conn, &vol.name, src.size(), vol.block_size)
        .with_context(|| format!("cannot open volume {} on the standby", vol.name))?;
    let primary_dir = cfg.side_dir("primary", &vol.name);
    std::fs::create_dir_all(&primary_dir)
        .with_context(|| format!("cannot create state directory {}", primary_dir.display()))?;
    let mut opts = SyncOptions::new(vol.block_size);
    opts.scan.mmap = o.io.engine == engine::io::EngineKind::Auto;
    opts.refine = o.refine;
    opts.cancel = o.cancel.clone();
    let mut bar = report::Progress::new(&vol.name);
    let r =
        sync_volume(&vol.name, &src, &primary_dir.join("manifest"), &mut remote, &opts, &mut |d, t| bar.update(d, t));
    bar.finish();
    let r = r.with_context(|| {
        format!("sync of volume {} failed; the shadow keeps its last complete generation", vol.name)
    })?;
    let conn = remote.close();
    let s = conn.stats();
    Ok(NetReport {
        sync: r,
        bytes_on_wire: s.bytes_sent,
        compression_ratio: if s.extent_wire_bytes_sent == 0 {
            1.0
        } else {
            s.extent_bytes_sent as f64 / s.extent_wire_bytes_sent as f64
        },
    })
}

/// Prints one volume's result.
pub fn print(r: &NetReport, json: bool) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string(r)?);
    } else {
        report::print_sync(&r.sync, false)?;
        println!(
            "  {} on the wire, compression ratio {:.2}, {} resumed",
            report::bytes(r.bytes_on_wire),
            r.compression_ratio,
            report::bytes(r.sync.resumed_bytes)
        );
    }
    Ok(())
}
