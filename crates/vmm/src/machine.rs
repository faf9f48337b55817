//! Assembling the machine from the tree: the hypervisor VM, the buses, the
//! PCI functions, the platform devices, the firmware tables and the guest.

use std::sync::Arc;

use rhyve_boot::{AcpiPlatform, CpuTopology, PciWindows};
use rhyve_config::ConfigTree;
use rhyve_devices::lpc::{create_platform_devices, PlatformDevices};
use rhyve_hypervisor::kvm::KvmVm;
use rhyve_hypervisor::registry::{Registry, VmHandle};
use rhyve_hypervisor::{EntryRegs, Vcpu, Vm, VmSpec};
use rhyve_pci::{create_function, PciBdf, PciRoot, PciRootConfig};
use rhyve_platform::bus::Bus;
use rhyve_platform::exit::ExitRequests;
use rhyve_virtio::pci::VirtioPci;
use vm_memory::{Bytes, GuestAddress};

use crate::VmmError;

fn setup<E: std::fmt::Display>(what: &'static str) -> impl Fn(E) -> VmmError {
    move |e| VmmError::Setup(format!("{what}: {e}"))
}

/// A built VM, ready for its vCPUs to run.
pub struct Machine {
    // Devices first: they hold guest memory mappings and threads that must
    // stop before the VM goes away.
    pub platform: PlatformDevices,
    pub pci: Arc<PciRoot>,
    pub vcpus: Vec<Box<dyn Vcpu>>,
    pub io: Arc<Bus>,
    pub mmio: Arc<Bus>,
    pub exits: Arc<ExitRequests>,
    pub vm: Box<dyn Vm>,
    /// The registry entry, held (locked) while the VM runs.
    pub named: VmHandle,
}

/// bhyve's `init_pci`: every configured function, created from its node.
fn build_pci(
    tree: &ConfigTree,
    vm: &dyn Vm,
    spec: &VmSpec,
    io: &Arc<Bus>,
    mmio: &Arc<Bus>,
) -> Result<Arc<PciRoot>, VmmError> {
    let config =
        PciRootConfig::from_tree(tree, io.clone(), mmio.clone(), spec.memory, vm.interrupts())
            .map_err(setup("PCI"))?;
    let root = PciRoot::new(config).map_err(setup("PCI"))?;
    let ctx = root.context();
    let vm_name = tree.get("name").ok().flatten().unwrap_or_default();
    for f in rhyve_config::pci_functions(tree)? {
        let bdf = PciBdf::new(f.bus.into(), f.slot.into(), f.func.into()).map_err(setup("PCI"))?;
        let function: rhyve_pci::SharedFunction = if f.model.starts_with("virtio-") {
            VirtioPci::from_config(
                tree,
                &f.node,
                vm.memory().clone(),
                &vm_name,
                f.slot,
                f.func,
                Some(vm.notifiers()),
            )
            .map_err(|e| VmmError::Unsupported(format!("pci slot {bdf}: {e}")))?
        } else if f.model == "ahci" {
            rhyve_storage::Ahci::from_config(tree, &f.node, vm.memory().clone())
                .map_err(|e| VmmError::Unsupported(format!("pci slot {bdf}: {e}")))?
        } else if f.model == "e1000" {
            rhyve_net::E1000::from_config(
                tree,
                &f.node,
                &vm_name,
                f.slot,
                f.func,
                vm.memory().clone(),
            )
            .map_err(|e| VmmError::Unsupported(format!("pci slot {bdf}: {e}")))?
        } else {
            create_function(&f.model, tree, &f.node, &ctx)
                .map_err(|e| VmmError::Unsupported(e.to_string()))?
        };
        root.add_function(bdf, function).map_err(setup("PCI"))?;
    }
    root.finalize().map_err(setup("PCI"))?;
    Ok(root)
}

/// Where the boot vCPU starts: a kernel given with `-o boot.kernel`, or what
/// a loader (grub-bhyve) left in the named VM.
fn load_guest(
    tree: &ConfigTree,
    vm: &dyn Vm,
    spec: &VmSpec,
    entry: &VmHandle,
) -> Result<EntryRegs, VmmError> {
    let get = |k: &str| tree.get(k).map_err(|e| VmmError::Config(e.to_string()));
    if let Some(kernel) = get("boot.kernel")? {
        let initrd = get("boot.initrd")?;
        let cmdline = get("boot.cmdline")?.unwrap_or_default();
        let loaded = rhyve_boot::load_linux(
            vm.memory(),
            std::path::Path::new(&kernel),
            initrd.as_deref().map(std::path::Path::new),
            &cmdline,
            &spec.memory,
        )
        .map_err(|e| VmmError::Setup(e.to_string()))?;
        return Ok(*loaded.regs());
    }
    let record = entry.record().map_err(setup("registry"))?;
    let Some(regs) = record.entry else {
        return Err(VmmError::Unsupported(format!(
            "no guest to start in VM {}: load one with grub-bhyve first, give a kernel with -o boot.kernel=PATH, or a firmware with -l bootrom,ROM (bhyveload is not supported yet)",
            entry.name()
        )));
    };
    for (addr, bytes) in entry.boot_image().map_err(setup("registry"))? {
        vm.memory()
            .write_slice(&bytes, GuestAddress(addr))
            .map_err(|e| {
                VmmError::Setup(format!("VM {}: boot image at {addr:#x}: {e}", entry.name()))
            })?;
    }
    Ok(regs)
}

/// bhyve's `vm_open`/`vm_create` plus `vm_setup_memory`: take the named VM
/// and check a loader prepared it for this much memory.
fn take_named_vm(tree: &ConfigTree, spec: &VmSpec) -> Result<VmHandle, VmmError> {
    let name = tree
        .get("name")
        .map_err(|e| VmmError::Config(e.to_string()))?
        .ok_or_else(|| VmmError::Config("no VM name".into()))?;
    let handle = Registry::from_env()
        .open_or_create(&name)
        .map_err(|e| VmmError::Setup(e.to_string()))?;
    let mut record = handle.record().map_err(setup("registry"))?;
    let size = spec.memory.total();
    if record.entry.is_some() && record.memory_size.is_some_and(|m| m != size) {
        return Err(VmmError::Setup(format!(
            "Unable to setup memory (22): VM {name} was loaded with {} MiB, -m asks for {} MiB",
            record.memory_size.unwrap_or(0) >> 20,
            size >> 20
        )));
    }
    record.memory_size = Some(size);
    // Registers of an earlier run no longer describe this one.
    record.vcpus_at_stop.clear();
    handle.save(&record).map_err(setup("registry"))?;
    Ok(handle)
}

/// The firmware tables bhyve puts in the BIOS area.
fn write_tables(
    tree: &ConfigTree,
    vm: &dyn Vm,
    spec: &VmSpec,
    pci: &PciRoot,
    platform: &PlatformDevices,
) -> Result<(), VmmError> {
    let routes: Vec<rhyve_boot::PciIntxRoute> = pci
        .intx_routes()
        .into_iter()
        .map(|r| rhyve_boot::PciIntxRoute {
            bus: r.bus,
            slot: r.slot,
            pin: r.pin,
            gsi: r.gsi,
            pirq: r.pirq,
        })
        .collect();
    if tree
        .bool_or("acpi_tables", true)
        .map_err(|e| VmmError::Config(e.to_string()))?
    {
        let mut acpi = AcpiPlatform::new(spec.cpus, spec.memory, platform.hpet_capabilities());
        acpi.com_ports = platform
            .com_ports
            .iter()
            .enumerate()
            .map(|(i, c)| (c.base, c.irq, i as u8 + 1))
            .collect();
        acpi.pci_intx = routes.clone();
        acpi.lpc = pci.lpc_bdf().map(|b| (b.slot, b.func));
        acpi.i8042 = true;
        acpi.pci_windows = Some(PciWindows::for_layout(&spec.memory));
        rhyve_boot::write_acpi_tables(vm.memory(), &acpi).map_err(setup("ACPI tables"))?;
    }
    if tree
        .bool_or("x86.mptable", true)
        .map_err(|e| VmmError::Config(e.to_string()))?
    {
        if rhyve_boot::build_mptable(spec.cpus, &routes).is_err() {
            let max = most_that_fit(spec.cpus, |n| rhyve_boot::build_mptable(n, &routes).is_ok());
            return Err(VmmError::Setup(format!(
                "-c {}: the MP table (0xF0000-0xF1000, one entry per vCPU) describes at most {max} vCPUs on this machine; leave it out with -Y (guests then find the vCPUs in ACPI's MADT)",
                spec.cpus
            )));
        }
        rhyve_boot::write_mptable(vm.memory(), spec.cpus, &routes).map_err(setup("MP table"))?;
    }
    let topology = |sockets: u32| CpuTopology {
        sockets: sockets as u16,
        cores: spec.cores as u16,
        threads: spec.threads as u16,
    };
    if rhyve_boot::build_smbios(tree, &spec.memory, topology(spec.sockets)).is_err() {
        let max = most_that_fit(spec.sockets, |n| {
            rhyve_boot::build_smbios(tree, &spec.memory, topology(n)).is_ok()
        });
        if max > 0 {
            return Err(VmmError::Setup(format!(
                "-c {}: {} sockets do not fit in SMBIOS: its area (0xF1000-0xF2400, as bhyve's) holds one processor structure per socket, for at most {max} sockets; give the vCPUs as cores (-c {},sockets=1,cores={})",
                spec.cpus, spec.sockets, spec.cpus, spec.cpus
            )));
        }
    }
    rhyve_boot::write_smbios(vm.memory(), tree, &spec.memory, topology(spec.sockets))
        .map_err(setup("SMBIOS"))?;
    Ok(())
}

/// The largest `n` in 1..`limit` for which `fits(n)` holds (0 if none),
/// `fits` holding for every number up to some bound: how many vCPUs or
/// sockets a firmware table has room for.
fn most_that_fit(limit: u32, fits: impl Fn(u32) -> bool) -> u32 {
    let (mut lo, mut hi) = (0, limit);
    while lo + 1 < hi {
        let mid = lo + (hi - lo) / 2;
        if fits(mid) {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    lo
}

/// Build the whole machine the tree describes.
pub fn build(tree: &ConfigTree) -> Result<Machine, VmmError> {
    rhyve_config::validate(tree)?;
    crate::refuse_unsupported(tree)?;
    let mut spec = crate::vm_spec(tree)?;
    let bootrom = crate::bootrom::BootRom::from_tree(tree)?;
    spec.rom_size = bootrom.as_ref().map_or(0, |b| b.rom_size());
    let named = take_named_vm(tree, &spec)?;
    // Threads started from here on (device workers, timers, serial) are
    // created confined.
    crate::confine::start(tree, Registry::from_env().root())?;
    let vm: Box<dyn Vm> = Box::new(KvmVm::new(spec.clone())?);
    let io = Arc::new(Bus::new());
    let mmio = Arc::new(Bus::new());
    let exits = Arc::new(ExitRequests::new());
    let pci = build_pci(tree, vm.as_ref(), &spec, &io, &mmio)?;
    let platform = create_platform_devices(
        tree,
        &io,
        &mmio,
        vm.interrupts(),
        exits.clone(),
        &spec.memory,
    )
    .map_err(|e| VmmError::Setup(e.to_string()))?;
    if !platform.reset_on_bus {
        pci.set_reset_register(platform.reset.clone());
    }
    // The guest first: the firmware tables then overwrite anything a
    // loader's page-granular boot image carried into the BIOS area. A boot
    // ROM is the guest: the boot vCPU starts at its reset vector, in the
    // state KVM creates vCPUs in; the others wait for INIT/SIPI.
    let entry = match bootrom {
        Some(rom) => {
            rom.install(vm.memory(), &mmio, &io, spec.cpus)?;
            None
        }
        None => Some(load_guest(tree, vm.as_ref(), &spec, &named)?),
    };
    write_tables(tree, vm.as_ref(), &spec, &pci, &platform)?;
    let mut vcpus = Vec::with_capacity(spec.cpus as usize);
    for id in 0..spec.cpus {
        vcpus.push(vm.create_vcpu(id)?);
    }
    if let Some(entry) = entry {
        vcpus[0].set_entry(&entry)?;
    }
    Ok(Machine {
        named,
        platform,
        pci,
        vcpus,
        io,
        mmio,
        exits,
        vm,
    })
}
