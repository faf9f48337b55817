/*
 * Entry of every rhyve test guest.
 *
 * The VMM starts us at _start (announced by the PVH ELF note below) in
 * 32-bit flat protected mode, paging off, interrupts off, with EBX holding
 * the physical address of the hvm_start_info structure.  We load our own
 * GDT (the loader's may live in memory we do not own), set up a stack and
 * call rt_entry(start_info) in rt.c.
 */

#define CODE_SEL 0x08
#define DATA_SEL 0x10

	/* XEN_ELFNOTE_PHYS32_ENTRY (18), name "Xen": the PVH entry point. */
	.section .note.pvh, "a", @note
	.balign 4
	.long 4			/* namesz */
	.long 4			/* descsz */
	.long 18		/* type */
	.asciz "Xen"
	.long _start

	.text
	.code32
	.globl _start
_start:
	cli
	cld
	lgdt gdt_descriptor
	ljmp $CODE_SEL, $1f
1:	mov $DATA_SEL, %eax
	mov %eax, %ds
	mov %eax, %es
	mov %eax, %ss
	mov %eax, %fs
	mov %eax, %gs
	mov $boot_stack_top, %esp
	push %ebx
	call rt_entry
2:	cli
	hlt
	jmp 2b

/*
 * Application processors arrive here from the real-mode trampoline
 * (smp.S) with our GDT loaded and protected mode on, but with real-mode
 * segment contents: reload them, take a stack and call rt_ap_entry.
 */
	.globl rt_ap_start32
rt_ap_start32:
	mov $DATA_SEL, %eax
	mov %eax, %ds
	mov %eax, %es
	mov %eax, %ss
	mov %eax, %fs
	mov %eax, %gs
	/* Each AP takes the next stack slot: ap_stacks + (n + 1) * 4096. */
	mov $1, %eax
	lock xadd %eax, rt_ap_stack_next
	inc %eax
	shl $12, %eax
	add $ap_stacks, %eax
	mov %eax, %esp
	call rt_ap_entry
3:	cli
	hlt
	jmp 3b

/*
 * Interrupt entry stubs: 256 of them, ISR_STRIDE bytes apart, each a bare
 * call into isr_common.  The vector is recovered from the return address
 * the call pushed, which keeps every stub identical.
 */
#define ISR_STRIDE 8
	.globl isr_stubs
	.balign ISR_STRIDE
isr_stubs:
	.rept 256
	.balign ISR_STRIDE
	call isr_common
	.endr

isr_common:
	pushal
	cld
	mov 32(%esp), %eax		/* the stub's return address */
	sub $(isr_stubs + 5), %eax
	shr $3, %eax			/* / ISR_STRIDE */
	push %eax
	call isr_dispatch
	add $4, %esp
	popal
	add $4, %esp			/* drop the stub's return address */
	/*
	 * Return without iret: KVM's instruction emulator, which runs all
	 * ring-0 code on this host (PVM), cannot emulate iret outside real
	 * mode.  Same privilege level and code segment, so iret would only
	 * pop EIP, CS and EFLAGS: rearrange the frame [EIP, CS, EFLAGS] into
	 * [-, EFLAGS, EIP], then popf and ret.  An interrupt taken right
	 * after popf nests cleanly on the remaining [EIP].
	 */
	push %eax
	mov 12(%esp), %eax		/* EFLAGS */
	xchg %eax, 4(%esp)		/* EIP out, EFLAGS... */
	mov %eax, 12(%esp)		/* ...EIP where EFLAGS was */
	mov 4(%esp), %eax
	mov %eax, 8(%esp)		/* EFLAGS where CS was */
	pop %eax
	add $4, %esp
	popf
	ret

	.data
	.balign 8
	.globl gdt
gdt:
	.quad 0				/* null */
	.quad 0x00cf9a000000ffff	/* 0x08: code, flat 4 GiB, 32-bit */
	.quad 0x00cf92000000ffff	/* 0x10: data, flat 4 GiB */
gdt_end:
	.globl gdt_descriptor
gdt_descriptor:
	.word gdt_end - gdt - 1
	.long gdt

	.globl rt_ap_stack_next
	.balign 4
rt_ap_stack_next:
	.long 0

	.bss
	.balign 4096
boot_stack:
	.skip 16384
boot_stack_top:
	.globl ap_stacks
ap_stacks:
	.skip 4096 * 16

	.section .note.GNU-stack, "", @progbits
