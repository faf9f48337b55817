//! What a loader (grub-bhyve) leaves in a named VM: the Linux kernel and
//! initrd placed by the same boot-protocol code as direct kernel boot, and
//! the boot vCPU's entry state. bhyve's loaders write into the kernel VM's
//! memory; ours write the pages they touched into the registry entry, which
//! `bhyve NAME` copies into guest RAM before the vCPUs start.

use std::io::Write;

use rhyve_hypervisor::registry::Registry;
use rhyve_hypervisor::EntryRegs;
use rhyve_platform::layout::MemoryLayout;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use crate::VmmError;

const PAGE: usize = 4096;

/// The runs of pages the loader wrote: (guest address, bytes).
fn touched_runs(memory: &GuestMemoryMmap) -> Vec<(u64, Vec<u8>)> {
    let mut runs = Vec::new();
    for region in memory.iter() {
        let len = region.len() as usize;
        let mut resident = vec![0u8; len.div_ceil(PAGE)];
        // SAFETY: the region is a live mapping of `len` bytes; `resident`
        // has one byte per page as mincore(2) requires.
        if unsafe {
            libc::mincore(
                region.as_ptr() as *mut libc::c_void,
                len,
                resident.as_mut_ptr(),
            )
        } != 0
        {
            continue;
        }
        let base = region.start_addr().0;
        let mut page = 0;
        while page < resident.len() {
            if resident[page] & 1 == 0 {
                page += 1;
                continue;
            }
            let first = page;
            while page < resident.len() && resident[page] & 1 != 0 {
                page += 1;
            }
            let (start, end) = (first * PAGE, (page * PAGE).min(len));
            // SAFETY: [start, end) lies inside the region's mapping.
            let bytes =
                unsafe { std::slice::from_raw_parts(region.as_ptr().add(start), end - start) };
            runs.push((base + start as u64, bytes.to_vec()));
        }
    }
    runs
}

fn stage(dir: &std::path::Path, name: &str, bytes: &[u8]) -> Result<std::path::PathBuf, VmmError> {
    let path = dir.join(name);
    let mut f = std::fs::File::create(&path)
        .map_err(|e| VmmError::Setup(format!("{}: {e}", path.display())))?;
    f.write_all(bytes)
        .map_err(|e| VmmError::Setup(format!("{}: {e}", path.display())))?;
    Ok(path)
}

/// Load `kernel` (+ `initrd`) with `cmdline` into the named VM `name` of
/// `memory_size` bytes, creating the VM if needed (grub-bhyve's job).
pub fn prepare_named_vm(
    name: &str,
    memory_size: u64,
    kernel: &[u8],
    initrd: &[u8],
    cmdline: &str,
) -> Result<(), VmmError> {
    let handle = Registry::from_env()
        .open_or_create(name)
        .map_err(|e| VmmError::Setup(e.to_string()))?;
    let layout = MemoryLayout::new(memory_size);
    let ranges: Vec<(GuestAddress, usize)> = layout
        .ram_regions()
        .into_iter()
        .map(|(a, s)| (GuestAddress(a), s as usize))
        .collect();
    let memory = GuestMemoryMmap::<()>::from_ranges(&ranges).map_err(|e| {
        VmmError::Setup(format!(
            "cannot allocate {} MiB of guest memory: {e}",
            memory_size >> 20
        ))
    })?;
    // linux-loader reads files: stage the bytes next to the VM's entry.
    let kernel_path = stage(handle.dir(), "kernel.staged", kernel)?;
    let initrd_path = if initrd.is_empty() {
        None
    } else {
        Some(stage(handle.dir(), "initrd.staged", initrd)?)
    };
    let loaded = rhyve_boot::load_linux(
        &memory,
        &kernel_path,
        initrd_path.as_deref(),
        cmdline,
        &layout,
    );
    let _ = std::fs::remove_file(&kernel_path);
    if let Some(p) = &initrd_path {
        let _ = std::fs::remove_file(p);
    }
    let loaded = loaded.map_err(|e| VmmError::Setup(e.to_string()))?;
    let entry: EntryRegs = *loaded.regs();
    let runs = touched_runs(&memory);
    let borrowed: Vec<(u64, &[u8])> = runs.iter().map(|(a, b)| (*a, b.as_slice())).collect();
    handle
        .save_boot_image(&borrowed)
        .map_err(|e| VmmError::Setup(e.to_string()))?;
    let mut record = handle
        .record()
        .map_err(|e| VmmError::Setup(e.to_string()))?;
    record.memory_size = Some(memory_size);
    record.entry = Some(entry);
    record.cmdline = Some(cmdline.to_string());
    handle
        .save(&record)
        .map_err(|e| VmmError::Setup(e.to_string()))?;
    Ok(())
}
