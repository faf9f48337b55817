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

/// `-E` (UEFI mode) hands bhyve the firmware, the framebuffer and the
/// tablet as bhyve's script does, skips the loader, and refuses a missing
/// firmware with bhyve's message. A stand-in `bhyve` records its arguments
/// (what it would boot is the firmware suite test's business).
#[test]
fn vmrun_uefi_mode_boots_the_firmware() {
    let work = std::env::temp_dir().join(format!("rhyve-vmrun-efi-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work).unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../share/examples/bhyve/vmrun.sh");
    let stub = work.join("bhyve-stub");
    std::fs::write(&stub, "#!/bin/sh\necho \"$@\" > bhyve-args\nexit 1\n").unwrap();
    std::fs::set_permissions(&stub, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let firmware = work.join("BHYVE_UEFI_CODE.fd");
    std::fs::write(&firmware, [0u8; 4096]).unwrap();
    std::fs::write(work.join("release.iso"), [0u8; 2048]).unwrap();
    let vmrun = |args: &[&str]| {
        Command::new("sh")
            .arg(&script)
            .args(args)
            .current_dir(&work)
            .env("BHYVE", "./bhyve-stub")
            .env("BHYVECTL", "true")
            .env("GRUB_BHYVE", "false")
            .stdin(std::process::Stdio::null())
            .output()
            .expect("run vmrun.sh")
    };
    let fw = firmware.display().to_string();
    let out = vmrun(&[
        "-E", "-f", &fw, "-T", "-v", "-P", "5901", "-c", "1", "-m", "128M", "-d", "disk.img",
        "vmefi",
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    let args = std::fs::read_to_string(work.join("bhyve-args")).unwrap();
    for part in [
        "-s 29,fbuf,tcp=127.0.0.1:5901,w=1024,h=768,wait",
        &format!("-l bootrom,{fw}"),
        "-s 30,xhci,tablet",
        "-o pci.enable_bars=true",
        // disk.img was just created empty: the installer CD is attached.
        "-s 31:0,ahci-cd,./release.iso",
        "vmefi",
    ] {
        assert!(args.contains(part), "bhyve got {args:?}, not {part:?}");
    }
    let out = vmrun(&["-E", "-f", "/nonexistent/BHYVE_UEFI.fd", "vmefi"]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "Error: EFI Firmware /nonexistent/BHYVE_UEFI.fd doesn't exist. Try: scripts/build-uefi-firmware.sh\n"
    );
    std::fs::remove_dir_all(&work).unwrap();
}
