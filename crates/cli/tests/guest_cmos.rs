//! The RTC/CMOS as bhyve fills it, read by our `cmos` guest
//! (crates/guests/guest/cmos.c): the memory-size cells bhyve's UEFI reads
//! and the wall clock.

use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use rhyve_guests::{run_guest, RunResult};

fn cmos(mem: &str, tag: &str) -> RunResult {
    let run = run_guest(
        Path::new(env!("CARGO_BIN_EXE_bhyve")),
        "cmos",
        "",
        &["-u", "-m", mem],
        tag,
    );
    run.assert_no_failure();
    run.assert_code(1);
    run
}

/// bhyve's rtc.c: 0x34/0x35 = (lowmem - 16 MiB) / 64 KiB, 0x5B-0x5D =
/// highmem / 64 KiB, with lowmem capped at 3 GiB.
fn expected_cells(mem: u64) -> (String, String) {
    let lowmem = mem.min(3 << 30);
    let highmem = mem - lowmem;
    (
        format!("cmos lowmem 0x{:04x}", (lowmem - (16 << 20)) >> 16),
        format!("cmos highmem 0x{:06x}", highmem >> 16),
    )
}

#[test]
fn memory_cells_512m() {
    let run = cmos("512M", "cmos512m");
    let (low, high) = expected_cells(512 << 20);
    run.assert_line(&low);
    run.assert_line(&high);
}

#[test]
fn memory_cells_5g_split_at_3g() {
    let run = cmos("5G", "cmos5g");
    let (low, high) = expected_cells(5 << 30);
    assert_eq!(low, "cmos lowmem 0xbf00");
    assert_eq!(high, "cmos highmem 0x008000");
    run.assert_line(&low);
    run.assert_line(&high);
}

/// Days since 1970-01-01 of a proleptic Gregorian date.
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146097 + doe - 719468
}

/// "rtc YYYY-MM-DD HH:MM:SS" as seconds since the epoch.
fn parse_rtc_line(line: &str) -> i64 {
    let s = line.strip_prefix("rtc ").expect("rtc line");
    let (date, time) = s.split_once(' ').expect("date and time");
    let d: Vec<i64> = date.split('-').map(|x| x.parse().unwrap()).collect();
    let t: Vec<i64> = time.split(':').map(|x| x.parse().unwrap()).collect();
    assert_eq!((d.len(), t.len()), (3, 3), "bad rtc line {line:?}");
    days_from_civil(d[0], d[1], d[2]) * 86400 + t[0] * 3600 + t[1] * 60 + t[2]
}

#[test]
fn rtc_date_parsing() {
    assert_eq!(parse_rtc_line("rtc 1970-01-01 00:00:00"), 0);
    assert_eq!(parse_rtc_line("rtc 2000-03-01 00:00:01"), 951868801);
    assert_eq!(parse_rtc_line("rtc 2026-11-22 02:02:00"), 1795312920);
}

#[test]
fn clock_is_the_hosts_utc_time_with_dash_u() {
    let before = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let run = cmos("256M", "cmosclock");
    let after = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let lines = run.lines_starting("rtc ");
    assert_eq!(lines.len(), 1, "{}", run.describe());
    let guest = parse_rtc_line(lines[0]);
    assert!(
        guest >= before - 2 && guest <= after + 2,
        "guest clock {guest} outside the host's [{before}, {after}] +-2 s\n{}",
        run.describe()
    );
}
