//! A stock Debian kernel boots to user space under rhyve on this machine
//! kind (PVM: software virtualization), thanks to the emulation assist:
//! the busybox /init mounts /proc, prints BOOT-OK with /proc/uptime and
//! powers the VM off through ACPI (bhyve exit status 1). Also with -c 2.
//!
//! The command line keeps the kernel off CPU features whose instructions
//! KVM's emulator lacks and the assist does not cover (cx16, ssse3, XSAVE)
//! and off the soft-lockup watchdog, which emulated ring-0 speed trips.

use rhyve_guests::{debian_kernel, require_kvm, run_bhyve, workspace_root};
use std::process::Command;
use std::time::Duration;

const FULL_BOOT_CMDLINE: &str =
    "console=ttyS0 clearcpuid=cx16,ssse3 noxsave nosoftlockup panic=-1";

fn check(cpus: &str) {
    require_kvm();
    let initrd =
        std::env::temp_dir().join(format!("rhyve-full-boot-{cpus}-{}.gz", std::process::id()));
    let built = Command::new(workspace_root().join("scripts/build-initramfs.sh"))
        .arg(&initrd)
        .status()
        .expect("run scripts/build-initramfs.sh");
    assert!(built.success(), "building the initramfs failed");
    let args = vec![
        "-A".to_string(),
        "-c".into(),
        cpus.into(),
        "-m".into(),
        "512M".into(),
        "-s".into(),
        "0,hostbridge".into(),
        "-s".into(),
        "31,lpc".into(),
        "-l".into(),
        "com1,stdio".into(),
        "-o".into(),
        format!("boot.kernel={}", debian_kernel().display()),
        "-o".into(),
        format!("boot.initrd={}", initrd.display()),
        "-o".into(),
        format!("boot.cmdline={FULL_BOOT_CMDLINE}"),
        rhyve_guests::vm_name(&format!("fullboot{cpus}")),
    ];
    let started = std::time::Instant::now();
    let r = run_bhyve(
        std::path::Path::new(env!("CARGO_BIN_EXE_bhyve")),
        &args,
        Duration::from_secs(1500),
    );
    let _ = std::fs::remove_file(&initrd);
    let log = r.stdout.replace('\r', "");
    let tail = &log[log.len().saturating_sub(3000)..];
    assert!(
        log.contains("rhyve demo guest: Linux 6.1"),
        "no /init banner; {}\n{tail}",
        r.stderr
    );
    let ok = log
        .lines()
        .find(|l| l.starts_with("BOOT-OK uptime "))
        .unwrap_or_else(|| panic!("no BOOT-OK: {}\n{tail}", r.stderr));
    assert!(log.contains(&format!("{cpus} CPU(s)")), "{tail}");
    assert_eq!(
        r.code(),
        Some(1),
        "ACPI power-off ends bhyve with 1: {}\n{tail}",
        r.stderr
    );
    eprintln!(
        "-c {cpus}: {ok} ({:.0} s wall clock)",
        started.elapsed().as_secs_f64()
    );
}

#[test]
fn debian_kernel_boots_to_userspace_and_powers_off() {
    check("1");
}

#[test]
fn debian_kernel_boots_to_userspace_with_two_cpus() {
    check("2");
}
