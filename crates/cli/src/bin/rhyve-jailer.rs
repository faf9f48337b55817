//! `rhyve-jailer`: run one `bhyve` as an unprivileged user that sees only
//! /dev/kvm, its tap device and its own files, as the FreeBSD Handbook runs
//! bhyve in a jail and Firecracker's jailer does on Linux.
//!
//! As root it makes a private mount namespace, mounts a tmpfs on
//! `CHROOT_BASE/NAME`, bind-mounts into it the `bhyve` binary, the shared
//! libraries it links (read-only) and every `--file` (at the same path),
//! creates /dev/kvm, /dev/net/tun and /dev/null as nodes owned by the VM's
//! user, a registry directory at /run/rhyve/vmm, pivots into it, sets
//! rlimits, drops to `--uid`/`--gid` with no supplementary groups (and so
//! no capabilities) and execs `bhyve` with the arguments after `--`.
//!
//!   rhyve-jailer --uid UID --gid GID [--chroot-base DIR] [--file PATH]...
//!       [--bhyve PATH] [--rlimit-nofile N] [--rlimit-fsize BYTES] -- BHYVE_ARGS... NAME
//!
//! Hand-written: no maintained crate does a jailer's mount and credential
//! steps for a program that is not Firecracker.

use std::ffi::{CStr, CString};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

const EXIT_USAGE: i32 = 64;
const EXIT_ERROR: i32 = 4;
const USAGE: &str = "usage: rhyve-jailer --uid UID --gid GID [--chroot-base DIR] [--file PATH]... [--bhyve PATH] [--rlimit-nofile N] [--rlimit-fsize BYTES] -- BHYVE_ARGS... NAME";
/// Where the libraries a dynamically linked `bhyve` loads live (Debian).
const LIBRARY_DIRS: &[&str] = &["/lib", "/lib64", "/usr/lib", "/usr/lib64"];
/// The devices a VM needs: KVM, taps (TUNSETIFF on /dev/net/tun) and null.
const DEVICES: &[&str] = &["/dev/kvm", "/dev/net/tun", "/dev/null"];
/// The registry inside the jail (bhyve's default, so bhyvectl run in the
/// same jail finds it).
const JAIL_REGISTRY: &str = "/run/rhyve/vmm";

struct Options {
    uid: u32,
    gid: u32,
    chroot_base: PathBuf,
    files: Vec<PathBuf>,
    bhyve: PathBuf,
    nofile: u64,
    fsize: Option<u64>,
    bhyve_args: Vec<String>,
}

fn usage_error(msg: &str) -> ! {
    eprintln!("rhyve-jailer: {msg}");
    eprintln!("{USAGE}");
    std::process::exit(EXIT_USAGE)
}

fn fail(msg: String) -> ! {
    eprintln!("rhyve-jailer: {msg}");
    std::process::exit(EXIT_ERROR)
}

fn parse(args: &[String]) -> Options {
    let mut uid = None;
    let mut gid = None;
    let mut chroot_base = PathBuf::from("/run/rhyve/jail");
    let mut files = Vec::new();
    let mut bhyve = None;
    let mut nofile = 4096;
    let mut fsize = None;
    let mut it = args.iter();
    let number = |flag: &str, v: Option<&String>| -> u64 {
        let v = v.unwrap_or_else(|| usage_error(&format!("{flag} needs a value")));
        v.parse()
            .unwrap_or_else(|_| usage_error(&format!("{flag}: \"{v}\" is not a number")))
    };
    let mut bhyve_args = None;
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--uid" => uid = Some(number("--uid", it.next()) as u32),
            "--gid" => gid = Some(number("--gid", it.next()) as u32),
            "--rlimit-nofile" => nofile = number("--rlimit-nofile", it.next()),
            "--rlimit-fsize" => fsize = Some(number("--rlimit-fsize", it.next())),
            "--chroot-base" | "--file" | "--bhyve" => {
                let v = it
                    .next()
                    .unwrap_or_else(|| usage_error(&format!("{arg} needs a path")));
                match arg.as_str() {
                    "--chroot-base" => chroot_base = PathBuf::from(v),
                    "--file" => files.push(PathBuf::from(v)),
                    _ => bhyve = Some(PathBuf::from(v)),
                }
            }
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            "--" => {
                bhyve_args = Some(it.by_ref().cloned().collect::<Vec<_>>());
            }
            other => usage_error(&format!("unknown option \"{other}\"")),
        }
    }
    let uid = uid.unwrap_or_else(|| usage_error("--uid is required"));
    let gid = gid.unwrap_or_else(|| usage_error("--gid is required"));
    if uid == 0 || gid == 0 {
        usage_error("the VM's --uid and --gid must not be 0: the jail is for an unprivileged user");
    }
    let bhyve_args = bhyve_args
        .filter(|a| !a.is_empty())
        .unwrap_or_else(|| usage_error("no bhyve arguments after --"));
    for file in &files {
        if !file.is_absolute() {
            usage_error(&format!("--file {}: give an absolute path", file.display()));
        }
    }
    // bhyve beside this binary unless told otherwise.
    let bhyve = bhyve.unwrap_or_else(|| {
        std::env::current_exe()
            .ok()
            .and_then(|p| p.parent().map(|d| d.join("bhyve")))
            .unwrap_or_else(|| fail("cannot find bhyve beside rhyve-jailer; give --bhyve".into()))
    });
    Options {
        uid,
        gid,
        chroot_base,
        files,
        bhyve,
        nofile,
        fsize,
        bhyve_args,
    }
}

fn cstr(path: &Path) -> CString {
    CString::new(path.as_os_str().as_bytes())
        .unwrap_or_else(|_| fail(format!("{}: path holds a NUL byte", path.display())))
}

fn check(rc: libc::c_int, what: impl FnOnce() -> String) {
    if rc != 0 {
        fail(format!("{}: {}", what(), std::io::Error::last_os_error()));
    }
}

fn mount(src: Option<&Path>, target: &Path, fstype: Option<&CStr>, flags: libc::c_ulong) {
    let src_c = src.map(cstr);
    let target_c = cstr(target);
    // SAFETY: NUL-terminated strings that outlive the call.
    let rc = unsafe {
        libc::mount(
            src_c.as_ref().map_or(c"none".as_ptr(), |s| s.as_ptr()),
            target_c.as_ptr(),
            fstype.map_or(std::ptr::null(), |f| f.as_ptr()),
            flags,
            std::ptr::null(),
        )
    };
    check(rc, || format!("cannot mount on {}", target.display()));
}

/// `host` at the same path inside `root`, read-only unless `writable`;
/// a symlink is copied as a symlink.
fn bind(root: &Path, host: &Path, writable: bool) {
    let inside = root.join(host.strip_prefix("/").unwrap_or(host));
    let meta = std::fs::symlink_metadata(host)
        .unwrap_or_else(|e| fail(format!("{}: {e}", host.display())));
    if let Some(parent) = inside.parent() {
        std::fs::create_dir_all(parent)
            .unwrap_or_else(|e| fail(format!("{}: {e}", parent.display())));
    }
    if meta.file_type().is_symlink() {
        let target =
            std::fs::read_link(host).unwrap_or_else(|e| fail(format!("{}: {e}", host.display())));
        if !inside.exists() {
            std::os::unix::fs::symlink(&target, &inside)
                .unwrap_or_else(|e| fail(format!("{}: {e}", inside.display())));
        }
        return;
    }
    if meta.is_dir() {
        std::fs::create_dir_all(&inside)
    } else {
        std::fs::File::create(&inside).map(drop)
    }
    .unwrap_or_else(|e| fail(format!("{}: {e}", inside.display())));
    mount(Some(host), &inside, None, libc::MS_BIND | libc::MS_REC);
    if !writable {
        mount(
            None,
            &inside,
            None,
            libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY | libc::MS_NOSUID,
        );
    }
}

/// A device node like the host's `dev`, owned by the VM's user.
fn device(root: &Path, dev: &Path, uid: u32, gid: u32) {
    let Ok(meta) = std::fs::metadata(dev) else {
        return; // no tap support on this host: the VM simply has none
    };
    if !meta.file_type().is_char_device() {
        fail(format!("{} is not a character device", dev.display()));
    }
    let inside = root.join(dev.strip_prefix("/").unwrap_or(dev));
    if let Some(parent) = inside.parent() {
        std::fs::create_dir_all(parent)
            .unwrap_or_else(|e| fail(format!("{}: {e}", parent.display())));
    }
    let c = cstr(&inside);
    // SAFETY: a NUL-terminated path; mknod and chown take no other pointers.
    unsafe {
        check(
            libc::mknod(c.as_ptr(), libc::S_IFCHR | 0o600, meta.rdev()),
            || format!("cannot create {}", inside.display()),
        );
        check(libc::chown(c.as_ptr(), uid, gid), || {
            format!("cannot give {} to the VM's user", inside.display())
        });
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let o = parse(&args);
    let name = o.bhyve_args.last().cloned().unwrap_or_default();
    if name.is_empty() || name.contains('/') || name.starts_with('-') {
        usage_error(&format!(
            "\"{name}\" is not a VM name: the last bhyve argument names the VM"
        ));
    }
    let bhyve = std::fs::canonicalize(&o.bhyve)
        .unwrap_or_else(|e| fail(format!("{}: {e}", o.bhyve.display())));
    let root = o.chroot_base.join(&name);
    std::fs::create_dir_all(&root).unwrap_or_else(|e| fail(format!("{}: {e}", root.display())));

    // SAFETY: plain system calls on this process.
    unsafe {
        check(libc::unshare(libc::CLONE_NEWNS), || {
            "cannot make a private mount namespace (run rhyve-jailer as root)".into()
        });
    }
    // Nothing mounted here propagates back to the host.
    mount(None, Path::new("/"), None, libc::MS_REC | libc::MS_PRIVATE);
    mount(None, &root, Some(c"tmpfs"), libc::MS_NOSUID);
    std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o755))
        .unwrap_or_else(|e| fail(format!("{}: {e}", root.display())));

    for dir in LIBRARY_DIRS {
        if Path::new(dir).exists() {
            bind(&root, Path::new(dir), false);
        }
    }
    bind(&root, &bhyve, false);
    for file in &o.files {
        let writable = std::fs::metadata(file)
            .map(|m| !m.permissions().readonly())
            .unwrap_or(false);
        bind(&root, file, writable);
    }
    for dev in DEVICES {
        device(&root, Path::new(dev), o.uid, o.gid);
    }
    let registry = root.join(JAIL_REGISTRY.trim_start_matches('/'));
    std::fs::create_dir_all(&registry)
        .unwrap_or_else(|e| fail(format!("{}: {e}", registry.display())));
    let reg_c = cstr(&registry);
    // SAFETY: a NUL-terminated path.
    check(unsafe { libc::chown(reg_c.as_ptr(), o.uid, o.gid) }, || {
        format!("cannot give {} to the VM's user", registry.display())
    });

    // Into the jail: the old root is unmounted, so nothing else is reachable.
    let old = root.join(".old-root");
    std::fs::create_dir_all(&old).unwrap_or_else(|e| fail(format!("{}: {e}", old.display())));
    let (root_c, old_c) = (cstr(&root), cstr(&old));
    // SAFETY: NUL-terminated paths; the remaining calls take none or plain data.
    unsafe {
        check(
            libc::syscall(libc::SYS_pivot_root, root_c.as_ptr(), old_c.as_ptr()) as libc::c_int,
            || "pivot_root".into(),
        );
        check(libc::chdir(c"/".as_ptr()), || "chdir /".into());
        check(
            libc::umount2(c"/.old-root".as_ptr(), libc::MNT_DETACH),
            || "cannot detach the host's root".into(),
        );
        check(libc::rmdir(c"/.old-root".as_ptr()), || {
            "rmdir /.old-root".into()
        });

        let limit = |resource, value: u64| {
            let rl = libc::rlimit {
                rlim_cur: value,
                rlim_max: value,
            };
            check(libc::setrlimit(resource, &rl), || "setrlimit".into());
        };
        limit(libc::RLIMIT_NOFILE, o.nofile);
        if let Some(fsize) = o.fsize {
            limit(libc::RLIMIT_FSIZE, fsize);
        }
        // No core files of guest memory.
        limit(libc::RLIMIT_CORE, 0);

        check(libc::setgroups(0, std::ptr::null()), || "setgroups".into());
        check(libc::setresgid(o.gid, o.gid, o.gid), || "setresgid".into());
        check(libc::setresuid(o.uid, o.uid, o.uid), || "setresuid".into());
    }

    let err = std::os::unix::process::CommandExt::exec(
        std::process::Command::new(&bhyve)
            .args(&o.bhyve_args)
            .env_clear()
            .env("RHYVE_VMM_DIR", JAIL_REGISTRY)
            .env("PATH", "/usr/bin:/bin"),
    );
    fail(format!("cannot run {}: {err}", bhyve.display()))
}
