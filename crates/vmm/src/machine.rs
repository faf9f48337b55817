//! Assembling the machine from the tree: the hypervisor VM, the buses, the
//! PCI functions, the platform devices, the firmware tables and the guest.

use std::path::Path;
use std::sync::{Arc, Mutex};

use rhyve_boot::{AcpiPlatform, CpuTopology, PciWindows};
use rhyve_config::ConfigTree;
use rhyve_devices::lpc::{create_platform_devices, PlatformDevices};
use rhyve_devices::qemu_fwcfg::QemuFwCfg;
use rhyve_hypervisor::kvm::KvmVm;
use rhyve_hypervisor::registry::{Registry, VmHandle};
use rhyve_hypervisor::{EntryRegs, MemoryImage, Vcpu, Vm, VmSpec};
use rhyve_pci::{create_function, PciBdf, PciRoot, PciRootConfig};
use rhyve_platform::bus::Bus;
use rhyve_platform::exit::ExitRequests;
use rhyve_platform::snapshot::{Inventory, Lifecycle, Stateful};
use rhyve_virtio::pci::VirtioPci;
use vm_memory::{Bytes, GuestAddress};

use crate::{snapshot, VmmError};

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
    pub vm: Arc<dyn Vm>,
    /// Every device, for snapshots.
    pub inventory: Arc<Inventory>,
    /// Guest RAM regions (address, bytes).
    pub ram: Vec<(u64, u64)>,
    /// Restored from a snapshot: its devices were paused when saved, and
    /// are resumed just before the vCPUs start.
    pub restored: bool,
    /// The registry entry, held (locked) while the VM runs.
    pub named: VmHandle,
}

/// The machine's inventory, in build order: platform devices (the VM
/// clock first), the boot ROM's variable store and fwctl, fbuf's VGA
/// ports, fw_cfg, then the PCI functions and the PCI root.
fn inventory(
    platform: &PlatformDevices,
    pci: &Arc<PciRoot>,
    firmware_and_fbuf: Vec<Arc<dyn Lifecycle>>,
) -> Result<Inventory, VmmError> {
    let mut inventory = Inventory::new();
    for device in platform
        .lifecycle()
        .into_iter()
        .chain(firmware_and_fbuf)
        .chain(pci.lifecycle())
    {
        inventory
            .register(device)
            .map_err(|e| VmmError::Setup(e.to_string()))?;
    }
    Ok(inventory)
}

/// bhyve's `init_pci`: every configured function, created from its node.
fn build_pci(
    tree: &ConfigTree,
    vm: &dyn Vm,
    spec: &VmSpec,
    io: &Arc<Bus>,
    mmio: &Arc<Bus>,
    console: &mut Option<crate::display::Console>,
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
        } else if f.model == "fbuf" {
            let (function, fbuf_console) = crate::display::create_fbuf(tree, &f.node, vm, io)?;
            *console = Some(fbuf_console);
            function
        } else if f.model == "ahci" {
            rhyve_storage::Ahci::from_config(tree, &f.node, vm.memory().clone())
                .map_err(|e| VmmError::Unsupported(format!("pci slot {bdf}: {e}")))?
        } else if f.model == "nvme" {
            rhyve_storage::Nvme::from_config(tree, &f.node, vm.memory().clone())
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
    fwcfg: Option<&mut QemuFwCfg>,
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
        acpi.qemu_fwcfg = fwcfg.is_some();
        rhyve_boot::write_acpi_tables(vm.memory(), &acpi).map_err(setup("ACPI tables"))?;
        // bhyve publishes the same tables through fw_cfg, with its loader.
        if let Some(fwcfg) = fwcfg {
            let tables = rhyve_boot::build_acpi_tables(&acpi).map_err(setup("ACPI tables"))?;
            for (name, data) in crate::fwcfg_acpi::files(&tables) {
                fwcfg
                    .add_file(&name, data)
                    .map_err(|e| VmmError::Setup(e.to_string()))?;
            }
        }
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

/// Build the whole machine the tree describes; with `restore`, put the
/// snapshot that file names back into it (`bhyve -r`) instead of loading
/// a guest.
pub fn build(
    tree: &ConfigTree,
    fw_cfg_files: &[rhyve_config::FwCfgFile],
    restore: Option<&Path>,
) -> Result<Machine, VmmError> {
    rhyve_config::validate(tree)?;
    crate::refuse_unsupported(tree)?;
    let mut spec = crate::vm_spec(tree)?;
    let bootrom = crate::bootrom::BootRom::from_tree(tree, spec.cpus)?;
    spec.rom_size = bootrom.as_ref().map_or(0, |b| b.rom_size());
    let fwcfg = match crate::fwcfg::wanted(tree)? {
        true => Some(Arc::new(Mutex::new(crate::fwcfg::build(
            tree,
            fw_cfg_files,
            spec.cpus,
            &spec.memory,
        )?))),
        false => None,
    };
    let refuse = |file: &Path| {
        let file = file.display().to_string();
        move |e: String| VmmError::Setup(format!("cannot restore {file}: {e}"))
    };
    // Read and checked before anything is built: a refused snapshot
    // leaves no trace.
    let started = std::time::Instant::now();
    let snapshot = match restore {
        Some(file) => {
            let loaded = snapshot::load(file).map_err(refuse(file))?;
            loaded
                .check_machine(file, spec.cpus, &spec.memory.ram_regions())
                .map_err(refuse(file))?;
            spec.memory_image = Some(MemoryImage {
                file: loaded.memory.clone(),
            });
            Some((file, loaded))
        }
        None => None,
    };
    let named = take_named_vm(tree, &spec)?;
    // Threads started from here on (device workers, timers, serial) are
    // created confined.
    crate::confine::start(tree, Registry::from_env().root())?;
    let vm: Arc<dyn Vm> = Arc::new(KvmVm::new(spec.clone())?);
    let io = Arc::new(Bus::new());
    let mmio = Arc::new(Bus::new());
    let exits = Arc::new(ExitRequests::new());
    let mut console = None;
    let pci = build_pci(tree, vm.as_ref(), &spec, &io, &mmio, &mut console)?;
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
    let mut firmware_and_fbuf = bootrom.as_ref().map_or_else(Vec::new, |b| b.lifecycle());
    firmware_and_fbuf.extend(console.as_ref().map_or_else(Vec::new, |c| c.lifecycle()));
    if let Some(fwcfg) = &fwcfg {
        firmware_and_fbuf.push(Stateful::new(
            "fwcfg",
            fwcfg.clone(),
            |f: &QemuFwCfg| f.clone(),
            QemuFwCfg::restore,
        ));
    }
    // fbuf's VNC server types into the i8042; with `wait` no vCPU exists
    // until a client connects. After a restore it starts once the screen
    // and the keyboard hold their saved state: a client connecting
    // earlier would be shown the fresh device's screen.
    let start_console = move |i8042: &Arc<Mutex<rhyve_devices::i8042::I8042>>| match console {
        Some(console) => console.start(i8042.clone()),
        None => Ok(()),
    };
    // The guest first: the firmware tables then overwrite anything a
    // loader's page-granular boot image carried into the BIOS area. A boot
    // ROM is the guest: the boot vCPU starts at its reset vector, in the
    // state KVM creates vCPUs in; the others wait for INIT/SIPI.
    let inventory = Arc::new(inventory(&platform, &pci, firmware_and_fbuf)?);
    if let Some((file, loaded)) = &snapshot {
        // The ROM is not in the snapshot (it is not RAM): load it again.
        if let Some(rom) = bootrom {
            rom.install(vm.memory(), &mmio, &io)?;
        }
        vm.restore_state(&loaded.kern.vm)
            .map_err(|e| refuse(file)(e.to_string()))?;
        let mut vcpus = Vec::with_capacity(spec.cpus as usize);
        for (id, state) in (0..spec.cpus).zip(&loaded.kern.vcpus) {
            let mut vcpu = vm.create_vcpu(id)?;
            vcpu.restore_state(state)
                .map_err(|e| refuse(file)(e.to_string()))?;
            vcpus.push(vcpu);
        }
        inventory
            .restore(&loaded.meta.devices)
            .map_err(|e| refuse(file)(e.to_string()))?;
        start_console(&platform.i8042)?;
        if let Some(fwcfg) = fwcfg {
            crate::fwcfg::install(fwcfg, &io)?;
        }
        tracing::info!(
            "snapshot {} restored in {:?}",
            file.display(),
            started.elapsed()
        );
        return Ok(Machine {
            restored: true,
            named,
            platform,
            pci,
            vcpus,
            io,
            mmio,
            exits,
            vm,
            inventory,
            ram: spec.memory.ram_regions(),
        });
    }
    start_console(&platform.i8042)?;
    let entry = match bootrom {
        Some(rom) => {
            rom.install(vm.memory(), &mmio, &io)?;
            None
        }
        None => Some(load_guest(tree, vm.as_ref(), &spec, &named)?),
    };
    {
        let mut items = fwcfg
            .as_ref()
            .map(|f| f.lock().unwrap_or_else(|e| e.into_inner()));
        write_tables(
            tree,
            vm.as_ref(),
            &spec,
            &pci,
            &platform,
            items.as_deref_mut(),
        )?;
    }
    // bhyve offers QEMU's fw_cfg with or without a boot ROM; fwctl, on
    // the same ports, only to a boot ROM.
    if let Some(fwcfg) = fwcfg {
        crate::fwcfg::install(fwcfg, &io)?;
    }
    let mut vcpus = Vec::with_capacity(spec.cpus as usize);
    for id in 0..spec.cpus {
        vcpus.push(vm.create_vcpu(id)?);
    }
    if let Some(entry) = entry {
        vcpus[0].set_entry(&entry)?;
    }
    Ok(Machine {
        restored: false,
        inventory,
        ram: spec.memory.ram_regions(),
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
