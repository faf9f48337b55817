//! CPUID as bhyve presents it: the hypervisor leaf reads "bhyve bhyve ",
//! and `-c cpus,sockets,cores,threads` shows in leaves 1 and 0xB; `-x`
//! turns the x2APIC feature bit on.

use rhyve_guests::run_guest;
use std::path::Path;

fn cpuid(extra: &[&str], tag: &str) -> rhyve_guests::RunResult {
    run_guest(
        Path::new(env!("CARGO_BIN_EXE_bhyve")),
        "cpuid",
        "",
        extra,
        tag,
    )
}

#[test]
fn hypervisor_signature_and_topology() {
    let r = cpuid(&["-c", "cpus=4,sockets=1,cores=2,threads=2"], "cpuidtopo");
    r.assert_code(1);
    r.assert_line("cpuid hypervisor 'bhyve bhyve ' max 0x40000001");
    r.assert_line("cpuid leaf1 apic 0 logical 4 x2apic 0");
    r.assert_line("cpuid leafb 0 shift 1 count 2 type 1");
    r.assert_line("cpuid leafb 1 shift 2 count 4 type 2");
}

#[test]
fn dash_x_shows_x2apic() {
    let r = cpuid(&["-x"], "cpuidx2apic");
    r.assert_code(1);
    r.assert_line("cpuid leaf1 apic 0 logical 1 x2apic 1");
}
