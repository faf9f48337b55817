//! Where `-l comN,PATH` may send a guest's console: a typo never writes
//! into a file, and a null-modem pair (`/dev/nmdmNA`) is one VM's, with a
//! peer link that cannot outlive it into someone else's terminal.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use rhyve_guests::{boot_args, require_kvm, run_bhyve, test_registry, vm_name};

fn bhyve() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_bhyve"))
}

/// bhyve's arguments for `guest` with COM1 on `com1`.
fn args(guest: &str, cmdline: &str, com1: &str, tag: &str) -> Vec<String> {
    let mut a = boot_args(guest, cmdline);
    for s in ["-s", "0,hostbridge", "-s", "31,lpc", "-l"] {
        a.push(s.to_string());
    }
    a.push(format!("com1,{com1}"));
    a.push(vm_name(tag));
    a
}

#[test]
fn com1_on_a_regular_file_is_refused_and_the_file_left_alone() {
    require_kvm();
    let dir = std::env::temp_dir().join(format!("rhyve-com1-file-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let disk = dir.join("linux.img");
    std::fs::write(&disk, b"the guest's disk").unwrap();
    let run = run_bhyve(
        bhyve(),
        &args("exitcodes", "poweroff", disk.to_str().unwrap(), "com1-file"),
        Duration::from_secs(30),
    );
    run.assert_code(4);
    let expected = format!(
        "bhyve: Unable to initialize backend '{}' for LPC device com1: serial backend \"{0}\": \
             a regular file, not a terminal (a console goes to stdio, tcp=ip:port, /dev/nmdmNA \
             or a terminal device)",
        disk.display()
    );
    assert!(
        run.stderr.lines().any(|l| l == expected),
        "no line {expected:?}\n{}",
        run.describe()
    );
    assert_eq!(std::fs::read(&disk).unwrap(), b"the guest's disk");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A bhyve that is killed if the test ends early.
struct Vm(Child);

impl Vm {
    fn start(args: &[String]) -> Vm {
        require_kvm();
        Vm(Command::new(bhyve())
            .env("RHYVE_VMM_DIR", test_registry())
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start bhyve"))
    }

    /// The exit status within `timeout`, else `None` (still running).
    fn wait_for(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(s) = self.0.try_wait().unwrap() {
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// The exit status within `timeout` (`None`: it was still running and
    /// is killed now) and everything it printed on stderr.
    fn finish(&mut self, timeout: Duration) -> (Option<ExitStatus>, String) {
        let status = self.wait_for(timeout);
        if status.is_none() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
        let mut s = String::new();
        if let Some(mut e) = self.0.stderr.take() {
            std::io::Read::read_to_string(&mut e, &mut s).unwrap();
        }
        (status, s)
    }

    fn signal(&self, sig: libc::c_int) {
        // SAFETY: kill(2) on our own child, not reaped yet.
        assert_eq!(unsafe { libc::kill(self.0.id() as libc::pid_t, sig) }, 0);
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A new pseudo-terminal, as the host hands to the next terminal session:
/// the master (kept open) and the slave's device number.
fn next_host_terminal() -> (std::fs::File, u64) {
    use std::os::fd::FromRawFd;
    // SAFETY: pty set-up on an fd we own; ptsname_r writes at most name.len() bytes.
    unsafe {
        let fd = libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC);
        assert!(fd >= 0);
        let master = std::fs::File::from_raw_fd(fd);
        assert_eq!(libc::grantpt(fd), 0);
        assert_eq!(libc::unlockpt(fd), 0);
        let mut name = [0 as libc::c_char; 128];
        assert_eq!(libc::ptsname_r(fd, name.as_mut_ptr(), name.len()), 0);
        let path = std::ffi::CStr::from_ptr(name.as_ptr()).to_string_lossy();
        let rdev = std::fs::metadata(path.as_ref()).unwrap().rdev();
        (master, rdev)
    }
}

/// Attach to a null-modem peer as `cu` would and read until the
/// powerbutton guest's `ready`.
fn wait_for_ready(peer: &Path) {
    use std::os::unix::fs::OpenOptionsExt;
    let mut console = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(peer)
        .unwrap();
    let mut got = Vec::new();
    wait_until("the guest's ready on the console", || {
        let mut buf = [0u8; 256];
        if let Ok(n) = std::io::Read::read(&mut console, &mut buf) {
            got.extend_from_slice(&buf[..n]);
        }
        String::from_utf8_lossy(&got).contains("ready")
    });
}

#[test]
fn a_null_modem_pair_is_one_vms_and_its_link_dies_with_it() {
    require_kvm();
    let unit = std::process::id();
    let ours = format!("/dev/nmdm{unit}A");
    let peer = PathBuf::from(format!("/dev/nmdm{unit}B"));
    let lock = PathBuf::from(format!("/dev/nmdm{unit}.lock"));

    let mut first = Vm::start(&args("powerbutton", "", &ours, "nmdm-first"));
    wait_until("the first VM's peer link", || {
        std::fs::metadata(&peer).is_ok()
    });
    let link = std::fs::read_link(&peer).unwrap();

    // A second VM on the same pair is refused and leaves the link alone.
    let mut second = Vm::start(&args("powerbutton", "", &ours, "nmdm-second"));
    let (status, err) = second.finish(Duration::from_secs(30));
    assert_eq!(status.and_then(|s| s.code()), Some(4), "{err}");
    assert!(
        err.contains(&format!(
            "the null-modem pair is in use by process {} (lock {})",
            first.0.id(),
            lock.display()
        )),
        "{err}"
    );
    assert_eq!(std::fs::read_link(&peer).unwrap(), link);
    // The guest's console is reached through the link.
    wait_for_ready(&peer);

    // SIGKILL: nothing is cleaned up, and the pty number goes to the next
    // terminal the host opens. The link must not lead there.
    first.signal(libc::SIGKILL);
    assert!(first.wait_for(Duration::from_secs(10)).is_some());
    let (_host_terminal, host_rdev) = next_host_terminal();
    if let Ok(m) = std::fs::metadata(&peer) {
        assert_ne!(
            m.rdev(),
            host_rdev,
            "{} leads to another program's terminal",
            peer.display()
        );
    }

    // The next VM takes the pair over and, powered off, leaves nothing.
    let mut third = Vm::start(&args("powerbutton", "", &ours, "nmdm-third"));
    wait_until("the third VM's peer link", || {
        std::fs::metadata(&peer).is_ok()
    });
    wait_for_ready(&peer);
    third.signal(libc::SIGTERM);
    let (status, err) = third.finish(Duration::from_secs(30));
    assert_eq!(status.and_then(|s| s.code()), Some(1), "{err}");
    // Removed by the VM's clean-up process, once the VM is gone.
    wait_until("the link and the lock file to be removed", || {
        std::fs::symlink_metadata(&peer).is_err() && std::fs::symlink_metadata(&lock).is_err()
    });
}

#[test]
fn grub_bhyve_console_on_a_regular_file_is_refused_and_the_file_left_alone() {
    let dir = std::env::temp_dir().join(format!("rhyve-grub-cons-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let disk = dir.join("linux.img");
    std::fs::write(&disk, b"the guest's disk").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_grub-bhyve"))
        .args(["-r", "host", "-M", "128M", "-c"])
        .arg(&disk)
        .arg(vm_name("grub-cons"))
        .env("RHYVE_VMM_DIR", test_registry())
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert_eq!(
        err.lines().next().unwrap_or_default(),
        format!(
            "grub-bhyve: console {}: not a terminal (-c takes a tty such as /dev/pts/N)",
            disk.display()
        )
    );
    assert!(out.stdout.is_empty());
    assert_eq!(std::fs::read(&disk).unwrap(), b"the guest's disk");
    std::fs::remove_dir_all(&dir).unwrap();
}
