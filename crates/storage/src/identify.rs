//! The 512-byte IDENTIFY (PACKET) DEVICE data of a port, word for word as
//! bhyve's `ata_identify_init` fills it (ATA8-ACS field meanings), and the
//! helpers around it: ATA strings, the serial derived from the backing
//! path and the legacy CHS geometry.
//!
//! Unlike bhyve, which fills the block once at start-up, the data is built
//! when the guest asks for it, so the transfer mode selected with SET
//! FEATURES is what the next IDENTIFY reports (as on real drives).

use md5::{Digest, Md5};
use serde::{Deserialize, Serialize};

/// Default strings bhyve gives its drives.
pub const DISK_MODEL: &str = "BHYVE SATA DISK";
pub const CDROM_MODEL: &str = "BHYVE SATA DVD ROM";
pub const DEFAULT_REVISION: &str = "001";

/// UDMA mode 6, what a port starts in (ATA transfer mode encoding).
pub const XFER_UDMA6: u8 = 0x46;
const XFER_WDMA_CLASS: u8 = 0x20;
const XFER_UDMA_CLASS: u8 = 0x40;

/// What the guest sees of a drive beyond its size: the strings and the
/// rotation rate (`ser`, `rev`, `model`, `nmrr`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DriveIdentity {
    pub serial: Vec<u8>,
    pub revision: Vec<u8>,
    pub model: Vec<u8>,
    pub rotation_rate: u16,
}

/// bhyve's serial for a backing path: `BHYVE-XXXX-XXXX-XXXX` from the first
/// six bytes of the MD5 of the path string.
pub fn serial_from_path(path: &str) -> String {
    let d = Md5::digest(path.as_bytes());
    format!(
        "BHYVE-{:02X}{:02X}-{:02X}{:02X}-{:02X}{:02X}",
        d[0], d[1], d[2], d[3], d[4], d[5]
    )
}

/// Store `s` as an ATA string in `words`: two characters per word, first
/// one in the high byte, padded with spaces, cut at `words.len() * 2`.
fn ata_string(words: &mut [u16], s: &[u8]) {
    let byte = |i: usize| u16::from(s.get(i).copied().unwrap_or(b' '));
    for (k, w) in words.iter_mut().enumerate() {
        *w = (byte(2 * k) << 8) | byte(2 * k + 1);
    }
}

/// Space-padded fixed-width field (SCSI INQUIRY strings).
pub fn padded(s: &str, len: usize) -> Vec<u8> {
    let mut v: Vec<u8> = s.bytes().take(len).collect();
    v.resize(len, b' ');
    v
}

/// The legacy CHS geometry of a disk of `sectors` sectors (the VHD
/// algorithm bhyve's `blockif_chs` uses): (cylinders, heads, sectors/track).
pub fn chs(sectors: u64) -> (u16, u8, u8) {
    let total = sectors.min(65535 * 16 * 255);
    let (spt, heads, head_cyls) = if total >= 65536 * 16 * 63 {
        (255u64, 16u64, total / 255)
    } else {
        let mut spt = 17u64;
        let mut hc = total / spt;
        let mut heads = hc.div_ceil(1024).max(4);
        if hc >= heads * 1024 || heads > 16 {
            spt = 31;
            heads = 16;
            hc = total / spt;
        }
        if hc >= heads * 1024 {
            spt = 63;
            heads = 16;
            hc = total / spt;
        }
        (spt, heads, hc)
    };
    ((head_cyls / heads) as u16, heads as u8, spt as u8)
}

/// Geometry and capabilities of a disk, as IDENTIFY DEVICE reports them.
pub struct DiskGeometry {
    pub sector_size: u32,
    pub physical_sector_size: u32,
    pub size: u64,
    pub trim: bool,
}

/// Link speed bits as IDENTIFY word 77 reports them, from PxSSTS.
fn current_speed(ssts: u32) -> u16 {
    ((ssts & 0xF0) >> 3) as u16
}

fn with_modes(w: &mut [u16; 256], xfer: u8) {
    w[63] = 0x7;
    if xfer & 0xF8 == XFER_WDMA_CLASS {
        w[63] |= 1 << ((xfer & 7) + 8);
    }
    w[64] = 0x3;
    w[65] = 0x78;
    w[66] = 0x78;
    w[67] = 0x78;
    w[68] = 0x78;
    w[88] = 0x7F;
    if xfer & 0xF8 == XFER_UDMA_CLASS {
        w[88] |= 1 << ((xfer & 7) + 8);
    }
}

fn strings(w: &mut [u16; 256], id: &DriveIdentity) {
    ata_string(&mut w[10..20], &id.serial);
    ata_string(&mut w[23..27], &id.revision);
    ata_string(&mut w[27..47], &id.model);
    w[217] = id.rotation_rate;
}

fn finish(w: &[u16; 256]) -> [u8; 512] {
    let mut b = [0u8; 512];
    for (i, v) in w.iter().enumerate() {
        b[2 * i..2 * i + 2].copy_from_slice(&v.to_le_bytes());
    }
    b[510] = 0xA5;
    let sum = b[..511].iter().fold(0u8, |a, &x| a.wrapping_add(x));
    b[511] = 0u8.wrapping_sub(sum);
    b
}

/// IDENTIFY DEVICE for a disk.
pub fn disk(
    id: &DriveIdentity,
    g: &DiskGeometry,
    xfer: u8,
    mult_sectors: u8,
    ssts: u32,
) -> [u8; 512] {
    let mut w = [0u16; 256];
    let sectors = g.size / u64::from(g.sector_size.max(1));
    let (cyl, heads, spt) = chs(sectors);
    w[0] = 0x0040;
    w[1] = cyl;
    w[3] = u16::from(heads);
    w[6] = u16::from(spt);
    strings(&mut w, id);
    w[47] = 0x8000 | 128;
    // DMA, LBA, IORDY.
    w[49] = 0x0100 | 0x0200 | 0x0800;
    w[50] = 1 << 14;
    w[53] = 0x0002 | 0x0004;
    if mult_sectors != 0 {
        w[59] = 0x0100 | u16::from(mult_sectors);
    }
    let lba28 = if sectors <= 0x0FFF_FFFF {
        sectors as u32
    } else {
        0x0FFF_FFFF
    };
    w[60] = lba28 as u16;
    w[61] = (lba28 >> 16) as u16;
    with_modes(&mut w, xfer);
    w[75] = 31;
    // SATA gen 1-3, NCQ; RECEIVE/SEND FPDMA QUEUED and the link speed.
    w[76] = 0x0002 | 0x0004 | 0x0008 | 0x0100;
    w[77] = 0x0040 | current_speed(ssts);
    w[80] = 0x3F0;
    w[81] = 0x28;
    // Power management, write cache, look-ahead, NOP.
    let cmd1 = 0x0008 | 0x0020 | 0x0040 | 0x4000;
    // 48-bit addresses, FLUSH CACHE (EXT).
    let cmd2 = 0x0400 | 0x1000 | 0x2000;
    w[82] = cmd1;
    w[83] = cmd2 | 1 << 14;
    w[84] = 1 << 14;
    w[85] = cmd1;
    w[86] = cmd2 | 1 << 15;
    w[87] = 1 << 14;
    for (i, word) in w[100..104].iter_mut().enumerate() {
        *word = (sectors >> (16 * i)) as u16;
    }
    if g.trim {
        // Deterministic read after TRIM, reads zeroes; one DSM block.
        w[69] |= 0x0020 | 0x4000;
        w[105] = 1;
        w[169] = 0x0001;
    }
    let ss = g.sector_size.max(512);
    w[106] = 0x4000;
    w[209] = 0x4000;
    if g.physical_sector_size > ss {
        w[106] |= 0x2000 | (g.physical_sector_size / ss).trailing_zeros() as u16;
    }
    if ss > 512 {
        w[106] |= 0x1000;
        let words = ss / 2;
        w[117] = words as u16;
        w[118] = (words >> 16) as u16;
    }
    // READ/WRITE LOG DMA EXT.
    w[119] = 0x0008 | 1 << 14;
    w[120] = 0x0008 | 1 << 14;
    w[222] = 0x1020;
    finish(&w)
}

/// IDENTIFY PACKET DEVICE for the DVD drive.
pub fn cdrom(id: &DriveIdentity, xfer: u8, ssts: u32) -> [u8; 512] {
    let mut w = [0u16; 256];
    // ATAPI, CD-ROM, removable, fast DRQ.
    w[0] = 0x8000 | 0x0500 | 0x0080 | 0x0040;
    strings(&mut w, id);
    w[49] = 0x0200 | 0x0100;
    w[50] = 1 << 14 | 1;
    w[53] = 0x0002 | 0x0004;
    w[62] = 0x3F;
    with_modes(&mut w, xfer);
    w[76] = 0x0002 | 0x0004 | 0x0008;
    w[77] = current_speed(ssts);
    w[78] = 0x0010;
    w[80] = 0x3F0;
    // Power management, PACKET, DEVICE RESET, NOP.
    let cmd1 = 0x0008 | 0x0010 | 0x0200 | 0x4000;
    w[82] = cmd1;
    w[83] = 1 << 14;
    w[84] = 1 << 14;
    w[85] = cmd1;
    w[87] = 1 << 14;
    w[222] = 0x1020;
    finish(&w)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ident() -> DriveIdentity {
        DriveIdentity {
            serial: b"SER".to_vec(),
            revision: DEFAULT_REVISION.as_bytes().to_vec(),
            model: DISK_MODEL.as_bytes().to_vec(),
            rotation_rate: 1,
        }
    }

    #[test]
    fn serial_is_bhyves_md5_form() {
        let s = serial_from_path("/tmp/a.img");
        assert_eq!(s.len(), 20);
        assert!(s.starts_with("BHYVE-"));
        // MD5("") = d41d8cd98f00b204...
        assert_eq!(serial_from_path(""), "BHYVE-D41D-8CD9-8F00");
    }

    #[test]
    fn strings_are_byte_swapped_and_checksum_closes() {
        let g = DiskGeometry {
            sector_size: 512,
            physical_sector_size: 4096,
            size: 1 << 30,
            trim: true,
        };
        let b = disk(&ident(), &g, XFER_UDMA6, 128, 0x143);
        assert_eq!(&b[54..60], b"HBVY E");
        assert_eq!(b.iter().fold(0u8, |a, &x| a.wrapping_add(x)), 0);
        assert_eq!(b[510], 0xA5);
        let w = |i: usize| u16::from_le_bytes([b[2 * i], b[2 * i + 1]]);
        assert_eq!(w(100), 0, "2 Mi sectors");
        assert_eq!(w(101), 0x20);
        assert_eq!(w(106), 0x6003, "8 logical per physical");
        assert_eq!(w(88), 0x407F, "UDMA6 selected");
        assert_eq!(w(169), 1);
        let c = cdrom(&ident(), XFER_UDMA6, 0x143);
        assert_eq!(c[1] & 0x80, 0x80);
        assert_eq!(c.iter().fold(0u8, |a, &x| a.wrapping_add(x)), 0);
    }

    #[test]
    fn chs_matches_the_vhd_algorithm() {
        assert_eq!(chs(2048), (30, 4, 17));
        assert_eq!(chs(1 << 40), (65535, 16, 255));
        let (c, h, s) = chs(20_000_000);
        assert_eq!((h, s), (16, 63));
        assert_eq!(u64::from(c), 20_000_000 / 63 / 16);
    }
}
