//! Changing a VHDX crash-safely: the header update procedure ([MS-VHDX] 2.2.2.1), replaying a
//! dirty log onto the file (2.3.3), and the log writer that journals metadata pages (2.3.1).
//!
//! Every function here but [`update_header_unflushed`] flushes before it returns, so the order
//! of its writes relative to the caller's is the order on the device.

use uuid::Uuid;

use super::format::header::{CurrentHeader, Header};
use super::format::log::{EntryParams, PAGE, Write, build_entry};
use super::format::{HEADER1_OFFSET, HEADER2_OFFSET, MIB};
use super::reader::Overlay;
use crate::io::Storage;
use crate::{Error, Result};

/// `storage.write_at`, with an error naming what was written.
pub(crate) fn write<S: Storage>(storage: &S, buf: &[u8], offset: u64, what: &str) -> Result<()> {
    storage.write_at(buf, offset).map_err(|e| {
        Error::io(
            format!("VHDX: writing {what} ({} bytes at {offset:#x})", buf.len()),
            e,
        )
    })
}

/// `storage.sync_data`, with an error saying what it made durable.
pub(crate) fn flush<S: Storage>(storage: &S, what: &str) -> Result<()> {
    storage
        .sync_data()
        .map_err(|e| Error::io(format!("VHDX: flushing {what}"), e))
}

/// `storage.set_len` to grow the file to `len` (never shrinks it).
pub(crate) fn grow<S: Storage>(storage: &S, len: u64) -> Result<()> {
    let now = storage
        .len()
        .map_err(|e| Error::io("VHDX: file length", e))?;
    if now < len {
        storage
            .set_len(len)
            .map_err(|e| Error::io(format!("VHDX: extending the file to {len:#x}"), e))?;
    }
    Ok(())
}

/// The header update procedure ([MS-VHDX] 2.2.2.1): the current header changed by `change`,
/// with the next sequence number, written into the non-current slot and flushed; that slot is
/// current from then on. A torn write can only damage the stale slot.
pub(crate) fn update_header<S: Storage>(
    storage: &S,
    cur: &mut CurrentHeader,
    change: impl FnOnce(&mut Header),
) -> Result<()> {
    update_header_unflushed(storage, cur, change)?;
    flush(storage, "a header")
}

/// [`update_header`] without its flush: the header is written into the non-current slot and
/// treated as current, but it is not durable yet. Only for the closing update of a session
/// (LogGuid cleared, nothing left to replay), and the next header update of the file must
/// come after a flush, so that the slot it overwrites is durable.
pub(crate) fn update_header_unflushed<S: Storage>(
    storage: &S,
    cur: &mut CurrentHeader,
    change: impl FnOnce(&mut Header),
) -> Result<()> {
    let mut h = cur.header.clone();
    change(&mut h);
    h.sequence_number = cur
        .header
        .sequence_number
        .checked_add(1)
        .ok_or_else(|| Error::format("VHDX header sequence number is at its maximum"))?;
    let slot = 1 - cur.slot.min(1);
    let offset = [HEADER1_OFFSET, HEADER2_OFFSET][slot];
    write(storage, &h.to_bytes(), offset, "a header")?;
    *cur = CurrentHeader {
        slot,
        header: h,
        other_error: None,
    };
    Ok(())
}

/// Apply the log sequence `file` lays over the storage ([MS-VHDX] 2.3.3) to the file itself:
/// a fresh FileWriteGuid first (the replay is this session's first write), then every write
/// of the plan, the file extended to the head's LastFileOffset, a flush, and LogGuid cleared
/// by a header update. DataWriteGuid is kept: the disk reads the same as before (in-memory
/// replay), so children stay linked. Replay is idempotent: a crash anywhere here just means
/// replaying again.
pub(crate) fn replay_onto_file<S: Storage>(
    file: &mut Overlay<S>,
    header: &mut CurrentHeader,
) -> Result<()> {
    let Some(plan) = file.plan().cloned() else {
        return Ok(());
    };
    let s = file.storage();
    update_header(s, header, |h| h.file_write_guid = Uuid::new_v4())?;
    let zeros = vec![0u8; MIB as usize];
    for (_, w) in plan.writes() {
        match w {
            Write::Page { file_offset, data } => write(s, data, *file_offset, "a logged page")?,
            Write::Zero {
                file_offset,
                length,
            } => {
                let mut at = 0;
                while at < *length {
                    let n = (*length - at).min(MIB);
                    write(s, &zeros[..n as usize], file_offset + at, "logged zeros")?;
                    at += n;
                }
            }
        }
    }
    let len = file.file_len();
    grow(s, len)?;
    flush(s, "the replayed log")?;
    update_header(s, header, |h| h.log_guid = Uuid::nil())?;
    file.written(len);
    Ok(())
}

/// Where the next log entry of a write session goes. The session's LogGuid is fresh, so
/// entries of earlier sessions never count; entries are appended one after another around the
/// circular log, and a new entry never overwrites the previous one, so a torn entry leaves
/// the previous one to replay. Each entry's Tail points at itself when every earlier entry's
/// pages are durable in place (applied and flushed before it was written), else at the
/// previous entry ([`LogWriter::applied_unflushed`]: its pages were written in place, not
/// flushed), so that a replay from the new entry's Tail replays both, in order. No older entry
/// is ever needed: the new entry's own flush makes the previous entry's pages in place
/// durable, since they were written before it.
#[derive(Debug)]
pub(crate) struct LogWriter {
    /// This session's LogGuid.
    pub guid: Uuid,
    log_offset: u64,
    log_length: u64,
    next: u64,
    sequence: u64,
    previous_len: u64,
    /// The log offset of the previous entry while its pages in place are not known durable.
    unflushed: Option<u64>,
}

impl LogWriter {
    /// A writer for the log `header` names, with a fresh LogGuid.
    pub fn new(header: &Header) -> LogWriter {
        LogWriter {
            guid: Uuid::new_v4(),
            log_offset: header.log_offset,
            log_length: header.log_length.into(),
            next: 0,
            sequence: 1,
            previous_len: 0,
            unflushed: None,
        }
    }

    /// The most pages one entry may carry: it and the previous entry must fit in the log
    /// together (one descriptor sector holds 126 descriptors; a larger entry needs more).
    pub fn max_pages(&self) -> usize {
        let pages = (self.log_length / PAGE as u64 / 2) as usize;
        // Descriptor sectors: 1 for up to 126 pages, one more per 128.
        pages.saturating_sub(1 + pages / 128).max(1)
    }

    /// The pages of the last entry were written in place but not flushed: the next entry's
    /// Tail covers it, until a flush of the caller's makes them durable.
    pub fn applied_unflushed(&mut self) {
        let last = (self.next + self.log_length - self.previous_len) % self.log_length;
        self.unflushed = Some(last);
    }

    /// The last entry's pages were written in place and not flushed ([`Vhdx::commit_live`]):
    /// the log must stay live until a flush.
    ///
    /// [`Vhdx::commit_live`]: super::Vhdx::commit_live
    pub fn pages_unflushed(&self) -> bool {
        self.unflushed.is_some()
    }

    /// The pages in place of every entry so far are durable (the caller flushed after
    /// writing them).
    pub fn applied_flushed(&mut self) {
        self.unflushed = None;
    }

    /// Write one entry carrying `pages` and flush it. `file_len` is the file's length, stable
    /// and sufficient for every structure the entry refers to. Its flush makes the previous
    /// entry's pages in place durable (written before it), so the entry after it needs no
    /// Tail further back than this one.
    pub fn append<S: Storage>(&mut self, s: &S, pages: &[Write], file_len: u64) -> Result<()> {
        let params = EntryParams {
            sequence_number: self.sequence,
            tail: self.unflushed.unwrap_or(self.next) as u32,
            log_guid: self.guid,
            flushed_file_offset: file_len,
            last_file_offset: file_len,
        };
        let entry = build_entry(&params, pages)?;
        let len = entry.len() as u64;
        if len + self.previous_len > self.log_length {
            return Err(Error::InvalidParameter(format!(
                "VHDX log entry of {len} bytes does not fit a {}-byte log",
                self.log_length
            )));
        }
        let first = (self.log_length - self.next).min(len) as usize;
        write(
            s,
            &entry[..first],
            self.log_offset + self.next,
            "a log entry",
        )?;
        if first < entry.len() {
            write(s, &entry[first..], self.log_offset, "a log entry")?;
        }
        flush(s, "a log entry")?;
        self.unflushed = None;
        self.next = (self.next + len) % self.log_length;
        self.previous_len = len;
        self.sequence += 1;
        Ok(())
    }
}
