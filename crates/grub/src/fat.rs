//! FAT12/16/32 reader.
//!
//! Written here instead of using the `fatfs` crate: fatfs 0.3 computes
//! offsets from on-disk values with unchecked arithmetic (`cluster - 2`,
//! `fats * sectors_per_fat`, ...), which a hostile image turns into
//! overflow panics, and it follows cluster chains without a cycle check.
//! Reading FAT is small: the BPB, the first FAT (cached, capped), cluster
//! chains bounded by the cluster count, 8.3 and VFAT long names.

use crate::disk::bytes::u32le;
use crate::disk::Region;
use crate::error::GrubError;
use crate::fs::{
    components, DirEntry, Filesystem, MAX_DIR_ENTRIES, MAX_FILE_SIZE, MAX_REWRITE_SIZE,
};

/// Largest FAT we cache (a 32 GiB FAT32 volume with 4 KiB clusters has 32 MiB).
const MAX_FAT_BYTES: u64 = 64 << 20;
/// Largest directory we read.
const MAX_DIR_BYTES: u64 = 8 << 20;

#[derive(Clone, Copy, PartialEq, Debug)]
enum Kind {
    Fat12,
    Fat16,
    Fat32,
}

/// A mounted FAT volume.
pub struct FatFs {
    region: Region,
    kind: Kind,
    fat: Vec<u8>,
    cluster_bytes: u64,
    data_start: u64,
    /// Valid cluster numbers are 2..cluster_count + 2.
    cluster_count: u32,
    /// FAT12/16: the fixed root directory (offset, bytes); FAT32: none.
    fixed_root: Option<(u64, u64)>,
    root_cluster: u32,
    volume_id: u32,
    bpb_label: Option<String>,
}

/// Where a directory's bytes are.
#[derive(Clone, Copy)]
enum DirLoc {
    Fixed(u64, u64),
    Chain(u32),
}

#[derive(Clone)]
struct Node {
    name: String,
    is_dir: bool,
    cluster: u32,
    size: u64,
}

fn bad(m: impl Into<String>) -> GrubError {
    GrubError::BadFilesystem(format!("fat: {}", m.into()))
}

fn u16le(b: &[u8], o: usize) -> u16 {
    u16::from_le_bytes([b[o], b[o + 1]])
}

fn label_text(raw: &[u8]) -> Option<String> {
    let s = String::from_utf8_lossy(raw).trim_end().to_string();
    (!s.is_empty() && s != "NO NAME").then_some(s)
}

impl FatFs {
    pub fn open(region: Region) -> Result<FatFs, GrubError> {
        let b = region.read_vec(0, 512)?;
        if b[510] != 0x55 || b[511] != 0xAA {
            return Err(bad("no boot signature"));
        }
        let bps = u16le(&b, 11) as u64;
        let spc = b[13] as u64;
        let reserved = u16le(&b, 14) as u64;
        let fats = b[16] as u64;
        let root_entries = u16le(&b, 17) as u64;
        let total16 = u16le(&b, 19) as u64;
        let spf16 = u16le(&b, 22) as u64;
        let total32 = u32le(&b, 32) as u64;
        if !matches!(bps, 512 | 1024 | 2048 | 4096) || !spc.is_power_of_two() || spc > 128 {
            return Err(bad("bad sector or cluster size"));
        }
        if reserved == 0 || fats == 0 {
            return Err(bad("bad reserved sector or FAT count"));
        }
        let total = if total16 != 0 { total16 } else { total32 };
        let spf = if spf16 != 0 {
            spf16
        } else {
            u32le(&b, 36) as u64
        };
        if total == 0 || spf == 0 {
            return Err(bad("zero-sized volume or FAT"));
        }
        let root_dir_sectors = (root_entries * 32).div_ceil(bps);
        // Everything here is at most ~2^40, so u64 cannot overflow.
        let data_sector = reserved + fats * spf + root_dir_sectors;
        if data_sector >= total {
            return Err(bad("no room for data"));
        }
        let clusters = (total - data_sector) / spc;
        let kind = if clusters < 4085 {
            Kind::Fat12
        } else if clusters < 65525 {
            Kind::Fat16
        } else {
            Kind::Fat32
        };
        if kind == Kind::Fat32 && root_entries != 0 || kind != Kind::Fat32 && root_entries == 0 {
            return Err(bad("root directory does not match the FAT type"));
        }
        let entry_bits: u64 = match kind {
            Kind::Fat12 => 12,
            Kind::Fat16 => 16,
            Kind::Fat32 => 32,
        };
        // The FAT must hold an entry for every cluster.
        let fat_bytes = spf * bps;
        if (clusters + 2) * entry_bits > fat_bytes * 8 {
            return Err(bad("FAT too small for the volume"));
        }
        let needed = ((clusters + 2) * entry_bits).div_ceil(8);
        if needed > MAX_FAT_BYTES {
            return Err(GrubError::TooLarge("FAT".into(), needed, MAX_FAT_BYTES));
        }
        let fat = region.read_vec(reserved * bps, needed as usize)?;
        let (id_at, label_at) = if kind == Kind::Fat32 {
            (67, 71)
        } else {
            (39, 43)
        };
        let root_cluster = if kind == Kind::Fat32 {
            u32le(&b, 44)
        } else {
            0
        };
        Ok(FatFs {
            kind,
            fat,
            cluster_bytes: spc * bps,
            data_start: data_sector * bps,
            cluster_count: clusters.min(0x0FFF_FFF0) as u32,
            fixed_root: (kind != Kind::Fat32)
                .then(|| ((reserved + fats * spf) * bps, root_dir_sectors * bps)),
            root_cluster,
            volume_id: u32le(&b, id_at),
            bpb_label: label_text(&b[label_at..label_at + 11]),
            region,
        })
    }

    fn valid(&self, c: u32) -> bool {
        c >= 2 && c - 2 < self.cluster_count
    }

    fn next(&self, c: u32) -> Option<u32> {
        let c = c as usize;
        let v = match self.kind {
            Kind::Fat12 => {
                let o = c + c / 2;
                let w = u16le(&self.fat, o) as u32;
                if c % 2 == 1 {
                    w >> 4
                } else {
                    w & 0xFFF
                }
            }
            Kind::Fat16 => u16le(&self.fat, c * 2) as u32,
            Kind::Fat32 => u32le(&self.fat, c * 4) & 0x0FFF_FFFF,
        };
        self.valid(v).then_some(v)
    }

    /// The clusters of a chain; an error for a loop or a bad link.
    fn chain(&self, start: u32, max_bytes: u64) -> Result<Vec<u32>, GrubError> {
        let mut out = Vec::new();
        if !self.valid(start) {
            return Ok(out);
        }
        let mut c = start;
        loop {
            out.push(c);
            if out.len() as u64 > self.cluster_count as u64 {
                return Err(bad("cluster chain loops"));
            }
            if out.len() as u64 * self.cluster_bytes >= max_bytes {
                break;
            }
            match self.next(c) {
                Some(n) => c = n,
                None => break,
            }
        }
        Ok(out)
    }

    fn read_chain(&self, start: u32, len: u64) -> Result<Vec<u8>, GrubError> {
        let clusters = self.chain(start, len)?;
        let mut out =
            Vec::with_capacity(len.min(clusters.len() as u64 * self.cluster_bytes) as usize);
        for c in clusters {
            if out.len() as u64 >= len {
                break;
            }
            let take = (len - out.len() as u64).min(self.cluster_bytes);
            let off = self.data_start + (c as u64 - 2) * self.cluster_bytes;
            out.extend_from_slice(&self.region.read_vec(off, take as usize)?);
        }
        Ok(out)
    }

    fn dir_bytes(&self, loc: DirLoc) -> Result<Vec<u8>, GrubError> {
        match loc {
            DirLoc::Fixed(off, len) => self.region.read_vec(off, len.min(MAX_DIR_BYTES) as usize),
            DirLoc::Chain(c) => self.read_chain(c, MAX_DIR_BYTES),
        }
    }

    fn root(&self) -> DirLoc {
        match self.fixed_root {
            Some((off, len)) => DirLoc::Fixed(off, len),
            None => DirLoc::Chain(self.root_cluster),
        }
    }

    /// Entries of a directory (`.`/`..` and deleted ones left out), and
    /// its volume-label entry if any.
    fn entries(&self, loc: DirLoc) -> Result<(Vec<Node>, Option<String>), GrubError> {
        let data = self.dir_bytes(loc)?;
        let mut out = Vec::new();
        let mut label = None;
        let mut lfn: Vec<(u8, [u16; 13])> = Vec::new();
        let mut lfn_sum: Option<u8> = None;
        for e in data.chunks_exact(32) {
            if e[0] == 0 {
                break;
            }
            if e[0] == 0xE5 {
                lfn.clear();
                continue;
            }
            let attr = e[11];
            if attr & 0x3F == 0x0F {
                if e[0] & 0x40 != 0 {
                    lfn.clear();
                    lfn_sum = Some(e[13]);
                }
                let mut units = [0u16; 13];
                let spots = [1, 3, 5, 7, 9, 14, 16, 18, 20, 22, 24, 28, 30];
                for (k, &o) in spots.iter().enumerate() {
                    units[k] = u16le(e, o);
                }
                lfn.push((e[0] & 0x1F, units));
                continue;
            }
            if attr & 0x08 != 0 {
                if label.is_none() {
                    label = label_text(&e[0..11]);
                }
                lfn.clear();
                continue;
            }
            let short = &e[0..11];
            let sum = short.iter().fold(0u8, |s, &c| {
                ((s & 1) << 7).wrapping_add(s >> 1).wrapping_add(c)
            });
            let long = if !lfn.is_empty() && lfn_sum == Some(sum) {
                let mut parts = std::mem::take(&mut lfn);
                parts.sort_by_key(|p| p.0);
                let units: Vec<u16> = parts
                    .iter()
                    .flat_map(|p| p.1)
                    .take_while(|&u| u != 0 && u != 0xFFFF)
                    .collect();
                Some(String::from_utf16_lossy(&units))
            } else {
                None
            };
            lfn.clear();
            let name = long.unwrap_or_else(|| short_name(short, e[12]));
            if name == "." || name == ".." || name.is_empty() {
                continue;
            }
            let hi = if self.kind == Kind::Fat32 {
                (u16le(e, 20) as u32) << 16
            } else {
                0
            };
            out.push(Node {
                name,
                is_dir: attr & 0x10 != 0,
                cluster: hi | u16le(e, 26) as u32,
                size: u32le(e, 28) as u64,
            });
            if out.len() >= MAX_DIR_ENTRIES {
                break;
            }
        }
        Ok((out, label))
    }

    /// `None` is the root directory.
    fn lookup(&self, path: &str) -> Result<Option<Node>, GrubError> {
        let mut loc = self.root();
        let mut found = None;
        for c in components(path)? {
            if matches!(&found, Some(Node { is_dir: false, .. })) {
                return Err(GrubError::NotDirectory(path.to_string()));
            }
            let (entries, _) = self.entries(loc)?;
            let node = entries
                .into_iter()
                .find(|n| n.name.eq_ignore_ascii_case(c))
                .ok_or_else(|| GrubError::NotFound(path.to_string()))?;
            loc = if node.cluster == 0 {
                self.root()
            } else {
                DirLoc::Chain(node.cluster)
            };
            found = Some(node);
        }
        Ok(found)
    }
}

/// An 8.3 name, with the lower-case flags Windows NT and Linux set.
fn short_name(raw: &[u8], flags: u8) -> String {
    let mut base: String = String::from_utf8_lossy(&raw[0..8]).trim_end().to_string();
    let mut ext: String = String::from_utf8_lossy(&raw[8..11]).trim_end().to_string();
    if raw[0] == 0x05 {
        base.replace_range(0..1, "\u{e5}");
    }
    if flags & 0x08 != 0 {
        base = base.to_ascii_lowercase();
    }
    if flags & 0x10 != 0 {
        ext = ext.to_ascii_lowercase();
    }
    if ext.is_empty() {
        base
    } else {
        format!("{base}.{ext}")
    }
}

impl Filesystem for FatFs {
    fn kind(&self) -> &'static str {
        "fat"
    }

    fn ls(&self, dir: &str) -> Result<Vec<DirEntry>, GrubError> {
        let loc = match self.lookup(dir)? {
            None => self.root(),
            Some(n) if !n.is_dir => return Err(GrubError::NotDirectory(dir.to_string())),
            Some(n) if n.cluster == 0 => self.root(),
            Some(n) => DirLoc::Chain(n.cluster),
        };
        Ok(self
            .entries(loc)?
            .0
            .into_iter()
            .map(|n| DirEntry {
                name: n.name,
                is_dir: n.is_dir,
                size: if n.is_dir { 0 } else { n.size },
            })
            .collect())
    }

    fn read(&self, path: &str) -> Result<Vec<u8>, GrubError> {
        let node = match self.lookup(path)? {
            Some(n) if !n.is_dir => n,
            _ => return Err(GrubError::IsDirectory(path.to_string())),
        };
        if node.size > MAX_FILE_SIZE {
            return Err(GrubError::TooLarge(
                path.to_string(),
                node.size,
                MAX_FILE_SIZE,
            ));
        }
        if node.size > self.cluster_count as u64 * self.cluster_bytes {
            return Err(bad(format!(
                "{path}: size {} is larger than the volume",
                node.size
            )));
        }
        let data = self.read_chain(node.cluster, node.size)?;
        if (data.len() as u64) < node.size {
            return Err(bad(format!("{path}: premature end of file")));
        }
        Ok(data)
    }

    fn file_extents(&self, path: &str) -> Result<Vec<(u64, u64)>, GrubError> {
        let node = match self.lookup(path)? {
            Some(n) if !n.is_dir => n,
            Some(_) => return Err(GrubError::IsDirectory(path.to_string())),
            None => return Err(GrubError::NotFound(path.to_string())),
        };
        if node.size > MAX_REWRITE_SIZE {
            return Err(GrubError::TooLarge(
                path.to_string(),
                node.size,
                MAX_REWRITE_SIZE,
            ));
        }
        let mut out: Vec<(u64, u64)> = Vec::new();
        let mut left = node.size;
        for c in self.chain(node.cluster, node.size)? {
            if left == 0 {
                break;
            }
            let off = self.data_start + (c as u64 - 2) * self.cluster_bytes;
            let len = left.min(self.cluster_bytes);
            match out.last_mut() {
                Some((o, l)) if *o + *l == off => *l += len,
                _ => out.push((off, len)),
            }
            left -= len;
        }
        if left > 0 {
            return Err(bad(format!("{path}: premature end of file")));
        }
        Ok(out)
    }

    fn label(&self) -> Option<String> {
        let from_root = self.entries(self.root()).ok().and_then(|(_, l)| l);
        from_root.or_else(|| self.bpb_label.clone())
    }

    fn uuid(&self) -> Option<String> {
        Some(format!(
            "{:04X}-{:04X}",
            self.volume_id >> 16,
            self.volume_id & 0xFFFF
        ))
    }

    fn is_dir(&self, path: &str) -> bool {
        match self.lookup(path) {
            Ok(None) => true,
            Ok(Some(n)) => n.is_dir,
            Err(_) => false,
        }
    }
}
