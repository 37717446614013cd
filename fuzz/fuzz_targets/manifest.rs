//! Fuzz target: the manifest decoder (two-phase check, then root verification) must never panic, and whatever it
//! accepts must be self-consistent.
#![no_main]

use engine::manifest;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(h) = manifest::check(data) {
        assert_eq!(h.file_len(), data.len() as u64);
        assert_eq!(&h.encode()[..], &data[..manifest::HEADER_LEN], "an accepted header re-encodes to itself");
        let _ = manifest::decode(data);
    }
});
