//! Application processors start through INIT-SIPI-SIPI into a real-mode
//! trampoline, driven by our `smp` guest (crates/guests/guest/smp.c).

use std::path::Path;

use rhyve_guests::{run_guest, RunResult};

fn smp(cpus: u32) -> RunResult {
    let run = run_guest(
        Path::new(env!("CARGO_BIN_EXE_bhyve")),
        "smp",
        "",
        &["-c", &cpus.to_string()],
        &format!("smp{cpus}"),
    );
    run.assert_no_failure();
    run.assert_code(1);
    run
}

#[test]
fn two_cpus_the_ap_comes_up_in_protected_mode() {
    let run = smp(2);
    assert_eq!(
        run.lines(),
        ["bsp 0, madt lists 2 cpus", "ap 1 up", "cpus 2"],
        "{}",
        run.describe()
    );
}

#[test]
fn four_cpus_every_ap_comes_up_once() {
    let run = smp(4);
    let mut aps = run.lines_starting("ap ");
    aps.sort_unstable();
    assert_eq!(aps, ["ap 1 up", "ap 2 up", "ap 3 up"], "{}", run.describe());
    run.assert_line("cpus 4");
}
