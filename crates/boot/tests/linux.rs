//! Loader tests with kernels built here: a minimal bzImage (boot protocol
//! 2.15 header, payload after one setup sector) and a 64-bit ELF with a
//! PVH entry note, both byte-built.

use std::path::{Path, PathBuf};

use rhyve_boot::{load_linux, BootEntry, BootError};
use rhyve_platform::layout::MemoryLayout;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const MIB: u64 = 1 << 20;

struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("rhyve-boot-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }

    fn file(&self, name: &str, bytes: &[u8]) -> PathBuf {
        let p = self.0.join(name);
        std::fs::write(&p, bytes).unwrap();
        p
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn guest(memory: &MemoryLayout) -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), memory.lowmem as usize)]).unwrap()
}

fn put(b: &mut [u8], offset: usize, v: &[u8]) {
    b[offset..offset + v.len()].copy_from_slice(v);
}

/// A bzImage: 1 setup sector after the boot sector, then `payload`.
fn bzimage(payload: &[u8], version: u16, xloadflags: u16) -> Vec<u8> {
    let mut b = vec![0u8; 1024];
    b[0x1F1] = 1; // setup_sects
    put(&mut b, 0x1FE, &0xAA55u16.to_le_bytes());
    put(&mut b, 0x202, b"HdrS");
    put(&mut b, 0x206, &version.to_le_bytes());
    b[0x211] = 0x01; // LOADED_HIGH
    put(&mut b, 0x214, &0x10_0000u32.to_le_bytes()); // code32_start
    put(&mut b, 0x22C, &0x37FF_FFFFu32.to_le_bytes()); // initrd_addr_max
    put(&mut b, 0x230, &0x20_0000u32.to_le_bytes()); // kernel_alignment
    b[0x234] = 1; // relocatable
    put(&mut b, 0x236, &xloadflags.to_le_bytes());
    put(&mut b, 0x238, &2048u32.to_le_bytes()); // cmdline_size
    put(&mut b, 0x258, &0x100_0000u64.to_le_bytes()); // pref_address
    put(&mut b, 0x260, &0x80_0000u32.to_le_bytes()); // init_size
    put(
        &mut b,
        0x1F4,
        &(payload.len().div_ceil(16) as u32).to_le_bytes(),
    ); // syssize
    b.extend_from_slice(payload);
    b
}

/// A 64-bit ELF with one PT_LOAD at `paddr` and, if `pvh_entry` is set, a
/// PT_NOTE holding XEN_ELFNOTE_PHYS32_ENTRY.
fn pvh_elf(paddr: u64, code: &[u8], pvh_entry: Option<u32>) -> Vec<u8> {
    let phnum: u16 = 2;
    let data_off = 64 + 56 * u64::from(phnum);
    let mut note = Vec::new();
    note.extend_from_slice(&4u32.to_le_bytes()); // namesz "Xen\0"
    note.extend_from_slice(&4u32.to_le_bytes()); // descsz
    note.extend_from_slice(&(if pvh_entry.is_some() { 18u32 } else { 1 }).to_le_bytes());
    note.extend_from_slice(b"Xen\0");
    note.extend_from_slice(&pvh_entry.unwrap_or(0).to_le_bytes());
    let note_off = data_off;
    let code_off = note_off + note.len() as u64;

    let mut e = vec![0u8; 64];
    put(&mut e, 0, b"\x7fELF");
    e[4] = 2; // 64-bit
    e[5] = 1; // little endian
    e[6] = 1;
    put(&mut e, 16, &2u16.to_le_bytes()); // ET_EXEC
    put(&mut e, 18, &0x3Eu16.to_le_bytes()); // x86-64
    put(&mut e, 20, &1u32.to_le_bytes());
    put(&mut e, 24, &0xFFFF_FFFF_8100_0000u64.to_le_bytes()); // e_entry (virtual)
    put(&mut e, 32, &64u64.to_le_bytes()); // e_phoff
    put(&mut e, 52, &64u16.to_le_bytes());
    put(&mut e, 54, &56u16.to_le_bytes());
    put(&mut e, 56, &phnum.to_le_bytes());

    let phdr = |p_type: u32, offset: u64, paddr: u64, size: u64| {
        let mut p = vec![0u8; 56];
        put(&mut p, 0, &p_type.to_le_bytes());
        put(&mut p, 4, &5u32.to_le_bytes());
        put(&mut p, 8, &offset.to_le_bytes());
        put(&mut p, 16, &(paddr | 0xFFFF_FFFF_8000_0000).to_le_bytes());
        put(&mut p, 24, &paddr.to_le_bytes());
        put(&mut p, 32, &size.to_le_bytes());
        put(&mut p, 40, &size.to_le_bytes());
        put(&mut p, 48, &4u64.to_le_bytes());
        p
    };
    e.extend(phdr(1, code_off, paddr, code.len() as u64));
    e.extend(phdr(4, note_off, 0, note.len() as u64));
    e.extend(note);
    e.extend_from_slice(code);
    e
}

fn read_u64(mem: &GuestMemoryMmap, addr: u64) -> u64 {
    mem.read_obj::<u64>(GuestAddress(addr)).unwrap()
}

fn read_u32(mem: &GuestMemoryMmap, addr: u64) -> u32 {
    mem.read_obj::<u32>(GuestAddress(addr)).unwrap()
}

fn read_cstr(mem: &GuestMemoryMmap, addr: u64) -> String {
    let mut out = Vec::new();
    for i in 0.. {
        let b: u8 = mem.read_obj(GuestAddress(addr + i)).unwrap();
        if b == 0 {
            break;
        }
        out.push(b);
    }
    String::from_utf8(out).unwrap()
}

#[test]
fn bzimage_boots_in_long_mode_with_zero_page_initrd_and_cmdline() {
    let s = Scratch::new("bz");
    let memory = MemoryLayout::new(256 * MIB);
    let mem = guest(&memory);
    let payload: Vec<u8> = (0..4096u32).map(|i| (i * 7) as u8).collect();
    let kernel = s.file("bzImage", &bzimage(&payload, 0x020F, 0x1 | 0x2));
    let initrd_bytes = vec![0x5Au8; 10_000];
    let initrd = s.file("initrd", &initrd_bytes);

    let entry = load_linux(
        &mem,
        &kernel,
        Some(&initrd),
        "console=ttyS0 root=/dev/vda",
        &memory,
    )
    .unwrap();
    let BootEntry::Linux64 { regs } = entry else {
        panic!("expected a 64-bit entry, got {entry:?}");
    };
    assert_eq!(regs.rip, 0x10_0200);
    assert!(regs.long_mode);
    assert_eq!(regs.efer & 0x500, 0x500);
    assert_eq!(regs.cr4 & 0x20, 0x20);
    assert_eq!(regs.cr0 & 0x8000_0001, 0x8000_0001);
    assert_eq!((regs.code_selector, regs.data_selector), (0x10, 0x18));

    // The protected-mode kernel is at 1 MiB.
    let mut loaded = vec![0u8; payload.len()];
    mem.read_slice(&mut loaded, GuestAddress(0x10_0000))
        .unwrap();
    assert_eq!(loaded, payload);

    // Zero page.
    let zp = regs.rsi;
    assert!(zp + 4096 <= 0xA_0000);
    assert_eq!(read_u32(&mem, zp + 0x202), 0x5372_6448, "HdrS");
    let loader_type: u8 = mem.read_obj(GuestAddress(zp + 0x210)).unwrap();
    assert_eq!(loader_type, 0xFF);
    let cmd_ptr = read_u32(&mem, zp + 0x228) as u64;
    assert_eq!(read_cstr(&mem, cmd_ptr), "console=ttyS0 root=/dev/vda");
    let ramdisk = read_u32(&mem, zp + 0x218) as u64;
    let ramdisk_size = read_u32(&mem, zp + 0x21C) as u64;
    assert_eq!(ramdisk_size, initrd_bytes.len() as u64);
    assert_eq!(ramdisk % 4096, 0);
    assert!(ramdisk + ramdisk_size <= memory.lowmem);
    assert!(
        ramdisk >= 0x100_0000 + 0x80_0000,
        "clear of the kernel's init_size"
    );
    assert!(
        memory.lowmem - (ramdisk + ramdisk_size) < 4096,
        "at the top of RAM"
    );
    let mut rd = vec![0u8; initrd_bytes.len()];
    mem.read_slice(&mut rd, GuestAddress(ramdisk)).unwrap();
    assert_eq!(rd, initrd_bytes);

    // e820 matches the layout.
    let entries: u8 = mem.read_obj(GuestAddress(zp + 0x1E8)).unwrap();
    let e820 = memory.e820();
    assert_eq!(entries as usize, e820.len());
    for (i, e) in e820.iter().enumerate() {
        let at = zp + 0x2D0 + 20 * i as u64;
        assert_eq!(read_u64(&mem, at), e.addr);
        assert_eq!(read_u64(&mem, at + 8), e.size);
        assert_eq!(read_u32(&mem, at + 16), e.kind);
    }

    // Identity map: PML4 -> PDPT -> 4 PDs of 2 MiB pages.
    let pml4 = regs.cr3;
    let pdpt = read_u64(&mem, pml4) & !0xFFF;
    for gib in 0..4u64 {
        let pd = read_u64(&mem, pdpt + 8 * gib);
        assert_eq!(pd & 1, 1);
        let pd = pd & !0xFFF;
        for j in [0u64, 1, 511] {
            let pte = read_u64(&mem, pd + 8 * j);
            assert_eq!(pte, ((gib * 512 + j) << 21) | 0x83);
        }
    }
    for table in [pml4, pdpt] {
        assert!(table + 4096 <= 0xA_0000);
    }

    // GDT: 64-bit code at 0x10, data at 0x18, busy TSS at 0x20.
    assert_eq!(regs.gdt_limit, 39);
    assert_eq!(read_u64(&mem, regs.gdt_base + 0x10), 0x00AF_9B00_0000_FFFF);
    assert_eq!(read_u64(&mem, regs.gdt_base + 0x18), 0x00CF_9300_0000_FFFF);
    assert_eq!(read_u64(&mem, regs.gdt_base + 0x20), 0x0000_8B00_0000_0067);
}

#[test]
fn bzimage_without_64bit_entry_is_refused() {
    let s = Scratch::new("bz32");
    let memory = MemoryLayout::new(64 * MIB);
    let mem = guest(&memory);
    let kernel = s.file("bzImage", &bzimage(&[0x90; 512], 0x020F, 0));
    let err = load_linux(&mem, &kernel, None, "", &memory).unwrap_err();
    assert!(matches!(err, BootError::UnsupportedKernel { .. }), "{err}");
    let kernel = s.file("old", &bzimage(&[0x90; 512], 0x0206, 1));
    assert!(load_linux(&mem, &kernel, None, "", &memory).is_err());
}

#[test]
fn bad_inputs_are_errors() {
    let s = Scratch::new("bad");
    let memory = MemoryLayout::new(64 * MIB);
    let mem = guest(&memory);
    let junk = s.file("junk", b"this is not a kernel");
    assert!(matches!(
        load_linux(&mem, &junk, None, "", &memory),
        Err(BootError::UnsupportedKernel { .. })
    ));
    let junk = s.file("junk-long", &[0x5Au8; 4096]);
    let err = load_linux(&mem, &junk, None, "", &memory).unwrap_err();
    assert!(err.to_string().contains("no \"HdrS\""), "{err}");
    let empty = s.file("empty", b"");
    assert!(load_linux(&mem, &empty, None, "", &memory).is_err());
    assert!(matches!(
        load_linux(&mem, Path::new("/nonexistent/kernel"), None, "", &memory),
        Err(BootError::KernelFile(_))
    ));

    let kernel = s.file("bzImage", &bzimage(&[0x90; 512], 0x020F, 1));
    let long = "x".repeat(4096);
    assert!(matches!(
        load_linux(&mem, &kernel, None, &long, &memory),
        Err(BootError::Cmdline(_))
    ));
    let huge = s.file("huge-initrd", &vec![0u8; 60 * MIB as usize]);
    assert!(matches!(
        load_linux(&mem, &kernel, Some(&huge), "", &memory),
        Err(BootError::InitrdTooLarge { .. })
    ));
    let small = MemoryLayout::new(16 * MIB);
    let small_mem = guest(&small);
    let err = load_linux(&small_mem, &kernel, None, "", &small).unwrap_err();
    assert!(matches!(err, BootError::MemoryTooSmall { .. }), "{err}");
    // pref_address 16 MiB + init_size 8 MiB.
    assert!(
        err.to_string().contains("needs 24 MiB") && err.to_string().contains("has 16 MiB"),
        "{err}"
    );

    // A bzImage cut short of what its header announces.
    let mut cut = bzimage(&[0x90; 4096], 0x020F, 1);
    cut.truncate(cut.len() - 100);
    let cut = s.file("cut", &cut);
    let err = load_linux(&mem, &cut, None, "", &memory).unwrap_err();
    assert!(err.to_string().contains("truncated"), "{err}");
    // An ELF whose segment ends past the file.
    let mut elf = pvh_elf(0x20_0000, &[0xF4u8; 64], Some(0x20_0010));
    elf.truncate(elf.len() - 10);
    let elf = s.file("cut-elf", &elf);
    let err = load_linux(&mem, &elf, None, "", &memory).unwrap_err();
    assert!(err.to_string().contains("truncated"), "{err}");
    // An ELF too big for the RAM.
    let elf = s.file(
        "high-elf",
        &pvh_elf(0x7F0_0000, &[0xF4u8; 64], Some(0x7F0_0010)),
    );
    let err = load_linux(&small_mem, &elf, None, "", &small).unwrap_err();
    assert!(matches!(err, BootError::MemoryTooSmall { .. }), "{err}");
}

#[test]
fn pvh_elf_boots_in_protected_mode_with_start_info() {
    let s = Scratch::new("pvh");
    let memory = MemoryLayout::new(128 * MIB);
    let mem = guest(&memory);
    let code = [0xF4u8; 64]; // hlt
    let kernel = s.file("vmlinux", &pvh_elf(0x20_0000, &code, Some(0x20_0010)));
    let initrd = s.file("initrd", &[0xA5u8; 3000]);
    let entry = load_linux(&mem, &kernel, Some(&initrd), "console=hvc0", &memory).unwrap();
    let BootEntry::Pvh { regs } = entry else {
        panic!("expected a PVH entry, got {entry:?}");
    };
    assert_eq!(regs.rip, 0x20_0010);
    assert!(!regs.long_mode);
    assert_eq!(regs.cr0 & 0x8000_0001, 1, "protected mode, paging off");
    assert_eq!(regs.efer, 0);
    assert_eq!(read_u64(&mem, regs.gdt_base + 0x10), 0x00CF_9B00_0000_FFFF);
    let mut loaded = [0u8; 64];
    mem.read_slice(&mut loaded, GuestAddress(0x20_0000))
        .unwrap();
    assert_eq!(loaded, code);

    let si = regs.rbx;
    assert_eq!(read_u32(&mem, si), 0x336E_C578);
    assert_eq!(read_u32(&mem, si + 4), 1);
    assert_eq!(read_u32(&mem, si + 12), 1, "one module");
    let modlist = read_u64(&mem, si + 16);
    assert_eq!(read_cstr(&mem, read_u64(&mem, si + 24)), "console=hvc0");
    let memmap = read_u64(&mem, si + 40);
    let entries = read_u32(&mem, si + 48) as usize;
    let e820 = memory.e820();
    assert_eq!(entries, e820.len());
    for (i, e) in e820.iter().enumerate() {
        let at = memmap + 24 * i as u64;
        assert_eq!(read_u64(&mem, at), e.addr);
        assert_eq!(read_u64(&mem, at + 8), e.size);
        assert_eq!(read_u32(&mem, at + 16), e.kind);
    }
    let paddr = read_u64(&mem, modlist);
    assert_eq!(read_u64(&mem, modlist + 8), 3000);
    assert_eq!(paddr % 4096, 0);
    let b: u8 = mem.read_obj(GuestAddress(paddr + 2999)).unwrap();
    assert_eq!(b, 0xA5);
}

#[test]
fn elf_without_pvh_note_or_loading_low_is_refused() {
    let s = Scratch::new("elf");
    let memory = MemoryLayout::new(64 * MIB);
    let mem = guest(&memory);
    let no_note = s.file("nonote", &pvh_elf(0x20_0000, &[0xF4; 16], None));
    assert!(matches!(
        load_linux(&mem, &no_note, None, "", &memory),
        Err(BootError::UnsupportedKernel { .. })
    ));
    let low = s.file("low", &pvh_elf(0x8000, &[0xF4; 16], Some(0x8000)));
    assert!(matches!(
        load_linux(&mem, &low, None, "", &memory),
        Err(BootError::UnsupportedKernel { .. })
    ));
}
