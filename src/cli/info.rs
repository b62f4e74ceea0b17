//! `vhd-merge info FILE [--json] [--lenient]`: footer, header, locators and allocation of one
//! VHD, as an aligned listing or one JSON object.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use vhd_merge::image::FIXED_CHUNK;
use vhd_merge::info::{
    ImageInfo, InfoOptions, InfoProblem, InfoReport, LocatorInfo, VhdInfo, inspect_file,
};
use vhd_merge::{Error, Result};

/// Arguments of `vhd-merge info`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// The VHD or VHDX file.
    pub file: PathBuf,
    /// Print one JSON object instead of the listing.
    #[arg(long)]
    pub json: bool,
    /// Accept footer and header checksum mismatches (they are listed as warnings).
    #[arg(long)]
    pub lenient: bool,
}

/// Run the command: the library's [`InfoReport`], as a listing or as its JSON with what only
/// the CLI adds (`hint` when there are problems, `error` when the file cannot be used).
pub fn run(args: Args) -> Result<ExitCode> {
    let opts = InfoOptions::default().lenient(args.lenient);
    // A strict open's failure says where to go next; a lenient report carries `hint` instead.
    let mut report =
        inspect_file(&args.file, &opts).map_err(|e| if args.lenient { e } else { with_hint(e) })?;
    let failure = report.failure.take();
    let hint = (!report.problems.is_empty()).then(|| hint(&args.file));
    if !args.json {
        print!("{}", listing(&report, hint.as_deref()));
        return failure.map_or(Ok(ExitCode::SUCCESS), Err);
    }
    let mut v = super::to_value(&report)?;
    if let Some(h) = hint {
        v["hint"] = h.into();
    }
    if let Some(e) = &failure {
        v["error"] = super::error_json(e);
    }
    super::print_json(&v)?;
    Ok(failure.map_or(ExitCode::SUCCESS, |e| super::fail(&e)))
}

/// Where to go from the damaged `file`.
pub(super) fn hint(file: &Path) -> String {
    let f = file.display();
    format!("`vhd-merge check {f}` lists what is wrong, `vhd-merge repair {f}` fixes what it can")
}

/// A strict open's failure, with where to go from it (`--lenient` shows what can be read).
pub(super) fn with_hint(e: Error) -> Error {
    match e {
        Error::Format {
            path: Some(path),
            detail,
        } => Error::Format {
            detail: format!(
                "{detail} ({}; `info --lenient` shows what can be read)",
                hint(&path)
            ),
            path: Some(path),
        },
        e => e,
    }
}

/// The rows for the problems and the hint.
pub(super) fn problem_rows(
    problems: &[InfoProblem],
    hint: Option<&str>,
    row: &mut dyn FnMut(&str, String),
) {
    for p in problems {
        row("problem", format!("[{}] {}", p.structure, p.message));
    }
    if let Some(h) = hint {
        row("see", h.to_string());
    }
}

/// The warnings, or `none`.
pub(super) fn warning_rows(warnings: &[String], row: &mut dyn FnMut(&str, String)) {
    if warnings.is_empty() {
        row("warnings", "none".into());
    }
    for w in warnings {
        row("warning", w.clone());
    }
}

/// The listing of a report.
fn listing(r: &InfoReport, hint: Option<&str>) -> String {
    let mut rows: Vec<(String, String)> = Vec::new();
    let mut row = |k: &str, v: String| rows.push((k.to_string(), v));
    row(
        "file",
        format!("{} ({} bytes)", r.path.display(), r.file_size),
    );
    match &r.image {
        None => row(
            "readable",
            "no: validation stopped at the last problem below".into(),
        ),
        Some(ImageInfo::Vhd(v)) => vhd_rows(v, &mut row),
        Some(ImageInfo::Vhdx(v)) => super::info_vhdx::rows(v, &mut row),
        Some(_) => row("format", "one this version cannot describe".into()),
    }
    problem_rows(&r.problems, hint, &mut row);
    aligned(rows)
}

pub(super) fn aligned(rows: Vec<(String, String)>) -> String {
    let width = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    let mut out = String::new();
    for (k, v) in rows {
        out.push_str(&format!("{k:<width$}  {v}\n"));
    }
    out
}

pub(super) use super::units::exact as bytes;

/// The rows of a VHD's listing (after `file`).
fn vhd_rows(v: &VhdInfo, row: &mut dyn FnMut(&str, String)) {
    row("disk type", v.disk_type.name());
    row(
        "virtual size",
        format!("{}, from {}", bytes(v.virtual_size), v.size_source.name()),
    );
    row("current size", bytes(v.current_size));
    row("original size", bytes(v.original_size));
    row(
        "creator",
        format!(
            "{:?} version {} on {:?}",
            v.creator_application, v.creator_version, v.creator_host_os
        ),
    );
    row("unique id", v.unique_id.to_string());
    row(
        "time stamp",
        format!("{} ({})", v.timestamp, v.timestamp_utc),
    );
    let g = v.geometry;
    row(
        "geometry (C/H/S)",
        format!("{}/{}/{}", g.cylinders, g.heads, g.sectors_per_track),
    );
    row("features", format!("{:#x}", v.features));
    if v.saved_state {
        row("saved state", "yes".into());
    }
    row(
        "footer",
        format!("{} (at offset {})", v.footer_source.name(), v.footer_offset),
    );
    match v.block_size {
        None => row(
            "data",
            format!(
                "fixed: {} bytes at offset 0 (read in {} chunks)",
                v.current_size,
                bytes(FIXED_CHUNK)
            ),
        ),
        Some(bs) => {
            row("block size", bytes(u64::from(bs)));
            row(
                "BAT",
                format!(
                    "{} at offset {}, {} allocated",
                    plural(
                        u64::from(v.max_table_entries.unwrap_or(0)),
                        "entry",
                        "entries"
                    ),
                    v.table_offset.unwrap_or(0),
                    v.allocated_block_count.unwrap_or(0)
                ),
            );
        }
    }
    if let Some(id) = v.parent_unique_id {
        row("parent unique id", id.to_string());
        row("parent name", v.parent_name.clone().unwrap_or_default());
        row(
            "parent time stamp",
            format!(
                "{} ({})",
                v.parent_timestamp.unwrap_or(0),
                v.parent_timestamp_utc.as_deref().unwrap_or("")
            ),
        );
    }
    locator_rows(&v.parent_locators, row);
    warning_rows(&v.warnings, row);
}

/// One row per used parent locator slot.
fn locator_rows(locators: &[LocatorInfo], row: &mut dyn FnMut(&str, String)) {
    for l in locators {
        let text = match (&l.path, &l.note) {
            (Some(p), _) => p.clone(),
            (None, Some(n)) => format!("({n})"),
            (None, None) => String::new(),
        };
        let space = match l.data_space_bytes {
            Some(b) => format!("{} (= {b} bytes)", l.data_space),
            None => format!("{} (not sectors or bytes)", l.data_space),
        };
        row(
            &format!("parent locator {}", l.slot),
            format!(
                "{:<4} at offset {}, length {}, space {}: {text}",
                l.platform_code.name(),
                l.data_offset,
                l.data_length,
                space
            ),
        );
    }
}

/// `1 entry`, `2 entries`.
pub(super) fn plural(n: u64, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}
