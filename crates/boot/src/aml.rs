//! AML terms the `acpi_tables` crate lacks, plus a pre-serialised term.
//!
//! bhyve's DSDT uses the small legacy IRQ descriptors (`IRQNoFlags`, `IRQ`)
//! and a few operators (`CreateWordField`, `FindSetRightBit`, `Decrement`)
//! that `acpi_tables::aml` does not provide; they are encoded here from the
//! ACPI 6.x AML grammar (§19.6, §20.2). [`Raw`] lets the DSDT builder
//! serialise a term once and nest it without tying lifetimes together.

use acpi_tables::{Aml, AmlSink};

/// An already-encoded AML term.
pub struct Raw(pub Vec<u8>);

impl Aml for Raw {
    fn to_aml_bytes(&self, sink: &mut dyn AmlSink) {
        sink.vec(&self.0);
    }
}

/// Encode one term.
pub fn raw(term: &dyn Aml) -> Raw {
    let mut bytes = Vec::new();
    term.to_aml_bytes(&mut bytes);
    Raw(bytes)
}

/// Borrow encoded terms as the children list `acpi_tables` constructors take.
pub fn refs(terms: &[Raw]) -> Vec<&dyn Aml> {
    terms.iter().map(|t| t as &dyn Aml).collect()
}

/// Bit mask of ISA IRQ numbers (bit n = IRQ n) for the IRQ descriptors.
fn irq_mask(irqs: &[u8]) -> u16 {
    irqs.iter()
        .filter(|&&irq| irq < 16)
        .fold(0u16, |mask, &irq| mask | (1 << irq))
}

/// `IRQNoFlags () {irqs}`: small IRQ descriptor, edge triggered, active high.
pub struct IrqNoFlags(pub Vec<u8>);

impl Aml for IrqNoFlags {
    fn to_aml_bytes(&self, sink: &mut dyn AmlSink) {
        sink.byte(0x22); // IRQ descriptor, 2 bytes of data
        sink.word(irq_mask(&self.0));
    }
}

/// `IRQ (Level, ActiveLow, Shared) {irqs}`: the PCI link form.
pub struct IrqLevelLowShared(pub Vec<u8>);

impl Aml for IrqLevelLowShared {
    fn to_aml_bytes(&self, sink: &mut dyn AmlSink) {
        const ACTIVE_LOW: u8 = 1 << 3;
        const SHARED: u8 = 1 << 4;
        sink.byte(0x23); // IRQ descriptor, 3 bytes of data
        sink.word(irq_mask(&self.0));
        sink.byte(ACTIVE_LOW | SHARED); // bit 0 clear: level triggered
    }
}

/// `CreateWordField (source, byte_index, name)`.
pub struct CreateWordField<'a> {
    pub source: &'a dyn Aml,
    pub byte_index: &'a dyn Aml,
    pub name: &'a dyn Aml,
}

impl Aml for CreateWordField<'_> {
    fn to_aml_bytes(&self, sink: &mut dyn AmlSink) {
        sink.byte(0x8B);
        self.source.to_aml_bytes(sink);
        self.byte_index.to_aml_bytes(sink);
        self.name.to_aml_bytes(sink);
    }
}

/// `FindSetRightBit (operand, target)`.
pub struct FindSetRightBit<'a> {
    pub operand: &'a dyn Aml,
    pub target: &'a dyn Aml,
}

impl Aml for FindSetRightBit<'_> {
    fn to_aml_bytes(&self, sink: &mut dyn AmlSink) {
        sink.byte(0x82);
        self.operand.to_aml_bytes(sink);
        self.target.to_aml_bytes(sink);
    }
}

/// `Decrement (name)`: decrements and evaluates to the new value.
pub struct Decrement<'a>(pub &'a dyn Aml);

impl Aml for Decrement<'_> {
    fn to_aml_bytes(&self, sink: &mut dyn AmlSink) {
        sink.byte(0x76);
        self.0.to_aml_bytes(sink);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use acpi_tables::aml::{Local, Path};

    #[test]
    fn irq_descriptors_encode_masks_and_flags() {
        assert_eq!(raw(&IrqNoFlags(vec![4])).0, [0x22, 0x10, 0x00]);
        assert_eq!(
            raw(&IrqLevelLowShared(vec![3, 15])).0,
            [0x23, 0x08, 0x80, 0x18]
        );
        assert_eq!(raw(&IrqLevelLowShared(vec![])).0, [0x23, 0, 0, 0x18]);
    }

    #[test]
    fn operators_encode_opcodes() {
        let pira = Path::new("PIRA");
        assert_eq!(
            raw(&Decrement(&Local(0))).0,
            [0x76, 0x60],
            "Decrement (Local0)"
        );
        assert_eq!(
            raw(&FindSetRightBit {
                operand: &pira,
                target: &Local(0)
            })
            .0,
            [0x82, b'P', b'I', b'R', b'A', 0x60]
        );
    }
}
