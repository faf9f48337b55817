//! Reading the VM's shape from the config tree (bhyve_config(5) keys). The
//! rules (topology, memory size syntax) are the config layer's; this only
//! turns their result into the hypervisor's terms.

use rhyve_config::ConfigTree;
use rhyve_hypervisor::VmSpec;
use rhyve_platform::layout::MemoryLayout;

use crate::VmmError;

fn flag(tree: &ConfigTree, key: &str, default: bool) -> Result<bool, VmmError> {
    tree.bool_or(key, default)
        .map_err(|e| VmmError::Config(e.to_string()))
}

/// The hypervisor-level description of the VM the tree asks for.
pub fn vm_spec(tree: &ConfigTree) -> Result<VmSpec, VmmError> {
    let topo = rhyve_config::topology(tree)?;
    let size = rhyve_config::memory_size(tree)?;
    Ok(VmSpec {
        cpus: topo.cpus.into(),
        sockets: topo.sockets.into(),
        cores: topo.cores.into(),
        threads: topo.threads.into(),
        memory: MemoryLayout::new(size),
        wired: flag(tree, "memory.wired", false)?,
        guest_in_core: flag(tree, "memory.guest_in_core", false)?,
        x2apic: flag(tree, "x86.x2apic", false)?,
        strict_msr: flag(tree, "x86.strictmsr", true)?,
        emulation_assist: flag(tree, "x86.emulation_assist", true)?,
        rom_size: 0,
        memory_image: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_topology_memory_and_flags() {
        let mut t = rhyve_config::default_tree();
        t.set("cpus", "4").unwrap();
        t.set("sockets", "2").unwrap();
        t.set("cores", "2").unwrap();
        t.set("memory.size", "5G").unwrap();
        t.set("x86.strictmsr", "false").unwrap();
        let s = vm_spec(&t).unwrap();
        assert_eq!((s.cpus, s.sockets, s.cores, s.threads), (4, 2, 2, 1));
        assert_eq!(s.memory, MemoryLayout::new(5 << 30));
        assert!(!s.strict_msr);
        t.set("cores", "3").unwrap();
        assert!(vm_spec(&t).is_err());
    }
}
