//! PCI bus 0 as a guest enumerates it, through 0xCF8/0xCFC and through
//! ECAM, with our `pcienum` guest (crates/guests/guest/pcienum.c).

use std::path::Path;

use rhyve_guests::run_guest;

#[test]
fn bus_0_shows_bhyves_ids_the_same_through_cf8_and_ecam() {
    let extra = ["-s", "5,hostbridge", "-s", "6,amd_hostbridge"];
    let run = run_guest(
        Path::new(env!("CARGO_BIN_EXE_bhyve")),
        "pcienum",
        "",
        &extra,
        "pci",
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
