//! bhyve_config(5) for rhyve.
//!
//! Every bhyve(8) flag becomes keys in one [`ConfigTree`], exactly as bhyve's
//! `config.c` does it; the VM is then built from the tree alone. This crate
//! has no knowledge of KVM or of device internals beyond how each device's
//! legacy option string maps to keys.
//!
//! Entry points: [`parse_bhyve_args`] turns argv into an [`Invocation`];
//! [`validate`] and the readers next to it ([`topology`], [`memory_size`],
//! [`vcpu_pinning`], [`numa_domains`], [`pci_functions`]) are the checks
//! bhyve makes before building the VM, for the runtime to reuse.
//! [`file`] reads the files an operator names, bounded, for every crate.

mod check;
mod cli;
mod cnum;
pub mod file;
pub mod fuzzing;
mod getopt;
mod legacy;
mod memsize;
mod tree;

pub use check::{
    memory_size, numa_domains, parse_cpuset, pci_functions, topology, validate, vcpu_pinning,
    NumaDomain, PciFunction, Topology, MAX_NUMA_DOMAINS,
};
pub use cli::{
    bhyve_usage, default_tree, parse_bhyve_args, Action, CliError, FwCfgFile, FwCfgSource,
    Invocation, EXIT_CONFIG_DUMPED, EXIT_ERROR, EXIT_USAGE_ERROR, EX_USAGE,
};
pub use legacy::{pci_model_alias, LPC_DEVICES, PCI_MODELS, PCI_MODEL_ALIASES};
pub use memsize::parse_memsize;
pub use tree::{parse_bool, parse_c_integer, ConfigError, ConfigTree};
