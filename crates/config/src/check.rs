//! The checks bhyve makes on the finished tree before it builds the VM, and
//! typed readers for the values they cover.
//!
//! bhyve does these after `-o config.dump=1` has had its chance (so a tree
//! can always be dumped) and in this order: the CPU topology
//! (`calc_topology`), vCPU pinning (`build_vcpumaps`), the memory size,
//! NUMA domains (`calc_mem_affinity`, `set_vcpu_affinities`), then each PCI
//! function's `device` as `init_pci` walks them, including the LPC bridge's
//! "only one, only on bus 0" rule. The runtime calls the readers again when
//! it builds the VM, so both see the same values.

use crate::cli::{CliError, CPU_SETSIZE, EXIT_ERROR, EX_USAGE};
use crate::cnum::{strtol_full, strtou64_prefix};
use crate::legacy::{pci_model_alias, PCI_BUSES, PCI_FUNCS, PCI_MODELS, PCI_SLOTS};
use crate::memsize::parse_memsize;
use crate::tree::{ConfigError, ConfigTree};

/// NUMA domains bhyve supports (`VM_MAXMEMDOM`).
pub const MAX_NUMA_DOMAINS: usize = 8;

/// A tree error met while reading values, as a bhyve error (status 4).
pub(crate) fn config_error(err: ConfigError) -> CliError {
    CliError::new(format!("bhyve: {err}"), EXIT_ERROR)
}

fn value(tree: &ConfigTree, path: &str) -> Result<Option<String>, CliError> {
    tree.get(path).map_err(config_error)
}

/// The guest CPU topology.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Topology {
    pub cpus: u16,
    pub sockets: u16,
    pub cores: u16,
    pub threads: u16,
}

/// `parse_int_value(key, value, 1, UINT16_MAX)`.
fn topology_value(tree: &ConfigTree, key: &str) -> Result<Option<u16>, CliError> {
    let Some(text) = value(tree, key)? else {
        return Ok(None);
    };
    strtol_full(&text)
        .filter(|n| (1..=i64::from(u16::MAX)).contains(n))
        .and_then(|n| u16::try_from(n).ok())
        .map(Some)
        .ok_or_else(|| {
            CliError::new(
                format!("bhyve: Invalid value for {key}: '{text}'"),
                EXIT_ERROR,
            )
        })
}

/// `calc_topology`: `cpus` must equal sockets × cores × threads; without
/// `sockets`, there is one socket per vCPU.
pub fn topology(tree: &ConfigTree) -> Result<Topology, CliError> {
    let cpus = topology_value(tree, "cpus")?;
    let cores = topology_value(tree, "cores")?.unwrap_or(1);
    let threads = topology_value(tree, "threads")?.unwrap_or(1);
    let sockets = topology_value(tree, "sockets")?.unwrap_or(cpus.unwrap_or(1));
    let product = u64::from(sockets) * u64::from(cores) * u64::from(threads);
    let Ok(computed) = u16::try_from(product) else {
        return Err(CliError::new(
            format!("bhyve: Computed number of vCPUs too high: {product}"),
            EXIT_ERROR,
        ));
    };
    if let Some(cpus) = cpus {
        if cpus != computed {
            return Err(CliError::new(
                format!(
                    "bhyve: Topology ({sockets} sockets, {cores} cores, {threads} threads) does not match {cpus} vCPUs"
                ),
                EXIT_ERROR,
            ));
        }
    }
    Ok(Topology {
        cpus: computed,
        sockets,
        cores,
        threads,
    })
}

/// `parse_cpuset`: a host CPU list such as `1,3,5-7`, owner being the vCPU
/// (or NUMA domain) it belongs to, for the messages.
pub fn parse_cpuset(owner: usize, list: &str) -> Result<Vec<u32>, CliError> {
    let invalid = || {
        CliError::new(
            format!("bhyve: invalid cpuset for vcpu {owner}: '{list}'"),
            EXIT_ERROR,
        )
    };
    let mut set = std::collections::BTreeSet::new();
    let mut range_start: Option<u64> = None;
    let mut token = list;
    loop {
        let (cpu, rest) = strtou64_prefix(token).ok_or_else(invalid)?;
        if cpu >= CPU_SETSIZE as u64 {
            return Err(CliError::new(
                format!(
                    "bhyve: hostcpu '{cpu}' outside valid range from 0 to {}",
                    CPU_SETSIZE - 1
                ),
                EXIT_ERROR,
            ));
        }
        match rest.as_bytes().first() {
            None | Some(b',') => {
                if let Some(start) = range_start.take() {
                    if start > cpu {
                        return Err(CliError::new(
                            format!("bhyve: Invalid hostcpu range {start}-{cpu}"),
                            EXIT_ERROR,
                        ));
                    }
                    set.extend(start..cpu);
                }
                set.insert(cpu);
            }
            Some(b'-') => {
                if range_start.is_some() {
                    return Err(invalid());
                }
                range_start = Some(cpu);
            }
            Some(_) => return Err(invalid()),
        }
        if rest.is_empty() {
            break;
        }
        token = &rest[1..];
    }
    // Every member is below CPU_SETSIZE, so it fits.
    Ok(set.into_iter().map(|c| c as u32).collect())
}

/// `build_vcpumaps`: the host CPUs each vCPU is pinned to (`None`: not
/// pinned). Pinning for vCPUs beyond `cpus` is ignored, as in bhyve.
pub fn vcpu_pinning(tree: &ConfigTree, cpus: u16) -> Result<Vec<Option<Vec<u32>>>, CliError> {
    (0..usize::from(cpus))
        .map(|vcpu| {
            value(tree, &format!("vcpu.{vcpu}.cpuset"))?
                .map(|list| parse_cpuset(vcpu, &list))
                .transpose()
        })
        .collect()
}

/// `memory.size` in bytes.
pub fn memory_size(tree: &ConfigTree) -> Result<u64, CliError> {
    let text = value(tree, "memory.size")?.unwrap_or_else(|| "256M".to_string());
    parse_memsize(&text)
        .map_err(|_| CliError::new(format!("bhyve: invalid memsize '{text}'"), EX_USAGE))
}

/// A NUMA domain from `-n` / `domains.N.*`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NumaDomain {
    /// Bytes, when given.
    pub size: Option<u64>,
    pub cpus: Vec<u32>,
    /// The FreeBSD domainset(9) policy string, when given.
    pub policy: Option<String>,
}

/// `calc_mem_affinity` and `set_vcpu_affinities`: domains 0, 1, ... up to
/// the first missing one.
pub fn numa_domains(tree: &ConfigTree) -> Result<Vec<NumaDomain>, CliError> {
    let mut domains = Vec::new();
    for id in 0..MAX_NUMA_DOMAINS {
        let node = format!("domains.{id}");
        if !tree.is_node(&node) {
            break;
        }
        let size = match value(tree, &format!("{node}.size"))? {
            Some(text) => Some(parse_memsize(&text).map_err(|_| {
                CliError::new(
                    format!("bhyve: invalid memsize for domain {id}: '{text}'"),
                    EX_USAGE,
                )
            })?),
            None => None,
        };
        let policy = value(tree, &format!("{node}.domain_policy"))?;
        domains.push((id, size, policy));
    }
    domains
        .into_iter()
        .map(|(id, size, policy)| {
            let Some(list) = value(tree, &format!("domains.{id}.cpus"))? else {
                return Err(CliError::new(
                    format!("Missing CPU set for domain {id}"),
                    EXIT_ERROR,
                ));
            };
            Ok(NumaDomain {
                size,
                cpus: parse_cpuset(id, &list)?,
                policy,
            })
        })
        .collect()
}

/// One configured PCI function.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PciFunction {
    pub bus: u8,
    pub slot: u8,
    pub func: u8,
    /// The device model (`device`, expanded).
    pub model: String,
    /// The config node holding its keys, `pci.B.S.F`.
    pub node: String,
}

/// `init_pci`'s walk: every `pci.B.S.F` node in bus/slot/function order,
/// each with a known, non-alias `device`; one LPC bridge at most, on bus 0;
/// one frame buffer at most.
pub fn pci_functions(tree: &ConfigTree) -> Result<Vec<PciFunction>, CliError> {
    let mut functions = Vec::new();
    for bus in 0..PCI_BUSES {
        if !tree.is_node(&format!("pci.{bus}")) {
            continue;
        }
        for slot in 0..PCI_SLOTS {
            for func in 0..PCI_FUNCS {
                let node = format!("pci.{bus}.{slot}.{func}");
                if !tree.is_node(&node) {
                    continue;
                }
                let place = format!("pci slot {bus}:{slot}:{func}");
                let Some(model) = value(tree, &format!("{node}.device"))? else {
                    return Err(CliError::new(
                        format!("{place}: missing \"device\" value"),
                        EXIT_ERROR,
                    ));
                };
                if !PCI_MODELS.contains(&model.as_str()) {
                    return Err(CliError::new(
                        format!("{place}: unknown device \"{model}\""),
                        EXIT_ERROR,
                    ));
                }
                if let Some(real) = pci_model_alias(&model) {
                    return Err(CliError::new(
                        format!("{place}: legacy device \"{model}\", use \"{real}\" instead"),
                        EXIT_ERROR,
                    ));
                }
                let count = |name: &str| {
                    functions
                        .iter()
                        .filter(|f: &&PciFunction| f.model == name)
                        .count()
                };
                if model == "lpc" {
                    if count("lpc") > 0 {
                        return Err(CliError::new("Only one LPC bridge is allowed.", EXIT_ERROR));
                    }
                    if bus != 0 {
                        return Err(CliError::new(
                            "LPC bridge can be present only on bus 0.",
                            EXIT_ERROR,
                        ));
                    }
                }
                if model == "fbuf" && count("fbuf") > 0 {
                    return Err(CliError::new(
                        "Only one frame buffer device is allowed.",
                        EXIT_ERROR,
                    ));
                }
                // The ranges above keep these within u8.
                functions.push(PciFunction {
                    bus: bus as u8,
                    slot: slot as u8,
                    func: func as u8,
                    model,
                    node,
                });
            }
        }
    }
    Ok(functions)
}

/// Every check bhyve makes on the tree before building the VM, in bhyve's
/// order, so the first error reported is the one bhyve would report.
pub fn validate(tree: &ConfigTree) -> Result<(), CliError> {
    let topology = topology(tree)?;
    vcpu_pinning(tree, topology.cpus)?;
    memory_size(tree)?;
    numa_domains(tree)?;
    pci_functions(tree)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpusets() {
        assert_eq!(parse_cpuset(0, "1,3,5-7").unwrap(), vec![1, 3, 5, 6, 7]);
        assert_eq!(parse_cpuset(0, "0x2").unwrap(), vec![2]);
        assert!(parse_cpuset(0, "3-1").is_err());
        assert!(parse_cpuset(0, "1-2-3").is_err());
        assert!(parse_cpuset(0, "").is_err());
        assert!(parse_cpuset(0, "1,").is_err());
        assert!(parse_cpuset(0, "2048").is_err());
    }

    #[test]
    fn topology_rules() {
        let mut t = ConfigTree::new();
        t.set("cpus", "4").unwrap();
        assert_eq!(
            topology(&t).unwrap(),
            Topology {
                cpus: 4,
                sockets: 4,
                cores: 1,
                threads: 1
            }
        );
        t.set("sockets", "1").unwrap();
        t.set("cores", "2").unwrap();
        let e = topology(&t).unwrap_err();
        assert_eq!(
            e.message,
            "bhyve: Topology (1 sockets, 2 cores, 1 threads) does not match 4 vCPUs"
        );
        assert_eq!(e.status, 4);
        t.set("threads", "2").unwrap();
        assert_eq!(topology(&t).unwrap().cpus, 4);
        t.set("cpus", "0").unwrap();
        assert_eq!(
            topology(&t).unwrap_err().message,
            "bhyve: Invalid value for cpus: '0'"
        );
    }
}
