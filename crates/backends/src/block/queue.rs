//! The asynchronous side of the block back end: reads, writes and flushes
//! of one [`BlockFile`], submitted by a device front end (virtio-blk, NVMe)
//! with the guest's own buffers as iovecs, completed later under a token
//! the front end chose. bhyve's `block_if.h` shape: front ends only parse
//! requests, this moves the data.
//!
//! io_uring carries the requests when the host offers it and the file is
//! not opened O_DIRECT (`nocache`, whose guest buffers carry no alignment
//! promise). Otherwise each request runs synchronously when submitted
//! (through an aligned bounce buffer for O_DIRECT) and its completion is
//! queued at once, so front ends have a single path either way.
//!
//! Completions are announced on one eventfd a worker can poll. Reads the
//! page cache serves complete inside the submission itself, so a front end
//! reaps right after [`BlockQueue::commit`] and completes them in the same
//! pass instead of a wake-up later. (io_uring's "asynchronous" eventfd
//! would skip announcing those, but also the completions run as task work
//! in the submitting thread, e.g. buffered reads that waited for a page:
//! they would be lost while that thread sleeps in poll.)
//!
//! Why hand-written: io_uring's crate gives the rings, not a block queue
//! with bounded slots, range checks and a synchronous twin.

use std::collections::VecDeque;
use std::io;
use std::os::unix::io::AsRawFd;

use io_uring::{opcode, squeue, types, IoUring};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{AlignedBuf, BlockFile};

/// Requests at least this large go straight to io_uring's workers instead
/// of being copied inside the submitting call: a batch of large reads then
/// copies on every core in parallel, while the front end's thread goes on
/// (a batch of 32 1 MiB page-cache reads would otherwise be 32 MiB of
/// copying on one thread before the first completion). Small requests stay
/// inline, where the page cache serves them cheapest.
const ASYNC_MIN_BYTES: usize = 128 << 10;

/// What a request does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockOp {
    /// Fill the iovecs from the disk at the offset.
    Read,
    /// Write the iovecs to the disk at the offset.
    Write,
    /// Make every completed write durable (`fdatasync`).
    Flush,
}

/// One request: the iovecs address memory the caller keeps valid until its
/// completion is reaped (see [`BlockQueue::submit`]).
pub struct BlockRequest {
    pub op: BlockOp,
    /// Byte offset on the disk (ignored by flushes).
    pub offset: u64,
    pub iovecs: Vec<libc::iovec>,
}

/// Every slot is taken: complete something first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueFull;

struct Slot {
    token: u64,
    expected: usize,
    /// Kept alive until the kernel is done with the array.
    _iovecs: Vec<libc::iovec>,
}

enum Engine {
    Uring(Box<IoUring>),
    Sync,
}

/// Requests in flight on one disk, at most `depth` at a time.
pub struct BlockQueue {
    engine: Engine,
    done: EventFd,
    slots: Vec<Option<Slot>>,
    free: Vec<usize>,
    /// Completions of the synchronous engine and of requests refused at
    /// submission, waiting to be reaped.
    ready: VecDeque<(u64, io::Result<()>)>,
}

// SAFETY: the iovec pointers in the slots address memory whose validity is
// the submitter's promise (see `submit`), not tied to a thread.
unsafe impl Send for BlockQueue {}

fn total_len(iovecs: &[libc::iovec]) -> usize {
    iovecs.iter().map(|v| v.iov_len).sum()
}

impl BlockQueue {
    /// A queue of `depth` slots for `file`: io_uring unless the file is
    /// O_DIRECT or the host refuses io_uring (then synchronous).
    pub fn new(file: &BlockFile, depth: u32) -> io::Result<Self> {
        let depth = depth.max(1);
        let done = EventFd::new(EFD_NONBLOCK)?;
        let engine = if file.direct() {
            Engine::Sync
        } else {
            match IoUring::new(depth.next_power_of_two()) {
                Ok(ring) => {
                    ring.submitter().register_eventfd(done.as_raw_fd())?;
                    Engine::Uring(Box::new(ring))
                }
                Err(e) => {
                    tracing::info!("block: io_uring unavailable ({e}), using synchronous I/O");
                    Engine::Sync
                }
            }
        };
        Ok(Self {
            engine,
            done,
            slots: (0..depth).map(|_| None).collect(),
            free: (0..depth as usize).rev().collect(),
            ready: VecDeque::new(),
        })
    }

    /// True when requests go through io_uring (false: synchronous).
    pub fn is_async(&self) -> bool {
        matches!(self.engine, Engine::Uring(_))
    }

    /// Becomes readable when completions are waiting to be reaped.
    pub fn completion_fd(&self) -> &EventFd {
        &self.done
    }

    /// Requests submitted and not reaped yet.
    pub fn in_flight(&self) -> usize {
        self.slots.len() - self.free.len()
    }

    /// No slot is free: [`submit`](Self::submit) would refuse.
    pub fn is_full(&self) -> bool {
        self.free.is_empty()
    }

    /// Start `req`; its result comes back from [`reap`](Self::reap) with
    /// `token`. Requests outside the disk, writes to a read-only disk and
    /// failures of the synchronous engine complete with an error.
    ///
    /// # Safety
    /// Every iovec must address memory that stays mapped and writable
    /// (reads) or readable (writes) until this request's completion has
    /// been returned by `reap`, or `quiesce` (or drop) has returned.
    pub unsafe fn submit(
        &mut self,
        file: &BlockFile,
        req: BlockRequest,
        token: u64,
    ) -> Result<(), QueueFull> {
        let slot = self.free.pop().ok_or(QueueFull)?;
        let expected = total_len(&req.iovecs);
        if let Err(e) = Self::check(file, &req, expected) {
            self.free.push(slot);
            self.complete_now(token, Err(e));
            return Ok(());
        }
        let Engine::Uring(ring) = &mut self.engine else {
            self.free.push(slot);
            // SAFETY: forwarded from our caller.
            let result = unsafe { run_sync(file, &req, expected) };
            self.complete_now(token, result);
            return Ok(());
        };
        let fd = types::Fd(file.as_raw_fd());
        let count = req.iovecs.len() as u32;
        let entry = match req.op {
            BlockOp::Read => opcode::Readv::new(fd, req.iovecs.as_ptr(), count)
                .offset(req.offset)
                .build(),
            BlockOp::Write => opcode::Writev::new(fd, req.iovecs.as_ptr(), count)
                .offset(req.offset)
                .build(),
            BlockOp::Flush => opcode::Fsync::new(fd)
                .flags(types::FsyncFlags::DATASYNC)
                .build(),
        }
        .user_data(slot as u64);
        let entry = if expected >= ASYNC_MIN_BYTES {
            entry.flags(squeue::Flags::ASYNC)
        } else {
            entry
        };
        // SAFETY: the iovec array moves into the slot (its heap
        // buffer does not move) and lives until the completion is
        // reaped; the memory it points to is our caller's promise.
        let pushed = unsafe {
            ring.submission().push(&entry).is_ok() || {
                // The submission ring is full of unsubmitted
                // entries: hand them to the kernel and retry.
                ring.submit().is_ok() && ring.submission().push(&entry).is_ok()
            }
        };
        if !pushed {
            self.free.push(slot);
            return Err(QueueFull);
        }
        self.slots[slot] = Some(Slot {
            token,
            expected: if req.op == BlockOp::Flush {
                0
            } else {
                expected
            },
            _iovecs: req.iovecs,
        });
        Ok(())
    }

    fn check(file: &BlockFile, req: &BlockRequest, len: usize) -> io::Result<()> {
        if req.op != BlockOp::Read && file.readonly() {
            return Err(io::Error::from_raw_os_error(libc::EROFS));
        }
        if req.op != BlockOp::Flush {
            file.check_range(req.offset, len)?;
        }
        Ok(())
    }

    fn complete_now(&mut self, token: u64, result: io::Result<()>) {
        self.ready.push_back((token, result));
    }

    /// Hand every request pushed since the last call to the kernel.
    pub fn commit(&mut self) {
        if let Engine::Uring(ring) = &mut self.engine {
            if let Err(e) = ring.submit() {
                tracing::warn!("block: io_uring submit failed: {e}");
            }
        }
    }

    /// Take the finished requests' (token, result) pairs into `out`. A
    /// read or write that moved fewer bytes than asked is an error.
    pub fn reap(&mut self, out: &mut Vec<(u64, io::Result<()>)>) {
        out.extend(self.ready.drain(..));
        let Engine::Uring(ring) = &mut self.engine else {
            return;
        };
        // Cleared before the completion ring is read: a completion posted
        // in between leaves the count set, and only costs a spare wake-up.
        let _ = self.done.read();
        for cqe in ring.completion() {
            let index = cqe.user_data() as usize;
            let Some(slot) = self.slots.get_mut(index).and_then(Option::take) else {
                continue;
            };
            self.free.push(index);
            let result = cqe.result();
            let r = if result < 0 {
                Err(io::Error::from_raw_os_error(-result))
            } else if result as usize == slot.expected {
                Ok(())
            } else {
                Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("moved {result} of {} bytes", slot.expected),
                ))
            };
            out.push((slot.token, r));
        }
    }

    /// Block until at least one request in flight has finished (then
    /// [`reap`](Self::reap) it); at once when nothing is in flight or the
    /// engine is synchronous. For front ends that run one request at a time.
    pub fn wait(&mut self) {
        if !self.ready.is_empty() || self.free.len() == self.slots.len() {
            return;
        }
        if let Engine::Uring(ring) = &mut self.engine {
            if let Err(e) = ring.submit_and_wait(1) {
                tracing::warn!("block: io_uring wait failed: {e}");
            }
        }
    }

    /// Wait for every request in flight and forget their results (a reset:
    /// nothing may land in guest memory afterwards).
    pub fn quiesce(&mut self) {
        self.ready.clear();
        let Engine::Uring(ring) = &mut self.engine else {
            return;
        };
        while self.free.len() < self.slots.len() {
            if ring.submit_and_wait(1).is_err() {
                break;
            }
            for cqe in ring.completion() {
                let index = cqe.user_data() as usize;
                if self.slots.get_mut(index).and_then(Option::take).is_some() {
                    self.free.push(index);
                }
            }
        }
        let _ = self.done.read();
    }
}

impl Drop for BlockQueue {
    fn drop(&mut self) {
        self.quiesce();
    }
}

/// The synchronous engine: the whole request now.
///
/// # Safety
/// The iovecs address valid memory (as for [`BlockQueue::submit`]).
unsafe fn run_sync(file: &BlockFile, req: &BlockRequest, len: usize) -> io::Result<()> {
    if req.op == BlockOp::Flush {
        return file.flush();
    }
    if file.direct() {
        let mut bounce = AlignedBuf::new(len)?;
        let buf = &mut bounce.as_mut_slice()[..len];
        if req.op == BlockOp::Read {
            file.read_at(buf, req.offset)?;
        }
        let mut pos = 0;
        for v in &req.iovecs {
            let (guest, host) = (v.iov_base as *mut u8, buf[pos..].as_mut_ptr());
            // SAFETY: the iovec is valid memory of iov_len bytes (our
            // caller's promise) and the bounce holds `len` >= pos + iov_len.
            unsafe {
                if req.op == BlockOp::Read {
                    std::ptr::copy_nonoverlapping(host, guest, v.iov_len);
                } else {
                    std::ptr::copy_nonoverlapping(guest, host, v.iov_len);
                }
            }
            pos += v.iov_len;
        }
        if req.op == BlockOp::Write {
            file.write_at(buf, req.offset)?;
        }
        return Ok(());
    }
    // Positional vectored I/O straight into the iovecs, resumed after a
    // short transfer.
    let mut iovecs = req.iovecs.clone();
    let mut offset = req.offset;
    let mut first = 0;
    while first < iovecs.len() {
        let chunk = &iovecs[first..];
        let count = chunk.len().min(1024) as libc::c_int;
        // SAFETY: valid iovecs (see above) on our own descriptor.
        let n = unsafe {
            if req.op == BlockOp::Read {
                libc::preadv(
                    file.as_raw_fd(),
                    chunk.as_ptr(),
                    count,
                    offset as libc::off_t,
                )
            } else {
                libc::pwritev(
                    file.as_raw_fd(),
                    chunk.as_ptr(),
                    count,
                    offset as libc::off_t,
                )
            }
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            return Err(io::Error::from(io::ErrorKind::UnexpectedEof));
        }
        let mut left = n as usize;
        offset += left as u64;
        while left > 0 && first < iovecs.len() {
            let v = &mut iovecs[first];
            let step = left.min(v.iov_len);
            // SAFETY: advancing inside the same buffer.
            v.iov_base = unsafe { (v.iov_base as *mut u8).add(step) } as *mut libc::c_void;
            v.iov_len -= step;
            left -= step;
            if v.iov_len == 0 {
                first += 1;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::block::BlockOptions;

    fn disk(test: &str, nocache: bool) -> (std::path::PathBuf, BlockFile) {
        let dir = std::env::temp_dir().join(format!(
            "rhyve-blkq-{}-{test}-{nocache}",
            std::process::id()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("d.img");
        let data: Vec<u8> = (0..1u32 << 20).map(|i| (i % 251) as u8).collect();
        std::fs::write(&path, data).unwrap();
        let file = BlockFile::open(&BlockOptions {
            path: path.clone(),
            readonly: false,
            nocache,
            sync: false,
            nodelete: false,
            sector_size: None,
        })
        .unwrap();
        (dir, file)
    }

    fn iov(buf: &mut [u8]) -> libc::iovec {
        libc::iovec {
            iov_base: buf.as_mut_ptr() as *mut libc::c_void,
            iov_len: buf.len(),
        }
    }

    fn wait(q: &mut BlockQueue, n: usize) -> Vec<(u64, io::Result<()>)> {
        let mut out = Vec::new();
        while out.len() < n {
            q.commit();
            q.reap(&mut out);
        }
        out
    }

    #[test]
    fn reads_writes_and_refusals_on_both_engines() {
        for nocache in [false, true] {
            let (dir, file) = match std::panic::catch_unwind(|| disk("rw", nocache)) {
                Ok(d) => d,
                // tmpfs refuses O_DIRECT: nothing to test there.
                Err(_) if nocache => continue,
                Err(e) => std::panic::resume_unwind(e),
            };
            let mut q = BlockQueue::new(&file, 4).unwrap();
            assert_eq!(q.is_async(), !nocache);
            let (mut a, mut b) = (vec![0u8; 4096], vec![0u8; 512]);
            let req = BlockRequest {
                op: BlockOp::Read,
                offset: 8192,
                iovecs: vec![iov(&mut a), iov(&mut b)],
            };
            // SAFETY: a and b outlive the wait below.
            unsafe { q.submit(&file, req, 7).unwrap() };
            let done = wait(&mut q, 1);
            assert_eq!(done[0].0, 7);
            assert!(done[0].1.is_ok());
            assert_eq!(a[0], (8192 % 251) as u8);
            assert_eq!(b[511], ((8192 + 4096 + 511) % 251) as u8);

            let mut w = vec![0x5Au8; 4096];
            let req = BlockRequest {
                op: BlockOp::Write,
                offset: 0,
                iovecs: vec![iov(&mut w)],
            };
            // SAFETY: w outlives the wait.
            unsafe { q.submit(&file, req, 8).unwrap() };
            let flush = BlockRequest {
                op: BlockOp::Flush,
                offset: 0,
                iovecs: Vec::new(),
            };
            // SAFETY: no buffers.
            unsafe { q.submit(&file, flush, 9).unwrap() };
            let beyond = BlockRequest {
                op: BlockOp::Read,
                offset: (1 << 20) - 512,
                iovecs: vec![iov(&mut a)],
            };
            // SAFETY: refused before any I/O.
            unsafe { q.submit(&file, beyond, 10).unwrap() };
            let mut done = wait(&mut q, 3);
            done.sort_by_key(|d| d.0);
            assert!(done[0].1.is_ok() && done[1].1.is_ok());
            assert!(done[2].1.is_err(), "a read past the end must fail");
            let mut check = vec![0u8; 4096];
            file.read_at(&mut check, 0).unwrap();
            assert!(check.iter().all(|&x| x == 0x5A));
            assert_eq!(q.in_flight(), 0);
            std::fs::remove_dir_all(&dir).unwrap();
        }
    }

    #[test]
    fn a_full_queue_refuses_until_reaped() {
        let (dir, file) = disk("full", false);
        let mut q = BlockQueue::new(&file, 2).unwrap();
        let mut bufs = vec![vec![0u8; 512]; 3];
        let mut reqs = bufs.iter_mut().map(|b| BlockRequest {
            op: BlockOp::Read,
            offset: 0,
            iovecs: vec![iov(b)],
        });
        if q.is_async() {
            // SAFETY: bufs outlive the queue's use of them (quiesce below).
            unsafe {
                q.submit(&file, reqs.next().unwrap(), 1).unwrap();
                q.submit(&file, reqs.next().unwrap(), 2).unwrap();
                assert!(q.is_full());
                assert_eq!(q.submit(&file, reqs.next().unwrap(), 3), Err(QueueFull));
            }
            assert_eq!(wait(&mut q, 2).len(), 2);
            assert!(!q.is_full());
        }
        q.quiesce();
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
