//! The process title `bhyve: <vmname>`, by which tools such as vm-bhyve and
//! libvirt find a running VM in `ps` output (bhyve uses setproctitle(3)).
//!
//! Linux has no setproctitle: `ps` shows the memory between the kernel's
//! arg_start and arg_end, the original argv strings. Like other setproctitle
//! emulations we overwrite that area in place (it is always long enough:
//! it held the program name and the VM name already), padding with NULs.
//! The command line must have been parsed before this is called.

use std::ffi::CString;

/// arg_start and arg_end from /proc/self/stat (fields 48 and 49).
fn argv_area() -> Option<(usize, usize)> {
    let stat =
        rhyve_config::file::read_limited_string(std::path::Path::new("/proc/self/stat"), 4096)
            .ok()?;
    // Fields after the command name, which is parenthesised and may hold spaces.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split(' ').collect();
    // `rest` starts at field 3.
    let start = fields.get(48 - 3)?.parse().ok()?;
    let end = fields.get(49 - 3)?.parse().ok()?;
    (end > start).then_some((start, end))
}

pub fn set(vmname: &str) {
    let title = format!("bhyve: {vmname}");
    if let Ok(comm) = CString::new(title.chars().take(15).collect::<String>()) {
        // SAFETY: PR_SET_NAME reads a NUL-terminated string of at most 16 bytes.
        unsafe { libc::prctl(libc::PR_SET_NAME, comm.as_ptr()) };
    }
    let Some((start, end)) = argv_area() else {
        tracing::debug!("cannot find the argv area to set the process title");
        return;
    };
    let len = end - start;
    let bytes = title.as_bytes();
    if bytes.len() >= len {
        return;
    }
    // SAFETY: [start, end) is this process's own argv block, mapped
    // read-write on the initial stack for the life of the process; nothing
    // reads argv after the command line was parsed.
    unsafe {
        let area = std::slice::from_raw_parts_mut(start as *mut u8, len);
        area[..bytes.len()].copy_from_slice(bytes);
        area[bytes.len()..].fill(0);
    }
}
