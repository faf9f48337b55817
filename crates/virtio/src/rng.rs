//! virtio-rnd (bhyve's `pci_virtio_rnd.c`): one queue, every writable byte
//! the driver offers is filled from the host's getrandom(2).

use std::io::Write;

use serde::{Deserialize, Serialize};
use virtio_queue::{DescriptorChain, Queue, Writer};

use crate::queue::{drain, Completion};
use crate::{
    read_config_bytes, DeviceError, GuestMemory, VirtioDevice, F_RING_EVENT_IDX,
    F_RING_INDIRECT_DESC, F_VERSION_1, TYPE_RNG,
};
use rhyve_platform::snapshot::{DeviceState, Schema, SnapshotError};

/// bhyve's VTRND_RINGSZ.
pub const QUEUE_SIZE: u16 = 64;
/// At most this many bytes per request, so one chain cannot stall the queue.
const MAX_REQUEST: usize = 64 * 1024;

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RngState {
    pub acked_features: u64,
}

impl Schema for RngState {
    const KIND: &'static str = "virtio-rnd";
    const VERSION: u32 = 1;
}

#[derive(Default)]
pub struct Rng {
    state: RngState,
}

impl Rng {
    pub fn new() -> Self {
        Self::default()
    }

    fn handle(mem: &GuestMemory, chain: DescriptorChain<&GuestMemory>) -> Completion {
        let mut writer = match Writer::new(mem, chain) {
            Ok(w) => w,
            Err(e) => {
                tracing::warn!("virtio-rnd: bad descriptor chain: {e}");
                return Completion::Used(0);
            }
        };
        let len = writer.available_bytes().min(MAX_REQUEST);
        let mut buf = vec![0u8; len];
        let mut filled = 0;
        while filled < len {
            // SAFETY: getrandom writes at most len - filled bytes into our buffer.
            let n = unsafe {
                libc::getrandom(
                    buf[filled..].as_mut_ptr() as *mut libc::c_void,
                    len - filled,
                    0,
                )
            };
            if n <= 0 {
                if std::io::Error::last_os_error().raw_os_error() == Some(libc::EINTR) {
                    continue;
                }
                break;
            }
            filled += n as usize;
        }
        match writer.write_all(&buf[..filled]) {
            Ok(()) => Completion::Used(filled as u32),
            Err(_) => Completion::Used(0),
        }
    }
}

impl VirtioDevice for Rng {
    fn device_type(&self) -> u32 {
        TYPE_RNG
    }
    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE]
    }
    fn features(&self) -> u64 {
        F_RING_INDIRECT_DESC | F_RING_EVENT_IDX | F_VERSION_1
    }
    fn ack_features(&mut self, features: u64) {
        self.state.acked_features = features & self.features();
    }
    fn config_size(&self) -> usize {
        0
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&[], offset, data);
    }
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
    fn process_queue(
        &mut self,
        index: usize,
        queue: &mut Queue,
        mem: &GuestMemory,
    ) -> Result<bool, DeviceError> {
        if index != 0 {
            return Err(DeviceError::NoQueue(index));
        }
        drain(index, queue, mem, |chain| Self::handle(mem, chain))
    }
    fn reset(&mut self) {
        self.state = RngState::default();
    }
    fn save_state(&self) -> Result<DeviceState, SnapshotError> {
        DeviceState::encode("virtio-rnd", &self.state)
    }
    fn restore_state(&mut self, saved: &DeviceState) -> Result<(), SnapshotError> {
        self.state = saved.decode()?;
        Ok(())
    }
}
