//! The log ([MS-VHDX] 2.3): entries, finding the active sequence (2.3.3), the replay plan it
//! yields, and building entries for a writer.

use uuid::Uuid;

use super::{crc32c_zeroed, guid_at, put, put_guid, seal, u32_at, u64_at};
use crate::{Error, Result};

/// Log sectors and replayed pages are 4 KiB.
pub const PAGE: usize = 4096;
/// Bytes of the entry header ([MS-VHDX] 2.3.1.1).
const HEADER_BYTES: usize = 64;
/// Bytes of a descriptor (2.3.1.2, 2.3.1.3).
const DESCRIPTOR_BYTES: usize = 32;
/// Log descriptors never target the file identifier or the headers (openvmm's rule too).
pub const MIN_TARGET_OFFSET: u64 = 192 * 1024;

/// The header of a log entry ([MS-VHDX] 2.3.1.1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EntryHeader {
    /// Total length in bytes, a multiple of 4 KiB.
    pub entry_length: u32,
    /// Log offset of the oldest entry of this entry's sequence.
    pub tail: u32,
    /// Sequence number (> 0).
    pub sequence_number: u64,
    /// Number of descriptors.
    pub descriptor_count: u32,
    /// Must equal the header's LogGuid.
    pub log_guid: Uuid,
    /// File size known stable when the entry was written.
    pub flushed_file_offset: u64,
    /// File size needed by every structure the log refers to.
    pub last_file_offset: u64,
}

/// One write a log entry asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Write {
    /// A 4 KiB page at a 4 KiB-aligned file offset (a data descriptor and its sector).
    Page {
        /// Where.
        file_offset: u64,
        /// The reconstructed 4 KiB (LeadingBytes ‖ data ‖ TrailingBytes).
        data: Vec<u8>,
    },
    /// Zeros (a zero descriptor).
    Zero {
        /// Where.
        file_offset: u64,
        /// How many bytes, a multiple of 4 KiB.
        length: u64,
    },
}

impl Write {
    /// The file byte range written.
    pub fn range(&self) -> std::ops::Range<u64> {
        match self {
            Write::Page { file_offset, .. } => {
                *file_offset..file_offset.saturating_add(PAGE as u64)
            }
            Write::Zero {
                file_offset,
                length,
            } => *file_offset..file_offset.saturating_add(*length),
        }
    }
}

/// A validated log entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    /// Offset of the entry's first sector inside the log.
    pub log_offset: u64,
    /// The header.
    pub header: EntryHeader,
    /// The writes, in descriptor order.
    pub writes: Vec<Write>,
}

/// `len` bytes of the circular log starting at `off` (wrapping at its end); `len` ≤ log size.
fn circular(log: &[u8], off: usize, len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len.min(log.len()));
    let mut at = off;
    while out.len() < len && !log.is_empty() {
        let end = log.len().min(at + (len - out.len()));
        out.extend_from_slice(&log[at..end]);
        at = if end == log.len() { 0 } else { end };
    }
    out
}

fn bad(log_offset: u64, what: impl std::fmt::Display) -> Error {
    Error::format(format!(
        "VHDX log entry at log offset {log_offset:#x}: {what}"
    ))
}

fn parse_header(b: &[u8]) -> EntryHeader {
    EntryHeader {
        entry_length: u32_at(b, 8),
        tail: u32_at(b, 12),
        sequence_number: u64_at(b, 16),
        descriptor_count: u32_at(b, 24),
        log_guid: guid_at(b, 32),
        flushed_file_offset: u64_at(b, 48),
        last_file_offset: u64_at(b, 56),
    }
}

/// Sectors holding the header and `count` descriptors (2.3.1).
fn descriptor_sectors(count: usize) -> usize {
    (HEADER_BYTES + DESCRIPTOR_BYTES * count).div_ceil(PAGE)
}

impl Entry {
    /// Parse and validate the entry at `off` of the log (which must be 4 KiB aligned): header
    /// ([MS-VHDX] 2.3.1.1: signature, LogGuid `guid`, length, descriptor count), every descriptor
    /// and data sector (signatures, alignment, sequence numbers) and the whole-entry CRC-32C.
    pub fn parse(log: &[u8], off: usize, guid: Uuid) -> Result<Entry> {
        let log_offset = off as u64;
        let first = log
            .get(off..off + PAGE)
            .ok_or_else(|| bad(log_offset, "outside the log"))?;
        if &first[..4] != b"loge" {
            return Err(bad(log_offset, "no 'loge' signature"));
        }
        let h = parse_header(first);
        if h.log_guid != guid {
            return Err(bad(
                log_offset,
                format!("LogGuid {} is not the header's {guid}", h.log_guid),
            ));
        }
        let len = h.entry_length as usize;
        if len < PAGE
            || !len.is_multiple_of(PAGE)
            || len >= log.len()
            || !(h.tail as usize).is_multiple_of(PAGE)
            || h.tail as usize >= log.len()
        {
            return Err(bad(
                log_offset,
                format!(
                    "length {len} or tail {:#x} invalid for a {}-byte log",
                    h.tail,
                    log.len()
                ),
            ));
        }
        let dsec = descriptor_sectors(h.descriptor_count as usize);
        if !data_sectors_signed(log, off, dsec, len / PAGE) {
            return Err(bad(log_offset, "a data sector lacks its 'data' signature"));
        }
        let bytes = circular(log, off, len);
        let stored = u32_at(&bytes, 4);
        let computed = crc32c_zeroed(&bytes, 4);
        if stored != computed {
            return Err(bad(
                log_offset,
                format!("checksum {stored:#010x}, computed {computed:#010x}"),
            ));
        }
        let writes = parse_descriptors(&bytes, &h, log_offset)?;
        Ok(Entry {
            log_offset,
            header: h,
            writes,
        })
    }
}

/// Whether sectors `first..count` of the entry at `off` start with `data`: checked before the
/// entry is copied and its CRC computed, so that a log full of bogus `loge` sectors costs time
/// in proportion to its size (a valid entry's later sectors never start with `loge`).
fn data_sectors_signed(log: &[u8], off: usize, first: usize, count: usize) -> bool {
    (first..count).all(|k| {
        let at = (off + k * PAGE) % log.len();
        log.get(at..at + 4) == Some(b"data")
    })
}

fn parse_descriptors(bytes: &[u8], h: &EntryHeader, log_offset: u64) -> Result<Vec<Write>> {
    let count = h.descriptor_count as usize;
    let dsec = descriptor_sectors(count);
    if h.sequence_number == 0 || dsec * PAGE > bytes.len() {
        return Err(bad(
            log_offset,
            format!("sequence 0 or {count} descriptors do not fit"),
        ));
    }
    let mut data_index = dsec;
    let mut writes = Vec::with_capacity(count);
    for i in 0..count {
        let d = &bytes[HEADER_BYTES + DESCRIPTOR_BYTES * i..][..DESCRIPTOR_BYTES];
        let (file_offset, seq) = (u64_at(d, 16), u64_at(d, 24));
        if seq != h.sequence_number || file_offset % PAGE as u64 != 0 {
            return Err(bad(
                log_offset,
                format!("descriptor {i}: sequence {seq} or offset {file_offset:#x} wrong"),
            ));
        }
        writes.push(match &d[..4] {
            b"zero" => zero_write(d, file_offset, i, log_offset)?,
            b"desc" => {
                let w = data_write(bytes, data_index, d, h.sequence_number, file_offset);
                data_index += 1;
                w.ok_or_else(|| {
                    bad(
                        log_offset,
                        format!("data sector of descriptor {i} missing or stale"),
                    )
                })?
            }
            _ => {
                return Err(bad(
                    log_offset,
                    format!("descriptor {i}: unknown signature"),
                ));
            }
        });
    }
    if data_index * PAGE != bytes.len() {
        return Err(bad(
            log_offset,
            format!("length {} does not match its descriptors", bytes.len()),
        ));
    }
    Ok(writes)
}

fn zero_write(d: &[u8], file_offset: u64, i: usize, log_offset: u64) -> Result<Write> {
    let length = u64_at(d, 8);
    if length == 0 || !length.is_multiple_of(PAGE as u64) {
        return Err(bad(
            log_offset,
            format!("zero descriptor {i}: length {length}"),
        ));
    }
    Ok(Write::Zero {
        file_offset,
        length,
    })
}

/// The page of a data descriptor: its sector must say `data` and carry the entry's sequence
/// number split high/low ([MS-VHDX] 2.3.1.4).
fn data_write(bytes: &[u8], sector: usize, d: &[u8], seq: u64, file_offset: u64) -> Option<Write> {
    let s = bytes.get(sector * PAGE..(sector + 1) * PAGE)?;
    let split = u64::from(u32_at(s, 4)) << 32 | u64::from(u32_at(s, PAGE - 4));
    if &s[..4] != b"data" || split != seq {
        return None;
    }
    let mut data = Vec::with_capacity(PAGE);
    data.extend_from_slice(&d[8..16]); // LeadingBytes
    data.extend_from_slice(&s[8..PAGE - 4]);
    data.extend_from_slice(&d[4..8]); // TrailingBytes
    Some(Write::Page { file_offset, data })
}

/// What replaying the active sequence does ([MS-VHDX] 2.3.3).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReplayPlan {
    /// The entries of the active sequence, from Tail to head.
    pub entries: Vec<Entry>,
}

impl ReplayPlan {
    /// The head (newest) entry.
    pub fn head(&self) -> Option<&Entry> {
        self.entries.last()
    }

    /// Every write in replay order, with the entry it comes from.
    pub fn writes(&self) -> impl Iterator<Item = (&Entry, &Write)> {
        self.entries
            .iter()
            .flat_map(|e| e.writes.iter().map(move |w| (e, w)))
    }

    /// The file length after replay: at least the head's LastFileOffset.
    pub fn length_after(&self, file_len: u64) -> u64 {
        self.head()
            .map_or(file_len, |h| file_len.max(h.header.last_file_offset))
    }

    /// Fail (Incorrect data type, naming the entry) when the file is shorter than the head's
    /// FlushedFileOffset (it was truncated after the log was written), or a write lies in the
    /// header section or beyond the file's length after replay.
    pub fn check(&self, file_len: u64) -> Result<()> {
        if let Some(h) = self
            .head()
            .filter(|h| h.header.flushed_file_offset > file_len)
        {
            return Err(bad(
                h.log_offset,
                format!(
                    "FlushedFileOffset {} is beyond the file's {file_len} bytes (truncated file)",
                    h.header.flushed_file_offset
                ),
            ));
        }
        let end = self.length_after(file_len);
        for (e, w) in self.writes() {
            let r = w.range();
            if r.start < MIN_TARGET_OFFSET || r.end > end {
                return Err(bad(
                    e.log_offset,
                    format!(
                        "write {:#x}..{:#x} outside {MIN_TARGET_OFFSET:#x}..{end:#x}",
                        r.start, r.end
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Apply every write to `window`, the bytes of the file starting at `base` (writes outside
    /// it are clipped): an in-memory replay of one region.
    pub fn apply_to(&self, window: &mut [u8], base: u64) {
        for (_, w) in self.writes() {
            let r = w.range();
            let (start, end) = (r.start.max(base), r.end.min(base + window.len() as u64));
            if start >= end {
                continue;
            }
            let dst = &mut window[(start - base) as usize..(end - base) as usize];
            match w {
                Write::Zero { .. } => dst.fill(0),
                Write::Page { data, .. } => {
                    dst.copy_from_slice(&data[(start - r.start) as usize..(end - r.start) as usize])
                }
            }
        }
    }
}

/// Find the active sequence of `log` (the log region's bytes; the caller bounds their size) for
/// the header's LogGuid `guid` ([MS-VHDX] 2.3.3): of the valid sequences (physically contiguous
/// entries whose sequence numbers rise by one, each Tail inside the sequence), the one with the
/// highest head sequence number, replayed from its head's Tail. `None` when `guid` is zero.
/// A non-zero `guid` without a valid sequence, or a valid entry newer than the active head
/// (its sequence broken), is a format error naming the entry.
pub fn find_active(log: &[u8], guid: Uuid) -> Result<Option<ReplayPlan>> {
    if guid.is_nil() {
        return Ok(None);
    }
    let slots = log.len() / PAGE;
    let parsed: Vec<Option<Entry>> = (0..slots)
        .map(|s| Entry::parse(log, s * PAGE, guid).ok())
        .collect();
    let continued = continued_slots(&parsed, log.len());
    let best = (0..slots)
        .filter(|&s| !continued[s])
        .filter_map(|s| sequence_from(&parsed, s, log.len()))
        .max_by_key(|p| p.head().map(|h| h.header.sequence_number));
    let newest = parsed
        .iter()
        .flatten()
        .max_by_key(|e| e.header.sequence_number);
    match (best, newest) {
        (Some(p), Some(n))
            if p.head().map(|h| h.header.sequence_number) == Some(n.header.sequence_number) =>
        {
            Ok(Some(p))
        }
        (_, Some(n)) => Err(bad(
            n.log_offset,
            format!(
                "sequence {} cannot be replayed: its Tail {:#x} does not start a valid sequence",
                n.header.sequence_number, n.header.tail
            ),
        )),
        (_, None) => Err(Error::format(format!(
            "VHDX log: LogGuid {guid} is set but the log has no valid entry for it"
        ))),
    }
}

/// The entry physically after `e` in the circular log.
fn next_offset(e: &Entry, log_len: usize) -> usize {
    (e.log_offset as usize + e.header.entry_length as usize) % log_len
}

/// Whether `next` continues a sequence whose last entry is `last`.
fn continues(last: &Entry, next: &Entry) -> bool {
    last.header.sequence_number.checked_add(1) == Some(next.header.sequence_number)
}

/// For each slot, whether its entry continues the entry physically before it. A sequence grown
/// from a continued entry is a part of the one grown from its run's start, so only run starts
/// need growing, which keeps the search linear in the log's size.
fn continued_slots(parsed: &[Option<Entry>], log_len: usize) -> Vec<bool> {
    let mut continued = vec![false; parsed.len()];
    for p in parsed.iter().flatten() {
        let n = next_offset(p, log_len) / PAGE;
        if let (Some(Some(e)), Some(c)) = (parsed.get(n), continued.get_mut(n)) {
            *c |= continues(p, e);
        }
    }
    continued
}

/// Circular distance from log offset `a` forward to `b`.
fn dist(a: usize, b: usize, log_len: usize) -> usize {
    (b + log_len - a) % log_len
}

/// The longest run of entries starting at slot `s` (consecutive sequence numbers, physically
/// contiguous, together no longer than the log, each Tail inside the run); it is a candidate
/// when its head's Tail is one of its entries, and the candidate is the run from there
/// ([MS-VHDX] 2.3.3).
fn sequence_from(parsed: &[Option<Entry>], s: usize, log_len: usize) -> Option<ReplayPlan> {
    let mut run: Vec<&Entry> = vec![parsed.get(s)?.as_ref()?];
    let mut used = run[0].header.entry_length as usize;
    let start = s * PAGE;
    loop {
        let last = run[run.len() - 1];
        let next_off = next_offset(last, log_len);
        let Some(Some(next)) = parsed.get(next_off / PAGE) else {
            break;
        };
        let tail_inside =
            dist(start, next.header.tail as usize, log_len) <= dist(start, next_off, log_len);
        if !continues(last, next)
            || used + next.header.entry_length as usize > log_len
            || !tail_inside
        {
            break;
        }
        used += next.header.entry_length as usize;
        run.push(next);
    }
    let head = run[run.len() - 1];
    let from = run
        .iter()
        .position(|e| e.log_offset == u64::from(head.header.tail))?;
    Some(ReplayPlan {
        entries: run[from..].iter().map(|e| (*e).clone()).collect(),
    })
}

/// What a writer puts into a new log entry's header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EntryParams {
    /// Sequence number (> 0; the previous entry's + 1).
    pub sequence_number: u64,
    /// Log offset of the oldest entry not yet known to be applied.
    pub tail: u32,
    /// The header's LogGuid.
    pub log_guid: Uuid,
    /// File size known stable now.
    pub flushed_file_offset: u64,
    /// File size needed after this entry.
    pub last_file_offset: u64,
}

/// Build a log entry ([MS-VHDX] 2.3.1) for `writes` (pages of exactly 4 KiB and zero ranges,
/// 4 KiB aligned): header, descriptors, data sectors and the whole-entry CRC-32C.
pub fn build_entry(p: &EntryParams, writes: &[Write]) -> Result<Vec<u8>> {
    let dsec = descriptor_sectors(writes.len());
    let pages = writes
        .iter()
        .filter(|w| matches!(w, Write::Page { .. }))
        .count();
    let mut b = vec![0; (dsec + pages) * PAGE];
    let len = u32::try_from(b.len())
        .map_err(|_| Error::InvalidParameter("VHDX log entry too large".into()))?;
    put(&mut b, 0, b"loge");
    for (at, v) in [(8, len), (12, p.tail), (24, writes.len() as u32)] {
        put(&mut b, at, &v.to_le_bytes());
    }
    for (at, v) in [
        (16, p.sequence_number),
        (48, p.flushed_file_offset),
        (56, p.last_file_offset),
    ] {
        put(&mut b, at, &v.to_le_bytes());
    }
    put_guid(&mut b, 32, &p.log_guid);
    let mut sector = dsec;
    for (i, w) in writes.iter().enumerate() {
        put_descriptor(
            &mut b,
            HEADER_BYTES + DESCRIPTOR_BYTES * i,
            w,
            p.sequence_number,
            &mut sector,
        )?;
    }
    seal(&mut b, 4);
    Ok(b)
}

fn put_descriptor(b: &mut [u8], at: usize, w: &Write, seq: u64, sector: &mut usize) -> Result<()> {
    let r = w.range();
    let whole_page = !matches!(w, Write::Page { data, .. } if data.len() != PAGE);
    if !whole_page
        || !r.start.is_multiple_of(PAGE as u64)
        || !(r.end - r.start).is_multiple_of(PAGE as u64)
        || r.end == r.start
    {
        return Err(Error::InvalidParameter(format!(
            "VHDX log write {:#x}..{:#x} is not whole 4 KiB pages",
            r.start, r.end
        )));
    }
    match w {
        Write::Zero { length, .. } => {
            put(b, at, b"zero");
            put(b, at + 8, &length.to_le_bytes());
        }
        Write::Page { data, .. } => {
            put(b, at, b"desc");
            put(b, at + 4, &data[PAGE - 4..]);
            put(b, at + 8, &data[..8]);
            let s = *sector * PAGE;
            put(b, s, b"data");
            put(b, s + 4, &((seq >> 32) as u32).to_le_bytes());
            put(b, s + 8, &data[8..PAGE - 4]);
            put(b, s + PAGE - 4, &(seq as u32).to_le_bytes());
            *sector += 1;
        }
    }
    put(b, at + 16, &r.start.to_le_bytes());
    put(b, at + 24, &seq.to_le_bytes());
    Ok(())
}
