//! The control socket a running `bhyve` serves in its registry entry, for
//! `bhyvectl`: bhyve's kernel ioctls on a VM (suspend, get registers, stats,
//! NMI) become requests to the process that owns the VM on Linux.
//!
//! Protocol: one request line (`reset`, `poweroff`, `stats N`, `regs N`,
//! `nmi N`, `checkpoint`, `suspend`), answered by zero or more
//! `name<TAB>value` lines and a last line `ok` or `error <message>`.
//! `checkpoint` and `suspend` come with the three snapshot files' open
//! descriptors (memory, kern, meta) attached to the request (SCM_RIGHTS),
//! so the sandboxed VM writes only the files bhyvectl created. A request that ends the VM is carried out after
//! the answer is sent, so the process exiting never cuts the answer off.
//! (`--destroy` does not come this way: see the registry's `destroy` marker,
//! which also reaches a bhyve that is still starting.)

use rhyve_sandbox::ThreadRole;
use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

use rhyve_hypervisor::registry::{Registry, VmHandle};
use rhyve_platform::exit::{ExitRequest, ExitRequests};
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use crate::snapshot::{SnapshotFiles, Snapshotter};
use crate::vcpu::{VcpuRequest, VcpuShared};
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

/// How long a request waits for a vCPU thread to answer.
const VCPU_ANSWER_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a client waits for the socket of a VM that is still starting
/// (building the machine can take a while on a loaded host).
const STARTING_VM_TIMEOUT: Duration = Duration::from_secs(60);

/// What a request asks for: value lines to answer, and maybe a way to end the VM.
type Answer = (Vec<(String, String)>, Option<ExitRequest>);

pub struct ControlServer {
    pub shared: Arc<VcpuShared>,
    pub exits: Arc<ExitRequests>,
    pub memory: GuestMemoryMmap,
    pub snapshots: Snapshotter,
}

/// Longest request line.
const MAX_REQUEST: usize = 256;

/// Read one request line and the descriptors sent with it.
fn read_request(stream: &UnixStream) -> std::io::Result<(String, Vec<File>)> {
    let mut buf = vec![0u8; MAX_REQUEST];
    let mut fds: [RawFd; 3] = [-1; 3];
    let mut iov = [libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    }];
    // SAFETY: `iov` describes `buf`, which outlives the call.
    let (len, nfds) = unsafe { stream.recv_with_fds(&mut iov, &mut fds) }
        .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))?;
    // SAFETY: the first `nfds` entries are descriptors the kernel just
    // gave this process; each is owned by exactly one File.
    let files = fds[..nfds]
        .iter()
        .map(|&fd| unsafe { File::from_raw_fd(fd) })
        .collect();
    buf.truncate(len);
    // The rest of a line split over several reads.
    if !buf.contains(&b'\n') {
        let mut rest = String::new();
        BufReader::new(std::io::Read::take(stream, (MAX_REQUEST - len) as u64))
            .read_line(&mut rest)?;
        buf.extend_from_slice(rest.as_bytes());
    }
    Ok((String::from_utf8_lossy(&buf).into_owned(), files))
}

/// Bytes of guest memory resident in host RAM (bhyve's "Resident memory").
fn resident_bytes(memory: &GuestMemoryMmap) -> u64 {
    let page = 4096usize;
    let mut total = 0u64;
    for region in memory.iter() {
        let len = region.len() as usize;
        let pages = len.div_ceil(page);
        let mut vec = vec![0u8; pages];
        // SAFETY: the region is a live mapping of `len` bytes; `vec` has
        // one byte per page as mincore(2) requires.
        let rc =
            unsafe { libc::mincore(region.as_ptr() as *mut libc::c_void, len, vec.as_mut_ptr()) };
        if rc == 0 {
            total += vec.iter().filter(|b| *b & 1 != 0).count() as u64 * page as u64;
        }
    }
    total
}

impl ControlServer {
    /// Serve requests on `named`'s control socket from a background thread
    /// for the life of the process.
    pub fn spawn(self, named: &VmHandle) -> std::io::Result<()> {
        let listener: UnixListener = named.bind_control()?;
        let server = Arc::new(self);
        rhyve_sandbox::spawn(ThreadRole::Control, "control", move || {
            for stream in listener.incoming().flatten() {
                if let Err(e) = server.serve(stream) {
                    tracing::debug!("control connection: {e}");
                }
            }
        })?;
        Ok(())
    }

    fn serve(&self, stream: UnixStream) -> std::io::Result<()> {
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        let (line, files) = read_request(&stream)?;
        let mut out = &stream;
        match self.handle(line.trim(), files) {
            Ok((lines, end)) => {
                let mut reply = String::new();
                for (name, value) in lines {
                    reply.push_str(&format!("{name}\t{value}\n"));
                }
                reply.push_str("ok\n");
                let sent = out.write_all(reply.as_bytes());
                // Asked for even if the client is gone: the operator wanted it.
                if let Some(why) = end {
                    self.exits.request(why);
                }
                sent
            }
            Err(e) => writeln!(out, "error {e}"),
        }
    }

    fn cpu(&self, arg: Option<&str>) -> Result<usize, String> {
        let cpu: usize = arg
            .unwrap_or("0")
            .parse()
            .map_err(|_| "bad vcpu number".to_string())?;
        if cpu >= self.shared.cpus() {
            return Err(format!("no vcpu {cpu}"));
        }
        Ok(cpu)
    }

    /// `checkpoint` (the VM runs on) or `suspend` (it ends, exit 0).
    fn snapshot(&self, files: Vec<File>, stop: bool) -> Result<Answer, String> {
        let [memory, kern, meta]: [File; 3] = files
            .try_into()
            .map_err(|_| "a snapshot request needs its three files".to_string())?;
        let files = SnapshotFiles { memory, kern, meta };
        self.snapshots.save(&files)?;
        if stop {
            // The vCPUs stay parked until the VM ends.
            return Ok((Vec::new(), Some(ExitRequest::Suspended)));
        }
        self.snapshots.resume();
        Ok((Vec::new(), None))
    }

    fn handle(&self, request: &str, files: Vec<File>) -> Result<Answer, String> {
        let mut words = request.split_whitespace();
        let command = words.next().unwrap_or("");
        let arg = words.next();
        match command {
            "checkpoint" => return self.snapshot(files, false),
            "suspend" => return self.snapshot(files, true),
            "reset" => return Ok((Vec::new(), Some(ExitRequest::Reset))),
            "poweroff" => return Ok((Vec::new(), Some(ExitRequest::PowerOff))),
            "stats" => {
                let cpu = self.cpu(arg)?;
                let mut lines: Vec<(String, String)> = self
                    .shared
                    .counters(cpu)
                    .map(|c| c.snapshot())
                    .unwrap_or_default()
                    .into_iter()
                    .map(|(k, v)| (k, v.to_string()))
                    .collect();
                lines.push((
                    "Resident memory".into(),
                    resident_bytes(&self.memory).to_string(),
                ));
                return Ok((lines, None));
            }
            "regs" => {
                let cpu = self.cpu(arg)?;
                let (tx, rx) = mpsc::channel();
                self.shared.send(cpu, VcpuRequest::Registers(tx));
                let regs = rx
                    .recv_timeout(VCPU_ANSWER_TIMEOUT)
                    .map_err(|_| format!("vcpu {cpu} did not answer"))??;
                let lines = regs
                    .into_iter()
                    .map(|(k, v)| (k.to_string(), format!("{v:#x}")))
                    .collect();
                return Ok((lines, None));
            }
            "nmi" => {
                let cpu = self.cpu(arg)?;
                let (tx, rx) = mpsc::channel();
                self.shared.send(cpu, VcpuRequest::Nmi(tx));
                rx.recv_timeout(VCPU_ANSWER_TIMEOUT)
                    .map_err(|_| format!("vcpu {cpu} did not answer"))??;
            }
            other => return Err(format!("unknown request \"{other}\"")),
        }
        Ok((Vec::new(), None))
    }
}

/// A client: send `request` to the bhyve running `name`; the value lines,
/// or the server's error.
pub fn request(
    registry: &Registry,
    name: &str,
    request: &str,
) -> Result<Vec<(String, String)>, String> {
    request_with_files(registry, name, request, &[])
}

/// [`request`], with `files`' descriptors attached to the request line.
pub fn request_with_files(
    registry: &Registry,
    name: &str,
    request: &str,
    files: &[&File],
) -> Result<Vec<(String, String)>, String> {
    // A VM is marked running as soon as its bhyve holds the entry, before
    // it has built the machine and opened the socket: wait while it starts.
    let deadline = std::time::Instant::now() + STARTING_VM_TIMEOUT;
    let stream = loop {
        match registry.connect_control(name) {
            Ok(s) => break s,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
                ) && std::time::Instant::now() < deadline =>
            {
                if !registry.in_use(name) {
                    return Err(format!("VM {name} is not running"));
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => return Err(format!("cannot reach the VM: {e}")),
        }
    };
    // A snapshot writes all of guest memory before it answers.
    let answer_timeout = if files.is_empty() { 15 } else { 600 };
    stream
        .set_read_timeout(Some(Duration::from_secs(answer_timeout)))
        .map_err(|e| e.to_string())?;
    let fds: Vec<RawFd> = files.iter().map(|f| f.as_raw_fd()).collect();
    let line = format!("{request}\n");
    stream
        .send_with_fds(&[line.as_bytes()], &fds)
        .map_err(|e| format!("cannot send the request: {e}"))?;
    let mut lines = Vec::new();
    for line in BufReader::new(stream).lines() {
        let line = line.map_err(|e| e.to_string())?;
        if line == "ok" {
            return Ok(lines);
        }
        if let Some(e) = line.strip_prefix("error ") {
            return Err(e.to_string());
        }
        if let Some((k, v)) = line.split_once('\t') {
            lines.push((k.to_string(), v.to_string()));
        }
    }
    Err("the VM closed the connection".into())
}
