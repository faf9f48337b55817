//! The same devices served over vhost-user (`rhyve-vhost-user --socket PATH
//! DEVICE`), so QEMU, Cloud Hypervisor or user-mode-linux drive them.
//!
//! rust-vmm's `vhost-user-backend` runs the protocol, maps the front-end's
//! memory and owns the vrings; [`DeviceBackend`] only forwards: queue kicks
//! and the device's host fd (registered edge-triggered on the vring epoll
//! loop) become `process_queue` calls on the one device implementation, and
//! a `true` result becomes a call-fd signal.

use std::io;
use std::sync::{Arc, Mutex};

use rhyve_config::ConfigTree;
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VhostUserBackend, VhostUserDaemon, VringRwLock, VringT};
use virtio_queue::QueueT;
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic};
use vmm_sys_util::epoll::EventSet;

use crate::{device_from_config, GuestMemory, VirtioDevice};

type Mem = GuestMemoryAtomic<GuestMemory>;

struct Inner {
    device: Box<dyn VirtioDevice>,
    mem: Mem,
    /// The device stopped on a fatal queue error until the front-end resets it.
    broken: bool,
}

/// A [`VirtioDevice`] as a vhost-user backend.
#[derive(Clone)]
pub struct DeviceBackend {
    inner: Arc<Mutex<Inner>>,
    num_queues: usize,
    max_queue_size: usize,
}

impl DeviceBackend {
    pub fn new(device: Box<dyn VirtioDevice>) -> Self {
        let sizes = device.queue_max_sizes();
        Self {
            num_queues: sizes.len(),
            max_queue_size: sizes.iter().copied().max().unwrap_or(0) as usize,
            inner: Arc::new(Mutex::new(Inner {
                device,
                mem: GuestMemoryAtomic::new(GuestMemory::default()),
                broken: false,
            })),
        }
    }

    /// The token the device's host fd is registered with on the epoll loop.
    fn host_token(&self) -> u64 {
        self.num_queues as u64 + 1
    }

    fn process(
        &self,
        inner: &mut Inner,
        index: usize,
        vrings: &[VringRwLock<Mem>],
    ) -> io::Result<()> {
        if inner.broken {
            return Ok(());
        }
        let Some(vring) = vrings.get(index) else {
            return Ok(());
        };
        let mem = inner.mem.memory();
        let result = {
            let mut state = vring.get_mut();
            if !state.is_enabled() || !state.get_queue().ready() {
                return Ok(());
            }
            inner
                .device
                .process_queue(index, state.get_queue_mut(), &mem)
        };
        match result {
            Ok(true) => vring.signal_used_queue(),
            Ok(false) => Ok(()),
            Err(e) => {
                // A driver that breaks the ring protocol gets no more service.
                tracing::error!("device needs reset: {e}");
                inner.broken = true;
                Ok(())
            }
        }
    }
}

impl VhostUserBackend for DeviceBackend {
    type Bitmap = ();
    type Vring = VringRwLock<Mem>;

    fn num_queues(&self) -> usize {
        self.num_queues
    }
    fn max_queue_size(&self) -> usize {
        self.max_queue_size
    }
    fn features(&self) -> u64 {
        self.inner.lock().unwrap().device.features()
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }
    fn acked_features(&self, features: u64) {
        self.inner.lock().unwrap().device.ack_features(features);
    }
    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
    }
    fn reset_device(&self) {
        let mut inner = self.inner.lock().unwrap();
        inner.device.reset();
        inner.broken = false;
    }
    fn set_event_idx(&self, _enabled: bool) {
        // The vrings carry it; devices read it from their queue.
    }
    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let mut data = vec![0u8; size.min(4096) as usize];
        self.inner
            .lock()
            .unwrap()
            .device
            .read_config(u64::from(offset), &mut data);
        data
    }
    fn set_config(&self, offset: u32, buf: &[u8]) -> io::Result<()> {
        self.inner
            .lock()
            .unwrap()
            .device
            .write_config(u64::from(offset), buf);
        Ok(())
    }
    fn update_memory(&self, mem: Mem) -> io::Result<()> {
        self.inner.lock().unwrap().mem = mem;
        Ok(())
    }
    fn handle_event(
        &self,
        device_event: u16,
        _evset: EventSet,
        vrings: &[Self::Vring],
        _thread_id: usize,
    ) -> io::Result<()> {
        let mut inner = self.inner.lock().unwrap();
        let index = device_event as usize;
        if index < self.num_queues {
            return self.process(&mut inner, index, vrings);
        }
        if u64::from(device_event) == self.host_token() {
            for q in inner.device.host_event() {
                self.process(&mut inner, q, vrings)?;
            }
        }
        Ok(())
    }
}

/// Turn a `-s` device string without its slot (`virtio-blk,./d.img,ro`)
/// into config node `pci.0.0.0`, with the legacy rules bhyve applies to the
/// virtio models: the first bare word is the block `path` / network
/// `backend`, `key=value` sets a key, a bare `key` sets it to true, and
/// virtio-console's `name=path` pairs become `port.N.name` / `port.N.path`.
pub fn device_tree(device: &str) -> Result<ConfigTree, String> {
    const NODE: &str = "pci.0.0.0";
    let mut parts = device.split(',');
    let model = parts.next().unwrap_or_default();
    let mut tree = ConfigTree::new();
    let set = |tree: &mut ConfigTree, k: &str, v: &str| {
        tree.set(&format!("{NODE}.{k}"), v)
            .map_err(|e| format!("{device}: {e}"))
    };
    set(&mut tree, "device", model)?;
    let mut port = 0;
    for (i, opt) in parts.enumerate() {
        if opt.is_empty() {
            continue;
        }
        match (model, opt.split_once('=')) {
            ("virtio-console", Some((name, path))) => {
                set(&mut tree, &format!("port.{port}.name"), name)?;
                set(&mut tree, &format!("port.{port}.path"), path)?;
                port += 1;
            }
            ("virtio-console", None) => return Err(format!("vtcon: port {opt} requires a path")),
            (_, Some((k, v))) => set(&mut tree, k, v)?,
            ("virtio-blk", None) if i == 0 => set(&mut tree, "path", opt)?,
            ("virtio-net", None) if i == 0 => set(&mut tree, "backend", opt)?,
            (_, None) => set(&mut tree, opt, "true")?,
        }
    }
    Ok(tree)
}

const USAGE: &str = "usage: rhyve-vhost-user --socket PATH DEVICE\n  DEVICE: a -s device string without the slot, e.g. virtio-blk,./disk.img,ro";

/// `rhyve-vhost-user --socket PATH DEVICE`: serve DEVICE on a vhost-user
/// socket rhyve creates at PATH, one front-end connection after another.
/// Returns the process exit status (bhyve's: 1 for bad usage, 4 for errors).
pub fn main_with_args(args: &[String]) -> i32 {
    let mut socket = None;
    let mut device = None;
    let mut it = args.iter().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--socket" => socket = it.next().cloned(),
            s if s.starts_with("--socket=") => socket = Some(s["--socket=".len()..].to_string()),
            "-h" | "--help" => {
                println!("{USAGE}");
                return 0;
            }
            s if device.is_none() && !s.starts_with('-') => device = Some(s.to_string()),
            s => {
                eprintln!("rhyve-vhost-user: unexpected argument \"{s}\"\n{USAGE}");
                return 1;
            }
        }
    }
    let (Some(socket), Some(device)) = (socket, device) else {
        eprintln!("{USAGE}");
        return 1;
    };
    let tree = match device_tree(&device) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("rhyve-vhost-user: {e}");
            return 1;
        }
    };
    let dev = match device_from_config(&tree, "pci.0.0.0", "vhostuser", 0, 0) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("rhyve-vhost-user: {e}");
            return 4;
        }
    };
    let backend = DeviceBackend::new(dev);
    loop {
        if let Err(e) = serve_once(&backend, &socket) {
            eprintln!("rhyve-vhost-user: {e}");
            return 4;
        }
        backend.reset_device();
    }
}

/// Serve one front-end connection on `socket`.
pub fn serve_once(backend: &DeviceBackend, socket: &str) -> Result<(), String> {
    let mem = GuestMemoryAtomic::new(GuestMemory::default());
    let mut daemon = VhostUserDaemon::new("rhyve-vhost-user".into(), backend.clone(), mem)
        .map_err(|e| format!("cannot start the vhost-user daemon: {e}"))?;
    let host_fd = backend.inner.lock().unwrap().device.host_fd();
    if let Some(fd) = host_fd {
        for handler in daemon.get_epoll_handlers() {
            handler
                .register_listener(
                    fd,
                    EventSet::IN | EventSet::EDGE_TRIGGERED,
                    backend.host_token(),
                )
                .map_err(|e| format!("cannot poll the device's host fd: {e}"))?;
        }
    }
    daemon.serve(socket).map_err(|e| format!("{socket}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_strings_become_keys() {
        let t = device_tree("virtio-blk,./d.img,ro,sectorsize=512/4096,ser=ABC").unwrap();
        assert_eq!(t.get_raw("pci.0.0.0.device"), Some("virtio-blk"));
        assert_eq!(t.get_raw("pci.0.0.0.path"), Some("./d.img"));
        assert_eq!(t.get_raw("pci.0.0.0.ro"), Some("true"));
        assert_eq!(t.get_raw("pci.0.0.0.sectorsize"), Some("512/4096"));
        let t = device_tree("virtio-net,tap0,mac=00:a0:98:00:00:01").unwrap();
        assert_eq!(t.get_raw("pci.0.0.0.backend"), Some("tap0"));
        let t = device_tree("virtio-console,port1=/tmp/s1,port2=/tmp/s2").unwrap();
        assert_eq!(t.get_raw("pci.0.0.0.port.1.name"), Some("port2"));
        assert_eq!(t.get_raw("pci.0.0.0.port.1.path"), Some("/tmp/s2"));
        assert!(device_tree("virtio-console,noport").is_err());
    }

    #[test]
    fn usage_errors() {
        let a = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(main_with_args(&a(&["x"])), 1);
        assert_eq!(main_with_args(&a(&["x", "--socket", "/tmp/s"])), 1);
        assert_eq!(
            main_with_args(&a(&[
                "x",
                "--socket",
                "/tmp/s",
                "virtio-blk,/nonexistent/x"
            ])),
            4
        );
        assert_eq!(
            main_with_args(&a(&["x", "--socket", "/tmp/s", "virtio-foo"])),
            4
        );
    }
}
