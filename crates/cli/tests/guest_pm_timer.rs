//! The ACPI PM timer runs at 3.579545 MHz, measured by our `pmtimer`
//! guest (crates/guests/guest/pmtimer.c) over one RTC second.

use std::path::Path;
use std::time::Duration;

use rhyve_guests::{guest_args, require_kvm, run_bhyve};

#[test]
fn pm_timer_ticks_3579545_per_rtc_second() {
    require_kvm();
    let run = run_bhyve(
        Path::new(env!("CARGO_BIN_EXE_bhyve")),
        &guest_args("pmtimer", "", &[], "pmtimer"),
        Duration::from_secs(60),
    );
    run.assert_no_failure();
    run.assert_code(1);
    let lines = run.lines_starting("pmtimer hz ");
    assert_eq!(lines.len(), 1, "{}", run.describe());
    let hz: f64 = lines[0]["pmtimer hz ".len()..].parse().unwrap();
    let error = (hz - 3_579_545.0).abs() / 3_579_545.0;
    assert!(error < 0.01, "PM timer at {hz} Hz\n{}", run.describe());
}
