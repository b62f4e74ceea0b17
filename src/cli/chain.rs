//! `vhd-merge chain`: list a chain child first, with how each parent was found.

use std::path::PathBuf;
use std::process::ExitCode;

use vhd_merge::{Chain, Result};

use super::ChainArgs;

use super::units::human;

/// Arguments of `vhd-merge chain`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// The VHD to start from (usually the newest differencing disk).
    pub file: PathBuf,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub chain: ChainArgs,
}

/// Run the command.
pub fn run(args: Args) -> Result<ExitCode> {
    let chain = Chain::open(&args.file, &args.chain.options(&args.file))?;
    let report = chain.report();
    if args.json {
        super::print_json(&super::to_value(&report)?)?;
        return Ok(ExitCode::SUCCESS);
    }
    for l in &report.layers {
        let v = &l.layer;
        println!("layer {}: {}", l.index, v.path.display());
        let block = match v.block_size {
            None => String::new(),
            Some(b) => format!(", block size {}", human(b)),
        };
        println!(
            "  type {}, virtual size {} ({} bytes){block}",
            v.disk_type.name(),
            human(v.virtual_size),
            v.virtual_size
        );
        println!("  unique id {}", v.unique_id);
        if l.index == 0 {
            println!("  opened as given");
        } else {
            println!("  found by {}", l.found_by);
        }
        for w in &l.warnings {
            println!("  warning: {w}");
        }
    }
    Ok(ExitCode::SUCCESS)
}
