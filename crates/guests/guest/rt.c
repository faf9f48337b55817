/* The runtime shared by rhyve's test guests; see rt.h. */
#include "rt.h"

const struct hvm_start_info *start_info;
void (*ap_main)(void);

/* ---- small library ---- */

void *memcpy(void *dst, const void *src, size_t n)
{
	uint8_t *d = dst;
	const uint8_t *s = src;
	while (n--)
		*d++ = *s++;
	return dst;
}

void *memset(void *dst, int c, size_t n)
{
	uint8_t *d = dst;
	while (n--)
		*d++ = (uint8_t)c;
	return dst;
}

int memcmp(const void *a, const void *b, size_t n)
{
	const uint8_t *x = a, *y = b;
	for (; n; n--, x++, y++)
		if (*x != *y)
			return *x < *y ? -1 : 1;
	return 0;
}

size_t strlen(const char *s)
{
	size_t n = 0;
	while (s[n])
		n++;
	return n;
}

int str_eq_n(const char *a, const char *b, size_t n)
{
	return memcmp(a, b, n) == 0;
}

uint32_t parse_u32(const char *s, size_t len, int *ok)
{
	uint32_t v = 0, base = 10;
	size_t i = 0;
	*ok = len > 0;
	if (len > 2 && s[0] == '0' && (s[1] == 'x' || s[1] == 'X')) {
		base = 16;
		i = 2;
	}
	for (; i < len; i++) {
		char c = s[i];
		uint32_t d;
		if (c >= '0' && c <= '9')
			d = (uint32_t)(c - '0');
		else if (base == 16 && c >= 'a' && c <= 'f')
			d = (uint32_t)(c - 'a' + 10);
		else if (base == 16 && c >= 'A' && c <= 'F')
			d = (uint32_t)(c - 'A' + 10);
		else {
			*ok = 0;
			return 0;
		}
		v = v * base + d;
	}
	return v;
}

void spin_lock(struct spinlock *l)
{
	while (__atomic_exchange_n(&l->locked, 1, __ATOMIC_ACQUIRE))
		while (l->locked)
			;
}

void spin_unlock(struct spinlock *l)
{
	__atomic_store_n(&l->locked, 0, __ATOMIC_RELEASE);
}

uint32_t atomic_inc(volatile uint32_t *v)
{
	return __atomic_add_fetch(v, 1, __ATOMIC_SEQ_CST);
}

/* ---- COM1 ---- */

#define UART_THR 0
#define UART_IER 1
#define UART_LCR 3
#define UART_LSR 5
#define LSR_THRE 0x20

static struct spinlock print_lock;

static void serial_init(void)
{
	outb(COM1_PORT + UART_IER, 0);
	outb(COM1_PORT + UART_LCR, 0x03); /* 8N1, DLAB off */
}

static void serial_putc(char c)
{
	while (!(inb(COM1_PORT + UART_LSR) & LSR_THRE))
		;
	outb(COM1_PORT + UART_THR, (uint8_t)c);
}

static void put_char(char c)
{
	if (c == '\n')
		serial_putc('\r');
	serial_putc(c);
}

static void put_str(const char *s)
{
	while (*s)
		put_char(*s++);
}

static void put_uint(uint32_t v, uint32_t base, int width, char pad, int upper)
{
	char buf[12];
	int n = 0;
	const char *digits = upper ? "0123456789ABCDEF" : "0123456789abcdef";
	do {
		buf[n++] = digits[v % base];
		v /= base;
	} while (v);
	while (width > n) {
		put_char(pad);
		width--;
	}
	while (n)
		put_char(buf[--n]);
}

static void vprint(const char *fmt, va_list ap)
{
	for (; *fmt; fmt++) {
		if (*fmt != '%') {
			put_char(*fmt);
			continue;
		}
		fmt++;
		char pad = ' ';
		int width = 0;
		if (*fmt == '0') {
			pad = '0';
			fmt++;
		}
		while (*fmt >= '0' && *fmt <= '9')
			width = width * 10 + (*fmt++ - '0');
		switch (*fmt) {
		case 's': {
			const char *s = va_arg(ap, const char *);
			put_str(s ? s : "(null)");
			break;
		}
		case 'c':
			put_char((char)va_arg(ap, int));
			break;
		case 'd': {
			int v = va_arg(ap, int);
			if (v < 0) {
				put_char('-');
				put_uint((uint32_t)-v, 10, width, pad, 0);
			} else {
				put_uint((uint32_t)v, 10, width, pad, 0);
			}
			break;
		}
		case 'u':
			put_uint(va_arg(ap, uint32_t), 10, width, pad, 0);
			break;
		case 'x':
		case 'X':
			put_uint(va_arg(ap, uint32_t), 16, width, pad, *fmt == 'X');
			break;
		case '%':
			put_char('%');
			break;
		default:
			put_char('?');
			break;
		}
	}
}

static uint32_t irq_save(void)
{
	uint32_t flags;
	__asm__ volatile("pushf; pop %0; cli" : "=r"(flags)::"memory");
	return flags;
}

static void irq_restore(uint32_t flags)
{
	if (flags & (1u << 9))
		sti();
}

void print(const char *fmt, ...)
{
	va_list ap;
	uint32_t flags = irq_save();
	spin_lock(&print_lock);
	va_start(ap, fmt);
	vprint(fmt, ap);
	va_end(ap);
	spin_unlock(&print_lock);
	irq_restore(flags);
}

void fail(const char *fmt, ...)
{
	va_list ap;
	cli();
	/* The failure may come from inside print() on this CPU (an exception
	 * with the lock held): take the lock if it frees up soon, else print
	 * regardless rather than hang. */
	for (int spins = 0; spins < 100000; spins++)
		if (!__atomic_exchange_n(&print_lock.locked, 1, __ATOMIC_ACQUIRE))
			break;
	put_str("FAIL: ");
	va_start(ap, fmt);
	vprint(fmt, ap);
	va_end(ap);
	put_char('\n');
	spin_unlock(&print_lock);
	triple_fault();
}

/* ---- ending ---- */

void acpi_enable(void)
{
	outb(SMI_CMD_PORT, SMI_ACPI_ENABLE);
}

void poweroff(void)
{
	acpi_enable();
	outw(PM1_CNT_PORT, (BHYVE_S5_SLP_TYP << 10) | PM1_SLP_EN);
	fail("S5 power-off did not end the VM");
}

void triple_fault(void)
{
	static const struct {
		uint16_t limit;
		uint32_t base;
	} __attribute__((packed)) empty_idt = { 0, 0 };
	/* With no usable IDT the divide error cannot be delivered: #DF cannot
	 * be either, which is a triple fault (shutdown). */
	__asm__ volatile("cli; lidt %0; xor %%ecx, %%ecx; div %%ecx" ::"m"(empty_idt) : "eax", "ecx", "edx");
	for (;;)
		;
}

void idle_forever(void)
{
	for (;;)
		sti_hlt();
}

/* ---- command line ---- */

const char *cmdline(void)
{
	if (!start_info || !start_info->cmdline_paddr || start_info->cmdline_paddr >= 0x100000000ull)
		return "";
	return (const char *)(uint32_t)start_info->cmdline_paddr;
}

/* Walk space-separated words; calls back with each (start, length). */
static const char *next_word(const char *p, size_t *len)
{
	while (*p == ' ')
		p++;
	if (!*p)
		return NULL;
	size_t n = 0;
	while (p[n] && p[n] != ' ')
		n++;
	*len = n;
	return p;
}

int cmdline_has_word(const char *word)
{
	size_t wl = strlen(word), len;
	for (const char *p = cmdline(); (p = next_word(p, &len)); p += len)
		if (len == wl && str_eq_n(p, word, wl))
			return 1;
	return 0;
}

const char *cmdline_value(const char *key, size_t *vlen)
{
	size_t kl = strlen(key), len;
	for (const char *p = cmdline(); (p = next_word(p, &len)); p += len)
		if (len > kl && p[kl] == '=' && str_eq_n(p, key, kl)) {
			*vlen = len - kl - 1;
			return p + kl + 1;
		}
	return NULL;
}

/* ---- interrupts ---- */

struct idt_gate {
	uint16_t offset_low;
	uint16_t selector;
	uint8_t zero;
	uint8_t type;
	uint16_t offset_high;
} __attribute__((packed));

static struct idt_gate idt[256] __attribute__((aligned(8)));
static irq_handler handlers[256];
extern char isr_stubs[];
#define ISR_STRIDE 8

static const char *const exception_names[32] = {
	"#DE", "#DB", "NMI", "#BP", "#OF", "#BR", "#UD", "#NM", "#DF", "#MF(9)", "#TS",
	"#NP", "#SS", "#GP", "#PF", "15", "#MF", "#AC", "#MC", "#XM", "#VE", "#CP",
};

void isr_dispatch(uint32_t vector)
{
	if (vector < 256 && handlers[vector]) {
		handlers[vector](vector);
		return;
	}
	if (vector < 32 && exception_names[vector])
		fail("exception %s (vector %u)", exception_names[vector], vector);
	fail("unexpected interrupt vector %u", vector);
}

static void idt_fill(void)
{
	for (uint32_t v = 0; v < 256; v++) {
		uint32_t handler = (uint32_t)isr_stubs + v * ISR_STRIDE;
		idt[v].offset_low = (uint16_t)handler;
		idt[v].selector = 0x08;
		idt[v].zero = 0;
		idt[v].type = 0x8E; /* present, DPL 0, 32-bit interrupt gate */
		idt[v].offset_high = (uint16_t)(handler >> 16);
	}
}

void idt_load(void)
{
	struct {
		uint16_t limit;
		uint32_t base;
	} __attribute__((packed)) desc = { sizeof(idt) - 1, (uint32_t)idt };
	__asm__ volatile("lidt %0" ::"m"(desc));
}

void set_irq_handler(uint32_t vector, irq_handler fn)
{
	handlers[vector] = fn;
}

void pic_mask_all(void)
{
	outb(0x21, 0xFF);
	outb(0xA1, 0xFF);
}

#define LAPIC_ID 0x20
#define LAPIC_EOI 0xB0
#define LAPIC_SVR 0xF0
#define LAPIC_LVT_LINT0 0x350
#define LAPIC_LVT_LINT1 0x360
#define LVT_MASKED (1u << 16)

void lapic_enable(void)
{
	/* Software-enable with spurious vector 0xFF; ISA interrupts come
	 * through the IOAPIC only, so LINT0 (the 8259's ExtINT) is masked. */
	mmio_write32(LAPIC_BASE + LAPIC_SVR, 0x1FF);
	mmio_write32(LAPIC_BASE + LAPIC_LVT_LINT0, LVT_MASKED);
}

void lapic_eoi(void)
{
	mmio_write32(LAPIC_BASE + LAPIC_EOI, 0);
}

uint32_t lapic_id(void)
{
	return mmio_read32(LAPIC_BASE + LAPIC_ID) >> 24;
}

static uint32_t ioapic_read(uint32_t reg)
{
	mmio_write32(IOAPIC_BASE, reg);
	return mmio_read32(IOAPIC_BASE + 0x10);
}

static void ioapic_write(uint32_t reg, uint32_t v)
{
	mmio_write32(IOAPIC_BASE, reg);
	mmio_write32(IOAPIC_BASE + 0x10, v);
}

uint32_t ioapic_pins(void)
{
	return ((ioapic_read(1) >> 16) & 0xFF) + 1;
}

void ioapic_route(uint32_t pin, uint32_t vector, uint32_t flags, uint32_t dest)
{
	ioapic_write(0x10 + 2 * pin + 1, dest << 24);
	ioapic_write(0x10 + 2 * pin, (vector & 0xFF) | flags);
}

/* ---- PCI ---- */

static void pci_select(uint32_t dev, uint32_t fn, uint32_t reg)
{
	outl(PCI_CF8, 0x80000000u | (dev << 11) | (fn << 8) | (reg & 0xFC));
}

uint32_t pci_read32(uint32_t dev, uint32_t fn, uint32_t reg)
{
	pci_select(dev, fn, reg);
	return inl(PCI_CFC);
}

uint16_t pci_read16(uint32_t dev, uint32_t fn, uint32_t reg)
{
	pci_select(dev, fn, reg);
	return inw((uint16_t)(PCI_CFC + (reg & 2)));
}

uint8_t pci_read8(uint32_t dev, uint32_t fn, uint32_t reg)
{
	pci_select(dev, fn, reg);
	return inb((uint16_t)(PCI_CFC + (reg & 3)));
}

void pci_write32(uint32_t dev, uint32_t fn, uint32_t reg, uint32_t v)
{
	pci_select(dev, fn, reg);
	outl(PCI_CFC, v);
}

void pci_write16(uint32_t dev, uint32_t fn, uint32_t reg, uint16_t v)
{
	pci_select(dev, fn, reg);
	outw((uint16_t)(PCI_CFC + (reg & 2)), v);
}

/* ---- timing ---- */

uint32_t pm_timer(void)
{
	return inl(PM_TMR_PORT);
}

void pm_delay_us(uint32_t us)
{
	/* 3.579545 ticks per microsecond, rounded up; the 32-bit counter's
	 * wrap is absorbed by unsigned subtraction. */
	uint32_t ticks = us * 36 / 10 + 1;
	uint32_t start = pm_timer();
	while (pm_timer() - start < ticks)
		;
}

/* ---- ACPI ---- */

uint8_t checksum8(const void *p, size_t len)
{
	const uint8_t *b = p;
	uint8_t sum = 0;
	while (len--)
		sum = (uint8_t)(sum + *b++);
	return sum;
}

const struct acpi_rsdp *acpi_find_rsdp(void)
{
	for (uint32_t a = 0xE0000; a < 0x100000; a += 16) {
		const char *p = (const char *)a;
		if (str_eq_n(p, "RSD PTR ", 8))
			return (const struct acpi_rsdp *)p;
	}
	return NULL;
}

const struct acpi_header *acpi_find_table(const char *sig)
{
	const struct acpi_rsdp *rsdp = acpi_find_rsdp();
	if (!rsdp || rsdp->revision < 2 || rsdp->xsdt_address >= 0x100000000ull)
		return NULL;
	const struct acpi_header *xsdt = (const struct acpi_header *)(uint32_t)rsdp->xsdt_address;
	uint32_t n = (xsdt->length - sizeof(*xsdt)) / 8;
	const uint8_t *entries = (const uint8_t *)xsdt + sizeof(*xsdt);
	for (uint32_t i = 0; i < n; i++) {
		uint64_t addr;
		memcpy(&addr, entries + 8 * i, 8);
		if (addr >= 0x100000000ull)
			continue;
		const struct acpi_header *t = (const struct acpi_header *)(uint32_t)addr;
		if (str_eq_n(t->signature, sig, 4))
			return t;
	}
	return NULL;
}

uint32_t acpi_madt_cpus(void)
{
	const struct acpi_header *madt = acpi_find_table("APIC");
	if (!madt)
		return 0;
	const uint8_t *p = (const uint8_t *)madt + sizeof(*madt) + 8; /* LAPIC address, flags */
	const uint8_t *end = (const uint8_t *)madt + madt->length;
	uint32_t cpus = 0;
	while (p + 2 <= end && p[1] >= 2) {
		/* Type 0: Processor Local APIC; flags bit 0 = enabled. */
		if (p[0] == 0 && p[1] >= 8 && (p[4] & 1))
			cpus++;
		p += p[1];
	}
	return cpus;
}

/* ---- application processors ---- */

extern char smp_trampoline[], smp_trampoline_end[];

uint8_t smp_install_trampoline(uint32_t phys)
{
	memcpy((void *)phys, smp_trampoline, (size_t)(smp_trampoline_end - smp_trampoline));
	return (uint8_t)(phys >> 12);
}

void rt_ap_entry(void)
{
	idt_load();
	if (ap_main)
		ap_main();
	idle_forever();
}

/* ---- entry ---- */

void rt_entry(const struct hvm_start_info *info)
{
	serial_init();
	start_info = info;
	idt_fill();
	idt_load();
	if (!info || info->magic != HVM_START_MAGIC)
		fail("no PVH start info (EBX=%x)", (uint32_t)info);
	guest_main();
	poweroff();
}
