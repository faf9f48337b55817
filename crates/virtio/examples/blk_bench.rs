//! Benchmark driver (see `bench/run.sh`): a vhost-user front-end that drives
//! any vhost-user-blk back-end (ours, qemu-storage-daemon's) the same way,
//! with queue depth 32: sequential 1 MiB reads and random 4 KiB reads over
//! the whole disk for a fixed time. Prints one line per test:
//! `<name> <MB/s> <IOPS>`. Measurement only; never run by the test suite.

use std::os::unix::io::AsRawFd;
use std::time::{Duration, Instant};

use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vmm_sys_util::eventfd::EventFd;

const QD: usize = 32;
const RING: u16 = 256;
const MEM: usize = 64 << 20;
const DESC_F_NEXT: u16 = 1;
const DESC_F_WRITE: u16 = 2;

struct Shared {
    base: *mut u8,
}

impl Shared {
    fn at<T>(&self, off: usize) -> *mut T {
        assert!(off + std::mem::size_of::<T>() <= MEM);
        // SAFETY: inside our MEM-byte mapping.
        unsafe { self.base.add(off) as *mut T }
    }
    fn put<T: Copy>(&self, off: usize, v: T) {
        // SAFETY: in bounds (checked by `at`); the back-end only reads these.
        unsafe { std::ptr::write_volatile(self.at::<T>(off), v) }
    }
    fn get<T: Copy>(&self, off: usize) -> T {
        // SAFETY: in bounds (checked by `at`).
        unsafe { std::ptr::read_volatile(self.at::<T>(off)) }
    }
}

// Layout in the shared memory.
const DESC: usize = 0;
const AVAIL: usize = 0x1000;
const USED: usize = 0x2000;
const HDRS: usize = 0x4000;
const DATA: usize = 0x10_0000;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let arg = |k: &str| {
        args.iter()
            .position(|a| a == k)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let socket = arg("--socket").expect("--socket PATH");
    let disk: u64 = arg("--size").expect("--size BYTES").parse().unwrap();
    let seconds: u64 = arg("--seconds").map_or(3, |s| s.parse().unwrap());

    // SAFETY: a fresh memfd, sized and mapped shared.
    let (fd, base) = unsafe {
        let fd = libc::memfd_create(c"blk-bench".as_ptr(), 0);
        assert!(fd >= 0);
        assert_eq!(libc::ftruncate(fd, MEM as i64), 0);
        let p = libc::mmap(
            std::ptr::null_mut(),
            MEM,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            fd,
            0,
        );
        assert_ne!(p, libc::MAP_FAILED);
        (fd, p as *mut u8)
    };
    let mem = Shared { base };
    let uaddr = base as u64;

    let mut fe = Frontend::connect(&socket, 1).expect("connect");
    fe.set_owner().unwrap();
    let features = fe.get_features().unwrap();
    let want =
        features & ((1 << 32) | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() | (1 << 28));
    fe.set_features(want).unwrap();
    if want & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() != 0 {
        let pf = fe.get_protocol_features().unwrap();
        fe.set_protocol_features(pf & VhostUserProtocolFeatures::CONFIG)
            .unwrap();
    }
    fe.set_mem_table(&[VhostUserMemoryRegionInfo {
        guest_phys_addr: 0,
        memory_size: MEM as u64,
        userspace_addr: uaddr,
        mmap_offset: 0,
        mmap_handle: fd,
    }])
    .unwrap();
    let kick = EventFd::new(0).unwrap();
    let call = EventFd::new(0).unwrap();
    fe.set_vring_num(0, RING).unwrap();
    fe.set_vring_addr(
        0,
        &VringConfigData {
            queue_max_size: RING,
            queue_size: RING,
            flags: 0,
            desc_table_addr: uaddr + DESC as u64,
            used_ring_addr: uaddr + USED as u64,
            avail_ring_addr: uaddr + AVAIL as u64,
            log_addr: None,
        },
    )
    .unwrap();
    fe.set_vring_base(0, 0).unwrap();
    fe.set_vring_call(0, &call).unwrap();
    fe.set_vring_kick(0, &kick).unwrap();
    fe.set_vring_enable(0, true).unwrap();

    let mut state = Ring {
        mem,
        kick,
        call,
        avail_idx: 0,
        used_seen: 0,
    };
    let mut rng = 0x9E37_79B9_7F4A_7C15u64;
    for (name, bs, random) in [("seq-1m", 1usize << 20, false), ("rand-4k", 4096, true)] {
        let blocks = disk / bs as u64;
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
        for slot in 0..QD {
            let block = pick();
            state.submit(slot, bs, block * bs as u64 / 512);
        }
        state.notify();
        let start = Instant::now();
        let mut done = 0u64;
        while start.elapsed() < Duration::from_secs(seconds) {
            let slots = state.reap();
            for slot in &slots {
                let block = pick();
                state.submit(*slot, bs, block * bs as u64 / 512);
            }
            done += slots.len() as u64;
            if !slots.is_empty() {
                state.notify();
            }
        }
        // Drain what is still in flight before the next test.
        let mut outstanding = QD;
        let tail = Instant::now();
        while outstanding > 0 && tail.elapsed() < Duration::from_secs(10) {
            outstanding -= state.reap().len();
        }
        let secs = start.elapsed().as_secs_f64();
        let iops = done as f64 / secs;
        println!("{name} {:.1} {:.0}", iops * bs as f64 / 1e6, iops);
    }
    let _ = fd.as_raw_fd();
}

struct Ring {
    mem: Shared,
    kick: EventFd,
    call: EventFd,
    avail_idx: u16,
    used_seen: u16,
}

impl Ring {
    /// Request slot `slot` (3 descriptors at 3*slot): read `bs` bytes at `sector`.
    fn submit(&mut self, slot: usize, bs: usize, sector: u64) {
        let d = 3 * slot;
        let hdr = HDRS + slot * 32;
        let status = hdr + 16;
        let data = DATA + slot * (1 << 20);
        self.mem.put::<u32>(hdr, 0);
        self.mem.put::<u32>(hdr + 4, 0);
        self.mem.put::<u64>(hdr + 8, sector);
        for (i, (addr, len, flags)) in [
            (hdr, 16u32, DESC_F_NEXT),
            (data, bs as u32, DESC_F_NEXT | DESC_F_WRITE),
            (status, 1, DESC_F_WRITE),
        ]
        .into_iter()
        .enumerate()
        {
            let at = DESC + 16 * (d + i);
            // Buffers are guest-physical: the region starts at 0.
            self.mem.put::<u64>(at, addr as u64);
            self.mem.put::<u32>(at + 8, len);
            self.mem.put::<u16>(at + 12, flags);
            self.mem.put::<u16>(at + 14, (d + i + 1) as u16);
        }
        let slot_at = AVAIL + 4 + 2 * (self.avail_idx % RING) as usize;
        self.mem.put::<u16>(slot_at, d as u16);
        self.avail_idx = self.avail_idx.wrapping_add(1);
        std::sync::atomic::fence(std::sync::atomic::Ordering::Release);
        self.mem.put::<u16>(AVAIL + 2, self.avail_idx);
    }

    fn notify(&self) {
        self.kick.write(1).unwrap();
    }

    /// Completed request slots (waits for the call eventfd when none).
    fn reap(&mut self) -> Vec<usize> {
        loop {
            std::sync::atomic::fence(std::sync::atomic::Ordering::Acquire);
            let idx: u16 = self.mem.get(USED + 2);
            if idx != self.used_seen {
                let mut out = Vec::new();
                while self.used_seen != idx {
                    let e = USED + 4 + 8 * (self.used_seen % RING) as usize;
                    let id: u32 = self.mem.get(e);
                    let slot = id as usize / 3;
                    let status: u8 = self.mem.get(HDRS + slot * 32 + 16);
                    assert_eq!(status, 0, "request failed: status {status}");
                    out.push(slot);
                    self.used_seen = self.used_seen.wrapping_add(1);
                }
                return out;
            }
            let _ = self.call.read();
        }
    }
}
