//! The one progress bar of the command line (merge and flatten): bytes done of bytes to do,
//! on stderr when it is a terminal, never wider than the terminal, and cleared at the end;
//! or, with `--progress json`, one JSON line per event on stderr for programs (docs/json.md).

use std::io::IsTerminal;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use vhd_merge::JobState;

/// How `merge` and `flatten` show progress (`--progress`).
#[derive(clap::ValueEnum, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Style {
    /// A bar on stderr when it is a terminal (none with -q or --json).
    #[default]
    Bar,
    /// One JSON line on stderr per event: each state change and each new whole percent.
    Json,
}

/// The bar's layout: everything but the bar has a bounded width (at most 59 columns with
/// 4-digit eta hours); `wide_bar` takes what the terminal has left, so that the line never
/// wraps (a wrapped line is not cleared completely).
/// The bar's line; `{done}`, `{total}` and `{rate}` are written by [`super::units::human`], as
/// the final messages are.
const TEMPLATE: &str = "{spinner} {msg} [{wide_bar}] {done}/{total} {rate} eta {eta}";

/// [`TEMPLATE`] with its byte fields.
fn style() -> Option<indicatif::ProgressStyle> {
    use super::units::human;
    use indicatif::ProgressState;
    use std::fmt::Write;
    let style = indicatif::ProgressStyle::with_template(TEMPLATE).ok()?;
    Some(
        style
            .with_key("done", |s: &ProgressState, w: &mut dyn Write| {
                let _ = w.write_str(&human(s.pos()));
            })
            .with_key("total", |s: &ProgressState, w: &mut dyn Write| {
                let _ = w.write_str(&human(s.len().unwrap_or(0)));
            })
            .with_key("rate", |s: &ProgressState, w: &mut dyn Write| {
                let _ = write!(w, "{}/s", human(s.per_sec() as u64));
            })
            .progress_chars("=> "),
    )
}

/// The state, percent and bytes done of the last `--progress json` line (None before the first).
type LastLine = Option<(JobState, u64, u64)>;

/// A progress bar, or nothing when stderr is not a terminal or the caller asked for quiet.
/// Clones share one bar.
#[derive(Clone)]
pub struct Bar {
    bar: Option<indicatif::ProgressBar>,
    /// Set by [`Bar::clear`]: later updates (a worker's last report) draw nothing.
    done: Arc<AtomicBool>,
    /// `--progress json`: the last line's (state, percent, bytes done), so that a line is
    /// printed only when the state or the percent changes and never with fewer bytes than the
    /// one before (workers report concurrently; the lock keeps the lines in order).
    json: Option<Arc<Mutex<LastLine>>>,
}

impl Bar {
    /// A bar labelled `verb` (`merging`, `flattening`), shown only when `show` and stderr is
    /// a terminal.
    pub fn new(verb: &'static str, show: bool) -> Bar {
        let bar = (show && std::io::stderr().is_terminal()).then(|| {
            let b = indicatif::ProgressBar::new(0);
            if let Some(style) = style() {
                b.set_style(style);
            }
            b.set_message(verb);
            b
        });
        Bar {
            bar,
            done: Arc::new(AtomicBool::new(false)),
            json: None,
        }
    }

    /// The bar `style` asks for: [`Bar::new`], or JSON lines (whatever `show` says: a program
    /// asked for them).
    pub fn with_style(verb: &'static str, style: Style, show: bool) -> Bar {
        match style {
            Style::Bar => Bar::new(verb, show),
            Style::Json => Bar {
                json: Some(Arc::new(Mutex::new(None))),
                ..Bar::new(verb, false)
            },
        }
    }

    /// `done` of `total` bytes, running.
    pub fn set(&self, done: u64, total: u64) {
        self.event(JobState::Running, done, total);
    }

    /// An event in `state` with `done` of `total` bytes: the bar moves while running; a JSON
    /// line is printed when the state or the whole percent changed.
    pub fn event(&self, state: JobState, done: u64, total: u64) {
        if let Some(last) = &self.json {
            let percent = match (state, total) {
                (JobState::Completed, _) => 100,
                (_, 0) => 0,
                _ => (done.min(total) as u128 * 100 / total as u128) as u64,
            };
            if let Ok(mut last) = last.lock() {
                let stale = last.is_some_and(|(s, p, d)| {
                    (s, p) == (state, percent) || (state == JobState::Running && done < d)
                });
                if !stale {
                    *last = Some((state, percent, done));
                    eprintln!("{}", json_line(state, done, total, percent));
                }
            }
        }
        if state != JobState::Running {
            return;
        }
        if let Some(b) = &self.bar
            && !self.done.load(Ordering::SeqCst)
        {
            b.set_length(total);
            b.set_position(done.min(total));
        }
    }

    /// Remove the bar from the screen for good, before the final message is printed.
    pub fn clear(&self) {
        self.done.store(true, Ordering::SeqCst);
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}

/// The final state of a job that ended with `error` (None: it succeeded): Completed,
/// Terminated (cancelled by a signal) or Exception.
pub fn final_state(error: Option<&vhd_merge::Error>) -> JobState {
    match error {
        None => JobState::Completed,
        Some(vhd_merge::Error::Cancelled(_)) => JobState::Terminated,
        Some(_) => JobState::Exception,
    }
}

/// One `--progress json` line (docs/json.md).
fn json_line(state: JobState, done: u64, total: u64, percent: u64) -> String {
    serde_json::json!({
        "schema_version": super::SCHEMA_VERSION,
        "state": state.name(),
        "bytes_done": done,
        "bytes_total": total,
        "percent": percent,
    })
    .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The widest each field of [`TEMPLATE`] other than the bar gets, e.g. `1023.99 GiB`; the
    /// template parses with its keys.
    #[test]
    fn the_line_fits_80_columns_with_room_for_a_bar() {
        let fixed = TEMPLATE
            .replace("{spinner}", "-")
            .replace("{msg}", "flattening")
            .replace("{wide_bar}", "")
            .replace("{done}", "1023.99 GiB")
            .replace("{total}", "1023.99 GiB")
            .replace("{rate}", "1023.99 MiB/s")
            .replace("{eta}", "9999h");
        assert!(!fixed.contains('{'), "{fixed}");
        assert!(style().is_some());
        assert!(fixed.len() + 10 <= 80, "{} columns: {fixed}", fixed.len());
    }
}
