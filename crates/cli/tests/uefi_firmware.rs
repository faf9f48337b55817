//! bhyve's own UEFI firmware (EDK2 `OvmfPkg/Bhyve/BhyveX64`, what FreeBSD's
//! sysutils/bhyve-firmware installs), built from Debian's source by
//! `scripts/build-uefi-firmware.sh`, booted with `-l bootrom,CODE,VARS`
//! and driven over COM1. A firmware boot takes minutes on a PVM host (the
//! firmware is ring-0 code, which KVM emulates there), so two runs on the
//! same VARS file check it all.
//!
//! Run 1, to the shell (the ESPs hold no boot loader yet), fwctl:
//! - the shell prompt;
//! - `smbiosview -t 4` shows the two processors of `-c 2`;
//! - `pci` lists bhyve's functions with bhyve's IDs (the firmware does not
//!   enumerate: it uses the BARs the VMM assigned);
//! - `map` shows a FAT file system on a GPT EFI system partition of a
//!   virtio-blk disk and of an ahci-hd disk, and `type` reads a file from
//!   each;
//! - `memmap` accounts for the memory given with `-m`;
//! - a variable set with `setvar -nv` reaches the VARS file, whose size does
//!   not change; `BootNext` is set to the shell's boot option;
//! - `reset` resets the guest: bhyve's exit status 0.
//!
//! Between the runs the host puts Debian's GRUB (`grub-mkstandalone`, its
//! grub.cfg embedded) at `\EFI\BOOT\BOOTX64.EFI` on the virtio-blk ESP
//! with Debian's cloud kernel beside it.
//!
//! Run 2, a new bhyve on the same VARS file, with `fwcfg=qemu`:
//! - the firmware starts the shell first: `BootNext` from run 1 persisted;
//! - `dmpstore` shows run 1's variable, non-volatile;
//! - the shell exits with an error status, and the firmware goes on with
//!   its boot order by itself: the virtio-blk disk's default boot option
//!   loads `\EFI\BOOT\BOOTX64.EFI`, GRUB, which boots Linux through its
//!   EFI stub;
//! - Linux's log shows it was started by the firmware (its `efi:` lines,
//!   bhyve's SMBIOS), on the firmware's own ACPI tables (not rhyve's at
//!   0xF2400), whose MADT lists the 2 vCPUs the firmware read from fw_cfg's
//!   `opt/bhyve/hw.ncpu` (with fwctl gone, nothing else tells it), as far
//!   as the direct-boot early-boot test goes; the VM is then stopped and
//!   the VARS file still has its size.

mod firmware;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use firmware::{firmware, strip_ansi};
use rhyve_guests::{debian_kernel, require_kvm, test_registry, vm_name};

/// From reset to the shell prompt; several minutes on a PVM host.
const BOOT_DEADLINE: Duration = Duration::from_secs(40 * 60);
/// One shell command's output.
const COMMAND_DEADLINE: Duration = Duration::from_secs(5 * 60);
const MEMORY_MIB: u64 = 256;
/// Our own vendor GUID for the test variable.
const VAR_GUID: &str = "5a0c8f9b-3c8e-4b4a-9d2e-726879766521";
const VAR_VALUE: &str = "rhyve-persists-0xC0FFEE";
/// EFI_GLOBAL_VARIABLE, the vendor GUID of `BootNext`.
const GLOBAL_GUID: &str = "8BE4DF61-93CA-11D2-AA0D-00E098032B8C";

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
    // 32 KiB clusters: GRUB reads a file a cluster at a time, each read a
    // round trip through the firmware's disk driver.
    sh(Command::new("mkfs.fat")
        .args(["--offset", "2048", "-s", "64", "-n", "ESP"])
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
    /// Bytes of the stripped output already consumed by
    /// [`Console::wait_for_first`].
    seen: usize,
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
        self.wait_for_first(&[needle], deadline).1
    }

    /// The first of `needles` to appear after the last wait: its index and
    /// the text up to and including it (what follows is left for the next
    /// wait).
    fn wait_for_first(&mut self, needles: &[&str], deadline: Duration) -> (usize, String) {
        let end = Instant::now() + deadline;
        loop {
            {
                // Offsets are into the whole stripped text: an escape
                // sequence still arriving strips to nothing either way.
                let text = self.all();
                let rest = text.get(self.seen..).unwrap_or_default();
                let first = needles
                    .iter()
                    .enumerate()
                    .filter_map(|(i, n)| rest.find(n).map(|at| (at + n.len(), i)))
                    .min();
                if let Some((len, i)) = first {
                    let consumed = rest[..len].to_string();
                    self.seen += len;
                    return (i, consumed);
                }
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "bhyve ended ({status}) before {needles:?}; console:\n{}",
                    self.all()
                );
            }
            if Instant::now() > end {
                let _ = self.child.kill();
                panic!(
                    "none of {needles:?} within {deadline:?}; console:\n{}",
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

/// A `-c 2` VM of [`MEMORY_MIB`] with both ESP disks, COM1 on stdio and
/// the firmware with `vars`; `fwcfg` names the firmware interface.
fn vm_args(code: &Path, vars: &Path, vblk: &Path, ahci: &Path, fwcfg: &str) -> Vec<String> {
    [
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
        &format!(
            "bootrom,{},{},fwcfg={fwcfg}",
            code.display(),
            vars.display()
        ),
        // This firmware (edk2 2022.11) does not enumerate PCI and only uses
        // BARs whose decoding is on; bhyve, like rhyve, leaves decoding off
        // with a boot ROM unless asked, as FreeBSD 15's release notes say.
        "-o",
        "pci.enable_bars=true",
        &vm_name("uefi"),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// Wait for bhyve to end and return its exit status.
fn exit_status(console: &mut Console, what: &str) -> Option<i32> {
    let end = Instant::now() + COMMAND_DEADLINE;
    loop {
        if let Some(s) = console.child.try_wait().unwrap() {
            return s.code();
        }
        assert!(Instant::now() < end, "{what}: bhyve did not end");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The ASCII column of the shell's hex dumps (`*...*` after the bytes),
/// lines joined: a dumped string reads whole even across lines.
fn dump_text(output: &str) -> String {
    output
        .lines()
        .filter_map(|l| {
            let (_, rest) = l.split_once('*')?;
            rest.rsplit_once('*').map(|(text, _)| text)
        })
        .collect()
}

/// The `Boot####` number of the shell's boot option in `bcfg boot dump`.
fn shell_boot_option(dump: &str) -> u16 {
    let mut current = None;
    for line in dump.lines() {
        if let Some((_, var)) = line.split_once("Variable: Boot") {
            current = u16::from_str_radix(var.trim().get(..4).unwrap_or(""), 16).ok();
        } else if line.contains("Desc") && line.contains("EFI Internal Shell") {
            if let Some(n) = current {
                return n;
            }
        }
    }
    panic!("bcfg boot dump lists no shell:\n{dump}")
}

/// Debian's GRUB as a standalone EFI image whose embedded grub.cfg boots
/// /vmlinuz with `cmdline`.
fn grub_image(dir: &Path, cmdline: &str) -> PathBuf {
    let cfg = dir.join("grub.cfg");
    std::fs::write(
        &cfg,
        format!(
            "set timeout=0\n\
             echo \"rhyve: GRUB from the ESP\"\n\
             search --no-floppy --file /vmlinuz --set=root\n\
             linux /vmlinuz {cmdline}\n\
             boot\n"
        ),
    )
    .unwrap();
    let image = dir.join("BOOTX64.EFI");
    sh(Command::new("grub-mkstandalone")
        .args(["-O", "x86_64-efi", "-o"])
        .arg(&image)
        // Only what the grub.cfg needs: a smaller image loads faster.
        .arg("--install-modules=linux normal part_gpt fat search search_fs_file echo")
        .args([
            "--modules=part_gpt fat",
            "--locales=",
            "--fonts=",
            "--themes=",
        ])
        .arg(format!("boot/grub/grub.cfg={}", cfg.display())));
    image
}

#[test]
fn bhyve_uefi_firmware_keeps_variables_and_boots_grub_and_linux() {
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

    // Run 1: the shell, fwctl.
    let started = Instant::now();
    let mut console = Console::spawn(&vm_args(&code, &vars, &vblk, &ahci, "bhyve"));
    // Any key skips startup.nsh's countdown.
    console.wait_for("any other key to continue", BOOT_DEADLINE);
    console.type_line("");
    console.wait_for("Shell> ", COMMAND_DEADLINE);
    eprintln!("run 1: UEFI shell prompt after {:?}", started.elapsed());

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
    // The next boot, and only that one, starts the shell first.
    let shell = shell_boot_option(&console.command("bcfg boot dump"));
    let [lo, hi] = shell.to_le_bytes();
    let set = console.command(&format!(
        "setvar BootNext -guid {GLOBAL_GUID} -nv -bs -rt =H{lo:02X}{hi:02X}"
    ));
    assert!(!set.contains("rror"), "setting BootNext failed:\n{set}");

    console.type_line("reset");
    assert_eq!(
        exit_status(&mut console, "reset"),
        Some(0),
        "a guest reset is exit status 0"
    );
    eprintln!("run 1: {:?}", started.elapsed());
    assert_eq!(std::fs::metadata(&vars).unwrap().len(), vars_size);

    // GRUB and the kernel on the virtio-blk ESP.
    let cmdline = "console=ttyS0 earlyprintk=serial panic=-1 rhyve.test=uefi-grub";
    let grub = grub_image(&dir, cmdline);
    let esp = format!("{}@@1M", vblk.display());
    sh(Command::new("mmd").args(["-i", &esp, "::/EFI", "::/EFI/BOOT"]));
    sh(Command::new("mcopy")
        .args(["-i", &esp])
        .arg(&grub)
        .arg("::/EFI/BOOT/BOOTX64.EFI"));
    sh(Command::new("mcopy")
        .args(["-i", &esp])
        .arg(debian_kernel())
        .arg("::/vmlinuz"));

    // Run 2: a new bhyve on the same VARS file, QEMU's fw_cfg.
    let started = Instant::now();
    let mut console = Console::spawn(&vm_args(&code, &vars, &vblk, &ahci, "qemu"));
    let (first, before_shell) = console.wait_for_first(
        &["any other key to continue", "rhyve: GRUB from the ESP"],
        BOOT_DEADLINE,
    );
    assert!(
        first == 0 && before_shell.contains("EFI Internal Shell"),
        "BootNext did not start the shell first:\n{before_shell}"
    );
    console.type_line("");
    console.wait_for("Shell> ", COMMAND_DEADLINE);
    eprintln!("run 2: UEFI shell prompt after {:?}", started.elapsed());
    let stored = console.command(&format!("dmpstore RhyveTest -guid {VAR_GUID}"));
    assert!(
        stored.contains("NV+BS") && dump_text(&stored).contains(VAR_VALUE),
        "run 1's variable is not there again:\n{stored}"
    );
    // An error status from the shell: the firmware goes on to the next
    // boot option, the virtio-blk disk's.
    console.type_line("exit 1");
    let grub = console.wait_for("rhyve: GRUB from the ESP", COMMAND_DEADLINE);
    assert!(
        grub.lines()
            .any(|l| l.contains("BdsDxe: starting Boot") && l.contains("Pci(0x3,0x0)")),
        "GRUB was not started from the virtio-blk disk's boot option:\n{grub}"
    );
    eprintln!("run 2: GRUB after {:?}", started.elapsed());
    let mut log = console.wait_for("smpboot: Allowing", BOOT_DEADLINE);
    log += &console.wait_for("Kernel command line:", COMMAND_DEADLINE);
    eprintln!(
        "run 2: Linux's early boot done after {:?}",
        started.elapsed()
    );
    let _ = console.child.kill();
    let _ = console.child.wait();
    let has = |needle: &str| {
        assert!(log.contains(needle), "Linux's log lacks {needle:?}:\n{log}");
    };
    has(&format!("Command line: BOOT_IMAGE=/vmlinuz {cmdline}"));
    // Started by bhyve's firmware, which hands Linux bhyve's SMBIOS and
    // its own ACPI tables.
    let efi = log
        .lines()
        .find(|l| l.contains("efi: EFI v2."))
        .unwrap_or_else(|| panic!("no efi: line:\n{log}"));
    assert!(efi.ends_with("by BHYVE"), "{efi}");
    has("efi: SMBIOS=");
    has("DMI: FreeBSD BHYVE/BHYVE, BIOS 14.0 10/17/2021");
    let rsdp = log
        .lines()
        .find(|l| l.contains("ACPI: RSDP 0x"))
        .unwrap_or_else(|| panic!("no RSDP:\n{log}"));
    assert!(
        !rsdp.contains("00000000000F2400"),
        "Linux used rhyve's tables, not the firmware's: {rsdp}"
    );
    for table in [
        "XSDT", "FACP", "APIC", "DSDT", "HPET", "MCFG", "FACS", "SPCR",
    ] {
        has(&format!("ACPI: {table} 0x"));
    }
    for bad in [
        "Incorrect checksum",
        "ACPI BIOS Warning",
        "ACPI BIOS Error",
        "ACPI Error",
        "ACPI Warning",
    ] {
        assert!(!log.contains(bad), "Linux's log reports {bad:?}:\n{log}");
    }
    // The firmware's MADT: 2 CPUs, the count fw_cfg gave it.
    has("ACPI: Using ACPI (MADT) for SMP configuration information");
    has("smpboot: Allowing 2 CPUs");
    assert_eq!(std::fs::metadata(&vars).unwrap().len(), vars_size);
    std::fs::remove_dir_all(&dir).unwrap();
}
