//! The library's typed reports of `info`, `chain`, `create` and `repair` (docs/json.md): each
//! built from a file made here, its fields checked against what the test wrote, and (with the
//! `serde` feature) the JSON shape the CLI prints.

use std::path::Path;

use vhd_merge::chain::ChainReport;
use vhd_merge::create::{CreateOptions, create_differencing, create_dynamic, create_fixed};
use vhd_merge::info::{ImageInfo, InfoOptions, InfoReport, inspect_file};
use vhd_merge::repair::{RepairOptions, repair_file};
use vhd_merge::vhdx::info::{LogInfo, VhdxInfo};
use vhd_merge::{Chain, ChainOptions, DiskKind, DiskType, Format, FoundBy, ReturnCode};

const MIB: u64 = 1 << 20;

fn strict() -> InfoOptions {
    InfoOptions::default()
}

fn lenient() -> InfoOptions {
    InfoOptions::default().lenient(true)
}

fn vhd_part(r: &InfoReport) -> &vhd_merge::info::VhdInfo {
    match &r.image {
        Some(ImageInfo::Vhd(v)) => v,
        other => panic!("not a VHD: {other:?}"),
    }
}

fn vhdx_part(r: &InfoReport) -> &VhdxInfo {
    match &r.image {
        Some(ImageInfo::Vhdx(v)) => v,
        other => panic!("not a VHDX: {other:?}"),
    }
}

/// A 16 MiB dynamic base with one block written, and a differencing child over it.
fn vhd_chain(
    dir: &Path,
) -> (
    std::path::PathBuf,
    std::path::PathBuf,
    uuid::Uuid,
    uuid::Uuid,
) {
    let (base, child) = (dir.join("base.vhd"), dir.join("child.vhd"));
    let mut b = create_dynamic(&base, 16 * MIB, &CreateOptions::default()).unwrap();
    b.write_at(4 * MIB, &[7; 4096]).unwrap();
    let base_id = b.unique_id();
    drop(b);
    let opts = CreateOptions::default().block_size(512 << 10);
    let child_id = create_differencing(&child, &base, &opts)
        .unwrap()
        .unique_id();
    (base, child, base_id, child_id)
}

#[test]
fn info_of_a_vhd_chain() {
    let dir = tempfile::tempdir().unwrap();
    let (base, child, base_id, child_id) = vhd_chain(dir.path());

    let r = inspect_file(&base, &strict()).unwrap();
    assert_eq!(r.path, base);
    assert_eq!(r.file_size, std::fs::metadata(&base).unwrap().len());
    assert_eq!(r.format(), Some(Format::Vhd));
    assert_eq!(r.disk_kind(), Some(DiskKind::Dynamic));
    assert_eq!(r.virtual_size(), Some(16 * MIB));
    assert!(r.problems.is_empty() && r.failure.is_none());
    let v = vhd_part(&r);
    assert_eq!(v.disk_type, DiskType::Dynamic);
    assert_eq!(v.unique_id, base_id);
    assert_eq!(
        (v.block_size, v.max_table_entries, v.allocated_block_count),
        (Some(2 << 20), Some(8), Some(1))
    );
    assert_eq!(v.creator_application, "win ");
    assert_eq!((v.parent_unique_id, v.parent_name.as_deref()), (None, None));
    assert!(v.parent_locators.is_empty() && v.warnings.is_empty());

    let r = inspect_file(&child, &strict()).unwrap();
    let v = vhd_part(&r);
    assert_eq!(v.disk_type, DiskType::Differencing);
    assert_eq!(v.unique_id, child_id);
    assert_eq!(v.parent_unique_id, Some(base_id));
    assert_eq!(v.parent_name.as_deref(), Some("base.vhd"));
    assert_eq!(
        (v.block_size, v.allocated_block_count),
        (Some(512 << 10), Some(0))
    );
    // Windows' three locators, each decoded to a path that names the base.
    let paths: Vec<&str> = v
        .parent_locators
        .iter()
        .map(|l| l.path.as_deref().unwrap())
        .collect();
    assert_eq!(paths.len(), 3, "{paths:?}");
    assert!(paths.iter().all(|p| p.ends_with("base.vhd")), "{paths:?}");
    assert!(v.parent_locators.iter().all(|l| l.note.is_none()));
    assert_eq!(v.timestamp_utc.len(), "2026-01-01T00:00:00Z".len());
}

#[test]
fn info_of_a_fixed_vhd_has_no_header_fields() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("fixed.vhd");
    create_fixed(&f, 4 * MIB, &CreateOptions::default()).unwrap();
    let r = inspect_file(&f, &strict()).unwrap();
    let v = vhd_part(&r);
    assert_eq!(v.disk_type, DiskType::Fixed);
    assert_eq!(r.file_size, 4 * MIB + 512);
    assert_eq!(v.footer_offset, 4 * MIB);
    assert_eq!(
        (v.block_size, v.table_offset, v.allocated_block_count),
        (None, None, None)
    );
}

/// A damaged VHD: strict inspection fails; lenient lists the problem, and a file validation
/// stops in gives only what it read, with the failure.
#[test]
fn info_of_a_damaged_vhd() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("d.vhd");
    create_dynamic(&f, 8 * MIB, &CreateOptions::default()).unwrap();
    let mut b = std::fs::read(&f).unwrap();
    // BAT entry 1 (the BAT is at 1536) points far past the end of the file.
    b[1536 + 4..1536 + 8].copy_from_slice(&0x7FFF_FF00u32.to_be_bytes());
    std::fs::write(&f, &b).unwrap();
    let e = inspect_file(&f, &strict()).unwrap_err();
    assert_eq!(e.return_code(), ReturnCode::IncorrectDataType);
    let r = inspect_file(&f, &lenient()).unwrap();
    assert!(r.failure.is_none());
    assert_eq!(r.virtual_size(), Some(8 * MIB));
    let codes: Vec<&str> = r.problems.iter().map(|p| p.code.name()).collect();
    assert_eq!(codes, ["bat-entry-outside"]);

    b[512..520].fill(0); // the dynamic header's cookie
    std::fs::write(&f, &b).unwrap();
    let r = inspect_file(&f, &lenient()).unwrap();
    assert!(r.image.is_none());
    assert_eq!(r.file_size, b.len() as u64);
    assert!(r.problems.iter().any(|p| p.structure == "dynamic header"));
    let failure = r.failure.expect("a failure");
    assert_eq!(failure.return_code(), ReturnCode::IncorrectDataType);
}

#[test]
fn info_of_a_vhdx() {
    use vhd_merge::vhdx::create as vx;
    let dir = tempfile::tempdir().unwrap();
    let (base, child) = (dir.path().join("b.vhdx"), dir.path().join("c.avhdx"));
    let opts = vx::CreateOptions::default()
        .block_size(Some(4 << 20))
        .logical_sector_size(4096);
    vx::create_dynamic(&base, 64 * MIB, &opts).unwrap();
    vx::create_differencing(&child, &base, &vx::CreateOptions::default()).unwrap();

    let r = inspect_file(&base, &strict()).unwrap();
    assert_eq!(r.format(), Some(Format::Vhdx));
    assert_eq!(r.disk_kind(), Some(DiskKind::Dynamic));
    assert_eq!(r.virtual_size(), Some(64 * MIB));
    assert!(r.problems.is_empty() && r.failure.is_none());
    let v = vhdx_part(&r);
    assert_eq!(v.block_size, Some(4 << 20));
    assert_eq!(v.logical_sector_size, Some(4096));
    assert_eq!(v.has_parent, Some(false));
    assert_eq!(v.log, LogInfo::Clean { entries: 0 });
    assert_eq!(v.region_tables_valid, [true, true]);
    let names: Vec<&str> = v.regions.iter().map(|e| e.name).collect();
    assert!(
        names.contains(&"BAT") && names.contains(&"metadata"),
        "{names:?}"
    );
    // Two valid headers, one of them current, whose DataWriteGuid is the report's.
    assert_eq!(v.headers.len(), 2);
    let current: Vec<_> = v
        .headers
        .iter()
        .filter_map(|h| h.header.as_ref().filter(|f| f.current).map(|f| (h.slot, f)))
        .collect();
    assert_eq!(current.len(), 1);
    assert_eq!(v.current_header, Some(current[0].0));
    assert_eq!(v.data_write_guid, Some(current[0].1.data_write_guid));
    assert!(v.parent_locator.is_none());

    let r = inspect_file(&child, &strict()).unwrap();
    let v = vhdx_part(&r);
    assert_eq!(r.disk_kind(), Some(DiskKind::Differencing));
    assert_eq!(v.logical_sector_size, Some(4096), "the parent's");
    let keys: Vec<&str> = v
        .parent_locator
        .iter()
        .flat_map(|p| &p.entries)
        .map(|e| e.key.as_str())
        .collect();
    assert!(keys.contains(&"parent_linkage"), "{keys:?}");
}

/// Both VHDX headers damaged: strict fails; lenient reports what it read and the failure.
#[test]
fn info_of_a_vhdx_without_a_header() {
    use vhd_merge::vhdx::create as vx;
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("x.vhdx");
    vx::create_dynamic(&f, 8 * MIB, &vx::CreateOptions::default()).unwrap();
    let mut b = std::fs::read(&f).unwrap();
    b[(64 << 10) + 8] ^= 1;
    b[(128 << 10) + 8] ^= 1;
    std::fs::write(&f, &b).unwrap();
    assert!(inspect_file(&f, &strict()).is_err());
    let r = inspect_file(&f, &lenient()).unwrap();
    let v = vhdx_part(&r);
    assert!(v.headers.iter().all(|h| !h.valid && h.header.is_none()));
    assert!(v.headers.iter().all(|h| h.error.is_some()));
    assert_eq!((v.current_header, &v.log), (None, &LogInfo::Unknown));
    assert!(r.problems.iter().any(|p| p.code == "header-bad"));
    assert_eq!(
        r.failure.map(|e| e.return_code()),
        Some(ReturnCode::IncorrectDataType)
    );
}

#[test]
fn chain_report_lists_the_layers() {
    let dir = tempfile::tempdir().unwrap();
    let (base, child, base_id, child_id) = vhd_chain(dir.path());
    let r: ChainReport = Chain::open(&child, &ChainOptions::default())
        .unwrap()
        .report();
    assert_eq!((r.path.as_path(), r.layer_count), (child.as_path(), 2));
    let (c, b) = (&r.layers[0], &r.layers[1]);
    assert_eq!((c.index, b.index), (0, 1));
    assert_eq!(c.found_by, FoundBy::Opened);
    assert_ne!(b.found_by, FoundBy::Opened);
    assert_eq!((c.layer.unique_id, b.layer.unique_id), (child_id, base_id));
    assert_eq!(c.layer.parent_unique_id, Some(base_id));
    assert_eq!(c.layer.parent_name.as_deref(), Some("base.vhd"));
    assert_eq!(b.layer.path, base);
    assert_eq!(
        (c.layer.block_size, b.layer.block_size),
        (Some(512 << 10), Some(2 << 20))
    );
    assert_eq!(b.layer.disk_type, DiskKind::Dynamic);
    assert_eq!(b.layer.parent_unique_id, None);
    assert!(r.layers.iter().all(|l| l.warnings.is_empty()));
    assert!(r.layers.iter().all(|l| l.layer.virtual_size == 16 * MIB));
}

#[test]
fn create_report_of_each_format() {
    let dir = tempfile::tempdir().unwrap();
    let (base, child, base_id, child_id) = vhd_chain(dir.path());
    let r = vhd_merge::create::report_file(&child).unwrap();
    assert_eq!(r.format, Format::Vhd);
    assert_eq!(r.layer.path, child);
    assert_eq!(r.layer.disk_type, DiskKind::Differencing);
    assert_eq!(
        (r.layer.unique_id, r.layer.parent_unique_id),
        (child_id, Some(base_id))
    );
    assert!(r.warnings.is_empty());
    let r = vhd_merge::create::report_file(&base).unwrap();
    assert_eq!(r.layer.parent_name, None);

    let x = dir.path().join("f.vhdx");
    let opts = vhd_merge::vhdx::create::CreateOptions::default();
    vhd_merge::vhdx::create::create_fixed(&x, 8 * MIB, &opts).unwrap();
    let r = vhd_merge::create::report_file(&x).unwrap();
    assert_eq!(
        (r.format, r.layer.disk_type),
        (Format::Vhdx, DiskKind::Fixed)
    );
    assert_eq!((r.layer.virtual_size, r.layer.block_size), (8 * MIB, None));
}

/// Two consecutive BAT entries dropped make one lost run; a dry run writes nothing.
#[test]
fn repair_report_merges_lost_blocks_into_runs() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("r.vhd");
    create_dynamic(&f, 8 * MIB, &CreateOptions::default()).unwrap();
    let mut b = std::fs::read(&f).unwrap();
    for entry in [1usize, 2] {
        let at = 1536 + 4 * entry;
        b[at..at + 4].copy_from_slice(&0x7FFF_FF00u32.to_be_bytes());
    }
    std::fs::write(&f, &b).unwrap();
    let opts = RepairOptions::default().dry_run(true);
    let r = repair_file(&f, &opts).unwrap();
    assert!(r.dry_run && !r.wrote);
    assert_eq!(std::fs::read(&f).unwrap(), b, "a dry run writes nothing");
    assert_eq!(r.lost.len(), 2);
    let runs = r.lost_runs();
    assert_eq!(runs.len(), 1, "{runs:?}");
    let run = &runs[0];
    assert_eq!((run.first_block, run.last_block), (1, 2));
    assert_eq!((run.virtual_start, run.virtual_end), (2 * MIB, 6 * MIB));
    assert_eq!(run.file_offset, 0x7FFF_FF00 * 512);
    assert_eq!(run.now, "now read as zeros");

    let r = repair_file(&f, &RepairOptions::default()).unwrap();
    assert!(!r.dry_run && r.wrote);
    assert_eq!(r.lost_runs().len(), 1);
}

/// The JSON of the new reports: the shapes docs/json.md documents.
#[cfg(feature = "serde")]
#[test]
fn reports_serialize_to_the_documented_shapes() {
    use serde_json::{Value, to_value};
    let dir = tempfile::tempdir().unwrap();
    let (_, child, base_id, _) = vhd_chain(dir.path());
    let v = to_value(inspect_file(&child, &strict()).unwrap()).unwrap();
    assert_eq!(v["parent_unique_id"], base_id.to_string());
    assert_eq!(v["disk_type"], "differencing");
    assert_eq!(v["size_source"], "current_size");
    assert_eq!(v["footer_source"], "end");
    assert_eq!(v["geometry"]["heads"].as_u64().map(|h| h > 0), Some(true));
    assert_eq!(v["parent_locators"][0]["platform_code"], "W2ru");
    assert!(v.get("format").is_none(), "a VHD's info has no format");
    assert!(v.get("problems").is_none() && v.get("failure").is_none());

    let v = to_value(
        Chain::open(&child, &ChainOptions::default())
            .unwrap()
            .report(),
    )
    .unwrap();
    assert_eq!(v["layer_count"], 2);
    assert_eq!(v["layers"][0]["found_by"], "opened");
    assert_eq!(v["layers"][1]["unique_id"], base_id.to_string());
    assert!(v["layers"][1]["parent_name"].is_null());

    let v = to_value(vhd_merge::create::report_file(&child).unwrap()).unwrap();
    assert_eq!(
        (v["format"].clone(), v["block_size"].clone()),
        ("vhd".into(), Value::from(512 << 10))
    );

    let x = dir.path().join("x.vhdx");
    let opts = vhd_merge::vhdx::create::CreateOptions::default();
    vhd_merge::vhdx::create::create_dynamic(&x, 8 * MIB, &opts).unwrap();
    let v = to_value(inspect_file(&x, &strict()).unwrap()).unwrap();
    assert_eq!(v["format"], "vhdx");
    assert_eq!(
        v["log"],
        serde_json::json!({"state": "clean", "entries": 0})
    );
    let current = v["headers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|h| h["current"] == true)
        .unwrap();
    assert_eq!(current["valid"], true);
    assert_eq!(current["data_write_guid"], v["data_write_guid"]);

    let r = repair_file(&x, &RepairOptions::default()).unwrap();
    let v = to_value(&r).unwrap();
    let keys: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
    assert_eq!(
        keys,
        [
            "actions",
            "dry_run",
            "errors_remain",
            "lost",
            "not_repaired",
            "path",
            "wrote"
        ]
    );
}
