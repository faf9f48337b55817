//! Linux's virtio_net driver (user-mode-linux over vhost-user) on our
//! virtio-net with a tap backend: the tap lives in a network namespace the
//! test creates, the guest pings the host side, and 2 MiB files cross in
//! both directions intact (HTTP with busybox on both ends, so TSO, checksum
//! offload and merged receive buffers all carry real traffic).

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::io::AsRawFd;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

const HOST_IP: &str = "10.99.0.1";
const GUEST_IP: &str = "10.99.0.2";
const SIZE: usize = 2 << 20;

/// A network namespace with a persistent tap, deleted when dropped.
struct NetNs(String);

impl NetNs {
    fn new(tap: &str) -> Self {
        let name = format!("rhyve-net-{}", std::process::id());
        let _ = Command::new("ip").args(["netns", "del", &name]).status();
        let ns = NetNs(name);
        ns.ip(&["netns", "add", &ns.0]);
        ns.ip(&["-n", &ns.0, "tuntap", "add", "dev", tap, "mode", "tap"]);
        ns.ip(&[
            "-n",
            &ns.0,
            "addr",
            "add",
            &format!("{HOST_IP}/24"),
            "dev",
            tap,
        ]);
        ns.ip(&["-n", &ns.0, "link", "set", tap, "up"]);
        ns.ip(&["-n", &ns.0, "link", "set", "lo", "up"]);
        ns
    }

    fn ip(&self, args: &[&str]) {
        let ok = Command::new("ip").args(args).status().unwrap().success();
        assert!(
            ok,
            "ip {} failed (the network test needs root)",
            args.join(" ")
        );
    }

    fn exec(&self, args: &[&str]) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.0]).args(args);
        c
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

struct Killed(Child);
impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Run `f` on a thread that has joined the network namespace at `path`.
fn in_netns<T: Send + 'static>(path: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let file = std::fs::File::open(path).expect("netns file");
    std::thread::spawn(move || {
        // SAFETY: setns on this thread only, with an fd we own.
        let r = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(r, 0, "setns: {}", std::io::Error::last_os_error());
        f()
    })
    .join()
    .unwrap()
}

/// The body of `GET path` over HTTP/1.0, or None on any failure.
fn http_get(host: &str, port: u16, path: &str) -> Option<Vec<u8>> {
    let mut s = TcpStream::connect((host, port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(20))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {host}\r\n\r\n").ok()?;
    let mut resp = Vec::new();
    s.read_to_end(&mut resp).ok()?;
    let split = resp.windows(4).position(|w| w == b"\r\n\r\n")?;
    let ok = resp.starts_with(b"HTTP/1.") && resp.get(8..13) == Some(b" 200 ".as_slice());
    ok.then(|| resp[split + 4..].to_vec())
}

#[test]
fn uml_virtio_net_ping_and_transfer() {
    ensure_packages();
    let s = Scratch::new("net");
    let ns = NetNs::new("rtap0");
    let down = pattern(SIZE, 21);
    let up = pattern(SIZE, 22);
    let www = s.path("www");
    std::fs::create_dir_all(&www).unwrap();
    std::fs::write(www.join("down"), &down).unwrap();
    let _host_httpd = Killed(
        ns.exec(&[
            "busybox",
            "httpd",
            "-f",
            "-p",
            &format!("{HOST_IP}:8080"),
            "-h",
        ])
        .arg(&www)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap(),
    );

    let script = format!(
        "IF=$(ls /sys/class/net | grep -v '^lo$' | head -n 1)\n\
         echo \"IFACE $IF MAC $(cat /sys/class/net/$IF/address)\"\n\
         ip link set lo up; ip addr add {GUEST_IP}/24 dev $IF; ip link set $IF up\n\
         ping -c 3 -W 3 {HOST_IP} > /tmp/ping && echo PING-OK; cat /tmp/ping\n\
         wget -q -O /tmp/down http://{HOST_IP}:8080/down && echo \"DOWN $(md5sum /tmp/down)\"\n\
         mkdir -p /www; cp /up /www/up; httpd -p 8080 -h /www && echo HTTPD-UP\n\
         timeout 60 nc -l -p 5001 > /dev/null < /dev/null; echo HOST-DONE\n"
    );
    let initrd = initramfs(
        &s.0,
        &[
            "net/core/failover.ko",
            "drivers/net/net_failover.ko",
            "drivers/net/virtio_net.ko",
        ],
        &[("up", &up)],
        &script,
    );
    let sock = s.path("net.sock");
    let backend = start_backend(
        &s,
        &sock,
        "virtio-net,rtap0,mac=00:a0:98:12:34:56",
        Some(&ns.0),
    );

    let dev = format!("{}:1", sock.display());
    let guest = std::thread::spawn(move || run_uml(&initrd, &[dev], Duration::from_secs(180)));

    // Fetch the guest's file once its httpd answers, then let it finish.
    let ns_path = format!("/var/run/netns/{}", ns.0);
    let fetched = in_netns(&ns_path, move || {
        let deadline = Instant::now() + Duration::from_secs(120);
        let mut body = None;
        while body.is_none() && Instant::now() < deadline {
            body = http_get(GUEST_IP, 8080, "/up");
            if body.is_none() {
                std::thread::sleep(Duration::from_millis(300));
            }
        }
        // Tell the guest we are done (its listener may not be up yet).
        let deadline = Instant::now() + Duration::from_secs(30);
        while TcpStream::connect((GUEST_IP, 5001)).is_err() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
        }
        body
    });
    let out = guest.join().unwrap();
    println!("{out}");
    println!("{}", backend.log_text());
    drop(backend);

    assert!(out.contains("MAC 00:a0:98:12:34:56"), "{out}");
    assert!(out.contains("PING-OK"), "{out}");
    let got = console_value(&out, "DOWN").expect("guest downloaded");
    assert!(
        got.starts_with(&md5_hex(&down)),
        "host-to-guest transfer corrupted: {got}"
    );
    assert!(out.contains("HTTPD-UP"), "{out}");
    let up_got = fetched.expect("the guest's httpd never answered");
    assert_eq!(up_got.len(), up.len(), "guest-to-host transfer short");
    assert!(up_got == up, "guest-to-host transfer corrupted");
}
