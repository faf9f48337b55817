//! The full Linux boot's `/init` (linux-init/init.c), run natively on the
//! host with `--selftest`: its landing page at address 0 must map (the
//! test runs as root, as the suite does); every entry into the landing
//! sled must come back, in 64-bit mode (a host whose `sysretl` returns
//! with the 64-bit code segment) and in 32-bit compatibility mode
//! (hardware); and both of its ways into the kernel, the `syscall` door
//! (AMD) and the `sysenter` door (Intel), must marshal their system calls
//! as Linux's entry code reads them and survive the return in either mode,
//! judged by a SIGILL handler that plays the kernel (the door's
//! instruction replaced by `ud2`), whatever CPU the host has.

use std::process::Command;

#[test]
fn both_doors_and_the_landing_sled_work() {
    let init = rhyve_guests::linux_init_path();
    let out = Command::new(&init)
        .arg("--selftest")
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", init.display()));
    let report = String::from_utf8_lossy(&out.stderr);
    eprint!("{report}");
    assert!(
        out.status.success(),
        "{} --selftest: {:?} (mapping its page at address 0 needs root, or \
         CAP_SYS_RAWIO, below vm.mmap_min_addr)\n{report}",
        init.display(),
        out.status,
    );
    for line in [
        "init --selftest: landing sled returns in 64-bit and 32-bit mode: ok",
        "init --selftest: syscall door: 16 calls, returns in 64-bit and 32-bit mode: ok",
        "init --selftest: sysenter door: 16 calls, returns in 64-bit and 32-bit mode: ok",
    ] {
        assert!(
            report.lines().any(|l| l == line),
            "missing {line:?}\n{report}"
        );
    }
}
