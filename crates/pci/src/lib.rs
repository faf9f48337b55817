//! PCI emulation: config space, BARs, INTx routing, MSI/MSI-X, host bridge and LPC bridge.
