//! bhyve's own UEFI firmware (EDK2 `OvmfPkg/Bhyve/BhyveX64`, what FreeBSD's
//! sysutils/bhyve-firmware installs), built from Debian's source by
//! `scripts/build-uefi-firmware.sh`, booted with `-l bootrom,CODE,VARS` to
//! its shell over COM1. The boot takes minutes on a PVM host (the firmware
//! is ring-0 code, which KVM emulates there), so ONE boot checks it all:
//! - the shell prompt;
//! - `smbiosview -t 4` shows the two processors of `-c 2`;
//! - `pci` lists bhyve's functions with bhyve's IDs (the firmware does not
//!   enumerate: it uses the BARs the VMM assigned);
//! - `map` shows a FAT file system on a GPT EFI system partition of a
//!   virtio-blk disk and of an ahci-hd disk, and `type` reads a file from
//!   each;
//! - `memmap` accounts for the memory given with `-m`;
//! - a variable set with `setvar -nv` reaches the VARS file, whose size does
//!   not change;
//! - `reset -s` powers the VM off (bhyve exit status 1).

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rhyve_guests::{require_kvm, test_registry, vm_name, workspace_root};

/// From reset to the shell prompt; several minutes on a PVM host.
const BOOT_DEADLINE: Duration = Duration::from_secs(40 * 60);
/// One shell command's output.
const COMMAND_DEADLINE: Duration = Duration::from_secs(5 * 60);
const MEMORY_MIB: u64 = 256;
/// Our own vendor GUID for the test variable.
const VAR_GUID: &str = "5a0c8f9b-3c8e-4b4a-9d2e-726879766521";
const VAR_VALUE: &str = "rhyve-persists-0xC0FFEE";

/// The firmware images, built into the cache when missing.
fn firmware() -> (PathBuf, PathBuf) {
    let script = workspace_root().join("scripts/build-uefi-firmware.sh");
    let out = Command::new(&script)
        .stderr(Stdio::inherit())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
    assert!(out.status.success(), "{} failed", script.display());
    let text = String::from_utf8(out.stdout).unwrap();
    let mut lines = text.lines().map(PathBuf::from);
    let code = lines.next().expect("no CODE path");
    let vars = lines.next().expect("no VARS path");
    (code, vars)
}

fn sh(cmd: &mut Command) {
    let shown = format!("{cmd:?}");
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {shown}: {e}"));
    assert!(
        out.status.success(),
        "{shown}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A 64 MiB disk with a GPT whose one partition is an EFI system partition
/// holding a FAT file system with MARKER.TXT = `marker`.
fn esp_disk(path: &Path, marker: &str) {
    let f = std::fs::File::create(path).unwrap();
    f.set_len(64 << 20).unwrap();
    drop(f);
    let mut sfdisk = Command::new("sfdisk")
        .args(["-q"])
        .arg(path)
        .stdin(Stdio::piped())
        .spawn()
        .expect("sfdisk (fdisk package)");
    sfdisk
        .stdin
        .take()
        .unwrap()
        .write_all(
            b"label: gpt\nstart=2048, size=120000, type=C12A7328-F81F-11D2-BA4B-00A0C93EC93B\n",
        )
        .unwrap();
    assert!(sfdisk.wait().unwrap().success());
    sh(Command::new("mkfs.fat")
        .args(["--offset", "2048", "-n", "ESP"])
        .arg(path)
        .arg("60000"));
    let file = path.with_extension("marker");
    std::fs::write(&file, marker).unwrap();
    sh(Command::new("mcopy")
        .arg("-i")
        .arg(format!("{}@@1M", path.display()))
        .arg(&file)
        .arg("::/MARKER.TXT"));
    std::fs::remove_file(file).unwrap();
}

/// The serial console: what bhyve printed so far, ANSI escapes removed.
struct Console {
    child: Child,
    output: Arc<Mutex<Vec<u8>>>,
    /// Bytes of `output` already consumed by [`Console::wait_for`].
    seen: usize,
}

fn strip_ansi(raw: &[u8]) -> String {
    let text = String::from_utf8_lossy(raw);
    let mut out = String::new();
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            if chars.peek() == Some(&'[') {
                chars.next();
                for c in chars.by_ref() {
                    if c.is_ascii_alphabetic() {
                        break;
                    }
                }
            }
            continue;
        }
        if c != '\r' {
            out.push(c);
        }
    }
    out
}

impl Console {
    fn spawn(args: &[String]) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_bhyve"))
            .env("RHYVE_VMM_DIR", test_registry())
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("starting bhyve");
        let output = Arc::new(Mutex::new(Vec::new()));
        let sink = output.clone();
        let mut stdout = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            let mut chunk = [0u8; 4096];
            while let Ok(n) = stdout.read(&mut chunk) {
                if n == 0 {
                    break;
                }
                sink.lock().unwrap().extend_from_slice(&chunk[..n]);
            }
        });
        Self {
            child,
            output,
            seen: 0,
        }
    }

    /// The text after the last wait, up to and including `needle`.
    fn wait_for(&mut self, needle: &str, deadline: Duration) -> String {
        let end = Instant::now() + deadline;
        loop {
            {
                let raw = self.output.lock().unwrap();
                let text = strip_ansi(&raw[self.seen..]);
                if let Some(at) = text.find(needle) {
                    // Consume everything up to the end of the match.
                    let consumed = text[..at + needle.len()].to_string();
                    self.seen = raw.len();
                    return consumed;
                }
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "bhyve ended ({status}) before {needle:?}; console:\n{}",
                    self.all()
                );
            }
            if Instant::now() > end {
                let _ = self.child.kill();
                panic!(
                    "no {needle:?} within {deadline:?}; console:\n{}",
                    self.all()
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn all(&self) -> String {
        strip_ansi(&self.output.lock().unwrap())
    }

    /// Type `line` at the shell, one key at a time as a terminal would.
    fn type_line(&mut self, line: &str) {
        let stdin = self.child.stdin.as_mut().unwrap();
        for b in line.bytes().chain([b'\r']) {
            stdin.write_all(&[b]).unwrap();
            stdin.flush().unwrap();
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Run a shell command and return its output (up to the next prompt).
    fn command(&mut self, line: &str) -> String {
        self.type_line(line);
        self.wait_for("Shell> ", COMMAND_DEADLINE)
    }
}

#[test]
fn bhyve_uefi_firmware_boots_to_its_shell() {
    require_kvm();
    let (code, vars_template) = firmware();
    let dir = std::env::temp_dir().join(format!("rhyve-uefi-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let vars = dir.join("vars.fd");
    std::fs::copy(&vars_template, &vars).unwrap();
    let vars_size = std::fs::metadata(&vars).unwrap().len();
    let (vblk, ahci) = (dir.join("vblk.img"), dir.join("ahci.img"));
    esp_disk(&vblk, "marker-on-virtio-blk");
    esp_disk(&ahci, "marker-on-ahci-hd");
    let args: Vec<String> = [
        "-c",
        "2",
        "-m",
        &format!("{MEMORY_MIB}M"),
        "-s",
        "0,hostbridge",
        "-s",
        &format!("3,virtio-blk,{}", vblk.display()),
        "-s",
        &format!("4,ahci-hd,{}", ahci.display()),
        "-s",
        "31,lpc",
        "-l",
        "com1,stdio",
        "-l",
        &format!("bootrom,{},{}", code.display(), vars.display()),
        // This firmware (edk2 2022.11) does not enumerate PCI and only uses
        // BARs whose decoding is on; bhyve, like rhyve, leaves decoding off
        // with a boot ROM unless asked, as FreeBSD 15's release notes say.
        "-o",
        "pci.enable_bars=true",
        &vm_name("uefi"),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let started = Instant::now();
    let mut console = Console::spawn(&args);
    // Any key skips startup.nsh's countdown.
    console.wait_for("any other key to continue", BOOT_DEADLINE);
    console.type_line("");
    console.wait_for("Shell> ", COMMAND_DEADLINE);
    eprintln!("UEFI shell prompt after {:?}", started.elapsed());

    let pci = console.command("pci");
    for (what, ids) in [
        ("host bridge", "Vendor 1275 Device 1275"),
        ("virtio-blk", "Vendor 1AF4 Device 1001"),
        ("ahci-hd", "Vendor 8086 Device 2821"),
        ("LPC", "Vendor 8086 Device 7000"),
    ] {
        assert!(pci.contains(ids), "pci lacks the {what} ({ids}):\n{pci}");
    }

    // The firmware installs bhyve's SMBIOS table: one processor per vCPU.
    let smbios = console.command("smbiosview -t 4");
    let processors = smbios
        .matches("Structure Type: Processor Information")
        .count();
    assert_eq!(processors, 2, "-c 2 but smbiosview -t 4 shows:\n{smbios}");

    let map = console.command("map -r");
    for (what, path) in [
        ("virtio-blk", "Pci(0x3,0x0)/HD(1,GPT,"),
        ("ahci-hd", "Pci(0x4,0x0)/Sata("),
    ] {
        assert!(
            map.lines()
                .any(|l| l.contains(path) && l.contains("HD(1,GPT,")),
            "map lacks the ESP on the {what} disk ({path}):\n{map}"
        );
    }
    let mut markers = String::new();
    for fs in ["fs0", "fs1"] {
        markers += &console.command(&format!("type {fs}:\\MARKER.TXT"));
    }
    for marker in ["marker-on-virtio-blk", "marker-on-ahci-hd"] {
        assert!(
            markers.contains(marker),
            "no FAT file system holds {marker}:\n{markers}"
        );
    }

    // memmap's total leaves out MMIO (the flash) and the legacy hole
    // 0xA0000-0xFFFFF, which is not RAM in the firmware's map.
    let memmap = console.command("memmap");
    let total = memmap
        .lines()
        .find_map(|l| l.trim().strip_prefix("Total Memory:"))
        .and_then(|rest| {
            let bytes = rest.split('(').nth(1)?.split_whitespace().next()?;
            bytes.replace(',', "").parse::<u64>().ok()
        })
        .unwrap_or_else(|| panic!("memmap has no total:\n{memmap}"));
    assert_eq!(
        total,
        (MEMORY_MIB << 20) - 0x60000,
        "memmap's total for -m {MEMORY_MIB}M:\n{memmap}"
    );

    let set = console.command(&format!(
        "setvar RhyveTest -guid {VAR_GUID} -nv -bs =\"{VAR_VALUE}\""
    ));
    assert!(!set.contains("rror"), "setvar failed:\n{set}");
    let store = std::fs::read(&vars).unwrap();
    assert_eq!(
        store.len() as u64,
        vars_size,
        "the VARS file's size changed"
    );
    assert!(
        store
            .windows(VAR_VALUE.len())
            .any(|w| w == VAR_VALUE.as_bytes()),
        "the variable's bytes are not in the VARS file"
    );

    console.type_line("reset -s");
    let status = {
        let end = Instant::now() + COMMAND_DEADLINE;
        loop {
            if let Some(s) = console.child.try_wait().unwrap() {
                break s;
            }
            assert!(Instant::now() < end, "reset -s did not power off");
            std::thread::sleep(Duration::from_millis(200));
        }
    };
    assert_eq!(status.code(), Some(1), "power-off is exit status 1");
    std::fs::remove_dir_all(&dir).unwrap();
}
