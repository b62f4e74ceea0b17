//! The metadata region: its table ([MS-VHDX] 2.6.1) and the known items (2.6.2).

use uuid::{Uuid, uuid};

use super::{
    SLOT_SIZE, ensure, guid_at, put, put_guid, to_utf16le, u16_at, u32_at, u64_at, utf16le,
};
use crate::{Error, Result};

/// Signature of the metadata table.
pub const METADATA_SIGNATURE: &[u8; 8] = b"metadata";
/// File Parameters item ([MS-VHDX] 2.6.2.1).
pub const FILE_PARAMETERS: Uuid = uuid!("CAA16737-FA36-4D43-B3B6-33F0AA44E76B");
/// Virtual Disk Size item (2.6.2.2).
pub const VIRTUAL_DISK_SIZE: Uuid = uuid!("2FA54224-CD1B-4876-B211-5DBED83BF4B8");
/// Page 83 Data item (2.6.2.3).
pub const PAGE_83: Uuid = uuid!("BECA12AB-B2E6-4523-93EF-C309E000C746");
/// Logical Sector Size item (2.6.2.4).
pub const LOGICAL_SECTOR_SIZE: Uuid = uuid!("8141BF1D-A96F-4709-BA47-F233A8FAAB5F");
/// Physical Sector Size item (2.6.2.5).
pub const PHYSICAL_SECTOR_SIZE: Uuid = uuid!("CDA348C7-445D-4471-9CC9-E9885251C556");
/// Parent Locator item (2.6.2.6).
pub const PARENT_LOCATOR: Uuid = uuid!("A8D35F2D-B30B-454D-ABF7-D3D84834AB0C");
/// Locator type of a VHDX parent (2.6.2.6.1).
pub const VHDX_LOCATOR_TYPE: Uuid = uuid!("B04AEFB7-D19E-4A81-B789-25B8E9445913");
/// Parent locator keys this crate knows (2.6.2.6.3).
pub const KNOWN_LOCATOR_KEYS: [&str; 5] = [
    "parent_linkage",
    "parent_linkage2",
    "relative_path",
    "volume_path",
    "absolute_win32_path",
];
/// At most this many metadata entries (2.6.1.1).
pub const MAX_METADATA_ENTRIES: u16 = 2047;
/// Largest metadata item (2.6.1.2).
pub const MAX_ITEM_LENGTH: u32 = 1 << 20;
/// The largest virtual size, 64 TiB.
pub const MAX_VIRTUAL_SIZE: u64 = 64 << 40;
/// The smallest block size, 1 MiB (2.6.2.1).
pub const MIN_BLOCK_SIZE: u32 = 1 << 20;
/// The largest block size, 256 MiB (2.6.2.1).
pub const MAX_BLOCK_SIZE: u32 = 256 << 20;

/// One metadata table entry ([MS-VHDX] 2.6.1.2).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MetadataEntry {
    /// Which item.
    pub item_id: Uuid,
    /// Offset of the item from the start of the region (at least 64 KiB), or 0 when empty.
    pub offset: u32,
    /// Length in bytes (at most 1 MiB).
    pub length: u32,
    /// A user item (not interpreted).
    pub is_user: bool,
    /// The item describes the virtual disk (not the file).
    pub is_virtual_disk: bool,
    /// An opener that does not know the item must refuse the file.
    pub is_required: bool,
}

/// The metadata table: the first 64 KiB of the metadata region.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MetadataTable {
    /// The entries in table order.
    pub entries: Vec<MetadataEntry>,
}

impl MetadataTable {
    /// Parse the table from the region's bytes; every item must lie inside `region_len`.
    pub fn parse(b: &[u8], region_len: u64) -> Result<MetadataTable> {
        ensure(b.len() >= SLOT_SIZE, || {
            "VHDX metadata table: shorter than 64 KiB".into()
        })?;
        ensure(&b[..8] == METADATA_SIGNATURE, || {
            "VHDX metadata table: no 'metadata' signature".into()
        })?;
        let count = u16_at(b, 10);
        ensure(count <= MAX_METADATA_ENTRIES, || {
            format!("VHDX metadata table: {count} entries (at most 2047)")
        })?;
        let entries: Vec<_> = (0..count as usize)
            .map(|i| parse_entry(b, 32 + 32 * i))
            .collect();
        for e in &entries {
            check_entry(e, region_len)?;
        }
        Ok(MetadataTable { entries })
    }

    /// The bytes of the region from its start that hold the table and every item.
    pub fn span(&self) -> u64 {
        let ends = self
            .entries
            .iter()
            .filter(|e| e.length > 0)
            .map(|e| u64::from(e.offset) + u64::from(e.length));
        ends.fold(SLOT_SIZE as u64, u64::max)
    }

    /// The 64 KiB table.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut b = vec![0; SLOT_SIZE];
        put(&mut b, 0, METADATA_SIGNATURE);
        put(&mut b, 10, &(self.entries.len() as u16).to_le_bytes());
        for (i, e) in self
            .entries
            .iter()
            .take(MAX_METADATA_ENTRIES as usize)
            .enumerate()
        {
            let at = 32 + 32 * i;
            put_guid(&mut b, at, &e.item_id);
            put(&mut b, at + 16, &e.offset.to_le_bytes());
            put(&mut b, at + 20, &e.length.to_le_bytes());
            let flags = u32::from(e.is_user)
                | u32::from(e.is_virtual_disk) << 1
                | u32::from(e.is_required) << 2;
            put(&mut b, at + 24, &flags.to_le_bytes());
        }
        b
    }

    /// The entry of a system (non-user) item, if present; a duplicate is a format error.
    pub fn system_item(&self, id: Uuid) -> Result<Option<MetadataEntry>> {
        let mut it = self
            .entries
            .iter()
            .filter(|e| e.item_id == id && !e.is_user);
        let first = it.next().copied();
        ensure(it.next().is_none(), || {
            format!("VHDX metadata: item {id} appears twice")
        })?;
        Ok(first)
    }
}

fn parse_entry(b: &[u8], at: usize) -> MetadataEntry {
    let flags = u32_at(b, at + 24);
    MetadataEntry {
        item_id: guid_at(b, at),
        offset: u32_at(b, at + 16),
        length: u32_at(b, at + 20),
        is_user: flags & 1 != 0,
        is_virtual_disk: flags & 2 != 0,
        is_required: flags & 4 != 0,
    }
}

/// [MS-VHDX] 2.6.1.2: an item lies at or after 64 KiB, is at most 1 MiB, inside the region.
fn check_entry(e: &MetadataEntry, region_len: u64) -> Result<()> {
    ensure(e.length <= MAX_ITEM_LENGTH, || {
        format!(
            "VHDX metadata item {}: length {} > 1 MiB",
            e.item_id, e.length
        )
    })?;
    if e.length == 0 {
        return Ok(());
    }
    let end = u64::from(e.offset) + u64::from(e.length);
    ensure(e.offset as usize >= SLOT_SIZE && end <= region_len, || {
        format!(
            "VHDX metadata item {}: bytes {}..{end} are not inside 64 KiB..{region_len}",
            e.item_id, e.offset
        )
    })
}

/// File Parameters ([MS-VHDX] 2.6.2.1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FileParameters {
    /// Payload block size: a power of two, 1 MiB to 256 MiB.
    pub block_size: u32,
    /// Blocks stay allocated (a "fixed" disk).
    pub leave_block_allocated: bool,
    /// A differencing disk: a parent locator exists.
    pub has_parent: bool,
}

/// Every known item of a metadata region, validated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Metadata {
    /// File Parameters.
    pub file_parameters: FileParameters,
    /// Virtual Disk Size in bytes.
    pub virtual_disk_size: u64,
    /// Page 83 Data: the SCSI identifier.
    pub page_83: Uuid,
    /// Logical sector size, 512 or 4096.
    pub logical_sector_size: u32,
    /// Physical sector size, 512 or 4096.
    pub physical_sector_size: u32,
    /// The parent locator of a differencing disk.
    pub parent_locator: Option<ParentLocator>,
}

/// Validate the block size: a power of two, 1 MiB to 256 MiB ([MS-VHDX] 2.6.2.1).
pub fn check_block_size(block_size: u32) -> Result<()> {
    ensure(
        block_size.is_power_of_two() && (MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&block_size),
        || format!("VHDX block size {block_size} is not a power of two from 1 MiB to 256 MiB"),
    )
}

/// Validate a sector size item: 512 or 4096 ([MS-VHDX] 2.6.2.4, 2.6.2.5).
pub fn check_sector_size(what: &str, size: u32) -> Result<()> {
    ensure(size == 512 || size == 4096, || {
        format!("VHDX {what} sector size {size} (expected 512 or 4096)")
    })
}

/// Validate the virtual size: non-zero, at most 64 TiB, a multiple of the logical sector
/// size ([MS-VHDX] 2.6.2.2).
pub fn check_virtual_size(size: u64, logical_sector_size: u32) -> Result<()> {
    ensure(
        size > 0
            && size <= MAX_VIRTUAL_SIZE
            && size.is_multiple_of(u64::from(logical_sector_size.max(1))),
        || {
            format!(
                "VHDX virtual size {size} is not a multiple of {logical_sector_size} from 1 to 64 TiB"
            )
        },
    )
}

impl Metadata {
    /// Parse and validate the whole metadata region `region` (the caller bounds its size by
    /// the region length). An unknown required item is Not Supported (2.6.1.2).
    pub fn parse(region: &[u8]) -> Result<Metadata> {
        Self::parse_prefix(region, region.len() as u64)
    }

    /// [`Metadata::parse`] of a region of `region_len` bytes from its first bytes `region`,
    /// which must hold the table and every item ([`MetadataTable::span`]): an opener reads
    /// those, not the whole (usually 1 MiB, almost all unused) region.
    pub fn parse_prefix(region: &[u8], region_len: u64) -> Result<Metadata> {
        let table = MetadataTable::parse(region, region_len)?;
        ensure(table.span() <= region.len() as u64, || {
            format!(
                "VHDX metadata: {} bytes read of the items' {}",
                region.len(),
                table.span()
            )
        })?;
        check_unknown(&table)?;
        let item = |id: Uuid, name: &str, len: u32| -> Result<&[u8]> {
            let e = table
                .system_item(id)?
                .ok_or_else(|| Error::format(format!("VHDX metadata: no {name} item")))?;
            ensure(e.length >= len, || {
                format!("VHDX metadata {name}: {} bytes (expected {len})", e.length)
            })?;
            Ok(item_bytes(region, &e))
        };
        let fp = item(FILE_PARAMETERS, "File Parameters", 8)?;
        let file_parameters = FileParameters {
            block_size: u32_at(fp, 0),
            leave_block_allocated: u32_at(fp, 4) & 1 != 0,
            has_parent: u32_at(fp, 4) & 2 != 0,
        };
        let m = Metadata {
            file_parameters,
            virtual_disk_size: u64_at(item(VIRTUAL_DISK_SIZE, "Virtual Disk Size", 8)?, 0),
            page_83: guid_at(item(PAGE_83, "Page 83 Data", 16)?, 0),
            logical_sector_size: u32_at(item(LOGICAL_SECTOR_SIZE, "Logical Sector Size", 4)?, 0),
            physical_sector_size: u32_at(item(PHYSICAL_SECTOR_SIZE, "Physical Sector Size", 4)?, 0),
            parent_locator: match table.system_item(PARENT_LOCATOR)? {
                Some(e) => Some(ParentLocator::parse(item_bytes(region, &e))?),
                None => None,
            },
        };
        m.validate()?;
        Ok(m)
    }

    /// Every rule on the items and between them.
    pub fn validate(&self) -> Result<()> {
        check_block_size(self.file_parameters.block_size)?;
        check_sector_size("logical", self.logical_sector_size)?;
        check_sector_size("physical", self.physical_sector_size)?;
        check_virtual_size(self.virtual_disk_size, self.logical_sector_size)?;
        ensure(
            self.file_parameters.has_parent == self.parent_locator.is_some(),
            || "VHDX metadata: HasParent and the presence of a Parent Locator disagree".into(),
        )
    }

    /// The metadata region (`region_len` bytes, at least 128 KiB): the table, then the items
    /// from 64 KiB on, in the order Hyper-V writes them.
    pub fn to_region_bytes(&self, region_len: usize) -> Vec<u8> {
        let fp = self.file_parameters;
        let flags = u32::from(fp.leave_block_allocated) | u32::from(fp.has_parent) << 1;
        let mut items: Vec<(Uuid, bool, Vec<u8>)> = vec![
            (
                FILE_PARAMETERS,
                false,
                [fp.block_size.to_le_bytes(), flags.to_le_bytes()].concat(),
            ),
            (
                VIRTUAL_DISK_SIZE,
                true,
                self.virtual_disk_size.to_le_bytes().to_vec(),
            ),
            (PAGE_83, true, self.page_83.to_bytes_le().to_vec()),
            (
                LOGICAL_SECTOR_SIZE,
                true,
                self.logical_sector_size.to_le_bytes().to_vec(),
            ),
            (
                PHYSICAL_SECTOR_SIZE,
                true,
                self.physical_sector_size.to_le_bytes().to_vec(),
            ),
        ];
        if let Some(pl) = &self.parent_locator {
            items.push((PARENT_LOCATOR, false, pl.to_bytes()));
        }
        let mut b = vec![0; region_len];
        let mut entries = Vec::new();
        let mut at = SLOT_SIZE;
        for (id, vd, data) in items {
            put(&mut b, at, &data);
            let length = data.len() as u32;
            entries.push(MetadataEntry {
                item_id: id,
                offset: at as u32,
                length,
                is_user: false,
                is_virtual_disk: vd,
                is_required: true,
            });
            at += data.len().next_multiple_of(8);
        }
        put(&mut b, 0, &MetadataTable { entries }.to_bytes());
        b
    }
}

/// The metadata region of `region_len` bytes, from its first bytes `region` (at least
/// [`parent_locator_span`] of them), with its parent locator item replaced by `loc`
/// ([MS-VHDX] 2.6.2.6), every other item and the table's order kept: written over the old
/// item when it fits in the old item's space (the rest zeroed), else after the last item
/// (8-byte aligned). A region with no room left is Not Supported. Returns as many bytes as
/// `region` holds.
pub fn with_parent_locator(region: &[u8], region_len: u64, loc: &ParentLocator) -> Result<Vec<u8>> {
    let mut table = MetadataTable::parse(region, region_len)?;
    let data = loc.to_bytes();
    let (i, at) = locator_place(&table, region_len, data.len())?;
    ensure(at + data.len() <= region.len(), || {
        format!(
            "VHDX metadata: {} bytes read of the {} a parent locator rewrite changes",
            region.len(),
            at + data.len()
        )
    })?;
    let old = table.entries[i];
    let mut b = region.to_vec();
    b[old.offset as usize..(old.offset + old.length) as usize].fill(0);
    put(&mut b, at, &data);
    table.entries[i].offset = at as u32;
    table.entries[i].length = data.len() as u32;
    put(&mut b, 0, &table.to_bytes());
    Ok(b)
}

/// The bytes from the start of the metadata region (of `region_len` bytes, whose first bytes
/// `region` hold the table and every item) that [`with_parent_locator`] reads and writes to
/// put `loc` in: the table, the items, and the new item's place.
pub fn parent_locator_span(region: &[u8], region_len: u64, loc: &ParentLocator) -> Result<u64> {
    let table = MetadataTable::parse(region, region_len)?;
    let len = loc.to_bytes().len();
    let (_, at) = locator_place(&table, region_len, len)?;
    Ok(table.span().max((at + len) as u64))
}

/// Which entry of `table` is the parent locator, and where an item of `len` bytes replacing
/// it goes (its old place if it fits, else after the last item), inside `region_len`.
fn locator_place(table: &MetadataTable, region_len: u64, len: usize) -> Result<(usize, usize)> {
    let i = table
        .entries
        .iter()
        .position(|e| e.item_id == PARENT_LOCATOR && !e.is_user)
        .ok_or_else(|| Error::format("VHDX metadata: no parent locator item to replace"))?;
    let old = table.entries[i];
    let at = if len <= old.length as usize {
        old.offset as usize
    } else {
        let end = table.entries.iter().map(|e| e.offset + e.length).max();
        (end.unwrap_or(0) as usize)
            .max(SLOT_SIZE)
            .next_multiple_of(8)
    };
    if (at + len) as u64 > region_len || len > MAX_ITEM_LENGTH as usize {
        return Err(Error::not_supported(format!(
            "VHDX metadata region of {region_len} bytes has no room for a parent locator of {len} bytes"
        )));
    }
    Ok((i, at))
}

/// The bytes of an item whose bounds [`check_entry`] has checked.
fn item_bytes<'a>(region: &'a [u8], e: &MetadataEntry) -> &'a [u8] {
    let start = e.offset as usize;
    region.get(start..start + e.length as usize).unwrap_or(&[])
}

fn check_unknown(table: &MetadataTable) -> Result<()> {
    let known = [
        FILE_PARAMETERS,
        VIRTUAL_DISK_SIZE,
        PAGE_83,
        LOGICAL_SECTOR_SIZE,
        PHYSICAL_SECTOR_SIZE,
        PARENT_LOCATOR,
    ];
    match table
        .entries
        .iter()
        .find(|e| e.is_required && (e.is_user || !known.contains(&e.item_id)))
    {
        Some(e) => Err(Error::not_supported(format!(
            "VHDX: unknown required metadata item {}",
            e.item_id
        ))),
        None => Ok(()),
    }
}

/// The parent locator item ([MS-VHDX] 2.6.2.6): a locator type and key/value pairs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParentLocator {
    /// The locator type ([`VHDX_LOCATOR_TYPE`]).
    pub locator_type: Uuid,
    /// The key/value pairs in item order.
    pub entries: Vec<(String, String)>,
}

impl ParentLocator {
    /// Parse and validate the item: VHDX locator type (else Not Supported), unique keys, a
    /// `parent_linkage` GUID and at least one path key (2.6.2.6.3).
    pub fn parse(b: &[u8]) -> Result<ParentLocator> {
        ensure(b.len() >= 20, || {
            "VHDX parent locator: shorter than its header".into()
        })?;
        let locator_type = guid_at(b, 0);
        if locator_type != VHDX_LOCATOR_TYPE {
            return Err(Error::not_supported(format!(
                "VHDX parent locator type {locator_type}"
            )));
        }
        let count = u16_at(b, 18) as usize;
        ensure(20 + 12 * count <= b.len(), || {
            format!("VHDX parent locator: {count} entries overrun the item")
        })?;
        let entries = (0..count)
            .map(|i| parse_pair(b, 20 + 12 * i))
            .collect::<Result<Vec<_>>>()?;
        let pl = ParentLocator {
            locator_type,
            entries,
        };
        pl.validate()?;
        Ok(pl)
    }

    /// The rules of [MS-VHDX] 2.6.2.6.3 on the keys.
    pub fn validate(&self) -> Result<()> {
        for (i, (k, _)) in self.entries.iter().enumerate() {
            ensure(!self.entries[..i].iter().any(|(k2, _)| k2 == k), || {
                format!("VHDX parent locator: key {k} twice")
            })?;
        }
        self.parent_linkage()?;
        if let Some(v) = self.get("parent_linkage2") {
            parse_guid_text(v, "parent_linkage2")?;
        }
        let paths = ["relative_path", "volume_path", "absolute_win32_path"];
        ensure(paths.iter().any(|p| self.get(p).is_some()), || {
            "VHDX parent locator: no path key".into()
        })
    }

    /// The value of `key`.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.entries
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// `parent_linkage`: the parent's DataWriteGuid when the link was made.
    pub fn parent_linkage(&self) -> Result<Uuid> {
        let v = self
            .get("parent_linkage")
            .ok_or_else(|| Error::format("VHDX parent locator: no parent_linkage"))?;
        parse_guid_text(v, "parent_linkage")
    }

    /// `parent_linkage2`, when present (Hyper-V writes the zero GUID).
    pub fn parent_linkage2(&self) -> Option<Uuid> {
        self.get("parent_linkage2")
            .and_then(|v| parse_guid_text(v, "parent_linkage2").ok())
    }

    /// The item bytes: header, the key/value table, then the UTF-16LE strings.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut strings = Vec::new();
        let mut table = Vec::new();
        let base = 20 + 12 * self.entries.len();
        for (k, v) in &self.entries {
            let (k, v) = (to_utf16le(k), to_utf16le(v));
            let ko = (base + strings.len()) as u32;
            strings.extend_from_slice(&k);
            let vo = (base + strings.len()) as u32;
            strings.extend_from_slice(&v);
            for f in [
                &ko.to_le_bytes()[..],
                &vo.to_le_bytes(),
                &(k.len() as u16).to_le_bytes(),
                &(v.len() as u16).to_le_bytes(),
            ] {
                table.extend_from_slice(f);
            }
        }
        let mut b = self.locator_type.to_bytes_le().to_vec();
        b.extend_from_slice(&[0, 0]);
        b.extend_from_slice(&(self.entries.len() as u16).to_le_bytes());
        b.extend(table);
        b.extend(strings);
        b
    }
}

fn parse_pair(b: &[u8], at: usize) -> Result<(String, String)> {
    let (ko, vo) = (u32_at(b, at) as usize, u32_at(b, at + 4) as usize);
    let (kl, vl) = (u16_at(b, at + 8) as usize, u16_at(b, at + 10) as usize);
    let field = |o: usize, l: usize, what: &str| -> Result<String> {
        ensure(l > 0, || {
            format!("VHDX parent locator: empty {what} in entry at {at}")
        })?;
        let s = b.get(o..o + l).ok_or_else(|| {
            Error::format(format!(
                "VHDX parent locator: {what} at {o}+{l} outside the item"
            ))
        })?;
        utf16le(s, "VHDX parent locator")
    };
    Ok((field(ko, kl, "key")?, field(vo, vl, "value")?))
}

/// A `{xxxxxxxx-...}` GUID value of the parent locator.
fn parse_guid_text(v: &str, key: &str) -> Result<Uuid> {
    Uuid::parse_str(v)
        .map_err(|_| Error::format(format!("VHDX parent locator: {key} {v:?} is not a GUID")))
}
