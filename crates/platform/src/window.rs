//! Host memory a device shows the guest at an address the guest chooses:
//! fbuf's framebuffer BAR (bhyve's devmem segment mapped with
//! `vm_mmap_memseg` whenever the BAR moves).

/// One device memory range, mapped into the guest at most once at a time.
pub trait MemoryWindow: Send {
    /// Show the range at guest physical `base`, or nowhere (`None`). A
    /// refused place (overlapping RAM or another window) leaves the range
    /// unmapped; the device then still answers the BAR through its trap.
    fn place(&mut self, base: Option<u64>) -> std::io::Result<()>;
}
