//! `-p vcpu:hostcpu`: each vCPU thread runs only on its host CPU.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Host CPUs the thread named `name` of process `pid` may run on.
fn allowed(pid: u32, name: &str) -> Option<String> {
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))
        .ok()?
        .flatten()
    {
        let dir = task.path();
        if std::fs::read_to_string(dir.join("comm")).ok()?.trim() == name {
            let status = std::fs::read_to_string(dir.join("status")).ok()?;
            return status
                .lines()
                .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
                .map(|v| v.trim().to_string());
        }
    }
    None
}

#[test]
fn vcpu_threads_are_pinned() {
    rhyve_guests::require_kvm();
    let dir = std::env::temp_dir().join(format!("rhyve-pin-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let bench = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../bench");
    let guest = dir.join("spin.elf");
    assert!(Command::new("gcc")
        .args([
            "-DSPIN",
            "-nostdlib",
            "-static",
            "-no-pie",
            "-Wl,--build-id=none"
        ])
        .arg(format!("-Wl,-T,{}", bench.join("stub-guest.ld").display()))
        .arg("-o")
        .arg(&guest)
        .arg(bench.join("stub-guest.S"))
        .status()
        .unwrap()
        .success());
    let host_cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let (p0, p1) = if host_cpus > 1 {
        ("0:1", "1:0")
    } else {
        ("0:0", "1:0")
    };
    let mut vm = Command::new(env!("CARGO_BIN_EXE_bhyve"))
        .args([
            "-c",
            "2",
            "-p",
            p0,
            "-p",
            p1,
            "-s",
            "0,hostbridge",
            "-s",
            "31,lpc",
            "-l",
            "com1,stdio",
        ])
        .arg("-o")
        .arg(format!("boot.kernel={}", guest.display()))
        .arg(rhyve_guests::vm_name("pinning"))
        .env("RHYVE_VMM_DIR", rhyve_guests::test_registry())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let found = loop {
        let got = (allowed(vm.id(), "vcpu 0"), allowed(vm.id(), "vcpu 1"));
        if let (Some(a), Some(b)) = &got {
            if a.len() <= 2 && b.len() <= 2 {
                break got;
            }
        }
        assert!(
            Instant::now() < deadline,
            "vCPU threads never pinned: {got:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let _ = vm.kill();
    let _ = vm.wait();
    let _ = std::fs::remove_dir_all(&dir);
    let want = (
        p0.split(':').nth(1).unwrap().to_string(),
        p1.split(':').nth(1).unwrap().to_string(),
    );
    assert_eq!(found, (Some(want.0), Some(want.1)));
}
