//! Builds a bhyve VM from the config tree and runs it (bhyve's `bhyverun.c`).
//!
//! The flow is one way: [`run`] reads only the tree, asks the hypervisor
//! backend for a VM, puts the devices on the buses, loads the guest, starts
//! one thread per vCPU and supervises them until something ends the VM; the
//! reason becomes bhyve's exit status.

pub mod bhyvectl;
mod bootrom;
mod confine;
pub mod control;
mod display;
mod fwcfg;
mod fwcfg_acpi;
mod loader;
mod machine;
mod proctitle;
mod signals;
pub mod snapshot;
mod spec;
mod vcpu;

use rhyve_sandbox::ThreadRole;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

use rhyve_config::ConfigTree;
use rhyve_platform::exit::{ExitRequest, ExitRequests};
use vmm_sys_util::signal::Killable;

pub use loader::prepare_named_vm;
pub use machine::{build, Machine};
pub use spec::vm_spec;
pub use vcpu::{VcpuRequest, VcpuShared};

#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    #[error("{0}")]
    Config(String),
    /// A tree error with bhyve's own message and exit status.
    #[error("{}", .0.message)]
    Cli(rhyve_config::CliError),
    #[error("{0}")]
    Unsupported(String),
    #[error(transparent)]
    Hypervisor(#[from] rhyve_hypervisor::HvError),
    #[error("{0}")]
    Setup(String),
}

impl From<rhyve_config::CliError> for VmmError {
    fn from(e: rhyve_config::CliError) -> Self {
        VmmError::Cli(e)
    }
}

/// How often the supervisor looks at signals.
const TICK: Duration = Duration::from_millis(50);
/// Halt checks happen every this many ticks.
const HALT_CHECK_TICKS: u32 = 4;

/// Hooks the supervisor needs from the platform devices and the registry.
pub struct Supervision<'a> {
    /// True once the guest has switched ACPI on (SMI_CMD 0xA0).
    pub acpi_enabled: Box<dyn Fn() -> bool + Send>,
    /// Press the ACPI power button.
    pub press_power_button: Box<dyn Fn() + Send>,
    /// Put the terminal back before the process dies of a signal.
    pub restore_terminal: Box<dyn Fn() + Send>,
    /// True once `bhyvectl --destroy` asked for the VM to go away.
    pub destroy_requested: Box<dyn Fn() -> bool + 'a>,
}

impl VmmError {
    /// bhyve's exit status for a VM that could not be set up.
    pub fn status(&self) -> i32 {
        match self {
            VmmError::Cli(e) => e.status,
            _ => rhyve_config::EXIT_ERROR,
        }
    }
}

/// Build the VM the tree describes (with the `-f` files for QEMU's fw_cfg,
/// `lpc.fwcfg=qemu`; restored from the snapshot `restore` names, for
/// `bhyve -r`) and run it to the end; returns bhyve's exit status.
pub fn run(
    tree: &ConfigTree,
    fw_cfg_files: &[rhyve_config::FwCfgFile],
    restore: Option<&std::path::Path>,
) -> i32 {
    // bhyve -r FILE without a VM name: the snapshot's.
    let named_tree;
    let tree = match restore {
        Some(file) if matches!(tree.get("name"), Ok(None)) => {
            let name = match snapshot::saved_name(file) {
                Ok(n) => n,
                Err(e) => {
                    eprintln!("bhyve: cannot restore {}: {e}", file.display());
                    return rhyve_config::EXIT_ERROR;
                }
            };
            let mut t = tree.clone();
            if let Err(e) = t.set("name", name) {
                eprintln!("bhyve: {e}");
                return rhyve_config::EXIT_ERROR;
            }
            named_tree = t;
            &named_tree
        }
        _ => tree,
    };
    // Before the VM is visible in the registry, so whoever finds it there
    // also finds `bhyve: NAME` in ps.
    if let Ok(Some(name)) = tree.get("name") {
        proctitle::set(&name);
    }
    let machine = match machine::build(tree, fw_cfg_files, restore) {
        Ok(m) => m,
        Err(e) => {
            eprintln!("bhyve: {e}");
            return e.status();
        }
    };
    let Machine {
        mut platform,
        pci,
        vcpus,
        io,
        mmio,
        exits,
        vm,
        inventory,
        ram,
        restored,
        named,
    } = machine;
    let strict_io = tree.bool_or("x86.strictio", false).unwrap_or(false);
    let pinning = match rhyve_config::vcpu_pinning(tree, vcpus.len() as u16) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("{}", e.message);
            return e.status;
        }
    };
    let shared = Arc::new(VcpuShared::new(io, mmio, exits.clone(), strict_io, pinning));
    let control = control::ControlServer {
        shared: shared.clone(),
        exits: exits.clone(),
        memory: vm.memory().clone(),
        snapshots: snapshot::Snapshotter {
            name: named.name().to_string(),
            vm: vm.clone(),
            inventory: inventory.clone(),
            shared: shared.clone(),
            ram,
        },
    };
    if let Err(e) = control.spawn(&named) {
        tracing::warn!("no control socket for bhyvectl: {e}");
    }
    // The signal handlers go in before the main thread gives up rt_sigaction
    // for anything but SIGTERM's last act.
    signals::install();
    // A restored machine's devices were paused when saved; their threads
    // start before the supervisor gives up creating descriptors.
    if restored {
        inventory.resume();
    }
    if let Err(e) = rhyve_sandbox::confine_supervisor() {
        eprintln!("bhyve: sandbox: {e}");
        return rhyve_config::EXIT_ERROR;
    }
    #[cfg(debug_assertions)]
    confine::test_open(tree);
    let (pm_query, pm_press) = (platform.pm.clone(), platform.pm.clone());
    let hooks = Supervision {
        acpi_enabled: Box::new(move || pm_query.lock().map(|p| p.acpi_enabled()).unwrap_or(false)),
        press_power_button: Box::new(move || {
            if let Ok(mut pm) = pm_press.lock() {
                pm.power_button();
            }
        }),
        restore_terminal: Box::new(rhyve_backends::serial::restore_terminal),
        destroy_requested: Box::new(|| named.destroy_requested()),
    };
    // The snapshot's RTC (NVRAM included) is the one a restored guest knew.
    if let (false, Some(nvram)) = (restored, named.record().ok().and_then(|r| r.rtc_nvram)) {
        platform
            .rtc
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .restore_nvram(&nvram);
    }
    let why = supervise(vcpus, shared.clone(), exits, hooks);
    // The VM outlives this process: keep what its RTC remembers and where
    // its vCPUs stopped.
    if let Ok(mut record) = named.record() {
        record.vcpus_at_stop = shared.registers_at_stop();
        record.rtc_nvram = Some(
            platform
                .rtc
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .nvram(),
        );
        let _ = named.save(&record);
    }
    platform.shutdown();
    drop(pci);
    drop(vm);
    if let ExitRequest::Error(msg) = &why {
        eprintln!("bhyve: {msg}");
    }
    // -D: a guest power-off destroys the VM; -M (monitor mode): the VM goes
    // away with this process whatever ended it; otherwise it stays listed.
    // A suspended VM lives on in its snapshot only, as bhyve destroys it.
    let destroy = (why == ExitRequest::PowerOff
        && tree.bool_or("destroy_on_poweroff", false).unwrap_or(false))
        || tree.bool_or("monitor", false).unwrap_or(false)
        || why == ExitRequest::Suspended;
    if destroy {
        if let Err(e) = named.destroy() {
            eprintln!("bhyve: {e}");
        }
    }
    tracing::info!("VM stopped: {why:?}");
    why.status()
}

/// Run vCPU threads until the VM stops; returns why it stopped.
pub fn supervise(
    vcpus: Vec<Box<dyn rhyve_hypervisor::Vcpu>>,
    shared: Arc<VcpuShared>,
    exits: Arc<ExitRequests>,
    hooks: Supervision,
) -> ExitRequest {
    let (wake_tx, wake_rx) = mpsc::channel::<()>();
    exits.set_waker(Box::new(move || {
        let _ = wake_tx.send(());
    }));
    let mut threads = Vec::new();
    for vcpu in vcpus {
        let shared = shared.clone();
        let name = format!("vcpu {}", vcpu.id());
        match rhyve_sandbox::spawn(ThreadRole::Vcpu, name, move || vcpu::run_vcpu(vcpu, shared)) {
            Ok(t) => threads.push(t),
            Err(e) => {
                exits.request(ExitRequest::Error(format!(
                    "cannot start a vCPU thread: {e}"
                )));
                break;
            }
        }
    }
    let kick_all = |threads: &[std::thread::JoinHandle<()>]| {
        for t in threads {
            if !t.is_finished() {
                let _ = t.kill(signals::kick_signal());
            }
        }
    };
    let mut tick = 0u32;
    let mut idle_rounds = 0u32;
    loop {
        if exits.pending().is_some() {
            break;
        }
        match wake_rx.recv_timeout(TICK) {
            Ok(()) | Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) => {}
        }
        if (hooks.destroy_requested)() {
            exits.request(ExitRequest::Error(
                "the VM was destroyed (bhyvectl --destroy)".into(),
            ));
            break;
        }
        if signals::take_sigterm() {
            if (hooks.acpi_enabled)() {
                (hooks.press_power_button)();
            } else {
                // bhyve leaves SIGTERM its default action until ACPI is on.
                (hooks.restore_terminal)();
                signals::die_by_sigterm();
            }
        }
        tick += 1;
        if tick.is_multiple_of(HALT_CHECK_TICKS) {
            if shared.halt_check_answered() {
                idle_rounds = if shared.all_idle() {
                    idle_rounds + 1
                } else {
                    0
                };
                // Two rounds in a row: no vCPU was merely between two states.
                if idle_rounds >= 2 {
                    exits.request(ExitRequest::Halt);
                    break;
                }
            }
            shared.request_halt_check();
            kick_all(&threads);
        }
        if threads.iter().all(|t| t.is_finished()) {
            break;
        }
    }
    // Kick until every vCPU thread has left the guest.
    while threads.iter().any(|t| !t.is_finished()) {
        kick_all(&threads);
        std::thread::sleep(Duration::from_millis(1));
    }
    for t in threads {
        let _ = t.join();
    }
    exits
        .pending()
        .unwrap_or_else(|| ExitRequest::Error("all vCPUs stopped without a reason".into()))
}

/// Check the tree for what this runtime cannot honour yet: refuse clearly
/// rather than run a different machine than asked for.
pub fn refuse_unsupported(tree: &ConfigTree) -> Result<(), VmmError> {
    let unsupported = |what: &str| {
        Err(VmmError::Unsupported(format!(
            "{what} is not supported yet"
        )))
    };
    if tree.get_u64("gdb.port").ok().flatten().unwrap_or(0) != 0 {
        return unsupported("the GDB stub (-G)");
    }
    if tree.is_node("tpm") || tree.get_raw("tpm.type").is_some() {
        return unsupported("a TPM (-l tpm)");
    }
    if tree.is_node("domains") {
        return unsupported("NUMA domains (-n)");
    }
    // bhyve gives each further bus a host bridge of its own in the DSDT;
    // rhyve's firmware tables describe bus 0 only.
    if let Some(f) = rhyve_config::pci_functions(tree)?
        .into_iter()
        .find(|f| f.bus != 0)
    {
        return Err(VmmError::Unsupported(format!(
            "pci slot {}:{}:{}: PCI bus {} is not supported yet: the firmware tables describe bus 0 only (use -s {}:{})",
            f.bus, f.slot, f.func, f.bus, f.slot, f.func
        )));
    }
    Ok(())
}
