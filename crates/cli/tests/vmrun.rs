//! share/examples/bhyve/vmrun.sh: the restart loop boots the VM again after
//! a reset (bhyve exit 0) and destroys it after a power-off (exit 1), as
//! bhyve's script does. The guest resets once, then powers off.

use std::path::Path;
use std::process::Command;

#[test]
fn vmrun_reboots_once_then_destroys_the_vm_on_power_off() {
    rhyve_guests::require_kvm();
    let work = std::env::temp_dir().join(format!("rhyve-vmrun-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work).unwrap();
    let registry = work.join("vmm");
    let bin = |name: &str| Path::new(env!("CARGO_BIN_EXE_bhyve")).with_file_name(name);
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../share/examples/bhyve/vmrun.sh");
    let tap = format!("rvmrun{}", std::process::id() % 100_000);
    let out = Command::new("sh")
        .arg(&script)
        .args([
            "-c", "1", "-m", "128M", "-C", "stdio", "-t", &tap, "-d", "disk.img",
        ])
        .arg("-k")
        .arg(rhyve_guests::guest_path("rebootonce"))
        .arg("vmrun1")
        .current_dir(&work)
        .env("RHYVE_VMM_DIR", &registry)
        .env("BHYVE", bin("bhyve"))
        .env("BHYVECTL", bin("bhyvectl"))
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run vmrun.sh");
    let stdout = String::from_utf8_lossy(&out.stdout).replace('\r', "");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let boots: Vec<&str> = stdout
        .lines()
        .filter(|l| l.starts_with("rebootonce: boot"))
        .collect();
    assert_eq!(
        boots,
        ["rebootonce: boot 1", "rebootonce: boot 2"],
        "stdout:\n{stdout}\nstderr:\n{stderr}"
    );
    assert!(
        stdout.contains("Launching virtual machine \"vmrun1\" ..."),
        "{stdout}"
    );
    assert!(
        stdout.contains("Creating it ..."),
        "vmrun.sh creates the missing disk: {stdout}"
    );
    assert_eq!(
        out.status.code(),
        Some(1),
        "power-off ends vmrun.sh with 1: {stderr}"
    );
    // Power-off destroyed the VM.
    let list = Command::new(bin("bhyvectl"))
        .arg("--list")
        .env("RHYVE_VMM_DIR", &registry)
        .output()
        .unwrap();
    assert!(
        !String::from_utf8_lossy(&list.stdout).contains("vmrun1"),
        "the VM is gone after power-off"
    );
    let _ = std::fs::remove_dir_all(&work);
}
