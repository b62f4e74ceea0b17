//! Block cloning (issue 14): merges and flattens that share the source's extents instead of
//! copying them, where one layer provides a whole destination unit.
//!
//! - On any file system, through a storage whose clones are copies with the alignment rule of
//!   a real one (`common::storage::CopyClone`): random chains merge to exactly the model's
//!   result with and without cloning, and a crash at every write and clone (whole or torn)
//!   leaves a destination that a re-run finishes exactly.
//! - On a real reflink file system (`common::reflink`: `.ci/run` mounts a loop XFS): the same
//!   model comparison, FIEMAP showing that the destination's blocks are shared with the
//!   source (and not with `--no-clone`), fault injection at real clones, flatten to raw,
//!   fixed and dynamic, and the CLI. Without one these tests print a note and do not pass.
//! - On the normal file system (ext4 in CI): cloning is asked for once, refused, and the
//!   merge copies as before.

use crate::common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use common::model::{BaseKind, Built, ChainSpec, build_chain, old_or_merged};
use common::storage::{IoLog, copy_clone, copy_clone_up_to, faulty_copy_clone, recording, stacked};
use common::{assert_same, copy_dir, read_view, reflink};
use vhd_merge::create::{CreateOptions, create_differencing, create_dynamic};
use vhd_merge::io::FaultPlan;
use vhd_merge::merge::{MergeOptions, MergeReport, StorageWrapper, merge};
use vhd_merge::{Chain, ChainOptions, FlattenFormat, FlattenOptions, OpenOptions, Vhd, flatten};

const KIB: u32 = 1024;
const MIB: u32 = 1 << 20;

fn merge_into(built: &Built, d: usize, clone: bool, io: Option<StorageWrapper>) -> MergeReport {
    let options = MergeOptions::default()
        .set_clone(clone)
        .destination_io(io)
        .batch_bytes(4 << 20);
    merge(&built.paths[0], Some(&built.paths[d]), &options).unwrap()
}

/// Random chains whose layers hold many whole blocks (the clone candidates), with every
/// destination kind.
fn specs() -> Vec<(ChainSpec, usize)> {
    let spec = |base, block_sizes: Vec<u32>, seed| ChainSpec {
        size_sectors: 24576 + 8,
        base,
        density: vec![70; block_sizes.len()],
        block_sizes,
        seed,
    };
    vec![
        (spec(BaseKind::Dynamic, vec![2 * MIB, 2 * MIB], 1), 1),
        (spec(BaseKind::Dynamic, vec![512 * KIB, 2 * MIB], 2), 1),
        (spec(BaseKind::Fixed, vec![MIB, 2 * MIB], 3), 1),
        (spec(BaseKind::Dynamic, vec![2 * MIB, MIB, 512 * KIB], 4), 2),
        (spec(BaseKind::Dynamic, vec![MIB, 2 * MIB, MIB], 5), 1),
    ]
}

/// Merge each chain of [`specs`] built in `dir` twice, cloning (through `io`) and copying:
/// both destinations read exactly the model's result. Returns the bytes cloned in all.
fn with_and_without(dir: &Path, io: impl Fn() -> Option<StorageWrapper>) -> u64 {
    let mut cloned = 0;
    for (i, (spec, d)) in specs().into_iter().enumerate() {
        let (a, b) = (dir.join(format!("clone{i}")), dir.join(format!("copy{i}")));
        std::fs::create_dir(&a).unwrap();
        std::fs::create_dir(&b).unwrap();
        let built = build_chain(&a, &spec);
        copy_dir(&a, &b);
        let copy = Built {
            paths: built
                .paths
                .iter()
                .map(|p| b.join(p.file_name().unwrap()))
                .collect(),
            format: built.format,
            model: built.model.clone(),
        };
        let r1 = merge_into(&built, d, true, io());
        let r2 = merge_into(&copy, d, false, None);
        assert_eq!(r2.bytes_cloned, 0);
        assert_eq!(r1.bytes_merged, r2.bytes_merged, "chain {i}");
        assert!(
            r1.bytes_cloned <= r1.plan.clone_candidate_bytes,
            "chain {i}"
        );
        let want = built.model.merged(d);
        assert_same(
            &read_view(&built.paths[d]),
            &want,
            &format!("chain {i} cloned"),
        );
        assert_same(
            &read_view(&copy.paths[d]),
            &want,
            &format!("chain {i} copied"),
        );
        cloned += r1.bytes_cloned;
    }
    cloned
}

#[test]
fn merges_clone_or_copy_to_the_same_result_on_any_file_system() {
    let dir = tempfile::tempdir().unwrap();
    let cloned = with_and_without(dir.path(), || Some(copy_clone()));
    assert!(cloned > 0, "no unit was cloned");
}

#[test]
fn merges_clone_or_copy_to_the_same_result_on_reflink() {
    let Some(dir) = reflink::tempdir() else {
        return;
    };
    let cloned = with_and_without(dir.path(), || None);
    assert!(cloned > 0, "no unit was cloned on a reflink file system");
}

/// A crash at every write and clone of a cloning merge (whole or torn), then a re-run.
fn crash_everywhere(dir: &Path, io: impl Fn(Arc<FaultPlan>) -> StorageWrapper) {
    let spec = ChainSpec {
        size_sectors: 16384,
        base: BaseKind::Dynamic,
        block_sizes: vec![MIB, MIB],
        density: vec![80, 30],
        seed: 9,
    };
    let clean = dir.join("clean");
    std::fs::create_dir(&clean).unwrap();
    let built = build_chain(&clean, &spec);
    let old = read_view(&built.paths[1]);
    let want = built.model.merged(1);
    let counting = FaultPlan::new();
    let work = dir.join("count");
    let run = |at: &Path, io: StorageWrapper| {
        std::fs::create_dir_all(at).unwrap();
        copy_dir(&clean, at);
        let paths: Vec<PathBuf> = built
            .paths
            .iter()
            .map(|p| at.join(p.file_name().unwrap()))
            .collect();
        let options = MergeOptions::default()
            .destination_io(Some(io))
            .batch_bytes(2 << 20);
        (merge(&paths[0], None, &options), paths)
    };
    let (r, _) = run(&work, io(counting.clone()));
    let report = r.unwrap();
    assert!(report.bytes_cloned > 0, "the clean run cloned nothing");
    let writes = counting.writes();
    for n in 1..=writes {
        for torn in [false, true] {
            let at = dir.join(format!("w{n}{torn}"));
            let (r, paths) = run(&at, io(FaultPlan::crash_at_write(n, torn)));
            assert!(r.is_err(), "write {n} torn {torn}: the merge did not fail");
            let view = read_view(&paths[1]);
            if let Err(e) = old_or_merged(&view, &old, &want, torn) {
                panic!("write {n} torn {torn}: {e}");
            }
            let again = merge(&paths[0], None, &MergeOptions::default()).unwrap();
            assert!(again.bytes_merged > 0);
            assert_same(
                &read_view(&paths[1]),
                &want,
                &format!("re-run after write {n} torn {torn}"),
            );
            std::fs::remove_dir_all(&at).unwrap();
        }
    }
    common::note(&format!(
        "crashed at each of {writes} writes and clones, whole and torn"
    ));
}

#[test]
fn a_crash_at_any_clone_or_write_leaves_a_destination_a_rerun_finishes() {
    let dir = common::fast_tempdir();
    crash_everywhere(dir.path(), faulty_copy_clone);
}

#[test]
fn a_crash_at_any_real_clone_leaves_a_destination_a_rerun_finishes() {
    let Some(dir) = reflink::tempdir() else {
        return;
    };
    crash_everywhere(dir.path(), common::storage::faulty);
}

/// A dynamic base and a child holding `blocks` whole 2 MiB blocks of random data (every other
/// block, so the destination's new blocks are placed in another order than the source's).
fn full_block_chain(dir: &Path, blocks: u64) -> (PathBuf, PathBuf, Vec<u8>) {
    let (base, child) = (dir.join("base.vhd"), dir.join("child.vhd"));
    let size = blocks * 2 * 2 * u64::from(MIB);
    drop(create_dynamic(&base, size, &CreateOptions::default()).unwrap());
    let mut c = create_differencing(&child, &base, &CreateOptions::default()).unwrap();
    let mut want = vec![0u8; size as usize];
    let mut rng = common::Rng::new(5);
    for b in (0..2 * blocks).rev().step_by(2) {
        let at = (b * 2 * u64::from(MIB)) as usize;
        let data = &mut want[at..at + 2 * MIB as usize];
        rng.fill(data);
        c.write_at(at as u64, data).unwrap();
    }
    (base, child, want)
}

#[test]
fn a_merge_on_reflink_shares_the_source_extents_and_no_clone_does_not() {
    let Some(dir) = reflink::tempdir() else {
        return;
    };
    for clone in [true, false] {
        let d = dir.path().join(format!("{clone}"));
        std::fs::create_dir(&d).unwrap();
        let (base, child, want) = full_block_chain(&d, 8);
        let r = merge(&child, None, &MergeOptions::default().set_clone(clone)).unwrap();
        let bytes = 16u64 << 20;
        assert_eq!(r.bytes_merged, bytes);
        assert_eq!(r.plan.clone_candidate_bytes, bytes);
        assert_same(&read_view(&base), &want, "merged base");
        let shared = reflink::shared_bytes(&base);
        if clone {
            assert_eq!(r.bytes_cloned, bytes);
            assert!(
                shared >= bytes,
                "only {shared} bytes of the base are shared"
            );
            assert!(reflink::shared_bytes(&child) >= bytes);
        } else {
            assert_eq!((r.bytes_cloned, shared), (0, 0));
        }
    }
}

#[test]
fn on_a_file_system_without_reflink_cloning_is_asked_once_and_the_merge_copies() {
    let dir = tempfile::tempdir().unwrap();
    let (base, child, want) = full_block_chain(dir.path(), 4);
    let log = IoLog::new();
    let options = MergeOptions::default().destination_io(Some(recording(log.clone())));
    let r = merge(&child, None, &options).unwrap();
    assert_same(&read_view(&base), &want, "merged base");
    if r.bytes_cloned > 0 {
        common::note("the temporary directory is on a reflink file system: fallback not tested");
        return;
    }
    assert_eq!(log.clones().len(), 1, "{:?}", log.clones());
    assert_eq!(r.bytes_merged, 8 << 20);
}

fn flatten_to(chain: &Chain, out: &Path, format: FlattenFormat, clone: bool) -> u64 {
    let opts = FlattenOptions::default().format(format).set_clone(clone);
    let r = flatten(chain, out, opts).unwrap();
    if !clone {
        assert_eq!(r.bytes_cloned, 0);
    }
    r.bytes_cloned
}

/// The content of a flatten output: raw bytes, or a disk's view.
fn content(path: &Path, format: FlattenFormat) -> Vec<u8> {
    match format {
        FlattenFormat::Raw => common::read(path),
        _ => view(path),
    }
}

#[test]
fn flatten_on_reflink_clones_into_raw_fixed_dynamic_and_vhdx_outputs() {
    let Some(dir) = reflink::tempdir() else {
        return;
    };
    let (_, child, want) = full_block_chain(dir.path(), 4);
    let chain = Chain::open(&child, &ChainOptions::default()).unwrap();
    for format in [
        FlattenFormat::Raw,
        FlattenFormat::Fixed,
        FlattenFormat::Dynamic,
        FlattenFormat::VhdxFixed,
        FlattenFormat::VhdxDynamic,
    ] {
        let (a, b) = (
            dir.path().join(format!("a.{}", format.name())),
            dir.path().join(format!("b.{}", format.name())),
        );
        let cloned = flatten_to(&chain, &a, format, true);
        flatten_to(&chain, &b, format, false);
        assert_eq!(cloned, 8 << 20, "{}", format.name());
        assert!(reflink::shared_bytes(&a) >= 8 << 20, "{}", format.name());
        assert_eq!(reflink::shared_bytes(&b), 0, "{}", format.name());
        assert_same(&content(&a, format), &want, format.name());
        assert_same(&content(&b, format), &want, format.name());
    }
    let v = Vhd::open(dir.path().join("a.dynamic"), OpenOptions::read_only()).unwrap();
    assert_eq!(v.allocated_blocks(), 4);
}

#[test]
fn cli_merge_reports_cloned_bytes_and_no_clone_copies() {
    let (Some(bin), Some(dir)) = (common::binary(), reflink::tempdir()) else {
        return;
    };
    for (flag, want) in [("--no-clone", 0u64), ("--verify", 8 << 20)] {
        let d = dir.path().join(flag.trim_start_matches('-'));
        std::fs::create_dir(&d).unwrap();
        let (_, child, _) = full_block_chain(&d, 4);
        let out = Command::new(&bin)
            .args(["merge", "--json", flag])
            .arg(&child)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(v["bytes_cloned"], want, "{v}");
        assert_eq!(v["bytes_copied"], (8u64 << 20) - want, "{v}");
    }
}

/// The view of the disk at `path` through its chain, whatever its format.
fn view(path: &Path) -> Vec<u8> {
    let chain = Chain::open(path, &ChainOptions::default()).unwrap();
    let mut buf = vec![0u8; chain.layer(0).unwrap().virtual_size() as usize];
    chain.read_at(0, 0, &mut buf).unwrap();
    buf
}

/// A dynamic VHDX base with 2 MiB blocks (some of its own data) and a differencing child
/// holding four whole blocks (clone candidates) and part of another (copied). The child's
/// blocks lie in its file in the order written, none next to the one after it in the disk.
fn vhdx_chain(dir: &Path) -> (PathBuf, PathBuf, Vec<u8>) {
    vhdx_chain_of(dir, [12, 2, 6, 0])
}

/// [`vhdx_chain`] with the child's four whole blocks `whole`, written in that order.
fn vhdx_chain_of(dir: &Path, whole: [usize; 4]) -> (PathBuf, PathBuf, Vec<u8>) {
    use vhd_merge::vhdx::create::{CreateOptions, create_differencing, create_dynamic};
    let (base, child) = (dir.join("base.vhdx"), dir.join("child.vhdx"));
    let bs = 2 * MIB as usize;
    let opts = CreateOptions::default().block_size(Some(bs as u32));
    let mut rng = common::Rng::new(3);
    let mut want = vec![0u8; 16 * bs];
    let mut b = create_dynamic(&base, want.len() as u64, &opts).unwrap();
    let mut write = |v: &mut vhd_merge::vhdx::Vhdx<_>, block: usize, sectors: usize| {
        let data = &mut want[block * bs..block * bs + sectors * 512];
        rng.fill(data);
        let mask = vhd_merge::bitmap::SectorBitmap::full(sectors);
        v.write_sectors(block as u64, 0, data, &mask).unwrap();
    };
    for block in [1, 2, 9] {
        write(&mut b, block, bs / 512);
    }
    b.finish().unwrap();
    drop(b);
    let mut c = create_differencing(&child, &base, &opts).unwrap();
    for block in whole {
        write(&mut c, block, bs / 512);
    }
    write(&mut c, 9, 40);
    c.finish().unwrap();
    (base, child, want)
}

/// A VHDX merge clones the child's whole blocks (through `io`, or for real when `None`) and
/// reads exactly like the merge that copies.
fn vhdx_with_and_without(dir: &Path, io: Option<StorageWrapper>) -> u64 {
    let mut cloned = 0;
    for clone in [true, false] {
        let d = dir.join(format!("vhdx-{clone}"));
        std::fs::create_dir(&d).unwrap();
        let (base, child, want) = vhdx_chain(&d);
        let options = MergeOptions::default()
            .set_clone(clone)
            .destination_io(io.clone().filter(|_| clone));
        let r = merge(&child, None, &options).unwrap();
        assert_same(
            &view(&base),
            &want,
            &format!("merged VHDX base, clone {clone}"),
        );
        assert_eq!(r.bytes_merged, (4 << 21) + 40 * 512);
        assert_eq!(r.plan.clone_candidate_bytes, 4 << 21);
        if clone {
            cloned = r.bytes_cloned;
        }
    }
    cloned
}

#[test]
fn a_vhdx_merge_clones_whole_blocks_on_any_file_system() {
    let dir = tempfile::tempdir().unwrap();
    assert_eq!(
        vhdx_with_and_without(dir.path(), Some(copy_clone())),
        4 << 21
    );
}

#[test]
fn a_vhdx_merge_on_reflink_shares_the_source_extents() {
    let Some(dir) = reflink::tempdir() else {
        return;
    };
    assert_eq!(vhdx_with_and_without(dir.path(), None), 4 << 21);
    let base = dir.path().join("vhdx-true").join("base.vhdx");
    assert!(reflink::shared_bytes(&base) >= 4 << 21);
}

#[test]
fn a_crash_at_any_clone_or_write_into_a_vhdx_leaves_a_destination_a_rerun_finishes() {
    vhdx_crash_everywhere(vhdx_chain);
}

/// Whole blocks for [`vhdx_chain_of`]: 3, 4 and 5 lie one after the other in the child (12,
/// written first, is followed by the child's sector bitmap block) and go to new blocks one
/// after the other in the base: one clone of 6 MiB, then one of block 12.
const ADJACENT: [usize; 4] = [12, 3, 4, 5];

/// Crashes (whole and torn) inside the one clone of a run of adjacent blocks too.
#[test]
fn a_crash_inside_a_clone_of_adjacent_vhdx_blocks_leaves_a_destination_a_rerun_finishes() {
    vhdx_crash_everywhere(|d| vhdx_chain_of(d, ADJACENT));
}

/// Whole blocks adjacent in both files are cloned by one call for the whole stretch, with
/// the same result; where the file system refuses that long a clone, each block is cloned
/// on its own (the units are placed as without the run), and where it cannot clone at all,
/// they are written.
#[test]
fn adjacent_vhdx_blocks_are_cloned_by_one_call() {
    let dir = tempfile::tempdir().unwrap();
    let block = 2 << 20;
    for (name, longest, cloned, clones) in [
        ("one", u64::MAX, 4 * block, vec![3 * block, block]),
        (
            "each",
            block,
            4 * block,
            vec![3 * block, block, block, block, block],
        ),
        // Block 12 (after the copied block 9) is a run of its own, asked again alone.
        (
            "none",
            0,
            0,
            vec![3 * block, block, block, block, block, block],
        ),
    ] {
        let d = dir.path().join(name);
        std::fs::create_dir(&d).unwrap();
        merge_counting_clones(vhdx_chain_of(&d, ADJACENT), name, longest, cloned, &clones);
    }
}

/// Merge `chain`'s child (four whole 2 MiB blocks and 40 sectors) into its base through
/// copying clones refused past `longest` bytes: the model's result, `cloned` bytes cloned by
/// calls of lengths `clones`. Returns the base.
fn merge_counting_clones(
    chain: (PathBuf, PathBuf, Vec<u8>),
    name: &str,
    longest: u64,
    cloned: u64,
    clones: &[u64],
) -> PathBuf {
    let (base, child, want) = chain;
    let log = IoLog::new();
    let options = MergeOptions::default().destination_io(Some(stacked(
        recording(log.clone()),
        copy_clone_up_to(longest),
    )));
    let r = merge(&child, None, &options).unwrap();
    assert_same(&view(&base), &want, &format!("merged base, {name}"));
    assert_eq!(r.bytes_merged, 4 * (2 << 20) + 40 * 512, "{name}");
    assert_eq!(r.bytes_cloned, cloned, "{name}");
    let lens: Vec<u64> = log.clones().iter().map(|c| c.1).collect();
    assert_eq!(lens, clones, "{name}: the clone calls");
    base
}

/// Merge `chain` (four whole blocks) on a reflink file system: cloned, shared, the same.
fn shares_on_reflink(chain: impl Fn(&Path) -> (PathBuf, PathBuf, Vec<u8>)) {
    let Some(dir) = reflink::tempdir() else {
        return;
    };
    let (base, child, want) = chain(dir.path());
    let r = merge(&child, None, &MergeOptions::default()).unwrap();
    assert_eq!(r.bytes_cloned, 4 << 21);
    assert_same(&view(&base), &want, "merged base");
    assert!(reflink::shared_bytes(&base) >= 4 << 21);
}

#[test]
fn adjacent_vhdx_blocks_on_reflink_share_the_source_extents() {
    shares_on_reflink(|d| vhdx_chain_of(d, ADJACENT));
}

/// A crash at every write and clone of a merge of `chain`'s child into its base (through
/// copying clones), whole and torn, leaves a base that a re-run finishes exactly.
fn vhdx_crash_everywhere(chain: impl Fn(&Path) -> (PathBuf, PathBuf, Vec<u8>)) {
    whole_blocks_crash_everywhere(chain, "child.vhdx")
}

/// [`vhdx_crash_everywhere`] for a chain of either format whose child is `child_name` and
/// holds four whole blocks.
fn whole_blocks_crash_everywhere(
    chain: impl Fn(&Path) -> (PathBuf, PathBuf, Vec<u8>),
    child_name: &str,
) {
    let dir = common::fast_tempdir();
    let clean = dir.path().join("clean");
    std::fs::create_dir(&clean).unwrap();
    let (_, _, want) = chain(&clean);
    let run = |at: &Path, plan: Arc<FaultPlan>| {
        std::fs::create_dir_all(at).unwrap();
        copy_dir(&clean, at);
        let options = MergeOptions::default().destination_io(Some(faulty_copy_clone(plan)));
        merge(at.join(child_name), None, &options)
    };
    let counting = FaultPlan::new();
    assert_eq!(
        run(&dir.path().join("count"), counting.clone())
            .unwrap()
            .bytes_cloned,
        4 << 21
    );
    for n in 1..=counting.writes() {
        for torn in [false, true] {
            let at = dir.path().join(format!("w{n}{torn}"));
            assert!(
                run(&at, FaultPlan::crash_at_write(n, torn)).is_err(),
                "write {n}"
            );
            let child = at.join(child_name);
            let again = merge(&child, None, &MergeOptions::default()).unwrap();
            assert!(again.bytes_merged > 0);
            assert_same(
                &view(&child),
                &want,
                &format!("re-run after write {n} torn {torn}"),
            );
            std::fs::remove_dir_all(&at).unwrap();
        }
    }
}

/// A dynamic VHD base (2 MiB blocks, empty) and a differencing child holding whole blocks
/// `whole`, written in that order, and 40 sectors of block 7 (copied).
fn vhd_chain_of(dir: &Path, whole: [u64; 4]) -> (PathBuf, PathBuf, Vec<u8>) {
    let (base, child) = (dir.join("base.vhd"), dir.join("child.vhd"));
    let block = 2 * u64::from(MIB);
    drop(create_dynamic(&base, 8 * block, &CreateOptions::default()).unwrap());
    let mut c = create_differencing(&child, &base, &CreateOptions::default()).unwrap();
    let mut want = vec![0u8; 8 * block as usize];
    let mut rng = common::Rng::new(11);
    for (b, len) in whole.iter().map(|&b| (b, block)).chain([(7, 40 * 512)]) {
        let at = (b * block) as usize;
        let data = &mut want[at..at + len as usize];
        rng.fill(data);
        c.write_at(at as u64, data).unwrap();
    }
    (base, child, want)
}

/// Whole blocks for [`vhd_chain_of`]: 1, 2 and 3 lie one after the other in the child (each
/// behind its bitmap, the same stride as the base's new blocks) and go to new blocks one
/// after the other in the base: one clone over the three (and the two bitmaps between),
/// then one of block 5.
const ADJACENT_VHD: [u64; 4] = [5, 1, 2, 3];

/// Whole VHD blocks in consecutive new blocks from source blocks of the same stride are
/// cloned by one call, with the same result; where the file system refuses that long a
/// clone, each block is cloned on its own, and where it cannot clone, they are written.
#[test]
fn adjacent_vhd_blocks_are_cloned_by_one_call() {
    let dir = tempfile::tempdir().unwrap();
    let block = 2 << 20;
    let stretch = 3 * block + 2 * 4096;
    for (name, longest, cloned, clones) in [
        ("one", u64::MAX, 4 * block, vec![stretch, block]),
        // Refused whole, the stretch is tried block by block: block 1 alone, then 2 and 3
        // as a stretch of their own (refused), 2 alone, 3 alone, then block 5.
        (
            "each",
            block,
            4 * block,
            vec![stretch, block, 2 * block + 4096, block, block, block],
        ),
        // Every unit is then placed alone, as without the run.
        (
            "none",
            0,
            0,
            vec![stretch, block, block, block, block, block],
        ),
    ] {
        let d = dir.path().join(name);
        std::fs::create_dir(&d).unwrap();
        let chain = vhd_chain_of(&d, ADJACENT_VHD);
        let base = merge_counting_clones(chain, name, longest, cloned, &clones);
        let options = vhd_merge::check::CheckOptions::default();
        let report = vhd_merge::check::check_file(&base, &options).unwrap();
        assert!(report.findings.is_empty(), "{name}: {:?}", report.findings);
    }
}

/// Crashes (whole and torn) inside the one clone of a VHD stretch too.
#[test]
fn a_crash_inside_a_clone_of_a_vhd_stretch_leaves_a_destination_a_rerun_finishes() {
    whole_blocks_crash_everywhere(|d| vhd_chain_of(d, ADJACENT_VHD), "child.vhd");
}

#[test]
fn adjacent_vhd_blocks_on_reflink_share_the_source_extents() {
    shares_on_reflink(|d| vhd_chain_of(d, ADJACENT_VHD));
}

/// Blocks of 2 MiB (4096 sectors) in the chains of [`mostly_chain`].
const SPB: usize = 4096;

/// What each layer of [`mostly_chain`] holds (0: the dynamic base, 1: the middle layer, 2: the
/// child), by block: the child holds most (95 %) of blocks 0, 3, 4, 5 and 7, the middle layer
/// all of block 0 and half of block 3 (so the child's holes there come from it, or are zeros),
/// the base blocks 1 and 5 (an allocated destination block: never cloned and patched); the
/// child's block 6 is half held (copied), block 8 held but for 16 holes (too many to patch:
/// copied) and block 9 whole (cloned as is).
fn mostly_layout() -> Vec<(usize, u64, vhd_merge::bitmap::SectorBitmap)> {
    use vhd_merge::bitmap::SectorBitmap;
    let range = |r: std::ops::Range<usize>| {
        let mut m = SectorBitmap::new(SPB);
        m.set_range(r);
        m
    };
    let mut mostly = SectorBitmap::full(SPB);
    mostly.clear_range(8..16);
    mostly.clear_range(3000..3200);
    let mut out = vec![(0, 1, range(0..SPB)), (0, 5, range(0..SPB))];
    out.extend([(1, 0, range(0..SPB)), (1, 3, range(0..SPB / 2))]);
    out.extend([0, 3, 4, 5, 7].map(|b| (2, b, mostly.clone())));
    let mut holed = SectorBitmap::full(SPB);
    (0..SPB)
        .step_by(256)
        .for_each(|s| holed.clear_range(s..s + 8));
    out.extend([
        (2, 6, range(0..SPB / 2)),
        (2, 8, holed),
        (2, 9, range(0..SPB)),
    ]);
    out
}

/// Bytes a cloning merge of [`mostly_chain`]'s child into its base clones: the child's part
/// of blocks 0, 3, 4 and 7 (cloned whole, then patched) and its block 9.
const MOSTLY_CLONED: u64 = ((4 * (SPB - 208) + SPB) * 512) as u64;

/// The chain of [`mostly_layout`] (16 blocks of 2 MiB, random data), VHD or VHDX: the paths,
/// child first, and the child's view.
fn mostly_chain(dir: &Path, vhdx: bool) -> (Vec<PathBuf>, Vec<u8>) {
    use vhd_merge::vhdx::create as x;
    let ext = if vhdx { "vhdx" } else { "vhd" };
    let paths: Vec<PathBuf> = ["child", "mid", "base"]
        .iter()
        .map(|n| dir.join(format!("{n}.{ext}")))
        .collect();
    let size = 16 * SPB as u64 * 512;
    let mut want = vec![0u8; size as usize];
    let mut rng = common::Rng::new(11);
    let xo = x::CreateOptions::default().block_size(Some(2 * MIB));
    for l in 0..3 {
        let path = &paths[2 - l];
        let mut buf = vec![0u8; SPB * 512];
        let mine: Vec<_> = mostly_layout().into_iter().filter(|e| e.0 == l).collect();
        let mut write = |w: &mut dyn FnMut(u64, &mut [u8], &vhd_merge::bitmap::SectorBitmap)| {
            for (_, b, mask) in &mine {
                rng.fill(&mut buf);
                for r in mask.runs() {
                    let at = *b as usize * SPB * 512;
                    want[at + r.start * 512..at + r.end * 512]
                        .copy_from_slice(&buf[r.start * 512..r.end * 512]);
                }
                w(*b, &mut buf, mask);
            }
        };
        if vhdx {
            let mut v = match l {
                0 => x::create_dynamic(path, size, &xo).unwrap(),
                _ => x::create_differencing(path, &paths[3 - l], &xo).unwrap(),
            };
            write(&mut |b, d, m| v.write_sectors(b, 0, d, m).unwrap());
            v.finish().unwrap();
        } else {
            let o = CreateOptions::default();
            let mut v = match l {
                0 => create_dynamic(path, size, &o).unwrap(),
                _ => create_differencing(path, &paths[3 - l], &o).unwrap(),
            };
            v.reserve_blocks(mine.len() as u64).unwrap();
            write(&mut |b, d, m| v.write_block(b, d, m).unwrap());
            v.finish().unwrap();
        }
    }
    (paths, want)
}

/// Merge [`mostly_chain`] (VHD and VHDX) into its base twice, cloning (through `io`) and
/// copying: both read exactly the child's view, and the cloning one cloned
/// [`MOSTLY_CLONED`] bytes. Returns the cloning merges' bases.
fn mostly_with_and_without(dir: &Path, io: impl Fn() -> Option<StorageWrapper>) -> Vec<PathBuf> {
    let mut bases = Vec::new();
    for vhdx in [false, true] {
        for clone in [true, false] {
            let d = dir.join(format!("mostly-{vhdx}-{clone}"));
            std::fs::create_dir(&d).unwrap();
            let (paths, want) = mostly_chain(&d, vhdx);
            let options = MergeOptions::default()
                .set_clone(clone)
                .destination_io(io().filter(|_| clone));
            let r = merge(&paths[0], Some(&paths[2]), &options).unwrap();
            let what = format!("VHDX {vhdx}, clone {clone}");
            assert_same(&view(&paths[2]), &want, &what);
            assert_eq!(r.plan.clone_candidate_bytes, MOSTLY_CLONED, "{what}");
            assert_eq!(
                r.bytes_cloned,
                if clone { MOSTLY_CLONED } else { 0 },
                "{what}"
            );
            if clone {
                bases.push(paths[2].clone());
            }
        }
    }
    bases
}

#[test]
fn blocks_mostly_held_by_the_source_are_cloned_whole_and_patched_on_any_file_system() {
    let dir = tempfile::tempdir().unwrap();
    mostly_with_and_without(dir.path(), || Some(copy_clone()));
}

#[test]
fn blocks_mostly_held_by_the_source_are_cloned_whole_and_patched_on_reflink() {
    let Some(dir) = reflink::tempdir() else {
        return;
    };
    for base in mostly_with_and_without(dir.path(), || None) {
        let shared = reflink::shared_bytes(&base);
        assert!(
            shared >= 4 << 21,
            "{}: {shared} bytes shared",
            base.display()
        );
    }
}

/// A crash at every write and clone (whole or torn) of a merge of [`mostly_chain`], through
/// `io`: the base reads its old or its merged content, sector by sector, and a re-run
/// finishes it exactly.
fn mostly_crash_everywhere(dir: &Path, io: impl Fn(Arc<FaultPlan>) -> StorageWrapper) {
    for vhdx in [false, true] {
        let clean = dir.join(format!("clean-{vhdx}"));
        std::fs::create_dir(&clean).unwrap();
        let (paths, want) = mostly_chain(&clean, vhdx);
        let old = view(&paths[2]);
        let names: Vec<_> = paths.iter().map(|p| p.file_name().unwrap()).collect();
        let run = |at: &Path, plan: Arc<FaultPlan>| {
            std::fs::create_dir_all(at).unwrap();
            copy_dir(&clean, at);
            let options = MergeOptions::default()
                .destination_io(Some(io(plan)))
                .batch_bytes(4 << 20);
            merge(at.join(names[0]), Some(&at.join(names[2])), &options)
        };
        let counting = FaultPlan::new();
        let r = run(&dir.join(format!("count-{vhdx}")), counting.clone()).unwrap();
        assert_eq!(r.bytes_cloned, MOSTLY_CLONED, "VHDX {vhdx}");
        for n in 1..=counting.writes() {
            for torn in [false, true] {
                let at = dir.join(format!("w{vhdx}{n}{torn}"));
                let what = format!("VHDX {vhdx}, write {n} torn {torn}");
                assert!(
                    run(&at, FaultPlan::crash_at_write(n, torn)).is_err(),
                    "{what}"
                );
                let base = at.join(names[2]);
                if let Err(e) = old_or_merged(&view(&base), &old, &want, torn) {
                    panic!("{what}: {e}");
                }
                merge(at.join(names[0]), Some(&base), &MergeOptions::default()).unwrap();
                assert_same(&view(&base), &want, &format!("re-run after {what}"));
                std::fs::remove_dir_all(&at).unwrap();
            }
        }
    }
}

#[test]
fn a_crash_at_any_write_of_a_clone_and_patch_merge_leaves_a_destination_a_rerun_finishes() {
    let dir = common::fast_tempdir();
    mostly_crash_everywhere(dir.path(), faulty_copy_clone);
}

#[test]
fn a_crash_at_any_real_clone_and_patch_leaves_a_destination_a_rerun_finishes() {
    let Some(dir) = reflink::tempdir() else {
        return;
    };
    mostly_crash_everywhere(dir.path(), common::storage::faulty);
}
