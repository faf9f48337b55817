//! bhyve's Capsicum step on Linux: every thread of a running VM is under a
//! seccomp filter, a forbidden call in any thread role ends the VM with
//! exit 4 and a line naming the thread and the call, and once set up the
//! VM cannot open files it was not given. `security.test_violation` and
//! `security.test_open` are honoured only by debug builds, which the tests
//! run.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use rhyve_guests::{guest_args, require_kvm, run_guest, test_registry, vm_name, wait_for_line};

const BHYVE: &str = env!("CARGO_BIN_EXE_bhyve");

/// A 1 MiB disk image, removed on drop.
struct Disk(PathBuf);

impl Disk {
    fn new(tag: &str) -> Self {
        let path = std::env::temp_dir().join(format!("{}.img", vm_name(tag)));
        std::fs::write(&path, vec![0u8; 1 << 20]).expect("write the disk image");
        Disk(path)
    }
}

impl Drop for Disk {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// The `Seccomp:` field of every thread of process `pid`, by thread name.
fn seccomp_modes(pid: u32) -> Vec<(String, String)> {
    let mut modes = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).expect("list threads") {
        let status = std::fs::read_to_string(task.unwrap().path().join("status")).unwrap();
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .map(|v| v.trim().to_string())
                .unwrap_or_default()
        };
        modes.push((field("Name:"), field("Seccomp:")));
    }
    modes.sort();
    modes
}

/// Boot the power-button guest with an AHCI disk (so a device worker
/// runs), wait for "ready", hand the pid to `look`, then press the power
/// button with SIGTERM; returns the exit code.
fn while_running(extra: &[&str], tag: &str, look: impl FnOnce(u32)) -> i32 {
    require_kvm();
    let disk = Disk::new(tag);
    let slot = format!("4,ahci-hd,{}", disk.0.display());
    let mut args: Vec<&str> = vec!["-s", &slot];
    args.extend(extra);
    let mut child = Command::new(BHYVE)
        .env("RHYVE_VMM_DIR", test_registry())
        .args(guest_args("powerbutton", "", &args, tag))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start bhyve");
    let _stdout = wait_for_line(&mut child, "ready", Duration::from_secs(60));
    // Let the guest reach its idle loop.
    std::thread::sleep(Duration::from_millis(500));
    look(child.id());
    // SAFETY: kill(2) on our own child, not yet reaped.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = child.wait().expect("wait for bhyve");
    status.code().expect("bhyve ended by a signal")
}

#[test]
fn every_thread_of_a_running_vm_is_filtered() {
    let mut seen = Vec::new();
    let nvme_disk = Disk::new("sbx-threads-nvme");
    let nvme = format!("5,nvme,{}", nvme_disk.0.display());
    let code = while_running(&["-c", "2", "-s", &nvme], "sbx-threads", |pid| {
        seen = seccomp_modes(pid)
    });
    assert_eq!(code, 1, "power button: exit 1");
    let names: Vec<&str> = seen.iter().map(|(n, _)| n.as_str()).collect();
    for want in [
        "vcpu 0",
        "vcpu 1",
        "ahci-io",
        "nvme-io",
        "control",
        "spawner",
        "serial-out",
    ] {
        assert!(names.contains(&want), "no {want} thread in {seen:?}");
    }
    for (name, mode) in &seen {
        assert_eq!(mode, "2", "thread {name} is not filtered: {seen:?}");
    }
}

#[test]
fn security_sandbox_false_leaves_threads_unfiltered() {
    let mut seen = Vec::new();
    let code = while_running(&["-o", "security.sandbox=false"], "sbx-off", |pid| {
        seen = seccomp_modes(pid)
    });
    assert_eq!(code, 1);
    assert!(seen.iter().all(|(_, mode)| mode == "0"), "{seen:?}");
}

/// A forbidden call in a thread of `role` (named one of `threads`: when a
/// role has several, whichever trips first ends the VM) ends it with 4 and
/// says which thread and which call.
fn violation_ends_the_vm(role: &str, threads: &[&str]) {
    let disk = Disk::new(&format!("sbx-v-{role}"));
    let slot = format!("4,virtio-blk,{}", disk.0.display());
    let key = format!("security.test_violation={role}");
    let args = ["-o", key.as_str(), "-s", slot.as_str()];
    let run = run_guest(
        Path::new(BHYVE),
        "virtioblk",
        "",
        &args,
        &format!("sbx-v-{role}"),
    );
    run.assert_code(4);
    let wants: Vec<String> = threads
        .iter()
        .map(|thread| {
            format!(
                "bhyve: sandbox: thread \"{thread}\" ({role}) made a forbidden system call: personality (135)"
            )
        })
        .collect();
    assert!(
        run.stderr.lines().any(|l| wants.iter().any(|w| w == l)),
        "no line of {wants:?}: {}",
        run.describe()
    );
}

#[test]
fn a_forbidden_call_in_the_supervisor_ends_the_vm() {
    violation_ends_the_vm("supervisor", &["main"]);
}

#[test]
fn a_forbidden_call_in_a_vcpu_ends_the_vm() {
    violation_ends_the_vm("vcpu", &["vcpu 0"]);
}

#[test]
fn a_forbidden_call_in_a_device_worker_ends_the_vm() {
    violation_ends_the_vm("device-io", &["virtio-worker"]);
}

#[test]
fn a_forbidden_call_in_a_timer_ends_the_vm() {
    violation_ends_the_vm("timer", &["rtc-timer", "hpet-timer"]);
}

#[test]
fn a_forbidden_call_in_the_serial_port_ends_the_vm() {
    violation_ends_the_vm("serial-io", &["serial-out", "serial-in"]);
}

#[test]
fn a_forbidden_call_in_the_control_thread_ends_the_vm() {
    violation_ends_the_vm("control", &["control"]);
}

#[test]
fn a_forbidden_call_in_the_spawner_ends_the_vm() {
    violation_ends_the_vm("spawner", &["spawner"]);
}

#[test]
fn once_set_up_the_vm_opens_only_its_own_files() {
    let disk = Disk::new("sbx-open");
    let outside = std::env::temp_dir().join(format!("{}.txt", vm_name("sbx-open-outside")));
    std::fs::write(&outside, "not the guest's").unwrap();
    let slot = format!("4,virtio-blk,{}", disk.0.display());
    let try_open = |path: &Path| {
        let key = format!("security.test_open={}", path.display());
        run_guest(
            Path::new(BHYVE),
            "virtioblk",
            "",
            &["-o", &key, "-s", &slot],
            "sbx-open",
        )
    };
    let theirs = try_open(&outside);
    let _ = std::fs::remove_file(&outside);
    theirs.assert_code(1);
    let refused = format!(
        "bhyve: sandbox test: open {}: Permission denied (os error 13)",
        outside.display()
    );
    assert!(
        theirs.stderr.lines().any(|l| l == refused),
        "{}",
        theirs.describe()
    );
    let own = try_open(&disk.0);
    own.assert_code(1);
    let allowed = format!("bhyve: sandbox test: open {}: ok", disk.0.display());
    assert!(
        own.stderr.lines().any(|l| l == allowed),
        "{}",
        own.describe()
    );
}

/// The RTC's timer thread raises the guest's interrupt itself
/// (KVM_IRQ_LINE): its filter allows that (the full Linux boot found it
/// did not, when rtc_cmos turned an RTC interrupt on).
#[test]
fn the_rtc_timer_thread_raises_interrupts_while_confined() {
    let run = run_guest(Path::new(BHYVE), "cmos", "periodic", &[], "sbx-rtc");
    run.assert_no_failure();
    run.assert_code(1);
    run.assert_line("rtc periodic irqs 16");
}

/// fbuf's VNC server runs confined in a role of its own.
#[test]
fn a_forbidden_call_in_the_vnc_server_ends_the_vm() {
    let run = run_guest(
        Path::new(BHYVE),
        "virtioblk",
        "",
        &[
            "-o",
            "security.test_violation=display",
            "-s",
            "29,fbuf,tcp=127.0.0.1:0",
        ],
        "sbx-v-display",
    );
    run.assert_code(4);
    let want =
        "bhyve: sandbox: thread \"rfb\" (display) made a forbidden system call: personality (135)";
    assert!(
        run.stderr.lines().any(|l| l == want),
        "no line {want:?}: {}",
        run.describe()
    );
}

/// An operator stopping and continuing bhyve (Ctrl-Z and `fg`, `kill -STOP`
/// and `-CONT`) does not end it: threads asleep in calls the kernel resumes
/// through restart_syscall (a timer's clock_nanosleep, a worker's poll) are
/// allowed to resume.
#[test]
fn a_stopped_and_continued_vm_keeps_running() {
    let code = while_running(&["-s", "6,virtio-rnd"], "sbx-stopcont", |pid| {
        for _ in 0..3 {
            // SAFETY: kill(2) on our own child, not yet reaped.
            unsafe { libc::kill(pid as i32, libc::SIGSTOP) };
            std::thread::sleep(Duration::from_millis(300));
            unsafe { libc::kill(pid as i32, libc::SIGCONT) };
            std::thread::sleep(Duration::from_millis(700));
        }
    });
    assert_eq!(code, 1, "power button after stop/continue: exit 1");
}
