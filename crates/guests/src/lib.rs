//! rhyve's own test guests, and the harness that runs them under `bhyve`.
//!
//! Each guest is a small freestanding program (C plus a little assembly in
//! `guest/`, built by `build.rs` with gcc) booted through the PVH entry
//! note with `-o boot.kernel=`. It reads its mode from the command line,
//! prints lines on COM1 and ends in a defined way: most power off through
//! ACPI S5 (bhyve exit 1) when done and print `FAIL: ...` then triple-fault
//! (exit 3) when something is wrong. See each `guest/<name>.c` for what it
//! checks and prints.
//!
//! | guest | command line | prints | ends |
//! |---|---|---|---|
//! | `exitcodes` | `reset`, `kbdreset`, `poweroff`, `halt`, `triplefault`, `debugexit=N` | `exitcodes: <mode>` | by that action: exit 0, 0, 1, 2, 3, 2N+1 (`-l pc-testdev`) |
//! | `powerbutton` | (`noacpi`) | `ready`, then on SIGTERM `power button` | S5 (exit 1); with `noacpi` SIGTERM kills bhyve |
//! | `pcienum` | | `pci 00:1f.0 8086:7000 class 060100` per function via 0xCF8, the same with `ecam`, `pci agree N functions` | S5 |
//! | `cmos` | | `cmos lowmem 0x1f00`, `cmos highmem 0x000000`, `rtc 2026-11-22 02:02:00` | S5 |
//! | `pmtimer` | | `pmtimer hz 3579545` (PM timer ticks over one RTC second) | S5 |
//! | `com1irq` | | `com1 irq ok` (THR-empty interrupt on IOAPIC pin 4) | S5 |
//! | `acpitables` | | `rsdp 0x000f2400 rev 2`, `xsdt N entries`, `table SIG` each, `madt ...`, `acpi ok` | S5 |
//! | `smp` | | `bsp 0, madt lists N cpus`, `ap K up` per AP, `cpus N` | S5 |
//! | `virtioblk` | (`intx`) (`slot=N`) | `virtio-blk 00:04.0 capacity C queue Q`, `virtio-blk irq msix\|intx`, `sector0 xx ...` (16 bytes), `virtio-blk ok` | S5 |
//! | `cpuid` | | `cpuid hypervisor 'bhyve bhyve ' max 0x40000001`, leaf 1 APIC ID / count / x2APIC bit, leaf 0xB levels | S5 |
//! | `rebootonce` | | `rebootonce: boot 1` then resets; `rebootonce: boot 2` (RTC NVRAM kept by the named VM) | reset, then S5 |
//! | `snapcheck` | | `snapcheck round R` every 10 of 120 rounds (each stirs 16 KiB into a checksum and writes one virtio-blk sector at slot 4), `snapcheck checksum C`, `snapcheck disk ok` | S5 |
//! | `ring3` | | per way into the kernel from ring 3 (`int80-64`, `syscall-64`, `int80-32`, `syscall-32`, `ud2-64`): `ring3 <step> via <gate 0x80\|vector N> at +<offset> from cs 0x<cs> handler cs 0x<cs>`; `ring3 lstar cs ... cstar cs ... cstar rip high\|low`; `ring3 done` | S5 |
//!
//! Besides these, `linux-init/init.c` is the `/init` of the full Linux
//! boot (`scripts/full-boot.sh`), a Linux user program: see
//! [`linux_init_path`].
//!
//! Interrupt handlers return with `popf; ret` instead of `iret`: on this
//! host's KVM (PVM) every ring-0 instruction goes through KVM's emulator,
//! which cannot emulate `iret` outside real mode (nor `int n`).
//!
//! The harness runs the `bhyve` binary with a deadline, captures COM1
//! (`-l com1,stdio`) and the exit status, and can send a signal once a
//! given line appeared (the ACPI power button is SIGTERM).

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

include!(concat!(env!("OUT_DIR"), "/guests.rs"));

/// The ELF (PVH entry) of the named guest.
///
/// # Panics
/// If `name` is not one of [`GUESTS`].
pub fn guest_path(name: &str) -> PathBuf {
    assert!(
        GUESTS.contains(&name),
        "no guest program named {name:?} (have {GUESTS:?})"
    );
    PathBuf::from(env!("OUT_DIR")).join(format!("{name}.elf"))
}

/// The flat boot ROM image built from `rom/<name>.S`, for `-l bootrom`.
pub fn rom_path(name: &str) -> PathBuf {
    let path = PathBuf::from(env!("OUT_DIR")).join(format!("{name}.rom"));
    assert!(path.exists(), "no boot ROM named {name:?} (rom/{name}.S)");
    path
}

/// The full Linux boot's `/init` (`linux-init/init.c`): a static x86-64
/// program that mounts /proc, prints `BOOT-OK uptime ...` and powers off,
/// making its system calls in a way software-virtualization hosts deliver.
pub fn linux_init_path() -> PathBuf {
    PathBuf::from(env!("OUT_DIR")).join("linux-init")
}

/// The smallest machine the guests expect: host bridge, LPC, COM1 on stdio.
pub const BASE_MACHINE: &[&str] = &["-s", "0,hostbridge", "-s", "31,lpc", "-l", "com1,stdio"];

/// `-o boot.kernel=<guest>` and, unless empty, `-o boot.cmdline=<cmdline>`.
pub fn boot_args(guest: &str, cmdline: &str) -> Vec<String> {
    let mut args = vec![
        "-o".to_string(),
        format!("boot.kernel={}", guest_path(guest).display()),
    ];
    if !cmdline.is_empty() {
        args.push("-o".to_string());
        args.push(format!("boot.cmdline={cmdline}"));
    }
    args
}

/// bhyve's arguments for booting `guest` (with `cmdline`) on
/// [`BASE_MACHINE`] plus `extra`, as the VM [`vm_name`]`(tag)`.
pub fn guest_args(guest: &str, cmdline: &str, extra: &[&str], tag: &str) -> Vec<String> {
    let mut args = boot_args(guest, cmdline);
    args.extend(BASE_MACHINE.iter().chain(extra).map(|s| s.to_string()));
    args.push(vm_name(tag));
    args
}

/// Boots `guest` under `bhyve` as [`guest_args`] describes, with the
/// guests' usual 30-second deadline. Panics without /dev/kvm.
pub fn run_guest(bhyve: &Path, guest: &str, cmdline: &str, extra: &[&str], tag: &str) -> RunResult {
    require_kvm();
    run_bhyve(
        bhyve,
        &guest_args(guest, cmdline, extra, tag),
        Duration::from_secs(30),
    )
}

/// Wait until `child` (started with a piped stdout) prints the line `want`,
/// for at most `within`; the child is killed and the test fails otherwise.
/// Its stdout is left for the caller to go on reading.
pub fn wait_for_line(
    child: &mut Child,
    want: &str,
    within: Duration,
) -> std::io::BufReader<std::process::ChildStdout> {
    use std::io::BufRead;
    let mut stdout = std::io::BufReader::new(child.stdout.take().expect("a piped stdout"));
    let deadline = Instant::now() + within;
    let mut line = String::new();
    while line.trim_end() != want {
        line.clear();
        if stdout.read_line(&mut line).unwrap_or(0) == 0 || Instant::now() > deadline {
            let _ = child.kill();
            panic!("the guest never said {want:?}: {:?}", child.wait());
        }
    }
    stdout
}

/// Panics unless /dev/kvm exists: tests that boot guests never skip.
pub fn require_kvm() {
    assert!(
        Path::new("/dev/kvm").exists(),
        "/dev/kvm is missing: guest tests run real VMs and are never skipped"
    );
}

/// A VM name unique to this process and tag, so tests can run in parallel.
pub fn vm_name(tag: &str) -> String {
    format!("guest-{tag}-{}", std::process::id())
}

/// How a bhyve run ended.
#[derive(Debug)]
pub struct RunResult {
    pub status: ExitStatus,
    /// COM1 output (bhyve's stdout).
    pub stdout: String,
    pub stderr: String,
}

impl RunResult {
    /// The exit code, or `None` if bhyve died from a signal.
    pub fn code(&self) -> Option<i32> {
        self.status.code()
    }

    /// stdout's lines without the UART's carriage returns.
    pub fn lines(&self) -> Vec<&str> {
        self.stdout
            .lines()
            .map(|l| l.trim_end_matches('\r'))
            .collect()
    }

    /// The lines starting with `prefix`.
    pub fn lines_starting(&self, prefix: &str) -> Vec<&str> {
        self.lines()
            .into_iter()
            .filter(|l| l.starts_with(prefix))
            .collect()
    }

    /// True if some line is exactly `line`.
    pub fn has_line(&self, line: &str) -> bool {
        self.lines().contains(&line)
    }

    /// Panics with the whole run unless bhyve exited with `code`.
    pub fn assert_code(&self, code: i32) {
        assert_eq!(
            self.code(),
            Some(code),
            "bhyve should exit {code}\n{}",
            self.describe()
        );
    }

    /// Panics with the whole run unless some line is exactly `line`.
    pub fn assert_line(&self, line: &str) {
        assert!(
            self.has_line(line),
            "guest output lacks the line {line:?}\n{}",
            self.describe()
        );
    }

    /// Panics with the whole run if the guest reported a failure.
    pub fn assert_no_failure(&self) {
        assert!(
            !self.lines().iter().any(|l| l.starts_with("FAIL")),
            "the guest reported a failure\n{}",
            self.describe()
        );
    }

    /// Status, stdout and stderr, for assertion messages.
    pub fn describe(&self) -> String {
        format!(
            "status: {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.status, self.stdout, self.stderr
        )
    }
}

/// Run `bin args...`; kill it and panic (showing its output) if it has not
/// ended within `timeout`.
pub fn run_bhyve<S: AsRef<std::ffi::OsStr>>(
    bin: &Path,
    args: &[S],
    timeout: Duration,
) -> RunResult {
    run(bin, args, None, timeout)
}

/// The repository's root (this crate is crates/guests).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Debian's stock cloud kernel: `$RHYVE_GUEST_KERNEL` (set by test.sh), or
/// fetched now with scripts/fetch-guest-kernel.sh (apt-get download +
/// dpkg -x, never installed).
pub fn debian_kernel() -> PathBuf {
    if let Ok(k) = std::env::var("RHYVE_GUEST_KERNEL") {
        return PathBuf::from(k);
    }
    let out = Command::new(workspace_root().join("scripts/fetch-guest-kernel.sh"))
        .output()
        .expect("run scripts/fetch-guest-kernel.sh");
    assert!(
        out.status.success(),
        "fetching the guest kernel failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
}

/// The named-VM registry test runs use, so they leave nothing under
/// /run/rhyve/vmm (names are unique per process, see [`vm_name`]).
pub fn test_registry() -> PathBuf {
    std::env::temp_dir().join("rhyve-test-vmm")
}

/// The power button signal (bhyve's SIGTERM handler), for [`run_bhyve_signal_after`].
pub const SIGTERM: i32 = libc::SIGTERM;

/// Like [`run_bhyve`], and send `signal` to bhyve once a line equal to
/// `line` appeared on its stdout.
pub fn run_bhyve_signal_after<S: AsRef<std::ffi::OsStr>>(
    bin: &Path,
    args: &[S],
    line: &str,
    signal: i32,
    timeout: Duration,
) -> RunResult {
    run(bin, args, Some((line, signal)), timeout)
}

/// Reads a pipe to its end into a shared buffer, so the output so far is
/// visible while the process runs.
fn drain<R: Read + Send + 'static>(
    mut pipe: R,
) -> (Arc<Mutex<Vec<u8>>>, std::thread::JoinHandle<()>) {
    let buf = Arc::new(Mutex::new(Vec::new()));
    let sink = Arc::clone(&buf);
    let handle = std::thread::spawn(move || {
        let mut chunk = [0u8; 4096];
        loop {
            match pipe.read(&mut chunk) {
                Ok(0) | Err(_) => break,
                Ok(n) => sink.lock().unwrap().extend_from_slice(&chunk[..n]),
            }
        }
    });
    (buf, handle)
}

fn has_complete_line(out: &[u8], line: &str) -> bool {
    String::from_utf8_lossy(out)
        .split('\n')
        .rev()
        .skip(1) // the text after the last newline is not a complete line yet
        .any(|l| l.trim_end_matches('\r') == line)
}

fn kill_and_reap(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

fn run<S: AsRef<std::ffi::OsStr>>(
    bin: &Path,
    args: &[S],
    mut signal_after: Option<(&str, i32)>,
    timeout: Duration,
) -> RunResult {
    let mut child = Command::new(bin)
        .env("RHYVE_VMM_DIR", test_registry())
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {}: {e}", bin.display()));
    let (stdout, out_reader) = drain(child.stdout.take().unwrap());
    let (stderr, err_reader) = drain(child.stderr.take().unwrap());
    let deadline = Instant::now() + timeout;
    let status =
        loop {
            if let Some(status) = child.try_wait().expect("waiting for bhyve") {
                break status;
            }
            if let Some((line, signal)) = signal_after {
                if has_complete_line(&stdout.lock().unwrap(), line) {
                    let pid = child.id() as libc::pid_t;
                    // SAFETY: kill(2) on our own child, which has not been reaped
                    // (try_wait above saw it running), so the pid is still ours.
                    let rc = unsafe { libc::kill(pid, signal) };
                    assert_eq!(rc, 0, "kill({pid}, {signal}) failed");
                    signal_after = None;
                }
            }
            if Instant::now() > deadline {
                kill_and_reap(&mut child);
                let _ = out_reader.join();
                let _ = err_reader.join();
                panic!(
                "{} {:?} did not end within {timeout:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
                bin.display(),
                args.iter().map(|a| a.as_ref().to_owned()).collect::<Vec<_>>(),
                String::from_utf8_lossy(&stdout.lock().unwrap()),
                String::from_utf8_lossy(&stderr.lock().unwrap()),
            );
            }
            std::thread::sleep(Duration::from_millis(10));
        };
    let _ = out_reader.join();
    let _ = err_reader.join();
    let stdout = String::from_utf8_lossy(&stdout.lock().unwrap()).into_owned();
    let stderr = String::from_utf8_lossy(&stderr.lock().unwrap()).into_owned();
    RunResult {
        status,
        stdout,
        stderr,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_guest_is_built_as_elf64_with_a_pvh_note() {
        for name in GUESTS {
            let elf = std::fs::read(guest_path(name)).unwrap();
            assert_eq!(&elf[..4], b"\x7fELF", "{name}");
            assert_eq!(elf[4], 2, "{name} is not ELF64");
            // The PVH note: namesz 4, descsz 4, type 18, "Xen\0".
            let note = [4u8, 0, 0, 0, 4, 0, 0, 0, 18, 0, 0, 0, b'X', b'e', b'n', 0];
            assert!(
                elf.windows(note.len()).any(|w| w == note),
                "{name} lacks the PVH entry note"
            );
        }
    }

    #[test]
    fn complete_lines_only() {
        assert!(has_complete_line(b"a\r\nready\r\n", "ready"));
        assert!(!has_complete_line(b"a\r\nready", "ready"));
        assert!(!has_complete_line(b"already\r\n", "ready"));
    }

    #[test]
    fn boot_args_skip_an_empty_command_line() {
        assert_eq!(boot_args("cmos", "").len(), 2);
        let args = boot_args("exitcodes", "reset");
        assert_eq!(args[3], "boot.cmdline=reset");
    }

    #[test]
    #[should_panic(expected = "no guest program")]
    fn unknown_guest_is_refused() {
        guest_path("nonesuch");
    }
}
