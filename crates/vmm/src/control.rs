//! The control socket a running `bhyve` serves in its registry entry, for
//! `bhyvectl`: bhyve's kernel ioctls on a VM (suspend, get registers, stats,
//! NMI) become requests to the process that owns the VM on Linux.
//!
//! Protocol: one request line (`reset`, `poweroff`, `destroy`, `stats N`,
//! `regs N`, `nmi N`), answered by zero or more `name<TAB>value` lines and a
//! last line `ok` or `error <message>`.

use rhyve_sandbox::ThreadRole;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

use rhyve_platform::exit::{ExitRequest, ExitRequests};
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use crate::vcpu::{VcpuRequest, VcpuShared};

/// How long a request waits for a vCPU thread to answer.
const VCPU_ANSWER_TIMEOUT: Duration = Duration::from_secs(5);

pub struct ControlServer {
    pub shared: Arc<VcpuShared>,
    pub exits: Arc<ExitRequests>,
    pub memory: GuestMemoryMmap,
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
    /// Serve requests on `path` from a background thread for the life of the process.
    pub fn spawn(self, path: &Path) -> std::io::Result<()> {
        let _ = std::fs::remove_file(path);
        let listener = UnixListener::bind(path)?;
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
        let mut line = String::new();
        BufReader::new(std::io::Read::take(&stream, 256)).read_line(&mut line)?;
        let mut out = &stream;
        match self.handle(line.trim()) {
            Ok(lines) => {
                for (name, value) in lines {
                    writeln!(out, "{name}\t{value}")?;
                }
                writeln!(out, "ok")
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

    fn handle(&self, request: &str) -> Result<Vec<(String, String)>, String> {
        let mut words = request.split_whitespace();
        let command = words.next().unwrap_or("");
        let arg = words.next();
        match command {
            "reset" => self.exits.request(ExitRequest::Reset),
            "poweroff" => self.exits.request(ExitRequest::PowerOff),
            "destroy" => self.exits.request(ExitRequest::Error(
                "the VM was destroyed (bhyvectl --destroy)".into(),
            )),
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
                return Ok(lines);
            }
            "regs" => {
                let cpu = self.cpu(arg)?;
                let (tx, rx) = mpsc::channel();
                self.shared.send(cpu, VcpuRequest::Registers(tx));
                let regs = rx
                    .recv_timeout(VCPU_ANSWER_TIMEOUT)
                    .map_err(|_| format!("vcpu {cpu} did not answer"))??;
                return Ok(regs
                    .into_iter()
                    .map(|(k, v)| (k.to_string(), format!("{v:#x}")))
                    .collect());
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
        Ok(Vec::new())
    }
}

/// A client: send `request` to the bhyve serving `socket`; the value lines,
/// or the server's error.
pub fn request(socket: &Path, request: &str) -> Result<Vec<(String, String)>, String> {
    // A VM is marked running as soon as its bhyve holds the entry, a moment
    // before the socket is up: wait for it briefly.
    let deadline = std::time::Instant::now() + Duration::from_secs(3);
    let mut stream = loop {
        match UnixStream::connect(socket) {
            Ok(s) => break s,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
                ) && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => return Err(format!("cannot reach the VM: {e}")),
        }
    };
    stream
        .set_read_timeout(Some(Duration::from_secs(15)))
        .map_err(|e| e.to_string())?;
    writeln!(stream, "{request}").map_err(|e| e.to_string())?;
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
