//! How a 64-bit guest's user mode enters its kernel, checked by our `ring3`
//! guest (crates/guests/guest/ring3.c): long mode with paging, Linux's GDT
//! and system-call MSRs, then `int $0x80`, `syscall` and `ud2` from 64-bit
//! and 32-bit ring-3 code.
//!
//! On hardware KVM every way in lands at CPL 0. On a software-virtualization
//! host (PVM, `/sys/module/kvm_pvm`) the host decides some of it inside its
//! kernel, out of rhyve's reach: there the test asserts only what rhyve's
//! full Linux boot relies on (exceptions from user mode, and 32-bit
//! `syscall` through CSTAR at CPL 0, at the right RIP or its low 32 bits,
//! whose return lands after the instruction in one of the two user code
//! segments), and prints the rest.

use std::path::Path;

use rhyve_guests::run_guest;

fn pvm_host() -> bool {
    Path::new("/sys/module/kvm_pvm").exists()
}

#[test]
fn user_mode_enters_the_kernel() {
    let run = run_guest(
        Path::new(env!("CARGO_BIN_EXE_bhyve")),
        "ring3",
        "",
        &[],
        "ring3",
    );
    run.assert_no_failure();
    run.assert_code(1);
    run.assert_line("ring3 done");
    eprintln!(
        "ring3 on this host ({}):\n{}",
        if pvm_host() { "PVM" } else { "hardware KVM" },
        run.lines().join("\n")
    );

    // Everywhere: an exception raised in ring 3 reaches the CPL-0 handler
    // with the user's code segment in its frame.
    run.assert_line("ring3 ud2-64 via vector 6 at +0 from cs 0x0033 handler cs 0x0010");
    let syscall32 = run.lines_starting("ring3 syscall-32 ");
    if pvm_host() {
        // What the full Linux boot's /init (linux-init/init.c) builds on.
        assert!(
            run.lines_starting("ring3 lstar ")
                .iter()
                .any(|l| l.contains(" cstar cs 0x0010 ")),
            "32-bit syscall must enter CSTAR at CPL 0\n{}",
            run.describe()
        );
        assert!(
            syscall32 == ["ring3 syscall-32 via vector 6 at +2 from cs 0x0023 handler cs 0x0010"]
                || syscall32
                    == ["ring3 syscall-32 via vector 6 at +2 from cs 0x0033 handler cs 0x0010"],
            "sysretl must come back right after the syscall\n{}",
            run.describe()
        );
    } else {
        run.assert_line("ring3 int80-64 via gate 0x80 at +2 from cs 0x0033 handler cs 0x0010");
        run.assert_line("ring3 syscall-64 via vector 6 at +2 from cs 0x0033 handler cs 0x0010");
        run.assert_line("ring3 int80-32 via gate 0x80 at +2 from cs 0x0023 handler cs 0x0010");
        run.assert_line("ring3 syscall-32 via vector 6 at +2 from cs 0x0023 handler cs 0x0010");
        run.assert_line("ring3 lstar cs 0x0010 cstar cs 0x0010 cstar rip high");
    }
}
