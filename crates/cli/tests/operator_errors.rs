//! Operator mistakes get one error line naming the real cause and bhyve's
//! exit status (4), before any guest runs: guest RAM too small for the
//! kernel, a truncated kernel, more sockets than the firmware tables hold,
//! a device on a PCI bus the tables do not describe, NVMe options rhyve
//! cannot honour.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use rhyve_guests::{guest_args, require_kvm, run_bhyve, vm_name, RunResult};

/// Debian's kernel, fetched once for the tests of this file (which run in
/// parallel; the fetch script is not made for concurrent runs).
fn debian_kernel() -> &'static PathBuf {
    static KERNEL: OnceLock<PathBuf> = OnceLock::new();
    KERNEL.get_or_init(rhyve_guests::debian_kernel)
}

fn bhyve(args: &[String]) -> RunResult {
    require_kvm();
    run_bhyve(
        Path::new(env!("CARGO_BIN_EXE_bhyve")),
        args,
        Duration::from_secs(60),
    )
}

/// Exit 4 with exactly one stderr line containing every one of `parts`.
fn assert_refused(run: &RunResult, parts: &[&str]) {
    run.assert_code(4);
    let lines: Vec<&str> = run.stderr.lines().collect();
    assert_eq!(lines.len(), 1, "one error line\n{}", run.describe());
    assert!(lines[0].starts_with("bhyve: "), "{}", run.describe());
    for part in parts {
        assert!(lines[0].contains(part), "no {part:?}\n{}", run.describe());
    }
}

/// `-m 1` (1 MiB) or `-m 8M` with a kernel: the RAM is too small, said so
/// with both sizes, for a bzImage and for an ELF (PVH) kernel.
#[test]
fn too_little_ram_for_the_kernel_is_named_with_sizes() {
    let kernel = debian_kernel();
    for (m, have) in [("1", "has 1 MiB"), ("8M", "has 8 MiB")] {
        let mut args = vec![
            "-m".to_string(),
            m.to_string(),
            "-o".to_string(),
            format!("boot.kernel={}", kernel.display()),
        ];
        args.extend(["-s", "0,hostbridge", "-s", "31,lpc"].map(String::from));
        args.push(vm_name(&format!("ram-{m}")));
        let run = bhyve(&args);
        assert_refused(&run, &["guest memory is too small", "needs", have]);
    }
    let run = bhyve(&guest_args(
        "exitcodes",
        "poweroff",
        &["-m", "1"],
        "ram-elf",
    ));
    assert_refused(
        &run,
        &["guest memory is too small", "needs 2 MiB", "has 1 MiB"],
    );
}

/// A bzImage cut short is refused (its header says how long it is), not
/// booted into a silent triple fault.
#[test]
fn a_truncated_bzimage_is_refused() {
    let kernel = std::fs::read(debian_kernel()).unwrap();
    let cut = std::env::temp_dir().join(format!("{}.bz", vm_name("cut")));
    std::fs::write(&cut, &kernel[..kernel.len() / 2]).unwrap();
    let mut args = vec![
        "-m".to_string(),
        "256M".to_string(),
        "-o".to_string(),
        format!("boot.kernel={}", cut.display()),
    ];
    args.extend(["-s", "0,hostbridge", "-s", "31,lpc"].map(String::from));
    args.push(vm_name("cut"));
    let run = bhyve(&args);
    let _ = std::fs::remove_file(&cut);
    assert_refused(
        &run,
        &["truncated", &format!("the file has {}", kernel.len() / 2)],
    );
}

/// `-c 68` is 68 sockets, one SMBIOS processor structure each: more than
/// bhyve's SMBIOS area holds. The error says so, with the maximum and the
/// way out, which then boots.
#[test]
fn more_sockets_than_smbios_holds_are_refused_with_the_maximum() {
    let run = bhyve(&guest_args("smp", "", &["-c", "68"], "c68"));
    assert_refused(
        &run,
        &[
            "-c 68",
            "68 sockets",
            "SMBIOS",
            "at most 67 sockets",
            "sockets=1,cores=68",
        ],
    );
    let run = bhyve(&guest_args(
        "exitcodes",
        "poweroff",
        &["-c", "68,sockets=1,cores=68"],
        "c68c",
    ));
    run.assert_code(1);
    run.assert_line("exitcodes: poweroff");
    // KVM's own limit (KVM_CAP_MAX_VCPUS) in bhyve's words.
    let run = bhyve(&guest_args(
        "exitcodes",
        "poweroff",
        &["-c", "65535"],
        "cmax",
    ));
    assert_refused(&run, &["65535 vCPUs requested but only", "available"]);
}

/// A device on PCI bus 1: refused at VM start naming the slot, not in the
/// middle of building the ACPI tables.
#[test]
fn a_device_on_another_pci_bus_is_refused_naming_the_slot() {
    let run = bhyve(&guest_args(
        "pcienum",
        "",
        &["-s", "1:3:0,virtio-rnd"],
        "bus1",
    ));
    assert_refused(&run, &["pci slot 1:3:0", "PCI bus 1 is not supported"]);
}

/// fbuf's options: bhyve's resolution limits and address syntax, and a
/// VNC port already taken, each one line and exit 4.
#[test]
fn bad_fbuf_options_and_a_taken_vnc_port_are_named() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    for (fbuf, parts) in [
        (
            "29,fbuf,w=100".to_string(),
            vec!["fbuf: minimum resolution is 640x480"],
        ),
        (
            "29,fbuf,w=4000,h=3000".to_string(),
            vec!["fbuf: max resolution is 3840x2160"],
        ),
        (
            "29,fbuf,tcp=[::1".to_string(),
            vec!["fbuf: Invalid IPv6 address"],
        ),
        (
            "29,fbuf,vga=maybe".to_string(),
            vec!["fbuf: Invalid vga setting"],
        ),
        (
            format!("29,fbuf,tcp=127.0.0.1:{port}"),
            vec![
                "cannot listen for VNC clients",
                &format!("127.0.0.1:{port}"),
            ],
        ),
    ] {
        let run = bhyve(&guest_args(
            "exitcodes",
            "poweroff",
            &["-s", &fbuf],
            "fbuf-options",
        ));
        let parts: Vec<&str> = parts.iter().map(|s| &**s).collect();
        assert_refused(&run, &parts);
    }
}

/// NVMe mistakes: a RAM namespace (bhyve's `ram=`, not offered: the one
/// block back end is a file), an unknown `dsm=` and a `qsz=` of 1 are
/// refused at VM start naming the slot and the key.
#[test]
fn nvme_options_rhyve_cannot_honour_are_refused_naming_the_key() {
    let dir = std::env::temp_dir().join(format!("rhyve-nvme-opts-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let disk = dir.join("disk.img");
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    let disk = disk.display().to_string();
    for (dev, parts) in [
        ("4,nvme,ram=64".to_string(), ["pci slot 0:4:0", "ram="]),
        (
            format!("4,nvme,{disk},dsm=maybe"),
            ["pci slot 0:4:0", "\"maybe\" for \"pci.0.4.0.dsm\""],
        ),
        (
            format!("4,nvme,{disk},qsz=1"),
            ["pci slot 0:4:0", "\"1\" for \"pci.0.4.0.qsz\""],
        ),
    ] {
        let run = bhyve(&guest_args("pcienum", "", &["-s", &dev], "nvmeopts"));
        assert_refused(&run, &parts);
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// e1000 takes virtio-net's backends and MAC syntax: a backend rhyve has
/// not got, a missing one and a multicast MAC are each refused naming the
/// slot and the bad part (before, every e1000 was refused as a model).
#[test]
fn e1000_backend_and_mac_mistakes_are_named() {
    let cases: [(&str, &[&str]); 3] = [
        (
            "3,e1000,slirp",
            &[
                "pci slot 0:3:0",
                "network backend \"slirp\" is not supported yet",
            ],
        ),
        (
            "3,e1000",
            &[
                "pci slot 0:3:0",
                "e1000 without a backend is not supported yet",
            ],
        ),
        (
            "3,e1000,tap,mac=01:00:5e:00:00:01",
            &["pci slot 0:3:0", "invalid MAC 01:00:5e:00:00:01"],
        ),
    ];
    for (n, (slot, parts)) in cases.into_iter().enumerate() {
        let run = bhyve(&guest_args(
            "pcienum",
            "",
            &["-s", slot],
            &format!("e1000-{n}"),
        ));
        assert_refused(&run, parts);
    }
}
