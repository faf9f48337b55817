//! bhyve's VNC server (`rfb.c`): one client at a time, RFB 3.3, 3.7 and
//! 3.8, security None or VNC Authentication (`password=`), Raw and Zlib
//! rectangles as bhyve, and ZRLE (solid and raw tiles), which most
//! viewers prefer and bhyve lacks; DesktopSize when the guest changes
//! mode, QEMU's extended key event, and incremental updates that carry
//! only the 32×32 tiles that changed (the whole screen when a quarter or
//! more did, as bhyve does).
//!
//! One thread serves everything: it reads the client with a short timeout
//! and, between reads, sends an update when one was asked for, at most
//! about 30 times a second, or at once after the client typed. Keys go to
//! the i8042's keyboard and the pointer to its PS/2 mouse.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use des::cipher::{BlockEncrypt, KeyInit};
use flate2::{Compress, Compression, FlushCompress};
use rhyve_devices::i8042::I8042;
use rhyve_devices::ps2_keys::{key_for_keysym, key_for_xt};
use rhyve_sandbox::ThreadRole;

use crate::fbuf::{FbufOptions, Screen};
use crate::proto::{
    parse, ClientMessage, Encodings, Parsed, PixelEncoding, PixelFormat, ENCODING_DESKTOP_SIZE,
    ENCODING_QEMU_EXTENDED_KEY, ENCODING_RAW, ENCODING_ZLIB, ENCODING_ZRLE,
};
use crate::DisplayError;

const SERVER_VERSION: &[u8; 12] = b"RFB 003.008\n";
const SECURITY_NONE: u8 = 1;
const SECURITY_VNC_AUTH: u8 = 2;
const SERVER_NAME: &str = "bhyve";
/// Square cells compared between updates (bhyve's `PIX_PER_CELL`).
const TILE: usize = 32;
/// Time between two updates without input (bhyve: every other 16.65 ms tick).
const UPDATE_PERIOD: Duration = Duration::from_millis(33);
/// How long a read waits before the loop looks at the screen again.
const POLL: Duration = Duration::from_millis(16);
/// A client must finish the handshake within this.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);

/// Where keys and pointer moves from the VNC client go.
pub type Keyboard = Arc<Mutex<I8042>>;

/// Bind the server's socket and start its thread; with `wait`, return
/// only once the first client has connected (bhyve starts no vCPU before).
pub fn start(
    options: &FbufOptions,
    screen: Arc<Screen>,
    keyboard: Keyboard,
) -> Result<SocketAddr, DisplayError> {
    let listener = TcpListener::bind(options.listen).map_err(|source| DisplayError::Host {
        what: format!("cannot listen for VNC clients on {}", options.listen),
        source,
    })?;
    let addr = listener.local_addr().map_err(|source| DisplayError::Host {
        what: "VNC socket address".into(),
        source,
    })?;
    let connected = Arc::new((Mutex::new(false), Condvar::new()));
    let server = Server {
        screen,
        keyboard,
        password: options.password.clone(),
        connected: connected.clone(),
    };
    rhyve_sandbox::spawn(ThreadRole::Display, "rfb", move || server.run(listener)).map_err(
        |source| DisplayError::Host {
            what: "starting the VNC server thread".into(),
            source,
        },
    )?;
    if options.wait {
        tracing::info!("fbuf: waiting for a VNC client on {addr} before starting the guest");
        let (lock, cv) = &*connected;
        let mut done = lock.lock().unwrap_or_else(|e| e.into_inner());
        while !*done {
            done = cv.wait(done).unwrap_or_else(|e| e.into_inner());
        }
    }
    Ok(addr)
}

struct Server {
    screen: Arc<Screen>,
    keyboard: Keyboard,
    password: Option<String>,
    connected: Arc<(Mutex<bool>, Condvar)>,
}

impl Server {
    fn run(self, listener: TcpListener) {
        for stream in listener.incoming() {
            let stream = match stream {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "fbuf: accepting a VNC client failed");
                    std::thread::sleep(Duration::from_millis(100));
                    continue;
                }
            };
            {
                let (lock, cv) = &*self.connected;
                *lock.lock().unwrap_or_else(|e| e.into_inner()) = true;
                cv.notify_all();
            }
            let peer = stream.peer_addr().ok();
            tracing::debug!(?peer, "fbuf: VNC client connected");
            let _ = stream.set_nodelay(true);
            if let Err(e) = stream.set_read_timeout(Some(HANDSHAKE_TIMEOUT)) {
                tracing::warn!(error = %e, "fbuf: VNC client socket");
                continue;
            }
            match serve(
                stream,
                &self.screen,
                &self.keyboard,
                self.password.as_deref(),
            ) {
                Ok(()) => tracing::debug!(?peer, "fbuf: VNC client left"),
                Err(e) => tracing::debug!(?peer, error = %e, "fbuf: VNC client dropped"),
            }
        }
    }
}

/// A client's connection: a TCP stream, or the fuzzer's bytes.
pub(crate) trait Connection: Read + Write {
    /// From now on a read returns after [`POLL`] even without data.
    fn poll_reads(&mut self) -> std::io::Result<()>;

    /// Whether an asked-for update may go out this long after the last.
    fn update_due(&self, since_last: Duration) -> bool {
        since_last >= UPDATE_PERIOD
    }
}

impl Connection for TcpStream {
    fn poll_reads(&mut self) -> std::io::Result<()> {
        self.set_read_timeout(Some(POLL))
    }
}

/// One client, from the handshake until it leaves.
pub(crate) fn serve<C: Connection>(
    mut stream: C,
    screen: &Screen,
    keyboard: &Keyboard,
    password: Option<&str>,
) -> std::io::Result<()> {
    if !handshake(&mut stream, password)? {
        return Ok(());
    }
    let (w, h) = screen.size();
    let mut init = Vec::with_capacity(32);
    init.extend(w.to_be_bytes());
    init.extend(h.to_be_bytes());
    init.extend(PixelFormat::SERVER.to_bytes());
    init.extend((SERVER_NAME.len() as u32).to_be_bytes());
    init.extend(SERVER_NAME.as_bytes());
    stream.write_all(&init)?;
    stream.poll_reads()?;
    Session::new(stream, screen, keyboard, (w, h)).run()
}

fn protocol_error(why: impl Into<String>) -> std::io::Error {
    std::io::Error::new(ErrorKind::InvalidData, why.into())
}

/// The DES key VNC Authentication derives from a password: its first 8
/// bytes, NUL padded, each with its bits reversed.
fn vnc_auth_key(password: &str) -> [u8; 8] {
    let mut key = [0u8; 8];
    for (k, b) in key.iter_mut().zip(password.bytes()) {
        *k = b.reverse_bits();
    }
    key
}

/// The answer a client knowing `password` gives to `challenge`.
pub fn vnc_auth_response(password: &str, challenge: &[u8; 16]) -> [u8; 16] {
    let cipher = des::Des::new(&vnc_auth_key(password).into());
    let mut out = *challenge;
    for half in out.chunks_exact_mut(8) {
        cipher.encrypt_block(half.into());
    }
    out
}

fn random_challenge() -> std::io::Result<[u8; 16]> {
    let mut c = [0u8; 16];
    // SAFETY: getrandom writes at most `c.len()` bytes into `c`.
    let n = unsafe { libc::getrandom(c.as_mut_ptr().cast(), c.len(), 0) };
    if n != c.len() as isize {
        return Err(std::io::Error::last_os_error());
    }
    Ok(c)
}

/// Versions, security and ClientInit. False: the client was refused.
fn handshake<C: Connection>(stream: &mut C, password: Option<&str>) -> std::io::Result<bool> {
    stream.write_all(SERVER_VERSION)?;
    let mut version = [0u8; 12];
    stream.read_exact(&mut version)?;
    if &version[..4] != b"RFB " {
        return Err(protocol_error("not an RFB client"));
    }
    // bhyve honours 3.7 and 3.8 and treats anything else as 3.3.
    let minor = match &version[8..11] {
        b"008" => 8,
        b"007" => 7,
        _ => 3,
    };
    let security = if password.is_some() {
        SECURITY_VNC_AUTH
    } else {
        SECURITY_NONE
    };
    let fail = |stream: &mut C, reason: &str| -> std::io::Result<bool> {
        let mut msg = 1u32.to_be_bytes().to_vec();
        if minor == 8 {
            msg.extend((reason.len() as u32).to_be_bytes());
            msg.extend(reason.as_bytes());
        }
        stream.write_all(&msg)?;
        tracing::info!("fbuf: VNC client refused: {reason}");
        Ok(false)
    };
    if minor >= 7 {
        stream.write_all(&[1, security])?;
        let mut chosen = [0u8];
        stream.read_exact(&mut chosen)?;
        if chosen[0] != security {
            return fail(stream, "Auth failed: authentication type mismatch");
        }
    } else {
        stream.write_all(&u32::from(security).to_be_bytes())?;
    }
    if let Some(password) = password {
        let challenge = random_challenge()?;
        stream.write_all(&challenge)?;
        let mut response = [0u8; 16];
        stream.read_exact(&mut response)?;
        if response != vnc_auth_response(password, &challenge) {
            return fail(stream, "Auth Failed: Invalid Password.");
        }
        stream.write_all(&0u32.to_be_bytes())?;
    } else if minor == 8 {
        // RFB 3.8 sends a SecurityResult after None too (3.7 does not).
        stream.write_all(&0u32.to_be_bytes())?;
    }
    let mut shared = [0u8];
    stream.read_exact(&mut shared)?;
    Ok(true)
}

/// A rectangle in pixels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Rect {
    x: usize,
    y: usize,
    w: usize,
    h: usize,
}

struct Session<'a, C> {
    stream: C,
    screen: &'a Screen,
    keyboard: &'a Keyboard,
    format: PixelFormat,
    encodings: Encodings,
    /// One compression stream per encoding for the whole connection, as
    /// RFC 6143 (ZRLE) and the Zlib encoding ask.
    zlib: Compress,
    zrle: Compress,
    zrle_tiles: Vec<u8>,
    /// The image the client has (as last sent) and its size.
    sent: Vec<u8>,
    sent_size: (u16, u16),
    /// The size the client knows the screen at.
    client_size: (u16, u16),
    current: Vec<u8>,
    update_pending: bool,
    full_update: bool,
    extended_key_announced: bool,
    last_update: Instant,
    typed: bool,
}

impl<'a, C: Connection> Session<'a, C> {
    fn new(stream: C, screen: &'a Screen, keyboard: &'a Keyboard, size: (u16, u16)) -> Self {
        Self {
            stream,
            screen,
            keyboard,
            format: PixelFormat::SERVER,
            encodings: Encodings::default(),
            zlib: Compress::new(Compression::fast(), true),
            zrle: Compress::new(Compression::fast(), true),
            zrle_tiles: Vec::new(),
            sent: Vec::new(),
            sent_size: size,
            client_size: size,
            current: Vec::new(),
            update_pending: false,
            full_update: true,
            extended_key_announced: false,
            last_update: Instant::now(),
            typed: false,
        }
    }

    fn run(&mut self) -> std::io::Result<()> {
        let mut pending: Vec<u8> = Vec::new();
        let mut discard: u64 = 0;
        let mut chunk = [0u8; 4096];
        loop {
            match self.stream.read(&mut chunk) {
                Ok(0) => return Ok(()),
                Ok(n) => {
                    pending.extend_from_slice(&chunk[..n]);
                    while !pending.is_empty() {
                        if discard > 0 {
                            let d = discard.min(pending.len() as u64);
                            pending.drain(..d as usize);
                            discard -= d;
                            continue;
                        }
                        match parse(&pending).map_err(|e| protocol_error(e.to_string()))? {
                            Parsed::Incomplete(_) => break,
                            Parsed::Message(msg, used) => {
                                pending.drain(..used);
                                if let ClientMessage::CutText { len } = msg {
                                    discard = len.into();
                                } else {
                                    self.handle(msg);
                                }
                            }
                        }
                    }
                }
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
            if self.update_pending
                && (self.typed || self.stream.update_due(self.last_update.elapsed()))
            {
                self.typed = false;
                self.send_update()?;
            }
        }
    }

    fn handle(&mut self, msg: ClientMessage) {
        match msg {
            ClientMessage::SetPixelFormat(f) => {
                if f.is_byte_reordering() {
                    self.format = f;
                } else {
                    // bhyve ignores every format; rhyve takes the 32-bit ones.
                    tracing::debug!(
                        ?f,
                        "fbuf: VNC pixel format not supported, keeping the server's"
                    );
                }
            }
            ClientMessage::SetEncodings(e) => self.encodings = e,
            ClientMessage::UpdateRequest { incremental, .. } => {
                self.update_pending = true;
                if !incremental {
                    self.full_update = true;
                }
            }
            ClientMessage::Key { down, keysym } => self.key(down, key_for_keysym(keysym), keysym),
            ClientMessage::ExtendedKey { down, keysym, xt } => self.key(
                down,
                key_for_xt(xt).or_else(|| key_for_keysym(keysym)),
                keysym,
            ),
            ClientMessage::Pointer { buttons, x, y } => self
                .keyboard
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .pointer_event(buttons, x, y),
            ClientMessage::CutText { .. } => {}
        }
    }

    fn key(&mut self, down: bool, key: Option<rhyve_devices::ps2_keys::Key>, keysym: u32) {
        match key {
            Some(key) => {
                self.keyboard
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .key_event(key, down);
                self.typed = true;
            }
            None => tracing::debug!("fbuf: no PS/2 key for keysym {keysym:#x}"),
        }
    }

    /// The rectangles that changed since the last update.
    fn changed_tiles(&self, w: usize, h: usize) -> Vec<Rect> {
        let mut tiles = Vec::new();
        let stride = w * 4;
        for ty in (0..h).step_by(TILE) {
            for tx in (0..w).step_by(TILE) {
                let tw = TILE.min(w - tx);
                let th = TILE.min(h - ty);
                let differs = (ty..ty + th).any(|y| {
                    let at = y * stride + tx * 4;
                    self.current[at..at + tw * 4] != self.sent[at..at + tw * 4]
                });
                if differs {
                    tiles.push(Rect {
                        x: tx,
                        y: ty,
                        w: tw,
                        h: th,
                    });
                }
            }
        }
        let total = w.div_ceil(TILE) * h.div_ceil(TILE);
        if tiles.len() * 4 >= total {
            return vec![Rect { x: 0, y: 0, w, h }];
        }
        tiles
    }

    fn send_update(&mut self) -> std::io::Result<()> {
        let (w, h) = self.screen.snapshot(&mut self.current);
        let (wu, hu) = (usize::from(w), usize::from(h));
        let mut pseudo: Vec<(Rect, i32)> = Vec::new();
        if (w, h) != self.sent_size {
            self.full_update = true;
            if self.encodings.desktop_size {
                pseudo.push((
                    Rect {
                        x: 0,
                        y: 0,
                        w: wu,
                        h: hu,
                    },
                    ENCODING_DESKTOP_SIZE,
                ));
                self.client_size = (w, h);
            }
        }
        if self.encodings.qemu_extended_key && !self.extended_key_announced {
            pseudo.push((
                Rect {
                    x: 0,
                    y: 0,
                    w: 0,
                    h: 0,
                },
                ENCODING_QEMU_EXTENDED_KEY,
            ));
            self.extended_key_announced = true;
        }
        let mut rects = if self.full_update || self.sent.len() != self.current.len() {
            vec![Rect {
                x: 0,
                y: 0,
                w: wu,
                h: hu,
            }]
        } else {
            self.changed_tiles(wu, hu)
        };
        // A client that cannot resize gets what fits in the size it knows.
        let (cw, ch) = (
            usize::from(self.client_size.0),
            usize::from(self.client_size.1),
        );
        rects.retain_mut(|r| {
            r.w = r.w.min(cw.saturating_sub(r.x));
            r.h = r.h.min(ch.saturating_sub(r.y));
            r.w > 0 && r.h > 0
        });
        self.last_update = Instant::now();
        if rects.is_empty() && pseudo.is_empty() {
            return Ok(());
        }
        let count = u16::try_from(rects.len() + pseudo.len()).unwrap_or(u16::MAX);
        let mut out = Vec::with_capacity(4 + rects.len() * (12 + TILE * TILE * 4));
        out.extend([0u8, 0]);
        out.extend(count.to_be_bytes());
        for (r, encoding) in &pseudo {
            rect_header(&mut out, *r, *encoding);
        }
        let mut pixels = Vec::new();
        for r in rects.iter().take(usize::from(count) - pseudo.len()) {
            self.pixels(*r, wu, &mut pixels);
            match self.encodings.pixels {
                PixelEncoding::Raw => {
                    rect_header(&mut out, *r, ENCODING_RAW);
                    out.extend_from_slice(&pixels);
                }
                PixelEncoding::Zlib => {
                    rect_header(&mut out, *r, ENCODING_ZLIB);
                    deflate_with_length(&mut self.zlib, &pixels, &mut out)?;
                }
                PixelEncoding::Zrle => {
                    rect_header(&mut out, *r, ENCODING_ZRLE);
                    zrle_tiles(
                        &pixels,
                        *r,
                        cpixel_bytes(&self.format),
                        &mut self.zrle_tiles,
                    );
                    deflate_with_length(&mut self.zrle, &self.zrle_tiles, &mut out)?;
                }
            }
        }
        self.stream.write_all(&out)?;
        std::mem::swap(&mut self.sent, &mut self.current);
        self.sent_size = (w, h);
        self.update_pending = false;
        self.full_update = false;
        Ok(())
    }

    /// The pixels of `r` in the client's format.
    fn pixels(&self, r: Rect, width: usize, out: &mut Vec<u8>) {
        out.clear();
        out.reserve(r.w * r.h * 4);
        let f = self.format;
        for y in r.y..r.y + r.h {
            let at = (y * width + r.x) * 4;
            let row = &self.current[at..at + r.w * 4];
            if f == PixelFormat::SERVER {
                out.extend_from_slice(row);
                continue;
            }
            for px in row.chunks_exact(4) {
                let (b, g, r) = (u32::from(px[0]), u32::from(px[1]), u32::from(px[2]));
                let v = r << f.red_shift | g << f.green_shift | b << f.blue_shift;
                if f.big_endian {
                    out.extend(v.to_be_bytes());
                } else {
                    out.extend(v.to_le_bytes());
                }
            }
        }
    }
}

fn rect_header(out: &mut Vec<u8>, r: Rect, encoding: i32) {
    for v in [r.x, r.y, r.w, r.h] {
        // Screens are at most 3840x2160: every value fits in u16.
        out.extend((v as u16).to_be_bytes());
    }
    out.extend(encoding.to_be_bytes());
}

/// ZRLE's side of a pixel (RFC 6143 §7.7.6, CPIXEL): the three bytes that
/// carry the colour when a 32-bit true colour format leaves one byte
/// unused, else all four. The range indexes a pixel's bytes as sent.
fn cpixel_bytes(f: &PixelFormat) -> std::ops::Range<usize> {
    let used = (u32::from(f.red_max) << f.red_shift)
        | (u32::from(f.green_max) << f.green_shift)
        | (u32::from(f.blue_max) << f.blue_shift);
    if !f.true_colour || f.bits_per_pixel != 32 || f.depth > 24 {
        return 0..4;
    }
    let low = used & 0xFF00_0000 == 0;
    let high = used & 0x0000_00FF == 0;
    match (low, high, f.big_endian) {
        (true, _, false) | (false, true, true) => 0..3,
        (true, _, true) | (false, true, false) => 1..4,
        _ => 0..4,
    }
}

/// The uncompressed ZRLE data of rectangle `r` whose pixels (4 bytes each,
/// row by row) are `pixels`: 64×64 tiles, each solid (subencoding 1) when
/// every pixel is the same, else raw (subencoding 0).
fn zrle_tiles(pixels: &[u8], r: Rect, cpixel: std::ops::Range<usize>, out: &mut Vec<u8>) {
    const ZRLE_TILE: usize = 64;
    out.clear();
    for ty in (0..r.h).step_by(ZRLE_TILE) {
        for tx in (0..r.w).step_by(ZRLE_TILE) {
            let th = ZRLE_TILE.min(r.h - ty);
            let tw = ZRLE_TILE.min(r.w - tx);
            let row = |y: usize| &pixels[((ty + y) * r.w + tx) * 4..((ty + y) * r.w + tx + tw) * 4];
            let first = &row(0)[..4];
            let solid = (0..th).all(|y| row(y).chunks_exact(4).all(|p| p == first));
            if solid {
                out.push(1);
                out.extend_from_slice(&first[cpixel.clone()]);
                continue;
            }
            out.push(0);
            for y in 0..th {
                for p in row(y).chunks_exact(4) {
                    out.extend_from_slice(&p[cpixel.clone()]);
                }
            }
        }
    }
}

/// Append a u32 length and `input` compressed into `z`.
fn deflate_with_length(z: &mut Compress, input: &[u8], out: &mut Vec<u8>) -> std::io::Result<()> {
    let at = out.len();
    out.extend([0u8; 4]);
    deflate(z, input, out)?;
    let len = u32::try_from(out.len() - at - 4)
        .map_err(|_| std::io::Error::other("compressed rectangle over 4 GiB"))?;
    out[at..at + 4].copy_from_slice(&len.to_be_bytes());
    Ok(())
}

/// Append `input` compressed into the connection's one zlib stream, ended
/// with a sync flush so the client can decode the rectangle at once.
fn deflate(z: &mut Compress, input: &[u8], out: &mut Vec<u8>) -> std::io::Result<()> {
    let start = z.total_in();
    loop {
        out.reserve(input.len() / 2 + 1024);
        let consumed = (z.total_in() - start) as usize;
        z.compress_vec(&input[consumed..], out, FlushCompress::Sync)
            .map_err(|e| std::io::Error::other(format!("zlib: {e}")))?;
        let done = (z.total_in() - start) as usize == input.len();
        if done && out.len() < out.capacity() {
            return Ok(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::VecDeque;

    /// A client whose bytes are all queued up front; reads end the session
    /// once they are consumed.
    /// What the guest does to the screen before a read returns.
    type GuestStep<'a> = Box<dyn FnOnce() + 'a>;

    struct ScriptedClient<'a> {
        input: VecDeque<u8>,
        output: Vec<u8>,
        /// Later reads: what the guest does first, then what the client sends.
        later: VecDeque<(GuestStep<'a>, Vec<u8>)>,
    }

    impl Read for ScriptedClient<'_> {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            if self.input.is_empty() {
                if let Some((guest, bytes)) = self.later.pop_front() {
                    guest();
                    self.input.extend(bytes);
                }
            }
            let n = buf.len().min(self.input.len());
            for b in buf.iter_mut().take(n) {
                *b = self.input.pop_front().unwrap_or_default();
            }
            Ok(n)
        }
    }

    impl Write for ScriptedClient<'_> {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.output.extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl Connection for &mut ScriptedClient<'_> {
        fn poll_reads(&mut self) -> std::io::Result<()> {
            Ok(())
        }
        fn update_due(&self, _: Duration) -> bool {
            true
        }
    }

    struct NoLine;
    impl rhyve_platform::irq::InterruptLine for NoLine {
        fn set_level(&self, _: bool) {}
    }
    struct NoWindow;
    impl rhyve_platform::window::MemoryWindow for NoWindow {
        fn place(&mut self, _: Option<u64>) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// A 640x480 screen whose pixel (x, y) is B=x, G=y, R=x^y (low bytes)
    /// in its top-left 100x70 corner, black elsewhere.
    fn patterned_screen() -> (crate::fbuf::Fbuf, Arc<Screen>) {
        let mut tree = rhyve_config::ConfigTree::new();
        tree.set("pci.0.29.0.w", "640").unwrap();
        tree.set("pci.0.29.0.h", "480").unwrap();
        let options = FbufOptions::from_tree(&tree, "pci.0.29.0").unwrap();
        let pages = Arc::new(vm_memory::MmapRegion::new(crate::fbuf::FRAMEBUFFER_SIZE).unwrap());
        let (mut fbuf, screen) =
            crate::fbuf::Fbuf::new(&options, pages, Box::new(NoWindow)).unwrap();
        for y in 0..70u32 {
            for x in 0..100u32 {
                let px = [x as u8, y as u8, (x ^ y) as u8, 0];
                let at = u64::from((y * 640 + x) * 4);
                rhyve_pci::PciFunction::bar_write(&mut fbuf, 1, at, &px);
            }
        }
        (fbuf, screen)
    }

    fn expected(x: usize, y: usize) -> (u8, u8, u8) {
        if x < 100 && y < 70 {
            ((x ^ y) as u8, y as u8, x as u8)
        } else {
            (0, 0, 0)
        }
    }

    fn inflate(z: &mut flate2::Decompress, data: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(640 * 480 * 4 + 1024);
        z.decompress_vec(data, &mut out, flate2::FlushDecompress::Sync)
            .unwrap();
        out
    }

    /// One full update of the patterned screen in `encoding`, with the
    /// client's format RGB (red shift 0) at depth 24, decoded from the
    /// bytes the server sent; returns (r, g, b) per pixel.
    fn full_update(encoding: i32) -> Vec<(u8, u8, u8)> {
        let (_fbuf, screen) = patterned_screen();
        let keyboard: Keyboard = Arc::new(Mutex::new(I8042::new(
            Arc::new(NoLine),
            Arc::new(NoLine),
            Arc::new(rhyve_platform::exit::ExitRequests::new()),
        )));
        let mut input: Vec<u8> = b"RFB 003.008\n".to_vec();
        input.extend([SECURITY_NONE, 1]);
        let rgb = PixelFormat {
            depth: 24,
            red_shift: 0,
            blue_shift: 16,
            ..PixelFormat::SERVER
        };
        input.extend([0, 0, 0, 0]);
        input.extend(rgb.to_bytes());
        input.extend([2, 0, 0, 2]);
        input.extend(encoding.to_be_bytes());
        input.extend(ENCODING_RAW.to_be_bytes());
        input.extend([3, 0, 0, 0, 0, 0, 2, 0x80, 1, 0xE0]);
        let mut client = ScriptedClient {
            input: input.into(),
            output: Vec::new(),
            later: VecDeque::new(),
        };
        serve(&mut client, &screen, &keyboard, None).unwrap();
        let out = client.output;
        // Version 12, security list 2, result 4, ServerInit 24 + name.
        let init = 12 + 2 + 4;
        assert_eq!(&out[init..init + 4], &[2, 0x80, 1, 0xE0], "640x480");
        let mut at = init + 24 + SERVER_NAME.len();
        assert_eq!(&out[at..at + 4], &[0, 0, 0, 1], "one rectangle");
        at += 4;
        assert_eq!(&out[at..at + 8], &[0, 0, 0, 0, 2, 0x80, 1, 0xE0]);
        assert_eq!(&out[at + 8..at + 12], &encoding.to_be_bytes());
        at += 12;
        let body = &out[at..];
        let (w, h) = (640usize, 480usize);
        let mut pixels = Vec::with_capacity(w * h);
        match encoding {
            ENCODING_RAW => {
                for p in body.chunks_exact(4) {
                    pixels.push((p[0], p[1], p[2]));
                }
            }
            ENCODING_ZLIB => {
                let len = u32::from_be_bytes(body[..4].try_into().unwrap()) as usize;
                assert_eq!(body.len(), 4 + len);
                let raw = inflate(&mut flate2::Decompress::new(true), &body[4..]);
                for p in raw.chunks_exact(4) {
                    pixels.push((p[0], p[1], p[2]));
                }
            }
            ENCODING_ZRLE => {
                let len = u32::from_be_bytes(body[..4].try_into().unwrap()) as usize;
                assert_eq!(body.len(), 4 + len);
                let data = inflate(&mut flate2::Decompress::new(true), &body[4..]);
                let mut grid = vec![(0, 0, 0); w * h];
                let mut i = 0;
                for ty in (0..h).step_by(64) {
                    for tx in (0..w).step_by(64) {
                        let (tw, th) = (64.min(w - tx), 64.min(h - ty));
                        let sub = data[i];
                        i += 1;
                        for y in ty..ty + th {
                            for x in tx..tx + tw {
                                // CPIXELs are 3 bytes: R, G, B for this format.
                                let at = if sub == 1 {
                                    i
                                } else {
                                    i + 3 * ((y - ty) * tw + (x - tx))
                                };
                                grid[y * w + x] = (data[at], data[at + 1], data[at + 2]);
                            }
                        }
                        i += if sub == 1 { 3 } else { 3 * tw * th };
                        assert!(sub <= 1, "subencoding {sub}");
                    }
                }
                assert_eq!(i, data.len());
                pixels = grid;
            }
            _ => unreachable!(),
        }
        pixels
    }

    #[test]
    fn incremental_updates_carry_only_the_changed_tiles() {
        let (fbuf, screen) = patterned_screen();
        let fbuf = Mutex::new(fbuf);
        let keyboard: Keyboard = Arc::new(Mutex::new(I8042::new(
            Arc::new(NoLine),
            Arc::new(NoLine),
            Arc::new(rhyve_platform::exit::ExitRequests::new()),
        )));
        let mut input: Vec<u8> = b"RFB 003.008\n".to_vec();
        input.extend([SECURITY_NONE, 1]);
        input.extend([3, 0, 0, 0, 0, 0, 2, 0x80, 1, 0xE0]);
        let incremental = vec![3, 1, 0, 0, 0, 0, 2, 0x80, 1, 0xE0];
        let poke = |x: u32, y: u32| {
            let fbuf = &fbuf;
            Box::new(move || {
                let mut f = fbuf.lock().unwrap();
                rhyve_pci::PciFunction::bar_write(
                    &mut *f,
                    1,
                    u64::from((y * 640 + x) * 4),
                    &[9; 4],
                );
            }) as GuestStep
        };
        let mut client = ScriptedClient {
            input: input.into(),
            output: Vec::new(),
            later: VecDeque::from([
                (poke(170, 100), incremental.clone()),
                // Nothing changed: no update is sent.
                (Box::new(|| {}) as GuestStep, incremental.clone()),
                (poke(639, 479), Vec::new()),
            ]),
        };
        serve(&mut client, &screen, &keyboard, None).unwrap();
        let out = &client.output;
        let full = 12 + 2 + 4 + 24 + SERVER_NAME.len() + 4 + 12 + 640 * 480 * 4;
        let rest = &out[full..];
        // One update with one 32x32 raw tile at (160, 96).
        assert_eq!(&rest[..4], &[0, 0, 0, 1]);
        assert_eq!(&rest[4..16], &[0, 160, 0, 96, 0, 32, 0, 32, 0, 0, 0, 0]);
        assert_eq!(rest.len(), 16 + 32 * 32 * 4, "no update without a change");
        let at = 16 + ((100 - 96) * 32 + (170 - 160)) * 4;
        assert_eq!(&rest[at..at + 4], &[9; 4]);
    }

    #[test]
    fn a_mode_change_reaches_the_client_as_desktop_size_then_a_full_update() {
        let (fbuf, screen) = patterned_screen();
        let fbuf = Mutex::new(fbuf);
        let keyboard: Keyboard = Arc::new(Mutex::new(I8042::new(
            Arc::new(NoLine),
            Arc::new(NoLine),
            Arc::new(rhyve_platform::exit::ExitRequests::new()),
        )));
        let mut input: Vec<u8> = b"RFB 003.008\n".to_vec();
        input.extend([SECURITY_NONE, 1]);
        input.extend([2, 0, 0, 1]);
        input.extend(ENCODING_DESKTOP_SIZE.to_be_bytes());
        input.extend([3, 0, 0, 0, 0, 0, 2, 0x80, 1, 0xE0]);
        // What BhyveRfbDxe's SetMode writes for 800x600.
        let set_mode = Box::new(|| {
            let mut f = fbuf.lock().unwrap();
            rhyve_pci::PciFunction::bar_write(&mut *f, 0, 4, &800u16.to_le_bytes());
            rhyve_pci::PciFunction::bar_write(&mut *f, 0, 6, &600u16.to_le_bytes());
        }) as GuestStep;
        let mut client = ScriptedClient {
            input: input.into(),
            output: Vec::new(),
            later: VecDeque::from([(set_mode, vec![3, 1, 0, 0, 0, 0, 2, 0x80, 1, 0xE0])]),
        };
        serve(&mut client, &screen, &keyboard, None).unwrap();
        let out = &client.output;
        let full = 12 + 2 + 4 + 24 + SERVER_NAME.len() + 4 + 12 + 640 * 480 * 4;
        let rest = &out[full..];
        assert_eq!(
            &rest[..4],
            &[0, 0, 0, 2],
            "DesktopSize and the whole screen"
        );
        assert_eq!(&rest[4..12], &[0, 0, 0, 0, 3, 0x20, 2, 0x58], "800x600");
        assert_eq!(&rest[12..16], &ENCODING_DESKTOP_SIZE.to_be_bytes());
        assert_eq!(&rest[16..28], &[0, 0, 0, 0, 3, 0x20, 2, 0x58, 0, 0, 0, 0]);
        assert_eq!(rest.len(), 28 + 800 * 600 * 4);
    }

    #[test]
    fn every_encoding_carries_the_screen_in_the_clients_format() {
        for encoding in [ENCODING_RAW, ENCODING_ZLIB, ENCODING_ZRLE] {
            let pixels = full_update(encoding);
            assert_eq!(pixels.len(), 640 * 480, "encoding {encoding}");
            for (i, p) in pixels.iter().enumerate() {
                let (x, y) = (i % 640, i / 640);
                assert_eq!(*p, expected(x, y), "encoding {encoding} at ({x}, {y})");
            }
        }
    }

    #[test]
    fn the_server_listens_on_ipv4_and_ipv6_and_serves_one_client_at_a_time() {
        for listen in ["127.0.0.1:0", "[::1]:0"] {
            let (_fbuf, screen) = patterned_screen();
            let keyboard: Keyboard = Arc::new(Mutex::new(I8042::new(
                Arc::new(NoLine),
                Arc::new(NoLine),
                Arc::new(rhyve_platform::exit::ExitRequests::new()),
            )));
            let mut tree = rhyve_config::ConfigTree::new();
            tree.set("pci.0.29.0.rfb", listen).unwrap();
            let options = FbufOptions::from_tree(&tree, "pci.0.29.0").unwrap();
            let addr = start(&options, screen, keyboard).unwrap();
            let mut first = TcpStream::connect(addr).unwrap();
            let mut version = [0u8; 12];
            first.read_exact(&mut version).unwrap();
            assert_eq!(&version, SERVER_VERSION, "{listen}");
            // The second waits until the first leaves.
            let mut second = TcpStream::connect(addr).unwrap();
            second
                .set_read_timeout(Some(Duration::from_millis(300)))
                .unwrap();
            assert!(second.read_exact(&mut version).is_err(), "{listen}");
            drop(first);
            second
                .set_read_timeout(Some(Duration::from_secs(10)))
                .unwrap();
            second.read_exact(&mut version).unwrap();
            assert_eq!(&version, SERVER_VERSION);
        }
    }

    #[test]
    fn vnc_auth_matches_the_known_answer() {
        // d3des's key schedule as every VNC viewer uses it: a zero
        // challenge and password "password" (bit-reversed key).
        let key = vnc_auth_key("password");
        assert_eq!(key, [0x0E, 0x86, 0xCE, 0xCE, 0xEE, 0xF6, 0x4E, 0x26]);
        assert_eq!(vnc_auth_key("longerthan8"), vnc_auth_key("longerth"));
        let a = vnc_auth_response("password", &[0; 16]);
        assert_eq!(a[..8], a[8..], "ECB: equal halves encrypt alike");
        assert_ne!(a, vnc_auth_response("passwore", &[0; 16]));
    }
}
