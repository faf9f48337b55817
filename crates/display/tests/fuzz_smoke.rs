//! Bounded smoke run of the VNC client fuzz target (`fuzz/`, run for real
//! with `cargo +nightly fuzz run rfb_client`): random bytes and mutations
//! of well-formed sessions must pass without a panic or a hang.

use rhyve_testutil::XorShift;
use std::time::{Duration, Instant};

use rhyve_display::fuzzing;

const RUNS: usize = 1500;

/// A client that gets through the handshake (3.8, security None) and then
/// sends a few of every message, each field random.
fn well_formed(r: &mut XorShift) -> Vec<u8> {
    let mut d = vec![0u8]; // no password
    d.extend(b"RFB 003.008\n");
    d.extend([1, 1]); // security None, shared
    for _ in 0..1 + r.index(24) {
        let v = r.next_u64().to_be_bytes();
        match r.index(8) {
            0 => {
                d.extend([0, 0, 0, 0, 32, 24, v[0] & 1, 1, 0, 255, 0, 255, 0, 255]);
                d.extend([[0, 8, 16, 24][r.index(4)], 8, 0, 0, 0, 0]);
            }
            1 => {
                let n = r.index(6) as u16;
                d.extend([2, 0]);
                d.extend(n.to_be_bytes());
                for _ in 0..n {
                    let e: i32 = [0, 6, -223, -258, 16, 5][r.index(6)];
                    d.extend(e.to_be_bytes());
                }
            }
            2 => d.extend([3, v[0] & 1, 0, 0, 0, 0, v[1], v[2], v[3], v[4]]),
            3 => d.extend([4, v[0] & 1, 0, 0, 0, 0, 0xFF, v[1]]),
            4 => d.extend([5, v[0], v[1], v[2], v[3], v[4]]),
            5 => {
                let len = r.index(40) as u32;
                d.extend([6, 0, 0, 0]);
                d.extend(len.to_be_bytes());
                d.extend((0..len).map(|i| i as u8));
            }
            6 => d.extend([255, 0, 0, v[0] & 1, 0, 0, 0xFF, 0x0D, 0, 0, 0, v[1]]),
            _ => d.push(v[0]),
        }
    }
    // A few flipped bytes.
    for _ in 0..r.index(3) {
        let at = r.index(d.len());
        d[at] ^= r.next_u64() as u8;
    }
    d
}

#[test]
fn rfb_client_target_survives_random_and_mutated_sessions() {
    let mut r = XorShift(0x5EED_F00D);
    let start = Instant::now();
    for i in 0..RUNS {
        let data = if i % 3 == 0 {
            let len = r.index(512);
            (0..len).map(|_| r.next_u64() as u8).collect()
        } else {
            well_formed(&mut r)
        };
        let one = Instant::now();
        fuzzing::client_session(&data);
        assert!(
            one.elapsed() < Duration::from_secs(5),
            "input {i} took {:?}",
            one.elapsed()
        );
    }
    eprintln!("rfb_client: {RUNS} inputs in {:?}", start.elapsed());
}
