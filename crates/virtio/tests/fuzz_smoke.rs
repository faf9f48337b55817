//! Bounded smoke run of the fuzz targets (`fuzz/`, run for real with
//! `cargo +nightly fuzz run <target>`): a few thousand generated inputs
//! each, half random bytes and half mutations of well-formed rings, must
//! pass without a panic or a hang.

use rhyve_testutil::XorShift;
use std::time::{Duration, Instant};

use rhyve_virtio::fuzzing;

const RUNS: usize = 600;

/// A queue of `size` (encoded in byte 0) whose descriptors form short
/// chains over the data area, with an avail ring listing them: the image
/// `fuzzing::layout` maps at guest address 0 (the byte after byte 0 is
/// guest address 0).
fn well_formed(r: &mut XorShift) -> Vec<u8> {
    let size_log = (r.next_u64() % 9) as u8;
    let size = 1usize << size_log;
    let mut img = vec![0u8; 0x4000];
    for i in 0..size {
        let d = 16 * i;
        let addr = 0x3000 + r.next_u64() % 0x800;
        let len = (r.next_u64() % 0x200) as u32;
        let flags = (r.next_u64() % 4) as u16; // NEXT and WRITE bits
        let next = ((i + 1) % size) as u16;
        img[d..d + 8].copy_from_slice(&addr.to_le_bytes());
        img[d + 8..d + 12].copy_from_slice(&len.to_le_bytes());
        img[d + 12..d + 14].copy_from_slice(&flags.to_le_bytes());
        img[d + 14..d + 16].copy_from_slice(&next.to_le_bytes());
    }
    let count = (r.next_u64() % (size as u64 + 1)) as u16;
    img[0x1002..0x1004].copy_from_slice(&count.to_le_bytes());
    for i in 0..size {
        let head = (r.next_u64() % size as u64) as u16;
        img[0x1004 + 2 * i..0x1006 + 2 * i].copy_from_slice(&head.to_le_bytes());
    }
    // A plausible virtio-blk header at every buffer start.
    for at in (0x3000..0x3800).step_by(0x40) {
        let kind = [0u32, 1, 4, 8, 11, 13, 99][(r.next_u64() % 7) as usize];
        img[at..at + 4].copy_from_slice(&kind.to_le_bytes());
        img[at + 8..at + 16].copy_from_slice(&(r.next_u64() % 4096).to_le_bytes());
    }
    // A few random byte flips.
    for _ in 0..(r.next_u64() % 8) {
        let at = (r.next_u64() as usize) % img.len();
        img[at] ^= r.next_u64() as u8;
    }
    let mut data = vec![size_log | ((r.next_u64() as u8) & 0xC0)];
    data.extend(img);
    data
}

fn smoke(name: &str, target: fn(&[u8]), seed: u64) {
    let mut r = XorShift(seed);
    let start = Instant::now();
    for i in 0..RUNS {
        let data = if i % 2 == 0 {
            let len = (r.next_u64() % 4096) as usize;
            (0..len).map(|_| r.next_u64() as u8).collect()
        } else {
            well_formed(&mut r)
        };
        target(&data);
    }
    assert!(
        start.elapsed() < Duration::from_secs(120),
        "{name}: {RUNS} inputs took {:?}",
        start.elapsed()
    );
}

#[test]
fn virtqueue_walker() {
    smoke("virtqueue", fuzzing::virtqueue, 1);
}

#[test]
fn blk_requests() {
    smoke("blk", fuzzing::blk, 2);
}

#[test]
fn rng_requests() {
    smoke("rng", fuzzing::rng, 3);
}

#[test]
fn console_control_messages() {
    smoke("console_control", fuzzing::console_control, 4);
}
