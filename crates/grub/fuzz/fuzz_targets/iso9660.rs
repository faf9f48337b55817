//! cargo fuzz target: see `rhyve_grub::fuzzing::iso9660`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| rhyve_grub::fuzzing::iso9660(data));
