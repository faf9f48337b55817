/*
 * fwtest: a 4 KiB boot ROM for `-l bootrom,fwtest.rom,VARS` tests. It starts
 * at the reset vector like real firmware, switches to flat 32-bit protected
 * mode and checks what firmware relies on, printing one line per check on
 * COM1 (a failed check prints a line starting with FAIL):
 *   fwctl BHYV  signature read with `rep insb` on 0x511 (string port I/O)
 *   ncpu N      bhyve's fwctl GET "hw.ncpu"
 *   rom ro      a write to the ROM changes nothing
 *   vars probe  the variable store answers the CFI status probe with 0
 *   vars Z V    a CFI byte write at offset 0x10 reads back, offset 0x11
 *               still holds the file's byte
 *   ones        unclaimed MMIO below 4 GiB (0xF0000000) reads all-ones
 * then powers off through PM1a_CNT (S5). The variable store is expected to
 * be 4 KiB, so it sits at 0xFFFFE000, right below this ROM.
 */
#define ROM_BASE 0xFFFFF000
#define VARS_BASE 0xFFFFE000
#define COM1 0x3F8
#define ABS(x) (ROM_BASE + (x))

	.code16
	.text
	.globl _start
_start:
	cli
	lgdtl %cs:(0xF000 + gdt_ptr)
	movl %cr0, %eax
	orl $1, %eax
	movl %eax, %cr0
	ljmpl $0x08, $ABS(pm32)

	.code32
pm32:
	movw $0x10, %ax
	movw %ax, %ds
	movw %ax, %es
	movw %ax, %ss
	movl $0x8000, %esp
	cld

	/* fwctl signature, 4 bytes in one `rep insb`. */
	movw $0x510, %dx
	xorl %eax, %eax
	outw %ax, %dx
	movl $0x1000, %edi
	movl $4, %ecx
	movw $0x511, %dx
	rep insb
	movl $0, 0x1004
	movl $ABS(msg_fwctl), %esi
	call puts
	movl $0x1000, %esi
	call puts
	call newline

	/* GET "hw.ncpu": size 20, op 3, txid 0xA5, the name in two words. */
	movw $0x510, %dx
	movl $20, %eax
	outl %eax, %dx
	movl $3, %eax
	outl %eax, %dx
	movl $0xA5, %eax
	outl %eax, %dx
	movl $0x6e2e7768, %eax
	outl %eax, %dx
	movl $0x00757063, %eax
	outl %eax, %dx
	movl $7, %ecx
1:	inl %dx, %eax
	loop 1b
	movl %eax, %ebx
	movl $ABS(msg_ncpu), %esi
	call puts
	movb %bl, %al
	addb $'0', %al
	call putc
	call newline

	/* The ROM is read-only. */
	movb $0, ABS(rom_byte)
	cmpb $0xA5, ABS(rom_byte)
	je 2f
	movl $ABS(msg_fail), %esi
	call puts
2:	movl $ABS(msg_rom), %esi
	call puts

	/* CFI status probe (EDK II's QemuFlashDetected). */
	movb $0x50, VARS_BASE
	movb VARS_BASE, %al
	testb %al, %al
	jz 3f
	movl $ABS(msg_fail), %esi
	call puts
3:	movl $ABS(msg_probe), %esi
	call puts

	/* CFI byte write. */
	movb $0x10, VARS_BASE + 0x10
	movb $'Z', VARS_BASE + 0x10
	movl $ABS(msg_vars), %esi
	call puts
	movb VARS_BASE + 0x10, %al
	call putc
	movb $' ', %al
	call putc
	movb VARS_BASE + 0x11, %al
	call putc
	call newline

	/* Unclaimed MMIO. */
	movl 0xF0000000, %eax
	cmpl $0xFFFFFFFF, %eax
	je 4f
	movl $ABS(msg_fail), %esi
	call puts
4:	movl $ABS(msg_ones), %esi
	call puts

	/* S5: SLP_TYP 5, SLP_EN. */
	movw $0x404, %dx
	movw $0x3400, %ax
	outw %ax, %dx
5:	hlt
	jmp 5b

putc:
	pushl %edx
	movw $COM1, %dx
	outb %al, %dx
	popl %edx
	ret

puts:
	lodsb
	testb %al, %al
	jz 6f
	call putc
	jmp puts
6:	ret

newline:
	movb $'\n', %al
	jmp putc

msg_fwctl:	.asciz "fwctl "
msg_ncpu:	.asciz "ncpu "
msg_fail:	.asciz "FAIL "
msg_rom:	.asciz "rom ro\n"
msg_probe:	.asciz "vars probe\n"
msg_vars:	.asciz "vars "
msg_ones:	.asciz "ones\n"
rom_byte:	.byte 0xA5

	.balign 8
gdt:
	.quad 0
	/* Accessed bits set: the CPU would write them into this read-only GDT. */
	.quad 0x00CF9B000000FFFF
	.quad 0x00CF93000000FFFF
gdt_ptr:
	.word gdt_ptr - gdt - 1
	.long ABS(gdt)

	/* The reset vector: CS base 0xFFFF0000, IP 0xFFF0. */
	.code16
	.org 0xFF0
	jmp _start
	.org 0x1000, 0xF4
