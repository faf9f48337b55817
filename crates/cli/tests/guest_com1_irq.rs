//! COM1's transmitter-empty interrupt reaches the guest on IOAPIC pin 4,
//! checked by our `com1irq` guest (crates/guests/guest/com1irq.c).

use std::path::Path;
use std::time::Duration;

use rhyve_guests::{boot_args, require_kvm, run_bhyve, vm_name, BASE_MACHINE};

#[test]
fn com1_thr_empty_interrupt_arrives_on_ioapic_pin_4() {
    require_kvm();
    let mut args = boot_args("com1irq", "");
    args.extend(BASE_MACHINE.iter().map(|s| s.to_string()));
    args.push(vm_name("com1irq"));
    let run = run_bhyve(
        Path::new(env!("CARGO_BIN_EXE_bhyve")),
        &args,
        Duration::from_secs(30),
    );
    run.assert_no_failure();
    assert_eq!(run.lines(), ["com1 irq ok"], "{}", run.describe());
    run.assert_code(1);
}
