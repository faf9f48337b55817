/*
 * The /init of rhyve's full Linux boot test: mount /proc, print the kernel
 * release and CPU count, the PCI functions Linux enumerated (the
 * first three hex fields of its /proc/bus/pci/devices, as
 * "pci <bus+devfn> <vendor+device> <irq>"),
 * print "BOOT-OK uptime <contents of /proc/uptime>" and power the machine off
 * (reboot(2) with POWER_OFF: the kernel enters ACPI S5, bhyve exits with
 * status 1).
 *
 * A static x86-64 program without libc, because it must make its system
 * calls in a way that works on software-virtualization hosts (PVM) as well
 * as on hardware.  What such a host does for a guest that is not PVM-aware
 * (shown by the `ring3` guest program, crates/guests/guest/ring3.c, and
 * ../shared/notes/pvm-hosts.md):
 *
 *   - 64-bit `syscall` jumps to LSTAR but stays in user mode, so the kernel
 *     takes a page fault on its own entry point and kills the process
 *     (every libc program dies on its first system call);
 *   - `int $0x80` from user mode raises #UD;
 *   - from 32-bit (compatibility-mode) code, the door that works follows
 *     the CPU vendor, as on hardware: on AMD `syscall` reaches CSTAR at
 *     CPL 0 but with RIP cut to its low 32 bits (KVM's emulator writes RIP
 *     back in the width of the mode the instruction started in) and
 *     `sysenter` raises #UD; on Intel `sysenter` reaches SYSENTER_EIP
 *     correctly and `syscall` raises #UD;
 *   - the kernel's `sysretl` comes back with the 64-bit user code segment
 *     instead of the 32-bit one.
 *
 * So every system call here is an ia32 one made from a compatibility-mode
 * stub, through the door the CPU vendor opens (CPUID leaf 0, read once at
 * start): `syscall` on AMD and Hygon (Linux's 32-bit SYSCALL ABI: EAX
 * number, EBX, EBP, EDX, ESI, EDI arguments; ECX is the return address),
 * `sysenter` elsewhere (EAX number, EBX, ECX, EDX, ESI, EDI arguments, EBP
 * the user stack pointer, where the kernel reads the sixth argument).
 * These are the doors hardware opens too, so the same choice works on
 * hardware KVM.  Linux returns from either to the 32-bit vDSO's int80
 * landing pad; with the 64-bit vDSO off (`vdso=0`) this process has no
 * vDSO and that address is the landing pad's small offset, inside the
 * page this program maps at address 0.  That page is a landing sled that
 * works whichever mode the CPU comes back in: in 64-bit mode it returns to
 * the caller, in 32-bit mode (hardware KVM, or a kernel returning through
 * IRET) it far-jumps to 64-bit code first.  Everything the kernel reads or
 * writes, and the stack, lies below 4 GiB, as the ia32 ABI needs.
 *
 * For the cut CSTAR of the `syscall` door, this program maps the 16 MiB at
 * 0x81000000 (the low halves of the kernel text addresses, which without
 * KASLR start at 0xffffffff81000000) with 16-byte stubs that sign-extend
 * their own address and jump there: to the kernel's entry_SYSCALL_compat,
 * which Linux aligns to 16 bytes.  R9 is free at that point (the compat
 * entry code neither reads nor returns R8-R15).  The kernel runs the stub
 * from a user page, so the guest needs `clearcpuid=smep,smap`.  The build
 * maps one 256 KiB block of stubs 64 times (build.rs adds the program
 * headers: Linux reads at most a page of them).
 *
 * `init --selftest` (run on the host by the test suite) checks the stub
 * blocks are mapped and drives the landing sled in both modes; then, for
 * each door, it makes system calls through the same marshalling code with
 * the door's instruction replaced by `ud2`, and a SIGILL handler plays the
 * kernel: it checks the registers as Linux's entry code reads them for
 * that door and returns to the landing sled in 64-bit or 32-bit mode, as
 * the kernel's return would.
 */

typedef unsigned long u64;
typedef unsigned int u32;

#define USER_CS64 0x33
#define USER_CS32 0x23
#define SLED_SIZE 4096

/* ia32 system call numbers (arch/x86/entry/syscalls/syscall_32.tbl). */
#define NR32_EXIT 1
#define NR32_READ 3
#define NR32_WRITE 4
#define NR32_OPEN 5
#define NR32_CLOSE 6
#define NR32_MOUNT 21
#define NR32_MKDIR 39
#define NR32_REBOOT 88
#define NR32_UNAME 122
#define NR32_LSEEK 19
#define NR32_IOCTL 54
#define NR32_FSYNC 118
#define NR32_NANOSLEEP 162
#define NR32_POLL 168
#define NR32_FINIT_MODULE 350
#define NR32_SOCKET 359
#define NR32_CONNECT 362

#define LINUX_REBOOT_MAGIC1 0xfee1deadu
#define LINUX_REBOOT_MAGIC2 672274793u
#define LINUX_REBOOT_CMD_POWER_OFF 0x4321fedcu

/* Where build.rs maps the stub block again and again (see above). */
#define CSTAR_STUBS_BASE 0x81000000ul
#define CSTAR_STUBS_SIZE (16ul << 20)

long sys32(u32 nr, u32 a1, u32 a2, u32 a3, u32 a4, u32 a5);
extern const unsigned char cstar_stubs[];
extern const unsigned char sys32_back[];
extern const unsigned char door_syscall[], door_sysenter[], door_syscall_ud2[], door_sysenter_ud2[];
void sled_selftest_64(u64 entry);
void sled_selftest_32(u64 entry);
long host_syscall(u64 nr, u64 a1, u64 a2, u64 a3, u64 a4);
void host_sigreturn(void);

/* The compatibility-mode stub sys32 enters: one of the doors above. */
u64 sys32_door;

__asm__(
	/* The landing sled at address 0: NOPs, then a tail that tells the
	 * modes apart.  `31 c9` clears ECX in both; `41` is INC ECX in 32-bit
	 * code and an (ignored) REX prefix on CLC in 64-bit code; `e3 07` is
	 * JECXZ/JRCXZ over the 32-bit far jump to the final RET. */
	"	.section .landing, \"ax\"\n"
	"	.globl sled_ret\n"
	"	.fill 4096 - 14, 1, 0x90\n"
	"	.byte 0x31, 0xc9\n"
	"	.byte 0x41, 0xf8\n"
	"	.byte 0xe3, 0x07\n"
	"	.byte 0xea\n"
	"	.long sled_ret\n"
	"	.word 0x33\n"
	"sled_ret:\n"
	"	ret\n"

	/* 16384 stubs of 16 bytes: lea -7(%rip) is the stub's own address. */
	"	.section .cstar_stubs, \"ax\"\n"
	"	.globl cstar_stubs\n"
	"cstar_stubs:\n"
	"	.rept 16384\n"
	"	lea -7(%rip), %r9\n"
	"	movslq %r9d, %r9\n"
	"	jmp *%r9\n"
	"	nop; nop; nop\n"
	"	.endr\n"

	"	.text\n"
	"	.code64\n"
	"	.globl _start\n"
	"_start:\n"
	"	mov (%rsp), %rdi\n" /* argc */
	"	lea 8(%rsp), %rsi\n" /* argv */
	"	mov $low_stack_top, %esp\n"
	"	call main\n"
	"	mov %eax, %edi\n"
	"	mov $60, %eax\n" /* exit (only reached in --selftest on the host) */
	"	syscall\n"
	"	ud2\n"

	/* long sys32(nr, a1..a5): callee-saved registers and RSP kept in
	 * memory (the kernel does not restore R8-R15 on this path).  The
	 * second argument goes in both ECX (the sysenter door) and EBP (the
	 * syscall door, whose ECX the CPU overwrites); the door stub the
	 * far return lands on is `sys32_door`. */
	"	.globl sys32\n"
	"sys32:\n"
	"	mov %rbx, saved_regs + 0\n"
	"	mov %rbp, saved_regs + 8\n"
	"	mov %r12, saved_regs + 16\n"
	"	mov %r13, saved_regs + 24\n"
	"	mov %r14, saved_regs + 32\n"
	"	mov %r15, saved_regs + 40\n"
	"	mov %rsp, saved_regs + 48\n"
	"	mov %edi, %eax\n"
	"	mov %esi, %ebx\n"
	"	mov %edx, %ebp\n"
	"	mov %ecx, %r10d\n"
	"	mov %edx, %ecx\n"
	"	mov %r10d, %edx\n"
	"	mov %r8d, %esi\n"
	"	mov %r9d, %edi\n"
	"	pushq $sys32_back\n" /* for the sled's RET */
	"	pushq $0x23\n"
	"	pushq sys32_door\n"
	"	lretq\n"
	/* The doors, in compatibility mode; [ESP] is the low half of
	 * sys32_back, which the kernel reads as the (unused) sixth argument,
	 * and where the landing sled's RET finds its way back. */
	"	.code32\n"
	"	.globl door_syscall, door_sysenter, door_syscall_ud2, door_sysenter_ud2\n"
	"door_syscall:\n"
	"	syscall\n"
	"	ud2\n"
	"door_sysenter:\n"
	"	mov %esp, %ebp\n"
	"	sysenter\n"
	"	ud2\n"
	/* The same with the door's instruction replaced, for --selftest. */
	"door_syscall_ud2:\n"
	"	ud2\n"
	"door_sysenter_ud2:\n"
	"	mov %esp, %ebp\n"
	"	ud2\n"
	"	.code64\n"
	"	.globl sys32_back\n"
	"sys32_back:\n"
	"	mov saved_regs + 0, %rbx\n"
	"	mov saved_regs + 8, %rbp\n"
	"	mov saved_regs + 16, %r12\n"
	"	mov saved_regs + 24, %r13\n"
	"	mov saved_regs + 32, %r14\n"
	"	mov saved_regs + 40, %r15\n"
	"	mov saved_regs + 48, %rsp\n"
	"	cltq\n"
	"	ret\n"

	/* long host_syscall(nr, a1, a2, a3, a4): a 64-bit system call, for
	 * --selftest on the host only. */
	"	.globl host_syscall\n"
	"host_syscall:\n"
	"	mov %rdi, %rax\n"
	"	mov %rsi, %rdi\n"
	"	mov %rdx, %rsi\n"
	"	mov %rcx, %rdx\n"
	"	mov %r8, %r10\n"
	"	syscall\n"
	"	ret\n"
	"	.globl host_sigreturn\n"
	"host_sigreturn:\n"
	"	mov $15, %eax\n"
	"	syscall\n"
	"	ud2\n"

	/* Enter the sled at `entry` in 64-bit mode, as a buggy sysretl does. */
	"	.globl sled_selftest_64\n"
	"sled_selftest_64:\n"
	"	pushq $1f\n"
	"	jmp *%rdi\n"
	"1:	ret\n"
	/* ... and in 32-bit mode, as sysretl does on hardware. */
	"	.globl sled_selftest_32\n"
	"sled_selftest_32:\n"
	"	pushq $2f\n"
	"	pushq $0x23\n"
	"	push %rdi\n"
	"	lretq\n"
	"2:	ret\n"

	"	.bss\n"
	"	.balign 16\n"
	"saved_regs:\n"
	"	.skip 64\n"
	"low_stack:\n"
	"	.skip 65536\n"
	"low_stack_top:\n"
	"	.text\n");

static char buf[65536];
static char line[512];

static u32 str_len(const char *s)
{
	u32 n = 0;
	while (s[n])
		n++;
	return n;
}

static void put(const char *s)
{
	sys32(NR32_WRITE, 1, (u32)(u64)s, str_len(s), 0, 0);
}

static char *append(char *at, const char *s)
{
	while (*s)
		*at++ = *s++;
	*at = 0;
	return at;
}

static char *append_u32(char *at, u32 v)
{
	char digits[12];
	int n = 0;
	do {
		digits[n++] = (char)('0' + v % 10);
		v /= 10;
	} while (v);
	while (n)
		*at++ = digits[--n];
	*at = 0;
	return at;
}

static void fail(const char *what, long err)
{
	char *at = append(line, "init: ");
	at = append(at, what);
	at = append(at, " failed: errno ");
	at = append_u32(at, (u32)-err);
	append(at, "\n");
	put(line);
	sys32(NR32_EXIT, 1, 0, 0, 0, 0);
}

/* The whole file into buf (NUL-terminated); its length. */
static u32 read_file(const char *path)
{
	long fd = sys32(NR32_OPEN, (u32)(u64)path, 0, 0, 0, 0);
	u32 len = 0;
	if (fd < 0)
		fail(path, fd);
	for (;;) {
		long n = sys32(NR32_READ, (u32)fd, (u32)(u64)(buf + len), sizeof(buf) - 1 - len, 0, 0);
		if (n < 0)
			fail(path, n);
		if (n == 0 || len + (u64)n >= sizeof(buf) - 1) {
			len += (u32)n;
			break;
		}
		len += (u32)n;
	}
	buf[len] = 0;
	sys32(NR32_CLOSE, (u32)fd, 0, 0, 0, 0);
	return len;
}

static int str_eq(const char *a, const char *b)
{
	while (*a && *a == *b)
		a++, b++;
	return *a == *b;
}

/* The next whitespace-separated field of a /proc table, copied to out. */
static const char *next_field(const char *p, char *out, u32 size)
{
	u32 n = 0;
	while (*p == ' ' || *p == '\t')
		p++;
	while (*p && *p != ' ' && *p != '\t' && *p != '\n') {
		if (n + 1 < size)
			out[n++] = *p;
		p++;
	}
	out[n] = 0;
	return p;
}

static const char *next_line(const char *p)
{
	while (*p && *p != '\n')
		p++;
	return *p ? p + 1 : p;
}

/* "pci <bus+devfn> <vendor+device> <irq>" per function, in hex as Linux
 * lists them. */
static void print_pci_functions(void)
{
	char devfn[16], ids[16], irq[16];
	read_file("/proc/bus/pci/devices");
	for (const char *p = buf; *p; p = next_line(p)) {
		const char *q = next_field(p, devfn, sizeof(devfn));
		q = next_field(q, ids, sizeof(ids));
		next_field(q, irq, sizeof(irq));
		char *at = append(line, "pci ");
		at = append(at, devfn);
		at = append(at, " ");
		at = append(at, ids);
		at = append(at, " ");
		at = append(at, irq);
		append(at, "\n");
		put(line);
	}
}


/* ---- Linux's own drivers on rhyve's devices (when the initramfs holds
 * /modules: scripts/build-initramfs.sh --modules) ----
 *
 * /modules/order lists the module files in load order (dependencies
 * first, resolved on the host).  Each device's check prints "dev <name>:
 * ..." lines that scripts/full-boot.sh compares with what the host saw;
 * a failed step prints "dev <name>: FAIL ..." and the others go on. */

#define O_RDONLY 0
#define O_WRONLY 1
#define O_RDWR 2
#define EEXIST 17
#define POLLIN 1

static char *append_hex(char *at, u64 v, int digits)
{
	for (int i = digits - 1; i >= 0; i--)
		*at++ = "0123456789abcdef"[(v >> (4 * i)) & 15];
	*at = 0;
	return at;
}

static void report(const char *dev, const char *what, long err)
{
	char *at = append(line, "dev ");
	at = append(at, dev);
	at = append(at, ": ");
	if (err < 0)
		at = append(at, "FAIL ");
	at = append(at, what);
	if (err < 0) {
		at = append(at, " errno ");
		at = append_u32(at, (u32)-err);
	}
	append(at, "\n");
	put(line);
}

/* Where the checks compose what they report (report() writes line). */
static char msg[256];

static u64 fnv1a64(u64 h, const unsigned char *p, u32 n)
{
	for (u32 i = 0; i < n; i++)
		h = (h ^ p[i]) * 0x100000001b3ul;
	return h;
}
#define FNV_START 0xcbf29ce484222325ul

static long wait_readable(long fd, u32 timeout_ms)
{
	struct {
		int fd;
		short events, revents;
	} pfd = { (int)fd, POLLIN, 0 };
	return sys32(NR32_POLL, (u32)(u64)&pfd, 1, timeout_ms, 0, 0);
}

static void sleep_ms(u32 ms)
{
	struct {
		u32 sec, nsec;
	} ts = { ms / 1000, ms % 1000 * 1000000 };
	sys32(NR32_NANOSLEEP, (u32)(u64)&ts, 0, 0, 0, 0);
}

static void load_modules(void)
{
	char name[128];
	static char order[4096];
	u32 len = read_file("/modules/order");
	if (len >= sizeof(order))
		len = sizeof(order) - 1;
	for (u32 i = 0; i <= len; i++)
		order[i] = buf[i];
	for (const char *p = order; *p; p = next_line(p)) {
		char *at = append(name, "/modules/");
		next_field(p, at, (u32)(sizeof(name) - (u32)(at - name)));
		long fd = sys32(NR32_OPEN, (u32)(u64)name, O_RDONLY, 0, 0, 0);
		long err = fd < 0 ? fd : sys32(NR32_FINIT_MODULE, (u32)fd, (u32)(u64) "", 0, 0, 0);
		if (fd >= 0)
			sys32(NR32_CLOSE, (u32)fd, 0, 0, 0, 0);
		if (err == -EEXIST)
			err = 0;
		report("modules", name + 9, err);
	}
}

/* The first MiB of the disk at DEVPATH read and summed; 64 KiB of a
 * pattern (131i+7, or 137i+11 with OTHER) written after it and synced. */
static void check_disk(const char *dev, const char *devpath, const char *name, int other)
{
	static unsigned char chunk[65536];
	char *at;
	u64 sum = FNV_START;
	long fd = sys32(NR32_OPEN, (u32)(u64)devpath, O_RDWR, 0, 0, 0), n = 0;
	if (fd < 0) {
		at = append(msg, "open ");
		append(at, devpath);
		report(dev, msg, fd);
		return;
	}
	for (u32 done = 0; done < (1u << 20); done += (u32)n) {
		n = sys32(NR32_READ, (u32)fd, (u32)(u64)chunk, sizeof(chunk), 0, 0);
		if (n <= 0) {
			at = append(msg, "read ");
			append(at, devpath);
			report(dev, msg, n < 0 ? n : -5);
			sys32(NR32_CLOSE, (u32)fd, 0, 0, 0, 0);
			return;
		}
		sum = fnv1a64(sum, chunk, (u32)n);
	}
	at = append(msg, name);
	at = append(at, " read 1048576 bytes fnv1a64 ");
	append_hex(at, sum, 16);
	report(dev, msg, 0);
	for (u32 i = 0; i < sizeof(chunk); i++)
		chunk[i] = other ? (unsigned char)(i * 137 + 11) : (unsigned char)(i * 131 + 7);
	n = sys32(NR32_LSEEK, (u32)fd, 1u << 20, 0, 0, 0);
	if (n >= 0)
		n = sys32(NR32_WRITE, (u32)fd, (u32)(u64)chunk, sizeof(chunk), 0, 0);
	if (n >= 0)
		n = sys32(NR32_FSYNC, (u32)fd, 0, 0, 0, 0);
	at = append(msg, name);
	append(at, other ? " wrote 65536 bytes of pattern 137i+11 at 1048576 and synced"
			 : " wrote 65536 bytes of pattern 131i+7 at 1048576 and synced");
	report(dev, msg, n);
	sys32(NR32_CLOSE, (u32)fd, 0, 0, 0, 0);
}

/* vda through check_disk; vdb (read-only) refuses a write. */
static void check_virtio_blk(void)
{
	static unsigned char chunk[512];
	char *at;
	u32 len;
	long fd, n;
	check_disk("virtio-blk", "/dev/vda", "vda", 0);

	/* Linux opens a read-only disk for writing but refuses the write
	 * (EPERM); its ro flag comes from the device's VIRTIO_BLK_F_RO. */
	len = read_file("/sys/block/vdb/ro");
	at = append(msg, "vdb ro flag ");
	append(at, len && buf[0] == '1' ? "1" : "0");
	report("virtio-blk", msg, 0);
	fd = sys32(NR32_OPEN, (u32)(u64) "/dev/vdb", O_RDWR, 0, 0, 0);
	n = fd < 0 ? fd : sys32(NR32_WRITE, (u32)fd, (u32)(u64)chunk, 512, 0, 0);
	if (fd >= 0)
		sys32(NR32_CLOSE, (u32)fd, 0, 0, 0, 0);
	if (n >= 0) {
		report("virtio-blk", "vdb (ro) took a write", -1);
	} else {
		at = append(msg, "vdb (ro) refused a write: errno ");
		append_u32(at, (u32)-n);
		report("virtio-blk", msg, 0);
	}
}

/* ---- bhyve's NVMe controller through Linux's nvme driver (built into the
 * cloud kernel; a module elsewhere, then loaded with the others) ----
 * The driver probes the controller asynchronously, so wait for the
 * namespace's node; then the identity Linux read, the first MiB summed,
 * 64 KiB of a pattern written at 1 MiB and synced, and the next 64 KiB
 * discarded (Dataset Management), which the host finds as zeroes. */
#define BLKDISCARD 0x1277u

/* The first line of a sysfs file without its trailing blanks (the NVMe
 * identify strings are space padded), or "?". */
static const char *sysfs_line(const char *path)
{
	u32 len = read_file(path);
	for (u32 i = 0; i < len; i++)
		if (buf[i] == '\n')
			len = i;
	while (len && buf[len - 1] == ' ')
		len--;
	buf[len] = 0;
	return len ? buf : "?";
}

static void check_nvme(void)
{
	static unsigned char chunk[65536];
	static u64 range[2] = { (1u << 20) + 65536, 65536 };
	char *at;
	u64 sum = FNV_START;
	long fd = -2, n = 0;
	for (u32 waited = 0; waited < 120000; waited += 200) {
		fd = sys32(NR32_OPEN, (u32)(u64) "/dev/nvme0n1", O_RDWR, 0, 0, 0);
		if (fd >= 0)
			break;
		sleep_ms(200);
	}
	if (fd < 0) {
		report("nvme", "open /dev/nvme0n1", fd);
		return;
	}
	at = append(msg, "nvme0 model ");
	at = append(at, sysfs_line("/sys/class/nvme/nvme0/model"));
	at = append(at, " serial ");
	append(at, sysfs_line("/sys/class/nvme/nvme0/serial"));
	report("nvme", msg, 0);
	for (u32 done = 0; done < (1u << 20); done += (u32)n) {
		n = sys32(NR32_READ, (u32)fd, (u32)(u64)chunk, sizeof(chunk), 0, 0);
		if (n <= 0) {
			report("nvme", "read /dev/nvme0n1", n < 0 ? n : -5);
			sys32(NR32_CLOSE, (u32)fd, 0, 0, 0, 0);
			return;
		}
		sum = fnv1a64(sum, chunk, (u32)n);
	}
	at = append(msg, "nvme0n1 read 1048576 bytes fnv1a64 ");
	append_hex(at, sum, 16);
	report("nvme", msg, 0);
	for (u32 i = 0; i < sizeof(chunk); i++)
		chunk[i] = (unsigned char)(i * 61 + 3);
	n = sys32(NR32_LSEEK, (u32)fd, 1u << 20, 0, 0, 0);
	if (n >= 0)
		n = sys32(NR32_WRITE, (u32)fd, (u32)(u64)chunk, sizeof(chunk), 0, 0);
	if (n >= 0)
		n = sys32(NR32_FSYNC, (u32)fd, 0, 0, 0, 0);
	report("nvme", "nvme0n1 wrote 65536 bytes of pattern 61i+3 at 1048576 and synced", n);
	n = sys32(NR32_IOCTL, (u32)fd, BLKDISCARD, (u32)(u64)range, 0, 0);
	report("nvme", "nvme0n1 discarded 65536 bytes at 1114112", n);
	sys32(NR32_CLOSE, (u32)fd, 0, 0, 0, 0);
}

static void check_virtio_rnd(void)
{
	unsigned char bytes[32];
	char *at;
	u32 len = read_file("/sys/class/misc/hw_random/rng_current");
	long fd, n;
	while (len && (buf[len - 1] == '\n'))
		buf[--len] = 0;
	at = append(msg, "hwrng current ");
	append(at, buf);
	report("virtio-rnd", msg, 0);
	fd = sys32(NR32_OPEN, (u32)(u64) "/dev/hwrng", O_RDONLY, 0, 0, 0);
	n = fd < 0 ? fd : sys32(NR32_READ, (u32)fd, (u32)(u64)bytes, sizeof(bytes), 0, 0);
	if (fd >= 0)
		sys32(NR32_CLOSE, (u32)fd, 0, 0, 0, 0);
	if (n < 0) {
		report("virtio-rnd", "read /dev/hwrng", n);
		return;
	}
	at = append(msg, "read ");
	at = append_u32(at, (u32)n);
	at = append(at, " bytes from /dev/hwrng: ");
	for (long i = 0; i < n; i++)
		at = append_hex(at, bytes[i], 2);
	report("virtio-rnd", msg, 0);
}

/* The port the host named "port1": one line to the host, one line back. */
static void check_virtio_console(void)
{
	char path[64], name[32];
	long fd = -2, n;
	for (u32 dev = 0; dev < 4 && fd < 0; dev++)
		for (u32 port = 0; port < 4 && fd < 0; port++) {
			char *at = append(path, "/sys/class/virtio-ports/vport");
			at = append_u32(at, dev);
			at = append(at, "p");
			at = append_u32(at, port);
			append(at, "/name");
			long nfd = sys32(NR32_OPEN, (u32)(u64)path, O_RDONLY, 0, 0, 0);
			if (nfd < 0)
				continue;
			n = sys32(NR32_READ, (u32)nfd, (u32)(u64)name, sizeof(name) - 1, 0, 0);
			sys32(NR32_CLOSE, (u32)nfd, 0, 0, 0, 0);
			name[n > 0 ? n : 0] = 0;
			if (!str_eq(name, "port1\n"))
				continue;
			at = append(path, "/dev/vport");
			at = append_u32(at, dev);
			at = append(at, "p");
			append_u32(at, port);
			fd = sys32(NR32_OPEN, (u32)(u64)path, O_RDWR, 0, 0, 0);
		}
	if (fd < 0) {
		report("virtio-console", "no port named port1", fd == -2 ? -2 : fd);
		return;
	}
	n = sys32(NR32_WRITE, (u32)fd, (u32)(u64) "guest to host over port1\n", 25, 0, 0);
	report("virtio-console", "wrote a line to port1", n < 0 ? n : 0);
	n = wait_readable(fd, 120000);
	if (n > 0)
		n = sys32(NR32_READ, (u32)fd, (u32)(u64)buf, 200, 0, 0);
	if (n <= 0) {
		report("virtio-console", "read from port1", n < 0 ? n : -110);
	} else {
		char *at = append(msg, "read from port1: ");
		for (long i = 0; i < n && buf[i] != '\n'; i++)
			*at++ = buf[i];
		*at = 0;
		report("virtio-console", msg, 0);
	}
	sys32(NR32_CLOSE, (u32)fd, 0, 0, 0, 0);
}

#define AF_INET 2
#define SOCK_STREAM 1
#define SOCK_DGRAM 2
#define SOCK_RAW 3
#define IPPROTO_ICMP 1
#define SIOCSIFFLAGS 0x8914
#define SIOCSIFADDR 0x8916
#define SIOCSIFNETMASK 0x891c
#define IFF_UP 1

struct sockaddr_in4 {
	unsigned short family, port;
	u32 addr;
	unsigned char zero[8];
};

static u32 ip4(u32 a, u32 b, u32 c, u32 d) { return a | b << 8 | c << 16 | d << 24; }

static long set_ifaddr(long sock, const char *ifname, u32 request, u32 addr)
{
	struct {
		char name[16];
		struct sockaddr_in4 sa;
	} ifr = { { 0 }, { AF_INET, 0, addr, { 0 } } };
	for (int i = 0; ifname[i] && i < 15; i++)
		ifr.name[i] = ifname[i];
	return sys32(NR32_IOCTL, (u32)sock, request, (u32)(u64)&ifr, 0, 0);
}

static long interface_up(long sock, const char *ifname)
{
	struct {
		char name[16];
		short flags;
		char pad[14];
	} ifr = { { 0 }, IFF_UP, { 0 } };
	for (int i = 0; ifname[i] && i < 15; i++)
		ifr.name[i] = ifname[i];
	return sys32(NR32_IOCTL, (u32)sock, SIOCSIFFLAGS, (u32)(u64)&ifr, 0, 0);
}

static unsigned short inet_checksum(const unsigned char *p, u32 n)
{
	u32 sum = 0;
	for (u32 i = 0; i + 1 < n; i += 2)
		sum += (u32)p[i] | (u32)p[i + 1] << 8;
	if (n & 1)
		sum += p[n - 1];
	while (sum >> 16)
		sum = (sum & 0xffff) + (sum >> 16);
	return (unsigned short)~sum;
}

/* "10.99.NET.HOST" */
static char *append_ip(char *at, u32 net, u32 host)
{
	at = append(at, "10.99.");
	at = append_u32(at, net);
	at = append(at, ".");
	return append_u32(at, host);
}

/* IFNAME (the NIC DEV names) at 10.99.NET.2/24; an ICMP echo to the host
 * (10.99.NET.1) and its reply; then a TCP connection to the host's port
 * 5555: 256 KiB of a pattern each way, both summed. */
static void check_net(const char *dev, const char *ifname, u32 net)
{
	char what[64];
	static unsigned char data[65536];
	struct sockaddr_in4 host = { AF_INET, (unsigned short)(5555 >> 8 | (5555 & 0xff) << 8), ip4(10, 99, net, 1), { 0 } };
	long sock = sys32(NR32_SOCKET, AF_INET, SOCK_DGRAM, 0, 0, 0), err;
	char *at;
	u64 sum;
	if (sock < 0) {
		report(dev, "socket", sock);
		return;
	}
	err = set_ifaddr(sock, ifname, SIOCSIFADDR, ip4(10, 99, net, 2));
	if (err >= 0)
		err = set_ifaddr(sock, ifname, SIOCSIFNETMASK, ip4(255, 255, 255, 0));
	if (err >= 0)
		err = interface_up(sock, ifname);
	sys32(NR32_CLOSE, (u32)sock, 0, 0, 0, 0);
	at = append(what, ifname);
	at = append(at, " ");
	at = append_ip(at, net, 2);
	append(at, "/24 up");
	report(dev, what, err);
	if (err < 0)
		return;

	/* Ping the host, retrying while its side of the link comes up. */
	sock = sys32(NR32_SOCKET, AF_INET, SOCK_RAW, IPPROTO_ICMP, 0, 0);
	err = sock;
	/* connect + write + read: sendto and recvfrom take six arguments,
	 * and sys32 passes five. */
	if (sock >= 0) {
		struct sockaddr_in4 to = { AF_INET, 0, ip4(10, 99, net, 1), { 0 } };
		err = sys32(NR32_CONNECT, (u32)sock, (u32)(u64)&to, sizeof(to), 0, 0);
	}
	for (u32 attempt = 0; err >= 0 && attempt < 30; attempt++) {
		unsigned char echo[64] = { 8, 0, 0, 0, 0x72, 0x68, 0, (unsigned char)attempt };
		unsigned short c;
		long n;
		for (u32 i = 8; i < sizeof(echo); i++)
			echo[i] = (unsigned char)i;
		c = inet_checksum(echo, sizeof(echo));
		echo[2] = (unsigned char)c;
		echo[3] = (unsigned char)(c >> 8);
		n = sys32(NR32_WRITE, (u32)sock, (u32)(u64)echo, sizeof(echo), 0, 0);
		if (n >= 0 && wait_readable(sock, 1000) > 0) {
			unsigned char reply[128];
			n = sys32(NR32_READ, (u32)sock, (u32)(u64)reply, sizeof(reply), 0, 0);
			u32 ihl = n > 0 ? (u32)(reply[0] & 15) * 4 : 0;
			if (n >= (long)(ihl + 8) && reply[ihl] == 0 && reply[ihl + 4] == 0x72) {
				err = 1;
				break;
			}
		}
	}
	if (err == 0)
		err = -110;
	if (sock >= 0)
		sys32(NR32_CLOSE, (u32)sock, 0, 0, 0, 0);
	at = append(what, "ping ");
	at = append_ip(at, net, 1);
	append(at, ": echo reply");
	report(dev, what, err);

	sock = sys32(NR32_SOCKET, AF_INET, SOCK_STREAM, 0, 0, 0);
	err = sock < 0 ? sock : sys32(NR32_CONNECT, (u32)sock, (u32)(u64)&host, sizeof(host), 0, 0);
	if (err < 0) {
		at = append(what, "connect to ");
	at = append_ip(at, net, 1);
	append(at, ":5555");
	report(dev, what, err);
		if (sock >= 0)
			sys32(NR32_CLOSE, (u32)sock, 0, 0, 0, 0);
		return;
	}
	sum = FNV_START;
	for (u32 i = 0; i < sizeof(data); i++)
		data[i] = (unsigned char)(i * 29 + 3);
	for (u32 round = 0; round < 4 && err >= 0; round++) {
		for (u32 off = 0; off < sizeof(data) && err >= 0; off += (u32)err)
			err = sys32(NR32_WRITE, (u32)sock, (u32)(u64)(data + off), sizeof(data) - off, 0, 0);
		sum = fnv1a64(sum, data, sizeof(data));
	}
	at = append(msg, "sent 262144 bytes fnv1a64 ");
	append_hex(at, sum, 16);
	report(dev, msg, err < 0 ? err : 0);
	sum = FNV_START;
	u32 got = 0;
	while (err >= 0 && got < 262144) {
		if (wait_readable(sock, 60000) <= 0) {
			err = -110;
			break;
		}
		err = sys32(NR32_READ, (u32)sock, (u32)(u64)data, sizeof(data), 0, 0);
		if (err == 0)
			break;
		if (err > 0) {
			sum = fnv1a64(sum, data, (u32)err);
			got += (u32)err;
		}
	}
	at = append(msg, "received ");
	at = append_u32(at, got);
	at = append(at, " bytes fnv1a64 ");
	append_hex(at, sum, 16);
	report(dev, msg, err < 0 ? err : 0);
	sys32(NR32_CLOSE, (u32)sock, 0, 0, 0, 0);
}

/* The ACPI power button through Linux's button driver: the host presses
 * it (SIGTERM to bhyve) once this says it waits; KEY_POWER powers off. */
static void await_power_button(void)
{
	char path[64];
	long fd = -2;
	for (u32 i = 0; i < 8 && fd < 0; i++) {
		char *at = append(path, "/sys/class/input/event");
		at = append_u32(at, i);
		append(at, "/device/name");
		long nfd = sys32(NR32_OPEN, (u32)(u64)path, O_RDONLY, 0, 0, 0);
		if (nfd < 0)
			continue;
		long n = sys32(NR32_READ, (u32)nfd, (u32)(u64)buf, 64, 0, 0);
		sys32(NR32_CLOSE, (u32)nfd, 0, 0, 0, 0);
		buf[n > 0 ? n : 0] = 0;
		if (!str_eq(buf, "Power Button\n"))
			continue;
		at = append(path, "/dev/input/event");
		append_u32(at, i);
		fd = sys32(NR32_OPEN, (u32)(u64)path, O_RDONLY, 0, 0, 0);
	}
	if (fd < 0) {
		report("power-button", "no Power Button input device", fd);
		return;
	}
	report("power-button", "waiting for the power button", 0);
	for (;;) {
		/* struct input_event for ia32 callers: 32-bit seconds and
		 * microseconds, type, code, value. */
		struct {
			u32 sec, usec;
			unsigned short type, code;
			int value;
		} ev;
		if (wait_readable(fd, 600000) <= 0) {
			report("power-button", "no press within 10 minutes", -110);
			return;
		}
		if (sys32(NR32_READ, (u32)fd, (u32)(u64)&ev, sizeof(ev), 0, 0) != sizeof(ev))
			continue;
		if (ev.type == 1 && ev.code == 116 && ev.value == 1) {
			report("power-button", "KEY_POWER pressed: powering off", 0);
			return;
		}
	}
}

/* Whether Linux registered the PCI driver NAME (its module was in the
 * initramfs: the cloud kernel has neither ahci nor e1000). */
static int have_pci_driver(const char *dev, const char *name)
{
	char path[64];
	append(append(path, "/sys/bus/pci/drivers/"), name);
	long fd = sys32(NR32_OPEN, (u32)(u64)path, O_RDONLY, 0, 0, 0);
	if (fd < 0) {
		report(dev, "skipped: this kernel has no driver for it", 0);
		return 0;
	}
	sys32(NR32_CLOSE, (u32)fd, 0, 0, 0, 0);
	return 1;
}

/* Linux's ahci, libata, sd_mod, sr_mod and isofs: the ahci-hd is sda (read,
 * written, synced); the ahci-cd is sr0, read whole as a CD-ROM and summed,
 * then mounted as ISO 9660 and a file read from it. */
static void check_ahci(void)
{
	static unsigned char chunk[65536];
	char *at;
	u64 sum = FNV_START;
	u32 total = 0;
	long fd, n;
	if (!have_pci_driver("ahci", "ahci"))
		return;
	check_disk("ahci-hd", "/dev/sda", "sda", 1);
	fd = sys32(NR32_OPEN, (u32)(u64) "/dev/sr0", O_RDONLY, 0, 0, 0);
	if (fd < 0) {
		report("ahci-cd", "open /dev/sr0", fd);
		return;
	}
	while ((n = sys32(NR32_READ, (u32)fd, (u32)(u64)chunk, sizeof(chunk), 0, 0)) > 0) {
		sum = fnv1a64(sum, chunk, (u32)n);
		total += (u32)n;
	}
	sys32(NR32_CLOSE, (u32)fd, 0, 0, 0, 0);
	at = append(msg, "sr0 read ");
	at = append_u32(at, total);
	at = append(at, " bytes fnv1a64 ");
	append_hex(at, sum, 16);
	report("ahci-cd", msg, n < 0 ? n : 0);
	n = sys32(NR32_MKDIR, (u32)(u64) "/cdrom", 0755, 0, 0, 0);
	n = sys32(NR32_MOUNT, (u32)(u64) "/dev/sr0", (u32)(u64) "/cdrom", (u32)(u64) "iso9660", 1 /* MS_RDONLY */, 0);
	if (n < 0) {
		report("ahci-cd", "mount /dev/sr0 iso9660", n);
		return;
	}
	fd = sys32(NR32_OPEN, (u32)(u64) "/cdrom/hello.txt", O_RDONLY, 0, 0, 0);
	if (fd < 0) {
		report("ahci-cd", "open /cdrom/hello.txt", fd);
		return;
	}
	sys32(NR32_CLOSE, (u32)fd, 0, 0, 0, 0);
	u32 len = read_file("/cdrom/hello.txt");
	while (len && buf[len - 1] == '\n')
		buf[--len] = 0;
	at = append(msg, "iso9660 hello.txt: ");
	append(at, buf);
	report("ahci-cd", msg, len ? 0 : -2);
}

/* Linux's e1000 driver on the e1000's tap: eth1 (virtio_net, loaded
 * first, took eth0), the same exchange with the host as virtio-net's. */
static void check_e1000(void)
{
	if (have_pci_driver("e1000", "e1000"))
		check_net("e1000", "eth1", 2);
}

static void exercise_drivers(void)
{
	long err = sys32(NR32_MOUNT, (u32)(u64) "devtmpfs", (u32)(u64) "/dev", (u32)(u64) "devtmpfs", 0, 0);
	if (err >= 0)
		err = sys32(NR32_MOUNT, (u32)(u64) "sysfs", (u32)(u64) "/sys", (u32)(u64) "sysfs", 0, 0);
	if (err < 0)
		fail("mount /dev and /sys", err);
	load_modules();
	/* Probing is synchronous, but give the block layer's partition scan
	 * and the console's port announcements a moment. */
	sleep_ms(500);
	check_virtio_blk();
	check_nvme();
	check_virtio_rnd();
	check_virtio_console();
	check_net("virtio-net", "eth0", 1);
	check_e1000();
	check_ahci();
	read_file("/proc/uptime");
	char *at = append(line, "DRIVERS-DONE uptime ");
	append(at, buf);
	put(line);
	await_power_button();
}


/* The ia32 door this CPU opens from compatibility mode: `syscall` on AMD
 * and Hygon, `sysenter` on Intel and the others (CPUID leaf 0's vendor). */
static int vendor_opens_syscall(char vendor[13])
{
	u32 regs[4];
	__asm__ volatile("cpuid" : "=a"(regs[0]), "=b"(regs[1]), "=d"(regs[2]), "=c"(regs[3]) : "a"(0), "c"(0));
	for (int i = 0; i < 12; i++)
		vendor[i] = (char)(regs[1 + i / 4] >> (8 * (i % 4)));
	vendor[12] = 0;
	return str_eq(vendor, "AuthenticAMD") || str_eq(vendor, "HygonGenuine");
}

/* ---- --selftest: the kernel's side of each door, played by a SIGILL
 * handler on the host ---- */

#define HOST_NR_WRITE 1
#define HOST_NR_RT_SIGACTION 13
#define SIGILL 4
#define SA_SIGINFO 4u
#define SA_RESTORER 0x04000000u

/* Offsets into the signal frame's ucontext (x86-64 sigcontext). */
enum { R8, R9, R10, R11, R12, R13, R14, R15, RDI, RSI, RBP, RBX, RDX, RAX, RCX, RSP, RIP, EFLAGS, CSGSFS };
#define UC_MCONTEXT 40

static struct {
	const unsigned char *door_ud2; /* where the door's instruction stands */
	int sysenter;                  /* that door's register convention */
	u32 expect[6];                 /* nr, a1..a5 of the call in flight */
	u32 landing;                   /* offset into the sled to return to */
	int mode32;                    /* return in 32-bit mode */
	u32 calls, errors;
} kernel;

static void host_put(const char *s)
{
	host_syscall(HOST_NR_WRITE, 2, (u64)s, str_len(s), 0);
}

static void kernel_check(int ok, const char *what)
{
	if (!ok) {
		host_put("init --selftest: ");
		host_put(what);
		host_put("\n");
		kernel.errors++;
	}
}

/* What Linux's entry_SYSCALL_compat / entry_SYSENTER_compat and
 * do_fast_syscall_32 read and where they return: checked and done on the
 * signal frame of the ud2 that stands where the door's instruction is. */
static void play_kernel(int sig, void *info, void *ucontext)
{
	u64 *r = (u64 *)((char *)ucontext + UC_MCONTEXT);
	u32 user_sp;
	(void)sig;
	(void)info;
	kernel.calls++;
	kernel_check(r[RIP] == (u64)kernel.door_ud2, "the door's instruction is not where the stub enters the kernel");
	kernel_check((u32)r[RAX] == kernel.expect[0], "system call number (EAX)");
	kernel_check((u32)r[RBX] == kernel.expect[1], "first argument (EBX)");
	kernel_check((u32)(kernel.sysenter ? r[RCX] : r[RBP]) == kernel.expect[2],
		     kernel.sysenter ? "second argument (ECX)" : "second argument (EBP)");
	kernel_check((u32)r[RDX] == kernel.expect[3], "third argument (EDX)");
	kernel_check((u32)r[RSI] == kernel.expect[4], "fourth argument (ESI)");
	kernel_check((u32)r[RDI] == kernel.expect[5], "fifth argument (EDI)");
	/* sysenter saves no stack pointer: the kernel takes the user's from
	 * EBP, as the vDSO's `movl %esp, %ebp` leaves it. */
	user_sp = (u32)(kernel.sysenter ? r[RBP] : r[RSP]);
	kernel_check(!kernel.sysenter || (u32)r[RBP] == (u32)r[RSP], "sysenter door: EBP is not the stack pointer");
	/* The kernel reads the sixth argument at the user stack pointer and
	 * returns with that stack: the landing sled's RET must find the way
	 * back to sys32 there. */
	kernel_check(*(volatile u64 *)(u64)user_sp == (u64)sys32_back, "the user stack does not lead back to sys32");
	/* The return: RIP at the landing pad (inside the sled), the user
	 * stack, the result in EAX, scratch registers the kernel may
	 * clobber clobbered, in the mode under test. */
	r[RIP] = kernel.landing;
	r[RSP] = user_sp;
	r[RAX] = (u64)(kernel.expect[0] ^ kernel.expect[1] ^ kernel.expect[5]);
	r[RCX] = r[R8] = r[R9] = r[R10] = r[R11] = 0xdeadbeefdeadbeeful;
	r[R12] = r[R13] = r[R14] = r[R15] = r[RBX] = r[RBP] = 0xbadc0ffee0ddf00dul;
	((unsigned short *)&r[CSGSFS])[0] = kernel.mode32 ? USER_CS32 : USER_CS64;
}

static int selftest_door(const char *name, const unsigned char *door_ud2, int sysenter)
{
	u32 before = kernel.errors;
	kernel.door_ud2 = door_ud2 + (sysenter ? 2 : 0); /* after `mov %esp, %ebp` */
	kernel.sysenter = sysenter;
	sys32_door = (u64)door_ud2;
	for (u32 i = 0; i < 16; i++) {
		long got;
		kernel.expect[0] = 300 + i;
		for (int a = 1; a < 6; a++)
			kernel.expect[a] = 0x01010101u * (u32)a + i;
		kernel.landing = i * 251 % (SLED_SIZE - 14);
		kernel.mode32 = i & 1;
		got = sys32(kernel.expect[0], kernel.expect[1], kernel.expect[2], kernel.expect[3], kernel.expect[4],
			    kernel.expect[5]);
		kernel_check(got == (long)(int)(kernel.expect[0] ^ kernel.expect[1] ^ kernel.expect[5]),
			     "the result did not come back in EAX");
	}
	kernel_check(kernel.calls == 16, "not every call reached the kernel's side once");
	kernel.calls = 0;
	host_put("init --selftest: ");
	host_put(name);
	host_put(kernel.errors == before ? " door: 16 calls, returns in 64-bit and 32-bit mode: ok\n" : " door: FAILED\n");
	return kernel.errors == before;
}

static int selftest(void)
{
	struct {
		void (*handler)(int, void *, void *);
		u64 flags;
		void (*restorer)(void);
		u64 mask;
	} act = { play_kernel, SA_SIGINFO | SA_RESTORER, host_sigreturn, 0 };
	char vendor[13];
	int syscall_door = vendor_opens_syscall(vendor);

	/* The stub blocks map where the kernel text's low halves are. */
	const unsigned char *stub = (const unsigned char *)CSTAR_STUBS_BASE;
	for (u64 at = 0; at < CSTAR_STUBS_SIZE; at += CSTAR_STUBS_SIZE / 7 & ~15ul)
		for (int i = 0; i < 16; i++)
			if (stub[at + i] != cstar_stubs[i]) {
				host_put("init --selftest: a CSTAR stub block is not mapped\n");
				return 2;
			}
	/* Every offset of the sled must come back, in both modes. */
	for (u64 entry = 0; entry <= SLED_SIZE - 14;
	     entry += entry + 97 > SLED_SIZE - 14 && entry < SLED_SIZE - 14 ? SLED_SIZE - 14 - entry : 97) {
		sled_selftest_64(entry);
		sled_selftest_32(entry);
	}
	host_put("init --selftest: landing sled returns in 64-bit and 32-bit mode: ok\n");

	if (host_syscall(HOST_NR_RT_SIGACTION, SIGILL, (u64)&act, 0, 8) < 0) {
		host_put("init --selftest: rt_sigaction(SIGILL) failed\n");
		return 3;
	}
	if (!selftest_door("syscall", door_syscall_ud2, 0) || !selftest_door("sysenter", door_sysenter_ud2, 1))
		return 4;
	host_put("init --selftest: on this CPU (");
	host_put(vendor);
	host_put(") /init would use the ");
	host_put(syscall_door ? "syscall" : "sysenter");
	host_put(" door\n");
	return 0;
}

int main(long argc, char **argv)
{
	static struct {
		char sysname[65], nodename[65], release[65], version[65], machine[65], domainname[65];
	} uts;
	long err;
	u32 cpus = 0;
	char *at;

	char vendor[13];
	int syscall_door;

	if (argc > 1 && str_eq(argv[1], "--selftest"))
		return selftest();

	syscall_door = vendor_opens_syscall(vendor);
	sys32_door = (u64)(syscall_door ? door_syscall : door_sysenter);
	/* Fault the stub pages in from user mode first: the kernel reaches
	 * them at CPL 0 on the user's stack, where a page fault before its
	 * entry code switches stacks and GS would be a double fault. */
	if (syscall_door)
		for (u64 at = 0; at < CSTAR_STUBS_SIZE; at += 4096)
			(void)*(volatile const unsigned char *)(CSTAR_STUBS_BASE + at);

	err = sys32(NR32_MOUNT, (u32)(u64) "proc", (u32)(u64) "/proc", (u32)(u64) "proc", 0, 0);
	if (err < 0)
		fail("mount /proc", err);
	err = sys32(NR32_UNAME, (u32)(u64)&uts, 0, 0, 0, 0);
	if (err < 0)
		fail("uname", err);
	read_file("/proc/cpuinfo");
	for (const char *p = buf; *p; p++)
		if ((p == buf || p[-1] == '\n') && p[0] == 'p' && p[1] == 'r' && p[2] == 'o' && p[3] == 'c' &&
		    p[4] == 'e' && p[5] == 's' && p[6] == 's' && p[7] == 'o' && p[8] == 'r')
			cpus++;
	at = append(line, "rhyve full-boot guest: ");
	at = append(at, uts.sysname);
	at = append(at, " ");
	at = append(at, uts.release);
	at = append(at, ", ");
	at = append_u32(at, cpus);
	at = append(at, " CPU(s), system calls through the ia32 ABI (");
	at = append(at, syscall_door ? "syscall" : "sysenter");
	at = append(at, ", ");
	at = append(at, vendor);
	append(at, ")\n");
	put(line);

	print_pci_functions();

	read_file("/proc/uptime");
	at = append(line, "BOOT-OK uptime ");
	append(at, buf);
	put(line);

	/* With Linux's modules in the initramfs: its drivers on our devices,
	 * then power-off when the host presses the power button. */
	err = sys32(NR32_OPEN, (u32)(u64) "/modules/order", O_RDONLY, 0, 0, 0);
	if (err >= 0) {
		sys32(NR32_CLOSE, (u32)err, 0, 0, 0, 0);
		exercise_drivers();
	}

	err = sys32(NR32_REBOOT, LINUX_REBOOT_MAGIC1, LINUX_REBOOT_MAGIC2, LINUX_REBOOT_CMD_POWER_OFF, 0, 0);
	fail("reboot(POWER_OFF)", err);
	return 1;
}
