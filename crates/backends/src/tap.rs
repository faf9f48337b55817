//! Network backend: a Linux tap interface opened through /dev/net/tun.
//!
//! bhyve opens `/dev/tapN`; on Linux the same name (`tap0`), the bare `tap`
//! (the kernel picks the next free `tapN`) or the name of an existing
//! persistent tap interface is attached with TUNSETIFF. The interface always
//! carries a virtio-net header (IFF_VNET_HDR) so checksum and TSO offloads
//! pass straight through between guest and host; the device sets the header
//! size and the offloads it negotiated. The fd is non-blocking: the device's
//! worker polls it.

use std::fs::{File, OpenOptions};
use std::io::{self, IoSlice};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::io::{AsRawFd, RawFd};

// linux/if_tun.h
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
const TUNSETVNETHDRSZ: libc::c_ulong = 0x4004_54d8;
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_VNET_HDR: libc::c_short = 0x4000;

/// Offload bits for [`Tap::set_offload`] (TUN_F_*).
pub const TUN_F_CSUM: u32 = 0x01;
pub const TUN_F_TSO4: u32 = 0x02;
pub const TUN_F_TSO6: u32 = 0x04;
pub const TUN_F_TSO_ECN: u32 = 0x08;
pub const TUN_F_UFO: u32 = 0x10;

#[derive(Debug, thiserror::Error)]
pub enum TapError {
    #[error("invalid tap interface name \"{0}\"")]
    BadName(String),
    #[error("could not open /dev/net/tun: {0}")]
    OpenTun(io::Error),
    #[error("could not attach tap interface \"{name}\": {source}")]
    Attach { name: String, source: io::Error },
}

#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// An attached tap interface.
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
}

impl Tap {
    /// Attach `backend`: `tap` for a new kernel-named interface, else the
    /// interface name (`tap0`, an existing persistent tap, ...).
    pub fn open(backend: &str) -> Result<Self, TapError> {
        let wanted = if backend == "tap" { "" } else { backend };
        if wanted.len() >= libc::IFNAMSIZ || wanted.contains(['/', '\0', ' ']) {
            return Err(TapError::BadName(backend.to_string()));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(TapError::OpenTun)?;
        let mut req = IfReq {
            name: [0; libc::IFNAMSIZ],
            flags: IFF_TAP | IFF_NO_PI | IFF_VNET_HDR,
            _pad: [0; 22],
        };
        req.name[..wanted.len()].copy_from_slice(wanted.as_bytes());
        // SAFETY: TUNSETIFF reads and updates a struct ifreq, which IfReq lays out.
        if unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF, &mut req) } < 0 {
            return Err(TapError::Attach {
                name: backend.to_string(),
                source: io::Error::last_os_error(),
            });
        }
        let end = req
            .name
            .iter()
            .position(|&b| b == 0)
            .unwrap_or(req.name.len());
        let name = String::from_utf8_lossy(&req.name[..end]).into_owned();
        Ok(Self { file, name })
    }

    /// The interface name the kernel gave us.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Size of the virtio-net header on every frame (10, or 12 with merged
    /// receive buffers / VERSION_1).
    pub fn set_vnet_hdr_size(&self, size: u32) -> io::Result<()> {
        let size = size as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads one int.
        if unsafe { libc::ioctl(self.file.as_raw_fd(), TUNSETVNETHDRSZ, &size) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Which offloads the guest can take on receive (TUN_F_* bits).
    pub fn set_offload(&self, flags: u32) -> io::Result<()> {
        // SAFETY: TUNSETOFFLOAD takes its argument by value.
        if unsafe { libc::ioctl(self.file.as_raw_fd(), TUNSETOFFLOAD, flags as libc::c_ulong) } < 0
        {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Read one frame (with its vnet header); `WouldBlock` when none is queued.
    pub fn read_frame(&self, buf: &mut [u8]) -> io::Result<usize> {
        // SAFETY: read into a buffer we own, bounded by its length.
        let n = unsafe {
            libc::read(
                self.file.as_raw_fd(),
                buf.as_mut_ptr() as *mut libc::c_void,
                buf.len(),
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }

    /// Send one frame given as pieces (vnet header first).
    pub fn write_frame(&self, parts: &[IoSlice]) -> io::Result<usize> {
        let n = parts.len().min(libc::UIO_MAXIOV as usize) as libc::c_int;
        // SAFETY: IoSlice is ABI-compatible with iovec; the kernel only reads.
        let r = unsafe {
            libc::writev(
                self.file.as_raw_fd(),
                parts.as_ptr() as *const libc::iovec,
                n,
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(r as usize)
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_bad_names() {
        assert!(matches!(Tap::open("a/b"), Err(TapError::BadName(_))));
        assert!(matches!(
            Tap::open("averyveryverylongname0"),
            Err(TapError::BadName(_))
        ));
    }
}
