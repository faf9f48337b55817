//! Entry point shared by the cargo-fuzz target (`fuzz/`) and the bounded
//! smoke run in the test suite: arbitrary bytes as a `-k` config file,
//! read into bhyve's default tree, then every value fetched (with its
//! `%(var)` references expanded) and every check bhyve makes before
//! building the VM. A panic, a hang or a runaway allocation is a bug; an
//! error is fine.

use crate::tree::ConfigTree;

/// A `-k` file's bytes, as `bhyve -k FILE` reads them.
pub fn config_file(data: &[u8]) {
    let mut tree: ConfigTree = crate::cli::default_tree();
    let text = String::from_utf8_lossy(data);
    if crate::cli::parse_config_text(&mut tree, "fuzz.cfg", &text).is_err() {
        return;
    }
    for (path, _) in tree.entries() {
        let _ = tree.get(&path);
        let _ = tree.get_bool(&path);
        let _ = tree.get_u64(&path);
    }
    let _ = tree.dump();
    let _ = crate::check::validate(&tree);
    let _ = crate::check::topology(&tree);
    let _ = crate::check::memory_size(&tree);
    let _ = crate::check::numa_domains(&tree);
    let _ = crate::check::pci_functions(&tree);
    if let Ok(t) = crate::check::topology(&tree) {
        let _ = crate::check::vcpu_pinning(&tree, t.cpus);
    }
}
