//! The SCSI/MMC commands an ATAPI DVD drive answers inside PACKET, with
//! the responses bhyve's `handle_packet_cmd` gives (SPC-3 and MMC-6
//! layouts). Pure functions of the command block and the medium size, so
//! the controller only moves bytes.

use crate::identify::padded;

pub const TEST_UNIT_READY: u8 = 0x00;
pub const REQUEST_SENSE: u8 = 0x03;
pub const INQUIRY: u8 = 0x12;
pub const START_STOP_UNIT: u8 = 0x1B;
pub const PREVENT_ALLOW: u8 = 0x1E;
pub const READ_CAPACITY: u8 = 0x25;
pub const READ_10: u8 = 0x28;
pub const READ_TOC: u8 = 0x43;
pub const GET_EVENT_STATUS_NOTIFICATION: u8 = 0x4A;
pub const MODE_SENSE_10: u8 = 0x5A;
pub const REPORT_LUNS: u8 = 0xA0;
pub const READ_12: u8 = 0xA8;

/// CD/DVD logical block size.
pub const BLOCK: u64 = 2048;

pub const SENSE_ILLEGAL_REQUEST: u8 = 0x05;
/// Additional sense codes used here.
pub const ASC_INVALID_OPCODE: u8 = 0x20;
pub const ASC_LBA_OUT_OF_RANGE: u8 = 0x21;
pub const ASC_INVALID_FIELD: u8 = 0x24;
pub const ASC_SAVING_UNSUPPORTED: u8 = 0x39;
pub const ASC_REMOVAL_PREVENTED: u8 = 0x53;

/// Largest READ(10)/READ(12) served in one command, in blocks: a bound on
/// the work one guest command can cause (Linux asks for far less).
pub const MAX_READ_BLOCKS: u64 = 65535;

/// What a packet command asks of the controller.
#[derive(Debug, PartialEq, Eq)]
pub enum Reply {
    /// Send these bytes to the guest (already cut to the allocation length).
    Data(Vec<u8>),
    /// Read `blocks` blocks from block `lba` of the medium into the guest.
    Read { lba: u64, blocks: u64 },
    /// CHECK CONDITION with this sense key and additional sense code.
    Check(u8, u8),
}

fn be16(b: &[u8]) -> usize {
    usize::from(u16::from_be_bytes([b[0], b[1]]))
}

fn be32(b: &[u8]) -> u64 {
    u64::from(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
}

fn cut(mut v: Vec<u8>, len: usize) -> Reply {
    v.truncate(len);
    Reply::Data(v)
}

fn illegal(asc: u8) -> Reply {
    Reply::Check(SENSE_ILLEGAL_REQUEST, asc)
}

/// Minutes/seconds/frames of a block address (with the 2-second lead-in).
fn msf(lba: u64) -> [u8; 3] {
    let f = lba + 150;
    [((f / 75) / 60) as u8, ((f / 75) % 60) as u8, (f % 75) as u8]
}

/// An address field: 4-byte LBA or 0/M/S/F.
fn address(lba: u64, use_msf: bool) -> [u8; 4] {
    if use_msf {
        let m = msf(lba);
        [0, m[0], m[1], m[2]]
    } else {
        (lba as u32).to_be_bytes()
    }
}

/// Answer command block `cdb` for a medium of `size` bytes; `sense` is the
/// (key, asc) of the last failed command.
pub fn execute(cdb: &[u8; 16], size: u64, sense: (u8, u8)) -> Reply {
    let blocks = size / BLOCK;
    match cdb[0] {
        TEST_UNIT_READY | PREVENT_ALLOW => Reply::Data(Vec::new()),
        INQUIRY => inquiry(cdb),
        READ_CAPACITY => {
            let mut v = Vec::with_capacity(8);
            v.extend_from_slice(
                &(blocks.saturating_sub(1).min(u64::from(u32::MAX)) as u32).to_be_bytes(),
            );
            v.extend_from_slice(&(BLOCK as u32).to_be_bytes());
            Reply::Data(v)
        }
        READ_10 | READ_12 => {
            let lba = be32(&cdb[2..6]);
            let count = if cdb[0] == READ_10 {
                be16(&cdb[7..9]) as u64
            } else {
                be32(&cdb[6..10])
            };
            if count > MAX_READ_BLOCKS {
                illegal(ASC_INVALID_FIELD)
            } else if lba + count > blocks {
                illegal(ASC_LBA_OUT_OF_RANGE)
            } else {
                Reply::Read { lba, blocks: count }
            }
        }
        REQUEST_SENSE => {
            let mut v = vec![0u8; 18];
            v[0] = 0xF0;
            v[2] = sense.0;
            v[7] = 10;
            v[12] = sense.1;
            cut(v, usize::from(cdb[4]))
        }
        START_STOP_UNIT => match cdb[4] & 3 {
            // Eject: the medium is fixed to the image.
            2 => illegal(ASC_REMOVAL_PREVENTED),
            _ => Reply::Data(Vec::new()),
        },
        MODE_SENSE_10 => mode_sense(cdb),
        GET_EVENT_STATUS_NOTIFICATION => {
            // Only polled operation.
            if cdb[1] & 1 == 0 {
                return illegal(ASC_INVALID_FIELD);
            }
            let v = vec![0, 6, 0x04, 0x10, 0, 0x02, 0, 0];
            cut(v, be16(&cdb[7..9]))
        }
        READ_TOC => read_toc(cdb, blocks),
        REPORT_LUNS => {
            let mut v = vec![0u8; 16];
            v[3] = 8;
            Reply::Data(v)
        }
        _ => illegal(ASC_INVALID_OPCODE),
    }
}

fn inquiry(cdb: &[u8; 16]) -> Reply {
    let v = if cdb[1] & 1 != 0 {
        // Vital product data: only the list of pages, which lists itself.
        if cdb[2] != 0 {
            return illegal(ASC_INVALID_FIELD);
        }
        vec![0x05, 0, 0, 1, 0]
    } else {
        let mut v = vec![0x05, 0x80, 0x00, 0x21, 31, 0, 0, 0];
        v.extend(padded("BHYVE", 8));
        v.extend(padded("BHYVE DVD-ROM", 16));
        v.extend(padded("001", 4));
        v
    };
    cut(v, usize::from(cdb[4]))
}

fn mode_sense(cdb: &[u8; 16]) -> Reply {
    let len = be16(&cdb[7..9]);
    let control = cdb[2] >> 6;
    let page = cdb[2] & 0x3F;
    match (control, page) {
        (0, 0x01) => {
            // Read-write error recovery page.
            let mut v = vec![0u8; 16];
            v[1] = 14;
            v[2] = 0x70;
            v[8] = 0x01;
            v[9] = 6;
            v[11] = 0x05;
            cut(v, len)
        }
        (0, 0x2A) => {
            // CD capabilities and mechanical status page.
            let mut v = vec![0u8; 30];
            v[1] = 28;
            v[2] = 0x70;
            v[8] = 0x2A;
            v[9] = 20;
            v[10] = 0x08;
            v[12] = 0x71;
            v[18..20].copy_from_slice(&2u16.to_be_bytes());
            v[20..22].copy_from_slice(&512u16.to_be_bytes());
            cut(v, len)
        }
        (3, _) => illegal(ASC_SAVING_UNSUPPORTED),
        _ => illegal(ASC_INVALID_FIELD),
    }
}

fn read_toc(cdb: &[u8; 16], blocks: u64) -> Reply {
    let len = be16(&cdb[7..9]);
    let use_msf = cdb[1] & 2 != 0;
    match cdb[9] >> 6 {
        0 => {
            let start = cdb[6];
            if start > 1 && start != 0xAA {
                return illegal(ASC_INVALID_FIELD);
            }
            let mut v = vec![0, 0, 1, 1];
            if start <= 1 {
                v.extend_from_slice(&[0, 0x14, 1, 0]);
                v.extend_from_slice(&address(0, use_msf));
            }
            v.extend_from_slice(&[0, 0x14, 0xAA, 0]);
            v.extend_from_slice(&address(blocks, use_msf));
            let n = (v.len() - 2) as u16;
            v[0..2].copy_from_slice(&n.to_be_bytes());
            cut(v, len)
        }
        1 => {
            // Multi-session information: one session starting at track 1.
            let v = vec![0, 0x0A, 1, 1, 0, 0x14, 1, 0, 0, 0, 0, 0];
            cut(v, len)
        }
        2 => {
            // Raw TOC: points A0 (first track), A1 (last), A2 (lead-out), 1.
            let mut v = vec![0, 0, 1, 1];
            v.extend_from_slice(&[1, 0x14, 0, 0xA0, 0, 0, 0, 0, 1, 0, 0]);
            v.extend_from_slice(&[1, 0x14, 0, 0xA1, 0, 0, 0, 0, 1, 0, 0]);
            v.extend_from_slice(&[1, 0x14, 0, 0xA2, 0, 0, 0]);
            v.extend_from_slice(&address(blocks, use_msf));
            v.extend_from_slice(&[1, 0x14, 0, 1, 0, 0, 0]);
            v.extend_from_slice(&address(0, use_msf));
            let n = (v.len() - 2) as u16;
            v[0..2].copy_from_slice(&n.to_be_bytes());
            cut(v, len)
        }
        _ => illegal(ASC_INVALID_FIELD),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cdb(bytes: &[u8]) -> [u8; 16] {
        let mut c = [0u8; 16];
        c[..bytes.len()].copy_from_slice(bytes);
        c
    }

    #[test]
    fn capacity_and_reads() {
        let size = 10 * BLOCK + 100;
        assert_eq!(
            execute(&cdb(&[READ_CAPACITY]), size, (0, 0)),
            Reply::Data(vec![0, 0, 0, 9, 0, 0, 8, 0])
        );
        assert_eq!(
            execute(&cdb(&[READ_10, 0, 0, 0, 0, 8, 0, 0, 2]), size, (0, 0)),
            Reply::Read { lba: 8, blocks: 2 }
        );
        assert_eq!(
            execute(&cdb(&[READ_10, 0, 0, 0, 0, 9, 0, 0, 2]), size, (0, 0)),
            Reply::Check(SENSE_ILLEGAL_REQUEST, ASC_LBA_OUT_OF_RANGE)
        );
        assert_eq!(
            execute(
                &cdb(&[READ_12, 0, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF]),
                size,
                (0, 0)
            ),
            Reply::Check(SENSE_ILLEGAL_REQUEST, ASC_INVALID_FIELD)
        );
    }

    #[test]
    fn toc_and_sense() {
        let Reply::Data(t) = execute(
            &cdb(&[READ_TOC, 0, 0, 0, 0, 0, 0, 0, 100]),
            4 * BLOCK,
            (0, 0),
        ) else {
            panic!("no TOC")
        };
        assert_eq!(t.len(), 20);
        assert_eq!(&t[0..4], &[0, 18, 1, 1]);
        assert_eq!(&t[16..20], &[0, 0, 0, 4], "lead-out at block 4");
        let Reply::Data(s) = execute(&cdb(&[REQUEST_SENSE, 0, 0, 0, 18]), 0, (5, 0x21)) else {
            panic!("no sense")
        };
        assert_eq!((s[2], s[12]), (5, 0x21));
        assert_eq!(
            execute(&cdb(&[0xFF]), 0, (0, 0)),
            Reply::Check(SENSE_ILLEGAL_REQUEST, ASC_INVALID_OPCODE)
        );
    }
}
