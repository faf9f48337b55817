//! Debian's stock cloud kernel, booted directly with `-o boot.kernel`, is
//! the outside judge of the machine rhyve builds: its early log shows how it
//! read our e820 map, ACPI tables, SMBIOS, CPUs and command line. With the
//! emulation assist off, a host whose KVM cannot emulate every ring-0
//! instruction (PVM) then ends the run with exit status 4 naming the
//! instruction: never a hang.

use rhyve_guests::{debian_kernel, require_kvm, run_bhyve};
use std::time::Duration;

#[test]
fn debian_kernel_early_boot_reads_bhyves_machine() {
    require_kvm();
    let cmdline = "earlyprintk=serial console=ttyS0 panic=-1 rhyve.test=early-boot";
    let args: Vec<String> = [
        "-A",
        "-H",
        "-P",
        "-c",
        "2",
        "-m",
        "512M",
        "-s",
        "0,hostbridge",
        "-s",
        "31,lpc",
        "-l",
        "com1,stdio",
        // The exit-4 path: no assist for what KVM cannot emulate.
        "-o",
        "x86.emulation_assist=false",
    ]
    .iter()
    .map(|s| s.to_string())
    .chain([
        "-o".into(),
        format!("boot.kernel={}", debian_kernel().display()),
        "-o".into(),
        format!("boot.cmdline={cmdline}"),
        rhyve_guests::vm_name("earlyboot"),
    ])
    .collect();
    let r = run_bhyve(
        std::path::Path::new(env!("CARGO_BIN_EXE_bhyve")),
        &args,
        // Minutes on a PVM host, more while the suite's full boot
        // (test.sh) shares the cores; the deadline only catches a hang.
        Duration::from_secs(600),
    );
    let log = r.stdout.replace('\r', "");
    let has = |needle: &str| {
        assert!(log.contains(needle), "guest log lacks {needle:?}:\n{log}");
    };
    // The command line is echoed back.
    has(&format!("Command line: {cmdline}"));
    // e820 follows -m 512M and bhyve's layout.
    has("BIOS-e820: [mem 0x0000000000000000-0x000000000009ffff] usable");
    has("BIOS-e820: [mem 0x00000000000a0000-0x00000000000fffff] reserved");
    has("BIOS-e820: [mem 0x0000000000100000-0x000000001fffffff] usable");
    has("BIOS-e820: [mem 0x00000000e0000000-0x00000000efffffff] reserved");
    // bhyve's SMBIOS strings.
    has("DMI: FreeBSD BHYVE/BHYVE, BIOS 14.0 10/17/2021");
    // ACPI: every table found at bhyve's address, with no complaints.
    has("ACPI: RSDP 0x00000000000F2400");
    for table in ["XSDT", "FACP", "APIC", "DSDT", "HPET", "MCFG", "FACS"] {
        has(&format!("ACPI: {table} 0x"));
    }
    for bad in [
        "Incorrect checksum",
        "ACPI BIOS Warning",
        "ACPI BIOS Error",
        "ACPI Error",
        "ACPI Warning",
    ] {
        assert!(!log.contains(bad), "guest log reports {bad:?}:\n{log}");
    }
    // Both vCPUs are seen.
    has("smpboot: Allowing 2 CPUs");
    has("ACPI: Using ACPI (MADT) for SMP configuration information");
    // The run ends: an instruction this host cannot emulate (exit 4, one
    // line naming it), or on hardware KVM a panic for lack of a root file
    // system and a reset (panic=-1, exit 0).
    match r.code() {
        Some(0) => has("Kernel panic - not syncing"),
        Some(4) => {
            let line = r
                .stderr
                .lines()
                .find(|l| l.contains("cannot emulate the instruction at RIP"));
            assert!(
                line.is_some(),
                "exit 4 without the emulation message: {}",
                r.stderr
            );
            eprintln!(
                "early boot ended as expected on this host: {}",
                line.unwrap()
            );
        }
        other => panic!("unexpected end {other:?}; {}", r.describe()),
    }
}
