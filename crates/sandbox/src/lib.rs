//! bhyve's Capsicum step on Linux: once the VM is set up, every thread of
//! `bhyve` runs under a seccomp allow-list for its role, with Landlock
//! limiting paths to the VM's own files, `no_new_privs` and no capabilities,
//! so a guest that takes over a device model reaches nothing else.
//!
//! One place starts threads ([`spawn`], design-review W4). A seccomp filter
//! is per thread and a thread inherits its creator's, the strictest winning,
//! so a vCPU that starts a virtio worker would pass its own limits on. Hence
//! the spawner: a thread started by [`start`] before the machine is built,
//! confined to the union of all roles plus starting threads; it creates
//! every other thread, each of which then installs its own role's filter
//! before running its code. The main thread confines itself as the
//! supervisor with [`confine_supervisor`] when set-up is done.
//!
//! A forbidden call traps (SECCOMP_RET_TRAP): a SIGSYS handler writes one
//! line naming the thread, its role and the call with write(2) alone, and
//! ends the process with bhyve's error status 4. Trapping rather than
//! RET_KILL_PROCESS keeps the report inside `bhyve`, where a user running it
//! by hand sees it, without needing a parent to read the kernel's audit log.
//! One limit: a forbidden call made while SIGSYS is blocked is killed by the
//! kernel with SIGSYS and no line. glibc blocks every signal around the
//! clone of pthread_create and the tgkill of pthread_kill, so the roles that
//! create threads (spawner) or kick vCPUs (supervisor, control, vcpu) are
//! allowed those calls.
//!
//! One exception to trapping: `openat` in a role that may not open files
//! fails with EACCES instead. glibc's allocator opens
//! /proc/sys/vm/overcommit_memory once per process, the first time any
//! thread shrinks a non-main arena's heap, and treats a failed open as "do
//! not shrink"; which thread that is depends on timing, so a trap would
//! kill the VM at random. Landlock would refuse the path anyway.
//!
//! Without [`start`] (the sandbox off, or code that is not a VM such as unit
//! tests) [`spawn`] is a plain named thread.

mod roles;

use std::cell::Cell;
use std::collections::{BTreeMap, HashMap};
use std::io;
use std::path::PathBuf;
use std::sync::mpsc;
use std::sync::OnceLock;
use std::thread::JoinHandle;

use landlock::{
    Access, AccessFs, PathBeneath, PathFd, Ruleset, RulesetAttr, RulesetCreatedAttr, RulesetStatus,
    ABI,
};
use seccompiler::{BpfProgram, SeccompAction, SeccompFilter, TargetArch};

pub use roles::ThreadRole;
use syscalls::Sysno;

#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("seccomp filter for {role}: {msg}")]
    Seccomp { role: &'static str, msg: String },
    #[error("landlock: {0}")]
    Landlock(String),
    #[error("landlock: {0} is not supported by this kernel (needed for the sandbox; -o security.sandbox=false runs without it)")]
    LandlockMissing(String),
    #[error("{0}")]
    Os(String),
}

/// What the VM may reach once confined.
#[derive(Clone, Debug, Default)]
pub struct Policy {
    /// Directories the VM may read, create and remove files in (its
    /// registry directory).
    pub writable_dirs: Vec<PathBuf>,
    /// Files (or directories) given to the VM: disks, VARS, sockets; they
    /// keep the access they had, and nothing else in the file system opens.
    pub files: Vec<PathBuf>,
    /// Debug builds only: make a thread of this role call something its
    /// filter forbids, to prove the filter is there.
    pub test_violation: Option<ThreadRole>,
}

type Job = Box<dyn FnOnce() + Send>;

struct Spawner {
    jobs: mpsc::Sender<Job>,
    filters: HashMap<ThreadRole, Vec<BpfProgram>>,
    policy: Policy,
}

static SPAWNER: OnceLock<Spawner> = OnceLock::new();

thread_local! {
    /// For the SIGSYS handler: const-initialised, no destructor, so reading
    /// them in a signal handler is a plain TLS load.
    static ROLE: Cell<Option<ThreadRole>> = const { Cell::new(None) };
    static NAME: Cell<[u8; 16]> = const { Cell::new([0; 16]) };
}

/// Compile every role's filter and start the spawner. After this, [`spawn`]
/// confines each new thread.
pub fn start(policy: Policy) -> Result<(), SandboxError> {
    let mut filters = HashMap::new();
    for role in ThreadRole::ALL {
        filters.insert(role, compile(role)?);
    }
    install_sigsys_handler()?;
    let spawner_filter = filters[&ThreadRole::Spawner].clone();
    let (jobs, job_rx) = mpsc::channel::<Job>();
    let (ready_tx, ready_rx) = mpsc::channel();
    let thread_policy = policy.clone();
    std::thread::Builder::new()
        .name("spawner".into())
        .spawn(move || {
            let confined = block_process_signals()
                .and_then(|()| confine_thread(&thread_policy, &spawner_filter))
                .map(|()| enter_role(ThreadRole::Spawner, thread_policy.test_violation));
            let ok = confined.is_ok();
            let _ = ready_tx.send(confined);
            if ok {
                for job in job_rx {
                    job();
                }
            }
        })
        .map_err(|e| SandboxError::Os(format!("cannot start the spawner thread: {e}")))?;
    ready_rx
        .recv()
        .map_err(|_| SandboxError::Os("the spawner thread died".into()))??;
    SPAWNER
        .set(Spawner {
            jobs,
            filters,
            policy,
        })
        .map_err(|_| SandboxError::Os("the sandbox was started twice".into()))
}

/// Confine the calling (main) thread as the supervisor: the end of set-up.
pub fn confine_supervisor() -> Result<(), SandboxError> {
    let Some(spawner) = SPAWNER.get() else {
        return Ok(());
    };
    confine_thread(&spawner.policy, &spawner.filters[&ThreadRole::Supervisor])?;
    enter_role(ThreadRole::Supervisor, spawner.policy.test_violation);
    Ok(())
}

/// True once [`start`] ran: threads are confined.
pub fn active() -> bool {
    SPAWNER.get().is_some()
}

/// Start a thread named `name` doing `f` as `role`. With the sandbox on,
/// the spawner creates it and it installs its role's filter first.
pub fn spawn<F, T>(role: ThreadRole, name: impl Into<String>, f: F) -> io::Result<JoinHandle<T>>
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    let name = name.into();
    let Some(spawner) = SPAWNER.get() else {
        return std::thread::Builder::new().name(name).spawn(f);
    };
    let filter = spawner.filters[&role].clone();
    let violation = spawner.policy.test_violation;
    let (tx, rx) = mpsc::sync_channel(1);
    let job: Job = Box::new(move || {
        let started = std::thread::Builder::new().name(name).spawn(move || {
            if let Err(e) = apply_filters(&filter) {
                // Running unconfined is not an option; say so and stop.
                eprintln!(
                    "bhyve: sandbox: cannot confine a {} thread: {e}",
                    role.name()
                );
                std::process::exit(4);
            }
            enter_role(role, violation);
            f()
        });
        let _ = tx.send(started);
    });
    spawner
        .jobs
        .send(job)
        .map_err(|_| io::Error::other("the spawner thread is gone"))?;
    rx.recv()
        .map_err(|_| io::Error::other("the spawner thread did not answer"))?
}

/// A role's filters: its allow-list (trapping anything else) and, when it
/// may not open files, a second one that fails `openat` with EACCES (see
/// the crate comment).
fn compile(role: ThreadRole) -> Result<Vec<BpfProgram>, SandboxError> {
    let err = |msg: String| SandboxError::Seccomp {
        role: role.name(),
        msg,
    };
    let arch = TargetArch::try_from(std::env::consts::ARCH).map_err(|e| err(e.to_string()))?;
    let build = |calls: Vec<Sysno>, mismatch, matched| {
        let rules: BTreeMap<i64, Vec<seccompiler::SeccompRule>> = calls
            .into_iter()
            .map(|s| (i64::from(s.id()), Vec::new()))
            .collect();
        SeccompFilter::new(rules, mismatch, matched, arch)
            .and_then(|f| f.try_into())
            .map_err(|e: seccompiler::BackendError| err(e.to_string()))
    };
    let mut allowed = role.allowed();
    if allowed.contains(&Sysno::openat) {
        return Ok(vec![build(
            allowed,
            SeccompAction::Trap,
            SeccompAction::Allow,
        )?]);
    }
    allowed.push(Sysno::openat);
    // The EACCES filter goes first: installing a filter takes prctl and
    // seccomp, which the allow-list forbids once it is in place.
    Ok(vec![
        build(
            vec![Sysno::openat],
            SeccompAction::Allow,
            SeccompAction::Errno(libc::EACCES as u32),
        )?,
        build(allowed, SeccompAction::Trap, SeccompAction::Allow)?,
    ])
}

/// Landlock, no capabilities, then the seccomp filter (which sets
/// no_new_privs), on the calling thread; threads it creates inherit all three.
fn confine_thread(policy: &Policy, filters: &[BpfProgram]) -> Result<(), SandboxError> {
    restrict_paths(policy)?;
    drop_capabilities()?;
    apply_filters(filters).map_err(|msg| SandboxError::Seccomp {
        role: "this thread",
        msg,
    })
}

/// Install a role's filters on the calling thread, in order (they stack;
/// the kernel takes the strictest answer).
fn apply_filters(filters: &[BpfProgram]) -> Result<(), String> {
    filters
        .iter()
        .try_for_each(|f| seccompiler::apply_filter(f).map_err(|e| e.to_string()))
}

fn restrict_paths(policy: &Policy) -> Result<(), SandboxError> {
    let abi = ABI::V5;
    let ll = |e: landlock::RulesetError| SandboxError::Landlock(e.to_string());
    let mut ruleset = Ruleset::default()
        .handle_access(AccessFs::from_all(abi))
        .map_err(ll)?
        .create()
        .map_err(ll)?;
    for dir in &policy.writable_dirs {
        let fd = PathFd::new(dir)
            .map_err(|e| SandboxError::Landlock(format!("{}: {e}", dir.display())))?;
        ruleset = ruleset
            .add_rule(PathBeneath::new(fd, AccessFs::from_all(abi)))
            .map_err(ll)?;
    }
    for file in &policy.files {
        let fd = PathFd::new(file)
            .map_err(|e| SandboxError::Landlock(format!("{}: {e}", file.display())))?;
        let access = if file.is_dir() {
            AccessFs::from_read(abi) | AccessFs::from_file(abi)
        } else {
            AccessFs::from_file(abi)
        };
        ruleset = ruleset.add_rule(PathBeneath::new(fd, access)).map_err(ll)?;
    }
    let status = ruleset.restrict_self().map_err(ll)?;
    if status.ruleset == RulesetStatus::NotEnforced {
        return Err(SandboxError::LandlockMissing("Landlock".into()));
    }
    Ok(())
}

/// Empty the calling thread's capability sets: after set-up `bhyve` needs
/// none (its device nodes, taps and files are open).
fn drop_capabilities() -> Result<(), SandboxError> {
    #[repr(C)]
    struct Header {
        version: u32,
        pid: i32,
    }
    #[repr(C)]
    #[derive(Clone, Copy)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    const VERSION_3: u32 = 0x2008_0522;
    let mut header = Header {
        version: VERSION_3,
        pid: 0,
    };
    let data = [Data {
        effective: 0,
        permitted: 0,
        inheritable: 0,
    }; 2];
    // SAFETY: capset reads one header and two data structs (version 3).
    let rc = unsafe { libc::syscall(libc::SYS_capset, &mut header, data.as_ptr()) };
    // SAFETY: plain prctl without pointers.
    let ambient = unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL,
            0,
            0,
            0,
        )
    };
    if rc != 0 || ambient != 0 {
        return Err(SandboxError::Os(format!(
            "cannot drop capabilities: {}",
            io::Error::last_os_error()
        )));
    }
    Ok(())
}

/// Leave process-directed signals (SIGTERM, SIGINT, ...) to the main
/// thread, whose filter allows what their handlers do; children of the
/// spawner inherit the mask.
fn block_process_signals() -> Result<(), SandboxError> {
    // SAFETY: sigset_t is plain data filled by sigemptyset/sigaddset.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for sig in [
            libc::SIGHUP,
            libc::SIGINT,
            libc::SIGQUIT,
            libc::SIGTERM,
            libc::SIGUSR1,
            libc::SIGUSR2,
            libc::SIGPIPE,
            libc::SIGCHLD,
            libc::SIGWINCH,
        ] {
            libc::sigaddset(&mut set, sig);
        }
        let rc = libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        if rc != 0 {
            return Err(SandboxError::Os(format!(
                "cannot block signals in the spawner: {}",
                io::Error::from_raw_os_error(rc)
            )));
        }
    }
    Ok(())
}

/// Remember who this thread is for the SIGSYS handler; in debug builds,
/// break the rules if a test asked for it.
fn enter_role(role: ThreadRole, test_violation: Option<ThreadRole>) {
    ROLE.with(|r| r.set(Some(role)));
    let mut name = [0u8; 16];
    if let Some(n) = std::thread::current().name() {
        let n = n.as_bytes();
        let len = n.len().min(15);
        name[..len].copy_from_slice(&n[..len]);
    }
    NAME.with(|c| c.set(name));
    #[cfg(debug_assertions)]
    if test_violation == Some(role) {
        // personality(0xffffffff) only queries; no role allows it.
        // SAFETY: a query without side effects.
        unsafe { libc::syscall(libc::SYS_personality, 0xffff_ffffu64) };
    }
    #[cfg(not(debug_assertions))]
    let _ = test_violation;
}

fn install_sigsys_handler() -> Result<(), SandboxError> {
    // SAFETY: installing a handler that only makes async-signal-safe calls.
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = on_sigsys
            as extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void)
            as usize;
        action.sa_flags = libc::SA_SIGINFO;
        libc::sigemptyset(&mut action.sa_mask);
        if libc::sigaction(libc::SIGSYS, &action, std::ptr::null_mut()) != 0 {
            return Err(SandboxError::Os(format!(
                "cannot install the SIGSYS handler: {}",
                io::Error::last_os_error()
            )));
        }
    }
    Ok(())
}

/// A small stack buffer for the handler's one line: no allocation.
struct Line {
    buf: [u8; 256],
    len: usize,
}

impl Line {
    fn push(&mut self, bytes: &[u8]) {
        let n = bytes.len().min(self.buf.len() - self.len);
        self.buf[self.len..self.len + n].copy_from_slice(&bytes[..n]);
        self.len += n;
    }
    fn push_number(&mut self, mut n: u64) {
        let mut digits = [0u8; 20];
        let mut i = digits.len();
        loop {
            i -= 1;
            digits[i] = b'0' + (n % 10) as u8;
            n /= 10;
            if n == 0 {
                break;
            }
        }
        self.push(&digits[i..]);
    }
}

extern "C" fn on_sigsys(_: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // siginfo's SIGSYS fields on Linux: after signo, errno, code (and
    // padding to 16 bytes) come the call address (8 bytes) and the system
    // call number (int).
    // SAFETY: the kernel hands a valid siginfo; reading an int at offset 24.
    let nr = unsafe { *(info as *const u8).add(24).cast::<i32>() };
    let role = ROLE
        .with(|r| r.get())
        .map_or("unconfined", ThreadRole::name);
    let name = NAME.with(|n| n.get());
    let name_len = name.iter().position(|b| *b == 0).unwrap_or(name.len());
    let mut line = Line {
        buf: [0; 256],
        len: 0,
    };
    line.push(b"bhyve: sandbox: thread \"");
    line.push(&name[..name_len]);
    line.push(b"\" (");
    line.push(role.as_bytes());
    line.push(b") made a forbidden system call: ");
    match syscalls::Sysno::new(nr as usize) {
        Some(s) => line.push(s.name().as_bytes()),
        None => line.push(b"unknown"),
    }
    line.push(b" (");
    line.push_number(nr as u64);
    line.push(b")\n");
    // SAFETY: write(2) and _exit(2) are async-signal-safe and allowed to
    // every role.
    unsafe {
        libc::write(2, line.buf.as_ptr().cast(), line.len);
        libc::_exit(4);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_role_compiles_and_names_round_trip() {
        for role in ThreadRole::ALL {
            compile(role).unwrap();
            assert_eq!(ThreadRole::from_name(role.name()), Some(role));
        }
    }

    /// glibc's one-time open of /proc/sys/vm/overcommit_memory (heap trim)
    /// fails quietly in a role that may not open files, whichever thread
    /// makes it, instead of ending the VM.
    #[test]
    fn a_role_without_openat_gets_eacces_not_a_trap() {
        let filters = compile(ThreadRole::Vcpu).unwrap();
        let errno = std::thread::spawn(move || {
            apply_filters(&filters).unwrap();
            // SAFETY: a NUL-terminated path; the descriptor, if any, is closed.
            let fd = unsafe {
                libc::open(
                    c"/proc/sys/vm/overcommit_memory".as_ptr(),
                    libc::O_RDONLY | libc::O_CLOEXEC,
                )
            };
            if fd >= 0 {
                unsafe { libc::close(fd) };
                return 0;
            }
            io::Error::last_os_error().raw_os_error().unwrap()
        })
        .join()
        .unwrap();
        assert_eq!(errno, libc::EACCES);
    }

    #[test]
    fn the_spawner_allows_what_any_role_does() {
        let spawner = ThreadRole::Spawner.allowed();
        for role in ThreadRole::ALL {
            for call in role.allowed() {
                assert!(spawner.contains(&call), "{call} of {role:?}");
            }
        }
    }
}
