//! cargo fuzz target: see `rhyve_virtio::fuzzing::console_control`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| rhyve_virtio::fuzzing::console_control(data));
