//! Entry points shared by the cargo-fuzz targets (`fuzz/`) and the bounded
//! smoke run in the test suite. Each takes arbitrary bytes as what a guest
//! disk image or a guest's grub.cfg would hold and runs the code that reads
//! it; a panic, a hang or an allocation out of proportion to the input is a
//! bug, an error is fine.
//!
//! An image is the input bytes in a memfd, zero-extended (sparsely, so it
//! costs nothing) to the size the file system's own header claims, capped
//! at [`MAX_IMAGE`]: a seed can then leave out the zeros at its end (an XFS
//! image is mostly zeros) and still look whole to the reader.

use crate::console::ScriptedConsole;
use crate::devices::Devices;
use crate::disk::{partitions, Region};
use crate::fs::Filesystem;
use crate::interp::Interp;
use std::io::Write;
use std::os::fd::FromRawFd;

/// Largest size an image is zero-extended to.
pub const MAX_IMAGE: u64 = 64 << 20;

fn le16(d: &[u8], o: usize) -> u64 {
    d.get(o..o + 2)
        .map_or(0, |b| u64::from(u16::from_le_bytes([b[0], b[1]])))
}
fn le32(d: &[u8], o: usize) -> u64 {
    d.get(o..o + 4).map_or(0, |b| {
        u64::from(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    })
}
fn be32(d: &[u8], o: usize) -> u64 {
    d.get(o..o + 4).map_or(0, |b| {
        u64::from(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    })
}
fn be64(d: &[u8], o: usize) -> u64 {
    d.get(o..o + 8).map_or(0, |b| {
        u64::from_be_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]])
    })
}

/// The size each file system's header claims for its volume (the largest
/// of them, when the bytes look like several).
fn claimed_size(d: &[u8]) -> u64 {
    // ext2/3/4: blocks_count << (10 + log_block_size).
    let ext = le32(d, 1024 + 4).saturating_mul(1024u64 << le32(d, 1024 + 24).min(6));
    // XFS: sb_dblocks * sb_blocksize.
    let xfs = be64(d, 8).saturating_mul(be32(d, 4));
    // FAT: total sectors (16- or 32-bit field) * bytes per sector.
    let fat = le16(d, 19).max(le32(d, 32)).saturating_mul(le16(d, 11));
    // ISO 9660: volume space size (both-endian, little half) * block size.
    let iso = le32(d, 0x8000 + 80).saturating_mul(le16(d, 0x8000 + 128));
    ext.max(xfs).max(fat).max(iso).min(MAX_IMAGE)
}

/// The input as an image region (see the module comment).
pub fn image(data: &[u8]) -> Option<Region> {
    // SAFETY: memfd_create with a NUL-terminated name and no flags.
    let fd = unsafe { libc::memfd_create(c"rhyve-fuzz".as_ptr(), 0) };
    if fd < 0 {
        return None;
    }
    // SAFETY: fd is a fresh descriptor this File now owns.
    let mut file = unsafe { std::fs::File::from_raw_fd(fd) };
    file.write_all(data).ok()?;
    let len = (data.len() as u64).max(claimed_size(data));
    file.set_len(len).ok()?;
    Region::whole(file).ok()
}

/// Everything a session could ask of a file system: labels, listings a few
/// levels deep, every file found read, lookups of names that are not there.
fn exercise(fs: &dyn Filesystem) {
    let _ = fs.kind();
    let _ = fs.label();
    let _ = fs.uuid();
    let mut dirs = vec![("/".to_string(), 0)];
    let mut visited = 0;
    while let Some((dir, depth)) = dirs.pop() {
        visited += 1;
        if visited > 64 {
            break;
        }
        let Ok(entries) = fs.ls(&dir) else { continue };
        for e in entries.iter().take(32) {
            let p = format!("{}/{}", dir.trim_end_matches('/'), e.name);
            if e.is_dir {
                if depth < 4 {
                    dirs.push((p, depth + 1));
                }
            } else {
                let _ = fs.read(&p);
                let _ = fs.is_dir(&p);
                let _ = fs.file_extents(&p);
            }
        }
    }
    for p in [
        "/boot/grub/grub.cfg",
        "/boot/grub/grubenv",
        "/nonexistent",
        "/a/../b",
    ] {
        let _ = fs.read(p);
        let _ = fs.is_dir(p);
        let _ = fs.file_extents(p);
    }
}

/// MBR/GPT partition tables, then whichever file system each partition
/// (and the whole disk) holds, as `ls` and `search` would mount them.
pub fn disk(data: &[u8]) {
    let Some(region) = image(data) else { return };
    let mut regions = vec![region.clone()];
    regions.extend(partitions(&region).into_iter().map(|p| p.region));
    for r in regions.iter().take(8) {
        if let Ok(fs) = crate::fs::probe(r) {
            exercise(fs.as_ref());
        }
    }
}

/// The ISO 9660 reader (Rock Ridge, Joliet) alone.
pub fn iso9660(data: &[u8]) {
    if let Some(fs) = image(data).and_then(|r| crate::iso9660::IsoFs::open(r).ok()) {
        exercise(&fs);
    }
}

/// ext2/3/4 (ext4-view behind our adapter) alone.
pub fn ext(data: &[u8]) {
    if let Some(fs) = image(data).and_then(|r| crate::fs::ExtFs::open(r).ok()) {
        exercise(&fs);
    }
}

/// The XFS reader alone.
pub fn xfs(data: &[u8]) {
    if let Some(fs) = image(data).and_then(|r| crate::xfs::XfsFs::open(r).ok()) {
        exercise(&fs);
    }
}

/// The FAT12/16/32 reader alone.
pub fn fat(data: &[u8]) {
    if let Some(fs) = image(data).and_then(|r| crate::fat::FatFs::open(r).ok()) {
        exercise(&fs);
    }
}

/// A grub.cfg: parsed and run with no disks and no console input, then
/// every menu entry it made run as if chosen.
pub fn grub_cfg(data: &[u8]) {
    let devices = Devices::open(&[], &mut |_| {});
    let mut console = ScriptedConsole::new(b"");
    let mut interp = Interp::new(&devices, &mut console);
    interp.set_var("root", "hd0");
    let text = String::from_utf8_lossy(data);
    if interp.source_text(&text).is_err() {
        return;
    }
    let menu = std::mem::take(&mut interp.menu);
    for item in menu.iter().take(8) {
        if interp.exec_entry(item).is_err() {
            return;
        }
    }
}

/// A grubenv: its variables listed, then set, changed and deleted as
/// `save_env` would; the block must keep its size.
pub fn envblk(data: &[u8]) {
    let Some(mut block) = crate::envblk::EnvBlock::open(data.to_vec()) else {
        return;
    };
    let vars = block.vars();
    for (i, (name, value)) in vars.iter().take(8).enumerate() {
        match i % 3 {
            0 => block.delete(name),
            1 => {
                block.set(name, "");
            }
            _ => {
                block.set(name, &format!("{value}\\\n{value}"));
            }
        }
    }
    block.set("next_entry", "");
    block.set("saved_entry", "gnulinux-advanced>gnulinux-6.1.0");
    block.delete("next_entry");
    let _ = block.vars();
    assert_eq!(block.as_bytes().len(), data.len(), "the block changed size");
}
