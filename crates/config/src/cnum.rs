//! The C number readers bhyve's parsers lean on, with their quirks kept.
//!
//! bhyve reads slot numbers, pinning pairs and passthru addresses with
//! sscanf(3) `%d` (leading blanks, a sign, digits, and whatever follows is
//! left unread) and topology values with strtol(3) base 0 over the whole
//! string. Reproducing these exactly is what makes `-s 1:x,...` or
//! `-p 0:1junk` behave as they do under bhyve.

const BLANKS: [char; 6] = [' ', '\t', '\n', '\r', '\x0b', '\x0c'];

/// Split a strtoul(3)-style unsigned number off the front of `s`: returns the
/// value and the rest, or `None` when there are no digits or it overflows.
pub fn strtou64_prefix(s: &str) -> Option<(u64, &str)> {
    let t = s.trim_start_matches([' ', '\t', '\n', '\r', '\x0b', '\x0c']);
    let t = t.strip_prefix('+').unwrap_or(t);
    let (radix, digits) = if let Some(h) = t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        if h.starts_with(|c: char| c.is_ascii_hexdigit()) {
            (16, h)
        } else {
            // "0x" with no hex digit after it: strtoul reads just the "0".
            (10, &t[..1])
        }
    } else if t.starts_with('0') {
        (8, t)
    } else {
        (10, t)
    };
    let end = digits
        .find(|c: char| !c.is_digit(radix))
        .unwrap_or(digits.len());
    if end == 0 {
        return None;
    }
    let value = u64::from_str_radix(&digits[..end], radix).ok()?;
    let consumed = digits.as_ptr() as usize + end - s.as_ptr() as usize;
    Some((value, &s[consumed..]))
}

/// sscanf(3) `%d`: the value and the unread rest, or `None` when no digits
/// follow (or the value does not fit an `int`).
pub fn scan_int(s: &str) -> Option<(i64, &str)> {
    let t = s.trim_start_matches(BLANKS);
    let (negative, t) = match t.as_bytes().first() {
        Some(b'-') => (true, &t[1..]),
        Some(b'+') => (false, &t[1..]),
        _ => (false, t),
    };
    let end = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    if end == 0 {
        return None;
    }
    let magnitude: i64 = t[..end].parse().ok()?;
    let value = if negative { -magnitude } else { magnitude };
    i32::try_from(value).ok()?;
    Some((value, &t[end..]))
}

/// sscanf(3) with a format like `%d<sep>%d<sep>%d` (at most `max` numbers):
/// the numbers matched before the first mismatch, in order.
pub fn scan_list(s: &str, sep: char, max: usize) -> Vec<i64> {
    let mut out = Vec::new();
    let mut rest = s;
    while out.len() < max {
        let Some((value, after)) = scan_int(rest) else {
            break;
        };
        out.push(value);
        match after.strip_prefix(sep) {
            Some(next) => rest = next,
            None => break,
        }
    }
    out
}

/// strtol(3) with base 0 over the whole string (no trailing characters
/// allowed), as bhyve's `parse_int_value` uses it.
pub fn strtol_full(s: &str) -> Option<i64> {
    let t = s.trim_start_matches(BLANKS);
    let (negative, t) = match t.as_bytes().first() {
        Some(b'-') => (true, &t[1..]),
        Some(b'+') => (false, &t[1..]),
        _ => (false, t),
    };
    let (radix, digits) = if let Some(h) = t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        (16, h)
    } else if t.len() > 1 && t.starts_with('0') {
        (8, &t[1..])
    } else {
        (10, t)
    };
    if digits.is_empty() || !digits.chars().all(|c| c.is_digit(radix)) {
        return None;
    }
    let magnitude = i64::from_str_radix(digits, radix).ok()?;
    Some(if negative { -magnitude } else { magnitude })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scanf_d() {
        assert_eq!(scan_int(" 12:3"), Some((12, ":3")));
        assert_eq!(scan_int("-4x"), Some((-4, "x")));
        assert_eq!(scan_int("x"), None);
        assert_eq!(scan_int("99999999999"), None);
        assert_eq!(scan_list("0:3:1", ':', 3), vec![0, 3, 1]);
        assert_eq!(scan_list("1:x", ':', 3), vec![1]);
        assert_eq!(scan_list("3/0/0", '/', 3), vec![3, 0, 0]);
    }

    #[test]
    fn strtol_base0() {
        assert_eq!(strtol_full("0x10"), Some(16));
        assert_eq!(strtol_full("010"), Some(8));
        assert_eq!(strtol_full("0"), Some(0));
        assert_eq!(strtol_full("-3"), Some(-3));
        assert_eq!(strtol_full("4x"), None);
        assert_eq!(strtol_full(""), None);
    }
}
