//! Memory sizes as bhyve reads them (`vm_parse_memsize` in libvmmapi).
//!
//! A plain number (strtoul(3) syntax: decimal, `0x` hex, leading-0 octal)
//! below 1 MiB is a count of MiB, kept for old command lines such as
//! `-m 512`; a plain number from 1 MiB up is bytes. Anything else goes
//! through expand_number(3): a number followed by one unit letter
//! `b k m g t p e` in either case, each a power of 1024.

use crate::cnum::strtou64_prefix;

const MIB: u64 = 1024 * 1024;

/// Parse a guest memory size the way `bhyve -m` does, returning bytes.
pub fn parse_memsize(s: &str) -> Result<u64, String> {
    let bad = || format!("invalid memsize '{s}'");
    let (value, rest) = strtou64_prefix(s).ok_or_else(bad)?;
    if rest.is_empty() {
        return Ok(if value < MIB { value * MIB } else { value });
    }
    let mut chars = rest.chars();
    let unit = chars.next().map(|c| c.to_ascii_lowercase());
    let shift = match unit {
        Some('b') => 0,
        Some('k') => 10,
        Some('m') => 20,
        Some('g') => 30,
        Some('t') => 40,
        Some('p') => 50,
        Some('e') => 60,
        _ => return Err(bad()),
    };
    if chars.next().is_some() {
        return Err(bad());
    }
    let bytes = value.checked_shl(shift).filter(|b| b >> shift == value);
    bytes.ok_or_else(bad)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units_either_case() {
        assert_eq!(parse_memsize("256M"), Ok(256 * MIB));
        assert_eq!(parse_memsize("2g"), Ok(2 << 30));
        assert_eq!(parse_memsize("1T"), Ok(1 << 40));
        assert_eq!(parse_memsize("512k"), Ok(512 << 10));
        assert_eq!(parse_memsize("0x10M"), Ok(16 * MIB));
    }

    #[test]
    fn plain_numbers() {
        assert_eq!(parse_memsize("214"), Ok(214 * MIB));
        assert_eq!(parse_memsize("1048575"), Ok(1_048_575 * MIB));
        assert_eq!(parse_memsize("1048576"), Ok(1_048_576));
        assert_eq!(parse_memsize("224395264"), Ok(224_395_264));
    }

    #[test]
    fn rejects_garbage() {
        for bad in [
            "bogus",
            "",
            "12X",
            "1GB",
            "-",
            "99999999999999999999",
            "16E",
        ] {
            assert!(parse_memsize(bad).is_err(), "{bad}");
        }
    }
}
