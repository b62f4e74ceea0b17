//! `check`: every finding it promises, on files damaged on purpose, and silence on good files.

use crate::common;

use std::path::Path;

use common::patch::*;
use common::{fixtures, read};
use vhd_merge::check::{CheckOptions, CheckReport, Severity, check_chain, check_file};
use vhd_merge::create::create_dynamic;
use vhd_merge::{ChainOptions, OpenOptions, Vhd};

fn deep() -> CheckOptions {
    CheckOptions::default().deep(true)
}

fn codes(r: &CheckReport, sev: Severity) -> Vec<&'static str> {
    r.findings
        .iter()
        .filter(|f| f.severity == sev)
        .map(|f| f.code.name())
        .collect()
}

fn assert_clean(r: &CheckReport) {
    let bad: Vec<_> = r
        .findings
        .iter()
        .filter(|f| f.severity >= Severity::Warning)
        .collect();
    assert!(bad.is_empty(), "unexpected findings: {bad:#?}");
}

fn finding<'a>(r: &'a CheckReport, code: &str) -> &'a vhd_merge::check::Finding {
    r.findings
        .iter()
        .find(|f| f.code == code)
        .unwrap_or_else(|| panic!("no {code} finding in {:#?}", r.findings))
}

#[test]
fn good_files_have_no_errors_or_warnings() {
    let d = tempfile::tempdir().unwrap();
    let dy = dynamic(d.path(), "d.vhd");
    let fx = fixed(d.path(), "f.vhd");
    let ch = child(d.path(), "c.vhd", &dy);
    for p in [&dy, &fx, &ch] {
        let r = check_file(p, &deep()).unwrap();
        assert_clean(&r);
        assert_eq!(r.files, vec![p.clone()]);
    }
    let r = check_chain(&ch, &deep(), &ChainOptions::default()).unwrap();
    assert_clean(&r);
    assert_eq!(r.files.len(), 2);
}

#[test]
fn real_files_from_other_tools() {
    // The permissive fixtures in the repository, and all of them when ../shared is there.
    let mut roots = vec![fixtures::repo_fixtures()];
    let min = if let Some(real) = fixtures::shared_fixtures() {
        roots.push(real);
        30
    } else {
        10
    };
    let d = tempfile::tempdir().unwrap();
    // Files whose footer checksum PROVENANCE.md lists as BAD, and the fuzzed afl5.img.
    let damaged = ["image.vhd", "image-differential.vhd", "afl5.img"];
    let mut n = 0;
    for dir in roots.iter().flat_map(|r| std::fs::read_dir(r).unwrap()) {
        let dir = dir.unwrap().path();
        // fixtures/vhdx/ holds VHDX files: tests/suite/vhdx_check.rs checks every one of them.
        if !dir.is_dir() || dir.file_name() == Some("vhdx".as_ref()) {
            continue;
        }
        for f in std::fs::read_dir(&dir).unwrap() {
            let f = f.unwrap().path();
            let p = fixtures::unpack_into(&f, d.path());
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            let r = check_file(&p, &deep()).unwrap();
            if damaged.contains(&name.as_str()) {
                assert!(r.has_errors(), "{name}: {:#?}", r.findings);
            } else {
                assert!(!r.has_errors(), "{name}: {:#?}", r.findings);
            }
            n += 1;
            std::fs::remove_file(&p).unwrap();
        }
    }
    assert!(n >= min, "only {n} fixtures checked");
}

#[test]
fn footer_copy_differs_or_is_damaged_or_end_is_missing() {
    let d = tempfile::tempdir().unwrap();
    let p = dynamic(d.path(), "a.vhd");
    let good = read(&p);

    // A copy with another field value (and a correct checksum).
    let mut f = vhd_merge::format::Footer::parse(good[..512].try_into().unwrap()).unwrap();
    f.timestamp += 1;
    patch(&p, 0, &f.to_bytes());
    let r = check_file(&p, &CheckOptions::default()).unwrap();
    assert!(r.has_errors());
    let x = finding(&r, "footer-copy-differs");
    assert_eq!((x.severity, x.offset), (Severity::Error, Some(0)));

    // Same fields, wrong checksum: byte-for-byte different.
    std::fs::write(&p, &good).unwrap();
    patch(&p, 64, &[0, 0, 0, 0]);
    let r = check_file(&p, &CheckOptions::default()).unwrap();
    assert!(finding(&r, "footer-copy-bad").message.contains("checksum"));

    // End footer gone (file cut 512 bytes short).
    std::fs::write(&p, &good).unwrap();
    truncate(&p, good.len() as u64 - 512);
    let r = check_file(&p, &CheckOptions::default()).unwrap();
    let x = finding(&r, "footer-end-bad");
    assert_eq!(x.severity, Severity::Error);
    assert!(x.message.contains("copy at offset 0"), "{}", x.message);
}

#[test]
fn header_fields() {
    let d = tempfile::tempdir().unwrap();
    let p = dynamic(d.path(), "a.vhd");
    let ho = header_offset(&p);
    patch(&p, ho + 36, &[1, 2, 3, 4]);
    let r = check_file(&p, &CheckOptions::default()).unwrap();
    let x = finding(&r, "header-checksum");
    assert_eq!((x.severity, x.offset), (Severity::Error, Some(ho)));

    let p = dynamic(d.path(), "b.vhd");
    edit_header(&p, |h| h.data_offset = 0);
    edit_header(&p, |h| h.table_offset += 0); // keep the checksum right
    let r = check_file(&p, &CheckOptions::default()).unwrap();
    assert!(!r.has_errors());
    assert!(finding(&r, "header-odd").message.contains("all ones"));

    // More table entries than the size needs: a note.
    let p = d.path().join("c.vhd");
    drop(create_dynamic(&p, SIZE, &opts()).unwrap());
    edit_footer(&p, |f| f.current_size = SIZE / 2);
    let r = check_file(&p, &CheckOptions::default()).unwrap();
    assert_eq!(finding(&r, "bat-larger").severity, Severity::Info);
    assert!(!r.has_errors());
}

#[test]
fn bat_entries_outside_the_file_or_overlapping() {
    let d = tempfile::tempdir().unwrap();
    let p = dynamic(d.path(), "a.vhd");
    let len = read(&p).len() as u64;
    set_bat_entry(&p, 7, (len / 512 + 10) as u32);
    let b0 = bat_entry(&p, 0);
    set_bat_entry(&p, 9, b0 + 8);
    let h = header(&p);
    set_bat_entry(&p, 11, (h.table_offset / 512) as u32);
    let r = check_file(&p, &CheckOptions::default()).unwrap();
    let x = finding(&r, "bat-entry-outside");
    assert_eq!((x.block, x.severity), (Some(7), Severity::Error));
    let overlaps: Vec<_> = r.with_code("block-overlap").collect();
    assert!(
        overlaps
            .iter()
            .any(|f| f.message.contains("block 0") && f.message.contains("block 9")),
        "{overlaps:#?}"
    );
    assert!(
        overlaps
            .iter()
            .any(|f| f.message.contains("the BAT") && f.message.contains("block 11")),
        "{overlaps:#?}"
    );
}

#[test]
fn locators_outside_or_overlapping() {
    let d = tempfile::tempdir().unwrap();
    let base = dynamic(d.path(), "base.vhd");
    let c = child(d.path(), "c.vhd", &base);
    let len = read(&c).len() as u64;
    let block0 = u64::from(bat_entry(&c, 0)) * 512;
    edit_header(&c, |h| {
        // Slot 2 is MacX on Unix hosts and empty on Windows (no MacX written there): a copy of
        // the W2ku entry in both cases, pointing into block 0.
        h.locators[2] = vhd_merge::format::ParentLocator {
            data_offset: block0 + 512,
            ..h.locators[1]
        };
        h.locators[1].data_offset = len + 10;
    });
    let r = check_file(&c, &CheckOptions::default()).unwrap();
    let x = finding(&r, "locator-outside");
    assert_eq!(
        (x.severity, x.structure.as_str()),
        (Severity::Error, "locator 1")
    );
    let x = finding(&r, "locator-overlap");
    assert_eq!(x.structure, "locator 2");
    assert!(x.message.contains("block 0"), "{}", x.message);
    // Opening still works (the W2ru locator is intact), with warnings.
    let v = Vhd::open(&c, OpenOptions::read_only()).unwrap();
    assert!(v.warnings().iter().any(|w| w.contains("outside the file")));
}

#[test]
fn deep_finds_data_in_never_written_sectors() {
    let d = tempfile::tempdir().unwrap();
    let p = dynamic(d.path(), "a.vhd");
    // Block 1 has sectors 8..24 written; sector 40 is clear.
    let b1 = u64::from(bat_entry(&p, 1)) * 512;
    patch(&p, b1 + 512 + 40 * 512 + 7, &[1]);
    assert!(
        !check_file(&p, &CheckOptions::default())
            .unwrap()
            .has_errors()
    );
    let r = check_file(&p, &deep()).unwrap();
    let x = finding(&r, "unwritten-not-zero");
    // A warning: an interrupted merge leaves this state, and the bitmap says what the disk
    // holds (issue 9, defect 7).
    assert_eq!(x.severity, Severity::Warning);
    assert!(!r.has_errors(), "{:#?}", r.findings);
    assert!(x.message.contains("interrupted merge"), "{}", x.message);
    assert!(x.message.contains("re-run the merge"), "{}", x.message);
    assert_eq!(x.block, Some(1));
    assert_eq!(x.offset, Some(b1 + 512 + 40 * 512));
    assert!(
        x.message
            .contains(&format!("virtual offset {}", u64::from(BS) + 40 * 512)),
        "{}",
        x.message
    );
    // A differencing disk's clear sectors come from the parent: no finding there.
    let base = dynamic(d.path(), "base.vhd");
    let c = child(d.path(), "c.vhd", &base);
    let c0 = u64::from(bat_entry(&c, 0)) * 512;
    patch(&c, c0 + 512 + 100 * 512, &[7; 512]);
    assert_clean(&check_file(&c, &deep()).unwrap());
}

#[test]
fn deep_bitmap_bits_past_the_virtual_size() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("a.vhd");
    // 1 MiB - 32 KiB: the last block is half inside.
    let mut v = create_dynamic(&p, SIZE - (32 << 10), &opts()).unwrap();
    v.write_at(15 * u64::from(BS), &[1; 512]).unwrap();
    drop(v);
    assert_clean(&check_file(&p, &deep()).unwrap());
    let b = u64::from(bat_entry(&p, 15)) * 512;
    patch(&p, b + 10, &[0x01]); // sector 87 of 128: past the 64 sectors inside
    let r = check_file(&p, &deep()).unwrap();
    let x = finding(&r, "bitmap-past-end");
    assert_eq!((x.severity, x.block), (Severity::Warning, Some(15)));
}

#[test]
fn deep_batmap_agrees_with_bitmaps() {
    let d = tempfile::tempdir().unwrap();
    let h0 = 1536 + 512; // batmap header right after the one-sector BAT
    let map_at = h0 + 512;
    let p = tap_file(d.path(), map_at);
    let mut v = Vhd::open(&p, OpenOptions::writable()).unwrap();
    v.write_at(0, &vec![1; BS as usize]).unwrap(); // block 0 full
    v.write_at(u64::from(BS), &[2; 512]).unwrap(); // block 1 partial
    drop(v);
    set_batmap(&p, map_at, &[0x80]);
    assert_clean(&check_file(&p, &deep()).unwrap());

    set_batmap(&p, map_at, &[0xC0 | 0x10]); // blocks 0, 1 and 3
    let r = check_file(&p, &deep()).unwrap();
    let blocks: Vec<_> = r.with_code("batmap-not-full").map(|f| f.block).collect();
    assert_eq!(blocks, vec![Some(1), Some(3)]);

    patch(&p, map_at, &[0x81]); // checksum no longer matches
    let r = check_file(&p, &deep()).unwrap();
    assert_eq!(finding(&r, "batmap-checksum").severity, Severity::Error);
    assert_eq!(r.with_code("batmap-not-full").count(), 0);
}

#[test]
fn a_block_over_the_batmap_is_an_overlap() {
    let d = tempfile::tempdir().unwrap();
    let map_at = 1536 + 1024;
    let p = tap_file(d.path(), map_at);
    set_bat_entry(&p, 4, (map_at / 512) as u32);
    let r = check_file(&p, &CheckOptions::default()).unwrap();
    assert!(
        r.with_code("block-overlap")
            .any(|f| f.message.contains("batmap") && f.message.contains("block 4")),
        "{:#?}",
        r.findings
    );
}

/// Regression: the end of metadata did not include blktap's batmap, so a new block could be
/// allocated over the map when it lies where the first block would go.
#[test]
fn new_blocks_are_not_allocated_over_the_batmap() {
    let d = tempfile::tempdir().unwrap();
    let map_at = 3584; // where create would put the first block's bitmap
    let p = tap_file(d.path(), map_at);
    let mut map = [0u8; 512];
    map[0] = 0x20;
    set_batmap(&p, map_at, &map);
    let before = read(&p)[map_at as usize..map_at as usize + 512].to_vec();
    let mut v = Vhd::open(&p, OpenOptions::writable()).unwrap();
    v.write_at(0, &[9; 512]).unwrap();
    drop(v);
    assert_eq!(
        &read(&p)[map_at as usize..map_at as usize + 512],
        &before[..]
    );
    assert!(u64::from(bat_entry(&p, 0)) * 512 >= map_at + 512);
}

#[test]
fn self_parent_and_chain_findings() {
    let d = tempfile::tempdir().unwrap();
    let base = dynamic(d.path(), "base.vhd");
    let c = child(d.path(), "c.vhd", &base);
    let own = Vhd::open(&c, OpenOptions::read_only()).unwrap().unique_id();

    // Parent time stamp differs: a warning on the link.
    edit_header(&c, |h| h.parent_timestamp = 12345);
    let r = check_chain(&c, &CheckOptions::default(), &ChainOptions::default()).unwrap();
    assert!(!r.has_errors(), "{:#?}", r.findings);
    assert_eq!(finding(&r, "parent-timestamp").severity, Severity::Warning);

    // Missing parent.
    std::fs::rename(&base, d.path().join("moved.vhd")).unwrap();
    let r = check_chain(&c, &CheckOptions::default(), &ChainOptions::default()).unwrap();
    let x = finding(&r, "chain");
    assert!(x.message.contains("not found"), "{}", x.message);
    assert!(x.message.contains("32779"), "{}", x.message);
    std::fs::rename(d.path().join("moved.vhd"), &base).unwrap();

    // The child names itself.
    edit_header(&c, move |h| h.parent_unique_id = own);
    let r = check_file(&c, &CheckOptions::default()).unwrap();
    assert!(finding(&r, "self-parent").message.contains("cycle"));
    let r = check_chain(&c, &CheckOptions::default(), &ChainOptions::default()).unwrap();
    assert!(r.has_errors());
    assert_eq!(codes(&r, Severity::Error), vec!["self-parent", "chain"]);
}

#[test]
fn child_larger_than_parent() {
    let d = tempfile::tempdir().unwrap();
    let base = d.path().join("base.vhd");
    drop(create_dynamic(&base, 2 * SIZE, &opts()).unwrap());
    let c = child(d.path(), "c.vhd", &base);
    let id = Vhd::open(&base, OpenOptions::read_only())
        .unwrap()
        .unique_id();
    // Replace the parent by a smaller disk with the same identity.
    let o = opts().unique_id(Some(id)).overwrite(true);
    drop(create_dynamic(&base, SIZE, &o).unwrap());
    let r = check_chain(&c, &CheckOptions::default(), &ChainOptions::default()).unwrap();
    let x = finding(&r, "child-larger");
    assert_eq!(x.severity, Severity::Warning);
    assert_eq!(x.file, c);
}

/// The metadata of a 2 TiB dynamic disk whose every BAT entry is allocated (a sparse file).
/// The time is measured by hand in release (see the report); here only the result.
#[test]
fn full_bat_of_a_2040_gib_disk() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("big.vhd");
    let bs: u32 = 2 << 20;
    let size = vhd_merge::format::MAX_DYNAMIC_SIZE;
    let o = opts().block_size(bs);
    drop(create_dynamic(&p, size, &o).unwrap());
    let n = write_full_bat(&p, size, bs);
    let r = check_file(&p, &CheckOptions::default()).unwrap();
    assert!(
        !r.has_errors(),
        "{:#?}",
        &r.findings[..r.findings.len().min(5)]
    );
    let v = Vhd::open(&p, OpenOptions::read_only()).unwrap();
    assert_eq!(v.allocated_blocks() as u64, n);
}

/// Point every BAT entry at consecutive blocks after the metadata and move the footer past
/// them, leaving the data a hole. Returns the number of blocks.
pub fn write_full_bat(p: &Path, size: u64, bs: u32) -> u64 {
    let h = header(p);
    let n = size / u64::from(bs);
    let stride = u64::from(bs) + 512;
    let table_end = h.table_offset + (n * 4).div_ceil(512) * 512;
    let first = (table_end + 512).div_ceil(4096) * 4096 - 512;
    let mut table = Vec::with_capacity((n * 4) as usize);
    for i in 0..n {
        table.extend_from_slice(&(((first + i * stride) / 512) as u32).to_be_bytes());
    }
    patch(p, h.table_offset, &table);
    let footer = read(p)[..512].to_vec();
    let end = first + n * stride;
    truncate(p, end);
    patch(p, end, &footer);
    n
}

#[cfg(feature = "cli")]
#[test]
fn cli_exit_status_and_json() {
    use std::process::Command;
    let exe = env!("CARGO_BIN_EXE_vhd-merge");
    let d = tempfile::tempdir().unwrap();
    let p = dynamic(d.path(), "a.vhd");
    let out = Command::new(exe)
        .args(["check", "--deep", "--json"])
        .arg(&p)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(j["ok"], true);
    assert_eq!(j["error_count"], 0);

    patch(&p, 64, &[0; 4]);
    let out = Command::new(exe)
        .args(["check", "--json"])
        .arg(&p)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(j["ok"], false);
    let f = &j["findings"][0];
    assert_eq!(f["severity"], "error");
    assert_eq!(f["code"], "footer-copy-bad");
    assert_eq!(f["offset"], 0);

    let out = Command::new(exe).arg("check").arg(&p).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("error [footer copy at offset 0x0]"), "{text}");
    assert!(text.contains("1 error(s)"), "{text}");

    let out = Command::new(exe)
        .args(["check", "--chain"])
        .arg(d.path().join("missing.vhd"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).starts_with("error 32779"));
}
