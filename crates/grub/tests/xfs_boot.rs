//! A CentOS-style guest: XFS /boot as (hd0,msdos1), grub.cfg in /grub2
//! (the Handbook's `-d /grub2`), linux16/initrd16, saved_entry.

mod common;

use common::*;
use rhyve_grub::{probe, run, Region, ScriptedConsole};

const KV: &str = "3.10.0-1160.el7.x86_64";

fn centos_cfg() -> String {
    format!(
        "set pager=1\n\
if [ -s $prefix/grubenv ]; then\n  load_env\nfi\n\
if [ \"${{next_entry}}\" ] ; then\n   set default=\"${{next_entry}}\"\n   set next_entry=\n   save_env next_entry\n   set boot_once=true\nelse\n   set default=\"${{saved_entry}}\"\nfi\n\
if [ x\"${{feature_menuentry_id}}\" = xy ]; then\n  menuentry_id_option=\"--id\"\nelse\n  menuentry_id_option=\"\"\nfi\nexport menuentry_id_option\n\
terminal_output console\nif [ x$feature_timeout_style = xy ] ; then\n  set timeout_style=menu\n  set timeout=5\nelse\n  set timeout=5\nfi\n\
menuentry 'CentOS Linux ({KV}) 7 (Core)' --class centos --class gnu-linux --class gnu --class os --unrestricted $menuentry_id_option 'gnulinux-{KV}-advanced-{EXT_UUID}' {{\n\
\tload_video\n\tset gfxpayload=keep\n\tinsmod gzio\n\tinsmod part_msdos\n\tinsmod xfs\n\tset root='hd0,msdos1'\n\
\tif [ x$feature_platform_search_hint = xy ]; then\n\t  search --no-floppy --fs-uuid --set=root --hint='hd0,msdos1'  {EXT_UUID}\n\telse\n\t  search --no-floppy --fs-uuid --set=root {EXT_UUID}\n\tfi\n\
\tlinux16 /vmlinuz-{KV} root=/dev/mapper/centos-root ro crashkernel=auto rd.lvm.lv=centos/root rhgb quiet LANG=en_US.UTF-8\n\
\tinitrd16 /initramfs-{KV}.img\n}}\n\
menuentry 'CentOS Linux (0-rescue-deadbeef) 7 (Core)' --class centos --unrestricted $menuentry_id_option 'gnulinux-0-rescue-deadbeef-advanced-{EXT_UUID}' {{\n\
\tset root='hd0,msdos1'\n\tlinux16 /vmlinuz-0-rescue-deadbeef root=/dev/mapper/centos-root ro\n\tinitrd16 /initramfs-0-rescue-deadbeef.img\n}}\n"
    )
}

#[test]
fn centos_xfs_boot_partition() {
    let dir = scratch("xfs");
    // Enough entries that /many is a multi-block (leaf-format) directory.
    let mut files: Vec<(String, Vec<u8>)> = (0..400)
        .map(|i| {
            (
                format!("many/file-with-a-longish-name-{i:04}"),
                format!("{i}").into_bytes(),
            )
        })
        .collect();
    files.push(("grub2/grub.cfg".into(), centos_cfg().into_bytes()));
    files.push((
        "grub2/grubenv".into(),
        format!("# GRUB Environment Block\nsaved_entry=gnulinux-{KV}-advanced-{EXT_UUID}\n")
            .into_bytes(),
    ));
    files.push((format!("vmlinuz-{KV}"), kernel()));
    files.push((format!("initramfs-{KV}.img"), initrd()));
    files.push(("vmlinuz-0-rescue-deadbeef".into(), old_kernel()));
    files.push(("initramfs-0-rescue-deadbeef.img".into(), old_initrd()));
    let file_refs: Vec<(&str, Vec<u8>)> =
        files.iter().map(|(p, d)| (p.as_str(), d.clone())).collect();
    let xfs = dir.join("boot.xfs");
    mkxfs(
        &xfs,
        &file_refs,
        &[
            ("vmlinuz", &format!("vmlinuz-{KV}")),
            ("grub2/up", "../many"),
        ],
        "boot",
    );

    // The reader on its own: long directory, symlinks, label and UUID.
    let fs = probe(&Region::open(&xfs).unwrap()).unwrap();
    assert_eq!(fs.kind(), "xfs");
    assert_eq!(fs.label().as_deref(), Some("boot"));
    assert_eq!(fs.uuid().as_deref(), Some(EXT_UUID));
    let many = fs.ls("/many").unwrap();
    assert_eq!(many.len(), 400);
    assert!(fs.read("/many/file-with-a-longish-name-0399").unwrap() == b"399");
    assert!(
        fs.read("/vmlinuz").unwrap() == kernel(),
        "symlink to the kernel"
    );
    assert!(
        fs.read("/grub2/up/file-with-a-longish-name-0007").unwrap() == b"7",
        "relative symlink"
    );

    // In an MBR partition, booted as the Handbook's CentOS guest.
    let disk = dir.join("centos.img");
    sh(&format!(
        "rm -f '{d}'; truncate -s 302M '{d}'",
        d = disk.display()
    ));
    sh(&format!(
        "printf 'label: dos\\nstart=2048, size=614400, type=83\\n' | sfdisk -q '{}'",
        disk.display()
    ));
    sh(&format!(
        "dd if='{}' of='{}' bs=1M seek=1 conv=notrunc,sparse status=none",
        xfs.display(),
        disk.display()
    ));
    let map = device_map(&dir, &[("hd0", &disk)]);
    let o = opts(&map, "hd0,msdos1", &["-d", "/grub2"]);
    let mut con = ScriptedConsole::new(b"");
    let sel = run(&o, &mut con).unwrap_or_else(|e| panic!("{e}: {}", con.output_text()));
    assert_eq!(
        sel.menu_title.as_deref(),
        Some(format!("CentOS Linux ({KV}) 7 (Core)").as_str())
    );
    assert!(sel.kernel == kernel() && sel.initrd == padded(&initrd()));
    assert_eq!(
        sel.cmdline,
        format!("console=ttyS0 BOOT_IMAGE=/vmlinuz-{KV} root=/dev/mapper/centos-root ro crashkernel=auto rd.lvm.lv=centos/root rhgb quiet LANG=en_US.UTF-8")
    );
    let mut con = ScriptedConsole::new(b"\x1b[B\r");
    let sel = run(&o, &mut con).unwrap();
    assert!(sel.kernel == old_kernel() && sel.initrd == padded(&old_initrd()));
}
