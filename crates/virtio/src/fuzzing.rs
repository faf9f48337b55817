//! Entry points shared by the cargo-fuzz targets (`fuzz/`) and the bounded
//! smoke run in the test suite: each takes arbitrary bytes, lays them out
//! as guest memory holding a split virtqueue, and lets a device walk it.
//! Any panic, hang or access outside the buffer is a bug; errors are fine.

use std::sync::OnceLock;

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};

use crate::block::Block;
use crate::console::Console;
use crate::rng::Rng;
use crate::{GuestMemory, VirtioDevice, F_RING_EVENT_IDX, F_RING_INDIRECT_DESC};

/// Guest memory size for fuzz inputs.
pub const MEM_SIZE: usize = 64 * 1024;
const DESC: u64 = 0;
const AVAIL: u64 = 0x1000;
const USED: u64 = 0x2000;

/// Guest memory filled with `data` (repeated) and a queue over it whose
/// size and feature bits come from the first bytes.
fn layout(data: &[u8]) -> Option<(GuestMemory, Queue)> {
    let (&head, rest) = data.split_first()?;
    let mem = GuestMemory::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).ok()?;
    if !rest.is_empty() {
        let image: Vec<u8> = rest.iter().copied().cycle().take(MEM_SIZE).collect();
        mem.write_slice(&image, GuestAddress(0)).ok()?;
    }
    let size = 1u16 << (head % 9);
    let mut q = Queue::new(256).ok()?;
    q.try_set_size(size).ok()?;
    q.try_set_desc_table_address(GuestAddress(DESC)).ok()?;
    q.try_set_avail_ring_address(GuestAddress(AVAIL)).ok()?;
    q.try_set_used_ring_address(GuestAddress(USED)).ok()?;
    q.set_event_idx(head & 0x80 != 0);
    q.set_ready(true);
    Some((mem, q))
}

fn run(device: &mut dyn VirtioDevice, queue_index: usize, data: &[u8]) {
    let Some((mem, mut q)) = layout(data) else {
        return;
    };
    // Odd-length inputs run without indirect descriptors.
    let mut features = device.features();
    if !data.len().is_multiple_of(2) {
        features &= !F_RING_INDIRECT_DESC;
    }
    device.ack_features(features | F_RING_EVENT_IDX);
    // Process twice: the second pass sees the ring state the first left.
    for _ in 0..2 {
        if device.process_queue(queue_index, &mut q, &mem).is_err() {
            break;
        }
    }
}

/// The virtqueue walker alone: every chain read and written in full.
pub fn virtqueue(data: &[u8]) {
    let Some((mem, mut q)) = layout(data) else {
        return;
    };
    let _ = crate::queue::drain(0, &mut q, &mem, |chain| {
        use std::io::{Read, Write};
        let mut total = 0u32;
        if let Ok(mut r) = virtio_queue::Reader::<()>::new(&mem, chain.clone()) {
            let mut sink = Vec::new();
            let _ = r.read_to_end(&mut sink);
        }
        if let Ok(mut w) = virtio_queue::Writer::<()>::new(&mem, chain) {
            let n = w.available_bytes();
            let _ = w.write_all(&vec![0xA5; n]);
            total = n as u32;
        }
        crate::queue::Completion::Used(total)
    });
}

/// A 1 MiB scratch disk in memory (memfd), shared by all blk fuzz runs.
fn scratch_disk_path() -> Option<&'static str> {
    static PATH: OnceLock<Option<String>> = OnceLock::new();
    PATH.get_or_init(|| {
        // SAFETY: memfd_create with a static NUL-terminated name.
        let fd = unsafe { libc::memfd_create(c"rhyve-fuzz-disk".as_ptr(), 0) };
        if fd < 0 {
            return None;
        }
        // SAFETY: resizing the memfd we just created.
        if unsafe { libc::ftruncate(fd, 1 << 20) } != 0 {
            return None;
        }
        Some(format!("/proc/self/fd/{fd}"))
    })
    .as_deref()
}

/// virtio-blk's request parser and executor.
pub fn blk(data: &[u8]) {
    let Some(path) = scratch_disk_path() else {
        return;
    };
    let mut tree = rhyve_config::ConfigTree::new();
    if tree.set("n.path", path).is_err() {
        return;
    }
    let Ok(mut dev) = Block::from_config(&tree, "n") else {
        return;
    };
    run(&mut dev, 0, data);
}

/// virtio-rnd.
pub fn rng(data: &[u8]) {
    run(&mut Rng::new(), 0, data);
}

/// virtio-console's control-queue parser (queue 3) and port transmit (queue 1).
pub fn console_control(data: &[u8]) {
    static DEV: OnceLock<std::sync::Mutex<Option<Console>>> = OnceLock::new();
    let dev = DEV.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("rhyve-fuzz-con-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let path = dir.join("p0").display().to_string();
        std::sync::Mutex::new(Console::new(&[("p0".into(), path)]).ok())
    });
    let mut guard = dev.lock().unwrap_or_else(|e| e.into_inner());
    let Some(con) = guard.as_mut() else { return };
    con.reset();
    let queue = if data.first().is_some_and(|b| b & 0x40 != 0) {
        1
    } else {
        3
    };
    run(con, queue, data);
    run(con, 2, data);
}
