/*
 * The benchmark's stub guest: a PVH ELF that writes one line to COM1 and
 * then either leaves through isa-debug-exit (port 0xF4, present in rhyve
 * with -l pc-testdev and in QEMU with -device isa-debug-exit) or, built
 * with -DSPIN, spins so the harness can measure the VMM's memory. Built
 * with -DTOUCH_MIB=N (bench/snapshot.sh) it first fills N MiB from 16 MiB
 * with a non-zero pattern, so every VMM saves the same memory, then writes
 * its line over and over, so a restored guest shows it runs.
 */
	.code32
	.section .text
	.globl	_start
_start:
#ifdef TOUCH_MIB
	mov	$0x1000000, %edi
	mov	$(TOUCH_MIB * 262144), %ecx
	mov	$0x5a5a5a5a, %eax
	cld
	rep stosl
#endif
0:	mov	$message, %esi
1:	movb	(%esi), %al
	test	%al, %al
	jz	2f
	mov	$0x3f8, %dx
	outb	%al, %dx
	inc	%esi
	jmp	1b
2:
#if defined(TOUCH_MIB)
	mov	$100000, %ecx
5:	pause
	loop	5b
	jmp	0b
#elif defined(SPIN)
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
