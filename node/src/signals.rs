//! SIGTERM and SIGINT, in one place: [`on_stop`] blocks both in the calling thread (and so in every thread it
//! starts afterwards) and runs a callback from a dedicated thread when one arrives. The standby daemon stops
//! accepting and cuts its connections at a frame boundary; a sync stops between two chunks and cleans up.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use nix::sys::signal::{SigSet, Signal};

/// The signals could not be blocked.
#[derive(Debug, thiserror::Error)]
#[error("cannot block SIGTERM and SIGINT to handle them in order")]
pub struct SignalError(#[source] nix::Error);

/// Blocks SIGTERM and SIGINT and calls `stop` once, from its own thread, when the first of them arrives. Call it
/// before starting other threads, so that they inherit the mask.
pub fn on_stop(stop: impl FnOnce(Signal) + Send + 'static) -> Result<(), SignalError> {
    let mut set = SigSet::empty();
    set.add(Signal::SIGTERM);
    set.add(Signal::SIGINT);
    set.thread_block().map_err(SignalError)?;
    std::thread::spawn(move || {
        if let Ok(sig) = set.wait() {
            stop(sig);
        }
    });
    Ok(())
}

/// A flag set when SIGTERM or SIGINT arrives; `what` is logged with the signal.
pub fn stop_flag(what: &'static str) -> Result<Arc<AtomicBool>, SignalError> {
    let flag = Arc::new(AtomicBool::new(false));
    let f = flag.clone();
    on_stop(move |signal| {
        tracing::warn!(?signal, "{what}");
        f.store(true, Ordering::SeqCst);
    })?;
    Ok(flag)
}
