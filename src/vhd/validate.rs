//! What validation finds in a file: [`Problem`]s (the crate's one vocabulary, [`crate::problem`]), the
//! [`Inspection`] that `check` and `repair` work from, and the validator that collects them
//! while a file is opened (one pass: opening stops at the first fatal problem, inspecting goes
//! on where it can).

use std::borrow::Cow;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use super::open::open_inner;
use super::{OpenOptions, Vhd};
use crate::error::{Error, Result};
use crate::format::batmap::Batmap;
use crate::io::{FileStorage, Storage};
use crate::layer::files::open_regular_file;
pub use crate::problem::{Problem, ProblemCode, Severity};

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

/// Collects problems while a file is validated. Opening stops at the first problem that
/// stops an open ([`Problem::stops_open`]); inspecting records it and goes on where it can.
pub(super) struct Validator {
    pub(super) collect: bool,
    /// The file the problems are in.
    file: PathBuf,
    pub(super) problems: Vec<Problem>,
    pub(super) dropped: Vec<DroppedEntry>,
    pub(super) batmap: Option<Batmap>,
    /// A problem stopped validation (it is the last one recorded).
    pub(super) stopped: bool,
    /// Problems recorded per code, and those left out past [`MAX_PROBLEMS_PER_CODE`]: a
    /// hostile table can make every one of a million entries wrong.
    pub(super) per_code: HashMap<ProblemCode, (usize, u64)>,
}

/// At most this many problems of one kind are listed by [`Vhd::inspect`]; the rest are
/// counted in one summary problem.
pub const MAX_PROBLEMS_PER_CODE: usize = 1000;

impl Validator {
    pub(super) fn new(collect: bool, file: &Path) -> Validator {
        Validator {
            collect,
            file: file.to_path_buf(),
            problems: Vec::new(),
            dropped: Vec::new(),
            batmap: None,
            stopped: false,
            per_code: HashMap::new(),
        }
    }

    /// Problems left out, as one summary problem per code.
    pub(super) fn summarize(&mut self) {
        let mut left: Vec<(ProblemCode, u64)> = self
            .per_code
            .iter()
            .filter(|(_, (_, n))| *n > 0)
            .map(|(c, (_, n))| (*c, *n))
            .collect();
        left.sort_unstable();
        for (code, n) in left {
            let message = format!(
                "{n} more problem(s) of the same kind ({code}) not listed (at most {MAX_PROBLEMS_PER_CODE} are)"
            );
            self.push(Severity::Error, code, "file", None, None, message);
        }
    }

    fn push(
        &mut self,
        severity: Severity,
        code: ProblemCode,
        structure: &str,
        offset: Option<u64>,
        block: Option<u64>,
        message: String,
    ) {
        let p = Problem::new(severity, code, &self.file, structure, message);
        self.problems.push(p.at(offset, block));
    }

    /// A problem an open goes on after, listing it in [`Vhd::warnings`]; a checker grades it a
    /// warning, or an error when the code is damage an open tolerates
    /// ([`ProblemCode::open_tolerates`]).
    pub(super) fn warn(
        &mut self,
        code: ProblemCode,
        structure: &str,
        offset: Option<u64>,
        message: String,
    ) {
        let severity = if code.open_tolerates() {
            Severity::Error
        } else {
            Severity::Warning
        };
        self.push(severity, code, structure, offset, None, message);
    }

    /// An oddity noted by [`Vhd::inspect`] only (no warning when opening).
    pub(super) fn info(
        &mut self,
        code: ProblemCode,
        structure: &str,
        offset: Option<u64>,
        message: String,
    ) {
        self.push(Severity::Info, code, structure, offset, None, message);
    }

    /// A problem that stops an open, after which validation can go on: opening fails,
    /// inspecting records it.
    pub(super) fn error(
        &mut self,
        code: ProblemCode,
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
        self.push(
            Severity::Error,
            code,
            structure,
            offset,
            block,
            err.to_string(),
        );
        Ok(())
    }

    /// A problem that stops an open, after which validation cannot go on.
    pub(super) fn stop(
        &mut self,
        code: ProblemCode,
        structure: &str,
        offset: Option<u64>,
        err: Error,
    ) -> Error {
        self.stopped = true;
        if self.collect {
            self.push(
                Severity::Error,
                code,
                structure,
                offset,
                None,
                err.to_string(),
            );
        }
        err
    }

    pub(super) fn warnings(&self) -> Vec<String> {
        self.problems
            .iter()
            .filter(|p| p.warns_on_open())
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
        let mut v = Validator::new(true, &path);
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
                    v.push(
                        Severity::Error,
                        ProblemCode::Io,
                        "file",
                        None,
                        None,
                        e.to_string(),
                    );
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
