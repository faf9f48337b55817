//! Block backend: a disk image file or host block device behind virtio-blk,
//! AHCI and NVMe, with bhyve's `block_if.c` options; [`BlockQueue`] moves
//! the front ends' reads, writes and flushes asynchronously.
//!
//! Options come from the device's config node (`path`, `ro`, `nocache`,
//! `direct`/`sync`, `sectorsize=logical[/physical]`, `nodelete`), exactly as
//! bhyve reads them. Like bhyve, a read-write open that the host refuses
//! falls back to read-only. I/O is positional (`pread`/`pwrite`), so several
//! workers may share one [`BlockFile`]; `nocache` (O_DIRECT) goes through an
//! aligned bounce buffer because guest buffers carry no alignment promise.
//! Discards punch holes in regular files and use BLKDISCARD on devices.

use std::alloc::{self, Layout};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::os::unix::io::{AsRawFd, RawFd};
use std::path::PathBuf;

use rhyve_config::{ConfigError, ConfigTree};

mod queue;
pub use queue::{BlockOp, BlockQueue, BlockRequest, QueueFull};

/// bhyve's DEV_BSIZE: the default logical sector size.
pub const DEFAULT_SECTOR_SIZE: u32 = 512;

#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    #[error("{node}: no \"path\" for the disk")]
    NoPath { node: String },
    #[error("{node}: invalid sector size \"{value}\"")]
    BadSectorSize { node: String, value: String },
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("could not open backing file {path}: {source}")]
    Open { path: String, source: io::Error },
    #[error("could not size {path}: {source}")]
    Size { path: String, source: io::Error },
    #[error("{path}: sector size {sector} is smaller than the device's {device}")]
    SectorTooSmall {
        path: String,
        sector: u32,
        device: u32,
    },
}

/// The block options bhyve_config(5) documents for block-backed devices.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockOptions {
    pub path: PathBuf,
    pub readonly: bool,
    /// `nocache`: O_DIRECT.
    pub nocache: bool,
    /// `sync` or `direct`: O_SYNC.
    pub sync: bool,
    /// `nodelete`: never advertise or perform discard.
    pub nodelete: bool,
    /// Explicit `sectorsize=logical[/physical]`; None keeps the backing's own.
    pub sector_size: Option<(u32, u32)>,
}

fn parse_sector_size(value: &str) -> Option<(u32, u32)> {
    let (l, p) = match value.split_once('/') {
        Some((l, p)) => (l.trim().parse().ok()?, p.trim().parse().ok()?),
        None => {
            let l: u32 = value.trim().parse().ok()?;
            (l, l)
        }
    };
    // bhyve: both powers of two, logical at least 512 and no larger than physical.
    let ok = u32::is_power_of_two(l) && u32::is_power_of_two(p) && l >= 512 && l <= p;
    ok.then_some((l, p))
}

impl BlockOptions {
    /// Read the block keys of config node `node` (e.g. `pci.0.3.0`).
    pub fn from_config(tree: &ConfigTree, node: &str) -> Result<Self, BlockError> {
        let key = |k: &str| format!("{node}.{k}");
        let path = tree.get(&key("path"))?.ok_or_else(|| BlockError::NoPath {
            node: node.to_string(),
        })?;
        let sector_size = match tree.get(&key("sectorsize"))? {
            None => None,
            Some(v) => Some(parse_sector_size(&v).ok_or(BlockError::BadSectorSize {
                node: node.to_string(),
                value: v,
            })?),
        };
        Ok(Self {
            path: PathBuf::from(path),
            readonly: tree.bool_or(&key("ro"), false)?,
            nocache: tree.bool_or(&key("nocache"), false)?,
            sync: tree.bool_or(&key("sync"), false)? || tree.bool_or(&key("direct"), false)?,
            nodelete: tree.bool_or(&key("nodelete"), false)?,
            sector_size,
        })
    }
}

/// An open disk.
#[derive(Debug)]
pub struct BlockFile {
    file: File,
    size: u64,
    readonly: bool,
    direct: bool,
    block_device: bool,
    can_delete: bool,
    sector_size: u32,
    physical_sector_size: u32,
}

// Linux ioctls on block devices (linux/fs.h).
const BLKSSZGET: libc::c_ulong = 0x1268;
const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;
const BLKDISCARD: libc::c_ulong = 0x1277;
const BLKZEROOUT: libc::c_ulong = 0x127f;
const BLKPBSZGET: libc::c_ulong = 0x127b;

/// Alignment used for O_DIRECT bounce buffers: covers 4K-sector disks.
const DIRECT_ALIGN: usize = 4096;

fn open_file(opts: &BlockOptions, readonly: bool) -> io::Result<File> {
    let mut flags = 0;
    if opts.nocache {
        flags |= libc::O_DIRECT;
    }
    if opts.sync {
        flags |= libc::O_SYNC;
    }
    OpenOptions::new()
        .read(true)
        .write(!readonly)
        .custom_flags(flags)
        .open(&opts.path)
}

impl BlockFile {
    pub fn open(opts: &BlockOptions) -> Result<Self, BlockError> {
        let path = opts.path.display().to_string();
        let mut readonly = opts.readonly;
        let file = match open_file(opts, readonly) {
            Ok(f) => f,
            // bhyve retries any failed read-write open as read-only (a
            // running executable's ETXTBSY as much as EROFS or EACCES).
            Err(e) if !readonly => {
                readonly = true;
                tracing::warn!("{path}: cannot open read-write ({e}), using it read-only");
                open_file(opts, true).map_err(|source| BlockError::Open {
                    path: path.clone(),
                    source,
                })?
            }
            Err(source) => return Err(BlockError::Open { path, source }),
        };
        let meta = file.metadata().map_err(|source| BlockError::Size {
            path: path.clone(),
            source,
        })?;
        let block_device = meta.file_type().is_block_device();
        let (size, dev_sector, dev_physical) = if block_device {
            let fd = file.as_raw_fd();
            let mut size: u64 = 0;
            let mut ssz: libc::c_int = 0;
            let mut pssz: libc::c_uint = 0;
            // SAFETY: each ioctl writes one integer of the type given into a
            // local we own; fd is a valid open block device.
            let ok = unsafe {
                libc::ioctl(fd, BLKGETSIZE64, &mut size) == 0
                    && libc::ioctl(fd, BLKSSZGET, &mut ssz) == 0
                    && libc::ioctl(fd, BLKPBSZGET, &mut pssz) == 0
            };
            if !ok {
                return Err(BlockError::Size {
                    path,
                    source: io::Error::last_os_error(),
                });
            }
            let ssz = (ssz as u32).max(DEFAULT_SECTOR_SIZE);
            (size, ssz, pssz.max(ssz))
        } else {
            let blksize =
                (std::os::unix::fs::MetadataExt::blksize(&meta) as u32).max(DEFAULT_SECTOR_SIZE);
            (meta.len(), DEFAULT_SECTOR_SIZE, blksize)
        };
        let (sector_size, physical_sector_size) = match opts.sector_size {
            Some((l, p)) => {
                if block_device && l < dev_sector {
                    return Err(BlockError::SectorTooSmall {
                        path,
                        sector: l,
                        device: dev_sector,
                    });
                }
                (l, p)
            }
            None => (dev_sector, dev_physical),
        };
        Ok(Self {
            file,
            size,
            readonly,
            direct: opts.nocache,
            block_device,
            can_delete: !opts.nodelete && !readonly,
            sector_size,
            physical_sector_size,
        })
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }
    /// Opened with O_DIRECT (`nocache`): buffers must be aligned.
    pub fn direct(&self) -> bool {
        self.direct
    }
    pub fn readonly(&self) -> bool {
        self.readonly
    }
    /// True when discard / write-zeroes-with-unmap may be offered.
    pub fn can_delete(&self) -> bool {
        self.can_delete
    }
    pub fn sector_size(&self) -> u32 {
        self.sector_size
    }
    pub fn physical_sector_size(&self) -> u32 {
        self.physical_sector_size
    }

    pub(crate) fn check_range(&self, offset: u64, len: usize) -> io::Result<()> {
        match offset.checked_add(len as u64) {
            Some(end) if end <= self.size => Ok(()),
            _ => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "request beyond the end of the disk",
            )),
        }
    }

    /// Read exactly `buf.len()` bytes at `offset`.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.check_range(offset, buf.len())?;
        if self.direct {
            let mut bounce = AlignedBuf::new(buf.len())?;
            self.file.read_exact_at(bounce.as_mut_slice(), offset)?;
            buf.copy_from_slice(&bounce.as_mut_slice()[..buf.len()]);
            Ok(())
        } else {
            self.file.read_exact_at(buf, offset)
        }
    }

    /// Write all of `buf` at `offset`.
    pub fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        if self.readonly {
            return Err(io::Error::from_raw_os_error(libc::EROFS));
        }
        self.check_range(offset, buf.len())?;
        if self.direct {
            let mut bounce = AlignedBuf::new(buf.len())?;
            bounce.as_mut_slice()[..buf.len()].copy_from_slice(buf);
            self.file
                .write_all_at(&bounce.as_mut_slice()[..buf.len()], offset)
        } else {
            self.file.write_all_at(buf, offset)
        }
    }

    /// Make every completed write durable on the host's disk.
    pub fn flush(&self) -> io::Result<()> {
        if self.readonly {
            return Ok(());
        }
        self.file.sync_data()
    }

    /// Drop the data in a range (TRIM): afterwards it reads as zeroes.
    pub fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        if !self.can_delete {
            return Err(io::Error::from_raw_os_error(libc::EOPNOTSUPP));
        }
        self.check_range(offset, len as usize)?;
        if self.block_device {
            self.range_ioctl(BLKDISCARD, offset, len)
        } else {
            self.fallocate(
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                offset,
                len,
            )
        }
    }

    /// Make a range read as zeroes; with `unmap` the space may be released.
    pub fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> io::Result<()> {
        if self.readonly {
            return Err(io::Error::from_raw_os_error(libc::EROFS));
        }
        self.check_range(offset, len as usize)?;
        if self.block_device {
            return self.range_ioctl(BLKZEROOUT, offset, len);
        }
        if unmap && self.can_delete {
            return self.fallocate(
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                offset,
                len,
            );
        }
        match self.fallocate(
            libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
            offset,
            len,
        ) {
            Ok(()) => Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => {
                self.write_zero_bytes(offset, len)
            }
            Err(e) => Err(e),
        }
    }

    fn write_zero_bytes(&self, mut offset: u64, mut len: u64) -> io::Result<()> {
        let zeroes = vec![0u8; 1 << 20];
        while len > 0 {
            let n = len.min(zeroes.len() as u64) as usize;
            self.write_at(&zeroes[..n], offset)?;
            offset += n as u64;
            len -= n as u64;
        }
        Ok(())
    }

    fn fallocate(&self, mode: libc::c_int, offset: u64, len: u64) -> io::Result<()> {
        // SAFETY: fallocate on our own fd with plain integer arguments.
        let r = unsafe {
            libc::fallocate(
                self.file.as_raw_fd(),
                mode,
                offset as libc::off_t,
                len as libc::off_t,
            )
        };
        if r == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }

    fn range_ioctl(&self, op: libc::c_ulong, offset: u64, len: u64) -> io::Result<()> {
        let range: [u64; 2] = [offset, len];
        // SAFETY: the ioctl reads two u64s from `range`, which lives across the call.
        let r = unsafe { libc::ioctl(self.file.as_raw_fd(), op, range.as_ptr()) };
        if r == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }
}

impl AsRawFd for BlockFile {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

/// A heap buffer aligned for O_DIRECT, its length rounded up to the alignment.
struct AlignedBuf {
    ptr: *mut u8,
    layout: Layout,
}

impl AlignedBuf {
    fn new(len: usize) -> io::Result<Self> {
        let size = len.max(1).div_ceil(DIRECT_ALIGN) * DIRECT_ALIGN;
        let layout = Layout::from_size_align(size, DIRECT_ALIGN)
            .map_err(|_| io::Error::from_raw_os_error(libc::ENOMEM))?;
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { alloc::alloc_zeroed(layout) };
        if ptr.is_null() {
            return Err(io::Error::from_raw_os_error(libc::ENOMEM));
        }
        Ok(Self { ptr, layout })
    }

    fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: ptr points to layout.size() initialised bytes we own.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.layout.size()) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this very layout.
        unsafe { alloc::dealloc(self.ptr, self.layout) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tree(node: &str, kv: &[(&str, &str)]) -> ConfigTree {
        let mut t = ConfigTree::new();
        for (k, v) in kv {
            t.set(&format!("{node}.{k}"), *v).unwrap();
        }
        t
    }

    #[test]
    fn options_from_tree() {
        let t = tree(
            "pci.0.3.0",
            &[
                ("device", "virtio-blk"),
                ("path", "/x.img"),
                ("ro", "true"),
                ("direct", "true"),
                ("sectorsize", "512/4096"),
            ],
        );
        let o = BlockOptions::from_config(&t, "pci.0.3.0").unwrap();
        assert_eq!(o.path, PathBuf::from("/x.img"));
        assert!(o.readonly && o.sync && !o.nocache && !o.nodelete);
        assert_eq!(o.sector_size, Some((512, 4096)));
        for bad in ["300", "4096/512", "x", "256"] {
            let t = tree("n", &[("path", "/x"), ("sectorsize", bad)]);
            assert!(BlockOptions::from_config(&t, "n").is_err(), "{bad}");
        }
        assert!(BlockOptions::from_config(&tree("n", &[]), "n").is_err());
    }

    #[test]
    fn io_discard_and_bounds() {
        let dir = std::env::temp_dir().join(format!("rhyve-blk-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("d.img");
        std::fs::write(&path, vec![0xAAu8; 1 << 20]).unwrap();
        let t = tree("n", &[("path", path.to_str().unwrap())]);
        let f = BlockFile::open(&BlockOptions::from_config(&t, "n").unwrap()).unwrap();
        assert_eq!(f.size(), 1 << 20);
        f.write_at(&[1, 2, 3, 4], 512).unwrap();
        let mut b = [0u8; 4];
        f.read_at(&mut b, 512).unwrap();
        assert_eq!(b, [1, 2, 3, 4]);
        assert!(f.read_at(&mut b, (1 << 20) - 2).is_err());
        f.flush().unwrap();
        f.discard(0, 65536).unwrap();
        let mut z = vec![1u8; 65536];
        f.read_at(&mut z, 0).unwrap();
        assert!(z.iter().all(|&x| x == 0));
        f.write_zeroes(65536, 4096, false).unwrap();
        f.read_at(&mut z[..4096], 65536).unwrap();
        assert!(z[..4096].iter().all(|&x| x == 0));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
