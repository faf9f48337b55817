//! QEMU's firmware configuration interface (fw_cfg) on ports 0x510/0x511,
//! as bhyve offers it with `-l bootrom,...,fwcfg=qemu` (`qemu_fwcfg.c`).
//! It takes the place of bhyve's fwctl on the same ports.
//!
//! The interface, as bhyve implements it:
//! - 0x510, the selector: a 16-bit write picks an item (bits 0-13 the
//!   index, bit 15 the architecture-specific flag, bit 14, QEMU's "write"
//!   flag, ignored) and rewinds the item; a 16-bit read returns the
//!   selector;
//! - 0x511, the data port: each 8-bit read returns the item's next byte,
//!   0 past its end or for an item that does not exist; writes do nothing
//!   (QEMU 2.4 and later ignore them too);
//! - fixed items: 0x00 the signature "QEMU", 0x01 the ID (bit 0: the I/O
//!   interface; no DMA interface, as bhyve offers none), 0x05 and 0x0F the
//!   CPU count (16-bit), 0x19 the file directory;
//! - files at items 0x20 up, in the order they were added; the directory
//!   is a big-endian count followed by 64-byte entries (big-endian size
//!   and item, a reserved u16, a NUL-padded 56-byte name), sorted by name.
//!
//! bhyve ends the VM on an access of the wrong width; rhyve ignores it (a
//! read returns all-ones) and logs the first one, so a guest cannot end or
//! flood the VMM this way.

use std::collections::BTreeMap;

use rhyve_platform::bus::BusDevice;
use rhyve_platform::snapshot::Schema;
use serde::{Deserialize, Serialize};

/// Ports from 0x510 the bus gives this device: selector and data.
pub const QEMU_FWCFG_PORT_SPAN: u64 = 2;
/// A file name's limit, its NUL included (`QEMU_FWCFG_MAX_NAME`).
pub const MAX_NAME: usize = 56;

const ITEM_SIGNATURE: u16 = 0x00;
const ITEM_ID: u16 = 0x01;
const ITEM_NB_CPUS: u16 = 0x05;
const ITEM_MAX_CPUS: u16 = 0x0F;
const ITEM_FILE_DIR: u16 = 0x19;
const FIRST_FILE_ITEM: u16 = 0x20;
/// The 14-bit index space (`QEMU_FWCFG_INDEX_MASK`).
const INDEX_MASK: u16 = 0x3FFF;
const ARCH_SPECIFIC: u16 = 0x8000;
/// The ID item: the traditional I/O interface, no DMA.
const ID_IO_INTERFACE: u32 = 1;

/// Why a file cannot be added.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FwCfgError {
    #[error("fw_cfg file name \"{0}\" is too long (at most {max} bytes)", max = MAX_NAME - 1)]
    NameTooLong(String),
    #[error("fw_cfg file \"{0}\" exists already")]
    Duplicate(String),
    #[error("fw_cfg file \"{0}\" is larger than 4 GiB")]
    TooLarge(String),
    #[error("fw_cfg has no room for file \"{0}\" (at most {max} files)", max = INDEX_MASK - FIRST_FILE_ITEM + 1)]
    Full(String),
}

/// The fw_cfg items of a VM, and the guest's position in the selected one.
///
/// A snapshot saves all of it, items included: a restored guest may be
/// part way through reading them, and the ACPI tables among them are not
/// rebuilt on restore (the guest's copy is in its RAM).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QemuFwCfg {
    /// Item data by selector value (index, and [`ARCH_SPECIFIC`] for the
    /// architecture-specific ones); the directory item is rebuilt when it
    /// is selected after files were added.
    items: BTreeMap<u16, Vec<u8>>,
    directory_stale: bool,
    /// File names with their item, sorted by name as the directory is.
    files: BTreeMap<String, u16>,
    selector: u16,
    /// The next byte of the selected item to read.
    offset: usize,
    warned: bool,
}

impl QemuFwCfg {
    /// The fixed items of a VM with `ncpu` vCPUs and an empty directory.
    pub fn new(ncpu: u16) -> Self {
        let mut items = BTreeMap::new();
        items.insert(ITEM_SIGNATURE, b"QEMU".to_vec());
        items.insert(ITEM_ID, ID_IO_INTERFACE.to_le_bytes().to_vec());
        // bhyve has no CPU hot-plug: the maximum is the count.
        items.insert(ITEM_NB_CPUS, ncpu.to_le_bytes().to_vec());
        items.insert(ITEM_MAX_CPUS, ncpu.to_le_bytes().to_vec());
        let mut fwcfg = Self {
            items,
            files: BTreeMap::new(),
            directory_stale: true,
            selector: ITEM_SIGNATURE,
            offset: 0,
            warned: false,
        };
        fwcfg.select(ITEM_SIGNATURE);
        fwcfg
    }

    /// Take over a saved state, checked: every file names an item that
    /// exists, with a name that fits the directory.
    pub fn restore(&mut self, saved: QemuFwCfg) -> Result<(), String> {
        for (name, item) in &saved.files {
            if name.len() >= MAX_NAME || !saved.items.contains_key(item) {
                return Err(format!("fw_cfg: saved file \"{name}\" is damaged"));
            }
        }
        *self = saved;
        Ok(())
    }

    /// Publish `data` as the file `name` at the next free item.
    pub fn add_file(&mut self, name: &str, data: Vec<u8>) -> Result<(), FwCfgError> {
        if name.len() >= MAX_NAME {
            return Err(FwCfgError::NameTooLong(name.into()));
        }
        if self.files.contains_key(name) {
            return Err(FwCfgError::Duplicate(name.into()));
        }
        if u32::try_from(data.len()).is_err() {
            return Err(FwCfgError::TooLarge(name.into()));
        }
        let item = FIRST_FILE_ITEM + self.files.len() as u16;
        if item > INDEX_MASK {
            return Err(FwCfgError::Full(name.into()));
        }
        self.files.insert(name.into(), item);
        self.items.insert(item, data);
        self.directory_stale = true;
        Ok(())
    }

    /// The directory item: count, then one entry per file in name order.
    fn directory(&self) -> Vec<u8> {
        let mut dir = (self.files.len() as u32).to_be_bytes().to_vec();
        for (name, item) in &self.files {
            let size = self.items[item].len() as u32;
            dir.extend_from_slice(&size.to_be_bytes());
            dir.extend_from_slice(&item.to_be_bytes());
            dir.extend_from_slice(&[0, 0]);
            let mut field = [0u8; MAX_NAME];
            field[..name.len()].copy_from_slice(name.as_bytes());
            dir.extend_from_slice(&field);
        }
        dir
    }

    fn select(&mut self, selector: u16) {
        self.selector = selector;
        self.offset = 0;
        if selector & (INDEX_MASK | ARCH_SPECIFIC) == ITEM_FILE_DIR && self.directory_stale {
            self.items.insert(ITEM_FILE_DIR, self.directory());
            self.directory_stale = false;
        }
    }

    fn next_byte(&mut self) -> u8 {
        let key = self.selector & (INDEX_MASK | ARCH_SPECIFIC);
        let item = self.items.get(&key).map_or(&[][..], Vec::as_slice);
        let b = item.get(self.offset).copied().unwrap_or(0);
        self.offset = (self.offset + 1).min(item.len());
        b
    }

    fn refuse(&mut self, what: &str, offset: u64, len: usize) {
        if !self.warned {
            self.warned = true;
            tracing::warn!(
                "fw_cfg: {what} of {len} bytes at port {:#x} ignored (further ones are not logged)",
                0x510 + offset
            );
        }
    }
}

impl Schema for QemuFwCfg {
    const KIND: &'static str = "qemu-fwcfg";
    const VERSION: u32 = 1;
}

impl BusDevice for QemuFwCfg {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match (offset, data.len()) {
            (0, 2) => data.copy_from_slice(&self.selector.to_le_bytes()),
            (1, 1) => data[0] = self.next_byte(),
            _ => {
                self.refuse("a read", offset, data.len());
                data.fill(0xFF);
            }
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        match (offset, data.len()) {
            (0, 2) => self.select(u16::from_le_bytes([data[0], data[1]])),
            _ => self.refuse("a write", offset, data.len()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn select(f: &mut QemuFwCfg, item: u16) {
        f.write(0, &item.to_le_bytes());
    }

    fn read_bytes(f: &mut QemuFwCfg, n: usize) -> Vec<u8> {
        (0..n)
            .map(|_| {
                let mut b = [0u8];
                f.read(1, &mut b);
                b[0]
            })
            .collect()
    }

    /// The directory as a guest parses it: (name, item, size).
    fn directory(f: &mut QemuFwCfg) -> Vec<(String, u16, u32)> {
        select(f, ITEM_FILE_DIR);
        let count = u32::from_be_bytes(read_bytes(f, 4).try_into().unwrap());
        (0..count)
            .map(|_| {
                let e = read_bytes(f, 64);
                let size = u32::from_be_bytes(e[0..4].try_into().unwrap());
                let item = u16::from_be_bytes(e[4..6].try_into().unwrap());
                assert_eq!(&e[6..8], &[0, 0], "reserved bytes");
                let name = e[8..].split(|&b| b == 0).next().unwrap();
                (String::from_utf8(name.to_vec()).unwrap(), item, size)
            })
            .collect()
    }

    #[test]
    fn fixed_items_answer_as_bhyves() {
        let mut f = QemuFwCfg::new(3);
        select(&mut f, ITEM_SIGNATURE);
        assert_eq!(read_bytes(&mut f, 4), b"QEMU");
        select(&mut f, ITEM_ID);
        assert_eq!(read_bytes(&mut f, 4), [1, 0, 0, 0], "I/O, no DMA");
        select(&mut f, ITEM_NB_CPUS);
        assert_eq!(read_bytes(&mut f, 2), [3, 0]);
        select(&mut f, ITEM_MAX_CPUS);
        assert_eq!(read_bytes(&mut f, 2), [3, 0]);
        select(&mut f, ITEM_FILE_DIR);
        assert_eq!(read_bytes(&mut f, 4), [0, 0, 0, 0], "no files yet");
    }

    #[test]
    fn the_selector_reads_back_and_rewinds_the_item() {
        let mut f = QemuFwCfg::new(1);
        select(&mut f, 0x4001);
        let mut sel = [0u8; 2];
        f.read(0, &mut sel);
        assert_eq!(u16::from_le_bytes(sel), 0x4001);
        // Bit 14 (QEMU's write flag) does not change which item is read.
        assert_eq!(read_bytes(&mut f, 2), [1, 0]);
        select(&mut f, ITEM_ID);
        assert_eq!(read_bytes(&mut f, 1), [1], "a new selection starts over");
    }

    #[test]
    fn files_are_listed_by_name_and_read_through_their_item() {
        let mut f = QemuFwCfg::new(2);
        f.add_file("opt/zz", b"last".to_vec()).unwrap();
        f.add_file("etc/e820", vec![7; 40]).unwrap();
        f.add_file("opt/bhyve/hw.ncpu", 2u32.to_le_bytes().to_vec())
            .unwrap();
        let dir = directory(&mut f);
        assert_eq!(
            dir,
            vec![
                ("etc/e820".into(), 0x21, 40),
                ("opt/bhyve/hw.ncpu".into(), 0x22, 4),
                ("opt/zz".into(), 0x20, 4),
            ]
        );
        select(&mut f, 0x22);
        assert_eq!(read_bytes(&mut f, 4), [2, 0, 0, 0]);
        select(&mut f, 0x20);
        assert_eq!(read_bytes(&mut f, 6), b"last\0\0", "0 past the end");
    }

    #[test]
    fn bad_names_and_duplicates_are_refused() {
        let mut f = QemuFwCfg::new(1);
        let long = "x".repeat(MAX_NAME);
        assert_eq!(
            f.add_file(&long, vec![]),
            Err(FwCfgError::NameTooLong(long.clone()))
        );
        f.add_file(&long[1..], vec![1]).unwrap();
        assert_eq!(
            f.add_file(&long[1..], vec![2]),
            Err(FwCfgError::Duplicate(long[1..].into()))
        );
        assert_eq!(directory(&mut f).len(), 1);
    }

    #[test]
    fn the_item_space_has_an_end() {
        let mut f = QemuFwCfg::new(1);
        let room = usize::from(INDEX_MASK - FIRST_FILE_ITEM + 1);
        for i in 0..room {
            f.add_file(&format!("f{i}"), Vec::new()).unwrap();
        }
        assert!(matches!(
            f.add_file("one-more", Vec::new()),
            Err(FwCfgError::Full(_))
        ));
    }

    #[test]
    fn hostile_accesses_change_nothing() {
        let mut f = QemuFwCfg::new(4);
        f.add_file("opt/a", b"abc".to_vec()).unwrap();
        select(&mut f, 0x20);
        assert_eq!(read_bytes(&mut f, 1), b"a");
        // Wrong widths on either port, writes to the data port, ports past
        // the pair: ignored, reads all-ones.
        f.write(0, &[0x01]);
        f.write(0, &[1, 0, 0, 0]);
        f.write(1, &[0x55]);
        f.write(1, &[0, 0]);
        for (offset, len) in [(0, 1), (0, 4), (1, 2), (1, 4), (2, 1)] {
            let mut buf = vec![0u8; len];
            f.read(offset, &mut buf);
            assert!(buf.iter().all(|&b| b == 0xFF), "read {offset}/{len}");
        }
        assert_eq!(read_bytes(&mut f, 3), b"bc\0", "still item 0x20");
        // Unknown items, architecture-specific ones included, read as 0
        // for as long as the guest reads.
        for item in [0x1234, 0x8000, 0xFFFF] {
            select(&mut f, item);
            assert!(read_bytes(&mut f, 100).iter().all(|&b| b == 0));
        }
        // Reading far past an item's end does not move anything.
        select(&mut f, ITEM_SIGNATURE);
        read_bytes(&mut f, 10_000);
        select(&mut f, ITEM_SIGNATURE);
        assert_eq!(read_bytes(&mut f, 4), b"QEMU");
    }

    #[test]
    fn state_round_trips_mid_item_and_damage_is_refused() {
        let mut f = QemuFwCfg::new(2);
        f.add_file("etc/one", b"hello".to_vec()).unwrap();
        select(&mut f, FIRST_FILE_ITEM);
        assert_eq!(read_bytes(&mut f, 2), b"he");
        let text = serde_json::to_string(&f).unwrap();
        let mut g = QemuFwCfg::new(2);
        g.restore(serde_json::from_str(&text).unwrap()).unwrap();
        assert_eq!(
            read_bytes(&mut g, 3),
            b"llo",
            "the guest reads on where it was"
        );
        assert_eq!(
            directory(&mut g),
            [("etc/one".to_string(), FIRST_FILE_ITEM, 5)]
        );
        let mut bad: QemuFwCfg = serde_json::from_str(&text).unwrap();
        bad.items.remove(&FIRST_FILE_ITEM);
        assert!(g.restore(bad).is_err(), "a file without its item");
        let mut bad: QemuFwCfg = serde_json::from_str(&text).unwrap();
        bad.files.insert("x".repeat(MAX_NAME), FIRST_FILE_ITEM);
        assert!(g.restore(bad).is_err(), "a name too long for the directory");
    }
}
