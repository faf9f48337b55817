//! Running user-mode-linux against `rhyve-vhost-user`: Debian's
//! `user-mode-linux` kernel boots a busybox initramfs whose /init is the
//! test's script, its virtio drivers talk vhost-user to our backends, and
//! the console output (stdout) is what the test reads.
//!
//! Two quirks of this machine are handled here, not in the product: UML 6.1
//! cannot restore AVX-512/AMX register state through ptrace (its
//! PTRACE_SETREGSET(NT_X86_XSTATE) buffer is smaller than the host's), so
//! UML runs under a seccomp filter that makes that regset unavailable and
//! UML falls back to the plain FXSAVE area; and busybox's glibc is told
//! (GLIBC_TUNABLES on the kernel command line, which init inherits) not to
//! use AVX, whose upper halves that fallback does not preserve.

#![allow(dead_code)]

use std::io::Write;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Debian packages the UML tests need.
pub const PACKAGES: &[&str] = &[
    "user-mode-linux",
    "busybox-static",
    "cpio",
    "e2fsprogs",
    "iproute2",
];

const GLIBC_NO_AVX: &str =
    "GLIBC_TUNABLES=glibc.cpu.hwcaps=-AVX,-AVX2,-AVX512F,-AVX512VL,-AVX512BW,-AVX512DQ";

/// Install what is missing (CI runs as root with Debian's mirrors).
pub fn ensure_packages() {
    let have = |p: &str| Path::new(p).exists();
    let needed = [
        "/usr/bin/linux.uml",
        "/bin/busybox",
        "/usr/bin/cpio",
        "/usr/sbin/debugfs",
    ];
    if needed.iter().all(|p| have(p)) && (have("/usr/sbin/ip") || have("/sbin/ip")) {
        return;
    }
    let ok = Command::new("apt-get")
        .args(["install", "-y", "--no-install-recommends"])
        .args(PACKAGES)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .stdout(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(ok, "apt-get install {} failed", PACKAGES.join(" "));
}

/// /usr/lib/uml/modules/<version>/kernel
pub fn modules_dir() -> PathBuf {
    let base = Path::new("/usr/lib/uml/modules");
    let version = std::fs::read_dir(base)
        .expect("user-mode-linux modules")
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .next()
        .expect("a UML module version directory");
    version.join("kernel")
}

/// A scratch directory removed when dropped.
pub struct Scratch(pub PathBuf);

impl Scratch {
    pub fn new(name: &str) -> Self {
        let d = std::env::temp_dir().join(format!("rhyve-uml-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        Scratch(d)
    }
    pub fn path(&self, f: &str) -> PathBuf {
        self.0.join(f)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Build a newc initramfs: busybox, `modules` (paths under the UML module
/// tree, loaded in order by the script), `files` (name, bytes) and /init.
pub fn initramfs(dir: &Path, modules: &[&str], files: &[(&str, &[u8])], script: &str) -> PathBuf {
    let root = dir.join("root");
    for d in ["bin", "lib", "proc", "sys", "dev", "mnt", "tmp"] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    std::fs::copy("/bin/busybox", root.join("bin/busybox")).unwrap();
    let mut init = String::from(
        "#!/bin/busybox sh\n/bin/busybox --install -s /bin\n\
         mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev\n",
    );
    for m in modules {
        let src = modules_dir().join(m);
        let name = src.file_name().unwrap().to_owned();
        std::fs::copy(&src, root.join("lib").join(&name)).unwrap();
        init.push_str(&format!("insmod /lib/{}\n", name.to_string_lossy()));
    }
    for (name, data) in files {
        std::fs::write(root.join(name), data).unwrap();
    }
    init.push_str(script);
    init.push_str("\necho UML-TEST-END\npoweroff -f\n");
    let init_path = root.join("init");
    std::fs::write(&init_path, init).unwrap();
    std::fs::set_permissions(
        &init_path,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let out = dir.join("initrd.cpio");
    let mut child = Command::new("cpio")
        .args(["-o", "-H", "newc", "--quiet"])
        .current_dir(&root)
        .stdin(Stdio::piped())
        .stdout(std::fs::File::create(&out).unwrap())
        .spawn()
        .expect("cpio");
    let mut names = String::from(".\n");
    for e in walk(&root) {
        names.push_str(&format!("./{}\n", e.strip_prefix(&root).unwrap().display()));
    }
    child
        .stdin
        .take()
        .unwrap()
        .write_all(names.as_bytes())
        .unwrap();
    assert!(child.wait().unwrap().success(), "cpio failed");
    out
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        out.push(p.clone());
        if p.is_dir() && !p.is_symlink() {
            out.extend(walk(&p));
        }
    }
    out
}

/// The `rhyve-vhost-user` command users run, as cargo built it.
pub fn vhost_user_binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_rhyve-vhost-user"))
}

/// A running `rhyve-vhost-user`, killed when dropped.
pub struct Backend {
    child: Child,
    pub log: PathBuf,
}

impl Drop for Backend {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Backend {
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// Start `rhyve-vhost-user --socket SOCKET DEVICE` (inside network
/// namespace `netns` if given) and wait for its socket.
pub fn start_backend(
    scratch: &Scratch,
    socket: &Path,
    device: &str,
    netns: Option<&str>,
) -> Backend {
    let log = scratch.path("backend.log");
    let bin = vhost_user_binary();
    let mut cmd = match netns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns]).arg(&bin);
            c
        }
        None => Command::new(&bin),
    };
    cmd.arg("--socket").arg(socket).arg(device);
    cmd.stdout(std::fs::File::create(&log).unwrap());
    cmd.stderr(std::fs::File::options().append(true).open(&log).unwrap());
    let child = cmd.spawn().expect("rhyve-vhost-user");
    let mut backend = Backend { child, log };
    let deadline = Instant::now() + Duration::from_secs(10);
    while !socket.exists() {
        if let Ok(Some(status)) = backend.child.try_wait() {
            panic!(
                "rhyve-vhost-user exited with {status}: {}",
                backend.log_text()
            );
        }
        assert!(
            Instant::now() < deadline,
            "no vhost-user socket: {}",
            backend.log_text()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    backend
}

/// Installed in the UML process: PTRACE_GETREGSET/SETREGSET of
/// NT_X86_XSTATE fail with EIO, everything else is allowed.
fn hide_xstate_regset() -> std::io::Result<()> {
    const PTRACE: u32 = 101;
    const GETREGSET: u32 = 0x4204;
    const SETREGSET: u32 = 0x4205;
    const NT_X86_XSTATE: u32 = 0x202;
    const AUDIT_ARCH_X86_64: u32 = 0xC000_003E;
    let ld = |off: u32| libc::sock_filter {
        code: 0x20,
        jt: 0,
        jf: 0,
        k: off,
    };
    let jeq = |k: u32, jt: u8, jf: u8| libc::sock_filter {
        code: 0x15,
        jt,
        jf,
        k,
    };
    let ret = |k: u32| libc::sock_filter {
        code: 0x06,
        jt: 0,
        jf: 0,
        k,
    };
    let filter = [
        ld(4),
        jeq(AUDIT_ARCH_X86_64, 0, 8),
        ld(0),
        jeq(PTRACE, 0, 6),
        ld(16),
        jeq(GETREGSET, 1, 0),
        jeq(SETREGSET, 0, 3),
        ld(32),
        jeq(NT_X86_XSTATE, 0, 1),
        ret(0x0005_0000 | libc::EIO as u32),
        ret(0x7fff_0000),
    ];
    let prog = libc::sock_fprog {
        len: filter.len() as u16,
        filter: filter.as_ptr() as *mut libc::sock_filter,
    };
    // SAFETY: plain prctl calls with a filter program that outlives them.
    unsafe {
        if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0
            || libc::prctl(libc::PR_SET_SECCOMP, 2, &prog as *const libc::sock_fprog) != 0
        {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Boot UML with `initrd` and `virtio_uml.device=` arguments; returns its
/// console output. Panics if it does not reach the end of /init in time.
pub fn run_uml(initrd: &Path, devices: &[String], timeout: Duration) -> String {
    let mut cmd = Command::new("/usr/bin/linux.uml");
    cmd.arg("mem=128M")
        .arg(format!("initrd={}", initrd.display()))
        .args(devices.iter().map(|d| format!("virtio_uml.device={d}")))
        .args(["con=null", "con0=null,fd:1", "quiet", GLIBC_NO_AVX])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    // SAFETY: the closure only makes async-signal-safe prctl calls.
    unsafe {
        cmd.pre_exec(hide_xstate_regset);
    }
    let mut child = cmd.spawn().expect("user-mode-linux");
    let mut stdout = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = std::io::Read::read_to_end(&mut stdout, &mut s);
        String::from_utf8_lossy(&s).into_owned()
    });
    let deadline = Instant::now() + timeout;
    loop {
        if child.try_wait().unwrap().is_some() {
            break;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            let out = reader.join().unwrap();
            panic!("user-mode-linux timed out; console:\n{out}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = reader.join().unwrap();
    assert!(
        out.contains("UML-TEST-END"),
        "UML did not finish /init; console:\n{out}"
    );
    out
}

/// The value after `key ` on the console line that starts with it.
pub fn console_value<'a>(out: &'a str, key: &str) -> Option<&'a str> {
    out.lines()
        .find_map(|l| l.strip_prefix(key).map(|v| v.trim()))
}

/// Deterministic bytes (xorshift), so host and guest agree without sharing state.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

pub fn md5_hex(data: &[u8]) -> String {
    use md5::Digest;
    md5::Md5::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}
