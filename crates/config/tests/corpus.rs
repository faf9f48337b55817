//! Conformance against libvirt's bhyve test data (`../shared/corpus/libvirt`
//! beside the workspace, read at run time, never copied here).
//!
//! For every bhyve command line in the corpus the expected tree is derived
//! here from the raw words, independently of the parser: each `-s` gives a
//! `pci.B.S.F.device` and nothing else may appear under `pci`, each `-l`
//! its LPC keys, and `-c -m -o -p -n -U`, the flags and the VM name their
//! keys. A hand-written table then pins down every device kind's keys for
//! representative files. `MANIFEST.tsv`'s expectations are libvirt's (its
//! argv->XML converter rejects things bhyve accepts), so what bhyve itself
//! does is decided per file below, each with its reason.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use rhyve_config::{parse_bhyve_args, CliError, Invocation};

fn corpus_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/corpus/libvirt")
}

/// Split a shell script into commands (one a line, backslash-newline
/// continues a line) of words (blanks separate, quotes group, backslash
/// escapes), as sh(1) reads these files.
fn shell_commands(text: &str) -> Vec<Vec<String>> {
    let mut commands = Vec::new();
    let mut words: Vec<String> = Vec::new();
    let mut word = String::new();
    let mut in_word = false;
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\\' => match chars.next() {
                Some('\n') => {}
                Some(other) => {
                    word.push(other);
                    in_word = true;
                }
                None => {}
            },
            '\'' => {
                in_word = true;
                for q in chars.by_ref() {
                    if q == '\'' {
                        break;
                    }
                    word.push(q);
                }
            }
            '"' => {
                in_word = true;
                while let Some(q) = chars.next() {
                    match q {
                        '"' => break,
                        '\\' => {
                            if let Some(e) = chars.next() {
                                word.push(e);
                            }
                        }
                        _ => word.push(q),
                    }
                }
            }
            ' ' | '\t' | '\n' => {
                if in_word {
                    words.push(std::mem::take(&mut word));
                    in_word = false;
                }
                if c == '\n' && !words.is_empty() {
                    commands.push(std::mem::take(&mut words));
                }
            }
            _ => {
                word.push(c);
                in_word = true;
            }
        }
    }
    if in_word {
        words.push(word);
    }
    if !words.is_empty() {
        commands.push(words);
    }
    commands
}

fn program(argv: &[String]) -> &str {
    argv[0].rsplit('/').next().unwrap_or("")
}

/// What bhyve does with a file's command line, where it is not "accepts it".
fn bhyve_refuses(corpus_path: &str) -> Option<(i32, &'static str)> {
    let name = corpus_path.rsplit('/').next().unwrap_or(corpus_path);
    match name {
        // `-m bogus`: libvirt and bhyve both refuse it (EX_USAGE).
        "bhyveargv2xml-memsize-fail.args" => Some((64, "bhyve: invalid memsize 'bogus'")),
        // Two operands after the options (`bhyve bogus`): bhyve_usage(1).
        "bhyveargv2xml-extraargs.args" => Some((1, "")),
        // `ARGUMENT1 ARGUMENT2 bhyve`: three operands, bhyve_usage(1).
        "bhyvexml2argv-commandline.args" => Some((1, "")),
        // Everything else libvirt marks as failing is about libvirt's own
        // converter, not bhyve: loader/bhyve name or memory mismatches and
        // `bhyveload -m bogus` (bhyve's own line is fine), `/dev/nmdm0C` or
        // com3 consoles, `-U garbage` (checked by bhyve's SMBIOS code at VM
        // start, not by the command line), `notatap`/`mac=garbage`
        // (checked when the NIC is created), too many disks, two NVMe
        // controllers, a tcp serial port.
        _ => None,
    }
}

/// Keys implied by the raw words, derived without the parser.
struct Expected {
    keys: BTreeMap<String, String>,
    pci_nodes: BTreeSet<String>,
}

fn alias(model: &str) -> &str {
    match model {
        "ahci-hd" | "ahci-cd" => "ahci",
        "amd_hostbridge" => "hostbridge",
        other => other,
    }
}

fn derive(argv: &[String]) -> Expected {
    let mut keys = BTreeMap::new();
    let mut pci_nodes = BTreeSet::new();
    let mut pins: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut put = |k: &str, v: &str| {
        keys.insert(k.to_string(), v.to_string());
    };
    let mut i = 0;
    let mut operands = Vec::new();
    while i < argv.len() {
        let w = &argv[i];
        if !w.starts_with('-') || !operands.is_empty() {
            operands.push(w.clone());
            i += 1;
            continue;
        }
        assert_eq!(w.len(), 2, "the corpus writes one flag a word: {w}");
        let flag = w.as_bytes()[1];
        let takes_arg = b"cfGkKlmnopsUr".contains(&flag);
        let arg = if takes_arg {
            i += 1;
            argv.get(i).cloned().expect("option argument")
        } else {
            String::new()
        };
        i += 1;
        match flag {
            b'H' => put("x86.vmexit_on_hlt", "true"),
            b'P' => put("x86.vmexit_on_pause", "true"),
            b'u' => put("rtc.use_localtime", "false"),
            b'S' => put("memory.wired", "true"),
            b'w' => put("x86.strictmsr", "false"),
            b'M' => put("monitor", "true"),
            b'A' | b'I' => {}
            b'm' => put("memory.size", &arg),
            b'U' => put("uuid", &arg),
            b'c' => {
                if arg.chars().all(|c| c.is_ascii_digit()) {
                    put("cpus", &arg);
                } else {
                    for kv in arg.split(',') {
                        let (k, v) = kv.split_once('=').expect("key=value topology");
                        put(k, v);
                    }
                }
            }
            b'o' => {
                let (k, v) = arg.split_once('=').expect("-o key=value");
                put(k, v);
            }
            b'p' => {
                let (vcpu, host) = arg.split_once(':').expect("-p vcpu:host");
                pins.entry(format!("vcpu.{vcpu}.cpuset"))
                    .or_default()
                    .push(host.to_string());
            }
            b'n' => {
                let fields: BTreeMap<&str, &str> =
                    arg.split(',').filter_map(|kv| kv.split_once('=')).collect();
                let id = fields["id"];
                for (k, v) in fields.iter().filter(|(k, _)| **k != "id") {
                    put(&format!("domains.{id}.{k}"), v);
                }
            }
            b's' => {
                let mut parts = arg.splitn(3, ',');
                let location = parts.next().unwrap();
                let model = parts.next().expect("-s slot,model");
                let numbers: Vec<&str> = location.split(':').collect();
                let (b, s, f) = match numbers.as_slice() {
                    [s] => ("0", *s, "0"),
                    [s, f] => ("0", *s, *f),
                    [b, s, f] => (*b, *s, *f),
                    _ => panic!("slot {location}"),
                };
                let node = format!("pci.{b}.{s}.{f}");
                put(&format!("{node}.device"), alias(model));
                pci_nodes.insert(node);
            }
            b'l' => {
                let (dev, rest) = arg.split_once(',').expect("-l dev,conf");
                if dev.starts_with("com") {
                    put(&format!("lpc.{dev}.path"), rest);
                } else if dev == "bootrom" {
                    let mut fields = rest.split(',');
                    put("lpc.bootrom", fields.next().unwrap());
                    for field in fields {
                        match field.split_once('=') {
                            Some((k, v)) => put(&format!("lpc.{k}"), v),
                            None => put("lpc.bootvars", field),
                        }
                    }
                }
            }
            other => panic!("unexpected flag -{}", other as char),
        }
    }
    for (k, hosts) in pins {
        keys.insert(k, hosts.join(","));
    }
    let name = operands.last().expect("a VM name").clone();
    keys.insert("name".into(), name);
    Expected { keys, pci_nodes }
}

fn pci_nodes_in_tree(inv: &Invocation) -> BTreeSet<String> {
    let t = &inv.tree;
    let mut nodes = BTreeSet::new();
    for bus in t.children("pci") {
        for slot in t.children(&format!("pci.{bus}")) {
            for func in t.children(&format!("pci.{bus}.{slot}")) {
                nodes.insert(format!("pci.{bus}.{slot}.{func}"));
            }
        }
    }
    nodes
}

/// Device keys written out by hand for files covering every device kind.
fn hand_table() -> Vec<(&'static str, Vec<(&'static str, &'static str)>)> {
    vec![
        (
            "bhyvexml2argvdata/x86_64/bhyvexml2argv-sata-rotation-rate.args",
            vec![
                ("pci.0.2.0.port.0.type", "hd"),
                ("pci.0.2.0.port.0.path", "/tmp/freebsd1.img"),
                ("pci.0.2.0.port.0.nmrr", "7200"),
                ("pci.0.2.0.port.0.ser", "BHYVE-SER01-0001"),
                ("pci.0.2.0.port.1.path", "/tmp/freebsd2.img"),
                ("pci.0.2.0.port.1.nmrr", "5400"),
                ("pci.0.2.0.port.2.nmrr", "1"),
                ("pci.0.2.0.port.2.ser", "BHYVE-SER03-1234"),
                ("pci.0.3.0.backend", "faketapdev"),
                ("pci.0.3.0.mac", "52:54:00:b9:94:02"),
            ],
        ),
        (
            "bhyvexml2argvdata/x86_64/bhyvexml2argv-bootorder.args",
            vec![
                ("lpc.bootrom", "fakefirmwaredir/BHYVE_UEFI.fd"),
                ("lpc.bootvars", "fakenvramdir/bhyve_VARS.fd"),
                ("lpc.fwcfg", "qemu"),
                ("bootrom", "fakefirmwaredir/BHYVE_UEFI.fd"),
                ("bootvars", "fakenvramdir/bhyve_VARS.fd"),
                ("pci.0.2.0.port.0.path", "/tmp/freebsd1.img"),
                ("pci.0.2.0.port.0.bootindex", "2"),
                ("pci.0.2.0.port.1.path", "/tmp/freebsd2.img"),
                ("pci.0.2.0.port.1.bootindex", "1"),
                ("pci.0.4.0.path", "/tmp/freebsd2.img"),
                ("pci.0.4.0.bootindex", "3"),
            ],
        ),
        (
            "bhyvexml2argvdata/x86_64/bhyvexml2argv-bhyveload-bootorder3.args",
            vec![
                ("pci.0.2.0.port.0.type", "hd"),
                ("pci.0.2.0.port.0.path", "/tmp/freebsd.img"),
                ("pci.0.2.0.port.1.type", "cd"),
                ("pci.0.2.0.port.1.path", "/tmp/cdrom.iso"),
                ("pci.0.2.0.port.1.bootindex", "1"),
            ],
        ),
        (
            "bhyvexml2argvdata/x86_64/bhyvexml2argv-nvme-explicit-controller.args",
            vec![
                ("pci.0.2.0.path", "/tmp/freebsd.img"),
                ("pci.0.2.0.maxq", "2"),
                ("pci.0.2.0.qsz", "256"),
                ("pci.0.2.0.ser", "BHYVE-NVME0-01234"),
            ],
        ),
        (
            "bhyvexml2argvdata/x86_64/bhyvexml2argv-2-nvme-2-controllers.args",
            vec![
                ("pci.0.2.0.eui64", "0xdeadbeef00000001"),
                ("pci.0.3.0.path", "/tmp/data.img"),
            ],
        ),
        (
            "bhyvexml2argvdata/x86_64/bhyvexml2argv-4-consoles.args",
            vec![
                (
                    "lpc.com1.path",
                    "/dev/nmdmdf3be7e7-a104-11e3-aeb0-50e5492bd3dcA",
                ),
                ("lpc.com2.path", "tcp=127.0.0.1:12345"),
                ("lpc.com3.path", "tcp=0.0.0.0:54321"),
                ("lpc.com4.path", "/dev/nmdm0A"),
                ("pci.0.3.0.mac", "52:54:00:b1:42:eb"),
            ],
        ),
        (
            "bhyvexml2argvdata/x86_64/bhyvexml2argv-slirp.args",
            vec![
                ("pci.0.3.0.device", "e1000"),
                ("pci.0.3.0.backend", "slirp"),
                ("pci.0.3.0.mac", "52:54:00:00:00:00"),
                ("pci.0.3.0.open", "true"),
            ],
        ),
        (
            // The older libvirt form puts mac= first; bhyve's
            // netbe_legacy_config takes the first word as the backend.
            "bhyvexml2argvdata/bhyvexml2argv-slirp.args",
            vec![
                ("pci.0.3.0.backend", "mac=52:54:00:00:00:00"),
                ("pci.0.3.0.slirp", "true"),
                ("pci.0.3.0.open", "true"),
            ],
        ),
        (
            "bhyvexml2argvdata/x86_64/bhyvexml2argv-vnc-password.args",
            vec![
                ("pci.0.4.0.device", "fbuf"),
                ("pci.0.4.0.tcp", "127.0.0.1:5904"),
                ("pci.0.4.0.password", "s3cr3t"),
            ],
        ),
        (
            "bhyvexml2argvdata/x86_64/bhyvexml2argv-vnc-resolution.args",
            vec![("pci.0.2.0.w", "1920"), ("pci.0.2.0.h", "1080")],
        ),
        (
            "bhyvexml2argvdata/x86_64/bhyvexml2argv-vnc-vgaconf-off.args",
            vec![("pci.0.4.0.vga", "off")],
        ),
        (
            "bhyvexml2argvdata/x86_64/bhyvexml2argv-vnc-wait.args",
            vec![("pci.0.4.0.wait", "true")],
        ),
        (
            "bhyveargv2xmldata/bhyveargv2xml-vnc-vga-io.args",
            vec![("pci.0.2.0.tcp", ":5900"), ("pci.0.2.0.vga", "io")],
        ),
        (
            "bhyvexml2argvdata/bhyvexml2argv-input-xhci-tablet.args",
            vec![
                ("pci.0.2.0.device", "xhci"),
                ("pci.0.2.0.slot.1.device", "tablet"),
                ("pci.0.3.0.device", "ahci"),
                ("pci.0.3.0.port.0.type", "hd"),
            ],
        ),
        (
            "bhyvexml2argvdata/x86_64/bhyvexml2argv-fs-9p-readonly.args",
            vec![
                ("pci.0.4.0.sharename", "shared_dir"),
                ("pci.0.4.0.path", "/shared/dir"),
                ("pci.0.4.0.ro", "true"),
            ],
        ),
        (
            "bhyvexml2argvdata/x86_64/bhyvexml2argv-virtio-console-multiple-controllers.args",
            vec![
                ("pci.0.2.0.port.0.name", "org.qemu.guest_agent.1"),
                (
                    "pci.0.2.0.port.0.path",
                    "/var/run/libvirt/bhyve/bhyve.agent-1",
                ),
                ("pci.0.2.0.port.14.name", "org.qemu.guest_agent.15"),
                (
                    "pci.0.3.0.port.2.path",
                    "/var/run/libvirt/bhyve/bhyve.agent-18",
                ),
            ],
        ),
        (
            "bhyvexml2argvdata/x86_64/bhyvexml2argv-passthru-multiple-devs.args",
            vec![
                ("memory.wired", "true"),
                ("pci.0.7.1.bus", "3"),
                ("pci.0.7.1.slot", "0"),
                ("pci.0.7.1.func", "4"),
                ("pci.0.4.0.bus", "5"),
                ("pci.0.4.0.slot", "2"),
            ],
        ),
        (
            "bhyveargv2xmldata/bhyveargv2xml-passthru.args",
            vec![("pci.0.7.0.device", "passthru"), ("pci.0.7.0.bus", "3")],
        ),
        (
            "bhyvexml2argvdata/bhyvexml2argv-cputopology.args",
            vec![
                ("cpus", "2"),
                ("sockets", "1"),
                ("cores", "2"),
                ("threads", "1"),
            ],
        ),
        (
            "bhyvexml2argvdata/x86_64/bhyvexml2argv-vcpupin.args",
            vec![
                ("cpus", "2"),
                ("vcpu.0.cpuset", "1,3,4"),
                ("vcpu.1.cpuset", "0,4"),
            ],
        ),
        (
            "bhyveargv2xmldata/bhyveargv2xml-uuid.args",
            vec![("uuid", "2a793ea6-8e52-440a-8458-355e98492e17")],
        ),
        (
            "bhyveargv2xmldata/bhyveargv2xml-uuid2.args",
            vec![("uuid", "garbage")],
        ),
        (
            "bhyvexml2argvdata/x86_64/bhyvexml2argv-sysinfo-smbios.args",
            vec![
                ("bios.vendor", "LENOVO"),
                ("bios.release_date", "11/24/2025"),
                ("system.serial_number", "xxx-yyy-zzz"),
                ("board.version", "0B98401 Pro"),
                ("board.asset_tag", "Asset Tag"),
                ("chassis.manufacturer", "Dell Inc."),
                ("chassis.sku", "Type3Sku1"),
            ],
        ),
        (
            "bhyvexml2argvdata/x86_64/bhyvexml2argv-numa.args",
            vec![
                ("cpus", "8"),
                ("domains.0.size", "107"),
                ("domains.0.cpus", "0-3"),
                ("domains.1.cpus", "4-7"),
            ],
        ),
        (
            "bhyvexml2argvdata/x86_64/bhyvexml2argv-uefi-unprivileged.args",
            vec![("monitor", "true"), ("rundir", "/path/to/bhyve/run")],
        ),
        (
            "bhyvexml2argvdata/bhyvexml2argv-sound.args",
            vec![
                ("pci.0.4.0.device", "hda"),
                ("pci.0.4.0.play", "/dev/dsp0"),
                ("pci.0.4.0.rec", "/dev/dsp0"),
            ],
        ),
        (
            "bhyvexml2argvdata/bhyvexml2argv-virtio-scsi.args",
            vec![
                ("pci.0.2.0.device", "virtio-scsi"),
                ("pci.0.2.0.dev", "/dev/cam/ctl"),
            ],
        ),
        (
            "bhyvexml2argvdata/bhyvexml2argv-virtio-rnd.args",
            vec![("pci.0.4.0.device", "virtio-rnd")],
        ),
        (
            "bhyvexml2argvdata/bhyvexml2argv-addr-no32devs-multiple-sata-disks.args",
            vec![
                ("pci.0.4.0.device", "ahci"),
                ("pci.0.4.0.port.0.type", "hd"),
                ("pci.0.4.0.port.0.path", "/tmp/freebsd2.img"),
            ],
        ),
        (
            "bhyveargv2xmldata/bhyveargv2xml-e1000.args",
            vec![
                ("pci.0.1.0.backend", "tap0"),
                ("pci.0.1.1.device", "e1000"),
                ("pci.0.1.1.backend", "tap1"),
                ("pci.0.1.1.mac", "FE:ED:AD:EA:DF:15"),
            ],
        ),
        (
            "bhyveargv2xmldata/bhyveargv2xml-virtio-net3.args",
            vec![("pci.0.1.1.backend", "tap1"), ("pci.0.1.1.notamac", "true")],
        ),
        (
            "bhyveargv2xmldata/bhyveargv2xml-virtio-net4.args",
            vec![("pci.0.1.1.mac", "garbage")],
        ),
        (
            "bhyvexml2argvdata/aarch64/bhyvexml2argv-console.args",
            vec![("console", "/dev/nmdm0A")],
        ),
        (
            "bhyvexml2argvdata/aarch64/bhyvexml2argv-bootloader.args",
            vec![(
                "bootrom",
                "/usr/local/share/u-boot/u-boot-bhyve-arm64/u-boot.bin",
            )],
        ),
        (
            "bhyvexml2argvdata/bhyvexml2argv-msrs.args",
            vec![("x86.strictmsr", "false")],
        ),
        (
            "bhyveargv2xmldata/bhyveargv2xml-utc.args",
            vec![("rtc.use_localtime", "false")],
        ),
        (
            "bhyveargv2xmldata/bhyveargv2xml-wired.args",
            vec![("memory.wired", "true")],
        ),
        (
            // No -w: bhyve's default stays.
            "bhyveargv2xmldata/bhyveargv2xml-base.args",
            vec![
                ("x86.strictmsr", "true"),
                ("lpc.fwcfg", "bhyve"),
                ("name", "bhyve"),
            ],
        ),
        (
            "bhyvexml2argvdata/bhyvexml2argv-addr-isa-controller-on-slot-31.args",
            vec![("pci.0.31.0.device", "lpc")],
        ),
    ]
}

/// Memory sizes in bytes for files exercising `-m`.
const MEMORY: &[(&str, u64)] = &[
    ("bhyveargv2xmldata/bhyveargv2xml-base.args", 214 << 20),
    (
        "bhyveargv2xmldata/bhyveargv2xml-memsize-human.args",
        214 << 20,
    ),
    (
        "bhyveargv2xmldata/bhyveargv2xml-memsize-large.args",
        224_395_264,
    ),
];

/// Files where the tree must not carry a key.
const ABSENT: &[(&str, &str)] = &[
    (
        "bhyvexml2argvdata/x86_64/bhyvexml2argv-localtime.args",
        "rtc.use_localtime",
    ),
    ("bhyveargv2xmldata/bhyveargv2xml-base.args", "x86.x2apic"),
    ("bhyveargv2xmldata/bhyveargv2xml-base.args", "memory.wired"),
];

#[test]
fn libvirt_corpus() {
    let dir = corpus_dir();
    let manifest = dir.join("MANIFEST.tsv");
    // CI and every development checkout have shared/ beside the workspace;
    // a missing corpus is a failure, never a silent skip.
    let text = std::fs::read_to_string(&manifest).unwrap_or_else(|e| {
        panic!(
            "libvirt's test corpus is absent: {} ({e}; expected ../shared beside the workspace)",
            manifest.display()
        )
    });

    let mut trees: BTreeMap<String, Invocation> = BTreeMap::new();
    let (mut accepted, mut refused, mut loader_files) = (0, 0, 0);
    for line in text.lines().skip(1) {
        let corpus_path = line.split('\t').next().unwrap();
        let path = dir.join(corpus_path);
        let content =
            std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));

        if corpus_path.ends_with(".devmap") {
            // grub-bhyve device maps: "(hd0) /path" lines, for the loaders.
            for l in content.lines().filter(|l| !l.trim().is_empty()) {
                assert!(l.starts_with('(') && l.contains(") "), "{corpus_path}: {l}");
            }
            loader_files += 1;
            continue;
        }
        let commands = shell_commands(&content);
        assert!(!commands.is_empty(), "{corpus_path}: no command");
        if corpus_path.ends_with(".ldargs") {
            // Loader command lines belong to bhyveload/grub-bhyve (later).
            loader_files += 1;
            continue;
        }
        assert!(corpus_path.ends_with(".args"), "{corpus_path}");
        let bhyve: Vec<&Vec<String>> = commands.iter().filter(|c| program(c) == "bhyve").collect();
        assert_eq!(bhyve.len(), 1, "{corpus_path}: one bhyve command");
        let argv = &bhyve[0][1..];

        let result: Result<Invocation, CliError> = parse_bhyve_args(argv);
        match (bhyve_refuses(corpus_path), result) {
            (Some((status, message)), Err(e)) => {
                assert_eq!(
                    (e.status, e.message.as_str()),
                    (status, message),
                    "{corpus_path}"
                );
                refused += 1;
            }
            (Some(_), Ok(_)) => panic!("{corpus_path}: bhyve refuses this command line"),
            (None, Err(e)) => panic!("{corpus_path}: refused: {e:?}"),
            (None, Ok(inv)) => {
                let expected = derive(argv);
                for (k, v) in &expected.keys {
                    assert_eq!(
                        inv.tree.get_raw(k),
                        Some(v.as_str()),
                        "{corpus_path}: key {k}"
                    );
                }
                assert_eq!(
                    pci_nodes_in_tree(&inv),
                    expected.pci_nodes,
                    "{corpus_path}: PCI functions"
                );
                accepted += 1;
                trees.insert(corpus_path.to_string(), inv);
            }
        }
    }

    for (file, keys) in hand_table() {
        let inv = trees
            .get(file)
            .unwrap_or_else(|| panic!("{file}: not among the accepted corpus files"));
        for (k, v) in keys {
            assert_eq!(inv.tree.get_raw(k), Some(v), "{file}: key {k}");
        }
    }
    for (file, bytes) in MEMORY {
        assert_eq!(
            rhyve_config::memory_size(&trees[*file].tree).unwrap(),
            *bytes,
            "{file}"
        );
    }
    for (file, absent) in ABSENT {
        assert_eq!(trees[*file].tree.get_raw(absent), None, "{file}: {absent}");
    }
    let topology =
        rhyve_config::topology(&trees["bhyvexml2argvdata/bhyvexml2argv-cputopology.args"].tree)
            .unwrap();
    assert_eq!(
        (
            topology.cpus,
            topology.sockets,
            topology.cores,
            topology.threads
        ),
        (2, 1, 2, 1)
    );

    assert!(accepted > 100, "only {accepted} command lines accepted");
    assert_eq!(refused, 3);
    eprintln!("libvirt corpus: {accepted} bhyve command lines accepted, {refused} refused as bhyve does, {loader_files} loader files parsed");
}
