/*
 * The tiny runtime shared by rhyve's test guests: port and MMIO access,
 * COM1 output, the PVH start info, interrupts (IDT, LAPIC, IOAPIC), ACPI
 * table lookup and the defined ways a guest ends.
 *
 * Guests run in 32-bit flat protected mode with paging off, so physical
 * addresses (MMIO included) are used directly as pointers.
 */
#ifndef RT_H
#define RT_H

#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

/* ---- ports and memory-mapped registers ---- */

static inline void outb(uint16_t port, uint8_t v) { __asm__ volatile("outb %0, %1" ::"a"(v), "Nd"(port) : "memory"); }
static inline void outw(uint16_t port, uint16_t v) { __asm__ volatile("outw %0, %1" ::"a"(v), "Nd"(port) : "memory"); }
static inline void outl(uint16_t port, uint32_t v) { __asm__ volatile("outl %0, %1" ::"a"(v), "Nd"(port) : "memory"); }
static inline uint8_t inb(uint16_t port) { uint8_t v; __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port)); return v; }
static inline uint16_t inw(uint16_t port) { uint16_t v; __asm__ volatile("inw %1, %0" : "=a"(v) : "Nd"(port)); return v; }
static inline uint32_t inl(uint16_t port) { uint32_t v; __asm__ volatile("inl %1, %0" : "=a"(v) : "Nd"(port)); return v; }

static inline uint32_t mmio_read32(uint32_t addr) { return *(volatile uint32_t *)addr; }
static inline void mmio_write32(uint32_t addr, uint32_t v) { *(volatile uint32_t *)addr = v; }
static inline uint16_t mmio_read16(uint32_t addr) { return *(volatile uint16_t *)addr; }
static inline uint8_t mmio_read8(uint32_t addr) { return *(volatile uint8_t *)addr; }

static inline void cli(void) { __asm__ volatile("cli" ::: "memory"); }
static inline void sti(void) { __asm__ volatile("sti" ::: "memory"); }
/* sti takes effect after the next instruction, so no interrupt slips in
 * between the two and is missed by the hlt. */
static inline void sti_hlt(void) { __asm__ volatile("sti; hlt" ::: "memory"); }
static inline void barrier(void) { __asm__ volatile("" ::: "memory"); }

/* ---- platform constants (bhyve's amd64 machine) ---- */

#define COM1_PORT 0x3F8
#define COM1_IRQ 4
#define SMI_CMD_PORT 0xB2
#define SMI_ACPI_ENABLE 0xA0
#define PM1_STS_PORT 0x400
#define PM1_EN_PORT 0x402
#define PM1_CNT_PORT 0x404
#define PM_TMR_PORT 0x408
#define PM1_PWRBTN 0x0100
#define PM1_SLP_EN 0x2000
#define BHYVE_S5_SLP_TYP 5 /* bhyve's \_S5 package and pm.c */
#define SCI_IRQ 9
#define RESET_PORT 0xCF9
#define DEBUG_EXIT_PORT 0xF4
#define PCI_CF8 0xCF8
#define PCI_CFC 0xCFC
#define PCI_ECAM_BASE 0xE0000000u
#define IOAPIC_BASE 0xFEC00000u
#define LAPIC_BASE 0xFEE00000u
#define RTC_INDEX_PORT 0x70
#define RTC_DATA_PORT 0x71

/* ---- the PVH start info handed over in EBX ---- */

struct hvm_start_info {
	uint32_t magic;
	uint32_t version;
	uint32_t flags;
	uint32_t nr_modules;
	uint64_t modlist_paddr;
	uint64_t cmdline_paddr;
	uint64_t rsdp_paddr;
	uint64_t memmap_paddr;
	uint32_t memmap_entries;
	uint32_t reserved;
};
#define HVM_START_MAGIC 0x336ec578u

extern const struct hvm_start_info *start_info;

/* The program itself: called with COM1 ready and the IDT loaded. */
void guest_main(void);

/* ---- output and ending ---- */

/* printf subset: %s %c %d %u %x %X with optional '0' and width. Each call
 * is one atomic unit on COM1 across CPUs. Lines end in "\n"; COM1 gets
 * "\r\n". */
void print(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
/* Print "FAIL: <message>" and end the VM with a triple fault (exit 3). */
void fail(const char *fmt, ...) __attribute__((noreturn, format(printf, 1, 2)));
/* Enable ACPI through SMI_CMD (makes SIGTERM a power button press). */
void acpi_enable(void);
/* Enter S5 through PM1a_CNT: bhyve exit 1. */
void poweroff(void) __attribute__((noreturn));
/* Load an empty IDT and raise an exception: bhyve exit 3. */
void triple_fault(void) __attribute__((noreturn));
/* Stop this CPU with interrupts enabled, for good. */
void idle_forever(void) __attribute__((noreturn));

/* ---- command line ---- */

const char *cmdline(void);
/* Value of "key=value" in the command line (NULL if absent); *len gets its length. */
const char *cmdline_value(const char *key, size_t *len);
int cmdline_has_word(const char *word);

/* ---- small library ---- */

void *memcpy(void *dst, const void *src, size_t n);
void *memset(void *dst, int c, size_t n);
int memcmp(const void *a, const void *b, size_t n);
size_t strlen(const char *s);
int str_eq_n(const char *a, const char *b, size_t n);
uint32_t parse_u32(const char *s, size_t len, int *ok);

struct spinlock { volatile uint32_t locked; };
void spin_lock(struct spinlock *l);
void spin_unlock(struct spinlock *l);
uint32_t atomic_inc(volatile uint32_t *v); /* returns the new value */

/* ---- interrupts ---- */

typedef void (*irq_handler)(uint32_t vector);
void idt_load(void);
void set_irq_handler(uint32_t vector, irq_handler fn);
/* Mask both 8259s: KVM starts them unmasked with vector base 0, and an
 * ISA interrupt through LINT0 would land on an exception vector. */
void pic_mask_all(void);
void lapic_enable(void);
void lapic_eoi(void);
uint32_t lapic_id(void);
#define IOAPIC_LEVEL (1u << 15)
#define IOAPIC_ACTIVE_LOW (1u << 13)
#define IOAPIC_MASKED (1u << 16)
/* Route IOAPIC pin to vector on the CPU with APIC ID dest (fixed, physical). */
void ioapic_route(uint32_t pin, uint32_t vector, uint32_t flags, uint32_t dest);
uint32_t ioapic_pins(void);

/* ---- PCI configuration space of bus 0 through 0xCF8/0xCFC ---- */

uint32_t pci_read32(uint32_t dev, uint32_t fn, uint32_t reg);
uint16_t pci_read16(uint32_t dev, uint32_t fn, uint32_t reg);
uint8_t pci_read8(uint32_t dev, uint32_t fn, uint32_t reg);
void pci_write32(uint32_t dev, uint32_t fn, uint32_t reg, uint32_t v);
void pci_write16(uint32_t dev, uint32_t fn, uint32_t reg, uint16_t v);

/* ---- timing ---- */

uint32_t pm_timer(void);
/* Busy-wait on the ACPI PM timer (3.579545 MHz). */
void pm_delay_us(uint32_t us);

/* ---- ACPI tables ---- */

struct acpi_header {
	char signature[4];
	uint32_t length;
	uint8_t revision;
	uint8_t checksum;
	char oem_id[6];
	char oem_table_id[8];
	uint32_t oem_revision;
	uint32_t creator_id;
	uint32_t creator_revision;
} __attribute__((packed));

struct acpi_rsdp {
	char signature[8];
	uint8_t checksum;
	char oem_id[6];
	uint8_t revision;
	uint32_t rsdt_address;
	uint32_t length;
	uint64_t xsdt_address;
	uint8_t extended_checksum;
	uint8_t reserved[3];
} __attribute__((packed));

uint8_t checksum8(const void *p, size_t len);
/* Scan the BIOS area 0xE0000-0xFFFFF for "RSD PTR " (NULL if absent). */
const struct acpi_rsdp *acpi_find_rsdp(void);
/* A table listed in the XSDT by signature (NULL if absent). */
const struct acpi_header *acpi_find_table(const char *sig);
/* Number of enabled Processor Local APIC entries in the MADT (0 if none). */
uint32_t acpi_madt_cpus(void);

/* ---- application processors ---- */

/* Copy the real-mode trampoline to the page at phys; returns the SIPI vector. */
uint8_t smp_install_trampoline(uint32_t phys);
/* Set by the AP program: runs on each AP after it reached 32-bit mode. */
extern void (*ap_main)(void);

#endif
