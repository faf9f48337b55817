//! bhyve's management model on Linux: named VMs in the registry
//! (`$RHYVE_VMM_DIR`), `bhyvectl` against stopped and running VMs, and a
//! killed `bhyve` leaving a stale entry that the next user detects.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use rhyve_guests::require_kvm;

struct Registry(PathBuf);

impl Registry {
    fn new(tag: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("rhyve-named-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        Self(dir)
    }

    fn bhyvectl(&self, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_bhyvectl"))
            .args(args)
            .env("RHYVE_VMM_DIR", &self.0)
            .output()
            .expect("run bhyvectl")
    }

    fn bhyve(&self, args: &[&str]) -> Vm {
        Vm(Command::new(env!("CARGO_BIN_EXE_bhyve"))
            .args(args)
            .env("RHYVE_VMM_DIR", &self.0)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start bhyve"))
    }
}

/// bhyve's arguments for the spin guest on the usual machine, plus `extra`.
fn spin_vm_args<'a>(guest_arg: &'a str, extra: &[&'a str], name: &'a str) -> Vec<&'a str> {
    let mut args = vec![
        "-s",
        "0,hostbridge",
        "-s",
        "31,lpc",
        "-l",
        "com1,stdio",
        "-o",
        guest_arg,
    ];
    args.extend_from_slice(extra);
    args.push(name);
    args
}

/// A running bhyve that a failing test does not leave behind.
struct Vm(Child);

impl Vm {
    fn id(&self) -> u32 {
        self.0.id()
    }

    fn wait(&mut self) -> std::io::Result<std::process::ExitStatus> {
        self.0.wait()
    }

    fn kill(&mut self) -> std::io::Result<()> {
        self.0.kill()
    }

    fn wait_with_output(mut self) -> std::io::Result<Output> {
        let mut out = Output {
            status: self.0.wait()?,
            stdout: Vec::new(),
            stderr: Vec::new(),
        };
        use std::io::Read;
        if let Some(mut o) = self.0.stdout.take() {
            o.read_to_end(&mut out.stdout)?;
        }
        if let Some(mut e) = self.0.stderr.take() {
            e.read_to_end(&mut out.stderr)?;
        }
        Ok(out)
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The benchmark's stub guest, built to print a line and spin.
fn spin_guest(dir: &Path) -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../bench");
    let out = dir.join("stub-spin.elf");
    let status = Command::new("gcc")
        .args([
            "-DSPIN",
            "-nostdlib",
            "-static",
            "-no-pie",
            "-Wl,--build-id=none",
        ])
        .arg(format!("-Wl,-T,{}", root.join("stub-guest.ld").display()))
        .arg("-o")
        .arg(&out)
        .arg(root.join("stub-guest.S"))
        .status()
        .expect("run gcc");
    assert!(status.success(), "building the stub guest failed");
    out
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn create_list_run_inspect_destroy() {
    require_kvm();
    let reg = Registry::new("lifecycle");
    std::fs::create_dir_all(&reg.0).unwrap();
    let guest = spin_guest(&reg.0);

    let o = reg.bhyvectl(&["--vm=vm1", "--get-rip"]);
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&o.stdout),
        "VM:vm1 is not created.\n"
    );

    assert!(reg.bhyvectl(&["--vm=vm1", "--create"]).status.success());
    let o = reg.bhyvectl(&["--vm=vm1", "--create"]);
    assert_eq!(
        o.status.code(),
        Some(255),
        "creating twice fails like bhyvectl: {}",
        text(&o)
    );
    assert!(String::from_utf8_lossy(&o.stdout).contains("errno = 17"));
    assert!(text(&reg.bhyvectl(&["--list"])).contains("vm1\t-\tstopped"));

    let guest_arg = format!("boot.kernel={}", guest.display());
    let mut vm = reg.bhyve(&spin_vm_args(&guest_arg, &["-m", "128M"], "vm1"));
    wait_until("the VM to run", || {
        text(&reg.bhyvectl(&["--list"])).contains("running")
    });
    // ps shows bhyve's process title, by which vm-bhyve and libvirt find VMs.
    let cmdline = std::fs::read(format!("/proc/{}/cmdline", vm.id())).unwrap();
    let title = String::from_utf8_lossy(&cmdline)
        .trim_end_matches('\0')
        .to_string();
    assert_eq!(title, "bhyve: vm1");

    // A second bhyve on the same name is refused.
    let second = reg
        .bhyve(&["-m", "128M", "-o", &guest_arg, "vm1"])
        .wait_with_output()
        .unwrap();
    assert_eq!(second.status.code(), Some(4));
    assert!(
        text(&second).contains("vm1 is in use by another process"),
        "{}",
        text(&second)
    );

    let o = reg.bhyvectl(&["--vm=vm1", "--get-rip", "--get-stats"]);
    assert!(o.status.success(), "{}", text(&o));
    let out = String::from_utf8_lossy(&o.stdout).to_string();
    assert!(out.starts_with("rip[0]\t\t0x0000000000"), "{out}");
    assert!(out.contains("vcpu0 stats:"), "{out}");
    let resident: u64 = out
        .lines()
        .find(|l| l.starts_with("Resident memory"))
        .and_then(|l| l.split_whitespace().last())
        .and_then(|v| v.parse().ok())
        .expect("a Resident memory line");
    assert!(resident > 0 && resident <= 128 << 20, "resident {resident}");

    // --destroy stops the running VM and removes it.
    let o = reg.bhyvectl(&["--vm=vm1", "--destroy"]);
    assert!(o.status.success(), "{}", text(&o));
    let end = vm.wait().unwrap();
    assert_eq!(
        end.code(),
        Some(4),
        "a VM destroyed from outside ends with status 4"
    );
    assert!(!text(&reg.bhyvectl(&["--list"])).contains("vm1"));
}

#[test]
fn force_poweroff_and_reset_end_bhyve_with_their_codes() {
    require_kvm();
    let reg = Registry::new("suspend");
    std::fs::create_dir_all(&reg.0).unwrap();
    let guest = spin_guest(&reg.0);
    let guest_arg = format!("boot.kernel={}", guest.display());
    for (flag, code) in [("--force-poweroff", 1), ("--force-reset", 0)] {
        let mut vm = reg.bhyve(&spin_vm_args(&guest_arg, &[], "vm2"));
        wait_until("the VM to run", || {
            text(&reg.bhyvectl(&["--list"])).contains("running")
        });
        assert!(reg.bhyvectl(&["--vm=vm2", flag]).status.success());
        assert_eq!(vm.wait().unwrap().code(), Some(code), "{flag}");
    }
    // Without -D the VM stays listed after a power-off, as in bhyve.
    assert!(text(&reg.bhyvectl(&["--list"])).contains("vm2\t"));
    assert!(reg.bhyvectl(&["--vm=vm2", "--destroy"]).status.success());
}

#[test]
fn killed_bhyve_leaves_a_stale_entry_that_is_detected() {
    require_kvm();
    let reg = Registry::new("stale");
    std::fs::create_dir_all(&reg.0).unwrap();
    let guest = spin_guest(&reg.0);
    let guest_arg = format!("boot.kernel={}", guest.display());
    let mut vm = reg.bhyve(&spin_vm_args(&guest_arg, &[], "vm3"));
    wait_until("the VM to run", || {
        text(&reg.bhyvectl(&["--list"])).contains("running")
    });
    vm.kill().unwrap();
    vm.wait().unwrap();
    // The pid file is still there, but nobody holds the VM: it is stopped.
    assert!(reg.0.join("vm3/pid").exists());
    assert!(
        text(&reg.bhyvectl(&["--list"])).contains("vm3\t128M\tstopped")
            || text(&reg.bhyvectl(&["--list"])).contains("vm3\t256M\tstopped")
    );
    // The next bhyve takes it over; -D then removes it on power-off.
    let mut vm = reg.bhyve(&spin_vm_args(&guest_arg, &["-D"], "vm3"));
    wait_until("the VM to run again", || {
        text(&reg.bhyvectl(&["--list"])).contains("running")
    });
    assert!(reg
        .bhyvectl(&["--vm=vm3", "--force-poweroff"])
        .status
        .success());
    assert_eq!(vm.wait().unwrap().code(), Some(1));
    assert!(
        !text(&reg.bhyvectl(&["--list"])).contains("vm3"),
        "-D destroys the VM on power-off"
    );
}
