//! Named VMs that outlive a process, as bhyve's do in the kernel
//! (`/dev/vmm/<name>`).
//!
//! KVM VMs die with their process, so a name lives on as a directory under
//! the registry root (`$RHYVE_VMM_DIR`, default `/run/rhyve/vmm`):
//!
//! - `vm.json`: memory size and, once a loader prepared it, the boot vCPU's
//!   entry registers;
//! - `boot-image`: the guest memory a loader wrote (kernel, initrd, zero
//!   page), as (address, bytes) records;
//! - `lock`: flock'ed by whichever process uses the VM (loader or bhyve),
//!   which refuses concurrent use and tells a live VM from a stale one;
//! - `pid` and `control`: the running bhyve's pid and control socket.
//!
//! The entry stays until `bhyvectl --destroy` (or bhyve -D on power-off).

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use crate::EntryRegs;
use rhyve_config::file::{open_regular, read_limited, read_limited_string, FileError};

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("invalid VM name \"{0}\"")]
    BadName(String),
    #[error("VM {0} does not exist")]
    NoSuchVm(String),
    #[error("VM {0} already exists")]
    Exists(String),
    #[error("VM {name} is in use by another process{}", pid.map(|p| format!(" (pid {p})")).unwrap_or_default())]
    Busy { name: String, pid: Option<u32> },
    #[error("VM {name}: {what}: {source}")]
    Io {
        name: String,
        what: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("VM {name}: damaged registry entry: {why}")]
    Damaged { name: String, why: String },
}

/// What the registry records about a VM.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct VmRecord {
    /// Guest memory size in bytes, once something set it up.
    pub memory_size: Option<u64>,
    /// Entry state left by a loader (grub-bhyve).
    pub entry: Option<EntryRegs>,
    /// Guest command line the loader chose, for display.
    pub cmdline: Option<String>,
    /// The RTC's NVRAM, kept across reboots as bhyve's in-kernel RTC keeps it.
    #[serde(default)]
    pub rtc_nvram: Option<Vec<u8>>,
}

/// The registry root.
#[derive(Debug, Clone)]
pub struct Registry {
    root: PathBuf,
}

/// One listed VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmListing {
    pub name: String,
    pub record: VmRecord,
    /// The pid of the bhyve running it, if one does.
    pub running: Option<u32>,
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 229
        && name != "."
        && name != ".."
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.:+".contains(c))
}

/// flock(2) without waiting.
fn try_lock(file: &File) -> io::Result<bool> {
    // SAFETY: flock on a descriptor we own.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
        return Ok(true);
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
        Ok(false)
    } else {
        Err(e)
    }
}

impl Registry {
    /// `$RHYVE_VMM_DIR`, or `/run/rhyve/vmm`.
    pub fn from_env() -> Self {
        let root = std::env::var_os("RHYVE_VMM_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("/run/rhyve/vmm"));
        Self { root }
    }

    pub fn at(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn dir(&self, name: &str) -> Result<PathBuf, RegistryError> {
        if !valid_name(name) {
            return Err(RegistryError::BadName(name.to_string()));
        }
        Ok(self.root.join(name))
    }

    pub fn exists(&self, name: &str) -> bool {
        self.dir(name)
            .map(|d| d.join("vm.json").exists())
            .unwrap_or(false)
    }

    /// Create `name` (bhyvectl --create, a loader, or bhyve for a new name)
    /// and take it. Fails if it exists.
    pub fn create(&self, name: &str) -> Result<VmHandle, RegistryError> {
        let dir = self.dir(name)?;
        let io = |what| {
            let name = name.to_string();
            move |source| RegistryError::Io { name, what, source }
        };
        fs::create_dir_all(&self.root).map_err(io("creating the registry directory"))?;
        match fs::create_dir(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                return Err(RegistryError::Exists(name.to_string()))
            }
            Err(e) => return Err(io("creating the VM directory")(e)),
        }
        let handle = VmHandle::take(name, dir)?;
        handle.save(&VmRecord::default())?;
        Ok(handle)
    }

    /// Take an existing VM for exclusive use (refused while another process uses it).
    pub fn open(&self, name: &str) -> Result<VmHandle, RegistryError> {
        let dir = self.dir(name)?;
        if !dir.join("vm.json").exists() {
            return Err(RegistryError::NoSuchVm(name.to_string()));
        }
        VmHandle::take(name, dir)
    }

    /// Take `name`, creating it if needed (what `bhyve NAME` does).
    pub fn open_or_create(&self, name: &str) -> Result<VmHandle, RegistryError> {
        match self.open(name) {
            Err(RegistryError::NoSuchVm(_)) => match self.create(name) {
                Err(RegistryError::Exists(_)) => self.open(name),
                other => other,
            },
            other => other,
        }
    }

    /// The pid of the process using `name`, if any (stale pid files ignored).
    pub fn user_pid(&self, name: &str) -> Option<u32> {
        let dir = self.dir(name).ok()?;
        let lock = OpenOptions::new()
            .read(true)
            .write(true)
            .open(dir.join("lock"))
            .ok()?;
        match try_lock(&lock) {
            // Nobody holds it: whatever pid file is there is stale.
            Ok(true) => None,
            _ => read_pid(&dir),
        }
    }

    pub fn list(&self) -> Vec<VmListing> {
        let Ok(entries) = fs::read_dir(&self.root) else {
            return Vec::new();
        };
        let mut out: Vec<VmListing> = entries
            .filter_map(|e| e.ok())
            .filter_map(|e| e.file_name().into_string().ok())
            .filter(|n| self.exists(n))
            .map(|name| VmListing {
                record: read_record(&self.root.join(&name)).unwrap_or_default(),
                running: self.user_pid(&name),
                name,
            })
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }

    /// Remove `name`'s entry. The caller stops a running VM first.
    pub fn remove(&self, name: &str) -> Result<(), RegistryError> {
        let dir = self.dir(name)?;
        if !dir.join("vm.json").exists() {
            return Err(RegistryError::NoSuchVm(name.to_string()));
        }
        fs::remove_dir_all(&dir).map_err(|source| RegistryError::Io {
            name: name.to_string(),
            what: "removing the VM",
            source,
        })
    }

    /// The control socket of the bhyve running `name`.
    pub fn control_socket(&self, name: &str) -> Result<PathBuf, RegistryError> {
        Ok(self.dir(name)?.join("control"))
    }
}

/// The largest vm.json read back; a record is a few hundred bytes.
const VM_RECORD_LIMIT: u64 = 1 << 20;

fn read_record(dir: &Path) -> Option<VmRecord> {
    serde_json::from_slice(&read_limited(&dir.join("vm.json"), VM_RECORD_LIMIT).ok()?).ok()
}

/// The pid in a VM's pid file, if there is one that reads as a pid.
fn read_pid(dir: &Path) -> Option<u32> {
    read_limited_string(&dir.join("pid"), 32)
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// Exclusive use of one named VM, held until dropped.
#[derive(Debug)]
pub struct VmHandle {
    name: String,
    dir: PathBuf,
    _lock: File,
}

const BOOT_IMAGE_MAGIC: &[u8; 8] = b"RHYVEBI1";
/// A loader writes a kernel and initrd, never more than this.
const BOOT_IMAGE_MAX: u64 = 4 << 30;

impl VmHandle {
    fn take(name: &str, dir: PathBuf) -> Result<Self, RegistryError> {
        let lock = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(dir.join("lock"))
            .map_err(|source| RegistryError::Io {
                name: name.to_string(),
                what: "opening the lock",
                source,
            })?;
        match try_lock(&lock) {
            Ok(true) => {}
            Ok(false) => {
                let pid = read_pid(&dir);
                return Err(RegistryError::Busy {
                    name: name.to_string(),
                    pid,
                });
            }
            Err(source) => {
                return Err(RegistryError::Io {
                    name: name.to_string(),
                    what: "locking",
                    source,
                })
            }
        }
        // We hold the lock: a pid file or socket left by a killed process is stale.
        let _ = fs::remove_file(dir.join("pid"));
        let _ = fs::remove_file(dir.join("control"));
        let _ = fs::write(dir.join("pid"), format!("{}\n", std::process::id()));
        Ok(Self {
            name: name.to_string(),
            dir,
            _lock: lock,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn io(&self, what: &'static str) -> impl FnOnce(io::Error) -> RegistryError + '_ {
        move |source| RegistryError::Io {
            name: self.name.clone(),
            what,
            source,
        }
    }

    pub fn record(&self) -> Result<VmRecord, RegistryError> {
        let bytes =
            read_limited(&self.dir.join("vm.json"), VM_RECORD_LIMIT).map_err(|e| match e {
                FileError::Io { source, .. } => self.io("reading vm.json")(source),
                other => RegistryError::Damaged {
                    name: self.name.clone(),
                    why: other.to_string(),
                },
            })?;
        serde_json::from_slice(&bytes).map_err(|e| RegistryError::Damaged {
            name: self.name.clone(),
            why: e.to_string(),
        })
    }

    pub fn save(&self, record: &VmRecord) -> Result<(), RegistryError> {
        let tmp = self.dir.join("vm.json.new");
        let json = serde_json::to_vec_pretty(record).map_err(|e| RegistryError::Damaged {
            name: self.name.clone(),
            why: e.to_string(),
        })?;
        fs::write(&tmp, json).map_err(self.io("writing vm.json"))?;
        fs::rename(&tmp, self.dir.join("vm.json")).map_err(self.io("writing vm.json"))
    }

    /// Store the guest memory a loader wrote: `(guest address, bytes)` runs.
    pub fn save_boot_image(&self, runs: &[(u64, &[u8])]) -> Result<(), RegistryError> {
        let tmp = self.dir.join("boot-image.new");
        let mut f = File::create(&tmp).map_err(self.io("writing the boot image"))?;
        let mut write = |b: &[u8]| f.write_all(b).map_err(self.io("writing the boot image"));
        write(BOOT_IMAGE_MAGIC)?;
        for (addr, bytes) in runs {
            write(&addr.to_le_bytes())?;
            write(&(bytes.len() as u64).to_le_bytes())?;
            write(bytes)?;
        }
        fs::rename(&tmp, self.dir.join("boot-image")).map_err(self.io("writing the boot image"))
    }

    /// The runs a loader stored, if any.
    pub fn boot_image(&self) -> Result<Vec<(u64, Vec<u8>)>, RegistryError> {
        let damaged = |why: &str| RegistryError::Damaged {
            name: self.name.clone(),
            why: format!("boot image: {why}"),
        };
        let mut f = match open_regular(&self.dir.join("boot-image")) {
            Ok(f) => f,
            Err(e) if e.is_not_found() => return Ok(Vec::new()),
            Err(FileError::Io { source, .. }) => {
                return Err(self.io("reading the boot image")(source))
            }
            Err(other) => return Err(damaged(&other.to_string())),
        };
        let mut magic = [0u8; 8];
        f.read_exact(&mut magic).map_err(|_| damaged("too short"))?;
        if &magic != BOOT_IMAGE_MAGIC {
            return Err(damaged("bad magic"));
        }
        let mut runs = Vec::new();
        let mut total = 0u64;
        loop {
            let mut header = [0u8; 16];
            match f.read_exact(&mut header) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => break,
                Err(e) => return Err(self.io("reading the boot image")(e)),
            }
            let addr = u64::from_le_bytes(header[..8].try_into().expect("8 bytes"));
            let len = u64::from_le_bytes(header[8..].try_into().expect("8 bytes"));
            total = total.saturating_add(len);
            if total > BOOT_IMAGE_MAX {
                return Err(damaged("larger than any loader writes"));
            }
            let mut bytes = vec![0u8; len as usize];
            f.read_exact(&mut bytes).map_err(|_| damaged("truncated"))?;
            runs.push((addr, bytes));
        }
        Ok(runs)
    }
}

impl Drop for VmHandle {
    fn drop(&mut self) {
        // Only while the directory is still ours (not destroyed meanwhile).
        if self.dir.join("vm.json").exists() {
            let _ = fs::remove_file(self.dir.join("pid"));
            let _ = fs::remove_file(self.dir.join("control"));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn registry() -> (tempdir::TempDir, Registry) {
        let t = tempdir::TempDir::new();
        let r = Registry::at(t.path());
        (t, r)
    }

    /// A throwaway directory (no tempfile dependency for one test module).
    mod tempdir {
        pub struct TempDir(std::path::PathBuf);
        impl TempDir {
            pub fn new() -> Self {
                static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
                let p = std::env::temp_dir().join(format!(
                    "rhyve-registry-{}-{}",
                    std::process::id(),
                    N.fetch_add(1, std::sync::atomic::Ordering::SeqCst)
                ));
                std::fs::create_dir_all(&p).unwrap();
                Self(p)
            }
            pub fn path(&self) -> &std::path::Path {
                &self.0
            }
        }
        impl Drop for TempDir {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.0);
            }
        }
    }

    #[test]
    fn create_list_destroy() {
        let (_t, r) = registry();
        let h = r.create("vm0").unwrap();
        assert!(matches!(r.create("vm0"), Err(RegistryError::Exists(_))));
        assert!(matches!(r.open("vm0"), Err(RegistryError::Busy { .. })));
        let l = r.list();
        assert_eq!(l.len(), 1);
        assert_eq!(l[0].running, Some(std::process::id()));
        drop(h);
        assert_eq!(r.list()[0].running, None);
        r.remove("vm0").unwrap();
        assert!(r.list().is_empty());
        assert!(matches!(r.open("vm0"), Err(RegistryError::NoSuchVm(_))));
        assert!(matches!(r.create("../x"), Err(RegistryError::BadName(_))));
    }

    #[test]
    fn record_and_boot_image_round_trip() {
        let (_t, r) = registry();
        let h = r.create("vm1").unwrap();
        let rec = VmRecord {
            memory_size: Some(512 << 20),
            entry: Some(EntryRegs {
                rip: 0x100200,
                long_mode: true,
                ..Default::default()
            }),
            cmdline: Some("console=ttyS0".into()),
            rtc_nvram: Some(vec![1, 2, 3]),
        };
        h.save(&rec).unwrap();
        h.save_boot_image(&[(0x7000, b"zero page"), (0x100000, &[1, 2, 3])])
            .unwrap();
        drop(h);
        let h = r.open("vm1").unwrap();
        assert_eq!(h.record().unwrap(), rec);
        assert_eq!(
            h.boot_image().unwrap(),
            vec![(0x7000, b"zero page".to_vec()), (0x100000, vec![1, 2, 3])]
        );
        std::fs::write(
            h.dir().join("boot-image"),
            b"RHYVEBI1\0\0\0\0\0\0\0\0\xff\xff\xff\xff\xff\xff\xff\x7f",
        )
        .unwrap();
        assert!(matches!(h.boot_image(), Err(RegistryError::Damaged { .. })));
    }

    #[test]
    fn stale_pid_of_a_dead_process_is_ignored() {
        let (_t, r) = registry();
        drop(r.create("vm2").unwrap());
        std::fs::write(r.root().join("vm2/pid"), "999999\n").unwrap();
        assert_eq!(r.user_pid("vm2"), None);
        let h = r.open("vm2").unwrap();
        assert_eq!(
            std::fs::read_to_string(h.dir().join("pid")).unwrap().trim(),
            std::process::id().to_string()
        );
    }
}
