//! virtio-blk (bhyve's `pci_virtio_block.c`): one request queue of 128,
//! read, write, flush, get-id, discard and write-zeroes.
//!
//! Every request is parsed from the chain with bounds-checked readers: a
//! header the driver can read is required, the last writable byte is the
//! status. Anything malformed gets IOERR/UNSUPP in that status byte (or, with
//! no status byte at all, a used entry of length 0) and a log line. Data
//! moves in bounded chunks, so a chain claiming gigabytes never makes us
//! allocate them. A completed flush means `fdatasync` returned.
//!
//! Reads and writes go to the block back end's [`BlockQueue`] straight from
//! the guest's buffers, up to 128 in flight; their completions come back
//! through an eventfd the transport polls as the device's host fd.
//! Everything else (and `nocache`, whose O_DIRECT needs aligned bounce
//! buffers) runs synchronously.

use std::io::{Read, Write};
use std::os::unix::io::{AsRawFd, RawFd};

use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend};

use md5::{Digest, Md5};
use rhyve_backends::block::{BlockFile, BlockOp, BlockOptions, BlockQueue, BlockRequest};
use rhyve_config::ConfigTree;
use serde::{Deserialize, Serialize};
use virtio_queue::{DescriptorChain, Queue, QueueT, Reader, Writer};

use crate::queue::{drain_after, Completion};
use crate::{
    read_config_bytes, same_config, ConfigureError, DeviceError, GuestMemory, VirtioDevice,
    F_RING_EVENT_IDX, F_RING_INDIRECT_DESC, F_VERSION_1, TYPE_BLOCK,
};
use rhyve_platform::snapshot::{DeviceState, Schema, SnapshotError};

pub const F_SEG_MAX: u64 = 1 << 2;
pub const F_RO: u64 = 1 << 5;
pub const F_BLK_SIZE: u64 = 1 << 6;
pub const F_FLUSH: u64 = 1 << 9;
pub const F_TOPOLOGY: u64 = 1 << 10;
pub const F_DISCARD: u64 = 1 << 13;
pub const F_WRITE_ZEROES: u64 = 1 << 14;

pub const T_IN: u32 = 0;
pub const T_OUT: u32 = 1;
pub const T_FLUSH: u32 = 4;
pub const T_GET_ID: u32 = 8;
pub const T_DISCARD: u32 = 11;
pub const T_WRITE_ZEROES: u32 = 13;

pub const S_OK: u8 = 0;
pub const S_IOERR: u8 = 1;
pub const S_UNSUPP: u8 = 2;

/// bhyve's VTBLK_RINGSZ.
pub const QUEUE_SIZE: u16 = 128;
/// Length of the GET_ID answer.
pub const ID_BYTES: usize = 20;
/// virtio-blk addresses in 512-byte units whatever the logical sector size.
const SECTOR: u64 = 512;
const MAX_DISCARD_SEGMENTS: u32 = 32;
const MAX_DISCARD_SECTORS: u32 = 1 << 22;
/// Data is moved in pieces of this size.
const CHUNK: usize = 1 << 20;

/// Everything the guest can observe, serializable.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockState {
    pub acked_features: u64,
    pub capacity_sectors: u64,
    pub logical_block_size: u32,
    pub physical_block_exp: u8,
    pub readonly: bool,
    pub can_delete: bool,
    pub ident: String,
}

impl Schema for BlockState {
    const KIND: &'static str = "virtio-blk";
    const VERSION: u32 = 1;
}

pub struct Block {
    disk: BlockFile,
    state: BlockState,
    /// Asynchronous reads and writes; None where io_uring is unavailable
    /// or with `nocache` (O_DIRECT needs aligned bounce buffers).
    uring: Option<Uring>,
}

/// Requests in flight at most.
const URING_DEPTH: u32 = 128;

struct Inflight {
    head: u16,
    status: GuestAddress,
    /// Bytes written to the guest on success (data + status).
    used_len: u32,
    /// Keeps the guest memory the request's iovecs point into mapped.
    mem: GuestMemory,
}

/// The back end's queue and what each of its requests completes; tokens
/// are indexes in `slots`.
struct Uring {
    queue: BlockQueue,
    slots: Vec<Option<Inflight>>,
    free: Vec<usize>,
    /// Reused buffer for reaped completions.
    reaped: Vec<(u64, std::io::Result<()>)>,
}

impl Uring {
    fn new(disk: &BlockFile) -> std::io::Result<Self> {
        let queue = BlockQueue::new(disk, URING_DEPTH)?;
        if !queue.is_async() {
            return Err(std::io::Error::other("no io_uring"));
        }
        Ok(Self {
            queue,
            slots: (0..URING_DEPTH).map(|_| None).collect(),
            free: (0..URING_DEPTH as usize).rev().collect(),
            reaped: Vec::new(),
        })
    }
}

/// The iovecs covering `segs` minus `front` bytes at the start and `back`
/// bytes at the end.
fn trim(segs: &[(*mut u8, usize, GuestAddress)], front: usize, back: usize) -> Vec<libc::iovec> {
    let total: usize = segs.iter().map(|s| s.1).sum();
    let Some(keep_end) = total.checked_sub(back) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    let mut pos = 0;
    for &(ptr, len, _) in segs {
        let start = front.max(pos);
        let end = keep_end.min(pos + len);
        if start < end {
            out.push(libc::iovec {
                // SAFETY: start - pos < len, inside this mapped segment.
                iov_base: unsafe { ptr.add(start - pos) } as *mut libc::c_void,
                iov_len: end - start,
            });
        }
        pos += len;
    }
    out
}

/// bhyve's default serial: "BHYVE-" and six bytes of MD5(path) in hex groups.
fn default_ident(path: &str) -> String {
    let d = Md5::digest(path.as_bytes());
    format!(
        "BHYVE-{:02X}{:02X}-{:02X}{:02X}-{:02X}{:02X}",
        d[0], d[1], d[2], d[3], d[4], d[5]
    )
}

impl Block {
    /// Open the disk described by config node `node`.
    pub fn from_config(tree: &ConfigTree, node: &str) -> Result<Self, ConfigureError> {
        let opts = BlockOptions::from_config(tree, node)?;
        let ident = match tree.get(&format!("{node}.ser"))? {
            Some(s) => s,
            None => default_ident(&opts.path.display().to_string()),
        };
        let disk = BlockFile::open(&opts)?;
        Ok(Self::new(disk, ident))
    }

    pub fn new(disk: BlockFile, ident: String) -> Self {
        let exp = (disk.physical_sector_size() / disk.sector_size())
            .max(1)
            .trailing_zeros() as u8;
        let state = BlockState {
            acked_features: 0,
            capacity_sectors: disk.size() / SECTOR,
            logical_block_size: disk.sector_size(),
            physical_block_exp: exp,
            readonly: disk.readonly(),
            can_delete: disk.can_delete(),
            ident,
        };
        // O_DIRECT needs aligned buffers: those requests go through the
        // synchronous bounce-buffer path.
        let uring = if disk.direct() {
            None
        } else {
            match Uring::new(&disk) {
                Ok(u) => Some(u),
                Err(e) => {
                    tracing::info!("virtio-blk: io_uring unavailable ({e}), using synchronous I/O");
                    None
                }
            }
        };
        Self { disk, state, uring }
    }

    pub fn state(&self) -> &BlockState {
        &self.state
    }

    /// struct virtio_blk_config, little endian.
    fn config_bytes(&self) -> [u8; 60] {
        let s = &self.state;
        let mut c = [0u8; 60];
        c[0..8].copy_from_slice(&s.capacity_sectors.to_le_bytes());
        c[12..16].copy_from_slice(&(u32::from(QUEUE_SIZE) - 2).to_le_bytes());
        c[20..24].copy_from_slice(&s.logical_block_size.to_le_bytes());
        c[24] = s.physical_block_exp;
        c[34..36].copy_from_slice(&1u16.to_le_bytes());
        if s.can_delete {
            c[36..40].copy_from_slice(&MAX_DISCARD_SECTORS.to_le_bytes());
            c[40..44].copy_from_slice(&MAX_DISCARD_SEGMENTS.to_le_bytes());
            c[44..48].copy_from_slice(&(s.logical_block_size / 512).to_le_bytes());
            c[56] = 1;
        }
        c[48..52].copy_from_slice(&MAX_DISCARD_SECTORS.to_le_bytes());
        c[52..56].copy_from_slice(&MAX_DISCARD_SEGMENTS.to_le_bytes());
        c
    }

    fn handle(&mut self, mem: &GuestMemory, chain: DescriptorChain<&GuestMemory>) -> Completion {
        if let Some(c) = self.try_async(mem, &chain) {
            return c;
        }
        let (mut reader, mut writer) =
            match (Reader::new(mem, chain.clone()), Writer::new(mem, chain)) {
                (Ok(r), Ok(w)) => (r, w),
                (Err(e), _) | (_, Err(e)) => {
                    tracing::warn!("virtio-blk: bad descriptor chain: {e}");
                    return Completion::Used(0);
                }
            };
        let wlen = writer.available_bytes();
        if wlen == 0 {
            tracing::warn!("virtio-blk: request without a status byte");
            return Completion::Used(0);
        }
        let Ok(mut status_writer) = writer.split_at(wlen - 1) else {
            return Completion::Used(0);
        };
        let (status, data_written) = self.execute(&mut reader, &mut writer);
        tracing::trace!("virtio-blk: request done, status {status}, {data_written} bytes");
        if status_writer.write_all(&[status]).is_err() {
            return Completion::Used(0);
        }
        Completion::Used(data_written as u32 + 1)
    }

    /// Queue a read or write on io_uring. None: take the synchronous path
    /// (other request types, malformed chains, which it reports properly).
    fn try_async(
        &mut self,
        mem: &GuestMemory,
        chain: &DescriptorChain<&GuestMemory>,
    ) -> Option<Completion> {
        let uring = self.uring.as_mut()?;
        let mut hdr = [0u8; 16];
        Reader::<()>::new(mem, chain.clone())
            .ok()?
            .read_exact(&mut hdr)
            .ok()?;
        let kind = u32::from_le_bytes(hdr[0..4].try_into().unwrap());
        let sector = u64::from_le_bytes(hdr[8..16].try_into().unwrap());
        if kind != T_IN && (kind != T_OUT || self.state.readonly) {
            return None;
        }
        let mut readable = Vec::new();
        let mut writable = Vec::new();
        for desc in chain.clone() {
            let slice = mem.get_slice(desc.addr(), desc.len() as usize).ok()?;
            let seg = (
                slice.ptr_guard_mut().as_ptr(),
                desc.len() as usize,
                desc.addr(),
            );
            if desc.is_write_only() {
                writable.push(seg);
            } else {
                readable.push(seg);
            }
        }
        let &(_, last_len, last_addr) = writable.last()?;
        let status = last_addr.checked_add((last_len as u64).checked_sub(1)?)?;
        let data = if kind == T_IN {
            trim(&writable, 0, 1)
        } else {
            trim(&readable, 16, 0)
        };
        let expected: usize = data.iter().map(|v| v.iov_len).sum();
        let offset = sector.checked_mul(SECTOR)?;
        let end = offset.checked_add(expected as u64)?;
        if end > self.disk.size() || data.len() > 1024 || expected == 0 {
            return None;
        }
        let Some(slot) = uring.free.pop() else {
            // Full: leave it on the ring; a completion brings us back.
            return Some(Completion::Retry);
        };
        let req = BlockRequest {
            op: if kind == T_IN {
                BlockOp::Read
            } else {
                BlockOp::Write
            },
            offset,
            iovecs: data,
        };
        // SAFETY: the iovecs point into guest memory that the clone kept
        // in the slot maps until the completion for `slot` is reaped (or
        // the queue is quiesced on reset or drop).
        if unsafe { uring.queue.submit(&self.disk, req, slot as u64) }.is_err() {
            uring.free.push(slot);
            return Some(Completion::Retry);
        }
        let used_len = if kind == T_IN { expected as u32 + 1 } else { 1 };
        uring.slots[slot] = Some(Inflight {
            head: chain.head_index(),
            status,
            used_len,
            mem: mem.clone(),
        });
        Some(Completion::Deferred)
    }

    /// Complete finished io_uring requests: status byte, used ring.
    fn reap(&mut self, queue: &mut Queue) -> Result<bool, DeviceError> {
        let Some(uring) = self.uring.as_mut() else {
            return Ok(false);
        };
        let mut any = false;
        let mut done = std::mem::take(&mut uring.reaped);
        uring.queue.reap(&mut done);
        let mut failed = None;
        for (slot, result) in done.drain(..) {
            let Some(req) = uring.slots.get_mut(slot as usize).and_then(Option::take) else {
                continue;
            };
            uring.free.push(slot as usize);
            if failed.is_some() {
                continue;
            }
            let ok = result.is_ok();
            if let Err(e) = result {
                tracing::warn!("virtio-blk: I/O failed: {e}");
            }
            let status = if ok { S_OK } else { S_IOERR };
            let used = if ok { req.used_len } else { 1 };
            let _ = req.mem.write_obj(status, req.status);
            match queue.add_used(&req.mem, req.head, used) {
                Ok(()) => any = true,
                Err(source) => failed = Some(source),
            }
        }
        uring.reaped = done;
        match failed {
            Some(source) => Err(DeviceError::Queue { queue: 0, source }),
            None => Ok(any),
        }
    }

    /// Wait for every request in flight (reset: nothing may land later).
    fn quiesce(&mut self) {
        let Some(uring) = self.uring.as_mut() else {
            return;
        };
        uring.queue.quiesce();
        for (i, s) in uring.slots.iter_mut().enumerate() {
            if s.take().is_some() {
                uring.free.push(i);
            }
        }
    }

    fn execute(&self, reader: &mut Reader<'_>, writer: &mut Writer<'_>) -> (u8, usize) {
        let mut hdr = [0u8; 16];
        if reader.read_exact(&mut hdr).is_err() {
            tracing::warn!("virtio-blk: request header too short");
            return (S_IOERR, 0);
        }
        let kind = u32::from_le_bytes(hdr[0..4].try_into().unwrap());
        let sector = u64::from_le_bytes(hdr[8..16].try_into().unwrap());
        tracing::trace!(
            "virtio-blk: request type {kind} sector {sector}, {} bytes in, {} bytes out",
            reader.available_bytes(),
            writer.available_bytes()
        );
        let features = self.state.acked_features;
        let result = match kind {
            T_IN => self.read(sector, writer).map(|n| (S_OK, n)),
            T_OUT if self.state.readonly => Ok((S_IOERR, 0)),
            T_OUT => self.write(sector, reader).map(|()| (S_OK, 0)),
            T_FLUSH => self.disk.flush().map(|()| (S_OK, 0)),
            T_GET_ID => {
                let id = self.state.ident.as_bytes();
                let mut buf = [0u8; ID_BYTES];
                let n = id.len().min(ID_BYTES);
                buf[..n].copy_from_slice(&id[..n]);
                let n = writer.available_bytes().min(ID_BYTES);
                writer.write_all(&buf[..n]).map(|()| (S_OK, n))
            }
            T_DISCARD if features & F_DISCARD != 0 && self.state.can_delete => {
                self.ranges(reader, true)
            }
            T_WRITE_ZEROES if features & F_WRITE_ZEROES != 0 && !self.state.readonly => {
                self.ranges(reader, false)
            }
            _ => Ok((S_UNSUPP, 0)),
        };
        match result {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!("virtio-blk: request type {kind} at sector {sector} failed: {e}");
                (S_IOERR, 0)
            }
        }
    }

    fn offset(sector: u64) -> std::io::Result<u64> {
        sector
            .checked_mul(SECTOR)
            .ok_or_else(|| std::io::Error::other("sector number overflows"))
    }

    fn read(&self, sector: u64, writer: &mut Writer<'_>) -> std::io::Result<usize> {
        let mut offset = Self::offset(sector)?;
        let total = writer.available_bytes();
        if offset
            .checked_add(total as u64)
            .is_none_or(|e| e > self.disk.size())
        {
            return Err(std::io::Error::other("read beyond the end of the disk"));
        }
        let mut buf = vec![0u8; total.min(CHUNK)];
        let mut done = 0;
        while done < total {
            let n = (total - done).min(CHUNK);
            self.disk.read_at(&mut buf[..n], offset)?;
            writer.write_all(&buf[..n])?;
            offset += n as u64;
            done += n;
        }
        Ok(total)
    }

    fn write(&self, sector: u64, reader: &mut Reader<'_>) -> std::io::Result<()> {
        let mut offset = Self::offset(sector)?;
        let total = reader.available_bytes();
        if offset
            .checked_add(total as u64)
            .is_none_or(|e| e > self.disk.size())
        {
            return Err(std::io::Error::other("write beyond the end of the disk"));
        }
        let mut buf = vec![0u8; total.min(CHUNK)];
        let mut done = 0;
        while done < total {
            let n = (total - done).min(CHUNK);
            reader.read_exact(&mut buf[..n])?;
            self.disk.write_at(&buf[..n], offset)?;
            offset += n as u64;
            done += n;
        }
        Ok(())
    }

    /// DISCARD / WRITE_ZEROES: a list of {sector, num_sectors, flags} segments.
    fn ranges(&self, reader: &mut Reader<'_>, discard: bool) -> std::io::Result<(u8, usize)> {
        let count = reader.available_bytes() / 16;
        if count == 0
            || !reader.available_bytes().is_multiple_of(16)
            || count > MAX_DISCARD_SEGMENTS as usize
        {
            return Ok((S_UNSUPP, 0));
        }
        for _ in 0..count {
            let mut seg = [0u8; 16];
            reader.read_exact(&mut seg)?;
            let sector = u64::from_le_bytes(seg[0..8].try_into().unwrap());
            let sectors = u32::from_le_bytes(seg[8..12].try_into().unwrap());
            let flags = u32::from_le_bytes(seg[12..16].try_into().unwrap());
            // Only the unmap bit is defined, and only for write-zeroes.
            if flags & !1 != 0 || (discard && flags != 0) || sectors > MAX_DISCARD_SECTORS {
                return Ok((S_UNSUPP, 0));
            }
            let offset = Self::offset(sector)?;
            let len = u64::from(sectors) * SECTOR;
            if discard {
                self.disk.discard(offset, len)?;
            } else {
                self.disk.write_zeroes(offset, len, flags & 1 != 0)?;
            }
        }
        Ok((S_OK, 0))
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        TYPE_BLOCK
    }
    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE]
    }
    fn features(&self) -> u64 {
        let mut f = F_SEG_MAX
            | F_BLK_SIZE
            | F_FLUSH
            | F_TOPOLOGY
            | F_RING_INDIRECT_DESC
            | F_RING_EVENT_IDX
            | F_VERSION_1;
        if self.state.readonly {
            f |= F_RO;
        } else {
            f |= F_WRITE_ZEROES;
        }
        if self.state.can_delete {
            f |= F_DISCARD;
        }
        f
    }
    fn ack_features(&mut self, features: u64) {
        self.state.acked_features = features & self.features();
    }
    fn config_size(&self) -> usize {
        60
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config_bytes(), offset, data);
    }
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        tracing::debug!(
            "virtio-blk: ignoring {}-byte write to read-only config at {offset:#x}",
            data.len()
        );
    }
    fn process_queue(
        &mut self,
        index: usize,
        queue: &mut Queue,
        mem: &GuestMemory,
    ) -> Result<bool, DeviceError> {
        if index != 0 {
            return Err(DeviceError::NoQueue(index));
        }
        let mut reaped = self.reap(queue)?;
        let mut notify = false;
        loop {
            notify |= drain_after(index, queue, mem, reaped, |chain| self.handle(mem, chain))?;
            let Some(u) = self.uring.as_mut() else {
                return Ok(notify);
            };
            u.queue.commit();
            // What the page cache served finished inside the submission:
            // complete it in this pass rather than after a wake-up, then
            // take the chains a full queue left on the ring.
            reaped = self.reap(queue)?;
            if !reaped {
                return Ok(notify);
            }
        }
    }
    fn host_fd(&self) -> Option<RawFd> {
        self.uring
            .as_ref()
            .map(|u| u.queue.completion_fd().as_raw_fd())
    }
    fn host_event(&mut self) -> Vec<usize> {
        vec![0]
    }
    fn reset(&mut self) {
        self.quiesce();
        self.state.acked_features = 0;
    }
    fn drain(
        &mut self,
        queues: &mut [Queue],
        _mem: &GuestMemory,
    ) -> Result<Vec<usize>, DeviceError> {
        let Some(queue) = queues.first_mut() else {
            return Ok(Vec::new());
        };
        let mut any = false;
        while self.uring.as_ref().is_some_and(|u| u.queue.in_flight() > 0) {
            if let Some(u) = self.uring.as_mut() {
                u.queue.wait();
            }
            any |= self.reap(queue)?;
        }
        Ok(if any { vec![0] } else { Vec::new() })
    }
    fn save_state(&self) -> Result<DeviceState, SnapshotError> {
        DeviceState::encode("virtio-blk", &self.state)
    }
    fn restore_state(&mut self, saved: &DeviceState) -> Result<(), SnapshotError> {
        let s: BlockState = saved.decode()?;
        let d = "virtio-blk";
        same_config(
            d,
            "disk size in sectors",
            &s.capacity_sectors,
            &self.state.capacity_sectors,
        )?;
        same_config(
            d,
            "sector size",
            &s.logical_block_size,
            &self.state.logical_block_size,
        )?;
        same_config(d, "read-only setting", &s.readonly, &self.state.readonly)?;
        self.state = s;
        Ok(())
    }
}
