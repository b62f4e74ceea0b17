//! What validation finds in a file: [`Problem`]s with their [`ProblemLevel`] and code, the
//! [`Inspection`] that `check` and `repair` work from, and the validator that collects them
//! while a file is opened (one pass: opening stops at the first fatal problem, inspecting goes
//! on where it can).

use std::borrow::Cow;
use std::collections::HashMap;
use std::path::Path;

use super::files::open_regular_file;
use super::open::open_inner;
use super::{OpenOptions, Vhd};
use crate::error::{Error, Result};
use crate::format::batmap::Batmap;
use crate::io::{FileStorage, Storage};

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
    /// The BAT has more entries than [`crate::vhd::MAX_TABLE_ENTRIES`], or more allocated than
    /// [`crate::vhd::MAX_HELD_BLOCKS`]: not supported.
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

/// Collects problems while a file is validated. Opening stops at the first fatal problem;
/// inspecting records it and goes on where it can.
pub(super) struct Validator {
    pub(super) collect: bool,
    pub(super) problems: Vec<Problem>,
    pub(super) dropped: Vec<DroppedEntry>,
    pub(super) batmap: Option<Batmap>,
    /// A problem stopped validation (it is the last one recorded).
    pub(super) stopped: bool,
    /// Problems recorded per code, and those left out past [`MAX_PROBLEMS_PER_CODE`]: a
    /// hostile table can make every one of a million entries wrong.
    pub(super) per_code: HashMap<&'static str, (usize, u64)>,
}

/// At most this many problems of one kind are listed by [`Vhd::inspect`]; the rest are
/// counted in one summary problem.
pub const MAX_PROBLEMS_PER_CODE: usize = 1000;

impl Validator {
    pub(super) fn new(collect: bool) -> Validator {
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
    pub(super) fn summarize(&mut self) {
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

    pub(super) fn note(
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

    pub(super) fn warn(
        &mut self,
        code: &'static str,
        structure: &str,
        offset: Option<u64>,
        message: String,
    ) {
        self.note(ProblemLevel::Warning, code, structure, offset, message);
    }

    pub(super) fn info(
        &mut self,
        code: &'static str,
        structure: &str,
        offset: Option<u64>,
        message: String,
    ) {
        self.note(ProblemLevel::Info, code, structure, offset, message);
    }

    /// A fatal problem after which validation can go on: opening fails, inspecting records it.
    pub(super) fn error(
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
    pub(super) fn stop(
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

    pub(super) fn warnings(&self) -> Vec<String> {
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
