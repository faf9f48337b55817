/*
 * Real-mode start-up code for application processors.
 *
 * The ELF loader only places segments at or above 1 MiB, so this code is
 * assembled into the image and copied by rt_smp_install_trampoline() to a
 * page below 1 MiB, whose number is the SIPI vector.  An AP starts here in
 * real mode with CS = page << 8, IP = 0.  It loads the image's GDT (its
 * descriptor is copied along, so it is addressed relative to CS) and jumps
 * into 32-bit code in the image proper.
 */
	.section .rodata
	.code16
	.globl smp_trampoline, smp_trampoline_end
smp_trampoline:
	cli
	mov %cs, %ax
	mov %ax, %ds
	lgdtl (trampoline_gdt_descriptor - smp_trampoline)
	mov %cr0, %eax
	or $1, %eax
	mov %eax, %cr0
	ljmpl $0x08, $rt_ap_start32
	.balign 4
trampoline_gdt_descriptor:
	.word 23
	.long gdt
smp_trampoline_end:
	.code32

	.section .note.GNU-stack, "", @progbits
