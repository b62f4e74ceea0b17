//! Fault injection through the merge engine's I/O layer (issue 6, item 5), beyond the crash
//! points of `tests/suite/crash.rs`: for each scenario (dynamic, differencing and fixed
//! destinations, mixed block sizes, destinations one to three levels up) a clean run records
//! every write, sync and growth of the destination; then the merge is run again from the same
//! files with one fault at each point:
//!
//! - the machine stops at write N (nothing of it lands);
//! - write N is torn (its first half lands) and the machine stops;
//! - sync N fails (and the machine stops: nothing after it lands);
//! - the disk is full at growth point N (writes that would extend the file fail with "No
//!   space left on device"; the process goes on, so the engine's clean-up commit runs);
//! - write N lands a random subset of its sectors (a disk reordering one request);
//! - sync N fails and loses every write since the previous sync, and the disk then works
//!   again (a failed writeback is reported once): nothing may be published on top of the
//!   lost writes (this found a bug: the clean-up commit after the error did).
//!
//! After each: the error is Failed (32768) with the OS error's text; the destination opens
//! strictly (a torn footer write may leave only the offset-0 copy: counted and reported, and
//! `check` must say so); every sector reads old or merged; no byte of the source or of an
//! intermediate changed; a re-run completes the merge exactly (against the model) and leaves
//! a file with a good end footer and no check errors. Sequences of two to four interruptions
//! of different kinds before the completing run are tried too, and, as root, a real full
//! tmpfs (partial writes by the kernel).
//!
//! The counts of fault points exercised are printed (run with `--nocapture`).

use crate::common;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use common::model::{BaseKind, Built, ChainSpec, build_chain, old_or_merged};
use common::os::{Mount, used_bytes};
use common::storage::{IoLog, faulty, lossy, recording};
use common::{
    Rng, copy_dir, deep_check_errors, fast_tempdir, first_diff, hashes, read_view, serial,
};
use vhd_merge::check::{CheckOptions, check_file};
use vhd_merge::image::FooterSource;
use vhd_merge::io::FaultPlan;
use vhd_merge::merge::{MergeOptions, StorageWrapper, merge};
use vhd_merge::{Error, OpenOptions, ReturnCode, Vhd};

const KIB: u32 = 1024;
const MIB: u32 = 1 << 20;

struct Scenario {
    name: &'static str,
    spec: ChainSpec,
    /// Destination layer (1 = the source's parent).
    dest: usize,
    batch_bytes: u64,
}

fn scenarios() -> Vec<Scenario> {
    vec![
        Scenario {
            name: "dynamic parent, 512 KiB source blocks into 1 MiB destination blocks",
            spec: ChainSpec {
                size_sectors: 32768 + 5,
                base: BaseKind::Dynamic,
                block_sizes: vec![512 * KIB, MIB],
                density: vec![60, 40],
                seed: 11,
            },
            dest: 1,
            batch_bytes: 1 << 20,
        },
        Scenario {
            name: "dynamic destination three levels up, 2 MiB / 1 MiB / 2 MiB / 512 KiB",
            spec: ChainSpec {
                size_sectors: 16384,
                base: BaseKind::Dynamic,
                block_sizes: vec![2 * MIB, MIB, 2 * MIB, 512 * KIB],
                density: vec![40, 40, 30, 50],
                seed: 12,
            },
            dest: 3,
            batch_bytes: 1 << 20,
        },
        Scenario {
            name: "differencing destination two levels up, 2 MiB source blocks into 512 KiB",
            spec: ChainSpec {
                size_sectors: 16384 + 1,
                base: BaseKind::Dynamic,
                block_sizes: vec![2 * MIB, MIB, 512 * KIB, MIB],
                density: vec![50, 50, 50, 60],
                seed: 13,
            },
            dest: 2,
            batch_bytes: 2 << 20,
        },
        Scenario {
            name: "fixed destination two levels up",
            spec: ChainSpec {
                size_sectors: 40960 + 3,
                base: BaseKind::Fixed,
                block_sizes: vec![MIB, 512 * KIB, 2 * MIB],
                density: vec![50, 40, 0],
                seed: 14,
            },
            dest: 2,
            batch_bytes: 1 << 20,
        },
    ]
}

#[derive(Clone, Copy, Debug)]
enum Fault {
    Write { n: u64, torn: bool },
    Sync(u64),
    Space(u64),
}

impl Fault {
    fn plan(self) -> Arc<FaultPlan> {
        match self {
            Fault::Write { n, torn } => FaultPlan::crash_at_write(n, torn),
            Fault::Sync(n) => FaultPlan::fail_sync_at(n),
            Fault::Space(limit) => FaultPlan::out_of_space_at(limit),
        }
    }

    /// The OS error text the message must carry.
    fn text(self) -> &'static str {
        match self {
            Fault::Write { .. } | Fault::Sync(_) => "injected fault",
            Fault::Space(_) => "No space left on device",
        }
    }

    fn torn(self) -> bool {
        matches!(self, Fault::Write { torn: true, .. })
    }
}

/// A scenario's files: the template (never touched), a work directory, the model.
struct Bench<'a> {
    sc: &'a Scenario,
    built: Built,
    template: tempfile::TempDir,
    /// Holds the work files (deleted on drop).
    _work: tempfile::TempDir,
    /// Work paths in chain order.
    paths: Vec<PathBuf>,
    /// Hashes of every file except the destination.
    others_before: Vec<(u32, u64)>,
    old_view: Vec<u8>,
    merged: Vec<u8>,
}

impl<'a> Bench<'a> {
    fn new(sc: &'a Scenario) -> Bench<'a> {
        let template = fast_tempdir();
        let built = build_chain(template.path(), &sc.spec);
        let work = fast_tempdir();
        copy_dir(template.path(), work.path());
        let paths: Vec<PathBuf> = built
            .paths
            .iter()
            .map(|p| work.path().join(p.file_name().unwrap()))
            .collect();
        let old_view = built.model.view(sc.dest);
        let merged = built.model.merged(sc.dest);
        assert_eq!(merged, built.model.view(0));
        let mut b = Bench {
            sc,
            built,
            template,
            _work: work,
            paths,
            others_before: Vec::new(),
            old_view,
            merged,
        };
        b.others_before = hashes(&b.others());
        b
    }

    fn dest(&self) -> &Path {
        &self.paths[self.sc.dest]
    }

    fn others(&self) -> Vec<PathBuf> {
        self.paths
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != self.sc.dest)
            .map(|(_, p)| p.clone())
            .collect()
    }

    /// Put the destination back as it was before any merge (only the destination is ever
    /// written; the others are checked by hash after every run).
    fn reset(&self) {
        let name = self.built.paths[self.sc.dest].file_name().unwrap();
        std::fs::copy(self.template.path().join(name), self.dest()).unwrap();
    }

    fn options(&self, io: Option<StorageWrapper>, verify: bool) -> MergeOptions {
        MergeOptions::default()
            .batch_bytes(self.sc.batch_bytes)
            .destination_io(io)
            .verify(verify)
    }

    fn merge(&self, io: Option<StorageWrapper>, verify: bool) -> vhd_merge::Result<u64> {
        let o = self.options(io, verify);
        merge(&self.paths[0], Some(self.dest()), &o).map(|r| {
            assert_eq!(r.bytes_merged, r.plan.bytes_total);
            r.bytes_merged
        })
    }
}

/// How the destination looked after a fault.
#[derive(Default)]
struct Aftermath {
    /// Opened only from the footer copy at offset 0 (end footer missing or torn).
    from_copy: bool,
    /// Sectors already holding merged data.
    merged_sectors: usize,
    /// `check --deep` warned about data under clear bitmap bits (the interrupted-merge state).
    unwritten_warning: bool,
}

/// `check --deep`'s options.
fn deep() -> CheckOptions {
    CheckOptions::default().deep(true)
}

/// Check the state after a failed merge: the error, the destination, the other files.
fn check_after_fault(b: &Bench, e: &Error, fault: Fault, what: &str) -> Aftermath {
    let sc = b.sc.name;
    assert_eq!(
        e.return_code(),
        ReturnCode::Failed,
        "{sc}: {what}: wrong code for: {e}"
    );
    assert!(
        e.to_string().contains(fault.text()),
        "{sc}: {what}: the message lacks the OS error {:?}: {e}",
        fault.text()
    );
    let v = Vhd::open(b.dest(), OpenOptions::read_only())
        .unwrap_or_else(|e| panic!("{sc}: {what}: the destination does not open strictly: {e}"));
    let from_copy = v.footer_source() == FooterSource::Copy;
    if from_copy {
        assert!(
            v.warnings()
                .iter()
                .any(|w| w.contains("using the copy at offset 0")),
            "{sc}: {what}: opened from the copy without saying so: {:?}",
            v.warnings()
        );
    }
    drop(v);
    // The deep check too: an interrupted merge leaves no error (issue 9, defect 7).
    let report = check_file(b.dest(), &deep()).unwrap();
    let errors: Vec<&str> = report
        .findings
        .iter()
        .filter(|f| f.severity == vhd_merge::check::Severity::Error)
        .map(|f| f.code.name())
        .collect();
    if from_copy {
        assert!(
            errors.contains(&"footer-end-bad"),
            "{sc}: {what}: check does not report the missing end footer: {:#?}",
            report.findings
        );
    }
    assert!(
        errors.iter().all(|c| *c == "footer-end-bad"),
        "{sc}: {what}: check finds errors: {:#?}",
        report.findings
    );
    let view = read_view(b.dest());
    let merged_sectors = old_or_merged(&view, &b.old_view, &b.merged, fault.torn())
        .unwrap_or_else(|m| panic!("{sc}: {what}: {m}"));
    assert_eq!(
        hashes(&b.others()),
        b.others_before,
        "{sc}: {what}: the source or an intermediate changed"
    );
    let unwritten_warning = report.with_code("unwritten-not-zero").next().is_some();
    Aftermath {
        from_copy,
        merged_sectors,
        unwritten_warning,
    }
}

/// Re-run without faults and check the result exactly.
fn rerun_and_check(b: &Bench, what: &str, verify: bool) {
    let sc = b.sc.name;
    b.merge(None, verify)
        .unwrap_or_else(|e| panic!("{sc}: {what}: the re-run failed: {e}"));
    let v = Vhd::open(b.dest(), OpenOptions::read_only()).unwrap();
    assert_eq!(
        v.footer_source(),
        FooterSource::End,
        "{sc}: {what}: the re-run left no end footer"
    );
    assert!(v.warnings().is_empty(), "{sc}: {what}: {:?}", v.warnings());
    drop(v);
    let report = check_file(b.dest(), &deep()).unwrap();
    assert!(
        !report.has_errors(),
        "{sc}: {what}: check after the re-run: {:#?}",
        report.findings
    );
    assert_eq!(
        first_diff(&read_view(b.dest()), &b.merged),
        None,
        "{sc}: {what}: the re-run's result differs from the model"
    );
    assert_eq!(
        first_diff(&read_view(&b.paths[0]), &b.merged),
        None,
        "{sc}: {what}: the source's view changed"
    );
    assert_eq!(
        hashes(&b.others()),
        b.others_before,
        "{sc}: {what}: the source or an intermediate changed"
    );
}

/// One fault, its checks, and the re-run.
fn one_fault(b: &Bench, fault: Fault, what: &str) -> Aftermath {
    b.reset();
    let plan = fault.plan();
    let e = match b.merge(Some(faulty(plan.clone())), false) {
        Ok(_) => panic!("{}: {what}: the merge did not fail", b.sc.name),
        Err(e) => e,
    };
    if !matches!(fault, Fault::Space(_)) {
        assert!(plan.crashed(), "{}: {what}: no fault injected", b.sc.name);
    }
    let after = check_after_fault(b, &e, fault, what);
    rerun_and_check(b, what, false);
    after
}

#[derive(Default, Debug)]
struct Tally {
    writes: u64,
    torn: u64,
    torn_from_copy: u64,
    syncs: u64,
    growth: u64,
    /// Interrupted states `check --deep` warned about (data under clear bits).
    unwritten_warnings: u64,
    sequences: u64,
    sequence_faults: u64,
}

/// A clean run that records the destination's I/O; returns the log.
fn record(b: &Bench) -> Arc<IoLog> {
    b.reset();
    let log = IoLog::new();
    let n = b.merge(Some(recording(log.clone())), true).unwrap();
    assert!(n > 0, "{}: merges nothing", b.sc.name);
    assert_eq!(read_view(b.dest()), b.merged, "{}", b.sc.name);
    log
}

#[test]
fn a_fault_at_every_write_sync_and_growth_point() {
    let _serial = serial();
    let mut total = Tally::default();
    for sc in scenarios() {
        let b = Bench::new(&sc);
        let log = record(&b);
        let writes = log.writes().len() as u64;
        let syncs = log.syncs();
        let growth = log.growth_points();
        let fixed = sc.spec.base == BaseKind::Fixed && sc.dest == sc.spec.block_sizes.len() - 1;
        assert!(
            writes > 10 && syncs > 2,
            "{}: {writes} writes, {syncs} syncs",
            sc.name
        );
        assert!(fixed || !growth.is_empty(), "{}: never grows", sc.name);
        let mut t = Tally::default();
        for n in 1..=writes {
            for torn in [false, true] {
                let what = format!("crash at write {n} of {writes} (torn: {torn})");
                let a = one_fault(&b, Fault::Write { n, torn }, &what);
                t.unwritten_warnings += u64::from(a.unwritten_warning);
                if torn {
                    t.torn += 1;
                    t.torn_from_copy += u64::from(a.from_copy);
                } else {
                    t.writes += 1;
                    assert!(!a.from_copy, "{}: {what}: end footer lost", sc.name);
                }
            }
        }
        for n in 1..=syncs {
            let what = format!("sync {n} of {syncs} fails");
            let a = one_fault(&b, Fault::Sync(n), &what);
            assert!(!a.from_copy, "{}: {what}: end footer lost", sc.name);
            t.syncs += 1;
        }
        // Out of space at each point where the file grows: the limit is the length before
        // the growing write, so every earlier write lands and that one fails.
        let mut limits: Vec<u64> = growth.iter().map(|g| g.1).collect();
        limits.dedup();
        let mut progress = Vec::new();
        for (k, &limit) in limits.iter().enumerate() {
            let what = format!(
                "out of space at growth point {} of {} (file limited to {limit} bytes)",
                k + 1,
                limits.len()
            );
            let a = one_fault(&b, Fault::Space(limit), &what);
            assert!(!a.from_copy, "{}: {what}: end footer lost", sc.name);
            progress.push(a.merged_sectors);
            t.growth += 1;
        }
        // More room never means less merged before the failure.
        assert!(
            progress.windows(2).all(|w| w[0] <= w[1]),
            "{}: merged sectors per growth point {progress:?}",
            sc.name
        );
        eprintln!(
            "{}: {writes} writes, {syncs} syncs, {} growth points: {t:?}",
            sc.name,
            limits.len()
        );
        total.writes += t.writes;
        total.torn += t.torn;
        total.torn_from_copy += t.torn_from_copy;
        total.syncs += t.syncs;
        total.growth += t.growth;
        total.unwritten_warnings += t.unwritten_warnings;
    }
    eprintln!(
        "fault points exercised: {} whole-write crashes, {} torn writes ({} left only the offset-0 footer copy), {} failing syncs, {} out-of-space points; total {}; {} crashes left data under clear bits (a warning of check --deep)",
        total.writes,
        total.torn,
        total.torn_from_copy,
        total.syncs,
        total.growth,
        total.writes + total.torn + total.syncs + total.growth,
        total.unwritten_warnings
    );
    // The scenarios reach the state defect 7 of issue 9 is about, so the checks above saw it.
    assert!(
        total.unwritten_warnings > 0,
        "no crash left data under clear bits"
    );
}

/// Two to four interruptions of mixed kinds in a row, each at a point of the run it
/// interrupts, then a completing run: the result is still exact.
#[test]
fn successive_interruptions_then_a_completing_run() {
    let _serial = serial();
    let mut total = Tally::default();
    for (si, sc) in scenarios().iter().enumerate() {
        let b = Bench::new(sc);
        let log = record(&b);
        let writes = log.writes().len() as u64;
        let syncs = log.syncs();
        let limits: Vec<u64> = log.growth_points().iter().map(|g| g.1).collect();
        let mut rng = Rng::new(1000 + si as u64);
        for seq in 0..8 {
            b.reset();
            let count = 2 + rng.below(3);
            let mut what = format!("sequence {seq}:");
            for _ in 0..count {
                // A later run redoes at most as much as the first one: points taken from the
                // first run's counts may lie past the end of a later run, which then completes;
                // that is fine too (it must complete exactly).
                let fault = match rng.below(4) {
                    0 | 1 => Fault::Write {
                        n: 1 + rng.below(writes),
                        torn: rng.chance(50),
                    },
                    2 => Fault::Sync(1 + rng.below(syncs)),
                    _ if !limits.is_empty() => {
                        Fault::Space(limits[rng.below(limits.len() as u64) as usize])
                    }
                    _ => Fault::Sync(1 + rng.below(syncs)),
                };
                what.push_str(&format!(" {fault:?}"));
                let plan = fault.plan();
                match b.merge(Some(faulty(plan.clone())), false) {
                    Ok(_) => {
                        assert!(
                            !plan.crashed(),
                            "{}: {what}: a fault was injected but the merge succeeded",
                            sc.name
                        );
                        what.push_str(" (completed)");
                        assert_eq!(read_view(b.dest()), b.merged, "{}: {what}", sc.name);
                    }
                    Err(e) => {
                        check_after_fault(&b, &e, fault, &what);
                        total.sequence_faults += 1;
                    }
                }
            }
            rerun_and_check(&b, &what, true);
            total.sequences += 1;
        }
    }
    eprintln!(
        "successive interruptions: {} sequences, {} faults injected before the completing runs",
        total.sequences, total.sequence_faults
    );
    assert!(total.sequence_faults >= 2 * total.sequences);
}

// ---- A real full file system (root only: mounts a small tmpfs). ----

/// On a real, small tmpfs the kernel fails a write with ENOSPC, possibly after part of it
/// landed. For limits stepping through the destination's growth: Failed (32768) with the OS
/// error, a valid destination, an unchanged source, and a completing re-run once there is
/// room.
#[cfg_attr(not(target_os = "linux"), ignore = "mounts a tmpfs (Linux)")]
#[test]
fn a_real_full_tmpfs() {
    let _serial = serial();
    let sc = Scenario {
        name: "real tmpfs",
        spec: ChainSpec {
            size_sectors: 16384,
            base: BaseKind::Dynamic,
            block_sizes: vec![512 * KIB, MIB, 2 * MIB],
            density: vec![60, 50, 30],
            seed: 21,
        },
        dest: 2,
        batch_bytes: 1 << 20,
    };
    let template = fast_tempdir();
    let built = build_chain(template.path(), &sc.spec);
    let mnt = tempfile::tempdir().unwrap();
    let page = 4096u64;
    let Some(mount) = Mount::tmpfs(mnt.path(), 64 << 20) else {
        eprintln!(
            "note: cannot mount a tmpfs here (not root?); the fault layer's out-of-space points in a_fault_at_every_write_sync_and_growth_point stand in"
        );
        return;
    };
    copy_dir(template.path(), mnt.path());
    let paths: Vec<PathBuf> = built
        .paths
        .iter()
        .map(|p| mnt.path().join(p.file_name().unwrap()))
        .collect();
    let dest = paths[sc.dest].clone();
    let others: Vec<PathBuf> = paths[..sc.dest].to_vec();
    let before = hashes(&others);
    let old_view = built.model.view(sc.dest);
    let merged = built.model.merged(sc.dest);
    let o = MergeOptions::default().batch_bytes(sc.batch_bytes);

    // How much the destination grows in a clean run (measured on the template's copy).
    let probe = fast_tempdir();
    copy_dir(template.path(), probe.path());
    let r = merge(
        probe.path().join("l0.vhd"),
        Some(&probe.path().join(built.paths[sc.dest].file_name().unwrap())),
        &o,
    )
    .unwrap();
    let growth = r.destination_growth;
    assert!(growth > 4 * page, "grows by {growth} bytes only");

    let base_used = used_bytes(mnt.path()).expect("a tmpfs reports its blocks");
    let mut failures = 0;
    let mut step = 0u64;
    // Room for the files plus a few pages, growing until the merge fits.
    loop {
        let dest_name = built.paths[sc.dest].file_name().unwrap();
        std::fs::copy(template.path().join(dest_name), &dest).unwrap();
        let room = base_used + page * (1 + step * 37);
        mount.resize(room.div_ceil(page) * page);
        match merge(&paths[0], Some(&dest), &o) {
            Ok(r) => {
                assert_eq!(r.bytes_merged, r.plan.bytes_total);
                assert_eq!(read_view(&dest), merged);
                break;
            }
            Err(e) => {
                failures += 1;
                assert_eq!(e.return_code(), ReturnCode::Failed, "{e}");
                assert!(
                    e.to_string().contains("No space left on device"),
                    "the message lacks the OS error: {e}"
                );
                Vhd::open(&dest, OpenOptions::read_only())
                    .unwrap_or_else(|e| panic!("room {room}: destination does not open: {e}"));
                let view = read_view(&dest);
                old_or_merged(&view, &old_view, &merged, true)
                    .unwrap_or_else(|m| panic!("room {room}: {m}"));
                let errors = deep_check_errors(&dest);
                assert!(errors.is_empty(), "room {room}: {errors:#?}");
                assert_eq!(hashes(&others), before, "the source changed");
                // With room again, the re-run finishes.
                mount.resize(256 << 20);
                merge(&paths[0], Some(&dest), &o)
                    .unwrap_or_else(|e| panic!("room {room}: re-run failed: {e}"));
                assert_eq!(first_diff(&read_view(&dest), &merged), None);
                let report = check_file(&dest, &deep()).unwrap();
                assert!(!report.has_errors(), "{:#?}", report.findings);
            }
        }
        step += 1;
        assert!(step < 1000, "the merge never fit");
    }
    eprintln!(
        "real tmpfs: {failures} out-of-space failures (destination growth {growth} bytes), then success"
    );
    assert!(failures >= 3, "only {failures} out-of-space points");
}

// ---- A failing fsync that loses the unsynced writes, after which the disk works again. ----

/// For every sync of each scenario: that sync fails and loses the writes since the previous
/// one, and the storage works again afterwards. The merge must fail with Failed (32768) and
/// leave a destination whose every sector is old or merged: nothing it publishes after the
/// error may point at lost data. A re-run completes exactly.
#[test]
fn a_failing_sync_that_loses_data_is_not_built_upon() {
    let _serial = serial();
    let mut points = 0;
    for sc in scenarios() {
        let b = Bench::new(&sc);
        let syncs = record(&b).syncs();
        for n in 1..=syncs {
            let what = format!("sync {n} of {syncs} fails and loses the unsynced writes");
            b.reset();
            let (wrap, failed) = lossy(n);
            let e = match b.merge(Some(wrap), false) {
                Ok(_) => panic!("{}: {what}: the merge did not fail", sc.name),
                Err(e) => e,
            };
            assert!(failed.load(std::sync::atomic::Ordering::SeqCst));
            check_after_fault(&b, &e, Fault::Sync(n), &what);
            rerun_and_check(&b, &what, false);
            points += 1;
        }
    }
    eprintln!("failing syncs that lose data: {points} points");
}

/// The case the scenarios above rarely meet: a differencing destination whose blocks exist
/// with partial bitmaps, the source filling sectors whose bits are clear. Those sectors are
/// written in place, and their bits are set at the next commit. If the sync before that
/// commit fails and loses the writes, setting the bits anyway (say, in a clean-up commit
/// after the error) would make the sectors read the block's stale bytes instead of the
/// parent's data: neither old nor merged.
#[test]
fn a_lost_in_place_write_is_not_published() {
    use vhd_merge::create::{CreateOptions, create_differencing, create_dynamic};
    let _serial = serial();
    let template = fast_tempdir();
    let t = template.path();
    let o = CreateOptions::default().block_size(64 << 10);
    let mut v = create_dynamic(t.join("base.vhd"), 1 << 20, &o).unwrap();
    v.write_at(0, &vec![0xAA; 1 << 20]).unwrap();
    drop(v);
    let mut v = create_differencing(t.join("mid.vhd"), t.join("base.vhd"), &o).unwrap();
    for b in 0..16u64 {
        v.write_at(b * (64 << 10), &[0xBB; 4096]).unwrap();
    }
    drop(v);
    let mut v = create_differencing(t.join("src.vhd"), t.join("mid.vhd"), &o).unwrap();
    for b in 0..16u64 {
        v.write_at(b * (64 << 10) + 8192, &[0xCC; 1536]).unwrap();
    }
    drop(v);
    let work = fast_tempdir();
    let w = work.path();
    copy_dir(t, w);
    let (src, mid) = (w.join("src.vhd"), w.join("mid.vhd"));
    let old = read_view(&mid);
    let merged = read_view(&src);
    let others = vec![w.join("base.vhd"), src.clone()];
    let before = hashes(&others);
    let log = IoLog::new();
    copy_dir(t, w);
    let opts = |io| {
        MergeOptions::default()
            .destination_io(Some(io))
            .batch_bytes(4 * (64 << 10))
    };
    merge(&src, None, &opts(recording(log.clone()))).unwrap();
    let syncs = log.syncs();
    assert!(syncs >= 8, "{syncs} syncs");
    for n in 1..=syncs {
        copy_dir(t, w);
        let (wrap, failed) = lossy(n);
        let e = merge(&src, None, &opts(wrap)).expect_err("the merge did not fail");
        assert!(failed.load(std::sync::atomic::Ordering::SeqCst));
        assert_eq!(e.return_code(), ReturnCode::Failed, "{e}");
        assert!(e.to_string().contains("injected fault"), "{e}");
        Vhd::open(&mid, OpenOptions::read_only()).unwrap();
        old_or_merged(&read_view(&mid), &old, &merged, false)
            .unwrap_or_else(|m| panic!("sync {n} of {syncs} lost its writes: {m}"));
        let errors = deep_check_errors(&mid);
        assert!(errors.is_empty(), "sync {n} of {syncs}: {errors:#?}");
        assert_eq!(hashes(&others), before);
        merge(&src, None, &MergeOptions::default()).unwrap();
        assert_eq!(read_view(&mid), merged, "sync {n}: re-run");
    }
}

/// Storage whose write number `n` lands only a random subset of its sectors (a disk may
/// reorder the sectors of one request; a single-sector write lands its first half), after
/// which the machine is down: every later write, sync and truncation fails.
#[derive(Debug)]
struct Scatter {
    inner: Box<dyn vhd_merge::io::Storage>,
    n: u64,
    writes: std::sync::atomic::AtomicU64,
    crashed: Arc<std::sync::atomic::AtomicBool>,
}

impl vhd_merge::io::Storage for Scatter {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        use std::sync::atomic::Ordering::SeqCst;
        let k = self.writes.fetch_add(1, SeqCst) + 1;
        if self.crashed.load(SeqCst) {
            return Err(std::io::Error::other("injected fault: write after crash"));
        }
        if k == self.n {
            self.crashed.store(true, SeqCst);
            if buf.len() <= 512 {
                self.inner.write_at(&buf[..buf.len() / 2], offset)?;
            } else {
                let mut rng = Rng::new(self.n * 7919 + offset);
                for (i, sector) in buf.chunks(512).enumerate() {
                    if rng.chance(50) {
                        self.inner.write_at(sector, offset + i as u64 * 512)?;
                    }
                }
            }
            return Err(std::io::Error::other(format!(
                "injected fault: crash at write {k}, some sectors landed"
            )));
        }
        self.inner.write_at(buf, offset)
    }
    fn len(&self) -> std::io::Result<u64> {
        self.inner.len()
    }
    fn set_len(&self, len: u64) -> std::io::Result<()> {
        if self.crashed.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(std::io::Error::other(
                "injected fault: truncate after crash",
            ));
        }
        self.inner.set_len(len)
    }
    fn sync_data(&self) -> std::io::Result<()> {
        if self.crashed.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(std::io::Error::other("injected fault: sync after crash"));
        }
        self.inner.sync_data()
    }
    fn try_lock(&self, exclusive: bool) -> std::io::Result<bool> {
        self.inner.try_lock(exclusive)
    }
}

/// Torn writes whose landed sectors are any subset (not only the first half), at every write
/// of each scenario.
#[test]
fn torn_writes_landing_any_subset_of_their_sectors() {
    let _serial = serial();
    let (mut points, mut from_copy) = (0, 0);
    for sc in scenarios() {
        let b = Bench::new(&sc);
        let writes = record(&b).writes().len() as u64;
        for n in 1..=writes {
            let what = format!("write {n} of {writes} lands a random subset of its sectors");
            b.reset();
            let crashed = Arc::new(std::sync::atomic::AtomicBool::new(false));
            let c2 = crashed.clone();
            let wrap: StorageWrapper = Arc::new(move |s| {
                Box::new(Scatter {
                    inner: s,
                    n,
                    writes: Default::default(),
                    crashed: c2.clone(),
                })
            });
            let e = match b.merge(Some(wrap), false) {
                Ok(_) => panic!("{}: {what}: the merge did not fail", sc.name),
                Err(e) => e,
            };
            assert!(crashed.load(std::sync::atomic::Ordering::SeqCst));
            let a = check_after_fault(&b, &e, Fault::Write { n, torn: true }, &what);
            from_copy += u64::from(a.from_copy);
            rerun_and_check(&b, &what, false);
            points += 1;
        }
    }
    eprintln!(
        "torn writes landing a random subset of sectors: {points} points ({from_copy} left only the offset-0 footer copy)"
    );
}
