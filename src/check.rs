//! Validating a VHD, or a whole differencing chain, and listing every problem found.
//!
//! [`check_file`] runs the same validation as [`Vhd::open`] (through [`Vhd::inspect`], which
//! does not stop at the first problem), then adds the checks that only a checker needs: both
//! footers present and byte-for-byte equal, a differencing disk that names itself as parent,
//! and, in deep mode, the contents of every block (never-written sectors of a dynamic disk are
//! zero, no bitmap bit is set past the virtual size, blktap's batmap agrees with the bitmaps).
//! [`check_chain`] checks every file of a chain and the links between them.
//!
//! Metadata checks are O(n log n) in the number of allocated blocks: the BAT is read in one
//! call and block extents are sorted once (vhd-util's check compares every pair).
//!
//! ```
//! use vhd_merge::check::{check_file, CheckOptions, Severity};
//! use vhd_merge::create::{create_dynamic, CreateOptions};
//!
//! let dir = tempfile::tempdir()?;
//! let path = dir.path().join("disk.vhd");
//! create_dynamic(&path, 8 << 20, &CreateOptions::default())?;
//! let report = check_file(&path, &CheckOptions::default().deep(true))?;
//! assert!(!report.has_errors());
//! assert_eq!(report.count(Severity::Error), 0);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::path::{Path, PathBuf};

use crate::bitmap::SectorBitmap;
use crate::chain::{Chain, ChainOptions};
use crate::error::{Error, Result};
use crate::format::{DiskType, SECTOR_SIZE};
use crate::io::Storage;
pub use crate::problem::{Problem, ProblemCode, Severity};
use crate::vhd::{Batmap, Inspection, OpenOptions, SizeRule, Vhd};

/// One problem found by a check: the crate's [`Problem`] (the former name, kept).
pub type Finding = Problem;

options! {
    /// What to check.
    #[derive(Clone, Debug, Default)]
    pub struct CheckOptions {
        /// Also read every allocated block: bitmaps, never-written sectors, the batmap.
        pub deep: bool,
        /// How to decide the virtual size.
        pub size_rule: SizeRule,
    }
}

/// The findings of a check, in the order the files and structures were checked.
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[derive(Clone, Debug, Default)]
#[non_exhaustive]
pub struct CheckReport {
    /// The files checked, child first for a chain.
    #[cfg_attr(feature = "serde", serde(rename = "paths"))]
    pub files: Vec<PathBuf>,
    /// Everything found.
    pub findings: Vec<Finding>,
}

impl CheckReport {
    /// True when at least one finding is an error.
    pub fn has_errors(&self) -> bool {
        self.findings.iter().any(|f| f.severity == Severity::Error)
    }

    /// Number of findings of a severity.
    pub fn count(&self, severity: Severity) -> usize {
        self.findings
            .iter()
            .filter(|f| f.severity == severity)
            .count()
    }

    /// The findings with a given code (a [`ProblemCode`] or its name).
    pub fn with_code<'a, C>(&'a self, code: C) -> impl Iterator<Item = &'a Finding> + 'a
    where
        C: 'a,
        ProblemCode: PartialEq<C>,
    {
        self.findings.iter().filter(move |f| f.code == code)
    }
}

/// Where a check collects its findings about one file (the VHDX check uses it too), at most
/// `limit` of each code when there is a limit (a hostile table can give millions).
pub(crate) struct Sink<'a> {
    pub(crate) file: &'a Path,
    pub(crate) findings: Vec<Finding>,
    pub(crate) limit: Option<usize>,
    /// Findings of each code so far, listed or not.
    pub(crate) counts: std::collections::BTreeMap<ProblemCode, usize>,
}

impl<'a> Sink<'a> {
    pub(crate) fn new(file: &'a Path, limit: Option<usize>) -> Sink<'a> {
        Sink {
            file,
            findings: Vec::new(),
            limit,
            counts: Default::default(),
        }
    }

    pub(crate) fn add(
        &mut self,
        severity: Severity,
        code: ProblemCode,
        structure: impl Into<String>,
        offset: Option<u64>,
        block: Option<u64>,
        message: String,
    ) {
        let n = self.counts.entry(code).or_insert(0);
        *n += 1;
        if self.limit.is_some_and(|l| *n > l) {
            return;
        }
        let finding = Problem::new(severity, code, self.file, structure, message);
        self.findings.push(finding.at(offset, block));
    }

    /// The findings, with a note for each code that had more than the limit.
    pub(crate) fn finish(mut self) -> Vec<Finding> {
        let limit = self.limit.unwrap_or(usize::MAX);
        let over: Vec<(ProblemCode, usize)> = self
            .counts
            .iter()
            .filter(|(_, n)| **n > limit)
            .map(|(c, n)| (*c, *n - limit))
            .collect();
        for (code, more) in over {
            let message = format!("{more} more finding(s) of kind {code} are not listed");
            self.limit = None;
            self.add(Severity::Info, code, "file", None, None, message);
        }
        self.findings
    }
}

/// Check one file. Fails only when it cannot be opened at all (missing, not a regular file, no
/// permission); everything wrong inside it is a finding.
/// A VHDX is checked by [`crate::vhdx::check::check_file`] (`deep`: its sector bitmaps).
pub fn check_file(path: impl AsRef<Path>, options: &CheckOptions) -> Result<CheckReport> {
    let path = path.as_ref();
    if crate::layer::detect_format(path) == Some(crate::layer::Format::Vhdx) {
        return crate::vhdx::check::check_file(path, options.deep);
    }
    let insp = Vhd::inspect(path, open_options(options))?;
    Ok(report_of(path, insp, options))
}

/// [`check_file`] over any [`Storage`]; `path` names the file in findings.
pub fn check_storage(
    storage: Box<dyn Storage>,
    path: impl AsRef<Path>,
    options: &CheckOptions,
) -> CheckReport {
    let path = path.as_ref();
    let insp = Vhd::inspect_storage(storage, path, open_options(options));
    report_of(path, insp, options)
}

fn open_options(options: &CheckOptions) -> OpenOptions {
    OpenOptions {
        writable: false,
        lenient: false,
        size_rule: options.size_rule,
    }
}

fn report_of(path: &Path, insp: Inspection, options: &CheckOptions) -> CheckReport {
    let mut sink = Sink::new(path, None);
    // Validation grades its problems as a checker does (`Problem::severity`).
    sink.findings = insp.problems;
    if let Some(vhd) = &insp.vhd {
        file_checks(vhd, &mut sink);
        if options.deep {
            deep_checks(vhd, insp.batmap.as_ref(), &mut sink);
        }
    }
    CheckReport {
        files: vec![path.to_path_buf()],
        findings: sink.findings,
    }
}

/// Checks on an opened file that opening itself does not need.
fn file_checks(vhd: &Vhd, sink: &mut Sink<'_>) {
    let f = vhd.footer();
    if vhd.disk_type().is_sparse() && f.current_size > crate::format::MAX_DYNAMIC_SIZE {
        sink.add(
            Severity::Warning,
            ProblemCode::TooLarge,
            "footer",
            Some(vhd.footer_offset()),
            None,
            format!(
                "Current Size {} is larger than the 2040 GiB that Windows and QEMU accept for dynamic and differencing disks",
                f.current_size
            ),
        );
    }
    let Some(h) = vhd.header() else { return };
    let ho = Some(f.data_offset);
    if h.reserved1 != 0 {
        sink.add(
            Severity::Info,
            ProblemCode::ReservedField,
            "dynamic header",
            ho,
            None,
            format!(
                "dynamic header reserved field at byte 60 is {:#x}, not zero",
                h.reserved1
            ),
        );
    }
    if vhd.disk_type() == DiskType::Differencing {
        if h.parent_unique_id == f.unique_id {
            sink.add(
                Severity::Error,
                ProblemCode::SelfParent,
                "dynamic header",
                ho,
                None,
                format!(
                    "differencing disk names itself as its parent (Parent Unique Id {} is its own unique id): the chain is a cycle",
                    f.unique_id
                ),
            );
        }
        if h.parent_unique_id.is_nil() {
            sink.add(
                Severity::Warning,
                ProblemCode::NoParentId,
                "dynamic header",
                ho,
                None,
                "differencing disk has an all-zero Parent Unique Id: its parent cannot be verified (blktap uses this for a raw parent)".into(),
            );
        }
        if h.parent_name().is_empty() && h.locators.iter().all(|l| l.is_empty()) {
            sink.add(
                Severity::Warning,
                ProblemCode::NoParentHint,
                "dynamic header",
                ho,
                None,
                "differencing disk has neither a parent name nor parent locators: its parent can only be given by hand".into(),
            );
        }
    }
    let bc = vhd.block_count();
    // An unreadable table is reported by the deep check; here it ends the list.
    let past = vhd.allocated_indices().map_while(|i| i.ok());
    for i in past.skip_while(|&i| i < bc) {
        // The offset only locates the finding: an unreadable entry leaves it out.
        let offset = vhd.block_offset(i).ok().flatten();
        sink.add(
            Severity::Info,
            ProblemCode::BlockPastEnd,
            format!("block {i}"),
            offset,
            Some(i),
            format!(
                "block {i} is allocated but lies past the virtual size ({} bytes); its data is never read",
                vhd.virtual_size()
            ),
        );
    }
}

/// Read every allocated block: bitmap bits past the virtual size, never-written sectors of a
/// dynamic disk (the spec requires them to be zero, and readers such as QEMU that skip the
/// bitmap return what is there: a warning, as an interrupted merge leaves them), and the
/// blktap batmap.
fn deep_checks(vhd: &Vhd, batmap: Option<&Batmap>, sink: &mut Sink<'_>) {
    let Some(h) = vhd.header() else { return };
    let map = batmap.and_then(|b| read_batmap(vhd, b, sink));
    let mut buf = Vec::new();
    let listed = if vhd.allocated_blocks() > crate::vhd::held_blocks() {
        // More blocks than are listed at once (the bound of the overlap sweep): table order.
        vhd.allocated_entries().try_for_each(|entry| {
            let (i, offset) = entry.map_err(|e| e.to_string())?;
            check_block(vhd, (offset, i), map.as_deref(), &mut buf, sink);
            Ok(())
        })
    } else {
        file_order(vhd).map(|blocks| {
            for (sector, index) in blocks {
                let at = (u64::from(sector) * SECTOR_SIZE, u64::from(index));
                check_block(vhd, at, map.as_deref(), &mut buf, sink);
            }
        })
    };
    if let Err(e) = listed {
        sink.add(
            Severity::Error,
            ProblemCode::Unreadable,
            "BAT",
            None,
            None,
            e,
        );
        return;
    }
    if let Some(map) = &map {
        for index in 0..u64::from(h.max_table_entries) {
            if bit_set(map, index) && !vhd.is_allocated(index).unwrap_or(true) {
                sink.add(
                    Severity::Error,
                    ProblemCode::BatmapNotFull,
                    format!("block {index}"),
                    None,
                    Some(index),
                    format!("the batmap marks block {index} full but it is not allocated"),
                );
            }
        }
    }
}

/// One allocated block as [`deep_checks`] read it: its index, file offset, sector bitmap and
/// how many of its sectors lie inside the virtual size.
/// The allocated blocks as (sector, index) in file order, so the reads are sequential; 8
/// bytes a block (BAT entries are u32 sectors and Max Table Entries is a u32, so both casts
/// are exact).
fn file_order(vhd: &Vhd) -> std::result::Result<Vec<(u32, u32)>, String> {
    let mut blocks: Vec<(u32, u32)> = Vec::new();
    if blocks.try_reserve_exact(vhd.allocated_blocks()).is_err() {
        return Err("not enough memory to list the blocks".to_string());
    }
    vhd.allocated_entries().try_for_each(|entry| {
        let (i, offset) = entry.map_err(|e| e.to_string())?;
        blocks.push(((offset / SECTOR_SIZE) as u32, i as u32));
        Ok::<(), String>(())
    })?;
    blocks.sort_unstable();
    Ok(blocks)
}

/// Read block `index` at `offset` and check its bitmap bits past the end, its never-written
/// sectors (dynamic disks) and its batmap bit.
fn check_block(
    vhd: &Vhd,
    (offset, index): (u64, u64),
    map: Option<&[u8]>,
    buf: &mut Vec<u8>,
    sink: &mut Sink<'_>,
) {
    let spb = vhd.sectors_per_block() as usize;
    let bm_bytes = vhd.bitmap_bytes();
    let bs = vhd.block_size();
    let size = vhd.virtual_size();
    let dynamic = vhd.disk_type() == DiskType::Dynamic;
    // Sized by the block size, which opening bounded (MAX_BLOCK_SIZE), and the block was
    // checked to lie inside the file.
    let want = if dynamic { bm_bytes + bs } else { bm_bytes };
    buf.resize(want as usize, 0);
    if let Err(e) = vhd.read_raw(offset, buf) {
        let block = format!("block {index}");
        sink.add(
            Severity::Error,
            ProblemCode::Unreadable,
            block,
            Some(offset),
            Some(index),
            e.to_string(),
        );
        return;
    }
    let (bm_raw, data) = buf.split_at(bm_bytes as usize);
    let b = ReadBlock {
        index,
        offset,
        bitmap: SectorBitmap::from_bytes(bm_raw, spb),
        valid: (size.saturating_sub(index.saturating_mul(bs)).min(bs) / SECTOR_SIZE) as usize,
    };
    check_bits_past_end(&b, size, sink);
    if dynamic {
        check_unwritten_zero(&b, data, bs, bm_bytes, sink);
    }
    if let Some(map) = map
        && bit_set(map, index)
        && !b.bitmap.all()
    {
        sink.add(
            Severity::Error,
            ProblemCode::BatmapNotFull,
            format!("block {index}"),
            Some(offset),
            Some(index),
            format!(
                "the batmap marks block {index} full but its bitmap has {} of {spb} sectors",
                b.bitmap.count_ones()
            ),
        );
    }
}

struct ReadBlock {
    index: u64,
    offset: u64,
    bitmap: SectorBitmap,
    valid: usize,
}

/// Bitmap bits set for sectors past the virtual size (in the last, partial block).
fn check_bits_past_end(b: &ReadBlock, size: u64, sink: &mut Sink<'_>) {
    let past = b
        .bitmap
        .runs_in(b.valid..b.bitmap.len(), true)
        .map(|r| r.len())
        .sum::<usize>();
    if past == 0 {
        return;
    }
    // QEMU and VirtualBox set every bit of a block they allocate (§3.2, §7.13): harmless, as
    // nothing reads past the virtual size. A partial pattern that reaches past the end is odder.
    let (severity, note) = if b.bitmap.all() {
        (
            Severity::Info,
            "; the bitmap is full, as QEMU and VirtualBox write it",
        )
    } else {
        (Severity::Warning, "")
    };
    sink.add(
        severity,
        ProblemCode::BitmapPastEnd,
        format!("block {}", b.index),
        Some(b.offset),
        Some(b.index),
        format!("{past} bitmap bit(s) set for sectors past the virtual size ({size} bytes){note}"),
    );
}

/// Never-written sectors (bitmap bit clear) of a dynamic disk's block that hold non-zero data.
fn check_unwritten_zero(b: &ReadBlock, data: &[u8], bs: u64, bm_bytes: u64, sink: &mut Sink<'_>) {
    let mut bad = 0usize;
    let mut first = None;
    for s in b.bitmap.runs_in(0..b.valid, false).flatten() {
        let sector = data.get(s * 512..(s + 1) * 512).unwrap_or(&[]);
        if sector.iter().any(|&x| x != 0) {
            bad += 1;
            first.get_or_insert(s);
        }
    }
    let Some(s) = first else { return };
    // A warning, not an error: the bitmap says what the disk holds, and this is the state every
    // crash-safe writer leaves when it is interrupted between a write and the bitmap bits that
    // publish it (data first, as tapdisk and our merge do). Only readers that skip the bitmap
    // (QEMU) see the data.
    sink.add(
        Severity::Warning,
        ProblemCode::UnwrittenNotZero,
        format!("block {}", b.index),
        Some(b.offset + bm_bytes + s as u64 * SECTOR_SIZE),
        Some(b.index),
        format!(
            "{bad} never-written sector(s) (bitmap bit clear) hold non-zero data, the first at virtual offset {}: readers that honour the bitmap (Hyper-V, vhd-merge) read zeros there, readers that skip it (QEMU) read the data. This looks like an interrupted write, such as an interrupted merge into this disk (a merge makes data durable before the bitmap that publishes it): re-run the merge to finish it",
            b.index * bs + s as u64 * SECTOR_SIZE
        ),
    );
}

fn bit_set(map: &[u8], index: u64) -> bool {
    usize::try_from(index / 8)
        .ok()
        .and_then(|i| map.get(i))
        .is_some_and(|b| b & (0x80 >> (index % 8)) != 0)
}

/// The batmap's bits, when its checksum matches (a damaged map says nothing reliable).
fn read_batmap(vhd: &Vhd, bm: &Batmap, sink: &mut Sink<'_>) -> Option<Vec<u8>> {
    // Opening checked that the map lies inside the file.
    let mut map = vec![0u8; usize::try_from(bm.map_bytes()).ok()?];
    if let Err(e) = vhd.read_raw(bm.map_offset, &mut map) {
        sink.add(
            Severity::Error,
            ProblemCode::Unreadable,
            "batmap",
            Some(bm.map_offset),
            None,
            e.to_string(),
        );
        return None;
    }
    let computed = bm.computed_checksum(&map);
    if computed != bm.checksum {
        sink.add(
            Severity::Error,
            ProblemCode::BatmapChecksum,
            "batmap",
            Some(bm.header_offset),
            None,
            format!(
                "batmap checksum mismatch: stored {:#010x}, computed {computed:#010x}; the batmap is not used",
                bm.checksum
            ),
        );
        return None;
    }
    Some(map)
}

/// Check the file at `path` and, through its parent locators, every ancestor, plus the links:
/// each parent found and verified by unique id (a missing parent, a cycle or a chain deeper
/// than the limit is an error), parent time stamps (a warning), and a child larger than its
/// parent (a warning). A chain that cannot be opened is reported with what was tried.
pub fn check_chain(
    path: impl AsRef<Path>,
    options: &CheckOptions,
    chain_options: &ChainOptions,
) -> Result<CheckReport> {
    let path = path.as_ref();
    let mut report = check_file(path, options)?;
    let chain_options = ChainOptions {
        size_rule: options.size_rule,
        ..chain_options.clone()
    };
    let chain = match Chain::open(path, &chain_options) {
        Ok(c) => c,
        Err(e) => {
            // The first file's own problems are already listed; say why the chain stops.
            let message = chain_error_message(&e);
            let f = Problem::new(Severity::Error, ProblemCode::Chain, path, "chain", message);
            report.findings.push(f);
            return Ok(report);
        }
    };
    let layers = chain.layers();
    for (i, layer) in layers.iter().enumerate().skip(1) {
        let parent = layer.layer.as_ref();
        let child = layers[i - 1].layer.as_ref();
        let sub = check_file(parent.path(), options)?;
        report.files.extend(sub.files);
        report.findings.extend(sub.findings);
        let mut link = |severity, code, message: String| {
            let f = Problem::new(severity, code, child.path(), "chain", message);
            report.findings.push(f);
        };
        for w in &layer.warnings {
            link(Severity::Warning, ProblemCode::ParentTimestamp, w.clone());
        }
        if child.virtual_size() > parent.virtual_size() {
            link(
                Severity::Warning,
                ProblemCode::ChildLarger,
                format!(
                    "virtual size {} is larger than its parent {}'s {}: sectors past the parent's end read as zero unless the child holds them",
                    child.virtual_size(),
                    parent.path().display(),
                    parent.virtual_size()
                ),
            );
        }
        if child.block_size() != parent.block_size()
            && parent.kind() != crate::layer::DiskKind::Fixed
        {
            link(
                Severity::Info,
                ProblemCode::BlockSizeDiffers,
                format!(
                    "block size {} differs from its parent {}'s {}",
                    child.block_size(),
                    parent.path().display(),
                    parent.block_size()
                ),
            );
        }
    }
    Ok(report)
}

fn chain_error_message(e: &Error) -> String {
    format!("chain cannot be opened ({}): {e}", e.return_code())
}
