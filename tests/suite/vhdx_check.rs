//! `check` and `repair` of VHDX files: the real fixtures are clean (the dirty-log ones only
//! warn), every kind of damage `vhdx::check` knows is crafted into a small disk and shown to
//! be detected (with the return code a strict open gives), and repair replays dirty logs and
//! restores headers and region tables, crash-safely: stopped at every write (whole and torn)
//! and every flush, the file opens and reads as before, and a second run finishes the job.

use crate::common;

use std::path::{Path, PathBuf};

use common::fixtures::vhdx_fixture;
use common::patch::{patch, truncate};
use uuid::Uuid;
use vhd_merge::check::{CheckOptions, Severity, check_file};
use vhd_merge::io::{FaultPlan, FileStorage};
use vhd_merge::repair::{RepairOptions, repair_file};
use vhd_merge::vhdx::Vhdx;
use vhd_merge::vhdx::check::{LogState, inspect_path};
use vhd_merge::vhdx::create::{
    CreateOptions, METADATA_OFFSET, create_differencing, create_dynamic,
};
use vhd_merge::vhdx::format::bat::{BatEntry, Geometry};
use vhd_merge::vhdx::format::header::Header;
use vhd_merge::vhdx::format::log::{EntryParams, Write, build_entry};
use vhd_merge::vhdx::format::region::{RegionEntry, RegionTable};
use vhd_merge::vhdx::format::{HEADER1_OFFSET, HEADER2_OFFSET, MIB, REGION_TABLE1_OFFSET};
use vhd_merge::vhdx::format::{REGION_TABLE2_OFFSET, SLOT_SIZE};
use vhd_merge::vhdx::repair::repair_storage;
use vhd_merge::{Result, ReturnCode};

/// Every real fixture (12 files; qemu's two only when `../shared` is there).
const FIXTURES: &[&str] = &[
    "qemu-iotests/iotest-dirtylog-10G-4M.vhdx",
    "qemu-iotests/iotest-dynamic-1G.vhdx",
    "dfvfs/ext2.vhdx",
    "dfvfs/ntfs-fixed.vhdx",
    "dfvfs/ntfs-parent.vhdx",
    "dfvfs/ntfs-differential.vhdx",
    "dfvfs/fat-parent.vhdx",
    "dfvfs/fat-differential.vhdx",
    "discutils/btrfs.vhdx",
    "discutils/lvm2.vhdx",
    "discutils/xfs.vhdx",
    "discutils/vhdx-log-replay.vhdx",
];
const DIRTY: &[&str] = &["iotest-dirtylog-10G-4M.vhdx", "vhdx-log-replay.vhdx"];

/// (severity, code) of every finding of `check` on `p`.
fn findings(p: &Path) -> Vec<(Severity, &'static str)> {
    let r = check_file(p, &CheckOptions::default()).unwrap();
    r.findings
        .iter()
        .map(|f| (f.severity, f.code.name()))
        .collect()
}

fn errors(p: &Path) -> Vec<&'static str> {
    let f = findings(p);
    f.into_iter()
        .filter(|(s, _)| *s == Severity::Error)
        .map(|(_, c)| c)
        .collect()
}

/// The return code of a strict read-only open (None: it opens).
fn strict(p: &Path) -> Option<ReturnCode> {
    Vhdx::open_path(p, false).err().map(|e| e.return_code())
}

#[test]
fn real_fixtures_are_clean_and_dirty_logs_warn() {
    let mut seen = 0;
    for rel in FIXTURES {
        let Some((p, _)) = vhdx_fixture(rel) else {
            continue;
        };
        seen += 1;
        let dirty = DIRTY.iter().any(|d| rel.ends_with(d));
        let want = if dirty {
            vec![(Severity::Warning, "log-dirty")]
        } else {
            vec![]
        };
        assert_eq!(findings(&p), want, "{rel}");
    }
    assert!(seen >= 10, "only {seen} fixtures found");
}

const BS: u32 = MIB as u32;
const SIZE: u64 = 8 * MIB;

fn opts(sector: u32) -> CreateOptions {
    CreateOptions::default()
        .block_size(Some(BS))
        .logical_sector_size(sector)
        .force(false)
}

/// A differencing disk (1 MiB blocks, 8 MiB) over a dynamic parent, blocks 0 and 2 of the child
/// partly written, block 1 of the parent written; returns the child.
fn chain(dir: &Path, sector: u32) -> PathBuf {
    let (parent, child) = (dir.join("p.vhdx"), dir.join("c.vhdx"));
    let mut p = create_dynamic(&parent, SIZE, &opts(sector)).unwrap();
    p.write_at(MIB, &vec![0x11; 64 << 10]).unwrap();
    p.finish().unwrap();
    drop(p);
    let mut c = create_differencing(&child, &parent, &opts(sector)).unwrap();
    c.write_at(8192, &vec![0x22; 8192]).unwrap();
    c.write_at(2 * MIB, &vec![0x33; 4096]).unwrap();
    c.finish().unwrap();
    child
}

/// A dynamic disk (1 MiB blocks, 8 MiB) with blocks 0 and 3 written.
fn dynamic(dir: &Path) -> PathBuf {
    let p = dir.join("d.vhdx");
    let mut v = create_dynamic(&p, SIZE, &opts(512)).unwrap();
    v.write_at(0, &vec![0x44; 4096]).unwrap();
    v.write_at(3 * MIB, &vec![0x55; 4096]).unwrap();
    v.finish().unwrap();
    p
}

/// The BAT's shape and offset, as the inspection reads them (also from a damaged file).
fn geometry(p: &Path) -> (Geometry, u64) {
    let i = inspect_path(p, false).unwrap();
    (i.geometry.unwrap(), i.regions.unwrap().bat.file_offset)
}

fn set_entry(p: &Path, index: u64, e: BatEntry) {
    let (_, bat) = geometry(p);
    patch(p, bat + index * 8, &e.0.to_le_bytes());
}

fn payload(p: &Path, block: u64) -> BatEntry {
    let (g, bat) = geometry(p);
    let b = std::fs::read(p).unwrap();
    BatEntry::at(&b[bat as usize..], g.payload_index(block)).unwrap()
}

fn set_payload(p: &Path, block: u64, e: BatEntry) {
    let (g, _) = geometry(p);
    set_entry(p, g.payload_index(block), e);
}

/// A new directory `name` in `dir`.
fn subdir(dir: &Path, name: &str) -> PathBuf {
    let d = dir.join(name);
    std::fs::create_dir(&d).unwrap();
    d
}

fn flip(p: &Path, offset: u64) {
    let b = std::fs::read(p).unwrap()[offset as usize];
    patch(p, offset, &[b ^ 0x5A]);
}

/// Rewrite the header in `slot` (0 or 1), resealed.
fn edit_header(p: &Path, slot: usize, f: impl Fn(&mut Header)) {
    let off = [HEADER1_OFFSET, HEADER2_OFFSET][slot];
    let b = std::fs::read(p).unwrap();
    let mut h = Header::parse(&b[off as usize..off as usize + 4096], off).unwrap();
    f(&mut h);
    patch(p, off, &h.to_bytes());
}

fn current_slot(p: &Path) -> usize {
    Vhdx::open_path(p, false).unwrap().reader().header.slot
}

/// Rewrite region table copy `copy` (0 or 1), resealed.
fn edit_regions(p: &Path, copy: usize, f: impl Fn(&mut RegionTable)) {
    let off = [REGION_TABLE1_OFFSET, REGION_TABLE2_OFFSET][copy];
    let b = std::fs::read(p).unwrap();
    let mut t = RegionTable::parse(&b[off as usize..off as usize + SLOT_SIZE], off).unwrap();
    f(&mut t);
    patch(p, off, &t.to_bytes());
}

#[test]
fn created_disks_are_clean() {
    let dir = tempfile::tempdir().unwrap();
    for sector in [512, 4096] {
        let child = chain(dir.path(), sector);
        assert_eq!(findings(&child), vec![], "child, {sector}");
        assert_eq!(findings(&dir.path().join("p.vhdx")), vec![]);
        std::fs::remove_file(&child).unwrap();
        std::fs::remove_file(dir.path().join("p.vhdx")).unwrap();
    }
}

#[test]
fn damaged_headers_are_found() {
    let dir = tempfile::tempdir().unwrap();
    let p = dynamic(dir.path());
    flip(&p, HEADER1_OFFSET + 100);
    assert_eq!(errors(&p), ["header-bad"]);
    let r = check_file(&p, &CheckOptions::default()).unwrap();
    assert!(
        r.findings[0]
            .message
            .ends_with("rewrites it from the other copy"),
        "{:?}",
        r.findings
    );
    assert_eq!(strict(&p), None, "the other header is used");
    flip(&p, HEADER2_OFFSET + 8);
    assert_eq!(errors(&p), ["header-bad", "header-bad"]);
    assert_eq!(strict(&p), Some(ReturnCode::IncorrectDataType));
}

/// Disk2vhd's identical headers are a note; a zero DataWriteGuid a warning (a child cannot be
/// verified against it); both open.
#[test]
fn identical_headers_and_a_zero_data_write_guid_are_noted() {
    let dir = tempfile::tempdir().unwrap();
    let p = dynamic(dir.path());
    let cur = current_slot(&p);
    let b = std::fs::read(&p).unwrap();
    let off = [HEADER1_OFFSET, HEADER2_OFFSET][cur] as usize;
    patch(
        &p,
        [HEADER1_OFFSET, HEADER2_OFFSET][1 - cur],
        &b[off..off + 4096],
    );
    assert_eq!(findings(&p), [(Severity::Info, "headers-identical")]);
    edit_header(&p, cur, |h| {
        h.data_write_guid = Uuid::nil();
        h.sequence_number += 1;
    });
    assert_eq!(findings(&p), [(Severity::Warning, "nil-guid")]);
    assert_eq!(strict(&p), None);
}

#[test]
fn equal_sequence_numbers_that_differ_conflict() {
    let dir = tempfile::tempdir().unwrap();
    let p = dynamic(dir.path());
    let cur = current_slot(&p);
    let b = std::fs::read(&p).unwrap();
    let off = [HEADER1_OFFSET, HEADER2_OFFSET][cur] as usize;
    let seq = Header::parse(&b[off..off + 4096], off as u64)
        .unwrap()
        .sequence_number;
    edit_header(&p, 1 - cur, |h| {
        h.sequence_number = seq;
        h.file_write_guid = Uuid::new_v4();
    });
    assert_eq!(errors(&p), ["header-conflict"]);
    assert_eq!(strict(&p), Some(ReturnCode::IncorrectDataType));
}

#[test]
fn damaged_and_differing_region_tables_are_found() {
    let dir = tempfile::tempdir().unwrap();
    let p = dynamic(dir.path());
    flip(&p, REGION_TABLE2_OFFSET + 40);
    assert_eq!(errors(&p), ["region-table-bad"]);
    assert_eq!(strict(&p), None);
    let p = dynamic(&subdir(dir.path(), "b"));
    edit_regions(&p, 1, |t| t.entries[0].required = !t.entries[0].required);
    assert_eq!(errors(&p), ["region-tables-differ"]);
    assert_eq!(strict(&p), None);
}

#[test]
fn unknown_required_region_is_not_supported() {
    let dir = tempfile::tempdir().unwrap();
    let p = dynamic(dir.path());
    let extra = RegionEntry {
        guid: Uuid::new_v4(),
        file_offset: 64 * MIB,
        length: MIB as u32,
        required: true,
    };
    for copy in [0, 1] {
        edit_regions(&p, copy, |t| t.entries.push(extra));
    }
    assert_eq!(errors(&p), ["not-supported"]);
    assert_eq!(strict(&p), Some(ReturnCode::NotSupported));
}

#[test]
fn region_past_the_end_and_short_files_are_found() {
    let dir = tempfile::tempdir().unwrap();
    let p = dynamic(dir.path());
    truncate(&p, 3 * MIB + MIB / 2); // inside the BAT region
    let e = errors(&p);
    assert!(e.contains(&"region-outside"), "{e:?}");
    assert_eq!(strict(&p), Some(ReturnCode::IncorrectDataType));
    truncate(&p, 512 << 10);
    let e = errors(&p);
    assert_eq!(e.iter().filter(|c| **c == "truncated").count(), 1, "{e:?}");
    // Nothing to restore from: no finding promises a repair.
    let r = check_file(&p, &CheckOptions::default()).unwrap();
    assert!(
        r.findings.iter().all(|f| !f.message.contains("repair")),
        "{:?}",
        r.findings
    );
}

/// The file offset of the File Parameters item (`create` puts it first).
fn file_parameters(p: &Path) -> u64 {
    let b = std::fs::read(p).unwrap();
    let at = METADATA_OFFSET as usize + 32 + 16;
    METADATA_OFFSET + u64::from(u32::from_le_bytes(b[at..at + 4].try_into().unwrap()))
}

#[test]
fn bad_metadata_is_found() {
    let dir = tempfile::tempdir().unwrap();
    let p = dynamic(dir.path());
    let fp = file_parameters(&p);
    patch(&p, fp, &(3 * MIB as u32).to_le_bytes()); // block size 3 MiB
    assert_eq!(errors(&p), ["metadata-bad"]);
    assert_eq!(strict(&p), Some(ReturnCode::IncorrectDataType));
    patch(&p, fp, &BS.to_le_bytes());
    assert_eq!(errors(&p), Vec::<&str>::new());
    patch(&p, METADATA_OFFSET, b"metadatX");
    assert_eq!(errors(&p), ["metadata-bad"]);
    assert_eq!(strict(&p), Some(ReturnCode::IncorrectDataType));
}

/// An unknown metadata item marked required is Not Supported (32770), for check and open.
#[test]
fn unknown_required_metadata_item_is_not_supported() {
    let dir = tempfile::tempdir().unwrap();
    let p = dynamic(dir.path());
    let b = std::fs::read(&p).unwrap();
    let m = METADATA_OFFSET as usize;
    let count = u16::from_le_bytes([b[m + 10], b[m + 11]]);
    let mut entry = Uuid::new_v4().to_bytes_le().to_vec();
    entry.extend_from_slice(&[0; 8]); // offset and length 0: an empty item
    entry.extend_from_slice(&4u32.to_le_bytes()); // IsRequired
    entry.extend_from_slice(&[0; 4]);
    patch(&p, METADATA_OFFSET + 32 + 32 * u64::from(count), &entry);
    patch(&p, METADATA_OFFSET + 10, &(count + 1).to_le_bytes());
    assert_eq!(errors(&p), ["not-supported"]);
    assert_eq!(strict(&p), Some(ReturnCode::NotSupported));
}

#[test]
fn bad_bat_entries_are_found() {
    let dir = tempfile::tempdir().unwrap();
    let p = dynamic(dir.path());
    let e0 = payload(&p, 0);
    let len = std::fs::metadata(&p).unwrap().len();
    let cases: Vec<(u64, BatEntry, &str, Option<ReturnCode>)> = vec![
        (
            1,
            BatEntry::new(4, 0),
            "bat-state",
            Some(ReturnCode::IncorrectDataType),
        ),
        (
            1,
            BatEntry::new(6, len / MIB + 4),
            "block-outside",
            Some(ReturnCode::IncorrectDataType),
        ),
        (
            1,
            BatEntry::new(6, 0),
            "block-outside",
            Some(ReturnCode::IncorrectDataType),
        ),
        (1, e0, "overlap", None),
        (1, BatEntry::new(6, 2), "overlap", None), // over the metadata region
    ];
    for (block, e, code, rc) in cases {
        let old = payload(&p, block);
        set_payload(&p, block, e);
        assert_eq!(errors(&p), [code], "{e:?}");
        assert_eq!(strict(&p), rc, "{e:?}");
        set_payload(&p, block, old);
    }
    set_payload(&p, 0, BatEntry(e0.0 | 0x100));
    assert_eq!(findings(&p), [(Severity::Warning, "bat-reserved")]);
    set_payload(&p, 0, BatEntry(e0.0 | 1)); // state 7 without a parent
    assert_eq!(findings(&p), [(Severity::Warning, "partial-no-parent")]);
    set_payload(&p, 0, e0);
    set_payload(&p, 5, BatEntry::new(0, 9));
    assert_eq!(findings(&p), [(Severity::Info, "bat-offset")]);
    set_payload(&p, 5, BatEntry(0));
    assert_eq!(findings(&p), vec![]);
}

/// A dynamic disk's sector bitmap entries are ignored (old qemu wrote garbage there): a note.
#[test]
fn bitmap_entries_of_a_dynamic_disk_are_a_note() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("two-chunks.vhdx");
    drop(create_dynamic(&p, 4 * 1024 * MIB + MIB, &opts(512)).unwrap());
    let (g, _) = geometry(&p);
    assert_eq!(g.bitmap_blocks(), 2);
    set_entry(&p, g.bitmap_index(0), BatEntry::new(6, 99));
    assert_eq!(findings(&p), [(Severity::Info, "bitmap-entry-ignored")]);
    assert_eq!(strict(&p), None);
}

#[test]
fn bad_sector_bitmap_entries_are_found() {
    let dir = tempfile::tempdir().unwrap();
    let p = chain(dir.path(), 4096);
    let (g, bat) = geometry(&p);
    let b = std::fs::read(&p).unwrap();
    let sb = BatEntry::at(&b[bat as usize..], g.bitmap_index(0)).unwrap();
    let len = std::fs::metadata(&p).unwrap().len();
    set_entry(&p, g.bitmap_index(0), BatEntry(0));
    assert_eq!(errors(&p), ["bitmap-missing", "bitmap-missing"]);
    set_entry(&p, g.bitmap_index(0), BatEntry::new(6, len / MIB));
    assert_eq!(errors(&p), ["bitmap-outside"]);
    assert_eq!(strict(&p), Some(ReturnCode::IncorrectDataType));
    set_entry(&p, g.bitmap_index(0), BatEntry::new(3, sb.file_offset_mb()));
    assert_eq!(
        errors(&p),
        ["bat-state", "bitmap-missing", "bitmap-missing"]
    );
    set_entry(&p, g.bitmap_index(0), payload(&p, 0)); // the bitmap over block 0
    assert_eq!(errors(&p), ["overlap"]);
}

#[test]
fn findings_of_one_kind_are_capped() {
    let dir = tempfile::tempdir().unwrap();
    let p = {
        let p = dir.path().join("big.vhdx");
        let mut v = create_dynamic(&p, 64 * MIB, &opts(512)).unwrap();
        v.write_at(0, &[1; 512]).unwrap();
        v.finish().unwrap();
        p
    };
    let e0 = payload(&p, 0);
    for block in 1..64 {
        set_payload(&p, block, e0);
    }
    let r = check_file(&p, &CheckOptions::default()).unwrap();
    let overlaps: Vec<_> = r.with_code("overlap").collect();
    assert_eq!(overlaps.len(), 33, "32 listed and a note");
    let note = overlaps.last().unwrap();
    assert_eq!(note.severity, Severity::Info);
    assert!(note.message.starts_with("31 more"), "{}", note.message);
}

#[test]
fn unreplayable_and_misplaced_logs_are_found() {
    let dir = tempfile::tempdir().unwrap();
    let p = dynamic(dir.path());
    let cur = current_slot(&p);
    edit_header(&p, cur, |h| h.log_guid = Uuid::new_v4());
    assert_eq!(errors(&p), ["log-unreplayable"]);
    assert_eq!(strict(&p), Some(ReturnCode::IncorrectDataType));
    edit_header(&p, cur, |h| {
        h.log_guid = Uuid::nil();
        h.log_offset = 1 << 40;
    });
    let e = errors(&p);
    assert!(e.contains(&"log-outside"), "{e:?}");
}

#[test]
fn a_child_linked_to_itself_is_found() {
    let dir = tempfile::tempdir().unwrap();
    let p = chain(dir.path(), 512);
    let v = Vhdx::open_path(&p, false).unwrap();
    let link = v.parent_locator().unwrap().parent_linkage().unwrap();
    drop(v);
    edit_header(&p, current_slot(&p), |h| h.data_write_guid = link);
    assert_eq!(errors(&p), ["self-parent"]);
}

/// Random damage to the header section, log, metadata and BAT of a differencing disk: no
/// inspection panics, and wherever a strict open fails, check finds an error (check is at
/// least as strict as opening).
#[test]
fn check_is_at_least_as_strict_as_opening() {
    let dir = tempfile::tempdir().unwrap();
    let template = chain(dir.path(), 512);
    let bytes = std::fs::read(&template).unwrap();
    let (g, bat) = geometry(&template);
    let targets = [
        (HEADER1_OFFSET, 4096),
        (REGION_TABLE1_OFFSET, 80),
        (REGION_TABLE2_OFFSET, 80),
        (MIB, 8192),
        (METADATA_OFFSET, 256),
        (file_parameters(&template), 1024),
        (bat, g.entries_needed() * 8),
    ];
    let t = dir.path().join("t.vhdx");
    let mut rng = common::Rng::new(0x5eed);
    let mut failed_opens = 0;
    for case in 0..400 {
        let mut b = bytes.clone();
        let (start, len) = targets[case % targets.len()];
        for _ in 0..1 + rng.below(3) {
            let at = (start + rng.below(len)) as usize;
            b[at] ^= 1 << rng.below(8);
        }
        std::fs::write(&t, &b).unwrap();
        let opened = Vhdx::open_path(&t, false);
        let errs = errors(&t);
        if let Err(e) = opened {
            failed_opens += 1;
            assert!(
                !errs.is_empty(),
                "case {case}: open fails ({e}) but check finds nothing"
            );
        }
    }
    assert!(
        failed_opens > 50,
        "only {failed_opens} damaged files failed to open"
    );
}

/// `--deep` reads the sector bitmap of every PARTIALLY_PRESENT block: none set is a note,
/// bits past the virtual size a warning; the fixtures and a created chain have neither.
#[test]
fn deep_check_reads_the_sector_bitmaps() {
    let deep = |p: &Path| -> Vec<(Severity, &'static str)> {
        let r = check_file(p, &CheckOptions::default().deep(true)).unwrap();
        r.findings
            .iter()
            .map(|f| (f.severity, f.code.name()))
            .collect()
    };
    for rel in [
        "dfvfs/ntfs-differential.vhdx",
        "dfvfs/fat-differential.vhdx",
    ] {
        if let Some((p, _)) = vhdx_fixture(rel) {
            assert_eq!(deep(&p), vec![], "{rel}");
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let (parent, child) = (dir.path().join("p.vhdx"), dir.path().join("c.vhdx"));
    drop(create_dynamic(&parent, 3 * MIB + MIB / 2, &opts(512)).unwrap());
    let mut c = create_differencing(&child, &parent, &opts(512)).unwrap();
    c.write_at(0, &[1; 512]).unwrap();
    c.write_at(3 * MIB, &[2; 512]).unwrap();
    c.finish().unwrap();
    drop(c);
    assert_eq!(deep(&child), vec![]);
    let (g, bat) = geometry(&child);
    let b = std::fs::read(&child).unwrap();
    let sb = BatEntry::at(&b[bat as usize..], g.bitmap_index(0))
        .unwrap()
        .file_offset();
    let last = sb + g.bitmap_slice(3).start as u64;
    patch(&child, last + (MIB / 2 / 512 / 8), &[0x01]); // the first sector past the end
    assert_eq!(deep(&child), [(Severity::Warning, "bitmap-past-end")]);
    patch(&child, sb + g.bitmap_slice(0).start as u64, &[0]);
    assert_eq!(
        deep(&child),
        [
            (Severity::Info, "partial-empty"),
            (Severity::Warning, "bitmap-past-end")
        ]
    );
    assert_eq!(
        findings(&child),
        vec![],
        "only a deep check reads the bitmaps"
    );
}

/// `check --chain`: a real Hyper-V pair and a created chain are clean; a parent written after
/// the child was made (its DataWriteGuid changed) breaks the link, which check names with the
/// File not found (32779) of the chain.
#[test]
fn chains_are_checked_link_by_link() {
    let dir = tempfile::tempdir().unwrap();
    let chain_check = |p: &Path| {
        vhd_merge::check::check_chain(p, &CheckOptions::default(), &Default::default()).unwrap()
    };
    for rel in ["dfvfs/ntfs-parent.vhdx", "dfvfs/ntfs-differential.vhdx"] {
        let Some((src, _)) = vhdx_fixture(rel) else {
            return;
        };
        std::fs::copy(src, dir.path().join(Path::new(rel).file_name().unwrap())).unwrap();
    }
    let r = chain_check(&dir.path().join("ntfs-differential.vhdx"));
    assert_eq!(
        (r.files.len(), r.findings.len()),
        (2, 0),
        "{:?}",
        r.findings
    );
    let child = chain(dir.path(), 4096);
    let r = chain_check(&child);
    assert_eq!(
        (r.files.len(), r.findings.len()),
        (2, 0),
        "{:?}",
        r.findings
    );
    let mut parent = Vhdx::open_path(dir.path().join("p.vhdx"), true).unwrap();
    parent.write_at(0, &[7; 4096]).unwrap();
    parent.finish().unwrap();
    drop(parent);
    let r = chain_check(&child);
    let codes: Vec<_> = r.findings.iter().map(|f| f.code).collect();
    assert_eq!(codes, ["chain"]);
    assert!(
        r.findings[0].message.contains("32779"),
        "{}",
        r.findings[0].message
    );
}

/// Write one log entry carrying `writes` at the start of the log and point the current
/// header's LogGuid at it (as a crash after the entry's flush leaves a file).
fn crafted_log(p: &Path, writes: &[Write], flushed: u64) {
    let guid = Uuid::new_v4();
    let params = EntryParams {
        sequence_number: 41,
        tail: 0,
        log_guid: guid,
        flushed_file_offset: flushed,
        last_file_offset: flushed,
    };
    patch(p, MIB, &build_entry(&params, writes).unwrap());
    edit_header(p, current_slot(p), |h| h.log_guid = guid);
}

/// A crafted log: an entry that would be replayed is counted (info's log state) and read as
/// replayed, and repair applies it; entries that cannot be replayed (a write into the header
/// section or past the file's end, a file shorter than FlushedFileOffset) are errors.
#[test]
fn crafted_logs_are_judged_as_an_opener_replays_them() {
    let dir = tempfile::tempdir().unwrap();
    let p = dynamic(dir.path());
    let len = std::fs::metadata(&p).unwrap().len();
    let (_, bat) = geometry(&p);
    let zero_bat = Write::Zero {
        file_offset: bat,
        length: 4096,
    };
    crafted_log(&p, std::slice::from_ref(&zero_bat), len);
    assert_eq!(findings(&p), [(Severity::Warning, "log-dirty")]);
    let i = inspect_path(&p, false).unwrap();
    assert!(
        matches!(
            i.log,
            Some(LogState::Dirty {
                entries: 1,
                writes: 1,
                bytes: 4096,
                sequences: (41, 41),
                ..
            })
        ),
        "{:?}",
        i.log
    );
    assert_eq!(
        i.blocks.payload.get("not_present"),
        Some(&8),
        "read after the replay"
    );
    assert_eq!(view(&p), vec![0; SIZE as usize]);
    assert!(repair(&p, false).unwrap().wrote);
    assert_eq!(findings(&p), vec![]);
    assert_eq!(view(&p), vec![0; SIZE as usize]);
    for (writes, flushed) in [
        (
            vec![Write::Zero {
                file_offset: 64 << 10,
                length: 4096,
            }],
            len,
        ),
        (
            vec![Write::Zero {
                file_offset: len,
                length: 4096,
            }],
            len,
        ),
        (vec![zero_bat.clone()], len + MIB),
    ] {
        let q = dynamic(&subdir(
            dir.path(),
            &format!("{flushed}-{}", writes[0].range().start),
        ));
        crafted_log(&q, &writes, flushed);
        assert_eq!(errors(&q), ["log-unreplayable"], "{writes:?}");
        assert_eq!(strict(&q), Some(ReturnCode::IncorrectDataType));
        let r = repair(&q, false).unwrap();
        assert!(
            r.is_clean() && r.has_errors(),
            "a log that cannot be replayed is left as it is"
        );
    }
}

// ---- repair -------------------------------------------------------------------------------

fn view(p: &Path) -> Vec<u8> {
    let v = Vhdx::open_path(p, false).unwrap();
    let mut buf = vec![0; v.virtual_size() as usize];
    v.read_own(0, &mut buf).unwrap();
    buf
}

fn data_write_guid(p: &Path) -> Uuid {
    Vhdx::open_path(p, false).unwrap().data_write_guid()
}

fn repair(p: &Path, dry_run: bool) -> Result<vhd_merge::repair::RepairReport> {
    repair_file(p, &RepairOptions::default().dry_run(dry_run))
}

#[test]
fn repair_replays_the_real_dirty_logs() {
    let dir = tempfile::tempdir().unwrap();
    let Some((src, _)) = vhdx_fixture("discutils/vhdx-log-replay.vhdx") else {
        return;
    };
    let p = dir.path().join("r.vhdx");
    std::fs::copy(&src, &p).unwrap();
    let before = std::fs::read(&p).unwrap();
    let (seen, id) = (view(&p), data_write_guid(&p));
    let dry = repair(&p, true).unwrap();
    assert_eq!(dry.actions.len(), 1);
    assert_eq!(dry.actions[0].structure, "log");
    assert!(
        dry.actions[0].reason.contains("replay 2 log entries"),
        "{:?}",
        dry.actions
    );
    assert_eq!(dry.actions[0].len, 2 * 4096, "two BAT pages");
    assert!(!dry.wrote && !dry.has_errors());
    assert_eq!(
        std::fs::read(&p).unwrap(),
        before,
        "a dry run writes nothing"
    );
    let done = repair(&p, false).unwrap();
    assert!(done.wrote && !done.has_errors(), "{:?}", done.not_repaired);
    assert_eq!(findings(&p), vec![]);
    assert_eq!(
        view(&p),
        seen,
        "the replayed file reads what the in-memory replay read"
    );
    assert_eq!(data_write_guid(&p), id, "children stay linked");
    assert!(repair(&p, false).unwrap().is_clean());
}

#[test]
fn repair_restores_headers_and_region_tables() {
    let dir = tempfile::tempdir().unwrap();
    let p = chain(dir.path(), 512);
    let (seen, id) = (view(&p), data_write_guid(&p));
    let other = 1 - current_slot(&p);
    flip(&p, [HEADER1_OFFSET, HEADER2_OFFSET][other] + 200);
    flip(&p, REGION_TABLE1_OFFSET + 100);
    let dry = repair(&p, true).unwrap();
    let what: Vec<_> = dry
        .actions
        .iter()
        .map(|a| (a.structure, a.offset))
        .collect();
    let header = [HEADER1_OFFSET, HEADER2_OFFSET][other];
    assert_eq!(
        what,
        [("header", header), ("region table", REGION_TABLE1_OFFSET)]
    );
    let done = repair(&p, false).unwrap();
    assert!(
        done.wrote && done.not_repaired.is_empty(),
        "{:?}",
        done.not_repaired
    );
    assert_eq!(findings(&p), vec![]);
    let b = std::fs::read(&p).unwrap();
    let copy = |o: u64| &b[o as usize..o as usize + SLOT_SIZE];
    assert_eq!(copy(REGION_TABLE1_OFFSET), copy(REGION_TABLE2_OFFSET));
    assert_eq!((view(&p), data_write_guid(&p)), (seen, id));
}

#[test]
fn repair_leaves_what_it_cannot_fix_and_refuses_without_a_header() {
    let dir = tempfile::tempdir().unwrap();
    let p = dynamic(dir.path());
    set_payload(&p, 1, BatEntry::new(4, 0));
    let r = repair(&p, false).unwrap();
    assert!(r.is_clean() && r.has_errors());
    assert_eq!(r.not_repaired[0].code, "bat-state");
    flip(&p, HEADER1_OFFSET + 9);
    flip(&p, HEADER2_OFFSET + 9);
    let e = repair(&p, false).unwrap_err();
    assert_eq!(e.return_code(), ReturnCode::IncorrectDataType);
}

/// Repair takes the locks every tool takes: a file another process holds exclusively (a merge)
/// is System is in use (32774), also for a dry run, and is not written.
#[test]
fn repair_takes_the_lock_every_writer_takes() {
    use vhd_merge::io::Storage;
    let dir = tempfile::tempdir().unwrap();
    let p = dynamic(dir.path());
    flip(&p, REGION_TABLE2_OFFSET + 64);
    let before = std::fs::read(&p).unwrap();
    let holder = FileStorage::new(std::fs::File::open(&p).unwrap());
    assert!(holder.try_lock(true).unwrap());
    for dry_run in [true, false] {
        let e = repair(&p, dry_run).unwrap_err();
        assert_eq!(e.return_code(), ReturnCode::SystemInUse, "{e}");
    }
    assert_eq!(std::fs::read(&p).unwrap(), before);
    drop(holder);
    assert!(repair(&p, false).unwrap().wrote);
}

/// A dirty log (a writable session dropped without `finish`, as a crash leaves it), a damaged
/// second region table and, without a log, a damaged header: `repair_storage` stopped at every
/// write (whole and torn) and every flush leaves a file that reads as before, and a second
/// repair leaves it clean.
#[test]
fn repair_is_crash_safe() {
    let dir = tempfile::tempdir().unwrap();
    for dirty in [true, false] {
        let template = chain(dir.path(), 512);
        if dirty {
            let mut v = Vhdx::open_path(&template, true).unwrap();
            v.write_at(5 * MIB, &vec![0x66; 8192]).unwrap();
            v.commit().unwrap();
        } else {
            flip(
                &template,
                [HEADER1_OFFSET, HEADER2_OFFSET][1 - current_slot(&template)] + 64,
            );
        }
        flip(&template, REGION_TABLE2_OFFSET + 64);
        let seen = view(&template);
        let count = FaultPlan::new();
        let counted = dir.path().join("counted.vhdx");
        std::fs::copy(&template, &counted).unwrap();
        run_repair(&counted, count.clone()).unwrap();
        let (writes, syncs) = (count.writes(), count.syncs());
        assert!(writes >= 2 && syncs >= 2, "{writes} writes, {syncs} syncs");
        let plans = (1..=writes)
            .flat_map(|n| {
                [
                    FaultPlan::crash_at_write(n, false),
                    FaultPlan::crash_at_write(n, true),
                ]
            })
            .chain((1..=syncs).map(FaultPlan::fail_sync_at));
        for plan in plans {
            let t = dir.path().join("t.vhdx");
            std::fs::copy(&template, &t).unwrap();
            let what = format!("dirty {dirty}, {plan:?}");
            assert!(run_repair(&t, plan).is_err(), "{what}");
            assert_eq!(view(&t), seen, "{what}");
            repair(&t, false).unwrap();
            assert_eq!(findings(&t), vec![], "{what}");
            assert_eq!(view(&t), seen, "{what}");
        }
        std::fs::remove_file(dir.path().join("p.vhdx")).unwrap();
        std::fs::remove_file(&template).unwrap();
    }
}

fn run_repair(p: &Path, plan: std::sync::Arc<FaultPlan>) -> Result<()> {
    let s = common::storage::faulty_file(p, plan);
    repair_storage(s, p, &RepairOptions::default()).map(|_| ())
}
