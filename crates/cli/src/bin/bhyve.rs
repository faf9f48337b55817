//! `bhyve`: run a virtual machine, as bhyve(8) does.

use rhyve_config::parse_bhyve_args;

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("RHYVE_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .without_time()
        .init();
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
        Ok(None) => rhyve_vmm::run(&invocation.tree),
        Err(e) => {
            eprintln!("bhyve: {e}");
            rhyve_config::EXIT_ERROR
        }
    };
    std::process::exit(status);
}
