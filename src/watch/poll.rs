//! The polling watcher: every `poll_interval` it asks the scanner to rescan the tree.
//!
//! Android's default (see the parent module for why), `--watcher poll` on Linux (network
//! mounts), and, through `hint_every`, the engine behind inotify's fallback for directories the
//! kernel's watch limit left unwatched.
//!
//! Why this keeps no snapshot of its own: the scanner's cache already is the snapshot, and it is
//! the only one that knows what ferry itself wrote. A watcher-side snapshot diff cannot see a
//! file ferry created and a user deleted between two walks (neither walk saw it, so nothing
//! differs, and the delete would never travel), and it would keep a second record per file that
//! a phone pays for in RAM. The scanner's walk stats every entry and hashes only what moved
//! (size, mtime, inode or mode changed), which is the cheap diff this backend needs. When
//! nothing changed, that walk is one `fstatat` per entry: directories whose ctime has not moved
//! are not listed again (their cached children stand in), and nothing is allocated or written
//! (see `crate::scan`). What it keeps for that is per directory, not per file.

use std::io;
use std::sync::atomic::{self, AtomicBool};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use super::{Hint, WatchConfig};

/// Shortest interval honoured: zero would be a busy loop.
const MIN_INTERVAL: Duration = Duration::from_millis(10);

/// Sleeps `d` unless `stop` is set (checked on every wake-up). Returns false if stopped.
pub(crate) fn nap(stop: &AtomicBool, d: Duration) -> bool {
    let end = Instant::now() + d;
    loop {
        if stop.load(atomic::Ordering::Acquire) {
            return false;
        }
        let now = Instant::now();
        if now >= end {
            return true;
        }
        // May wake early (unpark, spuriously): the loop re-checks both conditions.
        thread::park_timeout(end - now);
    }
}

/// A running poll loop; dropping it stops the thread at once.
#[derive(Debug)]
pub(crate) struct PollWatcher {
    stop: Arc<AtomicBool>,
    thread: thread::Thread,
}

impl Drop for PollWatcher {
    fn drop(&mut self) {
        self.stop.store(true, atomic::Ordering::Release);
        self.thread.unpark();
    }
}

/// Starts asking for a rescan of the whole tree every `cfg.poll_interval`.
pub(crate) fn spawn(
    cfg: &WatchConfig,
    tx: async_channel::Sender<Vec<Hint>>,
) -> io::Result<PollWatcher> {
    if !std::fs::symlink_metadata(&cfg.root)?.is_dir() {
        return Err(io::Error::other(format!(
            "{} is not a directory",
            cfg.root.display()
        )));
    }
    hint_every(cfg.poll_interval, tx, || vec![Hint::Rescan], "ferry-poll")
}

/// Runs a thread that sends `hints()` (as one batch) every `interval` until dropped or the
/// receiver is gone.
pub(crate) fn hint_every(
    interval: Duration,
    tx: async_channel::Sender<Vec<Hint>>,
    hints: impl Fn() -> Vec<Hint> + Send + 'static,
    name: &str,
) -> io::Result<PollWatcher> {
    let interval = interval.max(MIN_INTERVAL);
    let stop = Arc::new(AtomicBool::new(false));
    let thread_stop = stop.clone();
    let handle = thread::Builder::new().name(name.into()).spawn(move || {
        while nap(&thread_stop, interval) && !tx.is_closed() {
            let batch = hints();
            if !batch.is_empty() && tx.send_blocking(batch).is_err() {
                return;
            }
        }
    })?;
    Ok(PollWatcher {
        stop,
        thread: handle.thread().clone(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::watch::testutil::{assert_closes, Hints, TempTree};
    use crate::watch::Backend;

    fn start(t: &TempTree) -> (PollWatcher, Hints) {
        let (tx, rx) = async_channel::unbounded();
        let cfg = WatchConfig {
            root: t.root.clone(),
            backend: Backend::Poll,
            poll_interval: Duration::from_millis(50),
        };
        let w = spawn(&cfg, tx).unwrap();
        (w, Hints::new(rx, &t.root))
    }

    #[test]
    fn asks_for_a_rescan_every_interval() {
        let t = TempTree::new("poll-rescan");
        let (_w, mut h) = start(&t);
        for _ in 0..3 {
            assert_eq!(h.next(Duration::from_secs(10)), Some(Hint::Rescan));
        }
    }

    #[test]
    fn missing_root_is_an_error() {
        let t = TempTree::new("poll-missing");
        let (tx, _rx) = async_channel::unbounded();
        let cfg = WatchConfig {
            root: t.path("nope"),
            backend: Backend::Poll,
            poll_interval: Duration::from_millis(50),
        };
        assert!(spawn(&cfg, tx).is_err());
    }

    #[test]
    fn drop_stops_the_thread() {
        let t = TempTree::new("poll-drop");
        let (w, h) = start(&t);
        drop(w);
        assert_closes(&h.rx);
    }
}
