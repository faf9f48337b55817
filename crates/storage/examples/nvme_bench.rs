//! Benchmark driver (see `bench/virtio-blk.sh`): bhyve's NVMe controller
//! driven in-process by the spec-written host driver of the tests, the way
//! `blk_bench` drives a vhost-user-blk back end: one I/O queue pair, queue
//! depth 32, sequential 1 MiB reads and random 4 KiB reads over the whole
//! disk for a fixed time, sleeping on the completion queue's MSI-X vector
//! (an eventfd) when nothing is done. Prints one line per test:
//! `<name> <MB/s> <IOPS>`. Measurement only; never run by the test suite.

#[path = "../tests/support/nvme_host.rs"]
mod nvme_host;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use nvme_host::Host;
use rhyve_backends::block::{BlockFile, BlockOptions};
use rhyve_pci::{PciBdf, PciFunction};
use rhyve_platform::irq::MsiSender;
use rhyve_storage::nvme::{DsmMode, Nvme, NvmeOptions, MSIX_BAR};
use rhyve_storage::GuestMemory;
use vm_memory::GuestAddress;
use vmm_sys_util::eventfd::EventFd;

const QD: usize = 32;
const MEM: usize = 64 << 20;
const DATA: u64 = 0x40_0000;
const LISTS: u64 = 0x300_0000;

/// MSI-X messages become eventfd writes, as KVM's irqfds are.
struct Wake(EventFd);

impl MsiSender for Wake {
    fn send(&self, _address: u64, _data: u32) {
        let _ = self.0.write(1);
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let arg = |k: &str| {
        args.iter()
            .position(|a| a == k)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let path = PathBuf::from(arg("--disk").expect("--disk PATH"));
    let seconds: u64 = arg("--seconds").map_or(3, |s| s.parse().unwrap());
    let file = BlockFile::open(&BlockOptions {
        path,
        readonly: true,
        nocache: false,
        sync: false,
        nodelete: false,
        sector_size: None,
    })
    .expect("open the disk");
    let disk = file.size();
    let opts = NvmeOptions {
        max_queues: 1,
        queue_entries: 256,
        io_slots: QD as u32,
        sector_size: None,
        serial: "BENCH".into(),
        eui64: None,
        dsm: DsmMode::Disable,
    };
    let mem = GuestMemory::from_ranges(&[(GuestAddress(0), MEM)]).unwrap();
    let nvme = Nvme::new(
        file,
        opts,
        mem.clone(),
        "bench",
        PciBdf::new(0, 4, 0).unwrap(),
    )
    .expect("controller");
    let wake = Arc::new(Wake(EventFd::new(0).unwrap()));
    {
        let mut n = nvme.lock().unwrap();
        n.config_mut().connect_msi(wake.clone());
        let cap = n.config().find_capability(0x11).expect("MSI-X capability");
        n.config_write(cap + 2, &0x8000u16.to_le_bytes());
        // Vector 1: any message, unmasked.
        n.bar_write(MSIX_BAR, 16 + 12, &0u32.to_le_bytes());
    }
    let mut host = Host::new(nvme, mem);
    assert!(host.enable(32), "controller not ready");
    host.set_queue_count(1);
    host.cq_vector = Some(1);
    let (cq, sq) = host.create_io_queues(1, 256);
    assert!(cq.ok() && sq.ok(), "I/O queues: {cq:?} {sq:?}");

    let mut rng = 0x9E37_79B9_7F4A_7C15u64;
    let mut slot_of_cid = vec![0usize; 1 << 16];
    for (name, bs, random) in [("seq-1m", 1u64 << 20, false), ("rand-4k", 4096, true)] {
        let pages = bs / 4096;
        for slot in 0..QD as u64 {
            if pages > 2 {
                host.prp_list(LISTS + slot * 4096, DATA + slot * bs + 4096, pages - 1);
            }
        }
        let prp2 = |slot: u64| match pages {
            1 => 0,
            2 => DATA + slot * bs + 4096,
            _ => LISTS + slot * 4096,
        };
        let blocks = disk / bs;
        let mut next = 0u64;
        let mut pick = || {
            if random {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                rng % blocks
            } else {
                next = (next + 1) % blocks;
                next
            }
        };
        let lbas = (bs / 512) as u16;
        let submit = |host: &mut Host, slot_of_cid: &mut [usize], slot: usize, block: u64| {
            let sqe = Host::rw(
                0x02,
                block * bs / 512,
                lbas,
                DATA + slot as u64 * bs,
                prp2(slot as u64),
            );
            let cid = host.push(1, sqe, false);
            slot_of_cid[usize::from(cid)] = slot;
        };
        for slot in 0..QD {
            let block = pick();
            submit(&mut host, &mut slot_of_cid, slot, block);
        }
        host.ring_sq(1);
        let start = Instant::now();
        let mut done = 0u64;
        let mut outstanding = QD;
        let mut finished = Vec::with_capacity(QD);
        let mut draining = false;
        loop {
            if !draining && start.elapsed() >= Duration::from_secs(seconds) {
                draining = true;
            }
            if draining && outstanding == 0 {
                break;
            }
            finished.clear();
            while let Some(c) = host.poll(1, false) {
                assert!(c.ok(), "read failed: {c:?}");
                finished.push(c.cid);
            }
            if finished.is_empty() {
                // Sleep until the controller's next interrupt.
                let _ = wake.0.read();
                continue;
            }
            host.ring_cq(1);
            outstanding -= finished.len();
            if draining {
                continue;
            }
            done += finished.len() as u64;
            for &cid in &finished {
                let block = pick();
                let slot = slot_of_cid[usize::from(cid)];
                submit(&mut host, &mut slot_of_cid, slot, block);
                outstanding += 1;
            }
            host.ring_sq(1);
        }
        let secs = start.elapsed().as_secs_f64();
        let iops = done as f64 / secs;
        println!("{name} {:.1} {:.0}", iops * bs as f64 / 1e6, iops);
    }
}
