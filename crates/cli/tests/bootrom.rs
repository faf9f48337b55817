//! `-l bootrom,ROM,VARS` with our own 4 KiB ROM (crates/guests/rom/fwtest.S),
//! which starts at the reset vector like firmware and checks what bhyve's
//! UEFI firmware relies on: fwctl read with string port I/O, the ROM being
//! read-only, the variable store's CFI answers and writes reaching the
//! file, and unclaimed MMIO below 4 GiB reading all-ones. A second ROM
//! (crates/guests/rom/fwcfgtest.S) reads QEMU's fw_cfg as firmware does
//! with `fwcfg=qemu`: signature, ID, directory (bhyve's files, the ACPI
//! tables and their loader among them) and an operator's `-f` file.

use std::path::Path;
use std::time::Duration;

use rhyve_guests::{require_kvm, rom_path, run_bhyve, vm_name, BASE_MACHINE};

#[test]
fn firmware_interfaces_from_the_reset_vector() {
    require_kvm();
    let vars = std::env::temp_dir().join(format!("rhyve-fwtest-vars-{}", std::process::id()));
    std::fs::write(&vars, vec![b'V'; 4096]).unwrap();
    let mut args: Vec<String> = vec!["-c".into(), "3".into()];
    args.extend(BASE_MACHINE.iter().map(|s| s.to_string()));
    args.push("-l".into());
    args.push(format!(
        "bootrom,{},{}",
        rom_path("fwtest").display(),
        vars.display()
    ));
    args.push(vm_name("fwtest"));
    let run = run_bhyve(
        Path::new(env!("CARGO_BIN_EXE_bhyve")),
        &args,
        Duration::from_secs(60),
    );
    run.assert_no_failure();
    for line in [
        "fwctl BHYV",
        "ncpu 3",
        "rom ro",
        "vars probe",
        "vars Z V",
        "ones",
    ] {
        run.assert_line(line);
    }
    run.assert_code(1);
    let store = std::fs::read(&vars).unwrap();
    std::fs::remove_file(&vars).unwrap();
    assert_eq!(store.len(), 4096, "the store's size never changes");
    assert_eq!(store[0x10], b'Z');
    assert!(store
        .iter()
        .enumerate()
        .all(|(i, &b)| i == 0x10 || b == b'V'));
}

#[test]
fn qemu_fw_cfg_from_the_reset_vector() {
    require_kvm();
    // A host file, read before the sandbox closes the file system.
    let greeting = std::env::temp_dir().join(format!("rhyve-fwcfg-{}", std::process::id()));
    std::fs::write(&greeting, "hello from the host").unwrap();
    let mut args: Vec<String> = vec!["-c".into(), "2".into()];
    args.extend(BASE_MACHINE.iter().map(|s| s.to_string()));
    args.extend([
        "-l".into(),
        format!("bootrom,{},fwcfg=qemu", rom_path("fwcfgtest").display()),
        "-f".into(),
        format!("name=opt/rhyve/greeting,file={}", greeting.display()),
        "-f".into(),
        "opt/rhyve/answer,string=42".into(),
        vm_name("fwcfgtest"),
    ]);
    let run = run_bhyve(
        Path::new(env!("CARGO_BIN_EXE_bhyve")),
        &args,
        Duration::from_secs(60),
    );
    run.assert_no_failure();
    for line in [
        "fwcfg QEMU",
        "id 1",
        "file etc/acpi/DSDT",
        "file etc/acpi/RSDP",
        "file etc/e820",
        "file etc/table-loader",
        "file opt/bhyve/hw.ncpu",
        "file opt/rhyve/answer",
        "file opt/rhyve/greeting",
        "data hello from the host",
    ] {
        run.assert_line(line);
    }
    run.assert_code(1);
    std::fs::remove_file(&greeting).unwrap();
}
