//! A virtio-blk disk read through the legacy virtio-pci interface by our
//! `virtioblk` guest (crates/guests/guest/virtioblk.c): queue set-up in I/O
//! BAR 0, one read of sector 0, completion by MSI-X or by INTx.

use std::path::{Path, PathBuf};

use rhyve_guests::{run_guest, vm_name, RunResult};

const SECTOR0: &[u8; 16] = b"rhyve-virtio-blk";

/// A 1 MiB disk image whose first bytes are [`SECTOR0`]; removed on drop.
struct Disk(PathBuf);

impl Disk {
    fn new(tag: &str) -> Self {
        let path = std::env::temp_dir().join(format!("{}.img", vm_name(tag)));
        let mut image = vec![0u8; 1 << 20];
        image[..SECTOR0.len()].copy_from_slice(SECTOR0);
        std::fs::write(&path, image).expect("write the disk image");
        Disk(path)
    }
}

impl Drop for Disk {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn read_sector0(cmdline: &str, tag: &str) -> RunResult {
    let disk = Disk::new(tag);
    let slot = format!("4,virtio-blk,{}", disk.0.display());
    let run = run_guest(
        Path::new(env!("CARGO_BIN_EXE_bhyve")),
        "virtioblk",
        cmdline,
        &["-s", &slot],
        tag,
    );
    run.assert_no_failure();
    run.assert_code(1);
    run.assert_line("virtio-blk 00:04.0 capacity 2048 queue 128");
    let hex: Vec<String> = SECTOR0.iter().map(|b| format!("{b:02x}")).collect();
    run.assert_line(&format!("sector0 {}", hex.join(" ")));
    run.assert_line("virtio-blk ok");
    run
}

#[test]
fn sector_0_read_completes_with_msix() {
    read_sector0("", "vblk-msix").assert_line("virtio-blk irq msix");
}

#[test]
fn sector_0_read_completes_with_intx() {
    read_sector0("intx", "vblk-intx").assert_line("virtio-blk irq intx");
}

/// bhyve retries any failed read-write open of a disk read-only, not only
/// EROFS/EACCES: here a running program's file (ETXTBSY for writing).
#[test]
fn a_disk_that_cannot_be_opened_for_writing_is_used_read_only() {
    let disk = std::env::temp_dir().join(vm_name("vblk-busy"));
    std::fs::copy("/bin/sleep", &disk).unwrap();
    // Another test thread forking while the copy was open for writing can
    // hold it open a moment longer (ETXTBSY): try again then.
    let mut attempts = 0;
    let mut running = loop {
        match std::process::Command::new(&disk).arg("60").spawn() {
            Ok(child) => break child,
            Err(e) if e.kind() == std::io::ErrorKind::ExecutableFileBusy && attempts < 50 => {
                attempts += 1;
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            Err(e) => panic!("cannot run {}: {e}", disk.display()),
        }
    };
    let slot = format!("4,virtio-blk,{}", disk.display());
    let run = run_guest(
        Path::new(env!("CARGO_BIN_EXE_bhyve")),
        "virtioblk",
        "",
        &["-s", &slot],
        "vblk-busy",
    );
    let _ = running.kill();
    let _ = running.wait();
    let _ = std::fs::remove_file(&disk);
    run.assert_no_failure();
    run.assert_code(1);
    assert!(
        run.stdout
            .lines()
            .any(|l| l.starts_with("sector0 7f 45 4c 46")),
        "the guest reads the program's ELF header: {}",
        run.stdout
    );
    assert!(
        run.stderr.contains("cannot open read-write") && run.stderr.contains("read-only"),
        "a warning names the fallback: {}",
        run.stderr
    );
}
