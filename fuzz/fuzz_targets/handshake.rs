//! Fuzz target: the handshake, as server (first byte even) or client (odd), then the authenticated session.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| netproto::fuzzing::handshake(data));
