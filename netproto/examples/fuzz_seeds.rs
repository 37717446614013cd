//! Writes the fuzz seed corpus (`fuzz/corpus/<target>/<name>`) from real encoded frames and recorded sessions.
//!
//! `cargo run -p netproto --example fuzz_seeds [DIR]` (default: `fuzz/corpus` of this repository).

use std::path::PathBuf;

fn main() -> std::io::Result<()> {
    let dir = std::env::args_os()
        .nth(1)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus"));
    let mut n = 0;
    for (target, name, data) in netproto::fuzzing::seeds() {
        let d = dir.join(target);
        std::fs::create_dir_all(&d)?;
        std::fs::write(d.join(&name), data)?;
        n += 1;
    }
    println!("wrote {n} seeds under {}", dir.display());
    Ok(())
}
