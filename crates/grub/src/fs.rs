//! Read-only filesystems behind one small trait, and the probe that picks
//! the reader for a region.
//!
//! ext2/3/4 go through `ext4-view` (written for untrusted images: checksums,
//! bounded symlink following). FAT12/16/32 (`fat.rs`), ISO 9660
//! (`iso9660.rs`) and XFS (`xfs.rs`) are our own readers; each says why. The host filesystem
//! (`(host)`, grub-emu's hostfs) is std::fs.

use crate::disk::Region;
use crate::error::GrubError;

/// Largest file we read into memory (kernels and initrds fit well below).
pub const MAX_FILE_SIZE: u64 = 1 << 30;
/// Most entries one directory listing returns.
pub const MAX_DIR_ENTRIES: usize = 65536;
/// Most components in a path.
pub const MAX_PATH_COMPONENTS: usize = 128;

/// One name in a directory listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirEntry {
    pub name: String,
    pub is_dir: bool,
    pub size: u64,
}

/// A mounted, read-only filesystem.
pub trait Filesystem {
    /// GRUB's name for the type (`iso9660`, `ext2`, `fat`, `hostfs`).
    fn kind(&self) -> &'static str;
    /// The entries of a directory, `.` and `..` left out.
    fn ls(&self, dir: &str) -> Result<Vec<DirEntry>, GrubError>;
    /// A whole file, refused past [`MAX_FILE_SIZE`].
    fn read(&self, path: &str) -> Result<Vec<u8>, GrubError>;
    /// The volume label, if there is one.
    fn label(&self) -> Option<String>;
    /// The UUID as GRUB prints it for `search --fs-uuid`.
    fn uuid(&self) -> Option<String>;
    /// Whether `path` names a directory.
    fn is_dir(&self, path: &str) -> bool;
    /// Where the regular file `path`'s bytes lie in the region, in file
    /// order, as (offset, length): the block list `save_env` rewrites in
    /// place. File systems that cannot say refuse.
    fn file_extents(&self, path: &str) -> Result<Vec<(u64, u64)>, GrubError> {
        let _ = path;
        Err(GrubError::Command(format!(
            "save_env: cannot write files in place on {}",
            self.kind()
        )))
    }
}

/// Largest file `save_env` rewrites (GRUB's block is 1 KiB).
pub const MAX_REWRITE_SIZE: u64 = 1 << 20;

/// Split a path into components: empty and `.` parts dropped, `..` taken
/// lexically, at most [`MAX_PATH_COMPONENTS`].
pub fn components(path: &str) -> Result<Vec<&str>, GrubError> {
    let mut out: Vec<&str> = Vec::new();
    for part in path.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                out.pop();
            }
            p => {
                if out.len() >= MAX_PATH_COMPONENTS {
                    return Err(GrubError::BadPath(path.to_string()));
                }
                out.push(p)
            }
        }
    }
    Ok(out)
}

/// Work out which filesystem a region holds.
pub fn probe(region: &Region) -> Result<Box<dyn Filesystem>, GrubError> {
    if let Ok(iso) = crate::iso9660::IsoFs::open(region.clone()) {
        return Ok(Box::new(iso));
    }
    let mut magic = [0u8; 2];
    if region.read_at(1024 + 56, &mut magic).is_ok() && magic == [0x53, 0xEF] {
        return ExtFs::open(region.clone()).map(|f| Box::new(f) as Box<dyn Filesystem>);
    }
    if let Ok(xfs) = crate::xfs::XfsFs::open(region.clone()) {
        return Ok(Box::new(xfs));
    }
    match crate::fat::FatFs::open(region.clone()) {
        Ok(f) => Ok(Box::new(f)),
        Err(_) => Err(GrubError::UnknownFilesystem),
    }
}

fn too_large(path: &str, len: u64) -> GrubError {
    GrubError::TooLarge(path.to_string(), len, MAX_FILE_SIZE)
}

// ---------------------------------------------------------------- ext2/3/4

struct ExtReader(Region);

impl ext4_view::Ext4Read for ExtReader {
    fn read(
        &mut self,
        start_byte: u64,
        dst: &mut [u8],
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync + 'static>> {
        self.0
            .read_at(start_byte, dst)
            .map_err(|e| e.to_string().into())
    }
}

/// ext2/3/4 through ext4-view.
pub struct ExtFs {
    fs: ext4_view::Ext4,
    region: Region,
    /// Bytes of the device: a file claiming more is refused before any
    /// allocation (a hostile sparse file could otherwise cost 1 GiB).
    device_len: u64,
}

fn ext_err(path: &str, e: ext4_view::Ext4Error) -> GrubError {
    use ext4_view::Ext4Error as E;
    match e {
        E::NotFound => GrubError::NotFound(path.to_string()),
        E::NotADirectory => GrubError::NotDirectory(path.to_string()),
        E::IsADirectory => GrubError::IsDirectory(path.to_string()),
        other => GrubError::BadFilesystem(format!("{path}: {other}")),
    }
}

fn abs(path: &str) -> Result<String, GrubError> {
    Ok(format!("/{}", components(path)?.join("/")))
}

/// Refuse a superblock whose block group descriptor table cannot fit on
/// the device: ext4-view allocates one descriptor per group the superblock
/// claims before reading any, so a hostile count costs gigabytes.
fn check_ext_geometry(region: &Region) -> Result<(), GrubError> {
    let mut sb = [0u8; 1024];
    region.read_at(1024, &mut sb)?;
    let u32_at = |o: usize| u64::from(u32::from_le_bytes([sb[o], sb[o + 1], sb[o + 2], sb[o + 3]]));
    let is_64bit = u32_at(96) & 0x80 != 0;
    // ext4-view takes the high half of the block count whatever the
    // features say, so the check does too.
    let blocks = u32_at(4) | u32_at(0x150) << 32;
    let first_data_block = u32_at(20);
    let blocks_per_group = u32_at(32);
    let desc_size = if is_64bit {
        u64::from(u16::from_le_bytes([sb[0xFE], sb[0xFF]])).max(32)
    } else {
        32
    };
    let bad = |why: &str| Err(GrubError::BadFilesystem(format!("ext2: {why}")));
    if blocks_per_group == 0 {
        return bad("no blocks per group");
    }
    let groups = blocks
        .saturating_sub(first_data_block)
        .div_ceil(blocks_per_group);
    if groups.saturating_mul(desc_size) > region.len() {
        return bad(&format!(
            "{groups} block groups do not fit on a {}-byte device",
            region.len()
        ));
    }
    Ok(())
}

impl ExtFs {
    pub fn open(region: Region) -> Result<ExtFs, GrubError> {
        check_ext_geometry(&region)?;
        let device_len = region.len();
        let fs = ext4_view::Ext4::load(Box::new(ExtReader(region.clone())))
            .map_err(|e| GrubError::BadFilesystem(format!("ext2: {e}")))?;
        Ok(ExtFs {
            fs,
            region,
            device_len,
        })
    }
}

impl Filesystem for ExtFs {
    fn kind(&self) -> &'static str {
        "ext2"
    }

    fn ls(&self, dir: &str) -> Result<Vec<DirEntry>, GrubError> {
        let p = abs(dir)?;
        let rd = self.fs.read_dir(p.as_str()).map_err(|e| ext_err(dir, e))?;
        let mut out = Vec::new();
        for ent in rd {
            let ent = ent.map_err(|e| ext_err(dir, e))?;
            let name = ent.file_name().display().to_string();
            if name == "." || name == ".." {
                continue;
            }
            if out.len() >= MAX_DIR_ENTRIES {
                break;
            }
            let (is_dir, size) = match ent.metadata() {
                Ok(m) => (m.is_dir(), m.len()),
                Err(_) => (false, 0),
            };
            out.push(DirEntry { name, is_dir, size });
        }
        Ok(out)
    }

    fn read(&self, path: &str) -> Result<Vec<u8>, GrubError> {
        let p = abs(path)?;
        let meta = self.fs.metadata(p.as_str()).map_err(|e| ext_err(path, e))?;
        if meta.is_dir() {
            return Err(GrubError::IsDirectory(path.to_string()));
        }
        if meta.len() > MAX_FILE_SIZE.min(self.device_len) {
            return Err(GrubError::TooLarge(
                path.to_string(),
                meta.len(),
                MAX_FILE_SIZE.min(self.device_len),
            ));
        }
        self.fs.read(p.as_str()).map_err(|e| ext_err(path, e))
    }

    fn label(&self) -> Option<String> {
        let l = self.fs.label().to_str().ok()?.to_string();
        (!l.is_empty()).then_some(l)
    }

    fn uuid(&self) -> Option<String> {
        Some(self.fs.uuid().to_string())
    }

    fn is_dir(&self, path: &str) -> bool {
        abs(path)
            .ok()
            .and_then(|p| self.fs.metadata(p.as_str()).ok())
            .is_some_and(|m| m.is_dir())
    }

    fn file_extents(&self, path: &str) -> Result<Vec<(u64, u64)>, GrubError> {
        crate::ext_blocks::ExtLayout::open(self.region.clone())?.file_extents(path)
    }
}

// ---------------------------------------------------------------- host

/// grub-emu's `(host)`: the host's own files, as `-r host` boots from.
pub struct HostFs;

impl Filesystem for HostFs {
    fn kind(&self) -> &'static str {
        "hostfs"
    }

    fn ls(&self, dir: &str) -> Result<Vec<DirEntry>, GrubError> {
        let p = abs(dir)?;
        let rd = std::fs::read_dir(&p).map_err(|e| GrubError::io(p.clone(), e))?;
        let mut out = Vec::new();
        for ent in rd.take(MAX_DIR_ENTRIES) {
            let ent = ent.map_err(|e| GrubError::io(p.clone(), e))?;
            let meta = std::fs::metadata(ent.path()).ok();
            out.push(DirEntry {
                name: ent.file_name().to_string_lossy().into_owned(),
                is_dir: meta.as_ref().is_some_and(|m| m.is_dir()),
                size: meta.map_or(0, |m| m.len()),
            });
        }
        Ok(out)
    }

    fn read(&self, path: &str) -> Result<Vec<u8>, GrubError> {
        let p = abs(path)?;
        let meta = std::fs::metadata(&p).map_err(|_| GrubError::NotFound(path.to_string()))?;
        if meta.is_dir() {
            return Err(GrubError::IsDirectory(path.to_string()));
        }
        if meta.len() > MAX_FILE_SIZE {
            return Err(too_large(path, meta.len()));
        }
        Ok(rhyve_config::file::read_limited(
            std::path::Path::new(&p),
            MAX_FILE_SIZE,
        )?)
    }

    fn label(&self) -> Option<String> {
        None
    }

    fn uuid(&self) -> Option<String> {
        None
    }

    fn is_dir(&self, path: &str) -> bool {
        abs(path).is_ok_and(|p| std::path::Path::new(&p).is_dir())
    }

    fn file_extents(&self, _path: &str) -> Result<Vec<(u64, u64)>, GrubError> {
        // GRUB's save_env: "disk device required".
        Err(GrubError::Command(
            "save_env: (host) is not a disk; disk device required".to_string(),
        ))
    }
}
