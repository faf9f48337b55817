/*
 * snapcheck: work a snapshot must not disturb, for the snapshot tests.
 *
 * Drives a virtio-blk disk (legacy interface, MSI-X completions) and a
 * 16 KiB block of memory through ROUNDS rounds. Each round stirs every
 * word of the block into a running checksum, then writes one sector
 * (sector = round) holding "SNAP", the round and the checksum so far
 * (little-endian 32-bit words, the rest zero) and
 * waits for its completion interrupt, checking the used ring moved by
 * exactly one entry: a request lost across a snapshot never completes
 * (FAIL after 5 s), one done twice moves it by two. At the end it reads
 * every sector back and checks it.
 * Prints:
 *   snapcheck round R   every 10 rounds (a test suspends after one of them)
 *   snapcheck checksum C
 *   snapcheck disk ok
 * then powers off. Needs the disk at slot 4 and at least ROUNDS sectors.
 * "rounds=N" runs N rounds instead (bench/snapshot.sh: a guest that keeps
 * running); sectors wrap around the first ROUNDS.
 * With an fbuf at slot 5 it first sets 640x480 and paints the top
 * FB_ROWS rows (pixel i = (i * 2654435761) & 0xFFFFFF), for the test that
 * a restored VNC server shows the saved frame buffer; prints
 *   snapcheck fbuf painted
 * With QEMU's fw_cfg (-o lpc.fwcfg=qemu) it reads the signature's first
 * two bytes at the start and the other two at the end, so a restore must
 * bring back the device with its selector and offset; prints
 *   snapcheck fwcfg ok
 */
#include "rt.h"

#define ROUNDS 120
#define WORDS 4096

#define VP_GUEST_FEATURES 0x04
#define VP_QUEUE_PFN 0x08
#define VP_QUEUE_SIZE 0x0C
#define VP_QUEUE_SELECT 0x0E
#define VP_QUEUE_NOTIFY 0x10
#define VP_STATUS 0x12
#define VP_MSIX_CONFIG_VECTOR 0x14
#define VP_MSIX_QUEUE_VECTOR 0x16
#define VIRTIO_NO_VECTOR 0xFFFF
#define SLOT 4
#define IRQ_VECTOR 0x46
#define FBUF_SLOT 5
#define FB_WIDTH 640
#define FB_HEIGHT 480
#define FB_ROWS 16

struct vring_desc {
	uint64_t addr;
	uint32_t len;
	uint16_t flags;
	uint16_t next;
};

static uint8_t ring[0x8000] __attribute__((aligned(4096)));
static struct {
	uint32_t type, ioprio;
	uint64_t sector;
} header;
static char sector[512];
static volatile uint8_t blk_status;
static volatile uint32_t interrupts;
static uint32_t block[WORDS];

static void irq(uint32_t vector)
{
	(void)vector;
	interrupts++;
	lapic_eoi();
}

static uint16_t iobase;
static struct vring_desc *desc;
static volatile uint16_t *avail, *used;
static uint32_t qsize;
static uint16_t submitted;

/* One request (type 0 read, 1 write) of `sector`, to completion. */
static void request(uint32_t type, uint32_t sec)
{
	header.type = type;
	header.sector = sec;
	blk_status = 0xFF;
	desc[1].flags = 1 | (type == 0 ? 2 : 0);
	avail[2 + submitted % qsize] = 0;
	barrier();
	avail[1] = ++submitted;
	uint32_t before = interrupts;
	outw(iobase + VP_QUEUE_NOTIFY, 0);
	uint32_t start = pm_timer();
	while (used[1] != submitted || interrupts == before) {
		if (pm_timer() - start > 5 * 3579545u)
			fail("request for sector %u not completed (used %u, submitted %u, irqs %u)",
			     sec, used[1], submitted, interrupts - before);
		sti_hlt();
		cli();
	}
	if (used[1] != submitted)
		fail("used ring at %u after %u requests", used[1], submitted);
	if (blk_status != 0)
		fail("sector %u: status %u", sec, blk_status);
}

static void setup(void)
{
	if (pci_read32(SLOT, 0, 0) != 0x10011AF4u)
		fail("no virtio-blk at slot %u", SLOT);
	iobase = (uint16_t)(pci_read32(SLOT, 0, 0x10) & ~3u);
	pci_write16(SLOT, 0, 0x04, pci_read16(SLOT, 0, 0x04) | 7);
	pic_mask_all();
	lapic_enable();
	set_irq_handler(IRQ_VECTOR, irq);
	outb(iobase + VP_STATUS, 0);
	outb(iobase + VP_STATUS, 3);
	outl(iobase + VP_GUEST_FEATURES, 0);
	/* MSI-X: the capability's table in its BAR; entry 0 to this CPU. */
	uint32_t cap = pci_read8(SLOT, 0, 0x34) & 0xFC;
	while (cap && pci_read8(SLOT, 0, cap) != 0x11)
		cap = pci_read8(SLOT, 0, cap + 1) & 0xFC;
	if (!cap)
		fail("no MSI-X");
	uint32_t table = pci_read32(SLOT, 0, cap + 4);
	uint32_t entry0 = (pci_read32(SLOT, 0, 0x10 + 4 * (table & 7)) & ~0xFu) + (table & ~7u);
	mmio_write32(entry0 + 0, 0xFEE00000u | (lapic_id() << 12));
	mmio_write32(entry0 + 4, 0);
	mmio_write32(entry0 + 8, IRQ_VECTOR);
	mmio_write32(entry0 + 12, 0);
	pci_write16(SLOT, 0, cap + 2, (uint16_t)((pci_read16(SLOT, 0, cap + 2) | 0x8000) & ~0x4000));
	outw(iobase + VP_QUEUE_SELECT, 0);
	qsize = inw(iobase + VP_QUEUE_SIZE);
	outw(iobase + VP_MSIX_CONFIG_VECTOR, VIRTIO_NO_VECTOR);
	outw(iobase + VP_MSIX_QUEUE_VECTOR, 0);
	desc = (struct vring_desc *)ring;
	avail = (volatile uint16_t *)(ring + 16 * qsize);
	used = (volatile uint16_t *)(ring + ((16 * qsize + 2 * (3 + qsize) + 4095) & ~4095u));
	outl(iobase + VP_QUEUE_PFN, (uint32_t)ring >> 12);
	outb(iobase + VP_STATUS, 7);
	desc[0] = (struct vring_desc){ (uint32_t)&header, sizeof(header), 1, 1 };
	desc[1] = (struct vring_desc){ (uint32_t)sector, sizeof(sector), 1, 2 };
	desc[2] = (struct vring_desc){ (uint32_t)&blk_status, 1, 2, 0 };
}

/* Round `round`'s sector: "SNAP", round, checksum, zeros. */
static void record(char *out, uint32_t round, uint32_t sum)
{
	for (size_t i = 0; i < 512; i++)
		out[i] = 0;
	uint32_t *w = (uint32_t *)out;
	w[0] = 0x50414E53u; /* "SNAP" */
	w[1] = round;
	w[2] = sum;
}

#define FWCFG_SELECTOR 0x510
#define FWCFG_DATA 0x511

static int fwcfg_present(void)
{
	outw(FWCFG_SELECTOR, 0);
	uint32_t sig = 0;
	for (int i = 0; i < 4; i++)
		sig |= (uint32_t)inb(FWCFG_DATA) << (8 * i);
	if (sig != 0x554D4551u) /* "QEMU" */
		return 0;
	outw(FWCFG_SELECTOR, 0);
	if (inb(FWCFG_DATA) != 'Q' || inb(FWCFG_DATA) != 'E')
		fail("fw_cfg signature reads differently the second time");
	return 1;
}

/* The optional fbuf: BAR0 its registers (width at 4, height at 6), BAR1
 * the frame buffer. */
static void paint_fbuf(void)
{
	if (pci_read32(FBUF_SLOT, 0, 0) != 0x40FBFB5Du)
		return;
	pci_write16(FBUF_SLOT, 0, 0x04, pci_read16(FBUF_SLOT, 0, 0x04) | 2);
	uint32_t regs = pci_read32(FBUF_SLOT, 0, 0x10) & ~0xFu;
	uint32_t fb = pci_read32(FBUF_SLOT, 0, 0x14) & ~0xFu;
	mmio_write32(regs + 4, FB_WIDTH | (uint32_t)FB_HEIGHT << 16);
	for (uint32_t i = 0; i < FB_WIDTH * FB_ROWS; i++)
		mmio_write32(fb + 4 * i, (i * 2654435761u) & 0xFFFFFFu);
	print("snapcheck fbuf painted\n");
}

void guest_main(void)
{
	setup();
	paint_fbuf();
	int fwcfg = fwcfg_present();
	uint32_t sum = 0x12345678;
	for (uint32_t i = 0; i < WORDS; i++)
		block[i] = i * 2654435761u;
	uint32_t sums[ROUNDS];
	uint32_t rounds = ROUNDS;
	size_t len;
	const char *value = cmdline_value("rounds", &len);
	if (value) {
		int ok;
		rounds = parse_u32(value, len, &ok);
		if (!ok || rounds < ROUNDS)
			fail("rounds= must be a number of at least %u", ROUNDS);
	}
	for (uint32_t round = 0; round < rounds; round++) {
		for (uint32_t i = 0; i < WORDS; i++) {
			block[i] = block[i] * 1103515245u + round + sum;
			sum = (sum << 5 | sum >> 27) ^ block[i];
		}
		sums[round % ROUNDS] = sum;
		record(sector, round % ROUNDS, sum);
		request(1, round % ROUNDS);
		if (round % 10 == 9)
			print("snapcheck round %u\n", round + 1);
	}
	print("snapcheck checksum %08x\n", sum);
	if (fwcfg) {
		uint8_t m = inb(FWCFG_DATA), u = inb(FWCFG_DATA);
		if (m != 'M' || u != 'U')
			fail("fw_cfg signature ends in %x %x, not MU", m, u);
		print("snapcheck fwcfg ok\n");
	}
	for (uint32_t round = 0; round < ROUNDS; round++) {
		request(0, round);
		char want[512];
		record(want, round, sums[round]);
		for (size_t i = 0; i < sizeof(want); i++)
			if (sector[i] != want[i])
				fail("sector %u reads back wrong at byte %u", round, (uint32_t)i);
	}
	print("snapcheck disk ok\n");
}
