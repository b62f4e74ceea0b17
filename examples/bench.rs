//! Compare `vhd-merge merge` and `vhd-merge flatten` with `cp` + `sync` of the same bytes, for
//! every shape of issue 5, and print the measured ratios and peak memory:
//!
//! ```text
//! cargo run --release --example bench [-- OPTIONS]
//!
//!   --dir DIR        where to build the inputs (default: a new temporary directory under the
//!                    current directory; $TMPDIR is often a tmpfs, where cp + sync means little)
//!   --scale F        data size factor: 1 = 1 GiB of merged data and 64 MiB in the sparse disk
//!                    (default 1; 0.25 for a quick run)
//!   --runs N         timed runs of each command, median reported (default 5)
//!   --warmup N       untimed rounds first (default 1: right after the inputs are written,
//!                    the host of a virtual disk is often still flushing them)
//!   --cold           drop the page cache before every timed command (Linux, root only):
//!                    sync; echo 3 > /proc/sys/vm/drop_caches. Default: warm cache.
//!   --global-sync    time `cp` + `sync` (every file system) instead of `cp` + `sync FILE`
//!   --only LIST      comma-separated shapes: full,eos,e4k,mostly,fixed,sparse,fullbat,deep,
//!                    striped,deepsparse,flatten (VHD); vhdx,vhdx-eos,vhdx-e4k,vhdx-sparse,
//!                    vhdx-plan32,vhdx-plan1,vhdx-deep,vhdx-256m,vhdx-convert,qemu (VHDX,
//!                    examples/bench/vhdx.rs); bigbat (a 2040 GiB VHD at 512-byte blocks, a
//!                    16 GiB BAT: examples/bench/bigbat.rs, only when named) (default: all
//!                    but bigbat; references are added as needed)
//!   --bin PATH       the vhd-merge binary (default: target/release/vhd-merge, built first
//!                    with `cargo build --release` when run through cargo)
//!   --keep           keep the input directory
//! ```
//!
//! Every timed command is the real CLI binary run as a child process, so start-up, chain
//! opening, the sibling scan, planning and every fdatasync count. Before each merge the
//! destination is restored from a pristine copy and flushed (not timed). Runs are interleaved:
//! each round runs every command once, in a rotating order, so load from other processes
//! spreads over all of them. Peak RSS comes from GNU time (`/usr/bin/time -f %M`), which runs
//! every timed command, the references included.

use std::error::Error;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use vhd_merge::create::{CreateOptions, create_differencing, create_dynamic};
use vhd_merge::merge::MergePlan;
use vhd_merge::{Chain, ChainOptions};

#[path = "../benches/common/mod.rs"]
mod common;
use common::{Fill, Shape, Spread, build_chain};
/// The VHDX shapes.
#[path = "bench/vhdx.rs"]
mod vhdx;

/// The 2040 GiB, 512-byte-block VHD (a 16 GiB BAT): run only when named.
#[path = "bench/bigbat.rs"]
mod bigbat;

type Res<T> = Result<T, Box<dyn Error>>;

const MIB: u64 = 1 << 20;
const BLOCK: u64 = 2 * MIB;
/// The largest dynamic VHD (2040 GiB): "2 TiB" in the issue.
const TIB2: u64 = 0xFF00_0000 * 512;

/// The `--only` names of the VHD shapes.
const VHD_SHAPES: &str = "full,eos,e4k,mostly,fixed,sparse,fullbat,deep,striped,deepsparse,flatten";

struct Args {
    dir: Option<PathBuf>,
    scale: f64,
    runs: usize,
    warmup: usize,
    cold: bool,
    global_sync: bool,
    only: Option<Vec<String>>,
    bin: Option<PathBuf>,
    keep: bool,
}

fn parse_args() -> Res<Args> {
    let mut a = Args {
        dir: None,
        scale: 1.0,
        runs: 5,
        warmup: 1,
        cold: false,
        global_sync: false,
        only: None,
        bin: None,
        keep: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut val = |name: &str| it.next().ok_or_else(|| format!("{name} needs a value"));
        match arg.as_str() {
            "--dir" => a.dir = Some(PathBuf::from(val("--dir")?)),
            "--scale" => a.scale = val("--scale")?.parse()?,
            "--runs" => a.runs = val("--runs")?.parse()?,
            "--warmup" => a.warmup = val("--warmup")?.parse()?,
            "--cold" => a.cold = true,
            "--global-sync" => a.global_sync = true,
            "--only" => {
                a.only = Some(val("--only")?.split(',').map(str::to_string).collect());
            }
            "--bin" => a.bin = Some(PathBuf::from(val("--bin")?)),
            "--keep" => a.keep = true,
            "-h" | "--help" => {
                println!(
                    "usage: cargo run --release --example bench -- [--dir DIR] [--scale F] [--runs N] [--warmup N] [--cold] [--global-sync] [--only {VHD_SHAPES},{},bigbat] [--bin PATH] [--keep]",
                    vhdx::SHAPES
                );
                std::process::exit(0);
            }
            other => return Err(format!("unknown option {other} (try --help)").into()),
        }
    }
    if a.runs == 0 || a.scale.is_nan() || a.scale <= 0.0 {
        return Err("--runs must be at least 1 and --scale positive".into());
    }
    Ok(a)
}

/// A 2040 GiB dynamic VHD whose every BAT entry is allocated (1 044 480 blocks laid out back
/// to back), as a sparse file: the blocks are holes, so it reads as zeros and takes almost no
/// space. The worst case for opening (every extent is checked) short of 2 TiB of real data.
fn build_fully_allocated(path: &Path) -> Res<()> {
    let v = create_dynamic(path, TIB2, &CreateOptions::default())?;
    let h = v.header().ok_or("no header")?.clone();
    let footer = v.footer().to_bytes();
    let bm = h.bitmap_bytes();
    let stride = bm + u64::from(h.block_size);
    // First block: data 4 KiB aligned after the metadata.
    let first = (v.end_of_data() + bm).div_ceil(4096) * 4096 - bm;
    drop(v);
    let n = u64::from(h.max_table_entries);
    let mut table = Vec::with_capacity(n as usize * 4);
    for i in 0..n {
        let sector = u32::try_from((first + i * stride) / 512)?;
        table.extend_from_slice(&sector.to_be_bytes());
    }
    let end = first + n * stride;
    use std::io::{Seek, SeekFrom};
    let mut f = File::options().write(true).open(path)?;
    f.set_len(end + 512)?;
    f.seek(SeekFrom::Start(h.table_offset))?;
    f.write_all(&table)?;
    f.seek(SeekFrom::Start(end))?;
    f.write_all(&footer)?;
    f.sync_all()?;
    Ok(())
}

/// A plain file of `bytes` filler bytes (the reference for cp).
fn build_plain(path: &Path, bytes: u64, fill: &mut Fill) -> Res<()> {
    let mut f = File::create(path)?;
    let mut buf = vec![0u8; BLOCK as usize];
    let mut left = bytes;
    while left > 0 {
        let n = left.min(BLOCK) as usize;
        fill.block(&mut buf[..n]);
        f.write_all(&buf[..n])?;
        left -= n as u64;
    }
    f.sync_all()?;
    Ok(())
}

/// The `cp_sparse_data` reference (cp of `bytes` + sync), unless `items` has it.
fn add_cp_sparse(refs: &Path, bytes: u64, items: &mut Vec<Item>) -> Res<()> {
    if get(items, "cp_sparse_data").is_some() {
        return Ok(());
    }
    let src = refs.join("sparse.bin");
    build_plain(&src, bytes, &mut Fill(0x1234_5678_9ABC_DEF1))?;
    items.push(Item::new(
        "cp_sparse_data",
        Kind::Cp {
            src,
            dst: refs.join("sparse-copy.bin"),
            reflink: false,
        },
    ));
    Ok(())
}

/// Whether `cp --reflink=always` works from `src` into `probe` (a file system with reflink).
fn reflink_works(src: &Path, probe: &Path) -> bool {
    let ok = Command::new("cp")
        .arg("--reflink=always")
        .arg(src)
        .arg(probe)
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    let _ = std::fs::remove_file(probe);
    ok
}

fn copy_synced(from: &Path, to: &Path) -> Res<()> {
    std::fs::copy(from, to)?;
    File::options().write(true).open(to)?.sync_all()?;
    Ok(())
}

/// What one timed command does.
enum Kind {
    /// `cp --reflink=never SRC DST` then `sync DST` (or a global sync); with `reflink`,
    /// `cp --reflink=always` (block cloning: the floor a cloning merge is held to). GNU cp 9
    /// clones by default where it can, so the copy reference says `never` explicitly.
    Cp {
        src: PathBuf,
        dst: PathBuf,
        reflink: bool,
    },
    /// `vhd-merge merge SRC DEST --json` (with `--no-clone` when `no_clone`), after
    /// restoring DEST from `pristine`.
    Merge {
        src: PathBuf,
        dest: PathBuf,
        pristine: PathBuf,
        expect: u64,
        no_clone: bool,
    },
    /// `vhd-merge flatten SRC OUT --format F --quiet`, after removing OUT.
    Flatten {
        src: PathBuf,
        out: PathBuf,
        format: &'static str,
    },
    /// `vhd-merge merge SRC --dry-run --json`.
    DryRun { src: PathBuf },
    /// `qemu-img convert -f raw -O vhdx -o subformat=SUB SRC DST` then `sync DST` (a
    /// reference), after removing DST.
    Qemu {
        src: PathBuf,
        dst: PathBuf,
        subformat: &'static str,
    },
    /// `dd` of each (file, offset, length) to /dev/null: reading those bytes once (the
    /// reference for opening a chain whose BATs are that large).
    Read { ranges: Vec<(PathBuf, u64, u64)> },
}

struct Item {
    name: &'static str,
    kind: Kind,
    secs: Vec<f64>,
    rss_kib: Vec<u64>,
    /// A merge's bytes cloned and copied (from its JSON report, last run).
    cloned: Option<(u64, u64)>,
}

impl Item {
    fn new(name: &'static str, kind: Kind) -> Item {
        Item {
            name,
            kind,
            secs: Vec::new(),
            rss_kib: Vec::new(),
            cloned: None,
        }
    }
}

/// Exit status, peak RSS (KiB) and stdout of a finished child.
struct Outcome {
    ok: bool,
    rss_kib: Option<u64>,
    stdout: String,
    stderr: String,
}

/// GNU time, for peak RSS. Not `wait4` on our own child: a child started with vfork or
/// posix_spawn reports the larger of its own peak and this program's (Linux keeps the
/// high-water mark of the address space an exec replaces), while a command that `time`
/// forks starts from `time`'s small one.
const GNU_TIME: &str = "/usr/bin/time";

/// Run `program args` to completion (through GNU time when it is there, for the peak RSS);
/// stdout and stderr are collected (they are short).
fn run(program: &Path, args: &[&std::ffi::OsStr], rss_file: &Path) -> Res<Outcome> {
    let timed = Path::new(GNU_TIME).exists();
    let mut cmd = if timed {
        let mut c = Command::new(GNU_TIME);
        c.arg("-f").arg("%M").arg("-o").arg(rss_file).arg(program);
        c
    } else {
        Command::new(program)
    };
    let out = cmd.args(args).stdin(Stdio::null()).output()?;
    let rss_kib = if timed {
        std::fs::read_to_string(rss_file)
            .ok()
            .and_then(|s| s.lines().last().and_then(|l| l.trim().parse().ok()))
    } else {
        None
    };
    Ok(Outcome {
        ok: out.status.success(),
        rss_kib,
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    })
}

fn drop_caches() -> Res<()> {
    Command::new("sync").status()?;
    std::fs::write("/proc/sys/vm/drop_caches", "3\n")
        .map_err(|e| format!("--cold: cannot drop the page cache (root needed): {e}"))?;
    Ok(())
}

/// Prepare (untimed), then time one run of `item`.
fn time_item(item: &mut Item, bin: &Path, args: &Args, rss_file: &Path) -> Res<()> {
    match &item.kind {
        Kind::Cp { dst, .. } | Kind::Flatten { out: dst, .. } | Kind::Qemu { dst, .. } => {
            if dst.exists() {
                std::fs::remove_file(dst)?;
            }
        }
        Kind::Merge {
            src,
            dest,
            pristine,
            ..
        } => {
            copy_synced(pristine, dest)?;
            restore_vhdx_linked(src)?;
        }
        Kind::DryRun { .. } | Kind::Read { .. } => {}
    }
    if args.cold {
        drop_caches()?;
    }
    let os = |s: &'static str| std::ffi::OsStr::new(s);
    let t0 = Instant::now();
    let (out, rss) = match &item.kind {
        Kind::Cp { src, dst, reflink } => {
            let mode = os(if *reflink {
                "--reflink=always"
            } else {
                "--reflink=never"
            });
            let a = run(
                Path::new("cp"),
                &[mode, src.as_os_str(), dst.as_os_str()],
                rss_file,
            )?;
            if !a.ok {
                return Err(format!("cp failed: {}", a.stderr).into());
            }
            let sync_args: Vec<&std::ffi::OsStr> = if args.global_sync {
                Vec::new()
            } else {
                vec![dst.as_os_str()]
            };
            (run(Path::new("sync"), &sync_args, rss_file)?, None)
        }
        Kind::Merge {
            src,
            dest,
            no_clone,
            ..
        } => {
            let mut a = vec![os("merge"), src.as_os_str(), dest.as_os_str(), os("--json")];
            if *no_clone {
                a.push(os("--no-clone"));
            }
            let o = run(bin, &a, rss_file)?;
            let r = o.rss_kib;
            (o, r)
        }
        Kind::Flatten { src, out, format } => {
            let o = run(
                bin,
                &[
                    os("flatten"),
                    src.as_os_str(),
                    out.as_os_str(),
                    os("--format"),
                    os(format),
                    os("--quiet"),
                ],
                rss_file,
            )?;
            let r = o.rss_kib;
            (o, r)
        }
        Kind::DryRun { src } => {
            let o = run(
                bin,
                &[os("merge"), src.as_os_str(), os("--dry-run"), os("--json")],
                rss_file,
            )?;
            let r = o.rss_kib;
            (o, r)
        }
        Kind::Qemu {
            src,
            dst,
            subformat,
        } => (qemu_convert(src, dst, subformat, args, rss_file)?, None),
        Kind::Read { ranges } => (read_ranges(ranges, rss_file)?, None),
    };
    let secs = t0.elapsed().as_secs_f64();
    if !out.ok {
        return Err(format!("{} failed:\n{}{}", item.name, out.stdout, out.stderr).into());
    }
    if let Kind::Merge { expect, .. } = &item.kind {
        let v: serde_json::Value = serde_json::from_str(out.stdout.trim())?;
        let got = v["bytes_merged"].as_u64().unwrap_or(0);
        if got != *expect {
            return Err(format!("{}: merged {got} bytes, expected {expect}", item.name).into());
        }
        let field = |k: &str| v[k].as_u64().unwrap_or(0);
        item.cloned = Some((field("bytes_cloned"), field("bytes_copied")));
    }
    item.secs.push(secs);
    if let Some(r) = rss {
        item.rss_kib.push(r);
    }
    Ok(())
}

/// A merge into a VHDX re-links the layer above the destination to the destination's new
/// identity: that layer has a pristine copy to restore too, in `DIR.pristine/` beside the
/// source's directory DIR (not in DIR, or the sibling scan would find it). Restores every
/// file there.
fn restore_vhdx_linked(src: &Path) -> Res<()> {
    let Some(dir) = src.parent() else {
        return Ok(());
    };
    let keep = dir.with_extension("pristine");
    if !keep.is_dir() {
        return Ok(());
    }
    for e in std::fs::read_dir(&keep)? {
        let e = e?;
        copy_synced(&e.path(), &dir.join(e.file_name()))?;
    }
    Ok(())
}

/// [`Kind::Qemu`]: the conversion, then `sync DST` (or a global sync) as for cp.
fn qemu_convert(
    src: &Path,
    dst: &Path,
    subformat: &str,
    args: &Args,
    rss_file: &Path,
) -> Res<Outcome> {
    let sub = format!("subformat={subformat}");
    let fixed = ["convert", "-f", "raw", "-O", "vhdx", "-o", &sub];
    let a: Vec<&std::ffi::OsStr> = fixed
        .iter()
        .map(std::ffi::OsStr::new)
        .chain([src.as_os_str(), dst.as_os_str()])
        .collect();
    let o = run(Path::new("qemu-img"), &a, rss_file)?;
    if !o.ok {
        return Err(format!("qemu-img convert failed: {}", o.stderr).into());
    }
    let sync_args: Vec<&std::ffi::OsStr> = if args.global_sync {
        Vec::new()
    } else {
        vec![dst.as_os_str()]
    };
    run(Path::new("sync"), &sync_args, rss_file)
}

/// [`Kind::Read`]: one `dd` per range, stopping at the first that fails.
fn read_ranges(ranges: &[(PathBuf, u64, u64)], rss_file: &Path) -> Res<Outcome> {
    let mut last = None;
    for (file, offset, len) in ranges {
        let a = [
            format!("if={}", file.display()),
            "of=/dev/null".into(),
            "bs=1M".into(),
            "iflag=skip_bytes,count_bytes".into(),
            format!("skip={offset}"),
            format!("count={len}"),
            "status=none".into(),
        ];
        let a: Vec<&std::ffi::OsStr> = a.iter().map(std::ffi::OsStr::new).collect();
        let o = run(Path::new("dd"), &a, rss_file)?;
        if !o.ok {
            return Ok(o);
        }
        last = Some(o);
    }
    last.ok_or_else(|| "no ranges to read".into())
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    match s.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => s[n / 2],
        n => (s[n / 2 - 1] + s[n / 2]) / 2.0,
    }
}

fn min_max(v: &[f64]) -> (f64, f64) {
    v.iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &x| {
            (a.min(x), b.max(x))
        })
}

/// The mount holding `path`: (device, file system type, mount point), from /proc/mounts.
fn file_system(path: &Path) -> String {
    let Ok(canon) = std::fs::canonicalize(path) else {
        return "unknown".into();
    };
    let Ok(mounts) = std::fs::read_to_string("/proc/mounts") else {
        return "unknown (no /proc/mounts)".into();
    };
    let mut best: Option<(usize, String)> = None;
    for line in mounts.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 3 {
            continue;
        }
        let mp = f[1].replace("\\040", " ");
        if canon.starts_with(&mp) && best.as_ref().is_none_or(|(l, _)| mp.len() > *l) {
            best = Some((mp.len(), format!("{} on {} ({})", f[2], mp, f[0])));
        }
    }
    best.map_or_else(|| "unknown".into(), |(_, s)| s)
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("MemTotal"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|k| k.parse::<u64>().ok())
        })
        .map_or_else(
            || "?".into(),
            |k| format!("{:.1} GiB", k as f64 / 1048576.0),
        );
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").map_or_else(
        |_| std::env::consts::OS.to_string(),
        |s| s.trim().to_string(),
    );
    format!(
        "{cpu}, {cores} cores, {mem} RAM, {} {kernel}",
        std::env::consts::OS
    )
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

fn find_bin(args: &Args) -> Res<PathBuf> {
    if let Some(b) = &args.bin {
        return Ok(b.clone());
    }
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    if let Some(cargo) = std::env::var_os("CARGO") {
        let st = Command::new(cargo)
            .args(["build", "--release", "--quiet", "--bin", "vhd-merge"])
            .current_dir(&root)
            .status()?;
        if !st.success() {
            return Err("cargo build --release --bin vhd-merge failed".into());
        }
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"));
    let bin = target
        .join("release")
        .join(format!("vhd-merge{}", std::env::consts::EXE_SUFFIX));
    if !bin.exists() {
        return Err(format!(
            "{} not found: run `cargo build --release` first or pass --bin",
            bin.display()
        )
        .into());
    }
    Ok(bin)
}

/// A line of the results table for in-process timings (nothing when there are none).
fn print_times(name: &str, t: &[f64]) {
    if t.is_empty() {
        return;
    }
    let (lo, hi) = min_max(t);
    println!(
        "{name:<34} {:>9.4} {:>9.4} {:>9.4} {:>9}",
        median(t),
        lo,
        hi,
        "-"
    );
}

/// `runs` (at least 5) timings of opening the chain of `child` and planning its merge into
/// its parent, in process.
fn time_plan(child: &Path, runs: usize) -> Res<Vec<f64>> {
    let mut times = Vec::new();
    for _ in 0..runs.max(5) {
        let t0 = Instant::now();
        let chain = Chain::open(child, &ChainOptions::default())?;
        let plan = MergePlan::build(&chain, 1)?;
        times.push(t0.elapsed().as_secs_f64());
        std::hint::black_box(plan.units);
    }
    Ok(times)
}

/// A merge of `paths[0]` into the last path, which gets a pristine copy to restore before
/// each run.
fn merge_item(name: &'static str, paths: &[PathBuf], expect: u64) -> Res<Item> {
    let dest = paths.last().ok_or("empty chain")?.clone();
    let pristine = dest.with_extension("pristine");
    copy_synced(&dest, &pristine)?;
    Ok(Item::new(
        name,
        Kind::Merge {
            src: paths[0].clone(),
            dest,
            pristine,
            expect,
            no_clone: false,
        },
    ))
}

/// The same merge as `like` with --no-clone (same files; the destination is restored before
/// each).
fn no_clone(name: &'static str, like: &Item) -> Option<Item> {
    let Kind::Merge {
        src,
        dest,
        pristine,
        expect,
        ..
    } = &like.kind
    else {
        return None;
    };
    Some(Item::new(
        name,
        Kind::Merge {
            src: src.clone(),
            dest: dest.clone(),
            pristine: pristine.clone(),
            expect: *expect,
            no_clone: true,
        },
    ))
}

fn get<'a>(items: &'a [Item], name: &str) -> Option<&'a Item> {
    items.iter().find(|i| i.name == name)
}

/// (ratio of medians, smallest and largest per-round ratio) of items `a` and `b`: the two
/// commands of a round ran next to each other.
fn ratio(items: &[Item], a: &str, b: &str) -> Option<(f64, f64, f64)> {
    let (a, b) = (get(items, a)?, get(items, b)?);
    let per: Vec<f64> = a.secs.iter().zip(&b.secs).map(|(x, y)| x / y).collect();
    let (lo, hi) = min_max(&per);
    Some((median(&a.secs) / median(&b.secs), lo, hi))
}

/// Median, min and max of `v` in milliseconds (None when empty).
fn millis(v: &[f64]) -> Option<(f64, f64, f64)> {
    if v.is_empty() {
        return None;
    }
    let (lo, hi) = min_max(v);
    Some((median(v) * 1e3, lo * 1e3, hi * 1e3))
}

/// A ratio row: number, what, the command, its reference, the limit.
type RatioRow = (&'static str, &'static str, &'static str, &'static str, f64);

/// The VHD ratio rows after the open + plan rows (the cloning rows: 9*).
const VHD_ROWS: &[RatioRow] = &[
    (
        "6",
        "32 layers (blocks round-robin) / 1 layer",
        "merge_32_layers",
        "merge_full",
        1.3,
    ),
    (
        "6'",
        "32 layers (every block from 32 layers) / 1 layer",
        "merge_32_layers_striped",
        "merge_full",
        1.3,
    ),
    (
        "8",
        "flatten to dynamic VHD / (cp + sync)",
        "flatten_dynamic",
        "cp_data",
        1.3,
    ),
    (
        "8'",
        "flatten to raw / (cp + sync) (no target)",
        "flatten_raw",
        "cp_data",
        1.3,
    ),
    (
        "8\"",
        "flatten to fixed VHD / (cp + sync) (no target)",
        "flatten_fixed",
        "cp_data",
        1.3,
    ),
    (
        "9",
        "full blocks, default (cloning) / --no-clone",
        "merge_full",
        "merge_full_no_clone",
        1.1,
    ),
    (
        "9b",
        "full blocks, cloning / cp --reflink=always",
        "merge_full",
        "cp_reflink_data",
        2.0,
    ),
    (
        "9f",
        "VHDX full blocks, cloning / cp --reflink=always",
        "merge_vhdx_full",
        "cp_reflink_data",
        2.0,
    ),
    (
        "9g",
        "VHDX full blocks, default / --no-clone",
        "merge_vhdx_full",
        "merge_vhdx_full_no_clone",
        1.1,
    ),
    (
        "9c",
        "every-other-sector, default / --no-clone",
        "merge_every_other_sector",
        "merge_every_other_sector_no_clone",
        1.1,
    ),
    (
        "9d",
        "every-other-4KiB, default / --no-clone",
        "merge_every_other_4k",
        "merge_every_other_4k_no_clone",
        1.1,
    ),
    (
        "9h",
        "7/8-held blocks (cloned whole, patched), default / --no-clone",
        "merge_mostly",
        "merge_mostly_no_clone",
        1.1,
    ),
];

/// The VHD targets of issue 5 (and the cloning targets of issue 14).
fn vhd_rows(items: &[Item], data: u64, sparse_data: u64, plan: &[f64], full_bat: &[f64]) {
    let x = |n, what: &str, a, b, limit| row(n, what, ratio(items, a, b), Some(limit), "x");
    let what = format!(
        "full blocks, {} MiB into dynamic parent / (cp + sync)",
        data / MIB
    );
    x("1", &what, "merge_full", "cp_data", 1.2);
    let what = "every-other-sector / full-block merge (both --no-clone)";
    x(
        "2",
        what,
        "merge_every_other_sector_no_clone",
        "merge_full_no_clone",
        1.5,
    );
    let what = "every-other-4KiB / full-block merge (both --no-clone)";
    x(
        "3",
        what,
        "merge_every_other_4k_no_clone",
        "merge_full_no_clone",
        1.5,
    );
    x(
        "4",
        "fixed destination / (cp + sync)",
        "merge_fixed_dest",
        "cp_data",
        1.2,
    );
    let mib = sparse_data / MIB;
    let what = format!("2 TiB sparse, {mib} MiB allocated / (cp {mib} MiB + sync)");
    x("5a", &what, "merge_sparse_2tib", "cp_sparse_data", 2.0);
    let dry = |name: &str| get(items, name).and_then(|d| millis(&d.secs));
    let ms = |n, what, m| row(n, what, m, Some(100.0), "ms");
    ms(
        "5b",
        "open + plan 2 TiB, full-size BAT (in-process)",
        millis(plan),
    );
    ms(
        "5b'",
        "merge --dry-run 2 TiB, whole process",
        dry("dry_run_2tib"),
    );
    let what = "open + plan over a 2 TiB parent, every entry allocated";
    ms("5c", what, millis(full_bat));
    ms(
        "5c'",
        "merge --dry-run over it, whole process",
        dry("dry_run_2tib_full_bat"),
    );
    rss_row("7", "peak RSS, worst", items.iter());
    for &(n, what, a, b, limit) in VHD_ROWS {
        x(n, what, a, b, limit);
    }
    // Against cp + sync only where cloning can happen (a reflink file system).
    let reflink = get(items, "cp_reflink_data").is_some();
    for (n, what, a) in [
        (
            "9a",
            "full blocks, cloning / (cp + sync) (reflink only)",
            "merge_full",
        ),
        (
            "9e",
            "VHDX full blocks, cloning / (cp + sync) (reflink only)",
            "merge_vhdx_full",
        ),
    ] {
        let m = ratio(items, a, "cp_data").filter(|_| reflink);
        row(n, what, m, Some(0.1), "x");
    }
}

/// The peak-RSS row: the worst of `items` (and in parentheses the smallest peak).
fn rss_row<'a>(n: &str, what: &str, items: impl Iterator<Item = &'a Item>) {
    let peaks: Vec<(u64, &str)> = items
        .filter_map(|i| Some((*i.rss_kib.iter().max()?, i.name)))
        .collect();
    let Some(&(hi, name)) = peaks.iter().max() else {
        return;
    };
    let lo = peaks.iter().map(|p| p.0).min().unwrap_or(hi);
    let mib = |k: u64| k as f64 / 1024.0;
    let m = Some((mib(hi), mib(lo), mib(hi)));
    row(n, &format!("{what}: {name}"), m, Some(64.0), "MiB");
}

/// One line of the targets table; `limit` None: a reference, printed without a verdict.
fn row(n: &str, what: &str, m: Option<(f64, f64, f64)>, limit: Option<f64>, unit: &str) {
    let Some((v, lo, hi)) = m else { return };
    let spread = if lo.is_finite() {
        format!("({lo:.2}..{hi:.2})")
    } else {
        String::new()
    };
    let (lim, verdict) = match limit {
        Some(l) => (format!("{l}{unit}"), if v <= l { "pass" } else { "MISS" }),
        None => ("-".into(), "ref"),
    };
    println!(
        "{n:<4} {what:<58} {:>8} {spread:>15} {lim:>7} {verdict:>5}",
        format!("{v:.2}{unit}"),
    );
}

/// The 1 GiB VHD merges: the `--only` name (also the directory), the item, layers, how
/// the layers hold the blocks, a fixed base, eighths of the data merged, and the name of a
/// `--no-clone` twin.
struct VhdMerge {
    only: &'static str,
    item: &'static str,
    depth: usize,
    spread: Spread,
    fixed: bool,
    eighths: u64,
    no_clone: Option<&'static str>,
}

const VHD_MERGES: &[VhdMerge] = &[
    VhdMerge {
        only: "eos",
        item: "merge_every_other_sector",
        depth: 1,
        spread: Spread::RoundRobin(Shape::EveryOtherSector),
        fixed: false,
        eighths: 4,
        no_clone: Some("merge_every_other_sector_no_clone"),
    },
    VhdMerge {
        only: "e4k",
        item: "merge_every_other_4k",
        depth: 1,
        spread: Spread::RoundRobin(Shape::EveryOther4K),
        fixed: false,
        eighths: 4,
        no_clone: Some("merge_every_other_4k_no_clone"),
    },
    VhdMerge {
        only: "mostly",
        item: "merge_mostly",
        depth: 1,
        spread: Spread::RoundRobin(Shape::Mostly),
        fixed: false,
        eighths: 7,
        no_clone: Some("merge_mostly_no_clone"),
    },
    VhdMerge {
        only: "fixed",
        item: "merge_fixed_dest",
        depth: 1,
        spread: Spread::RoundRobin(Shape::Full),
        fixed: true,
        eighths: 8,
        no_clone: None,
    },
    VhdMerge {
        only: "deep",
        item: "merge_32_layers",
        depth: 32,
        spread: Spread::RoundRobin(Shape::Full),
        fixed: false,
        eighths: 8,
        no_clone: None,
    },
    VhdMerge {
        only: "striped",
        item: "merge_32_layers_striped",
        depth: 32,
        spread: Spread::Striped,
        fixed: false,
        eighths: 8,
        no_clone: None,
    },
];

/// A child of `blocks` whole blocks spread over 2 TiB, over a 2 TiB parent with every BAT
/// entry allocated (the parent's 1 044 480 extents are all checked when it is opened), in
/// `dir`. Returns the child.
fn build_full_bat_chain(dir: &Path, blocks: u64, fill: &mut Fill) -> Res<PathBuf> {
    std::fs::create_dir_all(dir)?;
    let base = dir.join("base.vhd");
    build_fully_allocated(&base)?;
    let child = dir.join("layer00.vhd");
    let mut v = create_differencing(&child, &base, &CreateOptions::default())?;
    let mut buf = vec![0u8; BLOCK as usize];
    let stride = (TIB2 / BLOCK) / blocks;
    v.reserve_blocks(blocks)?;
    for i in 0..blocks {
        fill.block(&mut buf);
        v.write_block(i * stride + 7, &mut buf, &Shape::Full.mask())?;
    }
    v.finish()?;
    Ok(child)
}

/// What the bench runs on, and how it measures.
fn print_header(args: &Args, bin: &Path, root: &Path, blocks: u64, sparse_data: u64) {
    println!("vhd-merge bench");
    println!("  binary:      {}", bin.display());
    println!("  machine:     {}", machine());
    println!("  directory:   {}", root.display());
    println!("  file system: {}", file_system(root));
    println!(
        "  page cache:  {}",
        if args.cold {
            "cold (dropped before every timed command)"
        } else {
            "warm (inputs written or read just before)"
        }
    );
    println!(
        "  reference:   cp + {}",
        if args.global_sync {
            "sync (global)"
        } else {
            "sync FILE (fsync of the copy)"
        }
    );
    println!(
        "  sizes:       {} MiB merged ({blocks} blocks of 2 MiB); sparse: 2040 GiB virtual, {} MiB allocated",
        blocks * BLOCK / MIB,
        sparse_data / MIB
    );
    println!(
        "  runs:        {} (median; interleaved, rotating order) after {} untimed warm-up round(s)",
        args.runs, args.warmup
    );
    println!("  load avg:    {}", loadavg());
    println!(
        "  peak RSS:    {}",
        if Path::new(GNU_TIME).exists() {
            "GNU time %M (it runs every timed command, cp and sync too)"
        } else {
            "not measured (no /usr/bin/time)"
        }
    );
}

/// The warm-up and timed rounds: each runs every item once, in a rotating order.
fn run_rounds(items: &mut [Item], bin: &Path, args: &Args, rss_file: &Path) -> Res<()> {
    for r in 0..args.warmup + args.runs {
        let n = items.len();
        for k in 0..n {
            let i = (k + r) % n;
            time_item(&mut items[i], bin, args, rss_file)?;
        }
        if r + 1 == args.warmup {
            for it in items.iter_mut() {
                it.secs.clear();
                it.rss_kib.clear();
            }
        }
        if r < args.warmup {
            eprint!("\r  warm-up round {}/{} done", r + 1, args.warmup);
        } else {
            eprint!(
                "\r  round {}/{} done        ",
                r + 1 - args.warmup,
                args.runs
            );
        }
    }
    eprintln!();

    Ok(())
}

/// The results table: every command's median, min, max, peak RSS, cloned / copied.
fn print_commands(items: &[Item]) {
    println!();
    println!(
        "{:<34} {:>9} {:>9} {:>9} {:>9}  cloned / copied",
        "command", "median s", "min s", "max s", "peak RSS"
    );
    for it in items {
        let (lo, hi) = min_max(&it.secs);
        let rss = it
            .rss_kib
            .iter()
            .max()
            .map_or_else(|| "-".into(), |k| format!("{:.1} MiB", *k as f64 / 1024.0));
        let cloned = it.cloned.map_or_else(String::new, |(c, p)| {
            format!("{} / {} MiB", c / MIB, p / MIB)
        });
        println!(
            "{:<34} {:>9.3} {:>9.3} {:>9.3} {:>9}  {cloned}",
            it.name,
            median(&it.secs),
            lo,
            hi,
            rss
        );
    }
}

fn main() -> Res<()> {
    let args = parse_args()?;
    let bin = find_bin(&args)?;
    let want = |s: &str| args.only.as_ref().is_none_or(|o| o.iter().any(|x| x == s));
    let tmp = match &args.dir {
        Some(d) => {
            std::fs::create_dir_all(d)?;
            tempfile::Builder::new()
                .prefix("vhd-merge-bench-")
                .tempdir_in(d)?
        }
        None => tempfile::Builder::new()
            .prefix("vhd-merge-bench-")
            .tempdir_in(".")?,
    };
    let root = tmp.path().to_path_buf();
    let blocks = ((args.scale * 512.0).round() as u64).max(32);
    let data = blocks * BLOCK;
    let sparse_blocks = ((args.scale * 32.0).round() as u64).max(1);
    let sparse_data = sparse_blocks * BLOCK;
    let size = data;
    let all: Vec<u64> = (0..blocks).collect();
    let rss_file = root.join("rss.txt");
    print_header(&args, &bin, &root, blocks, sparse_data);
    println!("building inputs...");
    let t_build = Instant::now();

    let mut fill = Fill(0x9E37_79B9_7F4A_7C15);
    let mut items: Vec<Item> = Vec::new();
    let refs = root.join("ref");
    std::fs::create_dir_all(&refs)?;
    let need_full = want("full") || want("eos") || want("e4k") || want("deep") || want("striped");
    let need_cp1g = want("full") || want("fixed") || want("flatten") || vhdx::needs_cp(&want);
    if need_cp1g {
        let src = refs.join("data.bin");
        build_plain(&src, data, &mut Fill(0x9E37_79B9_7F4A_7C15))?;
        if reflink_works(&src, &refs.join("probe.bin")) {
            items.push(Item::new(
                "cp_reflink_data",
                Kind::Cp {
                    src: src.clone(),
                    dst: refs.join("reflink.bin"),
                    reflink: true,
                },
            ));
        }
        items.push(Item::new(
            "cp_data",
            Kind::Cp {
                src,
                dst: refs.join("copy.bin"),
                reflink: false,
            },
        ));
    }
    let full_paths = if need_full || want("flatten") || want("vhdx-convert") {
        let p = build_chain(
            &root.join("full"),
            size,
            &all,
            1,
            Spread::RoundRobin(Shape::Full),
            false,
            &mut fill,
        )?;
        if need_full {
            let it = merge_item("merge_full", &p, data)?;
            items.extend(no_clone("merge_full_no_clone", &it));
            items.push(it);
        }
        Some(p)
    } else {
        None
    };
    for m in VHD_MERGES {
        if want(m.only) {
            let dir = root.join(m.only);
            let p = build_chain(&dir, size, &all, m.depth, m.spread, m.fixed, &mut fill)?;
            let it = merge_item(m.item, &p, data / 8 * m.eighths)?;
            if let Some(twin) = m.no_clone {
                items.extend(no_clone(twin, &it));
            }
            items.push(it);
        }
    }
    let mut plan_times = Vec::new();
    if want("sparse") {
        add_cp_sparse(&refs, sparse_data, &mut items)?;
        // Spread over the whole 2 TiB.
        let stride = (TIB2 / BLOCK) / sparse_blocks;
        let sb: Vec<u64> = (0..sparse_blocks).map(|i| i * stride + 7).collect();
        let p = build_chain(
            &root.join("sparse"),
            TIB2,
            &sb,
            1,
            Spread::RoundRobin(Shape::Full),
            false,
            &mut Fill(0x1234_5678_9ABC_DEF1),
        )?;
        items.push(merge_item("merge_sparse_2tib", &p, sparse_data)?);
        items.push(Item::new(
            "dry_run_2tib",
            Kind::DryRun { src: p[0].clone() },
        ));
        // In-process: open the chain (two 2 TiB disks with full-size BATs) and plan.
        plan_times = time_plan(&p[0], args.runs)?;
    }
    let mut full_bat_times = Vec::new();
    if want("fullbat") {
        let child = build_full_bat_chain(&root.join("fullbat"), sparse_blocks, &mut fill)?;
        full_bat_times = time_plan(&child, args.runs)?;
        items.push(Item::new(
            "dry_run_2tib_full_bat",
            Kind::DryRun { src: child },
        ));
    }
    if want("deepsparse") {
        // 32 layers of 2 TiB virtual, 4 blocks each: 32 full-size BATs (4 MiB each).
        let sb: Vec<u64> = (0..128u64).map(|i| i * 8000 + 3).collect();
        let p = build_chain(
            &root.join("deepsparse"),
            TIB2,
            &sb,
            32,
            Spread::RoundRobin(Shape::Full),
            false,
            &mut fill,
        )?;
        items.push(merge_item("merge_32_layers_2tib_sparse", &p, 128 * BLOCK)?);
    }
    if want("flatten")
        && let Some(p) = &full_paths
    {
        for (name, format) in [
            ("flatten_dynamic", "dynamic"),
            ("flatten_raw", "raw"),
            ("flatten_fixed", "fixed"),
        ] {
            items.push(Item::new(
                name,
                Kind::Flatten {
                    src: p[0].clone(),
                    out: root.join("ref").join(format!("flat-{format}.img")),
                    format,
                },
            ));
        }
    }
    let inputs = vhdx::Inputs {
        root: &root,
        bin: &bin,
        units: blocks,
        sparse_units: sparse_blocks,
        runs: args.runs,
        vhd_child: full_paths.as_ref().map(|p| p[0].as_path()),
    };
    let vhdx_times = vhdx::build(&inputs, &want, &mut items, &mut fill)?;
    println!("  built in {:.1} s", t_build.elapsed().as_secs_f64());

    run_rounds(&mut items, &bin, &args, &rss_file)?;
    let big_steps = match args
        .only
        .as_ref()
        .is_some_and(|o| o.iter().any(|x| x == "bigbat"))
    {
        true => bigbat::run_steps(&root, &bin, &rss_file)?,
        false => Vec::new(),
    };

    print_commands(&items);
    print_times("open+plan_2tib_full_bat", &full_bat_times);
    print_times("open+plan_2tib (in-process)", &plan_times);
    for (name, t) in &vhdx_times {
        print_times(name, t);
    }

    println!();
    println!(
        "{:<4} {:<58} {:>8} {:>15} {:>7} {:>5}",
        "#", "target", "measured", "(round ratios)", "limit", ""
    );
    vhd_rows(&items, data, sparse_data, &plan_times, &full_bat_times);
    bigbat::rows(&big_steps);
    vhdx::rows(&items, &vhdx_times);
    println!(
        "  measured: ratio of the medians (or the median); in parentheses: the smallest and largest\n  ratio of two commands timed in the same round (for RSS: the smallest and largest peak)"
    );
    println!("  load avg at the end: {}", loadavg());
    if args.keep {
        let kept = tmp.keep();
        println!("inputs kept in {}", kept.display());
    }
    Ok(())
}
