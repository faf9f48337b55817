//! The ACPI tables as an OS finds them (RSDP scan, checksums, XSDT/RSDT,
//! FADT to DSDT and FACS, MADT), checked by our `acpitables` guest
//! (crates/guests/guest/acpitables.c).

use std::path::Path;

use rhyve_guests::run_guest;

#[test]
fn tables_are_found_checksummed_and_describe_bhyves_machine() {
    let run = run_guest(
        Path::new(env!("CARGO_BIN_EXE_bhyve")),
        "acpitables",
        "",
        &["-c", "2"],
        "acpi",
    );
    run.assert_no_failure();
    run.assert_code(1);
    // bhyve's RSDP sits at BHYVE_ACPI_BASE and is ACPI 2.0+.
    run.assert_line("rsdp 0x000f2400 rev 2");
    let mut listed: Vec<&str> = run.lines_starting("table ");
    // DSDT and FACS come last, through the FADT.
    assert_eq!(
        listed.split_off(listed.len().saturating_sub(2)),
        ["table DSDT", "table FACS"],
        "{}",
        run.describe()
    );
    listed.sort_unstable();
    assert_eq!(
        listed,
        [
            "table APIC",
            "table FACP",
            "table HPET",
            "table MCFG",
            "table SPCR"
        ],
        "{}",
        run.describe()
    );
    run.assert_line("xsdt 5 entries");
    for line in [
        "madt lapic 0 id 0",
        "madt lapic 1 id 1",
        "madt ioapic id 0 addr 0xfec00000 gsi 0",
        // IRQ 0 -> GSI 2, edge, active high; the SCI level, active low.
        "madt override irq 0 gsi 2 flags 0005",
        "madt override irq 9 gsi 9 flags 000f",
        "madt lapics 2",
        "acpi ok",
    ] {
        run.assert_line(line);
    }
}
