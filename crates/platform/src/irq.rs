//! Interrupt lines as devices see them. The hypervisor backend implements
//! these on top of its interrupt controller (KVM: `KVM_IRQ_LINE`, irqfd, MSI
//! routes); device models and their tests only see the trait.

/// A wire into the interrupt controller: an ISA IRQ or an IOAPIC pin.
pub trait InterruptLine: Send + Sync {
    /// Drive a level-triggered line.
    fn set_level(&self, asserted: bool);
    /// Signal an edge-triggered line once.
    fn pulse(&self) {
        self.set_level(true);
        self.set_level(false);
    }
}

/// Delivers message-signalled interrupts (MSI / MSI-X).
pub trait MsiSender: Send + Sync {
    fn send(&self, address: u64, data: u32);
}

/// Hands out interrupt lines and the MSI sender; implemented by the hypervisor
/// backend, faked in device tests.
pub trait InterruptController: Send + Sync {
    /// The line wired to global system interrupt `gsi` (ISA IRQ n is GSI n,
    /// except IRQ 0 which is GSI 2; PCI INTx pins start at GSI 16).
    fn line(&self, gsi: u32) -> std::sync::Arc<dyn InterruptLine>;
    fn msi(&self) -> std::sync::Arc<dyn MsiSender>;
}
