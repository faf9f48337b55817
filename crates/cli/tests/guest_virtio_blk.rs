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
