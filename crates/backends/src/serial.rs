//! Host side of the emulated 16550 UARTs, chosen by `lpc.comN.path` the way
//! bhyve's `uart_backend.c` chooses it:
//!
//! * `stdio`: the terminal rhyve runs in. stdin is put in raw mode while the
//!   VM runs (only if it is a terminal) and restored on drop, at exit and on
//!   fatal signals. A missing, closed or non-terminal stdin is fine: the
//!   backend is then output-only (as in CI), and stdout may be a file
//!   (`-l com1,stdio >console.log` keeps a console log).
//! * `/dev/nmdmNA` (or `...B`): FreeBSD's null-modem pair. Linux has no nmdm,
//!   so rhyve opens a pseudo-terminal, uses the master as this side and puts
//!   a symlink at the peer path, so `cu -l /dev/nmdm0B` or `screen
//!   /dev/nmdm0B` attach as they do on FreeBSD. The pair is one process's:
//!   it is locked (flock(2) on `/dev/nmdmN.lock`, released by the kernel
//!   however the process ends) and a second VM on it is refused. The link
//!   points at `/proc/<pid>/fd/<fd>`, the pty slave this process holds at a
//!   high descriptor number, not at `/dev/pts/N`: when the process dies, even
//!   by SIGKILL, the link dangles instead of leading to whichever terminal
//!   the host hands out as `/dev/pts/N` next. The next owner of the pair
//!   replaces such a stale link; a clean exit removes link and lock file,
//!   and so does a small process forked for the pair once this one is gone
//!   however it ended, even when the sandbox keeps it from touching /dev.
//! * `tcp=ip:port` / `tcp=[ipv6]:port`: listen; one client at a time, a second
//!   one is told "Socket already connected" and dropped; output with no client
//!   is dropped, as bhyve does.
//! * any other path: a terminal device (bhyve's `uart_tty_backend`), put in
//!   raw mode. Anything else is refused before it is opened for writing, so
//!   a slip such as `-l com1,./disk.img` never appends console output to a
//!   file.
//!
//! Guest output never blocks a vCPU: bytes go into a bounded queue drained by a
//! writer thread, and are dropped (with a log line) when the consumer stops
//! reading. Guest input is read by one thread per backend into a bounded queue
//! that the UART model pulls from; the UART is told through a notifier so it
//! can raise its interrupt. Threads block in poll(2) on the data fd and an
//! eventfd, so dropping the backend stops them promptly.

use rhyve_sandbox::ThreadRole;
use std::collections::VecDeque;
use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::thread::JoinHandle;
use std::time::Duration;

use rhyve_config::file::file_kind;

/// Guest output buffered while the consumer is slow; more is dropped.
pub const OUTPUT_QUEUE_BYTES: usize = 64 * 1024;
/// Host input buffered ahead of the UART's FIFO; the reader waits when full.
pub const INPUT_QUEUE_BYTES: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum SerialError {
    #[error("serial backend \"{path}\": {why}")]
    Invalid { path: String, why: String },
    #[error("serial backend \"{path}\": {source}")]
    Io {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("serial backend \"stdio\" is already used by another port")]
    StdioInUse,
}

fn io_err(path: &str) -> impl FnOnce(io::Error) -> SerialError + '_ {
    move |source| SerialError::Io {
        path: path.to_string(),
        source,
    }
}

/// What `lpc.comN.path` asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SerialTarget {
    Stdio,
    NullModem {
        /// The side rhyve uses (given in the config).
        ours: PathBuf,
        /// The side a user attaches to; a symlink to the pty slave.
        peer: PathBuf,
        /// Locked by the process that owns the pair.
        lock: PathBuf,
    },
    Tcp(SocketAddr),
    /// A terminal device.
    Terminal(PathBuf),
}

impl SerialTarget {
    /// Classify a `lpc.comN.path` value.
    pub fn parse(value: &str) -> Result<Self, SerialError> {
        let invalid = |why: &str| SerialError::Invalid {
            path: value.to_string(),
            why: why.to_string(),
        };
        if value == "stdio" {
            return Ok(SerialTarget::Stdio);
        }
        if let Some(rest) = value.strip_prefix("tcp") {
            let addr = rest
                .strip_prefix('=')
                .ok_or_else(|| invalid("expected tcp=ip:port or tcp=[ipv6]:port"))?;
            let sock = if let Some(v6) = addr.strip_prefix('[') {
                let (ip, port) = v6
                    .split_once("]:")
                    .ok_or_else(|| invalid("expected tcp=[ipv6]:port"))?;
                let ip: std::net::Ipv6Addr = ip.parse().map_err(|_| invalid("bad IPv6 address"))?;
                let port: u16 = port.parse().map_err(|_| invalid("bad port"))?;
                SocketAddr::from((ip, port))
            } else {
                let (ip, port) = addr
                    .split_once(':')
                    .ok_or_else(|| invalid("expected tcp=ip:port"))?;
                let ip: std::net::Ipv4Addr = ip.parse().map_err(|_| invalid("bad IPv4 address"))?;
                let port: u16 = port.parse().map_err(|_| invalid("bad port"))?;
                SocketAddr::from((ip, port))
            };
            return Ok(SerialTarget::Tcp(sock));
        }
        if value.is_empty() {
            return Err(invalid("empty path"));
        }
        if let Some(unit) = value.strip_prefix("/dev/nmdm") {
            let (name, side) = unit.split_at(unit.len().saturating_sub(1));
            let peer_side = match side {
                "A" => "B",
                "B" => "A",
                _ => return Err(invalid("a null-modem path ends in A or B")),
            };
            if name.is_empty() || name.contains('/') {
                return Err(invalid("bad null-modem unit"));
            }
            return Ok(SerialTarget::NullModem {
                ours: PathBuf::from(value),
                peer: PathBuf::from(format!("/dev/nmdm{name}{peer_side}")),
                lock: PathBuf::from(format!("/dev/nmdm{name}.lock")),
            });
        }
        Ok(SerialTarget::Terminal(PathBuf::from(value)))
    }
}

// ---------------------------------------------------------------------------
// Process-wide cleanup: terminal modes, kept in statics so exit(3)
// (atexit) and fatal-signal handlers can undo them. Null-modem links and
// lock files are the pair's clean-up process's (spawn_null_modem_janitor).

struct SavedTerminal {
    fd: RawFd,
    termios: libc::termios,
}

static SAVED_TERMINALS: Mutex<Vec<SavedTerminal>> = Mutex::new(Vec::new());
static STDIO_TAKEN: AtomicBool = AtomicBool::new(false);
static CLEANUP_INSTALLED: OnceLock<()> = OnceLock::new();

/// Put the terminal back the way rhyve found it. Safe to call more than
/// once and from a signal handler (it only uses try_lock and tcsetattr(3)).
/// The VMM calls this on exit.
pub fn restore_terminal() {
    if let Ok(saved) = SAVED_TERMINALS.try_lock() {
        for t in saved.iter() {
            // SAFETY: plain syscall on an fd and a termios we saved ourselves.
            unsafe { libc::tcsetattr(t.fd, libc::TCSANOW, &t.termios) };
        }
    }
}

extern "C" fn restore_at_exit() {
    restore_terminal();
}

extern "C" fn restore_on_signal(sig: libc::c_int) {
    restore_terminal();
    // SAFETY: reset to the default action and re-raise so the process dies
    // with the signal it received, as it would have without us.
    unsafe {
        libc::signal(sig, libc::SIG_DFL);
        libc::raise(sig);
    }
}

/// Install atexit and fatal-signal hooks once. Signals that already have a
/// handler (e.g. SIGTERM once the VMM turned it into the power button) are
/// left alone; the VMM then calls [`restore_terminal`] itself.
fn install_cleanup_hooks() {
    CLEANUP_INSTALLED.get_or_init(|| {
        // SAFETY: registering plain extern "C" functions.
        unsafe {
            libc::atexit(restore_at_exit);
            for sig in [
                libc::SIGHUP,
                libc::SIGINT,
                libc::SIGQUIT,
                libc::SIGTERM,
                libc::SIGABRT,
            ] {
                let mut old: libc::sigaction = std::mem::zeroed();
                if libc::sigaction(sig, std::ptr::null(), &mut old) == 0
                    && old.sa_sigaction == libc::SIG_DFL
                {
                    libc::signal(
                        sig,
                        restore_on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t,
                    );
                }
            }
        }
    });
}

/// Switch a terminal to raw mode (cfmakeraw + CLOCAL, as bhyve's ttyopen),
/// remembering the old mode for [`restore_terminal`].
fn make_raw(fd: RawFd) -> io::Result<()> {
    // SAFETY: termios is plain data; tcgetattr fills it.
    let mut orig: libc::termios = unsafe { std::mem::zeroed() };
    if unsafe { libc::tcgetattr(fd, &mut orig) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let mut raw = orig;
    // SAFETY: cfmakeraw edits the struct in place.
    unsafe { libc::cfmakeraw(&mut raw) };
    raw.c_cflag |= libc::CLOCAL;
    install_cleanup_hooks();
    SAVED_TERMINALS
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(SavedTerminal { fd, termios: orig });
    if unsafe { libc::tcsetattr(fd, libc::TCSANOW, &raw) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn forget_terminal(fd: RawFd) {
    let mut saved = SAVED_TERMINALS.lock().unwrap_or_else(|e| e.into_inner());
    saved.retain(|t| {
        if t.fd == fd {
            // SAFETY: restoring a mode we saved for this fd.
            unsafe { libc::tcsetattr(t.fd, libc::TCSANOW, &t.termios) };
            false
        } else {
            true
        }
    });
}

fn is_tty(fd: RawFd) -> bool {
    // SAFETY: isatty only inspects the fd.
    unsafe { libc::isatty(fd) == 1 }
}

fn dup_fd(fd: RawFd) -> Option<File> {
    // SAFETY: F_DUPFD_CLOEXEC returns a new fd we own, or -1 if `fd` is closed.
    let new = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 3) };
    if new < 0 {
        None
    } else {
        // SAFETY: `new` is a fresh fd nobody else owns.
        Some(unsafe { File::from_raw_fd(new) })
    }
}

fn set_blocking(fd: RawFd) -> io::Result<()> {
    // SAFETY: F_GETFL/F_SETFL on an fd we own.
    unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFL);
        if flags < 0 || libc::fcntl(fd, libc::F_SETFL, flags & !libc::O_NONBLOCK) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Lowest descriptor number for the pty slave a null-modem link names.
/// Should the pid be reused after a SIGKILL, the new process would need a
/// terminal open at this very number for the stale link to reach it;
/// programs seldom have hundreds of files open.
const NULL_MODEM_SLAVE_MIN_FD: RawFd = 512;

/// `file` moved to a descriptor at or above [`NULL_MODEM_SLAVE_MIN_FD`],
/// or left where it is when the fd limit is lower than that.
fn move_to_high_fd(file: File) -> File {
    // SAFETY: F_DUPFD_CLOEXEC returns a new fd we own, or -1.
    let high = unsafe {
        libc::fcntl(
            file.as_raw_fd(),
            libc::F_DUPFD_CLOEXEC,
            NULL_MODEM_SLAVE_MIN_FD,
        )
    };
    if high < 0 {
        return file;
    }
    // SAFETY: `high` is a fresh fd nobody else owns; `file` closes on drop.
    unsafe { File::from_raw_fd(high) }
}

/// True for a link target rhyve puts at a null-modem peer path (today's
/// `/proc/<pid>/fd/<n>`, or `/dev/pts/<n>` from older versions).
fn is_null_modem_link(target: &Path) -> bool {
    let t = target.as_os_str().as_bytes();
    (t.starts_with(b"/proc/") && t.windows(4).any(|w| w == b"/fd/")) || t.starts_with(b"/dev/pts/")
}

/// Take the pair's lock file, exclusively and without waiting, and write our
/// pid into it. A pair locked by a live process is refused, naming it.
fn lock_null_modem(label: &str, path: &Path) -> Result<File, SerialError> {
    let err = io_err(label);
    // A dead owner's clean-up process holds the lock for a moment while it
    // removes the link (a VM restarted at once by vmrun.sh meets it).
    let patience = std::time::Instant::now() + std::time::Duration::from_secs(3);
    loop {
        // O_NOFOLLOW and the type check: the lock is only ever a regular
        // file of its own, never something a link points us at.
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .mode(0o644)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open(path)
            .map_err(|e| SerialError::Io {
                path: label.to_string(),
                source: io::Error::new(e.kind(), format!("lock file {}: {e}", path.display())),
            })?;
        let meta = file.metadata().map_err(io_err(label))?;
        if !meta.file_type().is_file() {
            return Err(SerialError::Invalid {
                path: label.to_string(),
                why: format!("lock file {} is {}", path.display(), file_kind(&meta)),
            });
        }
        // SAFETY: flock on an fd we own.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EWOULDBLOCK) {
                return Err(err(e));
            }
            let mut owner = String::new();
            let _ = (&file).take(32).read_to_string(&mut owner);
            let pid = owner.trim().parse::<u32>().ok();
            if !pid.is_some_and(process_alive) && std::time::Instant::now() < patience {
                std::thread::sleep(std::time::Duration::from_millis(20));
                continue;
            }
            let owner = match pid {
                Some(pid) => format!("process {pid}"),
                None => "another process".to_string(),
            };
            return Err(SerialError::Invalid {
                path: label.to_string(),
                why: format!(
                    "the null-modem pair is in use by {owner} (lock {})",
                    path.display()
                ),
            });
        }
        // The previous owner may have removed the file between our open and
        // our flock: then we locked an orphan, and must lock the file that
        // is at the path now.
        let current = std::fs::symlink_metadata(path);
        if current.is_ok_and(|c| c.ino() == meta.ino() && c.dev() == meta.dev()) {
            file.set_len(0).map_err(err)?;
            (&file)
                .write_all(format!("{}\n", std::process::id()).as_bytes())
                .map_err(io_err(label))?;
            return Ok(file);
        }
    }
}

/// Whether process `pid` exists (signal 0 reaches it, or would but for
/// permissions).
fn process_alive(pid: u32) -> bool {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return false;
    };
    // SAFETY: signal 0 only checks the process exists.
    unsafe { libc::kill(pid, 0) == 0 || *libc::__errno_location() == libc::EPERM }
}

/// A null-modem pair this process owns: its locked lock file and, once
/// made, its peer link; both are removed on drop, and by the pair's
/// clean-up process once this process is gone, however it ends.
struct NullModemPair {
    lock_path: PathBuf,
    link: Option<PathBuf>,
    _lock_file: File,
}

impl NullModemPair {
    fn new(lock_path: &Path, lock_file: File) -> Self {
        NullModemPair {
            lock_path: lock_path.to_path_buf(),
            link: None,
            _lock_file: lock_file,
        }
    }

    fn set_link(&mut self, link: &Path) {
        self.link = Some(link.to_path_buf());
    }
}

impl Drop for NullModemPair {
    /// The link first, then the lock file while its lock is still held.
    fn drop(&mut self) {
        for p in self.link.iter().chain([&self.lock_path]) {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// Fork a small process that removes the pair's link and lock file once
/// this one is gone, however it ends (SIGKILL too), and although the
/// sandbox no longer lets this process remove files in /dev. It waits for
/// end-of-file on a pipe whose write end only this process holds, then takes
/// the pair's lock, so that it never touches a newer owner's pair, and
/// removes the link if it still points where ours did, then the lock file.
/// Forked while the VM is being built, before any confinement, so it is
/// free to do that; it keeps no descriptor but its pipe.
fn spawn_null_modem_janitor(lock_path: &Path, link: &Path, target: &str) -> io::Result<()> {
    let lock_c = CString::new(lock_path.as_os_str().as_bytes())?;
    let link_c = CString::new(link.as_os_str().as_bytes())?;
    let target = target.as_bytes().to_vec();
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills the two descriptors it creates.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let (read_end, write_end) = (fds[0], fds[1]);
    // SAFETY: the child only makes async-signal-safe system calls on memory
    // prepared before the fork, then _exits.
    match unsafe { libc::fork() } {
        -1 => {
            let e = io::Error::last_os_error();
            // SAFETY: closing the pipe we made.
            unsafe {
                libc::close(read_end);
                libc::close(write_end);
            }
            Err(e)
        }
        // SAFETY: see above.
        0 => unsafe { null_modem_janitor(read_end, &lock_c, &link_c, &target) },
        _ => {
            // The write end stays open, unused, for the rest of this
            // process's life: its closing is the signal.
            // SAFETY: closing the child's end in the parent.
            unsafe { libc::close(read_end) };
            Ok(())
        }
    }
}

/// The janitor's whole life (see [`spawn_null_modem_janitor`]).
///
/// # Safety
/// Only in the child of fork(2): async-signal-safe calls only.
unsafe fn null_modem_janitor(pipe: RawFd, lock: &CString, link: &CString, target: &[u8]) -> ! {
    libc::setsid();
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP, libc::SIGQUIT] {
        let mut ignore: libc::sigaction = std::mem::zeroed();
        ignore.sa_sigaction = libc::SIG_IGN;
        libc::sigaction(sig, &ignore, std::ptr::null_mut());
    }
    // Every descriptor but the pipe's read end: the VM's, the other pipes'
    // write ends, the lock's (whose flock must end with its owner).
    if pipe > 0 {
        libc::syscall(libc::SYS_close_range, 0u32, (pipe - 1) as u32, 0u32);
    }
    libc::syscall(libc::SYS_close_range, (pipe + 1) as u32, u32::MAX, 0u32);
    let mut byte = 0u8;
    loop {
        let n = libc::read(pipe, (&mut byte as *mut u8).cast(), 1);
        if n < 0 && *libc::__errno_location() == libc::EINTR {
            continue;
        }
        if n <= 0 {
            break;
        }
    }
    let fd = libc::open(
        lock.as_ptr(),
        libc::O_RDWR | libc::O_NOFOLLOW | libc::O_CLOEXEC,
    );
    if fd >= 0 && libc::flock(fd, libc::LOCK_EX | libc::LOCK_NB) == 0 {
        let mut buf = [0u8; 128];
        let n = libc::readlink(link.as_ptr(), buf.as_mut_ptr().cast(), buf.len());
        if n >= 0 && buf[..n as usize] == *target {
            libc::unlink(link.as_ptr());
        }
        libc::unlink(lock.as_ptr());
    }
    libc::_exit(0)
}

// ---------------------------------------------------------------------------
// Queues shared between the vCPU side and the I/O threads.

#[derive(Default)]
struct OutputQueue {
    bytes: VecDeque<u8>,
    /// The writer thread holds a chunk it has not finished writing.
    in_flight: bool,
    dropped_total: u64,
    /// Inside an episode of dropping (logged once per episode).
    dropping: bool,
    stopping: bool,
}

#[derive(Default)]
struct InputQueue {
    bytes: VecDeque<u8>,
    stopping: bool,
}

type Notifier = Box<dyn Fn() + Send + Sync>;

struct Shared {
    label: String,
    output: Mutex<OutputQueue>,
    /// Wakes the writer thread: output queued or shutdown.
    output_ready: Condvar,
    /// Wakes drain_output(): everything queued was written.
    output_drained: Condvar,
    input: Mutex<InputQueue>,
    input_room: Condvar,
    notifier: Mutex<Option<Notifier>>,
    /// Where output goes right now (None: drop it, e.g. no TCP client).
    sink: Mutex<Option<Arc<File>>>,
    /// eventfd that wakes the poll(2) loops on shutdown.
    stop_fd: OwnedFd,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Shared {
    fn stopping(&self) -> bool {
        lock(&self.input).stopping
    }

    /// Queue input bytes for the UART, waiting while the queue is full.
    /// Returns false when the backend is shutting down.
    fn push_input(&self, mut data: &[u8]) -> bool {
        while !data.is_empty() {
            let mut q = lock(&self.input);
            while q.bytes.len() >= INPUT_QUEUE_BYTES && !q.stopping {
                q = self.input_room.wait(q).unwrap_or_else(|e| e.into_inner());
            }
            if q.stopping {
                return false;
            }
            let room = INPUT_QUEUE_BYTES - q.bytes.len();
            let n = room.min(data.len());
            q.bytes.extend(&data[..n]);
            data = &data[n..];
            drop(q);
            if let Some(notify) = lock(&self.notifier).as_ref() {
                notify();
            }
        }
        true
    }

    fn set_sink(&self, sink: Option<Arc<File>>) {
        *lock(&self.sink) = sink;
    }
}

/// A host endpoint for one COM port.
pub struct SerialBackend {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
    /// Terminal fds we switched to raw mode and must restore.
    raw_fds: Vec<RawFd>,
    null_modem: Option<NullModemPair>,
    is_stdio: bool,
    /// Keeps the pty slave open so the master never sees a hangup while no
    /// one is attached.
    _pty_slave: Option<File>,
    /// The files the threads use, kept alive for the fds in `raw_fds`.
    _files: Vec<Arc<File>>,
}

impl std::fmt::Debug for SerialBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SerialBackend")
            .field("label", &self.shared.label)
            .finish()
    }
}

impl SerialBackend {
    /// Open the backend a `lpc.comN.path` value names.
    pub fn open(value: &str) -> Result<Self, SerialError> {
        let target = SerialTarget::parse(value)?;
        let mut backend = Self::unopened(value)?;
        match target {
            SerialTarget::Stdio => backend.open_stdio()?,
            SerialTarget::NullModem { ours, peer, lock } => {
                backend.open_null_modem(&ours, &peer, &lock)?
            }
            SerialTarget::Tcp(addr) => backend.open_tcp(value, addr)?,
            SerialTarget::Terminal(path) => backend.open_terminal(value, &path)?,
        }
        Ok(backend)
    }

    /// A backend with its queues but no host endpoint yet.
    fn unopened(label: &str) -> Result<Self, SerialError> {
        // SAFETY: creating an eventfd has no preconditions.
        let efd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if efd < 0 {
            return Err(io_err(label)(io::Error::last_os_error()));
        }
        let shared = Arc::new(Shared {
            label: label.to_string(),
            output: Mutex::new(OutputQueue::default()),
            output_ready: Condvar::new(),
            output_drained: Condvar::new(),
            input: Mutex::new(InputQueue::default()),
            input_room: Condvar::new(),
            notifier: Mutex::new(None),
            sink: Mutex::new(None),
            // SAFETY: efd is a fresh fd we own.
            stop_fd: unsafe { OwnedFd::from_raw_fd(efd) },
        });
        Ok(SerialBackend {
            shared,
            threads: Vec::new(),
            raw_fds: Vec::new(),
            null_modem: None,
            is_stdio: false,
            _pty_slave: None,
            _files: Vec::new(),
        })
    }

    fn spawn(
        &mut self,
        what: &str,
        f: impl FnOnce(Arc<Shared>) + Send + 'static,
    ) -> Result<(), SerialError> {
        let shared = self.shared.clone();
        let handle =
            rhyve_sandbox::spawn(ThreadRole::SerialIo, format!("serial-{what}"), move || {
                f(shared)
            })
            .map_err(io_err(&self.shared.label))?;
        self.threads.push(handle);
        Ok(())
    }

    fn start_writer(&mut self) -> Result<(), SerialError> {
        self.spawn("out", writer_loop)
    }

    fn start_reader(&mut self, input: Arc<File>) -> Result<(), SerialError> {
        self.spawn("in", move |shared| reader_loop(shared, input))
    }

    fn open_stdio(&mut self) -> Result<(), SerialError> {
        if STDIO_TAKEN.swap(true, Ordering::SeqCst) {
            return Err(SerialError::StdioInUse);
        }
        self.is_stdio = true;
        // Duplicates, so closing ours never closes the process's stdio and
        // blocking writes on a thread need no O_NONBLOCK on a shared file.
        if let Some(out) = dup_fd(libc::STDOUT_FILENO) {
            let out = Arc::new(out);
            self._files.push(out.clone());
            self.shared.set_sink(Some(out));
        } else {
            tracing::info!("stdio serial: stdout is closed, guest output is dropped");
        }
        self.start_writer()?;
        if let Some(inp) = dup_fd(libc::STDIN_FILENO) {
            if is_tty(inp.as_raw_fd()) {
                match make_raw(inp.as_raw_fd()) {
                    Ok(()) => self.raw_fds.push(inp.as_raw_fd()),
                    Err(e) => tracing::warn!("stdio serial: cannot set raw mode: {e}"),
                }
            }
            let inp = Arc::new(inp);
            self._files.push(inp.clone());
            self.start_reader(inp)?;
        } else {
            tracing::info!("stdio serial: stdin is closed, output only");
        }
        Ok(())
    }

    fn open_null_modem(
        &mut self,
        ours: &Path,
        peer: &Path,
        lock_path: &Path,
    ) -> Result<(), SerialError> {
        let label = self.shared.label.clone();
        let err = io_err(&label);
        // Before anything else: the pair may be another VM's.
        let pair = NullModemPair::new(lock_path, lock_null_modem(&label, lock_path)?);
        let pair = self.null_modem.insert(pair);
        // SAFETY: posix_openpt returns a new fd or -1.
        let master = unsafe { libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC) };
        if master < 0 {
            return Err(err(io::Error::last_os_error()));
        }
        // SAFETY: master is a fresh fd we own.
        let master = unsafe { File::from_raw_fd(master) };
        let mut name = [0 as libc::c_char; 128];
        // SAFETY: calls on our pty master fd; ptsname_r writes at most name.len() bytes.
        let slave_path = unsafe {
            if libc::grantpt(master.as_raw_fd()) != 0
                || libc::unlockpt(master.as_raw_fd()) != 0
                || libc::ptsname_r(master.as_raw_fd(), name.as_mut_ptr(), name.len()) != 0
            {
                return Err(err(io::Error::last_os_error()));
            }
            std::ffi::CStr::from_ptr(name.as_ptr())
                .to_string_lossy()
                .into_owned()
        };
        let slave = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NOCTTY | libc::O_CLOEXEC)
            .open(&slave_path)
            .map_err(io_err(&label))?;
        let slave = move_to_high_fd(slave);
        // Raw line discipline on the pair, as bhyve puts its nmdm side in raw mode.
        make_raw(master.as_raw_fd()).map_err(io_err(&label))?;
        self.raw_fds.push(master.as_raw_fd());
        match std::fs::read_link(peer) {
            // We hold the lock, so a link rhyve made is a dead owner's.
            Ok(target) if is_null_modem_link(&target) => {
                std::fs::remove_file(peer).map_err(io_err(&label))?;
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Ok(_) | Err(_) => {
                return Err(SerialError::Invalid {
                    path: label.clone(),
                    why: format!("{} exists and is not a link rhyve made", peer.display()),
                })
            }
        }
        let target = format!("/proc/{}/fd/{}", std::process::id(), slave.as_raw_fd());
        std::os::unix::fs::symlink(&target, peer).map_err(|e| SerialError::Io {
            path: label.clone(),
            source: io::Error::new(e.kind(), format!("symlink {}: {e}", peer.display())),
        })?;
        pair.set_link(peer);
        if let Err(e) = spawn_null_modem_janitor(lock_path, peer, &target) {
            tracing::warn!("{label}: no clean-up process for {}: {e}", peer.display());
        }
        tracing::info!(
            "{}: null modem, attach to {} (-> {target} = {slave_path})",
            ours.display(),
            peer.display()
        );
        let master = Arc::new(master);
        self._files.push(master.clone());
        self._pty_slave = Some(slave);
        self.shared.set_sink(Some(master.clone()));
        self.start_writer()?;
        self.start_reader(master)
    }

    fn open_tcp(&mut self, label: &str, addr: SocketAddr) -> Result<(), SerialError> {
        let listener = TcpListener::bind(addr).map_err(io_err(label))?;
        self.start_writer()?;
        self.spawn("tcp", move |shared| tcp_loop(shared, listener))
    }

    /// bhyve's `uart_tty_backend`: a terminal and nothing else. The type is
    /// checked before the path is opened, so a regular file or another
    /// device is never opened read-write (opening some devices has effects
    /// of its own, a watchdog for one).
    fn open_terminal(&mut self, label: &str, path: &Path) -> Result<(), SerialError> {
        let not_a_terminal = |what: &str| SerialError::Invalid {
            path: label.to_string(),
            why: format!(
                "{what}, not a terminal (a console goes to stdio, tcp=ip:port, \
                 /dev/nmdmNA or a terminal device)"
            ),
        };
        let meta = std::fs::metadata(path).map_err(io_err(label))?;
        if !meta.file_type().is_char_device() {
            return Err(not_a_terminal(file_kind(&meta)));
        }
        // O_NONBLOCK as bhyve: a serial line without carrier would block the open.
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NOCTTY | libc::O_CLOEXEC | libc::O_NONBLOCK)
            .open(path)
            .map_err(io_err(label))?;
        if !is_tty(file.as_raw_fd()) {
            return Err(not_a_terminal("a character device"));
        }
        make_raw(file.as_raw_fd()).map_err(io_err(label))?;
        self.raw_fds.push(file.as_raw_fd());
        // CLOCAL is set now; the I/O threads want blocking reads and writes.
        set_blocking(file.as_raw_fd()).map_err(io_err(label))?;
        let file = Arc::new(file);
        self._files.push(file.clone());
        self.shared.set_sink(Some(file.clone()));
        self.start_writer()?;
        self.start_reader(file)
    }

    /// The `lpc.comN.path` value this backend was opened from.
    pub fn label(&self) -> &str {
        &self.shared.label
    }

    /// Called (from an I/O thread) whenever new input is queued.
    pub fn set_input_notifier(&self, notify: Box<dyn Fn() + Send + Sync>) {
        *lock(&self.shared.notifier) = Some(notify);
    }

    /// Queue guest output. Never blocks: with the queue full the bytes are
    /// dropped and counted.
    pub fn write(&self, data: &[u8]) {
        // Nobody to write to (no TCP client, stdout closed): bhyve drops
        // such output on the floor, it is not saved for a later client.
        if lock(&self.shared.sink).is_none() {
            return;
        }
        let mut q = lock(&self.shared.output);
        let room = OUTPUT_QUEUE_BYTES.saturating_sub(q.bytes.len());
        let n = room.min(data.len());
        q.bytes.extend(&data[..n]);
        if n < data.len() {
            if !q.dropping {
                q.dropping = true;
                tracing::warn!(
                    "serial {}: consumer is not reading, dropping guest output",
                    self.shared.label
                );
            }
            q.dropped_total += (data.len() - n) as u64;
        }
        drop(q);
        self.shared.output_ready.notify_one();
    }

    /// Take up to `buf.len()` queued input bytes; returns how many.
    pub fn read(&self, buf: &mut [u8]) -> usize {
        let mut q = lock(&self.shared.input);
        let n = buf.len().min(q.bytes.len());
        for (slot, b) in buf.iter_mut().zip(q.bytes.drain(..n)) {
            *slot = b;
        }
        drop(q);
        if n > 0 {
            self.shared.input_room.notify_all();
        }
        n
    }

    /// True if input is waiting.
    pub fn has_input(&self) -> bool {
        !lock(&self.shared.input).bytes.is_empty()
    }

    /// Discard queued input (the guest reset its receive FIFO).
    pub fn flush_input(&self) {
        lock(&self.shared.input).bytes.clear();
        self.shared.input_room.notify_all();
    }

    /// Bytes of guest output dropped so far.
    pub fn dropped_output(&self) -> u64 {
        lock(&self.shared.output).dropped_total
    }

    /// Wait until queued output has been written to the host (or `timeout`
    /// passes); true if everything was written. Used on VM exit.
    pub fn drain_output(&self, timeout: Duration) -> bool {
        let deadline = std::time::Instant::now() + timeout;
        let mut q = lock(&self.shared.output);
        while !q.bytes.is_empty() || q.in_flight {
            let now = std::time::Instant::now();
            if now >= deadline {
                return false;
            }
            q = self
                .shared
                .output_drained
                .wait_timeout(q, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        true
    }
}

impl Drop for SerialBackend {
    fn drop(&mut self) {
        // Give pending output a moment to reach the host.
        self.drain_output(Duration::from_millis(200));
        lock(&self.shared.output).stopping = true;
        lock(&self.shared.input).stopping = true;
        self.shared.output_ready.notify_all();
        self.shared.input_room.notify_all();
        let one: u64 = 1;
        // SAFETY: writing 8 bytes from a u64 to our eventfd.
        unsafe {
            libc::write(
                self.shared.stop_fd.as_raw_fd(),
                &one as *const u64 as *const libc::c_void,
                8,
            )
        };
        for fd in self.raw_fds.drain(..) {
            forget_terminal(fd);
        }
        // The writer may be stuck in a blocking write to a consumer that
        // never reads; it holds only Arcs, so leave it rather than hang.
        for t in self.threads.drain(..) {
            if t.is_finished() {
                let _ = t.join();
            }
        }
        // Link and lock file go before the pty slave they lead to closes.
        self.null_modem = None;
        if self.is_stdio {
            STDIO_TAKEN.store(false, Ordering::SeqCst);
        }
    }
}

/// Wait until `fd` is readable or the backend stops. Returns false on stop.
fn wait_readable(shared: &Shared, fds: &[RawFd]) -> Option<usize> {
    let mut pfds: Vec<libc::pollfd> = fds
        .iter()
        .map(|&fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    pfds.push(libc::pollfd {
        fd: shared.stop_fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    });
    loop {
        // SAFETY: pfds is a valid array of pollfd for its length.
        let r = unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, -1) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            tracing::warn!("serial {}: poll: {e}", shared.label);
            return None;
        }
        if pfds.last().is_some_and(|p| p.revents != 0) || shared.stopping() {
            return None;
        }
        if let Some(i) = pfds.iter().position(|p| p.revents != 0) {
            return Some(i);
        }
    }
}

fn reader_loop(shared: Arc<Shared>, input: Arc<File>) {
    let mut buf = [0u8; 256];
    loop {
        if wait_readable(&shared, &[input.as_raw_fd()]).is_none() {
            return;
        }
        match (&*input).read(&mut buf) {
            Ok(0) => {
                tracing::debug!("serial {}: input closed", shared.label);
                return;
            }
            Ok(n) => {
                if !shared.push_input(&buf[..n]) {
                    return;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => {
                tracing::warn!("serial {}: read: {e}; input stops", shared.label);
                return;
            }
        }
    }
}

fn writer_loop(shared: Arc<Shared>) {
    let mut chunk = Vec::with_capacity(4096);
    loop {
        {
            let mut q = lock(&shared.output);
            while q.bytes.is_empty() && !q.stopping {
                q = shared
                    .output_ready
                    .wait(q)
                    .unwrap_or_else(|e| e.into_inner());
            }
            if q.bytes.is_empty() && q.stopping {
                return;
            }
            let n = q.bytes.len().min(4096);
            chunk.clear();
            chunk.extend(q.bytes.drain(..n));
            q.in_flight = true;
        }
        let sink = lock(&shared.sink).clone();
        if let Some(sink) = sink {
            if let Err(e) = (&*sink).write_all(&chunk) {
                tracing::warn!("serial {}: write: {e}; dropping output", shared.label);
                // A TCP client that went away: forget it so the next can attach.
                let mut cur = lock(&shared.sink);
                if cur.as_ref().is_some_and(|s| Arc::ptr_eq(s, &sink)) {
                    *cur = None;
                }
            }
        }
        let mut q = lock(&shared.output);
        q.in_flight = false;
        if q.bytes.is_empty() {
            // The episode of dropping (if any) is over; the next one logs.
            q.dropping = false;
            shared.output_drained.notify_all();
        }
    }
}

fn tcp_loop(shared: Arc<Shared>, listener: TcpListener) {
    let mut client: Option<Arc<File>> = None;
    let mut buf = [0u8; 256];
    loop {
        // A client the writer dropped after a write error is gone.
        if let Some(c) = &client {
            let still = lock(&shared.sink)
                .as_ref()
                .is_some_and(|s| Arc::ptr_eq(s, c));
            if !still {
                client = None;
            }
        }
        // The client comes first so a hangup is seen before a new
        // connection that arrived at the same time.
        let mut fds = Vec::with_capacity(2);
        if let Some(c) = &client {
            fds.push(c.as_raw_fd());
        }
        fds.push(listener.as_raw_fd());
        let Some(which) = wait_readable(&shared, &fds) else {
            return;
        };
        if fds[which] == listener.as_raw_fd() {
            match listener.accept() {
                Ok((mut stream, peer)) => {
                    if client.is_some() {
                        let _ = stream.write_all(b"Socket already connected\n");
                        continue;
                    }
                    tracing::info!("serial {}: client {peer} connected", shared.label);
                    let file = Arc::new(stream_into_file(stream));
                    shared.set_sink(Some(file.clone()));
                    client = Some(file);
                }
                Err(e) => tracing::warn!("serial {}: accept: {e}", shared.label),
            }
            continue;
        }
        let Some(c) = client.clone() else { continue };
        match (&*c).read(&mut buf) {
            Ok(0) | Err(_) => {
                tracing::info!("serial {}: client disconnected", shared.label);
                shared.set_sink(None);
                client = None;
            }
            Ok(n) => {
                if !shared.push_input(&buf[..n]) {
                    return;
                }
            }
        }
    }
}

fn stream_into_file(stream: TcpStream) -> File {
    File::from(OwnedFd::from(stream))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;
    use std::time::Instant;

    #[test]
    fn parses_bhyve_paths() {
        assert_eq!(SerialTarget::parse("stdio").unwrap(), SerialTarget::Stdio);
        assert_eq!(
            SerialTarget::parse("tcp=127.0.0.1:4444").unwrap(),
            SerialTarget::Tcp("127.0.0.1:4444".parse().unwrap())
        );
        assert_eq!(
            SerialTarget::parse("tcp=[::1]:4444").unwrap(),
            SerialTarget::Tcp("[::1]:4444".parse().unwrap())
        );
        assert_eq!(
            SerialTarget::parse("/dev/nmdm0A").unwrap(),
            SerialTarget::NullModem {
                ours: "/dev/nmdm0A".into(),
                peer: "/dev/nmdm0B".into(),
                lock: "/dev/nmdm0.lock".into(),
            }
        );
        assert_eq!(
            SerialTarget::parse("/dev/nmdm12B").unwrap(),
            SerialTarget::NullModem {
                ours: "/dev/nmdm12B".into(),
                peer: "/dev/nmdm12A".into(),
                lock: "/dev/nmdm12.lock".into(),
            }
        );
        assert_eq!(
            SerialTarget::parse("/dev/ttyS1").unwrap(),
            SerialTarget::Terminal("/dev/ttyS1".into())
        );
        for bad in [
            "tcp=",
            "tcp=localhost:1",
            "tcp=1.2.3.4",
            "tcp=[::1]:x",
            "",
            "/dev/nmdm0C",
        ] {
            assert!(SerialTarget::parse(bad).is_err(), "{bad}");
        }
    }

    fn wait_for(cond: impl Fn() -> bool) -> bool {
        let end = Instant::now() + Duration::from_secs(5);
        while Instant::now() < end {
            if cond() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        false
    }

    /// A fresh pseudo-terminal: the master and the slave's path.
    fn open_pty() -> (File, PathBuf) {
        // SAFETY: pty setup on fds we own; ptsname_r writes at most name.len() bytes.
        unsafe {
            let master = libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC);
            assert!(master >= 0);
            let master = File::from_raw_fd(master);
            let mut name = [0 as libc::c_char; 128];
            assert_eq!(libc::grantpt(master.as_raw_fd()), 0);
            assert_eq!(libc::unlockpt(master.as_raw_fd()), 0);
            assert_eq!(
                libc::ptsname_r(master.as_raw_fd(), name.as_mut_ptr(), name.len()),
                0
            );
            let path = std::ffi::CStr::from_ptr(name.as_ptr()).to_string_lossy();
            (master, PathBuf::from(path.into_owned()))
        }
    }

    fn scratch_dir(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("rhyve-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn a_path_must_be_a_terminal_and_anything_else_is_left_untouched() {
        let dir = scratch_dir("serial-paths");
        let disk = dir.join("linux.img");
        std::fs::write(&disk, b"guest disk").unwrap();
        let fifo = dir.join("fifo");
        let c = CString::new(fifo.as_os_str().as_bytes()).unwrap();
        // SAFETY: mkfifo on a path we own.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        for (path, why) in [
            (&disk, "a regular file, not a terminal"),
            (&fifo, "a FIFO, not a terminal"),
            (&dir, "a directory, not a terminal"),
            (
                &PathBuf::from("/dev/null"),
                "a character device, not a terminal",
            ),
        ] {
            let e = SerialBackend::open(path.to_str().unwrap()).unwrap_err();
            assert!(e.to_string().contains(why), "{}: {e}", path.display());
        }
        assert!(SerialBackend::open(dir.join("missing").to_str().unwrap()).is_err());
        assert_eq!(std::fs::read(&disk).unwrap(), b"guest disk");

        // A terminal works both ways.
        let (mut master, slave) = open_pty();
        let b = SerialBackend::open(slave.to_str().unwrap()).unwrap();
        b.write(b"hello");
        let mut got = [0u8; 5];
        master.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"hello");
        master.write_all(b"in").unwrap();
        assert!(wait_for(|| lock(&b.shared.input).bytes.len() == 2));
        drop(b);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn tcp_one_client_at_a_time() {
        // Find a free port.
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let b = SerialBackend::open(&format!("tcp=127.0.0.1:{port}")).unwrap();
        let (tx, rx) = mpsc::channel();
        b.set_input_notifier(Box::new(move || {
            let _ = tx.send(());
        }));
        // Output before any client is dropped silently.
        b.write(b"lost");
        let mut c1 = TcpStream::connect(("127.0.0.1", port)).unwrap();
        c1.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        c1.write_all(b"hi").unwrap();
        rx.recv_timeout(Duration::from_secs(5)).unwrap();
        let mut got = [0u8; 8];
        assert!(wait_for(|| b.has_input()));
        let n = b.read(&mut got);
        assert_eq!(&got[..n], b"hi");
        b.write(b"to-guest-client");
        let mut out = [0u8; 15];
        c1.read_exact(&mut out).unwrap();
        assert_eq!(&out, b"to-guest-client");

        let mut c2 = TcpStream::connect(("127.0.0.1", port)).unwrap();
        c2.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut msg = String::new();
        c2.read_to_string(&mut msg).unwrap();
        assert_eq!(msg, "Socket already connected\n");

        drop(c1);
        assert!(wait_for(|| lock(&b.shared.sink).is_none()), "hangup seen");
        b.write(b"dropped while nobody listens");
        // After the first client left, a new one is accepted.
        let mut c3 = TcpStream::connect(("127.0.0.1", port)).unwrap();
        c3.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        assert!(wait_for(|| lock(&b.shared.sink).is_some()), "accepted");
        b.write(b"x");
        let mut one = [0u8; 1];
        c3.read_exact(&mut one).unwrap();
        assert_eq!(&one, b"x");
    }

    #[test]
    fn null_modem_symlink_reaches_guest_both_ways() {
        let dir = scratch_dir("nmdm");
        let (ours, peer, lock_path) = scratch_pair(&dir);
        let mut b = SerialBackend::unopened("test-nmdm").unwrap();
        b.open_null_modem(&ours, &peer, &lock_path).unwrap();
        let target = std::fs::read_link(&peer).unwrap();
        assert!(
            target.starts_with(format!("/proc/{}/fd/", std::process::id())),
            "{}",
            target.display()
        );
        let mut user = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&peer)
            .unwrap();
        make_raw(user.as_raw_fd()).unwrap();
        b.write(b"login: ");
        let mut got = [0u8; 7];
        user.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"login: ");
        user.write_all(b"root\r").unwrap();
        assert!(wait_for(|| b.has_input()));
        let mut inp = [0u8; 16];
        assert!(wait_for(|| {
            std::thread::sleep(Duration::from_millis(20));
            lock(&b.shared.input).bytes.len() == 5
        }));
        let n = b.read(&mut inp);
        assert_eq!(&inp[..n], b"root\r");
        forget_terminal(user.as_raw_fd());
        drop(b);
        assert!(std::fs::symlink_metadata(&peer).is_err(), "symlink removed");
        assert!(
            std::fs::symlink_metadata(&lock_path).is_err(),
            "lock file removed"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A null-modem pair's three paths inside `dir`.
    fn scratch_pair(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
        (
            dir.join("nmdm9A"),
            dir.join("nmdm9B"),
            dir.join("nmdm9.lock"),
        )
    }

    #[test]
    fn a_null_modem_pair_belongs_to_one_owner() {
        let dir = scratch_dir("nmdm-excl");
        let (ours, peer, lock_path) = scratch_pair(&dir);
        let mut first = SerialBackend::unopened("first").unwrap();
        first.open_null_modem(&ours, &peer, &lock_path).unwrap();
        let link = std::fs::read_link(&peer).unwrap();

        let mut second = SerialBackend::unopened("second").unwrap();
        let e = second
            .open_null_modem(&ours, &peer, &lock_path)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains(&format!("in use by process {}", std::process::id())),
            "{e}"
        );
        drop(second);
        assert_eq!(
            std::fs::read_link(&peer).unwrap(),
            link,
            "first keeps its link"
        );
        first.write(b"still mine");
        let mut user = OpenOptions::new().read(true).open(&peer).unwrap();
        make_raw(user.as_raw_fd()).unwrap();
        let mut got = [0u8; 10];
        user.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"still mine");
        forget_terminal(user.as_raw_fd());

        // Once the first is gone the pair is free again.
        drop(first);
        let mut third = SerialBackend::unopened("third").unwrap();
        third.open_null_modem(&ours, &peer, &lock_path).unwrap();
        drop(third);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Body of the SIGKILL test: owns a pair in RHYVE_NMDM_CHILD's directory
    /// until killed.
    #[test]
    fn null_modem_child() {
        let Ok(dir) = std::env::var("RHYVE_NMDM_CHILD") else {
            return;
        };
        let (ours, peer, lock_path) = scratch_pair(Path::new(&dir));
        let mut b = SerialBackend::unopened("child").unwrap();
        b.open_null_modem(&ours, &peer, &lock_path).unwrap();
        println!("nmdm ready");
        std::io::stdout().flush().unwrap();
        std::thread::sleep(Duration::from_secs(60));
    }

    #[test]
    fn after_sigkill_the_peer_link_leads_to_no_terminal() {
        let dir = scratch_dir("nmdm-kill");
        let (ours, peer, lock_path) = scratch_pair(&dir);
        let mut child = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "serial::tests::null_modem_child", "--nocapture"])
            .env("RHYVE_NMDM_CHILD", &dir)
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut out = child.stdout.take().unwrap();
        let mut seen = Vec::new();
        let mut byte = [0u8; 1];
        while !seen.ends_with(b"nmdm ready") && out.read(&mut byte).unwrap() == 1 {
            seen.push(byte[0]);
        }
        assert!(
            seen.ends_with(b"nmdm ready"),
            "{}",
            String::from_utf8_lossy(&seen)
        );
        let slave_rdev = std::fs::metadata(&peer).unwrap().rdev();
        child.kill().unwrap();
        child.wait().unwrap();

        // The host hands the freed pty number to the next terminal: the
        // dead VM's link must not lead there.
        let (_master, next) = open_pty();
        let next_rdev = std::fs::metadata(&next).unwrap().rdev();
        match std::fs::metadata(&peer) {
            Err(_) => {}
            Ok(m) => assert!(
                m.rdev() != next_rdev && m.rdev() != slave_rdev,
                "{} leads to {}",
                peer.display(),
                next.display()
            ),
        }
        // The next owner replaces the stale link and lock.
        let mut b = SerialBackend::unopened("next").unwrap();
        b.open_null_modem(&ours, &peer, &lock_path).unwrap();
        assert!(std::fs::metadata(&peer).is_ok());
        drop(b);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn output_to_a_stuck_consumer_is_bounded_and_never_blocks() {
        // A terminal whose other end never reads: the writer thread blocks,
        // the queue fills, the rest is dropped, and write() returns at once.
        let (master, slave) = open_pty();
        let b = SerialBackend::open(slave.to_str().unwrap()).unwrap();
        let start = Instant::now();
        for _ in 0..(4 * OUTPUT_QUEUE_BYTES / 1024) {
            b.write(&[b'x'; 1024]);
        }
        assert!(start.elapsed() < Duration::from_secs(2));
        assert!(b.dropped_output() > 0);
        drop(b);
        drop(master);
    }

    /// Body of the stdio tests: runs only inside the child processes the
    /// tests below start (with RHYVE_STDIO_CHILD set).
    #[test]
    fn stdio_child() {
        let Ok(mode) = std::env::var("RHYVE_STDIO_CHILD") else {
            return;
        };
        let b = SerialBackend::open("stdio").unwrap();
        assert!(matches!(
            SerialBackend::open("stdio"),
            Err(SerialError::StdioInUse)
        ));
        b.write(b"guest says hi\n");
        if mode.starts_with("pty") {
            // SAFETY: termios is plain data filled by tcgetattr.
            let mut t: libc::termios = unsafe { std::mem::zeroed() };
            assert_eq!(unsafe { libc::tcgetattr(0, &mut t) }, 0);
            let raw = t.c_lflag & libc::ICANON == 0;
            b.write(if raw { b"raw=1\n" } else { b"raw=0\n" });
            // Generous: the suite runs these beside long VM boots at the
            // lowest priority, and a timeout here exits with a panic's
            // status instead of the signal the test waits for.
            assert!(b.drain_output(Duration::from_secs(60)));
            if mode == "pty-signal" {
                // Die from a signal: the signal hook must restore it.
                // SAFETY: raising a signal in our own process.
                unsafe { libc::raise(libc::SIGHUP) };
            }
            // Leave through exit(3) without dropping anything: the atexit
            // hook must restore the terminal.
            std::process::exit(0);
        }
        assert!(b.drain_output(Duration::from_secs(60)));
    }

    fn stdio_child_command(mode: &str) -> std::process::Command {
        let mut cmd = std::process::Command::new(std::env::current_exe().unwrap());
        cmd.args([
            "--exact",
            "serial::tests::stdio_child",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("RHYVE_STDIO_CHILD", mode);
        cmd
    }

    #[test]
    fn stdio_works_with_stdin_closed_and_no_terminal() {
        use std::os::unix::process::CommandExt;
        let mut cmd = stdio_child_command("closed");
        cmd.stdout(std::process::Stdio::piped());
        // SAFETY: close(2) is async-signal-safe; runs in the forked child.
        unsafe {
            cmd.pre_exec(|| {
                libc::close(0);
                Ok(())
            });
        }
        let out = cmd.output().unwrap();
        assert!(out.status.success(), "{out:?}");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains("guest says hi"), "{text}");
    }

    /// Run the stdio child on a fresh pty; returns its exit status, what it
    /// printed and whether the pty is back in canonical mode afterwards.
    fn run_on_pty(mode: &str) -> (std::process::ExitStatus, String, bool) {
        // SAFETY: pty setup on fds we own.
        let master = unsafe { libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY) };
        assert!(master >= 0);
        let master = unsafe { File::from_raw_fd(master) };
        let mut name = [0 as libc::c_char; 128];
        unsafe {
            assert_eq!(libc::grantpt(master.as_raw_fd()), 0);
            assert_eq!(libc::unlockpt(master.as_raw_fd()), 0);
            assert_eq!(
                libc::ptsname_r(master.as_raw_fd(), name.as_mut_ptr(), name.len()),
                0
            );
        }
        let slave_path = unsafe { std::ffi::CStr::from_ptr(name.as_ptr()) }
            .to_string_lossy()
            .into_owned();
        let slave = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NOCTTY)
            .open(&slave_path)
            .unwrap();
        let mut cmd = stdio_child_command(mode);
        cmd.stdin(slave.try_clone().unwrap())
            .stdout(slave.try_clone().unwrap())
            .stderr(slave.try_clone().unwrap());
        // The child must die of the SIGHUP it raises even when the tests
        // run under nohup, whose ignored SIGHUP it would inherit (and
        // rightly keep ignoring, as bhyve does).
        // SAFETY: signal(2) is async-signal-safe; runs in the forked child.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
                libc::signal(libc::SIGHUP, libc::SIG_DFL);
                Ok(())
            });
        }
        let reader = {
            let mut m = master.try_clone().unwrap();
            std::thread::spawn(move || {
                let mut all = Vec::new();
                let mut buf = [0u8; 1024];
                while let Ok(n) = m.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    all.extend_from_slice(&buf[..n]);
                    if all.windows(6).any(|w| w == b"raw=1\n" || w == b"raw=0\n") {
                        break;
                    }
                }
                all
            })
        };
        let status = cmd.status().unwrap();
        let text = String::from_utf8_lossy(&reader.join().unwrap()).into_owned();
        // SAFETY: termios is plain data filled by tcgetattr.
        let mut t: libc::termios = unsafe { std::mem::zeroed() };
        assert_eq!(unsafe { libc::tcgetattr(slave.as_raw_fd(), &mut t) }, 0);
        (status, text, t.c_lflag & libc::ICANON != 0)
    }

    #[test]
    fn stdio_terminal_is_raw_while_running_and_restored_at_exit() {
        let (status, text, canonical) = run_on_pty("pty");
        assert!(status.success());
        assert!(text.contains("guest says hi"), "{text}");
        assert!(
            text.contains("raw=1"),
            "stdin was raw while running: {text}"
        );
        assert!(canonical, "terminal restored at exit");
    }

    #[test]
    fn stdio_terminal_is_restored_when_killed_by_a_signal() {
        use std::os::unix::process::ExitStatusExt;
        let (status, text, canonical) = run_on_pty("pty-signal");
        assert_eq!(status.signal(), Some(libc::SIGHUP), "{text}");
        assert!(text.contains("raw=1"), "{text}");
        assert!(canonical, "terminal restored by the signal hook");
    }
}
