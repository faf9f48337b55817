/*
 * virtioblk: read sector 0 of a virtio-blk disk through the legacy
 * virtio-pci interface, the way bhyve's guests' drivers do.
 *
 * Finds the first 1AF4:1001 function on bus 0, enables I/O, memory and bus
 * mastering, resets the device, negotiates no features, sets up queue 0
 * (legacy layout, 4 KiB aligned, at the size the device reports), sends
 * one read request (header, 512-byte buffer, status byte) and waits for
 * the completion interrupt:
 *   msix (default when the function has MSI-X): table entry 0 -> vector,
 *         queue 0 bound to entry 0 through the MSI-X queue vector register;
 *   intx (command line "intx"): every PCI IOAPIC pin (16 and up, level,
 *         active low) to one vector; the handler reads ISR status.
 * Prints:
 *   virtio-blk 00:04.0 capacity 2048 queue 128
 *   virtio-blk irq msix
 *   sector0 72 68 79 76 65 2d 76 69 72 74 69 6f 2d 62 6c 6b
 *   virtio-blk ok
 * Command line "slot=N" picks the slot when there are several.
 */
#include "rt.h"

#define VIRTIO_VENDOR 0x1AF4
#define VIRTIO_BLK_LEGACY 0x1001

/* Legacy virtio-pci registers in I/O BAR 0. */
#define VP_DEVICE_FEATURES 0x00
#define VP_GUEST_FEATURES 0x04
#define VP_QUEUE_PFN 0x08
#define VP_QUEUE_SIZE 0x0C
#define VP_QUEUE_SELECT 0x0E
#define VP_QUEUE_NOTIFY 0x10
#define VP_STATUS 0x12
#define VP_ISR 0x13
#define VP_MSIX_CONFIG_VECTOR 0x14
#define VP_MSIX_QUEUE_VECTOR 0x16
#define VP_CONFIG_NO_MSIX 0x14
#define VP_CONFIG_MSIX 0x18
#define VIRTIO_NO_VECTOR 0xFFFF

#define STATUS_ACKNOWLEDGE 1
#define STATUS_DRIVER 2
#define STATUS_DRIVER_OK 4
#define STATUS_FAILED 0x80

#define VRING_DESC_F_NEXT 1
#define VRING_DESC_F_WRITE 2
#define VIRTIO_BLK_T_IN 0

#define PCI_COMMAND 0x04
#define PCI_CMD_IO 1
#define PCI_CMD_MEM 2
#define PCI_CMD_MASTER 4
#define PCI_STATUS_CAPS 0x10
#define PCI_CAP_MSIX 0x11

#define IRQ_VECTOR 0x45
#define MAX_QUEUE 1024

struct vring_desc {
	uint64_t addr;
	uint32_t len;
	uint16_t flags;
	uint16_t next;
};

struct blk_req_header {
	uint32_t type;
	uint32_t ioprio;
	uint64_t sector;
};

/* Room for the largest legacy queue: 16 KiB of descriptors, the avail
 * ring, then the used ring on the next 4 KiB boundary. */
static uint8_t ring[0x8000] __attribute__((aligned(4096)));
static struct blk_req_header header;
static uint8_t sector[512];
static volatile uint8_t blk_status;

static uint16_t iobase;
static volatile uint32_t interrupts;
static volatile uint8_t isr_seen;
static int using_msix;

static void irq(uint32_t vector)
{
	(void)vector;
	if (!using_msix) {
		/* Reading ISR acknowledges it and lowers INTx. */
		uint8_t isr = inb(iobase + VP_ISR);
		if (!isr) {
			lapic_eoi();
			return; /* another function's line */
		}
		isr_seen = isr;
	}
	interrupts++;
	lapic_eoi();
}

static int find_device(uint32_t *dev_out)
{
	size_t len;
	const char *v = cmdline_value("slot", &len);
	if (v) {
		int ok;
		uint32_t slot = parse_u32(v, len, &ok);
		if (!ok || slot > 31)
			fail("bad slot=%s", v);
		if (pci_read32(slot, 0, 0) != ((VIRTIO_BLK_LEGACY << 16) | VIRTIO_VENDOR))
			fail("no virtio-blk at slot %u (id %08x)", slot, pci_read32(slot, 0, 0));
		*dev_out = slot;
		return 1;
	}
	for (uint32_t dev = 0; dev < 32; dev++)
		if (pci_read32(dev, 0, 0) == ((VIRTIO_BLK_LEGACY << 16) | VIRTIO_VENDOR)) {
			*dev_out = dev;
			return 1;
		}
	return 0;
}

/* Offset of the MSI-X capability in config space, 0 if none. */
static uint32_t find_msix(uint32_t dev)
{
	if (!(pci_read16(dev, 0, 0x06) & PCI_STATUS_CAPS))
		return 0;
	uint32_t ptr = pci_read8(dev, 0, 0x34) & 0xFC;
	for (int guard = 0; ptr && guard < 48; guard++) {
		if (pci_read8(dev, 0, ptr) == PCI_CAP_MSIX)
			return ptr;
		ptr = pci_read8(dev, 0, ptr + 1) & 0xFC;
	}
	return 0;
}

/* Memory address of BAR bar, which must decode below 4 GiB. */
static uint32_t memory_bar(uint32_t dev, uint32_t bar)
{
	uint32_t lo = pci_read32(dev, 0, 0x10 + 4 * bar);
	if (lo & 1)
		fail("BAR %u is an I/O BAR", bar);
	if (((lo >> 1) & 3) == 2 && pci_read32(dev, 0, 0x14 + 4 * bar) != 0)
		fail("BAR %u is above 4 GiB", bar);
	if ((lo & ~0xFu) == 0)
		fail("BAR %u is not assigned", bar);
	return lo & ~0xFu;
}

static void setup_msix(uint32_t dev, uint32_t cap)
{
	uint32_t table = pci_read32(dev, 0, cap + 4);
	uint32_t entry0 = memory_bar(dev, table & 7) + (table & ~7u);
	/* Entry 0: message address (this CPU, physical), data (vector, fixed,
	 * edge), vector control (unmasked). */
	mmio_write32(entry0 + 0, 0xFEE00000u | (lapic_id() << 12));
	mmio_write32(entry0 + 4, 0);
	mmio_write32(entry0 + 8, IRQ_VECTOR);
	mmio_write32(entry0 + 12, 0);
	uint16_t control = pci_read16(dev, 0, cap + 2);
	pci_write16(dev, 0, cap + 2, (uint16_t)((control | 0x8000) & ~0x4000)); /* enable, unmask all */
}

static uint8_t page[4096] __attribute__((aligned(4096)));

/*
 * "reads=N": N 4 KiB reads at pseudo-random 4 KiB-aligned offsets, one at a
 * time (queue depth 1), completion polled with interrupts off, timed with
 * the PM timer; prints "virtio-blk reads N ticks T" (bench/sandbox.sh).
 */
static void random_reads(struct vring_desc *desc, volatile uint16_t *avail,
			 volatile uint16_t *used, uint32_t qsize, uint32_t sectors)
{
	size_t len;
	const char *value = cmdline_value("reads", &len);
	int ok = 1;
	uint32_t reads = parse_u32(value, len, &ok);
	if (!ok)
		fail("reads= is not a number");
	if (sectors < 16)
		fail("the disk is too small for 4 KiB reads");
	uint32_t pages = sectors / 8, seed = 12345;
	desc[1].addr = (uint32_t)page;
	desc[1].len = sizeof(page);
	uint16_t idx = avail[1];
	uint32_t start = pm_timer();
	for (uint32_t i = 0; i < reads; i++) {
		seed = seed * 1103515245u + 12345u;
		header.sector = (uint64_t)((seed >> 8) % pages) * 8;
		blk_status = 0xFF;
		avail[2 + idx % qsize] = 0;
		barrier();
		avail[1] = ++idx;
		outw(iobase + VP_QUEUE_NOTIFY, 0);
		while (used[1] != idx)
			barrier();
		if (blk_status != 0)
			fail("read %u: status %u", i, blk_status);
	}
	uint32_t ticks = pm_timer() - start;
	print("virtio-blk reads %u ticks %u\n", reads, ticks);
}

void guest_main(void)
{
	uint32_t dev;
	if (!find_device(&dev))
		fail("no virtio-blk (1af4:1001) on bus 0");

	uint32_t bar0 = pci_read32(dev, 0, 0x10);
	if (!(bar0 & 1) || (bar0 & ~3u) == 0)
		fail("BAR 0 is not an assigned I/O BAR (%08x)", bar0);
	iobase = (uint16_t)(bar0 & ~3u);
	pci_write16(dev, 0, PCI_COMMAND,
		    pci_read16(dev, 0, PCI_COMMAND) | PCI_CMD_IO | PCI_CMD_MEM | PCI_CMD_MASTER);

	pic_mask_all();
	lapic_enable();
	set_irq_handler(IRQ_VECTOR, irq);
	uint32_t msix = find_msix(dev);
	using_msix = msix && !cmdline_has_word("intx");
	if (!using_msix) {
		for (uint32_t pin = 16; pin < ioapic_pins(); pin++)
			ioapic_route(pin, IRQ_VECTOR, IOAPIC_LEVEL | IOAPIC_ACTIVE_LOW, lapic_id());
	}

	/* Reset, then ACKNOWLEDGE and DRIVER; accept no optional features. */
	outb(iobase + VP_STATUS, 0);
	if (inb(iobase + VP_STATUS) != 0)
		fail("device status did not reset");
	outb(iobase + VP_STATUS, STATUS_ACKNOWLEDGE);
	outb(iobase + VP_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
	(void)inl(iobase + VP_DEVICE_FEATURES);
	outl(iobase + VP_GUEST_FEATURES, 0);
	if (using_msix)
		setup_msix(dev, msix);
	uint16_t config = using_msix ? VP_CONFIG_MSIX : VP_CONFIG_NO_MSIX;
	uint32_t capacity_lo = inl(iobase + config), capacity_hi = inl(iobase + config + 4);

	outw(iobase + VP_QUEUE_SELECT, 0);
	uint32_t qsize = inw(iobase + VP_QUEUE_SIZE);
	if (qsize == 0 || qsize > MAX_QUEUE || (qsize & (qsize - 1)))
		fail("queue 0 size %u", qsize);
	if (using_msix) {
		outw(iobase + VP_MSIX_CONFIG_VECTOR, VIRTIO_NO_VECTOR);
		outw(iobase + VP_MSIX_QUEUE_VECTOR, 0);
		if (inw(iobase + VP_MSIX_QUEUE_VECTOR) != 0)
			fail("queue 0 refused MSI-X entry 0");
	}
	/* Legacy layout: descriptors, avail ring, used ring at 4 KiB. */
	struct vring_desc *desc = (struct vring_desc *)ring;
	volatile uint16_t *avail = (volatile uint16_t *)(ring + 16 * qsize);
	uint32_t used_off = (16 * qsize + 2 * (3 + qsize) + 4095) & ~4095u;
	volatile uint16_t *used = (volatile uint16_t *)(ring + used_off);
	outl(iobase + VP_QUEUE_PFN, (uint32_t)ring >> 12);
	outb(iobase + VP_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_DRIVER_OK);
	if (inb(iobase + VP_STATUS) & STATUS_FAILED)
		fail("device set FAILED");
	print("virtio-blk 00:%02x.0 capacity %u queue %u\n", dev, capacity_lo, qsize);
	if (capacity_hi)
		fail("capacity above 2^32 sectors");

	header.type = VIRTIO_BLK_T_IN;
	header.sector = 0;
	blk_status = 0xFF;
	desc[0] = (struct vring_desc){ (uint32_t)&header, sizeof(header), VRING_DESC_F_NEXT, 1 };
	desc[1] = (struct vring_desc){ (uint32_t)sector, sizeof(sector),
				       VRING_DESC_F_NEXT | VRING_DESC_F_WRITE, 2 };
	desc[2] = (struct vring_desc){ (uint32_t)&blk_status, 1, VRING_DESC_F_WRITE, 0 };
	avail[2] = 0; /* ring[0] = head descriptor 0 */
	barrier();
	avail[1] = 1; /* idx */
	sti();
	outw(iobase + VP_QUEUE_NOTIFY, 0);

	uint32_t start = pm_timer();
	while (!interrupts && pm_timer() - start < 2 * 3579545u)
		;
	cli();
	if (!interrupts)
		fail("no completion interrupt within 2 s (used idx %u, ISR %02x)", used[1],
		     inb(iobase + VP_ISR));
	print("virtio-blk irq %s\n", using_msix ? "msix" : "intx");
	if (!using_msix && !(isr_seen & 1))
		fail("ISR %02x lacks the queue bit", isr_seen);
	if (used[1] != 1)
		fail("used idx %u after one request", used[1]);
	uint32_t used_id = used[2] | ((uint32_t)used[3] << 16);
	if (used_id != 0)
		fail("used element id %u", used_id);
	if (blk_status != 0)
		fail("request status %u", blk_status);
	print("sector0");
	for (int i = 0; i < 16; i++)
		print(" %02x", sector[i]);
	print("\n");
	print("virtio-blk ok\n");
	if (cmdline_value("reads", &(size_t){ 0 }))
		random_reads(desc, avail, used, qsize, capacity_lo);
}
