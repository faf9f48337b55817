//! The monotonic time base the timer devices (PM timer, RTC, HPET, port 0x61)
//! count from.
//!
//! Devices take an `Arc<dyn Clock>` instead of calling `Instant::now()` so
//! their register logic can be driven step by step in tests; at run time it is
//! [`MonotonicClock`] (CLOCK_MONOTONIC through `Instant`), which, like
//! bhyve's `sbinuptime()`, never jumps when the host's wall clock is set.

use std::time::Instant;

pub const NANOS_PER_SEC: u64 = 1_000_000_000;

/// Nanoseconds since some fixed, arbitrary start.
pub trait Clock: Send + Sync {
    fn now_ns(&self) -> u64;
}

/// The host's monotonic clock.
#[derive(Debug)]
pub struct MonotonicClock {
    start: Instant,
}

impl MonotonicClock {
    pub fn new() -> Self {
        Self {
            start: Instant::now(),
        }
    }
}

impl Default for MonotonicClock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock for MonotonicClock {
    fn now_ns(&self) -> u64 {
        u64::try_from(self.start.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }
}

/// `ticks` of a `hz` counter elapsed in `ns` nanoseconds (128-bit, no overflow).
pub fn ns_to_ticks(ns: u64, hz: u64) -> u64 {
    (u128::from(ns) * u128::from(hz) / u128::from(NANOS_PER_SEC)) as u64
}

/// Nanoseconds until `ticks` of a `hz` counter have elapsed, rounded up.
pub fn ticks_to_ns(ticks: u64, hz: u64) -> u64 {
    let ns = (u128::from(ticks) * u128::from(NANOS_PER_SEC)).div_ceil(u128::from(hz));
    u64::try_from(ns).unwrap_or(u64::MAX)
}

#[cfg(test)]
pub mod test_clock {
    //! A clock tests move by hand.
    use super::Clock;
    use std::sync::atomic::{AtomicU64, Ordering};

    #[derive(Debug, Default)]
    pub struct ManualClock(AtomicU64);

    impl ManualClock {
        pub fn advance_ns(&self, ns: u64) {
            self.0.fetch_add(ns, Ordering::SeqCst);
        }
    }

    impl Clock for ManualClock {
        fn now_ns(&self) -> u64 {
            self.0.load(Ordering::SeqCst)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tick_conversions_round_trip() {
        assert_eq!(ns_to_ticks(NANOS_PER_SEC, 3_579_545), 3_579_545);
        assert_eq!(
            ns_to_ticks(u64::MAX, 1 << 24),
            ((u64::MAX as u128 * (1 << 24)) / 1_000_000_000) as u64
        );
        let ns = ticks_to_ns(1, 1 << 24);
        assert!(ns_to_ticks(ns, 1 << 24) >= 1);
        let c = MonotonicClock::new();
        let a = c.now_ns();
        assert!(c.now_ns() >= a);
    }
}
