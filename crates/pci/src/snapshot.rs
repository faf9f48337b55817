//! The PCI hierarchy in the snapshot inventory: one entry per function
//! (`pci.B.S.F`: its config space, BARs and MSI/MSI-X state, plus whatever
//! the device model keeps) and one for the root (the PIRQ routing), which
//! comes last so the BAR mappings are redone once every function is back.

use std::sync::Arc;
use std::time::{Duration, Instant};

use rhyve_platform::snapshot::{DeviceState, Lifecycle, Schema, SnapshotError};
use serde::{Deserialize, Serialize};

use crate::{IntxRouterState, PciBdf, PciConfigSpace, PciRoot, SharedFunction};

/// How long a paused function may take to finish its I/O in flight; one
/// still busy after it fails its save.
const QUIESCE_TIMEOUT: Duration = Duration::from_secs(30);

/// A function's saved state.
#[derive(Serialize, Deserialize)]
pub struct PciFunctionState {
    pub config: PciConfigSpace,
    pub device: Option<DeviceState>,
}

impl Schema for PciFunctionState {
    const KIND: &'static str = "pci-function";
    const VERSION: u32 = 1;
}

impl Schema for IntxRouterState {
    const KIND: &'static str = "pci-intx-router";
    const VERSION: u32 = 1;
}

fn lock(f: &SharedFunction) -> std::sync::MutexGuard<'_, dyn crate::PciFunction + 'static> {
    f.lock().unwrap_or_else(|e| e.into_inner())
}

struct FunctionLifecycle {
    id: String,
    function: SharedFunction,
}

impl Lifecycle for FunctionLifecycle {
    fn id(&self) -> String {
        self.id.clone()
    }

    fn pause(&self) {
        lock(&self.function).pause();
        let deadline = Instant::now() + QUIESCE_TIMEOUT;
        while !lock(&self.function).quiesced() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    fn resume(&self) {
        lock(&self.function).resume();
    }

    fn save(&self) -> Result<DeviceState, SnapshotError> {
        let f = lock(&self.function);
        let device = f.save_device().map_err(|e| match e {
            SnapshotError::Unsupported { kind, why, .. } => SnapshotError::Unsupported {
                id: self.id.clone(),
                kind,
                why,
            },
            other => other,
        })?;
        let state = PciFunctionState {
            config: f.config().clone(),
            device,
        };
        DeviceState::encode(&self.id, &state)
    }

    fn restore(&self, state: &DeviceState) -> Result<(), SnapshotError> {
        let saved: PciFunctionState = state.decode()?;
        let mut f = lock(&self.function);
        f.config_mut()
            .restore(saved.config)
            .map_err(|e| SnapshotError::Mismatch(format!("device {}: {e}", self.id)))?;
        f.restore_device(saved.device.as_ref())
    }
}

struct RootLifecycle {
    root: Arc<PciRoot>,
}

impl Lifecycle for RootLifecycle {
    fn id(&self) -> String {
        "pci.root".into()
    }

    fn save(&self) -> Result<DeviceState, SnapshotError> {
        DeviceState::encode("pci.root", &self.root.intx_router().state())
    }

    fn restore(&self, state: &DeviceState) -> Result<(), SnapshotError> {
        let saved: IntxRouterState = state.decode()?;
        self.root.intx_router().restore(saved);
        self.root.resync_bars();
        Ok(())
    }
}

impl PciRoot {
    /// Every function, then the root itself, for the machine's inventory.
    pub fn lifecycle(self: &Arc<Self>) -> Vec<Arc<dyn Lifecycle>> {
        let mut all: Vec<Arc<dyn Lifecycle>> = self
            .functions()
            .into_iter()
            .filter_map(|bdf: PciBdf| {
                self.function(bdf).map(|function| {
                    Arc::new(FunctionLifecycle {
                        id: bdf.node(),
                        function,
                    }) as Arc<dyn Lifecycle>
                })
            })
            .collect();
        all.push(Arc::new(RootLifecycle { root: self.clone() }));
        all
    }
}
