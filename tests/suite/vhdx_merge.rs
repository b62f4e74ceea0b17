//! Merging VHDX chains (issue 12): random chains of `common::model` (depth 1 to 6, 512- and
//! 4096-byte sectors, block sizes mixed among 1, 2, 32 and 256 MiB, partial bitmaps at
//! sector granularity, ZERO/UNMAPPED/UNDEFINED blocks, blocks stored out of order, layers of
//! different sizes in every position, destinations fixed, dynamic or differencing at any
//! level) merged and compared with the model; qemu-img reads fixed and dynamic destinations
//! byte-exact and `qemu-img check` accepts them; libvhdi reads differencing destinations
//! byte-exact within what it reads right (see tests/suite/vhdx_chain.rs); the two Windows chains
//! merge and the parent then reads with the child's virtual SHA-256.
//!
//! Case counts: `VHD_MERGE_VHDX_CASES` (default 200 in a release build, 16 in a debug build)
//! for the model test; `VHD_MERGE_VHDX_SCALE_CASES` (default 1000 in a release build, 24 in a
//! debug build, in two shards) for the scale test, whose cases also inject a fault (a crash
//! at a write, whole or torn, or a failing flush) into the destination before the completing
//! run. A failure names its seed; rerun one case with `VHD_MERGE_VHDX_SEED=<seed>` and a
//! count of 1.

use crate::common;

use std::path::Path;

use common::fixtures::vhdx_fixture;
use common::merging::Merging;
use common::model::{BaseKind, ChainFormat, VhdxCase, old_or_merged, random_vhdx_case};
use common::oracles::{libvhdi_read_chain, qemu_img_check_vhdx, qemu_img_raw_vhdx};
use common::storage::faulty;
use common::{fast_tempdir, first_diff, read_view, sha256};
use vhd_merge::io::FaultPlan;
use vhd_merge::merge::{MergeOptions, MergeReport, merge};
use vhd_merge::vhdx::{BlockState, Vhdx};
use vhd_merge::{DiskKind, ReturnCode};

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

fn count(name: &str, debug: u64, release: u64) -> u64 {
    env_u64(name).unwrap_or(if cfg!(debug_assertions) {
        debug
    } else {
        release
    })
}

/// Prints the case when a check panics, so it can be replayed.
struct Replay<'a>(&'a VhdxCase);

impl Drop for Replay<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "failing case (replay with VHD_MERGE_VHDX_SEED={} and a count of 1): {:#?}",
                self.0.spec.seed, self.0
            );
        }
    }
}

/// The seeds of a run: `VHD_MERGE_VHDX_SEED` (default `first`) on, every `shards`-th from
/// `shard`.
fn seeds(first: u64, n: u64, shard: u64, shards: u64) -> impl Iterator<Item = u64> {
    let start = env_u64("VHD_MERGE_VHDX_SEED").unwrap_or(first);
    (shard..n).step_by(shards as usize).map(move |k| start + k)
}

#[derive(Debug, Default)]
struct Stats {
    cases: u64,
    layers: u64,
    faults: u64,
    bytes: u64,
    /// Destinations fixed, dynamic, differencing.
    kinds: [u64; 3],
    sectors_4096: u64,
}

impl Stats {
    fn count(&mut self, m: &Merging, r: &MergeReport) {
        self.cases += 1;
        self.layers += m.built.paths.len() as u64;
        self.bytes += r.bytes_merged;
        self.sectors_4096 += u64::from(m.c.sector_size() == 4096);
        self.kinds[match r.plan.destination_type {
            DiskKind::Fixed => 0,
            DiskKind::Dynamic => 1,
            _ => 2,
        }] += 1;
    }

    /// The cases reached every kind of destination and both sector sizes.
    fn assert_covers(&self, what: &str) {
        common::note(&format!("{what}: {self:?}"));
        if self.cases >= 16 {
            assert!(self.kinds.iter().all(|&k| k > 0), "{what}: {self:?}");
            assert!(
                self.sectors_4096 > 0 && self.sectors_4096 < self.cases,
                "{what}: {self:?}"
            );
        }
    }
}

/// One random merge, checked against the model.
fn merge_case(c: VhdxCase, stats: &mut Stats) {
    let seed = c.spec.seed;
    let m = Merging::new(c);
    let _replay = Replay(&m.c);
    let mut rng = common::Rng::new(seed ^ 0x4D45_5247);
    let verify = rng.chance(50);
    let opts = MergeOptions::default()
        .verify(verify)
        .batch_bytes([1, 1 << 20, 8 << 20, 1 << 30][rng.below(4) as usize]);
    let r = m
        .merge(&opts, rng.chance(50))
        .unwrap_or_else(|e| panic!("seed {seed}: {e}"));
    m.check_merged(&r, verify, &format!("seed {seed}"));
    stats.count(&m, &r);
}

#[test]
fn random_vhdx_merges_match_the_model() {
    let n = count("VHD_MERGE_VHDX_CASES", 16, 200);
    let mut stats = Stats::default();
    for seed in seeds(0, n, 0, 1) {
        merge_case(random_vhdx_case(seed), &mut stats);
    }
    stats.assert_covers("random VHDX merges");
}

/// A fault for the scale test's first run.
#[derive(Clone, Copy, Debug)]
enum Fault {
    Write(u64, bool),
    Sync(u64),
}

/// One scale case: maybe a faulty first run (every sector of the destination then reads old
/// or merged, and the invariants hold), then the completing run, checked exactly.
fn scale_case(seed: u64, stats: &mut Stats) {
    let m = Merging::new(random_vhdx_case(seed ^ 0x5CA1_E000));
    let _replay = Replay(&m.c);
    let mut rng = common::Rng::new(seed);
    let opts = MergeOptions::default().batch_bytes([1, 1 << 20, 1 << 30][rng.below(3) as usize]);
    let fault = match rng.below(4) {
        0 => Some(Fault::Write(1 + rng.below(30), rng.chance(50))),
        1 => Some(Fault::Sync(1 + rng.below(8))),
        _ => None,
    };
    if let Some(f) = fault {
        let plan = match f {
            Fault::Write(n, torn) => FaultPlan::crash_at_write(n, torn),
            Fault::Sync(n) => FaultPlan::fail_sync_at(n),
        };
        let o = opts.clone().destination_io(Some(faulty(plan.clone())));
        let what = format!("seed {seed}, after {f:?}");
        match m.merge(&o, false) {
            Ok(_) => assert!(!plan.crashed(), "{what}: the merge succeeded"),
            Err(e) => {
                assert_eq!(e.return_code(), ReturnCode::Failed, "{what}: {e}");
                stats.faults += 1;
                m.check_invariants(&what);
                let torn = matches!(f, Fault::Write(_, true));
                old_or_merged(&read_view(m.dest()), &m.old_view, &m.merged, torn)
                    .unwrap_or_else(|e| panic!("{what}: {e}"));
            }
        }
    }
    let r = m
        .merge(&opts, false)
        .unwrap_or_else(|e| panic!("seed {seed}: the completing run: {e}"));
    m.check_merged(&r, false, &format!("seed {seed}"));
    stats.count(&m, &r);
}

fn scale_shard(shard: u64, shards: u64) {
    let n = count("VHD_MERGE_VHDX_SCALE_CASES", 24, 1000);
    let t0 = std::time::Instant::now();
    let mut stats = Stats::default();
    for seed in seeds(0, n, shard, shards) {
        scale_case(seed, &mut stats);
    }
    stats.assert_covers(&format!(
        "VHDX merge scale shard {shard}/{shards} in {:.1} s",
        t0.elapsed().as_secs_f64()
    ));
}

#[test]
fn random_vhdx_merges_at_scale_shard_0() {
    scale_shard(0, 2);
}

#[test]
fn random_vhdx_merges_at_scale_shard_1() {
    scale_shard(1, 2);
}

/// Random 512-byte-sector chains merged into their fixed or dynamic base: qemu-img reads the
/// destination byte-exact and `qemu-img check` finds no error (qemu reads no 4096-byte
/// sectors and no differencing VHDX).
#[test]
fn qemu_reads_merged_fixed_and_dynamic_destinations() {
    let _serial = common::serial();
    let mut done = [0u64; 2];
    for seed in 0..400 {
        let c = random_vhdx_case(seed);
        if c.sector_size() != 512 || done[usize::from(c.spec.base == BaseKind::Fixed)] >= 4 {
            continue;
        }
        let c = c.clone().with_dest(c.sizes.len() - 1);
        let m = Merging::new(c.clone());
        let r = m.merge(&MergeOptions::default(), true).unwrap();
        m.check_merged(&r, false, &format!("seed {seed}"));
        let what = format!("seed {seed}, {:?} destination", c.spec.base);
        let Some(check) = qemu_img_check_vhdx(m.dest()) else {
            return;
        };
        check.unwrap_or_else(|e| panic!("{what}: qemu-img check: {e}"));
        let raw = qemu_img_raw_vhdx(m.dest()).expect("qemu-img");
        common::assert_same(&raw, &m.merged, &what);
        done[usize::from(c.spec.base == BaseKind::Fixed)] += 1;
    }
    assert_eq!(done, [4, 4], "dynamic and fixed destinations merged");
}

/// Random chains merged into a differencing destination that libvhdi reads right (every block
/// allocated, one virtual size, no zero block; see tests/suite/vhdx_chain.rs): libvhdi reads the
/// destination's chain byte-exact.
#[test]
fn libvhdi_reads_merged_differencing_destinations() {
    let _serial = common::serial();
    let (mut compared, mut skipped) = (0, 0);
    for seed in 0..40 {
        let mut c = random_vhdx_case(seed);
        let n = c.sizes.len();
        if n < 3 {
            continue;
        }
        c.spec.density.fill(100);
        // One size: libvhdi reads no parent of another size.
        c.sizes.fill(c.spec.size_sectors);
        if let ChainFormat::Vhdx(x) = &mut c.format {
            x.zero_blocks = 0;
        }
        let c = c.with_dest(1 + (seed as usize % (n - 2)));
        let m = Merging::new(c.clone());
        let r = m.merge(&MergeOptions::default(), true).unwrap();
        m.check_merged(&r, false, &format!("seed {seed}"));
        let rest: Vec<&Path> = m.built.paths[c.dest..]
            .iter()
            .map(|p| p.as_path())
            .collect();
        if rest[..rest.len() - 1].iter().any(|p| has_zero_blocks(p)) {
            skipped += 1;
            continue;
        }
        let Some(got) = libvhdi_read_chain(&rest) else {
            return;
        };
        common::assert_same(&got, &m.merged, &format!("libvhdi, seed {seed}"));
        compared += 1;
    }
    common::note(&format!(
        "libvhdi read {compared} merged differencing destinations ({skipped} skipped: a zero block)"
    ));
    assert!(compared >= 5, "{compared} compared, {skipped} skipped");
}

/// Whether the VHDX at `p` has a block that reads zeros whatever its parent holds.
fn has_zero_blocks(p: &Path) -> bool {
    let v = Vhdx::open_path(p, false).unwrap();
    (0..v.block_count()).any(|b| v.block_state(b).unwrap() == BlockState::Zero)
}

/// The Windows 10 chains (dfvfs): the child merged into its fixed parent; the parent then reads
/// with the child's virtual SHA-256 (PROVENANCE.md), through us and through qemu-img (the
/// parents have 512-byte logical sectors), `qemu-img check` accepts it, and the child (obsolete
/// now) still reads its own view through its parent.
#[test]
fn the_windows_chains_merge_into_their_parents() {
    let _serial = common::serial();
    for (child, parent, child_sha) in [
        (
            "dfvfs/ntfs-differential.vhdx",
            "dfvfs/ntfs-parent.vhdx",
            "1ef1fb5360247aa7d36a38415bc7bf6e1e52f62af5e6bd1283815e82584c7efc",
        ),
        (
            "dfvfs/fat-differential.vhdx",
            "dfvfs/fat-parent.vhdx",
            "a538161f34bc44c12bf9a542ce9218741c62728723ea18d0e4f6ea92e9f32e93",
        ),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let name = Path::new(parent).file_name().unwrap().to_str().unwrap();
        let (Some((c_src, _)), Some((p_src, _))) = (vhdx_fixture(child), vhdx_fixture(parent))
        else {
            continue;
        };
        let (c, p) = (dir.path().join("child.avhdx"), dir.path().join(name));
        std::fs::copy(&c_src, &c).unwrap();
        std::fs::copy(&p_src, &p).unwrap();
        let r =
            merge(&c, None, &MergeOptions::default()).unwrap_or_else(|e| panic!("{child}: {e}"));
        assert_eq!(r.destination, p, "{child}");
        assert_eq!(
            sha256(&read_view(&p)),
            child_sha,
            "{child}: the merged parent"
        );
        assert_eq!(
            sha256(&read_view(&c)),
            child_sha,
            "{child}: the child after"
        );
        if let Some(check) = qemu_img_check_vhdx(&p) {
            check.unwrap_or_else(|e| panic!("{parent}: qemu-img check: {e}"));
            let raw = qemu_img_raw_vhdx(&p).expect("qemu-img");
            assert_eq!(sha256(&raw), child_sha, "{parent}: qemu-img reads");
        }
    }
}

/// The smallest case of a destination whose last block ends at the virtual size, inside the
/// block: a 3 MiB dynamic parent with 2 MiB blocks, a child writing a sector of the last
/// block, merged.
#[test]
fn a_destination_whose_last_block_is_short() {
    use vhd_merge::vhdx::create::{CreateOptions, create_differencing, create_dynamic};
    let dir = fast_tempdir();
    let (p, c) = (dir.path().join("p.vhdx"), dir.path().join("c.avhdx"));
    let o = CreateOptions::default().block_size(Some(2 << 20));
    drop(create_dynamic(&p, 3 << 20, &o).unwrap());
    let mut child = create_differencing(&c, &p, &o).unwrap();
    child.write_at(5 << 19, &[0xC5; 512]).unwrap();
    child.finish().unwrap();
    drop(child);
    let want = read_view(&c);
    merge(&c, None, &MergeOptions::default()).unwrap();
    assert_eq!(first_diff(&read_view(&p), &want), None);
}

/// A merge refused because a sibling depends on the destination writes no file: not the
/// source's parent_linkage2 (the destination's next identity), not the child to relink.
#[test]
fn a_refused_merge_writes_no_file() {
    use vhd_merge::vhdx::create::{CreateOptions, create_differencing, create_dynamic};
    let dir = fast_tempdir();
    let path = |n: &str| dir.path().join(n);
    let o = CreateOptions::default();
    drop(create_dynamic(path("p.vhdx"), 8 << 20, &o).unwrap());
    let mut c = create_differencing(path("c.avhdx"), path("p.vhdx"), &o).unwrap();
    c.write_at(1 << 20, &[0xC1; 4096]).unwrap();
    c.finish().unwrap();
    drop(c);
    drop(create_differencing(path("sibling.avhdx"), path("p.vhdx"), &o).unwrap());
    drop(create_differencing(path("gc.avhdx"), path("c.avhdx"), &o).unwrap());
    let files = ["p.vhdx", "c.avhdx", "sibling.avhdx", "gc.avhdx"];
    let before: Vec<Vec<u8>> = files
        .iter()
        .map(|f| std::fs::read(path(f)).unwrap())
        .collect();
    let opts = MergeOptions::default().relink(vec![path("gc.avhdx")]);
    let e = merge(path("c.avhdx"), None, &opts).unwrap_err();
    assert_eq!(e.return_code(), ReturnCode::InvalidState, "{e}");
    assert!(e.to_string().contains("sibling.avhdx"), "{e}");
    for (f, b) in files.iter().zip(&before) {
        assert!(std::fs::read(path(f)).unwrap() == *b, "{f} changed");
    }
}
