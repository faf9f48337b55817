//! Every file the tools read from a path is read with a bound: a special
//! file that never ends (`/dev/zero`, a FIFO no one writes) or an oversized
//! one gets one error line naming the path (and the limit), at once,
//! instead of a hang or an allocation that grows until the host gives out.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use rhyve_guests::{require_kvm, test_registry, vm_name, BASE_MACHINE};

/// Run `bin` with at most 1 GiB of address space (so a run that reads
/// without a bound fails instead of eating the host's memory) and kill it
/// after 20 s (so one that waits for ever fails instead of hanging).
fn run(bin: &str, args: &[&str]) -> Output {
    let mut cmd = Command::new(bin);
    cmd.args(args)
        .env("RHYVE_VMM_DIR", test_registry())
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // SAFETY: setrlimit(2) is async-signal-safe; runs in the forked child.
    unsafe {
        cmd.pre_exec(|| {
            let limit = libc::rlimit {
                rlim_cur: 1 << 30,
                rlim_max: 1 << 30,
            };
            libc::setrlimit(libc::RLIMIT_AS, &limit);
            Ok(())
        });
    }
    let mut child = cmd.spawn().expect("start the binary");
    let deadline = Instant::now() + Duration::from_secs(20);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "{bin} {args:?} still running after 20 s: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

fn scratch(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("rhyve-bounded-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn fifo(dir: &Path) -> PathBuf {
    let path = dir.join("fifo");
    let c = std::ffi::CString::new(path.to_str().unwrap()).unwrap();
    // SAFETY: mkfifo on our own scratch path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    path
}

fn assert_fails(out: &Output, status: i32, stderr: &str) {
    assert_eq!(
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).as_ref()
        ),
        (Some(status), stderr)
    );
}

const BHYVE: &str = env!("CARGO_BIN_EXE_bhyve");

#[test]
fn bhyve_config_files_are_read_with_a_bound() {
    let dir = scratch("k");
    let fifo = fifo(&dir);
    let big = dir.join("big.conf");
    let mut text = "# padding\n".repeat((1 << 20) / 10);
    text.push_str("cpus=1\n");
    std::fs::write(&big, &text).unwrap();

    assert_fails(
        &run(BHYVE, &["-k", "/dev/zero", "vm"]),
        4,
        "bhyve: Failed to open configuration file /dev/zero: a character device, not a regular file\n",
    );
    assert_fails(
        &run(BHYVE, &["-k", fifo.to_str().unwrap(), "vm"]),
        4,
        &format!(
            "bhyve: Failed to open configuration file {}: a FIFO, not a regular file\n",
            fifo.display()
        ),
    );
    assert_fails(
        &run(BHYVE, &["-k", big.to_str().unwrap(), "vm"]),
        4,
        &format!(
            "bhyve: Failed to open configuration file {}: larger than the limit of 1 MiB\n",
            big.display()
        ),
    );
    // bhyve opens -f files while parsing: a FIFO is refused, not waited on.
    let item = format!("name=opt/x,file={}", fifo.display());
    assert_fails(
        &run(BHYVE, &["-f", &item, "vm"]),
        64,
        &format!(
            "bhyve: warning: Can't open fw_cfg_user_file file {}: a FIFO, not a regular file\n\
             bhyve: invalid fwcfg item '{item}'\n",
            fifo.display()
        ),
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn grub_bhyve_device_maps_are_read_with_a_bound() {
    let dir = scratch("map");
    let fifo = fifo(&dir);
    let out = run(
        env!("CARGO_BIN_EXE_grub-bhyve"),
        &["-m", "/dev/zero", "-r", "host", "-M", "128M", "vm"],
    );
    assert_fails(
        &out,
        1,
        "grub-bhyve: device map /dev/zero: a character device, not a regular file\n",
    );
    let out = run(
        env!("CARGO_BIN_EXE_grub-bhyve"),
        &[
            "-m",
            fifo.to_str().unwrap(),
            "-r",
            "host",
            "-M",
            "128M",
            "vm",
        ],
    );
    assert_fails(
        &out,
        1,
        &format!(
            "grub-bhyve: device map {}: a FIFO, not a regular file\n",
            fifo.display()
        ),
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn bhyve_kernel_and_initrd_must_be_regular_files() {
    require_kvm();
    let dir = scratch("kernel");
    let fifo = fifo(&dir);
    let guest = rhyve_guests::guest_path("exitcodes");
    let name = vm_name("bounded-kernel");
    let mut args: Vec<String> = BASE_MACHINE.iter().map(|s| s.to_string()).collect();
    args.push("-o".into());
    args.push(format!("boot.kernel={}", fifo.display()));
    args.push(name.clone());
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    assert_fails(
        &run(BHYVE, &argv),
        4,
        &format!(
            "bhyve: kernel {}: a FIFO, not a regular file\n",
            fifo.display()
        ),
    );

    let mut args: Vec<String> = BASE_MACHINE.iter().map(|s| s.to_string()).collect();
    for o in [
        format!("boot.kernel={}", guest.display()),
        "boot.initrd=/dev/zero".to_string(),
    ] {
        args.push("-o".into());
        args.push(o);
    }
    args.push(name);
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    assert_fails(
        &run(BHYVE, &argv),
        4,
        "bhyve: initrd /dev/zero: a character device, not a regular file\n",
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
