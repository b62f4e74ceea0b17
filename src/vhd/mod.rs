//! One open VHD file: footer, header, BAT, reads of its own sectors, and crash-safe block
//! allocation. Every rule about where a block goes and in which order bytes reach the disk
//! lives here and nowhere else.
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

use std::borrow::Cow;
use std::collections::{BTreeSet, HashMap};
use std::fs::File;
use std::ops::Range;
use std::path::{Path, PathBuf};

use uuid::Uuid;

use crate::error::{Error, Result};
use crate::format::bat::{self, Bat};
use crate::format::footer::{self, DiskType, FOOTER_SIZE, Footer};
use crate::format::header::{self, DynamicHeader, HEADER_SIZE};
use crate::format::{SECTOR_SIZE, SectorBitmap, align_up};
use crate::io::{FileStorage, Storage};

mod sweep;

/// Largest block size accepted. Windows writes 512 KiB or 2 MiB and blktap refuses anything
/// above 2 MiB; 32 MiB leaves room for odd writers while bounding per-block buffers.
pub const MAX_BLOCK_SIZE: u32 = 32 << 20;

/// Most BAT entries a dynamic or differencing disk may have: 2^22, a 16 MiB table, which
/// covers the largest dynamic disk (2040 GiB) at the 512 KiB blocks Windows' CreateVirtualDisk
/// also uses (4,177,920 entries). A file is validated in about 12 bytes per allocated entry
/// beyond the table (an 8-byte block in the overlap sweep, see `vhd::sweep`, and a few bits),
/// so a fully allocated table stays under 64 MiB of peak RSS. A file whose table is larger
/// (blocks under 512 KiB over 2040 GiB) is refused with Not supported (32770) before its table
/// is allocated, and `create` refuses to make one (naming the smallest block size that works),
/// until tables are read on demand.
pub const MAX_TABLE_ENTRIES: u32 = 1 << 22;

/// BAT bytes read at a time when a file is opened, so that no second copy of the table is
/// held while it is decoded.
const BAT_READ_CHUNK: usize = 1 << 20;

/// Largest parent locator payload [`Vhd::read_locator_payload`] reads. Real payloads are one
/// path (Windows reserves at most 64 KiB for one, §2.2).
pub const MAX_LOCATOR_PAYLOAD: u32 = 64 * 1024;

/// The unit in which a fixed disk is read and written, standing in for a block size.
pub const FIXED_CHUNK: u64 = 2 << 20;

/// New blocks are placed so that their data (after the bitmap) starts on this boundary (§7.16).
pub const DATA_ALIGNMENT: u64 = 4096;

/// How to decide the virtual size (§1.5).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum SizeRule {
    /// Current Size, except C×H×S×512 for Virtual PC / Virtual Server files whose geometry is
    /// not the 65535/16/255 marker (the guest of those products sees the CHS size).
    #[default]
    Auto,
    /// Always the footer's Current Size.
    CurrentSize,
    /// Always C×H×S×512 (capped at Current Size).
    Chs,
}

/// Which rule produced [`Vhd::virtual_size`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
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

/// Options for [`Vhd::open`].
#[derive(Clone, Copy, Debug, Default)]
pub struct OpenOptions {
    /// Open for writing.
    pub writable: bool,
    /// Accept footer and header checksum mismatches (with a warning) instead of failing.
    pub lenient: bool,
    /// How to decide the virtual size.
    pub size_rule: SizeRule,
}

impl OpenOptions {
    /// Read-only, strict.
    pub fn read_only() -> OpenOptions {
        OpenOptions::default()
    }

    /// Writable, strict.
    pub fn writable() -> OpenOptions {
        OpenOptions {
            writable: true,
            ..OpenOptions::default()
        }
    }
}

/// Where a block's sectors live in the file.
#[derive(Clone, Debug, PartialEq, Eq)]
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

#[derive(Debug, Default)]
struct Pending {
    /// Blocks that existed before this batch whose bitmap gains bits, with the new bitmap.
    bitmaps: HashMap<u64, SectorBitmap>,
    /// BAT sectors (index into the table, in 512-byte units) holding new entries.
    bat_sectors: BTreeSet<u64>,
    /// Blocks allocated in this batch (their bitmap went out with their data).
    new_blocks: BTreeSet<u64>,
    /// Data was written since the last sync.
    data_written: bool,
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
    /// Block data written since the last writeback hint (see [`Vhd::note_written`]).
    unflushed: Range<u64>,
    /// A flush failed (see [`Vhd::sync`]).
    sync_failed: std::sync::atomic::AtomicBool,
}

impl Vhd {
    /// Open and validate the VHD at `path`. Only regular files are opened.
    pub fn open(path: impl AsRef<Path>, options: OpenOptions) -> Result<Vhd> {
        let path = path.as_ref();
        let file = open_regular_file(path, options.writable)?;
        Vhd::from_storage(Box::new(FileStorage::new(file)), path, options)
    }

    /// Open and validate a VHD held by any [`Storage`]; `path` is used in messages and to
    /// resolve relative parent locators.
    pub fn from_storage(
        storage: Box<dyn Storage>,
        path: impl AsRef<Path>,
        options: OpenOptions,
    ) -> Result<Vhd> {
        let path = path.as_ref().to_path_buf();
        open_inner(storage, path.clone(), options, &mut Validator::new(false))
            .map_err(|e| e.in_file(&path))
    }

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

    /// The BAT (empty for fixed disks).
    ///
    /// A read-only file whose table is mostly unallocated keeps only its allocated entries in
    /// memory (see [`Vhd::block_offset`] and [`Vhd::allocated_entries`], which work on that
    /// directly); the full table is then built on the first call of this method and kept.
    pub fn bat(&self) -> &Bat {
        self.bat.dense()
    }

    /// The byte offset of block `index`'s bitmap, or `None` when it is not allocated (or
    /// past the table). Same as `bat().block_offset(index)` without building the full table.
    pub fn block_offset(&self, index: u64) -> Option<u64> {
        self.bat.get(index)
    }

    /// The allocated BAT entries in increasing block order: (block index, byte offset of the
    /// block's bitmap). Same as walking `bat().entries`, without building the full table.
    pub fn allocated_entries(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.bat.allocated_entries()
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

    /// The underlying storage.
    pub fn storage(&self) -> &dyn Storage {
        self.storage.as_ref()
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
                    "{}: longer than the {MAX_LOCATOR_PAYLOAD} bytes a parent path can take; not read",
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
        self.read_raw(&mut data, loc.data_offset)?;
        Ok(Some(data))
    }

    /// Read raw bytes of the file.
    pub fn read_raw(&self, buf: &mut [u8], offset: u64) -> Result<()> {
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

    fn write_raw(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.storage.write_at(buf, offset).map_err(|e| {
            Error::io(
                format!(
                    "{}: writing {} bytes at offset {offset}",
                    self.path.display(),
                    buf.len()
                ),
                e,
            )
        })
    }

    /// Flush. After one flush failed, every later one fails too: the writes since the last
    /// good flush may be lost (the OS reports a failed writeback once, and a later flush can
    /// succeed without having written them), so nothing may be published on top of them:
    /// [`Vhd::commit`] flushes before it writes bitmaps and BAT entries, and stops there.
    fn sync(&self) -> Result<()> {
        use std::sync::atomic::Ordering;
        let context = || format!("{}: flushing to disk", self.path.display());
        if self.sync_failed.load(Ordering::SeqCst) {
            return Err(Error::io(
                context(),
                std::io::Error::other(
                    "an earlier flush failed, so the writes since the last good one may be lost; nothing more is published (re-run the operation)",
                ),
            ));
        }
        self.storage.sync_data().map_err(|e| {
            self.sync_failed.store(true, Ordering::SeqCst);
            Error::io(context(), e)
        })
    }

    /// Take an advisory lock (exclusive or shared) for the duration of the open file.
    /// Fails with [`Error::InUse`] when another process holds a conflicting lock.
    ///
    /// A conflicting lock is retried for about 60 ms before giving up: a process that forks
    /// between another thread's release of a lock and its own `exec` holds a copy of the
    /// released descriptor (and so of its lock) for that moment, which must not look like a
    /// real holder. A real holder keeps its lock far longer.
    pub fn lock(&self, exclusive: bool) -> Result<()> {
        take_lock(self.storage.as_ref(), &self.path, exclusive)
    }

    /// Open the existing VHD at `path` for writing the way every command that writes one does
    /// (merge, set-parent, repair): with the exclusive advisory lock a merge takes on its
    /// destination, taken before the file is even read, so a file another process is merging
    /// gives [`Error::InUse`] (32774).
    pub fn open_for_writing(path: impl AsRef<Path>, options: OpenOptions) -> Result<Vhd> {
        let path = path.as_ref();
        let storage = open_for_writing(path, WriteMode::Existing)?;
        let options = OpenOptions {
            writable: true,
            ..options
        };
        Vhd::from_storage(Box::new(storage), path, options)
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
        let Some(bitmap_offset) = self.bat.get(index) else {
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
        self.read_raw(&mut buf, offset)?;
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
                } => self.read_raw(out, data_offset + in_block)?,
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
                        self.read_raw(dst, data_offset + run.start as u64 * SECTOR_SIZE)?;
                    }
                }
            }
            done += n;
        }
        Ok(())
    }

    fn require_writable(&self) -> Result<()> {
        if self.writable {
            Ok(())
        } else {
            Err(Error::AccessDenied(format!(
                "{} was opened read-only",
                self.path.display()
            )))
        }
    }

    fn stride(&self) -> u64 {
        self.bitmap_bytes() + self.block_size()
    }

    /// The first position at or after `from` where a block's data is [`DATA_ALIGNMENT`]-aligned.
    fn aligned_block_pos(&self, from: u64) -> Result<u64> {
        let bm = self.bitmap_bytes();
        align_up(from + bm, DATA_ALIGNMENT)
            .map(|a| a - bm)
            .ok_or_else(|| Error::format("file offset overflow"))
    }

    /// Make room for `n` new blocks before the end footer, moving the footer out once instead
    /// of once per block. Callers that know how many blocks a batch allocates call this first;
    /// allocation calls it for one block when they did not.
    pub fn reserve_blocks(&mut self, n: u64) -> Result<()> {
        self.require_writable()?;
        if self.header.is_none() || n == 0 {
            return Ok(());
        }
        let mut end = self.next_free;
        for _ in 0..n {
            end = self.aligned_block_pos(end)? + self.stride();
        }
        if end <= self.footer_offset {
            return Ok(());
        }
        if end / SECTOR_SIZE > u64::from(u32::MAX) {
            return Err(Error::NotSupported {
                path: Some(self.path.clone()),
                detail: format!(
                    "no room for {n} more block(s): the file would pass the 2 TiB limit of 32-bit BAT sector offsets"
                ),
            });
        }
        let old_len = self
            .storage
            .len()
            .map_err(|e| Error::io(format!("{}: reading length", self.path.display()), e))?;
        // The footer's contents do not depend on the BAT, so the same footer written at the new
        // end is valid now, and stays valid while blocks fill the space in front of it.
        self.write_raw(&self.footer.to_bytes(), end)?;
        self.sync()?;
        self.known_zero = old_len.max(self.next_free)..end;
        self.footer_offset = end;
        Ok(())
    }

    /// Write the sectors of block `index` selected by `mask` from `data`, a buffer of one block
    /// (`block_size()` bytes, the block's content at the selected sectors). Sectors outside the
    /// mask keep their content. `data` may be modified (bytes outside the mask are reused as
    /// scratch). Allocates the block if needed. Bitmap and BAT updates become durable at
    /// [`Vhd::commit`].
    ///
    /// For a dynamic disk, a block that is not allocated and whose selected data is all zero
    /// is left unallocated: it reads as zeros already.
    pub fn write_block(&mut self, index: u64, data: &mut [u8], mask: &SectorBitmap) -> Result<()> {
        self.require_writable()?;
        let bs = self.block_size();
        let spb = (bs / SECTOR_SIZE) as usize;
        if data.len() as u64 != bs || mask.len() != spb {
            return Err(Error::InvalidParameter(format!(
                "write_block: buffer of {} bytes and mask of {} sectors for a block of {bs} bytes",
                data.len(),
                mask.len()
            )));
        }
        if index >= self.block_count() {
            return Err(Error::InvalidParameter(format!(
                "write_block: block {index} is past the end of {} ({} blocks)",
                self.path.display(),
                self.block_count()
            )));
        }
        // Never write past the virtual size in the last, partial block.
        let mut mask = mask.clone();
        let valid = ((self.virtual_size - index * bs).min(bs) / SECTOR_SIZE) as usize;
        mask.clear_range(valid..spb);
        if mask.none() {
            return Ok(());
        }
        let header = self.header.clone();
        let Some(h) = header else {
            self.write_masked(index * FIXED_CHUNK, data, &mask, true)?;
            self.pending.data_written = true;
            self.note_written(index * FIXED_CHUNK, bs);
            return Ok(());
        };
        match self.bat.get(index) {
            Some(bitmap_offset) => {
                let data_offset = bitmap_offset + h.bitmap_bytes();
                self.write_masked(data_offset, data, &mask, true)?;
                self.pending.data_written = true;
                self.note_written(data_offset, bs);
                self.mark_present(index, bitmap_offset, &mask, &h)?;
            }
            None => {
                if self.disk_type() == DiskType::Dynamic && masked_all_zero(data, &mask) {
                    return Ok(());
                }
                self.allocate_and_write(index, data, &mask, &h)?;
            }
        }
        Ok(())
    }

    /// The sectors of `mask` of the allocated block `index` (bitmap at `bitmap_offset`) now
    /// hold data: a block new in this batch gets its unpublished bitmap rewritten at once;
    /// an older block's new bits wait for [`Vhd::commit`] (step 4 of the module docs).
    fn mark_present(
        &mut self,
        index: u64,
        bitmap_offset: u64,
        mask: &SectorBitmap,
        h: &DynamicHeader,
    ) -> Result<()> {
        if self.pending.new_blocks.contains(&index) {
            let mut bm = self.read_bitmap_at(bitmap_offset, h)?;
            bm.or(mask);
            return self.write_raw(
                &bm.to_bytes_padded(h.bitmap_bytes() as usize),
                bitmap_offset,
            );
        }
        let mut bm = match self.pending.bitmaps.remove(&index) {
            Some(b) => b,
            None => self.read_bitmap_at(bitmap_offset, h)?,
        };
        let before = bm.count_ones();
        bm.or(mask);
        if bm.count_ones() != before {
            self.pending.bitmaps.insert(index, bm);
        }
        Ok(())
    }

    /// Clone `sectors` sectors of `src` at byte `src_offset` into block `index` from sector
    /// `first` on (see [`crate::io::Storage::clone_range`]): afterwards they read `src`'s
    /// bytes as if [`Vhd::write_block`] had written them, in the same crash-safe order (a new
    /// block's data and bitmap before the BAT entry, at [`Vhd::commit`]).
    ///
    /// Only whole [`DATA_ALIGNMENT`] blocks at aligned offsets in both files are tried, and a
    /// new block only when the clone fills it or its space is known to read as zeros (so that
    /// no stale byte lies under a clear bitmap bit). Anything else, and a file system that
    /// cannot clone, answers without changing the file: the caller writes the data instead.
    pub fn clone_into_block(
        &mut self,
        index: u64,
        first: u64,
        src: &File,
        src_offset: u64,
        sectors: u64,
    ) -> Result<crate::io::CloneOutcome> {
        use crate::io::CloneOutcome;
        self.require_writable()?;
        let (bs, spb) = (self.block_size(), self.sectors_per_block());
        if index >= self.block_count() || first.checked_add(sectors).is_none_or(|e| e > spb) {
            return Err(Error::InvalidParameter(format!(
                "{}: clone of {sectors} sector(s) at sector {first} of block {index}: outside the disk's blocks",
                self.path.display()
            )));
        }
        let valid = (self.virtual_size - index * bs).min(bs) / SECTOR_SIZE;
        let len = sectors * SECTOR_SIZE;
        let aligned = |o: u64| o.is_multiple_of(DATA_ALIGNMENT);
        if first + sectors > valid || !aligned(src_offset) || !aligned(len) || len == 0 {
            return Ok(CloneOutcome::Unaligned);
        }
        let mut mask = SectorBitmap::new(spb as usize);
        mask.set_range(first as usize..(first + sectors) as usize);
        let Some(h) = self.header.clone() else {
            let at = index * FIXED_CHUNK + first * SECTOR_SIZE;
            return self.clone_raw(src, src_offset, at, len);
        };
        if let Some(bitmap_offset) = self.bat.get(index) {
            let at = bitmap_offset + h.bitmap_bytes() + first * SECTOR_SIZE;
            if !aligned(at) {
                return Ok(CloneOutcome::Unaligned);
            }
            let r = self.clone_raw(src, src_offset, at, len)?;
            if r == CloneOutcome::Cloned {
                self.mark_present(index, bitmap_offset, &mask, &h)?;
            }
            return Ok(r);
        }
        let pos = self.aligned_block_pos(self.next_free)?;
        let end = pos + self.stride();
        if end > self.footer_offset {
            self.reserve_blocks(1)?;
        }
        let fresh = pos >= self.known_zero.start && end <= self.known_zero.end;
        if !fresh && sectors != spb {
            return Ok(CloneOutcome::Unaligned);
        }
        let r = self.clone_raw(
            src,
            src_offset,
            pos + h.bitmap_bytes() + first * SECTOR_SIZE,
            len,
        )?;
        if r == CloneOutcome::Cloned {
            self.write_raw(&mask.to_bytes_padded(h.bitmap_bytes() as usize), pos)?;
            self.publish_new_block(index, pos, end)?;
        }
        Ok(r)
    }

    /// One clone into the file at `offset`; a clone is data, so the batch needs its sync.
    fn clone_raw(
        &mut self,
        src: &File,
        src_offset: u64,
        offset: u64,
        len: u64,
    ) -> Result<crate::io::CloneOutcome> {
        let r = self
            .storage
            .clone_range(src, src_offset, offset, len)
            .map_err(|e| {
                Error::io(
                    format!(
                        "{}: cloning {len} bytes to offset {offset}",
                        self.path.display()
                    ),
                    e,
                )
            })?;
        if r == crate::io::CloneOutcome::Cloned {
            self.pending.data_written = true;
        }
        Ok(r)
    }

    fn allocate_and_write(
        &mut self,
        index: u64,
        data: &mut [u8],
        mask: &SectorBitmap,
        h: &DynamicHeader,
    ) -> Result<()> {
        let pos = self.aligned_block_pos(self.next_free)?;
        let end = pos + self.stride();
        if end > self.footer_offset {
            self.reserve_blocks(1)?;
        }
        let bm_bytes = h.bitmap_bytes();
        let data_offset = pos + bm_bytes;
        self.write_raw(&mask.to_bytes_padded(bm_bytes as usize), pos)?;
        let fresh = pos >= self.known_zero.start && end <= self.known_zero.end;
        if fresh {
            // The space is a hole: write only the selected sectors.
            self.write_masked(data_offset, data, mask, false)?;
        } else {
            for run in mask.runs_in(0..mask.len(), false) {
                data[run.start * 512..run.end * 512].fill(0);
            }
            self.write_raw(data, data_offset)?;
        }
        self.publish_new_block(index, pos, end)?;
        self.note_written(pos, end - pos);
        Ok(())
    }

    /// Block `index` now lives at `pos..end` (data and bitmap written): its BAT entry joins
    /// the batch, published at [`Vhd::commit`].
    fn publish_new_block(&mut self, index: u64, pos: u64, end: u64) -> Result<()> {
        let sector = u32::try_from(pos / SECTOR_SIZE).map_err(|_| Error::NotSupported {
            path: Some(self.path.clone()),
            detail: "block offset past the 2 TiB limit of 32-bit BAT sector offsets".into(),
        })?;
        let Some(slot) = self
            .bat
            .dense_mut()
            .and_then(|b| b.entries.get_mut(index as usize))
        else {
            return Err(Error::InvalidParameter(format!(
                "block {index} is past the BAT of {}",
                self.path.display()
            )));
        };
        *slot = sector;
        self.pending.bat_sectors.insert(index * 4 / SECTOR_SIZE);
        self.pending.new_blocks.insert(index);
        self.pending.data_written = true;
        self.next_free = end;
        Ok(())
    }

    /// Record that block data was written at `offset..offset + len`, and once a long enough
    /// stretch has accumulated, ask the OS to start writing it out (see
    /// [`Storage::start_writeback`]). Only a hint: the crash-safe order still comes from the
    /// syncs in [`Vhd::commit`]; data reaching the disk early is always allowed (step 2 of
    /// the module docs).
    fn note_written(&mut self, offset: u64, len: u64) {
        // 4 to 16 MiB measured alike; far below a batch, far above one block.
        const CHUNK: u64 = 8 << 20;
        // Blocks are laid out back to back (bitmap, alignment padding, data): a small gap
        // still continues the stretch.
        const GAP: u64 = 64 << 10;
        let end = offset + len;
        let w = &self.unflushed;
        if w.is_empty() {
            self.unflushed = offset..end;
        } else if offset >= w.start && offset <= w.end + GAP {
            self.unflushed.end = w.end.max(end);
        } else {
            self.storage.start_writeback(w.start, w.end - w.start);
            self.unflushed = offset..end;
        }
        if self.unflushed.end - self.unflushed.start >= CHUNK {
            let w = self.unflushed.clone();
            self.storage.start_writeback(w.start, w.end - w.start);
            self.unflushed = w.end..w.end;
        }
    }

    /// Write the masked sectors of `data` at `file_offset`. Few runs are written one by one;
    /// many runs become one read-modify-write of their span (when `preserve`, the unmasked
    /// sectors in the span are first filled from the file) or one write with zeros between
    /// them (when not).
    fn write_masked(
        &mut self,
        file_offset: u64,
        data: &mut [u8],
        mask: &SectorBitmap,
        preserve: bool,
    ) -> Result<()> {
        const FEW_RUNS: usize = 8;
        let runs: Vec<Range<usize>> = mask.runs().take(FEW_RUNS + 1).collect();
        let Some(first) = runs.first() else {
            return Ok(());
        };
        if runs.len() <= FEW_RUNS {
            for r in &runs {
                self.write_raw(
                    &data[r.start * 512..r.end * 512],
                    file_offset + r.start as u64 * SECTOR_SIZE,
                )?;
            }
            return Ok(());
        }
        let start = first.start;
        let end = mask.runs().last().map_or(start, |r| r.end);
        if preserve {
            let span = (end - start) * 512;
            let mut scratch = std::mem::take(&mut self.scratch);
            scratch.resize(span, 0);
            let res = self.read_raw(&mut scratch, file_offset + start as u64 * SECTOR_SIZE);
            if let Err(e) = res {
                self.scratch = scratch;
                return Err(e);
            }
            for r in mask.runs_in(start..end, false) {
                data[r.start * 512..r.end * 512]
                    .copy_from_slice(&scratch[(r.start - start) * 512..(r.end - start) * 512]);
            }
            self.scratch = scratch;
        } else {
            for r in mask.runs_in(start..end, false) {
                data[r.start * 512..r.end * 512].fill(0);
            }
        }
        self.write_raw(
            &data[start * 512..end * 512],
            file_offset + start as u64 * SECTOR_SIZE,
        )
    }

    /// True when writes since the last commit still need one.
    pub fn has_pending(&self) -> bool {
        self.pending.data_written
            || !self.pending.bitmaps.is_empty()
            || !self.pending.bat_sectors.is_empty()
    }

    /// Make the batch durable in the crash-safe order (see the module docs): sync data, then
    /// publish bitmaps of existing blocks and BAT entries, then sync.
    pub fn commit(&mut self) -> Result<()> {
        if !self.has_pending() {
            return Ok(());
        }
        self.sync()?;
        let Some(h) = self.header.clone() else {
            self.pending = Pending::default();
            return Ok(());
        };
        let mut bitmaps: Vec<(u64, SectorBitmap)> = self.pending.bitmaps.drain().collect();
        bitmaps.sort_by_key(|(i, _)| *i);
        for (index, bm) in &bitmaps {
            if let Some(off) = self.bat.get(*index) {
                self.write_raw(&bm.to_bytes_padded(h.bitmap_bytes() as usize), off)?;
            }
        }
        let table = std::mem::take(&mut self.pending.bat_sectors);
        let entries_per_sector = (SECTOR_SIZE / 4) as usize;
        let mut iter = table.iter().copied().peekable();
        while let Some(first) = iter.next() {
            let mut last = first;
            while iter.peek() == Some(&(last + 1)) {
                last += 1;
                iter.next();
            }
            let lo = first as usize * entries_per_sector;
            let entries = &self.bat.dense().entries;
            let hi = ((last as usize + 1) * entries_per_sector).min(entries.len());
            let mut bytes = vec![0xFFu8; (last - first + 1) as usize * SECTOR_SIZE as usize];
            for (k, e) in entries[lo..hi].iter().enumerate() {
                bytes[4 * k..4 * k + 4].copy_from_slice(&e.to_be_bytes());
            }
            self.write_raw(&bytes, h.table_offset + first * SECTOR_SIZE)?;
        }
        self.sync()?;
        self.pending = Pending::default();
        self.unflushed = 0..0;
        Ok(())
    }

    /// Commit, then give back space reserved for blocks that were never allocated: the footer
    /// moves to the end of data and the file is truncated after it (never below where the
    /// footer was when the file was opened).
    pub fn finish(&mut self) -> Result<()> {
        self.commit()?;
        if !self.writable || self.header.is_none() {
            return Ok(());
        }
        if self.footer_source != FooterSource::End {
            // Opened from the offset-0 copy or a 511-byte footer: restore a full end footer.
            self.write_raw(&self.footer.to_bytes(), self.footer_offset)?;
            self.sync()?;
            self.footer_source = FooterSource::End;
        }
        let target = self.next_free.max(self.original_footer_offset);
        if target < self.footer_offset {
            // Both footers are identical: until the truncation the old one is still the last.
            self.write_raw(&self.footer.to_bytes(), target)?;
            self.sync()?;
            self.storage
                .set_len(target + FOOTER_SIZE as u64)
                .map_err(|e| Error::io(format!("{}: truncating", self.path.display()), e))?;
            self.sync()?;
            self.footer_offset = target;
        }
        Ok(())
    }

    /// Write `data` at virtual `offset` (both sector aligned, inside the virtual size) and
    /// commit. Convenient for tests and small writes; merges use [`Vhd::write_block`] batches.
    pub fn write_at(&mut self, offset: u64, data: &[u8]) -> Result<()> {
        check_range(offset, data.len() as u64, self.virtual_size)?;
        let bs = self.block_size();
        let spb = (bs / SECTOR_SIZE) as usize;
        let mut block_buf = vec![0u8; bs as usize];
        let mut done = 0usize;
        while done < data.len() {
            let pos = offset + done as u64;
            let block = pos / bs;
            let in_block = (pos % bs) as usize;
            let n = (bs as usize - in_block).min(data.len() - done);
            block_buf[in_block..in_block + n].copy_from_slice(&data[done..done + n]);
            let mut mask = SectorBitmap::new(spb);
            mask.set_range(in_block / 512..(in_block + n) / 512);
            self.write_block(block, &mut block_buf, &mask)?;
            done += n;
        }
        self.finish()
    }

    /// Replace the dynamic header in place (used by set-parent). Locator data it points to
    /// must already be durable. The header is one 1024-byte write inside the first 4 KiB.
    pub fn rewrite_header(&mut self, mut header: DynamicHeader) -> Result<()> {
        self.require_writable()?;
        if self.header.is_none() {
            return Err(Error::InvalidParameter(format!(
                "{} is a fixed disk: it has no dynamic header",
                self.path.display()
            )));
        }
        header.fix_checksum();
        self.sync()?;
        self.write_raw(&header.to_bytes(), self.footer.data_offset)?;
        self.sync()?;
        self.header = Some(header);
        self.recompute_end_of_data();
        Ok(())
    }

    /// Write bytes into free space after all data (for locator payloads), returning the
    /// offset. The space is reserved before the end footer, like a block.
    pub fn append_metadata(&mut self, bytes: &[u8]) -> Result<u64> {
        self.require_writable()?;
        let pos = align_up(self.next_free, SECTOR_SIZE).unwrap_or(self.next_free);
        let len = align_up(bytes.len() as u64, SECTOR_SIZE).unwrap_or(0);
        let end = pos + len;
        if end > self.footer_offset {
            self.write_raw(&self.footer.to_bytes(), end)?;
            self.sync()?;
            self.footer_offset = end;
        }
        let mut padded = bytes.to_vec();
        padded.resize(len as usize, 0);
        self.write_raw(&padded, pos)?;
        self.next_free = end;
        Ok(pos)
    }

    /// True when `len` bytes at `offset` lie between the footer copy and the end footer and
    /// overlap neither the dynamic header, the BAT nor any allocated block: space only locator
    /// data may use (§4.1). Always false for a fixed disk.
    pub fn is_metadata_space(&self, offset: u64, len: u64) -> bool {
        let Some(h) = &self.header else {
            return false;
        };
        let Some(end) = offset.checked_add(len) else {
            return false;
        };
        let overlaps = |a: u64, alen: u64| offset < a.saturating_add(alen) && a < end;
        if offset < FOOTER_SIZE as u64
            || end > self.footer_offset
            || overlaps(self.footer.data_offset, HEADER_SIZE as u64)
            || overlaps(h.table_offset, bat::table_bytes(h.max_table_entries))
        {
            return false;
        }
        let stride = self.stride();
        !self
            .bat
            .allocated_entries()
            .any(|(_, at)| overlaps(at, stride))
    }

    /// Overwrite `bytes` at `offset` in locator space (see [`Vhd::is_metadata_space`]), for
    /// set-parent reusing a locator's reserved extent. Not synced: [`Vhd::rewrite_header`]
    /// syncs before it publishes a header that points here.
    pub fn write_metadata_at(&mut self, offset: u64, bytes: &[u8]) -> Result<()> {
        self.require_writable()?;
        if !self.is_metadata_space(offset, bytes.len() as u64) {
            return Err(Error::InvalidParameter(format!(
                "{}: {} bytes at offset {offset} are not free metadata space (they overlap the header, the BAT, a block or the footer)",
                self.path.display(),
                bytes.len()
            )));
        }
        self.write_raw(bytes, offset)
    }

    fn recompute_end_of_data(&mut self) {
        if let Some(h) = &self.header {
            let len = self.footer_offset;
            self.next_free = self
                .next_free
                .max(metadata_end(self.footer.data_offset, h, len));
        }
    }
}

fn masked_all_zero(data: &[u8], mask: &SectorBitmap) -> bool {
    mask.runs()
        .all(|r| data[r.start * 512..r.end * 512].iter().all(|&b| b == 0))
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

/// Take an advisory lock (exclusive or shared) on `storage`, the file at `path`; see
/// [`Vhd::lock`] for the retry.
pub(crate) fn take_lock(storage: &dyn Storage, path: &Path, exclusive: bool) -> Result<()> {
    let mut wait_ms = 1;
    loop {
        match storage.try_lock(exclusive) {
            Ok(true) => return Ok(()),
            Ok(false) if wait_ms <= 32 => {
                std::thread::sleep(std::time::Duration::from_millis(wait_ms));
                wait_ms *= 2;
            }
            Ok(false) => {
                return Err(Error::InUse(format!(
                    "{} is in use: another process holds a lock on it (a merge or another tool)",
                    path.display()
                )));
            }
            Err(e) => return Err(Error::io(format!("{}: locking", path.display()), e)),
        }
    }
}

/// What a command that writes a file expects to find at its path (see [`open_for_writing`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum WriteMode {
    /// A file that exists, opened for reading and writing.
    Existing,
    /// No file: a new one is created (an existing one is refused).
    CreateNew,
    /// A new file, or an existing one emptied in place (`create --force`): truncated only
    /// once the lock is held.
    Truncate,
    /// An existing file that is about to be replaced by renaming another over it (`flatten
    /// --force`): opened read-only, only to hold the lock until the rename.
    Replace,
}

/// The one rule for every command that writes a file (create, set-parent, repair, flatten
/// over an existing output, merge): open it and take the exclusive advisory lock a merge
/// takes on its destination (the other layers of a merge are locked shared, which conflicts
/// too), before any byte changes. Another holder gives [`Error::InUse`] (32774). The lock
/// lasts as long as the returned storage.
pub(crate) fn open_for_writing(path: &Path, mode: WriteMode) -> Result<FileStorage> {
    let exists = match std::fs::symlink_metadata(path) {
        Ok(_) => true,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
        Err(e) => return Err(Error::io(format!("{}: cannot open", path.display()), e)),
    };
    let file = match mode {
        WriteMode::Existing => open_regular_file(path, true)?,
        WriteMode::Replace => open_regular_file(path, false)?,
        WriteMode::CreateNew => create_file(path, false)?,
        WriteMode::Truncate if exists => {
            // Never open a FIFO or a device (an open could block or write to it).
            let _ = open_regular_file(path, false)?;
            create_file(path, true)?
        }
        WriteMode::Truncate => create_file(path, true)?,
    };
    let storage = FileStorage::new(file);
    take_lock(&storage, path, true)?;
    if mode == WriteMode::Truncate {
        storage
            .set_len(0)
            .map_err(|e| Error::io(format!("{}: truncating", path.display()), e))?;
    }
    Ok(storage)
}

/// Create `path` for reading and writing; `existing_ok` opens an existing file without
/// truncating it (the caller truncates once it holds the lock).
fn create_file(path: &Path, existing_ok: bool) -> Result<File> {
    let mut o = File::options();
    o.read(true).write(true);
    if existing_ok {
        o.create(true);
    } else {
        o.create_new(true);
    }
    o.open(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::AlreadyExists {
            Error::InvalidParameter(format!(
                "{} already exists (the overwrite option (--force) replaces it)",
                path.display()
            ))
        } else {
            Error::io(format!("{}: cannot create", path.display()), e)
        }
    })
}

/// Open a path that must be a regular file (not a directory, FIFO or device).
pub(crate) fn open_regular_file(path: &Path, writable: bool) -> Result<File> {
    let meta = std::fs::metadata(path)
        .map_err(|e| Error::io(format!("{}: cannot open", path.display()), e))?;
    if !meta.is_file() {
        return Err(Error::InvalidParameter(format!(
            "{} is not a regular file ({})",
            path.display(),
            file_kind(&meta)
        )));
    }
    let file = File::options()
        .read(true)
        .write(writable)
        .open(path)
        .map_err(|e| {
            let what = if writable {
                "cannot open for writing"
            } else {
                "cannot open"
            };
            Error::io(format!("{}: {what}", path.display()), e)
        })?;
    Ok(file)
}

/// What a cheap look at a file finds: its footers and, for a differencing disk, its parent's
/// unique id. Nothing else is validated; at most three small reads. For scanning whole
/// directories for a renamed parent or for siblings, where most files are not wanted.
#[derive(Clone, Debug)]
pub(crate) struct Peek {
    /// The footers [`Vhd::open`] would consider, in its order of preference, those that parse
    /// (checksums not checked).
    pub footers: Vec<Footer>,
    /// The first sector parsed as a footer whatever its disk type (checksum not checked): a
    /// fixed disk that holds a copy of its own footer there.
    pub sector0: Option<Footer>,
    /// For a differencing disk (by [`Peek::footer`]): the Parent Unique Id of its dynamic
    /// header, when the header lies inside the file and its checksum is right.
    pub parent_unique_id: Option<Uuid>,
}

impl Peek {
    /// The footer a strict [`Vhd::open`] goes by: the first candidate whose checksum is right.
    pub fn footer(&self) -> Option<&Footer> {
        self.footers.iter().find(|f| f.checksum_ok())
    }

    /// Whether any footer, checksum right or not, carries unique id `id`: how a damaged copy
    /// of a wanted disk is still recognised (see [`crate::layer::Probe::ids`]).
    #[cfg(test)]
    pub fn carries_id(&self, id: Uuid) -> bool {
        self.footers
            .iter()
            .chain(&self.sector0)
            .any(|f| f.unique_id == id)
    }
}

/// Peek at the file at `path`: `None` when it is not a regular file at least a footer long
/// (its metadata cannot be read, or it is a directory, FIFO, device or shorter file). A file
/// that cannot be opened or read peeks as one without footers.
pub(crate) fn peek(path: &Path) -> Option<Peek> {
    let meta = std::fs::metadata(path).ok()?;
    let len = meta.len();
    if !meta.is_file() || len < FOOTER_SIZE as u64 {
        return None;
    }
    let mut peek = Peek {
        footers: Vec::new(),
        sector0: None,
        parent_unique_id: None,
    };
    let Ok(file) = File::open(path) else {
        return Some(peek);
    };
    let storage = FileStorage::new(file);
    let candidates = footer_candidates(&storage, len);
    peek.footers = candidates
        .into_iter()
        .filter_map(|c| c.result.ok())
        .collect();
    if len >= 512 + FOOTER_SIZE as u64 {
        peek.sector0 = read_footer_at(&storage, 0, 512, FooterSource::Copy)
            .result
            .ok();
    }
    let header_at = peek
        .footer()
        .filter(|f| f.disk_type == DiskType::Differencing)
        .map(|f| f.data_offset)
        .filter(|at| at.checked_add(HEADER_SIZE as u64).is_some_and(|e| e <= len));
    if let Some(at) = header_at {
        let mut b = [0u8; HEADER_SIZE];
        peek.parent_unique_id = storage
            .read_at(&mut b, at)
            .ok()
            .and_then(|()| DynamicHeader::parse(&b).ok())
            .filter(DynamicHeader::checksum_ok)
            .map(|h| h.parent_unique_id);
    }
    Some(peek)
}

/// What a path that is not a regular file is, for messages.
pub(crate) fn file_kind(meta: &std::fs::Metadata) -> &'static str {
    let ft = meta.file_type();
    if ft.is_dir() {
        return "a directory";
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt;
        if ft.is_fifo() {
            return "a FIFO";
        }
        if ft.is_block_device() || ft.is_char_device() {
            return "a device";
        }
        if ft.is_socket() {
            return "a socket";
        }
    }
    "not a regular file"
}

/// End of header, BAT and every locator extent that lies inside the file (§4.1).
fn metadata_end(header_offset: u64, h: &DynamicHeader, file_len: u64) -> u64 {
    let mut end = (header_offset + HEADER_SIZE as u64)
        .max(h.table_offset + bat::table_bytes(h.max_table_entries))
        .max(FOOTER_SIZE as u64);
    for loc in h.locators.iter().filter(|l| !l.is_empty()) {
        let full = loc.data_offset.saturating_add(loc.extent_len());
        let data = loc.data_offset.saturating_add(u64::from(loc.data_length));
        if full <= file_len {
            end = end.max(full);
        } else if data <= file_len {
            end = end.max(data);
        }
    }
    end
}

/// How a [`Problem`] affects [`Vhd::open`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ProblemLevel {
    /// Noted by [`Vhd::inspect`] only (an oddity that needs no warning when opening).
    Info,
    /// Opening succeeds and lists it in [`Vhd::warnings`].
    Warning,
    /// A strict open fails (a lenient one accepts checksum mismatches, with a warning).
    Fatal,
}

/// One thing validation found in a file (see [`Vhd::inspect`]). [`Vhd::open`] runs the same
/// validation and fails on the first fatal problem.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    /// Stable identifier of the kind of problem, such as `footer-checksum`, `bat-entry-outside`
    /// or `block-overlap` (see [`problem_codes`]).
    pub code: &'static str,
    /// What it means for opening.
    pub level: ProblemLevel,
    /// The structure: `footer`, `footer copy`, `dynamic header`, `BAT`, `block N`,
    /// `locator N`, `batmap`, `file`.
    pub structure: String,
    /// Byte offset in the file, when the problem has one.
    pub offset: Option<u64>,
    /// The block, for problems about one BAT entry or block.
    pub block: Option<u64>,
    /// What is wrong, and what was expected.
    pub message: String,
}

/// The codes [`Problem::code`] takes.
pub mod problem_codes {
    /// The file is too small, or no footer parses anywhere.
    pub const NOT_A_VHD: &str = "not-a-vhd";
    /// A footer's checksum does not match (the one in use).
    pub const FOOTER_CHECKSUM: &str = "footer-checksum";
    /// The end footer is missing or damaged; the offset-0 copy is in use.
    pub const FOOTER_END_BAD: &str = "footer-end-bad";
    /// The footer is a 511-byte one.
    pub const FOOTER_SHORT: &str = "footer-short";
    /// The offset-0 copy is missing or damaged.
    pub const FOOTER_COPY_BAD: &str = "footer-copy-bad";
    /// The offset-0 copy parses but is not byte-for-byte the end footer.
    pub const FOOTER_COPY_DIFFERS: &str = "footer-copy-differs";
    /// A footer field is invalid or unsupported (disk type, version, size).
    pub const FOOTER_FIELD: &str = "footer-field";
    /// A footer field is odd (features, saved state, fixed-disk data offset).
    pub const FOOTER_ODD: &str = "footer-odd";
    /// The virtual size is the CHS size, not Current Size.
    pub const SIZE_CHS: &str = "size-chs";
    /// A fixed disk's data area does not fit before its footer.
    pub const FIXED_TRUNCATED: &str = "fixed-truncated";
    /// Bytes between a fixed disk's data and its footer.
    pub const FIXED_GAP: &str = "fixed-gap";
    /// The footer's Data Offset does not point at a dynamic header inside the file.
    pub const HEADER_OFFSET: &str = "header-offset";
    /// No dynamic header cookie.
    pub const HEADER_COOKIE: &str = "header-cookie";
    /// The dynamic header's checksum does not match.
    pub const HEADER_CHECKSUM: &str = "header-checksum";
    /// A dynamic header field is invalid or unsupported.
    pub const HEADER_FIELD: &str = "header-field";
    /// A dynamic header field is odd but usable (alignment, data offset, parent id).
    pub const HEADER_ODD: &str = "header-odd";
    /// Max Table Entries is larger than Current Size needs.
    pub const BAT_LARGER: &str = "bat-larger";
    /// The BAT runs past the end of the file or overlaps the header.
    pub const BAT_PLACEMENT: &str = "bat-placement";
    /// The BAT has more entries than [`super::MAX_TABLE_ENTRIES`]: not supported.
    pub const BAT_TOO_LARGE: &str = "bat-too-large";
    /// A BAT entry points (partly) outside the file.
    pub const BAT_ENTRY_OUTSIDE: &str = "bat-entry-outside";
    /// A block overlaps another block or metadata.
    pub const BLOCK_OVERLAP: &str = "block-overlap";
    /// Two metadata structures overlap (the batmap and the end footer, ...).
    pub const METADATA_OVERLAP: &str = "metadata-overlap";
    /// A parent locator's data lies outside the file.
    pub const LOCATOR_OUTSIDE: &str = "locator-outside";
    /// A parent locator's data overlaps a block or metadata.
    pub const LOCATOR_OVERLAP: &str = "locator-overlap";
    /// The blktap batmap header or map is damaged.
    pub const BATMAP: &str = "batmap";
    /// Reading the file failed.
    pub const IO: &str = "io";
}

use problem_codes as pc;

/// What [`Vhd::inspect`] found.
#[derive(Debug)]
pub struct Inspection {
    /// The file, opened as far as validation allowed: checksum mismatches accepted, and BAT
    /// entries that point outside the file or overlap something dropped (in memory only; see
    /// `dropped_entries`). `None` when a problem stopped validation (the last problem says which).
    pub vhd: Option<Vhd>,
    /// Every problem found, in file order of the structures.
    pub problems: Vec<Problem>,
    /// BAT entries dropped from `vhd`'s table.
    pub dropped_entries: Vec<DroppedEntry>,
    /// The blktap batmap, when the file has one (§3.3).
    pub batmap: Option<Batmap>,
    /// Length of the file in bytes.
    pub file_len: u64,
}

/// A BAT entry [`Vhd::inspect`] dropped.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DroppedEntry {
    /// The block.
    pub block: u64,
    /// The entry stored in the file (the sector of the block's bitmap).
    pub entry: u32,
    /// Why it was dropped.
    pub reason: Cow<'static, str>,
}

/// The blktap batmap (§3.3): one bit per block, set when every sector of the block is present.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Batmap {
    /// Offset of the `tdbatmap` header.
    pub header_offset: u64,
    /// Offset of the map.
    pub map_offset: u64,
    /// Sectors of map.
    pub map_sectors: u32,
    /// Batmap version (major << 16 | minor).
    pub version: u32,
    /// Checksum stored in the header.
    pub checksum: u32,
}

/// Cookie of blktap's batmap header.
pub const BATMAP_COOKIE: [u8; 8] = *b"tdbatmap";

impl Batmap {
    /// Bytes of map.
    pub fn map_bytes(&self) -> u64 {
        u64::from(self.map_sectors) * SECTOR_SIZE
    }

    /// The checksum blktap computes over `map` (one's complement of the byte sum; version 1.1
    /// summed signed chars, §3.3).
    pub fn computed_checksum(&self, map: &[u8]) -> u32 {
        let signed = self.version == 0x0001_0001;
        let sum = map.iter().fold(0u32, |s, &b| {
            let v = if signed {
                i32::from(b as i8) as u32
            } else {
                u32::from(b)
            };
            s.wrapping_add(v)
        });
        !sum
    }
}

/// Collects problems while a file is validated. Opening stops at the first fatal problem;
/// inspecting records it and goes on where it can.
struct Validator {
    collect: bool,
    problems: Vec<Problem>,
    dropped: Vec<DroppedEntry>,
    batmap: Option<Batmap>,
    /// A problem stopped validation (it is the last one recorded).
    stopped: bool,
    /// Problems recorded per code, and those left out past [`MAX_PROBLEMS_PER_CODE`]: a
    /// hostile table can make every one of a million entries wrong.
    per_code: HashMap<&'static str, (usize, u64)>,
}

/// At most this many problems of one kind are listed by [`Vhd::inspect`]; the rest are
/// counted in one summary problem.
pub const MAX_PROBLEMS_PER_CODE: usize = 1000;

impl Validator {
    fn new(collect: bool) -> Validator {
        Validator {
            collect,
            problems: Vec::new(),
            dropped: Vec::new(),
            batmap: None,
            stopped: false,
            per_code: HashMap::new(),
        }
    }

    /// Problems left out, as one summary problem per code.
    fn summarize(&mut self) {
        let mut left: Vec<(&'static str, u64)> = self
            .per_code
            .iter()
            .filter(|(_, (_, n))| *n > 0)
            .map(|(c, (_, n))| (*c, *n))
            .collect();
        left.sort_unstable();
        for (code, n) in left {
            self.problems.push(Problem {
                code,
                level: ProblemLevel::Fatal,
                structure: "file".into(),
                offset: None,
                block: None,
                message: format!(
                    "{n} more problem(s) of the same kind ({code}) not listed (at most {MAX_PROBLEMS_PER_CODE} are)"
                ),
            });
        }
    }

    fn note(
        &mut self,
        level: ProblemLevel,
        code: &'static str,
        structure: &str,
        offset: Option<u64>,
        message: String,
    ) {
        self.problems.push(Problem {
            code,
            level,
            structure: structure.to_string(),
            offset,
            block: None,
            message,
        });
    }

    fn warn(&mut self, code: &'static str, structure: &str, offset: Option<u64>, message: String) {
        self.note(ProblemLevel::Warning, code, structure, offset, message);
    }

    fn info(&mut self, code: &'static str, structure: &str, offset: Option<u64>, message: String) {
        self.note(ProblemLevel::Info, code, structure, offset, message);
    }

    /// A fatal problem after which validation can go on: opening fails, inspecting records it.
    fn error(
        &mut self,
        code: &'static str,
        structure: &str,
        offset: Option<u64>,
        block: Option<u64>,
        err: Error,
    ) -> Result<()> {
        if !self.collect {
            return Err(err);
        }
        let (listed, left) = self.per_code.entry(code).or_insert((0, 0));
        if *listed >= MAX_PROBLEMS_PER_CODE {
            *left += 1;
            return Ok(());
        }
        *listed += 1;
        self.problems.push(Problem {
            code,
            level: ProblemLevel::Fatal,
            structure: structure.to_string(),
            offset,
            block,
            message: err.to_string(),
        });
        Ok(())
    }

    /// A fatal problem after which validation cannot go on.
    fn stop(
        &mut self,
        code: &'static str,
        structure: &str,
        offset: Option<u64>,
        err: Error,
    ) -> Error {
        self.stopped = true;
        if self.collect {
            self.problems.push(Problem {
                code,
                level: ProblemLevel::Fatal,
                structure: structure.to_string(),
                offset,
                block: None,
                message: err.to_string(),
            });
        }
        err
    }

    fn warnings(&self) -> Vec<String> {
        self.problems
            .iter()
            .filter(|p| p.level == ProblemLevel::Warning)
            .map(|p| p.message.clone())
            .collect()
    }
}

impl Vhd {
    /// Validate the file at `path` without stopping at the first problem: list every problem
    /// found and, when the structures allow, open it anyway (see [`Inspection`]). For `check`
    /// and `repair`. Fails only when the file cannot be opened at all (missing, not a regular
    /// file, no permission).
    pub fn inspect(path: impl AsRef<Path>, options: OpenOptions) -> Result<Inspection> {
        let path = path.as_ref();
        let file = open_regular_file(path, options.writable)?;
        Ok(Vhd::inspect_storage(
            Box::new(FileStorage::new(file)),
            path,
            options,
        ))
    }

    /// [`Vhd::inspect`] over any [`Storage`].
    pub fn inspect_storage(
        storage: Box<dyn Storage>,
        path: impl AsRef<Path>,
        options: OpenOptions,
    ) -> Inspection {
        let path = path.as_ref().to_path_buf();
        let file_len = storage.len().unwrap_or(0);
        let mut v = Validator::new(true);
        let options = OpenOptions {
            lenient: false,
            ..options
        };
        let vhd = open_inner(storage, path, options, &mut v);
        v.summarize();
        let vhd = match vhd {
            Ok(vhd) => Some(vhd),
            Err(e) => {
                // Errors raised outside the validator (I/O) are recorded here.
                if !v.stopped {
                    v.problems.push(Problem {
                        code: pc::IO,
                        level: ProblemLevel::Fatal,
                        structure: "file".into(),
                        offset: None,
                        block: None,
                        message: e.to_string(),
                    });
                }
                None
            }
        };
        Inspection {
            vhd,
            problems: v.problems,
            dropped_entries: v.dropped,
            batmap: v.batmap,
            file_len,
        }
    }
}

struct FooterCandidate {
    offset: u64,
    source: FooterSource,
    raw: [u8; FOOTER_SIZE],
    result: Result<Footer>,
}

fn read_footer_at(
    storage: &dyn Storage,
    offset: u64,
    len: usize,
    source: FooterSource,
) -> FooterCandidate {
    let mut buf = [0u8; FOOTER_SIZE];
    let result = match storage.read_at(&mut buf[..len], offset) {
        Ok(()) => Footer::parse(&buf),
        Err(e) => Err(Error::io(format!("reading footer at offset {offset}"), e)),
    };
    FooterCandidate {
        offset,
        source,
        raw: buf,
        result,
    }
}

/// The footers a file of `len` bytes (at least [`FOOTER_SIZE`]) may go by, in order of
/// preference (§1.2): the last 512 bytes, a 511-byte footer when the length says one may be
/// there, and the offset-0 copy when it parses as a sparse disk's (a fixed disk's sector 0 is
/// data). The one rule both [`Vhd::open`] and [`peek`] use.
fn footer_candidates(storage: &dyn Storage, len: u64) -> Vec<FooterCandidate> {
    let mut candidates = vec![read_footer_at(storage, len - 512, 512, FooterSource::End)];
    if len > 511 && (len - 511).is_multiple_of(512) {
        candidates.push(read_footer_at(storage, len - 511, 511, FooterSource::Short));
    }
    if len >= 512 + FOOTER_SIZE as u64 {
        let copy = read_footer_at(storage, 0, 512, FooterSource::Copy);
        if copy.result.as_ref().is_ok_and(|f| f.disk_type.is_sparse()) {
            candidates.push(copy);
        }
    }
    candidates
}

/// The candidate a strict reader goes by: the first whose checksum is right.
fn first_checked(candidates: &[FooterCandidate]) -> Option<usize> {
    candidates
        .iter()
        .position(|c| c.result.as_ref().is_ok_and(Footer::checksum_ok))
}

fn open_inner(
    storage: Box<dyn Storage>,
    path: PathBuf,
    options: OpenOptions,
    v: &mut Validator,
) -> Result<Vhd> {
    let io_err = |what: &str, e| Error::io(format!("{}: {what}", path.display()), e);
    let len = storage.len().map_err(|e| io_err("reading length", e))?;
    if len < FOOTER_SIZE as u64 {
        return Err(v.stop(
            pc::NOT_A_VHD,
            "file",
            None,
            Error::format(format!(
                "file is {len} bytes, smaller than a VHD footer (512)"
            )),
        ));
    }

    let mut signature = [0u8; 8];
    if storage.read_at(&mut signature, 0).is_ok() && &signature == b"vhdxfile" {
        // A VHDX, not a damaged VHD: say so (every command opens through here).
        return Err(v.stop(
            pc::NOT_A_VHD,
            "file",
            Some(0),
            crate::layer::vhdx_not_supported(&path),
        ));
    }
    let mut candidates = footer_candidates(storage.as_ref(), len);
    let good = first_checked(&candidates);
    let chosen = match good {
        Some(i) => i,
        None => {
            let parsed = candidates.iter().position(|c| c.result.is_ok());
            match parsed {
                Some(i) => {
                    let c = &candidates[i];
                    let f = c.result.as_ref().ok();
                    let (offset, stored, computed) = (
                        c.offset,
                        f.map_or(0, |f| f.checksum),
                        f.map_or(0, Footer::computed_checksum),
                    );
                    if options.lenient {
                        v.warn(
                            pc::FOOTER_CHECKSUM,
                            "footer",
                            Some(offset),
                            format!(
                                "footer checksum mismatch at offset {offset} (stored {stored:#010x}, computed {computed:#010x}); accepted because reading leniently"
                            ),
                        );
                    } else {
                        v.error(
                            pc::FOOTER_CHECKSUM,
                            "footer",
                            Some(offset),
                            None,
                            Error::Checksum {
                                path: None,
                                structure: "footer",
                                offset,
                                stored,
                                computed,
                            },
                        )?;
                    }
                    i
                }
                None => {
                    let why = match &candidates[0].result {
                        Err(Error::Format { detail, .. }) => detail.clone(),
                        Err(e) => e.to_string(),
                        Ok(_) => String::new(),
                    };
                    return Err(v.stop(
                        pc::NOT_A_VHD,
                        "footer",
                        Some(len - 512),
                        Error::format(format!(
                            "not a VHD: {why} at offset {} (end of file), and no valid copy at offset 0",
                            len - 512
                        )),
                    ));
                }
            }
        }
    };
    let FooterCandidate {
        offset: chosen_offset,
        source: footer_source,
        raw: chosen_raw,
        result,
    } = candidates.swap_remove(chosen);
    let footer = result?;
    match footer_source {
        FooterSource::End => {}
        FooterSource::Short => v.warn(
            pc::FOOTER_SHORT,
            "footer",
            Some(chosen_offset),
            format!(
                "511-byte footer at offset {chosen_offset} (written by a product older than Virtual PC 2004)"
            ),
        ),
        FooterSource::Copy => v.warn(
            pc::FOOTER_END_BAD,
            "footer",
            Some(len - 512),
            format!(
                "end footer missing or damaged at offset {}; using the copy at offset 0",
                len - 512
            ),
        ),
    }

    match footer.disk_type {
        DiskType::Fixed | DiskType::Dynamic | DiskType::Differencing => {}
        DiskType::Other(t) => {
            return Err(v.stop(
                pc::FOOTER_FIELD,
                "footer",
                Some(chosen_offset),
                Error::not_supported(format!(
                    "disk type {t} is not supported (fixed 2, dynamic 3 and differencing 4 are)"
                )),
            ));
        }
    }
    if footer.format_version >> 16 != 1 {
        return Err(v.stop(
            pc::FOOTER_FIELD,
            "footer",
            Some(chosen_offset),
            Error::not_supported(format!(
                "footer File Format Version {:#010x} is not 1.x",
                footer.format_version
            )),
        ));
    }
    if footer.features & footer::FEATURE_RESERVED == 0 {
        v.warn(
            pc::FOOTER_ODD,
            "footer",
            Some(chosen_offset),
            format!(
                "footer Features {:#x} lacks the reserved bit 0x2",
                footer.features
            ),
        );
    }
    if footer.saved_state != 0 {
        v.warn(
            pc::FOOTER_ODD,
            "footer",
            Some(chosen_offset),
            "footer Saved State is set: a virtual machine saved its state with this disk attached"
                .into(),
        );
    }
    if footer.current_size % SECTOR_SIZE != 0 {
        return Err(v.stop(
            pc::FOOTER_FIELD,
            "footer",
            Some(chosen_offset),
            Error::format(format!(
                "footer Current Size {} is not a multiple of 512",
                footer.current_size
            )),
        ));
    }
    if footer.disk_type.is_sparse() && footer_source != FooterSource::Copy {
        // Byte for byte: a copy whose only difference is its checksum is damaged too (§7.2).
        let copy = read_footer_at(storage.as_ref(), 0, 512, FooterSource::Copy);
        match copy.result {
            Ok(c) if copy.raw == chosen_raw || (footer_source == FooterSource::Short && c.to_bytes() == footer.to_bytes()) => {}
            Ok(c) if !c.checksum_ok() => v.warn(
                pc::FOOTER_COPY_BAD,
                "footer copy",
                Some(0),
                format!(
                    "footer copy at offset 0 has a bad checksum (stored {:#010x}, computed {:#010x})",
                    c.checksum,
                    c.computed_checksum()
                ),
            ),
            Ok(_) => v.warn(
                pc::FOOTER_COPY_DIFFERS,
                "footer copy",
                Some(0),
                "footer copy at offset 0 differs from the end footer".into(),
            ),
            Err(_) => v.warn(
                pc::FOOTER_COPY_BAD,
                "footer copy",
                Some(0),
                "footer copy at offset 0 is missing or damaged".into(),
            ),
        }
    }
    if footer.disk_type == DiskType::Fixed && footer.data_offset != footer::NO_DATA_OFFSET {
        v.info(
            pc::FOOTER_ODD,
            "footer",
            Some(chosen_offset),
            format!(
                "fixed disk footer Data Offset is {:#x}, expected all ones",
                footer.data_offset
            ),
        );
    }

    let footer_offset = match footer_source {
        FooterSource::End => len - 512,
        FooterSource::Short => len - 511,
        FooterSource::Copy => len - 512,
    };

    let (virtual_size, size_source) = virtual_size(&footer, options.size_rule);
    if size_source == SizeSource::Chs {
        v.warn(
            pc::SIZE_CHS,
            "footer",
            Some(chosen_offset),
            format!(
                "virtual size is the CHS size {virtual_size} (creator {:?}), not Current Size {}",
                footer.creator_application_str(),
                footer.current_size
            ),
        );
    } else {
        // Only worth a note when another reader could decide otherwise: QEMU's rule trusts
        // Current Size for a few creators only (§1.5).
        let chs = footer.geometry.size();
        if chs != footer.current_size && !footer.current_size_is_authoritative() {
            v.info(
                pc::SIZE_CHS,
                "footer",
                Some(chosen_offset),
                format!(
                    "geometry {}/{}/{} addresses {chs} bytes, Current Size is {} (creator {:?}); the virtual size is Current Size, but readers that follow QEMU's rule see the CHS size",
                    footer.geometry.cylinders,
                    footer.geometry.heads,
                    footer.geometry.sectors_per_track,
                    footer.current_size,
                    footer.creator_application_str()
                ),
            );
        }
    }

    let mut vhd = Vhd {
        storage,
        path: path.clone(),
        footer_source,
        footer_offset,
        original_footer_offset: footer_offset,
        header: None,
        bat: Table::Dense(Bat::default()),
        virtual_size,
        size_source,
        warnings: Vec::new(),
        writable: options.writable,
        next_free: 0,
        known_zero: 0..0,
        pending: Pending::default(),
        scratch: Vec::new(),
        unflushed: 0..0,
        sync_failed: std::sync::atomic::AtomicBool::new(false),
        footer,
    };

    if vhd.footer.disk_type == DiskType::Fixed {
        let data_end = vhd.footer.current_size;
        if data_end > footer_offset {
            return Err(v.stop(
                pc::FIXED_TRUNCATED,
                "file",
                Some(footer_offset),
                Error::format(format!(
                    "fixed disk truncated: Current Size is {data_end} bytes but the footer is at offset {footer_offset}"
                )),
            ));
        }
        if data_end < footer_offset {
            v.warn(
                pc::FIXED_GAP,
                "file",
                Some(data_end),
                format!(
                    "{} bytes between the end of data ({data_end}) and the footer",
                    footer_offset - data_end
                ),
            );
        }
        vhd.next_free = footer_offset;
        vhd.warnings = v.warnings();
        return Ok(vhd);
    }

    open_sparse(&mut vhd, len, options, v)?;
    vhd.warnings = v.warnings();
    Ok(vhd)
}

fn virtual_size(footer: &Footer, rule: SizeRule) -> (u64, SizeSource) {
    let chs = footer.geometry.size().min(footer.current_size);
    let use_chs = match rule {
        SizeRule::CurrentSize => false,
        SizeRule::Chs => true,
        SizeRule::Auto => footer.is_virtual_pc() && !footer.current_size_is_authoritative(),
    };
    if use_chs && chs != footer.current_size {
        (chs, SizeSource::Chs)
    } else {
        (footer.current_size, SizeSource::CurrentSize)
    }
}

/// Tags of the metadata extents in the overlap sweep (blocks use their index).
const TAG_FOOTER_COPY: i64 = -1;
const TAG_HEADER: i64 = -2;
const TAG_BAT: i64 = -3;
const TAG_BATMAP_HEADER: i64 = -4;
const TAG_BATMAP: i64 = -5;
const TAG_FOOTER_END: i64 = -6;

fn extent_name(tag: i64) -> String {
    match tag {
        TAG_FOOTER_COPY => "the footer copy at offset 0".to_string(),
        TAG_HEADER => "the dynamic header".to_string(),
        TAG_BAT => "the BAT".to_string(),
        TAG_BATMAP_HEADER => "the batmap header".to_string(),
        TAG_BATMAP => "the batmap".to_string(),
        TAG_FOOTER_END => "the end footer".to_string(),
        i => format!("block {i}"),
    }
}

/// blktap's batmap (§3.3): a `tdbatmap` header right after the padded BAT in files whose
/// creator is `tap`. Returns the extents it occupies when it is present and sane.
fn read_batmap(
    vhd: &Vhd,
    h: &DynamicHeader,
    len: u64,
    v: &mut Validator,
) -> Result<Option<Batmap>> {
    if &vhd.footer.creator_application[..3] != b"tap" {
        return Ok(None);
    }
    let at = h.table_offset + bat::table_bytes(h.max_table_entries);
    if at.checked_add(SECTOR_SIZE).is_none_or(|e| e > len) {
        return Ok(None);
    }
    let mut b = [0u8; 29];
    vhd.read_raw(&mut b, at)?;
    if b[0..8] != BATMAP_COOKIE {
        return Ok(None);
    }
    let be64 = |s: &[u8]| s.iter().fold(0u64, |a, &x| (a << 8) | u64::from(x));
    let bm = Batmap {
        header_offset: at,
        map_offset: be64(&b[8..16]),
        map_sectors: be64(&b[16..20]) as u32,
        version: be64(&b[20..24]) as u32,
        checksum: be64(&b[24..28]) as u32,
    };
    let need = u64::from(h.max_table_entries).div_ceil(8);
    let map_end = bm.map_offset.checked_add(bm.map_bytes());
    if !bm.map_offset.is_multiple_of(SECTOR_SIZE)
        || bm.map_offset < at + SECTOR_SIZE && bm.map_offset + bm.map_bytes() > at
        || map_end.is_none_or(|e| e > len)
        || bm.map_bytes() < need
    {
        v.warn(
            pc::BATMAP,
            "batmap",
            Some(at),
            format!(
                "batmap header at offset {at} describes a map of {} sectors at offset {:#x} that is misplaced or too small for {} blocks; the batmap is ignored",
                bm.map_sectors, bm.map_offset, h.max_table_entries
            ),
        );
        return Ok(None);
    }
    Ok(Some(bm))
}

fn open_sparse(vhd: &mut Vhd, len: u64, options: OpenOptions, v: &mut Validator) -> Result<()> {
    let header_offset = vhd.footer.data_offset;
    let header_end = header_offset.checked_add(HEADER_SIZE as u64);
    if header_offset < FOOTER_SIZE as u64 || header_end.is_none_or(|e| e > len) {
        return Err(v.stop(
            pc::HEADER_OFFSET,
            "footer",
            None,
            Error::format(format!(
                "footer Data Offset {header_offset:#x} does not point to a dynamic header inside the file ({len} bytes)"
            )),
        ));
    }
    let hs = "dynamic header";
    let ho = Some(header_offset);
    // Metadata must end before the end footer in use: a table that runs into the footer would
    // destroy it on the first BAT update (found by fuzzing).
    let meta_limit = if vhd.footer_source == FooterSource::Copy {
        len
    } else {
        vhd.footer_offset
    };
    if header_offset + HEADER_SIZE as u64 > meta_limit {
        return Err(v.stop(
            pc::HEADER_OFFSET,
            hs,
            ho,
            Error::format(format!(
                "dynamic header at offset {header_offset:#x} (1024 bytes) overlaps the end footer at offset {meta_limit:#x}"
            )),
        ));
    }
    if !header_offset.is_multiple_of(SECTOR_SIZE) {
        v.warn(
            pc::HEADER_ODD,
            hs,
            ho,
            format!("dynamic header at offset {header_offset} is not sector aligned"),
        );
    }
    let mut hb = [0u8; HEADER_SIZE];
    vhd.read_raw(&mut hb, header_offset)?;
    let h = match DynamicHeader::parse(&hb) {
        Ok(h) => h,
        Err(e) => {
            let e = match e {
                Error::Format { detail, .. } => {
                    Error::format(format!("{detail} at offset {header_offset}"))
                }
                e => e,
            };
            return Err(v.stop(pc::HEADER_COOKIE, hs, ho, e));
        }
    };
    if !h.checksum_ok() {
        if options.lenient {
            v.warn(
                pc::HEADER_CHECKSUM,
                hs,
                ho,
                format!(
                    "dynamic header checksum mismatch at offset {header_offset} (stored {:#010x}, computed {:#010x}); accepted because reading leniently",
                    h.checksum,
                    h.computed_checksum()
                ),
            );
        } else {
            v.error(
                pc::HEADER_CHECKSUM,
                hs,
                ho,
                None,
                Error::Checksum {
                    path: None,
                    structure: "dynamic header",
                    offset: header_offset,
                    stored: h.checksum,
                    computed: h.computed_checksum(),
                },
            )?;
        }
    }
    if h.header_version >> 16 != 1 {
        return Err(v.stop(
            pc::HEADER_FIELD,
            hs,
            ho,
            Error::not_supported(format!(
                "dynamic header version {:#010x} is not 1.x",
                h.header_version
            )),
        ));
    }
    if h.data_offset != header::NO_NEXT {
        v.warn(
            pc::HEADER_ODD,
            hs,
            ho,
            format!(
                "dynamic header Data Offset is {:#x}, expected all ones",
                h.data_offset
            ),
        );
    }
    let bs = h.block_size;
    if bs < 512 || !bs.is_power_of_two() {
        return Err(v.stop(
            pc::HEADER_FIELD,
            hs,
            ho,
            Error::format(format!(
                "dynamic header Block Size {bs} is not a power of two of at least 512"
            )),
        ));
    }
    if bs > MAX_BLOCK_SIZE {
        return Err(v.stop(
            pc::HEADER_FIELD,
            hs,
            ho,
            Error::not_supported(format!(
                "dynamic header Block Size {bs} is larger than the {MAX_BLOCK_SIZE} bytes supported"
            )),
        ));
    }
    let bs64 = u64::from(bs);
    let mte = u64::from(h.max_table_entries);
    if mte * bs64 < vhd.footer.current_size {
        return Err(v.stop(
            pc::HEADER_FIELD,
            hs,
            ho,
            Error::format(format!(
                "dynamic header Max Table Entries {mte} x Block Size {bs} covers {} bytes, less than Current Size {}",
                mte * bs64,
                vhd.footer.current_size
            )),
        ));
    }
    let needed = vhd.footer.current_size.div_ceil(bs64);
    if mte > needed {
        v.info(
            pc::BAT_LARGER,
            "BAT",
            Some(h.table_offset),
            format!(
                "Max Table Entries {mte} is more than the {needed} blocks Current Size needs; the extra entries are ignored"
            ),
        );
    }
    let table_len = bat::table_bytes(h.max_table_entries);
    let table_end = h.table_offset.checked_add(mte * 4);
    if table_end.is_none_or(|e| e > len) {
        return Err(v.stop(
            pc::BAT_PLACEMENT,
            "BAT",
            Some(h.table_offset),
            Error::format(format!(
                "BAT at offset {:#x} with {mte} entries ({} bytes) runs past the end of the file ({len} bytes)",
                h.table_offset,
                mte * 4
            )),
        ));
    }
    if mte > u64::from(MAX_TABLE_ENTRIES) {
        return Err(v.stop(
            pc::BAT_TOO_LARGE,
            hs,
            ho,
            Error::not_supported(format!(
                "dynamic header Max Table Entries {mte} is more than the {MAX_TABLE_ENTRIES} BAT entries supported (a {} MiB table); the table is not read",
                (u64::from(MAX_TABLE_ENTRIES) * 4) >> 20
            )),
        ));
    }
    // The padding counts: BAT updates write whole sectors.
    if h.table_offset.saturating_add(table_len) > meta_limit {
        return Err(v.stop(
            pc::BAT_PLACEMENT,
            "BAT",
            Some(h.table_offset),
            Error::format(format!(
                "BAT at offset {:#x} with {mte} entries ({table_len} bytes padded to a sector) overlaps the end footer at offset {meta_limit:#x}",
                h.table_offset,
            )),
        ));
    }
    if h.table_offset % SECTOR_SIZE != 0 {
        v.warn(
            pc::HEADER_ODD,
            "BAT",
            Some(h.table_offset),
            format!("BAT at offset {} is not sector aligned", h.table_offset),
        );
    }
    let overlaps = |a: u64, alen: u64, b: u64, blen: u64| a < b + blen && b < a + alen;
    if overlaps(h.table_offset, mte * 4, header_offset, HEADER_SIZE as u64)
        || overlaps(h.table_offset, mte * 4, 0, FOOTER_SIZE as u64)
    {
        return Err(v.stop(
            pc::BAT_PLACEMENT,
            "BAT",
            Some(h.table_offset),
            Error::format(format!(
                "BAT at offset {:#x} overlaps the footer copy or the dynamic header",
                h.table_offset
            )),
        ));
    }
    let mut bat = read_bat(vhd, h.table_offset, h.max_table_entries)?;
    let batmap = read_batmap(vhd, &h, len, v)?;

    let data_limit = if vhd.footer_source == FooterSource::Copy {
        len
    } else {
        vhd.footer_offset
    };
    let mut next_free = metadata_end(header_offset, &h, len);
    let mut ex = sweep::Extents {
        meta: metadata_extents(vhd, &h, len, batmap.as_ref()),
        blocks: Vec::new(),
        stride: h.bitmap_bytes() + bs64,
    };
    if let Some(bm) = &batmap {
        next_free = next_free
            .max(bm.header_offset + SECTOR_SIZE)
            .max(bm.map_offset + bm.map_bytes());
    }
    let mut gone = blocks_inside(&bat, &mut ex, data_limit, v)?;
    let mut reasons: HashMap<usize, String> = HashMap::new();
    gone.union(&ex.sweep(bat.entries.len(), |o| note_overlap(o, &mut reasons, v))?);
    // The end of everything inside the file (dropped blocks included, so that nothing is later
    // allocated over data someone may still want to salvage), then the blocks that stay.
    for (b, blen, _) in ex.iter() {
        if b + blen <= data_limit {
            next_free = next_free.max(b + blen);
        }
    }
    ex.retain(&gone);
    drop_entries(&mut bat, &gone, reasons, (ex.stride, data_limit), v);
    check_locators(&h, &ex, len, v);
    drop(ex);
    if vhd.footer.disk_type == DiskType::Dynamic && !h.parent_unique_id.is_nil() {
        v.warn(
            pc::HEADER_ODD,
            hs,
            ho,
            "dynamic disk has a non-zero Parent Unique Id; it is ignored".into(),
        );
    }
    if vhd.footer_source == FooterSource::Copy {
        vhd.footer_offset = next_free.max(len.saturating_sub(FOOTER_SIZE as u64));
    }
    vhd.next_free = next_free;
    vhd.header = Some(h);
    vhd.bat = Table::new(bat, options.writable);
    v.batmap = batmap;
    Ok(())
}

/// The metadata extents of the overlap sweep: the footer copy, the header, the BAT (padded),
/// the end footer in use (with whatever follows it) and the batmap.
fn metadata_extents(
    vhd: &Vhd,
    h: &DynamicHeader,
    len: u64,
    batmap: Option<&Batmap>,
) -> Vec<sweep::Meta> {
    let table_len = bat::table_bytes(h.max_table_entries);
    let mut meta = vec![
        (0, FOOTER_SIZE as u64, TAG_FOOTER_COPY),
        (vhd.footer.data_offset, HEADER_SIZE as u64, TAG_HEADER),
        (h.table_offset, table_len.max(4), TAG_BAT),
    ];
    if vhd.footer_source != FooterSource::Copy {
        // Blocks are kept before it by the end of data; this catches the batmap and locators.
        meta.push((vhd.footer_offset, len - vhd.footer_offset, TAG_FOOTER_END));
    }
    if let Some(bm) = batmap {
        meta.push((bm.header_offset, SECTOR_SIZE, TAG_BATMAP_HEADER));
        meta.push((bm.map_offset, bm.map_bytes(), TAG_BATMAP));
    }
    meta
}

/// Put the allocated blocks that end inside the data (before `data_limit`) into `ex`, and
/// return the others (each a problem) as the first blocks to drop.
fn blocks_inside(
    bat: &Bat,
    ex: &mut sweep::Extents,
    data_limit: u64,
    v: &mut Validator,
) -> Result<sweep::Bits> {
    let mut outside = sweep::Bits::new(bat.entries.len());
    let n = bat.allocated();
    ex.blocks
        .try_reserve_exact(n)
        .map_err(|_| Error::io("validating the BAT", std::io::ErrorKind::OutOfMemory.into()))?;
    for (i, &e) in bat.entries.iter().enumerate() {
        if e == bat::UNUSED {
            continue;
        }
        let start = u64::from(e) * SECTOR_SIZE;
        let end = start + ex.stride;
        if end > data_limit {
            v.error(
                pc::BAT_ENTRY_OUTSIDE,
                &format!("block {i}"),
                Some(start),
                Some(i as u64),
                Error::format(format!(
                    "BAT entry {i} points to offset {start:#x}; the block ends at {end:#x}, past the end of data at {data_limit:#x}"
                )),
            )?;
            outside.set(i);
            continue;
        }
        // A table has at most MAX_TABLE_ENTRIES entries, so the index fits.
        ex.blocks.push(sweep::Block {
            sector: e,
            index: i as u32,
        });
    }
    Ok(outside)
}

/// One overlap the sweep found: a problem naming both extents, and the first reason for
/// each block in it (bounded like the problems; past it, a generic reason is given). Two
/// metadata structures overlapping stop validation: no block to drop, nothing to go on with.
fn note_overlap(
    o: sweep::Overlap,
    reasons: &mut HashMap<usize, String>,
    v: &mut Validator,
) -> Result<()> {
    let ((a, at), (b, bt)) = (o.first, o.second);
    let block = if bt >= 0 { bt } else { at };
    let message = format!(
        "{} (offset {a:#x}) overlaps {} (offset {b:#x})",
        extent_name(at),
        extent_name(bt)
    );
    if block < 0 {
        return Err(v.stop(
            pc::METADATA_OVERLAP,
            &extent_name(at),
            Some(b),
            Error::format(message),
        ));
    }
    v.error(
        pc::BLOCK_OVERLAP,
        &extent_name(block),
        Some(b),
        u64::try_from(block).ok(),
        Error::format(message.clone()),
    )?;
    for t in [at, bt] {
        if let Ok(t) = usize::try_from(t)
            && reasons.len() < 10 * MAX_PROBLEMS_PER_CODE
        {
            reasons.entry(t).or_insert_with(|| message.clone());
        }
    }
    Ok(())
}

/// Mark the blocks in `gone` unused in `bat`, each recorded as a dropped entry with its
/// reason. `(stride, data_limit)` tell a block past the end of data from an overlapping one.
fn drop_entries(
    bat: &mut Bat,
    gone: &sweep::Bits,
    mut reasons: HashMap<usize, String>,
    (stride, data_limit): (u64, u64),
    v: &mut Validator,
) {
    for (i, e) in bat.entries.iter_mut().enumerate() {
        if !gone.get(i) {
            continue;
        }
        let start = u64::from(*e) * SECTOR_SIZE;
        // Specific reasons for the first entries; past them (a hostile table), a shared
        // static one, so that a million dropped entries cost no million strings.
        let specific = v.dropped.len() < 10 * MAX_PROBLEMS_PER_CODE;
        let outside = start + stride > data_limit;
        let reason: Cow<'static, str> = match reasons.remove(&i) {
            Some(r) => r.into(),
            None if outside && specific => format!(
                "BAT entry {i} points to offset {start:#x}; the block ends at {:#x}, past the end of data at {data_limit:#x}",
                start + stride
            )
            .into(),
            None if outside => "the block ends past the end of data".into(),
            None if specific => {
                format!("block {i} at offset {start:#x} overlaps another block or the metadata")
                    .into()
            }
            None => "the block overlaps another block or the metadata".into(),
        };
        v.dropped.push(DroppedEntry {
            block: i as u64,
            entry: *e,
            reason,
        });
        *e = bat::UNUSED;
    }
}

/// Parent locator data must lie inside the file and clear of the other extents (which no
/// longer overlap each other): warnings only.
fn check_locators(h: &DynamicHeader, ex: &sweep::Extents, len: u64, v: &mut Validator) {
    for (i, loc) in h.locators.iter().enumerate() {
        if loc.is_empty() {
            continue;
        }
        let ls = format!("locator {i}");
        let end = loc.data_offset.saturating_add(u64::from(loc.data_length));
        if end > len {
            v.warn(
                pc::LOCATOR_OUTSIDE,
                &ls,
                Some(loc.data_offset),
                format!(
                    "parent locator {i} ({}) data at offset {:#x} + {} bytes lies outside the file",
                    loc.platform_code.name(),
                    loc.data_offset,
                    loc.data_length
                ),
            );
            continue;
        }
        if let Some((_, tag)) = ex.first_overlapping(loc.data_offset, end) {
            v.warn(
                pc::LOCATOR_OVERLAP,
                &ls,
                Some(loc.data_offset),
                format!(
                    "parent locator {i} ({}) data at offset {:#x} overlaps {}",
                    loc.platform_code.name(),
                    loc.data_offset,
                    extent_name(tag)
                ),
            );
        }
    }
}

/// Read `entries` BAT entries at `offset` (at most [`MAX_TABLE_ENTRIES`], checked against the
/// file length by the caller) in chunks of [`BAT_READ_CHUNK`] bytes.
fn read_bat(vhd: &Vhd, offset: u64, entries: u32) -> Result<Bat> {
    let n = entries.min(MAX_TABLE_ENTRIES) as usize;
    let mut table = Vec::new();
    table.try_reserve_exact(n).map_err(|_| {
        Error::io(
            format!("{}: reading the BAT", vhd.path.display()),
            std::io::ErrorKind::OutOfMemory.into(),
        )
    })?;
    let mut buf = vec![0u8; BAT_READ_CHUNK.min(n * 4)];
    let mut at = offset;
    while table.len() < n {
        let take = ((n - table.len()) * 4).min(buf.len());
        let chunk = &mut buf[..take];
        vhd.read_raw(chunk, at)?;
        let part = Bat::parse(chunk, (take / 4) as u32)?;
        table.extend_from_slice(&part.entries);
        at += take as u64;
    }
    Ok(Bat { entries: table })
}

/// A BAT as held in memory by a [`Vhd`].
///
/// A 2 TiB disk has a 4 MiB table; a chain of 32 such layers would hold 128 MiB of tables
/// that are almost all "unallocated" in the sparse disks merges usually meet. So a read-only
/// file whose table is less than half allocated keeps only its allocated entries, sorted by
/// block index: memory is then 8 bytes per allocated block (4 MiB per TiB of data at 2 MiB
/// blocks), whatever the virtual size. Writable files keep the full table, which block
/// allocation and [`Vhd::commit`] update and write back sector by sector.
#[derive(Debug)]
enum Table {
    /// Every entry.
    Dense(Bat),
    /// Only the allocated entries.
    Sparse {
        /// Number of entries of the full table.
        len: usize,
        /// (block index, BAT entry) of the allocated entries, by increasing block index.
        allocated: Vec<(u32, u32)>,
        /// The full table, built on demand for [`Vhd::bat`].
        dense: std::sync::OnceLock<Bat>,
    },
}

impl Table {
    fn new(bat: Bat, writable: bool) -> Table {
        let n = bat.allocated();
        if writable || n >= bat.entries.len() / 2 {
            return Table::Dense(bat);
        }
        let allocated = bat
            .entries
            .iter()
            .enumerate()
            .filter(|(_, e)| **e != bat::UNUSED)
            // A table has at most u32::MAX entries (Max Table Entries is a u32).
            .map(|(i, &e)| (i as u32, e))
            .collect();
        Table::Sparse {
            len: bat.entries.len(),
            allocated,
            dense: std::sync::OnceLock::new(),
        }
    }

    fn get(&self, index: u64) -> Option<u64> {
        match self {
            Table::Dense(b) => b.block_offset(index),
            Table::Sparse { allocated, .. } => {
                let i = u32::try_from(index).ok()?;
                let k = allocated.binary_search_by_key(&i, |&(b, _)| b).ok()?;
                allocated.get(k).map(|&(_, e)| u64::from(e) * SECTOR_SIZE)
            }
        }
    }

    fn allocated(&self) -> usize {
        match self {
            Table::Dense(b) => b.allocated(),
            Table::Sparse { allocated, .. } => allocated.len(),
        }
    }

    fn allocated_entries(&self) -> Box<dyn Iterator<Item = (u64, u64)> + '_> {
        let to = |i: usize, e: u32| (i as u64, u64::from(e) * SECTOR_SIZE);
        match self {
            Table::Dense(b) => Box::new(
                b.entries
                    .iter()
                    .enumerate()
                    .filter(|(_, e)| **e != bat::UNUSED)
                    .map(move |(i, &e)| to(i, e)),
            ),
            Table::Sparse { allocated, .. } => {
                Box::new(allocated.iter().map(move |&(i, e)| to(i as usize, e)))
            }
        }
    }

    fn expand(len: usize, allocated: &[(u32, u32)]) -> Bat {
        let mut entries = vec![bat::UNUSED; len];
        for &(i, e) in allocated {
            if let Some(slot) = entries.get_mut(i as usize) {
                *slot = e;
            }
        }
        Bat { entries }
    }

    fn dense(&self) -> &Bat {
        match self {
            Table::Dense(b) => b,
            Table::Sparse {
                len,
                allocated,
                dense,
            } => dense.get_or_init(|| Table::expand(*len, allocated)),
        }
    }

    /// The full table for updating, building it first if only the allocated entries were
    /// kept (`None` cannot happen: the table is full once built).
    fn dense_mut(&mut self) -> Option<&mut Bat> {
        if let Table::Sparse {
            len,
            allocated,
            dense,
        } = self
        {
            let b = dense
                .take()
                .unwrap_or_else(|| Table::expand(*len, allocated));
            *self = Table::Dense(b);
        }
        match self {
            Table::Dense(b) => Some(b),
            Table::Sparse { .. } => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sparse_table_answers_like_the_full_one() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d.vhd");
        let mut v =
            crate::create::create_dynamic(&p, 64 << 20, &crate::create::CreateOptions::default())
                .unwrap();
        for b in [0u64, 5, 6, 31] {
            v.write_at(b * (2 << 20) + 512, &[7; 512]).unwrap();
        }
        drop(v);
        let ro = Vhd::open(&p, OpenOptions::read_only()).unwrap();
        let rw = Vhd::open(&p, OpenOptions::writable()).unwrap();
        assert!(matches!(ro.bat, Table::Sparse { .. }), "4 of 32 allocated");
        assert!(
            matches!(rw.bat, Table::Dense(_)),
            "writable files keep every entry"
        );
        for i in 0..40 {
            assert_eq!(ro.block_offset(i), rw.bat().block_offset(i), "block {i}");
        }
        let entries: Vec<(u64, u64)> = ro.allocated_entries().collect();
        assert_eq!(entries, rw.allocated_entries().collect::<Vec<_>>());
        assert_eq!(
            entries.iter().map(|e| e.0).collect::<Vec<_>>(),
            [0, 5, 6, 31]
        );
        assert_eq!(ro.allocated_blocks(), 4);
        assert_eq!(ro.bat(), rw.bat());

        let mut t = Table::new(rw.bat().clone(), false);
        assert!(matches!(t, Table::Sparse { .. }));
        let b = t.dense_mut().unwrap();
        b.entries[1] = 99;
        assert_eq!(t.get(1), Some(99 * 512));
        assert_eq!(t.get(5), rw.block_offset(5));
        assert_eq!(t.allocated(), 5);
    }

    #[test]
    fn peek_reads_footers_and_the_parent_id_without_validating() {
        use crate::create::{CreateOptions, create_differencing, create_dynamic, create_fixed};
        let dir = tempfile::tempdir().unwrap();
        let opts = CreateOptions::default();
        let base = dir.path().join("base.vhd");
        let base_id = create_dynamic(&base, 4 << 20, &opts).unwrap().unique_id();
        let child = dir.path().join("child.vhd");
        let child_id = create_differencing(&child, &base, &opts)
            .unwrap()
            .unique_id();
        let fixed = dir.path().join("fixed.vhd");
        let fixed_id = create_fixed(&fixed, 1 << 20, &opts).unwrap().unique_id();
        let flip = |p: &Path, at: usize| {
            let mut b = std::fs::read(p).unwrap();
            b[at] ^= 0xFF;
            std::fs::write(p, b).unwrap();
        };
        let len = |p: &Path| std::fs::metadata(p).unwrap().len() as usize;

        let p = peek(&base).unwrap();
        assert_eq!(p.footer().unwrap().unique_id, base_id);
        assert!(p.footers.len() == 2 && p.carries_id(base_id));
        assert_eq!(p.parent_unique_id, None);
        let p = peek(&child).unwrap();
        assert_eq!(p.footer().unwrap().disk_type, DiskType::Differencing);
        assert_eq!(p.parent_unique_id, Some(base_id));
        let p = peek(&fixed).unwrap();
        assert_eq!(p.footer().unwrap().unique_id, fixed_id);
        assert_eq!(p.footers.len(), 1);

        // A bad end footer checksum: a sparse disk goes by its copy, both still carry the id.
        // The fixed disk's data starts with a copy of its footer (a disk holding a VHD image):
        // a fixed disk has no offset-0 copy, so that is data, not a footer to go by.
        let mut data = std::fs::read(&fixed).unwrap();
        let end = data.len() - 512;
        data.copy_within(end.., 0);
        std::fs::write(&fixed, data).unwrap();
        for path in [&child, &fixed] {
            flip(path, len(path) - 512 + 64);
        }
        let p = peek(&child).unwrap();
        assert_eq!(p.footer().unwrap().unique_id, child_id);
        assert!(!p.footers[0].checksum_ok());
        assert_eq!(p.parent_unique_id, Some(base_id));
        let header_at = p.footer().unwrap().data_offset as usize;
        let p = peek(&fixed).unwrap();
        assert!(p.sector0.as_ref().unwrap().checksum_ok());
        assert!(p.footer().is_none(), "a fixed disk has no copy to go by");
        assert!(p.carries_id(fixed_id));

        // A 511-byte footer (a fixed disk's, truncated by its last byte): found, as open finds it.
        let short = dir.path().join("short.vhd");
        let short_id = create_fixed(&short, 1 << 20, &opts).unwrap().unique_id();
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&short)
            .unwrap();
        f.set_len(len(&short) as u64 - 1).unwrap();
        let p = peek(&short).unwrap();
        assert_eq!(p.footer().unwrap().unique_id, short_id);
        assert!(p.carries_id(short_id));

        // A damaged header (a byte of the parent id flipped): no parent id.
        flip(&child, header_at + 40);
        assert_eq!(peek(&child).unwrap().parent_unique_id, None);

        // Not a regular file of at least a footer.
        let tiny = dir.path().join("tiny");
        std::fs::write(&tiny, [0u8; 511]).unwrap();
        assert!(peek(&tiny).is_none());
        assert!(peek(dir.path()).is_none());
        assert!(peek(&dir.path().join("absent")).is_none());
        let junk = dir.path().join("junk");
        std::fs::write(&junk, [0u8; 4096]).unwrap();
        let p = peek(&junk).unwrap();
        assert!(p.footers.is_empty() && p.sector0.is_none() && p.footer().is_none());
    }

    #[test]
    fn size_rule() {
        let mut f = Footer::parse(&{
            let mut b = [0u8; 512];
            b[0..8].copy_from_slice(b"conectix");
            b
        })
        .unwrap();
        f.current_size = 136_365_211_648;
        f.geometry = crate::format::Geometry {
            cylinders: 16383,
            heads: 16,
            sectors_per_track: 63,
        };
        f.creator_application = *b"vpc ";
        let (s, src) = virtual_size(&f, SizeRule::Auto);
        assert_eq!(src, SizeSource::Chs);
        assert_eq!(s, 16383 * 16 * 63 * 512);
        f.creator_application = *b"win ";
        assert_eq!(
            virtual_size(&f, SizeRule::Auto),
            (136_365_211_648, SizeSource::CurrentSize)
        );
        assert_eq!(virtual_size(&f, SizeRule::Chs).1, SizeSource::Chs);
    }
}
