//! Inspecting a VHDX: one pass over every structure that lists every problem it finds instead
//! of stopping at the first, in the [`crate::check`] vocabulary ([`Finding`], [`Severity`]),
//! and keeps what it read for `info`.
//!
//! The pass reads what an opener reads, in its order ([MS-VHDX] 2.3.3): the file identifier,
//! both headers and the current one, the log (its active sequence is laid over the file in
//! memory, never written), then both region tables, the metadata region and the BAT as they
//! read after replay. Each structure is judged by the same `format` parsers the reader uses,
//! so no rule about what is valid is written twice; on top of them come the checks only a
//! checker needs: both copies present and equal, every BAT entry (states, reserved bits,
//! offsets inside the file, bitmaps of PARTIALLY_PRESENT blocks), and no two objects of the
//! file (header section, log, regions, payload and sector bitmap blocks) overlapping, found by
//! one sort and sweep.
//!
//! Memory is bounded: the log and the metadata region by the reader's limits, the BAT is
//! streamed in 64 KiB pieces (a chunk's PARTIALLY_PRESENT blocks wait for its bitmap entry: at
//! most a chunk ratio of them), the objects of the sweep (16 bytes each) by the present entries
//! of the table, which must lie inside the file, and findings of one kind by
//! [`MAX_FINDINGS_PER_CODE`].

use std::collections::BTreeMap;
use std::path::Path;

use super::format::bat::{BatEntry, BitmapState, EntryKind, Geometry, PayloadState, bitmap_bit};
use super::format::header::{CurrentHeader, FileIdentifier, Header, current_header};
use super::format::metadata::{KNOWN_LOCATOR_KEYS, Metadata, MetadataTable};
use super::format::region::{RegionTable, Regions, choose_region_table};
use super::format::{self as f, MIB, SLOT_SIZE};
use super::reader::{MAX_METADATA_BYTES, Overlay, check_bitmap_block, check_block};
use crate::check::{CheckReport, Finding, Severity, Sink};
use crate::error::{Error, Result, ReturnCode};
use crate::io::paged::CHUNK;
use crate::io::{FileStorage, Storage};
use crate::problem::ProblemCode;

/// At most this many findings of one code are listed; the rest are counted in one note.
pub const MAX_FINDINGS_PER_CODE: usize = 32;

/// A structure as it was read from one of its two copies: parsed, or why not.
pub type Copy<T> = std::result::Result<T, String>;

/// What the log says.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum LogState {
    /// No current header: the log cannot be found.
    Unknown,
    /// LogGuid is zero: nothing to replay.
    Clean,
    /// The active sequence that an opener replays (in memory here).
    Dirty {
        /// Entries of the active sequence.
        entries: usize,
        /// Writes (data and zero descriptors) they carry.
        writes: usize,
        /// Bytes those writes cover.
        bytes: u64,
        /// Sequence number of the oldest and of the head entry.
        sequences: (u64, u64),
        /// The file's length after replay.
        length_after: u64,
    },
    /// LogGuid is set but the log cannot be replayed (the reason).
    Unreplayable(String),
}

/// Counts of the BAT's entries by state.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BlockCounts {
    /// Payload blocks by state ([`PayloadState::name`]); reserved states under `reserved`.
    pub payload: BTreeMap<&'static str, u64>,
    /// Present sector bitmap blocks (differencing disks).
    pub bitmaps_present: u64,
}

/// Everything one pass over a VHDX read, and every problem it found.
#[derive(Clone, Debug, Default)]
pub struct Inspection {
    /// The file's length in bytes (before any replay).
    pub file_len: u64,
    /// The creator string of the file identifier, when it has its signature.
    pub creator: Option<String>,
    /// The header at 64 KiB and the one at 128 KiB.
    pub headers: [Option<Copy<Header>>; 2],
    /// The current header, when one is valid.
    pub current: Option<CurrentHeader>,
    /// The log.
    pub log: Option<LogState>,
    /// Whether each region table copy is valid.
    pub region_tables_valid: [bool; 2],
    /// The region table in use (the first valid copy).
    pub region_table: Option<RegionTable>,
    /// The BAT and metadata regions.
    pub regions: Option<Regions>,
    /// The metadata table.
    pub metadata_table: Option<MetadataTable>,
    /// The metadata items, validated.
    pub metadata: Option<Metadata>,
    /// The BAT's shape.
    pub geometry: Option<Geometry>,
    /// The BAT's entries by state.
    pub blocks: BlockCounts,
    /// Every problem, in the order the structures were checked.
    pub findings: Vec<Finding>,
}

impl Inspection {
    /// True when at least one finding is an error.
    pub fn has_errors(&self) -> bool {
        self.findings.iter().any(|f| f.severity == Severity::Error)
    }
}

/// Check the VHDX at `path` (opened read-only; nothing is written). Fails only when it cannot
/// be opened or its length read; everything wrong inside it is a finding.
/// `deep` also reads the sector bitmap of every PARTIALLY_PRESENT block.
pub fn check_file(path: &Path, deep: bool) -> Result<CheckReport> {
    let insp = inspect_path(path, deep)?;
    Ok(CheckReport {
        files: vec![path.to_path_buf()],
        findings: insp.findings,
    })
}

/// [`inspect`] the VHDX at `path`, opened read-only.
pub fn inspect_path(path: &Path, deep: bool) -> Result<Inspection> {
    let file = crate::layer::files::open_regular_file(path, false)?;
    inspect(FileStorage::new(file), path, deep).map_err(|e| e.in_file(path))
}

/// Inspect the VHDX held by `storage` (see the module docs); `path` names it in findings.
/// `deep` also reads the sector bitmap of every PARTIALLY_PRESENT block of a differencing disk:
/// one without any bit set (a note) or with bits past the virtual size (a warning).
pub fn inspect<S: Storage>(storage: S, path: &Path, deep: bool) -> Result<Inspection> {
    let mut file = Overlay::new(storage)?;
    let mut p = Pass {
        sink: Sink::new(path, Some(MAX_FINDINGS_PER_CODE)),
        deep,
        insp: Inspection {
            file_len: file.file_len(),
            ..Inspection::default()
        },
    };
    let start = p.header_section(&file);
    p.identifier(&start);
    p.headers(&start);
    p.log(&mut file);
    let start = p.header_section(&file); // the region tables as they read after replay
    p.region_tables(&start, file.file_len());
    p.metadata(&file);
    p.bat(&file);
    Ok(p.finish())
}

struct Pass<'a> {
    sink: Sink<'a>,
    deep: bool,
    insp: Inspection,
}

/// The finding code for an error of a parser: Not Supported keeps its own code, so that the
/// return code a strict open gives (32770 instead of 32776) shows in the report too.
fn code_of(e: &Error, code: ProblemCode) -> ProblemCode {
    if e.return_code() == ReturnCode::NotSupported {
        ProblemCode::NotSupported
    } else {
        code
    }
}

/// The message of an error without the file name (the finding names the file).
fn message_of(e: &Error) -> String {
    match e {
        Error::Format { detail, .. } | Error::NotSupported { detail, .. } => detail.clone(),
        e => e.to_string(),
    }
}

/// What a finding about one damaged copy says when the other copy is valid.
fn repair_note(other_valid: bool) -> &'static str {
    if other_valid {
        "; `vhd-merge repair` rewrites it from the other copy"
    } else {
        ""
    }
}

fn slot(start: &[u8], offset: u64) -> &[u8] {
    start
        .get(offset as usize..offset as usize + SLOT_SIZE)
        .unwrap_or(&[])
}

impl Pass<'_> {
    fn add(
        &mut self,
        severity: Severity,
        code: ProblemCode,
        structure: impl Into<String>,
        offset: Option<u64>,
        message: String,
    ) {
        self.sink
            .add(severity, code, structure, offset, None, message);
    }

    /// A finding about payload block `i` (its name is made only when one is added: the BAT
    /// may have millions of entries).
    fn block_finding(
        &mut self,
        severity: Severity,
        code: ProblemCode,
        i: u64,
        at: Option<u64>,
        message: String,
    ) {
        self.sink
            .add(severity, code, format!("block {i}"), at, Some(i), message);
    }

    fn add_error(&mut self, code: ProblemCode, structure: &str, offset: Option<u64>, e: &Error) {
        self.add(
            Severity::Error,
            code_of(e, code),
            structure,
            offset,
            message_of(e),
        );
    }

    fn finish(mut self) -> Inspection {
        self.insp.findings = self.sink.finish();
        self.insp
    }

    /// The first MiB as it reads now (zeros past the end of a short file).
    fn header_section<S: Storage>(&mut self, file: &Overlay<S>) -> Vec<u8> {
        let len = file.file_len().min(MIB);
        let mut start = file.read(0, len).unwrap_or_else(|e| {
            self.add_error(ProblemCode::Unreadable, "file", Some(0), &e);
            Vec::new()
        });
        start.resize(MIB as usize, 0);
        start
    }

    fn identifier(&mut self, start: &[u8]) {
        if self.insp.file_len < MIB {
            let message = format!(
                "the file is {} bytes, shorter than the 1 MiB header section",
                self.insp.file_len
            );
            self.add(
                Severity::Error,
                ProblemCode::Truncated,
                "file",
                None,
                message,
            );
        }

        match FileIdentifier::parse(start) {
            Ok(id) => self.insp.creator = Some(id.creator),
            Err(e) => self.add_error(ProblemCode::Identifier, "file identifier", Some(0), &e),
        }
    }

    /// Both headers, and the current one ([MS-VHDX] 2.2.2).
    fn headers(&mut self, start: &[u8]) {
        let offsets = [f::HEADER1_OFFSET, f::HEADER2_OFFSET];
        let parsed = offsets.map(|off| Header::parse(slot(start, off), off));
        let note = repair_note(parsed.iter().any(|p| p.is_ok()));
        for (i, p) in parsed.into_iter().enumerate() {
            if let Err(e) = &p {
                let what = format!("header {}", i + 1);
                let message = format!("{}{note}", message_of(e));
                self.add(
                    Severity::Error,
                    ProblemCode::HeaderBad,
                    what,
                    Some(offsets[i]),
                    message,
                );
            }
            self.insp.headers[i] = Some(p.map_err(|e| message_of(&e)));
        }
        match current_header(slot(start, offsets[0]), slot(start, offsets[1])) {
            Ok(cur) => self.current_header_notes(&cur),
            Err(e) if self.sink.counts.contains_key(&ProblemCode::HeaderBad) => {
                let _ = e; // both copies bad: already listed, one by one
            }
            Err(e) => self.add_error(ProblemCode::HeaderConflict, "headers", None, &e),
        }
    }

    fn current_header_notes(&mut self, cur: &CurrentHeader) {
        let h = &cur.header;
        let both_valid = self.insp.headers.iter().all(|h| matches!(h, Some(Ok(_))));
        let equal = both_valid && self.insp.headers[0] == self.insp.headers[1];
        if equal {
            let message = format!(
                "both headers are identical (sequence number {}), as Disk2vhd writes them",
                h.sequence_number
            );
            self.add(
                Severity::Info,
                ProblemCode::HeadersIdentical,
                "headers",
                None,
                message,
            );
        }
        if h.data_write_guid.is_nil() {
            let message = "DataWriteGuid is zero: a child cannot link to this disk reliably";
            let at = Some([f::HEADER1_OFFSET, f::HEADER2_OFFSET][cur.slot]);
            self.add(
                Severity::Warning,
                ProblemCode::NilGuid,
                "header",
                at,
                message.into(),
            );
        }
        self.insp.current = Some(cur.clone());
    }

    /// The log: inside the file, and its active sequence, laid over `file` ([MS-VHDX] 2.3.3).
    fn log<S: Storage>(&mut self, file: &mut Overlay<S>) {
        let Some(cur) = self.insp.current.clone() else {
            self.insp.log = Some(LogState::Unknown);
            return;
        };
        let h = &cur.header;
        let range = h.log_range();
        if range.end > file.file_len() {
            let message = format!(
                "the log {:#x}..{:#x} reaches past the file's end {:#x}",
                range.start,
                range.end,
                file.file_len()
            );
            self.add(
                Severity::Error,
                ProblemCode::LogOutside,
                "log",
                Some(range.start),
                message,
            );
        }
        let state = match file.replay(h) {
            Err(e) => {
                self.add_error(ProblemCode::LogUnreplayable, "log", Some(h.log_offset), &e);
                LogState::Unreplayable(message_of(&e))
            }
            Ok(()) => match file.plan() {
                None => LogState::Clean,
                Some(plan) => {
                    let state = LogState::Dirty {
                        entries: plan.entries.len(),
                        writes: plan.writes().count(),
                        bytes: plan
                            .writes()
                            .map(|(_, w)| w.range().end - w.range().start)
                            .sum(),
                        sequences: (
                            plan.entries.first().map_or(0, |e| e.header.sequence_number),
                            plan.head().map_or(0, |e| e.header.sequence_number),
                        ),
                        length_after: file.file_len(),
                    };
                    self.dirty_log_note(&state, h.log_offset);
                    state
                }
            },
        };
        self.insp.log = Some(state);
    }

    fn dirty_log_note(&mut self, state: &LogState, offset: u64) {
        let LogState::Dirty {
            entries, writes, ..
        } = state
        else {
            return;
        };
        let message = format!(
            "the log holds {entries} entr{} ({writes} write(s)) not yet applied to the file: \
             the file was not closed cleanly. This check (and every read-only open here) \
             replays them in memory; qemu refuses to open the file read-only and libvhdi \
             ignores them. `vhd-merge repair` replays them onto the file",
            if *entries == 1 { "y" } else { "ies" }
        );
        self.add(
            Severity::Warning,
            ProblemCode::LogDirty,
            "log",
            Some(offset),
            message,
        );
    }

    /// Both region table copies, the one in use, and its regions ([MS-VHDX] 2.2.3).
    fn region_tables(&mut self, start: &[u8], file_len: u64) {
        let offsets = [f::REGION_TABLE1_OFFSET, f::REGION_TABLE2_OFFSET];
        let parsed = offsets.map(|off| RegionTable::parse(slot(start, off), off));
        let note = repair_note(parsed.iter().any(|p| p.is_ok()));
        for (i, p) in parsed.iter().enumerate() {
            match p {
                Ok(_) => self.insp.region_tables_valid[i] = true,
                Err(e) => {
                    let what = format!("region table {}", i + 1);
                    let message = format!("{}{note}", message_of(e));
                    let at = Some(offsets[i]);
                    self.add(
                        Severity::Error,
                        ProblemCode::RegionTableBad,
                        what,
                        at,
                        message,
                    );
                }
            }
        }
        let Ok((table, differ)) =
            choose_region_table(slot(start, offsets[0]), slot(start, offsets[1]))
        else {
            return; // both copies bad: listed above
        };
        if differ && self.insp.region_tables_valid == [true, true] {
            let message = "the two region tables are valid but differ: the first is used \
                           (as qemu does); `vhd-merge repair` rewrites the second from it";
            let at = Some(offsets[1]);
            self.add(
                Severity::Error,
                ProblemCode::RegionTablesDiffer,
                "region table 2",
                at,
                message.into(),
            );
        }
        let log = self
            .insp
            .current
            .as_ref()
            .map_or(0..0, |c| c.header.log_range());
        match table.known(log) {
            Ok(regions) => self.regions_inside(&regions, file_len),
            Err(e) => self.add_error(ProblemCode::Regions, "region table", None, &e),
        }
        self.insp.region_table = Some(table);
    }

    fn regions_inside(&mut self, regions: &Regions, file_len: u64) {
        for (name, r) in [("BAT", regions.bat), ("metadata", regions.metadata)] {
            let range = r.range();
            if range.end > file_len {
                let message = format!(
                    "the {name} region {:#x}..{:#x} reaches past the file's end {file_len:#x}",
                    range.start, range.end
                );
                self.add(
                    Severity::Error,
                    ProblemCode::RegionOutside,
                    name,
                    Some(range.start),
                    message,
                );
            }
        }
        self.insp.regions = Some(*regions);
    }

    /// The metadata table and items ([MS-VHDX] 2.6).
    fn metadata<S: Storage>(&mut self, file: &Overlay<S>) {
        let Some(regions) = self.insp.regions else {
            return;
        };
        let m = regions.metadata;
        let len = u64::from(m.length).min(MAX_METADATA_BYTES);
        let bytes = match file.read(m.file_offset, len) {
            Ok(b) => b,
            Err(e) => {
                return self.add_error(
                    ProblemCode::Unreadable,
                    "metadata",
                    Some(m.file_offset),
                    &e,
                );
            }
        };
        let at = Some(m.file_offset);
        let table = match MetadataTable::parse(&bytes, len) {
            Ok(t) => t,
            Err(e) => return self.add_error(ProblemCode::MetadataBad, "metadata", at, &e),
        };
        self.insp.metadata_table = Some(table);
        match Metadata::parse(&bytes) {
            Ok(md) => {
                self.locator_notes(&md);
                self.insp.metadata = Some(md);
            }
            Err(e) => self.add_error(ProblemCode::MetadataBad, "metadata", at, &e),
        }
    }

    fn locator_notes(&mut self, md: &Metadata) {
        let Some(pl) = &md.parent_locator else { return };
        let own = self.insp.current.as_ref().map(|c| c.header.data_write_guid);
        if let (Ok(link), Some(own)) = (pl.parent_linkage(), own)
            && link == own
        {
            let message = format!(
                "parent_linkage {link} is this disk's own DataWriteGuid: the chain is a cycle"
            );
            self.add(
                Severity::Error,
                ProblemCode::SelfParent,
                "parent locator",
                None,
                message,
            );
        }
        for (k, _) in &pl.entries {
            if !KNOWN_LOCATOR_KEYS.contains(&k.as_str()) {
                let message = format!("parent locator key {k:?} is not one this tool knows");
                self.add(
                    Severity::Info,
                    ProblemCode::LocatorKey,
                    "parent locator",
                    None,
                    message,
                );
            }
        }
    }

    /// The BAT: its size, every payload and sector bitmap entry, and the overlap sweep. The
    /// table is streamed in [`CHUNK`]-byte pieces (a 64 TiB disk with 1 MiB blocks has a
    /// 512 MiB BAT); the PARTIALLY_PRESENT blocks of a chunk wait for its sector bitmap entry,
    /// which follows them in the table.
    fn bat<S: Storage>(&mut self, file: &Overlay<S>) {
        let (Some(md), Some(regions)) = (self.insp.metadata.clone(), self.insp.regions) else {
            return;
        };
        let fp = md.file_parameters;
        let g = match Geometry::new(
            md.virtual_disk_size,
            fp.block_size,
            md.logical_sector_size,
            fp.has_parent,
        )
        .and_then(|g| g.check_bat_region(regions.bat.length.into()).map(|()| g))
        {
            Ok(g) => g,
            Err(e) => {
                return self.add_error(
                    ProblemCode::BatSize,
                    "BAT",
                    Some(regions.bat.file_offset),
                    &e,
                );
            }
        };
        self.insp.geometry = Some(g);
        let mut walk = Walk {
            geometry: g,
            file_len: file.file_len(),
            objects: Objects::of_file(self.insp.current.as_ref(), &regions),
            partial: Vec::new(),
        };
        let (offset, len) = (regions.bat.file_offset, g.entries_needed() * 8);
        let mut at = 0;
        while at < len {
            let bytes = match file.read(offset + at, CHUNK.min(len - at)) {
                Ok(b) => b,
                Err(e) => {
                    return self.add_error(ProblemCode::Unreadable, "BAT", Some(offset + at), &e);
                }
            };
            for (j, raw) in bytes.chunks_exact(8).enumerate() {
                let e = BatEntry(u64::from_le_bytes(raw.try_into().unwrap_or_default()));
                match g.entry_kind(at / 8 + j as u64) {
                    EntryKind::Payload(i) => self.payload_entry(&mut walk, i, e),
                    EntryKind::Bitmap(c) => self.bitmap_entry(file, &mut walk, c, e),
                    EntryKind::Unused => {}
                }
            }
            at += CHUNK;
        }
        self.overlaps(walk.objects);
    }
}

/// What the BAT pass carries from entry to entry.
struct Walk {
    geometry: Geometry,
    file_len: u64,
    objects: Objects,
    /// The PARTIALLY_PRESENT blocks (inside the file) of the chunk being read.
    partial: Vec<(u64, BatEntry)>,
}

impl Walk {
    /// The bytes of the file block `i` uses: its block, cut at the virtual size.
    fn used(&self, i: u64) -> u64 {
        let bs = u64::from(self.geometry.block_size);
        bs.min(
            self.geometry
                .virtual_size
                .saturating_sub(i.saturating_mul(bs)),
        )
    }
}

fn bitmap_name(c: u64) -> String {
    format!("bitmap block {c}")
}

/// Bits 3-19 of a BAT entry, reserved ([MS-VHDX] 2.5.1).
const RESERVED_BITS: u64 = 0xF_FFF8;

impl Pass<'_> {
    fn payload_entry(&mut self, w: &mut Walk, i: u64, e: BatEntry) {
        let at = Some(e.file_offset());
        let state = match e.payload_state() {
            Ok(s) => s,
            Err(err) => {
                *self.insp.blocks.payload.entry("reserved").or_insert(0) += 1;
                let m = message_of(&err);
                return self.block_finding(Severity::Error, ProblemCode::BatState, i, at, m);
            }
        };
        *self.insp.blocks.payload.entry(state.name()).or_insert(0) += 1;
        if e.0 & RESERVED_BITS != 0 {
            let m = format!("BAT entry {:#018x} has reserved bits 3-19 set", e.0);
            self.block_finding(Severity::Warning, ProblemCode::BatReserved, i, at, m);
        }
        match state {
            PayloadState::FullyPresent | PayloadState::PartiallyPresent => {}
            PayloadState::NotPresent if e.file_offset() != 0 => {
                let m = format!(
                    "NOT_PRESENT block has file offset {:#x}, not 0",
                    e.file_offset()
                );
                return self.block_finding(Severity::Info, ProblemCode::BatOffset, i, at, m);
            }
            _ => return,
        }
        if let Err(err) = check_block(&w.geometry, w.file_len, i, e) {
            let m = format!("{} ({})", message_of(&err), state.name());
            return self.block_finding(Severity::Error, ProblemCode::BlockOutside, i, at, m);
        }
        w.objects.push(e.file_offset(), w.used(i), Obj::Payload(i));
        match state {
            PayloadState::PartiallyPresent if w.geometry.has_parent => w.partial.push((i, e)),
            PayloadState::PartiallyPresent => {
                let m = "PARTIALLY_PRESENT in a disk without a parent: read as fully present";
                self.block_finding(
                    Severity::Warning,
                    ProblemCode::PartialNoParent,
                    i,
                    at,
                    m.into(),
                );
            }
            _ => {}
        }
    }

    /// The sector bitmap entry of chunk `c` (only a differencing disk's count), then the
    /// chunk's PARTIALLY_PRESENT blocks that need it.
    fn bitmap_entry<S: Storage>(&mut self, file: &Overlay<S>, w: &mut Walk, c: u64, e: BatEntry) {
        let at = Some(e.file_offset());
        if !w.geometry.has_parent {
            if e.0 != 0 {
                // Old qemu wrote garbage here (qemu #727): readers ignore these entries.
                let m = format!(
                    "sector bitmap entry {:#018x} in a disk without a parent is ignored",
                    e.0
                );
                self.add(
                    Severity::Info,
                    ProblemCode::BitmapEntryIgnored,
                    bitmap_name(c),
                    at,
                    m,
                );
            }
            return;
        }
        let usable = match e.bitmap_state() {
            Err(err) => {
                self.add_error(ProblemCode::BatState, &bitmap_name(c), at, &err);
                false
            }
            Ok(BitmapState::NotPresent) => false,
            Ok(BitmapState::Present) => match check_bitmap_block(w.file_len, c, e) {
                Err(err) => {
                    self.add_error(ProblemCode::BitmapOutside, &bitmap_name(c), at, &err);
                    return w.partial.clear(); // the blocks' bitmap is named already
                }
                Ok(()) => {
                    self.insp.blocks.bitmaps_present += 1;
                    w.objects.push(e.file_offset(), MIB, Obj::Bitmap(c));
                    true
                }
            },
        };
        for (i, b) in std::mem::take(&mut w.partial) {
            if !usable {
                let m = format!(
                    "PARTIALLY_PRESENT block but chunk {c} has no sector bitmap block: which \
                     sectors it holds is unknown"
                );
                self.block_finding(
                    Severity::Error,
                    ProblemCode::BitmapMissing,
                    i,
                    Some(b.file_offset()),
                    m,
                );
            } else if self.deep {
                self.partial_bitmap(file, w, i, e);
            }
        }
    }

    /// Deep: the bits of PARTIALLY_PRESENT block `i`, whose chunk's bitmap block `sb` lies
    /// inside the file.
    fn partial_bitmap<S: Storage>(&mut self, file: &Overlay<S>, w: &Walk, i: u64, sb: BatEntry) {
        let g = &w.geometry;
        let slice = g.bitmap_slice(i);
        let at = sb.file_offset() + slice.start as u64;
        let bits = match file.read(at, slice.len() as u64) {
            Ok(b) => b,
            Err(err) => {
                return self.add_error(
                    ProblemCode::Unreadable,
                    &bitmap_name(g.chunk_of(i)),
                    Some(at),
                    &err,
                );
            }
        };
        let sectors = (w.used(i) / u64::from(g.logical_sector_size)) as usize;
        let ones = |b: &[u8]| b.iter().map(|b| b.count_ones() as usize).sum::<usize>();
        let total = ones(&bits);
        let inside = ones(&bits[..sectors / 8])
            + (sectors / 8 * 8..sectors)
                .filter(|&n| bitmap_bit(&bits, n))
                .count();
        if total == 0 {
            let m =
                "PARTIALLY_PRESENT block with no sector bit set: it reads wholly from the parent";
            self.block_finding(
                Severity::Info,
                ProblemCode::PartialEmpty,
                i,
                Some(at),
                m.into(),
            );
        }
        if total > inside {
            let m = format!(
                "{} sector bitmap bit(s) set past the virtual size ({} bytes); nothing reads them",
                total - inside,
                g.virtual_size
            );
            self.block_finding(
                Severity::Warning,
                ProblemCode::BitmapPastEnd,
                i,
                Some(at),
                m,
            );
        }
    }

    /// Every pair of overlapping objects, in file order ([MS-VHDX] 2.1: objects never overlap).
    fn overlaps(&mut self, mut objects: Objects) {
        objects.0.sort_unstable_by_key(|o| (o.start, o.len));
        let mut reach: Option<(u64, Obj)> = None;
        for o in objects.0 {
            let (start, end, obj) = (o.start, o.end(), Obj::unpack(o.tag));
            if let Some((r_end, r_obj)) = reach
                && start < r_end
            {
                let m = format!(
                    "{} at {start:#x}..{end:#x} overlaps {} (which ends at {r_end:#x})",
                    obj.name(),
                    r_obj.name()
                );
                let (name, block) = (obj.name(), obj.block());
                self.sink.add(
                    Severity::Error,
                    ProblemCode::Overlap,
                    name,
                    Some(start),
                    block,
                    m,
                );
            }
            if reach.is_none_or(|(r_end, _)| end > r_end) {
                reach = Some((end, obj));
            }
        }
    }
}

/// One object of the file, for the overlap sweep.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Obj {
    HeaderSection,
    Log,
    BatRegion,
    MetadataRegion,
    Payload(u64),
    Bitmap(u64),
}

impl Obj {
    fn name(self) -> String {
        match self {
            Obj::HeaderSection => "the header section".into(),
            Obj::Log => "the log".into(),
            Obj::BatRegion => "the BAT region".into(),
            Obj::MetadataRegion => "the metadata region".into(),
            Obj::Payload(i) => format!("block {i}"),
            Obj::Bitmap(c) => format!("bitmap block {c}"),
        }
    }

    fn block(self) -> Option<u64> {
        match self {
            Obj::Payload(i) => Some(i),
            _ => None,
        }
    }

    /// The object in 32 bits: 2 bits of kind, 30 of index (a disk has at most 2^26 blocks:
    /// 64 TiB in 1 MiB blocks).
    fn pack(self) -> u32 {
        let index = |i: u64| (i as u32) & INDEX_MASK;
        match self {
            Obj::HeaderSection => 0,
            Obj::Log => 1,
            Obj::BatRegion => 2,
            Obj::MetadataRegion => 3,
            Obj::Payload(i) => 1 << 30 | index(i),
            Obj::Bitmap(c) => 2 << 30 | index(c),
        }
    }

    fn unpack(tag: u32) -> Obj {
        let index = u64::from(tag & INDEX_MASK);
        match (tag >> 30, index) {
            (1, i) => Obj::Payload(i),
            (2, c) => Obj::Bitmap(c),
            (_, 1) => Obj::Log,
            (_, 2) => Obj::BatRegion,
            (_, 3) => Obj::MetadataRegion,
            _ => Obj::HeaderSection,
        }
    }
}

const INDEX_MASK: u32 = (1 << 30) - 1;

/// One object in 16 bytes (a hostile BAT can make millions): its start, its length (at most
/// 4 GiB: the log and regions have u32 lengths, blocks at most 256 MiB) and [`Obj::pack`].
struct Object {
    start: u64,
    len: u32,
    tag: u32,
}

impl Object {
    fn end(&self) -> u64 {
        self.start.saturating_add(self.len.into())
    }
}

/// The objects of a file.
struct Objects(Vec<Object>);

impl Objects {
    /// The header section, the log and the two regions.
    fn of_file(cur: Option<&CurrentHeader>, regions: &Regions) -> Objects {
        let mut o = Objects(Vec::new());
        o.push(0, MIB, Obj::HeaderSection);
        if let Some(c) = cur {
            o.push(c.header.log_offset, c.header.log_length.into(), Obj::Log);
        }
        o.push(
            regions.bat.file_offset,
            regions.bat.length.into(),
            Obj::BatRegion,
        );
        let m = regions.metadata;
        o.push(m.file_offset, m.length.into(), Obj::MetadataRegion);
        o
    }

    fn push(&mut self, start: u64, len: u64, obj: Obj) {
        self.0.push(Object {
            start,
            len: u32::try_from(len).unwrap_or(u32::MAX),
            tag: obj.pack(),
        });
    }
}
