//! scripts/install.sh, README.md's install command, on a scratch prefix:
//! it puts the binaries, vmrun.sh and the systemd unit where the unit and
//! vmrun.sh look for them, the installed programs run from there, and
//! `--uninstall` removes exactly what was installed.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(files_under(&p));
        } else {
            out.push(p);
        }
    }
    out.sort();
    out
}

#[test]
fn install_and_uninstall_on_a_scratch_prefix() {
    let prefix = std::env::temp_dir().join(format!("rhyve-install-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&prefix);
    // Something of someone else's in the prefix, which uninstall must keep.
    std::fs::create_dir_all(prefix.join("bin")).unwrap();
    std::fs::write(prefix.join("bin/other-tool"), "keep me").unwrap();
    let built = Path::new(env!("CARGO_BIN_EXE_bhyve")).parent().unwrap();

    let out = Command::new(repo().join("scripts/install.sh"))
        .arg("--prefix")
        .arg(&prefix)
        .arg("--from")
        .arg(built)
        .output()
        .unwrap();
    assert!(out.status.success(), "install.sh: {out:?}");

    for bin in [
        "bhyve",
        "bhyvectl",
        "grub-bhyve",
        "rhyve-vhost-user",
        "rhyve-jailer",
    ] {
        let path = prefix.join("bin").join(bin);
        let mode = std::fs::metadata(&path)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
            .permissions()
            .mode();
        assert_eq!(mode & 0o111, 0o111, "{} is not executable", path.display());
    }
    // The installed programs run from there.
    let help = Command::new(prefix.join("bin/rhyve-vhost-user"))
        .arg("--help")
        .output()
        .unwrap();
    assert!(help.status.success(), "{help:?}");
    let list = Command::new(prefix.join("bin/bhyvectl"))
        .arg("--list")
        .env("RHYVE_VMM_DIR", prefix.join("vmm"))
        .output()
        .unwrap();
    assert!(list.status.success(), "{list:?}");

    // vmrun.sh and the unit point at the prefix, where the files are.
    let p = prefix.display().to_string();
    let vmrun = std::fs::read_to_string(prefix.join("share/rhyve/vmrun.sh")).unwrap();
    for line in [
        format!("BHYVE=${{BHYVE:-{p}/bin/bhyve}}"),
        format!("BHYVECTL=${{BHYVECTL:-{p}/bin/bhyvectl}}"),
        format!("GRUB_BHYVE=${{GRUB_BHYVE:-{p}/bin/grub-bhyve}}"),
    ] {
        assert!(vmrun.lines().any(|l| l == line), "vmrun.sh lacks {line}");
    }
    let unit =
        std::fs::read_to_string(prefix.join("lib/systemd/system/rhyve-vm@.service")).unwrap();
    let exec_paths: Vec<&str> = unit
        .lines()
        .filter_map(|l| {
            l.strip_prefix("ExecStart=")
                .or(l.strip_prefix("ExecStopPost=-"))
        })
        .filter_map(|cmd| cmd.split_whitespace().next())
        .collect();
    assert_eq!(exec_paths.len(), 2, "{unit}");
    for path in exec_paths {
        assert!(path.starts_with(&p), "{path} is outside the prefix");
        assert!(
            Path::new(path).is_file(),
            "the unit runs {path}, which is not installed"
        );
    }
    // vmrun.sh runs from its installed place (its usage message).
    let usage = Command::new(prefix.join("share/rhyve/vmrun.sh"))
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&usage.stdout).contains("Usage: vmrun.sh"),
        "{usage:?}"
    );

    let out = Command::new(repo().join("scripts/install.sh"))
        .arg("--uninstall")
        .arg("--prefix")
        .arg(&prefix)
        .output()
        .unwrap();
    assert!(out.status.success(), "install.sh --uninstall: {out:?}");
    assert_eq!(files_under(&prefix), vec![prefix.join("bin/other-tool")]);
    std::fs::remove_dir_all(&prefix).unwrap();
}
