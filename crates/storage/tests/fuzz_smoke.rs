//! Bounded smoke run of the AHCI fuzz target (`fuzz/`, run for real with
//! `cargo +nightly fuzz run ahci`): random bytes, and command lists a
//! driver could write (ATA and ATAPI commands, NCQ, TRIM, odd PRD tables)
//! with a few bytes spoiled, must pass without a panic or a hang.

use rhyve_testutil::XorShift;
use std::time::{Duration, Instant};

use rhyve_storage::ahci::ata;
use rhyve_storage::fuzzing::{self, MEM_SIZE};

const RUNS: usize = 300;

const COMMANDS: &[u8] = &[
    ata::READ_DMA48,
    ata::WRITE_DMA48,
    ata::READ_DMA,
    ata::WRITE_DMA,
    ata::READ48,
    ata::WRITE48,
    ata::READ_MUL48,
    ata::WRITE_MUL,
    ata::READ_VERIFY48,
    ata::READ_LOG_EXT,
    ata::READ_LOG_DMA_EXT,
    ata::READ_FPDMA_QUEUED,
    ata::WRITE_FPDMA_QUEUED,
    ata::SEND_FPDMA_QUEUED,
    ata::PACKET,
    ata::ATAPI_IDENTIFY,
    ata::IDENTIFY,
    ata::SET_FEATURES,
    ata::FLUSH_CACHE48,
    0x06, // DATA SET MANAGEMENT (TRIM)
    0xFF,
];

/// SCSI commands an ATAPI driver sends (TEST UNIT READY, REQUEST SENSE,
/// INQUIRY, READ CAPACITY, READ(10), READ(12), READ TOC, MODE SENSE(10),
/// GET CONFIGURATION, GET EVENT STATUS, START STOP).
const PACKETS: &[u8] = &[
    0x00, 0x03, 0x12, 0x25, 0x28, 0xA8, 0x43, 0x5A, 0x46, 0x4A, 0x1B, 0xBB,
];

/// An input whose layout matches `rhyve_storage::fuzzing::ahci`: command
/// headers for both ports, one table per slot after them, PRDs into the
/// data area, then a few spoiled bytes.
fn well_formed(r: &mut XorShift) -> Vec<u8> {
    let mut mem = vec![0u8; MEM_SIZE];
    let mut ci = [0u32; 2];
    for (p, bits) in ci.iter_mut().enumerate() {
        for _ in 0..1 + r.below(4) {
            let slot = r.below(32) as usize;
            *bits |= 1 << slot;
            let table = 0x1000 + (p * 32 + slot) * 0x100;
            let prdtl = (1 + r.below(3)) as u32;
            let atapi = p == 1;
            let write = r.below(4) == 0;
            let flags = 5 | u32::from(atapi) << 5 | u32::from(write) << 6;
            let hdr = p * 0x400 + slot * 32;
            mem[hdr..hdr + 4].copy_from_slice(&(flags | prdtl << 16).to_le_bytes());
            mem[hdr + 8..hdr + 16].copy_from_slice(&(table as u64).to_le_bytes());
            let cmd = if atapi && r.below(2) == 0 {
                ata::PACKET
            } else {
                COMMANDS[r.below(COMMANDS.len() as u64) as usize]
            };
            let fis = &mut mem[table..table + 20];
            fis[0] = ata::FIS_REG_H2D;
            fis[1] = 0x80;
            fis[2] = cmd;
            fis[3] = r.next_u64() as u8; // features (SET FEATURES subcommand, NCQ count low)
            fis[4..7].copy_from_slice(&(r.below(600) as u32).to_le_bytes()[..3]);
            fis[7] = 0x40;
            fis[12] = 1 + r.below(8) as u8; // sector count
            fis[11] = (r.below(3) as u8) << 3; // NCQ: count high / tag
            let packet = &mut mem[table + 0x40..table + 0x50];
            packet[0] = PACKETS[r.below(PACKETS.len() as u64) as usize];
            packet[2..6].copy_from_slice(&(r.below(600) as u32).to_be_bytes());
            packet[7..9].copy_from_slice(&(r.below(4) as u16).to_be_bytes());
            packet[8] = r.below(255) as u8;
            for i in 0..prdtl as usize {
                let e = table + 0x80 + 16 * i;
                let addr = 0xA000 + r.below(0x5000);
                // Byte count minus one; mostly a page, enough for 8 sectors.
                let len = if r.below(8) == 0 {
                    r.below(0x1000) as u32
                } else {
                    0xFFF
                };
                mem[e..e + 8].copy_from_slice(&addr.to_le_bytes());
                mem[e + 12..e + 16].copy_from_slice(&len.to_le_bytes());
            }
        }
    }
    for _ in 0..r.below(6) {
        let at = r.below(0xA000) as usize;
        mem[at] ^= r.next_u64() as u8;
    }
    let mut data = Vec::new();
    data.extend_from_slice(&ci[0].to_le_bytes());
    data.extend_from_slice(&ci[1].to_le_bytes());
    data.push(0);
    data.extend(mem);
    data
}

#[test]
fn ahci_command_lists() {
    let mut r = XorShift(31);
    let start = Instant::now();
    for i in 0..RUNS {
        let data = if i % 3 == 0 {
            let len = r.below(4096) as usize;
            (0..len).map(|_| r.next_u64() as u8).collect()
        } else {
            well_formed(&mut r)
        };
        fuzzing::ahci(&data);
    }
    assert!(
        start.elapsed() < Duration::from_secs(180),
        "{RUNS} inputs took {:?}",
        start.elapsed()
    );
}
