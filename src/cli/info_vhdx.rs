//! The listing of `vhd-merge info FILE.vhdx`: headers, log, regions, metadata items, block
//! states and parent locator of one VHDX, from the library's [`VhdxInfo`].

use vhd_merge::vhdx::info::{HeaderInfo, LogInfo, VhdxInfo};

use super::info::{bytes, plural, warning_rows};

/// What is not known (metadata that cannot be read) reads `unknown`.
fn or_unknown<T: ToString>(v: Option<T>) -> String {
    v.map_or_else(|| "unknown".into(), |v| v.to_string())
}

/// The rows of a VHDX's listing (after `file`).
pub(super) fn rows(r: &VhdxInfo, row: &mut dyn FnMut(&str, String)) {
    let size = |v: Option<u64>| v.map_or_else(|| "unknown".into(), bytes);
    row("format", "vhdx".into());
    row(
        "creator",
        format!("{:?}", r.creator.as_deref().unwrap_or("unknown")),
    );
    row("disk type", or_unknown(r.disk_type.map(|k| k.name())));
    row("virtual size", size(r.virtual_size));
    row("block size", size(r.block_size.map(u64::from)));
    row(
        "sector size",
        format!(
            "logical {}, physical {}",
            or_unknown(r.logical_sector_size),
            or_unknown(r.physical_sector_size)
        ),
    );
    row("page 83 id", or_unknown(r.page_83));
    for h in &r.headers {
        header_rows(h, row);
    }
    row("log", log_text(&r.log));
    region_rows(r, row);
    let counts: Vec<String> = r.blocks.iter().map(|(k, v)| format!("{k} {v}")).collect();
    if !counts.is_empty() {
        row("blocks", counts.join(", "));
    }
    if r.has_parent == Some(true) {
        row("sector bitmap blocks", r.sector_bitmap_blocks.to_string());
    }
    for e in r.parent_locator.iter().flat_map(|p| &p.entries) {
        row(&format!("parent {}", e.key), e.value.clone());
    }
    warning_rows(&r.warnings, row);
}

fn header_rows(h: &HeaderInfo, row: &mut dyn FnMut(&str, String)) {
    let name = format!("header {}", h.slot);
    let Some(f) = &h.header else {
        let why = h.error.as_deref().unwrap_or("unread");
        row(&name, format!("invalid: {why}"));
        return;
    };
    let current = if f.current { ", current" } else { "" };
    row(&name, format!("sequence {}{current}", f.sequence_number));
    if f.current {
        row("data write guid", f.data_write_guid.to_string());
        row("file write guid", f.file_write_guid.to_string());
        row("log guid", f.log_guid.to_string());
        row(
            "log region",
            format!("{} bytes at offset {:#x}", f.log_length, f.log_offset),
        );
    }
}

fn log_text(l: &LogInfo) -> String {
    match l {
        LogInfo::Dirty {
            entries,
            writes,
            first_sequence,
            head_sequence,
            ..
        } => format!(
            "dirty: {} ({}, sequence {first_sequence}..={head_sequence}) would be replayed",
            plural(*entries as u64, "entry", "entries"),
            plural(*writes as u64, "write", "writes"),
        ),
        LogInfo::Unreplayable { error } => format!("cannot be replayed: {error}"),
        LogInfo::Clean { .. } => "clean".into(),
        _ => "unknown".into(),
    }
}

fn region_rows(r: &VhdxInfo, row: &mut dyn FnMut(&str, String)) {
    let [one, two] = r.region_tables_valid;
    row(
        "region tables",
        format!("copy 1 valid: {one}, copy 2 valid: {two}"),
    );
    for e in &r.regions {
        let required = if e.required { ", required" } else { "" };
        row(
            &format!("region {}", e.name),
            format!(
                "{} at offset {:#x}{required} ({})",
                bytes(u64::from(e.length)),
                e.file_offset,
                e.guid
            ),
        );
    }
    for e in &r.metadata_items {
        let flags: Vec<&str> = [
            (e.is_user, "user"),
            (e.is_virtual_disk, "virtual disk"),
            (e.is_required, "required"),
        ]
        .into_iter()
        .filter(|(on, _)| *on)
        .map(|(_, n)| n)
        .collect();
        row(
            &format!("metadata {}", e.name),
            format!("{} bytes at {} [{}]", e.length, e.offset, flags.join(", ")),
        );
    }
}
