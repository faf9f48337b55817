//! Every grub-bhyve command line and device map in libvirt's bhyve test
//! corpus (shared/corpus/libvirt, read at run time) must parse.

use std::path::{Path, PathBuf};

fn corpus() -> PathBuf {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/corpus/libvirt");
    assert!(
        p.is_dir(),
        "libvirt's test corpus is absent: expected it at {} (<workspace>/../shared/corpus/libvirt)",
        p.display()
    );
    p
}

fn files(dir: &Path, ext: &str, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            files(&p, ext, out);
        } else if p.extension().is_some_and(|x| x == ext) {
            out.push(p);
        }
    }
}

/// The shell words of an .ldargs file: backslash-newline joins lines,
/// single and double quotes group.
fn shell_words(text: &str) -> Vec<String> {
    let text = text.replace("\\\n", " ");
    let mut words = Vec::new();
    let mut cur = String::new();
    let mut in_word = false;
    let mut quote: Option<char> = None;
    for c in text.chars() {
        match (quote, c) {
            (Some(q), c) if c == q => quote = None,
            (Some(_), c) => cur.push(c),
            (None, '\'' | '"') => {
                quote = Some(c);
                in_word = true;
            }
            (None, c) if c.is_whitespace() => {
                if in_word {
                    words.push(std::mem::take(&mut cur));
                    in_word = false;
                }
            }
            (None, c) => {
                cur.push(c);
                in_word = true;
            }
        }
    }
    if in_word {
        words.push(cur);
    }
    words
}

#[test]
fn every_grub_bhyve_command_line_parses() {
    let mut all = Vec::new();
    files(&corpus(), "ldargs", &mut all);
    let mut checked = 0;
    for f in all {
        let words = shell_words(&std::fs::read_to_string(&f).unwrap());
        let Some(prog) = words.first() else { continue };
        if !prog.ends_with("grub-bhyve") {
            continue;
        }
        let o =
            rhyve_grub::parse_args(&words[1..]).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
        assert_eq!(o.device_map, "<device.map>", "{}", f.display());
        assert_eq!(o.memory, 214 << 20, "{}", f.display());
        assert_eq!(o.vm_name, "bhyve", "{}", f.display());
        assert!(
            ["cd", "hd0,msdos1"].contains(&o.root.as_str()),
            "{}: root {}",
            f.display(),
            o.root
        );
        if words.iter().any(|w| w == "--cons-dev") {
            assert_eq!(
                o.cons_dev.as_deref(),
                Some("/dev/nmdm0A"),
                "{}",
                f.display()
            );
        }
        checked += 1;
    }
    assert!(
        checked >= 3,
        "only {checked} grub-bhyve command lines found"
    );
    eprintln!("{checked} grub-bhyve command lines from libvirt's corpus parsed");
}

#[test]
fn every_device_map_parses() {
    let mut all = Vec::new();
    files(&corpus(), "devmap", &mut all);
    assert!(!all.is_empty(), "no .devmap files in the corpus");
    for f in &all {
        let text = std::fs::read_to_string(f).unwrap();
        let entries = rhyve_grub::parse_device_map(&text, Path::new("/work"))
            .unwrap_or_else(|e| panic!("{}: {e}", f.display()));
        assert!(!entries.is_empty(), "{}", f.display());
        for e in entries {
            assert!(e.path.is_absolute(), "{}", f.display());
            assert!(
                ["cd", "hd0"].contains(&e.name.as_str()),
                "{}: {}",
                f.display(),
                e.name
            );
        }
    }
    eprintln!("{} device maps from libvirt's corpus parsed", all.len());
}
