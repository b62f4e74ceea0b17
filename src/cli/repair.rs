//! `vhd-merge repair`: fix footers, checksums and bad BAT entries in place.
//!
//! Exit status (like `check`): 0 when no error remains (the file was repaired or needed
//! nothing; warnings are listed); 2 when errors remain that repair does not fix (listed,
//! as `check --deep` finds them); 1 when repair could not run.

use std::path::PathBuf;
use std::process::ExitCode;

use vhd_merge::Result;
use vhd_merge::repair::{RepairOptions, RepairReport, repair_file};

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
    let report = repair_file(&args.file, &RepairOptions::default().dry_run(args.dry_run))?;
    if args.json {
        super::print_json(&super::to_value(&report)?)?;
    } else {
        print_text(&report);
    }
    Ok(if report.has_errors() {
        ExitCode::from(2)
    } else {
        ExitCode::SUCCESS
    })
}

fn print_text(report: &RepairReport) {
    let file = report.file.display();
    // `-q`: only the lost data and what is left to fix.
    let summaries = super::summaries();
    if report.actions.is_empty() && !report.has_errors() && summaries {
        println!("{file}: nothing to repair");
    }
    let verb = if report.dry_run {
        "would write"
    } else {
        "wrote"
    };
    for a in report.actions.iter().filter(|_| summaries) {
        println!(
            "{file}: {verb} {} ({} bytes at offset {:#x}): {}",
            a.structure, a.len, a.offset, a.reason
        );
    }
    for run in report.lost_runs() {
        let (first, last) = (run.first_block, run.last_block);
        let blocks = if first == last {
            format!("block {first}")
        } else {
            format!("blocks {first}..={last}")
        };
        println!(
            "{file}: data lost in virtual bytes {}..{} ({blocks}, {}); the old data is at file offset {:#x}: {}",
            run.virtual_start, run.virtual_end, run.now, run.file_offset, run.reason,
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
