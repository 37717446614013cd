//! Fuzz target: the frame decoder (two-phase check/parse, message decoding, buffered connection reads).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| netproto::fuzzing::frame(data));
