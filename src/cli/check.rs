//! `vhd-merge check`: validate a file, or with `--chain` its whole chain.
//!
//! Exit status: 0 when no error was found (warnings and notes allowed), 2 when the check
//! found at least one error, 1 when the check could not run (the message says why).

use std::path::PathBuf;
use std::process::ExitCode;

use vhd_merge::Result;
use vhd_merge::check::{CheckOptions, CheckReport, Severity, check_chain, check_file};

use super::ChainArgs;

/// Arguments of `vhd-merge check`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// The VHD or VHDX to check.
    pub file: PathBuf,
    /// Also check every ancestor and the links between them.
    #[arg(long)]
    pub chain: bool,
    /// Also read every block: never-written sectors are zero, bitmaps and batmap agree.
    #[arg(long)]
    pub deep: bool,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
    /// How to find the parents (with --chain).
    #[command(flatten)]
    pub chain_args: ChainArgs,
}

/// Run the command.
pub fn run(args: Args) -> Result<ExitCode> {
    let opts = CheckOptions::default().deep(args.deep);
    let report = if args.chain {
        check_chain(&args.file, &opts, &args.chain_args.options(&args.file))?
    } else {
        check_file(&args.file, &opts)?
    };
    if args.json {
        super::print_json(&to_json(&args.file, &report)?)?;
    } else if report.has_errors() || super::summaries() {
        // `-q`: nothing for a file without errors (the exit status says so).
        print_text(&report);
    }
    Ok(if report.has_errors() {
        ExitCode::from(2)
    } else {
        ExitCode::SUCCESS
    })
}

fn print_text(report: &CheckReport) {
    for f in &report.findings {
        let mut at = String::new();
        if let Some(o) = f.offset {
            at.push_str(&format!(" at offset {o:#x}"));
        }
        println!(
            "{}: {} [{}{}] {}",
            f.file.display(),
            f.severity.name(),
            f.structure,
            at,
            f.message
        );
    }
    println!(
        "{} error(s), {} warning(s), {} note(s) in {} file(s)",
        report.count(Severity::Error),
        report.count(Severity::Warning),
        report.count(Severity::Info),
        report.files.len()
    );
}

/// The report as a JSON value (docs/json.md): the library's `CheckReport` (`paths`,
/// `findings`: `severity`, `code`, `path`, `structure`, `offset`, `block`, `message`) with the
/// file checked as `path`, `ok` and the `*_count` of each severity.
pub fn to_json(path: &std::path::Path, report: &CheckReport) -> Result<serde_json::Value> {
    let mut v = super::to_value(report)?;
    v["path"] = path.display().to_string().into();
    v["ok"] = (!report.has_errors()).into();
    v["error_count"] = report.count(Severity::Error).into();
    v["warning_count"] = report.count(Severity::Warning).into();
    v["info_count"] = report.count(Severity::Info).into();
    Ok(v)
}
