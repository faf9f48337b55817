//! bhyve(8)'s command line (amd64): options applied in order onto the tree,
//! later ones winning, with bhyve's defaults set first and bhyve's messages
//! and exit statuses for bad input.
//!
//! Follows `bhyve_init_config`, `bhyve_optparse` and `bhyve_usage` in
//! `usr.sbin/bhyve/amd64/bhyverun_machdep.c` and `main` in `bhyverun.c`:
//! a bad flag or a missing VM name is a usage error (status 1, usage text),
//! a bad `-c/-p/-l/-o/-n/-f/-m` value is `EX_USAGE` (64), and a bad `-s`,
//! `-k` or a config-tree conflict is bhyve's generic error status 4.

use std::fmt;
use std::path::{Path, PathBuf};

use crate::check;
use crate::cnum::{scan_list, strtol_full};
use crate::getopt::{Getopt, Opt};
use crate::legacy::{self, set};
use crate::tree::ConfigTree;

/// sysexits(3) `EX_USAGE`.
pub const EX_USAGE: i32 = 64;
/// bhyve's `BHYVE_EXIT_ERROR`: bad configuration, device init failure.
pub const EXIT_ERROR: i32 = 4;
/// `bhyve_usage(1)`: an unknown flag, a missing argument or VM name.
pub const EXIT_USAGE_ERROR: i32 = 1;
/// `-o config.dump=1` prints the tree and exits with this status.
pub const EXIT_CONFIG_DUMPED: i32 = 1;

/// getopt(3) option string of amd64 bhyve built with snapshot support.
const OPTSTRING: &str = "aehuwxACDHIMPSWYk:f:o:p:G:c:s:m:n:l:K:U:r:";

/// The program name bhyve's messages carry.
const PROGNAME: &str = "bhyve";

/// Host CPUs a vCPU can be pinned to (FreeBSD's `CPU_SETSIZE`).
pub(crate) const CPU_SETSIZE: i64 = 1024;

/// fw_cfg file names are at most this long, terminator included.
const FWCFG_MAX_NAME: usize = 56;

/// The largest `-k` file read. bhyve's own are a few hundred bytes; one
/// with every key of a large machine stays far below this.
const CONFIG_FILE_LIMIT: u64 = 1 << 20;

/// What the command line asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Build and run the VM described by the tree.
    Run,
    /// `-o config.dump=1`: print `tree.dump()` to stdout, exit 1.
    DumpConfig,
    /// `-h`: print the usage to stderr, exit 0.
    Usage,
    /// `-s help`: print `PCI_MODELS` one a line to stdout, exit 0.
    ListPciModels,
    /// `-l help`: print `LPC_DEVICES` one a line to stdout, exit 0.
    ListLpcDevices,
}

impl Action {
    /// The status bhyve exits with after this action, or `None` for `Run`.
    pub fn exit_status(self) -> Option<i32> {
        match self {
            Action::Run => None,
            Action::DumpConfig => Some(EXIT_CONFIG_DUMPED),
            Action::Usage | Action::ListPciModels | Action::ListLpcDevices => Some(0),
        }
    }
}

/// A user file for QEMU fw_cfg, from `-f name,string=S` or `-f name,file=P`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FwCfgFile {
    pub name: String,
    pub source: FwCfgSource,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FwCfgSource {
    /// The bytes of the string followed by a NUL, as bhyve publishes it.
    String(String),
    /// The contents of a host file (checked readable while parsing).
    File(PathBuf),
}

/// A parsed bhyve command line.
#[derive(Debug, Clone)]
pub struct Invocation {
    pub tree: ConfigTree,
    pub action: Action,
    pub fw_cfg_files: Vec<FwCfgFile>,
    /// `-r file`: the snapshot to restore from.
    pub restore_file: Option<String>,
    /// Lines bhyve prints as warnings (warnx) while parsing; the caller
    /// writes them to stderr.
    pub warnings: Vec<String>,
}

impl Invocation {
    /// Write what bhyve prints for this invocation before (or instead of)
    /// running a VM: the warnings to `err`, then the dump, usage or model
    /// list. Returns the exit status for every action but `Run`.
    pub fn write_output(
        &self,
        progname: &str,
        out: &mut dyn std::io::Write,
        err: &mut dyn std::io::Write,
    ) -> std::io::Result<Option<i32>> {
        for warning in &self.warnings {
            writeln!(err, "{warning}")?;
        }
        match self.action {
            Action::Run => {}
            Action::DumpConfig => out.write_all(self.tree.dump().as_bytes())?,
            Action::Usage => err.write_all(bhyve_usage(progname).as_bytes())?,
            Action::ListPciModels => {
                for model in crate::legacy::PCI_MODELS {
                    writeln!(out, "{model}")?;
                }
            }
            Action::ListLpcDevices => {
                for device in crate::legacy::LPC_DEVICES {
                    writeln!(out, "{device}")?;
                }
            }
        }
        Ok(self.action.exit_status())
    }
}

/// An error to print as one line on stderr, and bhyve's exit status for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CliError {
    pub message: String,
    pub status: i32,
    /// bhyve follows this error with its usage text (`bhyve_usage(1)`).
    pub show_usage: bool,
}

impl CliError {
    pub fn new(message: impl Into<String>, status: i32) -> Self {
        Self {
            message: message.into(),
            status,
            show_usage: false,
        }
    }

    /// `bhyve_usage(1)`, after an optional diagnostic line (getopt's).
    pub fn usage(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            status: EXIT_USAGE_ERROR,
            show_usage: true,
        }
    }

    /// Everything bhyve writes to stderr for this error.
    pub fn render(&self, progname: &str) -> String {
        let mut out = String::new();
        if !self.message.is_empty() {
            out.push_str(&self.message);
            out.push('\n');
        }
        if self.show_usage {
            out.push_str(&bhyve_usage(progname));
        }
        out
    }
}

impl fmt::Display for CliError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for CliError {}

/// The text bhyve prints for `-h` and usage errors.
pub fn bhyve_usage(progname: &str) -> String {
    let pad = " ".repeat(progname.len());
    format!(
        "Usage: {progname} [-aCDeHhPSuWwxY]\n\
         \x20      {pad} [-c [[cpus=]numcpus][,sockets=n][,cores=n][,threads=n]]\n\
         \x20      {pad} [-G port] [-k config_file] [-l lpc] [-m mem] [-o var=value]\n\
         \x20      {pad} [-p vcpu:hostcpu] [-r file] [-s pci] [-U uuid] vmname\n\
         \x20      -a: local apic is in xAPIC mode (deprecated)\n\
         \x20      -C: include guest memory in core file\n\
         \x20      -c: number of CPUs and/or topology specification\n\
         \x20      -D: destroy on power-off\n\
         \x20      -e: exit on unhandled I/O access\n\
         \x20      -G: start a debug server\n\
         \x20      -H: vmexit from the guest on HLT\n\
         \x20      -h: help\n\
         \x20      -k: key=value flat config file\n\
         \x20      -K: PS2 keyboard layout\n\
         \x20      -l: LPC device configuration\n\
         \x20      -M: monitor mode\n\
         \x20      -m: memory size\n\
         \x20      -n: NUMA domain specification\n\
         \x20      -o: set config 'var' to 'value'\n\
         \x20      -P: vmexit from the guest on pause\n\
         \x20      -p: pin 'vcpu' to 'hostcpu'\n\
         \x20      -r: path to checkpoint file\n\
         \x20      -S: guest memory cannot be swapped\n\
         \x20      -s: <slot,driver,configinfo> PCI slot config\n\
         \x20      -U: UUID\n\
         \x20      -u: RTC keeps UTC time\n\
         \x20      -W: force virtio to use single-vector MSI\n\
         \x20      -w: ignore unimplemented MSRs\n\
         \x20      -x: local APIC is in x2APIC mode\n\
         \x20      -Y: disable MPtable generation\n"
    )
}

/// The tree bhyve starts from before applying any option (amd64).
pub fn default_tree() -> ConfigTree {
    let mut tree = ConfigTree::new();
    for (key, value) in [
        ("acpi_tables", "true"),
        ("acpi_tables_in_memory", "true"),
        ("memory.size", "256M"),
        ("x86.strictmsr", "true"),
        ("lpc.fwcfg", "bhyve"),
    ] {
        // Fresh tree, distinct valid paths: cannot conflict.
        let _ = tree.set(key, value);
    }
    tree
}

fn usage_error(option: &str, arg: &str) -> CliError {
    CliError::new(format!("{PROGNAME}: {option} '{arg}'"), EX_USAGE)
}

/// `bhyve_parse_config_option`: `path=value` with a non-empty value.
/// `Ok(false)` when the text is not of that form.
fn parse_config_option(tree: &mut ConfigTree, option: &str) -> Result<bool, CliError> {
    match option.split_once('=') {
        Some((path, value)) if !value.is_empty() => {
            set(tree, path, value)?;
            Ok(true)
        }
        _ => Ok(false),
    }
}

/// `-k file`: `path=value` lines; lines starting with `#` and empty lines
/// are skipped.
fn parse_config_file(tree: &mut ConfigTree, path: &str) -> Result<(), CliError> {
    let text =
        crate::file::read_limited_string(Path::new(path), CONFIG_FILE_LIMIT).map_err(|e| {
            CliError::new(
                format!("{PROGNAME}: Failed to open configuration file {e}"),
                EXIT_ERROR,
            )
        })?;
    parse_config_text(tree, path, &text)
}

/// The lines of a `-k` file already read; `path` names it in errors.
pub(crate) fn parse_config_text(
    tree: &mut ConfigTree,
    path: &str,
    text: &str,
) -> Result<(), CliError> {
    for (index, raw) in text.split_inclusive('\n').enumerate() {
        if raw.starts_with('#') || raw == "\n" {
            continue;
        }
        let line = raw.strip_suffix('\n').unwrap_or(raw);
        if !parse_config_option(tree, line)? {
            return Err(CliError::new(
                format!(
                    "{PROGNAME}: {path} line {}: invalid config option '{line}'",
                    index + 1
                ),
                EXIT_ERROR,
            ));
        }
    }
    Ok(())
}

/// `-c [[cpus=]n][,sockets=n][,cores=n][,threads=n]`: stored as given;
/// the numbers are checked when the VM is built.
fn parse_topology(tree: &mut ConfigTree, opt: &str) -> Result<(), CliError> {
    if opt.is_empty() {
        for key in ["sockets", "cores", "threads", "cpus"] {
            set(tree, key, "1")?;
        }
        return Ok(());
    }
    for item in opt.split(',') {
        let keyed = ["cpus", "sockets", "cores", "threads"]
            .into_iter()
            .find_map(|key| item.strip_prefix(key)?.strip_prefix('=').map(|v| (key, v)));
        match keyed {
            Some((key, value)) => set(tree, key, value)?,
            None if item.contains('=') => return Err(usage_error("invalid cpu topology", opt)),
            None => set(tree, "cpus", item)?,
        }
    }
    Ok(())
}

/// `-p vcpu:hostcpu`: appended to `vcpu.N.cpuset`.
fn parse_pinning(tree: &mut ConfigTree, opt: &str) -> Result<(), CliError> {
    let bad = || usage_error("invalid vcpu pinning configuration", opt);
    let [vcpu, pcpu] = scan_list(opt, ':', 2)[..] else {
        return Err(bad());
    };
    if vcpu < 0 || !(0..CPU_SETSIZE).contains(&pcpu) {
        return Err(bad());
    }
    let key = format!("vcpu.{vcpu}.cpuset");
    let value = match tree.get_raw(&key) {
        Some(old) => format!("{old},{pcpu}"),
        None => pcpu.to_string(),
    };
    set(tree, &key, &value)
}

/// `-n id=N,size=S,cpus=L[,domain_policy=P]`.
fn parse_numa(tree: &mut ConfigTree, opt: &str) -> Result<(), CliError> {
    let bad = || usage_error("invalid NUMA configuration", opt);
    if opt.is_empty() {
        return Err(bad());
    }
    let mut id = None;
    let mut values = Vec::new();
    for item in opt.split(',') {
        if let Some(v) = item.strip_prefix("id=") {
            match strtol_full(v).filter(|n| (0..=255).contains(n)) {
                Some(n) => id = Some(n),
                None => {
                    return Err(CliError::new(
                        format!("{PROGNAME}: Invalid value for id: '{v}'"),
                        EXIT_ERROR,
                    ))
                }
            }
        } else {
            for key in ["size", "domain_policy", "cpus"] {
                if let Some(v) = item.strip_prefix(key).and_then(|r| r.strip_prefix('=')) {
                    values.push((key, v));
                }
            }
        }
    }
    let Some(id) = id else {
        return Err(bad());
    };
    for (key, value) in values {
        set(tree, &format!("domains.{id}.{key}"), value)?;
    }
    match tree.get_bool("acpi_tables") {
        Ok(Some(true)) => Ok(()),
        Ok(Some(false)) => Err(CliError::new(
            format!("{PROGNAME}: NUMA emulation requires ACPI"),
            EX_USAGE,
        )),
        Ok(None) => Err(CliError::new(
            format!("{PROGNAME}: Failed to fetch boolean variable acpi_tables"),
            EXIT_ERROR,
        )),
        Err(e) => Err(check::config_error(e)),
    }
}

/// `-G [w][addr:]port`.
fn parse_gdb(tree: &mut ConfigTree, opt: &str) -> Result<(), CliError> {
    let opt = match opt.strip_prefix('w') {
        Some(rest) => {
            set(tree, "gdb.wait", "true")?;
            rest
        }
        None => opt,
    };
    let port = match opt.rsplit_once(':') {
        Some((address, port)) => {
            set(tree, "gdb.address", address)?;
            port
        }
        None => opt,
    };
    set(tree, "gdb.port", port)
}

/// `-f [name=]name,string=S` or `-f [name=]name,file=P`.
fn parse_fw_cfg(opt: &str) -> Result<FwCfgFile, CliError> {
    let bad = || usage_error("invalid fwcfg item", opt);
    let spec = opt.strip_prefix("name=").unwrap_or(opt);
    let (name, value) = spec.split_once(',').ok_or_else(bad)?;
    if name.len() >= FWCFG_MAX_NAME {
        return Err(bad());
    }
    let source = if let Some(s) = value.strip_prefix("string=") {
        FwCfgSource::String(s.to_string())
    } else if let Some(path) = value.strip_prefix("file=") {
        // bhyve reads the file while parsing; an unreadable one is a
        // command-line error, not a failure at VM start.
        if let Err(e) = crate::file::open_regular(Path::new(path)) {
            tracing::warn!("Can't open fw_cfg_user_file file {e}");
            return Err(bad());
        }
        FwCfgSource::File(PathBuf::from(path))
    } else {
        return Err(bad());
    };
    Ok(FwCfgFile {
        name: name.to_string(),
        source,
    })
}

/// Set a flag's key; the paths are fixed and distinct so this only fails
/// when an earlier `-o` made one of them a node.
fn set_flag(tree: &mut ConfigTree, key: &str, value: bool) -> Result<(), CliError> {
    set(tree, key, if value { "true" } else { "false" })
}

/// Parse bhyve(8)'s argv (without the program name).
pub fn parse_bhyve_args(args: &[String]) -> Result<Invocation, CliError> {
    let mut inv = Invocation {
        tree: default_tree(),
        action: Action::Run,
        fw_cfg_files: Vec::new(),
        restore_file: None,
        warnings: Vec::new(),
    };
    let tree = &mut inv.tree;
    let mut getopt = Getopt::new(args, OPTSTRING, PROGNAME);
    for opt in getopt.by_ref() {
        match opt {
            Opt::Error(message) => return Err(CliError::usage(message)),
            Opt::Flag(flag) => match flag {
                'a' => set_flag(tree, "x86.x2apic", false)?,
                // Historic: ACPI tables and the I/O APIC are always there.
                'A' | 'I' => {}
                'C' => set_flag(tree, "memory.guest_in_core", true)?,
                'D' => set_flag(tree, "destroy_on_poweroff", true)?,
                'e' => set_flag(tree, "x86.strictio", true)?,
                'H' => set_flag(tree, "x86.vmexit_on_hlt", true)?,
                'M' => set_flag(tree, "monitor", true)?,
                'P' => set_flag(tree, "x86.vmexit_on_pause", true)?,
                'S' => set_flag(tree, "memory.wired", true)?,
                'u' => set_flag(tree, "rtc.use_localtime", false)?,
                'w' => set_flag(tree, "x86.strictmsr", false)?,
                'W' => set_flag(tree, "virtio_msix", false)?,
                'x' => set_flag(tree, "x86.x2apic", true)?,
                'Y' => set_flag(tree, "x86.mptable", false)?,
                'h' => {
                    inv.action = Action::Usage;
                    return Ok(inv);
                }
                other => {
                    return Err(CliError::usage(format!(
                        "{PROGNAME}: illegal option -- {other}"
                    )))
                }
            },
            Opt::WithArg(option, arg) => match option {
                'c' => parse_topology(tree, &arg)?,
                'f' => inv.fw_cfg_files.push(parse_fw_cfg(&arg)?),
                'G' => parse_gdb(tree, &arg)?,
                'k' => parse_config_file(tree, &arg)?,
                'K' => set(tree, "keyboard.layout", &arg)?,
                'l' => {
                    if "help".starts_with(arg.as_str()) {
                        inv.action = Action::ListLpcDevices;
                        return Ok(inv);
                    }
                    legacy::parse_lpc_device(tree, &arg)?
                }
                'm' => set(tree, "memory.size", &arg)?,
                'n' => parse_numa(tree, &arg)?,
                'o' => {
                    if !parse_config_option(tree, &arg)? {
                        return Err(usage_error("invalid configuration option", &arg));
                    }
                }
                'p' => parse_pinning(tree, &arg)?,
                'r' => inv.restore_file = Some(arg),
                's' => {
                    if "help".starts_with(arg.as_str()) {
                        inv.action = Action::ListPciModels;
                        return Ok(inv);
                    }
                    legacy::parse_pci_slot(tree, &arg)?
                }
                'U' => set(tree, "uuid", &arg)?,
                other => {
                    return Err(CliError::usage(format!(
                        "{PROGNAME}: illegal option -- {other}"
                    )))
                }
            },
        }
    }

    // Backwards-compatibility aliases bhyve applies once all options are in.
    for (old, new) in [("lpc.bootrom", "bootrom"), ("lpc.bootvars", "bootvars")] {
        if let (Some(value), None) = (tree.get_raw(old), tree.get_raw(new)) {
            let value = value.to_string();
            inv.warnings.push(format!(
                "{PROGNAME}: {old} is deprecated, use '-o {new}' instead"
            ));
            set(tree, new, &value)?;
        }
    }

    match getopt.operands() {
        [] => {}
        [name] => set(tree, "name", name)?,
        _ => return Err(CliError::usage("")),
    }
    // With -r the name may come from the snapshot's metadata instead.
    if inv.restore_file.is_none() && tree.get("name").map_err(check::config_error)?.is_none() {
        return Err(CliError::usage(""));
    }

    let dump = tree.get("config.dump").map_err(check::config_error)?;
    if let Some(value) = dump {
        match crate::tree::parse_bool(&value) {
            Some(true) => {
                inv.action = Action::DumpConfig;
                return Ok(inv);
            }
            Some(false) => {}
            None => {
                return Err(CliError::new(
                    format!("{PROGNAME}: Invalid value {value} for boolean variable config.dump"),
                    EXIT_ERROR,
                ))
            }
        }
    }

    check::validate(tree)?;
    Ok(inv)
}
