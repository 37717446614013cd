//! Verifying shadows against their committed generation, and asking for a compare sync on the primary
//! (`blockrep verify`, `[standby] verify_every`).
//!
//! On the standby, a verify re-hashes the shadow and compares every block with the committed manifest. A mismatch
//! marks the shadow untrusted (durably, in the target's state), raises the `shadow_untrusted` alarm and is
//! recorded in the history: the next sync then compares the shadow's actual content with the source and repairs
//! it. The last result is kept in `<state_dir>/standby/<volume>/last_verify.json`, where `status` reads it.
//!
//! The state directory is locked (the engine's target) only to read what to check against and to record the
//! result, not while the shadow is read, so that `status` keeps working during a long verify; a generation
//! committed in between makes the result inconclusive (nothing is marked). `serve` runs the periodic verify
//! ([`verify_shadow`] with a stop condition): never at the same time as a sync of that volume (a sync that
//! arrives stops it, and it runs again later), reading the shadow at the idle I/O class and nice 19.
//!
//! On the primary, `blockrep verify` writes `<state_dir>/primary/<volume>/verify_requested`; the next sync of the
//! volume compares every block with the standby's actual content ([`requested`]), and the first successful one
//! removes the request ([`consume`]).

use std::path::{Path, PathBuf};
use std::time::Instant;

use engine::manifest::Manifest;
use engine::target::{Target, TargetOptions};
use engine::volume::{Access, IoOptions, Volume};
use serde::{Deserialize, Serialize};

use crate::alarms::{AlarmKind, Judgement};
use crate::config::{Config, Volume as VolumeConfig};
use crate::layout::Side;
use crate::status::VolumeSide;
use crate::Error;

/// File in a volume's standby directory holding the last verify's result.
const RECORD_FILE: &str = "last_verify.json";
/// File in a volume's primary directory holding a request for a compare sync.
const REQUEST_FILE: &str = "verify_requested";
/// Bytes read at once while re-hashing.
const CHUNK: usize = 1 << 20;
/// How long [`open_target`] waits for another process's short hold of a state directory.
const BUSY_WAIT: std::time::Duration = std::time::Duration::from_secs(3);

/// Opens a shadow's target, waiting up to 3 s while another blockrep process holds its state directory
/// (a verify holds it for a moment before and after reading the shadow; a sync in progress longer, and then the
/// engine's `Busy` error is returned as before).
pub fn open_target(shadow: &Path, dir: &Path, opts: TargetOptions) -> Result<Target, engine::target::TargetError> {
    let started = Instant::now();
    loop {
        match Target::open(shadow, dir, opts.clone()) {
            Err(engine::target::TargetError::Busy { .. }) if started.elapsed() < BUSY_WAIT => {
                std::thread::sleep(std::time::Duration::from_millis(20))
            }
            r => return r,
        }
    }
}

/// Errors of `blockrep verify` with a configuration.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    /// The volume has neither a shadow with state nor a source here.
    #[error(
        "volume {volume}: nothing to verify on node {node}: its shadow never received a sync here and it has no \
         source"
    )]
    Nothing {
        /// Volume name.
        volume: String,
        /// This node.
        node: String,
    },
    /// The shadow holds no complete generation.
    #[error("volume {volume}: the shadow holds no complete generation yet: nothing to verify (run a sync first)")]
    Incomplete {
        /// Volume name.
        volume: String,
    },
    /// The shadow or its state could not be opened or recorded.
    #[error("volume {volume}: cannot verify the shadow")]
    Target {
        /// Volume name.
        volume: String,
        /// The engine's error.
        #[source]
        source: engine::target::TargetError,
    },
    /// The committed manifest could not be read.
    #[error("volume {volume}: cannot read the committed manifest")]
    Manifest {
        /// Volume name.
        volume: String,
        /// The engine's error.
        #[source]
        source: engine::manifest::ManifestError,
    },
    /// The shadow could not be read.
    #[error("volume {volume}: cannot read the shadow")]
    Read {
        /// Volume name.
        volume: String,
        /// The engine's error.
        #[source]
        source: engine::volume::VolumeError,
    },
    /// A sync committed another generation while the shadow was read.
    #[error(
        "volume {volume}: generation {now} was committed while generation {checked} was verified; the result \
         says nothing: run the verify again"
    )]
    Moved {
        /// Volume name.
        volume: String,
        /// The generation checked against.
        checked: u64,
        /// The generation committed now.
        now: u64,
    },
    /// The request for a compare sync could not be written.
    #[error("volume {volume}: cannot record the request for a compare sync in {}", path.display())]
    Request {
        /// Volume name.
        volume: String,
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The shadow differs from its committed generation.
    #[error(
        "volume {volume}: the shadow does not match its committed generation {generation} (block {block} \
         differs); it is marked untrusted, so the next sync compares its actual content with the source and \
         repairs it"
    )]
    Mismatch {
        /// Volume name.
        volume: String,
        /// Its committed generation.
        generation: u64,
        /// The first block that differs.
        block: u64,
    },
}

impl VerifyError {
    /// The kind of this error.
    pub fn kind(&self) -> crate::ErrorKind {
        match self {
            VerifyError::Nothing { .. } => crate::ErrorKind::Usage,
            _ => crate::ErrorKind::Failed,
        }
    }
}

/// The result of the last verify of a shadow (`last_verify.json`, shown by `status`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LastVerify {
    /// Unix seconds it finished.
    pub time: u64,
    /// The committed generation checked against.
    pub generation: u64,
    /// Whether every block matched.
    pub ok: bool,
    /// The first block that differed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mismatch_block: Option<u64>,
    /// Seconds it took.
    pub duration_s: f64,
}

/// What is kept per shadow about verifying it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
struct Record {
    /// Unix seconds from which the periodic verify counts its interval: the end of the last verify, or when
    /// `serve` first saw the shadow complete with `verify_every` set.
    since: u64,
    /// The last verify.
    #[serde(default)]
    last: Option<LastVerify>,
}

fn record_path(cfg: &Config, volume: &str) -> PathBuf {
    cfg.layout().side_dir(Side::Standby, volume).join(RECORD_FILE)
}

fn read_record(cfg: &Config, volume: &str) -> Option<Record> {
    std::fs::read(record_path(cfg, volume)).ok().and_then(|b| serde_json::from_slice(&b).ok())
}

fn write_record(cfg: &Config, volume: &str, r: &Record) {
    let path = record_path(cfg, volume);
    let json = serde_json::to_vec_pretty(r).unwrap_or_default();
    if let Err(e) = crate::status::write_atomic(&path, &json) {
        tracing::warn!(path = %path.display(), error = %e, "cannot record the verify's result");
    }
}

/// The last verify of a volume's shadow, if one was recorded.
pub fn last_verify(cfg: &Config, volume: &str) -> Option<LastVerify> {
    read_record(cfg, volume).and_then(|r| r.last)
}

/// Whether the periodic verify of `volume` is due (`every`: `[standby] verify_every`). The first time it is
/// asked about a volume it starts counting from now.
pub(crate) fn due(cfg: &Config, volume: &str, every: std::time::Duration) -> bool {
    let now = crate::history::now();
    match read_record(cfg, volume) {
        Some(r) => now >= r.since.saturating_add(every.as_secs()),
        None => {
            write_record(cfg, volume, &Record { since: now, last: None });
            false
        }
    }
}

/// Starts the periodic verify's interval of `volume` again from now (after a verify that could not run).
pub(crate) fn postpone(cfg: &Config, volume: &str) {
    let last = read_record(cfg, volume).and_then(|r| r.last);
    write_record(cfg, volume, &Record { since: crate::history::now(), last });
}

/// The calling thread at the lowest CPU and I/O priority (nice 19, idle I/O class) while this lives, so that a
/// periodic verify yields to everything else; the previous priorities come back on drop (so that what the verify
/// does afterwards, such as running notify hooks, does not inherit them). Best effort.
pub(crate) struct LowestPriority {
    tid: libc::id_t,
    nice: libc::c_int,
    ioprio: libc::c_long,
}

const IOPRIO_WHO_PROCESS: libc::c_long = 1;
const IOPRIO_CLASS_IDLE: libc::c_long = 3;
const IOPRIO_CLASS_SHIFT: libc::c_long = 13;

impl LowestPriority {
    /// Lowers the calling thread's priorities.
    pub(crate) fn new() -> LowestPriority {
        // SAFETY: gettid has no preconditions; getpriority/setpriority on this thread's id read and change only this
        // thread's nice value; ioprio_get/ioprio_set with who = 0 read and change only the calling thread's I/O
        // priority. No memory is passed.
        unsafe {
            let tid = libc::gettid() as libc::id_t;
            let nice = libc::getpriority(libc::PRIO_PROCESS, tid);
            let ioprio = libc::syscall(libc::SYS_ioprio_get, IOPRIO_WHO_PROCESS, 0);
            let set_nice = libc::setpriority(libc::PRIO_PROCESS, tid, 19);
            let set_io =
                libc::syscall(libc::SYS_ioprio_set, IOPRIO_WHO_PROCESS, 0, IOPRIO_CLASS_IDLE << IOPRIO_CLASS_SHIFT);
            if set_nice != 0 || set_io != 0 {
                tracing::debug!("cannot lower the verify's priority: {}", std::io::Error::last_os_error());
            }
            LowestPriority { tid, nice, ioprio }
        }
    }
}

impl Drop for LowestPriority {
    fn drop(&mut self) {
        // SAFETY: as in `new`: only this thread's nice value and I/O priority change, no memory is passed.
        let (n, i) = unsafe {
            (
                libc::setpriority(libc::PRIO_PROCESS, self.tid, self.nice),
                if self.ioprio >= 0 {
                    libc::syscall(libc::SYS_ioprio_set, IOPRIO_WHO_PROCESS, 0, self.ioprio)
                } else {
                    0
                },
            )
        };
        if n != 0 || i != 0 {
            tracing::debug!("cannot restore the thread's priority after a verify: {}", std::io::Error::last_os_error());
        }
    }
}

/// Re-hashes `shadow` and compares each block with `m`. `Ok(None)`: stopped; `Ok(Some(None))`: every block
/// matches; `Ok(Some(Some(b)))`: block `b` is the first that differs.
fn rehash(
    volume: &str,
    shadow: &Path,
    m: &Manifest,
    io: IoOptions,
    stop: &dyn Fn() -> bool,
) -> Result<Option<Option<u64>>, VerifyError> {
    let read_err = |source| VerifyError::Read { volume: volume.into(), source };
    let vol = Volume::open(shadow, Access::Read, &io).map_err(read_err)?;
    let (size, bs) = (m.volume_size(), m.block_size());
    let per_chunk = (CHUNK / bs as usize).max(1) as u64;
    let mut buf = engine::io::AlignedBuf::new(per_chunk as usize * bs as usize);
    let mut first = 0;
    while first < m.block_count() {
        if stop() {
            return Ok(None);
        }
        let count = per_chunk.min(m.block_count() - first);
        let start = first * bs as u64;
        let len = (size - start).min(count * bs as u64) as usize;
        buf.set_len(len);
        vol.read_at(start, &mut buf).map_err(read_err)?;
        for b in first..first + count {
            let at = ((b - first) * bs as u64) as usize;
            let blen = engine::hash::block_len(size, bs, b);
            if engine::hash::hash_block(&buf[at..at + blen]) != *m.hash(b) {
                return Ok(Some(Some(b)));
            }
        }
        first += count;
    }
    Ok(Some(None))
}

/// Verifies the shadow of `vol` against its committed generation and records the result (see the module docs);
/// `stop` is asked between chunks (`Ok(None)`: stopped, nothing recorded); with `lowest`, the shadow is read at
/// the lowest CPU and I/O priority (`LowestPriority`). A mismatch is returned as
/// `Ok(Some(LastVerify { ok: false, .. }))`, with the shadow marked untrusted and the alarm raised.
pub fn verify_shadow(
    cfg: &Config,
    vol: &VolumeConfig,
    io: IoOptions,
    stop: &dyn Fn() -> bool,
    lowest: bool,
) -> Result<Option<LastVerify>, VerifyError> {
    let name = vol.name.as_str();
    let shadow =
        vol.shadow.as_ref().ok_or_else(|| VerifyError::Nothing { volume: name.into(), node: cfg.node.clone() })?;
    let dir = cfg.layout().side_dir(Side::Standby, name);
    let target_err = |source| VerifyError::Target { volume: name.into(), source };
    let open = || open_target(shadow, &dir, TargetOptions::new(name, io)).map_err(target_err);
    let started = Instant::now();
    let (info, manifest) = {
        let t = open()?;
        let info = t.info();
        let path = t.manifest().map(|m| m.path().to_owned());
        match path {
            Some(p) if info.complete && info.generation > 0 => (info, p),
            _ => return Err(VerifyError::Incomplete { volume: name.into() }),
        }
    }; // the state directory is unlocked while the shadow is read
    let m = Manifest::open(&manifest).map_err(|source| VerifyError::Manifest { volume: name.into(), source })?;
    let low = lowest.then(LowestPriority::new);
    let Some(mismatch) = rehash(name, shadow, &m, io, stop)? else { return Ok(None) };
    drop(low);
    let mut t = open()?;
    let now = t.info();
    if now.generation != info.generation || now.root != Some(m.root()) {
        return Err(VerifyError::Moved { volume: name.into(), checked: info.generation, now: now.generation });
    }
    let last = LastVerify {
        time: crate::history::now(),
        generation: info.generation,
        ok: mismatch.is_none(),
        mismatch_block: mismatch,
        duration_s: started.elapsed().as_secs_f64(),
    };
    // A promoted shadow keeps its mark (the engine tells a split brain by it); any other that differs is marked,
    // so that promote refuses it without --force, whatever else made it untrusted. Either way the next sync
    // compares.
    if mismatch.is_some() && !now.distrust.contains("promoted") {
        t.mark_untrusted(engine::target::Distrust::VerifyFailed).map_err(target_err)?;
    }
    // Recorded while the state directory is locked: whoever opens the target next sees the mark and the result.
    write_record(cfg, name, &Record { since: last.time, last: Some(last.clone()) });
    crate::history::append(cfg, crate::history::Event::Verify { volume: name.into(), ok: last.ok });
    drop(t);
    match mismatch {
        Some(block) => {
            tracing::warn!(
                volume = name,
                generation = info.generation,
                block,
                "verify: the shadow differs from its committed generation: marked untrusted, the next sync compares \
                 and repairs it"
            );
            let message = format!(
                "the shadow of volume {name} is not trusted (a verify found block {block} different from its \
                 committed generation {}); the next sync compares its whole content, and promote refuses it without \
                 --force",
                info.generation
            );
            crate::alarms::update(cfg, &[Judgement::raise(AlarmKind::ShadowUntrusted, Some(name), message)]);
        }
        None => {
            tracing::info!(
                volume = name,
                generation = info.generation,
                "verify: the shadow matches its committed generation"
            )
        }
    }
    Ok(Some(last))
}

/// A request for a compare sync, as written by `blockrep verify` on the primary.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    /// Unix seconds it was made.
    pub time: u64,
    /// Nanoseconds, so that a request made while a sync runs is told apart from the one that sync consumes.
    #[serde(default)]
    pub nanos: u32,
}

fn request_path(cfg: &Config, volume: &str) -> PathBuf {
    cfg.layout().side_dir(Side::Primary, volume).join(REQUEST_FILE)
}

/// Records (durably) that the next sync of `volume` must compare every block with the standby's actual content.
pub fn request(cfg: &Config, volume: &str) -> Result<Request, VerifyError> {
    let path = request_path(cfg, volume);
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    let r = Request { time: now.as_secs(), nanos: now.subsec_nanos() };
    let json = serde_json::to_vec(&r).unwrap_or_default();
    let dir = path.parent().expect("a request lives in a volume's directory");
    std::fs::create_dir_all(dir)
        .and_then(|()| crate::status::write_atomic(&path, &json))
        .and_then(|()| std::fs::File::open(dir)?.sync_all())
        .map_err(|source| VerifyError::Request { volume: volume.into(), path: path.clone(), source })?;
    Ok(r)
}

/// The pending request for a compare sync of `volume`, if any.
pub fn requested(cfg: &Config, volume: &str) -> Option<Request> {
    std::fs::read(request_path(cfg, volume)).ok().and_then(|b| serde_json::from_slice(&b).ok())
}

/// After a successful sync that ran with request `r`: removes it (unless a newer one replaced it meanwhile) when
/// the sync compared or copied every block, and says in the report's reason that it was requested (`explicit`:
/// the operator also passed `--verify` or `--discard-standby-changes`, whose reason the engine gave).
pub fn consume(cfg: &Config, volume: &str, r: &Request, report: &mut engine::sync::SyncReport, explicit: bool) {
    use engine::sync::SyncMode;
    if report.mode == SyncMode::Incremental {
        return; // cannot happen with force_compare; keep the request for the next sync
    }
    if report.mode == SyncMode::Compare && !explicit {
        report.reason = format!("a compare sync was requested with `blockrep verify` on this node at unix {}", r.time);
    }
    if requested(cfg, volume).as_ref() == Some(r) {
        let path = request_path(cfg, volume);
        if let Err(e) = std::fs::remove_file(&path) {
            tracing::warn!(path = %path.display(), error = %e, "cannot remove the request for a compare sync");
        }
    }
}

/// What `blockrep verify` did for one volume.
#[derive(Debug, Clone, Serialize)]
pub struct Outcome {
    /// Volume name.
    pub volume: String,
    /// Standby: the shadow was verified; primary: a compare sync was requested.
    pub side: VolumeSide,
    /// Standby: the verify's result.
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    pub verified: Option<LastVerify>,
    /// Primary: the request recorded for the next sync.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub compare_requested: Option<Request>,
}

impl Outcome {
    /// `Ok` unless the shadow differs from its generation (the error says so and what happens next).
    pub fn into_result(self) -> Result<(), Error> {
        match self.verified {
            Some(LastVerify { ok: false, generation, mismatch_block, .. }) => Err(VerifyError::Mismatch {
                volume: self.volume,
                generation,
                block: mismatch_block.unwrap_or_default(),
            }
            .into()),
            _ => Ok(()),
        }
    }
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (&self.verified, &self.compare_requested) {
            (Some(v), _) if v.ok => write!(
                f,
                "volume {}: the shadow matches its committed generation {} ({:.1} s)",
                self.volume, v.generation, v.duration_s
            ),
            (Some(v), _) => write!(
                f,
                "volume {}: the shadow DIFFERS from its committed generation {} (block {}): marked untrusted, the \
                 next sync compares and repairs it",
                self.volume,
                v.generation,
                v.mismatch_block.unwrap_or_default()
            ),
            (None, _) => write!(
                f,
                "volume {}: the next sync compares every block with the standby's actual content (requested)",
                self.volume
            ),
        }
    }
}

/// `blockrep verify [VOLUME...]` with a configuration: on the standby side of a volume (this node is a standby
/// and the shadow has state) re-hashes the shadow ([`verify_shadow`]); on the primary side records a request so
/// that the next sync is a compare sync ([`request`]). `done` gets each volume's outcome as it finishes; every
/// selected volume is tried, the first error is returned.
pub fn run(cfg: &Config, names: &[String], io: IoOptions, done: &mut dyn FnMut(&Outcome)) -> Result<(), Error> {
    let vols = cfg.select(names)?;
    let standby_node = crate::roles::refuses_syncs(cfg).is_none();
    let layout = cfg.layout();
    let mut first: Option<Error> = None;
    for v in vols {
        let has_state =
            v.shadow.as_ref().is_some_and(|s| s.exists()) && layout.side_dir(Side::Standby, &v.name).is_dir();
        let r: Result<Outcome, Error> = if has_state && (standby_node || v.source.is_none()) {
            verify_shadow(cfg, v, io, &|| false, false).map_err(Error::from).map(|last| Outcome {
                volume: v.name.clone(),
                side: VolumeSide::Standby,
                verified: last,
                compare_requested: None,
            })
        } else if v.source.is_some() {
            request(cfg, &v.name).map_err(Error::from).map(|req| {
                tracing::info!(volume = %v.name, "the next sync compares every block with the standby's actual content");
                Outcome { volume: v.name.clone(), side: VolumeSide::Primary, verified: None, compare_requested: Some(req) }
            })
        } else {
            Err(VerifyError::Nothing { volume: v.name.clone(), node: cfg.node.clone() }.into())
        };
        match r {
            Ok(o) => {
                done(&o);
                if let Err(e) = o.into_result() {
                    first.get_or_insert(e);
                }
            }
            Err(e) => {
                if names.len() != 1 {
                    tracing::error!(volume = %v.name, "{}", crate::error_chain(&e));
                }
                first.get_or_insert(e);
            }
        }
    }
    first.map_or(Ok(()), Err)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nice() -> libc::c_int {
        // SAFETY: reads this thread's nice value; no memory is passed.
        unsafe { libc::getpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t) }
    }

    #[test]
    fn the_lowest_priority_lasts_while_the_guard_lives() {
        std::thread::spawn(|| {
            let before = nice();
            let low = LowestPriority::new();
            assert_eq!(nice(), 19);
            drop(low);
            // Raising the nice value back needs CAP_SYS_NICE (serve runs as root).
            // SAFETY: geteuid has no preconditions.
            if unsafe { libc::geteuid() } == 0 {
                assert_eq!(nice(), before);
            }
        })
        .join()
        .unwrap();
    }
}
