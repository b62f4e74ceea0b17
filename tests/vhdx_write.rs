//! Writing VHDX: a writable open replays a dirty log onto the file and clears it; files we
//! create are laid out as Hyper-V lays them out; sector writes are crash-safe through the log.
//! Oracles: qemu-img (fixed and dynamic, 512-byte sectors) and libvhdi (differencing).

mod common;

use std::path::Path;

use common::fixtures::vhdx_fixture;
use common::oracles::qemu_img_check_vhdx;
use vhd_merge::io::{FileStorage, Storage};
use vhd_merge::vhdx::Vhdx;

/// SHA-256 of the file's own view (the whole virtual disk of a fixed or dynamic VHDX).
fn own_sha256<S: Storage>(v: &Vhdx<S>) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 4 << 20];
    let mut at = 0;
    while at < v.virtual_size() {
        let n = (v.virtual_size() - at).min(buf.len() as u64) as usize;
        v.read_own(at, &mut buf[..n]).expect("read");
        h.update(&buf[..n]);
        at += n as u64;
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

fn open_ro(path: &Path) -> Vhdx<FileStorage> {
    Vhdx::open_path(path, false).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[test]
fn a_writable_open_replays_the_log_onto_the_file_and_clears_it() {
    let mut seen = 0;
    for (rel, sha) in [
        (
            "discutils/vhdx-log-replay.vhdx",
            "3ba3b309425b7ff5e8e0199edceed95226250f880c53b24e8eae93865f3fad5e",
        ),
        (
            "qemu-iotests/iotest-dirtylog-10G-4M.vhdx",
            "179cefe8b0587f123393eedf2aa7aa8d25798591178e6bc3950a09762f38f96f",
        ),
    ] {
        let Some((src, _)) = vhdx_fixture(rel) else {
            continue;
        };
        let dir = tempfile::tempdir().unwrap();
        let copy = dir.path().join("dirty.vhdx");
        std::fs::copy(&src, &copy).unwrap();
        let before = open_ro(&copy);
        assert!(!before.reader().header.header.log_guid.is_nil(), "{rel}");
        let guid = before.data_write_guid();
        drop(before);
        let w = Vhdx::open_path(&copy, true).unwrap_or_else(|e| panic!("{rel}: {e}"));
        assert!(w.reader().header.header.log_guid.is_nil(), "{rel}: cleared");
        drop(w);
        let r = open_ro(&copy);
        assert!(r.reader().header.header.log_guid.is_nil(), "{rel}: on disk");
        assert_eq!(r.reader().replayed_entries(), 0, "{rel}: nothing left");
        assert_eq!(r.data_write_guid(), guid, "{rel}: the replay keeps the identity");
        assert_eq!(own_sha256(&r), sha, "{rel}");
        if let Some(res) = qemu_img_check_vhdx(&copy) {
            res.unwrap_or_else(|e| panic!("{rel}: qemu-img check: {e}"));
        }
        seen += 1;
    }
    assert!(seen >= 1, "the DiscUtils file is in the repository");
}
