//! SIGTERM is bhyve's ACPI power button once the guest enabled ACPI: our
//! `powerbutton` guest (crates/guests/guest/powerbutton.c) takes the SCI
//! through the IOAPIC, sees PWRBTN_STS and powers off.

use std::path::Path;
use std::time::Duration;

use rhyve_guests::{guest_args, require_kvm, run_bhyve_signal_after, SIGTERM};

#[test]
fn sigterm_presses_the_power_button_and_the_guest_powers_off() {
    require_kvm();
    let run = run_bhyve_signal_after(
        Path::new(env!("CARGO_BIN_EXE_bhyve")),
        &guest_args("powerbutton", "", &[], "powerbutton"),
        "ready",
        SIGTERM,
        Duration::from_secs(30),
    );
    run.assert_no_failure();
    assert_eq!(run.lines(), ["ready", "power button"], "{}", run.describe());
    run.assert_code(1);
}

#[test]
fn sigterm_before_the_guest_enabled_acpi_ends_bhyve_by_the_signal() {
    use std::os::unix::process::ExitStatusExt;
    require_kvm();
    let run = run_bhyve_signal_after(
        Path::new(env!("CARGO_BIN_EXE_bhyve")),
        &guest_args("powerbutton", "noacpi", &[], "powerbutton-noacpi"),
        "ready",
        SIGTERM,
        Duration::from_secs(30),
    );
    run.assert_no_failure();
    assert_eq!(run.lines(), ["ready"], "{}", run.describe());
    assert_eq!(run.status.signal(), Some(SIGTERM), "{}", run.describe());
}
