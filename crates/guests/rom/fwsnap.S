/*
 * fwsnap: a 4 KiB boot ROM for the snapshot test of `-l bootrom,ROM,VARS`.
 * It leaves fwctl and the variable store part way through, waits, then
 * finishes, so a snapshot taken while it waits must bring both back:
 *   fwctl BH     after a reset, the signature's first two bytes
 *   half         the flash holds a READ_STATUS command; now waiting 5 s
 *                (ACPI PM timer)
 *   fwctl YV     the signature's other two bytes
 *   vars status 0  the flash answers the pending command with status 0
 *                (a lost command reads the file's byte instead)
 *   done
 * then powers off (S5). A failed check prints a line starting with FAIL.
 * The variable store is expected to be 4 KiB, at 0xFFFFE000.
 */
#define ROM_BASE 0xFFFFF000
#define VARS_BASE 0xFFFFE000
#define COM1 0x3F8
#define PM_TIMER 0x408
#define WAIT_TICKS (5 * 3579545)
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

	/* fwctl reset, then two of the signature's four bytes. */
	movw $0x510, %dx
	xorl %eax, %eax
	outw %ax, %dx
	movl $ABS(msg_fwctl), %esi
	call puts
	call fwctl_byte
	call fwctl_byte
	call newline

	/* READ_STATUS: the next read of the flash answers 0. */
	movb $0x70, VARS_BASE
	movl $ABS(msg_half), %esi
	call puts

	/* Wait WAIT_TICKS of the 24-bit PM timer. */
	movw $PM_TIMER, %dx
	inl %dx, %eax
	andl $0xFFFFFF, %eax
	movl %eax, %ebx
	xorl %edi, %edi
1:	inl %dx, %eax
	andl $0xFFFFFF, %eax
	movl %eax, %ecx
	subl %ebx, %ecx
	andl $0xFFFFFF, %ecx
	addl %ecx, %edi
	movl %eax, %ebx
	cmpl $WAIT_TICKS, %edi
	jb 1b

	movl $ABS(msg_fwctl), %esi
	call puts
	call fwctl_byte
	call fwctl_byte
	call newline

	movb VARS_BASE, %al
	testb %al, %al
	jz 2f
	movl $ABS(msg_fail), %esi
	call puts
2:	movl $ABS(msg_vars), %esi
	call puts
	movl $ABS(msg_done), %esi
	call puts
	/* S5: SLP_TYP 5, SLP_EN. */
	movw $0x404, %dx
	movw $0x3400, %ax
	outw %ax, %dx
5:	hlt
	jmp 5b

fwctl_byte:
	pushl %edx
	movw $0x511, %dx
	inb %dx, %al
	popl %edx
	jmp putc

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
msg_half:	.asciz "half\n"
msg_fail:	.asciz "FAIL "
msg_vars:	.asciz "vars status 0\n"
msg_done:	.asciz "done\n"
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
