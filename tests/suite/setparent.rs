//! set-parent: re-pointing children at moved, renamed and replaced parents, checked with our
//! own chain and with libvhdi.

use crate::common;

use std::path::{Path, PathBuf};

use common::craft::{ChildSpec, craft_child};
use common::{Rng, fast_tempdir, read_own, read_view};
use common::{fixtures, oracles};
use vhd_merge::create::{CreateOptions, create_differencing, create_dynamic};
use vhd_merge::format::PlatformCode;
use vhd_merge::{Chain, ChainOptions, OpenOptions, ReturnCode, SetParentOptions, Vhd, set_parent};

const MIB: u64 = 1 << 20;

/// Write random data in 4 KiB-aligned pieces (libvhdi misreads partly set bitmap bytes).
fn scribble(v: &mut Vhd, rng: &mut Rng, pieces: usize) {
    let pages = v.virtual_size() / 4096;
    for _ in 0..pieces {
        let p = rng.below(pages);
        let n = (1 + rng.below(64)).min(pages - p);
        let mut d = vec![0u8; (n * 4096) as usize];
        rng.fill(&mut d);
        v.write_at(p * 4096, &d).unwrap();
    }
}

/// A dynamic base and a differencing child (2 MiB blocks), both with data.
fn pair(dir: &Path, seed: u64) -> (PathBuf, PathBuf) {
    pair_in(dir, dir, seed)
}

/// Like [`pair`], the base in `base_dir`.
fn pair_in(base_dir: &Path, dir: &Path, seed: u64) -> (PathBuf, PathBuf) {
    let mut rng = Rng::new(seed);
    let base = base_dir.join("base.vhd");
    let mut b = create_dynamic(&base, 8 * MIB, &CreateOptions::default()).unwrap();
    scribble(&mut b, &mut rng, 12);
    drop(b);
    let child = dir.join("child.vhd");
    let mut c = create_differencing(&child, &base, &CreateOptions::default()).unwrap();
    scribble(&mut c, &mut rng, 12);
    drop(c);
    (base, child)
}

#[test]
fn moved_and_renamed_parent_keeps_the_view() {
    let dir = fast_tempdir();
    let (base, child) = pair(dir.path(), 1);
    let before = read_view(&child);
    let own_before = read_own(&child);
    let len_before = std::fs::metadata(&child).unwrap().len();

    let store = dir.path().join("store").join("deeper");
    std::fs::create_dir_all(&store).unwrap();
    let moved = store.join("renamed base.vhd");
    std::fs::rename(&base, &moved).unwrap();
    let e = Chain::open(&child, &ChainOptions::default()).unwrap_err();
    assert_eq!(e.return_code(), ReturnCode::FileNotFound);

    let r = set_parent(&child, &moved, &SetParentOptions::default()).unwrap();
    assert!(!r.id_changed);
    assert_eq!(r.parent_id, r.old_parent_id);
    assert_eq!(r.parent_name, "renamed base.vhd");
    assert_eq!(r.old_parent_name, "base.vhd");
    // create_differencing reserved room, so every locator was rewritten in place.
    assert!(r.locators.iter().all(|l| l.reused), "{:?}", r.locators);
    assert!(
        r.locators
            .iter()
            .any(|l| l.platform_code == PlatformCode::W2ru
                && l.text == ".\\store\\deeper\\renamed base.vhd")
    );
    // Fresh space for the first header, then back home: the file grows once, by a few KiB.
    let grown = std::fs::metadata(&child).unwrap().len() - len_before;
    assert!(grown <= 3 * 4096 + 512, "{grown}");
    assert_eq!(
        r.parent_timestamp,
        vhd_merge::create::parent_timestamp(&moved).unwrap()
    );

    let chain = Chain::open(&child, &ChainOptions::default()).unwrap();
    assert_eq!(chain.layers()[1].found_by, "W2ru");
    assert!(
        chain.layers()[1].warnings.is_empty(),
        "{:?}",
        chain.layers()[1].warnings
    );
    assert!(
        chain.vhd(0).unwrap().warnings().is_empty(),
        "{:?}",
        chain.vhd(0).unwrap().warnings()
    );
    drop(chain);
    assert!(read_view(&child) == before, "the view changed");
    assert!(
        read_own(&child) == own_before,
        "the child's own data changed"
    );
    // The header name alone also finds it now.
    let h = Vhd::open(&child, OpenOptions::read_only()).unwrap();
    assert_eq!(h.header().unwrap().parent_name(), "renamed base.vhd");
    drop(h);

    if let Some(got) = oracles::libvhdi_read_chain(&[&child, &moved]) {
        assert!(
            got == before,
            "libvhdi reads a different view after set-parent"
        );
    }
}

#[test]
fn id_mismatch_is_refused_unless_forced() {
    let dir = fast_tempdir();
    let (_base, child) = pair(dir.path(), 2);
    let other = dir.path().join("other.vhd");
    let mut o = create_dynamic(&other, 8 * MIB, &CreateOptions::default()).unwrap();
    scribble(&mut o, &mut Rng::new(77), 10);
    let other_id = o.unique_id();
    drop(o);
    let bytes = std::fs::read(&child).unwrap();
    let old_id = Vhd::open(&child, OpenOptions::read_only())
        .unwrap()
        .parent_unique_id()
        .unwrap();

    let e = set_parent(&child, &other, &SetParentOptions::default()).unwrap_err();
    assert_eq!(e.return_code(), ReturnCode::InvalidParameter);
    let msg = e.to_string();
    assert!(
        msg.contains(&old_id.to_string()) && msg.contains(&other_id.to_string()),
        "{msg}"
    );
    assert!(
        std::fs::read(&child).unwrap() == bytes,
        "a refused set-parent wrote"
    );

    let r = set_parent(&child, &other, &SetParentOptions::default().force(true)).unwrap();
    assert!(r.id_changed);
    assert_eq!(r.parent_id, other_id);
    assert!(r.locators.iter().all(|l| l.reused));
    let chain = Chain::open(&child, &ChainOptions::default()).unwrap();
    assert_eq!(chain.vhd(1).unwrap().path(), other);
    assert_eq!(chain.vhd(0).unwrap().parent_unique_id(), Some(other_id));
    let mut ours = vec![0u8; 8 * MIB as usize];
    chain.read_at(0, 0, &mut ours).unwrap();
    // The child's own sectors over the new parent's content.
    let own_c = read_own(&child);
    let own_o = read_own(&other);
    let bm = Vhd::open(&child, OpenOptions::read_only()).unwrap();
    for s in 0..(8 * MIB / 512) as usize {
        let held = match bm.block_map(s as u64 / 4096).unwrap() {
            vhd_merge::BlockMap::Present {
                bitmap: Some(b), ..
            } => b.get(s % 4096),
            _ => false,
        };
        let want = if held { &own_c } else { &own_o };
        assert!(
            ours[s * 512..s * 512 + 512] == want[s * 512..s * 512 + 512],
            "sector {s}"
        );
    }
    if let Some(got) = oracles::libvhdi_read_chain(&[&child, &other]) {
        assert!(
            got == ours,
            "libvhdi and the crate disagree after a forced set-parent"
        );
    }
}

#[test]
fn repeated_set_parent_reuses_space() {
    let dir = fast_tempdir();
    let (base, child) = pair(dir.path(), 3);
    let before = read_view(&child);
    let copy = dir.path().join("copy.vhd");
    std::fs::copy(&base, &copy).unwrap();
    let len0 = std::fs::metadata(&child).unwrap().len();
    set_parent(&child, &base, &SetParentOptions::default()).unwrap();
    let len = std::fs::metadata(&child).unwrap().len();
    assert!(len - len0 <= 3 * 4096 + 512);
    for target in [&copy, &base, &copy, &base] {
        set_parent(&child, target, &SetParentOptions::default()).unwrap();
        assert_eq!(std::fs::metadata(&child).unwrap().len(), len);
        assert_eq!(
            Chain::open(&child, &ChainOptions::default())
                .unwrap()
                .vhd(1)
                .unwrap()
                .path(),
            target.as_path()
        );
    }
    assert!(read_view(&child) == before);
}

#[test]
fn long_paths_get_new_space_clear_of_blocks() {
    let dir = fast_tempdir();
    let base = dir.path().join("b.vhd");
    let mut b = create_dynamic(&base, 8 * MIB, &CreateOptions::default()).unwrap();
    scribble(&mut b, &mut Rng::new(5), 8);
    drop(b);
    // A child whose locators have exactly one sector each (as DiscUtils writes).
    let child = dir.path().join("c.vhd");
    let mut c = craft_child(
        &child,
        &ChildSpec::of(&base)
            .name("b.vhd")
            .loc(PlatformCode::W2ru, ".\\b.vhd")
            .loc(PlatformCode::W2ku, "C:\\b.vhd"),
    );
    scribble(&mut c, &mut Rng::new(6), 4);
    drop(c);
    let before = read_view(&child);
    // A parent path longer than a sector in UTF-16.
    let mut deep = dir.path().to_path_buf();
    for i in 0..6 {
        deep.push(format!(
            "a-rather-long-directory-name-number-{i}-xxxxxxxxxxxxxxxxxxxx"
        ));
    }
    std::fs::create_dir_all(&deep).unwrap();
    let moved = deep.join("b.vhd");
    std::fs::rename(&base, &moved).unwrap();
    let r = set_parent(&child, &moved, &SetParentOptions::default()).unwrap();
    let w2ku = r
        .locators
        .iter()
        .find(|l| l.platform_code == PlatformCode::W2ku)
        .unwrap();
    assert!(!w2ku.reused, "{r:?}");
    assert!(read_view(&child) == before);

    // New blocks allocated afterwards go after the new locator data, never over it.
    let mut c = Vhd::open(&child, OpenOptions::writable()).unwrap();
    let locs = c.header().unwrap().locators;
    let mut d = vec![0x5Au8; 4 * MIB as usize];
    c.write_at(4 * MIB, &d).unwrap();
    for l in locs.iter().filter(|l| !l.is_empty()) {
        let mut payload = vec![0u8; l.data_length as usize];
        c.read_raw(l.data_offset, &mut payload).unwrap();
        let text = l.platform_code.decode_payload(&payload).unwrap();
        assert!(text.ends_with("b.vhd"), "{text}");
        assert!(c.is_metadata_space(l.data_offset, l.extent_len()), "{l:?}");
    }
    drop(c);
    let chain = Chain::open(&child, &ChainOptions::default()).unwrap();
    let mut got = vec![0u8; 4 * MIB as usize];
    chain.read_at(0, 4 * MIB, &mut got).unwrap();
    d.truncate(got.len());
    assert!(got == d);
}

#[test]
fn refusals() {
    let dir = fast_tempdir();
    let (base, child) = pair(dir.path(), 4);
    // A dynamic disk has no parent to set.
    let e = set_parent(&base, &child, &SetParentOptions::default()).unwrap_err();
    assert_eq!(e.return_code(), ReturnCode::InvalidParameter);
    assert!(e.to_string().contains("not a differencing one"), "{e}");
    // Itself.
    let e = set_parent(&child, &child, &SetParentOptions::default()).unwrap_err();
    assert!(e.to_string().contains("same disk"), "{e}");
    // Its own descendant: a cycle.
    let grandchild = dir.path().join("gc.vhd");
    drop(create_differencing(&grandchild, &child, &CreateOptions::default()).unwrap());
    let bytes = std::fs::read(&child).unwrap();
    let e = set_parent(
        &child,
        &grandchild,
        &SetParentOptions::default().force(true),
    )
    .unwrap_err();
    assert!(e.to_string().contains("cycle"), "{e}");
    assert!(std::fs::read(&child).unwrap() == bytes);
    // A parent that does not exist.
    let e = set_parent(
        &child,
        dir.path().join("nope.vhd"),
        &SetParentOptions::default(),
    )
    .unwrap_err();
    assert_eq!(e.return_code(), ReturnCode::FileNotFound);
}

#[test]
fn real_windows_child_can_be_repointed() {
    let dir = fast_tempdir();
    let (Some(child), Some(parent)) = (
        fixtures::fixture_copy("go-vhd/win8-child.vhd", dir.path()),
        fixtures::fixture_copy("go-vhd/win8.vhd", dir.path()),
    ) else {
        return;
    };
    let sub = dir.path().join("parents");
    std::fs::create_dir(&sub).unwrap();
    let moved = sub.join("win8.vhd");
    std::fs::rename(&parent, &moved).unwrap();
    let r = set_parent(&child, &moved, &SetParentOptions::default()).unwrap();
    assert_eq!(r.old_parent_name, "C:\\Users\\sergi\\Downloads\\win8.vhd");
    let chain = Chain::open(&child, &ChainOptions::default()).unwrap();
    assert_eq!(chain.vhd(1).unwrap().path(), moved);
    if let Some(got) = oracles::libvhdi_read_chain(&[&child, &moved]) {
        assert_eq!(got.len() as u64, chain.vhd(0).unwrap().virtual_size());
        assert!(got.iter().all(|&b| b == 0));
    }
}

#[cfg(feature = "cli")]
#[test]
fn cli_set_parent() {
    let dir = fast_tempdir();
    let (base, child) = pair(dir.path(), 8);
    let moved = dir.path().join("moved.vhd");
    std::fs::rename(&base, &moved).unwrap();
    let exe = env!("CARGO_BIN_EXE_vhd-merge");
    let out = std::process::Command::new(exe)
        .arg("set-parent")
        .arg(&child)
        .arg(&moved)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("parent set to") && text.contains("(unchanged)"),
        "{text}"
    );
    let other = dir.path().join("other.vhd");
    drop(create_dynamic(&other, 8 * MIB, &CreateOptions::default()).unwrap());
    let out = std::process::Command::new(exe)
        .arg("set-parent")
        .arg(&child)
        .arg(&other)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.starts_with("error 32773 (Invalid parameter):"), "{err}");
}

/// A crash at any write of set-parent (whole or torn) leaves a child that opens strictly,
/// still holds its own data, and resolves to a parent with the right content: the old one
/// until the header is written, the new one after. Running set-parent again finishes.
#[test]
fn crash_at_every_write_leaves_a_usable_child() {
    use std::sync::Arc;
    use vhd_merge::io::{FaultPlan, FaultyStorage, FileStorage};
    use vhd_merge::set_parent_on;

    fn open_faulty(path: &Path, plan: Arc<FaultPlan>) -> Vhd {
        let f = std::fs::File::options()
            .read(true)
            .write(true)
            .open(path)
            .unwrap();
        Vhd::from_storage(
            Box::new(FaultyStorage::new(Box::new(FileStorage::new(f)), plan)),
            path,
            OpenOptions::writable(),
        )
        .unwrap()
    }

    for force in [false, true] {
        let dir = fast_tempdir();
        // The base away from the child, so that only the locators lead to it (not the header
        // name in the child's directory): overwriting them too early would lose it.
        let bases = dir.path().join("bases");
        std::fs::create_dir(&bases).unwrap();
        let (base, child) = pair_in(&bases, dir.path(), 10 + u64::from(force));
        let sub = dir.path().join("sub");
        std::fs::create_dir(&sub).unwrap();
        let target = if force {
            // Another disk with other content.
            let o = sub.join("other.vhd");
            let mut v = create_dynamic(&o, 8 * MIB, &CreateOptions::default()).unwrap();
            scribble(&mut v, &mut Rng::new(99), 10);
            o
        } else {
            // The same disk (same unique id and content) in another place.
            let c = sub.join("base-copy.vhd");
            std::fs::copy(&base, &c).unwrap();
            c
        };
        let opts = SetParentOptions::default().force(force);
        let pristine = std::fs::read(&child).unwrap();
        let view_before = read_view(&child);
        let own_before = read_own(&child);
        let old_id = Vhd::open(&child, OpenOptions::read_only())
            .unwrap()
            .parent_unique_id()
            .unwrap();

        // A clean run: count its writes and record the view after.
        let counter = FaultPlan::new();
        let mut v = open_faulty(&child, counter.clone());
        let r = set_parent_on(&mut v, &target, &opts).unwrap();
        drop(v);
        let writes = counter.writes();
        assert!(writes >= 3, "{writes}");
        let view_after = read_view(&child);
        assert_eq!(force, view_after != view_before);
        let new_id = r.parent_id;

        for torn in [false, true] {
            for n in 1..=writes {
                std::fs::write(&child, &pristine).unwrap();
                let mut v = open_faulty(&child, FaultPlan::crash_at_write(n, torn));
                assert!(set_parent_on(&mut v, &target, &opts).is_err());
                drop(v);
                let strict = Vhd::open(&child, OpenOptions::read_only());
                if torn && strict.as_ref().is_err_and(|e| e.is_checksum()) {
                    // A torn 1024-byte header write. The design assumes such a write is not
                    // torn (one 4 KiB page and physical sector); if a 512-byte half does land,
                    // the header checksum catches it and a lenient re-run repairs it.
                    let lenient = opts.clone().lenient(true);
                    set_parent(&child, &target, &lenient).unwrap();
                    assert!(read_view(&child) == view_after);
                    continue;
                }
                let v =
                    strict.unwrap_or_else(|e| panic!("force {force} torn {torn} write {n}: {e}"));
                let id = v.parent_unique_id().unwrap();
                drop(v);
                assert!(
                    read_own(&child) == own_before,
                    "write {n}: own data changed"
                );
                let chain = Chain::open(&child, &ChainOptions::default())
                    .unwrap_or_else(|e| panic!("force {force} torn {torn} write {n}: {e}"));
                let mut got = vec![0u8; 8 * MIB as usize];
                chain.read_at(0, 0, &mut got).unwrap();
                if id == old_id {
                    assert!(got == view_before, "force {force} torn {torn} write {n}");
                } else {
                    assert_eq!(id, new_id);
                    assert_eq!(chain.vhd(1).unwrap().path(), target.as_path());
                    assert!(got == view_after, "force {force} torn {torn} write {n}");
                }
                drop(chain);
                set_parent(&child, &target, &opts).unwrap();
                let chain = Chain::open(&child, &ChainOptions::default()).unwrap();
                assert_eq!(chain.vhd(1).unwrap().path(), target.as_path());
            }
        }
    }
}

/// A VHDX base (1 MiB blocks) and a differencing child, both with data, in `dir`.
fn vhdx_pair(dir: &Path, seed: u64) -> (PathBuf, PathBuf) {
    use vhd_merge::vhdx::create as vx;
    let mut rng = Rng::new(seed);
    let opts = vx::CreateOptions::default().block_size(Some(MIB as u32));
    let (base, child) = (dir.join("base.vhdx"), dir.join("child.avhdx"));
    let mut data = vec![0u8; 3 * MIB as usize];
    rng.fill(&mut data);
    let mut b = vx::create_dynamic(&base, 8 * MIB, &opts).unwrap();
    b.write_at(MIB, &data).unwrap();
    b.finish().unwrap();
    drop(b);
    let mut c = vx::create_differencing(&child, &base, &opts).unwrap();
    c.write_at(2 * MIB + 512, &data[..4096]).unwrap();
    c.finish().unwrap();
    (base, child)
}

/// set-parent on a VHDX child (Set-VHD -ParentPath): a moved and renamed parent is found
/// again with the same view and the child's DataWriteGuid unchanged; a different disk is
/// refused unless forced; a VHD is never a VHDX's parent.
#[test]
fn set_parent_repoints_a_vhdx_child_at_its_moved_parent() {
    let dir = fast_tempdir();
    let (base, child) = vhdx_pair(dir.path(), 41);
    let view = read_view(&child);
    let id = Chain::open(&child, &ChainOptions::default())
        .unwrap()
        .layer(0)
        .unwrap()
        .id();
    std::fs::create_dir(dir.path().join("moved")).unwrap();
    let moved = dir.path().join("moved").join("Renamed Base.vhdx");
    std::fs::rename(&base, &moved).unwrap();
    let e = Chain::open(&child, &ChainOptions::default()).unwrap_err();
    assert_eq!(e.return_code(), ReturnCode::FileNotFound, "{e}");

    let r = set_parent(&child, &moved, &SetParentOptions::default()).unwrap();
    assert!(!r.id_changed);
    let rel = r
        .locator_keys
        .iter()
        .find(|(k, _)| k == "relative_path")
        .unwrap();
    assert_eq!(rel.1, r".\moved\Renamed Base.vhdx");
    assert_eq!(read_view(&child), view);
    let chain = Chain::open(&child, &ChainOptions::default()).unwrap();
    assert_eq!(
        chain.layer(0).unwrap().id(),
        id,
        "a link change is no data change"
    );
    drop(chain);

    let (other, _) = vhdx_pair(&dir.path().join("moved"), 42);
    let e = set_parent(&child, &other, &SetParentOptions::default()).unwrap_err();
    assert_eq!(e.return_code(), ReturnCode::InvalidParameter, "{e}");
    assert!(e.to_string().contains("DataWriteGuid"), "{e}");
    let forced = SetParentOptions::default().force(true);
    assert!(set_parent(&child, &other, &forced).unwrap().id_changed);

    let vhd = dir.path().join("base.vhd");
    create_dynamic(&vhd, 8 * MIB, &CreateOptions::default()).unwrap();
    let e = set_parent(&child, &vhd, &forced).unwrap_err();
    assert!(e.to_string().contains("one format"), "{e}");
}
