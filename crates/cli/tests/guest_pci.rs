//! PCI bus 0 as a guest enumerates it, through 0xCF8/0xCFC and through
//! ECAM, with our `pcienum` guest (crates/guests/guest/pcienum.c).

use std::path::Path;
use std::time::Duration;

use rhyve_guests::{boot_args, require_kvm, run_bhyve, vm_name};

#[test]
fn bus_0_shows_bhyves_ids_the_same_through_cf8_and_ecam() {
    require_kvm();
    let mut args = boot_args("pcienum", "");
    for a in [
        "-s",
        "0,hostbridge",
        "-s",
        "5,hostbridge",
        "-s",
        "6,amd_hostbridge",
        "-s",
        "31,lpc",
        "-l",
        "com1,stdio",
    ] {
        args.push(a.to_string());
    }
    args.push(vm_name("pci"));
    let run = run_bhyve(
        Path::new(env!("CARGO_BIN_EXE_bhyve")),
        &args,
        Duration::from_secs(30),
    );
    run.assert_no_failure();
    let functions = [
        "00:00.0 1275:1275 class 060000",
        "00:05.0 1275:1275 class 060000",
        "00:06.0 1022:7432 class 060000",
        "00:1f.0 8086:7000 class 060100",
    ];
    let expect =
        |tag: &str| -> Vec<String> { functions.iter().map(|f| format!("{tag} {f}")).collect() };
    assert_eq!(
        run.lines_starting("pci 00:"),
        expect("pci"),
        "{}",
        run.describe()
    );
    assert_eq!(
        run.lines_starting("ecam "),
        expect("ecam"),
        "{}",
        run.describe()
    );
    run.assert_line("pci agree 4 functions");
    run.assert_code(1);
}
