//! The `rhyve-vhost-user` command for this crate's own tests, until the cli
//! crate's binary of the same logic is there to use.

fn main() {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .init();
    let args: Vec<String> = std::env::args().collect();
    std::process::exit(rhyve_virtio::vhost_user::main_with_args(&args));
}
