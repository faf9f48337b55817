//! Direct Linux boot, beyond bhyve (which needs a boot ROM or bhyveload):
//! a bzImage through the x86 64-bit boot protocol, or an ELF `vmlinux`
//! with a PVH entry note. Loading uses `linux-loader`; this module adds the
//! zero page / `hvm_start_info`, the initrd, the command line, the GDT and
//! the identity page tables, and returns the vCPU entry state as data.
//!
//! Guest memory below 1 MiB (all under the 0xA0000 VGA hole, clear of the
//! firmware tables at 0xF0000-0xFFFFF):
//!
//! | address  | contents |
//! |----------|----------|
//! | 0x0500   | GDT: null, null, code 0x10, data 0x18, busy TSS 0x20 |
//! | 0x6000   | PVH `hvm_start_info`, module list at 0x6040, memory map at 0x6080 |
//! | 0x7000   | bzImage zero page (`boot_params`) |
//! | 0x8FF0   | initial stack top (64-bit entry) |
//! | 0x9000   | PML4, 0xA000 PDPT, 0xB000-0xEFFF four page directories |
//! | 0x20000  | kernel command line (up to 64 KiB) |
//!
//! The kernel goes where its header says (bzImage: `code32_start`, 1 MiB;
//! ELF: each segment's physical address); the initrd at the top of RAM
//! below 4 GiB (and below `initrd_addr_max`), page aligned.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use linux_loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use linux_loader::cmdline::Cmdline;
use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bzimage::BzImage;
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use linux_loader::loader::elf::{Elf, PvhBootCapability};
use linux_loader::loader::{load_cmdline, KernelLoader};
use rhyve_platform::layout::{MemoryLayout, BIOS_AREA_END};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::{write_guest, BootError};
use rhyve_config::file::open_regular;

const GDT_ADDR: u64 = 0x500;
const PVH_START_INFO_ADDR: u64 = 0x6000;
const PVH_MODLIST_ADDR: u64 = 0x6040;
const PVH_MEMMAP_ADDR: u64 = 0x6080;
/// Room for the PVH memory map before the zero page.
const PVH_MEMMAP_MAX_ENTRIES: usize = (ZERO_PAGE_ADDR - PVH_MEMMAP_ADDR) as usize / 24;
const ZERO_PAGE_ADDR: u64 = 0x7000;
const BOOT_STACK_TOP: u64 = 0x8FF0;
const PML4_ADDR: u64 = 0x9000;
const PDPT_ADDR: u64 = 0xA000;
const PD_ADDR: u64 = 0xB000;
/// 4 page directories of 2 MiB pages map the first 4 GiB.
const PD_COUNT: u64 = 4;
const CMDLINE_ADDR: u64 = 0x2_0000;
const CMDLINE_MAX: usize = 0x1_0000;

/// Selector of the 64-bit (Linux) or 32-bit (PVH) flat code segment.
pub const BOOT_CODE_SELECTOR: u16 = 0x10;
/// Selector of the flat data segment.
pub const BOOT_DATA_SELECTOR: u16 = 0x18;
/// Selector of a busy 32-bit TSS (base 0, limit 0x67) in the boot GDT, for
/// a hypervisor that must load TR with a valid descriptor.
pub const BOOT_TSS_SELECTOR: u16 = 0x20;

const GDT: [u64; 5] = [
    0,
    0,
    0x00AF_9B00_0000_FFFF, // replaced by the 32-bit code segment for PVH
    0x00CF_9300_0000_FFFF,
    0x0000_8B00_0000_0067,
];
const CODE32: u64 = 0x00CF_9B00_0000_FFFF;

const CR0_PE: u64 = 1;
const CR0_ET: u64 = 1 << 4;
const CR0_NE: u64 = 1 << 5;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

const HDR_MAGIC_VERSION_64BIT: u16 = 0x020C;
const XLF_KERNEL_64: u16 = 1;
const LOADER_TYPE_UNDEFINED: u8 = 0xFF;
const XEN_HVM_START_MAGIC: u32 = 0x336E_C578;
const PAGE_SIZE: u64 = 0x1000;

/// Registers a vCPU starts with (TR may use [`BOOT_TSS_SELECTOR`]).
pub use rhyve_platform::entry::EntryRegs as X86BootRegs;

/// How the boot vCPU enters the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BootEntry {
    /// 64-bit long mode, the first 4 GiB identity-mapped with 2 MiB pages,
    /// RSI = zero page (`boot_params`).
    Linux64 { regs: X86BootRegs },
    /// 32-bit protected mode, flat, paging off, EBX = `hvm_start_info`.
    Pvh { regs: X86BootRegs },
}

impl BootEntry {
    pub fn regs(&self) -> &X86BootRegs {
        match self {
            BootEntry::Linux64 { regs } | BootEntry::Pvh { regs } => regs,
        }
    }
}

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> BootError + '_ {
    move |source| BootError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn unsupported(path: &Path, why: impl Into<String>) -> BootError {
    BootError::UnsupportedKernel {
        path: path.to_path_buf(),
        why: why.into(),
    }
}

/// Load `kernel` (bzImage or PVH ELF), `initrd` and `cmdline` into guest
/// memory and return the state the boot vCPU must start in.
pub fn load_linux(
    mem: &GuestMemoryMmap,
    kernel: &Path,
    initrd: Option<&Path>,
    cmdline: &str,
    memory: &MemoryLayout,
) -> Result<BootEntry, BootError> {
    let mut file = open_regular(kernel).map_err(BootError::KernelFile)?;
    let mut magic = [0u8; 4];
    let is_elf = match file.read_exact(&mut magic) {
        Ok(()) => magic == *b"\x7fELF",
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => false,
        Err(e) => return Err(io_error(kernel)(e)),
    };
    if is_elf {
        load_pvh(mem, kernel, &mut file, initrd, cmdline, memory)
    } else {
        load_bzimage(mem, kernel, &mut file, initrd, cmdline, memory)
    }
}

fn write_cmdline(mem: &GuestMemoryMmap, cmdline: &str, capacity: usize) -> Result<(), BootError> {
    let mut c = Cmdline::new(capacity).map_err(|e| BootError::Cmdline(e.to_string()))?;
    if !cmdline.trim().is_empty() {
        c.insert_str(cmdline)
            .map_err(|e| BootError::Cmdline(format!("{e} (at most {} bytes)", capacity - 1)))?;
    }
    load_cmdline(mem, GuestAddress(CMDLINE_ADDR), &c).map_err(|e| BootError::Cmdline(e.to_string()))
}

fn write_gdt(mem: &GuestMemoryMmap, long_mode: bool) -> Result<u16, BootError> {
    let mut gdt = GDT;
    if !long_mode {
        gdt[usize::from(BOOT_CODE_SELECTOR >> 3)] = CODE32;
    }
    let bytes: Vec<u8> = gdt.iter().flat_map(|d| d.to_le_bytes()).collect();
    write_guest(mem, GDT_ADDR, &bytes, "boot GDT")?;
    Ok((bytes.len() - 1) as u16)
}

fn write_identity_map(mem: &GuestMemoryMmap) -> Result<(), BootError> {
    const PRESENT_RW: u64 = 0x3;
    const PAGE_2M: u64 = 0x80;
    write_guest(
        mem,
        PML4_ADDR,
        &(PDPT_ADDR | PRESENT_RW).to_le_bytes(),
        "page tables",
    )?;
    let pdpt: Vec<u8> = (0..PD_COUNT)
        .flat_map(|i| ((PD_ADDR + i * PAGE_SIZE) | PRESENT_RW).to_le_bytes())
        .collect();
    write_guest(mem, PDPT_ADDR, &pdpt, "page tables")?;
    let pds: Vec<u8> = (0..PD_COUNT * 512)
        .flat_map(|i| ((i << 21) | PAGE_2M | PRESENT_RW).to_le_bytes())
        .collect();
    write_guest(mem, PD_ADDR, &pds, "page tables")
}

/// Put the initrd page-aligned at the top of `low..high`; returns (address, size).
fn load_initrd(
    mem: &GuestMemoryMmap,
    path: &Path,
    low: u64,
    high: u64,
) -> Result<(u64, u64), BootError> {
    let mut file = open_regular(path).map_err(BootError::InitrdFile)?;
    let size = file.metadata().map_err(io_error(path))?.len();
    let too_large = || BootError::InitrdTooLarge {
        path: PathBuf::from(path),
        size,
        low,
        high,
    };
    let start = high
        .checked_sub(size)
        .map(|s| s & !(PAGE_SIZE - 1))
        .filter(|&s| s >= low)
        .ok_or_else(too_large)?;
    let len = usize::try_from(size).map_err(|_| too_large())?;
    mem.read_exact_volatile_from(GuestAddress(start), &mut file, len)
        .map_err(|e| BootError::Io {
            path: PathBuf::from(path),
            source: std::io::Error::other(e.to_string()),
        })?;
    Ok((start, size))
}

/// Offsets in a bzImage's boot sector and setup header (boot protocol,
/// Documentation/arch/x86/boot.rst).
const HDR_SETUP_SECTS: usize = 0x1F1;
const HDR_SYSSIZE: usize = 0x1F4;
const HDR_BOOT_FLAG: usize = 0x1FE;
const HDR_MAGIC: usize = 0x202;
const HDR_VERSION: usize = 0x206;
const HDR_XLOADFLAGS: usize = 0x236;
const HDR_PREF_ADDRESS: usize = 0x258;
const HDR_INIT_SIZE: usize = 0x260;
/// The setup header up to and including `init_size`.
const HDR_END: usize = HDR_INIT_SIZE + 4;

/// Check what the boot protocol lets a loader check before loading: the
/// header's magic and version, that the file holds all the kernel its header
/// announces (a truncated bzImage would otherwise boot into garbage), and
/// that guest RAM holds the kernel where it will run.
fn check_bzimage_header(
    path: &Path,
    file: &mut File,
    memory: &MemoryLayout,
) -> Result<(), BootError> {
    let file_len = file.metadata().map_err(io_error(path))?.len();
    let mut hdr = [0u8; HDR_END];
    file.seek(SeekFrom::Start(0)).map_err(io_error(path))?;
    if file_len < HDR_END as u64 {
        return Err(unsupported(
            path,
            format!(
                "neither an ELF nor a bzImage: {file_len} bytes, shorter than a Linux boot header"
            ),
        ));
    }
    file.read_exact(&mut hdr).map_err(io_error(path))?;
    file.seek(SeekFrom::Start(0)).map_err(io_error(path))?;
    let u16_at = |o: usize| u16::from_le_bytes([hdr[o], hdr[o + 1]]);
    let u32_at = |o: usize| u32::from_le_bytes([hdr[o], hdr[o + 1], hdr[o + 2], hdr[o + 3]]);
    if u16_at(HDR_BOOT_FLAG) != 0xAA55 || &hdr[HDR_MAGIC..HDR_MAGIC + 4] != b"HdrS" {
        return Err(unsupported(
            path,
            "neither an ELF nor a bzImage (no \"HdrS\" Linux boot header at 0x202)",
        ));
    }
    let version = u16_at(HDR_VERSION);
    if version < HDR_MAGIC_VERSION_64BIT || u16_at(HDR_XLOADFLAGS) & XLF_KERNEL_64 == 0 {
        return Err(unsupported(
            path,
            format!(
                "boot protocol {}.{:02} without a 64-bit entry point (need 2.12 and XLF_KERNEL_64)",
                version >> 8,
                version & 0xFF
            ),
        ));
    }
    // setup_sects 0 means 4; the boot sector comes on top.
    let setup_sects = match hdr[HDR_SETUP_SECTS] {
        0 => 4,
        n => u64::from(n),
    };
    let setup_len = (setup_sects + 1) * 512;
    let kernel_len = u64::from(u32_at(HDR_SYSSIZE)) * 16;
    if file_len < setup_len + kernel_len {
        return Err(unsupported(
            path,
            format!(
                "truncated: its boot header announces {} bytes ({setup_len} of setup, {kernel_len} of kernel), the file has {file_len}",
                setup_len + kernel_len
            ),
        ));
    }
    // The protected-mode kernel is copied to 1 MiB; the decompressor then
    // runs at max(1 MiB, pref_address) and needs init_size bytes there.
    let pref_address = u64::from_le_bytes(
        hdr[HDR_PREF_ADDRESS..HDR_PREF_ADDRESS + 8]
            .try_into()
            .expect("8 bytes"),
    );
    let copied_end = BIOS_AREA_END + (file_len - setup_len);
    let runtime_end = BIOS_AREA_END
        .max(pref_address)
        .saturating_add(u64::from(u32_at(HDR_INIT_SIZE)));
    let need = copied_end.max(runtime_end);
    if need > memory.lowmem {
        return Err(BootError::MemoryTooSmall {
            path: path.to_path_buf(),
            have: memory.lowmem,
            need,
        });
    }
    Ok(())
}

fn load_bzimage(
    mem: &GuestMemoryMmap,
    path: &Path,
    file: &mut File,
    initrd: Option<&Path>,
    cmdline: &str,
    memory: &MemoryLayout,
) -> Result<BootEntry, BootError> {
    check_bzimage_header(path, file, memory)?;
    let loaded =
        BzImage::load(mem, None, file, Some(GuestAddress(BIOS_AREA_END))).map_err(|source| {
            BootError::KernelLoad {
                path: path.to_path_buf(),
                source,
            }
        })?;
    let hdr: setup_header = loaded
        .setup_header
        .ok_or_else(|| unsupported(path, "no setup header"))?;
    let load = loaded.kernel_load.0;
    // The decompressor runs at max(load, pref_address) and needs init_size
    // (within RAM: checked with the header above).
    let runtime_start = load.max(hdr.pref_address);
    let kernel_top = loaded
        .kernel_end
        .max(runtime_start.saturating_add(u64::from(hdr.init_size)));

    let mut params = boot_params {
        hdr,
        ..Default::default()
    };
    params.hdr.type_of_loader = LOADER_TYPE_UNDEFINED;
    params.hdr.cmd_line_ptr = CMDLINE_ADDR as u32;
    let cmdline_size = hdr.cmdline_size as usize;
    write_cmdline(mem, cmdline, cmdline_size.clamp(1, CMDLINE_MAX))?;

    if let Some(initrd) = initrd {
        // initrd_addr_max is the highest address the initrd may occupy.
        let high = memory
            .lowmem
            .min(u64::from(hdr.initrd_addr_max).saturating_add(1));
        let (start, size) = load_initrd(mem, initrd, kernel_top, high)?;
        // Below 4 GiB by construction; sizes above 4 GiB cannot fit there.
        params.hdr.ramdisk_image = start as u32;
        params.hdr.ramdisk_size = size as u32;
    }

    let e820 = memory.e820();
    if e820.len() > params.e820_table.len() {
        return Err(BootError::InvalidPlatform(format!(
            "{} e820 entries do not fit in the zero page",
            e820.len()
        )));
    }
    for (slot, e) in params.e820_table.iter_mut().zip(&e820) {
        *slot = boot_e820_entry {
            addr: e.addr,
            size: e.size,
            r#type: e.kind,
        };
    }
    params.e820_entries = e820.len() as u8;
    LinuxBootConfigurator::write_bootparams(
        &BootParams::new(&params, GuestAddress(ZERO_PAGE_ADDR)),
        mem,
    )
    .map_err(|_| BootError::GuestMemory {
        what: "zero page",
        addr: ZERO_PAGE_ADDR,
        len: std::mem::size_of::<boot_params>(),
    })?;

    let gdt_limit = write_gdt(mem, true)?;
    write_identity_map(mem)?;
    Ok(BootEntry::Linux64 {
        regs: X86BootRegs {
            rip: load + 0x200,
            rsi: ZERO_PAGE_ADDR,
            rbx: 0,
            rsp: BOOT_STACK_TOP,
            cr0: CR0_PE | CR0_ET | CR0_NE | CR0_PG,
            cr3: PML4_ADDR,
            cr4: CR4_PAE,
            efer: EFER_LME | EFER_LMA,
            gdt_base: GDT_ADDR,
            gdt_limit,
            code_selector: BOOT_CODE_SELECTOR,
            data_selector: BOOT_DATA_SELECTOR,
            long_mode: true,
        },
    })
}

/// Check the ELF is 64-bit and every loadable segment sits at or above
/// 1 MiB (so it cannot overwrite the boot structures or firmware tables),
/// lies within the file (not truncated) and fits in guest RAM.
fn check_elf_segments(
    path: &Path,
    file: &mut File,
    memory: &MemoryLayout,
) -> Result<(), BootError> {
    let file_len = file.metadata().map_err(io_error(path))?.len();
    let mut ehdr = [0u8; 64];
    file.seek(SeekFrom::Start(0)).map_err(io_error(path))?;
    file.read_exact(&mut ehdr).map_err(io_error(path))?;
    if ehdr[4] != 2 {
        return Err(unsupported(path, "not a 64-bit ELF"));
    }
    let u16_at = |b: &[u8], o: usize| u16::from_le_bytes([b[o], b[o + 1]]);
    let u64_at = |b: &[u8], o: usize| {
        let mut v = [0u8; 8];
        v.copy_from_slice(&b[o..o + 8]);
        u64::from_le_bytes(v)
    };
    let phoff = u64_at(&ehdr, 0x20);
    let phentsize = u16_at(&ehdr, 0x36);
    let phnum = u16_at(&ehdr, 0x38);
    if phentsize != 56 {
        return Err(unsupported(path, "unexpected ELF program header size"));
    }
    let table_end = u64::from(phnum)
        .checked_mul(56)
        .and_then(|len| phoff.checked_add(len));
    if table_end.is_none_or(|end| end > file_len) {
        return Err(unsupported(
            path,
            format!("truncated: its program headers end past the file's {file_len} bytes"),
        ));
    }
    let mut need = 0u64;
    for i in 0..u64::from(phnum) {
        let mut phdr = [0u8; 56];
        file.seek(SeekFrom::Start(phoff + i * 56))
            .map_err(io_error(path))?;
        file.read_exact(&mut phdr).map_err(io_error(path))?;
        const PT_LOAD: u32 = 1;
        let p_type = u32::from_le_bytes([phdr[0], phdr[1], phdr[2], phdr[3]]);
        let p_paddr = u64_at(&phdr, 24);
        let p_offset = u64_at(&phdr, 8);
        let p_filesz = u64_at(&phdr, 32);
        let p_memsz = u64_at(&phdr, 40);
        if p_type != PT_LOAD {
            continue;
        }
        if p_filesz > 0 && p_paddr < BIOS_AREA_END {
            return Err(unsupported(
                path,
                format!("a segment loads at {p_paddr:#x}, below 1 MiB"),
            ));
        }
        if p_offset
            .checked_add(p_filesz)
            .is_none_or(|end| end > file_len)
        {
            return Err(unsupported(
                path,
                format!(
                    "truncated: a segment's {p_filesz} bytes at file offset {p_offset:#x} end past the file's {file_len} bytes"
                ),
            ));
        }
        need = need.max(p_paddr.saturating_add(p_memsz.max(p_filesz)));
    }
    if need > memory.lowmem {
        return Err(BootError::MemoryTooSmall {
            path: path.to_path_buf(),
            have: memory.lowmem,
            need,
        });
    }
    file.seek(SeekFrom::Start(0)).map_err(io_error(path))?;
    Ok(())
}

fn load_pvh(
    mem: &GuestMemoryMmap,
    path: &Path,
    file: &mut File,
    initrd: Option<&Path>,
    cmdline: &str,
    memory: &MemoryLayout,
) -> Result<BootEntry, BootError> {
    check_elf_segments(path, file, memory)?;
    let loaded = Elf::load(mem, None, file, None).map_err(|source| BootError::KernelLoad {
        path: path.to_path_buf(),
        source,
    })?;
    let entry = match loaded.pvh_boot_cap {
        PvhBootCapability::PvhEntryPresent(addr) => addr.0,
        _ => {
            return Err(unsupported(
                path,
                "ELF kernel without a PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY); use a bzImage",
            ))
        }
    };
    write_cmdline(mem, cmdline, CMDLINE_MAX)?;

    let mut start_info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC,
        version: 1,
        cmdline_paddr: CMDLINE_ADDR,
        memmap_paddr: PVH_MEMMAP_ADDR,
        ..Default::default()
    };
    let e820 = memory.e820();
    if e820.len() > PVH_MEMMAP_MAX_ENTRIES {
        return Err(BootError::InvalidPlatform(format!(
            "{} memory map entries do not fit the PVH table",
            e820.len()
        )));
    }
    let memmap: Vec<hvm_memmap_table_entry> = e820
        .iter()
        .map(|e| hvm_memmap_table_entry {
            addr: e.addr,
            size: e.size,
            type_: e.kind,
            reserved: 0,
        })
        .collect();
    start_info.memmap_entries = memmap.len() as u32;

    let mut params = BootParams::new(&start_info, GuestAddress(PVH_START_INFO_ADDR));
    params.set_sections(&memmap, GuestAddress(PVH_MEMMAP_ADDR));
    if let Some(initrd) = initrd {
        let (start, size) = load_initrd(mem, initrd, loaded.kernel_end, memory.lowmem)?;
        start_info.nr_modules = 1;
        start_info.modlist_paddr = PVH_MODLIST_ADDR;
        params = BootParams::new(&start_info, GuestAddress(PVH_START_INFO_ADDR));
        params.set_sections(&memmap, GuestAddress(PVH_MEMMAP_ADDR));
        params.set_modules(
            &[hvm_modlist_entry {
                paddr: start,
                size,
                cmdline_paddr: 0,
                reserved: 0,
            }],
            GuestAddress(PVH_MODLIST_ADDR),
        );
    }
    PvhBootConfigurator::write_bootparams(&params, mem).map_err(|_| BootError::GuestMemory {
        what: "PVH start info",
        addr: PVH_START_INFO_ADDR,
        len: std::mem::size_of::<hvm_start_info>(),
    })?;

    let gdt_limit = write_gdt(mem, false)?;
    Ok(BootEntry::Pvh {
        regs: X86BootRegs {
            rip: entry,
            rsi: 0,
            rbx: PVH_START_INFO_ADDR,
            rsp: 0,
            cr0: CR0_PE | CR0_ET,
            cr3: 0,
            cr4: 0,
            efer: 0,
            gdt_base: GDT_ADDR,
            gdt_limit,
            code_selector: BOOT_CODE_SELECTOR,
            data_selector: BOOT_DATA_SELECTOR,
            long_mode: false,
        },
    })
}
