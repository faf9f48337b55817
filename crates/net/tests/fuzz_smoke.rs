//! Bounded smoke run of the e1000 fuzz target (`fuzz/`, run for real with
//! `cargo +nightly fuzz run e1000`): random bytes, and rings a driver could
//! write (legacy, context and data descriptors, TSO, odd lengths and
//! heads) with a few bytes spoiled, must pass without a panic or a hang.

use std::time::{Duration, Instant};

use rhyve_net::e1000::txd;
use rhyve_net::fuzzing::{self, MEM_SIZE, RX_RING};
use rhyve_testutil::XorShift;

const RUNS: usize = 200;

/// An input whose layout matches `rhyve_net::fuzzing::e1000`: ring sizes
/// and tails, RCTL, then guest memory with descriptors in both rings and
/// buffers after them.
fn well_formed(r: &mut XorShift) -> Vec<u8> {
    let mut mem = vec![0u8; MEM_SIZE];
    let tx_len = 1 + r.below(3) as u16; // in 8-descriptor steps
    let rx_len = 1 + r.below(3) as u16;
    let tx_count = u64::from(tx_len) * 8;
    for i in 0..tx_count as usize {
        let d = &mut mem[i * 16..i * 16 + 16];
        let addr = 0x8000 + r.below(0x7000);
        d[0..8].copy_from_slice(&addr.to_le_bytes());
        let len = if r.below(8) == 0 {
            r.below(0x10000) as u32
        } else {
            r.below(1600) as u32
        };
        let kind = r.below(4);
        let mut cmd = match kind {
            0 => len & 0xFFFF,
            1 => txd::DEXT | r.next_u64() as u32 & 0x0F0F_FFFF,
            _ => txd::DEXT | txd::DTYP_DATA | len,
        };
        if r.below(3) == 0 {
            cmd |= txd::EOP;
        }
        cmd |= (r.next_u64() as u32) & (txd::RS | txd::TSE | txd::IC | txd::VLE);
        d[8..12].copy_from_slice(&cmd.to_le_bytes());
        if kind == 1 {
            // Context: checksum fields, header length and MSS.
            d[0] = 14;
            d[1] = 24;
            d[4] = 34;
            d[5] = 50;
            d[13] = 54 + r.below(8) as u8;
            d[14..16].copy_from_slice(&(r.below(1500) as u16).to_le_bytes());
        } else {
            d[13] = r.next_u64() as u8;
        }
    }
    let rx_count = u64::from(rx_len) * 8;
    for i in 0..rx_count {
        let at = (RX_RING + i * 16) as usize;
        mem[at..at + 8].copy_from_slice(&(0x8000 + r.below(0x7800)).to_le_bytes());
    }
    for _ in 0..r.below(6) {
        let at = r.below(0x8000) as usize;
        mem[at] ^= r.next_u64() as u8;
    }
    let mut data = Vec::new();
    data.extend_from_slice(&tx_len.to_le_bytes());
    data.extend_from_slice(&(r.below(tx_count + 2) as u16).to_le_bytes());
    data.extend_from_slice(&rx_len.to_le_bytes());
    data.extend_from_slice(&(r.below(rx_count + 2) as u16).to_le_bytes());
    data.extend_from_slice(&((r.next_u64() as u32) & 0x0607_8030).to_le_bytes());
    data.push(0);
    data.extend(mem);
    data
}

#[test]
fn e1000_rings() {
    let mut r = XorShift(17);
    let start = Instant::now();
    for i in 0..RUNS {
        let data = if i % 3 == 0 {
            let len = r.below(4096) as usize;
            (0..len).map(|_| r.next_u64() as u8).collect()
        } else {
            well_formed(&mut r)
        };
        fuzzing::e1000(&data);
    }
    assert!(
        start.elapsed() < Duration::from_secs(180),
        "{RUNS} inputs took {:?}",
        start.elapsed()
    );
}
