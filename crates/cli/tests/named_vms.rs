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

#[test]
fn longest_names_under_a_long_registry_path_are_fully_manageable() {
    require_kvm();
    let base = Registry::new("longname");
    // 300 bytes of registry path: with a 229-byte name, far past sun_path's 108.
    let reg = Registry(base.0.join("r".repeat(150)).join("s".repeat(150)));
    std::fs::create_dir_all(&reg.0).unwrap();
    let guest = spin_guest(&base.0);
    let guest_arg = format!("boot.kernel={}", guest.display());
    let name = "n".repeat(229);
    let vm_flag = format!("--vm={name}");

    let mut vm = reg.bhyve(&spin_vm_args(&guest_arg, &["-m", "16M"], &name));
    wait_until("the VM to run", || {
        text(&reg.bhyvectl(&["--list"])).contains("running")
    });
    let o = reg.bhyvectl(&[&vm_flag, "--get-stats"]);
    assert!(o.status.success(), "--get-stats: {}", text(&o));
    assert!(text(&o).contains("Resident memory"), "{}", text(&o));
    let o = reg.bhyvectl(&[&vm_flag, "--force-poweroff"]);
    assert!(o.status.success(), "--force-poweroff: {}", text(&o));
    assert_eq!(vm.wait().unwrap().code(), Some(1));
    let o = reg.bhyvectl(&[&vm_flag, "--destroy"]);
    assert!(o.status.success(), "--destroy: {}", text(&o));
    assert!(!reg.0.join(&name).exists());

    // One byte more than bhyve's VM_MAX_NAMELEN is refused up front.
    let long = "n".repeat(230);
    let o = reg
        .bhyve(&spin_vm_args(&guest_arg, &["-m", "16M"], &long))
        .wait_with_output()
        .unwrap();
    assert_eq!(o.status.code(), Some(4), "{}", text(&o));
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.starts_with("bhyve: VM name") && err.contains("too long: 230 bytes, at most 229"),
        "{err}"
    );
    let o = reg.bhyvectl(&[&format!("--vm={long}"), "--create"]);
    assert_eq!(o.status.code(), Some(255), "{}", text(&o));
    assert!(text(&o).contains("too long"), "{}", text(&o));
}

/// bhyve keeps a stopped VM in the kernel "for inspection" (vmrun.sh says
/// so after a triple fault): its registers stay readable.
#[test]
fn registers_of_a_triple_faulted_vm_stay_readable() {
    require_kvm();
    let reg = Registry::new("inspect");
    std::fs::create_dir_all(&reg.0).unwrap();
    let mut args: Vec<String> = rhyve_guests::boot_args("exitcodes", "triplefault");
    args.extend(["-s", "0,hostbridge", "-s", "31,lpc"].map(String::from));
    args.push("vm5".into());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let o = reg.bhyve(&args).wait_with_output().unwrap();
    assert_eq!(o.status.code(), Some(3), "{}", text(&o));

    let o = reg.bhyvectl(&["--vm=vm5", "--get-all"]);
    assert!(o.status.success(), "{}", text(&o));
    let out = String::from_utf8_lossy(&o.stdout).to_string();
    let value = |reg: &str| -> u64 {
        let line = out
            .lines()
            .find(|l| l.starts_with(&format!("{reg}[0]")))
            .unwrap_or_else(|| panic!("no {reg} line in {out}"));
        u64::from_str_radix(line.rsplit("0x").next().unwrap(), 16).unwrap()
    };
    // The guest runs in protected mode from its PVH entry: the state it
    // stopped in, not a blank one.
    assert_ne!(value("rip"), 0, "{out}");
    assert_eq!(value("cr0") & 1, 1, "CR0.PE: {out}");
    assert_eq!(value("cs"), 0x8, "{out}");

    // A VM that never ran has no such state, and says so.
    assert!(reg.bhyvectl(&["--vm=vm6", "--create"]).status.success());
    let o = reg.bhyvectl(&["--vm=vm6", "--get-rip"]);
    assert_eq!(o.status.code(), Some(255), "{}", text(&o));
    assert!(
        text(&o).contains("VM vm6 has no state for vcpu 0"),
        "{}",
        text(&o)
    );
}

/// Many VMs started at once and destroyed one after another, most of them
/// still starting: every `--destroy` succeeds, and when it returns the VM's
/// bhyve is gone.
#[test]
fn destroying_many_starting_vms_stops_every_one() {
    require_kvm();
    const VMS: usize = 40;
    let reg = Registry::new("stress");
    std::fs::create_dir_all(&reg.0).unwrap();
    let guest = spin_guest(&reg.0);
    let guest_arg = format!("boot.kernel={}", guest.display());
    let names: Vec<String> = (0..VMS).map(|i| format!("s{i}")).collect();
    let mut vms: Vec<Vm> = names
        .iter()
        .map(|n| {
            Vm(Command::new(env!("CARGO_BIN_EXE_bhyve"))
                .args(spin_vm_args(&guest_arg, &["-m", "16M"], n))
                .env("RHYVE_VMM_DIR", &reg.0)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .expect("start bhyve"))
        })
        .collect();
    // Each exists once its bhyve took its name; most are still being built.
    for n in &names {
        wait_until("the VM to exist", || reg.0.join(n).join("vm.json").exists());
    }
    for (n, vm) in names.iter().zip(vms.iter_mut()) {
        let o = reg.bhyvectl(&[&format!("--vm={n}"), "--destroy"]);
        assert!(
            o.status.success() && o.stdout.is_empty() && o.stderr.is_empty(),
            "--destroy of {n}: {:?} {}",
            o.status,
            text(&o)
        );
        // Gone means its bhyve has released the VM after tearing it down:
        // the process is only returning from main.
        let deadline = Instant::now() + Duration::from_secs(30);
        let status = loop {
            if let Some(s) = vm.0.try_wait().unwrap() {
                break s;
            }
            assert!(Instant::now() < deadline, "{n} still runs after --destroy");
            std::thread::sleep(Duration::from_millis(10));
        };
        assert_eq!(status.code(), Some(4), "{n}");
        assert!(!reg.0.join(n).exists(), "{n} still listed");
    }
    assert_eq!(text(&reg.bhyvectl(&["--list"])), "");
    for vm in vms {
        let err = String::from_utf8_lossy(&vm.wait_with_output().unwrap().stderr).to_string();
        assert!(err.contains("the VM was destroyed"), "{err}");
    }
}

/// A destroy that reaches a bhyve still building its machine (here held up
/// opening its kernel, a FIFO nobody writes yet) waits for it to stop and
/// only then reports success, however long the start takes.
#[test]
fn destroy_waits_for_a_vm_that_is_still_starting() {
    require_kvm();
    let reg = Registry::new("starting");
    std::fs::create_dir_all(&reg.0).unwrap();
    let guest = spin_guest(&reg.0);
    let guest_arg = format!("boot.kernel={}", guest.display());
    let vm = reg.bhyve(&spin_vm_args(&guest_arg, &["-m", "16M"], "vm7"));
    wait_until("the VM to be taken", || {
        text(&reg.bhyvectl(&["--list"])).contains("vm7\t16M\trunning")
    });
    // A bhyve that does not get to look at the request for a while (as
    // one still loading a large kernel): stopped.
    let pid = vm.id() as libc::pid_t;
    // SAFETY: signals to our own child.
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    let mut destroy = Command::new(env!("CARGO_BIN_EXE_bhyvectl"))
        .args(["--vm=vm7", "--destroy"])
        .env("RHYVE_VMM_DIR", &reg.0)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_secs(4));
    let early = destroy.try_wait().unwrap();
    // SAFETY: as above.
    unsafe { libc::kill(pid, libc::SIGCONT) };
    let o = destroy.wait_with_output().unwrap();
    assert!(
        early.is_none(),
        "--destroy gave up on a VM slow to answer: {early:?} {}",
        text(&o)
    );
    assert!(o.status.success(), "{}", text(&o));
    let end = vm.wait_with_output().unwrap();
    assert_eq!(end.status.code(), Some(4), "{}", text(&end));
    assert!(!reg.0.join("vm7").exists());
}
