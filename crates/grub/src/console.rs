//! The console GRUB talks through: a byte stream with a timed read.
//!
//! grub-bhyve uses stdio or the tty given with `-c` (usually an nmdm(4)
//! end; on Linux a pseudo-terminal). [`FdConsole`] serves both: it puts a
//! terminal into raw mode while it is open (restored on drop) and waits
//! for input with poll(2) so the menu's countdown can run.
//! [`ScriptedConsole`] feeds fixed input and records output, for callers
//! that want a deterministic, non-interactive session (a timeout expires
//! at once once the script is used up).

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::time::Duration;

/// What the menu and prompt need from a terminal.
pub trait Console {
    /// Write bytes to the terminal.
    fn write_bytes(&mut self, bytes: &[u8]) -> io::Result<()>;
    /// Wait up to `timeout` (`None`: for ever) for one byte. `Ok(None)` is
    /// a timeout; an error of kind `UnexpectedEof` means the input closed.
    fn read_byte(&mut self, timeout: Option<Duration>) -> io::Result<Option<u8>>;
}

/// A terminal or any other file descriptor pair.
pub struct FdConsole {
    input: File,
    output: File,
    saved: Option<(RawFd, libc::termios)>,
    /// Input reached its end: timed waits just sleep (a countdown still
    /// runs out, as GRUB's does with nobody at the keyboard).
    at_eof: bool,
}

impl FdConsole {
    /// Standard input and output (grub-bhyve without `-c`).
    pub fn stdio() -> io::Result<FdConsole> {
        let dup = |fd: RawFd| -> io::Result<File> {
            // SAFETY: dup(2) on a descriptor we do not own; the new one is ours.
            let n = unsafe { libc::dup(fd) };
            if n < 0 {
                return Err(io::Error::last_os_error());
            }
            // SAFETY: `n` is a fresh descriptor owned by nobody else.
            Ok(File::from(unsafe { OwnedFd::from_raw_fd(n) }))
        };
        FdConsole::new(dup(0)?, dup(1)?)
    }

    /// A tty device such as the `-c` argument. Anything else (a disk image
    /// named by mistake, a FIFO) is refused before it is opened for writing,
    /// so the menu is never written into it.
    pub fn open(path: &str) -> io::Result<FdConsole> {
        let not_a_terminal = || {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                "not a terminal (-c takes a tty such as /dev/pts/N)",
            )
        };
        if !std::fs::metadata(path)?.file_type().is_char_device() {
            return Err(not_a_terminal());
        }
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NOCTTY)
            .open(path)?;
        // SAFETY: isatty only inspects the descriptor.
        if unsafe { libc::isatty(f.as_raw_fd()) } != 1 {
            return Err(not_a_terminal());
        }
        let out = f.try_clone()?;
        FdConsole::new(f, out)
    }

    /// Wrap descriptors already open; a terminal input goes raw until drop.
    pub fn new(input: File, output: File) -> io::Result<FdConsole> {
        let fd = input.as_raw_fd();
        let mut saved = None;
        // SAFETY: isatty/tcgetattr/tcsetattr only read or write the termios we pass.
        unsafe {
            if libc::isatty(fd) == 1 {
                let mut t: libc::termios = std::mem::zeroed();
                if libc::tcgetattr(fd, &mut t) == 0 {
                    let orig = t;
                    libc::cfmakeraw(&mut t);
                    // Keep output post-processing so "\n" still returns the carriage.
                    t.c_oflag |= libc::OPOST | libc::ONLCR;
                    if libc::tcsetattr(fd, libc::TCSANOW, &t) == 0 {
                        saved = Some((fd, orig));
                    }
                }
            }
        }
        Ok(FdConsole {
            input,
            output,
            saved,
            at_eof: false,
        })
    }
}

impl Drop for FdConsole {
    fn drop(&mut self) {
        if let Some((fd, t)) = self.saved {
            // SAFETY: restores the termios saved from this same descriptor.
            unsafe {
                libc::tcsetattr(fd, libc::TCSANOW, &t);
            }
        }
    }
}

impl Console for FdConsole {
    fn write_bytes(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.output.write_all(bytes)?;
        self.output.flush()
    }

    fn read_byte(&mut self, timeout: Option<Duration>) -> io::Result<Option<u8>> {
        if self.at_eof {
            return match timeout {
                Some(d) => {
                    std::thread::sleep(d);
                    Ok(None)
                }
                None => Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "console input closed",
                )),
            };
        }
        let ms: libc::c_int = match timeout {
            None => -1,
            Some(d) => d.as_millis().min(i32::MAX as u128) as libc::c_int,
        };
        let mut pfd = libc::pollfd {
            fd: self.input.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        loop {
            // SAFETY: one valid pollfd.
            let r = unsafe { libc::poll(&mut pfd, 1, ms) };
            if r < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            if r == 0 {
                return Ok(None);
            }
            break;
        }
        let mut b = [0u8; 1];
        match self.input.read(&mut b) {
            Ok(0) => {}
            Ok(_) => return Ok(Some(b[0])),
            // A pty whose other side closed reports EIO.
            Err(e) if e.raw_os_error() == Some(libc::EIO) => {}
            Err(e) => return Err(e),
        }
        self.at_eof = true;
        self.read_byte(timeout)
    }
}

/// Fixed input, recorded output; timeouts expire at once when input is
/// used up, and a wait without timeout then reports end of input.
#[derive(Default)]
pub struct ScriptedConsole {
    input: Vec<u8>,
    pos: usize,
    /// Everything written so far.
    pub output: Vec<u8>,
}

impl ScriptedConsole {
    pub fn new(input: &[u8]) -> ScriptedConsole {
        ScriptedConsole {
            input: input.to_vec(),
            pos: 0,
            output: Vec::new(),
        }
    }

    /// The output as text.
    pub fn output_text(&self) -> String {
        String::from_utf8_lossy(&self.output).into_owned()
    }
}

impl Console for ScriptedConsole {
    fn write_bytes(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.output.extend_from_slice(bytes);
        Ok(())
    }

    fn read_byte(&mut self, timeout: Option<Duration>) -> io::Result<Option<u8>> {
        if let Some(b) = self.input.get(self.pos) {
            self.pos += 1;
            return Ok(Some(*b));
        }
        match timeout {
            Some(_) => Ok(None),
            None => Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "end of scripted input",
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn closed_input_lets_countdowns_run_out() {
        let null = || {
            File::options()
                .read(true)
                .write(true)
                .open("/dev/null")
                .unwrap()
        };
        let mut c = FdConsole::new(null(), null()).unwrap();
        let t = std::time::Instant::now();
        assert!(c
            .read_byte(Some(Duration::from_millis(30)))
            .unwrap()
            .is_none());
        assert!(c
            .read_byte(Some(Duration::from_millis(30)))
            .unwrap()
            .is_none());
        assert!(t.elapsed() >= Duration::from_millis(60));
        let e = c.read_byte(None).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
        c.write_bytes(b"x").unwrap();
    }

    #[test]
    fn scripted_console_is_deterministic() {
        let mut c = ScriptedConsole::new(b"ab");
        assert_eq!(c.read_byte(None).unwrap(), Some(b'a'));
        assert_eq!(
            c.read_byte(Some(Duration::from_secs(100))).unwrap(),
            Some(b'b')
        );
        assert_eq!(c.read_byte(Some(Duration::from_secs(100))).unwrap(), None);
        assert!(c.read_byte(None).is_err());
        c.write_bytes(b"out").unwrap();
        assert_eq!(c.output_text(), "out");
    }
}
