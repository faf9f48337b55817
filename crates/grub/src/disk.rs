//! Disks from the device map, and their MBR/GPT partitions.
//!
//! A [`Disk`] is a host file opened read-only; a [`Region`] is a byte
//! window of one (the whole disk or a partition) that every read is
//! bounds-checked against, so a hostile partition table or filesystem can
//! never make us read outside it. Partition names follow GRUB:
//! `hd0,msdos1` (primary 1-4, logical from 5), `hd0,gpt2`, and the bare
//! number `hd0,1` meaning whichever table the disk has.

use crate::error::GrubError;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Most entries we accept in one GPT (the spec's usual 128, with room).
const MAX_GPT_ENTRIES: u32 = 1024;
/// Most logical partitions followed in an extended partition chain.
const MAX_LOGICAL: usize = 128;

/// One line of a device map: GRUB's drive name and the host file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceMapEntry {
    pub name: String,
    pub path: PathBuf,
}

/// Parse a device map the way grub-emu does: `(name) path` per line,
/// `#` comments and blank lines skipped, relative paths resolved against
/// `cwd`.
pub fn parse_device_map(text: &str, cwd: &Path) -> Result<Vec<DeviceMapEntry>, String> {
    let mut out = Vec::new();
    for (n, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let lineno = n + 1;
        let rest = line
            .strip_prefix('(')
            .ok_or_else(|| format!("line {lineno}: no open parenthesis found"))?;
        let (name, path) = rest
            .split_once(')')
            .ok_or_else(|| format!("line {lineno}: no close parenthesis found"))?;
        if name.is_empty() || name.contains(|c: char| c == ',' || c == '(' || c.is_whitespace()) {
            return Err(format!("line {lineno}: bad drive name `{name}'"));
        }
        let path = path.trim();
        if path.is_empty() {
            return Err(format!("line {lineno}: no filename found"));
        }
        let p = Path::new(path);
        let path = if p.is_absolute() {
            p.to_path_buf()
        } else {
            cwd.join(p)
        };
        out.retain(|e: &DeviceMapEntry| e.name != name);
        out.push(DeviceMapEntry {
            name: name.to_string(),
            path,
        });
    }
    Ok(out)
}

/// A byte window onto a host file, read through a read-only descriptor.
#[derive(Clone)]
pub struct Region {
    file: Arc<File>,
    /// The host file's path, for [`Region::write_at`]; `None` for files
    /// not opened by path.
    path: Option<Arc<Path>>,
    offset: u64,
    len: u64,
}

impl Region {
    /// The whole of an opened file.
    pub fn whole(file: File) -> Result<Region, std::io::Error> {
        let len = file.metadata()?.len();
        Ok(Region {
            file: Arc::new(file),
            path: None,
            offset: 0,
            len,
        })
    }

    /// Open a host file read-only as a region. Only regular files: a FIFO
    /// or a terminal named by mistake would leave grub-bhyve waiting.
    pub fn open(path: &Path) -> Result<Region, GrubError> {
        let f = rhyve_config::file::open_regular(path)?;
        let mut region =
            Region::whole(f).map_err(|e| GrubError::io(path.display().to_string(), e))?;
        region.path = Some(Arc::from(path));
        Ok(region)
    }

    /// A window inside this one; `None` when it would reach outside.
    pub fn sub(&self, offset: u64, len: u64) -> Option<Region> {
        let end = offset.checked_add(len)?;
        if end > self.len {
            return None;
        }
        Some(Region {
            file: self.file.clone(),
            path: self.path.clone(),
            offset: self.offset + offset,
            len,
        })
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Fill `buf` from `offset`; an error if any of it lies outside.
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), GrubError> {
        let inside = offset
            .checked_add(buf.len() as u64)
            .is_some_and(|end| end <= self.len);
        if !inside {
            return Err(GrubError::BadFilesystem(format!(
                "read of {} bytes at {offset} is past the end ({} bytes)",
                buf.len(),
                self.len
            )));
        }
        self.file
            .read_exact_at(buf, self.offset + offset)
            .map_err(|e| GrubError::io("disk read", e))
    }

    /// Write `data` at `offset` of this window, through a descriptor
    /// opened for writing on the same host file for just this write (the
    /// disk stays read-only otherwise). Only `save_env` writes.
    pub fn write_at(&self, offset: u64, data: &[u8]) -> Result<(), GrubError> {
        let inside = offset
            .checked_add(data.len() as u64)
            .is_some_and(|end| end <= self.len);
        if !inside {
            return Err(GrubError::Command(format!(
                "write of {} bytes at {offset} is past the end ({} bytes)",
                data.len(),
                self.len
            )));
        }
        let path = self.path.as_ref().ok_or_else(|| {
            GrubError::Command("this disk cannot be opened for writing".to_string())
        })?;
        let what = || path.display().to_string();
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(path)
            .map_err(|e| GrubError::io(format!("{} (opening for write)", what()), e))?;
        f.write_all_at(data, self.offset + offset)
            .and_then(|()| f.sync_data())
            .map_err(|e| GrubError::io(what(), e))
    }

    /// Read `len` bytes at `offset` into a new buffer.
    pub fn read_vec(&self, offset: u64, len: usize) -> Result<Vec<u8>, GrubError> {
        let mut v = vec![0u8; len];
        self.read_at(offset, &mut v)?;
        Ok(v)
    }
}

/// Which table a partition came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TableKind {
    Msdos,
    Gpt,
}

/// One partition: GRUB's 1-based number, its table and where it lies.
#[derive(Clone)]
pub struct Partition {
    pub kind: TableKind,
    pub number: u32,
    pub start: u64,
    pub region: Region,
}

impl Partition {
    /// GRUB's name for it, e.g. `msdos1` or `gpt2`.
    pub fn name(&self) -> String {
        match self.kind {
            TableKind::Msdos => format!("msdos{}", self.number),
            TableKind::Gpt => format!("gpt{}", self.number),
        }
    }
}

fn le32(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
}
fn le64(b: &[u8], o: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[o..o + 8]);
    u64::from_le_bytes(a)
}

/// The partitions of a disk: GPT when a protective MBR points at a valid
/// GPT header, else the MBR's (primary, then logical from 5). A disk
/// without a boot signature has none. Entries reaching past the disk are
/// left out.
pub fn partitions(disk: &Region) -> Vec<Partition> {
    let mut mbr = [0u8; 512];
    if disk.read_at(0, &mut mbr).is_err() || mbr[510] != 0x55 || mbr[511] != 0xAA {
        return Vec::new();
    }
    let has_protective = (0..4).any(|i| mbr[446 + i * 16 + 4] == 0xEE);
    if has_protective {
        if let Some(g) = gpt_partitions(disk) {
            return g;
        }
    }
    if looks_like_boot_sector_fs(&mbr) {
        return Vec::new();
    }
    msdos_partitions(disk, &mbr)
}

/// A FAT or NTFS boot sector also ends in 55 AA; GRUB's msdos partmap
/// refuses sectors that look like one so a superfloppy is not misread.
fn looks_like_boot_sector_fs(sector: &[u8; 512]) -> bool {
    &sector[0x36..0x3b] == b"FAT12"
        || &sector[0x36..0x3b] == b"FAT16"
        || &sector[0x52..0x57] == b"FAT32"
        || &sector[3..7] == b"NTFS"
}

fn msdos_partitions(disk: &Region, mbr: &[u8; 512]) -> Vec<Partition> {
    let mut out = Vec::new();
    let mut extended: Option<u64> = None;
    for i in 0..4 {
        let e = &mbr[446 + i * 16..446 + i * 16 + 16];
        let ptype = e[4];
        let start = le32(e, 8) as u64 * 512;
        let len = le32(e, 12) as u64 * 512;
        if ptype == 0 || len == 0 {
            continue;
        }
        if matches!(ptype, 0x05 | 0x0f | 0x85) {
            extended.get_or_insert(start);
            continue;
        }
        if let Some(region) = disk.sub(start, len) {
            out.push(Partition {
                kind: TableKind::Msdos,
                number: i as u32 + 1,
                start,
                region,
            });
        }
    }
    if let Some(ext_base) = extended {
        let mut ebr_at = ext_base;
        let mut seen = Vec::new();
        for number in 5..5 + MAX_LOGICAL as u32 {
            if seen.contains(&ebr_at) {
                break;
            }
            seen.push(ebr_at);
            let mut ebr = [0u8; 512];
            if disk.read_at(ebr_at, &mut ebr).is_err() || ebr[510] != 0x55 || ebr[511] != 0xAA {
                break;
            }
            let first = &ebr[446..462];
            let next = &ebr[462..478];
            if first[4] != 0 && le32(first, 12) != 0 {
                let start = ebr_at.saturating_add(le32(first, 8) as u64 * 512);
                let len = le32(first, 12) as u64 * 512;
                if let Some(region) = disk.sub(start, len) {
                    out.push(Partition {
                        kind: TableKind::Msdos,
                        number,
                        start,
                        region,
                    });
                }
            }
            if next[4] == 0 || le32(next, 8) == 0 {
                break;
            }
            ebr_at = ext_base.saturating_add(le32(next, 8) as u64 * 512);
        }
    }
    out
}

fn gpt_partitions(disk: &Region) -> Option<Vec<Partition>> {
    let hdr = disk.read_vec(512, 92).ok()?;
    if &hdr[0..8] != b"EFI PART" {
        return None;
    }
    let entries_lba = le64(&hdr, 72);
    let count = le32(&hdr, 80).min(MAX_GPT_ENTRIES);
    let size = le32(&hdr, 84);
    if !(128..=4096).contains(&size) {
        return None;
    }
    let mut out = Vec::new();
    for i in 0..count {
        let off = entries_lba
            .checked_mul(512)?
            .checked_add(i as u64 * size as u64)?;
        let Ok(e) = disk.read_vec(off, 128) else {
            break;
        };
        if e[0..16].iter().all(|b| *b == 0) {
            continue;
        }
        let first = le64(&e, 32);
        let last = le64(&e, 40);
        if last < first {
            continue;
        }
        let Some(start) = first.checked_mul(512) else {
            continue;
        };
        let Some(len) = (last - first + 1).checked_mul(512) else {
            continue;
        };
        if let Some(region) = disk.sub(start, len) {
            out.push(Partition {
                kind: TableKind::Gpt,
                number: i + 1,
                start,
                region,
            });
        }
    }
    Some(out)
}

/// Find a partition by GRUB's name: `msdos1`, `gpt2` or a bare number.
pub fn find_partition(parts: &[Partition], spec: &str) -> Option<Partition> {
    let (kind, num) = if let Some(n) = spec.strip_prefix("msdos") {
        (Some(TableKind::Msdos), n)
    } else if let Some(n) = spec.strip_prefix("gpt") {
        (Some(TableKind::Gpt), n)
    } else {
        (None, spec)
    };
    let number: u32 = num.parse().ok()?;
    parts
        .iter()
        .find(|p| p.number == number && kind.is_none_or(|k| k == p.kind))
        .cloned()
}

/// Little-endian helpers shared with the filesystem readers.
pub(crate) mod bytes {
    pub fn u32le(b: &[u8], o: usize) -> u32 {
        super::le32(b, o)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_map_lines() {
        let m = parse_device_map(
            "# comment\n\n(hd0) ./linux.img\n  (cd0)   /tmp/some linux.iso  \n(cd) x.iso\n",
            Path::new("/work"),
        )
        .unwrap();
        assert_eq!(m.len(), 3);
        assert_eq!(m[0].path, PathBuf::from("/work/./linux.img"));
        assert_eq!(m[1].name, "cd0");
        assert_eq!(m[1].path, PathBuf::from("/tmp/some linux.iso"));
        assert_eq!(m[2].name, "cd");
        assert!(parse_device_map("hd0 x", Path::new("/"))
            .unwrap_err()
            .contains("line 1"));
        assert!(parse_device_map("(hd0 x", Path::new("/")).is_err());
        assert!(parse_device_map("(hd0)", Path::new("/")).is_err());
    }
}
