//! Fuzz target: the spool scanner and the target's state-file decoder must never panic, and a scanned spool must
//! only yield records inside its volume and inside its valid prefix.
#![no_main]

use engine::{spool, target};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = target::decode_state(data);
    if let Ok(scan) = spool::decode(data) {
        assert!(scan.valid_len <= data.len() as u64);
        for r in &scan.records {
            assert!(r.len > 0);
            let end = r.offset.checked_add(r.len).expect("no overflow in accepted records");
            assert!(end <= scan.header.volume_size);
            if r.kind == spool::RecordKind::Data {
                assert!(r.payload_pos + r.len <= scan.valid_len);
            }
        }
        if let Some(c) = scan.commit {
            assert_eq!(c.record_count, scan.records.len() as u64);
            assert_eq!(scan.valid_len, data.len() as u64);
        }
    }
});
