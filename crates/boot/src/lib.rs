//! Guest boot: Linux boot protocol and PVH, ACPI, MPTable and SMBIOS tables.
