//! The VHDX part of [`crate::info`]: what `info` shows of a VHDX, from one
//! [`check::inspect_path`] pass.

use std::collections::BTreeMap;
use std::path::Path;

use uuid::Uuid;

use crate::check::Severity;
use crate::error::{Error, Result};
use crate::info::{ImageInfo, InfoOptions, InfoProblem, InfoReport};
use crate::layer::DiskKind;
use crate::vhdx::Vhdx;
use crate::vhdx::check::{self, Inspection, LogState};
use crate::vhdx::format::metadata as md;
use crate::vhdx::format::region::{BAT_GUID, METADATA_GUID};
use crate::vhdx::format::{HEADER1_OFFSET, HEADER2_OFFSET};

/// What `info` shows of a VHDX ([MS-VHDX] 2.2 to 2.6). Everything the metadata gives is
/// `None` when the metadata cannot be read.
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct VhdxInfo {
    /// The file identifier's creator string.
    pub creator: Option<String>,
    /// Fixed, dynamic or differencing, from the file parameters.
    pub disk_type: Option<DiskKind>,
    /// Virtual Disk Size.
    pub virtual_size: Option<u64>,
    /// Block size.
    pub block_size: Option<u32>,
    /// Logical Sector Size.
    pub logical_sector_size: Option<u32>,
    /// Physical Sector Size.
    pub physical_sector_size: Option<u32>,
    /// File parameter LeaveBlockAllocated.
    pub leave_block_allocated: Option<bool>,
    /// File parameter HasParent.
    pub has_parent: Option<bool>,
    /// Page 83 Data.
    pub page_83: Option<Uuid>,
    /// The current header's DataWriteGuid.
    pub data_write_guid: Option<Uuid>,
    /// The current header, 1 or 2.
    pub current_header: Option<usize>,
    /// Both header slots.
    pub headers: Vec<HeaderInfo>,
    /// The log.
    pub log: LogInfo,
    /// Whether each region table copy is valid.
    pub region_tables_valid: [bool; 2],
    /// The entries of the region table in use.
    pub regions: Vec<RegionInfo>,
    /// The entries of the metadata table.
    pub metadata_items: Vec<MetadataItemInfo>,
    /// Payload blocks by state name.
    pub blocks: BTreeMap<&'static str, u64>,
    /// Present sector bitmap blocks.
    pub sector_bitmap_blocks: u64,
    /// The parent locator of a differencing disk.
    pub parent_locator: Option<ParentLocatorInfo>,
    /// The inspection's warnings.
    pub warnings: Vec<String>,
}

/// One header slot.
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct HeaderInfo {
    /// 1 for the header at 64 KiB, 2 for the one at 128 KiB.
    pub slot: usize,
    /// Its file offset.
    pub offset: u64,
    /// True when it parsed (then [`HeaderInfo::header`] is set).
    pub valid: bool,
    /// Its fields, when valid (in JSON beside `slot`, `offset` and `valid`).
    #[cfg_attr(feature = "serde", serde(flatten))]
    pub header: Option<HeaderFields>,
    /// Why it is invalid, when it could be read.
    #[cfg_attr(feature = "serde", serde(skip_serializing_if = "Option::is_none"))]
    pub error: Option<String>,
}

/// The fields of a valid header.
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HeaderFields {
    /// True for the header in use.
    pub current: bool,
    /// SequenceNumber.
    pub sequence_number: u64,
    /// FileWriteGuid.
    pub file_write_guid: Uuid,
    /// DataWriteGuid.
    pub data_write_guid: Uuid,
    /// LogGuid.
    pub log_guid: Uuid,
    /// LogOffset.
    pub log_offset: u64,
    /// LogLength.
    pub log_length: u32,
}

/// The state of the log (in JSON, `state` names the variant).
#[cfg_attr(
    feature = "serde",
    derive(serde::Serialize),
    serde(tag = "state", rename_all = "lowercase")
)]
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum LogInfo {
    /// No current header: the log cannot be found.
    Unknown,
    /// Nothing to replay.
    Clean {
        /// Always 0.
        entries: usize,
    },
    /// An opener replays the active sequence.
    Dirty {
        /// Entries of the active sequence.
        entries: usize,
        /// Writes they carry.
        writes: usize,
        /// Bytes those writes cover.
        bytes: u64,
        /// Sequence number of the oldest entry.
        first_sequence: u64,
        /// Sequence number of the head entry.
        head_sequence: u64,
        /// The file's length after replay.
        length_after: u64,
    },
    /// The log cannot be replayed.
    Unreplayable {
        /// Why.
        error: String,
    },
}

/// One entry of the region table.
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct RegionInfo {
    /// Its GUID.
    pub guid: Uuid,
    /// `BAT`, `metadata` or `unknown`.
    pub name: &'static str,
    /// FileOffset.
    pub file_offset: u64,
    /// Length.
    pub length: u32,
    /// Required.
    pub required: bool,
}

/// One entry of the metadata table.
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct MetadataItemInfo {
    /// ItemId.
    pub item_id: Uuid,
    /// The item's name in [MS-VHDX] (`File Parameters`, ...), or `unknown`.
    pub name: &'static str,
    /// Offset in the metadata region.
    pub offset: u32,
    /// Length.
    pub length: u32,
    /// IsUser.
    pub is_user: bool,
    /// IsVirtualDisk.
    pub is_virtual_disk: bool,
    /// IsRequired.
    pub is_required: bool,
}

/// The parent locator.
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct ParentLocatorInfo {
    /// LocatorType.
    pub locator_type: Uuid,
    /// The key-value entries, in file order.
    pub entries: Vec<LocatorEntry>,
}

/// One key-value entry of the parent locator.
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LocatorEntry {
    /// The key (`parent_linkage`, `relative_path`, ...).
    pub key: String,
    /// The value.
    pub value: String,
}

/// [`crate::info::inspect_file`] of a VHDX: a strict read-only open first (its error unless
/// lenient), then one inspection.
pub(crate) fn inspect_file(path: &Path, options: &InfoOptions) -> Result<InfoReport> {
    let open = Vhdx::open_path(path, false).map(drop);
    if let Err(e) = open
        && !options.lenient
    {
        return Err(e);
    }
    let insp = check::inspect_path(path, false)?;
    let problems = insp
        .findings
        .iter()
        .filter(|f| f.stops_open())
        .map(InfoProblem::from)
        .collect();
    let failure = insp.current.is_none().then(|| Error::Format {
        path: Some(path.to_path_buf()),
        detail: "no valid VHDX header".into(),
    });
    Ok(InfoReport {
        path: path.to_path_buf(),
        file_size: insp.file_len,
        image: Some(ImageInfo::Vhdx(VhdxInfo::from(&insp))),
        problems,
        failure,
    })
}

impl From<&Inspection> for VhdxInfo {
    fn from(insp: &Inspection) -> VhdxInfo {
        let m = insp.metadata.as_ref();
        let fp = m.map(|m| m.file_parameters);
        VhdxInfo {
            creator: insp.creator.clone(),
            disk_type: fp.map(|fp| {
                if fp.has_parent {
                    DiskKind::Differencing
                } else if fp.leave_block_allocated {
                    DiskKind::Fixed
                } else {
                    DiskKind::Dynamic
                }
            }),
            virtual_size: m.map(|m| m.virtual_disk_size),
            block_size: fp.map(|fp| fp.block_size),
            logical_sector_size: m.map(|m| m.logical_sector_size),
            physical_sector_size: m.map(|m| m.physical_sector_size),
            leave_block_allocated: fp.map(|fp| fp.leave_block_allocated),
            has_parent: fp.map(|fp| fp.has_parent),
            page_83: m.map(|m| m.page_83),
            data_write_guid: insp.current.as_ref().map(|c| c.header.data_write_guid),
            current_header: insp.current.as_ref().map(|c| c.slot + 1),
            headers: headers(insp),
            log: log(insp),
            region_tables_valid: insp.region_tables_valid,
            regions: regions(insp),
            metadata_items: items(insp),
            blocks: insp.blocks.payload.clone(),
            sector_bitmap_blocks: insp.blocks.bitmaps_present,
            parent_locator: parent_locator(insp),
            warnings: insp
                .findings
                .iter()
                .filter(|f| f.severity == Severity::Warning)
                .map(|f| f.message.clone())
                .collect(),
        }
    }
}

fn headers(insp: &Inspection) -> Vec<HeaderInfo> {
    let current = insp.current.as_ref().map(|c| c.slot);
    let offsets = [HEADER1_OFFSET, HEADER2_OFFSET];
    (0..2)
        .map(|i| {
            let (header, error) = match &insp.headers[i] {
                Some(Ok(h)) => (
                    Some(HeaderFields {
                        current: current == Some(i),
                        sequence_number: h.sequence_number,
                        file_write_guid: h.file_write_guid,
                        data_write_guid: h.data_write_guid,
                        log_guid: h.log_guid,
                        log_offset: h.log_offset,
                        log_length: h.log_length,
                    }),
                    None,
                ),
                Some(Err(why)) => (None, Some(why.clone())),
                None => (None, None),
            };
            HeaderInfo {
                slot: i + 1,
                offset: offsets[i],
                valid: header.is_some(),
                header,
                error,
            }
        })
        .collect()
}

fn log(insp: &Inspection) -> LogInfo {
    match &insp.log {
        None | Some(LogState::Unknown) => LogInfo::Unknown,
        Some(LogState::Clean) => LogInfo::Clean { entries: 0 },
        Some(LogState::Dirty {
            entries,
            writes,
            bytes,
            sequences,
            length_after,
        }) => LogInfo::Dirty {
            entries: *entries,
            writes: *writes,
            bytes: *bytes,
            first_sequence: sequences.0,
            head_sequence: sequences.1,
            length_after: *length_after,
        },
        Some(LogState::Unreplayable(why)) => LogInfo::Unreplayable { error: why.clone() },
    }
}

fn regions(insp: &Inspection) -> Vec<RegionInfo> {
    let entries = insp.region_table.iter().flat_map(|t| &t.entries);
    entries
        .map(|e| RegionInfo {
            guid: e.guid,
            name: match e.guid {
                BAT_GUID => "BAT",
                METADATA_GUID => "metadata",
                _ => "unknown",
            },
            file_offset: e.file_offset,
            length: e.length,
            required: e.required,
        })
        .collect()
}

fn item_name(g: Uuid) -> &'static str {
    match g {
        md::FILE_PARAMETERS => "File Parameters",
        md::VIRTUAL_DISK_SIZE => "Virtual Disk Size",
        md::PAGE_83 => "Page 83 Data",
        md::LOGICAL_SECTOR_SIZE => "Logical Sector Size",
        md::PHYSICAL_SECTOR_SIZE => "Physical Sector Size",
        md::PARENT_LOCATOR => "Parent Locator",
        _ => "unknown",
    }
}

fn items(insp: &Inspection) -> Vec<MetadataItemInfo> {
    let entries = insp.metadata_table.iter().flat_map(|t| &t.entries);
    entries
        .map(|e| MetadataItemInfo {
            item_id: e.item_id,
            name: item_name(e.item_id),
            offset: e.offset,
            length: e.length,
            is_user: e.is_user,
            is_virtual_disk: e.is_virtual_disk,
            is_required: e.is_required,
        })
        .collect()
}

fn parent_locator(insp: &Inspection) -> Option<ParentLocatorInfo> {
    let pl = insp.metadata.as_ref()?.parent_locator.as_ref()?;
    Some(ParentLocatorInfo {
        locator_type: pl.locator_type,
        entries: pl
            .entries
            .iter()
            .map(|(key, value)| LocatorEntry {
                key: key.clone(),
                value: value.clone(),
            })
            .collect(),
    })
}
