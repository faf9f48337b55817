//! The one lifecycle every device of a built machine shares, and the
//! inventory that walks them: a snapshot pauses every device, saves each
//! one's typed, versioned state, and a restore checks it is given the same
//! set of devices before putting back any state.
//!
//! A device's state is its own serde struct tagged with a [`Schema`] kind
//! and version; the snapshot file carries it as a [`DeviceState`] whose
//! kind, version and id are checked before the struct is decoded.

use std::sync::Arc;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// A device that cannot be saved (yet): the snapshot is refused.
    #[error("device {id} ({kind}) cannot be saved in a snapshot: {why}")]
    Unsupported {
        id: String,
        kind: String,
        why: String,
    },
    /// The snapshot does not fit this machine or this rhyve.
    #[error("{0}")]
    Mismatch(String),
    #[error("device {id}: {why}")]
    Device { id: String, why: String },
}

/// A state struct's name and layout version in a snapshot file.
pub trait Schema: Serialize + DeserializeOwned {
    const KIND: &'static str;
    const VERSION: u32;
}

/// One device's saved state, as the snapshot file carries it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeviceState {
    pub id: String,
    pub kind: String,
    pub version: u32,
    pub data: serde_json::Value,
}

impl DeviceState {
    pub fn encode<S: Schema>(id: &str, state: &S) -> Result<Self, SnapshotError> {
        Ok(Self {
            id: id.to_string(),
            kind: S::KIND.to_string(),
            version: S::VERSION,
            data: serde_json::to_value(state).map_err(|e| SnapshotError::Device {
                id: id.to_string(),
                why: format!("cannot encode its state: {e}"),
            })?,
        })
    }

    /// The typed state, if kind and version are the ones this rhyve writes.
    pub fn decode<S: Schema>(&self) -> Result<S, SnapshotError> {
        if self.kind != S::KIND || self.version != S::VERSION {
            return Err(SnapshotError::Mismatch(format!(
                "device {}: the snapshot holds {} version {}, this rhyve restores {} version {}",
                self.id,
                self.kind,
                self.version,
                S::KIND,
                S::VERSION
            )));
        }
        serde_json::from_value(self.data.clone()).map_err(|e| SnapshotError::Device {
            id: self.id.clone(),
            why: format!("bad saved state: {e}"),
        })
    }
}

/// Pause, resume, save and restore: what the machine asks of each device.
///
/// `pause` stops a device from touching guest memory or raising interrupts
/// on its own (worker threads finish their in-flight requests and park;
/// timers stop); after it, `save` sees a still device. `restore` is called
/// on a freshly built, paused device before the vCPUs first run.
pub trait Lifecycle: Send + Sync {
    /// Stable, unique in the machine: `pci.0.3.0`, `lpc.com1`, `rtc`.
    fn id(&self) -> String;
    fn pause(&self) {}
    fn resume(&self) {}
    fn save(&self) -> Result<DeviceState, SnapshotError>;
    fn restore(&self, state: &DeviceState) -> Result<(), SnapshotError>;
}

/// A device rhyve cannot save yet: present in the inventory so a snapshot
/// of a machine that has it is refused, naming it.
pub struct Unsaveable {
    pub id: String,
    pub kind: &'static str,
    pub why: &'static str,
}

impl Lifecycle for Unsaveable {
    fn id(&self) -> String {
        self.id.clone()
    }

    fn save(&self) -> Result<DeviceState, SnapshotError> {
        Err(SnapshotError::Unsupported {
            id: self.id.clone(),
            kind: self.kind.to_string(),
            why: self.why.to_string(),
        })
    }

    fn restore(&self, _: &DeviceState) -> Result<(), SnapshotError> {
        self.save().map(|_| ())
    }
}

/// Every device of the built machine, in build order.
#[derive(Default)]
pub struct Inventory {
    devices: Vec<Arc<dyn Lifecycle>>,
}

impl Inventory {
    pub fn new() -> Self {
        Self::default()
    }

    /// Add `device`; two devices with one id would make a snapshot ambiguous.
    pub fn register(&mut self, device: Arc<dyn Lifecycle>) -> Result<(), SnapshotError> {
        let id = device.id();
        if self.devices.iter().any(|d| d.id() == id) {
            return Err(SnapshotError::Mismatch(format!(
                "two devices with the id {id}"
            )));
        }
        self.devices.push(device);
        Ok(())
    }

    pub fn ids(&self) -> Vec<String> {
        self.devices.iter().map(|d| d.id()).collect()
    }

    pub fn pause(&self) {
        for d in &self.devices {
            d.pause();
        }
    }

    /// In reverse: a device resumed first could otherwise reach one still paused.
    pub fn resume(&self) {
        for d in self.devices.iter().rev() {
            d.resume();
        }
    }

    /// Every device's state; the first device that cannot be saved refuses
    /// the whole snapshot.
    pub fn save(&self) -> Result<Vec<DeviceState>, SnapshotError> {
        self.devices.iter().map(|d| d.save()).collect()
    }

    /// Check `saved` names exactly this machine's devices, then restore each.
    pub fn restore(&self, saved: &[DeviceState]) -> Result<(), SnapshotError> {
        let mut here = self.ids();
        let mut there: Vec<String> = saved.iter().map(|s| s.id.clone()).collect();
        here.sort();
        there.sort();
        if here != there {
            let missing: Vec<&String> = there.iter().filter(|i| !here.contains(i)).collect();
            let extra: Vec<&String> = here.iter().filter(|i| !there.contains(i)).collect();
            return Err(SnapshotError::Mismatch(format!(
                "the snapshot's devices differ from this machine's: only in the snapshot {missing:?}, only on this command line {extra:?}"
            )));
        }
        for d in &self.devices {
            let id = d.id();
            let state = saved
                .iter()
                .find(|s| s.id == id)
                .ok_or_else(|| SnapshotError::Mismatch(format!("no state for device {id}")))?;
            d.restore(state)?;
        }
        Ok(())
    }
}

/// A device behind a mutex whose state is one [`Schema`] struct: the
/// common case, with `get`/`put` reading and replacing that struct.
pub struct Stateful<D, S> {
    id: String,
    device: Arc<std::sync::Mutex<D>>,
    get: fn(&D) -> S,
    put: fn(&mut D, S) -> Result<(), String>,
}

impl<D, S> Stateful<D, S> {
    pub fn new(
        id: impl Into<String>,
        device: Arc<std::sync::Mutex<D>>,
        get: fn(&D) -> S,
        put: fn(&mut D, S) -> Result<(), String>,
    ) -> Arc<Self> {
        Arc::new(Self {
            id: id.into(),
            device,
            get,
            put,
        })
    }
}

impl<D: Send, S: Schema> Lifecycle for Stateful<D, S> {
    fn id(&self) -> String {
        self.id.clone()
    }

    fn save(&self) -> Result<DeviceState, SnapshotError> {
        let d = self.device.lock().unwrap_or_else(|e| e.into_inner());
        DeviceState::encode(&self.id, &(self.get)(&d))
    }

    fn restore(&self, state: &DeviceState) -> Result<(), SnapshotError> {
        let s: S = state.decode()?;
        let mut d = self.device.lock().unwrap_or_else(|e| e.into_inner());
        (self.put)(&mut d, s).map_err(|why| SnapshotError::Device {
            id: self.id.clone(),
            why,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    struct Counter {
        n: u32,
    }
    impl Schema for Counter {
        const KIND: &'static str = "counter";
        const VERSION: u32 = 1;
    }

    fn counter(id: &str, n: u32) -> (Arc<Mutex<Counter>>, Arc<dyn Lifecycle>) {
        let dev = Arc::new(Mutex::new(Counter { n }));
        let life = Stateful::new(
            id,
            dev.clone(),
            |c: &Counter| c.clone(),
            |c, s| {
                *c = s;
                Ok(())
            },
        );
        (dev, life)
    }

    #[test]
    fn inventory_round_trips_and_checks_the_device_set() {
        let mut a = Inventory::new();
        a.register(counter("x", 7).1).unwrap();
        a.register(counter("y", 9).1).unwrap();
        let saved = a.save().unwrap();

        let (x, lx) = counter("x", 0);
        let (y, ly) = counter("y", 0);
        let mut b = Inventory::new();
        b.register(ly).unwrap();
        b.register(lx).unwrap();
        b.restore(&saved).unwrap();
        assert_eq!(x.lock().unwrap().n, 7);
        assert_eq!(y.lock().unwrap().n, 9);

        let (z, lz) = counter("z", 1);
        let mut c = Inventory::new();
        c.register(counter("x", 0).1).unwrap();
        c.register(lz).unwrap();
        let e = c.restore(&saved).unwrap_err().to_string();
        assert!(e.contains("\"y\"") && e.contains("\"z\""), "{e}");
        assert_eq!(z.lock().unwrap().n, 1, "nothing restored on a mismatch");
    }

    #[test]
    fn duplicate_ids_and_other_versions_are_refused() {
        let mut a = Inventory::new();
        a.register(counter("x", 1).1).unwrap();
        assert!(a.register(counter("x", 2).1).is_err());
        let mut s = DeviceState::encode("x", &Counter { n: 1 }).unwrap();
        s.version = 2;
        let e = s.decode::<Counter>().unwrap_err().to_string();
        assert!(e.contains("version 2"), "{e}");
    }
}
