//! The `lvm_trackers` fuzz target's checks on its seed corpus and on deterministic mutations of it, in the
//! ordinary test run (cargo-fuzz itself needs nightly; docs/fuzzing.md): the exception-store decoder, the
//! thin_delta parser and the `dmsetup table` reader never panic, and what they accept is sorted, bounded and
//! convertible to byte ranges (a thin table: the device's one thin line).

use std::path::Path;

use lvmctl::{exception_store, thin};

const ORIGIN: u64 = 1 << 40;

/// The thin device the `dmsetup-table-real` seed lists (a thin snapshot, thin id 2).
const DEVICE: &str = "vg--a-th--1_snap";

/// Whether `data` read as `dmsetup table` output gives [`DEVICE`]'s thin table (checked against its line).
fn table(data: &[u8]) -> bool {
    let Ok(text) = std::str::from_utf8(data) else { return false };
    let Ok(t) = thin::thin_table_of(text, DEVICE) else { return false };
    let line = text.lines().find_map(|l| l.strip_prefix(&format!("{DEVICE}: "))).expect("listed");
    assert_eq!(thin::parse_thin_table(line), Ok(t));
    true
}

fn exercise(data: &[u8]) -> (bool, bool) {
    let mut r: &[u8] = data;
    let store = exception_store::decode(&mut r, ORIGIN).map(|e| {
        assert!(e.old_chunks.windows(2).all(|w| w[0] < w[1]));
        let ranges = e.byte_ranges().expect("bounded by the origin");
        assert!(ranges.iter().all(|&(o, l)| l > 0 && o + l <= ORIGIN + e.header.chunk_bytes()));
    });
    let delta = std::str::from_utf8(data).ok().map(thin::parse_thin_delta).map(|d| {
        d.map(|d| {
            assert!(d.changed.windows(2).all(|w| w[0].begin + w[0].length < w[1].begin));
            assert!(d.changed.iter().all(|r| r.length > 0));
        })
    });
    (store.is_ok(), matches!(delta, Some(Ok(()))))
}

fn seeds() -> Vec<(String, Vec<u8>)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/lvm_trackers");
    let mut v: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .map(|p| (p.file_name().unwrap().to_string_lossy().into_owned(), std::fs::read(&p).unwrap()))
        .collect();
    v.sort();
    v
}

#[test]
fn the_seeds_decode_as_intended() {
    let seeds = seeds();
    assert_eq!(seeds.len(), 6, "{:?}", seeds.iter().map(|s| &s.0).collect::<Vec<_>>());
    for (name, data) in &seeds {
        let (store, delta) = exercise(data);
        let table = table(data);
        match name.as_str() {
            "store-3-exceptions" | "store-empty" | "store-real" => assert!(store && !delta && !table, "{name}"),
            "store-invalidated" => assert!(!store && !delta && !table, "{name}"),
            "thin_delta-real.xml" => assert!(!store && delta && !table, "{name}"),
            "dmsetup-table-real" => assert!(!store && !delta && table, "{name}"),
            other => panic!("unexpected seed {other}"),
        }
    }
    let text = String::from_utf8(seeds.iter().find(|s| s.0 == "dmsetup-table-real").unwrap().1.clone()).unwrap();
    assert_eq!(thin::thin_table_of(&text, DEVICE).unwrap().thin_id, 2);
    let mut r: &[u8] = &seeds.iter().find(|s| s.0 == "store-3-exceptions").unwrap().1;
    assert_eq!(exception_store::decode(&mut r, ORIGIN).unwrap().old_chunks, vec![3, 4, 100]);
}

#[test]
fn mutations_of_the_seeds_never_panic() {
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    for (_, seed) in seeds() {
        for _ in 0..1500 {
            let mut d = seed.clone();
            match next() % 4 {
                0 => d.truncate((next() % (seed.len() as u64 + 1)) as usize),
                1 => {
                    // Overwrite one of the header or first-area words with an extreme or random value.
                    let at = (next() % (d.len().min(4096 + 64) as u64).max(1)) as usize & !7;
                    let v = [0, 1, u64::MAX, next()][(next() % 4) as usize].to_le_bytes();
                    let end = (at + 8).min(d.len());
                    d[at..end].copy_from_slice(&v[..end - at]);
                }
                2 => {
                    for _ in 0..4 {
                        let i = (next() % d.len().max(1) as u64) as usize;
                        if let Some(b) = d.get_mut(i) {
                            *b = next() as u8;
                        }
                    }
                }
                _ => {
                    let i = (next() % (d.len() as u64 + 1)) as usize;
                    let digits = format!("{}", next());
                    d.splice(i..i, digits.bytes());
                }
            }
            exercise(&d);
            table(&d);
        }
    }
}
