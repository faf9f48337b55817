//! Unit tests: decoding, effect and exceptions of every instruction,
//! against a fake page-granular guest memory, and a fuzz-style run of
//! random bytes over random states.

use crate::*;
use std::collections::{HashMap, HashSet};

const PAGE: u64 = 4096;

/// Guest memory as a map of 4 KiB pages keyed by linear page number;
/// unmapped pages fault, read-only pages fault on write. All-or-nothing,
/// as the trait asks.
#[derive(Default)]
struct FakeMemory {
    pages: HashMap<u64, Vec<u8>>,
    read_only: HashSet<u64>,
}

impl FakeMemory {
    fn map(&mut self, linear: u64, bytes: &[u8]) {
        let mut done = 0;
        while done < bytes.len() {
            let address = linear.wrapping_add(done as u64);
            let offset = (address % PAGE) as usize;
            let chunk = (PAGE as usize - offset).min(bytes.len() - done);
            let page = self
                .pages
                .entry(address / PAGE)
                .or_insert_with(|| vec![0; PAGE as usize]);
            page[offset..offset + chunk].copy_from_slice(&bytes[done..done + chunk]);
            done += chunk;
        }
    }

    fn map_zeroed(&mut self, linear: u64, len: u64) {
        let mut page = linear / PAGE;
        while page * PAGE < linear + len {
            self.pages
                .entry(page)
                .or_insert_with(|| vec![0; PAGE as usize]);
            page += 1;
        }
    }

    fn bytes(&self, linear: u64, len: usize) -> Vec<u8> {
        let mut out = vec![0; len];
        FakeMemory::check(&self.pages, &HashSet::new(), linear, len, false).unwrap();
        for (i, slot) in out.iter_mut().enumerate() {
            let address = linear + i as u64;
            *slot = self.pages[&(address / PAGE)][(address % PAGE) as usize];
        }
        out
    }

    fn qword(&self, linear: u64) -> u64 {
        u64::from_le_bytes(self.bytes(linear, 8).try_into().unwrap())
    }

    fn check(
        pages: &HashMap<u64, Vec<u8>>,
        read_only: &HashSet<u64>,
        linear: u64,
        len: usize,
        write: bool,
    ) -> Result<(), PageFault> {
        for i in 0..len as u64 {
            let address = linear.wrapping_add(i);
            let page = address / PAGE;
            if !pages.contains_key(&page) {
                return Err(PageFault {
                    address,
                    error_code: if write { 2 } else { 0 },
                });
            }
            if write && read_only.contains(&page) {
                return Err(PageFault {
                    address,
                    error_code: 3,
                });
            }
        }
        Ok(())
    }
}

impl GuestMemoryAccess for FakeMemory {
    fn read(&mut self, linear: u64, buf: &mut [u8]) -> Result<(), PageFault> {
        FakeMemory::check(&self.pages, &self.read_only, linear, buf.len(), false)?;
        for (i, slot) in buf.iter_mut().enumerate() {
            let address = linear.wrapping_add(i as u64);
            *slot = self.pages[&(address / PAGE)][(address % PAGE) as usize];
        }
        Ok(())
    }

    fn write(&mut self, linear: u64, buf: &[u8]) -> Result<(), PageFault> {
        FakeMemory::check(&self.pages, &self.read_only, linear, buf.len(), true)?;
        self.map(linear, buf);
        Ok(())
    }
}

// GDT layout used by the descriptor tests.
const GDT: u64 = 0x1000;
const IDT: u64 = 0x2000;
const CODE32: u16 = 0x08;
const CODE64: u16 = 0x10;
const DATA: u16 = 0x18;
const DATA_ABSENT: u16 = 0x20;
const CODE64_DPL3: u16 = 0x28;
const CODE64_UNACCESSED: u16 = 0x30;
const CODE64_ABSENT: u16 = 0x38;
const DATA_DPL3: u16 = 0x40;
const GDT_ENTRIES: [u64; 9] = [
    0,
    0x00cf_9b00_0000_ffff,
    0x00af_9b00_0000_ffff,
    0x00cf_9300_0000_ffff,
    0x00cf_1300_0000_ffff,
    0x00af_fb00_0000_ffff,
    0x00af_9a00_0000_ffff,
    0x00af_1b00_0000_ffff,
    0x00cf_f300_0000_ffff,
];

fn segment_from(raw: u64, selector: u16) -> Segment {
    let limit = ((raw & 0xffff) | ((raw >> 32) & 0xf_0000)) as u32;
    let g = raw & (1 << 55) != 0;
    Segment {
        selector,
        base: 0,
        limit: if g { (limit << 12) | 0xfff } else { limit },
        seg_type: ((raw >> 40) & 0xf) as u8,
        s: raw & (1 << 44) != 0,
        dpl: ((raw >> 45) & 3) as u8,
        present: raw & (1 << 47) != 0,
        avl: false,
        l: raw & (1 << 53) != 0,
        db: raw & (1 << 54) != 0,
        g,
        unusable: false,
    }
}

fn memory_with_gdt() -> FakeMemory {
    let mut mem = FakeMemory::default();
    for (i, entry) in GDT_ENTRIES.iter().enumerate() {
        mem.map(GDT + i as u64 * 8, &entry.to_le_bytes());
    }
    mem.map_zeroed(IDT, 0x1000);
    mem.map_zeroed(0x8000, 0x2000); // stack
    mem
}

fn long_cpu() -> CpuState {
    let cs = segment_from(GDT_ENTRIES[2], CODE64);
    let mut cpu = CpuState {
        rip: 0xffff_ffff_8100_0000,
        rflags: rflags::FIXED | rflags::IF,
        cr0: 0x8000_0011,
        cr4: 0x20,
        efer: 0x500,
        cpl: 0,
        cs,
        ss: segment_from(GDT_ENTRIES[3], DATA),
        ds: segment_from(GDT_ENTRIES[3], DATA),
        es: segment_from(GDT_ENTRIES[3], DATA),
        gdtr: DescriptorTable {
            base: GDT,
            limit: (GDT_ENTRIES.len() * 8 - 1) as u16,
        },
        idtr: DescriptorTable {
            base: IDT,
            limit: 0xfff,
        },
        ..CpuState::default()
    };
    cpu.gpr[RSP] = 0x9008;
    cpu.mode = CpuMode::from_registers(cpu.cr0, cpu.efer, &cpu.cs);
    assert_eq!(cpu.mode, CpuMode::Long64);
    cpu
}

fn protected_cpu() -> CpuState {
    let mut cpu = long_cpu();
    cpu.efer = 0;
    cpu.cr0 = 0x11;
    cpu.cs = segment_from(GDT_ENTRIES[1], CODE32);
    cpu.rip = 0xc100_0000;
    cpu.idtr.limit = 0x7ff;
    cpu.mode = CpuMode::from_registers(cpu.cr0, cpu.efer, &cpu.cs);
    assert_eq!(cpu.mode, CpuMode::Protected32);
    cpu
}

fn gate64(offset: u64, selector: u16, gate_type: u8, dpl: u8, present: bool, ist: u8) -> [u8; 16] {
    let low = (offset & 0xffff)
        | (u64::from(selector) << 16)
        | (u64::from(ist) << 32)
        | (u64::from(gate_type) << 40)
        | (u64::from(dpl) << 45)
        | (u64::from(present) << 47)
        | ((offset >> 16) & 0xffff) << 48;
    let high = offset >> 32;
    let mut out = [0u8; 16];
    out[..8].copy_from_slice(&low.to_le_bytes());
    out[8..].copy_from_slice(&high.to_le_bytes());
    out
}

fn gate32(offset: u32, selector: u16, gate_type: u8, present: bool) -> [u8; 8] {
    let gate = gate64(u64::from(offset), selector, gate_type, 0, present, 0);
    gate[..8].try_into().unwrap()
}

/// Runs `assist` and checks the invariant that non-completions leave the
/// state alone.
fn run(bytes: &[u8], cpu: &mut CpuState, mem: &mut FakeMemory) -> Outcome {
    let before = cpu.clone();
    let outcome = assist(bytes, cpu, mem);
    if !matches!(outcome, Outcome::Completed { .. }) {
        assert_eq!(
            *cpu, before,
            "state changed by {outcome:?} for {bytes:02x?}"
        );
    }
    outcome
}

fn exception(kind: InstructionKind, vector: u8, error_code: Option<u32>, rip: u64) -> Outcome {
    Outcome::Exception {
        kind,
        vector,
        error_code,
        cr2: None,
        rip,
    }
}

// ---- clac / stac ----

#[test]
fn clac_and_stac_toggle_ac_and_advance() {
    let mut mem = FakeMemory::default();
    let mut cpu = long_cpu();
    let rip = cpu.rip;
    cpu.rflags |= rflags::RF;
    let stac = run(&[0x0f, 0x01, 0xcb, 0x90], &mut cpu, &mut mem);
    assert_eq!(
        stac,
        Outcome::Completed {
            kind: InstructionKind::Stac
        }
    );
    assert_eq!(cpu.rip, rip + 3);
    assert_ne!(cpu.rflags & rflags::AC, 0);
    assert_eq!(cpu.rflags & rflags::RF, 0, "RF clears after an instruction");
    let clac = run(&[0x0f, 0x01, 0xca], &mut cpu, &mut mem);
    assert_eq!(
        clac,
        Outcome::Completed {
            kind: InstructionKind::Clac
        }
    );
    assert_eq!(cpu.rip, rip + 6);
    assert_eq!(cpu.rflags & rflags::AC, 0);
}

#[test]
fn clac_stac_refused_outside_ring_0_and_with_lock() {
    let mut mem = FakeMemory::default();
    let mut cpu = long_cpu();
    cpu.cpl = 3;
    let ud = exception(InstructionKind::Clac, vector::UD, None, cpu.rip);
    assert_eq!(run(&[0x0f, 0x01, 0xca], &mut cpu, &mut mem), ud);
    cpu.cpl = 0;
    let ud = exception(InstructionKind::Stac, vector::UD, None, cpu.rip);
    assert_eq!(run(&[0xf0, 0x0f, 0x01, 0xcb], &mut cpu, &mut mem), ud);
    let mut vm86 = protected_cpu();
    vm86.rflags |= rflags::VM;
    vm86.mode = CpuMode::Protected16;
    let ud = exception(InstructionKind::Stac, vector::UD, None, vm86.rip);
    assert_eq!(run(&[0x0f, 0x01, 0xcb], &mut vm86, &mut mem), ud);
}

#[test]
fn clac_stac_prefixes() {
    let mut mem = FakeMemory::default();
    let mut cpu = long_cpu();
    let rip = cpu.rip;
    // Segment and REX prefixes are ignored; the slow path agrees with the fast one.
    let outcome = run(&[0x2e, 0x48, 0x0f, 0x01, 0xcb], &mut cpu, &mut mem);
    assert_eq!(
        outcome,
        Outcome::Completed {
            kind: InstructionKind::Stac
        }
    );
    assert_eq!(cpu.rip, rip + 5);
    assert_ne!(cpu.rflags & rflags::AC, 0);
    // 66/f2/f3 make it another instruction.
    for prefix in [0x66, 0xf2, 0xf3] {
        assert_eq!(
            run(&[prefix, 0x0f, 0x01, 0xca], &mut cpu, &mut mem),
            Outcome::Unsupported
        );
    }
    // Other 0f 01 instructions are not ours.
    assert_eq!(
        run(&[0x0f, 0x01, 0xd0], &mut cpu, &mut mem),
        Outcome::Unsupported
    );
}

#[test]
fn instruction_pointer_wraps_with_the_mode() {
    let mut mem = FakeMemory::default();
    let mut cpu = protected_cpu();
    cpu.rip = 0xffff_fffe;
    assert_eq!(
        run(&[0x0f, 0x01, 0xca], &mut cpu, &mut mem),
        Outcome::Completed {
            kind: InstructionKind::Clac
        }
    );
    assert_eq!(cpu.rip, 1);
    let mut real = CpuState {
        rip: 0xfffe,
        ..CpuState::default()
    };
    assert_eq!(
        run(&[0x9b], &mut real, &mut mem),
        Outcome::Completed {
            kind: InstructionKind::Fwait
        }
    );
    assert_eq!(real.rip, 0xffff);
    assert_eq!(
        run(&[0x0f, 0x01, 0xca], &mut real, &mut mem),
        Outcome::Completed {
            kind: InstructionKind::Clac
        }
    );
    assert_eq!(real.rip, 2);
}

// ---- int3 / ud2 / fwait ----

#[test]
fn int3_is_a_trap_reported_after_the_instruction() {
    let mut mem = FakeMemory::default();
    let mut cpu = long_cpu();
    let rip = cpu.rip;
    let bp = exception(InstructionKind::Int3, vector::BP, None, rip + 1);
    assert_eq!(run(&[0xcc, 0x90, 0x90], &mut cpu, &mut mem), bp);
    let bp = exception(InstructionKind::Int3, vector::BP, None, rip + 3);
    assert_eq!(run(&[0x66, 0x2e, 0xcc], &mut cpu, &mut mem), bp);
    let ud = exception(InstructionKind::Int3, vector::UD, None, rip);
    assert_eq!(run(&[0xf0, 0xcc], &mut cpu, &mut mem), ud);
}

#[test]
fn ud2_faults_at_the_instruction() {
    let mut mem = FakeMemory::default();
    let mut cpu = long_cpu();
    let ud = exception(InstructionKind::Ud2, vector::UD, None, cpu.rip);
    assert_eq!(run(&[0x0f, 0x0b], &mut cpu, &mut mem), ud);
    assert_eq!(run(&[0x48, 0x0f, 0x0b, 0x01], &mut cpu, &mut mem), ud);
    assert_eq!(run(&[0xf0, 0x0f, 0x0b], &mut cpu, &mut mem), ud);
    let mut real = CpuState::default();
    let ud = exception(InstructionKind::Ud2, vector::UD, None, 0);
    assert_eq!(run(&[0x0f, 0x0b], &mut real, &mut mem), ud);
}

#[test]
fn fwait_is_a_no_op_unless_mp_and_ts() {
    let mut mem = FakeMemory::default();
    let mut cpu = long_cpu();
    let rip = cpu.rip;
    // 9b before an x87 instruction is its own instruction.
    assert_eq!(
        run(&[0x9b, 0xdf, 0xe0], &mut cpu, &mut mem),
        Outcome::Completed {
            kind: InstructionKind::Fwait
        }
    );
    assert_eq!(cpu.rip, rip + 1);
    cpu.cr0 |= CR0_TS;
    assert_eq!(
        run(&[0x9b], &mut cpu, &mut mem),
        Outcome::Completed {
            kind: InstructionKind::Fwait
        }
    );
    cpu.cr0 |= CR0_MP;
    let nm = exception(InstructionKind::Fwait, vector::NM, None, cpu.rip);
    assert_eq!(run(&[0x9b], &mut cpu, &mut mem), nm);
    cpu.cr0 &= !CR0_TS;
    let ud = exception(InstructionKind::Fwait, vector::UD, None, cpu.rip);
    assert_eq!(run(&[0xf0, 0x9b], &mut cpu, &mut mem), ud);
}

// ---- int n / iret, 64-bit ----

const HANDLER: u64 = 0xffff_ffff_8200_0000;

#[test]
fn int_n_64_delivers_through_an_interrupt_gate_and_iretq_returns() {
    let mut mem = memory_with_gdt();
    mem.map(IDT + 0x80 * 16, &gate64(HANDLER, CODE64, 0xe, 0, true, 0));
    let mut cpu = long_cpu();
    cpu.rflags |= rflags::TF | rflags::CF;
    cpu.gpr[RSP] = 0x9008;
    let original = cpu.clone();
    let outcome = run(&[0xcd, 0x80], &mut cpu, &mut mem);
    assert_eq!(
        outcome,
        Outcome::Completed {
            kind: InstructionKind::IntN
        }
    );
    assert_eq!(cpu.rip, HANDLER);
    // Aligned to 16 then five quadwords.
    assert_eq!(cpu.gpr[RSP], 0x9000 - 40);
    let frame: Vec<u64> = (0..5).map(|i| mem.qword(0x9000 - 40 + i * 8)).collect();
    assert_eq!(
        frame,
        [
            original.rip + 2,
            u64::from(CODE64),
            original.rflags,
            0x9008,
            u64::from(DATA)
        ]
    );
    assert_eq!(cpu.rflags & (rflags::IF | rflags::TF), 0);
    assert_ne!(cpu.rflags & rflags::CF, 0);
    assert_eq!(cpu.cs.selector, CODE64);
    assert_eq!(cpu.mode, CpuMode::Long64);

    let outcome = run(&[0x48, 0xcf], &mut cpu, &mut mem);
    assert_eq!(
        outcome,
        Outcome::Completed {
            kind: InstructionKind::Iret
        }
    );
    let mut expected = original;
    expected.rip += 2;
    assert_eq!(cpu, expected);
}

#[test]
fn int_n_64_trap_gate_keeps_if_and_sets_accessed() {
    let mut mem = memory_with_gdt();
    mem.map(
        IDT + 0x21 * 16,
        &gate64(HANDLER, CODE64_UNACCESSED, 0xf, 0, true, 0),
    );
    let mut cpu = long_cpu();
    assert_eq!(
        run(&[0xcd, 0x21], &mut cpu, &mut mem),
        Outcome::Completed {
            kind: InstructionKind::IntN
        }
    );
    assert_ne!(cpu.rflags & rflags::IF, 0);
    assert_eq!(cpu.cs.selector, CODE64_UNACCESSED);
    assert_eq!(cpu.cs.seg_type, 0xb);
    let descriptor = mem.qword(GDT + u64::from(CODE64_UNACCESSED));
    assert_eq!((descriptor >> 40) & 0xff, 0x9b);
}

#[test]
fn int_n_64_exceptions() {
    let base = memory_with_gdt();
    let cpu = long_cpu();
    let n = 0x30u8;
    let idt_error = (u32::from(n) << 3) | 2;
    let rip = cpu.rip;
    let cases: [([u8; 16], Outcome); 10] = [
        (
            gate64(HANDLER, CODE64, 0xe, 0, false, 0),
            exception(InstructionKind::IntN, vector::NP, Some(idt_error), rip),
        ),
        (
            gate64(HANDLER, CODE64, 0xc, 0, true, 0),
            exception(InstructionKind::IntN, vector::GP, Some(idt_error), rip),
        ),
        (
            gate64(HANDLER, CODE64, 0x5, 0, true, 0),
            exception(InstructionKind::IntN, vector::GP, Some(idt_error), rip),
        ),
        (
            gate64(HANDLER, 0, 0xe, 0, true, 0),
            exception(InstructionKind::IntN, vector::GP, Some(0), rip),
        ),
        (
            gate64(HANDLER, 0x200, 0xe, 0, true, 0),
            exception(InstructionKind::IntN, vector::GP, Some(0x200), rip),
        ),
        (
            gate64(HANDLER, DATA, 0xe, 0, true, 0),
            exception(
                InstructionKind::IntN,
                vector::GP,
                Some(u32::from(DATA)),
                rip,
            ),
        ),
        (
            gate64(HANDLER, CODE32, 0xe, 0, true, 0),
            exception(
                InstructionKind::IntN,
                vector::GP,
                Some(u32::from(CODE32)),
                rip,
            ),
        ),
        (
            gate64(HANDLER, CODE64_DPL3, 0xe, 0, true, 0),
            exception(
                InstructionKind::IntN,
                vector::GP,
                Some(u32::from(CODE64_DPL3)),
                rip,
            ),
        ),
        (
            gate64(HANDLER, CODE64_ABSENT, 0xe, 0, true, 0),
            exception(
                InstructionKind::IntN,
                vector::NP,
                Some(u32::from(CODE64_ABSENT)),
                rip,
            ),
        ),
        (
            gate64(0x8000_0000_0000, CODE64, 0xe, 0, true, 0),
            exception(InstructionKind::IntN, vector::GP, Some(0), rip),
        ),
    ];
    for (gate, expected) in cases {
        let mut mem = FakeMemory {
            pages: base.pages.clone(),
            ..FakeMemory::default()
        };
        mem.map(IDT + u64::from(n) * 16, &gate);
        let mut cpu = cpu.clone();
        assert_eq!(
            run(&[0xcd, n], &mut cpu, &mut mem),
            expected,
            "gate {gate:02x?}"
        );
    }
    // Unsupported cases: IST, an LDT selector, CPL 3, compatibility mode.
    for (gate, setup) in [
        (gate64(HANDLER, CODE64, 0xe, 0, true, 1), 0),
        (gate64(HANDLER, CODE64 | 4, 0xe, 0, true, 0), 0),
        (gate64(HANDLER, CODE64, 0xe, 3, true, 0), 1),
        (gate64(HANDLER, CODE64, 0xe, 0, true, 0), 2),
    ] {
        let mut mem = FakeMemory {
            pages: base.pages.clone(),
            ..FakeMemory::default()
        };
        mem.map(IDT + u64::from(n) * 16, &gate);
        let mut cpu = cpu.clone();
        match setup {
            1 => cpu.cpl = 3,
            2 => cpu.mode = CpuMode::Protected32,
            _ => {}
        }
        assert_eq!(run(&[0xcd, n], &mut cpu, &mut mem), Outcome::Unsupported);
    }
    // Beyond the IDT limit.
    let mut mem = FakeMemory {
        pages: base.pages.clone(),
        ..FakeMemory::default()
    };
    let mut short_idt = cpu.clone();
    short_idt.idtr.limit = u16::from(n) * 16 + 14;
    let expected = exception(InstructionKind::IntN, vector::GP, Some(idt_error), rip);
    assert_eq!(run(&[0xcd, n], &mut short_idt, &mut mem), expected);
    // LOCK int n.
    let expected = exception(InstructionKind::IntN, vector::UD, None, rip);
    assert_eq!(run(&[0xf0, 0xcd, n], &mut cpu.clone(), &mut mem), expected);
}

#[test]
fn int_n_64_page_fault_on_the_stack_leaves_the_state() {
    let mut mem = memory_with_gdt();
    mem.map(IDT + 0x80 * 16, &gate64(HANDLER, CODE64, 0xe, 0, true, 0));
    let mut cpu = long_cpu();
    cpu.gpr[RSP] = 0x20_0000;
    let outcome = run(&[0xcd, 0x80], &mut cpu, &mut mem);
    assert_eq!(
        outcome,
        Outcome::Exception {
            kind: InstructionKind::IntN,
            vector: vector::PF,
            error_code: Some(2),
            cr2: Some(0x20_0000 - 40),
            rip: cpu.rip,
        }
    );
    // A non-canonical stack is #SS(0).
    cpu.gpr[RSP] = 0x8000_0000_0010;
    let ss = exception(InstructionKind::IntN, vector::SS, Some(0), cpu.rip);
    assert_eq!(run(&[0xcd, 0x80], &mut cpu, &mut mem), ss);
}

fn push_iret_frame64(mem: &mut FakeMemory, rsp: u64, values: [u64; 5]) {
    for (i, value) in values.iter().enumerate() {
        mem.map(rsp + i as u64 * 8, &value.to_le_bytes());
    }
}

#[test]
fn iretq_checks() {
    let cpu = long_cpu();
    let rsp = 0x8800;
    let flags = rflags::FIXED | rflags::IF | rflags::AC | rflags::VM | (1 << 40);
    let good = [HANDLER, u64::from(CODE64), flags, 0x9000, u64::from(DATA)];
    let iret = |frame: [u64; 5], cpu: &CpuState| {
        let mut mem = memory_with_gdt();
        push_iret_frame64(&mut mem, rsp, frame);
        let mut cpu = cpu.clone();
        cpu.gpr[RSP] = rsp;
        let outcome = run(&[0x48, 0xcf], &mut cpu, &mut mem);
        (outcome, cpu)
    };
    let (outcome, after) = iret(good, &cpu);
    assert_eq!(
        outcome,
        Outcome::Completed {
            kind: InstructionKind::Iret
        }
    );
    assert_eq!(after.rip, HANDLER);
    assert_eq!(after.gpr[RSP], 0x9000);
    // VM and reserved bits are not loaded.
    assert_eq!(after.rflags, rflags::FIXED | rflags::IF | rflags::AC);

    // A null SS is fine for a 64-bit return at CPL 0.
    let (outcome, after) = iret([HANDLER, u64::from(CODE64), 2, 0x9000, 0], &cpu);
    assert_eq!(
        outcome,
        Outcome::Completed {
            kind: InstructionKind::Iret
        }
    );
    assert_eq!(after.ss.selector, 0);
    assert_eq!(after.ss.dpl, 0);

    // Back to a 32-bit code segment: compatibility mode.
    let (outcome, after) = iret(
        [0x1000, u64::from(CODE32), 2, 0x9000, u64::from(DATA)],
        &cpu,
    );
    assert_eq!(
        outcome,
        Outcome::Completed {
            kind: InstructionKind::Iret
        }
    );
    assert_eq!(after.mode, CpuMode::Protected32);

    let rip = cpu.rip;
    let gp = |code| exception(InstructionKind::Iret, vector::GP, Some(code), rip);
    let cases = [
        (
            [
                0x8000_0000_0000,
                u64::from(CODE64),
                2,
                0x9000,
                u64::from(DATA),
            ],
            gp(0),
        ),
        (
            [0x1_0000_0000, u64::from(CODE32), 2, 0x9000, u64::from(DATA)],
            gp(0),
        ),
        ([HANDLER, 0, 2, 0x9000, u64::from(DATA)], gp(0)),
        (
            [HANDLER, u64::from(DATA), 2, 0x9000, u64::from(DATA)],
            gp(u32::from(DATA)),
        ),
        (
            [HANDLER, u64::from(CODE64 | 3), 2, 0x9000, u64::from(DATA)],
            gp(u32::from(CODE64)),
        ),
        (
            [HANDLER, u64::from(CODE64), 2, 0x9000, u64::from(DATA | 1)],
            gp(u32::from(DATA)),
        ),
        (
            [HANDLER, u64::from(CODE64), 2, 0x9000, u64::from(CODE64)],
            gp(u32::from(CODE64)),
        ),
        ([0x1000, u64::from(CODE32), 2, 0x9000, 0], gp(0)),
        (
            [
                HANDLER,
                u64::from(CODE64_ABSENT),
                2,
                0x9000,
                u64::from(DATA),
            ],
            exception(
                InstructionKind::Iret,
                vector::NP,
                Some(u32::from(CODE64_ABSENT)),
                rip,
            ),
        ),
        (
            [
                HANDLER,
                u64::from(CODE64),
                2,
                0x9000,
                u64::from(DATA_ABSENT),
            ],
            exception(
                InstructionKind::Iret,
                vector::SS,
                Some(u32::from(DATA_ABSENT)),
                rip,
            ),
        ),
    ];
    for (frame, expected) in cases {
        assert_eq!(iret(frame, &cpu).0, expected, "frame {frame:x?}");
    }
    // Returns to ring 3 change privilege: not ours.
    let frame = [
        0x40_0000,
        u64::from(CODE64_DPL3 | 3),
        2,
        0x9000,
        u64::from(DATA_DPL3 | 3),
    ];
    assert_eq!(iret(frame, &cpu).0, Outcome::Unsupported);
    // NT in IA-32e mode is #GP(0).
    let mut nested = cpu.clone();
    nested.rflags |= rflags::NT;
    assert_eq!(iret(good, &nested).0, gp(0));
    // 16-bit operand size.
    let mut mem = memory_with_gdt();
    let mut word = cpu.clone();
    assert_eq!(
        run(&[0x66, 0xcf], &mut word, &mut mem),
        Outcome::Unsupported
    );
    // A REX followed by 66 does not count: still iretw.
    assert_eq!(
        run(&[0x48, 0x66, 0xcf], &mut word, &mut mem),
        Outcome::Unsupported
    );
}

#[test]
fn iretd_in_64_bit_mode_pops_doublewords() {
    let mut mem = memory_with_gdt();
    let rsp = 0x8800;
    for (i, value) in [
        0x10_0000u32,
        u32::from(CODE64),
        0x202,
        0x9100,
        u32::from(DATA),
    ]
    .iter()
    .enumerate()
    {
        mem.map(rsp + i as u64 * 4, &value.to_le_bytes());
    }
    let mut cpu = long_cpu();
    cpu.gpr[RSP] = rsp;
    assert_eq!(
        run(&[0xcf], &mut cpu, &mut mem),
        Outcome::Completed {
            kind: InstructionKind::Iret
        }
    );
    assert_eq!(
        (cpu.rip, cpu.gpr[RSP], cpu.rflags),
        (0x10_0000, 0x9100, 0x202)
    );
}

#[test]
fn iretq_stack_faults() {
    let mut mem = memory_with_gdt();
    let mut cpu = long_cpu();
    cpu.gpr[RSP] = 0x7ff0; // frame runs into the unmapped page below 0x8000? no: 0x7000 page
    let outcome = run(&[0x48, 0xcf], &mut cpu, &mut mem);
    assert!(matches!(
        outcome,
        Outcome::Exception {
            vector: vector::PF,
            cr2: Some(0x7ff0),
            ..
        }
    ));
    cpu.gpr[RSP] = 0x7fff_ffff_fff0;
    let ss = exception(InstructionKind::Iret, vector::SS, Some(0), cpu.rip);
    assert_eq!(run(&[0x48, 0xcf], &mut cpu, &mut mem), ss);
}

// ---- int n / iret, 32-bit protected mode ----

#[test]
fn int_n_32_and_iretd() {
    let mut mem = memory_with_gdt();
    mem.map(IDT + 0x80 * 8, &gate32(0xc200_0000, CODE32, 0xe, true));
    let mut cpu = protected_cpu();
    cpu.gpr[RSP] = 0x9000;
    cpu.rflags |= 0x8d5;
    let original = cpu.clone();
    assert_eq!(
        run(&[0xcd, 0x80], &mut cpu, &mut mem),
        Outcome::Completed {
            kind: InstructionKind::IntN
        }
    );
    assert_eq!(cpu.rip, 0xc200_0000);
    assert_eq!(cpu.gpr[RSP], 0x9000 - 12);
    let frame = mem.bytes(0x9000 - 12, 12);
    let dwords: Vec<u32> = frame
        .chunks(4)
        .map(|c| u32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    assert_eq!(
        dwords,
        [0xc100_0002, u32::from(CODE32), original.rflags as u32]
    );
    assert_eq!(cpu.rflags & rflags::IF, 0);
    assert_eq!(
        run(&[0xcf], &mut cpu, &mut mem),
        Outcome::Completed {
            kind: InstructionKind::Iret
        }
    );
    let mut expected = original;
    expected.rip += 2;
    assert_eq!(cpu, expected);
}

#[test]
fn int_n_32_refusals_and_faults() {
    let cpu = protected_cpu();
    let rip = cpu.rip;
    let with_gate = |gate: [u8; 8], cpu: &CpuState| {
        let mut mem = memory_with_gdt();
        mem.map(IDT + 0x40 * 8, &gate);
        let mut cpu = cpu.clone();
        run(&[0xcd, 0x40], &mut cpu, &mut mem)
    };
    // Task gate, 16-bit interrupt gate: unsupported.
    assert_eq!(
        with_gate(gate32(0, 0x50, 0x5, true), &cpu),
        Outcome::Unsupported
    );
    assert_eq!(
        with_gate(gate32(0x1000, CODE32, 0x6, true), &cpu),
        Outcome::Unsupported
    );
    // A 64-bit gate type does not exist here: 0xc (call gate) is #GP.
    let gp = exception(
        InstructionKind::IntN,
        vector::GP,
        Some((0x40 << 3) | 2),
        rip,
    );
    assert_eq!(with_gate(gate32(0x1000, CODE32, 0xc, true), &cpu), gp);
    // Handler beyond the code segment limit.
    let mut small_code = cpu.clone();
    let mut mem = memory_with_gdt();
    mem.map(GDT + 0x48, &0x0040_9b00_0000_0fffu64.to_le_bytes());
    mem.map(IDT + 0x40 * 8, &gate32(0x2000, 0x48, 0xe, true));
    small_code.gdtr.limit = 0x4f;
    let gp0 = exception(InstructionKind::IntN, vector::GP, Some(0), rip);
    assert_eq!(run(&[0xcd, 0x40], &mut small_code, &mut mem), gp0);
    // Stack outside SS's limit.
    let mut small_stack = cpu.clone();
    small_stack.ss.limit = 0x8ff0;
    small_stack.gpr[RSP] = 0x9000;
    let ss = exception(InstructionKind::IntN, vector::SS, Some(0), rip);
    assert_eq!(
        with_gate(gate32(0x1000, CODE32, 0xe, true), &small_stack),
        ss
    );
    // 16-bit stack, expand-down stack, virtual-8086 mode, real mode.
    let mut stack16 = cpu.clone();
    stack16.ss.db = false;
    assert_eq!(
        with_gate(gate32(0x1000, CODE32, 0xe, true), &stack16),
        Outcome::Unsupported
    );
    let mut expand_down = cpu.clone();
    expand_down.ss.seg_type = 7;
    assert_eq!(
        with_gate(gate32(0x1000, CODE32, 0xe, true), &expand_down),
        Outcome::Unsupported
    );
    let mut vm86 = cpu.clone();
    vm86.rflags |= rflags::VM;
    assert_eq!(
        with_gate(gate32(0x1000, CODE32, 0xe, true), &vm86),
        Outcome::Unsupported
    );
    let real = CpuState::default();
    assert_eq!(
        with_gate(gate32(0x1000, CODE32, 0xe, true), &real),
        Outcome::Unsupported
    );
}

#[test]
fn iret_32_refusals() {
    let cpu = protected_cpu();
    let with_frame = |frame: [u32; 3], cpu: &CpuState, bytes: &[u8]| {
        let mut mem = memory_with_gdt();
        for (i, value) in frame.iter().enumerate() {
            mem.map(0x8800 + i as u64 * 4, &value.to_le_bytes());
        }
        let mut cpu = cpu.clone();
        cpu.gpr[RSP] = 0x8800;
        run(bytes, &mut cpu, &mut mem)
    };
    // Return to virtual-8086 mode, to ring 3, nested task, 16-bit operand size.
    let vm = rflags::VM as u32 | 2;
    assert_eq!(
        with_frame([0x1000, 0x1b, vm], &cpu, &[0xcf]),
        Outcome::Unsupported
    );
    assert_eq!(
        with_frame([0x1000, 0x2b, 2], &cpu, &[0xcf]),
        Outcome::Unsupported
    );
    let mut nested = cpu.clone();
    nested.rflags |= rflags::NT;
    assert_eq!(
        with_frame([0x1000, 0x08, 2], &nested, &[0xcf]),
        Outcome::Unsupported
    );
    assert_eq!(
        with_frame([0x1000, 0x08, 2], &cpu, &[0x66, 0xcf]),
        Outcome::Unsupported
    );
    // In a 16-bit code segment 66 makes it iretd.
    let mut code16 = cpu.clone();
    code16.cs.db = false;
    code16.mode = CpuMode::Protected16;
    assert_eq!(
        with_frame([0x1000, 0x08, 2], &code16, &[0x66, 0xcf]),
        Outcome::Completed {
            kind: InstructionKind::Iret
        }
    );
    assert_eq!(
        with_frame([0x1000, 0x08, 2], &code16, &[0xcf]),
        Outcome::Unsupported
    );
    // In legacy mode 48 is dec eax, not REX.
    assert_eq!(
        with_frame([0x1000, 0x08, 2], &cpu, &[0x48, 0xcf]),
        Outcome::Unsupported
    );
}

// ---- cmpxchg16b ----

const SLOT: u64 = 0x5_0000;

fn cmpxchg_setup(contents: u128) -> (CpuState, FakeMemory) {
    let mut mem = FakeMemory::default();
    mem.map(SLOT, &contents.to_le_bytes());
    let mut cpu = long_cpu();
    cpu.gpr[0] = 0x1111; // rax
    cpu.gpr[2] = 0x2222; // rdx
    cpu.gpr[3] = 0x3333; // rbx
    cpu.gpr[1] = 0x4444; // rcx
    cpu.gpr[6] = SLOT; // rsi
    (cpu, mem)
}

const LOCK_CMPXCHG16B_RSI: [u8; 5] = [0xf0, 0x48, 0x0f, 0xc7, 0x0e];

#[test]
fn cmpxchg16b_equal_stores_rcx_rbx() {
    let (mut cpu, mut mem) = cmpxchg_setup((0x2222 << 64) | 0x1111);
    let rip = cpu.rip;
    let outcome = run(&LOCK_CMPXCHG16B_RSI, &mut cpu, &mut mem);
    assert_eq!(
        outcome,
        Outcome::Completed {
            kind: InstructionKind::Cmpxchg16b
        }
    );
    assert_eq!(
        mem.bytes(SLOT, 16),
        ((0x4444u128 << 64) | 0x3333).to_le_bytes()
    );
    assert_ne!(cpu.rflags & rflags::ZF, 0);
    assert_eq!((cpu.gpr[0], cpu.gpr[2]), (0x1111, 0x2222));
    assert_eq!(cpu.rip, rip + 5);
}

#[test]
fn cmpxchg16b_unequal_loads_rdx_rax() {
    let (mut cpu, mut mem) = cmpxchg_setup((0xaaaa << 64) | 0xbbbb);
    cpu.rflags |= rflags::ZF;
    // Without LOCK it is legal too.
    let outcome = run(&LOCK_CMPXCHG16B_RSI[1..], &mut cpu, &mut mem);
    assert_eq!(
        outcome,
        Outcome::Completed {
            kind: InstructionKind::Cmpxchg16b
        }
    );
    assert_eq!(
        mem.bytes(SLOT, 16),
        ((0xaaaau128 << 64) | 0xbbbb).to_le_bytes()
    );
    assert_eq!(cpu.rflags & rflags::ZF, 0);
    assert_eq!((cpu.gpr[0], cpu.gpr[2]), (0xbbbb, 0xaaaa));
}

#[test]
fn cmpxchg16b_addressing_forms() {
    let contents = (0x2222u128 << 64) | 0x1111;
    // (bytes, register setup) -> all address SLOT.
    type Setup = fn(&mut CpuState);
    let forms: [(Vec<u8>, Setup); 8] = [
        // [rsi+disp8]
        (vec![0xf0, 0x48, 0x0f, 0xc7, 0x4e, 0x10], |c| {
            c.gpr[6] = SLOT - 0x10
        }),
        // [rbx+rcx*8+disp32] via SIB
        (
            vec![0xf0, 0x48, 0x0f, 0xc7, 0x8c, 0xcb, 0x00, 0x01, 0x00, 0x00],
            |c| {
                c.gpr[3] = SLOT - 0x100 - 0x40;
                c.gpr[1] = 8;
            },
        ),
        // [r12] needs a SIB; [r13] with mod 1 and disp 0.
        (vec![0xf0, 0x49, 0x0f, 0xc7, 0x0c, 0x24], |c| {
            c.gpr[12] = SLOT
        }),
        (vec![0xf0, 0x49, 0x0f, 0xc7, 0x4d, 0x00], |c| {
            c.gpr[13] = SLOT
        }),
        // [r9*2+disp32], no base (REX.X).
        (
            vec![0xf0, 0x4a, 0x0f, 0xc7, 0x0c, 0x4d, 0x00, 0x00, 0x05, 0x00],
            |c| c.gpr[9] = 0,
        ),
        // gs:[rax]
        (vec![0x65, 0xf0, 0x48, 0x0f, 0xc7, 0x08], |c| {
            c.gs.base = SLOT - 0x20;
            c.gpr[0] = 0x20;
        }),
        // 67: [esi] truncates to 32 bits.
        (vec![0x67, 0xf0, 0x48, 0x0f, 0xc7, 0x0e], |c| {
            c.gpr[6] = 0xdead_0000_0000_0000 | SLOT
        }),
        // ds override ignored in 64-bit mode.
        (vec![0x3e, 0xf0, 0x48, 0x0f, 0xc7, 0x0e], |c| {
            c.ds.base = 0x1234_0000;
        }),
    ];
    for (bytes, setup) in forms {
        let (mut cpu, mut mem) = cmpxchg_setup(contents);
        let rax = cpu.gpr[0];
        setup(&mut cpu);
        let (rax_now, rdx_now) = (cpu.gpr[0], cpu.gpr[2]);
        // Make RDX:RAX match memory for the forms that reuse RAX.
        mem.map(
            SLOT,
            &((u128::from(rdx_now) << 64) | u128::from(rax_now)).to_le_bytes(),
        );
        let _ = rax;
        let rip = cpu.rip;
        let outcome = run(&bytes, &mut cpu, &mut mem);
        assert_eq!(
            outcome,
            Outcome::Completed {
                kind: InstructionKind::Cmpxchg16b
            },
            "{bytes:02x?}"
        );
        assert_ne!(cpu.rflags & rflags::ZF, 0, "{bytes:02x?}");
        assert_eq!(cpu.rip, rip + bytes.len() as u64);
    }
}

#[test]
fn cmpxchg16b_rip_relative() {
    let (mut cpu, mut mem) = cmpxchg_setup((0x2222 << 64) | 0x1111);
    cpu.rip = SLOT - 0x1000;
    let bytes = [0xf0, 0x48, 0x0f, 0xc7, 0x0d, 0xf7, 0x0f, 0x00, 0x00];
    // next RIP = SLOT - 0x1000 + 9; + 0xff7 = SLOT.
    assert_eq!(
        run(&bytes, &mut cpu, &mut mem),
        Outcome::Completed {
            kind: InstructionKind::Cmpxchg16b
        }
    );
    assert_ne!(cpu.rflags & rflags::ZF, 0);
}

#[test]
fn cmpxchg16b_exceptions() {
    let (cpu, mem) = cmpxchg_setup(0);
    let rip = cpu.rip;
    let mut mem = mem;
    let kind = InstructionKind::Cmpxchg16b;
    let mut misaligned = cpu.clone();
    misaligned.gpr[6] = SLOT + 8;
    assert_eq!(
        run(&LOCK_CMPXCHG16B_RSI, &mut misaligned, &mut mem),
        exception(kind, vector::GP, Some(0), rip)
    );
    let mut non_canonical = cpu.clone();
    non_canonical.gpr[6] = 0x8000_0000_0000;
    assert_eq!(
        run(&LOCK_CMPXCHG16B_RSI, &mut non_canonical, &mut mem),
        exception(kind, vector::GP, Some(0), rip)
    );
    // Through RSP: #SS.
    let mut stack = cpu.clone();
    stack.gpr[RSP] = 0x8000_0000_0000;
    assert_eq!(
        run(&[0xf0, 0x48, 0x0f, 0xc7, 0x0c, 0x24], &mut stack, &mut mem),
        exception(kind, vector::SS, Some(0), rip)
    );
    // LA57 widens canonical addresses.
    let mut la57 = non_canonical.clone();
    la57.cr4 |= CR4_LA57;
    la57.gpr[6] = 0x8000_0000_0000;
    assert!(matches!(
        run(&LOCK_CMPXCHG16B_RSI, &mut la57, &mut mem),
        Outcome::Exception {
            vector: vector::PF,
            cr2: Some(0x8000_0000_0000),
            ..
        }
    ));
    // Register operand.
    assert_eq!(
        run(&[0xf0, 0x48, 0x0f, 0xc7, 0xce], &mut cpu.clone(), &mut mem),
        exception(kind, vector::UD, None, rip)
    );
    // Unmapped page.
    let mut unmapped = cpu.clone();
    unmapped.gpr[6] = 0x70_0000;
    assert_eq!(
        run(&LOCK_CMPXCHG16B_RSI, &mut unmapped, &mut mem),
        Outcome::Exception {
            kind,
            vector: vector::PF,
            error_code: Some(0),
            cr2: Some(0x70_0000),
            rip
        }
    );
    // Read-only page, equal: the write faults.
    let mut read_only = cpu.clone();
    mem.map(SLOT, &((0x2222u128 << 64) | 0x1111).to_le_bytes());
    mem.read_only.insert(SLOT / PAGE);
    assert!(matches!(
        run(&LOCK_CMPXCHG16B_RSI, &mut read_only, &mut mem),
        Outcome::Exception {
            vector: vector::PF,
            error_code: Some(3),
            ..
        }
    ));
    // Not ours: cmpxchg8b (no REX.W), other /r, 66/f3 prefixes, 32-bit mode.
    for bytes in [
        &[0xf0, 0x0f, 0xc7, 0x0e][..],
        &[0xf0, 0x48, 0x0f, 0xc7, 0x36],
        &[0x66, 0xf0, 0x48, 0x0f, 0xc7, 0x0e],
        &[0xf3, 0x48, 0x0f, 0xc7, 0x0e],
        &[0x48, 0xf0, 0x0f, 0xc7, 0x0e],
    ] {
        assert_eq!(
            run(bytes, &mut cpu.clone(), &mut mem),
            Outcome::Unsupported,
            "{bytes:02x?}"
        );
    }
    let mut legacy = protected_cpu();
    assert_eq!(
        run(&LOCK_CMPXCHG16B_RSI, &mut legacy, &mut mem),
        Outcome::Unsupported
    );
}

/// A VMM's atomic override is what `assist` uses.
#[test]
fn cmpxchg16b_uses_the_compare_exchange_hook() {
    struct Atomic {
        calls: Vec<(u64, u128, u128)>,
    }
    impl GuestMemoryAccess for Atomic {
        fn read(&mut self, _: u64, _: &mut [u8]) -> Result<(), PageFault> {
            panic!("plain read used")
        }
        fn write(&mut self, _: u64, _: &[u8]) -> Result<(), PageFault> {
            panic!("plain write used")
        }
        fn compare_exchange_16(
            &mut self,
            linear: u64,
            expected: u128,
            new: u128,
        ) -> Result<u128, PageFault> {
            self.calls.push((linear, expected, new));
            Ok(expected)
        }
    }
    let (mut cpu, _) = cmpxchg_setup(0);
    let mut mem = Atomic { calls: Vec::new() };
    let outcome = assist(&LOCK_CMPXCHG16B_RSI, &mut cpu, &mut mem);
    assert_eq!(
        outcome,
        Outcome::Completed {
            kind: InstructionKind::Cmpxchg16b
        }
    );
    assert_eq!(
        mem.calls,
        [(SLOT, (0x2222 << 64) | 0x1111, (0x4444 << 64) | 0x3333)]
    );
}

// ---- decoding limits, fetch ----

#[test]
fn decoding_is_bounded_to_15_bytes() {
    let mut mem = FakeMemory::default();
    let mut cpu = long_cpu();
    let mut bytes = vec![0x2e; 14];
    bytes.push(0xcc);
    let bp = exception(InstructionKind::Int3, vector::BP, None, cpu.rip + 15);
    assert_eq!(run(&bytes, &mut cpu, &mut mem), bp);
    let mut too_long = vec![0x2e; 15];
    too_long.push(0xcc);
    assert_eq!(run(&too_long, &mut cpu, &mut mem), Outcome::Unsupported);
    let mut ud2 = vec![0x2e; 14];
    ud2.extend([0x0f, 0x0b]);
    assert_eq!(run(&ud2, &mut cpu, &mut mem), Outcome::Unsupported);
}

#[test]
fn fetch_crosses_a_page_boundary() {
    let mut mem = FakeMemory::default();
    let mut cpu = long_cpu();
    cpu.rip = 0x3ffc;
    let code: Vec<u8> = (1..=20).collect();
    mem.map(0x3ffc, &code);
    assert_eq!(fetch(&cpu, &mut mem).unwrap(), &code[..15]);
    // 64-bit mode ignores a CS base.
    cpu.cs.base = 0x10_0000;
    assert_eq!(fetch(&cpu, &mut mem).unwrap(), &code[..15]);
    // The second page unmapped: the first page's bytes only.
    mem.pages.remove(&4);
    assert_eq!(fetch(&cpu, &mut mem).unwrap(), &code[..4]);
    // The first page unmapped: its fault.
    cpu.rip = 0x4000;
    assert_eq!(
        fetch(&cpu, &mut mem),
        Err(PageFault {
            address: 0x4000,
            error_code: 0
        })
    );
    // Legacy mode: CS base added, CS limit respected.
    let mut legacy = protected_cpu();
    legacy.cs.base = 0x3000;
    legacy.cs.limit = 0xffe;
    legacy.rip = 0xffc;
    mem.map(0x3ffc, &code[..4]);
    assert_eq!(fetch(&legacy, &mut mem).unwrap(), &code[..3]);
    legacy.rip = 0x1000;
    assert_eq!(fetch(&legacy, &mut mem).unwrap(), Vec::<u8>::new());
}

#[test]
fn assist_fetches_when_bytes_are_short() {
    let mut mem = FakeMemory::default();
    let mut cpu = long_cpu();
    cpu.rip = 0x3ffe;
    mem.map(0x3ffe, &[0x0f, 0x01, 0xcb]);
    assert_eq!(
        run(&[], &mut cpu, &mut mem),
        Outcome::Completed {
            kind: InstructionKind::Stac
        }
    );
    assert_eq!(cpu.rip, 0x4001);
    // Short bytes, the rest on an unmapped page: the guest's #PF.
    cpu.rip = 0x4ffe;
    mem.map(0x4ffe, &[0x0f, 0x01]);
    assert_eq!(
        run(&[0x0f], &mut cpu, &mut mem),
        Outcome::Exception {
            kind: InstructionKind::FetchFault,
            vector: vector::PF,
            error_code: Some(0),
            cr2: Some(0x5000),
            rip: 0x4ffe,
        }
    );
    // Nothing mapped at all.
    cpu.rip = 0x9_0000;
    assert!(matches!(
        run(&[], &mut cpu, &mut mem),
        Outcome::Exception {
            kind: InstructionKind::FetchFault,
            cr2: Some(0x9_0000),
            ..
        }
    ));
}

#[test]
fn describe_names_instructions() {
    assert_eq!(describe(&[0xcc]), "int3");
    assert_eq!(describe(&[0x0f, 0x0b]), "ud2");
    assert_eq!(describe(&[0x9b]), "fwait");
    assert_eq!(describe(&[0x0f, 0x01, 0xca]), "clac");
    assert_eq!(describe(&[0x0f, 0x01, 0xcb]), "stac");
    assert_eq!(describe(&[0xcd, 0x80]), "int 0x80");
    assert_eq!(describe(&[0x48, 0xcf]), "iretq");
    assert_eq!(describe(&[0xcf]), "iretd");
    assert_eq!(describe(&[0x66, 0xcf]), "iretw");
    assert_eq!(describe(&LOCK_CMPXCHG16B_RSI), "lock cmpxchg16b [rsi]");
    assert_eq!(
        describe(&[0x65, 0xf0, 0x4a, 0x0f, 0xc7, 0x4c, 0x4b, 0xf0]),
        "lock cmpxchg16b gs:[rbx+r9*2-0x10]"
    );
    assert_eq!(
        describe(&[0xf0, 0x48, 0x0f, 0xc7, 0x0d, 0, 1, 0, 0]),
        "lock cmpxchg16b [rip+0x100]"
    );
    assert_eq!(
        describe(&[0x67, 0x48, 0x0f, 0xc7, 0x0c, 0x25, 0, 0x10, 0, 0]),
        "cmpxchg16b [0x1000]"
    );
    assert_eq!(describe(&[0x90]), "unknown");
    assert_eq!(describe(&[0x0f]), "truncated");
    assert_eq!(describe(&[]), "truncated");
}

#[test]
fn modes_from_registers() {
    let mut cs = Segment::default();
    assert_eq!(CpuMode::from_registers(0, 0x500, &cs), CpuMode::Real);
    assert_eq!(CpuMode::from_registers(1, 0, &cs), CpuMode::Protected16);
    cs.db = true;
    assert_eq!(CpuMode::from_registers(1, 0, &cs), CpuMode::Protected32);
    // Compatibility mode.
    assert_eq!(CpuMode::from_registers(1, 0x500, &cs), CpuMode::Protected32);
    cs.db = false;
    cs.l = true;
    assert_eq!(CpuMode::from_registers(1, 0x500, &cs), CpuMode::Long64);
    // L without LMA is not 64-bit.
    assert_eq!(CpuMode::from_registers(1, 0x100, &cs), CpuMode::Protected16);
}

#[test]
fn real_mode_and_other_instructions_are_not_ours() {
    let mut mem = memory_with_gdt();
    let mut real = CpuState::default();
    assert_eq!(run(&[0xcf], &mut real, &mut mem), Outcome::Unsupported);
    assert_eq!(
        run(&[0xcd, 0x10], &mut real, &mut mem),
        Outcome::Unsupported
    );
    let mut cpu = long_cpu();
    for bytes in [
        &[0x90][..],
        &[0x0f, 0x05],
        &[0xf4],
        &[0x0f, 0xae, 0xe8],
        &[0xce],
        &[0xf1],
    ] {
        assert_eq!(
            run(bytes, &mut cpu, &mut mem),
            Outcome::Unsupported,
            "{bytes:02x?}"
        );
    }
    // A mode that does not follow from the registers is refused by int n/iret.
    let mut inconsistent = long_cpu();
    inconsistent.efer = 0;
    assert_eq!(
        run(&[0xcd, 0x80], &mut inconsistent, &mut mem),
        Outcome::Unsupported
    );
    assert_eq!(
        run(&[0x48, 0xcf], &mut inconsistent, &mut mem),
        Outcome::Unsupported
    );
}

#[test]
fn kind_names_are_distinct() {
    let names: HashSet<&str> = InstructionKind::ALL.iter().map(|k| k.name()).collect();
    assert_eq!(names.len(), InstructionKind::ALL.len());
}

// ---- fuzz ----

struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    /// Values biased towards the mapped region and interesting edges.
    fn value(&mut self) -> u64 {
        match self.below(6) {
            0 => self.next(),
            1 => 0x8000_0000_0000 - self.below(64),
            2 => self.below(0x2000) << 4,
            _ => self.below(0x20000),
        }
    }
}

const INTERESTING: [u8; 35] = [
    0xf0, 0xf2, 0xf3, 0x66, 0x67, 0x2e, 0x36, 0x3e, 0x26, 0x64, 0x65, 0x48, 0x41, 0x4f, 0xcc, 0xcd,
    0xcf, 0x9b, 0x0f, 0x01, 0x0b, 0xc7, 0xca, 0xcb, 0x0c, 0x0e, 0x4c, 0x8c, 0x05, 0x04, 0x24, 0x44,
    0xae, 0x54, 0x17,
];

fn random_segment(rng: &mut XorShift) -> Segment {
    let bits = rng.next();
    Segment {
        selector: rng.next() as u16,
        base: if bits & 1 == 0 { 0 } else { rng.value() },
        limit: if bits & 2 == 0 {
            u32::MAX
        } else {
            rng.next() as u32
        },
        seg_type: (bits >> 8) as u8 & 0xf,
        s: bits & 4 != 0,
        dpl: (bits >> 12) as u8 & 3,
        present: bits & 8 != 0,
        avl: bits & 16 != 0,
        l: bits & 32 != 0,
        db: bits & 64 != 0,
        g: bits & 128 != 0,
        unusable: bits & (1 << 20) != 0,
    }
}

fn random_memory(rng: &mut XorShift) -> FakeMemory {
    let mut mem = FakeMemory::default();
    for page in 0..32u64 {
        if rng.below(8) == 0 {
            continue;
        }
        let mut bytes = vec![0u8; PAGE as usize];
        for chunk in bytes.chunks_mut(8) {
            // Descriptor-like quadwords now and then, to get past the checks.
            let value = match rng.below(4) {
                0 => GDT_ENTRIES[rng.below(GDT_ENTRIES.len() as u64) as usize],
                1 => u64::from_le_bytes(
                    gate64(rng.value(), (rng.below(9) * 8) as u16, 0xe, 0, true, 0)[..8]
                        .try_into()
                        .unwrap(),
                ),
                2 => rng.below(0x20) * 8,
                _ => rng.next(),
            };
            chunk.copy_from_slice(&value.to_le_bytes());
        }
        mem.pages.insert(page, bytes);
        if rng.below(8) == 0 {
            mem.read_only.insert(page);
        }
    }
    mem
}

/// Plausible instructions: a handled opcode with random prefixes, a
/// random memory operand, now and then a mutated or dropped byte.
fn structured_bytes(rng: &mut XorShift) -> Vec<u8> {
    const PREFIXES: [u8; 11] = [
        0xf0, 0xf2, 0xf3, 0x66, 0x67, 0x2e, 0x36, 0x3e, 0x26, 0x64, 0x65,
    ];
    let mut bytes = Vec::new();
    for _ in 0..rng.below(4).saturating_sub(1) {
        bytes.push(PREFIXES[rng.below(PREFIXES.len() as u64) as usize]);
    }
    match rng.below(12) {
        11 => {
            // 0f 03 (lsl), REX now and then, register or memory sources.
            if rng.below(2) == 0 {
                bytes.push(0x40 | rng.below(16) as u8);
            }
            bytes.extend([0x0f, 0x03]);
            bytes.push((rng.below(4) as u8) << 6 | rng.below(64) as u8);
            for _ in 0..rng.below(6) {
                bytes.push(rng.next() as u8);
            }
        }
        9 | 10 => {
            // 0f ae /0../3 (fxsave, fxrstor, ldmxcsr, stmxcsr), REX.W now
            // and then, mostly aligned register bases.
            if rng.below(2) == 0 {
                bytes.push(0x40 | rng.below(16) as u8);
            }
            bytes.extend([0x0f, 0xae]);
            let modrm = if rng.below(4) == 0 {
                rng.next() as u8
            } else {
                (rng.below(3) as u8) << 6 | (rng.below(4) as u8) << 3 | rng.below(8) as u8
            };
            bytes.push(modrm);
            for _ in 0..rng.below(6) {
                bytes.push(if rng.below(2) == 0 {
                    (rng.below(16) as u8) << 4
                } else {
                    rng.next() as u8
                });
            }
        }
        8 => {
            bytes.push(0xf3);
            if rng.below(2) == 0 {
                bytes.push(0x48 | rng.below(8) as u8);
            }
            bytes.extend([0x0f, 0xb8]);
            bytes.push((rng.below(4) as u8) << 6 | rng.below(64) as u8);
            for _ in 0..rng.below(6) {
                bytes.push(rng.next() as u8);
            }
        }
        0 => bytes.extend([0x0f, 0x01, 0xca]),
        1 => bytes.extend([0x0f, 0x01, 0xcb]),
        2 => bytes.extend([0xcd, rng.below(4) as u8]),
        3 => {
            if rng.below(2) == 0 {
                bytes.push(0x48);
            }
            bytes.push(0xcf);
        }
        4 => match rng.below(3) {
            0 => bytes.push(0xcc),
            1 => bytes.push(0x9b),
            _ => {
                // d9 /5 (fldcw), now and then another d9 form.
                bytes.push(0xd9);
                bytes.push(if rng.below(4) == 0 {
                    rng.next() as u8
                } else {
                    (rng.below(3) as u8) << 6 | 5 << 3 | rng.below(8) as u8
                });
                for _ in 0..rng.below(6) {
                    bytes.push(if rng.below(2) == 0 {
                        (rng.below(16) as u8) << 4
                    } else {
                        rng.next() as u8
                    });
                }
            }
        },
        _ => {
            if rng.below(4) != 0 {
                bytes.push(0xf0);
            }
            bytes.push(0x48 | rng.below(8) as u8);
            bytes.extend([0x0f, 0xc7]);
            let modrm = (rng.below(3) as u8) << 6 | 1 << 3 | rng.below(8) as u8;
            bytes.push(modrm);
            for _ in 0..rng.below(6) {
                bytes.push(rng.next() as u8);
            }
        }
    }
    if rng.below(4) == 0 {
        let at = rng.below(bytes.len() as u64) as usize;
        bytes[at] = rng.next() as u8;
    }
    if rng.below(8) == 0 {
        bytes.truncate(rng.below(bytes.len() as u64) as usize);
    }
    bytes
}

/// A long-mode or protected-mode vCPU over `memory_with_gdt`'s tables,
/// with its IDT and stack filled with plausible, randomly broken entries.
fn structured_state(rng: &mut XorShift, mem: &mut FakeMemory) -> CpuState {
    for (i, entry) in GDT_ENTRIES.iter().enumerate() {
        mem.map(GDT + i as u64 * 8, &entry.to_le_bytes());
    }
    let long = rng.below(2) == 0;
    let selectors = [
        CODE32,
        CODE64,
        DATA,
        CODE64_UNACCESSED,
        CODE64_DPL3,
        0,
        0x200,
    ];
    let pick_selector = |rng: &mut XorShift| selectors[rng.below(selectors.len() as u64) as usize];
    for vector in 0..4u64 {
        let gate_type = [0xe, 0xf, 0xe, 0x5, 0x6, 0xc][rng.below(6) as usize];
        let target = if rng.below(2) == 0 { HANDLER } else { 0x1000 };
        let ist = if rng.below(8) == 0 { 1 } else { 0 };
        let gate = gate64(
            target,
            pick_selector(rng),
            gate_type,
            0,
            rng.below(8) != 0,
            ist,
        );
        if long {
            mem.map(IDT + vector * 16, &gate);
        } else {
            mem.map(IDT + vector * 8, &gate[..8]);
        }
    }
    let rsp = 0x8800 + rng.below(0x100) * 8;
    for slot in 0..8 {
        let frame = [
            [HANDLER, 0x1000][rng.below(2) as usize],
            u64::from(pick_selector(rng)),
            rng.next() & 0x3f_7fff,
            0x9000,
            u64::from([DATA, 0, DATA_ABSENT, CODE64][rng.below(4) as usize]),
        ];
        let at = rsp + slot * 40;
        if long {
            push_iret_frame64(mem, at, frame);
        } else {
            for (i, value) in frame[..3].iter().enumerate() {
                mem.map(at + i as u64 * 4, &(*value as u32).to_le_bytes());
            }
        }
    }
    let mut cpu = if long { long_cpu() } else { protected_cpu() };
    for gpr in cpu.gpr.iter_mut() {
        *gpr = if rng.below(2) == 0 {
            rng.below(0x2000) << 4
        } else {
            rng.value()
        };
    }
    cpu.gpr[RSP] = rsp;
    cpu.rflags = (rng.next() & 0x3f_7fd7 & !(rflags::VM | rflags::NT)) | rflags::FIXED;
    if rng.below(8) == 0 {
        cpu.cpl = 3;
    }
    if rng.below(8) == 0 {
        cpu.idtr.limit = rng.next() as u16 & 0x7f;
    }
    if rng.below(8) != 0 {
        cpu.cr4 |= CR4_OSFXSR;
    }
    cpu.cr0 |= [0, 0, 0, 0, 0, CR0_TS, CR0_EM, CR0_AM][rng.below(8) as usize];
    cpu.fpu = random_fpu(rng);
    cpu
}

fn random_fpu(rng: &mut XorShift) -> FpuState {
    let mut fpu = FpuState {
        fcw: rng.next() as u16,
        fsw: rng.next() as u16,
        ftwx: rng.next() as u8,
        last_opcode: rng.next() as u16 & 0x7ff,
        last_ip: rng.next(),
        last_dp: rng.next(),
        mxcsr: rng.next() as u32 & MXCSR_MASK,
        ..FpuState::default()
    };
    for st in fpu.fpr.iter_mut() {
        st[..10].copy_from_slice(&rng.next().to_le_bytes().repeat(2)[..10]);
    }
    for xmm in fpu.xmm.iter_mut() {
        xmm[..8].copy_from_slice(&rng.next().to_le_bytes());
        xmm[8..].copy_from_slice(&rng.next().to_le_bytes());
    }
    fpu
}

#[test]
fn fuzz_random_bytes_and_states_never_panic_or_corrupt() {
    let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
    let mut mem = random_memory(&mut rng);
    let mut completed: HashMap<&str, usize> = HashMap::new();
    let mut exceptions = 0usize;
    for iteration in 0..300_000u32 {
        if iteration % 1000 == 0 {
            mem = random_memory(&mut rng);
        }
        let structured = iteration % 2 == 0;
        let bytes: Vec<u8> = if structured {
            structured_bytes(&mut rng)
        } else {
            (0..rng.below(17))
                .map(|_| {
                    if rng.below(3) == 0 {
                        rng.next() as u8
                    } else {
                        INTERESTING[rng.below(INTERESTING.len() as u64) as usize]
                    }
                })
                .collect()
        };
        let mut cpu = if structured {
            structured_state(&mut rng, &mut mem)
        } else {
            random_state(&mut rng)
        };
        let before = cpu.clone();
        let outcome = assist(&bytes, &mut cpu, &mut mem);
        match outcome {
            Outcome::Completed { kind } => *completed.entry(kind.name()).or_insert(0) += 1,
            Outcome::Exception { .. } | Outcome::Unsupported => {
                if matches!(outcome, Outcome::Exception { .. }) {
                    exceptions += 1;
                }
                assert_eq!(
                    cpu, before,
                    "iteration {iteration}: {bytes:02x?} -> {outcome:?}"
                );
            }
        }
        let _ = describe(&bytes);
        let _ = fetch(&before, &mut mem);
    }
    // The generator must reach every instruction's completion and many exceptions.
    for kind in InstructionKind::ALL {
        if kind == InstructionKind::Int3
            || kind == InstructionKind::Ud2
            || kind == InstructionKind::FetchFault
        {
            continue; // never complete
        }
        let count = completed.get(kind.name()).copied().unwrap_or(0);
        assert!(
            count > 100,
            "{} completed {count} times: {completed:?}",
            kind.name()
        );
    }
    assert!(exceptions > 10_000, "exceptions {exceptions}");
}

fn random_state(rng: &mut XorShift) -> CpuState {
    let mut cpu = CpuState {
        rip: rng.value(),
        rflags: rng.next()
            & if rng.below(2) == 0 {
                0x3f_7fd7
            } else {
                u64::MAX
            },
        cr0: rng.next() & 0x8000_003f,
        cr3: rng.next(),
        cr4: rng.next() & CR4_LA57,
        efer: if rng.below(2) == 0 { 0x500 } else { rng.next() },
        cpl: if rng.below(4) == 0 {
            rng.next() as u8 & 3
        } else {
            0
        },
        mode: [
            CpuMode::Real,
            CpuMode::Protected16,
            CpuMode::Protected32,
            CpuMode::Long64,
        ][rng.below(4) as usize],
        cs: random_segment(rng),
        ss: random_segment(rng),
        ds: random_segment(rng),
        es: random_segment(rng),
        fs: random_segment(rng),
        gs: random_segment(rng),
        gdtr: DescriptorTable {
            base: rng.value(),
            limit: rng.next() as u16,
        },
        idtr: DescriptorTable {
            base: rng.value(),
            limit: rng.next() as u16,
        },
        fpu: random_fpu(rng),
        ..CpuState::default()
    };
    for gpr in cpu.gpr.iter_mut() {
        *gpr = rng.value();
    }
    if rng.below(2) == 0 {
        // Consistent more often than not, to get past the mode checks.
        cpu.mode = CpuMode::from_registers(cpu.cr0, cpu.efer, &cpu.cs);
    }
    cpu
}

#[test]
fn popcnt_register_forms() {
    let mut mem = FakeMemory::default();
    // popcnt rax, rdi (the one Debian's kernel uses for hweight64)
    let mut cpu = long_cpu();
    cpu.gpr[7] = 0xF0F0_0000_0000_0001;
    cpu.gpr[0] = u64::MAX;
    cpu.rflags |= rflags::CF | rflags::ZF;
    let rip = cpu.rip;
    let outcome = run(&[0xf3, 0x48, 0x0f, 0xb8, 0xc7], &mut cpu, &mut mem);
    assert_eq!(
        outcome,
        Outcome::Completed {
            kind: InstructionKind::Popcnt
        }
    );
    assert_eq!(cpu.gpr[0], 9);
    assert_eq!(cpu.rflags & (rflags::CF | rflags::ZF), 0);
    assert_eq!(cpu.rip, rip + 5);
    // popcnt eax, edi: 32 bits only, zero-extended; a zero source sets ZF.
    let mut cpu = long_cpu();
    cpu.gpr[7] = 0xFFFF_FFFF_0000_0000;
    cpu.gpr[0] = u64::MAX;
    run(&[0xf3, 0x0f, 0xb8, 0xc7], &mut cpu, &mut mem);
    assert_eq!(cpu.gpr[0], 0);
    assert_ne!(cpu.rflags & rflags::ZF, 0);
    // popcnt r9w, r10w keeps r9's upper bits.
    let mut cpu = long_cpu();
    cpu.gpr[10] = 0x0003;
    cpu.gpr[9] = 0xAAAA_0000;
    run(&[0x66, 0xf3, 0x45, 0x0f, 0xb8, 0xca], &mut cpu, &mut mem);
    assert_eq!(cpu.gpr[9], 0xAAAA_0002);
}

#[test]
fn popcnt_memory_source_and_faults() {
    let mut mem = FakeMemory::default();
    mem.map(0x7000, &0x0101_0101_0101_0101u64.to_le_bytes());
    let mut cpu = long_cpu();
    cpu.gpr[6] = 0x7000;
    // popcnt rcx, [rsi]
    let outcome = run(&[0xf3, 0x48, 0x0f, 0xb8, 0x0e], &mut cpu, &mut mem);
    assert_eq!(
        outcome,
        Outcome::Completed {
            kind: InstructionKind::Popcnt
        }
    );
    assert_eq!(cpu.gpr[1], 8);
    // An unmapped source is the guest's #PF, with the state untouched.
    let mut cpu = long_cpu();
    cpu.gpr[6] = 0x9000;
    let before = cpu.clone();
    let outcome = run(&[0xf3, 0x48, 0x0f, 0xb8, 0x0e], &mut cpu, &mut mem);
    assert!(
        matches!(
            outcome,
            Outcome::Exception {
                vector: vector::PF,
                ..
            }
        ),
        "{outcome:?}"
    );
    assert_eq!(cpu, before);
    // Without the mandatory f3 (or with f2) it is another instruction.
    assert_eq!(
        run(&[0x48, 0x0f, 0xb8, 0xc7], &mut long_cpu(), &mut mem),
        Outcome::Unsupported
    );
    assert_eq!(
        run(&[0xf2, 0x48, 0x0f, 0xb8, 0xc7], &mut long_cpu(), &mut mem),
        Outcome::Unsupported
    );
}

// ---- ldmxcsr / stmxcsr / fxsave / fxrstor ----

const FX_AREA: u64 = 0x6000;

/// A 64-bit vCPU with SSE enabled by the OS (CR4.OSFXSR) and a
/// recognisable FPU state.
fn sse_cpu() -> CpuState {
    let mut cpu = long_cpu();
    cpu.cr4 |= CR4_OSFXSR;
    cpu.fpu = FpuState {
        fcw: 0x037f,
        fsw: 0x3800,
        ftwx: 0x81,
        last_opcode: 0x05d9,
        last_ip: 0xffff_ffff_8123_4567,
        last_dp: 0xffff_8880_0765_4321,
        mxcsr: 0x1fa0,
        ..FpuState::default()
    };
    for (i, st) in cpu.fpu.fpr.iter_mut().enumerate() {
        for (j, byte) in st[..10].iter_mut().enumerate() {
            *byte = 0x10 * i as u8 + j as u8 + 1;
        }
    }
    for (i, xmm) in cpu.fpu.xmm.iter_mut().enumerate() {
        for (j, byte) in xmm.iter_mut().enumerate() {
            *byte = 0x80 ^ (0x10 * i as u8 + j as u8);
        }
    }
    cpu
}

fn completed(kind: InstructionKind) -> Outcome {
    Outcome::Completed { kind }
}

fn page_fault(kind: InstructionKind, address: u64, error_code: u32, rip: u64) -> Outcome {
    Outcome::Exception {
        kind,
        vector: vector::PF,
        error_code: Some(error_code),
        cr2: Some(address),
        rip,
    }
}

// ldmxcsr [rsp+4], the one in Debian's kernel_fpu_begin.
const LDMXCSR_RSP4: [u8; 5] = [0x0f, 0xae, 0x54, 0x24, 0x04];
// stmxcsr [rsp+4]
const STMXCSR_RSP4: [u8; 5] = [0x0f, 0xae, 0x5c, 0x24, 0x04];
// fxsave64 [rdi] / fxrstor64 [rdi] / fxsave [rdi] / fxrstor [rdi]
const FXSAVE64_RDI: [u8; 4] = [0x48, 0x0f, 0xae, 0x07];
const FXRSTOR64_RDI: [u8; 4] = [0x48, 0x0f, 0xae, 0x0f];
const FXSAVE_RDI: [u8; 3] = [0x0f, 0xae, 0x07];
const FXRSTOR_RDI: [u8; 3] = [0x0f, 0xae, 0x0f];

#[test]
fn ldmxcsr_loads_mxcsr_and_advances() {
    let mut mem = memory_with_gdt();
    let mut cpu = sse_cpu();
    mem.map(cpu.gpr[RSP] + 4, &0x9fc0u32.to_le_bytes());
    let rip = cpu.rip;
    cpu.rflags |= rflags::RF;
    let mut expected = cpu.clone();
    assert_eq!(
        run(&LDMXCSR_RSP4, &mut cpu, &mut mem),
        completed(InstructionKind::Ldmxcsr)
    );
    expected.fpu.mxcsr = 0x9fc0;
    expected.rip = rip + 5;
    expected.rflags &= !rflags::RF;
    assert_eq!(cpu, expected);
    // REX.W is ignored; fs: adds the FS base.
    let mut cpu = sse_cpu();
    cpu.fs.base = 0x100;
    cpu.gpr[3] = 0x5f00;
    mem.map(0x6000, &0xffffu32.to_le_bytes());
    assert_eq!(
        run(&[0x64, 0x48, 0x0f, 0xae, 0x13], &mut cpu, &mut mem),
        completed(InstructionKind::Ldmxcsr)
    );
    assert_eq!(cpu.fpu.mxcsr, 0xffff);
    assert_eq!(cpu.rip, rip + 5);
}

#[test]
fn stmxcsr_stores_mxcsr() {
    let mut mem = memory_with_gdt();
    let mut cpu = sse_cpu();
    let at = cpu.gpr[RSP] + 4;
    mem.map(at, &[0xaa; 8]);
    let mut expected = cpu.clone();
    assert_eq!(
        run(&STMXCSR_RSP4, &mut cpu, &mut mem),
        completed(InstructionKind::Stmxcsr)
    );
    expected.rip += 5;
    assert_eq!(cpu, expected);
    assert_eq!(mem.bytes(at, 8), [0xa0, 0x1f, 0, 0, 0xaa, 0xaa, 0xaa, 0xaa]);
}

/// The #UD/#NM/#GP/#SS/#PF/#AC cases shared by ldmxcsr and stmxcsr.
fn mxcsr_exceptions(kind: InstructionKind, reg: u8) {
    let mut mem = memory_with_gdt();
    let base = sse_cpu();
    let rip = base.rip;
    // [rbx]
    let plain = [0x0f, 0xae, reg << 3 | 0x03];
    let ud = exception(kind, vector::UD, None, rip);
    let nm = exception(kind, vector::NM, None, rip);
    let gp = exception(kind, vector::GP, Some(0), rip);
    let mut cpu = base.clone();
    cpu.gpr[3] = 0x8000;
    // LOCK, CR4.OSFXSR clear, CR0.EM: #UD, and #UD beats #NM.
    let mut locked = vec![0xf0];
    locked.extend(plain);
    assert_eq!(run(&locked, &mut cpu.clone(), &mut mem), ud);
    let mut no_osfxsr = cpu.clone();
    no_osfxsr.cr4 &= !CR4_OSFXSR;
    no_osfxsr.cr0 |= CR0_TS;
    assert_eq!(run(&plain, &mut no_osfxsr, &mut mem), ud);
    let mut em = cpu.clone();
    em.cr0 |= CR0_EM | CR0_TS;
    assert_eq!(run(&plain, &mut em, &mut mem), ud);
    // CR0.TS: #NM.
    let mut ts = cpu.clone();
    ts.cr0 |= CR0_TS;
    assert_eq!(run(&plain, &mut ts, &mut mem), nm);
    // Non-canonical: #GP(0), or #SS(0) through SS (explicit or rsp/rbp base).
    let mut far = cpu.clone();
    far.gpr[3] = 0x8000_0000_0000;
    far.gpr[RSP] = 0x8000_0000_0000;
    assert_eq!(run(&plain, &mut far.clone(), &mut mem), gp);
    let ss = exception(kind, vector::SS, Some(0), rip);
    let mut through_ss = vec![0x36];
    through_ss.extend(plain);
    let ss_override = exception(kind, vector::SS, Some(0), rip);
    assert_eq!(run(&through_ss, &mut far.clone(), &mut mem), ss_override);
    assert_eq!(
        run(&[0x0f, 0xae, reg << 3 | 0x04, 0x24], &mut far, &mut mem),
        ss
    );
    // An unmapped operand is the guest's #PF, state untouched.
    let mut unmapped = cpu.clone();
    unmapped.gpr[3] = 0x20_0000;
    let error_code = if kind == InstructionKind::Ldmxcsr {
        0
    } else {
        2
    };
    assert_eq!(
        run(&plain, &mut unmapped, &mut mem),
        page_fault(kind, 0x20_0000, error_code, rip)
    );
    // Misaligned at CPL 3 with CR0.AM and RFLAGS.AC: #AC(0); aligned or
    // without any of the three it completes.
    let mut user = cpu.clone();
    user.cpl = 3;
    user.cr0 |= CR0_AM;
    user.rflags |= rflags::AC;
    user.gpr[3] = 0x8002;
    let ac = exception(kind, vector::AC, Some(0), rip);
    assert_eq!(run(&plain, &mut user.clone(), &mut mem), ac);
    let mut kernel = user.clone();
    kernel.cpl = 0;
    assert_eq!(run(&plain, &mut kernel, &mut mem), completed(kind));
    user.gpr[3] = 0x8004;
    assert_eq!(run(&plain, &mut user, &mut mem), completed(kind));
    // Register forms (fences) and 66/f2/f3 forms are other instructions.
    assert_eq!(
        run(&[0x0f, 0xae, 0xc0 | reg << 3], &mut cpu.clone(), &mut mem),
        Outcome::Unsupported
    );
    for prefix in [0x66, 0xf2, 0xf3] {
        let mut bytes = vec![prefix];
        bytes.extend(plain);
        assert_eq!(
            run(&bytes, &mut cpu.clone(), &mut mem),
            Outcome::Unsupported
        );
    }
    // Outside 64-bit mode: not ours.
    let mut legacy = protected_cpu();
    legacy.cr4 |= CR4_OSFXSR;
    assert_eq!(run(&plain, &mut legacy, &mut mem), Outcome::Unsupported);
}

#[test]
fn ldmxcsr_exceptions() {
    mxcsr_exceptions(InstructionKind::Ldmxcsr, 2);
    // Reserved bits: #GP(0), nothing loaded.
    let mut mem = memory_with_gdt();
    let mut cpu = sse_cpu();
    mem.map(cpu.gpr[RSP] + 4, &0x1_1f80u32.to_le_bytes());
    let gp = exception(InstructionKind::Ldmxcsr, vector::GP, Some(0), cpu.rip);
    assert_eq!(run(&LDMXCSR_RSP4, &mut cpu, &mut mem), gp);
    mem.map(cpu.gpr[RSP] + 4, &0x8000_0000u32.to_le_bytes());
    assert_eq!(run(&LDMXCSR_RSP4, &mut cpu, &mut mem), gp);
}

#[test]
fn stmxcsr_exceptions() {
    mxcsr_exceptions(InstructionKind::Stmxcsr, 3);
    // A read-only page: #PF with the write/present error code.
    let mut mem = memory_with_gdt();
    let mut cpu = sse_cpu();
    mem.read_only.insert((cpu.gpr[RSP] + 4) / PAGE);
    assert_eq!(
        run(&STMXCSR_RSP4, &mut cpu, &mut mem),
        page_fault(InstructionKind::Stmxcsr, cpu.gpr[RSP] + 4, 3, cpu.rip)
    );
}

fn fx_memory() -> FakeMemory {
    let mut mem = memory_with_gdt();
    // 0x5e / 0xee patterns show which bytes fxsave leaves alone.
    mem.map(FX_AREA, &[0x5e; 512]);
    mem.map(FX_AREA + 512, &[0xee; 512]);
    mem
}

#[test]
fn fxsave64_layout() {
    let mut mem = fx_memory();
    let mut cpu = sse_cpu();
    cpu.gpr[7] = FX_AREA;
    let mut expected = cpu.clone();
    assert_eq!(
        run(&FXSAVE64_RDI, &mut cpu, &mut mem),
        completed(InstructionKind::Fxsave)
    );
    expected.rip += 4;
    assert_eq!(cpu, expected, "fxsave changes nothing but RIP");
    let image = mem.bytes(FX_AREA, 512);
    let fpu = &cpu.fpu;
    assert_eq!(image[0..2], fpu.fcw.to_le_bytes());
    assert_eq!(image[2..4], fpu.fsw.to_le_bytes());
    assert_eq!(image[4], 0x81);
    assert_eq!(image[5], 0);
    assert_eq!(image[6..8], 0x05d9u16.to_le_bytes());
    assert_eq!(image[8..16], fpu.last_ip.to_le_bytes());
    assert_eq!(image[16..24], fpu.last_dp.to_le_bytes());
    assert_eq!(image[24..28], 0x1fa0u32.to_le_bytes());
    assert_eq!(image[28..32], 0xffffu32.to_le_bytes());
    for i in 0..8 {
        let slot = &image[32 + 16 * i..48 + 16 * i];
        assert_eq!(slot[..10], fpu.fpr[i][..10], "st{i}");
        assert_eq!(slot[10..], [0; 6], "st{i} reserved bytes");
    }
    for i in 0..16 {
        assert_eq!(image[160 + 16 * i..176 + 16 * i], fpu.xmm[i], "xmm{i}");
    }
    assert_eq!(
        image[416..],
        [0x5e; 96],
        "reserved and software bytes untouched"
    );
    assert_eq!(mem.bytes(FX_AREA + 512, 16), [0xee; 16]);
}

#[test]
fn fxsave_32_bit_form_stores_offsets_and_zero_selectors() {
    let mut mem = fx_memory();
    let mut cpu = sse_cpu();
    cpu.gpr[7] = FX_AREA;
    assert_eq!(
        run(&FXSAVE_RDI, &mut cpu, &mut mem),
        completed(InstructionKind::Fxsave)
    );
    let image = mem.bytes(FX_AREA, 512);
    assert_eq!(image[8..12], 0x8123_4567u32.to_le_bytes());
    assert_eq!(image[12..16], [0; 4], "FCS and reserved");
    assert_eq!(image[16..20], 0x0765_4321u32.to_le_bytes());
    assert_eq!(image[20..24], [0; 4], "FDS and reserved");
    assert_eq!(image[24..28], 0x1fa0u32.to_le_bytes());
    assert_eq!(image[160..176], cpu.fpu.xmm[0]);
    assert_eq!(image[400..416], cpu.fpu.xmm[15]);
    // fxrstor (32-bit form) loads the offsets zero-extended.
    let mut restored = long_cpu();
    restored.gpr[7] = FX_AREA;
    assert_eq!(
        run(&FXRSTOR_RDI, &mut restored, &mut mem),
        completed(InstructionKind::Fxrstor)
    );
    let mut expected = cpu.fpu;
    expected.last_ip = 0x8123_4567;
    expected.last_dp = 0x0765_4321;
    assert_eq!(restored.fpu, expected);
}

#[test]
fn fxsave_fxrstor_round_trip() {
    let mut mem = fx_memory();
    let mut saved = sse_cpu();
    // st registers' upper six bytes are not architectural and do not survive.
    saved.fpu.fpr[3][12] = 0x77;
    saved.gpr[1] = FX_AREA - 0x40;
    // fxsave64 [rcx+0x40]
    assert_eq!(
        run(&[0x48, 0x0f, 0xae, 0x41, 0x40], &mut saved, &mut mem),
        completed(InstructionKind::Fxsave)
    );
    let mut cpu = long_cpu();
    cpu.gpr[7] = FX_AREA;
    cpu.rflags |= rflags::RF;
    let mut expected = cpu.clone();
    assert_eq!(
        run(&FXRSTOR64_RDI, &mut cpu, &mut mem),
        completed(InstructionKind::Fxrstor)
    );
    expected.fpu = saved.fpu;
    expected.fpu.fpr[3][12] = 0;
    expected.rip += 4;
    expected.rflags &= !rflags::RF;
    assert_eq!(cpu, expected);
    // fxrstor ignores byte 5, the st padding and bytes 416..512, and FOP's
    // upper 5 bits.
    let mut image = mem.bytes(FX_AREA, 512);
    image[5] = 0xff;
    image[6..8].copy_from_slice(&0xffffu16.to_le_bytes());
    image[42..48].copy_from_slice(&[0xff; 6]);
    image[416..].copy_from_slice(&[0xff; 96]);
    mem.map(FX_AREA, &image);
    let mut again = long_cpu();
    again.gpr[7] = FX_AREA;
    run(&FXRSTOR64_RDI, &mut again, &mut mem);
    let mut expected_fpu = expected.fpu;
    expected_fpu.last_opcode = 0x7ff;
    assert_eq!(again.fpu, expected_fpu);
}

#[test]
fn fxsave_fxrstor_exceptions() {
    for (kind, bytes) in [
        (InstructionKind::Fxsave, FXSAVE64_RDI),
        (InstructionKind::Fxrstor, FXRSTOR64_RDI),
    ] {
        let mut mem = fx_memory();
        mem.map(FX_AREA + 24, &0x1f80u32.to_le_bytes());
        let mut cpu = sse_cpu();
        cpu.gpr[7] = FX_AREA;
        let rip = cpu.rip;
        let ud = exception(kind, vector::UD, None, rip);
        let nm = exception(kind, vector::NM, None, rip);
        let gp = exception(kind, vector::GP, Some(0), rip);
        let mut locked = vec![0xf0];
        locked.extend(bytes);
        assert_eq!(run(&locked, &mut cpu.clone(), &mut mem), ud);
        // CR0.TS and CR0.EM are both #NM for fxsave/fxrstor.
        for bit in [CR0_TS, CR0_EM] {
            let mut off = cpu.clone();
            off.cr0 |= bit;
            assert_eq!(run(&bytes, &mut off, &mut mem), nm);
        }
        // Misaligned: #GP(0), at any CPL and whatever the AC settings.
        for offset in [1, 8, 15] {
            let mut misaligned = cpu.clone();
            misaligned.gpr[7] = FX_AREA + offset;
            assert_eq!(run(&bytes, &mut misaligned, &mut mem), gp);
        }
        // Non-canonical: #GP(0); through SS: #SS(0).
        let mut far = cpu.clone();
        far.gpr[7] = 0xffff_7fff_ffff_f000;
        assert_eq!(run(&bytes, &mut far.clone(), &mut mem), gp);
        let mut through_ss = vec![0x36];
        through_ss.extend(bytes);
        let ss = exception(kind, vector::SS, Some(0), rip);
        assert_eq!(run(&through_ss, &mut far, &mut mem), ss);
        // Not mapped: #PF; an area running into an unmapped page faults
        // before anything is written.
        let mut unmapped = cpu.clone();
        unmapped.gpr[7] = 0x20_0000;
        let write = if kind == InstructionKind::Fxsave {
            2
        } else {
            0
        };
        assert_eq!(
            run(&bytes, &mut unmapped, &mut mem),
            page_fault(kind, 0x20_0000, write, rip)
        );
        let mut straddling = cpu.clone();
        straddling.gpr[7] = 0xa000 - 0x100;
        mem.map(0xa000 - 0x100, &[0x33; 0x100]);
        assert_eq!(
            run(&bytes, &mut straddling, &mut mem),
            page_fault(kind, 0xa000, write, rip)
        );
        assert_eq!(mem.bytes(0xa000 - 0x100, 0x100), [0x33; 0x100]);
        // Register forms are the fences, not ours.
        let mut register = bytes;
        register[3] |= 0xc0;
        assert_eq!(
            run(&register, &mut cpu.clone(), &mut mem),
            Outcome::Unsupported
        );
        // CR4.OSFXSR clear is not #UD for fxsave/fxrstor.
        let mut no_osfxsr = cpu.clone();
        no_osfxsr.cr4 &= !CR4_OSFXSR;
        assert_eq!(run(&bytes, &mut no_osfxsr, &mut mem), completed(kind));
        let mut legacy = protected_cpu();
        legacy.gpr[7] = FX_AREA;
        assert_eq!(
            run(&bytes[1..], &mut legacy, &mut mem),
            Outcome::Unsupported
        );
    }
}

#[test]
fn fxrstor_refuses_reserved_mxcsr_bits() {
    let mut mem = fx_memory();
    let mut cpu = sse_cpu();
    cpu.gpr[7] = FX_AREA;
    run(&FXSAVE64_RDI, &mut cpu, &mut mem);
    mem.map(FX_AREA + 24, &0x0001_1f80u32.to_le_bytes());
    let mut fresh = long_cpu();
    fresh.gpr[7] = FX_AREA;
    let gp = exception(InstructionKind::Fxrstor, vector::GP, Some(0), fresh.rip);
    assert_eq!(run(&FXRSTOR64_RDI, &mut fresh, &mut mem), gp);
    // A read-only area is fine for fxrstor and a write #PF for fxsave.
    mem.map(FX_AREA + 24, &0x1f80u32.to_le_bytes());
    mem.read_only.insert(FX_AREA / PAGE);
    assert_eq!(
        run(&FXRSTOR64_RDI, &mut fresh, &mut mem),
        completed(InstructionKind::Fxrstor)
    );
    assert_eq!(fresh.fpu.mxcsr, 0x1f80);
    let mut cpu = sse_cpu();
    cpu.gpr[7] = FX_AREA;
    assert_eq!(
        run(&FXSAVE64_RDI, &mut cpu, &mut mem),
        page_fault(InstructionKind::Fxsave, FX_AREA, 3, cpu.rip)
    );
}

#[test]
fn describe_names_sse_state_instructions() {
    assert_eq!(describe(&LDMXCSR_RSP4), "ldmxcsr [rsp+0x4]");
    assert_eq!(describe(&STMXCSR_RSP4), "stmxcsr [rsp+0x4]");
    assert_eq!(describe(&FXSAVE64_RDI), "fxsave64 [rdi]");
    assert_eq!(describe(&FXRSTOR64_RDI), "fxrstor64 [rdi]");
    assert_eq!(describe(&FXSAVE_RDI), "fxsave [rdi]");
    assert_eq!(describe(&FXRSTOR_RDI), "fxrstor [rdi]");
    assert_eq!(describe(&[0x0f, 0xae, 0xe8]), "unknown");
    assert_eq!(describe(&[0x0f, 0xae, 0x27]), "unknown");
    assert_eq!(describe(&[0x0f, 0xae]), "truncated");
}

// ---- lsl ----

/// Linux's per-CPU segment (GDT entry 15, selector 0x7b): a DPL-3 data
/// descriptor whose limit encodes CPU 1 on node 0.
const CPUNODE: u16 = 0x7b;
const CPUNODE_DESCRIPTOR: u64 = 0x0000_f300_0000_0001;
/// An available 64-bit TSS at entry 16 (16 bytes), limit 0x67.
const TSS: u16 = 0x80;

fn lsl_setup() -> (CpuState, FakeMemory) {
    let mut mem = memory_with_gdt();
    mem.map(GDT + 15 * 8, &CPUNODE_DESCRIPTOR.to_le_bytes());
    mem.map(GDT + 16 * 8, &0x0000_8900_0000_0067u64.to_le_bytes());
    mem.map(GDT + 17 * 8, &0u64.to_le_bytes());
    // Entry 18: a 64-bit interrupt gate, which has no limit for lsl.
    mem.map(GDT + 18 * 8, &gate64(0x1000, CODE64, 0xe, 0, true, 0));
    let mut cpu = long_cpu();
    cpu.gdtr.limit = 20 * 8 - 1;
    (cpu, mem)
}

fn lsl_kind() -> Outcome {
    Outcome::Completed {
        kind: InstructionKind::Lsl,
    }
}

#[test]
fn lsl_reads_linux_cpu_number_segment() {
    // mov $0x7b, %rax; lsl %rax, %rax: Linux's paranoid entry with FSGSBASE.
    let (mut cpu, mut mem) = lsl_setup();
    cpu.gpr[0] = u64::from(CPUNODE);
    let rip = cpu.rip;
    assert_eq!(
        run(&[0x48, 0x0f, 0x03, 0xc0], &mut cpu, &mut mem),
        lsl_kind()
    );
    assert_eq!(cpu.gpr[0], 1);
    assert_ne!(cpu.rflags & rflags::ZF, 0);
    assert_eq!(cpu.rip, rip + 4);
    // The same from ring 3 (the vDSO's getcpu).
    let (mut cpu, mut mem) = lsl_setup();
    cpu.cpl = 3;
    cpu.gpr[1] = u64::from(CPUNODE);
    assert_eq!(run(&[0x0f, 0x03, 0xc1], &mut cpu, &mut mem), lsl_kind());
    assert_eq!(cpu.gpr[0], 1);
}

#[test]
fn lsl_scales_granular_limits_and_sizes_the_destination() {
    // lsl eax, ecx on the flat kernel data segment: G=1 limit 0xfffff.
    let (mut cpu, mut mem) = lsl_setup();
    cpu.gpr[0] = u64::MAX;
    cpu.gpr[1] = u64::from(DATA);
    run(&[0x0f, 0x03, 0xc1], &mut cpu, &mut mem);
    assert_eq!(cpu.gpr[0], 0xffff_ffff);
    // lsl ax, cx keeps the upper bits.
    let (mut cpu, mut mem) = lsl_setup();
    cpu.gpr[0] = 0x1234_5678_0000_0000;
    cpu.gpr[1] = u64::from(DATA);
    run(&[0x66, 0x0f, 0x03, 0xc1], &mut cpu, &mut mem);
    assert_eq!(cpu.gpr[0], 0x1234_5678_0000_ffff);
    // A 64-bit TSS reports its limit; the upper half must be clean.
    let (mut cpu, mut mem) = lsl_setup();
    cpu.gpr[1] = u64::from(TSS);
    run(&[0x0f, 0x03, 0xc1], &mut cpu, &mut mem);
    assert_eq!(cpu.gpr[0], 0x67);
    assert_ne!(cpu.rflags & rflags::ZF, 0);
    // Protected mode, 32-bit code.
    let mut cpu = protected_cpu();
    cpu.gdtr.limit = 20 * 8 - 1;
    let (_, mut mem) = lsl_setup();
    cpu.gpr[1] = u64::from(CPUNODE);
    assert_eq!(run(&[0x0f, 0x03, 0xc1], &mut cpu, &mut mem), lsl_kind());
    assert_eq!(cpu.gpr[0], 1);
}

#[test]
fn lsl_clears_zf_where_there_is_no_limit_to_report() {
    let cases: [(u16, u8, &str); 6] = [
        (0, 0, "null selector"),
        (0x3, 0, "null selector with RPL 3"),
        (20 * 8, 0, "past the GDT limit"),
        (18 * 8, 0, "interrupt gate"),
        (DATA, 3, "DPL 0 data at CPL 3"),
        (DATA | 3, 0, "DPL 0 data with RPL 3"),
    ];
    for (selector, cpl, what) in cases {
        let (mut cpu, mut mem) = lsl_setup();
        cpu.cpl = cpl;
        cpu.gpr[0] = 0xdead;
        cpu.gpr[1] = u64::from(selector);
        cpu.rflags |= rflags::ZF;
        let rip = cpu.rip;
        assert_eq!(
            run(&[0x0f, 0x03, 0xc1], &mut cpu, &mut mem),
            lsl_kind(),
            "{what}"
        );
        assert_eq!(cpu.gpr[0], 0xdead, "{what}");
        assert_eq!(cpu.rflags & rflags::ZF, 0, "{what}");
        assert_eq!(cpu.rip, rip + 3, "{what}");
    }
    // A TSS whose upper half carries a type is not a valid 16-byte descriptor.
    let (mut cpu, mut mem) = lsl_setup();
    mem.map(GDT + 17 * 8, &(1u64 << 40).to_le_bytes());
    cpu.gpr[1] = u64::from(TSS);
    run(&[0x0f, 0x03, 0xc1], &mut cpu, &mut mem);
    assert_eq!(cpu.rflags & rflags::ZF, 0);
}

#[test]
fn lsl_memory_source_faults_and_refusals() {
    // lsl eax, word [rsi]
    let (mut cpu, mut mem) = lsl_setup();
    mem.map(0x5000, &CPUNODE.to_le_bytes());
    cpu.gpr[6] = 0x5000;
    assert_eq!(run(&[0x0f, 0x03, 0x06], &mut cpu, &mut mem), lsl_kind());
    assert_eq!(cpu.gpr[0], 1);
    // An unmapped source is the guest's #PF, state untouched.
    let (mut cpu, mut mem) = lsl_setup();
    cpu.gpr[6] = 0x7000_0000;
    let rip = cpu.rip;
    assert_eq!(
        run(&[0x0f, 0x03, 0x06], &mut cpu, &mut mem),
        Outcome::Exception {
            kind: InstructionKind::Lsl,
            vector: vector::PF,
            error_code: Some(0),
            cr2: Some(0x7000_0000),
            rip,
        }
    );
    // So is an unmapped GDT page.
    let mut cpu = long_cpu();
    cpu.gdtr.base = 0x7000_0000;
    cpu.gpr[1] = u64::from(DATA);
    assert!(matches!(
        run(&[0x0f, 0x03, 0xc1], &mut cpu, &mut FakeMemory::default()),
        Outcome::Exception {
            vector: vector::PF,
            ..
        }
    ));
    // LDT selectors need LDTR, which we are not given.
    let (mut cpu, mut mem) = lsl_setup();
    cpu.gpr[1] = 0x0c;
    assert_eq!(
        run(&[0x0f, 0x03, 0xc1], &mut cpu, &mut mem),
        Outcome::Unsupported
    );
    // Real mode: #UD. A rep prefix: not lsl.
    let (mut cpu, mut mem) = lsl_setup();
    cpu.cr0 = 0;
    cpu.efer = 0;
    cpu.mode = CpuMode::Real;
    assert_eq!(
        run(&[0x0f, 0x03, 0xc1], &mut cpu, &mut mem),
        exception(InstructionKind::Lsl, vector::UD, None, cpu.rip)
    );
    let (mut cpu, mut mem) = lsl_setup();
    assert_eq!(
        run(&[0xf3, 0x0f, 0x03, 0xc1], &mut cpu, &mut mem),
        Outcome::Unsupported
    );
    assert_eq!(describe(&[0x48, 0x0f, 0x03, 0xc0]), "lsl (register source)");
}

// ---- fldcw (the firmware's InitializeFloatingPointUnits: finit; fldcw) ----

// fldcw [rip+0x1234]
const FLDCW_RIP: [u8; 6] = [0xd9, 0x2d, 0x34, 0x12, 0x00, 0x00];

#[test]
fn fldcw_loads_the_control_word() {
    let mut mem = memory_with_gdt();
    let mut cpu = sse_cpu();
    let at = cpu.rip + 6 + 0x1234;
    mem.map(at, &0x027fu16.to_le_bytes());
    cpu.rflags |= rflags::RF;
    let mut expected = cpu.clone();
    assert_eq!(
        run(&FLDCW_RIP, &mut cpu, &mut mem),
        completed(InstructionKind::Fldcw)
    );
    expected.fpu.fcw = 0x027f;
    expected.rip += 6;
    expected.rflags &= !rflags::RF;
    assert_eq!(cpu, expected, "only FCW and RIP change");
    // [rbx] with a page fault.
    let mut cpu = sse_cpu();
    cpu.gpr[3] = 0xdead_0000;
    let rip = cpu.rip;
    assert_eq!(
        run(&[0xd9, 0x2b], &mut cpu, &mut mem),
        page_fault(InstructionKind::Fldcw, 0xdead_0000, 0, rip)
    );
}

#[test]
fn fldcw_raises_nm_with_em_or_ts_and_other_forms_are_refused() {
    let mut mem = memory_with_gdt();
    for cr0 in [CR0_EM, CR0_TS] {
        let mut cpu = sse_cpu();
        cpu.cr0 |= cr0;
        let rip = cpu.rip;
        assert_eq!(
            run(&FLDCW_RIP, &mut cpu, &mut mem),
            exception(InstructionKind::Fldcw, vector::NM, None, rip)
        );
    }
    let mut cpu = sse_cpu();
    // fnstcw (d9 /7), fld st(1) (d9 c1), fninit (db e3, KVM's own): not ours.
    for bytes in [&[0xd9, 0x3b][..], &[0xd9, 0xc1], &[0xdb, 0xe3]] {
        assert_eq!(
            run(bytes, &mut cpu, &mut mem),
            Outcome::Unsupported,
            "{bytes:02x?}"
        );
    }
    // Outside 64-bit mode the memory operand is not decoded.
    let mut cpu = sse_cpu();
    cpu.mode = CpuMode::Protected32;
    assert_eq!(run(&FLDCW_RIP, &mut cpu, &mut mem), Outcome::Unsupported);
    // A lock prefix is #UD.
    let mut cpu = sse_cpu();
    let rip = cpu.rip;
    let mut locked = vec![0xf0];
    locked.extend_from_slice(&FLDCW_RIP);
    assert_eq!(
        run(&locked, &mut cpu, &mut mem),
        exception(InstructionKind::Fldcw, vector::UD, None, rip)
    );
    assert_eq!(describe(&FLDCW_RIP), "fldcw [rip+0x1234]");
}
