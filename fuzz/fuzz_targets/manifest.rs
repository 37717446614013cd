//! Fuzz target: the primary's state files. The manifest decoder (two-phase check, then root verification) must
//! never panic, and whatever it accepts must be self-consistent; the generation records beside it
//! (`engine::generations`) must never panic, and what they accept re-encodes to a file that decodes the same.
#![no_main]

use engine::manifest;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(h) = manifest::check(data) {
        assert_eq!(h.file_len(), data.len() as u64);
        assert_eq!(&h.encode()[..], &data[..manifest::HEADER_LEN], "an accepted header re-encodes to itself");
        let _ = manifest::decode(data);
    }
    if let Ok(g) = engine::generations::SourceGenerations::decode(data) {
        let again = engine::generations::SourceGenerations::decode(&g.encode()).expect("what decodes re-encodes");
        assert_eq!(again.encode(), g.encode(), "re-encoding is stable");
    }
});
