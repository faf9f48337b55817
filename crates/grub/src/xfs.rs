//! XFS reader (v4 and v5), read-only: what GRUB needs to boot from an XFS
//! `/boot`, the default on CentOS/RHEL, which the Handbook's CentOS
//! example reaches with `-d /grub2`.
//!
//! No crate reads XFS; this follows the on-disk format as documented in
//! "XFS Algorithms & Data Structures": superblock, inodes, the data fork
//! (inline, extent list, or B+tree of extents), short-form and
//! block/leaf/node directories (listing scans the data blocks, so the
//! hash index is not needed), inline and remote symlinks. Every count and
//! offset from the image is bounds-checked and capped.

use crate::disk::Region;
use crate::error::GrubError;
use crate::fs::{
    components, DirEntry, Filesystem, MAX_DIR_ENTRIES, MAX_FILE_SIZE, MAX_REWRITE_SIZE,
};

/// Directory data lives below this byte offset (XFS_DIR2_LEAF_OFFSET).
const DIR_LEAF_OFFSET: u64 = 32 << 30;
/// Most extent records gathered for one inode.
const MAX_EXTENTS: usize = 1 << 20;
/// Deepest extent B+tree walked.
const MAX_BTREE_DEPTH: u32 = 8;
/// Largest directory read.
const MAX_DIR_BYTES: u64 = 32 << 20;
/// Most B+tree blocks read for one inode.
const MAX_BTREE_BLOCKS: u32 = 65536;
/// Most symbolic links followed in one lookup.
const MAX_SYMLINKS: u32 = 8;

fn be16(b: &[u8], o: usize) -> u16 {
    u16::from_be_bytes([b[o], b[o + 1]])
}
fn be32(b: &[u8], o: usize) -> u32 {
    u32::from_be_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
}
fn be64(b: &[u8], o: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[o..o + 8]);
    u64::from_be_bytes(a)
}

fn bad(m: impl Into<String>) -> GrubError {
    GrubError::BadFilesystem(format!("xfs: {}", m.into()))
}

/// A mounted XFS volume.
pub struct XfsFs {
    region: Region,
    block_size: u64,
    ag_blocks: u64,
    ag_count: u64,
    inode_size: u64,
    ag_blk_log: u32,
    inop_blk_log: u32,
    dir_block_size: u64,
    root_ino: u64,
    v5: bool,
    ftype: bool,
    nrext64: bool,
    label: Option<String>,
    uuid: [u8; 16],
}

/// One mapping of file blocks to disk blocks.
#[derive(Clone, Copy, Debug)]
struct Extent {
    file_block: u64,
    disk_block: u64,
    count: u64,
    unwritten: bool,
}

enum Fork {
    Local(Vec<u8>),
    Extents(Vec<Extent>),
}

struct Inode {
    mode: u16,
    size: u64,
    fork: Fork,
}

impl Inode {
    fn is_dir(&self) -> bool {
        self.mode & 0xF000 == 0x4000
    }
    fn is_symlink(&self) -> bool {
        self.mode & 0xF000 == 0xA000
    }
}

impl XfsFs {
    pub fn open(region: Region) -> Result<XfsFs, GrubError> {
        let sb = region.read_vec(0, 512)?;
        if &sb[0..4] != b"XFSB" {
            return Err(bad("no superblock"));
        }
        let block_size = be32(&sb, 4) as u64;
        let block_log = sb[120] as u32;
        let inode_size = be16(&sb, 104) as u64;
        let inode_log = sb[122] as u32;
        let inop_blk_log = sb[123] as u32;
        let ag_blk_log = sb[124] as u32;
        let dir_blk_log = sb[192] as u32;
        if !(9..=16).contains(&block_log) || block_size != 1 << block_log {
            return Err(bad("bad block size"));
        }
        if !(8..=11).contains(&inode_log) || inode_size != 1 << inode_log {
            return Err(bad("bad inode size"));
        }
        if inop_blk_log != block_log - inode_log || ag_blk_log > 31 || dir_blk_log > 8 {
            return Err(bad("inconsistent geometry"));
        }
        let ag_blocks = be32(&sb, 84) as u64;
        let ag_count = be32(&sb, 88) as u64;
        if ag_blocks == 0 || ag_blocks > 1 << ag_blk_log || ag_count == 0 {
            return Err(bad("bad allocation groups"));
        }
        let version = be16(&sb, 100) & 0xF;
        let v5 = version == 5;
        if !(4..=5).contains(&version) {
            return Err(bad(format!("unsupported version {version}")));
        }
        let incompat = if v5 { be32(&sb, 216) } else { 0 };
        let features2 = be32(&sb, 200);
        let ftype = if v5 {
            incompat & 1 != 0
        } else {
            features2 & 0x200 != 0
        };
        let label_raw: Vec<u8> = sb[108..120]
            .iter()
            .copied()
            .take_while(|b| *b != 0)
            .collect();
        let label = String::from_utf8_lossy(&label_raw).trim_end().to_string();
        let mut uuid = [0u8; 16];
        uuid.copy_from_slice(&sb[32..48]);
        Ok(XfsFs {
            region,
            block_size,
            ag_blocks,
            ag_count,
            inode_size,
            ag_blk_log,
            inop_blk_log,
            dir_block_size: block_size << dir_blk_log,
            root_ino: be64(&sb, 56),
            v5,
            ftype,
            nrext64: v5 && incompat & 32 != 0,
            label: (!label.is_empty()).then_some(label),
            uuid,
        })
    }

    /// Byte offset of a filesystem block number (AG number in the high bits).
    fn fsblock_offset(&self, fsb: u64) -> Option<u64> {
        let ag = fsb >> self.ag_blk_log;
        let agb = fsb & ((1u64 << self.ag_blk_log) - 1);
        if ag >= self.ag_count || agb >= self.ag_blocks {
            return None;
        }
        (ag * self.ag_blocks + agb).checked_mul(self.block_size)
    }

    fn read_block(&self, fsb: u64) -> Result<Vec<u8>, GrubError> {
        let off = self
            .fsblock_offset(fsb)
            .ok_or_else(|| bad("block out of range"))?;
        self.region.read_vec(off, self.block_size as usize)
    }

    fn inode(&self, ino: u64) -> Result<Inode, GrubError> {
        let ag = ino >> (self.ag_blk_log + self.inop_blk_log);
        let agb = (ino >> self.inop_blk_log) & ((1u64 << self.ag_blk_log) - 1);
        let idx = ino & ((1u64 << self.inop_blk_log) - 1);
        if ag >= self.ag_count || agb >= self.ag_blocks {
            return Err(bad(format!("inode {ino} out of range")));
        }
        let off = self
            .fsblock_offset((ag << self.ag_blk_log) | agb)
            .ok_or_else(|| bad(format!("inode {ino} out of range")))?
            + idx * self.inode_size;
        let d = self.region.read_vec(off, self.inode_size as usize)?;
        if &d[0..2] != b"IN" {
            return Err(bad(format!("inode {ino}: bad magic")));
        }
        let mode = be16(&d, 2);
        let version = d[4];
        let format = d[5];
        let size = be64(&d, 56);
        let core = if version >= 3 { 176 } else { 100 };
        let forkoff = d[82] as usize * 8;
        let fork_len = if forkoff != 0 {
            forkoff
        } else {
            self.inode_size as usize - core
        };
        if core + fork_len > d.len() {
            return Err(bad(format!("inode {ino}: fork past the inode")));
        }
        let fork = &d[core..core + fork_len];
        let flags2 = if version >= 3 { be64(&d, 120) } else { 0 };
        let nextents = if self.nrext64 && flags2 & (1 << 4) != 0 {
            be64(&d, 24)
        } else {
            be32(&d, 76) as u64
        };
        let fork = match format {
            1 => {
                let n = (size as usize).min(fork.len());
                Fork::Local(fork[..n].to_vec())
            }
            2 => {
                let n = (nextents as usize).min(fork.len() / 16);
                Fork::Extents(fork[..n * 16].chunks_exact(16).map(decode_extent).collect())
            }
            3 => {
                let mut out = Vec::new();
                self.btree_root(fork, &mut out)?;
                Fork::Extents(out)
            }
            0 => Fork::Extents(Vec::new()),
            f => return Err(bad(format!("inode {ino}: unknown fork format {f}"))),
        };
        Ok(Inode { mode, size, fork })
    }

    /// The B+tree root kept in the inode (`xfs_bmdr_block`).
    fn btree_root(&self, fork: &[u8], out: &mut Vec<Extent>) -> Result<(), GrubError> {
        if fork.len() < 4 {
            return Err(bad("short btree root"));
        }
        let level = be16(fork, 0) as u32;
        let numrecs = be16(fork, 2) as usize;
        let maxrecs = (fork.len() - 4) / 16;
        if level == 0 || level > MAX_BTREE_DEPTH || numrecs > maxrecs {
            return Err(bad("bad btree root"));
        }
        let ptrs = 4 + maxrecs * 8;
        let mut visits = 0;
        for i in 0..numrecs {
            self.btree_block(be64(fork, ptrs + i * 8), level - 1, out, &mut visits)?;
        }
        Ok(())
    }

    fn btree_block(
        &self,
        fsb: u64,
        level: u32,
        out: &mut Vec<Extent>,
        visits: &mut u32,
    ) -> Result<(), GrubError> {
        *visits += 1;
        if *visits > MAX_BTREE_BLOCKS {
            return Err(bad("extent btree too large"));
        }
        let b = self.read_block(fsb)?;
        let (magic, hdr): (&[u8], usize) = if self.v5 {
            (b"BMA3", 72)
        } else {
            (b"BMAP", 24)
        };
        if &b[0..4] != magic || be16(&b, 4) as u32 != level {
            return Err(bad("bad btree block"));
        }
        let numrecs = be16(&b, 6) as usize;
        if level == 0 {
            let maxrecs = (b.len() - hdr) / 16;
            if numrecs > maxrecs {
                return Err(bad("bad btree leaf"));
            }
            for rec in b[hdr..hdr + numrecs * 16].chunks_exact(16) {
                if out.len() >= MAX_EXTENTS {
                    return Err(bad("too many extents"));
                }
                out.push(decode_extent(rec));
            }
            return Ok(());
        }
        let maxrecs = (b.len() - hdr) / 16;
        if numrecs > maxrecs {
            return Err(bad("bad btree node"));
        }
        let ptrs = hdr + maxrecs * 8;
        for i in 0..numrecs {
            self.btree_block(be64(&b, ptrs + i * 8), level - 1, out, visits)?;
        }
        Ok(())
    }

    /// Bytes `[start, start+len)` of a file mapped by `extents`; holes
    /// and unwritten extents read as zeros.
    fn read_mapped(&self, extents: &[Extent], start: u64, len: u64) -> Result<Vec<u8>, GrubError> {
        let mut out = vec![0u8; len as usize];
        let end = start + len;
        for e in extents {
            if e.unwritten {
                continue;
            }
            let e_start = e.file_block.saturating_mul(self.block_size);
            let e_end = e_start.saturating_add(e.count.saturating_mul(self.block_size));
            let lo = e_start.max(start);
            let hi = e_end.min(end);
            if lo >= hi {
                continue;
            }
            // Map block by block: an extent may not cross an AG boundary,
            // but checking each block keeps a hostile one inside the disk.
            let mut pos = lo;
            while pos < hi {
                let blk = (pos - e_start) / self.block_size;
                let within = (pos - e_start) % self.block_size;
                let take = (self.block_size - within).min(hi - pos);
                let disk = self
                    .fsblock_offset(e.disk_block.saturating_add(blk))
                    .ok_or_else(|| bad("extent out of range"))?;
                let dst = (pos - start) as usize;
                self.region
                    .read_at(disk + within, &mut out[dst..dst + take as usize])?;
                pos += take;
            }
        }
        Ok(out)
    }

    fn read_inode_data(&self, inode: &Inode, what: &str) -> Result<Vec<u8>, GrubError> {
        match &inode.fork {
            Fork::Local(d) => Ok(d.clone()),
            Fork::Extents(ext) => {
                if inode.size > MAX_FILE_SIZE || inode.size > self.region.len() {
                    return Err(GrubError::TooLarge(
                        what.to_string(),
                        inode.size,
                        MAX_FILE_SIZE.min(self.region.len()),
                    ));
                }
                self.read_mapped(ext, 0, inode.size)
            }
        }
    }

    fn dir_entries(&self, inode: &Inode) -> Result<Vec<(String, u64)>, GrubError> {
        let mut out = Vec::new();
        match &inode.fork {
            Fork::Local(d) => self.shortform(d, &mut out)?,
            Fork::Extents(ext) => {
                let dbs = self.dir_block_size;
                let limit = inode.size.min(DIR_LEAF_OFFSET).min(MAX_DIR_BYTES);
                let mut blocks = std::collections::BTreeSet::new();
                for e in ext {
                    let start = e.file_block.saturating_mul(self.block_size);
                    if start >= limit {
                        continue;
                    }
                    let end = start
                        .saturating_add(e.count.saturating_mul(self.block_size))
                        .min(limit);
                    let mut b = start / dbs * dbs;
                    while b < end && blocks.len() < (MAX_DIR_BYTES / dbs) as usize {
                        blocks.insert(b);
                        b += dbs;
                    }
                }
                for b in blocks {
                    let data = self.read_mapped(ext, b, dbs)?;
                    self.data_block(&data, &mut out);
                    if out.len() >= MAX_DIR_ENTRIES {
                        break;
                    }
                }
            }
        }
        Ok(out)
    }

    fn shortform(&self, d: &[u8], out: &mut Vec<(String, u64)>) -> Result<(), GrubError> {
        if d.len() < 6 {
            return Err(bad("short directory"));
        }
        let count = d[0] as usize;
        let wide = d[1] != 0;
        let ino_len = if wide { 8 } else { 4 };
        let mut pos = 2 + ino_len;
        for _ in 0..count {
            let namelen =
                *d.get(pos)
                    .ok_or_else(|| bad("short-form entry past the end"))? as usize;
            let name_at = pos + 3;
            let ino_at = name_at + namelen + usize::from(self.ftype);
            if ino_at + ino_len > d.len() {
                return Err(bad("short-form entry past the end"));
            }
            let name = String::from_utf8_lossy(&d[name_at..name_at + namelen]).into_owned();
            let ino = if wide {
                be64(d, ino_at)
            } else {
                be32(d, ino_at) as u64
            };
            out.push((name, ino));
            pos = ino_at + ino_len;
        }
        Ok(())
    }

    /// Entries of one directory data block ("XD2B"/"XD2D", "XDB3"/"XDD3").
    fn data_block(&self, b: &[u8], out: &mut Vec<(String, u64)>) {
        let (hdr, is_block) = match &b[0..4] {
            b"XD2B" => (16, true),
            b"XD2D" => (16, false),
            b"XDB3" => (64, true),
            b"XDD3" => (64, false),
            _ => return,
        };
        let mut end = b.len();
        if is_block {
            // The leaf array and tail sit at the end of a single-block directory.
            let count = be32(b, b.len() - 8) as usize;
            end = match b.len().checked_sub(8 + count.saturating_mul(8)) {
                Some(e) if e >= hdr => e,
                _ => return,
            };
        }
        let mut pos = hdr;
        while pos + 8 <= end && out.len() < MAX_DIR_ENTRIES {
            if be16(b, pos) == 0xFFFF {
                let len = be16(b, pos + 2) as usize;
                if len < 8 || len & 7 != 0 {
                    return;
                }
                pos += len;
                continue;
            }
            if pos + 9 > end {
                return;
            }
            let ino = be64(b, pos);
            let namelen = b[pos + 8] as usize;
            let len = (8 + 1 + namelen + usize::from(self.ftype) + 2).div_ceil(8) * 8;
            if namelen == 0 || pos + len > end {
                return;
            }
            let name = String::from_utf8_lossy(&b[pos + 9..pos + 9 + namelen]).into_owned();
            out.push((name, ino));
            pos += len;
        }
    }

    /// The inode a path names, following symlinks (bounded).
    fn lookup(&self, path: &str) -> Result<(u64, Inode), GrubError> {
        let mut links = 0;
        let mut stack: Vec<String> = components(path)?
            .into_iter()
            .rev()
            .map(str::to_string)
            .collect();
        let mut trail: Vec<u64> = Vec::new();
        let mut ino = self.root_ino;
        let mut node = self.inode(ino)?;
        while let Some(c) = stack.pop() {
            if c == ".." {
                if let Some(parent) = trail.pop() {
                    ino = parent;
                    node = self.inode(ino)?;
                }
                continue;
            }
            if !node.is_dir() {
                return Err(GrubError::NotDirectory(path.to_string()));
            }
            let entries = self.dir_entries(&node)?;
            let (_, child) = entries
                .into_iter()
                .find(|(n, _)| *n == c)
                .ok_or_else(|| GrubError::NotFound(path.to_string()))?;
            let child_node = self.inode(child)?;
            if child_node.is_symlink() {
                links += 1;
                if links > MAX_SYMLINKS {
                    return Err(bad(format!("{path}: too many levels of symbolic links")));
                }
                let target = self.symlink_target(&child_node)?;
                if target.starts_with('/') {
                    trail.clear();
                    ino = self.root_ino;
                    node = self.inode(ino)?;
                }
                let parts: Vec<&str> = target
                    .split('/')
                    .filter(|p| !p.is_empty() && *p != ".")
                    .collect();
                if stack.len() + parts.len() > crate::fs::MAX_PATH_COMPONENTS {
                    return Err(GrubError::BadPath(path.to_string()));
                }
                for p in parts.into_iter().rev() {
                    stack.push(p.to_string());
                }
                continue;
            }
            trail.push(ino);
            ino = child;
            node = child_node;
        }
        Ok((ino, node))
    }

    fn symlink_target(&self, inode: &Inode) -> Result<String, GrubError> {
        if inode.size > 1024 {
            return Err(bad("symbolic link target too long"));
        }
        let raw = match &inode.fork {
            Fork::Local(d) => d.clone(),
            Fork::Extents(ext) => {
                // v5 remote symlink blocks start with a 56-byte "XSLM" header.
                if self.v5 {
                    let blk = self.read_mapped(ext, 0, self.block_size)?;
                    if &blk[0..4] != b"XSLM" {
                        return Err(bad("bad symlink block"));
                    }
                    let n = (inode.size as usize).min(blk.len() - 56);
                    blk[56..56 + n].to_vec()
                } else {
                    self.read_mapped(ext, 0, inode.size)?
                }
            }
        };
        Ok(String::from_utf8_lossy(&raw).into_owned())
    }
}

fn decode_extent(r: &[u8]) -> Extent {
    let l0 = be64(r, 0);
    let l1 = be64(r, 8);
    Extent {
        unwritten: l0 >> 63 != 0,
        file_block: (l0 & 0x7FFF_FFFF_FFFF_FFFF) >> 9,
        disk_block: ((l0 & 0x1FF) << 43) | (l1 >> 21),
        count: l1 & 0x1F_FFFF,
    }
}

impl Filesystem for XfsFs {
    fn kind(&self) -> &'static str {
        "xfs"
    }

    fn ls(&self, dir: &str) -> Result<Vec<DirEntry>, GrubError> {
        let (_, node) = self.lookup(dir)?;
        if !node.is_dir() {
            return Err(GrubError::NotDirectory(dir.to_string()));
        }
        let mut out = Vec::new();
        for (name, ino) in self.dir_entries(&node)? {
            if name == "." || name == ".." {
                continue;
            }
            let (is_dir, size) = match self.inode(ino) {
                Ok(i) => (i.is_dir(), i.size),
                Err(_) => (false, 0),
            };
            out.push(DirEntry { name, is_dir, size });
        }
        Ok(out)
    }

    fn read(&self, path: &str) -> Result<Vec<u8>, GrubError> {
        let (_, node) = self.lookup(path)?;
        if node.is_dir() {
            return Err(GrubError::IsDirectory(path.to_string()));
        }
        self.read_inode_data(&node, path)
    }

    fn file_extents(&self, path: &str) -> Result<Vec<(u64, u64)>, GrubError> {
        let (_, node) = self.lookup(path)?;
        if node.is_dir() {
            return Err(GrubError::IsDirectory(path.to_string()));
        }
        if node.size > MAX_REWRITE_SIZE {
            return Err(GrubError::TooLarge(
                path.to_string(),
                node.size,
                MAX_REWRITE_SIZE,
            ));
        }
        let Fork::Extents(extents) = &node.fork else {
            return Err(GrubError::Command(format!(
                "save_env: `{path}' is stored inside its inode; cannot write it in place"
            )));
        };
        let mut out: Vec<(u64, u64)> = Vec::new();
        let mut pos = 0;
        while pos < node.size {
            let block = pos / self.block_size;
            let e = extents
                .iter()
                .find(|e| !e.unwritten && block >= e.file_block && block - e.file_block < e.count)
                .ok_or_else(|| GrubError::Command("sparse file not allowed".to_string()))?;
            let off = self
                .fsblock_offset(e.disk_block.saturating_add(block - e.file_block))
                .ok_or_else(|| bad("extent out of range"))?;
            let len = (node.size - pos).min(self.block_size);
            match out.last_mut() {
                Some((o, l)) if *o + *l == off => *l += len,
                _ => out.push((off, len)),
            }
            pos += len;
        }
        Ok(out)
    }

    fn label(&self) -> Option<String> {
        self.label.clone()
    }

    fn uuid(&self) -> Option<String> {
        let h: String = self.uuid.iter().map(|b| format!("{b:02x}")).collect();
        Some(format!(
            "{}-{}-{}-{}-{}",
            &h[0..8],
            &h[8..12],
            &h[12..16],
            &h[16..20],
            &h[20..32]
        ))
    }

    fn is_dir(&self, path: &str) -> bool {
        self.lookup(path).is_ok_and(|(_, n)| n.is_dir())
    }
}
