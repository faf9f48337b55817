/*
 * fwcfgtest: a 4 KiB boot ROM for `-l bootrom,fwcfgtest.rom,fwcfg=qemu`
 * tests. From the reset vector it switches to flat 32-bit protected mode
 * and reads QEMU's fw_cfg as firmware does, printing on COM1:
 *   fwcfg QEMU   the signature (item 0), read with `rep insb` on 0x511
 *   id N         the ID item's low byte (1: I/O interface, no DMA)
 *   file NAME    one line per directory entry (item 0x19), in its order
 *   data TEXT    the contents of the last entry's item, read through the
 *                item number and size the directory gives (at most 255
 *                bytes are read)
 * then powers off through PM1a_CNT (S5).
 */
#define ROM_BASE 0xFFFFF000
#define COM1 0x3F8
#define ABS(x) (ROM_BASE + (x))
#define BUF 0x1000
#define DIR 0x2000
#define MAX_ENTRIES 32
#define ENTRY_SIZE 64
#define DATA 0x4000

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

	/* Signature: select item 0, 4 bytes in one `rep insb`. */
	xorl %eax, %eax
	call select
	movl $BUF, %edi
	movl $4, %ecx
	call read_bytes
	movl $0, BUF + 4
	movl $ABS(msg_fwcfg), %esi
	call puts
	movl $BUF, %esi
	call puts
	call newline

	/* ID: item 1. */
	movl $1, %eax
	call select
	movl $BUF, %edi
	movl $4, %ecx
	call read_bytes
	movl $ABS(msg_id), %esi
	call puts
	movb BUF, %al
	addb $'0', %al
	call putc
	call newline

	/* Directory: a big-endian count, then 64-byte entries. */
	movl $0x19, %eax
	call select
	movl $BUF, %edi
	movl $4, %ecx
	call read_bytes
	movl BUF, %ebx
	bswap %ebx
	cmpl $MAX_ENTRIES, %ebx
	jbe 1f
	movl $MAX_ENTRIES, %ebx
1:	testl %ebx, %ebx
	jz done
	movl %ebx, %ecx
	shll $6, %ecx
	movl $DIR, %edi
	call read_bytes

	/* One line per entry: the name at offset 8. */
	movl $DIR + 8, %ebp
	movl %ebx, %ecx
2:	pushl %ecx
	movl $ABS(msg_file), %esi
	call puts
	movl %ebp, %esi
	call puts
	call newline
	addl $ENTRY_SIZE, %ebp
	popl %ecx
	loop 2b

	/* The last entry's item: big-endian size at 0, item at 4. */
	movl %ebx, %ebp
	decl %ebp
	shll $6, %ebp
	addl $DIR, %ebp
	movzwl 4(%ebp), %eax
	xchgb %al, %ah
	call select
	movl 0(%ebp), %ecx
	bswap %ecx
	cmpl $255, %ecx
	jbe 3f
	movl $255, %ecx
3:	movl $DATA, %edi
	movb $0, (%edi, %ecx)
	call read_bytes
	movl $ABS(msg_data), %esi
	call puts
	movl $DATA, %esi
	call puts
	call newline

done:
	/* S5: SLP_TYP 5, SLP_EN. */
	movw $0x404, %dx
	movw $0x3400, %ax
	outw %ax, %dx
4:	hlt
	jmp 4b

/* Select item %ax (a 16-bit write to 0x510). */
select:
	pushl %edx
	movw $0x510, %dx
	outw %ax, %dx
	popl %edx
	ret

/* %ecx bytes of the selected item to %edi, one `rep insb`. */
read_bytes:
	pushl %edx
	movw $0x511, %dx
	rep insb
	popl %edx
	ret

putc:
	pushl %edx
	movw $COM1, %dx
	outb %al, %dx
	popl %edx
	ret

puts:
	lodsb
	testb %al, %al
	jz 5f
	call putc
	jmp puts
5:	ret

newline:
	movb $'\n', %al
	jmp putc

msg_fwcfg:	.asciz "fwcfg "
msg_id:		.asciz "id "
msg_file:	.asciz "file "
msg_data:	.asciz "data "

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
