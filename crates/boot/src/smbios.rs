//! SMBIOS 2.6 tables at 0xF1000, as bhyve's `smbiostbl.c` builds them.
//!
//! A 2.x entry point (`_SM_`/`_DMI_`) followed by structure types 0, 1, 2,
//! 3, 4 (one per socket), 16, 17, 19 (one per RAM region), 32 and 127. The
//! strings come from the config tree keys `bios.*`, `system.*`, `board.*`
//! and `chassis.*` with bhyve's defaults; the type 1 UUID from `uuid`, or,
//! like bhyve, from MD5(VM name, host name) as a version 3 UUID. No
//! rust-vmm crate writes SMBIOS, so the structures are encoded here from
//! the DMTF SMBIOS 2.6 specification.

use md5::{Digest, Md5};
use rhyve_config::ConfigTree;
use rhyve_platform::layout::{MemoryLayout, ACPI_BASE, HIGHMEM_BASE, SMBIOS_BASE};
use vm_memory::GuestMemoryMmap;

use crate::{checksum, write_guest, BootError};

const ENTRY_POINT_LEN: usize = 0x1F;
/// FreeBSD's MAXHOSTNAMELEN: bhyve hashes the whole host name buffer.
const HOSTNAME_BUFFER: usize = 256;

/// Processor topology, as set by `-c` (`sockets`, `cores`, `threads`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CpuTopology {
    pub sockets: u16,
    pub cores: u16,
    pub threads: u16,
}

/// One structure: formatted area plus its string set.
struct Structure {
    bytes: Vec<u8>,
    strings: Vec<String>,
}

impl Structure {
    fn new(kind: u8, len: u8, handle: u16) -> Self {
        let mut bytes = vec![0u8; usize::from(len)];
        bytes[0] = kind;
        bytes[1] = len;
        bytes[2..4].copy_from_slice(&handle.to_le_bytes());
        Self {
            bytes,
            strings: Vec::new(),
        }
    }

    /// Add a string at `offset`; an empty string is "no string" (0),
    /// since an empty entry would end the string set early.
    fn string(&mut self, offset: usize, s: &str) {
        if s.is_empty() {
            self.bytes[offset] = 0;
            return;
        }
        self.strings.push(s.to_string());
        self.bytes[offset] = self.strings.len() as u8;
    }

    fn u8(&mut self, offset: usize, v: u8) {
        self.bytes[offset] = v;
    }

    fn u16(&mut self, offset: usize, v: u16) {
        self.bytes[offset..offset + 2].copy_from_slice(&v.to_le_bytes());
    }

    fn u32(&mut self, offset: usize, v: u32) {
        self.bytes[offset..offset + 4].copy_from_slice(&v.to_le_bytes());
    }

    fn u64(&mut self, offset: usize, v: u64) {
        self.bytes[offset..offset + 8].copy_from_slice(&v.to_le_bytes());
    }

    fn encode(self) -> Vec<u8> {
        let mut out = self.bytes;
        if self.strings.is_empty() {
            out.extend_from_slice(&[0, 0]);
        } else {
            for s in &self.strings {
                // Strings are NUL-terminated: drop any NUL a user put in.
                out.extend(s.bytes().filter(|&b| b != 0));
                out.push(0);
            }
            out.push(0);
        }
        out
    }
}

/// A config string with bhyve's default.
fn key(config: &ConfigTree, path: &str, default: &str) -> Result<String, BootError> {
    Ok(config.get(path)?.unwrap_or_else(|| default.to_string()))
}

/// Parse `xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx` into its 16 bytes
/// in SMBIOS order (first three fields little-endian, like `uuid_enc_le`).
fn parse_uuid(s: &str) -> Result<[u8; 16], BootError> {
    let bad = || BootError::BadUuid(s.to_string());
    let groups: Vec<&str> = s.split('-').collect();
    let lens: Vec<usize> = groups.iter().map(|g| g.len()).collect();
    if lens != [8, 4, 4, 4, 12] {
        return Err(bad());
    }
    let hex: String = groups.concat();
    let mut big = [0u8; 16];
    for (i, b) in big.iter_mut().enumerate() {
        *b = u8::from_str_radix(hex.get(2 * i..2 * i + 2).ok_or_else(bad)?, 16)
            .map_err(|_| bad())?;
    }
    let mut le = big;
    le[0..4].reverse();
    le[4..6].reverse();
    le[6..8].reverse();
    Ok(le)
}

/// bhyve's reproducible UUID: MD5 over the VM name and the host name
/// buffer, marked as a version 3 (name-based, MD5) RFC 4122 UUID.
fn derived_uuid(vm_name: &str, hostname: &str) -> [u8; 16] {
    let mut buffer = [0u8; HOSTNAME_BUFFER];
    let host = hostname.as_bytes();
    let n = host.len().min(HOSTNAME_BUFFER - 1);
    buffer[..n].copy_from_slice(&host[..n]);
    let mut md5 = Md5::new();
    md5.update(vm_name.as_bytes());
    md5.update(buffer);
    let mut digest: [u8; 16] = md5.finalize().into();
    digest[6] = (digest[6] & 0x0F) | 0x30;
    digest[8] = (digest[8] & 0x3F) | 0x80;
    digest
}

/// gethostname(2) rather than /proc/sys/kernel/hostname: the same name,
/// and it works in a jail without /proc (rhyve-jailer).
fn host_name() -> Result<String, BootError> {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most buf.len() bytes into buf.
    if unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) } != 0 {
        return Err(BootError::Hostname(std::io::Error::last_os_error()));
    }
    let len = buf.iter().position(|b| *b == 0).unwrap_or(buf.len());
    Ok(String::from_utf8_lossy(&buf[..len]).into_owned())
}

/// The entry point and structure table as they sit at [`SMBIOS_BASE`].
pub fn build_smbios(
    config: &ConfigTree,
    memory: &MemoryLayout,
    topology: CpuTopology,
) -> Result<Vec<u8>, BootError> {
    let uuid = match config.get("uuid")? {
        Some(u) => parse_uuid(&u)?,
        None => derived_uuid(&config.get("name")?.unwrap_or_default(), &host_name()?),
    };
    build_with_uuid(config, memory, topology, uuid)
}

fn build_with_uuid(
    config: &ConfigTree,
    memory: &MemoryLayout,
    topology: CpuTopology,
    uuid: [u8; 16],
) -> Result<Vec<u8>, BootError> {
    if topology.sockets == 0 || topology.cores == 0 || topology.threads == 0 {
        return Err(BootError::InvalidPlatform(format!(
            "CPU topology {topology:?} has a zero count"
        )));
    }
    let mut structures: Vec<Vec<u8>> = Vec::new();
    let mut handle: u16 = 0;
    let mut next = || {
        handle += 1;
        handle
    };

    // Type 0: BIOS information.
    let mut s = Structure::new(0, 0x18, next());
    s.string(4, &key(config, "bios.vendor", "BHYVE")?);
    s.string(5, &key(config, "bios.version", "14.0")?);
    s.u16(6, 0xF000);
    s.string(8, &key(config, "bios.release_date", "10/17/2021")?);
    // ISA, PCI, shadowing, CD boot, EDD.
    s.u64(10, 0x10 | 0x80 | 0x1000 | 0x8000 | 0x80000);
    s.u8(18, 0x01); // ACPI
    s.u8(19, 0x01 | 0x10); // BIOS boot specification, virtual machine
    s.u8(22, 0xFF); // no embedded controller firmware
    s.u8(23, 0xFF);
    structures.push(s.encode());

    // Type 1: system information.
    let mut s = Structure::new(1, 0x1B, next());
    s.string(4, &key(config, "system.manufacturer", "FreeBSD")?);
    s.string(5, &key(config, "system.product_name", "BHYVE")?);
    s.string(6, &key(config, "system.version", "1.0")?);
    s.string(7, &key(config, "system.serial_number", "None")?);
    s.bytes[8..24].copy_from_slice(&uuid);
    s.u8(24, 0x06); // woken by the power switch
    s.string(25, &key(config, "system.sku", "None")?);
    s.string(26, &key(config, "system.family_name", "Virtual Machine")?);
    structures.push(s.encode());

    // Type 2 then 3: the board names the chassis that follows it.
    let board_handle = next();
    let chassis_handle = next();
    let mut s = Structure::new(2, 0x0F, board_handle);
    s.string(4, &key(config, "board.manufacturer", "FreeBSD")?);
    s.string(5, &key(config, "board.product_name", "BHYVE")?);
    s.string(6, &key(config, "board.version", "1.0")?);
    s.string(7, &key(config, "board.serial_number", "None")?);
    s.string(8, &key(config, "board.asset_tag", "None")?);
    s.u8(9, 0x01); // hosting board
    s.string(10, &key(config, "board.location", "None")?);
    s.u16(11, chassis_handle);
    s.u8(13, 0x0A); // motherboard
    structures.push(s.encode());

    let mut s = Structure::new(3, 0x16, chassis_handle);
    s.string(4, &key(config, "chassis.manufacturer", "FreeBSD")?);
    s.u8(5, 0x02); // unknown enclosure
    s.string(6, &key(config, "chassis.version", "1.0")?);
    s.string(7, &key(config, "chassis.serial_number", "None")?);
    s.string(8, &key(config, "chassis.asset_tag", "None")?);
    s.u8(9, 0x03); // boot-up, power supply and thermal state: safe
    s.u8(10, 0x03);
    s.u8(11, 0x03);
    s.u8(12, 0x03); // no security
    s.string(21, &key(config, "chassis.sku", "None")?);
    structures.push(s.encode());

    // Type 4: one per socket.
    let threads_per_socket = u32::from(topology.cores) * u32::from(topology.threads);
    for socket in 0..topology.sockets {
        let mut s = Structure::new(4, 0x2A, next());
        s.string(4, &format!("CPU #{socket}"));
        s.u8(5, 0x03); // central processor
        s.u8(6, 0x01); // family: other
        s.string(7, " ");
        s.string(16, " ");
        s.u8(24, 0x40 | 0x01); // populated, enabled
        s.u8(25, 0x06); // no upgrade
        s.u16(26, 0xFFFF); // no cache information
        s.u16(28, 0xFFFF);
        s.u16(30, 0xFFFF);
        s.string(32, "None");
        s.string(33, "None");
        s.string(34, "None");
        s.u8(
            35,
            if topology.cores > 254 {
                0
            } else {
                topology.cores as u8
            },
        );
        s.u8(
            37,
            if threads_per_socket > 254 {
                0
            } else {
                threads_per_socket as u8
            },
        );
        s.u16(38, 0x04); // 64-bit capable
        s.u16(40, 0x01); // family 2: other
        structures.push(s.encode());
    }

    // Type 16: the physical memory array.
    let total = memory.total();
    let array_handle = next();
    let mut s = Structure::new(16, 0x17, array_handle);
    s.u8(4, 0x03); // system board
    s.u8(5, 0x03); // system memory
    s.u8(6, 0x03); // no error correction
    s.u32(7, 0x8000_0000); // see the extended size
    s.u16(11, 0xFFFE); // no error information
    s.u16(13, if memory.highmem > 0 { 2 } else { 1 });
    s.u64(15, total);
    structures.push(s.encode());

    // Type 17: one memory device holding all of it.
    let mut s = Structure::new(17, 0x28, next());
    s.u16(4, array_handle);
    s.u16(6, 0xFFFE);
    s.u16(8, 64);
    s.u16(10, 64);
    let size_kib = total / 1024;
    let size_mib = (total >> 20).min(0x7FFF_FFFF);
    if size_kib <= 0x7FFF {
        s.u16(12, size_kib as u16 | 0x8000);
    } else if size_mib < 0x7FFF {
        s.u16(12, size_mib as u16);
    } else {
        s.u16(12, 0x7FFF);
        s.u32(28, size_mib as u32);
    }
    s.u8(14, 0x02); // form factor unknown
    s.string(16, " ");
    s.string(17, " ");
    s.u8(18, 0x02); // type unknown
    s.u16(19, 0x0004); // details unknown
    s.string(23, " ");
    s.string(24, "None");
    s.string(25, "None");
    s.string(26, "None");
    structures.push(s.encode());

    // Type 19: one mapped range per RAM region (end exclusive, as bhyve).
    let mut ranges = vec![(0, memory.lowmem)];
    if memory.highmem > 0 {
        ranges.push((HIGHMEM_BASE, HIGHMEM_BASE + memory.highmem));
    }
    for (start, end) in ranges {
        let mut s = Structure::new(19, 0x1F, next());
        s.u32(4, 0xFFFF_FFFF); // see the extended addresses
        s.u32(8, 0xFFFF_FFFF);
        s.u16(12, array_handle);
        s.u8(14, 1);
        s.u64(15, start);
        s.u64(23, end);
        structures.push(s.encode());
    }

    // Type 32: booted without errors; type 127: end of table.
    structures.push(Structure::new(32, 0x0B, next()).encode());
    structures.push(Structure::new(127, 0x04, next()).encode());

    let table: Vec<u8> = structures.concat();
    let max_structure = structures.iter().map(Vec::len).max().unwrap_or(0);
    let total_len = (ENTRY_POINT_LEN + table.len()) as u64;
    if total_len > ACPI_BASE - SMBIOS_BASE || table.len() > usize::from(u16::MAX) {
        return Err(BootError::TableTooLarge {
            what: "the SMBIOS tables",
            size: total_len,
            base: SMBIOS_BASE,
            limit: ACPI_BASE,
        });
    }

    let mut ep = vec![0u8; ENTRY_POINT_LEN];
    ep[0..4].copy_from_slice(b"_SM_");
    ep[5] = ENTRY_POINT_LEN as u8;
    ep[6] = 2; // SMBIOS 2.6
    ep[7] = 6;
    ep[8..10].copy_from_slice(&(max_structure as u16).to_le_bytes());
    ep[16..21].copy_from_slice(b"_DMI_");
    ep[22..24].copy_from_slice(&(table.len() as u16).to_le_bytes());
    ep[24..28].copy_from_slice(&((SMBIOS_BASE + ENTRY_POINT_LEN as u64) as u32).to_le_bytes());
    ep[28..30].copy_from_slice(&(structures.len() as u16).to_le_bytes());
    ep[30] = 0x26;
    ep[21] = checksum(&ep[16..]);
    ep[4] = checksum(&ep);

    ep.extend_from_slice(&table);
    Ok(ep)
}

/// Write the SMBIOS entry point and tables at [`SMBIOS_BASE`].
pub fn write_smbios(
    mem: &GuestMemoryMmap,
    config: &ConfigTree,
    memory: &MemoryLayout,
    topology: CpuTopology,
) -> Result<(), BootError> {
    let bytes = build_smbios(config, memory, topology)?;
    write_guest(mem, SMBIOS_BASE, &bytes, "SMBIOS tables")
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOPOLOGY: CpuTopology = CpuTopology {
        sockets: 2,
        cores: 1,
        threads: 1,
    };

    /// (type, handle, formatted bytes, strings) of every structure.
    fn parse(table: &[u8]) -> Vec<(u8, u16, Vec<u8>, Vec<String>)> {
        let mut out = Vec::new();
        let mut o = 0;
        while o < table.len() {
            let len = table[o + 1] as usize;
            let formatted = table[o..o + len].to_vec();
            let mut p = o + len;
            let mut strings = Vec::new();
            if table[p] == 0 && table[p + 1] == 0 {
                p += 2;
            } else {
                loop {
                    let end = p + table[p..].iter().position(|&b| b == 0).unwrap();
                    strings.push(String::from_utf8(table[p..end].to_vec()).unwrap());
                    p = end + 1;
                    if table[p] == 0 {
                        p += 1;
                        break;
                    }
                }
            }
            let handle = u16::from_le_bytes([formatted[2], formatted[3]]);
            out.push((formatted[0], handle, formatted, strings));
            o = p;
        }
        out
    }

    fn string_of(s: &(u8, u16, Vec<u8>, Vec<String>), offset: usize) -> &str {
        &s.3[s.2[offset] as usize - 1]
    }

    #[test]
    fn entry_point_checksums_and_counts() {
        let memory = MemoryLayout::new(6 << 30);
        let t = build_with_uuid(&ConfigTree::new(), &memory, TOPOLOGY, [0; 16]).unwrap();
        assert_eq!(&t[0..4], b"_SM_");
        assert_eq!(checksum(&t[..0x1F]), 0);
        assert_eq!(checksum(&t[0x10..0x1F]), 0);
        assert_eq!(&t[0x10..0x15], b"_DMI_");
        let stlen = u16::from_le_bytes([t[22], t[23]]) as usize;
        assert_eq!(stlen, t.len() - 0x1F);
        assert_eq!(u32::from_le_bytes(t[24..28].try_into().unwrap()), 0xF101F);
        let s = parse(&t[0x1F..]);
        let kinds: Vec<u8> = s.iter().map(|x| x.0).collect();
        assert_eq!(kinds, [0, 1, 2, 3, 4, 4, 16, 17, 19, 19, 32, 127]);
        assert_eq!(u16::from_le_bytes([t[28], t[29]]) as usize, s.len());
        let handles: Vec<u16> = s.iter().map(|x| x.1).collect();
        assert_eq!(handles, (1..=12).collect::<Vec<u16>>());
        let maxsize = u16::from_le_bytes([t[8], t[9]]) as usize;
        assert!(maxsize >= s.iter().map(|x| x.2.len()).max().unwrap());
    }

    #[test]
    fn defaults_match_bhyve() {
        let memory = MemoryLayout::new(512 << 20);
        let t = build_with_uuid(&ConfigTree::new(), &memory, TOPOLOGY, [0; 16]).unwrap();
        let s = parse(&t[0x1F..]);
        assert_eq!(string_of(&s[0], 4), "BHYVE");
        assert_eq!(string_of(&s[0], 5), "14.0");
        assert_eq!(string_of(&s[0], 8), "10/17/2021");
        assert_eq!(string_of(&s[1], 4), "FreeBSD");
        assert_eq!(string_of(&s[1], 5), "BHYVE");
        assert_eq!(string_of(&s[1], 26), "Virtual Machine");
        assert_eq!(string_of(&s[2], 5), "BHYVE");
        assert_eq!(u16::from_le_bytes([s[2].2[11], s[2].2[12]]), s[3].1);
        assert_eq!(string_of(&s[4], 4), "CPU #0");
        assert_eq!(string_of(&s[5], 4), "CPU #1");
        // Type 17 size 512 MiB, type 19 range 0 - 512 MiB.
        let t17 = &s[7].2;
        assert_eq!(u16::from_le_bytes([t17[12], t17[13]]), 512);
        assert_eq!(u16::from_le_bytes([t17[4], t17[5]]), s[6].1);
        let t19 = &s[8].2;
        assert_eq!(
            u64::from_le_bytes(t19[23..31].try_into().unwrap()),
            512 << 20
        );
    }

    #[test]
    fn config_keys_override_strings() {
        let mut config = ConfigTree::new();
        config.set("bios.vendor", "Acme").unwrap();
        config.set("system.product_name", "Roadrunner").unwrap();
        config.set("chassis.sku", "").unwrap();
        config
            .set("uuid", "12345678-9abc-def0-1122-334455667788")
            .unwrap();
        let memory = MemoryLayout::new(1 << 30);
        let topo = CpuTopology {
            sockets: 1,
            cores: 2,
            threads: 2,
        };
        let t = build_smbios(&config, &memory, topo).unwrap();
        let s = parse(&t[0x1F..]);
        assert_eq!(string_of(&s[0], 4), "Acme");
        assert_eq!(string_of(&s[1], 5), "Roadrunner");
        assert_eq!(s[3].2[21], 0, "empty string means no string");
        assert_eq!(
            &s[1].2[8..24],
            &[
                0x78, 0x56, 0x34, 0x12, 0xbc, 0x9a, 0xf0, 0xde, 0x11, 0x22, 0x33, 0x44, 0x55, 0x66,
                0x77, 0x88
            ]
        );
        assert_eq!((s[4].2[35], s[4].2[37]), (2, 4));
    }

    #[test]
    fn bad_uuid_is_refused() {
        let mut config = ConfigTree::new();
        config.set("uuid", "not-a-uuid").unwrap();
        let r = build_smbios(&config, &MemoryLayout::new(1 << 30), TOPOLOGY);
        assert!(matches!(r, Err(BootError::BadUuid(_))));
    }

    #[test]
    fn derived_uuid_is_version_3_and_stable() {
        let a = derived_uuid("vm0", "host");
        assert_eq!(a, derived_uuid("vm0", "host"));
        assert_ne!(a, derived_uuid("vm1", "host"));
        assert_eq!(a[6] >> 4, 3);
        assert_eq!(a[8] >> 6, 2);
    }

    #[test]
    fn large_memory_uses_extended_sizes() {
        let memory = MemoryLayout::new(64 << 30);
        let t = build_with_uuid(&ConfigTree::new(), &memory, TOPOLOGY, [0; 16]).unwrap();
        let s = parse(&t[0x1F..]);
        let t17 = &s[7].2;
        assert_eq!(u16::from_le_bytes([t17[12], t17[13]]), 0x7FFF);
        assert_eq!(
            u32::from_le_bytes(t17[28..32].try_into().unwrap()),
            64 << 10
        );
        let t19b = &s[9].2;
        assert_eq!(
            u64::from_le_bytes(t19b[15..23].try_into().unwrap()),
            4 << 30
        );
    }
}
