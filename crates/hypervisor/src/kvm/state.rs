//! What KVM keeps of a VM and its vCPUs, read out for a snapshot and put
//! back on restore (bhyve's `vm_snapshot_req` for the kernel side, written
//! to `FILE.kern`).
//!
//! The structs are KVM's own (`kvm-bindings` serialises them); the order
//! of the `set` calls follows what KVM needs: the APIC base (in sregs and
//! MSRs) before the LAPIC registers, the pending events last.

use kvm_bindings::{
    kvm_clock_data, kvm_debugregs, kvm_irqchip, kvm_lapic_state, kvm_mp_state, kvm_msr_entry,
    kvm_pit_state2, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, Msrs,
    KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
};
use serde::{Deserialize, Serialize};

use super::{kvm_err, KvmVcpu, KvmVm};
use crate::{HvError, Result};

/// One vCPU, complete: registers, FPU/SSE/AVX (XSAVE area), XCRs, debug
/// registers, every MSR KVM lists (TSC and kvmclock included), the LAPIC,
/// pending exceptions/interrupts/NMIs and the MP state.
#[derive(Serialize, Deserialize)]
pub struct KvmVcpuState {
    pub id: u32,
    regs: kvm_regs,
    sregs: kvm_sregs,
    xsave: kvm_xsave,
    xcrs: kvm_xcrs,
    debugregs: kvm_debugregs,
    lapic: kvm_lapic_state,
    events: kvm_vcpu_events,
    mp_state: kvm_mp_state,
    /// (index, value) of every MSR KVM could read.
    msrs: Vec<(u32, u64)>,
}

/// The in-kernel devices: both PICs, the IOAPIC, the PIT and kvmclock.
#[derive(Clone, Serialize, Deserialize)]
pub struct KvmVmState {
    pic_master: kvm_irqchip,
    pic_slave: kvm_irqchip,
    ioapic: kvm_irqchip,
    pit: kvm_pit_state2,
    clock: kvm_clock_data,
}

/// How many MSRs one KVM_GET_MSRS/KVM_SET_MSRS call carries.
const MSR_BATCH: usize = 64;

impl KvmVcpu {
    /// Read every MSR in `indices`; one KVM cannot read (not exposed to this
    /// guest's CPUID) is left out, as KVM would refuse to set it back too.
    fn read_msrs(&self, indices: &[u32]) -> Result<Vec<(u32, u64)>> {
        let mut out = Vec::with_capacity(indices.len());
        let mut rest = indices;
        while !rest.is_empty() {
            let batch = &rest[..rest.len().min(MSR_BATCH)];
            let entries: Vec<kvm_msr_entry> = batch
                .iter()
                .map(|&index| kvm_msr_entry {
                    index,
                    ..Default::default()
                })
                .collect();
            let mut msrs = Msrs::from_entries(&entries)
                .map_err(|e| HvError::Unsupported(format!("MSR list: {e:?}")))?;
            let read = self
                .fd
                .get_msrs(&mut msrs)
                .map_err(kvm_err("reading MSRs"))?;
            out.extend(msrs.as_slice()[..read].iter().map(|e| (e.index, e.data)));
            // KVM stops at the first MSR it cannot read: skip that one.
            rest = &rest[(read + 1).min(rest.len())..];
        }
        Ok(out)
    }

    pub(super) fn save(&mut self, msr_indices: &[u32]) -> Result<KvmVcpuState> {
        // A vCPU that left KVM_RUN for an I/O or MSR exit has its
        // instruction completed on the next entry: enter with
        // immediate_exit so KVM finishes it before the state is read.
        self.fd.set_kvm_immediate_exit(1);
        let completed = self.fd.run().map(|_| ()).map_err(|e| e.errno());
        self.fd.set_kvm_immediate_exit(0);
        match completed {
            Ok(()) | Err(libc::EINTR) => {}
            Err(errno) => {
                return Err(HvError::Kvm {
                    what: "completing the vCPU's last exit",
                    source: kvm_ioctls::Error::new(errno),
                })
            }
        }
        Ok(KvmVcpuState {
            id: self.id,
            mp_state: self
                .fd
                .get_mp_state()
                .map_err(kvm_err("reading MP state"))?,
            regs: self.fd.get_regs().map_err(kvm_err("reading regs"))?,
            sregs: self.fd.get_sregs().map_err(kvm_err("reading sregs"))?,
            xsave: self.fd.get_xsave().map_err(kvm_err("reading XSAVE"))?,
            xcrs: self.fd.get_xcrs().map_err(kvm_err("reading XCRs"))?,
            debugregs: self
                .fd
                .get_debug_regs()
                .map_err(kvm_err("reading debug registers"))?,
            lapic: self.fd.get_lapic().map_err(kvm_err("reading the LAPIC"))?,
            msrs: self.read_msrs(msr_indices)?,
            events: self
                .fd
                .get_vcpu_events()
                .map_err(kvm_err("reading pending events"))?,
        })
    }

    pub(super) fn restore(&mut self, s: &KvmVcpuState) -> Result<()> {
        if s.id != self.id {
            return Err(HvError::Unsupported(format!(
                "snapshot state of vCPU {} given to vCPU {}",
                s.id, self.id
            )));
        }
        self.fd
            .set_mp_state(s.mp_state)
            .map_err(kvm_err("writing MP state"))?;
        self.fd.set_regs(&s.regs).map_err(kvm_err("writing regs"))?;
        self.fd
            .set_sregs(&s.sregs)
            .map_err(kvm_err("writing sregs"))?;
        // SAFETY: the XSAVE area was read from KVM with KVM_GET_XSAVE.
        unsafe { self.fd.set_xsave(&s.xsave) }.map_err(kvm_err("writing XSAVE"))?;
        self.fd.set_xcrs(&s.xcrs).map_err(kvm_err("writing XCRs"))?;
        self.fd
            .set_debug_regs(&s.debugregs)
            .map_err(kvm_err("writing debug registers"))?;
        self.fd
            .set_lapic(&s.lapic)
            .map_err(kvm_err("writing the LAPIC"))?;
        for batch in s.msrs.chunks(MSR_BATCH) {
            let entries: Vec<kvm_msr_entry> = batch
                .iter()
                .map(|&(index, data)| kvm_msr_entry {
                    index,
                    data,
                    ..Default::default()
                })
                .collect();
            let msrs = Msrs::from_entries(&entries)
                .map_err(|e| HvError::Unsupported(format!("MSR list: {e:?}")))?;
            let written = self.fd.set_msrs(&msrs).map_err(kvm_err("writing MSRs"))?;
            if written < batch.len() {
                return Err(HvError::Unsupported(format!(
                    "this KVM refuses the saved value of MSR {:#x} on vCPU {}",
                    batch[written].0, self.id
                )));
            }
        }
        self.fd
            .set_vcpu_events(&s.events)
            .map_err(kvm_err("writing pending events"))
    }
}

impl KvmVm {
    fn irqchip(&self, chip_id: u32) -> Result<kvm_irqchip> {
        let mut chip = kvm_irqchip {
            chip_id,
            ..Default::default()
        };
        self.fd
            .get_irqchip(&mut chip)
            .map_err(kvm_err("reading the in-kernel irqchip"))?;
        Ok(chip)
    }

    pub(super) fn save(&self) -> Result<KvmVmState> {
        Ok(KvmVmState {
            pic_master: self.irqchip(KVM_IRQCHIP_PIC_MASTER)?,
            pic_slave: self.irqchip(KVM_IRQCHIP_PIC_SLAVE)?,
            ioapic: self.irqchip(KVM_IRQCHIP_IOAPIC)?,
            pit: self.fd.get_pit2().map_err(kvm_err("reading the PIT"))?,
            clock: self.fd.get_clock().map_err(kvm_err("reading kvmclock"))?,
        })
    }

    pub(super) fn restore(&self, s: &KvmVmState) -> Result<()> {
        self.fd
            .set_pit2(&s.pit)
            .map_err(kvm_err("writing the PIT"))?;
        // The guest's clock goes on from where it was saved: the time the
        // VM spent suspended does not pass for it (TSC likewise, through
        // its MSR), as with QEMU's default.
        let clock = kvm_clock_data {
            clock: s.clock.clock,
            ..Default::default()
        };
        self.fd
            .set_clock(&clock)
            .map_err(kvm_err("writing kvmclock"))?;
        for chip in [&s.pic_master, &s.pic_slave, &s.ioapic] {
            self.fd
                .set_irqchip(chip)
                .map_err(kvm_err("writing the in-kernel irqchip"))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vcpu_state_round_trips_through_json() {
        let mut s = KvmVcpuState {
            id: 1,
            regs: kvm_regs {
                rip: 0x1234,
                rflags: 2,
                ..Default::default()
            },
            sregs: Default::default(),
            xsave: Default::default(),
            xcrs: Default::default(),
            debugregs: Default::default(),
            lapic: Default::default(),
            events: Default::default(),
            mp_state: Default::default(),
            msrs: vec![(0x10, 0xdead_beef)],
        };
        s.xsave.region[7] = 0x55aa;
        s.lapic.regs[0x20] = 3;
        let text = serde_json::to_string(&s).unwrap();
        let back: KvmVcpuState = serde_json::from_str(&text).unwrap();
        assert_eq!(back.regs.rip, 0x1234);
        assert_eq!(back.xsave.region[7], 0x55aa);
        assert_eq!(back.lapic.regs[0x20], 3);
        assert_eq!(back.msrs, vec![(0x10, 0xdead_beef)]);
    }
}
