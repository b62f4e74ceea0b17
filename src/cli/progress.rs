//! The one progress bar of the command line (merge and flatten): bytes done of bytes to do,
//! on stderr when it is a terminal, never wider than the terminal, and cleared at the end.

use std::io::IsTerminal;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

/// The bar's layout: everything but the bar has a bounded width (at most 59 columns with
/// 4-digit eta hours); `wide_bar` takes what the terminal has left, so that the line never
/// wraps (a wrapped line is not cleared completely).
const TEMPLATE: &str = "{spinner} {msg} [{wide_bar}] {binary_bytes}/{binary_total_bytes} {binary_bytes_per_sec} eta {eta}";

/// A progress bar, or nothing when stderr is not a terminal or the caller asked for quiet.
/// Clones share one bar.
#[derive(Clone)]
pub struct Bar {
    bar: Option<indicatif::ProgressBar>,
    /// Set by [`Bar::clear`]: later updates (a worker's last report) draw nothing.
    done: Arc<AtomicBool>,
}

impl Bar {
    /// A bar labelled `verb` (`merging`, `flattening`), shown only when `show` and stderr is
    /// a terminal.
    pub fn new(verb: &'static str, show: bool) -> Bar {
        let bar = (show && std::io::stderr().is_terminal()).then(|| {
            let b = indicatif::ProgressBar::new(0);
            if let Ok(style) = indicatif::ProgressStyle::with_template(TEMPLATE) {
                b.set_style(style.progress_chars("=> "));
            }
            b.set_message(verb);
            b
        });
        Bar {
            bar,
            done: Arc::new(AtomicBool::new(false)),
        }
    }

    /// `done` of `total` bytes.
    pub fn set(&self, done: u64, total: u64) {
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The widest each field of [`TEMPLATE`] other than the bar gets, e.g. `1023.99 GiB`.
    #[test]
    fn the_line_fits_80_columns_with_room_for_a_bar() {
        let fixed = TEMPLATE
            .replace("{spinner}", "-")
            .replace("{msg}", "flattening")
            .replace("{wide_bar}", "")
            .replace("{binary_bytes}", "1023.99 GiB")
            .replace("{binary_total_bytes}", "1023.99 GiB")
            .replace("{binary_bytes_per_sec}", "1023.99 MiB/s")
            .replace("{eta}", "9999h");
        assert!(!fixed.contains('{'), "{fixed}");
        assert!(fixed.len() + 10 <= 80, "{} columns: {fixed}", fixed.len());
    }
}
