//! Bounded smoke run of the AHCI fuzz target (`fuzz/`, run for real with
//! `cargo +nightly fuzz run ahci`): random bytes, and command lists a
//! driver could write (ATA and ATAPI commands, NCQ, TRIM, odd PRD tables)
//! with a few bytes spoiled, must pass without a panic or a hang. The same
//! for the NVMe target (`cargo +nightly fuzz run nvme`): random bytes, and
//! admin and I/O queues a driver could set up, with odd commands, PRPs and
//! doorbells.

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

/// An input for `rhyve_storage::fuzzing::nvme` a driver could have
/// written, with a few bytes spoiled: admin commands that set the queue
/// count and create I/O queue pairs, Identify, log pages, features, then
/// reads, writes, flushes and deallocations with PRPs and PRP lists into
/// the data area, and doorbell writes (some out of range) to run them.
fn nvme_well_formed(r: &mut XorShift) -> Vec<u8> {
    const ADMIN_SQ: usize = fuzzing::NVME_ADMIN_SQ as usize;
    const IO_CQ: [u64; 2] = [0x2000, 0x4000];
    const IO_SQ: [u64; 2] = [0x3000, 0x5000];
    const DATA: u64 = 0x8000;
    let mut mem = vec![0u8; fuzzing::NVME_MEM_SIZE];
    let sqe = |mem: &mut Vec<u8>, at: usize, dwords: &[(usize, u32)]| {
        for &(n, v) in dwords {
            mem[at + n * 4..at + n * 4 + 4].copy_from_slice(&v.to_le_bytes());
        }
    };
    let data_addr = |r: &mut XorShift| (DATA + r.below(0x17000)) & !3;
    let mut admin = 0;
    let mut push_admin = |mem: &mut Vec<u8>, dwords: &[(usize, u32)]| {
        let at = ADMIN_SQ + admin * 64;
        sqe(mem, at, dwords);
        mem[at + 2] = admin as u8; // command id
        admin += 1;
    };
    push_admin(&mut mem, &[(0, 0x09), (10, 0x07), (11, 0x0001_0001)]);
    for q in 0..2u32 {
        let entries = 2 + r.below(15) as u32;
        let qid = q + 1;
        push_admin(
            &mut mem,
            &[
                (0, 0x05),
                (6, IO_CQ[q as usize] as u32),
                (10, qid | (entries - 1) << 16),
                (11, 3 | (r.below(3) as u32) << 16),
            ],
        );
        push_admin(
            &mut mem,
            &[
                (0, 0x01),
                (6, IO_SQ[q as usize] as u32),
                (10, qid | 15 << 16),
                (11, 1 | qid << 16),
            ],
        );
    }
    for _ in 0..4 {
        let (op, cdw10) = match r.below(6) {
            0 => (0x06, r.below(4) as u32),
            1 => (0x02, (1 + r.below(4) as u32) | (r.below(1024) as u32) << 16),
            2 => (0x0A, r.below(12) as u32),
            3 => (0x09, r.below(12) as u32),
            4 => (0x0C, 0),
            _ => (r.below(256) as u32, r.next_u64() as u32),
        };
        let prp1 = data_addr(r) as u32;
        push_admin(
            &mut mem,
            &[
                (0, op),
                (1, r.below(3) as u32),
                (6, prp1),
                (10, cdw10),
                (11, r.next_u64() as u32),
            ],
        );
    }
    let mut writes: Vec<(u16, u32)> = vec![(0x1000, admin as u32)];
    for (q, &sq_base) in IO_SQ.iter().enumerate() {
        let n = 1 + r.below(15) as usize;
        for i in 0..n {
            let at = sq_base as usize + i * 64;
            let op = [0x00, 0x01, 0x02, 0x02, 0x09, 0x08][r.below(6) as usize];
            let blocks = if r.below(8) == 0 {
                r.below(5000) as u32
            } else {
                r.below(24) as u32
            };
            let lba = if r.below(8) == 0 {
                r.next_u64()
            } else {
                r.below(520)
            };
            let prp2 = match r.below(3) {
                0 => data_addr(r) & !0xFFF,
                1 => {
                    // A PRP list of pages in the data area.
                    let list = data_addr(r) & !7;
                    for k in 0..8u64 {
                        let e = (list + k * 8) as usize;
                        if e + 8 <= mem.len() {
                            let page = data_addr(r) & !0xFFF;
                            mem[e..e + 8].copy_from_slice(&page.to_le_bytes());
                        }
                    }
                    list
                }
                _ => r.next_u64(),
            };
            sqe(
                &mut mem,
                at,
                &[
                    (0, op | (i as u32) << 16),
                    (1, if r.below(10) == 0 { 2 } else { 1 }),
                    (6, data_addr(r) as u32),
                    (8, prp2 as u32),
                    (9, (prp2 >> 32) as u32),
                    (10, lba as u32),
                    (11, if op == 0x09 { 4 } else { (lba >> 32) as u32 }),
                    (12, blocks),
                ],
            );
        }
        writes.push((0x1008 + 8 * q as u16, n as u32));
    }
    for _ in 0..r.below(3) {
        // CQ heads, possibly past the end; a reset now and then.
        let which = r.below(8) as u16;
        let value = if which == 7 { 0 } else { r.below(20) as u32 };
        let off = if which == 7 {
            0x14
        } else {
            0x1004 + 8 * (which % 3)
        };
        writes.push((off, value));
    }
    for _ in 0..r.below(6) {
        let at = r.below(0x6000) as usize;
        mem[at] ^= r.next_u64() as u8;
    }
    let mut data = vec![writes.len() as u8];
    for (off, v) in writes {
        data.extend_from_slice(&off.to_le_bytes());
        data.extend_from_slice(&v.to_le_bytes());
    }
    data.extend(mem);
    data
}

#[test]
fn nvme_queues_and_commands() {
    let mut r = XorShift(47);
    let start = Instant::now();
    for i in 0..RUNS {
        let data = if i % 3 == 0 {
            let len = r.below(4096) as usize;
            (0..len).map(|_| r.next_u64() as u8).collect()
        } else {
            nvme_well_formed(&mut r)
        };
        fuzzing::nvme(&data);
    }
    assert!(
        start.elapsed() < Duration::from_secs(180),
        "{RUNS} inputs took {:?}",
        start.elapsed()
    );
}
