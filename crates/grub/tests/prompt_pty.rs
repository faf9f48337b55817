//! The Handbook's interactive session through a pseudo-terminal: grub-bhyve
//! with `-c /dev/pts/N`, keys typed on the other side, output read back.

mod common;

use common::*;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd};
use std::time::{Duration, Instant};

struct Pty {
    master: File,
    slave_path: String,
    seen: String,
}

impl Pty {
    fn open() -> Pty {
        // SAFETY: plain libc pty calls; the descriptor becomes a File we own.
        unsafe {
            let fd = libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY);
            assert!(fd >= 0, "posix_openpt");
            assert_eq!(libc::grantpt(fd), 0);
            assert_eq!(libc::unlockpt(fd), 0);
            let mut buf = [0 as libc::c_char; 128];
            assert_eq!(libc::ptsname_r(fd, buf.as_mut_ptr(), buf.len()), 0);
            let slave_path = std::ffi::CStr::from_ptr(buf.as_ptr())
                .to_string_lossy()
                .into_owned();
            Pty {
                master: File::from_raw_fd(fd),
                slave_path,
                seen: String::new(),
            }
        }
    }

    /// Read until `needle` appears in what was printed since the last call.
    fn expect(&mut self, needle: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(pos) = self.seen.find(needle) {
                let upto = pos + needle.len();
                let got = self.seen[..upto].to_string();
                self.seen.drain(..upto);
                return got;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "timed out waiting for {needle:?}; output so far:\n{}",
                self.seen
            );
            let mut pfd = libc::pollfd {
                fd: self.master.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd.
            let r = unsafe { libc::poll(&mut pfd, 1, left.as_millis() as i32) };
            if r > 0 {
                let mut buf = [0u8; 4096];
                match self.master.read(&mut buf) {
                    Ok(n) if n > 0 => self.seen.push_str(&String::from_utf8_lossy(&buf[..n])),
                    _ => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        }
    }

    fn type_line(&mut self, line: &str) {
        self.master.write_all(line.as_bytes()).unwrap();
        self.master.write_all(b"\r").unwrap();
    }
}

#[test]
fn handbook_prompt_session_over_a_pty() {
    let dir = scratch("pty");
    let img = iso(&dir, "-R -J", "pty");
    let disk = mbr_disk(&dir);
    let map = device_map(&dir, &[("hd0", &disk), ("cd0", &img)]);
    let mut pty = Pty::open();
    let o = opts(&map, "cd0", &["-c", &pty.slave_path]);
    let grub = std::thread::spawn(move || {
        let mut con = rhyve_grub::open_console(&o).expect("open the -c tty");
        rhyve_grub::run(&o, &mut con)
    });
    pty.expect("Graphical install");
    pty.expect("Advanced options ...>");
    pty.master.write_all(b"c").unwrap();
    pty.expect("grub> ");
    pty.type_line("ls");
    let out = pty.expect("grub> ");
    assert!(
        out.contains("(hd0) (hd0,msdos1) (hd0,msdos5) (cd0) \r\n"),
        "{out}"
    );
    pty.type_line("ls (cd0)/isolinux");
    let out = pty.expect("grub> ");
    assert!(out.contains("isolinux.cfg menu.cfg"), "{out}");
    pty.type_line("ls (hd0,msdos1)/");
    let out = pty.expect("grub> ");
    assert!(
        out.contains("boot/") && out.contains("etc/") && out.contains("lost+found/"),
        "{out}"
    );
    pty.type_line("cat (hd0,msdos1)/etc/hostname");
    let out = pty.expect("grub> ");
    assert!(out.contains("debian"), "{out}");
    pty.type_line("help");
    let out = pty.expect("grub> ");
    assert!(
        out.contains("linux FILE") && out.contains("search"),
        "{out}"
    );
    pty.type_line("bogus_command x");
    let out = pty.expect("grub> ");
    assert!(
        out.contains("error: can't find command `bogus_command'."),
        "{out}"
    );
    // A typo, erased with backspace.
    pty.master
        .write_all(b"echo helxo\x7f\x7flo there\r")
        .unwrap();
    let out = pty.expect("grub> ");
    assert!(out.contains("hello there"), "{out}");
    pty.type_line("set root=(hd0,msdos1)");
    pty.expect("grub> ");
    pty.type_line("linux /boot/vmlinuz-6.1.0-13-amd64 root=/dev/vda1 ro");
    pty.expect("grub> ");
    pty.type_line("initrd /boot/initrd.img-6.1.0-13-amd64");
    pty.expect("grub> ");
    pty.type_line("boot");
    let sel = grub.join().unwrap().expect("boot selection");
    assert!(sel.kernel == kernel(), "kernel bytes differ");
    assert!(sel.initrd == padded(&initrd()), "initrd bytes differ");
    assert_eq!(
        sel.cmdline,
        "console=ttyS0 BOOT_IMAGE=/boot/vmlinuz-6.1.0-13-amd64 root=/dev/vda1 ro"
    );
    assert_eq!(sel.menu_title, None);
}

#[test]
fn menu_timeout_counts_down_on_a_pty() {
    let dir = scratch("pty-timeout");
    let tree = dir.join("t");
    write(&tree.join("boot/grub/grub.cfg"), b"set timeout=1\nset default=1\nmenuentry 'a' { linux /k0 }\nmenuentry \"b\" { linux /k1 x=$default }\n");
    write(&tree.join("k0"), &fake_kernel("zero", 0));
    write(&tree.join("k1"), &fake_kernel("one", 0));
    let ext = dir.join("t.ext4");
    mkext4(&ext, &tree, 4, "t");
    let map = device_map(&dir, &[("hd0", &ext)]);
    let mut pty = Pty::open();
    let o = opts(&map, "hd0", &["--cons-dev", &pty.slave_path]);
    let started = Instant::now();
    let grub = std::thread::spawn(move || {
        let mut con = rhyve_grub::open_console(&o).expect("open the -c tty");
        rhyve_grub::run(&o, &mut con)
    });
    pty.expect("executed automatically in 1s");
    let sel = grub.join().unwrap().expect("boot selection");
    assert!(started.elapsed() >= Duration::from_millis(900));
    assert_eq!(sel.kernel, fake_kernel("one", 0));
    assert_eq!(sel.menu_title.as_deref(), Some("b"));
    assert_eq!(sel.cmdline, "console=ttyS0 BOOT_IMAGE=/k1 x=1");
}
