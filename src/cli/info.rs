//! `vhd-merge info FILE [--json] [--lenient]`: footer, header, locators and allocation of one
//! VHD, as an aligned listing or one JSON object.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use serde_json::{Value, json};
use vhd_merge::format::{PlatformCode, vhd_time_utc};
use vhd_merge::image::FIXED_CHUNK;
use vhd_merge::image::{Problem, ProblemLevel};
use vhd_merge::{DiskType, Error, OpenOptions, Result, Vhd};

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

/// Run the command.
pub fn run(args: Args) -> Result<ExitCode> {
    if vhd_merge::layer::detect_format(&args.file) == Some(vhd_merge::Format::Vhdx) {
        return super::info_vhdx::run(&args);
    }
    if !args.lenient {
        let vhd = Vhd::open(&args.file, OpenOptions::read_only()).map_err(with_hint)?;
        return show(&report(&vhd)?, args.json);
    }
    // Leniently: checksum mismatches are warnings; a file even a lenient open refuses is
    // shown as far as validation could read it, as `check` does, with what is wrong.
    let opts = OpenOptions {
        lenient: true,
        ..OpenOptions::read_only()
    };
    let open_error = match Vhd::open(&args.file, opts) {
        Ok(vhd) => return show(&report(&vhd)?, args.json),
        // Missing, unreadable, or not a regular file: nothing to show.
        Err(e @ (Error::Io { .. } | Error::InvalidParameter(_))) => return Err(e),
        Err(e) => e,
    };
    let insp = Vhd::inspect(&args.file, opts)?;
    let problems = problems_json(&insp.problems);
    let Some(vhd) = &insp.vhd else {
        let partial = json!({
            "path": args.file.display().to_string(),
            "file_size": insp.file_len,
            "problems": problems,
            "hint": hint(&args.file),
        });
        let e = with_hint(open_error);
        if !args.json {
            print!("{}", damaged_listing(&partial));
            return Err(e);
        }
        // One object: what could be read, and the error.
        let mut partial = partial;
        partial["error"] = super::error_json(&e);
        super::print_json(&partial)?;
        return Ok(super::fail(&e));
    };
    let mut r = report(vhd)?;
    if insp.problems.iter().any(|p| p.level == ProblemLevel::Fatal) {
        r["problems"] = problems;
        r["hint"] = hint(&args.file).into();
    }
    show(&r, args.json)
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

fn show(r: &Value, json: bool) -> Result<ExitCode> {
    if json {
        super::print_json(r)?;
    } else {
        print!("{}", listing(r));
    }
    Ok(ExitCode::SUCCESS)
}

/// The problems a strict open would fail on (warnings are in `warnings` already).
fn problems_json(problems: &[Problem]) -> Value {
    problems
        .iter()
        .filter(|p| p.level == ProblemLevel::Fatal)
        .map(|p| {
            json!({
                "code": p.code,
                "structure": p.structure,
                "offset": p.offset,
                "message": p.message,
            })
        })
        .collect()
}

/// The rows for `problems` and `hint`, when the report has them.
pub(super) fn problem_rows(r: &Value, row: &mut dyn FnMut(&str, String)) {
    for p in r["problems"].as_array().into_iter().flatten() {
        row(
            "problem",
            format!(
                "[{}] {}",
                p["structure"].as_str().unwrap_or(""),
                p["message"].as_str().unwrap_or("")
            ),
        );
    }
    if let Some(h) = r["hint"].as_str() {
        row("see", h.to_string());
    }
}

/// The listing of a file that could not be opened even leniently.
fn damaged_listing(r: &Value) -> String {
    let mut rows: Vec<(String, String)> = Vec::new();
    let mut row = |k: &str, v: String| rows.push((k.to_string(), v));
    let size = r["file_size"].as_u64().unwrap_or(0);
    row(
        "file",
        format!("{} ({size} bytes)", r["path"].as_str().unwrap_or("")),
    );
    row(
        "readable",
        "no: validation stopped at the last problem below".into(),
    );
    problem_rows(r, &mut row);
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

/// Everything `info` shows, as the JSON object `--json` prints.
fn report(vhd: &Vhd) -> Result<Value> {
    let f = vhd.footer();
    let file_size = vhd
        .storage()
        .len()
        .map_err(|e| Error::io(format!("{}: reading length", vhd.path().display()), e))?;
    let sparse = vhd.header();
    let differencing = vhd.disk_type() == DiskType::Differencing;
    let parent = sparse.filter(|_| differencing);
    let locators: Vec<Value> = match sparse {
        None => Vec::new(),
        Some(h) => h
            .locators
            .iter()
            .enumerate()
            .filter(|(_, l)| !l.is_empty())
            .map(|(slot, l)| {
                let (path, note) = locator_path(vhd, slot, l.platform_code);
                json!({
                    "slot": slot,
                    "platform_code": l.platform_code.name(),
                    "platform_code_value": l.platform_code.to_u32(),
                    "data_offset": l.data_offset,
                    "data_length": l.data_length,
                    "data_space": l.data_space,
                    "data_space_bytes": l.data_space_bytes(),
                    "path": path,
                    "note": note,
                })
            })
            .collect(),
    };
    Ok(json!({
        "path": vhd.path().display().to_string(),
        "file_size": file_size,
        "disk_type": vhd.disk_type().name(),
        "virtual_size": vhd.virtual_size(),
        "size_source": vhd.size_source().name(),
        "current_size": f.current_size,
        "original_size": f.original_size,
        "creator_application": f.creator_application_str(),
        "creator_version": f.creator_version_str(),
        "creator_host_os": f.creator_host_os_str(),
        "unique_id": f.unique_id.to_string(),
        "timestamp": f.timestamp,
        "timestamp_utc": vhd_time_utc(f.timestamp),
        "geometry": {
            "cylinders": f.geometry.cylinders,
            "heads": f.geometry.heads,
            "sectors_per_track": f.geometry.sectors_per_track,
        },
        "features": f.features,
        "saved_state": f.saved_state != 0,
        "footer_source": vhd.footer_source().name(),
        "footer_offset": vhd.footer_offset(),
        "block_size": sparse.map(|h| h.block_size),
        "table_offset": sparse.map(|h| h.table_offset),
        "max_table_entries": sparse.map(|h| h.max_table_entries),
        "allocated_block_count": sparse.map(|_| vhd.allocated_blocks()),
        "parent_unique_id": parent.map(|h| h.parent_unique_id.to_string()),
        "parent_name": parent.map(|h| h.parent_name()),
        "parent_timestamp": parent.map(|h| h.parent_timestamp),
        "parent_timestamp_utc": parent.map(|h| vhd_time_utc(h.parent_timestamp)),
        "parent_locators": locators,
        "warnings": vhd.warnings(),
    }))
}

/// The decoded path of a locator, or why there is none.
fn locator_path(vhd: &Vhd, slot: usize, code: PlatformCode) -> (Option<String>, Option<String>) {
    match vhd.read_locator_payload(slot) {
        Ok(Some(data)) => match code.decode_payload(&data) {
            Some(text) => (Some(text), None),
            None if code == PlatformCode::Mac => {
                (None, Some("Mac OS alias blob: not decoded".into()))
            }
            None => (
                None,
                Some(format!("platform code {} is not a path", code.name())),
            ),
        },
        Ok(None) => (None, None),
        Err(e) => (None, Some(reason(&e))),
    }
}

/// An error message without the file name in front (the listing already names the file).
fn reason(e: &Error) -> String {
    match e {
        Error::Format { detail, .. } => detail.clone(),
        e => e.to_string(),
    }
}

/// Bytes with a binary unit when it is a whole number of them: `41943040 (40 MiB)`.
pub(super) fn bytes(n: u64) -> String {
    const UNITS: [(u64, &str); 4] = [
        (1 << 40, "TiB"),
        (1 << 30, "GiB"),
        (1 << 20, "MiB"),
        (1 << 10, "KiB"),
    ];
    for (unit, name) in UNITS {
        if n >= unit {
            return if n.is_multiple_of(unit) {
                format!("{n} ({} {name})", n / unit)
            } else {
                format!("{n} ({:.2} {name})", n as f64 / unit as f64)
            };
        }
    }
    n.to_string()
}

/// The human-readable listing of a report.
fn listing(r: &Value) -> String {
    let u = |k: &str| r[k].as_u64().unwrap_or(0);
    let s = |k: &str| r[k].as_str().unwrap_or("").to_string();
    let mut rows: Vec<(String, String)> = Vec::new();
    let mut row = |k: &str, v: String| rows.push((k.to_string(), v));
    row("file", format!("{} ({} bytes)", s("path"), u("file_size")));
    row("disk type", s("disk_type"));
    row(
        "virtual size",
        format!("{}, from {}", bytes(u("virtual_size")), s("size_source")),
    );
    row("current size", bytes(u("current_size")));
    row("original size", bytes(u("original_size")));
    row(
        "creator",
        format!(
            "{:?} version {} on {:?}",
            s("creator_application"),
            s("creator_version"),
            s("creator_host_os")
        ),
    );
    row("unique id", s("unique_id"));
    row(
        "time stamp",
        format!("{} ({})", u("timestamp"), s("timestamp_utc")),
    );
    let g = &r["geometry"];
    row(
        "geometry (C/H/S)",
        format!(
            "{}/{}/{}",
            g["cylinders"], g["heads"], g["sectors_per_track"]
        ),
    );
    row("features", format!("{:#x}", u("features")));
    if r["saved_state"].as_bool() == Some(true) {
        row("saved state", "yes".into());
    }
    row(
        "footer",
        format!("{} (at offset {})", s("footer_source"), u("footer_offset")),
    );
    if r["block_size"].is_null() {
        row(
            "data",
            format!(
                "fixed: {} bytes at offset 0 (read in {} chunks)",
                u("current_size"),
                bytes(FIXED_CHUNK)
            ),
        );
    } else {
        row("block size", bytes(u("block_size")));
        row(
            "BAT",
            format!(
                "{} at offset {}, {} allocated",
                plural(u("max_table_entries"), "entry", "entries"),
                u("table_offset"),
                u("allocated_block_count")
            ),
        );
    }
    if !r["parent_unique_id"].is_null() {
        row("parent unique id", s("parent_unique_id"));
        row("parent name", s("parent_name"));
        row(
            "parent time stamp",
            format!("{} ({})", u("parent_timestamp"), s("parent_timestamp_utc")),
        );
    }
    for l in r["parent_locators"].as_array().into_iter().flatten() {
        let text = match (l["path"].as_str(), l["note"].as_str()) {
            (Some(p), _) => p.to_string(),
            (None, Some(n)) => format!("({n})"),
            (None, None) => String::new(),
        };
        let space = match l["data_space_bytes"].as_u64() {
            Some(b) => format!("{} (= {b} bytes)", l["data_space"]),
            None => format!("{} (not sectors or bytes)", l["data_space"]),
        };
        row(
            &format!("parent locator {}", l["slot"]),
            format!(
                "{:<4} at offset {}, length {}, space {}: {text}",
                l["platform_code"].as_str().unwrap_or(""),
                l["data_offset"],
                l["data_length"],
                space
            ),
        );
    }
    let warnings: Vec<&str> = r["warnings"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect();
    if warnings.is_empty() {
        row("warnings", "none".into());
    }
    for w in warnings {
        row("warning", w.to_string());
    }
    problem_rows(r, &mut row);
    aligned(rows)
}

/// `1 entry`, `2 entries`.
pub(super) fn plural(n: u64, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_units() {
        assert_eq!(bytes(40 << 20), "41943040 (40 MiB)");
        assert_eq!(bytes(1536), "1536 (1.50 KiB)");
        assert_eq!(bytes(100), "100");
    }
}
