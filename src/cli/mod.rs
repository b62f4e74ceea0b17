//! The command-line shell over the library: argument parsing, progress, JSON output. No
//! format logic lives here.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use serde_json::{Value, json};
use vhd_merge::{ChainOptions, Error, Result};

mod chain;
mod check;
mod create;
mod docs;
mod flatten;
mod info;
mod info_vhdx;
mod merge;
mod progress;
mod repair;
mod set_parent;
mod signal;
mod units;

/// Merge, inspect, create and repair Microsoft VHD files.
#[derive(Parser, Debug)]
#[command(name = "vhd-merge", version, about, after_long_help = EXIT_STATUS_HELP)]
pub struct Cli {
    /// No progress bar and no summary on success (errors and warnings still go to stderr;
    /// what a command exists to print, such as `info`, `chain` or `--json`, still does).
    #[arg(long, short, global = true, conflicts_with = "verbose")]
    quiet: bool,
    /// More detail: the plan of a merge, the layers a flatten reads and how long it took.
    #[arg(long, short, global = true)]
    verbose: bool,
    #[command(subcommand)]
    command: Command,
}

/// The exit statuses, in `vhd-merge --help`.
const EXIT_STATUS_HELP: &str = "\
Exit status: 0 on success; 1 when the command failed; 2 for a parameter error (every error
32773, Invalid parameter, command-line usage errors included) and, for `check` and `repair`,
when the file has errors left; 130 when Ctrl-C, SIGTERM or SIGHUP stopped the command.";

/// How much the commands print, from `-q` and `-v`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Verbosity {
    /// `-q`.
    Quiet,
    /// Neither.
    Normal,
    /// `-v`.
    Verbose,
}

static VERBOSITY: std::sync::OnceLock<Verbosity> = std::sync::OnceLock::new();

/// The verbosity the command line asked for.
pub fn verbosity() -> Verbosity {
    VERBOSITY.get().copied().unwrap_or(Verbosity::Normal)
}

/// True unless `-q`: print the summary of a command that succeeded.
pub fn summaries() -> bool {
    verbosity() > Verbosity::Quiet
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Show a VHD's footer, header, locators and allocation, or a VHDX's headers, log,
    /// regions, metadata and block states.
    #[command(after_long_help = "Example:\n  vhd-merge info disk.vhd --json")]
    Info(info::Args),
    /// Create a fixed, dynamic or differencing VHD or VHDX.
    #[command(
        after_long_help = "Examples:\n  vhd-merge create dynamic base.vhd --size 64G\n  vhd-merge create differencing child.vhd --parent base.vhd\n  vhd-merge create dynamic disk.vhdx --size 64G --sector-size 4096"
    )]
    Create(create::Args),
    /// List the chain of a differencing VHD, child first.
    #[command(after_long_help = "Example:\n  vhd-merge chain child.vhd --search-dir /moved/disks")]
    Chain(chain::Args),
    /// Re-point a differencing VHD at a moved, renamed or replaced parent.
    #[command(after_long_help = "Example:\n  vhd-merge set-parent child.vhd /new/place/base.vhd")]
    SetParent(set_parent::Args),
    /// Write the logical content of a chain to a new standalone file.
    #[command(
        after_long_help = "Example:\n  vhd-merge flatten child.vhd standalone.vhd --format dynamic"
    )]
    Flatten(flatten::Args),
    /// Merge a differencing VHD into its parent or an ancestor.
    #[command(
        after_long_help = "Examples:\n  vhd-merge merge child.vhd --dry-run\n  vhd-merge merge child.vhd base.vhd --verify --remove-merged"
    )]
    Merge(merge::Args),
    /// Validate a VHD or VHDX (and with --chain its whole chain).
    #[command(after_long_help = "Example:\n  vhd-merge check child.vhd --chain --deep")]
    Check(check::Args),
    /// Repair footers, checksums and bad BAT entries of a VHD; replay a VHDX's log and
    /// restore its headers and region tables.
    #[command(after_long_help = "Example:\n  vhd-merge repair disk.vhd --dry-run")]
    Repair(repair::Args),
    /// Print a completion script for SHELL on stdout.
    #[command(
        after_long_help = "Example:\n  vhd-merge completions bash > /usr/share/bash-completion/completions/vhd-merge"
    )]
    Completions(docs::CompletionsArgs),
    /// Print the manual page (roff) on stdout.
    #[command(
        after_long_help = "Example:\n  vhd-merge man > /usr/local/share/man/man1/vhd-merge.1"
    )]
    Man,
}

impl Command {
    /// True when the command was given `--json`: its one JSON object goes to stdout, on
    /// failure too.
    fn json(&self) -> bool {
        match self {
            Command::Info(a) => a.json,
            Command::Create(a) => a.json(),
            Command::Chain(a) => a.json,
            Command::SetParent(a) => a.json,
            Command::Flatten(a) => a.json,
            Command::Merge(a) => a.json,
            Command::Check(a) => a.json,
            Command::Repair(a) => a.json,
            Command::Completions(_) | Command::Man => false,
        }
    }
}

/// The version of the `--json` schema (docs/json.md): raised when a field changes meaning or
/// goes away, not when one is added.
pub const SCHEMA_VERSION: u64 = 1;

/// Print `v`, a command's one JSON object, on stdout with `schema_version` added.
pub fn print_json(v: &Value) -> Result<()> {
    let mut v = v.clone();
    if let Some(m) = v.as_object_mut() {
        m.insert("schema_version".into(), SCHEMA_VERSION.into());
    }
    let text = serde_json::to_string_pretty(&v)
        .map_err(|e| Error::InvalidState(format!("cannot encode JSON: {e}")))?;
    // Not println!: a closed pipe (`| head`) is an error to report, not a panic.
    use std::io::Write;
    writeln!(std::io::stdout().lock(), "{text}").map_err(|e| Error::io("writing stdout", e))
}

/// A library report as a JSON value (its serde derive), to print with [`print_json`].
pub fn to_value<T: serde::Serialize>(report: &T) -> Result<Value> {
    serde_json::to_value(report)
        .map_err(|e| Error::InvalidState(format!("cannot encode JSON: {e}")))
}

/// The `error` member of a failed command's JSON: `{"return_code", "name", "message"}`.
pub fn error_json(e: &Error) -> Value {
    let rc = e.return_code();
    json!({"return_code": rc.code(), "name": rc.name(), "message": e.to_string()})
}

/// Fail with `e`: with `--json` first the object `{"error": ...}` on stdout, then the error
/// line on stderr as always; the exit status of [`fail`].
pub fn fail_json(e: &Error, json: bool) -> ExitCode {
    if json {
        let _ = print_json(&json!({ "error": error_json(e) }));
    }
    fail(e)
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
        let mut o = ChainOptions::default()
            .parent(self.parent.clone())
            .search_dirs(self.search_dirs.clone())
            .lenient(self.lenient);
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
/// `error <code> (<name>):`, and return its exit status (see [`exit_status`]).
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
    exit_status(e)
}

/// The exit status of a failed command (see [`EXIT_STATUS_HELP`]): 130 for a job an interrupt
/// cancelled, 2 for a parameter error (the one path every check of the arguments ends in, as
/// clap's usage errors do), 1 otherwise.
fn exit_status(e: &Error) -> ExitCode {
    if matches!(e, Error::Cancelled(_)) {
        ExitCode::from(signal::EXIT_INTERRUPTED)
    } else if e.return_code() == vhd_merge::ReturnCode::InvalidParameter {
        ExitCode::from(EXIT_USAGE)
    } else {
        ExitCode::FAILURE
    }
}

/// The exit status of a parameter error.
const EXIT_USAGE: u8 = 2;

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
            ExitCode::from(EXIT_USAGE)
        } else {
            ExitCode::SUCCESS
        };
    }
    let rc = vhd_merge::ReturnCode::InvalidParameter;
    let text = e.render().to_string();
    let mut lines = text.lines().filter(|l| !l.trim().is_empty());
    let first = lines.next().unwrap_or("invalid arguments");
    let first = first.strip_prefix("error: ").unwrap_or(first);
    // The arguments did not parse, so `--json` is looked for as given: the error object.
    if std::env::args_os().skip(1).any(|a| a == "--json") {
        let e = Error::InvalidParameter(first.to_string());
        let _ = print_json(&json!({ "error": error_json(&e) }));
    }
    eprintln!("error {} ({}): {first}", rc.code(), rc.name());
    for l in lines {
        eprintln!("{l}");
    }
    ExitCode::from(EXIT_USAGE)
}

/// Run the command line.
pub fn run() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return usage_error(&e),
    };
    let v = match (cli.quiet, cli.verbose) {
        (true, _) => Verbosity::Quiet,
        (_, true) => Verbosity::Verbose,
        _ => Verbosity::Normal,
    };
    let _ = VERBOSITY.set(v);
    let json = cli.command.json();
    let res = match cli.command {
        Command::Info(a) => info::run(a),
        Command::Create(a) => create::run(a),
        Command::Chain(a) => chain::run(a),
        Command::SetParent(a) => set_parent::run(a),
        Command::Flatten(a) => flatten::run(a),
        Command::Merge(a) => merge::run(a),
        Command::Check(a) => check::run(a),
        Command::Repair(a) => repair::run(a),
        Command::Completions(a) => docs::completions(a),
        Command::Man => docs::man(),
    };
    signal::yield_to_exit();
    match res {
        Ok(code) => code,
        Err(e) => fail_json(&e, json),
    }
}
