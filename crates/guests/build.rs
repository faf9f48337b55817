//! Builds every test guest in `guest/` with gcc into `OUT_DIR/<name>.elf`,
//! and the full Linux boot's `/init` (`linux-init/init.c`, a static x86-64
//! Linux program without libc) into `OUT_DIR/linux-init`.
//!
//! Each guest is the shared runtime (`start.S`, `trampoline.S`, `rt.c`)
//! plus `guest/<name>.c`, compiled as freestanding 32-bit code (no libc
//! headers beyond gcc's own stdint/stdarg), linked at 1 MiB as ELF32 and
//! converted to ELF64: rhyve's PVH loader (linux-loader) reads ELF64 only,
//! and the entry is 32-bit code either way.

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

const RUNTIME: &[&str] = &["start.S", "trampoline.S", "rt.c"];

const CFLAGS: &[&str] = &[
    "-m32",
    "-march=i686",
    "-std=gnu11",
    "-ffreestanding",
    "-fno-builtin",
    "-fno-pic",
    "-fno-pie",
    "-fno-stack-protector",
    "-fno-asynchronous-unwind-tables",
    "-fno-exceptions",
    // No SSE/x87 state: the guest never sets it up, and some of the set-up
    // instructions end the guest on this host's KVM.
    "-mno-sse",
    "-mno-mmx",
    "-mno-80387",
    "-mgeneral-regs-only",
    "-O2",
    "-Wall",
    "-Wextra",
    "-Werror",
];

fn run(cmd: &mut Command) {
    let shown = format!("{cmd:?}");
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {shown}: {e} (the guests need gcc and binutils)"));
    if !out.status.success() {
        panic!(
            "{shown} failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

fn compile(src_dir: &Path, out_dir: &Path, source: &str) -> PathBuf {
    let obj = out_dir.join(format!("{source}.o"));
    run(Command::new("gcc")
        .args(CFLAGS)
        .arg("-I")
        .arg(src_dir)
        .arg("-c")
        .arg(src_dir.join(source))
        .arg("-o")
        .arg(&obj));
    obj
}

fn main() {
    let src_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap()).join("guest");
    let out_dir = PathBuf::from(env::var("OUT_DIR").unwrap());
    println!("cargo:rerun-if-changed={}", src_dir.display());
    build_linux_init(&src_dir.with_file_name("linux-init"), &out_dir);
    build_roms(&src_dir.with_file_name("rom"), &out_dir);
    for entry in std::fs::read_dir(&src_dir).unwrap() {
        println!("cargo:rerun-if-changed={}", entry.unwrap().path().display());
    }

    // Every guest/<name>.c but the runtime is a guest program; src/lib.rs
    // includes the list written here.
    let mut guests: Vec<String> = std::fs::read_dir(&src_dir)
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter_map(|n| n.strip_suffix(".c").map(str::to_string))
        .filter(|n| !RUNTIME.contains(&format!("{n}.c").as_str()))
        .collect();
    guests.sort();
    std::fs::write(
        out_dir.join("guests.rs"),
        format!("/// Every guest program, by name (`guest/<name>.c`).\npub const GUESTS: &[&str] = &{guests:?};\n"),
    )
    .unwrap();

    let runtime: Vec<PathBuf> = RUNTIME
        .iter()
        .map(|s| compile(&src_dir, &out_dir, s))
        .collect();
    for guest in &guests {
        let obj = compile(&src_dir, &out_dir, &format!("{guest}.c"));
        let elf32 = out_dir.join(format!("{guest}.elf32"));
        run(Command::new("ld")
            .args(["-m", "elf_i386", "-nostdlib", "--no-warn-rwx-segments"])
            .arg("-T")
            .arg(src_dir.join("link.ld"))
            .arg("-o")
            .arg(&elf32)
            .args(&runtime)
            .arg(&obj));
        run(Command::new("objcopy")
            .args(["-I", "elf32-i386", "-O", "elf64-x86-64"])
            .arg(&elf32)
            .arg(out_dir.join(format!("{guest}.elf"))));
    }
}

/// Every `rom/<name>.S` as a flat boot ROM image `OUT_DIR/<name>.rom`,
/// linked at 0 (the sources add the address they run at themselves).
fn build_roms(dir: &Path, out_dir: &Path) {
    println!("cargo:rerun-if-changed={}", dir.display());
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        println!("cargo:rerun-if-changed={}", path.display());
        let Some(name) = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_suffix(".S"))
        else {
            continue;
        };
        let obj = out_dir.join(format!("{name}.rom.o"));
        run(Command::new("gcc")
            .args(["-m32", "-c"])
            .arg(&path)
            .arg("-o")
            .arg(&obj));
        run(Command::new("ld")
            .args(["-m", "elf_i386", "-nostdlib", "-Ttext=0", "-e", "_start"])
            .args(["--oformat", "binary", "-o"])
            .arg(out_dir.join(format!("{name}.rom")))
            .arg(&obj));
    }
}

/// `linux-init/init.c` as a static, libc-free x86-64 executable laid out by
/// `linux-init/init.ld` (its landing page at address 0).
fn build_linux_init(dir: &Path, out_dir: &Path) {
    for file in ["init.c", "init.ld"] {
        println!("cargo:rerun-if-changed={}", dir.join(file).display());
    }
    run(Command::new("gcc")
        .args([
            "-static",
            "-nostdlib",
            "-ffreestanding",
            "-fno-builtin",
            "-fno-pie",
            "-no-pie",
            "-fno-stack-protector",
            "-fno-asynchronous-unwind-tables",
            "-mgeneral-regs-only",
            "-O2",
            "-Wall",
            "-Wextra",
            "-Werror",
            "-Wl,--build-id=none",
            "-Wl,-z,noexecstack",
            "-Wl,--no-warn-rwx-segments",
        ])
        .arg(format!("-Wl,-T,{}", dir.join("init.ld").display()))
        .arg("-o")
        .arg(out_dir.join("linux-init"))
        .arg(dir.join("init.c")));
    repeat_cstar_stubs(&out_dir.join("linux-init"));
}

/// Where init.ld puts the block of CSTAR stubs, its size, and how many
/// times it is mapped back to back (see init.c).
const CSTAR_STUBS_BASE: u64 = 0x8100_0000;
const CSTAR_STUBS_BLOCK: u64 = 256 << 10;
const CSTAR_STUBS_BLOCKS: u64 = 64;

/// Adds program headers that map the CSTAR stub block's file bytes again at
/// each following block, so one block of file covers the whole range. The
/// new program header table goes at the end of the file; Linux reads at
/// most a page of program headers (73 of them).
fn repeat_cstar_stubs(elf: &Path) {
    const PT_LOAD: u32 = 1;
    const PHDR_SIZE: usize = 56;
    let mut image = std::fs::read(elf).unwrap();
    let u16_at = |b: &[u8], at: usize| u16::from_le_bytes(b[at..at + 2].try_into().unwrap());
    let u32_at = |b: &[u8], at: usize| u32::from_le_bytes(b[at..at + 4].try_into().unwrap());
    let u64_at = |b: &[u8], at: usize| u64::from_le_bytes(b[at..at + 8].try_into().unwrap());
    let phoff = u64_at(&image, 0x20) as usize;
    let phnum = usize::from(u16_at(&image, 0x38));
    assert_eq!(usize::from(u16_at(&image, 0x36)), PHDR_SIZE);
    let mut table = image[phoff..phoff + phnum * PHDR_SIZE].to_vec();
    let stubs = (0..phnum)
        .map(|i| &table[i * PHDR_SIZE..(i + 1) * PHDR_SIZE])
        .find(|h| u32_at(h, 0) == PT_LOAD && u64_at(h, 16) == CSTAR_STUBS_BASE)
        .expect("linux-init: no program header for the CSTAR stubs")
        .to_vec();
    assert_eq!(
        u64_at(&stubs, 32),
        CSTAR_STUBS_BLOCK,
        "CSTAR stub block size"
    );
    for block in 1..CSTAR_STUBS_BLOCKS {
        let mut header = stubs.clone();
        let vaddr = CSTAR_STUBS_BASE + block * CSTAR_STUBS_BLOCK;
        header[16..24].copy_from_slice(&vaddr.to_le_bytes());
        header[24..32].copy_from_slice(&vaddr.to_le_bytes());
        table.extend_from_slice(&header);
    }
    assert!(
        table.len() <= 4096,
        "Linux reads at most 4 KiB of program headers"
    );
    while !image.len().is_multiple_of(8) {
        image.push(0);
    }
    let new_phoff = image.len() as u64;
    image.extend_from_slice(&table);
    image[0x20..0x28].copy_from_slice(&new_phoff.to_le_bytes());
    let new_phnum = (table.len() / PHDR_SIZE) as u16;
    image[0x38..0x3a].copy_from_slice(&new_phnum.to_le_bytes());
    std::fs::write(elf, image).unwrap();
}
