//! Progress of long work (the first scan of a big tree, a big catch-up): a live line on a
//! terminal, a log line every few seconds otherwise, nothing at all for work that ends
//! quickly.

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

use crate::status::{human_bytes, human_duration};

/// Work shorter than this reports nothing.
const QUIET_FOR: Duration = Duration::from_secs(2);
/// How often the live line is redrawn, and how often a log line is written.
const LINE_EVERY: Duration = Duration::from_millis(250);
const LOG_EVERY: Duration = Duration::from_secs(10);

#[derive(Debug)]
pub struct Progress {
    what: &'static str,
    /// What counts: "entries", "changes".
    unit: &'static str,
    started: Instant,
    next: Instant,
    tty: bool,
    shown: bool,
    /// Items and bytes expected, when known.
    total: Option<(u64, u64)>,
}

impl Progress {
    pub fn new(what: &'static str, unit: &'static str) -> Progress {
        let now = Instant::now();
        Progress {
            what,
            unit,
            started: now,
            next: now + QUIET_FOR,
            tty: std::io::stderr().is_terminal(),
            shown: false,
            total: None,
        }
    }

    pub fn set_total(&mut self, items: u64, bytes: u64) {
        self.total = Some((items, bytes));
    }

    /// Reports `items` and `bytes` done so far, if it is time to.
    pub fn tick(&mut self, items: u64, bytes: u64) {
        let now = Instant::now();
        if now < self.next {
            return;
        }
        let line = line(
            self.what,
            self.unit,
            items,
            bytes,
            self.total,
            now - self.started,
        );
        if self.tty {
            self.next = now + LINE_EVERY;
            self.shown = true;
            let _ = write!(std::io::stderr().lock(), "\r\x1b[K{line}");
        } else {
            self.next = now + LOG_EVERY;
            log::info!("{line}");
        }
    }

    /// Clears the live line.
    pub fn finish(&mut self) {
        if self.shown {
            self.shown = false;
            let _ = write!(std::io::stderr().lock(), "\r\x1b[K");
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.finish();
    }
}

/// `first sync: 1200 of 10000 changes, 1.2 GiB of 5.6 GiB, 45.0 MiB/s, about 1m 25s left`.
fn line(
    what: &str,
    unit: &str,
    items: u64,
    bytes: u64,
    total: Option<(u64, u64)>,
    took: Duration,
) -> String {
    let secs = took.as_secs_f64().max(0.001);
    let rate = (bytes as f64 / secs) as u64;
    let mut s = match total {
        Some((ti, tb)) => format!(
            "{what}: {items} of {ti} {unit}, {} of {}",
            human_bytes(bytes),
            human_bytes(tb)
        ),
        None => format!("{what}: {items} {unit}, {}", human_bytes(bytes)),
    };
    s += &format!(", {}/s", human_bytes(rate));
    if let Some((ti, tb)) = total {
        // By bytes when there are bytes to move, else by items.
        let left = if tb > 0 && bytes > 0 {
            (tb.saturating_sub(bytes)) as f64 / (bytes as f64 / secs)
        } else if items > 0 {
            ti.saturating_sub(items) as f64 / (items as f64 / secs)
        } else {
            f64::NAN
        };
        if left.is_finite() {
            s += &format!(", about {} left", human_duration(left.round() as u64));
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines() {
        let ten = Duration::from_secs(10);
        assert_eq!(
            line("scanning", "entries", 5000, 200 << 20, None, ten),
            "scanning: 5000 entries, 200.0 MiB, 20.0 MiB/s"
        );
        assert_eq!(
            line(
                "first sync",
                "changes",
                100,
                1 << 30,
                Some((400, 4 << 30)),
                ten
            ),
            "first sync: 100 of 400 changes, 1.0 GiB of 4.0 GiB, 102.4 MiB/s, about 30s left"
        );
        // Nothing but directories and empty files: the ETA goes by count.
        assert_eq!(
            line("first sync", "changes", 50, 0, Some((150, 0)), ten),
            "first sync: 50 of 150 changes, 0 B of 0 B, 0 B/s, about 20s left"
        );
        assert_eq!(
            line("first sync", "changes", 0, 0, Some((150, 0)), ten),
            "first sync: 0 of 150 changes, 0 B of 0 B, 0 B/s"
        );
    }
}
