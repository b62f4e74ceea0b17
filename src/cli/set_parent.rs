//! `vhd-merge set-parent`: re-point a differencing disk at a moved, renamed or replaced parent.

use std::path::PathBuf;
use std::process::ExitCode;

use vhd_merge::{Result, SetParentOptions, set_parent};

/// Arguments of `vhd-merge set-parent`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// The differencing VHD to re-point.
    pub child: PathBuf,
    /// Its parent's new path.
    pub parent: PathBuf,
    /// Accept a parent whose unique id differs from the one the child records; the child
    /// adopts the new id (its content then reads through a different disk).
    #[arg(long)]
    pub force: bool,
    /// Accept checksum mismatches in the child or the parent (with a warning).
    #[arg(long)]
    pub lenient: bool,
    /// Print one JSON object instead of text (docs/json.md).
    #[arg(long)]
    pub json: bool,
}

/// Run the command.
pub fn run(args: Args) -> Result<ExitCode> {
    let opts = SetParentOptions::default()
        .force(args.force)
        .lenient(args.lenient);
    // Locators, then the header, each synced: an interrupt ends it at once (see `signal`).
    super::signal::install(
        super::signal::Mode::Exit("interrupted: set-parent stopped"),
        None,
    );
    let r = set_parent(&args.child, &args.parent, &opts)?;
    if args.json {
        super::print_json(&super::to_value(&r)?)?;
        return Ok(ExitCode::SUCCESS);
    }
    for w in &r.warnings {
        eprintln!("warning: {w}");
    }
    if super::summaries() {
        print_report(&r);
    }
    Ok(ExitCode::SUCCESS)
}

fn print_report(r: &vhd_merge::SetParentReport) {
    println!(
        "{}: parent set to {}",
        r.child.display(),
        r.parent.display()
    );
    if r.id_changed {
        println!(
            "  parent unique id {} (was {}; forced)",
            r.parent_id, r.old_parent_id
        );
    } else {
        println!("  parent unique id {} (unchanged)", r.parent_id);
    }
    println!(
        "  parent name \"{}\" (was \"{}\")",
        r.parent_name, r.old_parent_name
    );
    for (k, v) in &r.locator_keys {
        println!("  locator key {k} = \"{v}\"");
    }
    for l in &r.locators {
        println!(
            "  locator {} {} \"{}\" at offset {} ({})",
            l.slot,
            l.platform_code.name(),
            l.text,
            l.offset,
            if l.reused {
                "reused its old space"
            } else {
                "new space after the data"
            }
        );
    }
}
