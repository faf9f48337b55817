//! `rhyve-jailer`: a VM runs as an unprivileged user in a mount namespace
//! holding only its binary, libraries, /dev/kvm, /dev/net/tun, /dev/null and
//! its files; and the FreeBSD Handbook's "bhyve in a jail" (a jail allowed
//! vmm, its devfs showing vmm, the tap and the disk, bhyve run inside),
//! translated. Needs root, as the jailer does.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use rhyve_guests::{guest_path, require_kvm, vm_name, wait_for_line, BASE_MACHINE};

/// nobody:nogroup on Debian.
const JAIL_UID: u32 = 65534;

fn jailer() -> PathBuf {
    Path::new(env!("CARGO_BIN_EXE_bhyve")).with_file_name("rhyve-jailer")
}

fn require_root() {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "the jail tests need root, as rhyve-jailer does"
    );
}

/// A 1 MiB disk owned by the jail's user, starting with a marker the
/// virtioblk guest prints; removed on drop.
struct Disk(PathBuf);

impl Disk {
    fn new(tag: &str) -> Self {
        let path = std::env::temp_dir().join(format!("{}.img", vm_name(tag)));
        let mut image = vec![0u8; 1 << 20];
        image[..16].copy_from_slice(b"rhyve-virtio-blk");
        std::fs::write(&path, image).expect("write the disk image");
        std::os::unix::fs::chown(&path, Some(JAIL_UID), Some(JAIL_UID)).unwrap();
        Disk(path)
    }
}

impl Drop for Disk {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn jail_base() -> PathBuf {
    std::env::temp_dir().join("rhyve-test-jail")
}

fn jailed(guest: &Path, disk: &Path, bhyve_args: &[&str]) -> Command {
    let mut cmd = Command::new(jailer());
    cmd.args([
        "--uid",
        &JAIL_UID.to_string(),
        "--gid",
        &JAIL_UID.to_string(),
    ])
    .arg("--chroot-base")
    .arg(jail_base())
    .arg("--file")
    .arg(guest)
    .arg("--file")
    .arg(disk)
    .arg("--")
    .arg("-o")
    .arg(format!("boot.kernel={}", guest.display()))
    .args(bhyve_args)
    .stdin(Stdio::null());
    cmd
}

#[test]
fn a_guest_boots_as_an_unprivileged_user_inside_the_jail() {
    require_kvm();
    require_root();
    let disk = Disk::new("jail-user");
    let slot = format!("4,ahci-hd,{}", disk.0.display());
    let name = vm_name("jail-user");
    let mut child = jailed(
        &guest_path("powerbutton"),
        &disk.0,
        &[BASE_MACHINE, &["-s", &slot, &name]].concat(),
    )
    .stdout(Stdio::piped())
    .spawn()
    .expect("start rhyve-jailer");
    let _stdout = wait_for_line(&mut child, "ready", Duration::from_secs(60));
    let pid = child.id();
    // A failed check below must not leave the VM running.
    struct KillOnDrop(u32);
    impl Drop for KillOnDrop {
        fn drop(&mut self) {
            // SAFETY: kill(2) on our child, not reaped yet: the normal path
            // forgets the guard before it waits.
            unsafe { libc::kill(self.0 as i32, libc::SIGKILL) };
        }
    }
    let guard = KillOnDrop(pid);
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|v| v.split_whitespace().collect::<Vec<_>>().join(" "))
            .unwrap_or_default()
    };
    // The jailer exec'd bhyve: same pid, now nobody, no capabilities.
    assert!(field("Name:").starts_with("bhyve"), "{status}");
    assert_eq!(field("Uid:"), "65534 65534 65534 65534");
    assert_eq!(field("Gid:"), "65534 65534 65534 65534");
    assert_eq!(field("Groups:"), "");
    assert_eq!(field("CapEff:"), "0000000000000000");
    assert_eq!(field("Seccomp:"), "2");
    // What its root holds: no /etc, /home, /proc, /root, /work.
    let mut top: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/root"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    top.sort();
    for absent in ["etc", "home", "proc", "root", "sys", "var"] {
        assert!(
            !top.contains(&absent.to_string()),
            "{absent} in the jail: {top:?}"
        );
    }
    let dev: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/root/dev"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(dev.contains(&"kvm".to_string()), "{dev:?}");
    std::mem::forget(guard);
    // SAFETY: kill(2) on our own child, not yet reaped.
    unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(1), "the power button powers it off");
}

/// The Handbook runs bhyve in a jail whose devfs shows vmm, the tap and the
/// VM's files: `jexec bhyvejail bhyve -A -H -P -c 1 -m 256M -s 0,hostbridge
/// -s 1,lpc -s 2,virtio-net,tap0 -s 4,virtio-blk,DISK -l com1,stdio NAME`.
/// On Linux: a tap owned by the jail's user (in a scratch network
/// namespace), rhyve-jailer, the same bhyve arguments.
#[test]
fn the_handbooks_jail_example_translated_runs() {
    require_kvm();
    require_root();
    let ns = format!("rhyve-jail-{}", std::process::id());
    let ip = |args: &[&str]| {
        let out = Command::new("ip").args(args).output().expect("run ip");
        assert!(
            out.status.success(),
            "ip {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    ip(&["netns", "add", &ns]);
    struct Netns(String);
    impl Drop for Netns {
        fn drop(&mut self) {
            let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
        }
    }
    let _netns = Netns(ns.clone());
    ip(&[
        "-n", &ns, "tuntap", "add", "dev", "tap0", "mode", "tap", "user", "65534",
    ]);
    let disk = Disk::new("jail-handbook");
    let slot = format!("4,virtio-blk,{}", disk.0.display());
    let name = vm_name("jail-handbook");
    let guest = guest_path("virtioblk");
    let jail = jailed(
        &guest,
        &disk.0,
        &[
            "-A",
            "-H",
            "-P",
            "-c",
            "1",
            "-m",
            "256M",
            "-s",
            "0,hostbridge",
            "-s",
            "1,lpc",
            "-s",
            "2,virtio-net,tap0",
            "-s",
            &slot,
            "-l",
            "com1,stdio",
            &name,
        ],
    );
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", &ns])
        .arg(jail.get_program())
        .args(jail.get_args())
        .stdin(Stdio::null());
    let out = cmd.output().expect("run the jail");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stdout}\n{stderr}");
    assert!(
        stdout.lines().any(|l| l.trim_end() == "virtio-blk ok"),
        "{stdout}\n{stderr}"
    );
}

/// The hardened unit parses: `systemd-analyze verify` knows every key (a
/// misspelt hardening key would be ignored silently at run time). Its
/// commands are replaced by /bin/true, since only the unit is judged.
#[test]
fn the_hardened_systemd_unit_verifies() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let unit = std::fs::read_to_string(root.join("share/systemd/rhyve-vm@.service")).unwrap();
    for key in [
        "NoNewPrivileges=yes",
        "ProtectSystem=full",
        "PrivateTmp=yes",
        "DevicePolicy=closed",
        "DeviceAllow=/dev/kvm rw",
        "DeviceAllow=/dev/net/tun rw",
        "DeviceAllow=char-pts rw",
    ] {
        assert!(unit.lines().any(|l| l == key), "the unit lacks {key}");
    }
    let dir = std::env::temp_dir().join(vm_name("unit"));
    std::fs::create_dir_all(&dir).unwrap();
    let checked: String = unit
        .lines()
        .map(|l| {
            if let Some((key, _)) = l.split_once("=/").filter(|(k, _)| k.starts_with("Exec")) {
                format!("{key}=/bin/true")
            } else if l.starts_with("EnvironmentFile=") {
                "Environment=VMRUN_ARGS=".to_string()
            } else {
                l.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    let path = dir.join("rhyve-vm@.service");
    std::fs::write(&path, checked + "\n").unwrap();
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(&path)
        .output()
        .expect("systemd-analyze (scripts/setup.sh installs systemd)");
    let _ = std::fs::remove_dir_all(&dir);
    let said =
        String::from_utf8_lossy(&out.stderr).to_string() + &String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && said.trim().is_empty(), "{said}");
}
