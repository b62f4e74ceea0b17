//! The VHDX shapes of the bench (issue 12): full, partial-bitmap, sparse 64 TiB, 32-layer and
//! 256 MiB-block merges into dynamic VHDX parents, opening and planning 64 TiB chains, and
//! conversions between VHD and VHDX (with `qemu-img convert` as the nearest reference).

use std::path::{Path, PathBuf};
use std::process::Command;

use super::common::{Fill, Shape, VhdxSpec, build_vhdx};
use super::{
    Item, Kind, MIB, Res, add_cp_sparse, copy_synced, get, merge_item, millis, no_clone, ratio,
    row, rss_row, time_plan,
};

/// The largest VHDX: 64 TiB.
const TIB64: u64 = 64 << 40;

/// The `--only` names of these shapes.
pub const SHAPES: &str = "vhdx,vhdx-mostly,vhdx-eos,vhdx-e4k,vhdx-sparse,vhdx-plan32,vhdx-plan1,vhdx-deep,vhdx-256m,vhdx-convert,qemu";

/// What the shapes are built from.
pub struct Inputs<'a> {
    pub root: &'a Path,
    pub bin: &'a Path,
    /// 2 MiB units of merged data (the 1 GiB of the VHD shapes).
    pub units: u64,
    /// 2 MiB units in the sparse disks.
    pub sparse_units: u64,
    pub runs: usize,
    /// The child of the VHD full-block chain (the input of VHD -> VHDX conversions).
    pub vhd_child: Option<&'a Path>,
}

/// In-process timings: (name, seconds of each run).
pub type Timings = Vec<(&'static str, Vec<f64>)>;

type Want<'a> = &'a dyn Fn(&str) -> bool;

/// Whether the selected VHDX shapes compare with `cp_data` (cp of the merged bytes + sync).
pub fn needs_cp(want: Want) -> bool {
    ["vhdx", "vhdx-eos", "vhdx-e4k", "vhdx-deep", "vhdx-256m"]
        .iter()
        .chain(&["vhdx-convert", "qemu"])
        .any(|s| want(s))
}

/// Build the selected shapes' inputs, add their timed commands to `items`, and time the
/// in-process open + plan of the 64 TiB chains.
pub fn build(inp: &Inputs, want: Want, items: &mut Vec<Item>, fill: &mut Fill) -> Res<Timings> {
    let all: Vec<u64> = (0..inp.units).collect();
    let data = inp.units * 2 * MIB;
    let spec = VhdxSpec {
        size: data,
        ..VhdxSpec::default()
    };
    let full_needed = ["vhdx", "vhdx-eos", "vhdx-e4k", "vhdx-deep", "vhdx-convert"];
    let mut vhdx_child = None;
    if full_needed.iter().any(|s| want(s)) {
        let (it, p) = chain_item(inp, "vhdx", &spec, &all, "merge_vhdx_full", fill)?;
        items.extend(no_clone("merge_vhdx_full_no_clone", &it));
        items.push(it);
        vhdx_child = Some(p[0].clone());
    }
    for (name, shape, item) in [
        (
            "vhdx-eos",
            Shape::EveryOtherSector,
            "merge_vhdx_eos_no_clone",
        ),
        ("vhdx-e4k", Shape::EveryOther4K, "merge_vhdx_e4k_no_clone"),
    ] {
        if want(name) {
            let s = VhdxSpec { shape, ..spec };
            let (it, _) = chain_item(inp, name, &s, &all, item, fill)?;
            items.extend(no_clone(item, &it));
        }
    }
    if want("vhdx-mostly") {
        let s = VhdxSpec {
            shape: Shape::Mostly,
            ..spec
        };
        let (it, _) = chain_item(inp, "vhdx-mostly", &s, &all, "merge_vhdx_mostly", fill)?;
        items.extend(no_clone("merge_vhdx_mostly_no_clone", &it));
        items.push(it);
    }
    if want("vhdx-deep") {
        let s = VhdxSpec { depth: 32, ..spec };
        items.push(chain_item(inp, "vhdx-deep", &s, &all, "merge_vhdx_32_layers", fill)?.0);
    }
    if want("vhdx-256m") {
        let b = 256 << 20;
        let s = VhdxSpec {
            size: data.div_ceil(u64::from(b)) * u64::from(b),
            base_block: b,
            block: b,
            ..spec
        };
        items.push(chain_item(inp, "vhdx-256m", &s, &all, "merge_vhdx_256m_blocks", fill)?.0);
    }
    if want("vhdx-sparse") {
        sparse(inp, items, fill)?;
    }
    let mut times = Timings::new();
    for (name, mib, dry, read, timing) in [
        (
            "vhdx-plan32",
            32,
            "dry_run_vhdx_64tib_32m",
            "",
            "open+plan_vhdx_64tib_32m",
        ),
        (
            "vhdx-plan1",
            1,
            "dry_run_vhdx_64tib_1m",
            "read_bat_vhdx_64tib_1m",
            "open+plan_vhdx_64tib_1m",
        ),
    ] {
        if want(name) {
            let child = plan_chain(inp, name, mib, items, dry, read, fill)?;
            times.push((timing, time_plan(&child, inp.runs)?));
        }
    }
    if want("vhdx-convert") {
        conversions(inp, vhdx_child.as_deref(), items);
    }
    if want("qemu") {
        qemu(inp, items);
    }
    Ok(times)
}

/// Build the chain `spec` in ROOT/`dir` (units `units`) and a merge of its child into its base
/// named `name`, with a pristine copy of the layer the merge re-links. Returns the paths too.
fn chain_item(
    inp: &Inputs,
    dir: &str,
    spec: &VhdxSpec,
    units: &[u64],
    name: &'static str,
    fill: &mut Fill,
) -> Res<(Item, Vec<PathBuf>)> {
    let dir = inp.root.join(dir);
    let p = build_vhdx(&dir, spec, units, fill)?;
    let keep = dir.with_extension("pristine");
    std::fs::create_dir_all(&keep)?;
    let linked = &p[p.len() - 2];
    copy_synced(linked, &keep.join(linked.file_name().ok_or("no name")?))?;
    let unit = u64::from(spec.block).min(2 * MIB);
    let per_unit = match spec.shape {
        Shape::Full => unit,
        Shape::Mostly => unit / 8 * 7,
        _ => unit / 2,
    };
    let it = merge_item(name, &p, units.len() as u64 * per_unit)?;
    Ok((it, p))
}

/// 64 TiB virtual, the sparse units spread over all of it: a 2 MiB-block child (Hyper-V's
/// differencing default) into a 32 MiB-block dynamic parent (its dynamic default).
fn sparse(inp: &Inputs, items: &mut Vec<Item>, fill: &mut Fill) -> Res<()> {
    let bytes = inp.sparse_units * 2 * MIB;
    add_cp_sparse(&inp.root.join("ref"), bytes, items)?;
    let stride = (TIB64 / (2 * MIB)) / inp.sparse_units;
    let units: Vec<u64> = (0..inp.sparse_units).map(|i| i * stride + 7).collect();
    let spec = VhdxSpec {
        size: TIB64,
        base_block: 32 << 20,
        ..VhdxSpec::default()
    };
    let (it, _) = chain_item(
        inp,
        "vhdx-sparse",
        &spec,
        &units,
        "merge_vhdx_sparse_64tib",
        fill,
    )?;
    items.push(it);
    Ok(())
}

/// A 64 TiB chain of `mib` MiB blocks (a dynamic base and a child holding the sparse units,
/// spread): adds its `merge --dry-run` as `dry` and, when `read` is not empty, the reading of
/// both files' BATs as `read`. Returns the child.
fn plan_chain(
    inp: &Inputs,
    dir: &str,
    mib: u32,
    items: &mut Vec<Item>,
    dry: &'static str,
    read: &'static str,
    fill: &mut Fill,
) -> Res<PathBuf> {
    let spec = VhdxSpec {
        size: TIB64,
        base_block: mib << 20,
        block: mib << 20,
        ..VhdxSpec::default()
    };
    let unit = u64::from(mib).min(2) * MIB;
    let stride = (TIB64 / unit) / inp.sparse_units;
    let units: Vec<u64> = (0..inp.sparse_units).map(|i| i * stride + 7).collect();
    let p = build_vhdx(&inp.root.join(dir), &spec, &units, fill)?;
    items.push(Item::new(dry, Kind::DryRun { src: p[0].clone() }));
    if !read.is_empty() {
        let ranges = p
            .iter()
            .map(|f| Ok((f.clone(), bat_region(inp.bin, f)?)))
            .map(|r: Res<_>| r.map(|(f, (o, l))| (f, o, l)))
            .collect::<Res<Vec<_>>>()?;
        items.push(Item::new(read, Kind::Read { ranges }));
    }
    Ok(p[0].clone())
}

/// (file offset, length) of the BAT region of `file`, from `vhd-merge info --json`.
fn bat_region(bin: &Path, file: &Path) -> Res<(u64, u64)> {
    let out = Command::new(bin)
        .arg("info")
        .arg(file)
        .arg("--json")
        .output()?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let bat = v["regions"]
        .as_array()
        .and_then(|r| r.iter().find(|e| e["name"] == "BAT"))
        .ok_or_else(|| format!("{}: no BAT region in `info --json`", file.display()))?;
    let field = |k: &str| bat[k].as_u64().ok_or(format!("BAT region without {k}"));
    Ok((field("file_offset")?, field("length")?))
}

/// `flatten --format ...` of the VHD chain to VHDX and of the VHDX chain to VHD.
fn conversions(inp: &Inputs, vhdx_child: Option<&Path>, items: &mut Vec<Item>) {
    let out = |f: &str| inp.root.join("ref").join(format!("conv-{f}"));
    let jobs = [
        ("flatten_vhd_to_vhdx_dynamic", inp.vhd_child, "vhdx-dynamic"),
        ("flatten_vhd_to_vhdx_fixed", inp.vhd_child, "vhdx-fixed"),
        ("flatten_vhdx_to_vhd_dynamic", vhdx_child, "vhd-dynamic"),
        ("flatten_vhdx_to_vhd_fixed", vhdx_child, "vhd-fixed"),
    ];
    for (name, src, format) in jobs {
        let Some(src) = src else { continue };
        let ext = if format.starts_with("vhdx") {
            "vhdx"
        } else {
            "vhd"
        };
        items.push(Item::new(
            name,
            Kind::Flatten {
                src: src.to_path_buf(),
                out: out(&format!("{format}.{ext}")),
                format,
            },
        ));
    }
}

/// `qemu-img convert -O vhdx` of the cp reference's bytes, fixed and dynamic (when qemu-img
/// runs).
fn qemu(inp: &Inputs, items: &mut Vec<Item>) {
    let works = Command::new("qemu-img")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !works {
        println!("  qemu-img not found: no qemu rows");
        return;
    }
    let refs = inp.root.join("ref");
    for (name, subformat) in [
        ("qemu_img_convert_vhdx_fixed", "fixed"),
        ("qemu_img_convert_vhdx_dynamic", "dynamic"),
    ] {
        items.push(Item::new(
            name,
            Kind::Qemu {
                src: refs.join("data.bin"),
                dst: refs.join(format!("qemu-{subformat}.vhdx")),
                subformat,
            },
        ));
    }
}

/// A ratio row: number, what, the command, its reference, the limit (None: a reference row).
type RatioRow = (
    &'static str,
    &'static str,
    &'static str,
    &'static str,
    Option<f64>,
);

/// The ratio rows printed before the open + plan rows.
const MERGE_ROWS: &[RatioRow] = &[
    (
        "V1",
        "VHDX full blocks into dynamic VHDX / (cp + sync)",
        "merge_vhdx_full",
        "cp_data",
        Some(1.2),
    ),
    (
        "V2",
        "VHDX every-other-sector / VHDX full blocks (--no-clone)",
        "merge_vhdx_eos_no_clone",
        "merge_vhdx_full_no_clone",
        Some(1.5),
    ),
    (
        "V3",
        "VHDX every-other-4KiB / VHDX full blocks (--no-clone)",
        "merge_vhdx_e4k_no_clone",
        "merge_vhdx_full_no_clone",
        Some(1.5),
    ),
    (
        "V3'",
        "VHDX 7/8-held blocks, default / --no-clone",
        "merge_vhdx_mostly",
        "merge_vhdx_mostly_no_clone",
        Some(1.1),
    ),
    (
        "V4",
        "VHDX 64 TiB sparse / (cp of its data + sync)",
        "merge_vhdx_sparse_64tib",
        "cp_sparse_data",
        Some(2.0),
    ),
    (
        "V6",
        "VHDX 32 layers (blocks round-robin) / 1 layer",
        "merge_vhdx_32_layers",
        "merge_vhdx_full",
        Some(1.3),
    ),
    (
        "V6'",
        "VHDX 256 MiB blocks / (cp + sync) (no target)",
        "merge_vhdx_256m_blocks",
        "cp_data",
        None,
    ),
];

/// The ratio rows printed after the peak RSS row.
const CONVERT_ROWS: &[RatioRow] = &[
    (
        "V8a",
        "flatten VHD -> dynamic VHDX / (cp + sync)",
        "flatten_vhd_to_vhdx_dynamic",
        "cp_data",
        Some(1.3),
    ),
    (
        "V8b",
        "flatten VHD -> fixed VHDX / (cp + sync)",
        "flatten_vhd_to_vhdx_fixed",
        "cp_data",
        Some(1.3),
    ),
    (
        "V8c",
        "flatten VHDX -> dynamic VHD / (cp + sync)",
        "flatten_vhdx_to_vhd_dynamic",
        "cp_data",
        Some(1.3),
    ),
    (
        "V8d",
        "flatten VHDX -> fixed VHD / (cp + sync)",
        "flatten_vhdx_to_vhd_fixed",
        "cp_data",
        Some(1.3),
    ),
    (
        "V9a",
        "qemu-img convert -O vhdx fixed / (cp + sync) (reference)",
        "qemu_img_convert_vhdx_fixed",
        "cp_data",
        None,
    ),
    (
        "V9b",
        "qemu-img convert -O vhdx dynamic / (cp + sync) (reference)",
        "qemu_img_convert_vhdx_dynamic",
        "cp_data",
        None,
    ),
];

/// The VHDX targets of issue 12 (and the reference rows).
pub fn rows(items: &[Item], times: &Timings) {
    let ratios = |table: &[RatioRow]| {
        for &(n, what, a, b, limit) in table {
            row(n, what, ratio(items, a, b), limit, "x");
        }
    };
    ratios(MERGE_ROWS);
    plan_rows(items, times);
    let vhdx = items
        .iter()
        .filter(|i| i.name.contains("vhdx") && !i.name.starts_with("qemu"));
    rss_row("V7", "VHDX peak RSS, worst", vhdx);
    ratios(CONVERT_ROWS);
}

/// The open + plan rows: 32 MiB blocks in milliseconds, 1 MiB blocks against reading the BATs.
fn plan_rows(items: &[Item], times: &Timings) {
    let timed = |name: &str| {
        times
            .iter()
            .find(|t| t.0 == name)
            .and_then(|t| millis(&t.1))
    };
    let dry = |name: &str| get(items, name).and_then(|d| millis(&d.secs));
    let what = "open + plan 64 TiB VHDX, 32 MiB blocks (in-process)";
    row(
        "V5a",
        what,
        timed("open+plan_vhdx_64tib_32m"),
        Some(100.0),
        "ms",
    );
    let what = "merge --dry-run of it, whole process";
    row(
        "V5a'",
        what,
        dry("dry_run_vhdx_64tib_32m"),
        Some(100.0),
        "ms",
    );
    let read = get(items, "read_bat_vhdx_64tib_1m").map(|r| super::median(&r.secs) * 1e3);
    let per_read = |m: Option<(f64, f64, f64)>| {
        let r = read?;
        m.map(|(v, lo, hi)| (v / r, lo / r, hi / r))
    };
    let what = "open + plan 64 TiB VHDX, 1 MiB blocks / read of its BATs";
    row(
        "V5b",
        what,
        per_read(timed("open+plan_vhdx_64tib_1m")),
        Some(1.0),
        "x",
    );
    let what = "merge --dry-run of it / read of its BATs";
    row(
        "V5b'",
        what,
        per_read(dry("dry_run_vhdx_64tib_1m")),
        Some(1.0),
        "x",
    );
}
