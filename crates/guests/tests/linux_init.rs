//! The full Linux boot's `/init` (linux-init/init.c), run natively on the
//! host: its landing page at address 0 must map (the test runs as root, as
//! the suite does), and every entry into the landing sled must come back,
//! in 64-bit mode (a host whose `sysretl` returns with the 64-bit code
//! segment) and in 32-bit compatibility mode (hardware).

use std::process::Command;

#[test]
fn landing_sled_returns_in_both_modes() {
    let init = rhyve_guests::linux_init_path();
    let out = Command::new(&init)
        .arg("--selftest")
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", init.display()));
    assert!(
        out.status.success(),
        "{} --selftest: {:?} (mapping its page at address 0 needs root, or \
         CAP_SYS_RAWIO, below vm.mmap_min_addr)\nstdout: {}\nstderr: {}",
        init.display(),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
