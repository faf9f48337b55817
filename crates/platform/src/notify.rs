//! Fast paths between a guest and device threads that bypass the vCPU
//! thread: guest writes that signal an eventfd (KVM ioeventfd) and eventfds
//! that inject an MSI (KVM irqfd with an MSI route). Implemented by the
//! hypervisor backend; virtio transports use them for queue notifications
//! and interrupts.

use std::io;
use std::os::fd::BorrowedFd;

/// Where a guest write lands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoAddress {
    Port(u16),
    Mmio(u64),
}

/// An MSI message (address/data pair, as programmed in an MSI-X table entry).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MsiRoute {
    pub address: u64,
    pub data: u32,
}

pub trait GuestNotifiers: Send + Sync {
    /// Signal `fd` whenever the guest writes `len` bytes equal to `value` at `addr`.
    fn add_ioevent(
        &self,
        fd: BorrowedFd<'_>,
        addr: IoAddress,
        len: u32,
        value: u64,
    ) -> io::Result<()>;
    fn remove_ioevent(
        &self,
        fd: BorrowedFd<'_>,
        addr: IoAddress,
        len: u32,
        value: u64,
    ) -> io::Result<()>;
    /// Inject `route` each time `fd` is signalled. Returns a handle for
    /// [`Self::update_msi`] and [`Self::remove_msi`].
    fn add_msi(&self, fd: BorrowedFd<'_>, route: MsiRoute) -> io::Result<u32>;
    /// The guest reprogrammed the vector.
    fn update_msi(&self, handle: u32, route: MsiRoute) -> io::Result<()>;
    fn remove_msi(&self, fd: BorrowedFd<'_>, handle: u32) -> io::Result<()>;
}
