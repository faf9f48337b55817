//! cargo fuzz target: see `rhyve_config::fuzzing::config_file`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| rhyve_config::fuzzing::config_file(data));
