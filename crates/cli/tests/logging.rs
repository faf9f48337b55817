//! Log lines as a journal, a file or a pipe gets them: plain text (no
//! colour codes), one `PROGRAM: LEVEL: message` form, the level set by
//! `RUST_LOG`.

use std::io::BufRead;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

const BHYVE: &str = env!("CARGO_BIN_EXE_bhyve");

/// `bhyve` with `rust_log` (or none), stderr to a pipe.
fn bhyve(args: &[&str], rust_log: Option<&str>) -> Output {
    let mut cmd = Command::new(BHYVE);
    cmd.args(args)
        .env_remove("RUST_LOG")
        .env_remove("NO_COLOR")
        .stdin(Stdio::null());
    if let Some(spec) = rust_log {
        cmd.env("RUST_LOG", spec);
    }
    cmd.output().unwrap()
}

/// A command line whose parsing logs a warning, then fails with status 64.
const WARNS: &[&str] = &["-f", "name=opt/x,file=/nonexistent/x", "vm"];
const WARNING: &str = "bhyve: warning: Can't open fw_cfg_user_file file /nonexistent/x: \
                       No such file or directory (os error 2)\n";
const ERROR: &str = "bhyve: invalid fwcfg item 'name=opt/x,file=/nonexistent/x'\n";

#[test]
fn warnings_are_plain_prefixed_lines_when_stderr_is_not_a_terminal() {
    let out = bhyve(WARNS, None);
    assert_eq!(out.status.code(), Some(64));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        format!("{WARNING}{ERROR}")
    );
}

#[test]
fn rust_log_sets_what_is_shown() {
    let out = bhyve(WARNS, Some("error"));
    assert_eq!(String::from_utf8_lossy(&out.stderr), ERROR);

    // An empty option name (`,,`) is logged at debug level while parsing.
    let dump = [
        "-s",
        "0,hostbridge",
        "-s",
        "3,virtio-blk,/x.img,,ro",
        "-o",
        "config.dump=1",
        "vm",
    ];
    assert_eq!(String::from_utf8_lossy(&bhyve(&dump, None).stderr), "");
    assert_eq!(
        String::from_utf8_lossy(&bhyve(&dump, Some("debug")).stderr),
        "bhyve: debug: rhyve_config::legacy: empty option name ignored node=\"pci.0.3.0\"\n"
    );
    assert_eq!(
        String::from_utf8_lossy(&bhyve(&dump, Some("rhyve_config::cli=debug")).stderr),
        "",
        "RUST_LOG filters by module"
    );

    let out = bhyve(WARNS, Some("=["));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        format!(
            "bhyve: warning: RUST_LOG \"=[\": invalid filter directive; \
             showing warnings and errors\n{WARNING}{ERROR}"
        )
    );
}

#[test]
fn rhyve_vhost_user_logs_the_same_way() {
    let dir = std::env::temp_dir().join(format!("rhyve-log-vhost-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let socket = dir.join("rng.sock");
    let mut child = Command::new(env!("CARGO_BIN_EXE_rhyve-vhost-user"))
        .arg("--socket")
        .arg(&socket)
        .arg("virtio-rnd")
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = std::io::BufReader::new(stderr).read_line(&mut line);
        let _ = tx.send(line);
    });
    let line = rx.recv_timeout(Duration::from_secs(20));
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(
        line.unwrap_or_default(),
        format!(
            "rhyve-vhost-user: info: serving virtio-rnd on {}\n",
            socket.display()
        )
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// What `bhyve WARNS` prints on stderr when stderr is a terminal.
fn stderr_on_a_terminal(no_color: bool) -> String {
    use std::io::Read;
    use std::os::fd::FromRawFd;
    // SAFETY: pty set-up on fds we own; ptsname_r writes at most name.len() bytes.
    let (mut master, slave) = unsafe {
        let fd = libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC);
        assert!(fd >= 0);
        assert_eq!(libc::grantpt(fd), 0);
        assert_eq!(libc::unlockpt(fd), 0);
        let mut name = [0 as libc::c_char; 128];
        assert_eq!(libc::ptsname_r(fd, name.as_mut_ptr(), name.len()), 0);
        let path = std::ffi::CStr::from_ptr(name.as_ptr()).to_string_lossy();
        let slave = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path.as_ref())
            .unwrap();
        (std::fs::File::from_raw_fd(fd), slave)
    };
    let mut cmd = Command::new(BHYVE);
    cmd.args(WARNS)
        .env_remove("RUST_LOG")
        .env_remove("NO_COLOR")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(slave);
    if no_color {
        cmd.env("NO_COLOR", "1");
    }
    let status = cmd.status().unwrap();
    assert_eq!(status.code(), Some(64));
    // Close our copy of the slave: with no slave open, reading the master
    // gives what bhyve wrote, then EIO.
    drop(cmd);
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    while let Ok(n) = master.read(&mut buf) {
        if n == 0 {
            break;
        }
        out.extend_from_slice(&buf[..n]);
    }
    String::from_utf8_lossy(&out).replace("\r\n", "\n")
}

#[test]
fn a_terminal_gets_the_level_in_colour_unless_no_color() {
    assert_eq!(
        stderr_on_a_terminal(false),
        format!(
            "{}{ERROR}",
            WARNING.replace("warning:", "\x1b[33mwarning\x1b[0m:")
        )
    );
    assert_eq!(stderr_on_a_terminal(true), format!("{WARNING}{ERROR}"));
}
