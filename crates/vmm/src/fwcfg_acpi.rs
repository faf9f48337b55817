//! rhyve's ACPI tables as bhyve publishes them through QEMU's fw_cfg
//! (`basl.c` with `qemu_loader.c`): one file per table, `etc/acpi/<NAME>`
//! (the RSDP's name is `RSDP`), and the loader script `etc/table-loader`
//! that tells a firmware using it how to install them: allocate every
//! table in high memory, add each table's address to the pointers that
//! name it, then compute each checksum.
//!
//! As in bhyve, the published copies hold what the script expects: every
//! pointer is 0 (the offset into the table it names) and every checksum
//! byte is 0; the tables in guest memory at 0xF2400 stay complete.

use rhyve_boot::AcpiTable;

/// The loader script's file.
pub const TABLE_LOADER: &str = "etc/table-loader";
const ENTRY_SIZE: usize = 128;
const NAME_SIZE: usize = 56;
const CMD_ALLOCATE: u32 = 1;
const CMD_ADD_POINTER: u32 = 2;
const CMD_ADD_CHECKSUM: u32 = 3;
const ZONE_HIGH: u8 = 1;
/// bhyve's `BASL_TABLE_ALIGNMENT` and `BASL_TABLE_ALIGNMENT_FACS`.
const ALIGN: u32 = 0x10;
const ALIGN_FACS: u32 = 0x40;

/// A pointer field: offset and width in its table.
struct Pointer {
    offset: usize,
    size: usize,
}

/// Where a table of this signature may hold pointers to other tables.
fn pointer_fields(signature: &str, len: usize) -> Vec<Pointer> {
    let at = |offset, size| Pointer { offset, size };
    match signature {
        "RSD PTR " => vec![at(16, 4), at(24, 8)],
        "RSDT" => (36..len).step_by(4).map(|o| at(o, 4)).collect(),
        "XSDT" => (36..len).step_by(8).map(|o| at(o, 8)).collect(),
        // FIRMWARE_CTRL, DSDT, X_FIRMWARE_CTRL, X_DSDT.
        "FACP" => vec![at(36, 4), at(40, 4), at(132, 8), at(140, 8)],
        _ => Vec::new(),
    }
}

/// The table's checksum bytes: (offset, start, length).
fn checksums(signature: &str, len: usize) -> Vec<(usize, usize, usize)> {
    match signature {
        // ACPI 1.0 part, then the whole extended structure.
        "RSD PTR " => vec![(8, 0, 20), (32, 0, len)],
        "FACS" => Vec::new(),
        _ => vec![(9, 0, len)],
    }
}

fn file_name(t: &AcpiTable) -> String {
    let name = if t.signature == "RSD PTR " {
        "RSDP"
    } else {
        t.signature.as_str()
    };
    format!("etc/acpi/{name}")
}

fn name_field(name: &str) -> [u8; NAME_SIZE] {
    let mut field = [0u8; NAME_SIZE];
    field[..name.len()].copy_from_slice(name.as_bytes());
    field
}

fn entry(command: u32, body: &[u8]) -> [u8; ENTRY_SIZE] {
    let mut e = [0u8; ENTRY_SIZE];
    e[..4].copy_from_slice(&command.to_le_bytes());
    e[4..4 + body.len()].copy_from_slice(body);
    e
}

/// The files to publish: one per table, then the loader script.
pub fn files(tables: &[AcpiTable]) -> Vec<(String, Vec<u8>)> {
    let mut files = Vec::new();
    let mut allocations = Vec::new();
    let mut patches = Vec::new();
    for t in tables {
        let name = file_name(t);
        let align = if t.signature == "FACS" {
            ALIGN_FACS
        } else {
            ALIGN
        };
        let mut body = name_field(&name).to_vec();
        body.extend_from_slice(&align.to_le_bytes());
        body.push(ZONE_HIGH);
        allocations.push(entry(CMD_ALLOCATE, &body));

        let mut data = t.bytes.clone();
        for p in pointer_fields(&t.signature, data.len()) {
            let Some(field) = data.get_mut(p.offset..p.offset + p.size) else {
                continue;
            };
            let mut value = [0u8; 8];
            value[..p.size].copy_from_slice(field);
            let value = u64::from_le_bytes(value);
            let Some(target) = tables.iter().find(|o| value != 0 && o.addr == value) else {
                continue;
            };
            field.fill(0);
            let mut body = name_field(&name).to_vec();
            body.extend_from_slice(&name_field(&file_name(target)));
            body.extend_from_slice(&(p.offset as u32).to_le_bytes());
            body.push(p.size as u8);
            patches.push(entry(CMD_ADD_POINTER, &body));
        }
        for (offset, start, length) in checksums(&t.signature, data.len()) {
            data[offset] = 0;
            let mut body = name_field(&name).to_vec();
            for v in [offset, start, length] {
                body.extend_from_slice(&(v as u32).to_le_bytes());
            }
            patches.push(entry(CMD_ADD_CHECKSUM, &body));
        }
        files.push((name, data));
    }
    let script: Vec<u8> = allocations
        .iter()
        .chain(&patches)
        .flatten()
        .copied()
        .collect();
    files.push((TABLE_LOADER.to_string(), script));
    files
}

#[cfg(test)]
mod tests {
    use super::*;
    use rhyve_boot::{build_acpi_tables, AcpiPlatform};
    use rhyve_platform::layout::MemoryLayout;
    use std::collections::HashMap;

    fn name_at(e: &[u8], at: usize) -> String {
        let field = &e[at..at + NAME_SIZE];
        let end = field.iter().position(|&b| b == 0).unwrap_or(NAME_SIZE);
        String::from_utf8(field[..end].to_vec()).unwrap()
    }

    fn u32_at(e: &[u8], at: usize) -> u32 {
        u32::from_le_bytes(e[at..at + 4].try_into().unwrap())
    }

    /// Run the loader script as a firmware does (OVMF's
    /// QemuFwCfgAcpi.c): every file at a new address, pointers moved by
    /// the address of the file they name, checksums computed last.
    fn install(files: &[(String, Vec<u8>)]) -> HashMap<String, (u64, Vec<u8>)> {
        let blobs: HashMap<&str, &Vec<u8>> = files.iter().map(|(n, d)| (n.as_str(), d)).collect();
        let script = blobs[TABLE_LOADER];
        assert_eq!(script.len() % ENTRY_SIZE, 0);
        let mut installed: HashMap<String, (u64, Vec<u8>)> = HashMap::new();
        let mut next = 0x7F00_0000u64;
        for e in script.chunks(ENTRY_SIZE) {
            match u32_at(e, 0) {
                CMD_ALLOCATE => {
                    let name = name_at(e, 4);
                    let align = u64::from(u32_at(e, 60));
                    assert_eq!(e[64], ZONE_HIGH);
                    let addr = next.div_ceil(align) * align;
                    let data = blobs[name.as_str()].clone();
                    next = addr + data.len() as u64 + 1;
                    installed.insert(name, (addr, data));
                }
                CMD_ADD_POINTER => {
                    let (dest, src) = (name_at(e, 4), name_at(e, 60));
                    let (offset, size) = (u32_at(e, 116) as usize, e[120] as usize);
                    let src_addr = installed[&src].0;
                    let data = &mut installed.get_mut(&dest).unwrap().1;
                    let mut v = [0u8; 8];
                    v[..size].copy_from_slice(&data[offset..offset + size]);
                    let moved = u64::from_le_bytes(v) + src_addr;
                    data[offset..offset + size].copy_from_slice(&moved.to_le_bytes()[..size]);
                }
                CMD_ADD_CHECKSUM => {
                    let name = name_at(e, 4);
                    let (at, start, len) = (
                        u32_at(e, 60) as usize,
                        u32_at(e, 64) as usize,
                        u32_at(e, 68) as usize,
                    );
                    let data = &mut installed.get_mut(&name).unwrap().1;
                    let sum = data[start..start + len]
                        .iter()
                        .fold(0u8, |s, &b| s.wrapping_add(b));
                    data[at] = 0u8.wrapping_sub(sum);
                }
                other => panic!("unknown loader command {other}"),
            }
        }
        installed
    }

    #[test]
    fn the_loader_installs_rhyves_tables_anywhere() {
        let mut p = AcpiPlatform::new(2, MemoryLayout::new(512 << 20), 0x8086_A201);
        p.com_ports = vec![(0x3F8, 4, 1)];
        p.lpc = Some((31, 0));
        p.qemu_fwcfg = true;
        let tables = build_acpi_tables(&p).unwrap();
        let files = files(&tables);
        let names: Vec<&str> = files.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names,
            [
                "etc/acpi/RSDP",
                "etc/acpi/RSDT",
                "etc/acpi/XSDT",
                "etc/acpi/APIC",
                "etc/acpi/FACP",
                "etc/acpi/HPET",
                "etc/acpi/MCFG",
                "etc/acpi/SPCR",
                "etc/acpi/FACS",
                "etc/acpi/DSDT",
                TABLE_LOADER,
            ]
        );
        let installed = install(&files);
        let new_addr: HashMap<u64, u64> = tables
            .iter()
            .map(|t| (t.addr, installed[&file_name(t)].0))
            .collect();
        // Each installed table is rhyve's, every pointer moved to where the
        // table it names was installed, every checksum right again.
        for t in &tables {
            let (_, data) = &installed[&file_name(t)];
            let mut expected = t.bytes.clone();
            for p in pointer_fields(&t.signature, expected.len()) {
                let field = &mut expected[p.offset..p.offset + p.size];
                let mut v = [0u8; 8];
                v[..p.size].copy_from_slice(field);
                if let Some(moved) = new_addr.get(&u64::from_le_bytes(v)) {
                    field.copy_from_slice(&moved.to_le_bytes()[..p.size]);
                }
            }
            for (at, start, len) in checksums(&t.signature, expected.len()) {
                expected[at] = 0;
                let sum = expected[start..start + len]
                    .iter()
                    .fold(0u8, |s, &b| s.wrapping_add(b));
                expected[at] = 0u8.wrapping_sub(sum);
            }
            assert_eq!(data, &expected, "{}", t.signature);
            if t.signature != "FACS" {
                let sum = data.iter().fold(0u8, |s, &b| s.wrapping_add(b));
                assert_eq!(sum, 0, "{} checksum", t.signature);
            }
        }
        // The pointers a firmware follows: RSDP -> XSDT -> FACP -> DSDT.
        let (xsdt_at, xsdt) = &installed["etc/acpi/XSDT"];
        let (_, rsdp) = &installed["etc/acpi/RSDP"];
        assert_eq!(
            u64::from_le_bytes(rsdp[24..32].try_into().unwrap()),
            *xsdt_at
        );
        let first = u64::from_le_bytes(xsdt[36..44].try_into().unwrap());
        let (facp_at, facp) = &installed["etc/acpi/FACP"];
        assert_eq!(first, *facp_at, "the FADT comes first in the XSDT");
        let dsdt = u64::from_le_bytes(facp[140..148].try_into().unwrap());
        assert_eq!(dsdt, installed["etc/acpi/DSDT"].0);
        // The published copies hold no address and no checksum.
        let (_, published) = &files[4];
        assert_eq!(&published[36..44], &[0; 8], "FACS and DSDT pointers");
        assert_eq!(published[9], 0);
    }
}
