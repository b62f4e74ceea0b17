//! Writing VHDX: a writable open replays a dirty log onto the file and clears it; files we
//! create are laid out as Hyper-V lays them out; sector writes are crash-safe through the log.
//! Oracles: qemu-img (fixed and dynamic, 512-byte sectors) and libvhdi (differencing).

use crate::common;

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
    CreateOptions::default()
        .block_size(block)
        .logical_sector_size(sector)
        .force(false)
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
    let forced = opts(Some(1 << 20), 512).force(true);
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

// ---------------------------------------------------------------------------------------------
// Writing: a model of the own view (bytes, and for a differencing disk which sectors it
// holds), checked through a fresh read-only open.

use common::Rng;
use vhd_merge::bitmap::SectorBitmap;

/// What a file's own view must read.
#[derive(Clone, Debug)]
struct Model {
    sector: usize,
    bytes: Vec<u8>,
    /// Sectors the file holds (a differencing disk's others come from the parent).
    held: Vec<bool>,
}

impl Model {
    fn new(size: u64, sector: u32, held: bool) -> Model {
        Model {
            sector: sector as usize,
            bytes: vec![0; size as usize],
            held: vec![held; (size / u64::from(sector)) as usize],
        }
    }

    /// Apply a write of `data` at sector `at` with `mask`.
    fn write(&mut self, at: usize, data: &[u8], mask: &SectorBitmap) {
        let ss = self.sector;
        for run in mask.runs() {
            let (a, b) = (at + run.start, at + run.end);
            self.bytes[a * ss..b * ss].copy_from_slice(&data[run.start * ss..run.end * ss]);
            self.held[a..b].iter_mut().for_each(|h| *h = true);
        }
    }
}

/// The file's own view and which sectors it holds, read through a fresh read-only open.
fn read_back(path: &Path) -> (Vec<u8>, Vec<bool>) {
    let v = open_ro(path);
    let mut bytes = vec![0; v.virtual_size() as usize];
    v.read_own(0, &mut bytes).unwrap();
    let mut held = Vec::new();
    if !v.is_differencing() {
        return (
            bytes,
            vec![true; v.virtual_size() as usize / v.sector_size() as usize],
        );
    }
    for b in 0..v.block_count() {
        let n = v.sectors_in_block(b) as usize;
        match v.block_state(b).unwrap() {
            BlockState::Transparent => held.extend(std::iter::repeat_n(false, n)),
            BlockState::Zero | BlockState::Present(None) => {
                held.extend(std::iter::repeat_n(true, n))
            }
            BlockState::Present(Some(map)) => held.extend((0..n).map(|i| map.get(i))),
        }
    }
    (bytes, held)
}

fn check_model(path: &Path, m: &Model, what: &str) {
    let (bytes, held) = read_back(path);
    common::assert_same(&bytes, &m.bytes, what);
    let diff = held.iter().zip(&m.held).position(|(a, b)| a != b);
    assert!(
        diff.is_none(),
        "{what}: sector {diff:?} held or not differs"
    );
}

/// One random write: a sector range inside one block, with a random mask (every sector
/// when `full`), random data or zeros over a whole block.
/// One random masked write; returns whether it selected any sector.
fn random_write<S: Storage>(v: &mut Vhdx<S>, m: &mut Model, rng: &mut Rng) -> bool {
    let ss = v.sector_size() as usize;
    let block = rng.below(v.block_count());
    let in_block = v.sectors_in_block(block);
    let (first, count) = if rng.chance(15) {
        (0, in_block)
    } else {
        let first = rng.below(in_block);
        (first, 1 + rng.below((in_block - first).min(64)))
    };
    let mut mask = SectorBitmap::full(count as usize);
    if rng.chance(30) {
        for i in 0..count as usize {
            if rng.chance(40) {
                mask.clear_range(i..i + 1);
            }
        }
    }
    let mut data = vec![0u8; count as usize * ss];
    if !(count == in_block && rng.chance(50)) {
        rng.fill(&mut data);
    }
    v.write_sectors(block, first, &data, &mask).unwrap();
    let at = (block * v.block_size() / ss as u64 + first) as usize;
    m.write(at, &data, &mask);
    !mask.none()
}

#[derive(Clone, Copy, Debug)]
enum Kind {
    Fixed,
    Dynamic,
    Differencing,
}

/// A new file of `kind` in `dir` (a differencing one over an empty dynamic parent).
fn new_disk(
    dir: &Path,
    kind: Kind,
    size: u64,
    block: u32,
    sector: u32,
) -> (std::path::PathBuf, Model) {
    let o = opts(Some(block), sector);
    let path = dir.join("disk.vhdx");
    match kind {
        Kind::Fixed => drop(create_fixed(&path, size, &o).unwrap()),
        Kind::Dynamic => drop(create_dynamic(&path, size, &o).unwrap()),
        Kind::Differencing => {
            let parent = dir.join("parent.vhdx");
            drop(create_dynamic(&parent, size, &opts(Some(M as u32), sector)).unwrap());
            drop(create_differencing(&path, &parent, &o).unwrap());
        }
    }
    let held = !matches!(kind, Kind::Differencing);
    (path, Model::new(size, sector, held))
}

fn model_run(kind: Kind, size_sectors: u64, block_shift: u32, sector: u32, seed: u64) {
    let dir = common::fast_tempdir();
    let block = (M as u32) << block_shift;
    let size = size_sectors * u64::from(sector);
    let (path, mut m) = new_disk(dir.path(), kind, size, block, sector);
    let mut rng = Rng::new(seed);
    let what =
        format!("{kind:?} {size} bytes, {block}-byte blocks, {sector}-byte sectors, seed {seed}");
    for session in 0..3 {
        let mut v = Vhdx::open_path(&path, true).unwrap();
        let before = v.data_write_guid();
        let mut wrote = false;
        for _ in 0..1 + rng.below(3) {
            for _ in 0..1 + rng.below(6) {
                wrote |= random_write(&mut v, &mut m, &mut rng);
            }
            v.commit().unwrap();
        }
        let after = v.finish().unwrap();
        if wrote {
            assert_ne!(after, before, "{what}: a new DataWriteGuid after writing");
        } else {
            // Every mask was empty (possible on a one-sector disk): nothing changed.
            assert_eq!(
                after, before,
                "{what}: the DataWriteGuid kept when nothing was written"
            );
        }
        drop(v);
        let r = open_ro(&path);
        assert!(
            r.reader().header.header.log_guid.is_nil(),
            "{what}: clean close"
        );
        assert_eq!(r.data_write_guid(), after, "{what}");
        drop(r);
        check_model(&path, &m, &format!("{what}, session {session}"));
    }
}

#[test]
fn writes_read_back_like_the_model_basic() {
    for (kind, sector) in [
        (Kind::Dynamic, 512),
        (Kind::Differencing, 512),
        (Kind::Fixed, 4096),
        (Kind::Differencing, 4096),
    ] {
        model_run(kind, 6000, 0, sector, 7);
    }
    // A one-sector fixed disk whose every mask came out empty (a proptest case that expected
    // a new DataWriteGuid although nothing was written).
    model_run(Kind::Fixed, 1, 0, 4096, 8434343537319878855);
}

mod model {
    use super::*;
    use proptest::prelude::*;

    fn kind() -> impl Strategy<Value = Kind> {
        prop_oneof![
            Just(Kind::Fixed),
            Just(Kind::Dynamic),
            Just(Kind::Differencing)
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

        /// Random sector-granular, masked writes in several sessions and commits, into every
        /// kind, both sector sizes, block sizes 1 MiB to 256 MiB (virtual sizes up to 6 MiB
        /// keep the files small), read back through a fresh read-only open.
        #[test]
        fn random_writes_read_back_like_the_model(
            kind in kind(),
            sector in prop_oneof![Just(512u32), Just(4096u32)],
            block_shift in 0u32..=8,
            size_4k in 1u64..=1536,
            seed in any::<u64>(),
        ) {
            let size_sectors = size_4k * 4096 / u64::from(sector);
            model_run(kind, size_sectors, block_shift, sector, seed);
        }
    }
}

#[test]
fn block_states_after_writes() {
    for sector in [512u32, 4096] {
        let dir = common::fast_tempdir();
        let ss = sector as usize;
        let (path, _) = new_disk(dir.path(), Kind::Differencing, 8 * M, 2 << 20, sector);
        let mut v = Vhdx::open_path(&path, true).unwrap();
        let per_block = v.sectors_in_block(0) as usize;
        v.write_sectors(0, 3, &vec![7u8; 2 * ss], &SectorBitmap::full(2))
            .unwrap();
        v.write_sectors(
            1,
            0,
            &vec![0u8; per_block * ss],
            &SectorBitmap::full(per_block),
        )
        .unwrap();
        v.commit().unwrap();
        let mut map = SectorBitmap::new(per_block);
        map.set_range(3..5);
        assert_eq!(
            v.block_state(0).unwrap(),
            BlockState::Present(Some(map)),
            "bits set"
        );
        assert_eq!(
            v.block_state(1).unwrap(),
            BlockState::Zero,
            "whole-block zeros: ZERO"
        );
        assert_eq!(v.block_state(2).unwrap(), BlockState::Transparent);
        // A partial write into the ZERO block: zeros stay zeros, not the parent's.
        v.write_sectors(1, 1, &vec![9u8; ss], &SectorBitmap::full(1))
            .unwrap();
        v.finish().unwrap();
        drop(v);
        let r = open_ro(&path);
        assert_eq!(r.block_state(1).unwrap(), BlockState::Present(None));
        let mut buf = vec![1u8; 3 * ss];
        r.read_own(2 * M, &mut buf).unwrap();
        assert!(buf[..ss].iter().all(|&b| b == 0) && buf[ss..2 * ss].iter().all(|&b| b == 9));
        // New space is 1 MiB aligned after every object: the BAT ends at 4 MiB; block 0
        // came first, then the chunk's bitmap block, then block 1 (after the ZERO write).
        assert_eq!(r.payload_entry(0).unwrap().file_offset(), 4 * M);
        assert_eq!(r.bitmap_entry(0).unwrap().file_offset(), 6 * M);
        assert_eq!(r.payload_entry(1).unwrap().file_offset(), 7 * M);
    }
}

/// A commit that changes more BAT pages than one log entry may carry (126 with a 1 MiB log)
/// is split into entries applied one after another; the file reads right and qemu accepts it.
#[test]
fn a_commit_larger_than_one_log_entry() {
    let dir = common::fast_tempdir();
    let path = dir.path().join("big.vhdx");
    // 64 GiB of 1 MiB blocks: one BAT page per 512 blocks, 128 pages.
    let mut v = create_dynamic(&path, 64 << 30, &opts(Some(M as u32), 512)).unwrap();
    let blocks: Vec<u64> = (0..128).map(|k| k * 512 + k % 7).collect();
    for &b in &blocks {
        v.write_sectors(b, 1, &vec![b as u8 | 1; 1024], &SectorBitmap::full(2))
            .unwrap();
    }
    v.finish().unwrap();
    drop(v);
    let r = open_ro(&path);
    assert!(r.reader().header.header.log_guid.is_nil());
    for &b in &blocks {
        let mut buf = vec![0u8; 1536];
        r.read_own(b * M, &mut buf).unwrap();
        assert!(buf[..512].iter().all(|&x| x == 0), "block {b}");
        assert!(buf[512..].iter().all(|&x| x == b as u8 | 1), "block {b}");
    }
    drop(r);
    if let Some(res) = qemu_img_check_vhdx(&path) {
        res.unwrap();
    }
}

#[test]
fn a_read_only_open_refuses_writes_and_writes_nothing() {
    let dir = common::fast_tempdir();
    let path = dir.path().join("d.vhdx");
    drop(create_dynamic(&path, 8 * M, &opts(None, 512)).unwrap());
    let before = std::fs::read(&path).unwrap();
    let mut r = open_ro(&path);
    let e = r.write_at(0, &[1; 512]).unwrap_err();
    assert_eq!(e.return_code(), vhd_merge::ReturnCode::InvalidState, "{e}");
    assert!(r.commit().is_err());
    drop(r);
    // A writable open of a clean file that writes nothing changes nothing either.
    let mut w = Vhdx::open_path(&path, true).unwrap();
    w.finish().unwrap();
    drop(w);
    assert_eq!(std::fs::read(&path).unwrap(), before);
}

/// Garbage in a dynamic disk's sector bitmap entries (old qemu wrote some, §14 of
/// vhdx-format.md) owns no space: new blocks still go right after the file's end.
#[test]
fn garbage_bitmap_entries_of_a_dynamic_disk_do_not_move_new_blocks() {
    use vhd_merge::vhdx::format::bat::BatEntry;
    let dir = common::fast_tempdir();
    let path = dir.path().join("d.vhdx");
    drop(create_dynamic(&path, 5 << 30, &opts(Some(M as u32), 512)).unwrap());
    // The bitmap entry of chunk 0 sits after its 4096 payload entries.
    let garbage = BatEntry::new(6, 1 << 40);
    common::patch::patch(&path, 3 * M + 4096 * 8, &garbage.0.to_le_bytes());
    let mut v = Vhdx::open_path(&path, true).unwrap();
    v.write_at(0, &[5; 512]).unwrap();
    v.finish().unwrap();
    assert_eq!(v.payload_entry(0).unwrap().file_offset(), 4 * M);
}
