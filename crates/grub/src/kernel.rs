//! The checks GRUB's `linux` makes on a kernel before accepting it
//! (grub-core/loader/i386/linux.c), plus what rhyve's loader needs to
//! start it, so a file that is not a bootable kernel fails at `linux`
//! with GRUB's message instead of ending grub-bhyve after `boot`.
//!
//! Accepted: a bzImage with boot protocol 2.12 or later and a 64-bit
//! entry point (XLF_KERNEL_64), the way rhyve boots Linux; and, as rhyve's
//! direct kernel boot does, a 64-bit ELF with a PVH entry note whose
//! loadable segments lie at or above 1 MiB.

const SETUP_HEADER_END: usize = 0x268;
const MAX_SETUP_SECTS: u8 = 64;
const LOADED_HIGH: u8 = 1;
const XLF_KERNEL_64: u16 = 1;
const PT_LOAD: u32 = 1;
const PT_NOTE: u32 = 4;
const XEN_ELFNOTE_PHYS32_ENTRY: u32 = 18;
const ONE_MIB: u64 = 1 << 20;

fn u16_at(b: &[u8], o: usize) -> u16 {
    u16::from_le_bytes([b[o], b[o + 1]])
}
fn u32_at(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
}
fn u64_at(b: &[u8], o: usize) -> u64 {
    let mut v = [0u8; 8];
    v.copy_from_slice(&b[o..o + 8]);
    u64::from_le_bytes(v)
}

/// `Ok` when `image` can be booted; GRUB's error message otherwise.
pub fn check(path: &str, image: &[u8]) -> Result<(), String> {
    if image.starts_with(b"\x7fELF") {
        return check_elf(image);
    }
    if image.len() < SETUP_HEADER_END {
        return Err(format!("premature end of file {path}"));
    }
    if u16_at(image, 0x1FE) != 0xAA55 {
        return Err("invalid magic number".to_string());
    }
    if image[0x1F1] > MAX_SETUP_SECTS {
        return Err("too many setup sectors".to_string());
    }
    let version = u16_at(image, 0x206);
    if &image[0x202..0x206] != b"HdrS" || version < 0x0203 {
        return Err("version too old for 32-bit boot".to_string());
    }
    if image[0x211] & LOADED_HIGH == 0 {
        return Err("zImage doesn't support 32-bit boot".to_string());
    }
    if version < 0x020C || u16_at(image, 0x236) & XLF_KERNEL_64 == 0 {
        return Err(format!(
            "kernel has no 64-bit entry point (boot protocol {}.{:02}; grub-bhyve needs 2.12 with XLF_KERNEL_64)",
            version >> 8,
            version & 0xFF
        ));
    }
    Ok(())
}

fn check_elf(image: &[u8]) -> Result<(), String> {
    let bad = |why: &str| Err(format!("invalid ELF kernel: {why}"));
    if image.len() < 64 || image[4] != 2 || image[5] != 1 {
        return bad("not a 64-bit little-endian ELF");
    }
    let phoff = u64_at(image, 0x20);
    let phentsize = u16_at(image, 0x36);
    let phnum = u64::from(u16_at(image, 0x38));
    if phentsize != 56 {
        return bad("unexpected program header size");
    }
    let mut pvh = false;
    for i in 0..phnum {
        let Some(ph) = phoff
            .checked_add(i * 56)
            .and_then(|o| usize::try_from(o).ok())
            .and_then(|o| image.get(o..o.checked_add(56)?))
        else {
            return bad("program headers past the end of the file");
        };
        let (kind, offset, paddr, filesz) =
            (u32_at(ph, 0), u64_at(ph, 8), u64_at(ph, 24), u64_at(ph, 32));
        if kind == PT_LOAD && filesz > 0 && paddr < ONE_MIB {
            return bad(&format!("a segment loads at {paddr:#x}, below 1 MiB"));
        }
        if kind == PT_NOTE {
            let notes = usize::try_from(offset)
                .ok()
                .zip(usize::try_from(filesz).ok())
                .and_then(|(o, n)| image.get(o..o.checked_add(n)?));
            pvh |= notes.is_some_and(has_pvh_entry);
        }
    }
    if !pvh {
        return bad("no PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY); use a bzImage");
    }
    Ok(())
}

/// Whether an ELF note area holds Xen's PVH entry point note.
fn has_pvh_entry(mut notes: &[u8]) -> bool {
    while notes.len() >= 12 {
        let namesz = u32_at(notes, 0) as usize;
        let descsz = u32_at(notes, 4) as usize;
        let kind = u32_at(notes, 8);
        let name_end = 12 + namesz.div_ceil(4) * 4;
        let Some(end) = descsz
            .checked_add(3)
            .map(|d| d / 4 * 4)
            .and_then(|d| name_end.checked_add(d))
        else {
            return false;
        };
        if end > notes.len() {
            return false;
        }
        if kind == XEN_ELFNOTE_PHYS32_ENTRY && notes[12..12 + namesz].starts_with(b"Xen") {
            return true;
        }
        notes = &notes[end..];
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The smallest image that passes: a bzImage setup header of 2.15.
    pub fn bzimage() -> Vec<u8> {
        let mut k = vec![0u8; 0x1000];
        k[0x1F1] = 4;
        k[0x1FE..0x200].copy_from_slice(&0xAA55u16.to_le_bytes());
        k[0x202..0x206].copy_from_slice(b"HdrS");
        k[0x206..0x208].copy_from_slice(&0x020Fu16.to_le_bytes());
        k[0x211] = LOADED_HIGH;
        k[0x236..0x238].copy_from_slice(&XLF_KERNEL_64.to_le_bytes());
        k
    }

    #[test]
    fn grub_messages() {
        assert_eq!(check("/k", &bzimage()), Ok(()));
        assert_eq!(check("/k", b"text"), Err("premature end of file /k".into()));
        assert_eq!(
            check("/k", &[0u8; 4096]),
            Err("invalid magic number".into())
        );
        let mut k = bzimage();
        k[0x1F1] = 65;
        assert_eq!(check("/k", &k), Err("too many setup sectors".into()));
        let mut k = bzimage();
        k[0x206] = 0x02;
        assert_eq!(
            check("/k", &k),
            Err("version too old for 32-bit boot".into())
        );
        let mut k = bzimage();
        k[0x211] = 0;
        assert!(check("/k", &k).unwrap_err().starts_with("zImage"));
        let mut k = bzimage();
        k[0x236] = 0;
        assert!(check("/k", &k).unwrap_err().contains("64-bit entry point"));
        assert!(check("/k", b"\x7fELF\x01").unwrap_err().contains("64-bit"));
    }
}
