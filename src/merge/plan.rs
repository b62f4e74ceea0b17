//! The merge plan: which destination units receive data, how much each merged layer
//! contributes, and what the destination will allocate. Built from BATs and bitmaps only.

use std::fmt;
use std::path::PathBuf;

use uuid::Uuid;

use crate::chain::Chain;
use crate::error::{Error, Result};
use crate::format::{DiskType, SECTOR_SIZE, SectorBitmap};
use crate::image::DATA_ALIGNMENT;

/// One merged layer of a plan (the source or an intermediate).
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
/// A *unit* is a destination block (a 2 MiB chunk for a fixed destination): the merge writes
/// each unit once.
#[derive(Clone)]
pub struct MergePlan {
    /// The source.
    pub source: PathBuf,
    /// The destination.
    pub destination: PathBuf,
    /// Index of the destination in the source's chain (1 = the immediate parent).
    pub destination_index: usize,
    /// The destination's type.
    pub destination_type: DiskType,
    /// Bytes per unit (the destination's block size, or 2 MiB for a fixed destination).
    pub unit_bytes: u64,
    /// Merged layers, source first.
    pub layers: Vec<PlannedLayer>,
    /// Virtual bytes covered by the merge: the source's virtual size (sectors past it are not
    /// touched).
    pub merged_extent: u64,
    /// Units that receive data or zeros.
    pub units: u64,
    /// Bytes to write: the sum of the layers' contributions and of `zeroed_bytes`.
    pub bytes_total: u64,
    /// Bytes of zeros to write where a merged layer smaller than the source hides the
    /// destination: the source's view reads zeros past the end of a smaller ancestor, so the
    /// destination must too (none where a dynamic destination's block is unallocated, as it
    /// reads as zeros already).
    pub zeroed_bytes: u64,
    /// Destination blocks the merge allocates, at most (a unit of zeros over an unallocated
    /// block of a dynamic destination is skipped, as it reads as zeros already).
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
            .field("layers", &self.layers)
            .field("merged_extent", &self.merged_extent)
            .field("units", &self.units)
            .field("bytes_total", &self.bytes_total)
            .field("zeroed_bytes", &self.zeroed_bytes)
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
        if d == 0 || d >= chain.len() {
            return Err(Error::InvalidParameter(format!(
                "destination index {d} is not an ancestor in a chain of {} layers",
                chain.len()
            )));
        }
        let dest = chain.vhd(d);
        let source = chain.vhd(0);
        let merged_extent = source.virtual_size().min(dest.virtual_size());
        let limit = merged_extent / SECTOR_SIZE;
        let unit_sectors = dest.sectors_per_block();
        let mut unit_set = candidate_units(chain, d, limit, unit_sectors)?;

        let mut layers: Vec<PlannedLayer> = (0..d)
            .map(|li| PlannedLayer {
                path: super::scan::tidy(chain.vhd(li).path()),
                unique_id: chain.vhd(li).unique_id(),
                bytes: 0,
            })
            .collect();
        let candidates: Vec<std::ops::Range<usize>> = unit_set.runs().collect();
        let (mut units, mut blocks_to_allocate, mut zeroed_bytes) = (0u64, 0u64, 0u64);
        for run in candidates {
            for u in run {
                let (start, n) = unit_span(u as u64, unit_sectors, limit);
                let span = chain.plan_span(0..d, start, n)?;
                let claimed: u64 = span
                    .sources
                    .iter()
                    .map(|s| s.claimed.count_ones() as u64)
                    .sum();
                let hidden = span.hidden().count_ones() as u64;
                let unallocated =
                    dest.disk_type().is_sparse() && dest.block_offset(u as u64).is_none();
                // Zeros alone over an unallocated block of a dynamic disk change nothing: it
                // reads as zeros already (a differencing disk's unallocated block reads its
                // parent, which the zeros must hide).
                let zeros_already = unallocated && dest.disk_type() == DiskType::Dynamic;
                if claimed == 0 && (hidden == 0 || zeros_already) {
                    unit_set.clear_range(u..u + 1);
                    continue;
                }
                for src in &span.sources {
                    if let Some(l) = layers.get_mut(src.layer) {
                        l.bytes += src.claimed.count_ones() as u64 * SECTOR_SIZE;
                    }
                }
                zeroed_bytes += hidden * SECTOR_SIZE;
                units += 1;
                if unallocated {
                    blocks_to_allocate += 1;
                }
            }
        }
        let stride = dest.bitmap_bytes() + dest.block_size();
        // Each new block may need up to one alignment gap in front of it.
        let destination_growth = if dest.disk_type().is_sparse() {
            blocks_to_allocate * (stride + DATA_ALIGNMENT)
        } else {
            0
        };
        Ok(MergePlan {
            source: super::scan::tidy(source.path()),
            destination: super::scan::tidy(dest.path()),
            destination_index: d,
            destination_type: dest.disk_type(),
            unit_bytes: dest.block_size(),
            bytes_total: layers.iter().map(|l| l.bytes).sum::<u64>() + zeroed_bytes,
            layers,
            zeroed_bytes,
            merged_extent,
            units,
            blocks_to_allocate,
            destination_growth,
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
            self.unit_bytes / SECTOR_SIZE,
            self.merged_extent / SECTOR_SIZE,
        )
    }
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
    for li in 0..d {
        let vhd = chain.vhd(li);
        let spb = vhd.sectors_per_block();
        let layer_limit = limit.min(vhd.virtual_size() / SECTOR_SIZE);
        visible = visible.min(layer_limit);
        for (i, _) in vhd.allocated_entries() {
            let s0 = i * spb;
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

fn unit_span(unit: u64, unit_sectors: u64, limit: u64) -> (u64, usize) {
    let start = unit * unit_sectors;
    let end = (start + unit_sectors).min(limit);
    (start, end.saturating_sub(start) as usize)
}
