//! Interrupts: Ctrl-C (SIGINT), SIGTERM and SIGHUP (on Windows Ctrl-C, Ctrl-Break and closing
//! the console), for the commands that write files.
//!
//! - `merge` and `flatten`: the first interrupt asks the job to stop before its next unit or
//!   span; the merge commits what it wrote, the flatten removes its temporary file; the command
//!   prints its error line and exits with [`EXIT_INTERRUPTED`].
//! - `repair` and `set-parent` have no point to stop at (their library calls run to the end),
//!   but write in a crash-safe order: the first interrupt ends them at once.
//! - A second interrupt ends any of them at once: what is on disk is what a crash at that
//!   moment leaves, which the crash-safe write order keeps valid (a flatten's temporary file
//!   is removed first).
//!
//! Commands that only read keep the default handling (the process ends at once).

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};

/// Set once an exit at once has begun: from then on the handler's thread owns the exit.
static EXITING: AtomicBool = AtomicBool::new(false);

/// The exit status of a command stopped by an interrupt: 128 + SIGINT, what shells report for
/// a command ended by Ctrl-C (the handler cannot tell which signal it was).
pub const EXIT_INTERRUPTED: u8 = 130;

/// How the first interrupt is handled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Set the cancel flag; the job stops at its next safe point.
    Cancel,
    /// Exit at once, after the message `verb` names.
    Exit(&'static str),
}

/// Install the handler for this process (once). Returns the cancel flag the first interrupt
/// sets in [`Mode::Cancel`], or `None` when no handler could be installed (the default
/// handling stays). With `temp_of`, an exit at once first removes the temporary files a
/// flatten to that output writes.
pub fn install(mode: Mode, temp_of: Option<&Path>) -> Option<Arc<AtomicBool>> {
    let cancel = Arc::new(AtomicBool::new(false));
    let flag = cancel.clone();
    let temp = temp_of.and_then(temp_files);
    let count = AtomicU32::new(0);
    let handler = move || {
        let first = count.fetch_add(1, Ordering::SeqCst) == 0;
        match mode {
            Mode::Cancel if first => flag.store(true, Ordering::SeqCst),
            Mode::Cancel => exit_now("interrupted again: exiting at once", temp.as_ref()),
            Mode::Exit(verb) => exit_now(verb, temp.as_ref()),
        }
    };
    ctrlc::set_handler(handler).ok().map(|()| cancel)
}

/// The directory and the name prefix of the temporary files of a flatten to `output`.
fn temp_files(output: &Path) -> Option<(PathBuf, String)> {
    let prefix = vhd_merge::flatten::temp_prefix(output).ok()?;
    let dir = match output.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    Some((dir, prefix))
}

/// Remove the temporary files, print `why` and exit with [`EXIT_INTERRUPTED`].
fn exit_now(why: &str, temp: Option<&(PathBuf, String)>) -> ! {
    EXITING.store(true, Ordering::SeqCst);
    if let Some((dir, prefix)) = temp
        && let Ok(entries) = std::fs::read_dir(dir)
    {
        for e in entries.flatten() {
            let name = e.file_name();
            let name = name.to_string_lossy();
            if name.starts_with(prefix.as_str()) && name.ends_with(".tmp") {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
    // Erase a progress bar on the current line first.
    let erase = if std::io::stderr().is_terminal() {
        "\r\x1b[2K"
    } else {
        ""
    };
    eprintln!(
        "{erase}vhd-merge: {why} (exit status {EXIT_INTERRUPTED}); files are written in a crash-safe order: re-run the command to finish"
    );
    std::process::exit(EXIT_INTERRUPTED.into())
}

/// Called by the command's thread before it reports its result: when an exit at once has
/// begun (the handler may be removing the temporary files the command is still using, which
/// makes the command fail), wait for the handler's exit instead of reporting that failure or
/// exiting with another status.
pub fn yield_to_exit() {
    while EXITING.load(Ordering::SeqCst) {
        std::thread::park_timeout(std::time::Duration::from_millis(100));
    }
}
