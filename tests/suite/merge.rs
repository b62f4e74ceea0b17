//! Merge semantics: a property test against an in-memory model, and one test per rule of
//! `MergeVirtualHardDisk` (wrong destination, siblings, dry run, verify, locks, jobs...).

use crate::common;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, mpsc};

use common::model::{BaseKind, Built, ChainSpec, build_chain, build_chain_sized, create_child};
use common::os::unwritable;
use common::{copy_dir, fast_tempdir, file_hash, first_diff, hashes, read_view};
use proptest::prelude::*;
use vhd_merge::create::{CreateOptions, create_differencing, create_dynamic};
use vhd_merge::io::{FaultPlan, FaultyStorage, Storage};
use vhd_merge::merge::{MergeOptions, Progress, StorageWrapper, merge};
use vhd_merge::{Error, JobState, MergeJob, OpenOptions, ReturnCode, Vhd};

const KIB: u32 = 1024;
const MIB: u32 = 1 << 20;

fn spec(
    n: usize,
    base: BaseKind,
    block_sizes: Vec<u32>,
    density: Vec<u64>,
    size_sectors: u64,
    seed: u64,
) -> ChainSpec {
    assert_eq!(block_sizes.len(), n);
    ChainSpec {
        size_sectors,
        base,
        block_sizes,
        density,
        seed,
    }
}

/// A chain of three dynamic-based layers with partial bitmaps, mixed block sizes.
fn small_chain(dir: &Path, seed: u64) -> Built {
    build_chain(
        dir,
        &spec(
            3,
            BaseKind::Dynamic,
            vec![512 * KIB, MIB, 2 * MIB],
            vec![60, 60, 60],
            8192 + 17,
            seed,
        ),
    )
}

fn code(e: &Error) -> ReturnCode {
    e.return_code()
}

fn block_size_strategy() -> impl Strategy<Value = u32> {
    prop_oneof![Just(512 * KIB), Just(MIB), Just(2 * MIB)]
}

fn chain_strategy() -> impl Strategy<Value = (ChainSpec, usize, bool, bool, u64)> {
    (
        2usize..=7,
        any::<bool>(),
        1024u64..=10240,
        any::<u64>(),
        prop_oneof![Just(512u64 << 10), Just(3 << 20), Just(1 << 30)],
    )
        .prop_flat_map(|(n, fixed, size, seed, batch)| {
            (
                Just(batch),
                Just(n),
                Just(fixed),
                Just(size),
                Just(seed),
                proptest::collection::vec(block_size_strategy(), n),
                proptest::collection::vec(0u64..=100, n),
                1..n,
                any::<bool>(),
                any::<bool>(),
            )
        })
        .prop_map(
            |(batch, n, fixed, size, seed, bs, density, d, explicit, verify)| {
                let base = if fixed {
                    BaseKind::Fixed
                } else {
                    BaseKind::Dynamic
                };
                (
                    spec(n, base, bs, density, size, seed),
                    d,
                    explicit || d > 1,
                    verify,
                    batch,
                )
            },
        )
}

fn cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(256)
}

/// Per-layer virtual sizes (sectors) around `size` for a chain of `n` layers merged into layer
/// `d`: each layer, the source, the intermediates, the destination and its ancestors, drawn
/// smaller, equal or larger (`picks`, one per layer), the source never larger than the
/// destination (that merge is refused).
fn mixed_sizes(size: u64, picks: &[u8], d: usize) -> Vec<u64> {
    let mut sizes: Vec<u64> = picks
        .iter()
        .map(|&p| match p % 5 {
            0 => size / 2 + 3,
            1 => size - size / 3,
            2 => size + 517,
            3 => size * 2,
            _ => size,
        })
        .collect();
    if sizes[0] > sizes[d] {
        sizes.swap(0, d);
    }
    sizes
}

/// Merge the chain built from `spec` and `sizes` into layer `d` and check it against the model.
fn merge_matches_model(
    spec: &ChainSpec,
    sizes: &[u64],
    d: usize,
    explicit: bool,
    verify: bool,
    batch_bytes: u64,
) -> Result<(), TestCaseError> {
    let dir = fast_tempdir();
    let built = build_chain_sized(dir.path(), spec, sizes);
    let model = &built.model;
    let source_view = model.view(0);
    prop_assert_eq!(
        first_diff(&read_view(&built.paths[0]), &source_view),
        None,
        "the chain reader disagrees with the model before merging"
    );
    let dest = built.paths[d].clone();
    let others = built.paths_except(d);
    let before = hashes(&others);

    let opts = MergeOptions::default()
        .verify(verify)
        .batch_bytes(batch_bytes);
    let report = merge(&built.paths[0], explicit.then_some(dest.as_path()), &opts).unwrap();

    let expected = model.merged(d);
    prop_assert_eq!(
        &expected[..source_view.len()],
        &source_view[..],
        "model: the destination takes the source's view"
    );
    let got = read_view(&dest);
    prop_assert_eq!(
        first_diff(&got, &expected),
        None,
        "destination view differs from the model"
    );
    prop_assert_eq!(
        first_diff(&read_view(&built.paths[0]), &source_view),
        None,
        "the source's view changed"
    );
    prop_assert_eq!(
        hashes(&others),
        before,
        "a file other than the destination changed"
    );

    let (held, hidden) = model.merge_sectors(d);
    let data: u64 = report.plan.layers.iter().map(|l| l.bytes).sum();
    prop_assert_eq!(data, held * 512);
    prop_assert_eq!(report.bytes_merged, report.plan.bytes_total);
    prop_assert_eq!(report.plan.bytes_total, data + report.plan.zeroed_bytes);
    // A dynamic destination skips zeros over its unallocated blocks (they read as zeros).
    let dest_type = report.plan.destination_type;
    if dest_type == vhd_merge::DiskType::Dynamic {
        prop_assert!(report.plan.zeroed_bytes <= hidden * 512);
    } else {
        prop_assert_eq!(report.plan.zeroed_bytes, hidden * 512);
    }
    prop_assert_eq!(report.obsolete, built.paths[..d].to_vec());
    prop_assert_eq!(report.verified.is_some(), verify);
    if let Some(v) = &report.verified {
        prop_assert_eq!(
            v.bytes,
            report.bytes_merged,
            "verify covers every written sector"
        );
    }
    Vhd::open(&dest, OpenOptions::read_only()).unwrap();
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), ..ProptestConfig::default() })]

    /// Random chains (depth 1 to 6, mixed block sizes, partial bitmaps, blocks out of order,
    /// fixed/dynamic/differencing destinations) merge to exactly the model's content, and no
    /// other file changes.
    #[test]
    fn merged_view_matches_model((spec, d, explicit, verify, batch_bytes) in chain_strategy()) {
        let sizes = vec![spec.size_sectors; spec.block_sizes.len()];
        merge_matches_model(&spec, &sizes, d, explicit, verify, batch_bytes)?;
    }

    /// The same with layers of different sizes in every position: a source smaller than the
    /// destination, intermediates smaller (they hide the destination past their end: the
    /// destination reads zeros there afterwards) or larger than the source, a destination
    /// whose ancestors are smaller or larger.
    #[test]
    fn merged_view_matches_model_with_mixed_sizes(
        (spec, d, explicit, verify, batch_bytes) in chain_strategy(),
        picks in proptest::collection::vec(any::<u8>(), 7),
    ) {
        let n = spec.block_sizes.len();
        let sizes = mixed_sizes(spec.size_sectors, &picks[..n], d);
        merge_matches_model(&spec, &sizes, d, explicit, verify, batch_bytes)?;
    }
}

#[test]
fn source_must_be_differencing() {
    let dir = fast_tempdir();
    let base = dir.path().join("base.vhd");
    create_dynamic(&base, 4 << 20, &CreateOptions::default()).unwrap();
    let e = merge(&base, None, &MergeOptions::default()).unwrap_err();
    assert_eq!(code(&e), ReturnCode::InvalidParameter, "{e}");
    assert!(e.to_string().contains("dynamic"), "{e}");
}

#[test]
fn destination_must_be_an_ancestor() {
    let dir = fast_tempdir();
    let built = small_chain(dir.path(), 1);
    let src = &built.paths[0];
    let hashes_before = hashes(&built.paths);

    // An unrelated VHD.
    let other = dir.path().join("other.vhd");
    create_dynamic(&other, 8 << 20, &CreateOptions::default()).unwrap();
    let e = merge(src, Some(&other), &MergeOptions::default()).unwrap_err();
    assert_eq!(code(&e), ReturnCode::InvalidParameter, "{e}");
    assert!(e.to_string().contains("not an ancestor"), "{e}");

    // The source itself.
    let e = merge(src, Some(src), &MergeOptions::default()).unwrap_err();
    assert_eq!(code(&e), ReturnCode::InvalidParameter, "{e}");

    // A copy of the parent: same unique id, another file.
    let copy = dir.path().join("copy-of-l1.vhd");
    std::fs::copy(&built.paths[1], &copy).unwrap();
    let e = merge(src, Some(&copy), &MergeOptions::default()).unwrap_err();
    assert_eq!(code(&e), ReturnCode::InvalidParameter, "{e}");
    assert!(e.to_string().contains("unique id"), "{e}");

    // A path that does not exist (File not found, issue 9), and a file that is not a VHD.
    let e = merge(
        src,
        Some(&dir.path().join("nope.vhd")),
        &MergeOptions::default(),
    )
    .unwrap_err();
    assert_eq!(code(&e), ReturnCode::FileNotFound, "{e}");
    let junk = dir.path().join("junk.vhd");
    std::fs::write(&junk, vec![7u8; 4096]).unwrap();
    let e = merge(src, Some(&junk), &MergeOptions::default()).unwrap_err();
    assert_eq!(code(&e), ReturnCode::InvalidParameter, "{e}");

    // Relative spelling of a real ancestor works (compared by canonical path). The copy of
    // the parent is a child of the destination, hence a sibling: move it away first.
    assert_eq!(hashes(&built.paths), hashes_before);
    std::fs::remove_file(&copy).unwrap();
    let odd = dir.path().join(".").join("l2.vhd");
    let r = merge(src, Some(&odd), &MergeOptions::default()).unwrap();
    assert_eq!(r.plan.destination_index, 2);
}

/// Create a dynamic disk at `path` with a given unique id.
fn dynamic_with_id(path: &Path, size: u64, id: uuid::Uuid) {
    let _ = std::fs::remove_file(path);
    create_dynamic(path, size, &CreateOptions::default().unique_id(Some(id))).unwrap();
}

#[test]
fn larger_source_is_refused_smaller_is_merged() {
    let dir = fast_tempdir();
    let parent = dir.path().join("parent.vhd");
    let child = dir.path().join("child.vhd");
    let id = uuid::Uuid::new_v4();

    // Child created against a 8 MiB parent, which is then replaced by a 4 MiB one with the
    // same unique id.
    dynamic_with_id(&parent, 8 << 20, id);
    create_differencing(&child, &parent, &CreateOptions::default())
        .unwrap()
        .write_at(6 << 20, &[9u8; 4096])
        .unwrap();
    dynamic_with_id(&parent, 4 << 20, id);
    let before = file_hash(&parent);
    let e = merge(&child, None, &MergeOptions::default()).unwrap_err();
    assert_eq!(code(&e), ReturnCode::InvalidParameter, "{e}");
    assert!(e.to_string().contains("larger"), "{e}");
    assert_eq!(file_hash(&parent), before, "refused merge wrote");

    // The other way round: a 4 MiB child of an 8 MiB parent. Sectors past 4 MiB keep the
    // parent's data.
    std::fs::remove_file(&child).unwrap();
    dynamic_with_id(&parent, 4 << 20, id);
    create_differencing(&child, &parent, &CreateOptions::default())
        .unwrap()
        .write_at(0, &vec![5u8; 3 << 20])
        .unwrap();
    dynamic_with_id(&parent, 8 << 20, id);
    let mut p = Vhd::open(&parent, OpenOptions::writable()).unwrap();
    p.write_at(0, &vec![1u8; 8 << 20]).unwrap();
    drop(p);
    let r = merge(&child, None, &MergeOptions::default()).unwrap();
    assert_eq!(r.bytes_merged, 3 << 20);
    assert_eq!(r.plan.merged_extent, 4 << 20);
    let v = read_view(&parent);
    assert!(v[..3 << 20].iter().all(|&b| b == 5));
    assert!(v[3 << 20..].iter().all(|&b| b == 1));

    // A child whose end falls inside a destination block: the block is written only up to it.
    let odd = (3 << 20) + 1536;
    std::fs::remove_file(&child).unwrap();
    dynamic_with_id(&parent, odd, id);
    create_differencing(&child, &parent, &CreateOptions::default())
        .unwrap()
        .write_at(0, &vec![6u8; odd as usize])
        .unwrap();
    dynamic_with_id(&parent, 8 << 20, id);
    let mut p = Vhd::open(&parent, OpenOptions::writable()).unwrap();
    p.write_at(0, &vec![1u8; 8 << 20]).unwrap();
    drop(p);
    let r = merge(&child, None, &MergeOptions::default().verify(true)).unwrap();
    assert_eq!(r.bytes_merged, odd);
    let v = read_view(&parent);
    assert!(v[..odd as usize].iter().all(|&b| b == 6));
    assert!(v[odd as usize..].iter().all(|&b| b == 1));
}

#[test]
fn siblings_are_refused_unless_forced() {
    let dir = fast_tempdir();
    let built = small_chain(dir.path(), 2);
    let (src, mid, dest) = (&built.paths[0], &built.paths[1], &built.paths[2]);
    // A sibling of the intermediate (child of the destination), a child of the intermediate,
    // a child of the source, and junk.
    let sib = dir.path().join("sibling.vhd");
    create_differencing(&sib, dest, &CreateOptions::default()).unwrap();
    let mid_child = dir.path().join("mid-child.vhd");
    create_differencing(&mid_child, mid, &CreateOptions::default()).unwrap();
    let src_child = dir.path().join("src-child.vhd");
    create_differencing(&src_child, src, &CreateOptions::default()).unwrap();
    std::fs::write(dir.path().join("notes.txt"), b"not a vhd").unwrap();
    std::fs::write(dir.path().join("tiny"), b"x").unwrap();
    std::fs::create_dir(dir.path().join("subdir")).unwrap();

    let before = file_hash(dest);
    let e = merge(src, Some(dest), &MergeOptions::default()).unwrap_err();
    assert_eq!(code(&e), ReturnCode::InvalidState, "{e}");
    let msg = e.to_string();
    assert!(
        msg.contains("sibling.vhd") && msg.contains("mid-child.vhd"),
        "{msg}"
    );
    assert!(
        !msg.contains("src-child.vhd"),
        "a child of the source is not a sibling: {msg}"
    );
    assert_eq!(file_hash(dest), before, "refused merge wrote");

    // Merging only into the immediate parent: the intermediate's child is now a sibling too,
    // the destination's child is not (its parent is not changed).
    let e = merge(src, Some(mid), &MergeOptions::default()).unwrap_err();
    let msg = e.to_string();
    assert!(
        msg.contains("mid-child.vhd") && !msg.contains("sibling.vhd"),
        "{msg}"
    );

    // The dry run reports them without refusing.
    let r = merge(src, Some(dest), &MergeOptions::default().dry_run(true)).unwrap();
    let names: Vec<String> = r
        .plan
        .siblings
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, vec!["mid-child.vhd", "sibling.vhd"]);
    assert_eq!(r.plan.source_children, vec![src_child.clone()]);

    // Siblings in a search directory are found too.
    let other_dir = fast_tempdir();
    let far = other_dir.path().join("far.vhd");
    create_differencing(&far, mid, &CreateOptions::default()).unwrap();
    let mut o = MergeOptions::default().dry_run(true);
    o.chain.search_dirs.push(other_dir.path().to_path_buf());
    let r = merge(src, Some(dest), &o).unwrap();
    assert!(r.plan.siblings.contains(&far), "{:?}", r.plan.siblings);

    // Forced: merged, with a warning naming them.
    let r = merge(src, Some(dest), &MergeOptions::default().force(true)).unwrap();
    assert!(
        r.warnings.iter().any(|w| w.contains("sibling.vhd")),
        "{:?}",
        r.warnings
    );
    assert_eq!(read_view(dest), built.model.view(0));
}

#[test]
fn dry_run_writes_nothing_and_reports_the_plan() {
    let dir = fast_tempdir();
    let built = small_chain(dir.path(), 3);
    let before = hashes(&built.paths);
    let r = merge(
        &built.paths[0],
        Some(&built.paths[2]),
        &MergeOptions::default().dry_run(true).verify(true),
    )
    .unwrap();
    assert_eq!(hashes(&built.paths), before);
    assert!(r.dry_run);
    assert_eq!(r.bytes_merged, 0);
    assert!(r.obsolete.is_empty());
    // Per-layer contributions from the model: the nearest merged layer holding each sector.
    let m = &built.model;
    let mut want = [0u64; 2];
    for s in 0..m.size / 512 {
        if let Some(l) = (0..2).find(|&l| m.layers[l].present[s]) {
            want[l] += 512;
        }
    }
    assert_eq!(
        r.plan.layers.iter().map(|l| l.bytes).collect::<Vec<_>>(),
        want.to_vec()
    );
    assert_eq!(r.plan.bytes_total, want[0] + want[1]);
    assert!(r.plan.units > 0);
    // The real merge does what the plan said.
    let real = merge(
        &built.paths[0],
        Some(&built.paths[2]),
        &MergeOptions::default(),
    )
    .unwrap();
    assert_eq!(real.bytes_merged, r.plan.bytes_total);
    assert!(real.blocks_allocated <= r.plan.blocks_to_allocate);
    assert!(real.destination_growth <= r.plan.destination_growth);
}

/// Storage that flips a byte in every large write (a stand-in for a bad disk or a bug).
#[derive(Debug)]
struct Corrupting(Box<dyn Storage>);

impl Storage for Corrupting {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.0.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        if buf.len() >= 8192 {
            let mut b = buf.to_vec();
            b[4096] ^= 0x40;
            return self.0.write_at(&b, offset);
        }
        self.0.write_at(buf, offset)
    }
    fn len(&self) -> std::io::Result<u64> {
        self.0.len()
    }
    fn set_len(&self, len: u64) -> std::io::Result<()> {
        self.0.set_len(len)
    }
    fn sync_data(&self) -> std::io::Result<()> {
        self.0.sync_data()
    }
    fn try_lock(&self, exclusive: bool) -> std::io::Result<bool> {
        self.0.try_lock(exclusive)
    }
}

#[test]
fn verify_passes_and_detects_corruption() {
    let dir = fast_tempdir();
    let built = build_chain(
        dir.path(),
        &spec(
            2,
            BaseKind::Dynamic,
            vec![2 * MIB, 2 * MIB],
            vec![100, 50],
            8192,
            4,
        ),
    );
    let work = fast_tempdir();
    copy_dir(dir.path(), work.path());

    let ok = merge(&built.paths[0], None, &MergeOptions::default().verify(true)).unwrap();
    let v = ok.verified.unwrap();
    assert_eq!(v.bytes, ok.bytes_merged);
    assert!(v.units > 0);

    let src = work.path().join("l0.vhd");
    let wrap: StorageWrapper = Arc::new(|s| Box::new(Corrupting(s)));
    let o = MergeOptions::default()
        .verify(true)
        .destination_io(Some(wrap.clone()));
    let e = merge(&src, None, &o).unwrap_err();
    assert!(matches!(e, Error::VerifyFailed(_)), "{e}");
    assert_eq!(code(&e), ReturnCode::Failed);
    assert!(e.to_string().contains("differ"), "{e}");
    // Without verify the same corruption goes unnoticed: the check is what catches it.
    copy_dir(dir.path(), work.path());
    let o = MergeOptions::default().destination_io(Some(wrap));
    merge(&src, None, &o).unwrap();
    assert_ne!(read_view(&work.path().join("l1.vhd")), built.model.view(0));
}

#[test]
fn locked_destination_gives_system_in_use() {
    let dir = fast_tempdir();
    let built = small_chain(dir.path(), 5);
    let (src, dest) = (&built.paths[0], &built.paths[1]);

    // Another holder of an exclusive lock on the destination, or on the source.
    for held in [dest, src] {
        let f = std::fs::File::open(held).unwrap();
        f.try_lock().unwrap();
        let e = merge(src, None, &MergeOptions::default()).unwrap_err();
        assert_eq!(code(&e), ReturnCode::SystemInUse, "{e}");
        drop(f);
    }
    // A dry run takes no locks.
    let f = std::fs::File::open(dest).unwrap();
    f.try_lock().unwrap();
    merge(src, None, &MergeOptions::default().dry_run(true)).unwrap();
    drop(f);

    // A second merge started while the first is running: from another thread of the same
    // process, and from another process (the CLI).
    let seen: Arc<Mutex<Vec<String>>> = Arc::new(Mutex::new(Vec::new()));
    let tried = Arc::new(AtomicBool::new(false));
    let (s2, d2, seen2, tried2) = (src.clone(), dest.clone(), seen.clone(), tried.clone());
    let cb = Arc::new(move |p: &Progress| {
        if p.state != JobState::Running || tried2.swap(true, Ordering::SeqCst) {
            return;
        }
        let (s3, d3) = (s2.clone(), d2.clone());
        let thread = std::thread::spawn(move || merge(&s3, Some(&d3), &MergeOptions::default()));
        let r = thread.join().unwrap();
        seen2.lock().unwrap().push(match r {
            Ok(_) => "thread: merged".into(),
            Err(e) => format!("thread: {}", e.return_code().code()),
        });
        #[cfg(feature = "cli")]
        {
            let out = std::process::Command::new(env!("CARGO_BIN_EXE_vhd-merge"))
                .arg("merge")
                .arg(&s2)
                .arg(&d2)
                .arg("--json")
                .output()
                .unwrap();
            seen2.lock().unwrap().push(format!(
                "process: {} {}",
                out.status.success(),
                String::from_utf8_lossy(&out.stdout)
            ));
        }
    });
    merge(src, None, &MergeOptions::default().progress(Some(cb))).unwrap();
    let seen = seen.lock().unwrap();
    assert_eq!(seen[0], "thread: 32774");
    #[cfg(feature = "cli")]
    assert!(
        seen[1].starts_with("process: false") && seen[1].contains("32774"),
        "{seen:?}"
    );
}

#[test]
fn read_only_destination_gives_access_denied() {
    let dir = tempfile::tempdir().unwrap();
    let built = small_chain(dir.path(), 6);
    let dest = built.paths[1].clone();
    let Some(_guard) = unwritable(&dest) else {
        eprintln!(
            "note: this process can write a read-only file here; only the mapping of PermissionDenied is checked"
        );
        let e = Error::io(
            "x",
            std::io::Error::from(std::io::ErrorKind::PermissionDenied),
        );
        assert_eq!(e.return_code(), ReturnCode::AccessDenied);
        return;
    };
    let before = file_hash(&dest);
    let e = merge(&built.paths[0], None, &MergeOptions::default()).unwrap_err();
    assert_eq!(code(&e), ReturnCode::AccessDenied, "{e}");
    assert_eq!(file_hash(&dest), before);
}

#[test]
fn out_of_space_fails_and_leaves_a_valid_destination() {
    let dir = fast_tempdir();
    let built = build_chain(
        dir.path(),
        &spec(
            2,
            BaseKind::Dynamic,
            vec![MIB, 512 * KIB],
            vec![100, 20],
            12288,
            7,
        ),
    );
    let dest = built.paths[1].clone();
    let len = std::fs::metadata(&dest).unwrap().len();
    let old_view = read_view(&dest);
    for limit in [len, len + (1 << 20), len + (3 << 20)] {
        let plan = FaultPlan::out_of_space_at(limit);
        let wrap: StorageWrapper = Arc::new(move |s| Box::new(FaultyStorage::new(s, plan.clone())));
        let o = MergeOptions::default()
            .destination_io(Some(wrap))
            .batch_bytes(1 << 20);
        let e = merge(&built.paths[0], None, &o).unwrap_err();
        assert_eq!(code(&e), ReturnCode::Failed, "{e}");
        assert!(e.to_string().contains("No space left"), "{e}");
        // Valid, strict, and each sector either old or merged.
        let v = read_view(&dest);
        let new = built.model.view(0);
        for s in 0..v.len() / 512 {
            let r = s * 512..s * 512 + 512;
            assert!(
                v[r.clone()] == old_view[r.clone()] || v[r.clone()] == new[r.clone()],
                "sector {s}"
            );
        }
    }
    merge(&built.paths[0], None, &MergeOptions::default()).unwrap();
    assert_eq!(read_view(&dest), built.model.view(0));
}

#[test]
fn job_reports_states_and_monotonic_progress() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<vhd_merge::Job>();

    let dir = fast_tempdir();
    let built = build_chain(
        dir.path(),
        &spec(
            3,
            BaseKind::Dynamic,
            vec![2 * MIB, MIB, 512 * KIB],
            vec![100, 80, 50],
            16384,
            8,
        ),
    );
    let seen: Arc<Mutex<Vec<Progress>>> = Arc::new(Mutex::new(Vec::new()));
    let s2 = seen.clone();
    let o = MergeOptions::default()
        .progress(Some(Arc::new(move |p: &Progress| {
            s2.lock().unwrap().push(*p)
        })))
        .batch_bytes(1 << 20);
    let job = MergeJob::start(&built.paths[0], Some(&built.paths[2]), o).unwrap();
    let report = job.wait().unwrap();
    assert_eq!(job.state(), JobState::Completed);
    assert_eq!(job.state().value(), 7);
    assert_eq!(job.percent_complete(), 100);
    assert_eq!(job.error_code(), ReturnCode::Completed);
    assert_eq!(job.error_description(), None);
    assert_eq!(job.bytes_done(), report.bytes_merged);
    assert_eq!(job.bytes_total(), report.bytes_merged);
    let e = job.wait().unwrap_err();
    assert_eq!(code(&e), ReturnCode::InvalidState);

    let seen = seen.lock().unwrap();
    let states: Vec<JobState> = seen.iter().map(|p| p.state).collect::<Vec<_>>();
    assert_eq!(states.first(), Some(&JobState::Starting));
    assert_eq!(states.last(), Some(&JobState::Completed));
    assert!(states.contains(&JobState::Running));
    assert!(seen.len() > 10, "progress reported {} times", seen.len());
    for w in seen.windows(2) {
        assert!(w[1].percent_complete >= w[0].percent_complete, "{w:?}");
        assert!(w[1].bytes_done >= w[0].bytes_done, "{w:?}");
        assert!(w[1].state.value() >= w[0].state.value(), "{w:?}");
    }
    assert!(seen.iter().all(|p| p.percent_complete <= 100));
    assert_eq!(seen.last().unwrap().percent_complete, 100);
    assert_eq!(read_view(&built.paths[2]), built.model.view(0));
}

#[test]
fn failing_job_reports_exception_and_code() {
    let dir = fast_tempdir();
    let base = dir.path().join("base.vhd");
    create_dynamic(&base, 4 << 20, &CreateOptions::default()).unwrap();
    let job = MergeJob::start(&base, None, MergeOptions::default()).unwrap();
    let e = job.wait().unwrap_err();
    assert_eq!(code(&e), ReturnCode::InvalidParameter);
    assert_eq!(job.state(), JobState::Exception);
    assert_eq!(job.error_code(), ReturnCode::InvalidParameter);
    assert!(job.error_description().unwrap().contains("differencing"));

    let job = MergeJob::start(
        dir.path().join("missing.vhd"),
        None,
        MergeOptions::default(),
    )
    .unwrap();
    assert_eq!(code(&job.wait().unwrap_err()), ReturnCode::FileNotFound);
    assert_eq!(job.state().value(), 10);
}

#[test]
fn cancel_then_rerun_completes() {
    let dir = fast_tempdir();
    let built = build_chain(
        dir.path(),
        &spec(
            2,
            BaseKind::Dynamic,
            vec![512 * KIB, 2 * MIB],
            vec![90, 60],
            16384,
            9,
        ),
    );
    let dest = built.paths[1].clone();
    let old_view = read_view(&dest);
    // The callback blocks the merge at its first progress step until the test has cancelled.
    let (to_test, from_merge) = mpsc::channel::<()>();
    let (to_merge, from_test) = mpsc::channel::<()>();
    let from_test = Mutex::new(from_test);
    let to_test = Mutex::new(to_test);
    let once = AtomicBool::new(false);
    let o = MergeOptions::default()
        .batch_bytes(1 << 20)
        .progress(Some(Arc::new(move |p: &Progress| {
            if p.state == JobState::Running
                && p.bytes_done > 0
                && !once.swap(true, Ordering::SeqCst)
            {
                to_test.lock().unwrap().send(()).unwrap();
                from_test.lock().unwrap().recv().unwrap();
            }
        })));
    let job = MergeJob::start(&built.paths[0], None, o).unwrap();
    from_merge.recv().unwrap();
    let mid = job.progress();
    assert_eq!(mid.state, JobState::Running);
    assert!(
        mid.bytes_done > 0 && mid.bytes_done < mid.bytes_total,
        "{mid:?}"
    );
    job.cancel();
    to_merge.send(()).unwrap();
    let e = job.wait().unwrap_err();
    assert!(matches!(e, Error::Cancelled(_)), "{e}");
    assert_eq!(code(&e), ReturnCode::Failed);
    assert_eq!(job.state(), JobState::Terminated);
    assert_eq!(job.error_code(), ReturnCode::Failed);
    assert!(job.bytes_done() < job.bytes_total());

    // Stopped part-way: valid, some sectors merged, not all.
    let v = read_view(&dest);
    let new = built.model.view(0);
    assert_ne!(v, new);
    assert_ne!(v, old_view);
    let r = merge(&built.paths[0], None, &MergeOptions::default()).unwrap();
    assert_eq!(r.bytes_merged, r.plan.bytes_total);
    assert_eq!(read_view(&dest), new);
}

#[test]
fn rerunning_a_finished_merge_changes_nothing() {
    let dir = fast_tempdir();
    let built = small_chain(dir.path(), 10);
    merge(&built.paths[0], None, &MergeOptions::default()).unwrap();
    let after = file_hash(&built.paths[1]);
    let r = merge(&built.paths[0], None, &MergeOptions::default()).unwrap();
    assert_eq!(r.blocks_allocated, 0);
    assert_eq!(r.destination_growth, 0);
    assert_eq!(file_hash(&built.paths[1]).1, after.1);
    assert_eq!(read_view(&built.paths[1]), built.model.merged(1));
}

#[test]
fn remove_merged_and_relink_rules() {
    let dir = fast_tempdir();
    let built = small_chain(dir.path(), 11);
    let (src, mid, dest) = (&built.paths[0], &built.paths[1], &built.paths[2]);
    let src_child = dir.path().join("src-child.vhd");
    create_differencing(&src_child, src, &CreateOptions::default()).unwrap();
    let before = hashes(&built.paths);

    // Removing the source would orphan its child.
    let o = MergeOptions::default().remove_merged(true);
    let e = merge(src, Some(dest), &o).unwrap_err();
    assert_eq!(code(&e), ReturnCode::InvalidState, "{e}");
    assert!(e.to_string().contains("src-child.vhd"), "{e}");

    // Relinking a child of an intermediate is refused: its view would change.
    let mid_child = dir.path().join("mid-child.vhd");
    create_differencing(&mid_child, mid, &CreateOptions::default()).unwrap();
    let o = MergeOptions::default()
        .relink(vec![mid_child.clone()])
        .force(true);
    let e = merge(src, Some(dest), &o).unwrap_err();
    assert_eq!(code(&e), ReturnCode::InvalidParameter, "{e}");
    assert!(e.to_string().contains("change its content"), "{e}");
    std::fs::remove_file(&mid_child).unwrap();
    // Both refusals came before any write.
    assert_eq!(hashes(&built.paths), before);

    // Relinking a child of the source to the destination keeps the child's view and lets the
    // source and the intermediate go.
    {
        let mut c = Vhd::open(&src_child, OpenOptions::writable()).unwrap();
        c.write_at(3 * 512, &[0x5A; 1024]).unwrap();
    }
    let child_view = read_view(&src_child);
    assert_ne!(child_view, built.model.view(0));
    let o = MergeOptions::default()
        .relink(vec![src_child.clone()])
        .remove_merged(true);
    let r = merge(src, Some(dest), &o).unwrap();
    assert_eq!(r.relinked, vec![src_child.clone()]);
    assert_eq!(r.removed, vec![src.clone(), mid.clone()]);
    assert!(!src.exists() && !mid.exists());
    assert_eq!(read_view(dest), built.model.view(0));
    assert_eq!(read_view(&src_child), child_view);
    let chain = vhd_merge::Chain::open(&src_child, &vhd_merge::ChainOptions::default()).unwrap();
    assert_eq!(
        std::fs::canonicalize(chain.vhd(1).unwrap().path()).unwrap(),
        std::fs::canonicalize(dest).unwrap()
    );
}

#[test]
fn relink_refused_before_anything_is_written() {
    let dir = fast_tempdir();
    let built = small_chain(dir.path(), 12);
    let (src, dest) = (&built.paths[0], &built.paths[1]);
    // Not a VHD at all: refused while checking, before the merge writes.
    let junk = dir.path().join("junk.vhd");
    std::fs::write(&junk, b"not a vhd").unwrap();
    let before = hashes(&built.paths);
    let o = MergeOptions::default().relink(vec![junk]);
    let e = merge(src, Some(dest), &o).unwrap_err();
    assert_eq!(code(&e), ReturnCode::InvalidParameter, "{e}");
    assert_eq!(hashes(&built.paths), before);
}

#[test]
fn fixed_destination_and_report_fields() {
    let dir = fast_tempdir();
    let built = build_chain(
        dir.path(),
        &spec(
            3,
            BaseKind::Fixed,
            vec![MIB, 512 * KIB, 2 * MIB],
            vec![70, 70, 0],
            9000,
            12,
        ),
    );
    let len = std::fs::metadata(&built.paths[2]).unwrap().len();
    let r = merge(
        &built.paths[0],
        Some(&built.paths[2]),
        &MergeOptions::default(),
    )
    .unwrap();
    assert_eq!(r.blocks_allocated, 0);
    assert_eq!(r.destination_growth, 0);
    assert_eq!(r.plan.blocks_to_allocate, 0);
    assert_eq!(r.plan.unit_bytes, 2 << 20);
    assert_eq!(std::fs::metadata(&built.paths[2]).unwrap().len(), len);
    assert_eq!(read_view(&built.paths[2]), built.model.view(0));
}

#[test]
fn fixed_destination_with_a_511_byte_footer_named_explicitly() {
    let dir = fast_tempdir();
    let built = build_chain(
        dir.path(),
        &spec(
            2,
            BaseKind::Fixed,
            vec![MIB, 512 * KIB],
            vec![70, 70],
            4096,
            21,
        ),
    );
    let base = &built.paths[1];
    let f = std::fs::OpenOptions::new().write(true).open(base).unwrap();
    f.set_len(f.metadata().unwrap().len() - 1).unwrap();
    drop(f);
    merge(&built.paths[0], Some(base), &MergeOptions::default()).unwrap();
    assert_eq!(read_view(base), built.model.view(0));
}

#[test]
fn destination_identity_is_kept() {
    let dir = fast_tempdir();
    let built = small_chain(dir.path(), 13);
    let before = Vhd::open(&built.paths[1], OpenOptions::read_only())
        .unwrap()
        .footer()
        .to_bytes();
    merge(&built.paths[0], None, &MergeOptions::default()).unwrap();
    let after = Vhd::open(&built.paths[1], OpenOptions::read_only())
        .unwrap()
        .footer()
        .to_bytes();
    assert_eq!(before, after, "the destination's footer changed");
}

#[cfg(feature = "cli")]
fn cli(args: &[&std::ffi::OsStr]) -> (bool, serde_json::Value, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_vhd-merge"))
        .arg("merge")
        .args(args)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let json = serde_json::from_str(stdout.trim()).unwrap_or(serde_json::Value::Null);
    (
        out.status.success(),
        json,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[cfg(feature = "cli")]
#[test]
fn cli_merge_json_and_exit_status() {
    let dir = fast_tempdir();
    let built = small_chain(dir.path(), 14);
    let (src, mid, dest) = (
        built.paths[0].as_os_str(),
        built.paths[1].as_os_str(),
        built.paths[2].as_os_str(),
    );
    let json = std::ffi::OsStr::new("--json");

    let (ok, v, _) = cli(&[src, dest, std::ffi::OsStr::new("--dry-run"), json]);
    assert!(ok, "{v}");
    assert_eq!(v["job_state"], 7);
    assert!(v["error"].is_null(), "{v}");
    assert_eq!(v["bytes_merged"], 0);
    assert_eq!(v["plan"]["layers"].as_array().unwrap().len(), 2);
    assert!(v["plan"]["bytes_total"].as_u64().unwrap() > 0);

    // Failure: exit status 1, JSON with the code, an error line on stderr.
    let (ok, v, err) = cli(&[dest, json]);
    assert!(!ok);
    assert_eq!(v["job_state"], 10);
    assert_eq!(v["error"]["return_code"], 32773);
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("differencing")
    );
    assert!(err.starts_with("error 32773"), "{err}");

    let (ok, v, _) = cli(&[src, dest, std::ffi::OsStr::new("--verify"), json]);
    assert!(ok, "{v}");
    assert_eq!(v["percent_complete"], 100);
    let merged = v["bytes_merged"].as_u64().unwrap();
    assert!(merged > 0);
    assert_eq!(v["verified"]["bytes"].as_u64(), Some(merged));
    let obsolete: Vec<&str> = v["obsolete"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_str().unwrap())
        .collect();
    assert_eq!(
        obsolete,
        vec![built.paths[0].to_str().unwrap(), mid.to_str().unwrap()]
    );
    assert_eq!(read_view(&built.paths[2]), built.model.view(0));

    // Text mode: a summary line.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_vhd-merge"))
        .arg("merge")
        .arg(src)
        .arg(dest)
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.starts_with("merged ") && text.contains("now obsolete"),
        "{text}"
    );
}

/// The chain of issue 9, defect 1: P (8 MiB, `kind`) <- I (4 MiB) <- S (8 MiB) <- C, with P
/// full of 1s (for a differencing P, its parent G is full of 5s and P holds 1s in its first
/// 2 MiB only), I holding 2s in its first MiB, S 3s at 6 MiB, C 4s at 7 MiB. Returns the
/// paths (S, I, P, C) and S's view.
fn hidden_by_smaller_intermediate(dir: &Path, kind: &str) -> ([PathBuf; 4], Vec<u8>) {
    const M: u64 = 1 << 20;
    let (p, i, s, c) = (
        dir.join("P.vhd"),
        dir.join("I.vhd"),
        dir.join("S.vhd"),
        dir.join("C.vhd"),
    );
    let o = CreateOptions::default();
    match kind {
        "fixed" => {
            vhd_merge::create::create_fixed(&p, 8 * M, &o)
                .unwrap()
                .write_at(0, &vec![1u8; 8 << 20])
                .unwrap();
        }
        "dynamic" => {
            create_dynamic(&p, 8 * M, &o)
                .unwrap()
                .write_at(0, &vec![1u8; 8 << 20])
                .unwrap();
        }
        _ => {
            let g = dir.join("G.vhd");
            create_dynamic(&g, 8 * M, &o)
                .unwrap()
                .write_at(0, &vec![5u8; 8 << 20])
                .unwrap();
            create_differencing(&p, &g, &o)
                .unwrap()
                .write_at(0, &vec![1u8; 2 << 20])
                .unwrap();
        }
    }
    create_child(&i, &p, 4 * M, &o)
        .write_at(0, &vec![2u8; 1 << 20])
        .unwrap();
    create_child(&s, &i, 8 * M, &o)
        .write_at(6 * M, &[3u8; 4096])
        .unwrap();
    create_differencing(&c, &s, &o)
        .unwrap()
        .write_at(7 * M, &[4u8; 4096])
        .unwrap();
    let view = read_view(&s);
    // The source's view: I's 2s, P's data up to I's end, zeros past it but for S's 3s.
    let p_byte = if kind == "differencing" { 5 } else { 1 };
    assert!(view[..1 << 20].iter().all(|&b| b == 2));
    assert!(view[(3 << 20)..(4 << 20)].iter().all(|&b| b == p_byte));
    assert!(view[(4 << 20)..(6 << 20)].iter().all(|&b| b == 0));
    assert!(view[(6 << 20)..(6 << 20) + 4096].iter().all(|&b| b == 3));
    assert!(view[(6 << 20) + 4096..].iter().all(|&b| b == 0));
    ([s, i, p, c], view)
}

/// Issue 9, defect 1: merging through an intermediate smaller than the source. The source's
/// view reads zeros past the intermediate's end; the destination must too afterwards (it
/// kept its old data there, and --verify did not look). Fixed, dynamic and differencing
/// destinations; the relinked child's view does not change.
#[test]
fn merge_through_a_smaller_intermediate_takes_the_sources_view() {
    for kind in ["fixed", "dynamic", "differencing"] {
        let dir = fast_tempdir();
        let ([s, i, p, c], view) = hidden_by_smaller_intermediate(dir.path(), kind);
        let child_view = read_view(&c);
        let o = MergeOptions::default().verify(true).relink(vec![c.clone()]);
        let r = merge(&s, Some(&p), &o).unwrap_or_else(|e| panic!("{kind}: {e}"));
        assert_eq!(
            first_diff(&read_view(&p), &view),
            None,
            "{kind}: destination"
        );
        assert_eq!(
            first_diff(&read_view(&c), &child_view),
            None,
            "{kind}: child"
        );
        assert_eq!(r.relinked, vec![c.clone()]);
        // The zeros count, and verify covers them: 4 MiB past I's end but S's 4 KiB.
        assert_eq!(r.plan.zeroed_bytes, (4 << 20) - 4096, "{kind}");
        assert_eq!(r.bytes_merged, r.plan.bytes_total, "{kind}");
        assert_eq!(r.verified.unwrap().bytes, r.bytes_merged, "{kind}");
        assert!(i.exists() && s.exists());
        // Re-running is a no-op on the content (C is now a child of P: --force).
        let o = MergeOptions::default().force(true);
        let again = merge(&s, Some(&p), &o).unwrap();
        assert_eq!(again.bytes_merged, r.bytes_merged);
        assert_eq!(first_diff(&read_view(&p), &view), None, "{kind}: rerun");
    }
}

/// Several smaller intermediates, of different sizes, and one next to the destination: the
/// smallest one decides where the zeros start.
#[test]
fn merge_through_several_smaller_intermediates() {
    let dir = fast_tempdir();
    let deep = [16384, 12000, 6000, 16384, 16384];
    let adjacent = [16384, 16384, 12000, 9000, 20000];
    let cases = [
        (deep, 4, BaseKind::Fixed),
        (deep, 4, BaseKind::Dynamic),
        (deep, 3, BaseKind::Dynamic),
        (adjacent, 4, BaseKind::Fixed),
        (adjacent, 4, BaseKind::Dynamic),
    ];
    for (k, (sizes, d, kind)) in cases.into_iter().enumerate() {
        let sub = dir.path().join(k.to_string());
        std::fs::create_dir(&sub).unwrap();
        let bs = vec![512 * KIB, MIB, 64 * KIB, 2 * MIB, MIB];
        let s = spec(5, kind, bs, vec![40, 70, 50, 60, 100], 0, 77 + k as u64);
        let built = build_chain_sized(&sub, &s, &sizes);
        let view = built.model.view(0);
        let o = MergeOptions::default().verify(true);
        merge(&built.paths[0], Some(&built.paths[d]), &o).unwrap();
        let got = read_view(&built.paths[d]);
        assert_eq!(
            first_diff(&got[..view.len()], &view),
            None,
            "{sizes:?} {d} {kind:?}"
        );
        assert_eq!(got, built.model.merged(d));
    }
}

/// The same chain through the CLI: --verify and --relink; the destination reads as the source
/// did, the child as it did.
#[cfg(feature = "cli")]
#[test]
fn cli_merge_through_a_smaller_intermediate() {
    let dir = fast_tempdir();
    let ([s, _, p, c], view) = hidden_by_smaller_intermediate(dir.path(), "dynamic");
    let child_view = read_view(&c);
    let (ok, v, err) = cli(&[
        s.as_os_str(),
        p.as_os_str(),
        std::ffi::OsStr::new("--dry-run"),
        std::ffi::OsStr::new("--json"),
    ]);
    assert!(ok, "{v} {err}");
    assert_eq!(v["plan"]["zeroed_bytes"].as_u64(), Some((4 << 20) - 4096));
    let (ok, v, err) = cli(&[
        s.as_os_str(),
        p.as_os_str(),
        std::ffi::OsStr::new("--verify"),
        std::ffi::OsStr::new("--relink"),
        c.as_os_str(),
        std::ffi::OsStr::new("--json"),
    ]);
    assert!(ok, "{v} {err}");
    assert_eq!(first_diff(&read_view(&p), &view), None, "destination");
    assert_eq!(first_diff(&read_view(&c), &child_view), None, "child");
    let merged = v["bytes_merged"].as_u64().unwrap();
    assert_eq!(v["verified"]["bytes"].as_u64(), Some(merged));
    assert!(merged >= (4 << 20) - 4096 + (1 << 20), "{v}");
}
