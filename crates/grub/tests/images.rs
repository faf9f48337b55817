//! End-to-end: real images (built with Debian's tools), real configs,
//! and the exact bytes and command line of what gets chosen.

mod common;

use common::*;
use rhyve_grub::{run, BootSelection, ScriptedConsole};

fn boot(map: &std::path::Path, root: &str, extra: &[&str], keys: &[u8]) -> (BootSelection, String) {
    let o = opts(map, root, extra);
    let mut con = ScriptedConsole::new(keys);
    let sel = run(&o, &mut con)
        .unwrap_or_else(|e| panic!("run failed: {e}\nconsole:\n{}", con.output_text()));
    (sel, con.output_text())
}

fn debian_cmdline(kver: &str, extra: &str) -> String {
    let args = if extra.is_empty() {
        "ro quiet".to_string()
    } else {
        format!("ro {extra} quiet")
    };
    format!("console=ttyS0 BOOT_IMAGE=/boot/vmlinuz-{kver} root=UUID={EXT_UUID} {args}")
}

#[test]
fn mbr_ext4_debian_default_after_timeout() {
    let dir = scratch("mbr-default");
    let disk = mbr_disk(&dir);
    let map = device_map(&dir, &[("hd0", &disk)]);
    let (sel, out) = boot(&map, "hd0,msdos1", &[], b"");
    assert_eq!(sel.menu_title.as_deref(), Some("Debian GNU/Linux"));
    assert!(sel.kernel == kernel(), "sel.kernel differs");
    assert!(sel.initrd == padded(&initrd()), "sel.initrd differs");
    assert_eq!(sel.kernel_path, format!("/boot/vmlinuz-{KVER}"));
    assert_eq!(sel.initrd_paths, vec![format!("/boot/initrd.img-{KVER}")]);
    assert_eq!(sel.cmdline, debian_cmdline(KVER, ""));
    assert!(
        out.contains("Advanced options for Debian GNU/Linux>"),
        "{out}"
    );
    assert!(out.contains("executed automatically in 5s"), "{out}");
    assert!(out.contains("Loading Linux 6.1.0-13-amd64 ..."), "{out}");
    // Nothing in Debian's config is an unknown command here.
    assert!(!out.contains("can't find command"), "{out}");
}

#[test]
fn mbr_ext4_debian_by_keys_into_submenu() {
    let dir = scratch("mbr-keys");
    let disk = mbr_disk(&dir);
    let map = device_map(&dir, &[("hd0", &disk)]);
    // Down, Enter (the submenu), Down, Down, Enter (the older kernel).
    let (sel, _) = boot(&map, "hd0,msdos1", &["-n"], b"\x1b[B\r\x1b[B\x1b[B\r");
    assert_eq!(
        sel.menu_title.as_deref(),
        Some(format!("Debian GNU/Linux, with Linux {OLD_KVER}").as_str())
    );
    assert!(sel.kernel == old_kernel(), "sel.kernel differs");
    assert!(sel.initrd == padded(&old_initrd()), "sel.initrd differs");
    // -n: no console=ttyS0 inserted.
    assert_eq!(
        sel.cmdline,
        format!("BOOT_IMAGE=/boot/vmlinuz-{OLD_KVER} root=UUID={EXT_UUID} ro quiet")
    );
}

#[test]
fn mbr_ext4_default_by_title_path_and_saved() {
    let dir = scratch("mbr-title");
    let disk = mbr_disk(&dir);
    let map = device_map(&dir, &[("hd0", &disk)]);
    let (sel, _) = boot(&map, "hd0,msdos1", &["-g", "bytitle.cfg"], b"");
    assert_eq!(
        sel.menu_title.as_deref(),
        Some(format!("Debian GNU/Linux, with Linux {KVER} (recovery mode)").as_str())
    );
    assert_eq!(sel.cmdline, debian_cmdline(KVER, "single"));
    assert!(sel.kernel == kernel(), "sel.kernel differs");

    let (sel, _) = boot(&map, "hd0,msdos1", &["--grub-cfg=saved.cfg"], b"");
    assert!(sel.kernel == old_kernel(), "sel.kernel differs");
    assert_eq!(sel.cmdline, debian_cmdline(OLD_KVER, ""));
}

#[test]
fn mbr_prompt_lists_partitions_and_logical_fat() {
    let dir = scratch("mbr-prompt");
    let disk = mbr_disk(&dir);
    let map = device_map(&dir, &[("hd0", &disk)]);
    let keys = b"c\
ls\r\
ls (hd0,msdos1)\r\
ls (hd0,msdos5)/data\r\
cat (hd0,msdos5)/DATA/readme.txt\r\
search --label LOGICAL\r\
linux (hd0,msdos1)/boot/vmlinuz-6.1.0-13-amd64 root=/dev/vda1\r\
initrd /boot/initrd.img-6.1.0-13-amd64 /boot/initrd.img-5.10.0-26-amd64\r\
boot\r";
    let (sel, out) = boot(&map, "hd0,msdos1", &[], keys);
    assert!(out.contains("(hd0) (hd0,msdos1) (hd0,msdos5) \n"), "{out}");
    assert!(out.contains(&format!("Partition hd0,msdos1: Filesystem type ext2 - Label `rootfs' - UUID {EXT_UUID} - Partition start at 1024KiB")), "{out}");
    assert!(out.contains("README.TXT"), "{out}");
    assert!(out.contains("logical partition"), "{out}");
    assert!(
        out.contains("hd0,msdos5\n") || out.contains("hd0,msdos5\r\n"),
        "{out}"
    );
    assert_eq!(sel.menu_title, None);
    assert!(sel.kernel == kernel(), "sel.kernel differs");
    let mut both = padded(&initrd());
    both.extend(padded(&old_initrd()));
    assert!(sel.initrd == both, "sel.initrd differs");
    assert_eq!(
        sel.cmdline,
        "console=ttyS0 BOOT_IMAGE=(hd0,msdos1)/boot/vmlinuz-6.1.0-13-amd64 root=/dev/vda1"
    );
}

#[test]
fn gpt_fat_esp_and_ext4_root() {
    let dir = scratch("gpt");
    let disk = gpt_disk(&dir);
    let map = device_map(&dir, &[("hd0", &disk)]);
    // Root on the ext4 partition: Debian's menu, default entry.
    let (sel, _) = boot(&map, "hd0,gpt2", &[], b"");
    assert!(sel.kernel == kernel(), "sel.kernel differs");
    assert_eq!(sel.cmdline, debian_cmdline(KVER, ""));
    // Root on the FAT32 ESP: its stub config searches by UUID and
    // chains to the real one with configfile.
    let (sel, _) = boot(
        &map,
        "hd0,gpt1",
        &["-d", "/EFI/debian"],
        b"\x1b[B\r\x1b[B\r",
    );
    assert!(sel.kernel == kernel(), "sel.kernel differs");
    assert_eq!(sel.cmdline, debian_cmdline(KVER, "single"));
    // The prompt sees both partitions, the FAT label and UUID.
    let (_, out) = boot(
        &map,
        "hd0,gpt1",
        &["-g", "missing.cfg"],
        b"ls (hd0,gpt1)\rls (hd0,gpt1)/efi\rlinux (hd0,gpt2)/boot/vmlinuz-6.1.0-13-amd64\rboot\r",
    );
    assert!(
        out.contains("Filesystem type fat - Label `ESP' - UUID 1234-ABCD"),
        "{out}"
    );
    assert!(out.contains("BOOT/ ") && out.contains("debian/ "), "{out}");
}

#[test]
fn iso_rock_ridge_joliet_and_plain_names() {
    let dir = scratch("iso");
    for (flags, name) in [("-R -J", "rr"), ("-J", "joliet"), ("", "plain")] {
        let img = iso(&dir, flags, name);
        let map = device_map(&dir, &[("cd0", &img)]);
        // No timeout in the installer menu: Down, Enter picks "Install".
        let (sel, out) = boot(&map, "cd0", &[], b"\x1b[B\r");
        assert_eq!(sel.menu_title.as_deref(), Some("Install"), "{name}: {out}");
        assert!(sel.kernel == kernel(), "sel.kernel differs");
        assert!(sel.initrd == padded(&initrd()), "sel.initrd differs");
        assert_eq!(
            sel.cmdline, "console=ttyS0 BOOT_IMAGE=/install/vmlinuz vga=788 --- quiet",
            "{name}"
        );
        let (_, out) = boot(
            &map,
            "cd0",
            &[],
            b"cls (cd0)/isolinux\rls (cd0)/doc\rls (cd0)\rlinux /install/vmlinuz\rboot\r",
        );
        assert!(out.contains("isolinux.cfg menu.cfg"), "{name}: {out}");
        assert!(
            out.contains("Filesystem type iso9660 - Label `Debian 12.2.0 amd64 n'"),
            "{name}: {out}"
        );
        // GRUB's ISO "UUID" is the volume's modification date.
        let (_, ids) = boot(
            &map,
            "cd0",
            &[],
            b"csearch --fs-uuid --set=r 2023-10-07-12-34-56-00\recho root=$r\rsearch -l 'Debian 12.2.0 amd64 n'\rls (cd0)\rlinux /install/vmlinuz\rboot\r",
        );
        assert!(ids.contains("root=cd0"), "{name}: {ids}");
        assert!(ids.contains("UUID 2023-10-07-12-34-56-00"), "{name}: {ids}");
        if name == "rr" {
            let fs = rhyve_grub::probe(&rhyve_grub::Region::open(&img).unwrap()).unwrap();
            assert!(
                fs.read("/boot/vmlinuz").unwrap() == kernel(),
                "symlink to the kernel"
            );
            let looped = fs.ls("/debian/debian/debian/isolinux").unwrap();
            assert!(looped.iter().any(|e| e.name == "isolinux.cfg"));
        }
        if name != "plain" {
            assert!(out.contains("a-rather-long-file-name.txt"), "{name}: {out}");
        }
    }
}

#[test]
fn iso_submenu_default_and_escape() {
    let dir = scratch("iso-sub");
    let img = iso(&dir, "-R -J", "rr");
    let map = device_map(&dir, &[("cd0", &img)]);
    // Into "Advanced options", Esc back out, then "Graphical install".
    let (sel, _) = boot(&map, "cd0", &[], b"\x1b[B\x1b[B\r\x1b\x1b[A\x1b[A\r");
    assert_eq!(sel.menu_title.as_deref(), Some("Graphical install"));
    assert!(sel.kernel == old_kernel(), "sel.kernel differs");
    let (sel, _) = boot(&map, "cd0", &[], b"\x1b[B\x1b[B\r\x1b[B\r");
    assert_eq!(sel.menu_title.as_deref(), Some("... Automated install"));
    assert_eq!(
        sel.cmdline,
        "console=ttyS0 BOOT_IMAGE=/install/vmlinuz auto=true priority=critical vga=788 --- quiet"
    );
}

#[test]
fn no_input_and_no_timeout_is_an_error_not_a_hang() {
    let dir = scratch("iso-wait");
    let img = iso(&dir, "-R", "rr");
    let map = device_map(&dir, &[("cd0", &img)]);
    let o = opts(&map, "cd0", &[]);
    let mut con = ScriptedConsole::new(b"");
    let err = run(&o, &mut con).unwrap_err();
    assert!(matches!(err, rhyve_grub::GrubError::ConsoleClosed), "{err}");
}

#[test]
fn edit_an_entry_before_booting_it() {
    let dir = scratch("iso-edit");
    let img = iso(&dir, "-R -J", "edit");
    let map = device_map(&dir, &[("cd0", &img)]);
    // Down to "Install", e, ^N to the linux line, ^E, type, ^X.
    let (sel, out) = boot(&map, "cd0", &[], b"\x1b[Be\x0e\x05single\x18");
    assert!(out.contains("Press Ctrl-x"), "{out}");
    assert_eq!(sel.menu_title.as_deref(), Some("Install"));
    assert_eq!(
        sel.cmdline,
        "console=ttyS0 BOOT_IMAGE=/install/vmlinuz vga=788 --- quiet single"
    );
    // Esc leaves the editor without changes; Enter then boots the default.
    let (sel, _) = boot(&map, "cd0", &[], b"\x1b[Be\x0e\x05junk\x1b\r");
    assert_eq!(sel.menu_title.as_deref(), Some("Graphical install"));
    assert_eq!(
        sel.cmdline,
        "console=ttyS0 BOOT_IMAGE=/install/gtk/vmlinuz vga=788 --- quiet"
    );
}
