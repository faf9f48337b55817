/*
 * ring3: how the guest's user mode enters its kernel, the way a 64-bit
 * Linux guest would.
 *
 * The guest switches to long mode with paging (identity map of the first
 * GiB, Linux's GDT layout: kernel CS 0x10, user CS 0x33, user32 CS 0x23,
 * user DS 0x2b, a 64-bit TSS; STAR, LSTAR, CSTAR and FMASK as Linux sets
 * them) and runs one step at a time in ring 3, each a system-call
 * instruction followed by ud2:
 *
 *   int80-64    int $0x80 from 64-bit code (a DPL-3 interrupt gate)
 *   syscall-64  syscall from 64-bit code (to LSTAR)
 *   int80-32    int $0x80 from 32-bit compatibility-mode code
 *   syscall-32  syscall from 32-bit code (to CSTAR)
 *   sysenter-32 sysenter from 32-bit code (to SYSENTER_EIP), after the
 *               vDSO's `mov %esp, %ebp`
 *   ud2-64      ud2 alone: an exception from user mode, the control case
 *
 * Whatever reaches the kernel side (the int $0x80 gate or an exception)
 * records how it came and sends the CPU to the next step.  The LSTAR,
 * CSTAR and SYSENTER_EIP code first records the CS it runs with; in user
 * mode it then executes ud2, at CPL 0 it returns to user mode as Linux
 * does (sysretq, sysretl) onto the ud2 after the instruction.  Then the
 * guest leaves long mode and prints
 *
 *   ring3 vendor <CPUID leaf 0 vendor>
 *
 * and, per step,
 *
 *   ring3 <step> via <gate 0x80|vector N> at +<offset> from cs 0x<cs> handler cs 0x<cs>
 *
 * (offset: the reported RIP's distance from the step's first byte), then
 *
 *   ring3 lstar cs 0x<cs|none> cstar cs 0x<cs|none> cstar rip <high|low|none>
 *   ring3 sysenter cs 0x<cs|none> sysenter rip <high|low|none>
 *   ring3 done
 *
 * CSTAR and SYSENTER_EIP hold kernel-half addresses (0xffffffff80000000 +
 * the code's address, an alias of the first GiB), as Linux's do: "low"
 * means the host entered with RIP cut to 32 bits (0x80000000 + the code's
 * address, a third alias of the same GiB, so the code still runs there).
 * Which 32-bit door opens follows the vendor, as on hardware: AMD CPUs
 * raise #UD for sysenter in long mode, Intel CPUs for syscall outside
 * 64-bit mode.
 *
 * and powers off (exit 1).  On hardware KVM every system call lands at
 * CPL 0 (handler cs 0x0010, lstar cs 0x0010).  The test prints what this
 * host does; rhyve's full Linux boot on software-virtualization hosts
 * depends on it (see README.md).
 */
#include "rt.h"

#define PTE_P 0x001u
#define PTE_RW 0x002u
#define PTE_US 0x004u
#define PTE_PS 0x080u

#define NSTEPS 6
#define VIA_GATE 0x80u

struct step_record {
	uint64_t vector; /* VIA_GATE for the int $0x80 gate, else the exception */
	uint64_t rip;
	uint64_t cs;
	uint64_t handler_cs;
};

/* Shared with the assembly below (names and layout). */
struct step_record r3_records[NSTEPS];
uint64_t r3_step_rip[NSTEPS];
uint64_t r3_step_cs[NSTEPS];
uint32_t r3_step = 0xffffffffu;
uint32_t r3_lstar_cs = 0xffffffffu;
uint32_t r3_cstar_cs = 0xffffffffu;
uint64_t r3_cstar_rip;
uint32_t r3_sysenter_cs = 0xffffffffu;
uint64_t r3_sysenter_rip;

static uint64_t pml4[512] __attribute__((aligned(4096)));
static uint64_t pdpt[512] __attribute__((aligned(4096)));
static uint64_t pd[512] __attribute__((aligned(4096)));
static uint64_t pdpt_high[512] __attribute__((aligned(4096)));

/* Entered from 32-bit protected mode with CR3 = argument; returns there. */
extern void ring3_run(uint32_t cr3);

/*
 * The long-mode part.  This object is ELF32, which has no relocation for
 * sign-extended 32-bit immediates in 64-bit code: symbols are loaded into
 * 32-bit registers (zero-extended) and used as bases.  All addresses are
 * below 1 GiB.
 */
__asm__(
	"	.data\n"
	"	.balign 16\n"
	"r3_gdt:\n"
	"	.quad 0\n"
	"	.quad 0x00cf9a000000ffff\n" /* 0x08 kernel code, 32-bit */
	"	.quad 0x00af9a000000ffff\n" /* 0x10 kernel code, 64-bit */
	"	.quad 0x00cf92000000ffff\n" /* 0x18 kernel data */
	"	.quad 0x00cffa000000ffff\n" /* 0x23 user code, 32-bit */
	"	.quad 0x00cff2000000ffff\n" /* 0x2b user data */
	"	.quad 0x00affa000000ffff\n" /* 0x33 user code, 64-bit */
	"	.quad 0\n"
	"r3_gdt_tss:\n" /* 0x40: 64-bit TSS, base filled at run time */
	"	.quad 0\n"
	"	.quad 0\n"
	"r3_gdt_end:\n"
	"r3_gdtr:\n"
	"	.word r3_gdt_end - r3_gdt - 1\n"
	"	.long r3_gdt\n"
	"r3_old_gdtr:\n"
	"	.word 0\n"
	"	.long 0\n"
	"r3_old_idtr:\n"
	"	.word 0\n"
	"	.long 0\n"
	"r3_idtr:\n"
	"	.word 256 * 16 - 1\n"
	"	.long r3_idt, 0\n"
	"r3_saved_esp:\n"
	"	.long 0\n"
	"	.balign 16\n"
	"r3_tss:\n"
	"	.long 0\n"
	"	.long r3_kstack_top, 0\n" /* RSP0 */
	"	.fill 88, 1, 0\n"
	"	.word 104\n" /* no I/O bitmap */
	"	.bss\n"
	"	.balign 16\n"
	"	.globl r3_idt\n"
	"r3_idt:\n"
	"	.skip 256 * 16\n"
	"	.balign 16\n"
	"r3_kstack:\n"
	"	.skip 8192\n"
	"r3_kstack_top:\n"
	"r3_ustack:\n"
	"	.skip 8192\n"
	"r3_ustack_top:\n"

	"	.text\n"
	"	.code32\n"
	"	.globl ring3_run\n"
	"ring3_run:\n"
	"	push %ebp\n"
	"	push %ebx\n"
	"	push %esi\n"
	"	push %edi\n"
	"	cli\n"
	"	mov %esp, r3_saved_esp\n"
	"	sgdt r3_old_gdtr\n"
	"	sidt r3_old_idtr\n"
	/* TSS descriptor: limit 103, type 9 (available 64-bit TSS), present. */
	"	mov $r3_tss, %eax\n"
	"	mov %eax, %ecx\n"
	"	shl $16, %ecx\n"
	"	or $103, %ecx\n"
	"	mov %ecx, r3_gdt_tss\n"
	"	mov %eax, %ecx\n"
	"	shr $16, %ecx\n"
	"	and $0xff, %ecx\n"
	"	or $0x8900, %ecx\n"
	"	and $0xff000000, %eax\n"
	"	or %eax, %ecx\n"
	"	mov %ecx, r3_gdt_tss + 4\n"
	"	lgdt r3_gdtr\n"
	"	mov $0x18, %eax\n"
	"	mov %eax, %ds\n"
	"	mov %eax, %es\n"
	"	mov %eax, %ss\n"
	/* System calls as Linux sets them up: kernel CS 0x10, sysret base
	 * 0x23 (user CS 0x33), FMASK = TF DF IF IOPL AC NT. */
	"	mov $0xc0000081, %ecx\n"
	"	xor %eax, %eax\n"
	"	mov $0x00230010, %edx\n"
	"	wrmsr\n"
	"	mov $0xc0000082, %ecx\n"
	"	mov $r3_lstar, %eax\n"
	"	xor %edx, %edx\n"
	"	wrmsr\n"
	/* CSTAR in the kernel half, where Linux's is: the same code through
	 * the alias of the first GiB at 0xffffffff80000000. */
	"	mov $0xc0000083, %ecx\n"
	"	mov $r3_cstar + 0x80000000, %eax\n"
	"	mov $0xffffffff, %edx\n"
	"	wrmsr\n"
	"	xor %edx, %edx\n"
	"	mov $0xc0000084, %ecx\n"
	"	mov $0x47700, %eax\n"
	"	wrmsr\n"
	/* SYSENTER as Linux sets it: CS 0x10, a kernel stack, the entry in
	 * the kernel half (the alias again). */
	"	mov $0x174, %ecx\n"
	"	mov $0x10, %eax\n"
	"	wrmsr\n"
	"	mov $0x175, %ecx\n"
	"	mov $r3_kstack_top + 0x80000000, %eax\n"
	"	mov $0xffffffff, %edx\n"
	"	wrmsr\n"
	"	mov $0x176, %ecx\n"
	"	mov $r3_sysenter + 0x80000000, %eax\n"
	"	wrmsr\n"
	"	xor %edx, %edx\n"
	/* Long mode: PAE, CR3, EFER.LME|SCE, paging. */
	"	mov 20(%esp), %edx\n"
	"	mov %cr4, %eax\n"
	"	or $0x20, %eax\n"
	"	mov %eax, %cr4\n"
	"	mov %edx, %cr3\n"
	"	mov $0xc0000080, %ecx\n"
	"	rdmsr\n"
	"	or $0x101, %eax\n"
	"	wrmsr\n"
	"	mov %cr0, %eax\n"
	"	or $0x80000000, %eax\n"
	"	mov %eax, %cr0\n"
	"	ljmp $0x10, $r3_long\n"

	"	.code64\n"
	"r3_long:\n"
	"	mov $r3_idtr, %eax\n"
	"	lidt (%rax)\n"
	"	mov $0x40, %ax\n"
	"	ltr %ax\n"
	/* Go to the next step in ring 3 (r3_step starts at -1), or leave
	 * after the last. */
	"r3_advance:\n"
	"	mov $r3_kstack_top, %esp\n"
	"	mov $r3_step, %eax\n"
	"	mov (%rax), %ecx\n"
	"	inc %ecx\n"
	"	mov %ecx, (%rax)\n"
	"	cmp $6, %ecx\n"
	"	jae r3_leave\n"
	"	pushq $0x2b\n"
	"	mov $r3_ustack_top, %eax\n"
	"	push %rax\n"
	"	pushq $0x202\n"
	"	mov $r3_step_cs, %edx\n"
	"	pushq (%rdx,%rcx,8)\n"
	"	mov $r3_step_rip, %edx\n"
	"	pushq (%rdx,%rcx,8)\n"
	"	iretq\n"

	/* Record for the current step: vector in %rsi, frame at %rsp. */
	"r3_record:\n"
	"	mov $r3_step, %eax\n"
	"	mov (%rax), %ecx\n"
	"	shl $5, %ecx\n"
	"	mov $r3_records, %edx\n"
	"	add %rcx, %rdx\n"
	"	mov %rsi, 0(%rdx)\n"
	"	mov 0(%rsp), %rax\n"
	"	mov %rax, 8(%rdx)\n"
	"	mov 8(%rsp), %rax\n"
	"	mov %rax, 16(%rdx)\n"
	"	mov %cs, %eax\n"
	"	mov %rax, 24(%rdx)\n"
	"	jmp r3_advance\n"

	"r3_int80:\n"
	"	mov $0x80, %esi\n"
	"	jmp r3_record\n"
	"r3_fault_noerr:\n" /* stack: vector, rip, cs, ... */
	"	pop %rsi\n"
	"	jmp r3_record\n"
	"r3_fault_err:\n" /* stack: vector, error, rip, cs, ... */
	"	pop %rsi\n"
	"	add $8, %rsp\n"
	"	jmp r3_record\n"

	/* LSTAR and CSTAR: record the CS this runs with, then ud2.  The same
	 * bytes mean the same in 64-bit and 32-bit code, so this tells even
	 * where the host jumps here without leaving (compatibility-mode)
	 * user mode; the page is user-accessible. */
	"r3_lstar:\n"
	"	mov %cs, %eax\n"
	"	mov $r3_lstar_cs, %edx\n"
	"	mov %eax, (%rdx)\n"
	"	test $3, %al\n"
	"	jz 1f\n"
	"	ud2\n"
	"1:	sysretq\n"
	"r3_cstar:\n"
	"	mov %cs, %eax\n"
	"	mov $r3_cstar_cs, %edx\n"
	"	mov %eax, (%rdx)\n"
	"	test $3, %al\n"
	"	jz 1f\n"
	"	ud2\n"
	"1:	lea 0(%rip), %rax\n"
	"	mov $r3_cstar_rip, %edx\n"
	"	mov %rax, (%rdx)\n"
	"	sysretl\n"
	/* SYSENTER_EIP: likewise; the user's stack is in EBP and the way back
	 * is right after the sysenter, as Linux's return path sets up. */
	"r3_sysenter:\n"
	"	mov %cs, %eax\n"
	"	mov $r3_sysenter_cs, %edx\n"
	"	mov %eax, (%rdx)\n"
	"	test $3, %al\n"
	"	jz 1f\n"
	"	ud2\n"
	"1:	lea 0(%rip), %rax\n"
	"	mov $r3_sysenter_rip, %edx\n"
	"	mov %rax, (%rdx)\n"
	"	mov $r3_sysenter_32_back, %ecx\n"
	"	mov $0x202, %r11d\n"
	"	mov %ebp, %esp\n"
	"	sysretl\n"

	/* ---- the steps, in ring 3 ---- */
	"	.globl r3_int80_64, r3_syscall_64, r3_ud2_64\n"
	"r3_int80_64:\n"
	"	int $0x80\n"
	"	ud2\n"
	"r3_syscall_64:\n"
	"	syscall\n"
	"	ud2\n"
	"r3_ud2_64:\n"
	"	ud2\n"
	"	.code32\n"
	"	.globl r3_int80_32, r3_syscall_32, r3_sysenter_32\n"
	"r3_int80_32:\n"
	"	int $0x80\n"
	"	ud2\n"
	"r3_syscall_32:\n"
	"	syscall\n"
	"	ud2\n"
	"r3_sysenter_32:\n"
	"	mov %esp, %ebp\n"
	"	sysenter\n"
	"r3_sysenter_32_back:\n"
	"	ud2\n"

	/* ---- back to the 32-bit runtime ---- */
	"	.code64\n"
	"r3_leave:\n"
	"	pushq $0x08\n"
	"	mov $r3_compat, %eax\n"
	"	push %rax\n"
	"	lretq\n"
	"	.code32\n"
	"r3_compat:\n"
	"	mov %cr0, %eax\n"
	"	and $0x7fffffff, %eax\n"
	"	mov %eax, %cr0\n"
	"	mov $0xc0000080, %ecx\n"
	"	rdmsr\n"
	"	and $~0x100, %eax\n"
	"	wrmsr\n"
	"	lgdt r3_old_gdtr\n"
	"	lidt r3_old_idtr\n"
	"	ljmp $0x08, $1f\n"
	"1:	mov $0x10, %eax\n"
	"	mov %eax, %ds\n"
	"	mov %eax, %es\n"
	"	mov %eax, %ss\n"
	"	mov r3_saved_esp, %esp\n"
	"	pop %edi\n"
	"	pop %esi\n"
	"	pop %ebx\n"
	"	pop %ebp\n"
	"	ret\n"

	/* One stub per exception vector 0-31, 16 bytes apart: push the
	 * vector, then the path for vectors with or without an error code. */
	"	.code64\n"
	"	.balign 16\n"
	"	.globl r3_stubs\n"
	"r3_stubs:\n"
	"	.set r3_vec, 0\n"
	"	.rept 32\n"
	"	.balign 16\n"
	"	pushq $r3_vec\n"
	"	.if (0x60227d00 >> r3_vec) & 1\n"
	"	jmp r3_fault_err\n"
	"	.else\n"
	"	jmp r3_fault_noerr\n"
	"	.endif\n"
	"	.set r3_vec, r3_vec + 1\n"
	"	.endr\n"
	"	.globl r3_int80\n"
	"	.code32\n");

extern char r3_stubs[], r3_int80[], r3_idt[];
extern char r3_int80_64[], r3_syscall_64[], r3_int80_32[], r3_syscall_32[], r3_sysenter_32[], r3_ud2_64[];

static const struct {
	const char *name;
	const char *code;
	uint32_t cs;
} steps[NSTEPS] = {
	{ "int80-64", r3_int80_64, 0x33 },     { "syscall-64", r3_syscall_64, 0x33 },
	{ "int80-32", r3_int80_32, 0x23 },     { "syscall-32", r3_syscall_32, 0x23 },
	{ "sysenter-32", r3_sysenter_32, 0x23 }, { "ud2-64", r3_ud2_64, 0x33 },
};

/* A 64-bit interrupt gate to handler in kernel CS 0x10 with the given DPL. */
static void set_gate(uint32_t vector, const void *handler, uint32_t dpl)
{
	uint32_t *gate = (uint32_t *)(r3_idt + vector * 16);
	uint32_t addr = (uint32_t)handler;
	gate[0] = (0x10u << 16) | (addr & 0xffff);
	gate[1] = (addr & 0xffff0000u) | 0x8e00u | (dpl << 13);
	gate[2] = 0;
	gate[3] = 0;
}

static void print_cs(const char *what, uint32_t cs)
{
	if (cs == 0xffffffffu)
		print(" %s cs none", what);
	else
		print(" %s cs 0x%04x", what, cs);
}

/* At CPL 0 the CSTAR and SYSENTER_EIP code notes where it runs: at the
 * kernel-half address the MSR holds, or at the low alias when the host cut
 * RIP to 32 bits. */
static void print_rip(const char *what, uint64_t rip)
{
	if (!rip)
		print(" %s rip none", what);
	else
		print(" %s rip %s", what, rip >> 32 ? "high" : "low");
}

void guest_main(void)
{
	pic_mask_all();
	/* Identity map of the first GiB in 2 MiB pages, user-accessible, so
	 * ring-3 code and data can live in this image. */
	for (uint32_t i = 0; i < 512; i++)
		pd[i] = ((uint64_t)i << 21) | PTE_P | PTE_RW | PTE_US | PTE_PS;
	pdpt[0] = (uint32_t)pd | PTE_P | PTE_RW | PTE_US;
	pml4[0] = (uint32_t)pdpt | PTE_P | PTE_RW | PTE_US;
	/* The same GiB again at 0xffffffff80000000 (PML4 511, PDPT 510), and
	 * at 0x80000000, where a kernel-half RIP cut to 32 bits points. */
	pdpt[2] = (uint32_t)pd | PTE_P | PTE_RW | PTE_US;
	pdpt_high[510] = (uint32_t)pd | PTE_P | PTE_RW | PTE_US;
	pml4[511] = (uint32_t)pdpt_high | PTE_P | PTE_RW | PTE_US;
	for (uint32_t v = 0; v < 32; v++)
		set_gate(v, r3_stubs + v * 16, 0);
	set_gate(0x80, r3_int80, 3);
	for (uint32_t i = 0; i < NSTEPS; i++) {
		r3_step_rip[i] = (uint32_t)steps[i].code;
		r3_step_cs[i] = steps[i].cs;
	}

	ring3_run((uint32_t)pml4);

	{
		uint32_t a, b, c, d;
		char vendor[13];
		__asm__ volatile("cpuid" : "=a"(a), "=b"(b), "=c"(c), "=d"(d) : "a"(0), "c"(0));
		for (int i = 0; i < 4; i++) {
			vendor[i] = (char)(b >> (8 * i));
			vendor[4 + i] = (char)(d >> (8 * i));
			vendor[8 + i] = (char)(c >> (8 * i));
		}
		vendor[12] = 0;
		print("ring3 vendor %s\n", vendor);
	}
	for (uint32_t i = 0; i < NSTEPS; i++) {
		const struct step_record *r = &r3_records[i];
		uint32_t offset = (uint32_t)r->rip - (uint32_t)steps[i].code;
		if (r->vector == VIA_GATE)
			print("ring3 %s via gate 0x80", steps[i].name);
		else
			print("ring3 %s via vector %u", steps[i].name, (uint32_t)r->vector);
		if (offset < 64)
			print(" at +%u", offset);
		else
			print(" at %x", (uint32_t)r->rip);
		print(" from cs 0x%04x handler cs 0x%04x\n", (uint32_t)r->cs, (uint32_t)r->handler_cs);
	}
	print("ring3");
	print_cs("lstar", r3_lstar_cs);
	print_cs("cstar", r3_cstar_cs);
	print_rip("cstar", r3_cstar_rip);
	print("\n");
	print("ring3");
	print_cs("sysenter", r3_sysenter_cs);
	print_rip("sysenter", r3_sysenter_rip);
	print("\n");
	print("ring3 done\n");
}
