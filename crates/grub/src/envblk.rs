//! GRUB's environment block (`grubenv`), as grub-core/lib/envblk.c keeps
//! it: the signature line `# GRUB Environment Block\n`, then `name=value`
//! lines (a backslash escapes the next byte, so values may hold `\` and
//! newlines), then `#` padding to the block's fixed size. Edits never
//! change the size: a longer value takes padding, a shorter one gives it
//! back, so `save_env` can rewrite the file's blocks in place.

/// The first line of every environment block.
pub const SIGNATURE: &[u8] = b"# GRUB Environment Block\n";

/// An environment block being read or edited.
pub struct EnvBlock {
    buf: Vec<u8>,
}

/// Just past the end of the line at `p` (escaped newlines do not end it).
fn next_line(buf: &[u8], mut p: usize) -> usize {
    while p < buf.len() {
        match buf[p] {
            b'\\' => p += 2,
            b'\n' => break,
            _ => p += 1,
        }
    }
    p + 1
}

/// Bytes of `value` once escaped.
fn escaped_len(value: &[u8]) -> usize {
    value.len() + value.iter().filter(|b| matches!(b, b'\\' | b'\n')).count()
}

/// Length of the (escaped) value starting at `p`, up to its newline.
fn value_len(buf: &[u8], p: usize) -> usize {
    let mut len = 0;
    while p + len < buf.len() && buf[p + len] != b'\n' {
        len += if buf[p + len] == b'\\' { 2 } else { 1 };
    }
    len
}

impl EnvBlock {
    /// A block read from a file; `None` unless it starts with the
    /// signature (GRUB's "invalid environment block").
    pub fn open(buf: Vec<u8>) -> Option<EnvBlock> {
        (buf.len() > SIGNATURE.len() && buf.starts_with(SIGNATURE)).then_some(EnvBlock { buf })
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.buf
    }

    /// The variables in order, values unescaped. A line without `=` or
    /// an unterminated last line ends the list, as in GRUB.
    pub fn vars(&self) -> Vec<(String, String)> {
        let buf = &self.buf;
        let mut out = Vec::new();
        let mut p = SIGNATURE.len();
        while p < buf.len() {
            if buf[p] != b'#' {
                let Some(eq) = buf[p..].iter().position(|&b| b == b'=') else {
                    break;
                };
                let name = &buf[p..p + eq];
                let start = p + eq + 1;
                let end = start + value_len(buf, start);
                if end >= buf.len() {
                    break;
                }
                let mut value = Vec::new();
                let mut i = start;
                while i < end {
                    if buf[i] == b'\\' {
                        i += 1;
                    }
                    value.push(buf[i]);
                    i += 1;
                }
                out.push((
                    String::from_utf8_lossy(name).into_owned(),
                    String::from_utf8_lossy(&value).into_owned(),
                ));
                p = end;
            }
            p = next_line(buf, p);
        }
        out
    }

    /// Where the line `name=` starts, if there is one.
    fn find(&self, name: &[u8], limit: usize) -> Option<usize> {
        let mut p = SIGNATURE.len();
        while p + name.len() + 1 < limit {
            if &self.buf[p..p + name.len()] == name && self.buf[p + name.len()] == b'=' {
                return Some(p);
            }
            p = next_line(&self.buf, p);
        }
        None
    }

    /// Set `name` to `value` in place; `false` (block unchanged) when the
    /// padding has no room for it or the block is malformed.
    pub fn set(&mut self, name: &str, value: &str) -> bool {
        let (name, value) = (name.as_bytes(), value.as_bytes());
        let end = self.buf.len();
        // The padding: the run of '#' at the end, after the last newline.
        let mut space = end - 1;
        while self.buf[space] == b'#' {
            space -= 1;
        }
        if self.buf[space] != b'\n' {
            return false;
        }
        space += 1;
        let vl = escaped_len(value);
        let mut p = match self.find(name, space) {
            Some(line) => {
                let p = line + name.len() + 1;
                let len = value_len(&self.buf, p);
                if p + len >= end || vl > len + (end - space) {
                    return false;
                }
                if vl < len {
                    self.buf.copy_within(p + len..end, p + vl);
                    self.buf[space - (len - vl)..space].fill(b'#');
                } else {
                    self.buf.copy_within(p + len..end - (vl - len), p + vl);
                }
                p
            }
            None => {
                if end - space < name.len() + 1 + vl + 1 {
                    return false;
                }
                self.buf[space..space + name.len()].copy_from_slice(name);
                self.buf[space + name.len()] = b'=';
                space + name.len() + 1
            }
        };
        for &b in value {
            if matches!(b, b'\\' | b'\n') {
                self.buf[p] = b'\\';
                p += 1;
            }
            self.buf[p] = b;
            p += 1;
        }
        self.buf[p] = b'\n';
        true
    }

    /// Remove `name`'s line, padding the end with `#`.
    pub fn delete(&mut self, name: &str) {
        let name = name.as_bytes();
        let end = self.buf.len();
        let Some(p) = self.find(name, end) else {
            return;
        };
        let len = name.len() + 1 + value_len(&self.buf, p + name.len() + 1);
        if p + len >= end {
            return;
        }
        let len = len + 1;
        self.buf.copy_within(p + len..end, p);
        self.buf[end - len..].fill(b'#');
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn block(body: &str, size: usize) -> EnvBlock {
        let mut b = SIGNATURE.to_vec();
        b.extend_from_slice(body.as_bytes());
        b.resize(size, b'#');
        EnvBlock::open(b).unwrap()
    }

    #[test]
    fn set_grows_shrinks_and_appends_in_place() {
        let mut e = block("saved_entry=0\nnext_entry=2\n", 1024);
        assert!(e.set("next_entry", ""));
        assert!(e.set("saved_entry", "Advanced options>Debian 6.1"));
        assert!(e.set("a", "x\\y\nz"));
        assert_eq!(e.as_bytes().len(), 1024);
        assert_eq!(
            e.vars(),
            [
                ("saved_entry".into(), "Advanced options>Debian 6.1".into()),
                ("next_entry".into(), "".into()),
                ("a".into(), "x\\y\nz".into()),
            ]
        );
        e.delete("saved_entry");
        assert_eq!(e.vars().len(), 2);
        assert!(e.as_bytes().ends_with(b"#"));
        assert_eq!(e.as_bytes().len(), 1024);
    }

    #[test]
    fn full_block_refuses_without_changing() {
        let mut e = block("a=1\n", SIGNATURE.len() + 6);
        let before = e.as_bytes().to_vec();
        assert!(!e.set("long_name", "long value"));
        assert_eq!(e.as_bytes(), before);
        assert!(e.set("a", "12"));
        assert!(e.set("a", "123"));
        assert!(!e.set("a", "1234"));
        assert_eq!(e.vars(), [("a".into(), "123".into())]);
        assert!(EnvBlock::open(b"# GRUB Environment Block".to_vec()).is_none());
        assert!(EnvBlock::open(b"#GRUB Environment Block\n####".to_vec()).is_none());
    }
}
