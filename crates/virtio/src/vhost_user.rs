//! The same devices served over vhost-user (`rhyve-vhost-user --socket PATH
//! DEVICE`), so QEMU, Cloud Hypervisor or user-mode-linux drive them.
//!
//! rust-vmm's `vhost-user-backend` runs the protocol, maps the front-end's
//! memory and owns the vrings; [`DeviceBackend`] only forwards: queue kicks
//! and the device's host fd (registered edge-triggered on the vring epoll
//! loop) become `process_queue` calls on the one device implementation, and
//! a `true` result becomes a call-fd signal. The public socket is ours: each
//! front-end connection is relayed to the daemon's private socket so that a
//! known front-end quirk can be absorbed (see [`relay`]).

use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::DirBuilderExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rhyve_config::ConfigTree;
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VhostUserBackend, VhostUserDaemon, VringRwLock, VringT};
use virtio_queue::QueueT;
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic};
use vmm_sys_util::epoll::EventSet;

use crate::{device_from_config, GuestMemory, VirtioDevice};

type Mem = GuestMemoryAtomic<GuestMemory>;

/// Largest ring a vhost-user front-end may set up.
const VHOST_USER_MAX_QUEUE_SIZE: u16 = 1024;

struct Inner {
    device: Box<dyn VirtioDevice>,
    mem: Mem,
    /// The device stopped on a fatal queue error until the front-end resets it.
    broken: bool,
    /// The back-end request channel, held open: user-mode-linux takes its
    /// closing as the back-end going away and unplugs the device.
    backend_channel: Option<vhost::vhost_user::Backend>,
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
            // Front-ends pick their ring sizes (user-mode-linux uses 256);
            // the PCI transport's smaller bhyve sizes are no limit here.
            max_queue_size: sizes
                .iter()
                .copied()
                .max()
                .unwrap_or(0)
                .max(VHOST_USER_MAX_QUEUE_SIZE) as usize,
            inner: Arc::new(Mutex::new(Inner {
                device,
                mem: GuestMemoryAtomic::new(GuestMemory::default()),
                broken: false,
                backend_channel: None,
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
        // BACKEND_REQ although we never send requests: user-mode-linux 6.1
        // allocates its virtqueue interrupt only when that channel exists.
        VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::BACKEND_REQ
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
    fn set_backend_req_fd(&self, channel: vhost::vhost_user::Backend) {
        self.inner.lock().unwrap().backend_channel = Some(channel);
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
/// into config node `pci.0.0.0`, with the config crate's bhyve(8) parser
/// (so the legacy option rules are bhyve's, in one place).
pub fn device_tree(device: &str) -> Result<ConfigTree, String> {
    let args = [
        "-s".to_string(),
        format!("0:0,{device}"),
        "vhostuser".to_string(),
    ];
    rhyve_config::parse_bhyve_args(&args)
        .map(|inv| inv.tree)
        .map_err(|e| e.render("rhyve-vhost-user").trim_end().to_string())
}

const USAGE: &str = "usage: rhyve-vhost-user --socket PATH DEVICE\n  DEVICE: a -s device string without the slot, e.g. virtio-blk,./disk.img,ro";

/// `rhyve-vhost-user --socket PATH DEVICE`: serve DEVICE on a vhost-user
/// socket rhyve creates at PATH, one front-end connection after another.
/// `args` are the command's arguments after its name. Returns the process
/// exit status (bhyve's: 1 for bad usage, 4 for errors).
pub fn main_with_args(args: &[String]) -> i32 {
    let mut socket = None;
    let mut device = None;
    let mut it = args.iter();
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
    if let Err(e) = clear_stale_socket(Path::new(&socket)) {
        eprintln!("rhyve-vhost-user: {socket}: {e}");
        return 4;
    }
    let listener = match UnixListener::bind(&socket) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("rhyve-vhost-user: {socket}: {e}");
            return 4;
        }
    };
    tracing::info!("serving {device} on {socket}");
    loop {
        if let Err(e) = serve_once(&backend, &listener) {
            eprintln!("rhyve-vhost-user: {e}");
            return 4;
        }
        backend.reset_device();
    }
}

/// Make way for a new listening socket at `path`: nothing there is fine; a
/// socket nobody listens on any more (left by a killed server) is removed;
/// anything else (a disk image given by mistake, a live server's socket, a
/// symbolic link) is refused and left alone.
pub fn clear_stale_socket(path: &Path) -> Result<(), String> {
    use std::os::unix::fs::FileTypeExt;
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e.to_string()),
    };
    if !meta.file_type().is_socket() {
        return Err("exists and is not a socket: refusing to replace it".into());
    }
    match UnixStream::connect(path) {
        Ok(_) => Err("a server is already listening on this socket".into()),
        Err(e) if e.raw_os_error() == Some(libc::ECONNREFUSED) => {
            std::fs::remove_file(path).map_err(|e| format!("cannot remove the stale socket: {e}"))
        }
        Err(e) => Err(format!("cannot tell whether the socket is in use: {e}")),
    }
}

/// Serve one front-end connection accepted on `listener`: the vhost-user
/// daemon listens on a private socket and [`relay`] joins the two.
pub fn serve_once(backend: &DeviceBackend, listener: &UnixListener) -> Result<(), String> {
    let (front, _) = listener
        .accept()
        .map_err(|e| format!("cannot accept a front-end: {e}"))?;
    let dir =
        private_dir().map_err(|e| format!("cannot create a private socket directory: {e}"))?;
    let inner_path = dir.join("backend.sock");
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
    let path = inner_path.clone();
    let server = std::thread::spawn(move || daemon.serve(&path).map_err(|e| e.to_string()));
    let back = connect_retrying(&inner_path);
    let _ = std::fs::remove_dir_all(&dir);
    let back = back.map_err(|e| format!("cannot reach the vhost-user daemon: {e}"))?;
    relay(front, back);
    server
        .join()
        .map_err(|_| "the vhost-user daemon thread panicked".to_string())?
}

/// A fresh directory only this process can use, for the daemon's socket.
fn private_dir() -> io::Result<PathBuf> {
    static SERIAL: AtomicU64 = AtomicU64::new(0);
    let dir = std::env::temp_dir().join(format!(
        "rhyve-vhost-user.{}.{}",
        std::process::id(),
        SERIAL.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::DirBuilder::new().mode(0o700).create(&dir)?;
    Ok(dir)
}

fn connect_retrying(path: &Path) -> io::Result<UnixStream> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match UnixStream::connect(path) {
            Ok(s) => return Ok(s),
            Err(e) if Instant::now() >= deadline => return Err(e),
            Err(_) => std::thread::sleep(Duration::from_millis(5)),
        }
    }
}

/// vhost-user message header: request, flags, payload size.
const HEADER_LEN: usize = 12;
/// Largest payload relayed (the protocol's own limit is 4 KiB plus headers).
const MAX_PAYLOAD: usize = 64 * 1024;
const SET_MEM_TABLE: u32 = 5;
/// Sizes of VhostUserMemory's header and of one region.
const MEM_TABLE_HEADER: usize = 8;
const MEM_REGION: usize = 32;

/// Copy the front-end's messages to the daemon (with their fds) and the
/// daemon's replies back, until either side hangs up.
///
/// user-mode-linux's virtio_uml sends SET_MEM_TABLE with room for two
/// regions even when it describes one; vhost 0.18 refuses a payload longer
/// than its region count says, so the relay trims that message. Nothing else
/// is changed.
fn relay(front: UnixStream, back: UnixStream) {
    let (Ok(front2), Ok(back2)) = (front.try_clone(), back.try_clone()) else {
        return;
    };
    let replies = std::thread::spawn(move || {
        let mut from = back2;
        let mut to = front2;
        let _ = io::copy(&mut from, &mut to);
        let _ = to.shutdown(Shutdown::Both);
    });
    if let Err(e) = relay_requests(&front, &back) {
        tracing::debug!("vhost-user front-end connection ended: {e}");
    }
    let _ = back.shutdown(Shutdown::Both);
    let _ = front.shutdown(Shutdown::Both);
    let _ = replies.join();
}

fn relay_requests(front: &UnixStream, back: &UnixStream) -> io::Result<()> {
    let mut payload = vec![0u8; MAX_PAYLOAD];
    loop {
        let mut header = [0u8; HEADER_LEN];
        let fds = recv_with_fds(front, &mut header)?;
        let request = u32::from_le_bytes(header[0..4].try_into().unwrap());
        let mut size = u32::from_le_bytes(header[8..12].try_into().unwrap()) as usize;
        if size > MAX_PAYLOAD {
            return Err(io::Error::other(format!(
                "oversized message ({size} bytes)"
            )));
        }
        (&*front).read_exact(&mut payload[..size])?;
        if request == SET_MEM_TABLE && size >= MEM_TABLE_HEADER {
            let regions = u32::from_le_bytes(payload[0..4].try_into().unwrap()) as usize;
            let exact = regions
                .checked_mul(MEM_REGION)
                .and_then(|n| n.checked_add(MEM_TABLE_HEADER));
            if let Some(exact) = exact.filter(|&e| e < size) {
                size = exact;
                header[8..12].copy_from_slice(&(size as u32).to_le_bytes());
            }
        }
        let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
        send_with_fds(back, &header, &payload[..size], &raw)?;
    }
}

/// Most fds one vhost-user message carries (VHOST_MEMORY_BASELINE_NREGIONS).
const MAX_FDS: usize = 8;

/// Fill `buf` from a stream socket, collecting fds passed with it.
fn recv_with_fds(sock: &UnixStream, buf: &mut [u8]) -> io::Result<Vec<OwnedFd>> {
    let mut fds = Vec::new();
    let mut got = 0;
    while got < buf.len() {
        // SAFETY: CMSG_SPACE is a pure size computation.
        let space = unsafe { libc::CMSG_SPACE((MAX_FDS * std::mem::size_of::<RawFd>()) as u32) };
        let mut cmsg = vec![0u64; (space as usize).div_ceil(8)];
        let mut iov = libc::iovec {
            iov_base: buf[got..].as_mut_ptr() as *mut libc::c_void,
            iov_len: buf.len() - got,
        };
        // SAFETY: zeroed msghdr is a valid empty header; we fill the fields we use.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = cmsg.as_mut_ptr() as *mut libc::c_void;
        msg.msg_controllen = space as usize;
        // SAFETY: msg points at buffers that live across the call.
        let n = unsafe { libc::recvmsg(sock.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        // SAFETY: walking the control buffer the kernel filled, with its own macros.
        unsafe {
            let mut c = libc::CMSG_FIRSTHDR(&msg);
            while !c.is_null() {
                if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                    let data = libc::CMSG_DATA(c) as *const RawFd;
                    let count = ((*c).cmsg_len as usize - libc::CMSG_LEN(0) as usize)
                        / std::mem::size_of::<RawFd>();
                    for i in 0..count {
                        fds.push(OwnedFd::from_raw_fd(std::ptr::read_unaligned(data.add(i))));
                    }
                }
                c = libc::CMSG_NXTHDR(&msg, c);
            }
        }
        got += n as usize;
    }
    Ok(fds)
}

/// Send `header` + `payload` as one message, with `fds` attached.
fn send_with_fds(
    sock: &UnixStream,
    header: &[u8],
    payload: &[u8],
    fds: &[RawFd],
) -> io::Result<()> {
    let mut iov = [
        libc::iovec {
            iov_base: header.as_ptr() as *mut libc::c_void,
            iov_len: header.len(),
        },
        libc::iovec {
            iov_base: payload.as_ptr() as *mut libc::c_void,
            iov_len: payload.len(),
        },
    ];
    let fd_bytes = std::mem::size_of_val(fds);
    // SAFETY: pure size computations.
    let space = unsafe { libc::CMSG_SPACE(fd_bytes as u32) } as usize;
    let mut cmsg = vec![0u64; space.div_ceil(8)];
    // SAFETY: zeroed msghdr is a valid empty header.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = iov.as_mut_ptr();
    msg.msg_iovlen = if payload.is_empty() { 1 } else { 2 };
    if !fds.is_empty() {
        msg.msg_control = cmsg.as_mut_ptr() as *mut libc::c_void;
        msg.msg_controllen = space;
        // SAFETY: the control buffer has CMSG_SPACE(fd_bytes) bytes.
        unsafe {
            let c = libc::CMSG_FIRSTHDR(&msg);
            (*c).cmsg_level = libc::SOL_SOCKET;
            (*c).cmsg_type = libc::SCM_RIGHTS;
            (*c).cmsg_len = libc::CMSG_LEN(fd_bytes as u32) as usize;
            std::ptr::copy_nonoverlapping(
                fds.as_ptr(),
                libc::CMSG_DATA(c) as *mut RawFd,
                fds.len(),
            );
        }
    }
    let total = header.len() + payload.len();
    // SAFETY: msg points at buffers that live across the call.
    let n = unsafe { libc::sendmsg(sock.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let n = n as usize;
    if n < total {
        // The fds went with the first bytes; the rest is plain data.
        let mut rest = Vec::with_capacity(total - n);
        rest.extend_from_slice(header);
        rest.extend_from_slice(payload);
        (&*sock).write_all(&rest[n..])?;
    }
    Ok(())
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
        assert_eq!(main_with_args(&a(&[])), 1);
        assert_eq!(main_with_args(&a(&["--socket", "/tmp/s"])), 1);
        assert_eq!(main_with_args(&a(&["--help"])), 0);
        assert_eq!(
            main_with_args(&a(&["--socket", "/tmp/s", "virtio-blk,/nonexistent/x"])),
            4
        );
        // Unknown to bhyve: a usage error; known but not served here: an error.
        assert_eq!(main_with_args(&a(&["--socket", "/tmp/s", "virtio-foo"])), 1);
        assert_eq!(
            main_with_args(&a(&["--socket", "/tmp/s", "virtio-scsi,/dev/x"])),
            4
        );
    }
}
