//! grub-bhyve's command line, parsed as grub2-bhyve's argp table does.
//!
//! grub2-bhyve's options (its `main.c`): `-r/--root DEVICE_NAME`,
//! `-m/--device-map FILE`, `-d/--directory DIR`, `-v/--verbose`,
//! `-H/--hold[=SECS]`, `-c/--cons-dev DEV`, `-e/--evga` (no VGA rows in the
//! boot info), `-g/--grub-cfg CFG`, `-n/--ncons` (do not insert
//! `console=ttyS0`), `-M/--memory MBYTES` (libvmmapi's memsize syntax), `-S`
//! (wire guest memory), `-?/--help`, `--usage`, `-V/--version`, then the VM
//! name. argp conventions are kept: bundled short options, attached or
//! separate arguments, `--name=value`, unambiguous prefixes of long
//! options, options after the VM name, `--` ending the options, and the
//! last VM name winning.

use rhyve_config::parse_memsize;

/// grub2-bhyve's `DEFAULT_DIRECTORY`.
pub const DEFAULT_DIRECTORY: &str = "/boot/grub";
/// grub2-bhyve's `DEFAULT_DEVICE_MAP`.
pub const DEFAULT_DEVICE_MAP: &str = "/boot/grub/device.map";
/// grub2-bhyve's `DEFAULT_GRUB_CFG`.
pub const DEFAULT_GRUB_CFG: &str = "grub.cfg";
/// grub2-bhyve's `DEFAULT_GUESTMEM`, in MiB.
pub const DEFAULT_MEMORY_MIB: u64 = 256;

/// Everything the command line asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GrubOptions {
    /// `-m`: the device map file (host path).
    pub device_map: String,
    /// `-r`: the root device, e.g. `cd0`, `hd0,msdos1`, `host`.
    pub root: String,
    /// `-d`: the GRUB directory on the root device.
    pub directory: String,
    /// `-g`: the config file name inside `directory`.
    pub grub_config: String,
    /// `-c`: the console tty; `None` is stdio.
    pub cons_dev: Option<String>,
    /// `-M`: guest memory in bytes.
    pub memory: u64,
    /// `-v`, counted.
    pub verbose: u32,
    /// `-H[SECS]`: wait for a debugger (`-1` = until released).
    pub hold: Option<i64>,
    /// `-e`: leave VGA rows/columns out of the boot info.
    pub exclude_vga: bool,
    /// `-n`: do not insert `console=ttyS0` into Linux command lines.
    pub no_console_insert: bool,
    /// `-S`: wire (mlock) guest memory.
    pub wire_memory: bool,
    /// `--help` / `-?` was given: print [`usage`] and exit 0.
    pub show_help: bool,
    /// `--usage` was given: print [`short_usage`] and exit 0.
    pub show_usage: bool,
    /// `-V` / `--version` was given.
    pub show_version: bool,
    /// The VM name (empty only with `show_help`/`show_usage`/`show_version`).
    pub vm_name: String,
}

impl Default for GrubOptions {
    fn default() -> Self {
        GrubOptions {
            device_map: DEFAULT_DEVICE_MAP.to_string(),
            root: "host".to_string(),
            directory: DEFAULT_DIRECTORY.to_string(),
            grub_config: DEFAULT_GRUB_CFG.to_string(),
            cons_dev: None,
            memory: DEFAULT_MEMORY_MIB << 20,
            verbose: 0,
            hold: None,
            exclude_vga: false,
            no_console_insert: false,
            wire_memory: false,
            show_help: false,
            show_usage: false,
            show_version: false,
            vm_name: String::new(),
        }
    }
}

impl GrubOptions {
    /// The config file path on the root device: `directory/grub_config`.
    pub fn config_path(&self) -> String {
        format!("{}/{}", self.directory, self.grub_config)
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Arg {
    None,
    Required,
    Optional,
}

struct Spec {
    long: &'static str,
    short: char,
    arg: Arg,
    meta: &'static str,
    help: &'static str,
}

const SPECS: &[Spec] = &[
    Spec {
        long: "device-map",
        short: 'm',
        arg: Arg::Required,
        meta: "FILE",
        help: "use FILE as the device map [default=/boot/grub/device.map]",
    },
    Spec {
        long: "directory",
        short: 'd',
        arg: Arg::Required,
        meta: "DIR",
        help: "use GRUB files in the directory DIR [default=/boot/grub]",
    },
    Spec {
        long: "verbose",
        short: 'v',
        arg: Arg::None,
        meta: "",
        help: "print verbose messages.",
    },
    Spec {
        long: "hold",
        short: 'H',
        arg: Arg::Optional,
        meta: "SECS",
        help: "wait until a debugger will attach",
    },
    Spec {
        long: "cons-dev",
        short: 'c',
        arg: Arg::Required,
        meta: "cons-dev",
        help: "a tty(4) device to use for terminal I/O",
    },
    Spec {
        long: "evga",
        short: 'e',
        arg: Arg::None,
        meta: "",
        help: "exclude VGA rows/cols from bootinfo",
    },
    Spec {
        long: "grub-cfg",
        short: 'g',
        arg: Arg::Required,
        meta: "CFG",
        help: "alternative name of grub.cfg [default=grub.cfg]",
    },
    Spec {
        long: "ncons",
        short: 'n',
        arg: Arg::None,
        meta: "",
        help: "disable insertion of console=ttys0",
    },
    Spec {
        long: "memory",
        short: 'M',
        arg: Arg::Required,
        meta: "MBYTES",
        help: "guest RAM in MB [default=256]",
    },
    Spec {
        long: "root",
        short: 'r',
        arg: Arg::Required,
        meta: "DEVICE_NAME",
        help: "Set root device.",
    },
    Spec {
        long: "",
        short: 'S',
        arg: Arg::None,
        meta: "",
        help: "Force wiring of guest memory.",
    },
    Spec {
        long: "help",
        short: '?',
        arg: Arg::None,
        meta: "",
        help: "give this help list",
    },
    Spec {
        long: "usage",
        short: '\0',
        arg: Arg::None,
        meta: "",
        help: "give a short usage message",
    },
    Spec {
        long: "version",
        short: 'V',
        arg: Arg::None,
        meta: "",
        help: "print program version",
    },
];

/// The `--help` text, in argp's layout.
pub fn usage() -> String {
    let mut s = String::from("Usage: grub-bhyve [OPTION...] vmname\ngrub-bhyve boot loader.\n\n");
    for spec in SPECS {
        let mut left = String::from("  ");
        if spec.short != '\0' {
            left.push('-');
            left.push(spec.short);
            if !spec.long.is_empty() {
                left.push_str(", ");
            }
        } else {
            left.push_str("    ");
        }
        if !spec.long.is_empty() {
            left.push_str("--");
            left.push_str(spec.long);
        }
        match spec.arg {
            Arg::Required if spec.long.is_empty() => left.push_str(&format!(" {}", spec.meta)),
            Arg::Required => left.push_str(&format!("={}", spec.meta)),
            Arg::Optional => left.push_str(&format!("[={}]", spec.meta)),
            Arg::None => {}
        }
        if left.len() < 29 {
            s.push_str(&format!("{left:<29} {}\n", spec.help));
        } else {
            s.push_str(&format!("{left}\n{:<29} {}\n", "", spec.help));
        }
    }
    s.push_str(
        "\nMandatory or optional arguments to long options are also mandatory or optional\n\
         for any corresponding short options.\n",
    );
    s
}

/// argp's `--usage` text.
pub fn short_usage() -> String {
    "Usage: grub-bhyve [-enSvV?] [-c cons-dev] [-d DIR] [-g CFG] [-H[SECS]] [-m FILE]\n\
     \x20           [-M MBYTES] [-r DEVICE_NAME] [--device-map=FILE] [--directory=DIR]\n\
     \x20           [--verbose] [--hold[=SECS]] [--cons-dev=cons-dev] [--evga]\n\
     \x20           [--grub-cfg=CFG] [--ncons] [--memory=MBYTES] [--root=DEVICE_NAME]\n\
     \x20           [--help] [--usage] [--version] vmname\n"
        .to_string()
}

fn apply(opts: &mut GrubOptions, spec: &Spec, value: Option<&str>) -> Result<(), String> {
    let v = value.unwrap_or("");
    match spec.short {
        'm' => opts.device_map = v.to_string(),
        'd' => opts.directory = v.to_string(),
        'v' => opts.verbose = opts.verbose.saturating_add(1),
        'H' => {
            opts.hold = Some(match value {
                // atoi(3): leading digits, 0 when there are none.
                Some(s) => {
                    let digits: String = s
                        .trim_start()
                        .chars()
                        .enumerate()
                        .take_while(|(i, c)| {
                            c.is_ascii_digit() || (*i == 0 && (*c == '-' || *c == '+'))
                        })
                        .map(|(_, c)| c)
                        .collect();
                    digits.parse().unwrap_or(0)
                }
                None => -1,
            })
        }
        'c' => opts.cons_dev = Some(v.to_string()),
        'e' => opts.exclude_vga = true,
        'g' => opts.grub_config = v.to_string(),
        'n' => opts.no_console_insert = true,
        'M' => {
            opts.memory =
                parse_memsize(v).map_err(|_| format!("Invalid guest memory size `{v}'."))?
        }
        'r' => opts.root = v.to_string(),
        'S' => opts.wire_memory = true,
        '?' => opts.show_help = true,
        'V' => opts.show_version = true,
        _ => opts.show_usage = true,
    }
    Ok(())
}

/// Parse grub-bhyve's arguments (without the program name).
///
/// Errors are one line naming the bad part, as argp reports them.
pub fn parse_args(args: &[String]) -> Result<GrubOptions, String> {
    let mut opts = GrubOptions::default();
    let mut i = 0;
    let mut vm_name: Option<String> = None;
    while i < args.len() {
        let a = &args[i];
        i += 1;
        if a == "--" {
            for rest in &args[i..] {
                vm_name = Some(rest.clone());
            }
            break;
        }
        if let Some(long) = a.strip_prefix("--") {
            let (name, attached) = match long.split_once('=') {
                Some((n, v)) => (n, Some(v)),
                None => (long, None),
            };
            let exact = SPECS.iter().find(|s| !s.long.is_empty() && s.long == name);
            let spec = match exact {
                Some(s) => s,
                None => {
                    let cands: Vec<&Spec> = SPECS
                        .iter()
                        .filter(|s| !s.long.is_empty() && s.long.starts_with(name))
                        .collect();
                    match cands.len() {
                        1 => cands[0],
                        0 => return Err(format!("unrecognized option '--{name}'")),
                        _ => return Err(format!("option '--{name}' is ambiguous")),
                    }
                }
            };
            let value = match spec.arg {
                Arg::None => {
                    if attached.is_some() {
                        return Err(format!(
                            "option '--{}' doesn't allow an argument",
                            spec.long
                        ));
                    }
                    None
                }
                Arg::Optional => attached.map(str::to_string),
                Arg::Required => match attached {
                    Some(v) => Some(v.to_string()),
                    None => {
                        let v = args.get(i).ok_or_else(|| {
                            format!("option '--{}' requires an argument", spec.long)
                        })?;
                        i += 1;
                        Some(v.clone())
                    }
                },
            };
            apply(&mut opts, spec, value.as_deref())?;
            continue;
        }
        if a.len() > 1 && a.starts_with('-') {
            let chars: Vec<char> = a.chars().skip(1).collect();
            let mut k = 0;
            while k < chars.len() {
                let c = chars[k];
                k += 1;
                let spec = SPECS
                    .iter()
                    .find(|s| s.short == c && c != '\0')
                    .ok_or_else(|| format!("invalid option -- '{c}'"))?;
                let rest: String = chars[k..].iter().collect();
                match spec.arg {
                    Arg::None => apply(&mut opts, spec, None)?,
                    Arg::Optional => {
                        apply(
                            &mut opts,
                            spec,
                            if rest.is_empty() { None } else { Some(&rest) },
                        )?;
                        break;
                    }
                    Arg::Required => {
                        let value = if rest.is_empty() {
                            let v = args
                                .get(i)
                                .ok_or_else(|| format!("option requires an argument -- '{c}'"))?;
                            i += 1;
                            v.clone()
                        } else {
                            rest
                        };
                        apply(&mut opts, spec, Some(&value))?;
                        break;
                    }
                }
            }
            continue;
        }
        vm_name = Some(a.clone());
    }
    if let Some(name) = vm_name {
        opts.vm_name = name;
    } else if !(opts.show_help || opts.show_usage || opts.show_version) {
        return Err("Required VM name parameter not supplied".to_string());
    }
    Ok(opts)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(args: &[&str]) -> Result<GrubOptions, String> {
        parse_args(&args.iter().map(|s| s.to_string()).collect::<Vec<_>>())
    }

    #[test]
    fn handbook_line() {
        let o = p(&["-m", "device.map", "-r", "cd0", "-M", "1024M", "linuxguest"]).unwrap();
        assert_eq!(o.device_map, "device.map");
        assert_eq!(o.root, "cd0");
        assert_eq!(o.memory, 1024 << 20);
        assert_eq!(o.vm_name, "linuxguest");
        assert_eq!(o.config_path(), "/boot/grub/grub.cfg");
    }

    #[test]
    fn argp_forms() {
        let o = p(&[
            "vm",
            "--root=hd0,gpt2",
            "-Snv",
            "-vd/grub2",
            "--grub=x.cfg",
            "--mem",
            "214",
            "-H",
        ])
        .unwrap();
        assert_eq!(o.root, "hd0,gpt2");
        assert!(o.wire_memory && o.no_console_insert);
        assert_eq!(o.verbose, 2);
        assert_eq!(o.directory, "/grub2");
        assert_eq!(o.grub_config, "x.cfg");
        assert_eq!(o.memory, 214 << 20);
        assert_eq!(o.hold, Some(-1));
        assert_eq!(o.vm_name, "vm");
        assert_eq!(p(&["-H5", "x"]).unwrap().hold, Some(5));
        assert_eq!(p(&["--", "-x"]).unwrap().vm_name, "-x");
    }

    #[test]
    fn errors_name_the_bad_part() {
        assert_eq!(
            p(&["-M", "lots", "vm"]).unwrap_err(),
            "Invalid guest memory size `lots'."
        );
        assert!(p(&["-q", "vm"]).unwrap_err().contains("'q'"));
        assert!(p(&["--bogus", "vm"]).unwrap_err().contains("--bogus"));
        assert!(p(&["-r"]).unwrap_err().contains("requires an argument"));
        assert!(p(&["-r", "cd0"]).unwrap_err().contains("VM name"));
        assert!(p(&["--evga=1", "vm"])
            .unwrap_err()
            .contains("doesn't allow"));
        assert!(p(&["--help"]).unwrap().show_help);
        assert!(p(&["-V"]).unwrap().show_version);
        assert!(usage().contains("--device-map=FILE"));
    }
}
