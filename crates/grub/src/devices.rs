//! GRUB's device namespace: `(hd0)`, `(hd0,msdos1)`, `(cd0)`, `(host)`,
//! built from the device map, with filesystems mounted on first use.
//!
//! `(host)` (grub-emu's view of the host's files) exists only when the
//! user booted from it (`-r host`): a grub.cfg on a guest disk is guest
//! data, and must not be able to read host files (`initrd (host)/etc/...`)
//! into the VM. grub2-bhyve gets the same effect by dropping to `nobody`.

use crate::disk::{find_partition, partitions, DeviceMapEntry, Partition, Region};
use crate::error::GrubError;
use crate::fs::{probe, Filesystem, HostFs};
use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;

struct DiskEntry {
    name: String,
    region: Region,
    parts: Vec<Partition>,
}

/// All devices GRUB can name.
pub struct Devices {
    disks: Vec<DiskEntry>,
    host_visible: bool,
    mounts: RefCell<HashMap<String, Rc<dyn Filesystem>>>,
}

/// What `ls (dev)` says about a device.
pub struct DeviceInfo {
    pub name: String,
    pub fs_kind: Option<&'static str>,
    pub label: Option<String>,
    pub uuid: Option<String>,
    pub partition: Option<(u64, u64)>,
    pub size: u64,
}

impl Devices {
    /// Open every file of the device map; ones that cannot be opened are
    /// skipped with a message, as grub-emu does.
    pub fn open(entries: &[DeviceMapEntry], warn: &mut dyn FnMut(String)) -> Devices {
        let mut disks = Vec::new();
        for e in entries {
            match Region::open(&e.path) {
                Ok(region) => {
                    let parts = partitions(&region);
                    disks.push(DiskEntry {
                        name: e.name.clone(),
                        region,
                        parts,
                    });
                }
                Err(err) => warn(format!("skipping ({}): {err}", e.name)),
            }
        }
        Devices {
            disks,
            host_visible: true,
            mounts: RefCell::new(HashMap::new()),
        }
    }

    /// Whether `(host)` exists (see the module comment).
    pub fn set_host_visible(&mut self, visible: bool) {
        self.host_visible = visible;
    }

    /// Every device name, disks followed by their partitions, then `host`.
    pub fn names(&self) -> Vec<String> {
        let mut out = Vec::new();
        for d in &self.disks {
            out.push(d.name.clone());
            for p in &d.parts {
                out.push(format!("{},{}", d.name, p.name()));
            }
        }
        if self.host_visible {
            out.push("host".to_string());
        }
        out
    }

    fn region(&self, dev: &str) -> Result<(Region, Option<u64>), GrubError> {
        let (disk, part) = match dev.split_once(',') {
            Some((d, p)) => (d, Some(p)),
            None => (dev, None),
        };
        let d = self
            .disks
            .iter()
            .find(|d| d.name == disk)
            .ok_or_else(|| GrubError::NoDevice(dev.to_string()))?;
        match part {
            None => Ok((d.region.clone(), None)),
            Some(p) => {
                let part = find_partition(&d.parts, p)
                    .ok_or_else(|| GrubError::NoDevice(dev.to_string()))?;
                Ok((part.region.clone(), Some(part.start)))
            }
        }
    }

    /// The filesystem on a device (mounted once, then cached).
    pub fn fs(&self, dev: &str) -> Result<Rc<dyn Filesystem>, GrubError> {
        let dev = dev.trim_start_matches('(').trim_end_matches(')');
        if let Some(fs) = self.mounts.borrow().get(dev) {
            return Ok(fs.clone());
        }
        let fs: Rc<dyn Filesystem> = if dev == "host" && self.host_visible {
            Rc::new(HostFs)
        } else {
            let (region, _) = self.region(dev)?;
            Rc::from(probe(&region)?)
        };
        self.mounts.borrow_mut().insert(dev.to_string(), fs.clone());
        Ok(fs)
    }

    /// Overwrite the file `path` on `dev`, whose bytes are now `old`, with
    /// `new` of the same size, in place through the block list its file
    /// system gives: GRUB's `save_env`. As GRUB checks first, the blocks
    /// must cover the whole file (no holes), must not overlap, and must
    /// read back as `old`; only then is the disk opened for writing, and
    /// only those bytes are written.
    pub fn rewrite_in_place(
        &self,
        dev: &str,
        path: &str,
        old: &[u8],
        new: &[u8],
    ) -> Result<(), GrubError> {
        let dev = dev.trim_start_matches('(').trim_end_matches(')');
        if new.len() != old.len() {
            return Err(GrubError::Command(format!(
                "{path}: the new contents would change the file's size"
            )));
        }
        let extents = self.fs(dev)?.file_extents(path)?;
        let (region, _) = self.region(dev)?;
        let total: u64 = extents.iter().map(|(_, len)| len).sum();
        if total != old.len() as u64 {
            return Err(GrubError::Command("sparse file not allowed".to_string()));
        }
        let mut sorted = extents.clone();
        sorted.sort_unstable();
        if sorted.windows(2).any(|w| w[0].0 + w[0].1 > w[1].0) {
            return Err(GrubError::BadFilesystem(format!("{path}: malformed file")));
        }
        let mut at = 0usize;
        for &(offset, len) in &extents {
            let len = len as usize;
            if region.read_vec(offset, len)? != old[at..at + len] {
                return Err(GrubError::BadFilesystem(format!(
                    "{path}: invalid blocklist"
                )));
            }
            at += len;
        }
        // What is mounted was read before the write: mount afresh next time.
        self.mounts.borrow_mut().clear();
        let mut at = 0usize;
        for &(offset, len) in &extents {
            let len = len as usize;
            region.write_at(offset, &new[at..at + len])?;
            at += len;
        }
        Ok(())
    }

    /// Facts for `ls (dev)`.
    pub fn info(&self, dev: &str) -> Result<DeviceInfo, GrubError> {
        let dev = dev.trim_start_matches('(').trim_end_matches(')');
        let (size, partition) = if dev == "host" && self.host_visible {
            (0, None)
        } else {
            let (region, start) = self.region(dev)?;
            (region.len(), start.map(|s| (s, region.len())))
        };
        let fs = self.fs(dev).ok();
        Ok(DeviceInfo {
            name: dev.to_string(),
            fs_kind: fs.as_ref().map(|f| f.kind()),
            label: fs.as_ref().and_then(|f| f.label()),
            uuid: fs.as_ref().and_then(|f| f.uuid()),
            partition,
            size,
        })
    }
}
