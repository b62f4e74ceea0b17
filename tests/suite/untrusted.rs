//! Untrusted files (issue 6, item 7): with the chain resolver's confinement options no parent
//! locator, header name or search directory can make the library open a file outside the
//! allowed directories: not through an absolute locator, a `..` escape, a symlink, or a later
//! link of the chain. Each hostile case has a control showing that, without the options, the
//! same file does lead outside (so the refusal is the options' doing).

use crate::common;

use std::path::{Path, PathBuf};

use common::os::symlink;
use common::patch::*;
use common::snapshot;
use vhd_merge::format::{ParentLocator, PlatformCode};
use vhd_merge::{Chain, ChainOptions, OpenOptions, ReturnCode, Vhd};

struct Dirs {
    _root: tempfile::TempDir,
    allowed: PathBuf,
    outside: PathBuf,
}

fn dirs() -> Dirs {
    let root = tempfile::tempdir().unwrap();
    let allowed = root.path().join("allowed");
    let outside = root.path().join("outside");
    std::fs::create_dir(&allowed).unwrap();
    std::fs::create_dir(&outside).unwrap();
    Dirs {
        _root: root,
        allowed,
        outside,
    }
}

fn confined(d: &Dirs) -> ChainOptions {
    ChainOptions::default()
        .ignore_absolute_locators(true)
        .confine_to(Some(vec![d.allowed.clone()]))
}

/// Rewrite the child's locators: `entries` of (code, payload text); the rest emptied. Each
/// payload goes into the space of one of the child's original locators.
fn set_locators(child: &Path, name: &str, entries: &[(PlatformCode, &str)]) {
    let h = header(child);
    let spaces: Vec<ParentLocator> = h
        .locators
        .iter()
        .copied()
        .filter(|l| !l.is_empty())
        .collect();
    assert!(entries.len() <= spaces.len());
    let mut locs = [ParentLocator::EMPTY; 8];
    for (i, (code, text)) in entries.iter().enumerate() {
        let payload = code.encode_payload(text);
        let mut l = spaces[i];
        assert!(payload.len() as u32 <= l.data_space);
        patch(child, l.data_offset, &vec![0; l.data_space as usize]);
        patch(child, l.data_offset, &payload);
        l.platform_code = *code;
        l.data_length = payload.len() as u32;
        locs[i] = l;
    }
    edit_header(child, |h| {
        h.locators = locs;
        h.set_parent_name(name).unwrap();
    });
}

/// The chain must not open, or must open without any layer outside `allowed`.
fn refused(child: &Path, o: &ChainOptions, d: &Dirs) {
    let allowed = std::fs::canonicalize(&d.allowed).unwrap();
    match Chain::open(child, o) {
        Ok(c) => {
            for l in c.layers() {
                let real = std::fs::canonicalize(l.layer.path()).unwrap();
                assert!(
                    real.starts_with(&allowed),
                    "opened {} outside the allowed directory",
                    real.display()
                );
            }
            panic!("the chain opened without its parent");
        }
        Err(e) => assert_eq!(e.return_code(), ReturnCode::FileNotFound, "{e}"),
    }
}

fn reaches_outside(child: &Path, o: &ChainOptions, d: &Dirs) {
    let c = Chain::open(child, o).unwrap();
    let outside = std::fs::canonicalize(&d.outside).unwrap();
    assert!(
        c.layers()
            .iter()
            .any(|l| std::fs::canonicalize(l.layer.path())
                .unwrap()
                .starts_with(&outside)),
        "control: the file does not lead outside"
    );
}

/// A parent in `outside` and a child of it in `allowed`.
fn outside_parent(d: &Dirs) -> (PathBuf, PathBuf) {
    let parent = dynamic(&d.outside, "p.vhd");
    let c = child(&d.allowed, "c.vhd", &parent);
    (parent, c)
}

#[test]
fn parent_inside_the_allowed_directory_is_found() {
    let d = dirs();
    let parent = dynamic(&d.allowed, "p.vhd");
    let c = child(&d.allowed, "c.vhd", &parent);
    set_locators(&c, "p.vhd", &[(PlatformCode::W2ru, ".\\p.vhd")]);
    assert_eq!(Chain::open(&c, &confined(&d)).unwrap().len(), 2);
}

#[test]
fn dotdot_escape_is_refused() {
    let d = dirs();
    let (_, c) = outside_parent(&d);
    set_locators(&c, "p.vhd", &[(PlatformCode::W2ru, "..\\outside\\p.vhd")]);
    reaches_outside(&c, &ChainOptions::default(), &d);
    refused(&c, &confined(&d), &d);
    let only_confine = ChainOptions::default().confine_to(Some(vec![d.allowed.clone()]));
    refused(&c, &only_confine, &d);
}

#[test]
fn dotdot_that_comes_back_inside_is_allowed() {
    let d = dirs();
    let parent = dynamic(&d.allowed, "p.vhd");
    let c = child(&d.allowed, "c.vhd", &parent);
    set_locators(
        &c,
        "nothing.vhd",
        &[(PlatformCode::W2ru, "..\\outside\\..\\allowed\\p.vhd")],
    );
    assert_eq!(Chain::open(&c, &confined(&d)).unwrap().len(), 2);
}

#[test]
fn absolute_locators_are_ignored() {
    let d = dirs();
    let (parent, c) = outside_parent(&d);
    let abs = parent.to_string_lossy().into_owned();
    let url = format!("file://{abs}");
    set_locators(
        &c,
        "p.vhd",
        &[(PlatformCode::W2ku, &abs), (PlatformCode::MacX, &url)],
    );
    reaches_outside(&c, &ChainOptions::default(), &d);
    let ignore_only = ChainOptions::default().ignore_absolute_locators(true);
    refused(&c, &ignore_only, &d);
    // Confinement alone refuses them too.
    let only_confine = ChainOptions::default().confine_to(Some(vec![d.allowed.clone()]));
    refused(&c, &only_confine, &d);
    refused(&c, &confined(&d), &d);
}

#[test]
fn symlink_out_of_the_allowed_directory_is_refused() {
    let d = dirs();
    let (parent, c) = outside_parent(&d);
    if !symlink(&parent, &d.allowed.join("p.vhd")) {
        return;
    }
    set_locators(&c, "p.vhd", &[(PlatformCode::W2ru, ".\\p.vhd")]);
    reaches_outside(&c, &ChainOptions::default(), &d);
    refused(&c, &confined(&d), &d);
    // A symlinked directory inside the allowed one, pointing out.
    std::fs::remove_file(d.allowed.join("p.vhd")).unwrap();
    if !symlink(&d.outside, &d.allowed.join("sub")) {
        return;
    }
    set_locators(&c, "p.vhd", &[(PlatformCode::W2ru, ".\\sub\\p.vhd")]);
    reaches_outside(&c, &ChainOptions::default(), &d);
    refused(&c, &confined(&d), &d);
}

#[test]
fn allowed_directory_given_through_a_symlink() {
    let d = dirs();
    let parent = dynamic(&d.allowed, "p.vhd");
    let c = child(&d.allowed, "c.vhd", &parent);
    set_locators(&c, "p.vhd", &[(PlatformCode::W2ru, ".\\p.vhd")]);
    let link = d.outside.join("link-to-allowed");
    if !symlink(&d.allowed, &link) {
        return;
    }
    let o = ChainOptions::default()
        .ignore_absolute_locators(true)
        .confine_to(Some(vec![link]));
    assert_eq!(Chain::open(&c, &o).unwrap().len(), 2);
}

#[test]
fn search_directory_outside_the_confinement_is_refused() {
    let d = dirs();
    let (_, c) = outside_parent(&d);
    set_locators(&c, "p.vhd", &[]);
    let with_search = ChainOptions::default().search_dirs(vec![d.outside.clone()]);
    reaches_outside(&c, &with_search, &d);
    let o = confined(&d).search_dirs(vec![d.outside.clone()]);
    refused(&c, &o, &d);
}

#[test]
fn every_link_is_confined() {
    let d = dirs();
    let grand = dynamic(&d.outside, "g.vhd");
    let parent = child(&d.allowed, "p.vhd", &grand);
    set_locators(
        &parent,
        "g.vhd",
        &[(PlatformCode::W2ru, "..\\outside\\g.vhd")],
    );
    let c = child(&d.allowed, "c.vhd", &parent);
    set_locators(&c, "p.vhd", &[(PlatformCode::W2ru, ".\\p.vhd")]);
    reaches_outside(&c, &ChainOptions::default(), &d);
    refused(&c, &confined(&d), &d);
}

/// Nothing is written to any file while resolving hostile chains.
#[test]
fn hostile_resolution_writes_nothing() {
    let d = dirs();
    let (_, c) = outside_parent(&d);
    set_locators(&c, "p.vhd", &[(PlatformCode::W2ru, "..\\outside\\p.vhd")]);
    let a = snapshot(&d.allowed);
    let o = snapshot(&d.outside);
    let _ = Chain::open(&c, &confined(&d));
    let _ = Chain::open(&c, &ChainOptions::default());
    assert_eq!(snapshot(&d.allowed), a);
    assert_eq!(snapshot(&d.outside), o);
    Vhd::open(&c, OpenOptions::read_only()).unwrap();
}

/// A merge opens its chain with the same options: a stranger's child whose locators lead to
/// a parent outside the allowed directories is refused (File not found) before anything is
/// written, and the parent outside is untouched; the CLI's `--confine` does the same.
#[test]
fn merge_under_confinement_never_reaches_outside() {
    use vhd_merge::merge::{MergeOptions, merge};
    let d = dirs();
    let (parent, c) = outside_parent(&d);
    // The absolute locator names a copy, so that it is a candidate of its own.
    let copy = d.outside.join("q.vhd");
    std::fs::copy(&parent, &copy).unwrap();
    set_locators(
        &c,
        "p.vhd",
        &[
            (PlatformCode::W2ru, "..\\outside\\p.vhd"),
            (PlatformCode::W2ku, &copy.to_string_lossy()),
        ],
    );
    let o = MergeOptions::default().chain(confined(&d));
    let (a, out) = (snapshot(&d.allowed), snapshot(&d.outside));
    for dry_run in [true, false] {
        let o = o.clone().dry_run(dry_run);
        let e = merge(&c, None, &o).unwrap_err();
        assert_eq!(e.return_code(), ReturnCode::FileNotFound, "{e}");
        assert!(
            e.to_string().contains("outside the allowed directories"),
            "{e}"
        );
        assert!(e.to_string().contains("absolute locator ignored"), "{e}");
    }
    // Naming the outside parent as the destination does not help: it is not in the chain.
    let e = merge(&c, Some(&parent), &o).unwrap_err();
    assert_eq!(e.return_code(), ReturnCode::FileNotFound, "{e}");
    #[cfg(feature = "cli")]
    {
        let run = |confine: bool| {
            let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_vhd-merge"));
            cmd.arg("merge").arg(&c).arg("--dry-run");
            if confine {
                cmd.arg("--confine");
            }
            cmd.output().unwrap()
        };
        let out = run(true);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success());
        assert!(err.starts_with("error 32779 (File not found):"), "{err}");
        // Control: without --confine the dry run reaches the parent outside.
        let out = run(false);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert_eq!(snapshot(&d.allowed), a);
    assert_eq!(snapshot(&d.outside), out);
    // Control: unconfined, the real merge writes the parent outside.
    merge(&c, None, &MergeOptions::default()).unwrap();
    assert_ne!(snapshot(&d.outside), out);
}
