//! Reading the VM's shape from the config tree (bhyve_config(5) keys).

use rhyve_config::ConfigTree;
use rhyve_hypervisor::VmSpec;
use rhyve_platform::layout::MemoryLayout;

use crate::VmmError;

fn bad(e: rhyve_config::ConfigError) -> VmmError {
    VmmError::Config(e.to_string())
}

fn count(tree: &ConfigTree, key: &str) -> Result<u32, VmmError> {
    match tree.get_u64(key).map_err(bad)? {
        None => Ok(1),
        Some(n) if (1..=u64::from(u16::MAX)).contains(&n) => Ok(n as u32),
        Some(n) => Err(VmmError::Config(format!("invalid {key} {n}"))),
    }
}

/// Parse a bhyve memory size: `vm_parse_memsize` semantics.
pub fn memory_size(text: &str) -> Result<u64, VmmError> {
    let t = text.trim();
    let (digits, unit) = t.split_at(t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len()));
    let n: u64 = digits
        .parse()
        .map_err(|_| VmmError::Config(format!("invalid memory size '{text}'")))?;
    let shift = match unit.to_ascii_lowercase().as_str() {
        "" if n < (1 << 20) => 20,
        "" => 0,
        "k" | "kb" => 10,
        "m" | "mb" => 20,
        "g" | "gb" => 30,
        "t" | "tb" => 40,
        _ => return Err(VmmError::Config(format!("invalid memory size '{text}'"))),
    };
    n.checked_mul(1 << shift)
        .filter(|&b| b >= 1 << 20)
        .ok_or_else(|| VmmError::Config(format!("invalid memory size '{text}'")))
}

/// The hypervisor-level description of the VM the tree asks for.
pub fn vm_spec(tree: &ConfigTree) -> Result<VmSpec, VmmError> {
    let cpus = count(tree, "cpus")?;
    let sockets = count(tree, "sockets")?;
    let cores = count(tree, "cores")?;
    let threads = count(tree, "threads")?;
    let (sockets, cores, threads) = if tree.get_raw("sockets").is_none()
        && tree.get_raw("cores").is_none()
        && tree.get_raw("threads").is_none()
    {
        (cpus, 1, 1)
    } else {
        (sockets, cores, threads)
    };
    if sockets * cores * threads != cpus {
        return Err(VmmError::Config(format!(
            "topology {sockets} sockets x {cores} cores x {threads} threads does not match {cpus} cpus"
        )));
    }
    let size_text = tree
        .get("memory.size")
        .map_err(bad)?
        .unwrap_or_else(|| "256M".into());
    let size = memory_size(&size_text)?;
    Ok(VmSpec {
        cpus,
        sockets,
        cores,
        threads,
        memory: MemoryLayout::new(size),
        wired: tree.bool_or("memory.wired", false).map_err(bad)?,
        guest_in_core: tree.bool_or("memory.guest_in_core", false).map_err(bad)?,
        x2apic: tree.bool_or("x86.x2apic", false).map_err(bad)?,
        strict_msr: tree.bool_or("x86.strictmsr", true).map_err(bad)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memsize_like_bhyve() {
        assert_eq!(memory_size("512").unwrap(), 512 << 20);
        assert_eq!(memory_size("1G").unwrap(), 1 << 30);
        assert_eq!(memory_size("2g").unwrap(), 2 << 30);
        assert_eq!(memory_size("224395264").unwrap(), 224395264);
        assert!(memory_size("bogus").is_err());
        assert!(memory_size("1Q").is_err());
    }

    #[test]
    fn topology_defaults_to_sockets() {
        let mut t = ConfigTree::new();
        t.set("cpus", "4").unwrap();
        let s = vm_spec(&t).unwrap();
        assert_eq!((s.sockets, s.cores, s.threads), (4, 1, 1));
        t.set("cores", "2").unwrap();
        assert!(vm_spec(&t).is_err());
        t.set("sockets", "2").unwrap();
        let s = vm_spec(&t).unwrap();
        assert_eq!((s.sockets, s.cores, s.threads), (2, 2, 1));
        assert_eq!(s.memory.total(), 256 << 20);
        assert!(s.strict_msr);
    }
}
