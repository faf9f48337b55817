//! `bhyvectl`: control named VMs, as bhyvectl(8) does.

fn main() {
    rhyve_cli::init_logging("bhyvectl");
    let args: Vec<String> = std::env::args().skip(1).collect();
    std::process::exit(rhyve_vmm::bhyvectl::main_with_args(&args));
}
