//! [`Vhdx`]: one open VHDX file of any kind, read-only or writable, seen in its own sectors
//! block by block (the shape of the crate's layer boundary), with crash-safe writes.
//!
//! A read-only open replays a dirty log in memory and never writes. A writable open replays
//! it onto the file and clears it first ([MS-VHDX] 2.3.3), so the session starts clean.
//!
//! Writing ([MS-VHDX] 2.3, vhdx-format.md §5.4): [`Vhdx::write_sectors`] writes payload data at
//! once, into place or into new 1 MiB-aligned blocks past every object, and changes the BAT
//! and sector bitmaps only in memory; [`Vhdx::commit`] publishes them: flush the data, write
//! one log entry of the changed 4 KiB pages (LogGuid set by a header update after the
//! session's first entry is durable; that first entry's flush is also the data's), flush,
//! apply the pages in place, flush. A crash at any point leaves every sector old or new.
//! [`Vhdx::finish`] clears LogGuid (not flushed: see "Flushes").
//!
//! FileWriteGuid and DataWriteGuid change before anything the session changed can be seen
//! ([MS-VHDX] 2.2.2): before a write into a block that is already present, by a header
//! update of their own; for everything else by the commit's first header update, the one
//! that names the session's LogGuid. Until that update is durable, the session has written
//! only bytes nothing refers to: new blocks past every object (no BAT entry points there yet;
//! growing the file for them was always done without a GUID change, see
//! [`Vhdx::reserve_space`]) and a log entry that no header names (replay ignores it), so a
//! crash leaves the file reading exactly as before, with its old identity, and a reader that
//! sees the new DataWriteGuid also sees the new data. This is a reading of the rule "change
//! FileWriteGuid before the first modification": a file whose structures are all unchanged
//! counts as unmodified. A merge's destination is still accepted by its child at every
//! instant: the child's parent_linkage2 names the destination's next DataWriteGuid before
//! the destination is written at all.
//!
//! # Flushes
//!
//! Every flush a write session makes, and why it cannot go:
//! - Replaying a dirty log at a writable open: after the replayed writes, before the header
//!   update that clears LogGuid (a crash in between replays again); and that header update's
//!   own (its slot becomes current).
//! - A header update that settles the GUIDs before a write into place (above): the new
//!   DataWriteGuid must be durable before data a reader of the old one trusted changes.
//! - Payload data, before a log entry that exposes it, when the session's log is already
//!   named (a second commit) or nothing is logged: BAT and bitmap entries must not reach
//!   the device before the data they point at. The session's first entry shares its flush
//!   with the data (no header names it until after that flush).
//! - Each log entry, before the header update that names the log (the first entry) or before
//!   its pages are written in place (a later one): replay must find the whole entry.
//! - The header update naming LogGuid (and carrying the owed GUIDs): before the pages are
//!   written in place, so that a torn in-place page is repaired by the replay.
//! - The pages in place, before LogGuid is cleared (afterwards nothing repairs them), and
//!   before the entry after next is written. [`Vhdx::commit`] flushes them at once;
//!   [`Vhdx::commit_live`] leaves the last entry's unflushed and the log live (LogGuid set):
//!   a crash replays that entry. The next entry's Tail then points back at it, so a replay
//!   from the next entry replays both in order (it never overwrites it: two entries of at
//!   most half the log each fit), and the next entry's own flush makes the pages of the one
//!   before durable (they were written before it), so no Tail reaches further back;
//!   [`Vhdx::finish`] flushes them before it clears LogGuid. The pages the second entry
//!   does not carry are repaired by the first's replay, so the second need not repeat them.
//! - Before a header update that no flush of the session precedes (the GUIDs settled before
//!   a first write into place): the header procedure overwrites the other slot only once the
//!   current one is durable, and the previous session's closing update (below) may not be.
//!   Every other header update follows a flush of the session anyway, except the first of a
//!   replay at open, which needs none: a log to replay means the current header is the one
//!   that named it, flushed when it was written (a closing update still in the page cache
//!   would have made the log read as clear).
//!
//! Not flushed: the header update clearing LogGuid at [`Vhdx::finish`]. It is written (a
//! clean file has an empty log, and qemu refuses to open a dirty log read-only), but nothing
//! depends on its durability: every page of the session's log is applied in place and
//! flushed before it is written, so until it reaches the device a crash leaves LogGuid set
//! over entries whose replay rewrites what the file already holds (the file reads the same,
//! its identity is the one the session's naming update made durable). A torn write of it
//! damages only the stale slot. The next header update of the file comes after a flush (the
//! item above, or the first log entry's), so at most one slot is in flight. The price: after
//! a power loss within the page cache's writeback delay of a finished session, the file may
//! carry a replayable log that changes nothing (we, Hyper-V and a writable qemu replay it;
//! qemu refuses it read-only until `qemu-img check -r all`).
//!
//! A session that writes only new blocks and publishes them in one log entry therefore
//! flushes three times (data and log entry; the header naming LogGuid with the new GUIDs;
//! the pages in place); a linkage update, which writes no data, also three. A merge's two
//! updates of the linking child's parent linkage (before the destination is written and
//! after it) are one session of the child held open across the merge, four flushes: entry 1
//! (`parent_linkage2` = the destination's next DataWriteGuid); the header naming LogGuid;
//! (entry 1's pages in place, not flushed; the destination's session; then) entry 2 (the
//! final linkage, its Tail at entry 1); entry 2's pages in place. A 64 TiB sparse merge makes
//! 7 (9 with a session per linkage update, as before; flushing the closing header updates
//! would add one per session).
//!
//! Those of the two files overlap where no ordering joins them (docs/design.md, "Identity"):
//! the destination's session waits for the child's first update (entry 1 and its naming
//! header, both flushed) only at its first header update that settles the new DataWriteGuid
//! ([`Vhdx::set_identity_gate`]); its data, clones and first log entry (and that entry's
//! flush) refer to nothing before it, and go on while the child flushes. The child's entry 2
//! waits for the destination's header naming its log ([`Vhdx::commit_live`] returns once it
//! is flushed: from then on every open replays the new content under the new id), not for
//! its pages in place, whose flush overlaps entry 2's and its pages'.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;

use uuid::Uuid;

use super::format::bat::{BatEntry, BitmapState, PayloadState, sector_bitmap, set_bitmap_bit};
use super::format::log::{PAGE, Write};
use super::format::metadata::ParentLocator;
use super::format::{MIB, bat::Geometry};
use super::journal::{LogWriter, flush, grow, update_header, update_header_unflushed, write};
use super::reader::{Mode, VhdxReader};
use crate::bitmap::SectorBitmap;
use crate::io::{ClonePiece, FileStorage, Storage};
use crate::{Error, Result};

/// The sector bitmap bytes a read-only handle reads at once and keeps (16 pages: the bits of
/// 256 blocks of 2 MiB with 512-byte sectors); a divisor of the 1 MiB bitmap block.
const BITMAP_WINDOW: u64 = 64 * 1024;

/// How one block of a VHDX holds its sectors, in the terms of the crate's layer boundary.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BlockState {
    /// NOT_PRESENT: the parent's sectors (zeros in a disk without a parent).
    Transparent,
    /// ZERO, UNMAPPED or UNDEFINED: zeros, whatever a parent holds.
    Zero,
    /// FULLY_PRESENT (`None`), or PARTIALLY_PRESENT with the sectors its bitmap selects; the
    /// others are transparent.
    Present(Option<SectorBitmap>),
}

/// An open VHDX file (fixed, dynamic or differencing).
#[derive(Debug)]
pub struct Vhdx<S: Storage> {
    r: VhdxReader<S>,
    writable: bool,
    session: Session,
    /// Why writing stopped: an I/O error (a failed write or flush) in a write session. What
    /// the storage holds is then unknown (a failed flush may have lost every write since the
    /// previous one), so nothing more is written or published through this handle; reopening
    /// the file (which replays its log) continues from what is durable.
    broken: Option<String>,
    /// The last header write of this file is known to be durable (a flush followed it). Not
    /// known at a writable open (the previous session's closing header update is not
    /// flushed, see "Flushes"), and not after [`Vhdx::finish`]: a header update that no
    /// flush of the session precedes ([`Vhdx::touch_now`] before a write into place) then
    /// flushes first, so that at most one header slot is ever in flight.
    header_durable: bool,
    /// A read-only handle's last window of [`BITMAP_WINDOW`] sector bitmap bytes read from
    /// the file (file offset, bytes): one page holds the bits of several blocks, a window
    /// those of consecutive blocks, and a merge asks for a block's bitmap more than once (the
    /// plan, then the copy), so without it every lookup was a 4 KiB read (128 for 1 GiB of
    /// 2 MiB blocks). Nothing writes the file's bitmap pages while a read-only handle holds
    /// it (writers take the exclusive lock).
    last_bitmap: std::sync::Mutex<Option<(u64, Vec<u8>)>>,
    /// See [`Vhdx::set_identity_gate`] (behind a mutex only so that the handle stays `Sync`).
    identity_gate: std::sync::Mutex<Option<crate::layer::IdentityGate>>,
}

/// The pieces of a [`Vhdx::clone_run`] held for the clone of their stretch.
#[derive(Debug, Default)]
struct PendingClones<'a> {
    /// Each piece, with the new block it reserved.
    pieces: Vec<(ClonePiece<'a>, Option<u64>)>,
    /// The new blocks reserved by `pieces`: block -> file offset.
    fresh: HashMap<u64, u64>,
}

/// What a write session changed and has not yet published.
#[derive(Debug, Default)]
struct Session {
    /// FileWriteGuid was regenerated in this session.
    file_started: bool,
    /// DataWriteGuid was regenerated in this session.
    data_started: bool,
    /// FileWriteGuid / DataWriteGuid must change before the session's changes are exposed
    /// (see [`Vhdx::touch`]).
    owe_file: bool,
    owe_data: bool,
    /// The DataWriteGuid the session's first data write sets, when chosen in advance
    /// ([`Vhdx::next_data_write_guid`]).
    next_data_write_guid: Option<Uuid>,
    /// Other metadata pages (file offset -> 4 KiB) changed in memory: the metadata region.
    pages: BTreeMap<u64, Vec<u8>>,
    /// The log writer, once the session wrote its first entry.
    log: Option<LogWriter>,
    /// Where the next new block goes (0: not computed yet).
    alloc_end: u64,
    /// Sector bitmap pages read or changed (file offset → 4 KiB); authoritative over the file.
    bitmaps: BTreeMap<u64, Vec<u8>>,
    /// The bitmap pages changed in memory.
    dirty_bitmaps: BTreeSet<u64>,
    /// Payload bytes were written since the last flush.
    unflushed: bool,
    /// Payload whose writeback has not been started yet (a hint, see [`Vhdx::write_runs`]).
    writeback: crate::io::Writeback,
    /// The buffer of masked writes whose gaps are filled ([`crate::io::masked`]).
    scratch: Vec<u8>,
}

impl Vhdx<FileStorage> {
    /// Open the file at `path`; `writable` takes the exclusive lock every writer takes (a file
    /// a merge holds gives System is in use, 32774) and replays a dirty log onto the file.
    pub fn open_path(path: impl AsRef<Path>, writable: bool) -> Result<Vhdx<FileStorage>> {
        let path = path.as_ref();
        let storage = if writable {
            crate::layer::files::open_for_writing(path, crate::layer::files::WriteMode::Existing)?
        } else {
            FileStorage::new(crate::layer::files::open_regular_file(path, false)?)
        };
        Vhdx::open(storage, writable).map_err(|e| e.in_file(path))
    }
}

impl<S: Storage> Vhdx<S> {
    /// Open a VHDX over `storage`. Read-only, a dirty log is replayed in memory; `writable`,
    /// it is replayed onto the file, flushed and cleared before this returns.
    pub fn open(storage: S, writable: bool) -> Result<Vhdx<S>> {
        let mode = Mode {
            differencing: true,
            writable,
            metadata_only: false,
        };
        Self::open_mode(storage, mode)
    }

    /// Open writable to rewrite metadata through the log only (a parent linkage): headers,
    /// regions, metadata and the log as [`Vhdx::open`] does, a dirty log replayed onto the
    /// file, but the BAT neither streamed nor validated, so the block queries
    /// ([`Vhdx::is_mapped`], [`Vhdx::mapped_blocks`]) know no block. Nothing that reads or
    /// writes blocks may use it.
    pub(crate) fn open_for_metadata(storage: S) -> Result<Vhdx<S>> {
        let mode = Mode {
            differencing: true,
            writable: true,
            metadata_only: true,
        };
        Self::open_mode(storage, mode)
    }

    fn open_mode(storage: S, mode: Mode) -> Result<Vhdx<S>> {
        let writable = mode.writable;
        Ok(Vhdx {
            r: VhdxReader::open_with(storage, mode)?,
            writable,
            session: Session::default(),
            broken: None,
            header_durable: false,
            last_bitmap: std::sync::Mutex::new(None),
            identity_gate: std::sync::Mutex::new(None),
        })
    }

    /// The storage the file is read and written through.
    pub fn storage(&self) -> &S {
        self.r.file.storage()
    }

    /// The structures as they read now (header, regions, metadata, geometry).
    pub fn reader(&self) -> &VhdxReader<S> {
        &self.r
    }

    /// The BAT's shape: virtual size, block size, logical sector size, parent or not.
    pub fn geometry(&self) -> &Geometry {
        &self.r.geometry
    }

    /// Virtual size in bytes.
    pub fn virtual_size(&self) -> u64 {
        self.r.geometry.virtual_size
    }

    /// Logical sector size (512 or 4096).
    pub fn sector_size(&self) -> u32 {
        self.r.geometry.logical_sector_size
    }

    /// Bytes per payload block.
    pub fn block_size(&self) -> u64 {
        self.r.geometry.block_size.into()
    }

    /// Payload blocks of the virtual disk.
    pub fn block_count(&self) -> u64 {
        self.r.geometry.data_blocks()
    }

    /// Logical sectors of block `block` inside the virtual disk (the last may be short).
    pub fn sectors_in_block(&self, block: u64) -> u64 {
        let start = block.saturating_mul(self.block_size());
        let end = start
            .saturating_add(self.block_size())
            .min(self.virtual_size());
        end.saturating_sub(start) / u64::from(self.sector_size())
    }

    /// The current DataWriteGuid: the identity a child links to.
    pub fn data_write_guid(&self) -> Uuid {
        self.r.header.header.data_write_guid
    }

    /// A differencing disk (HasParent).
    pub fn is_differencing(&self) -> bool {
        self.r.metadata.file_parameters.has_parent
    }

    /// The parent locator of a differencing disk.
    pub fn parent_locator(&self) -> Option<&ParentLocator> {
        self.r.metadata.parent_locator.as_ref()
    }

    /// The BAT entry of payload block `block`.
    pub fn payload_entry(&self, block: u64) -> Result<BatEntry> {
        self.check_block(block)?;
        self.r.entry(block)
    }

    /// Whether block `block`'s state is not NOT_PRESENT, from the table alone.
    pub fn is_mapped(&self, block: u64) -> bool {
        self.r.bat.is_mapped(block)
    }

    /// The blocks whose state is not NOT_PRESENT, in order (no entry is read: cost follows
    /// the table's size / 64 and the mapped blocks).
    pub fn mapped_blocks(&self) -> impl Iterator<Item = u64> + '_ {
        self.r.bat.mapped_blocks()
    }

    /// The BAT entry of the sector bitmap block of chunk `chunk`.
    pub fn bitmap_entry(&self, chunk: u64) -> Result<BatEntry> {
        self.r.bitmap_entry(chunk)
    }

    /// Opened for writing.
    pub fn is_writable(&self) -> bool {
        self.writable
    }

    fn check_block(&self, block: u64) -> Result<()> {
        if block >= self.block_count() {
            return Err(Error::InvalidParameter(format!(
                "VHDX block {block} is past the last block {}",
                self.block_count().saturating_sub(1)
            )));
        }
        Ok(())
    }

    /// The state of block `block`. PARTIALLY_PRESENT outside a differencing disk reads as
    /// fully present, as openvmm does.
    pub fn block_state(&self, block: u64) -> Result<BlockState> {
        self.check_block(block)?;
        Ok(match self.r.entry(block)?.payload_state()? {
            PayloadState::NotPresent => BlockState::Transparent,
            PayloadState::Zero | PayloadState::Unmapped | PayloadState::Undefined => {
                BlockState::Zero
            }
            PayloadState::FullyPresent => BlockState::Present(None),
            PayloadState::PartiallyPresent if !self.is_differencing() => BlockState::Present(None),
            PayloadState::PartiallyPresent => BlockState::Present(Some(self.bitmap_of(block)?)),
        })
    }

    /// Read the stored bytes of `buf.len() / sector_size()` sectors of `block` from sector
    /// `first` of the block on. The block must be present (else Invalid parameter); sectors
    /// a PARTIALLY_PRESENT block does not hold read whatever the file holds there.
    pub fn read_stored(&self, block: u64, first: u64, buf: &mut [u8]) -> Result<()> {
        let offset = self.stored_offset(block, first, buf.len())?;
        self.r.file.read_into(offset, buf)
    }

    /// The file offset of sector `first` of present block `block`, checking that `len` bytes
    /// from there are whole sectors inside the block.
    fn stored_offset(&self, block: u64, first: u64, len: usize) -> Result<u64> {
        self.check_range(block, first, len)?;
        let e = self.r.entry(block)?;
        match e.payload_state()? {
            PayloadState::FullyPresent | PayloadState::PartiallyPresent => {
                Ok(e.file_offset() + first * u64::from(self.sector_size()))
            }
            s => Err(Error::InvalidParameter(format!(
                "VHDX block {block} holds no data (state {s:?})"
            ))),
        }
    }

    fn check_range(&self, block: u64, first: u64, len: usize) -> Result<()> {
        self.check_block(block)?;
        let ss = u64::from(self.sector_size());
        let n = len as u64 / ss;
        if !(len as u64).is_multiple_of(ss)
            || first.saturating_add(n) > self.sectors_in_block(block)
        {
            return Err(Error::InvalidParameter(format!(
                "VHDX: {len} bytes from sector {first} of block {block} are not whole sectors \
                 inside its {} sectors",
                self.sectors_in_block(block)
            )));
        }
        Ok(())
    }

    /// Read `buf.len()` bytes of this file's own view at `offset`: what the block states say,
    /// with transparent sectors (the parent's, in a differencing disk) read as zeros.
    pub fn read_own(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let ss = u64::from(self.sector_size());
        let end = offset.checked_add(buf.len() as u64);
        if !offset.is_multiple_of(ss)
            || !(buf.len() as u64).is_multiple_of(ss)
            || end.is_none_or(|e| e > self.virtual_size())
        {
            return Err(Error::InvalidParameter(format!(
                "VHDX read of {} bytes at {offset}: not whole sectors inside {} bytes",
                buf.len(),
                self.virtual_size()
            )));
        }
        let bs = self.block_size();
        let mut done = 0;
        while done < buf.len() {
            let pos = offset + done as u64;
            let n = ((bs - pos % bs) as usize).min(buf.len() - done);
            self.read_own_in_block(pos / bs, (pos % bs) / ss, &mut buf[done..done + n])?;
            done += n;
        }
        Ok(())
    }

    fn read_own_in_block(&self, block: u64, first: u64, out: &mut [u8]) -> Result<()> {
        match self.block_state(block)? {
            BlockState::Transparent | BlockState::Zero => out.fill(0),
            BlockState::Present(None) => self.read_stored(block, first, out)?,
            BlockState::Present(Some(map)) => {
                let ss = self.sector_size() as usize;
                let n = out.len() / ss;
                let first = first as usize;
                for run in map.runs_in(first..first + n, false) {
                    out[(run.start - first) * ss..(run.end - first) * ss].fill(0);
                }
                for run in map.runs_in(first..first + n, true) {
                    let at = (run.start - first) * ss..(run.end - first) * ss;
                    self.read_stored(block, run.start as u64, &mut out[at])?;
                }
            }
        }
        Ok(())
    }

    // ---- sector bitmaps ------------------------------------------------------------------

    /// The file offset of block `block`'s bits in its chunk's bitmap block, and their length
    /// in bytes; `None` when the chunk has no bitmap block.
    fn bitmap_location(&self, block: u64) -> Result<Option<(u64, usize)>> {
        let g = &self.r.geometry;
        let e = self.r.bitmap_entry(g.chunk_of(block))?;
        if e.bitmap_state()? == BitmapState::NotPresent {
            return Ok(None);
        }
        let slice = g.bitmap_slice(block);
        Ok(Some((e.file_offset() + slice.start as u64, slice.len())))
    }

    /// The 4 KiB bitmap page at `page` (file offset): the session's copy, else the file's.
    fn bitmap_page(&self, page: u64) -> Result<Vec<u8>> {
        if let Some(p) = self.session.bitmaps.get(&page) {
            return Ok(p.clone());
        }
        if self.writable {
            return self.r.file.read(page, PAGE as u64);
        }
        let mut last = self.last_bitmap.lock().unwrap_or_else(|e| e.into_inner());
        // Inside the window's bitmap block: the block is 1 MiB, 1 MiB aligned, and checked
        // to lie inside the file when the BAT was read.
        let start = page - page % BITMAP_WINDOW;
        let from = (page - start) as usize;
        if let Some((at, w)) = last.as_ref()
            && *at == start
            && let Some(p) = w.get(from..from + PAGE)
        {
            return Ok(p.to_vec());
        }
        let w = self.r.file.read(start, BITMAP_WINDOW)?;
        let p = w.get(from..from + PAGE).map(<[u8]>::to_vec);
        *last = Some((start, w));
        p.ok_or_else(|| Error::format(format!("VHDX: short sector bitmap read at {page:#x}")))
    }

    /// The raw bitmap bytes of `block` (zeros when its chunk has no bitmap block).
    fn bitmap_bytes(&self, block: u64) -> Result<Vec<u8>> {
        let Some((at, len)) = self.bitmap_location(block)? else {
            return Ok(vec![0; self.r.geometry.bitmap_slice(block).len()]);
        };
        let mut out = Vec::with_capacity(len);
        let mut pos = at;
        while out.len() < len {
            let page = pos - pos % PAGE as u64;
            let p = self.bitmap_page(page)?;
            let from = (pos - page) as usize;
            let n = (PAGE - from).min(len - out.len());
            out.extend_from_slice(&p[from..from + n]);
            pos += n as u64;
        }
        Ok(out)
    }

    /// Block `block`'s sector bitmap (VHDX bit order: LSB first) as a [`SectorBitmap`].
    fn bitmap_of(&self, block: u64) -> Result<SectorBitmap> {
        let bytes = self.bitmap_bytes(block)?;
        Ok(sector_bitmap(&bytes, self.sectors_in_block(block) as usize))
    }

    // ---- writing ------------------------------------------------------------------------

    fn check_writable(&self) -> Result<()> {
        if !self.writable {
            return Err(Error::InvalidState(
                "VHDX opened read-only: cannot write".into(),
            ));
        }
        match &self.broken {
            None => Ok(()),
            Some(why) => Err(Error::InvalidState(format!(
                "VHDX: an earlier write or flush failed ({why}); nothing more is written through this handle (reopen the file to continue from what is durable)"
            ))),
        }
    }

    /// `r`, noting an I/O error as the reason this handle writes no more (see `broken`).
    fn latch<T>(&mut self, r: Result<T>) -> Result<T> {
        if let Err(e @ Error::Io { .. }) = &r {
            self.broken = Some(e.to_string());
        }
        r
    }

    /// The session is about to change the file (`data`: the virtual disk's content): before
    /// that change can be seen, FileWriteGuid is regenerated, and with `data` DataWriteGuid
    /// too (to the one [`Vhdx::next_data_write_guid`] chose, if it was asked) ([MS-VHDX]
    /// 2.2.2). Only owed here: a change that nothing exposes until the commit's header update
    /// (new blocks in new space, BAT, bitmap and metadata pages published through the log)
    /// gets its new GUIDs in that same header update (see "Flushes" in the module docs); a
    /// write into place settles them first with [`Vhdx::touch_now`].
    fn touch(&mut self, data: bool) {
        let s = &mut self.session;
        s.owe_file |= !s.file_started;
        s.owe_data |= data && !s.data_started;
    }

    /// [`Vhdx::touch`], and the GUIDs owed settled now by a header update of their own.
    fn touch_now(&mut self, data: bool) -> Result<()> {
        self.touch(data);
        if !self.session.owe_file && !self.session.owe_data {
            return Ok(());
        }
        if !self.header_durable {
            // The header procedure writes the other slot only once the current one is
            // durable: the previous session's closing update may not be yet.
            flush(self.r.file.storage(), "the previous header update")?;
        }
        let change = self.owed_guids()?;
        update_header(self.r.file.storage(), &mut self.r.header, change)?;
        self.header_durable = true;
        Ok(())
    }

    /// The change of the header that settles the GUIDs owed (they count as settled from now
    /// on: the caller writes the header before anything exposes the session's changes).
    /// When it changes DataWriteGuid, the [`Vhdx::set_identity_gate`] gate is passed first;
    /// if it fails, nothing is settled and the handle writes no more.
    fn owed_guids(&mut self) -> Result<impl FnOnce(&mut super::format::header::Header) + use<S>> {
        if self.session.owe_data {
            let gate = self.identity_gate.get_mut().map(Option::take);
            if let Ok(Some(gate)) = gate
                && let Err(e) = gate.pass()
            {
                self.broken = Some(format!("the new DataWriteGuid was not accepted: {e}"));
                return Err(e);
            }
        }
        let next = *self
            .session
            .next_data_write_guid
            .get_or_insert_with(Uuid::new_v4);
        let s = &mut self.session;
        let (file, data) = (
            std::mem::take(&mut s.owe_file),
            std::mem::take(&mut s.owe_data),
        );
        s.file_started |= file;
        s.data_started |= data;
        Ok(move |h: &mut super::format::header::Header| {
            if file {
                h.file_write_guid = Uuid::new_v4();
            }
            if data {
                h.data_write_guid = next;
            }
        })
    }

    /// Make the session's first header update that changes DataWriteGuid (the one naming
    /// its log, or the one before a first write into place) wait for `gate` and fail with
    /// its error (this handle then writes no more): a merge's destination waits there for
    /// its linking child to accept the new DataWriteGuid durably, an update that runs on
    /// another thread while the destination writes what nothing refers to yet (new blocks,
    /// an unnamed log entry). Passed at once when the session changed DataWriteGuid already;
    /// dropped unused when the session never changes it.
    pub fn set_identity_gate(&mut self, gate: crate::layer::IdentityGate) -> Result<()> {
        if self.session.data_started {
            return gate.pass();
        }
        if let Ok(g) = self.identity_gate.get_mut() {
            *g = Some(gate);
        }
        Ok(())
    }

    /// The DataWriteGuid the file will carry once this session writes data: the current one
    /// if it already did, else one chosen now and used by the first data write. A merge
    /// records it in the child's `parent_linkage2` before writing, so that the child accepts
    /// its parent at every instant (see docs/design.md, "VHDX identity").
    pub fn next_data_write_guid(&mut self) -> Uuid {
        if self.session.data_started {
            return self.data_write_guid();
        }
        *self
            .session
            .next_data_write_guid
            .get_or_insert_with(Uuid::new_v4)
    }

    /// Replace the parent locator of this differencing disk by `loc` (parent_linkage,
    /// parent_linkage2, the path keys), published through the log by [`Vhdx::commit`]. The
    /// DataWriteGuid does not change (the virtual disk's content does not), so this file's
    /// own children stay linked.
    pub fn set_parent_locator(&mut self, loc: ParentLocator) -> Result<()> {
        self.check_writable()?;
        if !self.is_differencing() {
            return Err(Error::InvalidParameter(
                "VHDX: only a differencing disk has a parent locator".into(),
            ));
        }
        loc.validate()?;
        use super::format::metadata::{Metadata, parent_locator_span, with_parent_locator};
        let m = self.r.regions.metadata;
        let len = super::reader::metadata_len(&self.r.regions);
        // The table and the items as an open reads them, then whole pages up to the end of
        // what the rewrite changes (the new item's place when it moves past the items): the
        // pages diffed below, not the whole region (1 MiB, almost all unused).
        let mut old =
            super::reader::read_metadata_prefix(len, |n| self.read_pages(m.file_offset, n))?;
        let need = parent_locator_span(&old, len, &loc)?
            .next_multiple_of(PAGE as u64)
            .min(len);
        if need > old.len() as u64 {
            old = self.read_pages(m.file_offset, need)?;
        }
        let new = with_parent_locator(&old, len, &loc)?;
        Metadata::parse_prefix(&new, len)?;
        self.touch(false);
        for (k, (o, n)) in old.chunks(PAGE).zip(new.chunks(PAGE)).enumerate() {
            if o != n {
                let at = m.file_offset + (k * PAGE) as u64;
                self.session.pages.insert(at, n.to_vec());
            }
        }
        self.r.metadata.parent_locator = Some(loc);
        Ok(())
    }

    /// `len` bytes at `offset` as they read with this session's changed metadata pages.
    fn read_pages(&self, offset: u64, len: u64) -> Result<Vec<u8>> {
        let mut b = self.r.file.read(offset, len)?;
        for (&at, p) in self.session.pages.range(offset..offset + len) {
            let from = (at - offset) as usize;
            let n = p.len().min(b.len() - from);
            b[from..from + n].copy_from_slice(&p[..n]);
        }
        Ok(b)
    }

    /// Write the sectors `mask` selects from `data` into block `block`, from sector `first` of
    /// the block on (`data` holds `mask.len()` sectors). Masked sectors afterwards read
    /// exactly `data` (zeros included: a differencing disk stops deferring to its parent
    /// there); the others keep their content. The data reaches the file now; the BAT and
    /// bitmap changes that expose it are published by [`Vhdx::commit`].
    ///
    /// A block not yet allocated gets a new block at the end of the file (for a differencing
    /// disk a NOT_PRESENT block becomes PARTIALLY_PRESENT with the written sectors' bits set;
    /// ZERO, UNMAPPED and UNDEFINED blocks become FULLY_PRESENT with zeros elsewhere); a
    /// whole-block write of zeros into an unallocated block of a disk without
    /// LeaveBlockAllocated sets the ZERO state instead.
    pub fn write_sectors(
        &mut self,
        block: u64,
        first: u64,
        data: &[u8],
        mask: &SectorBitmap,
    ) -> Result<()> {
        self.check_writable()?;
        let r = self.write_sectors_unlatched(block, first, data, mask);
        self.latch(r)
    }

    fn write_sectors_unlatched(
        &mut self,
        block: u64,
        first: u64,
        data: &[u8],
        mask: &SectorBitmap,
    ) -> Result<()> {
        let ss = self.sector_size() as usize;
        if data.len() != mask.len() * ss {
            return Err(Error::InvalidParameter(format!(
                "VHDX write: {} bytes of data for a mask of {} sectors",
                data.len(),
                mask.len()
            )));
        }
        self.check_range(block, first, data.len())?;
        if mask.none() {
            return Ok(());
        }
        let state = self.r.entry(block)?.payload_state()?;
        match state {
            PayloadState::FullyPresent | PayloadState::PartiallyPresent => self.touch_now(true)?,
            _ => self.touch(true),
        }
        match state {
            PayloadState::FullyPresent => {}
            PayloadState::PartiallyPresent if self.is_differencing() => {
                self.set_bits(block, first, mask)?
            }
            PayloadState::PartiallyPresent => {}
            _ if self.is_zero_block_write(block, first, data, mask) => {
                return self.set_entry(block, BatEntry::new(PayloadState::Zero.value(), 0));
            }
            _ => {
                self.allocate(block, state, first, mask)?;
                return self.write_runs(block, first, data, mask, true);
            }
        }
        self.write_runs(block, first, data, mask, false)
    }

    /// Where `len` bytes of present block `block` from sector `first` lie in the file, when a
    /// block clone can share them as they are stored (see [`crate::Layer::clone_source`]).
    pub fn clone_source(&self, block: u64, first: u64, len: u64) -> Option<(&S, u64)> {
        let offset = self
            .stored_offset(block, first, usize::try_from(len).ok()?)
            .ok()?;
        self.r
            .file
            .is_stored_as_is(offset, len)
            .then(|| (self.r.file.storage(), offset))
    }

    /// Clone `len` bytes of `src` at `src_offset` into block `block` from sector `first` on
    /// (see [`Storage::clone_range`]): afterwards they read as if [`Vhdx::write_sectors`] had
    /// written them, in the same order (DataWriteGuid first; a new block's BAT entry and a
    /// differencing block's bitmap bits published at [`Vhdx::commit`], after the data).
    /// Only 4 KiB-aligned ranges are tried. Anything that does not clone leaves the content
    /// as it was (a new block's space, reserved before the clone, goes to the next new
    /// block) and the caller writes the sectors instead.
    pub fn clone_sectors(
        &mut self,
        block: u64,
        first: u64,
        src: &std::fs::File,
        src_offset: u64,
        len: u64,
    ) -> Result<crate::io::CloneOutcome> {
        let src = crate::io::CloneSource {
            file: src,
            offset: src_offset,
            len,
        };
        let piece = ClonePiece { block, first, src };
        Ok(self.clone_run(&[piece])?.1)
    }

    /// [`Vhdx::clone_sectors`] of each piece in order, stopping at the first that does not
    /// clone; returns how many were placed and the outcome of the one that stopped it. Pieces
    /// whose bytes are contiguous in both files (adjacent new blocks, which are allocated one
    /// after the other, from adjacent payload blocks of the source) are cloned by one
    /// [`Storage::clone_range`] of the whole stretch, and placed once it cloned: a stretch
    /// that does not clone leaves nothing of itself behind (its new blocks' space goes to the
    /// next new blocks), as one piece that does not clone.
    pub fn clone_run(
        &mut self,
        pieces: &[ClonePiece<'_>],
    ) -> Result<(usize, crate::io::CloneOutcome)> {
        self.check_writable()?;
        let r = self.clone_run_unlatched(pieces);
        self.latch(r)
    }

    fn clone_run_unlatched(
        &mut self,
        pieces: &[ClonePiece<'_>],
    ) -> Result<(usize, crate::io::CloneOutcome)> {
        use crate::io::{CloneOutcome, CloneRun};
        let mut run: Option<CloneRun<'_>> = None;
        let mut pending = PendingClones::default();
        for (i, p) in pieces.iter().enumerate() {
            let target = self.clone_target(p, &pending)?;
            if let Some((at, new)) = target
                && run.as_mut().is_some_and(|r| r.extend(&p.src, at))
            {
                self.hold_clone(p, new, &mut pending)?;
                continue;
            }
            let held = pending.pieces.len();
            let r = self.clone_pending(run.take(), &mut pending)?;
            if r != CloneOutcome::Cloned {
                return Ok((i - held, r));
            }
            let Some((at, new)) = target else {
                return Ok((i, CloneOutcome::Unaligned));
            };
            run = Some(CloneRun::new(&p.src, at));
            self.hold_clone(p, new, &mut pending)?;
        }
        let held = pending.pieces.len();
        let r = self.clone_pending(run.take(), &mut pending)?;
        let placed = match r {
            CloneOutcome::Cloned => pieces.len(),
            _ => pieces.len() - held,
        };
        Ok((placed, r))
    }

    /// Where piece `p` goes in the file, and whether it takes a new block there (reserved by
    /// [`Vhdx::hold_clone`]); None when it cannot be cloned (not 4 KiB aligned).
    fn clone_target(
        &mut self,
        p: &ClonePiece<'_>,
        pending: &PendingClones<'_>,
    ) -> Result<Option<(u64, bool)>> {
        let len = p.src.len;
        self.check_range(p.block, p.first, usize::try_from(len).unwrap_or(usize::MAX))?;
        let ss = u64::from(self.sector_size());
        let aligned = |o: u64| o.is_multiple_of(4096);
        if len == 0 || !aligned(p.src.offset) || !aligned(len) || !aligned(p.first * ss) {
            return Ok(None);
        }
        let state = self.r.entry(p.block)?.payload_state()?;
        if matches!(
            state,
            PayloadState::FullyPresent | PayloadState::PartiallyPresent
        ) {
            let at = self.stored_offset(p.block, p.first, len as usize)?;
            return Ok(aligned(at).then_some((at, false)));
        }
        Ok(Some(match pending.fresh.get(&p.block) {
            Some(&offset) => (offset + p.first * ss, false),
            None => (self.alloc_start() + p.first * ss, true),
        }))
    }

    /// Piece `p` joins the run about to be cloned; its new block (`new`) is reserved now.
    fn hold_clone<'a>(
        &mut self,
        p: &ClonePiece<'a>,
        new: bool,
        pending: &mut PendingClones<'a>,
    ) -> Result<()> {
        if new {
            self.touch(true);
        } else {
            self.touch_now(true)?;
        }
        let offset = new.then(|| self.reserve(self.block_size())).transpose()?;
        if let Some(o) = offset {
            pending.fresh.insert(p.block, o);
        }
        pending.pieces.push((*p, offset));
        Ok(())
    }

    /// Clone `run` and place the pieces of `pending` it holds; when it does not clone, their
    /// new blocks' space goes back to the next new blocks. `pending` is empty afterwards.
    fn clone_pending(
        &mut self,
        run: Option<crate::io::CloneRun<'_>>,
        pending: &mut PendingClones<'_>,
    ) -> Result<crate::io::CloneOutcome> {
        use crate::io::CloneOutcome;
        let Some(run) = run else {
            return Ok(CloneOutcome::Cloned);
        };
        let (at, len) = (run.offset, run.len);
        let r = self
            .r
            .file
            .storage()
            .clone_range(run.src, run.src_offset, at, len)
            .map_err(|e| Error::io(format!("VHDX: cloning {len} bytes to {at:#x}"), e))?;
        pending.fresh.clear();
        if r != CloneOutcome::Cloned {
            if let Some(offset) = pending.pieces.iter().find_map(|p| p.1) {
                // Nothing points at these blocks' space: the next new blocks take it
                // (without this, a merge onto a file system that cannot clone left its first
                // block's worth of space unused in the middle of the file).
                self.session.alloc_end = offset;
            }
            pending.pieces.clear();
            return Ok(r);
        }
        self.session.unflushed = true;
        let ss = u64::from(self.sector_size());
        for (p, new_block) in std::mem::take(&mut pending.pieces) {
            let mask = SectorBitmap::full((p.src.len / ss) as usize);
            let state = self.r.entry(p.block)?.payload_state()?;
            match new_block {
                Some(offset) => self.place_block(p.block, state, offset, p.first, &mask)?,
                None if state == PayloadState::PartiallyPresent && self.is_differencing() => {
                    self.set_bits(p.block, p.first, &mask)?
                }
                None => {}
            }
        }
        Ok(r)
    }

    /// Whether the write covers the whole block with zeros and may use the ZERO state.
    fn is_zero_block_write(
        &self,
        block: u64,
        first: u64,
        data: &[u8],
        mask: &SectorBitmap,
    ) -> bool {
        first == 0
            && mask.len() as u64 == self.sectors_in_block(block)
            && mask.all()
            && !self.r.metadata.file_parameters.leave_block_allocated
            && data.iter().all(|&b| b == 0)
    }

    /// Give unallocated block `block` (in `state`) a new block of the file, zero-filled by
    /// extending the file, and its new BAT entry.
    fn allocate(
        &mut self,
        block: u64,
        state: PayloadState,
        first: u64,
        mask: &SectorBitmap,
    ) -> Result<()> {
        let offset = self.reserve(self.block_size())?;
        self.place_block(block, state, offset, first, mask)
    }

    /// Give unallocated block `block` (in `state`) the new block at `offset` (reserved):
    /// its BAT entry, and for a differencing disk the bits of the sectors `mask` selects.
    fn place_block(
        &mut self,
        block: u64,
        state: PayloadState,
        offset: u64,
        first: u64,
        mask: &SectorBitmap,
    ) -> Result<()> {
        let partial = self.is_differencing() && state == PayloadState::NotPresent;
        let new = if partial {
            PayloadState::PartiallyPresent
        } else {
            PayloadState::FullyPresent
        };
        self.set_entry(block, BatEntry::new(new.value(), offset / MIB))?;
        if partial {
            self.set_bits(block, first, mask)?;
        }
        Ok(())
    }

    /// Write the masked sectors of `data` into present block `block` by the rule of
    /// [`crate::io::masked`]: gaps of zeros in a block `fresh` from this write's allocation
    /// (its space reads as zeros), read from the file otherwise.
    fn write_runs(
        &mut self,
        block: u64,
        first: u64,
        data: &[u8],
        mask: &SectorBitmap,
        fresh: bool,
    ) -> Result<()> {
        use crate::io::masked::{self, Gaps};
        let ss = self.sector_size() as usize;
        let base = self.stored_offset(block, first, data.len())?;
        let gaps = if fresh { Gaps::Zeros } else { Gaps::FromFile };
        let mut scratch = std::mem::take(&mut self.session.scratch);
        let file = &self.r.file;
        let writeback = &mut self.session.writeback;
        let r = masked::write_masked(
            data,
            mask,
            ss,
            gaps,
            &mut scratch,
            |buf, at| file.read_into(base + at, buf),
            |bytes, at| {
                let s = file.storage();
                write(s, bytes, base + at, "payload data")?;
                // A hint ([`crate::io::Writeback`]); the crash-safe order comes from the
                // flushes of [`Vhdx::commit`].
                writeback.note(base + at, bytes.len() as u64, |o, n| {
                    s.start_writeback(o, n)
                });
                Ok(())
            },
        );
        self.session.scratch = scratch;
        self.session.unflushed = true;
        r
    }

    /// `len` bytes (a multiple of 1 MiB) of new space, 1 MiB aligned after every object of
    /// the file and every block allocated so far; the file is extended over it (zeros).
    fn reserve(&mut self, len: u64) -> Result<u64> {
        let offset = self.alloc_start();
        let end = self.grow_to(offset, len)?;
        self.session.alloc_end = end;
        self.session.unflushed = true;
        Ok(offset)
    }

    /// Where the next new block goes: after every object and every block allocated so far.
    fn alloc_start(&mut self) -> u64 {
        if self.session.alloc_end == 0 {
            self.session.alloc_end = self.end_of_objects();
        }
        self.session.alloc_end
    }

    /// Make the file at least `offset + len` bytes long (zeros); returns that end.
    fn grow_to(&mut self, offset: u64, len: u64) -> Result<u64> {
        let end = offset
            .checked_add(len)
            .ok_or_else(|| Error::InvalidParameter("VHDX: file offset overflow".into()))?;
        if end > self.r.file.file_len() {
            grow(self.r.file.storage(), end)?;
            self.r.file.written(end);
        }
        Ok(end)
    }

    /// Extend the file once for `len` more bytes of new blocks (a batch's worth), so that the
    /// blocks a batch allocates land in it without one file extension each (on ext4 each
    /// extension costs the writes into it dearly). Space left unused is given back by
    /// [`Vhdx::finish`]; nothing references it meanwhile.
    pub fn reserve_space(&mut self, len: u64) -> Result<()> {
        self.check_writable()?;
        let start = self.alloc_start();
        let r = self.grow_to(start, len).map(drop);
        self.latch(r)
    }

    /// The 1 MiB boundary after the file's end, the log and the regions. Every present
    /// payload and bitmap block lies inside the file (checked at open), and so does every
    /// soft-anchored UNMAPPED/UNDEFINED block that owns space; offsets in other entries own
    /// nothing (a garbage offset in a dynamic disk's bitmap entries, which old qemu wrote,
    /// must not make the file grow). The last block may be cut short at the file's end (old
    /// qemu wrote such files): its whole length counts.
    fn end_of_objects(&self) -> u64 {
        let r = &self.r;
        let last = self.block_count().saturating_sub(1);
        let last_end = match r.entry(last).and_then(|e| Ok((e, e.payload_state()?))) {
            Ok((e, PayloadState::FullyPresent | PayloadState::PartiallyPresent)) => {
                e.file_offset().saturating_add(self.block_size())
            }
            _ => 0,
        };
        [
            last_end,
            r.file.file_len(),
            r.header.header.log_range().end,
            r.regions.bat.range().end,
            r.regions.metadata.range().end,
        ]
        .into_iter()
        .max()
        .unwrap_or(0)
        .next_multiple_of(MIB)
    }

    /// Change BAT entry of payload block `block` in memory.
    fn set_entry(&mut self, block: u64, e: BatEntry) -> Result<()> {
        let index = self.r.geometry.payload_index(block);
        self.set_bat_index(index, e)
    }

    fn set_bat_index(&mut self, index: u64, e: BatEntry) -> Result<()> {
        let r = &mut self.r;
        r.bat.set(&r.file, index, e)
    }

    /// Set the bits of the masked sectors of differencing block `block` (a bitmap block is
    /// allocated for its chunk first when there is none).
    fn set_bits(&mut self, block: u64, first: u64, mask: &SectorBitmap) -> Result<()> {
        if self.bitmap_location(block)?.is_none() {
            let offset = self.reserve(MIB)?;
            let index = self
                .r
                .geometry
                .bitmap_index(self.r.geometry.chunk_of(block));
            self.set_bat_index(index, BatEntry::new(6, offset / MIB))?;
        }
        let (at, _) = self
            .bitmap_location(block)?
            .ok_or_else(|| Error::format("VHDX: sector bitmap block vanished"))?;
        for run in mask.runs() {
            let (mut bit, end) = (first as usize + run.start, first as usize + run.end);
            while bit < end {
                let byte = at + (bit / 8) as u64;
                let page = byte - byte % PAGE as u64;
                let mut p = self.bitmap_page(page)?;
                // Bits of this page: up to the page's end, in bits of the block.
                let page_end_bit = bit + (PAGE - (byte - page) as usize) * 8 - bit % 8;
                let stop = end.min(page_end_bit);
                let base = (page as i64 - at as i64) * 8;
                for b in bit..stop {
                    let in_page = (b as i64 - base) as usize;
                    set_bitmap_bit(&mut p, in_page, true);
                }
                self.session.bitmaps.insert(page, p);
                self.session.dirty_bitmaps.insert(page);
                bit = stop;
            }
        }
        Ok(())
    }

    /// The changed pages, as log writes.
    fn dirty_pages(&self) -> Result<Vec<Write>> {
        let mut pages = Vec::new();
        for k in self.r.bat.changed_pages() {
            pages.push(Write::Page {
                file_offset: self.r.bat.page_offset(k),
                data: self.r.bat.page(&self.r.file, k)?,
            });
        }
        for &page in &self.session.dirty_bitmaps {
            pages.push(Write::Page {
                file_offset: page,
                data: self.bitmap_page(page)?,
            });
        }
        for (&at, data) in &self.session.pages {
            pages.push(Write::Page {
                file_offset: at,
                data: data.clone(),
            });
        }
        Ok(pages)
    }

    /// Publish everything written since the last commit ([MS-VHDX] 2.3, §5.4 of
    /// vhdx-format.md): flush the data; then, per log entry of at most 126 pages (with a 1 MiB
    /// log; half the log): write the entry and flush, set LogGuid by a header update if this
    /// is the session's first entry, apply the pages in place, flush.
    ///
    /// The session's first entry shares its flush with the data: until the header update that
    /// follows names its LogGuid, no replay reads it, so the data is durable before anything
    /// can expose it either way (one flush fewer per session).
    pub fn commit(&mut self) -> Result<()> {
        self.check_writable()?;
        let r = self.commit_unlatched(false);
        self.latch(r)
    }

    /// [`Vhdx::commit`] leaving its last entry's pages written in place but not flushed: the
    /// log stays live (LogGuid set), so until they are durable a crash replays that entry.
    /// The next entry's Tail covers it (its replay replays both) and its flush makes those
    /// pages durable; [`Vhdx::finish`] flushes them before it clears LogGuid. For a session
    /// that publishes twice close together (a merge's two updates of a child's parent
    /// linkage, before and after the destination is written): one flush fewer.
    pub fn commit_live(&mut self) -> Result<()> {
        self.check_writable()?;
        let r = self.commit_unlatched(true);
        self.latch(r)
    }

    fn commit_unlatched(&mut self, keep_live: bool) -> Result<()> {
        let pages = self.dirty_pages()?;
        if pages.is_empty() && !self.session.unflushed {
            if let Some(log) = &mut self.session.log
                && log.pages_unflushed()
                && !keep_live
            {
                flush(self.r.file.storage(), "logged pages in place")?;
                log.applied_flushed();
            }
            return Ok(());
        }
        let s = self.r.file.storage();
        let log = self
            .session
            .log
            .get_or_insert_with(|| LogWriter::new(&self.r.header.header));
        let live = self.r.header.header.log_guid == log.guid;
        let data_flush = self.session.unflushed && (live || pages.is_empty());
        if data_flush {
            // Data (and the file's growth) durable before any entry that exposes it.
            flush(s, "payload data")?;
        }
        let owed = self.session.owe_file || self.session.owe_data;
        if live && owed && !pages.is_empty() {
            // The log is named already: its next entry is replayed once durable.
            self.touch_now(false)?;
        }
        let mut log = self
            .session
            .log
            .take()
            .unwrap_or_else(|| LogWriter::new(&self.r.header.header));
        if data_flush {
            // It made the pages an earlier commit_live left in place durable too.
            log.applied_flushed();
        }
        let r = self.log_pages(&mut log, &pages, keep_live);
        self.session.log = Some(log);
        r?;
        // Every path here flushed at least once, after any header update of the session.
        self.header_durable = true;
        self.session.unflushed = false;
        self.session.writeback.flushed();
        self.r.bat.published();
        self.session.dirty_bitmaps.clear();
        self.session.pages.clear();
        Ok(())
    }

    /// The log entries of `pages` (at most half the log each), each written and flushed,
    /// named by LogGuid (the first: with the GUIDs the session owes), applied in place and
    /// flushed; with `live`, the last one's pages in place are not flushed
    /// ([`Vhdx::commit_live`]).
    fn log_pages(&mut self, log: &mut LogWriter, pages: &[Write], live: bool) -> Result<()> {
        let file_len = self.r.file.file_len();
        let chunks = pages.chunks(log.max_pages());
        let last = chunks.len().saturating_sub(1);
        for (k, chunk) in chunks.enumerate() {
            // Its Tail covers the previous entry if that one's pages in place are not
            // durable; its flush makes them so.
            log.append(self.r.file.storage(), chunk, file_len)?;
            if self.r.header.header.log_guid != log.guid {
                let guid = log.guid;
                let settle = self.owed_guids()?;
                update_header(self.r.file.storage(), &mut self.r.header, |h| {
                    settle(h);
                    h.log_guid = guid
                })?;
            }
            let s = self.r.file.storage();
            for w in chunk {
                if let Write::Page { file_offset, data } = w {
                    write(s, data, *file_offset, "a logged page in place")?;
                }
            }
            if live && k == last {
                log.applied_unflushed();
            } else {
                flush(s, "logged pages in place")?;
            }
        }
        Ok(())
    }

    /// Commit, then end the write session: LogGuid cleared by a header update ([MS-VHDX]
    /// 2.3: the log is empty on a clean close). Returns the DataWriteGuid, new when anything
    /// was written. Dropping a writable [`Vhdx`] without `finish` leaves the log set, as a
    /// crash would: the next writable open replays it.
    pub fn finish(&mut self) -> Result<Uuid> {
        if !self.writable {
            return Ok(self.data_write_guid());
        }
        self.commit()?;
        if !self.r.header.header.log_guid.is_nil() {
            // Not flushed (see "Flushes"): until it is durable, a crash leaves LogGuid set
            // over a log whose entries are all applied, and replaying them changes nothing.
            let r = update_header_unflushed(self.r.file.storage(), &mut self.r.header, |h| {
                h.log_guid = Uuid::nil()
            });
            self.header_durable = false;
            self.latch(r)?;
        }
        let end = self.session.alloc_end;
        if end != 0 && self.r.file.file_len() > end {
            // Space reserved past the last new block: unreferenced, given back.
            let r = self
                .r
                .file
                .storage()
                .set_len(end)
                .map_err(|e| Error::io(format!("VHDX: giving back space past {end:#x}"), e));
            self.latch(r)?;
            self.r.file.written(end);
        }
        self.session = Session::default();
        Ok(self.data_write_guid())
    }

    /// Write `data` (whole sectors) at virtual byte `offset`: [`Vhdx::write_sectors`] per
    /// block with every sector selected. Call [`Vhdx::commit`] to publish.
    pub fn write_at(&mut self, offset: u64, data: &[u8]) -> Result<()> {
        let ss = u64::from(self.sector_size());
        if !offset.is_multiple_of(ss) || !(data.len() as u64).is_multiple_of(ss) {
            return Err(Error::InvalidParameter(format!(
                "VHDX write of {} bytes at {offset}: not whole {ss}-byte sectors",
                data.len()
            )));
        }
        let bs = self.block_size();
        let mut done = 0;
        while done < data.len() {
            let pos = offset + done as u64;
            let n = ((bs - pos % bs) as usize).min(data.len() - done);
            let mask = SectorBitmap::full(n / ss as usize);
            self.write_sectors(pos / bs, (pos % bs) / ss, &data[done..done + n], &mask)?;
            done += n;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::MemStorage;
    use crate::vhdx::create::{CreateOptions, create_dynamic};
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A storage that counts flushes and reads (and cannot clone, as [`MemStorage`]).
    #[derive(Debug)]
    struct Counting {
        inner: MemStorage,
        syncs: AtomicUsize,
        reads: AtomicUsize,
        /// The longest read, in bytes.
        longest: AtomicUsize,
    }

    fn counting(bytes: Vec<u8>) -> Arc<Counting> {
        Arc::new(Counting {
            inner: MemStorage::new(bytes),
            syncs: AtomicUsize::new(0),
            reads: AtomicUsize::new(0),
            longest: AtomicUsize::new(0),
        })
    }

    impl Storage for Counting {
        fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
            self.reads.fetch_add(1, Ordering::SeqCst);
            self.longest.fetch_max(buf.len(), Ordering::SeqCst);
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
            self.syncs.fetch_add(1, Ordering::SeqCst);
            self.inner.sync_data()
        }
    }

    /// A new 8 MiB dynamic VHDX (1 MiB blocks), opened writable over a [`Counting`] storage.
    fn dynamic() -> (Vhdx<Arc<Counting>>, Arc<Counting>) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.vhdx");
        let opts = CreateOptions {
            block_size: Some(MIB as u32),
            ..CreateOptions::default()
        };
        create_dynamic(&path, 8 * MIB, &opts)
            .unwrap()
            .finish()
            .unwrap();
        let s = counting(std::fs::read(&path).unwrap());
        (Vhdx::open(s.clone(), true).unwrap(), s)
    }

    /// A differencing child (1 MiB blocks, `size` bytes) with two sectors written from sector
    /// `first` of each `(block, first)`, opened read-only: the file reads it took to look each
    /// block's bitmap up three times, checked against what was written.
    fn bitmap_lookup_reads(size: u64, writes: &[(u64, usize)]) -> usize {
        let dir = tempfile::tempdir().unwrap();
        let (base, child) = (dir.path().join("b.vhdx"), dir.path().join("c.avhdx"));
        let opts = CreateOptions {
            block_size: Some(MIB as u32),
            ..CreateOptions::default()
        };
        create_dynamic(&base, size, &opts)
            .unwrap()
            .finish()
            .unwrap();
        let mut c = crate::vhdx::create::create_differencing(&child, &base, &opts).unwrap();
        for &(block, first) in writes {
            c.write_at(block * MIB + 512 * first as u64, &[9; 1024])
                .unwrap();
        }
        c.finish().unwrap();
        drop(c);
        let s = counting(std::fs::read(&child).unwrap());
        let v = Vhdx::open(s.clone(), false).unwrap();
        let before = s.reads.load(Ordering::SeqCst);
        for _ in 0..3 {
            for &(block, first) in writes {
                let BlockState::Present(Some(map)) = v.block_state(block).unwrap() else {
                    panic!("block {block} is partially present");
                };
                assert_eq!(map.runs().collect::<Vec<_>>(), vec![first..first + 2]);
            }
        }
        s.reads.load(Ordering::SeqCst) - before
    }

    #[test]
    fn a_read_only_handle_reads_a_shared_bitmap_page_once() {
        // The three blocks' bits share one 4 KiB page: one read of it (and of the BAT's
        // entries, which the BAT cache holds), not one per lookup.
        assert!(bitmap_lookup_reads(8 * MIB, &[(1, 1), (2, 1), (5, 1)]) <= 2);
    }

    #[test]
    fn a_read_only_handle_reads_bitmap_pages_of_one_window_once() {
        // 256 bytes of bits per 1 MiB block: blocks 1, 17 and 33 have theirs in three pages,
        // all in one window: one read of it (and of the BAT's entries).
        assert!(bitmap_lookup_reads(64 * MIB, &[(1, 1), (17, 2), (33, 3)]) <= 2);
    }

    #[test]
    fn a_refused_clone_leaves_no_unused_block_behind() {
        let (mut v, s) = dynamic();
        let end = v.end_of_objects();
        let src = tempfile::tempfile().unwrap();
        src.set_len(MIB).unwrap();
        let r = v.clone_sectors(2, 0, &src, 0, MIB).unwrap();
        assert_eq!(r, crate::io::CloneOutcome::Unsupported);
        let full = SectorBitmap::full((MIB / 512) as usize);
        v.write_sectors(2, 0, &[7; MIB as usize], &full).unwrap();
        assert_eq!(v.payload_entry(2).unwrap().file_offset(), end);
        v.finish().unwrap();
        assert_eq!(s.len().unwrap(), end + MIB);
    }

    #[test]
    fn a_session_into_new_space_flushes_three_times() {
        let (mut v, s) = dynamic();
        let full = SectorBitmap::full((MIB / 512) as usize);
        v.write_sectors(1, 0, &[7; MIB as usize], &full).unwrap();
        v.write_sectors(3, 0, &[8; MIB as usize], &full).unwrap();
        v.finish().unwrap();
        // New blocks only, so the GUID changes ride on the header naming the log (see
        // "Flushes"): data and log entry; LogGuid (and the new GUIDs); pages in place. The
        // update clearing LogGuid is written, not flushed.
        assert_eq!(s.syncs.load(Ordering::SeqCst), 3);
        assert!(v.reader().header.header.log_guid.is_nil());
        let mut back = vec![0u8; MIB as usize];
        v.read_own(3 * MIB, &mut back).unwrap();
        assert!(back.iter().all(|&b| b == 8));
        // A write into that (now present) block starts by settling the GUIDs: the unflushed
        // update that cleared LogGuid is flushed first, then the new header.
        v.write_sectors(3, 0, &[9; 512], &SectorBitmap::full(1))
            .unwrap();
        assert_eq!(s.syncs.load(Ordering::SeqCst), 5);
    }

    /// A differencing child (over a dynamic parent) in memory, opened writable, and the bytes
    /// of the file.
    fn child() -> (Vhdx<Arc<Counting>>, Arc<Counting>) {
        let dir = tempfile::tempdir().unwrap();
        let (base, child) = (dir.path().join("b.vhdx"), dir.path().join("c.avhdx"));
        let opts = CreateOptions {
            block_size: Some(MIB as u32),
            ..CreateOptions::default()
        };
        create_dynamic(&base, 8 * MIB, &opts)
            .unwrap()
            .finish()
            .unwrap();
        crate::vhdx::create::create_differencing(&child, &base, &opts)
            .unwrap()
            .finish()
            .unwrap();
        let s = counting(std::fs::read(&child).unwrap());
        (Vhdx::open(s.clone(), true).unwrap(), s)
    }

    #[test]
    fn a_locator_rewrite_reads_the_items_not_the_region_and_writes_what_a_whole_rewrite_would() {
        use crate::vhdx::format::metadata::with_parent_locator;
        // Shorter (rewritten in place), then far longer (moved past the items).
        for extra in [0usize, 3000] {
            let (mut v, s) = child();
            let m = v.reader().regions.metadata;
            let region = v.r.file.read(m.file_offset, m.length.into()).unwrap();
            let mut loc = v.parent_locator().cloned().unwrap();
            loc.entries.retain(|(k, _)| k != "absolute_win32_path");
            if extra > 0 {
                loc.entries.push((
                    "volume_path".into(),
                    format!("\\\\?\\{}", "v".repeat(extra)),
                ));
            }
            let want = with_parent_locator(&region, m.length.into(), &loc).unwrap();
            s.longest.store(0, Ordering::SeqCst);
            v.set_parent_locator(loc.clone()).unwrap();
            assert!(s.longest.load(Ordering::SeqCst) <= 128 << 10, "{extra}");
            v.finish().unwrap();
            let back = v.r.file.read(m.file_offset, m.length.into()).unwrap();
            assert!(
                back == want,
                "{extra}: the region as a whole-region rewrite makes it"
            );
            let again = Vhdx::open(s.clone(), false).unwrap();
            assert_eq!(again.parent_locator(), Some(&loc));
        }
    }

    #[test]
    fn a_live_commit_leaves_the_log_live_and_the_next_entry_replays_it_too() {
        let (mut v, s) = child();
        let m = v.reader().regions.metadata;
        let original = v.r.file.read(m.file_offset, m.length.into()).unwrap();
        // First a locator too long for its old place (moved: the table page changes)...
        let mut a = v.parent_locator().cloned().unwrap();
        a.entries
            .push(("volume_path".into(), format!("\\\\?\\{}", "v".repeat(4000))));
        let syncs = || s.syncs.load(Ordering::SeqCst);
        let before = syncs();
        v.set_parent_locator(a.clone()).unwrap();
        v.commit_live().unwrap();
        // The entry; the header naming LogGuid. The pages in place are not flushed.
        assert_eq!(syncs() - before, 2);
        assert!(!v.reader().header.header.log_guid.is_nil());
        // ...then one GUID of it changed in place (the table page unchanged).
        let mut b = a.clone();
        for (k, val) in &mut b.entries {
            if k == "parent_linkage" {
                *val = format!("{{{}}}", Uuid::new_v4());
            }
        }
        v.set_parent_locator(b.clone()).unwrap();
        v.commit().unwrap();
        // The second entry; its pages in place.
        assert_eq!(syncs() - before, 4);
        // A crash before the closing header, every page written in place lost: the replay
        // from the second entry's Tail (the first entry) restores both, the table page the
        // first alone wrote included.
        s.write_at(&original, m.file_offset).unwrap();
        let again = Vhdx::open(s.clone(), false).unwrap();
        assert_eq!(again.reader().replayed_entries(), 2);
        assert_eq!(again.parent_locator(), Some(&b));
        // Finished, nothing is left to replay, and the pages are durable before LogGuid goes.
        let (mut v, s) = child();
        v.set_parent_locator(a.clone()).unwrap();
        v.commit_live().unwrap();
        let n = s.syncs.load(Ordering::SeqCst);
        v.finish().unwrap();
        assert_eq!(s.syncs.load(Ordering::SeqCst) - n, 1, "the pages in place");
        let again = Vhdx::open(s.clone(), false).unwrap();
        assert_eq!(again.reader().replayed_entries(), 0);
        assert_eq!(again.parent_locator(), Some(&a));
    }
}
