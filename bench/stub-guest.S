/*
 * The benchmark's stub guest: a PVH ELF that writes one line to COM1 and
 * then either leaves through isa-debug-exit (port 0xF4, present in rhyve
 * with -l pc-testdev and in QEMU with -device isa-debug-exit) or, built
 * with -DSPIN, spins so the harness can measure the VMM's memory.
 */
	.code32
	.section .text
	.globl	_start
_start:
	mov	$message, %esi
1:	movb	(%esi), %al
	test	%al, %al
	jz	2f
	mov	$0x3f8, %dx
	outb	%al, %dx
	inc	%esi
	jmp	1b
2:
#ifdef SPIN
3:	pause
	jmp	3b
#else
	mov	$0xf4, %dx
	xor	%eax, %eax
	outl	%eax, %dx
4:	cli
	hlt
	jmp	4b
#endif

	.section .rodata
message:
	.asciz	"rhyve-bench: guest up\n"

/* PVH entry point note: XEN_ELFNOTE_PHYS32_ENTRY (18). */
	.section .note.pvh, "a", @note
	.align	4
	.long	4		/* name size */
	.long	4		/* descriptor size */
	.long	18		/* type */
	.asciz	"Xen"
	.long	_start
