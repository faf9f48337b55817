//! `grub-bhyve`: grub2-bhyve's Linux loader. Shows the guest's GRUB menu or
//! prompt on the console, loads the chosen kernel and initrd into the named
//! VM, and exits; `bhyve NAME` then runs it.

fn main() {
    rhyve_cli::init_logging("grub-bhyve");
    let args: Vec<String> = std::env::args().skip(1).collect();
    let opts = match rhyve_grub::parse_args(&args) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("grub-bhyve: {e}");
            eprint!("{}", rhyve_grub::short_usage());
            std::process::exit(1);
        }
    };
    if opts.show_help {
        print!("{}", rhyve_grub::usage());
        return;
    }
    if opts.show_usage {
        print!("{}", rhyve_grub::short_usage());
        return;
    }
    if opts.show_version {
        println!("grub-bhyve (rhyve) {}", env!("CARGO_PKG_VERSION"));
        return;
    }
    let mut console = match rhyve_grub::open_console(&opts) {
        Ok(c) => c,
        Err(e) => {
            eprintln!(
                "grub-bhyve: console {}: {e}",
                opts.cons_dev.as_deref().unwrap_or("stdio")
            );
            std::process::exit(1);
        }
    };
    let selection = match rhyve_grub::run(&opts, &mut console) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("grub-bhyve: {e}");
            std::process::exit(1);
        }
    };
    drop(console);
    if let Err(e) = rhyve_vmm::prepare_named_vm(
        &opts.vm_name,
        opts.memory,
        &selection.kernel,
        &selection.initrd,
        &selection.cmdline,
    ) {
        eprintln!("grub-bhyve: {e}");
        std::process::exit(1);
    }
}
