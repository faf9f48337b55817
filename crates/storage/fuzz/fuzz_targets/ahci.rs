//! cargo fuzz target: see `rhyve_storage::fuzzing::ahci`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| rhyve_storage::fuzzing::ahci(data));
