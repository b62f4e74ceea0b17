//! Validating where a sparse disk's blocks lie: the overlap sweep ([`super::sweep`]) over the
//! metadata extents and the allocated blocks, the entries dropped for blocks outside the data
//! or overlapping something, and the parent locators' data.

use std::borrow::Cow;
use std::collections::HashMap;

#[cfg(doc)]
use super::MAX_HELD_BLOCKS;
use super::open::metadata_end;
use super::table::Table;
use super::validate::{DroppedEntry, MAX_PROBLEMS_PER_CODE, Validator};
use super::{FooterSource, Vhd, sweep};
use crate::error::{Error, Result};
use crate::format::SECTOR_SIZE;
use crate::format::bat;
use crate::format::batmap::Batmap;
use crate::format::footer::FOOTER_SIZE;
use crate::format::header::{DynamicHeader, HEADER_SIZE};
use crate::problem::ProblemCode;

/// Where the blocks lie (§7): each allocated block must end inside the data (before
/// `data_limit`) and lie clear of the metadata and of every other block, else its entry is
/// dropped from `bat` (recorded in `v`); then the locators. Returns the end of data, where new
/// blocks go: everything inside the file counts, dropped blocks included, so that nothing is
/// later allocated over data someone may still want to salvage.
pub(super) fn check_blocks(
    vhd: &Vhd,
    h: &DynamicHeader,
    bat: &mut Table,
    batmap: Option<&Batmap>,
    (len, data_limit): (u64, u64),
    v: &mut Validator,
) -> Result<u64> {
    let mut next_free = metadata_end(vhd.footer.data_offset, h, len);
    let meta = metadata_extents(vhd, h, len, batmap);
    let stride = h.bitmap_bytes() + u64::from(h.block_size);
    if let Some(bm) = batmap {
        next_free = next_free
            .max(bm.header_offset + SECTOR_SIZE)
            .max(bm.map_offset + bm.map_bytes());
    }
    // The end of everything inside the file, dropped blocks included.
    for &(b, blen, _) in &meta {
        if b + blen <= data_limit {
            next_free = next_free.max(b + blen);
        }
    }
    let mut reasons: HashMap<u32, String> = HashMap::new();
    let bounds = sweep::bounds();
    let (gone, found) = if bat.allocated() <= bounds.blocks {
        let mut ex = sweep::Extents {
            meta,
            blocks: Vec::new(),
            stride,
        };
        let mut gone = blocks_inside(vhd, bat, &mut ex, data_limit, v)?;
        gone.union(&ex.sweep(|o| note_overlap(o, &mut reasons, v))?);
        for b in &ex.blocks {
            next_free = next_free.max(b.start() + stride);
        }
        ex.retain(&gone);
        let found = locator_ranges(h)
            .map(|(s, e)| ex.first_overlapping(s, e))
            .collect();
        (gone, found)
    } else {
        let ranges: Vec<(u64, u64)> = locator_ranges(h).collect();
        let (gone, found, end) = sweep_windowed(
            (vhd, bat),
            (meta, stride, data_limit),
            &ranges,
            bounds,
            &mut reasons,
            v,
        )?;
        next_free = next_free.max(end);
        (gone, found)
    };
    drop_entries(vhd, bat, &gone, reasons, (stride, data_limit), v)?;
    check_locators(h, &found, len, v);
    Ok(next_free)
}

/// The first extent (start, tag) a locator's data overlaps, if any.
type Found = Option<(u64, i64)>;

/// [`check_blocks`] for a table with more allocated blocks than one sweep holds: the blocks are
/// read from the table for each pass ([`sweep::sweep_windowed`]) instead of held. Returns the
/// blocks to drop, the first extent each locator's data overlaps (as
/// [`sweep::Extents::first_overlapping`] after the drops) and the end of the blocks inside
/// the data.
fn sweep_windowed(
    (vhd, bat): (&Vhd, &Table),
    (mut meta, stride, data_limit): (Vec<sweep::Meta>, u64, u64),
    ranges: &[(u64, u64)],
    bounds: sweep::Bounds,
    reasons: &mut HashMap<u32, String>,
    v: &mut Validator,
) -> Result<(sweep::BlockSet, Vec<Found>, u64)> {
    let mut end = 0;
    let limits = (data_limit, MAX_BAD_BLOCKS);
    let mut gone = blocks_outside(vhd, bat, stride, limits, v, |b| {
        end = end.max(b.start() + stride)
    })?;
    let mut overlaps = 0;
    let mut pass = |visit: &mut dyn FnMut(sweep::Block) -> Result<()>| {
        blocks_outside_quietly(vhd, bat, stride, data_limit, visit)
    };
    let sectors = data_limit.div_ceil(SECTOR_SIZE);
    gone.union(&sweep::sweep_windowed(
        &meta,
        stride,
        sectors,
        bounds,
        &mut pass,
        &mut |o| {
            overlaps += 1;
            match overlaps > MAX_BAD_BLOCKS {
                true => Err(too_many_bad(v, ProblemCode::BlockOverlap, "in an overlap")),
                false => note_overlap(o, reasons, v),
            }
        },
    )?);
    // The first kept block each locator's data overlaps (kept blocks do not overlap), then
    // the first of it and the metadata, as the held sweep answers.
    let mut first: Vec<Found> = vec![None; ranges.len()];
    pass(&mut |b| {
        if gone.get(b.index) {
            return Ok(());
        }
        let (s, e) = (b.start(), b.start() + stride);
        for (f, &(lo, hi)) in first.iter_mut().zip(ranges) {
            if s < hi && lo < e && f.is_none_or(|f| s < f.0) {
                *f = Some((s, i64::from(b.index)));
            }
        }
        Ok(())
    })?;
    meta.sort_unstable();
    let meta_only = sweep::Extents {
        meta,
        blocks: Vec::new(),
        stride,
    };
    let found = first
        .into_iter()
        .zip(ranges)
        .map(
            |(b, &(lo, hi))| match (meta_only.first_overlapping(lo, hi), b) {
                (Some(m), Some(b)) => Some(if m.0 <= b.0 { m } else { b }),
                (m, b) => m.or(b),
            },
        )
        .collect();
    Ok((gone, found, end))
}

/// Tags of the metadata extents in the overlap sweep (blocks use their index).
const TAG_FOOTER_COPY: i64 = -1;
const TAG_HEADER: i64 = -2;
const TAG_BAT: i64 = -3;
const TAG_BATMAP_HEADER: i64 = -4;
const TAG_BATMAP: i64 = -5;
const TAG_FOOTER_END: i64 = -6;

fn extent_name(tag: i64) -> String {
    match tag {
        TAG_FOOTER_COPY => "the footer copy at offset 0".to_string(),
        TAG_HEADER => "the dynamic header".to_string(),
        TAG_BAT => "the BAT".to_string(),
        TAG_BATMAP_HEADER => "the batmap header".to_string(),
        TAG_BATMAP => "the batmap".to_string(),
        TAG_FOOTER_END => "the end footer".to_string(),
        i => format!("block {i}"),
    }
}

/// The metadata extents of the overlap sweep: the footer copy, the header, the BAT (padded),
/// the end footer in use (with whatever follows it) and the batmap.
fn metadata_extents(
    vhd: &Vhd,
    h: &DynamicHeader,
    len: u64,
    batmap: Option<&Batmap>,
) -> Vec<sweep::Meta> {
    let table_len = bat::table_bytes(h.max_table_entries);
    let mut meta = vec![
        (0, FOOTER_SIZE as u64, TAG_FOOTER_COPY),
        (vhd.footer.data_offset, HEADER_SIZE as u64, TAG_HEADER),
        (h.table_offset, table_len.max(4), TAG_BAT),
    ];
    if vhd.footer_source != FooterSource::Copy {
        // Blocks are kept before it by the end of data; this catches the batmap and locators.
        meta.push((vhd.footer_offset, len - vhd.footer_offset, TAG_FOOTER_END));
    }
    if let Some(bm) = batmap {
        meta.push((bm.header_offset, SECTOR_SIZE, TAG_BATMAP_HEADER));
        meta.push((bm.map_offset, bm.map_bytes(), TAG_BATMAP));
    }
    meta
}

/// Put the allocated blocks that end inside the data (before `data_limit`) into `ex`, and
/// return the others (each a problem) as the first blocks to drop.
fn blocks_inside(
    vhd: &Vhd,
    bat: &Table,
    ex: &mut sweep::Extents,
    data_limit: u64,
    v: &mut Validator,
) -> Result<sweep::BlockSet> {
    ex.blocks
        .try_reserve_exact(bat.allocated())
        .map_err(|_| Error::io("validating the BAT", std::io::ErrorKind::OutOfMemory.into()))?;
    let blocks = &mut ex.blocks;
    let limits = (data_limit, usize::MAX);
    blocks_outside(vhd, bat, ex.stride, limits, v, |b| blocks.push(b))
}

/// Walk the allocated blocks in table order, passing those that end inside the data (before
/// `data_limit`) to `inside`, and return the others (each a problem) as the first blocks to
/// drop; more than `most` of them stop validation ([`too_many_bad`]).
fn blocks_outside(
    vhd: &Vhd,
    bat: &Table,
    stride: u64,
    (data_limit, most): (u64, usize),
    v: &mut Validator,
    mut inside: impl FnMut(sweep::Block),
) -> Result<sweep::BlockSet> {
    let mut outside = sweep::BlockSet::default();
    let mut n = 0;
    walk_blocks(vhd, bat, stride, &mut |b, end| {
        let (i, start) = (b.index, b.start());
        if end <= data_limit {
            inside(b);
            return Ok(());
        }
        n += 1;
        if n > most {
            return Err(too_many_bad(
                v,
                ProblemCode::BatEntryOutside,
                "past the end of data",
            ));
        }
        outside.set(i);
        v.error(
            ProblemCode::BatEntryOutside,
            &format!("block {i}"),
            Some(start),
            Some(u64::from(i)),
            Error::format(format!(
                "BAT entry {i} points to offset {start:#x}; the block ends at {end:#x}, past the end of data at {data_limit:#x}"
            )),
        )
    })?;
    Ok(outside)
}

/// Walk the allocated blocks in table order, passing those that end inside the data to
/// `visit`, silently (a later pass of [`sweep::sweep_windowed`]).
fn blocks_outside_quietly(
    vhd: &Vhd,
    bat: &Table,
    stride: u64,
    data_limit: u64,
    visit: &mut dyn FnMut(sweep::Block) -> Result<()>,
) -> Result<()> {
    walk_blocks(vhd, bat, stride, &mut |b, end| match end <= data_limit {
        true => visit(b),
        false => Ok(()),
    })
}

/// Each allocated block in table order, with the end of its extent (`stride` bytes long).
fn walk_blocks(
    vhd: &Vhd,
    bat: &Table,
    stride: u64,
    visit: &mut dyn FnMut(sweep::Block, u64) -> Result<()>,
) -> Result<()> {
    bat.for_each_allocated(vhd, &mut |i, start| {
        // A table has at most u32::MAX entries (Max Table Entries is a u32) and an entry is
        // a u32 sector, so both fit.
        let b = sweep::Block {
            sector: (start / SECTOR_SIZE) as u32,
            index: i as u32,
        };
        visit(b, b.start() + stride)
    })
}

/// Past [`MAX_HELD_BLOCKS`] allocated blocks, the blocks to drop (each kept in a set and a
/// dropped entry) are bounded too: more than this many blocks past the end of data, or
/// overlaps, stop validation ([`too_many_bad`]). A held table drops at most its blocks.
const MAX_BAD_BLOCKS: usize = 1 << 20;

/// More than [`MAX_BAD_BLOCKS`] blocks `what` (past the end of data, in an overlap): a table
/// beyond repair rather than memory beyond bounds.
fn too_many_bad(v: &mut Validator, code: ProblemCode, what: &str) -> Error {
    v.stop(
        code,
        "BAT",
        None,
        Error::format(format!(
            "more than {MAX_BAD_BLOCKS} allocated blocks lie {what}: the BAT is not usable"
        )),
    )
}

/// One overlap the sweep found: a problem naming both extents, and the first reason for
/// each block in it (bounded like the problems; past it, a generic reason is given). Two
/// metadata structures overlapping stop validation: no block to drop, nothing to go on with.
fn note_overlap(
    o: sweep::Overlap,
    reasons: &mut HashMap<u32, String>,
    v: &mut Validator,
) -> Result<()> {
    let ((a, at), (b, bt)) = (o.first, o.second);
    let block = if bt >= 0 { bt } else { at };
    let message = format!(
        "{} (offset {a:#x}) overlaps {} (offset {b:#x})",
        extent_name(at),
        extent_name(bt)
    );
    if block < 0 {
        return Err(v.stop(
            ProblemCode::MetadataOverlap,
            &extent_name(at),
            Some(b),
            Error::format(message),
        ));
    }
    v.error(
        ProblemCode::BlockOverlap,
        &extent_name(block),
        Some(b),
        u64::try_from(block).ok(),
        Error::format(message.clone()),
    )?;
    for t in [at, bt] {
        if let Ok(t) = u32::try_from(t)
            && reasons.len() < 10 * MAX_PROBLEMS_PER_CODE
        {
            reasons.entry(t).or_insert_with(|| message.clone());
        }
    }
    Ok(())
}

/// Mark the blocks in `gone` unused in `bat`, each recorded as a dropped entry with its
/// reason. `(stride, data_limit)` tell a block past the end of data from an overlapping one.
fn drop_entries(
    vhd: &Vhd,
    bat: &mut Table,
    gone: &sweep::BlockSet,
    mut reasons: HashMap<u32, String>,
    (stride, data_limit): (u64, u64),
    v: &mut Validator,
) -> Result<()> {
    for i in gone.ones() {
        let e = bat.raw(vhd, u64::from(i))?;
        let start = u64::from(e) * SECTOR_SIZE;
        // Specific reasons for the first entries; past them (a hostile table), a shared
        // static one, so that a million dropped entries cost no million strings.
        let specific = v.dropped.len() < 10 * MAX_PROBLEMS_PER_CODE;
        let outside = start + stride > data_limit;
        let reason: Cow<'static, str> = match reasons.remove(&i) {
            Some(r) => r.into(),
            None if outside && specific => format!(
                "BAT entry {i} points to offset {start:#x}; the block ends at {:#x}, past the end of data at {data_limit:#x}",
                start + stride
            )
            .into(),
            None if outside => "the block ends past the end of data".into(),
            None if specific => {
                format!("block {i} at offset {start:#x} overlaps another block or the metadata")
                    .into()
            }
            None => "the block overlaps another block or the metadata".into(),
        };
        v.dropped.push(DroppedEntry {
            block: u64::from(i),
            entry: e,
            reason,
        });
        let was = bat.is_allocated(vhd, u64::from(i))?;
        bat.set(i, bat::UNUSED, was);
    }
    Ok(())
}

/// Parent locator data must lie inside the file and clear of the other extents (which no
/// longer overlap each other; `found` holds the first each locator's data overlaps, from
/// [`locator_ranges`]): warnings only.
fn check_locators(h: &DynamicHeader, found: &[Option<(u64, i64)>], len: u64, v: &mut Validator) {
    for (i, loc) in h.locators.iter().enumerate() {
        if loc.is_empty() {
            continue;
        }
        let ls = format!("locator {i}");
        let end = loc.data_offset.saturating_add(u64::from(loc.data_length));
        if end > len {
            v.warn(
                ProblemCode::LocatorOutside,
                &ls,
                Some(loc.data_offset),
                format!(
                    "parent locator {i} ({}) data at offset {:#x} + {} bytes lies outside the file",
                    loc.platform_code.name(),
                    loc.data_offset,
                    loc.data_length
                ),
            );
            continue;
        }
        if let Some(&Some((_, tag))) = found.get(i) {
            v.warn(
                ProblemCode::LocatorOverlap,
                &ls,
                Some(loc.data_offset),
                format!(
                    "parent locator {i} ({}) data at offset {:#x} overlaps {}",
                    loc.platform_code.name(),
                    loc.data_offset,
                    extent_name(tag)
                ),
            );
        }
    }
}

/// The file range of each locator's data, empty or not, in the header's order.
fn locator_ranges(h: &DynamicHeader) -> impl Iterator<Item = (u64, u64)> + '_ {
    h.locators.iter().map(|loc| {
        let end = loc.data_offset.saturating_add(u64::from(loc.data_length));
        (loc.data_offset, end)
    })
}
