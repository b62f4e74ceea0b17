//! `vhd-merge repair`: fix footers, checksums and bad BAT entries in place.
//!
//! Exit status (like `check`): 0 when no error remains (the file was repaired or needed
//! nothing; warnings are listed); 2 when errors remain that repair does not fix (listed,
//! as `check --deep` finds them); 1 when repair could not run.

use std::path::PathBuf;
use std::process::ExitCode;

use vhd_merge::repair::{RepairOptions, RepairReport, repair_file};
use vhd_merge::{DiskType, Result};

/// Arguments of `vhd-merge repair`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// The VHD or VHDX to repair.
    pub file: PathBuf,
    /// Show what would be done; write nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

/// Run the command.
pub fn run(args: Args) -> Result<ExitCode> {
    // No point to stop at inside the library call, but every write is in a crash-safe order:
    // an interrupt ends the repair at once (see `signal`).
    super::signal::install(
        super::signal::Mode::Exit("interrupted: repair stopped"),
        None,
    );
    let report = repair_file(
        &args.file,
        &RepairOptions {
            dry_run: args.dry_run,
            ..RepairOptions::default()
        },
    )?;
    if args.json {
        super::print_json(&to_json(&report, args.dry_run)?)?;
    } else {
        print_text(&report, args.dry_run);
    }
    Ok(if report.has_errors() {
        ExitCode::from(2)
    } else {
        ExitCode::SUCCESS
    })
}

fn lost_as(report: &RepairReport) -> &'static str {
    if report.disk_type == DiskType::Differencing {
        "now read from the parent"
    } else {
        "now read as zeros"
    }
}

/// Lost ranges of consecutive blocks, merged (a hostile table can drop a million entries):
/// (first block, last block, virtual range, file offset and reason of the first).
fn lost_runs(report: &RepairReport) -> Vec<(u64, u64, std::ops::Range<u64>, u64, &str)> {
    let mut lost: Vec<&vhd_merge::repair::LostRange> = report.lost.iter().collect();
    lost.sort_by_key(|l| l.block);
    let mut out: Vec<(u64, u64, std::ops::Range<u64>, u64, &str)> = Vec::new();
    for l in lost {
        match out.last_mut() {
            Some(run) if run.1 + 1 == l.block && run.2.end == l.virtual_range.start => {
                run.1 = l.block;
                run.2.end = l.virtual_range.end;
            }
            _ => out.push((
                l.block,
                l.block,
                l.virtual_range.clone(),
                l.file_offset,
                &l.reason,
            )),
        }
    }
    out
}

fn print_text(report: &RepairReport, dry_run: bool) {
    let file = report.file.display();
    // `-q`: only the lost data and what is left to fix.
    let summaries = super::summaries();
    if report.actions.is_empty() && !report.has_errors() && summaries {
        println!("{file}: nothing to repair");
    }
    let verb = if dry_run { "would write" } else { "wrote" };
    for a in report.actions.iter().filter(|_| summaries) {
        println!(
            "{file}: {verb} {} ({} bytes at offset {:#x}): {}",
            a.structure, a.len, a.offset, a.reason
        );
    }
    for (first, last, range, file_offset, reason) in lost_runs(report) {
        let blocks = if first == last {
            format!("block {first}")
        } else {
            format!("blocks {first}..={last}")
        };
        println!(
            "{file}: data lost in virtual bytes {}..{} ({blocks}, {}); the old data is at file offset {file_offset:#x}: {reason}",
            range.start,
            range.end,
            lost_as(report),
        );
    }
    for f in &report.not_repaired {
        println!(
            "{file}: not repaired: {} {} [{}]: {}",
            f.severity.name(),
            f.code,
            f.structure,
            f.message
        );
    }
}

fn to_json(report: &RepairReport, dry_run: bool) -> Result<serde_json::Value> {
    Ok(serde_json::json!({
        "path": report.file.display().to_string(),
        "dry_run": dry_run,
        "wrote": report.wrote,
        "actions": report.actions.iter().map(|a| serde_json::json!({
            "structure": a.structure,
            "offset": a.offset,
            "length": a.len,
            "reason": a.reason,
        })).collect::<Vec<_>>(),
        "lost": lost_runs(report).into_iter().map(|(first, last, range, file_offset, reason)| serde_json::json!({
            "first_block": first,
            "last_block": last,
            "virtual_start": range.start,
            "virtual_end": range.end,
            "file_offset": file_offset,
            "now": lost_as(report),
            "reason": reason,
        })).collect::<Vec<_>>(),
        "errors_remain": report.has_errors(),
        "not_repaired": super::to_value(&report.not_repaired)?,
    }))
}
