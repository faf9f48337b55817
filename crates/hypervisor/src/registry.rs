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
//! - `lock`: write-locked (an open file description lock, which others can
//!   probe without taking it) by whichever process uses the VM (loader or
//!   bhyve), which refuses concurrent use and tells a live VM from a stale one;
//! - `pid` and `control`: the running bhyve's pid and control socket, bound
//!   and reached through `/proc/self/fd/N/control` so that any accepted name
//!   under any registry root fits a socket address (`sun_path`, 108 bytes);
//! - `destroy`: a pending `bhyvectl --destroy`; the bhyve holding the VM
//!   stops when it sees it, whatever phase it is in.
//!
//! The entry stays until `bhyvectl --destroy` (or bhyve -D on power-off).
//! Removal renames the directory away first, atomically, while its lock is
//! held: a process that opened the old lock sees, once it gets the lock,
//! that its path names nothing any more, and never runs a removed VM.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use crate::EntryRegs;
use rhyve_config::file::{open_regular, read_limited, read_limited_string, FileError};

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("invalid VM name \"{0}\"")]
    BadName(String),
    #[error("VM name \"{name}\" is too long: {len} bytes, at most {MAX_NAME_LEN} (bhyve's VM_MAX_NAMELEN)")]
    NameTooLong { name: String, len: usize },
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
    /// Each vCPU's registers when the VM last stopped, as bhyve's kernel VM
    /// keeps them (a triple-faulted VM is left "for inspection").
    #[serde(default)]
    pub vcpus_at_stop: Vec<Vec<(String, u64)>>,
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

/// bhyve's VM_MAX_NAMELEN: SPECNAMELEN (255) less room for the device
/// path's prefix (10) and suffix (15) and their separator.
pub const MAX_NAME_LEN: usize = 229;

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name != "."
        && name != ".."
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.:+".contains(c))
}

/// A whole-file write lock request for fcntl(2).
fn whole_file_write_lock() -> libc::flock {
    // SAFETY: flock is plain data; all-zero is a valid value.
    let mut lock: libc::flock = unsafe { std::mem::zeroed() };
    lock.l_type = libc::F_WRLCK as libc::c_short;
    lock.l_whence = libc::SEEK_SET as libc::c_short;
    lock
}

/// Take the open-file-description write lock without waiting. Such locks
/// live as long as the descriptor, like flock(2)'s, but can be probed
/// without taking them ([`is_locked`]).
fn try_lock(file: &File) -> io::Result<bool> {
    let lock = whole_file_write_lock();
    // SAFETY: fcntl on a descriptor we own with a valid flock.
    if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &lock) } == 0 {
        return Ok(true);
    }
    let e = io::Error::last_os_error();
    if matches!(e.raw_os_error(), Some(libc::EAGAIN) | Some(libc::EACCES)) {
        Ok(false)
    } else {
        Err(e)
    }
}

/// True if another open file description holds the lock. Probing never
/// takes it, so it cannot make a bhyve starting at that moment fail.
fn is_locked(file: &File) -> io::Result<bool> {
    let mut lock = whole_file_write_lock();
    // SAFETY: fcntl on a descriptor we own with a valid flock.
    if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_GETLK, &mut lock) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(lock.l_type != libc::F_UNLCK as libc::c_short)
}

/// `path` reached through a descriptor of its directory, short whatever the
/// directory's own path is: `/proc/self/fd/N/<file>`.
fn via_dir_fd(dir: &File, file: &str) -> PathBuf {
    PathBuf::from(format!("/proc/self/fd/{}/{file}", dir.as_raw_fd()))
}

/// The directory `dir` opened as a path-only handle.
fn open_dir(dir: &Path) -> io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_PATH | libc::O_DIRECTORY)
        .open(dir)
}

/// The control socket file in a VM's directory.
const CONTROL: &str = "control";
/// The pending-destroy marker in a VM's directory.
const DESTROY: &str = "destroy";

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
        if name.len() > MAX_NAME_LEN {
            return Err(RegistryError::NameTooLong {
                name: name.to_string(),
                len: name.len(),
            });
        }
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

    /// True while a process (bhyve or a loader) holds `name`.
    pub fn in_use(&self, name: &str) -> bool {
        let Ok(dir) = self.dir(name) else {
            return false;
        };
        File::open(dir.join("lock"))
            .and_then(|lock| is_locked(&lock))
            .unwrap_or(false)
    }

    /// The pid of the process using `name`, if any (stale pid files ignored;
    /// `None` also for a user that has not written its pid yet).
    pub fn user_pid(&self, name: &str) -> Option<u32> {
        if !self.in_use(name) {
            // Nobody holds it: whatever pid file is there is stale.
            return None;
        }
        read_pid(&self.dir(name).ok()?)
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

    /// What the registry records about `name`, read without taking it.
    pub fn record(&self, name: &str) -> Result<VmRecord, RegistryError> {
        let dir = self.dir(name)?;
        let bytes = read_limited(&dir.join("vm.json"), VM_RECORD_LIMIT).map_err(|e| match e {
            FileError::Io { source, .. } if source.kind() == io::ErrorKind::NotFound => {
                RegistryError::NoSuchVm(name.to_string())
            }
            FileError::Io { source, .. } => RegistryError::Io {
                name: name.to_string(),
                what: "reading vm.json",
                source,
            },
            other => RegistryError::Damaged {
                name: name.to_string(),
                why: other.to_string(),
            },
        })?;
        serde_json::from_slice(&bytes).map_err(|e| RegistryError::Damaged {
            name: name.to_string(),
            why: e.to_string(),
        })
    }

    /// Ask whoever holds `name` to stop for `bhyvectl --destroy`; the VM's
    /// bhyve looks for this while it starts and runs.
    pub fn request_destroy(&self, name: &str) -> Result<(), RegistryError> {
        let dir = self.dir(name)?;
        if !dir.join("vm.json").exists() {
            return Err(RegistryError::NoSuchVm(name.to_string()));
        }
        fs::write(dir.join(DESTROY), b"").map_err(|source| RegistryError::Io {
            name: name.to_string(),
            what: "requesting the destroy",
            source,
        })
    }

    /// Withdraw a destroy request nobody acted on.
    pub fn cancel_destroy(&self, name: &str) {
        if let Ok(dir) = self.dir(name) {
            let _ = fs::remove_file(dir.join(DESTROY));
        }
    }

    /// Connect to the control socket of the bhyve running `name`.
    pub fn connect_control(&self, name: &str) -> io::Result<UnixStream> {
        let dir = self
            .dir(name)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))?;
        let dir = open_dir(&dir)?;
        UnixStream::connect(via_dir_fd(&dir, CONTROL))
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
    /// Removed by [`VmHandle::destroy`]: the path may name a new VM now.
    destroyed: bool,
}

const BOOT_IMAGE_MAGIC: &[u8; 8] = b"RHYVEBI1";
/// A loader writes a kernel and initrd, never more than this.
const BOOT_IMAGE_MAX: u64 = 4 << 30;

impl VmHandle {
    fn take(name: &str, dir: PathBuf) -> Result<Self, RegistryError> {
        let lock = Self::open_lock(name, &dir)?;
        Self::lock(name, dir, lock)
    }

    fn open_lock(name: &str, dir: &Path) -> Result<File, RegistryError> {
        OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(dir.join("lock"))
            .map_err(|source| match source.kind() {
                // Its directory was removed since we looked.
                io::ErrorKind::NotFound => RegistryError::NoSuchVm(name.to_string()),
                _ => RegistryError::Io {
                    name: name.to_string(),
                    what: "opening the lock",
                    source,
                },
            })
    }

    fn lock(name: &str, dir: PathBuf, lock: File) -> Result<Self, RegistryError> {
        match try_lock(&lock) {
            Ok(true) => {
                // Destroyed (renamed away) between our open and our lock: the
                // lock we hold is a removed VM's.
                let same = match (lock.metadata(), fs::metadata(dir.join("lock"))) {
                    (Ok(held), Ok(now)) => held.dev() == now.dev() && held.ino() == now.ino(),
                    _ => false,
                };
                if !same {
                    return Err(RegistryError::NoSuchVm(name.to_string()));
                }
            }
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
        // We hold the lock: a pid file or socket left by a killed process is
        // stale. The pid file is replaced in one rename, never missing.
        let _ = fs::remove_file(dir.join(CONTROL));
        let pid_tmp = dir.join("pid.new");
        let _ = fs::write(&pid_tmp, format!("{}\n", std::process::id()))
            .and_then(|()| fs::rename(&pid_tmp, dir.join("pid")));
        Ok(Self {
            name: name.to_string(),
            dir,
            _lock: lock,
            destroyed: false,
        })
    }

    /// True once `bhyvectl --destroy` asked for this VM to go away.
    pub fn destroy_requested(&self) -> bool {
        self.dir.join(DESTROY).exists()
    }

    /// Serve the control socket (for bhyvectl) in this VM's directory.
    pub fn bind_control(&self) -> io::Result<UnixListener> {
        let dir = open_dir(&self.dir)?;
        let path = via_dir_fd(&dir, CONTROL);
        let _ = fs::remove_file(&path);
        UnixListener::bind(path)
    }

    /// Remove the VM from the registry (bhyvectl --destroy, bhyve -D / -M).
    pub fn destroy(mut self) -> Result<(), RegistryError> {
        let root = self.dir.parent().unwrap_or(Path::new("/")).to_path_buf();
        // A name no VM can have ('#' is not allowed), so never listed.
        static SEQ: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let grave = root.join(format!(
            "#destroyed.{}.{}",
            std::process::id(),
            SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        fs::rename(&self.dir, &grave).map_err(self.io("removing the VM"))?;
        self.destroyed = true;
        fs::remove_dir_all(&grave).map_err(self.io("removing the VM"))
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
        // Only while the directory is still ours (not destroyed).
        if !self.destroyed {
            let _ = fs::remove_file(self.dir.join("pid"));
            let _ = fs::remove_file(self.dir.join(CONTROL));
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
        r.open("vm0").unwrap().destroy().unwrap();
        assert!(r.list().is_empty());
        assert_eq!(std::fs::read_dir(r.root()).unwrap().count(), 0);
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
            vcpus_at_stop: vec![vec![("rip".into(), 0xfff0)]],
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

    #[test]
    fn longest_name_under_a_long_root_has_a_reachable_control_socket() {
        let (t, _) = registry();
        let root = t.path().join("d".repeat(200)).join("e".repeat(200));
        let r = Registry::at(&root);
        let name = "n".repeat(MAX_NAME_LEN);
        let h = r.create(&name).unwrap();
        let listener = h.bind_control().unwrap();
        let mut client = r.connect_control(&name).unwrap();
        client.write_all(b"x").unwrap();
        let (mut served, _) = listener.accept().unwrap();
        let mut byte = [0u8];
        served.read_exact(&mut byte).unwrap();
        assert_eq!(&byte, b"x");
        let long = "n".repeat(MAX_NAME_LEN + 1);
        assert!(matches!(
            r.create(&long),
            Err(RegistryError::NameTooLong { len: 230, .. })
        ));
    }

    #[test]
    fn a_lock_opened_before_a_destroy_does_not_take_the_removed_vm() {
        let (_t, r) = registry();
        let holder = r.create("vm4").unwrap();
        let dir = holder.dir().to_path_buf();
        // Another process got as far as opening the lock, then waited.
        let late = VmHandle::open_lock("vm4", &dir).unwrap();
        holder.destroy().unwrap();
        assert!(matches!(
            VmHandle::lock("vm4", dir.clone(), late),
            Err(RegistryError::NoSuchVm(_))
        ));
        // A new VM of the same name is a different one, and takes fine.
        let late = VmHandle::open_lock("vm4", &dir);
        assert!(matches!(late, Err(RegistryError::NoSuchVm(_))));
        drop(r.create("vm4").unwrap());
        drop(r.open("vm4").unwrap());
    }

    #[test]
    fn probing_does_not_take_the_lock_and_destroy_requests_are_seen() {
        let (_t, r) = registry();
        drop(r.create("vm3").unwrap());
        assert!(!r.in_use("vm3"));
        let h = r.open("vm3").unwrap();
        assert!(r.in_use("vm3"));
        assert!(!h.destroy_requested());
        r.request_destroy("vm3").unwrap();
        assert!(h.destroy_requested());
        r.cancel_destroy("vm3");
        assert!(!h.destroy_requested());
        drop(h);
        // A probe while nobody holds it leaves it free to take.
        assert!(!r.in_use("vm3"));
        drop(r.open("vm3").unwrap());
    }
}
