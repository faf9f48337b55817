//! Test images built with Debian's own tools (xorriso, sfdisk, mke2fs -d,
//! mkfs.vfat + mcopy), never mounting anything.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Once;

pub const EXT_UUID: &str = "3f1c2b7a-9d4e-4c1a-8b2e-5a6f7c8d9e01";
pub const KVER: &str = "6.1.0-13-amd64";
pub const OLD_KVER: &str = "5.10.0-26-amd64";

static INSTALL: Once = Once::new();

/// The tools the image builders use; missing ones are installed once
/// with apt-get (Debian packages xorriso, fdisk, e2fsprogs, dosfstools,
/// mtools, xfsprogs), and a test fails loudly if that does not work.
pub fn need_tools() {
    INSTALL.call_once(|| {
        let tools = [
            ("xorriso", "xorriso"),
            ("sfdisk", "fdisk"),
            ("mke2fs", "e2fsprogs"),
            ("mkfs.vfat", "dosfstools"),
            ("mcopy", "mtools"),
            ("mkfs.xfs", "xfsprogs"),
        ];
        let missing: Vec<&str> = tools
            .iter()
            .filter(|(t, _)| {
                !Command::new("sh")
                    .arg("-c")
                    .arg(format!(
                        "command -v {t} || test -x /usr/sbin/{t} || test -x /sbin/{t}"
                    ))
                    .output()
                    .is_ok_and(|o| o.status.success())
            })
            .map(|(_, p)| *p)
            .collect();
        if !missing.is_empty() {
            let st = Command::new("apt-get")
                .arg("install")
                .arg("-y")
                .args(&missing)
                .status();
            assert!(
                st.is_ok_and(|s| s.success()),
                "these tests need the Debian packages {missing:?} (apt-get install -y {})",
                missing.join(" ")
            );
        }
    });
}

pub fn sh(cmd: &str) {
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!("PATH=$PATH:/usr/sbin:/sbin; {cmd}"))
        .output()
        .expect("run sh");
    assert!(
        out.status.success(),
        "command failed: {cmd}\nstdout: {}\nstderr: {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A fresh scratch directory under the target dir.
pub fn scratch(name: &str) -> PathBuf {
    let base = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join("rhyve-grub")
        .join(name);
    let _ = std::fs::remove_dir_all(&base);
    std::fs::create_dir_all(&base).unwrap();
    base
}

/// Distinct deterministic bytes for a fake file.
pub fn pattern(tag: &str, len: usize) -> Vec<u8> {
    let mut v = tag.as_bytes().to_vec();
    let mut x: u32 = tag
        .bytes()
        .fold(7u32, |a, b| a.wrapping_mul(31).wrapping_add(b as u32));
    while v.len() < len {
        x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
        v.push((x >> 16) as u8);
    }
    v.truncate(len);
    v
}

pub fn write(path: &Path, data: &[u8]) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, data).unwrap();
}

/// `pattern` bytes under a bzImage setup header (boot protocol 2.15,
/// 64-bit entry), which is all `linux` checks before accepting a kernel.
pub fn fake_kernel(tag: &str, len: usize) -> Vec<u8> {
    let mut k = pattern(tag, len.max(0x1000));
    k[0x1F1] = 4;
    k[0x1FE..0x200].copy_from_slice(&0xAA55u16.to_le_bytes());
    k[0x202..0x206].copy_from_slice(b"HdrS");
    k[0x206..0x208].copy_from_slice(&0x020Fu16.to_le_bytes());
    k[0x211] |= 1;
    k[0x236] |= 1;
    k
}

pub fn kernel() -> Vec<u8> {
    fake_kernel("KERNEL-6.1", 70_001)
}
pub fn initrd() -> Vec<u8> {
    pattern("INITRD-6.1", 33_331)
}
pub fn old_kernel() -> Vec<u8> {
    fake_kernel("KERNEL-5.10", 50_002)
}
pub fn old_initrd() -> Vec<u8> {
    pattern("INITRD-5.10", 20_000)
}

/// Pad like grub's initrd loader: zeros up to a multiple of 4.
pub fn padded(d: &[u8]) -> Vec<u8> {
    let mut v = d.to_vec();
    v.resize(v.len().div_ceil(4) * 4, 0);
    v
}

fn linux_entry(indent: &str, title: &str, id: &str, kver: &str, extra: &str, part: &str) -> String {
    let i = indent;
    format!(
        "{i}menuentry '{title}' --class debian --class gnu-linux --class gnu --class os $menuentry_id_option '{id}' {{\n\
{i}\tload_video\n\
{i}\tinsmod gzio\n\
{i}\tif [ x$grub_platform = xxen ]; then insmod xzio; insmod lzopio; fi\n\
{i}\tinsmod part_{pt}\n\
{i}\tinsmod ext2\n\
{i}\tset root='{part}'\n\
{i}\tif [ x$feature_platform_search_hint = xy ]; then\n\
{i}\t  search --no-floppy --fs-uuid --set=root --hint-bios={part} --hint-efi={part} --hint-baremetal=ahci0,{pn}  {u}\n\
{i}\telse\n\
{i}\t  search --no-floppy --fs-uuid --set=root {u}\n\
{i}\tfi\n\
{i}\techo\t'Loading Linux {kver} ...'\n\
{i}\tlinux\t/boot/vmlinuz-{kver} root=UUID={u} ro {extra} quiet\n\
{i}\techo\t'Loading initial ramdisk ...'\n\
{i}\tinitrd\t/boot/initrd.img-{kver}\n\
{i}}}\n",
        u = EXT_UUID,
        pt = part.split(',').nth(1).unwrap().trim_end_matches(char::is_numeric),
        pn = part.split(',').nth(1).unwrap(),
    )
}

/// A grub.cfg of the shape Debian 12's grub-mkconfig writes (00_header,
/// 05_debian_theme, 10_linux with its submenu, 30_uefi-firmware,
/// 41_custom), for a root filesystem on `part` (e.g. `hd0,msdos1`).
pub fn debian_grub_cfg(part: &str) -> String {
    let u = EXT_UUID;
    let pt = part
        .split(',')
        .nth(1)
        .unwrap()
        .trim_end_matches(char::is_numeric);
    let pn = part.split(',').nth(1).unwrap();
    let search = format!(
        "insmod part_{pt}\ninsmod ext2\nset root='{part}'\n\
if [ x$feature_platform_search_hint = xy ]; then\n  \
search --no-floppy --fs-uuid --set=root --hint-bios={part} --hint-efi={part} --hint-baremetal=ahci0,{pn}  {u}\n\
else\n  search --no-floppy --fs-uuid --set=root {u}\nfi\n"
    );
    let mut s = String::new();
    s.push_str(
        "#\n# DO NOT EDIT THIS FILE\n#\n# It is automatically generated by grub-mkconfig using templates\n\
# from /etc/grub.d and settings from /etc/default/grub\n#\n\n\
### BEGIN /etc/grub.d/00_header ###\n\
if [ -s $prefix/grubenv ]; then\n  set have_grubenv=true\n  load_env\nfi\n\
if [ \"${next_entry}\" ] ; then\n   set default=\"${next_entry}\"\n   set next_entry=\n   save_env next_entry\n   set boot_once=true\nelse\n   set default=\"0\"\nfi\n\n\
if [ x\"${feature_menuentry_id}\" = xy ]; then\n  menuentry_id_option=\"--id\"\nelse\n  menuentry_id_option=\"\"\nfi\n\n\
export menuentry_id_option\n\n\
if [ \"${prev_saved_entry}\" ]; then\n  set saved_entry=\"${prev_saved_entry}\"\n  save_env saved_entry\n  set prev_saved_entry=\n  save_env prev_saved_entry\n  set boot_once=true\nfi\n\n\
function savedefault {\n  if [ -z \"${boot_once}\" ]; then\n    saved_entry=\"${chosen}\"\n    save_env saved_entry\n  fi\n}\n\
function load_video {\n  if [ x$feature_all_video_module = xy ]; then\n    insmod all_video\n  else\n    insmod efi_gop\n    insmod efi_uga\n    insmod ieee1275_fb\n    insmod vbe\n    insmod vga\n    insmod video_bochs\n    insmod video_cirrus\n  fi\n}\n\n\
if [ x$feature_default_font_path = xy ] ; then\n   font=unicode\nelse\n",
    );
    s.push_str(&search);
    s.push_str(
        "    font=\"/usr/share/grub/unicode.pf2\"\nfi\n\n\
if loadfont $font ; then\n  set gfxmode=auto\n  load_video\n  insmod gfxterm\n  set locale_dir=$prefix/locale\n  set lang=en_US\n  insmod gettext\nfi\n\
terminal_output gfxterm\n\
if [ \"${recordfail}\" = 1 ] ; then\n  set timeout=30\nelse\n  if [ x$feature_timeout_style = xy ] ; then\n    set timeout_style=menu\n    set timeout=5\n  # Fallback normal timeout code in case the timeout_style feature is\n  # unavailable.\n  else\n    set timeout=5\n  fi\nfi\n\
### END /etc/grub.d/00_header ###\n\n### BEGIN /etc/grub.d/05_debian_theme ###\n",
    );
    s.push_str(&search);
    s.push_str(
        "insmod png\nif background_image /usr/share/desktop-base/emerald-theme/grub/grub-4x3.png; then\n  set color_normal=white/black\n  set color_highlight=black/white\nelse\n  set menu_color_normal=cyan/blue\n  set menu_color_highlight=white/blue\nfi\n\
### END /etc/grub.d/05_debian_theme ###\n\n### BEGIN /etc/grub.d/10_linux ###\n\
function gfxmode {\n\tset gfxpayload=\"${1}\"\n}\nset linux_gfx_mode=\nexport linux_gfx_mode\n",
    );
    s.push_str(&linux_entry(
        "",
        "Debian GNU/Linux",
        &format!("gnulinux-simple-{u}"),
        KVER,
        "",
        part,
    ));
    s.push_str(&format!(
        "submenu 'Advanced options for Debian GNU/Linux' $menuentry_id_option 'gnulinux-advanced-{u}' {{\n"
    ));
    s.push_str(&linux_entry(
        "\t",
        &format!("Debian GNU/Linux, with Linux {KVER}"),
        &format!("gnulinux-{KVER}-advanced-{u}"),
        KVER,
        "",
        part,
    ));
    s.push_str(&linux_entry(
        "\t",
        &format!("Debian GNU/Linux, with Linux {KVER} (recovery mode)"),
        &format!("gnulinux-{KVER}-recovery-{u}"),
        KVER,
        "single",
        part,
    ));
    s.push_str(&linux_entry(
        "\t",
        &format!("Debian GNU/Linux, with Linux {OLD_KVER}"),
        &format!("gnulinux-{OLD_KVER}-advanced-{u}"),
        OLD_KVER,
        "",
        part,
    ));
    s.push_str("}\n\n### END /etc/grub.d/10_linux ###\n\n");
    s.push_str(
        "### BEGIN /etc/grub.d/30_uefi-firmware ###\nif [ \"$grub_platform\" = \"efi\" ]; then\n\tfwsetup --is-supported\n\tif [ \"$?\" = 0 ]; then\n\t\tmenuentry 'UEFI Firmware Settings' $menuentry_id_option 'uefi-firmware' {\n\t\t\tfwsetup\n\t\t}\n\tfi\nfi\n### END /etc/grub.d/30_uefi-firmware ###\n\n\
### BEGIN /etc/grub.d/41_custom ###\nif [ -f  ${config_directory}/custom.cfg ]; then\n  source ${config_directory}/custom.cfg\nfi\n\
if [ -z \"${config_directory}\" -a -f  $prefix/custom.cfg ]; then\n  source $prefix/custom.cfg\nfi\n### END /etc/grub.d/41_custom ###\n",
    );
    s
}

/// The /boot tree of a Debian root filesystem, with extra files.
pub fn debian_root_tree(dir: &Path, part: &str, extra: &[(&str, &[u8])]) {
    write(&dir.join(format!("boot/vmlinuz-{KVER}")), &kernel());
    write(&dir.join(format!("boot/initrd.img-{KVER}")), &initrd());
    write(&dir.join(format!("boot/vmlinuz-{OLD_KVER}")), &old_kernel());
    write(
        &dir.join(format!("boot/initrd.img-{OLD_KVER}")),
        &old_initrd(),
    );
    write(
        &dir.join("boot/grub/grub.cfg"),
        debian_grub_cfg(part).as_bytes(),
    );
    write(&dir.join("etc/hostname"), b"debian\n");
    for (p, d) in extra {
        write(&dir.join(p), d);
    }
}

/// An ext4 image of `size_mib` filled from `dir` (mke2fs -d, no mount).
pub fn mkext4(img: &Path, dir: &Path, size_mib: u32, label: &str) {
    sh(&format!(
        "mke2fs -q -F -t ext4 -U {EXT_UUID} -L {label} -d '{}' '{}' {size_mib}M",
        dir.display(),
        img.display()
    ));
}

/// A FAT image filled from `dir` with mcopy.
pub fn mkfat(img: &Path, dir: &Path, size_mib: u32, label: &str, fat: u32) {
    sh(&format!(
        "rm -f '{i}'; mkfs.vfat -C -F {fat} -n {label} -i 1234ABCD '{i}' {k} >/dev/null && MTOOLS_SKIP_CHECK=1 mcopy -s -i '{i}' '{d}'/* ::/",
        i = img.display(),
        d = dir.display(),
        k = size_mib * 1024
    ));
}

/// Copy a filesystem image into a disk image at a byte offset.
pub fn place(disk: &Path, part: &Path, offset_mib: u32) {
    sh(&format!(
        "dd if='{}' of='{}' bs=1M seek={offset_mib} conv=notrunc status=none",
        part.display(),
        disk.display()
    ));
}

/// An MBR disk: ext4 root as msdos1 (Debian /boot, grub.cfg of Debian's
/// shape), an extended partition holding a FAT logical msdos5.
pub fn mbr_disk(dir: &Path) -> PathBuf {
    need_tools();
    let tree = dir.join("mbr-root");
    debian_root_tree(&tree, "hd0,msdos1", &[]);
    let extra_cfgs = format!(
        "source $prefix/grub.cfg\nset timeout=0\nset default='Advanced options for Debian GNU/Linux>Debian GNU/Linux, with Linux {KVER} (recovery mode)'\n"
    );
    write(&tree.join("boot/grub/bytitle.cfg"), extra_cfgs.as_bytes());
    write(
        &tree.join("boot/grub/saved.cfg"),
        b"source $prefix/grub.cfg\nload_env -f $prefix/saved.env\nset default=saved\nset timeout=0\n",
    );
    write(
        &tree.join("boot/grub/saved.env"),
        format!("# GRUB Environment Block\nsaved_entry=gnulinux-advanced-{EXT_UUID}>gnulinux-{OLD_KVER}-advanced-{EXT_UUID}\n").as_bytes(),
    );
    let ext = dir.join("mbr-p1.ext4");
    mkext4(&ext, &tree, 16, "rootfs");
    let fat_tree = dir.join("mbr-fat");
    write(&fat_tree.join("DATA/README.TXT"), b"logical partition\n");
    let fat = dir.join("mbr-p5.fat");
    mkfat(&fat, &fat_tree, 4, "LOGICAL", 12);
    let disk = dir.join("mbr.img");
    sh(&format!(
        "rm -f '{d}'; truncate -s 32M '{d}'",
        d = disk.display()
    ));
    sh(&format!(
        "printf 'label: dos\\nstart=2048, size=32768, type=83\\nstart=36864, size=20480, type=5\\nstart=38912, size=8192, type=c\\n' | sfdisk -q '{}'",
        disk.display()
    ));
    place(&disk, &ext, 1);
    place(&disk, &fat, 19);
    disk
}

/// A GPT disk: an EFI System FAT32 partition (gpt1) and the ext4 root
/// (gpt2) with Debian's grub.cfg for `hd0,gpt2`.
pub fn gpt_disk(dir: &Path) -> PathBuf {
    need_tools();
    let tree = dir.join("gpt-root");
    debian_root_tree(&tree, "hd0,gpt2", &[]);
    let ext = dir.join("gpt-p2.ext4");
    mkext4(&ext, &tree, 16, "gptroot");
    let esp_tree = dir.join("gpt-esp");
    write(&esp_tree.join("EFI/debian/grub.cfg"), format!("search.fs_uuid {EXT_UUID} root hd0,gpt2\nset prefix=($root)'/boot/grub'\nconfigfile $prefix/grub.cfg\n").as_bytes());
    write(
        &esp_tree.join("EFI/BOOT/BOOTX64.EFI"),
        &pattern("EFI", 4096),
    );
    let fat = dir.join("gpt-p1.fat");
    mkfat(&fat, &esp_tree, 40, "ESP", 32);
    let disk = dir.join("gpt.img");
    sh(&format!(
        "rm -f '{d}'; truncate -s 64M '{d}'",
        d = disk.display()
    ));
    sh(&format!(
        "printf 'label: gpt\\nstart=2048, size=81920, type=C12A7328-F81F-11D2-BA4B-00A0C93EC93B\\nstart=83968, size=32768, type=0FC63DAF-8483-4772-8E79-3D69D8477DE4\\n' | sfdisk -q '{}'",
        disk.display()
    ));
    place(&disk, &fat, 1);
    place(&disk, &ext, 41);
    disk
}

/// The grub.cfg of a Debian installer ISO (its shape: font, play, themed
/// entries with hotkeys, an advanced submenu).
pub fn debian_iso_cfg() -> &'static str {
    "if [ x$feature_default_font_path = xy ] ; then\n   font=unicode\nelse\n   font=$prefix/font.pf2\nfi\n\n\
if loadfont $font ; then\n  set gfxmode=800x600\n  set gfxpayload=keep\n  insmod efi_gop\n  insmod efi_uga\n  insmod video_bochs\n  insmod video_cirrus\nelse\n  set gfxmode=auto\n  insmod all_video\nfi\n\n\
insmod png\nif background_image /isolinux/splash.png; then\n  set color_normal=light-gray/black\n  set color_highlight=white/black\nelif background_image /splash.png; then\n  set color_normal=light-gray/black\n  set color_highlight=white/black\nelse\n  set menu_color_normal=cyan/blue\n  set menu_color_highlight=white/blue\nfi\n\n\
insmod play\nplay 960 440 1 0 4 440 1\nset theme=/boot/grub/theme/1\n\
menuentry --hotkey=g 'Graphical install' {\n    set background_color=black\n    linux    /install/gtk/vmlinuz vga=788 --- quiet \n    initrd   /install/gtk/initrd.gz\n}\n\
menuentry --hotkey=i 'Install' {\n    set background_color=black\n    linux    /install/vmlinuz vga=788 --- quiet \n    initrd   /install/initrd.gz\n}\n\
submenu --hotkey=a 'Advanced options ...' {\n    set menu_color_normal=cyan/blue\n    set menu_color_highlight=white/blue\n    set theme=/boot/grub/theme/1-1\n\
    menuentry '... Expert install' {\n        set background_color=black\n        linux    /install/vmlinuz priority=low vga=788 --- \n        initrd   /install/initrd.gz\n    }\n\
    menuentry --hotkey=s '... Automated install' {\n        set background_color=black\n        linux    /install/vmlinuz auto=true priority=critical vga=788 --- quiet \n        initrd   /install/initrd.gz\n    }\n}\n"
}

/// An install ISO with /isolinux, /boot/grub/grub.cfg and the installer
/// kernels. `flags` picks the name extensions: "-R -J", "-J", or "".
pub fn iso(dir: &Path, flags: &str, name: &str) -> PathBuf {
    need_tools();
    let tree = dir.join(format!("{name}-tree"));
    let _ = std::fs::remove_dir_all(&tree);
    write(
        &tree.join("isolinux/isolinux.cfg"),
        b"path \ninclude menu.cfg\ndefault vesamenu.c32\nprompt 0\ntimeout 0\n",
    );
    write(&tree.join("isolinux/menu.cfg"), b"menu hshift 4\n");
    write(
        &tree.join("boot/grub/grub.cfg"),
        debian_iso_cfg().as_bytes(),
    );
    write(&tree.join("install/vmlinuz"), &kernel());
    write(&tree.join("install/initrd.gz"), &initrd());
    write(&tree.join("install/gtk/vmlinuz"), &old_kernel());
    write(&tree.join("install/gtk/initrd.gz"), &old_initrd());
    write(
        &tree.join("doc/a-rather-long-file-name.txt"),
        b"long names\n",
    );
    if flags.contains("-R") {
        // Rock Ridge symlinks: one to the kernel, one looping to the root.
        std::os::unix::fs::symlink("../install/vmlinuz", tree.join("boot/vmlinuz")).unwrap();
        std::os::unix::fs::symlink(".", tree.join("debian")).unwrap();
    }
    let iso = dir.join(format!("{name}.iso"));
    sh(&format!(
        "xorriso -as mkisofs -quiet {flags} -V 'Debian 12.2.0 amd64 n' --modification-date=2023100712345600 -o '{}' '{}'",
        iso.display(),
        tree.display()
    ));
    iso
}

/// A device map file naming the images.
pub fn device_map(dir: &Path, lines: &[(&str, &Path)]) -> PathBuf {
    let text: String = lines
        .iter()
        .map(|(n, p)| format!("({n}) {}\n", p.display()))
        .collect();
    let p = dir.join("device.map");
    std::fs::write(&p, text).unwrap();
    p
}

pub fn opts(map: &Path, root: &str, extra: &[&str]) -> rhyve_grub::GrubOptions {
    let mut args: Vec<String> = vec![
        "-m".into(),
        map.display().to_string(),
        "-r".into(),
        root.into(),
        "-M".into(),
        "1024M".into(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    args.push("linuxguest".into());
    rhyve_grub::parse_args(&args).unwrap()
}

/// An XFS image (mkfs.xfs's minimum, 300 MiB, sparse) built from a
/// mkfs.xfs prototype: `(path, contents)` files, `(path, target)` symlinks.
pub fn mkxfs(img: &Path, files: &[(&str, Vec<u8>)], links: &[(&str, &str)], label: &str) {
    mkxfs_sized(img, files, links, label, 300);
}

/// [`mkxfs`] of `size_mib` with one allocation group: below 300 MiB
/// mkfs.xfs wants to be told it is making a test file system.
pub fn mkxfs_sized(
    img: &Path,
    files: &[(&str, Vec<u8>)],
    links: &[(&str, &str)],
    label: &str,
    size_mib: u32,
) {
    need_tools();
    let src = img.with_extension("src");
    let _ = std::fs::remove_dir_all(&src);
    // The prototype lists a directory's entries, nested, before "$".
    #[derive(Default)]
    struct Dir {
        files: Vec<(String, std::path::PathBuf)>,
        links: Vec<(String, String)>,
        dirs: std::collections::BTreeMap<String, Dir>,
    }
    let mut root = Dir::default();
    for (n, (path, data)) in files.iter().enumerate() {
        let host = src.join(format!("f{n}"));
        write(&host, data);
        let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
        let mut d = &mut root;
        for p in &parts[..parts.len() - 1] {
            d = d.dirs.entry(p.to_string()).or_default();
        }
        d.files.push((parts[parts.len() - 1].to_string(), host));
    }
    for (path, target) in links {
        let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
        let mut d = &mut root;
        for p in &parts[..parts.len() - 1] {
            d = d.dirs.entry(p.to_string()).or_default();
        }
        d.links
            .push((parts[parts.len() - 1].to_string(), target.to_string()));
    }
    fn emit(d: &Dir, out: &mut String) {
        for (name, host) in &d.files {
            out.push_str(&format!("{name} ---644 0 0 {}\n", host.display()));
        }
        for (name, target) in &d.links {
            out.push_str(&format!("{name} l--777 0 0 {target}\n"));
        }
        for (name, sub) in &d.dirs {
            out.push_str(&format!("{name} d--755 0 0\n"));
            emit(sub, out);
            out.push_str("$\n");
        }
    }
    let mut proto = String::from("/dev/null\n0 0\nd--755 0 0\n");
    emit(&root, &mut proto);
    proto.push_str("$\n");
    let proto_path = src.join("proto");
    write(&proto_path, proto.as_bytes());
    sh(&format!(
        "rm -f '{i}'; truncate -s {size_mib}M '{i}' && TEST_DIR=1 TEST_DEV=1 QA_CHECK_FS=1 mkfs.xfs -q {ag} -m uuid={EXT_UUID} -L {label} -p '{p}' '{i}'",
        ag = if size_mib < 300 { "-d agcount=1" } else { "" },
        i = img.display(),
        p = proto_path.display()
    ));
}
