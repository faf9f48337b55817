//! vCPU threads: run the guest, dispatch exits to the buses, and turn what
//! the guest did into bhyve's exit reasons.
//!
//! With KVM's in-kernel LAPIC a HLT never reaches user space, so "halted"
//! (bhyve exit 2: every active vCPU in HLT with interrupts disabled) is
//! found by the supervisor kicking vCPUs now and then and each one checking
//! its own state.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use rhyve_hypervisor::{Vcpu, VcpuExit, VcpuState};
use rhyve_platform::bus::Bus;
use rhyve_platform::exit::{ExitRequest, ExitRequests};

const RUNNING: u8 = 0;
/// Halted with interrupts off, or never started (an AP still waiting for SIPI).
const IDLE_FOR_GOOD: u8 = 1;

/// What every vCPU thread shares.
pub struct VcpuShared {
    pub io: Arc<Bus>,
    pub mmio: Arc<Bus>,
    pub exits: Arc<ExitRequests>,
    /// `-e` (`x86.strictio`): an access to an unassigned port ends the VM.
    pub strict_io: bool,
    states: Vec<AtomicU8>,
    halt_check: Vec<AtomicBool>,
    /// `-p` / `vcpu.N.cpuset`: host CPUs each vCPU thread may run on.
    pinning: Vec<Option<Vec<u32>>>,
    /// Work other threads hand a vCPU (it owns its KVM file descriptor).
    requests: Vec<Mutex<Vec<VcpuRequest>>>,
    /// pthread ids of the vCPU threads, to kick them out of the guest.
    threads: Vec<AtomicU64>,
    counters: Vec<VcpuCounters>,
    /// Each vCPU's registers as its thread left the guest for good.
    at_stop: Vec<Mutex<Vec<(&'static str, u64)>>>,
    pause: Mutex<PauseGate>,
    pause_changed: Condvar,
}

/// A snapshot's pause: each vCPU saves its complete state on its own
/// thread (it owns its KVM descriptor) and waits outside the guest until
/// resumed.
struct PauseGate {
    requested: bool,
    saved: Vec<Option<Result<VcpuState, String>>>,
}

/// A request served by the vCPU thread on its next exit.
pub enum VcpuRequest {
    Registers(Sender<Result<Vec<(&'static str, u64)>, String>>),
    Nmi(Sender<Result<(), String>>),
}

/// Exit counters, for `bhyvectl --get-stats`.
#[derive(Default)]
pub struct VcpuCounters {
    pub exits: AtomicU64,
    pub io: AtomicU64,
    pub mmio: AtomicU64,
    pub interrupted: AtomicU64,
    /// Instructions completed in user space because KVM could not, by kind.
    pub assists: Mutex<std::collections::BTreeMap<&'static str, u64>>,
}

impl VcpuCounters {
    /// (description, value) in bhyvectl's order.
    pub fn snapshot(&self) -> Vec<(String, u64)> {
        let fixed = [
            ("total number of vm exits", &self.exits),
            ("number of times in/out was intercepted", &self.io),
            ("number of MMIO accesses handled", &self.mmio),
            ("number of times the vcpu was kicked out", &self.interrupted),
        ];
        let mut out: Vec<(String, u64)> = fixed
            .iter()
            .map(|(k, v)| (k.to_string(), v.load(Ordering::Relaxed)))
            .collect();
        let assists = self.assists.lock().unwrap_or_else(|e| e.into_inner());
        out.extend(
            assists
                .iter()
                .map(|(kind, n)| (format!("emulation assists: {kind}"), *n)),
        );
        out
    }
}

impl VcpuShared {
    pub fn new(
        io: Arc<Bus>,
        mmio: Arc<Bus>,
        exits: Arc<ExitRequests>,
        strict_io: bool,
        pinning: Vec<Option<Vec<u32>>>,
    ) -> Self {
        let cpus = pinning.len();
        Self {
            requests: (0..cpus).map(|_| Mutex::new(Vec::new())).collect(),
            threads: (0..cpus).map(|_| AtomicU64::new(0)).collect(),
            counters: (0..cpus).map(|_| VcpuCounters::default()).collect(),
            at_stop: (0..cpus).map(|_| Mutex::new(Vec::new())).collect(),
            pinning,
            io,
            mmio,
            exits,
            strict_io,
            states: (0..cpus).map(|_| AtomicU8::new(RUNNING)).collect(),
            halt_check: (0..cpus).map(|_| AtomicBool::new(false)).collect(),
            pause: Mutex::new(PauseGate {
                requested: false,
                saved: (0..cpus).map(|_| None).collect(),
            }),
            pause_changed: Condvar::new(),
        }
    }

    fn kick(&self, cpu: usize) {
        let tid = self.threads[cpu].load(Ordering::SeqCst);
        if tid != 0 {
            // SAFETY: tid is a live vCPU thread's pthread id (set by the
            // thread itself); a signal to it only interrupts KVM_RUN.
            unsafe { libc::pthread_kill(tid as libc::pthread_t, crate::signals::kick_signal()) };
        }
    }

    /// Stop every vCPU outside the guest and return their states, in vCPU
    /// order. On failure the vCPUs run on.
    pub fn pause_vcpus(&self, timeout: Duration) -> Result<Vec<VcpuState>, String> {
        let deadline = Instant::now() + timeout;
        let mut gate = self.pause.lock().unwrap_or_else(|e| e.into_inner());
        gate.requested = true;
        loop {
            let waiting: Vec<usize> = (0..gate.saved.len())
                .filter(|&i| gate.saved[i].is_none())
                .collect();
            if waiting.is_empty() {
                break;
            }
            if self.exits.pending().is_some() || Instant::now() > deadline {
                drop(gate);
                self.resume_vcpus();
                return Err(format!("vCPU {} did not stop for the snapshot", waiting[0]));
            }
            // A kick that lands while the vCPU is outside KVM_RUN is lost:
            // repeat it until the vCPU has parked.
            for &cpu in &waiting {
                self.kick(cpu);
            }
            gate = self
                .pause_changed
                .wait_timeout(gate, Duration::from_millis(10))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        let saved: Vec<Result<VcpuState, String>> = gate
            .saved
            .iter_mut()
            .map(|s| s.take().expect("every vCPU saved"))
            .collect();
        drop(gate);
        let mut states = Vec::with_capacity(saved.len());
        for (cpu, s) in saved.into_iter().enumerate() {
            match s {
                Ok(s) => states.push(s),
                Err(e) => {
                    self.resume_vcpus();
                    return Err(format!("vCPU {cpu}: {e}"));
                }
            }
        }
        Ok(states)
    }

    /// Let paused vCPUs run again.
    pub fn resume_vcpus(&self) {
        let mut gate = self.pause.lock().unwrap_or_else(|e| e.into_inner());
        gate.requested = false;
        for s in gate.saved.iter_mut() {
            *s = None;
        }
        self.pause_changed.notify_all();
    }

    /// On the vCPU's thread, outside the guest: if a snapshot is being
    /// taken, hand over this vCPU's state and wait until resumed (or the
    /// VM ends).
    fn park_if_pausing(&self, vcpu: &mut dyn Vcpu) {
        let id = vcpu.id() as usize;
        let mut gate = self.pause.lock().unwrap_or_else(|e| e.into_inner());
        if !gate.requested || gate.saved[id].is_some() {
            return;
        }
        gate.saved[id] = Some(vcpu.save_state().map_err(|e| e.to_string()));
        self.pause_changed.notify_all();
        while gate.requested && self.exits.pending().is_none() {
            gate = self
                .pause_changed
                .wait_timeout(gate, Duration::from_millis(50))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    pub fn cpus(&self) -> usize {
        self.states.len()
    }

    pub fn counters(&self, cpu: usize) -> Option<&VcpuCounters> {
        self.counters.get(cpu)
    }

    /// Hand `request` to vCPU `cpu` and kick it out of the guest to serve it.
    pub fn send(&self, cpu: usize, request: VcpuRequest) -> bool {
        let Some(queue) = self.requests.get(cpu) else {
            return false;
        };
        queue
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(request);
        let tid = self.threads[cpu].load(Ordering::SeqCst);
        if tid != 0 {
            // SAFETY: tid is a live vCPU thread's pthread id (set by the
            // thread itself); a signal to it only interrupts KVM_RUN.
            unsafe { libc::pthread_kill(tid as libc::pthread_t, crate::signals::kick_signal()) };
        }
        true
    }

    /// Each vCPU's registers when the VM stopped (empty for a vCPU that
    /// could not be read), once every vCPU thread has ended.
    pub fn registers_at_stop(&self) -> Vec<Vec<(String, u64)>> {
        self.at_stop
            .iter()
            .map(|regs| {
                regs.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .iter()
                    .map(|(k, v)| (k.to_string(), *v))
                    .collect()
            })
            .collect()
    }

    /// Ask every vCPU to look at whether it is halted for good on its next exit.
    pub fn request_halt_check(&self) {
        for flag in &self.halt_check {
            flag.store(true, Ordering::SeqCst);
        }
    }

    /// True once every vCPU has answered the last halt check.
    pub fn halt_check_answered(&self) -> bool {
        self.halt_check.iter().all(|f| !f.load(Ordering::SeqCst))
    }

    /// True if, at the last check, every vCPU was halted for good or not started.
    pub fn all_idle(&self) -> bool {
        self.states
            .iter()
            .all(|s| s.load(Ordering::SeqCst) == IDLE_FOR_GOOD)
    }
}

fn unassigned_port(shared: &VcpuShared, id: u32, dir: &str, port: u16, len: usize) {
    if shared.strict_io {
        shared.exits.request(ExitRequest::Error(format!(
            "vcpu {id}: unhandled {dir} of {len} byte(s) at I/O port {port:#x} (-e)"
        )));
    } else {
        tracing::trace!("vcpu {id}: unassigned {dir} port {port:#x} ({len} bytes)");
    }
}

/// Pin the calling thread to `cpus` (sched_setaffinity).
fn pin_current_thread(cpus: &[u32]) -> std::io::Result<()> {
    // SAFETY: cpu_set_t is plain data; CPU_SET bounds-checks the index.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        for &c in cpus {
            libc::CPU_SET(c as usize, &mut set);
        }
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Run `vcpu` until the VM is asked to stop, then keep its registers: bhyve
/// leaves a stopped VM in the kernel where bhyvectl can still read them.
pub fn run_vcpu(mut vcpu: Box<dyn Vcpu>, shared: Arc<VcpuShared>) {
    run_until_stopped(vcpu.as_mut(), &shared);
    let id = vcpu.id() as usize;
    match vcpu.registers() {
        Ok(regs) => *shared.at_stop[id].lock().unwrap_or_else(|e| e.into_inner()) = regs,
        Err(e) => tracing::warn!("vcpu {id}: cannot keep its registers: {e}"),
    }
}

fn run_until_stopped(vcpu: &mut dyn Vcpu, shared: &VcpuShared) {
    let id = vcpu.id();
    // SAFETY: pthread_self has no preconditions.
    shared.threads[id as usize].store(unsafe { libc::pthread_self() } as u64, Ordering::SeqCst);
    let counters = &shared.counters[id as usize];
    if let Some(Some(cpus)) = shared.pinning.get(id as usize) {
        if let Err(e) = pin_current_thread(cpus) {
            shared.exits.request(ExitRequest::Error(format!(
                "vcpu {id}: cannot pin to host CPUs {cpus:?}: {e}"
            )));
            return;
        }
    }
    while shared.exits.pending().is_none() {
        let exit = match vcpu.run() {
            Ok(exit) => exit,
            Err(e) => {
                shared
                    .exits
                    .request(ExitRequest::Error(format!("vcpu {id}: {e}")));
                break;
            }
        };
        counters.exits.fetch_add(1, Ordering::Relaxed);
        match exit {
            VcpuExit::IoIn { port, size, data } => {
                counters.io.fetch_add(1, Ordering::Relaxed);
                for access in data.chunks_mut(size.max(1)) {
                    if !shared.io.read(u64::from(port), access) {
                        let len = access.len();
                        unassigned_port(shared, id, "read", port, len);
                    }
                }
            }
            VcpuExit::IoOut { port, size, data } => {
                counters.io.fetch_add(1, Ordering::Relaxed);
                for access in data.chunks(size.max(1)) {
                    if !shared.io.write(u64::from(port), access) {
                        unassigned_port(shared, id, "write", port, access.len());
                    }
                }
            }
            VcpuExit::MmioRead { addr, data } => {
                counters.mmio.fetch_add(1, Ordering::Relaxed);
                if !shared.mmio.read(addr, data) {
                    tracing::debug!("vcpu {id}: read of unassigned MMIO {addr:#x}");
                }
            }
            VcpuExit::MmioWrite { addr, data } => {
                counters.mmio.fetch_add(1, Ordering::Relaxed);
                if !shared.mmio.write(addr, data) {
                    tracing::debug!("vcpu {id}: write to unassigned MMIO {addr:#x}");
                }
            }
            VcpuExit::Shutdown => shared.exits.request(ExitRequest::TripleFault),
            VcpuExit::SystemReset => shared.exits.request(ExitRequest::Reset),
            VcpuExit::SystemPowerOff => shared.exits.request(ExitRequest::PowerOff),
            VcpuExit::EmulationFailure => {
                match vcpu.assist_emulation() {
                    Ok(Some(kind)) => {
                        *counters
                            .assists
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .entry(kind)
                            .or_insert(0) += 1;
                        continue;
                    }
                    Ok(None) => {}
                    Err(e) => tracing::warn!("vcpu {id}: emulation assist failed: {e}"),
                }
                let failure = vcpu.emulation_failure();
                shared
                    .exits
                    .request(ExitRequest::Error(format!("vcpu {id}: {failure}")));
            }
            VcpuExit::Failed(why) => shared
                .exits
                .request(ExitRequest::Error(format!("vcpu {id}: {why}"))),
            VcpuExit::Interrupted => {
                counters.interrupted.fetch_add(1, Ordering::Relaxed);
                serve_requests(vcpu, &shared.requests[id as usize]);
                shared.park_if_pausing(vcpu);
                if shared.halt_check[id as usize].load(Ordering::SeqCst) {
                    let idle = match (vcpu.started(), vcpu.halted_for_good()) {
                        (Ok(false), _) | (_, Ok(true)) => IDLE_FOR_GOOD,
                        _ => RUNNING,
                    };
                    shared.states[id as usize].store(idle, Ordering::SeqCst);
                    shared.halt_check[id as usize].store(false, Ordering::SeqCst);
                }
            }
        }
    }
}

fn serve_requests(vcpu: &mut dyn Vcpu, queue: &Mutex<Vec<VcpuRequest>>) {
    let pending = std::mem::take(&mut *queue.lock().unwrap_or_else(|e| e.into_inner()));
    for request in pending {
        // A requester that gave up has dropped its receiver: nothing to do.
        match request {
            VcpuRequest::Registers(reply) => {
                let _ = reply.send(vcpu.registers().map_err(|e| e.to_string()));
            }
            VcpuRequest::Nmi(reply) => {
                let _ = reply.send(vcpu.inject_nmi().map_err(|e| e.to_string()));
            }
        }
    }
}
