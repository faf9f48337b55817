//! Reading a file an operator named (a `-k` configuration file, a device
//! map, a kernel or initrd, a registry record): only regular files, and a
//! whole-file read only up to a stated limit. A slip such as `-k /dev/zero`
//! then gets one error line naming the path and the limit, instead of
//! rhyve reading for ever, waiting on a FIFO that no one writes, or
//! allocating until the host runs out of memory.
//!
//! Special files are refused rather than read up to the limit: a terminal
//! or a FIFO may never end (or never start), and a device may have effects
//! when read. The type is checked on the opened descriptor, so the file
//! checked is the file read.

use std::fs::{File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// Why a file could not be read.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{}: {kind}, not a regular file", path.display())]
    NotRegular { path: PathBuf, kind: &'static str },
    #[error("{}: larger than the limit of {}", path.display(), human_size(*limit))]
    TooLarge { path: PathBuf, limit: u64 },
}

impl FileError {
    /// True if the file does not exist.
    pub fn is_not_found(&self) -> bool {
        matches!(self, FileError::Io { source, .. } if source.kind() == io::ErrorKind::NotFound)
    }
}

/// `1 MiB`, `64 bytes`: a limit as people write it.
fn human_size(bytes: u64) -> String {
    const UNITS: [(u64, &str); 3] = [(1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")];
    for (unit, name) in UNITS {
        if bytes >= unit && bytes.is_multiple_of(unit) {
            return format!("{} {name}", bytes / unit);
        }
    }
    format!("{bytes} bytes")
}

/// What kind of file `meta` describes ("a FIFO"), for error messages.
pub fn file_kind(meta: &std::fs::Metadata) -> &'static str {
    let t = meta.file_type();
    if t.is_file() {
        "a regular file"
    } else if t.is_dir() {
        "a directory"
    } else if t.is_fifo() {
        "a FIFO"
    } else if t.is_socket() {
        "a socket"
    } else if t.is_block_device() {
        "a block device"
    } else {
        "a character device"
    }
}

/// Open `path` read-only if it is a regular file.
pub fn open_regular(path: &Path) -> Result<File, FileError> {
    let io_err = |source| FileError::Io {
        path: path.to_path_buf(),
        source,
    };
    // O_NONBLOCK so that opening a FIFO with no writer returns at once (it
    // is then refused below); it has no effect on regular files. O_NOCTTY
    // so a terminal never becomes our controlling one.
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY | libc::O_CLOEXEC)
        .open(path)
        .map_err(io_err)?;
    let meta = file.metadata().map_err(io_err)?;
    if !meta.is_file() {
        return Err(FileError::NotRegular {
            path: path.to_path_buf(),
            kind: file_kind(&meta),
        });
    }
    Ok(file)
}

/// The whole of the regular file `path`, refused past `limit` bytes (also
/// when it grows past the limit while being read).
pub fn read_limited(path: &Path, limit: u64) -> Result<Vec<u8>, FileError> {
    let too_large = || FileError::TooLarge {
        path: path.to_path_buf(),
        limit,
    };
    let io_err = |source| FileError::Io {
        path: path.to_path_buf(),
        source,
    };
    let file = open_regular(path)?;
    let len = file.metadata().map_err(io_err)?.len();
    if len > limit {
        return Err(too_large());
    }
    // /proc and sysfs files report size 0: the reserve is only a hint.
    let mut data = Vec::with_capacity(usize::try_from(len).unwrap_or(0));
    file.take(limit.saturating_add(1))
        .read_to_end(&mut data)
        .map_err(io_err)?;
    if data.len() as u64 > limit {
        return Err(too_large());
    }
    Ok(data)
}

/// [`read_limited`], as text (invalid UTF-8 replaced, as `-k` files are).
pub fn read_limited_string(path: &Path, limit: u64) -> Result<String, FileError> {
    read_limited(path, limit).map(|b| String::from_utf8_lossy(&b).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("rhyve-file-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn reads_regular_files_up_to_the_limit() {
        let dir = scratch("limit");
        let f = dir.join("f");
        std::fs::write(&f, b"0123456789").unwrap();
        assert_eq!(read_limited(&f, 10).unwrap(), b"0123456789");
        let e = read_limited(&f, 9).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!("{}: larger than the limit of 9 bytes", f.display())
        );
        assert_eq!(read_limited_string(&f, 1 << 20).unwrap(), "0123456789");
        assert!(read_limited(&dir.join("missing"), 1)
            .unwrap_err()
            .is_not_found());
        // Kernel pseudo-files say size 0 and still read whole.
        assert!(!read_limited(Path::new("/proc/self/stat"), 4096)
            .unwrap()
            .is_empty());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn refuses_files_that_never_end_without_reading_them() {
        let dir = scratch("special");
        let fifo = dir.join("fifo");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: mkfifo on our own scratch path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        for (path, kind) in [
            (PathBuf::from("/dev/zero"), "a character device"),
            (fifo, "a FIFO"),
            (dir.clone(), "a directory"),
        ] {
            let e = read_limited(&path, 1 << 20).unwrap_err();
            assert_eq!(
                e.to_string(),
                format!("{}: {kind}, not a regular file", path.display())
            );
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn limits_read_as_people_write_them() {
        assert_eq!(human_size(1 << 20), "1 MiB");
        assert_eq!(human_size(64), "64 bytes");
        assert_eq!(human_size(3 << 30), "3 GiB");
        assert_eq!(human_size(1500), "1500 bytes");
    }
}
