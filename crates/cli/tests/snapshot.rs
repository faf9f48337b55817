//! Snapshots (bhyvectl --suspend/--checkpoint, bhyve -r) of our `snapcheck`
//! guest (crates/guests/guest/snapcheck.c), which keeps a running checksum
//! over its memory and writes one virtio-blk sector per round: restored in
//! a new process it must end exactly as an uninterrupted run, with every
//! write on disk once; and restores that cannot be right are refused with
//! one line and exit 4, before anything runs.

use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rhyve_guests::{guest_args, require_kvm, run_bhyve, test_registry, vm_name, RunResult};

const BHYVE: &str = env!("CARGO_BIN_EXE_bhyve");
const BHYVECTL: &str = env!("CARGO_BIN_EXE_bhyvectl");
const ROUNDS: usize = 120;

/// A scratch directory, removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(tag: &str) -> Self {
        let dir = std::env::temp_dir().join(vm_name(tag));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }

    fn disk(&self, name: &str) -> PathBuf {
        let p = self.0.join(name);
        std::fs::write(&p, vec![0u8; 1 << 20]).unwrap();
        p
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// snapcheck with its disk and QEMU's fw_cfg, which it reads across the
/// snapshot.
fn args(disk: &Path, tag: &str, extra: &[&str]) -> Vec<String> {
    let slot = format!("4,virtio-blk,{}", disk.display());
    let mut all = vec!["-s", &slot, "-o", "lpc.fwcfg=qemu"];
    all.extend_from_slice(extra);
    guest_args("snapcheck", "", &all, tag)
}

/// `args` with `-r FILE` among the options (before the VM name).
fn with_restore(mut args: Vec<String>, file: &Path) -> Vec<String> {
    let name = args.pop().unwrap();
    args.extend(["-r".to_string(), file.display().to_string(), name]);
    args
}

fn bhyvectl(vm: &str, option: &str, file: &Path) -> std::process::Output {
    Command::new(BHYVECTL)
        .env("RHYVE_VMM_DIR", test_registry())
        .arg(format!("--vm={vm}"))
        .arg(format!("{option}={}", file.display()))
        .output()
        .expect("run bhyvectl")
}

/// bhyve running the guest, its COM1 output collected as it comes.
struct Running {
    child: Child,
    out: Arc<Mutex<String>>,
}

impl Running {
    fn start(args: &[String]) -> Self {
        let mut child = Command::new(BHYVE)
            .env("RHYVE_VMM_DIR", test_registry())
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start bhyve");
        let mut pipe = child.stdout.take().unwrap();
        let out = Arc::new(Mutex::new(String::new()));
        let sink = out.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = pipe.read(&mut buf) {
                if n == 0 {
                    break;
                }
                sink.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]).replace('\r', ""));
            }
        });
        Running { child, out }
    }

    fn wait_for(&mut self, line: &str) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !self.out.lock().unwrap().lines().any(|l| l == line) {
            if Instant::now() > deadline || self.child.try_wait().unwrap().is_some() {
                let _ = self.child.kill();
                panic!("never saw {line:?}: {}", self.out.lock().unwrap());
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    fn finish(mut self) -> (Option<i32>, String) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                std::thread::sleep(Duration::from_millis(50));
                return (status.code(), self.out.lock().unwrap().clone());
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("bhyve did not end: {}", self.out.lock().unwrap());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

fn checksum_line(run: &RunResult) -> String {
    run.assert_no_failure();
    run.assert_code(1);
    run.assert_line("snapcheck disk ok");
    run.assert_line("snapcheck fwcfg ok");
    run.lines_starting("snapcheck checksum")
        .first()
        .unwrap_or_else(|| panic!("no checksum: {}", run.describe()))
        .to_string()
}

/// Every round's sector holds "SNAP" and its round number, nothing after.
fn assert_each_write_once(disk: &Path, reference: &Path) {
    let got = std::fs::read(disk).unwrap();
    for (round, sector) in got.chunks(512).take(ROUNDS).enumerate() {
        assert_eq!(&sector[..4], b"SNAP", "sector {round}");
        assert_eq!(sector[4..8], (round as u32).to_le_bytes(), "sector {round}");
    }
    assert!(
        got[ROUNDS * 512..].iter().all(|b| *b == 0),
        "writes past the last round"
    );
    assert!(
        got == std::fs::read(reference).unwrap(),
        "the disk differs from an uninterrupted run's"
    );
}

fn uninterrupted(scratch: &Scratch, tag: &str) -> (String, PathBuf) {
    let disk = scratch.disk("reference.img");
    let run = run_bhyve(
        Path::new(BHYVE),
        &args(&disk, tag, &[]),
        Duration::from_secs(60),
    );
    (checksum_line(&run), disk)
}

/// Suspend the guest mid-run; returns the snapshot file and the disk.
fn suspend(scratch: &Scratch, tag: &str) -> (PathBuf, PathBuf) {
    let disk = scratch.disk("suspended.img");
    let file = scratch.0.join("vm.ckp");
    let mut running = Running::start(&args(&disk, tag, &[]));
    running.wait_for("snapcheck round 10");
    let ctl = bhyvectl(&vm_name(tag), "--suspend", &file);
    assert!(ctl.status.success(), "bhyvectl --suspend: {ctl:?}");
    let (code, out) = running.finish();
    assert_eq!(code, Some(0), "a suspended bhyve exits 0: {out}");
    assert!(
        !out.contains("snapcheck checksum"),
        "the guest ran on: {out}"
    );
    (file, disk)
}

#[test]
fn a_suspended_guest_restored_in_a_new_process_ends_as_if_never_stopped() {
    require_kvm();
    let scratch = Scratch::new("snap-suspend");
    let (want, reference) = uninterrupted(&scratch, "snap-ref");
    let (file, disk) = suspend(&scratch, "snap-suspend");

    // bhyve's three files; guest memory sparse (the guest touches little
    // of its 256 MiB) and private to its owner.
    let memory = std::fs::metadata(&file).unwrap();
    assert_eq!(memory.len(), 256 << 20);
    assert!(
        memory.blocks() * 512 < 16 << 20,
        "{} blocks: zero pages were written",
        memory.blocks()
    );
    assert_eq!(memory.mode() & 0o077, 0, "snapshot readable by others");
    for suffix in [".kern", ".meta"] {
        assert!(
            scratch.0.join(format!("vm.ckp{suffix}")).exists(),
            "no {suffix}"
        );
    }

    // Restored under the snapshot's own name (none on the command line).
    let mut restore: Vec<String> = args(&disk, "snap-suspend", &[]);
    restore.pop();
    restore.extend(["-r".to_string(), file.display().to_string()]);
    let run = run_bhyve(Path::new(BHYVE), &restore, Duration::from_secs(60));
    assert_eq!(checksum_line(&run), want, "{}", run.describe());
    assert!(
        !run.has_line("snapcheck round 10"),
        "the guest started over: {}",
        run.describe()
    );
    assert_each_write_once(&disk, &reference);
}

#[test]
fn a_checkpointed_guest_runs_on_and_its_checkpoint_restores() {
    require_kvm();
    let scratch = Scratch::new("snap-ckpt");
    let (want, reference) = uninterrupted(&scratch, "snap-ckpt-ref");
    let disk = scratch.disk("live.img");
    let file = scratch.0.join("live.ckp");
    let mut running = Running::start(&args(&disk, "snap-ckpt", &[]));
    running.wait_for("snapcheck round 10");
    let ctl = bhyvectl(&vm_name("snap-ckpt"), "--checkpoint", &file);
    assert!(ctl.status.success(), "bhyvectl --checkpoint: {ctl:?}");
    // Again, into another file: the VM takes any number of checkpoints.
    let again = scratch.0.join("again.ckp");
    let ctl = bhyvectl(&vm_name("snap-ckpt"), "--checkpoint", &again);
    assert!(
        ctl.status.success(),
        "a second bhyvectl --checkpoint: {ctl:?}"
    );
    let (code, out) = running.finish();
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.lines().any(|l| l == want),
        "the checkpointed run: {out}"
    );
    assert_each_write_once(&disk, &reference);

    // The disk already holds every round; the restored guest rewrites the
    // rounds after the checkpoint with the same data.
    let restore = with_restore(args(&disk, "snap-ckpt-restored", &[]), &file);
    let run = run_bhyve(Path::new(BHYVE), &restore, Duration::from_secs(60));
    assert_eq!(checksum_line(&run), want, "{}", run.describe());
    assert_each_write_once(&disk, &reference);
}

/// bhyve -r with `extra` options (or a damaged copy of the snapshot) must
/// fail before running anything: exit 4, one line naming the problem.
fn assert_refused(restore: &[String], want: &str) {
    let run = run_bhyve(Path::new(BHYVE), restore, Duration::from_secs(30));
    assert_eq!(run.code(), Some(4), "{}", run.describe());
    assert!(run.stdout.is_empty(), "the guest ran: {}", run.describe());
    let lines: Vec<&str> = run.stderr.lines().collect();
    assert_eq!(lines.len(), 1, "{}", run.describe());
    assert!(
        lines[0].starts_with("bhyve: ") && lines[0].contains(want),
        "{}",
        run.describe()
    );
}

#[test]
fn restores_that_cannot_be_right_are_refused() {
    require_kvm();
    let scratch = Scratch::new("snap-refuse");
    let (file, disk) = suspend(&scratch, "snap-refuse");
    let restore = |extra: &[&str], snapshot: &Path| {
        with_restore(args(&disk, "snap-refuse-r", extra), snapshot)
    };
    assert_refused(
        &restore(&["-m", "512M"], &file),
        "has 256 MiB of memory, this command line asks for 512 MiB",
    );
    assert_refused(
        &restore(&["-c", "2"], &file),
        "has 1 vCPUs, this command line asks for 2",
    );
    assert_refused(
        &restore(&["-s", "5,virtio-rnd"], &file),
        "only on this command line [\"pci.0.5.0\"]",
    );

    // Damaged copies.
    let copy = |name: &str| {
        let to = scratch.0.join(name);
        for suffix in ["", ".kern", ".meta"] {
            std::fs::copy(
                format!("{}{suffix}", file.display()),
                format!("{}{suffix}", to.display()),
            )
            .unwrap();
        }
        to
    };
    let old = copy("old.ckp");
    let meta = std::fs::read_to_string(format!("{}.meta", old.display())).unwrap();
    std::fs::write(
        format!("{}.meta", old.display()),
        meta.replacen("\"version\": 1", "\"version\": 99", 1),
    )
    .unwrap();
    assert_refused(
        &restore(&[], &old),
        "snapshot format version 99, this rhyve restores version 1 only",
    );

    let missing = copy("missing.ckp");
    std::fs::remove_file(format!("{}.kern", missing.display())).unwrap();
    assert_refused(&restore(&[], &missing), "missing.ckp.kern: No such file");

    let short = copy("short.ckp");
    std::fs::OpenOptions::new()
        .write(true)
        .open(&short)
        .unwrap()
        .set_len(100 << 20)
        .unwrap();
    assert_refused(&restore(&[], &short), "truncated");

    let cut = copy("cut.ckp");
    let kern = std::fs::read(format!("{}.kern", cut.display())).unwrap();
    std::fs::write(format!("{}.kern", cut.display()), &kern[..kern.len() / 2]).unwrap();
    assert_refused(&restore(&[], &cut), "truncated or not a rhyve snapshot");

    // None of the refused restores left the VM running.
    let ctl = Command::new(BHYVECTL)
        .env("RHYVE_VMM_DIR", test_registry())
        .arg("--list")
        .output()
        .unwrap();
    let name = vm_name("snap-refuse-r");
    let list = String::from_utf8_lossy(&ctl.stdout);
    assert!(
        list.lines()
            .filter(|l| l.split('\t').next() == Some(name.as_str()))
            .all(|l| l.ends_with("stopped")),
        "{list}"
    );
}

/// The screen a VNC client sees at `port`: (width, height, B,G,R,X pixels),
/// in the server's own pixel format and Raw encoding.
fn vnc_capture(port: u16) -> (u16, u16, Vec<u8>) {
    use std::io::Write;
    use std::net::TcpStream;
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut s = loop {
        match TcpStream::connect(("127.0.0.1", port)) {
            Ok(s) => break s,
            Err(e) if Instant::now() > deadline => panic!("no VNC server on {port}: {e}"),
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    };
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut read = |n: usize| {
        let mut b = vec![0u8; n];
        s.read_exact(&mut b).unwrap();
        b
    };
    assert_eq!(read(12), b"RFB 003.008\n");
    let mut w = s.try_clone().unwrap();
    w.write_all(b"RFB 003.008\n").unwrap();
    let mut read = |n: usize| {
        let mut b = vec![0u8; n];
        s.read_exact(&mut b).unwrap();
        b
    };
    assert_eq!(read(2), [1, 1], "security None only");
    w.write_all(&[1]).unwrap();
    assert_eq!(read(4), [0; 4], "security result");
    w.write_all(&[1]).unwrap();
    let init = read(24);
    let (width, height) = (
        u16::from_be_bytes([init[0], init[1]]),
        u16::from_be_bytes([init[2], init[3]]),
    );
    read(u32::from_be_bytes(init[20..24].try_into().unwrap()) as usize);
    // SetEncodings: Raw only; then one full update.
    w.write_all(&[2, 0, 0, 1, 0, 0, 0, 0]).unwrap();
    let mut request = vec![3, 0, 0, 0, 0, 0];
    request.extend(width.to_be_bytes());
    request.extend(height.to_be_bytes());
    w.write_all(&request).unwrap();
    let header = read(4);
    assert_eq!(header[0], 0, "a FramebufferUpdate");
    let mut screen = vec![0u8; usize::from(width) * usize::from(height) * 4];
    for _ in 0..u16::from_be_bytes([header[2], header[3]]) {
        let r = read(12);
        let at = |i: usize| usize::from(u16::from_be_bytes([r[i], r[i + 1]]));
        let (x, y, rw, rh) = (at(0), at(2), at(4), at(6));
        assert_eq!(r[8..12], [0; 4], "Raw encoding");
        let pixels = read(rw * rh * 4);
        for row in 0..rh {
            let to = ((y + row) * usize::from(width) + x) * 4;
            screen[to..to + rw * 4].copy_from_slice(&pixels[row * rw * 4..(row + 1) * rw * 4]);
        }
    }
    (width, height, screen)
}

/// What snapcheck paints into an fbuf: 640x480, the top 16 rows patterned.
fn painted_screen() -> Vec<u8> {
    let mut screen = vec![0u8; 640 * 480 * 4];
    for i in 0..640 * 16u32 {
        let at = i as usize * 4;
        screen[at..at + 4].copy_from_slice(&(i.wrapping_mul(2654435761) & 0xFF_FFFF).to_le_bytes());
    }
    screen
}

/// Only B, G and R: the server need not keep the unused byte.
fn colours(screen: &[u8]) -> Vec<[u8; 3]> {
    screen.chunks(4).map(|p| [p[0], p[1], p[2]]).collect()
}

#[test]
fn an_fbuf_is_restored_with_its_frame_buffer_and_its_vnc_server_listening() {
    require_kvm();
    let scratch = Scratch::new("snap-fbuf");
    let disk = scratch.disk("fbuf.img");
    let file = scratch.0.join("fbuf.ckp");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let blk = format!("4,virtio-blk,{}", disk.display());
    let fbuf = format!("5,fbuf,tcp=127.0.0.1:{port}");
    // A guest that keeps running, so the restored one is still there to
    // be looked at.
    let vm_args = |tag: &str| {
        guest_args(
            "snapcheck",
            "rounds=1000000",
            &["-s", &blk, "-s", &fbuf],
            tag,
        )
    };
    let want = colours(&painted_screen());

    let mut running = Running::start(&vm_args("snap-fbuf"));
    running.wait_for("snapcheck fbuf painted");
    running.wait_for("snapcheck round 10");
    let (w, h, before) = vnc_capture(port);
    assert_eq!((w, h), (640, 480), "the guest's mode");
    assert!(
        colours(&before) == want,
        "the painted screen, before the snapshot"
    );
    let ctl = bhyvectl(&vm_name("snap-fbuf"), "--suspend", &file);
    assert!(ctl.status.success(), "bhyvectl --suspend: {ctl:?}");
    let (code, out) = running.finish();
    assert_eq!(code, Some(0), "a suspended bhyve exits 0: {out}");
    let meta = std::fs::metadata(scratch.0.join("fbuf.ckp.meta"))
        .unwrap()
        .len();
    assert!(meta < 1 << 20, "FILE.meta of {meta} bytes");
    let text = std::fs::read_to_string(scratch.0.join("fbuf.ckp.meta")).unwrap();
    assert!(text.contains("\"fbuf.vga\""), "the VGA ports are not saved");

    let mut restored = Running::start(&with_restore(vm_args("snap-fbuf-restored"), &file));
    let (w, h, after) = vnc_capture(port);
    // The restored guest runs on (the round it was suspended in varies).
    let deadline = Instant::now() + Duration::from_secs(30);
    while !restored.out.lock().unwrap().contains("snapcheck round") {
        assert!(Instant::now() < deadline, "the restored guest does not run");
        std::thread::sleep(Duration::from_millis(10));
    }
    let _ = restored.child.kill();
    let _ = restored.child.wait();
    assert_eq!((w, h), (640, 480), "the restored mode");
    assert!(colours(&after) == want, "the restored screen differs");
    assert!(
        !restored.out.lock().unwrap().contains("fbuf painted"),
        "the restored guest painted again"
    );
    eprintln!("fbuf snapshot: FILE.meta {meta} bytes");
}

/// `-l bootrom,ROM,VARS`: our fwsnap ROM (crates/guests/rom/fwsnap.S) is
/// suspended half way through fwctl's signature and with a flash command
/// pending; restored, it reads the rest of the signature and the
/// command's status.
#[test]
fn a_boot_rom_guest_is_restored_mid_fwctl_and_mid_flash_command() {
    require_kvm();
    let scratch = Scratch::new("snap-rom");
    let vars = scratch.0.join("vars.fd");
    std::fs::write(&vars, vec![0x5A; 4096]).unwrap();
    let file = scratch.0.join("rom.ckp");
    let rom_args = |tag: &str| {
        let mut a: Vec<String> = rhyve_guests::BASE_MACHINE
            .iter()
            .map(|s| s.to_string())
            .collect();
        a.extend([
            "-l".into(),
            format!(
                "bootrom,{},{}",
                rhyve_guests::rom_path("fwsnap").display(),
                vars.display()
            ),
            vm_name(tag),
        ]);
        a
    };
    let mut running = Running::start(&rom_args("snap-rom"));
    running.wait_for("half");
    let ctl = bhyvectl(&vm_name("snap-rom"), "--suspend", &file);
    assert!(ctl.status.success(), "bhyvectl --suspend: {ctl:?}");
    let (code, out) = running.finish();
    assert_eq!(code, Some(0), "a suspended bhyve exits 0: {out}");
    assert!(!out.contains("done"), "the ROM ran on: {out}");

    let run = run_bhyve(
        Path::new(BHYVE),
        &with_restore(rom_args("snap-rom-restored"), &file),
        Duration::from_secs(60),
    );
    run.assert_no_failure();
    for line in ["fwctl YV", "vars status 0", "done"] {
        run.assert_line(line);
    }
    assert!(
        !run.has_line("half"),
        "the ROM started over: {}",
        run.describe()
    );
    run.assert_code(1);
    assert_eq!(
        std::fs::read(&vars).unwrap(),
        vec![0x5A; 4096],
        "VARS untouched"
    );
}
