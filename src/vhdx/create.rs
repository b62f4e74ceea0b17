//! Creating fixed, dynamic and differencing VHDX files laid out as Hyper-V lays them out
//! (vhdx-format.md §1, §12; observed in the Windows 10 fixtures): file identifier, two headers,
//! two identical region tables (BAT and metadata, both Required), the log at 1 MiB (1 MiB
//! long), the metadata region at 2 MiB, the BAT at 3 MiB, payload blocks after the BAT,
//! everything 1 MiB aligned; 4096-byte physical sectors.
//!
//! The file is written under a temporary name in the target's directory, flushed, and only
//! then given its name (a hard link, which refuses an existing file, or with `force` a
//! rename over it), so a crash never leaves a half-made file under the name.

use std::path::{Path, PathBuf};

use uuid::Uuid;

use super::Vhdx;
use super::format::bat::{BatEntry, Geometry, PayloadState};
use super::format::header::{FileIdentifier, Header};
use super::format::metadata::{FileParameters, Metadata, ParentLocator, VHDX_LOCATOR_TYPE};
use super::format::region::{BAT_GUID, METADATA_GUID, RegionEntry, RegionTable};
use super::format::{
    HEADER1_OFFSET, HEADER2_OFFSET, MIB, REGION_TABLE1_OFFSET, REGION_TABLE2_OFFSET,
};
use crate::io::FileStorage;
use crate::{Error, Result};

/// Where Hyper-V puts the log.
pub const LOG_OFFSET: u64 = MIB;
/// The log's length.
pub const LOG_LENGTH: u32 = MIB as u32;
/// Where Hyper-V puts the metadata region (1 MiB long).
pub const METADATA_OFFSET: u64 = 2 * MIB;
/// Where Hyper-V puts the BAT.
pub const BAT_OFFSET: u64 = 3 * MIB;
/// Hyper-V's block size for dynamic disks.
pub const DEFAULT_DYNAMIC_BLOCK: u32 = 32 << 20;
/// Hyper-V's block size for differencing disks, and for the small fixed disks of the fixtures.
pub const DEFAULT_DIFFERENCING_BLOCK: u32 = 2 << 20;

options! {
    /// Options for the `create_*` functions.
    #[derive(Clone, Debug, PartialEq, Eq)]
    pub struct CreateOptions {
        /// Payload block size (a power of two, 1 MiB to 256 MiB); `None`: Hyper-V's default for
        /// the kind ([`DEFAULT_DYNAMIC_BLOCK`], else [`DEFAULT_DIFFERENCING_BLOCK`]).
        pub block_size: Option<u32>,
        /// Logical sector size, 512 or 4096 (a differencing disk takes its parent's).
        pub logical_sector_size: u32,
        /// Replace an existing file (else it is refused with Invalid parameter).
        pub force: bool,
    }
}

impl Default for CreateOptions {
    fn default() -> CreateOptions {
        CreateOptions {
            block_size: None,
            logical_sector_size: 512,
            force: false,
        }
    }
}

/// What a new file is.
struct Spec {
    geometry: Geometry,
    fixed: bool,
    page_83: Uuid,
    parent: Option<ParentLocator>,
}

/// Create a fixed VHDX of `size` bytes: every block FULLY_PRESENT and preallocated (sparse
/// zeros where the file system allows), LeaveBlockAllocated set. Opened writable.
pub fn create_fixed(
    path: impl AsRef<Path>,
    size: u64,
    opts: &CreateOptions,
) -> Result<Vhdx<FileStorage>> {
    let bs = opts.block_size.unwrap_or(DEFAULT_DIFFERENCING_BLOCK);
    let geometry = Geometry::new(size, bs, opts.logical_sector_size, false)?;
    let spec = Spec {
        geometry,
        fixed: true,
        page_83: Uuid::new_v4(),
        parent: None,
    };
    create(path.as_ref(), &spec, opts.force)
}

/// Create a dynamic VHDX of `size` bytes: every block NOT_PRESENT. Opened writable.
pub fn create_dynamic(
    path: impl AsRef<Path>,
    size: u64,
    opts: &CreateOptions,
) -> Result<Vhdx<FileStorage>> {
    let bs = opts.block_size.unwrap_or(DEFAULT_DYNAMIC_BLOCK);
    let geometry = Geometry::new(size, bs, opts.logical_sector_size, false)?;
    let spec = Spec {
        geometry,
        fixed: false,
        page_83: Uuid::new_v4(),
        parent: None,
    };
    create(path.as_ref(), &spec, opts.force)
}

/// Create a differencing VHDX over the VHDX at `parent`, as Hyper-V does: the parent's virtual
/// size, logical sector size and Page 83 id; `parent_linkage` = the parent's DataWriteGuid,
/// `parent_linkage2` the nil GUID; the path keys of [`locator_entries`]. Opened writable.
pub fn create_differencing(
    path: impl AsRef<Path>,
    parent: impl AsRef<Path>,
    opts: &CreateOptions,
) -> Result<Vhdx<FileStorage>> {
    let (path, parent) = (path.as_ref(), parent.as_ref());
    if crate::locator::same_file(path, parent) {
        return Err(Error::InvalidParameter(format!(
            "{} is the parent itself: a differencing disk cannot replace its own parent",
            path.display()
        )));
    }
    let p = Vhdx::open_path(parent, false)?;
    let bs = opts.block_size.unwrap_or(DEFAULT_DIFFERENCING_BLOCK);
    let geometry = Geometry::new(p.virtual_size(), bs, p.sector_size(), true)?;
    let spec = Spec {
        geometry,
        fixed: false,
        page_83: p.reader().metadata.page_83,
        parent: Some(ParentLocator {
            locator_type: VHDX_LOCATOR_TYPE,
            entries: locator_entries(path, parent, p.data_write_guid())?,
        }),
    };
    drop(p);
    create(path, &spec, opts.force)
}

/// The parent locator keys for a child at `child` of `parent`, in Hyper-V's order and
/// spelling (`{guid}` in lower case, Windows separators): `parent_linkage`;
/// `absolute_win32_path` on Windows only (elsewhere there is no drive-letter path to write);
/// `relative_path` (`.\name`, `..\dir\name`) when the two share a root; `parent_linkage2` as
/// the nil GUID. `volume_path` (`\\?\Volume{GUID}\...`) is not written: the volume GUID is
/// not computable without the Windows volume API (Windows fills the key in on mount).
pub fn locator_entries(
    child: &Path,
    parent: &Path,
    linkage: Uuid,
) -> Result<Vec<(String, String)>> {
    use crate::locator::{absolute, relative_path, windows_relative};
    let braced = |g: Uuid| format!("{{{g}}}");
    let mut out = vec![("parent_linkage".to_string(), braced(linkage))];
    let (child_abs, parent_abs) = (absolute(child)?, absolute(parent)?);
    if cfg!(windows) {
        let text = parent_abs.to_string_lossy();
        let text = text.strip_prefix(r"\\?\").unwrap_or(&text).to_string();
        out.push(("absolute_win32_path".into(), text));
    }
    let dir = child_abs.parent().unwrap_or(Path::new("/"));
    if let Some(rel) = relative_path(dir, &parent_abs) {
        out.push(("relative_path".into(), windows_relative(&rel)));
    }
    if out.len() == 1 {
        return Err(Error::InvalidParameter(format!(
            "{}: no path to the parent {} can be written (different roots)",
            child.display(),
            parent.display()
        )));
    }
    out.push(("parent_linkage2".into(), braced(Uuid::nil())));
    Ok(out)
}

/// The BAT region's length for `g`: its entries rounded up to 1 MiB.
fn bat_length(g: &Geometry) -> Result<u32> {
    u32::try_from((g.entries_needed() * 8).next_multiple_of(MIB))
        .map_err(|_| Error::InvalidParameter("VHDX BAT larger than 4 GiB".into()))
}

/// Byte strings to write at file offsets.
type Pieces = Vec<(u64, Vec<u8>)>;

/// The pieces of the file (offset, bytes) that are not zeros, and its length.
fn layout(spec: &Spec) -> Result<(Pieces, u64)> {
    let g = &spec.geometry;
    let bat_len = bat_length(g)?;
    let header = |seq| Header {
        sequence_number: seq,
        file_write_guid: Uuid::new_v4(),
        data_write_guid: Uuid::new_v4(),
        log_guid: Uuid::nil(),
        log_version: 0,
        version: 1,
        log_length: LOG_LENGTH,
        log_offset: LOG_OFFSET,
    };
    let h1 = header(1);
    let h2 = Header {
        sequence_number: 2,
        ..h1.clone()
    };
    let region = |guid, file_offset, length| RegionEntry {
        guid,
        file_offset,
        length,
        required: true,
    };
    let table = RegionTable {
        entries: vec![
            region(BAT_GUID, BAT_OFFSET, bat_len),
            region(METADATA_GUID, METADATA_OFFSET, MIB as u32),
        ],
    }
    .to_bytes();
    let metadata = Metadata {
        file_parameters: FileParameters {
            block_size: g.block_size,
            leave_block_allocated: spec.fixed,
            has_parent: spec.parent.is_some(),
        },
        virtual_disk_size: g.virtual_size,
        page_83: spec.page_83,
        logical_sector_size: g.logical_sector_size,
        physical_sector_size: 4096,
        parent_locator: spec.parent.clone(),
    };
    metadata.validate()?;
    let creator = format!("vhd-merge {}", env!("CARGO_PKG_VERSION"));
    let mut pieces = vec![
        (0, FileIdentifier { creator }.to_bytes()),
        (HEADER1_OFFSET, h1.to_bytes()),
        (HEADER2_OFFSET, h2.to_bytes()),
        (REGION_TABLE1_OFFSET, table.clone()),
        (REGION_TABLE2_OFFSET, table),
        (METADATA_OFFSET, metadata.to_region_bytes(MIB as usize)),
    ];
    let data_start = BAT_OFFSET + u64::from(bat_len);
    let mut len = data_start;
    if spec.fixed {
        len += g.data_blocks() * u64::from(g.block_size);
        fixed_bat(g, data_start, &mut pieces);
    }
    Ok((pieces, len))
}

/// The BAT of a fixed disk, in pieces of at most 1 MiB: block i FULLY_PRESENT at
/// `data_start` + i blocks (sector bitmap entries stay zero).
fn fixed_bat(g: &Geometry, data_start: u64, pieces: &mut Pieces) {
    let per_piece = MIB / 8;
    let entries = g.entries_needed();
    let mut piece: Option<(u64, Vec<u8>)> = None;
    for i in 0..g.data_blocks() {
        let index = g.payload_index(i);
        let first = index - index % per_piece;
        if piece.as_ref().is_some_and(|(f, _)| *f != first) {
            pieces.extend(piece.take().map(|(f, b)| (BAT_OFFSET + f * 8, b)));
        }
        let (_, b) = piece.get_or_insert_with(|| {
            let n = (entries - first).min(per_piece);
            (first, vec![0u8; (n * 8) as usize])
        });
        let offset = data_start + i * u64::from(g.block_size);
        let e = BatEntry::new(PayloadState::FullyPresent.value(), offset / MIB);
        let at = ((index - first) * 8) as usize;
        b[at..at + 8].copy_from_slice(&e.0.to_le_bytes());
    }
    pieces.extend(piece.map(|(f, b)| (BAT_OFFSET + f * 8, b)));
}

/// Write `spec` to `path` through a temporary file, then open it writable.
fn create(path: &Path, spec: &Spec, force: bool) -> Result<Vhdx<FileStorage>> {
    if !force && std::fs::symlink_metadata(path).is_ok() {
        return Err(Error::InvalidParameter(format!(
            "{} already exists (pass --force to replace it)",
            path.display()
        )));
    }
    let (pieces, len) = layout(spec)?;
    // An existing file is locked (a merge may hold it) until it is replaced.
    let lock = if force && path.exists() {
        Some(crate::layer::files::open_for_writing(
            path,
            crate::layer::files::WriteMode::Replace,
        )?)
    } else {
        None
    };
    let tmp = temp_name(path);
    let res = write_temp(&tmp, &pieces, len).and_then(|()| publish(&tmp, path, force, lock));
    if res.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    res?;
    Vhdx::open_path(path, true)
}

/// `.NAME.vhd-merge-PID-RANDOM` next to `path`.
fn temp_name(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tag = Uuid::new_v4().simple().to_string();
    path.with_file_name(format!(
        ".{name}.vhd-merge-{}-{}",
        std::process::id(),
        &tag[..8]
    ))
}

fn write_temp(tmp: &Path, pieces: &[(u64, Vec<u8>)], len: u64) -> Result<()> {
    let s = crate::layer::files::open_for_writing(tmp, crate::layer::files::WriteMode::CreateNew)?;
    let io = |e| Error::io(format!("{}: writing a new VHDX", tmp.display()), e);
    s.file().set_len(len).map_err(io)?;
    for (offset, bytes) in pieces {
        crate::io::pwrite_all(s.file(), bytes, *offset).map_err(io)?;
    }
    s.file().sync_all().map_err(io)
}

/// Give the flushed temporary file its name: a hard link refuses an existing file; `force`
/// renames over it. The directory is flushed so the name is durable.
fn publish(tmp: &Path, path: &Path, force: bool, lock: Option<FileStorage>) -> Result<()> {
    let io = |e| Error::io(format!("{}: naming the new VHDX", path.display()), e);
    if force {
        #[cfg(windows)]
        drop(lock); // Windows cannot rename over a file this process holds open.
        std::fs::rename(tmp, path).map_err(io)?;
    } else {
        std::fs::hard_link(tmp, path).map_err(|e| match e.kind() {
            std::io::ErrorKind::AlreadyExists => Error::InvalidParameter(format!(
                "{} already exists (pass --force to replace it)",
                path.display()
            )),
            _ => io(e),
        })?;
        std::fs::remove_file(tmp).map_err(io)?;
    }
    #[cfg(unix)]
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io)?;
    }
    #[cfg(not(windows))]
    drop(lock);
    Ok(())
}
