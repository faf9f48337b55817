//! Bounded smoke run of the fuzz targets (`fuzz/`, run for real with
//! `cargo +nightly fuzz run <target>`): a few hundred inputs each, half
//! random bytes and half mutations of well-formed inputs (images built by
//! Debian's own tools, Debian-shaped grub.cfg and grubenv), must pass
//! without a panic or a hang.

mod common;

use common::*;
use rhyve_grub::fuzzing;
use rhyve_testutil::XorShift;
use std::alloc::{GlobalAlloc, Layout, System};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

const RUNS: usize = 400;

/// The largest single allocation any input made: a hostile image must
/// not get gigabytes out of grub-bhyve (the fuzz runs flag more than
/// 512 MiB as out of memory; so does this).
static LARGEST_ALLOCATION: AtomicUsize = AtomicUsize::new(0);
const ALLOCATION_LIMIT: usize = 512 << 20;

struct Watched;

// SAFETY: every call is passed to the system allocator unchanged.
unsafe impl GlobalAlloc for Watched {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LARGEST_ALLOCATION.fetch_max(layout.size(), Ordering::Relaxed);
        // SAFETY: the caller's layout, as GlobalAlloc::alloc requires.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: ptr came from System.alloc with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LARGEST_ALLOCATION.fetch_max(new_size, Ordering::Relaxed);
        // SAFETY: as for System.realloc, which gets the caller's arguments.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Watched = Watched;

fn assert_no_huge_allocation(what: &str) {
    let largest = LARGEST_ALLOCATION.load(Ordering::Relaxed);
    assert!(
        largest <= ALLOCATION_LIMIT,
        "{what}: an allocation of {largest} bytes"
    );
}

/// Values that trip size and offset arithmetic.
const INTERESTING: [u32; 8] = [0, 1, 0x7F, 0xFF, 0xFFFF, 0x8000_0000, 0xFFFF_FFFF, 0x1000];

/// `seed` with a few bytes flipped and a few little- and big-endian words
/// set to boundary values, mostly in the first `hot` bytes (the headers).
fn mutate(r: &mut XorShift, seed: &[u8], hot: usize) -> Vec<u8> {
    let mut d = seed.to_vec();
    if d.is_empty() {
        return d;
    }
    for _ in 0..1 + r.index(8) {
        let span = if r.index(4) == 0 {
            d.len()
        } else {
            hot.min(d.len())
        };
        let at = r.index(span);
        match r.index(3) {
            0 => d[at] ^= 1 << r.index(8),
            1 => d[at] = r.next_u64() as u8,
            _ => {
                let v = INTERESTING[r.index(INTERESTING.len())];
                let bytes = if r.index(2) == 0 {
                    v.to_le_bytes()
                } else {
                    v.to_be_bytes()
                };
                let end = (at + 4).min(d.len());
                d[at..end].copy_from_slice(&bytes[..end - at]);
            }
        }
    }
    if r.index(8) == 0 {
        d.truncate(r.index(d.len()));
    }
    d
}

fn smoke(name: &str, target: fn(&[u8]), seeds: &[Vec<u8>], hot: usize, seed: u64) {
    let mut r = XorShift(seed);
    let start = Instant::now();
    for i in 0..RUNS {
        let data = if i % 2 == 0 || seeds.is_empty() {
            let len = r.index(8192);
            (0..len).map(|_| r.next_u64() as u8).collect()
        } else {
            let s = &seeds[r.index(seeds.len())];
            if i % 10 == 1 {
                s.clone()
            } else {
                mutate(&mut r, s, hot)
            }
        };
        target(&data);
    }
    assert_no_huge_allocation(name);
    assert!(
        start.elapsed() < Duration::from_secs(240),
        "{name}: {RUNS} inputs took {:?}",
        start.elapsed()
    );
}

/// The image without its trailing zeros (the fuzz entry points zero-extend
/// an image to the size its header claims).
fn trimmed(path: &Path) -> Vec<u8> {
    let mut d = std::fs::read(path).unwrap();
    let end = d.iter().rposition(|&b| b != 0).map_or(0, |p| p + 1);
    d.truncate(end);
    d
}

/// A small tree of the shape grub-bhyve looks into.
fn tree(dir: &Path) -> PathBuf {
    let t = dir.join("tree");
    write(
        &t.join("boot/grub/grub.cfg"),
        debian_grub_cfg("hd0,msdos1").as_bytes(),
    );
    write(&t.join("boot/grub/grubenv"), &grubenv("next_entry=1\n"));
    write(&t.join("boot/vmlinuz"), &pattern("k", 5000));
    write(&t.join("boot/sub/dir/file.txt"), b"hello\n");
    std::fs::create_dir_all(t.join("empty")).unwrap();
    t
}

fn grubenv(body: &str) -> Vec<u8> {
    let mut b = b"# GRUB Environment Block\n".to_vec();
    b.extend_from_slice(body.as_bytes());
    b.resize(1024, b'#');
    b
}

#[test]
fn disk_images_and_partition_tables() {
    need_tools();
    let dir = scratch("fuzz-disk");
    let t = tree(&dir);
    let fat = dir.join("p.fat");
    mkfat(&fat, &t, 1, "ESP", 12);
    let disk = dir.join("mbr.img");
    sh(&format!(
        "truncate -s 3M '{d}' && printf 'label: dos\\nstart=2048, size=2048, type=c\\nstart=4096, size=2048, type=5\\n' | sfdisk -q '{d}'",
        d = disk.display()
    ));
    place(&disk, &fat, 1);
    let gpt = dir.join("gpt.img");
    sh(&format!(
        "truncate -s 3M '{d}' && printf 'label: gpt\\nstart=2048, size=2048, type=C12A7328-F81F-11D2-BA4B-00A0C93EC93B\\n' | sfdisk -q '{d}'",
        d = gpt.display()
    ));
    place(&gpt, &fat, 1);
    let seeds = vec![trimmed(&disk), trimmed(&gpt)];
    smoke("disk", fuzzing::disk, &seeds, 0x4400, 11);
}

#[test]
fn iso9660_images() {
    need_tools();
    let dir = scratch("fuzz-iso");
    let t = tree(&dir);
    let mut seeds = Vec::new();
    for (n, flags) in ["-R -J", "", "-J"].iter().enumerate() {
        let iso = dir.join(format!("{n}.iso"));
        sh(&format!(
            "xorriso -as mkisofs -quiet {flags} -V CDROM -o '{}' '{}'",
            iso.display(),
            t.display()
        ));
        seeds.push(trimmed(&iso));
    }
    smoke("iso9660", fuzzing::iso9660, &seeds, 0xA000, 12);
}

#[test]
fn ext_images() {
    need_tools();
    let dir = scratch("fuzz-ext");
    let t = tree(&dir);
    let mut seeds = Vec::new();
    for (n, kind) in ["ext2", "ext4"].iter().enumerate() {
        let img = dir.join(format!("{n}.img"));
        sh(&format!(
            "mke2fs -q -F -t {kind} -b 1024 -d '{}' '{}' 1M",
            t.display(),
            img.display()
        ));
        seeds.push(trimmed(&img));
    }
    smoke("ext", fuzzing::ext, &seeds, 0x2000, 13);
}

#[test]
fn xfs_images() {
    need_tools();
    let dir = scratch("fuzz-xfs");
    let img = dir.join("x.img");
    let files = [
        (
            "boot/grub/grub.cfg",
            debian_grub_cfg("hd0,msdos1").into_bytes(),
        ),
        ("boot/grub/grubenv", grubenv("next_entry=1\n")),
        ("boot/vmlinuz", pattern("k", 70_000)),
    ];
    mkxfs_sized(&img, &files, &[("vmlinuz", "boot/vmlinuz")], "fuzz", 16);
    smoke("xfs", fuzzing::xfs, &[trimmed(&img)], 0x1000, 14);
}

#[test]
fn fat_images() {
    need_tools();
    let dir = scratch("fuzz-fat");
    let t = tree(&dir);
    let mut seeds = Vec::new();
    for (n, (fat, mib)) in [(12, 1), (16, 16), (32, 33)].iter().enumerate() {
        let img = dir.join(format!("{n}.img"));
        mkfat(&img, &t, *mib, "FUZZ", *fat);
        seeds.push(trimmed(&img));
    }
    smoke("fat", fuzzing::fat, &seeds, 0x1000, 15);
}

#[test]
fn grub_cfg_scripts() {
    let mut seeds = vec![
        debian_grub_cfg("hd0,msdos1").into_bytes(),
        b"if [ \"${next_entry}\" ] ; then\n set default=\"${next_entry}\"\n set next_entry=\n save_env next_entry\nfi\nfunction f { echo $1 ${2}; return 3; }\nf a b; while [ x$i != xiii ]; do set i=${i}i; done\nfor a in 1 2 3; do echo $a; done\nmenuentry 'x' --id y { linux /k; initrd /i; boot }\nsubmenu s { menuentry t { true; } }\n".to_vec(),
    ];
    seeds.push(
        b"set a=\"b c\" ; echo -e \"\\n$a\\t\" '$a' \\$a ; ! false && true || false\n".to_vec(),
    );
    smoke("grub_cfg", fuzzing::grub_cfg, &seeds, 1 << 20, 16);
}

#[test]
fn grub_environment_blocks() {
    let seeds = vec![
        grubenv(""),
        grubenv("saved_entry=gnulinux-advanced>gnulinux-6.1\nnext_entry=2\n"),
        grubenv("a=\\\\b\\\nc\nd=\n#comment\ne=f\n"),
    ];
    smoke("envblk", fuzzing::envblk, &seeds, 1024, 17);
}

/// Every input a long fuzz run found (`tests/fuzz_regressions/TARGET-*`),
/// replayed through its target: each once crashed, hung or ran away.
#[test]
fn inputs_found_by_fuzzing() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fuzz_regressions");
    let mut seen = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let data = std::fs::read(&path).unwrap();
        let target: fn(&[u8]) = match name.split_once('-').map(|(t, _)| t) {
            Some("disk") => fuzzing::disk,
            Some("iso9660") => fuzzing::iso9660,
            Some("ext") => fuzzing::ext,
            Some("xfs") => fuzzing::xfs,
            Some("fat") => fuzzing::fat,
            Some("grub_cfg") => fuzzing::grub_cfg,
            Some("envblk") => fuzzing::envblk,
            _ => panic!("{name}: no fuzz target of that name"),
        };
        let start = Instant::now();
        target(&data);
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "{name} took {:?}",
            start.elapsed()
        );
        assert_no_huge_allocation(&name);
        seen += 1;
    }
    assert!(seen > 0);
}
