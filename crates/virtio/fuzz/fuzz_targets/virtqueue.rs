//! cargo fuzz target: see `rhyve_virtio::fuzzing::virtqueue`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| rhyve_virtio::fuzzing::virtqueue(data));
