//! The `vhd-merge` command-line tool. See `vhd-merge --help`.

mod cli;

fn main() -> std::process::ExitCode {
    cli::run()
}
