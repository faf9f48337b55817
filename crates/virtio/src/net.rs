//! virtio-net (bhyve's `pci_virtio_net.c`) on a tap interface: one receive
//! and one transmit queue, the vnet header passed through to the tap so the
//! guest's checksum/TSO offloads reach the host stack, merged receive
//! buffers.
//!
//! Receive is driven by the tap becoming readable and by the driver adding
//! buffers; a frame that finds no buffer waits in `pending` instead of being
//! dropped. Transmit copies each chain into one bounded frame buffer: a chain
//! longer than the largest frame is dropped with a log line.

use std::io::{self, IoSlice, Read, Write};
use std::os::unix::io::{AsRawFd, RawFd};

use md5::{Digest, Md5};
use rhyve_backends::tap::{self, Tap};
use rhyve_config::ConfigTree;
use serde::{Deserialize, Serialize};
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT, Reader, Writer};

use crate::queue::{drain, needs_interrupt, Completion};
use crate::{
    read_config_bytes, same_config, ConfigureError, DeviceError, GuestMemory, VirtioDevice,
    F_RING_EVENT_IDX, F_RING_INDIRECT_DESC, F_VERSION_1, TYPE_NET,
};
use rhyve_platform::snapshot::{DeviceState, Schema, SnapshotError};

pub const F_CSUM: u64 = 1 << 0;
pub const F_GUEST_CSUM: u64 = 1 << 1;
pub const F_MTU: u64 = 1 << 3;
pub const F_MAC: u64 = 1 << 5;
pub const F_GUEST_TSO4: u64 = 1 << 7;
pub const F_GUEST_TSO6: u64 = 1 << 8;
pub const F_GUEST_ECN: u64 = 1 << 9;
pub const F_HOST_TSO4: u64 = 1 << 11;
pub const F_HOST_TSO6: u64 = 1 << 12;
pub const F_HOST_ECN: u64 = 1 << 13;
pub const F_MRG_RXBUF: u64 = 1 << 15;
pub const F_STATUS: u64 = 1 << 16;

pub const RX_QUEUE: usize = 0;
pub const TX_QUEUE: usize = 1;
/// bhyve's VTNET_RINGSZ.
pub const QUEUE_SIZE: u16 = 1024;
/// Largest frame: 64 KiB TSO payload plus Ethernet/VLAN header, plus vnet header.
const MAX_FRAME: usize = 65562 + 12;
const STATUS_LINK_UP: u16 = 1;
const DEFAULT_MTU: u16 = 1500;
const MIN_MTU: u64 = 68;
const MAX_MTU: u64 = 65535 - 14;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetState {
    pub acked_features: u64,
    pub mac: [u8; 6],
    pub mtu: u16,
    /// `mtu=` was given: offer VIRTIO_NET_F_MTU.
    pub mtu_set: bool,
    pub tap_name: String,
    /// Bytes of vnet header on every frame (10, or 12 with merged buffers / 1.0).
    pub header_len: usize,
    pub rx_frames: u64,
    pub tx_frames: u64,
    pub dropped_frames: u64,
}

impl Schema for NetState {
    const KIND: &'static str = "virtio-net";
    const VERSION: u32 = 1;
}

pub struct Net {
    tap: Tap,
    state: NetState,
    rx_buf: Vec<u8>,
    /// Length of the frame in `rx_buf` still waiting for guest buffers.
    rx_pending: Option<usize>,
    tx_buf: Vec<u8>,
}

/// Parse a MAC as ether_aton(3) does; multicast and all-zero are refused (bhyve).
pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let parts: Vec<&str> = s.split(':').collect();
    if parts.len() != 6 {
        return None;
    }
    let mut mac = [0u8; 6];
    for (m, p) in mac.iter_mut().zip(parts) {
        if p.is_empty() || p.len() > 2 {
            return None;
        }
        *m = u8::from_str_radix(p, 16).ok()?;
    }
    (mac[0] & 1 == 0 && mac != [0; 6]).then_some(mac)
}

/// bhyve's default MAC: NetApp's OUI and three bytes of MD5("slot-func-vmname").
pub fn derived_mac(vm_name: &str, slot: u8, function: u8) -> [u8; 6] {
    let d = Md5::digest(format!("{slot}-{function}-{vm_name}").as_bytes());
    [0x00, 0xa0, 0x98, d[0], d[1], d[2]]
}

/// The `mac` key of a network device node (`pci.B.S.F`), or bhyve's
/// default derived from the VM name and the slot.
pub fn mac_from_config(
    tree: &ConfigTree,
    node: &str,
    vm_name: &str,
    slot: u8,
    function: u8,
) -> Result<[u8; 6], ConfigureError> {
    match tree.get(&format!("{node}.mac"))? {
        Some(m) => parse_mac(&m).ok_or_else(|| ConfigureError::Invalid {
            node: node.to_string(),
            why: format!("invalid MAC {m}"),
        }),
        None => Ok(derived_mac(vm_name, slot, function)),
    }
}

/// bhyve's `netbe_init` for a network device node (`model` names it in
/// errors): the tap its `backend` key names. Other backend kinds are
/// refused as not supported yet.
pub fn tap_from_config(tree: &ConfigTree, node: &str, model: &str) -> Result<Tap, ConfigureError> {
    let invalid = |why: String| ConfigureError::Invalid {
        node: node.to_string(),
        why,
    };
    let backend = tree
        .get(&format!("{node}.backend"))?
        .ok_or_else(|| invalid(format!("{model} without a backend is not supported yet")))?;
    if let Some(t) = tree.get(&format!("{node}.type"))? {
        if t != "tap" {
            return Err(invalid(format!(
                "network backend type \"{t}\" is not supported yet"
            )));
        }
    }
    for prefix in ["netgraph", "netmap:", "vale", "slirp"] {
        if backend.starts_with(prefix) {
            return Err(invalid(format!(
                "network backend \"{backend}\" is not supported yet"
            )));
        }
    }
    // bhyve's vmnetN is a tap too.
    let name = backend
        .strip_prefix("vmnet")
        .map_or(backend.clone(), |n| format!("vmnet{n}"));
    Ok(Tap::open(&name)?)
}

impl Net {
    pub fn from_config(
        tree: &ConfigTree,
        node: &str,
        vm_name: &str,
        slot: u8,
        function: u8,
    ) -> Result<Self, ConfigureError> {
        let invalid = |why: String| ConfigureError::Invalid {
            node: node.to_string(),
            why,
        };
        let mac = mac_from_config(tree, node, vm_name, slot, function)?;
        let (mtu, mtu_set) = match tree.get(&format!("{node}.mtu"))? {
            Some(m) => {
                let v = rhyve_config::parse_c_integer(&m)
                    .filter(|v| (MIN_MTU..=MAX_MTU).contains(v))
                    .ok_or_else(|| invalid(format!("invalid MTU {m}")))?;
                (v as u16, true)
            }
            None => (DEFAULT_MTU, false),
        };
        let tap = tap_from_config(tree, node, "virtio-net")?;
        Ok(Self::new(tap, mac, mtu, mtu_set))
    }

    pub fn new(tap: Tap, mac: [u8; 6], mtu: u16, mtu_set: bool) -> Self {
        let state = NetState {
            acked_features: 0,
            mac,
            mtu,
            mtu_set,
            tap_name: tap.name().to_string(),
            header_len: 10,
            rx_frames: 0,
            tx_frames: 0,
            dropped_frames: 0,
        };
        Self {
            tap,
            state,
            rx_buf: vec![0; MAX_FRAME],
            rx_pending: None,
            tx_buf: vec![0; MAX_FRAME],
        }
    }

    pub fn state(&self) -> &NetState {
        &self.state
    }

    fn mergeable(&self) -> bool {
        self.state.acked_features & F_MRG_RXBUF != 0
    }

    fn transmit(&mut self, mem: &GuestMemory, chain: DescriptorChain<&GuestMemory>) -> Completion {
        let mut reader = match Reader::new(mem, chain) {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!("virtio-net: bad transmit chain: {e}");
                return Completion::Used(0);
            }
        };
        let len = reader.available_bytes();
        if len < self.state.header_len || len > MAX_FRAME {
            tracing::warn!("virtio-net: dropping transmit chain of {len} bytes");
            self.state.dropped_frames += 1;
            return Completion::Used(0);
        }
        if reader.read_exact(&mut self.tx_buf[..len]).is_err() {
            return Completion::Used(0);
        }
        match self.tap.write_frame(&[IoSlice::new(&self.tx_buf[..len])]) {
            Ok(_) => self.state.tx_frames += 1,
            Err(e) => {
                self.state.dropped_frames += 1;
                tracing::debug!("virtio-net: tap write failed: {e}");
            }
        }
        Completion::Used(0)
    }

    /// Move frames from the tap into the receive queue until one side runs dry.
    fn receive(&mut self, queue: &mut Queue, mem: &GuestMemory) -> Result<bool, DeviceError> {
        let qerr = |source| DeviceError::Queue {
            queue: RX_QUEUE,
            source,
        };
        let mut used_any = false;
        queue.disable_notification(mem).map_err(qerr)?;
        loop {
            let len = match self.rx_pending.take() {
                Some(n) => n,
                None => match self.tap.read_frame(&mut self.rx_buf) {
                    Ok(n) if n >= self.state.header_len => n,
                    Ok(_) => continue,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        tracing::warn!("virtio-net: tap read failed: {e}");
                        break;
                    }
                },
            };
            match self.deliver(queue, mem, len)? {
                true => {
                    used_any = true;
                    self.state.rx_frames += 1;
                }
                false => {
                    // No buffers: keep the frame, ask the driver to kick us.
                    self.rx_pending = Some(len);
                    if queue.enable_notification(mem).map_err(qerr)? {
                        queue.disable_notification(mem).map_err(qerr)?;
                        continue;
                    }
                    break;
                }
            }
        }
        if !used_any {
            return Ok(false);
        }
        needs_interrupt(RX_QUEUE, queue, mem)
    }

    /// Place one frame of `len` bytes; false when the ring has too little room.
    fn deliver(
        &mut self,
        queue: &mut Queue,
        mem: &GuestMemory,
        len: usize,
    ) -> Result<bool, DeviceError> {
        let qerr = |source| DeviceError::Queue {
            queue: RX_QUEUE,
            source,
        };
        let mut chains: Vec<(u16, Writer<'_>)> = Vec::new();
        let mut room = 0usize;
        while room < len {
            let Some(chain) = queue.pop_descriptor_chain(mem) else {
                queue.iter(mem).map_err(qerr)?;
                queue.set_next_avail(queue.next_avail().wrapping_sub(chains.len() as u16));
                return Ok(false);
            };
            let head = chain.head_index();
            match Writer::new(mem, chain) {
                Ok(w) => {
                    room += w.available_bytes();
                    chains.push((head, w));
                }
                Err(e) => {
                    // Give back everything taken for this frame and drop it.
                    tracing::warn!("virtio-net: bad receive chain: {e}");
                    self.state.dropped_frames += 1;
                    for (h, _) in chains {
                        queue.add_used(mem, h, 0).map_err(qerr)?;
                    }
                    queue.add_used(mem, head, 0).map_err(qerr)?;
                    return Ok(true);
                }
            }
            if !self.mergeable() && !chains.is_empty() {
                break;
            }
        }
        if room < len {
            // Without merged buffers a frame must fit one chain.
            self.state.dropped_frames += 1;
            tracing::debug!("virtio-net: dropping a {len}-byte frame: receive buffer too small");
            for (head, _) in chains {
                queue.add_used(mem, head, 0).map_err(qerr)?;
            }
            return Ok(true);
        }
        if self.mergeable() {
            let n = chains.len() as u16;
            self.rx_buf[10..12].copy_from_slice(&n.to_le_bytes());
        }
        let mut offset = 0;
        for (head, mut w) in chains {
            let n = w.available_bytes().min(len - offset);
            if w.write_all(&self.rx_buf[offset..offset + n]).is_err() {
                tracing::warn!("virtio-net: receive buffer vanished");
            }
            offset += n;
            queue.add_used(mem, head, n as u32).map_err(qerr)?;
        }
        Ok(true)
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        TYPE_NET
    }
    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE, QUEUE_SIZE]
    }
    fn features(&self) -> u64 {
        let mut f = F_MAC
            | F_STATUS
            | F_MRG_RXBUF
            | F_CSUM
            | F_GUEST_CSUM
            | F_HOST_TSO4
            | F_HOST_TSO6
            | F_HOST_ECN
            | F_GUEST_TSO4
            | F_GUEST_TSO6
            | F_GUEST_ECN
            | F_RING_INDIRECT_DESC
            | F_RING_EVENT_IDX
            | F_VERSION_1;
        if self.state.mtu_set {
            f |= F_MTU;
        }
        f
    }
    fn ack_features(&mut self, features: u64) {
        let f = features & self.features();
        self.state.acked_features = f;
        self.state.header_len = if f & (F_MRG_RXBUF | F_VERSION_1) != 0 {
            12
        } else {
            10
        };
        if let Err(e) = self.tap.set_vnet_hdr_size(self.state.header_len as u32) {
            tracing::warn!(
                "virtio-net: {}: cannot set the vnet header size: {e}",
                self.state.tap_name
            );
        }
        let mut offload = 0;
        if f & F_GUEST_CSUM != 0 {
            offload |= tap::TUN_F_CSUM;
            if f & F_GUEST_TSO4 != 0 {
                offload |= tap::TUN_F_TSO4;
            }
            if f & F_GUEST_TSO6 != 0 {
                offload |= tap::TUN_F_TSO6;
            }
            if f & F_GUEST_ECN != 0 {
                offload |= tap::TUN_F_TSO_ECN;
            }
        }
        if let Err(e) = self.tap.set_offload(offload) {
            tracing::warn!(
                "virtio-net: {}: cannot set offloads: {e}",
                self.state.tap_name
            );
        }
    }
    fn config_size(&self) -> usize {
        12
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let mut c = [0u8; 12];
        c[0..6].copy_from_slice(&self.state.mac);
        c[6..8].copy_from_slice(&STATUS_LINK_UP.to_le_bytes());
        c[8..10].copy_from_slice(&1u16.to_le_bytes());
        c[10..12].copy_from_slice(&self.state.mtu.to_le_bytes());
        read_config_bytes(&c, offset, data);
    }
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // Legacy drivers may write the MAC; bhyve lets them.
        if let Ok(off) = usize::try_from(offset) {
            for (i, b) in data.iter().enumerate() {
                if let Some(m) = off.checked_add(i).and_then(|o| self.state.mac.get_mut(o)) {
                    *m = *b;
                }
            }
        }
    }
    fn host_fd(&self) -> Option<RawFd> {
        Some(self.tap.as_raw_fd())
    }
    fn host_event(&mut self) -> Vec<usize> {
        vec![RX_QUEUE]
    }
    fn process_queue(
        &mut self,
        index: usize,
        queue: &mut Queue,
        mem: &GuestMemory,
    ) -> Result<bool, DeviceError> {
        match index {
            RX_QUEUE => self.receive(queue, mem),
            TX_QUEUE => drain(index, queue, mem, |chain| self.transmit(mem, chain)),
            _ => Err(DeviceError::NoQueue(index)),
        }
    }
    fn reset(&mut self) {
        self.state.acked_features = 0;
        self.state.header_len = 10;
        self.rx_pending = None;
    }
    fn save_state(&self) -> Result<DeviceState, SnapshotError> {
        DeviceState::encode("virtio-net", &self.state)
    }
    fn restore_state(&mut self, saved: &DeviceState) -> Result<(), SnapshotError> {
        let s: NetState = saved.decode()?;
        same_config("virtio-net", "MAC address", &s.mac, &self.state.mac)?;
        same_config("virtio-net", "MTU", &s.mtu, &self.state.mtu)?;
        // The tap is this process's; a frame read from it but not yet
        // delivered is dropped, as a network may drop any frame.
        let tap_name = std::mem::take(&mut self.state.tap_name);
        self.state = NetState { tap_name, ..s };
        Ok(())
    }
}
