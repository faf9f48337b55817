//! Where an ext2/3/4 file's blocks lie on the disk, for `save_env`.
//!
//! ext4-view reads files but does not say where their blocks are, and
//! GRUB's `save_env` writes the environment block back through exactly
//! that block list. This is the small part of ext2/3/4 needed to find it:
//! superblock, group descriptors, inodes, directory entries, extent trees
//! and classic block maps, every offset checked against the region and
//! every walk bounded. Only what is needed to overwrite a file's own
//! blocks in place is supported; inline data, encryption, `meta_bg`
//! layouts and a journal that still needs recovery are refused.

use crate::disk::Region;
use crate::error::GrubError;
use crate::fs::{components, MAX_REWRITE_SIZE};

const ROOT_INODE: u32 = 2;
const INCOMPAT_RECOVER: u32 = 0x4;
const INCOMPAT_META_BG: u32 = 0x10;
const INCOMPAT_64BIT: u32 = 0x80;
const INCOMPAT_INLINE_DATA: u32 = 0x8000;
const INCOMPAT_ENCRYPT: u32 = 0x10000;
const FLAG_EXTENTS: u32 = 0x8_0000;
const FLAG_INLINE_DATA: u32 = 0x1000_0000;
const FLAG_ENCRYPT: u32 = 0x800;
const EXTENT_MAGIC: u16 = 0xF30A;
/// Largest directory walked (grub's directories hold a few dozen names).
const MAX_DIR_BYTES: u64 = 4 << 20;
/// Deepest extent tree (ext4 itself stops at 5).
const MAX_EXTENT_DEPTH: u16 = 5;

fn bad(m: impl Into<String>) -> GrubError {
    GrubError::BadFilesystem(format!("ext2: {}", m.into()))
}

fn u16_at(b: &[u8], o: usize) -> u16 {
    u16::from_le_bytes([b[o], b[o + 1]])
}
fn u32_at(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
}

struct Inode {
    mode: u16,
    flags: u32,
    size: u64,
    block: [u8; 60],
}

/// The few superblock facts the walk needs.
pub struct ExtLayout {
    region: Region,
    block_size: u64,
    blocks: u64,
    inodes_per_group: u32,
    inode_size: u64,
    desc_size: u64,
    gdt_block: u64,
    groups: u64,
}

impl ExtLayout {
    pub fn open(region: Region) -> Result<ExtLayout, GrubError> {
        let sb = region.read_vec(1024, 1024)?;
        if u16_at(&sb, 56) != 0xEF53 {
            return Err(bad("no superblock"));
        }
        let log = u32_at(&sb, 24);
        if log > 6 {
            return Err(bad("bad block size"));
        }
        let block_size = 1024u64 << log;
        let incompat = u32_at(&sb, 96);
        for (bit, what) in [
            (INCOMPAT_RECOVER, "the journal needs recovery"),
            (INCOMPAT_META_BG, "meta_bg layout"),
            (INCOMPAT_INLINE_DATA, "inline data"),
            (INCOMPAT_ENCRYPT, "encryption"),
        ] {
            if incompat & bit != 0 {
                return Err(GrubError::Command(format!(
                    "save_env: cannot write in place on this ext2 file system ({what})"
                )));
            }
        }
        let blocks = u64::from(u32_at(&sb, 4))
            | if incompat & INCOMPAT_64BIT != 0 {
                u64::from(u32_at(&sb, 0x150)) << 32
            } else {
                0
            };
        let blocks_per_group = u64::from(u32_at(&sb, 32));
        let inodes_per_group = u32_at(&sb, 40);
        let inode_size = if u32_at(&sb, 76) >= 1 {
            u64::from(u16_at(&sb, 88))
        } else {
            128
        };
        let desc_size = if incompat & INCOMPAT_64BIT != 0 {
            u64::from(u16_at(&sb, 0xFE))
        } else {
            32
        };
        if blocks_per_group == 0
            || inodes_per_group == 0
            || !(128..=block_size).contains(&inode_size)
            || !(32..=1024).contains(&desc_size)
        {
            return Err(bad("bad geometry"));
        }
        let first_data_block = u64::from(u32_at(&sb, 20));
        Ok(ExtLayout {
            region,
            block_size,
            blocks,
            inodes_per_group,
            inode_size,
            desc_size,
            gdt_block: first_data_block + 1,
            groups: blocks.div_ceil(blocks_per_group),
        })
    }

    fn block_offset(&self, block: u64) -> Result<u64, GrubError> {
        if block == 0 || block >= self.blocks {
            return Err(bad(format!("block {block} out of range")));
        }
        block
            .checked_mul(self.block_size)
            .filter(|o| o.saturating_add(self.block_size) <= self.region.len())
            .ok_or_else(|| bad(format!("block {block} past the end of the device")))
    }

    fn read_block(&self, block: u64) -> Result<Vec<u8>, GrubError> {
        self.region
            .read_vec(self.block_offset(block)?, self.block_size as usize)
    }

    fn inode(&self, ino: u32) -> Result<Inode, GrubError> {
        let group = u64::from((ino.wrapping_sub(1)) / self.inodes_per_group);
        let index = u64::from((ino.wrapping_sub(1)) % self.inodes_per_group);
        if ino == 0 || group >= self.groups {
            return Err(bad(format!("inode {ino} out of range")));
        }
        let desc_at = self.gdt_block * self.block_size + group * self.desc_size;
        let desc = self.region.read_vec(desc_at, self.desc_size as usize)?;
        let mut table = u64::from(u32_at(&desc, 8));
        if self.desc_size >= 64 {
            table |= u64::from(u32_at(&desc, 0x28)) << 32;
        }
        let at = self
            .block_offset(table)?
            .checked_add(index * self.inode_size)
            .ok_or_else(|| bad("inode table out of range"))?;
        let raw = self.region.read_vec(at, 128)?;
        let mut block = [0u8; 60];
        block.copy_from_slice(&raw[40..100]);
        Ok(Inode {
            mode: u16_at(&raw, 0),
            flags: u32_at(&raw, 32),
            size: u64::from(u32_at(&raw, 4)) | u64::from(u32_at(&raw, 108)) << 32,
            block,
        })
    }

    /// The disk block holding file block `n` of `inode`; `None` for a hole.
    fn map(&self, inode: &Inode, n: u64) -> Result<Option<u64>, GrubError> {
        if inode.flags & FLAG_EXTENTS != 0 {
            return self.map_extent(&inode.block, n, MAX_EXTENT_DEPTH);
        }
        // Classic map: 12 direct blocks, then single, double and triple
        // indirect blocks of `per` pointers each.
        let per = self.block_size / 4;
        let ptr = |b: &[u8], i: u64| u64::from(u32_at(b, i as usize * 4));
        if n < 12 {
            return Ok(Some(ptr(&inode.block, n)).filter(|&b| b != 0));
        }
        let mut rest = n - 12;
        let mut span = 1u64;
        for level in 0..3u64 {
            span = span.saturating_mul(per);
            if rest < span {
                let mut block = ptr(&inode.block, 12 + level);
                let mut span = span;
                for _ in 0..=level {
                    if block == 0 {
                        return Ok(None);
                    }
                    span /= per;
                    let b = self.read_block(block)?;
                    block = ptr(&b, rest / span);
                    rest %= span;
                }
                return Ok(Some(block).filter(|&b| b != 0));
            }
            rest -= span;
        }
        Ok(None)
    }

    fn map_extent(&self, node: &[u8], n: u64, depth_left: u16) -> Result<Option<u64>, GrubError> {
        if node.len() < 12 || u16_at(node, 0) != EXTENT_MAGIC {
            return Err(bad("bad extent header"));
        }
        let entries = usize::from(u16_at(node, 2)).min((node.len() - 12) / 12);
        let depth = u16_at(node, 6);
        if depth > depth_left {
            return Err(bad("extent tree too deep"));
        }
        let entry = |i: usize| &node[12 + i * 12..24 + i * 12];
        if depth == 0 {
            for i in 0..entries {
                let e = entry(i);
                let first = u64::from(u32_at(e, 0));
                let len = u64::from(u16_at(e, 4));
                // Longer than 32768: an unwritten extent, which reads as zeros.
                if len > 32768 {
                    continue;
                }
                if n >= first && n < first + len {
                    let start = u64::from(u16_at(e, 6)) << 32 | u64::from(u32_at(e, 8));
                    return Ok(Some(start + (n - first)));
                }
            }
            return Ok(None);
        }
        let mut child = None;
        for i in 0..entries {
            let e = entry(i);
            if u64::from(u32_at(e, 0)) <= n {
                child = Some(u64::from(u16_at(e, 8)) << 32 | u64::from(u32_at(e, 4)));
            }
        }
        match child {
            Some(b) => self.map_extent(&self.read_block(b)?, n, depth - 1),
            None => Ok(None),
        }
    }

    /// The inode a name in directory `dir` refers to.
    fn lookup_in(&self, dir: &Inode, name: &str) -> Result<Option<u32>, GrubError> {
        if dir.mode & 0xF000 != 0x4000 {
            return Err(GrubError::NotDirectory(name.to_string()));
        }
        if dir.flags & (FLAG_INLINE_DATA | FLAG_ENCRYPT) != 0 {
            return Err(bad("inline or encrypted directory"));
        }
        let blocks = dir.size.min(MAX_DIR_BYTES).div_ceil(self.block_size);
        for n in 0..blocks {
            let Some(b) = self.map(dir, n)? else { continue };
            let data = self.read_block(b)?;
            let mut at = 0usize;
            while at + 8 <= data.len() {
                let ino = u32_at(&data, at);
                let rec_len = usize::from(u16_at(&data, at + 4));
                let name_len = usize::from(data[at + 6]);
                if rec_len < 8 || at + rec_len > data.len() {
                    break;
                }
                if ino != 0
                    && 8 + name_len <= rec_len
                    && &data[at + 8..at + 8 + name_len] == name.as_bytes()
                {
                    return Ok(Some(ino));
                }
                at += rec_len;
            }
        }
        Ok(None)
    }

    /// The disk extents (byte offset in the region, length) holding the
    /// regular file `path`, in file order; a hole is an error.
    pub fn file_extents(&self, path: &str) -> Result<Vec<(u64, u64)>, GrubError> {
        let mut inode = self.inode(ROOT_INODE)?;
        for part in components(path)? {
            let ino = self
                .lookup_in(&inode, part)?
                .ok_or_else(|| GrubError::NotFound(path.to_string()))?;
            inode = self.inode(ino)?;
        }
        if inode.mode & 0xF000 != 0x8000 {
            return Err(GrubError::Command(format!(
                "`{path}' is not a regular file"
            )));
        }
        if inode.flags & (FLAG_INLINE_DATA | FLAG_ENCRYPT) != 0 {
            return Err(GrubError::Command(format!(
                "save_env: `{path}' is stored inline or encrypted; cannot write it in place"
            )));
        }
        if inode.size > MAX_REWRITE_SIZE {
            return Err(GrubError::TooLarge(
                path.to_string(),
                inode.size,
                MAX_REWRITE_SIZE,
            ));
        }
        let mut out: Vec<(u64, u64)> = Vec::new();
        let mut left = inode.size;
        let mut n = 0;
        while left > 0 {
            let block = self
                .map(&inode, n)?
                .ok_or_else(|| GrubError::Command("sparse file not allowed".to_string()))?;
            let off = self.block_offset(block)?;
            let len = left.min(self.block_size);
            match out.last_mut() {
                Some((o, l)) if *o + *l == off => *l += len,
                _ => out.push((off, len)),
            }
            left -= len;
            n += 1;
        }
        Ok(out)
    }
}
