//! Prints where a guest program was built, for scripts:
//! `rhyve-guest-path linux-init` (the full Linux boot's `/init`) or
//! `rhyve-guest-path NAME` (a PVH guest program from `guest/NAME.c`).

use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [name] = args.as_slice() else {
        eprintln!("usage: rhyve-guest-path linux-init|GUEST");
        return ExitCode::from(64);
    };
    if name == "linux-init" {
        println!("{}", rhyve_guests::linux_init_path().display());
    } else if rhyve_guests::GUESTS.contains(&name.as_str()) {
        println!("{}", rhyve_guests::guest_path(name).display());
    } else {
        eprintln!(
            "rhyve-guest-path: no guest named {name:?} (have linux-init, {})",
            rhyve_guests::GUESTS.join(", ")
        );
        return ExitCode::from(64);
    }
    ExitCode::SUCCESS
}
