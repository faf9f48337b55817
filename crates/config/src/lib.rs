//! bhyve_config(5) for rhyve.
//!
//! Every bhyve(8) flag becomes keys in one [`ConfigTree`], exactly as bhyve's
//! `config.c` does it; the VM is then built from the tree alone. This crate
//! has no knowledge of KVM or of device internals beyond how each device's
//! legacy option string maps to keys.

mod tree;

pub use tree::{parse_bool, parse_c_integer, ConfigError, ConfigTree};
