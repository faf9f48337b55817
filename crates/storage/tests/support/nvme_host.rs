//! A small NVMe host driver written from the NVMe 1.4 base specification
//! (controller registers 3.1, initialization 7.6.1, queues 4.1-4.6,
//! PRPs 4.3, admin commands 5, NVM commands 6): what the controller tests
//! and the benchmark use to drive `rhyve_storage::nvme::Nvme` as a guest
//! would, through BAR writes and guest memory, polling completions by
//! their phase tag.

#![allow(dead_code)]

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rhyve_pci::PciFunction;
use rhyve_storage::nvme::{Nvme, DOORBELLS, REG_BAR};
use rhyve_storage::GuestMemory;
use vm_memory::{Bytes, GuestAddress};

pub const CC_EN: u32 = 1;
/// CC with 64-byte SQ entries and 16-byte CQ entries (IOSQES 6, IOCQES 4).
pub const CC_ENTRY_SIZES: u32 = 6 << 16 | 4 << 20;

/// A submission queue entry under construction.
#[derive(Clone, Copy)]
pub struct Sqe(pub [u8; 64]);

impl Sqe {
    pub fn new(opcode: u8) -> Self {
        let mut e = [0u8; 64];
        e[0] = opcode;
        Self(e)
    }
    fn set(mut self, dword: usize, v: u32) -> Self {
        self.0[dword * 4..dword * 4 + 4].copy_from_slice(&v.to_le_bytes());
        self
    }
    pub fn nsid(self, n: u32) -> Self {
        self.set(1, n)
    }
    pub fn prp1(self, a: u64) -> Self {
        self.set(6, a as u32).set(7, (a >> 32) as u32)
    }
    pub fn prp2(self, a: u64) -> Self {
        self.set(8, a as u32).set(9, (a >> 32) as u32)
    }
    pub fn cdw(self, n: usize, v: u32) -> Self {
        self.set(n, v)
    }
    /// Byte 1: fused operation and PSDT bits.
    pub fn flags(mut self, f: u8) -> Self {
        self.0[1] = f;
        self
    }
}

/// A completion queue entry as read back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cqe {
    pub result: u32,
    pub sq_head: u16,
    pub sqid: u16,
    pub cid: u16,
    /// Status code type and status code.
    pub sct: u8,
    pub sc: u8,
    pub dnr: bool,
}

impl Cqe {
    pub fn ok(&self) -> bool {
        self.sct == 0 && self.sc == 0
    }
}

#[derive(Clone)]
struct Ring {
    base: u64,
    entries: u16,
    /// SQ: our tail. CQ: our head.
    index: u16,
    phase: bool,
}

/// The host side of one controller.
pub struct Host {
    pub nvme: Arc<Mutex<Nvme>>,
    pub mem: GuestMemory,
    sqs: Vec<Option<Ring>>,
    cqs: Vec<Option<Ring>>,
    next_cid: u16,
    /// MSI-X vector for the I/O completion queues created next; None:
    /// interrupts off (we poll).
    pub cq_vector: Option<u16>,
}

/// Where the host keeps its rings: queue `q`'s SQ at `RINGS + q * 2 * RING_SPAN`,
/// its CQ one span later.
pub const RINGS: u64 = 0x10_0000;
pub const RING_SPAN: u64 = 0x2_0000;

impl Host {
    pub fn new(nvme: Arc<Mutex<Nvme>>, mem: GuestMemory) -> Self {
        Self {
            nvme,
            mem,
            sqs: (0..65).map(|_| None).collect(),
            cqs: (0..65).map(|_| None).collect(),
            next_cid: 1,
            cq_vector: None,
        }
    }

    /// The same host (its rings, next command id) driving `nvme` over
    /// `mem`: a controller restored from a snapshot of ours, on a copy of
    /// guest memory.
    pub fn moved_to(&self, nvme: Arc<Mutex<Nvme>>, mem: GuestMemory) -> Self {
        Self {
            nvme,
            mem,
            sqs: self.sqs.clone(),
            cqs: self.cqs.clone(),
            next_cid: self.next_cid,
            cq_vector: self.cq_vector,
        }
    }

    pub fn sq_base(q: u16) -> u64 {
        RINGS + u64::from(q) * 2 * RING_SPAN
    }
    pub fn cq_base(q: u16) -> u64 {
        Self::sq_base(q) + RING_SPAN
    }

    pub fn write32(&self, offset: u64, v: u32) {
        self.nvme
            .lock()
            .unwrap()
            .bar_write(REG_BAR, offset, &v.to_le_bytes());
    }
    pub fn write64(&self, offset: u64, v: u64) {
        self.nvme
            .lock()
            .unwrap()
            .bar_write(REG_BAR, offset, &v.to_le_bytes());
    }
    pub fn read32(&self, offset: u64) -> u32 {
        let mut b = [0u8; 4];
        self.nvme.lock().unwrap().bar_read(REG_BAR, offset, &mut b);
        u32::from_le_bytes(b)
    }
    pub fn read64(&self, offset: u64) -> u64 {
        let mut b = [0u8; 8];
        self.nvme.lock().unwrap().bar_read(REG_BAR, offset, &mut b);
        u64::from_le_bytes(b)
    }

    /// 7.6.1: admin queue attributes and bases, then CC.EN; true once
    /// CSTS.RDY is set.
    pub fn enable(&mut self, admin_entries: u16) -> bool {
        let n = u32::from(admin_entries - 1);
        // A fresh completion queue holds no entry with a valid phase tag.
        self.zero(Self::cq_base(0), usize::from(admin_entries) * 16);
        self.write32(0x24, n | n << 16);
        self.write64(0x28, Self::sq_base(0));
        self.write64(0x30, Self::cq_base(0));
        self.write32(0x14, CC_ENTRY_SIZES | CC_EN);
        self.sqs[0] = Some(Ring {
            base: Self::sq_base(0),
            entries: admin_entries,
            index: 0,
            phase: true,
        });
        self.cqs[0] = Some(Ring {
            base: Self::cq_base(0),
            entries: admin_entries,
            index: 0,
            phase: true,
        });
        self.read32(0x1C) & 1 == 1
    }

    fn zero(&self, at: u64, len: usize) {
        self.mem
            .write_slice(&vec![0u8; len], GuestAddress(at))
            .unwrap();
    }

    /// CC.EN = 0, then wait for CSTS.RDY to clear: the controller has
    /// reset; our rings are gone.
    pub fn disable(&mut self) {
        self.write32(0x14, CC_ENTRY_SIZES);
        self.wait_csts(1, 0);
        self.sqs.iter_mut().for_each(|q| *q = None);
        self.cqs.iter_mut().for_each(|q| *q = None);
    }

    /// Wait (at most 5 s) until CSTS & mask == value.
    pub fn wait_csts(&self, mask: u32, value: u32) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.read32(0x1C) & mask != value {
            assert!(Instant::now() < deadline, "CSTS {:#x}", self.read32(0x1C));
            std::thread::yield_now();
        }
    }

    /// Put `sqe` on queue `q` with a fresh command id (returned); ring the
    /// doorbell unless `ring` is false.
    pub fn push(&mut self, q: u16, mut sqe: Sqe, ring: bool) -> u16 {
        let cid = self.next_cid;
        self.next_cid = self.next_cid.wrapping_add(1).max(1);
        sqe.0[2..4].copy_from_slice(&cid.to_le_bytes());
        let sq = self.sqs[usize::from(q)].as_mut().expect("no such SQ");
        let at = sq.base + u64::from(sq.index) * 64;
        self.mem.write_slice(&sqe.0, GuestAddress(at)).unwrap();
        sq.index = (sq.index + 1) % sq.entries;
        let tail = sq.index;
        if ring {
            self.write32(DOORBELLS + 8 * u64::from(q), u32::from(tail));
        }
        cid
    }

    /// Ring queue `q`'s SQ tail doorbell with our tail.
    pub fn ring_sq(&self, q: u16) {
        let tail = self.sqs[usize::from(q)].as_ref().unwrap().index;
        self.write32(DOORBELLS + 8 * u64::from(q), u32::from(tail));
    }

    /// The next completion on CQ `q`, if posted (phase tag matches).
    pub fn poll(&mut self, q: u16, ring_head: bool) -> Option<Cqe> {
        let cq = self.cqs[usize::from(q)].as_mut().expect("no such CQ");
        let at = cq.base + u64::from(cq.index) * 16;
        let mut e = [0u8; 16];
        self.mem.read_slice(&mut e, GuestAddress(at)).unwrap();
        let dw3 = u32::from_le_bytes(e[12..16].try_into().unwrap());
        if (dw3 >> 16) & 1 != u32::from(cq.phase) {
            return None;
        }
        cq.index = (cq.index + 1) % cq.entries;
        if cq.index == 0 {
            cq.phase = !cq.phase;
        }
        let head = cq.index;
        if ring_head {
            self.write32(DOORBELLS + 8 * u64::from(q) + 4, u32::from(head));
        }
        let dw2 = u32::from_le_bytes(e[8..12].try_into().unwrap());
        Some(Cqe {
            result: u32::from_le_bytes(e[0..4].try_into().unwrap()),
            sq_head: dw2 as u16,
            sqid: (dw2 >> 16) as u16,
            cid: dw3 as u16,
            sc: (dw3 >> 17) as u8,
            sct: ((dw3 >> 25) & 7) as u8,
            dnr: dw3 >> 31 != 0,
        })
    }

    /// Ring CQ `q`'s head doorbell with our head.
    pub fn ring_cq(&self, q: u16) {
        let head = self.cqs[usize::from(q)].as_ref().unwrap().index;
        self.write32(DOORBELLS + 8 * u64::from(q) + 4, u32::from(head));
    }

    /// Wait (at most 5 s) for the next completion on CQ `q`.
    pub fn wait(&mut self, q: u16) -> Cqe {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            if let Some(c) = self.poll(q, true) {
                return c;
            }
            assert!(Instant::now() < deadline, "no completion on CQ {q}");
            std::thread::yield_now();
        }
    }

    /// Run one command on queue `q` and return its completion.
    pub fn run(&mut self, q: u16, sqe: Sqe) -> Cqe {
        let cid = self.push(q, sqe, true);
        let c = self.wait(q);
        assert_eq!(c.cid, cid, "completion for another command");
        c
    }

    pub fn admin(&mut self, sqe: Sqe) -> Cqe {
        self.run(0, sqe)
    }

    /// Set Features / Number of Queues: returns (SQs, CQs) granted.
    pub fn set_queue_count(&mut self, n: u16) -> (u16, u16) {
        let v = u32::from(n - 1) * 0x1_0001;
        let c = self.admin(Sqe::new(0x09).cdw(10, 0x07).cdw(11, v));
        assert!(c.ok(), "{c:?}");
        ((c.result & 0xFFFF) as u16 + 1, (c.result >> 16) as u16 + 1)
    }

    /// Create I/O CQ and SQ `q` with `entries` entries (interrupts as
    /// `cq_vector` says).
    pub fn create_io_queues(&mut self, q: u16, entries: u16) -> (Cqe, Cqe) {
        self.create_io_queues_sized(q, entries, entries)
    }

    /// Create I/O CQ `q` of `cq_entries` and SQ `q` of `sq_entries` on it.
    pub fn create_io_queues_sized(
        &mut self,
        q: u16,
        cq_entries: u16,
        sq_entries: u16,
    ) -> (Cqe, Cqe) {
        let interrupts = self.cq_vector.map_or(0, |v| 2 | u32::from(v) << 16);
        self.zero(Self::cq_base(q), usize::from(cq_entries) * 16);
        let cq = self.admin(
            Sqe::new(0x05)
                .prp1(Self::cq_base(q))
                .cdw(10, u32::from(cq_entries - 1) << 16 | u32::from(q))
                .cdw(11, 1 | interrupts),
        );
        if cq.ok() {
            self.cqs[usize::from(q)] = Some(Ring {
                base: Self::cq_base(q),
                entries: cq_entries,
                index: 0,
                phase: true,
            });
        }
        let sq = self.admin(
            Sqe::new(0x01)
                .prp1(Self::sq_base(q))
                .cdw(10, u32::from(sq_entries - 1) << 16 | u32::from(q))
                .cdw(11, 1 | u32::from(q) << 16),
        );
        if sq.ok() {
            self.sqs[usize::from(q)] = Some(Ring {
                base: Self::sq_base(q),
                entries: sq_entries,
                index: 0,
                phase: true,
            });
        }
        (cq, sq)
    }

    /// A read or write of `blocks` blocks at `lba`, data at `prp1`/`prp2`.
    pub fn rw(opcode: u8, lba: u64, blocks: u16, prp1: u64, prp2: u64) -> Sqe {
        Sqe::new(opcode)
            .nsid(1)
            .prp1(prp1)
            .prp2(prp2)
            .cdw(10, lba as u32)
            .cdw(11, (lba >> 32) as u32)
            .cdw(12, u32::from(blocks - 1))
    }

    /// Write a PRP list for `pages` pages starting at `data` into `list`,
    /// chaining list pages as the spec says when one is not enough.
    pub fn prp_list(&self, list: u64, data: u64, pages: u64) {
        let mut at = list;
        let mut page = 0;
        while page < pages {
            let slots_left = (4096 - at % 4096) / 8;
            let remaining = pages - page;
            if remaining > slots_left && slots_left == 1 {
                // Chain to the next list page.
                let next = (at & !0xFFF) + 0x1000;
                self.mem.write_obj(next, GuestAddress(at)).unwrap();
                at = next;
                continue;
            }
            self.mem
                .write_obj(data + page * 4096, GuestAddress(at))
                .unwrap();
            at += 8;
            page += 1;
        }
    }
}
