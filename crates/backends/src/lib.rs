//! Host side of devices: block files, tap interfaces, serial backends.

pub mod block;
pub mod serial;
pub mod tap;
