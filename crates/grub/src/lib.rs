//! The library behind rhyve's `grub-bhyve`: everything that decides what
//! to boot.
//!
//! grub-bhyve (grub2-bhyve) is GRUB 2's emulator build: it reads the disks
//! named in a device map, runs the root device's grub.cfg, shows GRUB's
//! menu or prompt on a console, and loads the chosen Linux kernel and
//! initrd into a VM for bhyve to run. This crate does all but the last
//! step: [`parse_args`] reads grub-bhyve's command line, [`run`] returns a
//! [`BootSelection`] (kernel bytes, initrd bytes as GRUB lays them out, the
//! command line grub-bhyve gives Linux), and the VMM side loads it.
//!
//! Layers: `options` (command line) → `disk` (device map, MBR/GPT) →
//! `fs` with `iso9660`, `fat`, `xfs` and ext2/3/4 via ext4-view (read-only
//! filesystems, all hardened against hostile images) → `devices` (GRUB's
//! device names) → `script`/`interp` (grub.cfg: GRUB's script language,
//! Linux loading commands, `search`, `blscfg`) → `menu` (menu, entry
//! editor and `grub>` prompt on a [`Console`]).

mod console;
mod devices;
mod disk;
mod envblk;
mod error;
mod ext_blocks;
mod fat;
mod fs;
pub mod fuzzing;
mod interp;
mod iso9660;
mod kernel;
mod menu;
mod options;
mod script;
mod xfs;

pub use console::{Console, FdConsole, ScriptedConsole};
pub use devices::{DeviceInfo, Devices};
pub use disk::{parse_device_map, partitions, DeviceMapEntry, Partition, Region, TableKind};
pub use error::GrubError;
pub use fs::{probe, DirEntry, Filesystem, MAX_FILE_SIZE};
pub use interp::{linux_cmdline, Interp, Loaded, MenuItem};
pub use options::{
    parse_args, short_usage, usage, GrubOptions, DEFAULT_DEVICE_MAP, DEFAULT_DIRECTORY,
    DEFAULT_GRUB_CFG, DEFAULT_MEMORY_MIB,
};
pub use script::{parse as parse_script, Stmt};

use rhyve_config::file::FileError;

/// The largest device map read: a line per disk, a few dozen bytes each.
const DEVICE_MAP_LIMIT: u64 = 1 << 20;

/// What to boot, as chosen from the menu or the prompt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootSelection {
    /// The kernel file's bytes, as read.
    pub kernel: Vec<u8>,
    /// The kernel path as the `linux` command named it.
    pub kernel_path: String,
    /// All initrds concatenated in order, each padded with zeros to a
    /// multiple of 4 bytes (grub's `initrd` layout); empty without one.
    pub initrd: Vec<u8>,
    /// The initrd paths as `initrd` named them.
    pub initrd_paths: Vec<String>,
    /// `linux`'s arguments after the path, as written in the menu.
    pub linux_args: Vec<String>,
    /// The command line to hand Linux, built as grub-bhyve does:
    /// `console=ttyS0 ` (unless `-n` or already given), `BOOT_IMAGE=path`,
    /// then the arguments.
    pub cmdline: String,
    /// The menu entry's title, `None` when booted from the prompt.
    pub menu_title: Option<String>,
}

/// Where the session's device map comes from: read it, relative paths
/// against the current directory. A missing map leaves only `(host)`, as
/// in grub-emu.
fn load_devices(opts: &GrubOptions, console: &mut dyn Console) -> Result<Devices, GrubError> {
    let cwd = std::env::current_dir().map_err(|e| GrubError::io("current directory", e))?;
    let map = std::path::Path::new(&opts.device_map);
    let entries = match rhyve_config::file::read_limited_string(map, DEVICE_MAP_LIMIT) {
        Ok(text) => parse_device_map(&text, &cwd).map_err(|message| GrubError::DeviceMap {
            path: opts.device_map.clone(),
            message,
        })?,
        Err(FileError::Io { source, .. }) => {
            let _ = console.write_bytes(
                format!(
                    "warning: cannot open device map {}: {source}\n",
                    opts.device_map
                )
                .as_bytes(),
            );
            Vec::new()
        }
        Err(e) => return Err(GrubError::DeviceMapFile(e)),
    };
    let mut warnings = Vec::new();
    let devices = Devices::open(&entries, &mut |w| warnings.push(w));
    for w in warnings {
        console
            .write_bytes(format!("warning: {w}\n").as_bytes())
            .map_err(GrubError::Console)?;
    }
    Ok(devices)
}

/// The console `-c` names (a tty such as an nmdm(4) end or a Linux
/// pseudo-terminal), or stdio without `-c`.
pub fn open_console(opts: &GrubOptions) -> std::io::Result<FdConsole> {
    match &opts.cons_dev {
        Some(dev) => FdConsole::open(dev),
        None => FdConsole::stdio(),
    }
}

/// Run a grub-bhyve session: read the device map, run the root device's
/// config, show the menu or prompt, and return what was chosen.
pub fn run(opts: &GrubOptions, console: &mut dyn Console) -> Result<BootSelection, GrubError> {
    let mut devices = load_devices(opts, console)?;
    devices.set_host_visible(opts.root.trim_start_matches('(').trim_end_matches(')') == "host");
    run_with_devices(opts, &devices, console)
}

/// [`run`] on devices already opened (e.g. built without a device map file).
pub fn run_with_devices(
    opts: &GrubOptions,
    devices: &Devices,
    console: &mut dyn Console,
) -> Result<BootSelection, GrubError> {
    let mut interp = Interp::new(devices, console);
    let root = opts
        .root
        .trim_start_matches('(')
        .trim_end_matches(')')
        .to_string();
    interp.set_var("root", &root);
    interp.set_var("prefix", &format!("({root}){}", opts.directory));
    interp.set_var("cmdpath", &format!("({root})"));
    let cfg = opts.config_path();
    let outcome = match interp.read_script(&cfg) {
        Ok(text) => match interp.source_text(&text) {
            Err(interp::Ctl::Boot) => Some(menu::Outcome::Boot(None)),
            Err(interp::Ctl::Fatal(e)) => return Err(e),
            _ => None,
        },
        Err(e) => {
            let msg = format!("error: {e}.\n");
            interp
                .console
                .write_bytes(msg.as_bytes())
                .map_err(GrubError::Console)?;
            None
        }
    };
    let outcome = match outcome {
        Some(o) => o,
        None => interp.menu_loop(0, &[])?.ok_or(GrubError::ConsoleClosed)?,
    };
    let menu::Outcome::Boot(title) = outcome;
    let loaded = interp
        .loaded
        .take()
        .ok_or_else(|| GrubError::Command("you need to load the kernel first".to_string()))?;
    Ok(BootSelection {
        cmdline: linux_cmdline(&loaded.kernel_path, &loaded.args, !opts.no_console_insert),
        kernel: loaded.kernel,
        kernel_path: loaded.kernel_path,
        initrd: loaded.initrd,
        initrd_paths: loaded.initrd_paths,
        linux_args: loaded.args,
        menu_title: title,
    })
}
