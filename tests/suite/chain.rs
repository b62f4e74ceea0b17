//! Parent resolution: every locator style, overrides, untrusted input, errors; reading through
//! chains.

use crate::common;

use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use common::craft::{ChildSpec, Loc, craft_child};
use common::fixtures::fixture_copy;
use common::os::symlink;
use common::{Rng, fast_tempdir};
use vhd_merge::create::{CreateOptions, create_differencing, create_dynamic, create_fixed};
use vhd_merge::format::{ParentLocator, PlatformCode};
use vhd_merge::{Chain, ChainOptions, Error, OpenOptions, ReturnCode, Vhd};

const MIB: u64 = 1 << 20;

/// A dynamic base with some data, returning its path.
fn base(dir: &Path, name: &str, size: u64, fill: u8) -> PathBuf {
    let p = dir.join(name);
    let opts = CreateOptions::default().block_size(512 * 1024);
    let mut v = create_dynamic(&p, size, &opts).unwrap();
    v.write_at(0, &vec![fill; 64 * 1024]).unwrap();
    v.write_at(size - 4096, &vec![fill ^ 0xFF; 4096]).unwrap();
    p
}

fn view(chain: &Chain, layer: usize) -> Vec<u8> {
    let mut buf = vec![0u8; chain.vhd(layer).unwrap().virtual_size() as usize];
    chain.read_at(layer, 0, &mut buf).unwrap();
    buf
}

fn open(path: &Path) -> vhd_merge::Result<Chain> {
    Chain::open(path, &ChainOptions::default())
}

fn parent_not_found(e: &Error) -> &[vhd_merge::ParentCandidate] {
    match e {
        Error::ParentNotFound { tried, .. } => tried,
        e => panic!("expected ParentNotFound, got {e}"),
    }
}

fn reason_for<'a>(tried: &'a [vhd_merge::ParentCandidate], path: &Path) -> &'a str {
    tried
        .iter()
        .find(|c| c.path == path)
        .map(|c| c.reason.as_str())
        .unwrap_or_else(|| panic!("{} not in the tried list: {tried:#?}", path.display()))
}

#[test]
fn whole_chain_moved_to_another_directory() {
    let root = fast_tempdir();
    let a = root.path().join("a");
    std::fs::create_dir(&a).unwrap();
    let b = base(&a, "base.vhd", 4 * MIB, 1);
    let mid = a.join("mid.vhd");
    let mut m = create_differencing(&mid, &b, &CreateOptions::default()).unwrap();
    m.write_at(MIB, &[2u8; 8192]).unwrap();
    drop(m);
    let top = a.join("top.vhd");
    let mut t = create_differencing(&top, &mid, &CreateOptions::default()).unwrap();
    t.write_at(MIB + 4096, &[3u8; 512]).unwrap();
    drop(t);
    let before = view(&open(&top).unwrap(), 0);

    let moved = root.path().join("elsewhere");
    std::fs::rename(&a, &moved).unwrap();
    let files: Vec<Vec<u8>> = ["top.vhd", "mid.vhd", "base.vhd"]
        .iter()
        .map(|n| std::fs::read(moved.join(n)).unwrap())
        .collect();
    let chain = open(&moved.join("top.vhd")).unwrap();
    assert_eq!(chain.len(), 3);
    assert_eq!(chain.layers()[1].found_by, "W2ru");
    assert_eq!(chain.layers()[2].found_by, "W2ru");
    assert_eq!(chain.vhd(2).unwrap().path(), moved.join("base.vhd"));
    assert_eq!(view(&chain, 0), before);
    drop(chain);
    // Resolving never writes.
    for (n, old) in ["top.vhd", "mid.vhd", "base.vhd"].iter().zip(files) {
        assert_eq!(std::fs::read(moved.join(n)).unwrap(), old, "{n} changed");
    }
}

#[test]
fn renamed_parent_found_through_a_search_dir() {
    let root = fast_tempdir();
    let b = base(root.path(), "base.vhd", 2 * MIB, 7);
    let child = root.path().join("child.vhd");
    drop(create_differencing(&child, &b, &CreateOptions::default()).unwrap());
    let before = view(&open(&child).unwrap(), 0);

    let store = root.path().join("store");
    std::fs::create_dir(&store).unwrap();
    // A decoy with the right name but another id, and the real parent under a new name.
    base(&store, "base.vhd", 2 * MIB, 9);
    std::fs::rename(&b, store.join("renamed-parent.bin")).unwrap();

    let e = open(&child).unwrap_err();
    assert_eq!(e.return_code(), ReturnCode::FileNotFound);

    let opts = ChainOptions::default().search_dirs(vec![store.clone()]);
    let chain = Chain::open(&child, &opts).unwrap();
    assert_eq!(chain.layers()[1].found_by, "search dir, by unique id");
    assert_eq!(
        chain.vhd(1).unwrap().path(),
        store.join("renamed-parent.bin")
    );
    assert_eq!(view(&chain, 0), before);

    // Without the scan, the decoy is tried by name and the mismatch is reported.
    let opts = opts.scan_search_dirs(false);
    let e = Chain::open(&child, &opts).unwrap_err();
    let tried = parent_not_found(&e);
    assert!(reason_for(tried, &store.join("base.vhd")).contains("unique id mismatch"));
}

#[test]
fn parent_moved_into_a_search_dir_keeps_its_name() {
    let root = fast_tempdir();
    let b = base(root.path(), "base.vhd", 2 * MIB, 7);
    let child = root.path().join("child.vhd");
    drop(create_differencing(&child, &b, &CreateOptions::default()).unwrap());
    let store = root.path().join("store");
    std::fs::create_dir(&store).unwrap();
    std::fs::rename(&b, store.join("base.vhd")).unwrap();
    let opts = ChainOptions::default().search_dirs(vec![store.clone()]);
    let chain = Chain::open(&child, &opts).unwrap();
    assert_eq!(chain.layers()[1].found_by, "search dir, header name");
}

#[test]
fn explicit_parent_overrides_and_is_checked() {
    let root = fast_tempdir();
    let b = base(root.path(), "base.vhd", 2 * MIB, 7);
    let child = root.path().join("child.vhd");
    drop(create_differencing(&child, &b, &CreateOptions::default()).unwrap());
    let other = base(root.path(), "other.vhd", 2 * MIB, 7);
    let copy = root.path().join("copy-of-base.vhd");
    std::fs::copy(&b, &copy).unwrap();
    let chain = Chain::open(&child, &ChainOptions::default().parent(Some(copy.clone()))).unwrap();
    assert_eq!(chain.layers()[1].found_by, "--parent");
    assert_eq!(chain.vhd(1).unwrap().path(), copy);
    // A wrong explicit parent is not silently replaced by what the locators say.
    let e = Chain::open(&child, &ChainOptions::default().parent(Some(other.clone()))).unwrap_err();
    let tried = parent_not_found(&e);
    assert_eq!(tried.len(), 1);
    assert!(tried[0].reason.contains("unique id mismatch"));
}

/// `C:\<path of dir>` with backslashes; on Windows the path as it is.
fn windows_path(p: &Path) -> String {
    if cfg!(windows) {
        return p.to_string_lossy().into_owned();
    }
    format!("C:{}", p.to_string_lossy().replace('/', "\\"))
}

#[cfg_attr(
    windows,
    ignore = "maps Windows paths onto a POSIX host (on Windows a locator is one path as written)"
)]
#[test]
fn windows_absolute_only_locators() {
    let root = fast_tempdir();
    let kids = root.path().join("kids");
    std::fs::create_dir(&kids).unwrap();

    // 1. Drive stripped: C:\<tempdir>\bases\p1.vhd is the real place.
    let bases = root.path().join("bases");
    std::fs::create_dir(&bases).unwrap();
    let p1 = base(&bases, "p1.vhd", 2 * MIB, 1);
    let c1 = kids.join("c1.vhd");
    craft_child(
        &c1,
        &ChildSpec::of(&p1)
            .name("nothing-here.vhd")
            .loc(PlatformCode::W2ku, &windows_path(&p1)),
    );
    let chain = open(&c1).unwrap();
    assert_eq!(chain.layers()[1].found_by, "W2ku without drive");
    assert_eq!(chain.vhd(1).unwrap().path(), p1);

    // 2. Tail relative to the child: C:\some\dir\p2.vhd found at kids/some/dir/p2.vhd.
    let sd = kids.join("some").join("dir");
    std::fs::create_dir_all(&sd).unwrap();
    let p2 = base(&sd, "p2.vhd", 2 * MIB, 2);
    let c2 = kids.join("c2.vhd");
    craft_child(
        &c2,
        &ChildSpec::of(&p2)
            .name("nothing-here.vhd")
            .loc(PlatformCode::W2ku, "C:\\some\\dir\\p2.vhd"),
    );
    let chain = open(&c2).unwrap();
    assert_eq!(chain.layers()[1].found_by, "W2ku tail in child dir");
    assert_eq!(chain.vhd(1).unwrap().path(), p2);

    // 3. File name in the child's directory.
    let p3 = base(&kids, "p3.vhd", 2 * MIB, 3);
    let c3 = kids.join("c3.vhd");
    craft_child(
        &c3,
        &ChildSpec::of(&p3)
            .name("nothing-here.vhd")
            .loc(PlatformCode::W2ku, "D:\\Hyper-V\\Disks\\p3.vhd"),
    );
    let chain = open(&c3).unwrap();
    assert_eq!(chain.layers()[1].found_by, "W2ku file name in child dir");

    // 4. The deprecated 8-bit Wi2k, same rules.
    let c4 = kids.join("c4.vhd");
    craft_child(
        &c4,
        &ChildSpec::of(&p3)
            .name("nothing-here.vhd")
            .loc(PlatformCode::Wi2k, "E:\\old\\p3.vhd"),
    );
    let chain = open(&c4).unwrap();
    assert_eq!(chain.layers()[1].found_by, "Wi2k file name in child dir");

    // 5. A POSIX path in W2ku, as VirtualBox writes on Linux.
    let c5 = kids.join("c5.vhd");
    craft_child(
        &c5,
        &ChildSpec::of(&p1).loc(PlatformCode::W2ku, &p1.to_string_lossy()),
    );
    let chain = open(&c5).unwrap();
    assert_eq!(chain.layers()[1].found_by, "W2ku");
    assert_eq!(chain.vhd(1).unwrap().path(), p1);
}

#[test]
fn header_name_only_crafted() {
    let root = fast_tempdir();
    let p = base(root.path(), "the parent.vhd", 2 * MIB, 4);
    let c = root.path().join("c.vhd");
    // Windows 10 writes the full path into the header name; only its last part is used.
    craft_child(
        &c,
        &ChildSpec::of(&p).name("C:\\VMs\\old place\\the parent.vhd"),
    );
    let chain = open(&c).unwrap();
    assert_eq!(chain.layers()[1].found_by, "header name");
    // A POSIX-style header name too.
    let c2 = root.path().join("c2.vhd");
    craft_child(&c2, &ChildSpec::of(&p).name("/srv/vm/the parent.vhd"));
    assert_eq!(open(&c2).unwrap().layers()[1].found_by, "header name");
}

#[test]
fn header_name_only_real_dfvfs_fixture() {
    let dir = fast_tempdir();
    let (Some(child), Some(parent)) = (
        fixture_copy("dfvfs/image-differential.vhd", dir.path()),
        fixture_copy("dfvfs/image.vhd", dir.path()),
    ) else {
        return;
    };
    // Its checksums are bad (hand-patched files): strict opening refuses.
    let e = open(&child).unwrap_err();
    assert_eq!(e.return_code(), ReturnCode::IncorrectDataType, "{e}");
    let opts = ChainOptions::default().lenient(true);
    let chain = Chain::open(&child, &opts).unwrap();
    assert_eq!(chain.len(), 2);
    assert_eq!(chain.layers()[1].found_by, "header name");
    assert_eq!(chain.vhd(1).unwrap().path(), parent);
    // Its one block holds every sector, with the parent's data.
    let p = Vhd::open(&parent, OpenOptions::default().lenient(true)).unwrap();
    let mut own = vec![0u8; p.virtual_size() as usize];
    p.read_own(0, &mut own).unwrap();
    assert!(own.iter().any(|&b| b != 0));
    assert_eq!(view(&chain, 0), own);
}

#[test]
fn macx_only() {
    let root = fast_tempdir();
    let d = root.path().join("my disks");
    std::fs::create_dir(&d).unwrap();
    let p = base(&d, "parent disk%.vhd", 2 * MIB, 5);
    let url = vhd_merge::locator::file_url(&p);
    assert!(url.contains("%20") && url.contains("%25"), "{url}");
    let kids = root.path().join("kids");
    std::fs::create_dir(&kids).unwrap();
    for (i, u) in [url.clone(), url.replacen("file://", "file://localhost", 1)]
        .iter()
        .enumerate()
    {
        let c = kids.join(format!("c{i}.vhd"));
        craft_child(
            &c,
            &ChildSpec::of(&p)
                .name("nothing-here.vhd")
                .loc(PlatformCode::MacX, u),
        );
        let chain = open(&c).unwrap();
        assert_eq!(chain.layers()[1].found_by, "MacX", "{u}");
        assert_eq!(chain.vhd(1).unwrap().path(), p);
    }
    // Not a URL: listed with the reason, not opened.
    let c = kids.join("bad.vhd");
    craft_child(
        &c,
        &ChildSpec::of(&p).loc(PlatformCode::MacX, "/just/a/path.vhd"),
    );
    let e = open(&c).unwrap_err();
    assert!(e.to_string().contains("not a file:// URL"), "{e}");
}

#[test]
fn relative_path_into_a_sibling_directory() {
    let root = fast_tempdir();
    let a = root.path().join("a");
    let b = root.path().join("b");
    std::fs::create_dir(&a).unwrap();
    std::fs::create_dir(&b).unwrap();
    let p = base(&b, "parent.vhd", 2 * MIB, 6);
    let c = a.join("child.vhd");
    craft_child(
        &c,
        &ChildSpec::of(&p)
            .name("nothing-here.vhd")
            .loc(PlatformCode::W2ru, "..\\b\\parent.vhd"),
    );
    let chain = open(&c).unwrap();
    assert_eq!(chain.layers()[1].found_by, "W2ru");
    assert_eq!(chain.vhd(1).unwrap().path(), p);
    // The deprecated 8-bit relative form, and `.\` inside.
    let c2 = a.join("child2.vhd");
    craft_child(
        &c2,
        &ChildSpec::of(&p).loc(PlatformCode::Wi2r, ".\\..\\b\\.\\parent.vhd"),
    );
    assert_eq!(open(&c2).unwrap().layers()[1].found_by, "Wi2r");
    // Relative to the child even when opened through a relative path from elsewhere (which
    // does not exist on Windows when the temporary directory is on another drive).
    let cwd = std::env::current_dir().unwrap();
    match vhd_merge::locator::relative_path(&cwd, &c) {
        Some(rel) => assert_eq!(open(&rel).unwrap().len(), 2),
        None if cfg!(windows) => {
            common::note("the temporary directory is on another drive: no relative open");
        }
        None => panic!("no relative path from {cwd:?} to {c:?}"),
    }
}

#[test]
fn real_windows_chain_go_vhd() {
    let dir = fast_tempdir();
    let (Some(child), Some(parent)) = (
        fixture_copy("go-vhd/win8-child.vhd", dir.path()),
        fixture_copy("go-vhd/win8.vhd", dir.path()),
    ) else {
        return;
    };
    let chain = open(&child).unwrap();
    assert_eq!(chain.len(), 2);
    assert_eq!(chain.layers()[1].found_by, "W2ru");
    assert_eq!(chain.vhd(1).unwrap().path(), parent);
    assert!(chain.layers()[1].warnings.is_empty());
    assert!(view(&chain, 0).iter().all(|&b| b == 0));
    // Moved into a subdirectory: W2ru (.\win8.vhd) and the W2ku tails fail; a search dir finds
    // it by the header name, whose full Windows path is cut to its last component.
    let sub = dir.path().join("sub");
    std::fs::create_dir(&sub).unwrap();
    std::fs::rename(&parent, sub.join("win8.vhd")).unwrap();
    let e = open(&child).unwrap_err();
    let tried = parent_not_found(&e);
    let (w2ku, path) = if cfg!(windows) {
        ("W2ku", r"C:\Users\sergi\Downloads\win8.vhd")
    } else {
        ("W2ku without drive", "/Users/sergi/Downloads/win8.vhd")
    };
    assert!(
        tried
            .iter()
            .any(|c| c.source == w2ku && c.path == Path::new(path)),
        "{tried:#?}"
    );
    let chain = Chain::open(
        &child,
        &ChainOptions::default().search_dirs(vec![sub.clone()]),
    )
    .unwrap();
    assert_eq!(chain.layers()[1].found_by, "search dir, header name");
}

#[test]
fn unique_id_mismatch_shows_both_ids() {
    let root = fast_tempdir();
    let p = base(root.path(), "parent.vhd", 2 * MIB, 1);
    let want = uuid::Uuid::new_v4();
    let c = root.path().join("c.vhd");
    let mut spec = ChildSpec::of(&p)
        .name("parent.vhd")
        .loc(PlatformCode::W2ru, ".\\parent.vhd");
    spec.parent_id = want;
    craft_child(&c, &spec);
    let e = open(&c).unwrap_err();
    assert_eq!(e.return_code(), ReturnCode::FileNotFound);
    let have = Vhd::open(&p, OpenOptions::read_only()).unwrap().unique_id();
    let msg = e.to_string();
    assert!(
        msg.contains(&want.to_string()) && msg.contains(&have.to_string()),
        "{msg}"
    );
    // The same path from W2ru and the header name is tried once.
    let tried = parent_not_found(&e);
    assert_eq!(
        tried.iter().filter(|c| c.path == p).count(),
        1,
        "{tried:#?}"
    );
}

#[test]
fn cycles_are_refused() {
    let root = fast_tempdir();
    let ida = uuid::Uuid::new_v4();
    let idb = uuid::Uuid::new_v4();
    let a = root.path().join("a.vhd");
    let b = root.path().join("b.vhd");
    let spec = |me, parent, name: &str| ChildSpec {
        parent_id: parent,
        header_name: name.into(),
        parent_timestamp: 0,
        locators: vec![Loc::text(PlatformCode::W2ru, &format!(".\\{name}"))],
        size: 2 * MIB,
        block_size: 2 << 20,
        unique_id: Some(me),
    };
    craft_child(&a, &spec(ida, idb, "b.vhd"));
    craft_child(&b, &spec(idb, ida, "a.vhd"));
    let e = open(&a).unwrap_err();
    assert_eq!(e.return_code(), ReturnCode::InvalidState);
    assert!(e.to_string().contains("cycle"), "{e}");
    // Its own parent.
    let s = root.path().join("s.vhd");
    let ids = uuid::Uuid::new_v4();
    craft_child(&s, &spec(ids, ids, "s.vhd"));
    let e = open(&s).unwrap_err();
    assert!(e.to_string().contains("cycle"), "{e}");
    // The same file twice under another id is impossible, but the same id in two files
    // (a copy) is caught too.
    let c = root.path().join("c.vhd");
    let idc = uuid::Uuid::new_v4();
    craft_child(&c, &spec(idc, idc, "c-copy.vhd"));
    std::fs::copy(&c, root.path().join("c-copy.vhd")).unwrap();
    let e = open(&c).unwrap_err();
    assert!(e.to_string().contains("cycle"), "{e}");
}

#[test]
fn depth_limit() {
    let root = fast_tempdir();
    let mut prev = base(root.path(), "l0.vhd", MIB, 1);
    for i in 1..6 {
        let next = root.path().join(format!("l{i}.vhd"));
        drop(create_differencing(&next, &prev, &CreateOptions::default()).unwrap());
        prev = next;
    }
    assert_eq!(open(&prev).unwrap().len(), 6);
    let e = Chain::open(&prev, &ChainOptions::default().max_depth(4)).unwrap_err();
    assert_eq!(e.return_code(), ReturnCode::InvalidState);
    assert!(e.to_string().contains("deeper than the limit of 4"), "{e}");
    assert!(Chain::open(&prev, &ChainOptions::default().max_depth(6)).is_ok());
}

#[test]
fn missing_parent_real_fixture_lists_the_tried_candidates() {
    let dir = fast_tempdir();
    let Some(child) = fixture_copy("dfvfs/fat-differential.vhd", dir.path()) else {
        return;
    };
    let e = open(&child).unwrap_err();
    assert_eq!(e.return_code(), ReturnCode::FileNotFound);
    assert_eq!(e.return_code().code(), 32779);
    let tried = parent_not_found(&e);
    // On Windows the W2ku path is tried as written; elsewhere also without the drive and by
    // its tails in the child's directory.
    assert!(
        tried.len() >= if cfg!(windows) { 2 } else { 3 },
        "{tried:#?}"
    );
    assert!(tried.iter().all(|c| c.reason == "absent"), "{tried:#?}");
    assert!(tried.iter().any(|c| c.source == "W2ru"));
    assert!(tried.iter().any(|c| c.source.starts_with("W2ku")));
    let msg = e.to_string();
    assert!(
        msg.contains("fat-parent.vhd") && msg.contains("[W2ru]: absent"),
        "{msg}"
    );
    assert!(msg.contains("--search-dir"), "{msg}");
}

#[cfg_attr(not(unix), ignore = "FIFOs (mkfifo) are Unix")]
#[test]
fn fifo_and_directory_candidates_are_not_opened() {
    let root = fast_tempdir();
    let fifo = root.path().join("fifo.vhd");
    let st = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap();
    assert!(st.success());
    let dirp = root.path().join("dir.vhd");
    std::fs::create_dir(&dirp).unwrap();
    let c = root.path().join("c.vhd");
    let mut spec = ChildSpec {
        parent_id: uuid::Uuid::new_v4(),
        header_name: "dir.vhd".into(),
        parent_timestamp: 0,
        locators: vec![Loc::text(PlatformCode::W2ru, ".\\fifo.vhd")],
        size: MIB,
        block_size: 2 << 20,
        unique_id: None,
    };
    craft_child(&c, &spec);
    // Would block forever if the FIFO were opened.
    let e = open(&c).unwrap_err();
    let tried = parent_not_found(&e);
    assert!(
        reason_for(tried, &fifo).contains("not a regular file"),
        "{tried:#?}"
    );
    assert!(reason_for(tried, &fifo).contains("a FIFO"), "{tried:#?}");
    assert!(
        reason_for(tried, &dirp).contains("a directory"),
        "{tried:#?}"
    );
    // Same under confinement.
    spec.locators
        .push(Loc::text(PlatformCode::W2ku, "C:\\x\\dir.vhd"));
    let c2 = root.path().join("c2.vhd");
    craft_child(&c2, &spec);
    let e = Chain::open(
        &c2,
        &ChainOptions::default().confine_to(Some(vec![root.path().to_path_buf()])),
    )
    .unwrap_err();
    let tried = parent_not_found(&e);
    assert!(reason_for(tried, &fifo).contains("not a regular file"));
}

/// A candidate shorter than a footer is listed as not usable. Telling a damaged parent from a
/// stranger reads the candidate's footers, and must not compute an offset below zero for it
/// (a debug build panicked on `len - 512`).
#[test]
fn candidate_shorter_than_a_footer_is_not_usable() {
    let root = fast_tempdir();
    let b = base(root.path(), "base.vhd", MIB, 3);
    let c = root.path().join("child.vhd");
    drop(create_differencing(&c, &b, &CreateOptions::default()).unwrap());
    std::fs::write(&b, b"tiny").unwrap();
    let e = open(&c).unwrap_err();
    assert_eq!(e.return_code(), ReturnCode::FileNotFound, "{e}");
    let tried = parent_not_found(&e);
    let reason = reason_for(tried, &b);
    assert!(
        reason.starts_with("not a usable VHD") && reason.contains("smaller than a VHD footer"),
        "{tried:#?}"
    );
}

/// A file every system has, outside any test directory: as a locator climbing from the root
/// spells it, and where it is.
const SYSTEM_FILE: (&str, &str) = if cfg!(windows) {
    ("windows\\win.ini", "C:\\windows\\win.ini")
} else {
    ("etc\\passwd", "/etc/passwd")
};

#[test]
fn hostile_locators_are_confined() {
    let root = fast_tempdir();
    let allowed = root.path().join("allowed");
    let outside = root.path().join("outside");
    std::fs::create_dir(&allowed).unwrap();
    std::fs::create_dir(&outside).unwrap();
    // A real parent with the right id, but outside the allowed directory.
    let p = base(&outside, "parent.vhd", 2 * MIB, 1);
    let linked = symlink(&p, &allowed.join("link.vhd"));
    // Copies under other names, so that each absolute locator names its own file.
    let copies: Vec<PathBuf> = (2..5)
        .map(|i| {
            let q = outside.join(format!("p{i}.vhd"));
            std::fs::copy(&p, &q).unwrap();
            q
        })
        .collect();
    let c = allowed.join("c.vhd");
    let spec = ChildSpec::of(&p)
        .name("link.vhd")
        .loc(PlatformCode::W2ru, "..\\outside\\parent.vhd")
        .loc(PlatformCode::W2ku, &copies[0].to_string_lossy())
        .loc(
            PlatformCode::MacX,
            &vhd_merge::locator::file_url(&copies[1]),
        )
        .loc(PlatformCode::Wi2k, &windows_path(&copies[2]))
        .loc(
            PlatformCode::W2ru,
            &format!("{}{}", "..\\".repeat(12), SYSTEM_FILE.0),
        );
    craft_child(&c, &spec);
    // Unconfined, every one of them leads to the parent (the first wins).
    assert_eq!(open(&c).unwrap().layers()[1].found_by, "W2ru");

    let confined = ChainOptions::default()
        .ignore_absolute_locators(true)
        .confine_to(Some(vec![allowed.clone()]));
    let e = Chain::open(&c, &confined).unwrap_err();
    assert_eq!(e.return_code(), ReturnCode::FileNotFound);
    let tried = parent_not_found(&e);
    let r = reason_for(tried, &p);
    assert!(r.starts_with("outside the allowed directories"), "{r}");
    assert!(
        !linked
            || reason_for(tried, &allowed.join("link.vhd"))
                .contains("outside the allowed directories"),
        "{tried:#?}"
    );
    assert!(
        tried
            .iter()
            .any(|c| c.source == "W2ku" && c.reason.contains("absolute locator ignored")),
        "{tried:#?}"
    );
    assert!(
        tried
            .iter()
            .any(|c| c.source == "MacX" && c.reason.contains("absolute locator ignored"))
    );
    assert!(tried.iter().any(
        |c| c.source.starts_with("Wi2k") // "Wi2k without drive" on POSIX hosts
                && c.reason.contains("absolute locator ignored")
    ));
    assert!(reason_for(tried, Path::new(SYSTEM_FILE.1)).contains("outside"));

    // Only confinement, absolute locators allowed: still refused, they lead outside.
    let e = Chain::open(
        &c,
        &ChainOptions::default().confine_to(Some(vec![allowed.clone()])),
    )
    .unwrap_err();
    let tried = parent_not_found(&e);
    assert!(reason_for(tried, &p).starts_with("outside the allowed directories"));
    assert!(
        !tried
            .iter()
            .any(|c| c.reason.contains("absolute locator ignored"))
    );

    // Allowing the outside directory makes it work again.
    let ok = Chain::open(
        &c,
        &ChainOptions::default()
            .ignore_absolute_locators(true)
            .confine_to(Some(vec![allowed.clone(), outside.clone()])),
    )
    .unwrap();
    assert_eq!(ok.layers()[1].found_by, "W2ru");
}

#[test]
fn unreadable_locator_payloads_are_listed_not_read() {
    let root = fast_tempdir();
    let p = base(root.path(), "parent.vhd", MIB, 1);
    let c = root.path().join("c.vhd");
    let raw = |offset: u64, len: u32| {
        Loc::Raw(ParentLocator {
            platform_code: PlatformCode::W2ku,
            data_space: 512,
            data_length: len,
            reserved: 0,
            data_offset: offset,
        })
    };
    let mut spec = ChildSpec::of(&p).name("nothing.vhd");
    spec.locators = vec![
        raw(u64::MAX - 10, 100),
        raw(1 << 40, 100),
        raw(512, 1 << 30),
        raw(1024, 0),
    ];
    craft_child(&c, &spec);
    let e = open(&c).unwrap_err();
    let msg = e.to_string();
    assert!(msg.contains("lies outside the file"), "{msg}");
    assert!(msg.contains("more than the 65536 read"), "{msg}");
    assert!(msg.contains("locator data is empty"), "{msg}");
}

#[test]
fn time_stamp_mismatch_is_a_warning() {
    let root = fast_tempdir();
    let p = base(root.path(), "parent.vhd", MIB, 1);
    let c = root.path().join("c.vhd");
    let mut spec = ChildSpec::of(&p).name("parent.vhd");
    spec.parent_timestamp = 12345;
    craft_child(&c, &spec);
    let chain = open(&c).unwrap();
    let w = &chain.layers()[1].warnings;
    assert_eq!(w.len(), 1, "{w:?}");
    assert!(w[0].contains("2000-01-01T03:25:45Z"), "{w:?}");
    // Matching the parent's file time: no warning.
    spec.parent_timestamp = vhd_merge::create::parent_timestamp(&p).unwrap();
    craft_child(&root.path().join("c2.vhd"), &spec);
    assert!(
        open(&root.path().join("c2.vhd")).unwrap().layers()[1]
            .warnings
            .is_empty()
    );
}

#[test]
fn reader_reads_any_position_and_length() {
    let root = fast_tempdir();
    // Base 3 MiB with random data, a larger child (5 MiB) with sector-granular writes.
    let bp = root.path().join("base.vhd");
    let mut rng = Rng::new(42);
    let mut b = create_fixed(&bp, 3 * MIB, &CreateOptions::default()).unwrap();
    let mut data = vec![0u8; 3 * MIB as usize];
    rng.fill(&mut data);
    b.write_at(0, &data).unwrap();
    drop(b);
    let c = root.path().join("c.vhd");
    let mut spec = ChildSpec::of(&bp).name("base.vhd");
    spec.size = 5 * MIB;
    spec.block_size = 512 * 1024;
    let mut cv = craft_child(&c, &spec);
    for _ in 0..40 {
        let s = rng.below(10240 - 8);
        let n = 1 + rng.below(8);
        let mut d = vec![0u8; n as usize * 512];
        rng.fill(&mut d);
        cv.write_at(s * 512, &d).unwrap();
    }
    drop(cv);
    let chain = open(&c).unwrap();
    let whole = view(&chain, 0);
    assert_eq!(whole.len(), 5 * MIB as usize);
    // Past the smaller parent's end: only the child's own sectors.
    let mut r = chain.reader(0).unwrap();
    assert_eq!(r.size(), 5 * MIB);
    for _ in 0..300 {
        let pos = rng.below(5 * MIB + 100);
        let len = match rng.below(3) {
            0 => rng.below(600),
            1 => rng.below(8192),
            _ => rng.below(3 * MIB),
        } as usize;
        r.seek(SeekFrom::Start(pos)).unwrap();
        let mut got = Vec::new();
        (&mut r).take(len as u64).read_to_end(&mut got).unwrap();
        let lo = (pos as usize).min(whole.len());
        let hi = (lo + len).min(whole.len());
        assert_eq!(got.len(), hi - lo);
        assert!(got == whole[lo..hi], "pos {pos} len {len}");
    }
    // Seek from the end and the current position.
    assert_eq!(r.seek(SeekFrom::End(-1000)).unwrap(), 5 * MIB - 1000);
    assert_eq!(r.seek(SeekFrom::Current(-24)).unwrap(), 5 * MIB - 1024);
    let mut tail = Vec::new();
    r.read_to_end(&mut tail).unwrap();
    assert_eq!(tail, whole[whole.len() - 1024..]);
    assert!(r.seek(SeekFrom::Current(-(6 * MIB as i64))).is_err());
    // An owning reader over the parent layer.
    let mut all = Vec::new();
    open(&c)
        .unwrap()
        .into_reader(1)
        .unwrap()
        .read_to_end(&mut all)
        .unwrap();
    assert_eq!(all, data);
    assert!(chain.reader(2).is_err());
}

#[cfg(feature = "cli")]
#[test]
fn cli_chain_lists_layers_child_first() {
    let root = fast_tempdir();
    let b = base(root.path(), "base.vhd", 2 * MIB, 7);
    let child = root.path().join("child.vhd");
    drop(create_differencing(&child, &b, &CreateOptions::default()).unwrap());
    let exe = env!("CARGO_BIN_EXE_vhd-merge");
    let out = std::process::Command::new(exe)
        .arg("chain")
        .arg(&child)
        .arg("--json")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let i_child = text.find("child.vhd").unwrap();
    let sep = if cfg!(windows) { r"\\" } else { "/" }; // as JSON spells it
    let i_base = text.find(&format!("{sep}base.vhd\"")).unwrap();
    assert!(i_child < i_base, "{text}");
    for key in [
        "\"disk_type\": \"differencing\"",
        "\"disk_type\": \"dynamic\"",
        "\"found_by\": \"opened\"",
        "\"found_by\": \"W2ru\"",
        "\"virtual_size\": 2097152",
        "\"unique_id\"",
        "\"warnings\": []",
    ] {
        assert!(text.contains(key), "{key} missing in {text}");
    }
    // Text output, and a missing parent found with --search-dir; --confine refuses a parent
    // outside the allowed directories.
    let store = root.path().join("store");
    std::fs::create_dir(&store).unwrap();
    std::fs::rename(&b, store.join("base.vhd")).unwrap();
    let out = std::process::Command::new(exe)
        .arg("chain")
        .arg(&child)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.starts_with("error 32779 (File not found):"), "{err}");
    let out = std::process::Command::new(exe)
        .arg("chain")
        .arg(&child)
        .arg("--search-dir")
        .arg(&store)
        .arg("--confine")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("layer 1:") && text.contains("found by search dir, header name"),
        "{text}"
    );
    let out = std::process::Command::new(exe)
        .arg("chain")
        .arg(&child)
        .arg("--parent")
        .arg(store.join("base.vhd"))
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("found by --parent"));
}

/// A fixed disk whose footer is 511 bytes long (products older than Virtual PC 2004).
fn fixed_with_short_footer(dir: &Path, name: &str, fill: u8) -> PathBuf {
    let p = dir.join(name);
    let mut v = create_fixed(&p, 2 * MIB, &CreateOptions::default()).unwrap();
    v.write_at(0, &vec![fill; 64 * 1024]).unwrap();
    drop(v);
    let f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
    let len = f.metadata().unwrap().len();
    f.set_len(len - 1).unwrap();
    p
}

#[test]
fn renamed_parent_with_a_511_byte_footer_found_through_a_search_dir() {
    let root = fast_tempdir();
    let b = fixed_with_short_footer(root.path(), "base.vhd", 7);
    let child = root.path().join("child.vhd");
    drop(create_differencing(&child, &b, &CreateOptions::default()).unwrap());
    let before = view(&open(&child).unwrap(), 0);
    let store = root.path().join("store");
    std::fs::create_dir(&store).unwrap();
    std::fs::rename(&b, store.join("renamed-parent.bin")).unwrap();

    let opts = ChainOptions::default().search_dirs(vec![store.clone()]);
    let chain = Chain::open(&child, &opts).unwrap();
    assert_eq!(chain.layers()[1].found_by, "search dir, by unique id");
    assert_eq!(
        chain.vhd(1).unwrap().path(),
        store.join("renamed-parent.bin")
    );
    assert_eq!(view(&chain, 0), before);
}

/// A POSIX file name with a backslash: what `create_differencing` writes, `Chain::open` follows
/// (MacX carries the exact path; the Windows locators, which cannot spell such a name, are not
/// written; the header's name is tried whole, in search directories and beside the child).
#[cfg_attr(
    windows,
    ignore = "a backslash is a path separator on Windows, not a file name character"
)]
#[test]
fn parent_name_with_a_backslash() {
    let root = fast_tempdir();
    let b = base(root.path(), "back\\slash.vhd", 2 * MIB, 3);
    // A decoy where the Windows reading of the name points.
    std::fs::create_dir(root.path().join("back")).unwrap();
    base(&root.path().join("back"), "slash.vhd", 2 * MIB, 4);
    let child = root.path().join("child.vhd");
    let c = create_differencing(&child, &b, &CreateOptions::default()).unwrap();
    let codes: Vec<PlatformCode> = c
        .header()
        .unwrap()
        .locators
        .iter()
        .map(|l| l.platform_code)
        .filter(|p| *p != PlatformCode::None)
        .collect();
    assert_eq!(codes, [PlatformCode::MacX]);
    drop(c);
    let chain = open(&child).unwrap();
    assert_eq!(chain.vhd(1).unwrap().path(), b);
    assert_eq!(chain.layers()[1].found_by, "MacX");
    let strict = ChainOptions::default().ignore_absolute_locators(true);
    let chain = Chain::open(&child, &strict).unwrap();
    assert_eq!(chain.vhd(1).unwrap().path(), b);
    assert_eq!(chain.layers()[1].found_by, "MacX file name in child dir");

    // Moved into a search directory (not scanned): found by the header's name, whole.
    let store = root.path().join("store");
    std::fs::create_dir(&store).unwrap();
    std::fs::rename(&b, store.join("back\\slash.vhd")).unwrap();
    let moved = strict
        .search_dirs(vec![store.clone()])
        .scan_search_dirs(false);
    let chain = Chain::open(&child, &moved).unwrap();
    assert_eq!(chain.vhd(1).unwrap().path(), store.join("back\\slash.vhd"));
    assert_eq!(chain.layers()[1].found_by, "search dir, header name");
}
