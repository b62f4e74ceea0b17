//! The `bigbat` row (issue 10 item 3): a 2040 GiB dynamic VHD with 512-byte blocks, whose BAT
//! is 0xFF000000 entries (16 GiB less 64 MiB), created, opened, checked and planned (a merge
//! of a small child into it) by the CLI, each with its peak RSS (GNU time) and wall time.
//! Run only when named (`--only bigbat`): it writes a 16 GiB file.
//!
//! The BAT cannot be a hole on disk: an unused entry is 0xFFFFFFFF, and a hole reads as
//! entry 0 (a block at sector 0, over the footer copy), so `create` writes the whole table
//! and every open streams it once to find the allocated entries (no SEEK_DATA to skip).

use std::ffi::OsStr;
use std::path::Path;
use std::time::Instant;

use vhd_merge::{OpenOptions, Vhd};

use super::{Res, row, run};

/// Blocks of the child written (2 MiB blocks, spread over the disk).
const CHILD_BLOCKS: u64 = 16;

/// Run one CLI step: its wall time (s), peak RSS (KiB) and stdout.
fn step(bin: &Path, args: &[&OsStr], rss_file: &Path) -> Res<(f64, u64, String)> {
    let t0 = Instant::now();
    let o = run(bin, args, rss_file)?;
    let secs = t0.elapsed().as_secs_f64();
    if !o.ok {
        return Err(format!("{args:?} failed: {}{}", o.stdout, o.stderr).into());
    }
    let rss = o.rss_kib.ok_or("no peak RSS: /usr/bin/time is needed")?;
    Ok((secs, rss, o.stdout))
}

/// One step's name, wall time (s) and peak RSS (KiB).
pub type Steps = Vec<(&'static str, f64, u64)>;

/// Build and run the steps, printing their table: create the disk, a 2 MiB-block child with
/// a few blocks written (through the library), then `info` (open), `check` and
/// `merge --dry-run` (plan).
pub fn run_steps(root: &Path, bin: &Path, rss_file: &Path) -> Res<Steps> {
    let dir = root.join("bigbat");
    std::fs::create_dir_all(&dir)?;
    let (base, child) = (dir.join("base.vhd"), dir.join("child.vhd"));
    let os = OsStr::new;
    let mut steps: Steps = Vec::new();
    let create = [
        os("create"),
        os("dynamic"),
        base.as_os_str(),
        os("--size"),
        os("2040G"),
        os("--block-size"),
        os("512"),
        os("--quiet"),
    ];
    let (t, k, _) = step(bin, &create, rss_file)?;
    steps.push(("create 2040G --block-size 512", t, k));
    let diff = [
        os("create"),
        os("differencing"),
        child.as_os_str(),
        os("--parent"),
        base.as_os_str(),
        os("--block-size"),
        os("2M"),
        os("--quiet"),
    ];
    step(bin, &diff, rss_file)?;
    let mut v = Vhd::open(&child, OpenOptions::writable())?;
    let stride = v.virtual_size() / CHILD_BLOCKS;
    for i in 0..CHILD_BLOCKS {
        v.write_at(i * stride + 4096, &[0x5A; 64 << 10])?;
    }
    v.finish()?;
    drop(v);
    let cmds: [(&'static str, Vec<&OsStr>); 3] = [
        ("info (open)", vec![os("info"), base.as_os_str()]),
        ("check", vec![os("check"), base.as_os_str()]),
        (
            "merge --dry-run (open chain + plan)",
            vec![
                os("merge"),
                child.as_os_str(),
                os("--dry-run"),
                os("--json"),
            ],
        ),
    ];
    let mut planned = 0;
    for (name, args) in cmds {
        let (t, k, out) = step(bin, &args, rss_file)?;
        steps.push((name, t, k));
        if args[0] == "merge" {
            let v: serde_json::Value = serde_json::from_str(out.trim())?;
            planned = v["plan"]["bytes_total"].as_u64().unwrap_or(0);
        }
    }
    let want = CHILD_BLOCKS * (64 << 10);
    if planned != want {
        return Err(format!("the plan merges {planned} bytes, not the {want} written").into());
    }
    let meta = std::fs::metadata(&base)?;
    println!();
    println!(
        "bigbat: base {} bytes ({} MiB on disk), BAT 0xFF000000 entries; the BAT is not a hole (unused entries are 0xFFFFFFFF), so each open streams it once; the plan merges {planned} bytes",
        meta.len(),
        on_disk(&meta) >> 20
    );
    println!("{:<40} {:>10} {:>12}", "step", "seconds", "peak RSS MiB");
    for (name, t, k) in &steps {
        println!("{name:<40} {t:>10.2} {:>12.1}", *k as f64 / 1024.0);
    }
    std::fs::remove_dir_all(&dir)?;
    Ok(steps)
}

/// The targets row: the worst peak RSS of the steps (in parentheses the smallest).
pub fn rows(steps: &Steps) {
    let Some(worst) = steps.iter().map(|s| s.2).max() else {
        return;
    };
    let best = steps.iter().map(|s| s.2).min().unwrap_or(worst);
    let mib = |k: u64| k as f64 / 1024.0;
    row(
        "7b",
        "2040 GiB at 512-byte blocks: create/open/check/plan peak RSS",
        Some((mib(worst), mib(best), mib(worst))),
        Some(64.0),
        "MiB",
    );
}

/// The bytes a file takes on disk (its length where the platform does not say).
fn on_disk(meta: &std::fs::Metadata) -> u64 {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        meta.blocks() * 512
    }
    #[cfg(not(unix))]
    {
        meta.len()
    }
}
