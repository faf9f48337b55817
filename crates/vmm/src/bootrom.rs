//! `-l bootrom,ROM[,VARS]` (bhyve's `bootrom.c`): the firmware image mapped
//! read-only so that it ends at 4 GiB, the optional variable store mapped
//! directly below it as a trapped CFI flash, and bhyve's fwctl for the
//! firmware to read the CPU count from.
//!
//! Both files are read before the VM exists, so every mistake in them is
//! one error line and bhyve's exit status, never a half-built VM.
//!
//! Snapshots save fwctl's protocol state and the flash's pending command;
//! the ROM is loaded again from its file on restore and the variable
//! store is the VM's own file, kept like its disks (not copied).

use std::io::Read;
use std::path::Path;
use std::sync::{Arc, Mutex};

use rhyve_config::ConfigTree;
use rhyve_devices::bootvars::{BootVars, BootVarsState};
use rhyve_devices::fwctl::{Fwctl, FWCTL_PORT_SPAN};
use rhyve_platform::bus::Bus;
use rhyve_platform::layout::{BOOTROM_REGION_SIZE, FWCFG_SELECTOR_PORT};
use rhyve_platform::snapshot::{Lifecycle, Stateful};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::VmmError;

const PAGE: u64 = 4096;
/// The ROM ends here; its last 16 bytes hold the reset vector.
const ROM_END: u64 = 1 << 32;

/// A loaded boot ROM and its variable store.
pub struct BootRom {
    image: Vec<u8>,
    vars: Option<Arc<Mutex<BootVars>>>,
    /// With `lpc.fwcfg` "bhyve" (the default).
    fwctl: Option<Arc<Mutex<Fwctl>>>,
}

fn config(tree: &ConfigTree, key: &str) -> Result<Option<String>, VmmError> {
    tree.get(key).map_err(|e| VmmError::Config(e.to_string()))
}

/// The value of `key`, or of its older `lpc.` spelling (bhyve copies
/// `lpc.bootrom` to `bootrom` after parsing; `-k` files may carry either).
fn boot_key(tree: &ConfigTree, key: &str) -> Result<Option<String>, VmmError> {
    match config(tree, key)? {
        Some(v) => Ok(Some(v)),
        None => config(tree, &format!("lpc.{key}")),
    }
}

impl BootRom {
    /// Load the ROM and open the variable store the tree names, for a VM
    /// of `cpus` vCPUs; `None` without `bootrom`.
    pub fn from_tree(tree: &ConfigTree, cpus: u32) -> Result<Option<Self>, VmmError> {
        let Some(rom_path) = boot_key(tree, "bootrom")? else {
            return Ok(None);
        };
        let fwcfg = config(tree, "lpc.fwcfg")?.unwrap_or_else(|| "bhyve".into());
        let image = read_rom(Path::new(&rom_path))?;
        let vars = match boot_key(tree, "bootvars")? {
            Some(path) => Some(Arc::new(Mutex::new(open_vars(
                Path::new(&path),
                image.len() as u64,
            )?))),
            None => None,
        };
        Ok(Some(Self {
            image,
            vars,
            fwctl: (fwcfg == "bhyve").then(|| Arc::new(Mutex::new(Fwctl::new(cpus)))),
        }))
    }

    /// The variable store's and fwctl's state, for the machine's inventory.
    pub fn lifecycle(&self) -> Vec<Arc<dyn Lifecycle>> {
        let mut all: Vec<Arc<dyn Lifecycle>> = Vec::new();
        if let Some(vars) = &self.vars {
            all.push(Stateful::new(
                "bootrom.vars",
                vars.clone(),
                BootVars::state,
                |v: &mut BootVars, s: BootVarsState| v.restore(s),
            ));
        }
        if let Some(fwctl) = &self.fwctl {
            all.push(Stateful::new(
                "bootrom.fwctl",
                fwctl.clone(),
                |f: &Fwctl| f.clone(),
                Fwctl::restore,
            ));
        }
        all
    }

    /// Bytes of ROM the VM maps below 4 GiB.
    pub fn rom_size(&self) -> u64 {
        self.image.len() as u64
    }

    /// Copy the ROM into its read-only region of `memory`, put the
    /// variable store below it on `mmio` and fwctl on `io`.
    pub fn install(self, memory: &GuestMemoryMmap, mmio: &Bus, io: &Bus) -> Result<(), VmmError> {
        let rom_base = ROM_END - self.rom_size();
        memory
            .write_slice(&self.image, GuestAddress(rom_base))
            .map_err(|e| VmmError::Setup(format!("boot ROM at {rom_base:#x}: {e}")))?;
        if let Some(vars) = self.vars {
            let len = vars.lock().unwrap_or_else(|e| e.into_inner()).len();
            mmio.insert(vars, rom_base - len, len)
                .map_err(|e| VmmError::Setup(format!("bootrom variable store: {e}")))?;
        }
        if let Some(fwctl) = self.fwctl {
            io.insert(fwctl, u64::from(FWCFG_SELECTOR_PORT), FWCTL_PORT_SPAN)
                .map_err(|e| VmmError::Setup(format!("fwctl: {e}")))?;
        }
        Ok(())
    }
}

fn read_rom(path: &Path) -> Result<Vec<u8>, VmmError> {
    let shown = path.display();
    let mut file = std::fs::File::open(path)
        .map_err(|e| VmmError::Setup(format!("Error opening bootrom \"{shown}\": {e}")))?;
    let size = file
        .metadata()
        .map_err(|e| VmmError::Setup(format!("Could not fstat bootrom file \"{shown}\": {e}")))?
        .len();
    if !(1..=BOOTROM_REGION_SIZE).contains(&size) {
        return Err(VmmError::Setup(format!(
            "bootrom \"{shown}\": ROM size {size} is invalid (1 byte to 16 MiB)"
        )));
    }
    if !size.is_multiple_of(PAGE) {
        return Err(VmmError::Setup(format!(
            "bootrom \"{shown}\": ROM size {size} is not a multiple of the page size"
        )));
    }
    let mut image = Vec::with_capacity(size as usize);
    file.by_ref()
        .take(size)
        .read_to_end(&mut image)
        .map_err(|e| VmmError::Setup(format!("reading bootrom \"{shown}\": {e}")))?;
    if image.len() as u64 != size {
        return Err(VmmError::Setup(format!(
            "Incomplete read of bootrom file {shown}: {} of {size} bytes",
            image.len()
        )));
    }
    Ok(image)
}

fn open_vars(path: &Path, rom_size: u64) -> Result<BootVars, VmmError> {
    let shown = path.display();
    let vars = BootVars::open(path).map_err(|e| {
        VmmError::Setup(format!(
            "Error opening bootrom variable file \"{shown}\": {e}"
        ))
    })?;
    let size = vars.len();
    if !(PAGE..=BOOTROM_REGION_SIZE).contains(&size) {
        return Err(VmmError::Setup(format!(
            "Invalid bootrom variable size {size} (\"{shown}\")"
        )));
    }
    if rom_size + size > BOOTROM_REGION_SIZE {
        return Err(VmmError::Setup(format!(
            "Invalid bootrom and variable aggregate size {}",
            rom_size + size
        )));
    }
    Ok(vars)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tree(pairs: &[(&str, &str)]) -> ConfigTree {
        let mut t = rhyve_config::default_tree();
        for (k, v) in pairs {
            t.set(k, *v).unwrap();
        }
        t
    }

    fn file(name: &str, len: usize) -> String {
        let p = std::env::temp_dir().join(format!("rhyve-bootrom-{}-{name}", std::process::id()));
        std::fs::write(&p, vec![0x5A; len]).unwrap();
        p.display().to_string()
    }

    fn error(t: &ConfigTree) -> String {
        match BootRom::from_tree(t, 1) {
            Err(e) => e.to_string(),
            Ok(_) => panic!("accepted"),
        }
    }

    #[test]
    fn loads_rom_and_vars_from_either_spelling() {
        let rom = file("rom", 0x37C000);
        let vars = file("vars", 0x84000);
        let b = BootRom::from_tree(&tree(&[("lpc.bootrom", &rom), ("lpc.bootvars", &vars)]), 1)
            .unwrap()
            .unwrap();
        assert_eq!(b.rom_size(), 0x37C000);
        assert_eq!(
            b.vars.as_ref().map(|v| v.lock().unwrap().len()),
            Some(0x84000)
        );
        assert!(b.fwctl.is_some());
        let b = BootRom::from_tree(&tree(&[("bootrom", &rom)]), 1)
            .unwrap()
            .unwrap();
        assert!(b.vars.is_none());
        assert!(BootRom::from_tree(&tree(&[]), 1).unwrap().is_none());
        std::fs::remove_file(rom).unwrap();
        std::fs::remove_file(vars).unwrap();
    }

    #[test]
    fn refuses_bad_files_with_one_line() {
        let odd = file("odd", 5000);
        assert!(error(&tree(&[("bootrom", &odd)])).contains("not a multiple of the page size"));
        assert!(error(&tree(&[("bootrom", "/nonexistent/rom.fd")]))
            .contains("Error opening bootrom \"/nonexistent/rom.fd\""));
        let rom = file("rom2", 0xF00000);
        let tiny = file("tiny", 100);
        assert!(error(&tree(&[("bootrom", &rom), ("bootvars", &tiny)]))
            .contains("Invalid bootrom variable size 100"));
        let big = file("big", 0x200000);
        assert!(error(&tree(&[("bootrom", &rom), ("bootvars", &big)])).contains("aggregate size"));
        for f in [odd, rom, tiny, big] {
            std::fs::remove_file(f).unwrap();
        }
    }
}
