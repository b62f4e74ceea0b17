//! One open VHD file: footer, header, BAT, reads of its own sectors, and crash-safe block
//! allocation. Every rule about where a block goes and in which order bytes reach the disk
//! lives in this module and nowhere else.
//!
//! The module is split by job: opening and validating a file in one pass (`open`), what
//! validation finds ([`Problem`], [`Inspection`]; `validate`), the overlap sweep of the blocks
//! and metadata as a pure function (`sweep`), the block table in memory (`table`), every
//! write in the order below (`writer`), and opening files with their locks, and the cheap
//! footer probe (`files`). The on-disk structures themselves are in [`crate::format`].
//!
//! # Write ordering (crash safety, §4)
//!
//! Writes are grouped into batches that end with [`Vhd::commit`]:
//!
//! 1. If new blocks will not fit before the end footer, the footer is first written at the
//!    new end of file (its contents never depend on the BAT) and synced. The file then has a
//!    valid end footer and an unchanged offset-0 copy at every instant, so even readers that
//!    look only at the end (libvhdi, VirtualBox) can open it after a crash.
//! 2. Block data, and the bitmaps of blocks that are new in this batch, are written into space
//!    no BAT entry references yet (new blocks) or over sectors the batch is replacing.
//! 3. `fdatasync`.
//! 4. Bitmaps of blocks that existed before the batch gain their new bits, and the BAT
//!    sectors holding new entries are written.
//! 5. `fdatasync`.
//!
//! A crash before 3 leaves unreferenced space and some sectors already holding their new
//! data; a crash between 3 and 5 leaves some bitmaps or BAT entries published, each pointing at
//! durable data. In every case the file opens and re-running the same writes finishes the job.

use std::ops::Range;
use std::path::{Path, PathBuf};

use uuid::Uuid;

use crate::bitmap::SectorBitmap;
use crate::error::{Error, Result};
use crate::format::SECTOR_SIZE;
use crate::format::bat::Bat;
use crate::format::footer::{DiskType, Footer};
use crate::format::header::DynamicHeader;
use crate::io::Storage;
/// The open options and the size rule are the layer boundary's (every format's open takes
/// them); re-exported here, where [`Vhd::open`] takes them.
pub use crate::layer::{OpenOptions, SizeRule};

mod extents;
mod files;
mod open;
mod sweep;
mod table;
mod validate;
mod writer;

pub use crate::format::batmap::{BATMAP_COOKIE, Batmap};
pub(crate) use files::peek_file;
#[cfg(feature = "testing")]
#[doc(hidden)]
pub use sweep::set_test_bounds;
use table::Table;
pub use validate::{
    DroppedEntry, Inspection, MAX_PROBLEMS_PER_CODE, Problem, ProblemCode, Severity,
};
use writer::Pending;
pub(crate) use writer::write_new_file;

/// Largest block size accepted. Windows writes 512 KiB or 2 MiB and blktap refuses anything
/// above 2 MiB; 32 MiB leaves room for odd writers while bounding per-block buffers.
pub const MAX_BLOCK_SIZE: u32 = 32 << 20;

/// Most BAT entries a dynamic or differencing disk may have: 0xFF000000, the blocks of the
/// largest dynamic disk (2040 GiB, [`crate::format::MAX_DYNAMIC_SIZE`]) at the smallest block
/// size (512 bytes), a table of 16 GiB less 64 MiB. The table is not held in memory
/// (`vhd::table` reads it on demand and keeps only the allocated entries' indices), and
/// validation keeps nothing per table entry (`vhd::sweep`), so the size of the table costs
/// reading it once at open, not memory. A larger table is refused with Not supported (32770)
/// before it is read, and `create` refuses to make one.
pub const MAX_TABLE_ENTRIES: u32 = 0xFF00_0000;

/// Most allocated blocks an open dynamic or differencing disk holds: 2^22, which covers the
/// largest dynamic disk fully allocated at the 512 KiB blocks Windows' CreateVirtualDisk uses
/// (4,177,920 blocks). Up to it, opening keeps 4 bytes per allocated block (`vhd::table`) and
/// the overlap sweep 8 (`vhd::sweep`), about 48 MiB for a fully allocated table. Past it
/// (blocks under 512 KiB, mostly allocated) nothing is kept per allocated block: the table is
/// read for whether a block is allocated and to list them, and the overlap sweep is windowed
/// (windows of at most this many blocks), so memory stays bounded whatever the file.
pub const MAX_HELD_BLOCKS: usize = 1 << 22;

/// Most allocated blocks validation's overlap sweep and the deep check hold at once
/// ([`MAX_HELD_BLOCKS`], or a test's bound): past it they read the table in passes.
pub(crate) fn held_blocks() -> usize {
    sweep::bounds().blocks
}

/// Largest parent locator payload [`Vhd::read_locator_payload`] reads. Real payloads are one
/// path (Windows reserves at most 64 KiB for one, §2.2).
pub const MAX_LOCATOR_PAYLOAD: u32 = 64 * 1024;

/// The unit in which a fixed disk is read and written, standing in for a block size.
pub const FIXED_CHUNK: u64 = 2 << 20;

/// New blocks are placed so that their data (after the bitmap) starts on this boundary (§7.16).
pub const DATA_ALIGNMENT: u64 = 4096;

/// Which rule produced [`Vhd::virtual_size`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum SizeSource {
    /// The footer's Current Size.
    CurrentSize,
    /// Cylinders × heads × sectors × 512.
    Chs,
}

impl SizeSource {
    /// `current_size` or `chs`.
    pub fn name(self) -> &'static str {
        match self {
            SizeSource::CurrentSize => "current_size",
            SizeSource::Chs => "chs",
        }
    }
}

/// Where the footer in use was found (§1.2).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum FooterSource {
    /// The last 512 bytes.
    End,
    /// A 511-byte footer written by products older than Virtual PC 2004.
    Short,
    /// The copy at offset 0 (the end one was missing or damaged).
    Copy,
}

impl FooterSource {
    /// `end`, `short` (511-byte footer at the end) or `copy` (offset 0).
    pub fn name(self) -> &'static str {
        match self {
            FooterSource::End => "end",
            FooterSource::Short => "short",
            FooterSource::Copy => "copy",
        }
    }
}

/// Where a block's sectors live in the file.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum BlockMap {
    /// No data in this file: zeros for a dynamic disk, the parent's data for a differencing one.
    Absent,
    /// Data starts at `data_offset`; `bitmap` says which sectors this file holds (`None`: all,
    /// as in a fixed disk).
    Present {
        /// Absolute file offset of the block's first data sector.
        data_offset: u64,
        /// The sector bitmap, `None` when every sector is present.
        bitmap: Option<SectorBitmap>,
    },
}

/// Read-only access to the storage under a [`Vhd`] ([`Vhd::storage`]). Every write to a VHD
/// goes through the `Vhd` itself, which keeps the crash-safe order, refuses writes to a file
/// opened read-only, and stops after a failed flush.
#[derive(Clone, Copy, Debug)]
pub struct StorageView<'a> {
    storage: &'a dyn Storage,
}

impl<'a> StorageView<'a> {
    /// Read exactly `buf.len()` bytes at `offset` (see [`Storage::read_at`]).
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.storage.read_at(buf, offset)
    }

    /// The current length in bytes.
    #[allow(
        clippy::len_without_is_empty,
        reason = "a file length, as Storage::len; an empty file is no VHD"
    )]
    pub fn len(&self) -> std::io::Result<u64> {
        self.storage.len()
    }

    /// The file, when the storage is one: a source to clone ranges from. Crate-internal, as a
    /// `&File` can be written through.
    pub(crate) fn as_file(&self) -> Option<&'a std::fs::File> {
        self.storage.as_file()
    }
}

/// An open VHD file.
#[derive(Debug)]
pub struct Vhd {
    storage: Box<dyn Storage>,
    path: PathBuf,
    footer: Footer,
    footer_source: FooterSource,
    /// Offset of the end footer (where it is, or where it belongs when it was missing).
    footer_offset: u64,
    /// Footer offset when the file was opened; `finish` never trims below it.
    original_footer_offset: u64,
    header: Option<DynamicHeader>,
    bat: Table,
    virtual_size: u64,
    size_source: SizeSource,
    warnings: Vec<String>,
    writable: bool,
    /// End of all metadata and block data: new blocks go at or after this offset.
    next_free: u64,
    /// A region known to read as zeros (a hole made by moving the footer out).
    known_zero: Range<u64>,
    pending: Pending,
    scratch: Vec<u8>,
    /// Block data whose writeback has not been started (see [`Vhd::note_written`]).
    writeback: crate::io::Writeback,
    /// A flush failed (see [`Vhd::sync`]).
    sync_failed: std::sync::atomic::AtomicBool,
}

impl Vhd {
    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The footer in use.
    pub fn footer(&self) -> &Footer {
        &self.footer
    }

    /// Where the footer in use was found.
    pub fn footer_source(&self) -> FooterSource {
        self.footer_source
    }

    /// Byte offset of the end footer.
    pub fn footer_offset(&self) -> u64 {
        self.footer_offset
    }

    /// The dynamic header (dynamic and differencing disks).
    pub fn header(&self) -> Option<&DynamicHeader> {
        self.header.as_ref()
    }

    /// The whole BAT, built now (4 bytes per entry; empty for fixed disks). The file's table
    /// is not held in memory (see `vhd::table`): [`Vhd::block_offset`],
    /// [`Vhd::is_allocated`] and [`Vhd::allocated_entries`] answer without building it.
    pub fn bat(&self) -> Result<Bat> {
        self.bat.to_bat(self)
    }

    /// The byte offset of block `index`'s bitmap, or `None` when it is not allocated (or
    /// past the table). Reads the table's page holding the entry, unless it is cached.
    pub fn block_offset(&self, index: u64) -> Result<Option<u64>> {
        self.bat.get(self, index)
    }

    /// Whether block `index` has a BAT entry (false past the table). Reads nothing for a
    /// table with at most [`MAX_HELD_BLOCKS`] allocated entries; past it, the table's page
    /// holding the entry, unless it is cached.
    pub fn is_allocated(&self, index: u64) -> Result<bool> {
        self.bat.is_allocated(self, index)
    }

    /// The allocated BAT entries in increasing block order: (block index, byte offset of the
    /// block's bitmap). Reads the allocated entries, a cached page at a time (past
    /// [`MAX_HELD_BLOCKS`] allocated entries, the whole table in order).
    pub fn allocated_entries(&self) -> impl Iterator<Item = Result<(u64, u64)>> + '_ {
        self.bat.allocated_entries(self)
    }

    /// The indices of the allocated blocks in increasing order (see
    /// [`Vhd::allocated_entries`]).
    pub(crate) fn allocated_indices(&self) -> impl Iterator<Item = Result<u64>> + '_ {
        self.bat.allocated_entries(self).map(|e| e.map(|e| e.0))
    }

    /// Fixed, dynamic or differencing.
    pub fn disk_type(&self) -> DiskType {
        self.footer.disk_type
    }

    /// The footer's unique id.
    pub fn unique_id(&self) -> Uuid {
        self.footer.unique_id
    }

    /// The parent's unique id, for a differencing disk.
    pub fn parent_unique_id(&self) -> Option<Uuid> {
        match (self.disk_type(), &self.header) {
            (DiskType::Differencing, Some(h)) => Some(h.parent_unique_id),
            _ => None,
        }
    }

    /// The guest-visible size in bytes (see [`SizeRule`]).
    pub fn virtual_size(&self) -> u64 {
        self.virtual_size
    }

    /// Which rule gave the virtual size.
    pub fn size_source(&self) -> SizeSource {
        self.size_source
    }

    /// Things found while opening that are odd but not fatal.
    pub fn warnings(&self) -> &[String] {
        &self.warnings
    }

    /// True when opened for writing.
    pub fn is_writable(&self) -> bool {
        self.writable
    }

    /// The underlying storage, for reading: every write goes through the `Vhd` (see the module
    /// docs).
    pub fn storage(&self) -> StorageView<'_> {
        StorageView {
            storage: self.storage.as_ref(),
        }
    }

    /// Close the file and give back its storage (with any lock it holds).
    pub(crate) fn into_storage(self) -> Box<dyn Storage> {
        self.storage
    }

    /// Bytes per block: the header's Block Size, or [`FIXED_CHUNK`] for a fixed disk.
    pub fn block_size(&self) -> u64 {
        match &self.header {
            Some(h) => u64::from(h.block_size),
            None => FIXED_CHUNK,
        }
    }

    /// Sectors per block.
    pub fn sectors_per_block(&self) -> u64 {
        self.block_size() / SECTOR_SIZE
    }

    /// Blocks covering the virtual size.
    pub fn block_count(&self) -> u64 {
        self.virtual_size.div_ceil(self.block_size())
    }

    /// Bytes of bitmap in front of each block (0 for fixed disks).
    pub fn bitmap_bytes(&self) -> u64 {
        self.header.as_ref().map_or(0, DynamicHeader::bitmap_bytes)
    }

    /// End of all metadata and data in use: where the next new block would start (before
    /// alignment).
    pub fn end_of_data(&self) -> u64 {
        self.next_free
    }

    /// Number of allocated blocks.
    pub fn allocated_blocks(&self) -> usize {
        self.bat.allocated()
    }

    /// The payload of parent locator `slot` (0..8): its Data Length bytes at its Data Offset,
    /// undecoded (see [`crate::format::PlatformCode::decode_payload`]).
    ///
    /// `Ok(None)` for an unused slot, a slot number past 7, or a fixed disk. An
    /// [`Error::Format`] when the data does not lie inside the file or is longer than
    /// [`MAX_LOCATOR_PAYLOAD`]; both are checked before anything is allocated.
    pub fn read_locator_payload(&self, slot: usize) -> Result<Option<Vec<u8>>> {
        let Some(loc) = self
            .header
            .as_ref()
            .and_then(|h| h.locators.get(slot))
            .filter(|l| !l.is_empty())
        else {
            return Ok(None);
        };
        let what = || {
            format!(
                "parent locator {slot} ({}) data at offset {:#x}, {} bytes",
                loc.platform_code.name(),
                loc.data_offset,
                loc.data_length
            )
        };
        if loc.data_length > MAX_LOCATOR_PAYLOAD {
            return Err(Error::Format {
                path: Some(self.path.clone()),
                detail: format!(
                    "{}: longer than a parent path can be, more than the {MAX_LOCATOR_PAYLOAD} read",
                    what()
                ),
            });
        }
        let len = self
            .storage
            .len()
            .map_err(|e| Error::io(format!("{}: reading length", self.path.display()), e))?;
        let end = loc.data_offset.checked_add(u64::from(loc.data_length));
        if end.is_none_or(|e| e > len) {
            return Err(Error::Format {
                path: Some(self.path.clone()),
                detail: format!("{}: lies outside the file ({len} bytes)", what()),
            });
        }
        let mut data = vec![0u8; loc.data_length as usize];
        self.read_raw(loc.data_offset, &mut data)?;
        Ok(Some(data))
    }

    /// `len` bytes at `offset` (the caller bounded `len`: a table chunk).
    fn read_vec(&self, offset: u64, len: u64) -> Result<Vec<u8>> {
        let mut buf = vec![0; len as usize];
        self.read_raw(offset, &mut buf)?;
        Ok(buf)
    }

    /// Read raw bytes of the file at `offset` into `buf` (offset first, as every public
    /// positional read and write of the crate).
    pub fn read_raw(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.storage.read_at(buf, offset).map_err(|e| {
            Error::io(
                format!(
                    "{}: reading {} bytes at offset {offset}",
                    self.path.display(),
                    buf.len()
                ),
                e,
            )
        })
    }

    /// Where block `index` lives. Reads the bitmap for an allocated sparse block.
    pub fn block_map(&self, index: u64) -> Result<BlockMap> {
        if index >= self.block_count() {
            return Ok(BlockMap::Absent);
        }
        let Some(h) = &self.header else {
            return Ok(BlockMap::Present {
                data_offset: index * FIXED_CHUNK,
                bitmap: None,
            });
        };
        let Some(bitmap_offset) = self.bat.get(self, index)? else {
            return Ok(BlockMap::Absent);
        };
        let bitmap = match self.pending.bitmaps.get(&index) {
            Some(b) => b.clone(),
            None => self.read_bitmap_at(bitmap_offset, h)?,
        };
        Ok(BlockMap::Present {
            data_offset: bitmap_offset + h.bitmap_bytes(),
            bitmap: Some(bitmap),
        })
    }

    fn read_bitmap_at(&self, offset: u64, h: &DynamicHeader) -> Result<SectorBitmap> {
        let mut buf = vec![0u8; h.bitmap_bytes() as usize];
        self.read_raw(offset, &mut buf)?;
        Ok(SectorBitmap::from_bytes(
            &buf,
            h.sectors_per_block() as usize,
        ))
    }

    /// Read this file's own view of `buf.len()` bytes at virtual `offset` (sector aligned):
    /// sectors it does not hold read as zero, whatever its type. A differencing disk's view
    /// without its parents is mostly useful for tests; use [`crate::Chain`] for the real one.
    /// One bitmap read and at most one data read per block and run.
    pub fn read_own(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        check_range(offset, buf.len() as u64, self.virtual_size)?;
        let bs = self.block_size();
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let block = pos / bs;
            let in_block = pos % bs;
            let n = ((bs - in_block) as usize).min(buf.len() - done);
            let out = &mut buf[done..done + n];
            match self.block_map(block)? {
                BlockMap::Absent => out.fill(0),
                BlockMap::Present {
                    data_offset,
                    bitmap: None,
                } => self.read_raw(data_offset + in_block, out)?,
                BlockMap::Present {
                    data_offset,
                    bitmap: Some(bm),
                } => {
                    let first = (in_block / SECTOR_SIZE) as usize;
                    let last = first + n / SECTOR_SIZE as usize;
                    for run in bm.runs_in(first..last, false) {
                        out[(run.start - first) * 512..(run.end - first) * 512].fill(0);
                    }
                    for run in bm.runs_in(first..last, true) {
                        let dst = &mut out[(run.start - first) * 512..(run.end - first) * 512];
                        self.read_raw(data_offset + run.start as u64 * SECTOR_SIZE, dst)?;
                    }
                }
            }
            done += n;
        }
        Ok(())
    }
}

fn check_range(offset: u64, len: u64, size: u64) -> Result<()> {
    if !offset.is_multiple_of(SECTOR_SIZE) || !len.is_multiple_of(SECTOR_SIZE) {
        return Err(Error::InvalidParameter(format!(
            "offset {offset} and length {len} must be multiples of 512"
        )));
    }
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(Error::InvalidParameter(format!(
            "range {offset}+{len} is past the virtual size {size}"
        ))),
    }
}
