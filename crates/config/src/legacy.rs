//! `-s slot,emulation[,conf]` and `-l lpcdev[,conf]`: legacy option strings
//! turned into config keys exactly as bhyve's `pci_parse_slot`,
//! `lpc_device_parse` and each device's `pe_legacy_config` do it.
//!
//! The parser knows every amd64 device model bhyve has, whether or not the
//! rhyve runtime can run it yet, so the tree is always complete and the
//! runtime can refuse an unsupported device by name instead of it being
//! dropped here.

use crate::cli::CliError;
use crate::cnum::scan_list;
use crate::tree::{ConfigError, ConfigTree};

/// The PCI device models `-s` accepts (what `bhyve -s help` lists).
pub const PCI_MODELS: &[&str] = &[
    "ahci",
    "ahci-cd",
    "ahci-hd",
    "amd_hostbridge",
    "e1000",
    "fbuf",
    "hda",
    "hostbridge",
    "lpc",
    "nvme",
    "passthru",
    "uart",
    "virtio-9p",
    "virtio-blk",
    "virtio-console",
    "virtio-input",
    "virtio-net",
    "virtio-rnd",
    "virtio-scsi",
    "xhci",
];

/// The LPC devices `-l` accepts, in the order `bhyve -l help` prints them.
pub const LPC_DEVICES: &[&str] = &[
    "bootrom",
    "com1",
    "com2",
    "com3",
    "com4",
    "tpm",
    "pc-testdev",
];

/// Models that are other names for another model: `-s` stores the model
/// they stand for as `device`, and a tree naming them directly is refused
/// at VM start (`legacy device "ahci-hd", use "ahci" instead`).
pub const PCI_MODEL_ALIASES: &[(&str, &str)] = &[
    ("ahci-cd", "ahci"),
    ("ahci-hd", "ahci"),
    ("amd_hostbridge", "hostbridge"),
];

/// The model a `device` value stands for, if `name` is an alias.
pub fn pci_model_alias(name: &str) -> Option<&'static str> {
    PCI_MODEL_ALIASES
        .iter()
        .find(|(alias, _)| *alias == name)
        .map(|(_, model)| *model)
}

/// Number of PCI buses, slots per bus and functions per slot.
pub const PCI_BUSES: i64 = 256;
pub const PCI_SLOTS: i64 = 32;
pub const PCI_FUNCS: i64 = 8;

const AHCI_MAX_PORTS: usize = 32;
const VTCON_MAX_PORTS: usize = 16;
const LPC_UARTS: [&str; 4] = ["com1", "com2", "com3", "com4"];

/// A tree error while setting `path` to `value`, with bhyve's wording and
/// status.
pub(crate) fn tree_error(err: ConfigError, path: &str, value: &str) -> CliError {
    let message = match &err {
        ConfigError::NotAValue(_) => {
            format!("bhyve: Attempting to add value {value} to existing node {path}")
        }
        ConfigError::NotANode(variable) => {
            let node = path.rsplit_once('.').map_or(path, |(node, _)| node);
            format!("bhyve: Configuration node {node} is a child of existing variable {variable}")
        }
        ConfigError::BadPath(_) => format!("bhyve: Invalid configuration node: {path}"),
        other => format!("bhyve: {other}"),
    };
    CliError::new(message, crate::cli::EXIT_ERROR)
}

/// `set_config_value`: a full path.
pub(crate) fn set(tree: &mut ConfigTree, path: &str, value: &str) -> Result<(), CliError> {
    tree.set(path, value)
        .map_err(|e| tree_error(e, path, value))
}

/// `set_config_value_node`: one name under a node. bhyve refuses names
/// containing a dot here; an empty name (from `a,,b`) names nothing.
fn set_node(tree: &mut ConfigTree, node: &str, name: &str, value: &str) -> Result<(), CliError> {
    if name.is_empty() {
        tracing::debug!(node, "empty option name ignored");
        return Ok(());
    }
    if name.contains('.') {
        return Err(CliError::new(
            format!("bhyve: Invalid config node name {name}"),
            crate::cli::EXIT_ERROR,
        ));
    }
    set(tree, &format!("{node}.{name}"), value)
}

/// `pci_parse_legacy_config`: comma-separated `name=value`, a bare name is
/// a boolean set to true.
pub(crate) fn generic(
    tree: &mut ConfigTree,
    node: &str,
    opts: Option<&str>,
) -> Result<(), CliError> {
    let Some(opts) = opts else { return Ok(()) };
    for item in opts.split(',') {
        match item.split_once('=') {
            Some((name, value)) => set_node(tree, node, name, value)?,
            None => set_node(tree, node, item, "true")?,
        }
    }
    Ok(())
}

/// Split off the first comma-separated word.
fn first_word(opts: &str) -> (&str, Option<&str>) {
    match opts.split_once(',') {
        Some((first, rest)) => (first, Some(rest)),
        None => (opts, None),
    }
}

/// `blockif_legacy_config`: the path first, then generic options.
fn blockif(tree: &mut ConfigTree, node: &str, opts: Option<&str>) -> Result<(), CliError> {
    let Some(opts) = opts else { return Ok(()) };
    let (path, rest) = first_word(opts);
    set_node(tree, node, "path", path)?;
    generic(tree, node, rest)
}

/// `netbe_legacy_config`: the backend first, then generic options.
fn netbe(tree: &mut ConfigTree, node: &str, opts: Option<&str>) -> Result<(), CliError> {
    let Some(opts) = opts else { return Ok(()) };
    let (backend, rest) = first_word(opts);
    set_node(tree, node, "backend", backend)?;
    generic(tree, node, rest)
}

fn ahci_port(
    tree: &mut ConfigTree,
    node: &str,
    port: usize,
    kind: &str,
    opts: Option<&str>,
) -> Result<(), CliError> {
    let port_node = format!("{node}.port.{port}");
    set_node(tree, &port_node, "type", kind)?;
    blockif(tree, &port_node, opts)
}

/// `pci_ahci_legacy_config`: `hd:path[,opts],cd:path[,opts],...`, one port
/// per `hd:`/`cd:` prefix, ports numbered from 0.
fn ahci(tree: &mut ConfigTree, node: &str, slot: &str, opts: Option<&str>) -> Result<(), CliError> {
    let Some(opts) = opts else { return Ok(()) };
    let mut remaining = Some(opts);
    let mut port = 0;
    while port < AHCI_MAX_PORTS {
        let Some(mut current) = remaining else { break };
        let kind = if let Some(r) = current.strip_prefix("hd:") {
            current = r;
            Some("hd")
        } else if let Some(r) = current.strip_prefix("cd:") {
            current = r;
            Some("cd")
        } else {
            None
        };
        let next = [current.find(",hd:"), current.find(",cd:")]
            .into_iter()
            .flatten()
            .min();
        if let Some(at) = next {
            remaining = Some(&current[at + 1..]);
            current = &current[..at];
        } else {
            remaining = None;
        }
        if !current.is_empty() {
            let Some(kind) = kind else {
                return Err(CliError::new(
                    format!("Missing or invalid type for port {port}: \"{current}\""),
                    crate::cli::EXIT_ERROR,
                ));
            };
            ahci_port(tree, node, port, kind, Some(current))?;
        }
        port += 1;
    }
    if remaining.is_some() {
        tracing::warn!(
            slot,
            "ahci: ports beyond {AHCI_MAX_PORTS} ignored, as bhyve does"
        );
    }
    Ok(())
}

/// `pci_nvme_legacy_config`: `ram=MiB[,opts]` or a block device.
fn nvme(tree: &mut ConfigTree, node: &str, opts: Option<&str>) -> Result<(), CliError> {
    let Some(opts) = opts else { return Ok(()) };
    match opts.strip_prefix("ram=") {
        Some(rest) => {
            let (ram, rest) = first_word(rest);
            set_node(tree, node, "ram", ram)?;
            generic(tree, node, rest)
        }
        None => blockif(tree, node, Some(opts)),
    }
}

/// `pci_vt9p_legacy_config`: `sharename=/path[,ro]`.
fn virtio_9p(tree: &mut ConfigTree, node: &str, opts: Option<&str>) -> Result<(), CliError> {
    let Some(opts) = opts else { return Ok(()) };
    let mut have_share = false;
    for item in opts.split(',') {
        match item.split_once('=') {
            Some((share, path)) => {
                if have_share {
                    return Err(CliError::new(
                        "virtio-9p: more than one share name given",
                        crate::cli::EXIT_ERROR,
                    ));
                }
                have_share = true;
                set_node(tree, node, "sharename", share)?;
                set_node(tree, node, "path", path)?;
            }
            None => set_node(tree, node, item, "true")?,
        }
    }
    Ok(())
}

/// `pci_vtcon_legacy_config`: `name=/socket,...`, ports numbered from 0.
fn virtio_console(tree: &mut ConfigTree, node: &str, opts: Option<&str>) -> Result<(), CliError> {
    let Some(opts) = opts else { return Ok(()) };
    for (port, item) in opts.split(',').enumerate() {
        let Some((name, path)) = item.split_once('=') else {
            return Err(CliError::new(
                format!("vtcon: port {item} requires a path"),
                crate::cli::EXIT_ERROR,
            ));
        };
        if port >= VTCON_MAX_PORTS {
            return Err(CliError::new(
                "vtcon: too many ports",
                crate::cli::EXIT_ERROR,
            ));
        }
        let port_node = format!("{node}.port.{port}");
        set_node(tree, &port_node, "name", name)?;
        set_node(tree, &port_node, "path", path)?;
    }
    Ok(())
}

/// `pci_xhci_legacy_config`: `device[=opt],...`, USB slots numbered from 1.
fn xhci(tree: &mut ConfigTree, node: &str, opts: Option<&str>) -> Result<(), CliError> {
    let Some(opts) = opts else { return Ok(()) };
    for (index, item) in opts.split(',').enumerate() {
        let slot_node = format!("{node}.slot.{}", index + 1);
        let (device, config) = match item.split_once('=') {
            Some((device, config)) => (device, Some(config)),
            None => (item, None),
        };
        set_node(tree, &slot_node, "device", device)?;
        if let Some(config) = config.filter(|c| !c.is_empty()) {
            generic(tree, &slot_node, Some(config))?;
        }
    }
    Ok(())
}

/// `passthru_legacy_config`: `pptN`, `pci0:B:S:F`, `pciB:S:F` or `B/S/F`,
/// then generic options (`rom=`, `bootindex=`).
fn passthru(tree: &mut ConfigTree, node: &str, opts: Option<&str>) -> Result<(), CliError> {
    let Some(opts) = opts else { return Ok(()) };
    let (first, rest) = first_word(opts);
    if opts.starts_with("ppt") {
        set_node(tree, node, "pptdev", first)?;
    } else {
        let address = opts
            .strip_prefix("pci0:")
            .map(|s| scan_list(s, ':', 3))
            .filter(|v| v.len() == 3)
            .or_else(|| {
                opts.strip_prefix("pci")
                    .map(|s| scan_list(s, ':', 3))
                    .filter(|v| v.len() == 3)
            })
            .or_else(|| Some(scan_list(opts, '/', 3)).filter(|v| v.len() == 3));
        let Some(address) = address else {
            return Err(CliError::new(
                format!("passthru: invalid options \"{opts}\""),
                crate::cli::EXIT_ERROR,
            ));
        };
        for (name, value) in ["bus", "slot", "func"].iter().zip(address) {
            set_node(tree, node, name, &value.to_string())?;
        }
    }
    generic(tree, node, rest)
}

/// `pci_parse_slot`: `-s [bus:]slot[:func],emulation[,conf]`.
pub(crate) fn parse_pci_slot(tree: &mut ConfigTree, opt: &str) -> Result<(), CliError> {
    let invalid = || {
        CliError::new(
            format!("Invalid PCI slot info field \"{opt}\""),
            crate::cli::EXIT_ERROR,
        )
    };
    let Some((location, rest)) = opt.split_once(',') else {
        return Err(invalid());
    };
    let (emulation, config) = first_word(rest);

    // sscanf "%d:%d:%d", then "%d:%d", then "%d", as bhyve does.
    let numbers = scan_list(location, ':', 3);
    let (bus, slot, func) = match numbers.as_slice() {
        [b, s, f] => (*b, *s, *f),
        [s, f] => (0, *s, *f),
        [s] => (0, *s, 0),
        _ => (0, -1, 0),
    };
    if !(0..PCI_BUSES).contains(&bus)
        || !(0..PCI_SLOTS).contains(&slot)
        || !(0..PCI_FUNCS).contains(&func)
    {
        return Err(invalid());
    }
    let place = format!("pci slot {bus}:{slot}:{func}");
    if !PCI_MODELS.contains(&emulation) {
        return Err(CliError::new(
            format!("{place}: unknown device \"{emulation}\""),
            crate::cli::EXIT_ERROR,
        ));
    }
    let node = format!("pci.{bus}.{slot}.{func}");
    if tree.is_node(&node) {
        return Err(CliError::new(
            format!("{place} already occupied!"),
            crate::cli::EXIT_ERROR,
        ));
    }
    if tree.get_raw(&node).is_some() {
        return Err(CliError::new(
            format!("bhyve: Failed to create configuration node {node}"),
            crate::cli::EXIT_ERROR,
        ));
    }
    let stored = pci_model_alias(emulation).unwrap_or(emulation);
    set_node(tree, &node, "device", stored)?;

    match emulation {
        "ahci" => ahci(tree, &node, &place, config),
        "ahci-hd" => ahci_port(tree, &node, 0, "hd", config),
        "ahci-cd" => ahci_port(tree, &node, 0, "cd", config),
        "amd_hostbridge" => {
            set_node(tree, &format!("{node}.pcireg"), "vendor", "0x1022")?;
            set_node(tree, &format!("{node}.pcireg"), "device", "0x7432")
        }
        "virtio-blk" => blockif(tree, &node, config),
        "nvme" => nvme(tree, &node, config),
        "virtio-net" | "e1000" => netbe(tree, &node, config),
        "virtio-9p" => virtio_9p(tree, &node, config),
        "virtio-console" => virtio_console(tree, &node, config),
        "virtio-scsi" => {
            let Some(config) = config else { return Ok(()) };
            let (dev, rest) = first_word(config);
            set_node(tree, &node, "dev", dev)?;
            generic(tree, &node, rest)
        }
        "virtio-input" => match config {
            Some(config) => blockif_like_path(tree, &node, config),
            None => Err(CliError::new(
                format!("{place}: virtio-input needs an input event device path"),
                crate::cli::EXIT_ERROR,
            )),
        },
        "uart" => match config {
            Some(path) => set_node(tree, &node, "path", path),
            None => Ok(()),
        },
        "xhci" => xhci(tree, &node, config),
        "passthru" => passthru(tree, &node, config),
        _ => generic(tree, &node, config),
    }
}

/// `pci_vtinput_legacy_config`: the event device path, then generic options.
fn blockif_like_path(tree: &mut ConfigTree, node: &str, config: &str) -> Result<(), CliError> {
    let (path, rest) = first_word(config);
    set_node(tree, node, "path", path)?;
    generic(tree, node, rest)
}

/// `lpc_device_parse`: `-l com1,stdio`, `-l bootrom,ROM[,VARS][,opts]`,
/// `-l tpm,TYPE,PATH[,opts]`, `-l pc-testdev`.
pub(crate) fn parse_lpc_device(tree: &mut ConfigTree, opts: &str) -> Result<(), CliError> {
    let invalid = || {
        CliError::new(
            format!("bhyve: invalid lpc device configuration '{opts}'"),
            crate::cli::EX_USAGE,
        )
    };
    let (device, rest) = first_word(opts);
    let device = device.to_ascii_lowercase();
    match device.as_str() {
        "bootrom" => {
            let Some(rest) = rest else {
                return Err(CliError::new(
                    format!("bhyve: invalid bootrom option \"{opts}\""),
                    crate::cli::EXIT_ERROR,
                ));
            };
            let (rom, rest) = first_word(rest);
            set(tree, "lpc.bootrom", rom)?;
            let Some(rest) = rest else { return Ok(()) };
            let (vars, rest) = first_word(rest);
            if vars.contains('=') {
                generic(tree, "lpc", Some(vars))?;
            } else {
                set(tree, "lpc.bootvars", vars)?;
            }
            generic(tree, "lpc", rest)
        }
        "tpm" => {
            let Some((kind, rest)) = rest.map(first_word) else {
                return Err(CliError::new(
                    format!("bhyve: invalid tpm type \"{opts}\""),
                    crate::cli::EXIT_ERROR,
                ));
            };
            set(tree, "tpm.type", kind)?;
            let Some((path, rest)) = rest.map(first_word) else {
                return Err(CliError::new(
                    format!("bhyve: invalid tpm path \"{opts}\""),
                    crate::cli::EXIT_ERROR,
                ));
            };
            set(tree, "tpm.path", path)?;
            generic(tree, "tpm", rest)?;
            if tree.get_raw("tpm.version").is_none() {
                set(tree, "tpm.version", "2.0")?;
            }
            Ok(())
        }
        "pc-testdev" => set(tree, "lpc.pc-testdev", "true"),
        uart if LPC_UARTS.contains(&uart) => {
            // bhyve stores whatever follows the first comma, commas included.
            let Some(path) = rest else {
                return Err(invalid());
            };
            set(tree, &format!("lpc.{uart}.path"), path)
        }
        _ => Err(invalid()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slot(args: &[&str]) -> Result<ConfigTree, CliError> {
        let mut t = ConfigTree::new();
        for a in args {
            parse_pci_slot(&mut t, a)?;
        }
        Ok(t)
    }

    fn get(t: &ConfigTree, k: &str) -> Option<String> {
        t.get_raw(k).map(str::to_string)
    }

    #[test]
    fn slot_syntax() {
        let t = slot(&[
            "0,hostbridge",
            "3:1,virtio-rnd",
            "2:4:5,virtio-rnd",
            "1:x,lpc",
        ])
        .unwrap();
        assert_eq!(get(&t, "pci.0.0.0.device").as_deref(), Some("hostbridge"));
        assert_eq!(get(&t, "pci.0.3.1.device").as_deref(), Some("virtio-rnd"));
        assert_eq!(get(&t, "pci.2.4.5.device").as_deref(), Some("virtio-rnd"));
        assert_eq!(get(&t, "pci.0.1.0.device").as_deref(), Some("lpc"));
        for bad in [
            "5",
            "32,hostbridge",
            "0:8,hostbridge",
            "256:0:0,hostbridge",
            "x,lpc",
        ] {
            let e = slot(&[bad]).unwrap_err();
            assert_eq!(e.status, 4);
            assert_eq!(e.message, format!("Invalid PCI slot info field \"{bad}\""));
        }
    }

    #[test]
    fn ahci_ports_and_options() {
        let t = slot(&["2,ahci,hd:/a.img,nmrr=7200,ser=S1,cd:/b.iso,bootindex=1,hd:/c.img,ro"])
            .unwrap();
        assert_eq!(get(&t, "pci.0.2.0.device").as_deref(), Some("ahci"));
        assert_eq!(get(&t, "pci.0.2.0.port.0.type").as_deref(), Some("hd"));
        assert_eq!(get(&t, "pci.0.2.0.port.0.path").as_deref(), Some("/a.img"));
        assert_eq!(get(&t, "pci.0.2.0.port.0.nmrr").as_deref(), Some("7200"));
        assert_eq!(get(&t, "pci.0.2.0.port.0.ser").as_deref(), Some("S1"));
        assert_eq!(get(&t, "pci.0.2.0.port.1.type").as_deref(), Some("cd"));
        assert_eq!(get(&t, "pci.0.2.0.port.1.bootindex").as_deref(), Some("1"));
        assert_eq!(get(&t, "pci.0.2.0.port.2.ro").as_deref(), Some("true"));
        let e = slot(&["2,ahci,/a.img"]).unwrap_err();
        assert_eq!(e.message, "Missing or invalid type for port 0: \"/a.img\"");
        let t = slot(&["3,ahci-cd,/x.iso,ro"]).unwrap();
        assert_eq!(get(&t, "pci.0.3.0.device").as_deref(), Some("ahci"));
        assert_eq!(get(&t, "pci.0.3.0.port.0.type").as_deref(), Some("cd"));
        assert_eq!(get(&t, "pci.0.3.0.port.0.ro").as_deref(), Some("true"));
    }

    #[test]
    fn lpc_devices() {
        let mut t = ConfigTree::new();
        parse_lpc_device(&mut t, "com1,stdio").unwrap();
        parse_lpc_device(&mut t, "COM2,tcp=127.0.0.1:1234").unwrap();
        parse_lpc_device(&mut t, "bootrom,/rom.fd,/vars.fd,fwcfg=qemu").unwrap();
        parse_lpc_device(&mut t, "tpm,swtpm,/sock").unwrap();
        parse_lpc_device(&mut t, "pc-testdev").unwrap();
        assert_eq!(get(&t, "lpc.com1.path").as_deref(), Some("stdio"));
        assert_eq!(
            get(&t, "lpc.com2.path").as_deref(),
            Some("tcp=127.0.0.1:1234")
        );
        assert_eq!(get(&t, "lpc.bootrom").as_deref(), Some("/rom.fd"));
        assert_eq!(get(&t, "lpc.bootvars").as_deref(), Some("/vars.fd"));
        assert_eq!(get(&t, "lpc.fwcfg").as_deref(), Some("qemu"));
        assert_eq!(get(&t, "tpm.type").as_deref(), Some("swtpm"));
        assert_eq!(get(&t, "tpm.version").as_deref(), Some("2.0"));
        assert_eq!(get(&t, "lpc.pc-testdev").as_deref(), Some("true"));
        let e = parse_lpc_device(&mut t, "com9,stdio").unwrap_err();
        assert_eq!(
            (e.status, e.message.as_str()),
            (64, "bhyve: invalid lpc device configuration 'com9,stdio'")
        );
        assert_eq!(parse_lpc_device(&mut t, "bootrom").unwrap_err().status, 4);
    }
}
