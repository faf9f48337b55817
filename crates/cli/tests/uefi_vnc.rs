//! The graphical console, judged by a real VNC client: bhyve's UEFI
//! firmware (whose BhyveRfbDxe drives fbuf) booted on rhyve with
//! `-s 29,fbuf,...,w=800,h=600,password=...,wait`, and PyPI's `vncdotool`
//! (`vncdo`, installed by scripts/setup.sh) as the client. The firmware
//! takes minutes to start on a PVM host, so ONE boot checks it all:
//! - `wait`: until a client connects, no vCPU thread exists and COM1 is
//!   silent;
//! - a wrong password is refused with bhyve's reason, and that connection
//!   still lets the guest start (bhyve signals `wait` on accept);
//! - the right password connects, and the captured screen is 800x600 with
//!   the shell's text drawn in its top rows;
//! - a command typed through the client reaches the shell (its output is
//!   on COM1) and shows on a later capture;
//! - a capture through ZRLE (vncdotool's decoder) matches the Raw one;
//! - `reset -s` typed through the client powers the VM off (exit status 1).

mod firmware;

use std::io::Read;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use firmware::{firmware, strip_ansi};
use rhyve_guests::{require_kvm, test_registry, vm_name};

const BOOT_DEADLINE: Duration = Duration::from_secs(40 * 60);
const COMMAND_DEADLINE: Duration = Duration::from_secs(5 * 60);
const PASSWORD: &str = "rhyve-pw";
const TYPED: &str = "vnc-typed-ok";

/// `vncdo` against the VM's server.
fn vncdo(port: u16, password: &str, args: &[&str]) -> Output {
    Command::new("vncdo")
        .args(["-s", &format!("127.0.0.1::{port}"), "-p", password])
        // A hung exchange fails the test instead of stalling the suite.
        .args(["-t", "300"])
        .args(args)
        .env("PYTHONWARNINGS", "ignore")
        .output()
        .expect("vncdo (PyPI vncdotool; scripts/setup.sh installs it)")
}

/// Size of a captured PNG and, per row, whether any pixel is not black
/// (Pillow comes with vncdotool).
fn drawn_rows(png: &Path) -> ((u32, u32), Vec<bool>) {
    let script = "import sys\nfrom PIL import Image\nim = Image.open(sys.argv[1]).convert('L')\n\
                  w, h = im.size\npx = im.load()\nprint(w, h)\n\
                  print(''.join('1' if any(px[x, y] > 40 for x in range(w)) else '0' for y in range(h)))\n";
    let out = Command::new("python3")
        .args(["-c", script])
        .arg(png)
        .output()
        .expect("python3");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let mut lines = text.lines();
    let size: Vec<u32> = lines
        .next()
        .unwrap()
        .split(' ')
        .map(|v| v.parse().unwrap())
        .collect();
    let rows = lines.next().unwrap().bytes().map(|b| b == b'1').collect();
    ((size[0], size[1]), rows)
}

/// Rows of text: runs of drawn pixel rows.
fn text_lines(rows: &[bool]) -> usize {
    rows.windows(2).filter(|w| !w[0] && w[1]).count() + usize::from(rows.first() == Some(&true))
}

fn capture(port: u16, path: &Path) -> ((u32, u32), usize) {
    let out = vncdo(port, PASSWORD, &["capture", path.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "capture: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (size, rows) = drawn_rows(path);
    (size, text_lines(&rows))
}

/// A capture through vncdotool's own ZRLE decoder (its `vncdo` asks for
/// Raw only), then how many pixels differ from the Raw capture `raw`.
fn zrle_capture_differs_from(port: u16, raw: &Path, zrle: &Path) -> usize {
    let script = "import sys\nfrom vncdotool import api, client, rfb\n\
                  client.VNCDoToolClient.encoding = rfb.Encoding.ZRLE\n\
                  c = api.connect(sys.argv[1], password=sys.argv[2], timeout=300)\n\
                  c.captureScreen(sys.argv[3])\nc.disconnect()\napi.shutdown()\n\
                  from PIL import Image, ImageChops\n\
                  a = Image.open(sys.argv[3]).convert('RGB')\n\
                  b = Image.open(sys.argv[4]).convert('RGB')\n\
                  assert a.size == b.size, (a.size, b.size)\n\
                  d = ImageChops.difference(a, b).convert('L').point(lambda v: 255 if v else 0)\n\
                  print(d.histogram()[255])\n";
    let out = Command::new("python3")
        .args(["-c", script, &format!("127.0.0.1::{port}"), PASSWORD])
        .arg(zrle)
        .arg(raw)
        .env("PYTHONWARNINGS", "ignore")
        .output()
        .expect("python3");
    assert!(
        out.status.success(),
        "ZRLE capture: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

fn threads_named(child: &Child, prefix: &str) -> usize {
    let tasks = std::fs::read_dir(format!("/proc/{}/task", child.id())).unwrap();
    tasks
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .filter(|c| c.starts_with(prefix))
        .count()
}

#[test]
fn a_vnc_client_sees_and_types_into_the_uefi_shell() {
    require_kvm();
    let (code, vars_template) = firmware();
    let dir = std::env::temp_dir().join(format!("rhyve-uefi-vnc-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let vars = dir.join("vars.fd");
    std::fs::copy(&vars_template, &vars).unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let started = Instant::now();
    let mut child = Command::new(env!("CARGO_BIN_EXE_bhyve"))
        .env("RHYVE_VMM_DIR", test_registry())
        .args(["-c", "1", "-m", "256M", "-s", "0,hostbridge", "-s"])
        .arg(format!(
            "29,fbuf,tcp=127.0.0.1:{port},w=800,h=600,password={PASSWORD},wait"
        ))
        .args(["-s", "31,lpc", "-l", "com1,stdio", "-l"])
        .arg(format!("bootrom,{},{}", code.display(), vars.display()))
        .args(["-o", "pci.enable_bars=true", &vm_name("uefi-vnc")])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("starting bhyve");
    let com1 = Arc::new(Mutex::new(Vec::new()));
    let sink = com1.clone();
    let mut stdout = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        let mut chunk = [0u8; 4096];
        while let Ok(n) = stdout.read(&mut chunk) {
            if n == 0 {
                break;
            }
            sink.lock().unwrap().extend_from_slice(&chunk[..n]);
        }
    });
    let text = |from: usize| strip_ansi(&com1.lock().unwrap()[from..]);
    let mut child = Guard(child);
    let wait_for = |child: &mut Child, from: usize, needle: &str, deadline: Duration| -> usize {
        let end = Instant::now() + deadline;
        loop {
            let len = com1.lock().unwrap().len();
            if text(from).contains(needle) {
                return len;
            }
            if let Ok(Some(status)) = child.try_wait() {
                panic!(
                    "bhyve ended ({status}) before {needle:?}; COM1:\n{}",
                    text(0)
                );
            }
            assert!(
                Instant::now() < end,
                "no {needle:?} within {deadline:?}; COM1:\n{}",
                text(0)
            );
            std::thread::sleep(Duration::from_millis(500));
        }
    };

    // `wait`: the VNC server listens, the guest does not run.
    std::thread::sleep(Duration::from_secs(5));
    assert!(
        child.0.try_wait().unwrap().is_none(),
        "bhyve ended while waiting"
    );
    assert_eq!(
        threads_named(&child.0, "vcpu"),
        0,
        "a vCPU runs before any VNC client connected"
    );
    assert!(
        text(0).is_empty(),
        "COM1 output before any VNC client connected:\n{}",
        text(0)
    );

    // A wrong password: refused with bhyve's reason; the guest starts.
    let refused = vncdo(
        port,
        "not-the-password",
        &["capture", dir.join("x.png").to_str().unwrap()],
    );
    assert!(!refused.status.success(), "a wrong password was accepted");
    let why = String::from_utf8_lossy(&refused.stderr);
    assert!(
        why.contains("Auth Failed: Invalid Password."),
        "refusal without bhyve's reason:\n{why}"
    );
    let end = Instant::now() + Duration::from_secs(30);
    while threads_named(&child.0, "vcpu") == 0 {
        assert!(
            Instant::now() < end,
            "no vCPU started after the first VNC client connected"
        );
        std::thread::sleep(Duration::from_millis(200));
    }

    let seen = wait_for(&mut child.0, 0, "Shell> ", BOOT_DEADLINE);
    eprintln!(
        "UEFI shell prompt on COM1 {:?} after start",
        started.elapsed()
    );
    let first = dir.join("shell.png");
    let (size, lines_before) = capture(port, &first);
    assert_eq!(size, (800, 600), "the screen is not at w=800,h=600");
    assert!(
        lines_before >= 3,
        "the shell's banner is not drawn ({lines_before} text lines)"
    );

    let typed = vncdo(
        port,
        PASSWORD,
        &["type", &format!("echo {TYPED}"), "key", "enter"],
    );
    assert!(
        typed.status.success(),
        "typing: {}",
        String::from_utf8_lossy(&typed.stderr)
    );
    wait_for(
        &mut child.0,
        seen,
        &format!("\n{TYPED}\n"),
        COMMAND_DEADLINE,
    );
    let end = Instant::now() + COMMAND_DEADLINE;
    loop {
        let (_, lines_after) = capture(port, &dir.join("typed.png"));
        if lines_after >= lines_before + 2 {
            break;
        }
        assert!(
            Instant::now() < end,
            "the typed command and its output never showed on screen"
        );
        std::thread::sleep(Duration::from_secs(2));
    }

    // The same screen through ZRLE, decoded by vncdotool: identical but
    // for the text cursor, which may blink between the two captures.
    let raw = dir.join("raw.png");
    capture(port, &raw);
    let differing = zrle_capture_differs_from(port, &raw, &dir.join("zrle.png"));
    assert!(
        differing < 200,
        "{differing} pixels differ between the Raw and ZRLE captures"
    );

    let off = vncdo(port, PASSWORD, &["type", "reset -s", "key", "enter"]);
    assert!(
        off.status.success(),
        "typing: {}",
        String::from_utf8_lossy(&off.stderr)
    );
    let end = Instant::now() + COMMAND_DEADLINE;
    let status = loop {
        if let Some(s) = child.0.try_wait().unwrap() {
            break s;
        }
        assert!(
            Instant::now() < end,
            "reset -s typed over VNC did not power off"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(status.code(), Some(1), "power-off is exit status 1");
    eprintln!("whole run {:?}", started.elapsed());
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Kills bhyve if the test fails half-way.
struct Guard(Child);
impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
