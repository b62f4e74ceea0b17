//! Crash safety of a merge: for every write of a merge (whole or torn) and every sync, stop the
//! merge there as a crash would, then check that the destination still opens strictly, that
//! the source chain is byte-for-byte unchanged, and that re-running the merge produces exactly
//! the expected content. `tests/suite/merge_faults.rs` extends this to more scenarios, out-of-space
//! points, successive interruptions and a real full file system.

use crate::common;

use std::path::Path;
use std::sync::Arc;

use common::model::{BaseKind, Built, ChainSpec, build_chain};
use common::storage::faulty;
use common::{copy_dir, deep_check_errors, fast_tempdir, first_diff, hashes, read_view};
use vhd_merge::io::FaultPlan;
use vhd_merge::merge::{MergeOptions, merge};
use vhd_merge::{OpenOptions, Vhd};

const KIB: u32 = 1024;
const MIB: u32 = 1 << 20;

struct Scenario {
    name: &'static str,
    spec: ChainSpec,
    dest: usize,
}

fn scenarios() -> Vec<Scenario> {
    vec![
        Scenario {
            name: "dynamic destination two levels up, mixed block sizes",
            spec: ChainSpec {
                size_sectors: 20480 + 9,
                base: BaseKind::Dynamic,
                block_sizes: vec![MIB, 512 * KIB, 512 * KIB],
                density: vec![70, 50, 40],
                seed: 101,
            },
            dest: 2,
        },
        Scenario {
            name: "differencing destination",
            spec: ChainSpec {
                size_sectors: 16384,
                base: BaseKind::Dynamic,
                block_sizes: vec![512 * KIB, 512 * KIB, MIB],
                density: vec![80, 40, 60],
                seed: 202,
            },
            dest: 1,
        },
        Scenario {
            name: "fixed destination",
            spec: ChainSpec {
                size_sectors: 49152 + 3,
                base: BaseKind::Fixed,
                block_sizes: vec![512 * KIB, 2 * MIB, 2 * MIB],
                density: vec![50, 40, 0],
                seed: 303,
            },
            dest: 2,
        },
    ]
}

fn options(plan: Option<Arc<FaultPlan>>) -> MergeOptions {
    MergeOptions::default()
        // Small batches: several reserve/commit cycles in a few MiB.
        .batch_bytes(1 << 20)
        .destination_io(plan.map(faulty))
}

/// Run one interrupted merge in `work` (a fresh copy of `template`) and check the aftermath.
fn crash_and_recover(
    sc: &Scenario,
    template: &Path,
    work: &Path,
    built: &Built,
    plan: Arc<FaultPlan>,
    what: &str,
    per_sector: bool,
) {
    copy_dir(template, work);
    let paths: Vec<_> = built
        .paths
        .iter()
        .map(|p| work.join(p.file_name().unwrap()))
        .collect();
    let dest = &paths[sc.dest];
    let others: Vec<_> = paths
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != sc.dest)
        .map(|(_, p)| p.clone())
        .collect();
    let before = hashes(&others);
    let old_view = built.model.view(sc.dest);
    let expected = built.model.merged(sc.dest);

    let res = merge(&paths[0], Some(dest), &options(Some(plan.clone())));
    let Err(e) = res else {
        panic!("{}: {what}: the merge did not fail", sc.name);
    };
    assert!(plan.crashed(), "{}: {what}: no fault injected", sc.name);
    // An I/O error: Failed, with the error's own text.
    assert_eq!(
        e.return_code(),
        vhd_merge::ReturnCode::Failed,
        "{}: {what}: {e}",
        sc.name
    );
    assert!(
        e.to_string().contains("injected fault"),
        "{}: {what}: {e}",
        sc.name
    );

    let v = Vhd::open(dest, OpenOptions::read_only())
        .unwrap_or_else(|e| panic!("{}: {what}: destination does not open: {e}", sc.name));
    let from_copy = v.footer_source() == vhd_merge::image::FooterSource::Copy;
    drop(v);
    // `check --deep` finds no error in an interrupted merge (issue 9, defect 7), but the end
    // footer a torn write destroyed (repair restores it from the offset-0 copy).
    let errors = deep_check_errors(dest);
    assert!(
        errors
            .iter()
            .all(|f| from_copy && f.code == "footer-end-bad"),
        "{}: {what}: check --deep finds errors: {errors:#?}",
        sc.name
    );
    let view = read_view(dest);
    if per_sector {
        // Whole writes either land or not: every sector is old or merged.
        for s in 0..view.len() / 512 {
            let r = s * 512..s * 512 + 512;
            assert!(
                view[r.clone()] == old_view[r.clone()] || view[r.clone()] == expected[r.clone()],
                "{}: {what}: sector {s} is neither old nor merged",
                sc.name
            );
        }
    }
    assert_eq!(
        hashes(&others),
        before,
        "{}: {what}: source chain changed",
        sc.name
    );

    let r = merge(&paths[0], Some(dest), &options(None))
        .unwrap_or_else(|e| panic!("{}: {what}: re-run failed: {e}", sc.name));
    assert_eq!(r.bytes_merged, r.plan.bytes_total);
    Vhd::open(dest, OpenOptions::read_only()).unwrap();
    let errors = deep_check_errors(dest);
    assert!(
        errors.is_empty(),
        "{}: {what}: after the re-run: {errors:#?}",
        sc.name
    );
    let view = read_view(dest);
    assert_eq!(
        first_diff(&view, &expected),
        None,
        "{}: {what}: re-run result differs",
        sc.name
    );
    assert_eq!(
        hashes(&others),
        before,
        "{}: {what}: source chain changed",
        sc.name
    );
}

#[test]
fn every_write_and_sync_of_a_merge_is_a_safe_crash_point() {
    for sc in scenarios() {
        let template = fast_tempdir();
        let built = build_chain(template.path(), &sc.spec);
        let work = fast_tempdir();

        // A clean run counts the writes and syncs.
        copy_dir(template.path(), work.path());
        let counter = FaultPlan::new();
        let dest = work.path().join(built.paths[sc.dest].file_name().unwrap());
        let src = work.path().join(built.paths[0].file_name().unwrap());
        let r = merge(&src, Some(&dest), &options(Some(counter.clone()))).unwrap();
        let (writes, syncs) = (counter.writes(), counter.syncs());
        assert_eq!(read_view(&dest), built.model.merged(sc.dest), "{}", sc.name);
        if sc.spec.base != BaseKind::Fixed || sc.dest != sc.spec.block_sizes.len() - 1 {
            assert!(r.blocks_allocated > 0, "{}: allocates no block", sc.name);
        }
        assert!(
            writes > 2 && syncs > 2,
            "{}: {writes} writes, {syncs} syncs",
            sc.name
        );
        eprintln!(
            "{}: {writes} writes, {syncs} syncs, {} units",
            sc.name, r.plan.units
        );

        for n in 1..=writes {
            for torn in [false, true] {
                let what = format!("crash at write {n} of {writes} (torn: {torn})");
                let plan = FaultPlan::crash_at_write(n, torn);
                crash_and_recover(
                    &sc,
                    template.path(),
                    work.path(),
                    &built,
                    plan,
                    &what,
                    !torn,
                );
            }
        }
        for n in 1..=syncs {
            let what = format!("sync {n} of {syncs} fails");
            let plan = FaultPlan::fail_sync_at(n);
            crash_and_recover(&sc, template.path(), work.path(), &built, plan, &what, true);
        }
    }
}

#[test]
fn a_merge_interrupted_twice_still_finishes() {
    let sc = &scenarios()[0];
    let template = fast_tempdir();
    let built = build_chain(template.path(), &sc.spec);
    let work = fast_tempdir();
    copy_dir(template.path(), work.path());
    let dest = work.path().join(built.paths[sc.dest].file_name().unwrap());
    let src = work.path().join(built.paths[0].file_name().unwrap());
    for n in [7, 3] {
        let plan = FaultPlan::crash_at_write(n, true);
        assert!(merge(&src, Some(&dest), &options(Some(plan))).is_err());
    }
    merge(&src, Some(&dest), &options(None)).unwrap();
    assert_eq!(read_view(&dest), built.model.merged(sc.dest));
}
