//! The merge plan: which destination units receive data, how much each merged layer
//! contributes, and what the destination will allocate. Built from BATs and bitmaps only.

use std::fmt;
use std::path::PathBuf;

use uuid::Uuid;

use crate::bitmap::SectorBitmap;
use crate::chain::{Chain, SpanPlan, SpanSource};
use crate::error::{Error, Result};
use crate::layer::{DiskKind, Layer};

/// Largest merge unit: a destination block larger than this (VHDX blocks reach 256 MiB; 32 MiB
/// is Hyper-V's default) is merged in parts of this size, so that unit buffers stay bounded:
/// the pipeline holds at least two units and the reader a scratch of at most one, which with
/// 32 MiB units put a merge at about 70 MiB of RSS, above the 64 MiB it may use.
pub const MAX_UNIT_BYTES: u64 = 16 << 20;

/// One merged layer of a plan (the source or an intermediate).
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlannedLayer {
    /// The file.
    pub path: PathBuf,
    /// Its unique id.
    pub unique_id: Uuid,
    /// Bytes of the merged result this layer provides (sectors where it is the nearest layer
    /// holding data).
    pub bytes: u64,
}

/// What a merge will do, computed from the BATs and bitmaps of the merged layers.
///
/// A *unit* is a destination block (a 2 MiB chunk for a fixed VHD destination), or a part of
/// one of at most [`MAX_UNIT_BYTES`]: the merge writes each unit once.
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[derive(Clone)]
pub struct MergePlan {
    /// The source.
    #[cfg_attr(feature = "serde", serde(rename = "path"))]
    pub source: PathBuf,
    /// The destination.
    #[cfg_attr(feature = "serde", serde(rename = "destination_path"))]
    pub destination: PathBuf,
    /// Index of the destination in the source's chain (1 = the immediate parent).
    pub destination_index: usize,
    /// The destination's type.
    pub destination_type: DiskKind,
    /// Bytes per unit (the destination's block size, or a part of it; see [`MAX_UNIT_BYTES`]).
    pub unit_bytes: u64,
    /// Bytes per logical sector of the chain.
    pub sector_bytes: u64,
    /// Destination block size in bytes (a whole number of units).
    pub block_bytes: u64,
    /// Merged layers, source first.
    pub layers: Vec<PlannedLayer>,
    /// Virtual bytes covered by the merge: the source's virtual size (sectors past it are not
    /// touched).
    pub merged_extent: u64,
    /// Units that receive data or zeros.
    #[cfg_attr(feature = "serde", serde(rename = "unit_count"))]
    pub units: u64,
    /// Bytes to write: the sum of the layers' contributions and of `zeroed_bytes`.
    pub bytes_total: u64,
    /// Bytes of zeros to write where a merged layer smaller than the source hides the
    /// destination: the source's view reads zeros past the end of a smaller ancestor, so the
    /// destination must too (none where a dynamic destination's block is unallocated, as it
    /// reads as zeros already).
    pub zeroed_bytes: u64,
    /// Bytes in units that one merged layer wholly provides, from whole blocks it holds, and
    /// the part one layer provides of units it mostly provides (at least 7/8, from one block,
    /// into a block the unit allocates: cloned whole, then the other sectors written over):
    /// what a merge with [`super::MergeOptions::clone`] clones where the file system and the
    /// alignment of both files allow; the rest of `bytes_total` is copied.
    pub clone_candidate_bytes: u64,
    /// Destination blocks the merge allocates, at most (a unit of zeros over an unallocated
    /// block of a dynamic destination is skipped, as it reads as zeros already).
    #[cfg_attr(feature = "serde", serde(rename = "max_allocated_block_count"))]
    pub blocks_to_allocate: u64,
    /// Growth of the destination file in bytes, at most.
    pub destination_growth: u64,
    /// Differencing disks outside the merged chain whose parent is the destination or an
    /// intermediate: a merge changes their content (see [`super::MergeOptions::force`]).
    pub siblings: Vec<PathBuf>,
    /// Children of the source found next to the chain; their content does not change, but
    /// removing the source would orphan them unless they are relinked.
    pub source_children: Vec<PathBuf>,
    /// The units that receive data or zeros, one bit per destination unit below
    /// `merged_extent`.
    #[cfg_attr(feature = "serde", serde(skip))]
    pub(crate) unit_set: SectorBitmap,
}

impl fmt::Debug for MergePlan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MergePlan")
            .field("source", &self.source)
            .field("destination", &self.destination)
            .field("destination_index", &self.destination_index)
            .field("destination_type", &self.destination_type)
            .field("unit_bytes", &self.unit_bytes)
            .field("sector_bytes", &self.sector_bytes)
            .field("block_bytes", &self.block_bytes)
            .field("layers", &self.layers)
            .field("merged_extent", &self.merged_extent)
            .field("units", &self.units)
            .field("bytes_total", &self.bytes_total)
            .field("zeroed_bytes", &self.zeroed_bytes)
            .field("clone_candidate_bytes", &self.clone_candidate_bytes)
            .field("blocks_to_allocate", &self.blocks_to_allocate)
            .field("destination_growth", &self.destination_growth)
            .field("siblings", &self.siblings)
            .field("source_children", &self.source_children)
            .finish()
    }
}

impl MergePlan {
    /// Plan merging layers `0..destination_index` of `chain` into layer `destination_index`.
    ///
    /// The destination takes the source's view over the source's virtual size: each sector
    /// from the nearest merged layer that holds it and whose view reaches it, zeros where a
    /// merged layer smaller than the source ends the view (whatever the destination held
    /// there), and the destination's own view elsewhere. Candidate units come from the merged
    /// layers' BAT entries and from the range past the smallest merged layer (see
    /// `candidate_units`); each candidate's bitmaps are then read once to count what it
    /// receives, and units that receive nothing are dropped.
    pub fn build(chain: &Chain, destination_index: usize) -> Result<MergePlan> {
        let d = destination_index;
        let (Some(source), Some(dest)) = (chain.layer(0), chain.layer(d).filter(|_| d > 0)) else {
            return Err(Error::InvalidParameter(format!(
                "destination index {d} is not an ancestor in a chain of {} layers",
                chain.len()
            )));
        };
        let ss = u64::from(chain.sector_size());
        let merged_extent = source.virtual_size().min(dest.virtual_size());
        let limit = merged_extent / ss;
        let unit_bytes = unit_bytes_for(dest.block_size());
        let unit_sectors = unit_bytes / ss;
        let mut unit_set = candidate_units(chain, d, limit, unit_sectors)?;
        let mut layers: Vec<PlannedLayer> = chain.layers()[..d]
            .iter()
            .map(|l| PlannedLayer {
                path: super::scan::tidy(l.layer.path()),
                unique_id: l.layer.id(),
                bytes: 0,
            })
            .collect();
        let per_block = dest.block_size() / unit_bytes;
        let candidates: Vec<std::ops::Range<usize>> = unit_set.runs().collect();
        let (mut units, mut blocks_to_allocate, mut zeroed_bytes) = (0u64, 0u64, 0u64);
        let mut clone_candidate_bytes = 0u64;
        let mut last_new_block = None;
        for u in candidates.into_iter().flatten() {
            let (start, n) = unit_span(u as u64, unit_sectors, limit);
            let span = chain.plan_span(0..d, start, n)?;
            let claimed = span.claimed().count_ones() as u64;
            let hidden = span.hidden().count_ones() as u64;
            let block = u as u64 / per_block;
            let unallocated = !dest.is_mapped(block)?;
            // Zeros alone over an unallocated block of a dynamic disk change nothing: it
            // reads as zeros already (a differencing disk's unallocated block reads its
            // parent, which the zeros must hide).
            let zeros_already = unallocated && dest.kind() == DiskKind::Dynamic;
            if claimed == 0 && (hidden == 0 || zeros_already) {
                unit_set.clear_range(u..u + 1);
                continue;
            }
            for src in &span.sources {
                if let Some(l) = layers.get_mut(src.layer) {
                    l.bytes += src.claimed.count_ones() as u64 * ss;
                }
            }
            let allocates = unallocated && last_new_block != Some(block);
            if clone_candidate(&span).is_some() {
                clone_candidate_bytes += claimed * ss;
            } else if let Some(m) = mostly_candidate(&span)
                && patch_after_clone_allowed(dest.kind(), allocates)
            {
                clone_candidate_bytes += m.claimed.count_ones() as u64 * ss;
            }
            zeroed_bytes += hidden * ss;
            units += 1;
            if unallocated && last_new_block != Some(block) {
                blocks_to_allocate += 1;
                last_new_block = Some(block);
            }
        }
        Ok(MergePlan {
            source: super::scan::tidy(source.path()),
            destination: super::scan::tidy(dest.path()),
            destination_index: d,
            destination_type: dest.kind(),
            unit_bytes,
            sector_bytes: ss,
            block_bytes: dest.block_size(),
            bytes_total: layers.iter().map(|l| l.bytes).sum::<u64>() + zeroed_bytes,
            layers,
            zeroed_bytes,
            clone_candidate_bytes,
            merged_extent,
            units,
            blocks_to_allocate,
            destination_growth: dest.growth_for(blocks_to_allocate),
            siblings: Vec::new(),
            source_children: Vec::new(),
            unit_set,
        })
    }

    /// The units that receive data, in increasing order.
    pub fn unit_indices(&self) -> impl Iterator<Item = u64> + '_ {
        self.unit_set.runs().flat_map(|r| r.map(|u| u as u64))
    }

    /// First virtual sector and sector count of unit `unit` (clipped to the merged extent).
    pub fn unit_span(&self, unit: u64) -> (u64, usize) {
        unit_span(
            unit,
            self.unit_bytes / self.sector_bytes,
            self.merged_extent / self.sector_bytes,
        )
    }

    /// The destination block holding unit `unit`, and the unit's first sector in it.
    pub fn unit_place(&self, unit: u64) -> (u64, u64) {
        let per_block = (self.block_bytes / self.unit_bytes).max(1);
        let first = (unit % per_block) * (self.unit_bytes / self.sector_bytes);
        (unit / per_block, first)
    }
}

/// The layer that provides every sector of `span` by itself, if one does: then the span is
/// a copy of that layer's stored sectors (one piece per layer block), which a block clone can
/// place without reading them. A span with sectors of several layers, with sectors no layer
/// holds, or with zeros to write is assembled instead.
pub(crate) fn clone_candidate(span: &SpanPlan) -> Option<&SpanSource> {
    match span.sources.as_slice() {
        [only] if only.claimed.count_ones() == span.sectors && span.zeros.none() => Some(only),
        _ => None,
    }
}

/// The share of a unit's sectors (in eighths) one layer must provide for
/// [`mostly_candidate`].
const MOSTLY_EIGHTHS: usize = 7;

/// The most runs of other sectors a [`mostly_candidate`] may leave to patch. Each run is a
/// write into the cloned extent (copy-on-write of its file system blocks), and a writer may
/// write many runs as one span read back and rewritten whole, unsharing the whole clone:
/// measured on XFS (README, "Block cloning"), 32 runs of 4 KiB per 2 MiB block made a VHD
/// merge 1.9x slower than copying, 4 runs of 64 KiB made it faster.
const MAX_PATCH_RUNS: usize = 8;

/// The layer that provides most (at least 7/8) but not all of the sectors of `span` from one
/// block of its own covering the whole span, leaving at most [`MAX_PATCH_RUNS`] runs of
/// other sectors, if one does: then cloning that block's whole range and writing the other
/// sectors over it (from the other layers, zeros elsewhere) beats copying. Only where
/// [`patch_after_clone_allowed`]: the other sectors are rewritten after the clone, so a crash
/// between the two must leave them unreachable.
pub(crate) fn mostly_candidate(span: &SpanPlan) -> Option<&SpanSource> {
    if clone_candidate(span).is_some() || span.sectors == 0 {
        return None;
    }
    span.sources.iter().find(|s| {
        matches!(s.pieces.as_slice(), [p] if p.first == 0 && p.len == span.sectors)
            && s.claimed.count_ones() * 8 >= span.sectors * MOSTLY_EIGHTHS
            && s.claimed
                .runs_in(0..span.sectors, false)
                .nth(MAX_PATCH_RUNS)
                .is_none()
    })
}

/// Whether a [`mostly_candidate`] unit may be cloned whole and patched: only into a block the
/// unit allocates (nothing points at it until the batch is committed, after the patch) of a
/// destination that is not differencing (whose new block reads as zeros where the merge
/// writes nothing, so the patch writes zeros there).
pub(crate) fn patch_after_clone_allowed(destination: DiskKind, allocates: bool) -> bool {
    allocates && destination != DiskKind::Differencing
}

/// The destination units (of `unit_sectors` sectors, below sector `limit`) that may receive
/// something from merging layers `0..d` of `chain`: those where a merged layer has a block
/// (from the BATs, never from the virtual size), and every unit past the end of the smallest
/// merged layer, where the source's view hides the destination (zeros, see
/// [`crate::chain::SpanPlan::hidden`]).
fn candidate_units(chain: &Chain, d: usize, limit: u64, unit_sectors: u64) -> Result<SectorBitmap> {
    let unit_count = usize::try_from(limit.div_ceil(unit_sectors))
        .map_err(|_| Error::InvalidParameter("virtual size too large for this platform".into()))?;
    let mut unit_set = SectorBitmap::new(unit_count);
    let mut visible = limit;
    let ss = u64::from(chain.sector_size());
    for l in &chain.layers()[..d] {
        let layer: &dyn Layer = l.layer.as_ref();
        let spb = (layer.block_size() / ss).max(1);
        let layer_limit = limit.min(layer.virtual_size() / ss);
        visible = visible.min(layer_limit);
        for i in layer.mapped_blocks() {
            let s0 = i? * spb;
            if s0 >= layer_limit {
                break;
            }
            let s1 = (s0 + spb).min(layer_limit);
            let u0 = (s0 / unit_sectors) as usize;
            let u1 = ((s1 - 1) / unit_sectors + 1) as usize;
            unit_set.set_range(u0..u1);
        }
    }
    if visible < limit {
        unit_set.set_range((visible / unit_sectors) as usize..unit_count);
    }
    Ok(unit_set)
}

/// The unit size for a destination with blocks of `block_bytes`: the block, or the largest
/// part of it of at most [`MAX_UNIT_BYTES`] that divides it.
fn unit_bytes_for(block_bytes: u64) -> u64 {
    let mut unit = block_bytes;
    while unit > MAX_UNIT_BYTES && unit.is_multiple_of(2) {
        unit /= 2;
    }
    unit
}

fn unit_span(unit: u64, unit_sectors: u64, limit: u64) -> (u64, usize) {
    let start = unit * unit_sectors;
    let end = (start + unit_sectors).min(limit);
    (start, end.saturating_sub(start) as usize)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mem_layer::{MemLayer, chain_of};

    const MIB: u64 = 1 << 20;

    /// A child with 1 MiB blocks over a destination with 64 MiB blocks (VHDX sizes).
    fn big_block_chain(child_blocks: &[u64]) -> Chain {
        let mut child = MemLayer::new("c", DiskKind::Differencing, 128 * MIB, 512, MIB);
        for &b in child_blocks {
            child = child.present(b, None, b as u8);
        }
        let dest = MemLayer::new("d", DiskKind::Dynamic, 128 * MIB, 512, 64 * MIB);
        chain_of(vec![child, dest])
    }

    #[test]
    fn units_are_parts_of_a_large_destination_block() {
        let chain = big_block_chain(&[40, 70]);
        let plan = MergePlan::build(&chain, 1).unwrap();
        assert_eq!(
            (plan.unit_bytes, plan.block_bytes),
            (MAX_UNIT_BYTES, 64 * MIB)
        );
        // The units holding MiB 40 (in block 0) and MiB 70 (in block 1).
        let (u40, u70) = (40 * MIB / MAX_UNIT_BYTES, 70 * MIB / MAX_UNIT_BYTES);
        let per_block = 64 * MIB / MAX_UNIT_BYTES;
        assert_eq!(plan.unit_indices().collect::<Vec<_>>(), vec![u40, u70]);
        assert_eq!(plan.unit_place(u40), (0, u40 * MAX_UNIT_BYTES / 512));
        assert_eq!(
            plan.unit_place(u70),
            (1, (u70 - per_block) * MAX_UNIT_BYTES / 512)
        );
        assert_eq!(plan.blocks_to_allocate, 2);
        assert_eq!(plan.destination_growth, 2 * 64 * MIB);
        assert_eq!(plan.bytes_total, 2 * MIB);

        let mut buf = vec![0u8; plan.unit_bytes as usize];
        let mut scratch = Vec::new();
        let mask = crate::merge::assemble_unit(&chain, &plan, u40, &mut buf, &mut scratch).unwrap();
        let at = ((40 * MIB - u40 * MAX_UNIT_BYTES) / 512) as usize;
        assert_eq!(mask.runs().collect::<Vec<_>>(), vec![at..at + 2048]);
        assert!(buf[at * 512..(at + 2048) * 512].iter().all(|&b| b == 40));
    }

    #[test]
    fn two_parts_of_one_new_block_allocate_it_once() {
        let chain = big_block_chain(&[10, 40]);
        let plan = MergePlan::build(&chain, 1).unwrap();
        let units = [10 * MIB / MAX_UNIT_BYTES, 40 * MIB / MAX_UNIT_BYTES];
        assert!(
            units[0] != units[1],
            "the test wants two units of one block"
        );
        assert_eq!(plan.unit_indices().collect::<Vec<_>>(), units);
        assert_eq!(plan.blocks_to_allocate, 1);
    }

    #[test]
    fn unit_sizes() {
        assert_eq!(unit_bytes_for(2 * MIB), 2 * MIB);
        assert_eq!(unit_bytes_for(16 * MIB), 16 * MIB);
        assert_eq!(unit_bytes_for(32 * MIB), 16 * MIB);
        assert_eq!(unit_bytes_for(256 * MIB), 16 * MIB);
        assert_eq!(unit_bytes_for(3 * MIB), 3 * MIB);
    }
}
