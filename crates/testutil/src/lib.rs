//! What the crates' test suites share. Only a dev-dependency: nothing here
//! ships in a binary.

/// Marsaglia's xorshift64: the deterministic inputs of the bounded fuzz
/// smoke runs (`tests/fuzz_smoke.rs` in several crates), the same sequence
/// on every run and host. The seed must not be 0.
pub struct XorShift(pub u64);

impl XorShift {
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// A number below `n` (0 when `n` is 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }

    /// An index below `len` (0 when `len` is 0).
    pub fn index(&mut self, len: usize) -> usize {
        self.below(len as u64) as usize
    }
}
