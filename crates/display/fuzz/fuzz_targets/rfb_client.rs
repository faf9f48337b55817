#![no_main]
//! What a VNC client sends, from its version string on, to fbuf's server.

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    rhyve_display::fuzzing::client_session(data);
});
