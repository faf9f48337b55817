//! MSI and MSI-X capabilities on a [`PciConfigSpace`].
//!
//! Layouts follow bhyve's `pci_emul_add_msicap` (64-bit address, no
//! per-vector masking, 1-32 messages) and `pci_emul_add_msixcap` (table at
//! offset 0 of a dedicated 32-bit memory BAR, PBA at the next 4 KiB
//! boundary, every vector masked at reset). Unlike bhyve, the pending bit
//! array is implemented: a message raised while its vector or the function
//! is masked is remembered and sent when the mask is lifted, as the spec
//! requires.
//!
//! Anything that changes where a message would go (enable and mask bits,
//! address, data) bumps [`PciConfigSpace::interrupt_generation`], so a
//! backend that caches routes (KVM irqfd/GSI routing) can poll it cheaply
//! and re-read [`PciConfigSpace::msix_message`] only when it moved. A
//! function sees every such change as it happens, too: table writes arrive
//! through its `bar_write` (which forwards them to
//! [`PciConfigSpace::msix_write`]) and enable/mask bits through its
//! `config_write`, so comparing the generation after either call is an
//! exact change notification.

use serde::{Deserialize, Serialize};

use crate::config::{regs, BarKind, PciConfigSpace};
use crate::PciError;

/// Largest MSI-X table the spec allows.
pub const MAX_MSIX_VECTORS: u16 = 2048;
const MSIX_ENTRY_SIZE: u64 = 16;
const MSIX_CTRL_ENABLE: u16 = 1 << 15;
const MSIX_CTRL_FUNCTION_MASK: u16 = 1 << 14;
const MSIX_VECTOR_MASKED: u32 = 1;
const MSI_CTRL_ENABLE: u16 = 1;
const MSI_CTRL_64BIT: u16 = 1 << 7;
/// Bytes of bhyve's 64-bit MSI capability (ID through message data).
const MSI_CAP_LEN: u16 = 14;
const MSIX_CAP_LEN: u16 = 12;

/// One interrupt message: write `data` to `address`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct MsiMessage {
    pub address: u64,
    pub data: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct MsiState {
    cap_offset: u16,
    /// Messages the function can send (power of two, 1-32).
    vectors: u8,
}

/// The MSI-X table, PBA and where they live.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MsixState {
    cap_offset: u16,
    bar: u8,
    table_offset: u64,
    pba_offset: u64,
    /// Per vector: address low, address high, data, vector control.
    table: Vec<[u32; 4]>,
    /// Pending bits, 64 vectors per word.
    pending: Vec<u64>,
}

impl MsixState {
    /// BAR holding the table and the PBA.
    pub fn bar(&self) -> usize {
        usize::from(self.bar)
    }

    pub fn table_offset(&self) -> u64 {
        self.table_offset
    }

    pub fn pba_offset(&self) -> u64 {
        self.pba_offset
    }

    pub fn vectors(&self) -> u16 {
        self.table.len() as u16
    }

    fn table_len(&self) -> u64 {
        self.table.len() as u64 * MSIX_ENTRY_SIZE
    }

    fn pba_len(&self) -> u64 {
        self.pending.len() as u64 * 8
    }

    fn is_pending(&self, v: usize) -> bool {
        self.pending
            .get(v / 64)
            .is_some_and(|w| w & (1 << (v % 64)) != 0)
    }

    fn set_pending(&mut self, v: usize, on: bool) {
        if let Some(w) = self.pending.get_mut(v / 64) {
            if on {
                *w |= 1 << (v % 64);
            } else {
                *w &= !(1 << (v % 64));
            }
        }
    }

    fn entry_byte(&self, offset: u64) -> u8 {
        let v = (offset / MSIX_ENTRY_SIZE) as usize;
        let within = (offset % MSIX_ENTRY_SIZE) as usize;
        self.table
            .get(v)
            .map_or(0xFF, |e| e[within / 4].to_le_bytes()[within % 4])
    }
}

/// True if `a` and `b` have the same MSI and MSI-X layout.
pub(crate) fn same_shape(a: &PciConfigSpace, b: &PciConfigSpace) -> bool {
    let msi = match (&a.msi, &b.msi) {
        (None, None) => true,
        (Some(x), Some(y)) => x.cap_offset == y.cap_offset && x.vectors == y.vectors,
        _ => false,
    };
    let msix = match (&a.msix, &b.msix) {
        (None, None) => true,
        (Some(x), Some(y)) => {
            x.cap_offset == y.cap_offset
                && x.bar == y.bar
                && x.table_offset == y.table_offset
                && x.pba_offset == y.pba_offset
                && x.table.len() == y.table.len()
                && x.pending.len() == y.pending.len()
        }
        _ => false,
    };
    msi && msix
}

impl PciConfigSpace {
    // ---- MSI ----

    /// Add bhyve's 64-bit MSI capability for `vectors` messages (a power
    /// of two, 1-32).
    pub fn add_msi_capability(&mut self, vectors: u8) -> Result<u16, PciError> {
        if !vectors.is_power_of_two() || vectors > 32 {
            return Err(PciError::OutOfRange {
                what: "MSI message count (a power of two)",
                value: u64::from(vectors),
                min: 1,
                max: 32,
            });
        }
        let mmc = vectors.trailing_zeros() as u16;
        let ctrl = MSI_CTRL_64BIT | (mmc << 1);
        let mut body = [0u8; (MSI_CAP_LEN - 2) as usize];
        body[0..2].copy_from_slice(&ctrl.to_le_bytes());
        let mut writable = [0xFFu8; (MSI_CAP_LEN - 2) as usize];
        // Control: enable and multiple-message-enable only.
        writable[0] = 0x71;
        writable[1] = 0;
        // Message address is dword aligned.
        writable[2] = 0xFC;
        let offset = self.add_capability(regs::CAP_ID_MSI, &body, &writable)?;
        self.msi = Some(MsiState {
            cap_offset: offset,
            vectors,
        });
        Ok(offset)
    }

    fn msi_control(&self) -> Option<(u16, &MsiState)> {
        let msi = self.msi.as_ref()?;
        Some((self.u16(msi.cap_offset + 2), msi))
    }

    /// MSI is enabled by the guest.
    pub fn msi_enabled(&self) -> bool {
        self.msi_control()
            .is_some_and(|(ctrl, _)| ctrl & MSI_CTRL_ENABLE != 0)
    }

    /// Messages the guest enabled (0 when MSI is off).
    pub fn msi_vectors_enabled(&self) -> u8 {
        match self.msi_control() {
            Some((ctrl, msi)) if ctrl & MSI_CTRL_ENABLE != 0 => {
                let mme = (ctrl >> 4) & 7;
                (1u8 << mme.min(5)).min(msi.vectors)
            }
            _ => 0,
        }
    }

    /// The message for MSI vector `n`, if MSI is enabled and `n` is one
    /// of the enabled vectors.
    pub fn msi_message(&self, n: u8) -> Option<MsiMessage> {
        let count = self.msi_vectors_enabled();
        if n >= count {
            return None;
        }
        let off = self.msi.as_ref()?.cap_offset;
        let address = u64::from(self.u32(off + 4)) | (u64::from(self.u32(off + 8)) << 32);
        // The function replaces the low log2(count) bits of the data.
        let data = u32::from(self.u16(off + 12)) & !(u32::from(count) - 1) | u32::from(n);
        Some(MsiMessage { address, data })
    }

    /// Send MSI vector `n`. False when MSI is off or `n` is not enabled.
    pub fn msi_notify(&mut self, n: u8) -> bool {
        match self.msi_message(n) {
            Some(m) => {
                self.send(m);
                true
            }
            None => false,
        }
    }

    // ---- MSI-X ----

    /// Add an MSI-X capability with `vectors` entries whose table (offset 0)
    /// and PBA (next 4 KiB boundary) live in BAR `bar`, declared here as a
    /// 32-bit memory BAR, as bhyve's `pci_emul_add_msixcap`.
    pub fn add_msix_capability(&mut self, vectors: u16, bar: usize) -> Result<u16, PciError> {
        if vectors == 0 || vectors > MAX_MSIX_VECTORS {
            return Err(PciError::OutOfRange {
                what: "MSI-X table size",
                value: u64::from(vectors),
                min: 1,
                max: u64::from(MAX_MSIX_VECTORS),
            });
        }
        let table_size = (u64::from(vectors) * MSIX_ENTRY_SIZE).div_ceil(4096) * 4096;
        let pba_words = usize::from(vectors).div_ceil(64);
        let pba_size = pba_words as u64 * 8;
        if bar >= crate::MAX_BARS {
            return Err(PciError::BadBar {
                index: bar,
                why: "there are only six BARs",
            });
        }
        self.add_bar(bar, BarKind::Mem32, table_size + pba_size)?;
        let mut body = [0u8; (MSIX_CAP_LEN - 2) as usize];
        body[0..2].copy_from_slice(&(vectors - 1).to_le_bytes());
        body[2..6].copy_from_slice(&(bar as u32).to_le_bytes());
        body[6..10].copy_from_slice(&(table_size as u32 | bar as u32).to_le_bytes());
        let mut writable = [0u8; (MSIX_CAP_LEN - 2) as usize];
        writable[1] = 0xC0;
        let offset = self.add_capability(regs::CAP_ID_MSIX, &body, &writable)?;
        self.msix = Some(MsixState {
            cap_offset: offset,
            bar: bar as u8,
            table_offset: 0,
            pba_offset: table_size,
            table: vec![[0, 0, 0, MSIX_VECTOR_MASKED]; usize::from(vectors)],
            pending: vec![0; pba_words],
        });
        Ok(offset)
    }

    /// The MSI-X table and PBA, if the function has MSI-X.
    pub fn msix(&self) -> Option<&MsixState> {
        self.msix.as_ref()
    }

    fn msix_control(&self) -> u16 {
        self.msix.as_ref().map_or(0, |m| self.u16(m.cap_offset + 2))
    }

    pub(crate) fn msix_enabled_bit(&self) -> bool {
        self.msix_control() & MSIX_CTRL_ENABLE != 0
    }

    /// MSI-X is enabled (and MSI is not, as bhyve's `pci_msix_enabled`).
    pub fn msix_enabled(&self) -> bool {
        self.msix_enabled_bit() && !self.msi_enabled()
    }

    pub fn msix_function_masked(&self) -> bool {
        self.msix_control() & MSIX_CTRL_FUNCTION_MASK != 0
    }

    /// True if a message for `vector` would not be sent now: MSI-X off,
    /// function masked, vector masked or out of range.
    pub fn msix_vector_masked(&self, vector: u16) -> bool {
        let Some(m) = &self.msix else { return true };
        let Some(e) = m.table.get(usize::from(vector)) else {
            return true;
        };
        !self.msix_enabled() || self.msix_function_masked() || e[3] & MSIX_VECTOR_MASKED != 0
    }

    /// Address and data programmed in table entry `vector`, whatever the
    /// mask state.
    pub fn msix_message(&self, vector: u16) -> Option<MsiMessage> {
        let e = self.msix.as_ref()?.table.get(usize::from(vector))?;
        Some(MsiMessage {
            address: u64::from(e[0]) | (u64::from(e[1]) << 32),
            data: e[2],
        })
    }

    /// Changes each time an MSI or MSI-X route may have changed.
    pub fn interrupt_generation(&self) -> u64 {
        self.msi_generation
    }

    /// Raise MSI-X `vector`: sent now, or marked pending while masked.
    /// False when MSI-X is off or the vector does not exist (the caller
    /// may fall back to MSI or INTx).
    pub fn msix_notify(&mut self, vector: u16) -> bool {
        let exists = self
            .msix
            .as_ref()
            .is_some_and(|m| usize::from(vector) < m.table.len());
        if !exists || !self.msix_enabled() {
            return false;
        }
        self.msix_deliver(usize::from(vector));
        true
    }

    fn msix_deliver(&mut self, v: usize) {
        let masked = self.msix_vector_masked(v as u16);
        let message = self.msix_message(v as u16);
        let Some(m) = self.msix.as_mut() else { return };
        if masked {
            m.set_pending(v, true);
        } else {
            m.set_pending(v, false);
            if let Some(message) = message {
                self.send(message);
            }
        }
    }

    fn msix_flush_pending(&mut self) {
        let Some(m) = &self.msix else { return };
        let pending: Vec<usize> = (0..m.table.len()).filter(|&v| m.is_pending(v)).collect();
        for v in pending {
            if !self.msix_vector_masked(v as u16) {
                self.msix_deliver(v);
            }
        }
    }

    /// A guest read in BAR `bar` at `offset`: true if it hit the MSI-X
    /// table or PBA (and `data` was filled), false if the device's own
    /// registers should answer. Odd sizes or misaligned table reads return
    /// all ones.
    pub fn msix_read(&self, bar: usize, offset: u64, data: &mut [u8]) -> bool {
        let Some(m) = &self.msix else { return false };
        if bar != m.bar() {
            return false;
        }
        let len = data.len() as u64;
        if let Some(t) = offset
            .checked_sub(m.table_offset)
            .filter(|t| *t < m.table_len())
        {
            if !matches!(len, 1 | 2 | 4 | 8) || t % len != 0 || t % MSIX_ENTRY_SIZE + len > 16 {
                data.fill(0xFF);
                return true;
            }
            for (i, b) in data.iter_mut().enumerate() {
                *b = m.entry_byte(t + i as u64);
            }
            return true;
        }
        if let Some(p) = offset
            .checked_sub(m.pba_offset)
            .filter(|p| *p < m.pba_len())
        {
            for (i, b) in data.iter_mut().enumerate() {
                let at = p + i as u64;
                let word = m
                    .pending
                    .get((at / 8) as usize)
                    .copied()
                    .unwrap_or(u64::MAX);
                *b = word.to_le_bytes()[(at % 8) as usize];
            }
            return true;
        }
        false
    }

    /// A guest write in BAR `bar` at `offset`: true if it hit the MSI-X
    /// table or PBA. Only aligned 4- and 8-byte table writes take effect;
    /// the PBA is read-only.
    pub fn msix_write(&mut self, bar: usize, offset: u64, data: &[u8]) -> bool {
        let Some(m) = &mut self.msix else {
            return false;
        };
        if bar != m.bar() {
            return false;
        }
        let len = data.len() as u64;
        if let Some(t) = offset
            .checked_sub(m.table_offset)
            .filter(|t| *t < m.table_len())
        {
            if !matches!(len, 4 | 8) || t % len != 0 {
                tracing::warn!(offset, len, "dropping malformed MSI-X table write");
                return true;
            }
            let v = (t / MSIX_ENTRY_SIZE) as usize;
            let Some(entry) = m.table.get_mut(v) else {
                return true;
            };
            let old = *entry;
            let first = ((t % MSIX_ENTRY_SIZE) / 4) as usize;
            for (i, chunk) in data.chunks_exact(4).enumerate() {
                if let Some(word) = entry.get_mut(first + i) {
                    *word = u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
                }
            }
            if *entry != old {
                self.msi_generation = self.msi_generation.wrapping_add(1);
                let unmasked =
                    old[3] & MSIX_VECTOR_MASKED != 0 && entry[3] & MSIX_VECTOR_MASKED == 0;
                if unmasked && m.is_pending(v) {
                    self.msix_deliver(v);
                }
            }
            return true;
        }
        if offset
            .checked_sub(m.pba_offset)
            .is_some_and(|p| p < m.pba_len())
        {
            tracing::debug!(offset, "ignoring write to the read-only MSI-X PBA");
            return true;
        }
        false
    }

    /// Follow up a guest config write of `[start, end)` that may have hit
    /// the MSI or MSI-X capability.
    pub(crate) fn msi_config_written(&mut self, start: u16, end: u16) {
        let hits = |cap: u16, len: u16| start < cap + len && cap < end;
        let msi_hit = self
            .msi
            .as_ref()
            .is_some_and(|m| hits(m.cap_offset, MSI_CAP_LEN));
        let msix_hit = self
            .msix
            .as_ref()
            .is_some_and(|m| hits(m.cap_offset, MSIX_CAP_LEN));
        if msi_hit || msix_hit {
            self.msi_generation = self.msi_generation.wrapping_add(1);
            self.intx_update();
        }
        if msix_hit && self.msix_enabled() && !self.msix_function_masked() {
            self.msix_flush_pending();
        }
    }

    fn send(&self, m: MsiMessage) {
        match &self.wires.msi {
            Some(sender) => sender.send(m.address, m.data),
            None => tracing::warn!(
                address = m.address,
                data = m.data,
                "MSI raised by a function not connected to an interrupt controller"
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rhyve_platform::irq::MsiSender;
    use std::sync::{Arc, Mutex};

    #[derive(Default)]
    struct Sent(Mutex<Vec<(u64, u32)>>);
    impl MsiSender for Sent {
        fn send(&self, address: u64, data: u32) {
            self.0.lock().unwrap().push((address, data));
        }
    }

    fn w32(c: &mut PciConfigSpace, off: u16, v: u32) {
        c.write(off, &v.to_le_bytes());
    }

    #[test]
    fn msi_capability() {
        let mut c = PciConfigSpace::new(1, 2, 3, 4, 5);
        let sent = Arc::new(Sent::default());
        c.connect_msi(sent.clone());
        let off = c.add_msi_capability(4).unwrap();
        assert_eq!(c.read_dword(off) >> 16, 0x0084, "64-bit, MMC=2");
        assert!(!c.msi_notify(0));
        w32(&mut c, off + 4, 0xFEE0_0003);
        w32(&mut c, off + 8, 0);
        c.write(off + 12, &0x4041u16.to_le_bytes());
        c.write(off + 2, &0x0011u16.to_le_bytes()); // enable, MME=1: 2 vectors
        assert_eq!(c.msi_vectors_enabled(), 2);
        assert!(c.msi_notify(1));
        assert!(!c.msi_notify(2));
        assert_eq!(*sent.0.lock().unwrap(), vec![(0xFEE0_0000, 0x4041)]);
        assert!(c.add_msi_capability(3).is_err());
    }

    #[test]
    fn msix_table_masking_and_pending() {
        let mut c = PciConfigSpace::new(1, 2, 3, 4, 5);
        let sent = Arc::new(Sent::default());
        c.connect_msi(sent.clone());
        let off = c.add_msix_capability(3, 1).unwrap();
        assert_eq!(c.bar(1).unwrap().size, 8192);
        assert_eq!(c.read_dword(off), 0x0002_0011);
        assert_eq!(c.read_dword(off + 8), 0x1001);
        let mut b = [0u8; 4];
        assert!(c.msix_read(1, 12, &mut b));
        assert_eq!(u32::from_le_bytes(b), 1, "masked at reset");
        assert!(!c.msix_notify(0), "MSI-X disabled");
        c.write(off + 2, &0x8000u16.to_le_bytes());
        assert!(c.msix_enabled());
        let g = c.interrupt_generation();
        assert!(c.msix_write(1, 16, &0xFEE0_1000u64.to_le_bytes()));
        assert!(c.msix_write(1, 24, &0x31u32.to_le_bytes()));
        assert!(c.interrupt_generation() > g);
        assert!(c.msix_notify(1));
        assert!(sent.0.lock().unwrap().is_empty());
        let mut pba = [0u8; 8];
        assert!(c.msix_read(1, 4096, &mut pba));
        assert_eq!(u64::from_le_bytes(pba), 0b10);
        assert!(c.msix_write(1, 28, &0u32.to_le_bytes()), "unmask");
        assert_eq!(*sent.0.lock().unwrap(), vec![(0xFEE0_1000, 0x31)]);
        assert!(c.msix_read(1, 4096, &mut pba));
        assert_eq!(u64::from_le_bytes(pba), 0);
        // Function mask holds messages back too.
        c.write(off + 3, &[0xC0]);
        assert!(c.msix_vector_masked(1));
        assert!(c.msix_notify(1));
        assert_eq!(sent.0.lock().unwrap().len(), 1);
        c.write(off + 3, &[0x80]);
        assert_eq!(sent.0.lock().unwrap().len(), 2);
        // Malformed accesses are dropped, not fatal.
        assert!(c.msix_write(1, 17, &[1, 2, 3, 4]));
        assert!(c.msix_write(1, 16, &[1, 2]));
        assert!(!c.msix_write(1, 8192, &[0; 4]));
        assert!(!c.msix_read(0, 0, &mut b));
        assert!(c.add_msix_capability(0, 2).is_err());
        assert!(c.add_msix_capability(4, 1).is_err(), "BAR 1 taken");
    }
}
