//! bhyve's exit status for every way a guest can end the VM, driven by our
//! own `exitcodes` guest (crates/guests/guest/exitcodes.c).

use std::path::Path;

use rhyve_guests::{run_guest, RunResult};

fn exitcodes(mode: &str, extra: &[&str]) -> RunResult {
    let tag: String = mode.chars().filter(char::is_ascii_alphanumeric).collect();
    let run = run_guest(
        Path::new(env!("CARGO_BIN_EXE_bhyve")),
        "exitcodes",
        mode,
        extra,
        &format!("exit-{tag}"),
    );
    run.assert_no_failure();
    run
}

#[test]
fn reset_register_0xcf9_exits_0() {
    let run = exitcodes("reset", &[]);
    run.assert_line("exitcodes: reset");
    run.assert_code(0);
}

#[test]
fn i8042_pulse_reset_exits_0() {
    let run = exitcodes("kbdreset", &[]);
    run.assert_line("exitcodes: kbdreset");
    run.assert_code(0);
}

#[test]
fn acpi_s5_power_off_exits_1() {
    let run = exitcodes("poweroff", &[]);
    run.assert_line("exitcodes: poweroff");
    run.assert_code(1);
}

#[test]
fn halt_with_interrupts_off_exits_2() {
    let run = exitcodes("halt", &[]);
    run.assert_line("exitcodes: halt");
    run.assert_code(2);
}

#[test]
fn triple_fault_exits_3() {
    let run = exitcodes("triplefault", &[]);
    run.assert_line("exitcodes: triplefault");
    run.assert_code(3);
}

#[test]
fn isa_debug_exit_exits_2v_plus_1() {
    for (value, code) in [(0, 1), (5, 11), (0x40, 0x81)] {
        let run = exitcodes(&format!("debugexit={value}"), &["-l", "pc-testdev"]);
        run.assert_line(&format!("exitcodes: debugexit {value}"));
        run.assert_code(code);
    }
}

#[test]
fn guest_failure_is_a_triple_fault() {
    // No mode: the guest says why and triple-faults, which is how every
    // guest reports a failed check.
    let run = run_guest(
        Path::new(env!("CARGO_BIN_EXE_bhyve")),
        "exitcodes",
        "",
        &[],
        "exit-nomode",
    );
    assert!(
        run.lines_starting("FAIL: no mode").len() == 1,
        "{}",
        run.describe()
    );
    run.assert_code(3);
}

#[test]
fn unassigned_ports_read_all_ones_and_dash_e_stops_the_vm() {
    let r = exitcodes("unassigned", &[]);
    r.assert_code(1);
    r.assert_line("exitcodes: port 0x99 reads ff");
    let r = exitcodes("unassigned", &["-e"]);
    r.assert_code(4);
    assert!(
        r.stderr
            .contains("unhandled read of 1 byte(s) at I/O port 0x99 (-e)"),
        "{}",
        r.describe()
    );
}

#[test]
fn unknown_msrs_raise_gp_unless_dash_w() {
    // Without -w (x86.strictmsr): #GP, which this guest turns into FAIL + exit 3.
    let r = run_guest(
        Path::new(env!("CARGO_BIN_EXE_bhyve")),
        "exitcodes",
        "unknownmsr",
        &[],
        "exit-msr-strict",
    );
    r.assert_code(3);
    assert!(r.stdout.contains("(vector 13)"), "{}", r.describe());
    // -w: unknown MSRs read 0 and writes are dropped.
    let r = exitcodes("unknownmsr", &["-w"]);
    r.assert_code(1);
    r.assert_line("exitcodes: msr 0x40000200 reads 0:0");
}
