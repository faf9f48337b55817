//! The guest-visible machine that every rhyve layer agrees on.
//!
//! bhyve's platform (memory map, port numbers, IRQ assignments) lives here as
//! plain constants, together with the few small traits devices are written
//! against: a port/MMIO [`bus::Bus`], [`irq::InterruptLine`]s and
//! [`exit::ExitRequests`] through which a device asks the VM to reset, power
//! off or stop. Nothing here knows about KVM.

pub mod bus;
pub mod entry;
pub mod exit;
pub mod irq;
pub mod layout;
pub mod notify;
pub mod snapshot;
pub mod window;
