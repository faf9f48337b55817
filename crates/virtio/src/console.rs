//! virtio-console (bhyve's `pci_virtio_console.c`): a multiport console
//! whose ports are UNIX sockets rhyve creates (`port.N.name`, `port.N.path`),
//! one client each.
//!
//! Queues: port 0 rx/tx are 0/1, the control pair is 2/3, port n (n >= 1)
//! uses 2n+2 / 2n+3. The control protocol (DEVICE_READY → DEVICE_ADD per
//! port → PORT_READY → PORT_NAME + PORT_OPEN) is answered from a queue of
//! pending control messages. The device's host fd is an epoll set holding the
//! listeners, the clients and a self-kick eventfd, so accepting, socket input
//! and "control messages are waiting" all reach the transport as one event.
//! Socket input is read only as far as guest buffers reach: a slow guest
//! leaves bytes in the socket rather than in an unbounded buffer here.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::io::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};

use rhyve_config::ConfigTree;
use serde::{Deserialize, Serialize};
use virtio_queue::{DescriptorChain, Queue, Reader, Writer};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::queue::{drain, Completion};
use crate::{
    read_config_bytes, same_config, ConfigureError, DeviceError, GuestMemory, VirtioDevice,
    F_RING_EVENT_IDX, F_RING_INDIRECT_DESC, F_VERSION_1, TYPE_CONSOLE,
};
use rhyve_platform::snapshot::{DeviceState, Schema, SnapshotError};

pub const F_MULTIPORT: u64 = 1 << 1;
/// bhyve's VTCON_MAXPORTS.
pub const MAX_PORTS: usize = 16;
/// bhyve's VTCON_RINGSZ.
pub const QUEUE_SIZE: u16 = 64;
pub const CONTROL_RX_QUEUE: usize = 2;
pub const CONTROL_TX_QUEUE: usize = 3;

pub const DEVICE_READY: u16 = 0;
pub const DEVICE_ADD: u16 = 1;
pub const PORT_READY: u16 = 3;
pub const PORT_OPEN: u16 = 6;
pub const PORT_NAME: u16 = 7;

/// epoll tokens: the kick eventfd, then per port listener (2p+1) and client (2p+2).
const KICK_TOKEN: u64 = 0;
/// Largest control message we accept from the driver.
const MAX_CONTROL_LEN: usize = 8 + 256;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortState {
    pub name: String,
    pub path: String,
    pub connected: bool,
    pub guest_ready: bool,
    pub guest_open: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConsoleState {
    pub acked_features: u64,
    pub driver_ready: bool,
    pub ports: Vec<PortState>,
    /// Control messages (header + payload) waiting for control-rx buffers.
    pub control_out: VecDeque<Vec<u8>>,
}

impl Schema for ConsoleState {
    const KIND: &'static str = "virtio-console";
    const VERSION: u32 = 1;
}

struct Port {
    listener: UnixListener,
    client: Option<UnixStream>,
}

pub struct Console {
    state: ConsoleState,
    ports: Vec<Port>,
    epoll: Epoll,
    kick: EventFd,
}

fn rx_queue(port: usize) -> usize {
    if port == 0 {
        0
    } else {
        2 * port + 2
    }
}

fn port_of_queue(queue: usize) -> Option<(usize, bool)> {
    match queue {
        0 => Some((0, false)),
        1 => Some((0, true)),
        2 | 3 => None,
        q => Some((q / 2 - 1, q % 2 == 1)),
    }
}

fn control(id: u32, event: u16, value: u16, payload: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(8 + payload.len());
    m.extend_from_slice(&id.to_le_bytes());
    m.extend_from_slice(&event.to_le_bytes());
    m.extend_from_slice(&value.to_le_bytes());
    m.extend_from_slice(payload);
    m
}

impl Console {
    pub fn from_config(tree: &ConfigTree, node: &str) -> Result<Self, ConfigureError> {
        let invalid = |why: String| ConfigureError::Invalid {
            node: node.to_string(),
            why,
        };
        let mut specs = Vec::new();
        for id in 0..MAX_PORTS {
            let base = format!("{node}.port.{id}");
            if !tree.is_node(&base) {
                break;
            }
            let name = tree.get(&format!("{base}.name"))?.unwrap_or_default();
            let path = tree
                .get(&format!("{base}.path"))?
                .ok_or_else(|| invalid(format!("port {name} requires a path")))?;
            specs.push((name, path));
        }
        if tree.is_node(&format!("{node}.port.{MAX_PORTS}")) {
            return Err(invalid("too many ports".into()));
        }
        Self::new(&specs).map_err(|e| invalid(e.to_string()))
    }

    /// Create the sockets for `(name, path)` ports.
    pub fn new(specs: &[(String, String)]) -> io::Result<Self> {
        let epoll = Epoll::new()?;
        let kick = EventFd::new(EFD_NONBLOCK)?;
        epoll.ctl(
            ControlOperation::Add,
            kick.as_raw_fd(),
            EpollEvent::new(EventSet::IN, KICK_TOKEN),
        )?;
        let mut ports = Vec::new();
        let mut states = Vec::new();
        for (i, (name, path)) in specs.iter().enumerate() {
            // A stale socket from an earlier run is replaced; any other file is not.
            if let Ok(m) = std::fs::symlink_metadata(path) {
                if m.file_type().is_socket() {
                    let _ = std::fs::remove_file(path);
                }
            }
            let listener = UnixListener::bind(path)
                .map_err(|e| io::Error::new(e.kind(), format!("{path}: {e}")))?;
            listener.set_nonblocking(true)?;
            epoll.ctl(
                ControlOperation::Add,
                listener.as_raw_fd(),
                EpollEvent::new(EventSet::IN, 2 * i as u64 + 1),
            )?;
            ports.push(Port {
                listener,
                client: None,
            });
            states.push(PortState {
                name: name.clone(),
                path: path.clone(),
                connected: false,
                guest_ready: false,
                guest_open: false,
            });
        }
        Ok(Self {
            state: ConsoleState {
                acked_features: 0,
                driver_ready: false,
                ports: states,
                control_out: VecDeque::new(),
            },
            ports,
            epoll,
            kick,
        })
    }

    pub fn state(&self) -> &ConsoleState {
        &self.state
    }

    fn max_ports(&self) -> usize {
        self.ports.len().max(1)
    }

    fn post(&mut self, msg: Vec<u8>) {
        self.state.control_out.push_back(msg);
        let _ = self.kick.write(1);
    }

    fn announce_open(&mut self, port: usize) {
        let p = &self.state.ports[port];
        if p.guest_ready {
            let open = u16::from(p.connected);
            self.post(control(port as u32, PORT_OPEN, open, &[]));
        }
    }

    fn accept(&mut self, port: usize) {
        while let Ok((stream, _)) = self.ports[port].listener.accept() {
            if self.ports[port].client.is_some() {
                // One client per port, as in bhyve.
                drop(stream);
                continue;
            }
            if stream.set_nonblocking(true).is_err()
                || self
                    .epoll
                    .ctl(
                        ControlOperation::Add,
                        stream.as_raw_fd(),
                        EpollEvent::new(EventSet::IN | EventSet::HANG_UP, 2 * port as u64 + 2),
                    )
                    .is_err()
            {
                continue;
            }
            self.ports[port].client = Some(stream);
            self.state.ports[port].connected = true;
            self.announce_open(port);
        }
    }

    fn disconnect(&mut self, port: usize) {
        if let Some(c) = self.ports[port].client.take() {
            let _ = self.epoll.ctl(
                ControlOperation::Delete,
                c.as_raw_fd(),
                EpollEvent::default(),
            );
        }
        self.state.ports[port].connected = false;
        self.announce_open(port);
    }

    fn control_from_driver(&mut self, msg: &[u8]) {
        if msg.len() < 8 {
            tracing::warn!("virtio-console: short control message");
            return;
        }
        let id = u32::from_le_bytes(msg[0..4].try_into().unwrap()) as usize;
        let event = u16::from_le_bytes(msg[4..6].try_into().unwrap());
        let value = u16::from_le_bytes(msg[6..8].try_into().unwrap());
        match event {
            DEVICE_READY if value == 1 => {
                self.state.driver_ready = true;
                for p in 0..self.ports.len() {
                    self.post(control(p as u32, DEVICE_ADD, 0, &[]));
                }
            }
            DEVICE_READY => tracing::warn!("virtio-console: driver failed to initialise"),
            PORT_READY if id < self.ports.len() && value == 1 => {
                self.state.ports[id].guest_ready = true;
                let name = self.state.ports[id].name.clone().into_bytes();
                self.post(control(id as u32, PORT_NAME, 1, &name));
                self.announce_open(id);
            }
            PORT_OPEN if id < self.ports.len() => self.state.ports[id].guest_open = value == 1,
            _ => tracing::debug!("virtio-console: ignoring control event {event} for port {id}"),
        }
    }

    fn control_tx(
        &mut self,
        mem: &GuestMemory,
        chain: DescriptorChain<&GuestMemory>,
    ) -> Completion {
        let mut msg = Vec::new();
        match Reader::new(mem, chain) {
            Ok(r) => {
                if r.take(MAX_CONTROL_LEN as u64).read_to_end(&mut msg).is_ok() {
                    self.control_from_driver(&msg);
                }
            }
            Err(e) => tracing::warn!("virtio-console: bad control chain: {e}"),
        }
        Completion::Used(0)
    }

    fn control_rx(
        &mut self,
        mem: &GuestMemory,
        chain: DescriptorChain<&GuestMemory>,
    ) -> Completion {
        let Some(msg) = self.state.control_out.front() else {
            return Completion::Retry;
        };
        let mut w = match Writer::new(mem, chain) {
            Ok(w) => w,
            Err(e) => {
                tracing::warn!("virtio-console: bad control buffer: {e}");
                return Completion::Used(0);
            }
        };
        if w.available_bytes() < msg.len() || w.write_all(msg).is_err() {
            tracing::warn!("virtio-console: control buffer too small");
            return Completion::Used(0);
        }
        let n = msg.len() as u32;
        self.state.control_out.pop_front();
        Completion::Used(n)
    }

    fn port_rx(
        &mut self,
        port: usize,
        mem: &GuestMemory,
        chain: DescriptorChain<&GuestMemory>,
    ) -> Completion {
        let Some(client) = self.ports[port].client.as_mut() else {
            return Completion::Retry;
        };
        let mut w = match Writer::new(mem, chain) {
            Ok(w) => w,
            Err(e) => {
                tracing::warn!("virtio-console: bad receive buffer: {e}");
                return Completion::Used(0);
            }
        };
        let mut buf = [0u8; 4096];
        let room = w.available_bytes().min(buf.len());
        if room == 0 {
            return Completion::Used(0);
        }
        match client.read(&mut buf[..room]) {
            Ok(0) => {
                self.disconnect(port);
                Completion::Retry
            }
            Ok(n) => match w.write_all(&buf[..n]) {
                Ok(()) => Completion::Used(n as u32),
                Err(_) => Completion::Used(0),
            },
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Completion::Retry,
            Err(_) => {
                self.disconnect(port);
                Completion::Retry
            }
        }
    }

    fn port_tx(
        &mut self,
        port: usize,
        mem: &GuestMemory,
        chain: DescriptorChain<&GuestMemory>,
    ) -> Completion {
        let mut data = Vec::new();
        match Reader::new(mem, chain) {
            Ok(r) => {
                let _ = r.take(1 << 20).read_to_end(&mut data);
            }
            Err(e) => {
                tracing::warn!("virtio-console: bad transmit chain: {e}");
                return Completion::Used(0);
            }
        }
        // Without a client the bytes are dropped, as in bhyve.
        if let Some(client) = self.ports[port].client.as_mut() {
            if write_with_wait(client, &data).is_err() {
                self.disconnect(port);
            }
        }
        Completion::Used(0)
    }
}

/// Write all of `data` to a non-blocking socket, waiting a bounded time for room.
fn write_with_wait(s: &mut UnixStream, mut data: &[u8]) -> io::Result<()> {
    while !data.is_empty() {
        match s.write(data) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => data = &data[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                let mut pfd = libc::pollfd {
                    fd: s.as_raw_fd(),
                    events: libc::POLLOUT,
                    revents: 0,
                };
                // SAFETY: one pollfd we own.
                if unsafe { libc::poll(&mut pfd, 1, 1000) } <= 0 {
                    return Err(io::ErrorKind::TimedOut.into());
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

impl VirtioDevice for Console {
    fn device_type(&self) -> u32 {
        TYPE_CONSOLE
    }
    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE; 2 * self.max_ports() + 2]
    }
    fn features(&self) -> u64 {
        F_MULTIPORT | F_RING_INDIRECT_DESC | F_RING_EVENT_IDX | F_VERSION_1
    }
    fn ack_features(&mut self, features: u64) {
        self.state.acked_features = features & self.features();
    }
    fn config_size(&self) -> usize {
        12
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let mut c = [0u8; 12];
        c[0..2].copy_from_slice(&80u16.to_le_bytes());
        c[2..4].copy_from_slice(&25u16.to_le_bytes());
        c[4..8].copy_from_slice(&(self.max_ports() as u32).to_le_bytes());
        read_config_bytes(&c, offset, data);
    }
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {
        // emerg_wr is accepted and ignored, as in bhyve.
    }
    fn host_fd(&self) -> Option<RawFd> {
        Some(self.epoll.as_raw_fd())
    }
    fn host_event(&mut self) -> Vec<usize> {
        let mut events = vec![EpollEvent::default(); 2 * MAX_PORTS + 1];
        let n = self.epoll.wait(0, &mut events).unwrap_or(0);
        let mut queues = Vec::new();
        for ev in &events[..n] {
            match ev.data() {
                KICK_TOKEN => {
                    let _ = self.kick.read();
                    queues.push(CONTROL_RX_QUEUE);
                }
                t if t % 2 == 1 => self.accept(((t - 1) / 2) as usize),
                t => queues.push(rx_queue(((t - 2) / 2) as usize)),
            }
        }
        // accept() may have posted PORT_OPEN.
        if !self.state.control_out.is_empty() {
            queues.push(CONTROL_RX_QUEUE);
        }
        queues.sort_unstable();
        queues.dedup();
        queues
    }
    fn process_queue(
        &mut self,
        index: usize,
        queue: &mut Queue,
        mem: &GuestMemory,
    ) -> Result<bool, DeviceError> {
        if index >= 2 * self.max_ports() + 2 {
            return Err(DeviceError::NoQueue(index));
        }
        match index {
            CONTROL_RX_QUEUE => drain(index, queue, mem, |c| self.control_rx(mem, c)),
            CONTROL_TX_QUEUE => drain(index, queue, mem, |c| self.control_tx(mem, c)),
            q => match port_of_queue(q) {
                Some((p, _)) if p >= self.ports.len() => Ok(false),
                Some((p, true)) => drain(index, queue, mem, |c| self.port_tx(p, mem, c)),
                Some((p, false)) => drain(index, queue, mem, |c| self.port_rx(p, mem, c)),
                None => Err(DeviceError::NoQueue(index)),
            },
        }
    }
    fn reset(&mut self) {
        self.state.acked_features = 0;
        self.state.driver_ready = false;
        self.state.control_out.clear();
        for p in &mut self.state.ports {
            p.guest_ready = false;
            p.guest_open = false;
        }
    }
    fn save_state(&self) -> Result<DeviceState, SnapshotError> {
        DeviceState::encode("virtio-console", &self.state)
    }
    fn restore_state(&mut self, saved: &DeviceState) -> Result<(), SnapshotError> {
        let s: ConsoleState = saved.decode()?;
        let names = |st: &ConsoleState| -> Vec<(String, String)> {
            st.ports
                .iter()
                .map(|p| (p.name.clone(), p.path.clone()))
                .collect()
        };
        same_config("virtio-console", "ports", &names(&s), &names(&self.state))?;
        self.state.acked_features = s.acked_features;
        self.state.driver_ready = s.driver_ready;
        self.state.control_out = s.control_out;
        // Connections are this process's: tell the driver where that
        // differs from what it last heard.
        for (i, saved) in s.ports.into_iter().enumerate() {
            let port = &mut self.state.ports[i];
            port.guest_ready = saved.guest_ready;
            port.guest_open = saved.guest_open;
            if port.connected != saved.connected {
                self.announce_open(i);
            }
        }
        Ok(())
    }
}
