//! The extent/overlap sweep of an opened VHD (§7), as a pure function of the extents.
//!
//! Every allocated block must lie clear of the metadata and of every other block. The extents
//! are sorted once and swept (O(n log n)). Blocks all have the same length (the stride) and
//! start at a sector, so a block is 8 bytes (its BAT entry and its index) and the handful of
//! metadata extents are kept apart: the [`super::MAX_HELD_BLOCKS`] (2^22) allocated blocks a
//! sweep holds cost 32 MiB here. A table with more allocated blocks is swept in windows
//! ([`sweep_windowed`]: the same overlaps and drops, the blocks read from the table once per
//! window instead of held). Nothing is kept per table entry: the sets of blocks to drop cost
//! per member, so a table of 2^32 entries with few allocated costs next to nothing.

use std::collections::{BTreeSet, HashMap};

use super::MAX_HELD_BLOCKS;
use crate::error::{Error, Result};
use crate::format::SECTOR_SIZE;

/// A metadata extent: start, length and a negative tag naming it (blocks use their index).
pub(crate) type Meta = (u64, u64, i64);

/// An allocated block: its BAT entry (the sector of its bitmap) and its index.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct Block {
    /// The BAT entry.
    pub sector: u32,
    /// The block index.
    pub index: u32,
}

impl Block {
    /// Where the block (its bitmap) starts in the file.
    pub fn start(self) -> u64 {
        u64::from(self.sector) * SECTOR_SIZE
    }
}

/// An overlap the sweep reports: `second` starts before `first` ends, `first` being the extent
/// reaching furthest among those before `second` in file order. Each is (start, tag).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Overlap {
    /// The extent reaching furthest so far.
    pub first: (u64, i64),
    /// The extent starting inside it.
    pub second: (u64, i64),
}

/// A set of block indices, ordered, costing per member rather than per table entry: the
/// sweep's sets hold only blocks in an overlap, over metadata or outside the data, so a table
/// of 2^32 mostly unallocated entries costs nothing here.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct BlockSet(BTreeSet<u32>);

impl BlockSet {
    /// Whether `i` is in the set.
    pub fn get(&self, i: u32) -> bool {
        self.0.contains(&i)
    }

    /// Add `i`.
    pub fn set(&mut self, i: u32) {
        self.0.insert(i);
    }

    /// The indices in the set, in increasing order.
    pub fn ones(&self) -> impl Iterator<Item = u32> + '_ {
        self.0.iter().copied()
    }

    /// Add every index of `other`.
    pub fn union(&mut self, other: &BlockSet) {
        self.0.extend(other.0.iter().copied());
    }
}

/// Beyond this many block pairs overlapping each other, every block in an overlap is dropped:
/// a hostile table (every entry equal) then costs O(n) beyond the sort.
const MAX_PAIRS: usize = 1 << 20;

/// The extents of one file: its metadata and its blocks (each `stride` bytes long).
#[derive(Clone, Debug, Default)]
pub(crate) struct Extents {
    /// The metadata extents.
    pub meta: Vec<Meta>,
    /// The allocated blocks lying inside the file.
    pub blocks: Vec<Block>,
    /// Length of every block: its bitmap and its data.
    pub stride: u64,
}

impl Extents {
    /// Every extent as (start, length, tag), in file order (sorted by [`Extents::sort`]).
    pub fn iter(&self) -> impl Iterator<Item = Meta> + '_ {
        let stride = self.stride;
        let mut meta = self.meta.iter().copied().peekable();
        let mut blocks = self
            .blocks
            .iter()
            .map(move |b| (b.start(), stride, i64::from(b.index)))
            .peekable();
        std::iter::from_fn(move || match (meta.peek(), blocks.peek()) {
            (Some(m), Some(b)) if m <= b => meta.next(),
            (_, Some(_)) => blocks.next(),
            _ => meta.next(),
        })
    }

    fn sort(&mut self) {
        self.meta.sort_unstable();
        self.blocks.sort_unstable();
    }

    /// Sort and sweep the extents, calling `on_overlap` for each overlap in file order (an
    /// error from it ends the sweep), and return the blocks to drop so that none of the
    /// others overlaps anything: every block over metadata, and of blocks overlapping each
    /// other, those with the most overlaps until none is left. Memory follows the blocks held
    /// and those in overlaps, never the table's entry count.
    pub fn sweep(&mut self, mut on_overlap: impl FnMut(Overlap) -> Result<()>) -> Result<BlockSet> {
        self.sort();
        let mut s = Scan::default();
        for e in self.iter() {
            s.step(e, &mut on_overlap)?;
        }
        Ok(s.finish())
    }

    /// Keep only the blocks not in `drop`.
    pub fn retain(&mut self, drop: &BlockSet) {
        self.blocks.retain(|b| !drop.get(b.index));
    }

    /// The first extent (start, tag) overlapping `start..end`, when no two extents overlap.
    pub fn first_overlapping(&self, start: u64, end: u64) -> Option<(u64, i64)> {
        let lo = self.meta.partition_point(|m| m.0 + m.1 <= start);
        let m = self.meta.get(lo).map(|m| (m.0, m.2));
        let lo = self
            .blocks
            .partition_point(|b| b.start() + self.stride <= start);
        let b = self.blocks.get(lo).map(|b| (b.start(), i64::from(b.index)));
        let first = match (m, b) {
            (Some(m), Some(b)) => Some(if m.0 <= b.0 { m } else { b }),
            (m, b) => m.or(b),
        };
        first.filter(|f| f.0 < end)
    }
}

/// The state of one sweep.
#[derive(Default)]
struct Scan {
    /// The extent reaching furthest so far: (start, end, tag).
    reach: Option<(u64, u64, i64)>,
    /// Blocks in a reported overlap.
    involved: BlockSet,
    /// Blocks to drop.
    drop: BlockSet,
    /// Extents (end, tag) that may overlap the next one.
    active: Vec<(u64, i64)>,
    /// Pairs of blocks overlapping each other, until there are too many.
    pairs: Vec<(u32, u32)>,
    too_many: bool,
}

impl Scan {
    /// The next extent in file order.
    fn step(
        &mut self,
        (b, blen, bt): Meta,
        on_overlap: &mut dyn FnMut(Overlap) -> Result<()>,
    ) -> Result<()> {
        if let Some((a, aend, at)) = self.reach
            && aend > b
        {
            on_overlap(Overlap {
                first: (a, at),
                second: (b, bt),
            })?;
            for t in [at, bt] {
                if let Ok(t) = u32::try_from(t) {
                    self.involved.set(t);
                }
            }
        }
        if self.reach.is_none_or(|(_, aend, _)| b + blen > aend) {
            self.reach = Some((b, b + blen, bt));
        }
        if !self.too_many {
            self.pair_up(b, b + blen, bt);
        }
        Ok(())
    }

    /// The blocks to drop once every extent was seen.
    fn finish(mut self) -> BlockSet {
        if self.too_many {
            self.drop.union(&self.involved);
        } else {
            drop_most_connected(&mut self.drop, &self.pairs);
        }
        self.drop
    }

    /// Record the pairs the extent `b..end` (tagged `bt`) makes with the active ones.
    fn pair_up(&mut self, b: u64, end: u64, bt: i64) {
        self.active.retain(|&(e, _)| e > b);
        for &(_, at) in &self.active {
            match (u32::try_from(at), u32::try_from(bt)) {
                (Ok(x), Ok(y)) => self.pairs.push((x, y)),
                // A block over metadata is wrong whatever else it overlaps.
                (Ok(x), Err(_)) | (Err(_), Ok(x)) => self.drop.set(x),
                (Err(_), Err(_)) => {}
            }
            if self.pairs.len() > MAX_PAIRS {
                self.too_many = true;
                return;
            }
        }
        self.active.push((end, bt));
    }
}

/// One pass over the allocated blocks in increasing index order (table order): each goes to
/// the visitor, whose error ends the pass and is returned.
pub(crate) type Pass<'a> = dyn FnMut(&mut dyn FnMut(Block) -> Result<()>) -> Result<()> + 'a;

/// Buckets of one histogram pass of [`sweep_windowed`] (8 bytes each: 512 KiB).
pub(crate) const BUCKETS: u64 = 1 << 16;

/// The bounds validation uses: [`MAX_HELD_BLOCKS`] blocks held and [`BUCKETS`] buckets, or
/// those a test set on this thread ([`set_test_bounds`]).
pub(crate) fn bounds() -> Bounds {
    let held = Bounds {
        blocks: MAX_HELD_BLOCKS,
        buckets: BUCKETS,
    };
    #[cfg(feature = "testing")]
    if let Some(b) = TEST_BOUNDS.get() {
        return b;
    }
    held
}

#[cfg(feature = "testing")]
thread_local! {
    static TEST_BOUNDS: std::cell::Cell<Option<Bounds>> = const { std::cell::Cell::new(None) };
}

/// Validate VHDs opened on this thread with at most `blocks` blocks held by the overlap sweep
/// and `buckets` buckets per histogram (`None`: the defaults), so that tests reach the windowed
/// sweep with small files. A testing hook, only with the `testing` feature.
#[cfg(feature = "testing")]
pub fn set_test_bounds(bounds: Option<(usize, u64)>) {
    TEST_BOUNDS.set(bounds.map(|(blocks, buckets)| Bounds { blocks, buckets }));
}

/// What bounds [`sweep_windowed`]: the blocks one window holds, the buckets of a histogram.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Bounds {
    /// Most blocks sorted at once (8 bytes each).
    pub blocks: usize,
    /// Buckets of one histogram pass (at least 2).
    pub buckets: u64,
}

/// [`Extents::sweep`] for blocks too many to hold: the same overlaps, in the same order, and
/// the same blocks to drop, holding at most `bounds.blocks` blocks at once. The blocks come
/// from `pass` (starts below `sectors` sectors); `meta` are the metadata extents.
///
/// The file-offset space is split into windows of at most `bounds.blocks` block starts: a
/// histogram pass counts the starts per bucket, consecutive buckets are grouped, and one pass
/// per window collects and sorts that window's blocks, fed to one sweep whose state (the
/// extent reaching furthest, the extents still open) carries across window edges, so an
/// overlap spanning an edge is found as in one sweep. A bucket holding more starts than the
/// bound is refined by a histogram of its own (pigeonhole: blocks of one length `s` that do
/// not overlap start at most `ceil(B / s)` times in `B` bytes, so it proves an overlap); at one
/// sector, every start is the same and table order is file order: streamed unsorted. Memory:
/// one window and a histogram per refinement level (at most 3 at 2^16 buckets).
pub(crate) fn sweep_windowed(
    meta: &[Meta],
    stride: u64,
    sectors: u64,
    bounds: Bounds,
    pass: &mut Pass<'_>,
    on_overlap: &mut dyn FnMut(Overlap) -> Result<()>,
) -> Result<BlockSet> {
    let mut meta = meta.to_vec();
    meta.sort_unstable();
    let mut sink = Sink {
        meta,
        next_meta: 0,
        stride,
        scan: Scan::default(),
        on_overlap,
    };
    let bounds = Bounds {
        buckets: bounds.buckets.max(2),
        ..bounds
    };
    sweep_range(pass, &mut sink, bounds, (0, sectors))?;
    sink.meta_until(|_| true)?;
    Ok(sink.scan.finish())
}

/// The sweep being fed in file order, and the metadata extents still to merge in.
struct Sink<'o> {
    meta: Vec<Meta>,
    next_meta: usize,
    stride: u64,
    scan: Scan,
    on_overlap: &'o mut dyn FnMut(Overlap) -> Result<()>,
}

impl Sink<'_> {
    /// Feed the metadata extents still to come while `before` holds (they are sorted).
    fn meta_until(&mut self, before: impl Fn(&Meta) -> bool) -> Result<()> {
        while let Some(&m) = self.meta.get(self.next_meta)
            && before(&m)
        {
            self.next_meta += 1;
            self.scan.step(m, &mut *self.on_overlap)?;
        }
        Ok(())
    }

    /// Feed block `b`, after the metadata extents ordered before it (as [`Extents::iter`]).
    fn block(&mut self, b: Block) -> Result<()> {
        let e = (b.start(), self.stride, i64::from(b.index));
        self.meta_until(|m| *m <= e)?;
        self.scan.step(e, &mut *self.on_overlap)
    }
}

/// Sweep the blocks starting in sectors `lo..hi`, window by window (see [`sweep_windowed`]).
fn sweep_range(
    pass: &mut Pass<'_>,
    sink: &mut Sink<'_>,
    bounds: Bounds,
    (lo, hi): (u64, u64),
) -> Result<()> {
    if hi <= lo {
        return Ok(());
    }
    let width = (hi - lo).div_ceil(bounds.buckets);
    let mut counts: Vec<u64> = Vec::new();
    let n = (hi - lo).div_ceil(width) as usize;
    counts
        .try_reserve_exact(n)
        .map_err(|_| Error::io("validating the BAT", std::io::ErrorKind::OutOfMemory.into()))?;
    counts.resize(n, 0);
    pass(&mut |b| {
        let s = u64::from(b.sector);
        if (lo..hi).contains(&s) {
            counts[((s - lo) / width) as usize] += 1;
        }
        Ok(())
    })?;
    let edge = |i: usize| (lo + i as u64 * width).min(hi);
    let held = bounds.blocks as u64;
    let mut i = 0;
    while i < n {
        if counts[i] > held {
            if width == 1 {
                one_sector(pass, sink, edge(i))?;
            } else {
                sweep_range(pass, sink, bounds, (edge(i), edge(i + 1)))?;
            }
            i += 1;
            continue;
        }
        let (mut j, mut total) = (i, 0);
        while j < n && total + counts[j] <= held {
            total += counts[j];
            j += 1;
        }
        window(pass, sink, (edge(i), edge(j)), total as usize)?;
        i = j;
    }
    Ok(())
}

/// Collect the `count` blocks starting in sectors `lo..hi`, sort and feed them, then the
/// metadata extents starting before `hi`.
fn window(
    pass: &mut Pass<'_>,
    sink: &mut Sink<'_>,
    (lo, hi): (u64, u64),
    count: usize,
) -> Result<()> {
    if count > 0 {
        let mut held: Vec<Block> = Vec::new();
        held.try_reserve_exact(count)
            .map_err(|_| Error::io("validating the BAT", std::io::ErrorKind::OutOfMemory.into()))?;
        pass(&mut |b| {
            if (lo..hi).contains(&u64::from(b.sector)) {
                if held.len() == count {
                    return Err(Error::format("the BAT changed while it was validated"));
                }
                held.push(b);
            }
            Ok(())
        })?;
        held.sort_unstable();
        for b in held {
            sink.block(b)?;
        }
    }
    sink.meta_until(|m| m.0 < hi * SECTOR_SIZE)
}

/// Feed the blocks starting at sector `s`, in table order (all start there: the order a sort
/// by (start, index) gives), then the metadata extents starting in that sector.
fn one_sector(pass: &mut Pass<'_>, sink: &mut Sink<'_>, s: u64) -> Result<()> {
    pass(&mut |b| match u64::from(b.sector) == s {
        true => sink.block(b),
        false => Ok(()),
    })?;
    sink.meta_until(|m| m.0 < (s + 1) * SECTOR_SIZE)
}

/// Drop the blocks with the most overlaps among those left, until none is left (after a few
/// rounds, every block still overlapping: the work stays linear in the pairs). A block's
/// degree fits in 16 bits: blocks have one length, so a block with d overlaps makes about
/// d²/8 pairs among its neighbours, and the pairs are bounded by [`MAX_PAIRS`]. Degrees are
/// kept for the blocks in a pair only.
fn drop_most_connected(drop: &mut BlockSet, pairs: &[(u32, u32)]) {
    let mut degree: HashMap<u32, u16> = HashMap::new();
    for round in 0.. {
        degree.clear();
        let mut max = 0;
        for &(x, y) in pairs {
            if !drop.get(x) && !drop.get(y) {
                for i in [x, y] {
                    let d = degree.entry(i).or_insert(0);
                    *d = d.saturating_add(1);
                    max = max.max(*d);
                }
            }
        }
        if max == 0 {
            break;
        }
        for (&i, &n) in &degree {
            if n == max || (round >= 16 && n > 0) {
                drop.set(i);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn all(e: &Extents) -> Vec<Meta> {
        let mut v: Vec<Meta> = e.meta.clone();
        v.extend(
            e.blocks
                .iter()
                .map(|b| (b.start(), e.stride, i64::from(b.index))),
        );
        v.sort_unstable();
        v
    }

    fn overlap(a: Meta, b: Meta) -> bool {
        a.0 < b.0 + b.1 && b.0 < a.0 + a.1
    }

    /// The overlaps, quadratically: each extent starting before some earlier one ends, with
    /// the earlier one that reaches furthest (the first of them on a tie).
    fn reference_overlaps(v: &[Meta]) -> Vec<Overlap> {
        let mut out = Vec::new();
        for (i, &b) in v.iter().enumerate() {
            let mut best: Option<Meta> = None;
            for &a in &v[..i] {
                if best.is_none_or(|m| a.0 + a.1 > m.0 + m.1) {
                    best = Some(a);
                }
            }
            if let Some(a) = best.filter(|a| a.0 + a.1 > b.0) {
                out.push(Overlap {
                    first: (a.0, a.2),
                    second: (b.0, b.2),
                });
            }
        }
        out
    }

    /// The blocks to drop, quadratically, when the pairs stay under the bound.
    fn reference_drop(v: &[Meta]) -> BlockSet {
        let mut drop = BlockSet::default();
        let mut pairs = Vec::new();
        for (i, &a) in v.iter().enumerate() {
            for &b in &v[i + 1..] {
                if !overlap(a, b) {
                    continue;
                }
                match (u32::try_from(a.2), u32::try_from(b.2)) {
                    (Ok(x), Ok(y)) => pairs.push((x, y)),
                    (Ok(x), Err(_)) | (Err(_), Ok(x)) => drop.set(x),
                    _ => {}
                }
            }
        }
        drop_most_connected(&mut drop, &pairs);
        drop
    }

    fn extents() -> impl Strategy<Value = Extents> {
        let meta = prop::collection::vec((0u64..64, 1u64..12, -6i64..0), 0..5);
        let blocks = prop::collection::vec(0u32..64, 0..24);
        (meta, blocks, 1u64..5).prop_map(|(meta, sectors, s)| Extents {
            meta: meta
                .into_iter()
                .map(|(a, l, t)| (a * 512, l * 512, t))
                .collect(),
            blocks: sectors
                .into_iter()
                .enumerate()
                .map(|(i, sector)| Block {
                    sector,
                    index: i as u32,
                })
                .collect(),
            stride: s * 512,
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 2000, .. ProptestConfig::default() })]

        #[test]
        fn sweep_matches_the_quadratic_reference(mut e in extents()) {
            let v = all(&e);
            let mut seen = Vec::new();
            let drop = e.sweep(|o| {
                seen.push(o);
                Ok(())
            }).unwrap();
            prop_assert_eq!(e.iter().collect::<Vec<_>>(), v.clone());
            prop_assert_eq!(seen, reference_overlaps(&v));
            prop_assert_eq!(&drop, &reference_drop(&v));
            // No block left overlaps anything; the first overlapping extent is found.
            e.retain(&drop);
            let kept = all(&e);
            for (i, &a) in kept.iter().enumerate() {
                for &b in &kept[i + 1..] {
                    prop_assert!(a.2 < 0 && b.2 < 0 || !overlap(a, b), "{:?} {:?}", a, b);
                }
            }
            if kept.windows(2).all(|w| !overlap(w[0], w[1])) {
                for (start, len) in [(0u64, 512u64), (700, 2000), (9000, 512), (20000, 9000)] {
                    let want = kept.iter().find(|x| overlap(**x, (start, len, 0)));
                    prop_assert_eq!(
                        e.first_overlapping(start, start + len),
                        want.map(|x| (x.0, x.2))
                    );
                }
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 500, .. ProptestConfig::default() })]

        /// Block indices spread over the whole u32 range (a table of 2^32 entries with a few
        /// allocated, in the same order) give the same overlaps and drops as compact ones: the
        /// sweep keeps nothing per table entry, so its answer does not depend on the spacing.
        #[test]
        fn spread_indices_sweep_like_compact_ones(
            e in extents(),
            step in 1u32..(u32::MAX / 24),
            base in 0u32..1000,
        ) {
            let spread_of = |i: u32| base + i * step;
            let spread_tag = |t: i64| if t >= 0 { i64::from(spread_of(t as u32)) } else { t };
            let mut compact = e.clone();
            let mut spread = e;
            spread.blocks.iter_mut().for_each(|b| b.index = spread_of(b.index));
            let (mut a, mut b) = (Vec::new(), Vec::new());
            let da = compact.sweep(|o| { a.push(o); Ok(()) }).unwrap();
            let db = spread.sweep(|o| { b.push(o); Ok(()) }).unwrap();
            let a: Vec<Overlap> = a
                .into_iter()
                .map(|o| Overlap {
                    first: (o.first.0, spread_tag(o.first.1)),
                    second: (o.second.0, spread_tag(o.second.1)),
                })
                .collect();
            prop_assert_eq!(a, b);
            prop_assert_eq!(da.ones().map(spread_of).collect::<Vec<_>>(), db.ones().collect::<Vec<_>>());
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 2000, .. ProptestConfig::default() })]

        /// The windowed sweep, with bounds small enough that windows split, buckets are
        /// refined and single sectors streamed, reports the same overlaps in the same order and
        /// drops the same blocks as the sweep holding everything.
        #[test]
        fn windowed_sweep_matches_the_single_sweep(
            e in extents(),
            blocks in 1usize..6,
            buckets in 2u64..6,
        ) {
            let mut whole = e.clone();
            let mut want = Vec::new();
            let want_drop = whole.sweep(|o| { want.push(o); Ok(()) }).unwrap();
            let mut got = Vec::new();
            let mut pass = |visit: &mut dyn FnMut(Block) -> Result<()>| {
                e.blocks.iter().try_for_each(|&b| visit(b))
            };
            let drop = sweep_windowed(
                &e.meta,
                e.stride,
                64,
                Bounds { blocks, buckets },
                &mut pass,
                &mut |o| { got.push(o); Ok(()) },
            )
            .unwrap();
            prop_assert_eq!(got, want);
            prop_assert_eq!(drop, want_drop);
        }
    }

    /// An overlap spanning a window edge: windows of one block each, so the second block of
    /// each overlapping pair is in the window after the first's.
    #[test]
    fn an_overlap_across_a_window_edge_is_found() {
        let blocks = [
            Block {
                sector: 0,
                index: 0,
            },
            Block {
                sector: 3,
                index: 1,
            },
            Block {
                sector: 10,
                index: 2,
            },
        ];
        let mut pass =
            |visit: &mut dyn FnMut(Block) -> Result<()>| blocks.iter().try_for_each(|&b| visit(b));
        let mut seen = Vec::new();
        let bounds = Bounds {
            blocks: 1,
            buckets: 4,
        };
        let drop = sweep_windowed(&[], 4 * 512, 16, bounds, &mut pass, &mut |o| {
            seen.push(o);
            Ok(())
        })
        .unwrap();
        assert_eq!(
            seen,
            [Overlap {
                first: (0, 0),
                second: (3 * 512, 1)
            }]
        );
        assert_eq!(drop.ones().collect::<Vec<_>>(), [0, 1]);
    }

    /// An error from the callback ends the sweep there.
    #[test]
    fn an_error_from_the_callback_stops_the_sweep() {
        let mut e = Extents {
            meta: vec![(0, 512, -1), (0, 1024, -2)],
            blocks: vec![Block {
                sector: 0,
                index: 0,
            }],
            stride: 1024,
        };
        let mut n = 0;
        let r = e.sweep(|_| {
            n += 1;
            Err(crate::error::Error::format("stop".to_string()))
        });
        assert!(r.is_err());
        assert_eq!(n, 1);
    }

    /// A hostile table (every entry equal) stops pairing at the bound and drops every block.
    #[test]
    fn every_entry_equal_drops_every_block() {
        let n = 2000;
        let mut e = Extents {
            meta: vec![(0, 512, -1)],
            blocks: (0..n).map(|index| Block { sector: 8, index }).collect(),
            stride: 1024,
        };
        let mut seen = 0;
        let drop = e
            .sweep(|_| {
                seen += 1;
                Ok(())
            })
            .unwrap();
        assert_eq!(seen, n - 1);
        assert!((0..n).all(|i| drop.get(i)));
        assert_eq!(drop.ones().count(), n as usize);
    }
}
