//! cargo fuzz target: see `rhyve_grub::fuzzing::disk`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| rhyve_grub::fuzzing::disk(data));
