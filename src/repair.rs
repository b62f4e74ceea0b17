//! Repairing a damaged VHD in place: footers, checksums, and BAT entries that cannot be right.
//!
//! What is repaired:
//! - a missing or damaged end footer is rewritten from the offset-0 copy, and a missing,
//!   damaged or differing copy from the end footer (§1.2, §7.2);
//! - footer and dynamic header checksums are recomputed;
//! - BAT entries that point outside the file, or at a block that overlaps another block or
//!   the metadata, are dropped. Which virtual byte ranges lose their data (zeros for a dynamic
//!   disk, the parent's data for a differencing one) is reported, with the file offset where
//!   the old data still lies, for manual salvage. When two blocks overlap both are dropped:
//!   nothing in the file says which of the two entries is the right one.
//!
//! Nothing else is touched: a file with nothing to repair is not written at all, and
//! problems this module does not fix (locators, a damaged batmap, ...) are listed in
//! [`RepairReport::not_repaired`]. A file whose structures are too damaged to be opened even
//! leniently (no footer anywhere, an impossible block size, a BAT past the end of the file)
//! is refused with the reason.
//!
//! # Write order (crash safety)
//!
//! Every write replaces a structure that is invalid (or a BAT entry that is wrong) with a
//! valid one, and no write touches a structure that is valid, so at every instant each
//! structure is either in its old state or its repaired state; a torn write of an invalid
//! structure leaves it invalid, no worse than before. Each step is synced before the next
//! (the BAT writes of step 2 are independent of each other and share one sync):
//!
//! 1. the dynamic header, when only its checksum is wrong;
//! 2. the BAT sectors holding entries to drop (each entry becomes `0xFFFFFFFF`; other bytes
//!    of the sector are rewritten as they were read);
//! 3. the end footer, when it is missing or damaged (possibly extending the file);
//! 4. the offset-0 copy, when it is missing, damaged or different.
//!
//! The header and BAT come first so that by the time a footer becomes valid, which is what
//! makes a strict reader accept the file, what it leads to is already repaired. During step
//! 3 the copy is untouched, and during step 4 the end footer is already valid, so a file
//! that had one good footer has one at every instant. Re-running repair after a crash
//! finishes the job (every step is idempotent).

use std::collections::BTreeMap;
use std::ops::Range;
use std::path::{Path, PathBuf};

use crate::check::{CheckOptions, Finding, Severity, check_storage};
use crate::error::{Error, Result};
use crate::format::bat::UNUSED;
use crate::format::footer::FOOTER_SIZE;
use crate::format::{DiskType, SECTOR_SIZE};
use crate::io::Storage;
use crate::layer::files::{WriteMode, open_for_writing};
use crate::problem::ProblemCode;
use crate::vhd::{DroppedEntry, FooterSource, Inspection, OpenOptions, Problem, SizeRule, Vhd};

options! {
    /// Options for [`repair_file`].
    #[derive(Clone, Copy, Debug, Default)]
    pub struct RepairOptions {
        /// Work out what would be done, write nothing (the file is opened read-only).
        pub dry_run: bool,
        /// How to decide the virtual size (for the lost ranges reported).
        pub size_rule: SizeRule,
    }
}

/// One write repair makes (or would make, in a dry run).
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RepairAction {
    /// The structure rewritten: `dynamic header`, `BAT`, `footer`, `footer copy`.
    pub structure: &'static str,
    /// File offset of the write.
    pub offset: u64,
    /// Bytes written (`length` in JSON).
    #[cfg_attr(feature = "serde", serde(rename = "length"))]
    pub len: u64,
    /// Why.
    pub reason: String,
}

/// Data a dropped BAT entry pointed at: the virtual range now reads as zeros (dynamic) or from
/// the parent (differencing).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LostRange {
    /// The block whose entry was dropped.
    pub block: u64,
    /// Virtual byte range of the block (clipped to the virtual size).
    pub virtual_range: Range<u64>,
    /// Where the entry pointed (the old bitmap offset), for manual salvage.
    pub file_offset: u64,
    /// Why the entry was dropped.
    pub reason: std::borrow::Cow<'static, str>,
}

/// Consecutive [`LostRange`]s merged into one ([`RepairReport::lost_runs`]; a hostile table
/// can drop a million entries).
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LostRun {
    /// The first block whose entry was dropped.
    pub first_block: u64,
    /// The last (`first_block` when the run is one block).
    pub last_block: u64,
    /// Start of the virtual byte range lost.
    pub virtual_start: u64,
    /// Its end (exclusive).
    pub virtual_end: u64,
    /// Where the first block's entry pointed, for manual salvage.
    pub file_offset: u64,
    /// What the range reads as now ([`RepairReport::lost_reads_as`]).
    pub now: &'static str,
    /// Why the first block's entry was dropped.
    pub reason: String,
}

/// What [`repair_file`] did, or would do in a dry run. Its JSON (the `serde` feature) is what
/// `repair --json` prints: `path`, `dry_run`, `wrote`, `actions`, `lost` (as
/// [`RepairReport::lost_runs`]), `errors_remain` ([`RepairReport::has_errors`]) and
/// `not_repaired`.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct RepairReport {
    /// The file.
    pub file: PathBuf,
    /// True when [`RepairOptions::dry_run`] asked for nothing to be written.
    pub dry_run: bool,
    /// True when the actions were carried out (not a dry run, and something to do).
    pub wrote: bool,
    /// The writes, in the order they are made.
    pub actions: Vec<RepairAction>,
    /// Virtual ranges whose data is lost by dropping BAT entries.
    pub lost: Vec<LostRange>,
    /// What `check --deep` still finds that repair does not fix (warnings and errors; notes
    /// are left out).
    pub not_repaired: Vec<Finding>,
    /// The disk type, which says what a lost range now reads as.
    pub disk_type: DiskType,
}

#[cfg(feature = "serde")]
impl serde::Serialize for RepairReport {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let mut m = s.serialize_struct("RepairReport", 7)?;
        m.serialize_field("path", &self.file)?;
        m.serialize_field("dry_run", &self.dry_run)?;
        m.serialize_field("wrote", &self.wrote)?;
        m.serialize_field("actions", &self.actions)?;
        m.serialize_field("lost", &self.lost_runs())?;
        m.serialize_field("errors_remain", &self.has_errors())?;
        m.serialize_field("not_repaired", &self.not_repaired)?;
        m.end()
    }
}

impl RepairReport {
    /// What a lost range reads as now: from the parent (differencing) or zeros.
    pub fn lost_reads_as(&self) -> &'static str {
        if self.disk_type == DiskType::Differencing {
            "now read from the parent"
        } else {
            "now read as zeros"
        }
    }

    /// [`RepairReport::lost`] in block order, consecutive blocks whose virtual ranges touch
    /// merged into one run (the offset and reason are the first block's).
    pub fn lost_runs(&self) -> Vec<LostRun> {
        let mut lost: Vec<&LostRange> = self.lost.iter().collect();
        lost.sort_by_key(|l| l.block);
        let mut out: Vec<LostRun> = Vec::new();
        for l in lost {
            match out.last_mut() {
                Some(run)
                    if run.last_block + 1 == l.block
                        && run.virtual_end == l.virtual_range.start =>
                {
                    run.last_block = l.block;
                    run.virtual_end = l.virtual_range.end;
                }
                _ => out.push(LostRun {
                    first_block: l.block,
                    last_block: l.block,
                    virtual_start: l.virtual_range.start,
                    virtual_end: l.virtual_range.end,
                    file_offset: l.file_offset,
                    now: self.lost_reads_as(),
                    reason: l.reason.to_string(),
                }),
            }
        }
        out
    }

    /// True when the file needed (or, in a dry run, needs) no write.
    pub fn is_clean(&self) -> bool {
        self.actions.is_empty()
    }

    /// True when errors remain that repair does not fix (listed in
    /// [`RepairReport::not_repaired`]); warnings alone leave a usable file.
    pub fn has_errors(&self) -> bool {
        self.not_repaired
            .iter()
            .any(|f| f.severity == Severity::Error)
    }
}

/// Repair the file at `path` (see the module docs). The file is first inspected read-only
/// (shared lock): a dry run, or a file with nothing to repair, is never opened for writing,
/// so a valid file that cannot be written (read-only, immutable) is reported as it is. When
/// there is something to write, the file is opened for writing under the exclusive lock
/// every writer takes ([`Error::InUse`], 32774, while a merge or another repair holds it) and
/// inspected again.
///
/// A VHDX is repaired by [`crate::vhdx::repair::repair_file`].
pub fn repair_file(path: impl AsRef<Path>, options: &RepairOptions) -> Result<RepairReport> {
    let path = path.as_ref();
    if crate::layer::detect_format(path) == Some(crate::layer::Format::Vhdx) {
        return crate::vhdx::repair::repair_file(path, options);
    }
    let insp = Vhd::inspect(path, open_options(options, false))?;
    let planned = plan_repair(path, insp, Some(false))?;
    if options.dry_run || planned.writes.is_empty() {
        return finish(path, planned, false, options);
    }
    drop(planned);
    let storage = open_for_writing(path, WriteMode::Existing)?;
    let insp = Vhd::inspect_storage(Box::new(storage), path, open_options(options, true));
    // open_for_writing holds the lock already (a second lock on one handle fails on Windows).
    let mut planned = plan_repair(path, insp, None)?;
    write_plan(&mut planned)?;
    finish(path, planned, true, options)
}

/// [`repair_file`] over any [`Storage`] (for tests with fault injection, or in-memory images).
pub fn repair_storage(
    storage: Box<dyn Storage>,
    path: impl AsRef<Path>,
    options: &RepairOptions,
) -> Result<RepairReport> {
    let path = path.as_ref();
    let write = !options.dry_run;
    let insp = Vhd::inspect_storage(storage, path, open_options(options, write));
    let mut planned = plan_repair(path, insp, Some(write))?;
    if write {
        write_plan(&mut planned)?;
    }
    finish(path, planned, write, options)
}

fn open_options(options: &RepairOptions, writable: bool) -> OpenOptions {
    OpenOptions {
        writable,
        lenient: false,
        size_rule: options.size_rule,
    }
}

/// Codes repair fixes; every other warning or error is reported as not repaired.
const REPAIRED_CODES: &[ProblemCode] = &[
    ProblemCode::FooterChecksum,
    ProblemCode::FooterEndBad,
    ProblemCode::FooterCopyBad,
    ProblemCode::FooterCopyDiffers,
    ProblemCode::HeaderChecksum,
    ProblemCode::BatEntryOutside,
    ProblemCode::BlockOverlap,
];

/// What a repair (VHD or VHDX) lists as not repaired: every warning and error found after it,
/// or, when nothing was written (a plan), those whose code it does not fix (`repaired`).
pub(crate) fn not_repaired(
    findings: Vec<Finding>,
    repaired: &[ProblemCode],
    wrote: bool,
) -> Vec<Finding> {
    findings
        .into_iter()
        .filter(|f| f.severity != Severity::Info && (wrote || !repaired.contains(&f.code)))
        .collect()
}

/// The file, the writes that repair it (in order, with their bytes) and the data they lose.
struct Planned {
    vhd: Vhd,
    writes: Vec<(RepairAction, Vec<u8>)>,
    lost: Vec<LostRange>,
}

/// Work out the writes (see the module docs). `lock`: take the file's lock first, exclusive
/// or shared (`None`: the caller holds it).
fn plan_repair(path: &Path, insp: Inspection, lock: Option<bool>) -> Result<Planned> {
    let Inspection {
        vhd,
        problems,
        dropped_entries,
        ..
    } = insp;
    let vhd = repairable(path, vhd, &problems)?;
    if let Some(exclusive) = lock {
        vhd.lock(exclusive)?;
    }
    let mut plan: Vec<(RepairAction, Vec<u8>)> = Vec::new();
    // 1. Header checksum.
    plan.extend(header_write(&vhd));
    // 2. BAT entries to drop, grouped by BAT sector.
    let lost = dropped_entries
        .iter()
        .map(|d| lost_range(&vhd, d))
        .collect();
    plan.extend(bat_writes(path, &vhd, &dropped_entries)?);
    // 3. and 4. The end footer and the offset-0 copy.
    plan.extend(footer_writes(&vhd, &problems));
    Ok(Planned {
        vhd,
        writes: plan,
        lost,
    })
}

/// The inspected file, or why it cannot be repaired: the last fatal problem stopped the
/// inspection before the file could be opened.
fn repairable(path: &Path, vhd: Option<Vhd>, problems: &[Problem]) -> Result<Vhd> {
    if let Some(vhd) = vhd {
        return Ok(vhd);
    }
    let fatal = problems.iter().rev().find(|p| p.stops_open());
    let why = fatal.map_or("unknown problem", |p| p.message.as_str());
    let detail = format!("cannot repair: {why}");
    // A table too large to hold is not damage: the file may be fine.
    if fatal.is_some_and(|p| p.code == ProblemCode::BatTooLarge) {
        return Err(Error::not_supported(detail).in_file(path));
    }
    Err(Error::Format {
        path: Some(path.to_path_buf()),
        detail,
    })
}

/// Step 1: the dynamic header, when its checksum is wrong.
fn header_write(vhd: &Vhd) -> Option<(RepairAction, Vec<u8>)> {
    let h = vhd.header().filter(|h| !h.checksum_ok())?;
    Some((
        RepairAction {
            structure: "dynamic header",
            offset: vhd.footer().data_offset,
            len: 1024,
            reason: format!(
                "checksum {:#010x} is wrong; the fields give {:#010x}",
                h.checksum,
                h.computed_checksum()
            ),
        },
        h.to_bytes().to_vec(),
    ))
}

/// What dropping `dropped` loses: its block's virtual range, and where the data still lies.
fn lost_range(vhd: &Vhd, dropped: &DroppedEntry) -> LostRange {
    let index = dropped.block;
    let bs = vhd.block_size();
    let start = index.saturating_mul(bs).min(vhd.virtual_size());
    let end = start.saturating_add(bs).min(vhd.virtual_size());
    LostRange {
        block: index,
        virtual_range: start..end,
        file_offset: u64::from(dropped.entry) * SECTOR_SIZE,
        reason: dropped.reason.clone(),
    }
}

/// Step 2: the BAT sectors holding the dropped entries, each entry made unused and the rest
/// of the sector rewritten as it was read.
fn bat_writes(
    path: &Path,
    vhd: &Vhd,
    dropped_entries: &[DroppedEntry],
) -> Result<Vec<(RepairAction, Vec<u8>)>> {
    let Some(h) = vhd.header() else {
        return Ok(Vec::new());
    };
    let mut sectors: BTreeMap<u64, Vec<u64>> = BTreeMap::new();
    for dropped in dropped_entries {
        let index = dropped.block;
        sectors
            .entry(index * 4 / SECTOR_SIZE)
            .or_default()
            .push(index);
    }
    let file_len = vhd
        .storage()
        .len()
        .map_err(|e| Error::io(format!("{}: reading length", path.display()), e))?;
    let mut plan = Vec::new();
    for (first, last, indices) in sector_runs(sectors) {
        let offset = h.table_offset + first * SECTOR_SIZE;
        // The table was read whole when the file was opened, so this is readable, except
        // for padding past the end of a file whose table ends mid-sector.
        let len = ((last - first + 1) * SECTOR_SIZE).min(file_len.saturating_sub(offset));
        let mut buf = vec![0u8; len as usize];
        vhd.read_raw(offset, &mut buf)?;
        for index in &indices {
            let at = (index * 4 - first * SECTOR_SIZE) as usize;
            if let Some(e) = buf.get_mut(at..at + 4) {
                e.copy_from_slice(&UNUSED.to_be_bytes());
            }
        }
        plan.push((
            RepairAction {
                structure: "BAT",
                offset,
                len: buf.len() as u64,
                reason: format!(
                    "drop the entr{} of block{} {}",
                    if indices.len() == 1 { "y" } else { "ies" },
                    if indices.len() == 1 { "" } else { "s" },
                    ranges(&indices)
                ),
            },
            buf,
        ));
    }
    Ok(plan)
}

/// Consecutive BAT sectors as runs (first, last, the blocks in them), each one write of at
/// most 1 MiB: a hostile table can need thousands of sectors.
fn sector_runs(sectors: BTreeMap<u64, Vec<u64>>) -> Vec<(u64, u64, Vec<u64>)> {
    const MAX_RUN: u64 = 2048;
    let mut runs: Vec<(u64, u64, Vec<u64>)> = Vec::new();
    for (sector, indices) in sectors {
        match runs.last_mut() {
            Some((first, last, all)) if *last + 1 == sector && sector - *first < MAX_RUN => {
                *last = sector;
                all.extend(indices);
            }
            _ => runs.push((sector, sector, indices)),
        }
    }
    runs
}

/// Steps 3 and 4: the end footer when it is missing or damaged, then the offset-0 copy when
/// it is missing, damaged or different.
fn footer_writes(vhd: &Vhd, problems: &[Problem]) -> Vec<(RepairAction, Vec<u8>)> {
    let has = |code: ProblemCode| problems.iter().any(|p| p.code == code);
    let footer_bytes = vhd.footer().to_bytes();
    let mut plan = Vec::new();
    let end_bad = vhd.footer_source() == FooterSource::Copy || has(ProblemCode::FooterChecksum);
    if end_bad {
        let reason = if vhd.footer_source() == FooterSource::Copy {
            "missing or damaged; restored from the copy at offset 0".to_string()
        } else {
            "checksum is wrong; recomputed".to_string()
        };
        plan.push((
            RepairAction {
                structure: "footer",
                offset: vhd.footer_offset(),
                len: FOOTER_SIZE as u64,
                reason,
            },
            footer_bytes.to_vec(),
        ));
    }
    // A footer in use with a bad checksum means the copy is no good either (a good one would
    // have been chosen), even when it is byte-for-byte the same.
    let copy_bad = has(ProblemCode::FooterCopyBad)
        || has(ProblemCode::FooterCopyDiffers)
        || has(ProblemCode::FooterChecksum);
    if vhd.disk_type().is_sparse() && copy_bad {
        plan.push((
            RepairAction {
                structure: "footer copy",
                offset: 0,
                len: FOOTER_SIZE as u64,
                reason: "missing, damaged or different from the end footer; rewritten from it"
                    .into(),
            },
            footer_bytes.to_vec(),
        ));
    }
    plan
}

/// Make the planned writes, with one sync after each step (see the module docs); the writes
/// within a step (BAT runs) are independent of each other.
fn write_plan(planned: &mut Planned) -> Result<()> {
    let Planned { vhd, writes, .. } = planned;
    for (i, (action, bytes)) in writes.iter().enumerate() {
        vhd.write_repaired(action.structure, action.offset, bytes)?;
        if writes
            .get(i + 1)
            .is_none_or(|(next, _)| next.structure != action.structure)
        {
            vhd.flush()?;
        }
    }
    Ok(())
}

/// The report: what was (or would be) written, and what a deep check still finds afterwards
/// (on the file as it now is; in a dry run or without writes, leaving out what the writes
/// would fix), so that nothing `check --deep` reports goes unmentioned.
fn finish(
    path: &Path,
    planned: Planned,
    wrote: bool,
    options: &RepairOptions,
) -> Result<RepairReport> {
    let Planned { vhd, writes, lost } = planned;
    let wrote = wrote && !writes.is_empty();
    let disk_type = vhd.disk_type();
    let deep = CheckOptions {
        deep: true,
        size_rule: options.size_rule,
    };
    let findings = check_storage(vhd.into_storage(), path, &deep).findings;
    let not_repaired = not_repaired(findings, REPAIRED_CODES, wrote);
    Ok(RepairReport {
        file: path.to_path_buf(),
        dry_run: options.dry_run,
        wrote,
        actions: writes.into_iter().map(|(a, _)| a).collect(),
        lost,
        not_repaired,
        disk_type,
    })
}

/// Sorted block indices as `0..=127, 300, 302` (a hostile table can drop a million entries).
fn ranges(indices: &[u64]) -> String {
    let mut v = indices.to_vec();
    v.sort_unstable();
    let mut parts: Vec<String> = Vec::new();
    let mut i = 0;
    while i < v.len() {
        let mut j = i;
        while j + 1 < v.len() && v[j + 1] == v[j] + 1 {
            j += 1;
        }
        parts.push(if j > i + 1 {
            format!("{}..={}", v[i], v[j])
        } else if j == i + 1 {
            format!("{}, {}", v[i], v[j])
        } else {
            v[i].to_string()
        });
        i = j + 1;
    }
    parts.join(", ")
}
