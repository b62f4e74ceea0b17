//! `vhd-merge merge` (not implemented yet: placeholder while the branch that owns it is built).

use std::process::ExitCode;

use vhd_merge::{Error, Result};

/// Arguments of `vhd-merge merge`.
#[derive(clap::Args, Debug)]
pub struct Args {}

/// Run the command.
pub fn run(_args: Args) -> Result<ExitCode> {
    Err(Error::not_supported(
        "vhd-merge merge is not implemented yet",
    ))
}
