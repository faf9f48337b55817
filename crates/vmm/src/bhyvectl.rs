//! `bhyvectl`, as bhyvectl(8): long options only, `--vm=NAME` required.
//! A running VM is reached through its control socket; a VM that only
//! exists in the registry answers from what it left there when it stopped
//! (its vCPUs' registers) or what its loader prepared.

use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rhyve_hypervisor::registry::{Registry, RegistryError};

use crate::{control, snapshot};

/// Registers in the order bhyvectl prints them with `--get-all`.
const REGISTERS: &[&str] = &[
    "cr0", "cr2", "cr3", "cr4", "rsp", "rip", "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp",
    "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15", "rflags", "efer", "cs", "ds", "es", "fs",
    "gs", "ss", "tr", "ldtr",
];

#[derive(Default)]
struct Options {
    vm: Option<String>,
    cpu: usize,
    create: bool,
    destroy: bool,
    force_reset: bool,
    force_poweroff: bool,
    get_stats: bool,
    get_all: bool,
    inject_nmi: bool,
    list: bool,
    registers: Vec<&'static str>,
    /// `--checkpoint=FILE` / `--suspend=FILE`: where, and whether the VM stops.
    snapshot: Option<(String, bool)>,
}

pub fn usage() -> String {
    let mut u = String::from(
        "Usage: bhyvectl --vm=<vmname>\n       [--cpu=<vcpu_number>]\n       [--create]\n       [--destroy]\n       [--get-all]\n       [--get-stats]\n",
    );
    for r in REGISTERS {
        u.push_str(&format!("       [--get-{r}]\n"));
    }
    u.push_str("       [--inject-nmi]\n       [--force-reset]\n       [--force-poweroff]\n       [--list]\n");
    u.push_str("       [--checkpoint=<filename>]\n       [--suspend=<filename>]\n");
    u
}

fn parse(args: &[String]) -> Result<Options, ()> {
    let mut o = Options::default();
    let mut i = 0;
    while i < args.len() {
        let arg = &args[i];
        i += 1;
        let Some(long) = arg.strip_prefix("--") else {
            return Err(());
        };
        let (name, inline) = match long.split_once('=') {
            Some((n, v)) => (n, Some(v.to_string())),
            None => (long, None),
        };
        // getopt_long: a required argument is `--opt=value` or the next word.
        let mut value = || -> Result<String, ()> {
            if let Some(v) = inline.clone() {
                return Ok(v);
            }
            let v = args.get(i).cloned().ok_or(())?;
            i += 1;
            Ok(v)
        };
        match name {
            "vm" => o.vm = Some(value()?),
            // atoi(3): garbage reads as 0.
            "cpu" => o.cpu = value()?.trim().parse().unwrap_or(0),
            "create" => o.create = true,
            "destroy" => o.destroy = true,
            "force-reset" => o.force_reset = true,
            "force-poweroff" => o.force_poweroff = true,
            "get-stats" => o.get_stats = true,
            "get-all" => o.get_all = true,
            "inject-nmi" => o.inject_nmi = true,
            "list" => o.list = true,
            "checkpoint" => o.snapshot = Some((value()?, false)),
            "suspend" => o.snapshot = Some((value()?, true)),
            _ => match name
                .strip_prefix("get-")
                .and_then(|r| REGISTERS.iter().find(|x| **x == r))
            {
                Some(r) => o.registers.push(r),
                None => return Err(()),
            },
        }
    }
    Ok(o)
}

/// How long `--destroy` waits for the VM's bhyve to stop: it notices the
/// request within a tick once running, but may first have a machine to
/// build on a loaded host.
const DESTROY_TIMEOUT: Duration = Duration::from_secs(60);

/// bhyvectl --destroy: ask whoever holds the VM to stop, take the VM once it
/// is free and remove it. Success means the VM is gone: no process runs it
/// and the registry no longer lists it.
fn destroy(registry: &Registry, name: &str) -> Result<(), String> {
    match registry.request_destroy(name) {
        Ok(()) => {}
        // Destroyed meanwhile (another bhyvectl, or bhyve -M ending).
        Err(RegistryError::NoSuchVm(_)) => return Ok(()),
        Err(e) => return Err(e.to_string()),
    }
    let deadline = Instant::now() + DESTROY_TIMEOUT;
    loop {
        match registry.open(name) {
            Ok(vm) => return vm.destroy().map_err(|e| e.to_string()),
            Err(RegistryError::NoSuchVm(_)) => return Ok(()),
            Err(RegistryError::Busy { pid, .. }) => {
                if Instant::now() > deadline {
                    registry.cancel_destroy(name);
                    let by = pid.map(|p| format!(" (pid {p})")).unwrap_or_default();
                    return Err(format!(
                        "VM {name} did not stop within {} s: the process using it{by} does not answer",
                        DESTROY_TIMEOUT.as_secs()
                    ));
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => return Err(e.to_string()),
        }
    }
}

/// Register values of a VM no bhyve runs: its vCPU's state when it stopped,
/// or the entry state a loader prepared; `None` if it has none.
fn stopped_registers(registry: &Registry, name: &str, cpu: usize) -> Option<Vec<(String, String)>> {
    let record = registry.record(name).ok()?;
    if let Some(regs) = record.vcpus_at_stop.get(cpu) {
        return Some(
            regs.iter()
                .map(|(k, v)| (k.clone(), format!("{v:#x}")))
                .collect(),
        );
    }
    match record.entry {
        Some(e) if cpu == 0 => Some(vec![
            ("rip".into(), format!("{:#x}", e.rip)),
            ("rsp".into(), format!("{:#x}", e.rsp)),
            ("rsi".into(), format!("{:#x}", e.rsi)),
            ("rbx".into(), format!("{:#x}", e.rbx)),
            ("cr0".into(), format!("{:#x}", e.cr0)),
            ("cr3".into(), format!("{:#x}", e.cr3)),
            ("cr4".into(), format!("{:#x}", e.cr4)),
            ("efer".into(), format!("{:#x}", e.efer)),
            ("rflags".into(), "0x2".into()),
            ("cs".into(), format!("{:#x}", e.code_selector)),
            ("ds".into(), format!("{:#x}", e.data_selector)),
        ]),
        _ => None,
    }
}

fn print_registers(cpu: usize, values: &[(String, String)], wanted: &[&str]) {
    for r in wanted {
        let v = values
            .iter()
            .find(|(k, _)| k == r)
            .and_then(|(_, v)| u64::from_str_radix(v.trim_start_matches("0x"), 16).ok())
            .unwrap_or(0);
        let tabs = if r.len() + format!("[{cpu}]").len() >= 8 {
            "\t"
        } else {
            "\t\t"
        };
        println!("{r}[{cpu}]{tabs}0x{v:016x}");
    }
}

/// Run bhyvectl with `args` (without the program name); returns the exit status.
pub fn main_with_args(args: &[String]) -> i32 {
    let Ok(o) = parse(args) else {
        eprint!("{}", usage());
        return 1;
    };
    let registry = Registry::from_env();
    if o.list {
        for vm in registry.list() {
            let mem = vm
                .record
                .memory_size
                .map(|m| format!("{}M", m >> 20))
                .unwrap_or_else(|| "-".into());
            match vm.running {
                Some(pid) => println!("{}\t{mem}\trunning (pid {pid})", vm.name),
                None => println!("{}\t{mem}\tstopped", vm.name),
            }
        }
        if o.vm.is_none() {
            return 0;
        }
    }
    let Some(name) = o.vm.clone() else {
        eprint!("{}", usage());
        return 1;
    };
    let fail = |msg: &str| {
        eprintln!("bhyvectl: {msg}");
        println!("errno = {}", libc::EINVAL);
        255
    };
    if o.create {
        match registry.create(&name) {
            Ok(_) => {}
            Err(RegistryError::Exists(_)) => {
                println!("errno = {}", libc::EEXIST);
                return 255;
            }
            Err(e) => return fail(&e.to_string()),
        }
    }
    if !registry.exists(&name) {
        println!("VM:{name} is not created.");
        return 1;
    }
    let running = registry.in_use(&name);
    let ask = |what: &str| -> Result<Vec<(String, String)>, String> {
        if !running {
            return Err(format!("VM {name} is not running"));
        }
        control::request(&registry, &name, what)
    };
    if o.inject_nmi {
        if let Err(e) = ask(&format!("nmi {}", o.cpu)) {
            return fail(&e);
        }
    }
    let mut wanted: Vec<&str> = o.registers.clone();
    if o.get_all {
        wanted = REGISTERS.to_vec();
    }
    if !wanted.is_empty() {
        let values = if running {
            match ask(&format!("regs {}", o.cpu)) {
                Ok(v) => v,
                Err(e) => return fail(&e),
            }
        } else {
            let Some(values) = stopped_registers(&registry, &name, o.cpu) else {
                let cpu = o.cpu;
                let why = "it never ran to a stop (not started, or its bhyve was killed)";
                return fail(&format!("VM {name} has no state for vcpu {cpu}: {why}"));
            };
            values
        };
        print_registers(o.cpu, &values, &wanted);
    }
    if o.get_stats || o.get_all {
        let stats = if running {
            match ask(&format!("stats {}", o.cpu)) {
                Ok(s) => s,
                Err(e) => return fail(&e),
            }
        } else {
            vec![("Resident memory".to_string(), "0".to_string())]
        };
        println!("vcpu{} stats:", o.cpu);
        for (desc, value) in stats {
            println!("{desc:<40}\t{value}");
        }
    }
    for (flag, request) in [(o.force_reset, "reset"), (o.force_poweroff, "poweroff")] {
        if flag {
            if let Err(e) = ask(request) {
                return fail(&e);
            }
        }
    }
    if let Some((file, stop)) = &o.snapshot {
        if !running {
            return fail(&format!("VM {name} is not running"));
        }
        if let Err(e) = snapshot(&registry, &name, Path::new(file), *stop) {
            return fail(&e);
        }
    }
    if o.destroy {
        if let Err(e) = destroy(&registry, &name) {
            return fail(&e);
        }
    }
    0
}

/// `--checkpoint`/`--suspend`: create the three files under temporary
/// names, let the VM write them, and put them in place (`FILE.meta`, which
/// a restore reads first, last), so a failed snapshot never replaces a
/// good one.
fn snapshot(registry: &Registry, name: &str, file: &Path, stop: bool) -> Result<(), String> {
    let finals = [
        file.to_path_buf(),
        snapshot::kern_path(file),
        snapshot::meta_path(file),
    ];
    let temps: Vec<PathBuf> = finals
        .iter()
        .map(|p| {
            let mut t = p.as_os_str().to_owned();
            t.push(format!(".partial-{}", std::process::id()));
            PathBuf::from(t)
        })
        .collect();
    let remove_temps = || {
        for t in &temps {
            let _ = std::fs::remove_file(t);
        }
    };
    let mut files = Vec::new();
    for t in &temps {
        // Guest memory is private: readable by its owner only.
        match std::fs::File::options()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(t)
        {
            Ok(f) => files.push(f),
            Err(e) => {
                remove_temps();
                return Err(format!("{}: {e}", t.display()));
            }
        }
    }
    let request = if stop { "suspend" } else { "checkpoint" };
    let refs: Vec<&std::fs::File> = files.iter().collect();
    if let Err(e) = control::request_with_files(registry, name, request, &refs) {
        remove_temps();
        return Err(e);
    }
    for (t, f) in temps.iter().zip(&finals) {
        std::fs::rename(t, f).map_err(|e| format!("{}: {e}", f.display()))?;
    }
    Ok(())
}
