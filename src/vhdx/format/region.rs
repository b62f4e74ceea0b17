//! The region table ([MS-VHDX] 2.2.3) and the known regions.

use uuid::{Uuid, uuid};

use super::{MIB, SLOT_SIZE, check_crc, ensure, guid_at, put, put_guid, seal, u32_at, u64_at};
use crate::{Error, Result};

/// Signature of a region table.
pub const REGION_SIGNATURE: &[u8; 4] = b"regi";
/// The BAT region ([MS-VHDX] 2.2.3.2).
pub const BAT_GUID: Uuid = uuid!("2DC27766-F623-4200-9D64-115E9BFD4A08");
/// The metadata region.
pub const METADATA_GUID: Uuid = uuid!("8B7CA206-4790-4B9A-B8FE-575F050F886E");
/// At most this many entries ([MS-VHDX] 2.2.3.1).
pub const MAX_REGION_ENTRIES: u32 = 2047;

/// One region table entry ([MS-VHDX] 2.2.3.2).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RegionEntry {
    /// Which region.
    pub guid: Uuid,
    /// Offset in the file (1 MiB aligned, at least 1 MiB).
    pub file_offset: u64,
    /// Length in bytes (a multiple of 1 MiB).
    pub length: u32,
    /// An opener that does not know the region must refuse the file.
    pub required: bool,
}

impl RegionEntry {
    /// The byte range the region occupies.
    pub fn range(&self) -> std::ops::Range<u64> {
        self.file_offset..self.file_offset.saturating_add(self.length.into())
    }
}

/// A region table (one 64 KiB copy).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RegionTable {
    /// The entries in table order.
    pub entries: Vec<RegionEntry>,
}

/// The two known regions of a valid table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Regions {
    /// The block allocation table.
    pub bat: RegionEntry,
    /// The metadata region.
    pub metadata: RegionEntry,
}

impl RegionTable {
    /// Parse one copy (64 KiB); `offset` is for messages. Checks signature, CRC-32C, entry count
    /// and every entry's alignment ([MS-VHDX] 2.2.3).
    pub fn parse(b: &[u8], offset: u64) -> Result<RegionTable> {
        ensure(b.len() >= SLOT_SIZE, || {
            format!("VHDX region table at {offset}: shorter than 64 KiB")
        })?;
        let b = &b[..SLOT_SIZE];
        ensure(&b[..4] == REGION_SIGNATURE, || {
            format!("VHDX region table at {offset}: no 'regi' signature")
        })?;
        check_crc(b, 4, "VHDX region table", offset)?;
        let count = u32_at(b, 8);
        ensure(count <= MAX_REGION_ENTRIES, || {
            format!("VHDX region table at {offset}: {count} entries (at most {MAX_REGION_ENTRIES})")
        })?;
        let entries = (0..count as usize)
            .map(|i| parse_entry(b, 16 + 32 * i, offset))
            .collect::<Result<_>>()?;
        Ok(RegionTable { entries })
    }

    /// The 64 KiB table with its checksum.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut b = vec![0; SLOT_SIZE];
        put(&mut b, 0, REGION_SIGNATURE);
        put(&mut b, 8, &(self.entries.len() as u32).to_le_bytes());
        for (i, e) in self
            .entries
            .iter()
            .take(MAX_REGION_ENTRIES as usize)
            .enumerate()
        {
            let at = 16 + 32 * i;
            put_guid(&mut b, at, &e.guid);
            put(&mut b, at + 16, &e.file_offset.to_le_bytes());
            put(&mut b, at + 24, &e.length.to_le_bytes());
            put(&mut b, at + 28, &u32::from(e.required).to_le_bytes());
        }
        seal(&mut b, 4);
        b
    }

    /// The BAT and metadata regions, each exactly once; an unknown required region is Not
    /// Supported, an unknown optional one is skipped; no region may overlap another, the
    /// header section or the log `log` ([MS-VHDX] 2.2.3.2).
    pub fn known(&self, log: std::ops::Range<u64>) -> Result<Regions> {
        let find = |g: Uuid, name: &str| -> Result<RegionEntry> {
            let mut it = self.entries.iter().filter(|e| e.guid == g);
            let first = it
                .next()
                .ok_or_else(|| Error::format(format!("VHDX region table: no {name} region")))?;
            ensure(it.next().is_none(), || {
                format!("VHDX region table: {name} region appears twice")
            })?;
            Ok(*first)
        };
        if let Some(e) = self
            .entries
            .iter()
            .find(|e| e.required && e.guid != BAT_GUID && e.guid != METADATA_GUID)
        {
            return Err(Error::not_supported(format!(
                "VHDX: unknown required region {}",
                e.guid
            )));
        }
        let regions = Regions {
            bat: find(BAT_GUID, "BAT")?,
            metadata: find(METADATA_GUID, "metadata")?,
        };
        let objects = [
            ("header section", 0..MIB),
            ("log", log),
            ("BAT", regions.bat.range()),
            ("metadata", regions.metadata.range()),
        ];
        check_no_overlap(&objects)?;
        Ok(regions)
    }
}

fn parse_entry(b: &[u8], at: usize, table: u64) -> Result<RegionEntry> {
    let e = RegionEntry {
        guid: guid_at(b, at),
        file_offset: u64_at(b, at + 16),
        length: u32_at(b, at + 24),
        required: u32_at(b, at + 28) & 1 == 1,
    };
    ensure(
        e.file_offset >= MIB && e.file_offset.is_multiple_of(MIB),
        || {
            format!(
                "VHDX region table at {table}: region {} at {} is not 1 MiB aligned at or after 1 MiB",
                e.guid, e.file_offset
            )
        },
    )?;
    ensure(e.length > 0 && u64::from(e.length) % MIB == 0, || {
        format!(
            "VHDX region table at {table}: region {} length {} is not a non-zero multiple of 1 MiB",
            e.guid, e.length
        )
    })?;
    Ok(e)
}

/// Fail when any two of the named byte ranges overlap ([MS-VHDX] 2.1: objects never overlap).
pub fn check_no_overlap(objects: &[(&str, std::ops::Range<u64>)]) -> Result<()> {
    for (i, (a, ra)) in objects.iter().enumerate() {
        for (b, rb) in &objects[i + 1..] {
            ensure(ra.end <= rb.start || rb.end <= ra.start, || {
                format!(
                    "VHDX: {a} {:#x}..{:#x} overlaps {b} {:#x}..{:#x}",
                    ra.start, ra.end, rb.start, rb.end
                )
            })?;
        }
    }
    Ok(())
}

/// Which region table copy to use: the first valid one ([MS-VHDX] 2.2.3 keeps two identical
/// copies). Returns the table and whether the two copies differ (or one is invalid).
pub fn choose_region_table(copy1: &[u8], copy2: &[u8]) -> Result<(RegionTable, bool)> {
    let t1 = RegionTable::parse(copy1, super::REGION_TABLE1_OFFSET);
    let t2 = RegionTable::parse(copy2, super::REGION_TABLE2_OFFSET);
    match (t1, t2) {
        (Ok(a), Ok(b)) => {
            let differ = a != b;
            Ok((a, differ))
        }
        (Ok(a), Err(_)) => Ok((a, true)),
        (Err(_), Ok(b)) => Ok((b, true)),
        (Err(e1), Err(e2)) => Err(no_valid_table(&e1, &e2)),
    }
}

/// The table [`choose_region_table`] chooses, the second copy read (by `copy2`) only when the
/// first is not valid: what an open needs, which never asks whether the copies differ.
pub(crate) fn first_valid_region_table(
    copy1: &[u8],
    copy2: impl FnOnce() -> Result<Vec<u8>>,
) -> Result<RegionTable> {
    let e1 = match RegionTable::parse(copy1, super::REGION_TABLE1_OFFSET) {
        Ok(a) => return Ok(a),
        Err(e) => e,
    };
    RegionTable::parse(&copy2()?, super::REGION_TABLE2_OFFSET)
        .map_err(|e2| no_valid_table(&e1, &e2))
}

fn no_valid_table(e1: &Error, e2: &Error) -> Error {
    Error::format(format!("no valid VHDX region table: {e1}; {e2}"))
}
