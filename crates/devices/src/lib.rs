//! Platform device models: 16550 UARTs, MC146818 RTC, ACPI PM, i8042, HPET, pc-testdev.
