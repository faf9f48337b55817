//! A test driver written from Intel's PCI/PCI-X Family of Gigabit Ethernet
//! Controllers Software Developer's Manual (8254x): it reaches the 82545EM
//! through its BARs as a guest does (registers in BAR 0, IOADDR/IODATA in
//! BAR 2), reads the EEPROM the Microwire way and through EERD, builds
//! descriptor rings in guest memory and checks what the controller writes
//! back, what reaches the back end and which interrupt causes it raises.

use rhyve_net::e1000::{
    icr, nvm, rctl, reg, rxd, txd, EECD_CS, EECD_DI, EECD_DO, EECD_GNT, EECD_REQ, EECD_SK,
    EERD_DONE, EERD_START, MDIC_OP_READ, MDIC_READY, STATUS_LU, TCTL_EN,
};
use rhyve_net::fuzzing::FakeFrames;
use rhyve_net::{GuestMemory, E1000};
use rhyve_pci::PciFunction;
use vm_memory::{Bytes, GuestAddress};

const MAC: [u8; 6] = [0x00, 0xa0, 0x98, 0x12, 0x34, 0x56];
const TX_RING: u64 = 0x1000;
const RX_RING: u64 = 0x2000;
const BUFFERS: u64 = 0x10000;

struct Driver {
    nic: E1000,
    mem: GuestMemory,
    wire: FakeFrames,
}

impl Driver {
    fn new() -> Self {
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let wire = FakeFrames::default();
        let nic = E1000::new(MAC, Box::new(wire.clone()), mem.clone()).unwrap();
        Self { nic, mem, wire }
    }

    fn read(&mut self, offset: u32) -> u32 {
        let mut b = [0u8; 4];
        self.nic.bar_read(0, offset.into(), &mut b);
        u32::from_le_bytes(b)
    }

    fn write(&mut self, offset: u32, value: u32) {
        self.nic.bar_write(0, offset.into(), &value.to_le_bytes());
    }

    /// One Microwire clock: DI set up, SK raised, DO sampled, SK lowered.
    fn clock(&mut self, di: bool) -> bool {
        let base = EECD_REQ | EECD_CS | if di { EECD_DI } else { 0 };
        self.write(reg::EECD, base);
        self.write(reg::EECD, base | EECD_SK);
        let out = self.read(reg::EECD) & EECD_DO != 0;
        self.write(reg::EECD, base);
        out
    }

    /// 8254x manual 5.5: request the EEPROM, select it, shift out the READ
    /// opcode and a 6-bit address, shift in 16 data bits, deselect.
    fn microwire_read(&mut self, addr: u16) -> u16 {
        self.write(reg::EECD, EECD_REQ);
        assert!(
            self.read(reg::EECD) & EECD_GNT != 0,
            "EEPROM access granted"
        );
        let command = nvm::OP_READ << 6 | addr;
        for bit in (0..9).rev() {
            self.clock(command >> bit & 1 != 0);
        }
        let mut word = 0u16;
        for _ in 0..16 {
            word = word << 1 | u16::from(self.clock(false));
        }
        self.write(reg::EECD, 0);
        word
    }

    fn tx_ring(&mut self, descriptors: u32) {
        self.write(reg::TDBAL, TX_RING as u32);
        self.write(reg::TDBAH, 0);
        self.write(reg::TDLEN, descriptors * 16);
        self.write(reg::TDH, 0);
        self.write(reg::TDT, 0);
        self.write(reg::TCTL, TCTL_EN);
    }

    fn rx_ring(&mut self, descriptors: u32, rctl_bits: u32, bufsz: u64) {
        for i in 0..u64::from(descriptors) {
            self.mem
                .write_obj(BUFFERS + i * bufsz, GuestAddress(RX_RING + i * 16))
                .unwrap();
            self.mem
                .write_obj(0u64, GuestAddress(RX_RING + i * 16 + 8))
                .unwrap();
        }
        self.write(reg::RDBAL, RX_RING as u32);
        self.write(reg::RDBAH, 0);
        self.write(reg::RDLEN, descriptors * 16);
        self.write(reg::RDH, 0);
        self.write(reg::RDT, descriptors - 1);
        self.write(reg::RCTL, rctl::EN | rctl_bits);
    }

    /// Put a descriptor in the transmit ring.
    fn tx_descriptor(&self, index: u64, d: [u8; 16]) {
        self.mem
            .write_slice(&d, GuestAddress(TX_RING + index * 16))
            .unwrap();
    }

    fn tx_status(&self, index: u64) -> u8 {
        self.mem
            .read_obj(GuestAddress(TX_RING + index * 16 + 12))
            .unwrap()
    }

    fn sent(&self) -> Vec<Vec<u8>> {
        std::mem::take(&mut *self.wire.sent.lock().unwrap())
    }
}

fn legacy(addr: u64, len: u16, cso: u8, cmd: u32, css: u8) -> [u8; 16] {
    let mut d = [0u8; 16];
    d[0..8].copy_from_slice(&addr.to_le_bytes());
    let lower = u32::from(len) | u32::from(cso) << 16 | cmd;
    d[8..12].copy_from_slice(&lower.to_le_bytes());
    d[13] = css;
    d
}

fn ones_sum(data: &[u8]) -> u32 {
    let mut sum = 0u32;
    for c in data.chunks(2) {
        sum += u32::from(c[0]) << 8 | u32::from(*c.get(1).unwrap_or(&0));
    }
    while sum > 0xFFFF {
        sum = (sum & 0xFFFF) + (sum >> 16);
    }
    sum
}

/// An Ethernet + IPv4 + TCP header (54 bytes) for `payload` bytes.
fn tcp_header(payload: usize, seq: u32) -> Vec<u8> {
    let mut h = vec![0u8; 54];
    h[0..6].copy_from_slice(&[0x02, 0, 0, 0, 0, 1]);
    h[6..12].copy_from_slice(&MAC);
    h[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
    let ip = &mut h[14..34];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&((20 + 20 + payload) as u16).to_be_bytes());
    ip[4..6].copy_from_slice(&0x1234u16.to_be_bytes());
    ip[8] = 64;
    ip[9] = 6;
    ip[12..16].copy_from_slice(&[10, 0, 0, 1]);
    ip[16..20].copy_from_slice(&[10, 0, 0, 2]);
    let tcp = &mut h[34..54];
    tcp[0..2].copy_from_slice(&4000u16.to_be_bytes());
    tcp[2..4].copy_from_slice(&80u16.to_be_bytes());
    tcp[4..8].copy_from_slice(&seq.to_be_bytes());
    tcp[12] = 5 << 4;
    tcp[13] = 0x18; // PSH, ACK
    h
}

/// Whether `frame`'s IPv4 header and TCP checksum verify.
fn checksums_verify(frame: &[u8]) -> bool {
    let ip = &frame[14..34];
    let tcp = &frame[34..];
    let mut pseudo = Vec::new();
    pseudo.extend_from_slice(&ip[12..20]);
    pseudo.extend_from_slice(&[0, 6]);
    pseudo.extend_from_slice(&(tcp.len() as u16).to_be_bytes());
    pseudo.extend_from_slice(tcp);
    ones_sum(ip) == 0xFFFF && ones_sum(&pseudo) == 0xFFFF
}

#[test]
fn pci_identity_is_bhyves_82545em() {
    let d = Driver::new();
    let c = d.nic.config();
    assert_eq!((c.vendor_id(), c.device_id()), (0x8086, 0x100F));
    assert_eq!(c.read_dword(0x2C), 0x1008_8086, "subsystem");
    assert_eq!(c.read_dword(0x08) >> 8, 0x02_00_00, "Ethernet controller");
    assert!(c.intx_requested());
}

#[test]
fn eeprom_reads_the_mac_and_a_valid_checksum_both_ways() {
    let mut d = Driver::new();
    let words: Vec<u16> = (0..64).map(|a| d.microwire_read(a)).collect();
    let sum = words.iter().fold(0u16, |a, w| a.wrapping_add(*w));
    assert_eq!(sum, 0xBABA, "words 0..=0x3F add up to 0xBABA");
    let mac: Vec<u8> = words[0..3].iter().flat_map(|w| w.to_le_bytes()).collect();
    assert_eq!(mac, MAC);
    assert_eq!(words[0x0D], 0x100F);
    assert_eq!(words[0x0E], 0x8086);
    // EERD: start, address in bits 15:8; done and data in 31:16.
    for addr in [0u32, 2, 0x3F] {
        d.write(reg::EERD, addr << 8 | EERD_START);
        let v = d.read(reg::EERD);
        assert!(v & EERD_DONE != 0);
        assert_eq!((v >> 16) as u16, words[addr as usize]);
    }
    // Receive address 0 holds the MAC with its valid bit after power-on.
    assert_eq!(d.read(reg::RA), 0x1298_a000);
    assert_eq!(d.read(reg::RA + 4), 0x8000_5634);
}

#[test]
fn link_is_up_and_the_phy_is_an_m88() {
    let mut d = Driver::new();
    assert!(d.read(reg::STATUS) & STATUS_LU != 0);
    d.write(reg::MDIC, MDIC_OP_READ | 1 << 21 | 2 << 16);
    let id1 = d.read(reg::MDIC);
    d.write(reg::MDIC, MDIC_OP_READ | 1 << 21 | 3 << 16);
    let id2 = d.read(reg::MDIC);
    assert!(id1 & MDIC_READY != 0 && id2 & MDIC_READY != 0);
    assert_eq!((id1 & 0xFFFF) << 16 | (id2 & 0xFFF0), 0x0141_0C20);
    d.write(reg::MDIC, MDIC_OP_READ | 1 << 21 | 1 << 16);
    assert!(d.read(reg::MDIC) & 0x0004 != 0, "PHY link status");
}

#[test]
fn software_reset_returns_registers_to_their_defaults() {
    let mut d = Driver::new();
    d.tx_ring(8);
    d.rx_ring(8, 0, 2048);
    d.write(reg::IMS, icr::RXT0);
    d.write(reg::ICS, icr::RXT0);
    assert!(d.nic.state().irq_asserted);
    d.write(reg::CTRL, 1 << 26);
    assert!(!d.nic.state().irq_asserted, "reset lowers the interrupt");
    for r in [
        reg::RCTL,
        reg::TCTL,
        reg::IMS,
        reg::RDLEN,
        reg::TDLEN,
        reg::TDT,
    ] {
        assert_eq!(d.read(r), 0, "register {r:#x} after reset");
    }
    assert_eq!(d.read(reg::CTRL) & 1 << 26, 0, "RST self-clears");
    assert_eq!(d.read(reg::RA + 4) & 1 << 31, 0, "RAH valid bits cleared");
}

#[test]
fn interrupt_causes_follow_the_mask() {
    let mut d = Driver::new();
    d.write(reg::ICS, icr::LSC);
    assert!(!d.nic.state().irq_asserted, "masked cause raises nothing");
    d.write(reg::IMS, icr::LSC);
    assert!(
        d.nic.state().irq_asserted,
        "unmasking a pending cause raises it"
    );
    d.write(reg::IMC, icr::LSC);
    assert!(!d.nic.state().irq_asserted, "masking it again lowers it");
    d.write(reg::IMS, icr::LSC | icr::RXT0);
    assert_eq!(d.read(reg::IMS), icr::LSC | icr::RXT0);
    assert_eq!(d.read(reg::ICR), icr::LSC, "ICR reads the cause");
    assert!(!d.nic.state().irq_asserted, "reading ICR clears it");
    assert_eq!(d.read(reg::ICR), 0);
}

#[test]
fn legacy_descriptors_send_a_frame_with_its_checksum() {
    let mut d = Driver::new();
    d.tx_ring(8);
    d.write(reg::IMS, icr::TXDW);
    // A UDP-like frame whose 16-bit checksum at 50 covers bytes 34..
    let frame: Vec<u8> = (0..100u32).map(|i| (i * 3) as u8).collect();
    d.mem
        .write_slice(&frame[..40], GuestAddress(0x8000))
        .unwrap();
    d.mem
        .write_slice(&frame[40..], GuestAddress(0x9000))
        .unwrap();
    d.tx_descriptor(0, legacy(0x8000, 40, 0, 0, 34));
    d.tx_descriptor(1, legacy(0x9000, 60, 50, txd::EOP | txd::IC | txd::RS, 0));
    d.write(reg::TDT, 2);
    d.nic.service();
    let sent = d.sent();
    assert_eq!(sent.len(), 1);
    let out = &sent[0];
    assert_eq!(out.len(), 100);
    assert_eq!(out[..50], frame[..50]);
    assert_eq!(out[52..], frame[52..]);
    // The sum covers the field as the driver left it (its seed).
    let expect = !(ones_sum(&frame[34..]) as u16);
    assert_eq!(u16::from_be_bytes([out[50], out[51]]), expect);
    assert_eq!(d.read(reg::TDH), 2);
    assert_eq!(
        d.tx_status(1) & txd::STAT_DD,
        txd::STAT_DD,
        "RS: DD written"
    );
    assert_eq!(d.tx_status(0) & txd::STAT_DD, 0, "no RS: no write-back");
    assert!(d.nic.state().irq_asserted);
    assert_eq!(d.read(reg::ICR), icr::TXDW | icr::TXQE);
    assert_eq!(d.read(reg::GPTC), 1);
    assert_eq!(d.read(reg::GPTC), 0, "statistics clear on read");
}

#[test]
fn tso_splits_a_tcp_packet_into_mss_sized_frames() {
    let mut d = Driver::new();
    d.tx_ring(8);
    let payload: Vec<u8> = (0..2500u32).map(|i| (i % 251) as u8).collect();
    let mut header = tcp_header(0, 1000);
    // As Linux's e1000 does: IP length and checksum 0, TCP checksum the
    // pseudo-header sum without the length.
    header[16..18].copy_from_slice(&[0, 0]);
    let mut pseudo = vec![10, 0, 0, 1, 10, 0, 0, 2, 0, 6];
    pseudo.extend_from_slice(&[0, 0]);
    header[50..52].copy_from_slice(&(ones_sum(&pseudo) as u16).to_be_bytes());
    d.mem.write_slice(&header, GuestAddress(0x8000)).unwrap();
    d.mem.write_slice(&payload, GuestAddress(0xA000)).unwrap();
    // Context: IP checksum 14..=33 at 24, TCP from 34 at 50, TSE, MSS 1000.
    let mut ctx = [0u8; 16];
    ctx[0] = 14;
    ctx[1] = 24;
    ctx[2..4].copy_from_slice(&33u16.to_le_bytes());
    ctx[4] = 34;
    ctx[5] = 50;
    let cmd = txd::DEXT | txd::TCP | txd::IP | txd::TSE | payload.len() as u32;
    ctx[8..12].copy_from_slice(&cmd.to_le_bytes());
    ctx[13] = 54;
    ctx[14..16].copy_from_slice(&1000u16.to_le_bytes());
    d.tx_descriptor(0, ctx);
    let data = |addr: u64, len: u32, last: bool| {
        let mut x = [0u8; 16];
        x[0..8].copy_from_slice(&addr.to_le_bytes());
        let c =
            txd::DEXT | txd::DTYP_DATA | txd::TSE | len | if last { txd::EOP | txd::RS } else { 0 };
        x[8..12].copy_from_slice(&c.to_le_bytes());
        x[13] = txd::POPTS_IXSM | txd::POPTS_TXSM;
        x
    };
    d.tx_descriptor(1, data(0x8000, 54, false));
    d.tx_descriptor(2, data(0xA000, 2500, true));
    d.write(reg::TDT, 3);
    d.nic.service();
    let frames = d.sent();
    assert_eq!(frames.len(), 3);
    let mut seq = 1000;
    for (n, f) in frames.iter().enumerate() {
        let len = [1000, 1000, 500][n];
        assert_eq!(f.len(), 54 + len);
        assert_eq!(u16::from_be_bytes([f[16], f[17]]) as usize, 40 + len);
        assert_eq!(u16::from_be_bytes([f[18], f[19]]), 0x1234 + n as u16);
        assert_eq!(u32::from_be_bytes([f[38], f[39], f[40], f[41]]), seq);
        assert_eq!(f[47] & 0x08 != 0, n == 2, "PSH only on the last");
        assert!(checksums_verify(f), "frame {n}: checksums");
        assert_eq!(&f[54..], &payload[n * 1000..n * 1000 + len]);
        seq += len as u32;
    }
    assert_eq!(d.read(reg::TDH), 3);
}

#[test]
fn receive_fills_one_buffer_or_several() {
    let mut d = Driver::new();
    d.rx_ring(8, rctl::SECRC, 2048);
    d.write(reg::IMS, icr::RXT0);
    let small: Vec<u8> = (0..100u8).collect();
    d.wire.incoming.lock().unwrap().push_back(small.clone());
    d.nic.service();
    let mut buf = vec![0u8; 100];
    d.mem.read_slice(&mut buf, GuestAddress(BUFFERS)).unwrap();
    assert_eq!(buf, small);
    let len: u16 = d.mem.read_obj(GuestAddress(RX_RING + 8)).unwrap();
    let status: u8 = d.mem.read_obj(GuestAddress(RX_RING + 12)).unwrap();
    assert_eq!(len, 100);
    assert_eq!(
        status & (rxd::STAT_DD | rxd::STAT_EOP),
        rxd::STAT_DD | rxd::STAT_EOP
    );
    assert_eq!(d.read(reg::RDH), 1);
    assert!(d.nic.state().irq_asserted);
    assert!(d.read(reg::ICR) & icr::RXT0 != 0);
    assert_eq!(d.read(reg::GPRC), 1);

    // 256-byte buffers, CRC kept: a 600-byte frame takes three.
    let mut d = Driver::new();
    d.rx_ring(8, 3 << rctl::BSIZE_SHIFT, 256);
    let big: Vec<u8> = (0..600u32).map(|i| i as u8).collect();
    d.wire.incoming.lock().unwrap().push_back(big.clone());
    d.nic.service();
    assert_eq!(d.read(reg::RDH), 3);
    let mut got = Vec::new();
    for i in 0..3u64 {
        let len: u16 = d.mem.read_obj(GuestAddress(RX_RING + i * 16 + 8)).unwrap();
        let status: u8 = d.mem.read_obj(GuestAddress(RX_RING + i * 16 + 12)).unwrap();
        assert_eq!(status & rxd::STAT_EOP != 0, i == 2);
        let mut b = vec![0u8; len.into()];
        d.mem
            .read_slice(&mut b, GuestAddress(BUFFERS + i * 256))
            .unwrap();
        got.extend(b);
    }
    assert_eq!(got.len(), 604, "frame plus CRC");
    assert_eq!(got[..600], big[..]);
}

#[test]
fn a_frame_waits_for_buffers_instead_of_being_lost() {
    let mut d = Driver::new();
    // RDLEN counts in 128-byte steps: 8 descriptors at least.
    d.rx_ring(8, rctl::SECRC, 2048);
    d.write(reg::RDT, 0); // no buffers given yet
    d.wire.incoming.lock().unwrap().push_back(vec![0x42; 64]);
    d.nic.service();
    assert_eq!(d.read(reg::RDH), 0);
    d.write(reg::RDT, 7);
    d.nic.service();
    assert_eq!(d.read(reg::RDH), 1);
    let b: u8 = d.mem.read_obj(GuestAddress(BUFFERS)).unwrap();
    assert_eq!(b, 0x42);
}

#[test]
fn hostile_ring_values_are_refused_without_harm() {
    let mut d = Driver::new();
    d.tx_ring(8);
    d.write(reg::TDT, 500); // outside the ring
    d.tx_descriptor(0, legacy(0x8000, 60, 0, txd::EOP | txd::RS, 0));
    d.nic.service();
    assert!(d.sent().is_empty());
    assert_eq!(d.read(reg::TDH), 0);
    // A descriptor pointing past guest memory, a 0-length EOP, a ring at
    // the very top of the address space: nothing breaks.
    d.write(reg::TDT, 0);
    d.tx_descriptor(0, legacy(u64::MAX - 8, 60, 0, txd::EOP | txd::RS, 0));
    d.tx_descriptor(1, legacy(0x8000, 0, 0, txd::EOP | txd::RS, 0));
    d.write(reg::TDT, 2);
    d.nic.service();
    assert_eq!(d.read(reg::TDH), 2);
    d.write(reg::TDBAH, u32::MAX);
    d.write(reg::TDT, 5);
    d.nic.service();
    d.rx_ring(8, 0, 2048);
    d.write(reg::RDH, 9000);
    d.wire.incoming.lock().unwrap().push_back(vec![1; 64]);
    d.nic.service();
    assert_eq!(d.read(reg::RDH), 9000 & 0xFFFF);
}

/// What a snapshot and a restore in a new bhyve do to the function: pause,
/// save config space and device state, build a new controller over a copy
/// of guest memory, restore both into it, resume.
fn checkpoint_and_restore(d: &mut Driver) -> Driver {
    d.nic.pause();
    assert!(d.nic.quiesced());
    let config = d.nic.config().clone();
    let saved = d.nic.save_device().unwrap();
    let image = {
        let mut b = vec![0u8; 1 << 20];
        d.mem.read_slice(&mut b, GuestAddress(0)).unwrap();
        b
    };
    let mut e = Driver::new();
    e.mem.write_slice(&image, GuestAddress(0)).unwrap();
    e.nic.config_mut().restore(config).unwrap();
    e.nic.restore_device(saved.as_ref()).unwrap();
    e
}

#[test]
fn a_snapshot_taken_with_transmits_pending_sends_them_once_after_restore() {
    let mut d = Driver::new();
    d.tx_ring(8);
    d.rx_ring(8, rctl::SECRC, 2048);
    d.write(reg::IMS, icr::TXDW | icr::RXT0 | icr::LSC);
    // A sent frame before the snapshot, so TDH has moved.
    d.mem
        .write_slice(&[0x11; 60], GuestAddress(0x8000))
        .unwrap();
    d.tx_descriptor(0, legacy(0x8000, 60, 0, txd::EOP | txd::RS, 0));
    d.write(reg::TDT, 1);
    d.nic.service();
    assert_eq!(d.sent().len(), 1);
    assert_eq!(d.read(reg::ICR), icr::TXDW | icr::TXQE);
    // A pending link-change cause, unmasked: the line stands.
    d.write(reg::ICS, icr::LSC);
    assert!(d.nic.state().irq_asserted);

    // Two frames queued as the VM is paused: the paused thread sends nothing.
    d.nic.pause();
    d.mem
        .write_slice(&[0x22; 60], GuestAddress(0x9000))
        .unwrap();
    d.mem
        .write_slice(&[0x33; 70], GuestAddress(0xA000))
        .unwrap();
    d.tx_descriptor(1, legacy(0x9000, 60, 0, txd::EOP | txd::RS, 0));
    d.tx_descriptor(2, legacy(0xA000, 70, 0, txd::EOP | txd::RS, 0));
    d.write(reg::TDT, 3);
    d.wire.incoming.lock().unwrap().push_back(vec![0x44; 64]);
    d.nic.service();
    assert!(d.sent().is_empty(), "paused: no transmit");
    assert_eq!(d.read(reg::TDH), 1);
    assert_eq!(d.read(reg::RDH), 0, "paused: no receive");
    assert_eq!(d.tx_status(1) & txd::STAT_DD, 0);

    let mut e = checkpoint_and_restore(&mut d);
    assert!(e.nic.state().irq_asserted, "the INTx line survives");
    assert_eq!(e.nic.state(), d.nic.state());
    e.nic.service();
    assert!(e.sent().is_empty(), "restored paused until resumed");
    e.nic.resume();
    e.nic.service();
    e.nic.service();
    assert_eq!(
        e.sent(),
        vec![vec![0x22; 60], vec![0x33; 70]],
        "each frame once"
    );
    assert_eq!(e.read(reg::TDH), 3);
    assert_eq!(e.tx_status(1) & txd::STAT_DD, txd::STAT_DD);
    assert_eq!(e.tx_status(2) & txd::STAT_DD, txd::STAT_DD);
    assert_eq!(e.read(reg::ICR), icr::LSC | icr::TXDW | icr::TXQE);
    assert!(!e.nic.state().irq_asserted, "reading ICR lowers the line");
    assert_eq!(e.read(reg::IMS), icr::TXDW | icr::RXT0 | icr::LSC);
    assert_eq!(
        e.read(reg::GPTC),
        3,
        "statistics carry on: one before, two after"
    );

    // Receive works into the restored ring.
    e.wire.incoming.lock().unwrap().push_back(vec![0x55; 64]);
    e.nic.service();
    assert_eq!(e.read(reg::RDH), 1);
    let b: u8 = e.mem.read_obj(GuestAddress(BUFFERS)).unwrap();
    assert_eq!(b, 0x55);
    assert_eq!(e.read(reg::ICR) & icr::RXT0, icr::RXT0);
}

#[test]
fn eeprom_writes_survive_and_another_mac_is_refused() {
    let mut d = Driver::new();
    d.write(reg::EECD, EECD_REQ);
    // Microwire WRITE of 0xBEEF to word 0x20.
    let command = nvm::OP_WRITE << 6 | 0x20;
    for bit in (0..9).rev() {
        d.clock(command >> bit & 1 != 0);
    }
    for bit in (0..16).rev() {
        d.clock(0xBEEFu16 >> bit & 1 != 0);
    }
    d.write(reg::EECD, 0);
    let mut e = checkpoint_and_restore(&mut d);
    e.nic.resume();
    e.write(reg::EERD, EERD_START | 0x20 << 8);
    assert_eq!(e.read(reg::EERD) >> 16, 0xBEEF);

    let saved = d.nic.save_device().unwrap();
    let wire = FakeFrames::default();
    let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
    let mut other = E1000::new([0x00, 0xa0, 0x98, 0, 0, 1], Box::new(wire), mem).unwrap();
    let err = other
        .restore_device(saved.as_ref())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("MAC") && err.contains("00:a0:98:12:34:56"),
        "{err}"
    );
}
