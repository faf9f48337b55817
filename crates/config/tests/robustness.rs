//! Hostile command lines: whatever the words, parsing returns an answer
//! (an invocation or an error with a status) and never panics.

use rhyve_config::{parse_bhyve_args, parse_memsize, validate};

/// Pieces command lines are made of, including the awkward ones.
const PIECES: &[&str] = &[
    "-",
    "--",
    "-s",
    "-l",
    "-c",
    "-m",
    "-o",
    "-p",
    "-n",
    "-G",
    "-f",
    "-U",
    "-K",
    "-r",
    "-k",
    "-AHPw",
    "-h",
    "-z",
    "",
    ",",
    ":",
    "=",
    "0",
    "31",
    "32",
    "255:31:7",
    "1:x",
    "-1",
    "0,hostbridge",
    "1,lpc",
    "2,ahci,hd:",
    "2,ahci,cd:,hd:",
    "3,ahci,,,",
    "4,virtio-console,=",
    "5,passthru,pci",
    "6,passthru,ppt",
    "7,xhci,=",
    "8,nvme,ram=",
    "9,virtio-9p,=,=",
    "com1",
    "com1,",
    "bootrom,",
    "bootrom,,",
    "tpm,,",
    "tpm,a,b,c=d,e",
    "pc-testdev",
    "cpus=",
    "sockets=0",
    "cores=99999999999999999999",
    "id=",
    "id=0,cpus=",
    "w:",
    "w",
    "a=b",
    "a..b=1",
    ".=1",
    "pci.0.0.0=x",
    "pci.0.0.0.device=%(pci.0.0.0.device)",
    "x=%(",
    "x=\\",
    "é",
    "-é",
    "name=vm",
    "config.dump=1",
    "vcpu.0.cpuset=1-",
    "0:1024",
    "99999999999:1",
    "opt/x,string=",
    "n,file=",
    "%",
    "vm",
];

#[test]
fn random_command_lines_never_panic() {
    let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    for _ in 0..20_000 {
        let len = (next() % 8) as usize;
        let args: Vec<String> = (0..len)
            .map(|_| PIECES[(next() % PIECES.len() as u64) as usize].to_string())
            .collect();
        match parse_bhyve_args(&args) {
            Ok(inv) => {
                let _ = inv.tree.dump();
                let _ = validate(&inv.tree);
            }
            Err(e) => assert!(e.status > 0, "{args:?}: {e:?}"),
        }
    }
}

#[test]
fn memsize_never_panics() {
    for s in [
        "",
        "0x",
        "0x1p",
        "08",
        "1e",
        "1E",
        "18446744073709551615",
        "18446744073709551616k",
        "é",
        "1é",
    ] {
        let _ = parse_memsize(s);
    }
}
