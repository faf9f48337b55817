//! One error type for the whole loader, so the binary prints one clear line.

use std::io;

/// Why the loader could not produce a boot selection.
#[derive(Debug, thiserror::Error)]
pub enum GrubError {
    #[error("{0}")]
    Usage(String),
    #[error("device map {path}: {message}")]
    DeviceMap { path: String, message: String },
    #[error("device map {0}")]
    DeviceMapFile(rhyve_config::file::FileError),
    #[error(transparent)]
    File(#[from] rhyve_config::file::FileError),
    #[error("{0}: I/O error: {1}")]
    Io(String, io::Error),
    #[error("no such device: {0}")]
    NoDevice(String),
    #[error("unknown filesystem")]
    UnknownFilesystem,
    #[error("file `{0}' not found")]
    NotFound(String),
    #[error("`{0}' is not a directory")]
    NotDirectory(String),
    #[error("`{0}' is a directory")]
    IsDirectory(String),
    #[error("bad filesystem: {0}")]
    BadFilesystem(String),
    #[error("file `{0}' is too large ({1} bytes, the limit is {2})")]
    TooLarge(String, u64, u64),
    #[error("invalid file name `{0}'")]
    BadPath(String),
    #[error("syntax error: {0}")]
    Syntax(String),
    #[error("{0}")]
    Command(String),
    #[error("the console closed before anything was chosen to boot")]
    ConsoleClosed,
    #[error("console: {0}")]
    Console(io::Error),
}

impl GrubError {
    pub(crate) fn io(what: impl Into<String>, e: io::Error) -> Self {
        GrubError::Io(what.into(), e)
    }
}
