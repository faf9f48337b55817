//! The command-line rules, one test per rule or error, with command lines
//! from bhyve(8), bhyve_config(5) and the FreeBSD Handbook's bhyve chapter.

use rhyve_config::{
    bhyve_usage, parse_bhyve_args, Action, CliError, FwCfgSource, Invocation, LPC_DEVICES,
    PCI_MODELS,
};

fn words(line: &str) -> Vec<String> {
    line.split_whitespace().map(str::to_string).collect()
}

fn ok(line: &str) -> Invocation {
    match parse_bhyve_args(&words(line)) {
        Ok(inv) => inv,
        Err(e) => panic!("{line}: unexpected error {e:?}"),
    }
}

fn err(line: &str) -> CliError {
    match parse_bhyve_args(&words(line)) {
        Ok(inv) => panic!("{line}: expected an error, got {:?}", inv.action),
        Err(e) => e,
    }
}

fn key(inv: &Invocation, path: &str) -> Option<String> {
    inv.tree.get_raw(path).map(str::to_string)
}

#[track_caller]
fn assert_keys(inv: &Invocation, expected: &[(&str, &str)]) {
    for (path, value) in expected {
        assert_eq!(key(inv, path).as_deref(), Some(*value), "key {path}");
    }
}

#[test]
fn defaults_before_options() {
    let inv = ok("vm0");
    assert_eq!(inv.action, Action::Run);
    assert_keys(
        &inv,
        &[
            ("name", "vm0"),
            ("memory.size", "256M"),
            ("x86.strictmsr", "true"),
            ("acpi_tables", "true"),
            ("acpi_tables_in_memory", "true"),
            ("lpc.fwcfg", "bhyve"),
        ],
    );
    assert_eq!(key(&inv, "cpus"), None);
}

#[test]
fn handbook_freebsd_guest() {
    let inv = ok("-A -H -P -s 0:0,hostbridge -s 1:0,lpc -s 2:0,virtio-net,tap0 \
                  -s 3:0,virtio-blk,./guest.img -s 4:0,ahci-cd,./FreeBSD-14.0-RELEASE-amd64-bootonly.iso \
                  -l com1,stdio -c 4 -m 1024M guestname");
    assert_keys(
        &inv,
        &[
            ("x86.vmexit_on_hlt", "true"),
            ("x86.vmexit_on_pause", "true"),
            ("pci.0.0.0.device", "hostbridge"),
            ("pci.0.1.0.device", "lpc"),
            ("pci.0.2.0.device", "virtio-net"),
            ("pci.0.2.0.backend", "tap0"),
            ("pci.0.3.0.device", "virtio-blk"),
            ("pci.0.3.0.path", "./guest.img"),
            ("pci.0.4.0.device", "ahci"),
            ("pci.0.4.0.port.0.type", "cd"),
            (
                "pci.0.4.0.port.0.path",
                "./FreeBSD-14.0-RELEASE-amd64-bootonly.iso",
            ),
            ("lpc.com1.path", "stdio"),
            ("cpus", "4"),
            ("memory.size", "1024M"),
            ("name", "guestname"),
        ],
    );
}

#[test]
fn handbook_uefi_guest_with_vnc() {
    let inv = ok("-c 2 -m 4G -w -H -s 0,hostbridge -s 3,ahci-cd,/path/to/uefi-OS-install.iso \
                  -s 4,ahci-hd,disk.img -s 5,virtio-net,tap0 \
                  -s 29,fbuf,tcp=0.0.0.0:5900,w=800,h=600,wait,password=secret -s 30,xhci,tablet \
                  -s 31,lpc -l com1,stdio -l bootrom,/usr/local/share/uefi-firmware/BHYVE_UEFI.fd uefivm");
    assert_keys(
        &inv,
        &[
            ("x86.strictmsr", "false"),
            ("pci.0.4.0.device", "ahci"),
            ("pci.0.4.0.port.0.type", "hd"),
            ("pci.0.4.0.port.0.path", "disk.img"),
            ("pci.0.29.0.device", "fbuf"),
            ("pci.0.29.0.tcp", "0.0.0.0:5900"),
            ("pci.0.29.0.w", "800"),
            ("pci.0.29.0.h", "600"),
            ("pci.0.29.0.wait", "true"),
            ("pci.0.29.0.password", "secret"),
            ("pci.0.30.0.device", "xhci"),
            ("pci.0.30.0.slot.1.device", "tablet"),
            ("pci.0.31.0.device", "lpc"),
            (
                "lpc.bootrom",
                "/usr/local/share/uefi-firmware/BHYVE_UEFI.fd",
            ),
            // bhyve copies the deprecated LPC key to the top-level one.
            ("bootrom", "/usr/local/share/uefi-firmware/BHYVE_UEFI.fd"),
        ],
    );
    assert_eq!(
        inv.warnings,
        vec!["bhyve: lpc.bootrom is deprecated, use '-o bootrom' instead"]
    );
}

#[test]
fn bundled_flags_and_attached_arguments() {
    let inv = ok("-AHPw -s0,hostbridge -lcom1,stdio -c2 -m512 vm");
    assert_keys(
        &inv,
        &[
            ("x86.vmexit_on_hlt", "true"),
            ("x86.vmexit_on_pause", "true"),
            ("x86.strictmsr", "false"),
            ("pci.0.0.0.device", "hostbridge"),
            ("lpc.com1.path", "stdio"),
            ("cpus", "2"),
            ("memory.size", "512"),
        ],
    );
    let inv = ok("-AHPww -aCDeIMSuWxY vm");
    assert_keys(
        &inv,
        &[
            ("x86.strictmsr", "false"),
            ("x86.x2apic", "true"),
            ("memory.guest_in_core", "true"),
            ("destroy_on_poweroff", "true"),
            ("x86.strictio", "true"),
            ("monitor", "true"),
            ("memory.wired", "true"),
            ("rtc.use_localtime", "false"),
            ("virtio_msix", "false"),
            ("x86.mptable", "false"),
        ],
    );
    // -a after -x: later wins.
    assert_eq!(key(&ok("-x -a vm"), "x86.x2apic").as_deref(), Some("false"));
}

#[test]
fn options_apply_in_order_later_wins() {
    let inv = ok("-m 1G -o memory.size=2G -c 2 -c 4 vm");
    assert_keys(&inv, &[("memory.size", "2G"), ("cpus", "4")]);
    let inv = ok("-o memory.size=2G -m 3G vm");
    assert_keys(&inv, &[("memory.size", "3G")]);
    let inv = ok("-o name=fromopt");
    assert_keys(&inv, &[("name", "fromopt")]);
    let inv = ok("-o name=fromopt operand");
    assert_keys(&inv, &[("name", "operand")]);
}

#[test]
fn k_files_apply_where_they_appear() {
    let dir = std::env::temp_dir().join(format!("rhyve-config-k-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("vm.conf");
    std::fs::write(
        &file,
        "# a bhyve config file\n\nmemory.size=2G\ncpus=2\npci.0.0.0.device=hostbridge\nname=kvm\nnote=a=b\n",
    )
    .unwrap();
    let f = file.display();
    let inv = ok(&format!("-m 1G -k {f} -c 4"));
    assert_keys(
        &inv,
        &[
            ("memory.size", "2G"),
            ("cpus", "4"),
            ("name", "kvm"),
            ("pci.0.0.0.device", "hostbridge"),
            ("note", "a=b"),
        ],
    );
    let inv = ok(&format!("-k {f} -m 1G"));
    assert_keys(&inv, &[("memory.size", "1G")]);

    let bad = dir.join("bad.conf");
    std::fs::write(&bad, "cpus=2\n  # indented comment\n").unwrap();
    let e = err(&format!("-k {} vm", bad.display()));
    assert_eq!(e.status, 4);
    assert_eq!(
        e.message,
        format!(
            "bhyve: {} line 2: invalid config option '  # indented comment'",
            bad.display()
        )
    );

    let e = err(&format!("-k {}/missing.conf vm", dir.display()));
    assert_eq!(e.status, 4);
    assert!(
        e.message
            .starts_with("bhyve: Failed to open configuration file"),
        "{}",
        e.message
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn o_overrides_expansion_and_booleans() {
    let inv = ok("-o disk=/vms/%(name)/disk.img -o x86.mptable=off -o virtio_msix=NO vm7");
    assert_eq!(
        inv.tree.get("disk").unwrap().as_deref(),
        Some("/vms/vm7/disk.img")
    );
    assert_eq!(inv.tree.get_bool("x86.mptable").unwrap(), Some(false));
    assert_eq!(inv.tree.get_bool("virtio_msix").unwrap(), Some(false));
    for bad in ["-o novalue vm", "-o key= vm"] {
        let e = err(bad);
        assert_eq!(e.status, 64, "{bad}");
    }
    assert_eq!(
        err("-o key= vm").message,
        "bhyve: invalid configuration option 'key='"
    );
    // A value where bhyve already has a node.
    let e = err("-s 0,hostbridge -o pci.0.0.0=x vm");
    assert_eq!(e.status, 4);
    assert_eq!(
        e.message,
        "bhyve: Attempting to add value x to existing node pci.0.0.0"
    );
}

#[test]
fn direct_kernel_boot_keys_pass_through() {
    let inv = ok(
        "-o boot.kernel=/boot/vmlinuz -o boot.initrd=/boot/initrd.img \
                  -o boot.cmdline=console=ttyS0,115200_root=/dev/vda vm",
    );
    assert_keys(
        &inv,
        &[
            ("boot.kernel", "/boot/vmlinuz"),
            ("boot.initrd", "/boot/initrd.img"),
            ("boot.cmdline", "console=ttyS0,115200_root=/dev/vda"),
        ],
    );
    // A cmdline with spaces, as one argv word.
    let args: Vec<String> = ["-o", "boot.cmdline=console=ttyS0 root=/dev/vda1 ro", "vm"]
        .map(String::from)
        .to_vec();
    let inv = parse_bhyve_args(&args).unwrap();
    assert_eq!(
        key(&inv, "boot.cmdline").as_deref(),
        Some("console=ttyS0 root=/dev/vda1 ro")
    );
}

#[test]
fn cpu_topology() {
    let inv = ok("-c cpus=2,sockets=1,cores=2,threads=1 vm");
    assert_keys(
        &inv,
        &[
            ("cpus", "2"),
            ("sockets", "1"),
            ("cores", "2"),
            ("threads", "1"),
        ],
    );
    let inv = ok("-c sockets=2,cores=2,threads=2 vm");
    assert_eq!(rhyve_config::topology(&inv.tree).unwrap().cpus, 8);
    let args = vec!["-c".to_string(), String::new(), "vm".to_string()];
    let inv = parse_bhyve_args(&args).unwrap();
    assert_keys(
        &inv,
        &[
            ("cpus", "1"),
            ("sockets", "1"),
            ("cores", "1"),
            ("threads", "1"),
        ],
    );

    let e = err("-c 4,sockets=1,cores=2 vm");
    assert_eq!(e.status, 4);
    assert_eq!(
        e.message,
        "bhyve: Topology (1 sockets, 2 cores, 1 threads) does not match 4 vCPUs"
    );
    let e = err("-c maxcpus=4 vm");
    assert_eq!(
        (e.status, e.message.as_str()),
        (64, "bhyve: invalid cpu topology 'maxcpus=4'")
    );
    let e = err("-c lots vm");
    assert_eq!(
        (e.status, e.message.as_str()),
        (4, "bhyve: Invalid value for cpus: 'lots'")
    );
    let e = err("-c 70000 vm");
    assert_eq!(e.status, 4);
}

#[test]
fn memory_sizes() {
    for (arg, bytes) in [
        ("214", 214u64 << 20),
        ("214M", 214 << 20),
        ("214m", 214 << 20),
        ("2G", 2 << 30),
        ("2g", 2 << 30),
        ("1T", 1 << 40),
        ("524288k", 512 << 20),
        ("224395264", 224_395_264),
    ] {
        let inv = ok(&format!("-m {arg} vm"));
        assert_eq!(
            rhyve_config::memory_size(&inv.tree).unwrap(),
            bytes,
            "{arg}"
        );
    }
    let e = err("-m bogus vm");
    assert_eq!(
        (e.status, e.message.as_str()),
        (64, "bhyve: invalid memsize 'bogus'")
    );
    // The size is checked after the dump, as in bhyve.
    assert_eq!(
        ok("-m bogus -o config.dump=1 vm").action,
        Action::DumpConfig
    );
}

#[test]
fn config_dump() {
    let inv = ok("-o config.dump=1 -s 0,hostbridge -c 2 vm");
    assert_eq!(inv.action, Action::DumpConfig);
    assert_eq!(inv.action.exit_status(), Some(1));
    let dump = inv.tree.dump();
    for line in [
        "pci.0.0.0.device=hostbridge",
        "cpus=2",
        "name=vm",
        "memory.size=256M",
        "config.dump=1",
    ] {
        assert!(
            dump.lines().any(|l| l == line),
            "{line} missing from\n{dump}"
        );
    }
    assert_eq!(ok("-o config.dump=false vm").action, Action::Run);
    let e = err("-o config.dump=maybe vm");
    assert_eq!(e.status, 4);
    // The dump is a -k file giving back the same tree.
    let dir = std::env::temp_dir().join(format!("rhyve-config-dump-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("dump.conf");
    std::fs::write(&file, &dump).unwrap();
    let again = ok(&format!("-k {}", file.display()));
    assert_eq!(again.tree, inv.tree);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn usage_and_help() {
    let inv = ok("-h");
    assert_eq!(inv.action, Action::Usage);
    assert_eq!(inv.action.exit_status(), Some(0));
    // -h wins even when later options are bad.
    assert_eq!(ok("-c 2 -h -s bogus").action, Action::Usage);
    let usage = bhyve_usage("bhyve");
    assert!(usage.starts_with("Usage: bhyve [-aCDeHhPSuWwxY]\n             [-c [[cpus=]numcpus]"));
    assert!(usage.contains("       -s: <slot,driver,configinfo> PCI slot config\n"));
    assert!(usage.ends_with("       -Y: disable MPtable generation\n"));

    let e = err("-z vm");
    assert_eq!((e.status, e.show_usage), (1, true));
    assert_eq!(e.message, "bhyve: illegal option -- z");
    assert!(e
        .render("bhyve")
        .starts_with("bhyve: illegal option -- z\nUsage: bhyve "));
    let e = err("vm -s");
    assert_eq!(
        (e.status, e.show_usage),
        (1, true),
        "options after the name are operands"
    );
    let e = err("-c");
    assert_eq!(e.message, "bhyve: option requires an argument -- c");
    assert_eq!(e.status, 1);
    // No VM name, or two.
    let e = err("-c 2");
    assert_eq!((e.status, e.show_usage, e.message.as_str()), (1, true, ""));
    assert_eq!(err("-c 2 vm1 vm2").status, 1);
}

#[test]
fn model_lists() {
    for arg in ["help", "h", "hel"] {
        assert_eq!(ok(&format!("-s {arg}")).action, Action::ListPciModels);
        assert_eq!(ok(&format!("-l {arg}")).action, Action::ListLpcDevices);
    }
    assert_eq!(ok("-s help").action.exit_status(), Some(0));
    assert_eq!(err("-s helpme vm").status, 4);
    assert!(PCI_MODELS.contains(&"virtio-blk") && PCI_MODELS.contains(&"passthru"));
    assert_eq!(
        LPC_DEVICES,
        &[
            "bootrom",
            "com1",
            "com2",
            "com3",
            "com4",
            "tpm",
            "pc-testdev"
        ]
    );
}

#[test]
fn slot_syntax_and_errors() {
    let inv = ok("-s 7,virtio-rnd -s 7:3,virtio-rnd -s 1:7:3,virtio-rnd vm");
    assert_keys(
        &inv,
        &[
            ("pci.0.7.0.device", "virtio-rnd"),
            ("pci.0.7.3.device", "virtio-rnd"),
            ("pci.1.7.3.device", "virtio-rnd"),
        ],
    );
    let e = err("-s 0,foo vm");
    assert_eq!(
        (e.status, e.message.as_str()),
        (4, "pci slot 0:0:0: unknown device \"foo\"")
    );
    let e = err("-s 0:0,hostbridge -s 0,hostbridge vm");
    assert_eq!(
        (e.status, e.message.as_str()),
        (4, "pci slot 0:0:0 already occupied!")
    );
    for bad in [
        "0",
        "32,hostbridge",
        "0:8,hostbridge",
        "-1,hostbridge",
        "a:b,hostbridge",
    ] {
        let e = err(&format!("-s {bad} vm"));
        assert_eq!(e.status, 4, "{bad}");
        assert_eq!(e.message, format!("Invalid PCI slot info field \"{bad}\""));
    }
    // A device name only the tree can carry is refused before the VM starts.
    let e = err("-o pci.0.5.0.device=ahci-hd vm");
    assert_eq!(
        e.message,
        "pci slot 0:5:0: legacy device \"ahci-hd\", use \"ahci\" instead"
    );
    let e = err("-o pci.0.5.0.path=/x vm");
    assert_eq!(e.message, "pci slot 0:5:0: missing \"device\" value");
    let e = err("-o pci.0.5.0.device=gpu vm");
    assert_eq!(
        (e.status, e.message.as_str()),
        (4, "pci slot 0:5:0: unknown device \"gpu\"")
    );
    // A dotted name inside a legacy string is refused, as bhyve does.
    let e = err("-s 0,hostbridge,pcireg.vendor=1 vm");
    assert_eq!(
        (e.status, e.message.as_str()),
        (4, "bhyve: Invalid config node name pcireg.vendor")
    );
}

#[test]
fn one_lpc_on_bus_zero() {
    let e = err("-s 1,lpc -s 31,lpc vm");
    assert_eq!(
        (e.status, e.message.as_str()),
        (4, "Only one LPC bridge is allowed.")
    );
    let e = err("-s 1:1:0,lpc vm");
    assert_eq!(
        (e.status, e.message.as_str()),
        (4, "LPC bridge can be present only on bus 0.")
    );
    let e = err("-s 3,fbuf -s 4,fbuf vm");
    assert_eq!(e.message, "Only one frame buffer device is allowed.");
    // Still dumpable: the checks come after the dump.
    assert_eq!(
        ok("-s 1,lpc -s 31,lpc -o config.dump=1 vm").action,
        Action::DumpConfig
    );
}

#[test]
fn lpc_devices() {
    let inv = ok("-l com1,stdio -l com2,/dev/nmdm0B -l com3,tcp=127.0.0.1:4444 -l COM4,/dev/ttyu0 \
                  -l bootrom,/rom.fd,/vars.fd,fwcfg=qemu -l tpm,passthru,/dev/tpm0 -l pc-testdev vm");
    assert_keys(
        &inv,
        &[
            ("lpc.com1.path", "stdio"),
            ("lpc.com2.path", "/dev/nmdm0B"),
            ("lpc.com3.path", "tcp=127.0.0.1:4444"),
            ("lpc.com4.path", "/dev/ttyu0"),
            ("lpc.bootrom", "/rom.fd"),
            ("lpc.bootvars", "/vars.fd"),
            ("bootvars", "/vars.fd"),
            ("lpc.fwcfg", "qemu"),
            ("tpm.type", "passthru"),
            ("tpm.path", "/dev/tpm0"),
            ("tpm.version", "2.0"),
            ("lpc.pc-testdev", "true"),
        ],
    );
    let inv = ok("-l bootrom,/rom.fd,fwcfg=qemu -o bootrom=/other.fd vm");
    assert_keys(&inv, &[("lpc.fwcfg", "qemu"), ("bootrom", "/other.fd")]);
    assert_eq!(key(&inv, "lpc.bootvars"), None);
    assert!(inv.warnings.is_empty());
    let inv = ok("-l tpm,swtpm,/run/swtpm.sock,version=1.2 vm");
    assert_keys(&inv, &[("tpm.version", "1.2")]);

    let e = err("-l com5,stdio vm");
    assert_eq!(
        (e.status, e.message.as_str()),
        (64, "bhyve: invalid lpc device configuration 'com5,stdio'")
    );
    assert_eq!(err("-l com1 vm").status, 64);
    let e = err("-l bootrom vm");
    assert_eq!(
        (e.status, e.message.as_str()),
        (4, "bhyve: invalid bootrom option \"bootrom\"")
    );
    assert_eq!(err("-l tpm vm").message, "bhyve: invalid tpm type \"tpm\"");
    assert_eq!(
        err("-l tpm,swtpm vm").message,
        "bhyve: invalid tpm path \"tpm,swtpm\""
    );
}

#[test]
fn device_legacy_strings() {
    let inv = ok("-s 1,virtio-blk,./d.img,ro,sectorsize=512/4096,nocache,ser=ABC \
                  -s 2,virtio-net,tap0,mac=58:9c:fc:00:00:01,mtu=9000 \
                  -s 3,e1000,slirp,hostfwd=tcp::2222-:22 \
                  -s 4,nvme,/dev/zvol/d,maxq=4,qsz=256,ioslots=4,sectsz=4096,ser=N1,eui64=0x1,dsm=enable \
                  -s 5,nvme,ram=1024,maxq=2 \
                  -s 6,virtio-9p,share=/path,ro \
                  -s 7,virtio-console,port1=/tmp/vm1.sock,org.qemu.guest_agent.0=/tmp/qga \
                  -s 8,uart,tcp=127.0.0.1:9999 \
                  -s 9,passthru,2/0/0 -s 10,passthru,ppt0,rom=/rom.bin -s 11,passthru,pci0:4:0:1 \
                  -s 12,passthru,pci5:6:7 \
                  -s 13,virtio-scsi,/dev/cam/ctl1.1,iid=3 \
                  -s 14,hda,play=/dev/dsp0,rec=/dev/dsp1 \
                  -s 15,virtio-input,/dev/input/event0 \
                  -s 16,amd_hostbridge \
                  -s 17,ahci-hd,/disk.img,nmrr=1,model=FAST \
                  -s 18,xhci,tablet,tablet=opt \
                  -s 19,virtio-rnd \
                  -s 20,virtio-net,netgraph,path=vmbridge:,peerhook=link2 vm");
    assert_keys(
        &inv,
        &[
            ("pci.0.1.0.path", "./d.img"),
            ("pci.0.1.0.ro", "true"),
            ("pci.0.1.0.sectorsize", "512/4096"),
            ("pci.0.1.0.nocache", "true"),
            ("pci.0.1.0.ser", "ABC"),
            ("pci.0.2.0.backend", "tap0"),
            ("pci.0.2.0.mac", "58:9c:fc:00:00:01"),
            ("pci.0.2.0.mtu", "9000"),
            ("pci.0.3.0.device", "e1000"),
            ("pci.0.3.0.backend", "slirp"),
            ("pci.0.3.0.hostfwd", "tcp::2222-:22"),
            ("pci.0.4.0.path", "/dev/zvol/d"),
            ("pci.0.4.0.maxq", "4"),
            ("pci.0.4.0.qsz", "256"),
            ("pci.0.4.0.ioslots", "4"),
            ("pci.0.4.0.sectsz", "4096"),
            ("pci.0.4.0.eui64", "0x1"),
            ("pci.0.4.0.dsm", "enable"),
            ("pci.0.5.0.ram", "1024"),
            ("pci.0.5.0.maxq", "2"),
            ("pci.0.6.0.sharename", "share"),
            ("pci.0.6.0.path", "/path"),
            ("pci.0.6.0.ro", "true"),
            ("pci.0.7.0.port.0.name", "port1"),
            ("pci.0.7.0.port.0.path", "/tmp/vm1.sock"),
            ("pci.0.7.0.port.1.name", "org.qemu.guest_agent.0"),
            ("pci.0.7.0.port.1.path", "/tmp/qga"),
            ("pci.0.8.0.path", "tcp=127.0.0.1:9999"),
            ("pci.0.9.0.bus", "2"),
            ("pci.0.9.0.slot", "0"),
            ("pci.0.9.0.func", "0"),
            ("pci.0.10.0.pptdev", "ppt0"),
            ("pci.0.10.0.rom", "/rom.bin"),
            ("pci.0.11.0.bus", "4"),
            ("pci.0.11.0.func", "1"),
            ("pci.0.12.0.bus", "5"),
            ("pci.0.12.0.slot", "6"),
            ("pci.0.12.0.func", "7"),
            ("pci.0.13.0.dev", "/dev/cam/ctl1.1"),
            ("pci.0.13.0.iid", "3"),
            ("pci.0.14.0.play", "/dev/dsp0"),
            ("pci.0.14.0.rec", "/dev/dsp1"),
            ("pci.0.15.0.path", "/dev/input/event0"),
            ("pci.0.16.0.device", "hostbridge"),
            ("pci.0.16.0.pcireg.vendor", "0x1022"),
            ("pci.0.16.0.pcireg.device", "0x7432"),
            ("pci.0.17.0.device", "ahci"),
            ("pci.0.17.0.port.0.type", "hd"),
            ("pci.0.17.0.port.0.path", "/disk.img"),
            ("pci.0.17.0.port.0.nmrr", "1"),
            ("pci.0.17.0.port.0.model", "FAST"),
            ("pci.0.18.0.slot.1.device", "tablet"),
            ("pci.0.18.0.slot.2.device", "tablet"),
            ("pci.0.18.0.slot.2.opt", "true"),
            ("pci.0.19.0.device", "virtio-rnd"),
            ("pci.0.20.0.backend", "netgraph"),
            ("pci.0.20.0.path", "vmbridge:"),
            ("pci.0.20.0.peerhook", "link2"),
        ],
    );

    let e = err("-s 1,passthru,bogus vm");
    assert_eq!(
        (e.status, e.message.as_str()),
        (4, "passthru: invalid options \"bogus\"")
    );
    let e = err("-s 1,virtio-9p,a=/x,b=/y vm");
    assert_eq!(e.message, "virtio-9p: more than one share name given");
    let e = err("-s 1,virtio-console,/tmp/sock vm");
    assert_eq!(e.message, "vtcon: port /tmp/sock requires a path");
    let many: Vec<String> = (0..17).map(|i| format!("p{i}=/s{i}")).collect();
    let e = err(&format!("-s 1,virtio-console,{} vm", many.join(",")));
    assert_eq!(e.message, "vtcon: too many ports");
    assert_eq!(err("-s 1,virtio-input vm").status, 4);
}

#[test]
fn vcpu_pinning() {
    let inv = ok("-c 2 -p 0:1 -p 0:3 -p 1:0 vm");
    assert_keys(&inv, &[("vcpu.0.cpuset", "1,3"), ("vcpu.1.cpuset", "0")]);
    let pins = rhyve_config::vcpu_pinning(&inv.tree, 2).unwrap();
    assert_eq!(pins, vec![Some(vec![1, 3]), Some(vec![0])]);
    let inv = ok("-c 2 -o vcpu.1.cpuset=2-4,8 vm");
    assert_eq!(
        rhyve_config::vcpu_pinning(&inv.tree, 2).unwrap()[1],
        Some(vec![2, 3, 4, 8])
    );
    for bad in ["-p 0 vm", "-p -1:0 vm", "-p 0:1024 vm", "-p x:1 vm"] {
        let e = err(bad);
        assert_eq!(e.status, 64, "{bad}");
    }
    assert_eq!(
        err("-p 0 vm").message,
        "bhyve: invalid vcpu pinning configuration '0'"
    );
    let e = err("-o vcpu.0.cpuset=4-2 vm");
    assert_eq!(
        (e.status, e.message.as_str()),
        (4, "bhyve: Invalid hostcpu range 4-2")
    );
}

#[test]
fn gdb_uuid_keyboard_restore() {
    let inv = ok(
        "-G w127.0.0.1:1234 -U 2a793ea6-8e52-440a-8458-355e98492e17 -K us_unix -r /snap/vm.ckp vm",
    );
    assert_keys(
        &inv,
        &[
            ("gdb.wait", "true"),
            ("gdb.address", "127.0.0.1"),
            ("gdb.port", "1234"),
            ("uuid", "2a793ea6-8e52-440a-8458-355e98492e17"),
            ("keyboard.layout", "us_unix"),
        ],
    );
    assert_eq!(inv.restore_file.as_deref(), Some("/snap/vm.ckp"));
    let inv = ok("-G 4321 vm");
    assert_keys(&inv, &[("gdb.port", "4321")]);
    assert_eq!(key(&inv, "gdb.wait"), None);
    let inv = ok("-G [::1]:99 vm");
    assert_keys(&inv, &[("gdb.address", "[::1]"), ("gdb.port", "99")]);
    // With -r the name may come from the snapshot.
    assert_eq!(
        ok("-r /snap/vm.ckp").restore_file.as_deref(),
        Some("/snap/vm.ckp")
    );
}

#[test]
fn fw_cfg_files() {
    let manifest = concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml");
    let inv = ok(&format!(
        "-f opt/com.example/greeting,string=hello -f name=opt/file,file={manifest} vm"
    ));
    assert_eq!(inv.fw_cfg_files.len(), 2);
    assert_eq!(inv.fw_cfg_files[0].name, "opt/com.example/greeting");
    assert_eq!(
        inv.fw_cfg_files[0].source,
        FwCfgSource::String("hello".into())
    );
    assert_eq!(inv.fw_cfg_files[1].name, "opt/file");
    assert_eq!(
        inv.fw_cfg_files[1].source,
        FwCfgSource::File(manifest.into())
    );
    for bad in [
        "-f noval vm",
        "-f opt/x,blob=1 vm",
        "-f opt/x,file=/nonexistent/file vm",
    ] {
        let e = err(bad);
        assert_eq!(e.status, 64, "{bad}");
    }
    let long = "n".repeat(56);
    assert_eq!(
        err(&format!("-f {long},string=x vm")).message,
        format!("bhyve: invalid fwcfg item '{long},string=x'")
    );
}

#[test]
fn numa_domains() {
    let inv = ok(
        "-c 4 -n id=0,size=1G,cpus=0-1 -n id=1,size=1G,cpus=2-3,domain_policy=prefer:0 -m 2G vm",
    );
    assert_keys(
        &inv,
        &[
            ("domains.0.size", "1G"),
            ("domains.0.cpus", "0-1"),
            ("domains.1.cpus", "2-3"),
            ("domains.1.domain_policy", "prefer:0"),
        ],
    );
    let domains = rhyve_config::numa_domains(&inv.tree).unwrap();
    assert_eq!(domains.len(), 2);
    assert_eq!(domains[1].size, Some(1 << 30));
    assert_eq!(domains[1].cpus, vec![2, 3]);
    let e = err("-n size=1G vm");
    assert_eq!(
        (e.status, e.message.as_str()),
        (64, "bhyve: invalid NUMA configuration 'size=1G'")
    );
    let e = err("-o acpi_tables=false -n id=0,cpus=0 vm");
    assert_eq!(
        (e.status, e.message.as_str()),
        (64, "bhyve: NUMA emulation requires ACPI")
    );
    let e = err("-n id=300 vm");
    assert_eq!(e.status, 4);
    let e = err("-n id=0,size=lots,cpus=0 vm");
    assert_eq!(
        (e.status, e.message.as_str()),
        (64, "bhyve: invalid memsize for domain 0: 'lots'")
    );
    let e = err("-n id=0,size=1G vm");
    assert_eq!(
        (e.status, e.message.as_str()),
        (4, "Missing CPU set for domain 0")
    );
}

#[test]
fn arm64_style_options_parse() {
    // bhyve(8)'s arm64 example: console and boot ROM as plain config keys.
    let inv = ok("-c 2 -s 0,hostbridge -s 1,virtio-blk,img -o console=stdio \
                  -o bootrom=/usr/local/share/u-boot/u-boot-bhyve-arm64/u-boot.bin -m 1G vm1");
    assert_keys(
        &inv,
        &[
            ("console", "stdio"),
            ("pci.0.1.0.path", "img"),
            ("memory.size", "1G"),
        ],
    );
}

#[test]
fn bhyve8_examples() {
    let inv =
        ok("-c 2 -s 0,hostbridge -s 1,lpc -s 2,virtio-blk,/my/image -l com1,stdio -H -P -m 1G vm1");
    assert_keys(
        &inv,
        &[
            ("cpus", "2"),
            ("pci.0.2.0.path", "/my/image"),
            ("lpc.com1.path", "stdio"),
            ("name", "vm1"),
        ],
    );
    let inv = ok("-s 0,hostbridge -s 1,lpc -s 2:0,virtio-net,tap0 -s 2:1,virtio-net,tap1 \
                  -s 2:2,virtio-net,tap2,mac=00:be:fa:76:45:00 -s 3,virtio-blk,/my/image -l com1,stdio \
                  -H -P -m 24G bigvm");
    assert_keys(
        &inv,
        &[
            ("pci.0.2.1.backend", "tap1"),
            ("pci.0.2.2.backend", "tap2"),
            ("pci.0.2.2.mac", "00:be:fa:76:45:00"),
        ],
    );
    assert_eq!(rhyve_config::memory_size(&inv.tree).unwrap(), 24 << 30);
    // The manual's 8-disk AHCI example puts the AHCI controller on the
    // LPC bridge's slot; bhyve refuses it exactly so.
    let e = err("-c 4 -s 0,amd_hostbridge -s 1,lpc \
                 -s 1:0,ahci,hd:/images/disk.1,hd:/images/disk.2,hd:/images/disk.3,hd:/images/disk.4,\
hd:/images/disk.5,hd:/images/disk.6,hd:/images/disk.7,hd:/images/disk.8,cd:/images/install.iso \
                 -s 3,virtio-net,tap0 -l com1,/dev/nmdm0A -H -P -m 8G");
    assert_eq!(
        (e.status, e.message.as_str()),
        (4, "pci slot 0:1:0 already occupied!")
    );
    let inv = ok("-c 4 -s 0,amd_hostbridge -s 1,lpc \
                  -s 2:0,ahci,hd:/images/disk.1,hd:/images/disk.2,hd:/images/disk.3,hd:/images/disk.4,\
hd:/images/disk.5,hd:/images/disk.6,hd:/images/disk.7,hd:/images/disk.8,cd:/images/install.iso \
                  -s 3,virtio-net,tap0 -l com1,/dev/nmdm0A -H -P -m 8G vm");
    assert_keys(
        &inv,
        &[
            ("pci.0.0.0.device", "hostbridge"),
            ("pci.0.2.0.port.7.path", "/images/disk.8"),
            ("pci.0.2.0.port.8.type", "cd"),
            ("pci.0.2.0.port.8.path", "/images/install.iso"),
        ],
    );
    let inv = ok("-c 2 -m 4G -w -H -s 0,hostbridge -s 4,ahci-hd,disk.img -s 5,virtio-net,tap0 \
                  -s 29,fbuf,tcp=[::]:5900,w=800,h=600 -s 30,xhci,tablet -s 31,lpc -l com1,tcp=[::1]:1234 \
                  -l bootrom,/usr/local/share/uefi-firmware/BHYVE_UEFI.fd uefivm");
    assert_keys(
        &inv,
        &[
            ("pci.0.29.0.tcp", "[::]:5900"),
            ("lpc.com1.path", "tcp=[::1]:1234"),
        ],
    );
    let inv = ok("-c 2 -m 4g -w -H -s 0,hostbridge -s 31,lpc -l com1,stdio \
                  -l bootrom,/usr/local/share/uefi-firmware/BHYVE_UEFI_CODE.fd,BHYVE_UEFI_VARS.fd uefivm");
    assert_keys(
        &inv,
        &[
            ("lpc.bootvars", "BHYVE_UEFI_VARS.fd"),
            ("memory.size", "4g"),
        ],
    );
    let inv = ok(
        "-c 4 -w -H -s 0,hostbridge -s 4,ahci-hd,disk.img -s 31,lpc -l com1,stdio \
                  -l bootrom,/usr/local/share/uefi-firmware/BHYVE_UEFI.fd \
                  -n id=0,size=4G,cpus=0-1 -n id=1,size=4G,cpus=2-3 numavm",
    );
    assert_eq!(rhyve_config::numa_domains(&inv.tree).unwrap().len(), 2);
}

#[test]
fn bhyve8_config_dump_then_k() {
    let dumped = ok(
        "-c 2 -m 256 -H -P -s 0:0,hostbridge -s 1:0,virtio-net,tap0 -s 2:0,ahci-hd,./vm0.img \
                     -s 31,lpc -l com1,stdio -o config.dump=1 vm0",
    );
    assert_eq!(dumped.action, Action::DumpConfig);
    // "remove the line config.dump=1", then start with -k.
    let text: String = dumped
        .tree
        .dump()
        .lines()
        .filter(|l| *l != "config.dump=1")
        .map(|l| format!("{l}\n"))
        .collect();
    let dir = std::env::temp_dir().join(format!("rhyve-config-k2-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("configfile");
    std::fs::write(&file, text).unwrap();
    let inv = ok(&format!("-k {} vm0", file.display()));
    assert_eq!(inv.action, Action::Run);
    let mut expected = dumped.tree.clone();
    expected.remove("config.dump");
    assert_eq!(inv.tree.entries(), expected.entries());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn tree_conflicts() {
    let e = err("-o memory=1 vm");
    assert_eq!(
        (e.status, e.message.as_str()),
        (
            4,
            "bhyve: Attempting to add value 1 to existing node memory"
        )
    );
    let e = err("-o foo=1 -o foo.bar.baz=2 vm");
    assert_eq!(
        (e.status, e.message.as_str()),
        (
            4,
            "bhyve: Configuration node foo.bar is a child of existing variable foo"
        )
    );
    let e = err("-o a..b=1 vm");
    assert_eq!(
        (e.status, e.message.as_str()),
        (4, "bhyve: Invalid configuration node: a..b")
    );
}

#[test]
fn output_for_each_action() {
    let run = |line: &str| {
        let inv = ok(line);
        let (mut out, mut errs) = (Vec::new(), Vec::new());
        let status = inv.write_output("bhyve", &mut out, &mut errs).unwrap();
        (
            status,
            String::from_utf8(out).unwrap(),
            String::from_utf8(errs).unwrap(),
        )
    };
    let (status, out, errs) = run("-l help");
    assert_eq!(
        (status, out.as_str(), errs.as_str()),
        (
            Some(0),
            "bootrom\ncom1\ncom2\ncom3\ncom4\ntpm\npc-testdev\n",
            ""
        )
    );
    let (status, out, _) = run("-s help");
    assert_eq!(status, Some(0));
    assert_eq!(out.lines().count(), PCI_MODELS.len());
    let (status, out, errs) = run("-h");
    assert_eq!((status, out.as_str()), (Some(0), ""));
    assert_eq!(errs, bhyve_usage("bhyve"));
    let (status, out, _) = run("-o config.dump=1 vm");
    assert_eq!(status, Some(1));
    assert!(out.contains("name=vm\n"));
    let (status, out, errs) = run("-l bootrom,/rom vm");
    assert_eq!((status, out.as_str()), (None, ""));
    assert_eq!(
        errs,
        "bhyve: lpc.bootrom is deprecated, use '-o bootrom' instead\n"
    );
}
