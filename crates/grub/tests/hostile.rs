//! Hostile input: truncated, corrupted and looping images, and configs
//! that recurse or never end, must give errors, never panics or hangs.

mod common;

use common::*;
use rhyve_grub::{partitions, probe, run, GrubError, Region, ScriptedConsole};
use rhyve_testutil::XorShift;
use std::path::Path;

/// Poke at everything a session could touch on an image.
fn exercise(path: &Path) {
    let Ok(region) = Region::open(path) else {
        return;
    };
    let mut regions = vec![region.clone()];
    regions.extend(partitions(&region).into_iter().map(|p| p.region));
    for r in regions {
        let Ok(fs) = probe(&r) else { continue };
        let _ = fs.label();
        let _ = fs.uuid();
        for dir in [
            "/",
            "/boot",
            "/boot/grub",
            "/install",
            "/isolinux",
            "/boot/boot/boot/boot",
            "/d",
        ] {
            if let Ok(entries) = fs.ls(dir) {
                for e in entries.iter().take(64) {
                    let p = format!("{}/{}", dir.trim_end_matches('/'), e.name);
                    if e.is_dir {
                        let _ = fs.ls(&p);
                    } else {
                        let _ = fs.read(&p);
                    }
                }
            }
        }
        for f in [
            "/boot/grub/grub.cfg",
            "/install/vmlinuz",
            "/etc/hostname",
            "/nonexistent",
            "/boot/k",
        ] {
            let _ = fs.read(f);
            let _ = fs.is_dir(f);
        }
    }
}

fn session(map: &Path, root: &str, keys: &[u8]) -> Result<rhyve_grub::BootSelection, GrubError> {
    let o = opts(map, root, &[]);
    let mut con = ScriptedConsole::new(keys);
    run(&o, &mut con)
}

#[test]
fn truncated_iso_at_every_interesting_length() {
    let dir = scratch("trunc-iso");
    let img = iso(&dir, "-R -J", "t");
    let full = std::fs::read(&img).unwrap();
    let cut = dir.join("cut.iso");
    let mut lens: Vec<usize> = vec![
        0,
        1,
        511,
        512,
        2048,
        16 * 2048,
        16 * 2048 + 100,
        17 * 2048,
        18 * 2048,
        19 * 2048,
    ];
    lens.extend((20..full.len() / 2048).step_by(3).map(|s| s * 2048 + 7));
    for len in lens {
        std::fs::write(&cut, &full[..len.min(full.len())]).unwrap();
        exercise(&cut);
    }
    let map = device_map(&dir, &[("cd0", &cut)]);
    std::fs::write(&cut, &full[..18 * 2048]).unwrap();
    let err = session(
        &map,
        "cd0",
        b"ls (cd0)/\rls (cd0)/boot\rlinux /install/vmlinuz\rboot\r",
    )
    .unwrap_err();
    assert!(matches!(err, GrubError::ConsoleClosed), "{err}");
}

fn find_all(hay: &[u8], needle: &[u8]) -> Vec<usize> {
    hay.windows(needle.len())
        .enumerate()
        .filter(|(_, w)| *w == needle)
        .map(|(i, _)| i)
        .collect()
}

#[test]
fn iso_with_huge_sizes_and_directory_loops() {
    let dir = scratch("evil-iso");
    let img = iso(&dir, "-R", "evil");
    let mut data = std::fs::read(&img).unwrap();
    // Every primary-tree record of VMLINUZ claims 4 GiB - 4 KiB.
    let hits = find_all(&data, b"VMLINUZ.;1");
    assert!(!hits.is_empty());
    for h in hits {
        let rec = h - 33;
        data[rec + 10..rec + 14].copy_from_slice(&0xFFFF_F000u32.to_le_bytes());
        data[rec + 14..rec + 18].copy_from_slice(&0xFFFF_F000u32.to_be_bytes());
    }
    // The BOOT directory points back at the root directory.
    let root_extent = u32::from_le_bytes(
        data[16 * 2048 + 156 + 2..16 * 2048 + 156 + 6]
            .try_into()
            .unwrap(),
    );
    let root_len = u32::from_le_bytes(
        data[16 * 2048 + 156 + 10..16 * 2048 + 156 + 14]
            .try_into()
            .unwrap(),
    );
    for h in find_all(&data, b"\x04BOOT") {
        let rec = h - 32;
        data[rec + 2..rec + 6].copy_from_slice(&root_extent.to_le_bytes());
        data[rec + 10..rec + 14].copy_from_slice(&root_len.to_le_bytes());
    }
    let evil = dir.join("evil2.iso");
    std::fs::write(&evil, &data).unwrap();
    exercise(&evil);
    let region = Region::open(&evil).unwrap();
    let fs = probe(&region).unwrap();
    let err = fs.read("/install/vmlinuz").unwrap_err();
    assert!(
        matches!(err, GrubError::TooLarge(..) | GrubError::BadFilesystem(_)),
        "{err}"
    );
    let looped = fs.ls("/boot/boot/boot/boot/boot").unwrap();
    assert!(looped.iter().any(|e| e.name == "isolinux"));
    let deep = "/boot".repeat(500);
    assert!(fs.ls(&deep).is_err(), "an over-long path is refused");
    let map = device_map(&dir, &[("cd0", &evil)]);
    let err = session(&map, "cd0", b"\x1b[B\r\r").unwrap_err();
    assert!(matches!(err, GrubError::ConsoleClosed), "{err}");
}

#[test]
fn random_disks_and_partition_tables() {
    let dir = scratch("random-disks");
    let path = dir.join("r.img");
    let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
    for round in 0..60 {
        let len = 4096 + (rng.next_u64() % (256 * 1024)) as usize;
        let mut d: Vec<u8> = (0..len).map(|_| rng.next_u64() as u8).collect();
        d[510] = 0x55;
        d[511] = 0xAA;
        if round % 3 == 0 {
            // A protective MBR and a GPT header with absurd counts.
            d[446 + 4] = 0xEE;
            d[512..520].copy_from_slice(b"EFI PART");
            d[512 + 80..512 + 84].copy_from_slice(&u32::MAX.to_le_bytes());
            d[512 + 84..512 + 88].copy_from_slice(&128u32.to_le_bytes());
        }
        if round % 3 == 1 {
            // An extended partition whose chain points at itself.
            d[446 + 4] = 0x05;
            d[446 + 8..446 + 12].copy_from_slice(&1u32.to_le_bytes());
            d[446 + 12..446 + 16].copy_from_slice(&4u32.to_le_bytes());
            d[1024 - 2] = 0x55;
            d[1024 - 1] = 0xAA;
            d[512 + 462 + 4] = 0x05;
            d[512 + 462 + 8..512 + 462 + 12].copy_from_slice(&0u32.to_le_bytes());
        }
        if round % 4 == 0 {
            // Something that looks like an ext superblock or a FAT BPB.
            if len > 2048 {
                d[1024 + 56] = 0x53;
                d[1024 + 57] = 0xEF;
            }
            d[11] = 0;
            d[12] = 2;
            d[13] = 1;
            d[16] = 2;
        }
        std::fs::write(&path, &d).unwrap();
        exercise(&path);
    }
}

#[test]
fn corrupted_filesystems() {
    let dir = scratch("corrupt-fs");
    let tree = dir.join("tree");
    debian_root_tree(&tree, "hd0,msdos1", &[]);
    let ext = dir.join("e.ext4");
    mkext4(&ext, &tree, 2, "e");
    let fat12 = dir.join("f12.fat");
    let small = dir.join("small");
    write(
        &small.join("BOOT/GRUB/GRUB.CFG"),
        b"menuentry x { linux /k }\n",
    );
    write(&small.join("K"), &pattern("k", 9000));
    mkfat(&fat12, &small, 2, "F12", 12);
    let fat32 = dir.join("f32.fat");
    mkfat(&fat32, &small, 36, "F32", 32);
    let iso = iso(&dir, "-R -J", "c");
    // XFS: the first 8 MiB of a fresh 300 MiB volume hold everything we read.
    let xfs_full = dir.join("x.xfs");
    let mut xfiles: Vec<(String, Vec<u8>)> = (0..200)
        .map(|i| (format!("d/entry-{i:03}"), vec![i as u8; 10]))
        .collect();
    xfiles.push((
        "boot/grub/grub.cfg".into(),
        b"menuentry x { linux /k }\n".to_vec(),
    ));
    xfiles.push(("k".into(), pattern("xk", 20000)));
    let xrefs: Vec<(&str, Vec<u8>)> = xfiles
        .iter()
        .map(|(p, d)| (p.as_str(), d.clone()))
        .collect();
    mkxfs(&xfs_full, &xrefs, &[("boot/k", "../k")], "x");
    let xfs = dir.join("x8.xfs");
    sh(&format!(
        "head -c 8M '{}' > '{}'",
        xfs_full.display(),
        xfs.display()
    ));
    let victim = dir.join("victim.img");
    let mut rng = XorShift(12345);
    for (img, span) in [
        (&ext, 96 * 1024usize),
        (&fat12, 16 * 1024),
        (&fat32, 48 * 1024),
        (&iso, 128 * 1024),
        (&xfs, 256 * 1024),
    ] {
        let orig = std::fs::read(img).unwrap();
        for _ in 0..25 {
            let mut d = orig.clone();
            for _ in 0..(1 + rng.next_u64() % 64) {
                let at = (rng.next_u64() as usize) % span.min(d.len());
                d[at] = rng.next_u64() as u8;
            }
            std::fs::write(&victim, &d).unwrap();
            exercise(&victim);
        }
        // Cut short.
        for len in [1024, 2048, 4096, 65536, orig.len() / 2] {
            std::fs::write(&victim, &orig[..len.min(orig.len())]).unwrap();
            exercise(&victim);
        }
    }
    // FAT32 whose root directory cluster chain loops on itself.
    let mut d = std::fs::read(&fat32).unwrap();
    let reserved = u16::from_le_bytes([d[14], d[15]]) as usize;
    let root_cluster = u32::from_le_bytes(d[44..48].try_into().unwrap()) as usize;
    let fat_at = reserved * 512 + root_cluster * 4;
    d[fat_at..fat_at + 4].copy_from_slice(&(root_cluster as u32).to_le_bytes());
    std::fs::write(&victim, &d).unwrap();
    exercise(&victim);
}

#[test]
fn configs_that_recurse_loop_or_break() {
    let dir = scratch("evil-cfg");
    let tree = dir.join("t");
    let cfgs: &[(&str, &str)] = &[
        ("recurse.cfg", "function f { f; }\nf\nmenuentry ok { linux /k }\nset timeout=0\n"),
        ("fork.cfg", "function f { f; f; }\nf\n"),
        ("spin.cfg", "while true; do true; done\n"),
        ("self.cfg", "source $prefix/self.cfg\nmenuentry ok { linux /k }\nset timeout=0\n"),
        ("loop.cfg", "menuentry again { configfile $prefix/loop.cfg }\nset timeout=0\n"),
        ("broken.cfg", "if true; then\nmenuentry 'x {\n"),
        ("nest.cfg", &"if true; then ".repeat(2000)),
        ("vars.cfg", "set a=${\nset b=$\necho ${a}${b}${}$$\nmenuentry \"$a\" --id { linux /k \"$b\" }\nset default=--id\nset timeout=0\n"),
    ];
    for (name, text) in cfgs {
        write(&tree.join("boot/grub").join(name), text.as_bytes());
    }
    write(&tree.join("k"), &fake_kernel("kernel", 0));
    let ext = dir.join("t.ext4");
    mkext4(&ext, &tree, 4, "t");
    let map = device_map(&dir, &[("hd0", &ext)]);
    for (name, _) in cfgs {
        let o = opts(&map, "hd0", &["-g", name]);
        let mut con = ScriptedConsole::new(b"");
        let r = run(&o, &mut con);
        let out = con.output_text();
        match *name {
            "recurse.cfg" | "self.cfg" | "vars.cfg" => {
                let sel = r.unwrap_or_else(|e| panic!("{name}: {e}\n{out}"));
                assert_eq!(sel.kernel, fake_kernel("kernel", 0), "{name}");
                assert!(
                    out.contains("nested deeper than") || *name == "vars.cfg",
                    "{name}: {out}"
                );
            }
            "fork.cfg" | "spin.cfg" => {
                let e = r.unwrap_err();
                assert!(e.to_string().contains("statements"), "{name}: {e}");
            }
            _ => assert!(r.is_err(), "{name}"),
        }
    }
}

#[test]
fn guest_configs_cannot_reach_host_files() {
    let dir = scratch("no-host");
    let tree = dir.join("t");
    write(
        &tree.join("boot/grub/grub.cfg"),
        b"menuentry steal { linux /k\n initrd (host)/etc/hostname\n }\nset timeout=0\n",
    );
    write(&tree.join("k"), &fake_kernel("kernel", 0));
    let ext = dir.join("t.ext4");
    mkext4(&ext, &tree, 4, "t");
    let map = device_map(&dir, &[("hd0", &ext)]);
    let o = opts(&map, "hd0", &[]);
    let mut con = ScriptedConsole::new(b"");
    let sel = run(&o, &mut con).unwrap();
    let out = con.output_text();
    assert!(out.contains("error: no such device: host."), "{out}");
    assert!(sel.initrd.is_empty(), "a host file reached the VM");
    // With -r host, (host) is the root, as in grub-emu.
    let host_cfg = format!(
        "menuentry h {{ linux {k}\n initrd {i}\n }}\nset timeout=0\n",
        k = tree.join("k").display(),
        i = tree.join("boot/grub/grub.cfg").display()
    );
    write(&tree.join("host.cfg"), host_cfg.as_bytes());
    let tree_dir = tree.display().to_string();
    let o = opts(&map, "host", &["-d", &tree_dir, "-g", "host.cfg"]);
    let mut con = ScriptedConsole::new(b"");
    let sel = run(&o, &mut con).unwrap_or_else(|e| panic!("{e}: {}", con.output_text()));
    assert_eq!(sel.kernel, fake_kernel("kernel", 0));
    assert!(sel.initrd == padded(&std::fs::read(tree.join("boot/grub/grub.cfg")).unwrap()));
}
