//! A small stderr logger: one event a line, `TIME LEVEL AGENT: message`. Level from `-v`/`-q`,
//! overridden by `FERRY_LOG` (error, warn, info, debug, trace).

use std::collections::VecDeque;
use std::io::Write;
use std::sync::{Mutex, OnceLock};
use std::time::{SystemTime, UNIX_EPOCH};

use log::{Level, LevelFilter, Log, Metadata, Record};

struct StderrLogger {
    agent: String,
}

static LOGGER: OnceLock<StderrLogger> = OnceLock::new();

/// The last warnings and errors, for `ferry status`.
static PROBLEMS: Mutex<VecDeque<String>> = Mutex::new(VecDeque::new());
const KEEP_PROBLEMS: usize = 10;

/// The last few warning and error lines logged (oldest first).
pub fn recent_problems() -> Vec<String> {
    PROBLEMS
        .lock()
        .map(|p| p.iter().cloned().collect())
        .unwrap_or_default()
}

/// Installs the logger for this process. `verbosity`: -1 quiet, 0 normal, 1+ verbose.
pub fn init(agent: &str, verbosity: i8) {
    let mut level = match verbosity {
        i8::MIN..=-1 => LevelFilter::Warn,
        0 => LevelFilter::Info,
        1 => LevelFilter::Debug,
        _ => LevelFilter::Trace,
    };
    if let Ok(v) = std::env::var("FERRY_LOG") {
        if let Ok(l) = v.parse() {
            level = l;
        }
    }
    let logger = LOGGER.get_or_init(|| StderrLogger {
        agent: agent.to_string(),
    });
    if log::set_logger(logger).is_ok() {
        log::set_max_level(level);
    }
}

/// One event stays one line, and names from peers cannot send escape sequences to the
/// terminal reading the log: control characters are written as `\u{1b}`, `\n` and so on.
fn escape_controls(message: &str) -> std::borrow::Cow<'_, str> {
    if !message.chars().any(char::is_control) {
        return message.into();
    }
    message
        .chars()
        .map(|c| {
            if c.is_control() {
                c.escape_default().to_string()
            } else {
                c.to_string()
            }
        })
        .collect::<String>()
        .into()
}

impl Log for StderrLogger {
    fn enabled(&self, m: &Metadata<'_>) -> bool {
        // Only ferry's own events; dependencies' chatter stays out of the log unless tracing.
        m.target().starts_with("ferry") || log::max_level() >= LevelFilter::Trace
    }

    fn log(&self, r: &Record<'_>) {
        if !self.enabled(r.metadata()) {
            return;
        }
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let (y, mo, d, h, mi, s) = crate::core::plan::civil_utc(now.as_secs() as i64);
        let level = match r.level() {
            Level::Error => "ERROR",
            Level::Warn => "WARN ",
            Level::Info => "INFO ",
            Level::Debug => "DEBUG",
            Level::Trace => "TRACE",
        };
        let line = format!(
            "{y:04}-{mo:02}-{d:02}T{h:02}:{mi:02}:{s:02}.{:03}Z {level} {}: {}\n",
            now.subsec_millis(),
            self.agent,
            escape_controls(&r.args().to_string())
        );
        if r.level() <= Level::Warn {
            if let Ok(mut p) = PROBLEMS.lock() {
                if p.len() == KEEP_PROBLEMS {
                    p.pop_front();
                }
                p.push_back(line.trim_end().to_string());
            }
        }
        let _ = std::io::stderr().lock().write_all(line.as_bytes());
    }

    fn flush(&self) {}
}

#[cfg(test)]
mod tests {
    use super::escape_controls;

    #[test]
    fn control_characters_are_escaped() {
        assert_eq!(escape_controls("plain path/ä.txt"), "plain path/ä.txt");
        assert_eq!(
            escape_controls("a\u{1b}[2Jb\ttab\nnew"),
            "a\\u{1b}[2Jb\\ttab\\nnew"
        );
    }
}
