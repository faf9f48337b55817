//! The loop every device runs over a queue, with notification suppression.
//!
//! Notifications from the driver are disabled while the device drains the
//! available ring and re-enabled before it stops, re-checking for buffers
//! that raced in (virtio 1.x 2.7.10 / 2.7.7.2). With EVENT_IDX the
//! `used_event` / `avail_event` fields decide instead of the flags;
//! `virtio-queue` implements both, so devices only say what each chain does.

use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress};

use crate::{DeviceError, GuestMemory};

/// What a device did with one chain.
pub enum Completion {
    /// Done: put it on the used ring with this many bytes written.
    Used(u32),
    /// The device cannot take this chain now (no room on the host side):
    /// leave it on the available ring and stop.
    Retry,
    /// Taken; the device puts it on the used ring itself when the host I/O
    /// completes.
    Deferred,
}

/// Pop and handle chains until the ring is empty (or the device says retry).
/// Returns whether the driver needs an interrupt.
pub fn drain<F>(
    index: usize,
    queue: &mut Queue,
    mem: &GuestMemory,
    handle: F,
) -> Result<bool, DeviceError>
where
    F: FnMut(DescriptorChain<&GuestMemory>) -> Completion,
{
    drain_after(index, queue, mem, false, handle)
}

/// [`drain`] for a device that already put `used_before` buffers on the
/// used ring in this pass (completions of deferred chains).
pub fn drain_after<F>(
    index: usize,
    queue: &mut Queue,
    mem: &GuestMemory,
    used_before: bool,
    mut handle: F,
) -> Result<bool, DeviceError>
where
    F: FnMut(DescriptorChain<&GuestMemory>) -> Completion,
{
    let err = |source| DeviceError::Queue {
        queue: index,
        source,
    };
    let mut used_any = used_before;
    loop {
        queue.disable_notification(mem).map_err(err)?;
        while let Some(chain) = queue.pop_descriptor_chain(mem) {
            let head = chain.head_index();
            match handle(chain) {
                Completion::Used(len) => {
                    queue.add_used(mem, head, len).map_err(err)?;
                    used_any = true;
                }
                Completion::Deferred => {}
                Completion::Retry => {
                    queue.set_next_avail(queue.next_avail().wrapping_sub(1));
                    queue.enable_notification(mem).map_err(err)?;
                    return finish(queue, mem, used_any, index);
                }
            }
        }
        // A malformed avail index makes pop_descriptor_chain return None;
        // surface it as an error instead of treating the ring as empty.
        queue.iter(mem).map_err(err)?;
        if !queue.enable_notification(mem).map_err(err)? {
            break;
        }
    }
    finish(queue, mem, used_any, index)
}

fn finish(
    queue: &mut Queue,
    mem: &GuestMemory,
    used_any: bool,
    index: usize,
) -> Result<bool, DeviceError> {
    if !used_any {
        return Ok(false);
    }
    needs_interrupt(index, queue, mem)
}

/// Whether the driver wants an interrupt for the buffers just used:
/// EVENT_IDX's used_event when negotiated, else the avail ring's
/// VRING_AVAIL_F_NO_INTERRUPT flag (which `virtio-queue` leaves to us).
pub fn needs_interrupt(
    index: usize,
    queue: &mut Queue,
    mem: &GuestMemory,
) -> Result<bool, DeviceError> {
    let err = |source| DeviceError::Queue {
        queue: index,
        source,
    };
    if !queue.event_idx_enabled() {
        let flags: u16 = mem
            .read_obj(GuestAddress(queue.avail_ring()))
            .map_err(|e| err(virtio_queue::Error::GuestMemory(e)))?;
        return Ok(flags & VRING_AVAIL_F_NO_INTERRUPT == 0);
    }
    queue.needs_notification(mem).map_err(err)
}

const VRING_AVAIL_F_NO_INTERRUPT: u16 = 1;
