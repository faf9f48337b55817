//! The monotonic time base the timer devices (PM timer, RTC, HPET, port 0x61)
//! count from.
//!
//! Devices take an `Arc<dyn Clock>` instead of calling `Instant::now()` so
//! their register logic can be driven step by step in tests; at run time it is
//! [`MonotonicClock`] (CLOCK_MONOTONIC through `Instant`), which, like
//! bhyve's `sbinuptime()`, never jumps when the host's wall clock is set.

use rhyve_platform::snapshot::Schema;
use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Instant;

pub const NANOS_PER_SEC: u64 = 1_000_000_000;

/// Nanoseconds since some fixed, arbitrary start.
pub trait Clock: Send + Sync {
    fn now_ns(&self) -> u64;
}

/// The VM's clock: the host's monotonic clock, from the VM's start. A
/// restored VM's clock goes on from the time its snapshot was taken
/// ([`MonotonicClock::set_now`]), so every device time saved against it
/// (deadlines, time bases) stays valid in the new process.
#[derive(Debug)]
pub struct MonotonicClock {
    start: Instant,
    /// Added to the host's elapsed time (negative after a restore to an
    /// earlier time than this process has run).
    offset_ns: AtomicI64,
}

/// The VM clock's reading in a snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClockState {
    pub now_ns: u64,
}

impl Schema for ClockState {
    const KIND: &'static str = "vm-clock";
    const VERSION: u32 = 1;
}

impl MonotonicClock {
    pub fn new() -> Self {
        Self {
            start: Instant::now(),
            offset_ns: AtomicI64::new(0),
        }
    }

    /// Make the clock read `now_ns` now and count on from there.
    pub fn set_now(&self, now_ns: u64) {
        let elapsed = i128::from(self.host_elapsed_ns());
        let offset = (i128::from(now_ns) - elapsed).clamp(i64::MIN.into(), i64::MAX.into());
        self.offset_ns.store(offset as i64, Ordering::SeqCst);
    }

    fn host_elapsed_ns(&self) -> u64 {
        u64::try_from(self.start.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }
}

impl Default for MonotonicClock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock for MonotonicClock {
    fn now_ns(&self) -> u64 {
        let now =
            i128::from(self.host_elapsed_ns()) + i128::from(self.offset_ns.load(Ordering::SeqCst));
        now.clamp(0, u64::MAX.into()) as u64
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

    #[test]
    fn a_restored_clock_goes_on_from_the_saved_time() {
        let c = MonotonicClock::new();
        c.set_now(1_000 * NANOS_PER_SEC);
        let t = c.now_ns();
        assert!(
            (1_000 * NANOS_PER_SEC..1_001 * NANOS_PER_SEC).contains(&t),
            "{t}"
        );
        std::thread::sleep(std::time::Duration::from_millis(2));
        assert!(c.now_ns() > t);
        c.set_now(5);
        assert!(c.now_ns() < NANOS_PER_SEC);
    }
}
