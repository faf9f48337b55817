//! The process title `bhyve: <vmname>`, by which tools such as vm-bhyve and
//! libvirt find a running VM in `ps` output (bhyve uses setproctitle(3)).
//!
//! Linux has no setproctitle: the command line shown by ps is the memory
//! between the kernel's arg_start and arg_end, which root can point at a
//! new string with PR_SET_MM. Without that privilege only the thread name
//! (15 bytes) changes.

use std::ffi::CString;

pub fn set(vmname: &str) {
    let title = format!("bhyve: {vmname}");
    if let Ok(comm) = CString::new(title.chars().take(15).collect::<String>()) {
        // SAFETY: PR_SET_NAME reads a NUL-terminated string of at most 16 bytes.
        unsafe { libc::prctl(libc::PR_SET_NAME, comm.as_ptr()) };
    }
    let Ok(full) = CString::new(title) else {
        return;
    };
    // The title must outlive the process's use of it: leak it on purpose.
    let bytes: &'static [u8] = Box::leak(full.into_bytes_with_nul().into_boxed_slice());
    let start = bytes.as_ptr() as libc::c_ulong;
    let end = start + bytes.len() as libc::c_ulong;
    // SAFETY: plain prctl calls; a refused one leaves the old bound in place.
    let set_start =
        || unsafe { libc::prctl(libc::PR_SET_MM, libc::PR_SET_MM_ARG_START, start, 0, 0) };
    let set_end = || unsafe { libc::prctl(libc::PR_SET_MM, libc::PR_SET_MM_ARG_END, end, 0, 0) };
    // The kernel keeps arg_start <= arg_end at every step, so which bound
    // moves first depends on where the new string lies: try both orders.
    let moved = (set_start() == 0 && set_end() == 0) || (set_end() == 0 && set_start() == 0);
    if !moved {
        tracing::debug!("cannot set the process title (needs CAP_SYS_RESOURCE)");
    }
}
