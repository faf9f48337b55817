//! bhyve's firmware control interface on ports 0x510/0x511 (`fwctl.c`),
//! present when a boot ROM is used with `lpc.fwcfg=bhyve` (the default).
//! bhyve's UEFI firmware reads the guest's CPU count (`hw.ncpu`) through it
//! for its MADT.
//!
//! The protocol, as bhyve's back end implements it:
//! - a 16-bit write of 0 resets the interface, discarding any half-sent
//!   request or unread response; 8-bit reads then return "BHYV" and the
//!   interface waits for a request (other 8-bit reads return 0xFF);
//! - a request is 32-bit writes: total size (header included), operation,
//!   transaction id, then the payload in 32-bit words;
//! - the response is 32-bit reads: size (16 + payload rounded up to 4),
//!   operation, transaction id, error (an errno), then the payload words.
//!
//! Only GET (3) and GET_LEN (4) exist, and only one name: `hw.ncpu`, a
//! 4-byte integer. GET answers an 8-byte length followed by the value,
//! GET_LEN the 8-byte length alone. Anything else answers ENOENT; a name
//! longer than 80 bytes answers E2BIG.
//!
//! Which port of the pair an access hits does not matter, as in bhyve
//! (one handler serves both); its width does. The bus claims
//! [`FWCTL_PORT_SPAN`] ports so a 32-bit access at either port arrives
//! here; accesses starting past 0x511 act as unassigned ports. bhyve ends
//! the VMM when a request's size is below the 12-byte header; rhyve
//! discards such a request instead, so the guest cannot end the VM this way.

use rhyve_platform::bus::BusDevice;
use rhyve_platform::snapshot::Schema;
use serde::{Deserialize, Serialize};

/// Ports from 0x510 the bus gives this device: the two ports plus room for
/// a 32-bit access at the second one.
pub const FWCTL_PORT_SPAN: u64 = 5;

const SIGNATURE: [u8; 4] = *b"BHYV";
const OP_GET: u32 = 3;
const OP_GET_LEN: u32 = 4;
const HEADER_LEN: u32 = 12;
const MAX_NAME: u32 = 80;
const ENOENT: u32 = 2;
const E2BIG: u32 = 7;
const NCPU_NAME: &[u8] = b"hw.ncpu";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
enum State {
    Ident { next: usize },
    Request(Request),
    Response(Response),
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
struct Request {
    /// Header words received so far (size, op, txid).
    header: Vec<u32>,
    /// Payload bytes still expected.
    remaining: u32,
    payload: Vec<u8>,
    /// Set when the payload is refused (too long): the words are dropped.
    error: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Response {
    words: Vec<u32>,
    next: usize,
}

/// The fwctl back end of a VM with `ncpu` vCPUs; a snapshot saves all of
/// it (the protocol's position: a few words).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fwctl {
    ncpu: u32,
    state: State,
}

impl Fwctl {
    pub fn new(ncpu: u32) -> Self {
        Self {
            ncpu,
            state: State::Ident { next: 0 },
        }
    }

    /// Take over a saved state, checked: same vCPU count, and every
    /// position inside what it points into.
    pub fn restore(&mut self, saved: Fwctl) -> Result<(), String> {
        if saved.ncpu != self.ncpu {
            return Err(format!(
                "fwctl: saved for {} vCPUs, this VM has {}",
                saved.ncpu, self.ncpu
            ));
        }
        let fits = match &saved.state {
            State::Ident { next } => *next < SIGNATURE.len(),
            State::Request(r) => {
                r.header.len() < 3 || (r.header.len() == 3 && r.header[0] >= HEADER_LEN)
            }
            State::Response(r) => r.next < r.words.len(),
        };
        if !fits {
            return Err("fwctl: damaged saved protocol state".into());
        }
        *self = saved;
        Ok(())
    }

    fn reset(&mut self) {
        self.state = State::Ident { next: 0 };
    }

    fn read_u8(&mut self) -> u8 {
        match &mut self.state {
            State::Ident { next } => {
                let b = SIGNATURE[*next];
                *next += 1;
                if *next == SIGNATURE.len() {
                    self.state = State::Request(Request::default());
                }
                b
            }
            _ => 0xFF,
        }
    }

    fn write_u32(&mut self, value: u32) {
        let State::Request(req) = &mut self.state else {
            return;
        };
        let done = if req.header.len() < 3 {
            if req.header.is_empty() && value < HEADER_LEN {
                tracing::warn!("fwctl: request size {value} is below the header's; discarded");
                return;
            }
            req.header.push(value);
            if req.header.len() < 3 {
                return;
            }
            req.remaining = req.header[0] - HEADER_LEN;
            // Only GET and GET_LEN keep their payload (a name of at most
            // 80 bytes); anything else is answered with an error and its
            // words are dropped, however many the guest claims.
            req.error = match req.header[1] {
                OP_GET | OP_GET_LEN if req.remaining > MAX_NAME => Some(E2BIG),
                OP_GET | OP_GET_LEN => None,
                _ => Some(ENOENT),
            };
            req.remaining == 0
        } else {
            req.remaining = req.remaining.saturating_sub(4);
            if req.error.is_none() {
                req.payload.extend_from_slice(&value.to_le_bytes());
            }
            // bhyve answers once fewer than 4 payload bytes are left.
            req.remaining < 4
        };
        if done {
            let req = std::mem::take(req);
            self.state = State::Response(self.answer(&req));
        }
    }

    fn answer(&self, req: &Request) -> Response {
        let (op, txid) = (req.header[1], req.header[2]);
        let (error, data) = match req.error {
            Some(e) => (e, Vec::new()),
            None if names_ncpu(&req.payload) => {
                let len = 4u64.to_le_bytes();
                if op == OP_GET {
                    let mut d = len.to_vec();
                    d.extend_from_slice(&self.ncpu.to_le_bytes());
                    (0, d)
                } else {
                    (0, len.to_vec())
                }
            }
            None => (ENOENT, Vec::new()),
        };
        let mut words = vec![16 + data.len().next_multiple_of(4) as u32, op, txid, error];
        words.extend(data.chunks(4).map(|c| {
            let mut w = [0u8; 4];
            w[..c.len()].copy_from_slice(c);
            u32::from_le_bytes(w)
        }));
        Response { words, next: 0 }
    }

    fn read_u32(&mut self) -> u32 {
        let State::Response(resp) = &mut self.state else {
            return 0xFFFF_FFFF;
        };
        let w = resp.words[resp.next];
        resp.next += 1;
        if resp.next == resp.words.len() {
            self.state = State::Request(Request::default());
        }
        w
    }
}

/// bhyve looks names up with `strncmp(name, oid, received_bytes)`.
fn names_ncpu(payload: &[u8]) -> bool {
    for (i, &b) in payload.iter().enumerate() {
        let o = NCPU_NAME.get(i).copied().unwrap_or(0);
        if b != o {
            return false;
        }
        if b == 0 {
            return true;
        }
    }
    true
}

impl Schema for Fwctl {
    const KIND: &'static str = "fwctl";
    const VERSION: u32 = 1;
}

impl BusDevice for Fwctl {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= 2 {
            data.fill(0xFF);
            return;
        }
        match data.len() {
            1 => data[0] = self.read_u8(),
            4 => data.copy_from_slice(&self.read_u32().to_le_bytes()),
            _ => data.fill(0xFF),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= 2 {
            return;
        }
        match data.len() {
            2 if data == [0, 0] => self.reset(),
            4 => self.write_u32(u32::from_le_bytes([data[0], data[1], data[2], data[3]])),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inb(f: &mut Fwctl) -> u8 {
        let mut b = [0u8; 1];
        f.read(1, &mut b);
        b[0]
    }

    fn inl(f: &mut Fwctl) -> u32 {
        let mut b = [0u8; 4];
        f.read(0, &mut b);
        u32::from_le_bytes(b)
    }

    fn outl(f: &mut Fwctl, v: u32) {
        f.write(0, &v.to_le_bytes());
    }

    fn probe(f: &mut Fwctl) {
        f.write(0, &[0, 0]);
        let sig: Vec<u8> = (0..4).map(|_| inb(f)).collect();
        assert_eq!(sig, b"BHYV");
        assert_eq!(inb(f), 0xFF, "only four signature bytes");
    }

    /// Send a request the way EDK II's BhyveFwCtlLib does.
    fn request(f: &mut Fwctl, op: u32, txid: u32, payload: &[u8]) -> Vec<u32> {
        outl(f, 12 + payload.len() as u32);
        outl(f, op);
        outl(f, txid);
        for c in payload.chunks(4) {
            let mut w = [0u8; 4];
            w[..c.len()].copy_from_slice(c);
            outl(f, u32::from_le_bytes(w));
        }
        let size = inl(f);
        let mut words = vec![size];
        for _ in 1..size / 4 {
            words.push(inl(f));
        }
        words
    }

    #[test]
    fn firmware_reads_hw_ncpu() {
        let mut f = Fwctl::new(3);
        probe(&mut f);
        let r = request(&mut f, OP_GET, 0xA5, b"hw.ncpu\0");
        assert_eq!(r, vec![28, OP_GET, 0xA5, 0, 4, 0, 3]);
        assert_eq!(inl(&mut f), 0xFFFF_FFFF, "response fully read");
        let r = request(&mut f, OP_GET_LEN, 0xA6, b"hw.ncpu\0");
        assert_eq!(r, vec![24, OP_GET_LEN, 0xA6, 0, 4, 0]);
    }

    #[test]
    fn unknown_names_ops_and_long_names_are_errors() {
        let mut f = Fwctl::new(1);
        probe(&mut f);
        assert_eq!(
            request(&mut f, OP_GET, 1, b"hw.physmem\0"),
            vec![16, OP_GET, 1, ENOENT]
        );
        assert_eq!(request(&mut f, 1, 2, b""), vec![16, 1, 2, ENOENT]);
        assert_eq!(
            request(&mut f, OP_GET, 3, &[b'a'; 84]),
            vec![16, OP_GET, 3, E2BIG]
        );
        assert_eq!(request(&mut f, OP_GET, 4, b"hw.ncpu\0")[6], 1);
    }

    #[test]
    fn reset_discards_half_done_work_and_hostile_sizes() {
        let mut f = Fwctl::new(2);
        probe(&mut f);
        outl(&mut f, 20);
        outl(&mut f, OP_GET);
        probe(&mut f);
        outl(&mut f, 3);
        assert_eq!(request(&mut f, OP_GET, 9, b"hw.ncpu\0")[6], 2);
        outl(&mut f, 20);
        outl(&mut f, OP_GET);
        outl(&mut f, 1);
        outl(&mut f, u32::from_le_bytes(*b"hw.n"));
        outl(&mut f, u32::from_le_bytes(*b"cpu\0"));
        assert_eq!(inl(&mut f), 28);
        probe(&mut f);
        assert_eq!(inl(&mut f), 0xFFFF_FFFF, "the unread response is gone");
        let mut w = [0u8; 2];
        f.read(0, &mut w);
        assert_eq!(w, [0xFF, 0xFF], "16-bit reads are all ones");
        f.read(3, &mut w);
        assert_eq!(w, [0xFF, 0xFF]);
        // Requests claiming 4 GiB keep nothing of what follows.
        for op in [OP_GET, 1] {
            probe(&mut f);
            outl(&mut f, u32::MAX);
            outl(&mut f, op);
            outl(&mut f, 1);
            for _ in 0..1000 {
                outl(&mut f, 0x4141_4141);
            }
            let State::Request(req) = &f.state else {
                panic!("still receiving")
            };
            assert!(req.payload.is_empty());
            assert_eq!(inl(&mut f), 0xFFFF_FFFF, "no response before the end");
        }
    }

    #[test]
    fn state_round_trips_mid_response_and_damage_is_refused() {
        let mut f = Fwctl::new(3);
        f.write(0, &[0, 0]);
        let mut b = [0u8];
        for _ in 0..4 {
            f.read(0, &mut b);
        }
        for w in [
            HEADER_LEN + 8,
            OP_GET,
            9,
            u32::from_le_bytes(*b"hw.n"),
            u32::from_le_bytes(*b"cpu\0"),
        ] {
            f.write(0, &w.to_le_bytes());
        }
        let mut w = [0u8; 4];
        f.read(0, &mut w);
        let text = serde_json::to_string(&f).unwrap();
        let mut g = Fwctl::new(3);
        g.restore(serde_json::from_str(&text).unwrap()).unwrap();
        let words: Vec<u32> = (0..6)
            .map(|_| {
                g.read(0, &mut w);
                u32::from_le_bytes(w)
            })
            .collect();
        assert_eq!(
            words,
            [OP_GET, 9, 0, 4, 0, 3],
            "the rest of the answer: hw.ncpu = 3"
        );
        let mut other = Fwctl::new(4);
        assert!(
            other.restore(serde_json::from_str(&text).unwrap()).is_err(),
            "another vCPU count"
        );
        let mut bad: Fwctl = serde_json::from_str(&text).unwrap();
        if let State::Response(r) = &mut bad.state {
            r.next = r.words.len();
        }
        assert!(g.restore(bad).is_err(), "a position past the answer");
    }
}
