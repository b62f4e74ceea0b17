//! Repairing a VHDX in place: replay a dirty log onto the file, restore a damaged header from
//! the current one and a damaged (or differing) region table from the valid copy.
//!
//! What needs doing is read from a [`super::check`] inspection; a dry run, or a file that
//! needs nothing, is only read. Everything else `check` finds is listed as not repaired
//! (BAT entries, overlaps, metadata: nothing in the file says what they should have been).
//!
//! # Write order (crash safety)
//!
//! Each step is one the format makes crash-safe, and each is flushed before the next; a crash
//! anywhere leaves a file that opens and reads as before, and running repair again finishes:
//!
//! 1. **the log**, replayed as a writable open replays it ([MS-VHDX] 2.3.3: a header update
//!    with a new FileWriteGuid, the writes, the file extended, a flush, LogGuid cleared by a
//!    header update). Replay is idempotent: until LogGuid is cleared the log is replayed again
//!    by the next open, in memory or onto the file. Its two header updates leave both headers
//!    valid, which also restores a damaged one.
//! 2. **a damaged header**, by the header update procedure (2.2.2.1): the current header with
//!    the next sequence number and a new FileWriteGuid (the session's first write) into the
//!    damaged slot, flushed. The current slot is never written, so a torn write leaves the
//!    damaged slot damaged and the current header current. DataWriteGuid is kept: the disk's
//!    content does not change, so children stay linked.
//! 3. **a region table copy** that is invalid or differs from the valid first one: the valid
//!    copy's 64 KiB over it, flushed (after a header update for the FileWriteGuid when step 1
//!    and 2 had nothing to do). The valid copy is never written, and an opener uses the first
//!    valid copy, so during the write the file reads through the same table; a torn write
//!    leaves the target invalid, as it was.

use std::path::Path;
use std::sync::Arc;

use uuid::Uuid;

use super::check::{Inspection, LogState, inspect};
use super::format::header::{CurrentHeader, Header, current_header};
use super::format::region::RegionTable;
use super::format::{self as f, MIB, SLOT_SIZE};
use super::journal::{flush, replay_onto_file, update_header, write};
use super::reader::Overlay;
use crate::error::{Error, Result};
use crate::format::DiskType;
use crate::io::{FileStorage, Storage};
use crate::layer::files::{WriteMode, open_for_writing, open_regular_file, take_lock};
use crate::problem::ProblemCode;
use crate::repair::{RepairAction, RepairOptions, RepairReport, not_repaired};

/// Finding codes a repair fixes; every other warning or error (of a deep check) is listed as not
/// repaired.
pub const REPAIRED_CODES: &[ProblemCode] = &[
    ProblemCode::LogDirty,
    ProblemCode::HeaderBad,
    ProblemCode::RegionTableBad,
    ProblemCode::RegionTablesDiffer,
];

/// Repair the VHDX at `path` (see the module docs). It is inspected read-only first (under a
/// shared lock); only
/// when something needs writing (and not in a dry run) is it opened for writing, under the
/// exclusive lock every writer takes (System is in use, 32774, while another holds it), and
/// inspected again.
pub fn repair_file(path: &Path, options: &RepairOptions) -> Result<RepairReport> {
    let storage = FileStorage::new(open_regular_file(path, false)?);
    take_lock(&storage, path, false)?;
    let mut report = repair_storage(storage, path, &dry(options))?;
    if options.dry_run || report.is_clean() {
        report.dry_run = options.dry_run;
        return Ok(report);
    }
    let storage = open_for_writing(path, WriteMode::Existing)?;
    repair_storage(storage, path, options)
}

fn dry(options: &RepairOptions) -> RepairOptions {
    RepairOptions {
        dry_run: true,
        ..*options
    }
}

/// [`repair_file`] over any [`Storage`] (the caller holds whatever lock it needs): plan from
/// an inspection, then, unless a dry run, write the plan and inspect the result.
pub fn repair_storage<S: Storage>(
    storage: S,
    path: &Path,
    options: &RepairOptions,
) -> Result<RepairReport> {
    let storage = Arc::new(storage);
    let insp = inspect(storage.clone(), path, true).map_err(|e| e.in_file(path))?;
    let actions = plan(&insp).map_err(|e| e.in_file(path))?;
    let wrote = !options.dry_run && !actions.is_empty();
    let after = if wrote {
        execute(storage.clone()).map_err(|e| e.in_file(path))?;
        inspect(storage, path, true).map_err(|e| e.in_file(path))?
    } else {
        insp
    };
    let mut report = report(path, actions, wrote, after);
    report.dry_run = options.dry_run;
    Ok(report)
}

/// The writes the inspection calls for, in their order (see the module docs).
fn plan(insp: &Inspection) -> Result<Vec<RepairAction>> {
    let Some(cur) = &insp.current else {
        return Err(Error::format(
            "cannot repair: no VHDX header can be used as the current one (`vhd-merge check` \
             says why), so nothing says where the log is or which copy to trust",
        ));
    };
    let mut actions = Vec::new();
    if let Some(LogState::Dirty {
        entries,
        writes,
        bytes,
        sequences,
        length_after,
    }) = &insp.log
    {
        actions.push(RepairAction {
            structure: "log",
            offset: cur.header.log_offset,
            len: *bytes,
            reason: format!(
                "replay {entries} log entr{} (sequence {}..={}, {writes} write(s) of {bytes} \
                 bytes in all) onto the file{}, then clear LogGuid",
                if *entries == 1 { "y" } else { "ies" },
                sequences.0,
                sequences.1,
                grow_note(*length_after, insp.file_len)
            ),
        });
    }
    let other = 1 - cur.slot.min(1);
    if let Some(Some(Err(why))) = insp.headers.get(other) {
        actions.push(RepairAction {
            structure: "header",
            offset: header_offset(other),
            len: f::header::HEADER_SIZE as u64,
            reason: format!(
                "invalid ({why}); rewritten from the current header {} with the next sequence number",
                cur.slot + 1
            ),
        });
    }
    if let Some((from, to)) = region_restore(insp) {
        actions.push(RepairAction {
            structure: "region table",
            offset: region_offset(to),
            len: SLOT_SIZE as u64,
            reason: format!(
                "invalid or different; rewritten from region table {}",
                from + 1
            ),
        });
    }
    Ok(actions)
}

fn grow_note(after: u64, now: u64) -> String {
    if after > now {
        format!(" (extending it from {now} to {after} bytes)")
    } else {
        String::new()
    }
}

fn header_offset(slot: usize) -> u64 {
    [f::HEADER1_OFFSET, f::HEADER2_OFFSET][slot.min(1)]
}

fn region_offset(copy: usize) -> u64 {
    [f::REGION_TABLE1_OFFSET, f::REGION_TABLE2_OFFSET][copy.min(1)]
}

/// (source, target) copies of the region table to restore, by what the inspection found.
fn region_restore(insp: &Inspection) -> Option<(usize, usize)> {
    let differ = insp
        .findings
        .iter()
        .any(|f| f.code == ProblemCode::RegionTablesDiffer);
    match insp.region_tables_valid {
        [true, false] => Some((0, 1)),
        [false, true] => Some((1, 0)),
        [true, true] if differ => Some((0, 1)),
        _ => None,
    }
}

/// Make the writes, each step judged again from the file as it is now.
fn execute<S: Storage>(storage: S) -> Result<()> {
    let mut file = Overlay::new(storage)?;
    let start = file.read(0, MIB)?;
    let mut cur = current_header(slot(&start, 0), slot(&start, 1))?;
    let mut started = false;
    // A log that cannot be replayed stays as it is (check names it); the other steps still run.
    if !cur.header.log_guid.is_nil() && file.replay(&cur.header).is_ok() {
        replay_onto_file(&mut file, &mut cur)?;
        started = true;
    }
    let start = file.read(0, MIB)?;
    let other = 1 - cur.slot.min(1);
    if Header::parse(slot(&start, other), header_offset(other)).is_err() {
        new_file_write_guid(file.storage(), &mut cur)?;
        started = true;
    }
    restore_region_table(file.storage(), &start, &mut cur, started)
}

/// The header update procedure with a new FileWriteGuid: into the non-current slot.
fn new_file_write_guid<S: Storage>(s: &S, cur: &mut CurrentHeader) -> Result<()> {
    update_header(s, cur, |h| h.file_write_guid = Uuid::new_v4())
}

/// Step 3 of the module docs; `started`: FileWriteGuid already regenerated in this session.
fn restore_region_table<S: Storage>(
    s: &S,
    start: &[u8],
    cur: &mut CurrentHeader,
    started: bool,
) -> Result<()> {
    let copies = [0, 1].map(|i| RegionTable::parse(region_slot(start, i), region_offset(i)));
    let (from, to) = match &copies {
        [Ok(a), Ok(b)] if a != b => (0, 1),
        [Ok(_), Err(_)] => (0, 1),
        [Err(_), Ok(_)] => (1, 0),
        _ => return Ok(()),
    };
    if !started {
        new_file_write_guid(s, cur)?;
    }
    write(
        s,
        region_slot(start, from),
        region_offset(to),
        "a region table",
    )?;
    flush(s, "a region table")
}

fn slot(start: &[u8], header: usize) -> &[u8] {
    bytes_at(start, header_offset(header))
}

fn region_slot(start: &[u8], copy: usize) -> &[u8] {
    bytes_at(start, region_offset(copy))
}

fn bytes_at(start: &[u8], offset: u64) -> &[u8] {
    let at = offset as usize;
    start.get(at..at + SLOT_SIZE).unwrap_or(&[])
}

/// The report: the actions, and what the inspection (after the writes, if any) still finds
/// that is not a note (in a dry run, without what the actions would fix).
fn report(path: &Path, actions: Vec<RepairAction>, wrote: bool, after: Inspection) -> RepairReport {
    let disk_type = match after.metadata.as_ref().map(|m| m.file_parameters) {
        Some(fp) if fp.has_parent => DiskType::Differencing,
        Some(fp) if fp.leave_block_allocated => DiskType::Fixed,
        _ => DiskType::Dynamic,
    };
    let not_repaired = not_repaired(after.findings, REPAIRED_CODES, wrote);
    RepairReport {
        file: path.to_path_buf(),
        dry_run: false,
        wrote,
        actions,
        lost: Vec::new(),
        not_repaired,
        disk_type,
    }
}
