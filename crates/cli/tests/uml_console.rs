//! Linux's virtio_console driver (multiport, user-mode-linux over
//! vhost-user) on our virtio-console: the port appears with its name, and
//! bytes flow both ways through the UNIX socket rhyve created for it.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use common::*;

const BULK: usize = 200_000;

#[test]
fn uml_virtio_console_both_ways() {
    ensure_packages();
    let s = Scratch::new("con");
    let to_guest = pattern(BULK, 11);
    let from_guest = pattern(BULK, 12);
    // One open file for both directions: a port admits a single opener.
    let script = format!(
        "echo \"NAME $(cat /sys/class/virtio-ports/vport0p0/name)\"\n\
         exec 3<>/dev/vport0p0\n\
         (cat <&3 > /tmp/in) &\n\
         echo hello-from-guest >&3\n\
         cat /payload >&3\n\
         i=0; while [ $i -lt 200 ] && [ $(wc -c < /tmp/in) -lt {want} ]; do sleep 0.1; i=$((i+1)); done\n\
         echo \"FIRST $(head -n 1 /tmp/in)\"\n\
         echo \"BULK $(tail -c {BULK} /tmp/in | md5sum)\"\n",
        want = BULK + "hello-from-host\n".len()
    );
    let initrd = initramfs(
        &s.0,
        &["drivers/char/virtio_console.ko"],
        &[("payload", &from_guest)],
        &script,
    );
    let sock = s.path("con.sock");
    let port = s.path("port1.sock");
    let backend = start_backend(
        &s,
        &sock,
        &format!("virtio-console,port1={}", port.display()),
        None,
    );
    // The host end connects first, as a user of bhyve's console socket would.
    let mut client = UnixStream::connect(&port).expect("connect to the port socket");
    client
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut writer = client.try_clone().unwrap();
    let data = to_guest.clone();
    // Linux drops input for a port nobody has open, so the host answers
    // only after the guest has spoken (it opened the port first).
    let host = std::thread::spawn(move || {
        let hello = "hello-from-guest\n".len();
        let mut got = Vec::new();
        let mut buf = [0u8; 65536];
        let mut sender = None;
        while got.len() < hello + BULK {
            match client.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
            if sender.is_none() && got.len() >= hello {
                let data = data.clone();
                let mut w = writer.try_clone().unwrap();
                sender = Some(std::thread::spawn(move || {
                    w.write_all(b"hello-from-host\n").unwrap();
                    w.write_all(&data).unwrap();
                }));
            }
        }
        if let Some(t) = sender {
            t.join().unwrap();
        }
        let _ = writer.flush();
        got
    });
    let out = run_uml(
        &initrd,
        &[format!("{}:3", sock.display())],
        Duration::from_secs(120),
    );
    let got = host.join().unwrap();
    drop(backend);
    println!("{out}");

    assert_eq!(console_value(&out, "NAME"), Some("port1"), "{out}");
    assert!(
        got.starts_with(b"hello-from-guest\n"),
        "host got {:?}",
        &got[..got.len().min(40)]
    );
    assert_eq!(
        &got["hello-from-guest\n".len()..],
        &from_guest[..],
        "guest-to-host bytes differ"
    );
    assert_eq!(
        console_value(&out, "FIRST"),
        Some("hello-from-host"),
        "{out}"
    );
    let bulk = console_value(&out, "BULK").expect("guest checksum");
    assert!(bulk.starts_with(&md5_hex(&to_guest)), "{bulk}");
}
