//! Debian's `grub-reboot` on a grub-bhyve guest: grub-editenv (Debian's
//! own, the outside judge of the file format) puts a one-shot
//! `next_entry` in /boot/grub/grubenv; the first `grub-bhyve` run boots
//! that entry and, through grub.cfg's `save_env next_entry`, clears it in
//! the guest's disk image, rewriting the file's blocks in place; the
//! second run boots the default entry again. Where the file system or the
//! disk cannot be written in place, `save_env` says so and the boot goes on.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

fn bin(name: &str) -> PathBuf {
    Path::new(env!("CARGO_BIN_EXE_bhyve")).with_file_name(name)
}

fn sh(cmd: &str) -> String {
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!("PATH=$PATH:/usr/sbin:/sbin; {cmd}"))
        .output()
        .expect("sh");
    assert!(
        out.status.success(),
        "{cmd}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Debian 12's 00_header logic around grubenv, and two entries that tell
/// themselves apart by their command line.
const GRUB_CFG: &str = r#"if [ -s $prefix/grubenv ]; then
  set have_grubenv=true
  load_env
fi
if [ "${next_entry}" ] ; then
   set default="${next_entry}"
   set next_entry=
   save_env next_entry
   set boot_once=true
else
   set default="0"
fi
set timeout=0
menuentry 'Debian GNU/Linux' --class debian $menuentry_id_option 'gnulinux-simple' {
	linux	/boot/vmlinuz root=/dev/vda1 ro quiet default-entry
}
menuentry 'Debian GNU/Linux (one-shot)' --class debian $menuentry_id_option 'gnulinux-once' {
	linux	/boot/vmlinuz root=/dev/vda1 ro one-shot-entry
}
"#;

struct Work {
    dir: PathBuf,
}

impl Work {
    fn new(tag: &str) -> Work {
        let dir =
            std::env::temp_dir().join(format!("rhyve-grub-reboot-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("root/boot/grub")).unwrap();
        std::fs::copy(
            rhyve_guests::guest_path("exitcodes"),
            dir.join("root/boot/vmlinuz"),
        )
        .unwrap();
        std::fs::write(dir.join("root/boot/grub/grub.cfg"), GRUB_CFG).unwrap();
        // grub-reboot: grub-editenv's block with the one-shot entry.
        let env = dir.join("root/boot/grub/grubenv");
        sh(&format!("grub-editenv '{}' create", env.display()));
        sh(&format!(
            "grub-editenv '{}' set saved_entry=0 'next_entry=Debian GNU/Linux (one-shot)'",
            env.display()
        ));
        Work { dir }
    }

    /// An MBR disk whose partition 1 (at 1 MiB) is `part`.
    fn mbr_disk(&self, part: &Path, part_type: &str) -> PathBuf {
        let disk = self.dir.join("disk.img");
        let size = std::fs::metadata(part).unwrap().len() / 512;
        sh(&format!(
            "rm -f '{d}'; truncate -s {} '{d}' && printf 'label: dos\\nstart=2048, size={size}, type={part_type}\\n' | sfdisk -q '{d}' && dd if='{p}' of='{d}' bs=512 seek=2048 conv=notrunc status=none",
            (size + 4096) * 512,
            d = disk.display(),
            p = part.display()
        ));
        disk
    }

    /// Partition 1 of the disk, copied out for the host's own tools.
    fn part_of(&self, disk: &Path) -> PathBuf {
        let part = self.dir.join("out-part.img");
        sh(&format!(
            "dd if='{}' of='{}' bs=512 skip=2048 status=none",
            disk.display(),
            part.display()
        ));
        part
    }

    fn grub_bhyve(&self, disk: &Path, root: &str) -> (Output, String) {
        std::fs::write(
            self.dir.join("device.map"),
            format!("(hd0) {}\n", disk.display()),
        )
        .unwrap();
        let out = Command::new(bin("grub-bhyve"))
            .args(["-m", "device.map", "-r", root, "-M", "128M", "rebootvm"])
            .current_dir(&self.dir)
            .env("RHYVE_VMM_DIR", self.dir.join("vmm"))
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let vm = std::fs::read_to_string(self.dir.join("vmm/rebootvm/vm.json")).unwrap_or_default();
        (out, vm)
    }

    /// grub-editenv's view of a grubenv file, and the file's size.
    fn editenv_list(&self, env: &Path) -> (String, u64) {
        (
            sh(&format!("grub-editenv '{}' list", env.display())),
            std::fs::metadata(env).unwrap().len(),
        )
    }
}

impl Drop for Work {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Boot twice; after the first, `read_env` copies the guest's grubenv out.
fn one_shot_then_default(w: &Work, disk: &Path, root: &str, read_env: &dyn Fn(&Path) -> PathBuf) {
    let before = std::fs::read(disk).unwrap();
    let (out, vm) = w.grub_bhyve(disk, root);
    assert!(out.status.success(), "first run: {}", text(&out));
    assert!(!text(&out).contains("error:"), "first run: {}", text(&out));
    assert!(
        vm.contains("one-shot-entry"),
        "the one-shot entry booted: {vm}"
    );
    let after = std::fs::read(disk).unwrap();
    assert_eq!(before.len(), after.len(), "the disk keeps its size");
    let changed = before.iter().zip(&after).filter(|(a, b)| a != b).count();
    assert!(
        (1..=1024).contains(&changed),
        "only the environment block changed ({changed} bytes)"
    );
    let env = read_env(&w.part_of(disk));
    let (list, size) = w.editenv_list(&env);
    assert_eq!(size, 1024, "grubenv keeps GRUB's block size");
    assert!(list.contains("next_entry=\n"), "next_entry cleared: {list}");
    assert!(
        list.contains("saved_entry=0\n"),
        "other variables kept: {list}"
    );

    let (out, vm) = w.grub_bhyve(disk, root);
    assert!(out.status.success(), "second run: {}", text(&out));
    assert!(
        vm.contains("default-entry"),
        "the default entry booted: {vm}"
    );
}

#[test]
fn grub_reboot_one_shot_entry_on_ext4() {
    let w = Work::new("ext4");
    let part = w.dir.join("p1.ext4");
    sh(&format!(
        "mke2fs -q -F -t ext4 -d '{}' '{}' 8M",
        w.dir.join("root").display(),
        part.display()
    ));
    let disk = w.mbr_disk(&part, "83");
    one_shot_then_default(&w, &disk, "hd0,msdos1", &|p| {
        let out = w.dir.join("grubenv.out");
        sh(&format!(
            "rm -f '{o}'; debugfs -R 'dump /boot/grub/grubenv {o}' '{}' 2>/dev/null",
            p.display(),
            o = out.display()
        ));
        out
    });
}

#[test]
fn grub_reboot_one_shot_entry_on_fat() {
    let w = Work::new("fat");
    let part = w.dir.join("p1.fat");
    sh(&format!(
        "mkfs.vfat -C -F 16 '{p}' 16384 >/dev/null && MTOOLS_SKIP_CHECK=1 mcopy -s -i '{p}' '{}'/* ::/",
        w.dir.join("root").display(),
        p = part.display()
    ));
    let disk = w.mbr_disk(&part, "e");
    one_shot_then_default(&w, &disk, "hd0,msdos1", &|p| {
        let out = w.dir.join("grubenv.out");
        sh(&format!(
            "rm -f '{o}'; MTOOLS_SKIP_CHECK=1 mcopy -i '{}' ::/boot/grub/grubenv '{o}'",
            p.display(),
            o = out.display()
        ));
        out
    });
}

/// An install CD cannot be written: `save_env` says why, the one-shot
/// entry still boots (as GRUB would), and the image is untouched.
#[test]
fn save_env_on_an_iso_is_refused_clearly() {
    let w = Work::new("iso");
    let iso = w.dir.join("cd.iso");
    sh(&format!(
        "xorriso -as mkisofs -quiet -R -J -o '{}' '{}'",
        iso.display(),
        w.dir.join("root").display()
    ));
    let before = std::fs::read(&iso).unwrap();
    let (out, vm) = w.grub_bhyve(&iso, "hd0");
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("error: save_env: cannot write files in place on iso9660"),
        "{}",
        text(&out)
    );
    assert!(vm.contains("one-shot-entry"), "{vm}");
    assert_eq!(std::fs::read(&iso).unwrap(), before);
}

/// A grubenv that is not GRUB's block is left alone, as GRUB refuses it.
#[test]
fn save_env_refuses_a_file_that_is_not_an_environment_block() {
    let w = Work::new("notblock");
    std::fs::write(
        w.dir.join("root/boot/grub/grubenv"),
        "next_entry=Debian GNU/Linux (one-shot)\n",
    )
    .unwrap();
    let part = w.dir.join("p1.ext4");
    sh(&format!(
        "mke2fs -q -F -t ext4 -d '{}' '{}' 8M",
        w.dir.join("root").display(),
        part.display()
    ));
    let disk = w.mbr_disk(&part, "83");
    let before = std::fs::read(&disk).unwrap();
    let (out, vm) = w.grub_bhyve(&disk, "hd0,msdos1");
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("invalid environment block"),
        "{}",
        text(&out)
    );
    assert!(vm.contains("default-entry"), "{vm}");
    assert_eq!(std::fs::read(&disk).unwrap(), before);
}

#[test]
fn grub_reboot_one_shot_entry_on_xfs() {
    let w = Work::new("xfs");
    let root = w.dir.join("root");
    let proto = w.dir.join("proto");
    std::fs::write(
        &proto,
        format!(
            "/dev/null\n0 0\nd--755 0 0\nboot d--755 0 0\nvmlinuz ---644 0 0 {r}/boot/vmlinuz\ngrub d--755 0 0\ngrub.cfg ---644 0 0 {r}/boot/grub/grub.cfg\ngrubenv ---644 0 0 {r}/boot/grub/grubenv\n$\n$\n$\n",
            r = root.display()
        ),
    )
    .unwrap();
    let part = w.dir.join("p1.xfs");
    // Below 300 MiB mkfs.xfs wants to be told this is a test volume.
    sh(&format!(
        "truncate -s 16M '{p}' && TEST_DIR=1 TEST_DEV=1 QA_CHECK_FS=1 mkfs.xfs -q -d agcount=1 -p '{}' '{p}'",
        proto.display(),
        p = part.display()
    ));
    let disk = w.mbr_disk(&part, "83");
    // No host tool reads XFS without mounting: the second boot is the judge.
    let before = std::fs::read(&disk).unwrap();
    let (out, vm) = w.grub_bhyve(&disk, "hd0,msdos1");
    assert!(out.status.success(), "first run: {}", text(&out));
    assert!(!text(&out).contains("error:"), "first run: {}", text(&out));
    assert!(vm.contains("one-shot-entry"), "{vm}");
    let after = std::fs::read(&disk).unwrap();
    let changed = before.iter().zip(&after).filter(|(a, b)| a != b).count();
    assert!((1..=1024).contains(&changed), "{changed} bytes changed");
    let (out, vm) = w.grub_bhyve(&disk, "hd0,msdos1");
    assert!(out.status.success(), "second run: {}", text(&out));
    assert!(vm.contains("default-entry"), "{vm}");
}

/// `linux` of a file that is not a kernel fails at the prompt with GRUB's
/// message, and the session goes on to boot a real one.
#[test]
fn linux_of_a_file_that_is_not_a_kernel_fails_at_the_prompt() {
    let w = Work::new("notkernel");
    std::fs::remove_file(w.dir.join("root/boot/grub/grub.cfg")).unwrap();
    let part = w.dir.join("p1.ext4");
    sh(&format!(
        "mke2fs -q -F -t ext4 -d '{}' '{}' 8M",
        w.dir.join("root").display(),
        part.display()
    ));
    let disk = w.mbr_disk(&part, "83");
    std::fs::write(
        w.dir.join("device.map"),
        format!("(hd0) {}\n", disk.display()),
    )
    .unwrap();
    let mut child = Command::new(bin("grub-bhyve"))
        .args([
            "-m",
            "device.map",
            "-r",
            "hd0,msdos1",
            "-M",
            "128M",
            "kernelvm",
        ])
        .current_dir(&w.dir)
        .env("RHYVE_VMM_DIR", w.dir.join("vmm"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"linux /boot/grub/grubenv\rboot\rlinux /boot/vmlinuz good-kernel\rboot\r")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let all = text(&out);
    assert!(out.status.success(), "{all}");
    assert!(all.contains("error: invalid magic number."), "{all}");
    assert!(
        all.contains("error: you need to load the kernel first."),
        "{all}"
    );
    let vm = std::fs::read_to_string(w.dir.join("vmm/kernelvm/vm.json")).unwrap();
    assert!(vm.contains("good-kernel"), "{vm}");
}
