//! The `--json` contract (docs/json.md): every verb prints exactly one JSON object on stdout,
//! on success and on failure, with `schema_version`, the shared field names, and the top-level
//! fields docs/json.md shows for it.

use crate::common;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use serde_json::Value;

/// The schema version the CLI prints and docs/json.md documents.
const SCHEMA_VERSION: u64 = 1;

/// Run the binary; its exit status and the one JSON object on stdout (any trailing text fails
/// the parse). None when the binary is not built.
fn json_run(args: &[&str]) -> Option<(Option<i32>, Value)> {
    let out = Command::new(common::binary()?).args(args).output().unwrap();
    let v: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "{args:?}: not one JSON object ({e}): {}\nstderr: {}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    assert_eq!(v["schema_version"], SCHEMA_VERSION, "{args:?}: {v}");
    assert_vocabulary(&v, &format!("{args:?}"));
    Some((out.status.code(), v))
}

/// The shared names, everywhere in the object: no `file`/`files` (a file is a `path`), `path`
/// and `*_path` are strings (or null), `warnings` is a list of strings, `*_count` a number.
fn assert_vocabulary(v: &Value, at: &str) {
    match v {
        Value::Object(m) => {
            for (k, x) in m {
                let here = format!("{at}.{k}");
                assert!(k != "file" && k != "files", "{here}: use path/paths");
                if k == "path" || k.ends_with("_path") {
                    assert!(x.is_string() || x.is_null(), "{here}: {x}");
                }
                if k == "warnings" {
                    let list = x.as_array().unwrap_or_else(|| panic!("{here}: {x}"));
                    assert!(list.iter().all(Value::is_string), "{here}: {x}");
                }
                if k.ends_with("_count") {
                    assert!(x.is_u64() || x.is_null(), "{here}: {x}");
                }
                assert_vocabulary(x, &here);
            }
        }
        Value::Array(a) => a.iter().for_each(|x| assert_vocabulary(x, at)),
        _ => {}
    }
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Every verb's success output, by the verb's heading in docs/json.md.
fn successes(dir: &Path) -> Option<BTreeMap<&'static str, Value>> {
    let (base, child, flat) = (
        dir.join("base.vhd"),
        dir.join("child.vhd"),
        dir.join("flat.vhd"),
    );
    let runs: [(&str, Vec<&str>, &Path); 10] = [
        (
            "create",
            vec!["create", "dynamic", s(&base), "--size", "8M"],
            &base,
        ),
        (
            "create differencing",
            vec!["create", "differencing", s(&child), "--parent", s(&base)],
            &child,
        ),
        ("info", vec!["info", s(&child)], &child),
        ("chain", vec!["chain", s(&child)], &child),
        ("check", vec!["check", "--chain", s(&child)], &child),
        ("repair", vec!["repair", "--dry-run", s(&child)], &child),
        (
            "set-parent",
            vec!["set-parent", s(&child), s(&base)],
            &child,
        ),
        ("flatten", vec!["flatten", s(&child), s(&flat)], &child),
        (
            "merge --dry-run",
            vec!["merge", "--dry-run", s(&child)],
            &child,
        ),
        ("merge", vec!["merge", s(&child)], &child),
    ];
    let mut out = BTreeMap::new();
    for (name, mut args, path) in runs {
        args.push("--json");
        let (status, v) = json_run(&args)?;
        assert_eq!(status, Some(0), "{name}: {v}");
        assert!(v.get("error").is_none(), "{name}: {v}");
        assert_eq!(v["path"], s(path), "{name}: the file it acted on is `path`");
        out.insert(name, v);
    }
    Some(out)
}

#[test]
fn every_verb_prints_one_object_on_success() {
    let dir = tempfile::tempdir().unwrap();
    let Some(v) = successes(dir.path()) else {
        return;
    };
    // The same things under the same names across verbs.
    let parent_id = &v["create"]["unique_id"];
    assert_eq!(&v["create differencing"]["parent_unique_id"], parent_id);
    assert_eq!(&v["info"]["parent_unique_id"], parent_id);
    assert_eq!(&v["chain"]["layers"][1]["unique_id"], parent_id);
    assert_eq!(v["chain"]["layer_count"], 2);
    assert_eq!(v["check"]["error_count"], 0);
    assert_eq!(v["check"]["paths"].as_array().map(Vec::len), Some(2));
    assert_eq!(v["set-parent"]["parent_unique_id"], *parent_id);
    assert_eq!(v["set-parent"]["parent_path"], v["create"]["path"]);
    assert_eq!(v["flatten"]["layer_count"], 2);
    assert_eq!(v["merge"]["destination_path"], v["create"]["path"]);
    assert_eq!(
        v["merge --dry-run"]["plan"]["destination_path"],
        v["create"]["path"]
    );
    for name in ["create", "info", "chain", "flatten"] {
        let size = v[name]
            .get("virtual_size")
            .or_else(|| v[name]["layers"][0].get("virtual_size"));
        assert_eq!(size, Some(&Value::from(8u64 << 20)), "{name}");
    }
}

/// Every verb fails on a missing file with the one error shape: exit status 1,
/// `{"schema_version", "error": {"return_code": 32779, "name": "File not found", "message"}}`.
#[test]
fn every_verb_prints_one_object_on_failure() {
    let dir = tempfile::tempdir().unwrap();
    let gone = dir.path().join("gone.vhd");
    let other = dir.path().join("other.vhd");
    let (g, o) = (s(&gone), s(&other));
    let runs: [Vec<&str>; 9] = [
        vec!["create", "differencing", o, "--parent", g],
        vec!["info", g],
        vec!["info", "--lenient", g],
        vec!["chain", g],
        vec!["check", g],
        vec!["repair", g],
        vec!["set-parent", g, o],
        vec!["flatten", g, o],
        vec!["merge", g],
    ];
    for mut args in runs {
        args.push("--json");
        let Some((status, v)) = json_run(&args) else {
            return;
        };
        assert_eq!(status, Some(1), "{args:?}: {v}");
        let e = &v["error"];
        assert_eq!(e["return_code"], 32779, "{args:?}: {v}");
        assert_eq!(e["name"], "File not found", "{args:?}: {v}");
        assert!(
            e["message"].as_str().is_some_and(|m| m.contains(g)),
            "{args:?}: {v}"
        );
    }
}

/// A parameter error keeps its exit status (2) and has the same shape.
#[test]
fn a_parameter_error_has_the_error_shape_and_exit_status_2() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("a.vhd");
    let args = ["create", "dynamic", s(&f), "--size", "1.5Q", "--json"];
    let Some((status, v)) = json_run(&args) else {
        return;
    };
    assert_eq!(status, Some(2), "{v}");
    assert_eq!(v["error"]["return_code"], 32773);
    assert_eq!(v["error"]["name"], "Invalid parameter");
    // A usage error clap finds (an unknown option) too.
    let Some((status, v)) = json_run(&["chain", s(&f), "--no-such-option", "--json"]) else {
        return;
    };
    assert_eq!(status, Some(2), "{v}");
    assert_eq!(v["error"]["return_code"], 32773, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("--no-such-option")),
        "{v}"
    );
}

/// docs/json.md: one ```json example under each "## `verb`" heading.
fn documented() -> BTreeMap<String, Value> {
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/json.md"))
        .expect("docs/json.md");
    let mut out = BTreeMap::new();
    let mut lines = doc.lines();
    while let Some(l) = lines.next() {
        let Some(name) = l.strip_prefix("## `").and_then(|r| r.strip_suffix('`')) else {
            continue;
        };
        lines.find(|l| l.trim() == "```json");
        let block: Vec<&str> = lines.by_ref().take_while(|l| l.trim() != "```").collect();
        let v: Value = serde_json::from_str(&block.join("\n"))
            .unwrap_or_else(|e| panic!("docs/json.md, {name}: {e}"));
        out.insert(name.to_string(), v);
    }
    out
}

fn keys(v: &Value) -> Vec<&String> {
    v.as_object()
        .map(|m| m.keys().collect())
        .unwrap_or_default()
}

/// The document and the program agree: every verb has an example, with exactly the top-level
/// fields the program prints, and the error example has the fields of a real failure.
#[test]
fn docs_json_md_matches_the_output() {
    let doc = documented();
    let dir = tempfile::tempdir().unwrap();
    let Some(real) = successes(dir.path()) else {
        return;
    };
    for (name, v) in &real {
        let d = doc
            .get(*name)
            .unwrap_or_else(|| panic!("docs/json.md has no ## `{name}`"));
        assert_eq!(keys(d), keys(v), "docs/json.md, {name}");
        assert_vocabulary(d, name);
    }
    let gone = dir.path().join("gone.vhd");
    let Some((_, failure)) = json_run(&["chain", s(&gone), "--json"]) else {
        return;
    };
    let d = &doc["error"];
    assert_eq!(keys(d), keys(&failure), "docs/json.md, error");
    assert_eq!(
        keys(&d["error"]),
        keys(&failure["error"]),
        "docs/json.md, error"
    );
}

/// The `--progress json` lines of `args` on stderr (every stderr line must be one), each
/// checked for the documented fields.
fn progress_lines(args: &[&str]) -> Option<Vec<Value>> {
    let out = Command::new(common::binary()?).args(args).output().unwrap();
    assert!(out.status.success(), "{args:?}: {out:?}");
    let lines: Vec<Value> = String::from_utf8_lossy(&out.stderr)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l:?}: {e}")))
        .collect();
    for l in &lines {
        assert_eq!(l["schema_version"], SCHEMA_VERSION, "{l}");
        assert!(l["state"].is_string(), "{l}");
        let (done, total) = (l["bytes_done"].as_u64(), l["bytes_total"].as_u64());
        assert!(done.is_some() && total.is_some(), "{l}");
        assert!(l["percent"].as_u64().is_some_and(|p| p <= 100), "{l}");
    }
    Some(lines)
}

/// `--progress json` for merge and flatten: bytes done never go back, the last line is
/// Completed at 100 percent with all the bytes to copy, one line per whole percent at most.
#[test]
fn progress_json_lines_for_merge_and_flatten() {
    let dir = tempfile::tempdir().unwrap();
    let (base, child) = (dir.path().join("b.vhd"), dir.path().join("c.vhd"));
    let flat = dir.path().join("f.vhd");
    let runs: [Vec<&str>; 2] = [
        vec!["create", "dynamic", s(&base), "--size", "16M", "-q"],
        vec![
            "create",
            "differencing",
            s(&child),
            "--parent",
            s(&base),
            "-q",
        ],
    ];
    for args in runs {
        if json_run(&[&args[..], &["--json"]].concat()).is_none() {
            return;
        }
    }
    let mut v = vhd_merge::Vhd::open(&child, vhd_merge::OpenOptions::writable()).unwrap();
    let data = vec![0x5a_u8; 6 << 20];
    v.write_at(1 << 20, &data).unwrap();
    drop(v);
    let flatten = ["flatten", s(&child), s(&flat), "--progress", "json"];
    let merge = ["merge", s(&child), "--progress", "json"];
    for args in [&flatten[..], &merge[..]] {
        let lines = progress_lines(args).unwrap();
        let last = lines.last().unwrap_or_else(|| panic!("{args:?}: no lines"));
        assert_eq!(last["state"], "Completed", "{args:?}");
        assert_eq!(last["percent"], 100, "{args:?}");
        assert_eq!(last["bytes_done"], last["bytes_total"], "{args:?}");
        assert!(
            last["bytes_done"].as_u64() >= Some(6 << 20),
            "{args:?}: {last}"
        );
        let done: Vec<u64> = lines
            .iter()
            .filter_map(|l| l["bytes_done"].as_u64())
            .collect();
        assert!(done.windows(2).all(|w| w[0] <= w[1]), "{args:?}: {done:?}");
        assert!(lines.len() <= 101 + 4, "{args:?}: {} lines", lines.len());
    }
}

/// The library's report, serialized, with the `schema_version` the CLI adds.
#[cfg(feature = "serde")]
fn with_schema<T: serde::Serialize>(report: T) -> Value {
    let mut v = serde_json::to_value(report).unwrap();
    v["schema_version"] = SCHEMA_VERSION.into();
    v
}

/// `info`, `chain`, `create` and `repair --json` print exactly the library's typed reports
/// (docs/json.md): what a program linking the crate gets is what the CLI prints.
#[cfg(feature = "serde")]
#[test]
fn the_cli_prints_the_library_reports() {
    use vhd_merge::info::{InfoOptions, inspect_file};
    let dir = tempfile::tempdir().unwrap();
    let (base, child) = (dir.path().join("b.vhd"), dir.path().join("c.vhd"));
    let x = dir.path().join("x.vhdx");
    let creates: [Vec<&str>; 3] = [
        vec!["create", "dynamic", s(&base), "--size", "8M"],
        vec!["create", "differencing", s(&child), "--parent", s(&base)],
        vec!["create", "dynamic", s(&x), "--size", "8M"],
    ];
    for args in creates {
        let file = Path::new(args[2]);
        let Some((_, v)) = json_run(&[&args[..], &["--json"]].concat()) else {
            return;
        };
        let report = vhd_merge::create::report_file(file).unwrap();
        assert_eq!(v, with_schema(report), "{args:?}");
    }
    let opts = InfoOptions::default();
    for file in [&base, &child, &x] {
        let (_, v) = json_run(&["info", s(file), "--json"]).unwrap();
        assert_eq!(
            v,
            with_schema(inspect_file(file, &opts).unwrap()),
            "{file:?}"
        );
        let (_, v) = json_run(&["repair", "--dry-run", s(file), "--json"]).unwrap();
        let dry = vhd_merge::repair::RepairOptions::default().dry_run(true);
        let report = vhd_merge::repair::repair_file(file, &dry).unwrap();
        assert_eq!(v, with_schema(report), "{file:?}");
    }
    let (_, v) = json_run(&["chain", s(&child), "--json"]).unwrap();
    let chain = vhd_merge::Chain::open(&child, &vhd_merge::ChainOptions::default()).unwrap();
    assert_eq!(v, with_schema(chain.report()));
}
