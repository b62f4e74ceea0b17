//! Creating fixed, dynamic and differencing VHDs, laid out the way Windows writes them (§0):
//! footer copy at 0, dynamic header at 512, BAT at 1536 padded with 0xFF, locator data after
//! the BAT with Data Space in bytes, the end footer last, and block data 4 KiB aligned.

use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use uuid::Uuid;

use crate::error::{Error, Result};
use crate::format::bat;
use crate::format::footer::{
    self, DiskType, FEATURE_RESERVED, FORMAT_VERSION, Footer, HOST_OS_WINDOWS,
};
use crate::format::header::{self, DynamicHeader, HEADER_SIZE, ParentLocator};
use crate::format::{Geometry, MAX_DYNAMIC_SIZE, PlatformCode, SECTOR_SIZE, align_up};
use crate::locator::{self, LOCATOR_SPACE};
use crate::vhd::{MAX_BLOCK_SIZE, MAX_TABLE_ENTRIES, OpenOptions, Vhd, write_new_file};

/// Default block size: 2 MiB, as Windows and every other writer default to.
pub const DEFAULT_BLOCK_SIZE: u32 = 2 << 20;

options! {
    /// Options for creating a VHD.
    #[derive(Clone, Debug)]
    pub struct CreateOptions {
        /// Block size of a dynamic or differencing disk: a power of two from 512 bytes to 32 MiB.
        pub block_size: u32,
        /// The new disk's unique id; random when `None`.
        pub unique_id: Option<Uuid>,
        /// Creation time stamp (seconds since 2000-01-01 UTC); now when `None`.
        pub timestamp: Option<u32>,
        /// Creator Application. Defaults to `win `, as Windows writes: QEMU (and tools following
        /// it) trust Current Size only for a few creators and would otherwise cut the disk to its
        /// CHS size (§1.5).
        pub creator_application: [u8; 4],
        /// Creator Version (major << 16 | minor); defaults to 10.0 like Windows 10.
        pub creator_version: u32,
        /// Replace an existing file instead of failing.
        pub overwrite: bool,
    }
}

impl Default for CreateOptions {
    fn default() -> CreateOptions {
        CreateOptions {
            block_size: DEFAULT_BLOCK_SIZE,
            unique_id: None,
            timestamp: None,
            creator_application: *b"win ",
            creator_version: 0x000A_0000,
            overwrite: false,
        }
    }
}

/// What `vhd-merge create` reports of the new disk, VHD or VHDX ([`CreateReport::of`],
/// [`report_file`]).
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct CreateReport {
    /// `vhd` or `vhdx`.
    pub format: crate::layer::Format,
    /// The new file (in JSON its fields are the report's).
    #[cfg_attr(feature = "serde", serde(flatten))]
    pub layer: crate::layer::LayerSummary,
    /// The warnings of opening it.
    pub warnings: Vec<String>,
}

impl CreateReport {
    /// The report of an open layer.
    pub fn of(layer: &dyn crate::layer::Layer) -> CreateReport {
        CreateReport {
            format: layer.format(),
            layer: crate::layer::LayerSummary::of(layer),
            warnings: layer.warnings().to_vec(),
        }
    }
}

/// The [`CreateReport`] of the disk at `path` (any format, opened read-only), as read back
/// after creating it.
pub fn report_file(path: impl AsRef<Path>) -> Result<CreateReport> {
    let layer = crate::layer::open_layer(path.as_ref(), OpenOptions::read_only())?;
    Ok(CreateReport::of(layer.as_ref()))
}

fn now_vhd() -> u32 {
    let unix = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    crate::format::vhd_timestamp_from_unix(unix)
}

fn new_footer(size: u64, disk_type: DiskType, opts: &CreateOptions) -> Footer {
    let mut f = Footer {
        features: FEATURE_RESERVED,
        format_version: FORMAT_VERSION,
        data_offset: if disk_type == DiskType::Fixed {
            footer::NO_DATA_OFFSET
        } else {
            512
        },
        timestamp: opts.timestamp.unwrap_or_else(now_vhd),
        creator_application: opts.creator_application,
        creator_version: opts.creator_version,
        creator_host_os: HOST_OS_WINDOWS,
        original_size: size,
        current_size: size,
        geometry: Geometry::for_size(size),
        disk_type,
        checksum: 0,
        unique_id: opts.unique_id.unwrap_or_else(Uuid::new_v4),
        saved_state: 0,
        reserved: [0; 427],
    };
    f.fix_checksum();
    f
}

/// Refuse a virtual size a dynamic VHD cannot hold (before any work starts).
pub fn check_dynamic_size(size: u64) -> Result<()> {
    if size > MAX_DYNAMIC_SIZE {
        return Err(Error::InvalidParameter(format!(
            "the virtual size {size} is larger than a dynamic VHD can hold ({MAX_DYNAMIC_SIZE}); flatten to a fixed VHD or raw instead"
        )));
    }
    Ok(())
}

fn check_size(size: u64, max: u64) -> Result<()> {
    if size == 0 || !size.is_multiple_of(SECTOR_SIZE) {
        return Err(Error::InvalidParameter(format!(
            "size {size} must be a positive multiple of 512 bytes"
        )));
    }
    if size > max {
        return Err(Error::InvalidParameter(format!(
            "size {size} is larger than the {max} bytes a VHD of this type can hold"
        )));
    }
    Ok(())
}

fn check_block_size(bs: u32) -> Result<()> {
    if bs < 512 || !bs.is_power_of_two() || bs > MAX_BLOCK_SIZE {
        return Err(Error::InvalidParameter(format!(
            "block size {bs} must be a power of two from 512 bytes to {MAX_BLOCK_SIZE}"
        )));
    }
    Ok(())
}

/// Create a fixed VHD of `size` bytes (a multiple of 512). The data area is a sparse run of
/// zeros on file systems that support it.
pub fn create_fixed(path: impl AsRef<Path>, size: u64, opts: &CreateOptions) -> Result<Vhd> {
    let path = path.as_ref();
    check_size(size, u64::MAX / 2)?;
    let footer = new_footer(size, DiskType::Fixed, opts);
    write_new_file(
        path,
        opts.overwrite,
        Some(size),
        &[(size, &footer.to_bytes())],
    )?;
    Vhd::open(path, OpenOptions::writable())
}

/// Create a dynamic VHD of `size` bytes (a multiple of 512, at most 2040 GiB) with
/// `opts.block_size` blocks.
pub fn create_dynamic(path: impl AsRef<Path>, size: u64, opts: &CreateOptions) -> Result<Vhd> {
    let path = path.as_ref();
    check_size(size, MAX_DYNAMIC_SIZE)?;
    check_block_size(opts.block_size)?;
    let footer = new_footer(size, DiskType::Dynamic, opts);
    write_sparse(path, &footer, Uuid::nil(), 0, "", &[], opts)?;
    Vhd::open(path, OpenOptions::writable())
}

/// Create a differencing VHD whose parent is the VHD at `parent`. The child inherits the
/// parent's virtual size (the CHS size of a Virtual PC parent, §1.5) and geometry and records its unique id, file modification time, file name
/// and locators: W2ru relative, W2ku absolute, and MacX on non-Windows hosts.
pub fn create_differencing(
    path: impl AsRef<Path>,
    parent: impl AsRef<Path>,
    opts: &CreateOptions,
) -> Result<Vhd> {
    let path = path.as_ref();
    let parent = parent.as_ref();
    check_block_size(opts.block_size)?;
    let p = Vhd::open(parent, OpenOptions::read_only())?;
    // With `overwrite`, creating the child would truncate the parent itself.
    if crate::locator::same_file(path, parent) {
        return Err(Error::InvalidParameter(format!(
            "{} is the parent itself: a differencing disk cannot replace its own parent",
            path.display()
        )));
    }
    let pf = p.footer().clone();
    // The parent's virtual size, not its Current Size: for a Virtual PC parent the guest sees
    // the smaller CHS size, and a child larger than its parent could not be merged back.
    let size = p.virtual_size();
    drop(p);
    let mut footer = new_footer(size, DiskType::Differencing, opts);
    footer.original_size = size;
    footer.geometry = pf.geometry;
    footer.fix_checksum();
    let parent_time = parent_timestamp(parent)?;
    let name = parent
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let locators = locator::parent_locators(path, parent)?;
    write_sparse(
        path,
        &footer,
        pf.unique_id,
        parent_time,
        &name,
        &locators,
        opts,
    )?;
    Vhd::open(path, OpenOptions::writable())
}

/// The parent time stamp a child records: the parent file's modification time, as blktap,
/// VirtualBox and DiscUtils write it (§2.3).
pub fn parent_timestamp(parent: &Path) -> Result<u32> {
    let meta = std::fs::metadata(parent)
        .map_err(|e| Error::io(format!("{}: reading metadata", parent.display()), e))?;
    let unix = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_secs());
    Ok(crate::format::vhd_timestamp_from_unix(unix))
}

/// Lay out locator payloads starting at `start`: each 512-aligned, each reserving at least
/// [`LOCATOR_SPACE`] bytes. Returns the entries and the end of the last one.
pub fn place_locators(
    start: u64,
    payloads: &[(PlatformCode, Vec<u8>)],
) -> (Vec<ParentLocator>, u64) {
    let mut pos = start;
    let mut out = Vec::new();
    for (code, data) in payloads {
        let space = align_up(data.len() as u64, SECTOR_SIZE)
            .unwrap_or(LOCATOR_SPACE)
            .max(LOCATOR_SPACE);
        out.push(ParentLocator {
            platform_code: *code,
            data_space: u32::try_from(space).unwrap_or(u32::MAX),
            data_length: u32::try_from(data.len()).unwrap_or(u32::MAX),
            reserved: 0,
            data_offset: pos,
        });
        pos += space;
    }
    (out, pos)
}

/// The BAT entries a disk of `size` bytes needs at `block_size`, refused past
/// [`MAX_TABLE_ENTRIES`] with the smallest block size that works.
fn table_entries(size: u64, block_size: u32) -> Result<u32> {
    let entries = size.div_ceil(u64::from(block_size));
    match u32::try_from(entries) {
        Ok(n) if n <= MAX_TABLE_ENTRIES => Ok(n),
        _ => {
            let smallest = size
                .div_ceil(u64::from(MAX_TABLE_ENTRIES))
                .next_power_of_two()
                .max(512);
            let readable = match smallest {
                b if b >= 1 << 20 => format!("{} MiB", b >> 20),
                b if b >= 1 << 10 => format!("{} KiB", b >> 10),
                b => format!("{b} bytes"),
            };
            Err(Error::InvalidParameter(format!(
                "a {size}-byte disk with {block_size}-byte blocks needs {entries} BAT entries, more than the {MAX_TABLE_ENTRIES} supported; use a block size of at least {readable} ({smallest} bytes)"
            )))
        }
    }
}

/// Bytes of a new table written at once.
const TABLE_PIECE: u64 = 1 << 20;

fn write_sparse(
    path: &Path,
    footer: &Footer,
    parent_id: Uuid,
    parent_time: u32,
    parent_name: &str,
    payloads: &[(PlatformCode, Vec<u8>)],
    opts: &CreateOptions,
) -> Result<()> {
    let entries = table_entries(footer.current_size, opts.block_size)?;
    let table_offset = 512 + HEADER_SIZE as u64;
    let table_bytes = bat::table_bytes(entries);
    let (locs, meta_end) = place_locators(table_offset + table_bytes, payloads);
    if locs.len() > header::LOCATOR_COUNT {
        return Err(Error::InvalidParameter("too many parent locators".into()));
    }
    let mut h = DynamicHeader {
        data_offset: header::NO_NEXT,
        table_offset,
        header_version: header::HEADER_VERSION,
        max_table_entries: entries,
        block_size: opts.block_size,
        checksum: 0,
        parent_unique_id: parent_id,
        parent_timestamp: parent_time,
        reserved1: 0,
        parent_name_raw: [0; header::PARENT_NAME_BYTES],
        locators: [ParentLocator::EMPTY; header::LOCATOR_COUNT],
        reserved2: [0; 256],
    };
    h.set_parent_name(parent_name)?;
    h.locators[..locs.len()].copy_from_slice(&locs);
    let footer_bytes = footer.to_bytes();
    let header_bytes = h.to_bytes();
    // The table is all unused entries (0xFF), padding included: written from one shared
    // piece, so that a 16 GiB table costs 1 MiB of memory.
    let unused = vec![0xFF; TABLE_PIECE.min(table_bytes) as usize];
    let payloads: Vec<(u64, Vec<u8>)> = locs
        .iter()
        .zip(payloads)
        .map(|(loc, (_, data))| {
            let mut padded = data.clone();
            padded.resize(u64::from(loc.data_space) as usize, 0);
            (loc.data_offset, padded)
        })
        .collect();
    let mut parts: Vec<(u64, &[u8])> = vec![(0, &footer_bytes), (512, &header_bytes)];
    parts.extend((0..table_bytes).step_by(TABLE_PIECE as usize).map(|at| {
        let n = TABLE_PIECE.min(table_bytes - at) as usize;
        (table_offset + at, &unused[..n])
    }));
    parts.extend(payloads.iter().map(|(at, b)| (*at, b.as_slice())));
    parts.push((meta_end, &footer_bytes));
    write_new_file(path, opts.overwrite, None, &parts)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dynamic_layout_like_windows() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d.vhd");
        let v = create_dynamic(&p, 10 << 20, &CreateOptions::default()).unwrap();
        assert_eq!(v.disk_type(), DiskType::Dynamic);
        assert_eq!(v.virtual_size(), 10 << 20);
        let h = v.header().unwrap();
        assert_eq!(h.table_offset, 1536);
        assert_eq!(h.max_table_entries, 5);
        assert!(v.warnings().is_empty(), "{:?}", v.warnings());
        let raw = std::fs::read(&p).unwrap();
        assert_eq!(raw.len(), 1536 + 512 + 512);
        assert_eq!(raw[0..512], raw[raw.len() - 512..]);
        assert!(raw[1536 + 20..2048].iter().all(|&b| b == 0xFF));
        // Refuses to overwrite.
        let e = create_dynamic(&p, 10 << 20, &CreateOptions::default()).unwrap_err();
        assert_eq!(e.return_code(), crate::ReturnCode::InvalidParameter);
    }

    #[test]
    fn never_overwrites_its_own_parent() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("p.vhd");
        create_dynamic(&p, 4 << 20, &CreateOptions::default()).unwrap();
        let before = std::fs::read(&p).unwrap();
        let o = CreateOptions {
            overwrite: true,
            ..CreateOptions::default()
        };
        let e = create_differencing(&p, &p, &o).unwrap_err();
        assert_eq!(e.return_code(), crate::ReturnCode::InvalidParameter);
        // The same file under another spelling.
        let other = dir.path().join(".").join("p.vhd");
        assert!(create_differencing(&other, &p, &o).is_err());
        assert_eq!(std::fs::read(&p).unwrap(), before);
    }

    #[test]
    fn bad_sizes() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d.vhd");
        let o = CreateOptions::default();
        assert!(create_dynamic(&p, 1000, &o).is_err());
        assert!(create_dynamic(&p, MAX_DYNAMIC_SIZE + 512, &o).is_err());
        let o = CreateOptions {
            block_size: 3000,
            ..o
        };
        assert!(create_dynamic(&p, 1 << 20, &o).is_err());
        assert!(!p.exists());
    }
}
