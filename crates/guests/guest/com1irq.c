/*
 * com1irq: COM1's interrupt reaches the CPU through the IOAPIC.
 *
 * Routes IOAPIC pin 4 (ISA IRQ 4, edge, active high) to a vector, sets
 * MCR OUT2 and enables the transmitter-empty interrupt in IER.  The empty
 * THR raises it at once; the handler checks IIR says "THR empty", turns
 * the interrupt off again and acknowledges it.  Prints "com1 irq ok", or
 * FAIL if nothing arrives within about a second.
 */
#include "rt.h"

#define COM1_VECTOR 0x34
#define UART_IER 1
#define UART_IIR 2
#define UART_MCR 4
#define IER_ETBEI 0x02
#define IIR_ID_MASK 0x0F
#define IIR_THRE 0x02
#define MCR_DTR_RTS_OUT2 0x0B

static volatile uint32_t interrupts;
static volatile uint8_t iir_seen;

static void com1(uint32_t vector)
{
	(void)vector;
	iir_seen = inb(COM1_PORT + UART_IIR);
	outb(COM1_PORT + UART_IER, 0);
	interrupts++;
	lapic_eoi();
}

void guest_main(void)
{
	pic_mask_all();
	lapic_enable();
	set_irq_handler(COM1_VECTOR, com1);
	ioapic_route(COM1_IRQ, COM1_VECTOR, 0, lapic_id());
	outb(COM1_PORT + UART_MCR, MCR_DTR_RTS_OUT2);
	sti();
	/* Nothing is pending while IER is clear. */
	pm_delay_us(10000);
	if (interrupts)
		fail("interrupt with IER clear (IIR %02x)", iir_seen);
	cli();
	outb(COM1_PORT + UART_IER, IER_ETBEI);
	sti();
	uint32_t start = pm_timer();
	while (!interrupts && pm_timer() - start < 3579545u)
		;
	cli();
	if (!interrupts)
		fail("no COM1 interrupt within 1 s (IIR %02x)", inb(COM1_PORT + UART_IIR));
	if ((iir_seen & IIR_ID_MASK) != IIR_THRE)
		fail("IIR %02x in the handler, expected THR empty", iir_seen);
	print("com1 irq ok\n");
}
