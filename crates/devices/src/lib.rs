//! Platform device models: 16550 UARTs, MC146818 RTC, ACPI PM, i8042, HPET, pc-testdev.
//!
//! Each model is a [`rhyve_platform::bus::BusDevice`] keeping its guest-visible
//! state in one serde struct; timed devices share [`timer::TimerThread`] and
//! take their time from a [`clock::Clock`] so tests can drive them.

pub mod clock;
pub mod pm;
pub mod rtc;
pub mod timer;
pub mod uart;

#[cfg(test)]
mod test_util;
