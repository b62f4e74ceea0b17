//! The merge model test at scale (issue 6, item 8): thousands of random merges of small
//! chains, each checked against the in-memory model of `tests/common/model.rs`.
//!
//! Each case draws a chain of 2 to 7 layers (depth 1 to 6) over a small virtual size (16 KiB
//! to 2 MiB, not always a multiple of the block size; in most cases each layer has its own,
//! smaller or larger, the source never larger than the destination), block sizes mixed per layer among
//! 4 KiB to 2 MiB (so blocks larger than the disk too), a fixed or dynamic base, partial
//! bitmaps at sector granularity, zero data under set bits, blocks stored out of order; a
//! destination at any level (fixed, dynamic or differencing), verify on or off, a random
//! batch size; and in some cases a fault (a crash at a write, whole or torn, a failing sync,
//! a full disk) before the completing run. Afterwards the destination reads exactly as the
//! model says, the source's view is unchanged, and no other file changed.
//!
//! `cargo test --release --test suite merge_scale::` runs `VHD_MERGE_SCALE_CASES` cases (default
//! 8000 in a release build, 60 in a debug build) in two shards, starting at seed
//! `VHD_MERGE_SCALE_SEED` (default 0). A failure names its seed; rerun one case with
//! `VHD_MERGE_SCALE_SEED=<seed> VHD_MERGE_SCALE_CASES=1`.

use crate::common;

use std::time::Instant;

use common::model::{BaseKind, ChainSpec, build_chain_sized, old_or_merged};
use common::storage::faulty;
use common::{Rng, deep_check_errors, fast_tempdir, first_diff, hashes, read_view};
use vhd_merge::io::FaultPlan;
use vhd_merge::merge::{MergeOptions, merge};
use vhd_merge::{OpenOptions, Vhd};

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

fn case_count() -> u64 {
    env_u64("VHD_MERGE_SCALE_CASES").unwrap_or(if cfg!(debug_assertions) { 60 } else { 8000 })
}

const BLOCK_SIZES: [u32; 7] = [
    4 << 10,
    8 << 10,
    64 << 10,
    256 << 10,
    512 << 10,
    1 << 20,
    2 << 20,
];

/// One random case.
#[derive(Debug)]
struct Case {
    seed: u64,
    spec: ChainSpec,
    /// Each layer's virtual size in sectors.
    sizes: Vec<u64>,
    dest: usize,
    explicit: bool,
    verify: bool,
    batch_bytes: u64,
    fault: Option<Fault>,
}

#[derive(Clone, Copy, Debug)]
enum Fault {
    Write(u64, bool),
    Sync(u64),
    Space(u64),
}

fn draw(seed: u64) -> Case {
    let mut rng = Rng::new(seed ^ 0x5CA1_E000);
    let n = 2 + rng.below(6) as usize;
    let size_sectors = match rng.below(4) {
        0 => 32 + rng.below(256),
        1 => 256 + rng.below(1024),
        2 => 1024 + rng.below(3072),
        _ => 4096 - rng.below(8),
    };
    let block_sizes = (0..n)
        .map(|_| BLOCK_SIZES[rng.below(BLOCK_SIZES.len() as u64) as usize])
        .collect();
    let density = (0..n).map(|_| rng.below(101)).collect();
    let base = if rng.chance(30) {
        BaseKind::Fixed
    } else {
        BaseKind::Dynamic
    };
    let dest = 1 + rng.below(n as u64 - 1) as usize;
    let batch_bytes = match rng.below(3) {
        0 => 1,
        1 => 4096 << rng.below(10),
        _ => 1 << 30,
    };
    let fault = match rng.below(10) {
        0 => Some(Fault::Write(1 + rng.below(40), rng.chance(50))),
        1 => Some(Fault::Sync(1 + rng.below(20))),
        2 => Some(Fault::Space(rng.below(64) * 4096)),
        _ => None,
    };
    let sizes = draw_sizes(&mut rng, n, dest, size_sectors);
    Case {
        seed,
        sizes,
        spec: ChainSpec {
            size_sectors,
            base,
            block_sizes,
            density,
            seed,
        },
        dest,
        explicit: dest > 1 || rng.chance(50),
        verify: rng.chance(50),
        batch_bytes,
        fault,
    }
}

/// Per-layer virtual sizes: in 60% of the cases every layer (source, intermediates,
/// destination, its ancestors) draws its own size around `size`, smaller or larger; the source
/// is never larger than the destination (that merge is refused). Else all layers are `size`.
fn draw_sizes(rng: &mut Rng, n: usize, dest: usize, size: u64) -> Vec<u64> {
    if !rng.chance(60) {
        return vec![size; n];
    }
    let mut sizes: Vec<u64> = (0..n)
        .map(|_| match rng.below(4) {
            0 => size,
            1 => 8 + rng.below(size),
            _ => size + 1 + rng.below(size),
        })
        .collect();
    if sizes[0] > sizes[dest] {
        sizes.swap(0, dest);
    }
    sizes
}

/// Prints the case when a check panics, so it can be replayed.
struct Replay<'a>(&'a Case);

impl Drop for Replay<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "failing case (replay with VHD_MERGE_SCALE_SEED={} VHD_MERGE_SCALE_CASES=1): {:#?}",
                self.0.seed, self.0
            );
        }
    }
}

#[derive(Default, Debug)]
struct Stats {
    cases: u64,
    layers: u64,
    faults_injected: u64,
    bytes_merged: u64,
    /// Cases whose merge wrote zeros past a smaller intermediate.
    zeroing: u64,
    destinations: [u64; 3],
}

fn run_case(c: &Case, stats: &mut Stats) {
    let _replay = Replay(c);
    let dir = fast_tempdir();
    let built = build_chain_sized(dir.path(), &c.spec, &c.sizes);
    let model = &built.model;
    let d = c.dest;
    let dest = built.paths[d].clone();
    let others = built.paths_except(d);
    let before = hashes(&others);
    let source_view = model.view(0);
    let expected = model.merged(d);
    assert_eq!(
        expected[..source_view.len()],
        source_view[..],
        "model: the destination takes the source's view"
    );
    let target = c.explicit.then_some(dest.as_path());
    let opts = MergeOptions::default()
        .verify(c.verify)
        .batch_bytes(c.batch_bytes);

    if let Some(f) = c.fault {
        let (plan, old_view) = (
            match f {
                Fault::Write(n, torn) => FaultPlan::crash_at_write(n, torn),
                Fault::Sync(n) => FaultPlan::fail_sync_at(n),
                Fault::Space(extra) => {
                    FaultPlan::out_of_space_at(std::fs::metadata(&dest).unwrap().len() + extra)
                }
            },
            model.view(d),
        );
        let o = opts.clone().destination_io(Some(faulty(plan.clone())));
        match merge(&built.paths[0], target, &o) {
            Ok(_) => assert!(
                !plan.crashed(),
                "a fault was injected, yet the merge succeeded"
            ),
            Err(e) => {
                stats.faults_injected += 1;
                assert_eq!(e.return_code(), vhd_merge::ReturnCode::Failed, "{e}");
                Vhd::open(&dest, OpenOptions::read_only())
                    .unwrap_or_else(|e| panic!("destination does not open after {f:?}: {e}"));
                let torn = matches!(f, Fault::Write(_, true));
                old_or_merged(&read_view(&dest), &old_view, &expected, torn)
                    .unwrap_or_else(|m| panic!("after {f:?}: {m}"));
                let from_copy = Vhd::open(&dest, OpenOptions::read_only())
                    .is_ok_and(|v| v.footer_source() == vhd_merge::image::FooterSource::Copy);
                let errors = deep_check_errors(&dest);
                assert!(
                    errors
                        .iter()
                        .all(|e| from_copy && e.code == "footer-end-bad"),
                    "after {f:?}: check --deep: {errors:#?}"
                );
                assert_eq!(hashes(&others), before, "a fault changed another file");
            }
        }
    }

    let report = merge(&built.paths[0], target, &opts).unwrap();
    let got = read_view(&dest);
    assert_eq!(
        first_diff(&got, &expected),
        None,
        "destination view differs from the model"
    );
    assert_eq!(
        first_diff(&read_view(&built.paths[0]), &source_view),
        None,
        "the source's view changed"
    );
    assert_eq!(
        hashes(&others),
        before,
        "a file other than the destination changed"
    );
    let (held, hidden) = model.merge_sectors(d);
    let data: u64 = report.plan.layers.iter().map(|l| l.bytes).sum();
    assert_eq!(data, held * 512);
    assert_eq!(report.bytes_merged, data + report.plan.zeroed_bytes);
    if report.plan.destination_type == vhd_merge::DiskType::Dynamic {
        // Zeros over an unallocated block of a dynamic disk are skipped: it reads zeros.
        assert!(report.plan.zeroed_bytes <= hidden * 512);
    } else {
        assert_eq!(report.plan.zeroed_bytes, hidden * 512);
    }
    if let Some(v) = &report.verified {
        assert_eq!(
            v.bytes, report.bytes_merged,
            "verify covers every written sector"
        );
    }
    assert_eq!(report.verified.is_some(), c.verify);
    let v = Vhd::open(&dest, OpenOptions::read_only()).unwrap();
    assert!(v.warnings().is_empty(), "{:?}", v.warnings());
    let kind = match v.disk_type() {
        vhd_merge::DiskType::Fixed => 0,
        vhd_merge::DiskType::Dynamic => 1,
        _ => 2,
    };
    stats.destinations[kind] += 1;
    stats.cases += 1;
    stats.layers += c.spec.block_sizes.len() as u64;
    stats.bytes_merged += report.bytes_merged;
    stats.zeroing += u64::from(report.plan.zeroed_bytes > 0);
}

fn shard(index: u64, shards: u64) {
    let total = case_count();
    let first = env_u64("VHD_MERGE_SCALE_SEED").unwrap_or(0);
    let t0 = Instant::now();
    let mut stats = Stats::default();
    for k in (index..total).step_by(shards as usize) {
        run_case(&draw(first + k), &mut stats);
    }
    eprintln!(
        "merge_scale shard {index}/{shards}: {} cases in {:.1} s ({} layers, {} faults injected before the completing run, {} bytes merged, {} writing zeros past a smaller intermediate; destinations fixed/dynamic/differencing {:?})",
        stats.cases,
        t0.elapsed().as_secs_f64(),
        stats.layers,
        stats.faults_injected,
        stats.bytes_merged,
        stats.zeroing,
        stats.destinations
    );
    assert_eq!(
        stats.cases,
        (index..total).step_by(shards as usize).count() as u64
    );
}

#[test]
fn random_merges_match_the_model_shard_0() {
    shard(0, 2);
}

#[test]
fn random_merges_match_the_model_shard_1() {
    shard(1, 2);
}
