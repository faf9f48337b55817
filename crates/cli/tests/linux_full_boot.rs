//! A stock Debian kernel boots to user space under rhyve on this machine
//! kind (PVM: software virtualization), thanks to the emulation assist:
//! the busybox /init mounts /proc, prints BOOT-OK with /proc/uptime and
//! powers the VM off through ACPI (bhyve exit status 1). Also with -c 2.

use std::io::Read;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn workspace() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn guest_kernel() -> PathBuf {
    if let Ok(k) = std::env::var("RHYVE_GUEST_KERNEL") {
        return PathBuf::from(k);
    }
    let out = Command::new(workspace().join("scripts/fetch-guest-kernel.sh"))
        .output()
        .expect("run scripts/fetch-guest-kernel.sh");
    assert!(
        out.status.success(),
        "fetching the guest kernel failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
}

/// The busybox initramfs with the default /init (BOOT-OK, then poweroff).
fn initramfs() -> PathBuf {
    let path = std::env::temp_dir().join(format!(
        "rhyve-full-boot-initramfs-{}.gz",
        std::process::id()
    ));
    let status = Command::new(workspace().join("scripts/build-initramfs.sh"))
        .arg(&path)
        .status()
        .expect("run scripts/build-initramfs.sh");
    assert!(status.success(), "building the initramfs failed");
    path
}

/// Boot and return (exit status, console log, stderr, seconds).
fn boot(cpus: &str, name: &str) -> (Option<i32>, String, String, f64) {
    assert!(
        std::path::Path::new("/dev/kvm").exists(),
        "/dev/kvm is missing: this test boots a real kernel and is never skipped"
    );
    let kernel = guest_kernel();
    let initrd = initramfs();
    let started = Instant::now();
    let mut child = Command::new(env!("CARGO_BIN_EXE_bhyve"))
        .args([
            "-A",
            "-H",
            "-P",
            "-c",
            cpus,
            "-m",
            "512M",
            "-s",
            "0,hostbridge",
            "-s",
            "31,lpc",
            "-l",
            "com1,stdio",
        ])
        .arg("-o")
        .arg(format!("boot.kernel={}", kernel.display()))
        .arg("-o")
        .arg(format!("boot.initrd={}", initrd.display()))
        .args([
            "-o",
            "boot.cmdline=console=ttyS0 clearcpuid=cx16 noxsave panic=-1",
        ])
        .arg(name)
        .env("RHYVE_VMM_DIR", rhyve_guests::test_registry())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start bhyve");
    let mut stdout = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = stdout.read_to_end(&mut s);
        String::from_utf8_lossy(&s).replace('\r', "")
    });
    let deadline = started + Duration::from_secs(1500);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "the boot did not end within 1500 s: {}",
                reader.join().unwrap()
            );
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    let log = reader.join().unwrap();
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    let _ = std::fs::remove_file(&initrd);
    (status.code(), log, stderr, started.elapsed().as_secs_f64())
}

fn check(cpus: &str) {
    let (code, log, stderr, secs) = boot(cpus, &rhyve_guests::vm_name(&format!("fullboot{cpus}")));
    let tail = &log[log.len().saturating_sub(3000)..];
    assert!(
        log.contains("rhyve demo guest: Linux 6.1"),
        "no /init banner; stderr: {stderr}\n{tail}"
    );
    let ok = log
        .lines()
        .find(|l| l.starts_with("BOOT-OK uptime "))
        .unwrap_or_else(|| panic!("no BOOT-OK: {stderr}\n{tail}"));
    assert!(log.contains(&format!("{cpus} CPU(s)")), "{tail}");
    assert_eq!(
        code,
        Some(1),
        "ACPI power-off ends bhyve with 1: {stderr}\n{tail}"
    );
    eprintln!("-c {cpus}: {ok} ({secs:.0} s wall clock)");
}

#[test]
fn debian_kernel_boots_to_userspace_and_powers_off() {
    check("1");
}

#[test]
fn debian_kernel_boots_to_userspace_with_two_cpus() {
    check("2");
}
