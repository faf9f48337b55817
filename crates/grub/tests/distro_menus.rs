//! Menus as Ubuntu and Alpine install media ship them, plus GRUB script
//! features distribution configs lean on.

mod common;

use common::*;
use rhyve_grub::{run, ScriptedConsole};

const UBUNTU: &str = "set timeout=30\n\nloadfont unicode\n\n\
set menu_color_normal=white/black\nset menu_color_highlight=black/light-gray\n\n\
menuentry \"Try or Install Ubuntu Server\" {\n\tset gfxpayload=keep\n\tlinux\t/casper/vmlinuz  ---\n\tinitrd\t/casper/initrd\n}\n\
menuentry \"Ubuntu Server with the HWE kernel\" {\n\tset gfxpayload=keep\n\tlinux\t/casper/hwe-vmlinuz  ---\n\tinitrd\t/casper/hwe-initrd\n}\n\
grub_platform\nif [ \"$grub_platform\" = \"efi\" ]; then\nmenuentry 'Boot from next volume' {\n\texit 1\n}\n\
menuentry 'UEFI Firmware Settings' {\n\tfwsetup\n}\nelse\nmenuentry 'Test memory' {\n\tlinux16 /boot/memtest86+x64.bin\n}\nfi\n";

const ALPINE: &str = "set timeout=1\n\nmenuentry \"Linux lts\" {\nlinux\t/boot/vmlinuz-lts modules=loop,squashfs,sd-mod,usb-storage quiet \ninitrd\t/boot/initramfs-lts\n}\n";

fn ext_with(dir: &std::path::Path, files: &[(&str, &[u8])]) -> std::path::PathBuf {
    need_tools();
    let tree = dir.join("tree");
    for (p, d) in files {
        write(&tree.join(p), d);
    }
    let img = dir.join("fs.ext4");
    mkext4(&img, &tree, 8, "media");
    img
}

#[test]
fn ubuntu_server_iso_menu() {
    let dir = scratch("ubuntu");
    let img = ext_with(
        &dir,
        &[
            ("boot/grub/grub.cfg", UBUNTU.as_bytes()),
            ("casper/vmlinuz", &kernel()),
            ("casper/initrd", &initrd()),
            ("casper/hwe-vmlinuz", &old_kernel()),
            ("casper/hwe-initrd", &old_initrd()),
            ("boot/memtest86+x64.bin", &fake_kernel("memtest", 0)),
        ],
    );
    let map = device_map(&dir, &[("cd0", &img)]);
    // 30 s countdown, expires at once without input: the first entry.
    let mut con = ScriptedConsole::new(b"");
    let sel = run(&opts(&map, "cd0", &[]), &mut con).unwrap();
    let out = con.output_text();
    assert_eq!(
        sel.menu_title.as_deref(),
        Some("Try or Install Ubuntu Server")
    );
    assert!(sel.kernel == kernel() && sel.initrd == padded(&initrd()));
    assert_eq!(sel.cmdline, "console=ttyS0 BOOT_IMAGE=/casper/vmlinuz ---");
    assert!(
        out.contains("Test memory") && !out.contains("UEFI Firmware"),
        "{out}"
    );
    assert!(!out.contains("can't find command"), "{out}");
    // ^N to the HWE kernel.
    let mut con = ScriptedConsole::new(b"\x0e\r");
    let sel = run(&opts(&map, "cd0", &[]), &mut con).unwrap();
    assert!(sel.kernel == old_kernel() && sel.initrd == padded(&old_initrd()));
    // linux16 works as linux; an entry that fails returns to the menu.
    let mut con = ScriptedConsole::new(b"\x1b[B\x1b[B\r");
    let sel = run(&opts(&map, "cd0", &[]), &mut con).unwrap();
    assert_eq!(sel.kernel, fake_kernel("memtest", 0));
    assert_eq!(sel.initrd, b"");
}

#[test]
fn alpine_iso_menu_and_hidden_timeout() {
    let dir = scratch("alpine");
    let hidden = format!(
        "set timeout_style=hidden\n{ALPINE}menuentry other {{ linux /boot/vmlinuz-lts other }}\n"
    );
    let img = ext_with(
        &dir,
        &[
            ("boot/grub/grub.cfg", ALPINE.as_bytes()),
            ("boot/grub/hidden.cfg", hidden.as_bytes()),
            ("boot/vmlinuz-lts", &kernel()),
            ("boot/initramfs-lts", &initrd()),
        ],
    );
    let map = device_map(&dir, &[("cd0", &img)]);
    let mut con = ScriptedConsole::new(b"");
    let sel = run(&opts(&map, "cd0", &[]), &mut con).unwrap();
    assert_eq!(sel.menu_title.as_deref(), Some("Linux lts"));
    assert_eq!(
        sel.cmdline,
        "console=ttyS0 BOOT_IMAGE=/boot/vmlinuz-lts modules=loop,squashfs,sd-mod,usb-storage quiet"
    );
    // Hidden: no menu drawn when the timeout runs out...
    let mut con = ScriptedConsole::new(b"");
    let sel = run(&opts(&map, "cd0", &["-g", "hidden.cfg"]), &mut con).unwrap();
    assert_eq!(sel.menu_title.as_deref(), Some("Linux lts"));
    assert!(!con.output_text().contains("GNU GRUB"));
    // ...and a key shows it.
    let mut con = ScriptedConsole::new(b" \x1b[B\r");
    let sel = run(&opts(&map, "cd0", &["-g", "hidden.cfg"]), &mut con).unwrap();
    assert_eq!(sel.menu_title.as_deref(), Some("other"));
    assert!(con.output_text().contains("GNU GRUB"));
}

#[test]
fn script_features() {
    let dir = scratch("script");
    let cfg = r#"
set kopts="ro quiet"
set empty=
function pick {
  if [ "$1" = b ]; then return 0; fi
  return 1
}
for v in a b c; do
  if pick $v; then set chosen=$v; fi
done
if [ -z "$empty" -a -n "$kopts" ]; then set both=yes; fi
if [ -f /k ]; then if [ -e /etc ]; then set files=yes; fi; fi
if [ -f /etc ]; then set files=wrong; fi
if [ 10 -gt 9 ]; then set num=ok; fi
if ! [ x = y ]; then set neg=ok; fi
n=0
while [ $n != 3 ]; do
  if [ $n = 0 ]; then n=1; elif [ $n = 1 ]; then n=2; else n=3; fi
done
search --file --set=found /k
search --label media --set dev
search.fs_uuid 3f1c2b7a-9d4e-4c1a-8b2e-5a6f7c8d9e01 byuuid
menuentry "Entry $chosen" --id=first --class x 'arg one' {
  linux /k "$1" ${kopts} both=$both files=$files num=$num neg=$neg n=$n found=$found dev=$dev u=$byuuid 'a b'
  initrd /i /i
}
set default=first
set timeout=0
"#;
    let img = ext_with(
        &dir,
        &[
            ("boot/grub/grub.cfg", cfg.as_bytes()),
            ("k", &fake_kernel("k", 0)),
            ("i", b"12345"),
            ("etc/x", b""),
        ],
    );
    let map = device_map(&dir, &[("hd0", &img)]);
    let mut con = ScriptedConsole::new(b"");
    let sel = run(&opts(&map, "hd0", &[]), &mut con).unwrap_or_else(|e| panic!("{e}"));
    let out = con.output_text();
    assert_eq!(sel.menu_title.as_deref(), Some("Entry b"), "{out}");
    assert_eq!(
        sel.linux_args,
        [
            "arg one",
            "ro",
            "quiet",
            "both=yes",
            "files=yes",
            "num=ok",
            "neg=ok",
            "n=3",
            "found=hd0",
            "dev=hd0",
            "u=hd0",
            "a b"
        ]
    );
    assert_eq!(sel.cmdline, "console=ttyS0 BOOT_IMAGE=/k \"arg one\" ro quiet both=yes files=yes num=ok neg=ok n=3 found=hd0 dev=hd0 u=hd0 \"a b\"");
    // Two initrds, each padded to 4 bytes.
    assert_eq!(sel.initrd, b"12345\0\0\0\x31\x32\x33\x34\x35\0\0\0");
}

#[test]
fn fedora_blscfg_menu() {
    let dir = scratch("fedora");
    let mid = "8f2b9c0e5d1a4b6c9e7f00112233aabb";
    let cfg = format!(
        "set pager=1\n\
if [ -f ${{config_directory}}/grubenv ]; then\n  load_env -f ${{config_directory}}/grubenv\nelif [ -s $prefix/grubenv ]; then\n  load_env\nfi\n\
if [ \"${{next_entry}}\" ] ; then\n   set default=\"${{next_entry}}\"\n   set next_entry=\n   save_env next_entry\n   set boot_once=true\nelse\n   set default=\"${{saved_entry}}\"\nfi\n\
terminal_output console\nif [ x$feature_timeout_style = xy ] ; then\n  set timeout_style=menu\n  set timeout=5\nelse\n  set timeout=5\nfi\n\
insmod part_msdos\ninsmod ext2\nset root='hd0,msdos1'\n\
if [ x$feature_platform_search_hint = xy ]; then\n  search --no-floppy --fs-uuid --set=root --hint='hd0,msdos1'  {EXT_UUID}\nelse\n  search --no-floppy --fs-uuid --set=root {EXT_UUID}\nfi\n\
insmod blscfg\nblscfg\n"
    );
    let new = format!("title Fedora Linux (6.10.3-200.fc40.x86_64) 40 (Server Edition)\nversion 6.10.3-200.fc40.x86_64\nlinux /vmlinuz-6.10.3-200.fc40.x86_64\ninitrd /initramfs-6.10.3-200.fc40.x86_64.img\noptions root=UUID={EXT_UUID} ro rhgb quiet\ngrub_users $grub_users\ngrub_arg --unrestricted\ngrub_class fedora\n");
    let old = "title Fedora Linux (6.9.7-100.fc40.x86_64) 40 (Server Edition)\nversion 6.9.7-100.fc40.x86_64\nlinux /vmlinuz-6.9.7-100.fc40.x86_64\ninitrd /initramfs-6.9.7-100.fc40.x86_64.img\noptions $kernelopts\n";
    let env = format!("# GRUB Environment Block\nsaved_entry={mid}-6.9.7-100.fc40.x86_64\nkernelopts=root=/dev/vda2 ro console=ttyS0,115200\n");
    let img = ext_with(
        &dir,
        &[
            ("boot/grub2/grub.cfg", cfg.as_bytes()),
            ("boot/grub2/grubenv", env.as_bytes()),
            (
                &format!("boot/loader/entries/{mid}-6.10.3-200.fc40.x86_64.conf"),
                new.as_bytes(),
            ),
            (
                &format!("boot/loader/entries/{mid}-6.9.7-100.fc40.x86_64.conf"),
                old.as_bytes(),
            ),
            ("boot/vmlinuz-6.10.3-200.fc40.x86_64", &kernel()),
            ("boot/initramfs-6.10.3-200.fc40.x86_64.img", &initrd()),
            ("boot/vmlinuz-6.9.7-100.fc40.x86_64", &old_kernel()),
            ("boot/initramfs-6.9.7-100.fc40.x86_64.img", &old_initrd()),
        ],
    );
    let map = device_map(&dir, &[("hd0", &img)]);
    // saved_entry picks the older kernel; its options come from grubenv.
    let mut con = ScriptedConsole::new(b"");
    let sel = run(&opts(&map, "hd0", &["-d", "/boot/grub2"]), &mut con)
        .unwrap_or_else(|e| panic!("{e}: {}", con.output_text()));
    let out = con.output_text();
    assert_eq!(
        sel.menu_title.as_deref(),
        Some("Fedora Linux (6.9.7-100.fc40.x86_64) 40 (Server Edition)"),
        "{out}"
    );
    assert!(sel.kernel == old_kernel() && sel.initrd == padded(&old_initrd()));
    // The guest's own console=ttyS0,115200 means no console=ttyS0 is added.
    assert_eq!(
        sel.cmdline,
        "BOOT_IMAGE=/boot/vmlinuz-6.9.7-100.fc40.x86_64 root=/dev/vda2 ro console=ttyS0,115200"
    );
    // Newest first in the menu: Up reaches 6.10.
    let mut con = ScriptedConsole::new(b"\x1b[A\r");
    let sel = run(&opts(&map, "hd0", &["-d", "/boot/grub2"]), &mut con).unwrap();
    assert!(sel.kernel == kernel());
    assert_eq!(
        sel.cmdline,
        format!("console=ttyS0 BOOT_IMAGE=/boot/vmlinuz-6.10.3-200.fc40.x86_64 root=UUID={EXT_UUID} ro rhgb quiet")
    );
}
