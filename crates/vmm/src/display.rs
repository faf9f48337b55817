//! `-s N,fbuf,...`: the frame buffer function, and the VNC server started
//! once the keyboard it types into exists.

use std::sync::{Arc, Mutex};

use rhyve_config::ConfigTree;
use rhyve_devices::i8042::I8042;
use rhyve_display::fbuf::{Fbuf, FbufOptions, Screen, VgaMode, FRAMEBUFFER_SIZE};
use rhyve_display::vga::{VgaPorts, VGA_PORT_BASE, VGA_PORT_COUNT};
use rhyve_hypervisor::Vm;
use rhyve_platform::bus::Bus;
use rhyve_platform::snapshot::{Lifecycle, Stateful};
use vm_memory::MmapRegion;

use crate::VmmError;

/// The fbuf's screen, waiting for its VNC server.
pub struct Console {
    options: FbufOptions,
    screen: Arc<Screen>,
    /// The VGA ports with `vga=io`.
    vga: Option<Arc<Mutex<VgaPorts>>>,
}

fn fbuf_err(e: rhyve_display::DisplayError) -> VmmError {
    match e {
        rhyve_display::DisplayError::Host { .. } => VmmError::Setup(e.to_string()),
        _ => VmmError::Config(e.to_string()),
    }
}

/// The fbuf function at `node`, its frame buffer pages ready to be shown
/// at its BAR; with `vga=io` (the default) the VGA ports on `io`.
pub fn create_fbuf(
    tree: &ConfigTree,
    node: &str,
    vm: &dyn Vm,
    io: &Bus,
) -> Result<(rhyve_pci::SharedFunction, Console), VmmError> {
    let options = FbufOptions::from_tree(tree, node).map_err(fbuf_err)?;
    let vga = match options.vga {
        VgaMode::Io => {
            let ports = Arc::new(Mutex::new(VgaPorts::new()));
            io.insert(ports.clone(), VGA_PORT_BASE.into(), VGA_PORT_COUNT.into())
                .map_err(|e| VmmError::Setup(format!("fbuf: VGA ports: {e}")))?;
            Some(ports)
        }
        VgaMode::Off => None,
    };
    let pages = Arc::new(
        MmapRegion::new(FRAMEBUFFER_SIZE)
            .map_err(|e| VmmError::Setup(format!("fbuf: frame buffer memory: {e}")))?,
    );
    let window = vm.memory_window(pages.clone())?;
    let (fbuf, screen) = Fbuf::new(&options, pages, window).map_err(fbuf_err)?;
    Ok((
        Arc::new(Mutex::new(fbuf)),
        Console {
            options,
            screen,
            vga,
        },
    ))
}

impl Console {
    /// What a snapshot saves beside the fbuf function: its VGA ports.
    pub fn lifecycle(&self) -> Vec<Arc<dyn Lifecycle>> {
        self.vga
            .iter()
            .map(|ports| -> Arc<dyn Lifecycle> {
                Stateful::new(
                    "fbuf.vga",
                    ports.clone(),
                    |v: &VgaPorts| v.clone(),
                    VgaPorts::restore,
                )
            })
            .collect()
    }

    /// Start the VNC server; with `wait`, return once a client connected.
    pub fn start(self, keyboard: Arc<Mutex<I8042>>) -> Result<(), VmmError> {
        rhyve_display::rfb::start(&self.options, self.screen, keyboard).map_err(fbuf_err)?;
        Ok(())
    }
}
