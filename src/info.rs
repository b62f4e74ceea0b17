//! What `vhd-merge info` shows of one file: [`inspect_file`] reads a VHD's footer, header,
//! locators and allocation, or a VHDX's headers, log, regions, metadata and block states, into
//! an [`InfoReport`] (the object `info --json` prints, with the `serde` feature).
//!
//! One report type for both formats: the file-level part ([`InfoReport::path`],
//! [`InfoReport::file_size`], the [`InfoReport::problems`]) is shared, and the per-format part
//! is an [`ImageInfo`], because the two formats have almost no structure in common (a VHD
//! has a footer, locator slots and a CHS geometry; a VHDX two headers, a log, regions and
//! metadata items). In JSON the per-format fields sit at the top level (a VHDX's beside
//! `"format": "vhdx"`).
//!
//! ```
//! use vhd_merge::create::{CreateOptions, create_dynamic};
//! use vhd_merge::info::{ImageInfo, InfoOptions, inspect_file};
//!
//! let dir = tempfile::tempdir()?;
//! let path = dir.path().join("disk.vhd");
//! create_dynamic(&path, 8 << 20, &CreateOptions::default())?;
//! let report = inspect_file(&path, &InfoOptions::default())?;
//! assert_eq!(report.virtual_size(), Some(8 << 20));
//! let Some(ImageInfo::Vhd(vhd)) = &report.image else { panic!("a VHD") };
//! assert_eq!(vhd.block_size, Some(2 << 20));
//! assert_eq!(vhd.allocated_block_count, Some(0));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::path::{Path, PathBuf};

use uuid::Uuid;

use crate::error::{Error, Result};
use crate::format::{DiskType, Geometry, PlatformCode, vhd_time_utc};
use crate::image::{FooterSource, OpenOptions, SizeSource, Vhd};
use crate::layer::{DiskKind, Format, detect_format};
use crate::problem::{Problem, ProblemCode};
use crate::vhdx::info::VhdxInfo;

#[cfg(feature = "serde")]
serialize_as_name!(SizeSource);
#[cfg(feature = "serde")]
serialize_as_name!(FooterSource);

options! {
    /// How to inspect.
    #[derive(Clone, Copy, Debug, Default)]
    pub struct InfoOptions {
        /// Accept what a strict open refuses: checksum mismatches (listed as warnings), and a
        /// file damaged further is shown as far as validation could read it, with its
        /// [`InfoReport::problems`] and [`InfoReport::failure`].
        pub lenient: bool,
    }
}

/// Everything `info` shows of one file.
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[derive(Debug)]
#[non_exhaustive]
pub struct InfoReport {
    /// The file.
    pub path: PathBuf,
    /// Its length in bytes.
    pub file_size: u64,
    /// What could be read of it, by format (`None`: a VHD that validation stopped in).
    #[cfg_attr(feature = "serde", serde(flatten))]
    pub image: Option<ImageInfo>,
    /// The problems a strict open fails on (lenient inspections only; warnings are in the
    /// format's `warnings`). Not in JSON when empty.
    #[cfg_attr(feature = "serde", serde(skip_serializing_if = "Vec::is_empty"))]
    pub problems: Vec<InfoProblem>,
    /// Lenient only: why the file cannot be used even leniently (a VHD whose structures
    /// validation stopped in, a VHDX without a valid header); the report holds what could be
    /// read. Not in the report's JSON (the CLI prints it as its `error`).
    #[cfg_attr(feature = "serde", serde(skip))]
    pub failure: Option<Error>,
}

impl InfoReport {
    /// The format, when something could be read.
    pub fn format(&self) -> Option<Format> {
        match self.image.as_ref()? {
            ImageInfo::Vhd(_) => Some(Format::Vhd),
            ImageInfo::Vhdx(_) => Some(Format::Vhdx),
        }
    }

    /// The virtual size in bytes, when it could be read.
    pub fn virtual_size(&self) -> Option<u64> {
        match self.image.as_ref()? {
            ImageInfo::Vhd(v) => Some(v.virtual_size),
            ImageInfo::Vhdx(v) => v.virtual_size,
        }
    }

    /// The disk type, when it could be read.
    pub fn disk_kind(&self) -> Option<DiskKind> {
        match self.image.as_ref()? {
            ImageInfo::Vhd(v) => match v.disk_type {
                DiskType::Fixed => Some(DiskKind::Fixed),
                DiskType::Dynamic => Some(DiskKind::Dynamic),
                DiskType::Differencing => Some(DiskKind::Differencing),
                _ => None,
            },
            ImageInfo::Vhdx(v) => v.disk_type,
        }
    }

    /// The warnings (checksums accepted leniently, odd but readable fields).
    pub fn warnings(&self) -> &[String] {
        match &self.image {
            Some(ImageInfo::Vhd(v)) => &v.warnings,
            Some(ImageInfo::Vhdx(v)) => &v.warnings,
            None => &[],
        }
    }
}

/// The per-format part of an [`InfoReport`]. In JSON its fields are the report's; a VHDX's
/// come with `"format": "vhdx"`, a VHD's with no `format` (as schema version 1 has always
/// printed them).
#[derive(Clone, Debug)]
#[non_exhaustive]
pub enum ImageInfo {
    /// A VHD.
    Vhd(VhdInfo),
    /// A VHDX.
    Vhdx(VhdxInfo),
}

#[cfg(feature = "serde")]
impl serde::Serialize for ImageInfo {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        #[derive(serde::Serialize)]
        struct Tagged<'a> {
            format: Format,
            #[serde(flatten)]
            info: &'a VhdxInfo,
        }
        match self {
            ImageInfo::Vhd(v) => v.serialize(s),
            ImageInfo::Vhdx(v) => Tagged {
                format: Format::Vhdx,
                info: v,
            }
            .serialize(s),
        }
    }
}

/// A [`Problem`] that stops a strict open ([`Problem::stops_open`]), as
/// [`InfoReport::problems`] lists it: the fields `info` shows (its JSON has no severity, path
/// or block).
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InfoProblem {
    /// The kind of problem.
    pub code: ProblemCode,
    /// The structure it is in.
    pub structure: String,
    /// Byte offset in the file, when there is one.
    pub offset: Option<u64>,
    /// What is wrong.
    pub message: String,
}

/// What `info` shows of a VHD (§1, §2).
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct VhdInfo {
    /// Disk Type.
    pub disk_type: DiskType,
    /// The virtual size in bytes (decided by [`VhdInfo::size_source`]).
    pub virtual_size: u64,
    /// Where the virtual size comes from.
    pub size_source: SizeSource,
    /// Current Size.
    pub current_size: u64,
    /// Original Size.
    pub original_size: u64,
    /// Creator Application, as text.
    pub creator_application: String,
    /// Creator Version, `major.minor`.
    pub creator_version: String,
    /// Creator Host OS, as text.
    pub creator_host_os: String,
    /// Unique Id.
    pub unique_id: Uuid,
    /// Time Stamp (seconds since 2000-01-01 UTC), and as ISO 8601 UTC.
    pub timestamp: u32,
    /// [`VhdInfo::timestamp`] as `YYYY-MM-DDTHH:MM:SSZ`.
    pub timestamp_utc: String,
    /// Disk Geometry.
    pub geometry: Geometry,
    /// Features.
    pub features: u32,
    /// Saved State set.
    pub saved_state: bool,
    /// Which footer was used.
    pub footer_source: FooterSource,
    /// Its offset.
    pub footer_offset: u64,
    /// Block Size (`None` for a fixed disk, as the other header fields).
    pub block_size: Option<u32>,
    /// Table Offset of the BAT.
    pub table_offset: Option<u64>,
    /// Max Table Entries.
    pub max_table_entries: Option<u32>,
    /// Allocated blocks.
    pub allocated_block_count: Option<u64>,
    /// Parent Unique Id (`None` unless differencing, as the other parent fields).
    pub parent_unique_id: Option<Uuid>,
    /// Parent Unicode Name.
    pub parent_name: Option<String>,
    /// Parent Time Stamp.
    pub parent_timestamp: Option<u32>,
    /// [`VhdInfo::parent_timestamp`] as `YYYY-MM-DDTHH:MM:SSZ`.
    pub parent_timestamp_utc: Option<String>,
    /// The used parent locator slots.
    pub parent_locators: Vec<LocatorInfo>,
    /// Warnings of the open.
    pub warnings: Vec<String>,
}

/// One used parent locator slot of a VHD (§2.2).
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct LocatorInfo {
    /// The slot, 0 to 7.
    pub slot: usize,
    /// Platform Code.
    pub platform_code: PlatformCode,
    /// Platform Code as a number.
    pub platform_code_value: u32,
    /// Platform Data Offset.
    pub data_offset: u64,
    /// Platform Data Length.
    pub data_length: u32,
    /// Platform Data Space as stored (sectors or bytes, by tool).
    pub data_space: u32,
    /// Platform Data Space in bytes (`None`: neither reading makes sense).
    pub data_space_bytes: Option<u64>,
    /// The decoded path.
    pub path: Option<String>,
    /// Why there is no path, when there is none.
    pub note: Option<String>,
}

/// Inspect the file at `path` (VHD or VHDX by its signature; opened read-only, never
/// written). Without [`InfoOptions::lenient`] a file a strict open refuses is that open's
/// error; leniently, everything readable is reported, with the problems.
pub fn inspect_file(path: impl AsRef<Path>, options: &InfoOptions) -> Result<InfoReport> {
    let path = path.as_ref();
    if detect_format(path) == Some(Format::Vhdx) {
        return crate::vhdx::info::inspect_file(path, options);
    }
    if !options.lenient {
        return report(&Vhd::open(path, OpenOptions::read_only())?);
    }
    let opts = OpenOptions {
        lenient: true,
        ..OpenOptions::read_only()
    };
    let open_error = match Vhd::open(path, opts) {
        Ok(vhd) => return report(&vhd),
        // Missing, unreadable, or not a regular file: nothing to show.
        Err(e @ (Error::Io { .. } | Error::InvalidParameter(_))) => return Err(e),
        Err(e) => e,
    };
    let insp = Vhd::inspect(path, opts)?;
    let problems = insp
        .problems
        .iter()
        .filter(|p| p.stops_open())
        .map(InfoProblem::from)
        .collect();
    let mut r = match &insp.vhd {
        Some(vhd) => report(vhd)?,
        None => InfoReport {
            path: path.to_path_buf(),
            file_size: insp.file_len,
            image: None,
            problems: Vec::new(),
            failure: Some(open_error),
        },
    };
    r.problems = problems;
    Ok(r)
}

impl From<&Problem> for InfoProblem {
    fn from(p: &Problem) -> InfoProblem {
        InfoProblem {
            code: p.code,
            structure: p.structure.clone(),
            offset: p.offset,
            message: p.message.clone(),
        }
    }
}

/// The report of an open VHD.
pub fn report(vhd: &Vhd) -> Result<InfoReport> {
    let file_size = vhd
        .storage()
        .len()
        .map_err(|e| Error::io(format!("{}: reading length", vhd.path().display()), e))?;
    Ok(InfoReport {
        path: vhd.path().to_path_buf(),
        file_size,
        image: Some(ImageInfo::Vhd(vhd_info(vhd))),
        problems: Vec::new(),
        failure: None,
    })
}

fn vhd_info(vhd: &Vhd) -> VhdInfo {
    let f = vhd.footer();
    let sparse = vhd.header();
    let parent = sparse.filter(|_| vhd.disk_type() == DiskType::Differencing);
    VhdInfo {
        disk_type: vhd.disk_type(),
        virtual_size: vhd.virtual_size(),
        size_source: vhd.size_source(),
        current_size: f.current_size,
        original_size: f.original_size,
        creator_application: f.creator_application_str(),
        creator_version: f.creator_version_str(),
        creator_host_os: f.creator_host_os_str(),
        unique_id: f.unique_id,
        timestamp: f.timestamp,
        timestamp_utc: vhd_time_utc(f.timestamp),
        geometry: f.geometry,
        features: f.features,
        saved_state: f.saved_state != 0,
        footer_source: vhd.footer_source(),
        footer_offset: vhd.footer_offset(),
        block_size: sparse.map(|h| h.block_size),
        table_offset: sparse.map(|h| h.table_offset),
        max_table_entries: sparse.map(|h| h.max_table_entries),
        allocated_block_count: sparse.map(|_| vhd.allocated_blocks() as u64),
        parent_unique_id: parent.map(|h| h.parent_unique_id),
        parent_name: parent.map(|h| h.parent_name()),
        parent_timestamp: parent.map(|h| h.parent_timestamp),
        parent_timestamp_utc: parent.map(|h| vhd_time_utc(h.parent_timestamp)),
        parent_locators: locators(vhd),
        warnings: vhd.warnings().to_vec(),
    }
}

fn locators(vhd: &Vhd) -> Vec<LocatorInfo> {
    let Some(h) = vhd.header() else {
        return Vec::new();
    };
    h.locators
        .iter()
        .enumerate()
        .filter(|(_, l)| !l.is_empty())
        .map(|(slot, l)| {
            let (path, note) = locator_path(vhd, slot, l.platform_code);
            LocatorInfo {
                slot,
                platform_code: l.platform_code,
                platform_code_value: l.platform_code.to_u32(),
                data_offset: l.data_offset,
                data_length: l.data_length,
                data_space: l.data_space,
                data_space_bytes: l.data_space_bytes(),
                path,
                note,
            }
        })
        .collect()
}

/// The decoded path of a locator, or why there is none.
fn locator_path(vhd: &Vhd, slot: usize, code: PlatformCode) -> (Option<String>, Option<String>) {
    match vhd.read_locator_payload(slot) {
        Ok(Some(data)) => match code.decode_payload(&data) {
            Some(text) => (Some(text), None),
            None if code == PlatformCode::Mac => {
                (None, Some("Mac OS alias blob: not decoded".into()))
            }
            None => (
                None,
                Some(format!("platform code {} is not a path", code.name())),
            ),
        },
        Ok(None) => (None, None),
        // Without the file name in front (the report names the file).
        Err(Error::Format { detail, .. }) => (None, Some(detail)),
        Err(e) => (None, Some(e.to_string())),
    }
}
