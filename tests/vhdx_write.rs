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
        assert_eq!(
            r.data_write_guid(),
            guid,
            "{rel}: the replay keeps the identity"
        );
        assert_eq!(own_sha256(&r), sha, "{rel}");
        if let Some(res) = qemu_img_check_vhdx(&copy) {
            res.unwrap_or_else(|e| panic!("{rel}: qemu-img check: {e}"));
        }
        seen += 1;
    }
    assert!(seen >= 1, "the DiscUtils file is in the repository");
}

// ---------------------------------------------------------------------------------------------
// Creating.

use uuid::Uuid;
use vhd_merge::vhdx::BlockState;
use vhd_merge::vhdx::create::{CreateOptions, create_differencing, create_dynamic, create_fixed};
use vhd_merge::vhdx::format::MIB;

const M: u64 = MIB;

fn opts(block: Option<u32>, sector: u32) -> CreateOptions {
    CreateOptions {
        block_size: block,
        logical_sector_size: sector,
        force: false,
    }
}

/// The layout every file we create has: Hyper-V's.
fn assert_hyperv_layout<S: Storage>(v: &Vhdx<S>, what: &str) {
    let r = v.reader();
    let h = &r.header.header;
    assert_eq!((h.log_offset, h.log_length), (M, M as u32), "{what}: log");
    assert!(h.log_guid.is_nil(), "{what}: clean");
    assert_eq!(r.regions.metadata.file_offset, 2 * M, "{what}");
    assert_eq!(r.regions.bat.file_offset, 3 * M, "{what}");
    assert!(
        r.regions.bat.required && r.regions.metadata.required,
        "{what}"
    );
    assert_eq!(r.metadata.physical_sector_size, 4096, "{what}");
    assert!(r.creator.starts_with("vhd-merge"), "{what}");
}

#[test]
fn created_files_have_hyperv_layout_defaults_and_read_zeros() {
    let dir = tempfile::tempdir().unwrap();
    for sector in [512, 4096] {
        let d = dir.path().join(format!("d{sector}.vhdx"));
        let dynamic = create_dynamic(&d, 100 * M, &opts(None, sector)).unwrap();
        assert_hyperv_layout(&dynamic, "dynamic");
        assert_eq!(dynamic.block_size(), 32 * M, "Hyper-V's dynamic default");
        assert_eq!(dynamic.sector_size(), sector);
        assert_eq!(dynamic.block_state(0).unwrap(), BlockState::Transparent);
        assert_eq!(
            std::fs::metadata(&d).unwrap().len(),
            4 * M,
            "header, log, metadata, BAT"
        );
        let f = dir.path().join(format!("f{sector}.vhdx"));
        let fixed = create_fixed(&f, 5 * M, &opts(None, sector)).unwrap();
        assert_hyperv_layout(&fixed, "fixed");
        assert!(
            fixed
                .reader()
                .metadata
                .file_parameters
                .leave_block_allocated
        );
        assert_eq!(fixed.block_size(), 2 * M);
        assert_eq!(
            std::fs::metadata(&f).unwrap().len(),
            4 * M + 6 * M,
            "3 whole 2 MiB blocks"
        );
        assert_eq!(fixed.block_state(2).unwrap(), BlockState::Present(None));
        let mut buf = vec![1u8; 5 * M as usize];
        fixed.read_own(0, &mut buf).unwrap();
        assert!(buf.iter().all(|&b| b == 0));
        let c = dir.path().join(format!("c{sector}.avhdx"));
        let child = create_differencing(&c, &d, &CreateOptions::default()).unwrap();
        assert_hyperv_layout(&child, "differencing");
        assert_eq!(child.block_size(), 2 * M, "Hyper-V's differencing default");
        assert_eq!(child.sector_size(), sector, "the parent's sector size");
        assert_eq!(child.virtual_size(), 100 * M);
        let (pm, cm) = (&dynamic.reader().metadata, &child.reader().metadata);
        assert_eq!(
            cm.page_83, pm.page_83,
            "a child copies its parent's Page 83 id"
        );
        let pl = child.parent_locator().expect("locator");
        assert_eq!(pl.parent_linkage().unwrap(), dynamic.data_write_guid());
        assert_eq!(pl.parent_linkage2(), Some(Uuid::nil()));
        assert_eq!(
            pl.get("relative_path"),
            Some(format!(".\\d{sector}.vhdx").as_str())
        );
    }
    if let Some(res) = qemu_img_check_vhdx(&dir.path().join("d512.vhdx")) {
        res.unwrap();
        qemu_img_check_vhdx(&dir.path().join("f512.vhdx"))
            .unwrap()
            .unwrap();
    }
}

#[test]
fn create_refuses_an_existing_file_unless_forced_and_leaves_no_temporary() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("x.vhdx");
    std::fs::write(&p, b"keep me").unwrap();
    let e = create_dynamic(&p, 8 * M, &opts(None, 512)).unwrap_err();
    assert_eq!(
        e.return_code(),
        vhd_merge::ReturnCode::InvalidParameter,
        "{e}"
    );
    assert_eq!(std::fs::read(&p).unwrap(), b"keep me");
    let forced = CreateOptions {
        force: true,
        ..opts(Some(1 << 20), 512)
    };
    let v = create_dynamic(&p, 8 * M, &forced).unwrap();
    assert_eq!(v.block_size(), M);
    let names: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names.len(), 1, "no temporary file left: {names:?}");
    let e = create_dynamic(&p, 8 * M, &opts(Some(3 << 20), 512));
    assert!(e.is_err(), "a block size that is not a power of two");
}
