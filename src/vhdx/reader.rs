//! A read-only reader of fixed and dynamic VHDX files over [`Storage`].
//!
//! Opening follows [MS-VHDX] 2.3.3 and qemu's order: identifier, headers, the log (replayed
//! into an in-memory overlay: the file is never written), then region tables, metadata and
//! the BAT as they read after replay. Every object is checked against the file's length
//! before anything is allocated. Differencing files are refused for now (Not Supported).

use super::bat::PagedBat;
use super::format::bat::{BatEntry, BitmapState, EntryKind, Geometry, PayloadState};
use super::format::header::{CurrentHeader, FileIdentifier, HEADER_SIZE, Header, current_header};
use super::format::log::{ReplayPlan, find_active};
use super::format::metadata::{Metadata, MetadataTable};
use super::format::region::{Regions, first_valid_region_table};
use super::format::{self as f, MIB, SLOT_SIZE};
use crate::io::Storage;
use crate::{Error, Result};

/// The largest log this reader loads into memory (Hyper-V and qemu write 1 MiB logs).
pub const MAX_LOG_BYTES: u64 = 64 * MIB;
/// The largest metadata region this reader loads (Hyper-V and qemu write 1 MiB).
pub const MAX_METADATA_BYTES: u64 = 16 * MIB;

/// The bytes of the header section ([MS-VHDX] 2.1): the identifier, both headers and both
/// region tables (64 KiB slots each); the rest of the first MiB is reserved. An open needs
/// all of it in the file, but reads only what it validates: the identifier's first page,
/// each header's 4 KiB (what its checksum covers), and the first region table, the second
/// only when the first is not valid ([`read_header_section`]).
const HEADER_SECTION_LEN: u64 = f::REGION_TABLE2_OFFSET + SLOT_SIZE as u64;
/// The bytes of the identifier an open reads: its first page (the signature and the
/// 512-byte creator are its first 520 bytes; the rest of the slot is reserved).
const IDENTIFIER_READ: u64 = 4096;

/// The file as it reads after the log is replayed: the storage with the replay plan's writes
/// on top and zeros up to the replayed length ([MS-VHDX] 2.3.3 read-only in-memory replay).
#[derive(Debug)]
pub struct Overlay<S: Storage> {
    storage: S,
    raw_len: u64,
    /// The file's length once the log is replayed.
    file_len: u64,
    plan: Option<ReplayPlan>,
}

impl<S: Storage> Overlay<S> {
    /// Whether `len` bytes at `offset` are the file's own bytes as stored (no log replayed
    /// over the file in memory, inside its real length): what a block clone of them shares.
    pub fn is_stored_as_is(&self, offset: u64, len: u64) -> bool {
        self.plan.is_none() && offset.checked_add(len).is_some_and(|e| e <= self.raw_len)
    }

    /// The storage as is (no log replayed yet).
    pub fn new(storage: S) -> Result<Overlay<S>> {
        let raw_len = storage
            .len()
            .map_err(|e| Error::io("VHDX: file length", e))?;
        Ok(Overlay {
            storage,
            raw_len,
            file_len: raw_len,
            plan: None,
        })
    }

    /// Find the active log sequence of the log `header` names and lay it over the file; the
    /// log must lie inside the file and be at most [`MAX_LOG_BYTES`].
    pub fn replay(&mut self, header: &Header) -> Result<()> {
        if u64::from(header.log_length) > MAX_LOG_BYTES {
            return Err(Error::not_supported(format!(
                "VHDX log of {} bytes (at most {MAX_LOG_BYTES})",
                header.log_length
            )));
        }
        if header.log_guid.is_nil() {
            return Ok(());
        }
        let log = self.read(header.log_offset, header.log_length.into())?;
        let plan = find_active(&log, header.log_guid)?;
        if let Some(p) = &plan {
            p.check(self.raw_len)?;
            self.file_len = p.length_after(self.raw_len);
        }
        self.plan = plan;
        Ok(())
    }

    /// The storage beneath the overlay.
    pub(crate) fn storage(&self) -> &S {
        &self.storage
    }

    /// The active sequence laid over the file, if any.
    pub(crate) fn plan(&self) -> Option<&ReplayPlan> {
        self.plan.as_ref()
    }

    /// The file was written (a replay applied, blocks appended): from now on it reads as it
    /// is, `len` bytes long, with no overlay.
    pub(crate) fn written(&mut self, len: u64) {
        self.plan = None;
        self.raw_len = len;
        self.file_len = len;
    }

    /// Entries of the active sequence laid over the file (0 for a clean log).
    pub fn replayed_entries(&self) -> usize {
        self.plan.as_ref().map_or(0, |p| p.entries.len())
    }

    /// The file's length after replay.
    pub fn file_len(&self) -> u64 {
        self.file_len
    }

    /// `len` bytes at `offset` as they read after replay; a range past the end is a format
    /// error (so no untrusted length allocates beyond the file).
    pub fn read(&self, offset: u64, len: u64) -> Result<Vec<u8>> {
        self.check_inside(offset, len)?;
        let mut buf = vec![0; len as usize];
        self.read_into(offset, &mut buf)?;
        Ok(buf)
    }

    /// [`Storage::next_data`] as the file reads after replay: with a log laid over the file
    /// (whose pages may land in a hole), every byte from `offset` on may hold data.
    pub fn next_data(&self, offset: u64) -> Result<Option<std::ops::Range<u64>>> {
        if self.plan.is_some() {
            return Ok(Some(offset..u64::MAX));
        }
        self.storage
            .next_data(offset)
            .map_err(|e| Error::io(format!("VHDX: looking for data at {offset:#x}"), e))
    }

    /// `buf.len()` bytes at `offset` as they read after replay, into `buf` (no allocation:
    /// the path block data takes); a range past the end is a format error.
    pub fn read_into(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let len = buf.len() as u64;
        let end = self.check_inside(offset, len)?;
        let stored = end.min(self.raw_len).saturating_sub(offset) as usize;
        buf[stored..].fill(0);
        if stored > 0 {
            self.storage
                .read_at(&mut buf[..stored], offset)
                .map_err(|e| Error::io(format!("VHDX: read {len} bytes at {offset:#x}"), e))?;
        }
        if let Some(p) = &self.plan {
            p.apply_to(buf, offset);
        }
        Ok(())
    }

    /// The end of `offset..offset + len`, which must lie inside the file after replay.
    fn check_inside(&self, offset: u64, len: u64) -> Result<u64> {
        offset
            .checked_add(len)
            .filter(|&e| e <= self.file_len)
            .ok_or_else(|| {
                Error::format(format!(
                    "VHDX: bytes {offset:#x}+{len:#x} are beyond the file's end {:#x}",
                    self.file_len
                ))
            })
    }
}

/// An open fixed or dynamic VHDX: its structures as they read after the log replay.
#[derive(Debug)]
pub struct VhdxReader<S: Storage> {
    pub(crate) file: Overlay<S>,
    /// The current header.
    pub header: CurrentHeader,
    /// The creator string of the file type identifier.
    pub creator: String,
    /// The BAT and metadata regions.
    pub regions: Regions,
    /// The metadata items.
    pub metadata: Metadata,
    /// The BAT's shape.
    pub geometry: Geometry,
    pub(crate) bat: PagedBat,
}

/// How [`VhdxReader::open_with`] opens a file.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Mode {
    /// Accept a differencing file (its own sectors only; the caller reads the parent).
    pub differencing: bool,
    /// Replay a dirty log onto the file and clear it ([MS-VHDX] 2.3.3) instead of in memory.
    pub writable: bool,
    /// Do not stream and validate the BAT: for opens that only rewrite metadata through the
    /// log (a parent linkage), where the block queries are never asked
    /// ([`PagedBat::unscanned`]).
    pub metadata_only: bool,
}

/// Everything of a VHDX but its BAT, as it reads after the log replay: enough to know the
/// file's identity and parent linkage cheaply (a probe reads at most the header section, the
/// log and the metadata region).
#[derive(Debug)]
pub(crate) struct Structures<S: Storage> {
    pub file: Overlay<S>,
    pub header: CurrentHeader,
    pub creator: String,
    pub regions: Regions,
    pub metadata: Metadata,
}

impl<S: Storage> Structures<S> {
    /// Identifier, headers, the log (replayed in memory, or onto the file when
    /// `mode.writable`), region tables and metadata, in [MS-VHDX] 2.3.3's order.
    pub(crate) fn open(storage: S, mode: Mode) -> Result<Structures<S>> {
        let mut file = Overlay::new(storage)?;
        let (creator, mut header) = read_header_section(&file)?;
        file.replay(&header.header)?;
        if mode.writable {
            super::journal::replay_onto_file(&mut file, &mut header)?;
        }
        // [MS-VHDX] 2.3.3: the region tables as they read after the replay.
        let table = first_valid_region_table(&file.read(f::REGION_TABLE1_OFFSET, SLOT)?, || {
            file.read(f::REGION_TABLE2_OFFSET, SLOT)
        })?;
        let regions = table.known(header.header.log_range())?;
        let metadata = load_metadata(&file, &regions, mode.differencing)?;
        Ok(Structures {
            file,
            header,
            creator,
            regions,
            metadata,
        })
    }
}

impl<S: Storage> VhdxReader<S> {
    /// Open a fixed or dynamic VHDX read-only, replaying a dirty log in memory. A differencing
    /// file is Not Supported (yet).
    pub fn open(storage: S) -> Result<VhdxReader<S>> {
        Self::open_with(storage, Mode::default())
    }

    /// Open as `mode` says: a differencing file accepted or refused, a dirty log replayed in
    /// memory or onto the file.
    pub(crate) fn open_with(storage: S, mode: Mode) -> Result<VhdxReader<S>> {
        let Structures {
            file,
            header,
            creator,
            regions,
            metadata,
        } = Structures::open(storage, mode)?;
        let fp = metadata.file_parameters;
        let geometry = Geometry::new(
            metadata.virtual_disk_size,
            fp.block_size,
            metadata.logical_sector_size,
            fp.has_parent,
        )?;
        geometry.check_bat_region(regions.bat.length.into())?;
        let file_len = file.file_len();
        let bat = if mode.metadata_only {
            PagedBat::unscanned(regions.bat.file_offset, geometry)
        } else {
            PagedBat::load(
                &file,
                regions.bat.file_offset,
                geometry,
                |kind, e| match kind {
                    EntryKind::Payload(i) => check_block(&geometry, file_len, i, e),
                    EntryKind::Bitmap(c) if fp.has_parent => check_bitmap_block(file_len, c, e),
                    _ => Ok(()),
                },
            )?
        };
        Ok(VhdxReader {
            file,
            header,
            creator,
            regions,
            metadata,
            geometry,
            bat,
        })
    }

    /// The sector bitmap entry of chunk `c`.
    pub(crate) fn bitmap_entry(&self, c: u64) -> Result<BatEntry> {
        self.bat.entry(&self.file, self.geometry.bitmap_index(c))
    }

    /// The payload entry of block `i`.
    pub(crate) fn entry(&self, i: u64) -> Result<BatEntry> {
        self.bat.entry(&self.file, self.geometry.payload_index(i))
    }

    /// The virtual disk's size in bytes.
    pub fn virtual_size(&self) -> u64 {
        self.geometry.virtual_size
    }

    /// Entries of the log's active sequence replayed in memory (0 for a clean log).
    pub fn replayed_entries(&self) -> usize {
        self.file.replayed_entries()
    }

    /// Read `buf.len()` bytes of the virtual disk at `offset`: present blocks from the file,
    /// every other state as zeros ([MS-VHDX] 2.5.1.1; PARTIALLY_PRESENT is only valid with a
    /// parent, read as present as openvmm does). Offset first, then the buffer, as in
    /// [`crate::Chain::read_at`], [`crate::Vhd::write_at`] and [`crate::vhdx::Vhdx::write_at`].
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let end = offset
            .checked_add(buf.len() as u64)
            .filter(|&e| e <= self.virtual_size());
        end.ok_or_else(|| {
            Error::InvalidParameter(format!(
                "VHDX read of {} bytes at {offset} is past the virtual size {}",
                buf.len(),
                self.virtual_size()
            ))
        })?;
        let bs = u64::from(self.geometry.block_size);
        let mut done = 0;
        while done < buf.len() {
            let pos = offset + done as u64;
            let n = ((bs - pos % bs) as usize).min(buf.len() - done);
            self.read_in_block(pos / bs, pos % bs, &mut buf[done..done + n])?;
            done += n;
        }
        Ok(())
    }

    fn read_in_block(&self, i: u64, within: u64, out: &mut [u8]) -> Result<()> {
        let e = self.entry(i)?;
        match e.payload_state()? {
            PayloadState::FullyPresent | PayloadState::PartiallyPresent => {
                self.file.read_into(e.file_offset() + within, out)?;
            }
            _ => out.fill(0),
        }
        Ok(())
    }
}

/// A present sector bitmap block lies inside the file, after the header section.
pub(crate) fn check_bitmap_block(file_len: u64, c: u64, e: BatEntry) -> Result<()> {
    if e.bitmap_state()? == BitmapState::NotPresent {
        return Ok(());
    }
    let inside = e.file_offset() >= MIB
        && e.file_offset()
            .checked_add(MIB)
            .is_some_and(|end| end <= file_len);
    if !inside {
        return Err(Error::format(format!(
            "VHDX BAT: sector bitmap block of chunk {c} at {:#x} is not inside the file",
            e.file_offset()
        )));
    }
    Ok(())
}

/// A present block's data within the virtual disk lies inside the file, after the header
/// section ([MS-VHDX] 2.5.1.1: FileOffsetMB of FULLY_/PARTIALLY_PRESENT blocks).
pub(crate) fn check_block(g: &Geometry, file_len: u64, i: u64, e: BatEntry) -> Result<()> {
    if !matches!(
        e.payload_state()?,
        PayloadState::FullyPresent | PayloadState::PartiallyPresent
    ) {
        return Ok(());
    }
    let used = u64::from(g.block_size).min(g.virtual_size - i * u64::from(g.block_size));
    let end = e
        .file_offset()
        .checked_add(used)
        .filter(|&end| end <= file_len);
    if e.file_offset() < MIB || end.is_none() {
        return Err(Error::format(format!(
            "VHDX BAT: block {i} at {:#x} is not inside the file ({file_len:#x} bytes)",
            e.file_offset()
        )));
    }
    Ok(())
}

/// A region table copy's bytes (its checksum covers the whole slot).
const SLOT: u64 = SLOT_SIZE as u64;

/// The creator and the current header of the file, by the identifier's first page and each
/// header's 4 KiB (76 KiB in all with the first region table an open reads next, not the
/// section's 320 KiB): the section must still lie whole inside the file (the error a read
/// of all of it gives).
fn read_header_section<S: Storage>(file: &Overlay<S>) -> Result<(String, CurrentHeader)> {
    file.check_inside(0, HEADER_SECTION_LEN)?;
    let creator = FileIdentifier::parse(&file.read(0, IDENTIFIER_READ)?)?.creator;
    let header = current_header(
        &file.read(f::HEADER1_OFFSET, HEADER_SIZE as u64)?,
        &file.read(f::HEADER2_OFFSET, HEADER_SIZE as u64)?,
    )?;
    Ok((creator, header))
}

/// The bytes of the metadata region a reader knows: its length, at most [`MAX_METADATA_BYTES`].
pub(crate) fn metadata_len(regions: &Regions) -> u64 {
    u64::from(regions.metadata.length).min(MAX_METADATA_BYTES)
}

/// The first bytes of a metadata region of `len` bytes that hold its table and every item
/// ([`MetadataTable::span`]), `read(n)` reading the region's first `n` bytes. The table and,
/// in every file seen, all items lie in the first 128 KiB: one read of those (the rest read
/// only when the table says so), not of the whole (usually 1 MiB, almost all unused) region.
/// Every reader of the region (an open, a parent locator rewrite) reads it this way.
pub(crate) fn read_metadata_prefix(
    len: u64,
    read: impl Fn(u64) -> Result<Vec<u8>>,
) -> Result<Vec<u8>> {
    let bytes = read(len.min(2 * SLOT_SIZE as u64))?;
    let span = MetadataTable::parse(&bytes, len)?.span();
    if span > bytes.len() as u64 {
        return read(span);
    }
    Ok(bytes)
}

/// The metadata region (at most [`MAX_METADATA_BYTES`] of it); differencing is refused unless
/// `differencing`.
fn load_metadata<S: Storage>(
    file: &Overlay<S>,
    regions: &Regions,
    differencing: bool,
) -> Result<Metadata> {
    let m = regions.metadata;
    let len = metadata_len(regions);
    let bytes = read_metadata_prefix(len, |n| file.read(m.file_offset, n))?;
    let metadata = Metadata::parse_prefix(&bytes, len)?;
    if metadata.file_parameters.has_parent && !differencing {
        return Err(Error::not_supported(
            "differencing VHDX: reading through a parent is not implemented yet",
        ));
    }
    Ok(metadata)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::MemStorage;
    use crate::vhdx::create::{CreateOptions, create_dynamic};
    use std::sync::Mutex;

    /// A storage that records every read's range.
    #[derive(Debug)]
    struct Recording {
        inner: MemStorage,
        reads: Mutex<Vec<std::ops::Range<u64>>>,
    }

    impl Storage for Recording {
        fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
            let end = offset + buf.len() as u64;
            self.reads.lock().unwrap().push(offset..end);
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
            self.inner.sync_data()
        }
    }

    /// The bytes of a new 8 MiB dynamic VHDX.
    fn image() -> Vec<u8> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.vhdx");
        create_dynamic(&path, 8 * MIB, &CreateOptions::default())
            .unwrap()
            .finish()
            .unwrap();
        std::fs::read(&path).unwrap()
    }

    /// Open `bytes` (read-only, differencing accepted) and list the reads of the header
    /// section (the first MiB).
    fn open(bytes: Vec<u8>) -> (Result<Regions>, Vec<std::ops::Range<u64>>) {
        let s = std::sync::Arc::new(Recording {
            inner: MemStorage::new(bytes),
            reads: Mutex::new(Vec::new()),
        });
        let mode = Mode {
            differencing: true,
            ..Mode::default()
        };
        let r = Structures::open(s.clone(), mode).map(|s| s.regions);
        let reads = s.reads.lock().unwrap().clone();
        (r, reads.into_iter().filter(|r| r.start < MIB).collect())
    }

    fn flip(bytes: &mut [u8], at: u64) {
        bytes[at as usize] ^= 0xFF;
    }

    #[test]
    fn an_open_reads_of_the_header_section_what_it_validates() {
        let (regions, reads) = open(image());
        regions.unwrap();
        let t1 = f::REGION_TABLE1_OFFSET;
        assert_eq!(
            reads,
            [
                0..IDENTIFIER_READ,
                f::HEADER1_OFFSET..f::HEADER1_OFFSET + HEADER_SIZE as u64,
                f::HEADER2_OFFSET..f::HEADER2_OFFSET + HEADER_SIZE as u64,
                t1..t1 + SLOT,
            ]
        );
    }

    #[test]
    fn the_second_region_table_is_read_when_the_first_is_not_valid() {
        let good = open(image()).0.unwrap();
        let mut bytes = image();
        flip(&mut bytes, f::REGION_TABLE1_OFFSET + 100);
        let (regions, reads) = open(bytes.clone());
        assert_eq!(regions.unwrap(), good);
        let t2 = f::REGION_TABLE2_OFFSET;
        assert_eq!(reads.last(), Some(&(t2..t2 + SLOT)));

        flip(&mut bytes, f::REGION_TABLE2_OFFSET + 100);
        let e = open(bytes).0.unwrap_err().to_string();
        assert!(e.contains("no valid VHDX region table"), "{e}");
        assert!(
            e.contains(&format!("offset {}", f::REGION_TABLE1_OFFSET)),
            "{e}"
        );
        assert!(
            e.contains(&format!("offset {}", f::REGION_TABLE2_OFFSET)),
            "{e}"
        );
    }

    #[test]
    fn a_file_shorter_than_the_header_section_is_refused_before_any_read() {
        let mut bytes = image();
        bytes.truncate(HEADER_SECTION_LEN as usize - 1);
        let (r, reads) = open(bytes);
        let e = r.unwrap_err().to_string();
        assert!(
            e.contains("bytes 0x0+0x50000 are beyond the file's end"),
            "{e}"
        );
        assert!(reads.is_empty());
    }
}
