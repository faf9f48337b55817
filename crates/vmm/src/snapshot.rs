//! Snapshots: `bhyvectl --suspend`/`--checkpoint` and `bhyve -r`
//! (bhyve's `snapshot.c`), in bhyve's three files:
//!
//! - `FILE`: guest RAM, the RAM regions one after the other (below 3 GiB,
//!   then from 4 GiB); zero pages are holes, so the file is sparse. A
//!   restore maps it privately: pages are read in as the guest touches
//!   them, and the guest's writes never reach the file.
//! - `FILE.kern`: what the hypervisor keeps (JSON): the in-kernel PICs,
//!   IOAPIC, PIT and clock, and every vCPU's complete state.
//! - `FILE.meta`: JSON: format name and version, the VM's name, vCPU count
//!   and RAM layout, and every device's typed, versioned state by id (the
//!   machine's inventory), which a restore checks against the machine its
//!   command line builds before anything is put back.
//!
//! The sandboxed bhyve never opens a snapshot path while it runs: bhyvectl
//! creates the three files under temporary names, hands their descriptors
//! over the control socket, and renames them into place once bhyve has
//! written them, `FILE.meta` last. A restore opens them before the sandbox
//! is on.

use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rhyve_hypervisor::{VcpuState, Vm, VmState};
use rhyve_platform::snapshot::{DeviceState, Inventory};
use serde::{Deserialize, Serialize};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use crate::vcpu::VcpuShared;

/// What `FILE.meta` says it is.
pub const FORMAT: &str = "rhyve-snapshot";
/// Bumped whenever a restore could not read an older layout.
pub const FORMAT_VERSION: u32 = 1;
/// Pages are compared with zero in this size.
const PAGE: usize = 4096;
/// How long a snapshot waits for every vCPU to leave the guest.
const PAUSE_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Serialize, Deserialize)]
pub struct Meta {
    pub format: String,
    pub version: u32,
    /// The rhyve that wrote it, for people reading the file.
    pub written_by: String,
    pub name: String,
    pub cpus: u32,
    /// (guest address, bytes) of each RAM region, in file order.
    pub ram: Vec<(u64, u64)>,
    pub devices: Vec<DeviceState>,
}

#[derive(Serialize, Deserialize)]
pub struct Kern {
    pub vm: VmState,
    pub vcpus: Vec<VcpuState>,
}

pub fn kern_path(file: &Path) -> PathBuf {
    suffixed(file, ".kern")
}

pub fn meta_path(file: &Path) -> PathBuf {
    suffixed(file, ".meta")
}

fn suffixed(file: &Path, suffix: &str) -> PathBuf {
    let mut s = file.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

/// The three files a snapshot is written into.
pub struct SnapshotFiles {
    pub memory: File,
    pub kern: File,
    pub meta: File,
}

/// A snapshot read back, checked to be whole and of this format.
pub struct Loaded {
    pub meta: Meta,
    pub kern: Kern,
    pub memory: Arc<File>,
}

fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<T, String> {
    let mut text = String::new();
    File::open(path)
        .and_then(|mut f| f.read_to_string(&mut text))
        .map_err(|e| format!("{}: {e}", path.display()))?;
    serde_json::from_str(&text).map_err(|e| {
        format!(
            "{}: truncated or not a rhyve snapshot ({e})",
            path.display()
        )
    })
}

/// The VM name a snapshot was taken of.
pub fn saved_name(file: &Path) -> Result<String, String> {
    let meta: serde_json::Value = read_json(&meta_path(file))?;
    meta.get("name")
        .and_then(|n| n.as_str())
        .map(str::to_string)
        .ok_or_else(|| format!("{}: no VM name", meta_path(file).display()))
}

/// Read the snapshot `file` names; refuses what is missing, truncated,
/// or from an incompatible rhyve.
pub fn load(file: &Path) -> Result<Loaded, String> {
    let meta_file = meta_path(file);
    // The format first, so an old file says so instead of failing to parse.
    let header: serde_json::Value = read_json(&meta_file)?;
    let format = header.get("format").and_then(|v| v.as_str());
    let version = header.get("version").and_then(|v| v.as_u64());
    if format != Some(FORMAT) {
        return Err(format!("{}: not a rhyve snapshot", meta_file.display()));
    }
    if version != Some(u64::from(FORMAT_VERSION)) {
        return Err(format!(
            "{}: snapshot format version {}, this rhyve restores version {FORMAT_VERSION} only",
            meta_file.display(),
            version.map_or("?".into(), |v| v.to_string())
        ));
    }
    let meta: Meta = serde_json::from_value(header)
        .map_err(|e| format!("{}: bad snapshot metadata: {e}", meta_file.display()))?;
    let kern: Kern = read_json(&kern_path(file))?;
    if kern.vcpus.len() != meta.cpus as usize {
        return Err(format!(
            "{}: holds {} vCPUs, its metadata says {}",
            kern_path(file).display(),
            kern.vcpus.len(),
            meta.cpus
        ));
    }
    let memory = File::open(file).map_err(|e| format!("{}: {e}", file.display()))?;
    let want: u64 = meta.ram.iter().map(|(_, len)| len).sum();
    let have = memory
        .metadata()
        .map_err(|e| format!("{}: {e}", file.display()))?
        .len();
    if have != want {
        return Err(format!(
            "{}: truncated: {have} bytes, the snapshot's {} MiB of memory need {want}",
            file.display(),
            want >> 20
        ));
    }
    Ok(Loaded {
        meta,
        kern,
        memory: Arc::new(memory),
    })
}

impl Loaded {
    /// Refuse a machine that differs from the snapshot's in vCPUs or memory.
    pub fn check_machine(&self, file: &Path, cpus: u32, ram: &[(u64, u64)]) -> Result<(), String> {
        if cpus != self.meta.cpus {
            return Err(format!(
                "snapshot {} has {} vCPUs, this command line asks for {cpus} (-c)",
                file.display(),
                self.meta.cpus
            ));
        }
        if ram != self.meta.ram.as_slice() {
            let mib = |r: &[(u64, u64)]| r.iter().map(|(_, l)| l).sum::<u64>() >> 20;
            return Err(format!(
                "snapshot {} has {} MiB of memory, this command line asks for {} MiB (-m)",
                file.display(),
                mib(&self.meta.ram),
                mib(ram)
            ));
        }
        Ok(())
    }
}

/// True if `bytes` are all zero (compared a word at a time).
fn is_zero(bytes: &[u8]) -> bool {
    // SAFETY: every bit pattern is a valid u64.
    let (head, words, tail) = unsafe { bytes.align_to::<u64>() };
    head.iter().all(|b| *b == 0) && words.iter().all(|w| *w == 0) && tail.iter().all(|b| *b == 0)
}

/// Write guest RAM to `file`, leaving zero pages as holes; returns the
/// bytes actually written.
pub fn write_memory(
    file: &File,
    memory: &GuestMemoryMmap,
    ram: &[(u64, u64)],
) -> std::io::Result<u64> {
    let mut offset = 0u64;
    let mut written = 0u64;
    for &(addr, len) in ram {
        let host = memory
            .find_region(GuestAddress(addr))
            .filter(|r| r.start_addr() == GuestAddress(addr) && r.len() == len)
            .map(|r| r.as_ptr())
            .ok_or_else(|| std::io::Error::other(format!("no RAM region at {addr:#x}")))?;
        // SAFETY: [addr, addr+len) is one RAM region of `memory`, mapped
        // for its life; every vCPU and device is paused, so nothing writes
        // it while it is read.
        let region = unsafe { std::slice::from_raw_parts(host as *const u8, len as usize) };
        let mut run_start: Option<usize> = None;
        for (i, page) in region.chunks(PAGE).enumerate() {
            let at = i * PAGE;
            match (is_zero(page), run_start) {
                (false, None) => run_start = Some(at),
                (true, Some(start)) => {
                    file.write_all_at(&region[start..at], offset + start as u64)?;
                    written += (at - start) as u64;
                    run_start = None;
                }
                _ => {}
            }
        }
        if let Some(start) = run_start {
            file.write_all_at(&region[start..], offset + start as u64)?;
            written += (region.len() - start) as u64;
        }
        offset += len;
    }
    file.set_len(offset)?;
    file.sync_all()?;
    Ok(written)
}

/// What the control thread needs to take a snapshot of the running VM.
pub struct Snapshotter {
    pub name: String,
    pub vm: Arc<dyn Vm>,
    pub inventory: Arc<Inventory>,
    pub shared: Arc<VcpuShared>,
    pub ram: Vec<(u64, u64)>,
}

impl Snapshotter {
    /// Pause the VM and write it into `files`. On success the VM stays
    /// paused (the caller resumes it, or ends it for `--suspend`); on
    /// failure it runs on.
    pub fn save(&self, files: &SnapshotFiles) -> Result<(), String> {
        // Devices first: the interrupts for the requests they finish while
        // pausing must reach the LAPICs before the vCPUs save them.
        // Requests the guest makes meanwhile wait in their rings (PxCI),
        // for a resumed or restored device.
        self.inventory.pause();
        let vcpus = match self.shared.pause_vcpus(PAUSE_TIMEOUT) {
            Ok(v) => v,
            Err(e) => {
                self.inventory.resume();
                return Err(e);
            }
        };
        let saved = self.write(files, vcpus);
        if saved.is_err() {
            self.resume();
        }
        saved
    }

    pub fn resume(&self) {
        self.inventory.resume();
        self.shared.resume_vcpus();
    }

    fn write(&self, files: &SnapshotFiles, vcpus: Vec<VcpuState>) -> Result<(), String> {
        // Devices before the interrupt controllers: an interrupt a device
        // raises in between is then pending in the saved controllers rather
        // than lost.
        let devices = self.inventory.save().map_err(|e| e.to_string())?;
        let vm = self.vm.save_state().map_err(|e| e.to_string())?;
        let started = std::time::Instant::now();
        let written = write_memory(&files.memory, self.vm.memory(), &self.ram)
            .map_err(|e| format!("writing guest memory: {e}"))?;
        tracing::info!(
            "snapshot: {} MiB of memory, {} MiB written, in {:?}",
            self.ram.iter().map(|(_, l)| l).sum::<u64>() >> 20,
            written >> 20,
            started.elapsed()
        );
        let kern = Kern { vm, vcpus };
        let meta = Meta {
            format: FORMAT.into(),
            version: FORMAT_VERSION,
            written_by: format!("rhyve {}", env!("CARGO_PKG_VERSION")),
            name: self.name.clone(),
            cpus: kern.vcpus.len() as u32,
            ram: self.ram.clone(),
            devices,
        };
        for (what, mut file, text) in [
            ("kernel state", &files.kern, serde_json::to_vec(&kern)),
            ("metadata", &files.meta, serde_json::to_vec_pretty(&meta)),
        ] {
            let text = text.map_err(|e| format!("encoding the {what}: {e}"))?;
            file.write_all(&text)
                .and_then(|()| file.sync_all())
                .map_err(|e| format!("writing the {what}: {e}"))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_pages_are_holes_and_the_rest_round_trips() {
        let ram = vec![(0u64, 64 * PAGE as u64), (1u64 << 32, 16 * PAGE as u64)];
        let ranges: Vec<(GuestAddress, usize)> = ram
            .iter()
            .map(|&(a, l)| (GuestAddress(a), l as usize))
            .collect();
        let mem = GuestMemoryMmap::<()>::from_ranges(&ranges).unwrap();
        use vm_memory::Bytes;
        mem.write_slice(b"low", GuestAddress(5 * PAGE as u64))
            .unwrap();
        mem.write_slice(b"page63", GuestAddress(63 * PAGE as u64 + 100))
            .unwrap();
        mem.write_slice(b"high", GuestAddress((1 << 32) + 3 * PAGE as u64))
            .unwrap();
        let dir = std::env::temp_dir().join(format!("rhyve-snap-mem-{}", std::process::id()));
        let file = File::options()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .open(&dir)
            .unwrap();
        let written = write_memory(&file, &mem, &ram).unwrap();
        assert_eq!(written, 3 * PAGE as u64, "only the three non-zero pages");
        assert_eq!(file.metadata().unwrap().len(), 80 * PAGE as u64);
        use std::os::unix::fs::MetadataExt;
        assert!(
            file.metadata().unwrap().blocks() * 512 < 40 * PAGE as u64,
            "sparse"
        );
        let mut buf = [0u8; 4];
        file.read_exact_at(&mut buf, (64 + 3) as u64 * PAGE as u64)
            .unwrap();
        assert_eq!(&buf, b"high");
        std::fs::remove_file(&dir).unwrap();
    }
}
