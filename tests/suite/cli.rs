//! The `vhd-merge` binary: `info` and `create` (JSON fields, SIZE parsing, overwrite refusal,
//! the error line and exit status).

use crate::common;

use std::path::Path;
use std::process::{Command, Output};

use serde_json::Value;
use vhd_merge::{OpenOptions, Vhd};

fn run(args: &[&str]) -> Option<Output> {
    let bin = common::binary()?;
    Some(Command::new(bin).args(args).output().unwrap())
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// Assert the command failed with exactly one stderr line `error <code> (<name>): ...`.
fn assert_error(out: &Output, code: u32, name: &str) -> String {
    assert!(!out.status.success(), "expected failure");
    // Every parameter error (32773) exits with 2, like clap's usage errors; the rest with 1.
    let status = if code == 32773 { 2 } else { 1 };
    assert_eq!(
        out.status.code(),
        Some(status),
        "exit status (101 would be a panic)"
    );
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(
        err.starts_with(&format!("error {code} ({name}): ")),
        "stderr: {err}"
    );
    assert_eq!(err.lines().count(), 1, "one line: {err}");
    assert!(out.stdout.is_empty(), "nothing on stdout");
    err
}

fn info_json(path: &Path) -> Value {
    let out = run(&["info", "--json", p(path)]).unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("one JSON object")
}

#[test]
fn create_dynamic_and_info_json() {
    if common::binary().is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("d.vhd");
    let before = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let out = run(&["create", "dynamic", p(&f), "--size", "10M"]).unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("created dynamic VHD"));

    let j = info_json(&f);
    let v = Vhd::open(&f, OpenOptions::read_only()).unwrap();
    assert_eq!(j["disk_type"], "dynamic");
    assert_eq!(j["virtual_size"], 10 << 20);
    assert_eq!(j["current_size"], 10 << 20);
    assert_eq!(j["size_source"], "current_size");
    assert_eq!(j["creator_application"], "win ");
    assert_eq!(j["creator_version"], "10.0");
    assert_eq!(j["creator_host_os"], "Wi2k");
    assert_eq!(j["unique_id"], v.unique_id().to_string());
    let ts = j["timestamp"].as_u64().unwrap();
    assert!(ts + 946_684_800 >= before && ts + 946_684_800 <= before + 60);
    let utc = j["timestamp_utc"].as_str().unwrap();
    assert_eq!(utc.len(), 20);
    assert!(utc.ends_with('Z') && utc.as_bytes()[10] == b'T', "{utc}");
    let g = v.footer().geometry;
    assert_eq!(j["geometry"]["cylinders"], g.cylinders);
    assert_eq!(j["geometry"]["heads"], g.heads);
    assert_eq!(j["geometry"]["sectors_per_track"], g.sectors_per_track);
    assert_eq!(j["footer_source"], "end");
    assert_eq!(j["block_size"], 2 << 20);
    assert_eq!(j["max_table_entries"], 5);
    assert_eq!(j["allocated_block_count"], 0);
    assert_eq!(j["parent_unique_id"], Value::Null);
    assert_eq!(j["parent_name"], Value::Null);
    assert_eq!(j["parent_timestamp"], Value::Null);
    assert_eq!(j["parent_locators"], serde_json::json!([]));
    assert_eq!(j["file_size"], std::fs::metadata(&f).unwrap().len());
    assert_eq!(j["warnings"], serde_json::json!([]));

    // Data written through the library shows up as allocated blocks.
    drop(v);
    let mut v = Vhd::open(&f, OpenOptions::writable()).unwrap();
    v.write_at(5 << 20, &[1; 512]).unwrap();
    drop(v);
    assert_eq!(info_json(&f)["allocated_block_count"], 1);
}

#[test]
fn create_fixed_and_block_sizes() {
    if common::binary().is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("f.vhd");
    let out = run(&["create", "fixed", p(&f), "--size", "3MiB"]).unwrap();
    assert!(out.status.success());
    let j = info_json(&f);
    assert_eq!(j["disk_type"], "fixed");
    assert_eq!(j["virtual_size"], 3 << 20);
    assert_eq!(j["block_size"], Value::Null);
    assert_eq!(j["max_table_entries"], Value::Null);
    assert_eq!(j["allocated_block_count"], Value::Null);
    assert_eq!(j["file_size"], (3 << 20) + 512);

    let f2 = dir.path().join("f2.vhd");
    let out = run(&[
        "create",
        "fixed",
        p(&f2),
        "--size",
        "3M",
        "--block-size",
        "2M",
    ])
    .unwrap();
    let err = assert_error(&out, 32773, "Invalid parameter");
    assert!(err.contains("fixed disk has no blocks"), "{err}");
    assert!(!f2.exists());

    for (bs, want) in [("512K", 512 << 10), ("4096", 4096), ("1m", 1 << 20)] {
        let d = dir.path().join(format!("d{bs}.vhd"));
        let out = run(&[
            "create",
            "dynamic",
            p(&d),
            "--size",
            "8M",
            "--block-size",
            bs,
        ])
        .unwrap();
        assert!(out.status.success(), "{bs}");
        assert_eq!(info_json(&d)["block_size"], want, "{bs}");
    }
    for bs in ["3000", "1536", "64M", "8G"] {
        let d = dir.path().join("bad.vhd");
        let out = run(&[
            "create",
            "dynamic",
            p(&d),
            "--size",
            "8M",
            "--block-size",
            bs,
        ])
        .unwrap();
        let err = assert_error(&out, 32773, "Invalid parameter");
        assert!(
            err.contains("block size") || err.contains("--block-size"),
            "{err}"
        );
        assert!(!d.exists(), "{bs}: no file left behind");
    }
}

#[test]
fn size_parsing() {
    if common::binary().is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let good: [(&str, u64); 8] = [
        ("1048576", 1 << 20),
        ("4k", 4096),
        ("3M", 3 << 20),
        ("3mib", 3 << 20),
        ("2G", 2 << 30),
        ("1GiB", 1 << 30),
        ("1t", 1 << 40),
        ("2TiB", 2 << 40),
    ];
    for (i, (text, bytes)) in good.into_iter().enumerate() {
        let f = dir.path().join(format!("g{i}.vhd"));
        // Fixed disks over 2040 GiB are allowed; dynamic ones are not.
        let kind = if bytes > 1 << 40 { "fixed" } else { "dynamic" };
        let out = run(&["create", kind, p(&f), "--size", text]).unwrap();
        assert!(
            out.status.success(),
            "{text}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(info_json(&f)["virtual_size"], bytes, "{text}");
        std::fs::remove_file(&f).unwrap();
    }
    let bad: [(&str, &str); 8] = [
        ("0", "zero"),
        ("0M", "zero"),
        ("1000", "multiple of the 512"),
        ("1.5G", "fractions"),
        ("10MB", "unknown unit"),
        ("abc", "whole number"),
        ("16777216T", "64 bits"),
        ("99999999999999999999", "too large"),
    ];
    for (text, why) in bad {
        let f = dir.path().join("bad.vhd");
        let out = run(&["create", "dynamic", p(&f), "--size", text]).unwrap();
        let err = assert_error(&out, 32773, "Invalid parameter");
        assert!(err.contains("--size") && err.contains(why), "{text}: {err}");
        assert!(!f.exists());
    }
    // Too large for a dynamic disk (the 2040 GiB limit): the library says so.
    let f = dir.path().join("big.vhd");
    let out = run(&["create", "dynamic", p(&f), "--size", "3T"]).unwrap();
    assert_error(&out, 32773, "Invalid parameter");
}

#[test]
fn create_refuses_to_overwrite_without_force() {
    if common::binary().is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("d.vhd");
    assert!(
        run(&["create", "dynamic", p(&f), "--size", "4M"])
            .unwrap()
            .status
            .success()
    );
    let before = std::fs::read(&f).unwrap();
    for kind in [["create", "dynamic"], ["create", "fixed"]] {
        let out = run(&[kind[0], kind[1], p(&f), "--size", "8M"]).unwrap();
        let err = assert_error(&out, 32773, "Invalid parameter");
        assert!(err.contains("already exists"), "{err}");
        assert_eq!(std::fs::read(&f).unwrap(), before, "file untouched");
    }
    // A non-VHD file is protected the same way.
    let txt = dir.path().join("notes.txt");
    std::fs::write(&txt, b"keep me").unwrap();
    let out = run(&["create", "fixed", p(&txt), "--size", "1M"]).unwrap();
    assert_error(&out, 32773, "Invalid parameter");
    assert_eq!(std::fs::read(&txt).unwrap(), b"keep me");

    let out = run(&["create", "dynamic", p(&f), "--size", "8M", "--force"]).unwrap();
    assert!(out.status.success());
    assert_eq!(info_json(&f)["virtual_size"], 8 << 20);
}

#[test]
fn create_differencing() {
    if common::binary().is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let parent = dir.path().join("parent.vhd");
    let child = dir.path().join("child.vhd");
    assert!(
        run(&[
            "create",
            "dynamic",
            p(&parent),
            "--size",
            "6M",
            "--block-size",
            "512K"
        ])
        .unwrap()
        .status
        .success()
    );
    let pj = info_json(&parent);
    let out = run(&["create", "differencing", p(&child), "--parent", p(&parent)]).unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let j = info_json(&child);
    assert_eq!(j["disk_type"], "differencing");
    assert_eq!(j["virtual_size"], 6 << 20);
    assert_eq!(j["parent_unique_id"], pj["unique_id"]);
    assert_eq!(j["parent_name"], "parent.vhd");
    assert!(j["parent_timestamp"].as_u64().unwrap() > 0);
    assert_eq!(
        j["block_size"],
        512 << 10,
        "inherits the parent's block size"
    );
    let locs = j["parent_locators"].as_array().unwrap();
    assert_eq!(locs[0]["platform_code"], "W2ru");
    assert_eq!(locs[0]["path"], ".\\parent.vhd");
    assert_eq!(locs[1]["platform_code"], "W2ku");
    let abs = vhd_merge::locator::absolute(&parent).unwrap();
    assert_eq!(locs[1]["path"], abs.to_str().unwrap());
    if cfg!(unix) {
        assert_eq!(locs[2]["platform_code"], "MacX");
        assert!(locs[2]["path"].as_str().unwrap().starts_with("file:///"));
    }
    for l in locs {
        assert_eq!(l["data_space"], 4096, "Data Space in bytes");
        assert_eq!(l["note"], Value::Null);
    }

    // --block-size overrides; a fixed parent gives the 2 MiB default.
    let c2 = dir.path().join("c2.vhd");
    let out = run(&[
        "create",
        "differencing",
        p(&c2),
        "--parent",
        p(&parent),
        "--block-size",
        "2M",
    ])
    .unwrap();
    assert!(out.status.success());
    assert_eq!(info_json(&c2)["block_size"], 2 << 20);
    let fixed = dir.path().join("fixed.vhd");
    let c3 = dir.path().join("c3.vhd");
    assert!(
        run(&["create", "fixed", p(&fixed), "--size", "2M"])
            .unwrap()
            .status
            .success()
    );
    assert!(
        run(&["create", "differencing", p(&c3), "--parent", p(&fixed)])
            .unwrap()
            .status
            .success()
    );
    assert_eq!(info_json(&c3)["block_size"], 2 << 20);
    // A chain of three: a differencing parent.
    let c4 = dir.path().join("c4.vhd");
    assert!(
        run(&["create", "differencing", p(&c4), "--parent", p(&child)])
            .unwrap()
            .status
            .success()
    );
    assert_eq!(
        info_json(&c4)["parent_unique_id"],
        info_json(&child)["unique_id"]
    );

    // Never over its own parent, even with --force.
    let before = std::fs::read(&parent).unwrap();
    let out = run(&[
        "create",
        "differencing",
        p(&parent),
        "--parent",
        p(&parent),
        "--force",
    ])
    .unwrap();
    assert_error(&out, 32773, "Invalid parameter");
    assert_eq!(std::fs::read(&parent).unwrap(), before);

    // A missing parent.
    let out = run(&[
        "create",
        "differencing",
        p(&dir.path().join("c5.vhd")),
        "--parent",
        p(&dir.path().join("nope.vhd")),
    ])
    .unwrap();
    assert_error(&out, 32779, "File not found");
}

#[test]
fn info_errors() {
    if common::binary().is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.vhd");
    // With --json the same failure also prints the error object (tests/suite/cli_json.rs).
    let err = assert_error(
        &run(&["info", p(&missing)]).unwrap(),
        32779,
        "File not found",
    );
    assert!(err.contains("missing.vhd"), "{err}");

    let mut rng = common::Rng::new(7);
    let mut junk = vec![0u8; 8192];
    rng.fill(&mut junk);
    for (name, bytes) in [
        ("junk.bin", junk),
        ("empty.bin", Vec::new()),
        ("short.bin", vec![0u8; 511]),
        ("zeros.bin", vec![0u8; 4096]),
    ] {
        let f = dir.path().join(name);
        std::fs::write(&f, &bytes).unwrap();
        let err = assert_error(
            &run(&["info", p(&f)]).unwrap(),
            32776,
            "Incorrect data type",
        );
        assert!(err.contains(name), "{err}");
    }
    // A directory is not a VHD file either: an invalid parameter.
    assert_error(
        &run(&["info", p(dir.path())]).unwrap(),
        32773,
        "Invalid parameter",
    );
}

#[test]
fn info_listing_is_aligned() {
    if common::binary().is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let parent = dir.path().join("parent.vhd");
    let child = dir.path().join("child.vhd");
    assert!(
        run(&["create", "dynamic", p(&parent), "--size", "4M"])
            .unwrap()
            .status
            .success()
    );
    assert!(
        run(&["create", "differencing", p(&child), "--parent", p(&parent)])
            .unwrap()
            .status
            .success()
    );
    let out = run(&["info", p(&child)]).unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    // Every value starts in the same column: after the longest key and two spaces.
    let value_column = |l: &str| {
        let gap = l.find("  ").expect("key and value separated by two spaces");
        l.len() - l[gap..].trim_start().len()
    };
    let col: Vec<usize> = lines.iter().map(|l| value_column(l)).collect();
    assert!(col.windows(2).all(|w| w[0] == w[1]), "{text}");
    for key in [
        "disk type",
        "virtual size",
        "unique id",
        "parent unique id",
        "parent name",
        "parent locator 0",
        "block size",
        "BAT",
        "warnings",
    ] {
        assert!(lines.iter().any(|l| l.starts_with(key)), "{key} in {text}");
    }
    assert!(text.contains("differencing"));
    assert!(text.contains(".\\parent.vhd"));
}

/// A locator whose data lies outside the file: `info` shows why there is no path.
#[test]
fn info_explains_an_unreadable_locator() {
    if common::binary().is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let parent = dir.path().join("parent.vhd");
    let child = dir.path().join("child.vhd");
    let opts = vhd_merge::create::CreateOptions::default();
    drop(vhd_merge::create::create_dynamic(&parent, 4 << 20, &opts).unwrap());
    let mut c = vhd_merge::create::create_differencing(&child, &parent, &opts).unwrap();
    let mut h = c.header().unwrap().clone();
    h.locators[0].data_offset = 1 << 40;
    h.locators[1].data_length = 1 << 20;
    h.locators[2].platform_code = vhd_merge::format::PlatformCode::Mac;
    c.rewrite_header(h).unwrap();
    drop(c);
    let j = info_json(&child);
    let locs = j["parent_locators"].as_array().unwrap();
    assert_eq!(locs[0]["path"], Value::Null);
    assert!(
        locs[0]["note"]
            .as_str()
            .unwrap()
            .contains("outside the file")
    );
    assert_eq!(locs[1]["path"], Value::Null);
    assert!(locs[1]["note"].as_str().unwrap().contains("longer than"));
    assert_eq!(locs[2]["platform_code"], "Mac ");
    assert!(locs[2]["note"].as_str().unwrap().contains("alias"));
    let out = run(&["info", p(&child)]).unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("outside the file"));
}

/// Damaged metadata never makes `info` panic: random bytes flipped in the footers, header and
/// BAT of a disk with data and locators give either a listing or the one-line error.
#[test]
fn info_never_panics_on_damaged_files() {
    if common::binary().is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let parent = dir.path().join("parent.vhd");
    let child = dir.path().join("child.vhd");
    let opts = vhd_merge::create::CreateOptions::default();
    drop(vhd_merge::create::create_dynamic(&parent, 8 << 20, &opts).unwrap());
    let mut c = vhd_merge::create::create_differencing(&child, &parent, &opts).unwrap();
    c.write_at(3 << 20, &[3; 4096]).unwrap();
    drop(c);
    let good = std::fs::read(&child).unwrap();
    let n = good.len();
    let mut rng = common::Rng::new(99);
    let victim = dir.path().join("victim.vhd");
    let (mut ok, mut failed) = (0, 0);
    for round in 0..60 {
        let mut bytes = good.clone();
        for _ in 0..1 + rng.below(4) {
            // Footer copy, header, BAT, or end footer.
            let region = match rng.below(4) {
                0 => 0..512,
                1 => 512..1536,
                2 => 1536..2048,
                _ => n - 512..n,
            };
            let at = region.start + rng.below((region.end - region.start) as u64) as usize;
            bytes[at] = rng.next_u64() as u8;
        }
        std::fs::write(&victim, &bytes).unwrap();
        for args in [&["info", "--json"][..], &["info", "--lenient"][..]] {
            let mut a = args.to_vec();
            a.push(p(&victim));
            let out = run(&a).unwrap();
            if out.status.success() {
                ok += 1;
            } else {
                let err = String::from_utf8_lossy(&out.stderr);
                assert_eq!(out.status.code(), Some(1), "round {round}: {err}");
                assert!(err.starts_with("error 3277"), "round {round}: {err}");
                failed += 1;
            }
        }
    }
    assert!(ok > 0 && failed > 0, "{ok} listings, {failed} errors");
}

#[test]
fn usage_errors_use_the_error_line() {
    let Some(out) = run(&["create", "dynamic", "x.vhd"]) else {
        return;
    };
    assert_eq!(out.status.code(), Some(2), "usage errors exit with 2");
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(
        err.starts_with("error 32773 (Invalid parameter): "),
        "stderr: {err}"
    );
    assert!(err.contains("--size"), "names what is missing: {err}");
    let out = run(&["merge", "a.vhd", "--no-such-flag"]).unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(
        err.starts_with("error 32773 (Invalid parameter): "),
        "{err}"
    );
    assert!(err.contains("--no-such-flag"), "{err}");
    // Help and version still succeed.
    let out = run(&["--version"]).unwrap();
    assert!(out.status.success());
    let out = run(&["merge", "--help"]).unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("DESTINATION"));
}

/// Build `base.vhd` (dynamic, 4 MiB, data at 0) and `child.vhd` over it in `dir` with the
/// binary; returns (base, child).
fn cli_chain(dir: &Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let base = dir.join("base.vhd");
    let child = dir.join("child.vhd");
    let mut v = vhd_merge::create::create_dynamic(
        &base,
        4 << 20,
        &vhd_merge::create::CreateOptions::default(),
    )
    .unwrap();
    v.write_at(0, &[0x5A; 8192]).unwrap();
    drop(v);
    let mut c = vhd_merge::create::create_differencing(
        &child,
        &base,
        &vhd_merge::create::CreateOptions::default(),
    )
    .unwrap();
    c.write_at(1 << 20, &[0xA5; 4096]).unwrap();
    drop(c);
    (base, child)
}

/// `flatten --force` onto a hard link of a chain file is refused and changes nothing: the
/// output is compared by file identity, not by path.
#[test]
fn flatten_force_refuses_a_hard_link_to_a_chain_file() {
    if common::binary().is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (base, child) = cli_chain(dir.path());
    let link = dir.path().join("link.vhd");
    std::fs::hard_link(&base, &link).unwrap();
    let before = std::fs::read(&base).unwrap();
    let out = run(&["flatten", p(&child), p(&link), "--force"]).unwrap();
    let err = assert_error(&out, 32773, "Invalid parameter");
    assert!(err.contains("a file of the chain"), "{err}");
    assert_eq!(std::fs::read(&base).unwrap(), before);
}

/// Flip one byte of both footers' checksums: a strict open fails, a lenient one warns.
fn break_footer_checksums(path: &Path) {
    let mut b = std::fs::read(path).unwrap();
    let end = b.len() - 512;
    b[end + 64] ^= 0xFF;
    b[64] ^= 0xFF;
    std::fs::write(path, b).unwrap();
}

fn text(out: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Errors name the options as the command line spells them (`--force`, `--lenient`), and a
/// checksum finding points at `repair`.
#[test]
fn errors_name_the_options_that_exist() {
    if common::binary().is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (base, child) = cli_chain(dir.path());
    let out = run(&["create", "dynamic", p(&base), "--size", "4M"]).unwrap();
    let err = assert_error(&out, 32773, "Invalid parameter");
    assert!(
        err.contains("--force") && !err.contains("overwrite to"),
        "{err}"
    );
    let out = run(&["flatten", p(&child), p(&base)]).unwrap();
    let _ = out; // the base is a chain file: refused for that reason
    let other = dir.path().join("other.vhd");
    std::fs::write(&other, b"x").unwrap();
    let out = run(&["flatten", p(&child), p(&other)]).unwrap();
    let err = assert_error(&out, 32773, "Invalid parameter");
    assert!(
        err.contains("--force") && !err.contains("pass force"),
        "{err}"
    );

    break_footer_checksums(&child);
    let out = run(&["info", p(&child)]).unwrap();
    let err = assert_error(&out, 32776, "Incorrect data type");
    assert!(
        err.contains("--lenient") && !err.contains("leniently to"),
        "{err}"
    );
    let out = run(&["check", p(&child)]).unwrap();
    let (stdout, _) = text(&out);
    assert!(
        stdout.contains("--lenient") && stdout.contains("repair"),
        "{stdout}"
    );
}

/// `merge --lenient` warns about what it accepted, as `flatten --lenient` does.
#[test]
fn merge_lenient_warns() {
    if common::binary().is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (_, child) = cli_chain(dir.path());
    break_footer_checksums(&child);
    let out = run(&["merge", p(&child), "--lenient"]).unwrap();
    let (_, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("warning:") && stderr.contains("checksum mismatch"),
        "{stderr}"
    );
}

/// Wording: the first layer of `chain` is not "found by opened"; one BAT entry is singular.
#[test]
fn chain_and_info_wording() {
    if common::binary().is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (_, child) = cli_chain(dir.path());
    let out = run(&["chain", p(&child)]).unwrap();
    let (stdout, _) = text(&out);
    assert!(!stdout.contains("found by opened"), "{stdout}");
    assert!(
        stdout.contains("layer 1:") && stdout.contains("found by W2ru"),
        "{stdout}"
    );
    let one = dir.path().join("one.vhd");
    assert!(
        run(&["create", "dynamic", p(&one), "--size", "1M"])
            .unwrap()
            .status
            .success()
    );
    let out = run(&["info", p(&one)]).unwrap();
    let (stdout, _) = text(&out);
    assert!(stdout.contains("1 entry at offset"), "{stdout}");
}

/// `flatten --block-size` takes the SIZE syntax `create` takes (one parser).
#[test]
fn flatten_block_size_takes_suffixes() {
    if common::binary().is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (_, child) = cli_chain(dir.path());
    for (arg, want) in [("512K", 512 << 10), ("1MiB", 1 << 20), ("4096", 4096)] {
        let out_file = dir.path().join(format!("flat-{arg}.vhd"));
        let out = run(&["flatten", p(&child), p(&out_file), "--block-size", arg]).unwrap();
        assert!(out.status.success(), "{arg}: {}", text(&out).1);
        assert_eq!(info_json(&out_file)["block_size"], want, "{arg}");
    }
    let out = run(&[
        "flatten",
        p(&child),
        p(&dir.path().join("x.vhd")),
        "--block-size",
        "3K",
    ]);
    assert_error(&out.unwrap(), 32773, "Invalid parameter");
}

/// `merge --relink CHILD` says in its summary that it relinked CHILD.
#[test]
fn merge_summary_names_the_relinked_children() {
    if common::binary().is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (base, child) = cli_chain(dir.path());
    let grandchild = dir.path().join("grandchild.vhd");
    let opts = vhd_merge::create::CreateOptions::default();
    drop(vhd_merge::create::create_differencing(&grandchild, &child, &opts).unwrap());
    let out = run(&["merge", p(&child), "--relink", p(&grandchild)]).unwrap();
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stdout.contains(&format!("relinked to {}: {}", p(&base), p(&grandchild))),
        "{stdout}"
    );
}

/// A destination that does not exist is File not found, not "not a readable VHD".
#[test]
fn merge_into_a_missing_destination_is_file_not_found() {
    if common::binary().is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (_, child) = cli_chain(dir.path());
    let missing = dir.path().join("missing.vhd");
    let out = run(&["merge", p(&child), p(&missing)]).unwrap();
    let err = assert_error(&out, 32779, "File not found");
    assert!(
        err.contains("missing.vhd") && !err.contains("not a readable VHD"),
        "{err}"
    );
}

/// `info` on a damaged file points at `check` and `repair`; with `--lenient` it shows what
/// validation could read (like `check`) and lists the problem instead of failing.
#[test]
fn info_on_a_damaged_file_shows_what_it_can() {
    if common::binary().is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("d.vhd");
    assert!(
        run(&["create", "dynamic", p(&f), "--size", "8M"])
            .unwrap()
            .status
            .success()
    );
    // BAT entry 1 (the BAT is at 1536) points far past the end of the file.
    let mut b = std::fs::read(&f).unwrap();
    b[1536 + 4..1536 + 8].copy_from_slice(&0x7FFF_FF00u32.to_be_bytes());
    std::fs::write(&f, &b).unwrap();

    let err = assert_error(
        &run(&["info", p(&f)]).unwrap(),
        32776,
        "Incorrect data type",
    );
    assert!(
        err.contains("vhd-merge check") && err.contains("vhd-merge repair"),
        "{err}"
    );
    assert!(err.contains("--lenient"), "{err}");

    let out = run(&["info", "--lenient", p(&f)]).unwrap();
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stdout.contains("virtual size") && stdout.contains("8 MiB"),
        "{stdout}"
    );
    assert!(
        stdout.contains("problem") && stdout.contains("BAT entry 1"),
        "{stdout}"
    );
    assert!(stdout.contains("vhd-merge repair"), "{stdout}");
    let out = run(&["info", "--lenient", "--json", p(&f)]).unwrap();
    let j: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(j["virtual_size"], 8 << 20);
    assert_eq!(j["problems"][0]["code"], "bat-entry-outside");

    // Not readable at all: what can be said on stdout, the error line on stderr.
    b[512..520].fill(0);
    std::fs::write(&f, &b).unwrap();
    let out = run(&["info", "--lenient", p(&f)]).unwrap();
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr.starts_with("error 32776"), "{stderr}");
    assert!(
        stdout.contains("problem") && stdout.contains("dynamic header"),
        "{stdout}"
    );
}

/// Run `args` under a pseudo-terminal 80 columns wide (util-linux `script`), returning what
/// the terminal got; `None` when `script` is not there.
fn on_80_column_tty(args: &[&str]) -> Option<String> {
    let bin = common::binary()?;
    let quoted: Vec<String> = std::iter::once(p(&bin).to_string())
        .chain(args.iter().map(|a| a.to_string()))
        .map(|a| format!("'{}'", a.replace('\'', r"'\''")))
        .collect();
    let cmd = format!("stty cols 80 rows 24; {}", quoted.join(" "));
    let out = Command::new("script")
        .args(["-qfec", &cmd, "/dev/null"])
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The progress bars of merge and flatten (one style) never draw a line wider than an
/// 80-column terminal, and are cleared before the final message.
#[cfg_attr(
    not(target_os = "linux"),
    ignore = "runs the binary under a pseudo-terminal (util-linux script)"
)]
#[test]
fn progress_lines_fit_80_columns_and_are_cleared() {
    if common::binary().is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.vhd");
    let child = dir.path().join("child.vhd");
    let opts = vhd_merge::create::CreateOptions::default();
    let mut v = vhd_merge::create::create_dynamic(&base, 1 << 30, &opts).unwrap();
    v.write_at(0, &vec![1u8; 8 << 20]).unwrap();
    drop(v);
    let mut c = vhd_merge::create::create_differencing(&child, &base, &opts).unwrap();
    for i in 0..64u64 {
        c.write_at(i * (16 << 20), &vec![2u8; 1 << 20]).unwrap();
    }
    drop(c);
    let flat = dir.path().join("flat.vhd");
    for args in [
        vec!["flatten", p(&child), p(&flat)],
        vec!["merge", p(&child)],
    ] {
        let Some(screen) = on_80_column_tty(&args) else {
            common::note("`script` is not available: progress width not checked");
            return;
        };
        let verb = if args[0] == "merge" {
            "merging"
        } else {
            "flattening"
        };
        assert!(screen.contains(verb), "no bar drawn: {screen:?}");
        // Frames are separated by CR and erase-line; strip the escapes and measure each.
        let plain = screen.replace("\x1b[2K", "").replace("\x1b[1A", "\n");
        for line in plain.split(['\r', '\n']).filter(|l| l.contains(verb)) {
            assert!(
                line.chars().count() <= 80,
                "{} columns: {line:?}",
                line.chars().count()
            );
        }
        // The last frame is erased before the final message.
        let last_frame = screen.rfind(verb).unwrap();
        let rest = &screen[last_frame..];
        assert!(rest.contains("\r\x1b[2K"), "bar not cleared: {rest:?}");
        let after = &rest[rest.find("\r\x1b[2K").unwrap() + 5..];
        assert!(!after.contains('['), "bar left behind: {after:?}");
    }
}

/// Ctrl-C during a merge (under a pseudo-terminal): the bar is erased for good and the only
/// numbers left on the screen are the final message's.
#[cfg_attr(
    not(target_os = "linux"),
    ignore = "runs the binary under a pseudo-terminal (util-linux script)"
)]
#[test]
fn ctrl_c_clears_the_bar_before_the_message() {
    use std::io::{Read as _, Write as _};
    let Some(bin) = common::binary() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.vhd");
    let child = dir.path().join("child.vhd");
    let opts = vhd_merge::create::CreateOptions::default();
    drop(vhd_merge::create::create_dynamic(&base, 4 << 30, &opts).unwrap());
    let mut c = vhd_merge::create::create_differencing(&child, &base, &opts).unwrap();
    let chunk = vec![7u8; 2 << 20];
    for i in 0..384u64 {
        c.write_at(i * (4 << 20), &chunk).unwrap();
    }
    drop(c);
    let cmd = format!("stty cols 80 rows 24; '{}' merge '{}'", p(&bin), p(&child));
    let Ok(mut script) = Command::new("script")
        .args(["-qfec", &cmd, "/dev/null"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
    else {
        common::note("`script` is not available: Ctrl-C not checked");
        return;
    };
    let mut stdout = script.stdout.take().unwrap();
    let mut screen = Vec::new();
    let mut buf = [0u8; 4096];
    let mut sent = false;
    loop {
        let n = stdout.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        screen.extend_from_slice(&buf[..n]);
        if !sent && String::from_utf8_lossy(&screen).contains("merging") {
            // Ctrl-C as typed: the terminal sends SIGINT to the merge.
            script.stdin.as_mut().unwrap().write_all(b"\x03").unwrap();
            sent = true;
        }
    }
    script.wait().unwrap();
    let screen = String::from_utf8_lossy(&screen).into_owned();
    if !screen.contains("stopped after") {
        common::note("the merge finished before Ctrl-C arrived: not checked");
        return;
    }
    let message = screen
        .rfind("error 32768")
        .expect("the cancellation message");
    let bar_end = screen[..message]
        .rfind("\r\x1b[2K")
        .expect("the bar erased");
    let between = &screen[bar_end + 5..message];
    assert!(
        !between.contains("merging"),
        "bar redrawn after it was cleared: {between:?}"
    );
    assert!(
        !screen[message..].contains("merging"),
        "bar after the message"
    );
}

/// `--size 1.5G` is a parameter error: exit status 2, like an unknown flag (it was 1).
#[test]
fn parameter_errors_exit_2() {
    let Some(out) = run(&["create", "dynamic", "never.vhd", "--size", "1.5G"]) else {
        return;
    };
    assert_eq!(out.status.code(), Some(2), "{}", text(&out).1);
    assert!(
        text(&out)
            .1
            .starts_with("error 32773 (Invalid parameter): --size")
    );
    assert!(!Path::new("never.vhd").exists());
    let out = run(&["-q", "-v", "info", "x.vhd"]).unwrap();
    assert_eq!(out.status.code(), Some(2), "-q and -v conflict");
    // A file that is not there is not a parameter error.
    let out = run(&["info", "/nonexistent/x.vhd"]).unwrap();
    assert_eq!(out.status.code(), Some(1));
}

/// `completions SHELL` prints a script for each shell that names every verb.
#[test]
fn completions_for_every_shell() {
    if common::binary().is_none() {
        return;
    }
    let verbs = [
        "merge",
        "flatten",
        "set-parent",
        "repair",
        "check",
        "chain",
        "info",
    ];
    for (shell, marker) in [
        ("bash", "complete -F"),
        ("zsh", "#compdef vhd-merge"),
        ("fish", "complete -c vhd-merge"),
        ("powershell", "Register-ArgumentCompleter"),
    ] {
        let out = run(&["completions", shell]).unwrap();
        let (stdout, stderr) = text(&out);
        assert!(out.status.success(), "{shell}: {stderr}");
        assert!(stdout.contains(marker), "{shell}: no {marker:?}");
        for v in verbs {
            assert!(stdout.contains(v), "{shell}: {v} missing");
        }
        // fish spells long options `-l remove-merged`.
        assert!(stdout.contains("remove-merged"), "{shell}: merge options");
    }
    if Command::new("bash").arg("--version").output().is_ok() {
        let out = run(&["completions", "bash"]).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("c.bash");
        std::fs::write(&f, &out.stdout).unwrap();
        let syntax = Command::new("bash").arg("-n").arg(&f).output().unwrap();
        assert!(syntax.status.success(), "bash -n: {:?}", syntax);
    }
}

/// `man` prints a roff page that lists every verb and the exit statuses.
#[test]
fn man_page_lists_every_verb() {
    let Some(out) = run(&["man"]) else {
        return;
    };
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    assert!(stdout.contains(".TH vhd-merge 1"), "{stdout}");
    for v in [
        "info",
        "create",
        "chain",
        "set-parent",
        "flatten",
        "merge",
        "check",
        "repair",
        "completions",
    ] {
        // roff escapes the hyphen; each verb is a line of the SUBCOMMANDS section.
        let roff = v.replace('-', "\\-");
        assert!(
            stdout.contains(&format!("vhd\\-merge\\-{roff}(1)")),
            "{v}: {stdout}"
        );
    }
    assert!(stdout.contains("Exit status"), "exit statuses");
}

/// Every verb's long help ends with an example of it.
#[test]
fn long_help_has_an_example_per_verb() {
    if common::binary().is_none() {
        return;
    }
    for v in [
        "info",
        "create",
        "chain",
        "set-parent",
        "flatten",
        "merge",
        "check",
        "repair",
        "completions",
        "man",
    ] {
        let out = run(&[v, "--help"]).unwrap();
        let (stdout, _) = text(&out);
        assert!(out.status.success(), "{v}");
        assert!(
            stdout.contains("Example") && stdout.contains(&format!("vhd-merge {v} ")),
            "{v}: {stdout}"
        );
    }
}

/// `-q` silences the summary of a command that succeeded (and its progress bar), but not
/// errors; `-v` adds the merge plan.
#[test]
fn quiet_and_verbose() {
    if common::binary().is_none() {
        return;
    }
    let _serial = common::serial();
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("q.vhd");
    let out = run(&["-q", "create", "dynamic", p(&f), "--size", "4M"]).unwrap();
    assert!(out.status.success());
    assert!(
        out.stdout.is_empty() && out.stderr.is_empty(),
        "{:?}",
        text(&out)
    );
    let out = run(&["check", p(&f), "--quiet"]).unwrap();
    assert!(
        out.status.success() && out.stdout.is_empty(),
        "{:?}",
        text(&out)
    );
    let (_, child) = cli_chain(dir.path());
    let flat = dir.path().join("flat.vhd");
    let out = run(&["flatten", p(&child), p(&flat), "-q"]).unwrap();
    assert!(
        out.status.success() && out.stdout.is_empty(),
        "{:?}",
        text(&out)
    );
    assert!(flat.exists());
    let out = run(&["-v", "merge", p(&child)]).unwrap();
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stdout.contains("merge into") && stdout.contains("merged "),
        "{stdout}"
    );
    // Errors still show under -q.
    let out = run(&["-q", "create", "dynamic", p(&f), "--size", "4M"]).unwrap();
    assert_error(&out, 32773, "Invalid parameter");
}

/// A VHDX reads through the format-agnostic commands (chain, flatten) with the virtual SHA-256
/// PROVENANCE.md gives (info, check, repair and create of VHDX: see the tests below).
#[test]
fn vhdx_files_work_in_chain_and_flatten() {
    let Some((vhdx, _)) = common::fixtures::vhdx_fixture("dfvfs/ext2.vhdx") else {
        return;
    };
    let Some(out) = run(&["chain", p(&vhdx)]) else {
        return;
    };
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("ext2.raw");
    let Some(out) = run(&["flatten", p(&vhdx), p(&raw), "--format", "raw"]) else {
        return;
    };
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        common::sha256_file(&raw),
        "a6c2f0e39afe6c6ab432ca5465349fcefe8dc944398e97b2d957d3f89dbb5d80"
    );
}

// ---- VHDX: info, check, repair, create ---------------------------------------------------

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).to_string()
}

/// A writable copy of the VHDX fixture `rel` in `dir`.
fn vhdx_copy(rel: &str, dir: &Path) -> Option<std::path::PathBuf> {
    let (src, _) = common::fixtures::vhdx_fixture(rel)?;
    let dest = dir.join(Path::new(rel).file_name().unwrap());
    std::fs::copy(&src, &dest).unwrap();
    Some(dest)
}

#[test]
fn info_lists_a_real_differencing_vhdx() {
    let Some((f, _)) = common::fixtures::vhdx_fixture("dfvfs/ntfs-differential.vhdx") else {
        return;
    };
    let Some(out) = run(&["info", p(&f)]) else {
        return;
    };
    assert!(out.status.success());
    let text = stdout(&out);
    for want in [
        "disk type                      differencing",
        "header 2                       sequence 11, current",
        "log                            clean",
        "blocks                         partially_present 2",
        "parent relative_path           .\\ntfs-parent.vhdx",
        "metadata Parent Locator        680 bytes at 65576 [required]",
    ] {
        assert!(text.contains(want), "{want:?} in\n{text}");
    }
    let j = info_json(&f);
    assert_eq!(j["format"], "vhdx");
    assert_eq!(j["current_header"], 2);
    assert_eq!(j["headers"][0]["sequence_number"], 10);
    assert_eq!(j["virtual_size"], 4 << 20);
    assert_eq!(j["block_size"], 2 << 20);
    assert_eq!(
        (
            j["logical_sector_size"].clone(),
            j["physical_sector_size"].clone()
        ),
        (512.into(), 4096.into())
    );
    assert_eq!(j["blocks"]["partially_present"], 2);
    assert_eq!(j["sector_bitmap_blocks"], 1);
    assert_eq!(j["regions"].as_array().unwrap().len(), 2);
    assert_eq!(j["metadata_items"].as_array().unwrap().len(), 6);
    let keys: Vec<&str> = j["parent_locator"]["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["key"].as_str().unwrap())
        .collect();
    assert_eq!(keys.len(), 5, "{keys:?}");
    assert!(keys.contains(&"parent_linkage"));
}

#[test]
fn info_check_and_repair_of_a_dirty_log() {
    let dir = tempfile::tempdir().unwrap();
    let Some(f) = vhdx_copy("discutils/vhdx-log-replay.vhdx", dir.path()) else {
        return;
    };
    let Some(_) = common::binary() else { return };
    let j = info_json(&f);
    assert_eq!(j["log"]["state"], "dirty");
    assert_eq!(j["log"]["entries"], 2);
    assert_eq!(
        j["blocks"]["fully_present"], 1,
        "read after the in-memory replay"
    );
    let out = run(&["check", p(&f)]).unwrap();
    assert_eq!(out.status.code(), Some(0), "a dirty log is a warning");
    assert!(
        stdout(&out).contains("0 error(s), 1 warning(s)"),
        "{}",
        stdout(&out)
    );
    let before = std::fs::read(&f).unwrap();
    let out = run(&["repair", "--dry-run", p(&f)]).unwrap();
    assert_eq!(out.status.code(), Some(0));
    assert!(stdout(&out).contains("would write log"), "{}", stdout(&out));
    assert_eq!(std::fs::read(&f).unwrap(), before);
    let out = run(&["repair", "--json", p(&f)]).unwrap();
    assert_eq!(out.status.code(), Some(0));
    let r: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        (r["wrote"].clone(), r["actions"][0]["structure"].clone()),
        (true.into(), "log".into())
    );
    assert_eq!(info_json(&f)["log"]["state"], "clean");
    let out = run(&["check", "--json", p(&f)]).unwrap();
    let c: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        (c["error_count"].clone(), c["warning_count"].clone()),
        (0.into(), 0.into())
    );
}

#[test]
fn damaged_vhdx_gives_the_right_codes() {
    let dir = tempfile::tempdir().unwrap();
    let Some(f) = vhdx_copy("dfvfs/ext2.vhdx", dir.path()) else {
        return;
    };
    let Some(_) = common::binary() else { return };
    // Both headers damaged: nothing can be read.
    let mut b = std::fs::read(&f).unwrap();
    b[(64 << 10) + 8] ^= 1;
    b[(128 << 10) + 8] ^= 1;
    std::fs::write(&f, &b).unwrap();
    let err = assert_error(
        &run(&["info", p(&f)]).unwrap(),
        32776,
        "Incorrect data type",
    );
    assert!(err.contains("vhd-merge check"), "{err}");
    let out = run(&["check", p(&f)]).unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stdout(&out).contains("error [header 1 at offset 0x10000]"),
        "{}",
        stdout(&out)
    );
    let out = run(&["info", "--lenient", "--json", p(&f)]).unwrap();
    assert_eq!(out.status.code(), Some(1));
    let j: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(j["problems"][0]["code"], "header-bad");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.starts_with("error 32776 (Incorrect data type)"),
        "{err}"
    );
    let out = run(&["repair", p(&f)]).unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).starts_with("error 32776"));
}

#[test]
fn info_lenient_lists_problems_of_a_readable_vhdx() {
    let dir = tempfile::tempdir().unwrap();
    let Some(f) = vhdx_copy("dfvfs/ntfs-fixed.vhdx", dir.path()) else {
        return;
    };
    let Some(_) = common::binary() else { return };
    let mut b = std::fs::read(&f).unwrap();
    b[(3 << 20) + 3] |= 0x07; // block 0: reserved state 4..7 -> 7 bits; set state 4
    b[3 << 20] = (b[3 << 20] & !7) | 4;
    std::fs::write(&f, &b).unwrap();
    assert_error(
        &run(&["info", p(&f)]).unwrap(),
        32776,
        "Incorrect data type",
    );
    let out = run(&["info", "--lenient", p(&f)]).unwrap();
    assert!(out.status.success());
    let text = stdout(&out);
    assert!(
        text.contains("problem") && text.contains("reserved payload block state 4"),
        "{text}"
    );
    assert!(text.contains("see"), "{text}");
}

#[test]
fn create_vhdx_by_extension_and_format() {
    let dir = tempfile::tempdir().unwrap();
    let d = |n: &str| dir.path().join(n);
    let Some(out) = run(&["create", "dynamic", p(&d("a.vhdx")), "--size", "64M"]) else {
        return;
    };
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout(&out).starts_with("created dynamic VHDX"),
        "{}",
        stdout(&out)
    );
    let j = info_json(&d("a.vhdx"));
    assert_eq!(
        (j["disk_type"].clone(), j["block_size"].clone()),
        ("dynamic".into(), (32 << 20).into())
    );
    let ok = |args: &[&str]| {
        let out = run(args).unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    ok(&[
        "create",
        "fixed",
        p(&d("f")),
        "--format",
        "vhdx",
        "--size",
        "8M",
        "--sector-size",
        "4096",
        "--block-size",
        "4M",
    ]);
    let j = info_json(&d("f"));
    assert_eq!(j["disk_type"], "fixed");
    assert_eq!(
        (j["logical_sector_size"].clone(), j["block_size"].clone()),
        (4096.into(), (4 << 20).into())
    );
    ok(&[
        "create",
        "differencing",
        p(&d("c.avhdx")),
        "--parent",
        p(&d("f")),
    ]);
    let j = info_json(&d("c.avhdx"));
    assert_eq!(j["disk_type"], "differencing");
    assert_eq!(
        (j["logical_sector_size"].clone(), j["block_size"].clone()),
        (4096.into(), (2 << 20).into())
    );
    assert_eq!(j["virtual_size"], 8 << 20);
    let out = run(&["check", p(&d("c.avhdx"))]).unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stdout(&out));
    // A .vhd stays VHD.
    ok(&["create", "dynamic", p(&d("v.vhd")), "--size", "8M"]);
    assert_eq!(info_json(&d("v.vhd"))["disk_type"], "dynamic");
    assert!(info_json(&d("v.vhd"))["format"].is_null());
}

#[test]
fn create_vhdx_refuses_bad_parameters() {
    let dir = tempfile::tempdir().unwrap();
    let d = |n: &str| p(&dir.path().join(n)).to_string();
    // `{x}`: the file to make (never made); `{v}`, `{a}`: an existing VHD and VHDX.
    let args = |t: &str| -> Vec<String> {
        t.split_whitespace()
            .map(|w| {
                w.replace("{x}", &d("x"))
                    .replace("{v}", &d("v.vhd"))
                    .replace("{a}", &d("a.vhdx"))
            })
            .collect()
    };
    for t in [
        "create dynamic {v} --size 8M",
        "create dynamic {a} --size 8M",
    ] {
        let a = args(t);
        let Some(out) = run(&a.iter().map(String::as_str).collect::<Vec<_>>()) else {
            return;
        };
        assert!(out.status.success(), "{t}");
    }
    for (t, what) in [
        (
            "create dynamic {x}.vhdx --size 8M --block-size 512K",
            "block size",
        ),
        (
            "create dynamic {x}.vhdx --size 8M --block-size 512M",
            "block size",
        ),
        (
            "create dynamic {x}.vhdx --size 8M --sector-size 1024",
            "sector size",
        ),
        (
            "create dynamic {x}.vhdx --size 5120 --sector-size 4096",
            "multiple of 4096",
        ),
        ("create dynamic {x}.vhdx --size 65T", "64 TiB"),
        (
            "create dynamic {x}.vhd --size 8M --sector-size 4096",
            "VHDX",
        ),
        (
            "create differencing {x}.vhdx --parent {v}",
            "mixes no formats",
        ),
        (
            "create differencing {x}.vhd --parent {a}",
            "mixes no formats",
        ),
        (
            "create differencing {x}.avhdx --parent {a} --sector-size 4096",
            "parent's",
        ),
        (
            "create fixed {x} --format vhdx --size 8M --block-size 3M",
            "block size",
        ),
        ("create dynamic {a} --size 8M", "exists"),
    ] {
        let a = args(t);
        let out = run(&a.iter().map(String::as_str).collect::<Vec<_>>()).unwrap();
        let err = assert_error(&out, 32773, "Invalid parameter");
        assert!(err.contains(what), "{t}: {err}");
        for ext in ["", ".vhd", ".vhdx", ".avhdx"] {
            assert!(!dir.path().join(format!("x{ext}")).exists(), "{t}");
        }
    }
}
