//! A small end-to-end merge: `cargo run --release --example demo`.
//!
//! Builds a chain in a temporary directory (dynamic base <- child <- grandchild, with partial
//! sector bitmaps and a different block size in the middle), merges the grandchild into the
//! base through the library, checks that the base now reads exactly what the grandchild read
//! before, and prints what it did. Nothing outside the temporary directory is touched; it is
//! removed at the end unless `--keep` is given (`cargo run --release --example demo -- --keep`),
//! to look at the files with `vhd-merge info`.

use std::error::Error;

use vhd_merge::create::{CreateOptions, create_differencing, create_dynamic};
use vhd_merge::merge::{MergeOptions, merge};
use vhd_merge::{Chain, ChainOptions};

const MIB: u64 = 1 << 20;

fn view(path: &std::path::Path) -> Result<Vec<u8>, Box<dyn Error>> {
    let chain = Chain::open(path, &ChainOptions::default())?;
    let mut buf = vec![0u8; chain.layer(0).map_or(0, |l| l.virtual_size()) as usize];
    chain.read_at(0, 0, &mut buf)?;
    Ok(buf)
}

fn main() -> Result<(), Box<dyn Error>> {
    let keep = match std::env::args().nth(1).as_deref() {
        None => false,
        Some("--keep") => true,
        Some(other) => return Err(format!("unknown argument {other:?} (only --keep)").into()),
    };
    let dir = tempfile::tempdir()?;
    let base = dir.path().join("base.vhd");
    let child = dir.path().join("child.vhd");
    let grandchild = dir.path().join("grandchild.vhd");
    let size = 16 * MIB;

    // Base: 4 MiB of 0x11.
    let mut b = create_dynamic(&base, size, &CreateOptions::default())?;
    b.write_at(0, &vec![0x11; 4 * MIB as usize])?;
    drop(b);
    // Child (512 KiB blocks): every other sector of the first MiB, 0x22.
    let small = CreateOptions::default().block_size(512 * 1024);
    let mut c = create_differencing(&child, &base, &small)?;
    for s in (0..2048u64).step_by(2) {
        c.write_at(s * 512, &[0x22; 512])?;
    }
    drop(c);
    // Grandchild (2 MiB blocks): one sector in three of 1..2 MiB as 0x33, and a run of zero
    // sectors at 3 MiB, which must overwrite the base's 0x11.
    let mut g = create_differencing(&grandchild, &child, &CreateOptions::default())?;
    for s in (2048..4096u64).step_by(3) {
        g.write_at(s * 512, &[0x33; 512])?;
    }
    g.write_at(3 * MIB, &[0u8; 64 * 1024])?;
    drop(g);

    let before = view(&grandchild)?;
    println!("built in {}:", dir.path().display());
    for p in [&base, &child, &grandchild] {
        println!("  {} ({} bytes)", p.display(), std::fs::metadata(p)?.len());
    }

    let plan = merge(
        &grandchild,
        Some(&base),
        &MergeOptions::default().dry_run(true),
    )?
    .plan;
    println!(
        "dry run: {} bytes in {} unit(s) from:",
        plan.bytes_total, plan.units
    );
    for l in &plan.layers {
        println!("  {}: {} bytes", l.path.display(), l.bytes);
    }

    let report = merge(
        &grandchild,
        Some(&base),
        &MergeOptions::default().verify(true),
    )?;
    println!(
        "merged {} bytes into {} in {:.3} s ({} new block(s), file grew by {} bytes, verified {} bytes)",
        report.bytes_merged,
        report.destination.display(),
        report.elapsed.as_secs_f64(),
        report.blocks_allocated,
        report.destination_growth,
        report.verified.as_ref().map_or(0, |v| v.bytes)
    );
    let after = view(&base)?;
    if after != before {
        return Err("the base does not read what the grandchild read before the merge".into());
    }
    println!("the base now reads exactly what the grandchild read before the merge");
    let obsolete: Vec<String> = report
        .obsolete
        .iter()
        .map(|p| p.display().to_string())
        .collect();
    println!("now obsolete (left in place): {}", obsolete.join(", "));
    if keep {
        let kept = dir.keep();
        println!(
            "the files are kept in {} (remove it when done)",
            kept.display()
        );
    } else {
        println!(
            "{} is removed now (run with --keep to keep the files)",
            dir.path().display()
        );
    }
    Ok(())
}
