//! Host side of devices: block files, tap interfaces, serial backends.

pub mod serial;
