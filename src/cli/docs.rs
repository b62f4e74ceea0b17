//! `vhd-merge completions SHELL` and `vhd-merge man`: generated from the clap definitions, so
//! that they list exactly the options the parser takes.

use std::process::ExitCode;

use clap::CommandFactory;
use vhd_merge::{Error, Result};

/// The shells `completions` writes scripts for.
#[derive(clap::ValueEnum, Clone, Copy, Debug)]
pub enum Shell {
    /// Bash (source the script, or put it in bash-completion's completions directory).
    Bash,
    /// Zsh (put the script, named `_vhd-merge`, in a directory of `$fpath`).
    Zsh,
    /// Fish (put the script in `~/.config/fish/completions/vhd-merge.fish`).
    Fish,
    /// PowerShell (dot-source the script from the profile).
    Powershell,
}

/// Arguments of `vhd-merge completions`.
#[derive(clap::Args, Debug)]
pub struct CompletionsArgs {
    /// The shell to write the completion script for.
    #[arg(value_enum)]
    pub shell: Shell,
}

/// Print the completion script.
pub fn completions(args: CompletionsArgs) -> Result<ExitCode> {
    use clap_complete::Shell as S;
    let shell = match args.shell {
        Shell::Bash => S::Bash,
        Shell::Zsh => S::Zsh,
        Shell::Fish => S::Fish,
        Shell::Powershell => S::PowerShell,
    };
    let mut cmd = super::Cli::command();
    let mut out = Vec::new();
    clap_complete::generate(shell, &mut cmd, "vhd-merge", &mut out);
    write_stdout(&out)
}

/// Print the manual page: the command, its global options, every verb with its summary, and
/// the exit statuses (`vhd-merge VERB --help` has each verb's options and an example).
pub fn man() -> Result<ExitCode> {
    let mut out = Vec::new();
    clap_mangen::Man::new(super::Cli::command())
        .render(&mut out)
        .map_err(|e| Error::io("rendering the manual page", e))?;
    write_stdout(&out)
}

fn write_stdout(bytes: &[u8]) -> Result<ExitCode> {
    use std::io::Write as _;
    let mut stdout = std::io::stdout().lock();
    stdout
        .write_all(bytes)
        .and_then(|()| stdout.flush())
        .map_err(|e| Error::io("writing to stdout", e))?;
    Ok(ExitCode::SUCCESS)
}
