//! Fuzz target: the decoders of tracked changes in lvmctl. A classic snapshot's exception store
//! (`lvmctl::exception_store::decode`, two-phase check then parse), `thin_delta`'s XML
//! (`lvmctl::thin::parse_thin_delta`) and `dmsetup table`'s output (`lvmctl::thin::thin_table_of`, which gives
//! thin_delta the new snapshot's thin id) must never panic, and what they accept must be sorted, bounded and
//! convertible to byte ranges (a thin table: a thin line of one device).
#![no_main]

use libfuzzer_sys::fuzz_target;
use lvmctl::{exception_store, thin};

fuzz_target!(|data: &[u8]| {
    let mut r: &[u8] = data;
    if let Ok(e) = exception_store::decode(&mut r, 1 << 40) {
        assert!(e.old_chunks.windows(2).all(|w| w[0] < w[1]), "sorted without duplicates");
        assert!(e.old_chunks.len() as u64 <= exception_store::MAX_EXCEPTIONS);
        let ranges = e.byte_ranges().expect("old chunks are bounded by the origin");
        assert!(ranges.iter().all(|&(o, l)| l > 0 && o + l <= (1 << 40) + e.header.chunk_bytes()));
    }
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(d) = thin::parse_thin_delta(text) {
            assert!(d.changed.windows(2).all(|w| w[0].begin + w[0].length < w[1].begin), "merged and sorted");
            assert!(d.changed.iter().all(|r| r.length > 0));
            let _ = d.byte_ranges();
        }
        if let Ok(t) = thin::thin_table_of(text, "vg--a-th--1_snap") {
            let line = text.lines().find_map(|l| l.strip_prefix("vg--a-th--1_snap: ")).expect("listed");
            assert_eq!(thin::parse_thin_table(line), Ok(t), "the device's one line");
        }
    }
});
