//! `bhyve`: run a virtual machine, as bhyve(8) does.

use rhyve_config::parse_bhyve_args;

fn main() {
    rhyve_cli::init_logging("bhyve");
    let args: Vec<String> = std::env::args_os()
        .skip(1)
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    let invocation = match parse_bhyve_args(&args) {
        Ok(i) => i,
        Err(e) => {
            eprint!("{}", e.render("bhyve"));
            std::process::exit(e.status);
        }
    };
    let mut out = std::io::stdout();
    let mut err = std::io::stderr();
    let status = match invocation.write_output("bhyve", &mut out, &mut err) {
        Ok(Some(status)) => status,
        Ok(None) => rhyve_vmm::run(
            &invocation.tree,
            &invocation.fw_cfg_files,
            invocation.restore_file.as_deref().map(std::path::Path::new),
        ),
        Err(e) => {
            eprintln!("bhyve: {e}");
            rhyve_config::EXIT_ERROR
        }
    };
    std::process::exit(status);
}
