//! The system calls each thread role may make once it runs, taken from
//! `scripts/sandbox-syscalls.sh` (strace of guest runs) plus the calls of
//! paths those runs do not reach (named in comments), and nothing else.

use syscalls::Sysno;

/// Which job a thread does; each role has its own seccomp allow-list.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ThreadRole {
    /// The main thread once the VM is built: signals, halt checks, joining
    /// the vCPUs, writing the registry record at exit.
    Supervisor,
    /// Runs one vCPU: KVM_RUN and the device emulation it dispatches to.
    Vcpu,
    /// A device's I/O worker: virtio queues, AHCI commands.
    DeviceIo,
    /// Fires a device's timer deadlines (RTC, HPET).
    Timer,
    /// Moves bytes between a serial port and its host side.
    SerialIo,
    /// Serves bhyvectl on the control socket.
    Control,
    /// fbuf's VNC server: one client at a time, keys to the i8042.
    Display,
    /// Starts every other thread (see the crate comment).
    Spawner,
}

impl ThreadRole {
    pub const ALL: [ThreadRole; 8] = [
        ThreadRole::Supervisor,
        ThreadRole::Vcpu,
        ThreadRole::DeviceIo,
        ThreadRole::Timer,
        ThreadRole::SerialIo,
        ThreadRole::Control,
        ThreadRole::Display,
        ThreadRole::Spawner,
    ];

    /// The name used in messages and by `security.test_violation`.
    pub const fn name(self) -> &'static str {
        match self {
            ThreadRole::Supervisor => "supervisor",
            ThreadRole::Vcpu => "vcpu",
            ThreadRole::DeviceIo => "device-io",
            ThreadRole::Timer => "timer",
            ThreadRole::SerialIo => "serial-io",
            ThreadRole::Control => "control",
            ThreadRole::Display => "display",
            ThreadRole::Spawner => "spawner",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|r| r.name() == name)
    }

    /// The calls this role may make, on top of [`COMMON`].
    pub fn allowed(self) -> Vec<Sysno> {
        let own: &[Sysno] = match self {
            ThreadRole::Supervisor => SUPERVISOR,
            ThreadRole::Vcpu => VCPU,
            ThreadRole::DeviceIo => DEVICE_IO,
            ThreadRole::Timer => TIMER,
            ThreadRole::SerialIo => SERIAL_IO,
            ThreadRole::Control => CONTROL,
            ThreadRole::Display => DISPLAY,
            ThreadRole::Spawner => {
                // Its children's filters stack on its own, so it must allow
                // what any of them does, plus starting threads.
                let mut all: Vec<Sysno> = Self::ALL
                    .into_iter()
                    .filter(|r| *r != ThreadRole::Spawner)
                    .flat_map(|r| r.allowed())
                    .chain(SPAWNER.iter().copied())
                    .collect();
                all.sort();
                all.dedup();
                return all;
            }
        };
        let mut all: Vec<Sysno> = COMMON.iter().chain(own).copied().collect();
        all.sort();
        all.dedup();
        all
    }
}

/// Every thread: memory and locks (the allocator, std's mutexes and
/// channels), time, the end of a thread, and the calls the SIGSYS handler
/// itself makes (write, exit_group).
const COMMON: &[Sysno] = &[
    Sysno::brk,
    Sysno::mmap,
    Sysno::mprotect,
    Sysno::munmap,
    Sysno::madvise,
    Sysno::mremap,
    Sysno::futex,
    Sysno::sched_yield,
    Sysno::sched_getaffinity,
    Sysno::clock_gettime,
    Sysno::clock_nanosleep,
    Sysno::nanosleep,
    Sysno::gettid,
    Sysno::getpid,
    Sysno::rt_sigprocmask,
    Sysno::rt_sigreturn,
    // How the kernel resumes a sleep or poll that a stop (SIGSTOP, Ctrl-Z)
    // or a signal interrupted; it only continues a call already allowed.
    Sysno::restart_syscall,
    Sysno::sigaltstack,
    Sysno::write,
    Sysno::close,
    // std checks a descriptor is open (F_GETFD) before closing it.
    Sysno::fcntl,
    Sysno::exit,
    Sysno::exit_group,
];

const SUPERVISOR: &[Sysno] = &[
    // Kicking vCPUs out of the guest; SIGTERM's default action once more.
    Sysno::tgkill,
    Sysno::rt_sigaction,
    // Restoring the terminal (TCSETS) before dying of SIGTERM.
    Sysno::ioctl,
    // The registry record written at exit, and its removal (-D, -M).
    Sysno::openat,
    Sysno::read,
    Sysno::lseek,
    Sysno::fcntl,
    Sysno::newfstatat,
    Sysno::statx,
    Sysno::rename,
    Sysno::unlink,
    Sysno::unlinkat,
    Sysno::rmdir,
    Sysno::getdents64,
];

const VCPU: &[Sysno] = &[
    // KVM_RUN and register access; irqfd and ioeventfd set-up when a driver
    // starts a virtio device, and the tap offload ioctls then.
    Sysno::ioctl,
    Sysno::read,
    // A virtio device's stop eventfd, made at DRIVER_OK.
    Sysno::eventfd2,
    // `-p`: the thread pins itself.
    Sysno::sched_setaffinity,
    // Kicking another vCPU (INIT/SIPI, NMI requests).
    Sysno::tgkill,
    // `-l bootrom,ROM,VARS`: the firmware's flash writes go to the VARS file
    // as they happen, from the vCPU that made them.
    Sysno::pwrite64,
];

const DEVICE_IO: &[Sysno] = &[
    Sysno::read,
    Sysno::readv,
    Sysno::writev,
    Sysno::epoll_create1,
    Sysno::epoll_ctl,
    Sysno::epoll_wait,
    Sysno::epoll_pwait,
    Sysno::ppoll,
    Sysno::poll,
    Sysno::eventfd2,
    Sysno::fcntl,
    // virtio-blk's io_uring, and its synchronous fallback and AHCI.
    Sysno::io_uring_setup,
    Sysno::io_uring_enter,
    Sysno::io_uring_register,
    Sysno::pread64,
    Sysno::pwrite64,
    Sysno::preadv,
    Sysno::pwritev,
    Sysno::fsync,
    Sysno::fdatasync,
    // Discards: hole punching, BLKDISCARD on devices.
    Sysno::fallocate,
    // BLKDISCARD; interrupts (KVM_IRQ_LINE, KVM_SIGNAL_MSI) when no irqfd.
    Sysno::ioctl,
    // virtio-rnd.
    Sysno::getrandom,
    // virtio-console: a port's socket takes its host-side client, and
    // talks with it (std's UnixStream reads with recv, writes with send).
    Sysno::accept4,
    Sysno::accept,
    Sysno::recvfrom,
    Sysno::sendto,
];

const TIMER: &[Sysno] = &[
    // Raising the timer's interrupt (KVM_IRQ_LINE, KVM_SIGNAL_MSI).
    Sysno::ioctl,
];

const SERIAL_IO: &[Sysno] = &[
    Sysno::read,
    Sysno::poll,
    Sysno::ppoll,
    Sysno::fcntl,
    // The tcp backend: one client at a time.
    Sysno::accept4,
    Sysno::accept,
    Sysno::setsockopt,
    Sysno::shutdown,
    // Raising the UART's interrupt (KVM_IRQ_LINE); terminal modes.
    Sysno::ioctl,
];

const CONTROL: &[Sysno] = &[
    Sysno::accept4,
    Sysno::accept,
    Sysno::read,
    Sysno::recvfrom,
    Sysno::sendto,
    Sysno::setsockopt,
    // Resident memory for bhyvectl --get-stats.
    Sysno::mincore,
    // Kicking a vCPU to serve --get-* and --inject-nmi.
    Sysno::tgkill,
    // Snapshots: the files' descriptors arrive with the request; guest
    // memory is written to them sparsely, the rest as JSON.
    Sysno::recvmsg,
    Sysno::pwrite64,
    Sysno::ftruncate,
    Sysno::fsync,
    Sysno::fdatasync,
    Sysno::statx,
    Sysno::newfstatat,
    // Pausing devices: the in-kernel irqchips, PIT and clock are read
    // (KVM_GET_*), virtio-blk's requests in flight drained, interrupts
    // sent and irqfds rebound on resume.
    Sysno::ioctl,
    Sysno::io_uring_enter,
    // A resumed virtio function's new worker gets a fresh stop eventfd.
    Sysno::eventfd2,
    // glibc's malloc reads /proc/sys/vm/overcommit_memory the first time
    // it trims a thread's heap (after a snapshot's large buffers); Landlock
    // refuses the open, which glibc takes as "keep the heap".
    Sysno::openat,
];

const DISPLAY: &[Sysno] = &[
    Sysno::accept4,
    Sysno::accept,
    Sysno::read,
    Sysno::recvfrom,
    Sysno::sendto,
    Sysno::getpeername,
    // Read timeouts and TCP_NODELAY.
    Sysno::setsockopt,
    // The VNC Authentication challenge.
    Sysno::getrandom,
    // Raising IRQ 1 for a key (KVM_IRQ_LINE).
    Sysno::ioctl,
];

/// Starting a thread (std and glibc), and what the new thread does before
/// its own filter is in: name itself, install that filter.
const SPAWNER: &[Sysno] = &[
    Sysno::clone,
    Sysno::clone3,
    Sysno::set_robust_list,
    Sysno::rseq,
    Sysno::prctl,
    Sysno::seccomp,
    Sysno::getrandom,
];
