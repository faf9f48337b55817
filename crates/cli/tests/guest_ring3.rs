//! How a 64-bit guest's user mode enters its kernel, checked by our `ring3`
//! guest (crates/guests/guest/ring3.c): long mode with paging, Linux's GDT
//! and system-call MSRs, then `int $0x80`, `syscall`, `sysenter` and `ud2`
//! from 64-bit and 32-bit ring-3 code.
//!
//! Hosts differ here, and not through rhyve: on hardware KVM every way in
//! that the CPU vendor supports lands at CPL 0; on a software-virtualization
//! host (PVM, `/sys/module/kvm_pvm`) the host decides much of it inside its
//! kernel, differently on its Intel and AMD kinds (see
//! ../shared/notes/pvm-hosts.md). The test prints what it finds and asserts
//! only what a guest needs: exceptions from user mode reach the kernel;
//! some way into the kernel works; and the 32-bit door that the full Linux
//! boot's `/init` (linux-init/init.c) picks for the CPU vendor the guest
//! sees (`syscall` on AMD and Hygon, `sysenter` elsewhere) enters at CPL 0
//! and its return lands right after the instruction, in one of the two
//! user code segments. On hardware KVM it also asserts what a stock
//! Linux user space needs: 64-bit `syscall` and `int $0x80`.

use std::path::Path;

use rhyve_guests::run_guest;

fn pvm_host() -> bool {
    Path::new("/sys/module/kvm_pvm").exists()
}

/// The door /init uses for this vendor, as init.c chooses it.
fn init_uses_syscall(vendor: &str) -> bool {
    matches!(vendor, "AuthenticAMD" | "HygonGenuine")
}

/// "via vector 6 at +N from cs 0x0023|0x0033 handler cs 0x0010": the step
/// entered the kernel and came back to the ud2 N bytes into the step.
fn came_back_after(lines: &[&str], step: &str, offset: u32) -> bool {
    [0x23, 0x33].iter().any(|cs| {
        lines
            == [format!(
                "ring3 {step} via vector 6 at +{offset} from cs 0x{cs:04x} handler cs 0x0010"
            )
            .as_str()]
    })
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
    let vendor = run
        .lines_starting("ring3 vendor ")
        .first()
        .map(|l| l["ring3 vendor ".len()..].to_string())
        .unwrap_or_else(|| panic!("no vendor line\n{}", run.describe()));
    eprintln!(
        "ring3 on this host ({}, {vendor}):\n{}",
        if pvm_host() { "PVM" } else { "hardware KVM" },
        run.lines().join("\n")
    );

    // Everywhere: an exception raised in ring 3 reaches the CPL-0 handler
    // with the user's code segment in its frame.
    run.assert_line("ring3 ud2-64 via vector 6 at +0 from cs 0x0033 handler cs 0x0010");

    let doors = run.lines_starting("ring3 lstar ");
    let sysenter = run.lines_starting("ring3 sysenter ");
    let syscall64_works = doors.iter().any(|l| l.contains("lstar cs 0x0010 "));
    let syscall32_works = doors.iter().any(|l| l.contains(" cstar cs 0x0010 "))
        && came_back_after(&run.lines_starting("ring3 syscall-32 "), "syscall-32", 2);
    let sysenter32_works = sysenter.iter().any(|l| l.contains("sysenter cs 0x0010 "))
        && came_back_after(&run.lines_starting("ring3 sysenter-32 "), "sysenter-32", 4);
    assert!(
        syscall64_works || syscall32_works || sysenter32_works,
        "no way from user mode into the kernel works on this host\n{}",
        run.describe()
    );
    // What the full Linux boot's /init builds on.
    if init_uses_syscall(&vendor) {
        assert!(
            syscall32_works,
            "{vendor}: /init enters the kernel with 32-bit syscall, which must reach \
             CSTAR at CPL 0 (at its address or its low 32 bits) and return right \
             after the instruction\n{}",
            run.describe()
        );
    } else {
        assert!(
            sysenter32_works,
            "{vendor}: /init enters the kernel with 32-bit sysenter, which must reach \
             SYSENTER_EIP at CPL 0 and return right after the instruction\n{}",
            run.describe()
        );
    }
    if !pvm_host() {
        // Hardware KVM: what a stock Linux user space needs.
        run.assert_line("ring3 int80-64 via gate 0x80 at +2 from cs 0x0033 handler cs 0x0010");
        run.assert_line("ring3 syscall-64 via vector 6 at +2 from cs 0x0033 handler cs 0x0010");
        run.assert_line("ring3 int80-32 via gate 0x80 at +2 from cs 0x0023 handler cs 0x0010");
        assert!(
            syscall64_works,
            "64-bit syscall must enter LSTAR at CPL 0\n{}",
            run.describe()
        );
    }
}
