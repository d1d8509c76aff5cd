//! Progress of long client commands (import, export, image builds): a bar or spinner when
//! stderr is a terminal, plain lines otherwise (logs and CI keep a readable record), and
//! nothing with `--output json` unless on a terminal.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};

use super::Output;
use crate::size::format_size;

/// Plain progress lines of a transfer come at most this often.
const PLAIN_EVERY: Duration = Duration::from_secs(5);

pub struct Progress {
    /// Drawn on a terminal only.
    bar: Option<ProgressBar>,
    /// Write plain lines (not a terminal, table output).
    plain: bool,
    what: String,
    total: u64,
    last_line: Instant,
    /// The step being shown (spinners).
    step: Option<String>,
}

impl Progress {
    fn new(what: &str, out: Output, bar: impl FnOnce() -> ProgressBar, total: u64) -> Progress {
        let tty = std::io::stderr().is_terminal();
        Progress {
            bar: tty.then(|| {
                let b = bar();
                b.set_message(what.to_string());
                b
            }),
            plain: !tty && out == Output::Table,
            what: what.to_string(),
            total,
            last_line: Instant::now(),
            step: None,
        }
    }

    /// A byte count out of `total` (import, export).
    pub fn bytes(total: u64, what: &str, out: Output) -> Progress {
        Progress::new(
            what,
            out,
            || {
                let b = ProgressBar::new(total);
                b.set_style(
                    ProgressStyle::with_template(
                        "{msg} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
                    )
                    .unwrap_or_else(|_| ProgressStyle::default_bar())
                    .progress_chars("=> "),
                );
                b
            },
            total,
        )
    }

    /// Named steps of a job (image builds).
    pub fn steps(what: &str, out: Output) -> Progress {
        Progress::new(
            what,
            out,
            || {
                let b = ProgressBar::new_spinner();
                b.set_style(
                    ProgressStyle::with_template("{spinner} {elapsed} {msg}")
                        .unwrap_or_else(|_| ProgressStyle::default_spinner()),
                );
                b.enable_steady_tick(Duration::from_millis(120));
                b
            },
            0,
        )
    }

    pub fn set_position(&mut self, pos: u64) {
        if let Some(b) = &self.bar {
            b.set_position(pos);
        } else if self.plain && self.last_line.elapsed() >= PLAIN_EVERY {
            self.last_line = Instant::now();
            eprintln!(
                "{}: {}% ({} of {})",
                self.what,
                pos.saturating_mul(100) / self.total.max(1),
                format_size(pos),
                format_size(self.total)
            );
        }
    }

    /// Moves on to `step`; on a terminal the finished step stays on screen above the
    /// spinner.
    pub fn step(&mut self, step: &str) {
        if let Some(b) = &self.bar {
            if let Some(prev) = self.step.replace(step.to_string()) {
                b.println(format!("  done: {prev}"));
            }
            b.set_message(format!("{}: {step}", self.what));
        } else if self.plain {
            eprintln!("{}: {step}", self.what);
        }
    }

    pub fn finish(self) {
        if let Some(b) = self.bar {
            b.finish_and_clear();
        }
    }
}
