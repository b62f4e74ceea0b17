//! Replays every input a fuzz target crashed on (tests/data/fuzz/<target>/) with the checks
//! the target makes, plus hand-made inputs of the same kinds. A crash here is a regression.
//! The `merge` target's checks are `merge_target` below (a copy of
//! `fuzz/src/lib.rs::merge_one`, which the test suite cannot import).

use crate::common;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use common::patch::*;
use common::read;
use vhd_merge::check::{CheckOptions, check_storage};
use vhd_merge::io::MemStorage;
use vhd_merge::repair::{RepairOptions, repair_storage};
use vhd_merge::{Chain, ChainOptions, OpenOptions, Vhd};

const LIMIT: u64 = 4 << 20;

fn mem(data: &[u8]) -> Box<MemStorage> {
    Box::new(MemStorage::with_limit(data.to_vec(), LIMIT))
}

/// What the `open` target does with an input.
fn open_target(data: &[u8]) {
    for lenient in [false, true] {
        let o = OpenOptions::read_only().lenient(lenient);
        if let Ok(v) = Vhd::from_storage(mem(data), "fuzz.vhd", o) {
            let mut buf = vec![0u8; v.block_size().min(1 << 20) as usize];
            let n = v.virtual_size().min(buf.len() as u64) as usize;
            let _ = v.read_own(0, &mut buf[..n]);
            for i in 0..v.block_count().min(64) {
                let _ = v.block_map(i);
            }
        }
    }
    let deep = CheckOptions::default().deep(true);
    let _ = check_storage(mem(data), "fuzz.vhd", &deep);
    let shared = Arc::new(MemStorage::with_limit(data.to_vec(), LIMIT));
    if let Ok(r) = repair_storage(
        Box::new(shared.clone()),
        "fuzz.vhd",
        &RepairOptions::default(),
    ) {
        let after = shared.to_vec();
        if r.is_clean() {
            assert_eq!(after, data, "a repair with nothing to do wrote");
        }
        let again = repair_storage(mem(&after), "fuzz.vhd", &RepairOptions::default())
            .expect("a repaired file is repairable");
        assert!(again.is_clean(), "repair is not idempotent: {again:?}");
        Vhd::from_storage(mem(&after), "fuzz.vhd", OpenOptions::read_only())
            .expect("a repaired file opens strictly");
    }
}

/// What the `chain` target does: the input as a child next to a valid parent.
fn chain_target(dir: &Path, data: &[u8]) {
    let c = dir.join("child.vhd");
    std::fs::write(&c, data).unwrap();
    let confined = ChainOptions::default()
        .ignore_absolute_locators(true)
        .confine_to(Some(vec![dir.to_path_buf()]));
    for o in [ChainOptions::default(), confined] {
        if let Ok(chain) = Chain::open(&c, &o) {
            let mut buf = vec![0u8; 64 << 10];
            for i in 0..chain.len() {
                let n = chain.vhd(i).unwrap().virtual_size().min(buf.len() as u64) as usize;
                let _ = chain.read_at(i, 0, &mut buf[..n]);
            }
        }
    }
}

fn inputs(target: &str) -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/fuzz")
        .join(target);
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|d| d.filter_map(|e| e.ok()).map(|e| e.path()).collect())
        .unwrap_or_default();
    v.retain(|p| p.is_file());
    v.sort();
    v
}

#[test]
fn open_crashers() {
    for p in inputs("open") {
        eprintln!("replaying {}", p.display());
        open_target(&std::fs::read(&p).unwrap());
    }
}

#[test]
fn chain_crashers() {
    let d = tempfile::tempdir().unwrap();
    dynamic(d.path(), "parent.vhd");
    for p in inputs("chain") {
        eprintln!("replaying {}", p.display());
        chain_target(d.path(), &std::fs::read(&p).unwrap());
    }
}

/// The `open` target's properties on damaged files of every kind the catalogue makes, with
/// every single byte of the metadata flipped in turn.
#[test]
fn open_target_properties_on_damaged_files() {
    let d = tempfile::tempdir().unwrap();
    let base = dynamic(d.path(), "d.vhd");
    let c = child(d.path(), "c.vhd", &base);
    let f = fixed(d.path(), "f.vhd");
    for p in [&base, &c, &f] {
        let good = read(p);
        open_target(&good);
        let len = good.len();
        // Footer copy, header, BAT, locator area, end footer.
        let spots = (0..2048).chain(len.saturating_sub(512)..len);
        for i in spots.step_by(3) {
            if i >= len {
                continue;
            }
            let mut bad = good.clone();
            bad[i] ^= 0xA5;
            open_target(&bad);
        }
        for cut in [0, 100, 511, 512, 1023, 1536, 2048, len / 2, len - 1] {
            open_target(&good[..cut.min(len)]);
        }
    }
}

/// Three fuzz crashers (derived from a GPL fixture, so rebuilt here from a generated file): the
/// BAT's entries end before the end footer but its sector padding runs into it. BAT updates
/// write whole sectors, so the first one would have destroyed the footer; a repaired file did
/// not open. Validation now stops there.
#[test]
fn padded_bat_running_into_the_end_footer() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("a.vhd");
    let o = opts().block_size(4096);
    drop(vhd_merge::create::create_dynamic(&p, 64 << 10, &o).unwrap());
    let good = read(&p);
    let h = header(&p);
    assert_eq!(h.max_table_entries, 16);
    // Footer right after the 64 bytes of entries, inside the BAT's padding.
    let at = (h.table_offset + 64 + 8) as usize;
    let mut bad = good[..at].to_vec();
    bad.extend_from_slice(&good[..512]);
    open_target(&bad);
    let insp = Vhd::inspect_storage(mem(&bad), "x.vhd", OpenOptions::read_only());
    assert!(insp.vhd.is_none());
    let last = insp.problems.last().unwrap();
    assert_eq!(last.code, "bat-placement");
    assert!(
        last.message.contains("overlaps the end footer"),
        "{}",
        last.message
    );
}

// ---- The merge target. ----

/// Unique id of the fuzz targets' parent (fuzz/src/lib.rs `PARENT_ID`): the fuzz corpus's
/// children point at it.
const PARENT_ID: [u8; 16] = *b"vhd-merge-fuzzP!";

/// The fuzz targets' parent: 64 KiB dynamic, 4 KiB blocks, a few blocks written.
fn fuzz_parent_bytes() -> Vec<u8> {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("parent.vhd");
    let o = vhd_merge::create::CreateOptions::default()
        .block_size(4096)
        .unique_id(Some(uuid::Uuid::from_bytes(PARENT_ID)))
        .timestamp(Some(1));
    let mut v = vhd_merge::create::create_dynamic(&p, 64 << 10, &o).unwrap();
    v.write_at(0, &[0x11; 4096]).unwrap();
    v.write_at(20 << 10, &[0x22; 1024]).unwrap();
    drop(v);
    read(&p)
}

fn fuzz_confined(dir: &Path) -> ChainOptions {
    ChainOptions::default()
        .ignore_absolute_locators(true)
        .confine_to(Some(vec![dir.to_path_buf()]))
}

/// What the `merge` target does with an input: it becomes `child.vhd` next to a fresh copy
/// of the parent; dry run and real merge with verify. No panic; errors carry a failure code
/// and are not verify failures; the child never changes; a dry run writes nothing; a
/// successful merge leaves the parent reading as the child did; a failed one leaves a parent
/// that opens, each sector old or merged. Returns whether the merge succeeded.
fn merge_target(dir: &Path, original: &[u8], data: &[u8]) -> bool {
    use vhd_merge::merge::{MergeOptions, merge};
    use vhd_merge::{Error, ReturnCode};
    let parent = dir.join("parent.vhd");
    let child = dir.join("child.vhd");
    std::fs::write(&parent, original).unwrap();
    std::fs::write(&child, data).unwrap();
    let opts = fuzz_confined(dir);
    let read_view = |path: &Path| -> Option<Vec<u8>> {
        let chain = Chain::open(path, &opts).ok()?;
        let size = chain.vhd(0).unwrap().virtual_size();
        if size > 64 << 10 {
            return None;
        }
        let mut buf = vec![0u8; size as usize];
        chain.read_at(0, 0, &mut buf).ok()?;
        Some(buf)
    };
    let old_parent = read_view(&parent).unwrap();
    let before = read_view(&child);
    let check_err = |e: &Error, what: &str| {
        let rc = e.return_code().code();
        assert!(
            (ReturnCode::Failed.code()..=ReturnCode::FileNotFound.code()).contains(&rc),
            "{what}: code {rc}: {e}"
        );
        assert!(!matches!(e, Error::VerifyFailed(_)), "{what}: {e}");
    };
    let dry = MergeOptions::default().chain(opts.clone()).dry_run(true);
    if let Err(e) = merge(&child, None, &dry) {
        check_err(&e, "dry run");
    }
    assert_eq!(read(&parent), original, "the dry run wrote the parent");
    assert_eq!(read(&child), data, "the dry run wrote the child");
    let real = MergeOptions::default().chain(opts.clone()).verify(true);
    let res = merge(&child, None, &real);
    assert_eq!(read(&child), data, "the merge wrote the child");
    match res {
        Ok(r) => {
            assert_eq!(r.bytes_merged, r.plan.bytes_total);
            let before = before.expect("merged a child whose view does not read");
            let after = read_view(&parent).unwrap();
            assert_eq!(after.get(..before.len()), Some(&before[..]));
            assert_eq!(after.get(before.len()..), old_parent.get(before.len()..));
            true
        }
        Err(e) => {
            check_err(&e, "merge");
            Vhd::open(&parent, OpenOptions::read_only()).unwrap();
            let after = read_view(&parent).unwrap();
            match before {
                Some(before) => {
                    for (s, sector) in after.chunks(512).enumerate() {
                        let r = s * 512..(s + 1) * 512;
                        assert!(
                            sector == &old_parent[r.clone()] || before.get(r) == Some(sector),
                            "sector {s} neither old nor merged after: {e}"
                        );
                    }
                }
                None => assert_eq!(after, old_parent),
            }
            false
        }
    }
}

#[test]
fn merge_crashers() {
    let d = tempfile::tempdir().unwrap();
    let original = fuzz_parent_bytes();
    for p in inputs("merge") {
        eprintln!("replaying {}", p.display());
        merge_target(d.path(), &original, &std::fs::read(&p).unwrap());
    }
}

/// The `merge` target's properties on children of the fuzz parent with every byte of their
/// metadata (footer copy, header, BAT, bitmaps, end footer) flipped in turn, and truncated.
#[test]
fn merge_target_properties_on_damaged_children() {
    let d = tempfile::tempdir().unwrap();
    let original = fuzz_parent_bytes();
    let t = tempfile::tempdir().unwrap();
    let parent = t.path().join("parent.vhd");
    std::fs::write(&parent, &original).unwrap();
    let mut children = Vec::new();
    for (k, bs) in [4096u32, 512, 64 << 10].into_iter().enumerate() {
        let p = t.path().join(format!("c{k}.vhd"));
        let o = vhd_merge::create::CreateOptions::default()
            .block_size(bs)
            .timestamp(Some(7));
        let mut c = vhd_merge::create::create_differencing(&p, &parent, &o).unwrap();
        c.write_at(1024, &[0x33; 512]).unwrap();
        c.write_at(24 << 10, &[0x44; 4096]).unwrap();
        c.write_at(60 << 10, &[0; 1024]).unwrap();
        drop(c);
        children.push(read(&p));
    }
    let (mut ok, mut refused) = (0, 0);
    for good in &children {
        assert!(merge_target(d.path(), &original, good), "a valid child");
        let len = good.len();
        let spots = (0..4096).chain(len.saturating_sub(512)..len);
        for i in spots.step_by(7) {
            if i >= len {
                continue;
            }
            let mut bad = good.clone();
            bad[i] ^= 0x5A;
            if merge_target(d.path(), &original, &bad) {
                ok += 1;
            } else {
                refused += 1;
            }
        }
        for cut in [0, 511, 512, 1536, 2048, len / 2, len - 512, len - 1] {
            merge_target(d.path(), &original, &good[..cut.min(len)]);
        }
    }
    eprintln!("damaged children: {ok} merged, {refused} refused");
    assert!(ok > 0 && refused > 0);
}
