//! How a device ends the VM, and the exit statuses bhyve(8) documents.
//!
//! Devices (reset register, PM1 control, i8042, pc-testdev) post an
//! [`ExitRequest`]; the first one posted wins, and the VMM is woken through
//! the waker it installed so every vCPU leaves the guest.

use std::sync::{Mutex, OnceLock};

/// Why the VM stopped, in bhyve's terms.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum ExitRequest {
    /// Guest reset (0xCF9, i8042 pulse, `bhyvectl --force-reset`): exit 0.
    Reset,
    /// ACPI S5 power-off or `bhyvectl --force-poweroff`: exit 1.
    PowerOff,
    /// All vCPUs halted for good: exit 2.
    Halt,
    /// Triple fault: exit 3.
    TripleFault,
    /// pc-testdev's isa-debug-exit with value V: exit `(V << 1) | 1`.
    DebugExit(u32),
    /// Anything that makes the run fail: exit 4, with a message.
    Error(String),
    /// `bhyvectl --suspend` saved the VM: exit 0, as bhyve does.
    Suspended,
}

impl ExitRequest {
    /// The process exit status bhyve uses for this reason.
    pub fn status(&self) -> i32 {
        match self {
            ExitRequest::Reset => 0,
            ExitRequest::PowerOff => 1,
            ExitRequest::Halt => 2,
            ExitRequest::TripleFault => 3,
            ExitRequest::DebugExit(v) => ((v << 1) | 1) as i32,
            ExitRequest::Error(_) => 4,
            ExitRequest::Suspended => 0,
        }
    }
}

/// The VM-wide "please stop" mailbox.
#[derive(Default)]
pub struct ExitRequests {
    first: Mutex<Option<ExitRequest>>,
    waker: OnceLock<Box<dyn Fn() + Send + Sync>>,
}

impl ExitRequests {
    pub fn new() -> Self {
        Self::default()
    }

    /// Called once by the VMM with a function that kicks every vCPU out of the guest.
    pub fn set_waker(&self, waker: Box<dyn Fn() + Send + Sync>) {
        let _ = self.waker.set(waker);
    }

    /// Ask the VM to stop; later requests do not override the first.
    pub fn request(&self, why: ExitRequest) {
        {
            let mut first = self.first.lock().unwrap();
            if first.is_some() {
                return;
            }
            *first = Some(why);
        }
        if let Some(wake) = self.waker.get() {
            wake();
        }
    }

    /// The request that stopped the VM, if any.
    pub fn pending(&self) -> Option<ExitRequest> {
        self.first.lock().unwrap().clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    #[test]
    fn statuses_match_bhyve() {
        assert_eq!(ExitRequest::Reset.status(), 0);
        assert_eq!(ExitRequest::PowerOff.status(), 1);
        assert_eq!(ExitRequest::Halt.status(), 2);
        assert_eq!(ExitRequest::TripleFault.status(), 3);
        assert_eq!(ExitRequest::Error("x".into()).status(), 4);
        assert_eq!(ExitRequest::DebugExit(0x10).status(), 0x21);
    }

    #[test]
    fn first_request_wins_and_wakes() {
        let r = ExitRequests::new();
        let woken = Arc::new(AtomicUsize::new(0));
        let w = woken.clone();
        r.set_waker(Box::new(move || {
            w.fetch_add(1, Ordering::SeqCst);
        }));
        r.request(ExitRequest::PowerOff);
        r.request(ExitRequest::Reset);
        assert_eq!(r.pending(), Some(ExitRequest::PowerOff));
        assert_eq!(woken.load(Ordering::SeqCst), 1);
    }
}
