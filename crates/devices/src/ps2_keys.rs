//! Keys from a remote console (VNC) as a PS/2 keyboard sends them, as
//! bhyve's `ps2kbd.c` does: an X keysym (or, from QEMU's extended key
//! event, an XT key number) becomes the key's make or break sequence in
//! scan code set 1 when the i8042 translates (the command byte's XLATE
//! bit, what firmware and OS drivers set), else in set 2.

/// One key: its set 1 and set 2 make codes, and whether both carry the
/// 0xE0 prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Key {
    pub set1: u8,
    pub set2: u8,
    pub extended: bool,
}

const fn k(set1: u8, set2: u8) -> Key {
    Key {
        set1,
        set2,
        extended: false,
    }
}

const fn e(set1: u8, set2: u8) -> Key {
    Key {
        set1,
        set2,
        extended: true,
    }
}

/// Every key a keysym can reach, by set 1 code (XT order).
const KEYS: &[Key] = &[
    k(0x01, 0x76), // Esc
    k(0x02, 0x16), // 1
    k(0x03, 0x1E),
    k(0x04, 0x26),
    k(0x05, 0x25),
    k(0x06, 0x2E),
    k(0x07, 0x36),
    k(0x08, 0x3D),
    k(0x09, 0x3E),
    k(0x0A, 0x46),
    k(0x0B, 0x45), // 0
    k(0x0C, 0x4E), // -
    k(0x0D, 0x55), // =
    k(0x0E, 0x66), // Backspace
    k(0x0F, 0x0D), // Tab
    k(0x10, 0x15), // q
    k(0x11, 0x1D),
    k(0x12, 0x24),
    k(0x13, 0x2D),
    k(0x14, 0x2C),
    k(0x15, 0x35),
    k(0x16, 0x3C),
    k(0x17, 0x43),
    k(0x18, 0x44),
    k(0x19, 0x4D), // p
    k(0x1A, 0x54), // [
    k(0x1B, 0x5B), // ]
    k(0x1C, 0x5A), // Enter
    k(0x1D, 0x14), // Left Ctrl
    k(0x1E, 0x1C), // a
    k(0x1F, 0x1B),
    k(0x20, 0x23),
    k(0x21, 0x2B),
    k(0x22, 0x34),
    k(0x23, 0x33),
    k(0x24, 0x3B),
    k(0x25, 0x42),
    k(0x26, 0x4B), // l
    k(0x27, 0x4C), // ;
    k(0x28, 0x52), // '
    k(0x29, 0x0E), // `
    k(0x2A, 0x12), // Left Shift
    k(0x2B, 0x5D), // backslash
    k(0x2C, 0x1A), // z
    k(0x2D, 0x22),
    k(0x2E, 0x21),
    k(0x2F, 0x2A),
    k(0x30, 0x32),
    k(0x31, 0x31),
    k(0x32, 0x3A), // m
    k(0x33, 0x41), // ,
    k(0x34, 0x49), // .
    k(0x35, 0x4A), // /
    k(0x36, 0x59), // Right Shift
    k(0x37, 0x7C), // keypad *
    k(0x38, 0x11), // Left Alt
    k(0x39, 0x29), // Space
    k(0x3A, 0x58), // Caps Lock
    k(0x3B, 0x05), // F1
    k(0x3C, 0x06),
    k(0x3D, 0x04),
    k(0x3E, 0x0C),
    k(0x3F, 0x03),
    k(0x40, 0x0B),
    k(0x41, 0x83),
    k(0x42, 0x0A),
    k(0x43, 0x01),
    k(0x44, 0x09), // F10
    k(0x45, 0x77), // Num Lock
    k(0x46, 0x7E), // Scroll Lock
    k(0x47, 0x6C), // keypad 7
    k(0x48, 0x75),
    k(0x49, 0x7D),
    k(0x4A, 0x7B), // keypad -
    k(0x4B, 0x6B),
    k(0x4C, 0x73),
    k(0x4D, 0x74),
    k(0x4E, 0x79), // keypad +
    k(0x4F, 0x69),
    k(0x50, 0x72),
    k(0x51, 0x7A),
    k(0x52, 0x70), // keypad 0
    k(0x53, 0x71), // keypad .
    k(0x57, 0x78), // F11
    k(0x58, 0x07), // F12
    e(0x1C, 0x5A), // keypad Enter
    e(0x1D, 0x14), // Right Ctrl
    e(0x35, 0x4A), // keypad /
    e(0x38, 0x11), // Right Alt
    e(0x47, 0x6C), // Home
    e(0x48, 0x75), // Up
    e(0x49, 0x7D), // Page Up
    e(0x4B, 0x6B), // Left
    e(0x4D, 0x74), // Right
    e(0x4F, 0x69), // End
    e(0x50, 0x72), // Down
    e(0x51, 0x7A), // Page Down
    e(0x52, 0x70), // Insert
    e(0x53, 0x71), // Delete
    e(0x5B, 0x1F), // Left Windows
    e(0x5C, 0x27), // Right Windows
    e(0x5D, 0x2F), // Menu
];

/// The key at XT number `xt` (0x80 set: the 0xE0-prefixed key), as QEMU's
/// extended key event numbers keys.
pub fn key_for_xt(xt: u32) -> Option<Key> {
    let extended = xt & 0x80 != 0;
    let code = u8::try_from(xt & !0x80).ok()?;
    KEYS.iter()
        .copied()
        .find(|key| key.set1 == code && key.extended == extended)
}

/// The key for an X keysym; shifted characters give their unshifted key
/// (the client sends Shift itself).
pub fn key_for_keysym(keysym: u32) -> Option<Key> {
    let xt = |code: u32| key_for_xt(code);
    match keysym {
        0x20 => xt(0x39),
        0x21..=0x7E => {
            let c = char::from_u32(keysym)?.to_ascii_lowercase();
            let code = match c {
                '1' | '!' => 0x02,
                '2' | '@' => 0x03,
                '3' | '#' => 0x04,
                '4' | '$' => 0x05,
                '5' | '%' => 0x06,
                '6' | '^' => 0x07,
                '7' | '&' => 0x08,
                '8' | '*' => 0x09,
                '9' | '(' => 0x0A,
                '0' | ')' => 0x0B,
                '-' | '_' => 0x0C,
                '=' | '+' => 0x0D,
                'q' => 0x10,
                'w' => 0x11,
                'e' => 0x12,
                'r' => 0x13,
                't' => 0x14,
                'y' => 0x15,
                'u' => 0x16,
                'i' => 0x17,
                'o' => 0x18,
                'p' => 0x19,
                '[' | '{' => 0x1A,
                ']' | '}' => 0x1B,
                'a' => 0x1E,
                's' => 0x1F,
                'd' => 0x20,
                'f' => 0x21,
                'g' => 0x22,
                'h' => 0x23,
                'j' => 0x24,
                'k' => 0x25,
                'l' => 0x26,
                ';' | ':' => 0x27,
                '\'' | '"' => 0x28,
                '`' | '~' => 0x29,
                '\\' | '|' => 0x2B,
                'z' => 0x2C,
                'x' => 0x2D,
                'c' => 0x2E,
                'v' => 0x2F,
                'b' => 0x30,
                'n' => 0x31,
                'm' => 0x32,
                ',' | '<' => 0x33,
                '.' | '>' => 0x34,
                '/' | '?' => 0x35,
                _ => return None,
            };
            xt(code)
        }
        0xFF08 => xt(0x0E),          // BackSpace
        0xFF09 | 0xFE20 => xt(0x0F), // Tab, ISO_Left_Tab
        0xFF0D => xt(0x1C),          // Return
        0xFF1B => xt(0x01),          // Escape
        0xFF14 => xt(0x46),          // Scroll_Lock
        0xFF50 => xt(0xC7),          // Home
        0xFF51 => xt(0xCB),          // Left
        0xFF52 => xt(0xC8),          // Up
        0xFF53 => xt(0xCD),          // Right
        0xFF54 => xt(0xD0),          // Down
        0xFF55 => xt(0xC9),          // Page_Up
        0xFF56 => xt(0xD1),          // Page_Down
        0xFF57 => xt(0xCF),          // End
        0xFF63 => xt(0xD2),          // Insert
        0xFF67 => xt(0xDD),          // Menu
        0xFF7F => xt(0x45),          // Num_Lock
        0xFF8D => xt(0x9C),          // KP_Enter
        0xFFAA => xt(0x37),          // KP_Multiply
        0xFFAB => xt(0x4E),          // KP_Add
        0xFFAD => xt(0x4A),          // KP_Subtract
        0xFFAE => xt(0x53),          // KP_Decimal
        0xFFAF => xt(0xB5),          // KP_Divide
        0xFFB0 => xt(0x52),          // KP_0
        0xFFB1 => xt(0x4F),
        0xFFB2 => xt(0x50),
        0xFFB3 => xt(0x51),
        0xFFB4 => xt(0x4B),
        0xFFB5 => xt(0x4C),
        0xFFB6 => xt(0x4D),
        0xFFB7 => xt(0x47),
        0xFFB8 => xt(0x48),
        0xFFB9 => xt(0x49),                              // KP_9
        0xFFBE..=0xFFC7 => xt(0x3B + (keysym - 0xFFBE)), // F1-F10
        0xFFC8 => xt(0x57),                              // F11
        0xFFC9 => xt(0x58),                              // F12
        0xFFE1 => xt(0x2A),                              // Shift_L
        0xFFE2 => xt(0x36),                              // Shift_R
        0xFFE3 => xt(0x1D),                              // Control_L
        0xFFE4 => xt(0x9D),                              // Control_R
        0xFFE5 => xt(0x3A),                              // Caps_Lock
        0xFFE7 | 0xFFE9 => xt(0x38),                     // Meta_L, Alt_L
        0xFFE8 | 0xFFEA => xt(0xB8),                     // Meta_R, Alt_R
        0xFFEB => xt(0xDB),                              // Super_L
        0xFFEC => xt(0xDC),                              // Super_R
        0xFFFF => xt(0xD3),                              // Delete
        _ => None,
    }
}

/// The bytes the keyboard sends for `key` going down or up; at most 3.
pub fn sequence(key: Key, down: bool, translated: bool) -> Vec<u8> {
    let mut out = Vec::with_capacity(3);
    if key.extended {
        out.push(0xE0);
    }
    if translated {
        out.push(if down { key.set1 } else { key.set1 | 0x80 });
    } else {
        if !down {
            out.push(0xF0);
        }
        out.push(key.set2);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn letters_digits_and_specials_map_to_their_keys() {
        let enter = key_for_keysym(0xFF0D).unwrap();
        assert_eq!(sequence(enter, true, true), [0x1C]);
        assert_eq!(sequence(enter, false, true), [0x9C]);
        assert_eq!(sequence(enter, false, false), [0xF0, 0x5A]);
        assert_eq!(
            key_for_keysym(u32::from('A')),
            key_for_keysym(u32::from('a'))
        );
        assert_eq!(key_for_keysym(u32::from('!')).unwrap().set1, 0x02);
        let up = key_for_keysym(0xFF52).unwrap();
        assert_eq!(sequence(up, true, true), [0xE0, 0x48]);
        assert_eq!(sequence(up, false, false), [0xE0, 0xF0, 0x75]);
        assert_eq!(key_for_keysym(0xFFC9).unwrap().set2, 0x07, "F12");
        assert_eq!(key_for_keysym(0x263A), None, "no key for a smiley");
        assert_eq!(key_for_xt(0x9D), key_for_keysym(0xFFE4));
        assert_eq!(key_for_xt(0x1_0000), None);
    }

    #[test]
    fn every_table_key_is_unique() {
        for (i, a) in KEYS.iter().enumerate() {
            for b in &KEYS[i + 1..] {
                assert!(
                    (a.set1, a.extended) != (b.set1, b.extended)
                        && (a.set2, a.extended) != (b.set2, b.extended),
                    "{a:?} {b:?}"
                );
            }
        }
    }
}
