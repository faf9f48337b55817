//! COM1's transmitter-empty interrupt reaches the guest on IOAPIC pin 4,
//! checked by our `com1irq` guest (crates/guests/guest/com1irq.c).

use std::path::Path;

use rhyve_guests::run_guest;

#[test]
fn com1_thr_empty_interrupt_arrives_on_ioapic_pin_4() {
    let run = run_guest(
        Path::new(env!("CARGO_BIN_EXE_bhyve")),
        "com1irq",
        "",
        &[],
        "com1irq",
    );
    run.assert_no_failure();
    assert_eq!(run.lines(), ["com1 irq ok"], "{}", run.describe());
    run.assert_code(1);
}
