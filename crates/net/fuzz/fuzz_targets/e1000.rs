//! cargo fuzz target: see `rhyve_net::fuzzing::e1000`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| rhyve_net::fuzzing::e1000(data));
