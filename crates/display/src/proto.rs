//! RFB client-to-server messages (RFC 6143 §7.5 and QEMU's extended key
//! event), parsed from the bytes a client has sent so far. Every length
//! comes from the client, so nothing is trusted: a message is returned
//! only once all its bytes are there, `SetEncodings` holds at most 65,535
//! entries (its u16 count), and `ClientCutText`'s text is never buffered:
//! the parser reports its length and the caller discards that many bytes
//! as they arrive.

/// Encodings the server knows (RFC 6143 §7.7 and §7.8).
pub const ENCODING_RAW: i32 = 0;
pub const ENCODING_ZLIB: i32 = 6;
pub const ENCODING_ZRLE: i32 = 16;
pub const ENCODING_DESKTOP_SIZE: i32 = -223;
pub const ENCODING_QEMU_EXTENDED_KEY: i32 = -258;

/// A client's pixel format (RFC 6143 §7.4).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PixelFormat {
    pub bits_per_pixel: u8,
    pub depth: u8,
    pub big_endian: bool,
    pub true_colour: bool,
    pub red_max: u16,
    pub green_max: u16,
    pub blue_max: u16,
    pub red_shift: u8,
    pub green_shift: u8,
    pub blue_shift: u8,
}

impl PixelFormat {
    /// The server's own: 32 bpp B,G,R,X bytes, what fbuf's memory holds.
    pub const SERVER: PixelFormat = PixelFormat {
        bits_per_pixel: 32,
        depth: 32,
        big_endian: false,
        true_colour: true,
        red_max: 255,
        green_max: 255,
        blue_max: 255,
        red_shift: 16,
        green_shift: 8,
        blue_shift: 0,
    };

    pub fn to_bytes(self) -> [u8; 16] {
        let mut b = [0u8; 16];
        b[0] = self.bits_per_pixel;
        b[1] = self.depth;
        b[2] = self.big_endian.into();
        b[3] = self.true_colour.into();
        b[4..6].copy_from_slice(&self.red_max.to_be_bytes());
        b[6..8].copy_from_slice(&self.green_max.to_be_bytes());
        b[8..10].copy_from_slice(&self.blue_max.to_be_bytes());
        b[10] = self.red_shift;
        b[11] = self.green_shift;
        b[12] = self.blue_shift;
        b
    }

    fn from_bytes(b: &[u8]) -> Self {
        let u16_at = |i: usize| u16::from_be_bytes([b[i], b[i + 1]]);
        PixelFormat {
            bits_per_pixel: b[0],
            depth: b[1],
            big_endian: b[2] != 0,
            true_colour: b[3] != 0,
            red_max: u16_at(4),
            green_max: u16_at(6),
            blue_max: u16_at(8),
            red_shift: b[10],
            green_shift: b[11],
            blue_shift: b[12],
        }
    }

    /// True if pixels in this format are the server's bytes reordered:
    /// 32 bpp true colour, 8 bits per channel on byte boundaries.
    pub fn is_byte_reordering(&self) -> bool {
        let byte_channel =
            |max: u16, shift: u8| max == 255 && shift.is_multiple_of(8) && shift <= 24;
        self.bits_per_pixel == 32
            && self.true_colour
            && byte_channel(self.red_max, self.red_shift)
            && byte_channel(self.green_max, self.green_shift)
            && byte_channel(self.blue_max, self.blue_shift)
    }
}

/// How rectangles of pixels are sent.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum PixelEncoding {
    #[default]
    Raw,
    Zlib,
    Zrle,
}

/// What the server learnt from a `SetEncodings` message.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Encodings {
    /// The first of the encodings the server has that the client listed
    /// (clients list them in order of preference); Raw otherwise.
    pub pixels: PixelEncoding,
    pub desktop_size: bool,
    pub qemu_extended_key: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientMessage {
    SetPixelFormat(PixelFormat),
    SetEncodings(Encodings),
    UpdateRequest {
        incremental: bool,
        x: u16,
        y: u16,
        width: u16,
        height: u16,
    },
    Key {
        down: bool,
        keysym: u32,
    },
    /// QEMU's extended key event: the keysym and the XT key number.
    ExtendedKey {
        down: bool,
        keysym: u32,
        xt: u32,
    },
    Pointer {
        buttons: u8,
        x: u16,
        y: u16,
    },
    /// Clipboard text of this many bytes follows; it is discarded.
    CutText {
        len: u32,
    },
}

/// The outcome of looking at the bytes received so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Parsed {
    /// The next message and how many bytes it took.
    Message(ClientMessage, usize),
    /// The next message is not complete yet: at least this many bytes
    /// are needed in all.
    Incomplete(usize),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    #[error("unknown client message type {0}")]
    UnknownType(u8),
    #[error("unknown QEMU client message subtype {0}")]
    UnknownQemuSubtype(u8),
}

fn u16_at(b: &[u8], i: usize) -> u16 {
    u16::from_be_bytes([b[i], b[i + 1]])
}

fn u32_at(b: &[u8], i: usize) -> u32 {
    u32::from_be_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]])
}

/// Parse the first message in `buf`.
pub fn parse(buf: &[u8]) -> Result<Parsed, ProtocolError> {
    let Some(&kind) = buf.first() else {
        return Ok(Parsed::Incomplete(1));
    };
    let need = |n: usize| -> Option<Parsed> { (buf.len() < n).then_some(Parsed::Incomplete(n)) };
    let message = match kind {
        0 => {
            if let Some(p) = need(20) {
                return Ok(p);
            }
            (
                ClientMessage::SetPixelFormat(PixelFormat::from_bytes(&buf[4..20])),
                20,
            )
        }
        2 => {
            if let Some(p) = need(4) {
                return Ok(p);
            }
            let total = 4 + 4 * usize::from(u16_at(buf, 2));
            if let Some(p) = need(total) {
                return Ok(p);
            }
            let mut e = Encodings::default();
            let mut chosen = None;
            for at in (4..total).step_by(4) {
                let pixels = match u32_at(buf, at) as i32 {
                    ENCODING_RAW => Some(PixelEncoding::Raw),
                    ENCODING_ZLIB => Some(PixelEncoding::Zlib),
                    ENCODING_ZRLE => Some(PixelEncoding::Zrle),
                    ENCODING_DESKTOP_SIZE => {
                        e.desktop_size = true;
                        None
                    }
                    ENCODING_QEMU_EXTENDED_KEY => {
                        e.qemu_extended_key = true;
                        None
                    }
                    _ => None,
                };
                chosen = chosen.or(pixels);
            }
            e.pixels = chosen.unwrap_or_default();
            (ClientMessage::SetEncodings(e), total)
        }
        3 => {
            if let Some(p) = need(10) {
                return Ok(p);
            }
            (
                ClientMessage::UpdateRequest {
                    incremental: buf[1] != 0,
                    x: u16_at(buf, 2),
                    y: u16_at(buf, 4),
                    width: u16_at(buf, 6),
                    height: u16_at(buf, 8),
                },
                10,
            )
        }
        4 => {
            if let Some(p) = need(8) {
                return Ok(p);
            }
            (
                ClientMessage::Key {
                    down: buf[1] != 0,
                    keysym: u32_at(buf, 4),
                },
                8,
            )
        }
        5 => {
            if let Some(p) = need(6) {
                return Ok(p);
            }
            (
                ClientMessage::Pointer {
                    buttons: buf[1],
                    x: u16_at(buf, 2),
                    y: u16_at(buf, 4),
                },
                6,
            )
        }
        6 => {
            if let Some(p) = need(8) {
                return Ok(p);
            }
            (
                ClientMessage::CutText {
                    len: u32_at(buf, 4),
                },
                8,
            )
        }
        255 => {
            if let Some(p) = need(2) {
                return Ok(p);
            }
            if buf[1] != 0 {
                return Err(ProtocolError::UnknownQemuSubtype(buf[1]));
            }
            if let Some(p) = need(12) {
                return Ok(p);
            }
            (
                ClientMessage::ExtendedKey {
                    down: u16_at(buf, 2) != 0,
                    keysym: u32_at(buf, 4),
                    xt: u32_at(buf, 8),
                },
                12,
            )
        }
        other => return Err(ProtocolError::UnknownType(other)),
    };
    Ok(Parsed::Message(message.0, message.1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_parse_only_when_complete() {
        let key = [4, 1, 0, 0, 0, 0, 0xFF, 0x0D];
        for n in 0..key.len() {
            assert!(matches!(parse(&key[..n]), Ok(Parsed::Incomplete(_))));
        }
        assert_eq!(
            parse(&key),
            Ok(Parsed::Message(
                ClientMessage::Key {
                    down: true,
                    keysym: 0xFF0D
                },
                8
            ))
        );
        let mut enc = vec![2, 0, 0, 3];
        for e in [ENCODING_ZLIB, ENCODING_RAW, ENCODING_DESKTOP_SIZE] {
            enc.extend(e.to_be_bytes());
        }
        assert_eq!(parse(&enc[..15]), Ok(Parsed::Incomplete(16)));
        assert_eq!(
            parse(&enc),
            Ok(Parsed::Message(
                ClientMessage::SetEncodings(Encodings {
                    pixels: PixelEncoding::Zlib,
                    desktop_size: true,
                    qemu_extended_key: false
                }),
                16
            ))
        );
        assert_eq!(
            parse(&[6, 0, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF]),
            Ok(Parsed::Message(ClientMessage::CutText { len: u32::MAX }, 8)),
            "a 4 GiB clipboard is skipped, never buffered"
        );
        assert_eq!(parse(&[7]), Err(ProtocolError::UnknownType(7)));
        assert_eq!(parse(&[255, 1]), Err(ProtocolError::UnknownQemuSubtype(1)));
        let mut fmt = vec![0, 0, 0, 0];
        fmt.extend(PixelFormat::SERVER.to_bytes());
        assert_eq!(
            parse(&fmt),
            Ok(Parsed::Message(
                ClientMessage::SetPixelFormat(PixelFormat::SERVER),
                20
            ))
        );
    }
}
