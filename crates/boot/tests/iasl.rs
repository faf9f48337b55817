//! Disassembles every ACPI table we build with iasl (Debian package
//! acpica-tools) and compiles the DSDT back: the same check an OS's ACPI
//! parser would make. Fails, never skips, when iasl is missing.

use std::path::{Path, PathBuf};
use std::process::Command;

use rhyve_boot::{build_acpi_tables, AcpiPlatform, PciIntxRoute};
use rhyve_platform::layout::MemoryLayout;

fn platform() -> AcpiPlatform {
    let mut p = AcpiPlatform::new(2, MemoryLayout::new(512 << 20), 0x8086_A201);
    p.com_ports = vec![(0x3F8, 4, 1), (0x2F8, 3, 2)];
    p.lpc = Some((31, 0));
    p.i8042 = true;
    p.qemu_fwcfg = true;
    p.pci_intx = vec![
        PciIntxRoute {
            bus: 0,
            slot: 2,
            pin: 1,
            gsi: 16,
            pirq: 0,
        },
        PciIntxRoute {
            bus: 0,
            slot: 3,
            pin: 1,
            gsi: 17,
            pirq: 1,
        },
        PciIntxRoute {
            bus: 0,
            slot: 4,
            pin: 2,
            gsi: 18,
            pirq: 6,
        },
        PciIntxRoute {
            bus: 0,
            slot: 4,
            pin: 1,
            gsi: 19,
            pirq: 7,
        },
    ];
    p
}

fn scratch_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("rhyve-boot-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create scratch dir");
    dir
}

fn iasl(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("iasl")
        .current_dir(dir)
        .args(args)
        .output()
        .expect("iasl must be installed (apt-get install acpica-tools)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "iasl {args:?} failed:\n{text}");
    text
}

fn assert_clean(what: &str, output: &str) {
    let lower = output.to_lowercase();
    for bad in ["error", "warning", "checksum", "invalid", "length"] {
        for line in lower.lines() {
            // iasl's summary lines ("0 Errors, 0 Warnings") are fine.
            let informational = line.starts_with("input file")
                || line.starts_with("acpi: ")
                || line.starts_with("formatted output");
            if line.contains(bad)
                && !informational
                && !line.contains("0 errors")
                && !line.contains("compilation complete")
                && !line.contains("is \"")
            {
                panic!("{what}: iasl reported \"{line}\" in:\n{output}");
            }
        }
    }
}

/// iasl 20200925 cannot disassemble a lone binary RSDP, so compile the
/// RSDP's fields as an iasl data table instead and require the same bytes
/// (iasl computes both checksums itself).
fn check_rsdp_by_recompiling(dir: &Path, rsdp: &[u8]) {
    let u32_at = |o: usize| u32::from_le_bytes(rsdp[o..o + 4].try_into().unwrap());
    let xsdt = u64::from_le_bytes(rsdp[24..32].try_into().unwrap());
    let oem = String::from_utf8_lossy(&rsdp[9..15]).to_string();
    let source = format!(
        "[0008]\t\tSignature : \"RSD PTR \"\n\
         [0001]\t\tChecksum : 00\n\
         [0006]\t\tOem ID : \"{oem}\"\n\
         [0001]\t\tRevision : {:02X}\n\
         [0004]\t\tRSDT Address : {:08X}\n\
         [0004]\t\tLength : {:08X}\n\
         [0008]\t\tXSDT Address : {xsdt:016X}\n\
         [0001]\t\tExtended Checksum : 00\n\
         [0003]\t\tReserved : 000000\n",
        rsdp[15],
        u32_at(16),
        u32_at(20),
    );
    std::fs::write(dir.join("rsdp.asl"), source).unwrap();
    let out = iasl(dir, &["rsdp.asl"]);
    assert_clean("rsdp.asl", &out);
    let compiled = std::fs::read(dir.join("rsdp.aml")).expect("iasl wrote rsdp.aml");
    assert_eq!(compiled, rsdp, "iasl encodes the RSDP differently");
}

fn run_for(name: &str, p: &AcpiPlatform) {
    let dir = scratch_dir(name);
    let tables = build_acpi_tables(p).expect("build tables");
    for t in &tables {
        if t.signature == "RSD PTR " {
            check_rsdp_by_recompiling(&dir, &t.bytes);
            continue;
        }
        let file = format!("{}.dat", t.signature.trim().replace(' ', "_"));
        std::fs::write(dir.join(&file), &t.bytes).unwrap();
        let out = iasl(&dir, &["-d", &file]);
        assert_clean(&file, &out);
        let dsl = std::fs::read_to_string(dir.join(file.replace(".dat", ".dsl")))
            .expect("iasl wrote a .dsl");
        assert!(
            !dsl.to_lowercase().contains("incorrect"),
            "{file}: iasl flags a field:\n{dsl}"
        );
    }
    // The DSDT must compile back from its disassembly.
    let out = iasl(&dir, &["-p", "dsdt-again", "DSDT.dsl"]);
    assert!(
        out.contains("0 Errors"),
        "DSDT recompile reported errors:\n{out}"
    );
    let dsl = std::fs::read_to_string(dir.join("DSDT.dsl")).unwrap();
    for needle in [
        "PNP0A03", "PNP0501", "PNP0B00", "PNP0100", "PNP0000", "PNP0103", "PNP0C02", "PNP0C0F",
        "_PRT", "_S5_", "QEMU0002",
    ] {
        if (needle == "PNP0C0F" && p.lpc.is_none())
            || (needle == "QEMU0002" && !p.qemu_fwcfg)
            || (needle == "PNP0501" && p.com_ports.is_empty())
        {
            continue;
        }
        assert!(dsl.contains(needle), "DSDT lacks {needle}:\n{dsl}");
    }
    if std::env::var_os("RHYVE_KEEP_ACPI").is_none() {
        let _ = std::fs::remove_dir_all(&dir);
    }
}

#[test]
fn iasl_accepts_every_table() {
    run_for("lpc", &platform());
}

#[test]
fn iasl_accepts_tables_without_lpc_or_devices() {
    let mut p = platform();
    p.lpc = None;
    p.i8042 = false;
    p.qemu_fwcfg = false;
    p.com_ports.clear();
    p.pci_intx.clear();
    p.cpus = 1;
    run_for("bare", &p);
}
