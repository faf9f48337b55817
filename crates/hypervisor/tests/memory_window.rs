//! A device memory window (fbuf's frame buffer) on /dev/kvm: a guest's
//! stores land in the device's pages wherever the window is placed, follow
//! it when it moves, and exit to user space as MMIO once it is unplaced;
//! a place overlapping guest RAM is refused.

use std::sync::Arc;

use rhyve_hypervisor::kvm::KvmVm;
use rhyve_hypervisor::{EntryRegs, Vcpu, VcpuExit, Vm, VmSpec};
use rhyve_platform::layout::MemoryLayout;
use vm_memory::{Bytes, GuestAddress, MmapRegion, VolatileMemory};

const CODE: u64 = 0x1000;
const GDT: u64 = 0x500;
const WINDOW: usize = 2 << 20;

/// `mov dword [addr], value` then `out 0x80, al`, for each store.
fn program(stores: &[(u32, u32)]) -> Vec<u8> {
    let mut code = Vec::new();
    for &(addr, value) in stores {
        code.extend([0xC7, 0x05]);
        code.extend(addr.to_le_bytes());
        code.extend(value.to_le_bytes());
        code.extend([0xE6, 0x80]);
    }
    code
}

/// Run until the next port write (the end of one store) or an MMIO write.
fn run_to_next_stop(vcpu: &mut dyn Vcpu) -> Option<(u64, Vec<u8>)> {
    loop {
        match vcpu.run().expect("KVM_RUN") {
            VcpuExit::IoOut { port: 0x80, .. } => return None,
            VcpuExit::MmioWrite { addr, data } => return Some((addr, data.to_vec())),
            VcpuExit::Interrupted => continue,
            other => panic!("unexpected exit {other:?}"),
        }
    }
}

#[test]
fn guest_stores_follow_the_window_and_exit_once_it_is_gone() {
    assert!(
        std::path::Path::new("/dev/kvm").exists(),
        "this test needs /dev/kvm"
    );
    let vm = KvmVm::new(VmSpec {
        cpus: 1,
        sockets: 1,
        cores: 1,
        threads: 1,
        memory: MemoryLayout::new(64 << 20),
        wired: false,
        guest_in_core: false,
        x2apic: false,
        strict_msr: true,
        emulation_assist: false,
        rom_size: 0,
        memory_image: None,
    })
    .unwrap();
    let mem = vm.memory();
    // Null, flat 32-bit code, flat data.
    for (i, d) in [0u64, 0x00CF_9A00_0000_FFFF, 0x00CF_9200_0000_FFFF]
        .iter()
        .enumerate()
    {
        mem.write_obj(*d, GuestAddress(GDT + 8 * i as u64)).unwrap();
    }
    let code = program(&[
        (0xC000_0000, 0x1122_3344),
        (0xD000_0004, 0x5566_7788),
        (0xD000_0008, 0x99AA_BBCC),
    ]);
    mem.write_slice(&code, GuestAddress(CODE)).unwrap();
    let mut vcpu = vm.create_vcpu(0).unwrap();
    vcpu.set_entry(&EntryRegs {
        rip: CODE,
        rsp: 0x8000,
        cr0: 1,
        gdt_base: GDT,
        gdt_limit: 23,
        code_selector: 0x08,
        data_selector: 0x10,
        ..Default::default()
    })
    .unwrap();

    let pages = Arc::new(MmapRegion::new(WINDOW).unwrap());
    let mut window = vm.memory_window(pages.clone()).unwrap();
    let word = |at: usize| {
        let v: u32 = pages.as_volatile_slice().read_obj(at).unwrap();
        v
    };
    assert!(
        window.place(Some(0)).is_err(),
        "the window may not cover RAM"
    );

    window.place(Some(0xC000_0000)).unwrap();
    assert_eq!(run_to_next_stop(vcpu.as_mut()), None);
    assert_eq!(word(0), 0x1122_3344);

    window.place(Some(0xD000_0000)).unwrap();
    assert_eq!(run_to_next_stop(vcpu.as_mut()), None);
    assert_eq!(word(4), 0x5566_7788, "the store follows the moved window");

    window.place(None).unwrap();
    assert_eq!(
        run_to_next_stop(vcpu.as_mut()),
        Some((0xD000_0008, 0x99AA_BBCCu32.to_le_bytes().to_vec())),
        "without the window the store is an MMIO exit"
    );
    assert_eq!(word(8), 0);
}
