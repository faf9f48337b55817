//! ISO 9660 (ECMA-119) reader with Rock Ridge and Joliet names.
//!
//! Written here rather than taken from crates.io: the crates that exist
//! either need a mutable `Read + Seek` per open file, do not read Rock
//! Ridge `NM`/`CE`/`CL`/`RE` entries, or do not cap what a hostile image
//! can make them allocate. What GRUB needs is small: walk directory
//! extents, pick the best name, read a file's extents. Every size read
//! from the image is checked against the region and capped.
//!
//! Names: Rock Ridge (on the primary tree) when the root's `SP` entry says
//! SUSP is in use, else Joliet (UCS-2 from the supplementary descriptor),
//! else the plain 8.3 names with `;1` and a trailing dot removed and folded
//! to lower case, matched case-insensitively, as GRUB shows them.

use crate::disk::bytes::u32le;
use crate::disk::Region;
use crate::error::GrubError;
use crate::fs::{components, DirEntry, Filesystem, MAX_DIR_ENTRIES, MAX_FILE_SIZE};

const SECTOR: u64 = 2048;
/// Largest directory we read (a few thousand entries use well under this).
const MAX_DIR_BYTES: u64 = 16 << 20;
/// Most continuation areas followed for one entry's Rock Ridge data.
const MAX_CE: usize = 8;
/// Most volume descriptors scanned before giving up on a terminator.
const MAX_DESCRIPTORS: u64 = 64;

#[derive(Clone, Copy, PartialEq)]
enum Names {
    RockRidge,
    Joliet,
    Plain,
}

#[derive(Clone, Debug)]
struct Node {
    name: String,
    is_dir: bool,
    /// (byte offset, length) of each extent, in order.
    extents: Vec<(u64, u64)>,
    /// A Rock Ridge symbolic link's target (`SL`).
    symlink: Option<String>,
}

impl Node {
    fn size(&self) -> u64 {
        self.extents
            .iter()
            .map(|e| e.1)
            .fold(0u64, |a, b| a.saturating_add(b))
    }
}

/// A mounted ISO 9660 volume.
pub struct IsoFs {
    region: Region,
    root: Node,
    names: Names,
    /// Bytes to skip at the start of each System Use area (SUSP `SP`).
    susp_skip: usize,
    label: Option<String>,
    uuid: Option<String>,
}

fn trim_label(raw: &[u8]) -> Option<String> {
    let s: String = String::from_utf8_lossy(raw)
        .trim_end_matches([' ', '\0'])
        .to_string();
    (!s.is_empty()).then_some(s)
}

fn ucs2(raw: &[u8]) -> String {
    let units: Vec<u16> = raw
        .chunks_exact(2)
        .map(|c| u16::from_be_bytes([c[0], c[1]]))
        .collect();
    String::from_utf16_lossy(&units)
}

/// GRUB's ISO "UUID": the modification (else creation) date of the
/// primary descriptor, `YYYY-MM-DD-HH-MM-SS-CC`.
fn date_uuid(pvd: &[u8]) -> Option<String> {
    let pick = |o: usize| {
        let d = &pvd[o..o + 16];
        (d.iter().all(|c| c.is_ascii_digit()) && d.iter().any(|c| *c != b'0')).then_some(d)
    };
    let d = pick(830).or_else(|| pick(813))?;
    let s = |a: usize, b: usize| String::from_utf8_lossy(&d[a..b]).into_owned();
    Some(format!(
        "{}-{}-{}-{}-{}-{}-{}",
        s(0, 4),
        s(4, 6),
        s(6, 8),
        s(8, 10),
        s(10, 12),
        s(12, 14),
        s(14, 16)
    ))
}

/// One raw directory record, already bounds-checked.
struct Record<'a> {
    flags: u8,
    extent: u64,
    len: u64,
    ext_attr: u64,
    name: &'a [u8],
    system_use: &'a [u8],
}

fn records(dir: &[u8]) -> Vec<Record<'_>> {
    let mut out = Vec::new();
    let mut pos = 0usize;
    while pos < dir.len() {
        let len = dir[pos] as usize;
        if len == 0 {
            // Records never cross a sector; zero fill pads to the next one.
            pos = (pos / SECTOR as usize + 1) * SECTOR as usize;
            continue;
        }
        if len < 34 || pos + len > dir.len() {
            break;
        }
        let r = &dir[pos..pos + len];
        let name_len = r[32] as usize;
        if 33 + name_len > len {
            break;
        }
        // An even-length name is followed by one pad byte.
        let su_start = 33 + name_len + usize::from(name_len & 1 == 0);
        out.push(Record {
            flags: r[25],
            extent: u32le(r, 2) as u64,
            len: u32le(r, 10) as u64,
            ext_attr: r[1] as u64,
            name: &r[33..33 + name_len],
            system_use: if su_start <= len { &r[su_start..] } else { &[] },
        });
        pos += len;
        if out.len() > MAX_DIR_ENTRIES {
            break;
        }
    }
    out
}

/// What a Rock Ridge System Use area says about one record.
#[derive(Default)]
struct RockRidge {
    name: Option<String>,
    /// A relocated directory's stand-in (`CL`): where the real one is.
    child_link: Option<u64>,
    /// This record is the relocated directory itself (`RE`): hide it.
    relocated: bool,
    /// A symbolic link's target (`SL`).
    symlink: Option<String>,
}

impl IsoFs {
    pub fn open(region: Region) -> Result<IsoFs, GrubError> {
        let bad = |m: &str| GrubError::BadFilesystem(format!("iso9660: {m}"));
        let mut pvd: Option<Vec<u8>> = None;
        let mut joliet: Option<Vec<u8>> = None;
        for i in 16..16 + MAX_DESCRIPTORS {
            let Ok(vd) = region.read_vec(i * SECTOR, SECTOR as usize) else {
                break;
            };
            if &vd[1..6] != b"CD001" {
                break;
            }
            match vd[0] {
                1 if pvd.is_none() => pvd = Some(vd),
                2 if vd[88] == b'%' && vd[89] == b'/' && matches!(vd[90], b'@' | b'C' | b'E') => {
                    joliet.get_or_insert(vd);
                }
                255 => break,
                _ => {}
            }
        }
        let pvd = pvd.ok_or_else(|| bad("no primary volume descriptor"))?;
        let root_of = |vd: &[u8]| -> Result<Node, GrubError> {
            let r = &vd[156..190];
            let off = (u32le(r, 2) as u64 + r[1] as u64)
                .checked_mul(SECTOR)
                .ok_or_else(|| bad("root extent"))?;
            Ok(Node {
                name: String::new(),
                is_dir: true,
                extents: vec![(off, u32le(r, 10) as u64)],
                symlink: None,
            })
        };
        let mut fs = IsoFs {
            region,
            root: root_of(&pvd)?,
            names: Names::Plain,
            susp_skip: 0,
            label: trim_label(&pvd[40..72]),
            uuid: date_uuid(&pvd),
        };
        // Rock Ridge: the root's "." record starts its System Use area with SP.
        let root_dir = fs.read_extents(&fs.root, MAX_DIR_BYTES)?;
        let sp = records(&root_dir).first().and_then(|dot| {
            let su = dot.system_use;
            (su.len() >= 7 && &su[0..2] == b"SP" && su[4] == 0xBE && su[5] == 0xEF)
                .then(|| su[6] as usize)
        });
        if let Some(skip) = sp {
            fs.names = Names::RockRidge;
            fs.susp_skip = skip;
        } else if let Some(j) = joliet {
            fs.root = root_of(&j)?;
            fs.names = Names::Joliet;
            if let Some(l) = trim_label(ucs2(&j[40..72]).as_bytes()) {
                fs.label = Some(l);
            }
        }
        Ok(fs)
    }

    fn read_extents(&self, node: &Node, cap: u64) -> Result<Vec<u8>, GrubError> {
        let total = node.size();
        if total > cap {
            return Err(GrubError::TooLarge(node.name.clone(), total, cap));
        }
        if total > self.region.len() {
            return Err(GrubError::BadFilesystem(format!(
                "iso9660: `{}' claims {total} bytes, more than the volume",
                node.name
            )));
        }
        let mut out = Vec::with_capacity(total as usize);
        for &(off, len) in &node.extents {
            out.extend_from_slice(&self.region.read_vec(off, len as usize)?);
        }
        Ok(out)
    }

    fn rock_ridge(&self, su: &[u8]) -> RockRidge {
        let mut rr = RockRidge::default();
        let mut name = String::new();
        let mut area: Vec<u8> = su.get(self.susp_skip..).unwrap_or(&[]).to_vec();
        let mut continuations = 0;
        // A path component split over SL records (its CONTINUE flag).
        let mut sl_continues = false;
        loop {
            let mut next: Option<(u64, u64, u64)> = None;
            let mut pos = 0usize;
            while pos + 4 <= area.len() {
                let sig = [area[pos], area[pos + 1]];
                let len = area[pos + 2] as usize;
                if len < 4 || pos + len > area.len() {
                    break;
                }
                let e = &area[pos..pos + len];
                match &sig {
                    b"NM" if len >= 5 => {
                        let flags = e[4];
                        if flags & 0x6 == 0 {
                            name.push_str(&String::from_utf8_lossy(&e[5..]));
                        }
                    }
                    b"CE" if len >= 28 => {
                        next = Some((u32le(e, 4) as u64, u32le(e, 12) as u64, u32le(e, 20) as u64));
                    }
                    b"CL" if len >= 12 => rr.child_link = Some(u32le(e, 4) as u64),
                    b"SL" if len >= 5 => {
                        let target = rr.symlink.get_or_insert_with(String::new);
                        let mut p = 5;
                        while p + 2 <= e.len() {
                            let (cflags, clen) = (e[p], e[p + 1] as usize);
                            let body = e.get(p + 2..p + 2 + clen).unwrap_or(&[]);
                            let part = match cflags & 0x0E {
                                0x02 => ".".to_string(),
                                0x04 => "..".to_string(),
                                0x08 => String::new(),
                                _ => String::from_utf8_lossy(body).into_owned(),
                            };
                            if cflags & 0x08 != 0 {
                                target.push('/');
                            } else {
                                if !target.is_empty() && !target.ends_with('/') && !sl_continues {
                                    target.push('/');
                                }
                                target.push_str(&part);
                            }
                            sl_continues = cflags & 0x01 != 0;
                            p += 2 + clen;
                        }
                    }
                    b"RE" => rr.relocated = true,
                    b"ST" => break,
                    _ => {}
                }
                pos += len;
            }
            let Some((block, offset, len)) = next else {
                break;
            };
            continuations += 1;
            if continuations > MAX_CE || len > SECTOR {
                break;
            }
            let Some(at) = block
                .checked_mul(SECTOR)
                .and_then(|b| b.checked_add(offset))
            else {
                break;
            };
            match self.region.read_vec(at, len as usize) {
                Ok(v) => area = v,
                Err(_) => break,
            }
        }
        if !name.is_empty() {
            rr.name = Some(name);
        }
        rr
    }

    fn list(&self, dir: &Node) -> Result<Vec<Node>, GrubError> {
        if !dir.is_dir {
            return Err(GrubError::NotDirectory(dir.name.clone()));
        }
        let data = self.read_extents(dir, MAX_DIR_BYTES)?;
        let mut out: Vec<Node> = Vec::new();
        let mut continuing = false;
        for rec in records(&data) {
            if rec.name == [0] || rec.name == [1] {
                continuing = false;
                continue;
            }
            let mut is_dir = rec.flags & 0x02 != 0;
            let mut extent = rec.extent;
            let mut len = rec.len;
            let mut symlink = None;
            let name = match self.names {
                Names::RockRidge => {
                    let rr = self.rock_ridge(rec.system_use);
                    symlink = rr.symlink.clone();
                    if rr.relocated {
                        continue;
                    }
                    if let Some(cl) = rr.child_link {
                        // The real directory's "." record holds its size.
                        let dot = self.region.read_vec(cl.saturating_mul(SECTOR), 34).ok();
                        is_dir = true;
                        extent = cl;
                        len = dot.map_or(SECTOR, |d| u32le(&d, 10) as u64);
                    }
                    rr.name.unwrap_or_else(|| plain_name(rec.name))
                }
                Names::Joliet => {
                    let n = ucs2(rec.name);
                    n.split(';').next().unwrap_or("").to_string()
                }
                Names::Plain => plain_name(rec.name),
            };
            let off = match extent
                .checked_add(rec.ext_attr)
                .and_then(|e| e.checked_mul(SECTOR))
            {
                Some(o) => o,
                None => continue,
            };
            match out.last_mut() {
                Some(prev) if continuing && prev.name == name => prev.extents.push((off, len)),
                _ => out.push(Node {
                    name,
                    is_dir,
                    extents: vec![(off, len)],
                    symlink,
                }),
            }
            continuing = rec.flags & 0x80 != 0;
        }
        Ok(out)
    }

    /// The node a path names, following Rock Ridge symlinks (bounded).
    fn lookup(&self, path: &str) -> Result<Node, GrubError> {
        const MAX_SYMLINKS: u32 = 8;
        let mut links = 0;
        let mut stack: Vec<String> = components(path)?
            .into_iter()
            .rev()
            .map(str::to_string)
            .collect();
        let mut trail: Vec<Node> = Vec::new();
        let mut node = self.root.clone();
        while let Some(c) = stack.pop() {
            if c == ".." {
                if let Some(parent) = trail.pop() {
                    node = parent;
                }
                continue;
            }
            if !node.is_dir {
                return Err(GrubError::NotDirectory(path.to_string()));
            }
            let entries = self.list(&node)?;
            let exact = entries.iter().position(|n| n.name == c);
            let idx = exact.or_else(|| {
                if self.names == Names::RockRidge {
                    None
                } else {
                    entries.iter().position(|n| n.name.eq_ignore_ascii_case(&c))
                }
            });
            let child = match idx {
                Some(i) => entries[i].clone(),
                None => return Err(GrubError::NotFound(path.to_string())),
            };
            if let Some(target) = &child.symlink {
                links += 1;
                if links > MAX_SYMLINKS {
                    return Err(GrubError::BadFilesystem(format!(
                        "iso9660: {path}: too many levels of symbolic links"
                    )));
                }
                if target.starts_with('/') {
                    trail.clear();
                    node = self.root.clone();
                }
                let parts: Vec<&str> = target
                    .split('/')
                    .filter(|p| !p.is_empty() && *p != ".")
                    .collect();
                if stack.len() + parts.len() > crate::fs::MAX_PATH_COMPONENTS {
                    return Err(GrubError::BadPath(path.to_string()));
                }
                stack.extend(parts.into_iter().rev().map(str::to_string));
                continue;
            }
            trail.push(std::mem::replace(&mut node, child));
        }
        Ok(node)
    }
}

fn plain_name(raw: &[u8]) -> String {
    let s = String::from_utf8_lossy(raw);
    let s = s.split(';').next().unwrap_or("");
    let s = s.strip_suffix('.').unwrap_or(s);
    s.to_ascii_lowercase()
}

impl Filesystem for IsoFs {
    fn kind(&self) -> &'static str {
        "iso9660"
    }

    fn ls(&self, dir: &str) -> Result<Vec<DirEntry>, GrubError> {
        let node = self.lookup(dir)?;
        Ok(self
            .list(&node)?
            .into_iter()
            .map(|n| DirEntry {
                size: n.size(),
                is_dir: n.is_dir,
                name: n.name,
            })
            .collect())
    }

    fn read(&self, path: &str) -> Result<Vec<u8>, GrubError> {
        let mut node = self.lookup(path)?;
        if node.is_dir {
            return Err(GrubError::IsDirectory(path.to_string()));
        }
        node.name = path.to_string();
        self.read_extents(&node, MAX_FILE_SIZE)
    }

    fn label(&self) -> Option<String> {
        self.label.clone()
    }

    fn uuid(&self) -> Option<String> {
        self.uuid.clone()
    }

    fn is_dir(&self, path: &str) -> bool {
        self.lookup(path).is_ok_and(|n| n.is_dir)
    }
}
