//! `lpc.fwcfg=qemu` (`-l bootrom,CODE,fwcfg=qemu`): QEMU's fw_cfg on ports
//! 0x510/0x511 in place of bhyve's fwctl, holding the files bhyve
//! publishes there: the operator's `-f` files first (bhyve adds them when
//! fw_cfg starts), then `opt/bhyve/hw.ncpu`, `bootorder` and `etc/e820`,
//! and, once the ACPI tables are built, the tables with QEMU's table
//! loader ([`crate::fwcfg_acpi`]). bhyve's UEFI firmware of Debian's edk2
//! 2022.11 reads only `opt/bhyve/hw.ncpu` and installs its own tables.

use std::path::Path;
use std::sync::{Arc, Mutex};

use rhyve_config::{ConfigTree, FwCfgFile, FwCfgSource};
use rhyve_devices::qemu_fwcfg::{QemuFwCfg, QEMU_FWCFG_PORT_SPAN};
use rhyve_platform::bus::Bus;
use rhyve_platform::layout::{MemoryLayout, FWCFG_SELECTOR_PORT};

use crate::VmmError;

/// The largest `-f name,file=PATH` rhyve publishes. bhyve has no limit;
/// a guest reads fw_cfg a byte per port access, so anything near this
/// already takes minutes to read.
pub const USER_FILE_LIMIT: u64 = 16 << 20;
/// AHCI ports a `bootindex` may be given on (`pci.B.S.F.port.N`).
const AHCI_PORTS: u32 = 32;

/// Whether the tree asks for QEMU's fw_cfg rather than fwctl.
pub fn wanted(tree: &ConfigTree) -> Result<bool, VmmError> {
    let fwcfg = tree
        .get("lpc.fwcfg")
        .map_err(|e| VmmError::Config(e.to_string()))?;
    Ok(fwcfg.as_deref() == Some("qemu"))
}

/// Put `fwcfg` on `io`.
pub fn install(fwcfg: Arc<Mutex<QemuFwCfg>>, io: &Bus) -> Result<(), VmmError> {
    io.insert(fwcfg, u64::from(FWCFG_SELECTOR_PORT), QEMU_FWCFG_PORT_SPAN)
        .map_err(|e| VmmError::Setup(format!("fw_cfg: {e}")))
}

/// fw_cfg's items for a VM with `cpus` vCPUs and `memory`; the `-f` files
/// are read here, before the VMM confines itself.
pub fn build(
    tree: &ConfigTree,
    user_files: &[FwCfgFile],
    cpus: u32,
    memory: &MemoryLayout,
) -> Result<QemuFwCfg, VmmError> {
    let add = |fwcfg: &mut QemuFwCfg, name: &str, data: Vec<u8>| {
        fwcfg
            .add_file(name, data)
            .map_err(|e| VmmError::Setup(e.to_string()))
    };
    // -c is at most 16 bits wide in the tree's checks; the fixed items are
    // 16-bit as in QEMU.
    let mut fwcfg = QemuFwCfg::new(u16::try_from(cpus).unwrap_or(u16::MAX));
    for file in user_files {
        let data = match &file.source {
            FwCfgSource::String(s) => {
                let mut bytes = s.clone().into_bytes();
                bytes.push(0);
                bytes
            }
            FwCfgSource::File(path) => read_user_file(&file.name, path)?,
        };
        add(&mut fwcfg, &file.name, data)?;
    }
    add(&mut fwcfg, "opt/bhyve/hw.ncpu", cpus.to_le_bytes().to_vec())?;
    if let Some(order) = bootorder(tree)? {
        add(&mut fwcfg, "bootorder", order.into_bytes())?;
    }
    add(&mut fwcfg, "etc/e820", e820(memory))?;
    Ok(fwcfg)
}

fn read_user_file(name: &str, path: &Path) -> Result<Vec<u8>, VmmError> {
    rhyve_config::file::read_limited(path, USER_FILE_LIMIT)
        .map_err(|e| VmmError::Setup(format!("fw_cfg file \"{name}\": {e}")))
}

/// QEMU's `etc/e820`: 20-byte entries (address, length, type), little-endian.
fn e820(memory: &MemoryLayout) -> Vec<u8> {
    let mut out = Vec::new();
    for e in memory.e820() {
        out.extend_from_slice(&e.addr.to_le_bytes());
        out.extend_from_slice(&e.size.to_le_bytes());
        out.extend_from_slice(&e.kind.to_le_bytes());
    }
    out
}

/// bhyve's `init_bootorder`: one `/pci@i0cf8/pci@SLOT,FUNC` line (decimal)
/// per device given a `bootindex`, lowest index first; `None` when no
/// device has one. Two devices with the same index, or a negative or
/// non-numeric one, are refused as bhyve refuses them.
fn bootorder(tree: &ConfigTree) -> Result<Option<String>, VmmError> {
    let mut entries: Vec<(i64, String, u8, u8)> = Vec::new();
    for f in rhyve_config::pci_functions(tree)? {
        let name = format!("{}@pci.{}.{}.{}", f.model, f.bus, f.slot, f.func);
        let keys = std::iter::once(format!("{}.bootindex", f.node))
            .chain((0..AHCI_PORTS).map(|p| format!("{}.port.{p}.bootindex", f.node)));
        for key in keys {
            let Some(value) = tree.get_raw(&key) else {
                continue;
            };
            let index = match value.parse::<i64>() {
                Ok(i) if i >= 0 => i,
                _ => {
                    return Err(VmmError::Setup(format!(
                        "Invalid bootindex {value} for {name}"
                    )))
                }
            };
            if let Some((_, other, ..)) = entries.iter().find(|e| e.0 == index) {
                return Err(VmmError::Setup(format!(
                    "Could not set bootindex {index} for {name}. Bootindex already occupied by {other}"
                )));
            }
            entries.push((index, name.clone(), f.slot, f.func));
        }
    }
    if entries.is_empty() {
        return Ok(None);
    }
    entries.sort_by_key(|e| e.0);
    Ok(Some(
        entries
            .iter()
            .map(|(_, _, slot, func)| format!("/pci@i0cf8/pci@{slot},{func}\n"))
            .collect(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rhyve_platform::bus::BusDevice;

    fn tree(args: &str) -> ConfigTree {
        let argv: Vec<String> = args.split_whitespace().map(String::from).collect();
        rhyve_config::parse_bhyve_args(&argv).unwrap().tree
    }

    fn select(f: &mut QemuFwCfg, item: u16) {
        f.write(0, &item.to_le_bytes());
    }

    fn take(f: &mut QemuFwCfg, n: usize) -> Vec<u8> {
        (0..n)
            .map(|_| {
                let mut b = [0u8];
                f.read(1, &mut b);
                b[0]
            })
            .collect()
    }

    /// Every file in the directory, read through the ports as a guest does.
    fn files(fwcfg: &mut QemuFwCfg) -> Vec<(String, Vec<u8>)> {
        select(fwcfg, 0x19);
        let count = u32::from_be_bytes(take(fwcfg, 4).try_into().unwrap());
        let entries: Vec<(String, u16, usize)> = (0..count)
            .map(|_| {
                let e = take(fwcfg, 64);
                let size = u32::from_be_bytes(e[0..4].try_into().unwrap()) as usize;
                let item = u16::from_be_bytes(e[4..6].try_into().unwrap());
                let name = e[8..].split(|&b| b == 0).next().unwrap().to_vec();
                (String::from_utf8(name).unwrap(), item, size)
            })
            .collect();
        entries
            .into_iter()
            .map(|(name, item, size)| {
                select(fwcfg, item);
                (name, take(fwcfg, size))
            })
            .collect()
    }

    #[test]
    fn bhyves_files_are_published() {
        let dir = std::env::temp_dir().join(format!("rhyve-fwcfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let host_file = dir.join("blob");
        std::fs::write(&host_file, b"\x01\x02\x03").unwrap();
        let t = tree(
            "-c 3 -m 512M -s 0,hostbridge -s 3,virtio-blk,/d.img,bootindex=2 \
             -s 4,ahci,hd:/a.img,hd:/b.img,bootindex=1 -l bootrom,/rom.fd,fwcfg=qemu vm",
        );
        let user = [
            FwCfgFile {
                name: "opt/rhyve/greeting".into(),
                source: FwCfgSource::String("hi".into()),
            },
            FwCfgFile {
                name: "opt/rhyve/blob".into(),
                source: FwCfgSource::File(host_file),
            },
        ];
        let memory = MemoryLayout::new(512 << 20);
        let mut fwcfg = build(&t, &user, 3, &memory).unwrap();
        let files = files(&mut fwcfg);
        let names: Vec<&str> = files.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names,
            [
                "bootorder",
                "etc/e820",
                "opt/bhyve/hw.ncpu",
                "opt/rhyve/blob",
                "opt/rhyve/greeting"
            ]
        );
        let get = |n: &str| &files.iter().find(|f| f.0 == n).unwrap().1;
        assert_eq!(get("opt/bhyve/hw.ncpu"), &3u32.to_le_bytes());
        assert_eq!(get("opt/rhyve/greeting"), b"hi\0");
        assert_eq!(get("opt/rhyve/blob"), b"\x01\x02\x03");
        assert_eq!(
            get("bootorder"),
            b"/pci@i0cf8/pci@4,0\n/pci@i0cf8/pci@3,0\n"
        );
        let e820 = get("etc/e820");
        assert_eq!(e820.len(), 20 * memory.e820().len());
        // The first entry: RAM from 0 to the VGA hole.
        assert_eq!(&e820[..8], &0u64.to_le_bytes());
        assert_eq!(&e820[8..16], &0xA0000u64.to_le_bytes());
        assert_eq!(&e820[16..20], &1u32.to_le_bytes());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn bootorder_mistakes_are_refused() {
        let err = |args: &str| match build(&tree(args), &[], 1, &MemoryLayout::new(256 << 20)) {
            Err(e) => e.to_string(),
            Ok(_) => panic!("{args}: accepted"),
        };
        assert_eq!(
            err("-s 3,virtio-blk,/a,bootindex=1 -s 4,virtio-blk,/b,bootindex=1 vm"),
            "Could not set bootindex 1 for virtio-blk@pci.0.4.0. Bootindex already occupied by virtio-blk@pci.0.3.0"
        );
        assert_eq!(
            err("-s 3,virtio-blk,/a,bootindex=-1 vm"),
            "Invalid bootindex -1 for virtio-blk@pci.0.3.0"
        );
        assert_eq!(
            err("-s 3,virtio-blk,/a,bootindex=first vm"),
            "Invalid bootindex first for virtio-blk@pci.0.3.0"
        );
        // No bootindex anywhere: no bootorder file.
        let mut fwcfg = build(
            &tree("-s 3,virtio-blk,/a vm"),
            &[],
            1,
            &MemoryLayout::new(256 << 20),
        )
        .unwrap();
        assert!(files(&mut fwcfg).iter().all(|(n, _)| n != "bootorder"));
    }

    #[test]
    fn user_files_are_bounded_and_may_not_replace_bhyves() {
        let dir = std::env::temp_dir().join(format!("rhyve-fwcfg-big-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let big = dir.join("big");
        std::fs::File::create(&big)
            .unwrap()
            .set_len(USER_FILE_LIMIT + 1)
            .unwrap();
        let memory = MemoryLayout::new(256 << 20);
        let file = |name: &str, source| FwCfgFile {
            name: name.into(),
            source,
        };
        let e = build(
            &tree("vm"),
            &[file("opt/big", FwCfgSource::File(big.clone()))],
            1,
            &memory,
        )
        .err()
        .unwrap()
        .to_string();
        assert!(e.starts_with("fw_cfg file \"opt/big\": "), "{e}");
        assert!(e.contains(&big.display().to_string()), "{e}");
        let e = build(
            &tree("vm"),
            &[file("opt/bhyve/hw.ncpu", FwCfgSource::String("64".into()))],
            1,
            &memory,
        )
        .err()
        .unwrap()
        .to_string();
        assert_eq!(e, "fw_cfg file \"opt/bhyve/hw.ncpu\" exists already");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
