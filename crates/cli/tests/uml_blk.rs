//! Linux's virtio_blk driver (user-mode-linux over vhost-user) on our
//! virtio-blk backend: size and read-only flag, a filesystem written,
//! synced and read back on the host, and discard punching holes.

mod common;

use std::os::unix::io::AsRawFd;
use std::time::Duration;

use common::*;

const MIB: u64 = 1 << 20;

#[test]
fn uml_virtio_blk_filesystem_and_discard() {
    ensure_packages();
    let s = Scratch::new("blk");
    let image = s.path("disk.img");
    // Fully allocated and non-zero, so discard has something to free.
    std::fs::write(&image, vec![0x5Au8; (96 * MIB) as usize]).unwrap();
    let payload = pattern(3 * MIB as usize + 123, 7);
    let script = "\
        echo \"SIZE $(cat /sys/block/vda/size) RO $(cat /sys/block/vda/ro)\"\n\
        blkdiscard -o 83886080 -l 16777216 /dev/vda && echo DISCARD-OK\n\
        mke2fs -q /dev/vda 65536 && mount -t ext2 /dev/vda /mnt && echo MOUNTED\n\
        cp /payload /mnt/payload && sync && echo \"SUM $(md5sum /mnt/payload)\"\n\
        umount /mnt && echo UNMOUNTED\n\
        mount -t ext2 -o ro /dev/vda /mnt && echo \"RESUM $(md5sum /mnt/payload)\" && umount /mnt\n";
    let initrd = initramfs(
        &s.0,
        &["drivers/block/virtio_blk.ko"],
        &[("payload", &payload)],
        script,
    );
    let sock = s.path("blk.sock");
    let backend = start_backend(&s, &sock, &format!("virtio-blk,{}", image.display()), None);
    let out = run_uml(
        &initrd,
        &[format!("{}:2", sock.display())],
        Duration::from_secs(120),
    );
    drop(backend);
    println!("{out}");

    assert_eq!(console_value(&out, "SIZE"), Some("196608 RO 0"), "{out}");
    assert!(out.contains("DISCARD-OK"), "{out}");
    assert!(
        out.contains("MOUNTED") && out.contains("UNMOUNTED"),
        "{out}"
    );
    let want = md5_hex(&payload);
    let sum = console_value(&out, "SUM").expect("guest checksum");
    assert!(sum.starts_with(&want), "guest wrote {sum}, expected {want}");
    let resum = console_value(&out, "RESUM").expect("guest re-read checksum");
    assert!(resum.starts_with(&want), "guest re-read {resum}");

    // The host sees the same bytes in the image.
    let dumped = s.path("payload.out");
    let status = std::process::Command::new("debugfs")
        .arg("-R")
        .arg(format!("dump /payload {}", dumped.display()))
        .arg(&image)
        .output()
        .unwrap();
    assert!(status.status.success(), "debugfs failed");
    assert_eq!(
        std::fs::read(&dumped).unwrap(),
        payload,
        "image content differs"
    );

    // The discarded range is a hole and reads as zeroes.
    let f = std::fs::File::open(&image).unwrap();
    // SAFETY: lseek on our own fd.
    let next_data = unsafe { libc::lseek(f.as_raw_fd(), (80 * MIB) as i64, libc::SEEK_DATA) };
    assert!(
        next_data < 0 || next_data as u64 >= 96 * MIB,
        "data found at {next_data:#x} inside the discarded range"
    );
    let tail = std::fs::read(&image).unwrap();
    assert!(tail[(80 * MIB) as usize..].iter().all(|&b| b == 0));
    assert!(tail[(70 * MIB) as usize..(80 * MIB) as usize]
        .iter()
        .all(|&b| b == 0x5A));
}

#[test]
fn uml_virtio_blk_read_only() {
    ensure_packages();
    let s = Scratch::new("blk-ro");
    let image = s.path("disk.img");
    let content = pattern((64 * MIB) as usize, 3);
    std::fs::write(&image, &content).unwrap();
    let script = "\
        echo \"SIZE $(cat /sys/block/vda/size) RO $(cat /sys/block/vda/ro)\"\n\
        echo \"HEAD $(dd if=/dev/vda bs=4096 count=16 2>/dev/null | md5sum)\"\n\
        dd if=/dev/zero of=/dev/vda bs=4096 count=1 oflag=direct 2>/dev/null && echo WRITE-OK || echo WRITE-REFUSED\n";
    let initrd = initramfs(&s.0, &["drivers/block/virtio_blk.ko"], &[], script);
    let sock = s.path("blk.sock");
    let backend = start_backend(
        &s,
        &sock,
        &format!("virtio-blk,{},ro", image.display()),
        None,
    );
    let out = run_uml(
        &initrd,
        &[format!("{}:2", sock.display())],
        Duration::from_secs(120),
    );
    drop(backend);
    println!("{out}");
    assert_eq!(console_value(&out, "SIZE"), Some("131072 RO 1"), "{out}");
    let head = console_value(&out, "HEAD").expect("guest read");
    assert!(head.starts_with(&md5_hex(&content[..65536])), "{head}");
    assert!(out.contains("WRITE-REFUSED"), "{out}");
    assert_eq!(std::fs::read(&image).unwrap(), content);
}
