//! Platform device models: 16550 UARTs, MC146818 RTC, ACPI PM, i8042, HPET, pc-testdev.
//!
//! Each model is a [`rhyve_platform::bus::BusDevice`] keeping its guest-visible
//! state in one serde struct; timed devices share [`timer::TimerThread`] and
//! take their time from a [`clock::Clock`] so tests can drive them.
//! [`lpc::create_platform_devices`] builds the whole set from the config tree.

pub mod bootvars;
pub mod clock;
pub mod elcr;
pub mod fwctl;
pub mod hpet;
pub mod i8042;
pub mod lpc;
pub mod nmi_status;
pub mod pctestdev;
pub mod pm;
pub mod post;
pub mod ps2_keys;
pub mod ps2_mouse;
pub mod qemu_fwcfg;
pub mod rtc;
pub mod shared_irq;
pub mod timer;
pub mod uart;

pub use lpc::{create_platform_devices, ComPort, PlatformDevices, PlatformError};

#[cfg(test)]
mod test_util;
