//! bhyve's Capsicum step (`caph_enter` after set-up): which files the VM
//! keeps and which thread roles confine themselves, from the tree.
//! `security.sandbox=false` turns it off for debugging.

use std::path::{Path, PathBuf};

use rhyve_config::ConfigTree;
use rhyve_sandbox::{Policy, ThreadRole};

use crate::VmmError;

/// Start the sandbox unless `security.sandbox` is false: from here on every
/// thread is created confined; the main thread follows with
/// [`rhyve_sandbox::confine_supervisor`] when set-up is done.
pub fn start(tree: &ConfigTree, registry_root: &Path) -> Result<(), VmmError> {
    let Some(policy) = policy(tree, registry_root)? else {
        return Ok(());
    };
    rhyve_sandbox::start(policy).map_err(|e| VmmError::Setup(format!("sandbox: {e}")))
}

fn policy(tree: &ConfigTree, registry_root: &Path) -> Result<Option<Policy>, VmmError> {
    let config = |e: rhyve_config::ConfigError| VmmError::Config(e.to_string());
    if !tree.bool_or("security.sandbox", true).map_err(config)? {
        return Ok(None);
    }
    if !cfg!(debug_assertions) && tree.get_raw("security.test_open").is_some() {
        return Err(VmmError::Unsupported(
            "security.test_open is honoured only in debug builds".into(),
        ));
    }
    let test_violation = match tree.get("security.test_violation").map_err(config)? {
        None => None,
        Some(_) if !cfg!(debug_assertions) => {
            return Err(VmmError::Unsupported(
                "security.test_violation is honoured only in debug builds".into(),
            ))
        }
        Some(role) => Some(ThreadRole::from_name(&role).ok_or_else(|| {
            VmmError::Config(format!(
                "security.test_violation: no thread role \"{role}\""
            ))
        })?),
    };
    // What the VM was given: every existing absolute path the tree names
    // (disks, VARS file, sockets). Kernel and loader files are read during
    // set-up, before any of this applies, and are left out, as are the
    // sandbox's own test keys.
    let files: Vec<PathBuf> = tree
        .entries()
        .into_iter()
        .filter(|(key, _)| !key.starts_with("boot.") && !key.starts_with("security."))
        .map(|(_, value)| PathBuf::from(value))
        .filter(|p| p.is_absolute() && p.exists())
        .collect();
    Ok(Some(Policy {
        writable_dirs: vec![registry_root.to_path_buf()],
        files,
        test_violation,
    }))
}

/// Debug builds only: `security.test_open=PATH` makes the confined main
/// thread try to open PATH and say how it went, so a test can see which
/// files Landlock still lets the VM open.
#[cfg(debug_assertions)]
pub fn test_open(tree: &ConfigTree) {
    if let Ok(Some(path)) = tree.get("security.test_open") {
        match std::fs::File::open(&path) {
            Ok(_) => eprintln!("bhyve: sandbox test: open {path}: ok"),
            Err(e) => eprintln!("bhyve: sandbox test: open {path}: {e}"),
        }
    }
}
