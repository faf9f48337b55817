//! The block lists `save_env` writes through: for files of every size
//! class (direct, indirect and double-indirect blocks on ext2, extents on
//! ext4 and XFS, cluster chains on FAT), the bytes at the listed places of
//! the image are exactly the file's bytes.

mod common;

use common::*;
use rhyve_grub::{probe, Region};
use std::path::Path;

/// Files from one block to past ext2's double-indirect threshold with
/// 1 KiB blocks (12 + 256 blocks).
fn files() -> Vec<(String, Vec<u8>)> {
    [1usize, 1024, 5000, 12 * 1024 + 1, 300 * 1024]
        .iter()
        .map(|&n| (format!("d/f{n}"), pattern(&format!("f{n}"), n)))
        .collect()
}

fn check(img: &Path) {
    let region = Region::open(img).unwrap();
    let fs = probe(&region).unwrap();
    for (path, data) in files() {
        let extents = fs
            .file_extents(&path)
            .unwrap_or_else(|e| panic!("{path}: {e}"));
        let mut bytes = Vec::new();
        for (offset, len) in extents {
            bytes.extend(region.read_vec(offset, len as usize).unwrap());
        }
        assert!(
            bytes == data,
            "{} {path}: the block list is wrong",
            fs.kind()
        );
    }
    assert!(
        fs.file_extents("/d").is_err(),
        "a directory has no block list"
    );
    assert!(fs.file_extents("/nope").is_err());
}

#[test]
fn block_lists_match_file_contents() {
    need_tools();
    let dir = scratch("block-lists");
    let tree = dir.join("t");
    for (p, d) in files() {
        write(&tree.join(&p), &d);
    }
    let ext2 = dir.join("e2.img");
    sh(&format!(
        "mke2fs -q -F -t ext2 -b 1024 -d '{}' '{}' 4M",
        tree.display(),
        ext2.display()
    ));
    check(&ext2);
    let ext4 = dir.join("e4.img");
    mkext4(&ext4, &tree, 8, "e4");
    check(&ext4);
    let fat = dir.join("f.img");
    mkfat(&fat, &tree, 16, "F", 16);
    check(&fat);
    let xfs = dir.join("x.img");
    let owned = files();
    let list: Vec<(&str, Vec<u8>)> = owned.iter().map(|(p, d)| (p.as_str(), d.clone())).collect();
    mkxfs_sized(&xfs, &list, &[], "x", 16);
    check(&xfs);
}
