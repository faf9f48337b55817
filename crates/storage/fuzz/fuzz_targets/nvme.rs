//! cargo fuzz target: see `rhyve_storage::fuzzing::nvme`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| rhyve_storage::fuzzing::nvme(data));
