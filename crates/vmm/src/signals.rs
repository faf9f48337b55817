//! Signals: the kick that makes a vCPU leave KVM_RUN, and SIGTERM, which
//! bhyve turns into an ACPI power-button press once the guest enabled ACPI.

use std::sync::atomic::{AtomicBool, Ordering};

use vmm_sys_util::signal::{register_signal_handler, SIGRTMIN};

static SIGTERM_SEEN: AtomicBool = AtomicBool::new(false);

/// The signal sent to a vCPU thread to interrupt KVM_RUN.
pub fn kick_signal() -> i32 {
    SIGRTMIN()
}

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

extern "C" fn on_sigterm(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    SIGTERM_SEEN.store(true, Ordering::SeqCst);
}

pub fn install() {
    if let Err(e) = register_signal_handler(kick_signal(), on_kick) {
        tracing::warn!("cannot install the vCPU kick handler: {e}");
    }
    if let Err(e) = register_signal_handler(libc::SIGTERM, on_sigterm) {
        tracing::warn!("cannot install the SIGTERM handler: {e}");
    }
}

pub fn take_sigterm() -> bool {
    SIGTERM_SEEN.swap(false, Ordering::SeqCst)
}

/// End the process the way an unhandled SIGTERM would.
pub fn die_by_sigterm() -> ! {
    // SAFETY: resetting a disposition and raising a signal are async-safe.
    unsafe {
        libc::signal(libc::SIGTERM, libc::SIG_DFL);
        libc::raise(libc::SIGTERM);
    }
    std::process::exit(128 + libc::SIGTERM)
}
