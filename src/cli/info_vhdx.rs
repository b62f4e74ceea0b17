//! `vhd-merge info FILE.vhdx`: headers, log, regions, metadata items, block states and parent
//! locator of one VHDX (from [`vhd_merge::vhdx::check::inspect_path`]), as an aligned listing
//! or one JSON object.

use std::process::ExitCode;

use serde_json::{Value, json};
use uuid::Uuid;
use vhd_merge::check::Severity;
use vhd_merge::vhdx::Vhdx;
use vhd_merge::vhdx::check::{Inspection, LogState, inspect_path};
use vhd_merge::vhdx::format::metadata as md;
use vhd_merge::vhdx::format::region::{BAT_GUID, METADATA_GUID};
use vhd_merge::{Error, Result};

use super::info::{Args, aligned, bytes, hint, plural, problem_rows, with_hint};
use super::print_json;

/// Run `info` on a VHDX: a strict read-only open first (its error, with a hint, unless
/// `--lenient`), then the inspection's report.
pub fn run(args: &Args) -> Result<ExitCode> {
    let open = Vhdx::open_path(&args.file, false).map(drop);
    if let Err(e) = open
        && !args.lenient
    {
        return Err(with_hint(e));
    }
    let insp = inspect_path(&args.file, false)?;
    let mut r = report(&args.file, &insp);
    if insp.has_errors() {
        r["problems"] = problems(&insp);
        r["hint"] = hint(&args.file).into();
    }
    let failure = insp.current.is_none().then(|| Error::Format {
        path: Some(args.file.clone()),
        detail: "no valid VHDX header".into(),
    });
    if !args.json {
        print!("{}", listing(&r));
        return failure.map_or(Ok(ExitCode::SUCCESS), Err);
    }
    // One object: what could be read, and the error when there is one.
    if let Some(e) = &failure {
        r["error"] = super::error_json(e);
    }
    print_json(&r)?;
    Ok(failure.map_or(ExitCode::SUCCESS, |e| super::fail(&e)))
}

fn problems(insp: &Inspection) -> Value {
    insp.findings
        .iter()
        .filter(|f| f.severity == Severity::Error)
        .map(|f| {
            json!({
                "code": f.code,
                "structure": f.structure,
                "offset": f.offset,
                "message": f.message,
            })
        })
        .collect()
}

fn disk_type(insp: &Inspection) -> Option<&'static str> {
    let fp = insp.metadata.as_ref()?.file_parameters;
    Some(if fp.has_parent {
        "differencing"
    } else if fp.leave_block_allocated {
        "fixed"
    } else {
        "dynamic"
    })
}

/// Everything `info` shows, as the JSON object `--json` prints.
fn report(file: &std::path::Path, insp: &Inspection) -> Value {
    let m = insp.metadata.as_ref();
    let warnings: Vec<&str> = insp
        .findings
        .iter()
        .filter(|f| f.severity == Severity::Warning)
        .map(|f| f.message.as_str())
        .collect();
    json!({
        "path": file.display().to_string(),
        "file_size": insp.file_len,
        "format": "vhdx",
        "creator": insp.creator,
        "disk_type": disk_type(insp),
        "virtual_size": m.map(|m| m.virtual_disk_size),
        "block_size": m.map(|m| m.file_parameters.block_size),
        "logical_sector_size": m.map(|m| m.logical_sector_size),
        "physical_sector_size": m.map(|m| m.physical_sector_size),
        "leave_block_allocated": m.map(|m| m.file_parameters.leave_block_allocated),
        "has_parent": m.map(|m| m.file_parameters.has_parent),
        "page_83": m.map(|m| m.page_83.to_string()),
        "data_write_guid": insp.current.as_ref().map(|c| c.header.data_write_guid.to_string()),
        "current_header": insp.current.as_ref().map(|c| c.slot + 1),
        "headers": headers(insp),
        "log": log(insp),
        "region_tables_valid": insp.region_tables_valid,
        "regions": regions(insp),
        "metadata_items": items(insp),
        "blocks": insp.blocks.payload,
        "sector_bitmap_blocks": insp.blocks.bitmaps_present,
        "parent_locator": parent_locator(insp),
        "warnings": warnings,
    })
}

fn headers(insp: &Inspection) -> Value {
    let offsets = [
        vhd_merge::vhdx::format::HEADER1_OFFSET,
        vhd_merge::vhdx::format::HEADER2_OFFSET,
    ];
    let current = insp.current.as_ref().map(|c| c.slot);
    insp.headers
        .iter()
        .enumerate()
        .map(|(i, h)| match h {
            Some(Ok(h)) => json!({
                "slot": i + 1,
                "offset": offsets[i],
                "valid": true,
                "current": current == Some(i),
                "sequence_number": h.sequence_number,
                "file_write_guid": h.file_write_guid.to_string(),
                "data_write_guid": h.data_write_guid.to_string(),
                "log_guid": h.log_guid.to_string(),
                "log_offset": h.log_offset,
                "log_length": h.log_length,
            }),
            Some(Err(why)) => {
                json!({"slot": i + 1, "offset": offsets[i], "valid": false, "error": why})
            }
            None => json!({"slot": i + 1, "offset": offsets[i], "valid": false}),
        })
        .collect()
}

fn log(insp: &Inspection) -> Value {
    match &insp.log {
        None | Some(LogState::Unknown) => json!({"state": "unknown"}),
        Some(LogState::Clean) => json!({"state": "clean", "entries": 0}),
        Some(LogState::Dirty {
            entries,
            writes,
            bytes,
            sequences,
            length_after,
        }) => json!({
            "state": "dirty",
            "entries": entries,
            "writes": writes,
            "bytes": bytes,
            "first_sequence": sequences.0,
            "head_sequence": sequences.1,
            "length_after": length_after,
        }),
        Some(LogState::Unreplayable(why)) => json!({"state": "unreplayable", "error": why}),
    }
}

fn region_name(g: Uuid) -> &'static str {
    match g {
        BAT_GUID => "BAT",
        METADATA_GUID => "metadata",
        _ => "unknown",
    }
}

fn regions(insp: &Inspection) -> Value {
    let Some(t) = &insp.region_table else {
        return json!([]);
    };
    t.entries
        .iter()
        .map(|e| {
            json!({
                "guid": e.guid.to_string(),
                "name": region_name(e.guid),
                "file_offset": e.file_offset,
                "length": e.length,
                "required": e.required,
            })
        })
        .collect()
}

fn item_name(g: Uuid) -> &'static str {
    match g {
        md::FILE_PARAMETERS => "File Parameters",
        md::VIRTUAL_DISK_SIZE => "Virtual Disk Size",
        md::PAGE_83 => "Page 83 Data",
        md::LOGICAL_SECTOR_SIZE => "Logical Sector Size",
        md::PHYSICAL_SECTOR_SIZE => "Physical Sector Size",
        md::PARENT_LOCATOR => "Parent Locator",
        _ => "unknown",
    }
}

fn items(insp: &Inspection) -> Value {
    let Some(t) = &insp.metadata_table else {
        return json!([]);
    };
    t.entries
        .iter()
        .map(|e| {
            json!({
                "item_id": e.item_id.to_string(),
                "name": item_name(e.item_id),
                "offset": e.offset,
                "length": e.length,
                "is_user": e.is_user,
                "is_virtual_disk": e.is_virtual_disk,
                "is_required": e.is_required,
            })
        })
        .collect()
}

fn parent_locator(insp: &Inspection) -> Value {
    let Some(pl) = insp
        .metadata
        .as_ref()
        .and_then(|m| m.parent_locator.as_ref())
    else {
        return Value::Null;
    };
    json!({
        "locator_type": pl.locator_type.to_string(),
        "entries": pl.entries.iter().map(|(k, v)| json!({"key": k, "value": v})).collect::<Vec<_>>(),
    })
}

/// The human-readable listing of a report.
fn listing(r: &Value) -> String {
    let mut rows: Vec<(String, String)> = Vec::new();
    let mut row = |k: &str, v: String| rows.push((k.to_string(), v));
    let s = |v: &Value| match v {
        Value::Null => "unknown".to_string(),
        Value::String(t) => t.clone(),
        v => v.to_string(),
    };
    let size = |v: &Value| v.as_u64().map_or_else(|| "unknown".into(), bytes);
    row(
        "file",
        format!("{} ({} bytes)", s(&r["path"]), r["file_size"]),
    );
    row("format", "vhdx".into());
    row("creator", format!("{:?}", s(&r["creator"])));
    row("disk type", s(&r["disk_type"]));
    row("virtual size", size(&r["virtual_size"]));
    row("block size", size(&r["block_size"]));
    row(
        "sector size",
        format!(
            "logical {}, physical {}",
            s(&r["logical_sector_size"]),
            s(&r["physical_sector_size"])
        ),
    );
    row("page 83 id", s(&r["page_83"]));
    header_rows(r, &mut row);
    row("log", log_text(&r["log"]));
    region_rows(r, &mut row);
    let counts: Vec<String> = r["blocks"]
        .as_object()
        .into_iter()
        .flatten()
        .map(|(k, v)| format!("{k} {v}"))
        .collect();
    if !counts.is_empty() {
        row("blocks", counts.join(", "));
    }
    if r["has_parent"].as_bool() == Some(true) {
        row(
            "sector bitmap blocks",
            r["sector_bitmap_blocks"].to_string(),
        );
    }
    for e in r["parent_locator"]["entries"]
        .as_array()
        .into_iter()
        .flatten()
    {
        row(&format!("parent {}", s(&e["key"])), s(&e["value"]));
    }
    let warnings = r["warnings"].as_array().cloned().unwrap_or_default();
    if warnings.is_empty() {
        row("warnings", "none".into());
    }
    for w in &warnings {
        row("warning", s(w));
    }
    problem_rows(r, &mut row);
    aligned(rows)
}

fn header_rows(r: &Value, row: &mut dyn FnMut(&str, String)) {
    for h in r["headers"].as_array().into_iter().flatten() {
        let name = format!("header {}", h["slot"]);
        if h["valid"].as_bool() != Some(true) {
            row(
                &name,
                format!("invalid: {}", h["error"].as_str().unwrap_or("unread")),
            );
            continue;
        }
        let current = if h["current"].as_bool() == Some(true) {
            ", current"
        } else {
            ""
        };
        row(&name, format!("sequence {}{current}", h["sequence_number"]));
        if h["current"].as_bool() == Some(true) {
            for k in ["data_write_guid", "file_write_guid", "log_guid"] {
                row(
                    &k.replace('_', " "),
                    h[k].as_str().unwrap_or("").to_string(),
                );
            }
            row(
                "log region",
                format!(
                    "{} bytes at offset {:#x}",
                    h["log_length"],
                    h["log_offset"].as_u64().unwrap_or(0)
                ),
            );
        }
    }
}

fn log_text(l: &Value) -> String {
    match l["state"].as_str() {
        Some("dirty") => format!(
            "dirty: {} ({}, sequence {}..={}) would be replayed",
            plural(l["entries"].as_u64().unwrap_or(0), "entry", "entries"),
            plural(l["writes"].as_u64().unwrap_or(0), "write", "writes"),
            l["first_sequence"],
            l["head_sequence"]
        ),
        Some("unreplayable") => {
            format!("cannot be replayed: {}", l["error"].as_str().unwrap_or(""))
        }
        Some(state) => state.to_string(),
        None => "unknown".into(),
    }
}

fn region_rows(r: &Value, row: &mut dyn FnMut(&str, String)) {
    let valid = &r["region_tables_valid"];
    row(
        "region tables",
        format!("copy 1 valid: {}, copy 2 valid: {}", valid[0], valid[1]),
    );
    for e in r["regions"].as_array().into_iter().flatten() {
        let required = if e["required"].as_bool() == Some(true) {
            ", required"
        } else {
            ""
        };
        row(
            &format!("region {}", e["name"].as_str().unwrap_or("")),
            format!(
                "{} at offset {:#x}{required} ({})",
                bytes(e["length"].as_u64().unwrap_or(0)),
                e["file_offset"].as_u64().unwrap_or(0),
                e["guid"].as_str().unwrap_or("")
            ),
        );
    }
    for e in r["metadata_items"].as_array().into_iter().flatten() {
        let flags: Vec<&str> = [
            ("is_user", "user"),
            ("is_virtual_disk", "virtual disk"),
            ("is_required", "required"),
        ]
        .into_iter()
        .filter(|(k, _)| e[*k].as_bool() == Some(true))
        .map(|(_, n)| n)
        .collect();
        row(
            &format!("metadata {}", e["name"].as_str().unwrap_or("")),
            format!(
                "{} bytes at {} [{}]",
                e["length"],
                e["offset"],
                flags.join(", ")
            ),
        );
    }
}
