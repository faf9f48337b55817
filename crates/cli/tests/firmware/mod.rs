//! What the firmware tests (uefi_firmware, uefi_vnc) share: the firmware
//! images and the firmware's console text.

use std::path::PathBuf;
use std::process::{Command, Stdio};

use rhyve_guests::workspace_root;

/// The firmware images (CODE, VARS template), built into the cache when
/// missing.
pub fn firmware() -> (PathBuf, PathBuf) {
    let script = workspace_root().join("scripts/build-uefi-firmware.sh");
    let out = Command::new(&script)
        .stderr(Stdio::inherit())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
    assert!(out.status.success(), "{} failed", script.display());
    let text = String::from_utf8(out.stdout).unwrap();
    let mut lines = text.lines().map(PathBuf::from);
    let code = lines.next().expect("no CODE path");
    let vars = lines.next().expect("no VARS path");
    (code, vars)
}

/// The firmware's COM1 output as text: ANSI escape sequences and carriage
/// returns left out.
pub fn strip_ansi(raw: &[u8]) -> String {
    let text = String::from_utf8_lossy(raw);
    let mut out = String::new();
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            if chars.peek() == Some(&'[') {
                chars.next();
                for c in chars.by_ref() {
                    if c.is_ascii_alphabetic() {
                        break;
                    }
                }
            }
            continue;
        }
        if c != '\r' {
            out.push(c);
        }
    }
    out
}
