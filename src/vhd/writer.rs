//! Writes to an open VHD: block allocation and the crash-safe commit order of the module docs
//! of [`crate::vhd`] (§4), the footer moved out and back, and the metadata writes of set-parent.
//! Every byte written to a VHD file goes through here.

use std::collections::{BTreeSet, HashMap};
use std::fs::File;
use std::path::Path;

use super::open::metadata_end;
use super::{DATA_ALIGNMENT, FIXED_CHUNK, FooterSource, Vhd, check_range};
use crate::bitmap::SectorBitmap;
use crate::error::{Error, Result};
use crate::format::bat;
use crate::format::footer::{DiskType, FOOTER_SIZE};
use crate::format::header::{DynamicHeader, HEADER_SIZE};
use crate::format::{SECTOR_SIZE, align_up};
use crate::io::Storage;
use crate::layer::files::{WriteMode, open_for_writing};

#[derive(Debug, Default)]
pub(super) struct Pending {
    /// Blocks that existed before this batch whose bitmap gains bits, with the new bitmap.
    pub(super) bitmaps: HashMap<u64, SectorBitmap>,
    /// BAT sectors (index into the table, in 512-byte units) holding new entries.
    pub(super) bat_sectors: BTreeSet<u64>,
    /// Blocks allocated in this batch (their bitmap went out with their data).
    pub(super) new_blocks: BTreeSet<u64>,
    /// Data was written since the last sync.
    pub(super) data_written: bool,
}

impl Vhd {
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
        let context = || format!("{}: flushing to disk", self.path.display());
        self.require_no_failed_sync(context)?;
        self.storage.sync_data().map_err(|e| {
            self.sync_failed
                .store(true, std::sync::atomic::Ordering::SeqCst);
            Error::io(context(), e)
        })
    }

    /// The failed-flush latch of [`Vhd::sync`]: an error (in `context`) once a flush failed.
    fn require_no_failed_sync(&self, context: impl FnOnce() -> String) -> Result<()> {
        if self.sync_failed.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(Error::io(
                context(),
                std::io::Error::other(
                    "an earlier flush failed, so the writes since the last good one may be lost; nothing more is published (re-run the operation)",
                ),
            ));
        }
        Ok(())
    }

    /// Overwrite `bytes` at file `offset` for [`crate::repair`], outside the placement rules
    /// of this module: repair replaces damaged structures (the dynamic header, BAT sectors,
    /// footers; `structure` names the one) in its own crash-safe order, one step at a time
    /// with [`Vhd::flush`] after each. Refused on a read-only file and once a flush failed.
    pub(crate) fn write_repaired(
        &mut self,
        structure: &str,
        offset: u64,
        bytes: &[u8],
    ) -> Result<()> {
        self.require_writable()?;
        let context = || {
            format!(
                "{}: writing the repaired {structure} at offset {offset}",
                self.path.display()
            )
        };
        self.require_no_failed_sync(context)?;
        self.storage
            .write_at(bytes, offset)
            .map_err(|e| Error::io(context(), e))
    }

    /// Make every write so far durable ([`Vhd::sync`], with its failed-flush latch).
    pub(crate) fn flush(&self) -> Result<()> {
        self.sync()
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
        match self.bat.get(self, index)? {
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
        if let Some(bitmap_offset) = self.bat.get(self, index)? {
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

    /// [`Vhd::clone_into_block`] of each piece in order, stopping at the first that does not
    /// clone: returns how many were placed and the outcome of the last one tried. Whole
    /// blocks cloned into consecutive new blocks of a dynamic or differencing disk from
    /// source blocks laid out with the same stride (this writer's layout and Windows': each
    /// block's bitmap padded so that its data is 4 KiB aligned) become one clone of the whole
    /// stretch.
    pub fn clone_run(
        &mut self,
        pieces: &[crate::io::ClonePiece<'_>],
    ) -> Result<(usize, crate::io::CloneOutcome)> {
        use crate::io::CloneOutcome;
        if self.header.is_none() {
            return self.clone_fixed_run(pieces);
        }
        let mut i = 0;
        while i < pieces.len() {
            let n = self.new_block_stretch(&pieces[i..])?;
            if n > 1 {
                match self.clone_new_blocks(&pieces[i..i + n])? {
                    CloneOutcome::Cloned => {
                        i += n;
                        continue;
                    }
                    CloneOutcome::Unsupported => return Ok((i, CloneOutcome::Unsupported)),
                    // One by one below: alone, a piece may still clone.
                    CloneOutcome::Unaligned => {}
                }
            }
            let p = &pieces[i];
            if !p.src.len.is_multiple_of(SECTOR_SIZE) {
                return Ok((i, CloneOutcome::Unaligned));
            }
            let r = self.clone_into_block(
                p.block,
                p.first,
                p.src.file,
                p.src.offset,
                p.src.len / SECTOR_SIZE,
            )?;
            if r != CloneOutcome::Cloned {
                return Ok((i, r));
            }
            i += 1;
        }
        Ok((pieces.len(), CloneOutcome::Cloned))
    }

    /// [`Vhd::clone_run`] into a fixed disk, whose data is contiguous: pieces contiguous in
    /// both files ([`crate::io::CloneRun`]) are one clone. A piece that cannot be cloned
    /// ([`Vhd::clone_into_block`]'s rules) ends the run before it.
    fn clone_fixed_run(
        &mut self,
        pieces: &[crate::io::ClonePiece<'_>],
    ) -> Result<(usize, crate::io::CloneOutcome)> {
        use crate::io::{CloneOutcome, CloneRun};
        let mut run: Option<(usize, CloneRun<'_>)> = None;
        for (i, p) in pieces.iter().enumerate() {
            let at = self.fixed_clone_target(p)?;
            if let (Some(at), Some((_, r))) = (at, run.as_mut())
                && r.extend(&p.src, at)
            {
                continue;
            }
            if let Some((start, r)) = run.take() {
                let out = self.clone_raw(r.src, r.src_offset, r.offset, r.len)?;
                if out != CloneOutcome::Cloned {
                    return Ok((start, out));
                }
            }
            let Some(at) = at else {
                return Ok((i, CloneOutcome::Unaligned));
            };
            run = Some((i, CloneRun::new(&p.src, at)));
        }
        if let Some((start, r)) = run {
            let out = self.clone_raw(r.src, r.src_offset, r.offset, r.len)?;
            if out != CloneOutcome::Cloned {
                return Ok((start, out));
            }
        }
        Ok((pieces.len(), CloneOutcome::Cloned))
    }

    /// Where piece `p` goes in a fixed disk's file, or None when it cannot be cloned (not
    /// whole 4 KiB blocks at aligned offsets, or past the virtual size).
    fn fixed_clone_target(&self, p: &crate::io::ClonePiece<'_>) -> Result<Option<u64>> {
        let (bs, spb, len) = (self.block_size(), self.sectors_per_block(), p.src.len);
        let sectors = len / SECTOR_SIZE;
        if p.block >= self.block_count() || p.first.checked_add(sectors).is_none_or(|e| e > spb) {
            return Err(Error::InvalidParameter(format!(
                "{}: clone of {sectors} sector(s) at sector {} of block {}: outside the disk's blocks",
                self.path.display(),
                p.first,
                p.block
            )));
        }
        let valid = (self.virtual_size - p.block * bs).min(bs) / SECTOR_SIZE;
        let aligned = |o: u64| o.is_multiple_of(DATA_ALIGNMENT);
        let at = p.block * FIXED_CHUNK + p.first * SECTOR_SIZE;
        let fits = p.first + sectors <= valid && len > 0;
        Ok((fits && aligned(p.src.offset) && aligned(len) && aligned(at)).then_some(at))
    }

    /// How many of `pieces`, from the first, [`Vhd::clone_new_blocks`] can clone as one
    /// stretch: whole blocks, none allocated yet (and each once), of one source file, where
    /// each piece's source follows the previous one's by exactly the distance between their
    /// new blocks here. 0 or 1 means no stretch.
    fn new_block_stretch(&mut self, pieces: &[crate::io::ClonePiece<'_>]) -> Result<usize> {
        let bs = self.block_size();
        if self.header.is_none() {
            return Ok(0);
        }
        let whole = |v: &Vhd, p: &crate::io::ClonePiece<'_>| {
            p.first == 0 && p.src.len == bs && (p.block + 1).saturating_mul(bs) <= v.virtual_size
        };
        let Some(p0) = pieces.first().filter(|p| whole(self, p)) else {
            return Ok(0);
        };
        let start = self.aligned_block_pos(self.next_free)?;
        let (mut pos, mut blocks, mut n) = (start, BTreeSet::new(), 0);
        for p in pieces {
            let follows = std::ptr::eq(p.src.file, p0.src.file)
                && p0.src.offset.checked_add(pos - start) == Some(p.src.offset);
            if !follows
                || !whole(self, p)
                || p.block >= self.block_count()
                || !blocks.insert(p.block)
                || self.bat.get(self, p.block)?.is_some()
            {
                break;
            }
            n += 1;
            pos = self.aligned_block_pos(pos + self.stride())?;
        }
        Ok(n)
    }

    /// Clone whole blocks `pieces` (a [`Vhd::new_block_stretch`]) into new blocks allocated
    /// one after the other, with one clone from the first block's data to the last one's end.
    /// The clone also covers the padding and bitmap in front of every block but the first,
    /// with the source's bytes there (the padding is free space; the bitmap, all ones for a
    /// block the source holds whole, is written over when it differs, see
    /// [`Vhd::cloned_bitmap_is`]), and
    /// nothing points at these blocks before [`Vhd::commit`] (the same order as one block:
    /// data, bitmap, then the BAT entry after the sync). Nothing is written unless it cloned.
    fn clone_new_blocks(
        &mut self,
        pieces: &[crate::io::ClonePiece<'_>],
    ) -> Result<crate::io::CloneOutcome> {
        use crate::io::CloneOutcome;
        let (Some(h), Some(first)) = (self.header.clone(), pieces.first()) else {
            return Ok(CloneOutcome::Unaligned);
        };
        let n = pieces.len() as u64;
        let start = self.aligned_block_pos(self.next_free)?;
        let mut end = start;
        for _ in 0..n {
            end = self.aligned_block_pos(end)? + self.stride();
        }
        if end > self.footer_offset {
            self.reserve_blocks(n)?;
        }
        let at = start + h.bitmap_bytes();
        let aligned = |o: u64| o.is_multiple_of(DATA_ALIGNMENT);
        if !aligned(at) || !aligned(first.src.offset) || !aligned(self.block_size()) {
            return Ok(CloneOutcome::Unaligned);
        }
        let r = self.clone_raw(first.src.file, first.src.offset, at, end - at)?;
        if r != CloneOutcome::Cloned {
            return Ok(r);
        }
        let full = SectorBitmap::full(self.sectors_per_block() as usize);
        let bitmap = full.to_bytes_padded(h.bitmap_bytes() as usize);
        let mut cloned = vec![0u8; bitmap.len()];
        for (k, p) in pieces.iter().enumerate() {
            let pos = self.aligned_block_pos(self.next_free)?;
            if k == 0 || !self.cloned_bitmap_is(p, &bitmap, &mut cloned)? {
                self.write_raw(&bitmap, pos)?;
            }
            self.publish_new_block(p.block, pos, pos + self.stride())?;
        }
        Ok(r)
    }

    /// Whether the bitmap a stretch clone ([`Vhd::clone_new_blocks`]) brought along in front
    /// of piece `p` (the source's own, for a block it holds whole: all ones) is `bitmap`
    /// already. Then it is not written again: a write of part of a cloned file system block
    /// reads that block from the disk first and unshares it (512 such writes made the sync
    /// of 1 GiB of cloned 2 MiB blocks take 50 ms instead of 6).
    fn cloned_bitmap_is(
        &self,
        p: &crate::io::ClonePiece<'_>,
        bitmap: &[u8],
        buf: &mut [u8],
    ) -> Result<bool> {
        let Some(at) = p.src.offset.checked_sub(bitmap.len() as u64) else {
            return Ok(false);
        };
        crate::io::pread_exact(p.src.file, buf, at)
            .map_err(|e| Error::io(format!("reading the clone source's bitmap at {at}"), e))?;
        Ok(buf == bitmap)
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
        let Some(slot) = u32::try_from(index).ok().filter(|&i| i < self.bat.len()) else {
            return Err(Error::InvalidParameter(format!(
                "block {index} is past the BAT of {}",
                self.path.display()
            )));
        };
        let was = self.bat.is_allocated(self, index)?;
        self.bat.set(slot, sector, was);
        self.pending.bat_sectors.insert(index * 4 / SECTOR_SIZE);
        self.pending.new_blocks.insert(index);
        self.pending.data_written = true;
        self.next_free = end;
        Ok(())
    }

    /// Block data was written at `offset..offset + len` ([`crate::io::Writeback`]: a hint; data
    /// reaching the disk early is always allowed, step 2 of the module docs).
    fn note_written(&mut self, offset: u64, len: u64) {
        let storage = &self.storage;
        self.writeback
            .note(offset, len, |o, n| storage.start_writeback(o, n));
    }

    /// Write the masked sectors of `data` at `file_offset` by the rule of [`crate::io::masked`]
    /// (gaps from the file when `preserve`, zeros when not: a new block's hole).
    fn write_masked(
        &mut self,
        file_offset: u64,
        data: &[u8],
        mask: &SectorBitmap,
        preserve: bool,
    ) -> Result<()> {
        use crate::io::masked::{self, Gaps};
        let gaps = if preserve {
            Gaps::FromFile
        } else {
            Gaps::Zeros
        };
        let mut scratch = std::mem::take(&mut self.scratch);
        let r = masked::write_masked(
            data,
            mask,
            SECTOR_SIZE as usize,
            gaps,
            &mut scratch,
            |buf, at| self.read_raw(file_offset + at, buf),
            |bytes, at| self.write_raw(bytes, file_offset + at),
        );
        self.scratch = scratch;
        r
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
            if let Some(off) = self.bat.get(self, *index)? {
                self.write_raw(&bm.to_bytes_padded(h.bitmap_bytes() as usize), off)?;
            }
        }
        let table = std::mem::take(&mut self.pending.bat_sectors);
        let entries_per_sector = SECTOR_SIZE / 4;
        let mut iter = table.iter().copied().peekable();
        while let Some(first) = iter.next() {
            let mut last = first;
            while iter.peek() == Some(&(last + 1)) {
                last += 1;
                iter.next();
            }
            let lo = first * entries_per_sector;
            let hi = ((last + 1) * entries_per_sector).min(u64::from(self.bat.len()));
            let mut bytes = vec![0xFFu8; (last - first + 1) as usize * SECTOR_SIZE as usize];
            for (k, i) in (lo..hi).enumerate() {
                let e = self.bat.raw(self, i)?;
                bytes[4 * k..4 * k + 4].copy_from_slice(&e.to_be_bytes());
            }
            self.write_raw(&bytes, h.table_offset + first * SECTOR_SIZE)?;
            // In lo..hi: the table has at most u32::MAX entries.
            self.bat.written(lo as u32, hi as u32);
        }
        self.sync()?;
        self.pending = Pending::default();
        self.writeback.flushed();
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
        // An entry that cannot be read might overlap: not metadata space.
        !self
            .bat
            .allocated_entries(self)
            .any(|e| e.is_err() || e.is_ok_and(|(_, at)| overlaps(at, stride)))
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

/// Write a new file at `path` (refusing an existing one unless `overwrite`) under the lock
/// every writer takes: its length set to `len` first when given, then `parts` (offset, bytes)
/// in order, then one sync of data and metadata. A file that cannot be written whole is
/// removed again. For [`crate::create`], whose file is no VHD until the last part is written.
pub(crate) fn write_new_file(
    path: &Path,
    overwrite: bool,
    len: Option<u64>,
    parts: &[(u64, &[u8])],
) -> Result<()> {
    let mode = if overwrite {
        WriteMode::Truncate
    } else {
        WriteMode::CreateNew
    };
    let storage = open_for_writing(path, mode)?;
    let res = len
        .map_or(Ok(()), |len| storage.set_len(len))
        .and_then(|()| {
            parts
                .iter()
                .try_for_each(|(offset, bytes)| storage.write_at(bytes, *offset))
        })
        .and_then(|()| storage.file().sync_all());
    drop(storage);
    if let Err(e) = res {
        let _ = std::fs::remove_file(path);
        return Err(Error::io(format!("{}: writing new VHD", path.display()), e));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    use super::*;
    use crate::io::MemStorage;
    use crate::vhd::OpenOptions;

    /// A storage whose first flush fails and whose later ones succeed: how a lost writeback
    /// looks to the caller (the OS reports it once).
    #[derive(Debug)]
    struct FirstSyncFails {
        inner: MemStorage,
        failed: AtomicBool,
    }

    impl Storage for FirstSyncFails {
        fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
            self.inner.read_at(buf, offset)
        }
        fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
            self.inner.write_at(buf, offset)
        }
        fn len(&self) -> std::io::Result<u64> {
            self.inner.len()
        }
        fn set_len(&self, len: u64) -> std::io::Result<()> {
            self.inner.set_len(len)
        }
        fn sync_data(&self) -> std::io::Result<()> {
            if self.failed.swap(true, Ordering::SeqCst) {
                Ok(())
            } else {
                Err(std::io::Error::other("writeback failed"))
            }
        }
    }

    #[test]
    fn repair_writes_need_a_writable_file_and_stop_after_a_failed_flush() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d.vhd");
        crate::create::create_dynamic(&p, 4 << 20, &Default::default()).unwrap();
        let bytes = std::fs::read(&p).unwrap();
        let mem = || Box::new(MemStorage::new(bytes.clone()));
        let mut ro = Vhd::from_storage(mem(), &p, OpenOptions::read_only()).unwrap();
        assert!(matches!(
            ro.write_repaired("footer copy", 0, &[1; 512]),
            Err(Error::AccessDenied(_))
        ));

        let storage = Arc::new(FirstSyncFails {
            inner: MemStorage::new(bytes.clone()),
            failed: AtomicBool::new(false),
        });
        let mut rw =
            Vhd::from_storage(Box::new(storage.clone()), &p, OpenOptions::writable()).unwrap();
        rw.write_repaired("footer copy", 0, &[1; 512]).unwrap();
        assert!(rw.flush().is_err());
        assert!(
            rw.write_repaired("footer copy", 0, &[2; 512]).is_err(),
            "nothing is written after a failed flush"
        );
        assert!(
            rw.flush().is_err(),
            "the latch holds although the storage would flush now"
        );
        let mut first = [0u8; 512];
        storage.read_at(&mut first, 0).unwrap();
        assert_eq!(first, [1; 512]);
    }
}
