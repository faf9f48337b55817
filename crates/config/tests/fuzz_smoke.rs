//! Bounded smoke run of the `-k` config file fuzz target (`fuzz/`, run for
//! real with `cargo +nightly fuzz run config_file`): random bytes and
//! mutations of bhyve_config(5) files must pass without a panic or a hang.

use rhyve_testutil::XorShift;
use std::time::{Duration, Instant};

use rhyve_config::fuzzing;

const RUNS: usize = 2000;

const SEEDS: &[&str] = &[
    "# a VM\nname=vm0\ncpus=2\nsockets=1\ncores=2\nmemory.size=512M\n\
     pci.0.0.0.device=hostbridge\npci.0.4.0.device=virtio-blk\npci.0.4.0.path=/tmp/d.img\n\
     pci.0.31.0.device=lpc\nlpc.com1.path=stdio\n",
    "x=%(y)\ny=%(z)%(z)\nz=%%\\%(name)\nname=vm\nvcpu.0.cpuset=0-3\nmemory.wired=true\n",
    "domain.0.size=256M\ndomain.0.cpus=0\ndomain.1.size=256M\ndomain.1.cpus=1\ncpus=2\n",
];

/// Pieces that mean something to the parser and the checks.
const TOKENS: &[&str] = &[
    "=",
    "\n",
    "#",
    "%(",
    ")",
    "%%",
    "\\",
    ".",
    "pci.0.",
    "cpus=",
    "memory.size=",
    "0x",
    "-1",
    "99999999999999999999",
    "%(cpus)",
    "true",
    "off",
    ",",
    "domain.0.",
    "vcpu.0.cpuset=",
];

fn mutate(r: &mut XorShift, seed: &str) -> Vec<u8> {
    let mut d = seed.as_bytes().to_vec();
    for _ in 0..1 + r.index(6) {
        let at = r.index(d.len() + 1);
        match r.index(3) {
            0 => {
                let t = TOKENS[r.index(TOKENS.len())].as_bytes();
                d.splice(at..at, t.iter().copied());
            }
            1 if at < d.len() => {
                let end = (at + r.index(8)).min(d.len());
                d.drain(at..end);
            }
            _ if at < d.len() => d[at] = r.next_u64() as u8,
            _ => {}
        }
    }
    d
}

#[test]
fn config_files() {
    let mut r = XorShift(21);
    let start = Instant::now();
    for i in 0..RUNS {
        let data = if i % 2 == 0 {
            let len = r.index(512);
            (0..len).map(|_| r.next_u64() as u8).collect()
        } else {
            let seed = SEEDS[r.index(SEEDS.len())];
            mutate(&mut r, seed)
        };
        fuzzing::config_file(&data);
    }
    assert!(
        start.elapsed() < Duration::from_secs(120),
        "{RUNS} inputs took {:?}",
        start.elapsed()
    );
}

/// Each value naming the next one eight times: expanding `a0` would take
/// 8^12 copies (tens of gigabytes). It must fail fast instead.
#[test]
fn references_that_multiply_are_refused() {
    let mut tree = rhyve_config::ConfigTree::new();
    for i in 0..12 {
        tree.set(&format!("a{i}"), format!("%(a{})", i + 1).repeat(8))
            .unwrap();
    }
    tree.set("a12", "xxxxxxxx").unwrap();
    let start = Instant::now();
    let err = tree.get("a0").unwrap_err().to_string();
    assert!(err.contains("too long"), "{err}");
    assert!(start.elapsed() < Duration::from_secs(5));
    // Modest reuse still expands.
    tree.set("b", "%(a11)%(a11)").unwrap();
    assert_eq!(tree.get("b").unwrap().unwrap().len(), 2 * 8 * 8);
}
