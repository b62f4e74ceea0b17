//! The command-line shell over the library: argument parsing, progress, JSON output. No
//! format logic lives here.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use vhd_merge::{ChainOptions, Error};

mod chain;
mod check;
mod create;
mod flatten;
mod info;
mod merge;
mod progress;
mod repair;
mod set_parent;

/// Merge, inspect, create and repair Microsoft VHD files.
#[derive(Parser, Debug)]
#[command(name = "vhd-merge", version, about)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Show a VHD's footer, header, locators and allocation.
    Info(info::Args),
    /// Create a fixed, dynamic or differencing VHD.
    Create(create::Args),
    /// List the chain of a differencing VHD, child first.
    Chain(chain::Args),
    /// Re-point a differencing VHD at a moved, renamed or replaced parent.
    SetParent(set_parent::Args),
    /// Write the logical content of a chain to a new standalone file.
    Flatten(flatten::Args),
    /// Merge a differencing VHD into its parent or an ancestor.
    Merge(merge::Args),
    /// Validate a VHD (and with --chain its whole chain).
    Check(check::Args),
    /// Repair footers, checksums and bad BAT entries.
    Repair(repair::Args),
}

/// Options for opening a chain, shared by every command that opens one.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct ChainArgs {
    /// Use PATH as the parent of the first differencing disk, whatever its locators say.
    #[arg(long, value_name = "PATH")]
    pub parent: Option<PathBuf>,
    /// Also look for parents (by name) in DIR; repeatable.
    #[arg(long = "search-dir", value_name = "DIR")]
    pub search_dirs: Vec<PathBuf>,
    /// Untrusted input: ignore absolute locators and accept parents only inside the child's
    /// directory and the search directories.
    #[arg(long)]
    pub confine: bool,
    /// Accept checksum mismatches (with a warning).
    #[arg(long)]
    pub lenient: bool,
}

impl ChainArgs {
    /// The library options these arguments stand for, for a chain starting at `child`.
    pub fn options(&self, child: &std::path::Path) -> ChainOptions {
        let mut o = ChainOptions {
            parent: self.parent.clone(),
            search_dirs: self.search_dirs.clone(),
            lenient: self.lenient,
            ..ChainOptions::default()
        };
        if self.confine {
            o.ignore_absolute_locators = true;
            let mut dirs = self.search_dirs.clone();
            let child_dir = child
                .parent()
                .filter(|p| !p.as_os_str().is_empty())
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from("."));
            dirs.push(child_dir);
            if let Some(p) = self.parent.as_ref().and_then(|p| p.parent())
                && !p.as_os_str().is_empty()
            {
                dirs.push(p.to_path_buf());
            }
            o.confine_to = Some(dirs);
        }
        o
    }
}

/// Print an error the way every command does: one line on stderr starting with
/// `error <code> (<name>):`, and return a failing exit status.
pub fn fail(e: &Error) -> ExitCode {
    let rc = e.return_code();
    let msg = e.to_string();
    let mut lines = msg.lines();
    eprintln!(
        "error {} ({}): {}",
        rc.code(),
        rc.name(),
        lines.next().unwrap_or("")
    );
    for l in lines {
        eprintln!("{l}");
    }
    ExitCode::FAILURE
}

/// Report a command-line usage error like every other failure: one line starting with
/// `error 32773 (Invalid parameter):`, then clap's usage hint; exit status 2 (clap's own
/// convention for usage errors). `--help` and `--version` print as usual and succeed.
fn usage_error(e: &clap::Error) -> ExitCode {
    use clap::error::ErrorKind;
    if matches!(
        e.kind(),
        ErrorKind::DisplayHelp
            | ErrorKind::DisplayVersion
            | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
    ) {
        let _ = e.print();
        return if e.kind() == ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand {
            ExitCode::from(2)
        } else {
            ExitCode::SUCCESS
        };
    }
    let rc = vhd_merge::ReturnCode::InvalidParameter;
    let text = e.render().to_string();
    let mut lines = text.lines().filter(|l| !l.trim().is_empty());
    let first = lines.next().unwrap_or("invalid arguments");
    let first = first.strip_prefix("error: ").unwrap_or(first);
    eprintln!("error {} ({}): {first}", rc.code(), rc.name());
    for l in lines {
        eprintln!("{l}");
    }
    ExitCode::from(2)
}

/// Run the command line.
pub fn run() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return usage_error(&e),
    };
    let res = match cli.command {
        Command::Info(a) => info::run(a),
        Command::Create(a) => create::run(a),
        Command::Chain(a) => chain::run(a),
        Command::SetParent(a) => set_parent::run(a),
        Command::Flatten(a) => flatten::run(a),
        Command::Merge(a) => merge::run(a),
        Command::Check(a) => check::run(a),
        Command::Repair(a) => repair::run(a),
    };
    match res {
        Ok(code) => code,
        Err(e) => fail(&e),
    }
}
