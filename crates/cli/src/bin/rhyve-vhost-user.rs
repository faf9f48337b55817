//! `rhyve-vhost-user --socket PATH DEVICE`: serve one of rhyve's virtio
//! devices (DEVICE is a `-s` device string without the slot) to a
//! vhost-user front end such as QEMU, Cloud Hypervisor or user-mode-linux.

fn main() {
    rhyve_cli::init_logging("rhyve-vhost-user");
    let args: Vec<String> = std::env::args().skip(1).collect();
    std::process::exit(rhyve_virtio::vhost_user::main_with_args(&args));
}
