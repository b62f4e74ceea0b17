//! Crash safety of VHDX writes: a batch of writes (new blocks, new sector bitmap blocks, bits
//! set in existing ones, in-place overwrites, a ZERO block; two commits and a finish) is
//! stopped at every write (whole and torn) and every flush, as a crash would stop it. The file
//! must then open read-only (replaying the log in memory) and writable (replaying it onto the
//! file), both views must agree, and every sector must read its old or its new content (and,
//! in a differencing disk, be held or deferred to the parent as before or after).
//!
//! The fault model tears a write after its first half; every run written here is an even
//! number of sectors, so a torn write tears between sectors as a device would.

use crate::common;

use std::path::Path;
use std::sync::Arc;

use common::Rng;
use vhd_merge::bitmap::SectorBitmap;
use vhd_merge::io::{FaultPlan, FaultyStorage, Storage};
use vhd_merge::vhdx::create::{CreateOptions, create_differencing, create_dynamic};
use vhd_merge::vhdx::format::metadata::ParentLocator;
use vhd_merge::vhdx::{BlockState, Vhdx};

const M: u64 = 1 << 20;

/// Each sector's bytes and whether the file holds it.
type View = Vec<(Vec<u8>, bool)>;

fn view<S: Storage>(v: &Vhdx<S>) -> View {
    let ss = v.sector_size() as usize;
    let mut bytes = vec![0; v.virtual_size() as usize];
    v.read_own(0, &mut bytes).unwrap();
    let mut held = Vec::new();
    for b in 0..v.block_count() {
        let n = v.sectors_in_block(b) as usize;
        match v.block_state(b).unwrap() {
            BlockState::Transparent => held.extend(std::iter::repeat_n(!v.is_differencing(), n)),
            BlockState::Zero | BlockState::Present(None) => {
                held.extend(std::iter::repeat_n(true, n))
            }
            BlockState::Present(Some(map)) => held.extend((0..n).map(|i| map.get(i))),
        }
    }
    bytes.chunks(ss).map(|c| c.to_vec()).zip(held).collect()
}

fn open_faulty(path: &Path, plan: Arc<FaultPlan>) -> vhd_merge::Result<Vhdx<FaultyStorage>> {
    Vhdx::open(common::storage::faulty_file(path, plan), true)
}

/// One write of the batch: block, first sector, data, mask.
type Op = (u64, u64, Vec<u8>, SectorBitmap);

/// A batch of writes touching every sector at most once, each run an even number of
/// sectors: split in two commits.
fn batch<S: Storage>(v: &Vhdx<S>, seed: u64) -> (Vec<Op>, Vec<Op>) {
    let mut rng = Rng::new(seed);
    let ss = v.sector_size() as usize;
    let total = (v.virtual_size() / ss as u64) as usize;
    let mut touched = vec![false; total];
    let mut ops = Vec::new();
    // Whole-block zeros into the last block (unallocated in the template): the ZERO state.
    let last = v.block_count() - 1;
    let n = v.sectors_in_block(last) as usize;
    let start = (last * v.block_size()) as usize / ss;
    touched[start..start + n].iter_mut().for_each(|t| *t = true);
    ops.push((last, 0, vec![0; n * ss], SectorBitmap::full(n)));
    while ops.len() < 10 {
        let block = rng.below(last);
        let in_block = v.sectors_in_block(block) as usize;
        let first = (rng.below(in_block as u64 / 2) * 2) as usize;
        let count = (2 + 2 * rng.below(8) as usize).min(in_block - first) & !1;
        let at = (block * v.block_size()) as usize / ss + first;
        if count == 0 || touched[at..at + count].iter().any(|&t| t) {
            continue;
        }
        touched[at..at + count].iter_mut().for_each(|t| *t = true);
        let mut mask = SectorBitmap::full(count);
        if rng.chance(40) {
            mask.clear_range(0..2); // a masked pair: those sectors keep their content
        }
        let mut data = vec![0u8; count * ss];
        rng.fill(&mut data);
        ops.push((block, first as u64, data, mask));
    }
    let second = ops.split_off(5);
    (ops, second)
}

/// Run the batch; stop at the first error (the injected crash).
fn run_batch<S: Storage>(v: &mut Vhdx<S>, ops: &(Vec<Op>, Vec<Op>)) -> vhd_merge::Result<()> {
    for part in [&ops.0, &ops.1] {
        for (block, first, data, mask) in part {
            v.write_sectors(*block, *first, data, mask)?;
        }
        v.commit()?;
    }
    v.finish().map(|_| ())
}

/// A template with some content (written and finished), the batch, the views before and
/// after it.
fn template(
    dir: &Path,
    sector: u32,
    differencing: bool,
    seed: u64,
) -> (std::path::PathBuf, (Vec<Op>, Vec<Op>), View, View) {
    let o = |block: u32| {
        CreateOptions::default()
            .block_size(Some(block))
            .logical_sector_size(sector)
            .force(false)
    };
    let path = dir.join("t.vhdx");
    let size = 6 * M + 3 * u64::from(sector) * 2;
    if differencing {
        let parent = dir.join("p.vhdx");
        drop(create_dynamic(&parent, size, &o(M as u32)).unwrap());
        drop(create_differencing(&path, &parent, &o(M as u32)).unwrap());
    } else {
        drop(create_dynamic(&path, size, &o(2 * M as u32)).unwrap());
    }
    let mut v = Vhdx::open_path(&path, true).unwrap();
    let mut rng = Rng::new(seed ^ 0xABCD);
    for block in [0, 2] {
        let n = 64;
        let mut data = vec![0u8; n * sector as usize];
        rng.fill(&mut data);
        v.write_sectors(block, 8, &data, &SectorBitmap::full(n))
            .unwrap();
    }
    v.finish().unwrap();
    let old = view(&v);
    let ops = batch(&v, seed);
    drop(v);
    let after = dir.join("after.vhdx");
    std::fs::copy(&path, &after).unwrap();
    let mut v = Vhdx::open_path(&after, true).unwrap();
    run_batch(&mut v, &ops).unwrap();
    let new = view(&v);
    (path, ops, old, new)
}

fn check_old_or_new(got: &View, old: &View, new: &View, what: &str) {
    for (i, s) in got.iter().enumerate() {
        assert!(
            s == &old[i] || s == &new[i],
            "{what}: sector {i} is neither old nor new (held {})",
            s.1
        );
    }
}

fn crash_scenario(sector: u32, differencing: bool, seed: u64) {
    let dir = common::fast_tempdir();
    let (tpl, ops, old, new) = template(dir.path(), sector, differencing, seed);
    assert_ne!(old, new, "the batch changes something");
    let work = dir.path().join("w.vhdx");
    std::fs::copy(&tpl, &work).unwrap();
    let counter = FaultPlan::new();
    run_batch(&mut open_faulty(&work, counter.clone()).unwrap(), &ops).unwrap();
    let (writes, syncs) = (counter.writes(), counter.syncs());
    assert_eq!(view(&Vhdx::open_path(&work, false).unwrap()), new);
    let mut plans: Vec<(String, Arc<FaultPlan>)> = Vec::new();
    for n in 1..=writes {
        for torn in [false, true] {
            plans.push((
                format!("write {n} torn {torn}"),
                FaultPlan::crash_at_write(n, torn),
            ));
        }
    }
    for k in 1..=syncs {
        plans.push((format!("sync {k}"), FaultPlan::fail_sync_at(k)));
    }
    let (mut saw_old, mut saw_new) = (false, false);
    for (point, plan) in plans {
        let what = format!("{sector}-byte sectors, differencing {differencing}, crash at {point}");
        std::fs::copy(&tpl, &work).unwrap();
        let mut v = open_faulty(&work, plan.clone()).unwrap();
        assert!(
            run_batch(&mut v, &ops).is_err(),
            "{what}: the fault stops the batch"
        );
        drop(v);
        let ro = Vhdx::open_path(&work, false).unwrap_or_else(|e| panic!("{what}: {e}"));
        let in_memory = view(&ro);
        drop(ro);
        check_old_or_new(&in_memory, &old, &new, &what);
        saw_old |= in_memory == old;
        saw_new |= in_memory == new;
        let mut rw = Vhdx::open_path(&work, true).unwrap_or_else(|e| panic!("{what}: {e}"));
        assert!(
            rw.reader().header.header.log_guid.is_nil(),
            "{what}: replayed"
        );
        assert_eq!(
            view(&rw),
            in_memory,
            "{what}: replay onto the file = in memory"
        );
        rw.finish().unwrap();
        drop(rw);
        let after = Vhdx::open_path(&work, false).unwrap();
        assert_eq!(view(&after), in_memory, "{what}: after the replay");
    }
    assert!(saw_old && saw_new, "crash points cover both outcomes");
    common::note(&format!(
        "{sector}-byte sectors, differencing {differencing}: {writes} writes, {syncs} flushes, all crash points old-or-new"
    ));
}

#[test]
fn a_crash_anywhere_in_a_dynamic_batch_leaves_old_or_new_sectors() {
    crash_scenario(512, false, 1);
    crash_scenario(4096, false, 2);
}

#[test]
fn a_crash_anywhere_in_a_differencing_batch_leaves_old_or_new_sectors() {
    crash_scenario(512, true, 3);
    crash_scenario(4096, true, 4);
}

/// The parent locator of a child with `linkage2` as its parent_linkage2.
fn locator_with_linkage2(v: &Vhdx<FaultyStorage>, linkage2: uuid::Uuid) -> ParentLocator {
    let mut loc = v.parent_locator().unwrap().clone();
    for (k, val) in &mut loc.entries {
        if k == "parent_linkage2" {
            *val = format!("{{{linkage2}}}");
        }
    }
    loc
}

/// A parent locator update (what a merge does to the child linking to its destination, and
/// set-parent to a child) stopped at every write, torn or whole, and every flush: the child
/// then opens with its old or its new locator, its own sectors and its DataWriteGuid
/// unchanged, read-only (log replayed in memory) and writable (replayed onto the file) alike.
#[test]
fn a_crash_anywhere_in_a_locator_update_leaves_the_old_or_the_new_link() {
    let dir = common::fast_tempdir();
    let (base, tpl) = (dir.path().join("base.vhdx"), dir.path().join("tpl.avhdx"));
    let opts = CreateOptions::default().block_size(Some(M as u32));
    create_dynamic(&base, 8 * M, &opts)
        .unwrap()
        .finish()
        .unwrap();
    let mut c = create_differencing(&tpl, &base, &opts).unwrap();
    c.write_at(M + 4096, &[9; 8192]).unwrap();
    c.finish().unwrap();
    drop(c);
    let before = Vhdx::open_path(&tpl, false).unwrap();
    let (own, id, old_loc) = (
        view(&before),
        before.data_write_guid(),
        before.parent_locator().cloned(),
    );
    drop(before);
    let next = uuid::Uuid::new_v4();
    let work = dir.path().join("w.avhdx");
    let update = |plan: Arc<FaultPlan>| -> vhd_merge::Result<()> {
        let mut v = open_faulty(&work, plan)?;
        let loc = locator_with_linkage2(&v, next);
        v.set_parent_locator(loc)?;
        v.finish().map(drop)
    };
    std::fs::copy(&tpl, &work).unwrap();
    let counter = FaultPlan::new();
    update(counter.clone()).unwrap();
    let new_loc = Vhdx::open_path(&work, false)
        .unwrap()
        .parent_locator()
        .cloned();
    assert_ne!(new_loc, old_loc);
    let mut plans = Vec::new();
    for n in 1..=counter.writes() {
        for torn in [false, true] {
            plans.push((
                format!("write {n} torn {torn}"),
                FaultPlan::crash_at_write(n, torn),
            ));
        }
    }
    for k in 1..=counter.syncs() {
        plans.push((format!("sync {k}"), FaultPlan::fail_sync_at(k)));
    }
    let (mut saw_old, mut saw_new) = (false, false);
    for (point, plan) in plans {
        std::fs::copy(&tpl, &work).unwrap();
        assert!(update(plan).is_err(), "{point}: the fault stops the update");
        for writable in [false, true] {
            let v = Vhdx::open_path(&work, writable).unwrap_or_else(|e| panic!("{point}: {e}"));
            let loc = v.parent_locator().cloned();
            assert!(
                loc == old_loc || loc == new_loc,
                "{point}: locator neither old nor new"
            );
            assert_eq!(view(&v), own, "{point}: the child's own sectors");
            assert_eq!(v.data_write_guid(), id, "{point}: the child's identity");
            saw_old |= loc == old_loc;
            saw_new |= loc == new_loc;
        }
    }
    assert!(saw_old && saw_new, "crash points cover both outcomes");
}
