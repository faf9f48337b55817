//! The shipped `rhyve-vhost-user` command as README.md documents it:
//! `rhyve-vhost-user --socket PATH DEVICE`, `--help`, and what it does to
//! whatever is already at PATH: a socket left by a killed server is
//! replaced, anything else (a disk image given by mistake, a live server's
//! socket) is refused and left as it was.

use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_rhyve-vhost-user");

struct Scratch(PathBuf);
impl Scratch {
    fn new(name: &str) -> Scratch {
        let dir = std::env::temp_dir().join(format!("rhyve-vu-cli-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }
    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}
impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Runs the command to its end (it must end by itself within 10 s).
fn run_to_end(args: &[&str]) -> Output {
    let mut child = Command::new(BIN)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("rhyve-vhost-user");
    let deadline = Instant::now() + Duration::from_secs(10);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("rhyve-vhost-user {args:?} did not end");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    child.wait_with_output().unwrap()
}

/// Starts a server and waits until a listening socket is at `socket`.
fn serve(socket: &Path, device: &str) -> Child {
    let mut child = Command::new(BIN)
        .arg("--socket")
        .arg(socket)
        .arg(device)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("rhyve-vhost-user");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            let out = child.wait_with_output().unwrap();
            panic!(
                "rhyve-vhost-user exited with {status}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        if std::os::unix::net::UnixStream::connect(socket).is_ok() {
            return child;
        }
        assert!(
            Instant::now() < deadline,
            "no listening socket at {}",
            socket.display()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn stop(mut child: Child) {
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn help_exits_zero_with_the_usage() {
    let out = run_to_end(&["--help"]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("rhyve-vhost-user --socket PATH DEVICE"),
        "{out:?}"
    );
}

#[test]
fn readme_syntax_serves_a_disk() {
    let s = Scratch::new("serve");
    let disk = s.path("disk.img");
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    let socket = s.path("blk.sock");
    let server = serve(&socket, &format!("virtio-blk,{},ro", disk.display()));
    stop(server);
}

#[test]
fn a_file_at_the_socket_path_is_refused_and_kept() {
    let s = Scratch::new("file");
    let image = s.path("linux.img");
    let content: Vec<u8> = (0..1u32 << 20).map(|i| (i * 7 + 3) as u8).collect();
    std::fs::write(&image, &content).unwrap();
    let disk = s.path("disk.img");
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    let out = run_to_end(&[
        "--socket",
        image.to_str().unwrap(),
        &format!("virtio-blk,{}", disk.display()),
    ]);
    assert_eq!(out.status.code(), Some(4), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("linux.img") && stderr.contains("not a socket"),
        "the error must name the path and why: {stderr}"
    );
    assert!(std::fs::symlink_metadata(&image).unwrap().is_file());
    assert!(
        std::fs::read(&image).unwrap() == content,
        "the file was changed"
    );
}

#[test]
fn a_stale_socket_is_replaced_and_a_live_one_refused() {
    let s = Scratch::new("sockets");
    let disk = s.path("disk.img");
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    let device = format!("virtio-blk,{}", disk.display());

    // Left by a server that is gone: nobody listens, the file remains.
    let stale = s.path("stale.sock");
    drop(UnixListener::bind(&stale).unwrap());
    assert!(std::fs::symlink_metadata(&stale)
        .unwrap()
        .file_type()
        .is_socket());
    let server = serve(&stale, &device);

    // That server is alive: a second one on the same path is refused.
    let out = run_to_end(&["--socket", stale.to_str().unwrap(), &device]);
    assert_eq!(out.status.code(), Some(4), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("already listening"),
        "{out:?}"
    );
    // ... and the first still serves.
    assert!(std::os::unix::net::UnixStream::connect(&stale).is_ok());
    stop(server);
}
