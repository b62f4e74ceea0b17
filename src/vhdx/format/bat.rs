//! The block allocation table ([MS-VHDX] 2.5): entries, block states, the chunk ratio and the
//! index of every payload and sector-bitmap entry.

use super::metadata::{check_block_size, check_sector_size, check_virtual_size};
use super::{MIB, ensure};
use crate::{Error, Result};

/// Sectors one 1 MiB sector bitmap block describes: 2^23 ([MS-VHDX] 2.5.1).
pub const SECTORS_PER_BITMAP: u64 = 1 << 23;

/// State of a payload block entry ([MS-VHDX] 2.5.1.1).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PayloadState {
    /// 0: not in this file (zeros, or the parent's data in a differencing disk).
    NotPresent,
    /// 1: contents undefined; reads as zeros.
    Undefined,
    /// 2: reads as zeros.
    Zero,
    /// 3: unmapped (after TRIM); reads as zeros.
    Unmapped,
    /// 6: every sector is in this file.
    FullyPresent,
    /// 7: the sector bitmap says which sectors are in this file.
    PartiallyPresent,
}

impl PayloadState {
    /// Every state, in value order.
    pub const ALL: [PayloadState; 6] = [
        PayloadState::NotPresent,
        PayloadState::Undefined,
        PayloadState::Zero,
        PayloadState::Unmapped,
        PayloadState::FullyPresent,
        PayloadState::PartiallyPresent,
    ];

    /// The specification's name in lower case: `not_present`, `undefined`, `zero`, `unmapped`,
    /// `fully_present`, `partially_present`.
    pub fn name(self) -> &'static str {
        match self {
            PayloadState::NotPresent => "not_present",
            PayloadState::Undefined => "undefined",
            PayloadState::Zero => "zero",
            PayloadState::Unmapped => "unmapped",
            PayloadState::FullyPresent => "fully_present",
            PayloadState::PartiallyPresent => "partially_present",
        }
    }

    /// The state's value in the entry.
    pub fn value(self) -> u8 {
        match self {
            PayloadState::NotPresent => 0,
            PayloadState::Undefined => 1,
            PayloadState::Zero => 2,
            PayloadState::Unmapped => 3,
            PayloadState::FullyPresent => 6,
            PayloadState::PartiallyPresent => 7,
        }
    }
}

/// State of a sector bitmap entry ([MS-VHDX] 2.5.1.2).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BitmapState {
    /// 0: no bitmap block; every sector of the chunk is in the parent.
    NotPresent,
    /// 6: a 1 MiB bitmap block at the entry's offset.
    Present,
}

/// One raw BAT entry: state in bits 0-2, FileOffsetMB in bits 20-63 ([MS-VHDX] 2.5.1).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct BatEntry(pub u64);

impl BatEntry {
    /// An entry from its state value and file offset in MiB (which must fit in 44 bits).
    pub fn new(state: u8, file_offset_mb: u64) -> BatEntry {
        BatEntry(u64::from(state & 7) | (file_offset_mb << 20))
    }

    /// The entry at index `i` of BAT bytes, if inside them.
    pub fn at(bat: &[u8], i: u64) -> Option<BatEntry> {
        let at = usize::try_from(i).ok()?.checked_mul(8)?;
        let b: [u8; 8] = bat.get(at..at.checked_add(8)?)?.try_into().ok()?;
        Some(BatEntry(u64::from_le_bytes(b)))
    }

    /// The raw state value (bits 0-2).
    pub fn state(self) -> u8 {
        (self.0 & 7) as u8
    }

    /// FileOffsetMB (bits 20-63).
    pub fn file_offset_mb(self) -> u64 {
        self.0 >> 20
    }

    /// The byte offset of the block in the file.
    pub fn file_offset(self) -> u64 {
        self.0 & !(MIB - 1)
    }

    /// The state of a payload entry; 4 and 5 are reserved, a format error.
    pub fn payload_state(self) -> Result<PayloadState> {
        Ok(match self.state() {
            0 => PayloadState::NotPresent,
            1 => PayloadState::Undefined,
            2 => PayloadState::Zero,
            3 => PayloadState::Unmapped,
            6 => PayloadState::FullyPresent,
            7 => PayloadState::PartiallyPresent,
            s => {
                return Err(Error::format(format!(
                    "VHDX BAT: reserved payload block state {s}"
                )));
            }
        })
    }

    /// The state of a sector bitmap entry; 7 is accepted as present (openvmm does so for
    /// compatibility), other non-zero values are reserved.
    pub fn bitmap_state(self) -> Result<BitmapState> {
        match self.state() {
            0 => Ok(BitmapState::NotPresent),
            6 | 7 => Ok(BitmapState::Present),
            s => Err(Error::format(format!(
                "VHDX BAT: reserved sector bitmap block state {s}"
            ))),
        }
    }
}

/// The shape of a disk's BAT: what the index math needs ([MS-VHDX] 2.5).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Geometry {
    /// Virtual size in bytes.
    pub virtual_size: u64,
    /// Payload block size.
    pub block_size: u32,
    /// Logical sector size, 512 or 4096.
    pub logical_sector_size: u32,
    /// A differencing disk.
    pub has_parent: bool,
}

impl Geometry {
    /// A validated geometry: block size, sector size and virtual size rules.
    pub fn new(
        virtual_size: u64,
        block_size: u32,
        logical_sector_size: u32,
        has_parent: bool,
    ) -> Result<Geometry> {
        check_block_size(block_size)?;
        check_sector_size("logical", logical_sector_size)?;
        check_virtual_size(virtual_size, logical_sector_size)?;
        Ok(Geometry {
            virtual_size,
            block_size,
            logical_sector_size,
            has_parent,
        })
    }

    /// Payload blocks per chunk: 2^23 * LogicalSectorSize / BlockSize (2.5.1).
    pub fn chunk_ratio(&self) -> u64 {
        SECTORS_PER_BITMAP * u64::from(self.logical_sector_size) / u64::from(self.block_size)
    }

    /// Payload blocks: ceil(VirtualDiskSize / BlockSize).
    pub fn data_blocks(&self) -> u64 {
        self.virtual_size.div_ceil(self.block_size.into())
    }

    /// Sector bitmap blocks: ceil(DataBlocks / ChunkRatio).
    pub fn bitmap_blocks(&self) -> u64 {
        self.data_blocks().div_ceil(self.chunk_ratio())
    }

    /// BAT index of payload block `i`: i + floor(i / ChunkRatio).
    pub fn payload_index(&self, i: u64) -> u64 {
        i + i / self.chunk_ratio()
    }

    /// BAT index of the sector bitmap entry of chunk `c`: c * (ChunkRatio + 1) + ChunkRatio.
    pub fn bitmap_index(&self, c: u64) -> u64 {
        c * (self.chunk_ratio() + 1) + self.chunk_ratio()
    }

    /// Entries the BAT must hold (2.5): DataBlocks + floor((DataBlocks - 1) / ChunkRatio)
    /// without a parent, SectorBitmapBlocks * (ChunkRatio + 1) with one.
    pub fn entries_needed(&self) -> u64 {
        let n = self.data_blocks();
        if self.has_parent {
            self.bitmap_blocks() * (self.chunk_ratio() + 1)
        } else {
            n + n.saturating_sub(1) / self.chunk_ratio()
        }
    }

    /// Fail unless a BAT region of `region_len` bytes holds every needed entry.
    pub fn check_bat_region(&self, region_len: u64) -> Result<()> {
        let need = self.entries_needed() * 8;
        ensure(region_len >= need, || {
            format!(
                "VHDX BAT region of {region_len} bytes is smaller than the {need} the disk needs"
            )
        })
    }

    /// The byte range, inside its chunk's 1 MiB bitmap block, of payload block `i`'s bits:
    /// `1 MiB / ChunkRatio` bytes at `(i mod ChunkRatio) * (1 MiB / ChunkRatio)` (2.6.3).
    pub fn bitmap_slice(&self, i: u64) -> std::ops::Range<usize> {
        let per = (MIB / self.chunk_ratio()) as usize;
        let start = (i % self.chunk_ratio()) as usize * per;
        start..start + per
    }

    /// The chunk of payload block `i`.
    pub fn chunk_of(&self, i: u64) -> u64 {
        i / self.chunk_ratio()
    }

    /// What BAT entry `k` describes: the inverse of [`Geometry::payload_index`] and
    /// [`Geometry::bitmap_index`].
    pub fn entry_kind(&self, k: u64) -> EntryKind {
        let cr = self.chunk_ratio();
        let (c, r) = (k / (cr + 1), k % (cr + 1));
        match (r == cr, c * cr + r) {
            (true, _) => EntryKind::Bitmap(c),
            (false, i) if i < self.data_blocks() => EntryKind::Payload(i),
            _ => EntryKind::Unused,
        }
    }
}

/// What one BAT entry describes ([`Geometry::entry_kind`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EntryKind {
    /// The payload entry of this block.
    Payload(u64),
    /// The sector bitmap entry of this chunk.
    Bitmap(u64),
    /// A payload slot past the last block (in the last chunk of a differencing disk).
    Unused,
}

/// Bit `n` of a sector bitmap (LSB first: bit n%8 of byte n/8; 1 = this file holds the sector).
pub fn bitmap_bit(bitmap: &[u8], n: usize) -> bool {
    bitmap.get(n / 8).is_some_and(|b| b >> (n % 8) & 1 == 1)
}

/// The first `n` bits of a sector bitmap as a [`crate::bitmap::SectorBitmap`] (whose on-disk
/// order is MSB first, VHD's): each byte's bits reversed, then decoded a word at a time.
/// Missing bytes read as clear.
pub fn sector_bitmap(bitmap: &[u8], n: usize) -> crate::bitmap::SectorBitmap {
    let msb_first: Vec<u8> = bitmap.iter().map(|b| b.reverse_bits()).collect();
    crate::bitmap::SectorBitmap::from_bytes(&msb_first, n)
}

/// Set or clear bit `n` of a sector bitmap (ignored beyond its end).
pub fn set_bitmap_bit(bitmap: &mut [u8], n: usize, on: bool) {
    if let Some(b) = bitmap.get_mut(n / 8) {
        let mask = 1 << (n % 8);
        if on { *b |= mask } else { *b &= !mask }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The word-at-a-time decode agrees with the bit-by-bit rule, at every length (a short
    /// last byte, a missing tail).
    #[test]
    fn sector_bitmap_matches_bitmap_bit() {
        let bytes: Vec<u8> = (0..64u32).map(|i| (i * 37 + 11) as u8).collect();
        for n in [0, 1, 7, 8, 9, 63, 64, 65, 500, 512, 600] {
            let map = sector_bitmap(&bytes, n);
            assert_eq!(map.len(), n);
            for i in 0..n {
                assert_eq!(map.get(i), bitmap_bit(&bytes, i), "bit {i} of {n}");
            }
        }
    }
}
