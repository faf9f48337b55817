//! Decodes the SMBIOS tables with dmidecode (Debian package dmidecode) from
//! a dump file, the way a guest's dmidecode would read them. Fails, never
//! skips, when dmidecode is missing.

use std::process::Command;

use rhyve_boot::{build_smbios, CpuTopology};
use rhyve_config::ConfigTree;
use rhyve_platform::layout::MemoryLayout;

fn checksum(bytes: &[u8]) -> u8 {
    bytes
        .iter()
        .fold(0u8, |s, b| s.wrapping_add(*b))
        .wrapping_neg()
}

/// dmidecode's `--dump-bin` layout: entry point at 0, table at 32, with
/// the entry point's table address rewritten to 32.
fn dump_file(smbios: &[u8], name: &str) -> std::path::PathBuf {
    let mut ep = smbios[..0x1F].to_vec();
    ep[24..28].copy_from_slice(&32u32.to_le_bytes());
    ep[21] = 0;
    ep[21] = checksum(&ep[16..]);
    ep[4] = 0;
    ep[4] = checksum(&ep);
    let mut dump = ep;
    dump.push(0);
    dump.extend_from_slice(&smbios[0x1F..]);
    let path = std::env::temp_dir().join(format!("rhyve-smbios-{name}-{}.bin", std::process::id()));
    std::fs::write(&path, dump).unwrap();
    path
}

fn dmidecode(smbios: &[u8], name: &str) -> String {
    let path = dump_file(smbios, name);
    let out = Command::new("dmidecode")
        .arg("--from-dump")
        .arg(&path)
        .output()
        .expect("dmidecode must be installed (apt-get install dmidecode)");
    if std::env::var_os("RHYVE_KEEP_SMBIOS").is_none() {
        let _ = std::fs::remove_file(&path);
    }
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "dmidecode failed:\n{text}");
    for bad in [
        "BAD INDEX",
        "Invalid entry length",
        "Wrong DMI",
        "Bad",
        "truncated",
    ] {
        assert!(!text.contains(bad), "dmidecode reports \"{bad}\":\n{text}");
    }
    text
}

#[test]
fn dmidecode_reads_bhyve_defaults() {
    let mut config = ConfigTree::new();
    config
        .set("uuid", "6ba7b810-9dad-11d1-80b4-00c04fd430c8")
        .unwrap();
    let topo = CpuTopology {
        sockets: 2,
        cores: 2,
        threads: 1,
    };
    let smbios = build_smbios(&config, &MemoryLayout::new(6 << 30), topo).unwrap();
    let text = dmidecode(&smbios, "defaults");
    for needle in [
        "SMBIOS 2.6 present.",
        "12 structures occupying",
        "Vendor: BHYVE",
        "Version: 14.0",
        "Release Date: 10/17/2021",
        "Manufacturer: FreeBSD",
        "Product Name: BHYVE",
        "Family: Virtual Machine",
        "UUID: 6ba7b810-9dad-11d1-80b4-00c04fd430c8",
        "Socket Designation: CPU #1",
        "Core Count: 2",
        "Maximum Capacity: 6 GB",
        "Size: 6 GB",
        "System is a virtual machine",
        "No errors detected",
        "End Of Table",
    ] {
        assert!(text.contains(needle), "no \"{needle}\" in:\n{text}");
    }
}

#[test]
fn dmidecode_reads_overridden_strings() {
    let mut config = ConfigTree::new();
    config
        .set("uuid", "00000000-0000-0000-0000-000000000001")
        .unwrap();
    config.set("system.manufacturer", "Acme Corp").unwrap();
    config.set("board.asset_tag", "A-42").unwrap();
    config.set("chassis.version", "").unwrap();
    let topo = CpuTopology {
        sockets: 1,
        cores: 1,
        threads: 1,
    };
    let smbios = build_smbios(&config, &MemoryLayout::new(256 << 20), topo).unwrap();
    let text = dmidecode(&smbios, "override");
    assert!(text.contains("Manufacturer: Acme Corp"), "{text}");
    assert!(text.contains("Asset Tag: A-42"), "{text}");
    assert!(text.contains("Size: 256 MB"), "{text}");
}
