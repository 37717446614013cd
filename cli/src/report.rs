//! Human and JSON output, and the progress bar.

use std::io::IsTerminal;

use anyhow::Result;
use engine::sync::SyncReport;

/// `1.5 MiB`-style sizes.
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// Prints a sync report as one line of text or one JSON object.
pub fn print_sync(r: &SyncReport, json: bool) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string(r)?);
    } else {
        let rate = r.bytes_scanned as f64 / r.duration_s.max(1e-9);
        println!(
            "volume {}: generation {} committed ({:?}); scanned {}, {} blocks changed, {} changed, {} sent \
             ({} as zero extents), {:.2} s, {}/s",
            r.volume,
            r.generation,
            r.mode,
            bytes(r.bytes_scanned),
            r.blocks_changed,
            bytes(r.bytes_changed),
            bytes(r.bytes_sent),
            bytes(r.zero_bytes),
            r.duration_s,
            bytes(rate as u64)
        );
    }
    Ok(())
}

/// A progress bar on stderr when it is a terminal; nothing otherwise.
pub struct Progress(Option<indicatif::ProgressBar>);

impl Progress {
    /// A bar for one volume.
    pub fn new(volume: &str) -> Self {
        if !std::io::stderr().is_terminal() {
            return Progress(None);
        }
        let bar = indicatif::ProgressBar::new(0);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{prefix} [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} ETA {eta}",
            )
            .expect("static template")
            .progress_chars("=> "),
        );
        bar.set_prefix(volume.to_owned());
        Progress(Some(bar))
    }

    /// Updates with bytes done and total.
    pub fn update(&mut self, done: u64, total: u64) {
        if let Some(b) = &self.0 {
            b.set_length(total);
            b.set_position(done);
        }
    }

    /// Removes the bar.
    pub fn finish(&self) {
        if let Some(b) = &self.0 {
            b.finish_and_clear();
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn sizes_are_human_readable() {
        assert_eq!(super::bytes(512), "512 B");
        assert_eq!(super::bytes(1536), "1.5 KiB");
        assert_eq!(super::bytes(256 << 20), "256.0 MiB");
    }
}
