//! Each virtio device model's own state through a snapshot: saved, carried
//! as JSON, restored into a device built from the same configuration; and
//! refused when this process's configuration differs (disk size, ports).

use rhyve_config::ConfigTree;
use rhyve_platform::snapshot::DeviceState;
use rhyve_virtio::{device_from_config, VirtioDevice};

fn device(slot: u8, keys: &[(&str, &str)]) -> Box<dyn VirtioDevice> {
    let mut t = ConfigTree::new();
    let node = format!("pci.0.{slot}.0");
    for (k, v) in keys {
        t.set(&format!("{node}.{k}"), *v).unwrap();
    }
    device_from_config(&t, &node, "vm", slot, 0).unwrap()
}

fn through_json(state: DeviceState) -> DeviceState {
    serde_json::from_str(&serde_json::to_string(&state).unwrap()).unwrap()
}

fn scratch(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("rhyve-snapstate-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn rnd_round_trips() {
    let mut a = device(5, &[("device", "virtio-rnd")]);
    a.ack_features(a.features());
    let saved = through_json(a.save_state().unwrap());
    let mut b = device(5, &[("device", "virtio-rnd")]);
    b.restore_state(&saved).unwrap();
    assert_eq!(b.save_state().unwrap(), a.save_state().unwrap());
}

#[test]
fn blk_round_trips_and_refuses_another_disk_size() {
    let dir = scratch("blk");
    let (small, big) = (dir.join("a.img"), dir.join("b.img"));
    std::fs::write(&small, vec![0u8; 1 << 20]).unwrap();
    std::fs::write(&big, vec![0u8; 2 << 20]).unwrap();
    let blk = |p: &std::path::Path| {
        device(
            4,
            &[("device", "virtio-blk"), ("path", p.to_str().unwrap())],
        )
    };
    let mut a = blk(&small);
    a.ack_features(a.features());
    let saved = through_json(a.save_state().unwrap());
    let mut b = blk(&small);
    b.restore_state(&saved).unwrap();
    assert_eq!(b.save_state().unwrap(), a.save_state().unwrap());
    let e = blk(&big).restore_state(&saved).unwrap_err().to_string();
    assert!(
        e.contains("disk size in sectors is 2048") && e.contains("4096"),
        "{e}"
    );
    // Another device's state is refused by kind.
    let rnd = device(5, &[("device", "virtio-rnd")]).save_state().unwrap();
    assert!(blk(&small).restore_state(&rnd).is_err());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn console_round_trips_and_refuses_other_ports() {
    let dir = scratch("console");
    let sock = dir.join("p.sock");
    let console = |name: &str, path: &std::path::Path| {
        device(
            7,
            &[
                ("device", "virtio-console"),
                ("port.0.name", name),
                ("port.0.path", path.to_str().unwrap()),
            ],
        )
    };
    let mut a = console("port1", &sock);
    a.ack_features(a.features());
    let saved = through_json(a.save_state().unwrap());
    drop(a);
    let mut b = console("port1", &sock);
    b.restore_state(&saved).unwrap();
    assert_eq!(b.save_state().unwrap(), saved);
    drop(b);
    let e = console("other", &sock)
        .restore_state(&saved)
        .unwrap_err()
        .to_string();
    assert!(e.contains("ports"), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
}
