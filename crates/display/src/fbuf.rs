//! `-s N,fbuf,...`: bhyve's framebuffer device (`pci_fbuf.c`).
//!
//! PCI function FB5D:40FB, class display/VGA, an MSI capability of four
//! messages that is never used. BAR0 (MEM32, 128 bytes) holds bhyve's
//! register file: u32 frame buffer size, u16 width, height, depth and
//! refresh rate. BAR1 (MEM32, 32 MiB) is the frame buffer itself: host
//! pages shown to the guest through a memory window at the BAR's address
//! (no exits on pixel writes), moved whenever the guest moves the BAR. The
//! BAR also stays trapped, so accesses while the window cannot be placed
//! still reach the same pages. The VNC server ([`crate::rfb`]) reads the
//! pages at the size the registers give.
//!
//! Snapshots: the frame buffer is host memory, not guest RAM, so bhyve's
//! RAM file does not hold it; it goes into the device's state in
//! `FILE.meta`, up to its last non-zero byte, deflated and in hex (a blank
//! screen costs nothing, a full 1024x768 desktop some hundreds of KiB).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};

use std::io::{Read, Write};

use flate2::write::DeflateEncoder;
use flate2::Compression;
use rhyve_config::ConfigTree;
use rhyve_pci::{BarKind, PciConfigSpace, PciFunction};
use rhyve_platform::snapshot::{DeviceState, Schema, SnapshotError};
use serde::{Deserialize, Serialize};

use crate::DisplayError;
use rhyve_platform::window::MemoryWindow;
use vm_memory::{MmapRegion, VolatileMemory};

const VENDOR_ID: u16 = 0xFB5D;
const DEVICE_ID: u16 = 0x40FB;
const CLASS_DISPLAY: u8 = 0x03;
const SUBCLASS_VGA: u8 = 0x00;
const MSI_MESSAGES: u8 = 4;

const REGS_BAR: usize = 0;
const FRAMEBUFFER_BAR: usize = 1;
const REGS_SIZE: usize = 128;
/// bhyve's `FB_SIZE`.
pub const FRAMEBUFFER_SIZE: usize = 32 << 20;

const REG_FBSIZE: usize = 0;
const REG_WIDTH: usize = 4;
const REG_HEIGHT: usize = 6;
const REG_DEPTH: usize = 8;

/// bhyve's limits on `w=` and `h=` (`COLS_MAX` ... `ROWS_MIN`).
const MAX_WIDTH: u32 = 3840;
const MAX_HEIGHT: u32 = 2160;
const MIN_WIDTH: u32 = 640;
const MIN_HEIGHT: u32 = 480;
const DEFAULT_WIDTH: u16 = 1024;
const DEFAULT_HEIGHT: u16 = 768;
/// Where the VNC server listens without `rfb=`/`tcp=` (bhyve.8).
const DEFAULT_PORT: u16 = 5900;

/// `vga=`: which legacy VGA resources the device claims.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VgaMode {
    /// `io` (default): the VGA I/O ports ([`crate::vga`]), for guests that
    /// probe them through BIOS calls.
    Io,
    /// `off`: no legacy VGA at all.
    Off,
}

/// The device's options, as bhyve's `pci_fbuf_parse_config` reads them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FbufOptions {
    pub listen: SocketAddr,
    pub width: u16,
    pub height: u16,
    pub vga: VgaMode,
    pub password: Option<String>,
    pub wait: bool,
}

fn bad(msg: String) -> DisplayError {
    DisplayError::Option(msg)
}

/// `IP:port`, `[IPv6%zone]:port`, or a bare port (bhyve's rules; the IPv4
/// form needs its port).
fn parse_listen(value: &str) -> Result<SocketAddr, DisplayError> {
    let port = |p: &str| -> Result<u16, DisplayError> {
        if p.is_empty() {
            return Err(bad(format!("fbuf: Missing port number: \"{value}\"")));
        }
        p.parse()
            .map_err(|_| bad(format!("fbuf: Invalid port number: \"{value}\"")))
    };
    if let Some(rest) = value.strip_prefix('[') {
        let invalid = || bad(format!("fbuf: Invalid IPv6 address: \"{value}\""));
        let (host, after) = rest.split_once(']').ok_or_else(invalid)?;
        // A zone names an interface; only numeric addresses are taken.
        let host = host.split('%').next().unwrap_or_default();
        let ip: std::net::Ipv6Addr = host.parse().map_err(|_| invalid())?;
        let port = match after {
            "" => DEFAULT_PORT,
            a => port(a.strip_prefix(':').ok_or_else(invalid)?)?,
        };
        return Ok(SocketAddr::new(IpAddr::V6(ip), port));
    }
    match value.split_once(':') {
        None => Ok(SocketAddr::new(Ipv4Addr::LOCALHOST.into(), port(value)?)),
        Some((host, p)) => {
            let ip: IpAddr = host
                .parse()
                .map_err(|_| bad(format!("fbuf: Invalid IPv4 address: \"{value}\"")))?;
            Ok(SocketAddr::new(ip, port(p)?))
        }
    }
}

impl FbufOptions {
    pub fn from_tree(tree: &ConfigTree, node: &str) -> Result<Self, DisplayError> {
        let get = |k: &str| tree.get(&format!("{node}.{k}"));
        let listen = match get("rfb")?.or(get("tcp")?) {
            Some(v) => parse_listen(&v)?,
            None => SocketAddr::new(Ipv4Addr::LOCALHOST.into(), DEFAULT_PORT),
        };
        let vga = match get("vga")?.as_deref() {
            None | Some("io") => VgaMode::Io,
            Some("off") => VgaMode::Off,
            Some("on") => {
                return Err(bad(
                    "fbuf: vga=on (VGA rendering) is not supported yet; use vga=io or vga=off"
                        .into(),
                ))
            }
            Some(v) => return Err(bad(format!("fbuf: Invalid vga setting: \"{v}\""))),
        };
        let dimension = |key: &str, default: u16| -> Result<u32, DisplayError> {
            match get(key)? {
                None => Ok(default.into()),
                Some(v) => v
                    .trim()
                    .parse::<u32>()
                    .map_err(|_| bad(format!("fbuf: Invalid {key}= value: \"{v}\""))),
            }
        };
        let width = dimension("w", DEFAULT_WIDTH)?;
        let height = dimension("h", DEFAULT_HEIGHT)?;
        if width > MAX_WIDTH || height > MAX_HEIGHT {
            return Err(bad(format!(
                "fbuf: max resolution is {MAX_WIDTH}x{MAX_HEIGHT}"
            )));
        }
        if width < MIN_WIDTH || height < MIN_HEIGHT {
            return Err(bad(format!(
                "fbuf: minimum resolution is {MIN_WIDTH}x{MIN_HEIGHT}"
            )));
        }
        Ok(Self {
            listen,
            // Range-checked just above.
            width: width as u16,
            height: height as u16,
            vga,
            password: get("password")?,
            wait: tree.bool_or(&format!("{node}.wait"), false)?,
        })
    }
}

/// The screen the VNC server shows: the frame buffer pages and the size
/// the guest last set.
pub struct Screen {
    pages: Arc<MmapRegion>,
    size: Mutex<(u16, u16)>,
}

impl Screen {
    /// Width and height in pixels.
    pub fn size(&self) -> (u16, u16) {
        *self.size.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Copy the visible image (width × height × 4 bytes, B,G,R,X) into
    /// `out`, resized to fit.
    pub fn snapshot(&self, out: &mut Vec<u8>) -> (u16, u16) {
        let (w, h) = self.size();
        let len = usize::from(w) * usize::from(h) * 4;
        out.resize(len, 0);
        // `set_mode` keeps width × height × 4 within the pages.
        if let Ok(slice) = self.pages.as_volatile_slice().subslice(0, len) {
            slice.copy_to(&mut out[..]);
        }
        (w, h)
    }

    fn set_size(&self, w: u16, h: u16) {
        *self.size.lock().unwrap_or_else(|e| e.into_inner()) = (w, h);
    }
}

/// The fbuf's saved state: registers, mode, and the frame buffer's pages.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FbufState {
    pub regs: Vec<u8>,
    pub vga_mode: bool,
    /// The size the VNC server shows (the last mode that fitted).
    pub screen: (u16, u16),
    /// How many leading bytes of the frame buffer `framebuffer` holds;
    /// the rest is zero.
    pub framebuffer_len: u32,
    /// Those bytes, deflated, in lower-case hex.
    pub framebuffer: String,
}

impl Schema for FbufState {
    const KIND: &'static str = "fbuf";
    const VERSION: u32 = 1;
}

fn state_error(why: String) -> SnapshotError {
    SnapshotError::Device {
        id: "fbuf".into(),
        why,
    }
}

fn to_hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[usize::from(b >> 4)].into());
        s.push(DIGITS[usize::from(b & 15)].into());
    }
    s
}

fn from_hex(text: &str) -> Result<Vec<u8>, String> {
    let digit = |c: u8| -> Result<u8, String> {
        (c as char)
            .to_digit(16)
            .map(|d| d as u8)
            .ok_or_else(|| format!("frame buffer: {:?} is not a hex digit", c as char))
    };
    let text = text.as_bytes();
    if !text.len().is_multiple_of(2) {
        return Err("frame buffer: odd number of hex digits".into());
    }
    text.chunks(2)
        .map(|p| Ok(digit(p[0])? << 4 | digit(p[1])?))
        .collect()
}

pub struct Fbuf {
    config: PciConfigSpace,
    regs: [u8; REGS_SIZE],
    /// Width and height 0: the guest asked for VGA (text) mode.
    vga_mode: bool,
    screen: Arc<Screen>,
    window: Box<dyn MemoryWindow>,
}

impl Fbuf {
    /// The device and the screen its VNC server will show; `window` makes
    /// `pages` (which must be [`FRAMEBUFFER_SIZE`] bytes) visible to the
    /// guest.
    pub fn new(
        options: &FbufOptions,
        pages: Arc<MmapRegion>,
        window: Box<dyn MemoryWindow>,
    ) -> Result<(Self, Arc<Screen>), DisplayError> {
        if pages.size() != FRAMEBUFFER_SIZE {
            return Err(bad(format!(
                "fbuf: frame buffer of {} bytes, not {FRAMEBUFFER_SIZE}",
                pages.size()
            )));
        }
        let mut config = PciConfigSpace::new(VENDOR_ID, DEVICE_ID, CLASS_DISPLAY, SUBCLASS_VGA, 0);
        config.add_bar(REGS_BAR, BarKind::Mem32, REGS_SIZE as u64)?;
        config.add_bar(FRAMEBUFFER_BAR, BarKind::Mem32, FRAMEBUFFER_SIZE as u64)?;
        config.add_msi_capability(MSI_MESSAGES)?;
        let mut regs = [0u8; REGS_SIZE];
        regs[REG_FBSIZE..REG_FBSIZE + 4].copy_from_slice(&(FRAMEBUFFER_SIZE as u32).to_le_bytes());
        regs[REG_WIDTH..REG_WIDTH + 2].copy_from_slice(&options.width.to_le_bytes());
        regs[REG_HEIGHT..REG_HEIGHT + 2].copy_from_slice(&options.height.to_le_bytes());
        regs[REG_DEPTH..REG_DEPTH + 2].copy_from_slice(&32u16.to_le_bytes());
        let screen = Arc::new(Screen {
            pages,
            size: Mutex::new((options.width, options.height)),
        });
        let fbuf = Self {
            config,
            regs,
            vga_mode: false,
            screen: screen.clone(),
            window,
        };
        Ok((fbuf, screen))
    }

    fn reg16(&self, at: usize) -> u16 {
        u16::from_le_bytes([self.regs[at], self.regs[at + 1]])
    }

    /// bhyve's mode switch after every register write: width and height 0
    /// ask for VGA mode, both non-zero for the frame buffer. The VNC side
    /// takes the new size only if the pages hold it: a guest cannot make
    /// the server read past the frame buffer.
    fn registers_written(&mut self) {
        let (w, h) = (self.reg16(REG_WIDTH), self.reg16(REG_HEIGHT));
        if !self.vga_mode && w == 0 && h == 0 {
            self.vga_mode = true;
            tracing::debug!("fbuf: guest switched to VGA mode");
        } else if self.vga_mode && w != 0 && h != 0 {
            self.vga_mode = false;
        }
        if self.vga_mode || w == 0 || h == 0 {
            return;
        }
        if usize::from(w) * usize::from(h) * 4 > FRAMEBUFFER_SIZE {
            tracing::warn!(
                width = w,
                height = h,
                "fbuf: guest set a mode larger than the frame buffer; the screen keeps its size"
            );
            return;
        }
        if self.screen.size() != (w, h) {
            tracing::debug!(width = w, height = h, "fbuf: mode set");
            self.screen.set_size(w, h);
        }
    }
}

impl Fbuf {
    pub fn state(&self) -> Result<FbufState, SnapshotError> {
        let mut pages = vec![0u8; FRAMEBUFFER_SIZE];
        self.screen
            .pages
            .as_volatile_slice()
            .copy_to(&mut pages[..]);
        let len = pages.iter().rposition(|b| *b != 0).map_or(0, |i| i + 1);
        let mut z = DeflateEncoder::new(Vec::new(), Compression::fast());
        z.write_all(&pages[..len])
            .map_err(|e| state_error(format!("cannot deflate the frame buffer: {e}")))?;
        let deflated = z
            .finish()
            .map_err(|e| state_error(format!("cannot deflate the frame buffer: {e}")))?;
        Ok(FbufState {
            regs: self.regs.to_vec(),
            vga_mode: self.vga_mode,
            screen: self.screen.size(),
            // At most FRAMEBUFFER_SIZE (32 MiB).
            framebuffer_len: len as u32,
            framebuffer: to_hex(&deflated),
        })
    }

    /// Put back what [`Fbuf::state`] saved, after checking all of it.
    pub fn restore(&mut self, saved: FbufState) -> Result<(), SnapshotError> {
        let regs: [u8; REGS_SIZE] = saved.regs.as_slice().try_into().map_err(|_| {
            state_error(format!(
                "{} bytes of registers, not {REGS_SIZE}",
                saved.regs.len()
            ))
        })?;
        let (w, h) = saved.screen;
        if usize::from(w) * usize::from(h) * 4 > FRAMEBUFFER_SIZE || w == 0 || h == 0 {
            return Err(state_error(format!("a {w}x{h} screen")));
        }
        let len = saved.framebuffer_len as usize;
        if len > FRAMEBUFFER_SIZE {
            return Err(state_error(format!(
                "{len} bytes of frame buffer, more than {FRAMEBUFFER_SIZE}"
            )));
        }
        let deflated = from_hex(&saved.framebuffer).map_err(state_error)?;
        let mut pages = Vec::with_capacity(len);
        // One byte more than promised shows a damaged stream.
        flate2::read::DeflateDecoder::new(&deflated[..])
            .take(len as u64 + 1)
            .read_to_end(&mut pages)
            .map_err(|e| state_error(format!("frame buffer: {e}")))?;
        if pages.len() != len {
            return Err(state_error(format!(
                "frame buffer: {} bytes inflated, {len} saved",
                pages.len()
            )));
        }
        pages.resize(FRAMEBUFFER_SIZE, 0);
        self.screen.pages.as_volatile_slice().copy_from(&pages[..]);
        self.regs = regs;
        self.vga_mode = saved.vga_mode;
        self.screen.set_size(w, h);
        Ok(())
    }
}

impl PciFunction for Fbuf {
    fn save_device(&self) -> Result<Option<DeviceState>, SnapshotError> {
        DeviceState::encode("fbuf", &self.state()?).map(Some)
    }

    fn restore_device(&mut self, saved: Option<&DeviceState>) -> Result<(), SnapshotError> {
        let saved = saved
            .ok_or_else(|| SnapshotError::Mismatch("an fbuf without its state".into()))?
            .decode()?;
        self.restore(saved)
    }

    fn config(&self) -> &PciConfigSpace {
        &self.config
    }

    fn config_mut(&mut self) -> &mut PciConfigSpace {
        &mut self.config
    }

    fn bar_read(&mut self, bar: usize, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let Ok(at) = usize::try_from(offset) else {
            return;
        };
        match bar {
            REGS_BAR => match self.regs.get(at..at.saturating_add(data.len())) {
                Some(src) => data.copy_from_slice(src),
                None => tracing::debug!(
                    offset,
                    len = data.len(),
                    "fbuf: register read beyond the registers"
                ),
            },
            FRAMEBUFFER_BAR => {
                if let Ok(s) = self
                    .screen
                    .pages
                    .as_volatile_slice()
                    .subslice(at, data.len())
                {
                    s.copy_to(data);
                }
            }
            _ => {}
        }
    }

    fn bar_write(&mut self, bar: usize, offset: u64, data: &[u8]) {
        let Ok(at) = usize::try_from(offset) else {
            return;
        };
        match bar {
            REGS_BAR => match self.regs.get_mut(at..at.saturating_add(data.len())) {
                Some(dst) => {
                    dst.copy_from_slice(data);
                    self.registers_written();
                }
                None => tracing::debug!(
                    offset,
                    len = data.len(),
                    "fbuf: register write beyond the registers"
                ),
            },
            FRAMEBUFFER_BAR => {
                if let Ok(s) = self
                    .screen
                    .pages
                    .as_volatile_slice()
                    .subslice(at, data.len())
                {
                    s.copy_from(data);
                }
            }
            _ => {}
        }
    }

    fn bar_moved(&mut self, bar: usize, base: Option<u64>) {
        if bar != FRAMEBUFFER_BAR {
            return;
        }
        if let Err(e) = self.window.place(base) {
            // Accesses keep reaching the pages through the BAR's trap.
            tracing::warn!(?base, error = %e, "fbuf: cannot map the frame buffer at its BAR; accesses are trapped instead");
            let _ = self.window.place(None);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct NoWindow;
    impl MemoryWindow for NoWindow {
        fn place(&mut self, _: Option<u64>) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn options(args: &[(&str, &str)]) -> Result<FbufOptions, DisplayError> {
        let mut tree = ConfigTree::new();
        tree.set("pci.0.29.0.device", "fbuf").unwrap();
        for (k, v) in args {
            tree.set(&format!("pci.0.29.0.{k}"), *v).unwrap();
        }
        FbufOptions::from_tree(&tree, "pci.0.29.0")
    }

    #[test]
    fn options_follow_bhyves_rules() {
        let o = options(&[]).unwrap();
        assert_eq!(o.listen.to_string(), "127.0.0.1:5900");
        assert_eq!(
            (o.width, o.height, o.vga, o.wait),
            (1024, 768, VgaMode::Io, false)
        );
        let o = options(&[
            ("tcp", "0.0.0.0:5901"),
            ("w", "800"),
            ("h", "600"),
            ("wait", "true"),
            ("password", "pw"),
        ])
        .unwrap();
        assert_eq!(o.listen.to_string(), "0.0.0.0:5901");
        assert_eq!((o.width, o.height, o.wait), (800, 600, true));
        assert_eq!(o.password.as_deref(), Some("pw"));
        assert_eq!(
            options(&[("rfb", "5902"), ("tcp", "5903")])
                .unwrap()
                .listen
                .to_string(),
            "127.0.0.1:5902"
        );
        assert_eq!(
            options(&[("rfb", "[::1%lo]:5904")])
                .unwrap()
                .listen
                .to_string(),
            "[::1]:5904"
        );
        let err = |a: &[(&str, &str)]| options(a).unwrap_err().to_string();
        assert!(err(&[("w", "4000")]).contains("max resolution is 3840x2160"));
        assert!(err(&[("h", "100")]).contains("minimum resolution is 640x480"));
        assert!(err(&[("w", "wide")]).contains("Invalid w= value"));
        assert!(err(&[("vga", "maybe")]).contains("Invalid vga setting"));
        assert!(err(&[("vga", "on")]).contains("not supported yet"));
        assert!(err(&[("tcp", "1.2.3.4:")]).contains("Missing port number"));
        assert!(err(&[("tcp", "[::1")]).contains("Invalid IPv6 address"));
        assert!(err(&[("tcp", "host:5900")]).contains("Invalid IPv4 address"));
    }

    #[test]
    fn registers_switch_modes_and_never_let_the_screen_outgrow_the_pages() {
        let pages = Arc::new(MmapRegion::new(FRAMEBUFFER_SIZE).unwrap());
        let (mut f, screen) = Fbuf::new(&options(&[]).unwrap(), pages, Box::new(NoWindow)).unwrap();
        assert_eq!(f.config().vendor_id(), 0xFB5D);
        assert_eq!(f.config().device_id(), 0x40FB);
        let mut regs = [0u8; 10];
        f.bar_read(REGS_BAR, 0, &mut regs);
        assert_eq!(
            regs,
            [0, 0, 0, 2, 0x00, 0x04, 0x00, 0x03, 32, 0],
            "32 MiB, 1024x768x32"
        );
        // What BhyveRfbDxe's SetMode writes: width, height, depth.
        f.bar_write(REGS_BAR, 4, &800u16.to_le_bytes());
        f.bar_write(REGS_BAR, 6, &600u16.to_le_bytes());
        assert_eq!(screen.size(), (800, 600));
        f.bar_write(REGS_BAR, 4, &[0, 0, 0, 0]);
        assert!(f.vga_mode);
        assert_eq!(
            screen.size(),
            (800, 600),
            "VGA mode keeps the last frame buffer size"
        );
        f.bar_write(REGS_BAR, 4, &[0xFF, 0xFF, 0xFF, 0xFF]);
        assert!(!f.vga_mode);
        assert_eq!(
            screen.size(),
            (800, 600),
            "65535x65535 does not fit in 32 MiB"
        );
        let mut none = [0xAAu8; 4];
        f.bar_read(REGS_BAR, 126, &mut none);
        assert_eq!(none, [0; 4], "reads past the registers are refused");
        f.bar_write(REGS_BAR, 127, &[1, 2]);
        // The trapped frame buffer reaches the same pages the server reads.
        f.bar_write(FRAMEBUFFER_BAR, 0, &[1, 2, 3, 4]);
        let mut shot = Vec::new();
        screen.snapshot(&mut shot);
        assert_eq!(&shot[..4], &[1, 2, 3, 4]);
        f.bar_write(FRAMEBUFFER_BAR, FRAMEBUFFER_SIZE as u64 - 2, &[1, 2, 3, 4]);
    }

    #[test]
    fn state_round_trips_registers_mode_and_frame_buffer() {
        let fresh = || {
            let pages = Arc::new(MmapRegion::new(FRAMEBUFFER_SIZE).unwrap());
            Fbuf::new(&options(&[]).unwrap(), pages, Box::new(NoWindow)).unwrap()
        };
        let (mut f, _) = fresh();
        let blank = f.state().unwrap();
        assert_eq!(blank.framebuffer_len, 0, "a blank screen saves no pixels");
        f.bar_write(REGS_BAR, 4, &800u16.to_le_bytes());
        f.bar_write(REGS_BAR, 6, &600u16.to_le_bytes());
        let pattern: Vec<u8> = (0..800u32 * 600 * 4).map(|i| (i % 251) as u8).collect();
        f.bar_write(FRAMEBUFFER_BAR, 0, &pattern);
        f.bar_write(FRAMEBUFFER_BAR, FRAMEBUFFER_SIZE as u64 - 1, &[0x5A]);
        let saved = f.save_device().unwrap().unwrap();
        let text = serde_json::to_string(&saved).unwrap();
        assert!(text.len() < 1 << 20, "{} bytes of state", text.len());

        let (mut g, screen) = fresh();
        g.restore_device(Some(&serde_json::from_str(&text).unwrap()))
            .unwrap();
        assert_eq!(screen.size(), (800, 600));
        let mut shot = Vec::new();
        screen.snapshot(&mut shot);
        assert!(shot == pattern, "the visible image differs");
        let mut last = [0u8];
        g.bar_read(FRAMEBUFFER_BAR, FRAMEBUFFER_SIZE as u64 - 1, &mut last);
        assert_eq!(last, [0x5A], "bytes beyond the visible image");
        let mut regs = [0u8; 8];
        g.bar_read(REGS_BAR, 0, &mut regs);
        assert_eq!(
            regs,
            [0, 0, 0, 2, 0x20, 0x03, 0x58, 0x02],
            "32 MiB, 800x600"
        );

        let (mut h, _) = fresh();
        let mut bad = f.state().unwrap();
        bad.framebuffer_len -= 1;
        let e = h.restore(bad).unwrap_err().to_string();
        assert!(e.contains("inflated"), "{e}");
        let mut bad = f.state().unwrap();
        bad.screen = (4000, 4000);
        assert!(h.restore(bad).is_err(), "a screen larger than the pages");
        let mut bad = f.state().unwrap();
        bad.framebuffer.push('x');
        assert!(h.restore(bad).is_err(), "damaged hex");
        assert!(h.restore_device(None).is_err(), "no state at all");
    }
}
