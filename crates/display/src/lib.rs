//! The graphical console, as bhyve's `pci_fbuf.c` and `rfb.c`: the fbuf
//! frame buffer device ([`fbuf`]) and the VNC server that shows it and
//! types into the guest's PS/2 keyboard ([`rfb`], with the client-message
//! parser in [`proto`]).
//!
//! The RFB protocol is small and fixed, and no maintained Rust crate
//! serves it over a guest's frame buffer, so the server is written here;
//! compression (zlib) and VNC authentication's DES come from crates.

pub mod fbuf;
pub mod fuzzing;
pub mod proto;
pub mod rfb;
pub mod vga;

#[derive(Debug, thiserror::Error)]
pub enum DisplayError {
    /// A bad `-s N,fbuf,...` option, worded as bhyve words it.
    #[error("{0}")]
    Option(String),
    #[error(transparent)]
    Config(#[from] rhyve_config::ConfigError),
    #[error(transparent)]
    Pci(#[from] rhyve_pci::PciError),
    #[error("fbuf: {what}: {source}")]
    Host {
        what: String,
        source: std::io::Error,
    },
}
