//! Benchmark driver (see `bench/run_net.sh`): a vhost-user front-end for
//! rhyve's virtio-net whose tap lives in a network namespace. Transmit:
//! UDP datagrams through the TX queue to a socket on the host side of the
//! tap. Receive: the host side sends UDP datagrams to the "guest" (a static
//! neighbour entry), the front-end keeps the RX queue stocked with
//! merged-buffer pages. Prints `<name> <Mbit/s> <packets/s>` per direction.
//! Measurement only; never run by the test suite.

use std::net::UdpSocket;
use std::os::unix::io::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vhost::vhost_user::message::VhostUserVirtioFeatures;
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vmm_sys_util::eventfd::EventFd;

const RING: u16 = 256;
const MEM: usize = 16 << 20;
const HDR: usize = 12;
const PAYLOAD: usize = 1400;
const F_MRG_RXBUF: u64 = 1 << 15;
const F_VERSION_1: u64 = 1 << 32;
const DESC_F_WRITE: u16 = 2;

struct Queue {
    base: *mut u8,
    desc: usize,
    avail: usize,
    used: usize,
    avail_idx: u16,
    used_seen: u16,
    kick: EventFd,
    call: EventFd,
}

impl Queue {
    fn put<T: Copy>(&self, off: usize, v: T) {
        assert!(off + std::mem::size_of::<T>() <= MEM);
        // SAFETY: inside the shared mapping.
        unsafe { std::ptr::write_volatile(self.base.add(off) as *mut T, v) }
    }
    fn get<T: Copy>(&self, off: usize) -> T {
        assert!(off + std::mem::size_of::<T>() <= MEM);
        // SAFETY: inside the shared mapping.
        unsafe { std::ptr::read_volatile(self.base.add(off) as *const T) }
    }
    fn offer(&mut self, desc: u16, addr: usize, len: u32, flags: u16) {
        let d = self.desc + 16 * desc as usize;
        self.put::<u64>(d, addr as u64);
        self.put::<u32>(d + 8, len);
        self.put::<u16>(d + 12, flags);
        self.put::<u16>(d + 14, 0);
        self.put::<u16>(self.avail + 4 + 2 * (self.avail_idx % RING) as usize, desc);
        self.avail_idx = self.avail_idx.wrapping_add(1);
        std::sync::atomic::fence(Ordering::Release);
        self.put::<u16>(self.avail + 2, self.avail_idx);
    }
    fn used(&mut self) -> Vec<(u16, u32)> {
        std::sync::atomic::fence(Ordering::Acquire);
        let idx: u16 = self.get(self.used + 2);
        let mut out = Vec::new();
        while self.used_seen != idx {
            let e = self.used + 4 + 8 * (self.used_seen % RING) as usize;
            out.push((self.get::<u32>(e) as u16, self.get::<u32>(e + 4)));
            self.used_seen = self.used_seen.wrapping_add(1);
        }
        out
    }
}

fn checksum(data: &[u8]) -> u16 {
    let mut sum = 0u32;
    for c in data.chunks(2) {
        sum += u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]));
    }
    while sum > 0xFFFF {
        sum = (sum & 0xFFFF) + (sum >> 16);
    }
    !(sum as u16)
}

/// vnet header + Ethernet + IPv4 + UDP to the host side.
fn frame(dst_mac: [u8; 6], src_mac: [u8; 6], src: [u8; 4], dst: [u8; 4]) -> Vec<u8> {
    let mut f = vec![0u8; HDR];
    f.extend_from_slice(&dst_mac);
    f.extend_from_slice(&src_mac);
    f.extend_from_slice(&[0x08, 0x00]);
    let total = (20 + 8 + PAYLOAD) as u16;
    let mut ip = vec![0x45, 0, 0, 0, 0, 0, 0x40, 0, 64, 17, 0, 0];
    ip[2..4].copy_from_slice(&total.to_be_bytes());
    ip.extend_from_slice(&src);
    ip.extend_from_slice(&dst);
    let c = checksum(&ip);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    f.extend_from_slice(&ip);
    f.extend_from_slice(&9000u16.to_be_bytes());
    f.extend_from_slice(&9000u16.to_be_bytes());
    f.extend_from_slice(&((8 + PAYLOAD) as u16).to_be_bytes());
    f.extend_from_slice(&[0, 0]);
    f.extend(std::iter::repeat_n(0x5A, PAYLOAD));
    f
}

fn parse_mac(s: &str) -> [u8; 6] {
    let mut m = [0u8; 6];
    for (i, p) in s.trim().split(':').enumerate().take(6) {
        m[i] = u8::from_str_radix(p, 16).unwrap();
    }
    m
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let arg = |k: &str| {
        args.iter()
            .position(|a| a == k)
            .and_then(|i| args.get(i + 1))
            .cloned()
            .unwrap_or_else(|| panic!("{k} missing"))
    };
    let socket = arg("--socket");
    let tap_mac = parse_mac(&arg("--tap-mac"));
    let our_mac = parse_mac(&arg("--mac"));
    let seconds: u64 = arg("--seconds").parse().unwrap();
    let host_ip = [10, 99, 0, 1];
    let guest_ip = [10, 99, 0, 2];

    // SAFETY: a fresh memfd, sized and mapped shared.
    let (fd, base) = unsafe {
        let fd = libc::memfd_create(c"net-bench".as_ptr(), 0);
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
    let uaddr = base as u64;
    let mut fe = Frontend::connect(&socket, 2).expect("connect");
    fe.set_owner().unwrap();
    let features = fe.get_features().unwrap();
    let want =
        features & (F_MRG_RXBUF | F_VERSION_1 | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits());
    fe.set_features(want).unwrap();
    if want & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() != 0 {
        let pf = fe.get_protocol_features().unwrap();
        fe.set_protocol_features(
            pf & vhost::vhost_user::message::VhostUserProtocolFeatures::CONFIG,
        )
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
    let mut queues = Vec::new();
    for q in 0..2usize {
        let area = q * 0x10000;
        let (kick, call) = (EventFd::new(0).unwrap(), EventFd::new(0).unwrap());
        fe.set_vring_num(q, RING).unwrap();
        fe.set_vring_addr(
            q,
            &VringConfigData {
                queue_max_size: RING,
                queue_size: RING,
                flags: 0,
                desc_table_addr: uaddr + area as u64,
                avail_ring_addr: uaddr + area as u64 + 0x1000,
                used_ring_addr: uaddr + area as u64 + 0x2000,
                log_addr: None,
            },
        )
        .unwrap();
        fe.set_vring_base(q, 0).unwrap();
        fe.set_vring_call(q, &call).unwrap();
        fe.set_vring_kick(q, &kick).unwrap();
        fe.set_vring_enable(q, true).unwrap();
        queues.push(Queue {
            base,
            desc: area,
            avail: area + 0x1000,
            used: area + 0x2000,
            avail_idx: 0,
            used_seen: 0,
            kick,
            call,
        });
    }
    let mut tx = queues.pop().unwrap();
    let mut rx = queues.pop().unwrap();

    // Transmit to a UDP socket on the host side.
    let sink = UdpSocket::bind("10.99.0.1:9000").unwrap();
    sink.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let received = Arc::new(AtomicU64::new(0));
    let counter = {
        let (stop, received) = (stop.clone(), received.clone());
        std::thread::spawn(move || {
            let mut buf = [0u8; 2048];
            while !stop.load(Ordering::Relaxed) {
                if let Ok(n) = sink.recv(&mut buf) {
                    received.fetch_add(n as u64, Ordering::Relaxed);
                }
            }
        })
    };
    let pkt = frame(tap_mac, our_mac, guest_ip, host_ip);
    let bufs = 0x40000;
    for i in 0..RING as usize {
        let at = bufs + i * 2048;
        for (j, b) in pkt.iter().enumerate() {
            tx.put::<u8>(at + j, *b);
        }
    }
    let start = Instant::now();
    let mut next = 0u16;
    let mut in_flight = 0usize;
    while start.elapsed() < Duration::from_secs(seconds) {
        while in_flight < RING as usize {
            tx.offer(next, bufs + next as usize * 2048, pkt.len() as u32, 0);
            next = (next + 1) % RING;
            in_flight += 1;
        }
        tx.kick.write(1).unwrap();
        let done = tx.used().len();
        if done == 0 {
            let _ = tx.call.read();
        }
        in_flight -= done;
    }
    let secs = start.elapsed().as_secs_f64();
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::Relaxed);
    counter.join().unwrap();
    let bytes = received.load(Ordering::Relaxed) as f64;
    println!(
        "tx-udp {:.0} {:.0}",
        bytes * 8.0 / secs / 1e6,
        bytes / PAYLOAD as f64 / secs
    );

    // Receive: the host side sends to us; keep 256 buffers of 2 KiB posted.
    let rx_bufs = 0x200000;
    for i in 0..RING {
        rx.offer(i, rx_bufs + i as usize * 2048, 2048, DESC_F_WRITE);
    }
    rx.kick.write(1).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let sender = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let s = UdpSocket::bind("10.99.0.1:0").unwrap();
            let payload = vec![0xA5u8; PAYLOAD];
            while !stop.load(Ordering::Relaxed) {
                let _ = s.send_to(&payload, "10.99.0.2:9000");
            }
        })
    };
    let start = Instant::now();
    let mut bytes = 0u64;
    let mut packets = 0u64;
    while start.elapsed() < Duration::from_secs(seconds) {
        let done = rx.used();
        if done.is_empty() {
            let _ = rx.call.read();
            continue;
        }
        for (head, len) in done {
            bytes += u64::from(len).saturating_sub((HDR + 14 + 28) as u64);
            packets += 1;
            rx.offer(head, rx_bufs + head as usize * 2048, 2048, DESC_F_WRITE);
        }
        rx.kick.write(1).unwrap();
    }
    let secs = start.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    sender.join().unwrap();
    println!(
        "rx-udp {:.0} {:.0}",
        bytes as f64 * 8.0 / secs / 1e6,
        packets as f64 / secs
    );
    let _ = fd.as_raw_fd();
}
