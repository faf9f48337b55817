//! The CPUID a bhyve guest sees: the host's supported leaves, with bhyve's
//! hypervisor signature and the `-c` topology (`sys/amd64/vmm/x86.c`).

use kvm_bindings::kvm_cpuid_entry2;

/// The guest's CPU topology (`-c cpus,sockets,cores,threads`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Topology {
    pub sockets: u32,
    pub cores: u32,
    pub threads: u32,
}

/// bhyve's hypervisor vendor signature, leaf 0x40000000 EBX/ECX/EDX.
pub const BHYVE_SIGNATURE: &[u8; 12] = b"bhyve bhyve ";

const LEAF_FEATURES: u32 = 0x1;
const LEAF_CACHE: u32 = 0x4;
const LEAF_TOPOLOGY: u32 = 0xB;
const LEAF_TOPOLOGY_V2: u32 = 0x1F;
const LEAF_HYPERVISOR: u32 = 0x4000_0000;
const ECX_X2APIC: u32 = 1 << 21;
const ECX_HYPERVISOR: u32 = 1 << 31;
const EDX_HTT: u32 = 1 << 28;

/// Bits needed to number `n` items (x86 topology shift width).
fn width(n: u32) -> u32 {
    if n <= 1 {
        0
    } else {
        32 - (n - 1).leading_zeros()
    }
}

fn u32_at(sig: &[u8; 12], i: usize) -> u32 {
    u32::from_le_bytes([sig[i], sig[i + 1], sig[i + 2], sig[i + 3]])
}

/// Adjust the host's supported CPUID entries for vCPU `vcpu`.
pub fn guest_cpuid(
    supported: &[kvm_cpuid_entry2],
    vcpu: u32,
    topo: Topology,
    x2apic: bool,
) -> Vec<kvm_cpuid_entry2> {
    let per_package = topo.cores * topo.threads;
    let smt_bits = width(topo.threads);
    let pkg_bits = smt_bits + width(topo.cores);
    let mut out: Vec<kvm_cpuid_entry2> = supported
        .iter()
        .filter(|e| !(LEAF_HYPERVISOR..LEAF_HYPERVISOR + 0x100).contains(&e.function))
        .filter(|e| e.function != LEAF_TOPOLOGY && e.function != LEAF_TOPOLOGY_V2)
        .copied()
        .collect();
    let has_leaf_b = supported.iter().any(|e| e.function == LEAF_TOPOLOGY);
    let has_leaf_1f = supported.iter().any(|e| e.function == LEAF_TOPOLOGY_V2);
    for e in out.iter_mut() {
        match e.function {
            LEAF_FEATURES => {
                e.ebx =
                    (e.ebx & 0x0000_FFFF) | ((vcpu & 0xFF) << 24) | ((per_package & 0xFF) << 16);
                e.ecx |= ECX_HYPERVISOR;
                if x2apic {
                    e.ecx |= ECX_X2APIC;
                } else {
                    e.ecx &= !ECX_X2APIC;
                }
                if per_package > 1 {
                    e.edx |= EDX_HTT;
                } else {
                    e.edx &= !EDX_HTT;
                }
            }
            LEAF_CACHE => {
                let level = (e.eax >> 5) & 7;
                let sharing = if level >= 3 {
                    per_package
                } else {
                    topo.threads
                };
                e.eax = (e.eax & 0x3FFF)
                    | ((sharing.saturating_sub(1) & 0xFFF) << 14)
                    | ((topo.cores.saturating_sub(1) & 0x3F) << 26);
            }
            _ => {}
        }
    }
    let topology_leaf = |function: u32, index: u32| {
        let (eax, ebx, kind) = match index {
            0 => (smt_bits, topo.threads, 1),
            1 => (pkg_bits, per_package, 2),
            _ => (0, 0, 0),
        };
        kvm_cpuid_entry2 {
            function,
            index,
            flags: kvm_bindings::KVM_CPUID_FLAG_SIGNIFCANT_INDEX,
            eax,
            ebx,
            ecx: (kind << 8) | (index & 0xFF),
            edx: vcpu,
            ..Default::default()
        }
    };
    for (present, leaf) in [(has_leaf_b, LEAF_TOPOLOGY), (has_leaf_1f, LEAF_TOPOLOGY_V2)] {
        if present {
            for index in 0..3 {
                out.push(topology_leaf(leaf, index));
            }
        }
    }
    out.push(kvm_cpuid_entry2 {
        function: LEAF_HYPERVISOR,
        eax: LEAF_HYPERVISOR + 1,
        ebx: u32_at(BHYVE_SIGNATURE, 0),
        ecx: u32_at(BHYVE_SIGNATURE, 4),
        edx: u32_at(BHYVE_SIGNATURE, 8),
        ..Default::default()
    });
    out.push(kvm_cpuid_entry2 {
        function: LEAF_HYPERVISOR + 1,
        ..Default::default()
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leaf(function: u32, index: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            ..Default::default()
        }
    }

    fn find(v: &[kvm_cpuid_entry2], f: u32, i: u32) -> kvm_cpuid_entry2 {
        *v.iter().find(|e| e.function == f && e.index == i).unwrap()
    }

    #[test]
    fn signature_and_topology() {
        let host = vec![
            leaf(0, 0),
            leaf(1, 0),
            leaf(0xB, 0),
            leaf(0xB, 1),
            leaf(0x4000_0000, 0),
            leaf(0x4000_0001, 0),
        ];
        let topo = Topology {
            sockets: 2,
            cores: 2,
            threads: 2,
        };
        let v = guest_cpuid(&host, 5, topo, false);
        let sig = find(&v, 0x4000_0000, 0);
        let mut bytes = Vec::new();
        for r in [sig.ebx, sig.ecx, sig.edx] {
            bytes.extend_from_slice(&r.to_le_bytes());
        }
        assert_eq!(&bytes, BHYVE_SIGNATURE);
        assert_eq!(sig.eax, 0x4000_0001);
        let l1 = find(&v, 1, 0);
        assert_eq!(l1.ebx >> 24, 5);
        assert_eq!((l1.ebx >> 16) & 0xFF, 4);
        assert_ne!(l1.ecx & ECX_HYPERVISOR, 0);
        assert_eq!(l1.ecx & ECX_X2APIC, 0);
        let smt = find(&v, 0xB, 0);
        assert_eq!((smt.eax, smt.ebx, smt.ecx >> 8, smt.edx), (1, 2, 1, 5));
        let core = find(&v, 0xB, 1);
        assert_eq!((core.eax, core.ebx, core.ecx >> 8), (2, 4, 2));
        assert_eq!(v.iter().filter(|e| e.function == 0x4000_0000).count(), 1);
    }

    #[test]
    fn x2apic_bit_follows_flag() {
        let v = guest_cpuid(
            &[leaf(1, 0)],
            0,
            Topology {
                sockets: 1,
                cores: 1,
                threads: 1,
            },
            true,
        );
        assert_ne!(find(&v, 1, 0).ecx & ECX_X2APIC, 0);
    }
}
